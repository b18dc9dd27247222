"""The embedded Tiled server and the publisher, against a real Tiled server on a free loopback port."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tiled.client import from_uri

from phasestream.apps.demo import FirstArrival
from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.errors import ConfigError, PublishError
from phasestream.runtime.tiled.access import check_tiled
from phasestream.runtime.tiled.publisher import TiledPublisher
from phasestream.runtime.tiled.updates import FailureReason, classify_failure

WAIT_S = 20.0  # generous bound for anything that should take milliseconds; never slept


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTiledServer]:
    with EmbeddedTiledServer(tmp_path_factory.mktemp("tiled"), api_key=generate_api_key()) as running:
        yield running


@pytest.fixture
def reader(server: EmbeddedTiledServer):
    """A separate client for checking what landed; data sources expose whether a node was replaced."""
    return from_uri(server.uri, api_key=server.api_key, include_data_sources=True)


class RequestRecorder(logging.Handler):
    """Records (method, path, status) of every request the server logs: what the server really saw."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        _client, method, path, _http_version, status = record.args  # uvicorn's access record
        self.requests.append((method, path, int(status)))

    def methods(self) -> list[str]:
        return [method for method, _path, _status in self.requests]


@pytest.fixture
def server_requests() -> Iterator[RequestRecorder]:
    recorder = RequestRecorder()
    access_log = logging.getLogger("uvicorn.access")
    access_log.addHandler(recorder)
    yield recorder
    access_log.removeHandler(recorder)


def unique_labels() -> dict[str, str]:
    """Labels of a fresh metric series, so each test reads its own counts."""
    return {"stage": "publish", "worker": uuid.uuid4().hex[:8]}


def rejected_count(labels: dict[str, str], reason: FailureReason) -> float:
    value = REGISTRY.get_sample_value("phasestream_messages_rejected_total", {**labels, "reason": reason})
    return value or 0.0


def complex_image(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


class PausedPublisher(TiledPublisher):
    """A publisher whose writer blocks before each write until the test sets ``proceed``."""

    def __init__(self, *args, **kwargs) -> None:
        self.proceed = threading.Event()
        self.writing = threading.Event()
        super().__init__(*args, **kwargs)

    def _write(self, update) -> None:
        self.writing.set()
        assert self.proceed.wait(WAIT_S)
        super()._write(update)


def test_embedded_server_checks_the_key_and_the_address(server: EmbeddedTiledServer, free_port: int) -> None:
    assert server.uri.startswith("http://127.0.0.1:")
    assert server.api_key not in server.uri
    check_tiled(server.uri, server.api_key)
    check_tiled(f"{server.uri}/api/v1/", server.api_key)
    with pytest.raises(PublishError, match=r"refused the API key \(401\).*--tiled-api-key"):
        check_tiled(server.uri, "wrong")
    down = f"http://127.0.0.1:{free_port}"
    with pytest.raises(PublishError, match=f"no Tiled server answers at {down}.*drop --tiled-uri"):
        check_tiled(down, server.api_key)


def test_embedded_server_needs_a_key_and_a_free_port(tmp_path: Path, server: EmbeddedTiledServer) -> None:
    with pytest.raises(ConfigError, match="needs an API key"):
        EmbeddedTiledServer(tmp_path, api_key="")
    taken = int(server.uri.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"port {taken} .* is taken"):
        EmbeddedTiledServer(tmp_path, api_key="k", port=taken).__enter__()


def test_round_trip_into_the_scan_container(server: EmbeddedTiledServer, reader) -> None:
    uid = uuid.uuid4().hex
    obj = complex_image((256, 256), seed=1)
    probe_complex = complex_image((64, 64), seed=2)
    mosaic = np.random.default_rng(3).random((96, 80), dtype=np.float32)
    with TiledPublisher(server.uri, server.api_key, **unique_labels()) as publisher:
        publisher.submit_metadata(uid, {"algorithm": "ePIE", "config": {"alpha": 1.0}})
        publisher.submit_array(uid, "object", obj, metadata={"iteration": 3})
        publisher.submit_array(uid, "probe", probe_complex)
        publisher.submit_array(uid, "mosaic", mosaic)
        assert publisher.flush(WAIT_S)
        assert (publisher.failed, publisher.last_error) == (0, None)
    scan = reader["reconstructions"][uid]
    assert dict(scan.metadata) == {"scan_uid": uid, "algorithm": "ePIE", "config": {"alpha": 1.0}}
    assert set(scan) == {"object", "probe", "mosaic"}
    assert scan["object"].dtype == np.complex64
    np.testing.assert_array_equal(scan["object"].read(), obj)
    assert scan["object"].metadata["iteration"] == 3
    np.testing.assert_array_equal(scan["probe"].read(), probe_complex)
    assert scan["mosaic"].dtype == np.float32
    np.testing.assert_array_equal(scan["mosaic"].read(), mosaic)


@pytest.mark.slow
def test_updates_in_place_without_new_nodes_or_revisions(
    server: EmbeddedTiledServer, reader, server_requests: RequestRecorder
) -> None:
    uid = uuid.uuid4().hex
    labels = unique_labels()
    with TiledPublisher(server.uri, server.api_key, **labels) as publisher:
        publisher.submit_array(uid, "object", complex_image((32, 32), seed=0))
        assert publisher.flush(WAIT_S)
        server_requests.requests.clear()
        for iteration in range(1, 6):
            publisher.submit_array(
                uid, "object", complex_image((32, 32), seed=iteration), {"iteration": iteration}
            )
            publisher.submit_metadata(uid, {"iteration": iteration, "quality": {"r_factor": 1 / iteration}})
            assert publisher.flush(WAIT_S)
        written = publisher.written
    # In place: PUTs of the array and PATCHes of metadata only, no node created or deleted.
    assert sorted(set(server_requests.methods())) == ["PATCH", "PUT"]
    assert server_requests.methods().count("PUT") == 5
    scan = reader["reconstructions"][uid]
    assert list(scan) == ["object"]
    np.testing.assert_array_equal(scan["object"].read(), complex_image((32, 32), seed=5))
    assert scan.metadata["iteration"] == 5
    assert scan.metadata["quality"] == {"r_factor": 0.2}
    assert len(scan.metadata_revisions) == 0
    assert len(scan["object"].metadata_revisions) == 0
    assert written == 11
    assert REGISTRY.get_sample_value("phasestream_publish_seconds_count", labels) == 11


@pytest.mark.slow
def test_existing_scan_container_is_reused(server: EmbeddedTiledServer, reader) -> None:
    uid = uuid.uuid4().hex
    for run, value in enumerate((1.0, 2.0)):
        with TiledPublisher(server.uri, server.api_key, **unique_labels()) as publisher:
            publisher.submit_metadata(uid, {"run": run})
            publisher.submit_array(uid, "probe", np.full((8, 8), value, np.float32))
            assert publisher.flush(WAIT_S)
            assert publisher.failed == 0, publisher.last_error
    scan = reader["reconstructions"][uid]
    assert scan.metadata["run"] == 1
    np.testing.assert_array_equal(scan["probe"].read(), np.full((8, 8), 2.0, np.float32))


def test_latest_wins_while_the_writer_is_busy(server: EmbeddedTiledServer, reader) -> None:
    uid = uuid.uuid4().hex
    with PausedPublisher(server.uri, server.api_key, **unique_labels()) as publisher:
        publisher.submit_array(uid, "object", complex_image((16, 16), seed=0))
        assert publisher.writing.wait(WAIT_S)  # the writer holds update 0 and waits on `proceed`
        started_s = time.perf_counter()
        for seed in range(1, 51):
            publisher.submit_metadata(uid, {f"key_{seed}": seed})
            publisher.submit_array(uid, "object", complex_image((16, 16), seed=seed))
        submit_s = time.perf_counter() - started_s
        publisher.proceed.set()
        assert publisher.flush(WAIT_S)
        assert publisher.superseded == 49 + 49  # 49 arrays replaced, 49 metadata updates merged
        assert publisher.written == 3  # update 0, the last array, the merged metadata
    assert submit_s < 1.0, "submit must not wait for the writer"
    scan = reader["reconstructions"][uid]
    np.testing.assert_array_equal(scan["object"].read(), complex_image((16, 16), seed=50))
    assert {f"key_{seed}" for seed in range(1, 51)} <= set(scan.metadata)


def test_shape_or_dtype_change_replaces_the_node(
    server: EmbeddedTiledServer, reader, server_requests: RequestRecorder
) -> None:
    uid = uuid.uuid4().hex
    with TiledPublisher(server.uri, server.api_key, **unique_labels()) as publisher:
        publisher.submit_array(uid, "probe", np.ones((64, 64), np.float32))
        assert publisher.flush(WAIT_S)
        server_requests.requests.clear()
        bigger = complex_image((80, 96), seed=7)
        publisher.submit_array(uid, "probe", bigger)
        assert publisher.flush(WAIT_S)
        assert publisher.failed == 0, publisher.last_error
    assert server_requests.methods() == ["DELETE", "POST", "PUT"]  # delete, create, write the data
    probe = reader["reconstructions"][uid]["probe"]
    assert (probe.shape, probe.dtype) == ((80, 96), np.complex64)
    np.testing.assert_array_equal(probe.read(), bigger)


def test_unreachable_server_is_retried_then_counted(caplog: pytest.LogCaptureFixture, free_port: int) -> None:
    down = f"http://127.0.0.1:{free_port}"
    labels = unique_labels()
    caplog.set_level(logging.ERROR, logger="phasestream.runtime.tiled.publisher")
    with TiledPublisher(down, "key", max_retries=2, backoff_s=0.01, **labels) as publisher:
        started_s = time.perf_counter()
        publisher.submit_array("scan", "object", complex_image((256, 256), seed=0))
        assert time.perf_counter() - started_s < 0.5, "submit must return at once"
        assert publisher.flush(WAIT_S)
        assert (publisher.retried, publisher.failed, publisher.written) == (2, 1, 0)
        assert down in publisher.last_error
        assert "after 3 attempts" in publisher.last_error
    assert rejected_count(labels, FailureReason.UNREACHABLE) == 1
    assert rejected_count(labels, FailureReason.REJECTED) == 0
    assert any(down in record.getMessage() for record in caplog.records)


def test_newer_submission_takes_over_a_failing_one(free_port: int) -> None:
    down = f"http://127.0.0.1:{free_port}"
    with PausedPublisher(down, "key", max_retries=1, backoff_s=0.01, **unique_labels()) as publisher:
        publisher.submit_array("scan", "object", np.zeros(4, np.float32))
        assert publisher.writing.wait(WAIT_S)
        publisher.submit_array("scan", "object", np.ones(4, np.float32))  # waits behind the failing one
        publisher.proceed.set()
        assert publisher.flush(WAIT_S)
        # The first failure hands its retry to the newer array, which then fails on its own.
        assert (publisher.superseded, publisher.retried, publisher.failed) == (1, 1, 1)


def test_wrong_api_key_is_rejected_once_without_retries(
    server: EmbeddedTiledServer, server_requests: RequestRecorder
) -> None:
    labels = unique_labels()
    with TiledPublisher(server.uri, "wrongkey", max_retries=3, backoff_s=0.01, **labels) as publisher:
        publisher.submit_array("scan", "object", np.zeros((8, 8), np.float32))
        assert publisher.flush(WAIT_S)
        assert (publisher.failed, publisher.retried, publisher.written) == (1, 0, 0)
        assert "401" in publisher.last_error
        assert "--tiled-api-key" in publisher.last_error
    statuses = [status for _method, _path, status in server_requests.requests]
    assert statuses.count(401) == 1, server_requests.requests
    assert rejected_count(labels, FailureReason.REJECTED) == 1
    assert rejected_count(labels, FailureReason.UNREACHABLE) == 0


def test_missing_api_key_is_rejected(server: EmbeddedTiledServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    labels = unique_labels()
    with TiledPublisher(server.uri, None, max_retries=3, backoff_s=0.01, **labels) as publisher:
        publisher.submit_metadata("scan", {"iteration": 1})
        assert publisher.flush(WAIT_S)
        assert (publisher.failed, publisher.retried) == (1, 0)
        assert "requires API key" in publisher.last_error
        publisher.submit_metadata("scan", {"iteration": 2})  # the writer survived
        assert publisher.flush(WAIT_S)
        assert publisher.failed == 2
    assert rejected_count(labels, FailureReason.REJECTED) == 2


def test_api_key_the_tiled_client_would_ignore_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only letters and digits"):
        TiledPublisher("http://127.0.0.1:1", "has-a-hyphen")
    with pytest.raises(ConfigError, match="only letters and digits"):
        check_tiled("http://127.0.0.1:1", "has-a-hyphen")
    with pytest.raises(ConfigError, match="only letters and digits"):
        EmbeddedTiledServer(tmp_path, api_key="has-a-hyphen")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (httpx.ConnectError("refused"), FailureReason.UNREACHABLE),
        (httpx.ReadTimeout("slow"), FailureReason.UNREACHABLE),
        (503, FailureReason.UNREACHABLE),
        (429, FailureReason.UNREACHABLE),
        (401, FailureReason.REJECTED),
        (409, FailureReason.REJECTED),
        (422, FailureReason.REJECTED),
        (TypeError("Type is not JSON serializable"), FailureReason.REJECTED),
    ],
)
def test_classify_failure(failure: Exception | int, reason: FailureReason) -> None:
    if isinstance(failure, int):
        request = httpx.Request("PUT", "http://127.0.0.1/api/v1/array/full/x")
        response = httpx.Response(failure, request=request)
        failure = httpx.HTTPStatusError("status", request=request, response=response)
    assert classify_failure(failure) is reason


def test_non_numeric_arrays_are_refused_at_submit(server: EmbeddedTiledServer) -> None:
    with (
        TiledPublisher(server.uri, server.api_key, **unique_labels()) as publisher,
        pytest.raises(PublishError, match="dtype object"),
    ):
        publisher.submit_array("scan", "object", np.array([None, 1], dtype=object))


def test_live_viewer_receives_the_update(server: EmbeddedTiledServer, reader) -> None:
    uid = uuid.uuid4().hex
    shape = (256, 256)
    with TiledPublisher(server.uri, server.api_key, **unique_labels()) as publisher:
        publisher.submit_array(uid, "object", complex_image(shape, seed=0))
        assert publisher.flush(WAIT_S)

        received: list[np.ndarray] = []
        arrived = threading.Event()

        def on_data(update) -> None:  # a named function: the callback registry only holds weak refs
            received.append(update.data())
            arrived.set()

        subscription = reader["reconstructions"][uid]["object"].subscribe()
        subscription.new_data.add_callback(on_data)
        max_size_bytes = 2 * complex_image(shape, seed=0).nbytes  # the default 1 MB would disconnect
        # start_in_thread() waits for the connection without a timeout: guard it.
        starter = threading.Thread(
            target=subscription.start_in_thread,
            kwargs={"start": None, "max_size": max_size_bytes},
            daemon=True,
        )
        starter.start()
        starter.join(WAIT_S)
        assert not starter.is_alive(), "the websocket subscription did not connect"
        try:
            publisher.submit_array(uid, "object", complex_image(shape, seed=1))
            assert arrived.wait(WAIT_S), "the viewer received no update"
        finally:
            subscription.disconnect()
    np.testing.assert_array_equal(received[-1], complex_image(shape, seed=1))


def test_the_demo_notes_when_a_product_first_reaches_tiled(server: EmbeddedTiledServer) -> None:
    uid = str(uuid.uuid4())
    watch = FirstArrival(server.uri, server.api_key, uid, "mosaic", interval_s=0.05)
    watch.start()
    with TiledPublisher(server.uri, server.api_key, **unique_labels()) as publisher:
        publisher.submit_array(uid, "object", complex_image((32, 32), seed=1))
        assert publisher.flush(WAIT_S)
        time.sleep(0.3)
        assert watch.arrived_s is None, "the object is not the mosaic"
        submitted_s = time.monotonic()
        publisher.submit_array(uid, "mosaic", complex_image((32, 32), seed=2))
        assert publisher.flush(WAIT_S)
    watch.join(WAIT_S)
    assert watch.arrived_s is not None and submitted_s <= watch.arrived_s <= time.monotonic()
    watch.stop()


@pytest.mark.slow
def test_embedded_server_keeps_results_after_exit(tmp_path: Path) -> None:
    # Last in this module: starting more Tiled servers in this process leaves the module's server
    # refusing its own key (401), seen when a test using it ran after this one.
    api_key = generate_api_key()
    obj = complex_image((32, 32), seed=9)
    with (
        EmbeddedTiledServer(tmp_path, api_key=api_key) as first,
        TiledPublisher(first.uri, api_key, **unique_labels()) as publisher,
    ):
        publisher.submit_array("kept", "object", obj)
        assert publisher.flush(WAIT_S)
    assert (tmp_path / "catalog.db").is_file()
    with EmbeddedTiledServer(tmp_path, api_key=api_key) as second:
        stored = from_uri(second.uri, api_key=api_key)["reconstructions"]["kept"]["object"].read()
    np.testing.assert_array_equal(stored, obj)

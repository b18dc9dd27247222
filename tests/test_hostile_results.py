"""Attacks on what reaches the last stages: Tiled going away around a scan's end, failures that leak from
one scan's accounting into the next, a wild scan position, malformed wire headers and scan uids that try
to leave their directory. Each test mounts the attack and asserts the result survives it.

The Tiled tests use real servers (``EmbeddedTiledServer``, restarted with tiled's own ``SimpleTiledServer``
on the same port, which binds a port with connections in TIME_WAIT) and a real publish stage. Every server
in this module shares one API key: servers started in one process share tiled's settings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from tiled.client import from_uri
from tiled.server import SimpleTiledServer

from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.errors import PhasestreamError, WireFormatError
from phasestream.runtime.config import load_pipeline, validate_pipeline
from phasestream.runtime.messages import (
    FrameBatch,
    Geometry,
    Message,
    Reconstruction,
    ScanEnd,
    ScanStart,
    decode,
    encode,
)
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.scan_uid import UNSAFE_SCAN_UID
from phasestream.runtime.stage import Stage
from phasestream.runtime.topology import place

API_KEY = generate_api_key()
WAIT_S = 30.0  # bound on what should take a second or two; polled, never slept
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
GEOMETRY = Geometry(
    energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6, detector_shape_px=(16, 16),
    detector_dtype="uint16",
)  # fmt: skip


# -- helpers ------------------------------------------------------------------------------------------


def port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


def wait_until(condition: Callable[[], bool]) -> None:
    deadline_s = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline_s, "timed out"
        time.sleep(0.05)


def pending_gauge() -> float | None:
    return REGISTRY.get_sample_value("phasestream_results_pending", {"stage": "publish", "worker": "0"})


def publish_stage(run_root: Path, uri: str) -> Stage:
    """A real publish stage (its writer thread and pending store), fed by calling it."""
    pipeline = validate_pipeline(
        {
            "name": "hostile",
            "run_dir": str(run_root / "run"),
            "tiled": {"uri": uri, "api_key": API_KEY},
            "stages": [
                {
                    "name": "publish",
                    "stage": "publish",
                    "config": {"flush_timeout_s": WAIT_S, "result_retry_s": 0.2},
                }
            ],
        }
    )
    return resolve_stage("publish").from_placement(place(pipeline, "publish", 0), pipeline)


def pending_file(run_root: Path, scan_uid: str) -> Path:
    return run_root / "run" / "pending" / "publish.0" / f"{scan_uid}.npz"


def scan_start(scan_uid: str, config_hash: str = "cfg-1234") -> ScanStart:
    return ScanStart(scan_uid=scan_uid, geometry=GEOMETRY, planned_frames=24, config_hash=config_hash)


def reconstruction(scan_uid: str, iteration: int, final: bool = False) -> Reconstruction:
    rng = np.random.default_rng(iteration)
    return Reconstruction(
        scan_uid=scan_uid, seq=iteration, algorithm="epie-batched", iteration=iteration, positions_used=5,
        final=final, object_pixel_size_m=1e-8, quality={"fourier_error": 0.1},
        error_history=[0.3, 0.2, 0.1] if final else [],
        object=(rng.standard_normal((24, 24)) + 1j * rng.standard_normal((24, 24))).astype(np.complex64),
        probe=rng.standard_normal((16, 16)).astype(np.complex64),
        positions_m=rng.uniform(-1e-7, 1e-7, (5, 2)),
    )  # fmt: skip


def scan_end(scan_uid: str) -> ScanEnd:
    return ScanEnd(scan_uid=scan_uid, frames_sent=24, accounting={"refine.0": {"frames_used": 24}})


def run_scan(stage: Stage, scan_uid: str) -> Reconstruction:
    """A whole scan through publish: start, one snapshot, the final estimate, end; the final estimate."""
    final = reconstruction(scan_uid, 40, final=True)
    list(stage.on_scan_start(scan_start(scan_uid)))
    list(stage.process(reconstruction(scan_uid, 2)))
    list(stage.process(final))
    list(stage.on_scan_end(scan_end(scan_uid)))
    return final


def assert_complete_in_tiled(uri: str, final: Reconstruction) -> None:
    """The scan's node holds the final arrays and the whole metadata: start, final figures and end."""
    node = from_uri(uri, api_key=API_KEY)["reconstructions"][final.scan_uid]
    np.testing.assert_array_equal(node["object"].read(), final.object)
    np.testing.assert_array_equal(node["probe"].read(), final.probe)
    np.testing.assert_array_equal(node["positions"].read(), final.positions_m)
    metadata = dict(node.metadata)
    assert metadata["status"] == "complete" and metadata["final"] is True
    assert metadata["iteration"] == 40 and metadata["error_history"] == [0.3, 0.2, 0.1]
    assert metadata["geometry"] == GEOMETRY.model_dump(mode="json")
    assert (metadata["planned_frames"], metadata["config_hash"]) == (24, "cfg-1234")
    assert metadata["accounting"] == {"refine.0": {"frames_used": 24}}


# -- 1. Tiled down across the end of a scan; a restart on an empty catalog between scans -----------------


@pytest.mark.slow
def test_tiled_down_across_the_end_of_a_scan_the_final_result_waits_on_disk_then_lands(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "tiled"
    with EmbeddedTiledServer(data_dir, api_key=API_KEY) as server:
        uri = server.uri
        stage = publish_stage(tmp_path, uri)
        list(stage.on_scan_start(scan_start("outage")))
        list(stage.process(reconstruction("outage", 2)))
        assert stage._publisher.flush(WAIT_S)

    # Tiled is down when the final estimate and the scan's end arrive.
    final = reconstruction("outage", 40, final=True)
    list(stage.process(final))
    list(stage.on_scan_end(scan_end("outage")))
    assert stage.scan("outage").counts["results_pending"] == 1
    assert pending_gauge() == 1
    assert pending_file(tmp_path, "outage").is_file()

    restarted = SimpleTiledServer(directory=data_dir.resolve(), api_key=API_KEY, port=port_of(uri))
    try:
        wait_until(lambda: stage._publisher.pending_results == 0)
        assert pending_gauge() == 0
        assert_complete_in_tiled(uri, final)
    finally:
        stage.close()
        restarted.close()
    assert not pending_file(tmp_path, "outage").exists()


@pytest.mark.slow
def test_a_restart_on_an_empty_catalog_between_scans_recreates_the_next_scan_with_its_metadata(
    tmp_path: Path,
) -> None:
    with EmbeddedTiledServer(tmp_path / "first", api_key=API_KEY) as server:
        uri = server.uri
        stage = publish_stage(tmp_path, uri)
        run_scan(stage, "before")

    restarted = SimpleTiledServer(
        directory=(tmp_path / "second").resolve(), api_key=API_KEY, port=port_of(uri)
    )
    try:
        # The first write of the next scan finds /reconstructions gone (404): it must be created again.
        list(stage.on_scan_start(scan_start("after")))
        assert stage._publisher.flush(WAIT_S)
        metadata = dict(from_uri(uri, api_key=API_KEY)["reconstructions"]["after"].metadata)
        assert metadata["geometry"] == GEOMETRY.model_dump(mode="json")
        assert (metadata["planned_frames"], metadata["config_hash"]) == (24, "cfg-1234")

        list(stage.process(reconstruction("after", 2)))
        final = reconstruction("after", 40, final=True)
        list(stage.process(final))
        list(stage.on_scan_end(scan_end("after")))
        counts = stage.scan("after").counts
        assert (counts["publish_failures"], counts["results_pending"]) == (0, 0)
        assert_complete_in_tiled(uri, final)
    finally:
        stage.close()
        restarted.close()


# -- 2. failures per scan; a restarted worker sends what an outage left ------------------------------------


@pytest.mark.slow
def test_a_clean_scan_after_a_failing_one_reports_no_failures_and_a_restart_resends_the_left_result(
    tmp_path: Path, free_port: int
) -> None:
    uri = f"http://127.0.0.1:{free_port}"  # nothing listens yet
    first = publish_stage(tmp_path, uri)
    list(first.on_scan_start(scan_start("failing")))
    list(first.process(reconstruction("failing", 2)))
    assert first._publisher.flush(WAIT_S)  # the start and the snapshot are given up
    failing_final = reconstruction("failing", 40, final=True)
    list(first.process(failing_final))
    list(first.on_scan_end(scan_end("failing")))
    failing = first.scan("failing").counts
    assert failing["publish_failures"] > 0 and failing["results_pending"] == 1
    first.close()  # the worker stops with the final result still on disk
    assert pending_file(tmp_path, "failing").is_file()

    with EmbeddedTiledServer(tmp_path / "tiled", api_key=API_KEY, port=port_of(uri)):
        second = publish_stage(tmp_path, uri)  # the worker started again
        try:
            run_scan(second, "clean")
            clean = second.scan("clean").counts
            assert (clean["publish_failures"], clean["results_pending"]) == (0, 0)
            wait_until(lambda: second._publisher.pending_results == 0)
            assert_complete_in_tiled(uri, failing_final)
        finally:
            second.close()
    assert not pending_file(tmp_path, "failing").exists()


# -- 3. one position 1 mm away -----------------------------------------------------------------------------


def refine_stage(**config: Any) -> Stage:
    import torch

    torch.set_num_threads(1)
    pipeline = load_pipeline(DEPLOY / "demo.yaml")
    placement = place(pipeline, "refine", 0)
    placement.spec.config.update(config)
    return resolve_stage(placement.spec.stage).from_placement(placement, pipeline)


@pytest.mark.parametrize("extent_known", [False, True], ids=["max_canvas_px", "scan_extent"])
def test_a_position_1_mm_away_is_left_out_and_counted_not_allocated_for(
    extent_known: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from phasestream_bench.solvers import simulate_scan

    from phasestream.models.physics import object_pixel_size_m

    scan = simulate_scan(n_positions=24, size_px=32, seed=2)
    stage = refine_stage(
        min_positions=4, probe_search_epochs=0, execution={"num_threads": 1}, max_canvas_px=256
    )
    geometry = GEOMETRY.model_copy(update={"detector_shape_px": (32, 32)})
    dx = object_pixel_size_m(geometry.energy_kev, geometry.detector_distance_m, geometry.pixel_size_m, 32)
    positions_m = scan.top_left_px * dx
    low, high = positions_m.min(axis=0), positions_m.max(axis=0)
    extent = (low[0], high[0], low[1], high[1]) if extent_known else None
    start = ScanStart(scan_uid="wild", geometry=geometry, planned_frames=24, scan_extent_m=extent)
    list(stage.on_scan_start(start))
    positions_m[0] += 1e-3  # the first position of the batch: the encoder glitched
    batch = FrameBatch(
        scan_uid="wild",
        seq=1,
        frame_indices=list(range(24)),
        frames=scan.intensities,
        positions_m=positions_m,
    )
    with caplog.at_level(logging.WARNING):
        list(stage.process(batch))

    counts = stage.scan("wild").counts
    assert counts["rejected_position_outlier"] == 1 and counts["frames_used"] == 23
    solver = stage._solves["wild"].solver
    assert solver.n_positions == 23
    # 1 mm is 8,500 object pixels here: a canvas of 0.6 GB. The scan itself fits in 256 a side.
    assert max(solver.object.shape) <= 256
    warning = next(r.getMessage() for r in caplog.records if "position_outlier" in r.getMessage())
    assert f"{positions_m[0, 0]:.6g}" in warning and ("extent" in warning) == extent_known


# -- 4. malformed wire headers --------------------------------------------------------------------------


def _batch() -> FrameBatch:
    frames = np.arange(2 * 4 * 3, dtype=np.uint16).reshape(2, 4, 3)
    return FrameBatch(
        scan_uid="wire", seq=1, frame_indices=[0, 1], frames=frames, positions_m=np.zeros((2, 2))
    )


def _with_header(change: Callable[[dict[str, Any]], None], buffers: list[bytes] | None = None) -> list[bytes]:
    frames = encode(_batch())
    header = json.loads(frames[0])
    change(header)
    return [json.dumps(header).encode(), *(buffers if buffers is not None else frames[1:])]


def _set_spec(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        header["arrays"][0][field] = value

    return change


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(field, value)


@pytest.mark.parametrize(
    ("frames", "fragment"),
    [
        (_with_header(_set("arrays", None), buffers=[]), "'arrays' must be a list"),
        (_with_header(_set("arrays", {"name": "frames"}), buffers=[]), "'arrays' must be a list"),
        (_with_header(_set("arrays", "frames"), buffers=[]), "'arrays' must be a list"),
        (_with_header(lambda h: h["arrays"].__setitem__(0, 7)), r"arrays\[0\] must be a"),
        (
            _with_header(lambda h: h["arrays"].__setitem__(0, ["frames", "<u2", [2]])),
            r"arrays\[0\] must be a",
        ),
        (_with_header(_set_spec("dtype", "")), r"arrays\[0\].*dtype: .*'' is not a numpy dtype"),
        (_with_header(_set_spec("dtype", "not-a-dtype")), r"arrays\[0\].*dtype"),
        (_with_header(_set_spec("dtype", "O")), r"arrays\[0\].*dtype.*not bool, integer, float or complex"),
        (_with_header(_set_spec("dtype", "<f4,<i4")), r"arrays\[0\].*dtype.*not bool, integer"),
        (_with_header(_set_spec("dtype", "(2,)<f4")), r"arrays\[0\].*dtype.*not bool, integer"),
        (_with_header(_set_spec("dtype", "<U3")), r"arrays\[0\].*dtype.*not bool, integer"),
        (_with_header(_set_spec("dtype", "<M8[ns]")), r"arrays\[0\].*dtype.*not bool, integer"),
        (_with_header(_set_spec("dtype", None)), r"arrays\[0\].*dtype"),
        (_with_header(_set_spec("shape", [-2, 4, 3])), r"arrays\[0\].*shape.*negative"),
        (_with_header(_set_spec("shape", [2] * 33)), r"arrays\[0\].*shape.*33 dimensions"),
        (_with_header(_set_spec("shape", [10**30])), r"arrays\[0\].*2\*\*62"),
        # 2**32 · 2**32 wraps to 0 in int64: an empty buffer used to match, and reshape then failed.
        (
            _with_header(_set_spec("shape", [2**32, 2**32]), buffers=[b"", b"\0" * 32]),
            r"arrays\[0\].*2\*\*62",
        ),
        (_with_header(_set_spec("shape", [0, 2**40, 2**40])), r"arrays\[0\].*2\*\*62"),
        (_with_header(_set_spec("shape", "big")), r"arrays\[0\].*shape"),
        (_with_header(_set_spec("name", "scan_uid")), r"arrays\[0\].name 'scan_uid' is none of the array"),
        (_with_header(_set_spec("name", "positions_m")), "describes an array twice"),
        (_with_header(_set_spec("extra", 1)), r"arrays\[0\].*extra"),
        (_with_header(_set("bad_pixel_mask", {"packed_bits": "", "shape": 5})), "travel as buffers"),
        ([b"[" * 100_000], "not JSON"),
    ],
)
def test_each_malformed_header_is_a_wire_format_error_naming_the_field(
    frames: list[bytes], fragment: str
) -> None:
    with pytest.raises(WireFormatError, match=fragment):
        decode(frames)


def _valid_wire() -> list[list[bytes]]:
    messages: list[Message] = [
        scan_start("wire"),
        _batch(),
        reconstruction("wire", 3),
        scan_end("wire"),
    ]
    return [[bytes(part) for part in encode(message)] for message in messages]


VALID_WIRE = _valid_wire()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)
DTYPE_TEXTS = st.sampled_from(
    ["<u2", "<f8", "<c8", "|b1", "", "O", "<f4,<i4", "(2,)<f4", "<U3", "V8", "M8"]
) | st.text(max_size=6)
DIMENSIONS = st.integers(0, 4) | st.integers(-(2**70), 2**70)
SPECS = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["frames", "positions_m", "object", "probe", "bad_pixel_mask", "kind"])
        | JSON_VALUES,
        "dtype": DTYPE_TEXTS | JSON_VALUES,
        "shape": st.lists(DIMENSIONS, max_size=5) | JSON_VALUES,
    },
)


@st.composite
def hostile_messages(draw: st.DrawFn) -> list[bytes]:
    """A valid message's header with fields replaced, dropped or added, its array descriptions rewritten,
    and buffers that sometimes fit what the header now claims."""
    parts = draw(st.sampled_from(VALID_WIRE))
    header = json.loads(parts[0])
    for key in draw(st.lists(st.sampled_from(sorted(header)), max_size=3)):
        if draw(st.booleans()):
            header[key] = draw(JSON_VALUES)
        else:
            header.pop(key, None)
    header.update(
        draw(
            st.dictionaries(
                st.sampled_from(["arrays", "frames", "kind", "seq", "extra"]), JSON_VALUES, max_size=2
            )
        )
    )
    if draw(st.booleans()):
        header["arrays"] = draw(st.lists(SPECS | JSON_VALUES, max_size=4))
    buffers = draw(
        st.sampled_from([list(parts[1:]), _fitting_buffers(header.get("arrays")), [b""] * len(parts[1:])])
        | st.lists(st.binary(max_size=64), max_size=4)
    )
    return [json.dumps(header).encode(), *buffers]


def _fitting_buffers(specs: Any) -> list[bytes]:
    """Zero bytes of the size each description claims, where that is small; a few bytes elsewhere."""
    buffers = []
    for spec in specs if isinstance(specs, list) else []:
        try:
            size = np.dtype(spec["dtype"]).itemsize * int(np.prod(spec["shape"], dtype=object))
        except Exception:  # the description is hostile by design; any failure just means "does not fit"
            size = 3
        buffers.append(bytes(size if 0 <= size <= 4096 else 3))
    return buffers


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_messages())
@pytest.mark.slow
def test_decode_gives_a_message_or_a_wire_format_error_for_any_header(frames: list[bytes]) -> None:
    try:
        message = decode(frames)
    except WireFormatError:
        return
    assert isinstance(message, Message)


# -- 5. scan uids that leave their directory ----------------------------------------------------------------


def record_stage(root: Path) -> Stage:
    pipeline = validate_pipeline(
        {
            "name": "record",
            "run_dir": str(root / "run"),
            "stages": [{"name": "record", "stage": "record", "config": {"directory": str(root / "scans")}}],
        }
    )
    return resolve_stage("record").from_placement(place(pipeline, "record", 0), pipeline)


def rejected(stage: str) -> float:
    labels = {"stage": stage, "worker": "0", "reason": UNSAFE_SCAN_UID}
    return REGISTRY.get_sample_value("phasestream_messages_rejected_total", labels) or 0.0


def test_record_refuses_a_traversal_uid_and_a_link_out_of_its_directory_yet_passes_the_frames(
    tmp_path: Path,
) -> None:
    stage = record_stage(tmp_path)
    before = rejected("record")
    # Built past validation: the attack is a uid that got through whatever checked it upstream.
    start = scan_start("ok").model_copy(update={"scan_uid": "../escape"})
    assert list(stage.on_scan_start(start)) == [start]
    batch = FrameBatch(
        scan_uid="../escape", frame_indices=[0, 1], frames=np.ones((2, 16, 16), np.uint16),
        positions_m=np.zeros((2, 2)),
    )  # fmt: skip
    assert list(stage.process(batch)) == [batch]
    list(stage.on_scan_end(scan_end("ok").model_copy(update={"scan_uid": "../escape"})))
    counts = stage.scan("../escape").counts
    assert (counts["scans_not_recorded"], counts["frames_not_recorded"]) == (1, 2)
    assert not list(tmp_path.rglob("*escape*"))

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp_path / "scans" / "victim.cxi").symlink_to(outside)
    list(stage.on_scan_start(scan_start("victim")))
    assert outside.read_text() == "keep me"
    assert stage.scan("victim").counts["scans_not_recorded"] == 1
    assert rejected("record") == before + 2


def test_publish_refuses_a_traversal_uid_writing_no_file_and_no_node(tmp_path: Path, free_port: int) -> None:
    stage = publish_stage(tmp_path, f"http://127.0.0.1:{free_port}")
    before = rejected("publish")
    uid = "../../escape"
    try:
        list(stage.on_scan_start(scan_start("ok").model_copy(update={"scan_uid": uid})))
        list(stage.process(reconstruction("ok", 40, final=True).model_copy(update={"scan_uid": uid})))
        list(stage.on_scan_end(scan_end("ok").model_copy(update={"scan_uid": uid})))
        assert stage.scan(uid).counts[f"{UNSAFE_SCAN_UID}_messages"] == 3
        assert rejected("publish") == before + 3
        # The writer was never handed a node: nothing tried, nothing pending.
        assert (stage._publisher.written, stage._publisher.retried, stage._publisher.pending_results) == (
            0,
            0,
            0,
        )
        with pytest.raises(PhasestreamError, match="not a safe name") as refused:
            stage._publisher.submit_metadata(uid, {"status": "running"})
        assert refused.value.reason == UNSAFE_SCAN_UID
    finally:
        stage.close()
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]

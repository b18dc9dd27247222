"""Replay from a Bluesky run in Tiled: the SELUN's files, TiledWriter in its own process, and the replay.

Real parts only: a RunEngine with ophyd.sim motors whose readbacks differ from their setpoints (as encoders
do), the simulated SELUN writing each run's frames to an HDF5 file and streaming Stream V2, the real
``bluesky-0MQ-proxy``, ``phasestream.apps.bluesky.tiled_writer`` (bluesky_tiled_plugins.TiledWriter) as a
subprocess, and a real Tiled server serving the frames folder as readable storage. The runs are made once
per module; every test reads them back.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import h5py
import numpy as np
import pytest
import zmq
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from ophyd.sim import SynAxis, det

from phasestream.apps.bluesky.bridge import encode_document
from phasestream.apps.replay.replay import ReplayRate, replay, replay_rate_hz
from phasestream.apps.replay.session import ScanSource, read_scan
from phasestream.apps.replay.to_tiled import TiledRunScan, read_tiled_run, split_run_uri
from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.errors import ConfigError, PositionError, ScanFileError
from phasestream.formats.position_channel import PositionBatch, PositionsEnd, decode_positions
from phasestream.formats.stream_v2.decode import EndMessage, ImageMessage, StartMessage, decode_stream_v2
from phasestream.runtime.tiled.access import read_api_key
from phasestream.simulators.ophyd_selun import FRAMES_DATASET, SelunDetector, SimulatedSample
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan

READBACK_JITTER_UM = 0.02  # encoder noise: positions built from setpoints would differ
GRID_SHAPE = (4, 5)
GRID_HALF_RANGE_UM = 0.8
WRITER_TIMEOUT_S = 60.0  # TiledWriter takes ~70-250 ms per event on a loaded 2-core machine


@dataclass
class Runs:
    """What the module's RunEngine session left behind, and where."""

    tiled_uri: str
    api_key: str
    frames_dir: Path
    sample: SimulatedScan
    grid: str  # uid of the 4 × 5 ptychography grid with the SELUN
    z_scan: str  # the SELUN, but scanning a motor that is neither y nor x
    no_frames: str  # a grid over y and x with a point detector only
    events: dict[str, list[dict[str, Any]]]  # events as the RunEngine emitted them, per run
    streamed: list[Any]  # the Stream V2 messages the SELUN sent, decoded
    writer_log: list[str]


def _motor(name: str, seed: int) -> SynAxis:
    rng = np.random.default_rng(seed)
    return SynAxis(name=name, readback_func=lambda setpoint: setpoint + rng.normal(0.0, READBACK_JITTER_UM))


def _start_proxy(run_dir: Path) -> tuple[subprocess.Popen, str, str]:
    """``bluesky-0MQ-proxy`` on ipc sockets; it prints its addresses once both are bound."""
    in_address, out_address = f"ipc://{run_dir}/bluesky-in.sock", f"ipc://{run_dir}/bluesky-out.sock"
    executable = (
        shutil.which("bluesky-0MQ-proxy", path=str(Path(sys.executable).parent)) or "bluesky-0MQ-proxy"
    )
    proxy = subprocess.Popen(
        [executable, "--in-address", in_address, "--out-address", out_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proxy.stdout is not None
    for line in proxy.stdout:
        if line.startswith("Receiving on address"):
            return proxy, in_address, out_address
    raise AssertionError(f"bluesky-0MQ-proxy exited with {proxy.wait()} before binding")


class WriterProcess:
    """``python -m phasestream.apps.bluesky.tiled_writer`` with its log lines collected by a thread."""

    def __init__(self, proxy_address: str, tiled_uri: str, api_key: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "phasestream.apps.bluesky.tiled_writer", "--proxy", proxy_address,
             "--tiled-uri", tiled_uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PHASESTREAM_TILED__API_KEY": api_key},
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip())

    def logged(self, text: str, within_s: float) -> bool:
        """Whether a log line holds ``text``, waiting up to ``within_s`` for one to arrive."""
        deadline = time.monotonic() + within_s
        while not any(text in line for line in self.log):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                self.log.append(self.lines.get(timeout=min(remaining, 0.05)))
            except queue.Empty:
                assert self.process.poll() is None, "the writer exited:\n" + "\n".join(self.log)
        return True

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(15)
        finally:
            while not self.lines.empty():
                self.log.append(self.lines.get())


def _handshake(publisher: Publisher, writer: WriterProcess, timeout_s: float = 30.0) -> None:
    """Publish a resource of no run until the writer has received one: the PUB/SUB path is then up."""
    deadline = time.monotonic() + timeout_s
    ping = {"uid": "handshake", "spec": "phasestream_handshake", "root": "", "resource_path": "",
            "resource_kwargs": {}, "path_semantics": "posix", "run_start": "no-such-run"}  # fmt: skip
    while not writer.logged("receiving documents", 0.2):
        assert time.monotonic() < deadline, "no document reached the writer:\n" + "\n".join(writer.log)
        publisher("resource", ping)


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    run_dir = Path(tempfile.mkdtemp(prefix="psrt-", dir="/tmp"))  # short: ipc paths are limited
    sample = simulate_scan(
        ScanSimulationConfig(
            detector_size_px=64,
            probe_diameter_px=24,
            probe_bright_field_diameter_px=32,
            n_positions=30,
            seed=4,
        )
    )
    api_key = generate_api_key()
    frames_dir = run_dir / "frames"
    y, x, z = _motor("sample_y", 1), _motor("sample_x", 2), _motor("sample_z", 3)
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    descriptors: dict[str, str] = {}

    def keep_events(name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            descriptors[doc["uid"]] = doc["run_start"]
        elif name == "event":
            events[descriptors[doc["descriptor"]]].append(doc)

    with EmbeddedTiledServer(run_dir / "tiled", api_key, readable_storage=[frames_dir]) as server:
        proxy, in_address, out_address = _start_proxy(run_dir)
        writer = WriterProcess(out_address, server.uri, api_key)
        selun = SelunDetector(
            name="selun",
            y_motor=y,
            x_motor=x,
            source=SimulatedSample(sample, seed=1),
            data_endpoint="tcp://127.0.0.1:0",
            frames_dir=frames_dir,
        )
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        pull.connect(selun.data_endpoint)
        publisher = Publisher(in_address, serializer=encode_document)
        try:
            RE = RunEngine({})
            RE.subscribe(selun.on_run_start, "start")
            RE.subscribe(keep_events)
            _handshake(publisher, writer)
            RE.subscribe(publisher)
            half = GRID_HALF_RANGE_UM
            (grid,) = RE(
                bp.grid_scan(
                    [selun], y, -half, half, GRID_SHAPE[0], x, -half, half, GRID_SHAPE[1], snake_axes=True
                )
            )
            (z_scan,) = RE(bp.scan([selun], z, -1, 1, 3))
            (no_frames,) = RE(bp.grid_scan([det], y, -half, half, 2, x, -half, half, 2))
            for uid in (grid, z_scan, no_frames):
                assert writer.logged(f"run {uid} written to Tiled", WRITER_TIMEOUT_S), "\n".join(writer.log)
            streamed = []
            while pull.poll(100):
                streamed.append(decode_stream_v2(pull.recv()))
        finally:
            publisher.close()
            assert writer.stop() == 0, "\n".join(writer.log)
            proxy.terminate()
            proxy.wait(10)
            pull.close(linger=0)
            context.term()
            selun.close()
        yield Runs(
            server.uri,
            api_key,
            frames_dir,
            sample,
            grid,
            z_scan,
            no_frames,
            dict(events),
            streamed,
            writer.log,
        )
    shutil.rmtree(run_dir, ignore_errors=True)


def _readbacks_m(runs: Runs, uid: str) -> np.ndarray:
    return np.array([[e["data"]["sample_y"], e["data"]["sample_x"]] for e in runs.events[uid]]) * 1e-6


def _streamed_frames(runs: Runs, uid: str) -> np.ndarray:
    """The frames the SELUN streamed for a run: the images between its run's start and end messages."""
    frames, inside = [], False
    for message in runs.streamed:
        if isinstance(message, StartMessage):
            inside = message.user_data["scan_uid"] == uid
        elif isinstance(message, ImageMessage) and inside:
            frames.append(np.array(message.frame))
    return np.stack(frames)


# ---- the device's file and the writer ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_device_writes_each_runs_frames_to_an_hdf5_file(runs: Runs) -> None:
    streamed = _streamed_frames(runs, runs.grid)
    assert streamed.shape == (20, 64, 64) and streamed.dtype == np.uint16
    with h5py.File(runs.frames_dir / f"selun_{runs.grid}.h5", "r") as file:
        data = file[FRAMES_DATASET]
        assert data.dtype == np.uint16 and data.chunks == (1, 64, 64)
        np.testing.assert_array_equal(data[()], streamed)
    assert sorted(path.name for path in runs.frames_dir.iterdir()) == sorted(
        f"selun_{uid}.h5" for uid in (runs.grid, runs.z_scan)
    )
    # Counts are photon counts, not a constant: a wrong frame would show.
    assert streamed.max() > 100 and len({frame.tobytes() for frame in streamed}) == 20


@pytest.mark.slow
def test_the_writer_process_wrote_every_run(runs: Runs) -> None:
    written = {uid: f"run {uid} written to Tiled: {n} events" for uid, n in
               ((runs.grid, 20), (runs.z_scan, 3), (runs.no_frames, 4))}  # fmt: skip
    for line in written.values():
        assert any(line in logged for logged in runs.writer_log), runs.writer_log
    assert not any("ERROR" in line for line in runs.writer_log), runs.writer_log


# ---- reading the run back ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_replay_reads_exactly_the_frames_and_readbacks_of_the_run(runs: Runs) -> None:
    scan = read_tiled_run(runs.tiled_uri, runs.grid, api_key=runs.api_key)
    assert isinstance(scan, TiledRunScan)
    frames = np.concatenate(list(scan.iter_frames(6)))
    assert frames.dtype == np.uint16 and scan.frame_dtype == np.uint16
    np.testing.assert_array_equal(frames, _streamed_frames(runs, runs.grid))
    # Positions are the readbacks in metres, exactly, event by event; setpoints differ by the jitter.
    readbacks_m = _readbacks_m(runs, runs.grid)
    np.testing.assert_array_equal(scan.positions_m, readbacks_m)
    setpoints_m = np.array([[e["data"]["sample_y_setpoint"], e["data"]["sample_x_setpoint"]]
                            for e in runs.events[runs.grid]]) * 1e-6  # fmt: skip
    assert np.abs(scan.positions_m - setpoints_m).max() > 1e-9
    sample = runs.sample
    assert scan.energy_kev == sample.energy_kev and scan.detector_distance_m == sample.detector_distance_m
    assert scan.detector_pixel_size_m == sample.detector_pixel_size_m
    assert scan.n_frames == 20 and scan.frame_shape_px == (64, 64) and scan.scan_shape == GRID_SHAPE
    # The recorded pace is the RunEngine's: the median time between its events.
    times = np.array([e["time"] for e in runs.events[runs.grid]])
    assert scan.frame_time_s == pytest.approx(float(np.median(np.diff(times))), rel=1e-6)
    assert replay_rate_hz(ReplayRate.RECORDED, scan) == pytest.approx(1 / scan.frame_time_s)
    assert scan.run_uri == f"{runs.tiled_uri}/{runs.grid}"


@pytest.mark.slow
def test_an_inverted_axis_is_negated(runs: Runs) -> None:
    scan = read_tiled_run(runs.tiled_uri, runs.grid, api_key=runs.api_key, invert_x=True, motor_unit="um")
    np.testing.assert_array_equal(scan.positions_m, _readbacks_m(runs, runs.grid) * [1.0, -1.0])


@pytest.mark.slow
def test_replay_sends_the_tiled_run_through_the_emitter(runs: Runs) -> None:
    folder = Path(tempfile.mkdtemp(prefix="psrt-r-", dir="/tmp"))
    try:
        scan = read_tiled_run(runs.tiled_uri, runs.grid, api_key=runs.api_key)
        received = _replay_into_receiver(scan, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    start, *images, end = received["data"]
    assert isinstance(start, StartMessage) and isinstance(end, EndMessage)
    assert start.user_data["scan_uid"] == runs.grid and start.user_data["scan_shape"] == list(GRID_SHAPE)
    assert start.user_data["replay_of"] == f"{runs.tiled_uri}/{runs.grid}"
    assert (start.number_of_images, start.dtype) == (20, np.dtype("<u2"))
    assert start.energy_kev == pytest.approx(runs.sample.energy_kev)
    np.testing.assert_array_equal(np.stack([i.frame for i in images]), _streamed_frames(runs, runs.grid))
    *batches, positions_end = received["positions"]
    assert all(isinstance(b, PositionBatch) for b in batches) and isinstance(positions_end, PositionsEnd)
    np.testing.assert_array_equal(np.concatenate([b.image_ids for b in batches]), np.arange(20))
    np.testing.assert_array_equal(
        np.concatenate([b.positions_m for b in batches]), _readbacks_m(runs, runs.grid)
    )


def _replay_into_receiver(scan: TiledRunScan, folder: Path) -> dict[str, list[Any]]:
    endpoints = (f"ipc://{folder}/data.sock", f"ipc://{folder}/pos.sock")
    received: dict[str, list[Any]] = {"data": [], "positions": []}
    context = zmq.Context()
    try:
        data, positions = context.socket(zmq.PULL), context.socket(zmq.PULL)

        def receive() -> None:
            data.connect(endpoints[0])
            positions.connect(endpoints[1])
            channels = (
                (data, decode_stream_v2, EndMessage, received["data"]),
                (positions, decode_positions, PositionsEnd, received["positions"]),
            )
            for socket, decode, end, out in channels:
                while not (out and isinstance(out[-1], end)) and socket.poll(30_000):
                    out.append(decode(socket.recv()))

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        report = replay(
            scan, ReplayRate.MAX, *endpoints, progress=False, scan_uid=str(scan.source), send_timeout_s=30
        )
        receiver.join(30)
        assert not receiver.is_alive()
        assert report.frames_sent == scan.n_frames
    finally:
        context.destroy(linger=0)
    return received


# ---- the replay's source ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_given_as_uri_is_read_with_the_key_given_else_the_environments(
    runs: Runs, tmp_path: Path, monkeypatch
) -> None:
    for variable in ("PHASESTREAM_TILED__API_KEY", "TILED_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(runs.api_key + "\n")
    key_file.chmod(0o600)
    run_uri = f"{runs.tiled_uri}/{runs.grid}"
    scan = read_scan(ScanSource(tiled_run=run_uri, tiled_api_key=read_api_key(key_file)))
    np.testing.assert_array_equal(scan.positions_m, _readbacks_m(runs, runs.grid))
    monkeypatch.setenv("TILED_API_KEY", runs.api_key)
    assert read_api_key(None) == runs.api_key
    np.testing.assert_array_equal(read_scan(ScanSource(tiled_run=run_uri)).positions_m, scan.positions_m)
    with pytest.raises(ConfigError, match=r"either a scan file.*not both"):
        read_scan(ScanSource(file=tmp_path / "scan.cxi", tiled_run=run_uri))
    with pytest.raises(ConfigError, match="not neither"):
        read_scan(ScanSource())


def test_split_run_uri() -> None:
    assert split_run_uri("http://127.0.0.1:8000/abc-1") == ("http://127.0.0.1:8000", "abc-1")
    assert split_run_uri("https://host/tiled/abc/") == ("https://host/tiled", "abc")
    assert split_run_uri("http://h:8000/api/v1/metadata/abc") == ("http://h:8000", "abc")
    for bad in ("abc", "http://host:8000", "ftp://host/abc"):
        with pytest.raises(ConfigError, match="http://host:port/RUN_UID"):
            split_run_uri(bad)


# ---- bad input --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_uid_that_does_not_exist_is_named(runs: Runs) -> None:
    with pytest.raises(
        ScanFileError, match=r"no run 'no-such-uid' in Tiled at http://127\.0\.0\.1.*most recent"
    ) as caught:
        read_tiled_run(runs.tiled_uri, "no-such-uid", api_key=runs.api_key)
    assert runs.grid in str(caught.value)  # the runs that are there, to spot a typo


@pytest.mark.slow
def test_a_wrong_key_fails_without_showing_it(runs: Runs) -> None:
    wrong = generate_api_key()
    with pytest.raises(ScanFileError, match=r"tiled_rejected.*PHASESTREAM_TILED__API_KEY") as caught:
        read_tiled_run(f"{runs.tiled_uri}?api_key={wrong}", runs.grid)
    assert wrong not in str(caught.value) and runs.api_key not in str(caught.value)


@pytest.mark.slow
def test_a_run_without_the_expected_motors_names_them(runs: Runs) -> None:
    with pytest.raises(
        ScanFileError, match=r"moves \['sample_z'\].*y motor 'sample_y' and x motor 'sample_x'.*--y-motor"
    ):
        read_tiled_run(runs.tiled_uri, runs.z_scan, api_key=runs.api_key)


@pytest.mark.slow
def test_a_run_without_frames_says_how_to_get_them(runs: Runs) -> None:
    with pytest.raises(ScanFileError, match=r"holds no frames.*'det'.*frames_dir"):
        read_tiled_run(runs.tiled_uri, runs.no_frames, api_key=runs.api_key)


@pytest.mark.parametrize(
    ("unit", "problem"),
    [("m", "implausibly large"), ("mm", "implausibly large"), ("nm", "implausibly small")],
)
@pytest.mark.slow
def test_positions_in_an_implausible_unit_are_refused(runs: Runs, unit: str, problem: str) -> None:
    expected = rf"read as {unit}\) are {problem}.*motor_unit_name \(now {unit}\)"
    with pytest.raises(PositionError, match=expected):
        read_tiled_run(runs.tiled_uri, runs.grid, api_key=runs.api_key, motor_unit=unit)


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("\n")
    (tmp_path / "key").chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_api_key(tmp_path / "key")
    with pytest.raises(ConfigError, match="cannot read the Tiled API key file"):
        read_api_key(tmp_path / "missing")

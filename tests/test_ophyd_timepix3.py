"""The ophyd Timepix3: a RunEngine drives it frame by frame, and the raw TPX3 it streams comes back as the
exact frames it made, at the motors' positions.

Real parts throughout: a RunEngine with two ophyd.sim motors whose readbacks differ from their setpoints,
the simulated sample as the frame source, TCP, and either the Timepix3 ingest stage on real sockets or the
decoder reading the TCP stream while the scan runs.
"""

from __future__ import annotations

import json
import select
import socket
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import bluesky.plans as bp
import numpy as np
import pytest
import zmq
from bluesky import RunEngine
from ophyd.sim import SynAxis

from phasestream.apps.bluesky.bridge import BridgeConfig, BridgeReport, PositionsRouter
from phasestream.errors import ConfigError
from phasestream.formats.position_channel import PositionBatch, decode_positions
from phasestream.formats.tpx3.decode import Tpx3Decoder
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage
from phasestream.runtime.topology import control_endpoint, place
from phasestream.simulators.ophyd_selun import SimulatedSample
from phasestream.simulators.ophyd_timepix3 import Timepix3Detector
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan
from phasestream.simulators.timepix3 import Tpx3Timing, ns_to_ticks
from phasestream.stages.tpx3_ingest import Tpx3IngestStage

FRAME_PX = 48
READBACK_JITTER_UM = 0.02  # encoder noise: positions sent from setpoints would be off by this much
GRID_SHAPE = (4, 5)
GRID_HALF_RANGE_UM = 1.5  # the simulated sample allows about ±1.8 µm
SPIRAL = {"x_range": 1.6, "y_range": 1.6, "dr": 0.3, "nth": 4}  # 20 points, as many as the grid
# Across the 26.84 s wrap of the chip's 34-bit pixel clock, one 1 ms period per trigger.
TIMING = Tpx3Timing(start_s=26.835, period_s=1e-3, exposure_s=0.8e-3)
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def sample_scan() -> SimulatedScan:
    return simulate_scan(
        ScanSimulationConfig(
            detector_size_px=FRAME_PX,
            probe_diameter_px=16,
            probe_bright_field_diameter_px=30,
            n_positions=24,
            photons_per_frame=2000,
            seed=4,
        )
    )


class RecordingSource:
    """The simulated sample, keeping every frame it made and where: what the detector must deliver."""

    def __init__(self, scan: SimulatedScan) -> None:
        self._sample = SimulatedSample(scan, seed=2)
        self.shape_px = self._sample.shape_px
        self.dtype = self._sample.dtype
        self.energy_kev = self._sample.energy_kev
        self.detector_distance_m = self._sample.detector_distance_m
        self.pixel_size_m = self._sample.pixel_size_m
        self.frames: list[np.ndarray] = []
        self.positions_m: list[tuple[float, float]] = []

    def frame(self, position_m: tuple[float, float]) -> np.ndarray:
        frame = self._sample.frame(position_m)
        self.frames.append(frame.copy())
        self.positions_m.append(position_m)
        return frame


class RunDocuments:
    """Each run's documents, in order."""

    def __init__(self) -> None:
        self.docs: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        self._descriptor_runs: dict[str, str] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            run_uid = doc["uid"]
        elif name == "event":
            run_uid = self._descriptor_runs[doc["descriptor"]]
        else:
            run_uid = doc["run_start"]
        if name == "descriptor":
            self._descriptor_runs[doc["uid"]] = run_uid
        self.docs[run_uid].append((name, doc))

    def events(self, run_uid: str) -> list[dict[str, Any]]:
        return [doc for name, doc in self.docs[run_uid] if name == "event"]


def _motor(name: str, seed: int) -> SynAxis:
    rng = np.random.default_rng(seed)
    return SynAxis(name=name, readback_func=lambda setpoint: setpoint + rng.normal(0.0, READBACK_JITTER_UM))


def _session(source: RecordingSource, **options: Any) -> tuple[RunEngine, Timepix3Detector, SynAxis, SynAxis]:
    y, x = _motor("sample_y", 1), _motor("sample_x", 2)
    detector = Timepix3Detector(
        name="tpx3", y_motor=y, x_motor=x, source=source, port=0, timing=TIMING, **options
    )
    RE = RunEngine({})
    RE.subscribe(detector.on_run_start, "start")
    return RE, detector, y, x


def _grid(detector: Timepix3Detector, y: SynAxis, x: SynAxis) -> Any:
    half = GRID_HALF_RANGE_UM
    rows, cols = GRID_SHAPE
    return bp.grid_scan([detector], y, -half, half, rows, x, -half, half, cols, snake_axes=True)


def _spiral(detector: Timepix3Detector, y: SynAxis, x: SynAxis) -> Any:
    return bp.spiral([detector], x, y, 0.0, 0.0, **SPIRAL)


def _readbacks_m(events: list[dict[str, Any]]) -> np.ndarray:
    """Each event's motor readbacks in metres (y, x), in image-id order."""
    by_id = {e["data"]["tpx3_image_id"]: (e["data"]["sample_y"], e["data"]["sample_x"]) for e in events}
    assert sorted(by_id) == list(range(len(events)))
    return np.array([by_id[i] for i in range(len(events))]) * 1e-6


# ---- a grid and a spiral through the Timepix3 ingest stage -------------------------------------------------
class Collector(Stage):
    """The last stage: keeps what arrives (its thread shares this process with the test)."""

    def setup(self) -> None:
        self.messages: list[Message] = []

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        self.messages.append(message)
        return ()

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            copied = {"frames": message.frames.copy(), "positions_m": message.positions_m.copy()}
            self.messages.append(message.model_copy(update=copied))
        return ()

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        self.messages.append(message)
        return ()


def _pipeline(run_dir: str, detector: Timepix3Detector, n_triggers: int) -> Any:
    return validate_pipeline(
        {
            "name": "ophyd-tpx3-test",
            "run_dir": run_dir,
            "detector": {
                "data_endpoint": detector.data_endpoint,
                "positions_endpoint": detector.positions_endpoint,
            },
            "stages": [
                {
                    "name": "ingest",
                    "stage": "tpx3_ingest",
                    "config": {
                        "n_triggers": n_triggers,
                        "energy_kev": detector.source.energy_kev,
                        "detector_distance_m": detector.source.detector_distance_m,
                        "roi_origin_px": list(detector.origin_px),
                        "roi_shape_px": list(detector.source.shape_px),
                        "exposure_s": TIMING.exposure_s,
                        "batch_size": 8,
                        "decode_bytes": 4096,
                    },
                },
                {"name": "collect", "stage": "test_ophyd_timepix3:Collector"},
            ],
        }
    )


def _control_events(control: zmq.Socket, timeout_s: float) -> Iterator[dict[str, Any]]:
    while control.poll(int(timeout_s * 1000)):
        yield json.loads(control.recv())


def test_grid_and_spiral_runs_reach_ingest_as_the_frames_the_device_made(sample_scan: SimulatedScan) -> None:
    source = RecordingSource(sample_scan)
    documents = RunDocuments()
    n = GRID_SHAPE[0] * GRID_SHAPE[1]
    with tempfile.TemporaryDirectory(prefix="ps-otpx3-", dir="/tmp") as run_dir:  # short: ipc paths
        RE, detector, y, x = _session(source, positions_endpoint=f"ipc://{run_dir}/pos.sock")
        RE.subscribe(documents)
        pipeline = _pipeline(run_dir, detector, n)
        control = zmq.Context.instance().socket(zmq.PULL)
        control.bind(control_endpoint(pipeline))
        ingest = Tpx3IngestStage.from_placement(place(pipeline, "ingest", 0), pipeline)
        collector = Collector.from_placement(place(pipeline, "collect", 0), pipeline)
        threads = [threading.Thread(target=stage.run, daemon=True) for stage in (collector, ingest)]
        try:
            for thread in threads:
                thread.start()
            (grid_uid,) = RE(_grid(detector, y, x))
            (spiral_uid,) = RE(_spiral(detector, y, x))
            seen: list[dict[str, Any]] = []
            for event in _control_events(control, TIMEOUT_S):
                seen.append(event)
                if sum(e["event"] == "scan_end" and e["sender"] == "collect.0" for e in seen) == 2:
                    break
        finally:
            for stage in (ingest, collector):
                stage.request_stop()
            for thread in threads:
                thread.join(TIMEOUT_S)
            control.close(linger=0)
            detector.close()
    assert not any(thread.is_alive() for thread in threads)
    assert [e["reason"] for e in seen if e["event"] == "log"] == []  # no warning of any kind
    scans = _split_scans(collector.messages)
    assert len(scans) == 2 and scans[0][0].scan_uid != scans[1][0].scan_uid
    assert len(source.frames) == 2 * n
    runs = {grid_uid: source.frames[:n], spiral_uid: source.frames[n:]}
    for (start, batches, end), run_uid in zip(scans, (grid_uid, spiral_uid), strict=True):
        events = documents.events(run_uid)
        assert len(events) == n and start.planned_frames == n
        assert [i for batch in batches for i in batch.frame_indices] == list(range(n))
        # Counts match exactly, frame by frame, image id = trigger number in the run.
        assert np.array_equal(np.concatenate([b.frames for b in batches]), np.stack(runs[run_uid]))
        # At the motors' readbacks (not the setpoints) of each event.
        assert np.array_equal(np.concatenate([b.positions_m for b in batches]), _readbacks_m(events))
        assert unaccounted_frames(end.frames_sent, end.accounting) == []
        assert end.accounting["ingest.0"]["tpx3_events_binned"] == int(np.stack(runs[run_uid]).sum())
    # The grid snakes: row 2 runs right to left, so its readbacks fall along x.
    grid_x = _readbacks_m(documents.events(grid_uid))[:, 1].reshape(GRID_SHAPE)
    assert (np.diff(grid_x[0]) > 0).all() and (np.diff(grid_x[1]) < 0).all()
    # The Bluesky bridge, reading the device's image and series ids, sends the same positions.
    sent: list[bytes] = []
    config = BridgeConfig(
        y_motor="sample_y", x_motor="sample_x", image_id_key="tpx3_image_id", series_id_key="tpx3_series_id"
    )
    router = PositionsRouter(config, sent.append, BridgeReport())
    for name, doc in documents.docs[spiral_uid]:
        router(name, doc)
    routed = [m for m in map(decode_positions, sent) if isinstance(m, PositionBatch)]
    assert {m.series_id for m in routed} == {2}  # the spiral is the device's second run
    assert np.array_equal(
        np.concatenate([m.positions_m for m in routed]), _readbacks_m(documents.events(spiral_uid))
    )


def _split_scans(messages: list[Message]) -> list[tuple[ScanStart, list[FrameBatch], ScanEnd]]:
    scans, current = [], []
    for message in messages:
        current.append(message)
        if isinstance(message, ScanEnd):
            start, *batches, end = current
            assert isinstance(start, ScanStart) and all(isinstance(b, FrameBatch) for b in batches)
            scans.append((start, batches, end))
            current = []
    return scans


# ---- frame by frame: each exposure is on the wire before the next trigger ----------------------------------
class ExposureReader:
    """The TCP client, reading and decoding one exposure per event while the RunEngine waits."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.client = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        self.decoder = Tpx3Decoder()
        self.exposures: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # trigger count, time, hits

    def read_exposure(self, hits: int) -> None:
        """Read whole chunks until one TDC word and ``hits`` pixel hits have come, then check that the
        stream holds nothing more: the next exposure cannot exist before the next trigger."""
        tdc, pixels = [], []
        while sum(len(p.toa_ticks) for p in pixels) < hits or not tdc:
            header = self._exactly(8)
            size = int.from_bytes(header, "little") >> 48
            decoded = self.decoder.feed(header + self._exactly(size))
            assert decoded.problems == ()
            tdc.append(decoded.tdc)
            pixels.append(decoded.pixels)
        readable, _, _ = select.select([self.client], [], [], 0)
        assert readable == []
        triggers = np.concatenate([t.time_ticks for t in tdc])
        counts = np.concatenate([t.trigger_count for t in tdc])
        assert len(triggers) == 1
        x_px, y_px = (np.concatenate([getattr(p, f) for p in pixels]) for f in ("x_px", "y_px"))
        toa = np.concatenate([p.toa_ticks for p in pixels])
        self.exposures.append((int(counts[0]), int(triggers[0]), toa, np.stack([y_px, x_px], axis=1)))

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            block = self.client.recv(size - len(data))
            assert block, "the measurement ended early"
            data += block
        return data


def test_each_exposure_streams_at_its_trigger_and_the_run_end_closes_the_stream(
    sample_scan: SimulatedScan,
) -> None:
    source = RecordingSource(sample_scan)
    RE, detector, y, x = _session(source)
    reader = ExposureReader(detector.data_endpoint)

    def on_event(name: str, doc: dict[str, Any]) -> None:
        reader.read_exposure(int(source.frames[doc["data"]["tpx3_image_id"]].sum()))

    RE.subscribe(on_event, "event")
    try:
        RE(_spiral(detector, y, x))
        assert reader.client.recv(1) == b""  # unstage closed the connection: the measurement's end
    finally:
        reader.client.close()
        detector.close()
    n = len(source.frames)
    assert n == 20 and len(reader.exposures) == n
    exposure_ticks = int(ns_to_ticks(TIMING.exposure_s * 1e9))
    origin = np.array(detector.origin_px)
    trigger_times = []
    for k, (count, trigger_ticks, toa, chip_px) in enumerate(reader.exposures):
        assert count == k + 1  # the trigger counter restarts with the measurement
        assert ((toa > trigger_ticks) & (toa < trigger_ticks + exposure_ticks)).all()
        frame = np.zeros(source.shape_px, np.int64)
        np.add.at(frame, tuple((chip_px - origin).T), 1)
        assert np.array_equal(frame, source.frames[k])  # counts match exactly
        trigger_times.append(trigger_ticks)
    # One period per trigger on the chip's clock, unwrapped across the 34-bit pixel clock's wrap.
    period_ticks = int(ns_to_ticks(TIMING.period_s * 1e9))
    assert np.all(np.diff(trigger_times) == period_ticks)
    assert trigger_times[0] < 1 << 34 < trigger_times[-1]


# ---- bad input ---------------------------------------------------------------------------------------------
def test_a_trigger_beyond_the_announced_points_is_refused(sample_scan: SimulatedScan) -> None:
    source = RecordingSource(sample_scan)
    RE, detector, _y, _x = _session(source)
    host, port = detector.data_endpoint.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as client:
            with pytest.raises(ConfigError, match=r"trigger 3 in run .* announced num_points=2"):
                RE(bp.count([detector], num=3, md={"num_points": 2}))
            stream = b""
            while block := client.recv(1 << 16):  # the run's cleanup ended the measurement
                stream += block
    finally:
        detector.close()
    decoder = Tpx3Decoder()
    decoded = [decoder.feed(stream), decoder.finish()]
    assert sum(len(d.tdc.time_ticks) for d in decoded) == 2 == len(source.frames)
    assert sum(len(d.pixels.toa_ticks) for d in decoded) == int(np.stack(source.frames).sum())


def test_a_run_without_a_client_names_the_endpoint(sample_scan: SimulatedScan) -> None:
    RE, detector, _y, _x = _session(RecordingSource(sample_scan), accept_timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError, match=f"no client connected to {detector.data_endpoint}"):
            RE(bp.count([detector], num=2))
    finally:
        detector.close()


def test_a_trigger_outside_a_known_run_says_how_to_subscribe(sample_scan: SimulatedScan) -> None:
    y, x = SynAxis(name="sample_y"), SynAxis(name="sample_x")
    detector = Timepix3Detector(
        name="tpx3", y_motor=y, x_motor=x, source=RecordingSource(sample_scan), port=0
    )
    try:
        with pytest.raises(ConfigError, match=r"RE.subscribe\(tpx3.on_run_start"):
            RunEngine({})(bp.count([detector]))
    finally:
        detector.close()


def test_frames_that_leave_the_chip_are_refused(sample_scan: SimulatedScan) -> None:
    y, x = SynAxis(name="sample_y"), SynAxis(name="sample_x")
    source = RecordingSource(sample_scan)
    with pytest.raises(ConfigError, match=r"48×48 pixels at chip origin \(220, 0\) leave"):
        Timepix3Detector(name="tpx3", y_motor=y, x_motor=x, source=source, port=0, origin_px=(220, 0))

"""Ingest against bad detector input, end to end, in a real ingest process.

The ``Launcher`` starts two processes: the real ``ingest`` stage, which connects to the SELUN emitter's
PUSH sockets (ipc in a short run directory), and ``FrameCollector`` (defined below; the child process
imports this module because ``PYTHONPATH`` holds the tests folder), which writes every FrameBatch it
receives to an ``.npz`` file per scan. One pipeline serves the whole module (``exit_after_scan: false``);
each test sends its own scans through it and checks what every bad input must get:

- a warning (a ``log`` control event) whose text names the offending value and the fix,
- a counter in ingest's ``/metrics`` (scraped before and after the scan, so the tests see deltas),
- the scan goes on: the good frames still arrive, bit-exact, with their positions, sorted within batches,
- the ``ScanEnd`` accounting explains every frame the detector announced.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel, ConfigDict

from phasestream.apps.launch.launcher import Launcher
from phasestream.errors import FrameValidationError
from phasestream.formats.position_channel import (
    PositionBatch,
    PositionsEnd,
    encode_positions,
    encode_positions_end,
)
from phasestream.formats.stream_v2.decode import EndMessage, ImageMessage, decode_stream_v2
from phasestream.formats.stream_v2.encode import (
    channel_array,
    encode_image,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
)
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage
from phasestream.runtime.topology import place
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan
from phasestream.simulators.selun import SelunEmitter
from phasestream.stages.ingest.config import IngestConfig
from phasestream.stages.ingest.stage import IngestStage

TESTS_DIR = Path(__file__).resolve().parent
BATCH_SIZE = 4
SHAPE_PX = (16, 16)
SCAN_TIMEOUT_S = 30.0
INGEST, COLLECT = "ingest.0", "collect.0"


# ---- the collector stage, run by the launcher in its own process ----------------------------------------
class CollectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: str


class FrameCollector(Stage):
    """Keeps every FrameBatch of a scan and writes them to ``<out_dir>/<scan_uid>.npz`` at its end.

    The file is written before the runtime reports this (last) stage's ``scan_end``, so a test that saw
    that event can read it.
    """

    Config = CollectorConfig
    config: CollectorConfig

    def setup(self) -> None:
        self._starts: dict[str, ScanStart] = {}
        self._batches: dict[str, list[FrameBatch]] = defaultdict(list)

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        self._starts[message.scan_uid] = message
        return ()

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            # The arrays are views on ZeroMQ buffers: copy them before the message goes away.
            kept = message.model_copy(
                update={"frames": message.frames.copy(), "positions_m": message.positions_m.copy()}
            )
            self._batches[message.scan_uid].append(kept)
        return ()

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        batches = self._batches.pop(message.scan_uid, [])
        start = self._starts.pop(message.scan_uid, None)
        np.savez(
            Path(self.config.out_dir) / f"{message.scan_uid}.npz",
            frame_indices=np.array([i for b in batches for i in b.frame_indices], dtype=np.int64),
            batch_sizes=np.array([len(b.frame_indices) for b in batches], dtype=np.int64),
            frames=np.concatenate([b.frames for b in batches]) if batches else np.zeros((0, 0, 0)),
            positions_m=np.concatenate([b.positions_m for b in batches]) if batches else np.zeros((0, 2)),
            start=json.dumps(None if start is None else start.model_dump(mode="json")),
        )
        # Swallow it, as a sink does: the runtime then reports this stage's scan_end once.
        return ()


# ---- the launched pipeline and what one scan through it produced ----------------------------------------
@dataclass(frozen=True)
class Logged:
    reason: str
    text: str


@dataclass
class ScanResult:
    frames_sent: int
    accounting: dict[str, dict[str, int]]
    warnings: list[Logged]
    metrics: dict[tuple[str, str], float]  # (metric name, reason label) -> increase during the scan
    frame_indices: np.ndarray
    batch_sizes: np.ndarray
    frames: np.ndarray
    positions_m: np.ndarray
    start: dict[str, Any] | None

    def warnings_for(self, reason: str) -> list[str]:
        return [w.text for w in self.warnings if w.reason == reason]

    def metric(self, name: str, reason: str = "") -> float:
        return self.metrics.get((name, reason), 0.0)

    def batches(self) -> list[list[int]]:
        bounds = np.cumsum(self.batch_sizes)[:-1]
        return [part.tolist() for part in np.split(self.frame_indices, bounds)]


_SAMPLE = re.compile(r"^(phasestream_\w+_total)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape_ingest_metrics(port: int) -> dict[tuple[str, str], float]:
    """The ``phasestream_*_total`` counters of the ingest stage by (name, reason label)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match[2]))
        if labels.get("stage") == "ingest":
            samples[(match[1], labels.get("reason", ""))] = float(match[3])
    return samples


@dataclass
class IngestPipeline:
    launcher: Launcher
    emitter: SelunEmitter
    run_dir: Path

    def metrics(self) -> dict[tuple[str, str], float]:
        port = self.launcher.workers[INGEST].metrics_port
        assert port is not None
        return scrape_ingest_metrics(port)

    def run_scan(
        self, scan_uid: str, data_messages: Sequence[bytes], position_messages: Sequence[bytes]
    ) -> ScanResult:
        """Send prepared messages as they are, then wait for the scan's end (see ``run``)."""
        return self.run(scan_uid, lambda: self.emitter.emit_messages(data_messages, position_messages))

    def run(self, scan_uid: str, send: Callable[[], object]) -> ScanResult:
        """Call ``send``, then wait for ingest's and the collector's ScanEnd of ``scan_uid`` (events)."""
        before = self.metrics()
        send()
        warnings: list[Logged] = []
        ends: dict[str, dict[str, Any]] = {}
        for event in self.launcher.events(timeout_s=SCAN_TIMEOUT_S):
            assert event["event"] != "died", event
            # Ingest reports its warnings, then its own scan_end, on one ordered socket; events of two
            # processes may interleave in any order, so wait for both scan_ends.
            if event["event"] == "log" and event["sender"] == INGEST and INGEST not in ends:
                warnings.append(Logged(event["reason"], event["text"]))
            if event["event"] == "scan_end" and event["scan_uid"] == scan_uid:
                ends[event["sender"]] = event
                if INGEST in ends and COLLECT in ends:
                    break
        else:
            pytest.fail(f"no scan_end for {scan_uid} within {SCAN_TIMEOUT_S} s; warnings: {warnings}")
        after = self.metrics()
        deltas = {key: value - before.get(key, 0.0) for key, value in after.items()}
        with np.load(self.run_dir / f"{scan_uid}.npz") as saved:
            collected = {name: saved[name] for name in saved.files}
        end = ends[COLLECT]
        return ScanResult(
            frames_sent=end["frames_sent"],
            accounting=end["accounting"],
            warnings=warnings,
            metrics={key: value for key, value in deltas.items() if value},
            frame_indices=collected["frame_indices"],
            batch_sizes=collected["batch_sizes"],
            frames=collected["frames"],
            positions_m=collected["positions_m"],
            start=json.loads(str(collected["start"])),
        )


# Short, so that the stalled-detector test is quick; every other scan here sends its messages at once.
STALLED_SCAN_TIMEOUT_S = 3.0


@contextlib.contextmanager
def launched_ingest(
    name: str,
    ingest_config: dict[str, Any],
    emitter_class: type[SelunEmitter] = SelunEmitter,
    pipeline_class: type[IngestPipeline] = IngestPipeline,
) -> Iterator[IngestPipeline]:
    """A real ingest process and the collector behind it, fed by a SELUN emitter's sockets in a fresh
    run directory; every ingest test module starts its pipeline here."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"ps-{name}-", dir="/tmp"))
    config = validate_pipeline(
        {
            "name": name,
            "run_dir": str(run_dir),
            "exit_after_scan": False,
            "detector": {
                "data_endpoint": f"ipc://{run_dir}/det.sock",
                "positions_endpoint": f"ipc://{run_dir}/pos.sock",
            },
            "stages": [
                {"name": "ingest", "stage": "ingest", "config": ingest_config},
                {
                    "name": "collect",
                    "stage": "test_ingest:FrameCollector",
                    "config": {"out_dir": str(run_dir)},
                },
            ],
        }
    )
    # The emitter binds (as a DCU does) before ingest connects; ingest reconnects until it is there.
    emitter = emitter_class(config.detector.data_endpoint, config.detector.positions_endpoint, linger_s=1.0)
    launcher = Launcher(config)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # The launcher passes os.environ on: the collector's process can then import this module.
            patch.setenv(
                "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.getenv("PYTHONPATH")]))
            )
            launcher.start(ready_timeout_s=60)
        yield pipeline_class(launcher, emitter, run_dir)
    finally:
        launcher.stop()
        emitter.close()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline() -> Iterator[IngestPipeline]:
    config = {
        "batch_size": BATCH_SIZE,
        "position_grace_s": 2.0,
        "stalled_scan_timeout_s": STALLED_SCAN_TIMEOUT_S,
    }
    with launched_ingest("ingest-test", config) as launched:
        yield launched


# ---- building Stream V2 scans ---------------------------------------------------------------------------
_series_ids = itertools.count(100)


@dataclass(frozen=True)
class Series:
    """One detector series (one scan): its ids and encoders for its messages."""

    series_id: int
    scan_uid: str

    @classmethod
    def new(cls, name: str) -> Series:
        series_id = next(_series_ids)
        return cls(series_id, f"{name}-{series_id}")

    @property
    def unique_id(self) -> str:
        return f"series-{self.scan_uid}"

    def start(self, n_images: int, dtype: str = "uint16", shape_px: tuple[int, int] = SHAPE_PX) -> bytes:
        fields = start_fields(
            series_id=self.series_id,
            series_unique_id=self.unique_id,
            shape_px=shape_px,
            dtype="uint16",
            number_of_images=n_images,
            energy_kev=8.8,
            detector_distance_m=2.0,
            pixel_size_m=75e-6,
            count_time_s=1e-3,
            frame_time_s=1e-3,
            user_data={"scan_uid": self.scan_uid, "scan_shape": [n_images]},
        )
        # Set the dtype here: the encoder's helpers only know the dtypes a DECTRIS detector sends.
        fields["image_dtype"] = dtype
        return encode_message(fields)

    def image(self, image_id: int, frame: np.ndarray, typed_array_tag: int | None = None) -> bytes:
        if typed_array_tag is None:
            return encode_image(
                np.ascontiguousarray(frame),
                series_id=self.series_id,
                series_unique_id=self.unique_id,
                image_id=image_id,
            )
        fields = image_fields(
            series_id=self.series_id,
            series_unique_id=self.unique_id,
            image_id=image_id,
            data=channel_array(np.ascontiguousarray(frame), typed_array_tag=typed_array_tag),
            frame_time_s=1e-3,
            count_time_s=1e-3,
            series_date=datetime.now(UTC),
        )
        return encode_message(fields)

    def positions(self, image_ids: Sequence[int], positions_m: np.ndarray) -> bytes:
        return encode_positions(self.series_id, list(image_ids), positions_m)

    def end(self) -> bytes:
        return encode_message(end_fields(series_id=self.series_id, series_unique_id=self.unique_id))

    def positions_end(self) -> bytes:
        return encode_positions_end(self.series_id)


def make_frames(n: int, seed: int, dtype: Any = np.uint16) -> np.ndarray:
    """Distinct low-count frames: frame i holds i in its corner, so any mix-up shows."""
    frames = np.random.default_rng(seed).poisson(2.0, size=(n, *SHAPE_PX)).astype(dtype)
    frames[:, 0, 0] = np.arange(n)
    return frames


def make_positions(n: int) -> np.ndarray:
    """(y, x) in metres, distinct and not round in binary, so a lost or swapped position shows."""
    steps = np.arange(n, dtype=np.float64)
    return np.column_stack([steps * 1.2345e-7 - 3e-7, steps * -2.3456e-7 + 1e-7])


def assert_forwarded(
    result: ScanResult, expected_ids: Iterable[int], frames: np.ndarray, positions: np.ndarray
):
    """The forwarded frames are exactly ``expected_ids``, once each, sorted in each batch, bit-exact."""
    for batch in result.batches():
        assert batch == sorted(batch), f"a batch is not in index order: {batch}"
        assert len(batch) <= BATCH_SIZE
    ids = result.frame_indices.tolist()
    assert sorted(ids) == sorted(expected_ids)
    np.testing.assert_array_equal(result.frames, frames[ids])
    assert result.frames.dtype == frames.dtype
    np.testing.assert_array_equal(result.positions_m, positions[ids])


def assert_texts(texts: list[str], *fragments: str) -> None:
    assert len(texts) == 1, texts
    for fragment in fragments:
        assert fragment in texts[0], f"{fragment!r} not in warning: {texts[0]}"


REJECTED = "phasestream_messages_rejected_total"
DROPPED = "phasestream_frames_dropped_total"
RECEIVED = "phasestream_frames_received_total"
SENT = "phasestream_frames_sent_total"


# ---- the tests ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_stream_v2_scan_from_the_emitter_arrives_bit_exact_with_its_positions(pipeline) -> None:
    scan = simulate_scan(
        ScanSimulationConfig(
            detector_size_px=64,
            probe_diameter_px=24,
            probe_bright_field_diameter_px=32,
            n_positions=22,
            photons_per_frame=1e5,
            seed=5,
        )
    )
    series_id = next(_series_ids)
    scan_uid = f"simulated-{series_id}"
    # ``emit`` sends what a DCU and a motion controller would: start, bslz4 images, positions, ends.
    result = pipeline.run(
        scan_uid,
        lambda: pipeline.emitter.emit(
            scan, scan_uid, series_id=series_id, progress=False, positions_batch_size=5
        ),
    )

    n = len(scan.frames)
    assert_forwarded(result, range(n), scan.frames, scan.positions_m)
    assert result.warnings == []
    assert result.start is not None
    geometry = result.start["geometry"]
    assert geometry["detector_shape_px"] == [64, 64] and geometry["detector_dtype"] == "uint16"
    assert geometry["energy_kev"] == pytest.approx(scan.energy_kev)
    assert geometry["detector_distance_m"] == pytest.approx(scan.detector_distance_m)
    assert geometry["pixel_size_m"] == pytest.approx(scan.detector_pixel_size_m)
    assert result.start["planned_frames"] == n and result.start["scan_shape"] == list(scan.scan_shape)
    assert result.frames_sent == n
    assert result.accounting[INGEST] == {"frames_received": n, "frames_sent": n, "frames_forwarded": n}
    assert result.accounting[COLLECT] == {"frames_received": n}
    assert unaccounted_frames(result.frames_sent, result.accounting) == []
    assert result.metrics == {(RECEIVED, ""): n, (SENT, ""): n}


@pytest.mark.slow
def test_bad_input_mixed_into_one_scan_is_named_counted_and_accounted_for(pipeline) -> None:
    n = 24
    series = Series.new("mixed")
    frames, positions = make_frames(n, seed=1), make_positions(n)
    no_position, no_frame = 20, 21
    rng = np.random.default_rng(7)
    # Images 5..23 (but 21, which the detector never sends) arrive out of order, and so do positions.
    shuffled = [int(i) for i in rng.permutation([i for i in range(5, n) if i != no_frame])]
    position_ids = [int(i) for i in rng.permutation([i for i in range(n) if i != no_position])]
    data = [
        series.image(0, frames[0]),  # before the start message: ingest cannot place it
        series.start(n),
        b"\xff\x00 not CBOR: image 1 was lost on the wire",
        encode_message({"type": "calibration", "series_id": series.series_id}),
        series.image(2, frames[2][:8, :12]),  # the wrong shape
        series.image(3, frames[3].astype(np.uint32)),  # the wrong dtype
        series.image(4, frames[4]),
        series.image(4, frames[4]),  # a duplicate
        *(series.image(i, frames[i]) for i in shuffled),
        series.end(),
    ]
    position_messages = [
        series.positions(position_ids[:10], positions[position_ids[:10]]),
        series.positions(position_ids[10:], positions[position_ids[10:]]),
        series.positions([6], positions[[6]] + 1e-6),  # a second, different position for image 6
        series.positions_end(),
    ]

    result = pipeline.run_scan(series.scan_uid, data, position_messages)

    # The good frames get through, sorted within each batch, with the first position given for each.
    forwarded = [4, *(i for i in range(5, n) if i not in (no_frame, no_position))]
    assert_forwarded(result, forwarded, frames, positions)
    assert len(result.batches()) >= len(forwarded) // BATCH_SIZE

    # Every frame the detector announced is explained: forwarded, rejected for a reason, or missing.
    assert result.frames_sent == n
    assert result.accounting[INGEST] == {
        "frames_received": 22,  # images 2, 3, 4 twice and the 18 shuffled ones
        "frames_sent": 18,
        "frames_forwarded": 18,
        "undecodable_messages": 2,  # the garbage and the unknown message type
        "rejected_wrong_shape": 1,
        "rejected_wrong_dtype": 1,
        "rejected_duplicate_frame": 1,  # an extra copy: not one of the 24
        "rejected_frame_without_position": 1,  # image 20
        "duplicate_positions": 1,  # image 6
        "positions_without_frame": 5,  # 0 and 1 (lost), 2 and 3 (rejected), 21 (never sent)
        "missing_frames": 3,  # 0 (came before the start), 1 (garbage), 21 (never sent)
    }
    assert result.accounting[COLLECT] == {"frames_received": 18}
    assert unaccounted_frames(result.frames_sent, result.accounting) == []

    # One warning per bad input, naming the value and the fix.
    assert Counter(w.reason for w in result.warnings) == {
        "no_open_scan": 1,
        "detector_message": 2,
        "wrong_shape": 1,
        "wrong_dtype": 1,
        "duplicate_frame": 1,
        "duplicate_position": 1,
        "frame_without_position": 1,
        "position_without_frame": 1,
    }
    assert_texts(
        result.warnings_for("no_open_scan"),
        f"image 0 of series {series.series_id}",
        "no open scan",
        "Start ingest before arming the detector",
    )
    garbage, unknown = result.warnings_for("detector_message")
    assert "not valid CBOR" in garbage and "Stream V2" in garbage
    assert "unknown Stream V2 message type 'calibration'" in unknown
    assert "known types are ['start', 'image', 'end']" in unknown
    where = f"of scan {series.scan_uid}"
    assert_texts(result.warnings_for("wrong_shape"), f"image 2 {where}", "(8, 12)", "(16, 16)", "ROI")
    assert_texts(result.warnings_for("wrong_dtype"), f"image 3 {where}", "uint32", "uint16", "bit depth")
    assert_texts(result.warnings_for("duplicate_frame"), f"image 4 {where}", "twice", "image_id counter")
    assert_texts(
        result.warnings_for("duplicate_position"), "images [6]", "twice", "first value is kept", "position"
    )
    assert_texts(result.warnings_for("frame_without_position"), "[20]", series.scan_uid, "position channel")
    assert_texts(result.warnings_for("position_without_frame"), "[0, 1, 2, 3, 21]", series.scan_uid)

    # And a counter for each in ingest's /metrics.
    assert result.metrics == {
        (RECEIVED, ""): 22,
        (SENT, ""): 18,
        (REJECTED, "no_open_scan"): 1,
        (REJECTED, "detector_message"): 2,
        (REJECTED, "wrong_shape"): 1,
        (REJECTED, "wrong_dtype"): 1,
        (REJECTED, "duplicate_frame"): 1,
        (REJECTED, "duplicate_position"): 1,
        (REJECTED, "position_without_frame"): 5,
        (DROPPED, "wrong_shape"): 1,
        (DROPPED, "wrong_dtype"): 1,
        (DROPPED, "duplicate_frame"): 1,
        (DROPPED, "frame_without_position"): 1,
    }


@pytest.mark.slow
def test_a_series_whose_start_was_lost_is_refused_and_the_next_scan_is_unharmed(pipeline) -> None:
    lost, good = Series.new("lost-start"), Series.new("after-lost-start")
    frames, positions = make_frames(6, seed=2), make_positions(6)
    data = [
        *(lost.image(i, frames[i]) for i in range(3)),  # its start message never came
        lost.end(),
        good.start(6),
        *(good.image(i, frames[i]) for i in range(6)),
        good.end(),
    ]
    position_messages = [
        lost.positions(range(3), positions[:3]),
        good.positions(range(6), positions),
        good.positions_end(),
    ]
    result = pipeline.run_scan(good.scan_uid, data, position_messages)

    refused = result.warnings_for("no_open_scan")
    assert len(refused) == 3
    for image_id, text in enumerate(refused):
        assert f"image {image_id} of series {lost.series_id} arrived with no open scan" in text
        assert "Start ingest before arming the detector" in text
    assert_texts(result.warnings_for("detector_message"), f"end of series {lost.series_id} with no open scan")
    assert result.metric(REJECTED, "no_open_scan") == 3
    assert result.metric(REJECTED, "detector_message") == 1
    assert_forwarded(result, range(6), frames, positions)
    assert unaccounted_frames(result.frames_sent, result.accounting) == []
    assert result.accounting[INGEST]["frames_forwarded"] == 6


@pytest.mark.slow
def test_position_channel_faults_cost_only_their_own_positions(pipeline) -> None:
    n = 8
    series = Series.new("positions")
    frames, positions = make_frames(n, seed=3), make_positions(n)
    repeated = encode_message(
        {
            "type": "positions",
            "series_id": series.series_id,
            "image_id": [4, 5, 5],
            "y_m": positions[[4, 5, 5], 0].tolist(),
            "x_m": positions[[4, 5, 5], 1].tolist(),
        }
    )
    position_messages = [
        series.positions(range(4), positions[:4]),
        repeated,  # one message lists image 5 twice: the decoder refuses it whole
        encode_message({"type": "velocity", "series_id": series.series_id}),
        b"\xff\x00 garbage on the position channel",
        series.positions(range(6, n), positions[6:]),
        series.positions_end(),
    ]
    data = [series.start(n), *(series.image(i, frames[i]) for i in range(n)), series.end()]
    result = pipeline.run_scan(series.scan_uid, data, position_messages)

    assert_texts(result.warnings_for("position"), "repeats image_id [5]", "send each position once")
    unknown, garbage = result.warnings_for("detector_message")
    assert "unknown position message type 'velocity'" in unknown and "known types are" in unknown
    assert "position message of" in garbage and "not valid CBOR" in garbage
    assert_texts(result.warnings_for("frame_without_position"), "[4, 5]", series.scan_uid)
    assert result.metric(REJECTED, "position") == 1
    assert result.metric(REJECTED, "detector_message") == 2
    assert result.metric(DROPPED, "frame_without_position") == 2
    assert_forwarded(result, [0, 1, 2, 3, 6, 7], frames, positions)
    assert result.accounting[INGEST]["rejected_frame_without_position"] == 2
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


@pytest.mark.slow
def test_a_detector_that_stops_mid_scan_is_closed_after_the_timeout_with_what_arrived(pipeline) -> None:
    n, sent = 10, 6
    series = Series.new("stalled")
    frames, positions = make_frames(n, seed=8), make_positions(n)
    # The DCU dies after six images: no more images and no end message; the positions all came.
    data = [series.start(n), *(series.image(i, frames[i]) for i in range(sent))]
    result = pipeline.run_scan(series.scan_uid, data, [series.positions(range(n), positions)])

    assert_texts(result.warnings_for("detector_stalled"), series.scan_uid, f"{sent} of {n} frames")
    assert_forwarded(result, list(range(sent)), frames, positions)
    assert result.accounting[INGEST]["closed_by_timeout"] == 1
    assert result.accounting[INGEST]["missing_frames"] == n - sent
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


@pytest.mark.slow
def test_positions_that_overtake_the_start_message_wait_for_their_scan(pipeline) -> None:
    """Positions (one repeated) held before the start message: none is lost, the ScanStart comes first."""
    n = 8
    series = Series.new("early-positions")
    frames, positions = make_frames(n, seed=6), make_positions(n)
    early_warnings: list[dict[str, Any]] = []

    def send() -> None:
        early = [
            series.positions(range(5), positions[:5]),
            series.positions([2], positions[[2]] + 1e-6),  # image 2 again, with another value
            series.positions(range(5, n), positions[5:]),
            b"\xff\x00 marker",
        ]
        pipeline.emitter.emit_messages([], early)
        # The position channel is ordered: once ingest refused the marker, it holds the positions before it.
        for event in pipeline.launcher.events(timeout_s=SCAN_TIMEOUT_S):
            if event["event"] == "log" and event["sender"] == INGEST:
                early_warnings.append(event)
                break
        data = [series.start(n), *(series.image(i, frames[i]) for i in range(n)), series.end()]
        pipeline.emitter.emit_messages(data, [series.positions_end()])

    result = pipeline.run(series.scan_uid, send)

    assert [w["reason"] for w in early_warnings] == ["detector_message"]
    assert "position message of" in early_warnings[0]["text"]
    assert result.start is not None and result.start["scan_uid"] == series.scan_uid
    assert_forwarded(result, range(n), frames, positions)
    assert_texts(result.warnings_for("duplicate_position"), "images [2]", "first value is kept")
    assert result.metric(REJECTED, "duplicate_position") == 1
    assert result.accounting[INGEST]["duplicate_positions"] == 1
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


# ---- NaN and negative counts ----------------------------------------------------------------------------
# RFC 8746 typed-array tags for the little-endian float32 and int32 streams.
FLOAT32_LE_TAG, INT32_LE_TAG = 85, 78
COUNT_FAULTS = {
    "NaN in a float32 stream": ("float32", FLOAT32_LE_TAG, np.nan, "not_finite", "NaN/inf pixels"),
    "inf in a float32 stream": ("float32", FLOAT32_LE_TAG, np.inf, "not_finite", "NaN/inf pixels"),
    "negative in an int32 stream": ("int32", INT32_LE_TAG, -3, "negative_counts", "negative counts (min -3)"),
}
COUNT_FIXES = {
    "not_finite": "mask dead pixels upstream",
    "negative_counts": "check dark subtraction upstream",
}


@pytest.mark.parametrize("case", list(COUNT_FAULTS))
def test_ingest_rejects_nan_and_negative_counts_by_image(case: str) -> None:
    """Ingest's own checks, in process, fed decoded messages as its runtime would."""
    dtype, _tag, bad_value, reason, fragment = COUNT_FAULTS[case]
    series = Series.new("counts")
    run_dir = tempfile.mkdtemp(prefix="ps-unit-", dir="/tmp")
    shutil.rmtree(run_dir)  # nothing is bound or written: the stage's sockets open only in run()
    config = validate_pipeline({"run_dir": run_dir, "stages": [{"name": "ingest", "stage": "ingest"}]})
    stage = IngestStage.from_placement(place(config, "ingest", 0), config)
    start = replace(decode_stream_v2(series.start(3)), dtype=np.dtype(dtype))
    frames, positions = make_frames(3, seed=4, dtype=dtype), make_positions(3)
    frames[1, 5, 7] = bad_value
    labels = {"stage": "ingest", "worker": "0", "reason": reason}
    dropped_before = REGISTRY.get_sample_value(DROPPED, labels) or 0.0

    out = list(stage._on_detector(start))
    out += stage._on_positions(PositionBatch(series.series_id, np.arange(3), positions))
    for image_id, frame in enumerate(frames):
        image = ImageMessage(series.series_id, series.unique_id, image_id, frame, "threshold_1")
        if image_id != 1:
            out += stage._on_detector(image)
            continue
        with pytest.raises(FrameValidationError) as raised:
            list(stage._on_detector(image))
        assert raised.value.reason == reason
        for text in (f"image 1 of scan {series.scan_uid}", fragment, COUNT_FIXES[reason]):
            assert text in str(raised.value)
    out += stage._on_positions(PositionsEnd(series.series_id))
    out += stage._on_detector(EndMessage(series.series_id, series.unique_id))

    assert [type(m) for m in out] == [ScanStart, FrameBatch, ScanEnd]
    assert out[1].frame_indices == [0, 2]
    np.testing.assert_array_equal(out[1].frames, frames[[0, 2]])
    counts = dict(stage.scan(series.scan_uid).counts)
    assert counts[f"rejected_{reason}"] == 1 and counts["frames_forwarded"] == 2
    assert unaccounted_frames(3, {INGEST: counts}) == []
    assert REGISTRY.get_sample_value(DROPPED, labels) == dropped_before + 1


@pytest.mark.parametrize("case", list(COUNT_FAULTS))
@pytest.mark.slow
def test_nan_and_negative_counts_over_the_wire(pipeline, case: str) -> None:
    dtype, tag, bad_value, reason, fragment = COUNT_FAULTS[case]
    n = 6
    series = Series.new("wire-counts")
    start = series.start(n, dtype=dtype)
    decode_stream_v2(start)  # fails fast (no scan started) while the decoder lacks these dtypes
    frames, positions = make_frames(n, seed=5, dtype=dtype), make_positions(n)
    frames[2, 3, 3] = bad_value
    data = [start, *(series.image(i, frames[i], typed_array_tag=tag) for i in range(n)), series.end()]
    result = pipeline.run_scan(
        series.scan_uid, data, [series.positions(range(n), positions), series.positions_end()]
    )
    assert_texts(
        result.warnings_for(reason), f"image 2 of scan {series.scan_uid}", fragment, COUNT_FIXES[reason]
    )
    assert result.metric(REJECTED, reason) == 1
    assert result.metric(DROPPED, reason) == 1
    assert_forwarded(result, [0, 1, 3, 4, 5], frames, positions)
    assert result.accounting[INGEST][f"rejected_{reason}"] == 1
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


def test_detector_sockets_carry_the_message_size_limit() -> None:
    """ZMQ_MAXMSGSIZE on both detector-facing sockets: a larger message drops its sender's connection when
    its size arrives, before anything is allocated for it."""
    stage = IngestStage.__new__(IngestStage)
    stage.config = IngestConfig(max_message_bytes=2**20)
    stages = [{"name": "ingest", "stage": "ingest"}, {"name": "b", "stage": "binning"}]
    stage.pipeline = validate_pipeline({"name": "limits", "stages": stages})
    inputs = stage.raw_inputs()
    assert {port: raw.max_message_bytes for port, raw in inputs.items()} == {
        "detector": 2**20,
        "positions": 2**20,
    }
    assert IngestConfig().max_message_bytes == 128 * 2**20

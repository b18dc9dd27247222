"""``phasestream bench soak``: hold a high frame rate for minutes and show that nothing leaks or is lost.

The data path of ``bench ingest`` (SELUN emitter process → ingest → binning → a sink, one process each,
ipc://) serves scan after scan for ``duration_s``. First one scan runs as fast as ZeroMQ takes the frames:
that is the rate the machine sustains (backpressure holds the emitter back, so nothing queues without
bound). The soak then runs at ``load`` times that rate, paced by the emitter, because latency is only
meaningful below saturation: at saturation every queue is full and latency measures the queue length.

Reported:

- frames in = frames accounted: every scan's ``ScanEnd`` accounting must explain every frame the detector
  announced (``unaccounted_frames``), summed over the soak;
- memory: the resident set of every process, sampled once a second; the median of the last quarter of the
  soak against the median of its first quarter (after the first scan, which warms the allocators). A leak
  of one batch per scan would show as growth proportional to the number of scans;
- latency: from a frame's arrival at ingest (``FrameBatch.received_at_s``) to the sink, per batch, as
  percentiles over the whole soak; the sink measures it and reports it at each scan's end.

With ``hostile_fraction`` F > 0 a hostile or broken sender shares the detector's sockets (``HostileMix``):
F of each scan's messages are hostile, of kinds drawn at random (``Hostile``) and sent among the scan's
images in stream order, and one short series with an unsafe scan uid and wrong-typed ``user_data`` runs
before each scan. Every real frame must still reach the sink and every scan's accounting must explain every
image id its start announced; ingest's ``/metrics`` must count each hostile message under its reason; the
ingest worker's memory must stay flat (its peak over the soak, ``VmHWM``, is reported beside the quarters)
and its log small (rejections are logged a few lines per reason and interval: ``stage.LogLimiter``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import bitshuffle
import cbor2
import numpy as np
from phasestream_bench.ingest import (
    MEAN_COUNTS_PER_PX,
    POSITIONS_PER_MESSAGE,
    SERIES_DATE,
    SERIES_ID,
    SERIES_UNIQUE_ID,
    SHAPE_PX,
    BenchError,
    Interleave,
    RawMessage,
    _pipeline,
    _start_emitter,
    _stop_emitter,
    bench_messages,
    machine_description,
)
from tqdm import tqdm

from phasestream.errors import ConfigError, DetectorMessageError, PositionError
from phasestream.formats.position_channel import encode_positions, encode_positions_end
from phasestream.formats.stream_v2_encode import (
    BSLZ4_BLOCK_BYTES,
    bslz4_compress,
    channel_array,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
)
from phasestream.runtime.accounting import per_stage, unaccounted_frames
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd
from phasestream.runtime.stage import TOO_MANY_PARTS, Stage
from phasestream.simulators.sparse_frames import sparse_frames
from phasestream.stages.ingest import Refuse, Reject

SOAK_SINK_STAGE = "phasestream_bench.soak:LatencySink"
PERCENTILES = (50, 95, 99)
RSS_SAMPLE_INTERVAL_S = 1.0
# A process whose resident set grows by less than this over the soak is called flat: allocator noise and
# ZeroMQ's buffers move by a few MB; a leak of one 4.7 MB batch per scan exceeds it within a few scans.
FLAT_RSS_GROWTH_MB = 16.0
SOAK_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
# A worker's log must stay under this over a soak, however many messages are rejected.
LOG_LIMIT_BYTES = 2**20
METRICS_TIMEOUT_S = 5.0
REJECTED = "phasestream_messages_rejected_total"
DROPPED = "phasestream_frames_dropped_total"

# ---- the hostile sender's messages --------------------------------------------------------------------
HOSTILE_SERIES_ID = SERIES_ID + 1  # the short series with an unsafe uid, before each scan
ORPHAN_SERIES_ID = SERIES_ID + 2  # positions of a series whose start never comes
# A bomb declares a 1 GiB frame of uint32; it carries the bslz4 header that says so and a few blocks of
# zeros (under 1 kB), so ingest would allocate the GiB were it to decompress before checking.
BOMB_SHAPE_PX = (16384, 16384)
BOMB_BLOCKS = 8
WRONG_SHAPE_PX = (96, 96)  # as after a change of the detector's ROI mode
EMPTY_PARTS = 1024  # ingest's raw inputs take 16 parts at most
POOL_FRAMES = 16  # real-looking frames that duplicates, truncations and wrong shapes are made of
GARBAGE_MAX_BYTES = 256
# user_data fields of the wrong type: each is left out and counted (bad_user_data).
BAD_USER_DATA = {"scan_shape": True, "scan_extent_m": "0", "positions_source": 5}


class Hostile(StrEnum):
    """What a hostile or broken sender on the detector's sockets sends among a scan's messages."""

    GARBAGE = "garbage_bytes"
    TRUNCATED = "truncated_cbor"
    BOMB = "decompression_bomb"
    WRONG_SHAPE = "image_of_another_shape"
    DUPLICATE = "duplicate_image_id"
    OUT_OF_RANGE = "image_id_out_of_range"
    MANY_PARTS = "many_empty_parts"
    ORPHAN_POSITIONS = "positions_of_no_series"
    NON_FINITE_POSITIONS = "non_finite_positions"
    UNSAFE_START = "unsafe_start_series"  # once before each scan: a start would close the scan open


# Drawn at random among a scan's images; UNSAFE_START goes before each scan's start.
IN_SCAN = tuple(kind for kind in Hostile if kind is not Hostile.UNSAFE_START)
# Image ids that a scan's start announces for the hostile images that must be checked as its own.
RESERVED_IDS = (Hostile.BOMB, Hostile.WRONG_SHAPE)
# What ingest's /metrics counts for each hostile message, by reason of phasestream_messages_rejected_total.
REJECTIONS_PER_MESSAGE: dict[Hostile, dict[str, int]] = {
    Hostile.GARBAGE: {DetectorMessageError.reason: 1},
    Hostile.TRUNCATED: {DetectorMessageError.reason: 1},
    Hostile.BOMB: {Reject.FRAME_TOO_LARGE: 1},
    Hostile.WRONG_SHAPE: {Reject.WRONG_SHAPE: 1},
    Hostile.DUPLICATE: {Reject.DUPLICATE_FRAME: 1},
    Hostile.OUT_OF_RANGE: {Reject.INDEX_OUT_OF_RANGE: 1},
    Hostile.MANY_PARTS: {TOO_MANY_PARTS: 1},
    Hostile.ORPHAN_POSITIONS: {Refuse.ORPHAN_POSITIONS: 1},
    Hostile.NON_FINITE_POSITIONS: {PositionError.reason: 1},
    Hostile.UNSAFE_START: {Refuse.UNSAFE_SCAN_UID: 1, Refuse.BAD_USER_DATA: len(BAD_USER_DATA)},
}
# Counted only once they were held orphan_positions_max_age_s (ingest's default is 60 s): fewer at the end.
COUNTED_LATER = frozenset({Refuse.ORPHAN_POSITIONS})


class HostileMix:
    """Builds each scan's hostile messages as an ``Interleave`` for the emitter, and counts them by kind.

    ``fraction`` of a scan's messages are hostile: a scan of n frames gets n·F/(1 − F) of them, of kinds
    drawn uniformly from ``IN_SCAN``, each after a chunk of images drawn uniformly. Images that must be
    checked as the scan's own (a bomb, another shape) use image ids beyond the real frames that the start
    announces too; a duplicate repeats an image id already sent; an id out of range lies beyond those
    announced; non-finite positions name the next chunk's images, so that accepting them would displace
    the real positions.
    """

    def __init__(self, fraction: float, seed: int = 0) -> None:
        self.fraction = fraction
        self.sent: Counter[Hostile] = Counter()
        self._rng = np.random.default_rng(seed)
        pool = sparse_frames(POOL_FRAMES, shape_px=SHAPE_PX, mean_counts_per_px=MEAN_COUNTS_PER_PX, seed=seed)
        self._frames = [channel_array(frame, compressed=bslz4_compress(frame)) for frame in pool]
        small = [np.ascontiguousarray(frame[: WRONG_SHAPE_PX[0], : WRONG_SHAPE_PX[1]]) for frame in pool]
        self._small_frames = [channel_array(frame, compressed=bslz4_compress(frame)) for frame in small]
        self._bomb = channel_array(
            np.zeros((1, 1), np.uint32),
            compressed=bslz4_zeros_head(BOMB_SHAPE_PX, np.uint32, BOMB_BLOCKS),
            declared_shape=BOMB_SHAPE_PX,
        )

    def for_scan(self, scan_uid: str, n_frames: int) -> Interleave:
        n_chunks = math.ceil(n_frames / POSITIONS_PER_MESSAGE)
        n_hostile = round(n_frames * self.fraction / (1 - self.fraction))
        kinds = [IN_SCAN[i] for i in self._rng.integers(0, len(IN_SCAN), n_hostile)]
        chunks = np.sort(self._rng.integers(0, n_chunks, n_hostile)).tolist()
        ids = _HostileIds(n_frames, announced=n_frames + sum(kind in RESERVED_IDS for kind in kinds))
        after_chunk: dict[int, list[RawMessage]] = defaultdict(list)
        for kind, chunk in zip(kinds, chunks, strict=True):
            after_chunk[chunk].append(self._message(kind, chunk, ids))
        self.sent.update(kinds)
        self.sent[Hostile.UNSAFE_START] += 1
        return Interleave(
            ids.announced,
            before_start=unsafe_series(scan_uid),
            after_chunk={chunk: tuple(messages) for chunk, messages in after_chunk.items()},
        )

    def expected_rejections(self) -> Counter[str]:
        """What ingest should have counted by reason for the messages built so far."""
        expected: Counter[str] = Counter()
        for kind, n in self.sent.items():
            for reason, per_message in REJECTIONS_PER_MESSAGE[kind].items():
                expected[reason] += n * per_message
        return expected

    def _message(self, kind: Hostile, chunk: int, ids: _HostileIds) -> RawMessage:
        rng = self._rng
        sent = min(ids.real, (chunk + 1) * POSITIONS_PER_MESSAGE)  # real images sent before this one
        if kind is Hostile.GARBAGE:
            return RawMessage((rng.bytes(int(rng.integers(1, GARBAGE_MAX_BYTES))),))
        if kind is Hostile.TRUNCATED:
            whole = self._image(int(rng.integers(0, sent)), self._pooled(self._frames))
            return RawMessage((whole[: int(rng.integers(1, len(whole)))],))
        if kind is Hostile.BOMB:
            return RawMessage((self._image(ids.reserved(), self._bomb),))
        if kind is Hostile.WRONG_SHAPE:
            return RawMessage((self._image(ids.reserved(), self._pooled(self._small_frames)),))
        if kind is Hostile.DUPLICATE:
            return RawMessage((self._image(int(rng.integers(0, sent)), self._pooled(self._frames)),))
        if kind is Hostile.OUT_OF_RANGE:
            return RawMessage((self._image(ids.out_of_range(), self._pooled(self._frames)),))
        if kind is Hostile.MANY_PARTS:
            return RawMessage((b"",) * EMPTY_PARTS)
        first = sent if sent < ids.real else chunk * POSITIONS_PER_MESSAGE
        image_ids = np.arange(first, min(first + POSITIONS_PER_MESSAGE, ids.real))
        positions_m = rng.uniform(-1e-6, 1e-6, (len(image_ids), 2))
        if kind is Hostile.ORPHAN_POSITIONS:
            message = encode_positions(ORPHAN_SERIES_ID, image_ids, positions_m)
        else:
            message = non_finite_positions(image_ids, positions_m, rng)
        return RawMessage((message,), on_positions=True)

    def _pooled(self, frames: list[cbor2.CBORTag]) -> cbor2.CBORTag:
        return frames[int(self._rng.integers(0, len(frames)))]

    @staticmethod
    def _image(image_id: int, data: cbor2.CBORTag) -> bytes:
        fields = image_fields(
            series_id=SERIES_ID,
            series_unique_id=SERIES_UNIQUE_ID,
            image_id=image_id,
            data=data,
            frame_time_s=1e-5,
            count_time_s=1e-5,
            series_date=SERIES_DATE,
        )
        return encode_message(fields)


@dataclass
class _HostileIds:
    """Image ids for one scan's hostile images: ids announced beyond the real frames, each used once, and
    distinct ids beyond all those announced."""

    real: int
    announced: int
    _next_reserved: int = field(default=-1, init=False)
    _next_beyond: int = field(default=-1, init=False)

    def reserved(self) -> int:
        self._next_reserved = max(self._next_reserved + 1, self.real)
        return self._next_reserved

    def out_of_range(self) -> int:
        self._next_beyond = max(self._next_beyond + 1, self.announced)
        return self._next_beyond


def bslz4_zeros_head(shape: tuple[int, ...], dtype: Any, blocks: int) -> bytes:
    """The start of a genuine bslz4 stream (HDF5 framing) of an all-zero frame of ``shape``: the header
    that declares its full size, then ``blocks`` compressed blocks of zeros."""
    dtype = np.dtype(dtype)
    elements = BSLZ4_BLOCK_BYTES // dtype.itemsize
    block = bitshuffle.compress_lz4(np.zeros(elements, dtype), elements).tobytes()
    return struct.pack(">QI", math.prod(shape) * dtype.itemsize, BSLZ4_BLOCK_BYTES) + block * blocks


def non_finite_positions(image_ids: np.ndarray, positions_m: np.ndarray, rng: np.random.Generator) -> bytes:
    """A position-channel ``positions`` message for the real series in which some values are NaN or ±inf
    (``encode_positions`` refuses to write one)."""
    values = positions_m.copy()
    bad = rng.integers(0, values.size, max(1, values.size // 8))
    values.flat[bad] = rng.choice([np.nan, np.inf, -np.inf], len(bad))
    return cbor2.dumps(
        {
            "type": "positions",
            "series_id": SERIES_ID,
            "image_id": image_ids.tolist(),
            "y_m": values[:, 0].tolist(),
            "x_m": values[:, 1].tolist(),
        }
    )


def unsafe_series(scan_uid: str) -> tuple[RawMessage, ...]:
    """A short series of one announced image and none sent, whose start names a scan uid outside the
    run's folders and has wrong-typed user_data; its ends on both sockets close it at once."""
    unique_id = f"{SERIES_UNIQUE_ID}-hostile-{scan_uid}"
    start = start_fields(
        series_id=HOSTILE_SERIES_ID,
        series_unique_id=unique_id,
        shape_px=SHAPE_PX,
        dtype=np.uint16,
        number_of_images=1,
        energy_kev=8.8,
        detector_distance_m=2.0,
        pixel_size_m=75e-6,
        count_time_s=1e-5,
        frame_time_s=1e-5,
        user_data={"scan_uid": f"../{scan_uid}", **BAD_USER_DATA},
        arm_date=SERIES_DATE,
    )
    end = end_fields(series_id=HOSTILE_SERIES_ID, series_unique_id=unique_id)
    return (
        # The position channel's end first: the series closes as soon as the detector's end arrives.
        RawMessage((encode_positions_end(HOSTILE_SERIES_ID),), on_positions=True),
        RawMessage((encode_message(start),)),
        RawMessage((encode_message(end),)),
    )


class LatencySink(Stage):
    """The soak's last stage: keeps each batch's ingest → sink latency and reports percentiles per scan."""

    def setup(self) -> None:
        self._latencies_s: dict[str, list[float]] = defaultdict(list)

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch) and message.received_at_s:
            self._latencies_s[message.scan_uid].append(time.time() - message.received_at_s)
        return ()

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        latencies = self._latencies_s.pop(message.scan_uid, [])
        # Sent before the runtime's scan_end event on the same socket, so the bench has it by then.
        self.report_status(scan_uid=message.scan_uid, latencies_s=latencies)
        return ()


@dataclass
class SoakResult:
    duration_s: float
    scan_frames: int
    sustained_frames_per_s: float
    target_frames_per_s: float
    hostile_fraction: float = 0.0
    scans: int = 0
    frames_sent: int = 0  # real frames, hostile images not included
    frames_accounted: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # VmHWM over the soak, per process
    log_bytes: dict[str, int] = field(default_factory=dict)  # per worker log, at the end
    # Over the whole run (the probe scan too): hostile messages sent by kind, what ingest should have
    # counted by reason, and ingest's counters by (metric, reason) at the end.
    hostile_sent: Counter[Hostile] = field(default_factory=Counter)
    expected_rejections: Counter[str] = field(default_factory=Counter)
    ingest_counters: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def achieved_frames_per_s(self) -> float:
        return self.frames_accounted / self.elapsed_s if self.elapsed_s else 0.0

    def latency_percentiles_ms(self) -> dict[int, float]:
        if not self.latencies_s:
            return {}
        values = np.percentile(np.array(self.latencies_s) * 1e3, PERCENTILES)
        return dict(zip(PERCENTILES, values.tolist(), strict=True))

    def rss_growth_mb(self) -> dict[str, tuple[float, float]]:
        """Per process: (median RSS of the first quarter, of the last quarter), in MB."""
        growth = {}
        for name, samples in self.rss_mb.items():
            values = [mb for _, mb in samples]
            if len(values) < 4:
                continue
            quarter = len(values) // 4
            growth[name] = (statistics.median(values[:quarter]), statistics.median(values[-quarter:]))
        return growth

    def rejection_rows(self) -> list[tuple[str, int | None, int, int]]:
        """(reason, expected from the hostile messages or None, rejected, frames dropped) for every reason
        ingest counted or should have, expected ones first."""
        rejected = {reason: n for (name, reason), n in self.ingest_counters.items() if name == REJECTED}
        dropped = {reason: n for (name, reason), n in self.ingest_counters.items() if name == DROPPED}
        reasons = list(self.expected_rejections) + sorted(
            (rejected.keys() | dropped.keys()) - set(self.expected_rejections)
        )
        return [
            (
                reason,
                self.expected_rejections.get(reason),
                round(rejected.get(reason, 0)),
                round(dropped.get(reason, 0)),
            )
            for reason in reasons
        ]

    def hostile_problems(self) -> list[str]:
        """Hostile messages ingest did not count as expected, reasons nothing hostile explains, and worker
        logs over ``LOG_LIMIT_BYTES``."""
        problems = []
        for reason, expected, rejected, _ in self.rejection_rows():
            if expected is None:
                problems.append(f"ingest rejected {rejected} messages as {reason}: no hostile message was")
            elif reason in COUNTED_LATER:
                if rejected > expected:
                    problems.append(f"{reason}: {rejected} rejected, more than the {expected} sent")
            elif rejected != expected:
                problems.append(f"{reason}: {rejected} rejected, {expected} expected from hostile messages")
        problems += [
            f"log {name} is {size:,} bytes, over {LOG_LIMIT_BYTES:,}"
            for name, size in self.log_bytes.items()
            if size >= LOG_LIMIT_BYTES
        ]
        return problems


def resident_mb(pid: int, field_name: str = "VmRSS") -> float | None:
    """``VmRSS`` (or another ``/proc/PID/status`` size, e.g. the peak ``VmHWM``) of a live process in MB;
    None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_SAMPLE = re.compile(r"^(phasestream_\w+_total)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape_counters(port: int, stage: str) -> dict[tuple[str, str], float]:
    """A stage's ``phasestream_*_total`` counters from its ``/metrics``, by (name, reason label), summed
    over its workers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=METRICS_TIMEOUT_S) as response:
        text = response.read().decode()
    counters: dict[tuple[str, str], float] = defaultdict(float)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = dict(_LABEL.findall(match[2]))
        if labels.get("stage") == stage:
            counters[(match[1], labels.get("reason", ""))] += float(match[3])
    return dict(counters)


class _Soak:
    def __init__(
        self,
        launcher: Any,
        emitter: Any,
        commands: Any,
        results: Any,
        stages: tuple[str, str],
        mix: HostileMix | None,
    ) -> None:
        self.launcher, self.emitter, self.commands, self.results = launcher, emitter, commands, results
        self.source, self.sink = stages
        self.mix = mix
        self._last_rss_s = 0.0

    def pids(self) -> dict[str, int]:
        pids = {"emitter": self.emitter.pid}
        pids.update({label: worker.process.pid for label, worker in self.launcher.workers.items()})
        return pids

    def sample_rss(self, result: SoakResult, started_s: float) -> None:
        now = time.monotonic()
        if now - self._last_rss_s < RSS_SAMPLE_INTERVAL_S:
            return
        self._last_rss_s = now
        for name, pid in self.pids().items():
            mb = resident_mb(pid)
            if mb is not None:
                result.rss_mb[name].append((now - started_s, mb))

    def reset_peak_rss(self) -> None:
        """Set each process's ``VmHWM`` to its ``VmRSS`` now (Linux ``clear_refs`` 5), so that the peak
        reported is the soak's, not the full-speed probe scan's; where that fails the peak is lifelong."""
        for pid in self.pids().values():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                continue

    def run_scan(self, n_frames: int, frames_per_s: float | None, on_wait: Any) -> dict[str, Any]:
        """Send one scan and wait for the sink's end; returns the scan_end event with the latencies."""
        scan_uid = f"soak-{uuid.uuid4().hex[:12]}"
        interleave = self.mix.for_scan(scan_uid, n_frames) if self.mix is not None else None
        self.commands.put((scan_uid, n_frames, frames_per_s, interleave))
        latencies: list[float] = []
        deadline = time.monotonic() + max(120.0, 4 * n_frames / (frames_per_s or 1000.0))
        while time.monotonic() < deadline:
            for event in self.launcher.events(timeout_s=0.2):
                stage = event["sender"].rsplit(".", 1)[0]
                if stage == self.sink and event.get("scan_uid") == scan_uid:
                    if event["event"] == "status" and "latencies_s" in event:
                        latencies = event["latencies_s"]
                    elif event["event"] == "scan_end":
                        return {**event, "latencies_s": latencies}
                elif event["event"] == "died":
                    raise BenchError(f"stage {event['sender']} died (code {event['code']}):\n{event['log']}")
            on_wait()
            if not self.emitter.is_alive():
                raise BenchError(f"the emitter process exited with code {self.emitter.exitcode}")
        raise BenchError(f"scan {scan_uid} did not reach the sink in time")

    def scan_problems(self, event: dict[str, Any], n_frames: int) -> list[str]:
        """What the scan's accounting leaves unexplained of the image ids its start announced, and real
        frames that ingest did not forward or the sink did not receive."""
        problems = unaccounted_frames(event["frames_sent"], event["accounting"])
        stages = per_stage(event["accounting"])
        forwarded = stages.get(self.source, {}).get("frames_forwarded")
        received = stages.get(self.sink, {}).get("frames_received")
        if forwarded != n_frames or received != n_frames:
            problems.append(
                f"scan {event['scan_uid']}: {self.source} forwarded {forwarded} and {self.sink} received "
                f"{received} of its {n_frames} real frames"
            )
        return problems

    def drain_sent(self) -> None:
        """Take the emitter's 'sent' reports so its queue does not grow over a long soak."""
        while not self.results.empty():
            self.results.get_nowait()

    def finish(self, result: SoakResult) -> None:
        """The processes' peak memory and ingest's counters, while they still run."""
        for name, pid in self.pids().items():
            peak = resident_mb(pid, "VmHWM")
            if peak is not None:
                result.peak_rss_mb[name] = peak
        port = self.launcher.workers[f"{self.source}.0"].metrics_port
        result.ingest_counters = scrape_counters(port, self.source) if port is not None else {}
        if self.mix is not None:
            result.hostile_sent = Counter(self.mix.sent)
            result.expected_rejections = self.mix.expected_rejections()


def bench_soak(
    duration_s: float = 300.0,
    *,
    scan_frames: int = 20_000,
    load: float = 0.9,
    frames_per_s: float | None = None,
    hostile_fraction: float = 0.0,
    progress: bool = True,
) -> SoakResult:
    """Soak the data path for ``duration_s``, with ``hostile_fraction`` of each scan's messages hostile;
    print the report and a docs/benchmarks.md row."""
    from phasestream.apps.launcher import Launcher

    if duration_s <= 0 or scan_frames < 64 or not 0 < load <= 1 or not 0 <= hostile_fraction < 1:
        raise ConfigError(
            f"--duration-s {duration_s}, --scan-frames {scan_frames}, --load {load}, --hostile-fraction "
            f"{hostile_fraction}: the duration must be positive, a scan at least 64 frames, the load in "
            "(0, 1] and the hostile fraction in [0, 1)"
        )
    mix = HostileMix(hostile_fraction) if hostile_fraction > 0 else None
    messages = bench_messages(scan_frames, progress=progress)
    run_dir = Path(tempfile.mkdtemp(prefix="pssoak-"))
    pipeline = _pipeline(run_dir, 64, sink=SOAK_SINK_STAGE)
    emitter, commands, results = _start_emitter(messages, pipeline)
    del messages
    succeeded = False
    try:
        with Launcher(pipeline) as launcher:
            stages = (pipeline.stages[0].name, pipeline.stages[-1].name)
            soak = _Soak(launcher, emitter, commands, results, stages, mix)
            result = _soak(soak, duration_s, scan_frames, load, frames_per_s, hostile_fraction, progress)
            soak.finish(result)
        result.log_bytes = {path.stem: path.stat().st_size for path in sorted(run_dir.glob("logs/*.log"))}
        succeeded = True
    finally:
        _stop_emitter(emitter, commands)
        if succeeded:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"phasestream bench soak: logs kept in {run_dir / 'logs'}", file=sys.stderr)
    print(format_soak_report(result))
    return result


def _soak(
    soak: _Soak,
    duration_s: float,
    scan_frames: int,
    load: float,
    frames_per_s: float | None,
    hostile_fraction: float,
    progress: bool,
) -> SoakResult:
    """One scan at full speed for the sustained rate, then scans at the target rate for ``duration_s``."""
    probe_started = time.monotonic()
    soak.run_scan(scan_frames, None, on_wait=lambda: None)
    sustained = scan_frames / (time.monotonic() - probe_started)
    target = frames_per_s if frames_per_s is not None else load * sustained
    result = SoakResult(duration_s, scan_frames, sustained, target, hostile_fraction)
    soak.reset_peak_rss()
    started = time.monotonic()
    with tqdm(total=round(duration_s), desc="soak", bar_format=SOAK_BAR, disable=not progress) as bar:

        def tick() -> None:
            soak.sample_rss(result, started)
            bar.update(min(round(duration_s), round(time.monotonic() - started)) - bar.n)

        while time.monotonic() - started < duration_s:
            event = soak.run_scan(scan_frames, target, on_wait=tick)
            soak.drain_sent()
            result.scans += 1
            result.frames_sent += scan_frames
            problems = soak.scan_problems(event, scan_frames)
            result.problems += problems
            if not problems:
                result.frames_accounted += scan_frames
            result.latencies_s += event["latencies_s"]
            bar.set_postfix_str(f"{result.scans} scans, {result.frames_accounted:,} frames")
            tick()
    result.elapsed_s = time.monotonic() - started
    return result


def format_soak_report(result: SoakResult) -> str:
    machine = machine_description()
    percentiles = result.latency_percentiles_ms()
    latency = ", ".join(f"p{p} {ms:.1f} ms" for p, ms in percentiles.items()) or "none measured"
    hostile = f", {result.hostile_fraction:.0%} of the messages hostile" if result.hostile_fraction else ""
    lines = [
        "",
        f"phasestream bench soak: {result.elapsed_s:.0f} s, {result.scans} scans of {result.scan_frames:,} "
        f"frames{hostile}, 192×192 u16 bslz4, emitter → ingest → binning → sink, one process each, ipc://",
        f"machine: {machine}; load average {os.getloadavg()[0]:.2f} at the end",
        f"  sustained rate (one scan at full speed)    {result.sustained_frames_per_s:>10,.0f} frames/s",
        f"  soak rate asked / achieved                 {result.target_frames_per_s:>10,.0f} / "
        f"{result.achieved_frames_per_s:,.0f} frames/s",
        f"  frames sent / accounted for                {result.frames_sent:>10,} / "
        f"{result.frames_accounted:,}",
        f"  latency ingest → sink, per batch           {latency}",
        "",
        f"  {'resident memory, MB':<30} {'first quarter':>14} {'last quarter':>13} {'peak':>8}   verdict",
    ]
    for name, (first, last) in sorted(result.rss_growth_mb().items()):
        verdict = "flat" if last - first < FLAT_RSS_GROWTH_MB else f"GREW {last - first:+.1f} MB"
        peak = result.peak_rss_mb.get(name)
        peak_text = f"{peak:>8.1f}" if peak is not None else f"{'–':>8}"
        lines.append(f"  {name:<30} {first:>14.1f} {last:>13.1f} {peak_text}   {verdict}")
    if result.log_bytes:
        logs = ", ".join(f"{name} {size / 1e3:,.1f} kB" for name, size in result.log_bytes.items())
        lines += ["", f"  worker logs (limit {LOG_LIMIT_BYTES / 2**20:g} MiB): {logs}"]
    if result.hostile_fraction:
        lines += _hostile_lines(result)
    if result.problems:
        lines += ["", "  accounting problems:", *(f"    {problem}" for problem in result.problems[:10])]
    lines += ["", *_benchmarks_row(result, machine, percentiles)]
    return "\n".join(lines)


def _hostile_lines(result: SoakResult) -> list[str]:
    sent = ", ".join(f"{kind} {n:,}" for kind, n in sorted(result.hostile_sent.items()))
    lines = [
        "",
        f"  hostile messages sent: {sum(result.hostile_sent.values()):,} ({sent})",
        f"  {'ingest /metrics, by reason':<30} {'expected':>10} {'rejected':>10} {'frames dropped':>15}",
    ]
    for reason, expected, rejected, dropped in result.rejection_rows():
        note = "   (counted once held orphan_positions_max_age_s)" if reason in COUNTED_LATER else ""
        expected_text = f"{expected:,}" if expected is not None else "–"
        lines.append(f"  {reason:<30} {expected_text:>10} {rejected:>10,} {dropped:>15,}{note}")
    problems = result.hostile_problems()
    lines += ["  hostile problems:", *(f"    {problem}" for problem in problems)] if problems else []
    return lines


def _benchmarks_row(result: SoakResult, machine: str, percentiles: dict[int, float]) -> list[str]:
    """The docs/benchmarks.md header and row; a hostile soak adds ingest's memory, log and rejections."""
    p = percentiles
    cells = [
        datetime.now().date().isoformat(),
        machine,
        f"{result.elapsed_s:.0f} s",
        str(result.scans),
        f"{result.target_frames_per_s:,.0f} / {result.achieved_frames_per_s:,.0f}",
        f"{result.frames_sent:,} / {result.frames_accounted:,}",
        f"{p[50]:.1f} / {p[95]:.1f} / {p[99]:.1f}" if p else "–",
    ]
    header = (
        "| date | machine | duration | scans | rate asked/achieved | frames sent/accounted "
        "| latency p50/p95/p99 ms |"
    )
    if result.hostile_fraction:
        ingest = next((name for name in result.peak_rss_mb if name.startswith("ingest")), "")
        first, last = result.rss_growth_mb().get(ingest, (math.nan, math.nan))
        rejected = sum(row[2] for row in result.rejection_rows())
        cells += [
            f"{result.hostile_fraction:.0%}",
            f"{result.peak_rss_mb.get(ingest, math.nan):.0f} / {last - first:+.1f}",
            f"{result.log_bytes.get(ingest, 0) / 1e3:,.0f} kB",
            f"{rejected:,}",
        ]
        header = header[:-1] + "| hostile | ingest RSS peak / growth MB | ingest log | rejected |"
    return [f"docs/benchmarks.md ({header}):", "| " + " | ".join(cells) + " |"]

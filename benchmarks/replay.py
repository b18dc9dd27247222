"""``phasestream bench replay``: how fast recorded scans leave CXI and NXmx files and reach a PULL socket."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from phasestream_bench.ingest import machine_description
from tqdm import tqdm

from phasestream.apps.replay.replay import ReplayRate, replay
from phasestream.errors import PhasestreamError
from phasestream.formats.cxi import read_cxi, write_cxi
from phasestream.formats.nxmx import write_nxmx
from phasestream.formats.position_channel import POSITIONS_BATCH_SIZE
from phasestream.formats.recorded_scan import FrameBlock, FrameCompression, RecordedScan
from phasestream.formats.stream_v2.decode import EndMessage, decode_stream_v2
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan
from phasestream.simulators.scans import ScanKind, make_scan


@dataclass(frozen=True)
class ReplayBenchRow:
    label: str
    frames: int
    replay_frames_per_s: list[float]  # first → last image handed to ZeroMQ, reading and encoding included
    delivered_frames_per_s: list[float]  # first → last image received by a PULL socket in another process


def bench_replay(
    sizes: tuple[int, ...] = (420, 10_000), repeats: int = 3, *, progress: bool = True
) -> list[ReplayBenchRow]:
    """Replay rate as fast as possible from CXI (bslz4 and uncompressed) and NXmx files; prints a table.

    The files hold the demo's scan (192 × 192, 420 positions, 1e6 photons per frame); the 10,000-frame
    files repeat its frames under a 10,000-point Fermat spiral. A PULL socket in a spawned process
    receives and counts (no decoding: ingest's cost is ``bench ingest``'s subject). Files are read right
    after writing, so from the page cache.
    """

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="psreplay-") as folder:
        workdir = Path(folder)
        base_file = write_cxi(
            workdir / "demo.cxi", simulate_scan(ScanSimulationConfig(n_positions=420, seed=0))
        )
        base = read_cxi(base_file)
        for size in sizes:
            scan = _repeated(base, size)
            files = {
                "CXI bslz4": write_cxi(workdir / f"scan-{size}.cxi", scan, frame_time_s=1e-3),
                "CXI uncompressed": write_cxi(
                    workdir / f"scan-{size}-raw.cxi", scan, compression=FrameCompression.NONE
                ),
                "NXmx bslz4": write_nxmx(workdir / f"scan-{size}_master.h5", scan, 1000),
            }
            for label, path in files.items():
                replayed, delivered = [], []
                for _ in tqdm(
                    range(repeats), desc=f"{label}, {size} frames", disable=not progress, leave=False
                ):
                    sent_rate, received_rate = _bench_once(path, workdir, size)
                    replayed.append(sent_rate)
                    delivered.append(received_rate)
                rows.append(ReplayBenchRow(label, size, replayed, delivered))
    print(format_replay_bench(rows, load_before))
    return rows


def format_replay_bench(rows: list[ReplayBenchRow], load_before: float | None = None) -> str:
    """The table, then one docs/benchmarks.md row per file."""
    load = f"; load average {load_before:.2f} before the run" if load_before is not None else ""
    lines = [
        "",
        "phasestream bench replay: as fast as possible, demo frames (192×192 uint16, 1e6 photons/frame), "
        "PULL receiver in another process",
        f"machine: {machine_description()}{load}",
        f"  {'file':<18} {'frames':>7} {'replay frames/s':>16} {'delivered frames/s':>19}   runs (replay)",
    ]
    for row in rows:
        runs = " / ".join(f"{rate:,.0f}" for rate in row.replay_frames_per_s)
        lines.append(
            f"  {row.label:<18} {row.frames:>7,} {statistics.median(row.replay_frames_per_s):>16,.0f} "
            f"{statistics.median(row.delivered_frames_per_s):>19,.0f}   {runs}"
        )
    lines += ["", "docs/benchmarks.md (| file | frames | replay frames/s | delivered frames/s | runs |):"]
    lines += [
        f"| {row.label} | {row.frames:,} | {statistics.median(row.replay_frames_per_s):,.0f} | "
        f"{statistics.median(row.delivered_frames_per_s):,.0f} | "
        + " / ".join(f"{rate:,.0f}" for rate in row.replay_frames_per_s)
        + " |"
        for row in rows
    ]
    return "\n".join(lines)


def _repeated(base: RecordedScan, size: int) -> RecordedScan:
    """``size`` frames cycling through ``base``'s (read lazily) under a Fermat spiral of ``size`` points."""

    block = base.blocks[0]
    blocks = [block] * (size // block.count)
    if size % block.count:
        blocks.append(FrameBlock(block.file, block.dataset, size % block.count))
    neighbours = np.sort(np.linalg.norm(base.positions_m[:, None] - base.positions_m[None], axis=2), axis=1)
    step_m = float(np.median(neighbours[:, 1]))
    spiral_m = make_scan(ScanKind.FERMAT_SPIRAL, size, 1.0).positions_px * step_m
    return dataclasses.replace(base, blocks=tuple(blocks), positions_m=spiral_m, scan_shape=(size,))


def _bench_once(path: Path, workdir: Path, n_frames: int) -> tuple[float, float]:
    endpoints = (
        f"ipc://{workdir}/data-{uuid.uuid4().hex[:8]}",
        f"ipc://{workdir}/pos-{uuid.uuid4().hex[:8]}",
    )
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    receiver = context.Process(target=_count_messages, args=(*endpoints, n_frames, results), daemon=True)
    receiver.start()
    try:
        report = replay(path, ReplayRate.MAX, *endpoints, progress=False, send_timeout_s=120)
        ended, first_s, last_s = results.get(timeout=120)
    finally:
        receiver.join(timeout=30)
        if receiver.is_alive():
            receiver.terminate()
    if not ended:
        raise PhasestreamError(
            f"the bench receiver did not get exactly {n_frames} images, then the end, from {path}"
        )
    return report.frames_per_s, (n_frames - 1) / (last_s - first_s)


def _count_messages(data_endpoint: str, positions_endpoint: str, n_frames: int, results: Any) -> None:
    """Child process: receive start, ``n_frames`` images and end, and every positions message.

    Only the last data message is decoded (it must be the end): decoding each image would time the
    receiver, not the replay.
    """

    context = zmq.Context()
    data, positions = context.socket(zmq.PULL), context.socket(zmq.PULL)
    data.connect(data_endpoint)
    positions.connect(positions_endpoint)
    data.recv()  # start
    data.recv(copy=False)
    first_s = time.perf_counter()
    for _ in range(n_frames - 1):
        data.recv(copy=False)
    last_s = time.perf_counter()
    ended = isinstance(decode_stream_v2(data.recv()), EndMessage)
    for _ in range(-(-n_frames // POSITIONS_BATCH_SIZE) + 1):
        positions.recv()
    results.put((ended, first_s, last_s))
    context.destroy(linger=0)

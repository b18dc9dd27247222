"""``phasestream bench ingest``: frames/s through emitter → ingest → binning, with real processes.

The launcher starts ingest, binning (its default, pass-through configuration) and ``CountingSink``, a
terminal stage that only counts, one process each. A SELUN emitter in a separate (spawned) process sends
pre-encoded Stream V2 ``image`` messages as fast as ZeroMQ takes them, with a positions batch after every
64 images as a motion controller would send them. One pipeline serves a short warm-up scan and then
``repeats`` timed scans (``exit_after_scan`` false).

A run's time goes from the first image handed to ZeroMQ (taken in the emitter) to the sink's ``scan_end``
control event arriving at the launcher (taken here); both are ``time.monotonic()``, one clock per machine
on Linux. frames/s = frames / that time; the median is quoted. Decoding the same
messages in this process (``decode_stream_v2``, no sockets) is reported beside it as the ceiling of one
ingest worker, and the ratio pipeline / decode-only says what the stage runtime and transport cost.

The frames and the emitter are :mod:`phasestream_bench.detector_emitter`'s.

Beside the rates the report gives each process's CPU time per frame from ``/proc`` (ZeroMQ I/O threads
included). "ingest frames per CPU-second" is what one ingest worker sustains on one core of its own (its
ZeroMQ I/O thread can run beside it on another core, so the pipeline may beat it). With fewer cores than
busy processes, as on a 2-core machine, the pipeline rate is the machine's limit as much as ingest's.
"""

from __future__ import annotations

import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from phasestream_bench.detector_emitter import (
    MEAN_COUNTS_PER_PX,
    SHAPE_PX,
    BenchError,
    bench_messages,
    start_emitter,
    stop_emitter,
)
from tqdm import tqdm

from phasestream.apps.launch.launcher import Launcher
from phasestream.errors import ConfigError
from phasestream.formats.stream_v2.decode import decode_stream_v2
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import Message, ScanEnd
from phasestream.runtime.stage import Stage

WARMUP_FRAMES = 2048
DEFAULT_BATCH_SIZE = 64
TARGET_FRAMES_PER_S = 30_000  # per ingest worker: a SELUN fly scan at 10 kHz with room to spare
SCAN_TIMEOUT_S = 600.0
SINK_STAGE = "phasestream_bench.ingest:CountingSink"


class CountingSink(Stage):
    """The bench's last stage: the runtime counts what arrives and reports ``scan_end``; nothing more."""

    def process(self, message: Message) -> Iterable[Message]:
        return ()

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        # The runtime reports the last stage's scan_end itself; yielding the message would report it twice.
        return ()


@dataclass(frozen=True)
class PipelineRun:
    frames: int
    elapsed_s: float  # first image sent → the sink's scan_end event
    emit_s: float  # first → last image handed to ZeroMQ (the emitter blocks when ingest falls behind)
    # CPU seconds each process used over the scan (Linux /proc; empty elsewhere), and that window's length.
    cpu_s: dict[str, float] = field(default_factory=dict)
    window_s: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s


@dataclass
class IngestBenchResult:
    n_frames: int
    batch_size: int
    bytes_per_frame: float
    binning_workers: int = 1
    runs: list[PipelineRun] = field(default_factory=list)
    decode_only_frames_per_s: list[float] = field(default_factory=list)

    @property
    def median_frames_per_s(self) -> float:
        return statistics.median(run.frames_per_s for run in self.runs)

    @property
    def decode_only_median(self) -> float:
        return statistics.median(self.decode_only_frames_per_s)

    @property
    def ratio(self) -> float:
        return self.median_frames_per_s / self.decode_only_median


def decode_only_frames_per_s(messages: Sequence[bytes]) -> float:
    """One pass of ``decode_stream_v2`` over the messages in this process: the per-worker ceiling."""

    started = time.perf_counter()
    for message in messages:
        decode_stream_v2(message)
    return len(messages) / (time.perf_counter() - started)


# ---- the pipeline ----------------------------------------------------------------------------------------


def bench_pipeline(run_dir: Path, batch_size: int, sink: str = SINK_STAGE, binning_workers: int = 1) -> Any:
    """ingest → binning → ``sink`` on ipc:// sockets under ``run_dir``, serving scan after scan."""

    return validate_pipeline(
        {
            "name": "bench-ingest",
            "run_dir": str(run_dir),
            "exit_after_scan": False,
            "detector": {
                "data_endpoint": f"ipc://{run_dir}/detector-data.sock",
                "positions_endpoint": f"ipc://{run_dir}/detector-positions.sock",
            },
            "stages": [
                {"name": "ingest", "stage": "ingest", "config": {"batch_size": batch_size}},
                {"name": "binning", "stage": "binning", "workers": binning_workers},
                {"name": "sink", "stage": sink},
            ],
        },
        source="bench ingest pipeline",
    )


@dataclass
class _Session:
    launcher: Any
    emitter: Any  # multiprocessing.Process
    commands: Any
    results: Any
    sink: str

    def scan(self, n_frames: int, bar: tqdm) -> PipelineRun:
        """Send one scan and wait for the sink's scan_end; check that every frame arrived."""

        scan_uid = f"bench-{uuid.uuid4().hex[:12]}"
        cpu_before, window_started = self._cpu_seconds(), time.monotonic()
        self.commands.put((scan_uid, n_frames, None, None))
        shown = bar.n
        ended_at, event = self._wait_for_scan_end(scan_uid, bar, shown)
        cpu_after, window_s = self._cpu_seconds(), time.monotonic() - window_started
        cpu_s = {name: cpu_after[name] - cpu_before[name] for name in cpu_before.keys() & cpu_after.keys()}
        try:
            kind, sent_uid, first_sent, last_sent = self.results.get(timeout=60)
        except queue.Empty:
            raise BenchError(f"the emitter did not report scan {scan_uid} as sent") from None
        if (kind, sent_uid) != ("sent", scan_uid):
            raise BenchError(f"the emitter reported {kind} {sent_uid} while scan {scan_uid} ran")
        problems = unaccounted_frames(event["frames_sent"], event["accounting"])
        forwarded = event["accounting"].get("ingest.0", {}).get("frames_forwarded")
        if problems or forwarded != n_frames:
            raise BenchError(
                f"scan {scan_uid}: {forwarded} of {n_frames} frames forwarded by ingest; {problems}; "
                f"accounting {event['accounting']}"
            )
        bar.update(shown + n_frames - bar.n)
        return PipelineRun(n_frames, ended_at - first_sent, last_sent - first_sent, cpu_s, window_s)

    def _cpu_seconds(self) -> dict[str, float]:
        pids = {"emitter": self.emitter.pid, "launcher (this process)": os.getpid()}
        pids.update({label: worker.process.pid for label, worker in self.launcher.workers.items()})
        seconds = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        return {name: value for name, value in seconds.items() if value is not None}

    def _wait_for_scan_end(self, scan_uid: str, bar: tqdm, shown: int) -> tuple[float, dict[str, Any]]:
        deadline = time.monotonic() + SCAN_TIMEOUT_S
        while time.monotonic() < deadline:
            for event in self.launcher.events(timeout_s=0.5):
                now = time.monotonic()
                stage = event["sender"].rsplit(".", 1)[0]
                if event["event"] == "scan_end" and stage == self.sink and event["scan_uid"] == scan_uid:
                    return now, event
                if event["event"] == "status" and stage == self.sink and event.get("scan_uid") == scan_uid:
                    bar.update(shown + event["frames_received"] - bar.n)
                elif event["event"] == "log":
                    tqdm.write(f"  [{event['sender']}] {event['reason']}: {event['text']}")
                elif event["event"] == "died":
                    raise BenchError(f"stage {event['sender']} died (code {event['code']}):\n{event['log']}")
            if not self.emitter.is_alive():
                raise BenchError(f"the emitter process exited with code {self.emitter.exitcode}")
        raise BenchError(f"scan {scan_uid} did not reach the sink within {SCAN_TIMEOUT_S:.0f} s")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process from ``/proc/PID/stat``; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


# ---- the benchmark ---------------------------------------------------------------------------------------


def bench_ingest(
    n_frames: int = 200_000,
    repeats: int = 3,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    binning_workers: int = 1,
    progress: bool = True,
) -> IngestBenchResult:
    """Measure, print a table and a docs/benchmarks.md row, and return the figures."""

    if n_frames < 1 or repeats < 1:
        raise ConfigError(f"--frames {n_frames} and --repeats {repeats}: both must be at least 1")
    load_before = os.getloadavg()[0]
    messages = bench_messages(n_frames, progress=progress)
    result = IngestBenchResult(n_frames, batch_size, sum(map(len, messages)) / n_frames, binning_workers)
    for _ in tqdm(range(repeats), desc="decode only", unit="pass", disable=not progress, leave=False):
        result.decode_only_frames_per_s.append(decode_only_frames_per_s(messages))

    run_dir = Path(tempfile.mkdtemp(prefix="psbench-"))
    pipeline = bench_pipeline(run_dir, batch_size, binning_workers=binning_workers)
    emitter, commands, results = start_emitter(messages, pipeline)
    del messages  # the emitter has its copy
    succeeded = False
    try:
        with Launcher(pipeline) as launcher:
            session = _Session(launcher, emitter, commands, results, sink=pipeline.stages[-1].name)
            warmup = min(n_frames, WARMUP_FRAMES)
            with tqdm(total=warmup, desc="warm-up", unit="frame", disable=not progress, leave=False) as bar:
                session.scan(warmup, bar)
            with tqdm(total=repeats * n_frames, desc="pipeline", unit="frame", disable=not progress) as bar:
                for repeat in range(repeats):
                    bar.set_postfix_str(f"run {repeat + 1}/{repeats}")
                    result.runs.append(session.scan(n_frames, bar))
        succeeded = True
    finally:
        stop_emitter(emitter, commands)
        if succeeded:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"phasestream bench ingest: logs kept in {run_dir / 'logs'}", file=sys.stderr)
    print(format_report(result, load_before))
    return result


def machine_description() -> str:
    """CPU count and model, OS and Python: what a figure in docs/benchmarks.md needs beside it."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = f"{os.cpu_count()} CPUs" + (f" ({model})" if model else "")
    return f"{cpus}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def ingest_frames_per_cpu_s(result: IngestBenchResult) -> float | None:
    """Frames per CPU-second of the ingest process (ZeroMQ I/O thread included): one worker's capacity."""
    rates = [run.frames / run.cpu_s["ingest.0"] for run in result.runs if run.cpu_s.get("ingest.0")]
    return statistics.median(rates) if rates else None


def format_report(result: IngestBenchResult, load_before: float | None = None) -> str:
    runs = " / ".join(f"{run.frames_per_s:,.0f}" for run in result.runs)
    decode_runs = " / ".join(f"{rate:,.0f}" for rate in result.decode_only_frames_per_s)
    emit = statistics.median(run.frames / run.emit_s for run in result.runs)
    median = result.median_frames_per_s
    capacity = ingest_frames_per_cpu_s(result)
    machine = machine_description()
    load = f"; load average {load_before:.2f} before the run" if load_before is not None else ""

    def row(measure: str, value: str, more: str = "") -> str:
        return f"  {measure:<48} {value:>10}   {more}".rstrip()

    def verdict(rate: float) -> str:
        return f"{rate:,.0f} ({'met' if rate >= TARGET_FRAMES_PER_S else 'not met'})"

    lines = [
        "",
        f"phasestream bench ingest: {result.n_frames:,} frames of {SHAPE_PX[0]}×{SHAPE_PX[1]} uint16 bslz4, "
        f"Poisson mean {MEAN_COUNTS_PER_PX} counts/px ({result.bytes_per_frame / 1000:.1f} kB/frame)",
        f"emitter → ingest (1 worker, batch {result.batch_size}) → binning ({result.binning_workers} "
        "worker(s)) → sink, one process each, "
        f"ipc://; median of {len(result.runs)} runs after a "
        f"{min(result.n_frames, WARMUP_FRAMES):,}-frame warm-up",
        f"machine: {machine}{load}",
        "",
        row("measure", "median", "runs"),
        row("pipeline frames/s (first sent → sink scan_end)", f"{median:,.0f}", runs),
        row(
            "decode-only frames/s (in-process, no sockets)", f"{result.decode_only_median:,.0f}", decode_runs
        ),
        row("pipeline / decode-only", f"{result.ratio:.2f}"),
        row("emitter send frames/s (blocks when ingest lags)", f"{emit:,.0f}"),
    ]
    if capacity is not None:
        lines.append(row("ingest frames per CPU-second of its process", f"{capacity:,.0f}"))
    lines.append(
        row(
            "target per ingest worker",
            f"{TARGET_FRAMES_PER_S:,}",
            f"pipeline {verdict(median)}"
            + (f"; ingest capacity {verdict(capacity)}" if capacity is not None else ""),
        )
    )
    lines += _cpu_lines(result.runs)
    lines += [
        "",
        "docs/benchmarks.md (| date | benchmark | machine | setting | frames/s median | runs | "
        "decode-only | ratio |):",
        f"| {datetime.now().date().isoformat()} | bench ingest | {machine} | "
        f"{result.n_frames:,} frames × {len(result.runs)}, 192×192 u16 bslz4, mean 0.05 counts/px, "
        f"batch {result.batch_size}, emitter → ingest → binning ×{result.binning_workers} → sink | "
        f"{median:,.0f} | {runs} | "
        f"{result.decode_only_median:,.0f} | {result.ratio:.2f} |",
    ]
    return "\n".join(lines)


def _cpu_lines(runs: Sequence[PipelineRun]) -> list[str]:
    """CPU time per frame and share of one core, per process (medians over the runs)."""
    names = sorted(set.intersection(*(set(run.cpu_s) for run in runs))) if runs else []
    if not names:
        return []
    lines = [
        "",
        f"  {'CPU by process (Linux /proc), median over runs':<48} {'µs/frame':>10}   share of a core",
    ]
    for name in names:
        per_frame = statistics.median(run.cpu_s[name] / run.frames * 1e6 for run in runs)
        share = statistics.median(run.cpu_s[name] / run.window_s for run in runs)
        lines.append(f"  {name:<48} {per_frame:>10.1f}   {share:.0%}")
    return lines

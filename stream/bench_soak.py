"""``phasestream bench soak``: hold a high frame rate for minutes and show that nothing leaks or is lost.

The data path of ``bench ingest`` (SELUN emitter process → ingest → binning → a sink, one process each,
ipc://) serves scan after scan for ``duration_s``. First one scan runs as fast as ZeroMQ takes the frames:
that is the rate the machine sustains (backpressure holds the emitter back, so nothing queues without
bound). The soak then runs at ``load`` times that rate, paced by the emitter, because latency is only
meaningful below saturation: at saturation every queue is full and latency measures the queue length.

Reported, per the operations issue:

- frames in = frames accounted: every scan's ``ScanEnd`` accounting must explain every frame the detector
  announced (``unaccounted_frames``), summed over the soak;
- memory: the resident set of every process, sampled once a second; the median of the last quarter of the
  soak against the median of its first quarter (after the first scan, which warms the allocators). A leak
  of one batch per scan would show as growth proportional to the number of scans;
- latency: from a frame's arrival at ingest (``FrameBatch.received_at_s``) to the sink, per batch, as
  percentiles over the whole soak; the sink measures it and reports it at each scan's end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from phasestream.accounting import unaccounted_frames
from phasestream.bench_ingest import (
    BenchError,
    _pipeline,
    _start_emitter,
    _stop_emitter,
    bench_messages,
    machine_description,
)
from phasestream.errors import ConfigError
from phasestream.messages import FrameBatch, Message, ScanEnd
from phasestream.stage import Stage

SOAK_SINK_STAGE = "phasestream.bench_soak:LatencySink"
PERCENTILES = (50, 95, 99)
RSS_SAMPLE_INTERVAL_S = 1.0
# A process whose resident set grows by less than this over the soak is called flat: allocator noise and
# ZeroMQ's buffers move by a few MB; a leak of one 4.7 MB batch per scan exceeds it within a few scans.
FLAT_RSS_GROWTH_MB = 16.0
SOAK_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"


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
    scans: int = 0
    frames_sent: int = 0
    frames_accounted: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))

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


def resident_mb(pid: int) -> float | None:
    """VmRSS of a live process in MB from ``/proc/PID/status``; None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Soak:
    def __init__(self, launcher: Any, emitter: Any, commands: Any, results: Any, sink: str) -> None:
        self.launcher, self.emitter, self.commands, self.results, self.sink = (
            launcher,
            emitter,
            commands,
            results,
            sink,
        )
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

    def run_scan(self, n_frames: int, frames_per_s: float | None, on_wait: Any) -> dict[str, Any]:
        """Send one scan and wait for the sink's end; returns the scan_end event with the latencies."""
        scan_uid = f"soak-{uuid.uuid4().hex[:12]}"
        self.commands.put((scan_uid, n_frames, frames_per_s))
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

    def drain_sent(self) -> None:
        """Take the emitter's 'sent' reports so its queue does not grow over a long soak."""
        while not self.results.empty():
            self.results.get_nowait()


def bench_soak(
    duration_s: float = 300.0,
    *,
    scan_frames: int = 20_000,
    load: float = 0.9,
    frames_per_s: float | None = None,
    progress: bool = True,
) -> SoakResult:
    """Soak the data path for ``duration_s``; print the report and a docs/benchmarks.md row."""
    from phasestream.launcher import Launcher

    if duration_s <= 0 or scan_frames < 64 or not 0 < load <= 1:
        raise ConfigError(
            f"--duration-s {duration_s}, --scan-frames {scan_frames}, --load {load}: the duration must be "
            "positive, a scan at least 64 frames and the load in (0, 1]"
        )
    messages = bench_messages(scan_frames, progress=progress)
    run_dir = Path(tempfile.mkdtemp(prefix="pssoak-"))
    pipeline = _pipeline(run_dir, 64, sink=SOAK_SINK_STAGE)
    emitter, commands, results = _start_emitter(messages, pipeline)
    del messages
    succeeded = False
    try:
        with Launcher(pipeline) as launcher:
            soak = _Soak(launcher, emitter, commands, results, sink=pipeline.stages[-1].name)
            probe_started = time.monotonic()
            soak.run_scan(scan_frames, None, on_wait=lambda: None)
            sustained = scan_frames / (time.monotonic() - probe_started)
            target = frames_per_s if frames_per_s is not None else load * sustained
            result = SoakResult(duration_s, scan_frames, sustained, target)
            started = time.monotonic()
            with tqdm(total=round(duration_s), desc="soak", bar_format=SOAK_BAR, disable=not progress) as bar:

                def tick() -> None:
                    soak.sample_rss(result, started)
                    bar.update(min(round(duration_s), round(time.monotonic() - started)) - bar.n)

                while time.monotonic() - started < duration_s:
                    event = soak.run_scan(scan_frames, target, on_wait=tick)
                    soak.drain_sent()
                    result.scans += 1
                    result.frames_sent += event["frames_sent"]
                    problems = unaccounted_frames(event["frames_sent"], event["accounting"])
                    result.problems += problems
                    if not problems:
                        result.frames_accounted += event["frames_sent"]
                    result.latencies_s += event["latencies_s"]
                    bar.set_postfix_str(f"{result.scans} scans, {result.frames_accounted:,} frames")
                    tick()
            result.elapsed_s = time.monotonic() - started
        succeeded = True
    finally:
        _stop_emitter(emitter, commands)
        if succeeded:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            print(f"phasestream bench soak: logs kept in {run_dir / 'logs'}", file=sys.stderr)
    print(format_soak_report(result))
    return result


def format_soak_report(result: SoakResult) -> str:
    machine = machine_description()
    percentiles = result.latency_percentiles_ms()
    latency = ", ".join(f"p{p} {ms:.1f} ms" for p, ms in percentiles.items()) or "none measured"
    lines = [
        "",
        f"phasestream bench soak: {result.elapsed_s:.0f} s, {result.scans} scans of {result.scan_frames:,} "
        "frames, 192×192 u16 bslz4, emitter → ingest → binning → sink, one process each, ipc://",
        f"machine: {machine}; load average {os.getloadavg()[0]:.2f} at the end",
        f"  sustained rate (one scan at full speed)    {result.sustained_frames_per_s:>10,.0f} frames/s",
        f"  soak rate asked / achieved                 {result.target_frames_per_s:>10,.0f} / "
        f"{result.achieved_frames_per_s:,.0f} frames/s",
        f"  frames sent / accounted for                {result.frames_sent:>10,} / "
        f"{result.frames_accounted:,}",
        f"  latency ingest → sink, per batch           {latency}",
        "",
        f"  {'resident memory, MB':<30} {'first quarter':>14} {'last quarter':>13}   verdict",
    ]
    for name, (first, last) in sorted(result.rss_growth_mb().items()):
        verdict = "flat" if last - first < FLAT_RSS_GROWTH_MB else f"GREW {last - first:+.1f} MB"
        lines.append(f"  {name:<30} {first:>14.1f} {last:>13.1f}   {verdict}")
    if result.problems:
        lines += ["", "  accounting problems:", *(f"    {problem}" for problem in result.problems[:10])]
    p = percentiles
    lines += [
        "",
        "docs/benchmarks.md (| date | machine | duration | scans | rate asked/achieved "
        "| frames sent/accounted | latency p50/p95/p99 ms |):",
        f"| {datetime.now().date().isoformat()} | {machine} | {result.elapsed_s:.0f} s | {result.scans} | "
        f"{result.target_frames_per_s:,.0f} / {result.achieved_frames_per_s:,.0f} | "
        f"{result.frames_sent:,} / {result.frames_accounted:,} | "
        + (f"{p[50]:.1f} / {p[95]:.1f} / {p[99]:.1f} |" if p else "– |"),
    ]
    return "\n".join(lines)

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
and its log small (rejections are logged a few lines per reason and interval: ``stage_log.LogLimiter``).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phasestream_bench.detector_emitter import BenchError, bench_messages, start_emitter, stop_emitter
from phasestream_bench.hostile_sender import HostileMix
from phasestream_bench.ingest import bench_pipeline
from phasestream_bench.soak_report import SoakResult, format_soak_report
from tqdm import tqdm

from phasestream.apps.launch.launcher import Launcher
from phasestream.errors import ConfigError
from phasestream.runtime.accounting import per_stage, unaccounted_frames
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd
from phasestream.runtime.stage import Stage

SOAK_SINK_STAGE = "phasestream_bench.soak:LatencySink"
RSS_SAMPLE_INTERVAL_S = 1.0
SOAK_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]"
METRICS_TIMEOUT_S = 5.0


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

    if duration_s <= 0 or scan_frames < 64 or not 0 < load <= 1 or not 0 <= hostile_fraction < 1:
        raise ConfigError(
            f"--duration-s {duration_s}, --scan-frames {scan_frames}, --load {load}, --hostile-fraction "
            f"{hostile_fraction}: the duration must be positive, a scan at least 64 frames, the load in "
            "(0, 1] and the hostile fraction in [0, 1)"
        )
    mix = HostileMix(hostile_fraction) if hostile_fraction > 0 else None
    messages = bench_messages(scan_frames, progress=progress)
    run_dir = Path(tempfile.mkdtemp(prefix="pssoak-"))
    pipeline = bench_pipeline(run_dir, 64, sink=SOAK_SINK_STAGE)
    emitter, commands, results = start_emitter(messages, pipeline)
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
        stop_emitter(emitter, commands)
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

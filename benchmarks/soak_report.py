"""What ``phasestream bench soak`` measured, and its report: rates, accounting, memory per process,
latency percentiles, and with a hostile sender what ingest rejected against what was sent."""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from phasestream_bench.hostile_sender import COUNTED_LATER, Hostile
from phasestream_bench.ingest import machine_description

PERCENTILES = (50, 95, 99)
# A process whose resident set grows by less than this over the soak is called flat: allocator noise and
# ZeroMQ's buffers move by a few MB; a leak of one 4.7 MB batch per scan exceeds it within a few scans.
FLAT_RSS_GROWTH_MB = 16.0
# A worker's log must stay under this over a soak, however many messages are rejected.
LOG_LIMIT_BYTES = 2**20
REJECTED = "phasestream_messages_rejected_total"
DROPPED = "phasestream_frames_dropped_total"


@dataclass
class SoakResult:
    """What a soak measured: rates, frames sent and accounted for, latencies, memory samples per process,
    worker log sizes and, with a hostile sender, what was sent against what ingest counted."""

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

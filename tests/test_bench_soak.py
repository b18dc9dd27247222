"""The soak benchmark, run for a few seconds: it must account for every frame and report what it claims."""

from __future__ import annotations

import pytest
from phasestream_bench.soak import bench_soak
from phasestream_bench.soak_report import SoakResult, format_soak_report


@pytest.mark.slow
def test_short_soak_accounts_for_every_frame_and_samples_memory_and_latency() -> None:
    result = bench_soak(4.0, scan_frames=1024, load=0.5, progress=False)
    assert result.scans >= 1
    assert result.problems == []
    assert result.frames_sent == result.scans * 1024
    assert result.frames_accounted == result.frames_sent
    # One latency per batch of 64 frames reached the sink, and every one is a plausible duration.
    assert len(result.latencies_s) == result.frames_sent // 64
    assert all(0 <= latency < 60 for latency in result.latencies_s)
    assert {"ingest.0", "binning.0", "sink.0", "emitter"} <= set(result.rss_mb)
    assert 0 < result.target_frames_per_s <= result.sustained_frames_per_s


def test_memory_growth_is_judged_from_the_first_and_last_quarters() -> None:
    result = SoakResult(duration_s=8, scan_frames=64, sustained_frames_per_s=1.0, target_frames_per_s=1.0)
    result.rss_mb["leaky"] = [(t, 100.0 + 10 * t) for t in range(8)]
    result.rss_mb["steady"] = [(t, 50.0) for t in range(8)]
    growth = result.rss_growth_mb()
    assert growth["leaky"] == (105.0, 165.0)
    assert growth["steady"] == (50.0, 50.0)
    report = format_soak_report(result)
    assert "GREW +60.0 MB" in report
    assert "steady" in report and "flat" in report

"""Scans phasestream did not make, reconstructed end to end: ``phasestream replay FILE --pipeline``.

Each case carries a probe or a detector effect of a real beamline that the demo's simulator does not
make (``simulators.beamline_scans``): a Fresnel zone plate with central stop and order-sorting aperture
in focus and 50 µm out of it, an astigmatic KB focus, probes filling 30 % and 70 % of the window, dead
and hot pixels, module gaps, a beam stop, a flat background of 3 counts per pixel, and position errors
of 8 % of the step. Each is written with plain h5py in another tool's CXI layout (cxidb's reference
layout, PtyPy's, NeXus NXcxi_ptycho; float32 intensities in every other case) and replayed in a fresh
process: the real launcher, ingest, binning, refine and publish workers, ZeroMQ sockets and an embedded
Tiled server. Its result file is compared with the truth after removing what ptychography cannot
determine (global phase, phase ramp, sub-pixel shift), over the well-illuminated region.

Thresholds. A flat start (ones) scores about 0.5 on these dead-leaves samples, a wrong defocus sign
0.44-0.47, and the truth 0. The figures measured with this test's scans (150 positions of 64 × 64 px,
1e6 photons per frame, seed 0, ``phasestream bench beamline``) are in ``MEASURED``; each case's threshold
is the larger of its two measured errors plus 0.05, for the scatter of CPU timing (how many epochs run
while frames still arrive) that moved single figures by up to 0.03 between runs. The true probe, given,
is refined like the searched one and ends on the same floor (within ±0.03), so it shares the threshold.
"""

from __future__ import annotations

import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from phasestream_bench.beamline import object_error, replay_case

from phasestream.formats.result_file import read_result_file
from phasestream.simulators.beamline_scans import BeamlineCase, simulate_beamline_scan
from phasestream.simulators.foreign_layouts import ForeignLayout, write_foreign_cxi

pytestmark = pytest.mark.slow

# (no probe given, true probe given), measured on 2026-12-07 with ``phasestream bench beamline`` (the
# replay topology corrects positions from epoch 20); see docs/benchmarks.md.
MEASURED = {
    BeamlineCase.FZP_FOCUS: (0.104, 0.122),
    BeamlineCase.FZP_DEFOCUS: (0.063, 0.085),
    BeamlineCase.KB_FOCUS: (0.099, 0.131),
    BeamlineCase.FILL_30: (0.072, 0.069),
    BeamlineCase.FILL_70: (0.086, 0.077),
    BeamlineCase.DEAD_HOT_PIXELS: (0.062, 0.064),
    BeamlineCase.MODULE_GAPS: (0.071, 0.076),
    BeamlineCase.BEAM_STOP: (0.064, 0.066),
    BeamlineCase.BACKGROUND: (0.067, 0.070),
    BeamlineCase.POSITION_ERRORS: (0.068, 0.054),
}
MARGIN = 0.05


@pytest.mark.parametrize("case", list(BeamlineCase))
def test_a_scan_no_one_here_made_reconstructs_without_its_probe(case: BeamlineCase, tmp_path: Path) -> None:
    auto = replay_case(case, tmp_path / "auto", probe_given=False)
    assert "every frame accounted for" in auto.console, auto.console[-3000:]
    assert auto.probe_start.startswith("auto:"), auto.console[-3000:]
    assert auto.stop_reason.startswith("converged"), auto.stop_reason
    assert auto.object_error < max(MEASURED[case]) + MARGIN, (case, auto.object_error, auto.probe_start)

    given = replay_case(case, tmp_path / "given", probe_given=True)
    if given.layout is not ForeignLayout.PTYPY:  # PtyPy's layout keeps no probe: it is given with --probe
        assert "starting from the probe stored in" in given.console
    assert given.probe_start.startswith("file "), given.console[-3000:]
    assert given.object_error < max(MEASURED[case]) + MARGIN, (case, given.object_error)


# ---- previous: two scans in one ``phasestream run`` ------------------------------------------------------
def _topology(folder: Path) -> Path:
    with open(Path(__file__).resolve().parents[1] / "deploy" / "replay.yaml") as file:
        topology = yaml.safe_load(file)
    topology.update(
        name="previous",
        run_dir=str(folder / "run"),
        exit_after_scan=False,
        tiled={"data_dir": str(folder / "tiled")},
        detector={
            "data_endpoint": f"ipc://{folder}/data.sock",
            "positions_endpoint": f"ipc://{folder}/positions.sock",
        },
    )
    for stage in topology["stages"]:
        if stage["stage"] == "publish":
            stage["config"] = {"results_dir": str(folder / "results")}
    path = folder / "previous.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path


def _lines(process: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for(lines: queue.Queue, text: str, seen: list[str], timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if text in line:
            return line
    pytest.fail(f"no line with {text!r} within {timeout_s} s:\n{''.join(seen[-40:])}")


def test_previous_starts_the_second_scan_from_the_first_scans_probe(tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="ps-prev-", dir="/tmp"))  # ipc paths must stay short
    files = []
    for seed in (1, 2):  # two samples under the same beam
        scan = simulate_beamline_scan(BeamlineCase.FZP_DEFOCUS, 120, seed=seed)
        path = tmp_path / f"scan-{seed}.cxi"
        write_foreign_cxi(path, scan, ForeignLayout.CXIDB, float_intensities=True, with_probe=False)
        files.append((scan, path))
    topology = _topology(folder)
    command = [sys.executable, "-m", "phasestream", "run", str(topology), "--probe", "previous"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, seen = _lines(run), []
    try:
        _wait_for(lines, "Ctrl-C stops every stage", seen)
        errors, starts, stored = [], [], []
        for index, (scan, path) in enumerate(files):
            uid = f"previous-{index}"
            replay = [sys.executable, "-m", "phasestream", "replay", str(path), "--as-fast-as-possible"]
            replay += ["--no-progress", "--scan-uid", uid]
            replay += ["--data-endpoint", f"ipc://{folder}/data.sock"]
            replay += ["--positions-endpoint", f"ipc://{folder}/positions.sock"]
            subprocess.run(replay, check=True, timeout=300, capture_output=True)
            starts.append(_wait_for(lines, f"scan {uid}: probe from", seen))
            _wait_for(lines, f"scan {uid}: result written", seen)
            result = read_result_file(folder / "results" / f"reconstruction-{uid}.cxi")
            errors.append(object_error(scan, result.object, result.origin_m))
            # What the next scan with this geometry starts from: this scan's final probe.
            (kept,) = (folder / "run" / "probes" / "refine").glob("*.npy")
            stored.append((np.load(kept), result.probe))
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=120)  # every stage flushes its results and metrics first
        shutil.rmtree(folder, ignore_errors=True)
    assert "no previous probe for this geometry" in "".join(seen)
    assert "probe from auto" in starts[0]
    assert "probe from previous" in starts[1]
    kept_after_first, final_of_first = stored[0]
    np.testing.assert_allclose(kept_after_first.reshape(final_of_first.shape), final_of_first, rtol=1e-5)
    assert all(error < max(MEASURED[BeamlineCase.FZP_DEFOCUS]) + MARGIN for error in errors), errors

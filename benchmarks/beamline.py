"""``phasestream bench beamline``: scans of real beamlines' probes and detector effects, replayed end to end.

Each case (``simulators.beamline_scans.BeamlineCase``: zone plates in focus and defocused, a KB focus,
probes filling 30 % and 70 % of the window, dead and hot pixels, module gaps, a beam stop, a flat
background, position errors) is written as a CXI file in another tool's layout with plain h5py
(``simulators.foreign_layouts``; float32 intensities in every other case) and replayed with
``phasestream replay FILE --pipeline`` in a fresh process, twice: with no probe given (the automatic
start) and with the true probe stored in the file. The object error against the truth is taken after
removing the global phase, the phase ramp and the sub-pixel shift, over the well-illuminated region.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from phasestream_bench.ingest import machine_description

from phasestream.apps.demo_figure import compare_with_truth
from phasestream.errors import PhasestreamError
from phasestream.formats.result_file import read_result_file
from phasestream.simulators.beamline_scans import BeamlineCase, BeamlineScan, simulate_beamline_scan
from phasestream.simulators.foreign_layouts import ForeignLayout, write_foreign_cxi

LAYOUTS = tuple(ForeignLayout)
# Long enough for a scan of a few hundred small frames to converge on 2 cores, with room to spare.
REPLAY_TIMEOUT_S = 900
_PROBE_START = re.compile(r"probe_start: scan \S+: probe from (?P<label>.+?) \(")


@dataclass(frozen=True)
class ReplayOutcome:
    """One replay of one case: the start refine took, how it ended, the error against the truth."""

    case: BeamlineCase
    layout: ForeignLayout
    float_intensities: bool
    probe_given: bool
    probe_start: str
    epochs: int
    stop_reason: str
    object_error: float
    wall_s: float
    console: str


def case_file(
    case: BeamlineCase, folder: Path, *, with_probe: bool, n_positions: int, seed: int = 0
) -> tuple:
    """The case's scan and its CXI file (layout and dtype fixed by the case's place in the list)."""
    index = list(BeamlineCase).index(case)
    layout, float_intensities = LAYOUTS[index % len(LAYOUTS)], index % 2 == 0
    scan = simulate_beamline_scan(case, n_positions, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_foreign_cxi(
        folder / f"{case}.cxi", scan, layout, float_intensities=float_intensities, with_probe=with_probe
    )
    return scan, path, layout, float_intensities


def replay_case(
    case: BeamlineCase, folder: Path, *, probe_given: bool, n_positions: int = 150, seed: int = 0
) -> ReplayOutcome:
    """Write the case's file and reconstruct it with ``phasestream replay --pipeline`` in a new process."""
    scan, path, layout, float_intensities = case_file(
        case, folder, with_probe=probe_given, n_positions=n_positions, seed=seed
    )  # a PtyPy-layout file holds no probe: see below
    command = [sys.executable, "-m", "phasestream", "replay", str(path), "--pipeline"]
    command += ["--as-fast-as-possible", "--no-progress", "--out", str(folder)]
    if probe_given and layout is ForeignLayout.PTYPY:
        # PtyPy's scan layout has no probe: it comes from a file of its own, as from a .ptyr.
        np.save(folder / "probe.npy", scan.probe_truth)
        command += ["--probe", str(folder / "probe.npy")]
    if layout is not ForeignLayout.CXIDB and scan.bad_pixel_mask.any():
        # Only the CXI reference layout keeps a mask in the file; the others come with one beside it.
        np.save(folder / "mask.npy", scan.bad_pixel_mask)
        command += ["--mask", str(folder / "mask.npy")]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S)
    wall_s = time.perf_counter() - started
    console = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise PhasestreamError(f"replay of {case} exited with {completed.returncode}:\n{console[-4000:]}")
    result = read_result_file(next(folder.glob("reconstruction-*.cxi")))
    start = _PROBE_START.search(console)
    return ReplayOutcome(
        case=case,
        layout=layout,
        float_intensities=float_intensities,
        probe_given=probe_given,
        probe_start=start["label"] if start else "?",
        epochs=result.epochs,
        stop_reason=result.stop_reason,
        object_error=object_error(scan, result.object, result.origin_m),
        wall_s=wall_s,
        console=console,
    )


def object_error(scan: BeamlineScan, obj: np.ndarray, origin_m: tuple[float, float]) -> float:
    """Error against the truth after the global phase, phase ramp and sub-pixel shift are removed."""

    return compare_with_truth(scan, {"object": obj, "metadata": {"origin_m": origin_m}}).error


def bench_beamline(folder: Path, n_positions: int = 150, cases: tuple[BeamlineCase, ...] = ()) -> list:
    """Every case with no probe given and with the true probe; prints the table for docs/benchmarks.md."""

    outcomes = []
    for case in cases or tuple(BeamlineCase):
        for probe_given in (False, True):
            outcome = replay_case(
                case, folder / f"{case}-{'given' if probe_given else 'auto'}",
                probe_given=probe_given, n_positions=n_positions,
            )  # fmt: skip
            print(format_row(outcome), flush=True)
            outcomes.append(outcome)
    print(f"\nmachine: {machine_description()}")
    return outcomes


TABLE_HEADER = (
    "| case | layout, intensities | probe | start chosen | epochs | stop | object error | wall s |\n"
    "|---|---|---|---|---|---|---|---|"
)


def format_row(outcome: ReplayOutcome) -> str:
    stop = (
        "converged" if outcome.stop_reason.startswith("converged") else outcome.stop_reason.split(" after")[0]
    )
    dtype = "float32" if outcome.float_intensities else "uint32"
    return (
        f"| {outcome.case} | {outcome.layout}, {dtype} | {'given' if outcome.probe_given else 'auto'} | "
        f"{outcome.probe_start} | {outcome.epochs} | {stop} | {outcome.object_error:.3f} | "
        f"{outcome.wall_s:.0f} |"
    )

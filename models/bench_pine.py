"""PINE against ePIE and rPIE on a low-dose simulated scan: resolution (FRC against the truth) per iteration.

The claim under test (Yamada et al. 2024): PINE reaches, in at most 150 iterations, the Fourier ring
correlation that ePIE and rPIE reach in 300. Every solver starts from the same blank object with the true
probe held fixed, so the comparison is about the object update alone; the FRC is taken between the
reconstruction and the truth over the centre of the scanned field, under a Hann window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from phasestream.models.epie import EpieSolver, EpieVariant, UpdateRule
from phasestream.models.quality import FrcCurve, FrcThreshold, frc, frc_resolution, half_bit_threshold
from phasestream.simulators.samples import SampleKind
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan


@dataclass
class ConvergenceTrace:
    """One solver's resolution after every ``every`` iterations, and its final FRC curve."""

    name: str
    iterations: list[int] = field(default_factory=list)
    resolution_px: list[float] = field(default_factory=list)
    mean_frc: list[float] = field(default_factory=list)
    final_curve: FrcCurve | None = None
    seconds: float = 0.0


def low_dose_scan(n_positions: int, photons_per_frame: float, seed: int) -> SimulatedScan:
    """A Siemens star under a 24-px zone-plate probe on a 64-px detector, at ``photons_per_frame``."""
    return simulate_scan(
        ScanSimulationConfig(
            detector_size_px=64, probe_diameter_px=24, probe_bright_field_diameter_px=32,
            n_positions=n_positions, photons_per_frame=photons_per_frame, sample=SampleKind.SIEMENS_STAR,
            overlap_fraction=0.7, seed=seed,
        )
    )  # fmt: skip


def field_of_view(scan: SimulatedScan) -> tuple[slice, slice]:
    """The largest centred square well inside the scanned positions (the probe's radius in from the edge)."""
    centres = scan.positions_object_px()
    radius_px = scan.config.probe_diameter_px / 2
    low = np.ceil(centres.min(axis=0) + radius_px).astype(int)
    high = np.floor(centres.max(axis=0) - radius_px).astype(int)
    side = int((high - low).min()) // 2 * 2
    middle = (low + high) // 2
    return tuple(slice(m - side // 2, m + side // 2) for m in middle)


def frc_against_truth(estimate: np.ndarray, truth: np.ndarray, view: tuple[slice, slice]) -> FrcCurve:
    """FRC of the estimate, times the complex scalar that best matches the truth, against the truth.

    With the probe known there is no shift or phase-ramp ambiguity, but the object's global phase is
    still free where the data are weak; the scalar removes it (and any small amplitude scale).
    """
    estimate, truth = estimate[view], truth[view]
    scale = np.vdot(estimate, truth) / max(np.vdot(estimate, estimate).real, np.finfo(float).tiny)
    window = np.outer(*(np.hanning(s.stop - s.start) for s in view))
    return frc(scale * estimate * window, truth * window)


def run_trace(
    name: str, solver: EpieSolver, scan: SimulatedScan, iterations: int, every: int, progress: bool
) -> ConvergenceTrace:
    import time

    window_px = scan.config.detector_size_px
    corners_px = scan.positions_object_px() - window_px // 2
    solver.add_patterns(scan.frames, corners_px)
    view = field_of_view(scan)
    trace = ConvergenceTrace(name)
    start_s = time.perf_counter()
    for iteration in tqdm(range(1, iterations + 1), desc=name, disable=not progress, leave=False):
        solver.run_epoch()
        if iteration % every == 0 or iteration == iterations:
            curve = frc_against_truth(solver.object, scan.object_truth, view)
            trace.iterations.append(iteration)
            trace.resolution_px.append(frc_resolution(curve, FrcThreshold.HALF_BIT))
            trace.mean_frc.append(float(curve.correlation[1:].mean()))
            trace.final_curve = curve
    trace.seconds = time.perf_counter() - start_s
    return trace


def bench_pine(
    *,
    n_positions: int = 200,
    photons_per_frame: float = 2e3,
    long_iterations: int = 300,
    pine_iterations: int = 150,
    every: int = 10,
    seed: int = 0,
    denoiser: torch.nn.Module | None = None,
    figure: Path | None = None,
    progress: bool = True,
) -> dict[str, ConvergenceTrace]:
    """ePIE and rPIE for ``long_iterations``, PINE for ``pine_iterations``, on one low-dose scan."""
    from phasestream.models.pine import pine_solver

    scan = low_dose_scan(n_positions, photons_per_frame, seed)
    common = {
        "probe": scan.probe_truth, "variant": EpieVariant.SEQUENTIAL, "probe_update_start_epoch": None,
        "object_guess": np.ones_like(scan.object_truth), "seed": seed, "device": "cpu",
    }  # fmt: skip
    solvers = {
        "ePIE": (EpieSolver(**common), long_iterations),
        "rPIE": (EpieSolver(update_rule=UpdateRule.RPIE, **common), long_iterations),
        "PINE": (pine_solver(denoiser, **common), pine_iterations),
    }
    traces = {
        name: run_trace(name, solver, scan, iterations, every, progress)
        for name, (solver, iterations) in solvers.items()
    }
    if figure is not None:
        draw_traces(traces, scan, figure)
    return traces


def draw_traces(traces: dict[str, ConvergenceTrace], scan: SimulatedScan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixel_nm = scan.object_pixel_size_m * 1e9
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for trace in traces.values():
        left.plot(trace.iterations, np.asarray(trace.resolution_px) * pixel_nm, marker=".", label=trace.name)
        curve = trace.final_curve
        right.plot(
            curve.frequency_per_px / pixel_nm,
            curve.correlation,
            label=f"{trace.name}, {trace.iterations[-1]} it.",
        )
    rings = traces["ePIE"].final_curve
    right.plot(
        rings.frequency_per_px / pixel_nm,
        half_bit_threshold(rings.n_pixels),
        "k--",
        label="half-bit threshold",
    )
    left.set(xlabel="iteration", ylabel="half-bit FRC resolution (nm, lower is better)")
    left.set_title(f"{scan.config.photons_per_frame:.0e} photons per frame, {len(scan.frames)} positions")
    right.set(xlabel="spatial frequency (1/nm)", ylabel="FRC against the truth", ylim=(-0.1, 1.05))
    right.set_title("final FRC curves")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""PINE against ePIE and rPIE on a low-dose simulated scan: resolution (FRC against the truth) per iteration.

The claim under test (Yamada et al. 2024): PINE reaches, in at most 150 iterations, the Fourier ring
correlation that ePIE and rPIE reach in 300. Every solver starts from the same blank object, with the true
probe held fixed (``ProbeStart.KNOWN``: the comparison is about the object update alone) or from a blurred
probe that each solver reconstructs (``ProbeStart.RECONSTRUCTED``); the FRC is taken between the
reconstruction and the truth over the centre of the scanned field, under a Hann window. PINE runs as long
as ePIE and is read at ``pine_iterations`` and at the end: its random order is seeded, so the first 150
sweeps of a 300-sweep run are the 150-sweep run.

:func:`bench_pine_seeds` repeats the comparison over several scans (photon noise and sweep order drawn from
the seed) and tabulates half-bit resolution and mean FRC at given iterations; :func:`rpie_alpha_study`
follows the error of rPIE (Maiden, Johnson and Li, Optica 4, 736, 2017, its object update with
denominator (1 − α)|P|² + α max|P|²) for several α, to show where its steps amplify photon noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from phasestream.models.ptycho.epie import EpieSolver, ObjectRegulariser
from phasestream.models.ptycho.options import EpieOptions, EpieVariant, FourierConstraint, UpdateRule
from phasestream.models.ptycho.pine import pine_solver
from phasestream.models.quality import FrcCurve, FrcThreshold, frc, frc_resolution, half_bit_threshold
from phasestream.simulators.samples import SampleKind
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan

DEFAULT_OVERLAP = 0.7


class BenchSolver(StrEnum):
    EPIE = "ePIE"
    RPIE = "rPIE"
    PINE = "PINE"


@dataclass
class ConvergenceTrace:
    """One solver's resolution and error after every ``every`` iterations, and its final FRC curve.

    ``nrmse`` is ‖c·O − T‖ / ‖T‖ over the field of view, c the complex scalar that best matches O to the
    truth T (the free global phase and scale).
    """

    name: str
    iterations: list[int] = field(default_factory=list)
    resolution_px: list[float] = field(default_factory=list)
    mean_frc: list[float] = field(default_factory=list)
    nrmse: list[float] = field(default_factory=list)
    final_curve: FrcCurve | None = None
    seconds: float = 0.0

    def at(self, iteration: int) -> tuple[float, float]:
        """(half-bit resolution in px, mean FRC) recorded at ``iteration``."""
        index = self.iterations.index(iteration)
        return self.resolution_px[index], self.mean_frc[index]


@dataclass(frozen=True)
class SummaryRow:
    """Mean and standard deviation over seeds of one solver's figures at one iteration."""

    solver: str
    iteration: int
    resolution_px: tuple[float, float]
    mean_frc: tuple[float, float]
    n_seeds: int


def low_dose_scan(
    n_positions: int, photons_per_frame: float, seed: int, overlap_fraction: float = DEFAULT_OVERLAP
) -> SimulatedScan:
    """A Siemens star under a 24-px zone-plate probe on a 64-px detector, at ``photons_per_frame``."""
    return simulate_scan(
        ScanSimulationConfig(
            detector_size_px=64, probe_diameter_px=24, probe_bright_field_diameter_px=32,
            n_positions=n_positions, photons_per_frame=photons_per_frame, sample=SampleKind.SIEMENS_STAR,
            overlap_fraction=overlap_fraction, seed=seed,
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


def _best_scale(estimate: np.ndarray, truth: np.ndarray) -> complex:
    return np.vdot(estimate, truth) / max(np.vdot(estimate, estimate).real, np.finfo(float).tiny)


def frc_against_truth(estimate: np.ndarray, truth: np.ndarray, view: tuple[slice, slice]) -> FrcCurve:
    """FRC of the estimate, times the complex scalar that best matches the truth, against the truth.

    With the probe known there is no shift or phase-ramp ambiguity, but the object's global phase is
    still free where the data are weak; the scalar removes it (and any small amplitude scale).
    """
    estimate, truth = estimate[view], truth[view]
    window = np.outer(*(np.hanning(s.stop - s.start) for s in view))
    return frc(_best_scale(estimate, truth) * estimate * window, truth * window)


def nrmse_against_truth(estimate: np.ndarray, truth: np.ndarray, view: tuple[slice, slice]) -> float:
    """‖c·O − T‖ / ‖T‖ over ``view``, c the best complex scalar."""
    estimate, truth = estimate[view], truth[view]
    residual = _best_scale(estimate, truth) * estimate - truth
    return float(np.linalg.norm(residual) / np.linalg.norm(truth))


def run_trace(
    name: str, solver: EpieSolver, scan: SimulatedScan, iterations: int, every: int, progress: bool
) -> ConvergenceTrace:
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
            trace.nrmse.append(nrmse_against_truth(solver.object, scan.object_truth, view))
            trace.final_curve = curve
    trace.seconds = time.perf_counter() - start_s
    return trace


@dataclass(frozen=True)
class BenchStart:
    """What every solver of one benchmark run starts from: its options, its probe and its object."""

    options: EpieOptions
    probe: np.ndarray
    object_guess: np.ndarray

    def solver(self, regulariser: ObjectRegulariser | None = None, **changes: Any) -> EpieSolver:
        """A solver from this start, ``changes`` made to its options (as :meth:`EpieOptions.replace`)."""
        return EpieSolver(
            self.options.replace(**changes), probe=self.probe, object_guess=self.object_guess,
            object_regulariser=regulariser,
        )  # fmt: skip


def known_probe_start(scan: SimulatedScan, seed: int) -> BenchStart:
    """Sequential sweeps from a blank object with the true probe held fixed, on the CPU."""
    options = EpieOptions(
        probe={"update_start_epoch": None},
        execution={"variant": EpieVariant.SEQUENTIAL, "seed": seed, "device": "cpu"},
    )
    return BenchStart(options, scan.probe_truth, np.ones_like(scan.object_truth))


class ProbeStart(StrEnum):
    KNOWN = "known"  # the true probe, held fixed: the object update alone is compared
    RECONSTRUCTED = "reconstructed"  # a blurred probe, updated from epoch 2 with both scale constraints


PROBE_GUESS_BLUR_PX = 2.0


def blurred_probe(probe: np.ndarray, sigma_px: float = PROBE_GUESS_BLUR_PX) -> np.ndarray:
    """The probe under a periodic Gaussian blur of ``sigma_px``, at its own power: a guess with the right
    size and power whose fine structure (the zone plate's rings) must be reconstructed."""
    frequencies = np.fft.fftfreq(probe.shape[0])
    squared = frequencies[:, None] ** 2 + frequencies[None, :] ** 2
    guess = np.fft.ifft2(np.fft.fft2(probe) * np.exp(-2 * (np.pi * sigma_px) ** 2 * squared))
    return (guess * np.linalg.norm(probe) / np.linalg.norm(guess)).astype(np.complex64)


def reconstructed_probe_start(scan: SimulatedScan, seed: int) -> BenchStart:
    """Sequential sweeps from a blank object and a blurred probe that is updated from epoch 2 on, its power
    held and |O| ≤ 1 (:mod:`phasestream.models.ptycho.constraints`: without them ePIE's probe and object
    trade scale until the reconstruction fades at this dose)."""
    known = known_probe_start(scan, seed)
    options = known.options.replace(
        probe={"update_start_epoch": 2}, constraints={"fix_probe_power": True, "max_object_amplitude": 1.0}
    )
    return BenchStart(options, blurred_probe(scan.probe_truth), known.object_guess)


def bench_pine(
    *,
    n_positions: int = 200,
    photons_per_frame: float = 2e3,
    overlap_fraction: float = DEFAULT_OVERLAP,
    long_iterations: int = 300,
    pine_iterations: int = 300,
    every: int = 10,
    seed: int = 0,
    rpie_alpha: float = 0.1,
    probe_start: ProbeStart = ProbeStart.KNOWN,
    fourier_constraint: FourierConstraint = FourierConstraint.PROJECTION,
    denoiser: torch.nn.Module | None = None,
    figure: Path | None = None,
    progress: bool = True,
) -> dict[str, ConvergenceTrace]:
    """ePIE and rPIE for ``long_iterations``, PINE for ``pine_iterations``, on one low-dose scan."""

    scan = low_dose_scan(n_positions, photons_per_frame, seed, overlap_fraction)
    starts = {ProbeStart.KNOWN: known_probe_start, ProbeStart.RECONSTRUCTED: reconstructed_probe_start}
    start = starts[ProbeStart(probe_start)](scan, seed)
    start = BenchStart(
        start.options.replace(constraints={"fourier_constraint": fourier_constraint}), start.probe,
        start.object_guess,
    )  # fmt: skip
    rpie = {"update_rule": UpdateRule.RPIE, "object": {"rpie_alpha": rpie_alpha}}
    pine = pine_solver(start.options, denoiser=denoiser, probe=start.probe, object_guess=start.object_guess)
    solvers = {
        BenchSolver.EPIE: (start.solver(), long_iterations),
        BenchSolver.RPIE: (start.solver(**rpie), long_iterations),
        BenchSolver.PINE: (pine, pine_iterations),
    }
    traces = {
        str(name): run_trace(name, solver, scan, iterations, every, progress)
        for name, (solver, iterations) in solvers.items()
    }
    if figure is not None:
        draw_traces([traces], scan, figure)
    return traces


def summarise(runs: Sequence[dict[str, ConvergenceTrace]], checkpoints: Sequence[int]) -> list[SummaryRow]:
    """Mean and standard deviation over ``runs`` (one per seed) at every checkpoint a solver reached."""
    rows = []
    for name in runs[0]:
        for iteration in checkpoints:
            if iteration not in runs[0][name].iterations:
                continue
            values = np.array([run[name].at(iteration) for run in runs])
            # A run whose FRC never crosses the threshold has an infinite resolution: so has the mean.
            with np.errstate(invalid="ignore"):
                mean, std = values.mean(axis=0), values.std(axis=0)
            rows.append(SummaryRow(name, iteration, (mean[0], std[0]), (mean[1], std[1]), n_seeds=len(runs)))
    return rows


def format_table(rows: Sequence[SummaryRow]) -> str:
    """A Markdown table of :func:`summarise`'s rows (mean ± standard deviation over seeds)."""
    lines = ["| solver | iterations | half-bit resolution (px) | mean FRC |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.solver} | {row.iteration} | {row.resolution_px[0]:.1f} ± {row.resolution_px[1]:.1f} "
            f"| {row.mean_frc[0]:.3f} ± {row.mean_frc[1]:.3f} |"
        )
    return "\n".join(lines)


def bench_pine_seeds(
    seeds: Sequence[int],
    checkpoints: Sequence[int] = (150, 300),
    figure: Path | None = None,
    rpie_study: dict[float, ConvergenceTrace] | None = None,
    **options: object,
) -> tuple[list[SummaryRow], list[dict[str, ConvergenceTrace]]]:
    """:func:`bench_pine` once per seed; the summary at ``checkpoints`` and every run's traces."""
    runs = [bench_pine(seed=seed, **options) for seed in seeds]
    if figure is not None:
        scan = low_dose_scan(
            options.get("n_positions", 200), options.get("photons_per_frame", 2e3), seeds[0],
            options.get("overlap_fraction", DEFAULT_OVERLAP),
        )  # fmt: skip
        draw_traces(runs, scan, figure, rpie_study)
    return summarise(runs, checkpoints), runs


def rpie_alpha_study(
    alphas: Sequence[float] = (0.1, 0.3, 0.5, 1.0),
    *,
    n_positions: int = 200,
    photons_per_frame: float = 2e3,
    iterations: int = 100,
    every: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[float, ConvergenceTrace]:
    """rPIE with object weight α for each ``alphas`` (α = 1 is ePIE's denominator) on one low-dose scan."""
    scan = low_dose_scan(n_positions, photons_per_frame, seed)
    start = known_probe_start(scan, seed)
    study = {}
    for alpha in alphas:
        solver = start.solver(update_rule=UpdateRule.RPIE, object={"rpie_alpha": alpha})
        study[alpha] = run_trace(f"α = {alpha:g}", solver, scan, iterations, every, progress)
    return study


def draw_traces(
    runs: Sequence[dict[str, ConvergenceTrace]],
    scan: SimulatedScan,
    path: Path,
    rpie_study: dict[float, ConvergenceTrace] | None = None,
) -> None:
    """Mean FRC and half-bit resolution per iteration (mean over ``runs``), the first run's final FRC
    curves, and, given a :func:`rpie_alpha_study`, rPIE's error per iteration for each α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixel_nm = scan.object_pixel_size_m * 1e9
    n_panels = 4 if rpie_study is not None else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4.5))
    frc_ax, resolution_ax, curve_ax = axes[:3]
    for name, trace in runs[0].items():
        mean_frc = np.mean([run[name].mean_frc for run in runs], axis=0)
        resolution_nm = np.mean([run[name].resolution_px for run in runs], axis=0) * pixel_nm
        frc_ax.plot(trace.iterations, mean_frc, marker=".", label=name)
        resolution_ax.plot(trace.iterations, resolution_nm, marker=".", label=name)
        curve = trace.final_curve
        curve_ax.plot(
            curve.frequency_per_px / pixel_nm, curve.correlation, label=f"{name}, {trace.iterations[-1]} it."
        )
    rings = runs[0][BenchSolver.EPIE].final_curve
    curve_ax.plot(
        rings.frequency_per_px / pixel_nm, half_bit_threshold(rings.n_pixels), "k--", label="half-bit"
    )
    seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else "one seed"
    frc_ax.set(xlabel="iteration", ylabel="mean FRC against the truth (higher is better)")
    frc_ax.set_title(
        f"{scan.config.photons_per_frame:g} photons/frame, {len(scan.frames)} positions, {seeds}"
    )
    resolution_ax.set(xlabel="iteration", ylabel="half-bit FRC resolution (nm, lower is better)")
    curve_ax.set(xlabel="spatial frequency (1/nm)", ylabel="FRC against the truth", ylim=(-0.1, 1.05))
    curve_ax.set_title("final FRC curves, first seed")
    if rpie_study is not None:
        study_ax = axes[3]
        for trace in rpie_study.values():
            study_ax.plot(trace.iterations, trace.nrmse, marker=".", label=f"rPIE {trace.name}")
        study_ax.set(xlabel="iteration", ylabel="‖c·O − T‖ / ‖T‖ over the field (lower is better)")
        study_ax.set_title("rPIE object weight α, same scan")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Speed of the ePIE kernels on a simulated scan, for ``phasestream bench`` and ``docs/benchmarks.md``.

Timings are measured here and reported as medians, never asserted in tests (docs/benchmarks.md records them).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from phasestream.errors import ConfigError
from phasestream.models.cdi.options import CdiOptions
from phasestream.models.cdi.phasing import CdiSolver
from phasestream.models.execution import default_device
from phasestream.models.physics import far_field
from phasestream.models.ptycho.epie import EpieSolver
from phasestream.models.ptycho.options import DEFAULT_BATCH_SIZE, EpieOptions, EpieVariant, UpdateRule
from phasestream.models.ptycho.pine import pine_solver

GOLDEN_ANGLE_RAD = np.pi * (3.0 - np.sqrt(5.0))
HEXAGONAL_SPACING_PER_SPIRAL_CONSTANT = np.sqrt(2.0 * np.pi / np.sqrt(3.0))
"""A Fermat spiral r = a√k holds one point per area π a²; packed hexagonally that is a nearest-neighbour
distance of sqrt(2π/√3) · a ≈ 1.90 a."""
BENCH_CDI = CdiOptions(
    support={"shrink_wrap": True}, schedule={"hio_iterations": 180, "er_iterations": 20, "cycles": 3}
)
"""HIO/ER with shrink-wrap, (180 HIO + 20 ER) × 3: the 600 iterations the AutoPhaseNN comparison quotes."""


@dataclass(frozen=True)
class SimulatedScan:
    """Ground truth and noise-free data of a simulated far-field scan (the project's centred convention)."""

    object: np.ndarray
    """complex64 (ny, nx) canvas holding every probe window."""
    probe: np.ndarray
    """complex64 (size_px, size_px)."""
    top_left_px: np.ndarray
    """int64 (n, 2) window corners (y, x) in the object canvas."""
    intensities: np.ndarray
    """float32 (n, size_px, size_px) centred patterns |far_field(P · O_window)|²."""


def disk_probe(size_px: int, *, diameter_px: float, defocus_phase_rad: float = 3.0) -> np.ndarray:
    """A pinhole-like disk with a quadratic (defocus) phase reaching ``defocus_phase_rad`` at its rim.

    The curvature spreads the far field over the detector instead of one bright central speckle, which
    makes ptychographic probe retrieval better conditioned.
    """
    coordinate_px = np.arange(size_px) - (size_px - 1) / 2
    radius_squared = (coordinate_px[:, None] ** 2 + coordinate_px[None, :] ** 2) / (diameter_px / 2) ** 2
    return ((radius_squared <= 1) * np.exp(1j * defocus_phase_rad * radius_squared)).astype(np.complex64)


def smooth_random_object(
    shape_px: tuple[int, int], rng: np.random.Generator, *, feature_px: float = 3.0
) -> np.ndarray:
    """Random complex transmission: amplitude in [0.5, 1], phase in [-1, 1] rad, features ~feature_px wide."""

    def smooth_field() -> np.ndarray:
        frequency_y = np.fft.fftfreq(shape_px[0])[:, None]
        frequency_x = np.fft.fftfreq(shape_px[1])[None, :]
        low_pass = np.exp(-2 * (np.pi * feature_px) ** 2 * (frequency_y**2 + frequency_x**2))
        field = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape_px)) * low_pass).real
        return (field - field.min()) / (field.max() - field.min())

    amplitude = 0.5 + 0.5 * smooth_field()
    phase_rad = 2 * smooth_field() - 1
    return (amplitude * np.exp(1j * phase_rad)).astype(np.complex64)


def spiral_corners_px(n_positions: int, step_px: float, margin_px: int = 2) -> np.ndarray:
    """Integer window corners on a Fermat spiral whose nearest neighbours are about ``step_px`` apart.

    A spiral rather than a raster: raster scans let ePIE with probe retrieval grow periodic artefacts.
    """
    spiral_constant_px = step_px / HEXAGONAL_SPACING_PER_SPIRAL_CONSTANT
    index = np.arange(n_positions)
    radius_px = spiral_constant_px * np.sqrt(index)
    angle_rad = index * GOLDEN_ANGLE_RAD
    centres_px = np.stack([radius_px * np.sin(angle_rad), radius_px * np.cos(angle_rad)], axis=1)
    corners_px = np.rint(centres_px - centres_px.min(axis=0)).astype(np.int64)
    return corners_px + margin_px


def simulate_scan(
    n_positions: int = 516, size_px: int = 128, *, overlap: float = 0.7, seed: int = 0
) -> SimulatedScan:
    """Noise-free far-field ptychography: disk probe of half the window, spiral scan with linear overlap
    ``overlap`` (1 − step / probe diameter), smooth random complex object."""
    if not 0 <= overlap < 1:
        raise ConfigError(f"overlap={overlap!r} must be in [0, 1): it is 1 - step / probe diameter")
    rng = np.random.default_rng(seed)
    diameter_px = size_px / 2
    probe = disk_probe(size_px, diameter_px=diameter_px)
    corners_px = spiral_corners_px(n_positions, step_px=diameter_px * (1 - overlap))
    canvas_shape_px = tuple(int(v) for v in corners_px.max(axis=0) + size_px + 2)
    obj = smooth_random_object(canvas_shape_px, rng)
    windows = np.stack([obj[y : y + size_px, x : x + size_px] for y, x in corners_px])
    intensities = far_field(torch.from_numpy(windows * probe)).abs().square().numpy()
    return SimulatedScan(obj, probe, corners_px, intensities.astype(np.float32))


def machine_description(device: torch.device) -> str:
    """What the figures were measured on, for docs/benchmarks.md."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    processor = platform.processor() or platform.machine()
    return f"{processor}, {os.cpu_count()} logical CPUs, {platform.system()}, torch {torch.__version__}"


def bench_epie(
    n_positions: int = 516,
    size_px: int = 128,
    *,
    batched: bool = True,
    epochs: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    algorithm: str = "epie",
    probe_modes: int = 1,
    position_correction: bool = False,
) -> dict:
    """Seconds per ePIE epoch (probe update on) on a simulated scan; one untimed warm-up epoch first.

    ``algorithm`` "rpie" times rPIE and "pine" PINE (ePIE plus the shipped denoiser after every epoch)
    instead of ePIE with the same scan and settings; ``probe_modes`` and ``position_correction`` time the
    general path (mixed states, sub-pixel windows, position refinement from the first epoch).

    ``num_threads`` is torch's intra-op thread count during the epochs; by default the solver's choice
    (see :class:`EpieSolver`): 1 for the sequential variant on a CPU, else torch's (one per core).
    """
    if epochs < 1:
        raise ConfigError(f"epochs={epochs!r} must be at least 1")
    if algorithm not in ("epie", "rpie", "pine"):
        raise ConfigError(f"algorithm={algorithm!r}: use epie, rpie or pine")
    scan = simulate_scan(n_positions, size_px)
    resolved_device = default_device(device)
    variant = EpieVariant.BATCHED if batched else EpieVariant.SEQUENTIAL
    options = EpieOptions(
        update_rule=UpdateRule.RPIE if algorithm == "rpie" else UpdateRule.EPIE,
        probe={"modes": probe_modes, "update_start_epoch": 0},
        positions={"correction_start_epoch": 0 if position_correction else None},
        execution={
            "variant": variant, "batch_size": batch_size, "device": str(resolved_device),
            "num_threads": num_threads,
        },
    )  # fmt: skip
    # PINE's denoiser is the shipped one, on the options' device.
    solver = pine_solver(options) if algorithm == "pine" else EpieSolver(options)
    solver.add_patterns(scan.intensities, scan.top_left_px)
    seconds_per_epoch, error = _timed_epochs(solver, epochs, f"{algorithm} {variant}", progress)
    return {
        "variant": str(variant),
        "algorithm": algorithm,
        "probe_modes": probe_modes,
        "position_correction": position_correction,
        "device": str(resolved_device),
        "machine": machine_description(resolved_device),
        "n_positions": n_positions,
        "size_px": size_px,
        "batch_size": batch_size if batched else 1,
        "num_threads": solver.num_threads or torch.get_num_threads(),
        "seconds_per_epoch": seconds_per_epoch,
        "median_s_per_epoch": statistics.median(seconds_per_epoch),
        "final_error": error,
    }


def _timed_epochs(solver: EpieSolver, epochs: int, label: str, progress: bool) -> tuple[list[float], float]:
    """Seconds of each of ``epochs`` epochs after one untimed warm-up epoch, and the last epoch's error."""
    solver.run_epoch()
    seconds_per_epoch = []
    error = float("nan")
    bar = tqdm(range(epochs), desc=label, unit="epoch", disable=not progress)
    for _ in bar:
        started_s = time.perf_counter()
        error = solver.run_epoch()
        seconds_per_epoch.append(time.perf_counter() - started_s)
        bar.set_postfix(error=f"{error:.3g}")
    return seconds_per_epoch, error


def bench_cdi(amplitude_path: str, options: CdiOptions = BENCH_CDI) -> dict:
    """HIO/ER on a measured 64³ Bragg CDI amplitude with ``options`` (default :data:`BENCH_CDI`), timed
    cycle by cycle of ``options.schedule``.

    The support starts as the autocorrelation's support at 4 % of its peak, the usual loose start.
    """
    amplitude = np.load(amplitude_path).astype(np.float32)
    autocorrelation = np.abs(np.fft.ifftn(np.fft.ifftshift(amplitude.astype(np.float64) ** 2)))
    support = np.fft.fftshift(autocorrelation > 0.04 * autocorrelation.max())
    solver = CdiSolver(amplitude, support, options)
    cycle = options.schedule.replace(cycles=1).steps()
    started = time.perf_counter()
    for _ in tqdm(range(options.schedule.cycles), desc="HIO/ER 64³", unit="cycle"):
        solver.run(cycle)
    elapsed_s = time.perf_counter() - started
    errors = solver.fourier_errors
    return {
        "iterations": len(errors),
        "seconds": elapsed_s,
        "seconds_per_iteration": elapsed_s / len(errors),
        "first_chi2": float(errors[0]),
        "final_chi2": float(errors[-1]),
        "device": str(solver.device),
        "machine": machine_description(solver.device),
    }

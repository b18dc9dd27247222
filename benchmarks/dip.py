"""DIP benchmarks: LoDIP, HIO-stat and double DIP on simulated in-situ CDI (PSNR), and DIP denoise speed.

``bench_lodip`` repeats Manekar et al.'s Table 1 comparison (mean PSNR over simulated samples at 1,000 and
at 1 photon per pixel) on sizes a CPU can hold, beside the paper's figures. PSNR is taken over the sample
support, with the sample in units of transmission (range 1). LoDIP and HIO-stat know the static region,
which fixes the position, the twin and the global phase; double DIP does not, so its object is first
aligned to the true exit wave (twin image or not, whole-pixel shift, global phase) and then scored the same
way. ``bench_dip_denoise`` times whole ES-WMV denoises of a noisy dead-leaves image per architecture.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from phasestream.errors import ConfigError
from phasestream.models.cdi.double_dip import double_dip
from phasestream.models.cdi.lodip import hio_stat, lodip, reconstruct_static, static_in_pattern_units
from phasestream.models.cdi.options import DoubleDipOptions, HioStatOptions, LodipOptions
from phasestream.models.execution import torch_threads
from phasestream.models.nets.dip import dip_denoise
from phasestream.models.nets.dip_options import DenoiseOptions, DipArchitecture, SkipNetConfig
from phasestream.models.quality import psnr
from phasestream.simulators.insitu_cdi import InSituCdiConfig, InSituCdiData, simulate_insitu_cdi
from phasestream.simulators.samples import dead_leaves_material

PAPER_TABLE_1_DB = {
    1000.0: {"HIO-stat": 37.86, "LoDIP": 40.53, "GPS": 52.32},
    1.0: {"HIO-stat": 13.88, "LoDIP": 23.56, "GPS": 25.59},
}
"""Manekar et al., Table 1: mean PSNR (dB) on 50 simulated 256 × 256 samples with a 70 × 70 support."""
METHODS = ("HIO-stat", "LoDIP", "double DIP")
BENCH_NETWORK = SkipNetConfig(channels=(16, 32, 64), skip_channels=(4, 4, 4))
"""The generator of LoDIP and double DIP here: a 3-level skip net. Erin et al.'s 5-level Arch1 needs a
64-px grid for double DIP's 32-px object and took longer per iteration and more iterations per dB on this
CPU (measured on two samples at 1,000 photons/px: 13-21 dB after 600 iterations against 27 dB)."""
BENCH_LODIP = LodipOptions(
    network={"architecture": BENCH_NETWORK}, optimisation={"max_iterations": 300},
    early_stopping={"window": 50, "patience": 150}, execution={"device": "cpu"},
)  # fmt: skip
"""LoDIP in ``bench_lodip``; its execution also runs the static region's reconstruction and HIO-stat. The
300-iteration cap and the 50-iteration ES-WMV window fit 20 samples at two doses into about 25 minutes of
one shared CPU core; they cut the fits short (LoDIP is still improving at 300 iterations at 1,000
photons/px, and a 50-iteration window lets ES-WMV settle on early plateaus), so give larger caps and the
solvers' own ES-WMV settings where there is time or a GPU."""
BENCH_DOUBLE_DIP = DoubleDipOptions(
    network={"architecture": BENCH_NETWORK}, optimisation={"max_iterations": 150},
    early_stopping={"window": 50, "patience": 150}, execution={"device": "cpu"},
)  # fmt: skip
"""Double DIP in ``bench_lodip``."""
BENCH_DENOISE = DenoiseOptions(optimisation={"max_iterations": 1000}, execution={"device": "cpu"})
"""The DIP of ``bench_dip_denoise`` (the network is each architecture benchmarked)."""
DENOISE_NOISE_STD = 0.1
"""Gaussian noise on the [0, 1] dead-leaves image that ``bench_dip_denoise`` cleans."""


@dataclass
class DoseResult:
    """PSNR (dB) and seconds per sample of every method at one dose."""

    photons_per_px: float
    psnr_db: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in METHODS})
    seconds: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in METHODS})
    stop_iterations: dict[str, list[int]] = field(default_factory=lambda: {"LoDIP": [], "double DIP": []})
    incident_photons_per_px: list[float] = field(default_factory=list)


def sample_psnr(sample: np.ndarray, data: InSituCdiData) -> float:
    """PSNR over the sample support of a sample given in the pattern's amplitude units (range 1)."""
    support = data.sample_support
    return psnr(sample[support] / data.sample_scale, data.sample_truth[support], data_range=1.0)


def twin(image: np.ndarray) -> np.ndarray:
    """x*(−r) on the periodic grid: the image with the same Fourier modulus, mirrored through pixel 0."""
    return np.conj(np.roll(np.flip(image), 1, axis=(0, 1)))


def align_to_truth(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The estimate or its twin, shifted by whole pixels and multiplied by the global phase that best
    matches ``truth`` (the CDI ambiguities of a reconstruction without a reference)."""
    best, best_error = estimate, np.inf
    truth_spectrum = np.fft.fft2(truth)
    for candidate in (estimate, twin(estimate)):
        correlation = np.fft.ifft2(truth_spectrum * np.conj(np.fft.fft2(candidate)))
        shift = np.unravel_index(np.argmax(np.abs(correlation)), correlation.shape)
        moved = np.roll(candidate, shift, axis=(0, 1))
        moved = moved * np.exp(1j * np.angle(np.vdot(moved, truth)))
        error = float(np.linalg.norm(moved - truth))
        if error < best_error:
            best, best_error = moved, error
    return best


def periodic_peaks(image: np.ndarray, ratio: float = 30.0, min_frequency: float = 0.08) -> set[tuple]:
    """Fourier pixels whose power exceeds ``ratio`` × the median of their 24 neighbours (5 × 5).

    A periodic pattern (a grid of period p) puts power into isolated pixels at multiples of 1/p; the
    spectrum of a natural image falls smoothly, and one Fourier pixel of a noise-like spectrum exceeds 30×
    its neighbours' median with probability about e^(−30 ln 2), so only real periodicity is found. A Hann
    window first removes the streaks that the jump between opposite edges of a non-periodic image draws
    along the axes (it widens a peak to 3 pixels, still narrow against the 5 × 5 neighbourhood). The steep
    centre (below ``min_frequency`` cycles/px) is left out. Compare the peaks of a DIP output with those of
    its input: the ones only the output has are hallucinated.
    """
    window = np.outer(np.hanning(image.shape[0]), np.hanning(image.shape[1]))
    power = np.abs(np.fft.fft2((image - image.mean()) * window)) ** 2
    neighbours = [np.roll(power, (dy, dx), (0, 1)) for dy in range(-2, 3) for dx in range(-2, 3) if dy or dx]
    score = power / (np.median(neighbours, axis=0) + np.finfo(float).tiny)
    frequency = np.hypot(np.fft.fftfreq(image.shape[0])[:, None], np.fft.fftfreq(image.shape[1])[None, :])
    rows, cols = np.nonzero((score > ratio) & (frequency >= min_frequency))
    return {(int(row), int(col)) for row, col in zip(rows, cols, strict=True)}


def _timed(function, *args, **kwargs):
    start_s = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start_s


def bench_lodip(
    n_samples: int = 20,
    photons: Sequence[float] = (1000.0, 1.0),
    *,
    size_px: int = 64,
    sample_size_px: int = 16,
    lodip_options: LodipOptions = BENCH_LODIP,
    double_dip_options: DoubleDipOptions = BENCH_DOUBLE_DIP,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
) -> dict[float, DoseResult]:
    """PSNR of HIO-stat, LoDIP and double DIP on ``n_samples`` simulated samples per dose; prints a table.

    Sample i is simulated with seed ``seed + i`` at every dose, so the doses see the same samples, and
    fitted with the options' ``execution.seed + i``. The static region and HIO-stat run on
    ``lodip_options.execution``. The defaults (:data:`BENCH_LODIP`, :data:`BENCH_DOUBLE_DIP`) cut the fits
    short to fit a CPU's budget.
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples!r} must be at least 1")
    with torch_threads(threads):
        scale = size_px / 64
        static_shape = (sample_size_px, max(2, round(12 * scale)))
        results: dict[float, DoseResult] = {}
        for photons_per_px in photons:
            dose = DoseResult(float(photons_per_px))
            for index in range(n_samples):
                data = simulate_insitu_cdi(
                    InSituCdiConfig(
                        size_px=size_px, sample_size_px=sample_size_px, static_shape_px=static_shape,
                        photons_per_px=photons_per_px, seed=seed + index,
                    )
                )  # fmt: skip
                _run_one(data, dose, (lodip_options, double_dip_options), index, progress)
            results[float(photons_per_px)] = dose
        print(format_lodip_table(results, n_samples, size_px, sample_size_px))
        return results


def _run_one(
    data: InSituCdiData,
    dose: DoseResult,
    options: tuple[LodipOptions, DoubleDipOptions],
    index: int,
    progress: bool,
) -> None:
    lodip_options, double_dip_options = options
    execution = lodip_options.execution
    static_estimate, static_s = _timed(
        reconstruct_static, data.static_pattern, data.static_support, execution
    )
    static = static_in_pattern_units(
        static_estimate,
        data.static_incident_photons_per_px,
        data.incident_photons_per_px,
        data.config.illumination_ratio,
    )
    problem = (data.pattern, static, data.sample_support, data.static_support)
    baseline, hio_s = _timed(hio_stat, *problem, HioStatOptions(execution=execution))
    fitted, lodip_s = _timed(
        lodip, *problem, lodip_options.replace(execution={"seed": execution.seed + index})
    )
    double_seed = double_dip_options.execution.seed + index
    free, double_s = _timed(
        double_dip, data.pattern, double_dip_options.replace(execution={"seed": double_seed})
    )
    exit_wave = data.sample_scale * data.sample_truth + data.static_scale * data.static_truth
    aligned = align_to_truth(free.object, exit_wave)
    dose.psnr_db["HIO-stat"].append(sample_psnr(baseline, data))
    dose.psnr_db["LoDIP"].append(sample_psnr(fitted.sample, data))
    dose.psnr_db["double DIP"].append(sample_psnr(aligned, data))
    dose.seconds["HIO-stat"].append(static_s + hio_s)
    dose.seconds["LoDIP"].append(static_s + lodip_s)
    dose.seconds["double DIP"].append(double_s)
    dose.stop_iterations["LoDIP"].append(fitted.stop_iteration)
    dose.stop_iterations["double DIP"].append(free.stop_iteration)
    dose.incident_photons_per_px.append(data.incident_photons_per_px)
    if progress:
        scores = ", ".join(f"{name} {values[-1]:.2f}" for name, values in dose.psnr_db.items())
        print(f"  {dose.photons_per_px:g} ph/px, sample {index}: {scores} dB", flush=True)


def _mean_std(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def format_lodip_table(results: dict[float, DoseResult], n_samples: int, size_px: int, sample_px: int) -> str:
    """A markdown table: mean ± std PSNR per method and dose beside Manekar et al.'s Table 1."""
    lines = [
        f"{n_samples} samples, {size_px}×{size_px} array, {sample_px}×{sample_px} sample support "
        f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s))",
        "",
        "| photons/px | method | PSNR (dB), mean ± std | paper (dB) | s per sample | iterations (median) |",
        "|---|---|---|---|---|---|",
    ]
    for photons_per_px, dose in results.items():
        paper = PAPER_TABLE_1_DB.get(photons_per_px, {})
        for name in METHODS:
            stops = dose.stop_iterations.get(name)
            stop = f"{statistics.median(stops):.0f}" if stops else ""
            lines.append(
                f"| {photons_per_px:g} | {name} | {_mean_std(dose.psnr_db[name])} | "
                f"{paper.get(name, '—')} | {statistics.median(dose.seconds[name]):.1f} | {stop} |"
            )
        if "GPS" in paper:
            lines.append(f"| {photons_per_px:g} | GPS (paper only) | — | {paper['GPS']} | | |")
        incident = statistics.mean(dose.incident_photons_per_px)
        lines.append(f"| {photons_per_px:g} | (incident photons per sample pixel: {incident:.3g}) | | | | |")
    return "\n".join(lines)


@dataclass(frozen=True)
class DenoiseTiming:
    """Seconds per whole denoise (median), per iteration, and where ES-WMV stopped."""

    architecture: str
    size_px: int
    seconds_per_denoise: float
    seconds_per_iteration: float
    stop_iterations: tuple[int, ...]
    new_periodic_peaks: tuple[int, ...]
    """Spectral peaks of each output that the noisy input lacks (:func:`periodic_peaks`); 0 = none."""
    psnr_noisy_db: float
    psnr_denoised_db: float
    """Median PSNR of the outputs against the clean image."""


def bench_dip_denoise(
    *,
    architectures: Sequence[DipArchitecture | str] = (DipArchitecture.ARCH1, DipArchitecture.ARCH2),
    size_px: int = 64,
    repeats: int = 1,
    options: DenoiseOptions = BENCH_DENOISE,
    threads: int | None = 1,
) -> list[DenoiseTiming]:
    """Time ``repeats`` ES-WMV denoises of a noisy size_px² dead-leaves image per architecture, and print.

    Each architecture replaces ``options.network.architecture``; repeat r is seeded ``execution.seed + r``.
    """
    with torch_threads(threads):
        rng = np.random.default_rng(0)
        clean, _ = dead_leaves_material((size_px, size_px), rng, size_px / 32, size_px / 4)
        noisy = clean + DENOISE_NOISE_STD * rng.standard_normal(clean.shape)
        timings = []
        for architecture in architectures:
            seconds, per_iteration, stops, peaks, scores = [], [], [], [], []
            for repeat in range(repeats):
                run_options = options.replace(
                    network={"architecture": architecture},
                    execution={"seed": options.execution.seed + repeat},
                )
                result, elapsed_s = _timed(dip_denoise, noisy, run_options)
                seconds.append(elapsed_s)
                per_iteration.append(elapsed_s / result.stop_iteration)
                stops.append(result.stop_iteration)
                peaks.append(len(periodic_peaks(result.denoised) - periodic_peaks(noisy)))
                scores.append(psnr(result.denoised, clean, data_range=1.0))
            timings.append(
                DenoiseTiming(
                    str(architecture), size_px, statistics.median(seconds), statistics.median(per_iteration),
                    tuple(stops), tuple(peaks), psnr(noisy, clean, data_range=1.0), statistics.median(scores),
                )
            )  # fmt: skip
        for timing in timings:
            print(
                f"{timing.architecture} {timing.size_px}×{timing.size_px}: "
                f"{timing.seconds_per_denoise:.1f} s per denoise, "
                f"{1e3 * timing.seconds_per_iteration:.1f} ms per iteration, stopped at "
                f"{list(timing.stop_iterations)}, PSNR {timing.psnr_noisy_db:.1f} → "
                f"{timing.psnr_denoised_db:.1f} dB, new periodic peaks {list(timing.new_periodic_peaks)} "
                f"({torch.get_num_threads()} thread(s))"
            )
        return timings

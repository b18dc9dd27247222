"""Position binning + DIP on a simulated fast fly scan: FRC resolution of four reconstructions.

The experiment of Erin et al. (2025), who denoise position-binned fly-scan ptychography with a deep image
prior (:mod:`phasestream.models.nets.dip`): a raster fly scan of a Siemens star, so fast that each frame holds
few photons and the probe moves one scan step during the exposure (motion blur,
:mod:`phasestream.simulators.scan_simulation`'s ``fly_substeps``). It is reconstructed

1. without binning, every frame at its own (encoder-averaged) position;
2. with position binning: k consecutive frames of a row summed and their positions averaged, with the
   function the pipeline's binning stage runs (:func:`phasestream.stages.binning.bin_positions`), so each
   pattern holds k times the photons at k times fewer positions, blurred over k steps;

then each object is denoised with a DIP (Arch1 and, where CPU time allows, Arch2; ES-WMV early stopping).
The half-bit FRC resolution (van Heel and Schatz 2005, :mod:`phasestream.models.quality`) against the
truth is taken over the same centred field of view for all four, after the complex scalar that best
matches the truth (the free global phase). Both solvers are ePIE (Maiden and Rodenburg 2009) in random
sequential order from a flat object with the true single-frame probe held fixed: the comparison is about
the data (dose per pattern against position density and blur), not probe retrieval.

Geometry: a 64 px detector of 75 µm at 8.8 keV, with the detector distance chosen so that the object
pixel is :data:`OBJECT_PIXEL_NM` (λ z / (N p)); resolutions are reported in nm with that pixel.

Erin et al.'s figures for their Siemens star (half-bit FRC): 126 nm without binning, 134 nm without
binning after DIP, 121 nm with binning and 108 nm with binning after DIP (:data:`PAPER_RESOLUTION_NM`).
They report 2-3 minutes per DIP denoise of one image (:data:`PAPER_DIP_MINUTES`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from phasestream_bench.pine import field_of_view, frc_against_truth, known_probe_start
from tqdm import tqdm

from phasestream.errors import ConfigError
from phasestream.formats.units import wavelength_m
from phasestream.models.execution import torch_threads
from phasestream.models.nets.dip import dip_denoise
from phasestream.models.nets.dip_options import DenoiseOptions, DipArchitecture
from phasestream.models.quality import FrcCurve, FrcThreshold, frc_resolution, half_bit_threshold
from phasestream.simulators.probes import ProbeKind
from phasestream.simulators.samples import SampleKind
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan
from phasestream.simulators.scans import ScanKind
from phasestream.stages.binning import bin_positions

OBJECT_PIXEL_NM = 20.0
"""Object pixel of the simulated geometry: FRC resolutions in pixels times 20 nm."""
DETECTOR_SIZE_PX = 64
DETECTOR_PIXEL_M = 75e-6
ENERGY_KEV = 8.8
FLYSCAN_DIP = DenoiseOptions(
    optimisation={"max_iterations": 2000}, early_stopping={"window": 100, "patience": 300},
    execution={"device": "cpu"},
)  # fmt: skip
"""The DIP that denoises each reconstruction (the network is each architecture compared)."""
PROBE_DIAMETER_PX = 24.0
PROBE_BRIGHT_FIELD_PX = 32.0
PAPER_RESOLUTION_NM = {
    "no binning": 126.0,
    "no binning + DIP": 134.0,
    "binning": 121.0,
    "binning + DIP": 108.0,
}
"""Erin et al. (2025), Siemens star, half-bit FRC; binning + DIP 108 nm follows from the
paper's 14 % gain, (126 − 108) / 126."""
PAPER_DIP_MINUTES = (2.0, 3.0)


class Binning(StrEnum):
    NONE = "no binning"
    BINNED = "binning"


@dataclass
class CaseResult:
    """One reconstruction (and its denoised copies): half-bit resolution in nm, FRC curve, DIP cost."""

    name: str
    positions: int
    photons_per_pattern: float
    resolution_nm: float
    curve: FrcCurve
    image: np.ndarray
    epie_seconds: float
    denoised: dict[str, CaseDenoise] = field(default_factory=dict)


@dataclass
class CaseDenoise:
    architecture: str
    resolution_nm: float
    curve: FrcCurve
    image: np.ndarray
    seconds: float
    stop_iteration: int
    best_iteration: int


def flyscan_config(
    *,
    rows: int,
    photons_per_frame: float,
    overlap_fraction: float,
    fly_substeps: int,
    seed: int,
) -> ScanSimulationConfig:
    """A rows × rows raster fly scan of a Siemens star at OBJECT_PIXEL_NM per pixel."""
    distance_m = OBJECT_PIXEL_NM * 1e-9 * DETECTOR_SIZE_PX * DETECTOR_PIXEL_M / wavelength_m(ENERGY_KEV)
    return ScanSimulationConfig(
        energy_kev=ENERGY_KEV, detector_distance_m=distance_m, detector_pixel_size_m=DETECTOR_PIXEL_M,
        detector_size_px=DETECTOR_SIZE_PX, sample=SampleKind.SIEMENS_STAR, probe=ProbeKind.ZONE_PLATE,
        probe_diameter_px=PROBE_DIAMETER_PX, probe_bright_field_diameter_px=PROBE_BRIGHT_FIELD_PX,
        scan=ScanKind.RASTER, n_positions=rows * rows, overlap_fraction=overlap_fraction,
        fly_substeps=fly_substeps, photons_per_frame=photons_per_frame, seed=seed,
    )  # fmt: skip


def binned_scan(scan: SimulatedScan, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-detector-frame patterns and averaged positions of k-frame bins, row by row.

    Bins never straddle two raster rows (the stage moves back between rows), which is why each row is
    binned on its own, as a binning worker bins each batch; the sums are divided by the detector frames
    each bin holds, as refine does, so that the single-frame probe still fits them.
    """
    rows, columns = scan.scan_shape
    if columns % k:
        raise ConfigError(f"k={k} does not divide the {columns} frames of a row: pick a divisor of {columns}")
    patterns, positions = [], []
    for row in range(rows):
        part = slice(row * columns, (row + 1) * columns)
        frames, positions_m = scan.frames[part], scan.positions_m[part]
        summed, averaged, _, per_bin = bin_positions(frames, positions_m, [1] * columns, k)
        patterns.append(summed / np.asarray(per_bin, dtype=np.float64)[:, None, None])
        positions.append(averaged)
    return np.concatenate(patterns).astype(np.float32), np.concatenate(positions)


def reconstruct(
    scan: SimulatedScan, patterns: np.ndarray, positions_m: np.ndarray, epochs: int, seed: int, progress: bool
) -> tuple[np.ndarray, float]:
    """ePIE (sequential, true probe fixed) for ``epochs`` sweeps; the object canvas and the seconds taken."""
    corners_px = (positions_m - np.asarray(scan.object_top_left_m)) / scan.object_pixel_size_m
    solver = known_probe_start(scan, seed).solver()
    solver.add_patterns(patterns, corners_px - DETECTOR_SIZE_PX // 2)
    start_s = time.perf_counter()
    for _ in tqdm(range(epochs), desc=f"ePIE, {len(patterns)} positions", disable=not progress, leave=False):
        solver.run_epoch()
    return solver.object, time.perf_counter() - start_s


def bench_flyscan(
    *,
    rows: int = 48,
    k: int = 3,
    photons_per_frame: float = 2e4,
    overlap_fraction: float = 1 - 2 / 24,
    fly_substeps: int = 2,
    epochs: int = 20,
    architectures: Sequence[DipArchitecture | str] = (DipArchitecture.ARCH1, DipArchitecture.ARCH2),
    dip: DenoiseOptions = FLYSCAN_DIP,
    seed: int = 0,
    threads: int | None = 1,
    figure: Path | None = None,
    progress: bool = True,
) -> dict[str, CaseResult]:
    """The four cases on one simulated fly scan; prints a table and draws ``figure`` when given.

    ``rows`` × ``rows`` frames at ``photons_per_frame`` each; the probe moves one step (diameter × (1 −
    overlap)) along the row during each exposure, sampled at ``fly_substeps`` sub-positions. Binning sums
    ``k`` frames. ``epochs`` ePIE sweeps for either case (the same total dose and the same number of
    sweeps over all the data). The DIP (``dip``, seeded with ``seed``) denoises the field of view of each
    reconstruction with every one of ``architectures``.
    """
    with torch_threads(threads):
        scan = simulate_scan(
            flyscan_config(
                rows=rows, photons_per_frame=photons_per_frame, overlap_fraction=overlap_fraction,
                fly_substeps=fly_substeps, seed=seed,
            )
        )  # fmt: skip
        view = field_of_view(scan)
        pixel_nm = scan.object_pixel_size_m * 1e9
        data = {
            Binning.NONE: (scan.frames.astype(np.float32), scan.positions_m),
            Binning.BINNED: binned_scan(scan, k),
        }
        results: dict[str, CaseResult] = {}
        for binning, (patterns, positions_m) in data.items():
            obj, epie_s = reconstruct(scan, patterns, positions_m, epochs, seed, progress)
            curve = frc_against_truth(obj, scan.object_truth, view)
            frames_per_pattern = k if binning is Binning.BINNED else 1
            case = CaseResult(
                str(binning), len(patterns), float(patterns.sum(axis=(1, 2)).mean()) * frames_per_pattern,
                frc_resolution(curve, FrcThreshold.HALF_BIT) * pixel_nm, curve, obj[view], epie_s,
            )  # fmt: skip
            for architecture in architectures:
                options = dip.replace(network={"architecture": architecture}, execution={"seed": seed})
                case.denoised[str(architecture)] = _denoise(case.image, scan, options, progress)
            results[str(binning)] = case
        print(format_flyscan_table(results, scan, k))
        if figure is not None:
            draw_flyscan(results, scan, k, figure)
            _write_json(results, scan, k, figure.with_suffix(".png.json"))
        return results


def _denoise(image: np.ndarray, scan: SimulatedScan, options: DenoiseOptions, progress: bool) -> CaseDenoise:
    start_s = time.perf_counter()
    result = dip_denoise(image, options, progress=progress)
    seconds = time.perf_counter() - start_s
    whole = (slice(0, image.shape[0]), slice(0, image.shape[1]))
    view = field_of_view(scan)
    curve = frc_against_truth(result.denoised, scan.object_truth[view], whole)
    resolution_nm = frc_resolution(curve, FrcThreshold.HALF_BIT) * scan.object_pixel_size_m * 1e9
    return CaseDenoise(
        str(options.network.architecture), resolution_nm, curve, result.denoised, seconds,
        result.stop_iteration, result.best_iteration,
    )  # fmt: skip


def _rows(results: dict[str, CaseResult]) -> list[tuple[str, float, CaseResult, CaseDenoise | None]]:
    rows = []
    for case in results.values():
        rows.append((case.name, case.resolution_nm, case, None))
        for architecture, denoised in case.denoised.items():
            rows.append((f"{case.name} + DIP ({architecture})", denoised.resolution_nm, case, denoised))
    return rows


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s)"
    )


def format_flyscan_table(results: dict[str, CaseResult], scan: SimulatedScan, k: int) -> str:
    """A Markdown table of the four (or more) resolutions beside Erin et al.'s, with ePIE and DIP costs."""
    config = scan.config
    lines = [
        f"Siemens star, {len(scan.frames)}-frame raster fly scan ({config.fly_substeps} sub-positions per "
        f"frame), {config.photons_per_frame:g} photons/frame, binning k = {k}, object pixel "
        f"{scan.object_pixel_size_m * 1e9:.1f} nm ({machine_line()})",
        "",
        "| case | positions | photons/pattern | half-bit resolution (nm) | paper (nm) | seconds | DIP stop "
        "(best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, resolution_nm, case, denoised in _rows(results):
        paper_key = name.split(" (")[0]
        paper = PAPER_RESOLUTION_NM.get(paper_key)
        seconds = denoised.seconds if denoised else case.epie_seconds
        stop = f"{denoised.stop_iteration} ({denoised.best_iteration})" if denoised else ""
        lines.append(
            f"| {name} | {case.positions} | {case.photons_per_pattern:.0f} | {resolution_nm:.0f} | "
            f"{paper if paper is not None else '—'} | {seconds:.1f} | {stop} |"
        )
    return "\n".join(lines)


def draw_flyscan(results: dict[str, CaseResult], scan: SimulatedScan, k: int, path: Path) -> None:
    """The phase of every reconstruction (and the truth) over the field of view, and their FRC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixel_nm = scan.object_pixel_size_m * 1e9
    rows = _rows(results)
    view = field_of_view(scan)
    panels = [("truth", None, np.angle(scan.object_truth[view]))]
    for name, resolution_nm, case, denoised in rows:
        image = denoised.image if denoised else case.image
        truth = scan.object_truth[view]
        aligned = image * np.exp(1j * np.angle(np.vdot(image, truth)))
        panels.append((name, resolution_nm, np.angle(aligned)))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.4 * (len(panels) + 1), 3.8))
    for ax, (name, resolution_nm, phase) in zip(axes, panels, strict=False):
        ax.imshow(phase, cmap="gray", vmin=0, vmax=scan.config.object_phase_range_rad)
        title = name if resolution_nm is None else f"{name}\n{resolution_nm:.0f} nm"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    curve_ax = axes[-1]
    for name, resolution_nm, case, denoised in rows:
        curve = denoised.curve if denoised else case.curve
        label = f"{name}: {resolution_nm:.0f} nm"
        curve_ax.plot(curve.frequency_per_px / pixel_nm, curve.correlation, label=label)
    rings = rows[0][2].curve
    threshold = half_bit_threshold(rings.n_pixels)
    curve_ax.plot(rings.frequency_per_px / pixel_nm, threshold, "k--", label="half-bit")
    curve_ax.set(xlabel="spatial frequency (1/nm)", ylabel="FRC against the truth", ylim=(-0.1, 1.05))
    curve_ax.legend(fontsize=7)
    curve_ax.grid(alpha=0.3)
    fig.suptitle(
        f"Fly scan, {scan.config.photons_per_frame:g} photons/frame, binning k = {k}: object phase "
        f"(rad) and half-bit FRC resolution\n{machine_line()}, machine shared with other jobs",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.85))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_json(results: dict[str, CaseResult], scan: SimulatedScan, k: int, path: Path) -> None:
    """The figures behind the PNG, for docs/benchmarks.md."""
    rows = []
    for name, resolution_nm, case, denoised in _rows(results):
        row = {"case": name, "resolution_nm": resolution_nm, "positions": case.positions}
        if denoised is not None:
            row |= {"dip_seconds": denoised.seconds, "stop_iteration": denoised.stop_iteration}
        else:
            row["epie_seconds"] = case.epie_seconds
        rows.append(row)
    config = scan.config.model_dump(mode="json")
    path.write_text(json.dumps({"k": k, "config": config, "machine": machine_line(), "rows": rows}, indent=1))

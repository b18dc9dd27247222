"""A complete simulated ptychography scan: object, probe, trajectory and photon-counted far-field frames.

Geometry defaults describe a DECTRIS SELUN (192 × 192 pixels of 75 µm) at 8.8 keV and 2 m, which gives an
object pixel of λ z / (N p) ≈ 19.6 nm; the default probe is 64 px (1.25 µm) wide, so the linear
oversampling is 3.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from phasestream.formats.units import object_pixel_size_m
from phasestream.simulators.diffraction import ProbeShifter, expected_pattern, poisson_counts
from phasestream.simulators.probes import ProbeKind, make_probe
from phasestream.simulators.samples import (
    SampleKind,
    complex_transmission,
    dead_leaves_material,
    siemens_star_material,
)
from phasestream.simulators.scans import ScanKind, ScanPath, make_scan, step_from_overlap


class ScanSimulationConfig(BaseModel):
    """Everything that defines a simulated scan. Lengths in the object plane are object-grid pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    energy_kev: float = Field(default=8.8, gt=0.0, le=100.0)
    detector_distance_m: float = Field(default=2.0, gt=0.0, le=100.0)
    detector_pixel_size_m: float = Field(default=75e-6, gt=0.0, le=1e-3)
    detector_size_px: int = Field(default=192, ge=16, le=4096, description="square detector, N × N")

    sample: SampleKind = SampleKind.SIEMENS_STAR
    object_amplitude_min: float = Field(default=0.3, ge=0.0, lt=1.0, description="|O| lies in [min, 1]")
    object_phase_range_rad: float = Field(
        default=1.0, ge=0.0, le=2 * math.pi, description="arg O in [0, range]"
    )
    siemens_star_spokes: int = Field(default=36, ge=2, le=1000)
    dead_leaves_radius_min_px: float = Field(default=3.0, gt=0.0)
    dead_leaves_radius_max_px: float = Field(default=60.0, gt=0.0)

    probe: ProbeKind = ProbeKind.ZONE_PLATE
    probe_diameter_px: float = Field(default=64.0, gt=0.0)
    probe_bright_field_diameter_px: float = Field(
        default=96.0, gt=0.0, description="diameter of the direct beam on the detector: sets the defocus"
    )
    zone_plate_central_stop_fraction: float = Field(default=0.4, ge=0.0, lt=1.0)

    scan: ScanKind = ScanKind.FERMAT_SPIRAL
    n_positions: int = Field(default=400, ge=1, le=1_000_000)
    overlap_fraction: float = Field(
        default=0.65, ge=0.0, lt=1.0, description="step = diameter · (1 − overlap)"
    )
    fly_substeps: int = Field(
        default=1, ge=1, le=256, description="sub-positions summed per frame along the scan; 1 = step scan"
    )

    photons_per_frame: float = Field(default=1e6, gt=0.0, le=1e10, description="mean detected photons")
    object_margin_px: int = Field(default=8, ge=0, le=1024)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _probe_fits_the_window(self) -> ScanSimulationConfig:
        half_window = self.detector_size_px / 2
        if self.probe_diameter_px > half_window:
            raise ValueError(
                f"probe_diameter_px={self.probe_diameter_px} exceeds half the {self.detector_size_px}-px "
                f"window: use at most {half_window} so that the linear oversampling stays >= 2"
            )
        if self.probe_bright_field_diameter_px >= self.detector_size_px:
            raise ValueError(
                f"probe_bright_field_diameter_px={self.probe_bright_field_diameter_px} does not fit the "
                f"{self.detector_size_px}-px detector: use a smaller value"
            )
        if self.dead_leaves_radius_min_px > self.dead_leaves_radius_max_px:
            raise ValueError(
                f"dead_leaves_radius_min_px={self.dead_leaves_radius_min_px} is larger than "
                f"dead_leaves_radius_max_px={self.dead_leaves_radius_max_px}: swap them"
            )
        return self


@dataclass(frozen=True)
class SimulatedScan:
    """A simulated scan with its ground truth.

    Object pixel (i, j) has its centre at ``object_top_left_m + (i, j) · object_pixel_size_m`` in the same
    frame as ``positions_m`` (metres from the scan centre, y then x). ``probe_truth`` is centred on pixel
    (N // 2, N // 2) and carries the photon scale: ``far_field_intensity(P · O_patch)`` is the expected
    count per pixel, so reconstructions and truth can be compared without a free scale factor.
    """

    frames: np.ndarray  # (n, N, N) uint16 photon counts
    positions_m: np.ndarray  # (n, 2) float64 probe centres (y, x)
    object_truth: np.ndarray  # complex64 on the object grid
    probe_truth: np.ndarray  # complex64 (N, N)
    object_pixel_size_m: float
    object_top_left_m: tuple[float, float]
    energy_kev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    scan_shape: tuple[int, ...]
    clipped_pixel_count: int  # pixels whose Poisson draw exceeded 65535 and were clipped
    config: ScanSimulationConfig

    def positions_object_px(self) -> np.ndarray:
        """Probe centres as fractional object-grid indices (row, column)."""
        return (self.positions_m - np.asarray(self.object_top_left_m)) / self.object_pixel_size_m


def simulate_scan(config: ScanSimulationConfig) -> SimulatedScan:
    window = config.detector_size_px
    pixel_size_m = object_pixel_size_m(
        config.energy_kev, config.detector_distance_m, window, config.detector_pixel_size_m
    )
    path = make_scan(
        config.scan,
        config.n_positions,
        step_from_overlap(config.probe_diameter_px, config.overlap_fraction),
    )
    sample_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(2))

    origin_px, grid_shape = _object_grid(path, window, config.object_margin_px)
    object_truth = _make_object(config, grid_shape, origin_px, sample_rng)
    probe = make_probe(
        config.probe,
        window,
        config.probe_diameter_px,
        config.probe_bright_field_diameter_px,
        config.zone_plate_central_stop_fraction,
    )

    unscaled = _noise_free_frames(probe, object_truth, path.positions_px + origin_px, path.travel_px, config)
    photons_per_unit = config.photons_per_frame / float(unscaled.sum(axis=(1, 2)).mean())

    frames = np.empty(unscaled.shape, dtype=np.uint16)
    clipped_pixel_count = 0
    for index, pattern in enumerate(unscaled):
        frames[index], clipped = poisson_counts(pattern * photons_per_unit, noise_rng)
        clipped_pixel_count += clipped
    if clipped_pixel_count:
        warnings.warn(
            f"{clipped_pixel_count} pixels exceeded 65535 photons and were clipped to 65535 in the uint16 "
            f"frames; lower photons_per_frame={config.photons_per_frame:g} or widen the bright field",
            RuntimeWarning,
            stacklevel=2,
        )

    return SimulatedScan(
        frames=frames,
        positions_m=path.positions_px * pixel_size_m,
        object_truth=object_truth,
        probe_truth=(probe * np.sqrt(photons_per_unit)).astype(np.complex64),
        object_pixel_size_m=pixel_size_m,
        object_top_left_m=(float(-origin_px[0] * pixel_size_m), float(-origin_px[1] * pixel_size_m)),
        energy_kev=config.energy_kev,
        detector_distance_m=config.detector_distance_m,
        detector_pixel_size_m=config.detector_pixel_size_m,
        scan_shape=path.scan_shape,
        clipped_pixel_count=clipped_pixel_count,
        config=config,
    )


def _object_grid(path: ScanPath, window: int, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Index of the scan centre on the object grid and the grid shape, so every window fits with margin.

    The scan centre sits on a whole pixel, so positions that are whole multiples of the object pixel land
    on pixel centres.
    """
    reach = np.abs(path.travel_px) / 2  # fly-scan sub-positions spread half a travel either side
    lowest = (path.positions_px - reach).min(axis=0)
    highest = (path.positions_px + reach).max(axis=0)
    origin = np.ceil(window // 2 + margin - lowest)
    shape = np.ceil(origin + highest + (window - window // 2) + margin).astype(int)
    return origin, (int(shape[0]), int(shape[1]))


def _make_object(
    config: ScanSimulationConfig, grid_shape: tuple[int, int], origin_px: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    if config.sample is SampleKind.SIEMENS_STAR:
        centre = (int(origin_px[0]), int(origin_px[1]))
        radius = min(centre[0], centre[1], grid_shape[0] - centre[0], grid_shape[1] - centre[1])
        material = siemens_star_material(grid_shape, config.siemens_star_spokes, radius, centre)
        absorption, phase = material, material
    else:
        absorption, phase = dead_leaves_material(
            grid_shape, rng, config.dead_leaves_radius_min_px, config.dead_leaves_radius_max_px
        )
    return complex_transmission(absorption, phase, config.object_amplitude_min, config.object_phase_range_rad)


def _noise_free_frames(
    probe: np.ndarray,
    object_truth: np.ndarray,
    centres_px: np.ndarray,
    travel_px: np.ndarray,
    config: ScanSimulationConfig,
) -> np.ndarray:
    """Expected patterns before photon scaling; a fly-scan frame averages its sub-positions incoherently.

    The sub-positions are centred on the reported position (offsets (s + ½)/S − ½ of one travel), so the
    reported position is the mean probe position during the exposure, as an encoder averaged over the
    exposure would report it.
    """
    window = config.detector_size_px
    substeps = config.fly_substeps
    offsets = (np.arange(substeps) + 0.5) / substeps - 0.5
    shifter = ProbeShifter(probe)
    patterns = np.zeros((len(centres_px), window, window), dtype=np.float32)
    for index, (centre, travel) in enumerate(zip(centres_px, travel_px, strict=True)):
        for offset in offsets:
            patterns[index] += expected_pattern(shifter, object_truth, centre + offset * travel, window)
    if substeps > 1:
        patterns /= substeps
    return patterns

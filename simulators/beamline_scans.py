"""Simulated scans with the probes and detector imperfections of real beamlines, for testing probe starts.

Every case shares one geometry: 8.8 keV, a detector 0.5 m downstream with 75 µm pixels, cropped to
``frame_px`` pixels (64 by default: object pixel λ z / (N p) = 14.7 nm). There the default zone plate
(:class:`~phasestream.simulators.probes.ZonePlate`, NA 2.35 mrad) lights a bright ring 31 px across on the
detector, and the KB pair (NA 1.8 and 1.5 mrad) a 24 × 20 px rectangle. The sample is a dead-leaves
object (discs of 2 to 30 object pixels; sharp edges at every scale) with independent amplitude in
[0.5, 1] and phase in [0, 1.5] rad, scanned along a Fermat spiral whose step is 0.3 of the probe's
diameter (70 % linear overlap).

The cases (:class:`BeamlineCase`):

- ``fzp_focus``: the zone plate in focus, a spot about 8 px across (95 % of its energy) scanned in steps
  of 2 px: a small field of view for 64-px frames, but each pattern's wide bright field carries much
  information, and it reconstructs as well as the defocused cases.
- ``fzp_defocus``: the zone plate 60 µm downstream of its focus, a probe 19 px (30 %) across.
- ``kb_focus``: a KB focus with 15 µm of astigmatism, a rectangular spot with sinc-like tails.
- ``fill_30``: the KB pair defocused until its probe fills 30 % of the window vertically.
- ``fill_70``: the zone plate defocused until its probe fills 70 % of the window (oversampling 1.4).
- the detector and stage effects, each on the zone plate 100 µm out of focus (a probe half the window
  wide): ``dead_hot_pixels``, ``module_gaps``, ``beam_stop``, ``background`` and ``position_errors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from phasestream.errors import ConfigError
from phasestream.simulators.detector_effects import (
    DetectorEffects,
    apply_detector_effects,
    perturbed_positions_m,
)
from phasestream.simulators.diffraction import ProbeShifter, expected_pattern
from phasestream.simulators.probes import (
    KbMirrors,
    ProbeGeometry,
    ZonePlate,
    defocus_for_fill_m,
    fresnel_zone_plate_probe,
    kb_mirror_probe,
)
from phasestream.simulators.samples import complex_transmission, dead_leaves_material
from phasestream.simulators.scans import fermat_spiral_scan

ENERGY_KEV = 8.8
DETECTOR_DISTANCE_M = 0.5
DETECTOR_PIXEL_SIZE_M = 75e-6
PHOTONS_PER_FRAME = 1e6
OVERLAP_FRACTION = 0.7
# Fraction of the probe's energy inside the diameter that sets the scan step.
STEP_ENERGY_FRACTION = 0.9
OBJECT_MARGIN_PX = 4
# Dead leaves stop after this many discs per object pixel; what is still bare (a few per cent) is vacuum,
# as between particles on a membrane.
LEAVES_PER_PIXEL = 0.1


class BeamlineCase(StrEnum):
    FZP_FOCUS = "fzp_focus"
    FZP_DEFOCUS = "fzp_defocus"
    KB_FOCUS = "kb_focus"
    FILL_30 = "fill_30"
    FILL_70 = "fill_70"
    DEAD_HOT_PIXELS = "dead_hot_pixels"
    MODULE_GAPS = "module_gaps"
    BEAM_STOP = "beam_stop"
    BACKGROUND = "background"
    POSITION_ERRORS = "position_errors"


@dataclass(frozen=True)
class BeamlineScan:
    """A simulated scan with its ground truth, laid out like :class:`~.scan_simulation.SimulatedScan`.

    ``positions_m`` are the nominal positions a file records; ``true_positions_m`` those the frames were
    computed at (equal unless the case has position errors). Object pixel (i, j) has its centre at
    ``object_top_left_m + (i, j) · object_pixel_size_m``. ``probe_truth`` is centred on pixel N // 2 and
    carries the photon scale: ``far_field_intensity(P · O_patch)`` is the expected count per pixel
    before the detector's effects.
    """

    case: BeamlineCase
    frames: np.ndarray  # (n, N, N) uint16 counts
    positions_m: np.ndarray  # (n, 2) float64 nominal probe centres (y, x)
    true_positions_m: np.ndarray  # (n, 2) float64
    bad_pixel_mask: np.ndarray  # (N, N) bool, True = not measured
    object_truth: np.ndarray  # complex64 on the object grid
    probe_truth: np.ndarray  # complex64 (N, N)
    object_pixel_size_m: float
    object_top_left_m: tuple[float, float]
    energy_kev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    step_m: float
    effects: DetectorEffects
    clipped_pixel_count: int

    def positions_object_px(self) -> np.ndarray:
        """Nominal probe centres as fractional object-grid indices (row, column)."""
        return (self.positions_m - np.asarray(self.object_top_left_m)) / self.object_pixel_size_m


@dataclass(frozen=True)
class _CaseSpec:
    probe: Callable[[ProbeGeometry], np.ndarray]
    effects: DetectorEffects = field(default_factory=DetectorEffects)


def _zone_plate_defocused(defocus_m: float) -> Callable[[ProbeGeometry], np.ndarray]:
    return lambda geometry: fresnel_zone_plate_probe(geometry, ZonePlate(), defocus_m)


def _zone_plate_filling(fill_fraction: float) -> Callable[[ProbeGeometry], np.ndarray]:
    def probe(geometry: ProbeGeometry) -> np.ndarray:
        aperture = ZonePlate().numerical_aperture(geometry.energy_kev)
        return fresnel_zone_plate_probe(
            geometry, ZonePlate(), defocus_for_fill_m(geometry, aperture, fill_fraction)
        )

    return probe


def _kb(defocus_m: float, astigmatism_m: float) -> Callable[[ProbeGeometry], np.ndarray]:
    return lambda geometry: kb_mirror_probe(geometry, KbMirrors(), (defocus_m, defocus_m + astigmatism_m))


def _kb_filling(fill_fraction: float, astigmatism_m: float) -> Callable[[ProbeGeometry], np.ndarray]:
    def probe(geometry: ProbeGeometry) -> np.ndarray:
        optic = KbMirrors()
        defocus_m = defocus_for_fill_m(geometry, optic.vertical_numerical_aperture, fill_fraction)
        return kb_mirror_probe(geometry, optic, (defocus_m, defocus_m + astigmatism_m))

    return probe


# The effect cases' probe: half the window wide, like the defocused beams most scans use.
_EFFECTS_PROBE = _zone_plate_defocused(100e-6)

_CASES: dict[BeamlineCase, _CaseSpec] = {
    BeamlineCase.FZP_FOCUS: _CaseSpec(_zone_plate_defocused(0.0)),
    BeamlineCase.FZP_DEFOCUS: _CaseSpec(_zone_plate_defocused(60e-6)),
    BeamlineCase.KB_FOCUS: _CaseSpec(_kb(0.0, 15e-6)),
    BeamlineCase.FILL_30: _CaseSpec(_kb_filling(0.3, 10e-6)),
    BeamlineCase.FILL_70: _CaseSpec(_zone_plate_filling(0.7)),
    # About 1 % dead and 0.2 % hot pixels: a well-worn hybrid pixel detector.
    BeamlineCase.DEAD_HOT_PIXELS: _CaseSpec(
        _EFFECTS_PROBE, DetectorEffects(dead_pixel_fraction=0.01, hot_pixel_fraction=0.002)
    ),
    # A 4-row module gap and a 2-column chip gap, both crossing the bright field off its centre.
    BeamlineCase.MODULE_GAPS: _CaseSpec(
        _EFFECTS_PROBE, DetectorEffects(row_gaps_px=((40, 4),), column_gaps_px=((22, 2),))
    ),
    # Sized to the zone plate's central-stop shadow (6 px in radius here), as beamlines size it.
    BeamlineCase.BEAM_STOP: _CaseSpec(_EFFECTS_PROBE, DetectorEffects(beamstop_radius_px=5.0)),
    BeamlineCase.BACKGROUND: _CaseSpec(_EFFECTS_PROBE, DetectorEffects(background_counts=3.0)),
    BeamlineCase.POSITION_ERRORS: _CaseSpec(_EFFECTS_PROBE, DetectorEffects(position_error_fraction=0.08)),
}


def beamline_geometry(frame_px: int = 64) -> ProbeGeometry:
    """The geometry every case uses, for a window of ``frame_px`` pixels."""
    return ProbeGeometry(ENERGY_KEV, DETECTOR_DISTANCE_M, DETECTOR_PIXEL_SIZE_M, frame_px)


def simulate_beamline_scan(
    case: BeamlineCase, n_positions: int, frame_px: int = 64, seed: int = 0
) -> BeamlineScan:
    """Simulate ``n_positions`` frames of ``frame_px`` × ``frame_px`` pixels for one case."""
    if n_positions < 1:
        raise ConfigError(f"n_positions={n_positions}: a scan needs at least one position")
    spec = _CASES[BeamlineCase(case)]
    geometry = beamline_geometry(frame_px)
    pixel_m = geometry.object_pixel_size_m
    sample_rng, noise_rng, stage_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )

    probe = spec.probe(geometry)
    step_px = _diameter_px(probe, STEP_ENERGY_FRACTION) * (1 - OVERLAP_FRACTION)
    nominal_px = fermat_spiral_scan(n_positions, step_px).positions_px
    true_px = perturbed_positions_m(nominal_px, step_px, spec.effects.position_error_fraction, stage_rng)
    origin_px, grid_shape = _object_grid(np.concatenate([nominal_px, true_px]), frame_px)
    object_truth = _dead_leaves_object(grid_shape, sample_rng)

    shifter = ProbeShifter(probe)
    clean = np.stack(
        [expected_pattern(shifter, object_truth, centre, frame_px) for centre in true_px + origin_px]
    )
    photons_per_unit = PHOTONS_PER_FRAME / float(clean.sum(axis=(1, 2)).mean())
    detected = apply_detector_effects(clean * photons_per_unit, spec.effects, noise_rng)
    return BeamlineScan(
        case=BeamlineCase(case),
        frames=detected.frames,
        positions_m=nominal_px * pixel_m,
        true_positions_m=true_px * pixel_m,
        bad_pixel_mask=detected.bad_pixel_mask,
        object_truth=object_truth,
        probe_truth=(probe * np.sqrt(photons_per_unit)).astype(np.complex64),
        object_pixel_size_m=pixel_m,
        object_top_left_m=(float(-origin_px[0] * pixel_m), float(-origin_px[1] * pixel_m)),
        energy_kev=geometry.energy_kev,
        detector_distance_m=geometry.detector_distance_m,
        detector_pixel_size_m=geometry.detector_pixel_size_m,
        step_m=step_px * pixel_m,
        effects=spec.effects,
        clipped_pixel_count=detected.clipped_pixel_count,
    )


def _diameter_px(probe: np.ndarray, energy_fraction: float) -> float:
    """Diameter of the centred disc that holds ``energy_fraction`` of the probe's energy."""
    size = probe.shape[0]
    axis = np.arange(size) - size // 2
    radius = np.hypot(axis[:, None], axis[None, :]).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum((np.abs(probe) ** 2).ravel()[order])
    return 2 * float(radius[order][np.searchsorted(cumulative, energy_fraction * cumulative[-1])])


def _object_grid(centres_px: np.ndarray, window_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Grid index of the scan centre and the grid shape, so every window fits with a margin."""
    origin = np.ceil(window_px // 2 + OBJECT_MARGIN_PX - centres_px.min(axis=0))
    shape = np.ceil(origin + centres_px.max(axis=0) + window_px - window_px // 2 + OBJECT_MARGIN_PX)
    return origin, (int(shape[0]), int(shape[1]))


def _dead_leaves_object(shape_px: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    absorption, phase = dead_leaves_material(
        shape_px, rng, 2.0, 30.0, max_leaves=round(LEAVES_PER_PIXEL * shape_px[0] * shape_px[1])
    )
    return complex_transmission(absorption, phase, amplitude_min=0.5, phase_range_rad=1.5)

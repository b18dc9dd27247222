"""Physics of the beamline probe families, the detector effects and the realistic scan cases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from phasestream.errors import ConfigError
from phasestream.simulators.beamline_scans import BeamlineCase, simulate_beamline_scan
from phasestream.simulators.detector_effects import (
    DetectorEffects,
    apply_detector_effects,
    perturbed_positions_m,
)
from phasestream.simulators.probes import (
    KbMirrors,
    ProbeGeometry,
    ZonePlate,
    defocus_for_fill_m,
    fresnel_zone_plate_probe,
    kb_mirror_probe,
)

GEOMETRY = ProbeGeometry(energy_kev=8.8, detector_distance_m=0.5, detector_pixel_size_m=75e-6, window_px=64)
ZONE_PLATE = ZonePlate()
KB = KbMirrors()
# The default zone plate's annulus: central stop 60 µm of a 150 µm plate, the OSA clips nothing.
INNER_FRACTION = 0.4


def _far_field_intensity(probe: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.fftshift(np.fft.fft2(probe, norm="ortho"))) ** 2


def _centred_axes(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size, dtype=np.float64) - size // 2
    return axis[:, None], axis[None, :]


def _second_moments_m2(probe: np.ndarray) -> tuple[float, float]:
    """⟨y²⟩ and ⟨x²⟩ of |P|² about the window centre, in m²."""
    y, x = _centred_axes(probe.shape[0])
    intensity = np.abs(probe) ** 2 / np.sum(np.abs(probe) ** 2)
    pixel_m = GEOMETRY.object_pixel_size_m
    return float(np.sum(intensity * y**2)) * pixel_m**2, float(np.sum(intensity * x**2)) * pixel_m**2


def _angular_moments_rad2(probe: np.ndarray) -> tuple[float, float]:
    """⟨θy²⟩ and ⟨θx²⟩ of the far field: detector pixel k is at angle k p / z."""
    y, x = _centred_axes(probe.shape[0])
    intensity = _far_field_intensity(probe)
    intensity /= intensity.sum()
    angle_per_px = GEOMETRY.detector_pixel_size_m / GEOMETRY.detector_distance_m
    return float(np.sum(intensity * y**2)) * angle_per_px**2, float(
        np.sum(intensity * x**2)
    ) * angle_per_px**2


@pytest.mark.parametrize(
    "probe",
    [
        fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, 0.0),
        fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, 80e-6),
        kb_mirror_probe(GEOMETRY, KB, (0.0, 15e-6)),
        kb_mirror_probe(GEOMETRY, KB, (-70e-6, -50e-6)),
    ],
    ids=["fzp-focus", "fzp-80um", "kb-focus", "kb-defocus"],
)
def test_probes_are_normalised_and_centred(probe: np.ndarray) -> None:
    intensity = np.abs(probe.astype(np.complex128)) ** 2
    assert probe.dtype == np.complex64
    assert intensity.sum() == pytest.approx(1.0, rel=1e-5)
    y, x = _centred_axes(probe.shape[0])
    # Symmetric pupils put the intensity's centroid on pixel N // 2.
    assert abs(np.sum(intensity * y)) < 0.05
    assert abs(np.sum(intensity * x)) < 0.05


def test_zone_plate_far_field_is_a_bright_ring_with_a_dark_centre() -> None:
    aperture = ZONE_PLATE.numerical_aperture(GEOMETRY.energy_kev)
    outer_px = GEOMETRY.detector_radius_px(aperture)
    assert outer_px == pytest.approx(15.65, abs=0.01)  # λ/(2Δr) · z / p
    y, x = _centred_axes(GEOMETRY.window_px)
    radius = np.hypot(y, x)
    for defocus_m in (0.0, 60e-6):
        far_field = _far_field_intensity(fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, defocus_m))
        ring = far_field[(radius > 0.55 * outer_px) & (radius < 0.85 * outer_px)].mean()
        centre = far_field[radius < 0.2 * outer_px].mean()
        outside = far_field[radius > 1.3 * outer_px].mean()
        assert centre < 1e-3 * ring
        assert outside < 1e-3 * ring
    # Defocus is a phase in the far field: the ring does not change.
    np.testing.assert_allclose(
        _far_field_intensity(fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, 60e-6)),
        _far_field_intensity(fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, 0.0)),
        atol=1e-7,
    )


def test_zone_plate_focal_length_and_osa_checks() -> None:
    # f = D Δr / λ: 150 µm × 30 nm / 0.1409 nm.
    assert ZONE_PLATE.focal_length_m(8.8) == pytest.approx(31.94e-3, rel=1e-3)
    # An OSA as wide as the central stop lets the zeroth order through.
    with pytest.raises(ConfigError, match="zeroth order"):
        ZonePlate(osa_diameter_m=70e-6).pupil_radii_m(8.8)
    # A small OSA far from the focus clips the cone: the numerical aperture shrinks accordingly.
    clipped = ZonePlate(osa_diameter_m=20e-6, osa_distance_m=8e-3)
    assert clipped.numerical_aperture(8.8) == pytest.approx(10e-6 / 8e-3, rel=1e-9)
    with pytest.raises(ConfigError, match="window"):
        fresnel_zone_plate_probe(
            ProbeGeometry(8.8, 2.0, 75e-6, 64), ZONE_PLATE, 0.0
        )  # the ring would be 63 px in radius


@pytest.mark.parametrize("defocus_m", [40e-6, 80e-6, -60e-6])
def test_zone_plate_probe_grows_with_defocus_as_geometric_optics_says(defocus_m: float) -> None:
    """Free-space propagation: ⟨r²⟩(Δz) = ⟨r²⟩(0) + Δz² ⟨θ²⟩, exactly, with ⟨θ²⟩ the far field's."""
    focus = fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, 0.0)
    defocused = fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, defocus_m)
    spread_m2 = sum(_second_moments_m2(defocused)) - sum(_second_moments_m2(focus))
    assert spread_m2 == pytest.approx(defocus_m**2 * sum(_angular_moments_rad2(focus)), rel=1e-3)
    # ... and the angular spread is the uniform annulus's, NA² (1 + ε²) / 2 (the pupil's blur adds 1.5 %).
    aperture = ZONE_PLATE.numerical_aperture(GEOMETRY.energy_kev)
    assert sum(_angular_moments_rad2(focus)) == pytest.approx(
        aperture**2 * (1 + INNER_FRACTION**2) / 2, rel=0.03
    )


def test_kb_probe_is_separable_and_rectangular() -> None:
    probe = kb_mirror_probe(GEOMETRY, KB, (60e-6, 75e-6))
    singular_values = np.linalg.svd(probe.astype(np.complex128), compute_uv=False)
    assert singular_values[1] < 1e-5 * singular_values[0]
    # Each axis spreads by its own defocus times its own angular spread.
    focus = kb_mirror_probe(GEOMETRY, KB, (0.0, 0.0))
    angular_y, angular_x = _angular_moments_rad2(focus)
    (focus_y, focus_x), (spread_y, spread_x) = _second_moments_m2(focus), _second_moments_m2(probe)
    assert spread_y - focus_y == pytest.approx(60e-6**2 * angular_y, rel=1e-3)
    assert spread_x - focus_x == pytest.approx(75e-6**2 * angular_x, rel=1e-3)
    # A 1-D uniform pupil of half-angle NA has ⟨θ²⟩ = NA² / 3; the pupil's 1-px blur adds 1 px², 2-4 %.
    assert angular_y == pytest.approx(KB.vertical_numerical_aperture**2 / 3, rel=0.05)
    assert angular_x == pytest.approx(KB.horizontal_numerical_aperture**2 / 3, rel=0.05)


@pytest.mark.parametrize("fill_fraction", [0.3, 0.5, 0.7])
def test_zone_plate_probe_fills_the_asked_fraction_of_the_window(fill_fraction: float) -> None:
    aperture = ZONE_PLATE.numerical_aperture(GEOMETRY.energy_kev)
    defocus_m = defocus_for_fill_m(GEOMETRY, aperture, fill_fraction)
    probe = fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, defocus_m)
    focus = fresnel_zone_plate_probe(GEOMETRY, ZONE_PLATE, 0.0)
    # The geometric shadow is a uniform annulus of outer radius R: ⟨r²⟩ = R² (1 + ε²) / 2.
    spread_m2 = sum(_second_moments_m2(probe)) - sum(_second_moments_m2(focus))
    diameter_px = 2 * np.sqrt(2 * spread_m2 / (1 + INNER_FRACTION**2)) / GEOMETRY.object_pixel_size_m
    assert diameter_px / GEOMETRY.window_px == pytest.approx(fill_fraction, rel=0.02)
    # Most of the energy lies inside the asked diameter, far less inside 80 % of it.
    y, x = _centred_axes(GEOMETRY.window_px)
    radius = np.hypot(y, x)
    intensity = np.abs(probe) ** 2
    asked_radius_px = fill_fraction * GEOMETRY.window_px / 2
    assert intensity[radius <= asked_radius_px].sum() > 0.8
    assert intensity[radius <= 0.8 * asked_radius_px].sum() < 0.7


def test_kb_probe_fills_the_asked_fraction_vertically() -> None:
    defocus_m = defocus_for_fill_m(GEOMETRY, KB.vertical_numerical_aperture, 0.4)
    probe = kb_mirror_probe(GEOMETRY, KB, (defocus_m, defocus_m))
    focus = kb_mirror_probe(GEOMETRY, KB, (0.0, 0.0))
    spread_y_m2 = _second_moments_m2(probe)[0] - _second_moments_m2(focus)[0]
    # A uniform strip of half-width h has ⟨y²⟩ = h² / 3.
    height_px = 2 * np.sqrt(3 * spread_y_m2) / GEOMETRY.object_pixel_size_m
    assert height_px / GEOMETRY.window_px == pytest.approx(0.4, rel=0.05)


def test_defocus_for_fill_rejects_a_fraction_outside_the_window() -> None:
    with pytest.raises(ConfigError, match="fill_fraction"):
        defocus_for_fill_m(GEOMETRY, 2e-3, 1.2)


# ---------------------------------------------------------------------------------------------- detector


def test_bad_pixel_mask_covers_exactly_the_dead_hot_gap_and_beamstop_pixels() -> None:
    effects = DetectorEffects(
        dead_pixel_fraction=0.02,
        hot_pixel_fraction=0.01,
        hot_pixel_counts=50_000,
        row_gaps_px=((40, 4),),
        column_gaps_px=((10, 2),),
        beamstop_radius_px=5.0,
    )
    # A flat 1000 counts: a measured pixel never reads 0 or 50 000 by chance.
    expected = np.full((3, 64, 64), 1000.0)
    detected = apply_detector_effects(expected, effects, np.random.default_rng(1))
    frames = detected.frames
    unreadable = np.all((frames == 0) | (frames == 50_000), axis=0)
    np.testing.assert_array_equal(detected.bad_pixel_mask, unreadable)
    assert (frames[:, ~detected.bad_pixel_mask] > 800).all()
    # Hot pixels read the constant in every frame, dead ones 0.
    hot = np.all(frames == 50_000, axis=0)
    assert hot.sum() == round(0.01 * 64 * 64)
    y, x = _centred_axes(64)
    beamstop = np.hypot(y, x) <= 5.0
    gaps = np.zeros((64, 64), bool)
    gaps[40:44, :] = True
    gaps[:, 10:12] = True
    assert (detected.bad_pixel_mask[beamstop | gaps]).all()
    dead = detected.bad_pixel_mask & ~hot & ~beamstop & ~gaps
    # Dead pixels were drawn anywhere, some under the gaps or the stop: at most the asked number show.
    assert 0.7 * round(0.02 * 64 * 64) <= dead.sum() <= round(0.02 * 64 * 64)


def test_background_has_the_asked_mean_and_poisson_variance() -> None:
    effects = DetectorEffects(background_counts=3.0)
    detected = apply_detector_effects(np.zeros((40, 64, 64)), effects, np.random.default_rng(2))
    counts = detected.frames.astype(np.float64)
    standard_error = np.sqrt(3.0 / counts.size)
    assert abs(counts.mean() - 3.0) < 4 * standard_error
    assert counts.var() == pytest.approx(3.0, rel=0.03)
    assert not detected.bad_pixel_mask.any()


def test_beam_stop_thins_integer_counts_and_keeps_the_background() -> None:
    effects = DetectorEffects(beamstop_radius_px=6.0, beamstop_transmission=0.01, background_counts=1.0)
    counts = np.full((20, 64, 64), 10_000, dtype=np.uint32)
    frames = apply_detector_effects(counts, effects, np.random.default_rng(3)).frames.astype(np.float64)
    y, x = _centred_axes(64)
    behind = np.hypot(y, x) <= 6.0
    assert frames[:, behind].mean() == pytest.approx(100 + 1, rel=0.03)
    assert frames[:, ~behind].mean() == pytest.approx(10_000 + 1, rel=0.01)


def test_position_errors_have_the_asked_rms() -> None:
    nominal_m = np.zeros((20_000, 2))
    true_m = perturbed_positions_m(
        nominal_m, step_m=200e-9, error_fraction=0.08, rng=np.random.default_rng(4)
    )
    rms_per_axis_m = np.sqrt(np.mean((true_m - nominal_m) ** 2, axis=0))
    np.testing.assert_allclose(rms_per_axis_m, 0.08 * 200e-9, rtol=0.03)


def test_detector_effects_reject_bad_settings() -> None:
    with pytest.raises(ConfigError, match="dead_pixel_fraction"):
        DetectorEffects(dead_pixel_fraction=1.5)
    with pytest.raises(ConfigError, match="row_gaps_px"):
        DetectorEffects(row_gaps_px=((3, 0),))


# ---------------------------------------------------------------------------------------------- scans


@pytest.mark.parametrize("case", list(BeamlineCase))
@pytest.mark.slow
def test_every_beamline_case_simulates_quickly_with_its_truth(case: BeamlineCase) -> None:
    start_s = time.perf_counter()
    scan = simulate_beamline_scan(case, 150, frame_px=64, seed=0)
    elapsed_s = time.perf_counter() - start_s
    assert elapsed_s < 1.0, f"{case}: {elapsed_s:.2f} s to simulate 150 frames"
    assert scan.frames.shape == (150, 64, 64) and scan.frames.dtype == np.uint16
    assert scan.positions_m.shape == scan.true_positions_m.shape == (150, 2)
    assert scan.bad_pixel_mask.shape == (64, 64)
    assert scan.clipped_pixel_count == 0
    assert scan.object_pixel_size_m == pytest.approx(14.68e-9, rel=1e-3)  # λ z / (N p)
    # The probe carries the photon scale: its power is the mean count of a fully transmitting sample.
    assert np.sum(np.abs(scan.probe_truth) ** 2) > np.mean(scan.frames.sum(axis=(1, 2)))
    # Amplitude and phase both vary, at several scales.
    assert np.ptp(np.abs(scan.object_truth)) > 0.3 and np.ptp(np.angle(scan.object_truth)) > 1.0
    # Every probe window lies inside the object grid.
    centres_px = (scan.true_positions_m - np.asarray(scan.object_top_left_m)) / scan.object_pixel_size_m
    assert centres_px.min() >= 32 and (np.array(scan.object_truth.shape) - centres_px.max(axis=0) >= 32).all()


@pytest.mark.slow
def test_position_error_case_records_nominal_positions_off_the_true_ones() -> None:
    scan = simulate_beamline_scan(BeamlineCase.POSITION_ERRORS, 150, seed=5)
    errors_m = scan.true_positions_m - scan.positions_m
    rms_fraction = np.sqrt(np.mean(errors_m**2)) / scan.step_m
    assert rms_fraction == pytest.approx(0.08, rel=0.2)
    clean = simulate_beamline_scan(BeamlineCase.BEAM_STOP, 150, seed=5)
    np.testing.assert_array_equal(clean.true_positions_m, clean.positions_m)
    assert clean.bad_pixel_mask.sum() == 81  # the 5-px stop: 81 pixels within 5 px of the centre

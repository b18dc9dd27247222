"""The scan simulator: geometry, scans, photon statistics, the centred-FFT convention and fly-scan blur."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from phasestream.formats.units import object_pixel_size_m
from phasestream.simulators.diffraction import ProbeShifter, far_field_intensity, poisson_counts
from phasestream.simulators.probes import ProbeKind, energy_outside_radius, make_probe
from phasestream.simulators.samples import (
    complex_transmission,
    dead_leaves_material,
    siemens_star_material,
)
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan
from phasestream.simulators.scans import fermat_spiral_scan, raster_scan, step_from_overlap
from phasestream.simulators.sparse_frames import sparse_frames

# Small scans keep the whole file to a few seconds; the default config is simulated once.
SMALL = {"n_positions": 40, "photons_per_frame": 2e5}


@pytest.mark.slow
def test_defaults_describe_a_selun_scan() -> None:
    config = ScanSimulationConfig()
    scan = simulate_scan(config)
    assert scan.frames.shape == (400, 192, 192)
    assert scan.frames.dtype == np.uint16
    assert config.scan == "fermat_spiral"
    assert 0.6 <= config.overlap_fraction <= 0.7
    assert scan.clipped_pixel_count == 0
    # λ z / (N p) at 8.8 keV, 2 m, 192 × 75 µm.
    assert scan.object_pixel_size_m == pytest.approx(1.23984198e-9 / 8.8 * 2.0 / (192 * 75e-6))
    assert scan.object_pixel_size_m == pytest.approx(19.57e-9, rel=1e-3)
    assert scan.object_truth.dtype == np.complex64
    assert scan.probe_truth.shape == (192, 192)
    assert scan.probe_truth.dtype == np.complex64


def test_positions_count_shape_and_metres() -> None:
    scan = simulate_scan(ScanSimulationConfig(**SMALL))
    assert scan.positions_m.shape == (40, 2)
    assert scan.positions_m.dtype == np.float64
    step_px = step_from_overlap(64.0, 0.65)
    largest_radius_m = step_px / math.sqrt(math.pi) * math.sqrt(39) * scan.object_pixel_size_m
    assert np.hypot(*scan.positions_m.T).max() == pytest.approx(largest_radius_m)
    # Relative to the scan centre: the first spiral point is the centre itself.
    np.testing.assert_array_equal(scan.positions_m[0], [0.0, 0.0])


def test_raster_step_follows_overlap() -> None:
    config = ScanSimulationConfig(**SMALL, scan="raster", overlap_fraction=0.6, probe_diameter_px=50)
    scan = simulate_scan(config)
    step_m = 50 * (1 - 0.6) * scan.object_pixel_size_m
    rows, columns = scan.scan_shape
    assert rows * columns >= 40 > (rows - 1) * columns
    along_row = np.diff(scan.positions_m[:columns, 1])
    np.testing.assert_allclose(along_row, step_m)
    assert scan.positions_m[columns, 0] - scan.positions_m[0, 0] == pytest.approx(step_m)


def test_fermat_spiral_radius_and_spacing() -> None:
    step = 20.0
    path = fermat_spiral_scan(500, step)
    radius = np.hypot(*path.positions_px.T)
    np.testing.assert_allclose(radius, step / math.sqrt(math.pi) * np.sqrt(np.arange(500)))
    distances = np.linalg.norm(path.positions_px[:, None] - path.positions_px[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    nearest = distances.min(axis=1)
    assert 0.9 * step < np.median(nearest) < 1.0 * step
    # Uniform coverage: away from the first few points no two positions crowd together.
    assert nearest[10:].min() > 0.8 * step


def test_raster_scan_partial_last_row_stays_centred() -> None:
    path = raster_scan(10, 5.0)
    assert path.scan_shape == (3, 4)
    assert len(path.positions_px) == 10
    np.testing.assert_allclose(path.positions_px[0], [-5.0, -7.5])


def test_mean_photon_count_per_frame() -> None:
    scan = simulate_scan(ScanSimulationConfig(**SMALL))
    totals = scan.frames.reshape(len(scan.frames), -1).sum(axis=1, dtype=np.int64)
    assert totals.mean() == pytest.approx(2e5, rel=5e-3)
    # Absorption varies across the star: frame totals spread far beyond shot noise.
    assert totals.std() > 3 * math.sqrt(2e5)


def test_poisson_counts_mean_equals_variance() -> None:
    rng = np.random.default_rng(3)
    counts, clipped = poisson_counts(np.full((4, 192, 192), 5.0), rng)
    assert counts.dtype == np.uint16
    assert clipped == 0
    assert counts.mean() == pytest.approx(5.0, rel=0.01)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.03)


def test_frames_are_poisson_around_the_truth_forward_model() -> None:
    """Recompute every expected frame from the returned truth; the counts scatter around it as Poisson.

    Step 24 px from a 64-px probe at 62.5 % overlap puts every raster position on a whole pixel, so the
    test needs no sub-pixel shift and cuts the object with plain slicing.
    """
    config = ScanSimulationConfig(
        n_positions=9, scan="raster", overlap_fraction=0.625, photons_per_frame=1e6, seed=7
    )
    scan = simulate_scan(config)
    centres = scan.positions_object_px()
    np.testing.assert_allclose(centres, np.round(centres), atol=1e-9)
    window = 192
    chi2 = []
    for frame, centre in zip(scan.frames, np.round(centres).astype(int), strict=True):
        top, left = centre - window // 2
        assert top >= 0 and left >= 0
        patch = scan.object_truth[top : top + window, left : left + window]
        spectrum = np.fft.fftshift(np.fft.fft2(scan.probe_truth * patch, norm="ortho"))
        expected = np.abs(spectrum) ** 2
        bright = expected > 20
        chi2.append(np.mean((frame[bright] - expected[bright]) ** 2 / expected[bright]))
    assert np.mean(chi2) == pytest.approx(1.0, abs=0.05)


def test_centred_fft_convention_and_parseval() -> None:
    flat = np.ones((192, 192), dtype=np.complex64)
    intensity = far_field_intensity(flat)
    assert np.unravel_index(np.argmax(intensity), intensity.shape) == (96, 96)
    assert intensity[96, 96] == pytest.approx(192 * 192, rel=1e-6)

    scan = simulate_scan(ScanSimulationConfig(n_positions=1, photons_per_frame=1e4))
    exit_wave = scan.probe_truth * scan.object_truth[:192, :192]
    pattern = far_field_intensity(exit_wave.astype(np.complex128))
    assert pattern.sum() == pytest.approx(np.sum(np.abs(exit_wave.astype(np.complex128)) ** 2), rel=1e-9)


def test_probe_shift_sign_and_energy() -> None:
    probe = make_probe(ProbeKind.ZONE_PLATE, 192, 64, 96, 0.4).astype(np.complex128)
    shifter = ProbeShifter(probe)
    np.testing.assert_allclose(
        shifter.shifted(np.array([3.0, -2.0])), np.roll(probe, (3, -2), axis=(0, 1)), atol=1e-7
    )
    half_pixel = shifter.shifted(np.array([0.5, 0.25]))
    assert np.sum(np.abs(half_pixel) ** 2) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("kind", list(ProbeKind))
def test_probe_fits_the_window(kind: ProbeKind) -> None:
    probe = make_probe(kind, 192, 64, 96, 0.4)
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1.0, rel=1e-5)
    # Oversampling 3: the probe is 64 px wide; almost nothing reaches the outer quarter of the window.
    assert energy_outside_radius(probe, 0.75 * 96) < 1e-3
    far_field = far_field_intensity(probe.astype(np.complex128))
    y, x = np.indices(far_field.shape) - 96
    radius = np.hypot(y, x)
    # The direct beam stays in its bright field (the aperture's edge diffraction leaks a little beyond)
    # and does not reach the detector edge, where it would alias.
    assert far_field[radius > 48 + 6].sum() < 0.05
    assert far_field[radius > 85].sum() < 1e-3


def test_config_rejects_a_probe_too_large_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="oversampling"):
        ScanSimulationConfig(probe_diameter_px=120)
    with pytest.raises(ValidationError, match="extra"):
        ScanSimulationConfig(photons=1e6)
    with pytest.raises(ValidationError):
        ScanSimulationConfig(overlap_fraction=1.0)


def test_fly_scan_blur_changes_and_smooths_frames() -> None:
    base = {"n_positions": 20, "scan": "raster", "photons_per_frame": 1e7}
    step = simulate_scan(ScanSimulationConfig(**base))
    fly = simulate_scan(ScanSimulationConfig(**base, fly_substeps=8))
    np.testing.assert_array_equal(step.positions_m, fly.positions_m)
    assert not np.array_equal(step.frames, fly.frames)

    def speckle_contrast(frames: np.ndarray) -> float:
        values = frames.astype(np.float64)
        return float(np.mean(np.abs(np.diff(values, axis=2))) / values.mean())

    # Incoherent averaging over the motion washes out speckle.
    assert speckle_contrast(fly.frames) < 0.7 * speckle_contrast(step.frames)


def test_clipping_is_reported() -> None:
    config = ScanSimulationConfig(n_positions=2, photons_per_frame=5e9, probe_bright_field_diameter_px=20)
    with pytest.warns(RuntimeWarning, match="clipped to 65535"):
        scan = simulate_scan(config)
    assert scan.clipped_pixel_count > 0
    assert scan.frames.max() == 65535


def test_object_grid_holds_every_window() -> None:
    scan = simulate_scan(ScanSimulationConfig(**SMALL, fly_substeps=3))
    centres = scan.positions_object_px()
    height, width = scan.object_truth.shape
    assert (centres - 96 >= 0).all()
    assert (centres[:, 0] + 96 <= height).all() and (centres[:, 1] + 96 <= width).all()


def test_samples_amplitude_and_phase_ranges() -> None:
    star = siemens_star_material((256, 256), 36, 120, (128, 128))
    obj = complex_transmission(star, star, 0.3, 1.2)
    assert np.abs(obj).min() == pytest.approx(0.3, abs=1e-6)
    assert np.abs(obj).max() == pytest.approx(1.0, abs=1e-6)
    assert np.angle(obj).min() >= -1e-6 and np.angle(obj).max() == pytest.approx(1.2, abs=1e-6)
    # Half of each ring is spoke: the material fraction at mid-radius averages to one half.
    y, x = np.indices(star.shape) - 128
    ring = np.abs(np.hypot(y, x) - 80) < 1
    assert star[ring].mean() == pytest.approx(0.5, abs=0.05)

    absorption, phase = dead_leaves_material((128, 128), np.random.default_rng(1), 2.0, 30.0)
    assert absorption.std() > 0.1 and phase.std() > 0.1
    assert abs(np.corrcoef(absorption.ravel(), phase.ravel())[0, 1]) < 0.5


def test_object_pixel_size_formula() -> None:
    assert object_pixel_size_m(12.3984198, 1.0, 100, 1e-4) == pytest.approx(1e-10 * 1.0 / (100 * 1e-4))


def test_sparse_frames_are_low_dose_poisson() -> None:
    frames = sparse_frames(200, seed=5)
    assert frames.shape == (200, 192, 192)
    assert frames.dtype == np.uint16
    assert frames.mean() == pytest.approx(0.05, rel=0.02)
    assert frames.var() == pytest.approx(0.05, rel=0.03)
    # Poisson(0.05): P(count ≥ 2) = 1 − e^-λ (1 + λ) ≈ 0.00121.
    assert np.mean(frames >= 2) == pytest.approx(1 - math.exp(-0.05) * 1.05, rel=0.1)

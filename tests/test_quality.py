"""Figures of merit: registration, global phase, aligned error, PSNR, FRC and its thresholds, R-factor."""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.errors import ConfigError
from phasestream.models.quality import (
    FrcCurve,
    FrcThreshold,
    aligned_error,
    fourier_r_factor,
    fourier_shift,
    frc,
    frc_resolution,
    half_bit_threshold,
    one_seventh_threshold,
    psnr,
    register_translation,
    remove_global_phase,
)


def smooth_complex_image(shape_px: tuple[int, int] = (96, 96), seed: int = 0) -> np.ndarray:
    """Band-limited random complex image: Fourier shifts of it are exact, so registration can be judged."""
    rng = np.random.default_rng(seed)
    frequency = np.hypot(np.fft.fftfreq(shape_px[0])[:, None], np.fft.fftfreq(shape_px[1])[None, :])
    spectrum = (rng.standard_normal(shape_px) + 1j * rng.standard_normal(shape_px)) * np.exp(
        -((frequency / 0.08) ** 2)
    )
    field = np.fft.ifft2(spectrum)
    return 1 + 0.3 * field / field.std()


def test_register_translation_recovers_an_integer_roll_with_the_documented_sign() -> None:
    reference = smooth_complex_image()
    moving = np.roll(reference, (3, -5), axis=(0, 1))
    np.testing.assert_allclose(register_translation(reference, moving), [-3, 5], atol=1e-9)


@pytest.mark.parametrize("true_shift_px", [(2.37, -1.61), (-0.43, 0.18), (7.91, 3.05)])
def test_register_translation_recovers_a_subpixel_shift_within_five_hundredths(true_shift_px) -> None:
    reference = smooth_complex_image(seed=1)
    moving = fourier_shift(reference, true_shift_px)
    found_px = register_translation(reference, moving, upsample_factor=100)
    np.testing.assert_allclose(found_px, -np.asarray(true_shift_px), atol=0.05)
    np.testing.assert_allclose(
        fourier_shift(moving, found_px), reference, atol=0.05 * np.abs(reference).max()
    )


def test_register_translation_works_on_real_images() -> None:
    reference = smooth_complex_image(seed=2).real
    moving = fourier_shift(reference, (-1.27, 4.44))
    assert np.isrealobj(moving)
    np.testing.assert_allclose(register_translation(reference, moving), [1.27, -4.44], atol=0.05)


def test_remove_global_phase_against_a_reference() -> None:
    truth = smooth_complex_image(seed=3)
    np.testing.assert_allclose(remove_global_phase(truth * np.exp(1.2j), truth), truth, atol=1e-12)


def test_remove_global_phase_without_reference_zeroes_the_mean_phase() -> None:
    rotated = smooth_complex_image(seed=4) * np.exp(-2.5j)
    assert abs(np.angle(np.sum(remove_global_phase(rotated)))) < 1e-12


def test_aligned_error_is_zero_for_a_shifted_phase_rotated_copy() -> None:
    truth = smooth_complex_image(seed=5)
    estimate = np.exp(0.9j) * fourier_shift(truth, (1.3, -0.7))
    assert aligned_error(estimate, truth) < 1e-3
    # Without alignment the same estimate is far off.
    assert np.linalg.norm(estimate - truth) / np.linalg.norm(truth) > 0.5


def test_aligned_error_measures_added_noise_inside_the_mask() -> None:
    rng = np.random.default_rng(6)
    truth = smooth_complex_image(seed=6)
    noise = rng.standard_normal(truth.shape) + 1j * rng.standard_normal(truth.shape)
    noise *= 0.1 * np.linalg.norm(truth) / np.linalg.norm(noise)
    mask = np.zeros(truth.shape, dtype=bool)
    mask[16:80, 16:80] = True
    expected = np.linalg.norm(noise[mask]) / np.linalg.norm(truth[mask])
    assert aligned_error((truth + noise) * np.exp(-0.4j), truth, mask) == pytest.approx(expected, rel=0.02)


def test_aligned_error_with_amplitude_fit_removes_a_complex_scale() -> None:
    truth = smooth_complex_image(seed=7)
    assert aligned_error(0.37 * truth, truth) == pytest.approx(0.63, rel=1e-6)
    assert aligned_error(0.37 * truth, truth, fit_amplitude=True) < 1e-9


def test_aligned_error_is_not_pulled_to_zero_shift_by_the_mask_edge() -> None:
    # Like an ePIE canvas: the estimate is trustworthy only where the probe went, ones elsewhere.
    truth = smooth_complex_image(seed=10)
    estimate = np.ones_like(truth)
    shifted = 0.8 * np.exp(0.3j) * np.roll(truth, (2, -3), axis=(0, 1))
    estimate[12:84, 12:84] = shifted[12:84, 12:84]
    mask = np.zeros(truth.shape, dtype=bool)
    mask[20:76, 20:76] = True
    assert aligned_error(estimate, truth, mask, fit_amplitude=True) < 1e-6


def test_aligned_error_removes_a_linear_phase_ramp_on_request() -> None:
    truth = smooth_complex_image(seed=11)
    rows, cols = np.indices(truth.shape)
    estimate = 0.5 * np.roll(truth, (1, 2), axis=(0, 1)) * np.exp(1j * (1.0 + 0.01 * rows - 0.015 * cols))
    # The roll wraps the ramp around, which makes it jump inside the array: keep that row and those
    # columns out of the mask, as the unilluminated border of a ptychographic canvas would be.
    interior = np.zeros(truth.shape, dtype=bool)
    interior[4:92, 4:92] = True
    assert aligned_error(estimate, truth, interior, fit_amplitude=True) > 0.1
    assert aligned_error(estimate, truth, interior, fit_amplitude=True, remove_phase_ramp=True) < 1e-6


def test_aligned_error_rejects_an_empty_mask_and_mismatched_shapes() -> None:
    truth = smooth_complex_image()
    with pytest.raises(ConfigError, match="no pixel"):
        aligned_error(truth, truth, np.zeros(truth.shape, dtype=bool))
    with pytest.raises(ConfigError, match="crop them"):
        aligned_error(truth[1:], truth)


def test_psnr_hand_computed() -> None:
    # Error 0.1 everywhere, peak 1: 10 log10(1 / 0.01) = 20 dB.
    truth = np.ones((4, 4))
    assert psnr(truth + 0.1, truth) == pytest.approx(20.0)
    assert psnr(truth, truth) == float("inf")
    assert psnr(truth + 0.1, truth, data_range=10.0) == pytest.approx(40.0)


def test_frc_of_an_image_with_itself_is_one() -> None:
    image = smooth_complex_image(seed=8).real + np.random.default_rng(8).standard_normal((96, 96))
    curve = frc(image, image)
    np.testing.assert_allclose(curve.correlation, 1.0, atol=1e-12)
    assert curve.frequency_per_px[-1] == pytest.approx(0.5)
    assert curve.n_pixels[0] == 1
    assert frc_resolution(curve) == pytest.approx(2.0)


def test_frc_of_independent_noise_stays_near_zero() -> None:
    rng = np.random.default_rng(9)
    curve = frc(rng.standard_normal((128, 128)), rng.standard_normal((128, 128)))
    rings = slice(5, None)  # enough pixels per ring for the 3σ ≈ 3/sqrt(n) bound
    assert np.all(np.abs(curve.correlation[rings]) < 4 / np.sqrt(curve.n_pixels[rings]))


def test_half_bit_threshold_hand_computed_values() -> None:
    # n = 1:   (0.2071 + 1.9102) / (1.2071 + 0.9102) = 2.1173 / 2.1173 = 1 exactly.
    # n = 4:   (0.2071 + 0.9551) / (1.2071 + 0.4551) = 1.1622 / 1.6622 = 0.699194…
    # n = 100: (0.2071 + 0.19102) / (1.2071 + 0.09102) = 0.39812 / 1.29812 = 0.306690…
    # n → ∞:   0.2071 / 1.2071 = 0.171568…
    # Swapping 1.9102 and 0.9102, or 0.2071 and 1.2071 (typos found in public code), breaks every line.
    values = half_bit_threshold(np.array([1, 4, 100, 1e16]))
    np.testing.assert_allclose(values, [1.0, 0.699194, 0.306690, 0.171568], atol=2e-6)


def test_one_seventh_threshold_is_constant_per_ring() -> None:
    values = one_seventh_threshold(np.array([1, 10, 1000]))
    np.testing.assert_allclose(values, [1 / 7] * 3)


def test_frc_resolution_interpolates_the_crossing() -> None:
    # Correlation 1 − i/20 crosses 1/7 at ring i = 20 · 6/7 = 17.142857, i.e. f = 17.142857/64 cycles/px:
    # a full-period resolution of 64 / 17.142857 = 3.7333 px.
    ring = np.arange(33)
    curve = FrcCurve(ring / 64, 1 - ring / 20, np.maximum(1, 2 * np.pi * ring).astype(int))
    assert frc_resolution(curve, FrcThreshold.ONE_SEVENTH) == pytest.approx(64 / (20 * 6 / 7), rel=1e-9)
    # The half-bit curve lies above 1/7 everywhere, so it crosses earlier: a coarser resolution.
    assert frc_resolution(curve, FrcThreshold.HALF_BIT) > frc_resolution(curve, FrcThreshold.ONE_SEVENTH)


def test_fourier_r_factor_hand_computed() -> None:
    # sqrt: measured (2, 3), model (1, 4): Σ|difference| = 1 + 1 = 2, Σ measured = 5, R = 0.4.
    assert fourier_r_factor(np.array([4.0, 9.0]), np.array([1.0, 16.0])) == pytest.approx(0.4)
    assert fourier_r_factor(np.array([4.0, 9.0]), np.array([4.0, 9.0])) == 0.0

"""Physics invariants of the far-field operator and the scan geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phasestream.errors import ConfigError, PositionError
from phasestream.models.physics import (
    far_field,
    far_field_adjoint,
    fourier_magnitude_projection,
    object_pixel_size_m,
    positions_to_pixels,
    probe_from_patterns,
    replace_modulus,
    wavelength_m,
)


def random_waves(
    shape: tuple[int, ...], dtype: torch.dtype = torch.complex128, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=dtype, generator=generator)


def inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    """<a, b> = Σ conj(a)·b."""
    return complex(torch.vdot(a.reshape(-1), b.reshape(-1)))


def test_far_field_is_unitary_parseval() -> None:
    waves = random_waves((3, 32, 48))
    energy_in = inner(waves, waves).real
    energy_out = inner(far_field(waves), far_field(waves)).real
    assert energy_out == pytest.approx(energy_in, rel=1e-13)


def test_far_field_adjoint_test_to_float_precision() -> None:
    x = random_waves((2, 40, 40), seed=1)
    y = random_waves((2, 40, 40), seed=2)
    left = inner(far_field(x), y)
    right = inner(x, far_field_adjoint(y))
    assert abs(left - right) <= 1e-12 * abs(left)


def test_far_field_adjoint_is_its_inverse() -> None:
    waves = random_waves((31, 33), seed=3)
    torch.testing.assert_close(far_field_adjoint(far_field(waves)), waves, rtol=0, atol=1e-13)


def test_far_field_puts_zero_frequency_at_the_pattern_centre() -> None:
    # A plane wave has all its energy in the zero frequency, which the project puts at (N//2, N//2).
    for shape in ((16, 16), (15, 20)):
        pattern = far_field(torch.ones(shape, dtype=torch.complex128)).abs() ** 2
        assert tuple(np.unravel_index(int(pattern.argmax()), shape)) == (shape[0] // 2, shape[1] // 2)
        assert float(pattern.max()) == pytest.approx(shape[0] * shape[1])


def test_fourier_magnitude_projection_is_idempotent_and_imposes_the_modulus() -> None:
    exit_waves = random_waves((4, 32, 32), dtype=torch.complex64, seed=4)
    measured_amplitude = random_waves((4, 32, 32), dtype=torch.complex64, seed=5).abs()
    once = fourier_magnitude_projection(exit_waves, measured_amplitude)
    twice = fourier_magnitude_projection(once, measured_amplitude)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(far_field(once).abs(), measured_amplitude, rtol=1e-5, atol=1e-5)


def test_replace_modulus_keeps_the_phase_and_stays_finite_at_zero() -> None:
    far = torch.tensor([3 + 4j, 0, -2j], dtype=torch.complex64)
    measured = torch.tensor([10.0, 7.0, 1.0])
    replaced = replace_modulus(far, measured)
    torch.testing.assert_close(replaced, torch.tensor([6 + 8j, 0, -1j], dtype=torch.complex64))


def test_wavelength_and_object_pixel_size_hand_computed() -> None:
    # λ = 1.23984198e-9 m·keV / 8 keV = 1.549802475e-10 m; pixel = λ z / (N p)
    # = 1.549802475e-10 · 2 / (256 · 75e-6) = 3.09960495e-10 / 1.92e-2 = 1.6143775781e-8 m.
    assert wavelength_m(8.0) == pytest.approx(1.549802475e-10, rel=1e-9)
    assert object_pixel_size_m(8.0, 2.0, 75e-6, 256) == pytest.approx(1.6143775781e-8, rel=1e-9)


@pytest.mark.parametrize(
    ("energy_kev", "distance_m", "pixel_m", "n_pixels"),
    [(0.0, 2.0, 75e-6, 256), (8.0, -1.0, 75e-6, 256), (8.0, 2.0, 0.0, 256), (8.0, 2.0, 75e-6, 0)],
)
def test_object_pixel_size_rejects_non_positive_geometry(energy_kev, distance_m, pixel_m, n_pixels) -> None:
    with pytest.raises(ConfigError, match="must be positive"):
        object_pixel_size_m(energy_kev, distance_m, pixel_m, n_pixels)


def test_probe_from_patterns_reproduces_the_mean_amplitude_and_is_centred() -> None:
    size_px = 64
    coordinate_px = np.arange(size_px) - (size_px - 1) / 2
    disk = (coordinate_px[:, None] ** 2 + coordinate_px[None, :] ** 2 <= 12**2).astype(np.complex64)
    mean_intensity = far_field(torch.from_numpy(disk)).abs().square()
    probe = probe_from_patterns(mean_intensity.numpy())
    assert probe.dtype == torch.complex64
    torch.testing.assert_close(far_field(probe).abs(), mean_intensity.sqrt(), rtol=1e-4, atol=1e-4)
    # Centre of mass of |probe|² in the middle of the window, not in a corner.
    weight = (probe.abs() ** 2).numpy()
    centre_y = (weight.sum(axis=1) * np.arange(size_px)).sum() / weight.sum()
    centre_x = (weight.sum(axis=0) * np.arange(size_px)).sum() / weight.sum()
    assert abs(centre_y - size_px / 2) < 1 and abs(centre_x - size_px / 2) < 1


def test_positions_to_pixels_hand_computed() -> None:
    # Pixel 0.1 µm. Relative to the smallest (y, x) = (0, -1 µm) the centres are (0, 10), (10, 30) and
    # (2.6, 0) px; plus the 2 px margin: corners (2, 12), (12, 32), (4.6 → 5, 2), remainder (-0.4, 0).
    positions_m = np.array([[0.0, 0.0], [1e-6, 2e-6], [2.6e-7, -1e-6]])
    pixels = positions_to_pixels(positions_m, 1e-7, (16, 16), margin_px=2)
    np.testing.assert_array_equal(pixels.top_left_px, [[2, 12], [12, 32], [5, 2]])
    assert pixels.top_left_px.dtype == np.int64
    # Farthest corner (12, 32) + window 16 + margin 2.
    assert pixels.canvas_shape_px == (30, 50)
    np.testing.assert_allclose(pixels.subpixel_px, [[0, 0], [0, 0], [-0.4, 0]], atol=1e-9)


def test_positions_to_pixels_with_a_fixed_origin_gives_negative_corners_before_it() -> None:
    pixels = positions_to_pixels(np.array([[-5e-7, 0.0]]), 1e-7, (8, 8), margin_px=0, origin_m=(0.0, 0.0))
    np.testing.assert_array_equal(pixels.top_left_px, [[-5, 0]])


def test_positions_to_pixels_rejects_bad_input() -> None:
    with pytest.raises(PositionError, match="NaN"):
        positions_to_pixels(np.array([[0.0, np.nan]]), 1e-7, (8, 8))
    with pytest.raises(PositionError, match=r"\(n, 2\)"):
        positions_to_pixels(np.zeros((3, 3)), 1e-7, (8, 8))
    with pytest.raises(ConfigError, match="pixel_size_m"):
        positions_to_pixels(np.zeros((3, 2)), 0.0, (8, 8))

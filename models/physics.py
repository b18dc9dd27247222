"""Far-field forward operator, its adjoint, the Fourier-magnitude projection and scan geometry.

The convention of the whole project (the simulators use it too): the detector pattern of an exit wave ψ is
the *centred*, orthonormal 2D FFT

    Ψ = fftshift(fft2(ψ, norm="ortho"))      I = |Ψ|²

so the zero spatial frequency sits at pixel (N//2, N//2) of a pattern, as on a detector. The orthonormal
FFT makes the operator unitary: total counts equal the exit wave's energy, and the adjoint is the inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from phasestream.errors import ConfigError, FrameValidationError, PositionError

PLANCK_TIMES_LIGHT_SPEED_M_KEV = 1.23984198e-9
"""h·c in m·keV: the wavelength in metres is this divided by the photon energy in keV."""

FOURIER_EPSILON = 1e-9
"""Floor on |Ψ| before dividing by it. |Ψ'| stays at most sqrt(I) whatever the value, so it only has to keep
the quotient finite where the model's far field vanishes; 1e-9 is far below any photon-count amplitude and
its square, 1e-18, still is a normal float32."""

_LAST_TWO_DIMS = (-2, -1)


def far_field(exit_wave: torch.Tensor) -> torch.Tensor:
    """Centred, orthonormal far field of the exit wave(s) over the last two dimensions."""
    return torch.fft.fftshift(torch.fft.fft2(exit_wave, norm="ortho"), dim=_LAST_TWO_DIMS)


def far_field_adjoint(far_field_wave: torch.Tensor) -> torch.Tensor:
    """Adjoint (and inverse, the operator being unitary) of :func:`far_field`."""
    return torch.fft.ifft2(torch.fft.ifftshift(far_field_wave, dim=_LAST_TWO_DIMS), norm="ortho")


def replace_modulus(
    far_field_wave: torch.Tensor, measured_amplitude: torch.Tensor, epsilon: float = FOURIER_EPSILON
) -> torch.Tensor:
    """Give Ψ the measured modulus sqrt(I) and keep its phase: Ψ' = sqrt(I) · Ψ / max(|Ψ|, ε).

    ``measured_amplitude`` is sqrt(I), laid out like ``far_field_wave`` (centred) and broadcastable to it.
    Where |Ψ| < ε the phase is undefined and Ψ' shrinks towards zero instead of blowing up.
    """
    return far_field_wave * (measured_amplitude / far_field_wave.abs().clamp_min(epsilon))


def fourier_magnitude_projection(
    exit_wave: torch.Tensor, measured_amplitude: torch.Tensor, epsilon: float = FOURIER_EPSILON
) -> torch.Tensor:
    """Project exit wave(s) onto the set whose far-field modulus is the measured one: F* replace_modulus F."""
    return far_field_adjoint(replace_modulus(far_field(exit_wave), measured_amplitude, epsilon))


def wavelength_m(energy_kev: float) -> float:
    """Photon wavelength λ = h c / E."""
    if not energy_kev > 0:
        raise ConfigError(f"energy_kev={energy_kev!r} must be positive: give the photon energy in keV")
    return PLANCK_TIMES_LIGHT_SPEED_M_KEV / energy_kev


def object_pixel_size_m(
    energy_kev: float, detector_distance_m: float, detector_pixel_size_m: float, n_pixels: int
) -> float:
    """Real-space pixel size of a far-field reconstruction, λ z / (N p); N is the pattern width in pixels."""
    for name, value in (
        ("detector_distance_m", detector_distance_m),
        ("detector_pixel_size_m", detector_pixel_size_m),
        ("n_pixels", n_pixels),
    ):
        if not value > 0:
            raise ConfigError(f"{name}={value!r} must be positive: check the scan geometry")
    return wavelength_m(energy_kev) * detector_distance_m / (n_pixels * detector_pixel_size_m)


def probe_from_patterns(mean_intensity: np.ndarray | torch.Tensor) -> torch.Tensor:
    """First probe guess when none is given: the exit wave whose far field is sqrt(mean pattern).

    With a flat (zero) phase the inverse FFT piles the probe up at pixel (0, 0), which wraps around the
    corners of the window; shifting it by half a window centres it, so that it illuminates the middle
    of each object patch. That shift only multiplies the far field by a ±1 checkerboard, so |Ψ| still is
    sqrt(mean pattern). Returns a complex64 tensor on the device of the input.
    """
    intensity = torch.as_tensor(mean_intensity)
    if intensity.ndim != 2:
        raise FrameValidationError(
            f"mean_intensity has shape {tuple(intensity.shape)}: pass one 2D mean pattern (ny, nx)"
        )
    amplitude = intensity.to(torch.float32).clamp_min(0).sqrt().to(torch.complex64)
    return torch.fft.fftshift(far_field_adjoint(amplitude), dim=_LAST_TWO_DIMS)


@dataclass(frozen=True)
class PixelPositions:
    """Probe windows on an object canvas.

    ``top_left_px``: (n, 2) int64 corners (y, x) of each probe window in the canvas.
    ``canvas_shape_px``: (ny, nx) canvas that holds every window plus the margin on each side.
    ``subpixel_px``: (n, 2) float64 remainders, exact position minus the integer corner, in [-0.5, 0.5].
    """

    top_left_px: np.ndarray
    canvas_shape_px: tuple[int, int]
    subpixel_px: np.ndarray


def positions_to_pixels(
    positions_m: np.ndarray,
    pixel_size_m: float,
    probe_shape: tuple[int, int],
    *,
    margin_px: int = 2,
    origin_m: tuple[float, float] | None = None,
) -> PixelPositions:
    """Turn probe-centre positions (y, x) in metres into integer window corners on an object canvas.

    ``origin_m`` is the position (y, x) that maps to canvas pixel ``(margin_px, margin_px)`` as a window
    corner; by default the smallest y and x of ``positions_m``. A live scan fixes it from the first batch
    so that later positions keep their meaning; positions left of or above it then get negative corners,
    which :class:`~phasestream.models.ptycho.epie.EpieSolver` handles by growing its canvas.
    """
    positions = np.asarray(positions_m, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise PositionError(f"positions_m has shape {positions.shape}: pass (n, 2) probe centres (y, x) in m")
    if not np.isfinite(positions).all():
        raise PositionError("positions_m holds NaN or infinite values: drop those frames or fix the encoder")
    if not pixel_size_m > 0:
        raise ConfigError(f"pixel_size_m={pixel_size_m!r} must be positive: see object_pixel_size_m()")
    if margin_px < 0:
        raise ConfigError(f"margin_px={margin_px!r} must be zero or positive")
    reference_m = positions.min(axis=0) if origin_m is None else np.asarray(origin_m, dtype=np.float64)
    corner_exact_px = (positions - reference_m) / pixel_size_m + margin_px
    top_left_px = np.rint(corner_exact_px).astype(np.int64)
    far_corner_px = top_left_px.max(axis=0) if len(top_left_px) else np.zeros(2, np.int64)
    canvas_shape_px = (
        int(far_corner_px[0] + probe_shape[0] + margin_px),
        int(far_corner_px[1] + probe_shape[1] + margin_px),
    )
    return PixelPositions(top_left_px, canvas_shape_px, corner_exact_px - top_left_px)

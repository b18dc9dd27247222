"""Far-field diffraction with the project-wide convention, sub-pixel probe placement and photon noise.

Convention (every stage and solver uses it): ``I = |fftshift(fft2(ψ, norm="ortho"))|²``, so the pattern is
centred on pixel (N // 2, N // 2) and, the transform being unitary, ``sum I = sum |ψ|²`` (Parseval).
"""

from __future__ import annotations

import numpy as np

UINT16_MAX = int(np.iinfo(np.uint16).max)


def far_field_intensity(exit_wave: np.ndarray) -> np.ndarray:
    """Noise-free far-field intensity of one exit wave (or a stack along the leading axes)."""
    spectrum = np.fft.fftshift(np.fft.fft2(exit_wave, norm="ortho"), axes=(-2, -1))
    return spectrum.real**2 + spectrum.imag**2


def split_window_origin(centre_px: np.ndarray, window_px: int) -> tuple[tuple[int, int], np.ndarray]:
    """Integer top-left corner of the window centred on ``centre_px`` and the fractional remainder.

    The probe array is centred on pixel ``window_px // 2``; shifting it by the remainder and cutting the
    object at the integer corner puts the probe centre exactly on ``centre_px``.
    """
    top_left = np.asarray(centre_px, dtype=np.float64) - window_px // 2
    integer = np.floor(top_left)
    return (int(integer[0]), int(integer[1])), top_left - integer


class ProbeShifter:
    """Shifts one probe by sub-pixel amounts with a Fourier phase ramp (exact for a band-limited probe).

    The probe's spectrum is computed once, so each shift costs one inverse FFT.
    """

    def __init__(self, probe: np.ndarray) -> None:
        size = probe.shape[-1]
        self._spectrum = np.fft.fft2(probe)
        frequencies = np.fft.fftfreq(size)
        self._ky = frequencies[:, None]
        self._kx = frequencies[None, :]

    def shifted(self, shift_px: np.ndarray) -> np.ndarray:
        """P(r − shift): the probe moved by ``shift_px`` (y, x) pixels."""
        ramp = np.exp(-2j * np.pi * (self._ky * shift_px[0] + self._kx * shift_px[1]))
        return np.fft.ifft2(self._spectrum * ramp)


def expected_pattern(
    shifter: ProbeShifter, object_transmission: np.ndarray, centre_px: np.ndarray, window_px: int
) -> np.ndarray:
    """Noise-free pattern for the probe centred on ``centre_px`` (object-grid pixels, may be fractional)."""
    (top, left), fraction = split_window_origin(centre_px, window_px)
    height, width = object_transmission.shape
    if top < 0 or left < 0 or top + window_px > height or left + window_px > width:
        raise ValueError(
            f"probe window at top-left ({top}, {left}) leaves the {height}×{width} object grid: "
            "enlarge the object margin"
        )
    patch = object_transmission[top : top + window_px, left : left + window_px]
    return far_field_intensity(shifter.shifted(fraction) * patch)


def poisson_counts(expected: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Poisson-distributed photon counts as uint16, and how many pixels were clipped at 65535."""
    counts = rng.poisson(expected)
    clipped = int(np.count_nonzero(counts > UINT16_MAX))
    return np.minimum(counts, UINT16_MAX).astype(np.uint16), clipped

"""A first probe from the data alone: the mean pattern's amplitude with a defocus curvature found by search.

A focused beam (zone plate, KB mirrors) is used out of focus in ptychography so that the probe spans many
pixels. Its far field is the bright-field disc with a quadratic phase exp(±i c k²); a probe built without
that curvature (the usual sqrt(mean pattern) start) is a tight focus and ePIE then needs hundreds of
epochs to grow it. Geometric optics fixes c from the probe diameter D and the bright-field radius R on
the detector (both in pixels of an N-pixel window): a ray at spatial frequency k lands at
x = N c k / π, so D = 2 N c R / π. The diameter is rarely known to better than a factor of two at the
beamline, so the solver tries a few and keeps the one whose patterns fit best (see ``probe_candidates``).
"""

from __future__ import annotations

import numpy as np

from phasestream.errors import FrameValidationError

# Fraction of the peak mean amplitude that counts as inside the bright field: high enough that the
# sample's scattering outside the direct beam (a few per cent of its amplitude) is not counted.
BRIGHT_FIELD_THRESHOLD = 0.3
# Probe diameters tried, as fractions of the window; oversampling limits a probe to half the window.
DIAMETER_FRACTIONS = (0.15, 0.25, 0.35, 0.45)


def bright_field_radius_px(mean_intensity: np.ndarray) -> float:
    """Radius of the disc that holds the direct beam, from the area above the threshold."""
    amplitude = np.sqrt(np.clip(mean_intensity, 0, None))
    peak = amplitude.max()
    if not peak > 0:
        raise FrameValidationError("the mean pattern is zero everywhere: no beam reached the detector")
    area = np.count_nonzero(amplitude >= BRIGHT_FIELD_THRESHOLD * peak)
    return float(np.sqrt(area / np.pi))


def defocused_probe(mean_intensity: np.ndarray, diameter_px: float, sign: int = 1) -> np.ndarray:
    """Probe (complex64, centred on pixel N//2) whose far field is sqrt(mean pattern)·exp(±i c k²)."""
    n_y, n_x = mean_intensity.shape
    amplitude = np.sqrt(np.clip(mean_intensity, 0, None))
    k_y, k_x = np.meshgrid(np.arange(n_y) - n_y // 2, np.arange(n_x) - n_x // 2, indexing="ij")
    curvature = 0.0
    if diameter_px:
        curvature = np.pi * diameter_px / (2 * n_x * bright_field_radius_px(mean_intensity))
    spectrum = amplitude * np.exp(1j * sign * curvature * (k_y**2 + k_x**2))
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectrum), norm="ortho"))
    return probe.astype(np.complex64)


def probe_candidates(mean_intensity: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A focused start and defocused starts of several diameters and both signs, with labels."""
    width = mean_intensity.shape[-1]
    candidates = [("in focus", defocused_probe(mean_intensity, 0.0))]
    for fraction in DIAMETER_FRACTIONS:
        for sign in (1, -1):
            label = f"{'+' if sign > 0 else '-'}defocus, diameter {fraction * width:.0f} px"
            candidates.append((label, defocused_probe(mean_intensity, fraction * width, sign)))
    return candidates

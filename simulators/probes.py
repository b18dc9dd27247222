"""Focused X-ray probes in the sample plane, sampled on the detector-conjugate grid.

Both probes are parametrised the same way, in pixels of the sample-plane grid:
``diameter_px`` is the probe's geometric diameter and ``bright_field_diameter_px`` the diameter of the
direct beam's disc on the detector. The second number sets the defocus curvature: a wider bright field
means a more strongly curved wavefront. With N the window size, a quadratic phase
φ(r) = π K r² / (N R), R the probe radius and K the bright-field radius, has a local spatial frequency of
K/N cycles per pixel at the rim, i.e. the rim scatters to K pixels from the detector centre.

Each probe is centred on pixel (N // 2, N // 2), the same centre the ``fftshift`` convention uses, and is
normalised to ``sum |P|² = 1``.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class ProbeKind(StrEnum):
    APERTURE = "aperture"
    ZONE_PLATE = "zone_plate"


# Edge width (pixels) of the soft aperture: a hard edge would scatter a sinc tail over the whole detector
# and alias; a real pinhole's edge is not sharp on a 20 nm grid either.
_APERTURE_EDGE_PX = 1.5
# Edge width (detector pixels) of the zone-plate pupil. A hard-edged pupil rings in the sample plane: about
# 0.6 % of the probe's energy then lies beyond 80 px of a 192-px window and wraps around it; a 2-px soft
# edge (finite source size and partial coherence blur the real one) brings that below 1e-5.
_PUPIL_EDGE_PX = 2.0


def aperture_probe(size_px: int, diameter_px: float, bright_field_diameter_px: float) -> np.ndarray:
    """A circular aperture with a quadratic (defocus) phase: the simplest defocused-probe model."""
    _check_fits(size_px, diameter_px, bright_field_diameter_px)
    y, x = _centred_coordinates(size_px)
    radius = np.hypot(y, x)
    probe_radius = diameter_px / 2
    amplitude = 0.5 * (1.0 - np.tanh((radius - probe_radius) / _APERTURE_EDGE_PX))
    bright_field_radius = bright_field_diameter_px / 2
    phase = np.pi * bright_field_radius * radius**2 / (size_px * probe_radius)
    return _normalised(amplitude * np.exp(1j * phase))


def zone_plate_probe(
    size_px: int,
    diameter_px: float,
    bright_field_diameter_px: float,
    central_stop_fraction: float,
) -> np.ndarray:
    """The defocused first-order beam of a Fresnel zone plate with a central stop.

    A zone plate's first order fills an annular pupil (the central stop and the order-sorting aperture
    remove the zeroth order); the probe at the sample is that pupil propagated out of focus. The pupil is
    built directly on the detector grid, so the probe's far field is that (soft-edged) annulus of diameter
    ``bright_field_diameter_px``. Fresnel propagation over Δz multiplies the pupil by
    exp(−iπ λ Δz q²); in pixel units that is exp(−iπ a k² / N) with a = λΔz / (N Δx²), and the geometric
    shadow of a pupil of radius K then has radius a K, which fixes a from the requested probe diameter.
    The ring structure and Fresnel fringes of a real defocused zone-plate probe follow from the propagation.
    """
    _check_fits(size_px, diameter_px, bright_field_diameter_px)
    if not 0.0 <= central_stop_fraction < 1.0:
        raise ValueError(f"central_stop_fraction={central_stop_fraction}: use a value in [0, 1)")
    ky, kx = _centred_coordinates(size_px)
    k = np.hypot(ky, kx)
    pupil_radius = bright_field_diameter_px / 2
    outer = 0.5 * (1.0 - np.tanh((k - pupil_radius) / _PUPIL_EDGE_PX))
    inner = 0.5 * (1.0 + np.tanh((k - central_stop_fraction * pupil_radius) / _PUPIL_EDGE_PX))
    pupil = outer * inner if central_stop_fraction > 0 else outer
    defocus = diameter_px / bright_field_diameter_px
    spectrum = pupil * np.exp(-1j * np.pi * defocus * k**2 / size_px)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectrum)))
    return _normalised(probe)


def make_probe(
    kind: ProbeKind,
    size_px: int,
    diameter_px: float,
    bright_field_diameter_px: float,
    central_stop_fraction: float,
) -> np.ndarray:
    if kind is ProbeKind.APERTURE:
        return aperture_probe(size_px, diameter_px, bright_field_diameter_px)
    return zone_plate_probe(size_px, diameter_px, bright_field_diameter_px, central_stop_fraction)


def energy_outside_radius(probe: np.ndarray, radius_px: float) -> float:
    """Fraction of sum |P|² beyond ``radius_px`` from the window centre: how well the probe fits."""
    y, x = _centred_coordinates(probe.shape[0])
    intensity = np.abs(probe) ** 2
    return float(intensity[np.hypot(y, x) > radius_px].sum() / intensity.sum())


def _check_fits(size_px: int, diameter_px: float, bright_field_diameter_px: float) -> None:
    # Linear oversampling σ = N / D must be at least 2 for the far field to determine the exit wave.
    if not 0 < diameter_px <= size_px / 2:
        raise ValueError(
            f"probe diameter_px={diameter_px} in a {size_px}-px window: use 0 < diameter_px <= {size_px / 2} "
            "so that the oversampling is at least 2"
        )
    if not 0 < bright_field_diameter_px < size_px:
        raise ValueError(
            f"bright_field_diameter_px={bright_field_diameter_px}: the direct beam must stay on the "
            f"{size_px}-px detector; use a value in (0, {size_px})"
        )


def _centred_coordinates(size_px: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size_px, dtype=np.float64) - size_px // 2
    return axis[:, None], axis[None, :]


def _normalised(probe: np.ndarray) -> np.ndarray:
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)

"""Focused X-ray probes in the sample plane, sampled on the detector-conjugate grid.

Two kinds of model live here. ``aperture_probe`` and ``zone_plate_probe`` (the demo's) are parametrised in
pixels of the sample-plane grid:
``diameter_px`` is the probe's geometric diameter and ``bright_field_diameter_px`` the diameter of the
direct beam's disc on the detector. The second number sets the defocus curvature: a wider bright field
means a more strongly curved wavefront. With N the window size, a quadratic phase
φ(r) = π K r² / (N R), R the probe radius and K the bright-field radius, has a local spatial frequency of
K/N cycles per pixel at the rim, i.e. the rim scatters to K pixels from the detector centre.

The beamline optics (``fresnel_zone_plate_probe``, ``kb_mirror_probe``) are built from physical parameters
on the grid of a far-field geometry (:class:`ProbeGeometry`): object pixel Δx = λ z / (N p). A ray leaving
the focus at angle θ reaches the detector θ z / p pixels from its centre, so the optic's pupil is drawn
directly on the detector grid, and a defocus Δz (sample downstream of the focus for Δz > 0) is the Fresnel
propagator exp(−iπ λ Δz q²), q = k / (N Δx), applied to it. Geometric optics then gives the probe's
diameter, 2 NA |Δz| for a numerical aperture NA (the half-angle of the focused cone): that fixes the
defocus that makes a probe fill a chosen fraction of the window (``defocus_for_fill_m``).

Each probe is centred on pixel (N // 2, N // 2), the same centre the ``fftshift`` convention uses, and is
normalised to ``sum |P|² = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from phasestream.errors import ConfigError
from phasestream.formats.units import object_pixel_size_m, wavelength_m


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
# Blur (σ, detector pixels) of the beamline optics' pupils: a source a few µm wide and partial coherence
# blur the aperture's image by about a pixel at these distances.
_PUPIL_BLUR_PX = 1.0


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


@dataclass(frozen=True)
class ProbeGeometry:
    """The far-field geometry that sets the sample-plane grid of an N × N window."""

    energy_kev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    window_px: int

    def __post_init__(self) -> None:
        for name in ("energy_kev", "detector_distance_m", "detector_pixel_size_m", "window_px"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ProbeGeometry.{name}={getattr(self, name)!r} must be positive")

    @property
    def wavelength_m(self) -> float:
        return wavelength_m(self.energy_kev)

    @property
    def object_pixel_size_m(self) -> float:
        """Δx = λ z / (N p)."""
        return object_pixel_size_m(
            self.energy_kev, self.detector_distance_m, self.window_px, self.detector_pixel_size_m
        )

    def detector_radius_px(self, angle_rad: float) -> float:
        """How far from the detector centre, in pixels, a ray at ``angle_rad`` to the axis lands."""
        return angle_rad * self.detector_distance_m / self.detector_pixel_size_m


@dataclass(frozen=True)
class ZonePlate:
    """A Fresnel zone plate with its central stop and order-sorting aperture (OSA).

    Defaults: a 150 µm plate with 30 nm outermost zones, a 60 µm central stop and a 30 µm OSA 5 mm
    upstream of the focus, a common nanoprobe set-up. The OSA sits in the central stop's shadow, so it
    blocks the zeroth order, and passes the first order's converging cone (or clips its outer part); the
    other orders, which it mostly blocks too, are left out.
    """

    outer_diameter_m: float = 150e-6
    outermost_zone_width_m: float = 30e-9
    central_stop_diameter_m: float = 60e-6
    osa_diameter_m: float = 30e-6
    osa_distance_m: float = 5e-3

    def focal_length_m(self, energy_kev: float) -> float:
        """f = D Δr / λ."""
        return self.outer_diameter_m * self.outermost_zone_width_m / wavelength_m(energy_kev)

    def pupil_radii_m(self, energy_kev: float) -> tuple[float, float]:
        """Inner and outer radius of the first order's annulus on the plate, after stop and OSA."""
        focal_m = self.focal_length_m(energy_kev)
        if not 0 < self.osa_distance_m < focal_m:
            raise ConfigError(
                f"osa_distance_m={self.osa_distance_m} must lie between the zone plate and its focus, "
                f"f = {focal_m:.4g} m at {energy_kev} keV"
            )
        if not 0 < self.osa_diameter_m < self.central_stop_diameter_m < self.outer_diameter_m:
            raise ConfigError(
                f"OSA {self.osa_diameter_m} m, central stop {self.central_stop_diameter_m} m, zone plate "
                f"{self.outer_diameter_m} m: the OSA must be narrower than the central stop (else the "
                "zeroth order passes it) and the stop narrower than the plate"
            )
        # A first-order ray from plate radius ρ crosses the OSA plane at ρ d / f from the axis.
        osa_limit_m = self.osa_diameter_m / 2 * focal_m / self.osa_distance_m
        inner_m = self.central_stop_diameter_m / 2
        outer_m = min(self.outer_diameter_m / 2, osa_limit_m)
        if not outer_m > inner_m:
            raise ConfigError(
                f"the OSA ({self.osa_diameter_m} m at {self.osa_distance_m} m from the focus) blocks the "
                "whole first order: widen it or move it closer to the focus"
            )
        return inner_m, outer_m

    def numerical_aperture(self, energy_kev: float) -> float:
        """Half-angle of the focused cone that passes the OSA (λ / (2 Δr) when the OSA clips nothing)."""
        return self.pupil_radii_m(energy_kev)[1] / self.focal_length_m(energy_kev)


@dataclass(frozen=True)
class KbMirrors:
    """A Kirkpatrick–Baez pair: each mirror focuses one axis with its own numerical aperture.

    NA = acceptance / (2 × focal distance) per axis; the defaults (1.8 mrad vertically, 1.5 mrad
    horizontally) are those of a multilayer-coated nanofocusing pair. ``blur_px`` (σ on the detector)
    softens the pupil's edges: mirror ends are not sharp, and slope errors and partial coherence blur them.
    """

    vertical_numerical_aperture: float = 1.8e-3
    horizontal_numerical_aperture: float = 1.5e-3
    blur_px: float = 1.0

    def __post_init__(self) -> None:
        for name in ("vertical_numerical_aperture", "horizontal_numerical_aperture", "blur_px"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"KbMirrors.{name}={getattr(self, name)!r} must be positive")


def fresnel_zone_plate_probe(geometry: ProbeGeometry, optic: ZonePlate, defocus_m: float) -> np.ndarray:
    """The zone plate's first-order beam ``defocus_m`` downstream of its focus (upstream if negative).

    The pupil is the annulus the central stop and OSA leave, drawn on the detector grid (a ray from plate
    radius ρ leaves the focus at angle ρ / f) with soft edges; its far field is a bright ring with a dark
    centre whatever the defocus.
    """
    focal_m = optic.focal_length_m(geometry.energy_kev)
    inner_m, outer_m = optic.pupil_radii_m(geometry.energy_kev)
    inner_px = geometry.detector_radius_px(inner_m / focal_m)
    outer_px = geometry.detector_radius_px(outer_m / focal_m)
    _check_bright_field_fits(geometry, outer_px)
    ky, kx = _centred_coordinates(geometry.window_px)
    k = np.hypot(ky, kx)
    annulus = _open_inside(outer_px - k) * _open_inside(k - inner_px)
    return _propagated(_blurred_pupil(annulus, _PUPIL_BLUR_PX), geometry, defocus_m, defocus_m, ky, kx)


def kb_mirror_probe(geometry: ProbeGeometry, optic: KbMirrors, defocus_m: tuple[float, float]) -> np.ndarray:
    """A KB focus, ``defocus_m`` = (vertical, horizontal) from each mirror's focus: separable in y and x.

    Each axis has a soft-edged 1-D pupil of half-width NA z / p pixels on the detector; two different
    defocus values (astigmatism, usual for a KB pair) give a rectangular probe with sinc-like tails in
    focus and Fresnel fringes out of focus.
    """
    half_widths_px = (
        geometry.detector_radius_px(optic.vertical_numerical_aperture),
        geometry.detector_radius_px(optic.horizontal_numerical_aperture),
    )
    _check_bright_field_fits(geometry, max(half_widths_px))
    ky, kx = _centred_coordinates(geometry.window_px)
    rectangle = _open_inside(half_widths_px[0] - np.abs(ky)) * _open_inside(half_widths_px[1] - np.abs(kx))
    pupil = _blurred_pupil(rectangle, optic.blur_px)
    return _propagated(pupil, geometry, defocus_m[0], defocus_m[1], ky, kx)


def defocus_for_fill_m(geometry: ProbeGeometry, numerical_aperture: float, fill_fraction: float) -> float:
    """The defocus whose geometric probe diameter, 2 NA Δz, is ``fill_fraction`` of the window.

    Fractions above 0.5 give a linear oversampling below 2: ptychography still works thanks to the
    overlap, but the probe's Fresnel fringes then reach the window's edge.
    """
    if not 0 < fill_fraction < 1:
        raise ConfigError(f"fill_fraction={fill_fraction!r}: use a fraction of the window in (0, 1)")
    if not numerical_aperture > 0:
        raise ConfigError(f"numerical_aperture={numerical_aperture!r} must be positive")
    diameter_m = fill_fraction * geometry.window_px * geometry.object_pixel_size_m
    return diameter_m / (2 * numerical_aperture)


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


def _check_bright_field_fits(geometry: ProbeGeometry, radius_px: float) -> None:
    if not radius_px + 3 * _PUPIL_BLUR_PX < geometry.window_px / 2:
        raise ConfigError(
            f"the direct beam reaches {radius_px:.1f} px from the detector centre, beyond the "
            f"{geometry.window_px}-px window: move the detector closer (now "
            f"{geometry.detector_distance_m} m) or use a wider window"
        )


def _open_inside(distance_px: np.ndarray) -> np.ndarray:
    """Fraction of each pixel inside an aperture edge ``distance_px`` away (> 0 inside): antialiased."""
    return np.clip(distance_px + 0.5, 0.0, 1.0)


def _blurred_pupil(aperture: np.ndarray, blur_px: float) -> np.ndarray:
    """Pupil amplitude: the square root of the aperture's intensity blurred by a Gaussian of σ = blur_px.

    Finite source size and partial coherence blur the aperture's image on the detector; the intensity is
    then 1/2 on the aperture's edge (so the optic's numerical aperture is where it should be) and falls
    off as a Gaussian outside. The blur is periodic, which is harmless for a pupil inside the window.
    """
    frequency_y = np.fft.fftfreq(aperture.shape[0])[:, None]
    frequency_x = np.fft.fftfreq(aperture.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * blur_px) ** 2 * (frequency_y**2 + frequency_x**2))
    blurred = np.fft.ifft2(np.fft.fft2(aperture) * kernel).real
    return np.sqrt(np.clip(blurred, 0.0, None))


def _propagated(
    pupil: np.ndarray,
    geometry: ProbeGeometry,
    defocus_y_m: float,
    defocus_x_m: float,
    ky: np.ndarray,
    kx: np.ndarray,
) -> np.ndarray:
    """The probe whose far field is ``pupil`` times the Fresnel propagator of each axis's defocus."""
    # exp(−iπ λ Δz q²) with q = k / (N Δx): in pixel units the factor is λ Δz / (N Δx)².
    scale = geometry.wavelength_m / (geometry.window_px * geometry.object_pixel_size_m) ** 2
    phase = -np.pi * scale * (defocus_y_m * ky**2 + defocus_x_m * kx**2)
    spectrum = pupil * np.exp(1j * phase)
    return _normalised(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectrum))))


def _centred_coordinates(size_px: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.arange(size_px, dtype=np.float64) - size_px // 2
    return axis[:, None], axis[None, :]


def _normalised(probe: np.ndarray) -> np.ndarray:
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)

"""Units: length units as motors and files spell them, photon energy and the far-field pixel size."""

from __future__ import annotations

from enum import StrEnum

from phasestream.errors import ConfigError

JOULES_PER_EV = 1.602176634e-19  # the elementary charge: photon energies in J ↔ eV


class LengthUnit(StrEnum):
    METRE = "m"
    MILLIMETRE = "mm"
    MICROMETRE = "um"
    NANOMETRE = "nm"

    @property
    def metres(self) -> float:
        return _METRES_PER_UNIT[self]


_METRES_PER_UNIT = {
    LengthUnit.METRE: 1.0,
    LengthUnit.MILLIMETRE: 1e-3,
    LengthUnit.MICROMETRE: 1e-6,
    LengthUnit.NANOMETRE: 1e-9,
}
# How EPICS and ophyd motors spell their engineering units (µ as micro sign or Greek mu).
_UNIT_SPELLINGS = {
    **{name: LengthUnit.METRE for name in ("m", "meter", "meters", "metre", "metres")},
    **{name: LengthUnit.MILLIMETRE for name in ("mm", "millimeter", "millimeters", "millimetre")},
    **{name: LengthUnit.MICROMETRE for name in ("um", "\u00b5m", "\u03bcm", "micron", "microns")},
    **{name: LengthUnit.MICROMETRE for name in ("micrometer", "micrometers", "micrometre")},
    **{name: LengthUnit.NANOMETRE for name in ("nm", "nanometer", "nanometers", "nanometre")},
}


def parse_length_unit(text: str) -> LengthUnit | None:
    """The length unit a descriptor's ``units`` names; None when it names none (empty)."""
    spelled = text.strip().lower()
    if not spelled:
        return None
    unit = _UNIT_SPELLINGS.get(spelled)
    if unit is None:
        raise ConfigError(
            f"motor units {text!r} are not a length: the bridge needs translation motors in "
            f"{[u.value for u in LengthUnit]} (is --y-motor/--x-motor a rotation or another axis?)"
        )
    return unit


def wavelength_m(energy_kev: float) -> float:
    """λ = h c / E; 1.23984198e-9 m·keV is h c."""
    return 1.23984198e-9 / energy_kev


def object_pixel_size_m(
    energy_kev: float, detector_distance_m: float, detector_size_px: int, detector_pixel_size_m: float
) -> float:
    """Real-space pixel of the far-field geometry: Δx = λ z / (N p)."""
    return wavelength_m(energy_kev) * detector_distance_m / (detector_size_px * detector_pixel_size_m)

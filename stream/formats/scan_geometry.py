"""Where a scan file's probe positions are, and whether its geometry can be a ptychography scan's.

Position convention. CXI (and NeXus, whose frame it shares: z along the beam, y up, x completing a
right-handed frame) records where the *sample* was moved, so the probe sits at −translation on the sample.
The detector's lab directions of a step along frame rows and columns (CXI ``basis_vectors``, NXmx
``slow_pixel_direction`` and ``fast_pixel_direction``) default to rows along −y and columns along −x.
phasestream's (y, x) positions are probe centres along the frame's row and column axes (the far-field
convention I = |F(ψ)|² keeps object and detector axes parallel), so ``y_m = −translation · row_direction``;
with the default directions that is ``y_m = translation_y`` and ``x_m = translation_x``.

Both checks here refuse values that are off by a unit, naming the unit they look like.
"""

from __future__ import annotations

import math

import numpy as np

from phasestream.errors import PositionError, ScanFileError
from phasestream.formats.units import JOULES_PER_EV, object_pixel_size_m

# The CXI default detector orientation: rows run along −y, columns along −x (top-left origin).
DEFAULT_ROW_DIRECTION = (0.0, -1.0, 0.0)
DEFAULT_COLUMN_DIRECTION = (-1.0, 0.0, 0.0)
_UNIT_NAMES = {1e-3: "millimetres", 1e-6: "micrometres", 1e-9: "nanometres"}
# Neighbouring positions are compared on at most this many probe positions (the median is robust).
_SCALE_SAMPLE = 256


def pixel_size_per_axis_m(
    energy_kev: float, detector_distance_m: float, frame_shape_px: tuple[int, int], pixel_size_m: float
) -> tuple[float, float]:
    height, width = frame_shape_px
    return (
        object_pixel_size_m(energy_kev, detector_distance_m, height, pixel_size_m),
        object_pixel_size_m(energy_kev, detector_distance_m, width, pixel_size_m),
    )


def positions_from_sample_translation(
    translation_m: np.ndarray,
    row_direction: np.ndarray | tuple[float, ...] = DEFAULT_ROW_DIRECTION,
    column_direction: np.ndarray | tuple[float, ...] = DEFAULT_COLUMN_DIRECTION,
) -> np.ndarray:
    """(n, 3) lab-frame sample translations → (n, 2) probe centres (y, x) along the frame axes, metres.

    The probe sits at −translation on the sample; its coordinate along an axis is the projection onto
    that axis's unit lab direction.
    """
    rows, columns = (unit_vector(direction) for direction in (row_direction, column_direction))
    probe_on_sample = -np.asarray(translation_m, dtype=np.float64)
    return np.stack([probe_on_sample @ rows, probe_on_sample @ columns], axis=1)


def sample_translation_from_positions(positions_m: np.ndarray) -> np.ndarray:
    """The inverse for the default orientation: (n, 2) probe (y, x) → (n, 3) sample translation (x, y, z)."""
    positions = np.asarray(positions_m, dtype=np.float64)
    translation = np.zeros((len(positions), 3))
    translation[:, 0] = positions[:, 1]
    translation[:, 1] = positions[:, 0]
    return translation


def check_position_scale(
    positions_m: np.ndarray, frame_shape_px: tuple[int, int], pixel_size_m: tuple[float, float], where: str
) -> None:
    """Refuse positions whose scale cannot be a ptychography scan with this geometry: a unit mix-up.

    Two bounds, both loose enough for any real scan. Above: neighbouring points farther apart than the
    detector window (N object pixels, and the probe is never wider) would share no illuminated area, so
    nothing could be reconstructed; millimetres, micrometres or nanometres stored as metres land there.
    Below: a scan whose whole extent is under one object pixel (a stationary series, extent zero, is
    allowed); metres labelled as a smaller unit land there.
    """
    n = len(positions_m)
    if n < 2:
        return
    pixel = np.asarray(pixel_size_m)
    window_px = min(frame_shape_px)
    step_m = _median_neighbour_distance_m(positions_m, pixel)
    extent_m = positions_m.max(axis=0) - positions_m.min(axis=0)
    step_px = step_m / float(pixel.max())
    extent_px = float((extent_m / pixel).max())
    geometry = (
        f"{window_px}-pixel probe window, object pixel {float(pixel.max()):.3g} m from the energy, "
        "distance and detector pixel"
    )
    if step_px > window_px:
        factor = next(
            (f for f in (1e-3, 1e-6, 1e-9) if step_px * f <= window_px),
            1e-9,
        )
        raise PositionError(
            f"positions in {where} are implausibly large for metres: neighbouring scan points lie a "
            f"median {step_m:.4g} m apart, {step_px:.4g} object pixels, more than the {geometry}, so no "
            f"two frames would overlap. Read as {_UNIT_NAMES[factor]} they would lie {step_m * factor:.4g} m "
            f"({step_px * factor:.3g} pixels) apart: the positions were likely stored in "
            f"{_UNIT_NAMES[factor]}; convert them to metres (× {factor:g}) or set their units attribute"
        )
    if 0 < extent_px < 1:
        factor = next((f for f in (1e3, 1e6, 1e9) if extent_px * f >= 1), 1e9)
        raise PositionError(
            f"positions in {where} are implausibly small: the whole scan spans "
            f"{float(extent_m.max()):.4g} m, {extent_px:.3g} object pixels of the {geometry}, so every "
            "frame would see the same spot. "
            f"× {factor:g} they would span {extent_px * factor:.3g} pixels: the values are likely metres "
            "stored under a smaller unit (check the units attribute), or micrometres or nanometres "
            "converted twice"
        )


def check_geometry(energy_kev: float, distance_m: float, pixel_size_m: float, where: dict[str, str]) -> None:
    """Refuse a geometry that is off by a unit (energy in eV or J mixed up, lengths in mm or µm)."""
    checks = (
        ("energy", energy_kev, 0.1, 100.0, "keV", "an X-ray photon energy (0.1–100 keV)"),
        ("distance", distance_m, 1e-3, 200.0, "m", "a sample–detector distance (1 mm – 200 m)"),
        ("pixel", pixel_size_m, 1e-7, 1e-2, "m", "a detector pixel (0.1 µm – 1 cm)"),
    )
    for key, value, low, high, unit, meaning in checks:
        if not (math.isfinite(value) and low <= value <= high):
            hint = _unit_hint(key, value)
            raise ScanFileError(
                f"{where[key]} gives {value:.6g} {unit}, which is not {meaning}{hint}; "
                "store it in SI units (CXI requires them) or fix its units attribute"
            )


def _median_neighbour_distance_m(positions_m: np.ndarray, pixel_size_m: np.ndarray) -> float:
    """Median over a sample of positions of the distance to the nearest other (distinct) position."""
    scaled = positions_m / pixel_size_m  # isotropic in pixels, so rectangular pixels compare fairly
    sample = scaled[np.unique(np.linspace(0, len(scaled) - 1, _SCALE_SAMPLE).astype(int))]
    nearest = np.full(len(sample), np.inf)
    for start in range(0, len(scaled), 65536):
        block = scaled[start : start + 65536]
        distances = np.hypot(*(sample[:, None, :] - block[None, :, :]).transpose(2, 0, 1))
        distances[distances == 0] = np.inf  # itself, and repeated positions
        nearest = np.minimum(nearest, distances.min(axis=1))
    finite = nearest[np.isfinite(nearest)]
    if not len(finite):
        return 0.0
    return float(np.median(finite)) * float(pixel_size_m.max())


def unit_vector(direction: np.ndarray | tuple[float, ...]) -> np.ndarray:
    vector = np.asarray(direction, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(vector))
    if not norm > 0:
        raise ScanFileError(f"detector axis direction {vector.tolist()} has no length; expected a lab vector")
    return vector / norm


def _unit_hint(key: str, value: float) -> str:
    if key == "energy" and 100.0 < value <= 1e5:
        return f" (it looks like eV: {value / 1000:.4g} keV)"
    if key == "energy" and 0 < value < 1e-10:
        return f" (it looks like joules read as keV: {value / JOULES_PER_EV / 1000:.4g} keV)"
    if key in ("distance", "pixel"):
        for factor, name in ((1e-3, "millimetres"), (1e-6, "micrometres")):
            scaled = value * factor
            if (key == "distance" and 1e-3 <= scaled <= 200.0) or (key == "pixel" and 1e-7 <= scaled <= 1e-2):
                return f" (it looks like {name}: {scaled:.4g} m)"
    return ""

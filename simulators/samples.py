"""Formula-driven complex test objects: a Siemens star and dead leaves.

Both are built as a "material map" in [0, 1] (0 = vacuum, 1 = the densest feature) that becomes a complex
transmission: amplitude falls from 1 to ``amplitude_min`` and the phase rises from 0 to ``phase_range_rad``
with the material, as it does for a real thin specimen (absorption and phase shift grow together).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np


class SampleKind(StrEnum):
    SIEMENS_STAR = "siemens_star"
    DEAD_LEAVES = "dead_leaves"


def siemens_star_material(
    shape_px: tuple[int, int], n_spokes: int, radius_px: float, centre_px: tuple[int, int]
) -> np.ndarray:
    """Binary spokes inside a disc, antialiased so that the map carries no pixel-scale aliasing.

    Near a spoke edge, ``sin(n θ) · r / n`` is the signed distance in pixels to the edge, so clipping
    ``0.5 + distance`` to [0, 1] gives one-pixel-wide edges at every radius; the centre, where the spokes
    are narrower than a pixel, becomes the grey it would be on a real detector-limited image.
    """
    if n_spokes < 2:
        raise ValueError(f"n_spokes={n_spokes}: a Siemens star needs at least 2 spokes")
    y = np.arange(shape_px[0], dtype=np.float64)[:, None] - centre_px[0]
    x = np.arange(shape_px[1], dtype=np.float64)[None, :] - centre_px[1]
    radius = np.hypot(y, x)
    angle = np.arctan2(y, x)
    spokes = np.clip(0.5 + np.sin(n_spokes * angle) * radius / n_spokes, 0.0, 1.0)
    inside_disc = np.clip(radius_px - radius + 0.5, 0.0, 1.0)
    return spokes * inside_disc


def dead_leaves_material(
    shape_px: tuple[int, int],
    rng: np.random.Generator,
    radius_min_px: float,
    radius_max_px: float,
    max_leaves: int = 20_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Occluding random discs (the dead-leaves model), returned as two independent material maps.

    Radii follow the scale-invariant density p(r) ∝ r⁻³ between the bounds, which gives natural-image
    statistics; each leaf has its own absorption and its own phase, so amplitude and phase are not copies
    of one another. Leaves fall front to back: a new leaf only paints pixels that no earlier leaf covers,
    which is the exact dead-leaves construction and stops once the plane is covered.
    """
    if not 0 < radius_min_px <= radius_max_px:
        raise ValueError(
            f"dead-leaves radii [{radius_min_px}, {radius_max_px}] px: "
            "need 0 < radius_min_px <= radius_max_px"
        )
    height, width = shape_px
    absorption = np.zeros(shape_px, dtype=np.float64)
    phase = np.zeros(shape_px, dtype=np.float64)
    covered = np.zeros(shape_px, dtype=bool)
    uncovered_count = covered.size
    for _ in range(max_leaves):
        # Inverse-CDF sample of p(r) ∝ r⁻³ on [r_min, r_max].
        u = rng.random()
        inv_sq = radius_min_px**-2 - u * (radius_min_px**-2 - radius_max_px**-2)
        radius = inv_sq**-0.5
        centre_y = rng.uniform(-radius, height + radius)
        centre_x = rng.uniform(-radius, width + radius)
        leaf_absorption, leaf_phase = rng.random(2)
        y0, y1 = max(int(centre_y - radius), 0), min(int(centre_y + radius) + 1, height)
        x0, x1 = max(int(centre_x - radius), 0), min(int(centre_x + radius) + 1, width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        new = ((yy - centre_y) ** 2 + (xx - centre_x) ** 2 <= radius**2) & ~covered[y0:y1, x0:x1]
        absorption[y0:y1, x0:x1][new] = leaf_absorption
        phase[y0:y1, x0:x1][new] = leaf_phase
        covered[y0:y1, x0:x1] |= new
        uncovered_count -= int(new.sum())
        if uncovered_count == 0:
            break
    return absorption, phase


def complex_transmission(
    absorption_material: np.ndarray,
    phase_material: np.ndarray,
    amplitude_min: float,
    phase_range_rad: float,
) -> np.ndarray:
    """Map material fractions in [0, 1] to a complex64 transmission with |O| in [amplitude_min, 1]."""
    amplitude = 1.0 - (1.0 - amplitude_min) * absorption_material
    return (amplitude * np.exp(1j * phase_range_rad * phase_material)).astype(np.complex64)

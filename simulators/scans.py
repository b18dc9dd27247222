"""Scan trajectories: probe centres (y, x) relative to the scan centre, in object-grid pixels.

The step between neighbouring positions follows from the probe diameter and the linear overlap,
``step = diameter · (1 − overlap)``. Each path also carries the displacement of the probe during one
exposure in a fly scan (``travel_px``), so that motion blur can be simulated along the scan direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

# 2π / φ², the golden angle: successive Fermat-spiral points never line up radially.
GOLDEN_ANGLE_RAD = math.pi * (3.0 - math.sqrt(5.0))


class ScanKind(StrEnum):
    RASTER = "raster"
    FERMAT_SPIRAL = "fermat_spiral"


@dataclass(frozen=True)
class ScanPath:
    positions_px: np.ndarray  # (n, 2) float64 probe centres (y, x), relative to the scan centre
    travel_px: np.ndarray  # (n, 2) float64 probe displacement during one fly-scan exposure
    scan_shape: tuple[int, ...]  # (rows, columns) for a raster, (n,) for a spiral


def step_from_overlap(probe_diameter_px: float, overlap_fraction: float) -> float:
    if not 0.0 <= overlap_fraction < 1.0:
        raise ValueError(f"overlap_fraction={overlap_fraction}: use a value in [0, 1)")
    return probe_diameter_px * (1.0 - overlap_fraction)


def raster_scan(n_positions: int, step_px: float) -> ScanPath:
    """The most nearly square grid with at least ``n_positions`` points, filled row by row.

    When ``n_positions`` is not rows × columns the last row is partial; the grid stays centred on the full
    rectangle. Every row runs left to right, the fly-scan motion is along +x.
    """
    _check_scan(n_positions, step_px)
    columns = math.ceil(math.sqrt(n_positions))
    rows = math.ceil(n_positions / columns)
    index = np.arange(n_positions)
    row, column = np.divmod(index, columns)
    positions = np.stack([(row - (rows - 1) / 2) * step_px, (column - (columns - 1) / 2) * step_px], axis=1)
    travel = np.zeros_like(positions)
    travel[:, 1] = step_px
    return ScanPath(positions_px=positions.astype(np.float64), travel_px=travel, scan_shape=(rows, columns))


def fermat_spiral_scan(n_positions: int, step_px: float) -> ScanPath:
    """Fermat spiral r_k = c √k, θ_k = k · golden angle (Huang et al., Opt. Express 22, 12634 (2014)).

    Each point of the spiral covers an area π c²; setting π c² = step² gives the same position density as
    a square raster of that step, so the overlap means the same thing for both scans. The nearest-neighbour
    distance is then about 0.95 · step everywhere except at the very centre. In a fly scan the stage moves
    one step along the local azimuthal direction during an exposure.
    """
    _check_scan(n_positions, step_px)
    spiral_constant = step_px / math.sqrt(math.pi)
    index = np.arange(n_positions, dtype=np.float64)
    radius = spiral_constant * np.sqrt(index)
    angle = index * GOLDEN_ANGLE_RAD
    positions = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    travel = step_px * np.stack([np.cos(angle), -np.sin(angle)], axis=1)
    return ScanPath(positions_px=positions, travel_px=travel, scan_shape=(n_positions,))


def make_scan(kind: ScanKind, n_positions: int, step_px: float) -> ScanPath:
    if kind is ScanKind.RASTER:
        return raster_scan(n_positions, step_px)
    return fermat_spiral_scan(n_positions, step_px)


def _check_scan(n_positions: int, step_px: float) -> None:
    if n_positions < 1:
        raise ValueError(f"n_positions={n_positions}: a scan needs at least one position")
    if step_px <= 0:
        raise ValueError(f"step_px={step_px}: the scan step must be positive (overlap below 1)")

"""What the refine stage keeps per scan, and the checks on its frames that need no solver.

:class:`ScanSolve` holds one scan's solver and what maps its positions to canvas pixels. The functions
here decide which positions would stretch the canvas beyond its bound (:func:`position_outliers`), when the
error has stopped improving (:func:`converged`), and how frames binned by the upstream stage are brought
to counts per detector frame (:func:`per_detector_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from phasestream.runtime.messages import FrameBatch, Reconstruction, ScanStart

if TYPE_CHECKING:
    from phasestream.models.ptycho.epie import EpieSolver

OUTLIER_WARNING_INTERVAL_S = 10.0
"""At most one warning per scan about left-out positions in this many seconds."""


@dataclass
class ScanSolve:
    """One scan's solver and what it needs to map positions to canvas pixels."""

    start: ScanStart
    pixel_size_m: float
    pending_patterns: list[np.ndarray] = field(default_factory=list)
    pending_positions: list[np.ndarray] = field(default_factory=list)
    fed_positions_m: list[np.ndarray] = field(default_factory=list)
    origin_m: np.ndarray | None = None
    solver: EpieSolver | None = None
    mosaic: Reconstruction | None = None
    last_error: float = float("nan")
    error_history: list[float] = field(default_factory=list)
    epochs_at_scan_end: int | None = None
    seq: int = 0
    # The bounding box (y, x) in metres of the positions accepted so far (and of the canvas origin, when the
    # scan's extent fixed it): no position may stretch it beyond max_canvas_px.
    accepted_lo_m: np.ndarray | None = None
    accepted_hi_m: np.ndarray | None = None
    outlier_warned_s: float = float("-inf")

    @property
    def pending_count(self) -> int:
        return sum(len(p) for p in self.pending_patterns)


def canvas_span_px(max_canvas_px: int, window_px: tuple[int, ...], margin_px: int) -> np.ndarray:
    """How far apart (y, x) in canvas pixels positions may lie for the canvas to fit ``max_canvas_px``:
    the canvas spans the positions plus a window and a margin each side, and 2 px more for rounding."""
    return max_canvas_px - np.asarray(window_px) - 2 * margin_px - 2


def position_outliers(
    solve: ScanSolve, positions: np.ndarray, window_px: tuple[int, ...], span_px: np.ndarray
) -> np.ndarray:
    """Which positions (bool, per row) lie outside the scan's extent plus a probe window, or would
    stretch the accepted positions' bounding box beyond ``span_px``; the others widen the box."""
    outlier = np.zeros(len(positions), dtype=bool)
    if not len(positions):
        return outlier
    window_m = np.asarray(window_px, dtype=np.float64) * solve.pixel_size_m
    extent = solve.start.scan_extent_m
    if extent is not None:
        y_min, y_max, x_min, x_max = extent
        low_m, high_m = np.array([y_min, x_min]) - window_m, np.array([y_max, x_max]) + window_m
        outlier |= ((positions < low_m) | (positions > high_m)).any(axis=1)
    span_m = np.maximum(span_px, 0) * solve.pixel_size_m
    if solve.accepted_lo_m is None:
        # The canvas origin when the extent fixed it, else the median (robust to one wild position).
        seed_m = solve.origin_m if solve.origin_m is not None else np.median(positions[~outlier], axis=0)
        solve.accepted_lo_m = solve.accepted_hi_m = np.asarray(seed_m, dtype=np.float64)
    inside = positions[~outlier]
    if not len(inside):
        return outlier
    low_m = np.minimum(solve.accepted_lo_m, inside.min(axis=0))
    high_m = np.maximum(solve.accepted_hi_m, inside.max(axis=0))
    if (high_m - low_m <= span_m).all():
        solve.accepted_lo_m, solve.accepted_hi_m = low_m, high_m
        return outlier
    for row in np.flatnonzero(~outlier):  # the rare batch that overreaches: position by position
        low_m = np.minimum(solve.accepted_lo_m, positions[row])
        high_m = np.maximum(solve.accepted_hi_m, positions[row])
        if (high_m - low_m <= span_m).all():
            solve.accepted_lo_m, solve.accepted_hi_m = low_m, high_m
        else:
            outlier[row] = True
    return outlier


def outlier_warning(
    solve: ScanSolve, batch: FrameBatch, outliers_m: np.ndarray, span_px: np.ndarray, max_canvas_px: int
) -> str:
    """The warning that names the first left-out position of ``batch`` and the bound it broke."""
    y_m, x_m = outliers_m[0]
    extent = solve.start.scan_extent_m
    bound = (
        f"the scan's extent y {extent[0]:.6g}..{extent[1]:.6g} m, x {extent[2]:.6g}..{extent[3]:.6g} m "
        "plus a probe window, or "
        if extent is not None
        else ""
    )
    return (
        f"scan {solve.start.scan_uid}: {len(outliers_m)} position(s) in frames {batch.first_index}.."
        f"{batch.last_index}, first (y, x) = ({y_m:.6g}, {x_m:.6g}) m, lie outside {bound}the "
        f"{span_px[0]}×{span_px[1]} px around the positions so far that max_canvas_px="
        f"{max_canvas_px} allows; left out of the reconstruction (fix the position "
        "source, or raise max_canvas_px for a larger scan)"
    )


def converged(solve: ScanSolve, tolerance: float | None, window_epochs: int) -> bool:
    """Whether the error stopped improving since ScanEnd: the last window's mean error is within
    ``tolerance`` of the window before (means, because the random order makes each epoch's error
    jitter). None never stops early."""
    after_end = solve.error_history[solve.epochs_at_scan_end or 0 :]
    if tolerance is None or len(after_end) < 2 * window_epochs:
        return False
    before = float(np.mean(after_end[-2 * window_epochs : -window_epochs]))
    last = float(np.mean(after_end[-window_epochs:]))
    return before <= 0 or (before - last) / before < tolerance


def stop_label(reason: str, epochs: int) -> str:
    return f"{reason} after {epochs} epochs on the complete scan"


def per_detector_frame(batch: FrameBatch) -> np.ndarray:
    """Counts per detector frame, so bins holding fewer frames (the end of a batch) match the others."""
    patterns = np.asarray(batch.frames, dtype=np.float32)
    if batch.detector_frames:
        patterns = patterns / np.asarray(batch.detector_frames, dtype=np.float32)[:, None, None]
    return patterns

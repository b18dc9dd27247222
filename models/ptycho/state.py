"""What an ePIE solver holds between epochs: the object canvas, the probe modes, where every window lies,
and the measured patterns (:class:`~phasestream.models.ptycho.patterns.PatternStore`).

Window corners are pixels (y, x) in the caller's frame, whole or fractional: each window is cut from the
canvas at the nearest whole pixel and the probe is moved by the rest. The canvas grows, padded with ones
(free space), whenever a window falls outside it, and :attr:`ScanState.origin_px` says where the caller's
(0, 0) lies on it.
"""

from __future__ import annotations

import numpy as np
import torch

from phasestream.errors import ConfigError, FrameValidationError, PositionError
from phasestream.models.physics import probe_from_patterns
from phasestream.models.ptycho.modes import initial_modes, split_positions
from phasestream.models.ptycho.patterns import PatternStore, validated_intensities


class ScanState:
    """Object, probe modes (k, ny, nx), window positions and patterns of one reconstruction on ``device``.

    The object starts as ``object_guess`` or as ones on a canvas of ``canvas_shape_px`` (or just large
    enough for the first windows). A ``probe`` of one mode, or fewer than ``n_modes``, is topped up with
    weak extra modes drawn with ``seed``; without one, the first patterns' mean gives it.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        n_modes: int,
        seed: int,
        probe: np.ndarray | torch.Tensor | None = None,
        object_guess: np.ndarray | torch.Tensor | None = None,
        canvas_shape_px: tuple[int, int] | None = None,
        unmeasured: np.ndarray | None = None,
    ) -> None:
        self.device = device
        self.n_modes = n_modes
        self._seed = seed
        self.probe: torch.Tensor | None = None
        if probe is not None:
            given = torch.as_tensor(probe).to(device, torch.complex64)
            if given.ndim not in (2, 3) or (given.ndim == 3 and len(given) > n_modes):
                raise ConfigError(
                    f"probe has shape {tuple(given.shape)} for probe.modes={n_modes}: pass one probe "
                    "(ny, nx) or at most probe.modes modes (k, ny, nx)"
                )
            self.set_probe(given)
        if object_guess is not None:
            self.object = torch.as_tensor(object_guess).to(device, torch.complex64).clone()
            if self.object.ndim != 2 or canvas_shape_px not in (None, tuple(self.object.shape)):
                raise ConfigError(
                    f"object_guess has shape {tuple(self.object.shape)} and canvas_shape_px is "
                    f"{canvas_shape_px!r}: pass one 2D guess and leave canvas_shape_px out"
                )
        else:
            canvas_shape = (0, 0) if canvas_shape_px is None else tuple(canvas_shape_px)
            self.object = torch.ones(canvas_shape, dtype=torch.complex64, device=device)
        self.origin_px = np.zeros(2, dtype=np.int64)
        """Canvas pixel (y, x) of the caller's window corner (0, 0)."""
        self.corners_px = np.empty((0, 2), dtype=np.int64)
        """Whole-pixel window corners (n, 2) in the caller's frame."""
        self.subpixel_px = np.empty((0, 2), dtype=np.float32)
        """What each corner lies beyond its whole pixel (n, 2), by which the probe is moved."""
        self.patterns = PatternStore(device, unmeasured)

    @property
    def n_positions(self) -> int:
        return self.patterns.count

    @property
    def window_px(self) -> tuple[int, int]:
        return tuple(self.probe.shape[-2:])

    @property
    def positions_px(self) -> np.ndarray:
        """Window corners (n, 2) (y, x) in the caller's frame, float64, as refined so far."""
        return self.corners_px + self.subpixel_px.astype(np.float64)

    @property
    def has_subpixel_windows(self) -> bool:
        return bool(self.subpixel_px.any())

    def canvas_corners(self) -> list[list[int]]:
        """Every window's corner (y, x) in canvas pixels."""
        return (self.corners_px + self.origin_px).tolist()

    def set_probe(self, probe: torch.Tensor) -> None:
        """Store (k, ny, nx) modes, topping a single probe or too few modes up to ``n_modes``."""
        modes = probe.unsqueeze(0) if probe.ndim == 2 else probe
        if len(modes) < self.n_modes:
            extra = initial_modes(modes[0], self.n_modes - len(modes) + 1, seed=self._seed)[1:]
            modes = torch.cat([modes, extra.to(modes.device)])
        self.probe = modes.to(self.device, torch.complex64).clone()

    def add(self, patterns: np.ndarray | torch.Tensor, top_left_px: np.ndarray) -> None:
        """Append intensities (n, ny, nx), centred, and their window corners (n, 2) (y, x).

        Without a probe the first call sets it from these patterns' mean.
        """
        intensities = validated_intensities(patterns, self.device)
        corners = _validated_corners(top_left_px, len(intensities))
        pattern_shape = tuple(intensities.shape[1:])
        if self.probe is None:
            self.set_probe(probe_from_patterns(intensities.mean(dim=0)))
        if self.window_px != pattern_shape:
            raise FrameValidationError(
                f"patterns are {pattern_shape} but the probe is {self.window_px}: "
                "bin or crop the frames to the probe's shape, or start a new solver"
            )
        self.patterns.append(intensities)
        whole_px, subpixel_px = split_positions(corners)
        self.grow_to_fit(whole_px)
        self.corners_px = np.concatenate([self.corners_px, whole_px])
        self.subpixel_px = np.concatenate([self.subpixel_px, subpixel_px])

    def grow_to_fit(self, corners_px: np.ndarray) -> None:
        """Pad the canvas with ones until the windows at whole-pixel ``corners_px`` lie inside it."""
        window_px = np.asarray(self.window_px)
        canvas_px = np.asarray(self.object.shape)
        first_px = corners_px.min(axis=0) + self.origin_px
        end_px = corners_px.max(axis=0) + self.origin_px + window_px
        pad_before = np.maximum(0, -first_px)
        pad_after = np.maximum(0, end_px - canvas_px)
        if not (pad_before.any() or pad_after.any()):
            return
        grown_shape = tuple(canvas_px + pad_before + pad_after)
        grown = torch.ones(grown_shape, dtype=torch.complex64, device=self.device)
        top_px, left_px = pad_before
        grown[top_px : top_px + canvas_px[0], left_px : left_px + canvas_px[1]] = self.object
        self.object = grown
        self.origin_px = self.origin_px + pad_before

    def move_positions(self, steps_px: np.ndarray, max_step_px: float) -> None:
        """Move every window by ``steps_px`` (n, 2), each clipped to ``max_step_px`` per axis, less their
        mean: the data cannot tell a common shift of every window, so the mean position stays where the
        caller put it."""
        steps_px = np.clip(steps_px, -max_step_px, max_step_px)
        steps_px -= steps_px.mean(axis=0)
        whole_px, subpixel_px = split_positions(self.positions_px + steps_px)
        self.grow_to_fit(whole_px)
        self.corners_px, self.subpixel_px = whole_px, subpixel_px

    def flat_window_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat canvas offset of every window corner (n,) and the flat offsets inside a window (1, ny, nx)."""
        canvas_width = self.object.shape[1]
        corners = torch.from_numpy(self.corners_px + self.origin_px).to(self.device)
        flat_offsets = corners[:, 0] * canvas_width + corners[:, 1]
        rows = torch.arange(self.window_px[0], device=self.device).view(-1, 1)
        cols = torch.arange(self.window_px[1], device=self.device).view(1, -1)
        return flat_offsets, (rows * canvas_width + cols).unsqueeze(0)

    def illumination(self, batch_size: int) -> np.ndarray:
        """Σ_j |P(r − R_j)|² on the canvas (float32), summed ``batch_size`` windows at a time."""
        if self.probe is None or self.n_positions == 0:
            return np.zeros(tuple(self.object.shape), dtype=np.float32)
        total = torch.zeros(self.object.numel(), dtype=torch.float32, device=self.device)
        probe_intensity = (self.probe * self.probe.conj()).real.sum(dim=0)
        flat_offsets, window_grid = self.flat_window_index()
        for start in range(0, self.n_positions, batch_size):
            offsets = flat_offsets[start : start + batch_size]
            index = (offsets.view(-1, 1, 1) + window_grid).view(-1)
            total.index_add_(0, index, probe_intensity.expand(len(offsets), -1, -1).reshape(-1))
        return total.view(self.object.shape).cpu().numpy()


def _validated_corners(top_left_px: np.ndarray, n_patterns: int) -> np.ndarray:
    corners = np.asarray(top_left_px)
    if corners.shape != (n_patterns, 2):
        raise PositionError(
            f"top_left_px has shape {corners.shape}: pass ({n_patterns}, 2) window corners (y, x)"
        )
    if corners.dtype.kind not in "iuf" or not np.isfinite(corners).all():
        raise PositionError(
            f"top_left_px (dtype {corners.dtype}) holds non-finite or non-numeric corners: "
            "fix the position source; every window needs a finite (y, x)"
        )
    return corners.astype(np.float64)

"""Refine: streaming ePIE that starts on the first positions and keeps extending as frames arrive.

Frames are added to the solver as they come; between arrivals the runtime calls ``idle()``, which runs
one epoch over every position known so far and emits a ``Reconstruction`` every few epochs. After
``ScanEnd`` it runs a set number of epochs on the complete scan and emits the final estimate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from phasestream.errors import FrameValidationError
from phasestream.runtime import metrics
from phasestream.runtime.messages import FrameBatch, Message, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage

if TYPE_CHECKING:
    from phasestream.models.ptycho.epie import EpieSolver


class Algorithm(StrEnum):
    EPIE = "epie"
    RPIE = "rpie"
    PINE = "pine"  # ePIE sweeps, then O ← (1 − ρ)O + ρ D(O) with the shipped nonexpansive denoiser


class InitialObject(StrEnum):
    FLAT = "flat"  # ones: free space
    MOSAIC = "mosaic"  # the inversion stage's neural mosaic, when one arrives before the first epoch
    # Its amplitude with a flat phase: the shipped 2D network does not learn the phase, and on the demo
    # scan the full mosaic slows ePIE (error 0.31 against 0.16 from flat after 20 epochs) while its
    # amplitude alone helps a little (0.155).
    MOSAIC_AMPLITUDE = "mosaic_amplitude"


class RefineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm = Algorithm.EPIE
    variant: str = Field(default="batched", pattern="^(batched|sequential)$")
    batch_size: int = Field(default=32, ge=1, le=4096, description="positions per mini-batch (batched)")
    min_positions: int = Field(
        default=32, ge=1, description="positions that must arrive before the first epoch"
    )
    epochs_after_scan: int = Field(
        default=300, ge=0, description="most epochs on the complete scan after ScanEnd"
    )
    stop_tolerance: float | None = Field(
        default=1e-3,
        gt=0,
        lt=1,
        description="after ScanEnd, stop when the mean error of the last stop_window_epochs improved on the "
        "window before by less than this fraction; None runs all epochs_after_scan",
    )
    # The Fourier error settles before the object does: on 500 positions of 128 × 128 px, windows of 10
    # epochs stopped at epoch 97 with the object error 18 % above its plateau; windows of 25 stop at 169,
    # within 3 % of it (docs/benchmarks.md).
    stop_window_epochs: int = Field(default=25, ge=1, le=1000, description="epochs per convergence window")
    emit_every_epochs: int = Field(default=2, ge=1, description="a Reconstruction every this many epochs")
    object_step: float = Field(default=1.0, gt=0, le=2, description="ePIE α")
    probe_step: float = Field(default=1.0, gt=0, le=2, description="ePIE β")
    rpie_alpha: float = Field(
        default=0.1, gt=0, le=1, description="rPIE α, the object denominator's weight (algorithm rpie only)"
    )
    pine_rho: float = Field(default=0.49, gt=0, lt=1, description="PINE's ρ (algorithm pine only)")
    probe_update_start_epoch: int = Field(default=2, ge=0)
    fourier_constraint: str = Field(
        default="projection", pattern="^(projection|poisson)$",
        description="the modulus projection, or a Poisson likelihood step for low dose",
    )  # fmt: skip
    fix_probe_power: bool = Field(
        default=False, description="hold the probe's power at its start value (low dose, with probe updates)"
    )
    probe_power: float | None = Field(
        default=None, gt=0, description="with fix_probe_power: the direct beam's photons per frame to hold"
    )
    max_object_amplitude: float | None = Field(
        default=None, gt=0, description="bound |O|, 1 for a transmission sample; None leaves it free"
    )
    probe_modes: int = Field(
        default=1, ge=1, le=16, description="incoherent probe modes (mixed states); 1 is a coherent probe"
    )
    position_correction_start_epoch: int | None = Field(
        default=None, ge=0, description="refine scan positions from this epoch on; None keeps them as given"
    )
    max_position_step_px: float = Field(
        default=1.0, gt=0, le=8, description="largest position correction per epoch and axis"
    )
    margin_px: int = Field(default=4, ge=0, description="free canvas around the outermost windows")
    max_canvas_px: int = Field(
        default=8192, ge=64, le=65536,
        description="most canvas pixels per side: a position that would stretch the canvas beyond it is "
        "left out as position_outlier (the scan's extent, when its start gives one, bounds it too)",
    )  # fmt: skip
    initial_object: InitialObject = Field(
        default=InitialObject.FLAT, description="start object; mosaic needs an inversion stage upstream"
    )
    initial_probe: str = Field(
        default="auto",
        description="auto (searched in the data), previous (the last scan's with this geometry), or a file: "
        "probe.npy, scan.cxi::/entry_1/instrument_1/source_1/illumination, a CXI, .ptyr or result file",
    )
    probe_search_epochs: int = Field(
        default=6, ge=0, description="epochs per candidate in the automatic probe search; 0: off"
    )
    device: str | None = Field(default=None, description="torch device; default cuda when present, else cpu")
    torch_threads: int | None = Field(default=None, ge=1, description="CPU threads for torch (default: all)")

    @field_validator("initial_probe")
    @classmethod
    def _probe_loads(cls, text: str) -> str:
        from phasestream.stages.probe_start import parse_initial_probe

        return parse_initial_probe(text)


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


class RefineStage(Stage):
    Config = RefineConfig
    config: RefineConfig
    idle_poll_ms = 0

    def setup(self) -> None:
        import torch

        from phasestream.stages.probe_start import PreviousProbes, load_initial_probe

        torch.set_num_threads(self.config.torch_threads or os.cpu_count() or 1)
        self._solves: dict[str, ScanSolve] = {}
        self._denoiser = None  # PINE's, loaded once on first use
        self._given_probe = load_initial_probe(self.config.initial_probe)
        self._previous_probes = PreviousProbes(self.pipeline.run_dir / "probes" / self.stage_name)

    def has_open_scan(self) -> bool:
        return any(s.solver is not None for s in self._solves.values())

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        from phasestream.models.physics import object_pixel_size_m

        geometry = message.geometry
        pixel_size_m = object_pixel_size_m(
            geometry.energy_kev,
            geometry.detector_distance_m,
            geometry.pixel_size_m,
            geometry.detector_shape_px[0],
        )
        solve = ScanSolve(start=message, pixel_size_m=pixel_size_m)
        if message.scan_extent_m is not None:
            y_min, _, x_min, _ = message.scan_extent_m
            solve.origin_m = np.array([y_min, x_min])
        self._solves[message.scan_uid] = solve
        yield message

    def process(self, message: Message) -> Iterable[Message]:
        if not isinstance(message, FrameBatch):
            self._keep_mosaic(message)
            yield message
            return
        solve = self._solves.get(message.scan_uid)
        if solve is None:
            raise FrameValidationError(
                f"frames {message.first_index}..{message.last_index} of scan {message.scan_uid} arrived "
                "before its ScanStart, so they cannot be placed; check the stage before refine",
                reason="no_scan_start",
            )
        patterns = _per_detector_frame(message)
        if not np.isfinite(message.positions_m).all():
            raise FrameValidationError(
                f"frames {message.first_index}..{message.last_index}: positions hold NaN or inf; "
                "fix the position source",
                reason="not_finite",
            )
        positions = np.asarray(message.positions_m, dtype=np.float64)
        n_frames = len(message.frame_indices)
        per_pattern = np.asarray(message.detector_frames or [1] * len(patterns))
        empty = patterns.reshape(len(patterns), -1).max(axis=1) <= 0
        if empty.any():
            # A dark frame (shutter closed, beam lost) would pull the object to zero where it fell: leave
            # it out, say so, and account for it.
            n_empty = int(per_pattern[empty].sum())
            self.reject_frames(message.scan_uid, "zero_photons", n_empty)
            self.warn(
                "zero_photons",
                f"scan {message.scan_uid}: {n_empty} frame(s) in {message.first_index}..{message.last_index} "
                "hold no photons (shutter closed or beam lost?); left out of the reconstruction",
            )
            patterns, positions, n_frames = patterns[~empty], positions[~empty], n_frames - n_empty
            per_pattern = per_pattern[~empty]
        outlier = self._position_outliers(solve, positions, patterns.shape[1:])
        if outlier.any():
            # One wild position would make the canvas as large as the distance to it (1 mm: 2.3 GB):
            # the frame is left out instead, never allocated for.
            n_outliers = int(per_pattern[outlier].sum())
            self.reject_frames(message.scan_uid, "position_outlier", n_outliers)
            self._warn_outliers(solve, message, positions[outlier], patterns.shape[1:])
            patterns, positions, n_frames = patterns[~outlier], positions[~outlier], n_frames - n_outliers
        self.count(message.scan_uid, "frames_used", n_frames)
        if not len(patterns):
            return
        solve.pending_patterns.append(patterns)
        solve.pending_positions.append(positions)
        if solve.solver is not None or solve.pending_count >= self.config.min_positions:
            self._feed(solve)

    def _position_outliers(
        self, solve: ScanSolve, positions: np.ndarray, window_px: tuple[int, ...]
    ) -> np.ndarray:
        """Which positions (bool, per row) lie outside the scan's extent plus a probe window, or would
        stretch the accepted positions' bounding box beyond ``max_canvas_px``; the others widen the box."""
        outlier = np.zeros(len(positions), dtype=bool)
        if not len(positions):
            return outlier
        window_m = np.asarray(window_px, dtype=np.float64) * solve.pixel_size_m
        extent = solve.start.scan_extent_m
        if extent is not None:
            y_min, y_max, x_min, x_max = extent
            low_m, high_m = np.array([y_min, x_min]) - window_m, np.array([y_max, x_max]) + window_m
            outlier |= ((positions < low_m) | (positions > high_m)).any(axis=1)
        # The canvas spans the box plus a window and a margin each side; 2 px more for rounding.
        span_m = np.maximum(self._canvas_span_px(window_px), 0) * solve.pixel_size_m
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

    def _canvas_span_px(self, window_px: tuple[int, ...]) -> np.ndarray:
        """How far apart (y, x) in canvas pixels positions may lie for the canvas to fit max_canvas_px."""
        return self.config.max_canvas_px - np.asarray(window_px) - 2 * self.config.margin_px - 2

    def _warn_outliers(
        self, solve: ScanSolve, batch: FrameBatch, outliers_m: np.ndarray, window_px: tuple[int, ...]
    ) -> None:
        """Name the first left-out position and the bound it broke, at most every few seconds per scan."""
        now_s = time.monotonic()
        if now_s - solve.outlier_warned_s < _OUTLIER_WARNING_INTERVAL_S:
            return
        solve.outlier_warned_s = now_s
        y_m, x_m = outliers_m[0]
        extent = solve.start.scan_extent_m
        bound = (
            f"the scan's extent y {extent[0]:.6g}..{extent[1]:.6g} m, x {extent[2]:.6g}..{extent[3]:.6g} m "
            "plus a probe window, or "
            if extent is not None
            else ""
        )
        span_px = self._canvas_span_px(window_px)
        self.warn(
            "position_outlier",
            f"scan {solve.start.scan_uid}: {len(outliers_m)} position(s) in frames {batch.first_index}.."
            f"{batch.last_index}, first (y, x) = ({y_m:.6g}, {x_m:.6g}) m, lie outside {bound}the "
            f"{span_px[0]}×{span_px[1]} px around the positions so far that max_canvas_px="
            f"{self.config.max_canvas_px} allows; left out of the reconstruction (fix the position "
            "source, or raise max_canvas_px for a larger scan)",
        )

    def _feed(self, solve: ScanSolve) -> None:
        from phasestream.models.physics import positions_to_pixels

        patterns = np.concatenate(solve.pending_patterns)
        positions = np.concatenate(solve.pending_positions)
        solve.pending_patterns.clear()
        solve.pending_positions.clear()
        solve.fed_positions_m.append(positions)
        if solve.origin_m is None:
            solve.origin_m = positions.min(axis=0)
        pixels = positions_to_pixels(
            positions, solve.pixel_size_m, patterns.shape[1:], margin_px=self.config.margin_px,
            origin_m=tuple(solve.origin_m),
        )  # fmt: skip
        if solve.solver is None:
            probe = self._first_probe(solve, patterns, pixels.top_left_px, pixels.canvas_shape_px)
            start = self._start_object(solve, pixels.canvas_shape_px, patterns.shape[1:])
            mask = solve.start.detector_mask()
            solve.solver = self._new_solver(probe, pixels.canvas_shape_px, start, unmeasured=mask)
        solve.solver.add_patterns(patterns, pixels.top_left_px)

    def _keep_mosaic(self, message: Message) -> None:
        """Hold the latest neural mosaic of a scan whose solver has not started, to start from it."""
        if self.config.initial_object is InitialObject.FLAT:
            return
        if not isinstance(message, Reconstruction) or message.product is not Product.MOSAIC:
            return
        solve = self._solves.get(message.scan_uid)
        if solve is not None and solve.solver is None:
            solve.mosaic = message

    def _start_object(
        self, solve: ScanSolve, canvas_shape_px: tuple[int, int], window_px: tuple[int, int]
    ) -> np.ndarray | None:
        """The mosaic resampled onto the new canvas (ones where it has nothing), or None for a flat start."""
        if solve.mosaic is None:
            return None
        from phasestream.stages.inversion import resample_object

        # Canvas pixel c holds position origin + (c − margin − N//2)·dx (see _reconstruction).
        centre_px = self.config.margin_px + np.array(window_px) // 2
        origin_m = solve.origin_m - centre_px * solve.pixel_size_m
        mosaic = solve.mosaic
        start_label = str(self.config.initial_object)
        self.report_status(object_start=start_label, mosaic_positions=mosaic.positions_used)
        start = resample_object(
            mosaic.object, mosaic.origin_m, mosaic.object_pixel_size_m, canvas_shape_px,
            (float(origin_m[0]), float(origin_m[1])), solve.pixel_size_m,
        )  # fmt: skip
        if self.config.initial_object is InitialObject.MOSAIC_AMPLITUDE:
            start = np.abs(start).astype(np.complex64)
        return start

    def _new_solver(
        self,
        probe: np.ndarray | None,
        canvas_shape_px: tuple[int, int],
        object_guess: np.ndarray | None = None,
        unmeasured: np.ndarray | None = None,
    ) -> EpieSolver:
        from phasestream.models.ptycho.epie import EpieSolver, UpdateRule

        regulariser = None
        if self.config.algorithm is Algorithm.PINE:
            from phasestream.models.nets.dncnn import load_denoiser
            from phasestream.models.ptycho.pine import PineRegulariser

            if self._denoiser is None:
                self._denoiser = load_denoiser(device=self.config.device)
            regulariser = PineRegulariser(self._denoiser, self.config.pine_rho)
        return EpieSolver(
            probe=probe,
            variant=self.config.variant,
            update_rule=UpdateRule.RPIE if self.config.algorithm is Algorithm.RPIE else UpdateRule.EPIE,
            object_regulariser=regulariser,
            rpie_alpha=self.config.rpie_alpha,
            batch_size=self.config.batch_size,
            object_step=self.config.object_step,
            probe_step=self.config.probe_step,
            probe_update_start_epoch=self.config.probe_update_start_epoch,
            fourier_constraint=self.config.fourier_constraint,
            fix_probe_power=self.config.fix_probe_power,
            probe_power=self.config.probe_power,
            max_object_amplitude=self.config.max_object_amplitude,
            probe_modes=self.config.probe_modes,
            position_correction_start_epoch=self.config.position_correction_start_epoch,
            max_position_step_px=self.config.max_position_step_px,
            unmeasured=unmeasured,
            canvas_shape_px=None if object_guess is not None else canvas_shape_px,
            object_guess=object_guess,
            device=self.config.device,
        )

    def _first_probe(
        self, solve: ScanSolve, patterns: np.ndarray, corners_px: np.ndarray, canvas_shape_px: tuple[int, int]
    ) -> np.ndarray | None:
        """The probe this scan starts from (see ``stages.probe_start``), logged with why it was chosen."""
        from phasestream.formats.probe_source import ProbeStartKind
        from phasestream.stages.probe_start import (
            ProbeStart,
            auto_start,
            geometry_key,
            loaded_start,
            start_kind,
        )

        kind = start_kind(self.config.initial_probe)
        uid = solve.start.scan_uid
        mean_intensity = patterns.mean(axis=0)
        window_px = (patterns.shape[1], patterns.shape[2])
        start: ProbeStart | None = None
        if kind is ProbeStartKind.FILE:
            start = loaded_start(self._given_probe, solve.pixel_size_m, window_px, mean_intensity)
        elif kind is ProbeStartKind.PREVIOUS:
            previous = self._previous_probes.get(geometry_key(solve.start.geometry, window_px))
            if previous is not None:
                start = ProbeStart(
                    previous, "previous", "the last completed scan's final probe, same geometry"
                )
            else:
                self.note(
                    "probe_start", f"scan {uid}: no previous probe for this geometry; searching instead"
                )
        if start is None and self.config.probe_search_epochs == 0:
            start = ProbeStart(None, "mean pattern", "probe_search_epochs is 0: sqrt of the mean pattern")
        if start is None:
            unmeasured = solve.start.detector_mask()

            def trial_error(probe: np.ndarray) -> float:
                trial = self._new_solver(probe, canvas_shape_px, unmeasured=unmeasured)
                # With the probe free to adapt, the right curvature pulls ahead within a few epochs; with
                # the probe fixed, or after one or two epochs, a tight in-focus start can look as good.
                trial.probe_update_start_epoch = 0
                trial.add_patterns(patterns, corners_px)
                return [trial.run_epoch() for _ in range(self.config.probe_search_epochs)][-1]

            start = auto_start(patterns, corners_px, unmeasured, trial_error)
        self.note("probe_start", f"scan {uid}: probe from {start.label} ({start.reason})")
        self.report_status(probe_start=start.label)
        return start.probe

    def idle(self) -> Iterator[Message]:
        for solve in self._solves.values():
            if solve.solver is not None:
                yield from self._epoch(solve)

    def _epoch(self, solve: ScanSolve) -> Iterator[Message]:
        solver = solve.solver
        solve.last_error = solver.run_epoch()
        solve.error_history.append(solve.last_error)
        metrics.ITERATIONS.labels(stage=self.stage_name, worker=self.worker).inc()
        self.report_status(
            scan_uid=solve.start.scan_uid,
            iteration=solver.epochs_run,
            fourier_error=solve.last_error,
            positions_used=solver.n_positions,
        )
        if solver.epochs_run % self.config.emit_every_epochs == 0:
            yield self._reconstruction(solve, final=False)

    def _converged(self, solve: ScanSolve) -> bool:
        """Whether the error stopped improving since ScanEnd: the last window's mean error is within
        ``stop_tolerance`` of the window before (means, because the random order makes each epoch's
        error jitter)."""
        tolerance, window = self.config.stop_tolerance, self.config.stop_window_epochs
        after_end = solve.error_history[solve.epochs_at_scan_end or 0 :]
        if tolerance is None or len(after_end) < 2 * window:
            return False
        before = float(np.mean(after_end[-2 * window : -window]))
        last = float(np.mean(after_end[-window:]))
        return before <= 0 or (before - last) / before < tolerance

    def _reconstruction(self, solve: ScanSolve, final: bool, stop_reason: str = "") -> Reconstruction:
        solver = solve.solver
        probe_shape = np.array(solver.probe.shape)
        # Canvas pixel c holds the probe centre of position p when c = (p − origin)/dx + margin + corner
        # offset + N//2 (the probe is centred on pixel N//2 of its window); solve that for c = 0.
        offset_px = self.config.margin_px + np.array(solver.canvas_origin_px) + probe_shape // 2
        origin_m = solve.origin_m - offset_px * solve.pixel_size_m
        solve.seq += 1
        r_factor = solver.fourier_r_factor()
        metrics.FOURIER_R_FACTOR.labels(stage=self.stage_name, worker=self.worker).set(r_factor)
        return Reconstruction(
            scan_uid=solve.start.scan_uid,
            seq=solve.seq,
            algorithm=f"{self.config.algorithm}-{self.config.variant}",
            iteration=solver.epochs_run,
            positions_used=solver.n_positions,
            final=final,
            object_pixel_size_m=solve.pixel_size_m,
            origin_m=(float(origin_m[0]), float(origin_m[1])),
            quality={"fourier_error": float(solve.last_error), "r_factor": r_factor},
            error_history=list(solve.error_history) if final else [],
            stop_reason=stop_reason,
            object=solver.object,
            probe=solver.probe,
            positions_m=self._positions_used_m(solve),
        )

    def _positions_used_m(self, solve: ScanSolve) -> np.ndarray:
        """Probe centres (y, x) in metres as the solver uses them: corrected where correction ran."""
        if self.config.position_correction_start_epoch is None:
            return np.concatenate(solve.fed_positions_m)
        # Corner c (the caller's frame) holds position p when c = (p − origin)/dx + margin (see _feed).
        corners_px = solve.solver.positions_px
        return (corners_px - self.config.margin_px) * solve.pixel_size_m + solve.origin_m

    def _finish(self, solve: ScanSolve) -> Iterator[Message]:
        """Epochs on the complete scan until the error stops improving (or the most allowed), then the
        final estimate, whose probe the next scan with this geometry may start from."""
        from phasestream.stages.probe_start import geometry_key

        solve.epochs_at_scan_end = len(solve.error_history)
        reason = "epochs_after_scan reached"
        for _ in range(self.config.epochs_after_scan):
            if self.stopping:
                reason = "stopped"  # Ctrl-C: publish what there is now rather than finish the schedule
                break
            yield from self._epoch(solve)
            if self._converged(solve):
                reason = f"converged (error changed < {self.config.stop_tolerance:g} over the last window)"
                break
        epochs = len(solve.error_history) - solve.epochs_at_scan_end
        self.note("refine_end", f"scan {solve.start.scan_uid}: {_stop_label(reason, epochs)}, error "
                  f"{solve.last_error:.4g}")  # fmt: skip
        final = self._reconstruction(solve, final=True, stop_reason=_stop_label(reason, epochs))
        window_px = tuple(final.probe.shape[-2:])
        self._previous_probes.put(geometry_key(solve.start.geometry, window_px), np.asarray(final.probe))
        yield final

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        solve = self._solves.pop(message.scan_uid, None)
        if solve is not None:
            if solve.pending_count:
                self._feed(solve)  # fewer than min_positions in the whole scan: solve what there is
            if solve.solver is not None:
                yield from self._finish(solve)
        yield message


_OUTLIER_WARNING_INTERVAL_S = 10.0


def _stop_label(reason: str, epochs: int) -> str:
    return f"{reason} after {epochs} epochs on the complete scan"


def _per_detector_frame(batch: FrameBatch) -> np.ndarray:
    """Counts per detector frame, so bins holding fewer frames (the end of a batch) match the others."""
    patterns = np.asarray(batch.frames, dtype=np.float32)
    if batch.detector_frames:
        patterns = patterns / np.asarray(batch.detector_frames, dtype=np.float32)[:, None, None]
    return patterns

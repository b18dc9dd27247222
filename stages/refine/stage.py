"""Refine: streaming ePIE that starts on the first positions and keeps extending as frames arrive.

Frames are added to the solver as they come; between arrivals the runtime calls ``idle()``, which runs
one epoch over every position known so far and emits a ``Reconstruction`` every few epochs. After
``ScanEnd`` it runs a set number of epochs on the complete scan and emits the final estimate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from phasestream.errors import FrameValidationError
from phasestream.formats.probe_source import ProbeStartKind
from phasestream.models.execution import default_device, set_torch_threads
from phasestream.models.ptycho.options import (
    ConstraintOptions,
    EpieOptions,
    ExecutionOptions,
    ObjectOptions,
    PineOptions,
    PositionOptions,
    ProbeOptions,
    UpdateRule,
)
from phasestream.runtime import metrics
from phasestream.runtime.messages import FrameBatch, Message, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage
from phasestream.stages.inversion import resample_object
from phasestream.stages.probe_start import (
    PreviousProbes,
    ProbeStart,
    auto_start,
    geometry_key,
    load_initial_probe,
    loaded_start,
    parse_initial_probe,
    start_kind,
)
from phasestream.stages.refine.scan import (
    OUTLIER_WARNING_INTERVAL_S,
    ScanSolve,
    canvas_span_px,
    converged,
    outlier_warning,
    per_detector_frame,
    position_outliers,
    stop_label,
)

if TYPE_CHECKING:
    from phasestream.models.ptycho.epie import EpieSolver
    from phasestream.models.ptycho.pine import PineRegulariser


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
    """The refine stage's settings: when it starts and stops, where it starts from, and the solver's
    options in the groups of :class:`~phasestream.models.ptycho.options.EpieOptions` (``object``,
    ``probe``, ``positions``, ``constraints``, ``execution``), checked by the same rules as everywhere."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm = Field(
        default=Algorithm.EPIE,
        description="epie; rpie (regularised steps, object.rpie_alpha); or pine (ePIE with a denoiser "
        "between sweeps, pine.rho)",
    )
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
    object: ObjectOptions = Field(default_factory=ObjectOptions, description="ePIE α and rPIE's α")
    probe: ProbeOptions = Field(
        default_factory=ProbeOptions, description="ePIE β, rPIE's β, when probe updates start, probe modes"
    )
    positions: PositionOptions = Field(default_factory=PositionOptions, description="position correction")
    constraints: ConstraintOptions = Field(
        default_factory=ConstraintOptions,
        description="the Fourier step (projection or poisson), probe power and object amplitude bounds",
    )
    execution: ExecutionOptions = Field(
        default_factory=ExecutionOptions,
        description="variant, batch_size, seed, device, and num_threads (also the stage's CPU threads for "
        "torch; None: one per core)",
    )
    pine: PineOptions = Field(default_factory=PineOptions, description="PINE's ρ (algorithm pine only)")

    @field_validator("initial_probe")
    @classmethod
    def _probe_loads(cls, text: str) -> str:
        return parse_initial_probe(text)

    def epie_options(self) -> EpieOptions:
        """The solver's options: the groups as configured, the update rule from ``algorithm``."""
        return EpieOptions(
            update_rule=UpdateRule.RPIE if self.algorithm is Algorithm.RPIE else UpdateRule.EPIE,
            object=self.object, probe=self.probe, positions=self.positions,
            constraints=self.constraints, execution=self.execution,
        )  # fmt: skip


class RefineStage(Stage):
    Config = RefineConfig
    config: RefineConfig
    idle_poll_ms = 0

    def setup(self) -> None:
        set_torch_threads(self.config.execution.num_threads)
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
        patterns = per_detector_frame(message)
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
        return position_outliers(solve, positions, window_px, self._canvas_span_px(window_px))

    def _canvas_span_px(self, window_px: tuple[int, ...]) -> np.ndarray:
        return canvas_span_px(self.config.max_canvas_px, window_px, self.config.margin_px)

    def _warn_outliers(
        self, solve: ScanSolve, batch: FrameBatch, outliers_m: np.ndarray, window_px: tuple[int, ...]
    ) -> None:
        """Name the first left-out position and the bound it broke, at most every few seconds per scan."""
        now_s = time.monotonic()
        if now_s - solve.outlier_warned_s < OUTLIER_WARNING_INTERVAL_S:
            return
        solve.outlier_warned_s = now_s
        span_px = self._canvas_span_px(window_px)
        message = outlier_warning(solve, batch, outliers_m, span_px, self.config.max_canvas_px)
        self.warn("position_outlier", message)

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
        options: EpieOptions | None = None,
    ) -> EpieSolver:
        """A solver with the stage's options (or ``options``), PINE's regulariser for algorithm pine."""
        from phasestream.models.ptycho.epie import EpieSolver

        return EpieSolver(
            options if options is not None else self.config.epie_options(), probe=probe,
            object_regulariser=self._pine_regulariser(), unmeasured=unmeasured,
            canvas_shape_px=None if object_guess is not None else canvas_shape_px, object_guess=object_guess,
        )  # fmt: skip

    def _pine_regulariser(self) -> PineRegulariser | None:
        """PINE's regulariser with the shipped denoiser, loaded once on first use; None for ePIE and rPIE."""
        if self.config.algorithm is not Algorithm.PINE:
            return None
        from phasestream.models.nets.dncnn import load_denoiser
        from phasestream.models.ptycho.pine import PineRegulariser

        if self._denoiser is None:
            self._denoiser = load_denoiser(device=default_device(self.config.execution.device))
        return PineRegulariser(self._denoiser, self.config.pine)

    def _first_probe(
        self, solve: ScanSolve, patterns: np.ndarray, corners_px: np.ndarray, canvas_shape_px: tuple[int, int]
    ) -> np.ndarray | None:
        """The probe this scan starts from (see ``stages.probe_start``), logged with why it was chosen."""

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

            # With the probe free to adapt, the right curvature pulls ahead within a few epochs; with the
            # probe fixed, or after one or two epochs, a tight in-focus start can look as good.
            trial_options = self.config.epie_options().replace(probe={"update_start_epoch": 0})

            def trial_error(probe: np.ndarray) -> float:
                trial = self._new_solver(probe, canvas_shape_px, unmeasured=unmeasured, options=trial_options)
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
            algorithm=f"{self.config.algorithm}-{self.config.execution.variant}",
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
        if self.config.positions.correction_start_epoch is None:
            return np.concatenate(solve.fed_positions_m)
        # Corner c (the caller's frame) holds position p when c = (p − origin)/dx + margin (see _feed).
        corners_px = solve.solver.positions_px
        return (corners_px - self.config.margin_px) * solve.pixel_size_m + solve.origin_m

    def _finish(self, solve: ScanSolve) -> Iterator[Message]:
        """Epochs on the complete scan until the error stops improving (or the most allowed), then the
        final estimate, whose probe the next scan with this geometry may start from."""

        solve.epochs_at_scan_end = len(solve.error_history)
        reason = "epochs_after_scan reached"
        for _ in range(self.config.epochs_after_scan):
            if self.stopping:
                reason = "stopped"  # Ctrl-C: publish what there is now rather than finish the schedule
                break
            yield from self._epoch(solve)
            if converged(solve, self.config.stop_tolerance, self.config.stop_window_epochs):
                reason = f"converged (error changed < {self.config.stop_tolerance:g} over the last window)"
                break
        epochs = len(solve.error_history) - solve.epochs_at_scan_end
        self.note("refine_end", f"scan {solve.start.scan_uid}: {stop_label(reason, epochs)}, error "
                  f"{solve.last_error:.4g}")  # fmt: skip
        final = self._reconstruction(solve, final=True, stop_reason=stop_label(reason, epochs))
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

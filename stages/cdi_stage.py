"""CDI: reconstruct each in-situ CDI pattern of a stream with LoDIP or HIO-stat, one Reconstruction each.

In-situ CDI (Lo et al. 2018; LoDIP: Manekar et al., arXiv:2402.17745, see :mod:`phasestream.models.cdi.lodip`)
puts a static region U beside the sample X and lights it r times more strongly. U does not change during
the series, so a beamline measures it **once, alone and at a high dose** (sample out of the beam or
shuttered), before the low-dose series, and draws the two supports on that measurement. This stage takes
that measurement from a *static reference* file (:func:`load_static_reference`, written by
:func:`phasestream.simulators.insitu_cdi_stream.save_static_reference`): the high-dose static-only
pattern, the static and sample supports (boolean masks of the detector array) and the incident flux of the
static exposure. It reconstructs U from it with HIO/ER under the support and positivity (the same
:func:`~phasestream.models.cdi.lodip.reconstruct_static` as the benchmark), rescales U to the series' units
with the series flux (``incident_photons_per_px``, from the beam monitor) and the illumination ratio r,
and then solves every pattern of the stream with U held fixed.

A file rather than the first pattern of the stream: the supports have to be drawn by someone anyway, one
reference serves many series, and a series can then start with its first low-dose frame. The file is read
again at every ScanStart (and its U reconstructed again when it changed), so staff can re-measure the
static region between scans without restarting the pipeline.

Positions: in-situ CDI has no scan. Ingest still joins frames and positions by image id, so the emitter
sends (0, 0) m for every frame on the position channel (:mod:`phasestream.simulators.insitu_cdi_stream`);
this stage ignores them.

Output, per pattern: a ``Reconstruction`` (product OBJECT) whose ``object`` is the sample X in units of
transmission (complex64, zero off its support) and whose ``probe`` is the static region U in the same
units (in-situ CDI has no probe; U is its fixed reference). ``iteration`` counts the patterns solved in
the scan, so that publish's latest-wins order holds; ``quality`` carries the pattern's frame index, the
solver's own iterations and the Fourier R-factor of |F(X + U)| against √Y. At ScanEnd the latest one goes
out again with ``final`` set.

Bad input costs the frames it concerns, counted under a reason, and the stream goes on: a pattern with no
photons (``zero_photons``, left out like refine does); a reference whose static region overlaps the sample
support, or whose supports do not lie on the detector's array (``static_reference``): every frame of that
scan is rejected with the reason, and the next scan reads the file again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.models.cdi.options import HioStatOptions, HioStatSchedule, LodipEarlyStopping, LodipOptions
from phasestream.models.execution import default_device, set_torch_threads
from phasestream.models.nets.dip_options import (
    ExecutionOptions,
    MaxIterations,
    NetworkOptions,
    NumThreads,
    OptimisationOptions,
    Patience,
    Window,
)
from phasestream.models.quality import fourier_r_factor
from phasestream.runtime.messages import FrameBatch, Message, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage

REFERENCE_KEYS = ("static_pattern", "static_support", "sample_support", "static_incident_photons_per_px")
BAD_REFERENCE = "static_reference"
ZERO_PHOTONS = "zero_photons"


class CdiMethod(StrEnum):
    LODIP = "lodip"
    HIO_STAT = "hio_stat"


class CdiStageOptimisation(OptimisationOptions):
    """LoDIP's fit in the stage: a lower iteration cap than the library's, for a live series."""

    max_iterations: MaxIterations = 600


class CdiStageEarlyStopping(LodipEarlyStopping):
    """LoDIP's ES-WMV in the stage: a shorter window and patience, for a live series."""

    window: Window = 50
    patience: Patience = 150


class CdiStageExecution(ExecutionOptions):
    """The stage's device, seed and torch threads: one CPU thread unless told otherwise."""

    num_threads: NumThreads = 1


class CdiStageConfig(BaseModel):
    """The cdi stage's settings: the static reference and fluxes, and the solvers' options in the groups
    of :class:`~phasestream.models.cdi.options.LodipOptions` and
    :class:`~phasestream.models.cdi.options.HioStatOptions`."""

    model_config = ConfigDict(extra="forbid")

    algorithm: CdiMethod = Field(
        default=CdiMethod.LODIP,
        description="lodip, or hio_stat (the in-situ HIO baseline LoDIP is compared with)",
    )
    static_reference: Path = Field(description="npz: static_pattern, static_support, sample_support, flux")
    incident_photons_per_px: float = Field(
        gt=0, description="s: photons per sample pixel of unit transmission in each pattern (beam monitor)"
    )
    illumination_ratio: float = Field(default=10.0, gt=0, le=1e6, description="r: static / sample flux")
    network: NetworkOptions = Field(default_factory=NetworkOptions, description="LoDIP's generator")
    optimisation: CdiStageOptimisation = Field(
        default_factory=CdiStageOptimisation, description="LoDIP's Adam fit: iteration cap, step, input noise"
    )
    early_stopping: CdiStageEarlyStopping = Field(
        default_factory=CdiStageEarlyStopping, description="LoDIP's ES-WMV window and patience"
    )
    hio_stat: HioStatSchedule = Field(
        default_factory=HioStatSchedule,
        description="HIO-stat's iterations: cycles of hio_iterations HIO then er_iterations ER",
    )
    execution: CdiStageExecution = Field(
        default_factory=CdiStageExecution,
        description="device; num_threads, also the stage's CPU threads for torch (None: one per core); seed: "
        "pattern k is fitted with seed + k, and the static region's random starts begin at seed",
    )

    def lodip_options(self, frame_index: int) -> LodipOptions:
        """LoDIP's options for the pattern of this frame index."""
        return LodipOptions(
            network=self.network, optimisation=self.optimisation, early_stopping=self.early_stopping,
            execution=self.execution.replace(seed=self.execution.seed + frame_index),
        )  # fmt: skip

    def hio_stat_options(self) -> HioStatOptions:
        return HioStatOptions(schedule=self.hio_stat, execution=self.execution)


@dataclass(frozen=True)
class StaticReference:
    """The high-dose static-only measurement and the supports drawn on it."""

    static_pattern: np.ndarray
    static_support: np.ndarray
    sample_support: np.ndarray
    static_incident_photons_per_px: float


def load_static_reference(path: Path) -> StaticReference:
    """Read a static reference file; ConfigError names what is missing or wrong and the fix."""
    try:
        with np.load(path) as stored:
            missing = [key for key in REFERENCE_KEYS if key not in stored]
            if missing:
                raise ConfigError(
                    f"static reference {path} lacks {missing}: write it with "
                    "phasestream.simulators.insitu_cdi_stream.save_static_reference",
                    reason=BAD_REFERENCE,
                )
            arrays = {key: np.asarray(stored[key]) for key in REFERENCE_KEYS}
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read the static reference {path} ({error}): point static_reference at its npz file",
            reason=BAD_REFERENCE,
        ) from error
    return StaticReference(
        arrays["static_pattern"].astype(np.float64),
        arrays["static_support"].astype(bool),
        arrays["sample_support"].astype(bool),
        float(arrays["static_incident_photons_per_px"]),
    )


def check_reference(reference: StaticReference, detector_shape_px: tuple[int, int]) -> None:
    """ConfigError (reason ``static_reference``) unless both supports and the pattern lie on the detector's
    array, are non-empty and do not overlap."""
    for name in ("static_pattern", "static_support", "sample_support"):
        shape = getattr(reference, name).shape
        if shape != tuple(detector_shape_px):
            raise ConfigError(
                f"{name} of the static reference is {shape} but the detector sends "
                f"{tuple(detector_shape_px)} frames: the support lies outside the array; redraw it on the "
                "detector's array",
                reason=BAD_REFERENCE,
            )
    for name in ("static_support", "sample_support"):
        if not getattr(reference, name).any():
            raise ConfigError(f"{name} of the static reference selects no pixel", reason=BAD_REFERENCE)
    overlap = int((reference.static_support & reference.sample_support).sum())
    if overlap:
        raise ConfigError(
            f"the static region overlaps the sample support on {overlap} px: in-situ CDI needs them apart; "
            "redraw the supports",
            reason=BAD_REFERENCE,
        )
    if not reference.static_incident_photons_per_px > 0:
        raise ConfigError(
            f"static_incident_photons_per_px={reference.static_incident_photons_per_px!r} must be positive",
            reason=BAD_REFERENCE,
        )


@dataclass
class CdiScan:
    """One scan's static field (pattern units) or the reason its frames are rejected, and its output."""

    start: ScanStart
    pixel_size_m: float
    reference: StaticReference | None = None
    static_field: np.ndarray | None = None
    problem: ConfigError | None = None
    solved: int = 0
    latest: Reconstruction | None = None


class CdiStage(Stage):
    Config = CdiStageConfig
    config: CdiStageConfig

    def setup(self) -> None:
        set_torch_threads(self.config.execution.num_threads)
        default_device(self.config.execution.device)  # a CUDA device this host lacks fails here, at setup
        self._series: dict[str, CdiScan] = {}
        # U depends only on the file: reconstructed again only when the file changes.
        self._static_cache: tuple[tuple[str, int], StaticReference, np.ndarray] | None = None

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        from phasestream.models.physics import object_pixel_size_m

        geometry = message.geometry
        scan = CdiScan(
            message,
            object_pixel_size_m(
                geometry.energy_kev, geometry.detector_distance_m, geometry.pixel_size_m,
                geometry.detector_shape_px[1],
            ),
        )  # fmt: skip
        try:
            scan.reference, static_estimate = self._static_estimate(geometry.detector_shape_px)
            scan.static_field = self._in_pattern_units(static_estimate, scan.reference)
        except ConfigError as error:
            scan.problem = error
            self.warn(BAD_REFERENCE, f"scan {message.scan_uid}: its frames will be rejected: {error}")
        self._series[message.scan_uid] = scan
        yield message

    def _static_estimate(self, detector_shape_px: tuple[int, int]) -> tuple[StaticReference, np.ndarray]:
        from phasestream.models.cdi.lodip import reconstruct_static

        path = self.config.static_reference
        try:
            key = (str(path.resolve()), path.stat().st_mtime_ns)
        except OSError as error:
            raise ConfigError(
                f"static reference {path} cannot be read ({error}): measure the static region and save it",
                reason=BAD_REFERENCE,
            ) from error
        if self._static_cache is not None and self._static_cache[0] == key:
            _, reference, estimate = self._static_cache
            check_reference(reference, detector_shape_px)
            return reference, estimate
        reference = load_static_reference(path)
        check_reference(reference, detector_shape_px)
        estimate = reconstruct_static(
            reference.static_pattern, reference.static_support, self.config.execution
        )
        self._static_cache = (key, reference, estimate)
        self.report_status(static_reference=str(path))
        return reference, estimate

    def _in_pattern_units(self, static_estimate: np.ndarray, reference: StaticReference) -> np.ndarray:
        from phasestream.models.cdi.lodip import static_in_pattern_units

        return static_in_pattern_units(
            static_estimate,
            reference.static_incident_photons_per_px,
            self.config.incident_photons_per_px,
            self.config.illumination_ratio,
        )

    def process(self, message: Message) -> Iterable[Message]:
        if not isinstance(message, FrameBatch):
            yield message
            return
        scan = self._series.get(message.scan_uid)
        if scan is None:
            raise FrameValidationError(
                f"frames {message.first_index}..{message.last_index} of scan {message.scan_uid} arrived "
                "before its ScanStart; check the stage before cdi",
                reason="no_scan_start",
            )
        if scan.problem is not None:
            raise ConfigError(f"scan {message.scan_uid}: {scan.problem}", reason=BAD_REFERENCE)
        patterns = np.asarray(message.frames, dtype=np.float64)
        per_pattern = np.asarray(message.detector_frames or [1] * len(patterns))
        empty = patterns.reshape(len(patterns), -1).max(axis=1) <= 0
        if empty.any():
            # A dark frame (shutter closed, beam lost) has no solution to look for: leave it out, say so.
            n_empty = int(per_pattern[empty].sum())
            self.reject_frames(message.scan_uid, ZERO_PHOTONS, n_empty)
            self.warn(
                ZERO_PHOTONS,
                f"scan {message.scan_uid}: {n_empty} pattern(s) in "
                f"{message.first_index}..{message.last_index} hold no photons (shutter closed or beam "
                "lost?); not reconstructed",
            )
        for index in np.flatnonzero(~empty):
            reconstruction = self._solve(scan, patterns[index], message.frame_indices[index])
            self.count(message.scan_uid, "frames_used", int(per_pattern[index]))
            yield reconstruction

    def _solve(self, scan: CdiScan, pattern: np.ndarray, frame_index: int) -> Reconstruction:
        from phasestream.models.cdi.lodip import hio_stat, lodip

        reference = scan.reference
        problem = (pattern, scan.static_field, reference.sample_support, reference.static_support)
        start_s = time.perf_counter()
        if self.config.algorithm is CdiMethod.LODIP:
            result = lodip(*problem, self.config.lodip_options(frame_index))
            sample, solver_iterations = result.sample, result.stop_iteration
        else:
            sample = hio_stat(*problem, self.config.hio_stat_options())
            solver_iterations = self.config.hio_stat.iterations
        seconds = time.perf_counter() - start_s
        scan.solved += 1
        amplitude_scale = np.sqrt(self.config.incident_photons_per_px)
        scan.latest = Reconstruction(
            scan_uid=scan.start.scan_uid,
            seq=scan.solved,
            algorithm=str(self.config.algorithm),
            iteration=scan.solved,
            positions_used=scan.solved,
            object_pixel_size_m=scan.pixel_size_m,
            quality={
                "pattern_index": float(frame_index),
                "solver_iterations": float(solver_iterations),
                "solve_seconds": seconds,
                "r_factor": _r_factor(pattern, sample + scan.static_field),
            },
            object=(sample / amplitude_scale).astype(np.complex64),
            probe=(scan.static_field / np.sqrt(self.config.illumination_ratio) / amplitude_scale).astype(
                np.complex64
            ),
        )
        self.report_status(scan_uid=scan.start.scan_uid, iteration=scan.solved, pattern_index=frame_index)
        return scan.latest

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        scan = self._series.pop(message.scan_uid, None)
        if scan is not None and scan.latest is not None:
            yield scan.latest.model_copy(update={"final": True, "seq": scan.solved + 1})
        yield message


def _r_factor(pattern: np.ndarray, exit_wave: np.ndarray) -> float:
    """Fourier R-factor of |F(X + U)|² against the counts, F the project's centred orthonormal FFT."""

    spectrum = np.fft.fftshift(np.fft.fft2(exit_wave, norm="ortho"))
    return fourier_r_factor(pattern, spectrum.real**2 + spectrum.imag**2)

"""Denoise: a deep image prior (DIP) fitted to the refined object off the receive loop, sent as ``denoised``.

The DIP (Ulyanov et al., CVPR 2018, Eq. 2; the skip networks of Erin et al. 2025; ES-WMV early stopping of
Wang et al., TMLR 2023) lives in :mod:`phasestream.models.nets.dip`. This stage only decides *what* to denoise
and *when* the result goes out:

- **Everything is forwarded at once** (ScanStart, frames, every Reconstruction, ScanEnd aside), so publish
  shows the solver's object without waiting for the slowest stage of the pipeline.
- **Fits run on one background thread** (the GPU when there is one), never in the receive loop. With
  ``when: scan_end`` only the final object of a scan is denoised; with ``every_snapshot`` every object is,
  latest-wins: a new snapshot of a scan replaces its queued one (counted ``denoise_superseded``), so the
  queue holds at most one job per open scan. Finals go before snapshots, and a final replaces (and stops)
  a snapshot of the same scan.
- **A result is a Reconstruction** with ``product=denoised``: the object denoised, ``iteration`` the refine
  iteration it came from, and in ``quality`` the DIP's ``dip_stopping_iteration``, ``dip_best_iteration``,
  ``dip_seconds`` and the flags ``dip_diverged``, ``dip_failed``, ``dip_timed_out`` (0/1). A fit whose
  loss turns NaN stops and falls back to the undenoised object, flagged and warned about.
- **ScanEnd waits for the final's result**, without blocking: it is held back while this worker still
  denoises the scan's final object and forwarded right after the result, so publish's accounting closes
  after the denoised object landed. After ``final_timeout_s`` the fit is told to stop and its estimate so
  far is sent (``dip_timed_out``, counted ``denoise_final_timeouts``); a fit that does not stop within
  ``_CANCEL_GRACE_S`` more is abandoned (``denoise_final_missing``).

**Scale-out** (``workers: N`` in the topology). Refine's outlet hands each Reconstruction to the next
denoise worker with room (round robin, blind to load) and sends ScanStart and ScanEnd to all of them;
publish waits for all N ScanEnds. So:

- A scan's final object lands on exactly one worker. That worker holds its ScanEnd until the denoised
  final is out; the others forward theirs at once, and publish closes the scan after the last one.
- One scan is never denoised faster by more workers (a DIP is one fit). What N buys is overlap: the final
  of the next scan (and the next, up to N) starts at once instead of behind the current fit, so
  back-to-back scans do not pile up; with ``every_snapshot``, N snapshots are fitted in parallel.
- Round robin does not see load: a final may land on a worker still busy with the previous scan's final
  while another idles (its wait is bounded by ``final_timeout_s``). Give each worker its own GPU (e.g.
  ``CUDA_VISIBLE_DEVICES`` per host) or a share of the CPU (``execution.num_threads``).
- Order holds per worker only: publish fair-queues N sockets. A snapshot forwarded by one worker can
  reach publish after the final object forwarded by another when refine sends them milliseconds apart
  (seen in the end-to-end test with a snapshot every 2 epochs), and publish then shows the snapshot as
  ``object``. Publish must therefore ignore an object older (by ``final``, then ``iteration``) than the
  one it already has for that scan and product. With ``every_snapshot`` the same holds for denoised
  snapshots. At ScanEnd a worker drops its unfinished snapshot work of that scan
  (``denoise_discarded``): the final's result supersedes it, and a snapshot result sent before that
  ScanEnd precedes the final's result by the final's whole fit.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import ConfigError, PhasestreamError
from phasestream.models.execution import default_device, set_torch_threads
from phasestream.models.nets.dip import DipResult, dip_denoise
from phasestream.models.nets.dip_options import (
    ComplexNetworkOptions,
    DenoiseOptions,
    DipArchitecture,
    EarlyStoppingOptions,
    ExecutionOptions,
    MaxIterations,
    OptimisationOptions,
)
from phasestream.runtime import metrics
from phasestream.runtime.messages import Message, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage

_CANCEL_GRACE_S = 30.0
"""After a final's fit was told to stop, how long its held ScanEnd waits for it to hand back its estimate
(one iteration: well under a second on a GPU, seconds for a large object on a CPU)."""
_RUNNER_JOIN_S = 10.0
"""How long close() waits for the fitting thread to leave a fit it was told to stop."""


class DenoiseWhen(StrEnum):
    SCAN_END = "scan_end"  # the final object of each scan only
    EVERY_SNAPSHOT = "every_snapshot"  # every object refine sends, latest-wins


class DenoiseStageOptimisation(OptimisationOptions):
    """The DIP's fit in the stage: a lower iteration cap than the library's, for a live pipeline."""

    max_iterations: MaxIterations = 2000


class DenoiseConfig(BaseModel):
    """The denoise stage's settings: what to denoise and how long a scan's end waits, and the DIP's options
    in the groups of :class:`~phasestream.models.nets.dip_options.DenoiseOptions`."""

    model_config = ConfigDict(extra="forbid")

    when: DenoiseWhen = Field(
        default=DenoiseWhen.SCAN_END,
        description="scan_end: each scan's final object; every_snapshot: every object refine sends",
    )
    network: ComplexNetworkOptions = Field(
        default_factory=ComplexNetworkOptions,
        description="the skip network and the channels of a complex object",
    )
    optimisation: DenoiseStageOptimisation = Field(
        default_factory=DenoiseStageOptimisation, description="Adam: iteration cap, step, input noise"
    )
    early_stopping: EarlyStoppingOptions = Field(
        default_factory=EarlyStoppingOptions, description="ES-WMV window and patience"
    )
    execution: ExecutionOptions = Field(
        default_factory=ExecutionOptions,
        description="device (auto: cuda when present), num_threads (also the fitting thread's CPU threads "
        "for torch; None: one per core) and the seed of the network and its input",
    )
    final_timeout_s: float = Field(
        default=600.0, gt=0, description="longest a scan's ScanEnd waits for its final object's fit"
    )

    def denoise_options(self) -> DenoiseOptions:
        """The DIP's options: the groups as configured."""
        return DenoiseOptions(
            network=self.network, optimisation=self.optimisation, early_stopping=self.early_stopping,
            execution=self.execution,
        )  # fmt: skip


@dataclass(eq=False)
class DenoiseJob:
    """One object to fit. ``stop`` asks a running fit to hand back its estimate so far."""

    source: Reconstruction
    stop: threading.Event = field(default_factory=threading.Event)
    discard: bool = False
    """Drop the result: it was superseded or its scan has ended."""
    timed_out: bool = False

    @property
    def scan_uid(self) -> str:
        return self.source.scan_uid

    @property
    def final(self) -> bool:
        return self.source.final


@dataclass(frozen=True)
class DenoiseOutcome:
    job: DenoiseJob
    result: DipResult | None
    error: Exception | None
    seconds: float


DenoiseFit = Callable[[np.ndarray, Callable[[], bool]], DipResult]
"""(object, should_stop) → result: the DIP with the stage's settings bound."""


class DipRunner:
    """One thread that fits one job at a time: at most one queued job per scan, finals first."""

    def __init__(self, fit: DenoiseFit, torch_threads: int | None) -> None:
        self._fit = fit
        self._torch_threads = torch_threads
        self._condition = threading.Condition()
        self._queued: dict[str, DenoiseJob] = {}  # insertion order: a resubmitted scan goes to the back
        self._running: DenoiseJob | None = None
        self._outcomes: deque[DenoiseOutcome] = deque()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="dip-runner", daemon=True)
        self._thread.start()

    def submit(self, job: DenoiseJob) -> list[DenoiseJob]:
        """Queue ``job``; return the jobs it made useless (or ``[job]`` when the scan's final is ahead)."""
        with self._condition:
            queued = self._queued.get(job.scan_uid)
            running = self._running if self._running and self._running.scan_uid == job.scan_uid else None
            if not job.final and any(other is not None and other.final for other in (queued, running)):
                return [job]
            superseded = [queued] if queued is not None else []
            if job.final and running is not None and not running.final:
                running.discard = True
                running.stop.set()
                superseded.append(running)
            self._queued.pop(job.scan_uid, None)
            self._queued[job.scan_uid] = job
            self._condition.notify()
            return superseded

    def pending(self, scan_uid: str) -> bool:
        """Whether a job of this scan is queued, running, or finished but not yet taken."""
        with self._condition:
            jobs = [*self._queued.values(), self._running, *(o.job for o in self._outcomes)]
            return any(job is not None and job.scan_uid == scan_uid for job in jobs)

    def wait(self, scan_uid: str, timeout_s: float) -> bool:
        """Block until no job of this scan is queued or running; False when ``timeout_s`` passed first."""

        def settled() -> bool:
            jobs = [*self._queued.values(), self._running]
            return not any(job is not None and job.scan_uid == scan_uid for job in jobs)

        with self._condition:
            return self._condition.wait_for(settled, timeout_s)

    @property
    def busy(self) -> bool:
        with self._condition:
            return bool(self._queued or self._running or self._outcomes)

    def stop_scan(self, scan_uid: str, *, discard: bool) -> list[DenoiseJob]:
        """Tell this scan's running and queued fits to stop; ``discard`` also drops their results."""
        with self._condition:
            jobs = [
                job for job in (self._queued.get(scan_uid), self._running) if job and job.scan_uid == scan_uid
            ]
            for job in jobs:
                job.stop.set()
                job.discard = job.discard or discard
            if discard:
                self._queued.pop(scan_uid, None)
            return jobs

    def drop_snapshots(self, scan_uid: str) -> list[DenoiseJob]:
        """Drop this scan's queued snapshot and stop its running one; its final, if any, goes on."""
        with self._condition:
            queued = self._queued.get(scan_uid)
            dropped = [
                job for job in (queued, self._running) if job and job.scan_uid == scan_uid and not job.final
            ]
            for job in dropped:
                job.discard = True
                job.stop.set()
            if queued is not None and not queued.final:
                del self._queued[scan_uid]
            return dropped

    def take_outcomes(self) -> list[DenoiseOutcome]:
        with self._condition:
            outcomes = list(self._outcomes)
            self._outcomes.clear()
            return outcomes

    def close(self) -> None:
        with self._condition:
            self._closing = True
            for job in [*self._queued.values(), self._running]:
                if job is not None:
                    job.discard = True
                    job.stop.set()
            self._queued.clear()
            self._condition.notify()
        self._thread.join(_RUNNER_JOIN_S)

    def _next_job(self) -> DenoiseJob | None:
        with self._condition:
            while not self._queued and not self._closing:
                self._condition.wait()
            if self._closing:
                return None
            job = next((j for j in self._queued.values() if j.final), next(iter(self._queued.values())))
            del self._queued[job.scan_uid]
            self._running = job
            return job

    def _serve(self) -> None:
        set_torch_threads(self._torch_threads)  # OpenMP's thread count is per calling thread
        while (job := self._next_job()) is not None:
            started = time.perf_counter()
            result, error = None, None
            try:
                result = self._fit(np.asarray(job.source.object), job.stop.is_set)
            except Exception as exc:
                # This thread is outside Stage.run(): hand the failure to the receive loop, which counts
                # it and publishes the undenoised object, instead of letting the thread die silently.
                error = exc
            outcome = DenoiseOutcome(job, result, error, time.perf_counter() - started)
            with self._condition:
                self._running = None
                self._outcomes.append(outcome)
                self._condition.notify_all()


@dataclass
class HeldScanEnd:
    message: ScanEnd
    deadline_s: float
    stopped_at_s: float | None = None


class DenoiseStage(Stage):
    Config = DenoiseConfig
    config: DenoiseConfig
    # Results are picked up between messages: at most this many ms after a fit ends.
    idle_poll_ms = 50

    def setup(self) -> None:
        if not self.placement.output_endpoints:
            raise ConfigError(
                f"stage {self.stage_name!r} (denoise) is last in the chain: put publish after it so the "
                "denoised objects reach Tiled"
            )
        default_device(self.config.execution.device)  # a CUDA device this host lacks fails here, at setup
        set_torch_threads(self.config.execution.num_threads)
        self._options = self.config.denoise_options()
        self._runner = DipRunner(self._fit, self.config.execution.num_threads)
        self._held: dict[str, HeldScanEnd] = {}
        self._closed: set[str] = set()
        """Scans whose ScanEnd this worker has forwarded: nothing of theirs may follow it."""
        self._iterations_metric = metrics.ITERATIONS.labels(**self._labels)

    def _fit(self, image: np.ndarray, should_stop: Callable[[], bool]) -> DipResult:
        return dip_denoise(image, self._options, should_stop=should_stop)

    def has_open_scan(self) -> bool:
        return super().has_open_scan() or bool(self._held) or self._runner.busy

    # ---- messages -----------------------------------------------------------------------------------
    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        yield message
        yield from self._results()

    def process(self, message: Message) -> Iterator[Message]:
        yield message  # first: publish must not wait for the denoiser to see the solver's object
        if isinstance(message, Reconstruction) and self._wants(message):
            self._submit(message)
        yield from self._results()

    def _wants(self, rec: Reconstruction) -> bool:
        if rec.product is not Product.OBJECT:
            return False  # the neural mosaic and already denoised copies are passed on untouched
        return rec.final or self.config.when is DenoiseWhen.EVERY_SNAPSHOT

    def _submit(self, rec: Reconstruction) -> None:
        if rec.scan_uid in self._closed:
            self.warn(
                "after_scan_end",
                f"scan {rec.scan_uid}: a Reconstruction (iteration {rec.iteration}) came after its ScanEnd; "
                "forwarded but not denoised",
            )
            return
        self.count(rec.scan_uid, "denoise_submitted")
        for superseded in self._runner.submit(DenoiseJob(rec)):
            self.count(superseded.scan_uid, "denoise_superseded")

    def on_scan_end(self, message: ScanEnd) -> Iterator[Message]:
        scan_uid = message.scan_uid
        # The final's result (here or on another worker) supersedes any snapshot still being fitted.
        dropped = self._runner.drop_snapshots(scan_uid)
        if dropped:
            self.count(scan_uid, "denoise_discarded", len(dropped))
        yield from self._results()
        if self._runner.pending(scan_uid):
            self._held[scan_uid] = HeldScanEnd(message, time.monotonic() + self.config.final_timeout_s)
            return
        yield from self._forward_end(message)

    def _forward_end(self, message: ScanEnd) -> Iterator[Message]:
        self._closed.add(message.scan_uid)
        yield message

    def idle(self) -> Iterator[Message]:
        yield from self._results()
        now = time.monotonic()
        for scan_uid, held in list(self._held.items()):
            if not self._runner.pending(scan_uid):
                del self._held[scan_uid]
                yield from self._forward_end(held.message)
            elif held.stopped_at_s is None and now > held.deadline_s:
                held.stopped_at_s = now
                for job in self._runner.stop_scan(scan_uid, discard=False):
                    job.timed_out = True
                self.count(scan_uid, "denoise_final_timeouts")
                self.warn(
                    "denoise_timeout",
                    f"scan {scan_uid}: the final object's DIP ran past final_timeout_s="
                    f"{self.config.final_timeout_s:g} s; sending its estimate so far. Raise final_timeout_s, "
                    "lower optimisation.max_iterations or early_stopping.patience, or run denoise on a GPU",
                )
            elif held.stopped_at_s is not None and now > held.stopped_at_s + _CANCEL_GRACE_S:
                del self._held[scan_uid]
                self._runner.stop_scan(scan_uid, discard=True)
                self.count(scan_uid, "denoise_final_missing")
                self.warn(
                    "denoise_missing",
                    f"scan {scan_uid}: the final object's DIP did not stop {_CANCEL_GRACE_S:g} s after it "
                    "was told to; closing the scan without a denoised object",
                )
                yield from self._forward_end(held.message)

    # ---- results ------------------------------------------------------------------------------------
    def _results(self) -> Iterator[Reconstruction]:
        for outcome in self._runner.take_outcomes():
            job = outcome.job
            if job.discard or job.scan_uid in self._closed:
                if not job.discard:
                    self.count(job.scan_uid, "denoise_discarded")  # dropped jobs were counted when dropped
                continue
            yield self._denoised(outcome)

    def _denoised(self, outcome: DenoiseOutcome) -> Reconstruction:
        job, result, source = outcome.job, outcome.result, outcome.job.source
        scan_uid = source.scan_uid
        if result is None:
            error = outcome.error
            reason = error.reason if isinstance(error, PhasestreamError) else "internal_error"
            self.count(scan_uid, "denoise_failed")
            self.warn(
                f"denoise_{reason}",
                f"scan {scan_uid}, iteration {source.iteration}: the DIP failed ({type(error).__name__}: "
                f"{error}); publishing the undenoised object as denoised",
            )
            denoised, stop_iteration, best_iteration = source.object, 0, 0
        else:
            denoised, stop_iteration, best_iteration = (
                result.denoised,
                result.stop_iteration,
                result.best_iteration,
            )
            self.count(scan_uid, "denoise_runs")
            self.count(scan_uid, "dip_iterations", stop_iteration)
            self._iterations_metric.inc(stop_iteration)
            if result.diverged:
                self.count(scan_uid, "denoise_diverged")
                self.warn(
                    "denoise_diverged",
                    f"scan {scan_uid}, iteration {source.iteration}: the DIP loss became "
                    f"{result.losses[-1]} at DIP iteration {stop_iteration}; publishing the undenoised "
                    "object. Lower lr, or check the object for extreme values",
                )
        diverged = result is not None and result.diverged
        self.count(scan_uid, "denoised_sent")
        self.report_status(
            scan_uid=scan_uid,
            denoised_iteration=source.iteration,
            dip_stopping_iteration=stop_iteration,
            dip_seconds=round(outcome.seconds, 3),
        )
        network = self.config.network
        name = network.architecture.value if isinstance(network.architecture, DipArchitecture) else "custom"
        return source.model_copy(
            update={
                "product": Product.DENOISED,
                "algorithm": f"dip-{name}-{network.representation.value} of {source.algorithm}",
                "object": np.ascontiguousarray(denoised, dtype=source.object.dtype),
                "quality": {
                    "dip_stopping_iteration": float(stop_iteration),
                    "dip_best_iteration": float(best_iteration),
                    "dip_seconds": outcome.seconds,
                    "dip_diverged": float(diverged),
                    "dip_failed": float(result is None),
                    "dip_timed_out": float(job.timed_out),
                },
            }
        )

    def close(self) -> None:
        self._runner.close()

"""The Stage base class: subclasses compute, the runtime here owns everything else.

A stage implements ``process(message)`` (and optionally ``on_scan_start``, ``on_scan_end``, ``idle``
and, for stages that face a detector, ``raw_inputs``/``handle_raw``). ``Stage.run()`` owns the sockets,
high-water marks and backpressure, timing, metrics, per-scan accounting, error handling and shutdown.
It is the only place that catches per-message errors: it counts them and goes on with the scan.

Faults (docs/operations.md, "Faults"): every worker keeps the ScanStart of each open scan in
``<run_dir>/scans/<worker>/``. A worker the launcher restarts mid-scan reads them back, replays
``on_scan_start`` and so takes that scan's remaining FrameBatches and ScanEnd as if it had seen the start
(counted as ``restarted_mid_scan``); a restarted source cannot resume its detector stream and ends its open
scans at once. Each ScanEnd carries ledgers of frame indices (the source's sent, every later worker's
rested), from which the last stage counts ``frames_lost`` by index. A stage that received some but not all
of a scan's ScanEnds closes the scan after ``scan_end_timeout_s`` without a message for it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import zmq
from pydantic import BaseModel, ConfigDict, ValidationError

from phasestream.errors import ConfigError, PhasestreamError
from phasestream.runtime import metrics
from phasestream.runtime.accounting import (
    FRAMES_LOST,
    RESTARTED_MID_SCAN,
    SCAN_ENDS_MISSING,
    audit_lost_frames,
    counts_only,
    is_ledger_label,
)
from phasestream.runtime.config import PipelineConfig, format_validation_error
from phasestream.runtime.inbox import INBOX_PORT, RawInput, drain_messages, drain_raw
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd, ScanStart, decode
from phasestream.runtime.scan_bookkeeping import ScanJournal, ScanState, own_ledger
from phasestream.runtime.stage_log import StageLog
from phasestream.runtime.topology import WorkerPlacement
from phasestream.runtime.transport import StopRequestedError
from phasestream.runtime.worker_sockets import WorkerSockets

log = logging.getLogger(__name__)

_IDLE_POLL_MS = 100
_STATUS_INTERVAL_S = 0.25
_LOST_RUNS_SHOWN = 10  # runs of lost frame indices a frames_lost warning lists
# Set by the launcher for a restarted worker: how many times it restarted this worker so far.
RESTARTS_ENV = "PHASESTREAM_WORKER_RESTARTS"


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage:
    """Base class of every stage. Subclasses set ``Config`` and implement ``process``."""

    Config: ClassVar[type[BaseModel]] = NoConfig
    # Stages with background work get ``idle()`` calls when their inbox is empty, at most this many
    # milliseconds apart while a scan is open (0: continuously, as an iterative solver wants).
    idle_poll_ms: ClassVar[int | None] = None

    def __init__(self, config: BaseModel, placement: WorkerPlacement, pipeline: PipelineConfig) -> None:
        self.config = config
        self.placement = placement
        self.pipeline = pipeline
        self.stage_name = placement.spec.name
        self.worker = str(placement.worker)
        self._labels = {"stage": self.stage_name, "worker": self.worker}
        # Labelled children resolved once: .labels() costs about 2 µs, and some are hit once per frame.
        self._process_seconds = metrics.PROCESS_SECONDS.labels(**self._labels)
        self._queue_depth = metrics.QUEUE_DEPTH.labels(**self._labels)
        self._frames_received_metric = metrics.FRAMES_RECEIVED.labels(**self._labels)
        self._scans: dict[str, ScanState] = {}
        self._current: Message | None = None
        self._stop = threading.Event()
        self._scans_completed = 0
        self._last_status_s = 0.0
        self._log = StageLog(placement.label)
        self._journal = ScanJournal(pipeline.run_dir / "scans" / placement.label)
        self.setup()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_placement(cls, placement: WorkerPlacement, pipeline: PipelineConfig) -> Stage:
        try:
            config = cls.Config.model_validate(placement.spec.config)
        except ValidationError as exc:
            raise ConfigError(
                f"stage {placement.spec.name!r} ({cls.__name__}) config: {format_validation_error(exc)}"
            ) from exc
        return cls(config, placement, pipeline)

    # ---- what subclasses implement --------------------------------------------------------------
    def setup(self) -> None:
        """Initialise subclass state; ``self.config`` and ``self.pipeline`` are set."""

    def raw_inputs(self) -> dict[str, RawInput]:
        """Detector-facing sockets by port name; empty for stages fed by phasestream messages."""
        return {}

    def handle_raw(self, port: str, frames: list[bytes]) -> Iterable[Message]:
        raise NotImplementedError(f"{type(self).__name__} declares raw inputs but no handle_raw()")

    def raw_refused(self, port: str, error: PhasestreamError) -> None:
        """A raw message the runtime refused before ``handle_raw`` (too many parts); the runtime counts
        and logs it. Count it in the stage's own accounting here."""

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        yield message

    def process(self, message: Message) -> Iterable[Message]:
        yield message

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        yield message

    def idle(self) -> Iterable[Message]:
        return ()

    def close(self) -> None:
        """Release resources (threads, files) when the stage stops."""

    # ---- helpers for subclasses ---------------------------------------------------------------
    def scan(self, scan_uid: str) -> ScanState:
        state = self._scans.get(scan_uid)  # not setdefault: it would build a ScanState on every call
        if state is None:
            state = self._scans[scan_uid] = ScanState()
        return state

    def count(self, scan_uid: str, key: str, n: int = 1) -> None:
        """Add to this stage's accounting for a scan; it travels in that scan's ScanEnd."""
        self.scan(scan_uid).counts[key] += n

    def reject_frames(self, scan_uid: str, reason: str, n: int) -> None:
        """Frames this stage could not use: counted in the metrics and in the scan's accounting."""
        metrics.FRAMES_DROPPED.labels(reason=reason, **self._labels).inc(n)
        self.count(scan_uid, f"rejected_{reason}", n)

    def warn(self, reason: str, text: str) -> None:
        """Say what was discarded and the fix without raising: in the log and to the launcher, a limited
        number of lines of one reason at a time (``LogLimiter``)."""
        self._log.warn(reason, text)

    def note(self, reason: str, text: str) -> None:
        """Say what the stage decided (a start chosen, a value overridden): in the log and to the launcher."""
        self._log.note(reason, text)

    def report_status(self, **fields: Any) -> None:
        self._log.report("status", **fields)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for: long loops inside a stage should end early and tidy up."""
        return self._stop.is_set()

    # ---- the runtime ------------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until stopped (signal, ``request_stop()``) or, with ``exit_after_scan``, a scan ends."""
        self._install_signal_handlers()
        raw_inputs = self.raw_inputs()
        sockets = WorkerSockets.open(self.placement, self.pipeline, raw_inputs, self._stop)
        self._outlet, self._log.status = sockets.outlet, sockets.status
        self._announce_ready()
        try:
            self._recover_open_scans()
            self._loop(sockets.poller, sockets.ports, raw_inputs)
        except StopRequestedError:
            log.info("%s stopped while waiting for downstream room", self.placement.label)
        finally:
            self._log.flush_left_out(force=True)
            self.close()
            self._log.report("stopped")
            self._log.status = None
            sockets.close()

    def _announce_ready(self) -> None:
        """Serve /metrics, count the launcher's restarts of this worker, and tell the launcher it is ready."""
        address = self.placement.metrics_address
        metrics_port = metrics.serve_metrics(self.placement.metrics_port, addr=address)
        restarts = int(os.environ.get(RESTARTS_ENV, "0"))
        if restarts:
            metrics.WORKER_RESTARTS.labels(**self._labels).inc(restarts)
        self._log.report("ready", metrics_port=metrics_port, pid=os.getpid(), restarts=restarts)
        log.info("%s ready; /metrics on %s:%d", self.placement.label, address, metrics_port)

    def _loop(
        self, poller: zmq.Poller, ports: dict[zmq.Socket[bytes], str], raw_inputs: dict[str, RawInput]
    ) -> None:
        while not self._stop.is_set():
            wants_idle = self.idle_poll_ms is not None and self.has_open_scan()
            timeout = self.idle_poll_ms if wants_idle else _IDLE_POLL_MS
            ready = dict(poller.poll(timeout))
            handled = 0
            for sock, port in ports.items():
                if not ready.get(sock, 0) & zmq.POLLIN:
                    continue
                group: Sequence[list[Any] | PhasestreamError] = (
                    drain_messages(sock) if port == INBOX_PORT else drain_raw(sock, port, raw_inputs[port])
                )
                handled += len(group)
                self._handle_group(port, group)
            self._queue_depth.set(handled)
            if handled == 0 and wants_idle:
                with self._errors_counted():
                    self._send_all(self.idle())
            self._close_overdue_scans()
            self._log.flush_left_out()
            if self.pipeline.exit_after_scan and self._scans_completed:
                return

    def has_open_scan(self) -> bool:
        """Whether ``idle()`` has work: a scan has started here and not yet ended."""
        return any(
            s.start is not None and s.ends_received == 0 and not s.finished for s in self._scans.values()
        )

    def _handle_group(self, port: str, group: Sequence[list[Any] | PhasestreamError]) -> None:
        """Handle what one drain took from a socket, timed as a whole: at tens of thousands of detector
        messages a second, a histogram observation and an error context per message cost ingest µs a frame."""
        started = time.perf_counter()
        for frames in group:
            self._current = None
            try:
                self._handle(port, frames)
            except StopRequestedError:
                raise
            except Exception as exc:
                self._count_error(exc)
        self._process_seconds.observe(time.perf_counter() - started)

    def _handle(self, port: str, frames: list[Any] | PhasestreamError) -> None:
        if isinstance(frames, PhasestreamError):  # what drain_raw refused in place of the message
            self.raw_refused(port, frames)
            raise frames
        if port == INBOX_PORT:
            self._current = decode(frames)
            self._send_all(self._dispatch_message(self._current))
        else:
            self._send_all(self.handle_raw(port, frames))

    def _send_all(self, outputs: Iterable[Message]) -> None:
        for out in outputs:
            self._send(out)

    @contextmanager
    def _errors_counted(self) -> Iterator[None]:
        self._current = None
        try:
            yield
        except StopRequestedError:
            raise
        except Exception as exc:
            self._count_error(exc)

    def _count_error(self, exc: Exception) -> None:
        """A failure costs the message at hand only: count it, say why, go on with the scan.

        Call it from the ``except`` clause that caught ``exc``: the log entry takes the traceback from there.
        """
        if isinstance(exc, PhasestreamError):
            self._reject(exc.reason, str(exc))
            return
        # A bug in one stage must not end a beamline scan.
        self._reject("internal_error", f"{type(exc).__name__}: {exc}", with_traceback=True)

    def _reject(self, reason: str, text: str, with_traceback: bool = False) -> None:
        """Count a refused message in the metrics (every one) and log it (``LogLimiter`` decides)."""
        metrics.MESSAGES_REJECTED.labels(reason=reason, **self._labels).inc()
        if isinstance(self._current, FrameBatch):
            self.reject_frames(self._current.scan_uid, reason, len(self._current.frame_indices))
        self._log.rejected(reason, text, with_traceback)

    def _dispatch_message(self, message: Message) -> Iterable[Message]:
        state = self.scan(message.scan_uid)
        state.last_message_s = time.monotonic()
        if isinstance(message, ScanStart):
            if state.start is not None:
                return ()  # the same ScanStart from another upstream worker, or again after a restart
            state.start = message
            self._journal_start(message)
            return self.on_scan_start(message)
        if isinstance(message, ScanEnd):
            return self._scan_end_arrived(message)
        if isinstance(message, FrameBatch):
            n = len(message.frame_indices)
            self._frames_received_metric.inc(n)
            state.counts["frames_received"] += n
            state.received.add(message.frame_indices)
            if message.received_at_s:
                metrics.END_TO_END_LATENCY.labels(**self._labels).observe(time.time() - message.received_at_s)
            self.maybe_report_progress(message.scan_uid)
        return self.process(message)

    def _scan_end_arrived(self, message: ScanEnd) -> Iterator[Message]:
        state = self.scan(message.scan_uid)
        if state.finished:
            return  # a ScanEnd after this worker closed the scan by timeout: nothing is left to close
        state.ends_received += 1
        state.last_end = message
        for label, counts in message.accounting.items():
            (state.ledgers if is_ledger_label(label) else state.accounting)[label] = counts
        state.frames_sent_by_detector = max(state.frames_sent_by_detector, message.frames_sent)
        if state.ends_received < self.placement.upstream_workers:
            return  # wait for every upstream worker: only then is the scan complete here
        yield from self._close(state, message)

    def _close(self, state: ScanState, message: ScanEnd) -> Iterator[Message]:
        """Hand the scan's merged ScanEnd (counts only; ledgers travel in ``_send``) to ``on_scan_end``."""
        accounting = dict(state.accounting)
        if not self.placement.output_endpoints:
            self._audit(state)
            # The last stage's on_scan_end (publish writes it to Tiled) sees its own counts, frames_lost too.
            accounting[self.placement.label] = dict(state.counts)
        merged = message.model_copy(update={"accounting": accounting})
        yield from self.on_scan_end(merged)
        if not self.placement.output_endpoints:
            self._finish_scan(merged)

    def _audit(self, state: ScanState) -> None:
        """Count the frames the source sent that came to rest nowhere: a worker died holding them.

        Only a last stage with one worker sees every ledger; with several, each would miss the others'.
        """
        if self.placement.spec.workers != 1 or self.placement.is_source:
            return
        ledgers = {**state.ledgers, **self._own_ledger(state)}
        lost = audit_lost_frames(ledgers)
        if lost is None or not len(lost):
            return
        n = len(lost)
        state.lost = lost
        state.counts[FRAMES_LOST] += n
        metrics.FRAMES_DROPPED.labels(reason=FRAMES_LOST, **self._labels).inc(n)
        runs = lost.runs()
        shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:_LOST_RUNS_SHOWN])
        self.warn(
            FRAMES_LOST,
            f"scan {state.scan_uid}: {n} frames were sent but never came to rest in any stage (a worker died "
            f"holding them): indices {shown}{'…' if len(runs) > _LOST_RUNS_SHOWN else ''}; see the "
            "launcher's restart events",
        )

    def _own_ledger(self, state: ScanState) -> dict[str, dict[str, int]]:
        return own_ledger(state, self.placement.label, self.placement.is_source)

    def _send(self, message: Message) -> None:
        if isinstance(message, FrameBatch):
            n = len(message.frame_indices)
            metrics.FRAMES_SENT.labels(**self._labels).inc(n)
            state = self.scan(message.scan_uid)
            state.counts["frames_sent"] += n
            state.sent.add(message.frame_indices)
        if isinstance(message, ScanStart) and self.placement.is_source:
            self._journal_start(message)
        if isinstance(message, ScanEnd) and self.placement.output_endpoints:
            # The last stage of a chain finishes its scans in _scan_end_arrived, after on_scan_end.
            state = self.scan(message.scan_uid)
            accounting = {
                **counts_only(message.accounting),
                **state.ledgers,
                **self._own_ledger(state),
                self.placement.label: dict(state.counts),
            }
            message = message.model_copy(update={"accounting": accounting})
            self._finish_scan(message)
        self._outlet.send(message)

    def _finish_scan(self, message: ScanEnd) -> None:
        state = self.scan(message.scan_uid)
        state.finished = True
        accounting = counts_only({**message.accounting, self.placement.label: dict(state.counts)})
        extra = {}
        if state.lost is not None:
            extra["frames_lost_indices"] = [list(run) for run in state.lost.runs()]
        self._log.report(
            "scan_end",
            scan_uid=message.scan_uid,
            frames_sent=message.frames_sent,
            accounting=accounting,
            **extra,
        )
        self._journal.forget(message.scan_uid)
        self._scans_completed += 1

    # ---- faults: the scan journal and the ScanEnd timeout -------------------------------------------
    def _journal_start(self, message: ScanStart) -> None:
        """Keep the ScanStart until the scan ends here, for a restarted worker."""
        try:
            self._journal.keep(message)
        except OSError as exc:
            self.warn(
                "journal",
                f"cannot keep scan {message.scan_uid}'s start in {self._journal.folder} ({exc}): a restart "
                "of this worker could not resume the scan; check run_dir",
            )

    def _recover_open_scans(self) -> None:
        """Resume the scans a previous run of this worker left open: it died during them."""
        for path in self._journal.kept():
            with self._errors_counted():
                self._resume(self._journal.read(path))

    def _resume(self, start: ScanStart) -> None:
        state = self.scan(start.scan_uid)
        state.start, state.recovered = start, True
        state.counts[RESTARTED_MID_SCAN] += 1
        self.warn(
            RESTARTED_MID_SCAN,
            f"{self.placement.label} restarted during scan {start.scan_uid}: it goes on with the "
            "frames still to come; what the previous run held is counted as frames_lost",
        )
        if self.placement.is_source:
            # A source cannot pick up a detector stream mid-series: end the scan so nothing waits.
            self._send(ScanEnd(scan_uid=start.scan_uid, frames_sent=start.planned_frames))
        else:
            self._send_all(self.on_scan_start(start))

    def _close_overdue_scans(self) -> None:
        """Close scans whose remaining ScanEnds will not come: an upstream worker died holding one."""
        now = time.monotonic()
        timeout_s = self.pipeline.scan_end_timeout_s
        upstream = self.placement.upstream_workers
        for state in list(self._scans.values()):
            # A restarted worker's ScanEnd may have died in its inbox: it closes after half the timeout, so
            # its counts (restarted_mid_scan, what it rested) reach the next stage before that one gives up.
            wait_s = timeout_s / 2 if state.recovered else timeout_s
            if state.finished or state.start is None or now - state.last_message_s < wait_s:
                continue
            if not (0 < state.ends_received < upstream or state.recovered):
                continue
            missing = upstream - state.ends_received
            uid = state.start.scan_uid
            state.counts[SCAN_ENDS_MISSING] += missing
            metrics.SCANS_TIMED_OUT.labels(reason=SCAN_ENDS_MISSING, **self._labels).inc()
            self.warn(
                SCAN_ENDS_MISSING,
                f"scan {uid}: {missing} of {upstream} upstream ScanEnds did not come within "
                f"scan_end_timeout_s={timeout_s:g} s; closing the scan with what arrived",
            )
            state.ends_received = upstream
            end = state.last_end or ScanEnd(scan_uid=uid, frames_sent=state.start.planned_frames)
            with self._errors_counted():
                self._send_all(self._close(state, end))

    def maybe_report_progress(self, scan_uid: str) -> None:
        """Tell the launcher how many frames this worker has received, at most a few times a second."""
        now = time.monotonic()
        if now - self._last_status_s >= _STATUS_INTERVAL_S:
            self._last_status_s = now
            received = self.scan(scan_uid).counts["frames_received"]
            self.report_status(scan_uid=scan_uid, frames_received=received)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())

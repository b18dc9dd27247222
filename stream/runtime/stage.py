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

import contextlib
import functools
import hashlib
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import zmq
from pydantic import BaseModel, ConfigDict, ValidationError

from phasestream.errors import ConfigError, DetectorMessageError, PhasestreamError
from phasestream.runtime import metrics
from phasestream.runtime.accounting import (
    FRAMES_LOST,
    RESTARTED_MID_SCAN,
    SCAN_ENDS_MISSING,
    FrameIndexSet,
    LedgerKind,
    audit_lost_frames,
    counts_only,
    is_ledger_label,
    ledger_label,
)
from phasestream.runtime.config import PipelineConfig, format_validation_error
from phasestream.runtime.curve import StageCurve
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd, ScanStart, decode
from phasestream.runtime.topology import WorkerPlacement
from phasestream.runtime.transport import Outlet, StatusChannel, StopRequestedError

log = logging.getLogger(__name__)

_IDLE_POLL_MS = 100
_DRAIN_LIMIT = 64
_STATUS_INTERVAL_S = 0.25
# Warnings and rejections of one reason: at most _LOG_BURST lines per _LOG_INTERVAL_S, then one line that
# says how many were left out. A flood of bad messages must not fill the worker's log (the metrics count
# every one).
_LOG_INTERVAL_S = 5.0
_LOG_BURST = 10
_LOG_FLOOD_INTERVAL_S = 30.0
TOO_MANY_PARTS = "too_many_parts"  # the reason of a raw message refused for its number of parts
# Set by the launcher for a restarted worker: how many times it restarted this worker so far.
RESTARTS_ENV = "PHASESTREAM_WORKER_RESTARTS"


class NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RawInput:
    """A detector-facing socket: the runtime creates and polls it, the stage decodes what arrives."""

    socket_type: int
    endpoint: str
    bind: bool = False
    # Larger messages drop the sender's connection before anything is allocated for them (ZMQ_MAXMSGSIZE).
    max_message_bytes: int | None = None
    # ZMQ_MAXMSGSIZE bounds each part, not their number: a message of more parts is refused, and its parts
    # are received and dropped one at a time, never kept together.
    max_parts: int = 16


@dataclass
class _LogWindow:
    start_s: float
    lines: int = 0
    suppressed: int = 0
    flooding: bool = False  # the reason's previous window had lines left out


class LogLimiter:
    """Decides which lines of each reason reach the log: ``burst`` per ``interval_s``, then none until the
    interval is over, when one line says how many were left out. A reason still flooding after that gets
    one line per ``flood_interval_s``, so a sustained flood of several reasons costs tens of bytes a
    second, not kilobytes (a 5-minute soak at 10 % hostile messages wrote 1.4 MB with bursts alone)."""

    def __init__(
        self,
        interval_s: float = _LOG_INTERVAL_S,
        burst: int = _LOG_BURST,
        flood_interval_s: float = _LOG_FLOOD_INTERVAL_S,
    ) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self.flood_interval_s = flood_interval_s
        self._windows: dict[str, _LogWindow] = {}
        self._suppressing = False  # any window with lines left out: only then is there anything to flush

    def _length_s(self, window: _LogWindow) -> float:
        return self.flood_interval_s if window.flooding else self.interval_s

    def admit(self, reason: str, now_s: float) -> int | None:
        """None: leave this line out. Else how many lines of ``reason`` were left out before it."""
        window = self._windows.get(reason)
        if window is None or now_s - window.start_s >= self._length_s(window):
            left_out = window.suppressed if window is not None else 0
            self._windows[reason] = _LogWindow(now_s, lines=1, flooding=left_out > 0)
            return left_out
        if window.lines < (1 if window.flooding else self.burst):
            window.lines += 1
            return 0
        window.suppressed += 1
        self._suppressing = True
        return None

    def overdue(self, now_s: float, force: bool = False) -> list[tuple[str, int]]:
        """(reason, lines left out) of each interval that is over (all, with ``force``), forgetting them."""
        if not self._suppressing:
            return []
        due = [
            (reason, window.suppressed)
            for reason, window in self._windows.items()
            if window.suppressed and (force or now_s - window.start_s >= self._length_s(window))
        ]
        for reason, _ in due:
            # The reason stays in flood mode: its next line opens a window of flood_interval_s.
            self._windows[reason] = _LogWindow(now_s, lines=1, flooding=True)
        self._suppressing = any(window.suppressed for window in self._windows.values())
        return due


@dataclass
class ScanState:
    start: ScanStart | None = None
    ends_received: int = 0
    frames_sent_by_detector: int = 0
    accounting: dict[str, dict[str, int]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Frame indices in and out of this worker, and the upstream ledgers its ScanEnds brought.
    received: FrameIndexSet = field(default_factory=FrameIndexSet)
    sent: FrameIndexSet = field(default_factory=FrameIndexSet)
    ledgers: dict[str, dict[str, int]] = field(default_factory=dict)
    last_end: ScanEnd | None = None
    last_message_s: float = field(default_factory=time.monotonic)
    recovered: bool = False  # opened from the journal by a restarted worker
    finished: bool = False
    lost: FrameIndexSet | None = None


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
        self._status: StatusChannel | None = None
        self._log_limiter = LogLimiter()
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
        """Say what was discarded and the fix without raising: in the log and to the launcher, at most
        ``_LOG_BURST`` lines of one reason per ``_LOG_INTERVAL_S`` (``LogLimiter``)."""
        left_out = self._log_limiter.admit(reason, time.monotonic())
        if left_out is None:
            return
        text += _left_out_note(left_out, self._log_limiter.interval_s)
        log.warning("%s (%s): %s", self.placement.label, reason, text)
        if self._status is not None:
            self._status.report("log", level="warning", reason=reason, text=text)

    def note(self, reason: str, text: str) -> None:
        """Say what the stage decided (a start chosen, a value overridden): in the log and to the launcher."""
        log.info("%s (%s): %s", self.placement.label, reason, text)
        if self._status is not None:
            self._status.report("log", level="info", reason=reason, text=text)

    def report_status(self, **fields: Any) -> None:
        if self._status is not None:
            self._status.report("status", **fields)

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
        context = zmq.Context()
        curve = self._curve(context)
        poller = zmq.Poller()
        ports: dict[zmq.Socket, str] = {}
        if self.placement.input_endpoint is not None:
            inbox = context.socket(zmq.PULL)
            inbox.setsockopt(zmq.RCVHWM, self.pipeline.high_water_mark)
            if curve is not None and _is_tcp(self.placement.input_endpoint):
                curve.serve(inbox)
            inbox.bind(self.placement.input_endpoint)
            ports[inbox] = "in"
        raw_inputs = self.raw_inputs()
        for port, raw in raw_inputs.items():
            sock = context.socket(raw.socket_type)
            sock.setsockopt(zmq.RCVHWM, max(self.pipeline.high_water_mark, 1000))
            if raw.max_message_bytes is not None:
                sock.setsockopt(zmq.MAXMSGSIZE, raw.max_message_bytes)
            sock.bind(raw.endpoint) if raw.bind else sock.connect(raw.endpoint)
            ports[sock] = port
        for sock in ports:
            poller.register(sock, zmq.POLLIN)
        secure = None
        downstream = self.placement.downstream
        if curve is not None and downstream is not None and _is_tcp(*self.placement.output_endpoints):
            secure = functools.partial(curve.connect_to, server_name=downstream)
        self._outlet = Outlet(
            context, self.placement.output_endpoints, self.pipeline.high_water_mark, self._stop, secure
        )
        self._status = StatusChannel(context, self.placement.control_endpoint, self.placement.label)
        address = self.placement.metrics_address
        metrics_port = metrics.serve_metrics(self.placement.metrics_port, addr=address)
        restarts = int(os.environ.get(RESTARTS_ENV, "0"))
        if restarts:
            metrics.WORKER_RESTARTS.labels(**self._labels).inc(restarts)
        self._status.report("ready", metrics_port=metrics_port, pid=os.getpid(), restarts=restarts)
        log.info("%s ready; /metrics on %s:%d", self.placement.label, address, metrics_port)
        try:
            self._recover_open_scans()
            self._loop(poller, ports, raw_inputs)
        except StopRequestedError:
            log.info("%s stopped while waiting for downstream room", self.placement.label)
        finally:
            self._log_left_out(force=True)
            self.close()
            self._status.report("stopped")
            self._outlet.close(linger_ms=5000)
            self._status.close()
            for sock in ports:
                sock.close(linger=0)
            if curve is not None:
                curve.close()  # its authenticator's socket lives in this context
            context.term()

    def _curve(self, context: zmq.Context) -> StageCurve | None:
        """This worker's CurveZMQ keys when the pipeline sets ``curve`` and a socket of it is tcp."""
        endpoints = [e for e in (self.placement.input_endpoint, *self.placement.output_endpoints) if e]
        if not any(_is_tcp(e) for e in endpoints):
            return None
        if self.pipeline.curve is None:
            log.warning(
                "%s talks tcp without CurveZMQ: anyone who reaches %s may send to or read from it; set "
                "curve: in the pipeline (docs/operations.md, 'CurveZMQ between hosts')",
                self.placement.label, ", ".join(endpoints),
            )  # fmt: skip
            return None
        downstream = self.placement.downstream
        peers = [downstream] if downstream is not None and _is_tcp(*self.placement.output_endpoints) else []
        return StageCurve(self.pipeline.curve, context, self.stage_name, peers)

    def _loop(
        self, poller: zmq.Poller, ports: dict[zmq.Socket, str], raw_inputs: dict[str, RawInput]
    ) -> None:
        while not self._stop.is_set():
            wants_idle = self.idle_poll_ms is not None and self.has_open_scan()
            timeout = self.idle_poll_ms if wants_idle else _IDLE_POLL_MS
            ready = dict(poller.poll(timeout))
            handled = 0
            for sock, port in ports.items():
                if not ready.get(sock, 0) & zmq.POLLIN:
                    continue
                group = _drain(sock) if port == "in" else _drain_raw(sock, port, raw_inputs[port])
                handled += len(group)
                self._handle_group(port, group)
            self._queue_depth.set(handled)
            if handled == 0 and wants_idle:
                with self._errors_counted():
                    self._send_all(self.idle())
            self._close_overdue_scans()
            self._log_left_out()
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
        if isinstance(frames, PhasestreamError):  # what _drain_raw refused in place of the message
            self.raw_refused(port, frames)
            raise frames
        if port == "in":
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
        left_out = self._log_limiter.admit(reason, time.monotonic())
        if left_out is None:
            return
        text += _left_out_note(left_out, self._log_limiter.interval_s)
        log.warning(
            "%s rejected a message (%s): %s", self.placement.label, reason, text, exc_info=with_traceback
        )
        if self._status is not None:
            self._status.report("log", level="warning", reason=reason, text=text)

    def _log_left_out(self, force: bool = False) -> None:
        """One line for each reason whose lines ``LogLimiter`` left out in an interval that is over."""
        interval_s = self._log_limiter.interval_s
        for reason, n in self._log_limiter.overdue(time.monotonic(), force):
            text = (
                f"{n} more lines of this reason were left out of the log in the last {interval_s:g} s; "
                "the metrics (phasestream_messages_rejected_total, ...) count every one"
            )
            log.warning("%s (%s): %s", self.placement.label, reason, text)
            if self._status is not None:
                self._status.report("log", level="warning", reason=reason, text=text)

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
        uid = state.start.scan_uid if state.start else state.last_end.scan_uid if state.last_end else "?"
        n = len(lost)
        state.lost = lost
        state.counts[FRAMES_LOST] += n
        metrics.FRAMES_DROPPED.labels(reason=FRAMES_LOST, **self._labels).inc(n)
        runs = lost.runs()
        shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:10])
        self.warn(
            FRAMES_LOST,
            f"scan {uid}: {n} frames were sent but never came to rest in any stage (a worker died holding "
            f"them): indices {shown}{'…' if len(runs) > 10 else ''}; see the launcher's restart events",
        )

    def _own_ledger(self, state: ScanState) -> dict[str, dict[str, int]]:
        if self.placement.is_source:
            if state.sent.overflowed or not len(state.sent):
                return {}
            return {ledger_label(self.placement.label, LedgerKind.SENT): state.sent.to_ledger()}
        rested = state.received.difference(state.sent)
        if not len(rested):
            return {}
        return {ledger_label(self.placement.label, LedgerKind.RESTED): rested.to_ledger()}

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
        if self._status is not None:
            self._status.report(
                "scan_end",
                scan_uid=message.scan_uid,
                frames_sent=message.frames_sent,
                accounting=accounting,
                **extra,
            )
        self._forget_start(message.scan_uid)
        self._scans_completed += 1

    # ---- faults: the scan journal and the ScanEnd timeout -------------------------------------------
    def _journal_path(self, scan_uid: str) -> Path:
        name = hashlib.sha256(scan_uid.encode()).hexdigest()[:24]
        return self.pipeline.run_dir / "scans" / self.placement.label / f"{name}.json"

    def _journal_start(self, message: ScanStart) -> None:
        """Keep the ScanStart until the scan ends here, for a restarted worker (a few hundred bytes)."""
        path = self._journal_path(message.scan_uid)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_text(message.model_dump_json())
            partial.replace(path)
        except OSError as exc:
            self.warn("journal", f"cannot keep scan {message.scan_uid}'s start in {path} ({exc}): "
                      "a restart of this worker could not resume the scan; check run_dir")  # fmt: skip

    def _forget_start(self, scan_uid: str) -> None:
        with contextlib.suppress(OSError):
            self._journal_path(scan_uid).unlink(missing_ok=True)

    def _recover_open_scans(self) -> None:
        """Resume the scans a previous run of this worker left open (the launcher clears the journal
        when it starts a pipeline, so these are from a worker that died)."""
        folder = self.pipeline.run_dir / "scans" / self.placement.label
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            with self._errors_counted():
                start = ScanStart.model_validate_json(path.read_text())
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


def _is_tcp(*endpoints: str) -> bool:
    return bool(endpoints) and all(e.startswith("tcp://") for e in endpoints)


def _left_out_note(left_out: int, interval_s: float) -> str:
    """What a line adds when lines of its reason were left out before it."""
    if not left_out:
        return ""
    return f" ({left_out} more lines of this reason were left out of the log in the last {interval_s:g} s)"


def _drain(sock: zmq.Socket) -> list[list[Any]]:
    """The messages waiting on a socket, at most ``_DRAIN_LIMIT`` so that no socket starves the others.

    phasestream's own messages carry arrays: they stay zero-copy frames.
    """
    group = []
    for _ in range(_DRAIN_LIMIT):
        try:
            group.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return group


def _drain_raw(sock: zmq.Socket, port: str, raw: RawInput) -> list[list[bytes] | PhasestreamError]:
    """Like ``_drain`` for a detector-facing socket: each message as ``bytes`` parts (for small detector
    messages cheaper than a ``zmq.Frame``), or, for one of more than ``raw.max_parts`` parts, the error
    that refuses it."""
    group: list[list[bytes] | PhasestreamError] = []
    for _ in range(_DRAIN_LIMIT):
        try:
            parts = [sock.recv(flags=zmq.NOBLOCK)]
        except zmq.Again:
            break
        # ZeroMQ delivers a message whole: once its first part is here, the rest are too.
        while sock.getsockopt(zmq.RCVMORE):
            if len(parts) == raw.max_parts:
                parts = _too_many_parts(sock, port, raw, len(parts))
                break
            parts.append(sock.recv(flags=zmq.NOBLOCK))
        group.append(parts)
    return group


def _too_many_parts(sock: zmq.Socket, port: str, raw: RawInput, kept: int) -> DetectorMessageError:
    """Drop the rest of a message of too many parts, one part at a time, and say what was refused."""
    dropped = 0
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(flags=zmq.NOBLOCK)
        dropped += 1
    return DetectorMessageError(
        f"a message on the {port} socket ({raw.endpoint}) has {kept + dropped} parts, more than the "
        f"{raw.max_parts} its raw input allows (max_parts); it is dropped unread. Is something other than "
        "the detector sending to this endpoint?",
        reason=TOO_MANY_PARTS,
    )

"""Start a topology as one process per stage worker, watch it, and stop it cleanly.

Every worker reports on a control socket (ready, status, warnings, scan end). The launcher waits for
every ``ready`` before it returns from ``start()`` (a handshake, not a sleep), so a detector may start
streaming at once. ``stop()`` sends SIGTERM, waits, and only then kills.

A worker that exits while the pipeline runs, other than because ``stop()`` asked, is dead whatever its
exit code: a worker stopped by someone else's SIGTERM exits with code 0 and is a death all the same. The
one exception is a worker of an ``exit_after_scan`` pipeline that exits with code 0: its scan is done, as
the pipeline asked. A dead worker is restarted on the same endpoints after a back-off
(``restarts.backoff_s``, doubled each time up to ``restarts.max_backoff_s``), at most
``restarts.max_restarts`` times; each restart is logged, counted (``WorkerProcess.restarts``, the worker's
``phasestream_worker_restarts_total``) and reported as a ``restarted`` event. Only a worker that is out of
restarts is reported as ``died``. How a restarted worker rejoins a scan in progress:
``stream/runtime/stage.py``.

The run directory is the launcher's alone while it runs: before it writes anything there, ``start()``
takes an exclusive lock (``RunDirLock``, ``run_dir.py``: ``fcntl.flock`` on ``launcher.lock``,
which the kernel releases when the process exits or crashes), and a second launcher on the same directory
fails at once, naming the directory and the holder's pid, instead of overwriting ``pipeline.json``, the
logs and the sockets.

The control socket takes only its schema (``ControlEvent``: ``parse_control_message``, both in
``control.py``), from this launcher's own workers, in messages of one part up to
``CONTROL_MAX_MESSAGE_BYTES``; ZeroMQ drops a larger message with its sender's connection
(``zmq.MAXMSGSIZE``). Anything else is counted (``Launcher.rejected_messages``, by ``ControlRejection``),
logged at most every ``REJECTION_LOG_INTERVAL_S``, and skipped: a bad message never stops the pipeline.

Across hosts every host runs its own launcher, ``Launcher(pipeline, host=NAME)`` (``phasestream run
PIPELINE --host NAME``): it starts only the stages placed on that host and hears only them, on that host's
own control socket (``stream/runtime/topology.py``), under that host's own lock. Without a host it starts
every stage here.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from phasestream.apps.launch.control import (
    CONTROL_MAX_MESSAGE_BYTES,
    ControlEvent,
    ControlMessageError,
    ControlRejection,
    ReadyEvent,
    parse_control_message,
    receive_control,
)
from phasestream.apps.launch.run_dir import LaunchError, RunDirLock
from phasestream.runtime.config import PipelineConfig, StageSpec
from phasestream.runtime.stage import RESTARTS_ENV
from phasestream.runtime.topology import control_endpoint, stages_on

log = logging.getLogger(__name__)

REJECTION_LOG_INTERVAL_S = 10.0


@dataclass
class ControlRejections:
    """Counts of refused control messages by reason, logged at most once per ``interval_s``."""

    interval_s: float = REJECTION_LOG_INTERVAL_S
    counts: Counter[str] = field(default_factory=Counter)
    _logged_at_s: float | None = field(default=None, init=False)
    _unlogged: int = field(default=0, init=False)

    def note(self, error: ControlMessageError) -> None:
        self.counts[str(error.reason)] += 1
        self._unlogged += 1
        now_s = time.monotonic()
        if self._logged_at_s is not None and now_s - self._logged_at_s < self.interval_s:
            return
        so_far = ", ".join(f"{reason} {count}" for reason, count in sorted(self.counts.items()))
        log.warning(
            "control socket: skipped %d message(s) since the last report (so far: %s); the latest: %s",
            self._unlogged, so_far, error,
        )  # fmt: skip
        self._logged_at_s = now_s
        self._unlogged = 0


@dataclass
class WorkerProcess:
    label: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int | None = None
    restarts: int = 0
    gave_up: bool = False  # out of restarts, reported as died

    def log_tail(self, n_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n_lines:])


@dataclass
class Launcher:
    pipeline: PipelineConfig
    host: str | None = None  # run only the stages placed on this host; None: every stage
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    # Taken by start() unless the caller took it already (``phasestream run`` does, before it writes the
    # embedded Tiled server's key into run_dir); released by stop() only if start() took it.
    run_dir_lock: RunDirLock | None = None

    def __post_init__(self) -> None:
        self.stages: list[StageSpec] = stages_on(self.pipeline, self.host)
        self._context = zmq.Context()
        self._control: zmq.Socket | None = None
        # The watcher thread restarts workers and files events here; next_event() hands them out first.
        self._watcher_events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self._spawn_lock = threading.Lock()
        self._environment: dict[str, str] = {}
        if self.run_dir_lock is None:
            self.run_dir_lock = RunDirLock.for_launcher(self.pipeline, self.host)
        self._owns_lock = False
        self._rejections = ControlRejections()

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pipeline_file(self) -> Path:
        # One per host: launchers of several hosts may share run_dir, and each writes its own resolution.
        name = "pipeline.json" if self.host is None else f"pipeline-{self.host}.json"
        return self.pipeline.run_dir / name

    @property
    def rejected_messages(self) -> Counter[str]:
        """Control messages skipped since ``start()``, by ``ControlRejection``."""
        return self._rejections.counts

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Lock the run directory, start every worker, and return once each has reported ``ready``."""
        assert self.run_dir_lock is not None
        if not self.run_dir_lock.held:
            self.run_dir_lock.acquire()  # before anything is written in run_dir: LaunchError if taken
            self._owns_lock = True
        try:
            self._start(ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, ready_timeout_s: float) -> None:
        run_dir = self.pipeline.run_dir
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        run_dir.chmod(0o700)  # its sockets, logs and pipeline.json (with the Tiled API key) are this user's
        # The resolved config may hold the Tiled API key: readable by this user only.
        self.pipeline_file.touch(mode=0o600, exist_ok=True)
        self.pipeline_file.chmod(0o600)
        self.pipeline_file.write_text(self.pipeline.model_dump_json(indent=2))
        # Open scans journalled by an earlier run of these workers are not this run's to resume; other
        # hosts' journals in a shared run_dir are theirs.
        for spec in self.stages:
            for worker in range(spec.workers):
                shutil.rmtree(run_dir / "scans" / f"{spec.name}.{worker}", ignore_errors=True)
        # Taken once: a restarted worker gets the environment its first run had.
        self._environment = _worker_environment()
        self._control = self._context.socket(zmq.PULL)
        # ZeroMQ drops a larger message, and its sender's connection, before it reaches the launcher.
        self._control.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE_BYTES)
        # Each worker reports to its own host's control socket; run here, they are all this launcher's.
        for host in dict.fromkeys(spec.host for spec in self.stages):
            self._control.bind(control_endpoint(self.pipeline, host))
        for spec in self.stages:
            for worker in range(spec.workers):
                self._spawn(spec.name, worker)
        self._wait_until_ready(ready_timeout_s)
        self._watching.set()
        self._watcher = threading.Thread(target=self._watch, name="launcher-watcher", daemon=True)
        self._watcher.start()

    def _spawn(self, stage: str, worker: int, restarts: int = 0) -> None:
        label = f"{stage}.{worker}"
        log_path = self.pipeline.run_dir / "logs" / f"{label}.log"
        command = [
            sys.executable, "-m", "phasestream", "stage", stage,
            "--pipeline", str(self.pipeline_file), "--worker", str(worker),
        ]  # fmt: skip
        # A restart appends, so the log still shows why the previous run died.
        with log_path.open("ab" if restarts else "wb") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**self._environment, RESTARTS_ENV: str(restarts)},
            )
        self.workers[label] = WorkerProcess(label, process, log_path, restarts=restarts)

    def _watch(self) -> None:
        """Restart workers that die while the pipeline runs, after a back-off; give up after the limit."""
        settings = self.pipeline.restarts
        due: dict[str, tuple[float, int]] = {}  # label -> (restart time, exit code)
        while self._watching.is_set():
            now = time.monotonic()
            for label, worker in list(self.workers.items()):
                code = worker.process.poll()
                if code is None or label in due or (code == 0 and self.pipeline.exit_after_scan):
                    continue
                if worker.restarts >= settings.max_restarts:
                    if not worker.gave_up:
                        worker.gave_up = True
                        self._watcher_events.put(
                            {"event": "died", "sender": label, "code": code, "log": worker.log_tail()}
                        )
                    continue
                delay_s = min(settings.backoff_s * 2**worker.restarts, settings.max_backoff_s)
                log.warning(
                    "%s exited with code %s; restart %d of %d in %.1f s",
                    label, code, worker.restarts + 1, settings.max_restarts, delay_s,
                )  # fmt: skip
                due[label] = (now + delay_s, code)
            for label, (when_s, code) in list(due.items()):
                if now < when_s:
                    continue
                del due[label]
                worker = self.workers[label]
                stage, index = label.rsplit(".", 1)
                with self._spawn_lock:
                    if not self._watching.is_set():
                        return
                    self._spawn(stage, int(index), restarts=worker.restarts + 1)
                self._watcher_events.put(
                    {
                        "event": "restarted",
                        "sender": label,
                        "code": code,
                        "restarts": worker.restarts + 1,
                        "log": worker.log_tail(),
                    }
                )
            time.sleep(0.1)

    @property
    def restarts_total(self) -> int:
        """Restarts of all workers since ``start()``."""
        return sum(worker.restarts for worker in self.workers.values())

    def _wait_until_ready(self, timeout_s: float) -> None:
        waiting = set(self.workers)
        deadline = time.monotonic() + timeout_s
        while waiting:
            for label in sorted(waiting):
                worker = self.workers[label]
                if worker.process.poll() is not None:
                    raise LaunchError(
                        f"stage worker {label} exited with code {worker.process.returncode} before it was "
                        f"ready; its log ({worker.log_path}) ends with:\n{worker.log_tail()}"
                    )
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"stage workers {sorted(waiting)} were not ready after {timeout_s:.0f} s; "
                    f"see their logs in {self.pipeline.run_dir / 'logs'}"
                )
            event = self.next_event(timeout_s=0.2)
            if event and event["event"] == "ready":
                waiting.discard(event["sender"])

    def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event from a worker or the watcher within ``timeout_s``; None if none came.

        Messages on the control socket that are not events of this launcher's workers are counted in
        ``rejected_messages`` and skipped.
        """
        assert self._control is not None, "start() the launcher first"
        try:
            return self._watcher_events.get_nowait()
        except queue.Empty:
            pass
        deadline = time.monotonic() + timeout_s
        while self._control.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            try:
                return self._accept(parse_control_message(receive_control(self._control)))
            except ControlMessageError as exc:
                self._rejections.note(exc)
            if time.monotonic() >= deadline:
                break
        return None

    def _accept(self, event: ControlEvent) -> dict[str, Any]:
        """``event`` as a dict if one of this launcher's workers sent it; else ``ControlMessageError``."""
        worker = self.workers.get(event.sender)
        if worker is None:
            raise ControlMessageError(
                f"{event.event} event from {event.sender!r}, which is not a worker of this launcher "
                f"({sorted(self.workers)})",
                reason=ControlRejection.UNKNOWN_SENDER,
            )
        if isinstance(event, ReadyEvent):
            # A restarted worker is a new process: its label's process is already the new one.
            if event.pid != worker.process.pid:
                raise ControlMessageError(
                    f"ready event for {event.sender} from pid {event.pid}, but that worker is pid "
                    f"{worker.process.pid}",
                    reason=ControlRejection.IMPOSTOR,
                )
            worker.metrics_port = event.metrics_port  # a restart's new port
        return event.model_dump(mode="json", exclude_unset=True)

    def events(self, timeout_s: float) -> Iterator[dict[str, Any]]:
        """Control events until ``timeout_s`` passes; also ``restarted`` and ``died`` (out of restarts)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            event = self.next_event(timeout_s=0.2)
            if event is not None:
                yield event

    def wait_for_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for worker in self.workers.values():
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every worker, give them ``timeout_s`` to finish sending, then kill what is left."""
        self._watching.clear()
        with self._spawn_lock:  # a restart under way finishes first, and none starts after this
            pass
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        if not self.wait_for_exit(timeout_s):
            for worker in self.workers.values():
                if worker.process.poll() is None:
                    log.warning("killing %s: it did not stop within %.0f s", worker.label, timeout_s)
                    worker.process.kill()
                    worker.process.wait()
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None
        if self._owns_lock and self.run_dir_lock is not None:
            self.run_dir_lock.release()
            self._owns_lock = False


def _worker_environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Idle OpenMP threads spin by default; beside other stage processes on a few cores that spinning
    # slowed a torch solver 24-fold (measured), so they sleep unless the user says otherwise.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env

"""Start a topology as one process per stage worker, watch it, and stop it cleanly.

Every worker reports on a control socket (ready, status, warnings, scan end). The launcher waits for
every ``ready`` before it returns from ``start()`` (a handshake, not a sleep), so a detector may start
streaming at once. ``stop()`` sends SIGTERM, waits, and only then kills.

A worker that dies while the pipeline runs (non-zero exit or a signal) is restarted on the same endpoints
after a back-off (``restarts.backoff_s``, doubled each time up to ``restarts.max_backoff_s``), at most
``restarts.max_restarts`` times; each restart is logged, counted (``WorkerProcess.restarts``, the worker's
``phasestream_worker_restarts_total``) and reported as a ``restarted`` event. Only a worker that is out of
restarts is reported as ``died``. How a restarted worker rejoins a scan in progress: ``stream/stage.py``.

Across hosts every host runs its own launcher, ``Launcher(pipeline, host=NAME)`` (``phasestream run
PIPELINE --host NAME``): it starts only the stages placed on that host and hears only them, on that host's
own control socket (``stream/topology.py``). Without a host it starts every stage here.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from phasestream.config import PipelineConfig, StageSpec
from phasestream.errors import PhasestreamError
from phasestream.stage import RESTARTS_ENV
from phasestream.topology import control_endpoint, stages_on

log = logging.getLogger(__name__)


class LaunchError(PhasestreamError):
    reason = "launch"


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

    def start(self, ready_timeout_s: float = 120.0) -> None:
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
                if code in (None, 0) or label in due:
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
                    self.stop()
                    raise LaunchError(
                        f"stage worker {label} exited with code {worker.process.returncode} before it was "
                        f"ready; its log ({worker.log_path}) ends with:\n{worker.log_tail()}"
                    )
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(
                    f"stage workers {sorted(waiting)} were not ready after {timeout_s:.0f} s; "
                    f"see their logs in {self.pipeline.run_dir / 'logs'}"
                )
            event = self.next_event(timeout_s=0.2)
            if event and event["event"] == "ready":
                self.workers[event["sender"]].metrics_port = event["metrics_port"]
                waiting.discard(event["sender"])

    def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        assert self._control is not None, "start() the launcher first"
        try:
            return self._watcher_events.get_nowait()
        except queue.Empty:
            pass
        if self._control.poll(int(timeout_s * 1000)):
            event = json.loads(self._control.recv())
            if event["event"] == "ready" and event["sender"] in self.workers:
                self.workers[event["sender"]].metrics_port = event["metrics_port"]  # a restart's new port
            return event
        return None

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


def _worker_environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Idle OpenMP threads spin by default; beside other stage processes on a few cores that spinning
    # slowed a torch solver 24-fold (measured), so they sleep unless the user says otherwise.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env

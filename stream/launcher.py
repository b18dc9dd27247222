"""Start a topology as one process per stage worker, watch it, and stop it cleanly.

Every worker reports on a control socket (ready, status, warnings, scan end). The launcher waits for
every ``ready`` before it returns from ``start()`` (a handshake, not a sleep), so a detector may start
streaming at once. ``stop()`` sends SIGTERM, waits, and only then kills.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from phasestream.config import PipelineConfig
from phasestream.errors import PhasestreamError
from phasestream.topology import control_endpoint

log = logging.getLogger(__name__)


class LaunchError(PhasestreamError):
    reason = "launch"


@dataclass
class WorkerProcess:
    label: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int | None = None

    def log_tail(self, n_lines: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n_lines:])


@dataclass
class Launcher:
    pipeline: PipelineConfig
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._context = zmq.Context()
        self._control: zmq.Socket | None = None

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pipeline_file(self) -> Path:
        return self.pipeline.run_dir / "pipeline.json"

    def start(self, ready_timeout_s: float = 120.0) -> None:
        run_dir = self.pipeline.run_dir
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        run_dir.chmod(0o700)  # its sockets, logs and pipeline.json (with the Tiled API key) are this user's
        # The resolved config may hold the Tiled API key: readable by this user only.
        self.pipeline_file.touch(mode=0o600, exist_ok=True)
        self.pipeline_file.chmod(0o600)
        self.pipeline_file.write_text(self.pipeline.model_dump_json(indent=2))
        self._control = self._context.socket(zmq.PULL)
        self._control.bind(control_endpoint(self.pipeline))
        for spec in self.pipeline.stages:
            for worker in range(spec.workers):
                self._spawn(spec.name, worker)
        self._wait_until_ready(ready_timeout_s)

    def _spawn(self, stage: str, worker: int) -> None:
        label = f"{stage}.{worker}"
        log_path = self.pipeline.run_dir / "logs" / f"{label}.log"
        command = [
            sys.executable, "-m", "phasestream", "stage", stage,
            "--pipeline", str(self.pipeline_file), "--worker", str(worker),
        ]  # fmt: skip
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_worker_environment(),
            )
        self.workers[label] = WorkerProcess(label, process, log_path)

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
        if self._control.poll(int(timeout_s * 1000)):
            return json.loads(self._control.recv())
        return None

    def events(self, timeout_s: float) -> Iterator[dict[str, Any]]:
        """Control events until ``timeout_s`` passes; also says when a worker dies unexpectedly."""
        deadline = time.monotonic() + timeout_s
        reported_dead: set[str] = set()
        while time.monotonic() < deadline:
            event = self.next_event(timeout_s=0.2)
            if event is not None:
                yield event
            for label, worker in self.workers.items():
                code = worker.process.poll()
                if code not in (None, 0) and label not in reported_dead:
                    reported_dead.add(label)
                    yield {"event": "died", "sender": label, "code": code, "log": worker.log_tail()}

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

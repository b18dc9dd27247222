"""Attacks on the launcher, its control socket and the Tiled API key, each written as the attack itself.

1. A worker stopped by someone else's SIGTERM exits with code 0: it must still be restarted and reported.
2. A second launcher on the same run directory must fail at once, naming the directory and the holder,
   and leave the first pipeline's ``pipeline.json``, key file, logs and sockets as they were.
3. Garbage, wrong-shape JSON, impostors, a huge message and a multipart flood on the control socket are
   counted and skipped: the launcher survives and the pipeline still completes a scan.
4. The Tiled API key never goes on a command line, a key file other users can read is refused, the
   embedded Tiled server's files are private, and a key that Tiled refuses is refused at once.

The pipelines are ``tests/faults/fault_rig.py``'s (ingest → relay → collect), in-process or served by
``phasestream run`` in a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest
import yaml
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from phasestream.apps.cli.main import main
from phasestream.apps.launch.control import (
    CONTROL_MAX_MESSAGE_BYTES,
    ControlMessageError,
    ControlRejection,
    LogEvent,
    ReadyEvent,
    ScanEndEvent,
    StatusEvent,
    StoppedEvent,
    parse_control_message,
)
from phasestream.apps.launch.launcher import REJECTION_LOG_INTERVAL_S, Launcher
from phasestream.apps.launch.run_dir import LaunchError, RunDirLock
from phasestream.apps.serve import EMBEDDED_API_KEY_FILE
from phasestream.errors import ConfigError
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import PipelineConfig, default_run_dir, user_run_root, validate_pipeline
from phasestream.runtime.tiled.access import read_api_key_file, validate_api_key
from phasestream.runtime.topology import control_endpoint
from phasestream.simulators.selun import SelunEmitter

FAULTS_DIR = Path(__file__).resolve().parent / "faults"
sys.path.insert(0, str(FAULTS_DIR))  # fault_rig: the fault tests' pipeline, stages and scans
from fault_rig import BATCH_SIZE, Scan, fault_rig  # noqa: E402

PRIVATE_BITS = stat.S_IRWXG | stat.S_IRWXO
START_TIMEOUT_S = 120.0  # a pipeline and an embedded Tiled server on a loaded 2-core machine


def _child_env() -> dict[str, str]:
    """This environment without phasestream settings, with the fault rig's stages importable by workers."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PHASESTREAM_")}
    path = os.pathsep.join(filter(None, [str(FAULTS_DIR), os.getenv("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def _short_dir(prefix: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: ipc paths are limited
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """``main()`` turns SIGTERM into KeyboardInterrupt; put back pytest's handler afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


# ---- 1. a worker stopped by SIGTERM --------------------------------------------------------------------
@pytest.mark.slow
def test_a_worker_stopped_by_sigterm_is_restarted_reported_and_the_next_scan_works() -> None:
    n = 40
    with fault_rig({}, max_restarts=1) as rig:
        os.kill(rig.launcher.workers["relay.0"].process.pid, signal.SIGTERM)  # not the launcher's doing
        restarted = rig.wait_for(lambda e: e["event"] == "restarted")
        rig.wait_for(lambda e: e["event"] == "ready" and e["sender"] == "relay.0")
        scan = rig.new_scan("after-sigterm", n)
        rig.emitter.emit_messages(scan.data_messages(), scan.position_messages())
        end = rig.scan_end(scan.scan_uid)
        collected = rig.collected(scan.scan_uid)
        # Out of restarts now: the next SIGTERM is reported as a death.
        os.kill(rig.launcher.workers["relay.0"].process.pid, signal.SIGTERM)
        died = rig.wait_for(lambda e: e["event"] == "died")

    assert restarted["sender"] == "relay.0" and restarted["code"] == 0, restarted
    assert restarted["restarts"] == 1
    assert sorted(collected) == list(range(n))
    assert unaccounted_frames(end["frames_sent"], end["accounting"]) == []
    assert end["accounting"]["relay.0"]["frames_sent"] > 0, "the restarted relay.0 took no frames"
    assert died["sender"] == "relay.0" and died["code"] == 0, died


# ---- 2. a second launcher on the same run directory ----------------------------------------------------
class _LineReader:
    """The lines a child process prints, read in a thread so that waiting for one can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.lines.append(line)
            if predicate(line):
                return line
        pytest.fail(f"no such line within {timeout_s} s; output so far:\n" + "\n".join(self.lines[-30:]))


@dataclass(frozen=True)
class _RunDirState:
    """What a second launcher must not touch: file contents, and which socket files are bound."""

    files: dict[str, bytes]
    logs: dict[str, bytes]
    sockets: dict[str, int]  # name -> inode: a rebound socket is a new file

    @classmethod
    def of(cls, run_dir: Path) -> _RunDirState:
        names = ("pipeline.json", EMBEDDED_API_KEY_FILE, "launcher.lock")
        return cls(
            files={name: (run_dir / name).read_bytes() for name in names},
            logs={path.name: path.read_bytes() for path in sorted((run_dir / "logs").iterdir())},
            sockets={path.name: path.stat().st_ino for path in sorted(run_dir.glob("*.sock"))},
        )


def _pipeline_yaml(run_dir: Path, tiled_dir: Path) -> Path:
    path = run_dir.parent / f"{run_dir.name}.yaml"
    pipeline = {
        "name": "hostile",
        "run_dir": str(run_dir),
        "tiled": {"data_dir": str(tiled_dir)},
        "detector": {"data_endpoint": f"ipc://{run_dir}/det.sock", "positions_endpoint": f"ipc://{run_dir}/pos.sock"},
        "stages": [
            {"name": "ingest", "stage": "ingest", "config": {"batch_size": BATCH_SIZE}},
            {"name": "collect", "stage": "fault_rig:Collector", "config": {"out_dir": str(run_dir)}},
        ],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(pipeline))
    return path


def _phasestream(*args: str) -> list[str]:
    return [sys.executable, "-m", "phasestream", *args]


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_fails_at_once_and_leaves_the_first_untouched() -> None:
    with _short_dir("ps-hostile-") as folder:
        run_dir, tiled_dir = folder / "run", folder / "tiled"
        run_dir.mkdir(mode=0o700)
        # An earlier run's Tiled folder and log, from before the modes were private.
        tiled_dir.mkdir(mode=0o755)
        (tiled_dir / "error.log").write_text("an earlier run\n")
        (tiled_dir / "error.log").chmod(0o644)
        pipeline_file = _pipeline_yaml(run_dir, tiled_dir)
        emitter = SelunEmitter(f"ipc://{run_dir}/det.sock", f"ipc://{run_dir}/pos.sock", linger_s=1.0)
        first = subprocess.Popen(
            _phasestream("run", str(pipeline_file)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_child_env(),
        )  # fmt: skip
        try:
            output = _LineReader(first)
            key_line = output.wait_for(lambda line: "API key is in" in line, START_TIMEOUT_S)
            output.wait_for(lambda line: "Ctrl-C stops every stage" in line, START_TIMEOUT_S)
            before = _RunDirState.of(run_dir)

            started_s = time.monotonic()
            second = subprocess.run(
                _phasestream("run", str(pipeline_file)),
                capture_output=True, text=True, env=_child_env(), timeout=60,
            )  # fmt: skip
            second_s = time.monotonic() - started_s
            after = _RunDirState.of(run_dir)

            scan = Scan("after-second-launcher", series_id=7, n=24)
            emitter.emit_messages(scan.data_messages(), scan.position_messages())
            output.wait_for(lambda line: f"scan {scan.scan_uid} complete" in line, 60)
            collected = json.loads((run_dir / f"{scan.scan_uid}.json").read_text())
        finally:
            first.send_signal(signal.SIGTERM)  # as Ctrl-C: every stage stops, then Tiled
            first_code = first.wait(60)
            emitter.close()

        # The second launcher failed before it started anything: no Tiled server, no worker.
        assert second.returncode == 2, second.stdout + second.stderr
        assert "is up" not in second.stdout
        assert str(run_dir) in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        assert "another run_dir" in second.stderr and f"kill {first.pid}" in second.stderr
        assert second_s < 30, f"the second launcher took {second_s:.1f} s to give up"
        # The first pipeline's files and sockets are as they were, and it kept working.
        assert after.files == before.files
        assert after.sockets == before.sockets and "control.sock" in after.sockets
        for name, log in before.logs.items():
            assert after.logs[name].startswith(log), f"logs/{name} was truncated"
        assert sorted(collected) == list(range(scan.n))
        assert first_code == 0
        with RunDirLock(run_dir):  # released when the first launcher exited
            pass

        # `run` says where the embedded server's key is, in a file of mode 0600, and never the key.
        key_file = run_dir / EMBEDDED_API_KEY_FILE
        assert str(key_file) in key_line
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = read_api_key_file(key_file)
        assert json.loads(before.files["pipeline.json"])["tiled"]["api_key"] == key
        assert key not in "\n".join(output.lines)
        # The embedded Tiled server's catalog, storage and logs are this user's alone.
        assert stat.S_IMODE(tiled_dir.stat().st_mode) == 0o700
        entries = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tiled_dir.iterdir()}
        assert {"catalog.db", "data", "error.log", "access.log"} <= set(entries), entries
        assert all(mode & PRIVATE_BITS == 0 for mode in entries.values()), entries
        assert entries["data"] == 0o700 and entries["catalog.db"] == entries["error.log"] == 0o600


def _one_stage_pipeline(run_dir: Path) -> PipelineConfig:
    return validate_pipeline(
        {"name": "lock", "run_dir": str(run_dir), "stages": [{"name": "ingest", "stage": "ingest"}]}
    )


def test_a_second_launcher_in_process_fails_at_once_naming_the_directory_and_the_holder() -> None:
    with _short_dir("ps-lock-") as run_dir:
        pipeline = _one_stage_pipeline(run_dir)
        with RunDirLock.for_launcher(pipeline):
            started_s = time.monotonic()
            with pytest.raises(LaunchError) as refused:
                Launcher(pipeline).start(ready_timeout_s=5)
            assert time.monotonic() - started_s < 2
        assert str(run_dir) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
        assert not (run_dir / "pipeline.json").exists() and not (run_dir / "logs").exists()


def test_the_lock_is_released_when_its_holder_is_killed() -> None:
    with _short_dir("ps-crash-") as run_dir:
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time\n"
             "from pathlib import Path\n"
             "from phasestream.apps.launch.run_dir import RunDirLock\n"
             "RunDirLock(Path(sys.argv[1])).acquire()\n"
             "print('locked', flush=True)\n"
             "time.sleep(120)\n",
             str(run_dir)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
            with pytest.raises(LaunchError, match=f"pid {holder.pid}"):
                RunDirLock(run_dir).acquire()
        finally:
            holder.kill()  # a crash: no clean-up runs
            holder.wait(30)
        with RunDirLock(run_dir):
            pass


def test_a_default_run_dir_is_per_user_and_refuses_a_root_another_user_planted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert default_run_dir("live") == tmp_path / f"phasestream-{os.getuid()}" / "live"
    assert str(os.getuid()) in str(user_run_root())
    live = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "live.yaml").read_text())
    assert "run_dir" not in live, "deploy/live.yaml must use the per-user default"
    # Someone planted the per-user root as a symlink to a folder of theirs: refused, nothing written.
    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    (tmp_path / f"phasestream-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(LaunchError, match="is a symlink"):
        RunDirLock(default_run_dir("live")).acquire()
    assert list(elsewhere.iterdir()) == []


# ---- 3. garbage on the control socket --------------------------------------------------------------------
def _hostile_messages(relay_pid: int) -> dict[ControlRejection, list[bytes]]:
    """One-part messages an attacker sends, by the rejection each must get."""
    impostor = {
        "event": "ready",
        "sender": "relay.0",
        "metrics_port": 1,
        "pid": relay_pid + 100_000,
        "restarts": 0,
    }
    stranger = {"event": "log", "sender": "intruder.0", "level": "warning", "reason": "x", "text": "y"}
    return {
        ControlRejection.NOT_JSON: [
            b"\x00\xff not json at all", b'{"event": "ready"', b"[" * 100_000,
            *(b"flood %d" % i for i in range(1000)),
        ],
        ControlRejection.WRONG_SHAPE: [
            b"[1, 2, 3]", json.dumps({"event": "scan_end", "sender": "collect.0"}).encode(),
            json.dumps({"event": "ready", "sender": "relay.0", "metrics_port": "x", "pid": 1}).encode(),
        ],
        ControlRejection.IMPOSTOR: [json.dumps(impostor).encode()],
        ControlRejection.UNKNOWN_SENDER: [json.dumps(stranger).encode()],
    }  # fmt: skip


def _wait_for_disconnect(monitor: zmq.Socket, timeout_s: float) -> bool:
    """Whether the monitored socket's peer dropped the connection within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(200) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


@pytest.mark.slow
def test_garbage_on_the_control_socket_is_counted_and_skipped_and_the_scan_completes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 40
    context = zmq.Context.instance()
    with fault_rig({}) as rig:
        started_s = time.monotonic()
        launcher = rig.launcher
        relay_port = launcher.workers["relay.0"].metrics_port
        endpoint = control_endpoint(launcher.pipeline)
        hostile = _hostile_messages(launcher.workers["relay.0"].process.pid)
        attacker = context.socket(zmq.PUSH)
        attacker.setsockopt(zmq.SNDHWM, 0)  # queue everything: the launcher reads only when asked
        attacker.setsockopt(zmq.LINGER, 0)
        attacker.connect(endpoint)
        for payloads in hostile.values():
            for payload in payloads:
                attacker.send(payload)
        attacker.send_multipart([b"{}"] * 10_000)  # one message of 10,000 parts
        giant = context.socket(zmq.PUSH)
        giant.setsockopt(zmq.LINGER, 0)
        monitor = giant.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        giant.connect(endpoint)
        giant.send(b"x" * (CONTROL_MAX_MESSAGE_BYTES + 1))

        scan = rig.new_scan("after-garbage", n)
        rig.emitter.emit_messages(scan.data_messages(), scan.position_messages())
        end = rig.scan_end(scan.scan_uid)
        expected = {str(reason): len(payloads) for reason, payloads in hostile.items()}
        expected[str(ControlRejection.MULTIPART)] = 1
        deadline = time.monotonic() + 30
        while dict(launcher.rejected_messages) != expected and time.monotonic() < deadline:
            launcher.next_event(timeout_s=0.2)
        giant_dropped = _wait_for_disconnect(monitor, timeout_s=10)
        collected = rig.collected(scan.scan_uid)
        alive = {label: worker.process.poll() is None for label, worker in launcher.workers.items()}
        restarts, port_after = launcher.restarts_total, launcher.workers["relay.0"].metrics_port
        elapsed_s = time.monotonic() - started_s
        for sock in (attacker, giant, monitor):
            sock.close(linger=0)

    # Every hostile message was counted under its reason, and nothing else was refused.
    assert dict(launcher.rejected_messages) == expected
    assert giant_dropped, "the over-size message did not cost its sender the connection"
    assert all(alive.values()) and restarts == 0, alive
    assert port_after == relay_port, "an impostor's ready event changed relay.0's metrics port"
    assert sorted(collected) == list(range(n))
    assert unaccounted_frames(end["frames_sent"], end["accounting"]) == []
    reports = [
        r
        for r in caplog.records
        if r.name == "phasestream.apps.launch.launcher" and "control socket" in r.message
    ]
    assert 1 <= len(reports) <= 1 + elapsed_s / REJECTION_LOG_INTERVAL_S, len(reports)


# The schema's events, and JSON shaped like them, for the parser's property tests. Small on purpose:
# what matters is every type in every field, and 2,000 examples must run in seconds.
_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_JSON = st.recursive(
    _SCALAR,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
_COUNTS = st.dictionaries(st.text(max_size=6), st.integers() | _SCALAR, max_size=3)
_EVENT_LIKE = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["ready", "stopped", "log", "status", "scan_end", "died", ""]),
        "sender": st.sampled_from(["relay.0", "collect.12", "Relay.0", "relay", "relay.100", ""])
        | st.text(max_size=12),
    },
    optional={
        "metrics_port": st.integers(-1, 70_000) | _SCALAR,
        "pid": st.integers(-1, 1 << 40) | _SCALAR,
        "restarts": st.integers(-1, 5) | _SCALAR,
        "level": st.sampled_from(["info", "warning", "debug"]) | _SCALAR,
        "reason": st.text(max_size=200) | _SCALAR,
        "text": st.text(max_size=40) | _SCALAR,
        "scan_uid": st.text(max_size=12) | _SCALAR,
        "frames_sent": st.integers(-1, 1 << 70) | _SCALAR,
        "accounting": st.dictionaries(st.text(max_size=6), _COUNTS, max_size=3) | _SCALAR,
        "frames_lost_indices": st.lists(st.lists(st.integers(), max_size=3), max_size=3) | _SCALAR,
        "frames_received": _JSON,
    },
)
_EVENT_TYPES = (ReadyEvent, StoppedEvent, LogEvent, StatusEvent, ScanEndEvent)


def _parse_or_rejection(payload: bytes) -> None:
    """The property: an event of the schema, or a named rejection; never another exception."""
    try:
        event = parse_control_message(payload)
    except ControlMessageError as exc:
        assert exc.reason in set(ControlRejection), exc.reason
        return
    assert isinstance(event, _EVENT_TYPES)
    # What the launcher hands on is an event again (NaN and infinities in a status become null).
    handed_on = event.model_dump_json(exclude_unset=True)
    assert parse_control_message(handed_on.encode()).model_dump_json(exclude_unset=True) == handed_on


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512))
@pytest.mark.slow
def test_the_control_parser_takes_arbitrary_bytes(payload: bytes) -> None:
    _parse_or_rejection(payload)


@settings(max_examples=2000, deadline=None)
@given(_JSON | _EVENT_LIKE)
@pytest.mark.slow
def test_the_control_parser_takes_arbitrary_json(value: object) -> None:
    _parse_or_rejection(json.dumps(value).encode())


def test_the_control_parser_takes_what_a_stage_sends_and_names_what_it_refuses() -> None:
    ready = {"event": "ready", "sender": "relay.1", "metrics_port": 9101, "pid": 42, "restarts": 0}
    assert isinstance(parse_control_message(json.dumps(ready).encode()), ReadyEvent)
    end = {"event": "scan_end", "sender": "collect.0", "scan_uid": "u", "frames_sent": 3,
           "accounting": {"ingest.0": {"frames_received": 3}}, "frames_lost_indices": [[0, 1]]}  # fmt: skip
    assert parse_control_message(json.dumps(end).encode()).frames_lost_indices == [(0, 1)]
    status = {"event": "status", "sender": "refine.0", "scan_uid": "u", "iteration": 4, "final": False}
    assert parse_control_message(json.dumps(status).encode()).model_dump()["iteration"] == 4
    with pytest.raises(ControlMessageError, match="over the") as too_large:
        parse_control_message(b" " * (CONTROL_MAX_MESSAGE_BYTES + 1))
    assert too_large.value.reason == ControlRejection.TOO_LARGE


# ---- 4. secrets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command", [["run", "live.yaml"], ["demo"], ["replay", "scan.cxi"], ["view"]], ids=str
)
def test_no_command_takes_the_tiled_api_key_on_its_command_line(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as shown, _sigterm_handler_kept():
        main([command[0], "--help"])
    assert shown.value.code == 0
    help_text = capsys.readouterr().out
    assert "--tiled-api-key-file" in help_text
    assert "--tiled-api-key " not in help_text.replace("--tiled-api-key-file", "")
    assert "--api-key-file" not in help_text.replace("--tiled-api-key-file", "")
    # Nor as an abbreviation of --tiled-api-key-file, which would take the key for a path.
    with pytest.raises(SystemExit) as refused, _sigterm_handler_kept():
        main([*command, "--tiled-api-key", "s3cret"])
    assert refused.value.code == 2
    assert "unrecognized arguments: --tiled-api-key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["run", "deploy/live.yaml"],
        ["view", "--tiled-uri", "http://127.0.0.1:1"],
        ["replay", "--pipeline", "missing.cxi"],
        ["demo", "--out", "OUT"],
    ],
    ids=lambda command: command[0],
)
def test_a_key_file_others_can_read_is_refused_naming_the_file_and_the_fix(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    key_file = tmp_path / "tiled-key"
    key_file.write_text("abc123\n")
    key_file.chmod(0o644)
    argv = [part.replace("OUT", str(tmp_path / "out")) for part in command]
    with _sigterm_handler_kept():
        assert main([*argv, "--tiled-api-key-file", str(key_file)]) == 2
    error = capsys.readouterr().err
    assert str(key_file) in error and "readable by other users" in error and f"chmod 600 {key_file}" in error
    assert "abc123" not in error
    assert not (tmp_path / "out").exists()
    key_file.chmod(0o600)
    assert read_api_key_file(key_file) == "abc123"


@pytest.mark.parametrize("key", ["abc123DEF", "abc_123", "ab-c", "a b", "abc+/="])
@pytest.mark.slow
def test_a_key_is_refused_exactly_when_tiled_refuses_it(key: str) -> None:
    from fastapi.testclient import TestClient
    from tiled.adapters.mapping import MapAdapter
    from tiled.config import Authentication
    from tiled.server.app import build_app

    app = build_app(MapAdapter({}), authentication=Authentication(single_user_api_key=key))
    try:
        with TestClient(app):  # tiled checks its single-user key as the app starts
            tiled_accepts = True
    except ValueError as exc:
        assert "alphanumeric" in str(exc)
        tiled_accepts = False
    try:
        validate_api_key(key)
        we_accept = True
    except ConfigError as exc:
        assert "only letters and digits" in str(exc) and key not in str(exc)
        we_accept = False
    assert we_accept == tiled_accepts

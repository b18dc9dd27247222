"""The launcher's run directory: created private to this user, and locked while a launcher runs.

Before a launcher writes anything in its run directory it takes an exclusive lock (``RunDirLock``:
``fcntl.flock`` on ``launcher.lock``, which the kernel releases when the process exits or crashes), so a
second launcher on the same directory fails at once, naming the directory and the holder's pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from phasestream.errors import PhasestreamError
from phasestream.runtime.config import PipelineConfig, user_run_root
from phasestream.runtime.topology import stages_on

_PRIVATE_BITS = stat.S_IRWXG | stat.S_IRWXO


class LaunchError(PhasestreamError):
    """The launcher cannot run the pipeline: its run directory is not this user's or is taken by another
    launcher, or a worker exited or was not ready in time."""

    reason = "launch"


def _lock_name(host: str | None) -> str:
    # One lock per control socket: launchers of several hosts may share run_dir, each with its own socket.
    return "launcher.lock" if host is None else f"launcher-{host}.lock"


def _check_owned_directory(path: Path, info: os.stat_result, what: str) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise LaunchError(f"{what} {path} is not a directory: remove it, or set another run_dir")
    if info.st_uid != os.getuid():
        raise LaunchError(
            f"{what} {path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}): another user "
            "could read and replace its sockets and logs; remove it, or set another run_dir "
            "(run_dir: in the YAML, or PHASESTREAM_RUN_DIR)"
        )


def prepare_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` (mode 0700) and refuse one, or a default one's parent, that is not this user's."""
    root = user_run_root()
    if run_dir.absolute().is_relative_to(root):
        # The per-user root may sit in a shared /tmp: refuse a symlink or a folder that someone else made.
        with contextlib.suppress(FileExistsError):  # also a symlink there, dangling or not: checked below
            root.mkdir(mode=0o700, parents=True)
        info = root.lstat()
        if stat.S_ISLNK(info.st_mode):
            raise LaunchError(
                f"the run directory root {root} is a symlink: remove it, or set another run_dir"
            )
        _check_owned_directory(root, info, "the run directory root")
        if info.st_mode & _PRIVATE_BITS:
            root.chmod(0o700)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_owned_directory(run_dir, run_dir.stat(), "run directory")


@dataclass
class RunDirLock:
    """Exclusive locks on ``run_dir`` for the control sockets of ``hosts`` (None: a pipeline without hosts).

    ``fcntl.flock`` on ``<run_dir>/launcher.lock`` (``launcher-<host>.lock`` per host), holding the holder's
    pid. The kernel releases it when the holder exits or crashes, so a stale lock file is harmless.
    """

    run_dir: Path
    hosts: Sequence[str | None] = (None,)
    _descriptors: list[int] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def for_launcher(cls, pipeline: PipelineConfig, host: str | None = None) -> RunDirLock:
        """The locks a ``Launcher(pipeline, host)`` takes: one per control socket it binds."""
        hosts = list(dict.fromkeys(spec.host for spec in stages_on(pipeline, host)))
        return cls(pipeline.run_dir, hosts)

    @property
    def held(self) -> bool:
        return bool(self._descriptors)

    def acquire(self) -> None:
        """Take every lock, or none: ``LaunchError`` naming the directory, the holder and the fix."""
        if self.held:
            return
        prepare_run_dir(self.run_dir)
        try:
            for host in self.hosts:
                self._descriptors.append(self._lock(self.run_dir / _lock_name(host)))
        except BaseException:
            self.release()
            raise
        for descriptor in self._descriptors:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)

    def _lock(self, path: Path) -> int:
        # O_NOFOLLOW: a symlink planted at the lock's path is refused rather than followed.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            descriptor = os.open(path, flags, 0o600)
        except OSError as exc:
            raise LaunchError(
                f"cannot open the lock file {path} ({exc.strerror}): remove it, or set another run_dir"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_pid(descriptor)
            os.close(descriptor)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise LaunchError(f"cannot lock {path} ({exc.strerror})") from None
            who = f"pid {holder}" if holder else "pid unknown"
            stop = f"`kill {holder}` (or Ctrl-C where it runs)" if holder else "stop it"
            raise LaunchError(
                f"run directory {self.run_dir} is in use by another launcher ({who}, lock {path}): {stop} "
                "before starting this one, or give this pipeline another run_dir (run_dir: in the YAML, "
                "or PHASESTREAM_RUN_DIR)"
            ) from None
        return descriptor

    def release(self) -> None:
        while self._descriptors:
            os.close(self._descriptors.pop())  # closing the last descriptor drops the flock

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_pid(descriptor: int) -> int | None:
    try:
        text = os.pread(descriptor, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None

"""The Tiled server that reconstructions go to: an embedded one, or a check that an external one works.

``phasestream demo`` and ``phasestream run`` start ``EmbeddedTiledServer`` unless ``--tiled-uri`` names
an existing server; then ``check_tiled`` proves at start-up that the server answers and accepts the key,
so a typo fails in the first second with the fix instead of as a stream of failed writes.

The embedded server is tiled's ``SimpleTiledServer`` (uvicorn in a thread, bound to 127.0.0.1) given a
directory: SQLite catalog ``catalog.db``, arrays as zarr under ``data/``, logs in ``access.log`` and
``error.log``, all kept after exit, so a later run with the same directory serves the earlier results.
It turns on tiled's in-memory streaming cache, which websocket ``subscribe()`` needs (a server without it
answers the websocket with HTTP 500 and ``start_in_thread()`` never returns).

The catalog and the data are this user's alone: the directory is made mode 0700 (so nothing under it is
reachable by other users), and the files the server creates as it starts (catalog, storage, logs) get
mode 0600.

``readable_storage`` lists folders of files that the server may serve as external data, such as the
detector files that Bluesky's TiledWriter registers for a raw run; tiled refuses (HTTP 500) to read an
external asset outside them. None (the default) serves only the server's own data.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from phasestream.errors import ConfigError, PublishError
from phasestream.runtime.tiled.access import LOOPBACK_HOST, check_tiled, validate_api_key

if TYPE_CHECKING:
    from tiled.server import SimpleTiledServer

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def generate_api_key() -> str:
    """A fresh 256-bit key for the embedded server (tiled's own default is only 64 bits)."""
    return secrets.token_hex(32)


def write_api_key_file(path: Path, api_key: str) -> Path:
    """Write ``api_key`` to ``path`` with mode 0600 (also when the file existed with another mode)."""
    # O_NOFOLLOW: a symlink planted at ``path`` cannot redirect the key elsewhere.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "w") as key_file:
        os.fchmod(key_file.fileno(), PRIVATE_FILE_MODE)
        key_file.write(f"{api_key}\n")
    return path


def _ensure_port_free(port: int) -> None:
    # uvicorn exits its thread on a taken port and SimpleTiledServer then waits 20 s for it to start;
    # trying the bind first turns that into an immediate, clear error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK_HOST, port))
        except OSError as exc:
            raise ConfigError(
                f"port {port} on {LOOPBACK_HOST} is taken ({exc}): "
                "choose another Tiled port, or 0 for any free one"
            ) from exc


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    """Files and folders created meanwhile are the user's alone (0600, 0700).

    The umask is per process: for the second or so that tiled takes to create its catalog and logs,
    other threads of this process create private files too, which errs on the safe side.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _make_private(directory: Path) -> None:
    """Mode 0700 on ``directory`` and the folders directly in it; no group or other bits on its files.

    The directory's own mode is what protects everything below it: the data files that the server
    writes later get the process umask, and other users cannot reach them all the same.
    """
    try:
        directory.chmod(PRIVATE_DIR_MODE)
    except PermissionError:
        raise ConfigError(
            f"the Tiled data directory {directory} belongs to another user (uid {directory.stat().st_uid}): "
            "give a directory of your own (tiled.data_dir, or --out for demo and replay)"
        ) from None
    for entry in directory.iterdir():
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue  # chmod would follow it to whatever it points at
        if stat.S_ISDIR(info.st_mode):
            entry.chmod(PRIVATE_DIR_MODE)
        elif info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            entry.chmod(stat.S_IMODE(info.st_mode) & ~(stat.S_IRWXG | stat.S_IRWXO))


class EmbeddedTiledServer:
    """A writable Tiled server in this process, for as long as the ``with`` block lasts.

    ``directory`` holds the catalog and the data and is kept afterwards; ``port=0`` takes any free port.
    Entering returns only once the server has answered an authenticated request. Note that starting it
    points the ``tiled``, ``uvicorn.access`` and ``uvicorn.error`` loggers of this process at the log
    files in ``directory`` (tiled's logging config, applied by uvicorn).
    """

    def __init__(
        self,
        directory: Path,
        api_key: str,
        port: int = 0,
        readable_storage: list[Path] | None = None,
    ) -> None:
        if not api_key:
            # SimpleTiledServer would quietly invent a key that nobody else knows.
            raise ConfigError("the embedded Tiled server needs an API key: use generate_api_key()")
        validate_api_key(api_key)
        self.directory = Path(directory).resolve()
        self.api_key = api_key
        self._port = port
        self.readable_storage = [Path(folder).resolve() for folder in readable_storage or []]
        self._server: SimpleTiledServer | None = None
        self._uri: str | None = None

    @property
    def uri(self) -> str:
        """``http://127.0.0.1:<port>``, without the key (pass that separately)."""
        if self._uri is None:
            raise PublishError("the embedded Tiled server is not running: use it inside `with`")
        return self._uri

    def __enter__(self) -> EmbeddedTiledServer:
        # Deferred: the server stack (FastAPI, SQLAlchemy, uvicorn) costs about a second to import,
        # and processes that only publish or check a server never need it.
        from tiled.server import SimpleTiledServer

        if self._port:
            _ensure_port_free(self._port)
        self.directory.mkdir(parents=True, exist_ok=True)
        _make_private(self.directory)
        try:
            with _private_umask():
                server = SimpleTiledServer(
                    directory=self.directory,
                    api_key=self.api_key,
                    port=self._port,
                    readable_storage=list(self.readable_storage) or None,
                )
        except (TimeoutError, RuntimeError) as exc:
            raise PublishError(
                f"the embedded Tiled server in {self.directory} did not start ({exc}): "
                f"see {self.directory / 'error.log'}"
            ) from exc
        self._server = server
        _make_private(self.directory)  # what an earlier run, before these modes, left readable
        # SimpleTiledServer.uri embeds the key as a query parameter; keep host and port only.
        self._uri = f"http://{LOOPBACK_HOST}:{server.port}"
        try:
            check_tiled(self._uri, self.api_key)
        except PublishError:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._server = None
        self._uri = None

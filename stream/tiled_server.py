"""The Tiled server that reconstructions go to: an embedded one, or a check that an external one works.

``phasestream demo`` and ``phasestream run`` start ``EmbeddedTiledServer`` unless ``--tiled-uri`` names
an existing server; then ``check_tiled`` proves at start-up that the server answers and accepts the key,
so a typo fails in the first second with the fix instead of as a stream of failed writes.

The embedded server is tiled's ``SimpleTiledServer`` (uvicorn in a thread, bound to 127.0.0.1) given a
directory: SQLite catalog ``catalog.db``, arrays as zarr under ``data/``, logs in ``access.log`` and
``error.log``, all kept after exit, so a later run with the same directory serves the earlier results.
It turns on tiled's in-memory streaming cache, which websocket ``subscribe()`` needs (a server without it
answers the websocket with HTTP 500 and ``start_in_thread()`` never returns).

``readable_storage`` lists folders of files that the server may serve as external data, such as the
detector files that Bluesky's TiledWriter registers for a raw run; tiled refuses (HTTP 500) to read an
external asset outside them. None (the default) serves only the server's own data.
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import httpx

from phasestream.errors import ConfigError, PublishError

if TYPE_CHECKING:
    from tiled.server import SimpleTiledServer

LOOPBACK_HOST = "127.0.0.1"
API_KEY_FIX = "pass --tiled-api-key or set PHASESTREAM_TILED__API_KEY"
URI_FIX = "start one or drop --tiled-uri to use the embedded server"
# tiled's client reads the key back from its header with this pattern and treats any other key as no
# key at all, which then fails as "This server requires API key authentication".
TILED_API_KEY_PATTERN = re.compile(r"\w+")


def generate_api_key() -> str:
    """A fresh 256-bit key for the embedded server (tiled's own default is only 64 bits)."""
    return secrets.token_hex(32)


def validate_api_key(api_key: str | None) -> None:
    """Raise ``ConfigError`` for a key that the tiled client would silently drop."""
    if api_key is not None and not TILED_API_KEY_PATTERN.fullmatch(api_key):
        raise ConfigError(
            "the Tiled API key may hold only letters, digits and underscores (the tiled client "
            f"ignores any other key): {API_KEY_FIX}"
        )


def public_uri(uri: str) -> str:
    """``uri`` without query or fragment, so an ``?api_key=`` in it never reaches a log or an error."""
    return str(httpx.URL(uri).copy_with(query=None, fragment=None))


def api_root(uri: str) -> str:
    """The ``/api/v1`` root for a server given as ``http://host:port`` or any URI below ``/api``."""
    url = httpx.URL(uri)
    site_path = url.path.split("/api", 1)[0].rstrip("/")
    return str(url.copy_with(path=f"{site_path}/api/v1", query=None, fragment=None))


def check_tiled(uri: str, api_key: str | None, *, timeout_s: float = 5.0) -> None:
    """Raise ``PublishError`` unless a Tiled server answers at ``uri`` and accepts ``api_key``.

    Plain httpx with one request and no retries: tiled's own client retries a refused connection for
    about 25 s before it raises, far too long for a start-up check.
    """
    try:
        api_key = api_key or httpx.URL(uri).params.get("api_key")
        metadata_url = f"{api_root(uri)}/metadata/"
    except httpx.InvalidURL as exc:
        raise ConfigError(
            f"--tiled-uri {uri!r} is not a valid URI ({exc}): use e.g. http://host:8000"
        ) from exc
    validate_api_key(api_key)
    shown = public_uri(uri)
    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    try:
        response = httpx.get(metadata_url, headers=headers, timeout=timeout_s, follow_redirects=True)
    except httpx.TransportError as exc:
        raise PublishError(
            f"no Tiled server answers at {shown} ({type(exc).__name__}: {exc}): {URI_FIX}",
            reason="tiled_unreachable",
        ) from exc
    status = response.status_code
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        raise PublishError(
            f"Tiled at {shown} refused the API key ({status}): {API_KEY_FIX}", reason="tiled_rejected"
        )
    if status != httpx.codes.OK:
        raise PublishError(
            f"{shown} answered {status} {response.reason_phrase} to GET {metadata_url}: "
            "is it a Tiled server? Give its base URI, e.g. http://host:8000",
            reason="tiled_rejected",
        )


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
        try:
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

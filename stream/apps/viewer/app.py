"""``phasestream view``: a live web page of the latest reconstruction, served on 127.0.0.1.

The page shows the object's amplitude and phase with the scan positions over them, the probe, the neural
mosaic when the inversion stage publishes one, the iteration, the R-factor and the frames/s of every
stage. It needs no build step and loads nothing from elsewhere: ``static/`` holds one HTML file,
one script and one stylesheet.

Data path: Tiled ─websocket─► ``TiledFollower`` (server side) ─► ``LiveView`` ─Server-Sent Events─► page.
The follower subscribes with tiled's client, renders arrays to PNG and bumps the view's version; each open
page holds one event stream (``/events``) that sends the view's summary as JSON whenever it changes and
fetches an image (``/image/<name>.png``) or the positions (``/positions.json``) only when their version
changed. Frames/s come from the stages' ``/metrics`` endpoints, scraped on the server side.

The Tiled API key stays in this process: the page talks only to this server, which answers only
read-only routes, and nothing here logs the key or a URI that holds it. The server answers only requests
addressed to a loopback name, so that a web page elsewhere cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import httpx

from phasestream.apps.viewer.follow import RESYNC_S, TiledFollower
from phasestream.apps.viewer.metrics import MetricsScraper
from phasestream.apps.viewer.state import ImageName, LiveView
from phasestream.errors import ConfigError
from phasestream.runtime.tiled.access import LOOPBACK_HOST, public_uri, read_api_key

logger = logging.getLogger(__name__)

URI_ENV = "PHASESTREAM_TILED__URI"
STATIC_PACKAGE_DIR = "static"
# Route -> (file in static/, content type).
STATIC_ROUTES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}
IMAGE_ROUTES = {f"/image/{name.value}.png": name for name in ImageName}
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
# The page may load only what this server serves; no inline script, no other origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
HEARTBEAT_S = 15.0  # an idle event stream sends a comment this often, so a closed page is noticed
SHUTDOWN_POLL_S = 0.1  # how often the serving loop looks for a shutdown request
RECONNECT_MS = 1000  # how soon the browser reconnects its event stream after this server restarts


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = importlib.resources.files("phasestream.apps.viewer") / STATIC_PACKAGE_DIR
    return {route: ((folder / name).read_bytes(), kind) for route, (name, kind) in STATIC_ROUTES.items()}


class ViewerHTTPServer(ThreadingHTTPServer):
    """Serves the page, its event stream, images and positions from ``view``; one thread per request."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, view: LiveView, port: int = 0) -> None:
        self.view = view
        self.static = _load_static()
        try:
            super().__init__((LOOPBACK_HOST, port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve the viewer on {LOOPBACK_HOST}:{port} ({exc.strerror}): "
                "choose another --port, or 0 for any free one"
            ) from exc

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: ViewerHTTPServer
    server_version = "phasestream-viewer"

    def do_GET(self) -> None:
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname
        if host not in LOOPBACK_NAMES:
            self._send(HTTPStatus.FORBIDDEN, b"open the viewer at http://127.0.0.1:<port>/\n", "text/plain")
            return
        path = urlsplit(self.path).path
        view = self.server.view
        if path in self.server.static:
            body, kind = self.server.static[path]
            self._send(HTTPStatus.OK, body, kind)
        elif path == "/events":
            self._stream_events(view)
        elif path == "/state":
            self._send(HTTPStatus.OK, view.snapshot()[1], "application/json")
        elif path == "/positions.json":
            self._send_optional(view.positions_json(), "application/json")
        elif path in IMAGE_ROUTES:
            self._send_optional(view.image_png(IMAGE_ROUTES[path]), "image/png")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _send_optional(self, body: bytes | None, kind: str) -> None:
        if body is None:
            self._send(HTTPStatus.NOT_FOUND, b"not published yet\n", "text/plain")
        else:
            self._send(HTTPStatus.OK, body, kind)

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream_events(self, view: LiveView) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        version, summary = view.snapshot()
        try:
            self.wfile.write(f"retry: {RECONNECT_MS}\n".encode())
            self._write_event(summary)
            while not view.closed:
                newer = view.wait_newer(version, HEARTBEAT_S)
                if newer is None:
                    self.wfile.write(b": idle\n\n")
                    self.wfile.flush()
                else:
                    version, summary = newer
                    self._write_event(summary)
        except (BrokenPipeError, ConnectionResetError):
            return  # the page was closed or reloaded

    def _write_event(self, summary: bytes) -> None:
        self.wfile.write(b"data: " + summary + b"\n\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class Viewer:
    """The page server, the Tiled follower and the metrics scraper, for as long as the ``with`` lasts."""

    def __init__(
        self,
        tiled_uri: str,
        api_key: str | None,
        *,
        metrics_urls: Sequence[str] = (),
        port: int = 0,
        scan_uid: str | None = None,
        metrics_period_s: float = 1.0,
        resync_s: float = RESYNC_S,
    ) -> None:
        try:
            shown_uri = public_uri(tiled_uri)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"--tiled-uri is not a valid URI ({exc}): use e.g. http://host:8000") from exc
        self.view = LiveView(shown_uri)
        self._follower = TiledFollower(tiled_uri, api_key, self.view, scan_uid=scan_uid, resync_s=resync_s)
        self._scraper = MetricsScraper(metrics_urls, self.view.set_stages, period_s=metrics_period_s)
        self._port = port
        self._server: ViewerHTTPServer | None = None
        self._serving: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise ConfigError("the viewer is not running: use it inside `with`")
        return self._server.url

    def __enter__(self) -> Viewer:
        self._follower.start()
        try:
            self._server = ViewerHTTPServer(self.view, self._port)
        except ConfigError:
            self._follower.close()
            raise
        self._serving = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_S},
            name="viewer-http",
            daemon=True,
        )
        self._serving.start()
        self._scraper.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.view.close()  # ends every event stream
        self._scraper.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._follower.close()


def run_viewer(
    *,
    tiled_uri: str | None = None,
    tiled_api_key_file: Path | None = None,
    metrics_urls: Sequence[str] = (),
    port: int = 0,
    scan_uid: str | None = None,
) -> int:
    """``phasestream view``: serve the page until Ctrl-C.

    ``tiled_uri`` None takes ``$PHASESTREAM_TILED__URI``; the key comes from ``tiled_api_key_file`` (private)
    or the environment. ``scan_uid`` pins one scan instead of following the newest.
    """
    tiled_uri = tiled_uri or os.environ.get(URI_ENV)
    if not tiled_uri:
        raise ConfigError(f"phasestream view needs --tiled-uri (or {URI_ENV}): e.g. http://127.0.0.1:8000")
    api_key = read_api_key(tiled_api_key_file)  # a private file, or the environment
    with Viewer(tiled_uri, api_key, metrics_urls=metrics_urls, port=port, scan_uid=scan_uid) as viewer:
        print(f"phasestream: viewer on {viewer.url} following Tiled at {public_uri(tiled_uri)}")
        if metrics_urls:
            print(f"  frames/s from {len(metrics_urls)} /metrics endpoint(s)")
        print("Ctrl-C stops it.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0

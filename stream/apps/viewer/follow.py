"""Follow the latest scan in Tiled through its websocket subscriptions and keep the viewer's state current.

What is followed: the ``/reconstructions`` container (a new scan appears; a scan's metadata changes:
iteration, quality, status), the shown scan's container (an array node is created or replaced) and its
array nodes ``object``, ``probe``, ``mosaic`` and ``positions`` (each write). The tiled client's
``subscribe()`` does the websocket work; everything it reports goes through one queue to one thread,
which owns the subscriptions, reads and renders, so a callback never blocks the subscription that called
it. Arrays are latest-wins: a write that arrives while an older one waits replaces it. A patch or an
array reference is not applied piecewise: the whole array is read again.

Pitfalls of tiled 0.2.20 handled here (see ``notes/ecosystem.md`` §1.3): callbacks are held by weak
reference (they are bound methods of the follower, which lives as long as the viewer); messages above
``max_size`` disconnect a subscription for good (``MAX_MESSAGE_BYTES`` is far above any object); a server
without a streaming cache answers the websocket with HTTP 500 and ``start_in_thread()`` then never returns
(``check_streaming`` finds that at start-up, and every start is bounded by ``CONNECT_TIMEOUT_S``).

The link is checked every ``resync_s``: the shown scan's metadata is read over HTTP. When Tiled cannot be
reached the page says so, and once it answers again everything is subscribed afresh: a restarted server
starts an empty cache numbering updates from 1, while the client's own reconnection asks to resume after
the last number it saw. Metadata that
differs from the latest update twice in a row means a subscription stopped delivering: again, everything
is subscribed afresh.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from enum import StrEnum
from typing import Any

import httpx
import numpy as np
import tiled.client.utils
import websockets.exceptions
from tiled.client import from_uri
from tiled.client.container import Container
from tiled.client.stream import LiveArrayData, Subscription
from websockets.sync.client import connect

from phasestream.apps.viewer.images import (
    amplitude_image,
    central_plane,
    phase_image,
    positions_px,
    probe_amplitude,
    real_image,
)
from phasestream.apps.viewer.state import ImageName, LinkState, LiveView
from phasestream.errors import ConfigError, PublishError
from phasestream.runtime.tiled.access import API_KEY_FIX, api_root, check_tiled, public_uri
from phasestream.runtime.tiled.updates import RECONSTRUCTIONS_KEY

logger = logging.getLogger(__name__)

# A 4096 × 4096 complex64 object is 128 MiB; a larger message would end its subscription for good.
MAX_MESSAGE_BYTES = 256 * 2**20
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
RESYNC_S = 5.0
STALE_CHECKS = 2  # consecutive link checks whose metadata differs before subscribing again
STREAMING_CACHE_FIX = (
    "the server needs a streaming cache for live updates: give its config file "
    "`streaming_cache: {uri: memory}` (see notes/ecosystem.md §1.1), start it with "
    "`tiled serve catalog --temp`, or let phasestream start its embedded server"
)
# What a broken or stopped server raises while the follower reads or subscribes.
LINK_ERRORS = (httpx.HTTPError, OSError, websockets.exceptions.WebSocketException, PublishError, KeyError)


class ArrayName(StrEnum):
    """The array nodes of a scan that the page shows."""

    OBJECT = "object"
    PROBE = "probe"
    MOSAIC = "mosaic"
    POSITIONS = "positions"  # (n, 2) probe centres (y, x) in metres


ARRAY_NAMES = frozenset(name.value for name in ArrayName)  # `str in StrEnum` raises before Python 3.12


class _Event(StrEnum):
    REATTACH = "reattach"
    SCAN_CREATED = "scan_created"
    SCAN_METADATA = "scan_metadata"
    ARRAY_CREATED = "array_created"
    ARRAY_DATA = "array_data"
    WAKE = "wake"


def stream_url(uri: str, path: str = "") -> str:
    """The websocket URL of Tiled's stream for the node at ``path`` (``""``: the root)."""
    root = httpx.URL(api_root(uri))
    scheme = "wss" if root.scheme == "https" else "ws"
    return str(root.copy_with(scheme=scheme, path=f"{root.path}/stream/single/{path}"))


def check_streaming(uri: str, api_key: str | None, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``ConfigError`` unless Tiled at ``uri`` accepts a websocket subscription with ``api_key``."""
    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    shown = public_uri(uri)
    try:
        with connect(
            f"{stream_url(uri)}?envelope_format=msgpack", additional_headers=headers, open_timeout=timeout_s
        ):
            pass
    except websockets.exceptions.InvalidStatus as exc:
        status = exc.response.status_code
        if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
            raise ConfigError(f"Tiled at {shown} refused the websocket ({status}): {API_KEY_FIX}") from exc
        raise ConfigError(
            f"Tiled at {shown} answered the websocket with {status}: {STREAMING_CACHE_FIX}"
        ) from exc
    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
        raise PublishError(
            f"no websocket to Tiled at {shown} ({type(exc).__name__}: {exc}): is it a Tiled server?",
            reason="tiled_unreachable",
        ) from exc


STOPPED_WHILE_RECONNECTING = "Cannot be restarted once stopped."


def _end(subscription: Subscription) -> None:
    """Stop a subscription without waiting for its thread.

    Its thread ends by itself within 0.1 s, or, while Tiled is down, after the backoff sleep of its
    reconnection, which can last many seconds; tiled then raises "Cannot be restarted once stopped" in
    that thread, which is harmless and which :func:`quiet_stopped_subscriptions` keeps off the console.
    """
    subscription.disconnect(wait=False)


def quiet_stopped_subscriptions(previous: Any) -> Any:
    """A ``threading.excepthook`` that drops only tiled's error from a subscription stopped mid-retry."""

    def hook(args: threading.ExceptHookArgs) -> None:
        thread_name = args.thread.name if args.thread is not None else ""
        stopped = (
            isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == STOPPED_WHILE_RECONNECTING
        )
        if stopped and thread_name.startswith("tiled-subscription"):
            return
        previous(args)

    hook.quiets_tiled_subscriptions = True
    return hook


class TiledFollower:
    """Keeps ``view`` showing the newest scan under ``/reconstructions`` (or ``scan_uid`` when given)."""

    def __init__(
        self,
        uri: str,
        api_key: str | None,
        view: LiveView,
        *,
        scan_uid: str | None = None,
        resync_s: float = RESYNC_S,
    ) -> None:
        if resync_s <= 0:
            raise ConfigError(f"resync period {resync_s!r} s must be positive")
        self._uri = public_uri(uri)
        self._api_key = api_key or httpx.URL(uri).params.get("api_key")
        self._view = view
        self._pinned_uid = scan_uid
        self._resync_s = resync_s
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], np.ndarray | None] = {}  # (scan, array) -> latest; None: read
        self._thread = threading.Thread(target=self._run, name="viewer-tiled", daemon=True)

        # Confined to the follower thread.
        self._client: Container | None = None
        self._needs_attach = True
        self._root_subscription: Subscription | None = None
        self._reconstructions: Container | None = None
        self._reconstructions_subscription: Subscription | None = None
        self._scan_uid: str | None = None
        self._scan: Container | None = None
        self._scan_subscription: Subscription | None = None
        self._scan_metadata: dict[str, Any] = {}
        self._array_subscriptions: dict[ArrayName, Subscription] = {}
        self._array_nodes: dict[ArrayName, Any] = {}
        self._object_shape_px: tuple[int, int] | None = None
        self._positions_m: np.ndarray | None = None
        self._positions_received = 0  # counts position arrays, to tell a new one from the shown one
        self._shown_positions: tuple[Any, ...] | None = None
        self._stale_checks = 0
        self._unshowable: set[str] = set()  # arrays of the shown scan already reported as unshowable

    def start(self) -> None:
        """Check the server, the key and the streaming cache (raising with the fix), then follow."""
        # websockets logs every request header at DEBUG, the API key among them.
        logging.getLogger("websockets.client").setLevel(logging.INFO)
        check_tiled(self._uri, self._api_key)
        check_streaming(self._uri, self._api_key)
        # tiled's client retries a failed request for up to 45 s; the follower's link check retries instead.
        tiled.client.utils.TILED_RETRY_ATTEMPTS = 1
        if not getattr(threading.excepthook, "quiets_tiled_subscriptions", False):
            threading.excepthook = quiet_stopped_subscriptions(threading.excepthook)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._events.put((_Event.WAKE,))
        if self._thread.is_alive():
            self._thread.join(timeout=CONNECT_TIMEOUT_S + REQUEST_TIMEOUT_S)

    # -- subscription callbacks (tiled's threads): only queue what happened --------------------------

    def _on_root_child(self, event: Any) -> None:
        if event.key == RECONSTRUCTIONS_KEY:
            self._events.put((_Event.REATTACH,))

    def _on_scan_created(self, event: Any) -> None:
        self._events.put((_Event.SCAN_CREATED, event.key))

    def _on_scan_metadata(self, event: Any) -> None:
        self._events.put((_Event.SCAN_METADATA, event.key, dict(event.metadata)))

    def _on_array_created(self, event: Any) -> None:
        self._events.put((_Event.ARRAY_CREATED, event.subscription.segments[-1], event.key))

    def _on_array_data(self, update: Any) -> None:
        scan_uid, name = update.subscription.segments[-2:]
        array = None  # None: read the whole array again
        if isinstance(update, LiveArrayData) and update.offset is None:
            try:
                array = update.data()
            except ValueError as exc:  # a payload that does not decode to its announced shape and dtype
                logger.warning("cannot decode an update of %s (%s): reading it instead", name, exc)
        with self._lock:
            self._pending[(scan_uid, name)] = array
        self._events.put((_Event.ARRAY_DATA,))

    # -- the follower thread ------------------------------------------------------------------------

    def _run(self) -> None:
        next_check_s = time.monotonic() + self._resync_s
        try:
            while not self._closing.is_set():
                if self._needs_attach:
                    self._guarded(self._attach)
                try:
                    events = [self._events.get(timeout=max(0.0, next_check_s - time.monotonic()))]
                except queue.Empty:
                    events = []
                while not self._events.empty():
                    events.append(self._events.get())
                for event in events:
                    self._guarded(self._handle, event)
                self._guarded(self._show_pending_arrays)
                if time.monotonic() >= next_check_s:
                    self._guarded(self._check_link)
                    next_check_s = time.monotonic() + self._resync_s
        finally:
            self._detach()
            if self._client is not None:
                self._client.context.close()

    def _guarded(self, step: Any, *args: Any) -> None:
        if self._closing.is_set():
            return
        try:
            step(*args)
        except LINK_ERRORS as exc:
            if not self._needs_attach:
                logger.warning("lost Tiled at %s (%s: %s); retrying", self._uri, type(exc).__name__, exc)
            self._view.set_link(LinkState.UNREACHABLE, f"{type(exc).__name__}: {exc}")
            self._needs_attach = True

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind is _Event.REATTACH:
            self._needs_attach = True
        elif kind is _Event.SCAN_CREATED and self._reconstructions is not None:
            scan_uid = event[1]
            if self._pinned_uid in (None, scan_uid):
                self._follow_scan(scan_uid)
        elif kind is _Event.SCAN_METADATA and event[1] == self._scan_uid:
            self._show_scan_metadata(event[2])
        elif kind is _Event.ARRAY_CREATED and event[1] == self._scan_uid and event[2] in ARRAY_NAMES:
            self._follow_array(ArrayName(event[2]))

    def _attach(self) -> None:
        self._detach()
        self._view.set_link(LinkState.CONNECTING)
        check_tiled(self._uri, self._api_key)
        if self._client is None:
            timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
            self._client = from_uri(self._uri, api_key=self._api_key, timeout=timeout)
        if RECONSTRUCTIONS_KEY not in self._client:
            self._root_subscription = self._subscribe(self._client, child_created=self._on_root_child)
            # It may have been created before the subscription started.
            if RECONSTRUCTIONS_KEY not in self._client:
                self._view.start_scan(None)
                self._view.set_link(LinkState.WAITING, f"no /{RECONSTRUCTIONS_KEY} in Tiled yet")
                self._needs_attach = False
                return
        self._reconstructions = self._client[RECONSTRUCTIONS_KEY]
        self._reconstructions_subscription = self._subscribe(
            self._reconstructions,
            child_created=self._on_scan_created,
            child_metadata_updated=self._on_scan_metadata,
        )
        scan_uid = self._pinned_uid
        if scan_uid is None:
            # tiled lists a container's children in the order they were created.
            keys = self._reconstructions.keys()
            scan_uid = keys[-1] if len(keys) else None
        if scan_uid is None or scan_uid not in self._reconstructions:
            self._view.start_scan(None)
            self._view.set_link(LinkState.WAITING, f"waiting for scan {scan_uid or 'to start'}")
        else:
            self._follow_scan(scan_uid)
        self._needs_attach = False

    def _detach(self) -> None:
        self._drop_scan()
        for subscription in (self._root_subscription, self._reconstructions_subscription):
            if subscription is not None:
                _end(subscription)
        self._root_subscription = self._reconstructions_subscription = None
        self._reconstructions = None

    def _drop_scan(self) -> None:
        subscriptions = [self._scan_subscription, *self._array_subscriptions.values()]
        for subscription in subscriptions:
            if subscription is not None:
                _end(subscription)
        self._scan_subscription = None
        self._array_subscriptions.clear()
        self._array_nodes.clear()
        with self._lock:
            self._pending.clear()
        self._scan_uid = self._scan = None
        self._scan_metadata = {}
        self._object_shape_px = self._positions_m = self._shown_positions = None
        self._stale_checks = 0
        self._unshowable.clear()

    def _follow_scan(self, scan_uid: str) -> None:
        assert self._reconstructions is not None
        self._drop_scan()
        scan = self._reconstructions[scan_uid]
        self._scan_uid, self._scan = scan_uid, scan
        self._scan_subscription = self._subscribe(scan, child_created=self._on_array_created)
        self._scan_metadata = dict(scan.metadata)
        self._view.start_scan(scan_uid, self._scan_metadata)
        for key in list(scan):
            if key in ARRAY_NAMES:
                self._follow_array(ArrayName(key))
        self._view.set_link(LinkState.LIVE)

    def _follow_array(self, name: ArrayName) -> None:
        """Subscribe to the node (again, when it was replaced), then read it whole once."""
        assert self._scan is not None and self._scan_uid is not None
        previous = self._array_subscriptions.pop(name, None)
        if previous is not None:
            _end(previous)
        node = self._scan[name]
        self._array_subscriptions[name] = self._subscribe(node, new_data=self._on_array_data)
        self._array_nodes[name] = node
        with self._lock:
            # Read after subscribing, so no write falls between; a newer write replaces the read.
            self._pending[(self._scan_uid, name)] = None

    def _subscribe(self, node: Any, **callbacks: Any) -> Subscription:
        subscription = node.subscribe()
        for registry, callback in callbacks.items():
            getattr(subscription, registry).add_callback(callback)
        starter = threading.Thread(
            target=subscription.start_in_thread,
            kwargs={"max_size": MAX_MESSAGE_BYTES},
            name="viewer-subscribe",
            daemon=True,
        )
        starter.start()
        deadline_s = time.monotonic() + CONNECT_TIMEOUT_S
        while starter.is_alive() and time.monotonic() < deadline_s and not self._closing.is_set():
            starter.join(0.05)
        if starter.is_alive():
            # start_in_thread() waits for ever when the connection fails other than by a network error;
            # the starter thread is left waiting, idle, and the follower goes on.
            _end(subscription)
            raise PublishError(f"no websocket to {subscription!r} within {CONNECT_TIMEOUT_S:.0f} s")
        return subscription

    def _show_scan_metadata(self, metadata: dict[str, Any]) -> None:
        assert self._scan_uid is not None
        self._scan_metadata = metadata
        self._view.set_scan_metadata(self._scan_uid, metadata)
        self._show_positions()

    def _show_pending_arrays(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for (scan_uid, name), array in pending.items():
            node = self._array_nodes.get(ArrayName(name)) if name in ARRAY_NAMES else None
            if scan_uid != self._scan_uid or node is None:
                continue  # a late update for a scan or node no longer shown
            try:
                self._show_array(ArrayName(name), node.read() if array is None else array)
            except ConfigError as exc:
                # An array the page cannot show (e.g. with one axis): say so once and show the others.
                if name not in self._unshowable:
                    logger.warning("%s", exc)
                self._unshowable.add(name)

    def _show_array(self, name: ArrayName, array: np.ndarray) -> None:
        if name is ArrayName.OBJECT:
            self._view.set_image(ImageName.AMPLITUDE, amplitude_image(array))
            self._view.set_image(ImageName.PHASE, phase_image(array))
            plane_shape = central_plane(array).shape
            self._object_shape_px = (int(plane_shape[0]), int(plane_shape[1]))
        elif name is ArrayName.PROBE:
            self._view.set_image(ImageName.PROBE, amplitude_image(probe_amplitude(array)))
        elif name is ArrayName.MOSAIC:
            shown = amplitude_image(array) if np.iscomplexobj(array) else real_image(array)
            self._view.set_image(ImageName.MOSAIC, shown)
        else:
            positions = np.asarray(array, dtype=np.float64)
            if positions.ndim != 2 or positions.shape[1] != 2:
                raise ConfigError(
                    f"{self._scan_uid}/positions has shape {positions.shape}: "
                    "publish (n, 2) probe centres (y, x) in metres"
                )
            self._positions_m = positions[np.isfinite(positions).all(axis=1)]
            self._positions_received += 1
        self._show_positions()

    def _show_positions(self) -> None:
        """Overlay the positions once the object, the positions and the object's geometry are known."""
        try:
            origin_m = tuple(float(value) for value in self._scan_metadata["origin_m"])
            pixel_size_m = float(self._scan_metadata["object_pixel_size_m"])
        except (KeyError, TypeError, ValueError):
            return  # no geometry published (yet): no overlay
        if self._positions_m is None or self._object_shape_px is None or len(origin_m) != 2:
            return
        if not pixel_size_m > 0:
            return  # nonsense geometry: no overlay rather than one in the wrong place
        # Recomputed only when one of its inputs changed: the metadata changes at every iteration.
        inputs = (self._positions_received, origin_m, pixel_size_m)
        if inputs != self._shown_positions:
            self._shown_positions = inputs
            self._view.set_positions(positions_px(self._positions_m, origin_m, pixel_size_m))

    def _check_link(self) -> None:
        if self._needs_attach:
            return
        if self._scan_uid is None or self._reconstructions is None:
            check_tiled(self._uri, self._api_key)
            return
        stored = dict(self._reconstructions[self._scan_uid].metadata)
        if stored == self._scan_metadata:
            self._stale_checks = 0
            return
        self._stale_checks += 1
        self._show_scan_metadata(stored)
        if self._stale_checks >= STALE_CHECKS:
            logger.info("no updates from Tiled's websocket for scan %s: subscribing again", self._scan_uid)
            self._needs_attach = True

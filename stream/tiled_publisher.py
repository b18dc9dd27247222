"""Publish reconstructions to Tiled from a writer thread that never blocks the pipeline.

Layout: ``/reconstructions/<scan_uid>/`` is a container whose metadata carries the scan (``scan_uid``,
algorithm, config, iteration, quality...); under it one array node per name (``object``, ``probe``,
``mosaic``, ``denoised``...). Each node is created once and then updated in place: arrays with a PUT of
the whole array (``.write()``), metadata with ``update_metadata(..., drop_revision=True)`` so that
1,000 iterations do not leave 1,000 metadata revisions. A node whose shape or dtype changes is replaced.
A container left by an earlier run with the same uid is reused.

Latest wins: ``submit_*`` only files the update and returns. The writer keeps at most one pending
update per node; a newer array replaces an unsent one (counted in ``superseded``), a newer metadata
update is merged into the unsent one. A slow or unreachable server therefore costs intermediate
previews, never the solver's time, and memory stays bounded by one update per node.

Failures: connection errors, timeouts, 5xx and 429 are retried with exponential backoff up to
``max_retries`` per node, then that update is given up and counted as
``phasestream_messages_rejected_total{reason="tiled_unreachable"}``; a newer submission for the node
takes over the failing one and its backoff. 4xx answers (bad key, conflict, invalid data) are not
retried: ``reason="tiled_rejected"``. Either way the error names the URI, the node and the fix, and
the writer goes on with the next update.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, NamedTuple

import httpx
import numpy as np
import tiled.client.utils
from tiled.client import from_uri
from tiled.client.array import ArrayClient
from tiled.client.container import Container

from phasestream.errors import ConfigError, PublishError
from phasestream.metrics import MESSAGES_REJECTED, PUBLISH_SECONDS
from phasestream.tiled_server import API_KEY_FIX, URI_FIX, public_uri, validate_api_key

logger = logging.getLogger(__name__)

RECONSTRUCTIONS_KEY = "reconstructions"
# bool, signed and unsigned integers, floats, complex: what Tiled stores as a plain array.
PUBLISHABLE_DTYPE_KINDS = "biufc"

# What the tiled 0.2.20 client raises while writing:
#   httpx.TransportError   connection refused (ConnectError), timeouts (TimeoutException and its
#                          Connect/Read/Write/Pool subclasses), a reset connection (ReadError) ...
#   httpx.HTTPStatusError  5xx and 429 as such; other 4xx as its subclass tiled.client.utils.ClientError
#   KeyError               410 Gone (tiled turns it into a KeyError)
#   TypeError              metadata that is not JSON-serialisable (orjson)
#   RuntimeError           no API key set while the server requires one (from_uri, before any request)
WRITE_ERRORS = (httpx.HTTPError, KeyError, TypeError, RuntimeError)

FIX_BY_STATUS = {
    httpx.codes.UNAUTHORIZED: API_KEY_FIX,
    httpx.codes.FORBIDDEN: "the API key may not write here: use a key with write access",
    httpx.codes.CONFLICT: "a node of that name is in the way: delete it in Tiled or use a new scan uid",
    httpx.codes.UNPROCESSABLE_ENTITY: "the server refused the data: check the metadata (JSON) and the dtype",
}


class FailureReason(StrEnum):
    """The ``reason`` label of a given-up update."""

    UNREACHABLE = "tiled_unreachable"
    REJECTED = "tiled_rejected"


def classify_failure(exc: BaseException) -> FailureReason:
    """UNREACHABLE for what may work on a retry (network, 5xx, 429), REJECTED for what would fail again."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        retryable = status >= httpx.codes.INTERNAL_SERVER_ERROR or status == httpx.codes.TOO_MANY_REQUESTS
        return FailureReason.UNREACHABLE if retryable else FailureReason.REJECTED
    if isinstance(exc, httpx.TransportError):
        return FailureReason.UNREACHABLE
    return FailureReason.REJECTED


class _Node(NamedTuple):
    scan_uid: str
    name: str | None  # None: the scan container itself, i.e. the scan's metadata

    @property
    def path(self) -> str:
        scan_path = f"/{RECONSTRUCTIONS_KEY}/{self.scan_uid}"
        return scan_path if self.name is None else f"{scan_path}/{self.name}"


@dataclass
class _Update:
    node: _Node
    array: np.ndarray | None
    metadata: dict[str, Any]
    failed_attempts: int = 0
    not_before_s: float = 0.0  # time.monotonic() before which a retry must not start


def _merge_metadata(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """Two updates in one, with the nested-merge semantics of tiled's ``update_metadata``."""
    merged = dict(older)
    for key, value in newer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_metadata(merged[key], value)
        else:
            merged[key] = value
    return merged


def _child_container(parent: Container, key: str, metadata: dict[str, Any]) -> tuple[Container, bool]:
    """``parent[key]``, created with ``metadata`` if absent, and whether it was created."""
    try:
        return parent[key], False
    except KeyError:
        pass
    try:
        return parent.create_container(key, metadata=metadata), True
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != httpx.codes.CONFLICT:
            raise
        # Another publisher worker created it between our lookup and our create.
        return parent[key], False


class TiledPublisher:
    """Writes the latest array and metadata per node to ``/reconstructions/<scan_uid>/`` in a thread.

    ``submit_array`` / ``submit_metadata`` return at once and never raise on a server problem; ``flush``
    waits (bounded) until everything submitted so far is written or given up. Counters: ``written``,
    ``superseded``, ``retried``, ``failed`` and ``last_error``.

    tiled's client retries failed requests itself (stamina, up to 10 attempts or 45 s per call), which
    would stall the writer about 25 s per update against a stopped server and make ``max_retries``
    meaningless; the publisher sets that retry budget to one attempt for the whole process
    (``tiled.client.utils.TILED_RETRY_ATTEMPTS``, the setting behind the ``TILED_RETRY_ATTEMPTS`` variable)
    and retries itself.
    """

    def __init__(
        self,
        uri: str,
        api_key: str | None,
        *,
        stage: str = "publish",
        worker: str = "0",
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        try:
            httpx.URL(uri)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"Tiled URI {uri!r} is not valid ({exc}): use e.g. http://host:8000") from exc
        tiled.client.utils.TILED_RETRY_ATTEMPTS = 1
        self.uri = public_uri(uri)
        # A key given inside the URI (?api_key=) is honoured, but only the key-less URI is kept and shown.
        self._api_key = api_key or httpx.URL(uri).params.get("api_key")
        validate_api_key(self._api_key)
        self._labels = {"stage": stage, "worker": str(worker)}
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._request_timeout_s = request_timeout_s

        # Shared between submitters and the writer; guarded by _cond, never held during I/O.
        self._cond = threading.Condition()
        self._pending: dict[_Node, _Update] = {}  # insertion order = service order
        self._in_flight: _Update | None = None
        self._closing = False
        self._written = 0
        self._superseded = 0
        self._retried = 0
        self._failed = 0
        self._last_error: str | None = None

        # Confined to the writer thread: the tiled client and the nodes it has resolved.
        self._client: Container | None = None
        self._reconstructions: Container | None = None
        self._nodes: dict[_Node, Container | ArrayClient] = {}
        self._failures_in_a_row = 0

        self._thread = threading.Thread(
            target=self._run, name=f"tiled-publisher-{stage}-{worker}", daemon=True
        )
        self._thread.start()

    # -- submitting (any thread) -------------------------------------------------------------------

    def submit_array(
        self, scan_uid: str, name: str, array: np.ndarray, metadata: dict[str, Any] | None = None
    ) -> None:
        """File ``array`` (and metadata for its node) for ``/reconstructions/<scan_uid>/<name>``."""
        node = _Node(scan_uid, name)
        array = np.asarray(array)
        if array.dtype.kind not in PUBLISHABLE_DTYPE_KINDS:
            raise PublishError(
                f"cannot publish {node.path}: dtype {array.dtype} is not bool, integer, float or complex",
                reason=FailureReason.REJECTED,
            )
        # A copy, because solvers go on updating their estimate in place while this one waits.
        snapshot = np.array(array, order="C", copy=True)
        self._file(_Update(node, snapshot, copy.deepcopy(metadata or {})))

    def submit_metadata(self, scan_uid: str, metadata: dict[str, Any]) -> None:
        """File a metadata update (``dict.update``-like, nested dicts merge) for the scan's container."""
        self._file(_Update(_Node(scan_uid, None), None, copy.deepcopy(metadata)))

    def _file(self, update: _Update) -> None:
        with self._cond:
            if self._closing:
                raise PublishError(
                    f"the Tiled publisher for {self.uri} is closed; {update.node.path} not sent"
                )
            if not self._thread.is_alive():
                raise PublishError(f"the Tiled writer thread for {self.uri} has died: see the log above")
            older = self._pending.get(update.node)
            if older is not None:
                self._superseded += 1
                update.metadata = _merge_metadata(older.metadata, update.metadata)
                # The node's failure streak and backoff go on: a steady stream of submissions to a
                # stopped server must still end in counted failures, not in endless fresh first tries.
                update.failed_attempts, update.not_before_s = older.failed_attempts, older.not_before_s
            self._pending[update.node] = update  # an existing key keeps its place in the queue
            self._cond.notify_all()

    # -- waiting and stopping ---------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait until all updates submitted so far are written or given up; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending and self._in_flight is None, timeout=timeout_s
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to ``timeout_s``, then stop the writer; what is still pending is logged, dropped."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            dropped = [update.node.path for update in self._pending.values()]
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=self._request_timeout_s)
        if dropped:
            logger.warning("closed the Tiled publisher for %s with unsent updates: %s", self.uri, dropped)
        if self._client is not None and not self._thread.is_alive():
            self._client.context.close()
            self._client = None

    def __enter__(self) -> TiledPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- counters -----------------------------------------------------------------------------------

    @property
    def written(self) -> int:
        """Updates that reached the server."""
        return self._written

    @property
    def superseded(self) -> int:
        """Updates replaced or merged by a newer one for the same node before they were written."""
        return self._superseded

    @property
    def retried(self) -> int:
        """Retries scheduled after a network error, 5xx or 429."""
        return self._retried

    @property
    def failed(self) -> int:
        """Updates given up: rejected (4xx) or still failing after ``max_retries`` retries."""
        return self._failed

    @property
    def last_error(self) -> str | None:
        return self._last_error

    # -- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while (update := self._take_next_due()) is not None:
            started_s = time.perf_counter()
            try:
                self._write(update)
            except WRITE_ERRORS as exc:
                # The cached clients may point at a node that is gone or stale: resolve them again.
                self._nodes.pop(update.node, None)
                self._nodes.pop(_Node(update.node.scan_uid, None), None)
                self._reconstructions = None
                self._settle(update, exc)
            else:
                PUBLISH_SECONDS.labels(**self._labels).observe(time.perf_counter() - started_s)
                self._settle(update, None)

    def _take_next_due(self) -> _Update | None:
        with self._cond:
            while not self._closing:
                now_s = time.monotonic()
                due = next((u for u in self._pending.values() if u.not_before_s <= now_s), None)
                if due is not None:
                    del self._pending[due.node]
                    self._in_flight = due
                    return due
                next_retry_s = min((u.not_before_s for u in self._pending.values()), default=None)
                self._cond.wait(timeout=None if next_retry_s is None else next_retry_s - now_s)
            return None

    def _settle(self, update: _Update, error: BaseException | None) -> None:
        with self._cond:
            self._in_flight = None
            if error is None:
                self._written += 1
                if self._failures_in_a_row:
                    logger.info("Tiled at %s takes writes again (%s)", self.uri, update.node.path)
                self._failures_in_a_row = 0
            elif (
                classify_failure(error) is FailureReason.UNREACHABLE
                and update.failed_attempts < self._max_retries
            ):
                self._schedule_retry(update)
            else:
                self._give_up(update, error)
            self._cond.notify_all()

    def _schedule_retry(self, update: _Update) -> None:
        update.failed_attempts += 1
        delay_s = min(self._backoff_s * 2 ** (update.failed_attempts - 1), self._max_backoff_s)
        update.not_before_s = time.monotonic() + delay_s
        self._retried += 1
        newer = self._pending.get(update.node)
        if newer is None:
            self._pending[update.node] = update
            return
        # The newer submission takes over: it is retried in place of this one, after the same backoff.
        self._superseded += 1
        newer.metadata = _merge_metadata(update.metadata, newer.metadata)
        newer.failed_attempts, newer.not_before_s = update.failed_attempts, update.not_before_s

    def _give_up(self, update: _Update, error: BaseException) -> None:
        reason = classify_failure(error)
        message = self._describe(update, error)
        self._failed += 1
        self._last_error = message
        MESSAGES_REJECTED.labels(**self._labels, reason=reason).inc()
        # One ERROR per outage or misconfiguration, not one per update at several updates a second.
        log = logger.error if self._failures_in_a_row == 0 else logger.debug
        log("%s", message)
        self._failures_in_a_row += 1

    def _describe(self, update: _Update, error: BaseException) -> str:
        attempts = update.failed_attempts + 1
        target = f"{update.node.path} at Tiled {self.uri}"
        if isinstance(error, httpx.HTTPStatusError):
            status = error.response.status_code
            first_line = str(error).splitlines()[0]
            if classify_failure(error) is FailureReason.UNREACHABLE:
                return (
                    f"gave up on {target} after {attempts} attempts: {status} ({first_line}); "
                    "see the server's error log"
                )
            fix = FIX_BY_STATUS.get(status, "see the server's error log")
            return f"Tiled at {self.uri} rejected {update.node.path} ({first_line}), not retried: {fix}"
        if isinstance(error, httpx.TransportError):
            return (
                f"gave up on {target} after {attempts} attempts ({type(error).__name__}: {error}): "
                f"no Tiled server answers; {URI_FIX}. Newer updates will still be tried"
            )
        fix = API_KEY_FIX if isinstance(error, RuntimeError) else "see the message"
        return f"could not write {target} ({type(error).__name__}: {error}), not retried: {fix}"

    # Only the writer thread runs the methods below.

    def _write(self, update: _Update) -> None:
        node = update.node
        if update.array is None:
            scan, created = self._scan(node.scan_uid, update.metadata)
            if not created and update.metadata:
                scan.update_metadata(update.metadata, drop_revision=True)
            return
        assert node.name is not None  # array updates always name their node
        array_node = self._nodes.get(node)
        if array_node is None:
            scan, _ = self._scan(node.scan_uid, {})
            try:
                array_node = scan[node.name]
            except KeyError:
                self._nodes[node] = scan.write_array(update.array, key=node.name, metadata=update.metadata)
                return
        if not self._same_structure(array_node, update.array):
            # A PUT must match the stored shape and dtype (a mismatch gives a 500 or a reset
            # connection, not a 4xx), so a new probe size or dtype replaces the node instead.
            scan, _ = self._scan(node.scan_uid, {})
            # external_only=False: our arrays are internally managed zarr, which the default refuses (409).
            scan.delete_contents(node.name, external_only=False)
            self._nodes[node] = scan.write_array(update.array, key=node.name, metadata=update.metadata)
            return
        array_node.write(update.array)
        if update.metadata:
            array_node.update_metadata(update.metadata, drop_revision=True)
        self._nodes[node] = array_node

    @staticmethod
    def _same_structure(array_node: Container | ArrayClient, array: np.ndarray) -> bool:
        return (
            isinstance(array_node, ArrayClient)
            and tuple(array_node.shape) == array.shape
            and np.dtype(array_node.dtype) == array.dtype
        )

    def _scan(self, scan_uid: str, metadata: dict[str, Any]) -> tuple[Container, bool]:
        """The scan's container, created with ``metadata`` if absent, and whether it was created."""
        key = _Node(scan_uid, None)
        cached = self._nodes.get(key)
        if isinstance(cached, Container):
            return cached, False
        scan, created = _child_container(
            self._reconstructions_container(), scan_uid, {"scan_uid": scan_uid, **metadata}
        )
        self._nodes[key] = scan
        return scan, created

    def _reconstructions_container(self) -> Container:
        if self._reconstructions is None:
            if self._client is None:
                timeout = httpx.Timeout(self._request_timeout_s)
                self._client = from_uri(self.uri, api_key=self._api_key, timeout=timeout)
            self._reconstructions, _ = _child_container(
                self._client,
                RECONSTRUCTIONS_KEY,
                {"description": "phasestream reconstructions, one per scan"},
            )
        return self._reconstructions

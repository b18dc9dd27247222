"""Publish reconstructions to Tiled from a writer thread that never blocks the pipeline.

Layout: ``/reconstructions/<scan_uid>/`` is a container whose metadata carries the scan (``scan_uid``,
algorithm, config, iteration, quality...); under it one array node per name (``object``, ``probe``,
``mosaic``, ``denoised``...), written as ``tiled_writer`` describes.

Latest wins: ``submit_*`` only files the update and returns. The writer keeps at most one pending
update per node; a newer array replaces an unsent one (counted in ``superseded``), a newer metadata
update is merged into the unsent one. A slow or unreachable server therefore costs intermediate
previews, never the solver's time, and memory stays bounded by one update per node.

Failures: connection errors, timeouts, 5xx and 429 are retried with exponential backoff up to
``max_retries`` per node, then that update is given up and counted as
``phasestream_messages_rejected_total{reason="tiled_unreachable"}``; a newer submission for the node
takes over the failing one and its backoff. 4xx answers (bad key, conflict, invalid data) are not
retried: ``reason="tiled_rejected"``. Either way the error names the URI, the node and the fix, and
the writer goes on with the next update. A 404 means the server lost the node (a restart on an empty
catalog): it is retried like a network error, and the scan's container is created again with every metadata
update submitted for that scan so far (geometry, planned frames, config hash...), not with the update at hand.

Final results: ``submit_result`` files a scan's final arrays and its complete metadata as one delivery,
kept in ``pending_dir`` (``<scan_uid>.npz``, written atomically) until Tiled has acknowledged every part.
Its updates are never given up for a network error, 5xx, 429 or 404: after ``max_retries`` they are re-sent
on a slower schedule (at most ``result_retry_s`` apart, at once when another write succeeds) for as long as
the process runs, and a later publisher with the same ``pending_dir`` (the worker started again) re-sends
what is left there. Meanwhile they count in ``phasestream_results_pending`` and a warning says so at most
every ``PENDING_LOG_INTERVAL_S``.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
import tiled.client.utils

from phasestream.errors import ConfigError, PhasestreamError, PublishError
from phasestream.runtime.metrics import MESSAGES_REJECTED, PUBLISH_SECONDS, RESULTS_PENDING
from phasestream.runtime.scan_uid import check_scan_uid
from phasestream.runtime.tiled.access import public_uri, validate_api_key
from phasestream.runtime.tiled.node_writer import TiledNodeWriter
from phasestream.runtime.tiled.pending_results import PendingResults
from phasestream.runtime.tiled.updates import (
    PUBLISHABLE_DTYPE_KINDS,
    RETRYABLE,
    WRITE_ERRORS,
    Delivery,
    FailureReason,
    FinalResult,
    TiledNode,
    Update,
    classify_failure,
    combine,
    describe_failure,
    merge_metadata,
)

logger = logging.getLogger(__name__)

# At most one warning this often about final results that still wait for Tiled.
PENDING_LOG_INTERVAL_S = 30.0
# The scans whose submitted metadata is remembered, to create their container again after a 404.
_REMEMBERED_SCANS = 64
# Back-off doubles up to its limit; beyond this many doublings it is at the limit anyway.
_MAX_DOUBLINGS = 30


class TiledPublisher:
    """Writes the latest array and metadata per node to ``/reconstructions/<scan_uid>/`` in a thread.

    ``submit_array`` / ``submit_metadata`` / ``submit_result`` return at once and never raise on a server
    problem; ``flush`` waits (bounded) until everything submitted so far is written, given up, or (a final
    result's part) past ``max_retries`` and kept pending. Counters: ``written``, ``superseded``,
    ``retried``, ``failed`` (and per scan ``take_failures``), ``pending_results`` and ``last_error``.

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
        pending_dir: Path | None = None,
        result_retry_s: float = 30.0,
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
        self._result_retry_s = result_retry_s
        self._store = PendingResults(pending_dir) if pending_dir is not None else None
        self._pending_gauge = RESULTS_PENDING.labels(**self._labels)

        # Shared between submitters and the writer; guarded by _cond, never held during I/O.
        self._cond = threading.Condition()
        self._pending: dict[TiledNode, Update] = {}  # insertion order = service order
        self._in_flight: Update | None = None
        self._closing = False
        self._written = 0
        self._superseded = 0
        self._retried = 0
        self._failed = 0
        self._failed_by_scan: dict[str, int] = {}
        self._last_error: str | None = None
        # Every metadata update submitted per scan, merged: what a container created again must hold.
        self._scan_metadata: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # The final results Tiled has not taken yet, by scan.
        self._deliveries: dict[str, Delivery] = {}
        self._pending_logged_s = float("-inf")

        # Confined to the writer thread: the tiled client and the nodes it has resolved.
        self._writer = TiledNodeWriter(self.uri, self._api_key, request_timeout_s, self._metadata_of)
        self._failures_in_a_row = 0

        self._thread = threading.Thread(
            target=self._run, name=f"tiled-publisher-{stage}-{worker}", daemon=True
        )
        self._thread.start()
        self._resume_pending()

    # -- submitting (any thread) -------------------------------------------------------------------

    def submit_array(
        self, scan_uid: str, name: str, array: np.ndarray, metadata: dict[str, Any] | None = None
    ) -> None:
        """File ``array`` (and metadata for its node) for ``/reconstructions/<scan_uid>/<name>``."""
        node = self._node(scan_uid, name)
        array = np.asarray(array)
        self._check_dtype(node, array)
        # A copy, because solvers go on updating their estimate in place while this one waits.
        snapshot = np.array(array, order="C", copy=True)
        self._file([Update(node, snapshot, copy.deepcopy(metadata or {}))])

    def submit_metadata(self, scan_uid: str, metadata: dict[str, Any]) -> None:
        """File a metadata update (``dict.update``-like, nested dicts merge) for the scan's container."""
        self._file([Update(self._node(scan_uid, None), None, copy.deepcopy(metadata))])

    def submit_result(self, result: FinalResult) -> None:
        """File a scan's final result: kept in ``pending_dir`` and re-sent until Tiled has every part.

        A disk that refuses the file costs durability, not the result: it is logged and sent from memory.
        """
        updates = self._result_updates(result)
        if self._store is not None:
            try:
                self._store.save(result)
            except (OSError, TypeError, ValueError) as exc:  # TypeError, ValueError: metadata not JSON
                logger.error(
                    "cannot keep the final result of scan %s in %s (%s): it is sent from memory only, and "
                    "lost if this worker stops before Tiled takes it; free disk space or check run_dir",
                    result.scan_uid, self._store.directory, exc,
                )  # fmt: skip
        self._file(updates)

    def _result_updates(self, result: FinalResult) -> list[Update]:
        """The container's metadata first (it creates the container with all of it), then each array."""
        delivery = Delivery(result.scan_uid, {None, *result.arrays})
        container = self._node(result.scan_uid, None)
        updates = [Update(container, None, copy.deepcopy(result.metadata), delivery=delivery)]
        for name, (array, metadata) in result.arrays.items():
            node = self._node(result.scan_uid, name)
            snapshot = np.array(array, order="C", copy=True)
            self._check_dtype(node, snapshot)
            updates.append(Update(node, snapshot, copy.deepcopy(metadata), delivery=delivery))
        return updates

    def _node(self, scan_uid: str, name: str | None) -> TiledNode:
        """The node, once the scan uid is known to name one under ``/reconstructions/`` and nothing else."""
        return TiledNode(check_scan_uid(scan_uid, f"a write to Tiled at {self.uri}"), name)

    @staticmethod
    def _check_dtype(node: TiledNode, array: np.ndarray) -> None:
        if array.dtype.kind not in PUBLISHABLE_DTYPE_KINDS:
            raise PublishError(
                f"cannot publish {node.path}: dtype {array.dtype} is not bool, integer, float or complex",
                reason=FailureReason.REJECTED,
            )

    def _resume_pending(self) -> None:
        """File the final results an earlier run left in ``pending_dir``."""
        if self._store is None:
            return
        results = self._store.load()
        if not results:
            return
        logger.warning(
            "%d final result(s) of an earlier run wait in %s (scans %s): re-sending them to Tiled at %s",
            len(results), self._store.directory, ", ".join(r.scan_uid for r in results[:5]), self.uri,
        )  # fmt: skip
        for result in results:
            try:
                self._file(self._result_updates(result))
            except PhasestreamError as exc:
                logger.error(
                    "the pending result of scan %s is not re-sent (%s): delete it", result.scan_uid, exc
                )

    def _file(self, updates: list[Update]) -> None:
        with self._cond:
            if self._closing:
                raise PublishError(
                    f"the Tiled publisher for {self.uri} is closed; {updates[0].node.path} not sent"
                )
            if not self._thread.is_alive():
                raise PublishError(f"the Tiled writer thread for {self.uri} has died: see the log above")
            for update in updates:
                if update.delivery is not None and update.node.name is None:
                    self._deliveries[update.node.scan_uid] = update.delivery
                if update.array is None:
                    self._remember_metadata(update.node.scan_uid, update.metadata)
                older = self._pending.get(update.node)
                if older is not None:
                    self._superseded += 1
                    update = combine(older, update)
                self._pending[update.node] = update  # an existing key keeps its place in the queue
            self._pending_gauge.set(len(self._deliveries))
            self._cond.notify_all()

    def _remember_metadata(self, scan_uid: str, metadata: dict[str, Any]) -> None:
        known = self._scan_metadata.pop(scan_uid, {})
        self._scan_metadata[scan_uid] = merge_metadata(known, metadata)
        while len(self._scan_metadata) > _REMEMBERED_SCANS:
            self._scan_metadata.popitem(last=False)

    # -- waiting and stopping ---------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait until all updates submitted so far are written, given up or, for a final result's parts,
        kept pending after ``max_retries``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: (
                    all(self._parked(u) for u in self._pending.values())
                    and (self._in_flight is None or self._parked(self._in_flight))
                ),
                timeout=timeout_s,
            )

    def _parked(self, update: Update) -> bool:
        """A final result's part that failed more than ``max_retries`` times: re-sent on the slow schedule."""
        return update.delivery is not None and update.failed_attempts > self._max_retries

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush for up to ``timeout_s``, then stop the writer; what is still pending is logged, dropped
        (final results stay in ``pending_dir`` for the next start)."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            dropped = [update.node.path for update in self._pending.values() if update.delivery is None]
            kept = sorted(self._deliveries)
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=self._request_timeout_s)
        if dropped:
            logger.warning("closed the Tiled publisher for %s with unsent updates: %s", self.uri, dropped)
        if kept:
            where = self._store.directory if self._store is not None else "memory only (no pending_dir)"
            logger.warning(
                "closed the Tiled publisher for %s before Tiled took the final results of scans %s: they "
                "stay in %s and are re-sent at the next start", self.uri, kept, where,
            )  # fmt: skip
        if not self._thread.is_alive():
            self._writer.close()

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

    @property
    def pending_results(self) -> int:
        """Final results (one per scan) that Tiled has not acknowledged every part of."""
        return len(self._deliveries)

    def is_pending(self, scan_uid: str) -> bool:
        """Whether the scan's final result still waits for Tiled."""
        return scan_uid in self._deliveries

    def take_failures(self, scan_uid: str) -> int:
        """Updates of this scan given up since the last call for it (counted once, for its accounting)."""
        with self._cond:
            return self._failed_by_scan.pop(scan_uid, 0)

    # -- the writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while (update := self._take_next_due()) is not None:
            started_s = time.perf_counter()
            try:
                self._write(update)
            except WRITE_ERRORS as exc:
                self._writer.forget(update.node)
                self._settle(update, exc)
            else:
                PUBLISH_SECONDS.labels(**self._labels).observe(time.perf_counter() - started_s)
                if (delivered := self._settle(update, None)) is not None:
                    self._discard(delivered)

    def _discard(self, delivered: str) -> None:
        """Tiled has every part of the scan's final result: its file goes."""
        logger.info("the final result of scan %s reached Tiled at %s", delivered, self.uri)
        if self._store is None:
            return
        try:
            self._store.discard(delivered)
        except OSError as exc:
            logger.error(
                "cannot delete %s (%s), whose result reached Tiled: delete it, or it is sent again at the "
                "next start", self._store.path(delivered), exc,
            )  # fmt: skip

    def _take_next_due(self) -> Update | None:
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

    def _settle(self, update: Update, error: BaseException | None) -> str | None:
        """Count the outcome and retry, give up or keep pending; the scan whose result is now complete."""
        delivered = None
        with self._cond:
            self._in_flight = None
            if error is None:
                self._written += 1
                if self._failures_in_a_row:
                    logger.info("Tiled at %s takes writes again (%s)", self.uri, update.node.path)
                self._failures_in_a_row = 0
                self._retry_results_now()
                delivered = self._delivered(update)
            elif classify_failure(error) in RETRYABLE and (
                update.delivery is not None or update.failed_attempts < self._max_retries
            ):
                self._schedule_retry(update)
                if self._parked(update):
                    self._log_pending(error)
            else:
                self._give_up(update, error)
            self._pending_gauge.set(len(self._deliveries))
            self._cond.notify_all()
        return delivered

    def _delivered(self, update: Update) -> str | None:
        """Tick off a written part of a final result; the scan uid when that was its last part."""
        delivery = update.delivery
        if delivery is None:
            return None
        delivery.unsent.discard(update.node.name)
        if delivery.unsent or self._deliveries.get(delivery.scan_uid) is not delivery:
            return None
        del self._deliveries[delivery.scan_uid]
        return delivery.scan_uid

    def _retry_results_now(self) -> None:
        """Tiled took a write: the final results waiting out a back-off need not wait longer."""
        for pending in self._pending.values():
            if pending.delivery is not None and pending.failed_attempts:
                pending.not_before_s = 0.0

    def _log_pending(self, error: BaseException) -> None:
        now_s = time.monotonic()
        if now_s - self._pending_logged_s < PENDING_LOG_INTERVAL_S:
            return
        self._pending_logged_s = now_s
        where = self._store.directory if self._store is not None else "memory (no pending_dir)"
        logger.warning(
            "%d final scan result(s) (%s) wait for Tiled at %s (%s: %s): kept in %s and re-sent at most "
            "%g s apart until Tiled takes them",
            len(self._deliveries), ", ".join(sorted(self._deliveries)[:5]), self.uri, type(error).__name__,
            str(error).splitlines()[0] if str(error) else "", where, self._result_retry_s,
        )  # fmt: skip

    def _schedule_retry(self, update: Update) -> None:
        update.failed_attempts += 1
        limit_s = self._result_retry_s if self._parked(update) else self._max_backoff_s
        doublings = min(update.failed_attempts - 1, _MAX_DOUBLINGS)
        update.not_before_s = time.monotonic() + min(self._backoff_s * 2**doublings, limit_s)
        self._retried += 1
        newer = self._pending.get(update.node)
        if newer is None:
            self._pending[update.node] = update
            return
        # The newer submission takes over: it is retried in place of this one, after the same backoff.
        self._superseded += 1
        self._pending[update.node] = combine(update, newer)

    def _give_up(self, update: Update, error: BaseException) -> None:
        reason = classify_failure(error)
        message = describe_failure(update, error, self.uri)
        if update.delivery is not None:
            where = self._store.path(update.node.scan_uid) if self._store is not None else "memory"
            message += f"; the final result stays in {where} and is sent again at the next start"
        self._failed += 1
        uid = update.node.scan_uid
        self._failed_by_scan[uid] = self._failed_by_scan.get(uid, 0) + 1
        self._last_error = message
        MESSAGES_REJECTED.labels(**self._labels, reason=reason).inc()
        # One ERROR per outage or misconfiguration, not one per update at several updates a second.
        log = logger.error if self._failures_in_a_row == 0 else logger.debug
        log("%s", message)
        self._failures_in_a_row += 1

    def _write(self, update: Update) -> None:
        """Send one update to Tiled (the writer thread only)."""
        self._writer.write(update)

    def _metadata_of(self, scan_uid: str) -> dict[str, Any]:
        """Every metadata update submitted for the scan so far (the writer thread asks, for a container it
        creates)."""
        with self._cond:
            return copy.deepcopy(self._scan_metadata.get(scan_uid, {}))

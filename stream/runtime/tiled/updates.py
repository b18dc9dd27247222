"""What the Tiled publisher files, and how a failed write is judged and explained.

An ``Update`` is the latest array and metadata for one node under ``/reconstructions/<scan_uid>/``; a newer
one for the same node replaces or merges into it (``combine``). A ``FinalResult`` travels as one
``Delivery``: its parts are ticked off as Tiled takes them. ``classify_failure`` sorts a failed write into
what a retry may cure and what it cannot; ``describe_failure`` names the node, the URI and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import httpx
import numpy as np

from phasestream.runtime.tiled.access import API_KEY_FIX, URI_FIX

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

FIX_BY_STATUS: dict[int, str] = {
    httpx.codes.UNAUTHORIZED: API_KEY_FIX,
    httpx.codes.FORBIDDEN: "the API key may not write here: use a key with write access",
    httpx.codes.CONFLICT: "a node of that name is in the way: delete it in Tiled or use a new scan uid",
    httpx.codes.UNPROCESSABLE_ENTITY: "the server refused the data: check the metadata (JSON) and the dtype",
}


class FailureReason(StrEnum):
    """The ``reason`` label of a given-up update."""

    UNREACHABLE = "tiled_unreachable"
    REJECTED = "tiled_rejected"
    NOT_FOUND = "tiled_not_found"  # the server no longer has the node: restarted on an empty catalog?


# What may work on a retry: the network, 5xx and 429; a lost node, which the retry creates again.
RETRYABLE = frozenset({FailureReason.UNREACHABLE, FailureReason.NOT_FOUND})


def classify_failure(exc: BaseException) -> FailureReason:
    """UNREACHABLE for the network, 5xx and 429, NOT_FOUND for a 404, REJECTED for what would fail again."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if status == httpx.codes.NOT_FOUND:
            return FailureReason.NOT_FOUND
        retryable = status >= httpx.codes.INTERNAL_SERVER_ERROR or status == httpx.codes.TOO_MANY_REQUESTS
        return FailureReason.UNREACHABLE if retryable else FailureReason.REJECTED
    if isinstance(exc, httpx.TransportError):
        return FailureReason.UNREACHABLE
    return FailureReason.REJECTED


class TiledNode(NamedTuple):
    """A node under ``/reconstructions/``: a scan's container, or one named array in it."""

    scan_uid: str
    name: str | None  # None: the scan container itself, i.e. the scan's metadata

    @property
    def path(self) -> str:
        scan_path = f"/{RECONSTRUCTIONS_KEY}/{self.scan_uid}"
        return scan_path if self.name is None else f"{scan_path}/{self.name}"


@dataclass
class FinalResult:
    """A scan's final result as Tiled must end up holding it: the container's complete metadata, and its
    arrays by node name, each with the metadata of its node."""

    scan_uid: str
    metadata: dict[str, Any]
    arrays: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Delivery:
    """The parts (node names; None: the container's metadata) of one final result Tiled has not taken yet."""

    scan_uid: str
    unsent: set[str | None]


@dataclass
class Update:
    """What the writer is to send to one node: an array (None: metadata only) and metadata to merge."""

    node: TiledNode
    array: np.ndarray | None
    metadata: dict[str, Any]
    failed_attempts: int = 0
    not_before_s: float = 0.0  # time.monotonic() before which a retry must not start
    delivery: Delivery | None = None  # set for a part of a final result: never given up while retryable


def combine(older: Update, newer: Update) -> Update:
    """One update for a node from an unsent (or failing) one and a newer one: latest wins, metadata merged.

    The node's failure streak and backoff go on: a steady stream of submissions to a stopped server must
    still end in counted failures, not in endless fresh first tries. A final result's array is never
    replaced by a later snapshot (a straggler from another upstream worker).
    """
    if older.delivery is not None and newer.delivery is None and newer.array is not None:
        return older
    newer.metadata = merge_metadata(older.metadata, newer.metadata)
    newer.failed_attempts, newer.not_before_s = older.failed_attempts, older.not_before_s
    newer.delivery = newer.delivery or older.delivery
    return newer


def merge_metadata(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """Two updates in one, with the nested-merge semantics of tiled's ``update_metadata``."""
    merged = dict(older)
    for key, value in newer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_metadata(merged[key], value)
        else:
            merged[key] = value
    return merged


def describe_failure(update: Update, error: BaseException, uri: str) -> str:
    """Why ``update`` was given up: the node, the Tiled URI and the fix."""
    attempts = update.failed_attempts + 1
    target = f"{update.node.path} at Tiled {uri}"
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        first_line = str(error).splitlines()[0]
        if classify_failure(error) is FailureReason.NOT_FOUND:
            return (
                f"gave up on {target} after {attempts} attempts: {status} ({first_line}); the server "
                "lost the node each time (restarted on an empty catalog, or a node deleted): check it"
            )
        if classify_failure(error) is FailureReason.UNREACHABLE:
            return (
                f"gave up on {target} after {attempts} attempts: {status} ({first_line}); "
                "see the server's error log"
            )
        fix = FIX_BY_STATUS.get(status, "see the server's error log")
        return f"Tiled at {uri} rejected {update.node.path} ({first_line}), not retried: {fix}"
    if isinstance(error, httpx.TransportError):
        return (
            f"gave up on {target} after {attempts} attempts ({type(error).__name__}: {error}): "
            f"no Tiled server answers; {URI_FIX}. Newer updates will still be tried"
        )
    fix = API_KEY_FIX if isinstance(error, RuntimeError) else "see the message"
    return f"could not write {target} ({type(error).__name__}: {error}), not retried: {fix}"

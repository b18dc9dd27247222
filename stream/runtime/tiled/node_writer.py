"""The Tiled side of the publisher's writer thread: one client, the nodes it has resolved, and the writes.

Each node is created once and then updated in place: arrays with a PUT of the whole array (``.write()``),
metadata with ``update_metadata(..., drop_revision=True)`` so that 1,000 iterations do not leave 1,000
metadata revisions. A node whose shape or dtype changes is replaced. A container left by an earlier run
with the same uid is reused. Only the writer thread uses a ``TiledNodeWriter``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from tiled.client import from_uri
from tiled.client.array import ArrayClient
from tiled.client.container import Container

from phasestream.runtime.tiled.updates import RECONSTRUCTIONS_KEY, TiledNode, Update


class TiledNodeWriter:
    """Writes updates to ``/reconstructions/`` of one Tiled server, keeping the nodes it resolved.

    ``scan_metadata(scan_uid)`` gives every metadata update submitted for a scan so far: a container
    created (again) is created with all of it, so that one the server lost comes back whole.
    """

    def __init__(
        self,
        uri: str,
        api_key: str | None,
        request_timeout_s: float,
        scan_metadata: Callable[[str], dict[str, Any]],
    ) -> None:
        self._uri = uri
        self._api_key = api_key
        self._request_timeout_s = request_timeout_s
        self._scan_metadata = scan_metadata
        self._client: Container | None = None
        self._reconstructions: Container | None = None
        self._nodes: dict[TiledNode, Container | ArrayClient] = {}

    def write(self, update: Update) -> None:
        """Send one update; raises what the tiled client raises (``tiled_updates.WRITE_ERRORS``)."""
        node = update.node
        if update.array is None:
            scan, created = self._scan(node.scan_uid)
            if not created and update.metadata:
                scan.update_metadata(update.metadata, drop_revision=True)
            return
        assert node.name is not None  # array updates always name their node
        array_node = self._nodes.get(node)
        if array_node is None:
            scan, _ = self._scan(node.scan_uid)
            try:
                array_node = scan[node.name]
            except KeyError:
                self._nodes[node] = scan.write_array(update.array, key=node.name, metadata=update.metadata)
                return
        if not _same_structure(array_node, update.array):
            # A PUT must match the stored shape and dtype (a mismatch gives a 500 or a reset
            # connection, not a 4xx), so a new probe size or dtype replaces the node instead.
            scan, _ = self._scan(node.scan_uid)
            # external_only=False: our arrays are internally managed zarr, which the default refuses (409).
            scan.delete_contents(node.name, external_only=False)
            self._nodes[node] = scan.write_array(update.array, key=node.name, metadata=update.metadata)
            return
        array_node.write(update.array)
        if update.metadata:
            array_node.update_metadata(update.metadata, drop_revision=True)
        self._nodes[node] = array_node

    def forget(self, node: TiledNode) -> None:
        """After a failed write: the cached clients may point at a node that is gone or stale."""
        self._nodes.pop(node, None)
        self._nodes.pop(TiledNode(node.scan_uid, None), None)
        self._reconstructions = None

    def close(self) -> None:
        if self._client is not None:
            self._client.context.close()
            self._client = None

    def _scan(self, scan_uid: str) -> tuple[Container, bool]:
        """The scan's container and whether it was created now: then with every metadata update submitted
        for the scan so far (the one being written included), whichever update finds it missing."""
        key = TiledNode(scan_uid, None)
        cached = self._nodes.get(key)
        if isinstance(cached, Container):
            return cached, False
        metadata = {"scan_uid": scan_uid, **self._scan_metadata(scan_uid)}
        scan, created = _child_container(self._reconstructions_container(), scan_uid, metadata)
        self._nodes[key] = scan
        return scan, created

    def _reconstructions_container(self) -> Container:
        if self._reconstructions is None:
            if self._client is None:
                timeout = httpx.Timeout(self._request_timeout_s)
                self._client = from_uri(self._uri, api_key=self._api_key, timeout=timeout)
            self._reconstructions, _ = _child_container(
                self._client,
                RECONSTRUCTIONS_KEY,
                {"description": "phasestream reconstructions, one per scan"},
            )
        return self._reconstructions


def _same_structure(array_node: Container | ArrayClient, array: np.ndarray) -> bool:
    return (
        isinstance(array_node, ArrayClient)
        and tuple(array_node.shape) == array.shape
        and np.dtype(array_node.dtype) == array.dtype
    )


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

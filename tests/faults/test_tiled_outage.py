"""Tiled down for a while, then back on the same port and data folder: the publisher keeps only the
latest state per node, retries with back-off, and the final object lands. Counted: retries, no failures.

The outage lasts about 10 s: what matters is that it outlasts several retries.
With back-off 0.5 s doubling to at most 4 s and 8 retries per update (about 25 s of patience), 10 s
exercises the same path as a minute does with the publisher's defaults raised accordingly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from tiled.client import from_uri
from tiled.server import SimpleTiledServer

from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.runtime.tiled.publisher import TiledPublisher

pytestmark = pytest.mark.slow

OUTAGE_S = 10.0


def test_tiled_down_then_back_the_publisher_catches_up_with_the_latest_state(tmp_path: Path) -> None:
    api_key = generate_api_key()
    data_dir = tmp_path / "tiled"
    with EmbeddedTiledServer(data_dir, api_key=api_key) as server:
        uri, port = server.uri, int(server.uri.rsplit(":", 1)[1])
        publisher = TiledPublisher(uri, api_key, max_retries=8, backoff_s=0.5, max_backoff_s=4.0)
        publisher.submit_array("outage", "object", np.zeros((8, 8)))
        publisher.submit_metadata("outage", {"iteration": 0})
        assert publisher.flush(30)
    written_before = publisher.written

    # The server is down: the solver goes on submitting, one update a second.
    down_since = time.monotonic()
    iteration = 0
    while time.monotonic() - down_since < OUTAGE_S:
        iteration += 1
        publisher.submit_array("outage", "object", np.full((8, 8), float(iteration)))
        publisher.submit_metadata("outage", {"iteration": iteration})
        time.sleep(1.0)
    assert publisher.written == written_before  # nothing got through while it was down
    assert publisher.retried > 0

    # tiled's own server class: EmbeddedTiledServer refuses a port that still has connections in
    # TIME_WAIT from the first run, which uvicorn (SO_REUSEADDR) binds without trouble.
    restarted = SimpleTiledServer(directory=data_dir.resolve(), api_key=api_key, port=port)
    try:
        assert publisher.flush(60)
        node = from_uri(uri, api_key=api_key)["reconstructions"]["outage"]
        landed, metadata = node["object"].read(), dict(node.metadata)
    finally:
        publisher.close()
        restarted.close()

    np.testing.assert_array_equal(landed, np.full((8, 8), float(iteration)))
    assert metadata["iteration"] == iteration
    assert publisher.failed == 0
    # Latest wins: the intermediate updates were superseded, not queued up.
    assert publisher.superseded >= iteration - 1
    assert publisher.written == written_before + 2

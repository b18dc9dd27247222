"""``phasestream bench viewer``: latency from a write to Tiled until the viewer's page stream has it.

One process holds an embedded Tiled server, the viewer and a client that reads the viewer's event stream
(``/events``) as a page does. Two kinds of update, ``updates`` of each, one at a time:

- metadata: ``update_metadata({"iteration": k})`` on the scan, until an event shows iteration ``k``;
- object: a ``size_px`` × ``size_px`` complex64 ``.write()``, until an event shows new amplitude and
  phase images and the amplitude PNG has been fetched.

Each is timed from just before the write call (which itself costs about 20 ms, notes/ecosystem.md §1.2)
on ``time.perf_counter()``; medians and 90th percentiles are quoted. A browser adds its JSON parse and
DOM update (about a millisecond); ``tests/test_viewer.py`` measures write → DOM in headless Chromium.
Everything shares one interpreter, as the in-process Tiled server in the tests does, so on a loaded
machine the figures include waits for the GIL.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tiled.client import from_uri

from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.apps.viewer.app import Viewer
from phasestream.errors import ConfigError
from phasestream.runtime.tiled.updates import RECONSTRUCTIONS_KEY

WAIT_S = 30.0


def _read_events(url: str, received: queue.SimpleQueue, stop: threading.Event) -> None:
    with httpx.stream("GET", f"{url}events", timeout=None) as response:
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data: "):
                received.put(json.loads(line[6:]))


def _wait(received: queue.SimpleQueue, done: Callable[[dict[str, Any]], bool], deadline_s: float) -> None:
    """Take events until one satisfies ``done`` (which may fetch what the event announces)."""
    while not done(received.get(timeout=max(0.0, deadline_s - time.perf_counter()))):
        pass


def _latency_s(
    write: Callable[[], None], received: queue.SimpleQueue, done: Callable[[dict[str, Any]], bool]
) -> float:
    while not received.empty():  # events from before this write
        received.get()
    started_s = time.perf_counter()
    write()
    _wait(received, done, started_s + WAIT_S)
    return time.perf_counter() - started_s


def _summary(latencies_s: list[float]) -> str:
    ms = sorted(latency * 1e3 for latency in latencies_s)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms (n={len(ms)})"


def bench_viewer(updates: int = 30, size_px: int = 256) -> dict[str, list[float]]:
    """Measure and print Tiled write → viewer event latencies; returns them in seconds per kind."""
    if updates < 1 or size_px < 2:
        raise ConfigError(f"need updates >= 1 and size >= 2 (got {updates}, {size_px})")
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    shape = (size_px, size_px)
    objects = [
        (rng.random(shape) * np.exp(2j * np.pi * rng.random(shape))).astype(np.complex64) for _ in "ab"
    ]
    api_key = generate_api_key()
    with (
        tempfile.TemporaryDirectory(prefix="psviewer-") as folder,
        EmbeddedTiledServer(Path(folder), api_key=api_key) as server,
    ):
        results = _measure(server, objects, updates)
    print(
        f"viewer latency, Tiled write → page event stream, {platform.node()} "
        f"({os.cpu_count()} CPUs, load {load_before:.1f}):"
    )
    print(f"  metadata (iteration)             {_summary(results['metadata'])}")
    print(f"  object {size_px}×{size_px} complex64 → PNGs  {_summary(results['object'])}")
    return results


def _measure(server: EmbeddedTiledServer, objects: list[np.ndarray], updates: int) -> dict[str, list[float]]:
    client = from_uri(server.uri, api_key=server.api_key)
    scan = client.create_container(RECONSTRUCTIONS_KEY).create_container(
        uuid.uuid4().hex, metadata={"iteration": 0}
    )
    node = scan.write_array(objects[0], key="object")
    results: dict[str, list[float]] = {"metadata": [], "object": []}
    with Viewer(server.uri, server.api_key) as viewer, httpx.Client() as fetcher:
        received: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        threading.Thread(target=_read_events, args=(viewer.url, received, stop), daemon=True).start()
        _wait(received, lambda state: "amplitude" in state["images"], time.perf_counter() + WAIT_S)
        for k in range(1, updates + 1):

            def shows_iteration(state: dict[str, Any], k: int = k) -> bool:
                return (state["scan"] or {}).get("iteration") == k

            def write_iteration(k: int = k) -> None:
                scan.update_metadata({"iteration": k}, drop_revision=True)

            results["metadata"].append(_latency_s(write_iteration, received, shows_iteration))
        for k in range(updates):
            shown = json.loads(viewer.view.snapshot()[1])["images"]

            def shows_new_images(state: dict[str, Any], shown: dict[str, Any] = shown) -> bool:
                images = state["images"]
                fresh = all(
                    images.get(name, {}).get("version") != shown[name]["version"]
                    for name in ("amplitude", "phase")
                )
                if fresh:  # and the page fetches the image
                    fetcher.get(f"{viewer.url}image/amplitude.png").raise_for_status()
                return fresh

            def write_object(k: int = k) -> None:
                node.write(objects[k % 2])

            results["object"].append(_latency_s(write_object, received, shows_new_images))
        stop.set()
    return results

"""``phasestream bench tpx3``: TPX3 events per second through the decoder and the frame builder."""

from __future__ import annotations

import statistics
import time

import numpy as np

from phasestream.formats.tpx3.decode import _PERIOD, Tpx3Decoder
from phasestream.formats.tpx3.frames import (
    FrameBuilder,
)
from phasestream.formats.tpx3.packets import CHIP_SIZE_PX, TICK_NS
from phasestream.simulators.timepix3 import encode_tpx3


def bench_tpx3(n_events: int = 10_000_000, repeats: int = 5, *, build_frames: bool = False) -> float:
    """Events per second through ``Tpx3Decoder`` (and the ``FrameBuilder`` with ``build_frames``) on one
    core, the median of ``repeats`` runs on one pre-encoded stream.

    The stream: uniformly random pixels at 50 million hits/s of detector time, starting 0.2 s before the
    34-bit pixel clock wraps, a TDC trigger every 1 ms (a scan position), a global-time pair first, and
    chunks of the largest size SERVAL can send. NumPy runs these kernels on one thread.
    """

    if n_events < 1 or repeats < 1:
        raise ValueError(f"n_events={n_events}, repeats={repeats}: both must be at least 1")
    rng = np.random.default_rng(0)
    ticks_per_event = 1e9 / 50e6 / TICK_NS
    start = _PERIOD - int(0.2e9 / TICK_NS)
    times = start + np.cumsum(rng.integers(0, int(2 * ticks_per_event) + 1, n_events))
    triggers = np.arange(start, int(times[-1]), int(1e6 / TICK_NS))
    stream = encode_tpx3(
        rng.integers(0, CHIP_SIZE_PX, n_events),
        rng.integers(0, CHIP_SIZE_PX, n_events),
        times * TICK_NS,
        np.full(n_events, 500.0),
        triggers * TICK_NS,
    )
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        decoder = Tpx3Decoder()
        decoded = [decoder.feed(stream), decoder.finish()]
        if build_frames:
            builder = FrameBuilder((CHIP_SIZE_PX, CHIP_SIZE_PX))
            for part in decoded:
                builder.add(part)
            builder.finish()
        seconds.append(time.perf_counter() - started)
    return n_events / statistics.median(seconds)

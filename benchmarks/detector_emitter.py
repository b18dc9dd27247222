"""The benchmarks' simulated detector: Stream V2 messages of sparse SELUN frames, and the emitter process
that sends them, scan after scan, with a positions batch after every 64 images as a motion controller would.

Frames: 192 × 192 uint16, independent Poisson counts of mean 0.05 per pixel, bslz4 (about 4.3 kB each).
Only the first ``UNIQUE_FRAMES`` frames are drawn and compressed (about 0.2 ms a frame, and
``sparse_image_messages`` would hold every raw frame, 7 GB for 10⁵); later messages reuse those payloads
under their own image ids. Each message is still its own 4.3 kB buffer, and decoding them is no faster
than decoding all-unique frames (measured: 26,800 against 27,100 frames/s over 30,000 messages).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from tqdm import tqdm

from phasestream.errors import PhasestreamError
from phasestream.formats.position_channel import encode_positions_end, position_messages
from phasestream.formats.stream_v2.encode import (
    bslz4_compress,
    channel_array,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
)
from phasestream.simulators.selun import SelunEmitter
from phasestream.simulators.sparse_frames import sparse_frames

SHAPE_PX = (192, 192)
MEAN_COUNTS_PER_PX = 0.05
SERIES_ID = 1
SERIES_UNIQUE_ID = "phasestream-bench-ingest"
UNIQUE_FRAMES = 4096
POSITIONS_PER_MESSAGE = 64
# A fixed series date makes the messages the same from one run of the bench to the next.
SERIES_DATE = datetime(2026, 1, 1, tzinfo=UTC)


class BenchError(PhasestreamError):
    """A benchmark run that went wrong: a process died or stalled, or frames went missing."""

    reason = "bench"


def bench_messages(n_frames: int, *, seed: int = 0, progress: bool = True) -> list[bytes]:
    """Stream V2 ``image`` messages with image ids 0..n-1 (see the module docstring on reuse)."""

    pool = sparse_frames(
        min(n_frames, UNIQUE_FRAMES), shape_px=SHAPE_PX, mean_counts_per_px=MEAN_COUNTS_PER_PX, seed=seed
    )
    payloads = [bslz4_compress(frame) for frame in pool]
    frame_time_s = 1e-5
    messages = []
    for image_id in tqdm(range(n_frames), desc="encode", unit="frame", disable=not progress, leave=False):
        index = image_id % len(pool)
        fields = image_fields(
            series_id=SERIES_ID,
            series_unique_id=SERIES_UNIQUE_ID,
            image_id=image_id,
            data=channel_array(pool[index], compressed=payloads[index]),
            frame_time_s=frame_time_s,
            count_time_s=frame_time_s,
            series_date=SERIES_DATE,
        )
        messages.append(encode_message(fields))
    return messages


def _start_message(n_frames: int, scan_uid: str) -> bytes:
    return encode_message(
        start_fields(
            series_id=SERIES_ID,
            series_unique_id=SERIES_UNIQUE_ID,
            shape_px=SHAPE_PX,
            dtype=np.uint16,
            number_of_images=n_frames,
            energy_kev=8.8,
            detector_distance_m=2.0,
            pixel_size_m=75e-6,
            count_time_s=1e-5,
            frame_time_s=1e-5,
            user_data={
                "scan_uid": scan_uid,
                "scan_shape": [n_frames],
                "positions_source": "position_channel",
            },
            arm_date=SERIES_DATE,
        )
    )


@dataclass(frozen=True)
class RawMessage:
    """A message as any sender may send it: any number of parts, on the data or the position socket."""

    parts: tuple[bytes, ...]
    on_positions: bool = False


@dataclass(frozen=True)
class Interleave:
    """What one scan's stream carries besides its start, images, positions and ends.

    ``announced_frames`` is the start's ``number_of_images``: the real frames plus any image ids that the
    mixed-in messages use. ``before_start`` goes out before the scan's start message; ``after_chunk[k]``
    right after chunk ``k`` (its ``POSITIONS_PER_MESSAGE`` images and their positions), in order.
    """

    announced_frames: int
    before_start: tuple[RawMessage, ...] = ()
    after_chunk: Mapping[int, tuple[RawMessage, ...]] = field(default_factory=dict)


def _emitter_main(
    images: list[bytes],
    data_endpoint: str,
    positions_endpoint: str,
    commands: Any,
    results: Any,
) -> None:
    """Serve scans on command: ``(scan_uid, n_frames, frames_per_s, interleave)`` sends one, as fast as
    ZeroMQ takes the frames when ``frames_per_s`` is None, else paced to that rate, with the messages of
    ``interleave`` (an ``Interleave`` or None) mixed in; ``None`` ends the process."""

    end = encode_message(end_fields(series_id=SERIES_ID, series_unique_id=SERIES_UNIQUE_ID))
    with _interleaving_emitter(data_endpoint, positions_endpoint) as emitter:
        results.put(("ready",))
        while (command := commands.get()) is not None:
            scan_uid, n_frames, frames_per_s, interleave = command
            interleave = interleave or Interleave(n_frames)
            # A raster of 100 nm steps; everything is encoded before the clock starts.
            index = np.arange(n_frames)
            positions_m = np.stack([index // 256, index % 256], axis=1) * 1e-7
            positions = list(position_messages(SERIES_ID, positions_m, POSITIONS_PER_MESSAGE))
            emitter.send_raw(interleave.before_start)
            emitter.emit_messages([_start_message(interleave.announced_frames, scan_uid)])
            first_sent = time.monotonic()
            for k, batch in enumerate(positions):
                if frames_per_s is not None:
                    # Pace by the schedule, not a fixed gap, so one late chunk does not slow the rest.
                    delay_s = first_sent + k * POSITIONS_PER_MESSAGE / frames_per_s - time.monotonic()
                    if delay_s > 0:
                        time.sleep(delay_s)
                chunk = images[k * POSITIONS_PER_MESSAGE : min((k + 1) * POSITIONS_PER_MESSAGE, n_frames)]
                emitter.emit_messages(chunk, [batch])
                emitter.send_raw(interleave.after_chunk.get(k, ()))
            last_sent = time.monotonic()
            emitter.emit_messages([end], [encode_positions_end(SERIES_ID)])
            results.put(("sent", scan_uid, first_sent, last_sent))


def _interleaving_emitter(data_endpoint: str, positions_endpoint: str) -> Any:
    """A ``SelunEmitter`` that also sends ``RawMessage``s (``send_raw``), of any number of parts (a DCU
    sends one) on either socket. Its class is made here: only the emitter's own process needs it."""

    class InterleavingEmitter(SelunEmitter):
        def send_raw(self, messages: Iterable[RawMessage]) -> None:
            for message in messages:
                socket = self._positions_socket if message.on_positions else self._data_socket
                socket.send_multipart(message.parts)

    return InterleavingEmitter(data_endpoint, positions_endpoint)


def start_emitter(messages: list[bytes], pipeline: Any) -> tuple[Any, Any, Any]:
    """Spawn the emitter process on the pipeline's detector sockets with its copy of ``messages``; returns
    (process, command queue, result queue) once it is ready."""
    context = multiprocessing.get_context("spawn")
    commands, results = context.Queue(), context.Queue()
    detector = pipeline.detector
    emitter = context.Process(
        target=_emitter_main,
        args=(messages, detector.data_endpoint, detector.positions_endpoint, commands, results),
        name="bench-ingest-emitter",
        daemon=True,
    )
    emitter.start()
    ready = results.get(timeout=120)
    if ready != ("ready",):
        raise BenchError(f"the emitter process did not start: {ready!r}")
    return emitter, commands, results


def stop_emitter(emitter: Any, commands: Any) -> None:
    """Ask the emitter process to end; terminate it when it does not within 15 s."""
    if emitter.is_alive():
        commands.put(None)
        emitter.join(timeout=15)
    if emitter.is_alive():
        emitter.terminate()
        emitter.join(timeout=5)

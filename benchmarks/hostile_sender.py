"""A hostile or broken sender on the detector's sockets, for ``phasestream bench soak``.

``HostileMix`` builds each scan's hostile messages (``Hostile``: garbage, truncated CBOR, a decompression
bomb, an image of another shape, duplicate and out-of-range image ids, a message of many empty parts,
positions of no series or with non-finite values) and, before each scan, a short series with an unsafe
scan uid and wrong-typed ``user_data``; ``REJECTIONS_PER_MESSAGE`` says what ingest's ``/metrics`` must
count for each.
"""

from __future__ import annotations

import math
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import bitshuffle
import cbor2
import numpy as np
from phasestream_bench.detector_emitter import (
    MEAN_COUNTS_PER_PX,
    POSITIONS_PER_MESSAGE,
    SERIES_DATE,
    SERIES_ID,
    SERIES_UNIQUE_ID,
    SHAPE_PX,
    Interleave,
    RawMessage,
)

from phasestream.errors import DetectorMessageError, PositionError
from phasestream.formats.position_channel import encode_positions, encode_positions_end
from phasestream.formats.stream_v2.encode import (
    BSLZ4_BLOCK_BYTES,
    bslz4_compress,
    channel_array,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
)
from phasestream.runtime.inbox import TOO_MANY_PARTS
from phasestream.simulators.sparse_frames import sparse_frames
from phasestream.stages.ingest.reasons import Refuse, Reject

HOSTILE_SERIES_ID = SERIES_ID + 1  # the short series with an unsafe uid, before each scan
ORPHAN_SERIES_ID = SERIES_ID + 2  # positions of a series whose start never comes
# A bomb declares a 1 GiB frame of uint32; it carries the bslz4 header that says so and a few blocks of
# zeros (under 1 kB), so ingest would allocate the GiB were it to decompress before checking.
BOMB_SHAPE_PX = (16384, 16384)
BOMB_BLOCKS = 8
WRONG_SHAPE_PX = (96, 96)  # as after a change of the detector's ROI mode
EMPTY_PARTS = 1024  # ingest's raw inputs take 16 parts at most
POOL_FRAMES = 16  # real-looking frames that duplicates, truncations and wrong shapes are made of
GARBAGE_MAX_BYTES = 256
# user_data fields of the wrong type: each is left out and counted (bad_user_data).
BAD_USER_DATA = {"scan_shape": True, "scan_extent_m": "0", "positions_source": 5}


class Hostile(StrEnum):
    """What a hostile or broken sender on the detector's sockets sends among a scan's messages."""

    GARBAGE = "garbage_bytes"
    TRUNCATED = "truncated_cbor"
    BOMB = "decompression_bomb"
    WRONG_SHAPE = "image_of_another_shape"
    DUPLICATE = "duplicate_image_id"
    OUT_OF_RANGE = "image_id_out_of_range"
    MANY_PARTS = "many_empty_parts"
    ORPHAN_POSITIONS = "positions_of_no_series"
    NON_FINITE_POSITIONS = "non_finite_positions"
    UNSAFE_START = "unsafe_start_series"  # once before each scan: a start would close the scan open


# Drawn at random among a scan's images; UNSAFE_START goes before each scan's start.
IN_SCAN = tuple(kind for kind in Hostile if kind is not Hostile.UNSAFE_START)
# Image ids that a scan's start announces for the hostile images that must be checked as its own.
RESERVED_IDS = (Hostile.BOMB, Hostile.WRONG_SHAPE)
# What ingest's /metrics counts for each hostile message, by reason of phasestream_messages_rejected_total.
REJECTIONS_PER_MESSAGE: dict[Hostile, dict[str, int]] = {
    Hostile.GARBAGE: {DetectorMessageError.reason: 1},
    Hostile.TRUNCATED: {DetectorMessageError.reason: 1},
    Hostile.BOMB: {Reject.FRAME_TOO_LARGE: 1},
    Hostile.WRONG_SHAPE: {Reject.WRONG_SHAPE: 1},
    Hostile.DUPLICATE: {Reject.DUPLICATE_FRAME: 1},
    Hostile.OUT_OF_RANGE: {Reject.INDEX_OUT_OF_RANGE: 1},
    Hostile.MANY_PARTS: {TOO_MANY_PARTS: 1},
    Hostile.ORPHAN_POSITIONS: {Refuse.ORPHAN_POSITIONS: 1},
    Hostile.NON_FINITE_POSITIONS: {PositionError.reason: 1},
    Hostile.UNSAFE_START: {Refuse.UNSAFE_SCAN_UID: 1, Refuse.BAD_USER_DATA: len(BAD_USER_DATA)},
}
# Counted only once they were held orphan_positions_max_age_s (ingest's default is 60 s): fewer at the end.
COUNTED_LATER = frozenset({Refuse.ORPHAN_POSITIONS})


class HostileMix:
    """Builds each scan's hostile messages as an ``Interleave`` for the emitter, and counts them by kind.

    ``fraction`` of a scan's messages are hostile: a scan of n frames gets n·F/(1 − F) of them, of kinds
    drawn uniformly from ``IN_SCAN``, each after a chunk of images drawn uniformly. Images that must be
    checked as the scan's own (a bomb, another shape) use image ids beyond the real frames that the start
    announces too; a duplicate repeats an image id already sent; an id out of range lies beyond those
    announced; non-finite positions name the next chunk's images, so that accepting them would displace
    the real positions.
    """

    def __init__(self, fraction: float, seed: int = 0) -> None:
        self.fraction = fraction
        self.sent: Counter[Hostile] = Counter()
        self._rng = np.random.default_rng(seed)
        pool = sparse_frames(POOL_FRAMES, shape_px=SHAPE_PX, mean_counts_per_px=MEAN_COUNTS_PER_PX, seed=seed)
        self._frames = [channel_array(frame, compressed=bslz4_compress(frame)) for frame in pool]
        small = [np.ascontiguousarray(frame[: WRONG_SHAPE_PX[0], : WRONG_SHAPE_PX[1]]) for frame in pool]
        self._small_frames = [channel_array(frame, compressed=bslz4_compress(frame)) for frame in small]
        self._bomb = channel_array(
            np.zeros((1, 1), np.uint32),
            compressed=bslz4_zeros_head(BOMB_SHAPE_PX, np.uint32, BOMB_BLOCKS),
            declared_shape=BOMB_SHAPE_PX,
        )

    def for_scan(self, scan_uid: str, n_frames: int) -> Interleave:
        n_chunks = math.ceil(n_frames / POSITIONS_PER_MESSAGE)
        n_hostile = round(n_frames * self.fraction / (1 - self.fraction))
        kinds = [IN_SCAN[i] for i in self._rng.integers(0, len(IN_SCAN), n_hostile)]
        chunks = np.sort(self._rng.integers(0, n_chunks, n_hostile)).tolist()
        ids = _HostileIds(n_frames, announced=n_frames + sum(kind in RESERVED_IDS for kind in kinds))
        after_chunk: dict[int, list[RawMessage]] = defaultdict(list)
        for kind, chunk in zip(kinds, chunks, strict=True):
            after_chunk[chunk].append(self._message(kind, chunk, ids))
        self.sent.update(kinds)
        self.sent[Hostile.UNSAFE_START] += 1
        return Interleave(
            ids.announced,
            before_start=unsafe_series(scan_uid),
            after_chunk={chunk: tuple(messages) for chunk, messages in after_chunk.items()},
        )

    def expected_rejections(self) -> Counter[str]:
        """What ingest should have counted by reason for the messages built so far."""
        expected: Counter[str] = Counter()
        for kind, n in self.sent.items():
            for reason, per_message in REJECTIONS_PER_MESSAGE[kind].items():
                expected[reason] += n * per_message
        return expected

    def _message(self, kind: Hostile, chunk: int, ids: _HostileIds) -> RawMessage:
        rng = self._rng
        sent = min(ids.real, (chunk + 1) * POSITIONS_PER_MESSAGE)  # real images sent before this one
        if kind is Hostile.GARBAGE:
            return RawMessage((rng.bytes(int(rng.integers(1, GARBAGE_MAX_BYTES))),))
        if kind is Hostile.TRUNCATED:
            whole = self._image(int(rng.integers(0, sent)), self._pooled(self._frames))
            return RawMessage((whole[: int(rng.integers(1, len(whole)))],))
        if kind is Hostile.BOMB:
            return RawMessage((self._image(ids.reserved(), self._bomb),))
        if kind is Hostile.WRONG_SHAPE:
            return RawMessage((self._image(ids.reserved(), self._pooled(self._small_frames)),))
        if kind is Hostile.DUPLICATE:
            return RawMessage((self._image(int(rng.integers(0, sent)), self._pooled(self._frames)),))
        if kind is Hostile.OUT_OF_RANGE:
            return RawMessage((self._image(ids.out_of_range(), self._pooled(self._frames)),))
        if kind is Hostile.MANY_PARTS:
            return RawMessage((b"",) * EMPTY_PARTS)
        first = sent if sent < ids.real else chunk * POSITIONS_PER_MESSAGE
        image_ids = np.arange(first, min(first + POSITIONS_PER_MESSAGE, ids.real))
        positions_m = rng.uniform(-1e-6, 1e-6, (len(image_ids), 2))
        if kind is Hostile.ORPHAN_POSITIONS:
            message = encode_positions(ORPHAN_SERIES_ID, image_ids, positions_m)
        else:
            message = non_finite_positions(image_ids, positions_m, rng)
        return RawMessage((message,), on_positions=True)

    def _pooled(self, frames: list[cbor2.CBORTag]) -> cbor2.CBORTag:
        return frames[int(self._rng.integers(0, len(frames)))]

    @staticmethod
    def _image(image_id: int, data: cbor2.CBORTag) -> bytes:
        fields = image_fields(
            series_id=SERIES_ID,
            series_unique_id=SERIES_UNIQUE_ID,
            image_id=image_id,
            data=data,
            frame_time_s=1e-5,
            count_time_s=1e-5,
            series_date=SERIES_DATE,
        )
        return encode_message(fields)


@dataclass
class _HostileIds:
    """Image ids for one scan's hostile images: ids announced beyond the real frames, each used once, and
    distinct ids beyond all those announced."""

    real: int
    announced: int
    _next_reserved: int = field(default=-1, init=False)
    _next_beyond: int = field(default=-1, init=False)

    def reserved(self) -> int:
        self._next_reserved = max(self._next_reserved + 1, self.real)
        return self._next_reserved

    def out_of_range(self) -> int:
        self._next_beyond = max(self._next_beyond + 1, self.announced)
        return self._next_beyond


def bslz4_zeros_head(shape: tuple[int, ...], dtype: Any, blocks: int) -> bytes:
    """The start of a genuine bslz4 stream (HDF5 framing) of an all-zero frame of ``shape``: the header
    that declares its full size, then ``blocks`` compressed blocks of zeros."""
    dtype = np.dtype(dtype)
    elements = BSLZ4_BLOCK_BYTES // dtype.itemsize
    block = bitshuffle.compress_lz4(np.zeros(elements, dtype), elements).tobytes()
    return struct.pack(">QI", math.prod(shape) * dtype.itemsize, BSLZ4_BLOCK_BYTES) + block * blocks


def non_finite_positions(image_ids: np.ndarray, positions_m: np.ndarray, rng: np.random.Generator) -> bytes:
    """A position-channel ``positions`` message for the real series in which some values are NaN or ±inf
    (``encode_positions`` refuses to write one)."""
    values = positions_m.copy()
    bad = rng.integers(0, values.size, max(1, values.size // 8))
    values.flat[bad] = rng.choice([np.nan, np.inf, -np.inf], len(bad))
    return cbor2.dumps(
        {
            "type": "positions",
            "series_id": SERIES_ID,
            "image_id": image_ids.tolist(),
            "y_m": values[:, 0].tolist(),
            "x_m": values[:, 1].tolist(),
        }
    )


def unsafe_series(scan_uid: str) -> tuple[RawMessage, ...]:
    """A short series of one announced image and none sent, whose start names a scan uid outside the
    run's folders and has wrong-typed user_data; its ends on both sockets close it at once."""
    unique_id = f"{SERIES_UNIQUE_ID}-hostile-{scan_uid}"
    start = start_fields(
        series_id=HOSTILE_SERIES_ID,
        series_unique_id=unique_id,
        shape_px=SHAPE_PX,
        dtype=np.uint16,
        number_of_images=1,
        energy_kev=8.8,
        detector_distance_m=2.0,
        pixel_size_m=75e-6,
        count_time_s=1e-5,
        frame_time_s=1e-5,
        user_data={"scan_uid": f"../{scan_uid}", **BAD_USER_DATA},
        arm_date=SERIES_DATE,
    )
    end = end_fields(series_id=HOSTILE_SERIES_ID, series_unique_id=unique_id)
    return (
        # The position channel's end first: the series closes as soon as the detector's end arrives.
        RawMessage((encode_positions_end(HOSTILE_SERIES_ID),), on_positions=True),
        RawMessage((encode_message(start),)),
        RawMessage((encode_message(end),)),
    )

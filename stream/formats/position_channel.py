"""The scan-position channel: probe positions on their own ZeroMQ socket, joined to frames by image id.

A detector stream carries no positions, so the emitter (or a motion controller bridge) sends them
separately as CBOR maps, in batches because positions are tiny next to frames:

- ``{"type": "positions", "series_id": int, "image_id": [int...], "y_m": [float...], "x_m": [float...]}``
- ``{"type": "end", "series_id": int}``

Structural problems (not CBOR, not a map, unknown type, missing or mistyped field) raise
``DetectorMessageError``; impossible positions (lengths that differ, non-finite or duplicated values)
raise ``PositionError`` naming the image id.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2
import numpy as np

from phasestream.errors import DetectorMessageError, PositionError
from phasestream.formats.stream_v2.decode import INTEGER_LIMIT, shown

POSITIONS_BATCH_SIZE = 64


class PositionMessageType(StrEnum):
    POSITIONS = "positions"
    END = "end"


@dataclass(frozen=True, slots=True)
class PositionBatch:
    series_id: int
    image_ids: np.ndarray  # (n,) int64
    positions_m: np.ndarray  # (n, 2) float64 probe centres (y, x) relative to the scan centre


@dataclass(frozen=True, slots=True)
class PositionsEnd:
    series_id: int


def encode_positions(series_id: int, image_ids: Sequence[int] | np.ndarray, positions_m: np.ndarray) -> bytes:
    """One ``positions`` message; ``positions_m`` is (n, 2) in metres, y then x."""
    ids = np.asarray(image_ids, dtype=np.int64)
    positions = np.asarray(positions_m, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2 or len(positions) != len(ids):
        raise PositionError(
            f"{len(ids)} image ids but positions of shape {positions.shape}: pass one (y, x) row per image id"
        )
    _check_finite(ids, positions)
    return cbor2.dumps(
        {
            "type": PositionMessageType.POSITIONS.value,
            "series_id": series_id,
            "image_id": ids.tolist(),
            "y_m": positions[:, 0].tolist(),
            "x_m": positions[:, 1].tolist(),
        }
    )


def encode_positions_end(series_id: int) -> bytes:
    return cbor2.dumps({"type": PositionMessageType.END.value, "series_id": series_id})


def position_messages(
    series_id: int, positions_m: np.ndarray, batch_size: int = POSITIONS_BATCH_SIZE, first_image_id: int = 0
) -> Iterator[bytes]:
    """``positions`` messages for consecutive images, ``batch_size`` per message (no end message)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: use at least 1")
    for start in range(0, len(positions_m), batch_size):
        batch = positions_m[start : start + batch_size]
        ids = np.arange(first_image_id + start, first_image_id + start + len(batch))
        yield encode_positions(series_id, ids, batch)


def decode_positions(buf: bytes | bytearray | memoryview) -> PositionBatch | PositionsEnd:
    try:
        message = cbor2.loads(buf)
    except cbor2.CBORDecodeError as error:
        raise DetectorMessageError(
            f"position message of {len(buf)} bytes is not valid CBOR ({error}); "
            "is something other than the position channel connected to this socket?"
        ) from error
    if type(message) is not dict:
        raise DetectorMessageError(
            f"position message is a CBOR {type(message).__name__}, not a map with a 'type' field"
        )
    kind = message.get("type")
    series_id = message.get("series_id")
    if kind not in tuple(PositionMessageType):
        raise DetectorMessageError(
            f"unknown position message type {shown(kind)}: "
            f"known types are {[t.value for t in PositionMessageType]}"
        )
    if type(series_id) is not int or abs(series_id) >= INTEGER_LIMIT:
        raise DetectorMessageError(
            f"position message series_id={shown(series_id)}: expected an integer of at most 64 bits"
        )
    if kind == PositionMessageType.END:
        return PositionsEnd(series_id=series_id)
    return PositionBatch(series_id=series_id, **_batch_arrays(message))


def _batch_arrays(message: dict[str, Any]) -> dict[str, np.ndarray]:
    try:
        columns = {name: message[name] for name in ("image_id", "y_m", "x_m")}
    except KeyError as missing:
        raise DetectorMessageError(
            f"positions message lacks the field {missing.args[0]!r}; it needs image_id, y_m and x_m lists"
        ) from None
    for name, column in columns.items():
        if type(column) is not list:
            raise DetectorMessageError(f"positions field {name!r} is {type(column).__name__}, not a list")
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise PositionError(
            f"positions message lists differ in length {lengths}: send one y and x per image id"
        )
    if not all(type(value) is int and value >= 0 for value in columns["image_id"]):
        raise DetectorMessageError(
            f"positions image_id {_head(columns['image_id'])}: expected non-negative integers"
        )
    for name in ("y_m", "x_m"):
        # Numbers only: NumPy would read the string "1e-6" (or b"1e-6") as a position.
        if not all(type(value) is float or type(value) is int for value in columns[name]):
            raise DetectorMessageError(
                f"positions {name} {_head(columns[name])} holds a value that is not a number: send numbers "
                "in metres"
            )
    try:
        ids = np.array(columns["image_id"], dtype=np.int64)
        positions = np.ascontiguousarray(np.array([columns["y_m"], columns["x_m"]], dtype=np.float64).T)
    except (TypeError, ValueError, OverflowError) as error:
        raise DetectorMessageError(
            f"positions message holds a value that is not a number ({error}): image_id must be integers "
            "below 2**63, y_m and x_m numbers in metres"
        ) from None
    _check_finite(ids, positions)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise PositionError(
            f"positions message repeats image_id {unique[counts > 1].tolist()}: send each position once"
        )
    return {"image_ids": ids, "positions_m": positions}


def _check_finite(ids: np.ndarray, positions: np.ndarray) -> None:
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise PositionError(
            f"position of image_id {int(ids[first])} is not finite (y, x = {positions[first].tolist()} m); "
            f"{int(bad.sum())} such positions in this batch: fix the position source"
        )


def _head(values: list[Any]) -> str:
    return f"{shown(values[:8], limit=200)}{'…' if len(values) > 8 else ''}"

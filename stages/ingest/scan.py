"""What ingest holds of a scan while it runs: the open scan (frames waiting for their positions and the
reverse, the image ids seen, the batches sent), the slabs frames are copied into, and the positions of a
series whose start message has not come yet."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from phasestream.formats.position_channel import PositionBatch, PositionsEnd
from phasestream.runtime.messages import ScanStart


@dataclass
class HeldPositions:
    """Position messages of a series whose start message has not come (yet)."""

    since_s: float  # time.monotonic() of the first
    messages: list[PositionBatch | PositionsEnd] = field(default_factory=list)
    weight: int = 0  # the positions in them, each message at least one: what max_orphan_positions bounds


class Slab:
    """A batch's worth of rows that frames are copied into as they arrive: while the frame is still in
    cache that copy is cheap, and a batch that is exactly one full slab in order goes out as it is, which
    saves ``np.stack`` (about 5 µs a frame at 192 × 192 uint16)."""

    __slots__ = ("filled", "frames")

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.frames = np.empty((rows, *shape), dtype)
        self.filled = 0

    def take(self, frame: np.ndarray) -> int:
        row = self.filled
        self.frames[row] = frame
        self.filled += 1
        return row


@dataclass
class OpenScan:
    start: ScanStart
    series_id: int
    shape: tuple[int, ...]  # the detector's frame, before the crop
    dtype: np.dtype
    slab: Slab
    crop: tuple[slice, slice] | None = None  # the window kept of each frame; None keeps all
    mask: np.ndarray | None = None  # bad pixels of the cropped frame (True = not measured)
    # A frame waiting for its position: where it lies, and time.time() when it arrived.
    frames: dict[int, tuple[Slab, int, float]] = field(default_factory=dict)
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)
    ready: list[int] = field(default_factory=list)
    seen_frames: set[int] = field(default_factory=set)
    # Every image id that got a position: a joined position leaves ``positions``, a repeat must still show.
    seen_positions: set[int] = field(default_factory=set)
    forwarded: int = 0
    seq: int = 0
    last_frame_s: float = 0.0  # time.monotonic() of the last frame, or of the start message before one
    detector_ended_s: float | None = None
    positions_ended: bool = False


def gather_frames(entries: list[tuple[Slab, int, float]]) -> np.ndarray:
    """The batch's frames as one array: a full slab filled in index order as it is, else a copy.

    A full slab is never written again, so it can leave without a copy.
    """
    slab = entries[0][0]
    if len(entries) == len(slab.frames) and all(
        entry[0] is slab and entry[1] == row for row, entry in enumerate(entries)
    ):
        return slab.frames
    return np.stack([entry_slab.frames[row] for entry_slab, row, _ in entries])

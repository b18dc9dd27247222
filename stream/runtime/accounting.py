"""Prove from a ScanEnd's accounting that every frame the detector announced is accounted for.

The source stage must explain each announced frame: forwarded, rejected for a reason, or missing
(never arrived). Between stages, what one stage sent the next must have received.

When a worker dies mid-scan the frames it held are gone, and so are its counts. The last stage then
finds them *by index* (``audit_lost_frames``): every stage leaves in the ScanEnd a ledger of the frame
indices that came to rest with it (received, not sent on: used by a solver, binned into another frame,
rejected), and the source a ledger of what it sent. Forwarded minus rested is what was lost; it is counted
as ``frames_lost`` and the per-hop check becomes the end-to-end one: the source's frames sent equal the
frames that rested in every later stage plus the frames lost.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from enum import StrEnum

import numpy as np

REJECTED_PREFIX = "rejected_"
FRAMES_LOST = "frames_lost"
SCAN_ENDS_MISSING = "scan_ends_missing"
RESTARTED_MID_SCAN = "restarted_mid_scan"
# Frames the detector did not announce: a second copy of a frame counted once elsewhere, and images
# numbered beyond number_of_images. They are rejected and counted, but are not among the announced frames.
_NOT_ANNOUNCED = ("rejected_duplicate_frame", "rejected_image_id_out_of_range")
# Ledger entries ride in ScanEnd.accounting beside the counts, as ``{first index: run length}``.
LEDGER_MARK = "#"
# A bitmap of frame indices costs one byte per index up to the largest: beyond this the ledger is off.
MAX_LEDGER_INDEX = 1 << 27


class LedgerKind(StrEnum):
    SENT = "sent"  # the source: every frame index it sent downstream
    RESTED = "rested"  # any later stage: indices received and not sent on


def ledger_label(worker_label: str, kind: LedgerKind) -> str:
    return f"{worker_label}{LEDGER_MARK}{kind.value}"


def is_ledger_label(label: str) -> bool:
    return LEDGER_MARK in label


def counts_only(accounting: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The accounting without ledger entries: what people, logs and Tiled metadata see."""
    return {label: counts for label, counts in accounting.items() if not is_ledger_label(label)}


class FrameIndexSet:
    """A set of non-negative frame indices as a growable bitmap: adding a batch of 64 costs about 2 µs."""

    def __init__(self) -> None:
        self._bits = np.zeros(0, dtype=bool)
        self.overflowed = False  # an index beyond MAX_LEDGER_INDEX (or negative) was seen: not exact

    def add(self, indices: list[int]) -> None:
        if not indices:
            return
        array = np.asarray(indices, dtype=np.int64)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= MAX_LEDGER_INDEX:
            self.overflowed = True
            return
        if high >= len(self._bits):
            grown = np.zeros(max(high + 1, 2 * len(self._bits), 1024), dtype=bool)
            grown[: len(self._bits)] = self._bits
            self._bits = grown
        self._bits[array] = True

    def __len__(self) -> int:
        return int(np.count_nonzero(self._bits))

    def indices(self) -> np.ndarray:
        return np.flatnonzero(self._bits)

    def difference(self, other: FrameIndexSet) -> FrameIndexSet:
        result = FrameIndexSet()
        result._bits = self._bits.copy()
        overlap = min(len(self._bits), len(other._bits))
        result._bits[:overlap] &= ~other._bits[:overlap]
        result.overflowed = self.overflowed or other.overflowed
        return result

    def update(self, other: FrameIndexSet) -> None:
        if len(other._bits) > len(self._bits):
            self._bits, other_bits = other._bits.copy(), self._bits
        else:
            other_bits = other._bits
        self._bits[: len(other_bits)] |= other_bits
        self.overflowed |= other.overflowed

    def runs(self) -> list[tuple[int, int]]:
        """``(first, last)`` inclusive runs of consecutive indices, in order."""
        indices = self.indices()
        if not len(indices):
            return []
        breaks = np.flatnonzero(np.diff(indices) != 1)
        firsts = np.concatenate([indices[:1], indices[breaks + 1]])
        lasts = np.concatenate([indices[breaks], indices[-1:]])
        return [(int(f), int(la)) for f, la in zip(firsts, lasts, strict=True)]

    def to_ledger(self) -> dict[str, int]:
        return {str(first): last - first + 1 for first, last in self.runs()}

    @classmethod
    def from_ledger(cls, ledger: dict[str, int]) -> FrameIndexSet:
        result = cls()
        for first, length in ledger.items():
            result.add(list(range(int(first), int(first) + length)))
        return result


def audit_lost_frames(ledgers: dict[str, dict[str, int]]) -> FrameIndexSet | None:
    """Frames the source sent that rested nowhere: held by a worker that died, or in its queue.

    ``ledgers`` maps ledger labels to runs. None when the source left no ledger (a source that sent no
    frames, or ledgers over ``MAX_LEDGER_INDEX``): then the counts alone must do.
    """
    sent = [runs for label, runs in ledgers.items() if label.endswith(LEDGER_MARK + LedgerKind.SENT)]
    if not sent:
        return None
    forwarded, rested = FrameIndexSet(), FrameIndexSet()
    for runs in sent:
        forwarded.update(FrameIndexSet.from_ledger(runs))
    for label, runs in ledgers.items():
        if label.endswith(LEDGER_MARK + LedgerKind.RESTED):
            rested.update(FrameIndexSet.from_ledger(runs))
    return forwarded.difference(rested)


def per_stage(accounting: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Sum the counts of all workers of each stage (keys in accounting are ``stage.worker``)."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for label, counts in counts_only(accounting).items():
        stage = label.rsplit(".", 1)[0]
        for key, value in counts.items():
            totals[stage][key] += value
    return {stage: dict(counts) for stage, counts in totals.items()}


def unaccounted_frames(frames_sent: int, accounting: dict[str, dict[str, int]]) -> list[str]:
    """Every discrepancy, in words; an empty list means every frame is accounted for.

    Frames lost by a worker that died are accounted for (counted by index) but are not silently fine:
    callers that need a loss-free scan also check ``frames_lost(accounting) == 0``.
    """
    stages = per_stage(accounting)
    if not stages:
        return ["no stage reported any accounting"]
    order = list(stages)
    problems = []
    source = stages[order[0]]
    rejected = sum(v for k, v in source.items() if k.startswith(REJECTED_PREFIX) and k not in _NOT_ANNOUNCED)
    explained = source.get("frames_forwarded", 0) + rejected + source.get("missing_frames", 0)
    if explained != frames_sent:
        problems.append(
            f"{order[0]}: the detector announced {frames_sent} frames, but {explained} are explained "
            f"(forwarded + rejected + missing)"
        )
    lost = frames_lost(accounting)
    disturbed = (SCAN_ENDS_MISSING, RESTARTED_MID_SCAN)
    if lost or any(counts.get(key) for counts in stages.values() for key in disturbed):
        # A dead worker took its counts with it, so hops no longer match one by one; the whole chain must.
        sent = source.get("frames_sent", 0)
        rested = sum(
            counts.get("frames_received", 0) - counts.get("frames_sent", 0)
            for stage, counts in stages.items()
            if stage != order[0]
        )
        if rested + lost != sent:
            problems.append(
                f"{order[0]} sent {sent} frames, but {rested} came to rest in later stages and {lost} "
                "were lost by index"
            )
        return problems
    for upstream, downstream in itertools.pairwise(order):
        sent = stages[upstream].get("frames_sent", 0)
        received = stages[downstream].get("frames_received", 0)
        if sent != received:
            problems.append(f"{upstream} sent {sent} frames but {downstream} received {received}")
    return problems


def frames_lost(accounting: dict[str, dict[str, int]]) -> int:
    """Frames a dead worker held, counted by index at the end of the chain (0 for a clean scan)."""
    return sum(counts.get(FRAMES_LOST, 0) for counts in counts_only(accounting).values())

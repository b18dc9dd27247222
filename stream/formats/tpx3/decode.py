"""Decode Timepix3 raw data with whole-array NumPy: chunks of 64-bit words into pixel hits, TDC triggers and
global times on one extended timeline. The format: ``phasestream.formats.tpx3.packets``.

**Time extension.** Every timestamped word (pixel, TDC, global-time low) is reduced to its time modulo 2³⁴
ticks and the words are chained in stream order: each word's extended time is the previous one's plus the
difference of their raw values folded into [−2³³, 2³³). That is exact while consecutive timestamped words
are less than 13.4 s apart, which any running detector satisfies (readout disorder is below milliseconds),
and it needs no sequential loop: the extended times are the raw ones plus the running sum of the rare
folds. Pixel, TDC and global times thus share one timeline. The first global-time pair (``0x44`` then
``0x45``) fixes the absolute epoch, if it comes before this decoder has returned any time.

**Speed.** The words are processed in blocks that stay in the L2 cache (a NumPy operation on a 32 k-word
block costs about 0.25 ns a word there, against 0.6–1.4 ns a word on arrays that spill out of it); the few
non-pixel words of a block are handled as small arrays. ``bench_tpx3`` measures it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from phasestream.errors import DetectorMessageError
from phasestream.formats.tpx3.chunks import frame_fast, frame_walk
from phasestream.formats.tpx3.packets import (
    PIXEL_TIME_BITS,
    TDC_FINE_STEPS,
    TDC_TIME_BITS,
    TICK_NS,
    TOA_CLOCK_TICKS,
    GlobalTime,
    PacketType,
    PixelEvents,
    TdcEdge,
    TdcEvents,
    Tpx3Decoded,
    Tpx3Problem,
)

_PERIOD = 1 << PIXEL_TIME_BITS
_HALF_PERIOD = 1 << (PIXEL_TIME_BITS - 1)
_PERIOD_MASK = _PERIOD - 1
_BLOCK_WORDS = 1 << 15


# ---- the decoder ------------------------------------------------------------------------------------------
# Word kinds, indices into _KIND_NAMES: plain ints, as the per-block code compares them often and an IntEnum
# member lookup costs about a microsecond. Chunk headers are found by position, not by their top byte.
_UNKNOWN, _TDC, _GLOBAL_LOW, _GLOBAL_HIGH, _SPIDR_CONTROL, _TPX3_CONTROL = range(6)
_INTEGRATED_TOT, _PIXEL, _HEADER = range(6, 9)
_KIND_NAMES = (
    "unknown",
    "tdc",
    "global_time_low",
    "global_time_high",
    "spidr_control",
    "tpx3_control",
    "pixel_integrated_tot",
    "pixels",
    "chunks",
)
_PIXEL_NIBBLE = np.uint64(PacketType.PIXEL_TOA)


def _kind_of_top_byte() -> np.ndarray:
    by_nibble: dict[int, int] = {
        PacketType.PIXEL_TOA: _PIXEL,
        PacketType.PIXEL_INTEGRATED_TOT: _INTEGRATED_TOT,
        PacketType.SPIDR_CONTROL: _SPIDR_CONTROL,
        PacketType.TPX3_CONTROL: _TPX3_CONTROL,
    }
    kinds = np.array([by_nibble.get(top >> 4, _UNKNOWN) for top in range(256)], np.uint8)
    kinds[[(PacketType.TDC << 4) | edge for edge in TdcEdge]] = _TDC
    kinds[GlobalTime.LOW], kinds[GlobalTime.HIGH] = _GLOBAL_LOW, _GLOBAL_HIGH
    return kinds


_KIND_OF_TOP_BYTE = _kind_of_top_byte()


class _FeedOutput:
    """One feed's results, written in place: the pixel arrays are sized for every word of the feed."""

    def __init__(self, n_words: int) -> None:
        self.address = np.empty(n_words, np.uint16)
        self.tot = np.empty(n_words, np.uint16)
        self.toa = np.empty(n_words, np.int64)
        self.chip: np.ndarray | None = None  # per pixel, only when chunks come from several chips
        self.n_pixels = 0
        self.tdc_words: list[np.ndarray] = []
        self.tdc_ticks: list[np.ndarray] = []
        self.global_ticks: list[int] = []
        self.counts: Counter[str] = Counter()
        self.unknown: Counter[int] = Counter()  # top byte → words
        self.unknown_example: dict[int, int] = {}
        self.problems: list[DetectorMessageError] = []
        # Set when the first global-time pair fixes the epoch: the shift, and how many pixels and TDC
        # arrays were extended before it (they move; later blocks are extended on the new epoch already).
        self.epoch_shift_ticks = 0
        self.pixels_before_epoch = 0
        self.tdc_arrays_before_epoch = 0


class Tpx3Decoder:
    """Streaming decoder: ``feed`` any slices of the byte stream, ``finish`` at its end.

    A chunk cut by the end of a ``feed`` waits for the next one. Problems (unknown packet types, truncated
    chunks, bytes outside any chunk) never stop decoding: they come back as ``DetectorMessageError``s in
    ``Tpx3Decoded.problems``, each naming the value, and everything else in the data is decoded.
    """

    def __init__(self, block_words: int = _BLOCK_WORDS) -> None:
        if block_words < 1:
            raise ValueError(f"block_words={block_words}: use at least 1")
        self._block_words = block_words
        self._pending = b""
        self._stream_offset = 0  # bytes of the stream before ``_pending``, for messages
        self._last_raw: int | None = None  # raw time of the last timestamped word
        self._last_ext = 0
        self._returned_times = False
        self._epoch_fixed = False
        self._global_low: tuple[int, int] | None = None  # (TimeStampLow, its extended ticks)

    def feed(self, data: bytes | bytearray | memoryview) -> Tpx3Decoded:
        buffer = b"".join((self._pending, data)) if self._pending else bytes(data)
        return self._decode(buffer, final=False)

    def finish(self) -> Tpx3Decoded:
        """Decode what is left; a chunk the stream cut short is reported and its whole words decoded."""
        buffer, self._pending = self._pending, b""
        return self._decode(buffer, final=True)

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def _decode(self, buffer: bytes, final: bool) -> Tpx3Decoded:
        problems: list[DetectorMessageError] = []
        framed = frame_fast(buffer, final)
        if framed is None:
            framed = frame_walk(buffer, final, self._stream_offset, problems)
        words, header_index, header_chip, consumed = framed
        self._pending = buffer[consumed:]
        self._stream_offset += consumed
        out = _FeedOutput(len(words))
        out.problems += problems
        out.counts[_KIND_NAMES[_HEADER]] += len(header_index)
        if len(words):
            self._decode_words(words, header_index, header_chip, out)
        return self._assemble(out, header_chip)

    # ---- words → fields --------------------------------------------------------------------------------
    def _decode_words(
        self, words: np.ndarray, header_index: np.ndarray, header_chip: np.ndarray, out: _FeedOutput
    ) -> None:
        n = len(words)
        block = min(self._block_words, n)
        scratch = np.empty(block, np.uint64), np.empty(block, np.int64), np.empty(block, np.int64)
        pixel_mask = np.empty(block, bool)
        word_chip = None
        if (header_chip != header_chip[0]).any():
            word_chip = np.repeat(header_chip, np.diff(header_index, append=n))
            out.chip = np.empty(n, np.uint8)
        for start in range(0, n, block):
            stop = min(start + block, n)
            blk, m, k = words[start:stop], stop - start, out.n_pixels
            temp, steps, is_pixel = scratch[0][:m], scratch[1][:m], pixel_mask[:m]
            np.right_shift(blk, np.uint64(60), out=temp)
            np.equal(temp, _PIXEL_NIBBLE, out=is_pixel)
            headers = header_index[header_index.searchsorted(start) : header_index.searchsorted(stop)] - start
            is_pixel[headers] = False
            n_pixels = int(np.count_nonzero(is_pixel))
            everything_pixels = n_pixels == m
            raw = out.toa[k : k + m] if everything_pixels else scratch[2][:m]
            _raw_pixel_time(blk, raw, temp, steps.view(np.uint64))
            if everything_pixels:
                self._unwrap(raw, steps)
            else:
                at, kinds, anchor_words, timed = self._place_others(blk, is_pixel, headers, raw, out)
                # A block of headers and untimed words has nothing to extend (a high word needs no time).
                extended = self._unwrap(raw, steps) if timed else raw
                out.toa[k : k + n_pixels] = extended[is_pixel]
                self._anchors(extended, at, kinds, anchor_words, out, k + n_pixels)
            pixels = blk if everything_pixels else blk[is_pixel]
            address = temp[:n_pixels]
            np.right_shift(pixels, np.uint64(44), out=address)
            # The u16 cast keeps bits 44–59, PixAddr: it drops the 0xb nibble above.
            np.copyto(out.address[k : k + n_pixels], address, casting="unsafe")
            np.right_shift(pixels, np.uint64(20), out=address)
            np.bitwise_and(address, np.uint64(0x3FF), out=address)
            np.copyto(out.tot[k : k + n_pixels], address, casting="unsafe")
            if word_chip is not None and out.chip is not None:
                chips = word_chip[start:stop]
                out.chip[k : k + n_pixels] = chips if everything_pixels else chips[is_pixel]
            out.n_pixels += n_pixels
        out.counts[_KIND_NAMES[_PIXEL]] += out.n_pixels

    def _place_others(
        self, blk: np.ndarray, is_pixel: np.ndarray, headers: np.ndarray, raw: np.ndarray, out: _FeedOutput
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """Classify and count the non-pixel words of a block and put their times into ``raw``, so the time
        chain runs through them in stream order: a TDC or global-low word carries its own time, any other
        word repeats the time before it. Returns the positions, kinds and words of the TDC and global-time
        words, and whether any word of the block carries a time."""
        at = np.flatnonzero(~is_pixel)
        words = blk[at]
        kinds = _KIND_OF_TOP_BYTE[(words >> np.uint64(56)).astype(np.uint8)]
        kinds[np.searchsorted(at, headers)] = _HEADER
        per_kind = np.bincount(kinds, minlength=len(_KIND_NAMES)).tolist()
        for kind in (_TDC, _GLOBAL_LOW, _GLOBAL_HIGH, _SPIDR_CONTROL, _TPX3_CONTROL, _INTEGRATED_TOT):
            out.counts[_KIND_NAMES[kind]] += per_kind[kind]
        if per_kind[_UNKNOWN]:
            unknown = kinds == _UNKNOWN
            for word in words[unknown].tolist():
                out.unknown[word >> 56] += 1
                out.unknown_example.setdefault(word >> 56, word)
        stamped = (kinds == _TDC) | (kinds == _GLOBAL_LOW)
        stamped_at, stamped_words, stamped_kinds = at[stamped], words[stamped], kinds[stamped]
        raw[stamped_at] = _anchor_raw_time(stamped_words, stamped_kinds)
        untimed = at[~stamped].tolist()
        if untimed and untimed[0] == 0:
            # The block starts with an untimed word: it takes the time before the block, or at the very
            # start of the stream the block's first time.
            if self._last_raw is not None:
                raw[0] = self._last_raw
            else:
                first_pixel = int(is_pixel.argmax()) if is_pixel.any() else len(raw)
                first_stamp = int(stamped_at[0]) if len(stamped_at) else len(raw)
                raw[0] = raw[min(first_pixel, first_stamp, len(raw) - 1)]
        for position in untimed:
            if position:
                raw[position] = raw[position - 1]
        keep = stamped | (kinds == _GLOBAL_HIGH)
        return at[keep], kinds[keep], words[keep], bool(len(stamped_at)) or bool(is_pixel.any())

    # ---- time extension -------------------------------------------------------------------------------
    def _unwrap(self, raw: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Extended times, in place: the previous word's plus the raw step folded into [−2³³, 2³³)."""
        if self._last_raw is None:
            self._last_raw = int(raw[0])
            self._last_ext = int(raw[0]) & _PERIOD_MASK
        first, last = self._last_raw, int(raw[-1])
        # No step can fold when the block's raw times and the one before them span less than half a
        # period: the usual case, settled by two reductions instead of a pass of differences.
        low, high = min(int(raw.min()), first), max(int(raw.max()), first)
        offset = self._last_ext - first
        self._last_raw = last
        folds: list[tuple[int, int]] = []  # (index, whole periods to add from there on)
        if high - low >= _HALF_PERIOD:
            steps[0] = raw[0] - first
            np.subtract(raw[1:], raw[:-1], out=steps[1:])
            at = np.flatnonzero((steps >= _HALF_PERIOD) | (steps < -_HALF_PERIOD))
            folds = list(zip(at.tolist(), np.where(steps[at] < 0, _PERIOD, -_PERIOD).tolist(), strict=True))
        raw += offset
        for index, fold in folds:
            raw[index:] += fold
        self._last_ext = int(raw[-1])
        return raw

    def _anchors(
        self,
        extended: np.ndarray,
        at: np.ndarray,
        kinds: np.ndarray,
        words: np.ndarray,
        out: _FeedOutput,
        pixels_so_far: int,
    ) -> None:
        """Keep the TDC words and times; turn global-time pairs into absolute times (the first one fixes
        the epoch, later ones are checked against it)."""
        tdc = kinds == _TDC
        if tdc.any():
            out.tdc_words.append(words[tdc])
            out.tdc_ticks.append(extended[at[tdc]])
        # This block was extended before an epoch fix made here: ``moved`` carries the fix to it.
        moved = 0
        for kind, position, word in zip(
            kinds[~tdc].tolist(), at[~tdc].tolist(), words[~tdc].tolist(), strict=True
        ):
            if kind == _GLOBAL_LOW:
                self._global_low = ((word >> 16) & 0xFFFFFFFF, int(extended[position]) + moved)
                continue
            if self._global_low is None:
                continue  # a high word without its low word: nothing to combine
            low, low_ext = self._global_low
            self._global_low = None
            absolute = ((((word >> 16) & 0xFFFF) << 32) | low) * TOA_CLOCK_TICKS
            shift = absolute - low_ext
            out.global_ticks.append(absolute)
            if not self._epoch_fixed and not self._returned_times:
                self._epoch_fixed = True
                self._last_ext += shift
                moved = shift
                out.epoch_shift_ticks = shift
                out.pixels_before_epoch = pixels_so_far
                out.tdc_arrays_before_epoch = len(out.tdc_ticks)
            elif shift and self._epoch_fixed:
                out.problems.append(
                    DetectorMessageError(
                        f"Timepix3 global time {absolute * TICK_NS * 1e-9:.6f} s disagrees with the "
                        f"extended pixel/TDC clock by {shift * TICK_NS * 1e-9:.6f} s; pixel and TDC "
                        "times stay on their own chain (check for a detector clock reset)",
                        reason=Tpx3Problem.GLOBAL_TIME_JUMP,
                    )
                )

    # ---- assembling one feed's result ------------------------------------------------------------------
    def _assemble(self, out: _FeedOutput, header_chip: np.ndarray) -> Tpx3Decoded:
        n = out.n_pixels
        toa = out.toa[:n]
        if out.epoch_shift_ticks:
            toa[: out.pixels_before_epoch] += out.epoch_shift_ticks
            for ticks in out.tdc_ticks[: out.tdc_arrays_before_epoch]:
                ticks += out.epoch_shift_ticks
        tdc_words = _concat(out.tdc_words, np.uint64)
        tdc_ticks = _concat(out.tdc_ticks, np.int64)
        self._returned_times |= bool(n or len(tdc_ticks))
        for value, count in sorted(out.unknown.items()):
            out.problems.append(
                DetectorMessageError(
                    f"{count} Timepix3 word(s) of unknown packet type 0x{value:02x} (e.g. "
                    f"0x{out.unknown_example[value]:016x}) were skipped; known types are 0xb/0xa pixels, "
                    "0x6 TDC, 0x44/0x45 global time, 0x5 SPIDR and 0x7 TPX3 control. Check the SERVAL raw "
                    "destination format and version",
                    reason=Tpx3Problem.UNKNOWN_PACKET,
                )
            )
        out.counts[_KIND_NAMES[_UNKNOWN]] = sum(out.unknown.values())
        chip = out.chip[:n] if out.chip is not None else np.full(n, header_chip[0] if n else 0, np.uint8)
        return Tpx3Decoded(
            pixels=PixelEvents(address=out.address[:n], toa_ticks=toa, tot_clocks=out.tot[:n], chip=chip),
            tdc=TdcEvents(
                edge=((tdc_words >> np.uint64(56)) & np.uint64(0xF)).astype(np.uint8),
                trigger_count=((tdc_words >> np.uint64(44)) & np.uint64(0xFFF)).astype(np.uint16),
                time_ticks=tdc_ticks,
            ),
            global_time_ticks=np.array(out.global_ticks, np.int64),
            packet_counts=dict(out.counts),
            problems=tuple(out.problems),
        )


def _raw_pixel_time(words: np.ndarray, raw: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> None:
    """((SPIDR << 14 | ToA) << 4) − FToA in ticks, as (SPIDR << 18) | (ToA << 4) − FToA, into ``raw``.

    At a full wrap with FToA > 0 this gives −1..−15 (as int64): still right modulo 2³⁴, which is all the
    time chain needs.
    """
    out = raw.view(np.uint64)
    np.bitwise_and(words, np.uint64(0xFFFF), out=out)
    np.left_shift(out, np.uint64(18), out=out)
    np.right_shift(words, np.uint64(26), out=t1)
    np.bitwise_and(t1, np.uint64(0x3FFF0), out=t1)
    np.bitwise_or(out, t1, out=out)
    np.right_shift(words, np.uint64(16), out=t2)
    np.bitwise_and(t2, np.uint64(0xF), out=t2)
    np.subtract(out, t2, out=out)


def _anchor_raw_time(words: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Raw ticks modulo 2³⁴ of TDC and global-time-low words."""
    tdc = kinds == _TDC
    coarse = ((words >> np.uint64(9)) & np.uint64((1 << (TDC_TIME_BITS - 1)) - 1)).astype(np.int64)
    # Fine runs 1..12; older firmware sends 0 for 1 (tpx3awkward notes it), so clip to the valid range.
    fine = ((words >> np.uint64(5)) & np.uint64(0xF)).astype(np.int64)
    fine = np.minimum(np.maximum(fine, 1), TDC_FINE_STEPS)
    tdc_ticks = (coarse << 1) | ((fine - 1) // (TDC_FINE_STEPS // 2))
    low_ticks = ((words >> np.uint64(16)) & np.uint64(0xFFFFFFFF)).astype(np.int64) * TOA_CLOCK_TICKS
    return np.where(tdc, tdc_ticks, low_ticks) & _PERIOD_MASK


def _concat(arrays: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    if not arrays:
        return np.empty(0, dtype)
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

"""The Timepix3 raw data format (ASI SERVAL "TPX3 raw file format"): its constants, packet types, and the
events ``Tpx3Decoder`` makes of it.

Format (SERVAL manual, appendix "TPX3 raw file format"; the same layout is in ASI's ``AsiRawStreamDecoder``
and in public readers such as NSLS-II tpx3awkward): chunks, each an 8-byte header (bits 0–31 ``"TPX3"``,
32–39 chip index, 40–47 reserved, 48–63 chunk size in bytes) followed by 64-bit little-endian words typed
by their top nibble:

- ``0xb`` pixel in ToA mode: PixAddr[59:44], ToA[43:30] (25 ns), ToT[29:20] (25 ns), FToA[19:16]
  (−1.5625 ns), SPIDR time[15:0] (409.6 µs). In ticks of 1.5625 ns the time is
  ``((SPIDR << 14 | ToA) << 4) − FToA``: ToA alone wraps every 409.6 µs, SPIDR time extends it to 34 bits,
  which wrap every 2³⁴ × 1.5625 ns = 26.84 s.
- ``0x6`` TDC: edge[59:56] (0xf TDC1 rise, 0xa TDC1 fall, 0xe TDC2 rise, 0xb TDC2 fall), trigger
  count[55:44] (12 bits), timestamp[43:9] (3.125 ns), fine[8:5] (1–12 in steps of 260.4 ps). In ticks:
  ``(timestamp << 1) | ((fine − 1) // 6)``, 36 bits, which wrap every 107.37 s.
- ``0x4`` global time: ``0x44`` TimeStampLow[47:16] (25 ns), ``0x45`` TimeStampHigh[31:16] (units of
  2³² × 25 ns); together 48 bits of 25 ns.
- ``0x5`` SPIDR control, ``0x7`` TPX3 control and ``0xa`` integrated-ToT pixels are recognised and counted,
  not turned into events. Anything else is an unknown packet type: counted and reported by value.

PixAddr → pixel: ``dcol = (a & 0xFE00) >> 8``, ``spix = (a & 0x01F8) >> 1``, ``pix = a & 7``; column
``x = dcol + pix // 4``, row ``y = spix + (pix & 3)``.

How the decoder extends these times into one timeline: ``phasestream.formats.tpx3.decode``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

import numpy as np

from phasestream.errors import DetectorMessageError

MAGIC = 0x33585054  # b"TPX3" read as a little-endian u32: the low half of every chunk header
MAGIC_BYTES = b"TPX3"
CHUNK_HEADER_BYTES = 8
MAX_CHUNK_BYTES = 0xFFFF & ~7  # the largest whole number of words the 16-bit size field can declare
TICK_NS = 1.5625  # 640 MHz: the FToA step, the unit of every extended time here
TOA_CLOCK_TICKS = 16  # one 25 ns ToA / ToT / global-time count is 16 ticks
CHIP_SIZE_PX = 256
PIXEL_TIME_BITS = 34  # SPIDR(16) + ToA(14) + FToA(4)
TDC_TIME_BITS = 36  # 35 bits of 3.125 ns, then one more from the fine bits
TDC_FINE_STEPS = 12  # fine bits run 1..12 over one 3.125 ns step


class PacketType(IntEnum):
    """Top nibble of a 64-bit word."""

    GLOBAL_TIME = 0x4
    SPIDR_CONTROL = 0x5
    TDC = 0x6
    TPX3_CONTROL = 0x7
    PIXEL_INTEGRATED_TOT = 0xA
    PIXEL_TOA = 0xB


class GlobalTime(IntEnum):
    """Top byte of a global-time word."""

    LOW = 0x44
    HIGH = 0x45


class TdcEdge(IntEnum):
    """Bits 59–56 of a TDC word."""

    TDC1_RISE = 0xF
    TDC1_FALL = 0xA
    TDC2_RISE = 0xE
    TDC2_FALL = 0xB


class Tpx3Problem(StrEnum):
    """What the decoder could not use (the ``reason`` of its ``DetectorMessageError``s)."""

    UNKNOWN_PACKET = "tpx3_unknown_packet_type"
    TRUNCATED_CHUNK = "tpx3_truncated_chunk"
    UNFRAMED_BYTES = "tpx3_unframed_bytes"
    GLOBAL_TIME_JUMP = "tpx3_global_time_jump"


@dataclass(frozen=True, slots=True)
class PixelEvents:
    """ToA-mode pixel hits in stream order."""

    address: np.ndarray  # uint16 PixAddr
    toa_ticks: np.ndarray  # int64 extended time of arrival, 1.5625 ns ticks
    tot_clocks: np.ndarray  # uint16 time over threshold, 25 ns clocks
    chip: np.ndarray  # uint8 chip index from the chunk header

    def __len__(self) -> int:
        return len(self.address)

    @property
    def x_px(self) -> np.ndarray:
        return pixel_column(self.address)

    @property
    def y_px(self) -> np.ndarray:
        return pixel_row(self.address)


@dataclass(frozen=True, slots=True)
class TdcEvents:
    """TDC words in stream order."""

    edge: np.ndarray  # uint8, a TdcEdge value
    trigger_count: np.ndarray  # uint16, the 12-bit counter as sent
    time_ticks: np.ndarray  # int64 extended, 1.5625 ns ticks

    def __len__(self) -> int:
        return len(self.edge)


@dataclass(frozen=True, slots=True)
class Tpx3Decoded:
    """What one ``feed`` or ``finish`` decoded, and what it could not use."""

    pixels: PixelEvents
    tdc: TdcEvents
    global_time_ticks: np.ndarray  # int64: absolute times of complete 0x44/0x45 pairs, in ticks
    packet_counts: dict[str, int]  # words by kind ("chunks" for headers); problems name the unknown ones
    problems: tuple[DetectorMessageError, ...]


def pixel_column(address: np.ndarray) -> np.ndarray:
    a = address.astype(np.int32)
    return (((a >> 8) & 0xFE) | ((a >> 2) & 1)).astype(np.uint16)


def pixel_row(address: np.ndarray) -> np.ndarray:
    a = address.astype(np.int32)
    return (((a >> 1) & 0xFC) | (a & 3)).astype(np.uint16)


def region_addresses(shape_px: tuple[int, int], origin_px: tuple[int, int] = (0, 0)) -> np.ndarray:
    """PixAddr of each pixel of a ``shape_px`` region whose corner is chip pixel ``origin_px`` (row,
    column), row-major: ``counts_by_address[region_addresses(...)]`` is the region's frame."""
    (height, width), (row0, col0) = shape_px, origin_px
    if min(row0, col0) < 0 or min(height, width) < 1 or max(row0 + height, col0 + width) > CHIP_SIZE_PX:
        raise ValueError(
            f"a {shape_px} region at {origin_px} does not fit the {CHIP_SIZE_PX}×{CHIP_SIZE_PX} chip: "
            "choose an origin and shape inside it"
        )
    address = np.arange(1 << 16)
    by_chip_pixel = np.empty(1 << 16, np.intp)
    by_chip_pixel[pixel_row(address).astype(np.intp) * CHIP_SIZE_PX + pixel_column(address)] = address
    rows, cols = np.ogrid[row0 : row0 + height, col0 : col0 + width]
    chip_pixels = np.asarray(rows * CHIP_SIZE_PX + cols, dtype=np.intp)
    return by_chip_pixel[chip_pixels].ravel()

"""A simulated Timepix3 behind ASI SERVAL: raw TPX3 chunks from events, events from a simulated scan, and a
TCP server that streams them as SERVAL's raw destination ``tcp://listen@host:port`` does.

The encoder is the inverse of ``phasestream.formats.tpx3.decode`` (the format: ``tpx3_packets``) and
wraps every counter as the chip does: ToA every 409.6 µs, the 34-bit pixel time (SPIDR time) every
26.84 s, the TDC every 107.37 s and the trigger counter every 4096 triggers. Times are given in
nanoseconds and quantised to 1.5625 ns ticks; multiples of 1.5625 ns are exact in float64, so a test can
compare them bit for bit. The low-level builders (``pixel_words``, ``tdc_words``, ``chunk_header``,
``chunk``) take any values, so tests can produce unknown packet types and truncated chunks.

SERVAL listens and the client connects, so ``Tpx3Emitter`` binds at construction and waits in ``send``
for one client, streams one measurement, then closes that connection: the client sees the end of the
measurement as the end of the TCP stream. Positions go out on a ZeroMQ PUSH socket in the position
channel's format, as ``SelunEmitter`` sends them. ``open_measurement`` instead hands out the accepted
connection as a ``Tpx3Measurement`` that sends each payload the moment it is given (an exposure after
each trigger, as ``phasestream.simulators.ophyd_timepix3`` does) until ``close`` ends the measurement.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from phasestream.errors import ConfigError
from phasestream.formats.position_channel import (
    POSITIONS_BATCH_SIZE,
    encode_positions_end,
    position_messages,
)
from phasestream.formats.tpx3.packets import (
    CHIP_SIZE_PX,
    MAGIC,
    MAX_CHUNK_BYTES,
    TDC_FINE_STEPS,
    TDC_TIME_BITS,
    TICK_NS,
    TOA_CLOCK_TICKS,
    GlobalTime,
    PacketType,
    TdcEdge,
)
from phasestream.simulators.selun import EmitReport

DEFAULT_RAW_PORT = 8085  # ADTimePix3's default raw destination, tcp://listen@host:8085
# The header's size counts the payload only: the largest whole number of words a 16-bit size can declare.
DEFAULT_CHUNK_WORDS = MAX_CHUNK_BYTES // 8
_TOT_MAX_CLOCKS = (1 << 10) - 1
# As in SelunEmitter: sleeps shorter than this cost more than the jitter they would save.
_SHORTEST_SLEEP_S = 5e-4


# ---- words ------------------------------------------------------------------------------------------------
def ns_to_ticks(time_ns: np.ndarray | Sequence[float] | float) -> np.ndarray:
    return np.rint(np.asarray(time_ns, np.float64) / TICK_NS).astype(np.int64)


def pixel_address(x_px: np.ndarray, y_px: np.ndarray) -> np.ndarray:
    """Column ``x`` and row ``y`` on the chip → 16-bit PixAddr (double column, super pixel, pixel)."""
    x, y = np.asarray(x_px, np.int64), np.asarray(y_px, np.int64)
    if x.size and (x.min() < 0 or x.max() >= CHIP_SIZE_PX or y.min() < 0 or y.max() >= CHIP_SIZE_PX):
        raise ConfigError(
            f"pixel x in [{x.min()}, {x.max()}], y in [{y.min()}, {y.max()}]: a Timepix3 chip has "
            f"{CHIP_SIZE_PX}×{CHIP_SIZE_PX} pixels, so both must lie in 0..{CHIP_SIZE_PX - 1}"
        )
    return ((x >> 1) << 9 | (y >> 2) << 3 | (x & 1) << 2 | (y & 3)).astype(np.uint16)


def pixel_words(
    x_px: np.ndarray, y_px: np.ndarray, toa_ticks: np.ndarray, tot_clocks: np.ndarray
) -> np.ndarray:
    """ToA-mode pixel words (0xb). The time is split as the chip does: ToA counts 25 ns (16 ticks), FToA
    subtracts up to 15 ticks, SPIDR time holds the 16 bits above ToA; all of it wraps at 2³⁴ ticks."""
    toa = np.asarray(toa_ticks, np.int64)
    coarse = (toa + TOA_CLOCK_TICKS - 1) // TOA_CLOCK_TICKS  # ceil: FToA counts down from the next edge
    ftoa = coarse * TOA_CLOCK_TICKS - toa
    tot = np.asarray(tot_clocks, np.int64)
    if tot.size and (tot.min() < 0 or tot.max() > _TOT_MAX_CLOCKS):
        raise ConfigError(
            f"ToT of {tot.max()} clocks: the 10-bit ToT holds 0..{_TOT_MAX_CLOCKS} (25 ns each)"
        )
    # Bits 0–59 in int64, then the type nibble in uint64: 0xb << 60 does not fit an int64.
    fields = (
        (pixel_address(x_px, y_px).astype(np.int64) << 44)
        | ((coarse & 0x3FFF) << 30)
        | (tot << 20)
        | (ftoa << 16)
        | ((coarse >> 14) & 0xFFFF)
    )
    return fields.astype(np.uint64) | np.uint64(int(PacketType.PIXEL_TOA) << 60)


def tdc_words(
    time_ticks: np.ndarray, trigger_count: np.ndarray, edge: TdcEdge = TdcEdge.TDC1_RISE
) -> np.ndarray:
    """TDC words (0x6): 35-bit 3.125 ns timestamp, fine bits 1 or 7 for the half step, 12-bit counter."""
    ticks = np.asarray(time_ticks, np.int64)
    fine = 1 + (ticks & 1) * (TDC_FINE_STEPS // 2)
    fields = (
        (int(PacketType.TDC) << 60)
        | (int(edge) << 56)
        | ((np.asarray(trigger_count, np.int64) & 0xFFF) << 44)
        | (((ticks >> 1) & ((1 << (TDC_TIME_BITS - 1)) - 1)) << 9)
        | (fine << 5)
    )
    return fields.astype(np.uint64)


def global_time_words(time_ticks: int) -> np.ndarray:
    """A global-time pair (0x44 low, 0x45 high) for a time in ticks, at the 25 ns resolution it carries."""
    clocks = time_ticks // TOA_CLOCK_TICKS
    spidr = (clocks >> 14) & 0xFFFF
    low = (GlobalTime.LOW << 56) | ((clocks & 0xFFFFFFFF) << 16) | spidr
    high = (GlobalTime.HIGH << 56) | (((clocks >> 32) & 0xFFFF) << 16) | spidr
    return np.array([low, high], np.uint64)


def chunk_header(chip: int, size_bytes: int) -> bytes:
    """An 8-byte chunk header; ``size_bytes`` is written as given, so a test can declare a wrong size."""
    return (MAGIC | (chip & 0xFF) << 32 | (size_bytes & 0xFFFF) << 48).to_bytes(8, "little")


def chunk(words: np.ndarray, chip: int = 0, chunk_words: int = DEFAULT_CHUNK_WORDS) -> list[bytes]:
    """Split words into chunks of at most ``chunk_words`` words, each behind its header."""
    if not 1 <= chunk_words <= DEFAULT_CHUNK_WORDS:
        raise ConfigError(
            f"chunk_words={chunk_words}: a chunk holds 1..{DEFAULT_CHUNK_WORDS} words (16-bit byte size)"
        )
    payload = np.ascontiguousarray(words, dtype="<u8")
    return [
        chunk_header(chip, 8 * len(part)) + part.tobytes()
        for part in np.split(payload, range(chunk_words, len(payload), chunk_words))
        if len(part)
    ]


# ---- events → stream --------------------------------------------------------------------------------------
def encode_tpx3(
    x_px: np.ndarray,
    y_px: np.ndarray,
    toa_ns: np.ndarray,
    tot_ns: np.ndarray,
    trigger_ns: np.ndarray | Sequence[float] = (),
    *,
    first_trigger_count: int = 1,
    edge: TdcEdge = TdcEdge.TDC1_RISE,
    chip: int = 0,
    chunk_words: int = DEFAULT_CHUNK_WORDS,
    global_time: bool = True,
    readout_jitter_ns: float = 0.0,
    seed: int = 0,
) -> bytes:
    """Raw TPX3 bytes for pixel hits and TDC triggers, in readout order.

    Words go out in time order, a global-time pair first (at the earliest time, unless ``global_time`` is
    false). ``readout_jitter_ns`` > 0 delays each pixel's place in the stream by up to that much, as the
    chip's column readout does, so pixels arrive slightly out of time order; their times do not change.
    """
    pixel_ticks = ns_to_ticks(toa_ns)
    trigger_ticks = ns_to_ticks(trigger_ns)
    read_at = pixel_ticks.astype(np.float64)
    if readout_jitter_ns > 0:
        read_at += np.random.default_rng(seed).uniform(0, readout_jitter_ns / TICK_NS, len(read_at))
    # Triggers before pixels, and the stable sort keeps that order when a pixel shares a trigger's tick.
    words = [
        tdc_words(trigger_ticks, first_trigger_count + np.arange(len(trigger_ticks)), edge),
        pixel_words(x_px, y_px, pixel_ticks, np.rint(np.asarray(tot_ns, np.float64) / 25.0)),
    ]
    read_order = [trigger_ticks.astype(np.float64), read_at]
    if global_time and (len(pixel_ticks) or len(trigger_ticks)):
        earliest = int(np.concatenate([pixel_ticks, trigger_ticks]).min())
        words.insert(0, global_time_words(earliest))
        read_order.insert(0, np.full(2, -np.inf))
    order = np.argsort(np.concatenate(read_order), kind="stable")
    return b"".join(chunk(np.concatenate(words)[order], chip, chunk_words))


# ---- a simulated scan as events --------------------------------------------------------------------------
class Tpx3Timing(BaseModel):
    """When the scan's exposures happen on the detector clock, and what the hits look like."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_s: float = Field(default=1.0, ge=0, description="first trigger on the detector clock")
    period_s: float = Field(default=1e-3, gt=0, description="trigger to trigger: one scan position")
    exposure_s: float = Field(default=0.9e-3, gt=0, description="hits arrive in [trigger, trigger + this)")
    tot_min_ns: float = Field(default=100.0, ge=25.0, le=25_575.0)
    tot_max_ns: float = Field(default=1_000.0, ge=25.0, le=25_575.0)
    readout_jitter_ns: float = Field(default=0.0, ge=0, description="readout disorder, see encode_tpx3")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _exposure_fits(self) -> Tpx3Timing:
        if self.exposure_s > self.period_s:
            raise ValueError(
                f"exposure_s={self.exposure_s} is longer than period_s={self.period_s}: exposures would "
                "overlap; shorten the exposure or lengthen the period"
            )
        if self.tot_min_ns > self.tot_max_ns:
            raise ValueError(f"tot_min_ns={self.tot_min_ns} > tot_max_ns={self.tot_max_ns}: swap them")
        return self


@dataclass(frozen=True)
class ScanEvents:
    """Pixel hits of a scan, exposure after exposure, in time order within each, and one trigger each."""

    x_px: np.ndarray  # int64 chip column
    y_px: np.ndarray  # int64 chip row
    toa_ns: np.ndarray  # float64, multiples of 1.5625 ns
    tot_ns: np.ndarray  # float64, multiples of 25 ns
    trigger_ns: np.ndarray  # float64, one per exposure
    event_bounds: np.ndarray  # exposure k holds events [bounds[k], bounds[k + 1])
    origin_px: tuple[int, int]  # chip (row, column) of the frames' pixel (0, 0)
    timing: Tpx3Timing


def scan_events(
    frames: np.ndarray, timing: Tpx3Timing, origin_px: tuple[int, int] | None = None
) -> ScanEvents:
    """Turn frames of counts (``SimulatedScan.frames``, (n, H, W)) into hits: each count of pixel (r, c)
    in frame k is one hit on chip pixel ``origin + (r, c)`` at a uniformly random tick strictly inside
    exposure k, which starts at a TDC trigger. By default the frames sit in the middle of the chip."""
    n, height, width = frames.shape
    if height > CHIP_SIZE_PX or width > CHIP_SIZE_PX:
        raise ConfigError(
            f"frames of {height}×{width} pixels do not fit one {CHIP_SIZE_PX}×{CHIP_SIZE_PX} Timepix3 chip: "
            f"simulate the scan with detector_size_px <= {CHIP_SIZE_PX}"
        )
    row0, col0 = (
        origin_px if origin_px is not None else ((CHIP_SIZE_PX - height) // 2, (CHIP_SIZE_PX - width) // 2)
    )
    rng = np.random.default_rng(timing.seed)
    triggers = int(ns_to_ticks(timing.start_s * 1e9)) + np.arange(n) * int(ns_to_ticks(timing.period_s * 1e9))
    exposure_ticks = int(ns_to_ticks(timing.exposure_s * 1e9))
    counts = frames.reshape(n, -1).astype(np.int64)
    per_frame = counts.sum(axis=1)
    bounds = np.concatenate([[0], np.cumsum(per_frame)])
    pixel = np.empty(bounds[-1], np.int64)
    for k in range(n):
        # Shuffled: the hits of a frame reach the detector in random pixel order.
        pixel[bounds[k] : bounds[k + 1]] = rng.permutation(np.repeat(np.arange(height * width), counts[k]))
    offsets = rng.integers(1, exposure_ticks, bounds[-1])
    frame_of_event = np.repeat(np.arange(n), per_frame)
    ticks = triggers[frame_of_event] + offsets
    order = np.lexsort((ticks, frame_of_event))  # time order within each exposure
    tot = rng.integers(round(timing.tot_min_ns / 25), round(timing.tot_max_ns / 25) + 1, bounds[-1])
    return ScanEvents(
        x_px=col0 + pixel[order] % width,
        y_px=row0 + pixel[order] // width,
        toa_ns=ticks[order] * TICK_NS,
        tot_ns=tot * 25.0,
        trigger_ns=triggers * TICK_NS,
        event_bounds=bounds,
        origin_px=(row0, col0),
        timing=timing,
    )


def scan_payloads(events: ScanEvents, chip: int = 0, chunk_words: int = DEFAULT_CHUNK_WORDS) -> list[bytes]:
    """One payload of whole chunks per exposure (its trigger, then its hits); a global-time pair first."""
    payloads = []
    for k in range(len(events.trigger_ns)):
        hits = slice(events.event_bounds[k], events.event_bounds[k + 1])
        payloads.append(
            encode_tpx3(
                events.x_px[hits],
                events.y_px[hits],
                events.toa_ns[hits],
                events.tot_ns[hits],
                events.trigger_ns[k : k + 1],
                first_trigger_count=1 + k,
                chip=chip,
                chunk_words=chunk_words,
                global_time=k == 0,
                readout_jitter_ns=events.timing.readout_jitter_ns,
                seed=events.timing.seed + k,
            )
        )
    return payloads


# ---- the TCP server ---------------------------------------------------------------------------------------
class Tpx3Emitter:
    """SERVAL's raw TCP destination: listens at construction; ``send`` serves one measurement to one client.

    Port 0 lets the OS choose; ``endpoint`` reports the address as ``tcp://host:port``. ``rate_hz`` paces
    payloads (for ``emit_scan``, exposures) on an absolute schedule; None sends as fast as TCP takes them.
    TCP itself applies backpressure: a slow client slows the emitter, nothing is dropped. A position waits
    at most ``positions_send_timeout_s`` for ingest to take it (None: as long as it takes).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_RAW_PORT,
        rate_hz: float | None = None,
        *,
        positions_endpoint: str | None = None,
        accept_timeout_s: float = 30.0,
        linger_s: float = 10.0,
        positions_send_timeout_s: float | None = None,
    ) -> None:
        if rate_hz is not None and not rate_hz > 0:
            raise ConfigError(f"rate_hz={rate_hz}: use a positive rate, or None for as fast as possible")
        self.rate_hz = rate_hz
        self._accept_timeout_s = accept_timeout_s
        try:
            self._listener = socket.create_server((host, port))
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({error}); pick a free port, or 0 to let the OS choose one"
            ) from error
        self._listener.settimeout(accept_timeout_s)
        self._context = zmq.Context()
        self._positions: zmq.Socket | None = None
        if positions_endpoint is not None:
            self._positions = self._context.socket(zmq.PUSH)
            self._positions.setsockopt(zmq.LINGER, round(linger_s * 1000))
            if positions_send_timeout_s is not None:
                self._positions.setsockopt(zmq.SNDTIMEO, round(positions_send_timeout_s * 1000))
            self._positions.bind(positions_endpoint)

    @property
    def endpoint(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"tcp://{host}:{port}"

    @property
    def positions_endpoint(self) -> str | None:
        return None if self._positions is None else self._positions.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(
        self, payloads: Sequence[bytes], position_batches: dict[int, list[bytes]] | None = None
    ) -> EmitReport:
        """Wait for a client, send the payloads (paced) and close its connection: the measurement's end.

        ``position_batches`` maps a payload index to position-channel messages that go out right after it.
        """
        connection = self._accept()
        interval_s = 1.0 / self.rate_hz if self.rate_hz else 0.0
        positions_sent = 0
        with connection:
            started = time.perf_counter()
            for index, payload in enumerate(payloads):
                delay = started + index * interval_s - time.perf_counter()
                if interval_s and delay > _SHORTEST_SLEEP_S:
                    time.sleep(delay)
                connection.sendall(payload)
                for message in (position_batches or {}).get(index, []):
                    self._send_position(message)
                    positions_sent += 1
            connection.shutdown(socket.SHUT_WR)
            elapsed_s = time.perf_counter() - started
        return EmitReport(len(payloads), positions_sent, elapsed_s)

    def emit_scan(
        self, events: ScanEvents, positions_m: np.ndarray | None = None, *, series_id: int = 1, chip: int = 0
    ) -> EmitReport:
        """Stream a scan, one paced payload per exposure; with a position channel, its positions in
        batches after the exposures they cover, and the channel's end after the last one."""
        payloads = scan_payloads(events, chip)
        batches: dict[int, list[bytes]] = {}
        if positions_m is not None and self._positions is not None:
            for number, message in enumerate(position_messages(series_id, positions_m, POSITIONS_BATCH_SIZE)):
                last = min((number + 1) * POSITIONS_BATCH_SIZE, len(payloads)) - 1
                batches.setdefault(last, []).append(message)
            batches.setdefault(len(payloads) - 1, []).append(encode_positions_end(series_id))
        return self.send(payloads, batches)

    def open_measurement(self, send_timeout_s: float = 10.0) -> Tpx3Measurement:
        """Wait for a client and hand out its connection, for a measurement sent piece by piece."""
        return Tpx3Measurement(self._accept(), self.endpoint, send_timeout_s)

    def send_positions(self, messages: Sequence[bytes]) -> int:
        """Send position-channel messages now (for positions that come before the data)."""
        for message in messages:
            self._send_position(message)
        return len(messages)

    def close(self) -> None:
        self._listener.close()
        if self._positions is not None:
            self._positions.close()
        self._context.term()

    def __enter__(self) -> Tpx3Emitter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> socket.socket:
        try:
            connection, _ = self._listener.accept()
        except TimeoutError:
            raise TimeoutError(
                f"no client connected to {self.endpoint} within {self._accept_timeout_s} s: start the "
                "Timepix3 ingest stage (or raise accept_timeout_s)"
            ) from None
        return connection

    def _send_position(self, message: bytes) -> None:
        assert self._positions is not None
        try:
            self._positions.send(message)
        except zmq.Again:
            raise TimeoutError(
                f"no ingest took a position on {self.positions_endpoint} within positions_send_timeout_s: "
                "start the pipeline with detector.positions_endpoint set to this endpoint"
            ) from None


class Tpx3Measurement:
    """One measurement on an accepted client connection, streamed as it happens.

    ``send`` writes a payload at once (whole chunks, so the client can decode up to its end); ``close``
    shuts the connection, which the client reads as the end of the measurement, as with SERVAL. A client
    that stops reading makes ``send`` wait at most ``send_timeout_s`` (TCP's backpressure), then fail.
    """

    def __init__(self, connection: socket.socket, endpoint: str, send_timeout_s: float) -> None:
        connection.settimeout(send_timeout_s)
        self._connection = connection
        self.endpoint = endpoint
        self.send_timeout_s = send_timeout_s
        self.payloads_sent = 0
        self.bytes_sent = 0
        self.closed = False

    def send(self, payload: bytes) -> None:
        if self.closed:
            raise ConfigError(
                f"the measurement on {self.endpoint} is closed after {self.payloads_sent} payloads: open a "
                "new one (Tpx3Emitter.open_measurement) for the next measurement"
            )
        try:
            self._connection.sendall(payload)
        except TimeoutError:
            raise TimeoutError(
                f"the client of {self.endpoint} took no data for send_timeout_s={self.send_timeout_s} after "
                f"{self.bytes_sent} bytes: is the Timepix3 ingest stage stalled?"
            ) from None
        except OSError as error:
            raise ConnectionError(
                f"the client of {self.endpoint} went away after {self.bytes_sent} bytes ({error}): restart "
                "the Timepix3 ingest stage and repeat the measurement"
            ) from error
        self.payloads_sent += 1
        self.bytes_sent += len(payload)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # A client that already went away leaves nothing to shut down; the close still frees the socket.
        with contextlib.suppress(OSError):
            self._connection.shutdown(socket.SHUT_WR)
        self._connection.close()

    def __enter__(self) -> Tpx3Measurement:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

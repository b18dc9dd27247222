"""A simulated DECTRIS SELUN: Stream V2 frames on one PUSH socket, scan positions on another.

Like a DCU, the data socket sends one CBOR message per ZeroMQ message (never multipart) to PULL clients,
round-robin. Both sockets have a bounded send high-water mark and no drop policy: when ingest falls
behind, or nobody is connected yet, ``send`` blocks, so a slow consumer slows the emitter instead of
losing frames (ZeroMQ PUSH blocks rather than drops at the HWM).

Every message is encoded and compressed before the clock starts, so ``rate_hz`` measures transport, not
the encoder. The schedule is absolute (message k is due at t0 + k / rate): a late message does not push
every later one back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import zmq
from tqdm import tqdm

from phasestream.errors import ConfigError
from phasestream.formats.position_channel import (
    POSITIONS_BATCH_SIZE,
    encode_positions_end,
    position_messages,
)
from phasestream.formats.stream_v2.encode import (
    encode_image,
    encode_message,
    end_fields,
    start_fields_for_scan,
)
from phasestream.simulators.scan_simulation import SimulatedScan

DEFAULT_DATA_ENDPOINT = "tcp://127.0.0.1:31001"  # the Stream V2 port
DEFAULT_POSITIONS_ENDPOINT = "tcp://127.0.0.1:31002"
# Frames queued per peer before send blocks: about 4 MB of low-dose frames, a few ms at full rate.
DEFAULT_SEND_HWM = 1000
# The SELUN's top frame rate; the frame time announced when the emitter runs as fast as it can.
SELUN_MAX_FRAME_RATE_HZ = 120_000.0
# Sleeping is only worth it for gaps longer than this: a sleep lasts at least ~60 µs, so at tens of kHz a
# sleep per frame would cap the rate and steal the receiver's core. Frames due sooner go out at once, in
# short bursts; the absolute schedule keeps the average rate exact and the jitter below this bound.
_SHORTEST_SLEEP_S = 5e-4
# tqdm costs about a microsecond per update; updating every few hundred frames keeps it off the clock.
_PROGRESS_EVERY = 256


@dataclass(frozen=True)
class EmitReport:
    data_messages_sent: int
    position_messages_sent: int
    elapsed_s: float  # from the first message to the last one handed to ZeroMQ

    @property
    def data_messages_per_s(self) -> float:
        return self.data_messages_sent / self.elapsed_s if self.elapsed_s > 0 else float("inf")


@dataclass(frozen=True)
class _Outgoing:
    socket: zmq.Socket
    message: bytes
    paced: bool  # images (or raw data messages) follow the rate; start, end and positions do not


class SelunEmitter:
    """Binds the data and position PUSH sockets; ``emit`` sends one scan, ``emit_messages`` raw messages.

    Use port 0 (``tcp://127.0.0.1:0``) to let the OS pick a free port; ``data_endpoint`` and
    ``positions_endpoint`` then report the bound addresses.
    """

    def __init__(
        self,
        data_endpoint: str = DEFAULT_DATA_ENDPOINT,
        positions_endpoint: str = DEFAULT_POSITIONS_ENDPOINT,
        rate_hz: float | None = None,
        *,
        send_hwm: int = DEFAULT_SEND_HWM,
        send_timeout_s: float | None = None,
        linger_s: float = 10.0,
    ) -> None:
        if rate_hz is not None and not rate_hz > 0:
            raise ConfigError(
                f"rate_hz={rate_hz}: use a positive frame rate, or None for as fast as possible"
            )
        if send_hwm < 1:
            raise ConfigError(f"send_hwm={send_hwm}: use at least 1 (0 would mean an unbounded queue)")
        self.rate_hz = rate_hz
        self._send_timeout_s = send_timeout_s
        self._context = zmq.Context()
        self._data_socket = self._bind(data_endpoint, send_hwm, send_timeout_s, linger_s)
        self._positions_socket = self._bind(positions_endpoint, send_hwm, send_timeout_s, linger_s)

    @property
    def data_endpoint(self) -> str:
        return self._data_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def positions_endpoint(self) -> str:
        return self._positions_socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def emit(
        self,
        scan: SimulatedScan,
        scan_uid: str,
        *,
        series_id: int = 1,
        progress: bool = True,
        positions_batch_size: int = POSITIONS_BATCH_SIZE,
    ) -> EmitReport:
        """Send start, the images (paced), their positions in batches, then end on both sockets.

        A positions batch goes out right after the last image it covers, as a motion controller would
        report them while the scan runs.
        """
        series_unique_id = f"phasestream-sim-{scan_uid}-{series_id}"
        frame_time_s = 1.0 / (self.rate_hz or SELUN_MAX_FRAME_RATE_HZ)
        series_date = datetime.now(UTC)
        start = start_fields_for_scan(
            scan,
            series_id=series_id,
            series_unique_id=series_unique_id,
            scan_uid=scan_uid,
            frame_time_s=frame_time_s,
        )
        outgoing = [_Outgoing(self._data_socket, encode_message(start), paced=False)]
        batches = list(position_messages(series_id, scan.positions_m, positions_batch_size))
        for image_id, frame in enumerate(scan.frames):
            image = encode_image(
                frame,
                series_id=series_id,
                series_unique_id=series_unique_id,
                image_id=image_id,
                frame_time_s=frame_time_s,
                series_date=series_date,
            )
            outgoing.append(_Outgoing(self._data_socket, image, paced=True))
            if (image_id + 1) % positions_batch_size == 0 or image_id + 1 == len(scan.frames):
                batch = batches[image_id // positions_batch_size]
                outgoing.append(_Outgoing(self._positions_socket, batch, paced=False))
        end = encode_message(end_fields(series_id=series_id, series_unique_id=series_unique_id))
        outgoing.append(_Outgoing(self._data_socket, end, paced=False))
        outgoing.append(_Outgoing(self._positions_socket, encode_positions_end(series_id), paced=False))
        return self._send(outgoing, progress)

    def emit_messages(
        self,
        data_messages: Sequence[bytes],
        position_messages: Sequence[bytes] = (),
        *,
        progress: bool = False,
    ) -> EmitReport:
        """Send prepared messages as they are (tests inject malformed ones): data paced, then positions."""
        outgoing = [_Outgoing(self._data_socket, message, paced=True) for message in data_messages]
        outgoing += [_Outgoing(self._positions_socket, message, paced=False) for message in position_messages]
        return self._send(outgoing, progress)

    def close(self) -> None:
        """Close both sockets; queued messages get up to ``linger_s`` to reach their peers."""
        self._data_socket.close()
        self._positions_socket.close()
        self._context.term()

    def __enter__(self) -> SelunEmitter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _bind(
        self, endpoint: str, send_hwm: int, send_timeout_s: float | None, linger_s: float
    ) -> zmq.Socket:
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, send_hwm)
        socket.setsockopt(zmq.LINGER, round(linger_s * 1000))
        if send_timeout_s is not None:
            socket.setsockopt(zmq.SNDTIMEO, round(send_timeout_s * 1000))
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as error:
            socket.close(linger=0)
            raise ConfigError(
                f"cannot bind the SELUN emitter to {endpoint!r} ({error}); pick a free port, "
                "or port 0 to let the OS choose one"
            ) from error
        return socket

    def _send(self, outgoing: list[_Outgoing], progress: bool) -> EmitReport:
        paced_total = sum(item.paced for item in outgoing)
        interval_s = 1.0 / self.rate_hz if self.rate_hz else 0.0
        data_sent = positions_sent = paced_sent = 0
        with tqdm(total=paced_total, disable=not progress, unit="frame", desc="SELUN emit") as bar:
            started = time.perf_counter()
            for item in outgoing:
                if item.paced and interval_s:
                    delay = started + paced_sent * interval_s - time.perf_counter()
                    if delay > _SHORTEST_SLEEP_S:
                        time.sleep(delay)
                self._send_one(item)
                if item.socket is self._data_socket:
                    data_sent += 1
                else:
                    positions_sent += 1
                if item.paced:
                    paced_sent += 1
                    if paced_sent % _PROGRESS_EVERY == 0:
                        bar.update(_PROGRESS_EVERY)
            elapsed_s = time.perf_counter() - started
            bar.update(paced_sent % _PROGRESS_EVERY)
        return EmitReport(data_sent, positions_sent, elapsed_s)

    def _send_one(self, item: _Outgoing) -> None:
        try:
            item.socket.send(item.message)
        except zmq.Again:
            endpoint = item.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            raise TimeoutError(
                f"no PULL peer accepted a message on {endpoint} within "
                f"send_timeout_s={self._send_timeout_s}: connect the ingest stage, or raise the timeout"
            ) from None

"""ZeroMQ plumbing the runtime owns: bounded PUSH outlets with backpressure, and a status channel.

Data messages go to whichever downstream worker has room (PUSH semantics, but chosen here so the
runtime can wait with a stop check instead of blocking forever). Control messages (``ScanStart``,
``ScanEnd``) go to every downstream worker, so each worker of a fanned-out stage sees the scan open
and close and the next stage can count the ScanEnds it expects.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from phasestream.runtime.messages import Message, ScanEnd, ScanStart, encode

_POLL_MS = 200


class StopRequestedError(Exception):
    """Raised inside a blocking send when the stage was asked to stop."""


class Outlet:
    """One PUSH socket per downstream worker, each with a bounded high-water mark."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoints: Sequence[str],
        high_water_mark: int,
        stop: threading.Event,
        secure: Callable[[zmq.Socket[bytes]], None] | None = None,
    ) -> None:
        """``secure`` prepares each socket before it connects (CurveZMQ keys for a peer on another host)."""
        self._stop = stop
        self._sockets: list[zmq.Socket[bytes]] = []
        for endpoint in endpoints:
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, high_water_mark)
            if secure is not None:
                secure(sock)
            sock.connect(endpoint)
            self._sockets.append(sock)
        self._next = 0
        self.blocked_s = 0.0

    def send(self, message: Message) -> None:
        if not self._sockets:
            return
        frames = encode(message)
        if isinstance(message, ScanStart | ScanEnd):
            for sock in self._sockets:
                self._send_when_ready([sock], frames)
        else:
            self._send_when_ready(self._rotated(), frames)

    def _rotated(self) -> list[zmq.Socket[bytes]]:
        order = self._sockets[self._next :] + self._sockets[: self._next]
        self._next = (self._next + 1) % len(self._sockets)
        return order

    def _send_when_ready(self, candidates: list[zmq.Socket[bytes]], frames: list[Any]) -> None:
        poller = zmq.Poller()
        for sock in candidates:
            poller.register(sock, zmq.POLLOUT)
        while True:
            ready = dict(poller.poll(_POLL_MS))
            for sock in candidates:
                if ready.get(sock, 0) & zmq.POLLOUT:
                    try:
                        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                        return
                    except zmq.Again:
                        continue
            # Backpressure: every downstream queue is full. Wait, never drop.
            self.blocked_s += _POLL_MS / 1000
            if self._stop.is_set():
                raise StopRequestedError

    def close(self, linger_ms: int) -> None:
        for sock in self._sockets:
            sock.close(linger=linger_ms)


class StatusChannel:
    """Best-effort JSON events to the launcher (ready, status, scan_end, log). Never blocks a stage."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, sender: str) -> None:
        self._sock = context.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(endpoint)
        self._sender = sender

    def report(self, event: str, **fields: Any) -> None:
        payload = json.dumps({"event": event, "sender": self._sender, **fields}, default=str).encode()
        # With no launcher listening (a stage started by hand) the queue fills: status is advisory only.
        with contextlib.suppress(zmq.Again):
            self._sock.send(payload, flags=zmq.NOBLOCK)

    def close(self) -> None:
        self._sock.close()

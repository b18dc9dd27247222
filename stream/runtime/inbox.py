"""What a stage worker receives: its inbox of phasestream messages and its detector-facing raw inputs.

The runtime drains each socket that is ready, at most ``DRAIN_LIMIT`` messages at a time so that no socket
starves the others. A raw input bounds each message's size (ZMQ_MAXMSGSIZE, before anything is allocated)
and its number of parts (here, one part at a time, never keeping the parts of a refused message together).
"""

from __future__ import annotations

from dataclasses import dataclass

import zmq

from phasestream.errors import DetectorMessageError, PhasestreamError

INBOX_PORT = "in"  # the port name of the inbox; raw inputs are named by the stage
DRAIN_LIMIT = 64
TOO_MANY_PARTS = "too_many_parts"  # the reason of a raw message refused for its number of parts


@dataclass(frozen=True)
class RawInput:
    """A detector-facing socket: the runtime creates and polls it, the stage decodes what arrives."""

    socket_type: int
    endpoint: str
    bind: bool = False
    # Larger messages drop the sender's connection before anything is allocated for them (ZMQ_MAXMSGSIZE).
    max_message_bytes: int | None = None
    # ZMQ_MAXMSGSIZE bounds each part, not their number: a message of more parts is refused, and its parts
    # are received and dropped one at a time, never kept together.
    max_parts: int = 16


def drain_messages(sock: zmq.Socket[bytes]) -> list[list[zmq.Frame]]:
    """The phasestream messages waiting on the inbox, at most ``DRAIN_LIMIT``.

    They carry arrays: their parts stay zero-copy frames.
    """
    group = []
    for _ in range(DRAIN_LIMIT):
        try:
            group.append(sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
        except zmq.Again:
            break
    return group


def drain_raw(sock: zmq.Socket[bytes], port: str, raw: RawInput) -> list[list[bytes] | PhasestreamError]:
    """The messages waiting on a detector-facing socket, at most ``DRAIN_LIMIT``: each as ``bytes`` parts
    (for small detector messages cheaper than a ``zmq.Frame``), or, for one of more than ``raw.max_parts``
    parts, the error that refuses it."""
    group: list[list[bytes] | PhasestreamError] = []
    for _ in range(DRAIN_LIMIT):
        try:
            parts = [sock.recv(flags=zmq.NOBLOCK)]
        except zmq.Again:
            break
        group.append(_rest_of_message(sock, port, raw, parts))
    return group


def _rest_of_message(
    sock: zmq.Socket[bytes], port: str, raw: RawInput, parts: list[bytes]
) -> list[bytes] | PhasestreamError:
    """Receive the parts after the first; ZeroMQ delivers a message whole: once its first part is here, the
    rest are too."""
    while sock.getsockopt(zmq.RCVMORE):
        if len(parts) == raw.max_parts:
            return _too_many_parts(sock, port, raw, len(parts))
        parts.append(sock.recv(flags=zmq.NOBLOCK))
    return parts


def _too_many_parts(sock: zmq.Socket[bytes], port: str, raw: RawInput, kept: int) -> DetectorMessageError:
    """Drop the rest of a message of too many parts, one part at a time, and say what was refused."""
    dropped = 0
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(flags=zmq.NOBLOCK)
        dropped += 1
    return DetectorMessageError(
        f"a message on the {port} socket ({raw.endpoint}) has {kept + dropped} parts, more than the "
        f"{raw.max_parts} its raw input allows (max_parts); it is dropped unread. Is something other than "
        "the detector sending to this endpoint?",
        reason=TOO_MANY_PARTS,
    )

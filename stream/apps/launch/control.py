"""The launcher's control socket: the schema of the events its workers send (what
``stream/runtime/transport.py``'s ``StatusChannel`` sends), and the reading and parsing of one message.

The socket takes only this schema (``ControlEvent``: ``parse_control_message``), in messages of one part up
to ``CONTROL_MAX_MESSAGE_BYTES``; anything else raises ``ControlMessageError`` naming its
``ControlRejection``, which the launcher counts and skips.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from phasestream.errors import PhasestreamError

# A scan_end lists the runs of frames lost by index; 16 MiB holds about 800,000 of them.
CONTROL_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ControlRejection(StrEnum):
    """Why a message on the control socket was not taken."""

    NOT_JSON = "not_json"
    WRONG_SHAPE = "wrong_shape"  # JSON, but not one of the ControlEvent models
    TOO_LARGE = "too_large"
    MULTIPART = "multipart"
    UNKNOWN_SENDER = "unknown_sender"  # well formed, from no worker of this launcher
    IMPOSTOR = "impostor"  # a ready event whose pid is not the worker's process


class ControlMessageError(PhasestreamError):
    """A message on the launcher's control socket that it does not take; ``reason`` is a ControlRejection."""

    reason = ControlRejection.WRONG_SHAPE.value


class LogLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"


class _ControlModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A worker's label, <stage>.<worker> (stage names as in StageSpec; at most 64 workers).
    sender: str = Field(pattern=r"^[a-z][a-z0-9_]*\.[0-9]{1,2}$", max_length=128)


class ReadyEvent(_ControlModel):
    event: Literal["ready"]
    metrics_port: int = Field(ge=1, le=65535)
    pid: int = Field(gt=0)
    restarts: int = Field(ge=0)


class StoppedEvent(_ControlModel):
    event: Literal["stopped"]


class LogEvent(_ControlModel):
    event: Literal["log"]
    level: LogLevel
    reason: str = Field(min_length=1, max_length=128)
    text: str


class StatusEvent(_ControlModel):
    """Progress: each stage reports its own fields (frames_received, iteration, ...), any JSON."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event: Literal["status"]


class ScanEndEvent(_ControlModel):
    event: Literal["scan_end"]
    scan_uid: str = Field(min_length=1)
    frames_sent: int = Field(ge=0)
    accounting: dict[str, dict[str, int]]
    frames_lost_indices: list[tuple[int, int]] | None = None  # (first, last) runs, inclusive


ControlEvent = Annotated[
    ReadyEvent | StoppedEvent | LogEvent | StatusEvent | ScanEndEvent, Field(discriminator="event")
]
_CONTROL_EVENT: TypeAdapter[Any] = TypeAdapter(ControlEvent)


def parse_control_message(payload: bytes) -> ControlEvent:
    """The event in one control message; ``ControlMessageError`` (with a ``ControlRejection``) otherwise.

    Never raises anything else, whatever the bytes: the launcher counts the rejection and goes on.
    """
    if len(payload) > CONTROL_MAX_MESSAGE_BYTES:
        raise ControlMessageError(
            f"control message of {len(payload)} bytes, over the {CONTROL_MAX_MESSAGE_BYTES} allowed",
            reason=ControlRejection.TOO_LARGE,
        )
    try:
        return _CONTROL_EVENT.validate_json(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if errors and errors[0]["type"] == "json_invalid":
            raise ControlMessageError(
                f"control message is not JSON ({errors[0]['msg']}); it starts {payload[:40]!r}",
                reason=ControlRejection.NOT_JSON,
            ) from None
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(top level)'}: {error['msg']}"
            for error in errors[:3]
        )
        raise ControlMessageError(
            f"control message is not a phasestream event ({problems}); it starts {payload[:40]!r}",
            reason=ControlRejection.WRONG_SHAPE,
        ) from None


def receive_control(sock: zmq.Socket) -> bytes:
    """One message waiting on ``sock``; a multipart one is read to its end, part by part, and refused."""
    payload = sock.recv()
    parts = 1
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv()  # dropped at once: a flood of parts never piles up in memory
        parts += 1
    if parts > 1:
        raise ControlMessageError(
            f"control message of {parts} parts; events come in one", reason=ControlRejection.MULTIPART
        )
    return payload

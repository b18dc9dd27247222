"""Typed messages between stages: a pydantic header plus raw array buffers.

On the wire a message is a ZeroMQ multipart ``[header, payload, payload, ...]``. The header is the JSON
of the message model with its arrays replaced by their descriptions (name, dtype, shape); each array
travels as one contiguous buffer in the same order. No pickle, no positional tuples (DESIGN.md,
"Describe, then stream").
"""

from __future__ import annotations

import base64
import json
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
)

from phasestream.errors import WireFormatError

SCHEMA_VERSION = 1


class MessageKind(StrEnum):
    SCAN_START = "scan_start"
    FRAME_BATCH = "frame_batch"
    RECONSTRUCTION = "reconstruction"
    SCAN_END = "scan_end"


class Product(StrEnum):
    """What a Reconstruction carries; each has its own node under ``/reconstructions/<scan_uid>/``."""

    OBJECT = "object"  # the solver's estimate, with its probe
    MOSAIC = "mosaic"  # the neural preview stitched from per-frame predictions
    DENOISED = "denoised"  # the object after a denoiser


class PositionSource(StrEnum):
    POSITION_CHANNEL = "position_channel"
    BLUESKY = "bluesky"
    FILE = "file"


class ArraySpec(BaseModel):
    """How one raw buffer after the header is to be read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]


class Geometry(BaseModel):
    """Far-field geometry from the detector's start message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    energy_kev: float = Field(gt=0)
    detector_distance_m: float = Field(gt=0)
    pixel_size_m: float = Field(gt=0)
    detector_shape_px: tuple[int, int]
    detector_dtype: str


class Message(BaseModel):
    """Common header fields. Subclasses list their array fields in ``array_fields``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    array_fields: ClassVar[tuple[str, ...]] = ()

    schema_version: int = SCHEMA_VERSION
    scan_uid: str
    seq: int = Field(default=0, ge=0)


class ScanStart(Message):
    """Opens a scan. ``bad_pixel_mask`` (bool, the detector's shape, True = not measured) is empty (0, 0)
    when every pixel counts."""

    array_fields: ClassVar[tuple[str, ...]] = ("bad_pixel_mask",)

    kind: Literal[MessageKind.SCAN_START] = MessageKind.SCAN_START
    geometry: Geometry
    scan_shape: tuple[int, ...] = ()
    planned_frames: int = Field(ge=0)
    positions_source: PositionSource = PositionSource.POSITION_CHANNEL
    scan_extent_m: tuple[float, float, float, float] | None = Field(
        default=None, description="(y_min, y_max, x_min, x_max) of the probe centres, when known"
    )
    config_hash: str = ""
    # Each frame of this scan is the sum of this many detector frames (set by binning).
    frames_per_position: int = Field(default=1, ge=1)
    # Where each geometry value came from when not from the detector (value name → source), for provenance.
    geometry_overrides: dict[str, str] = Field(default_factory=dict)
    bad_pixel_mask: np.ndarray = Field(default_factory=lambda: np.zeros((0, 0), dtype=bool))

    @field_serializer("bad_pixel_mask", when_used="json")
    def _packed_mask(self, mask: np.ndarray) -> dict[str, Any]:
        """As JSON (the scan journal a restarted worker reads), the mask's bits packed, base64."""
        packed = np.packbits(np.asarray(mask, dtype=bool).reshape(-1))
        return {"shape": list(np.shape(mask)), "packed_bits": base64.b64encode(packed.tobytes()).decode()}

    @field_validator("bad_pixel_mask", mode="before")
    @classmethod
    def _unpacked_mask(cls, value: Any) -> Any:
        if isinstance(value, dict) and "packed_bits" in value:
            shape = tuple(int(n) for n in value["shape"])
            bits = np.frombuffer(base64.b64decode(value["packed_bits"]), dtype=np.uint8)
            return np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
        return value

    def __eq__(self, other: object) -> bool:
        # pydantic's == compares the mask array with ==, which has no single truth value.
        if not isinstance(other, ScanStart):
            return NotImplemented
        header = {"bad_pixel_mask"}
        return self.model_dump(exclude=header) == other.model_dump(exclude=header) and np.array_equal(
            self.bad_pixel_mask, other.bad_pixel_mask
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model that is not frozen

    def detector_mask(self) -> np.ndarray | None:
        """The bad-pixel mask as bool (H, W), or None when every pixel is measured."""
        mask = np.asarray(self.bad_pixel_mask, dtype=bool)
        return mask if mask.size and mask.any() else None


class FrameBatch(Message):
    """Consecutive frames of one scan; ``frames`` is one contiguous (n, H, W) buffer."""

    array_fields: ClassVar[tuple[str, ...]] = ("frames", "positions_m")

    kind: Literal[MessageKind.FRAME_BATCH] = MessageKind.FRAME_BATCH
    frame_indices: list[int]
    # How many detector frames each frame of this batch sums (1 before binning).
    detector_frames: list[int] | None = None
    # time.time() at which ingest received the first frame of the batch, for end-to-end latency.
    received_at_s: float = 0.0
    frames: np.ndarray
    positions_m: np.ndarray

    @property
    def first_index(self) -> int:
        return self.frame_indices[0]

    @property
    def last_index(self) -> int:
        return self.frame_indices[-1]

    def detector_frame_count(self) -> int:
        return sum(self.detector_frames) if self.detector_frames else len(self.frame_indices)


class Reconstruction(Message):
    """A solver's current estimate. ``object_pixel_size_m`` turns the canvas into metres."""

    array_fields: ClassVar[tuple[str, ...]] = ("object", "probe", "positions_m")

    kind: Literal[MessageKind.RECONSTRUCTION] = MessageKind.RECONSTRUCTION
    product: Product = Product.OBJECT
    algorithm: str
    iteration: int = Field(ge=0)
    positions_used: int = Field(ge=0)
    final: bool = False
    object_pixel_size_m: float = Field(gt=0)
    # Position (y, x) in metres of object pixel (0, 0), in the frame of the scan positions.
    origin_m: tuple[float, float] = (0.0, 0.0)
    quality: dict[str, float] = Field(default_factory=dict)
    # The solver's error after each epoch so far, and why it stopped (final estimates only).
    error_history: list[float] = Field(default_factory=list)
    stop_reason: str = ""
    object: np.ndarray
    probe: np.ndarray
    # Probe centres (y, x) in metres of the positions used so far, for viewers; (0, 2) when not sent.
    positions_m: np.ndarray = Field(default_factory=lambda: np.empty((0, 2)))


class ScanEnd(Message):
    """Closes a scan. ``accounting`` maps each stage to its counts so nothing goes missing silently.

    ``frames_sent`` is what the detector announced; every stage adds what it received, forwarded,
    binned and rejected (with the reason), so the last stage can prove that every frame is accounted for.
    """

    kind: Literal[MessageKind.SCAN_END] = MessageKind.SCAN_END
    frames_sent: int = Field(ge=0)
    accounting: dict[str, dict[str, int]] = Field(default_factory=dict)


AnyMessage = Annotated[ScanStart | FrameBatch | Reconstruction | ScanEnd, Field(discriminator="kind")]
_HEADER_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyMessage)


def encode(message: Message) -> list[Any]:
    """Turn a message into multipart frames: the JSON header, then one buffer per array field."""
    arrays = [np.ascontiguousarray(getattr(message, name)) for name in message.array_fields]
    header = message.model_dump(mode="json", exclude=set(message.array_fields))
    header["arrays"] = [
        {"name": name, "dtype": a.dtype.str, "shape": list(a.shape)}
        for name, a in zip(message.array_fields, arrays, strict=True)
    ]
    return [_dumps(header), *arrays]


def decode(frames: list[Any]) -> Message:
    """Parse multipart frames (bytes or zmq.Frame) back into a message; raise ``WireFormatError``."""
    if not frames:
        raise WireFormatError("empty multipart message: a phasestream message starts with a JSON header")
    raw = _frame_bytes(frames[0])
    try:
        header = _loads(raw)
    except ValueError as exc:
        raise WireFormatError(
            f"header is not JSON ({exc}); first bytes {bytes(raw[:40])!r}: is a detector or a foreign "
            "program connected to a phasestream stage's input?"
        ) from exc
    if not isinstance(header, dict):
        raise WireFormatError(f"header must be a JSON object, got {type(header).__name__}")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise WireFormatError(
            f"schema_version {version!r} is not {SCHEMA_VERSION}: run the same phasestream version "
            "on every stage"
        )
    specs = [ArraySpec.model_validate(s) for s in header.pop("arrays", [])]
    if len(specs) != len(frames) - 1:
        raise WireFormatError(
            f"header describes {len(specs)} arrays but {len(frames) - 1} buffers followed it"
        )
    for spec, frame in zip(specs, frames[1:], strict=True):
        header[spec.name] = _array_from_frame(spec, frame)
    try:
        return _HEADER_ADAPTER.validate_python(header)
    except ValidationError as exc:
        raise WireFormatError(f"invalid {header.get('kind')!r} message: {exc}") from exc


def _array_from_frame(spec: ArraySpec, frame: Any) -> np.ndarray:
    buffer = frame.buffer if hasattr(frame, "buffer") else frame
    dtype = np.dtype(spec.dtype)
    expected = dtype.itemsize * int(np.prod(spec.shape, dtype=np.int64))
    received = memoryview(buffer).nbytes
    if received != expected:
        raise WireFormatError(
            f"array {spec.name!r}: {received} bytes received, "
            f"{expected} expected for {spec.dtype}{list(spec.shape)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(spec.shape)


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _dumps(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Any:
    return json.loads(raw)

"""Typed messages between stages: a pydantic header plus raw array buffers.

On the wire a message is a ZeroMQ multipart ``[header, payload, payload, ...]``. The header is the JSON
of the message model with its arrays replaced by their descriptions (name, dtype, shape); each array
travels as one contiguous buffer in the same order. No pickle, no positional tuples: a
receiver checks the description before it touches a byte.
"""

from __future__ import annotations

import base64
import json
import math
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
    model_validator,
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


# What an array on the wire may be: bool, signed and unsigned integers, floats, complex. Object, string,
# datetime, void and structured dtypes are refused (an object dtype cannot come from raw bytes at all).
WIRE_DTYPE_KINDS = "biufc"
# numpy's own limit on dimensions; more is a hostile header, not an array.
MAX_ARRAY_DIMS = 32
# No array needs 2**62 bytes; a shape (or its non-zero part) beyond it would overflow numpy's sizes.
MAX_ARRAY_BYTES = 2**62


class ArraySpec(BaseModel):
    """How one raw buffer after the header is to be read.

    The description comes from the network: its dtype must be a plain numeric one and its shape
    non-negative, of at most ``MAX_ARRAY_DIMS`` dimensions and below ``MAX_ARRAY_BYTES``, so that the
    size it claims is exact Python arithmetic, never an overflowed int64 that a short buffer would match.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]

    @field_validator("dtype")
    @classmethod
    def _numeric_dtype(cls, text: str) -> str:
        _wire_dtype(text)
        return text

    @field_validator("shape")
    @classmethod
    def _sane_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) > MAX_ARRAY_DIMS:
            raise ValueError(f"{len(shape)} dimensions, more than numpy's {MAX_ARRAY_DIMS}")
        if any(n < 0 for n in shape):
            raise ValueError(f"shape {_shown(shape)} has a negative dimension")
        return shape

    @model_validator(mode="after")
    def _bounded_size(self) -> ArraySpec:
        # Zero-length dimensions make the product 0, yet numpy still multiplies the others: bound both.
        span = _wire_dtype(self.dtype).itemsize * math.prod(max(n, 1) for n in self.shape)
        if span >= MAX_ARRAY_BYTES:
            raise ValueError(f"shape {_shown(self.shape)} of {self.dtype} spans 2**62 bytes or more")
        return self

    @property
    def nbytes(self) -> int:
        """The exact size of the buffer this description claims."""
        return _wire_dtype(self.dtype).itemsize * math.prod(self.shape)


def _shown(shape: tuple[int, ...]) -> str:
    """A shape for a message, cut short: a hostile one may hold thousands of digits."""
    text = str(list(shape))
    return text if len(text) <= 80 else f"{text[:77]}..."


def _wire_dtype(text: str) -> np.dtype:
    """``text`` as a numpy dtype of a kind in ``WIRE_DTYPE_KINDS``; ValueError (for pydantic) otherwise."""
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"dtype {text[:40]!r} is not a numpy dtype ({exc})") from exc
    if dtype.kind not in WIRE_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {text[:40]!r} ({dtype}) is not bool, integer, float or complex")
    return dtype


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
    # The scan uid as the detector sent it, when that was not a safe name and ``scan_uid`` replaces it
    # (phasestream.runtime.scan_uid); None when it was used as sent.
    scan_uid_as_sent: str | None = None
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
_HEADER_ADAPTER: TypeAdapter[ScanStart | FrameBatch | Reconstruction | ScanEnd] = TypeAdapter(AnyMessage)
_ARRAY_FIELDS = frozenset(
    name for kind in (ScanStart, FrameBatch, Reconstruction, ScanEnd) for name in kind.array_fields
)


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
    """Parse multipart frames (bytes or zmq.Frame) back into a message; raise ``WireFormatError``.

    Anything the header gets wrong (not JSON, not an object, a foreign version, array descriptions that
    are not a list of objects, a dtype or shape that no buffer can honour, an array in the JSON) is a
    ``WireFormatError`` that names the field; no other exception leaves for a malformed message.
    """
    if not frames:
        raise WireFormatError("empty multipart message: a phasestream message starts with a JSON header")
    raw = _frame_bytes(frames[0])
    try:
        header = _loads(raw)
    except (ValueError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's stack, a few kB of '[' suffice.
        raise WireFormatError(
            f"header is not JSON ({type(exc).__name__}: {str(exc)[:200]}); first bytes {bytes(raw[:40])!r}: "
            "is a detector or a foreign program connected to a phasestream stage's input?"
        ) from exc
    if not isinstance(header, dict):
        raise WireFormatError(f"header must be a JSON object, got {type(header).__name__}")
    version = header.get("schema_version")
    if version != SCHEMA_VERSION:
        raise WireFormatError(
            f"schema_version {version!r} is not {SCHEMA_VERSION}: run the same phasestream version "
            "on every stage"
        )
    inline = sorted(_ARRAY_FIELDS.intersection(header))
    if inline:
        raise WireFormatError(
            f"header field(s) {inline} are arrays, which travel as buffers after the header, not in its JSON"
        )
    specs = _array_specs(header.pop("arrays", []))
    if len(specs) != len(frames) - 1:
        raise WireFormatError(
            f"header describes {len(specs)} arrays but {len(frames) - 1} buffers followed it"
        )
    for spec, frame in zip(specs, frames[1:], strict=True):
        header[spec.name] = _array_from_frame(spec, frame)
    try:
        return _HEADER_ADAPTER.validate_python(header)
    except ValidationError as exc:
        raise WireFormatError(f"invalid {str(header.get('kind'))[:40]!r} message: {exc}") from exc


def _array_specs(arrays: Any) -> list[ArraySpec]:
    """The header's ``arrays`` field as descriptions of array fields, each named once."""
    if not isinstance(arrays, list):
        raise WireFormatError(
            "header field 'arrays' must be a list of {name, dtype, shape} objects, "
            f"got {type(arrays).__name__}"
        )
    specs: list[ArraySpec] = []
    for index, raw in enumerate(arrays):
        if not isinstance(raw, dict):
            raise WireFormatError(
                f"header field arrays[{index}] must be a {{name, dtype, shape}} object, "
                f"got {type(raw).__name__}"
            )
        try:
            spec = ArraySpec.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}"
                for error in exc.errors()
            )
            raise WireFormatError(
                f"header field arrays[{index}] is not a valid array description: {problems}"
            ) from exc
        if spec.name not in _ARRAY_FIELDS:
            raise WireFormatError(
                f"header field arrays[{index}].name {spec.name[:40]!r} is none of the array fields "
                f"{sorted(_ARRAY_FIELDS)}"
            )
        if any(spec.name == other.name for other in specs):
            raise WireFormatError(f"header field arrays[{index}].name {spec.name!r} describes an array twice")
        specs.append(spec)
    return specs


def _array_from_frame(spec: ArraySpec, frame: Any) -> np.ndarray:
    """The buffer as the array its (validated) description claims, zero-copy; its size must match exactly."""
    buffer = frame.buffer if hasattr(frame, "buffer") else frame
    expected = spec.nbytes
    received = memoryview(buffer).nbytes
    if received != expected:
        raise WireFormatError(
            f"array {spec.name!r}: {received} bytes received, "
            f"{expected} expected for {spec.dtype}{list(spec.shape)}"
        )
    return np.frombuffer(buffer, dtype=np.dtype(spec.dtype)).reshape(spec.shape)


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _dumps(header: dict[str, Any]) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _loads(raw: bytes) -> Any:
    return json.loads(raw)

"""Decode DECTRIS Stream V2 messages (CBOR) into typed start / image / end records.

Spec: github.com/dectris/documentation ``stream_v2/README.md`` and ``cbor/dectris-compression-tag.md``.
An image's channel data is ``tag 40 [[dims...], tag 64|69|70 (typed array) <content>]`` where the content
is a byte string or ``tag 56500 [algorithm, elem_size, compressed bytes]``.

cbor2 ≥ 6 calls ``tag_hook(tag, immutable)`` (its docstring still says ``(decoder, tag)``; the old
signature fails with "error decoding semantic tag"), returns tag contents as tuples, and wraps any
exception raised in a hook in ``CBORDecodeError`` with the original as ``__cause__``. The hook here only
handles tag 40: the inner tags reach it undecoded, so the shape and dtype are known before decompression
and the compressed header can be checked against them (``dectris.compression`` raises ``MemoryError`` when
a garbage header claims a huge size). The hook checks the array's structure but leaves the bytes
compressed (``EncodedArray``): only the message knows which shape an array may have (an image any, the
start message's ``pixel_mask`` the image size), so each field decompresses its own array once that is
checked, and an array anywhere else is never decompressed.

Nothing a message declares is allocated unchecked: ``max_array_bytes`` bounds every array this module
decompresses, and a start message whose frames would be larger is refused (``frame_too_large``) before its
``pixel_mask`` is touched. With ``lazy_images`` an image comes back as ``EncodedImage``, its bytes still
compressed, so that a caller who knows the scan (ingest) checks the declared shape, dtype and size against
the start message before anything is decompressed: a 6 MB bslz4 message can declare a 1 GiB frame.

The image path is the ingest hot path. On the 2-core machine a 192 × 192 low-dose frame costs about 33 µs:
24 µs in ``dectris.compression`` (18 µs of it the bit-unshuffle), 4.5 µs in ``cbor2.loads``, the rest in
the checks below, so the checks stay cheap (type identity, one header unpack).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cbor2
import numpy as np
from dectris.compression import decompress

from phasestream.errors import DetectorMessageError

MULTIDIM_ARRAY_TAG = 40  # RFC 8746 row-major multi-dimensional array
COMPRESSION_TAG = 56500  # DECTRIS compressed byte string

# RFC 8746 typed-array tags: the little-endian unsigned counts a DECTRIS detector sends, plus signed and
# float frames that corrected streams (dark-subtracted, flat-fielded replays) carry; ingest checks those
# for negative and NaN values.
TYPED_ARRAY_DTYPES: dict[int, np.dtype] = {
    64: np.dtype(np.uint8),
    69: np.dtype("<u2"),
    70: np.dtype("<u4"),
    78: np.dtype("<i4"),
    85: np.dtype("<f4"),
}
IMAGE_DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "int32": np.dtype("<i4"),
    "float32": np.dtype("<f4"),
}

# HDF5 bitshuffle / LZ4 framing starts with the uncompressed size (u64 BE), then the block size (u32 BE).
_UNCOMPRESSED_SIZE = struct.Struct(">Q")
FRAMING_HEADER_BYTES = 12
# The largest array decoded unless the caller says otherwise: an EIGER2 XE 16M frame of uint32 is 72 MB.
MAX_ARRAY_BYTES = 2**28
FRAME_TOO_LARGE = "frame_too_large"  # the reason of a refused start or image whose frame exceeds the limit
# Every integer field (ids, sizes, counts, dimensions) is below this: DECTRIS sends 64-bit unsigned ones,
# and a larger one could not even be printed in an error message (Python limits int to str conversion).
INTEGER_LIMIT = 2**64


class MessageType(StrEnum):
    START = "start"
    IMAGE = "image"
    END = "end"


class Compression(StrEnum):
    BSLZ4 = "bslz4"  # bitshuffle + LZ4, HDF5 bitshuffle-filter framing
    LZ4 = "lz4"  # LZ4, HDF5 LZ4-filter framing


@dataclass(frozen=True, slots=True)
class StartMessage:
    series_id: int
    series_unique_id: str
    shape_px: tuple[int, int]  # (image_size_y, image_size_x)
    dtype: np.dtype
    number_of_images: int
    energy_kev: float
    detector_distance_m: float  # z of detector_translation
    pixel_size_m: float  # square pixels: pixel_size_x == pixel_size_y
    count_time_s: float | None
    frame_time_s: float | None
    user_data: Any  # as sent; phasestream's emitter sends {scan_uid, scan_shape, positions_source}
    # The detector's mask of the first channel, uint32 (H, W), 0 = good pixel (NXmx bits); None: not sent.
    pixel_mask: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class ImageMessage:
    series_id: int
    series_unique_id: str
    image_id: int
    frame: np.ndarray  # read-only view on the decompressed bytes, shape from the message
    channel: str  # the first channel of ``data``; phasestream runs the detector with one threshold


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An image message whose frame is still as sent (``decode_stream_v2(..., lazy_images=True)``).

    Check ``data.dimensions``, ``data.dtype`` and ``data.nbytes`` against what the scan expects, then
    ``data.decode()`` decompresses it (``DetectorMessageError`` when the bytes do not match).
    """

    series_id: int
    series_unique_id: str
    image_id: int
    data: EncodedArray
    channel: str


@dataclass(frozen=True, slots=True)
class EndMessage:
    series_id: int
    series_unique_id: str


def decode_stream_v2(
    buf: bytes | bytearray | memoryview,
    *,
    lazy_images: bool = False,
    max_array_bytes: int = MAX_ARRAY_BYTES,
) -> StartMessage | ImageMessage | EncodedImage | EndMessage:
    """Decode one Stream V2 message. Every failure raises ``DetectorMessageError`` naming the problem.

    No array larger than ``max_array_bytes`` is decompressed, and a start message whose frames would be
    larger is refused. ``lazy_images``: return an image as ``EncodedImage``, not decompressed.
    """
    try:
        message = cbor2.loads(buf, tag_hook=_tag_hook)
    except cbor2.CBORDecodeError as error:
        if isinstance(error.__cause__, DetectorMessageError):
            raise error.__cause__ from None
        raise DetectorMessageError(
            f"Stream V2 message of {len(buf)} bytes is not valid CBOR ({error}); "
            "check that the sender speaks Stream V2 (SIMPLON stream format 'cbor'), not the legacy stream"
        ) from error
    if type(message) is not dict:
        raise DetectorMessageError(
            f"Stream V2 message is a CBOR {type(message).__name__}, not a map: every Stream V2 message "
            "is a top-level map whose first key is 'type'"
        )
    kind = message.get("type")
    if kind == MessageType.IMAGE:
        series_id, series_unique_id, image_id, data, channel = _image_fields(message)
        if lazy_images:
            return EncodedImage(series_id, series_unique_id, image_id, data, channel)
        frame = _decoded_frame(image_id, data, max_array_bytes)
        return ImageMessage(series_id, series_unique_id, image_id, frame, channel)
    if kind == MessageType.START:
        return _parse_start(message, max_array_bytes)
    if kind == MessageType.END:
        return _parse_end(message)
    if kind is None:
        raise DetectorMessageError(
            f"Stream V2 message has no 'type' field (keys: {shown(_key_names(message), 200)}); "
            f"expected one of {[t.value for t in MessageType]}"
        )
    raise DetectorMessageError(
        f"unknown Stream V2 message type {shown(kind)}: known types are {[t.value for t in MessageType]}"
    )


def _tag_hook(tag: cbor2.CBORTag, immutable: bool) -> Any:
    if tag.tag == MULTIDIM_ARRAY_TAG:
        return _encoded_array(tag.value)
    # Typed-array and compression tags are decoded by their enclosing tag 40; anything else stays a tag.
    return tag


class EncodedArray:
    """A tag 40 array checked for structure, its bytes still as sent; ``decode()`` makes the ndarray.

    ``dimensions``, ``dtype`` and ``nbytes`` are what the sender declares: check them before ``decode()``.
    """

    __slots__ = ("content", "dimensions", "dtype", "tag")

    def __init__(self, dimensions: tuple[int, ...], dtype: np.dtype, tag: int, content: Any) -> None:
        self.dimensions = dimensions
        self.dtype = dtype
        self.tag = tag
        self.content = content  # bytes, or a compression tag

    @property
    def nbytes(self) -> int:
        """The size the decoded array has: check it before ``decode()`` allocates it."""
        return math.prod(self.dimensions) * self.dtype.itemsize

    def decode(self) -> np.ndarray:
        expected_bytes = self.nbytes
        content = self.content
        if type(content) is cbor2.CBORTag and content.tag == COMPRESSION_TAG:
            raw = _decompress(content.value, self.dtype, self.dimensions, expected_bytes)
        elif type(content) is bytes:
            raw = content
        else:
            raise DetectorMessageError(
                f"typed array tag {self.tag} holds {_summary(content)}: expected a byte string "
                f"or a compression tag {COMPRESSION_TAG}"
            )
        if len(raw) != expected_bytes:
            raise DetectorMessageError(
                f"declared shape {list(self.dimensions)} of {self.dtype} needs {expected_bytes} bytes but "
                f"the data holds {len(raw)} bytes: the dimensions or the typed-array tag do not match "
                "the data"
            )
        if not expected_bytes and math.prod(n for n in self.dimensions if n) * self.dtype.itemsize >= 2**63:
            # An empty array whose other dimensions no array can have: NumPy refuses the shape itself.
            raise DetectorMessageError(
                f"declared shape {list(self.dimensions)} of {self.dtype} is empty, but its other dimensions "
                "span more than 2**63 bytes: the dimensions are corrupt"
            )
        # One constructor call instead of frombuffer().reshape(): about 0.3 µs less on the hot path.
        return np.ndarray(self.dimensions, self.dtype, raw)


def _encoded_array(value: Any) -> EncodedArray:
    try:
        dimensions, typed_array = value
    except (TypeError, ValueError):
        raise DetectorMessageError(
            f"tag 40 content {_summary(value)} is not [dimensions, typed array]"
        ) from None
    if type(dimensions) is not tuple or not all(_is_size(n) for n in dimensions):
        raise DetectorMessageError(
            f"tag 40 dimensions {_summary(dimensions)} are not integers >= 0 of at most 64 bits"
        )
    if type(typed_array) is not cbor2.CBORTag or typed_array.tag not in TYPED_ARRAY_DTYPES:
        raise DetectorMessageError(
            f"tag 40 holds {_summary(typed_array)}: expected a typed array of a detector dtype, "
            f"one of the tags { {tag: str(dtype) for tag, dtype in TYPED_ARRAY_DTYPES.items()} }"
        )
    return EncodedArray(dimensions, TYPED_ARRAY_DTYPES[typed_array.tag], typed_array.tag, typed_array.value)


def _decompress(value: Any, dtype: np.dtype, shape: tuple[int, ...], expected_bytes: int) -> bytes:
    try:
        algorithm, elem_size, payload = value
    except (TypeError, ValueError):
        raise DetectorMessageError(
            f"compression tag {COMPRESSION_TAG} content {_summary(value)} "
            "is not [algorithm, elem_size, bytes]"
        ) from None
    if algorithm == Compression.BSLZ4:
        if elem_size != dtype.itemsize:
            raise DetectorMessageError(
                f"bslz4 elem_size={shown(elem_size)} does not match the typed array's {dtype} "
                f"({dtype.itemsize} bytes per element)"
            )
    elif algorithm != Compression.LZ4:
        raise DetectorMessageError(
            f"unknown compression algorithm {shown(algorithm)}: known are {[c.value for c in Compression]}"
        )
    if type(payload) is not bytes or len(payload) < FRAMING_HEADER_BYTES:
        raise DetectorMessageError(
            f"{algorithm} payload {_summary(payload)} is shorter than the {FRAMING_HEADER_BYTES}-byte "
            "HDF5 framing header (u64 BE size, u32 BE block size)"
        )
    (declared_bytes,) = _UNCOMPRESSED_SIZE.unpack_from(payload)
    if declared_bytes != expected_bytes:
        raise DetectorMessageError(
            f"{algorithm} header declares {declared_bytes} uncompressed bytes but the declared shape "
            f"{list(shape)} of {dtype} needs {expected_bytes}: the dimensions or the typed-array tag "
            "do not match the data"
        )
    try:
        decompressed: bytes = decompress(payload, algorithm, elem_size=dtype.itemsize)  # untyped package
        return decompressed
    except (RuntimeError, ValueError, MemoryError) as error:
        raise DetectorMessageError(
            f"{algorithm} payload of {len(payload)} bytes cannot be decompressed "
            f"({type(error).__name__}: {error}): the compressed blocks are corrupt or use another framing"
        ) from None


def _image_fields(message: dict[str, Any]) -> tuple[int, Any, int, EncodedArray, Any]:
    """(series_id, series_unique_id, image_id, the first channel's array, its name), checked."""
    try:
        image_id = message["image_id"]
        series_id = message["series_id"]
        series_unique_id = message["series_unique_id"]
        data = message["data"]
    except KeyError as missing:
        raise _missing_field(MessageType.IMAGE, missing) from None
    # Inline, not _check_integer: this is the hot path, and a call costs about 0.15 µs.
    if type(image_id) is not int or not 0 <= image_id < INTEGER_LIMIT:
        _check_integer(MessageType.IMAGE, "image_id", image_id, minimum=0)
    if type(series_id) is not int or not -INTEGER_LIMIT < series_id < INTEGER_LIMIT:
        _check_integer(MessageType.IMAGE, "series_id", series_id, minimum=None)
    if type(data) is not dict or not data:
        raise DetectorMessageError(
            f"image {image_id} 'data' is {_summary(data)}: expected a map of channel name to tag 40 array"
        )
    channel, frame = next(iter(data.items()))
    if type(frame) is not EncodedArray:
        raise DetectorMessageError(
            f"image {image_id} channel {shown(channel)} holds {_summary(frame)}, "
            "not a tag 40 multi-dimensional array"
        )
    return series_id, series_unique_id, image_id, frame, channel


def _decoded_frame(image_id: int, data: EncodedArray, max_array_bytes: int) -> np.ndarray:
    if data.nbytes > max_array_bytes:
        raise DetectorMessageError(
            f"image {image_id} declares a frame of {list(data.dimensions)} {data.dtype} "
            f"({data.nbytes} bytes), above the limit of {max_array_bytes} bytes: it is not decompressed "
            "(a decompression bomb, or a detector larger than the limit allows; raise the limit for it)",
            reason=FRAME_TOO_LARGE,
        )
    return data.decode()


def _parse_start(message: dict[str, Any], max_array_bytes: int) -> StartMessage:
    try:
        series_id = message["series_id"]
        series_unique_id = message["series_unique_id"]
        size_x = message["image_size_x"]
        size_y = message["image_size_y"]
        dtype_name = message["image_dtype"]
        number_of_images = message["number_of_images"]
        energy_ev = message["incident_energy"]
        translation = message["detector_translation"]
        pixel_size_x = message["pixel_size_x"]
        pixel_size_y = message["pixel_size_y"]
    except KeyError as missing:
        raise _missing_field(MessageType.START, missing) from None
    _check_integer(MessageType.START, "image_size_x", size_x, minimum=1)
    _check_integer(MessageType.START, "image_size_y", size_y, minimum=1)
    _check_integer(MessageType.START, "series_id", series_id, minimum=0)
    _check_integer(MessageType.START, "number_of_images", number_of_images, minimum=0)
    dtype = IMAGE_DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise DetectorMessageError(f"start image_dtype={shown(dtype_name)}: known are {list(IMAGE_DTYPES)}")
    frame_bytes = size_x * size_y * dtype.itemsize
    if frame_bytes > max_array_bytes:
        raise DetectorMessageError(
            f"start image_size_y={size_y} × image_size_x={size_x} of {dtype_name} makes frames of "
            f"{frame_bytes} bytes, above the limit of {max_array_bytes} bytes: the scan is refused (set "
            "the detector's ROI, or raise ingest's max_frame_bytes for a detector this large)",
            reason=FRAME_TOO_LARGE,
        )
    energy_kev = _positive_float("incident_energy", energy_ev) / 1000.0
    if not isinstance(translation, list | tuple) or len(translation) != 3:
        raise DetectorMessageError(
            f"start detector_translation={shown(translation)}: expected [x, y, z] in metres, "
            "z = sample distance"
        )
    detector_distance_m = _positive_float("detector_translation[2]", translation[2])
    pixel_x = _positive_float("pixel_size_x", pixel_size_x)
    pixel_y = _positive_float("pixel_size_y", pixel_size_y)
    if not math.isclose(pixel_x, pixel_y, rel_tol=1e-6):
        raise DetectorMessageError(
            f"start pixel_size_x={pixel_x} differs from pixel_size_y={pixel_y}: phasestream's far-field "
            "geometry needs square pixels"
        )
    return StartMessage(
        series_id=series_id,
        series_unique_id=series_unique_id,
        shape_px=(size_y, size_x),
        dtype=dtype,
        number_of_images=number_of_images,
        energy_kev=energy_kev,
        detector_distance_m=detector_distance_m,
        pixel_size_m=pixel_x,
        count_time_s=_optional_float(message, "count_time"),
        frame_time_s=_optional_float(message, "frame_time"),
        user_data=message.get("user_data"),
        pixel_mask=_pixel_mask(message, (size_y, size_x)),  # at most the frame size: checked above
    )


def _pixel_mask(message: dict[str, Any], shape_px: tuple[int, int]) -> np.ndarray | None:
    """The start's ``pixel_mask`` of the first channel as uint32 (H, W), checked before decompressing.

    Stream V2 sends ``{channel: tag 40 array}`` with unsigned counts (bit field, 0 = good). The shape
    must be the image size, so the decompressed size is bounded by H × W × 4 bytes whatever the
    header claims.
    """
    masks = message.get("pixel_mask")
    if masks is None:
        return None
    if type(masks) is not dict or not masks:
        raise DetectorMessageError(
            f"start pixel_mask is {_summary(masks)}: expected a map of channel name to a tag 40 array"
        )
    channels = message.get("channels")
    first = channels[0] if isinstance(channels, list | tuple) and channels else None
    channel = first if type(first) is str and first in masks else next(iter(masks))
    mask = masks[channel]
    if type(mask) is not EncodedArray:
        raise DetectorMessageError(
            f"start pixel_mask[{shown(channel)}] holds {_summary(mask)}, not a tag 40 multi-dimensional array"
        )
    if mask.dtype.kind != "u":
        raise DetectorMessageError(
            f"start pixel_mask[{shown(channel)}] is {mask.dtype}: a pixel mask is an unsigned bit field "
            "(uint8, uint16 or uint32)"
        )
    if mask.dimensions != shape_px:
        raise DetectorMessageError(
            f"start pixel_mask[{shown(channel)}] has shape {list(mask.dimensions)}, but the images are "
            f"{list(shape_px)} (image_size_y, image_size_x): the mask belongs to another detector or ROI"
        )
    return mask.decode().astype(np.uint32)


def _parse_end(message: dict[str, Any]) -> EndMessage:
    try:
        series_id = message["series_id"]
        series_unique_id = message["series_unique_id"]
    except KeyError as missing:
        raise _missing_field(MessageType.END, missing) from None
    _check_integer(MessageType.END, "series_id", series_id, minimum=None)
    return EndMessage(series_id=series_id, series_unique_id=series_unique_id)


def _is_size(value: Any) -> bool:
    return type(value) is int and 0 <= value < INTEGER_LIMIT


def _check_integer(kind: MessageType, name: str, value: Any, minimum: int | None) -> None:
    """An integer field: ``minimum`` (None: any) or more, and below 2**64 (``INTEGER_LIMIT``) either way."""
    if type(value) is not int or abs(value) >= INTEGER_LIMIT or (minimum is not None and value < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise DetectorMessageError(
            f"{kind.value} {name}={shown(value)}: expected an integer{at_least} of at most 64 bits"
        )


def _positive_float(name: str, value: Any) -> float:
    # An int is bounded before float(): math.isfinite raises OverflowError beyond the float range.
    if (type(value) is int and 0 < value < INTEGER_LIMIT) or (
        type(value) is float and math.isfinite(value) and value > 0
    ):
        return float(value)
    raise DetectorMessageError(f"start {name}={shown(value)}: expected a positive finite number")


def _optional_float(message: dict[str, Any], name: str) -> float | None:
    value = message.get(name)
    return None if value is None else _positive_float(name, value)


def _missing_field(kind: MessageType, missing: KeyError) -> DetectorMessageError:
    return DetectorMessageError(
        f"Stream V2 {kind.value} message lacks the required field {missing.args[0]!r}; "
        "the sender does not follow the Stream V2 specification"
    )


def _key_names(message: dict[Any, Any]) -> list[str]:
    return sorted(key if type(key) is str else shown(key) for key in message)


def _summary(value: Any) -> str:
    return f"{type(value).__name__} {shown(value)}"


def shown(value: Any, limit: int = 60) -> str:
    """``repr`` of a value from the wire, cut to ``limit`` characters; never raises."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer too long to print, or nesting too deep
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else f"{text[:limit]}…"

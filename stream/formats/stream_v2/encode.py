"""Encode DECTRIS Stream V2 messages (CBOR) the way a DCU sends them.

Spec: github.com/dectris/documentation ``stream_v2/README.md``. Each message is a top-level CBOR map whose
first key is ``type``; channel data is ``tag 40 [[height, width], tag 69 (<u2) tag 56500 ["bslz4", 2,
bytes]]``; times are Rationals ``[numerator, denominator]`` over a time-base frequency.

The builders return plain dicts and the array builder takes overrides, so tests can produce malformed
messages (wrong declared shape or dtype, garbage payload, unknown type) with the same code path.

bslz4 framing: ``bitshuffle.compress_lz4`` returns only the blocks (each a u32 BE compressed size plus LZ4
bytes); the HDF5 bitshuffle filter, and so Stream V2, prefixes a 12-byte header: the uncompressed size
(u64 BE) and the block size **in bytes** (u32 BE). ``dectris.compression.decompress`` expects that header
and fails on bare blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import bitshuffle
import cbor2
import numpy as np

from phasestream.formats.in_memory_scan import ScanInMemory
from phasestream.formats.stream_v2.decode import (
    COMPRESSION_TAG,
    IMAGE_DTYPES,
    MULTIDIM_ARRAY_TAG,
    TYPED_ARRAY_DTYPES,
    Compression,
    MessageType,
)

# Time base of the Rationals: DECTRIS detectors count in ticks of a fixed clock; 100 MHz is typical.
TIME_BASE_HZ = 100_000_000
# bitshuffle's default block (8 KiB), the size the HDF5 filter and DECTRIS use.
BSLZ4_BLOCK_BYTES = 8192
CHANNEL = "threshold_1"
# Frame time used when a caller does not give one (1 kHz).
NOMINAL_FRAME_TIME_S = 1e-3

_TYPED_ARRAY_TAG_BY_DTYPE = {dtype: tag for tag, dtype in TYPED_ARRAY_DTYPES.items()}
_DTYPE_NAME_BY_DTYPE = {dtype: name for name, dtype in IMAGE_DTYPES.items()}
_FRAMING_HEADER = struct.Struct(">QI")


def bslz4_compress(frame: np.ndarray) -> bytes:
    """Bitshuffle + LZ4 with the HDF5 filter framing that Stream V2 tag 56500 "bslz4" carries."""
    array = np.ascontiguousarray(frame)
    block_elements = BSLZ4_BLOCK_BYTES // array.itemsize
    blocks: np.ndarray = bitshuffle.compress_lz4(array, block_elements)  # untyped package
    return _FRAMING_HEADER.pack(array.nbytes, block_elements * array.itemsize) + blocks.tobytes()


def channel_array(
    frame: np.ndarray,
    *,
    compressed: bytes | None = None,
    declared_shape: tuple[int, ...] | None = None,
    typed_array_tag: int | None = None,
    algorithm: str = Compression.BSLZ4,
    elem_size: int | None = None,
) -> cbor2.CBORTag:
    """``tag 40 [shape, tag 64/69/70 tag 56500 [algorithm, elem_size, payload]]`` for one frame.

    Every override (a pre-compressed or garbage payload, another declared shape, typed-array tag,
    algorithm or element size) exists so that tests and the emitter's pre-encoding use one code path.
    """
    dtype = frame.dtype.newbyteorder("<")
    payload = bslz4_compress(frame.astype(dtype, copy=False)) if compressed is None else compressed
    compression = cbor2.CBORTag(
        COMPRESSION_TAG, [str(algorithm), dtype.itemsize if elem_size is None else elem_size, payload]
    )
    tag = _TYPED_ARRAY_TAG_BY_DTYPE[dtype] if typed_array_tag is None else typed_array_tag
    shape = list(frame.shape if declared_shape is None else declared_shape)
    return cbor2.CBORTag(MULTIDIM_ARRAY_TAG, [shape, cbor2.CBORTag(tag, compression)])


def rational(seconds: float) -> list[int]:
    return [round(seconds * TIME_BASE_HZ), TIME_BASE_HZ]


def start_fields(
    *,
    series_id: int,
    series_unique_id: str,
    shape_px: tuple[int, int],
    dtype: np.dtype | str,
    number_of_images: int,
    energy_kev: float,
    detector_distance_m: float,
    pixel_size_m: float,
    count_time_s: float,
    frame_time_s: float,
    user_data: Any,
    arm_date: datetime | None = None,
    pixel_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """A ``start`` message as a DCU with ``header_detail: basic`` sends it (no flatfield or LUT).

    ``pixel_mask`` (H, W), non-zero = pixel not measured, goes out as the DCU sends its mask with
    ``header_detail: all``: ``{channel: uint32 array}`` with ``pixel_mask_enabled``; it is not checked
    against ``shape_px``, so tests can send a wrong one. Float images have no saturation, so their start
    carries no ``saturation_value`` (the field is optional).
    """
    height, width = shape_px
    energy_ev = energy_kev * 1000.0
    wire = np.dtype(dtype).newbyteorder("<")
    saturation = {"saturation_value": int(np.iinfo(wire).max)} if wire.kind in "iu" else {}
    masks = (
        {}
        if pixel_mask is None
        else {"pixel_mask": {CHANNEL: channel_array(np.asarray(pixel_mask, np.uint32))}}
    )
    return {
        "type": MessageType.START.value,
        **_simulated_detector(),
        "arm_date": arm_date or datetime.now(UTC),
        "beam_center_x": width / 2,
        "beam_center_y": height / 2,
        "count_time": count_time_s,
        "detector_translation": [0.0, 0.0, detector_distance_m],
        "frame_time": frame_time_s,
        "image_dtype": _DTYPE_NAME_BY_DTYPE[wire],
        "image_size_x": width,
        "image_size_y": height,
        "incident_energy": energy_ev,
        "incident_wavelength": 12.3984198 / energy_kev,  # ångström, as the spec says
        "number_of_images": number_of_images,
        **masks,
        "pixel_mask_enabled": pixel_mask is not None,
        "pixel_size_x": pixel_size_m,
        "pixel_size_y": pixel_size_m,
        **saturation,
        "series_id": series_id,
        "series_unique_id": series_unique_id,
        "threshold_energy": {CHANNEL: energy_ev / 2},
        "user_data": user_data,
    }


def _simulated_detector() -> dict[str, Any]:
    """The start fields that describe the simulated detector itself, the same in every series."""
    return {
        "channels": [CHANNEL],
        "countrate_correction_enabled": False,
        "detector_description": "DECTRIS SELUN (phasestream simulator)",
        "detector_serial_number": "SIM-SELUN-0001",
        "flatfield_enabled": False,
        "goniometer": {},
        "sensor_material": "Si",
        "sensor_thickness": 450e-6,
        "virtual_pixel_interpolation_enabled": False,
    }


def start_fields_for_scan(
    scan: ScanInMemory,
    *,
    series_id: int,
    series_unique_id: str,
    scan_uid: str,
    frame_time_s: float,
) -> dict[str, Any]:
    """The start message for a simulated scan; positions travel on the position channel."""
    return start_fields(
        series_id=series_id,
        series_unique_id=series_unique_id,
        shape_px=(scan.frames.shape[1], scan.frames.shape[2]),
        dtype=scan.frames.dtype,
        number_of_images=len(scan.frames),
        energy_kev=scan.energy_kev,
        detector_distance_m=scan.detector_distance_m,
        pixel_size_m=scan.detector_pixel_size_m,
        count_time_s=frame_time_s,  # a SELUN counts continuously: no dead time between frames
        frame_time_s=frame_time_s,
        user_data={
            "scan_uid": scan_uid,
            "scan_shape": list(scan.scan_shape),
            "positions_source": "position_channel",
            # The planned scan's extent (y_min, y_max, x_min, x_max) of probe centres, as a Bluesky plan
            # announces it; it lets refine size its canvas before the first position arrives.
            "scan_extent_m": [
                float(scan.positions_m[:, 0].min()),
                float(scan.positions_m[:, 0].max()),
                float(scan.positions_m[:, 1].min()),
                float(scan.positions_m[:, 1].max()),
            ],
        },
    )


def image_fields(
    *,
    series_id: int,
    series_unique_id: str,
    image_id: int,
    data: cbor2.CBORTag,
    frame_time_s: float,
    count_time_s: float,
    series_date: datetime,
) -> dict[str, Any]:
    start_s = image_id * frame_time_s
    return {
        "type": MessageType.IMAGE.value,
        "data": {CHANNEL: data},
        "image_id": image_id,
        "real_time": rational(count_time_s),
        "series_date": series_date,
        "series_id": series_id,
        "series_unique_id": series_unique_id,
        "start_time": rational(start_s),
        "stop_time": rational(start_s + count_time_s),
        "user_data": None,
    }


def end_fields(*, series_id: int, series_unique_id: str) -> dict[str, Any]:
    return {"type": MessageType.END.value, "series_id": series_id, "series_unique_id": series_unique_id}


def encode_message(fields: Mapping[str, Any]) -> bytes:
    """Serialise a message map as given (key order kept), so a test can also put ``type`` elsewhere."""
    return cbor2.dumps(dict(fields))


def encode_image(
    frame: np.ndarray,
    *,
    series_id: int,
    series_unique_id: str,
    image_id: int,
    frame_time_s: float = NOMINAL_FRAME_TIME_S,
    series_date: datetime | None = None,
) -> bytes:
    """One ``image`` message with default timing; use ``image_fields`` + ``channel_array`` to vary it."""
    return encode_message(
        image_fields(
            series_id=series_id,
            series_unique_id=series_unique_id,
            image_id=image_id,
            data=channel_array(frame),
            frame_time_s=frame_time_s,
            count_time_s=frame_time_s,
            series_date=series_date or datetime.now(UTC),
        )
    )

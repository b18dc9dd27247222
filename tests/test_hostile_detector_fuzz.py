"""Property-based fuzzing of the detector-facing decoders and of ingest's start handling, in process.

Hypothesis builds Stream V2 start (with arbitrary ``user_data``), image and end messages and
position-channel messages; the contract is a named rejection or a valid result, never another
exception, and bounded memory. The attacks through real sockets are in ``test_hostile_detector.py``.
"""

from __future__ import annotations

import math
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_detector import DEFAULT_MAX_FRAME_BYTES, MIB, start_message
from test_ingest import (
    Series,
)

from phasestream.errors import DetectorMessageError, PhasestreamError, PositionError
from phasestream.formats.position_channel import PositionBatch, decode_positions
from phasestream.formats.stream_v2.decode import (
    COMPRESSION_TAG,
    MULTIDIM_ARRAY_TAG,
    EncodedImage,
    EndMessage,
    ImageMessage,
    StartMessage,
    decode_stream_v2,
)
from phasestream.formats.stream_v2.encode import (
    BSLZ4_BLOCK_BYTES,
)
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import ScanEnd, ScanStart
from phasestream.runtime.scan_uid import SAFE_SCAN_UID
from phasestream.runtime.topology import place
from phasestream.stages.ingest.stage import IngestStage

pytestmark = pytest.mark.slow  # 2000 examples per property: tens of seconds each

# ---- 8. property-based fuzzing of the decoders, in process ------------------------------------------------
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _more_digits_than_python_prints() -> int:
    return 10**5000  # a CBOR bignum; str() refuses integers of more than 4300 digits


# Tags cbor2 decodes itself (dates, bignums, decimals, references, sets, regexes, UUIDs, ...) and ours.
CBOR_TAGS = [0, 1, 2, 3, 4, 5, 21, 24, 25, 28, 29, 30, 32, 35, 36, 37, 256, 258, 260, 261, 55799]
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.builds(_more_digits_than_python_prints),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
)
JSON_LIKE = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-3, 3)), children, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from(CBOR_TAGS), children),
    ),
    max_leaves=6,
)
PHASESTREAM_USER_DATA = st.fixed_dictionaries(
    {},
    optional={
        "scan_uid": st.one_of(JSON_LIKE, st.sampled_from(["../x", "a/b", "", ".", "ok-1"])),
        "scan_shape": st.one_of(JSON_LIKE, st.lists(st.integers(-1, 2**40), max_size=4)),
        "scan_extent_m": st.one_of(JSON_LIKE, st.lists(st.floats(), min_size=4, max_size=4)),
        "positions_source": st.one_of(JSON_LIKE, st.sampled_from(["bluesky", "file", "position_channel"])),
        "geometry": st.one_of(
            JSON_LIKE, st.dictionaries(st.sampled_from(["energy_kev", "window_px", "beam_centre_px"]), LEAVES)
        ),
    },
)
USER_DATA = st.one_of(JSON_LIKE, PHASESTREAM_USER_DATA)
# Where the decoders pass user_data by (images, ends, the position channel): flat, and quicker to draw.
FLAT = st.one_of(LEAVES, st.dictionaries(st.text(max_size=6), LEAVES, max_size=3))
ODD_NUMBERS = st.one_of(LEAVES, st.integers(0, 2**64 + 2), st.integers(2**20, 2**33))
_SERIES = Series(7, "fuzz")


def _start_fields() -> dict[str, Any]:
    return cbor2.loads(start_message(_SERIES, 8, None))


START_FIELDS = _start_fields()
NUMBER_FIELDS = ["image_size_x", "image_size_y", "number_of_images", "series_id", "incident_energy"]
NUMBER_FIELDS += ["pixel_size_x", "pixel_size_y", "count_time", "frame_time", "detector_translation"]


@st.composite
def start_messages(draw: st.DrawFn) -> bytes:
    """A start message whose user_data is anything, with some numbers and sizes replaced by odd values."""
    fields = {**START_FIELDS, "user_data": draw(USER_DATA)}
    for name in draw(st.sets(st.sampled_from(NUMBER_FIELDS), max_size=3)):
        fields[name] = draw(ODD_NUMBERS)
    if draw(st.booleans()):
        dimensions = draw(st.sampled_from([[16, 16], [2**20, 2**20], [16, 16, 16], [16]]))
        fields["pixel_mask"] = {"threshold_1": _hostile_array(draw, dimensions)}
    return cbor2.dumps(fields)


def _hostile_array(draw: st.DrawFn, dimensions: object) -> cbor2.CBORTag:
    """A tag 40 array whose bslz4 header declares the size its dimensions need: believing it allocates."""
    typed_tag = draw(st.sampled_from([64, 69, 70, 78, 85, 72]))
    itemsize = {64: 1, 69: 2, 70: 4, 78: 4, 85: 4}.get(typed_tag, 8)
    sizes = dimensions if isinstance(dimensions, list) and all(type(n) is int for n in dimensions) else [1]
    declared = min(math.prod(sizes) * itemsize, 2**64 - 1) if all(n >= 0 for n in sizes) else 0
    header = struct.pack(">QI", declared, BSLZ4_BLOCK_BYTES) + draw(st.binary(max_size=48))
    kind = draw(st.sampled_from(["bslz4", "lz4", "bytes", "anything"]))
    if kind in ("bslz4", "lz4"):
        content = cbor2.CBORTag(COMPRESSION_TAG, [kind, itemsize, header])
    else:
        content = draw(st.binary(max_size=64) if kind == "bytes" else FLAT)
    return cbor2.CBORTag(MULTIDIM_ARRAY_TAG, [dimensions, cbor2.CBORTag(typed_tag, content)])


@st.composite
def image_messages(draw: st.DrawFn) -> bytes:
    dimensions = draw(
        st.one_of(
            st.lists(st.integers(0, 2**64 + 1), max_size=3),
            st.lists(st.integers(0, 2**12), min_size=2, max_size=2),
            st.just([16384, 16384]),
            LEAVES,
        )
    )
    fields: dict[Any, Any] = {
        "type": draw(st.sampled_from(["image", "image", "image", None, "calibration"])),
        "series_id": draw(st.one_of(st.integers(-3, 8), ODD_NUMBERS)),
        "series_unique_id": draw(st.one_of(st.just("fuzz"), LEAVES)),
        "image_id": draw(st.one_of(st.integers(0, 8), ODD_NUMBERS)),
        "data": {"threshold_1": _hostile_array(draw, dimensions)} if draw(st.integers(0, 5)) else draw(FLAT),
        "user_data": draw(FLAT),
    }
    if draw(st.booleans()):
        fields[draw(LEAVES)] = draw(FLAT)  # a key of any type: a bignum, bytes, a float
    return cbor2.dumps(fields)


@pytest.fixture(scope="module")
def ingest_in_process() -> IngestStage:
    """An ingest stage that is never run: its sockets open only in run(), so nothing is bound."""
    run_dir = Path(tempfile.mkdtemp(prefix="ps-fuzz-", dir="/tmp"))
    shutil.rmtree(run_dir)
    config = validate_pipeline({"run_dir": str(run_dir), "stages": [{"name": "ingest", "stage": "ingest"}]})
    return IngestStage.from_placement(place(config, "ingest", 0), config)


@FUZZ
@given(payload=start_messages())
def test_any_start_message_opens_a_well_formed_scan_or_is_refused_by_name(ingest_in_process, payload) -> None:
    try:
        start = decode_stream_v2(payload, lazy_images=True, max_array_bytes=DEFAULT_MAX_FRAME_BYTES)
    except DetectorMessageError as error:
        assert str(error)
        return
    assert isinstance(start, StartMessage)
    try:
        out = list(ingest_in_process.handle_raw("detector", [payload]))
    except PhasestreamError as error:  # a start refused by ingest (too many images) names why
        assert error.reason == "too_many_images" and "number_of_images" in str(error)
        return
    (scan_start,) = [message for message in out if isinstance(message, ScanStart)]
    assert SAFE_SCAN_UID.fullmatch(scan_start.scan_uid)
    assert all(type(n) is int and n >= 1 for n in scan_start.scan_shape)
    extent = scan_start.scan_extent_m
    assert extent is None or all(math.isfinite(value) for value in extent)
    # The journal a restarted worker reads back holds whatever came.
    assert ScanStart.model_validate_json(scan_start.model_dump_json()) == scan_start
    assert all(isinstance(message, ScanStart | ScanEnd) for message in out)


FUZZ_MAX_ARRAY_BYTES = MIB


@FUZZ
@given(payload=image_messages())
def test_any_image_message_is_decoded_or_refused_within_bounded_memory(payload: bytes) -> None:
    tracemalloc.start()
    try:
        decoded = _only_named_errors(
            lambda: decode_stream_v2(payload, max_array_bytes=FUZZ_MAX_ARRAY_BYTES), (DetectorMessageError,)
        )
        lazy = _only_named_errors(
            lambda: decode_stream_v2(payload, lazy_images=True), (DetectorMessageError,)
        )
        if isinstance(lazy, EncodedImage) and lazy.data.nbytes <= FUZZ_MAX_ARRAY_BYTES:
            _only_named_errors(lazy.data.decode, (DetectorMessageError,))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < FUZZ_MAX_ARRAY_BYTES + 8 * len(payload) + MIB, f"{peak} bytes traced"
    if isinstance(decoded, ImageMessage):
        frame = decoded.frame
        assert frame.nbytes == math.prod(frame.shape) * frame.dtype.itemsize <= FUZZ_MAX_ARRAY_BYTES


@FUZZ
@given(
    fields=st.fixed_dictionaries(
        {"type": st.just("end")},
        optional={"series_id": ODD_NUMBERS, "series_unique_id": LEAVES, "user_data": FLAT},
    )
)
def test_any_end_message_is_decoded_or_refused_by_name(fields: dict[str, Any]) -> None:
    end = _only_named_errors(lambda: decode_stream_v2(cbor2.dumps(fields)), (DetectorMessageError,))
    assert end is None or (isinstance(end, EndMessage) and type(end.series_id) is int)


@st.composite
def position_messages(draw: st.DrawFn) -> bytes:
    """Columns of one length (mostly) holding numbers, huge integers, NaN and anything JSON-like."""
    n = draw(st.integers(0, 6))
    ids = st.one_of(st.integers(0, 12), st.integers(-(2**70), 2**70), LEAVES)
    metres = st.one_of(st.floats(-1e-3, 1e-3), st.floats(), st.integers(-(2**70), 2**70), LEAVES)
    fields: dict[Any, Any] = {
        "type": draw(st.sampled_from(["positions", "positions", "end", "velocity"])),
        "series_id": draw(st.one_of(st.integers(0, 9), ODD_NUMBERS)),
        "image_id": draw(st.lists(ids, min_size=n, max_size=n)),
        "y_m": draw(st.lists(metres, min_size=n, max_size=n + draw(st.integers(0, 1)))),
        "x_m": draw(st.lists(metres, min_size=n, max_size=n)),
    }
    for name in draw(st.sets(st.sampled_from(["series_id", "image_id", "y_m", "x_m"]), max_size=1)):
        fields[name] = draw(FLAT)
    if draw(st.booleans()):
        fields[draw(st.text(max_size=6))] = draw(FLAT)  # a field the channel does not know
    return cbor2.dumps(fields)


@FUZZ
@given(payload=position_messages())
def test_any_position_message_is_decoded_to_valid_positions_or_refused_by_name(payload: bytes) -> None:
    decoded = _only_named_errors(lambda: decode_positions(payload), (DetectorMessageError, PositionError))
    if isinstance(decoded, PositionBatch):
        ids, positions = decoded.image_ids, decoded.positions_m
        assert ids.dtype == np.int64 and (ids >= 0).all() and len(np.unique(ids)) == len(ids)
        assert positions.dtype == np.float64 and positions.shape == (len(ids), 2)
        assert np.isfinite(positions).all()
        assert type(decoded.series_id) is int


def _only_named_errors(call: Callable[[], object], errors: tuple[type[Exception], ...]) -> object | None:
    try:
        return call()
    except errors as error:
        assert str(error), f"{type(error).__name__} without a message"
        return None

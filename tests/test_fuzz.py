"""Hostile input against every decoder that faces the network: the Stream V2 decoder, the position
channel, the Timepix3 decoder and the inter-stage wire format.

Each decoder may accept a message or refuse it with its own error type that names the problem; any other
exception (an IndexError, a MemoryError from a size field believed before the bytes exist, a hang) is a
bug. Hypothesis draws arbitrary bytes, valid messages with bytes flipped or cut, and structurally
plausible CBOR with wrong types and huge declared sizes. The example budget keeps the file under ten
seconds; the seed is derandomised so CI sees the same examples every run.
"""

from __future__ import annotations

from datetime import UTC, datetime

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phasestream.errors import DetectorMessageError, PositionError, WireFormatError
from phasestream.formats.position_channel import decode_positions, encode_positions, encode_positions_end
from phasestream.formats.stream_v2.decode import (
    COMPRESSION_TAG,
    MULTIDIM_ARRAY_TAG,
    ImageMessage,
    decode_stream_v2,
)
from phasestream.formats.stream_v2.encode import (
    channel_array,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
)
from phasestream.formats.tpx3.decode import Tpx3Decoder
from phasestream.runtime.messages import FrameBatch, ScanEnd, decode, encode

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SHAPE = (16, 12)


def _valid_stream_v2() -> list[bytes]:
    frame = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE) % 7
    start = start_fields(
        series_id=3,
        series_unique_id="fuzz",
        shape_px=SHAPE,
        dtype=np.uint16,
        number_of_images=4,
        energy_kev=8.8,
        detector_distance_m=2.0,
        pixel_size_m=75e-6,
        count_time_s=1e-3,
        frame_time_s=1e-3,
        user_data={"scan_uid": "fuzz"},
    )
    image = image_fields(
        series_id=3,
        series_unique_id="fuzz",
        image_id=1,
        data=channel_array(frame),
        frame_time_s=1e-3,
        count_time_s=1e-3,
        series_date=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return [
        encode_message(start),
        encode_message(image),
        encode_message(end_fields(series_id=3, series_unique_id="fuzz")),
    ]


VALID_STREAM_V2 = _valid_stream_v2()


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A valid message with some bytes overwritten, then possibly cut short or extended."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=8))


def _tag40(dimensions: object, typed_tag: int, content: object) -> cbor2.CBORTag:
    return cbor2.CBORTag(MULTIDIM_ARRAY_TAG, [dimensions, cbor2.CBORTag(typed_tag, content)])


# Values that a hostile or broken sender could put where numbers, byte strings and tags belong.
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=64),
    st.text(max_size=8),
    st.lists(st.integers(-5, 2**40), max_size=4),
)


@st.composite
def plausible_images(draw: st.DrawFn) -> bytes:
    """An image map whose tag 40 array has hostile dimensions, typed-array tags or compression fields."""
    dimensions = draw(
        st.one_of(
            st.lists(st.integers(0, 2**40), min_size=0, max_size=4),
            ODD_VALUES,
        )
    )
    typed_tag = draw(st.sampled_from([64, 69, 70, 78, 85, 72, 0, 2**20]))
    header = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "big") + draw(st.binary(min_size=0, max_size=20))
    choice = draw(st.integers(0, 4))
    if choice == 0:
        content = cbor2.CBORTag(COMPRESSION_TAG, ["bslz4", 2, header])
    elif choice == 1:
        content = cbor2.CBORTag(COMPRESSION_TAG, ["lz4", draw(ODD_VALUES), header])
    elif choice == 2:
        content = cbor2.CBORTag(COMPRESSION_TAG, [draw(ODD_VALUES), draw(ODD_VALUES), draw(ODD_VALUES)])
    else:
        content = draw(ODD_VALUES)
    fields = {
        "type": draw(st.sampled_from(["image", "start", "end", "unknown"])),
        "series_id": draw(st.one_of(st.integers(-3, 5), ODD_VALUES)),
        "series_unique_id": "fuzz",
        "image_id": draw(st.one_of(st.integers(-3, 2**70), ODD_VALUES)),
        "data": draw(st.one_of(st.just({"threshold_1": _tag40(dimensions, typed_tag, content)}), ODD_VALUES)),
    }
    return cbor2.dumps(fields)


def _only_named_errors(decoder, payload: bytes, errors: tuple[type[Exception], ...]) -> object | None:
    try:
        return decoder(payload)
    except errors as error:
        assert str(error), f"{type(error).__name__} without a message for {payload[:40]!r}"
        return None


@FUZZ
@given(st.binary(max_size=512))
@pytest.mark.slow
def test_stream_v2_decoder_refuses_arbitrary_bytes_with_its_own_error(payload: bytes) -> None:
    _only_named_errors(decode_stream_v2, payload, (DetectorMessageError,))


@FUZZ
@given(mutated(VALID_STREAM_V2))
@pytest.mark.slow
def test_stream_v2_decoder_survives_corrupted_messages(payload: bytes) -> None:
    decoded = _only_named_errors(decode_stream_v2, payload, (DetectorMessageError,))
    if isinstance(decoded, ImageMessage):
        # Whatever got through is self-consistent: the frame holds exactly the bytes its shape needs.
        assert decoded.frame.nbytes == int(np.prod(decoded.frame.shape)) * decoded.frame.dtype.itemsize


@FUZZ
@given(plausible_images())
@pytest.mark.slow
def test_stream_v2_decoder_refuses_hostile_sizes_and_types(payload: bytes) -> None:
    decoded = _only_named_errors(decode_stream_v2, payload, (DetectorMessageError,))
    if isinstance(decoded, ImageMessage):
        assert decoded.frame.nbytes <= len(payload) * 256  # never more than LZ4 can expand


@pytest.mark.parametrize(
    "header",
    [
        b"\x9b\x00\x00\x00\xff\xff\xff\xff\xff",  # an array claiming 2^40 items
        b"\xbb\x00\x00\x00\xff\xff\xff\xff\xff",  # a map claiming 2^40 pairs
        b"\x5b\x00\x00\x00\xff\xff\xff\xff\xff",  # a byte string claiming 1 TiB
    ],
)
def test_stream_v2_decoder_does_not_allocate_what_a_length_field_claims(header: bytes) -> None:
    with pytest.raises(DetectorMessageError, match="not valid CBOR"):
        decode_stream_v2(header + b"\x00" * 16)


POSITION_MESSAGES = [
    encode_positions(3, [0, 1, 2], np.array([[0.0, 1e-6], [1e-6, 2e-6], [2e-6, 3e-6]])),
    encode_positions_end(3),
]


@FUZZ
@given(st.one_of(st.binary(max_size=256), mutated(POSITION_MESSAGES)))
def test_position_channel_refuses_bad_messages_with_its_own_errors(payload: bytes) -> None:
    _only_named_errors(decode_positions, payload, (DetectorMessageError, PositionError))


@FUZZ
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["positions", "end", "x"])},
        optional={"series_id": ODD_VALUES, "image_id": ODD_VALUES, "y_m": ODD_VALUES, "x_m": ODD_VALUES},
    )
)
@pytest.mark.slow
def test_position_channel_refuses_mistyped_fields(fields: dict) -> None:
    _only_named_errors(decode_positions, cbor2.dumps(fields), (DetectorMessageError, PositionError))


@FUZZ
@given(st.binary(max_size=4096), st.integers(1, 4))
def test_timepix3_decoder_never_raises_on_arbitrary_bytes(payload: bytes, pieces: int) -> None:
    """Raw TPX3 is a byte stream: garbage is skipped and counted, never an exception, in any chunking."""
    decoder = Tpx3Decoder()
    step = max(1, len(payload) // pieces)
    for offset in range(0, len(payload), step):
        decoded = decoder.feed(payload[offset : offset + step])
        pixels = decoded.pixels
        assert len(pixels.address) == len(pixels.toa_ticks) == len(pixels.tot_clocks) == len(pixels.chip)
    assert decoder.finish().problems is not None


def _valid_wire() -> list[list[bytes]]:
    batch = FrameBatch(
        scan_uid="fuzz",
        seq=1,
        frame_indices=[0, 1],
        frames=np.zeros((2, *SHAPE), np.uint16),
        positions_m=np.zeros((2, 2)),
    )
    end = ScanEnd(scan_uid="fuzz", seq=2, frames_sent=2, accounting={"ingest.0": {"frames_forwarded": 2}})
    return [[bytes(part) for part in encode(message)] for message in (batch, end)]


VALID_WIRE = _valid_wire()


@st.composite
def mutated_wire(draw: st.DrawFn) -> list[bytes]:
    parts = list(draw(st.sampled_from(VALID_WIRE)))
    index = draw(st.integers(0, len(parts) - 1))
    parts[index] = draw(mutated([parts[index]])) if parts[index] else draw(st.binary(max_size=16))
    if draw(st.booleans()):
        parts = parts[: draw(st.integers(0, len(parts)))]
    return parts


@FUZZ
@given(mutated_wire())
@pytest.mark.slow
def test_wire_format_refuses_corrupted_messages_with_its_own_error(parts: list[bytes]) -> None:
    _only_named_errors(decode, parts, (WireFormatError,))

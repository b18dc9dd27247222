"""DECTRIS Stream V2 encode/decode, the position channel, and a real ZeroMQ round trip across processes."""

from __future__ import annotations

import multiprocessing
import queue
import struct
from datetime import UTC, datetime
from typing import Any

import bitshuffle
import cbor2
import numpy as np
import pytest
import zmq
from dectris.compression import decompress

from phasestream.errors import DetectorMessageError, PositionError
from phasestream.formats.position_channel import (
    PositionBatch,
    PositionsEnd,
    decode_positions,
    encode_positions,
    encode_positions_end,
    position_messages,
)
from phasestream.formats.stream_v2.decode import (
    EndMessage,
    ImageMessage,
    StartMessage,
    decode_stream_v2,
)
from phasestream.formats.stream_v2.encode import (
    bslz4_compress,
    channel_array,
    encode_image,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
    start_fields_for_scan,
)
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan
from phasestream.simulators.selun import SelunEmitter
from phasestream.simulators.sparse_frames import sparse_frames

SERIES = {"series_id": 7, "series_unique_id": "series-7"}
DATE = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def small_scan() -> SimulatedScan:
    return simulate_scan(ScanSimulationConfig(n_positions=150, photons_per_frame=1e5, seed=2))


def _start(**overrides: Any) -> dict[str, Any]:
    fields = start_fields(
        **SERIES,
        shape_px=(192, 192),
        dtype="uint16",
        number_of_images=10,
        energy_kev=8.8,
        detector_distance_m=2.0,
        pixel_size_m=75e-6,
        count_time_s=1e-4,
        frame_time_s=1e-4,
        user_data={"scan_uid": "abc", "scan_shape": [10], "positions_source": "position_channel"},
        arm_date=DATE,
    )
    fields.update(overrides)
    return fields


def _image(frame: np.ndarray, image_id: int = 3, **array_overrides: Any) -> dict[str, Any]:
    return image_fields(
        **SERIES,
        image_id=image_id,
        data=channel_array(frame, **array_overrides),
        frame_time_s=1e-4,
        count_time_s=1e-4,
        series_date=DATE,
    )


def _frame(seed: int = 0, mean: float = 0.05, dtype: type = np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).poisson(mean, (192, 192)).astype(dtype)


# --- round trips ------------------------------------------------------------------------------------------


def test_start_round_trip_in_si_units() -> None:
    buf = encode_message(_start())
    assert next(iter(cbor2.loads(buf))) == "type"  # the spec: every map begins with 'type'
    start = decode_stream_v2(buf)
    assert isinstance(start, StartMessage)
    assert start.series_id == 7 and start.series_unique_id == "series-7"
    assert start.shape_px == (192, 192)
    assert start.dtype == np.dtype("<u2")
    assert start.number_of_images == 10
    assert start.energy_kev == pytest.approx(8.8)
    assert start.detector_distance_m == 2.0
    assert start.pixel_size_m == 75e-6
    assert start.frame_time_s == 1e-4
    assert start.user_data["positions_source"] == "position_channel"
    raw = cbor2.loads(buf)
    assert raw["incident_energy"] == pytest.approx(8800.0)
    assert raw["incident_wavelength"] == pytest.approx(1.40891, rel=1e-5)  # ångström


def test_start_for_scan_carries_geometry_and_scan_identity(small_scan: SimulatedScan) -> None:
    fields = start_fields_for_scan(small_scan, **SERIES, scan_uid="uid-1", frame_time_s=1e-3)
    start = decode_stream_v2(encode_message(fields))
    assert isinstance(start, StartMessage)
    assert start.number_of_images == 150
    assert start.detector_distance_m == small_scan.detector_distance_m
    assert start.pixel_size_m == small_scan.detector_pixel_size_m
    positions = small_scan.positions_m
    assert start.user_data == {
        "scan_uid": "uid-1",
        "scan_shape": [150],
        "positions_source": "position_channel",
        "scan_extent_m": [
            positions[:, 0].min(),
            positions[:, 0].max(),
            positions[:, 1].min(),
            positions[:, 1].max(),
        ],
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("mean", [0.05, 40.0])
def test_image_round_trip_is_bit_exact(dtype: type, mean: float) -> None:
    frame = _frame(seed=1, mean=mean, dtype=dtype)
    buf = encode_message(_image(frame, image_id=12))
    assert next(iter(cbor2.loads(buf))) == "type"
    image = decode_stream_v2(buf)
    assert isinstance(image, ImageMessage)
    assert image.image_id == 12 and image.series_id == 7 and image.channel == "threshold_1"
    assert image.frame.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(image.frame, frame)


def test_image_rationals_and_end_round_trip() -> None:
    raw = cbor2.loads(encode_message(_image(_frame(), image_id=5)))
    assert raw["start_time"] == [50_000, 100_000_000]  # image 5 at 0.1 ms per frame
    assert raw["real_time"] == [10_000, 100_000_000]
    end = decode_stream_v2(encode_message(end_fields(**SERIES)))
    assert end == EndMessage(series_id=7, series_unique_id="series-7")


def test_payload_is_genuine_hdf5_framed_bslz4() -> None:
    frame = _frame(seed=4, mean=3.0)
    payload = bslz4_compress(frame)
    uncompressed_bytes, block_bytes = struct.unpack(">QI", payload[:12])
    assert uncompressed_bytes == frame.nbytes
    assert block_bytes == 8192
    blocks = np.frombuffer(payload[12:], dtype=np.uint8)
    unshuffled = bitshuffle.decompress_lz4(blocks, frame.shape, frame.dtype, block_bytes // frame.itemsize)
    np.testing.assert_array_equal(unshuffled, frame)
    by_dectris = np.frombuffer(decompress(payload, "bslz4", elem_size=2), dtype="<u2").reshape(frame.shape)
    np.testing.assert_array_equal(by_dectris, frame)
    # And the image message wraps exactly that: tag 40 [[192, 192], tag 69 tag 56500 ["bslz4", 2, payload]].
    array = cbor2.loads(encode_message(_image(frame)))["data"]["threshold_1"]
    assert array.tag == 40
    dimensions, typed = array.value
    assert list(dimensions) == [192, 192] and typed.tag == 69 and typed.value.tag == 56500
    assert tuple(typed.value.value) == ("bslz4", 2, payload)


def test_lz4_channel_data_decodes() -> None:
    """The spec's other algorithm: plain LZ4 blocks with the HDF5 LZ4-filter framing."""
    lz4_block = pytest.importorskip("lz4.block")
    frame = _frame(seed=6, mean=2.0)
    raw = frame.tobytes()
    block_bytes = 8192
    payload = struct.pack(">QI", len(raw), block_bytes)
    for offset in range(0, len(raw), block_bytes):
        block = lz4_block.compress(raw[offset : offset + block_bytes], store_size=False)
        payload += struct.pack(">I", len(block)) + block
    image = decode_stream_v2(encode_message(_image(frame, compressed=payload, algorithm="lz4", elem_size=0)))
    np.testing.assert_array_equal(image.frame, frame)


# --- malformed messages ------------------------------------------------------------------------------------

_GOOD_IMAGE = encode_message(_image(_frame()))
_PAYLOAD_SIZE = struct.pack(">QI", 192 * 192 * 2, 8192)


def _without(fields: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if key != name}


MALFORMED = {
    "garbage bytes": (b"\xff\x00 not cbor at all", "not valid CBOR"),
    "truncated": (_GOOD_IMAGE[:-100], "not valid CBOR"),
    "empty": (b"", "not valid CBOR"),
    "not a map": (cbor2.dumps(["type", "image"]), "not a map"),
    "no type": (cbor2.dumps({"series_id": 1}), "no 'type' field"),
    "unknown type": (cbor2.dumps({"type": "xyz"}), "unknown Stream V2 message type 'xyz': known types are"),
    "image without image_id": (encode_message(_without(_image(_frame()), "image_id")), "'image_id'"),
    "start without energy": (encode_message(_without(_start(), "incident_energy")), "'incident_energy'"),
    "end without series_id": (cbor2.dumps({"type": "end", "series_unique_id": "x"}), "'series_id'"),
    "declared shape too small": (
        encode_message(_image(_frame(), declared_shape=(100, 100))),
        "header declares 73728 uncompressed bytes but the declared shape [100, 100]",
    ),
    "declared uint32 with uint16 bytes": (
        encode_message(_image(_frame(), typed_array_tag=70)),
        "elem_size=2 does not match the typed array's uint32",
    ),
    "declared uint32 and elem_size 4": (
        encode_message(_image(_frame(), typed_array_tag=70, elem_size=4)),
        "declared shape [192, 192] of uint32 needs 147456",
    ),
    "garbage compressed blocks": (
        encode_message(_image(_frame(), compressed=_PAYLOAD_SIZE + bytes(range(256)) * 4)),
        "cannot be decompressed",
    ),
    "garbage header claims petabytes": (
        encode_message(_image(_frame(), compressed=struct.pack(">QI", 10**15, 8192) + b"\x00" * 64)),
        "header declares 1000000000000000 uncompressed bytes",
    ),
    "payload shorter than header": (encode_message(_image(_frame(), compressed=b"\x00" * 5)), "12-byte"),
    "unknown compression": (
        encode_message(_image(_frame(), algorithm="zstd9")),
        "unknown compression algorithm 'zstd9'",
    ),
    "float typed array": (
        encode_message(_image(_frame(), typed_array_tag=86)),
        "expected a typed array of a detector dtype",
    ),
    "uncompressed bytes of the wrong length": (
        encode_message(
            {
                **_image(_frame()),
                "data": {"threshold_1": cbor2.CBORTag(40, [[4, 4], cbor2.CBORTag(69, b"\0" * 30)])},
            }
        ),
        "needs 32 bytes but the data holds 30",
    ),
    "channel data not an array": (
        encode_message({**_image(_frame()), "data": {"threshold_1": 5}}),
        "not a tag 40",
    ),
    "image_dtype float64": (encode_message(_start(image_dtype="float64")), "image_dtype='float64'"),
    "non-square pixels": (encode_message(_start(pixel_size_y=55e-6)), "square pixels"),
    "negative distance": (
        encode_message(_start(detector_translation=[0, 0, -1.0])),
        "detector_translation[2]",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_raises_detector_message_error(case: str) -> None:
    buf, expected_text = MALFORMED[case]
    with pytest.raises(DetectorMessageError) as raised:
        decode_stream_v2(buf)
    assert expected_text in str(raised.value)


def test_corrupted_messages_never_escape_as_other_errors() -> None:
    rng = np.random.default_rng(11)
    original = np.frombuffer(_GOOD_IMAGE, dtype=np.uint8)
    decoded = rejected = 0
    for _ in range(300):
        corrupted = original.copy()
        where = rng.integers(0, len(corrupted), size=rng.integers(1, 4))
        corrupted[where] = rng.integers(0, 256, size=len(where))
        try:
            decode_stream_v2(corrupted.tobytes())
            decoded += 1
        except DetectorMessageError:
            rejected += 1
    assert rejected > 0 and decoded + rejected == 300


# --- position channel --------------------------------------------------------------------------------------


def test_positions_round_trip_in_batches() -> None:
    positions = np.random.default_rng(0).normal(scale=3e-6, size=(150, 2))
    messages = list(position_messages(4, positions, batch_size=64))
    assert len(messages) == 3
    batches = [decode_positions(message) for message in messages]
    assert all(isinstance(batch, PositionBatch) and batch.series_id == 4 for batch in batches)
    np.testing.assert_array_equal(np.concatenate([b.image_ids for b in batches]), np.arange(150))
    np.testing.assert_array_equal(np.concatenate([b.positions_m for b in batches]), positions)
    assert decode_positions(encode_positions_end(4)) == PositionsEnd(series_id=4)


def _positions_message(**overrides: Any) -> bytes:
    fields = {"type": "positions", "series_id": 1, "image_id": [0, 1, 2], "y_m": [0.0, 1e-6, 2e-6]}
    fields["x_m"] = [0.0, 0.0, 1e-6]
    fields.update(overrides)
    return cbor2.dumps(fields)


@pytest.mark.parametrize(
    ("buf", "error", "expected_text"),
    [
        (_positions_message(x_m=[0.0, 1.0]), PositionError, "differ in length"),
        (_positions_message(y_m=[0.0, float("nan"), 1.0]), PositionError, "image_id 1 is not finite"),
        (_positions_message(image_id=[5, 5, 6]), PositionError, "repeats image_id [5]"),
        (_positions_message(image_id=[0, -1, 2]), DetectorMessageError, "non-negative integers"),
        (_positions_message(y_m=[0.0, "a", 1.0]), DetectorMessageError, "not a number"),
        (_positions_message(type="pos"), DetectorMessageError, "unknown position message type 'pos'"),
        (
            cbor2.dumps({"type": "positions", "series_id": 1}),
            DetectorMessageError,
            "lacks the field 'image_id'",
        ),
        (b"\xff\xfe", DetectorMessageError, "not valid CBOR"),
        (cbor2.dumps([1, 2]), DetectorMessageError, "not a map"),
    ],
)
def test_bad_position_messages(buf: bytes, error: type[Exception], expected_text: str) -> None:
    with pytest.raises(error) as raised:
        decode_positions(buf)
    assert expected_text in str(raised.value)


def test_encode_positions_refuses_mismatched_or_non_finite_input() -> None:
    with pytest.raises(PositionError, match="one \\(y, x\\) row per image id"):
        encode_positions(1, [0, 1, 2], np.zeros((2, 2)))
    with pytest.raises(PositionError, match="image_id 11 is not finite"):
        encode_positions(1, [10, 11], np.array([[0.0, 0.0], [np.inf, 0.0]]))


# --- ZeroMQ across processes -------------------------------------------------------------------------------


def _emit_in_child(
    scan: SimulatedScan, raw_messages: list[bytes] | None, handshake: Any, report: Any
) -> None:
    """Child process: bind on OS-assigned ports, announce them, send, report what was sent."""
    with SelunEmitter("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", rate_hz=5000, send_timeout_s=30) as emitter:
        handshake.put((emitter.data_endpoint, emitter.positions_endpoint))
        if raw_messages is None:
            sent = emitter.emit(scan, "uid-zmq", series_id=3, progress=False)
        else:
            sent = emitter.emit_messages(raw_messages)
        report.put(sent)


def _start_child(
    scan: SimulatedScan, raw_messages: list[bytes] | None = None
) -> tuple[Any, Any, tuple[str, str]]:
    context = multiprocessing.get_context("spawn")
    handshake, report = context.Queue(), context.Queue()
    child = context.Process(target=_emit_in_child, args=(scan, raw_messages, handshake, report), daemon=True)
    child.start()
    try:
        endpoints = handshake.get(timeout=60)
    except queue.Empty:
        child.kill()
        pytest.fail("the emitter process did not report its endpoints within 60 s")
    return child, report, endpoints


def _receive_until_end(socket: zmq.Socket, decode: Any, end_type: type) -> list[Any]:
    received = []
    while True:
        if not socket.poll(timeout=30_000):
            pytest.fail(f"nothing arrived for 30 s after {len(received)} messages")
        try:
            received.append(decode(socket.recv()))
        except DetectorMessageError as error:
            received.append(error)
        if isinstance(received[-1], end_type):
            return received


def test_selun_emitter_to_pull_socket_across_processes(small_scan: SimulatedScan) -> None:
    child, report, (data_endpoint, positions_endpoint) = _start_child(small_scan)
    context = zmq.Context()
    try:
        data = context.socket(zmq.PULL)
        positions = context.socket(zmq.PULL)
        data.connect(data_endpoint)
        positions.connect(positions_endpoint)
        messages = _receive_until_end(data, decode_stream_v2, EndMessage)
        position_batches = _receive_until_end(positions, decode_positions, PositionsEnd)
        sent = report.get(timeout=30)
        child.join(timeout=30)
    finally:
        context.destroy(linger=0)
    assert child.exitcode == 0

    start, *images, end = messages
    assert isinstance(start, StartMessage) and start.series_id == 3 and start.number_of_images == 150
    assert start.user_data["scan_uid"] == "uid-zmq"
    assert end == EndMessage(series_id=3, series_unique_id=start.series_unique_id)
    assert [image.image_id for image in images] == list(range(150))
    np.testing.assert_array_equal(np.stack([image.frame for image in images]), small_scan.frames)

    *batches, positions_end = position_batches
    assert positions_end == PositionsEnd(series_id=3)
    assert [len(batch.image_ids) for batch in batches] == [64, 64, 22]
    np.testing.assert_array_equal(np.concatenate([b.image_ids for b in batches]), np.arange(150))
    np.testing.assert_array_equal(np.concatenate([b.positions_m for b in batches]), small_scan.positions_m)

    assert sent.data_messages_sent == 152 and sent.position_messages_sent == 4
    # The schedule is absolute: 150 images at 5 kHz take 149 intervals, less at most the 0.5 ms by which
    # the emitter may send a frame early rather than sleep for a shorter gap.
    assert sent.elapsed_s >= 149 / 5000 - 5e-4


def test_emitter_sends_injected_bad_messages_unchanged(small_scan: SimulatedScan) -> None:
    frames = sparse_frames(2, seed=9)
    raw = [
        encode_image(frames[0], **SERIES, image_id=0),
        b"\x9f garbage",
        cbor2.dumps({"type": "xyz"}),
        encode_image(frames[1], **SERIES, image_id=1),
        encode_message(end_fields(**SERIES)),
    ]
    child, report, (data_endpoint, _) = _start_child(small_scan, raw)
    context = zmq.Context()
    try:
        data = context.socket(zmq.PULL)
        data.connect(data_endpoint)
        received = _receive_until_end(data, decode_stream_v2, EndMessage)
        report.get(timeout=30)
        child.join(timeout=30)
    finally:
        context.destroy(linger=0)
    assert [type(item).__name__ for item in received] == [
        "ImageMessage",
        "DetectorMessageError",
        "DetectorMessageError",
        "ImageMessage",
        "EndMessage",
    ]
    np.testing.assert_array_equal(received[3].frame, frames[1])

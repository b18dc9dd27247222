"""The wire format: every message kind round-trips; malformed multiparts fail with a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq

from phasestream.errors import WireFormatError
from phasestream.runtime.messages import (
    FrameBatch,
    Geometry,
    Reconstruction,
    ScanEnd,
    ScanStart,
    decode,
    encode,
)

GEOMETRY = Geometry(
    energy_kev=8.8,
    detector_distance_m=2.0,
    pixel_size_m=75e-6,
    detector_shape_px=(192, 192),
    detector_dtype="uint16",
)


def _batch() -> FrameBatch:
    rng = np.random.default_rng(1)
    return FrameBatch(
        scan_uid="scan-1",
        seq=7,
        frame_indices=[10, 11, 12],
        detector_frames=[1, 2, 1],
        received_at_s=123.5,
        frames=rng.integers(0, 60000, (3, 8, 6), dtype=np.uint16),
        positions_m=rng.normal(size=(3, 2)),
    )


def test_every_kind_round_trips_with_arrays_bit_exact() -> None:
    rec = Reconstruction(
        scan_uid="scan-1",
        algorithm="epie",
        iteration=4,
        positions_used=3,
        object_pixel_size_m=2e-8,
        quality={"fourier_error": 0.1},
        object=(np.arange(12) * (1 + 2j)).astype(np.complex64).reshape(3, 4),
        probe=np.ones((2, 2), np.complex64),
    )
    messages = [
        ScanStart(scan_uid="scan-1", geometry=GEOMETRY, planned_frames=400, scan_extent_m=(0, 1e-6, 0, 2e-6)),
        _batch(),
        rec,
        ScanEnd(scan_uid="scan-1", frames_sent=400, accounting={"ingest.0": {"frames_received": 400}}),
    ]
    for message in messages:
        back = decode(encode(message))
        assert type(back) is type(message)
        for name in message.array_fields:
            original, copy = getattr(message, name), getattr(back, name)
            assert copy.dtype == original.dtype and np.array_equal(copy, original)
        assert back.model_dump(exclude=set(message.array_fields)) == message.model_dump(
            exclude=set(message.array_fields)
        )


def test_round_trip_through_real_zeromq_sockets_zero_copy() -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        batch = _batch()
        push.send_multipart(encode(batch), copy=False)
        assert pull.poll(5000)
        back = decode(pull.recv_multipart(copy=False))
        assert np.array_equal(back.frames, batch.frames) and back.frame_indices == [10, 11, 12]
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()


def test_header_and_buffers_are_described_not_pickled() -> None:
    header = json.loads(encode(_batch())[0])
    assert header["kind"] == "frame_batch"
    assert header["arrays"] == [
        {"name": "frames", "dtype": "<u2", "shape": [3, 8, 6]},
        {"name": "positions_m", "dtype": "<f8", "shape": [3, 2]},
    ]


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda f: [b"\x80\x04pickle?", *f[1:]], "not JSON"),
        (
            lambda f: [f[0].replace(b'"schema_version":1', b'"schema_version":99'), *f[1:]],
            "schema_version 99",
        ),
        (lambda f: f[:2], "describes 2 arrays but 1 buffers"),
        (lambda f: [f[0], f[1].tobytes()[:-2], f[2]], "bytes received"),
        (lambda f: [f[0].replace(b'"frame_batch"', b'"mystery"'), *f[1:]], "invalid 'mystery'"),
        (lambda f: [], "empty multipart"),
    ],
)
def test_malformed_multiparts_name_the_problem(mutate, fragment: str) -> None:
    frames = encode(_batch())
    with pytest.raises(WireFormatError, match=fragment):
        decode(mutate(frames))

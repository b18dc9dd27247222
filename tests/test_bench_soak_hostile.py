"""The soak with a hostile sender on the detector's sockets: every real frame still arrives and is accounted
for, every hostile message is counted under its reason, and ingest's log and memory stay bounded."""

from __future__ import annotations

from collections import Counter

import cbor2
import numpy as np
import pytest
from phasestream_bench.detector_emitter import POSITIONS_PER_MESSAGE, SERIES_ID, SHAPE_PX, RawMessage
from phasestream_bench.hostile_sender import BOMB_SHAPE_PX, WRONG_SHAPE_PX, Hostile, HostileMix
from phasestream_bench.soak import bench_soak
from phasestream_bench.soak_report import DROPPED, LOG_LIMIT_BYTES, REJECTED, SoakResult, format_soak_report

from phasestream.errors import DetectorMessageError, PositionError
from phasestream.formats.position_channel import PositionBatch, PositionsEnd, decode_positions
from phasestream.formats.stream_v2.decode import EncodedImage, EndMessage, StartMessage, decode_stream_v2

N_FRAMES = 640


def _decoded(message: RawMessage) -> object:
    """What ingest's decoders make of a one-part message: the message, or the error refusing it."""
    decode = decode_positions if message.on_positions else lambda b: decode_stream_v2(b, lazy_images=True)
    try:
        return decode(message.parts[0])
    except (DetectorMessageError, PositionError) as error:
        return error


def test_each_hostile_message_is_what_its_kind_says_and_in_stream_order() -> None:
    mix = HostileMix(0.2, seed=3)
    interleave = mix.for_scan("soak-check", N_FRAMES)
    reserved = mix.sent[Hostile.BOMB] + mix.sent[Hostile.WRONG_SHAPE]
    assert interleave.announced_frames == N_FRAMES + reserved
    assert sum(mix.sent[kind] for kind in Hostile if kind is not Hostile.UNSAFE_START) == 160  # 640·0.2/0.8
    assert set(mix.sent) == set(Hostile)  # 160 draws of 9 kinds: each drawn
    reserved_ids, beyond_ids = [], []
    for chunk, messages in interleave.after_chunk.items():
        sent = min(N_FRAMES, (chunk + 1) * POSITIONS_PER_MESSAGE)
        for message in messages:
            if len(message.parts) > 1:
                assert not message.on_positions and set(message.parts) == {b""} and len(message.parts) > 16
                continue
            decoded = _decoded(message)
            if isinstance(decoded, EncodedImage):
                image_id, data = decoded.image_id, decoded.data
                if data.dimensions == BOMB_SHAPE_PX:
                    assert data.nbytes == 2**30 and len(message.parts[0]) < 1024
                    reserved_ids.append(image_id)
                elif data.dimensions == WRONG_SHAPE_PX:
                    reserved_ids.append(image_id)
                elif image_id >= interleave.announced_frames:
                    beyond_ids.append(image_id)
                else:  # a duplicate: of an image already sent
                    assert data.dimensions == SHAPE_PX and image_id < sent
            elif isinstance(decoded, PositionBatch):
                assert decoded.series_id not in (SERIES_ID, SERIES_ID + 1)  # a series never started
            elif isinstance(decoded, PositionError):
                assert "is not finite" in str(decoded)
            else:
                assert isinstance(decoded, DetectorMessageError), decoded
    assert sorted(reserved_ids) == list(range(N_FRAMES, interleave.announced_frames))
    assert len(set(beyond_ids)) == len(beyond_ids) == mix.sent[Hostile.OUT_OF_RANGE]

    positions_end, start, end = (_decoded(message) for message in interleave.before_start)
    assert isinstance(positions_end, PositionsEnd) and isinstance(start, StartMessage)
    assert isinstance(end, EndMessage) and start.series_id == end.series_id == positions_end.series_id
    assert start.user_data["scan_uid"].startswith("../") and start.user_data["scan_shape"] is True


def test_non_finite_positions_name_the_images_of_the_next_chunk() -> None:
    mix = HostileMix(0.5, seed=1)
    interleave = mix.for_scan("soak-next", N_FRAMES)
    checked = 0
    for chunk, messages in interleave.after_chunk.items():
        for message in messages:
            fields = cbor2.loads(message.parts[0]) if message.on_positions else {}
            if fields.get("series_id") == SERIES_ID:
                first = (chunk + 1) * POSITIONS_PER_MESSAGE
                expected = range(first, first + 64) if first < N_FRAMES else range(first - 64, first)
                assert fields["image_id"] == list(expected)
                assert not np.isfinite(np.array([fields["y_m"], fields["x_m"]])).all()
                checked += 1
    assert checked == mix.sent[Hostile.NON_FINITE_POSITIONS] > 0


def test_a_hostile_message_counted_under_no_reason_or_a_long_log_is_a_problem() -> None:
    result = SoakResult(10, 64, 1.0, 1.0, hostile_fraction=0.1)
    result.hostile_sent = Counter({Hostile.GARBAGE: 3, Hostile.BOMB: 2, Hostile.ORPHAN_POSITIONS: 4})
    result.expected_rejections = Counter({"detector_message": 3, "frame_too_large": 2, "orphan_positions": 4})
    result.ingest_counters = {
        (REJECTED, "detector_message"): 3.0,
        (REJECTED, "frame_too_large"): 1.0,
        (DROPPED, "frame_too_large"): 1.0,
        (REJECTED, "orphan_positions"): 2.0,  # the rest still held: not a problem
        (REJECTED, "internal_error"): 1.0,
    }
    result.log_bytes = {"ingest.0": LOG_LIMIT_BYTES + 1, "sink.0": 90}
    problems = result.hostile_problems()
    assert len(problems) == 3
    assert "frame_too_large: 1 rejected, 2 expected" in problems[0]
    assert "internal_error" in problems[1] and "ingest.0" in problems[2]
    report = format_soak_report(result)
    assert "internal_error" in report and "hostile problems:" in report


@pytest.mark.slow
def test_a_hostile_soak_delivers_every_real_frame_and_counts_every_hostile_message() -> None:
    result = bench_soak(12.0, scan_frames=1024, load=0.5, hostile_fraction=0.1, progress=False)
    assert result.scans >= 1 and result.problems == []
    assert result.frames_accounted == result.frames_sent == result.scans * 1024
    # Every hostile message was counted under its reason (orphans once held long enough); nothing else.
    assert result.hostile_problems() == []
    rows = {row[0]: row[1:] for row in result.rejection_rows()}
    counted = [reason for reason, (_, rejected, _) in rows.items() if rejected > 0]
    assert len(counted) >= 8, rows
    assert rows["frame_too_large"][2] == rows["frame_too_large"][1] > 0  # the bombs' frames, dropped
    assert 0 < result.log_bytes["ingest.0"] < LOG_LIMIT_BYTES
    # VmHWM is the soak's peak, so no RSS sample exceeds it, up to the kernel's batching of per-thread RSS
    # counters (64 pages, 256 kB, per thread), which lets a VmRSS read run ahead of VmHWM by that much.
    counter_batching_mb = 1.0
    assert (
        result.peak_rss_mb["ingest.0"] >= max(mb for _, mb in result.rss_mb["ingest.0"]) - counter_batching_mb
    )
    report = format_soak_report(result)
    assert "hostile messages sent" in report and "| 10% |" in report

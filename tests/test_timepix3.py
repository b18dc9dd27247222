"""Timepix3 raw data (ASI SERVAL TPX3 format): encoder and vectorised decoder against an independent
per-word reference, time extension across many wraps, a simulated scan rebuilt into the exact frames that
produced it (in memory, over the TCP emitter, and through the ingest stage on real sockets), and how
unknown packet types, truncated chunks and stray bytes are reported without losing anything else.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections.abc import Iterable

import numpy as np
import pytest
import zmq
from phasestream_bench.tpx3 import bench_tpx3

from phasestream.errors import DetectorMessageError
from phasestream.formats.position_channel import encode_positions_end, position_messages
from phasestream.formats.tpx3.decode import Tpx3Decoder
from phasestream.formats.tpx3.frames import BuiltFrame, FrameBuilder
from phasestream.formats.tpx3.packets import TICK_NS, Tpx3Decoded, Tpx3Problem, pixel_column, pixel_row
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd, ScanStart
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.stage import Stage
from phasestream.runtime.topology import control_endpoint, place
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan
from phasestream.simulators.timepix3 import (
    Tpx3Emitter,
    Tpx3Timing,
    chunk,
    chunk_header,
    encode_tpx3,
    ns_to_ticks,
    pixel_address,
    pixel_words,
    scan_events,
    scan_payloads,
    tdc_words,
)
from phasestream.stages.tpx3_ingest import Tpx3IngestStage

PIXEL_PERIOD = 1 << 34  # ticks: the 34-bit pixel time wraps every 26.84 s
TDC_PERIOD = 1 << 36  # ticks: the TDC wraps every 107.37 s
FRAME_PX = 48
RECEIVE_TIMEOUT_S = 30.0


def ticks_of(seconds: float) -> int:
    return int(ns_to_ticks(seconds * 1e9))


# ---- an independent reference: one word at a time, straight from the SERVAL manual's bit table -----------
def reference_decode(stream: bytes) -> dict[str, list[tuple[int, ...]]]:
    """Raw (unextended) fields of every word, in stream order. Deliberately plain Python."""
    found: dict[str, list[tuple[int, ...]]] = {"pixels": [], "tdc": [], "global": [], "unknown": []}
    position = 0
    while position < len(stream):
        header = int.from_bytes(stream[position : position + 8], "little")
        assert header & 0xFFFFFFFF == int.from_bytes(b"TPX3", "little")
        chip, size = (header >> 32) & 0xFF, header >> 48
        for offset in range(position + 8, position + 8 + size, 8):
            word = int.from_bytes(stream[offset : offset + 8], "little")
            if word >> 60 == 0xB:
                address = (word >> 44) & 0xFFFF
                dcol, spix, pix = (address & 0xFE00) >> 8, (address & 0x01F8) >> 1, address & 0x7
                toa, tot, ftoa, spidr = (
                    (word >> 30) & 0x3FFF,
                    (word >> 20) & 0x3FF,
                    (word >> 16) & 0xF,
                    word & 0xFFFF,
                )
                ticks = (((spidr << 14) + toa) << 4) - ftoa
                found["pixels"].append((chip, dcol + pix // 4, spix + (pix & 0x3), ticks % PIXEL_PERIOD, tot))
            elif word >> 60 == 0x6:
                coarse, fine = (word >> 9) & (2**35 - 1), (word >> 5) & 0xF
                found["tdc"].append(
                    ((word >> 56) & 0xF, (word >> 44) & 0xFFF, (coarse << 1) | ((fine - 1) // 6))
                )
            elif word >> 56 == 0x44:
                found["global"].append((0x44, (word >> 16) & 0xFFFFFFFF))
            elif word >> 56 == 0x45:
                found["global"].append((0x45, (word >> 16) & 0xFFFF))
            elif word >> 60 not in (0x5, 0x7, 0xA):
                found["unknown"].append((word,))
        position += 8 + size
    return found


def decode_all(stream: bytes, piece_bytes: int | None = None, **options: int) -> Tpx3Decoded:
    """Decode a whole stream, fed in pieces of ``piece_bytes`` (all at once when None), as one result."""
    decoder = Tpx3Decoder(**options)
    step = piece_bytes or max(len(stream), 1)
    parts = [decoder.feed(stream[i : i + step]) for i in range(0, len(stream), step)] + [decoder.finish()]
    return _merge(parts)


def _merge(parts: list[Tpx3Decoded]) -> Tpx3Decoded:
    def cat(field: str, sub: str) -> np.ndarray:
        return np.concatenate([getattr(getattr(p, field), sub) for p in parts])

    counts: dict[str, int] = {}
    for part in parts:
        for key, n in part.packet_counts.items():
            counts[key] = counts.get(key, 0) + n
    first = parts[0]
    return Tpx3Decoded(
        pixels=type(first.pixels)(
            *(cat("pixels", s) for s in ("address", "toa_ticks", "tot_clocks", "chip"))
        ),
        tdc=type(first.tdc)(*(cat("tdc", s) for s in ("edge", "trigger_count", "time_ticks"))),
        global_time_ticks=np.concatenate([p.global_time_ticks for p in parts]),
        packet_counts=counts,
        problems=tuple(problem for part in parts for problem in part.problems),
    )


def random_hits(n: int, seed: int, span_s: float, start_s: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ticks = np.sort(rng.integers(ticks_of(start_s), ticks_of(start_s + span_s), n))
    return {
        "x_px": rng.integers(0, 256, n),
        "y_px": rng.integers(0, 256, n),
        "toa_ns": ticks * TICK_NS,
        "tot_ns": rng.integers(1, 1024, n) * 25.0,
    }


# ---- tier 1: bit layout against the manual and an independent reference ----------------------------------
def test_pixel_address_is_the_manuals_double_column_super_pixel_layout() -> None:
    # x = 3, y = 5: double column 1 (bits 15-9), super pixel 1 (bits 8-3), pixel 4·(x&1) + (y&3) = 5.
    assert int(pixel_address(np.array([3]), np.array([5]))[0]) == (1 << 9) | (1 << 3) | 5
    every = np.arange(1 << 16, dtype=np.uint16)
    x, y = pixel_column(every).astype(int), pixel_row(every).astype(int)
    assert len(set(zip(x.tolist(), y.tolist(), strict=True))) == 1 << 16  # a bijection onto 256 × 256
    assert x.max() == y.max() == 255
    assert np.array_equal(pixel_address(x, y), every)


def test_hand_built_words_decode_field_by_field() -> None:
    address, toa, tot, ftoa, spidr = 0x020D, 0x1234, 0x155, 7, 0xBEEF
    pixel = (0xB << 60) | (address << 44) | (toa << 30) | (tot << 20) | (ftoa << 16) | spidr
    edge, count, coarse, fine = 0xF, 0xABC, 123_456_789, 7
    tdc = (0x6 << 60) | (edge << 56) | (count << 44) | (coarse << 9) | (fine << 5)
    stream = chunk_header(2, 16) + pixel.to_bytes(8, "little") + tdc.to_bytes(8, "little")
    decoded = decode_all(stream)
    hit = decoded.pixels
    assert (int(hit.x_px[0]), int(hit.y_px[0]), int(hit.tot_clocks[0]), int(hit.chip[0])) == (3, 5, tot, 2)
    assert int(hit.toa_ticks[0]) == ((spidr << 14 | toa) << 4) - ftoa  # the first time anchors the chain
    assert (int(decoded.tdc.edge[0]), int(decoded.tdc.trigger_count[0])) == (edge, count)
    assert int(decoded.tdc.time_ticks[0]) % PIXEL_PERIOD == ((coarse << 1) | 1) % PIXEL_PERIOD
    assert decoded.problems == ()


def test_round_trip_matches_the_reference_decoder_word_for_word() -> None:
    hits = random_hits(400, seed=3, span_s=0.05)
    triggers_ns = np.linspace(hits["toa_ns"][0], hits["toa_ns"][-1], 6)[:-1].round() // TICK_NS * TICK_NS
    stream = encode_tpx3(**hits, trigger_ns=triggers_ns, chip=1, chunk_words=64)
    # Control words the decoder must recognise and skip: end of readout (0x71) and SPIDR packet id (0x50).
    control = np.array([(0x71 << 56) | (0xA0 << 48), (0x50 << 56) | 12345], np.uint64)
    stream += b"".join(chunk(control, chip=1))
    reference = reference_decode(stream)
    decoded = decode_all(stream)
    got = decoded.pixels
    ours = list(
        zip(
            got.chip.tolist(),
            got.x_px.tolist(),
            got.y_px.tolist(),
            (got.toa_ticks % PIXEL_PERIOD).tolist(),
            got.tot_clocks.tolist(),
            strict=True,
        )
    )
    assert ours == reference["pixels"]
    tdc = decoded.tdc
    assert (
        list(
            zip(
                tdc.edge.tolist(),
                tdc.trigger_count.tolist(),
                (tdc.time_ticks % TDC_PERIOD).tolist(),
                strict=True,
            )
        )
        == reference["tdc"]
    )
    # And against what went in: the global-time pair at the start makes the times absolute.
    assert np.array_equal(got.toa_ticks, ns_to_ticks(hits["toa_ns"]))
    assert np.array_equal(tdc.time_ticks, ns_to_ticks(triggers_ns))
    assert np.array_equal(got.x_px, hits["x_px"]) and np.array_equal(got.y_px, hits["y_px"])
    assert decoded.packet_counts["tpx3_control"] == decoded.packet_counts["spidr_control"] == 1
    assert reference["unknown"] == [] and decoded.problems == ()


# ---- tier 2: invariants of the time extension and the streaming decoder ----------------------------------
def test_time_extension_across_many_wraps_is_exact() -> None:
    # 250 s of detector time from 60 s on: the pixel clock wraps 9 times, the TDC twice, the trigger
    # counter once, ToA at every hit. Hits sit right at pixel wraps too, where FToA makes the raw time
    # −1..−15. Starting past the first wraps, only the global-time pair can make the times absolute.
    hits = random_hits(1500, seed=5, span_s=250.0, start_s=60.0)
    at_wraps = (np.arange(3, 12) * PIXEL_PERIOD)[:, None] + np.arange(-17, 17)[None, :]
    ticks = np.sort(np.concatenate([ns_to_ticks(hits["toa_ns"]), at_wraps.ravel()]))
    n = len(ticks)
    triggers = ticks_of(60.0) + np.arange(5000) * ticks_of(0.05)
    rng = np.random.default_rng(6)
    stream = encode_tpx3(
        rng.integers(0, 256, n),
        rng.integers(0, 256, n),
        ticks * TICK_NS,
        np.full(n, 50.0),
        triggers * TICK_NS,
    )
    decoded = decode_all(stream, piece_bytes=4093, block_words=257)
    assert np.array_equal(decoded.pixels.toa_ticks, ticks)
    assert np.array_equal(decoded.tdc.time_ticks, triggers)
    assert np.array_equal(decoded.tdc.trigger_count, (1 + np.arange(5000)) % 4096)
    # Without a global-time pair the times are right up to whole pixel periods, the same for every word.
    bare = decode_all(
        encode_tpx3(np.zeros(n, int), np.zeros(n, int), ticks * TICK_NS, np.full(n, 50.0), global_time=False)
    )
    offset = bare.pixels.toa_ticks - ticks
    assert np.all(offset == offset[0]) and offset[0] % PIXEL_PERIOD == 0
    # The frame builder unwraps the 12-bit trigger counter: ids run on past 4095.
    builder = FrameBuilder((2, 2))
    ids = [f.image_id for f in builder.add(decoded) + builder.finish()]
    assert ids == list(range(5000)) and builder.counts["triggers_missed"] == 0


def test_any_split_of_the_stream_decodes_the_same() -> None:
    hits = random_hits(3000, seed=7, span_s=0.2)
    stream = encode_tpx3(**hits, trigger_ns=hits["toa_ns"][::100], chunk_words=37)
    whole = decode_all(stream)
    cuts = np.sort(np.random.default_rng(8).choice(len(stream), 60, replace=False))
    decoder = Tpx3Decoder(block_words=100)
    pieces = [decoder.feed(part) for part in np.split(np.frombuffer(stream, np.uint8), cuts)]
    split = _merge([*pieces, decoder.finish()])
    for field in ("address", "toa_ticks", "tot_clocks"):
        assert np.array_equal(getattr(split.pixels, field), getattr(whole.pixels, field))
    assert np.array_equal(split.tdc.time_ticks, whole.tdc.time_ticks)
    assert split.problems == () and len(split.pixels) == 3000


def test_readout_disorder_changes_the_order_not_the_times() -> None:
    hits = random_hits(2000, seed=9, span_s=0.01)
    stream = encode_tpx3(**hits, readout_jitter_ns=20_000.0, seed=1)
    decoded = decode_all(stream)
    assert not np.all(np.diff(decoded.pixels.toa_ticks) >= 0)  # the jitter did reorder the stream
    assert np.array_equal(np.sort(decoded.pixels.toa_ticks), ns_to_ticks(hits["toa_ns"]))


# ---- tier 3: a simulated scan comes back as the frames that produced it -----------------------------------
@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        ScanSimulationConfig(
            detector_size_px=FRAME_PX,
            probe_diameter_px=16,
            probe_bright_field_diameter_px=30,
            n_positions=24,
            photons_per_frame=2000,
            seed=4,
        )
    )


def build_frames(stream: bytes, builder: FrameBuilder, piece_bytes: int = 6007) -> list[BuiltFrame]:
    decoder = Tpx3Decoder()
    frames = []
    for i in range(0, len(stream), piece_bytes):
        frames += builder.add(decoder.feed(stream[i : i + piece_bytes]))
    return frames + builder.add(decoder.finish()) + builder.finish()


@pytest.mark.parametrize(
    ("timing", "exposure"),
    [
        (Tpx3Timing(start_s=1.0), False),
        # Across the 26.84 s pixel wrap, with readout disorder and frames cut to the exposure.
        (Tpx3Timing(start_s=26.83, period_s=2e-3, exposure_s=1e-3, readout_jitter_ns=30_000.0), True),
    ],
)
def test_stream_decodes_to_the_frames_that_produced_it(
    scan: SimulatedScan, timing: Tpx3Timing, exposure: bool
) -> None:
    events = scan_events(scan.frames, timing)
    stream = b"".join(scan_payloads(events, chunk_words=300))
    builder = FrameBuilder(
        (FRAME_PX, FRAME_PX),
        events.origin_px,
        exposure_ticks=ticks_of(timing.exposure_s) if exposure else None,
        lateness_ticks=int(ns_to_ticks(timing.readout_jitter_ns)),
    )
    frames = build_frames(stream, builder)
    assert [f.image_id for f in frames] == list(range(len(scan.frames)))
    assert np.array_equal(np.stack([f.frame for f in frames]), scan.frames)  # counts match exactly
    assert builder.counts["events_binned"] == int(scan.frames.sum())
    assert sum(builder.counts.values()) == builder.counts["events_binned"]  # nothing else to report


def test_fixed_time_windows_without_triggers(scan: SimulatedScan) -> None:
    timing = Tpx3Timing(start_s=3.0)
    events = scan_events(scan.frames, timing)
    stream = encode_tpx3(events.x_px, events.y_px, events.toa_ns, events.tot_ns)  # no TDC words at all
    builder = FrameBuilder(
        (FRAME_PX, FRAME_PX),
        events.origin_px,
        window_ticks=ticks_of(timing.period_s),
        window_origin_ticks=ticks_of(timing.start_s),
    )
    frames = build_frames(stream, builder)
    assert np.array_equal(np.stack([f.frame for f in frames]), scan.frames)


def receive_all(endpoint: str) -> bytes:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=RECEIVE_TIMEOUT_S) as client:
        while block := client.recv(1 << 16):
            received += block
    return bytes(received)


def test_tcp_emitter_streams_a_scan_that_decodes_to_its_frames(scan: SimulatedScan) -> None:
    events = scan_events(scan.frames, Tpx3Timing(start_s=2.0))
    with Tpx3Emitter(port=0, accept_timeout_s=RECEIVE_TIMEOUT_S) as emitter:
        sender = threading.Thread(target=emitter.emit_scan, args=(events,))
        sender.start()
        stream = receive_all(emitter.endpoint)  # the emitter closes the connection at the scan's end
        sender.join(RECEIVE_TIMEOUT_S)
    frames = build_frames(stream, FrameBuilder((FRAME_PX, FRAME_PX), events.origin_px), piece_bytes=1 << 14)
    assert np.array_equal(np.stack([f.frame for f in frames]), scan.frames)


def test_a_lost_trigger_leaves_a_gap_in_the_image_ids(scan: SimulatedScan) -> None:
    timing = Tpx3Timing(start_s=1.0)
    events = scan_events(scan.frames, timing)
    payloads = scan_payloads(events)
    kept = [k for k in range(len(payloads)) if k != 3]
    # Exposure 3 without its TDC word: its hits fall between exposures 2 and 4.
    lost = encode_tpx3(
        *(
            getattr(events, f)[events.event_bounds[3] : events.event_bounds[4]]
            for f in ("x_px", "y_px", "toa_ns", "tot_ns")
        ),
        global_time=False,
    )
    stream = b"".join(payloads[k] if k != 3 else lost for k in range(len(payloads)))
    builder = FrameBuilder((FRAME_PX, FRAME_PX), events.origin_px, exposure_ticks=ticks_of(timing.exposure_s))
    frames = build_frames(stream, builder)
    assert [f.image_id for f in frames] == kept
    assert builder.counts["triggers_missed"] == 1
    assert builder.counts["events_between_exposures"] == int(scan.frames[3].sum())
    assert np.array_equal(np.stack([f.frame for f in frames]), scan.frames[kept])


def test_saturated_pixels_are_clipped_and_counted() -> None:
    stream = encode_tpx3(np.full(300, 7), np.full(300, 9), np.arange(300) * 1e3, np.full(300, 50.0), [0.0])
    builder = FrameBuilder((16, 16), dtype=np.uint8)
    (frame,) = build_frames(stream, builder)
    assert frame.frame[9, 7] == 255 and frame.frame.sum() == 255
    assert builder.counts["saturated_pixels"] == 1 and builder.counts["events_binned"] == 300


def test_hits_of_other_chips_are_kept_apart() -> None:
    ticks = np.arange(1, 201) * 1000
    words = pixel_words(np.arange(200) % 256, np.full(200, 3), ticks, np.ones(200))
    stream = b"".join(chunk(words[:100], chip=0, chunk_words=30) + chunk(words[100:], chip=1, chunk_words=30))
    stream = b"".join(chunk(tdc_words(np.array([0]), np.array([1])), chip=1)) + stream
    decoded = decode_all(stream)
    assert np.array_equal(decoded.pixels.chip, np.repeat([0, 1], 100))
    builder = FrameBuilder((256, 256), chip=1)
    (frame,) = builder.add(decoded) + builder.finish()
    assert frame.frame.sum() == 100 and builder.counts["events_other_chips"] == 100
    assert np.array_equal(np.flatnonzero(frame.frame[3]), np.arange(100, 200))


# ---- bad input: reported by value, nothing else lost ------------------------------------------------------
def plain_hits(n: int, first_tick: int = 1000) -> np.ndarray:
    ticks = first_tick + np.arange(n) * 64
    return pixel_words(np.arange(n) % 256, np.arange(n) // 256, ticks, np.full(n, 4))


def test_unknown_packet_types_are_reported_and_cost_nothing_else() -> None:
    hits = plain_hits(500)
    # 0x43: no such global-time word; 0x61: no such TDC edge.
    strange = np.array([0x1 << 60 | 5, 0x43 << 56, 0x61 << 56, 0x1 << 60 | 6], np.uint64)
    mixed = np.insert(hits, [10, 200, 201, 499], strange)
    decoded = decode_all(b"".join(chunk(mixed, chunk_words=128)))
    clean = decode_all(b"".join(chunk(hits, chunk_words=128)))
    for field in ("address", "toa_ticks", "tot_clocks"):
        assert np.array_equal(getattr(decoded.pixels, field), getattr(clean.pixels, field))
    assert decoded.packet_counts["unknown"] == 4
    assert all(
        isinstance(p, DetectorMessageError) and p.reason == Tpx3Problem.UNKNOWN_PACKET
        for p in decoded.problems
    )
    texts = " | ".join(str(p) for p in decoded.problems)
    assert "2 Timepix3 word(s) of unknown packet type 0x10" in texts
    assert "packet type 0x43" in texts and "packet type 0x61" in texts


@pytest.mark.parametrize("cut_bytes", [400, 404])
def test_a_truncated_chunk_is_reported_and_its_whole_words_decode(cut_bytes: int) -> None:
    first, second, third = plain_hits(80), plain_hits(100, 10**6), plain_hits(60, 2 * 10**6)
    # The second chunk declares 800 bytes, but the next header follows after ``cut_bytes``.
    stream = (
        b"".join(chunk(first)) + chunk_header(0, 800) + second.tobytes()[:cut_bytes] + b"".join(chunk(third))
    )
    for piece_bytes in (None, 97):
        decoded = decode_all(stream, piece_bytes=piece_bytes)
        expected = np.concatenate([first, second[:50], third])
        clean = decode_all(b"".join(chunk(expected)))
        assert np.array_equal(decoded.pixels.toa_ticks, clean.pixels.toa_ticks)
        assert np.array_equal(decoded.pixels.address, clean.pixels.address)
        (problem,) = decoded.problems
        assert problem.reason == Tpx3Problem.TRUNCATED_CHUNK
        assert f"declares 800 bytes but the next chunk header follows after {cut_bytes}" in str(problem)
        assert ("4 trailing bytes dropped" in str(problem)) == (cut_bytes % 8 != 0)


def test_a_stream_that_ends_inside_a_chunk_reports_it_at_finish() -> None:
    stream = b"".join(chunk(plain_hits(100), chunk_words=40))[:-12]  # the last chunk loses 1.5 words
    decoder = Tpx3Decoder()
    fed = decoder.feed(stream)
    assert len(fed.pixels) == 80 and fed.problems == () and decoder.pending_bytes == 8 + 20 * 8 - 12
    finished = decoder.finish()
    assert len(finished.pixels) == 18
    (problem,) = finished.problems
    assert problem.reason == Tpx3Problem.TRUNCATED_CHUNK and "the stream ended" in str(problem)


def test_bytes_outside_any_chunk_are_skipped_and_reported() -> None:
    hits = plain_hits(50)
    stream = b"\x01garbage!!!!!" + b"".join(chunk(hits, chunk_words=20))
    decoded = decode_all(stream)
    assert np.array_equal(decoded.pixels.toa_ticks, decode_all(b"".join(chunk(hits))).pixels.toa_ticks)
    (problem,) = decoded.problems
    assert problem.reason == Tpx3Problem.UNFRAMED_BYTES
    assert str(problem).startswith("13 bytes at stream offset 0")


def test_bench_reports_a_rate() -> None:
    assert bench_tpx3(20_000, repeats=1) > 0
    assert bench_tpx3(20_000, repeats=1, build_frames=True) > 0


# ---- the ingest stage, end to end on real sockets ----------------------------------------------------------
class Collector(Stage):
    """The last stage: keeps what arrives (its thread shares this process with the test)."""

    def setup(self) -> None:
        self.messages: list[Message] = []

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        self.messages.append(message)
        return ()

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            copied = {"frames": message.frames.copy(), "positions_m": message.positions_m.copy()}
            self.messages.append(message.model_copy(update=copied))
        return ()

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        self.messages.append(message)
        return ()


def test_ingest_stage_turns_tcp_streams_into_frame_batches(scan: SimulatedScan) -> None:
    events = scan_events(scan.frames, Tpx3Timing(start_s=5.0))
    n = len(scan.frames)
    with (
        tempfile.TemporaryDirectory(prefix="ps-tpx3-", dir="/tmp") as run_dir,
        Tpx3Emitter(port=0, positions_endpoint=f"ipc://{run_dir}/pos.sock", accept_timeout_s=60) as emitter,
    ):
        pipeline = validate_pipeline(
            {
                "name": "tpx3-test",
                "run_dir": run_dir,
                "detector": {
                    "data_endpoint": emitter.endpoint,
                    "positions_endpoint": emitter.positions_endpoint,
                },
                "stages": [
                    {
                        "name": "ingest",
                        "stage": "tpx3_ingest",
                        "config": {
                            "n_triggers": n,
                            "energy_kev": 8.8,
                            "detector_distance_m": 2.0,
                            "roi_origin_px": list(events.origin_px),
                            "roi_shape_px": [FRAME_PX, FRAME_PX],
                            "batch_size": 8,
                            "decode_bytes": 4096,
                        },
                    },
                    {"name": "collect", "stage": "test_timepix3:Collector"},
                ],
            }
        )
        control = zmq.Context.instance().socket(zmq.PULL)
        control.bind(control_endpoint(pipeline))
        ingest = Tpx3IngestStage.from_placement(place(pipeline, "ingest", 0), pipeline)
        collector = Collector.from_placement(place(pipeline, "collect", 0), pipeline)
        # Daemons: a failing test must not leave the session waiting for them.
        threads = [threading.Thread(target=stage.run, daemon=True) for stage in (collector, ingest)]
        for thread in threads:
            thread.start()
        # Measurement 1: one word of an unknown type rides along (reported; the frames come through whole),
        # and the positions come after the data: the open scan adopts the series that then arrives.
        payloads = scan_payloads(events)
        payloads.insert(5, b"".join(chunk(np.array([0x2 << 60], np.uint64))))
        emitter.send(payloads, {len(payloads) - 1: [*position_messages(7, scan.positions_m)]})
        emitter.send_positions([encode_positions_end(7)])
        # Measurement 2, a new connection: its positions go out first and wait for the data.
        emitter.send_positions([*position_messages(8, scan.positions_m[::-1]), encode_positions_end(8)])
        emitter.send(scan_payloads(events))
        seen = []
        for event in _control_events(control, RECEIVE_TIMEOUT_S):
            seen.append(event)
            if sum(e["event"] == "scan_end" and e["sender"] == "collect.0" for e in seen) == 2:
                break
        for stage in (ingest, collector):
            stage.request_stop()
        for thread in threads:
            thread.join(RECEIVE_TIMEOUT_S)
        seen += _control_events(control, 0)
        control.close(linger=0)
    assert not any(thread.is_alive() for thread in threads)
    warnings = [event for event in seen if event["event"] == "log"]
    assert resolve_stage("tpx3_ingest") is Tpx3IngestStage  # the registry finds it by name
    scans = _split_scans(collector.messages)
    assert len(scans) == 2 and scans[0][0].scan_uid != scans[1][0].scan_uid
    for (start, batches, end), positions_m in zip(
        scans, (scan.positions_m, scan.positions_m[::-1]), strict=True
    ):
        assert start.geometry.detector_shape_px == (FRAME_PX, FRAME_PX) and start.planned_frames == n
        assert [i for batch in batches for i in batch.frame_indices] == list(range(n))
        assert np.array_equal(np.concatenate([b.frames for b in batches]), scan.frames)
        assert np.array_equal(np.concatenate([b.positions_m for b in batches]), positions_m)
        assert unaccounted_frames(end.frames_sent, end.accounting) == []
        assert end.accounting["ingest.0"]["tpx3_events_binned"] == scan.frames.sum()
    assert scans[0][2].accounting["ingest.0"][Tpx3Problem.UNKNOWN_PACKET] == 1
    assert [w["reason"] for w in warnings] == [Tpx3Problem.UNKNOWN_PACKET]
    assert "unknown packet type 0x20" in warnings[0]["text"]


def _control_events(control: zmq.Socket, timeout_s: float) -> Iterable[dict]:
    """Control events as they come, until ``timeout_s`` passes without one."""
    while control.poll(int(timeout_s * 1000)):
        yield json.loads(control.recv())


def _split_scans(messages: list[Message]) -> list[tuple[ScanStart, list[FrameBatch], ScanEnd]]:
    scans, current = [], []
    for message in messages:
        current.append(message)
        if isinstance(message, ScanEnd):
            start, *batches, end = current
            assert isinstance(start, ScanStart) and all(isinstance(b, FrameBatch) for b in batches)
            scans.append((start, batches, end))
            current = []
    return scans

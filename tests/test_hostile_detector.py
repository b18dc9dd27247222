"""A hostile or broken sender on ingest's detector and position sockets.

Each attack goes through real sockets into a real ingest process (the launcher, the SELUN emitter's PUSH
sockets, ``test_ingest.FrameCollector`` behind it), and each test checks what it must cost: a warning that
names the value and the fix, a counter under its own ``reason`` in ingest's ``/metrics`` and, where a scan
is open, in that scan's accounting; ingest's memory stays bounded; and the next real scan still arrives
whole. The last part fuzzes the decoders in process with Hypothesis: a Stream V2 start, image or end
message, ``user_data`` included, and a position-channel message may be accepted or refused with the
project's own error, never anything else, and never by allocating what a size field claims.
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bitshuffle
import cbor2
import numpy as np
import pytest
from test_ingest import (
    BATCH_SIZE,
    DROPPED,
    INGEST,
    REJECTED,
    SHAPE_PX,
    IngestPipeline,
    ScanResult,
    Series,
    assert_forwarded,
    assert_texts,
    launched_ingest,
    make_frames,
    make_positions,
)

from phasestream.errors import PhasestreamError
from phasestream.formats.stream_v2.decode import (
    ImageMessage,
    decode_stream_v2,
)
from phasestream.formats.stream_v2.encode import (
    BSLZ4_BLOCK_BYTES,
    channel_array,
    encode_message,
    image_fields,
    start_fields,
)
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.scan_uid import SAFE_SCAN_UID, check_scan_uid, safe_scan_uid
from phasestream.simulators.selun import SelunEmitter

TESTS_DIR = Path(__file__).resolve().parent
ORPHAN_MAX_AGE_S = 1.5
MAX_ORPHAN_POSITIONS = 100_000
DEFAULT_MAX_FRAME_BYTES = 2**27  # IngestConfig's default, which the pipeline below keeps
DEFAULT_MAX_IMAGES = 10_000_000
WAIT_S = 30.0
MIB = 2**20


# ---- the pipeline under attack ----------------------------------------------------------------------------
class HostileEmitter(SelunEmitter):
    """The SELUN emitter, plus multipart messages of any number of parts (a DCU sends one part)."""

    def send_parts(self, parts: Sequence[bytes], *, positions: bool = False) -> None:
        socket = self._positions_socket if positions else self._data_socket
        socket.send_multipart(parts)


class HostilePipeline(IngestPipeline):
    emitter: HostileEmitter

    @property
    def ingest_pid(self) -> int:
        return self.launcher.workers[INGEST].process.pid

    @property
    def ingest_log(self) -> Path:
        return self.launcher.workers[INGEST].log_path

    def memory_kib(self, field: str) -> int:
        """``VmRSS`` or ``VmHWM`` (peak) of the ingest process, from /proc."""
        for line in Path(f"/proc/{self.ingest_pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.ingest_pid}/status")

    def reset_peak_memory(self) -> None:
        """Set ingest's VmHWM to its VmRSS now (Linux: ``clear_refs`` 5), so a test sees its own peak."""
        Path(f"/proc/{self.ingest_pid}/clear_refs").write_text("5")

    def metric(self, name: str, reason: str) -> float:
        return self.metrics().get((name, reason), 0.0)

    def wait_for_metric(self, name: str, reason: str, at_least: float) -> float:
        deadline = time.monotonic() + WAIT_S
        while (value := self.metric(name, reason)) < at_least:
            assert time.monotonic() < deadline, f"{name}{{reason={reason}}} is {value}, not {at_least}"
            time.sleep(0.05)
        return value


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostilePipeline]:
    config = {
        "batch_size": BATCH_SIZE,
        "position_grace_s": 1.0,
        "orphan_positions_max_age_s": ORPHAN_MAX_AGE_S,
        "max_orphan_positions": MAX_ORPHAN_POSITIONS,
    }
    with launched_ingest("hostile-detector", config, HostileEmitter, HostilePipeline) as launched:
        yield launched


# ---- building hostile messages --------------------------------------------------------------------------
def start_message(
    series: Series,
    n_images: int,
    user_data: Any,
    shape_px: tuple[int, int] = SHAPE_PX,
    dtype: str = "uint16",
    **extra: Any,
) -> bytes:
    fields = start_fields(
        series_id=series.series_id,
        series_unique_id=series.unique_id,
        shape_px=shape_px,
        dtype=dtype,
        number_of_images=n_images,
        energy_kev=8.8,
        detector_distance_m=2.0,
        pixel_size_m=75e-6,
        count_time_s=1e-3,
        frame_time_s=1e-3,
        user_data=user_data,
    )
    return encode_message({**fields, **extra})


def image_message(series: Series, image_id: int, data: cbor2.CBORTag) -> bytes:
    fields = image_fields(
        series_id=series.series_id,
        series_unique_id=series.unique_id,
        image_id=image_id,
        data=data,
        frame_time_s=1e-3,
        count_time_s=1e-3,
        series_date=datetime.now(UTC),
    )
    return encode_message(fields)


def bslz4_zeros(shape: tuple[int, ...], dtype: Any) -> bytes:
    """A genuine bslz4 stream (HDF5 framing) of an all-zero frame, built from one compressed block
    repeated: a few MB that decompress to any size, without the frame ever existing here."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    assert nbytes % BSLZ4_BLOCK_BYTES == 0
    elements = BSLZ4_BLOCK_BYTES // dtype.itemsize
    block = bitshuffle.compress_lz4(np.zeros(elements, dtype), elements).tobytes()
    return struct.pack(">QI", nbytes, BSLZ4_BLOCK_BYTES) + block * (nbytes // BSLZ4_BLOCK_BYTES)


def bomb(shape: tuple[int, int], dtype: Any) -> cbor2.CBORTag:
    """A tag 40 array of ``shape`` whose bytes are ``bslz4_zeros``."""
    return channel_array(np.zeros((1, 1), dtype), compressed=bslz4_zeros(shape, dtype), declared_shape=shape)


def a_scan(series: Series, n: int, seed: int) -> tuple[list[bytes], list[bytes], np.ndarray, np.ndarray]:
    """A good scan of ``series``: its data and position messages, frames and positions."""
    frames, positions = make_frames(n, seed=seed), make_positions(n)
    data = [series.start(n), *(series.image(i, frames[i]) for i in range(n)), series.end()]
    return data, [series.positions(range(n), positions), series.positions_end()], frames, positions


def run_good_scan(hostile: HostilePipeline, name: str, before: Callable[[], None]) -> ScanResult:
    """Call ``before`` (the attack), then send a good scan and check that it arrives whole."""
    series, n = Series.new(name), 8
    data, position_messages, frames, positions = a_scan(series, n, seed=11)

    def send() -> None:
        before()
        hostile.emitter.emit_messages(data, position_messages)

    result = hostile.run(series.scan_uid, send)
    assert_forwarded(result, range(n), frames, positions)
    assert result.accounting[INGEST]["frames_forwarded"] == n
    assert unaccounted_frames(result.frames_sent, result.accounting) == []
    return result


# ---- 1. path traversal through the scan uid -------------------------------------------------------------
UNSAFE_UIDS = {
    "parent directory": "../victim",
    "subdirectory": "a/b",
    "absolute path": "/tmp/ps-hostile-absolute",
    "10 kB": "x" * 10_000,
    "dot-dot": "..",
    "an integer": 5,
    "a list": ["victim"],
}


@pytest.mark.parametrize("case", list(UNSAFE_UIDS))
@pytest.mark.slow
def test_an_unsafe_scan_uid_is_replaced_by_a_safe_one_and_kept_as_sent(hostile, case: str) -> None:
    sent = UNSAFE_UIDS[case]
    series, n = Series.new("unsafe-uid"), 6
    frames, positions = make_frames(n, seed=21), make_positions(n)
    uid, as_sent = safe_scan_uid(sent)
    assert SAFE_SCAN_UID.fullmatch(uid) and uid not in (".", "..") and "/" not in uid
    data = [
        start_message(series, n, {"scan_uid": sent, "scan_shape": [n]}),
        *(series.image(i, frames[i]) for i in range(n)),
        series.end(),
    ]
    result = hostile.run_scan(uid, data, [series.positions(range(n), positions), series.positions_end()])

    assert result.start is not None and result.start["scan_uid"] == uid
    text = sent if isinstance(sent, str) else repr(sent)
    assert result.start["scan_uid_as_sent"] == as_sent == text[:1024]
    (warning,) = result.warnings_for("unsafe_scan_uid")
    for fragment in (repr(sent)[:20], f"runs as {uid!r}", "scan_uid_as_sent", "letters, digits"):
        assert fragment in warning, f"{fragment!r} not in {warning}"
    assert result.metric(REJECTED, "unsafe_scan_uid") == 1
    assert result.accounting[INGEST]["unsafe_scan_uid"] == 1
    assert_forwarded(result, range(n), frames, positions)
    assert unaccounted_frames(result.frames_sent, result.accounting) == []
    # The collector names its file by the uid: nothing was written outside its folder.
    assert not (hostile.run_dir.parent / "victim.npz").exists()
    assert not Path("/tmp/ps-hostile-absolute.npz").exists()


@pytest.mark.slow
def test_an_empty_scan_uid_falls_back_to_the_detectors_series_uid(hostile) -> None:
    series, n = Series.new("empty-uid"), 4
    frames, positions = make_frames(n, seed=22), make_positions(n)
    data = [
        start_message(series, n, {"scan_uid": ""}),
        *(series.image(i, frames[i]) for i in range(n)),
        series.end(),
    ]
    result = hostile.run_scan(
        series.unique_id, data, [series.positions(range(n), positions), series.positions_end()]
    )
    assert result.start["scan_uid"] == series.unique_id and result.start["scan_uid_as_sent"] is None
    assert result.warnings_for("unsafe_scan_uid") == []
    assert_forwarded(result, range(n), frames, positions)


def test_check_scan_uid_names_the_uid_and_where_it_came_from() -> None:
    assert check_scan_uid("scan-01_a.b", "a ScanStart") == "scan-01_a.b"
    for unsafe in ("../victim", "a/b", "", ".", "..", "-rf", "x" * 129, 7, None):
        with pytest.raises(PhasestreamError, match="from a ScanStart is not a safe name") as raised:
            check_scan_uid(unsafe, "a ScanStart")
        assert raised.value.reason == "unsafe_scan_uid"
    # Different unsafe uids never share a safe one; the same one always maps alike.
    assert safe_scan_uid("a/b")[0] != safe_scan_uid("a_b/")[0] != safe_scan_uid(["a/b"])[0]
    assert safe_scan_uid("../victim") == safe_scan_uid("../victim")


# ---- 2. a start announcing 10^9 images ----------------------------------------------------------------
@pytest.mark.slow
def test_a_start_announcing_a_billion_images_is_refused_and_the_next_scan_runs(hostile) -> None:
    greedy = Series.new("billion")
    frames = make_frames(3, seed=23)

    def attack() -> None:
        data = [
            start_message(greedy, 10**9, {"scan_uid": greedy.scan_uid}),
            *(greedy.image(i, frames[i]) for i in range(3)),
            greedy.end(),
        ]
        hostile.emitter.emit_messages(data)

    result = run_good_scan(hostile, "after-billion", attack)
    assert_texts(
        result.warnings_for("too_many_images"),
        f"start of series {greedy.series_id}",
        "number_of_images=1000000000",
        f"max_images_per_scan={DEFAULT_MAX_IMAGES}",
        "Split the acquisition",
    )
    assert result.metric(REJECTED, "too_many_images") == 1
    assert result.metric(REJECTED, "no_open_scan") == 3  # its images: no scan was opened for them
    # Had it opened, the next start would have closed it, and the collector would have written it.
    assert not (hostile.run_dir / f"{greedy.scan_uid}.npz").exists()


@pytest.mark.slow
def test_a_scan_announcing_millions_of_images_closes_without_allocating_them(hostile) -> None:
    series, n, sent = Series.new("millions"), DEFAULT_MAX_IMAGES, 4
    frames, positions = make_frames(sent, seed=24), make_positions(sent)
    data = [
        start_message(series, n, {"scan_uid": series.scan_uid}),
        *(series.image(i, frames[i]) for i in range(sent)),
        series.end(),
    ]
    hostile.reset_peak_memory()
    rss_kib = hostile.memory_kib("VmRSS")
    result = hostile.run_scan(
        series.scan_uid, data, [series.positions(range(sent), positions), series.positions_end()]
    )
    assert_forwarded(result, range(sent), frames, positions)
    assert result.accounting[INGEST]["missing_frames"] == n - sent
    assert unaccounted_frames(result.frames_sent, result.accounting) == []
    # set(range(10**7)) alone is more than 500 MB.
    assert hostile.memory_kib("VmHWM") - rss_kib < 64 * 1024


# ---- 3. a decompression bomb ----------------------------------------------------------------------------
def test_the_bomb_payload_is_a_genuine_bslz4_stream() -> None:
    """The builder below is honest: a small bomb decompresses to the zeros it declares."""
    image = decode_stream_v2(image_message(Series.new("bomb-check"), 0, bomb((64, 64), np.uint32)))
    assert isinstance(image, ImageMessage) and image.frame.shape == (64, 64) and not image.frame.any()


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_before_it_is_decompressed(hostile) -> None:
    series, n = Series.new("bomb"), 6
    frames, positions = make_frames(n, seed=25), make_positions(n)
    gigabyte = image_message(series, 2, bomb((16384, 16384), np.uint32))  # 1 GiB of uint32
    wrong_shape = image_message(series, 3, bomb((4096, 4096), np.uint16))  # 32 MiB: under the limit
    assert len(gigabyte) < 8 * MIB
    refused_start = Series.new("bomb-start")
    huge_start = start_message(
        refused_start,
        4,
        None,
        shape_px=(16384, 16384),
        dtype="uint32",
        pixel_mask={"threshold_1": bomb((16384, 16384), np.uint32)},
    )
    data = [
        huge_start,  # frames of 1 GiB, and a 1 GiB pixel mask: refused before the mask is touched
        series.start(n),
        *(series.image(i, frames[i]) for i in (0, 1)),
        gigabyte,
        wrong_shape,
        *(series.image(i, frames[i]) for i in (4, 5)),
        series.end(),
    ]
    hostile.reset_peak_memory()
    rss_kib = hostile.memory_kib("VmRSS")
    result = hostile.run_scan(
        series.scan_uid, data, [series.positions(range(n), positions), series.positions_end()]
    )

    # 6 MB messages are copied a few times on the way in; a decompressed bomb would add 32 MiB or 1 GiB.
    assert hostile.memory_kib("VmHWM") - rss_kib < 28 * 1024
    where = f"of scan {series.scan_uid}"
    start_text, image_text = result.warnings_for("frame_too_large")
    for fragment in (
        "image_size_y=16384 × image_size_x=16384 of uint32",
        "1073741824 bytes",
        "max_frame_bytes",
    ):
        assert fragment in start_text, f"{fragment!r} not in {start_text}"
    assert_texts(
        [image_text],
        f"image 2 {where}",
        "[16384, 16384] uint32 (1073741824 bytes)",
        f"max_frame_bytes={DEFAULT_MAX_FRAME_BYTES}",
        "(16, 16)",
        "without being decompressed",
    )
    assert_texts(result.warnings_for("wrong_shape"), f"image 3 {where}", "(4096, 4096)", "(16, 16)", "ROI")
    assert result.metric(REJECTED, "frame_too_large") == 2  # the start and image 2
    assert result.metric(DROPPED, "frame_too_large") == 1
    assert result.metric(DROPPED, "wrong_shape") == 1
    assert result.accounting[INGEST]["rejected_frame_too_large"] == 1
    assert result.accounting[INGEST]["rejected_wrong_shape"] == 1
    assert_forwarded(result, [0, 1, 4, 5], frames, positions)
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


# ---- 4. positions for a series that never starts ------------------------------------------------------
@pytest.mark.slow
def test_positions_of_a_series_that_never_starts_expire_by_age(hostile) -> None:
    orphan = Series.new("orphan-age")
    messages = [orphan.positions(range(10 * i, 10 * i + 10), make_positions(10)) for i in range(3)]
    held_s: list[float] = []

    def attack() -> None:
        before = hostile.metric(REJECTED, "orphan_positions")
        sent_s = time.monotonic()
        hostile.emitter.emit_messages([], messages)
        hostile.wait_for_metric(REJECTED, "orphan_positions", before + len(messages))
        held_s.append(time.monotonic() - sent_s)

    result = run_good_scan(hostile, "after-orphans", attack)
    assert held_s[0] >= ORPHAN_MAX_AGE_S  # kept a while for a start that may still come
    assert_texts(
        result.warnings_for("orphan_positions"),
        f"3 position messages (30 positions) of series {orphan.series_id}",
        f"orphan_positions_max_age_s={ORPHAN_MAX_AGE_S:g}",
        "check its series_id",
    )
    assert result.metric(REJECTED, "orphan_positions") == len(messages)


@pytest.mark.slow
def test_a_flood_of_orphan_positions_is_bounded_by_count(hostile) -> None:
    orphan = Series.new("orphan-flood")
    n_messages, per_message = 30, 50_000  # 1.5 million positions, 36 MB if all were held
    message = orphan.positions(range(per_message), make_positions(per_message))
    # At most MAX_ORPHAN_POSITIONS are held: two of these messages.
    held_at_most = MAX_ORPHAN_POSITIONS // per_message
    rss_kib: list[int] = []

    def flood() -> None:
        before = hostile.metric(REJECTED, "orphan_positions")
        hostile.emitter.emit_messages([], [message] * n_messages)
        hostile.wait_for_metric(REJECTED, "orphan_positions", before + n_messages - held_at_most)
        rss_kib.append(hostile.memory_kib("VmRSS"))

    def attack() -> None:
        # The first flood leaves the allocator's arenas at their working size; a second must not add to it.
        flood()
        flood()
        hostile.wait_for_metric(REJECTED, "orphan_positions", before + 2 * n_messages)  # the rest by age

    before = hostile.metric(REJECTED, "orphan_positions")
    result = run_good_scan(hostile, "after-orphan-flood", attack)
    by_count = [text for text in result.warnings_for("orphan_positions") if "max_orphan_positions" in text]
    assert by_count and f"of series {orphan.series_id}" in by_count[0]
    assert f"exceeded max_orphan_positions={MAX_ORPHAN_POSITIONS}" in by_count[0]
    assert result.metric(REJECTED, "orphan_positions") == 2 * n_messages
    first, second = rss_kib
    assert second - first < 12 * 1024, f"the second flood grew ingest by {second - first} KiB"


# ---- 5. one message of a hundred thousand parts -----------------------------------------------------
@pytest.mark.slow
def test_a_message_of_a_hundred_thousand_parts_is_refused_without_keeping_its_parts(hostile) -> None:
    series, n = Series.new("parts"), 4
    frames, positions = make_frames(n, seed=26), make_positions(n)
    parts = [b""] * 100_000

    def send() -> None:
        # On the position channel while no scan is open; on the detector's socket within the scan.
        hostile.emitter.send_parts(parts, positions=True)
        hostile.wait_for_metric(REJECTED, "too_many_parts", before + 1)
        hostile.emitter.emit_messages([series.start(n), *(series.image(i, frames[i]) for i in (0, 1))])
        hostile.emitter.send_parts(parts)
        hostile.emitter.emit_messages(
            [*(series.image(i, frames[i]) for i in (2, 3)), series.end()],
            [series.positions(range(n), positions), series.positions_end()],
        )

    before = hostile.metric(REJECTED, "too_many_parts")
    result = hostile.run(series.scan_uid, send)

    texts = result.warnings_for("too_many_parts")
    assert len(texts) == 2
    for port, text in zip(("positions", "detector"), texts, strict=True):
        for fragment in (f"on the {port} socket", "100000 parts", "more than the 16", "max_parts"):
            assert fragment in text, f"{fragment!r} not in {text}"
    assert result.metric(REJECTED, "too_many_parts") == 2
    assert result.accounting[INGEST]["undecodable_messages"] == 1  # the one within the scan
    assert_forwarded(result, range(n), frames, positions)
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


# ---- 6. a flood of one-byte messages ------------------------------------------------------------------
_LOGGED = re.compile(rb"rejected a message \(detector_message\)")
_LEFT_OUT = re.compile(rb"\(detector_message\)[^\n]*?(\d+) more lines of this reason were left out")


def _garbage_lines(log: bytes) -> tuple[int, int]:
    """(lines logged, lines the log says it left out) of ``detector_message`` rejections in ``log``."""
    return len(_LOGGED.findall(log)), sum(int(n) for n in _LEFT_OUT.findall(log))


@pytest.mark.slow
def test_a_flood_of_garbage_is_counted_in_full_and_logged_in_a_few_lines(hostile) -> None:
    n = 5_000
    log_before = hostile.ingest_log.stat().st_size

    def attack() -> None:
        before = hostile.metric(REJECTED, "detector_message")
        hostile.emitter.emit_messages([b"\xff%d" % (i % 10) for i in range(n)])
        hostile.wait_for_metric(REJECTED, "detector_message", before + n)

    result = run_good_scan(hostile, "after-garbage", attack)
    assert result.metric(REJECTED, "detector_message") == n

    def grown() -> bytes:
        with hostile.ingest_log.open("rb") as log:
            log.seek(log_before)
            return log.read()

    # The lines left out are summed up once the log interval (5 s) of the first line is over.
    deadline = time.monotonic() + 15
    while sum(_garbage_lines(grown())) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    logged, left_out = _garbage_lines(grown())
    assert logged + left_out == n and 0 < logged <= 10
    assert len(grown()) < 20_000 and grown().count(b"\n") < 50


# ---- 7. user_data of the wrong types --------------------------------------------------------------------
GOOD_EXTENT_M = [-1e-6, 1e-6, -2e-6, 2e-6]
BAD_USER_DATA = {
    "scan_shape true": ({"scan_shape": True}, ["scan_shape=True", "positive integers"]),
    "scan_shape 1e300": ({"scan_shape": [1e300]}, ["scan_shape=[1e+300]", "valid integer"]),
    "scan_extent_m a string": ({"scan_extent_m": "0"}, ["scan_extent_m='0'", "y_min, y_max"]),
    "scan_extent_m nan": ({"scan_extent_m": [math.nan, 1e-6, 0.0, 1e-6]}, ["scan_extent_m=[nan", "finite"]),
    "scan_extent_m reversed": ({"scan_extent_m": [1e-6, -1e-6, 0.0, 1e-6]}, ["minimum is above"]),
    "positions_source 5": ({"positions_source": 5}, ["positions_source=5", "'position_channel'"]),
}


@pytest.mark.parametrize("case", list(BAD_USER_DATA))
@pytest.mark.slow
def test_a_user_data_field_of_the_wrong_type_is_named_and_left_out(hostile, case: str) -> None:
    bad, fragments = BAD_USER_DATA[case]
    (field,) = bad
    series, n = Series.new("user-data"), 6
    frames, positions = make_frames(n, seed=27), make_positions(n)
    good = {"scan_uid": series.scan_uid, "scan_shape": [2, 3], "scan_extent_m": GOOD_EXTENT_M}
    good["positions_source"] = "bluesky"
    data = [
        start_message(series, n, {**good, **bad}),
        *(series.image(i, frames[i]) for i in range(n)),
        series.end(),
    ]
    result = hostile.run_scan(
        series.scan_uid, data, [series.positions(range(n), positions), series.positions_end()]
    )
    assert_texts(
        result.warnings_for("bad_user_data"),
        f"scan {series.scan_uid}: start user_data",
        *fragments,
        "The scan runs without it",
    )
    assert result.metric(REJECTED, "bad_user_data") == 1
    assert result.metric(REJECTED, "internal_error") == 0
    assert result.accounting[INGEST]["bad_user_data"] == 1
    # The bad field takes its default; the good ones are kept.
    defaults = {"scan_shape": [], "scan_extent_m": None, "positions_source": "position_channel"}
    expected = {"scan_shape": [2, 3], "scan_extent_m": GOOD_EXTENT_M, "positions_source": "bluesky"}
    assert {name: result.start[name] for name in expected} == {**expected, field: defaults[field]}
    assert_forwarded(result, range(n), frames, positions)
    assert unaccounted_frames(result.frames_sent, result.accounting) == []


def test_a_sustained_flood_logs_one_line_per_flood_interval_per_reason() -> None:
    from phasestream.runtime.stage_log import LogLimiter

    limiter = LogLimiter(interval_s=5.0, burst=10, flood_interval_s=30.0)
    admitted = 0
    for tick in range(300 * 100):  # 300 s of 100 bad messages a second, one reason
        now_s = tick / 100
        if limiter.admit("garbage", now_s) is not None:
            admitted += 1
        admitted += len(limiter.overdue(now_s))
    # The first burst, its summary, then one line (and one summary) per 30 s: about 30 lines, not 600.
    assert admitted <= 10 + 1 + 2 * (300 // 30) + 2
    # A reason that went quiet gets its full burst again.
    assert all(limiter.admit("quiet", 1000.0 + i) is not None for i in range(3))

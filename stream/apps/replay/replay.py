"""A recorded scan through the simulated SELUN, into ingest: what ``phasestream replay`` sends.

Three sources: a CXI file, a DECTRIS NXmx master file, or a Bluesky run in Tiled as TiledWriter stores it
(``--tiled-run http://host:port/RUN_UID``; ``phasestream.apps.replay.to_tiled`` reads frames, motor
readbacks and geometry from it). ``phasestream.apps.replay.session`` picks the source from the command's
options and, with ``--pipeline``, starts a pipeline to replay into.

The replayed scan takes the live path end to end: the SELUN emitter's sockets send a Stream V2 start, one
``image`` per frame and the end message, and the position channel sends the positions in batches right
after the frames they cover, so ingest cannot tell a replay from a detector. Three rates:

- ``recorded``: the file's frame time (``frame_time``, else ``count_time``) paces the frames;
- a rate in Hz;
- ``max``: as fast as reading, encoding and ZeroMQ allow (PUSH blocks when ingest falls behind, so
  nothing is lost, the replay just slows down).

Paced frames follow an absolute schedule (frame k is due at t0 + k / rate), as the emitter's own: a late
frame does not push the later ones back, and frames due within 0.5 ms go out together rather than after
a sleep that would overshoot.

Frames are read 64 at a time (one position batch), so a scan larger than memory replays. When each frame
is stored as one bitshuffle-LZ4 chunk, as DECTRIS writes them, the stored bytes are the Stream V2 payload
and are sent without decompressing; other frames are compressed on the way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from phasestream.apps.replay.to_tiled import TiledRunScan
from phasestream.errors import ConfigError, ScanFileError
from phasestream.formats.cxi import read_cxi, split_dataset_spec
from phasestream.formats.nxmx import read_nxmx
from phasestream.formats.position_channel import POSITIONS_BATCH_SIZE, encode_positions_end, position_messages
from phasestream.formats.recorded_scan import RecordedScan
from phasestream.formats.stream_v2.decode import IMAGE_DTYPES
from phasestream.formats.stream_v2.encode import (
    bslz4_compress,
    channel_array,
    encode_message,
    end_fields,
    image_fields,
    start_fields,
)
from phasestream.simulators.selun import (
    DEFAULT_DATA_ENDPOINT,
    DEFAULT_POSITIONS_ENDPOINT,
    SELUN_MAX_FRAME_RATE_HZ,
    SelunEmitter,
)

SERIES_ID = 1
# Closing the sockets waits this long for ingest to take the frames still queued (up to the send HWM),
# so a pipeline that is busy when the file ends still gets every frame; only a dead one loses them.
CLOSE_LINGER_S = 300.0
# As the SELUN emitter: a sleep lasts at least ~60 µs, so frames due sooner go out at once.
SHORTEST_SLEEP_S = 5e-4


class ReplayRate(StrEnum):
    """The named rates; a number (Hz) is the third choice."""

    RECORDED = "recorded"
    MAX = "max"


class ScanFormat(StrEnum):
    CXI = "cxi"
    NXMX = "nxmx"


@dataclass(frozen=True)
class ReplayReport:
    frames_sent: int
    elapsed_s: float  # first image handed to ZeroMQ → the last one
    rate_hz: float | None  # the pacing asked for; None: as fast as possible
    passthrough: bool  # the stored bslz4 bytes went out as they are

    @property
    def frames_per_s(self) -> float:
        return self.frames_sent / self.elapsed_s if self.elapsed_s > 0 else float("inf")


# ---- reading ---------------------------------------------------------------------------------------------


def detect_format(path: Path) -> ScanFormat:
    """CXI has /cxi_version or /entry_1; a DECTRIS master has /entry/data. The suffix decides nothing."""
    if not path.is_file():
        raise ScanFileError(f"{path}: no such file; give the path of a CXI file or a DECTRIS master file")
    try:
        file = h5py.File(path, "r")
    except (FileNotFoundError, OSError) as error:
        raise ScanFileError(
            f"cannot open {path} as HDF5 ({error}); replay reads CXI files (.cxi) and DECTRIS NXmx master "
            "files (*_master.h5)"
        ) from error
    with file:
        if "cxi_version" in file or "entry_1" in file:
            return ScanFormat.CXI
        if "entry" in file and "data" in file["entry"]:
            return ScanFormat.NXMX
        raise ScanFileError(
            f"{path} is HDF5 but neither CXI (no /cxi_version, no /entry_1) nor a DECTRIS master file "
            f"(no /entry/data); its top level holds {sorted(file)}"
        )


def source_label(scan: RecordedScan) -> str:
    """What people and the Stream V2 start (``replay_of``) call the scan's origin: a path or a run URI."""

    return scan.run_uri if isinstance(scan, TiledRunScan) else str(scan.source)


def read_recorded_scan(path: Path | str, positions_m: np.ndarray | None = None) -> RecordedScan:
    """Read a CXI or NXmx scan; ``positions_m`` (NXmx only) is the positions side channel.

    ``scan.cxi::/entry_1/data_2`` picks one of several data groups of a CXI file.
    """
    path, data_group = split_dataset_spec(path)
    scan_format = detect_format(path)
    if scan_format is ScanFormat.CXI:
        if positions_m is not None:
            raise ConfigError(
                f"{path} is CXI: its positions are in the file; drop the positions side channel"
            )
        return read_cxi(path, data_group)
    if data_group is not None:
        raise ConfigError(f"{path} is an NXmx master file: it has one data group; drop ::{data_group}")
    return read_nxmx(path, positions_m)


def replay_rate_hz(rate: ReplayRate | str | float, scan: RecordedScan) -> float | None:
    """The frame rate to pace at, or None for as fast as possible."""
    if rate == ReplayRate.MAX:
        return None
    if rate == ReplayRate.RECORDED:
        if scan.frame_time_s is None:
            raise ConfigError(
                f"{source_label(scan)} records no frame time (frame_time or count_time, or event times); "
                "pass --rate-hz R or --as-fast-as-possible"
            )
        return 1.0 / scan.frame_time_s
    try:
        rate_hz = float(rate)
    except ValueError:
        raise ConfigError(f"rate {rate!r}: use 'recorded', 'max' or a frame rate in Hz") from None
    if not rate_hz > 0:
        raise ConfigError(f"rate {rate_hz} Hz: use a positive frame rate, or 'max' for as fast as possible")
    return rate_hz


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The Stream V2 image dtype a frame travels as: its own where Stream V2 has it, else the nearest.

    ``dtype`` is a scan's ``frame_dtype``, which its reader already chose for float frames (whole counts
    as uint32, intensities as float32).
    """
    little = np.dtype(dtype).newbyteorder("<")
    if little in IMAGE_DTYPES.values():
        return little
    nearest = {"f": "<f4", "i": "<i4", "u": "<u4", "b": "u1"}.get(little.kind)
    if nearest is None:
        raise ScanFileError(
            f"frames of dtype {dtype} cannot travel as a Stream V2 image ({sorted(IMAGE_DTYPES)}); "
            "store counts as integers or floats"
        )
    return np.dtype(nearest)


# ---- sending ---------------------------------------------------------------------------------------------


def replay(
    source: Path | str | RecordedScan,
    rate: ReplayRate | str | float = ReplayRate.RECORDED,
    data_endpoint: str = DEFAULT_DATA_ENDPOINT,
    positions_endpoint: str = DEFAULT_POSITIONS_ENDPOINT,
    progress: bool = True,
    *,
    scan_uid: str | None = None,
    positions_m: np.ndarray | None = None,
    send_timeout_s: float | None = None,
) -> ReplayReport:
    """Bind the SELUN emitter's sockets and send the scan; returns when the last message left.

    ``source`` is a scan file or a scan already read (a Tiled run from ``to_tiled.read_tiled_run``).
    Like the detector, it waits (blocks) until ingest connects. ``send_timeout_s`` turns a wait longer
    than that into a ``TimeoutError``.
    """
    if isinstance(source, RecordedScan):
        if positions_m is not None:
            raise ConfigError(f"{source_label(source)} has its positions: drop the positions side channel")
        scan = source
    else:
        scan = read_recorded_scan(source, positions_m)
    rate_hz = replay_rate_hz(rate, scan)
    with SelunEmitter(
        data_endpoint, positions_endpoint, send_timeout_s=send_timeout_s, linger_s=CLOSE_LINGER_S
    ) as emitter:
        if progress:
            tqdm.write(
                f"replay {source_label(scan)}: {scan.n_frames} frames of {scan.frame_shape_px[0]}×"
                f"{scan.frame_shape_px[1]} at {f'{rate_hz:g} Hz' if rate_hz else 'full speed'} on "
                f"{emitter.data_endpoint}, positions on {emitter.positions_endpoint}"
            )
        return replay_scan(emitter, scan, rate_hz, scan_uid or str(uuid.uuid4()), progress=progress)


def replay_scan(
    emitter: SelunEmitter, scan: RecordedScan, rate_hz: float | None, scan_uid: str, *, progress: bool = False
) -> ReplayReport:
    """Send start, the images (paced when ``rate_hz``), each positions batch after its images, then end."""
    series_unique_id = f"phasestream-replay-{scan_uid}"
    frame_time_s = 1.0 / (rate_hz or SELUN_MAX_FRAME_RATE_HZ)
    dtype = wire_dtype(scan.frame_dtype)
    emitter.emit_messages([_start_message(scan, scan_uid, series_unique_id, dtype, frame_time_s)])
    positions = position_messages(SERIES_ID, scan.positions_m, POSITIONS_BATCH_SIZE)
    images = _image_batches(scan, dtype, series_unique_id, frame_time_s)
    interval_s = 1.0 / rate_hz if rate_hz else 0.0
    sent = 0
    started = time.perf_counter()
    with tqdm(total=scan.n_frames, disable=not progress, unit="frame", desc="replay") as bar:
        for batch, positions_batch in zip(images, positions, strict=True):
            if sent == 0:
                started = time.perf_counter()  # the clock starts at the first image, not at encoding
            if interval_s:
                _send_paced(emitter, batch, sent, started, interval_s)
                emitter.emit_messages([], [positions_batch])
            else:
                emitter.emit_messages(batch, [positions_batch])
            sent += len(batch)
            bar.update(len(batch))
        elapsed_s = time.perf_counter() - started
    end = encode_message(end_fields(series_id=SERIES_ID, series_unique_id=series_unique_id))
    emitter.emit_messages([end], [encode_positions_end(SERIES_ID)])
    passthrough = scan.bslz4_passthrough and dtype == scan.frame_dtype
    return ReplayReport(sent, elapsed_s, rate_hz, passthrough)


def _start_message(
    scan: RecordedScan, scan_uid: str, series_unique_id: str, dtype: np.dtype, frame_time_s: float
) -> bytes:
    positions = scan.positions_m
    return encode_message(
        start_fields(
            series_id=SERIES_ID,
            series_unique_id=series_unique_id,
            shape_px=scan.frame_shape_px,
            dtype=dtype,
            number_of_images=scan.n_frames,
            energy_kev=scan.energy_kev,
            detector_distance_m=scan.detector_distance_m,
            pixel_size_m=scan.detector_pixel_size_m,
            count_time_s=frame_time_s,
            frame_time_s=frame_time_s,
            user_data={
                "scan_uid": scan_uid,
                "scan_shape": list(scan.scan_shape),
                "positions_source": "position_channel",
                "scan_extent_m": [
                    float(positions[:, 0].min()),
                    float(positions[:, 0].max()),
                    float(positions[:, 1].min()),
                    float(positions[:, 1].max()),
                ],
                "replay_of": source_label(scan),
            },
            pixel_mask=None if scan.bad_pixel_mask is None else scan.bad_pixel_mask.astype(np.uint32),
        )
    )


def _image_batches(
    scan: RecordedScan, dtype: np.dtype, series_unique_id: str, frame_time_s: float
) -> Iterator[list[bytes]]:
    """Encoded ``image`` messages, one position batch (64) at a time, image ids from 0."""
    if scan.bslz4_passthrough and dtype == scan.frame_dtype:
        payloads = scan.iter_bslz4()
    else:
        payloads = (
            bslz4_compress(frame.astype(dtype, copy=False)) for chunk in scan.iter_frames() for frame in chunk
        )
    # channel_array takes the shape and dtype from a frame; the payload is already compressed.
    template = np.broadcast_to(np.zeros((), dtype), scan.frame_shape_px)
    series_date = datetime.now(UTC)
    batch: list[bytes] = []
    for image_id, payload in enumerate(payloads):
        fields = image_fields(
            series_id=SERIES_ID,
            series_unique_id=series_unique_id,
            image_id=image_id,
            data=channel_array(template, compressed=payload),
            frame_time_s=frame_time_s,
            count_time_s=frame_time_s,
            series_date=series_date,
        )
        batch.append(encode_message(fields))
        if len(batch) == POSITIONS_BATCH_SIZE:
            yield batch
            batch = []
    if batch:
        yield batch


def _send_paced(
    emitter: SelunEmitter, images: list[bytes], first_id: int, started: float, interval_s: float
) -> None:
    """Send on the absolute schedule; every image due by the time one goes out goes with it."""
    done = 0
    while done < len(images):
        image_id = first_id + done
        delay = started + image_id * interval_s - time.perf_counter()
        if delay > SHORTEST_SLEEP_S:
            time.sleep(delay)
        due_by_now = int((time.perf_counter() - started) / interval_s) + 1
        count = min(len(images) - done, max(1, due_by_now - image_id))
        emitter.emit_messages(images[done : done + count])
        done += count

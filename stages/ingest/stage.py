"""Ingest: the only stage that speaks the detector's protocol (DECTRIS Stream V2).

It decodes and validates each image, joins frames and positions by image index, and emits
``FrameBatch``es in index order within each batch. Nothing is dropped silently: frames with the wrong
shape or dtype, NaN or negative counts, duplicates, frames without a position and positions without a
frame are each counted under their reason, and the ``ScanEnd`` it emits accounts for every image the
detector announced.

Nothing the detector stream says is trusted before it is checked: an image's declared shape, dtype and
size are compared with its scan's start message before it is decompressed (a small bslz4 message can
declare a 1 GiB frame); a start message that announces more than ``max_images_per_scan`` images is
refused; a scan uid that is not a safe name (it names Tiled nodes and files downstream) is replaced
(``phasestream.runtime.scan_uid``); ``user_data`` fields of the wrong type are left out with a warning; and
positions of a series that never starts are held for ``orphan_positions_max_age_s`` at most, and never
more than ``max_orphan_positions`` of them.

The start message's checks are in ``start.py``, the image's in ``frames.py``, and what a
scan holds while it runs in ``scan.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TypeVar

import numpy as np
import zmq

from phasestream.errors import DetectorMessageError, FrameValidationError, PhasestreamError
from phasestream.formats.position_channel import PositionBatch, PositionsEnd, decode_positions
from phasestream.formats.stream_v2.decode import (
    EncodedImage,
    EndMessage,
    ImageMessage,
    StartMessage,
    decode_stream_v2,
)
from phasestream.runtime import metrics
from phasestream.runtime.geometry import read_mask_file
from phasestream.runtime.inbox import RawInput
from phasestream.runtime.messages import FrameBatch, Geometry, Message, ScanEnd, ScanStart
from phasestream.stages.ingest.config import IngestConfig
from phasestream.stages.ingest.frames import FrameChecks
from phasestream.stages.ingest.reasons import Refuse, Reject
from phasestream.stages.ingest.scan import HeldPositions, OpenScan, Slab, gather_frames
from phasestream.stages.ingest.start import ScanStartChecks, positions_source

Decoded = TypeVar("Decoded")


class IngestStage(ScanStartChecks, FrameChecks):
    """Decodes the detector's messages and the position channel's, joins frames and positions by image
    id, and sends them on as ``FrameBatch``es between each scan's ``ScanStart`` and ``ScanEnd``."""

    Config = IngestConfig
    config: IngestConfig
    idle_poll_ms = 20

    def setup(self) -> None:
        self._open: OpenScan | None = None
        # By series id, oldest first: positions may overtake their series' start message.
        self._pending_positions: dict[int, HeldPositions] = {}
        self._held_weight = 0
        self._decode_detector = partial(
            decode_stream_v2, lazy_images=True, max_array_bytes=self.config.max_frame_bytes
        )
        settings = self.config.geometry
        self._mask_from_file = (
            read_mask_file(settings.mask_file, settings.mask_nonzero_means) if settings.mask_file else None
        )

    def raw_inputs(self) -> dict[str, RawInput]:
        detector = self.pipeline.detector
        limit = self.config.max_message_bytes
        return {
            "detector": RawInput(zmq.PULL, detector.data_endpoint, max_message_bytes=limit),
            "positions": RawInput(zmq.PULL, detector.positions_endpoint, max_message_bytes=limit),
        }

    def has_open_scan(self) -> bool:
        # Held positions need idle() too: they expire.
        return self._open is not None or bool(self._pending_positions)

    def handle_raw(self, port: str, frames: list[bytes]) -> Iterable[Message]:
        if len(frames) != 1:
            self._count_undecodable()
            raise DetectorMessageError(
                f"{port} message has {len(frames)} parts; Stream V2 sends one CBOR map per ZeroMQ message "
                "(a Stream V1 'legacy' detector? set the DCU stream format to 'cbor')"
            )
        if port == "positions":
            return self._on_positions(self._decoded(decode_positions, frames[0]))
        return self._on_detector(self._decoded(self._decode_detector, frames[0]))

    def raw_refused(self, port: str, error: PhasestreamError) -> None:
        self._count_undecodable()

    def _decoded(self, decode: Callable[[bytes], Decoded], buffer: bytes) -> Decoded:
        try:
            return decode(buffer)
        except DetectorMessageError:
            self._count_undecodable()
            raise

    def _count_undecodable(self) -> None:
        if self._open is not None:
            # Its image index is unknown, so the frame shows up as missing at the end; this says why.
            self.count(self._open.start.scan_uid, "undecodable_messages")

    # ---- detector messages ----------------------------------------------------------------------
    def _on_detector(
        self, message: StartMessage | ImageMessage | EncodedImage | EndMessage
    ) -> Iterable[Message]:
        kind = type(message)
        if kind is EncodedImage or kind is ImageMessage:
            return self._on_image(message)
        if isinstance(message, StartMessage):
            return self._on_start(message)
        return self._on_detector_end(message)

    def _on_start(self, start: StartMessage) -> Iterator[Message]:
        self._check_planned_frames(start)  # a refused start leaves an open scan as it is
        if self._open is not None:
            # A new series while one is open: the old one's end was lost. Close it with what we have.
            yield from self._close_scan()
        scan_uid, uid_as_sent = self._scan_uid(start)
        user = self._user_data(start, scan_uid)
        geometry = self._resolved_geometry(start, scan_uid)
        mask = self._scan_mask(start, scan_uid, geometry)
        scan_start = ScanStart(
            scan_uid=scan_uid,
            geometry=Geometry(
                energy_kev=geometry.energy_kev,
                detector_distance_m=geometry.detector_distance_m,
                pixel_size_m=geometry.pixel_size_m,
                detector_shape_px=geometry.shape_px,
                detector_dtype=str(start.dtype),
            ),
            scan_shape=user.scan_shape,
            planned_frames=start.number_of_images,
            positions_source=positions_source(user.positions_source),
            scan_extent_m=user.scan_extent_m,
            config_hash=self.pipeline.config_hash(),
            geometry_overrides=geometry.sources,
            scan_uid_as_sent=uid_as_sent,
            bad_pixel_mask=mask if mask is not None else np.zeros((0, 0), dtype=bool),
        )
        shape, dtype = tuple(start.shape_px), np.dtype(start.dtype)
        self._open = OpenScan(
            start=scan_start,
            series_id=start.series_id,
            shape=shape,
            dtype=dtype,
            slab=Slab(self.config.batch_size, geometry.shape_px, dtype),
            last_frame_s=time.monotonic(),
            crop=geometry.crop,
            mask=mask,
        )
        self.scan(scan_uid).start = scan_start
        yield scan_start  # first: downstream must see the scan open before anything else of it
        held = self._pending_positions.pop(start.series_id, None)
        if held is not None:
            self._held_weight -= held.weight
            for early in held.messages:
                yield from self._on_positions(early)

    def _on_image(self, image: ImageMessage | EncodedImage) -> list[FrameBatch]:
        scan = self._open
        if scan is None or image.series_id != scan.series_id:
            raise FrameValidationError(
                f"image {image.image_id} of series {image.series_id} arrived with no open scan for that "
                "series (its start message was lost, or ingest started mid-series); it is discarded. "
                "Start ingest before arming the detector.",
                reason=Reject.NO_SCAN,
            )
        uid = scan.start.scan_uid
        self._frames_received_metric.inc()  # the runtime's cached child: no per-frame label lookup
        self.count(uid, "frames_received")
        self.maybe_report_progress(uid)
        frame = self._checked_frame(scan, image)
        slab = scan.slab
        if slab.filled == len(slab.frames):
            slab = scan.slab = Slab(self.config.batch_size, slab.frames.shape[1:], scan.dtype)
        row = slab.take(frame if scan.crop is None else frame[scan.crop])
        if scan.mask is not None:
            slab.frames[row][scan.mask] = 0  # what a masked pixel reads is no measurement
        scan.frames[image.image_id] = (slab, row, time.time())
        scan.last_frame_s = time.monotonic()
        self._join(scan, image.image_id)
        return self._batches(scan, force=False)

    def _on_detector_end(self, end: EndMessage) -> Iterator[Message]:
        scan = self._open
        if scan is None or end.series_id != scan.series_id:
            raise DetectorMessageError(
                f"end of series {end.series_id} with no open scan for it; nothing to close"
            )
        scan.detector_ended_s = time.monotonic()
        if scan.positions_ended or self.config.position_grace_s == 0:
            yield from self._close_scan()

    # ---- positions ----------------------------------------------------------------------------
    def _on_positions(self, message: PositionBatch | PositionsEnd) -> Iterator[Message]:
        scan = self._open
        if scan is None or message.series_id != scan.series_id:
            # Positions may overtake the detector's start message: keep them for that series, a while.
            self._hold(message)
            return
        if isinstance(message, PositionsEnd):
            scan.positions_ended = True
            if scan.detector_ended_s is not None:
                yield from self._close_scan()
            return
        duplicates = []
        for image_id, (y_m, x_m) in zip(
            message.image_ids.tolist(), message.positions_m.tolist(), strict=True
        ):
            index = int(image_id)
            if index in scan.seen_positions:
                duplicates.append(index)
                continue
            scan.seen_positions.add(index)
            scan.positions[index] = (y_m, x_m)
            self._join(scan, index)
        yield from self._batches(scan, force=False)
        if duplicates:
            # Warn rather than raise: the rest of this message is used, and positions replayed at the
            # start message must not stop at the first repeat.
            self.count(scan.start.scan_uid, "duplicate_positions", len(duplicates))
            metrics.MESSAGES_REJECTED.labels(
                reason=Reject.DUPLICATE_POSITION, stage=self.stage_name, worker=self.worker
            ).inc()
            self.warn(
                Reject.DUPLICATE_POSITION,
                f"positions for images {_head(duplicates)} arrived twice in scan {scan.start.scan_uid}; "
                "the first value is kept (check the position channel's source)",
            )

    def _hold(self, message: PositionBatch | PositionsEnd) -> None:
        now = time.monotonic()
        held = self._pending_positions.get(message.series_id)
        if held is None:
            held = self._pending_positions[message.series_id] = HeldPositions(since_s=now)
        weight = max(1, len(message.image_ids)) if isinstance(message, PositionBatch) else 1
        held.messages.append(message)
        held.weight += weight
        self._held_weight += weight
        self._drop_orphans(now)

    def _drop_orphans(self, now_s: float) -> None:
        """Drop held positions older than ``orphan_positions_max_age_s``, then the oldest series' while
        more than ``max_orphan_positions`` are held."""
        max_age_s, limit = self.config.orphan_positions_max_age_s, self.config.max_orphan_positions
        while self._pending_positions:
            series_id, held = next(iter(self._pending_positions.items()))  # the oldest series first
            age_s = now_s - held.since_s
            if age_s > max_age_s:
                why = f"they were held {age_s:.1f} s, longer than orphan_positions_max_age_s={max_age_s:g}"
            elif self._held_weight > limit:
                why = f"positions of series not started exceeded max_orphan_positions={limit}"
            else:
                return
            del self._pending_positions[series_id]
            self._held_weight -= held.weight
            self._orphans_dropped(series_id, held, why)

    def _orphans_dropped(self, series_id: int, held: HeldPositions, why: str) -> None:
        positions = sum(len(m.image_ids) for m in held.messages if isinstance(m, PositionBatch))
        metrics.MESSAGES_REJECTED.labels(
            reason=Refuse.ORPHAN_POSITIONS, stage=self.stage_name, worker=self.worker
        ).inc(len(held.messages))
        self.warn(
            Refuse.ORPHAN_POSITIONS,
            f"{len(held.messages)} position messages ({positions} positions) of series {series_id} are "
            f"dropped: {why}, and no start message of that series came (it was refused or lost, or the "
            "position channel numbers series differently from the detector: check its series_id)",
        )

    def _join(self, scan: OpenScan, index: int) -> None:
        if index in scan.frames and index in scan.positions:
            scan.ready.append(index)

    # ---- batching and closing ---------------------------------------------------------------------
    def idle(self) -> Iterable[Message]:
        now = time.monotonic()
        if self._pending_positions:
            self._drop_orphans(now)
        scan = self._open
        if scan is None:
            return
        if scan.ready and now - scan.last_frame_s > self.config.batch_timeout_s:
            yield from self._batches(scan, force=True)
        if scan.detector_ended_s is not None and now - scan.detector_ended_s > self.config.position_grace_s:
            yield from self._close_scan()
            return
        stalled_s = self.config.stalled_scan_timeout_s
        if scan.detector_ended_s is None and stalled_s is not None and now - scan.last_frame_s > stalled_s:
            uid = scan.start.scan_uid
            self.count(uid, "closed_by_timeout")
            self.warn(
                "detector_stalled",
                f"scan {uid}: no detector message for {stalled_s:g} s and no end message after "
                f"{len(scan.seen_frames)} of {scan.start.planned_frames} frames; closing it with what "
                "arrived (missing_frames counts the rest). Raise stalled_scan_timeout_s for slower scans",
            )
            yield from self._close_scan()

    def _batches(self, scan: OpenScan, force: bool) -> list[FrameBatch]:
        size = self.config.batch_size
        batches = []
        while len(scan.ready) >= size or (force and scan.ready):
            indices, scan.ready = sorted(scan.ready[:size]), scan.ready[size:]
            batches.append(self._batch(scan, indices))
        return batches

    def _batch(self, scan: OpenScan, indices: list[int]) -> FrameBatch:
        entries = [scan.frames.pop(i) for i in indices]
        positions = np.array([scan.positions.pop(i) for i in indices], dtype=np.float64)
        scan.seq += 1
        scan.forwarded += len(indices)
        return FrameBatch(
            scan_uid=scan.start.scan_uid,
            seq=scan.seq,
            frame_indices=indices,
            received_at_s=min(received for _, _, received in entries),
            frames=gather_frames(entries),
            positions_m=positions,
        )

    def _close_scan(self) -> Iterator[Message]:
        scan = self._open
        assert scan is not None
        yield from self._batches(scan, force=True)
        uid, planned = scan.start.scan_uid, scan.start.planned_frames
        if scan.frames:
            self.reject_frames(uid, Reject.FRAME_WITHOUT_POSITION, len(scan.frames))
            self.warn(
                Reject.FRAME_WITHOUT_POSITION,
                f"images {_head(sorted(scan.frames))} of scan {uid} ({len(scan.frames)} in all) never got "
                "a position and are discarded; check that the position channel sends every image id "
                f"(or raise position_grace_s={self.config.position_grace_s} if positions come late)",
            )
        if scan.positions:
            self.count(uid, "positions_without_frame", len(scan.positions))
            metrics.MESSAGES_REJECTED.labels(
                reason=Reject.POSITION_WITHOUT_FRAME, stage=self.stage_name, worker=self.worker
            ).inc(len(scan.positions))
            self.warn(
                Reject.POSITION_WITHOUT_FRAME,
                f"positions for images {_head(sorted(scan.positions))} of scan {uid} "
                f"({len(scan.positions)} in all) never met a usable frame (lost, rejected or never sent) "
                "and are discarded; the warnings above say why frames were rejected, and missing_frames "
                "in the ScanEnd counts those that never arrived",
            )
        # Counted, not set(range(planned)): a start may announce millions of images.
        missing = planned - sum(1 for index in scan.seen_frames if 0 <= index < planned)
        if missing:
            self.count(uid, "missing_frames", missing)
        self.count(uid, "frames_forwarded", scan.forwarded)
        self._open = None
        yield ScanEnd(scan_uid=uid, seq=scan.seq + 1, frames_sent=planned)


def _head(ids: list[int], n: int = 10) -> str:
    """The first image ids of a list, for a warning that must stay one line."""
    return f"{ids[:n]}{'…' if len(ids) > n else ''}"

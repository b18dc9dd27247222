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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Annotated, Any, TypeVar

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from phasestream.errors import ConfigError, DetectorMessageError, FrameValidationError, PhasestreamError
from phasestream.formats.position_channel import PositionBatch, PositionsEnd, decode_positions
from phasestream.formats.stream_v2_decode import (
    FRAME_TOO_LARGE,
    EncodedImage,
    EndMessage,
    ImageMessage,
    StartMessage,
    decode_stream_v2,
    shown,
)
from phasestream.runtime import metrics
from phasestream.runtime.geometry import (
    GeometryOverrides,
    GeometrySettings,
    ResolvedGeometry,
    check_mask_shape,
    per_scan_overrides,
    read_mask_file,
    resolve_geometry,
)
from phasestream.runtime.messages import FrameBatch, Geometry, Message, PositionSource, ScanEnd, ScanStart
from phasestream.runtime.scan_uid import SAFE_SCAN_UID, UNSAFE_SCAN_UID, safe_scan_uid
from phasestream.runtime.stage import RawInput, Stage

Decoded = TypeVar("Decoded")


class Reject(StrEnum):
    """Why a frame did not reach the next stage (the ``reason`` label and accounting key)."""

    NO_SCAN = "no_open_scan"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NOT_FINITE = "not_finite"
    NEGATIVE = "negative_counts"
    DUPLICATE_FRAME = "duplicate_frame"
    DUPLICATE_POSITION = "duplicate_position"
    FRAME_WITHOUT_POSITION = "frame_without_position"
    POSITION_WITHOUT_FRAME = "position_without_frame"
    INDEX_OUT_OF_RANGE = "image_id_out_of_range"
    FRAME_TOO_LARGE = FRAME_TOO_LARGE
    UNDECODABLE_FRAME = "undecodable_frame"


class Refuse(StrEnum):
    """Why ingest refused or changed what a start message or the position channel said (the ``reason``)."""

    TOO_MANY_IMAGES = "too_many_images"
    UNSAFE_SCAN_UID = UNSAFE_SCAN_UID
    BAD_USER_DATA = "bad_user_data"
    ORPHAN_POSITIONS = "orphan_positions"


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=64, ge=1, le=4096, description="frames per FrameBatch")
    batch_timeout_s: float = Field(
        default=0.05, gt=0, description="send a partial batch when no frame came for this long"
    )
    position_grace_s: float = Field(
        default=5.0, ge=0, description="after the detector's end, wait this long for late positions"
    )
    max_message_bytes: int = Field(
        default=128 * 2**20,
        ge=2**16,
        description="largest detector message accepted; a sender of a larger one is disconnected before "
        "anything is allocated for it (a 4096 x 4096 uint32 frame uncompressed is 64 MiB)",
    )
    max_frame_bytes: int = Field(
        default=2**27,
        ge=1,
        description="largest frame (image_size_y x image_size_x x bytes per pixel) accepted: a start message "
        "with larger frames is refused, and an image declaring more is refused before it is decompressed "
        "(an EIGER2 XE 16M frame of uint32 is 72 MB)",
    )
    max_images_per_scan: int = Field(
        default=10_000_000,
        ge=1,
        description="a start message announcing more images (number_of_images) is refused with its scan",
    )
    orphan_positions_max_age_s: float = Field(
        default=60.0,
        gt=0,
        description="positions of a series whose start message has not come are held this long, then "
        "dropped and counted (orphan_positions)",
    )
    max_orphan_positions: int = Field(
        default=1_000_000,
        ge=0,
        description="at most this many positions (each position message at least one) of series whose start "
        "has not come are held; beyond it the oldest series' are dropped and counted (orphan_positions)",
    )
    stalled_scan_timeout_s: float | None = Field(
        default=120.0,
        gt=0,
        description="close a scan whose detector sent nothing for this long and no end message "
        "(a crashed DCU or a stopped acquisition); None waits for ever",
    )
    geometry: GeometrySettings = Field(
        default_factory=GeometrySettings,
        description="energy, distance, pixel size, beam centre and window, and a bad-pixel mask file that "
        "replace the detector's; a scan's start document may override them again",
    )


# A scan extent beyond a metre is no sample stage's; downstream stages place canvases by it.
_EXTENT_LIMIT_M = 1.0
ExtentM = Annotated[float, Strict(), Field(ge=-_EXTENT_LIMIT_M, le=_EXTENT_LIMIT_M, allow_inf_nan=False)]
# Strict: true is not 1, and 1e300 is not a row count. Files store scan_shape as int32.
ScanAxis = Annotated[int, Strict(), Field(ge=1, le=2**31 - 1)]


class ScanUserData(BaseModel):
    """The fields of a start message's ``user_data`` that ingest reads, besides ``scan_uid``
    (``phasestream.runtime.scan_uid``) and ``geometry`` (``per_scan_overrides``), which are checked on
    their own.

    Each has a safe default, so a bad one is left out with a warning (``bad_user_data``) and the scan runs
    without it rather than being refused: ``scan_shape`` only arranges positions for display and files,
    ``scan_extent_m`` only places a mosaic's origin (without it the stages take it from the positions),
    and ``positions_source`` only says where positions came from (ingest joins the position channel's
    whatever it says). The descriptions say what to send instead.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    scan_shape: tuple[ScanAxis, ...] = Field(
        default=(), max_length=3, description="a list of 1 to 3 positive integers, e.g. [20, 30]"
    )
    scan_extent_m: tuple[ExtentM, ExtentM, ExtentM, ExtentM] | None = Field(
        default=None,
        description="[y_min, y_max, x_min, x_max] of the probe centres: finite numbers in metres within "
        f"±{_EXTENT_LIMIT_M:g} m, each min <= its max",
    )
    positions_source: Annotated[str, Strict()] | None = Field(
        default=None, description=f"a string, one of {[source.value for source in PositionSource]}"
    )

    @field_validator("scan_extent_m")
    @classmethod
    def _ordered(cls, extent: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if extent is not None and (extent[0] > extent[1] or extent[2] > extent[3]):
            raise ValueError("a minimum is above its maximum")
        return extent


def scan_user_data(user_data: Any) -> tuple[ScanUserData, dict[str, str]]:
    """The fields ingest reads from a start message's ``user_data``, and what is wrong with each field
    that was left out (field name → problem)."""
    if not isinstance(user_data, dict):
        # Stream V2 lets user_data be anything (DCUs often send ""): then it carries none of these fields.
        return ScanUserData(), {}
    given = {name: user_data[name] for name in ScanUserData.model_fields if user_data.get(name) is not None}
    try:
        return ScanUserData.model_validate(given), {}
    except ValidationError as error:
        problems: dict[str, list[str]] = {}
        for problem in error.errors(include_url=False, include_input=False):
            name, *inner = problem["loc"]
            where = f"[{']['.join(map(str, inner))}]: " if inner else ""
            problems.setdefault(str(name), []).append(f"{where}{problem['msg']}")
    kept = {name: value for name, value in given.items() if name not in problems}
    return ScanUserData.model_validate(kept), {name: "; ".join(texts) for name, texts in problems.items()}


@dataclass
class HeldPositions:
    """Position messages of a series whose start message has not come (yet)."""

    since_s: float  # time.monotonic() of the first
    messages: list[PositionBatch | PositionsEnd] = field(default_factory=list)
    weight: int = 0  # the positions in them, each message at least one: what max_orphan_positions bounds


class Slab:
    """A batch's worth of rows that frames are copied into as they arrive: while the frame is still in
    cache that copy is cheap, and a batch that is exactly one full slab in order goes out as it is, which
    saves ``np.stack`` (about 5 µs a frame at 192 × 192 uint16)."""

    __slots__ = ("filled", "frames")

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.frames = np.empty((rows, *shape), dtype)
        self.filled = 0

    def take(self, frame: np.ndarray) -> int:
        row = self.filled
        self.frames[row] = frame
        self.filled += 1
        return row


@dataclass
class OpenScan:
    start: ScanStart
    series_id: int
    shape: tuple[int, ...]  # the detector's frame, before the crop
    dtype: np.dtype
    slab: Slab
    crop: tuple[slice, slice] | None = None  # the window kept of each frame; None keeps all
    mask: np.ndarray | None = None  # bad pixels of the cropped frame (True = not measured)
    # A frame waiting for its position: where it lies, and time.time() when it arrived.
    frames: dict[int, tuple[Slab, int, float]] = field(default_factory=dict)
    positions: dict[int, tuple[float, float]] = field(default_factory=dict)
    ready: list[int] = field(default_factory=list)
    seen_frames: set[int] = field(default_factory=set)
    # Every image id that got a position: a joined position leaves ``positions``, a repeat must still show.
    seen_positions: set[int] = field(default_factory=set)
    forwarded: int = 0
    seq: int = 0
    last_frame_s: float = 0.0  # time.monotonic() of the last frame, or of the start message before one
    detector_ended_s: float | None = None
    positions_ended: bool = False


class IngestStage(Stage):
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
            positions_source=_positions_source(user.positions_source),
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

    def _check_planned_frames(self, start: StartMessage) -> None:
        limit = self.config.max_images_per_scan
        if start.number_of_images > limit:
            raise DetectorMessageError(
                f"start of series {start.series_id} announces number_of_images={start.number_of_images}, "
                f"more than max_images_per_scan={limit}: the scan is refused and its images are discarded "
                f"(no_open_scan). Split the acquisition into scans of at most {limit} images, or raise "
                "ingest's max_images_per_scan",
                reason=Refuse.TOO_MANY_IMAGES,
            )

    def _scan_uid(self, start: StartMessage) -> tuple[str, str | None]:
        """The scan's uid (user_data's, else the detector's series uid), made safe, and the uid as sent
        when it had to be replaced."""
        user = start.user_data if isinstance(start.user_data, dict) else {}
        sent, source = user.get("scan_uid"), "user_data scan_uid"
        if sent is None or sent == "":
            # No uid of the scan's own (an empty one counts as none): the detector's series uid is unique.
            sent, source = start.series_unique_id, "series_unique_id"
        uid, as_sent = safe_scan_uid(sent)
        if as_sent is not None:
            metrics.MESSAGES_REJECTED.labels(
                reason=Refuse.UNSAFE_SCAN_UID, stage=self.stage_name, worker=self.worker
            ).inc()
            self.count(uid, Refuse.UNSAFE_SCAN_UID)
            self.warn(
                Refuse.UNSAFE_SCAN_UID,
                f"start of series {start.series_id}: {source} {shown(sent, 80)} is not a safe scan uid (it "
                f"names Tiled nodes and files, so it must match {SAFE_SCAN_UID.pattern}); the scan runs as "
                f"{uid!r}, and its ScanStart keeps the uid as sent in scan_uid_as_sent. Send uids of "
                "letters, digits, '.', '_' and '-' (at most 128, a letter or digit first)",
            )
        return uid, as_sent

    def _user_data(self, start: StartMessage, scan_uid: str) -> ScanUserData:
        """The start's user_data fields that ingest reads; a bad one is left out, named and counted."""
        user, problems = scan_user_data(start.user_data)
        if problems:
            n = len(problems)
            metrics.MESSAGES_REJECTED.labels(
                reason=Refuse.BAD_USER_DATA, stage=self.stage_name, worker=self.worker
            ).inc(n)
            self.count(scan_uid, Refuse.BAD_USER_DATA, n)
            fields = ScanUserData.model_fields
            named = "; ".join(
                f"{name}={shown(start.user_data[name])} ({problem}): send {fields[name].description}"
                for name, problem in problems.items()
            )
            self.warn(
                Refuse.BAD_USER_DATA,
                f"scan {scan_uid}: start user_data {named}. The scan runs without "
                f"{'it' if n == 1 else 'them'}",
            )
        return user

    def _resolved_geometry(self, start: StartMessage, scan_uid: str) -> ResolvedGeometry:
        """The detector's geometry with the pipeline's and the scan's overrides; a bad override is
        reported and left out, so the scan still runs on the values below it."""
        pipeline = self.config.geometry.overrides()
        try:
            scan = per_scan_overrides(start.user_data)
        except ConfigError as error:
            self.count(scan_uid, "geometry_override_rejected")
            self.warn("geometry_override", f"scan {scan_uid}: {error}; the scan uses the pipeline's values")
            scan = GeometryOverrides()
        except (TypeError, ValueError) as error:
            # per_scan_overrides checks values, not a mapping whose keys are not strings (TypeError) nor
            # integers too long to print in its message (ValueError): both come only from a hostile sender.
            self.count(scan_uid, "geometry_override_rejected")
            self.warn(
                "geometry_override",
                f"scan {scan_uid}: start user_data geometry {shown(start.user_data.get('geometry'))} is not "
                f"a mapping of override names to values ({type(error).__name__}: {str(error)[:120]}); "
                "the scan uses the pipeline's values",
            )
            scan = GeometryOverrides()
        detector = (start.energy_kev, start.detector_distance_m, start.pixel_size_m, start.shape_px)
        try:
            geometry = resolve_geometry(*detector, pipeline, scan)
        except ConfigError as error:
            self.count(scan_uid, "geometry_override_rejected")
            self.warn("geometry_override", f"scan {scan_uid}: {error}; the scan uses the detector's values")
            geometry = resolve_geometry(*detector, GeometryOverrides(), GeometryOverrides())
        if geometry.sources:
            given = ", ".join(
                f"{name} from the {source}" for name, source in sorted(geometry.sources.items())
            )
            self.note(
                "geometry",
                f"scan {scan_uid}: {given} (energy {geometry.energy_kev:g} keV, distance "
                f"{geometry.detector_distance_m:g} m, pixel {geometry.pixel_size_m:g} m, frames "
                f"{geometry.shape_px[0]}×{geometry.shape_px[1]})",
            )
        return geometry

    def _scan_mask(self, start: StartMessage, scan_uid: str, geometry: ResolvedGeometry) -> np.ndarray | None:
        """The detector's pixel mask joined with the mask file, cropped like the frames."""
        masks = []
        sent = getattr(start, "pixel_mask", None)
        if sent is not None:
            masks.append(("the start message's pixel_mask", np.asarray(sent) != 0))
        if self._mask_from_file is not None:
            masks.append((f"mask_file {self.config.geometry.mask_file}", self._mask_from_file))
        joined: np.ndarray | None = None
        for where, mask in masks:
            try:
                check_mask_shape(mask, start.shape_px, where)
            except ConfigError as error:
                self.count(scan_uid, "mask_rejected")
                self.warn("mask_shape", f"scan {scan_uid}: {error}; the scan goes on without it")
                continue
            joined = mask if joined is None else joined | mask
        if joined is None:
            return None
        if geometry.crop is not None:
            joined = joined[geometry.crop]
        return np.ascontiguousarray(joined)

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

    def _checked_frame(self, scan: OpenScan, image: ImageMessage | EncodedImage) -> np.ndarray:
        """The image's frame once its id, its declared shape, dtype and size, and then its counts passed;
        an encoded frame is decompressed only after the declared checks."""
        where = f"image {image.image_id} of scan {scan.start.scan_uid}"
        self._check_image_id(scan, image, where)
        if type(image) is EncodedImage:
            data = image.data
            self._check_declared(scan, where, data.dimensions, data.dtype, data.nbytes)
            frame = self._decompressed(scan, where, image)
        else:
            frame = image.frame
            self._check_declared(scan, where, frame.shape, frame.dtype, frame.nbytes)
        self._check_counts(scan, where, frame)
        return frame

    def _check_image_id(self, scan: OpenScan, image: ImageMessage | EncodedImage, where: str) -> None:
        uid = scan.start.scan_uid
        if image.image_id in scan.seen_frames:
            self.reject_frames(uid, Reject.DUPLICATE_FRAME, 1)
            raise FrameValidationError(
                f"{where} arrived twice; the second copy is discarded (check the detector's "
                "image_id counter or a second emitter on the same port)",
                reason=Reject.DUPLICATE_FRAME,
            )
        scan.seen_frames.add(image.image_id)
        if not 0 <= image.image_id < scan.start.planned_frames:
            self.reject_frames(uid, Reject.INDEX_OUT_OF_RANGE, 1)
            raise FrameValidationError(
                f"{where}: image_id is outside 0..{scan.start.planned_frames - 1}, the number_of_images the "
                "start message announced; check the detector's nimages/ntrigger settings",
                reason=Reject.INDEX_OUT_OF_RANGE,
            )

    def _check_declared(
        self, scan: OpenScan, where: str, shape: tuple[int, ...], dtype: np.dtype, nbytes: int
    ) -> None:
        """The frame's shape, dtype and size as the image declares them, before any decompression."""
        uid, limit = scan.start.scan_uid, self.config.max_frame_bytes
        if nbytes > limit:
            self.reject_frames(uid, Reject.FRAME_TOO_LARGE, 1)
            raise FrameValidationError(
                f"{where} declares a frame of {list(shape)} {dtype} ({nbytes} bytes), above "
                f"max_frame_bytes={limit}; the start message announced {scan.shape}. It is discarded "
                "without being decompressed (a decompression bomb, or a detector ROI that changed "
                "mid-scan): check the detector's ROI mode",
                reason=Reject.FRAME_TOO_LARGE,
            )
        if shape != scan.shape:
            self.reject_frames(uid, Reject.WRONG_SHAPE, 1)
            raise FrameValidationError(
                f"{where} has shape {shape}, the start message announced "
                f"{scan.shape}; check the detector's ROI mode",
                reason=Reject.WRONG_SHAPE,
            )
        if dtype != scan.dtype:
            self.reject_frames(uid, Reject.WRONG_DTYPE, 1)
            raise FrameValidationError(
                f"{where} has dtype {dtype}, the start message announced {scan.dtype}; "
                "check the detector's bit depth setting",
                reason=Reject.WRONG_DTYPE,
            )

    def _decompressed(self, scan: OpenScan, where: str, image: EncodedImage) -> np.ndarray:
        try:
            return image.data.decode()
        except DetectorMessageError as error:
            self.reject_frames(scan.start.scan_uid, Reject.UNDECODABLE_FRAME, 1)
            raise FrameValidationError(
                f"{where} cannot be decoded: {error}", reason=Reject.UNDECODABLE_FRAME
            ) from None

    def _check_counts(self, scan: OpenScan, where: str, frame: np.ndarray) -> None:
        """No NaN and no negative counts in the pixels kept (cropped, unmasked)."""
        uid = scan.start.scan_uid
        if scan.crop is not None:
            frame = frame[scan.crop]
        if scan.mask is not None and frame.dtype.kind in "if":
            frame = np.where(scan.mask, 0, frame)  # a masked pixel may read NaN or a flag value
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            self.reject_frames(uid, Reject.NOT_FINITE, 1)
            raise FrameValidationError(
                f"{where} holds {int(np.count_nonzero(~np.isfinite(frame)))} NaN/inf pixels; "
                "mask dead pixels upstream",
                reason=Reject.NOT_FINITE,
            )
        if frame.dtype.kind in "if" and frame.min() < 0:
            self.reject_frames(uid, Reject.NEGATIVE, 1)
            raise FrameValidationError(
                f"{where} has negative counts (min {frame.min()}); photon counts cannot be negative: "
                "check dark subtraction upstream",
                reason=Reject.NEGATIVE,
            )

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
            frames=_gather(entries),
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


def _gather(entries: list[tuple[Slab, int, float]]) -> np.ndarray:
    """The batch's frames as one array: a full slab filled in index order as it is, else a copy.

    A full slab is never written again, so it can leave without a copy.
    """
    slab = entries[0][0]
    if len(entries) == len(slab.frames) and all(
        entry[0] is slab and entry[1] == row for row, entry in enumerate(entries)
    ):
        return slab.frames
    return np.stack([entry_slab.frames[row] for entry_slab, row, _ in entries])


def _positions_source(announced: object) -> PositionSource:
    """Where the detector says this scan's positions come from (Bluesky, a file); the position channel
    when it says nothing or something this version does not know."""
    values = {source.value for source in PositionSource}
    return PositionSource(announced) if announced in values else PositionSource.POSITION_CHANNEL


def _head(ids: list[int], n: int = 10) -> str:
    """The first image ids of a list, for a warning that must stay one line."""
    return f"{ids[:n]}{'…' if len(ids) > n else ''}"

"""Ingest's checks of a detector's start message, before a scan opens: how many images it announces, its
scan uid, the ``user_data`` fields ingest reads, the geometry with its overrides, and the bad-pixel mask.

A refused start message refuses its scan; anything else that is wrong is reported, counted and left out,
so the scan runs without it.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from phasestream.errors import ConfigError, DetectorMessageError
from phasestream.formats.stream_v2.decode import StartMessage, shown
from phasestream.runtime import metrics
from phasestream.runtime.geometry import (
    GeometryOverrides,
    ResolvedGeometry,
    check_mask_shape,
    per_scan_overrides,
    resolve_geometry,
)
from phasestream.runtime.messages import PositionSource
from phasestream.runtime.scan_uid import SAFE_SCAN_UID, safe_scan_uid
from phasestream.runtime.stage import Stage
from phasestream.stages.ingest.config import IngestConfig
from phasestream.stages.ingest.reasons import Refuse

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


def positions_source(announced: object) -> PositionSource:
    """Where the detector says this scan's positions come from (Bluesky, a file); the position channel
    when it says nothing or something this version does not know."""
    values = {source.value for source in PositionSource}
    return PositionSource(announced) if announced in values else PositionSource.POSITION_CHANNEL


class ScanStartChecks(Stage):
    """The ingest stage's checks of a start message; each reports what it leaves out."""

    config: IngestConfig
    _mask_from_file: np.ndarray | None  # the pipeline's mask_file, read once by the stage's setup()

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

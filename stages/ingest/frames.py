"""Ingest's checks of one image before its frame is kept: its image id, the shape, dtype and size it
declares (before anything is decompressed), and its counts. A frame that fails one is counted under its
``Reject`` reason and raised as ``FrameValidationError``."""

from __future__ import annotations

import numpy as np

from phasestream.errors import DetectorMessageError, FrameValidationError
from phasestream.formats.stream_v2.decode import EncodedImage, ImageMessage
from phasestream.runtime.stage import Stage
from phasestream.stages.ingest.config import IngestConfig
from phasestream.stages.ingest.reasons import Reject
from phasestream.stages.ingest.scan import OpenScan


class FrameChecks(Stage):
    """The ingest stage's checks of an image; each counts the frame it rejects."""

    config: IngestConfig

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

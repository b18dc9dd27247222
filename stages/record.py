"""Record: saves every frame and position of a scan to a CXI file while passing them on unchanged.

Placed after ``ingest``, it keeps the validated frames (and their positions) of each scan in
``<directory>/<scan_uid>.cxi`` in the CXIDB layout that ``phasestream replay`` reads, so a live scan can be
replayed later through the same pipeline. Frames are appended as they arrive (one HDF5 chunk per frame,
bitshuffle-LZ4 by default, as the detector streams them), so a scan of any length streams to disk
rather than to memory; ``entry_1/data_1/frame_index`` keeps each frame's detector image id, and the file
is closed and complete at the scan's ``ScanEnd``.

A scan uid that is not a safe file name (``phasestream.runtime.scan_uid``), or whose file would resolve
outside
``directory`` (a symbolic link in its place), is refused: the scan is not recorded (``unsafe_scan_uid``,
counted and said), and its frames still go on.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import ConfigError, PhasestreamError
from phasestream.formats.cxi import CXI_VERSION, CxiPath
from phasestream.formats.hdf5_fields import nx_group, write_quantity
from phasestream.formats.recorded_scan import FrameCompression, compression_options
from phasestream.formats.scan_geometry import (
    DEFAULT_COLUMN_DIRECTION,
    DEFAULT_ROW_DIRECTION,
    sample_translation_from_positions,
)
from phasestream.formats.units import JOULES_PER_EV
from phasestream.runtime import metrics
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd, ScanStart
from phasestream.runtime.scan_uid import UNSAFE_SCAN_UID, check_scan_uid
from phasestream.runtime.stage import Stage


class RecordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: Path = Field(default=Path("phasestream-data/scans"), description="where <scan_uid>.cxi go")
    compression: FrameCompression = Field(
        default=FrameCompression.BSLZ4, description="HDF5 frame compression: bslz4 (as DECTRIS), gzip or none"
    )


class CxiRecording:
    """One scan's CXI file, open for appending frames and positions."""

    def __init__(self, path: Path, start: ScanStart, compression: FrameCompression) -> None:
        geometry = start.geometry
        self.path = path
        self.file = h5py.File(path, "w")
        self.file.attrs["default"] = "entry_1"
        self.file.attrs["creator"] = "phasestream record"
        self.file.create_dataset("cxi_version", data=CXI_VERSION)
        entry = nx_group(self.file, "entry_1", "NXentry", default="data_1")
        entry.create_dataset("start_time", data=datetime.now(UTC).isoformat())
        entry.create_dataset("program_name", data="phasestream")
        sample = nx_group(entry, "sample_1", "NXsample")
        self.translation = nx_group(sample, "geometry_1", "NXgeometry").create_dataset(
            "translation", shape=(0, 3), maxshape=(None, 3), dtype=np.float64, chunks=(1024, 3)
        )
        self.translation.attrs["units"] = "m"
        self.translation.attrs["scan_shape"] = np.asarray(start.scan_shape, dtype=np.int64)
        instrument = nx_group(entry, "instrument_1", "NXinstrument")
        write_quantity(
            nx_group(instrument, "source_1", "NXsource"),
            "energy",
            geometry.energy_kev * 1e3 * JOULES_PER_EV,
            "J",
        )
        detector = nx_group(instrument, "detector_1", "NXdetector")
        height, width = geometry.detector_shape_px
        self.frames = detector.create_dataset(
            "data", shape=(0, height, width), maxshape=(None, height, width), dtype=geometry.detector_dtype,
            chunks=(1, height, width), **compression_options(compression),
        )  # fmt: skip
        write_quantity(detector, "distance", geometry.detector_distance_m, "m")
        write_quantity(detector, "x_pixel_size", geometry.pixel_size_m, "m")
        write_quantity(detector, "y_pixel_size", geometry.pixel_size_m, "m")
        basis = np.array([DEFAULT_ROW_DIRECTION, DEFAULT_COLUMN_DIRECTION]) * geometry.pixel_size_m
        write_quantity(detector, "basis_vectors", basis, "m")
        detector["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
        data = nx_group(entry, "data_1", "NXdata")
        data.attrs["signal"] = "data"
        data["data"] = h5py.SoftLink(CxiPath.DETECTOR_DATA)
        data["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
        self.frame_index = data.create_dataset("frame_index", shape=(0,), maxshape=(None,), dtype=np.int64)

    def append(self, batch: FrameBatch) -> None:
        if batch.frames.shape[1:] != self.frames.shape[1:]:
            raise ConfigError(
                f"frames of {batch.frames.shape[1:]} reached record, which writes the detector's "
                f"{self.frames.shape[1:]}: place record before binning"
            )
        n_before = len(self.frames)
        n_after = n_before + len(batch.frames)
        for dataset in (self.frames, self.translation, self.frame_index):
            dataset.resize(n_after, axis=0)
        self.frames[n_before:n_after] = batch.frames
        self.translation[n_before:n_after] = sample_translation_from_positions(batch.positions_m)
        self.frame_index[n_before:n_after] = batch.frame_indices

    def close(self) -> int:
        n_frames = len(self.frames)
        self.file.close()
        return n_frames


class RecordStage(Stage):
    Config = RecordConfig
    config: RecordConfig

    def setup(self) -> None:
        self.config.directory.mkdir(parents=True, exist_ok=True)
        self._recordings: dict[str, CxiRecording] = {}
        self._refused: set[str] = set()  # scans not recorded for their uid, until their end

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        try:
            path = self._recording_path(message.scan_uid)
        except PhasestreamError as error:
            self._refused.add(message.scan_uid)
            metrics.MESSAGES_REJECTED.labels(reason=error.reason, **self._labels).inc()
            self.count(message.scan_uid, "scans_not_recorded")
            self.warn(error.reason, f"{error}; the scan is not recorded, its frames go on")
        else:
            self._recordings[message.scan_uid] = CxiRecording(path, message, self.config.compression)
            self.report_status(recording=str(path))
        yield message

    def _recording_path(self, scan_uid: str) -> Path:
        """``<directory>/<scan_uid>.cxi``, once it is sure to be a file directly in ``directory``."""
        where = f"the ScanStart that reached {self.placement.label}"
        path = self.config.directory / f"{check_scan_uid(scan_uid, where)}.cxi"
        if path.resolve().parent != self.config.directory.resolve():
            raise PhasestreamError(
                f"scan {scan_uid}: {path} resolves to {path.resolve()}, outside {self.config.directory}: "
                "remove that link from the recording directory",
                reason=UNSAFE_SCAN_UID,
            )
        return path

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch) and message.scan_uid in self._refused:
            self.count(message.scan_uid, "frames_not_recorded", len(message.frame_indices))
        if isinstance(message, FrameBatch) and message.scan_uid in self._recordings:
            recording = self._recordings[message.scan_uid]
            n_frames = len(message.frame_indices)
            try:
                recording.append(message)
            except (ConfigError, OSError) as exc:
                # A failed write (a full disk, a wrong placement) must not cost the live reconstruction its
                # frames: they go on, and the file's gap is counted and said.
                metrics.MESSAGES_REJECTED.labels(
                    reason="record_failed", stage=self.stage_name, worker=self.worker
                ).inc()
                self.count(message.scan_uid, "frames_not_recorded", n_frames)
                self.warn(
                    "record_failed",
                    f"frames {message.first_index}..{message.last_index} of scan {message.scan_uid} were not "
                    f"written to {recording.path}: {exc}; they go on to the next stage (free disk space, or "
                    "fix the placement, then replay from the detector's own files)",
                )
            else:
                self.count(message.scan_uid, "frames_recorded", n_frames)
        yield message

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        self._refused.discard(message.scan_uid)
        recording = self._recordings.pop(message.scan_uid, None)
        if recording is not None:
            recording.close()
            self.report_status(recorded=str(recording.path))
        yield message

"""A simulated SELUN as an ophyd device, so a Bluesky RunEngine drives it frame by frame.

Each ``trigger()`` reads the two motors it was given, computes the far-field pattern of a simulated
sample and probe for the probe at that position (with Poisson noise), and sends it as one DECTRIS Stream
V2 image on the SELUN data socket, as a DCU would after a hardware trigger. The reading reports the image
id and the series id, which is how the Bluesky bridge (``phasestream.apps.bluesky.bridge``) pairs each event's
motor readbacks with the frame.

Arming: a real detector is armed before a run, but bluesky stages devices before it opens the run, so
at ``stage()`` the run uid does not exist yet. The device learns the run from the RunEngine's start
document (``RE.subscribe(detector.on_run_start, "start")``) and arms at the run's first trigger: the Stream
V2 start carries the run uid as ``user_data.scan_uid``, which ingest takes as the scan uid, and the run's
``num_points`` as ``number_of_images``. ``unstage()`` (or the next run's first trigger) sends the end.

Motors report positions in ``motor_unit`` (micrometres by default); the simulated probe sits at (y, x)
converted to metres in the sample's frame, whose origin is the centre of the simulated scan.

Files, as a DECTRIS file writer keeps them beside the stream: given ``frames_dir``, the device also writes
each run's frames to ``frames_dir/selun_<run uid>.h5`` (``/entry/data/data``, (N, H, W) uint16, one
bitshuffle-LZ4 chunk per frame, SWMR so that readers follow the file while it grows) and announces them to
Bluesky as an external asset: one ``resource`` (spec ``AD_HDF5``) per run and one ``datum`` per frame
(``point_number`` = image id), with the frame key ``<name>_image`` described as an external ``array`` of
the frame shape and ``dtype_numpy`` ``<u2``. ``bluesky_tiled_plugins.TiledWriter`` turns these into an
array node ``/<run uid>/primary/<name>_image`` backed by the file (the Tiled server must list
``frames_dir`` as readable storage); without ``dtype_numpy`` it would register the frames as float64.

Configuration (in every descriptor's ``configuration``, so beside the raw run in Tiled): the geometry
(``<name>_energy_kev``, ``<name>_detector_distance_m``, ``<name>_pixel_size_m``) and which motors and
unit give the probe position (``<name>_y_motor_name``, ``<name>_x_motor_name``,
``<name>_motor_unit_name``): what ``phasestream.apps.replay.to_tiled`` needs to replay the run.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import zmq
from ophyd import DeviceStatus

from phasestream.errors import ConfigError, PositionError
from phasestream.formats.recorded_scan import READ_CHUNK_FRAMES, FrameCompression, compression_options
from phasestream.formats.stream_v2.encode import (
    NOMINAL_FRAME_TIME_S,
    encode_image,
    encode_message,
    end_fields,
    start_fields,
)
from phasestream.formats.units import LengthUnit
from phasestream.simulators.diffraction import ProbeShifter, expected_pattern, poisson_counts
from phasestream.simulators.ophyd_scan_detector import RunInfo, ScanDetector
from phasestream.simulators.scan_simulation import SimulatedScan
from phasestream.simulators.selun import DEFAULT_DATA_ENDPOINT, DEFAULT_SEND_HWM

# Where the frames sit in each run's file: DECTRIS's path, and TiledWriter's default for AD_HDF5.
FRAMES_DATASET = "/entry/data/data"
# The Bluesky spec of the file; TiledWriter maps it to application/x-hdf5 (its HDF5 adapter).
FRAMES_SPEC = "AD_HDF5"


class FrameSource(Protocol):
    """What the detector sees: a photon-counted pattern for the probe at a position, and the geometry."""

    shape_px: tuple[int, int]
    dtype: np.dtype
    energy_kev: float
    detector_distance_m: float
    pixel_size_m: float

    def frame(self, position_m: tuple[float, float]) -> np.ndarray: ...


class SimulatedSample:
    """The sample and probe of a simulated scan, imaged at any probe position (step scan, no fly blur).

    The scan's ``probe_truth`` carries the photon scale, so the expected pattern is in photons per pixel
    and the frames match those ``simulate_scan`` made along its own path.
    """

    def __init__(self, scan: SimulatedScan, seed: int = 0) -> None:
        self.scan = scan
        self.shape_px = (int(scan.probe_truth.shape[0]), int(scan.probe_truth.shape[1]))
        self.dtype = np.dtype(np.uint16)
        self.energy_kev = scan.energy_kev
        self.detector_distance_m = scan.detector_distance_m
        self.pixel_size_m = scan.detector_pixel_size_m
        self._shifter = ProbeShifter(scan.probe_truth)
        self._rng = np.random.default_rng(seed)

    def expected(self, position_m: tuple[float, float]) -> np.ndarray:
        """Noise-free pattern (photons per pixel) for the probe centred at ``position_m`` (y, x)."""
        scan = self.scan
        centre_px = (
            np.asarray(position_m, dtype=np.float64) - scan.object_top_left_m
        ) / scan.object_pixel_size_m
        try:
            return expected_pattern(self._shifter, scan.object_truth, centre_px, self.shape_px[0])
        except ValueError as error:
            half_m = (np.array(scan.object_truth.shape) - self.shape_px[0]) / 2 * scan.object_pixel_size_m
            raise PositionError(
                f"probe at (y, x) = {tuple(position_m)} m is off the simulated sample ({error}); keep the "
                f"scan within about ±{half_m[0]:.2e} m (y) and ±{half_m[1]:.2e} m (x) of its centre, or "
                "simulate a larger sample"
            ) from error

    def frame(self, position_m: tuple[float, float]) -> np.ndarray:
        counts, _clipped = poisson_counts(self.expected(position_m), self._rng)
        return counts


@dataclass
class _FramesFile:
    """One run's HDF5 file and the resource document that announces it."""

    file: h5py.File
    resource_uid: str

    @property
    def dataset(self) -> h5py.Dataset:
        return self.file[FRAMES_DATASET]


@dataclass
class _Series:
    run: RunInfo
    series_id: int
    series_unique_id: str
    date: datetime
    next_image_id: int = 0
    frames: _FramesFile | None = None
    asset_docs: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)


class SelunDetector(ScanDetector):
    """A SELUN on a Stream V2 PUSH socket that images ``source`` where ``y_motor`` and ``x_motor`` are.

    Subscribe ``on_run_start`` to the RunEngine's start documents before a run. The socket is bound at
    construction (port 0 lets the OS choose; ``data_endpoint`` reports it) so ingest can connect before
    the first run; ``close()`` releases it. With ``frames_dir`` each run's frames also go to a file there,
    announced as an external asset (see the module docstring).
    """

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        y_motor: Any,
        x_motor: Any,
        source: FrameSource,
        data_endpoint: str = DEFAULT_DATA_ENDPOINT,
        motor_unit: LengthUnit = LengthUnit.MICROMETRE,
        frame_time_s: float = NOMINAL_FRAME_TIME_S,
        send_timeout_s: float = 10.0,
        frames_dir: Path | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(prefix, name=name, **kwargs)
        self._attach(y_motor, x_motor, source, motor_unit)
        self.frames_dir = Path(frames_dir).resolve() if frames_dir is not None else None
        if self.frames_dir is not None:
            self.frames_dir.mkdir(parents=True, exist_ok=True)
        self._frame_reading: dict[str, Any] | None = None
        self.frame_time_s = frame_time_s
        self._send_timeout_s = send_timeout_s
        self._series: _Series | None = None
        self._series_count = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, DEFAULT_SEND_HWM)
        self._socket.setsockopt(zmq.SNDTIMEO, round(send_timeout_s * 1000))
        self._socket.setsockopt(zmq.LINGER, round(send_timeout_s * 1000))
        try:
            self._socket.bind(data_endpoint)
        except zmq.ZMQError as error:
            self.close()
            raise ConfigError(
                f"cannot bind the SELUN data socket to {data_endpoint!r} ({error}): pick a free endpoint, "
                "the one ingest connects to (detector.data_endpoint)"
            ) from error

    @property
    def data_endpoint(self) -> str:
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def frames_key(self) -> str:
        """The data key whose value is each frame's datum id (with ``frames_dir``)."""
        return f"{self.name}_image"

    def frames_path(self, run_uid: str) -> Path:
        if self.frames_dir is None:
            raise ConfigError(f"{self.name} writes no files: give it frames_dir")
        return self.frames_dir / f"selun_{run_uid}.h5"

    def describe(self) -> dict[str, Any]:
        description = super().describe()
        if self.frames_dir is not None:
            description[self.frames_key] = {
                "source": f"SIM:{self.name}:image",
                "dtype": "array",
                "dtype_numpy": np.dtype(self.source.dtype).newbyteorder("<").str,
                "shape": list(self.source.shape_px),
                "external": "FILESTORE:",
            }
        return description

    def read(self) -> dict[str, Any]:
        reading = super().read()
        if self._frame_reading is not None:
            reading[self.frames_key] = self._frame_reading
        return reading

    def collect_asset_docs(self) -> Any:
        """The resource (once per run) and the datum of each frame since the last call (bluesky calls it)."""
        series = self._series
        while series is not None and series.asset_docs:
            yield series.asset_docs.popleft()

    def trigger(self) -> DeviceStatus:
        series = self._armed_series()
        image_id = series.next_image_id
        if series.run.num_points is not None and image_id >= series.run.num_points:
            raise ConfigError(
                f"trigger {image_id + 1} in run {series.run.uid}, whose start document announced "
                f"num_points={series.run.num_points}: the plan triggers more often than it announced"
            )
        frame = self.source.frame(self.position_m())
        if series.frames is not None:
            self._write_frame(series, series.frames, image_id, frame)
        self._send(
            encode_image(
                frame,
                series_id=series.series_id,
                series_unique_id=series.series_unique_id,
                image_id=image_id,
                frame_time_s=self.frame_time_s,
                series_date=series.date,
            )
        )
        series.next_image_id += 1
        self.image_id.put(image_id)
        status = DeviceStatus(self)
        status.set_finished()
        return status

    def unstage(self) -> list[Any]:
        self._end_series()
        return super().unstage()

    def close(self) -> None:
        # The file of a run that never unstaged is closed (so it stays readable); no end message is sent,
        # as no ingest may be left to take it.
        if self._series is not None and self._series.frames is not None:
            self._series.frames.file.close()
        self._socket.close()
        self._context.term()

    def _write_frame(self, series: _Series, frames: _FramesFile, image_id: int, frame: np.ndarray) -> None:
        dataset = frames.dataset
        dataset.resize(image_id + 1, axis=0)
        dataset[image_id] = frame
        dataset.flush()  # SWMR readers see the frame before its datum reaches anyone
        datum_id = f"{frames.resource_uid}/{image_id}"
        series.asset_docs.append(
            (
                "datum",
                {
                    "resource": frames.resource_uid,
                    "datum_id": datum_id,
                    "datum_kwargs": {"point_number": image_id},
                },
            )
        )
        self._frame_reading = {"value": datum_id, "timestamp": time.time()}

    def _open_frames_file(self, series: _Series) -> None:
        """Create the run's file and queue the resource document that announces it."""
        path = self.frames_path(series.run.uid)
        height, width = self.source.shape_px
        dtype = np.dtype(self.source.dtype).newbyteorder("<")
        try:
            file = h5py.File(path, "w", libver="latest")
        except OSError as error:
            raise ConfigError(
                f"cannot create {path} for run {series.run.uid} ({error}): give {self.name} a writable "
                "frames_dir"
            ) from error
        file.create_dataset(
            FRAMES_DATASET,
            shape=(0, height, width),
            maxshape=(None, height, width),
            dtype=dtype,
            chunks=(1, height, width),
            **compression_options(FrameCompression.BSLZ4),
        )
        file.swmr_mode = True
        series.frames = _FramesFile(file, resource_uid=str(uuid.uuid4()))
        series.asset_docs.append(
            (
                "resource",
                {
                    "uid": series.frames.resource_uid,
                    "spec": FRAMES_SPEC,
                    "root": str(path.parent),
                    "resource_path": path.name,
                    "resource_kwargs": {"dataset": FRAMES_DATASET, "chunk_shape": [READ_CHUNK_FRAMES]},
                    "path_semantics": "posix",
                    "run_start": series.run.uid,
                },
            )
        )

    def _armed_series(self) -> _Series:
        run = self._run
        if run is None:
            raise ConfigError(
                f"{self.name} was triggered outside a run it knows of: subscribe it to the RunEngine's "
                f'start documents with RE.subscribe({self.name}.on_run_start, "start")'
            )
        if self._series is not None and self._series.run.uid == run.uid:
            return self._series
        self._end_series()  # a new run without an unstage in between
        if run.num_points is None:
            raise ConfigError(
                f"run {run.uid} (plan {run.plan_name!r}) does not announce num_points, so the detector "
                "cannot announce its number of images: use a plan with a known number of points"
            )
        self._series_count += 1
        series = _Series(
            run=run,
            series_id=self._series_count,
            series_unique_id=f"phasestream-selun-{run.uid}-{self._series_count}",
            date=datetime.now(UTC),
        )
        source = self.source
        start = start_fields(
            series_id=series.series_id,
            series_unique_id=series.series_unique_id,
            shape_px=source.shape_px,
            dtype=source.dtype,
            number_of_images=run.num_points,
            energy_kev=source.energy_kev,
            detector_distance_m=source.detector_distance_m,
            pixel_size_m=source.pixel_size_m,
            count_time_s=self.frame_time_s,
            frame_time_s=self.frame_time_s,
            user_data={
                "scan_uid": run.uid,
                "scan_shape": run.shape,
                "positions_source": "bluesky",
                **({"geometry": run.geometry} if run.geometry is not None else {}),
            },
            arm_date=series.date,
        )
        self._send(encode_message(start))
        if self.frames_dir is not None:
            self._open_frames_file(series)
        self._series = series
        self.series_id.put(series.series_id)
        return series

    def _end_series(self) -> None:
        series, self._series = self._series, None
        self._frame_reading = None
        if series is not None:
            if series.frames is not None:
                series.frames.file.close()
            self._send(
                encode_message(
                    end_fields(series_id=series.series_id, series_unique_id=series.series_unique_id)
                )
            )

    def _send(self, message: bytes) -> None:
        try:
            self._socket.send(message)
        except zmq.Again:
            raise TimeoutError(
                f"no ingest took a SELUN message on {self.data_endpoint} within "
                f"send_timeout_s={self._send_timeout_s}: start the pipeline with detector.data_endpoint "
                "set to this endpoint before the scan"
            ) from None

"""Recorded ptychography scans in CXI files (CXIDB format 1.6), and what every scan file reader shares.

Layout written and read (SI units throughout, as the CXI reference document requires)::

    /cxi_version                                   160 (format 1.6)
    /entry_1                                       NXentry
        data_1/data                  (N, H, W)     soft link to instrument_1/detector_1/data
        data_1/translation                         soft link to sample_1/geometry_1/translation
        sample_1/geometry_1/translation  (N, 3)    sample translation (x, y, z) in the lab frame, m
        instrument_1/detector_1/{data, distance, x_pixel_size, y_pixel_size, basis_vectors, frame_time}
        instrument_1/source_1/energy               photon energy, J
        instrument_1/source_1/illumination         the probe (optional)

Position convention. CXI (and NeXus, whose frame it shares: z along the beam, y up, x completing a
right-handed frame) records where the *sample* was moved, so the probe sits at −translation on the sample.
The detector's ``basis_vectors`` give the lab direction of a step along frame rows and columns; the CXI
default, written here, is rows along −y and columns along −x. phasestream's (y, x) positions are probe
centres along the frame's row and column axes (the far-field convention I = |F(ψ)|² keeps object and
detector axes parallel), so ``y_m = −translation · row_direction``; with the default basis that is
``y_m = translation_y`` and ``x_m = translation_x``. PyNX stores the translation as (3, N); both layouts
are read.

Frames stay on disk: ``RecordedScan`` keeps where they are and reads them in chunks, so a scan larger than
memory replays. When every frame is one bitshuffle-LZ4 HDF5 chunk (DECTRIS files, and CXI files written
here with the default compression), the stored chunk already is the Stream V2 payload (the HDF5 filter and
Stream V2 share the 12-byte framing), so replay sends it without decompressing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from phasestream.errors import PhasestreamError, PositionError
from phasestream.simulators.diffraction import object_pixel_size_m
from phasestream.simulators.scan_simulation import SimulatedScan
from phasestream.simulators.stream_v2_encode import bslz4_compress

CXI_VERSION = 160  # format 1.6, stored as version × 100
JOULES_PER_EV = 1.602176634e-19
# Frames read from disk at a time: about 2.4 MB of 192 × 192 uint16 frames.
READ_CHUNK_FRAMES = 64
# HDF5 filter id of bitshuffle (registered with The HDF Group) and its LZ4 compression code (cd_values[4]).
BITSHUFFLE_FILTER_ID = 32008
_BITSHUFFLE_LZ4 = 2
# The CXI default detector orientation: rows run along −y, columns along −x (top-left origin).
DEFAULT_ROW_DIRECTION = (0.0, -1.0, 0.0)
DEFAULT_COLUMN_DIRECTION = (-1.0, 0.0, 0.0)
# Metres per unit for the ``units`` attributes that scan files carry on lengths.
METRES_PER_UNIT = {
    "m": 1.0,
    "metre": 1.0,
    "meter": 1.0,
    "mm": 1e-3,
    "um": 1e-6,
    "µm": 1e-6,
    "micron": 1e-6,
    "nm": 1e-9,
    "angstrom": 1e-10,
    "Å": 1e-10,
    "A": 1e-10,
}
_UNIT_NAMES = {1e-3: "millimetres", 1e-6: "micrometres", 1e-9: "nanometres"}
# Neighbouring positions are compared on at most this many probe positions (the median is robust).
_SCALE_SAMPLE = 256


class ScanFileError(PhasestreamError):
    """A scan file lacks a dataset, or holds one with an impossible shape or value."""

    reason = "scan_file"


class FrameCompression(StrEnum):
    """How frames are stored: bslz4 as a DECTRIS detector writes them, gzip, or not at all."""

    BSLZ4 = "bslz4"
    GZIP = "gzip"
    NONE = "none"


class CxiPath(StrEnum):
    DATA = "/entry_1/data_1/data"
    DETECTOR_DATA = "/entry_1/instrument_1/detector_1/data"
    TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
    DATA_TRANSLATION = "/entry_1/data_1/translation"
    DISTANCE = "/entry_1/instrument_1/detector_1/distance"
    X_PIXEL_SIZE = "/entry_1/instrument_1/detector_1/x_pixel_size"
    Y_PIXEL_SIZE = "/entry_1/instrument_1/detector_1/y_pixel_size"
    BASIS_VECTORS = "/entry_1/instrument_1/detector_1/basis_vectors"
    FRAME_TIME = "/entry_1/instrument_1/detector_1/frame_time"
    COUNT_TIME = "/entry_1/instrument_1/detector_1/count_time"
    ENERGY = "/entry_1/instrument_1/source_1/energy"
    ILLUMINATION = "/entry_1/instrument_1/source_1/illumination"


@dataclass(frozen=True)
class FrameBlock:
    """The first ``count`` frames of one (N, H, W) dataset of one HDF5 file (the readers take them all)."""

    file: Path
    dataset: str
    count: int


@dataclass(frozen=True)
class RecordedScan:
    """A scan read from a file: geometry and positions in memory, frames on disk (``blocks``, in order).

    ``positions_m`` are probe centres (y, x) in metres along the frame's row and column axes, as the
    position channel sends them (see the module docstring for the conversion from sample translations).
    """

    source: Path  # the file the scan was read from (for NXmx, the master file)
    blocks: tuple[FrameBlock, ...]
    frame_shape_px: tuple[int, int]
    frame_dtype: np.dtype
    positions_m: np.ndarray  # (n, 2) float64
    energy_kev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    frame_time_s: float | None  # the recorded time between frames; None where the file has none
    probe: np.ndarray | None
    scan_shape: tuple[int, ...]
    bslz4_passthrough: bool  # every frame is one bitshuffle-LZ4 chunk: replay sends the stored bytes

    @property
    def n_frames(self) -> int:
        return sum(block.count for block in self.blocks)

    @property
    def object_pixel_size_m(self) -> tuple[float, float]:
        """(y, x) real-space pixel of the far-field geometry, Δ = λ z / (N p), per frame axis."""
        return pixel_size_per_axis_m(
            self.energy_kev, self.detector_distance_m, self.frame_shape_px, self.detector_pixel_size_m
        )

    @property
    def object_top_left_m(self) -> tuple[float, float]:
        """Centre of object pixel (0, 0): the smallest grid that holds every probe window."""
        pixel = np.asarray(self.object_pixel_size_m)
        half_window = np.asarray(self.frame_shape_px) // 2
        corner = self.positions_m.min(axis=0) - half_window * pixel
        return float(corner[0]), float(corner[1])

    def positions_object_px(self) -> np.ndarray:
        """Probe centres as fractional object-grid indices (row, column), from metres and the geometry."""
        return (self.positions_m - np.asarray(self.object_top_left_m)) / np.asarray(self.object_pixel_size_m)

    def iter_frames(self, chunk_frames: int = READ_CHUNK_FRAMES) -> Iterator[np.ndarray]:
        """The frames in order, at most ``chunk_frames`` at a time; only one chunk is in memory."""
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames}: use at least 1")
        for block in self.blocks:
            with h5py.File(block.file, "r") as file:
                data = file[block.dataset]
                for start in range(0, block.count, chunk_frames):
                    yield data[start : min(start + chunk_frames, block.count)]

    def iter_bslz4(self) -> Iterator[bytes]:
        """Each frame's bitshuffle-LZ4 bytes with the HDF5 framing, as stored (``bslz4_passthrough``)."""
        if not self.bslz4_passthrough:
            raise ScanFileError(
                f"the frames of {self.source} are not stored as one bitshuffle-LZ4 chunk per frame; "
                "read them with iter_frames() and compress them instead"
            )
        for block in self.blocks:
            with h5py.File(block.file, "r") as file:
                data = file[block.dataset]
                for index in range(block.count):
                    filter_mask, chunk = data.id.read_direct_chunk((index, 0, 0))
                    if filter_mask:
                        # HDF5 stores a chunk unfiltered when the filter failed on it: compress it here.
                        chunk = bslz4_compress(np.frombuffer(chunk, data.dtype).reshape(data.shape[1:]))
                    yield chunk


# ---- geometry and positions shared by the CXI and NXmx readers -------------------------------------------


def pixel_size_per_axis_m(
    energy_kev: float, detector_distance_m: float, frame_shape_px: tuple[int, int], pixel_size_m: float
) -> tuple[float, float]:
    height, width = frame_shape_px
    return (
        object_pixel_size_m(energy_kev, detector_distance_m, height, pixel_size_m),
        object_pixel_size_m(energy_kev, detector_distance_m, width, pixel_size_m),
    )


def positions_from_sample_translation(
    translation_m: np.ndarray,
    row_direction: np.ndarray | tuple[float, ...] = DEFAULT_ROW_DIRECTION,
    column_direction: np.ndarray | tuple[float, ...] = DEFAULT_COLUMN_DIRECTION,
) -> np.ndarray:
    """(n, 3) lab-frame sample translations → (n, 2) probe centres (y, x) along the frame axes, metres.

    The probe sits at −translation on the sample; its coordinate along an axis is the projection onto
    that axis's unit lab direction.
    """
    rows, columns = (_unit_vector(direction) for direction in (row_direction, column_direction))
    probe_on_sample = -np.asarray(translation_m, dtype=np.float64)
    return np.stack([probe_on_sample @ rows, probe_on_sample @ columns], axis=1)


def sample_translation_from_positions(positions_m: np.ndarray) -> np.ndarray:
    """The inverse for the default orientation: (n, 2) probe (y, x) → (n, 3) sample translation (x, y, z)."""
    positions = np.asarray(positions_m, dtype=np.float64)
    translation = np.zeros((len(positions), 3))
    translation[:, 0] = positions[:, 1]
    translation[:, 1] = positions[:, 0]
    return translation


def check_position_scale(
    positions_m: np.ndarray, frame_shape_px: tuple[int, int], pixel_size_m: tuple[float, float], where: str
) -> None:
    """Refuse positions whose scale cannot be a ptychography scan with this geometry: a unit mix-up.

    Two bounds, both loose enough for any real scan. Above: neighbouring points farther apart than the
    detector window (N object pixels, and the probe is never wider) would share no illuminated area, so
    nothing could be reconstructed; millimetres, micrometres or nanometres stored as metres land there.
    Below: a scan whose whole extent is under one object pixel (a stationary series, extent zero, is
    allowed); metres labelled as a smaller unit land there.
    """
    n = len(positions_m)
    if n < 2:
        return
    pixel = np.asarray(pixel_size_m)
    window_px = min(frame_shape_px)
    step_m = _median_neighbour_distance_m(positions_m, pixel)
    extent_m = positions_m.max(axis=0) - positions_m.min(axis=0)
    step_px = step_m / float(pixel.max())
    extent_px = float((extent_m / pixel).max())
    geometry = (
        f"{window_px}-pixel probe window, object pixel {float(pixel.max()):.3g} m from the energy, "
        "distance and detector pixel"
    )
    if step_px > window_px:
        factor = next(
            (f for f in (1e-3, 1e-6, 1e-9) if step_px * f <= window_px),
            1e-9,
        )
        raise PositionError(
            f"positions in {where} are implausibly large for metres: neighbouring scan points lie a "
            f"median {step_m:.4g} m apart, {step_px:.4g} object pixels, more than the {geometry}, so no "
            f"two frames would overlap. Read as {_UNIT_NAMES[factor]} they would lie {step_m * factor:.4g} m "
            f"({step_px * factor:.3g} pixels) apart: the positions were likely stored in "
            f"{_UNIT_NAMES[factor]}; convert them to metres (× {factor:g}) or set their units attribute"
        )
    if 0 < extent_px < 1:
        factor = next((f for f in (1e3, 1e6, 1e9) if extent_px * f >= 1), 1e9)
        raise PositionError(
            f"positions in {where} are implausibly small: the whole scan spans "
            f"{float(extent_m.max()):.4g} m, {extent_px:.3g} object pixels of the {geometry}, so every "
            "frame would see the same spot. "
            f"× {factor:g} they would span {extent_px * factor:.3g} pixels: the values are likely metres "
            "stored under a smaller unit (check the units attribute), or micrometres or nanometres "
            "converted twice"
        )


def check_geometry(energy_kev: float, distance_m: float, pixel_size_m: float, where: dict[str, str]) -> None:
    """Refuse a geometry that is off by a unit (energy in eV or J mixed up, lengths in mm or µm)."""
    checks = (
        ("energy", energy_kev, 0.1, 100.0, "keV", "an X-ray photon energy (0.1–100 keV)"),
        ("distance", distance_m, 1e-3, 200.0, "m", "a sample–detector distance (1 mm – 200 m)"),
        ("pixel", pixel_size_m, 1e-7, 1e-2, "m", "a detector pixel (0.1 µm – 1 cm)"),
    )
    for key, value, low, high, unit, meaning in checks:
        if not (math.isfinite(value) and low <= value <= high):
            hint = _unit_hint(key, value)
            raise ScanFileError(
                f"{where[key]} gives {value:.6g} {unit}, which is not {meaning}{hint}; "
                "store it in SI units (CXI requires them) or fix its units attribute"
            )


def metres_per_unit(dataset: h5py.Dataset, default: str = "m") -> float:
    units = text_attribute(dataset, "units") or default
    try:
        return METRES_PER_UNIT[units.strip()]
    except KeyError:
        raise ScanFileError(
            f"{dataset.file.filename}:{dataset.name} has units {units!r}; phasestream reads lengths in "
            f"{sorted(METRES_PER_UNIT)}: convert the values or fix the attribute"
        ) from None


def text_attribute(obj: h5py.HLObject, name: str) -> str | None:
    """A string attribute however it was written (str, bytes, or a one-element array of either)."""
    value = obj.attrs.get(name)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def required_dataset(file: h5py.File, path: str, meaning: str) -> h5py.Dataset:
    node = file.get(path)
    if not isinstance(node, h5py.Dataset):
        found = "missing" if node is None else f"a {type(node).__name__}, not a dataset"
        raise ScanFileError(f"{file.filename} lacks {path} ({meaning}): {found}; write it there")
    return node


def scalar_value(dataset: h5py.Dataset, meaning: str) -> float:
    value = np.asarray(dataset[()])
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise ScanFileError(
            f"{dataset.file.filename}:{dataset.name} ({meaning}) holds {value.dtype} of shape {value.shape}; "
            "expected one number"
        )
    return float(value.reshape(-1)[0])


def frames_dataset_shape(dataset: h5py.Dataset) -> tuple[int, int, int]:
    if dataset.ndim != 3 or min(dataset.shape) < 1:
        raise ScanFileError(
            f"{dataset.file.filename}:{dataset.name} has shape {dataset.shape}; expected frames "
            "(N, H, W) with one detector image per scan position, and at least one"
        )
    n, height, width = dataset.shape
    return n, height, width


def stored_as_bslz4_per_frame(dataset: h5py.Dataset) -> bool:
    """One chunk per frame through the bitshuffle filter with LZ4 and nothing else, little-endian."""
    if dataset.is_virtual or dataset.chunks != (1, *dataset.shape[1:]) or dataset.dtype.byteorder == ">":
        return False
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return False
    filter_id, _, values, _ = plist.get_filter(0)
    return filter_id == BITSHUFFLE_FILTER_ID and len(values) > 4 and values[4] == _BITSHUFFLE_LZ4


def compression_options(compression: FrameCompression) -> dict[str, Any]:
    if compression is FrameCompression.BSLZ4:
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if compression is FrameCompression.GZIP:
        return {"compression": "gzip", "shuffle": True}
    return {}


def frame_layout(scan: SimulatedScan | RecordedScan) -> tuple[int, tuple[int, int], np.dtype]:
    """Frame count, frame shape and dtype, without reading a recorded scan's frames."""
    if isinstance(scan, RecordedScan):
        return scan.n_frames, scan.frame_shape_px, scan.frame_dtype
    n, height, width = scan.frames.shape
    return n, (height, width), scan.frames.dtype


def frame_chunks(
    scan: SimulatedScan | RecordedScan, chunk_frames: int = READ_CHUNK_FRAMES
) -> Iterator[np.ndarray]:
    """The frames in order, ``chunk_frames`` at a time (a recorded scan's stay on disk until read)."""
    if isinstance(scan, RecordedScan):
        yield from scan.iter_frames(chunk_frames)
        return
    for start in range(0, len(scan.frames), chunk_frames):
        yield scan.frames[start : start + chunk_frames]


def write_frames(
    group: h5py.Group,
    name: str,
    shape: tuple[int, int, int],
    dtype: np.dtype,
    chunks: Iterable[np.ndarray],
    compression: FrameCompression,
) -> h5py.Dataset:
    """Write frames from ``chunks`` (in order) as ``group[name]``, one HDF5 chunk per frame."""
    dataset = group.create_dataset(
        name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), **compression_options(compression)
    )
    written = 0
    for chunk in chunks:
        dataset[written : written + len(chunk)] = chunk
        written += len(chunk)
    if written != shape[0]:
        raise ScanFileError(f"{written} frames arrived for {group.name}/{name}, declared {shape[0]}")
    return dataset


def _median_neighbour_distance_m(positions_m: np.ndarray, pixel_size_m: np.ndarray) -> float:
    """Median over a sample of positions of the distance to the nearest other (distinct) position."""
    scaled = positions_m / pixel_size_m  # isotropic in pixels, so rectangular pixels compare fairly
    sample = scaled[np.unique(np.linspace(0, len(scaled) - 1, _SCALE_SAMPLE).astype(int))]
    nearest = np.full(len(sample), np.inf)
    for start in range(0, len(scaled), 65536):
        block = scaled[start : start + 65536]
        distances = np.hypot(*(sample[:, None, :] - block[None, :, :]).transpose(2, 0, 1))
        distances[distances == 0] = np.inf  # itself, and repeated positions
        nearest = np.minimum(nearest, distances.min(axis=1))
    finite = nearest[np.isfinite(nearest)]
    if not len(finite):
        return 0.0
    return float(np.median(finite)) * float(pixel_size_m.max())


def _unit_vector(direction: np.ndarray | tuple[float, ...]) -> np.ndarray:
    vector = np.asarray(direction, dtype=np.float64).reshape(3)
    norm = float(np.linalg.norm(vector))
    if not norm > 0:
        raise ScanFileError(f"detector axis direction {vector.tolist()} has no length; expected a lab vector")
    return vector / norm


def _unit_hint(key: str, value: float) -> str:
    if key == "energy" and 100.0 < value <= 1e5:
        return f" (it looks like eV: {value / 1000:.4g} keV)"
    if key == "energy" and 0 < value < 1e-10:
        return f" (it looks like joules read as keV: {value / JOULES_PER_EV / 1000:.4g} keV)"
    if key in ("distance", "pixel"):
        for factor, name in ((1e-3, "millimetres"), (1e-6, "micrometres")):
            scaled = value * factor
            if (key == "distance" and 1e-3 <= scaled <= 200.0) or (key == "pixel" and 1e-7 <= scaled <= 1e-2):
                return f" (it looks like {name}: {scaled:.4g} m)"
    return ""


# ---- CXI -----------------------------------------------------------------------------------------------


def write_cxi(
    path: Path | str,
    scan: SimulatedScan | RecordedScan,
    *,
    frame_time_s: float | None = None,
    compression: FrameCompression = FrameCompression.BSLZ4,
) -> Path:
    """Save a scan as CXI; ``frame_time_s`` (default: the scan's recorded one) lets replay keep the rate.

    bslz4 is the default because it is what the detector streams (replay then sends the stored bytes);
    readers need the bitshuffle filter (``hdf5plugin``), as for any DECTRIS file. ``NONE`` suits readers
    without it.
    """
    path = Path(path)
    probe = scan.probe_truth if isinstance(scan, SimulatedScan) else scan.probe
    if frame_time_s is None and isinstance(scan, RecordedScan):
        frame_time_s = scan.frame_time_s
    pixel_size_m = scan.detector_pixel_size_m
    with h5py.File(path, "w") as file:
        file.attrs["default"] = "entry_1"
        file.attrs["creator"] = "phasestream"
        file.create_dataset("cxi_version", data=CXI_VERSION)
        entry = nx_group(file, "entry_1", "NXentry", default="data_1")
        entry.create_dataset("start_time", data=datetime.now(UTC).isoformat())
        entry.create_dataset("program_name", data="phasestream")

        geometry = nx_group(nx_group(entry, "sample_1", "NXsample"), "geometry_1", "NXgeometry")
        translation = geometry.create_dataset(
            "translation", data=sample_translation_from_positions(scan.positions_m)
        )
        translation.attrs["units"] = "m"
        translation.attrs["scan_shape"] = np.asarray(scan.scan_shape, dtype=np.int64)  # not CXI: for replay

        instrument = nx_group(entry, "instrument_1", "NXinstrument")
        source = nx_group(instrument, "source_1", "NXsource")
        write_quantity(source, "energy", scan.energy_kev * 1000 * JOULES_PER_EV, "J")
        source["energy"].attrs["note"] = "incident photon energy, as CXI defines it"
        if probe is not None:
            source.create_dataset("illumination", data=np.asarray(probe, dtype=np.complex64))

        detector = nx_group(instrument, "detector_1", "NXdetector")
        n, shape, dtype = frame_layout(scan)
        write_frames(detector, "data", (n, *shape), dtype, frame_chunks(scan), compression)
        write_quantity(detector, "distance", scan.detector_distance_m, "m")
        write_quantity(detector, "x_pixel_size", pixel_size_m, "m")
        write_quantity(detector, "y_pixel_size", pixel_size_m, "m")
        basis = np.array([DEFAULT_ROW_DIRECTION, DEFAULT_COLUMN_DIRECTION]) * pixel_size_m
        write_quantity(detector, "basis_vectors", basis, "m")
        if frame_time_s is not None:
            write_quantity(detector, "frame_time", frame_time_s, "s")
            write_quantity(detector, "count_time", frame_time_s, "s")
        detector["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)

        data = nx_group(entry, "data_1", "NXdata")
        data.attrs["signal"] = "data"
        data["data"] = h5py.SoftLink(CxiPath.DETECTOR_DATA)
        data["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
    return path


def read_cxi(path: Path | str) -> RecordedScan:
    """Read a CXI ptychography scan; frames stay on disk. Errors name the HDF5 path and the fix."""
    path = Path(path).absolute()  # the frames are read later, perhaps from another working directory
    try:
        file = h5py.File(path, "r")
    except (FileNotFoundError, OSError) as error:
        raise ScanFileError(f"cannot open {path} as HDF5 ({error}); is it a CXI file?") from error
    with file:
        frames_path = CxiPath.DATA if CxiPath.DATA in file else CxiPath.DETECTOR_DATA
        frames = required_dataset(file, frames_path, f"the diffraction frames (N, H, W); or {CxiPath.DATA}")
        n, height, width = frames_dataset_shape(frames)
        energy_j = scalar_value(required_dataset(file, CxiPath.ENERGY, "photon energy, J"), "photon energy")
        energy_kev = _energy_kev_from_joules(energy_j, f"{path}:{CxiPath.ENERGY}")
        distance_ds = required_dataset(file, CxiPath.DISTANCE, "sample–detector distance, m")
        distance_m = scalar_value(distance_ds, "distance") * metres_per_unit(distance_ds)
        pixel_size_m = _square_pixel_m(file)
        check_geometry(
            energy_kev,
            distance_m,
            pixel_size_m,
            {"energy": CxiPath.ENERGY, "distance": CxiPath.DISTANCE, "pixel": CxiPath.X_PIXEL_SIZE},
        )
        translation_ds = _translation_dataset(file)
        translation_m = _translation_rows(translation_ds, n) * metres_per_unit(translation_ds)
        rows, columns = _basis_directions(file)
        positions_m = positions_from_sample_translation(translation_m, rows, columns)
        pixel = pixel_size_per_axis_m(energy_kev, distance_m, (height, width), pixel_size_m)
        check_position_scale(positions_m, (height, width), pixel, f"{path}:{translation_ds.name}")
        scan_shape = translation_ds.attrs.get("scan_shape")
        return RecordedScan(
            source=path,
            blocks=(FrameBlock(path, frames.name, n),),
            frame_shape_px=(height, width),
            frame_dtype=frames.dtype,
            positions_m=positions_m,
            energy_kev=energy_kev,
            detector_distance_m=distance_m,
            detector_pixel_size_m=pixel_size_m,
            frame_time_s=_frame_time_s(file),
            probe=file[CxiPath.ILLUMINATION][()] if CxiPath.ILLUMINATION in file else None,
            scan_shape=tuple(int(s) for s in scan_shape) if scan_shape is not None else (n,),
            bslz4_passthrough=stored_as_bslz4_per_frame(frames),
        )


def nx_group(parent: h5py.Group, name: str, nx_class: str, **attrs: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    for key, value in attrs.items():
        group.attrs[key] = value
    return group


def write_quantity(group: h5py.Group, name: str, value: Any, units: str) -> None:
    group.create_dataset(name, data=value)
    group[name].attrs["units"] = units


def _energy_kev_from_joules(energy_j: float, where: str) -> float:
    """CXI stores the photon energy in joules; eV or keV there is the usual slip: say which it looks like."""
    energy_kev = energy_j / JOULES_PER_EV / 1000
    if 0.1 <= energy_kev <= 100.0:
        return energy_kev
    hint = next(
        (
            f" (it looks like {unit}: {energy_j * kev_per_unit:.4g} keV)"
            for unit, kev_per_unit in (("eV", 1e-3), ("keV", 1.0))
            if 0.1 <= energy_j * kev_per_unit <= 100.0
        ),
        "",
    )
    raise ScanFileError(
        f"{where} gives {energy_j:.6g} J, which is not an X-ray photon energy (0.1–100 keV, "
        f"{0.1e3 * JOULES_PER_EV:.3g}–{100e3 * JOULES_PER_EV:.3g} J){hint}; CXI stores it in joules"
    )


def _square_pixel_m(file: h5py.File) -> float:
    sizes = []
    for path in (CxiPath.X_PIXEL_SIZE, CxiPath.Y_PIXEL_SIZE):
        dataset = required_dataset(file, path, "detector pixel size, m")
        sizes.append(scalar_value(dataset, "pixel size") * metres_per_unit(dataset))
    x_m, y_m = sizes
    if not math.isclose(x_m, y_m, rel_tol=1e-6):
        raise ScanFileError(
            f"{file.filename}: x_pixel_size {x_m:.6g} m and y_pixel_size {y_m:.6g} m differ; the pipeline "
            "and the Stream V2 start message assume square pixels: rebin the frames to square pixels"
        )
    return x_m


def _translation_dataset(file: h5py.File) -> h5py.Dataset:
    if CxiPath.TRANSLATION not in file and CxiPath.DATA_TRANSLATION in file:
        return required_dataset(file, CxiPath.DATA_TRANSLATION, "sample translation (N, 3), m")
    return required_dataset(file, CxiPath.TRANSLATION, "sample translation (N, 3), m")


def _translation_rows(dataset: h5py.Dataset, n_frames: int) -> np.ndarray:
    """(n, 3) translations from (n, 3), (n, 2) (x, y) or PyNX's transposed (3, n)."""
    values = np.asarray(dataset[()], dtype=np.float64)
    if values.ndim == 2 and values.shape[0] in (2, 3) and values.shape[1] == n_frames != values.shape[0]:
        values = values.T
    if values.ndim != 2 or values.shape[0] != n_frames or values.shape[1] not in (2, 3):
        raise ScanFileError(
            f"{dataset.file.filename}:{dataset.name} has shape {values.shape} but the file holds {n_frames} "
            f"frames; expected ({n_frames}, 3) sample translations (x, y, z), one per frame"
        )
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
        raise PositionError(
            f"{dataset.file.filename}:{dataset.name} row {bad} is {values[bad].tolist()}: "
            "every translation must be finite"
        )
    if values.shape[1] == 2:
        values = np.concatenate([values, np.zeros((n_frames, 1))], axis=1)
    return values


def _basis_directions(file: h5py.File) -> tuple[np.ndarray, np.ndarray]:
    if CxiPath.BASIS_VECTORS not in file:
        return np.asarray(DEFAULT_ROW_DIRECTION), np.asarray(DEFAULT_COLUMN_DIRECTION)
    basis = np.asarray(file[CxiPath.BASIS_VECTORS][()], dtype=np.float64)
    if basis.ndim == 3:
        basis = basis[0]  # one basis per frame: a fixed detector repeats it
    if basis.shape != (2, 3):
        raise ScanFileError(
            f"{file.filename}:{CxiPath.BASIS_VECTORS} has shape {basis.shape}; expected (2, 3): the lab "
            "vectors of one step along rows, then along columns"
        )
    return basis[0], basis[1]


def _frame_time_s(file: h5py.File) -> float | None:
    for path in (CxiPath.FRAME_TIME, CxiPath.COUNT_TIME):
        if path in file:
            value = scalar_value(file[path], "time per frame")
            if value > 0:
                return value
    return None

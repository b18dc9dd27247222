"""Recorded ptychography scans in CXI files (CXIDB format 1.6), and what every scan file reader shares.

Layout written (SI units throughout, as the CXI reference document requires)::

    /cxi_version                                   160 (format 1.6)
    /entry_1                                       NXentry
        data_1/data                  (N, H, W)     soft link to instrument_1/detector_1/data
        data_1/translation                         soft link to sample_1/geometry_1/translation
        sample_1/geometry_1/translation  (N, 3)    sample translation (x, y, z) in the lab frame, m
        instrument_1/detector_1/{data, distance, x_pixel_size, y_pixel_size, basis_vectors, frame_time}
        instrument_1/detector_1/mask     (H, W)    uint32 bit field, 0 = good (only for a scan with a mask)
        instrument_1/source_1/energy               photon energy, J
        instrument_1/source_1/illumination         the probe (optional)

Read, besides that layout, as other tools write CXI (cxidb spec, SHARP, hummingbird, COSMIC, PtyPy,
ptychodus, NXcxi_ptycho):

- frames: ``entry_1/data_N/data`` (``data_1`` unless another is named; other ``data_N`` are reported),
  else ``instrument_1/detector_1/data``; integers, or floats (see "Frame values");
- translations, first found: the data group's ``translation``, ``sample_1/geometry_1/translation``,
  ``instrument_1/detector_1/translation`` (each (N, 3) x, y, z, (N, 2) x, y, or PyNX's (3, N); a
  ``units`` attribute, default m), then NXcxi_ptycho's motor datasets ``sample_1/transformations/{x, y}``
  (``units``, and ``vector`` for their lab direction, default +x and +y);
- photon energy: ``instrument_1/beam_1/energy`` (NXcxi_ptycho, where ``source_1/energy`` is the
  storage ring's), else ``source_1/energy``; in J unless a ``units`` attribute says eV or keV;
- probe, first found: ``source_1/illumination``, ``source_1/probe``, ``detector_1/probe``,
  ``entry_1/data_illumination``, where it is a complex or float (H, W) or (modes, H, W) array (in
  NXcxi_ptycho ``source_1/probe`` is the radiation type, a string, and is passed over);
- bad pixels: ``detector_1/mask``, the CXI bit field, a pixel is bad when any bit but 0x1000
  ("has signal") is set.

Position convention. CXI (and NeXus, whose frame it shares: z along the beam, y up, x completing a
right-handed frame) records where the *sample* was moved, so the probe sits at −translation on the sample.
The detector's ``basis_vectors`` give the lab direction of a step along frame rows and columns; the CXI
default, written here, is rows along −y and columns along −x. phasestream's (y, x) positions are probe
centres along the frame's row and column axes (the far-field convention I = |F(ψ)|² keeps object and
detector axes parallel), so ``y_m = −translation · row_direction``; with the default basis that is
``y_m = translation_y`` and ``x_m = translation_x``. Every translation layout above goes through this
one conversion.

Frame values. Stream V2 images are counts (unsigned integers) or float32. Frames stored as floats (as
most CXI writers store them) are looked at once, on the first chunk: whole numbers travel as uint32
counts, anything else as float32 intensities (``RecordedScan.frame_dtype`` says which). Every later chunk
is checked on the way: NaN, inf, negative values, and fractions in a scan that started with whole counts
raise ``ScanFileError`` naming the frame. Pixels in the bad-pixel mask are set to 0 first, whatever they
hold (0, the saturation value, NaN).

Frames stay on disk: ``RecordedScan`` keeps where they are and reads them in chunks, so a scan larger than
memory replays. When every frame is one bitshuffle-LZ4 HDF5 chunk of unsigned counts with no masked
pixel (DECTRIS files, and CXI files written here with the default compression), the stored chunk already
is the Stream V2 payload (the HDF5 filter and Stream V2 share the 12-byte framing), so replay sends it
without decompressing.
"""

from __future__ import annotations

import math
import re
import warnings
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
# Stream V2 image dtypes of float frames: whole counts, or intensities with fractions.
COUNTS_DTYPE = np.dtype("<u4")
INTENSITIES_DTYPE = np.dtype("<f4")
# CXI mask bit 0x1000 marks a pixel that has signal, not a defect; every other bit is one.
CXI_MASK_HAS_SIGNAL = 0x1000
CXI_MASK_DEFECTS = 0xFFFFFFFF ^ CXI_MASK_HAS_SIGNAL
# NXmx pixel_mask: the low 16 bits are defects (gap, dead, noisy, ...); the high ones are information.
NXMX_MASK_DEFECTS = 0xFFFF
# The value written for a pixel that was not measured: CXI bit 0x1 "invalid", NXmx bit 0 "gap".
MASKED_PIXEL = 1
_DATA_GROUP = re.compile(r"data_(\d+)")


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
    BEAM_ENERGY = "/entry_1/instrument_1/beam_1/energy"
    ILLUMINATION = "/entry_1/instrument_1/source_1/illumination"
    SOURCE_PROBE = "/entry_1/instrument_1/source_1/probe"
    DETECTOR_PROBE = "/entry_1/instrument_1/detector_1/probe"
    DATA_ILLUMINATION = "/entry_1/data_illumination"
    DETECTOR_TRANSLATION = "/entry_1/instrument_1/detector_1/translation"
    SAMPLE_TRANSFORMATIONS = "/entry_1/sample_1/transformations"
    MASK = "/entry_1/instrument_1/detector_1/mask"
    DEFINITION = "/entry_1/definition"


# Where other tools put the probe, in the order they are tried.
PROBE_PATHS = (CxiPath.ILLUMINATION, CxiPath.SOURCE_PROBE, CxiPath.DETECTOR_PROBE, CxiPath.DATA_ILLUMINATION)


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
    ``frame_dtype`` is the dtype ``iter_frames`` yields, which the reader decided: the stored one for
    integer frames, ``COUNTS_DTYPE`` or ``INTENSITIES_DTYPE`` for float frames.
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
    probe_path: str | None = None  # the HDF5 path ``probe`` was read from
    bad_pixel_mask: np.ndarray | None = None  # bool (H, W), True = not measured; those pixels travel as 0

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
        """The frames in order as they travel, at most ``chunk_frames`` at a time (one chunk in memory).

        Masked pixels are 0, the values are checked (see the module docstring) and the dtype is
        ``frame_dtype``.
        """
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames}: use at least 1")
        for block in self.blocks:
            with h5py.File(block.file, "r") as file:
                data = file[block.dataset]
                for start in range(0, block.count, chunk_frames):
                    chunk = data[start : min(start + chunk_frames, block.count)]
                    yield travelling_frames(chunk, self.frame_dtype, self.bad_pixel_mask, block, start)

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
    """(N, H, W) of a frames dataset, refusing what cannot travel as detector images."""
    where = f"{dataset.file.filename}:{dataset.name}"
    if dataset.dtype.kind == "c":
        raise ScanFileError(
            f"{where} holds complex numbers ({dataset.dtype}); detector frames are measured intensities: "
            "store |ψ|² (photon counts) as real numbers"
        )
    if dataset.dtype.kind not in "buif":
        raise ScanFileError(
            f"{where} holds {dataset.dtype}; expected frames of counts (integers) or intensities (floats)"
        )
    if dataset.ndim == 4:
        raise ScanFileError(
            f"{where} has shape {dataset.shape}: 4-D frames (a raster's rows and columns, or DECTRIS "
            "v2024.2's (images, channels, H, W)) are not read; store them as (N, H, W), one frame per "
            "scan position (NXcxi_ptycho uses a virtual dataset for that), or pick one channel"
        )
    if dataset.ndim != 3 or min(dataset.shape) < 1:
        raise ScanFileError(
            f"{where} has shape {dataset.shape}; expected frames (N, H, W) with one detector image per "
            "scan position, and at least one"
        )
    n, height, width = dataset.shape
    return n, height, width


def travel_dtype(dataset: h5py.Dataset, bad_pixel_mask: np.ndarray | None) -> np.dtype:
    """The dtype the frames of ``dataset`` travel as, decided on its first chunk.

    Integer frames keep their dtype. Float frames holding whole numbers are counts (``COUNTS_DTYPE``);
    with any fraction they are intensities (``INTENSITIES_DTYPE``). The first chunk is checked as every
    later one will be, so a file with NaN or negative values fails here, before replay starts.
    """
    if dataset.dtype.kind != "f":
        return dataset.dtype
    first = dataset[: min(READ_CHUNK_FRAMES, dataset.shape[0])]
    block = FrameBlock(Path(dataset.file.filename), dataset.name, dataset.shape[0])
    travelling_frames(first, INTENSITIES_DTYPE, bad_pixel_mask, block, 0)  # checks; zeroes masked pixels
    whole = bool(np.all(first == np.floor(first))) and first.max() <= np.iinfo(COUNTS_DTYPE).max
    return COUNTS_DTYPE if whole else INTENSITIES_DTYPE


def travelling_frames(
    chunk: np.ndarray, dtype: np.dtype, bad_pixel_mask: np.ndarray | None, block: FrameBlock, start: int
) -> np.ndarray:
    """``chunk`` (frames ``start``… of ``block``) as it travels: masked pixels 0, checked, as ``dtype``."""
    if bad_pixel_mask is not None:
        chunk[:, bad_pixel_mask] = 0
    if chunk.dtype.kind in "if":
        _refuse_frame_values(chunk, chunk < 0, "is negative", _NEGATIVE_FIX, block, start)
    if chunk.dtype.kind != "f":
        return chunk.astype(dtype, copy=False)
    if dtype.kind in "iu":
        _refuse_frame_values(chunk, ~np.isfinite(chunk), "is not finite", _NOT_FINITE_FIX, block, start)
        fix = (
            f"the scan's first frames hold whole counts, so it travels as {dtype} counts: round every "
            "frame to whole counts (np.rint) and rewrite the dataset"
        )
        _refuse_frame_values(chunk, chunk != np.floor(chunk), "is not a whole number", fix, block, start)
        limit = np.iinfo(dtype).max
        _refuse_frame_values(
            chunk, chunk > limit, f"exceeds {limit}, the largest {dtype} count", "", block, start
        )
        return chunk.astype(dtype)
    converted = chunk.astype(dtype, copy=False)  # float64 beyond float32's range becomes inf: refused here
    _refuse_frame_values(
        chunk, ~np.isfinite(converted), f"is not finite as {dtype}", _NOT_FINITE_FIX, block, start
    )
    return converted


_NEGATIVE_FIX = (
    "photon counts cannot be negative: fix the background subtraction that produced the file, clip the "
    "frames at 0, or flag those pixels in the bad-pixel mask (CXI detector_1/mask, NXmx pixel_mask)"
)
_NOT_FINITE_FIX = (
    "flag unmeasured pixels in the bad-pixel mask (CXI detector_1/mask, NXmx pixel_mask) so that they "
    "travel as 0, or store 0 there"
)


def _refuse_frame_values(
    chunk: np.ndarray, bad: np.ndarray, problem: str, fix: str, block: FrameBlock, start: int
) -> None:
    if not bad.any():
        return
    frame, row, column = (int(i) for i in np.argwhere(bad)[0])
    raise ScanFileError(
        f"{block.file}:{block.dataset} frame {start + frame} pixel (y={row}, x={column}) holds "
        f"{chunk[frame, row, column].item()}, which {problem}" + (f"; {fix}" if fix else "")
    )


def bad_pixels(dataset: h5py.Dataset, defect_bits: int, shape_px: tuple[int, int]) -> np.ndarray:
    """bool (H, W), True = not measured, from a bit-field mask: a pixel is bad when a defect bit is set."""
    where = f"{dataset.file.filename}:{dataset.name}"
    values = np.asarray(dataset[()])
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]  # one mask for the whole series, stored with a frame axis
    if values.dtype.kind not in "biu":
        raise ScanFileError(
            f"{where} holds {values.dtype}; a bad-pixel mask is an unsigned bit field (0 = good pixel)"
        )
    if values.shape != shape_px:
        raise ScanFileError(
            f"{where} has shape {values.shape} but the frames are {shape_px}: the mask must be one (H, W) "
            "image of the frames' size; crop or bin it as the frames were"
        )
    bad = (values.astype(np.uint64) & np.uint64(defect_bits)) != 0
    if bad.all():
        raise ScanFileError(
            f"{where} flags every pixel as bad: 0 marks a good pixel in CXI and NXmx masks; a mask with "
            "1 = good (PtyPy's convention) must be inverted before it is stored here"
        )
    return bad


def stored_as_bslz4_per_frame(dataset: h5py.Dataset) -> bool:
    """One chunk per frame through the bitshuffle filter with LZ4 and nothing else, little-endian."""
    if dataset.is_virtual or dataset.chunks != (1, *dataset.shape[1:]) or dataset.dtype.byteorder == ">":
        return False
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return False
    filter_id, _, values, _ = plist.get_filter(0)
    return filter_id == BITSHUFFLE_FILTER_ID and len(values) > 4 and values[4] == _BITSHUFFLE_LZ4


def sends_stored_bytes(dataset: h5py.Dataset, bad_pixel_mask: np.ndarray | None) -> bool:
    """Replay may send the stored chunks as they are: bslz4 counts that need no check and no masking."""
    unmasked = bad_pixel_mask is None or not bad_pixel_mask.any()
    return dataset.dtype.kind == "u" and unmasked and stored_as_bslz4_per_frame(dataset)


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
        mask = scan.bad_pixel_mask if isinstance(scan, RecordedScan) else None
        if mask is not None:
            detector.create_dataset("mask", data=np.where(mask, MASKED_PIXEL, 0).astype(np.uint32))
        if frame_time_s is not None:
            write_quantity(detector, "frame_time", frame_time_s, "s")
            write_quantity(detector, "count_time", frame_time_s, "s")
        detector["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)

        data = nx_group(entry, "data_1", "NXdata")
        data.attrs["signal"] = "data"
        data["data"] = h5py.SoftLink(CxiPath.DETECTOR_DATA)
        data["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
    return path


def split_dataset_spec(text: str | Path) -> tuple[Path, str | None]:
    """``scan.cxi::/entry_1/data_2`` → (``scan.cxi``, ``/entry_1/data_2``); a plain path → (path, None)."""
    file, separator, dataset = str(text).partition("::")
    if not separator:
        return Path(text), None
    if not file or not dataset.strip("/"):
        raise ScanFileError(
            f"{text!r}: write FILE::GROUP with both parts, e.g. scan.cxi::/entry_1/data_2, or the file alone"
        )
    return Path(file), dataset


def read_cxi(path: Path | str, data_group: str | None = None) -> RecordedScan:
    """Read a CXI ptychography scan; frames stay on disk. Errors name the HDF5 path and the fix.

    ``data_group`` (``data_2``, ``/entry_1/data_2``) picks one of several ``data_N`` groups; None takes
    ``data_1`` and warns when there are others. The layouts read are listed in the module docstring.
    """
    path = Path(path).absolute()  # the frames are read later, perhaps from another working directory
    try:
        file = h5py.File(path, "r")
    except (FileNotFoundError, OSError) as error:
        raise ScanFileError(f"cannot open {path} as HDF5 ({error}); is it a CXI file?") from error
    with file:
        frames, group_path = _frames_dataset(file, data_group)
        n, height, width = frames_dataset_shape(frames)
        energy_kev, energy_path = _photon_energy_kev(file)
        distance_ds = required_dataset(file, CxiPath.DISTANCE, "sample–detector distance, m")
        distance_m = scalar_value(distance_ds, "distance") * metres_per_unit(distance_ds)
        pixel_size_m = _square_pixel_m(file)
        check_geometry(
            energy_kev,
            distance_m,
            pixel_size_m,
            {"energy": energy_path, "distance": CxiPath.DISTANCE, "pixel": CxiPath.X_PIXEL_SIZE},
        )
        translation_m, translation_path, scan_shape = _sample_translation_m(file, group_path, n)
        rows, columns = _basis_directions(file)
        positions_m = positions_from_sample_translation(translation_m, rows, columns)
        pixel = pixel_size_per_axis_m(energy_kev, distance_m, (height, width), pixel_size_m)
        check_position_scale(positions_m, (height, width), pixel, f"{path}:{translation_path}")
        mask = _bad_pixel_mask(file, (height, width))
        probe, probe_path = _probe(file, (height, width))
        return RecordedScan(
            source=path,
            blocks=(FrameBlock(path, frames.name, n),),
            frame_shape_px=(height, width),
            frame_dtype=travel_dtype(frames, mask),
            positions_m=positions_m,
            energy_kev=energy_kev,
            detector_distance_m=distance_m,
            detector_pixel_size_m=pixel_size_m,
            frame_time_s=_frame_time_s(file),
            probe=probe,
            scan_shape=tuple(int(s) for s in scan_shape) if scan_shape is not None else (n,),
            bslz4_passthrough=sends_stored_bytes(frames, mask),
            probe_path=probe_path,
            bad_pixel_mask=mask,
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


def _frames_dataset(file: h5py.File, data_group: str | None) -> tuple[h5py.Dataset, str | None]:
    """The frames, and the path of the ``data_N`` group they came from (None: ``detector_1/data``)."""
    entry = file.get("/entry_1")
    groups = sorted(
        (name for name in (entry if isinstance(entry, h5py.Group) else ()) if _DATA_GROUP.fullmatch(name)),
        key=lambda name: int(_DATA_GROUP.fullmatch(name)[1]),
    )
    if data_group is not None:
        wanted = "/" + data_group.strip("/")
        if not wanted.startswith("/entry_1/"):
            wanted = f"/entry_1{wanted}"
        node = file.get(wanted)
        if isinstance(node, h5py.Group) and isinstance(node.get("data"), h5py.Dataset):
            return node["data"], wanted
        if isinstance(node, h5py.Dataset):
            return node, wanted.rsplit("/", 1)[0]
        raise ScanFileError(
            f"{file.filename} has no frames at {wanted}/data; its data groups are "
            f"{[f'/entry_1/{name}' for name in groups]}: name one of them"
        )
    with_frames = [name for name in groups if isinstance(entry[name].get("data"), h5py.Dataset)]
    if not with_frames:
        meaning = f"the diffraction frames (N, H, W); or {CxiPath.DATA}"
        return required_dataset(file, CxiPath.DETECTOR_DATA, meaning), None
    chosen, others = with_frames[0], with_frames[1:]
    if others:
        warnings.warn(
            f"{file.filename} holds frames in {', '.join(with_frames)}; reading /entry_1/{chosen}. To replay "
            f"another, name it: {file.filename}::/entry_1/{others[0]}",
            RuntimeWarning,
            stacklevel=3,
        )
    return entry[chosen]["data"], f"/entry_1/{chosen}"


def _photon_energy_kev(file: h5py.File) -> tuple[float, str]:
    """The photon energy and where it came from: NXcxi_ptycho's beam_1/energy, else source_1/energy."""
    beam = file.get(CxiPath.BEAM_ENERGY)
    if isinstance(beam, h5py.Dataset):
        return _energy_kev(beam), CxiPath.BEAM_ENERGY
    definition = file.get(CxiPath.DEFINITION)
    if isinstance(definition, h5py.Dataset) and "NXcxi_ptycho" in _text(definition[()]):
        raise ScanFileError(
            f"{file.filename} is NXcxi_ptycho but lacks {CxiPath.BEAM_ENERGY} (photon energy, with units); "
            f"there {CxiPath.ENERGY} is the storage ring's energy, not the photons': write the photon energy "
            f"to {CxiPath.BEAM_ENERGY}"
        )
    return _energy_kev(required_dataset(file, CxiPath.ENERGY, "photon energy, J")), CxiPath.ENERGY


def _energy_kev(dataset: h5py.Dataset) -> float:
    value = scalar_value(dataset, "photon energy")
    units = (text_attribute(dataset, "units") or "J").strip()
    kev_per_unit = {"eV": 1e-3, "keV": 1.0}.get(units)
    if kev_per_unit is not None:
        return value * kev_per_unit
    if units not in ("J", "joule", "joules"):
        raise ScanFileError(
            f"{dataset.file.filename}:{dataset.name} has units {units!r}; photon energies are read in J "
            "(CXI), eV or keV: convert the value or fix the attribute"
        )
    return _energy_kev_from_joules(value, f"{dataset.file.filename}:{dataset.name}")


def _sample_translation_m(
    file: h5py.File, data_group: str | None, n_frames: int
) -> tuple[np.ndarray, str, np.ndarray | None]:
    """(n, 3) sample translations in m, the path they came from and their ``scan_shape`` attribute."""
    candidates = [f"{data_group}/translation"] if data_group else []
    for path in (*candidates, CxiPath.TRANSLATION, CxiPath.DETECTOR_TRANSLATION):
        dataset = file.get(path)
        if isinstance(dataset, h5py.Dataset):
            translation = _translation_rows(dataset, n_frames) * metres_per_unit(dataset)
            return translation, _link_target(file, path), dataset.attrs.get("scan_shape")
    motors = _motor_translation_m(file, n_frames)
    if motors is not None:
        return motors[0], motors[1], None
    raise ScanFileError(
        f"{file.filename} lacks {CxiPath.TRANSLATION} (sample translation (N, 3), m): write it there, or "
        f"as data_N/translation, {CxiPath.DETECTOR_TRANSLATION} or {CxiPath.SAMPLE_TRANSFORMATIONS}/{{x, y}}"
    )


def _motor_translation_m(file: h5py.File, n_frames: int) -> tuple[np.ndarray, str] | None:
    """NXcxi_ptycho's per-frame motor datasets ``x`` and ``y``, each along its ``vector`` (default +x, +y)."""
    group = file.get(CxiPath.SAMPLE_TRANSFORMATIONS)
    if not isinstance(group, h5py.Group):
        return None
    translation = np.zeros((n_frames, 3))
    found = []
    for axis, default in (("x", (1.0, 0.0, 0.0)), ("y", (0.0, 1.0, 0.0))):
        node = group.get(axis)
        if not isinstance(node, h5py.Dataset):
            continue
        values = np.asarray(node[()], dtype=np.float64).reshape(-1)
        if values.size != n_frames:
            raise ScanFileError(
                f"{file.filename}:{node.name} holds {values.size} positions but the file holds {n_frames} "
                "frames; a scan motor needs one position per frame"
            )
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise PositionError(
                f"{file.filename}:{node.name}[{bad}] is {values[bad]}: positions must be finite"
            )
        direction = _unit_vector(node.attrs.get("vector", default))
        translation += (values * metres_per_unit(node))[:, None] * direction
        found.append(axis)
    if not found:
        return None
    return translation, f"{group.name}/{{{', '.join(found)}}}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _link_target(file: h5py.File, path: str) -> str:
    """The path a chain of soft links at ``path`` ends at, so that messages name the stored dataset."""
    for _ in range(16):
        parent, _, name = path.rpartition("/")
        group = file.get(parent or "/")
        link = group.get(name, getlink=True) if isinstance(group, h5py.Group) else None
        if not isinstance(link, h5py.SoftLink):
            return path
        path = link.path if link.path.startswith("/") else f"{parent}/{link.path}"
    return path


def _bad_pixel_mask(file: h5py.File, shape_px: tuple[int, int]) -> np.ndarray | None:
    node = file.get(CxiPath.MASK)
    if node is None:
        return None
    if not isinstance(node, h5py.Dataset):
        raise ScanFileError(
            f"{file.filename}:{CxiPath.MASK} is a {type(node).__name__}; expected the CXI bad-pixel mask, "
            "a uint32 (H, W) dataset"
        )
    return bad_pixels(node, CXI_MASK_DEFECTS, shape_px)


def _probe(file: h5py.File, shape_px: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """The first complex or float (H, W) or (modes, H, W) array at one of ``PROBE_PATHS``, and its path.

    Anything else there (NXcxi_ptycho's radiation-type string) is passed over; an array of another
    frame size cannot start a reconstruction of these frames, so it is passed over with a warning.
    """
    seen = set()
    for path in PROBE_PATHS:
        node = file.get(path)
        target = _link_target(file, path)
        if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "cf" or target in seen:
            continue  # not an array, or a soft link to one already looked at (SHARP's source_1/probe)
        seen.add(target)
        if node.ndim in (2, 3) and node.shape[-2:] == shape_px:
            return node[()], str(path)
        warnings.warn(
            f"{file.filename}:{path} has shape {node.shape}, not (H, W) or (modes, H, W) of the {shape_px} "
            "frames; it is not used as the probe",
            RuntimeWarning,
            stacklevel=3,
        )
    return None, None


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

"""A recorded scan read from a file (CXI or NXmx), and how its stored frames become the frames a replay sends.

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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from phasestream.errors import ScanFileError
from phasestream.formats.in_memory_scan import ScanInMemory
from phasestream.formats.scan_geometry import pixel_size_per_axis_m
from phasestream.formats.stream_v2.encode import bslz4_compress

# Frames read from disk at a time: about 2.4 MB of 192 × 192 uint16 frames.
READ_CHUNK_FRAMES = 64
# HDF5 filter id of bitshuffle (registered with The HDF Group) and its LZ4 compression code (cd_values[4]).
BITSHUFFLE_FILTER_ID = 32008
_BITSHUFFLE_LZ4 = 2
# Stream V2 image dtypes of float frames: whole counts, or intensities with fractions.
COUNTS_DTYPE = np.dtype("<u4")
INTENSITIES_DTYPE = np.dtype("<f4")
# NXmx pixel_mask: the low 16 bits are defects (gap, dead, noisy, ...); the high ones are information.
NXMX_MASK_DEFECTS = 0xFFFF
# The value written for a pixel that was not measured: CXI bit 0x1 "invalid", NXmx bit 0 "gap".
MASKED_PIXEL = 1


class FrameCompression(StrEnum):
    """How frames are stored: bslz4 as a DECTRIS detector writes them, gzip, or not at all."""

    BSLZ4 = "bslz4"
    GZIP = "gzip"
    NONE = "none"


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
        offset_m = self.positions_m - np.asarray(self.object_top_left_m)
        return np.asarray(offset_m / np.asarray(self.object_pixel_size_m), dtype=np.float64)

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
    stored: np.dtype = dataset.dtype  # h5py is untyped
    if stored.kind != "f":
        return stored
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
    bad = np.asarray((values.astype(np.uint64) & np.uint64(defect_bits)) != 0, dtype=np.bool_)
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


def frame_layout(scan: ScanInMemory | RecordedScan) -> tuple[int, tuple[int, int], np.dtype]:
    """Frame count, frame shape and dtype, without reading a recorded scan's frames."""
    if isinstance(scan, RecordedScan):
        return scan.n_frames, scan.frame_shape_px, scan.frame_dtype
    n, height, width = scan.frames.shape
    return n, (height, width), scan.frames.dtype


def frame_chunks(
    scan: ScanInMemory | RecordedScan, chunk_frames: int = READ_CHUNK_FRAMES
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

"""DECTRIS NeXus/NXmx scans: a master file plus data files of bitshuffle-LZ4 frames, as the DCU writes them.

Layout (DECTRIS FileWriter "V1", NXmx; lengths in m unless a ``units`` attribute says otherwise)::

    <prefix>_master.h5
        /entry/data/data_000001 …          external links to <prefix>_data_000001.h5:/entry/data/data
        /entry/instrument/beam/incident_wavelength            Å (units "angstrom")
        /entry/instrument/detector/{x_pixel_size, y_pixel_size, detector_distance, beam_center_x,
                                    beam_center_y, count_time, frame_time, detectorSpecific/nimages}
        /entry/instrument/detector/detectorSpecific/pixel_mask         uint32 (H, W), 0 = good pixel
        /entry/instrument/detector/module/{fast,slow}_pixel_direction   lab directions of columns, rows
        /entry/sample/transformations/{sample_x, sample_y}    per-frame sample translations
    <prefix>_data_000001.h5
        /entry/data/data  (k, H, W), one chunk per frame, bitshuffle + LZ4 (HDF5 filter 32008 through
                          ``hdf5plugin``), attributes image_nr_low / image_nr_high (1-based, inclusive)

The reader also takes ``/entry/data/data`` directly in the master file (``nimages_per_file`` 0, or the
FileWriter V2 virtual dataset) and ``distance`` for ``detector_distance`` (NXmx 2022). A pixel is bad
when ``pixel_mask & 0xFFFF`` is non-zero (gap, dead, under- or over-responding, noisy, user mask); bad
pixels travel as 0, whatever the detector wrote there. Frames are checked and converted as in CXI
(``phasestream.formats.recorded_scan``).

Positions: a detector file has none of its own. They are read from the NXtransformations translations
under ``/entry/sample/transformations`` (every per-frame ``translation`` field, summed along its
``vector``), converted as in CXI (the probe sits at −translation on the sample, projected onto the
detector's row and column directions; see ``phasestream.formats.scan_geometry``). A file without them can be
replayed with a side channel: ``positions_m``, (n, 2) probe centres (y, x) in metres, e.g. from the
motion controller's own record.
"""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import h5py
import numpy as np

from phasestream.errors import PositionError, ScanFileError
from phasestream.formats.hdf5_fields import (
    metres_per_unit,
    nx_group,
    required_dataset,
    scalar_value,
    text_attribute,
)
from phasestream.formats.in_memory_scan import ScanInMemory
from phasestream.formats.recorded_scan import (
    MASKED_PIXEL,
    NXMX_MASK_DEFECTS,
    READ_CHUNK_FRAMES,
    FrameBlock,
    FrameCompression,
    RecordedScan,
    bad_pixels,
    frame_chunks,
    frame_layout,
    frames_dataset_shape,
    sends_stored_bytes,
    travel_dtype,
    write_frames,
)
from phasestream.formats.scan_geometry import (
    DEFAULT_COLUMN_DIRECTION,
    DEFAULT_ROW_DIRECTION,
    check_geometry,
    check_position_scale,
    pixel_size_per_axis_m,
    positions_from_sample_translation,
    sample_translation_from_positions,
)
from phasestream.formats.units import JOULES_PER_EV

# hc in keV·Å: E = hc / λ.
HC_KEV_ANGSTROM = 12.3984198
DEFAULT_FRAMES_PER_DATA_FILE = 1000  # the DCU's nimages_per_file default
_DATA_LINK = re.compile(r"data_\d{6}")
DATA = "/entry/data"
DETECTOR = "/entry/instrument/detector"
WAVELENGTH = "/entry/instrument/beam/incident_wavelength"
INCIDENT_ENERGY = "/entry/instrument/beam/incident_energy"
TRANSFORMATIONS = "/entry/sample/transformations"
PIXEL_MASK = "/entry/instrument/detector/detectorSpecific/pixel_mask"


def data_file_name(master_path: Path, number: int) -> str:
    """``<prefix>_data_<number:06d>.h5`` beside ``<prefix>_master.h5``, as the DCU names them."""
    prefix = master_path.name.removesuffix(".h5").removesuffix("_master")
    return f"{prefix}_data_{number:06d}.h5"


def write_nxmx(
    master_path: Path | str,
    scan: ScanInMemory | RecordedScan,
    frames_per_data_file: int = DEFAULT_FRAMES_PER_DATA_FILE,
    *,
    frame_time_s: float | None = None,
) -> Path:
    """Write a master file and ``ceil(n / frames_per_data_file)`` bslz4 data files (0: frames in the master).

    Positions go to ``/entry/sample/transformations`` as sample translations, so ``read_nxmx`` needs no
    side channel for files written here.
    """
    master_path = Path(master_path)
    if frames_per_data_file < 0:
        raise ScanFileError(
            f"frames_per_data_file={frames_per_data_file}: use a positive number, or 0 for one master file"
        )
    n_frames, (height, width), dtype = frame_layout(scan)
    if frame_time_s is None and isinstance(scan, RecordedScan):
        frame_time_s = scan.frame_time_s
    with h5py.File(master_path, "w") as master:
        master.attrs["default"] = "entry"
        entry = nx_group(master, "entry", "NXentry")
        entry.attrs["default"] = "data"
        entry.create_dataset("definition", data="NXmx")
        entry.create_dataset("start_time", data=datetime.now(UTC).isoformat())
        data = nx_group(entry, "data", "NXdata")
        data.attrs["signal"] = "data"
        if frames_per_data_file == 0:
            write_frames(
                data, "data", (n_frames, height, width), dtype, frame_chunks(scan), FrameCompression.BSLZ4
            )
        else:
            _write_data_files(master_path, data, scan, frames_per_data_file)
        _write_instrument(entry, scan, (height, width), n_frames, frame_time_s)
        _write_sample(entry, scan)
    return master_path


def read_nxmx(master_path: Path | str, positions_m: np.ndarray | None = None) -> RecordedScan:
    """Read a DECTRIS NXmx scan; frames stay in their data files. ``positions_m`` is the side channel."""
    master_path = Path(master_path).absolute()  # data files are found, and read later, beside it
    try:
        master = h5py.File(master_path, "r")
    except OSError as error:
        raise ScanFileError(
            f"cannot open {master_path} as HDF5 ({error}); is it a DECTRIS master file?"
        ) from error
    with master:
        blocks, shape = _frame_blocks(master, master_path)
        mask = _bad_pixel_mask(master, shape)
        dtype, passthrough = _frames_travel(blocks, mask)
        n_frames = sum(block.count for block in blocks)
        energy_kev, energy_path = _energy_kev(master)
        distance_ds = _first_dataset(master, (f"{DETECTOR}/detector_distance", f"{DETECTOR}/distance"))
        distance_m = scalar_value(distance_ds, "detector distance") * metres_per_unit(distance_ds)
        pixel_ds = required_dataset(master, f"{DETECTOR}/x_pixel_size", "detector pixel width, m")
        pixel_size_m = scalar_value(pixel_ds, "pixel size") * metres_per_unit(pixel_ds)
        _check_square_pixels(master, pixel_size_m)
        check_geometry(
            energy_kev,
            distance_m,
            pixel_size_m,
            {"energy": energy_path, "distance": distance_ds.name, "pixel": pixel_ds.name},
        )
        if positions_m is None:
            positions_m, where = (
                _positions_from_transformations(master, n_frames),
                f"{master_path}:{TRANSFORMATIONS}",
            )
        else:
            positions_m, where = _side_channel(positions_m, n_frames), "the positions side channel"
        pixel = pixel_size_per_axis_m(energy_kev, distance_m, shape, pixel_size_m)
        check_position_scale(positions_m, shape, pixel, where)
        _warn_if_beam_off_centre(master, shape)
        return RecordedScan(
            source=master_path,
            blocks=blocks,
            frame_shape_px=shape,
            frame_dtype=dtype,
            positions_m=positions_m,
            energy_kev=energy_kev,
            detector_distance_m=distance_m,
            detector_pixel_size_m=pixel_size_m,
            frame_time_s=_frame_time_s(master),
            probe=None,
            scan_shape=_scan_shape(master, n_frames),
            bslz4_passthrough=passthrough,
            bad_pixel_mask=mask,
        )


# ---- writing --------------------------------------------------------------------------------------------


def _write_data_files(
    master_path: Path, data: h5py.Group, scan: ScanInMemory | RecordedScan, per_file: int
) -> None:
    n_frames, shape, dtype = frame_layout(scan)
    frames = (frame for chunk in frame_chunks(scan) for frame in chunk)
    for number, first in enumerate(range(0, n_frames, per_file), start=1):
        count = min(per_file, n_frames - first)
        name = data_file_name(master_path, number)
        # Regroup the frames into this file's share, a chunk at a time: a recorded scan stays on disk.
        chunks = (
            np.stack(list(islice(frames, min(READ_CHUNK_FRAMES, count - start))))
            for start in range(0, count, READ_CHUNK_FRAMES)
        )
        with h5py.File(master_path.parent / name, "w") as file:
            group = nx_group(nx_group(file, "entry", "NXentry"), "data", "NXdata")
            dataset = write_frames(group, "data", (count, *shape), dtype, chunks, FrameCompression.BSLZ4)
            dataset.attrs["image_nr_low"] = np.int32(first + 1)
            dataset.attrs["image_nr_high"] = np.int32(first + count)
        data[f"data_{number:06d}"] = h5py.ExternalLink(name, "/entry/data/data")


def _write_instrument(
    entry: h5py.Group,
    scan: ScanInMemory | RecordedScan,
    shape: tuple[int, int],
    n_frames: int,
    frame_time_s: float | None,
) -> None:
    instrument = nx_group(entry, "instrument", "NXinstrument")
    beam = nx_group(instrument, "beam", "NXbeam")
    _quantity(beam, "incident_wavelength", HC_KEV_ANGSTROM / scan.energy_kev, "angstrom")
    _quantity(beam, "incident_energy", scan.energy_kev * 1000, "eV")
    detector = nx_group(instrument, "detector", "NXdetector")
    detector.create_dataset("description", data="DECTRIS SELUN (phasestream simulator)")
    height, width = shape
    for name in ("x_pixel_size", "y_pixel_size"):
        _quantity(detector, name, scan.detector_pixel_size_m, "m")
    for name in ("detector_distance", "distance"):
        _quantity(detector, name, scan.detector_distance_m, "m")
    _quantity(detector, "beam_center_x", width / 2, "pixel")
    _quantity(detector, "beam_center_y", height / 2, "pixel")
    if frame_time_s is not None:
        _quantity(detector, "frame_time", frame_time_s, "s")
        _quantity(detector, "count_time", frame_time_s, "s")  # a SELUN counts without dead time
    specific = nx_group(detector, "detectorSpecific", "NXcollection")
    for name, value in (
        ("nimages", n_frames),
        ("ntrigger", 1),
        ("x_pixels_in_detector", width),
        ("y_pixels_in_detector", height),
    ):
        specific.create_dataset(name, data=np.uint32(value))
    mask = scan.bad_pixel_mask if isinstance(scan, RecordedScan) else None
    if mask is not None:
        specific.create_dataset("pixel_mask", data=np.where(mask, MASKED_PIXEL, 0).astype(np.uint32))
    module = nx_group(detector, "module", "NXdetector_module")
    for name, direction in (
        ("fast_pixel_direction", DEFAULT_COLUMN_DIRECTION),
        ("slow_pixel_direction", DEFAULT_ROW_DIRECTION),
    ):
        _quantity(module, name, scan.detector_pixel_size_m, "m")
        module[name].attrs["transformation_type"] = "translation"
        module[name].attrs["vector"] = np.asarray(direction)


def _write_sample(entry: h5py.Group, scan: ScanInMemory | RecordedScan) -> None:
    sample = nx_group(entry, "sample", "NXsample")
    sample.create_dataset("depends_on", data=f"{TRANSFORMATIONS}/sample_x")
    transformations = nx_group(sample, "transformations", "NXtransformations")
    # Not part of NXmx: the scan's (rows, columns) or (n,), which replay announces in its start message.
    transformations.attrs["scan_shape"] = np.asarray(scan.scan_shape, dtype=np.int64)
    translation = sample_translation_from_positions(scan.positions_m)
    for name, column, depends_on in (("sample_x", 0, f"{TRANSFORMATIONS}/sample_y"), ("sample_y", 1, ".")):
        vector = np.zeros(3)
        vector[column] = 1.0
        _quantity(transformations, name, translation[:, column], "m")
        transformations[name].attrs["transformation_type"] = "translation"
        transformations[name].attrs["vector"] = vector
        transformations[name].attrs["depends_on"] = depends_on


def _quantity(group: h5py.Group, name: str, value: object, units: str) -> None:
    group.create_dataset(name, data=value)
    group[name].attrs["units"] = units


# ---- reading --------------------------------------------------------------------------------------------


def _frame_blocks(master: h5py.File, master_path: Path) -> tuple[tuple[FrameBlock, ...], tuple[int, int]]:
    """Where the frames are, in image order, with their common frame shape (and one dtype)."""
    group = master.get(DATA)
    if not isinstance(group, h5py.Group):
        raise ScanFileError(f"{master_path} lacks the group {DATA}: is it a DECTRIS master file?")
    if "data" in group:
        dataset = required_dataset(master, f"{DATA}/data", "the frames (N, H, W)")
        n, height, width = frames_dataset_shape(dataset)
        return (FrameBlock(master_path, dataset.name, n),), (height, width)
    names = sorted(name for name in group if _DATA_LINK.fullmatch(name))
    if not names:
        raise ScanFileError(
            f"{master_path}:{DATA} holds neither data nor data_000001…: {sorted(group)}; "
            "point replay at the master file of a complete series"
        )
    blocks, layouts, next_image = [], set(), None
    for name in names:
        file_path, dataset_path = _resolve(group, name, master_path)
        with h5py.File(file_path, "r") as file:
            dataset = required_dataset(file, dataset_path, f"frames linked from {DATA}/{name}")
            n, height, width = frames_dataset_shape(dataset)
            low, high = dataset.attrs.get("image_nr_low"), dataset.attrs.get("image_nr_high")
            if low is not None and high is not None:
                if int(high) - int(low) + 1 != n or (next_image is not None and int(low) != next_image):
                    raise ScanFileError(
                        f"{file_path}:{dataset_path} holds {n} frames numbered {int(low)}…{int(high)}, "
                        f"expected {next_image or 1}… continuing the previous data file: a data file is "
                        "missing or was rewritten"
                    )
                next_image = int(high) + 1
            layouts.add(((height, width), dataset.dtype))
            blocks.append(FrameBlock(file_path, dataset_path, n))
    if len(layouts) != 1:
        raise ScanFileError(
            f"the data files of {master_path} differ in frame shape or dtype: {sorted(map(str, layouts))}"
        )
    (shape, _) = layouts.pop()
    return tuple(blocks), shape


def _frames_travel(blocks: tuple[FrameBlock, ...], mask: np.ndarray | None) -> tuple[np.dtype, bool]:
    """The dtype the frames travel as (decided on the first data file), and whether every data file's
    stored chunks can be sent as they are."""
    with h5py.File(blocks[0].file, "r") as file:
        dtype = travel_dtype(file[blocks[0].dataset], mask)
    return dtype, all(_sends_stored_bytes(block, mask) for block in blocks)


def _sends_stored_bytes(block: FrameBlock, mask: np.ndarray | None) -> bool:
    with h5py.File(block.file, "r") as file:
        return sends_stored_bytes(file[block.dataset], mask)


def _bad_pixel_mask(master: h5py.File, shape: tuple[int, int]) -> np.ndarray | None:
    node = master.get(PIXEL_MASK)
    if node is None:
        return None
    if not isinstance(node, h5py.Dataset):
        raise ScanFileError(
            f"{master.filename}:{PIXEL_MASK} is a {type(node).__name__}; expected the detector's uint32 "
            "(H, W) pixel mask"
        )
    return bad_pixels(node, NXMX_MASK_DEFECTS, shape)


def _resolve(group: h5py.Group, name: str, master_path: Path) -> tuple[Path, str]:
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.ExternalLink):
        return master_path, f"{DATA}/{name}"
    # The DCU writes the bare file name: it lies beside the master, wherever the series was copied to.
    file_path = Path(link.filename)
    if not file_path.is_absolute():
        file_path = master_path.parent / file_path
    if not file_path.exists():
        raise ScanFileError(
            f"{master_path}:{DATA}/{name} links to {file_path}, which does not exist; copy the data files "
            "beside the master file"
        )
    return file_path, link.path


def _energy_kev(master: h5py.File) -> tuple[float, str]:
    if WAVELENGTH in master:
        dataset = master[WAVELENGTH]
        wavelength_angstrom = (
            scalar_value(dataset, "wavelength") * metres_per_unit(dataset, "angstrom") / 1e-10
        )
        if not wavelength_angstrom > 0:
            raise ScanFileError(f"{master.filename}:{WAVELENGTH} is {wavelength_angstrom} Å; expected > 0")
        return HC_KEV_ANGSTROM / wavelength_angstrom, WAVELENGTH
    dataset = required_dataset(master, INCIDENT_ENERGY, f"photon energy, eV (or {WAVELENGTH})")
    units = text_attribute(dataset, "units") or "eV"
    per_kev = {"eV": 1e-3, "keV": 1.0, "J": 1 / JOULES_PER_EV / 1000}.get(units)
    if per_kev is None:
        raise ScanFileError(f"{master.filename}:{INCIDENT_ENERGY} has units {units!r}; use eV, keV or J")
    return scalar_value(dataset, "photon energy") * per_kev, INCIDENT_ENERGY


def _first_dataset(master: h5py.File, paths: tuple[str, ...]) -> h5py.Dataset:
    for path in paths:
        if isinstance(master.get(path), h5py.Dataset):
            return master[path]
    return required_dataset(master, paths[0], f"sample–detector distance, m (or {' or '.join(paths[1:])})")


def _frame_time_s(master: h5py.File) -> float | None:
    for name in ("frame_time", "count_time"):
        path = f"{DETECTOR}/{name}"
        if isinstance(master.get(path), h5py.Dataset):
            value = scalar_value(master[path], "time per frame")
            if value > 0:
                return value
    return None


def _positions_from_transformations(master: h5py.File, n_frames: int) -> np.ndarray:
    group = master.get(TRANSFORMATIONS)
    translation = np.zeros((n_frames, 3))
    found = []
    for name, node in group.items() if isinstance(group, h5py.Group) else ():
        if not isinstance(node, h5py.Dataset) or text_attribute(node, "transformation_type") != "translation":
            continue
        values = np.asarray(node[()], dtype=np.float64).reshape(-1)
        if values.size not in (1, n_frames):
            raise ScanFileError(
                f"{master.filename}:{node.name} has {values.size} values for {n_frames} frames; a scan axis "
                "needs one value per frame"
            )
        vector = np.asarray(node.attrs.get("vector", (0.0, 0.0, 0.0)), dtype=np.float64).reshape(3)
        norm = float(np.linalg.norm(vector))
        if not norm > 0:
            raise ScanFileError(
                f"{master.filename}:{node.name} has no 'vector' attribute giving its direction"
            )
        translation += (values * metres_per_unit(node))[:, None] * (vector / norm)
        found.append(name)
    if not found:
        raise ScanFileError(
            f"{master.filename} has no sample translations under {TRANSFORMATIONS} (NXtransformations fields "
            "with transformation_type 'translation', one value per frame): write them there, or replay "
            "with the positions side channel (--positions FILE.npy, (n, 2) probe y, x in metres)"
        )
    if not np.isfinite(translation).all():
        bad = int(np.flatnonzero(~np.isfinite(translation).all(axis=1))[0])
        raise PositionError(f"{master.filename}:{TRANSFORMATIONS} frame {bad}: the translation is not finite")
    rows, columns = _detector_directions(master)
    return positions_from_sample_translation(translation, rows, columns)


def _detector_directions(master: h5py.File) -> tuple[np.ndarray, np.ndarray]:
    directions = []
    for name, default in (
        ("slow_pixel_direction", DEFAULT_ROW_DIRECTION),
        ("fast_pixel_direction", DEFAULT_COLUMN_DIRECTION),
    ):
        node = master.get(f"{DETECTOR}/module/{name}")
        vector = node.attrs.get("vector") if isinstance(node, h5py.Dataset) else None
        directions.append(np.asarray(default if vector is None else vector, dtype=np.float64))
    return directions[0], directions[1]


def _check_square_pixels(master: h5py.File, x_pixel_m: float) -> None:
    node = master.get(f"{DETECTOR}/y_pixel_size")
    if not isinstance(node, h5py.Dataset):
        return
    y_pixel_m = scalar_value(node, "pixel size") * metres_per_unit(node)
    if abs(y_pixel_m - x_pixel_m) > 1e-6 * x_pixel_m:
        raise ScanFileError(
            f"{master.filename}: x_pixel_size {x_pixel_m:.6g} m and y_pixel_size {y_pixel_m:.6g} m differ; "
            "the pipeline and the Stream V2 start message assume square pixels"
        )


def _scan_shape(master: h5py.File, n_frames: int) -> tuple[int, ...]:
    group = master.get(TRANSFORMATIONS)
    shape = group.attrs.get("scan_shape") if isinstance(group, h5py.Group) else None
    return tuple(int(s) for s in shape) if shape is not None else (n_frames,)


def _warn_if_beam_off_centre(master: h5py.File, shape: tuple[int, int]) -> None:
    """The pipeline's far-field model puts the direct beam at the frame centre; say when a file does not."""
    height, width = shape
    for name, centre in (("beam_center_y", height / 2), ("beam_center_x", width / 2)):
        node = master.get(f"{DETECTOR}/{name}")
        if not isinstance(node, h5py.Dataset):
            continue
        value = scalar_value(node, "beam centre, pixels")
        # Half a pixel either way is a matter of convention (pixel corner or pixel centre).
        if abs(value - centre) > 2:
            warnings.warn(
                f"{master.filename}:{node.name} = {value:g} px, but the pipeline assumes the direct beam at "
                f"the frame centre ({centre:g} px): crop the frames around the beam before replaying, or "
                "the reconstruction will be wrong",
                RuntimeWarning,
                stacklevel=3,
            )


def _side_channel(positions_m: np.ndarray, n_frames: int) -> np.ndarray:
    positions = np.asarray(positions_m, dtype=np.float64)
    if positions.shape != (n_frames, 2):
        raise PositionError(
            f"side-channel positions have shape {positions.shape}; the scan has {n_frames} frames: "
            f"pass ({n_frames}, 2) probe centres (y, x) in metres"
        )
    if not np.isfinite(positions).all():
        bad = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
        raise PositionError(
            f"side-channel position {bad} is {positions[bad].tolist()}: every position must be finite"
        )
    return positions

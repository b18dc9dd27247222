"""Recorded ptychography scans in CXI files (CXIDB format 1.6), written and read.

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

Every translation layout above becomes probe positions through one conversion, with the detector's
``basis_vectors`` (the CXI default, written here: rows along −y, columns along −x) as the lab directions
of frame rows and columns: ``phasestream.formats.scan_geometry``. Frames, their values and how they
travel: ``phasestream.formats.recorded_scan``.
"""

from __future__ import annotations

import math
import re
import warnings
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from phasestream.errors import PositionError, ScanFileError
from phasestream.formats.hdf5_fields import (
    metres_per_unit,
    nx_group,
    required_dataset,
    scalar_value,
    text_attribute,
    write_quantity,
)
from phasestream.formats.in_memory_scan import ScanInMemory
from phasestream.formats.recorded_scan import (
    MASKED_PIXEL,
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
    unit_vector,
)
from phasestream.formats.units import JOULES_PER_EV

CXI_VERSION = 160  # format 1.6, stored as version × 100
# CXI mask bit 0x1000 marks a pixel that has signal, not a defect; every other bit is one.
CXI_MASK_HAS_SIGNAL = 0x1000
CXI_MASK_DEFECTS = 0xFFFFFFFF ^ CXI_MASK_HAS_SIGNAL
_DATA_GROUP = re.compile(r"data_(\d+)")


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


# ---- CXI -----------------------------------------------------------------------------------------------


def write_cxi(
    path: Path | str,
    scan: ScanInMemory | RecordedScan,
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
    probe = scan.probe if isinstance(scan, RecordedScan) else scan.probe_truth
    if frame_time_s is None and isinstance(scan, RecordedScan):
        frame_time_s = scan.frame_time_s
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

        _write_detector(nx_group(instrument, "detector_1", "NXdetector"), scan, frame_time_s, compression)

        data = nx_group(entry, "data_1", "NXdata")
        data.attrs["signal"] = "data"
        data["data"] = h5py.SoftLink(CxiPath.DETECTOR_DATA)
        data["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
    return path


def _write_detector(
    detector: h5py.Group,
    scan: ScanInMemory | RecordedScan,
    frame_time_s: float | None,
    compression: FrameCompression,
) -> None:
    """The frames, the detector's geometry and mask, and the time per frame, in ``detector_1``."""
    n, shape, dtype = frame_layout(scan)
    write_frames(detector, "data", (n, *shape), dtype, frame_chunks(scan), compression)
    pixel_size_m = scan.detector_pixel_size_m
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
    numbered = {
        name: int(match[1])
        for name in (entry if isinstance(entry, h5py.Group) else ())
        if (match := _DATA_GROUP.fullmatch(name))
    }
    groups = sorted(numbered, key=numbered.__getitem__)
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
        direction = unit_vector(node.attrs.get("vector", default))
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

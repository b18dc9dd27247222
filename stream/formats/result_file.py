"""One HDF5 result file per completed scan, laid out so that CXI and NeXus readers find its parts.

Layout (CXI 1.5 with NeXus classes; SI units, and every length and energy carries a ``units`` attribute)::

    /cxi_version                                         150
    /entry_1                                 NXentry     @default = "data_1"; program_name, title
        image_1/                             (CXI Image class: NeXus has none)
            data                 (H, W)      the object, complex64 transmission
            data_type, data_space            "amplitude" (a phased image), "real"
            dimensionality, is_fft_shifted   2, 0
            x_pixel_size, y_pixel_size       object pixel, m
            origin               (2,)        (y, x) of object pixel (0, 0), m, in the frame of the positions
            source_1, detector_1             soft links to instrument_1/source_1 and detector_1
            process_1/           NXprocess   program, version, date (ISO 8601, when the result was made),
                                             scan_uid, algorithm, settings (JSON), error_history (one per
                                             epoch), epochs, stop_reason, accounting (JSON: frame counts
                                             per stage), config_hash
        data_1/                  NXdata      @signal = "data", @axes = ["y", "x"]
            data                             soft link to image_1/data (as in the CXI phased-image example)
            y (H,), x (W,)                   the centre of each object row and column, m
        instrument_1/            NXinstrument
            source_1/            NXsource    energy (photon energy, J); illumination (k, H, W) complex64,
                                             the probe modes on the object grid
            detector_1/          NXdetector  distance, x_pixel_size, y_pixel_size (m); basis_vectors (2, 3)
                                             m, the CXI default; data_size (2,) the frames' (rows, columns)
        sample_1/                NXsample
            geometry_1/          NXgeometry  translation (n, 3): sample translations (x, y, z), m, one per
                                             position used (after position correction, where it ran)

Positions. phasestream's positions are probe centres (y, x) along the frame's row and column axes; CXI
records the sample's translation. With the default ``basis_vectors`` (rows along −y, columns along −x)
the scan files phasestream writes and reads store ``translation = (x, y, 0)`` of the probe position, and so
does this file: ``positions_from_sample_translation`` (``phasestream.formats.recorded_scan``) reads
it back. Object pixel (row, column) lies at ``origin + (row, column) × pixel``, in metres, in that same frame.

The probe at ``source_1/illumination`` is where ``phasestream.formats.probe_source.load_probe`` (and SHARP,
ptychodus) look for one, and ``image_1/x_pixel_size`` gives its pixel size, so a result file starts
the next scan. Files are written to a temporary name in the same folder and renamed into place, so a
reader sees the previous file or the complete new one, never a part.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from phasestream.errors import PhasestreamError
from phasestream.formats.units import JOULES_PER_EV

CXI_VERSION = 150  # format 1.5, stored as version × 100
PROGRAM = "phasestream"
# The CXI default detector orientation, one pixel per step: rows run along −y, columns along −x.
DEFAULT_BASIS = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])

ENTRY = "/entry_1"
IMAGE = "/entry_1/image_1"
PROCESS = "/entry_1/image_1/process_1"
DATA = "/entry_1/data_1"
SOURCE = "/entry_1/instrument_1/source_1"
DETECTOR = "/entry_1/instrument_1/detector_1"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"


class ResultFileError(PhasestreamError):
    """A result cannot be written as given, or a file is not a complete phasestream result."""

    reason = "result_file"


@dataclass(frozen=True)
class ResultGeometry:
    """The far-field geometry of the frames the scan was reconstructed from."""

    energy_kev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    detector_shape_px: tuple[int, int]  # (rows, columns) of each frame as the solver saw it


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True, eq=False)
class ScanResult:
    """A completed scan's reconstruction and how it was made."""

    scan_uid: str
    object: np.ndarray  # complex64 (H, W)
    probe: np.ndarray  # complex64 (k, H, W)
    positions_m: np.ndarray  # (n, 2) probe centres (y, x) used, corrected where position correction ran
    object_pixel_size_m: float
    origin_m: tuple[float, float]  # (y, x) of object pixel (0, 0)
    geometry: ResultGeometry
    algorithm: str
    settings: dict[str, Any]  # the solver's options, JSON-able
    error_history: list[float]  # one per epoch
    epochs: int
    stop_reason: str
    accounting: dict[str, dict[str, int]]  # frame accounting per stage
    config_hash: str
    created: str = field(default_factory=_now_iso)  # ISO 8601


def write_result_file(path: Path | str, result: ScanResult) -> Path:
    """Write ``result`` to ``path`` atomically (temporary file in the same folder, then a rename)."""
    path = Path(path)
    checked = _checked(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        # "x": never write over a file of the same name, which another writer would own.
        with h5py.File(temporary, "x") as file:
            _write_layout(file, result, checked)
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def read_result_file(path: Path | str) -> ScanResult:
    """Read a file written by :func:`write_result_file`; ResultFileError names what is missing."""
    path = Path(path)
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ResultFileError(
            f"cannot open {path} as HDF5 ({error}): is it a phasestream result file?"
        ) from error
    with file:
        reader = _Reader(file, path)
        translation = reader.array(TRANSLATION, "sample translations (n, 3)")
        if translation.ndim != 2 or translation.shape[1] != 3:
            raise ResultFileError(
                f"{path}:{TRANSLATION} has shape {translation.shape}; expected (n, 3) translations (x, y, z)"
            )
        data_size = reader.array(f"{DETECTOR}/data_size", "frame shape (rows, columns)")
        return ScanResult(
            scan_uid=reader.text(f"{PROCESS}/scan_uid"),
            object=reader.array(f"{IMAGE}/data", "the object").astype(np.complex64),
            probe=reader.array(f"{SOURCE}/illumination", "the probe modes").astype(np.complex64),
            positions_m=np.ascontiguousarray(translation[:, [1, 0]] * reader.factor(TRANSLATION)),
            object_pixel_size_m=reader.length_m(f"{IMAGE}/x_pixel_size"),
            origin_m=reader.pair_m(f"{IMAGE}/origin"),
            geometry=ResultGeometry(
                energy_kev=reader.number(f"{SOURCE}/energy") / JOULES_PER_EV / 1e3,
                detector_distance_m=reader.length_m(f"{DETECTOR}/distance"),
                detector_pixel_size_m=reader.length_m(f"{DETECTOR}/x_pixel_size"),
                detector_shape_px=(int(data_size[0]), int(data_size[1])),
            ),
            algorithm=reader.text(f"{PROCESS}/algorithm"),
            settings=reader.json(f"{PROCESS}/settings"),
            error_history=[float(e) for e in reader.array(f"{PROCESS}/error_history", "error per epoch")],
            epochs=int(reader.number(f"{PROCESS}/epochs")),
            stop_reason=reader.text(f"{PROCESS}/stop_reason"),
            accounting=reader.json(f"{PROCESS}/accounting"),
            config_hash=reader.text(f"{PROCESS}/config_hash"),
            created=reader.text(f"{PROCESS}/date"),
        )


# ---- writing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Checked:
    object: np.ndarray
    probe: np.ndarray
    positions_m: np.ndarray
    settings_json: str
    accounting_json: str


def _checked(result: ScanResult) -> _Checked:
    """The arrays in their stored dtypes and shapes, or ResultFileError naming the bad field."""
    obj = np.asarray(result.object)
    probe = np.asarray(result.probe)
    probe = probe[np.newaxis] if probe.ndim == 2 else probe
    positions = np.asarray(result.positions_m, dtype=np.float64)
    problems = []
    if obj.ndim != 2:
        problems.append(f"object has shape {obj.shape}, expected (H, W)")
    if probe.ndim != 3:
        problems.append(f"probe has shape {probe.shape}, expected (modes, H, W)")
    if positions.ndim != 2 or positions.shape[1] != 2 or not np.isfinite(positions).all():
        problems.append(f"positions_m of shape {positions.shape} must be finite (n, 2) probe centres (y, x)")
    for name, value in (
        ("object_pixel_size_m", result.object_pixel_size_m),
        ("energy_kev", result.geometry.energy_kev),
        ("detector_distance_m", result.geometry.detector_distance_m),
        ("detector_pixel_size_m", result.geometry.detector_pixel_size_m),
    ):
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name}={value!r} must be positive")
    if problems:
        raise ResultFileError(
            f"the result of scan {result.scan_uid!r} cannot be written: {'; '.join(problems)}"
        )
    return _Checked(
        obj.astype(np.complex64),
        probe.astype(np.complex64),
        positions,
        _json(result.settings, "settings"),
        _json(result.accounting, "accounting"),
    )


def _json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ResultFileError(
            f"{name} of the result cannot be stored as JSON ({error}): convert its values to str, numbers, "
            "lists and dicts"
        ) from error


def _write_layout(file: h5py.File, result: ScanResult, checked: _Checked) -> None:
    file.attrs["default"] = "entry_1"
    file.attrs["creator"] = PROGRAM
    file.create_dataset("cxi_version", data=CXI_VERSION)
    entry = _group(file, ENTRY, "NXentry", default="data_1")
    entry.create_dataset("program_name", data=PROGRAM)
    entry.create_dataset(
        "title", data=f"{PROGRAM} {result.algorithm} reconstruction of scan {result.scan_uid}"
    )
    _write_instrument(file, result.geometry, checked.probe)
    _write_image(file, result, checked.object)
    _write_process(file, result, checked)
    _write_data(file, result, checked.object.shape)
    geometry = _group(file, "/entry_1/sample_1/geometry_1", "NXgeometry")
    file["/entry_1/sample_1"].attrs["NX_class"] = "NXsample"
    translation = np.zeros((len(checked.positions_m), 3))
    translation[:, 0] = checked.positions_m[:, 1]
    translation[:, 1] = checked.positions_m[:, 0]
    _quantity(geometry, "translation", translation, "m")


def _write_instrument(file: h5py.File, geometry: ResultGeometry, probe: np.ndarray) -> None:
    _group(file, "/entry_1/instrument_1", "NXinstrument")
    source = _group(file, SOURCE, "NXsource")
    _quantity(source, "energy", geometry.energy_kev * 1e3 * JOULES_PER_EV, "J")
    source.create_dataset("illumination", data=probe)
    source["illumination"].attrs["axes"] = "mode:y:x"
    detector = _group(file, DETECTOR, "NXdetector")
    _quantity(detector, "distance", geometry.detector_distance_m, "m")
    _quantity(detector, "x_pixel_size", geometry.detector_pixel_size_m, "m")
    _quantity(detector, "y_pixel_size", geometry.detector_pixel_size_m, "m")
    _quantity(detector, "basis_vectors", DEFAULT_BASIS * geometry.detector_pixel_size_m, "m")
    detector.create_dataset("data_size", data=np.asarray(geometry.detector_shape_px, dtype=np.int64))


def _write_image(file: h5py.File, result: ScanResult, obj: np.ndarray) -> None:
    image = file.create_group(IMAGE)
    image.create_dataset("data", data=obj)
    image.create_dataset("data_type", data="amplitude")
    image.create_dataset("data_space", data="real")
    image.create_dataset("dimensionality", data=2)
    image.create_dataset("is_fft_shifted", data=0)
    _quantity(image, "x_pixel_size", result.object_pixel_size_m, "m")
    _quantity(image, "y_pixel_size", result.object_pixel_size_m, "m")
    _quantity(image, "origin", np.asarray(result.origin_m, dtype=np.float64), "m")
    image["origin"].attrs["axes"] = "y:x"
    image["source_1"] = h5py.SoftLink(SOURCE)
    image["detector_1"] = h5py.SoftLink(DETECTOR)


def _write_process(file: h5py.File, result: ScanResult, checked: _Checked) -> None:
    process = _group(file, PROCESS, "NXprocess")
    process.create_dataset("program", data=PROGRAM)
    process.create_dataset("version", data=_version())
    process.create_dataset("date", data=result.created)
    process.create_dataset("scan_uid", data=result.scan_uid)
    process.create_dataset("algorithm", data=result.algorithm)
    process.create_dataset("settings", data=checked.settings_json)
    process.create_dataset("error_history", data=np.asarray(result.error_history, dtype=np.float64))
    process.create_dataset("epochs", data=int(result.epochs))
    process.create_dataset("stop_reason", data=result.stop_reason)
    process.create_dataset("accounting", data=checked.accounting_json)
    process.create_dataset("config_hash", data=result.config_hash)


def _write_data(file: h5py.File, result: ScanResult, shape: tuple[int, ...]) -> None:
    data = _group(file, DATA, "NXdata", signal="data")
    data.attrs["axes"] = np.array(["y", "x"], dtype=h5py.string_dtype())
    data["data"] = h5py.SoftLink(f"{IMAGE}/data")
    origin_y_m, origin_x_m = result.origin_m
    for name, origin_m, count in (("y", origin_y_m, shape[0]), ("x", origin_x_m, shape[1])):
        _quantity(data, name, origin_m + np.arange(count) * result.object_pixel_size_m, "m")


def _group(file: h5py.File, path: str, nx_class: str, **attrs: str) -> h5py.Group:
    group = file.require_group(path)
    group.attrs["NX_class"] = nx_class
    for key, value in attrs.items():
        group.attrs[key] = value
    return group


def _quantity(group: h5py.Group, name: str, value: Any, units: str) -> None:
    group.create_dataset(name, data=value)
    group[name].attrs["units"] = units


def _version() -> str:
    try:
        return metadata.version(PROGRAM)
    except metadata.PackageNotFoundError:
        return "unknown"


def _flush_to_disk(path: Path) -> None:
    """Push the file's bytes to disk before the rename makes it visible (a crash then leaves a whole file)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---- reading ---------------------------------------------------------------------------------------------


_LENGTH_UNITS = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "nm": 1e-9}


class _Reader:
    """Datasets of one open result file; each failure names the file, the path and the fix."""

    def __init__(self, file: h5py.File, path: Path) -> None:
        self.file = file
        self.path = path

    def dataset(self, name: str, meaning: str) -> h5py.Dataset:
        node = self.file.get(name)
        if not isinstance(node, h5py.Dataset):
            raise ResultFileError(
                f"{self.path} lacks {name} ({meaning}): it is not a complete phasestream result file "
                "(write it with phasestream.formats.result_file.write_result_file)"
            )
        return node

    def array(self, name: str, meaning: str) -> np.ndarray:
        return np.asarray(self.dataset(name, meaning)[()])

    def number(self, name: str) -> float:
        value = self.array(name, "a number")
        if value.size != 1 or value.dtype.kind not in "iuf":
            raise ResultFileError(
                f"{self.path}:{name} holds {value.dtype} of shape {value.shape}; expected a number"
            )
        return float(value.reshape(-1)[0])

    def factor(self, name: str) -> float:
        units = self.dataset(name, "a length").attrs.get("units", "m")
        units = units.decode() if isinstance(units, bytes) else str(units)
        if units not in _LENGTH_UNITS:
            raise ResultFileError(
                f"{self.path}:{name} has units {units!r}; expected one of {sorted(_LENGTH_UNITS)}: "
                "fix the attribute"
            )
        return _LENGTH_UNITS[units]

    def length_m(self, name: str) -> float:
        return self.number(name) * self.factor(name)

    def pair_m(self, name: str) -> tuple[float, float]:
        values = self.array(name, "a (y, x) pair") * self.factor(name)
        if values.shape != (2,):
            raise ResultFileError(f"{self.path}:{name} has shape {values.shape}; expected (2,): (y, x)")
        return float(values[0]), float(values[1])

    def text(self, name: str) -> str:
        value = self.dataset(name, "text")[()]
        return value.decode() if isinstance(value, bytes) else str(value)

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.text(name))
        except json.JSONDecodeError as error:
            raise ResultFileError(f"{self.path}:{name} is not JSON ({error}): the file is damaged") from error

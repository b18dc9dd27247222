"""Where a reconstruction's first probe comes from, and reading it from the files other tools write.

A probe start is given as text (the ``--probe`` flag, the refine stage's ``initial_probe``):

* ``auto``: search for the probe from the data;
* ``previous``: the final probe of the last completed scan with the same detector geometry;
* ``PATH`` or ``PATH::/hdf5/path``: a file. ``.npy`` holds the probe array alone. An HDF5 file without a
  dataset path is searched where tools put probes, in this order::

      /entry_1/instrument_1/source_1/illumination   CXI community convention (SHARP, hummingbird,
                                                    ptychodus, phasestream result files)
      /entry_1/instrument_1/source_1/probe          SHARP's link to it, COSMIC; skipped when it is a string
                                                    (NXcxi_ptycho puts the radiation type there)
      /entry_1/instrument_1/detector_1/probe        COSMIC
      /entry_1/data_illumination                    COSMIC
      /content/probe/<ID>/data                      PtyPy .ptyr (one storage ID)
      /probe                                        ptychodus product, (OPR modes, modes, H, W)

The probe's pixel size (metres on the sample) is taken from the first of these that the file has:

1. attributes of the probe dataset: ``pixel_size_m``; ``x_pixel_size``/``y_pixel_size``;
   ``pixel_width_m``/``pixel_height_m`` (ptychodus), all in metres;
2. datasets beside it: ``_psize`` [y, x] (PtyPy storages), or ``x_pixel_size``/``y_pixel_size`` next to
   an Image-class ``data`` (not in a detector group, whose pixel is the detector's);
3. ``/entry_1/image_1/x_pixel_size`` and ``y_pixel_size`` (the reconstructed image of a CXI file, whose
   grid the probe shares; phasestream result files);
4. the CXI far-field geometry: Δ = λ z / (N p) from ``source_1/energy`` (J), ``detector_1/distance``,
   ``detector_1/x_pixel_size`` and the width N of the frames (``entry_1/data_1/data`` or
   ``detector_1/data``), since the probe of a CXI scan file is sampled on the object grid of its frames.

Otherwise (and always for ``.npy``) the pixel size is unknown (None) and the probe is taken to be on the
frames' own grid. Every probe passes :func:`validate_probe`; refusals are ``ConfigError`` naming the value,
the file and dataset, and the fix, so a configuration that names a bad probe fails when it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import h5py
import numpy as np

from phasestream.errors import ConfigError
from phasestream.formats.hdf5_fields import METRES_PER_UNIT
from phasestream.formats.units import JOULES_PER_EV

# h·c in m·keV, as in phasestream.models.physics (not imported: it loads torch, and this module is read
# when a configuration is validated).
PLANCK_TIMES_LIGHT_SPEED_M_KEV = 1.23984198e-9
DATASET_SEPARATOR = "::"
MAX_PROBE_MODES = 16  # the refine stage's probe.modes bound
MIN_WINDOW_PX = 8
# A probe pixel outside this range is a unit slip (nanometres stored as metres, or the reverse).
PLAUSIBLE_PIXEL_M = (1e-12, 1e-3)

CXI_PROBE_PATHS = (
    "/entry_1/instrument_1/source_1/illumination",
    "/entry_1/instrument_1/source_1/probe",
    "/entry_1/instrument_1/detector_1/probe",
    "/entry_1/data_illumination",
)
PTYR_PROBE_GROUP = "/content/probe"
PTYCHODUS_PROBE_PATH = "/probe"
CXI_IMAGE = "/entry_1/image_1"
CXI_ENERGY = "/entry_1/instrument_1/source_1/energy"
# NXcxi_ptycho keeps the photon energy here; its source_1/energy is the storage ring's.
NXCXI_BEAM_ENERGY = "/entry_1/instrument_1/beam_1/energy"
CXI_DISTANCE = "/entry_1/instrument_1/detector_1/distance"
CXI_DETECTOR_X_PIXEL = "/entry_1/instrument_1/detector_1/x_pixel_size"
CXI_DETECTOR_Y_PIXEL = "/entry_1/instrument_1/detector_1/y_pixel_size"
CXI_FRAMES = ("/entry_1/data_1/data", "/entry_1/instrument_1/detector_1/data")

_JOULES_PER_UNIT = {"J": 1.0, "eV": JOULES_PER_EV, "keV": 1e3 * JOULES_PER_EV}
# Attribute pairs (x, y) that give a dataset's pixel in metres.
_PIXEL_ATTRIBUTE_PAIRS = (("x_pixel_size", "y_pixel_size"), ("pixel_width_m", "pixel_height_m"))


class ProbeStartKind(StrEnum):
    AUTO = "auto"  # search from the data
    PREVIOUS = "previous"  # the last completed scan's final probe, same detector geometry
    FILE = "file"  # read from a file


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed probe start: the kind, and for a file its path and optional HDF5 dataset path."""

    kind: ProbeStartKind
    path: Path | None = None
    dataset: str | None = None

    def __str__(self) -> str:
        if self.kind is not ProbeStartKind.FILE:
            return self.kind.value
        return f"{self.path}{DATASET_SEPARATOR}{self.dataset}" if self.dataset else str(self.path)


@dataclass(frozen=True, eq=False)
class LoadedProbe:
    """A probe read from a file: complex64 (k, H, W) with 1 ≤ k modes, square, and where it came from."""

    probe: np.ndarray
    pixel_size_m: float | None  # metres per probe pixel on the sample; None when the file does not say
    source: str  # e.g. "scan.cxi:/entry_1/instrument_1/source_1/illumination"


def parse_probe_spec(text: str) -> ProbeSpec:
    """``auto``, ``previous``, ``PATH`` or ``PATH::/hdf5/path`` → a ProbeSpec (the file is not opened)."""
    stripped = text.strip()
    if stripped.lower() in (ProbeStartKind.AUTO, ProbeStartKind.PREVIOUS):
        return ProbeSpec(ProbeStartKind(stripped.lower()))
    if not stripped:
        raise ConfigError(
            f"probe {text!r} is empty: give 'auto', 'previous', a file (probe.npy, scan.cxi) or "
            f"FILE{DATASET_SEPARATOR}/hdf5/path"
        )
    file_part, separator, dataset = stripped.partition(DATASET_SEPARATOR)
    if not file_part:
        raise ConfigError(
            f"probe {text!r} names no file before {DATASET_SEPARATOR!r}: "
            f"write FILE{DATASET_SEPARATOR}{dataset}"
        )
    path = Path(file_part).expanduser()
    if not separator:
        return ProbeSpec(ProbeStartKind.FILE, path)
    if not dataset.strip("/") or DATASET_SEPARATOR in dataset:
        raise ConfigError(
            f"probe {text!r}: {dataset!r} after {DATASET_SEPARATOR!r} is not an HDF5 dataset path; write "
            f"{file_part}{DATASET_SEPARATOR}/entry_1/instrument_1/source_1/illumination, or the file alone "
            "to search the usual places"
        )
    if path.suffix.lower() == ".npy":
        raise ConfigError(
            f"probe {text!r}: {path} is a .npy file, which holds one array and no datasets; drop "
            f"{DATASET_SEPARATOR}{dataset}"
        )
    return ProbeSpec(ProbeStartKind.FILE, path, "/" + dataset.lstrip("/"))


def load_probe(spec: ProbeSpec) -> LoadedProbe:
    """Read and validate the probe a file spec names; see the module docstring for where it looks."""
    if spec.kind is not ProbeStartKind.FILE or spec.path is None:
        raise ConfigError(
            f"probe {str(spec)!r} is not a file: '{spec.kind}' probes are made from the data or the previous "
            "scan by the refine stage, not loaded"
        )
    path = spec.path
    if not path.is_file():
        raise ConfigError(f"probe file {path} does not exist (from probe {str(spec)!r}): check the path")
    if path.suffix.lower() == ".npy":
        return _load_npy(path)
    if not h5py.is_hdf5(path):
        raise ConfigError(
            f"probe file {path} is neither a .npy array nor an HDF5 file (CXI, .ptyr, ptychodus .h5, a "
            "phasestream result): save the probe with numpy.save or give an HDF5 file"
        )
    return _load_hdf5(path, spec.dataset)


def validate_probe(probe: np.ndarray, source: str) -> np.ndarray:
    """The probe as contiguous complex64 (k, H, W), or ConfigError naming what is wrong and the fix.

    Takes (H, W), (k, H, W), ptychodus' (OPR modes, k, H, W) (the first OPR mode is the mean probe, the
    one used) and HDF5 compound complex numbers (fields ``r``, ``i``). Refuses non-numeric data, another
    rank, more than MAX_PROBE_MODES modes, non-square or tiny windows, non-finite values (also those that
    overflow complex64) and a probe with no power.
    """
    values = _as_numeric(np.asarray(probe), source)
    if values.ndim == 2:
        values = values[np.newaxis]
    elif values.ndim == 4:
        values = values[0]
    elif values.ndim != 3:
        raise ConfigError(
            f"probe from {source} has shape {values.shape} (rank {values.ndim}); expected (H, W), "
            "(modes, H, W) or ptychodus' (OPR modes, modes, H, W): give the probe dataset itself"
        )
    modes, height, width = values.shape
    if not 1 <= modes <= MAX_PROBE_MODES:
        raise ConfigError(
            f"probe from {source} has {modes} modes (shape {values.shape}); the refine stage takes 1 to "
            f"{MAX_PROBE_MODES}: keep the strongest modes"
        )
    if height != width or height < MIN_WINDOW_PX:
        raise ConfigError(
            f"probe from {source} has a {height}×{width} window; expected a square one of at least "
            f"{MIN_WINDOW_PX}×{MIN_WINDOW_PX} pixels: pad or crop it to a square around its centre"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes inf, refused just below
        result = np.ascontiguousarray(values, dtype=np.complex64)
    finite = np.isfinite(result)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ConfigError(
            f"probe from {source} holds {int((~finite).sum())} non-finite values (first at (mode, y, x) = "
            f"{first}: {complex(values[first])} read as {complex(result[first])}): every value must be a "
            "finite complex64 number; re-export the probe"
        )
    power = float(np.sum(np.abs(result.astype(np.complex128)) ** 2))
    if not power > 0:
        raise ConfigError(
            f"probe from {source} has zero power (every value is 0 in a {values.shape} array): it would "
            "illuminate nothing; give the probe's dataset, not an empty placeholder"
        )
    return result


# ---- readers ---------------------------------------------------------------------------------------------


def _load_npy(path: Path) -> LoadedProbe:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ConfigError(
            f"probe file {path} cannot be read as a .npy array ({error}): save it with numpy.save from a "
            "numeric array"
        ) from error
    return LoadedProbe(validate_probe(array, str(path)), None, str(path))


def _load_hdf5(path: Path, dataset_path: str | None) -> LoadedProbe:
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise ConfigError(f"probe file {path} cannot be opened as HDF5 ({error}): is it complete?") from error
    with file:
        dataset = _named_dataset(file, path, dataset_path) if dataset_path else _find_probe(file, path)
        source = f"{path}:{dataset.name}"
        try:
            values = _read(dataset)
        except OSError as error:  # a missing filter plugin, a truncated file
            raise ConfigError(f"cannot read the probe {source} ({error}): check the file") from error
        probe = validate_probe(values, source)
        return LoadedProbe(probe, _pixel_size_m(file, dataset), source)


def _read(dataset: h5py.Dataset) -> np.ndarray:
    value = dataset[()]
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _named_dataset(file: h5py.File, path: Path, dataset_path: str) -> h5py.Dataset:
    """The dataset at the path given; a group holding ``data`` (a PtyPy storage, a CXI image) gives that."""
    node = file.get(dataset_path)
    if isinstance(node, h5py.Group) and isinstance(node.get("data"), h5py.Dataset):
        node = node["data"]
    if isinstance(node, h5py.Dataset):
        return node
    found = "is missing" if node is None else "is a group without a 'data' dataset"
    candidates = _complex_datasets(file)
    hint = f"; complex datasets in the file: {', '.join(candidates)}" if candidates else ""
    raise ConfigError(
        f"probe dataset {dataset_path} in {path} {found}{hint}: give the path of the probe array "
        f"(FILE{DATASET_SEPARATOR}/path), or the file alone to search the usual places"
    )


def _find_probe(file: h5py.File, path: Path) -> h5py.Dataset:
    """The first probe-like dataset at the places tools write probes (the module docstring's order)."""
    skipped = []
    for candidate in (*CXI_PROBE_PATHS, *_ptyr_probe_paths(file, path), PTYCHODUS_PROBE_PATH):
        node = file.get(candidate)
        if not isinstance(node, h5py.Dataset):
            continue
        if _is_numeric(node.dtype):
            return node
        skipped.append(f"{candidate} holds {_describe(_read(node))}")
    places = ", ".join((*CXI_PROBE_PATHS, f"{PTYR_PROBE_GROUP}/<ID>/data", PTYCHODUS_PROBE_PATH))
    not_probes = f" ({'; '.join(skipped)}: not a probe array)" if skipped else ""
    candidates = _complex_datasets(file)
    hint = f"; complex datasets in the file: {', '.join(candidates)}" if candidates else ""
    raise ConfigError(
        f"{path} has no probe where tools write one ({places}){not_probes}{hint}: name the dataset as "
        f"{path}{DATASET_SEPARATOR}/path/to/probe"
    )


def _ptyr_probe_paths(file: h5py.File, path: Path) -> tuple[str, ...]:
    group = file.get(PTYR_PROBE_GROUP)
    if not isinstance(group, h5py.Group):
        return ()
    storages = sorted(group)
    if len(storages) > 1:
        raise ConfigError(
            f"{path} holds {len(storages)} PtyPy probe storages ({', '.join(storages)}): choose one, e.g. "
            f"{path}{DATASET_SEPARATOR}{PTYR_PROBE_GROUP}/{storages[0]}/data"
        )
    return tuple(f"{PTYR_PROBE_GROUP}/{storage}/data" for storage in storages)


def _complex_datasets(file: h5py.File) -> list[str]:
    """Every complex dataset's path (suggestions when no probe was found where expected)."""
    found: list[str] = []

    def visit(name: str, node: h5py.HLObject) -> None:
        if isinstance(node, h5py.Dataset) and (node.dtype.kind == "c" or _is_compound_complex(node.dtype)):
            found.append("/" + name)

    file.visititems(visit)
    return found


# ---- values ----------------------------------------------------------------------------------------------


def _is_compound_complex(dtype: np.dtype) -> bool:
    return dtype.names is not None and {"r", "i"} <= set(dtype.names)


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "iufc" or _is_compound_complex(dtype)


def _as_numeric(values: np.ndarray, source: str) -> np.ndarray:
    if _is_compound_complex(values.dtype):
        return values["r"] + 1j * values["i"]
    if values.dtype.kind not in "iufc":
        raise ConfigError(
            f"probe from {source} holds {_describe(values)}, not numbers: give the dataset of the complex "
            "probe array (in NXcxi_ptycho files source_1/probe is the radiation type, the probe is "
            "source_1/illumination)"
        )
    return values


def _describe(values: np.ndarray) -> str:
    """A short human description of a (non-numeric) value: the value itself when it is one item."""
    if values.size == 1:
        item = values.reshape(-1)[0]
        if isinstance(item, bytes):
            item = item.decode(errors="replace")
        return f"{item!r} ({values.dtype})"
    return f"{values.dtype} of shape {values.shape}"


# ---- pixel size ------------------------------------------------------------------------------------------


def _pixel_size_m(file: h5py.File, dataset: h5py.Dataset) -> float | None:
    """The probe's pixel in metres from the first source the file has (module docstring), else None."""
    for finder in (_pixel_from_attributes, _pixel_from_siblings, _pixel_from_cxi_image):
        found = finder(dataset)
        if found is not None:
            return _plausible(*found)
    return _pixel_from_far_field(file)


def _pixel_from_attributes(dataset: h5py.Dataset) -> tuple[float, str] | None:
    where = f"{dataset.file.filename}:{dataset.name}"
    if "pixel_size_m" in dataset.attrs:
        sizes = np.asarray(dataset.attrs["pixel_size_m"], dtype=np.float64).reshape(-1)
        return _square(float(sizes[0]), float(sizes[-1]), f"{where} attribute pixel_size_m")
    for x_name, y_name in _PIXEL_ATTRIBUTE_PAIRS:
        if x_name in dataset.attrs:
            x_m = _float_attribute(dataset, x_name)
            y_m = _float_attribute(dataset, y_name) if y_name in dataset.attrs else x_m
            return _square(y_m, x_m, f"{where} attributes {x_name}/{y_name}")
    return None


def _pixel_from_siblings(dataset: h5py.Dataset) -> tuple[float, str] | None:
    group = dataset.parent
    where = f"{dataset.file.filename}:{group.name}"
    psize = group.get("_psize")
    if isinstance(psize, h5py.Dataset):
        sizes = np.asarray(psize[()], dtype=np.float64).reshape(-1)
        return _square(float(sizes[0]), float(sizes[-1]), f"{where}/_psize")
    is_detector = group.name.rsplit("/", 1)[-1].startswith("detector_") or _nx_class(group) == "NXdetector"
    if is_detector or dataset.name.rsplit("/", 1)[-1] != "data":
        return None
    return _pixel_from_x_y_datasets(group)


def _pixel_from_cxi_image(dataset: h5py.Dataset) -> tuple[float, str] | None:
    image = dataset.file.get(CXI_IMAGE)
    if not isinstance(image, h5py.Group) or _text(image.get("data_space")) == "diffraction":
        return None
    return _pixel_from_x_y_datasets(image)


def _pixel_from_x_y_datasets(group: h5py.Group) -> tuple[float, str] | None:
    x_node, y_node = group.get("x_pixel_size"), group.get("y_pixel_size")
    if not isinstance(x_node, h5py.Dataset):
        return None
    x_m = _length_m(x_node)
    y_m = _length_m(y_node) if isinstance(y_node, h5py.Dataset) else x_m
    return _square(y_m, x_m, f"{group.file.filename}:{group.name}/x_pixel_size, y_pixel_size")


def _pixel_from_far_field(file: h5py.File) -> float | None:
    """Δ = λ z / (N p) per frame axis, from a CXI scan file's geometry; None when a value is missing."""
    energy_path = NXCXI_BEAM_ENERGY if isinstance(file.get(NXCXI_BEAM_ENERGY), h5py.Dataset) else CXI_ENERGY
    nodes = [file.get(path) for path in (energy_path, CXI_DISTANCE, CXI_DETECTOR_X_PIXEL)]
    frames = next((file[path] for path in CXI_FRAMES if isinstance(file.get(path), h5py.Dataset)), None)
    if frames is None or frames.ndim != 3 or not all(isinstance(node, h5py.Dataset) for node in nodes):
        return None
    energy_ds, distance_ds, x_pixel_ds = nodes
    y_pixel_ds = file.get(CXI_DETECTOR_Y_PIXEL)
    energy_kev = _energy_j(energy_ds) / JOULES_PER_EV / 1e3
    distance_m = _length_m(distance_ds)
    x_pixel_m = _length_m(x_pixel_ds)
    y_pixel_m = _length_m(y_pixel_ds) if isinstance(y_pixel_ds, h5py.Dataset) else x_pixel_m
    where = (
        f"{file.filename} (energy, distance, pixel size and the {frames.shape[1]}×{frames.shape[2]} frames)"
    )
    if not (energy_kev > 0 and distance_m > 0 and x_pixel_m > 0 and y_pixel_m > 0):
        raise ConfigError(
            f"{where}: energy {energy_kev:.6g} keV, distance {distance_m:.6g} m and detector pixel "
            f"{x_pixel_m:.6g} × {y_pixel_m:.6g} m must all be positive to give the probe's pixel size; fix "
            f"the file or name the probe with a pixel_size_m attribute"
        )
    wavelength_m = PLANCK_TIMES_LIGHT_SPEED_M_KEV / energy_kev
    y_m = wavelength_m * distance_m / (frames.shape[1] * y_pixel_m)
    x_m = wavelength_m * distance_m / (frames.shape[2] * x_pixel_m)
    return _plausible(*_square(y_m, x_m, where))


def _square(y_m: float, x_m: float, where: str) -> tuple[float, str]:
    if not math.isclose(y_m, x_m, rel_tol=1e-6):
        raise ConfigError(
            f"{where} gives a {y_m:.6g} m × {x_m:.6g} m (y × x) probe pixel; phasestream's object grid has "
            "square pixels: resample the probe to square pixels"
        )
    return x_m, where


def _plausible(pixel_m: float, where: str) -> float:
    low, high = PLAUSIBLE_PIXEL_M
    if not (math.isfinite(pixel_m) and low <= pixel_m <= high):
        raise ConfigError(
            f"{where} gives a probe pixel of {pixel_m:.6g} m, outside {low:g}–{high:g} m: store it in metres "
            "(nanometres stored as metres are the usual slip)"
        )
    return pixel_m


def _float_attribute(dataset: h5py.Dataset, name: str) -> float:
    return float(np.asarray(dataset.attrs[name], dtype=np.float64).reshape(-1)[0])


def _scalar(dataset: h5py.Dataset) -> float:
    value = np.asarray(dataset[()])
    if value.size < 1 or value.dtype.kind not in "iuf":
        raise ConfigError(
            f"{dataset.file.filename}:{dataset.name} holds {_describe(value)}; expected a number: "
            "fix the file"
        )
    return float(value.reshape(-1)[0])


def _length_m(dataset: h5py.Dataset) -> float:
    return _scalar(dataset) * _unit_factor(dataset, METRES_PER_UNIT, "m")


def _energy_j(dataset: h5py.Dataset) -> float:
    return _scalar(dataset) * _unit_factor(dataset, _JOULES_PER_UNIT, "J")


def _unit_factor(dataset: h5py.Dataset, table: dict[str, float], default: str) -> float:
    units = (_text(dataset.attrs.get("units")) or default).strip()
    if units not in table:
        raise ConfigError(
            f"{dataset.file.filename}:{dataset.name} has units {units!r}; phasestream reads {sorted(table)}: "
            "fix the units attribute"
        )
    return table[units]


def _text(value: object) -> str | None:
    """A string however HDF5 stored it (str, bytes, a one-element array, a scalar dataset)."""
    if isinstance(value, h5py.Dataset):
        value = value[()]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nx_class(group: h5py.Group) -> str | None:
    return _text(group.attrs.get("NX_class"))

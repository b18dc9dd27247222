"""Single HDF5 fields of scan files, read and written: datasets a reader requires, scalars, text attributes,
lengths in their ``units``, and NeXus groups and quantities."""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from phasestream.errors import ScanFileError

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


def nx_group(parent: h5py.Group, name: str, nx_class: str, **attrs: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    for key, value in attrs.items():
        group.attrs[key] = value
    return group


def write_quantity(group: h5py.Group, name: str, value: Any, units: str) -> None:
    group.create_dataset(name, data=value)
    group[name].attrs["units"] = units

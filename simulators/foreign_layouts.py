"""Scans written the way other tools write them, with plain h5py, for replay tests and benchmarks.

phasestream's own CXI writer (``simulators.cxi.write_cxi``) writes one layout; files from beamlines and
other packages come in others. These writers follow the layouts those tools document (see each
``ForeignLayout``), never phasestream's writer, so a reader tested on them is tested on what it did not
make:

- ``CXIDB``: the CXI 1.5 reference layout (cxidb): frames under ``instrument_1/detector_1/data`` with a
  ``data_1/data`` soft link, sample translations (N, 3) in metres under ``sample_1/geometry_1``, the
  energy in joules, a uint32 bit-field ``detector_1/mask`` (0 = good), the probe, where given, under
  ``source_1/illumination`` with a ``source_1/probe`` soft link (SHARP's habit).
- ``PTYPY``: what PtyPy's CXI loader reads: only ``entry_1/data_1/{data, translation}``, the detector's
  distance and pixel size, the energy in joules; no mask (PtyPy keeps it in another file).
- ``NXCXI_PTYCHO``: the NeXus NXcxi_ptycho contributed definition: ``definition``, the photon energy
  under ``instrument_1/beam_1`` with units, ``source_1/probe`` the radiation type (a string),
  translations under ``detector_1/translation`` in micrometres, the probe, where given, under
  ``source_1/illumination``.

Intensities are stored as float32 (as ALS COSMIC and many reconstruction codes store counts) or as
uint32.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import h5py
import numpy as np

JOULES_PER_EV = 1.602176634e-19
# CXI 1.5 mask bits: 0x8 "dead" marks every defect these scans have.
_CXI_DEAD = 0x8


class ForeignLayout(StrEnum):
    CXIDB = "cxidb"
    PTYPY = "ptypy"
    NXCXI_PTYCHO = "nxcxi_ptycho"


def write_foreign_cxi(
    path: Path | str,
    scan: Any,
    layout: ForeignLayout,
    *,
    float_intensities: bool,
    with_probe: bool,
) -> Path:
    """Write ``scan`` (frames, nominal positions_m, geometry, bad_pixel_mask, probe_truth) as ``layout``.

    Positions become sample translations (x, y, 0) in metres: the probe centre (y, x) on the sample
    with the CXI default detector orientation (see ``simulators.cxi``).
    """
    path = Path(path)
    frames = np.asarray(scan.frames).astype(np.float32 if float_intensities else np.uint32)
    translation_m = np.zeros((len(scan.positions_m), 3))
    translation_m[:, 0] = scan.positions_m[:, 1]
    translation_m[:, 1] = scan.positions_m[:, 0]
    with h5py.File(path, "w") as file:
        file["cxi_version"] = 150
        entry = file.create_group("entry_1")
        instrument = entry.create_group("instrument_1")
        detector = instrument.create_group("detector_1")
        source = instrument.create_group("source_1")
        detector["distance"] = scan.detector_distance_m
        detector["x_pixel_size"] = scan.detector_pixel_size_m
        detector["y_pixel_size"] = scan.detector_pixel_size_m
        energy_j = scan.energy_kev * 1000 * JOULES_PER_EV
        if layout is ForeignLayout.CXIDB:
            _cxidb(file, frames, translation_m, energy_j, scan, with_probe)
        elif layout is ForeignLayout.PTYPY:
            data = entry.create_group("data_1")
            data["data"] = frames
            data["translation"] = translation_m
            source["energy"] = energy_j
        else:
            _nxcxi_ptycho(file, frames, translation_m, scan, with_probe)
    return path


def _cxidb(
    file: h5py.File,
    frames: np.ndarray,
    translation_m: np.ndarray,
    energy_j: float,
    scan: Any,
    with_probe: bool,
) -> None:
    detector = file["entry_1/instrument_1/detector_1"]
    source = file["entry_1/instrument_1/source_1"]
    detector["data"] = frames
    detector["data"].attrs["axes"] = "translation:y:x"
    detector["mask"] = np.where(scan.bad_pixel_mask, _CXI_DEAD, 0).astype(np.uint32)
    source["energy"] = energy_j
    geometry = file.create_group("entry_1/sample_1/geometry_1")
    geometry["translation"] = translation_m
    data = file.create_group("entry_1/data_1")
    data["data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
    data["translation"] = h5py.SoftLink("/entry_1/sample_1/geometry_1/translation")
    if with_probe:
        source["illumination"] = np.asarray(scan.probe_truth, dtype=np.complex64)
        source["probe"] = h5py.SoftLink("/entry_1/instrument_1/source_1/illumination")


def _nxcxi_ptycho(
    file: h5py.File, frames: np.ndarray, translation_m: np.ndarray, scan: Any, with_probe: bool
) -> None:
    entry = file["entry_1"]
    entry["definition"] = "NXcxi_ptycho"
    instrument = entry["instrument_1"]
    detector = instrument["detector_1"]
    source = instrument["source_1"]
    source["name"] = "storage ring"
    source["probe"] = "x-ray"  # NXsource's radiation type, not an illumination array
    source["energy"] = 6.0e9 * JOULES_PER_EV  # the machine's energy: not the photons'
    beam = instrument.create_group("beam_1")
    beam["energy"] = scan.energy_kev * 1000
    beam["energy"].attrs["units"] = "eV"
    detector["data"] = frames
    detector["translation"] = translation_m * 1e6
    detector["translation"].attrs["units"] = "um"
    detector["translation"].attrs["axes"] = "translation:slow:fast"
    for name in ("distance", "x_pixel_size", "y_pixel_size"):
        detector[name].attrs["units"] = "m"
    data = entry.create_group("data_1")
    data["data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
    data["translation"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/translation")
    if with_probe:
        source["illumination"] = np.asarray(scan.probe_truth, dtype=np.complex64)

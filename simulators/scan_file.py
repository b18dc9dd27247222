"""Save a simulated scan with its truth to one ``.npz`` and load it back (for replay and the demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from phasestream.errors import ConfigError
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan

_ARRAYS = ("frames", "positions_m", "object_truth", "probe_truth")


def save_scan(scan: SimulatedScan, path: Path) -> None:
    scalars = {
        "object_pixel_size_m": scan.object_pixel_size_m,
        "object_top_left_m": list(scan.object_top_left_m),
        "energy_kev": scan.energy_kev,
        "detector_distance_m": scan.detector_distance_m,
        "detector_pixel_size_m": scan.detector_pixel_size_m,
        "scan_shape": list(scan.scan_shape),
        "clipped_pixel_count": scan.clipped_pixel_count,
        "config": scan.config.model_dump(mode="json"),
    }
    with Path(path).open("wb") as f:
        np.savez(f, metadata=np.array(json.dumps(scalars)), **{name: getattr(scan, name) for name in _ARRAYS})


def load_scan(path: Path) -> SimulatedScan:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in _ARRAYS}
            scalars = json.loads(str(data["metadata"]))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a scan saved by phasestream ({exc}); run `phasestream demo` first"
        ) from exc
    return SimulatedScan(
        **arrays,
        object_pixel_size_m=scalars["object_pixel_size_m"],
        object_top_left_m=tuple(scalars["object_top_left_m"]),
        energy_kev=scalars["energy_kev"],
        detector_distance_m=scalars["detector_distance_m"],
        detector_pixel_size_m=scalars["detector_pixel_size_m"],
        scan_shape=tuple(scalars["scan_shape"]),
        clipped_pixel_count=scalars["clipped_pixel_count"],
        config=ScanSimulationConfig.model_validate(scalars["config"]),
    )

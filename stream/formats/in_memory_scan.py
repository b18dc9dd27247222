"""What a file writer needs from a scan held in memory (a simulated one, for instance)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ScanInMemory(Protocol):
    """A scan with all its frames in memory, such as a simulated one; writers take it or a RecordedScan."""

    frames: np.ndarray  # (n, H, W) counts
    positions_m: np.ndarray  # (n, 2) probe centres (y, x)
    probe_truth: np.ndarray  # the probe the scan was made with
    energy_kev: float
    detector_distance_m: float
    detector_pixel_size_m: float
    scan_shape: tuple[int, ...]

"""The refine stage's first probe: from a file, from the previous scan, or found in the data.

``initial_probe`` in the refine stage's config (and ``--probe`` on ``run`` and ``replay``) picks it:

- ``auto``: candidates built from the mean pattern (``models.probe_guess``) each run a few epochs on the
  first patterns; the one with the lowest error wins, and the log says which and why.
- ``previous``: the final probe of the last completed scan with the same geometry (energy, distance,
  detector pixel, frame shape), the usual start between consecutive scans. Kept in the run directory, so
  a restarted worker still has it; without one, the scan falls back to ``auto`` and says so.
- a file: ``probe.npy``, ``scan.cxi::/entry_1/instrument_1/source_1/illumination``, a CXI or PtyPy file,
  or a phasestream result file (``phasestream.formats.probe_source``). A probe of another size or pixel
  pitch is
  resampled to the frame's geometry and scaled to the measured intensity, and the log says how.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phasestream.formats.probe_source import LoadedProbe, ProbeStartKind, load_probe, parse_probe_spec
from phasestream.models.ptycho.probe_guess import choose_probe, probe_candidates
from phasestream.models.ptycho.probe_resample import resample_probe
from phasestream.runtime.messages import Geometry

# Frames whose bright-field shadows, moving with the scan, give the probe's diameter and the side of the
# focus: a few dozen suffice; more only cost time.
SHADOW_PATTERNS = 64


@dataclass(frozen=True)
class ProbeStart:
    """The probe a scan starts from (complex64 (k, N, N)), and what the log says about it."""

    probe: np.ndarray | None  # None: the solver's own start from the mean pattern
    label: str
    reason: str


def geometry_key(geometry: Geometry, window_px: tuple[int, int]) -> str:
    """A file-name-safe key of what makes two scans' probes interchangeable."""
    text = (
        f"{geometry.energy_kev:.4f}keV-{geometry.detector_distance_m:.4f}m-"
        f"{geometry.pixel_size_m:.3e}m-{window_px[0]}x{window_px[1]}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PreviousProbes:
    """The last final probe per geometry, in memory and under ``folder`` (one ``.npy`` per geometry)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._probes: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray | None:
        if key not in self._probes:
            path = self._folder / f"{key}.npy"
            if path.is_file():
                self._probes[key] = np.load(path, allow_pickle=False)
        return self._probes.get(key)

    def put(self, key: str, probe: np.ndarray) -> None:
        self._probes[key] = probe
        self._folder.mkdir(parents=True, exist_ok=True)
        temporary = self._folder / f".{key}.{os.getpid()}.npy"
        np.save(temporary, probe)
        os.replace(temporary, self._folder / f"{key}.npy")  # a reader never sees half a probe


def scaled_to_patterns(probe: np.ndarray, mean_intensity: np.ndarray) -> np.ndarray:
    """The probe with the mean pattern's total intensity as its power (a file's scale is arbitrary).

    With the unitary far field the solver uses, Σ|P|² = Σ I for a sample that transmits everything; a
    sample that absorbs makes the probe a little dim, which the first epochs correct.
    """
    power = float(np.sum(np.abs(probe) ** 2))
    return (probe * np.sqrt(float(np.sum(mean_intensity)) / power)).astype(np.complex64)


def loaded_start(
    loaded: LoadedProbe, object_pixel_m: float, window_px: tuple[int, int], mean_intensity: np.ndarray
) -> ProbeStart:
    resampled = resample_probe(loaded.probe, loaded.pixel_size_m, object_pixel_m, window_px)
    probe = scaled_to_patterns(resampled.probe, mean_intensity)
    return ProbeStart(probe, f"file {loaded.source}", resampled.note)


def auto_start(
    patterns: np.ndarray,
    corners_px: np.ndarray,
    unmeasured: np.ndarray | None,
    trial_error: Callable[[np.ndarray], float],
) -> ProbeStart:
    """The candidate whose first epochs fit best; the reason lists every candidate's error."""
    candidates = probe_candidates(
        patterns.mean(axis=0),
        unmeasured,
        patterns=patterns[:SHADOW_PATTERNS],
        positions_px=np.asarray(corners_px[:SHADOW_PATTERNS], dtype=np.float64),
    )
    chosen, scores = choose_probe(candidates, trial_error)
    ranked = ", ".join(f"{label} {error:.3g}" for label, error in sorted(scores, key=lambda s: s[1]))
    return ProbeStart(
        chosen.probe, f"auto: {chosen.label}", f"{chosen.reason}; lowest error of {len(scores)}: {ranked}"
    )


def parse_initial_probe(text: str) -> str:
    """Check an ``initial_probe`` value at config load: a file must load as a valid probe now."""
    spec = parse_probe_spec(text)
    if spec.kind is ProbeStartKind.FILE:
        load_probe(spec)
    return text


def load_initial_probe(text: str) -> LoadedProbe | None:
    spec = parse_probe_spec(text)
    return load_probe(spec) if spec.kind is ProbeStartKind.FILE else None


def start_kind(text: str) -> ProbeStartKind:
    return parse_probe_spec(text).kind

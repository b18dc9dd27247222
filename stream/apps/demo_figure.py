"""Compare a reconstruction with the simulated truth, and draw them side by side."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from phasestream.models.quality import aligned_error

# Pixels lit by at least this fraction of the peak summed probe intensity are well determined by the
# data; outside, ePIE leaves the initial guess and no algorithm can be judged there.
ILLUMINATION_FRACTION = 0.3


@dataclass(frozen=True)
class Comparison:
    truth: np.ndarray  # the truth on the reconstruction's grid
    mask: np.ndarray  # where the comparison is made
    # Normalised RMS error after removing what ptychography cannot determine: a complex scale (object c·O
    # with probe P/c), a linear phase ramp and a sub-pixel shift.
    error: float


def truth_on_reconstruction_grid(scan: Any, obj: np.ndarray, origin_m: tuple[float, float]) -> np.ndarray:
    """Cut the truth to the reconstruction's canvas (free space, 1, where the truth has no pixels)."""
    offset_px = np.rint(
        (np.asarray(origin_m) - np.asarray(scan.object_top_left_m)) / scan.object_pixel_size_m
    )
    truth = np.ones(obj.shape, dtype=np.complex64)
    ty, tx = scan.object_truth.shape
    y0, x0 = int(offset_px[0]), int(offset_px[1])
    src_y = slice(max(y0, 0), min(y0 + obj.shape[0], ty))
    src_x = slice(max(x0, 0), min(x0 + obj.shape[1], tx))
    dst_y = slice(src_y.start - y0, src_y.stop - y0)
    dst_x = slice(src_x.start - x0, src_x.stop - x0)
    truth[dst_y, dst_x] = scan.object_truth[src_y, src_x]
    return truth


def illumination_mask(scan: Any, shape: tuple[int, int], origin_m: tuple[float, float]) -> np.ndarray:
    """Where the true probe, summed over the scan, lights the canvas well."""
    intensity = np.abs(scan.probe_truth) ** 2
    window = np.array(intensity.shape)
    total = np.zeros(shape, dtype=np.float64)
    centres_px = (scan.positions_m - np.asarray(origin_m)) / scan.object_pixel_size_m
    for corner in np.rint(centres_px - window // 2).astype(int):
        y, x = corner
        if y < 0 or x < 0 or y + window[0] > shape[0] or x + window[1] > shape[1]:
            continue
        total[y : y + window[0], x : x + window[1]] += intensity
    return total >= ILLUMINATION_FRACTION * total.max()


def compare_with_truth(scan: Any, reconstruction: dict[str, Any]) -> Comparison:
    obj = reconstruction["object"]
    origin_m = tuple(reconstruction["metadata"]["origin_m"])
    truth = truth_on_reconstruction_grid(scan, obj, origin_m)
    mask = illumination_mask(scan, obj.shape, origin_m)
    error = aligned_error(obj, truth, mask=mask, fit_amplitude=True, remove_phase_ramp=True)
    return Comparison(truth=truth, mask=mask, error=float(error))


def draw_comparison(
    scan: Any,
    reconstruction: dict[str, Any],
    comparison: Comparison,
    path: Path,
    timings: Sequence[str] = (),
) -> None:
    """Truth, reconstruction, probe and mosaic side by side, with the figures and ``timings`` as text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 8.5))
    _draw_object(fig, axes[:, :2], reconstruction["object"], comparison, scan)
    _draw_probe(axes[0, 2], reconstruction["probe"], scan)
    _draw_mosaic(axes[1, 2], reconstruction, scan)
    axes[0, 3].axis("off")
    axes[1, 3].axis("off")
    summary = _summary(scan, reconstruction["metadata"], comparison, timings)
    axes[0, 3].text(0.0, 0.95, summary, va="top", family="monospace", fontsize=11)
    fig.suptitle(
        "phasestream demo: live AutoPhaseNN mosaic and ePIE from a simulated SELUN scan, read back from Tiled"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _draw_object(fig: Any, axes: Any, obj: np.ndarray, comparison: Comparison, scan: Any) -> None:
    """Amplitude (top) and phase (bottom) of truth (left) and reconstruction (right), the well-lit part."""
    # Show the reconstruction times the complex scale that best matches the truth (object and probe
    # share an arbitrary scale), so both share one colour scale.
    inside = comparison.mask
    scale = np.vdot(obj[inside], comparison.truth[inside]) / np.vdot(obj[inside], obj[inside]).real
    shown = obj * scale
    rows, cols = np.nonzero(inside)
    crop = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    extent_um = np.array([0, np.ptp(cols) + 1, np.ptp(rows) + 1, 0]) * scan.object_pixel_size_m * 1e6
    panels = [
        (axes[0, 0], np.abs(comparison.truth[crop]), "truth: amplitude", "gray", (0, 1.05)),
        (axes[0, 1], np.abs(shown[crop]), "reconstruction: amplitude", "gray", (0, 1.05)),
        (axes[1, 0], np.angle(comparison.truth[crop]), "truth: phase (rad)", "twilight", (-np.pi, np.pi)),
        (axes[1, 1], np.angle(shown[crop]), "reconstruction: phase (rad)", "twilight", (-np.pi, np.pi)),
    ]
    for ax, image, title, cmap, limits in panels:
        im = ax.imshow(image, cmap=cmap, vmin=limits[0], vmax=limits[1], extent=extent_um)
        ax.set_title(title)
        ax.set_xlabel("µm")
        fig.colorbar(im, ax=ax, shrink=0.8)


def _draw_probe(ax: Any, probe: np.ndarray, scan: Any) -> None:
    """The reconstructed probe's amplitude; it fills the middle half of its window (oversampling ≥ 2)."""
    n_y, n_x = probe.shape
    middle = (slice(n_y // 4, 3 * n_y // 4), slice(n_x // 4, 3 * n_x // 4))
    probe_um = np.array([0, n_x // 2, n_y // 2, 0]) * scan.object_pixel_size_m * 1e6
    ax.imshow(np.abs(probe[middle]), cmap="magma", extent=probe_um)
    ax.set_title("reconstructed probe: amplitude")
    ax.set_xlabel("µm")


def _summary(scan: Any, meta: dict[str, Any], comparison: Comparison, timings: Sequence[str]) -> str:
    """The scan, the solver's figures, the error against the truth and ``timings``, one per line."""
    return "\n".join(
        [
            f"scan: {len(scan.positions_m)} positions, 192×192 SELUN frames",
            f"{scan.config.photons_per_frame:.0e} photons/frame, Poisson noise",
            f"algorithm: {meta.get('algorithm')}, {meta.get('iteration')} epochs",
            f"Fourier error: {meta.get('quality', {}).get('fourier_error', float('nan')):.4f}",
            "",
            "object error vs truth",
            "(complex scale, phase ramp and sub-pixel",
            f"shift removed; well-lit region): {comparison.error:.3f}",
            "",
            *timings,
        ]
    )


def _draw_mosaic(ax: Any, reconstruction: dict[str, Any], scan: Any) -> None:
    """The AutoPhaseNN mosaic's amplitude on its own grid: the preview that reached Tiled first."""
    if "mosaic" not in reconstruction:
        ax.axis("off")
        ax.set_title("no AutoPhaseNN mosaic in this topology")
        return
    mosaic = reconstruction["mosaic"]
    summary = reconstruction["metadata"].get("mosaic", {})
    pixel_m = summary.get("object_pixel_size_m", scan.object_pixel_size_m)
    extent_um = np.array([0, mosaic.shape[1], mosaic.shape[0], 0]) * pixel_m * 1e6
    im = ax.imshow(np.abs(mosaic), cmap="gray", extent=extent_um)
    ax.set_title("AutoPhaseNN mosaic: amplitude (whole scan)")
    ax.set_xlabel("µm")
    ax.figure.colorbar(im, ax=ax, shrink=0.8)

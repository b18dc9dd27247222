"""Reconstruction arrays as PNG images for the live viewer: amplitude, phase, probe, mosaic, positions.

Colour scales: amplitudes run from 0 to the 99.9th percentile (one hot pixel must not darken the whole
image), real images from the 0.1th to the 99.9th percentile, phases from −π to π on matplotlib's cyclic
``twilight`` map, so a phase that wraps from π to −π shows no edge. Arrays with more than two axes show one
plane: the central slice of a volume; a probe with incoherent modes shows its total amplitude
``sqrt(Σ_k |P_k|²)`` (Thibault & Menzel 2013, Nature 494, 68, eq. 2). Images larger than
``MAX_DISPLAY_PX`` on a side are shown subsampled; ``RenderedImage.source_shape_px`` keeps the array's own
shape so that the page can place scan positions given in array pixels.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import matplotlib
import matplotlib.image
import numpy as np

from phasestream.errors import ConfigError

AMPLITUDE_COLORMAP = "gray"
PHASE_COLORMAP = "twilight"
REAL_COLORMAP = "viridis"
# A browser shows a few images side by side; more pixels than this only cost encoding time.
MAX_DISPLAY_PX = 1024
ROBUST_PERCENTILE = 99.9
# zlib level 1: a 256×256 image encodes several times faster than at the default 6 and is only slightly
# larger, which matters more for latency on a loopback link than the bytes.
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class RenderedImage:
    """A PNG and what the page needs to place things on it."""

    png: bytes
    shape_px: tuple[int, int]  # (height, width) of the PNG
    source_shape_px: tuple[int, int]  # (height, width) of the array plane it shows


def central_plane(array: np.ndarray) -> np.ndarray:
    """The 2D plane to show: the array itself, or the central slice along each leading axis."""
    array = np.asarray(array)
    if array.ndim < 2:
        raise ConfigError(f"cannot show an array of shape {array.shape} as an image: it needs two axes")
    while array.ndim > 2:
        array = array[array.shape[0] // 2]
    return array


def probe_amplitude(probe: np.ndarray) -> np.ndarray:
    """``sqrt(Σ_k |P_k|²)`` over every leading axis (incoherent modes), or ``|P|`` for a single probe."""
    probe = np.asarray(probe)
    if probe.ndim < 2:
        raise ConfigError(f"cannot show a probe of shape {probe.shape}: it needs two axes")
    intensity = np.abs(probe.reshape(-1, *probe.shape[-2:])) ** 2
    return np.sqrt(intensity.sum(axis=0))


def subsample(plane: np.ndarray, max_px: int = MAX_DISPLAY_PX) -> np.ndarray:
    """Every ``step``-th pixel, with the smallest step that brings both sides to ``max_px`` or fewer.

    Subsampling rather than block averaging: averaging phases across a wrap would invent values.
    """
    step = math.ceil(max(plane.shape) / max_px)
    return plane[::step, ::step] if step > 1 else plane


def _display_plane(values: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The subsampled central plane and the shape of the full plane."""
    plane = central_plane(values)
    return subsample(plane), (int(plane.shape[0]), int(plane.shape[1]))


def render_png(
    shown: np.ndarray, colormap: str, vmin: float, vmax: float, source_shape_px: tuple[int, int]
) -> RenderedImage:
    """Map the 2D ``shown`` linearly from [vmin, vmax] onto ``colormap`` and encode it as an RGB PNG.

    Values outside the range are clipped to its ends; NaN shows as the bottom of the map.
    """
    span = vmax - vmin
    scaled = (np.asarray(shown, dtype=np.float64) - vmin) / (span if span > 0 else np.inf)
    np.nan_to_num(scaled, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
    # The colormap's own rule (bin k of N holds [k/N, (k+1)/N)) on a cached table: faster than calling it.
    table = _colour_table(colormap)
    index = np.clip((scaled * len(table)).astype(np.intp), 0, len(table) - 1)
    rgb = table[index]
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, rgb, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return RenderedImage(buffer.getvalue(), (int(rgb.shape[0]), int(rgb.shape[1])), source_shape_px)


@functools.cache
def _colour_table(colormap: str) -> np.ndarray:
    """The colormap's RGB entries as uint8, row k for bin k."""
    colours = matplotlib.colormaps[colormap]
    return np.ascontiguousarray(colours(np.arange(colours.N), bytes=True)[:, :3])


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def amplitude_image(values: np.ndarray) -> RenderedImage:
    """``|values|`` in grey from 0 to its 99.9th percentile (of the pixels shown)."""
    shown, source_shape_px = _display_plane(values)
    amplitude = np.abs(shown)
    finite = _finite(amplitude)
    top = float(np.percentile(finite, ROBUST_PERCENTILE)) if finite.size else 0.0
    return render_png(amplitude, AMPLITUDE_COLORMAP, 0.0, top if top > 0 else 1.0, source_shape_px)


def phase_image(values: np.ndarray) -> RenderedImage:
    """``angle(values)`` from −π to π on a cyclic map."""
    shown, source_shape_px = _display_plane(values)
    return render_png(np.angle(shown), PHASE_COLORMAP, -math.pi, math.pi, source_shape_px)


def real_image(values: np.ndarray) -> RenderedImage:
    """A real image (a neural preview) between the 0.1th and 99.9th percentiles of the pixels shown."""
    shown, source_shape_px = _display_plane(values)
    plane = np.real(shown).astype(np.float64)
    finite = _finite(plane)
    if not finite.size:
        return render_png(plane, REAL_COLORMAP, 0.0, 1.0, source_shape_px)
    bottom, top = np.percentile(finite, [100 - ROBUST_PERCENTILE, ROBUST_PERCENTILE])
    return render_png(plane, REAL_COLORMAP, float(bottom), float(top), source_shape_px)


def positions_px(positions_m: np.ndarray, origin_m: tuple[float, float], pixel_size_m: float) -> np.ndarray:
    """Probe centres (y, x) in metres as fractional object pixels: ``(p − origin_m) / pixel_size_m``.

    ``origin_m`` is the position of object pixel (0, 0) in the frame of the scan positions, as the refine
    stage publishes it with ``object_pixel_size_m`` (see ``phasestream.runtime.messages.Reconstruction``).
    """
    positions = np.asarray(positions_m, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ConfigError(f"positions have shape {positions.shape}: publish (n, 2) probe centres (y, x) in m")
    if not pixel_size_m > 0:
        raise ConfigError(f"object_pixel_size_m={pixel_size_m!r} must be positive")
    return (positions - np.asarray(origin_m, dtype=np.float64)) / pixel_size_m

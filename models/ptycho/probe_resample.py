"""Bring a probe from a file onto the frames' object grid: another pixel size, another window.

A probe saved by another scan or tool is sampled at its own pixel size and window; the reconstruction
needs it at Δ = λ z / (N p) of the current frames, on their H × W window. The probe is interpolated
band-limited (see :func:`_interpolation_matrix`), centred so its intensity centroid lands on pixel
(H // 2, W // 2), cropped or zero-padded to the window and scaled back to its total power Σ|P|² (the
photons per frame, which the pixel size does not change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from phasestream.errors import ConfigError

MAX_CROP_LOSS = 0.10  # refuse a window that leaves out more of the probe's power than this
# Pitches closer than this (relative) are the same: the probe is only cropped or padded.
SAME_PITCH_RTOL = 1e-9
# A crop loss above this is said in the note.
NOTED_LOSS = 5e-4


@dataclass(frozen=True, eq=False)
class ResampledProbe:
    probe: np.ndarray  # complex64 (k, H, W)
    note: str  # one line for the log: what was done to the probe


def resample_probe(
    probe: np.ndarray, from_pixel_m: float | None, to_pixel_m: float, window_px: tuple[int, int]
) -> ResampledProbe:
    """A probe (k, h, w) at ``from_pixel_m`` on the object grid ``to_pixel_m`` and window (H, W).

    ``from_pixel_m=None`` means the probe's pitch is unknown and taken to be the frames': it is only
    recentred, cropped or padded. Raises ConfigError when the window would lose more than
    MAX_CROP_LOSS of the probe's power.
    """
    values = _modes(probe)
    _check_pitch(to_pixel_m, "to_pixel_m")
    if from_pixel_m is not None:
        _check_pitch(from_pixel_m, "from_pixel_m")
    window = _check_window(window_px)
    pitch_in_m = to_pixel_m if from_pixel_m is None else from_pixel_m
    power = float(np.sum(np.abs(values) ** 2))
    if not power > 0:
        raise ConfigError(f"the probe ({values.shape}) has zero power: there is nothing to resample")
    centre_px = _rounded_centroid_px(values)
    loss = _power_outside_window(values, centre_px, pitch_in_m, to_pixel_m, window) / power
    if loss > MAX_CROP_LOSS:
        raise ConfigError(_crop_refusal(values.shape, pitch_in_m, from_pixel_m, to_pixel_m, window, loss))
    rows = _interpolation_matrix(values.shape[1], centre_px[0], pitch_in_m, window[0], to_pixel_m)
    columns = _interpolation_matrix(values.shape[2], centre_px[1], pitch_in_m, window[1], to_pixel_m)
    resampled = rows @ values @ columns.T
    resampled_power = float(np.sum(np.abs(resampled) ** 2))
    if not resampled_power > 0:
        raise ConfigError(
            f"the probe ({values.shape}) keeps no power at {_length(to_pixel_m)} pixels: its detail is all "
            f"finer than the frames' pitch; give a probe sampled for these frames or 'auto'"
        )
    # One factor for every mode keeps their relative powers.
    resampled *= math.sqrt(power / resampled_power)
    note = _note(values.shape, from_pixel_m, to_pixel_m, window, centre_px, loss)
    return ResampledProbe(resampled.astype(np.complex64), note)


def _interpolation_matrix(
    n_in: int, centre_in: int, pitch_in_m: float, n_out: int, pitch_out_m: float
) -> np.ndarray:
    """(n_out, n_in) matrix taking one axis of the probe onto the output grid, centred on pixel n_out // 2.

    Input pixel ``centre_in`` sits at 0 m, output pixel n_out // 2 too. At the same pitch the matrix only
    selects pixels (a crop or zero pad). Otherwise it evaluates the probe's trigonometric interpolant (the
    inverse DFT of its spectrum, kept up to the output's Nyquist frequency) at the output positions. That
    is what Fourier zero-padding (finer output) or spectrum cropping (coarser output) computes, without
    their condition that n_in × pitch ratio be a whole number, so any ratio of pixel sizes is exact, and
    band-limited: bilinear interpolation would blur the probe's fringes and alias on a coarser grid. The
    spectrum lives on the input's extent, so output positions outside it are zero (the padding).
    """
    out_m = (np.arange(n_out) - n_out // 2) * pitch_out_m
    if math.isclose(pitch_in_m, pitch_out_m, rel_tol=SAME_PITCH_RTOL):
        index = np.arange(n_out) - n_out // 2 + centre_in
        selection = np.zeros((n_out, n_in))
        inside = (index >= 0) & (index < n_in)
        selection[np.flatnonzero(inside), index[inside]] = 1.0
        return selection
    in_m = (np.arange(n_in) - centre_in) * pitch_in_m
    frequency_per_m = (np.arange(n_in) - n_in // 2) / (n_in * pitch_in_m)
    cosine = np.zeros(n_in, dtype=bool)
    if n_in % 2 == 0:
        # The input's Nyquist bin stands for +f and −f alike: its interpolant is the cosine, which is
        # real for a real probe and still passes through every input sample.
        cosine[0] = True
    kept = np.abs(frequency_per_m) < (1 - SAME_PITCH_RTOL) / (2 * pitch_out_m)
    analysis = np.exp(-2j * np.pi * np.outer(frequency_per_m[kept], in_m)) / n_in
    phase = 2 * np.pi * np.outer(out_m, frequency_per_m[kept])
    synthesis = np.where(cosine[kept], np.cos(phase), np.exp(1j * phase))
    matrix = synthesis @ analysis
    outside = (out_m < in_m[0] - pitch_in_m / 2) | (out_m >= in_m[-1] + pitch_in_m / 2)
    matrix[outside] = 0
    return matrix


def _power_outside_window(
    values: np.ndarray,
    centre_px: tuple[int, int],
    pitch_in_m: float,
    pitch_out_m: float,
    window: tuple[int, int],
) -> float:
    """Power of the input pixels whose centres fall outside the output window, once centred."""
    inside = []
    for axis, (centre, n_out) in enumerate(zip(centre_px, window, strict=True)):
        position_m = (np.arange(values.shape[axis + 1]) - centre) * pitch_in_m
        low_m, high_m = (-(n_out // 2) - 0.5) * pitch_out_m, (n_out - n_out // 2 - 0.5) * pitch_out_m
        inside.append((position_m >= low_m) & (position_m < high_m))
    intensity = np.sum(np.abs(values) ** 2, axis=0)
    return float(intensity.sum() - intensity[np.ix_(*inside)].sum())


def _rounded_centroid_px(values: np.ndarray) -> tuple[int, int]:
    """The intensity centroid (all modes) to the nearest pixel: the probe's centre on its grid."""
    intensity = np.sum(np.abs(values) ** 2, axis=0)
    total = intensity.sum()
    rows, columns = np.arange(intensity.shape[0]), np.arange(intensity.shape[1])
    centroid_y = float(intensity.sum(axis=1) @ rows / total)
    centroid_x = float(intensity.sum(axis=0) @ columns / total)
    return round(centroid_y), round(centroid_x)


def _modes(probe: np.ndarray) -> np.ndarray:
    values = np.asarray(probe)
    if values.ndim == 2:
        values = values[np.newaxis]
    if values.ndim != 3 or values.dtype.kind not in "iufc":
        raise ConfigError(
            f"probe of {values.dtype} with shape {values.shape} cannot be resampled: pass a numeric (H, W) "
            "or (modes, H, W) array (phasestream.formats.probe_source.validate_probe makes one)"
        )
    return values.astype(np.complex128)


def _check_pitch(pixel_m: float, name: str) -> None:
    if not (math.isfinite(pixel_m) and pixel_m > 0):
        raise ConfigError(f"{name}={pixel_m!r} must be a positive pixel size in metres")


def _check_window(window_px: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(n) for n in window_px)
    if height < 1 or width < 1:
        raise ConfigError(f"window_px={tuple(window_px)} must hold at least one pixel along each axis")
    return height, width


def _crop_refusal(
    shape: tuple[int, ...],
    pitch_in_m: float,
    from_pixel_m: float | None,
    to_pixel_m: float,
    window: tuple[int, int],
    loss: float,
) -> str:
    _, height, width = shape
    pitch = _length(pitch_in_m) if from_pixel_m is not None else f"{_length(pitch_in_m)} (the frames' pitch)"
    return (
        f"a probe of {height}×{width} pixels at {pitch} spans {_length(height * pitch_in_m)} × "
        f"{_length(width * pitch_in_m)}; the frames' {window[0]}×{window[1]} window at "
        f"{_length(to_pixel_m)} spans {_length(window[0] * to_pixel_m)} × {_length(window[1] * to_pixel_m)} "
        f"and would leave out {loss:.1%} of its power (the limit is {MAX_CROP_LOSS:.0%}): use frames of "
        "more detector pixels (a larger region of interest, less binning), a probe that fits the window, "
        "or the 'auto' probe"
    )


def _note(
    shape: tuple[int, ...],
    from_pixel_m: float | None,
    to_pixel_m: float,
    window: tuple[int, int],
    centre_px: tuple[int, int],
    loss: float,
) -> str:
    _, height, width = shape
    size_in, size_out = f"{height}×{width}", f"{window[0]}×{window[1]}"
    if from_pixel_m is None:
        note = f"probe {size_in} of unknown pixel size taken at the frames' {_length(to_pixel_m)}"
        note += f", fitted to {size_out}" if size_in != size_out else ""
    elif math.isclose(from_pixel_m, to_pixel_m, rel_tol=SAME_PITCH_RTOL):
        note = f"probe {size_in} at {_length(from_pixel_m)}, the frames' pitch"
        note += f", fitted to {size_out}" if size_in != size_out else ""
    else:
        note = (
            f"probe {size_in} at {_length(from_pixel_m)} resampled to {size_out} at {_length(to_pixel_m)} "
            f"(×{from_pixel_m / to_pixel_m:.3g})"
        )
    shift_px = (centre_px[0] - height // 2, centre_px[1] - width // 2)
    if shift_px != (0, 0):
        note += f"; recentred on its intensity centroid, {shift_px} px (y, x) from its centre pixel"
    if loss > NOTED_LOSS:
        note += (
            f"; {loss:.1%} of its power lay outside the window, the rest was scaled back to the full power"
        )
    return note


def _length(metres: float) -> str:
    if metres < 1e-6:
        return f"{metres * 1e9:.3g} nm"
    if metres < 1e-3:
        return f"{metres * 1e6:.3g} µm"
    return f"{metres * 1e3:.3g} mm"

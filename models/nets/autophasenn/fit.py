"""Preparing a measured pattern for AutoPhaseNN: refusing what the network must not see, and bringing the
rest to its grid by binning or cropping (with the probe the network then sees)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.models.nets.autophasenn.network import INPUT_SIZE_PX

AUTOCORRELATION_THRESHOLD = 0.002
"""The autocorrelation of a compact object falls towards its edge (twice the object's width) over about two
decades; 0.2 % of its peak finds that edge on the measured BCDI pattern in ``tests/data`` to within 15 % of
the oversampling its source quotes, where 4 % (a usual support threshold) underestimates the width by 40 %."""
BIN_OVERSAMPLING_MARGIN = 1.1
"""Binning by k needs oversampling ≥ 2k; the estimate runs up to 10 % high on simulated crystals, so binning
asks for 10 % more."""


class FitAction(StrEnum):
    """What :func:`fit_pattern` did to one axis of a pattern."""

    KEEP = "keep"
    CROP = "crop"
    BIN = "bin"


@dataclass(frozen=True)
class PatternFit:
    """How a pattern was brought to the network's grid, axis by axis."""

    input_shape: tuple[int, ...]
    actions: tuple[FitAction, ...]
    bin_factors: tuple[int, ...]


def estimate_oversampling(amplitude: np.ndarray, dim: int) -> np.ndarray:
    """Linear oversampling per axis, n / object width, from the extent of the pattern's autocorrelation.

    The autocorrelation F⁻¹(I) of an object w pixels wide spans 2w − 1 pixels, so σ ≈ 2n / extent. A leading
    batch axis is summed over first (the frames of one scan share their geometry).
    """
    intensity = np.asarray(amplitude, dtype=np.float64) ** 2
    if intensity.ndim > dim:
        intensity = intensity.reshape(-1, *intensity.shape[-dim:]).sum(axis=0)
    autocorrelation = np.abs(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(intensity))))
    inside = autocorrelation >= AUTOCORRELATION_THRESHOLD * autocorrelation.max()
    oversampling = np.empty(dim)
    for axis, n in enumerate(intensity.shape):
        profile = inside.any(axis=tuple(other for other in range(dim) if other != axis))
        offsets = np.abs(np.nonzero(profile)[0] - n // 2)
        oversampling[axis] = 2 * n / (2 * offsets.max() + 1)
    return oversampling


def _bin_axis(pattern: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Sum blocks of ``factor`` pixels along ``axis``, with the zero frequency kept in the middle block.

    Rolling by factor // 2 first puts the centre pixel n//2 at the middle of block (n/factor)//2, the centre
    of the binned pattern; a block boundary through the centre would add a half-pixel phase ramp to the
    object. The roll wraps factor // 2 edge pixels (the highest frequencies, the faintest) round.
    """
    rolled = np.roll(pattern, factor // 2, axis=axis)
    shape = list(rolled.shape)
    shape[axis : axis + 1] = [shape[axis] // factor, factor]
    return rolled.reshape(shape).sum(axis=axis + 1)


def fit_pattern(
    amplitude: np.ndarray, dim: int, size_px: int = INPUT_SIZE_PX
) -> tuple[np.ndarray, PatternFit]:
    """Bring a centred amplitude (optionally with a leading batch axis) to ``size_px`` on every axis.

    Per axis: a pattern of the right size is kept. A larger one is binned by k = n / size when k is a whole
    number and the object stays in the central half after binning (binning keeps the pixel size and cuts the
    field of view by k, so it needs oversampling ≥ 2k); otherwise it is cropped about its centre (cropping
    keeps the field of view and coarsens the pixel, which is always sound, at some loss of resolution).
    Binning adds intensities, so the amplitude is binned as sqrt(Σ a²). A smaller pattern is refused:
    padding would invent frequencies nobody measured.
    """
    spatial = tuple(amplitude.shape[-dim:])
    expected = (size_px,) * dim
    if any(n < size_px for n in spatial):
        raise FrameValidationError(
            f"pattern has shape {spatial} but the {dim}D AutoPhaseNN expects {expected}: a smaller pattern "
            "cannot be fitted soundly (padding would invent unmeasured frequencies); crop or bin the "
            f"detector to {expected}",
            reason="wrong_shape",
        )
    actions: list[FitAction] = []
    factors: list[int] = []
    oversampling = None
    intensity = np.asarray(amplitude, dtype=np.float64) ** 2
    for offset, n in enumerate(spatial):
        axis = intensity.ndim - dim + offset
        factor = n // size_px
        if n == size_px:
            actions.append(FitAction.KEEP)
            factors.append(1)
            continue
        if n % size_px == 0 and oversampling is None:
            oversampling = estimate_oversampling(amplitude, dim)
        if n % size_px == 0 and oversampling[offset] >= 2 * factor * BIN_OVERSAMPLING_MARGIN:
            intensity = _bin_axis(intensity, axis, factor)
            actions.append(FitAction.BIN)
            factors.append(factor)
        else:
            start = n // 2 - size_px // 2
            intensity = np.take(intensity, np.arange(start, start + size_px), axis=axis)
            actions.append(FitAction.CROP)
            factors.append(1)
    fit = PatternFit(tuple(amplitude.shape), tuple(actions), tuple(factors))
    return np.sqrt(intensity).astype(np.float32), fit


def apply_fit(amplitude: np.ndarray, fit: PatternFit, size_px: int = INPUT_SIZE_PX) -> np.ndarray:
    """Bring more patterns to the network's grid exactly as ``fit`` (from :func:`fit_pattern`) did.

    A live scan fixes its fit on the first frames, so that every frame's object pixel is the same; a
    pattern of another shape is refused with the shape the fit expects.
    """
    dim = len(fit.actions)
    expected = fit.input_shape[-dim:]
    if tuple(amplitude.shape[-dim:]) != tuple(expected):
        raise FrameValidationError(
            f"pattern has shape {tuple(amplitude.shape[-dim:])} but this scan's frames were {expected}: "
            "the detector shape changed within the scan",
            reason="wrong_shape",
        )
    intensity = np.asarray(amplitude, dtype=np.float64) ** 2
    for offset, (action, factor) in enumerate(zip(fit.actions, fit.bin_factors, strict=True)):
        axis = intensity.ndim - dim + offset
        n = intensity.shape[axis]
        if action is FitAction.BIN:
            intensity = _bin_axis(intensity, axis, factor)
        elif action is FitAction.CROP:
            start = n // 2 - size_px // 2
            intensity = np.take(intensity, np.arange(start, start + size_px), axis=axis)
    return np.sqrt(intensity).astype(np.float32)


def fitted_probe(probe: np.ndarray, size_px: int = INPUT_SIZE_PX, bin_factor: int = 1) -> np.ndarray:
    """The probe a network sees when an N-pixel detector is binned by ``bin_factor`` and then cropped to its
    central ``size_px`` pixels.

    Binning the far field by k keeps the object pixel and cuts the field of view to N / k (so the probe must
    fit in the central N / k pixels); a centred crop keeps the detector pixel and drops the high angles, so
    the object pixel grows by (N / k) / size_px and the probe is low-passed. Here: the central N / k pixels of
    the probe, its far field cut to the central ``size_px``², back in real space on the coarser grid (centred
    on pixel size_px // 2), Σ|P|² = 1. A 2D network for fitted frames is trained with this probe.
    """
    probe = np.asarray(probe)
    n = probe.shape[-1]
    field_px = n // bin_factor if bin_factor >= 1 else 0
    if probe.ndim != 2 or probe.shape[0] != n or field_px < size_px:
        raise ConfigError(
            f"probe has shape {probe.shape} and bin_factor={bin_factor}: pass a square probe of at least "
            f"{size_px} × bin_factor pixels"
        )
    first = n // 2 - field_px // 2
    field = probe[first : first + field_px, first : first + field_px].astype(np.complex128)
    start = field_px // 2 - size_px // 2
    spectrum = np.fft.fftshift(np.fft.fft2(field, norm="ortho"))
    window = spectrum[start : start + size_px, start : start + size_px]
    coarse = np.fft.ifft2(np.fft.ifftshift(window), norm="ortho")
    return (coarse / np.linalg.norm(coarse)).astype(np.complex64)


def validate_network_input(amplitude: np.ndarray, dim: int) -> None:
    """Raise FrameValidationError for a pattern the network must not see: wrong rank, complex, NaN, negative,
    zero everywhere, or saturated (a plateau of at least 3^dim pixels at the maximum, or an integer pattern
    at its type's maximum: the true peak is unknown, and the network would read a flat top as structure)."""
    if amplitude.ndim not in (dim, dim + 1):
        raise FrameValidationError(
            f"pattern has shape {amplitude.shape}: the {dim}D AutoPhaseNN takes one {dim}D pattern "
            f"or a batch (n, {', '.join(['size'] * dim)})",
            reason="wrong_shape",
        )
    if np.iscomplexobj(amplitude):
        raise FrameValidationError(
            "pattern is complex: pass the measured amplitude sqrt(I), a real array", reason="complex"
        )
    frames = amplitude.reshape(-1, *amplitude.shape[-dim:])
    for index, frame in enumerate(frames):
        where = f"frame {index}" if amplitude.ndim > dim else "pattern"
        if not np.isfinite(frame).all():
            raise FrameValidationError(
                f"{where} holds NaN or infinite values: replace or mask those pixels", reason="not_finite"
            )
        if (frame < 0).any():
            raise FrameValidationError(
                f"{where} holds negative values (minimum {frame.min()!r}): clip the background "
                "subtraction at 0",
                reason="negative",
            )
        peak = frame.max()
        if not peak > 0:
            raise FrameValidationError(
                f"{where} is zero everywhere: no diffraction was recorded; check the shutter and the "
                "detector",
                reason="zero_photons",
            )
        if np.issubdtype(frame.dtype, np.integer) and peak == np.iinfo(frame.dtype).max:
            raise FrameValidationError(
                f"{where} reaches {peak}, the maximum of {frame.dtype}: the detector saturated; "
                "attenuate the beam or mask the saturated pixels",
                reason="saturated",
            )
        plateau_px = int(np.count_nonzero(frame >= peak * (1 - 1e-6)))
        if plateau_px >= 3**dim:
            raise FrameValidationError(
                f"{where} has {plateau_px} pixels at its maximum {peak!r}: the detector saturated "
                "(or too few photons to resolve the peak); attenuate the beam or mask the saturated pixels",
                reason="saturated",
            )

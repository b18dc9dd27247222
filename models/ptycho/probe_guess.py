"""A first probe from the data alone: the bright field's amplitude with a defocus curvature, several sizes.

A focused beam (zone plate, KB mirrors) is used out of focus in ptychography so that the probe spans many
pixels. Its far field is the bright field (a disc, a ring behind a zone plate's central stop, a rectangle
behind KB mirrors) with a quadratic phase exp(±i c k²); a probe built without that curvature (the usual
sqrt(mean pattern) start) is a tight focus and ePIE then needs hundreds of epochs to grow it. Geometric
optics fixes c from the probe diameter D and the bright field's outer half-width K on the detector (both
in pixels of an N-pixel window): a ray at spatial frequency k lands at x = N c k / π, so D = 2 N c K / π.
Sign +1 (exp(+i c k²)) is a converging beam, the sample upstream of the focus; −1 a diverging one.

The mean pattern fixes the amplitude but not the defocus: for a sample whose statistics do not change
over the scan it is |FFT P|² convolved with the sample's power spectrum, and |FFT P|² is the same at every
defocus. The frames and their positions do fix it. Out of focus, the bright field of each frame is a
magnified shadow image of the illuminated sample: detector pixel k sees the sample point k D / (2 K)
object pixels from the probe centre (downstream of the focus; mirrored upstream). Moving the probe by δ
object pixels therefore shifts the shadow by g δ detector pixels, g = ±2K / D, and the shift between
neighbouring frames gives both the diameter and the sign (:func:`shadow_shift_diameter_px`).

:func:`probe_candidates` builds the starts to try: the in-focus probe, and both signs at a few diameters
around that estimate (or spread over the window when there are no frames, or no shadow moves, as for a
focus). Detector pixels that measured nothing (mask, module gaps, beam stop, hot pixels) are filled in the
mean pattern by harmonic interpolation from their neighbours, and a flat background is subtracted before
the square root. :func:`choose_probe` runs a trial on each and keeps the one with the lowest error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from phasestream.errors import ConfigError, FrameValidationError

# Fraction of the peak amplitude that counts as inside the bright field: high enough that the sample's
# scattering outside the direct beam (a few per cent of its amplitude) is not counted.
BRIGHT_FIELD_THRESHOLD = 0.3
# The bright field's half-width along an axis is this percentile of |y| (or |x|) over its pixels: robust
# to a few noisy pixels above the threshold, and 0.96 of the radius for a disc, 0.98 of a rectangle's.
BRIGHT_FIELD_EXTENT_PERCENTILE = 98.0
# Probe diameters tried when the frames give no estimate, as fractions of the window: a factor of about 1.6
# apart, close enough that one of them starts ePIE in the right basin.
DIAMETER_FRACTIONS = (0.1, 0.17, 0.28, 0.45, 0.7)
# Diameters tried around the estimate from the frames, as factors: it is good to about 15 %, and a start
# within 30 % of the truth converges as well as the truth.
DIAMETER_FACTORS = (0.7, 1.0, 1.4)
# Diameters searched for the shadow shift, as fractions of the window: below 5 % the shift between
# neighbours exceeds half the window; an estimate at the top means no shadow moved (a focus).
SHIFT_SEARCH_FRACTIONS = tuple(np.geomspace(0.05, 0.85, 60))
# Neighbours each frame is paired with for the shadow shift, and the frames used (the first ones): a
# few dozen pairs give the shift to a few per cent.
SHIFT_NEIGHBOURS = 3
SHIFT_MAX_FRAMES = 48
# Below this mean correlation of the shifted shadows the estimate is noise.
MIN_SHIFT_CORRELATION = 0.1
# The background is this percentile of the measured pixels of the mean pattern: the darkest pixels hold
# background and almost no scattering.
BACKGROUND_PERCENTILE = 2.0
# A pixel whose mean exceeds this multiple of its neighbours' median is hot: a bright field's soft edge
# changes by far less from one pixel to the next.
HOT_PIXEL_FACTOR = 20.0
# Harmonic filling: Jacobi sweeps until no filled pixel changes by more than this fraction of the peak.
FILL_TOLERANCE = 1e-4
FILL_MAX_SWEEPS = 5000


@dataclass(frozen=True)
class ProbeCandidate:
    """A start probe (complex64, centred on pixel N // 2, power = the mean counts less background) and why."""

    label: str
    probe: np.ndarray
    reason: str


@dataclass(frozen=True)
class BrightField:
    """The direct beam on the detector: its amplitude (masked pixels filled) and outer half-widths."""

    amplitude: np.ndarray
    half_width_px: tuple[float, float]  # (y, x) from pixel N // 2
    background_counts: float

    @property
    def outer_half_width_px(self) -> float:
        return max(self.half_width_px)


def estimate_background_counts(mean_intensity: np.ndarray, unmeasured: np.ndarray | None = None) -> float:
    """Flat background per pixel: a low percentile of the measured pixels of the mean pattern.

    The darkest pixels (the far corners) hold the background plus the sample's weakest scattering, so the
    estimate errs high by that scattering (a few counts for a strongly scattering sample); subtracting it
    removes the pedestal that sqrt(mean pattern) would turn into a spike at the probe's centre.
    """
    intensity = np.asarray(mean_intensity, dtype=np.float64)
    measured = ~_unmeasured_or_none(unmeasured, intensity.shape)
    if not measured.any():
        raise FrameValidationError("every detector pixel is masked as unmeasured: check the detector mask")
    return float(np.percentile(intensity[measured], BACKGROUND_PERCENTILE))


def hot_pixels(mean_intensity: np.ndarray, unmeasured: np.ndarray | None = None) -> np.ndarray:
    """Pixels far brighter than the measured pixels around them (bool): hot pixels a detector mask missed."""
    intensity = np.asarray(mean_intensity, dtype=np.float64)
    measured = np.where(_unmeasured_or_none(unmeasured, intensity.shape), np.nan, intensity)
    padded = np.pad(measured, 1, mode="constant", constant_values=np.nan)
    n_y, n_x = intensity.shape
    neighbours = np.stack(
        [
            padded[1 + dy : 1 + dy + n_y, 1 + dx : 1 + dx + n_x]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if dy or dx
        ]
    )
    # A pixel with no measured neighbour cannot be judged: never call it hot.
    neighbours[:, np.isnan(neighbours).all(axis=0)] = np.inf
    local = np.nanmedian(neighbours, axis=0)
    floor = np.nanmedian(measured) + 1.0  # a count above the typical pixel: not a noisy dark pixel
    return intensity > HOT_PIXEL_FACTOR * np.maximum(local, floor)


def filled_mean_pattern(
    mean_intensity: np.ndarray, unmeasured: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """The mean pattern less its background, unmeasured (and hot) pixels filled; and that background.

    Filling solves Laplace's equation over the unmeasured pixels with the measured ones as boundary: an
    isolated pixel gets its neighbours' mean, a gap is bridged linearly, and a beam stop is filled from its
    rim (dark behind a zone plate's central stop, bright for a full pupil).
    """
    intensity = np.asarray(mean_intensity, dtype=np.float64)
    if intensity.ndim != 2:
        raise FrameValidationError(f"mean_intensity has shape {intensity.shape}: pass one 2D mean pattern")
    unmeasured = _unmeasured_or_none(unmeasured, intensity.shape)
    missing = unmeasured | hot_pixels(intensity, unmeasured)
    background = estimate_background_counts(intensity, missing)
    filled = np.clip(intensity - background, 0, None)
    if not filled[~missing].max() > 0:
        raise FrameValidationError("the mean pattern is flat: no direct beam reached the measured pixels")
    return _harmonic_fill(filled, missing), background


def bright_field(mean_intensity: np.ndarray, unmeasured: np.ndarray | None = None) -> BrightField:
    """The direct beam's amplitude and outer half-widths, measured from pixel N // 2 along y and x."""
    filled, background = filled_mean_pattern(mean_intensity, unmeasured)
    amplitude = np.sqrt(filled)
    # The edge is where the intensity falls to half the bright field's typical (median) level: where
    # the optic's aperture is, whatever blurs it.
    level = np.median(amplitude[amplitude >= BRIGHT_FIELD_THRESHOLD * amplitude.max()])
    rows, columns = np.nonzero(amplitude >= level / np.sqrt(2))
    n_y, n_x = amplitude.shape
    half_widths = (
        float(np.percentile(np.abs(rows - n_y // 2), BRIGHT_FIELD_EXTENT_PERCENTILE)) + 0.5,
        float(np.percentile(np.abs(columns - n_x // 2), BRIGHT_FIELD_EXTENT_PERCENTILE)) + 0.5,
    )
    return BrightField(amplitude, half_widths, background)


def defocused_probe(field: BrightField, diameter_px: float, sign: int = 1) -> np.ndarray:
    """Probe (complex64, centred on pixel N // 2) whose far field is the bright field times exp(±i c k²).

    c = π D / (2 N K) with K the bright field's outer half-width: D is the probe's geometric diameter
    along the bright field's wider axis (narrower along the other, as one defocus of a KB focus gives).
    """
    n_y, n_x = field.amplitude.shape
    k_y, k_x = np.meshgrid(np.arange(n_y) - n_y // 2, np.arange(n_x) - n_x // 2, indexing="ij")
    curvature = np.pi * diameter_px / (2 * n_x * field.outer_half_width_px)
    spectrum = field.amplitude * np.exp(1j * sign * curvature * (k_y**2 + k_x**2))
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectrum), norm="ortho"))
    return probe.astype(np.complex64)


@dataclass(frozen=True)
class ShadowShift:
    """What the shadow shift between neighbouring frames says about the probe."""

    diameter_px: float
    sign: int  # +1 converging (sample upstream of the focus), −1 diverging
    correlation: float  # mean correlation of the shadows at that shift, in [−1, 1]
    pairs: int


def shadow_shift_diameter_px(
    patterns: np.ndarray, positions_px: np.ndarray, field: BrightField, unmeasured: np.ndarray | None = None
) -> ShadowShift:
    """The probe diameter and defocus sign whose shadow shift best explains neighbouring frames.

    Each frame's bright field, divided by the mean pattern (which removes the pupil's envelope), is
    correlated with its nearest neighbours'; the correlation, normalised by the overlap of the two
    bright fields at each shift, is read at g δ for every pair and averaged, and the g = ±2K / D with the
    highest mean wins.
    """
    frames = np.asarray(patterns, dtype=np.float64)[:SHIFT_MAX_FRAMES]
    positions = np.asarray(positions_px, dtype=np.float64)[:SHIFT_MAX_FRAMES]
    if frames.ndim != 3 or positions.shape != (len(frames), 2) or len(frames) < 2:
        raise FrameValidationError(
            f"patterns {np.shape(patterns)} and positions_px {np.shape(positions_px)}: pass at least two "
            "frames (n, ny, nx) and their (n, 2) positions (y, x) in object pixels"
        )
    mean = frames.mean(axis=0)
    unmeasured = _unmeasured_or_none(unmeasured, mean.shape)
    inside = (field.amplitude >= BRIGHT_FIELD_THRESHOLD * field.amplitude.max()) & ~(
        unmeasured | hot_pixels(mean, unmeasured)
    )
    shadows = np.where(inside, frames / np.maximum(mean, np.finfo(float).tiny), 0.0)
    # Zero mean per frame: a frame's overall transmission is no shadow and would favour zero shift.
    shadows = np.where(inside, shadows - shadows.sum(axis=(1, 2), keepdims=True) / inside.sum(), 0.0)
    spectra = np.fft.fft2(shadows)
    norms = np.sqrt(np.sum(shadows**2, axis=(1, 2)))
    window = np.fft.fft2(inside.astype(np.float64))
    overlap = np.fft.ifft2(window * np.conj(window)).real
    per_overlap = overlap[0, 0] / np.maximum(overlap, 0.2 * overlap[0, 0])
    width = frames.shape[-1]
    signs = np.repeat([1, -1], len(SHIFT_SEARCH_FRACTIONS))
    diameters_px = np.tile(SHIFT_SEARCH_FRACTIONS, 2) * width
    # Downstream of the focus (sign −1) the shadow moves with the probe: g > 0.
    gains = -signs * 2 * field.outer_half_width_px / diameters_px
    first, second = _neighbour_pairs(positions)
    scores = np.zeros(len(gains))
    for one, other in zip(first, second, strict=True):
        # correlation(u) = Σ_x shadow_one(x + u) shadow_other(x): peaks at u = g (other − one position).
        correlation = np.fft.ifft2(spectra[one] * np.conj(spectra[other])).real * per_overlap
        correlation /= max(norms[one] * norms[other], np.finfo(float).tiny)
        scores += _periodic_bilinear(correlation, gains[:, None] * (positions[other] - positions[one]))
    best = int(np.argmax(scores))
    return ShadowShift(
        float(diameters_px[best]), int(signs[best]), float(scores[best] / len(first)), len(first)
    )


def probe_candidates(
    mean_intensity: np.ndarray,
    unmeasured: np.ndarray | None = None,
    *,
    patterns: np.ndarray | None = None,
    positions_px: np.ndarray | None = None,
) -> list[ProbeCandidate]:
    """The starts worth a trial: in focus, and both defocus signs at diameters around the estimate.

    ``unmeasured`` is a detector mask (True = not measured), centred like the patterns. With ``patterns``
    and their ``positions_px`` (probe positions or window corners (n, 2) (y, x) in object pixels; a few
    dozen neighbouring frames are plenty) the diameters surround the shadow-shift estimate; without them,
    or when no shadow moves, they spread over the window.
    """
    field = bright_field(mean_intensity, unmeasured)
    shape = (
        f"bright field {2 * field.half_width_px[0]:.0f}×{2 * field.half_width_px[1]:.0f} px, "
        f"background {field.background_counts:.2g} counts/px subtracted"
    )
    candidates = [
        ProbeCandidate(
            "in focus", defocused_probe(field, 0.0), f"sqrt of the mean pattern, flat phase; {shape}"
        )
    ]
    for diameter, sign, source in _sizes_to_try(field, unmeasured, patterns, positions_px):
        label = f"{'converging' if sign > 0 else 'diverging'}, diameter {diameter:.0f} px"
        candidates.append(ProbeCandidate(label, defocused_probe(field, diameter, sign), f"{source}; {shape}"))
    return candidates


def _sizes_to_try(
    field: BrightField,
    unmeasured: np.ndarray | None,
    patterns: np.ndarray | None,
    positions_px: np.ndarray | None,
) -> list[tuple[float, int, str]]:
    """(diameter, sign, why) of each defocused candidate: around the shadow-shift estimate, else spread."""
    width = field.amplitude.shape[-1]
    spread = "no frames with positions to estimate it from"
    if patterns is not None and positions_px is not None:
        shift = shadow_shift_diameter_px(patterns, positions_px, field, unmeasured)
        found = f"the {shift.diameter_px:.0f} px that {shift.pairs} neighbour pairs' shadow shift gives"
        if shift.correlation < MIN_SHIFT_CORRELATION:
            spread = f"{found} has correlation {shift.correlation:.2f}, too weak to trust"
        elif shift.diameter_px >= SHIFT_SEARCH_FRACTIONS[-1] * width:
            spread = "no shadow moves between neighbours (a focus or a probe wider than the window)"
        else:
            side = "converging" if shift.sign > 0 else "diverging"
            found = f"{found} (correlation {shift.correlation:.2f}, {side})"
            estimated = [
                (
                    factor * shift.diameter_px,
                    sign,
                    f"{factor:g} × {found}{'' if sign == shift.sign else '; sign flipped'}",
                )
                for sign in (shift.sign, -shift.sign)
                for factor in DIAMETER_FACTORS
            ]
            # A grid's first rows can fool the size (3 px for a 24 px probe was seen) while the side of
            # the focus stays right: the spread on that side stays in the running, and the trials decide.
            beside = "the spread over the window on the estimated side"
            return estimated + _spread(width, beside, (shift.sign,), estimated)
    return _spread(width, spread, (1, -1), [])


def _spread(
    width: int, why: str, signs: tuple[int, ...], already: list[tuple[float, int, str]]
) -> list[tuple[float, int, str]]:
    """Diameters over the window, leaving out those within 15 % of one already tried with that sign."""
    return [
        (fraction * width, sign, f"{fraction:.0%} of the window: {why}")
        for fraction in DIAMETER_FRACTIONS
        for sign in signs
        if not any(s == sign and abs(d - fraction * width) < 0.15 * d for d, s, _ in already)
    ]


def choose_probe(
    candidates: Sequence[ProbeCandidate], trial_error: Callable[[np.ndarray], float]
) -> tuple[ProbeCandidate, list[tuple[str, float]]]:
    """The candidate with the lowest ``trial_error`` (a few epochs on the first patterns), and every score."""
    if not candidates:
        raise ConfigError("no probe candidates to choose from: pass at least one")
    scores = [(candidate.label, float(trial_error(candidate.probe))) for candidate in candidates]
    errors = np.array([error for _, error in scores])
    if not np.isfinite(errors).any():
        raise FrameValidationError(
            f"every probe trial diverged ({scores}): check the frames' scaling and the detector mask"
        )
    best = int(np.nanargmin(np.where(np.isfinite(errors), errors, np.nan)))
    return candidates[best], scores


def _unmeasured_or_none(unmeasured: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if unmeasured is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(unmeasured, dtype=bool)
    if mask.shape != shape:
        raise FrameValidationError(
            f"the unmeasured-pixel mask has shape {mask.shape} but the patterns are {shape}: pass the "
            "detector mask of the (binned) frames"
        )
    return mask


def _neighbour_pairs(positions_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (first < second) joining each position to its nearest neighbours, each pair once."""
    distance = np.linalg.norm(positions_px[:, None] - positions_px[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1)[:, : min(SHIFT_NEIGHBOURS, len(positions_px) - 1)]
    own = np.repeat(np.arange(len(positions_px)), nearest.shape[1])
    pairs = np.unique(np.sort(np.stack([own, nearest.ravel()], axis=1), axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _periodic_bilinear(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``image`` at the fractional points (m, 2) (y, x), bilinear, wrapping around the edges."""
    n_y, n_x = image.shape
    y, x = points[:, 0] % n_y, points[:, 1] % n_x
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    y1, x1 = (y0 + 1) % n_y, (x0 + 1) % n_x
    return (
        image[y0, x0] * (1 - fy) * (1 - fx)
        + image[y1, x0] * fy * (1 - fx)
        + image[y0, x1] * (1 - fy) * fx
        + image[y1, x1] * fy * fx
    )


def _harmonic_fill(image: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """``image`` with the ``missing`` pixels replaced by the solution of Laplace's equation (Jacobi)."""
    if not missing.any():
        return image
    filled = image.copy()
    filled[missing] = np.mean(image[~missing])
    tolerance = FILL_TOLERANCE * image[~missing].max()
    for _ in range(FILL_MAX_SWEEPS):
        padded = np.pad(filled, 1, mode="edge")
        neighbours = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]) / 4
        change = np.max(np.abs(neighbours[missing] - filled[missing]))
        filled[missing] = neighbours[missing]
        if change < tolerance:
            break
    return filled

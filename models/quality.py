"""Figures of merit for reconstructions (NumPy): alignment, errors, PSNR, FRC, Fourier R-factor.

A phase-retrieval result is defined only up to a global phase and a translation; with probe retrieval
also up to a complex scale and a linear phase ramp, which object and probe share. Errors against a known
truth are taken after removing these (:func:`aligned_error`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from phasestream.errors import ConfigError

REGISTRATION_REFINE_REGION_PX = 1.5
"""Guizar-Sicairos et al. refine the coarse peak over a 1.5 × 1.5 pixel neighbourhood."""

_NEIGHBOUR_DIRECTIONS = np.array(
    [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], dtype=float
)


def _check_same_shape(first: np.ndarray, second: np.ndarray, names: str) -> None:
    if first.shape != second.shape:
        raise ConfigError(f"{names} have shapes {first.shape} and {second.shape}: crop them to one shape")


def _mask_or_all(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape:
        raise ConfigError(f"mask has shape {mask.shape} but the images are {shape}: pass a matching mask")
    if not mask.any():
        raise ConfigError("mask selects no pixel: lower the illumination threshold that made it")
    return mask


def remove_global_phase(
    estimate: np.ndarray, reference: np.ndarray | None = None, mask: np.ndarray | None = None
) -> np.ndarray:
    """Multiply ``estimate`` by the constant phase factor e^{iφ} that best matches it to ``reference``.

    φ = arg Σ_mask conj(estimate)·reference minimises ‖e^{iφ} estimate − reference‖ over the mask. Without a
    reference, φ makes Σ_mask estimate real and positive (a mean phase of zero).
    """
    estimate = np.asarray(estimate)
    selected = _mask_or_all(mask, estimate.shape)
    if reference is None:
        phase_rad = -np.angle(np.sum(estimate[selected]))
    else:
        reference = np.asarray(reference)
        _check_same_shape(estimate, reference, "estimate and reference")
        phase_rad = np.angle(np.vdot(estimate[selected], reference[selected]))
    return estimate * np.exp(1j * phase_rad)


def fourier_shift(image: np.ndarray, shift_px: tuple[float, float] | np.ndarray) -> np.ndarray:
    """Translate ``image`` by ``shift_px`` (y, x), sub-pixel, periodically: out(r) = image(r − shift)."""
    image = np.asarray(image)
    shifted = np.fft.ifft2(np.fft.fft2(image) * _shift_theorem_ramp(image.shape, shift_px))
    return shifted if np.iscomplexobj(image) else shifted.real


def _shift_theorem_ramp(shape: tuple[int, ...], shift_px: tuple[float, float] | np.ndarray) -> np.ndarray:
    """exp(−2πi (f_y s_y + f_x s_x)), built from two 1D factors: multiplying a spectrum by it shifts by s."""
    ramp_y = np.exp(-2j * np.pi * np.fft.fftfreq(shape[0]) * shift_px[0])
    ramp_x = np.exp(-2j * np.pi * np.fft.fftfreq(shape[1]) * shift_px[1])
    return ramp_y[:, None] * ramp_x[None, :]


def _signed_frequency_index(n: int) -> np.ndarray:
    """Integer DFT frequencies in FFT order: 0, 1, …, −1."""
    return np.fft.fftfreq(n) * n


def _cross_correlation_at(spectrum_product: np.ndarray, shifts_y_px: np.ndarray, shifts_x_px: np.ndarray):
    """Cross-correlation at arbitrary (sub-pixel) shifts by matrix-multiply DFTs (the paper's "dftups").

    Only the few hundred points of the refinement region are computed, instead of an FFT of the whole
    array padded ``upsample_factor`` times.
    """
    n_y, n_x = spectrum_product.shape
    kernel_y = np.exp(2j * np.pi * shifts_y_px[:, None] * _signed_frequency_index(n_y)[None, :] / n_y)
    kernel_x = np.exp(2j * np.pi * _signed_frequency_index(n_x)[:, None] * shifts_x_px[None, :] / n_x)
    return kernel_y @ spectrum_product @ kernel_x


def _signed_peak_px(score: np.ndarray) -> np.ndarray:
    """Position (y, x) of the maximum of a circular correlation score, as a signed shift in pixels."""
    peak = np.array(np.unravel_index(np.argmax(score), score.shape), dtype=np.float64)
    shape = np.array(score.shape)
    return np.where(peak > shape // 2, peak - shape, peak)


def register_translation(reference: np.ndarray, moving: np.ndarray, upsample_factor: int = 100) -> np.ndarray:
    """Sub-pixel shift (y, x) to apply to ``moving`` (with :func:`fourier_shift`) to align it with
    ``reference``, to 1/``upsample_factor`` pixel.

    M. Guizar-Sicairos, S. T. Thurman and J. R. Fienup, "Efficient subpixel image registration
    algorithms", Opt. Lett. 33, 156-158 (2008): the peak of the FFT cross-correlation gives the shift to
    a pixel; an upsampled DFT over a 1.5-pixel neighbourhood of that peak refines it.
    """
    reference = np.asarray(reference)
    moving = np.asarray(moving)
    _check_same_shape(reference, moving, "reference and moving")
    if upsample_factor < 1:
        raise ConfigError(f"upsample_factor={upsample_factor!r} must be at least 1")
    spectrum_product = np.fft.fft2(reference) * np.conj(np.fft.fft2(moving))
    coarse_px = _signed_peak_px(np.abs(np.fft.ifft2(spectrum_product)))
    if upsample_factor == 1:
        return coarse_px
    region_points = int(np.ceil(upsample_factor * REGISTRATION_REFINE_REGION_PX))
    offsets_px = (np.arange(region_points) - region_points // 2) / upsample_factor
    candidates_y_px = coarse_px[0] + offsets_px
    candidates_x_px = coarse_px[1] + offsets_px
    refined = np.abs(_cross_correlation_at(spectrum_product, candidates_y_px, candidates_x_px))
    best_y, best_x = np.unravel_index(np.argmax(refined), refined.shape)
    return np.array([candidates_y_px[best_y], candidates_x_px[best_x]])


def _best_integer_shift_px(
    estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray, fit_amplitude: bool
) -> np.ndarray:
    """Whole-pixel shift s minimising min_c ‖c · estimate(r − s) − truth(r)‖ over the mask.

    Registering two masked images would let the shared mask edge pull the peak to zero shift (seen on
    ePIE results whose object and probe drifted by a pixel together). Instead, with X(s) = Σ_mask
    estimate(r − s) conj(truth(r)) and D(s) = Σ_mask |estimate(r − s)|², the error is
    ‖truth‖² − |X|²/D for a free complex c and ‖truth‖² + D − 2|X| for a pure phase; X and D are
    correlations, so one FFT each gives them for every whole-pixel shift.
    """
    cross = np.fft.ifft2(np.fft.fft2(truth * mask) * np.conj(np.fft.fft2(estimate)))
    energy = np.fft.ifft2(np.fft.fft2(mask) * np.conj(np.fft.fft2(np.abs(estimate) ** 2))).real
    energy = np.maximum(energy, np.finfo(float).tiny)
    score = np.abs(cross) ** 2 / energy if fit_amplitude else 2 * np.abs(cross) - energy
    return _signed_peak_px(score)


def _minimise_over_shift(
    error_at: Callable[[np.ndarray], float], start_px: np.ndarray, finest_step_px: float
) -> float:
    """Pattern search: move to the best of the 8 neighbours while that helps, then halve the step.

    The error of a Fourier-shifted image is smooth in the shift, and evaluating it exactly (one FFT
    pair per candidate) avoids the bias that interpolating D(s) below a pixel has near hard edges.
    """
    best_px = np.asarray(start_px, dtype=np.float64)
    best_error = error_at(best_px)
    step_px = 0.5
    while step_px >= finest_step_px:
        moved = True
        while moved:
            moved = False
            for direction in _NEIGHBOUR_DIRECTIONS:
                candidate_px = best_px + step_px * direction
                candidate_error = error_at(candidate_px)
                if candidate_error < best_error:
                    best_px, best_error, moved = candidate_px, candidate_error, True
        step_px /= 2
    return best_error


def _phase_ramp(ratio: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """e^{i q·r} with q the mean phase step per pixel of ``ratio`` along y and x inside the mask.

    Averaging neighbour products ratio(r + 1) conj(ratio(r)) needs no phase unwrapping and weights each
    step by the amplitudes, so dark pixels count little; it holds for ramps below π per pixel.
    """
    pairs_y = mask[1:, :] & mask[:-1, :]
    pairs_x = mask[:, 1:] & mask[:, :-1]
    step_y_rad = np.angle(np.sum((ratio[1:, :] * np.conj(ratio[:-1, :]))[pairs_y]))
    step_x_rad = np.angle(np.sum((ratio[:, 1:] * np.conj(ratio[:, :-1]))[pairs_x]))
    rows, cols = np.indices(ratio.shape)
    return np.exp(1j * (step_y_rad * rows + step_x_rad * cols))


def aligned_error(
    estimate: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    fit_amplitude: bool = False,
    remove_phase_ramp: bool = False,
    shift_precision_px: float = 0.01,
) -> float:
    """Normalised RMS error after alignment: min over φ and shift of ‖e^{iφ}·shift(est) − truth‖ / ‖truth‖.

    The norms run over ``mask`` (the well-illuminated region; default everything). The shift minimises
    this masked error itself, to ``shift_precision_px``, rather than coming from a plain registration.
    Ptychography with probe retrieval leaves two more exact ambiguities, which the options remove:
    ``fit_amplitude`` turns e^{iφ} into any complex scalar c (object c·O with probe P/c), and
    ``remove_phase_ramp`` a linear phase e^{i q·r} (object O·e^{i q·r} with probe P·e^{−i q·r}).
    """
    estimate = np.asarray(estimate)
    truth = np.asarray(truth)
    _check_same_shape(estimate, truth, "estimate and truth")
    if not 0 < shift_precision_px <= 1:
        raise ConfigError(f"shift_precision_px={shift_precision_px!r} must be in (0, 1] pixel")
    selected = _mask_or_all(mask, truth.shape)
    target = truth[selected]

    estimate_spectrum = np.fft.fft2(estimate)

    def error_at(shift_px: np.ndarray) -> float:
        aligned = np.fft.ifft2(estimate_spectrum * _shift_theorem_ramp(estimate.shape, shift_px))
        error = _residual_after_scalar_fit(aligned[selected], target, fit_amplitude)
        if remove_phase_ramp:
            # The ramp estimate is a heuristic, not a least-squares fit: it is kept only where it helps.
            deramped = aligned * np.conj(_phase_ramp(aligned * np.conj(truth), selected))
            error = min(error, _residual_after_scalar_fit(deramped[selected], target, fit_amplitude))
        return error

    start_px = _best_integer_shift_px(estimate, truth, selected, fit_amplitude)
    return _minimise_over_shift(error_at, start_px, shift_precision_px)


def _residual_after_scalar_fit(aligned: np.ndarray, target: np.ndarray, fit_amplitude: bool) -> float:
    """‖c·aligned − target‖ / ‖target‖ with the best c: complex, or of modulus one."""
    overlap = np.vdot(aligned, target)
    if fit_amplitude:
        factor = overlap / max(np.vdot(aligned, aligned).real, np.finfo(float).tiny)
    else:
        factor = np.exp(1j * np.angle(overlap))
    return float(np.linalg.norm(factor * aligned - target) / np.linalg.norm(target))


def psnr(estimate: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(range² / mean|estimate − truth|²).

    ``data_range`` defaults to max|truth|. Remove the ambiguities first (:func:`remove_global_phase`,
    :func:`register_translation`).
    """
    estimate = np.asarray(estimate)
    truth = np.asarray(truth)
    _check_same_shape(estimate, truth, "estimate and truth")
    peak = float(np.max(np.abs(truth))) if data_range is None else float(data_range)
    if not peak > 0:
        raise ConfigError(f"data_range={peak!r} must be positive: pass data_range for an all-zero truth")
    mean_squared_error = float(np.mean(np.abs(estimate - truth) ** 2))
    if mean_squared_error == 0:
        return float("inf")
    return 10 * np.log10(peak**2 / mean_squared_error)


class FrcThreshold(StrEnum):
    HALF_BIT = "half_bit"
    ONE_SEVENTH = "one_seventh"


@dataclass(frozen=True)
class FrcCurve:
    """Fourier ring correlation per ring, from the zero frequency up to Nyquist."""

    frequency_per_px: np.ndarray
    """Ring centre in cycles per pixel (0 … 0.5)."""
    correlation: np.ndarray
    n_pixels: np.ndarray
    """Fourier pixels in each ring, for the thresholds."""


def frc(image_a: np.ndarray, image_b: np.ndarray) -> FrcCurve:
    """Fourier ring correlation Re Σ_ring A·conj(B) / sqrt(Σ_ring |A|² Σ_ring |B|²) of two 2D images.

    Rings are one Fourier pixel wide (of the shorter axis). Compare two independent reconstructions of the
    same region, aligned first; a window (e.g. Hann) against edge artefacts is the caller's choice.
    """
    image_a = np.asarray(image_a)
    image_b = np.asarray(image_b)
    _check_same_shape(image_a, image_b, "image_a and image_b")
    if image_a.ndim != 2:
        raise ConfigError(f"frc() takes 2D images, got shape {image_a.shape}")
    n_y, n_x = image_a.shape
    n_short = min(n_y, n_x)
    radius = np.hypot(np.fft.fftfreq(n_y)[:, None], np.fft.fftfreq(n_x)[None, :]) * n_short
    ring = np.rint(radius).astype(np.int64).ravel()
    n_rings = n_short // 2 + 1
    inside = ring < n_rings
    ring = ring[inside]
    spectrum_a = np.fft.fft2(image_a).ravel()[inside]
    spectrum_b = np.fft.fft2(image_b).ravel()[inside]
    cross = np.bincount(ring, (spectrum_a * np.conj(spectrum_b)).real, n_rings)
    power_a = np.bincount(ring, np.abs(spectrum_a) ** 2, n_rings)
    power_b = np.bincount(ring, np.abs(spectrum_b) ** 2, n_rings)
    denominator = np.sqrt(power_a * power_b)
    correlation = np.divide(cross, denominator, out=np.zeros(n_rings), where=denominator > 0)
    return FrcCurve(np.arange(n_rings) / n_short, correlation, np.bincount(ring, minlength=n_rings))


def half_bit_threshold(n_pixels_in_ring: np.ndarray | float) -> np.ndarray:
    """Half-bit information curve, T = (0.2071 + 1.9102/√n) / (1.2071 + 0.9102/√n).

    M. van Heel and M. Schatz, "Fourier shell correlation threshold criteria", J. Struct. Biol. 151,
    250-262 (2005). T(1) = 1 exactly and T → 0.2071/1.2071 ≈ 0.1716 for large rings.
    """
    inverse_sqrt_n = 1 / np.sqrt(np.asarray(n_pixels_in_ring, dtype=np.float64))
    return (0.2071 + 1.9102 * inverse_sqrt_n) / (1.2071 + 0.9102 * inverse_sqrt_n)


def one_seventh_threshold(n_pixels_in_ring: np.ndarray | float) -> np.ndarray:
    """The fixed 1/7 ≈ 0.143 criterion (Rosenthal and Henderson, J. Mol. Biol. 333, 721 (2003)), per ring."""
    return np.full(np.shape(n_pixels_in_ring), 1 / 7)


_THRESHOLDS = {FrcThreshold.HALF_BIT: half_bit_threshold, FrcThreshold.ONE_SEVENTH: one_seventh_threshold}


def frc_resolution(curve: FrcCurve, threshold: FrcThreshold = FrcThreshold.HALF_BIT) -> float:
    """Full-period resolution in pixels, 1 / f, at the first ring where the FRC falls below the threshold.

    The crossing is interpolated linearly between rings. Returns 2 px (Nyquist) when the FRC never falls
    below the threshold and ``inf`` when it is below it from the first ring on. Multiply by the pixel size
    for metres.
    """
    margin = curve.correlation - _THRESHOLDS[FrcThreshold(threshold)](curve.n_pixels)
    below = np.flatnonzero(margin[1:] < 0) + 1
    if len(below) == 0:
        return 1 / curve.frequency_per_px[-1] if curve.frequency_per_px[-1] > 0 else float("inf")
    ring = below[0]
    fraction = margin[ring - 1] / (margin[ring - 1] - margin[ring])
    frequency = curve.frequency_per_px[ring - 1] + fraction * (
        curve.frequency_per_px[ring] - curve.frequency_per_px[ring - 1]
    )
    return float(1 / frequency) if frequency > 0 and margin[ring - 1] >= 0 else float("inf")


def fourier_r_factor(measured_intensity: np.ndarray, model_intensity: np.ndarray) -> float:
    """R = Σ |sqrt(I_measured) − sqrt(I_model)| / Σ sqrt(I_measured), over all patterns and pixels."""
    measured_intensity = np.asarray(measured_intensity, dtype=np.float64)
    model_intensity = np.asarray(model_intensity, dtype=np.float64)
    _check_same_shape(measured_intensity, model_intensity, "measured_intensity and model_intensity")
    measured_amplitude = np.sqrt(np.clip(measured_intensity, 0, None))
    total = measured_amplitude.sum()
    if not total > 0:
        raise ConfigError("measured_intensity holds no counts: the R-factor is undefined for empty patterns")
    difference = np.abs(measured_amplitude - np.sqrt(np.clip(model_intensity, 0, None))).sum()
    return float(difference / total)

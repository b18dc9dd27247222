"""Structural similarity (SSIM) of two real images, 2D or 3D.

Reference: Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality assessment: from error
visibility to structural similarity", IEEE Trans. Image Process. 13, 600-612 (2004), eq. (13): with local
means μ, variances σ² and covariance σ_xy weighted by a Gaussian window (σ = 1.5 px, as in the paper),

    SSIM(x, y) = (2 μ_x μ_y + C1)(2 σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2)),

C1 = (K1 L)², C2 = (K2 L)², K1 = 0.01, K2 = 0.03, L the data range; the score is the mean over the image.
Only windows that lie wholly inside the image count (no padding), so no border value is invented.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from phasestream.errors import ConfigError

SSIM_SIGMA_PX = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
_WINDOW_RADIUS_PX = 5
"""The Gaussian is cut at 5 px ≈ 3.3 σ (an 11-px window, the paper's)."""


def _gaussian_window() -> np.ndarray:
    offsets = np.arange(-_WINDOW_RADIUS_PX, _WINDOW_RADIUS_PX + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / SSIM_SIGMA_PX) ** 2)
    return weights / weights.sum()


def _local_mean(image: np.ndarray) -> np.ndarray:
    """Separable Gaussian-weighted mean over every window that fits in the image ('valid' convolution)."""
    weights = _gaussian_window()
    for axis in range(image.ndim):
        windows = sliding_window_view(image, len(weights), axis=axis)
        image = windows @ weights
    return image


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float:
    """Mean SSIM of ``image`` against ``reference`` (same shape, 2D or 3D, real).

    ``data_range`` is L; by default the reference's max − min.
    """
    image = np.asarray(image, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        raise ConfigError(f"image has shape {image.shape} but the reference has {reference.shape}")
    if image.ndim not in (2, 3) or min(image.shape) < 2 * _WINDOW_RADIUS_PX + 1:
        raise ConfigError(
            f"SSIM needs a 2D or 3D image at least {2 * _WINDOW_RADIUS_PX + 1} px on every side; "
            f"got {image.shape}"
        )
    if np.iscomplexobj(image) or np.iscomplexobj(reference):
        raise ConfigError("SSIM compares real images: pass the amplitude (np.abs) or the phase")
    data_range = float(np.ptp(reference)) if data_range is None else float(data_range)
    if not data_range > 0:
        raise ConfigError(f"data_range={data_range!r} must be positive: the reference is constant")
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mean_x = _local_mean(image)
    mean_y = _local_mean(reference)
    variance_x = _local_mean(image * image) - mean_x**2
    variance_y = _local_mean(reference * reference) - mean_y**2
    covariance = _local_mean(image * reference) - mean_x * mean_y
    score = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    )
    return float(score.mean())

"""Shrink-wrap: a support that follows the reconstruction, for CDI in 2D and 3D.

Reference: S. Marchesini, H. He, H. N. Chapman, S. P. Hau-Riege, A. Noy, M. R. Howells, U. Weierstall and
J. C. H. Spence, "X-ray image reconstruction from a diffraction pattern alone", Phys. Rev. B 68, 140101(R)
(2003). Every 20 iterations the modulus of the current image is convolved with a Gaussian of width σ and
thresholded at a fraction of its maximum (20 % in the paper); σ starts at 3 px and shrinks by 1 % per update
down to 1.5 px:

    S = { r : (g_σ * |ρ|)(r) ≥ t · max (g_σ * |ρ|) },      σ ← max(0.99 σ, 1.5 px)

The blur here is periodic (a circular convolution done with FFTs), like the Fourier transforms of the
solver: an object that wraps round the edge of the box is blurred as one piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phasestream.errors import ConfigError

SHRINK_WRAP_INTERVAL = 20
"""Iterations between support updates (Marchesini et al. 2003)."""
SHRINK_WRAP_START_SIGMA_PX = 3.0
SHRINK_WRAP_MIN_SIGMA_PX = 1.5
SHRINK_WRAP_SIGMA_FACTOR = 0.99
"""σ shrinks by 1 % per update, from 3 px to the 1.5 px floor (reached after 69 updates)."""
SHRINK_WRAP_THRESHOLD = 0.2
"""Fraction of the blurred maximum that stays in the support (20 % in the paper)."""


def _gaussian_kernel_1d(n: int, sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sampled Gaussian on a periodic axis of n pixels, centred on pixel 0 and normalised to sum 1."""
    index = torch.arange(n, dtype=dtype, device=device)
    distance = torch.minimum(index, n - index)
    kernel = torch.exp(-0.5 * (distance / sigma_px) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma_px: float, ndim: int) -> torch.Tensor:
    """Periodic Gaussian blur of a real image over its last ``ndim`` axes (separable, done by FFT)."""
    if not sigma_px > 0:
        raise ConfigError(f"sigma_px={sigma_px!r} must be positive: give the blur width in pixels")
    dims = tuple(range(-ndim, 0))
    transfer = None
    for axis in dims:
        n = image.shape[axis]
        response = torch.fft.fft(_gaussian_kernel_1d(n, sigma_px, image.dtype, image.device))
        shape = [1] * ndim
        shape[axis] = n
        factor = response.reshape(shape)
        transfer = factor if transfer is None else transfer * factor
    return torch.fft.ifftn(torch.fft.fftn(image, dim=dims) * transfer, dim=dims).real


def shrink_wrap_support(
    image: torch.Tensor, sigma_px: float, ndim: int, threshold: float = SHRINK_WRAP_THRESHOLD
) -> torch.Tensor:
    """New support: where the Gaussian-blurred |image| reaches ``threshold`` times its maximum (bool)."""
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold={threshold!r} must lie in (0, 1): 0.2 is the paper's value")
    blurred = gaussian_blur(image.abs(), sigma_px, ndim)
    peak = blurred.amax()
    if not peak > 0:
        raise ConfigError(
            "the image is zero everywhere: shrink-wrap has nothing to follow; restart the solver"
        )
    return blurred >= threshold * peak


@dataclass
class ShrinkWrap:
    """Shrink-wrap schedule: σ, the update interval and the threshold; :meth:`update` applies one step."""

    interval: int = SHRINK_WRAP_INTERVAL
    sigma_px: float = SHRINK_WRAP_START_SIGMA_PX
    min_sigma_px: float = SHRINK_WRAP_MIN_SIGMA_PX
    sigma_factor: float = SHRINK_WRAP_SIGMA_FACTOR
    threshold: float = SHRINK_WRAP_THRESHOLD

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"interval={self.interval!r} must be at least 1 iteration (the paper uses 20)")
        if not 0 < self.min_sigma_px <= self.sigma_px:
            raise ConfigError(
                f"min_sigma_px={self.min_sigma_px!r} and sigma_px={self.sigma_px!r}: need 0 < min ≤ start"
            )
        if not 0 < self.sigma_factor <= 1:
            raise ConfigError(f"sigma_factor={self.sigma_factor!r} must lie in (0, 1]: 0.99 shrinks 1 %")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold={self.threshold!r} must lie in (0, 1): 0.2 is the paper's value")

    def update(self, image: torch.Tensor, ndim: int) -> torch.Tensor:
        """Support from the current σ, then shrink σ for the next update."""
        support = shrink_wrap_support(image, self.sigma_px, ndim, self.threshold)
        self.sigma_px = max(self.sigma_px * self.sigma_factor, self.min_sigma_px)
        return support

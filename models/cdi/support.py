"""Shrink-wrap: a support that follows the reconstruction, for CDI in 2D and 3D.

Reference: S. Marchesini, H. He, H. N. Chapman, S. P. Hau-Riege, A. Noy, M. R. Howells, U. Weierstall and
J. C. H. Spence, "X-ray image reconstruction from a diffraction pattern alone", Phys. Rev. B 68, 140101(R)
(2003). Every 20 iterations the modulus of the current image is convolved with a Gaussian of width σ and
thresholded at a fraction of its maximum (20 % in the paper); σ starts at 3 px and shrinks by 1 % per update
down to 1.5 px:

    S = { r : (g_σ * |ρ|)(r) ≥ t · max (g_σ * |ρ|) },      σ ← max(0.99 σ, 1.5 px)

Those are the defaults of :class:`~phasestream.models.cdi.options.SupportOptions`, which hold the schedule's
settings. The blur here is periodic (a circular convolution done with FFTs), like the Fourier transforms of
the solver: an object that wraps round the edge of the box is blurred as one piece.
"""

from __future__ import annotations

import torch

from phasestream.errors import ConfigError
from phasestream.models.cdi.options import SupportOptions


def _gaussian_kernel_1d(n: int, sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sampled Gaussian on a periodic axis of n pixels, centred on pixel 0 and normalised to sum 1."""
    index = torch.arange(n, dtype=dtype, device=device)
    distance = torch.minimum(index, n - index)
    kernel = torch.exp(-0.5 * (distance / sigma_px) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(image: torch.Tensor, sigma_px: float, ndim: int) -> torch.Tensor:
    """Periodic Gaussian blur of a real image over its last ``ndim`` axes (separable, done by FFT); σ > 0."""
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


def shrink_wrap_support(image: torch.Tensor, sigma_px: float, ndim: int, threshold: float) -> torch.Tensor:
    """New support: where the Gaussian-blurred |image| reaches ``threshold`` times its maximum (bool)."""
    blurred = gaussian_blur(image.abs(), sigma_px, ndim)
    peak = blurred.amax()
    if not peak > 0:
        raise ConfigError(
            "the image is zero everywhere: shrink-wrap has nothing to follow; restart the solver"
        )
    return blurred >= threshold * peak


class ShrinkWrap:
    """A shrink-wrap schedule under way: its :class:`SupportOptions` and the current σ, which starts at
    ``options.start_sigma_px``; :meth:`update` applies one step."""

    def __init__(self, options: SupportOptions) -> None:
        self.options = options
        self.sigma_px = self.options.start_sigma_px

    @property
    def interval(self) -> int:
        """Iterations between updates."""
        return self.options.interval

    def update(self, image: torch.Tensor, ndim: int) -> torch.Tensor:
        """Support from the current σ, then shrink σ for the next update."""
        support = shrink_wrap_support(image, self.sigma_px, ndim, self.options.threshold)
        self.sigma_px = max(self.sigma_px * self.options.sigma_factor, self.options.min_sigma_px)
        return support

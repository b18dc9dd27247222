"""Deep image prior (DIP): an untrained skip U-Net fitted to one image, stopped early by ES-WMV.

References: D. Ulyanov, A. Vedaldi and V. Lempitsky, "Deep image prior", CVPR 2018 (and IJCV 128, 1867,
2020); the two architectures of Erin et al. (2025), who denoise position-binned fly-scan ptychography with a
DIP; H. Wang, T. Li, Z. Zhuang, T. Chen, H. Liang and J. Sun, "Early stopping for deep image prior",
TMLR 2023 (arXiv:2112.06074), whose ES-WMV rule this module implements.

The network, Ulyanov et al.'s "skip" hourglass, is :class:`~phasestream.models.nets.skip_net.SkipNet`; the
settings of a fit are the groups of :mod:`phasestream.models.nets.dip_options`.

**Fitting** (Ulyanov Eq. 2): θ* = argmin_θ E(f_θ(z); x₀) with Adam, from a fixed random input z (32
channels, uniform in [0, 0.1)), perturbed at every step by Gaussian noise of std σ_z (σ_z = 1/30 in
Ulyanov's denoising), which regularises the fit.

**Early stopping, ES-WMV** (Wang et al., Algorithm 1). A DIP first fits the image, then the noise. The
running variance of the last W outputs,

    VAR_t = (1/W) Σ_{s=t−W+1..t} mean_pixels |x_s − x̄_t|²,      x̄_t = (1/W) Σ_{s=t−W+1..t} x_s,

falls while the fit settles and rises again once the network starts to chase the noise. Fitting stops when
VAR_t has not reached a new minimum for ``patience`` iterations; the output at the minimum is returned, so
nobody has to tune an iteration count.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from phasestream.errors import FrameValidationError
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.nets.dip_options import (
    ComplexChannels,
    DenoiseOptions,
    EarlyStoppingOptions,
    OptimisationOptions,
)
from phasestream.models.nets.skip_net import (
    dip_grid_shape,
    random_input,
    seeded_skip_nets,
    skip_net_config,
)

NORMALISATION_FLOOR = 1e-12
"""Smallest channel range (max − min) divided by when an image channel is brought to [0, 1]."""


# ----------------------------------------------------------------------------------------------------------
# ES-WMV


class EsWmv:
    """Windowed-moving-variance early stopping (Wang et al. 2023, Algorithm 1).

    Call :meth:`update` with each new output; it returns True once the running variance over the last
    ``options.window`` outputs has not reached a new minimum for ``options.patience`` updates.
    :attr:`best` is the output that closed the minimum-variance window, :attr:`best_iteration` its index
    (0-based). The sums run in float64 so that removing the oldest output from them does not lose the
    small variance near the minimum.
    """

    def __init__(self, options: EarlyStoppingOptions) -> None:
        self.window = options.window
        self.patience = options.patience
        self._outputs: deque[torch.Tensor] = deque()
        self._sum: torch.Tensor | None = None
        self._sum_of_squares: torch.Tensor | None = None
        self.iteration = -1
        self.variances: list[float] = []
        """VAR_t for every t from the first full window on."""
        self.best: torch.Tensor | None = None
        self.best_iteration = -1
        self.best_variance = float("inf")

    def update(self, output: torch.Tensor) -> bool:
        """Add the output of one iteration; True when fitting should stop."""
        self.iteration += 1
        current = output.detach()
        if current.is_complex():
            current = torch.view_as_real(current)
        current = current.to(torch.float64)
        if self._sum is None:
            self._sum = torch.zeros_like(current)
            self._sum_of_squares = torch.zeros_like(current)
        self._outputs.append(current)
        self._sum += current
        self._sum_of_squares += current**2
        if len(self._outputs) > self.window:
            oldest = self._outputs.popleft()
            self._sum -= oldest
            self._sum_of_squares -= oldest**2
        if len(self._outputs) < self.window:
            return False
        mean = self._sum / self.window
        variance = float((self._sum_of_squares / self.window - mean**2).clamp_min(0).mean())
        self.variances.append(variance)
        if variance < self.best_variance:
            self.best_variance = variance
            self.best_iteration = self.iteration
            self.best = output.detach().clone()
        return self.iteration - self.best_iteration >= self.patience


# ----------------------------------------------------------------------------------------------------------
# A generic DIP fitting loop, shared by denoising, LoDIP and double DIP


@dataclass(frozen=True)
class DipFit:
    """Outcome of :func:`fit_dip`: the estimate at ES-WMV's variance minimum (or the last one)."""

    estimate: torch.Tensor | None
    """None only when the very first loss was not finite."""
    stop_iteration: int
    """Iterations run (the NaN one included)."""
    best_iteration: int
    """The iteration (counted from 1, like ``stop_iteration``) whose output ``estimate`` is."""
    diverged: bool
    losses: np.ndarray
    interrupted: bool = False
    """``should_stop`` ended the fit before ES-WMV or the iteration cap did."""


def fit_dip(
    parameters: Iterable[torch.Tensor],
    step: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    optimisation: OptimisationOptions,
    *,
    early_stopping: EsWmv | None,
    progress: bool = False,
    description: str = "DIP",
    should_stop: Callable[[], bool] | None = None,
) -> DipFit:
    """Adam with ``optimisation.lr`` on ``parameters``; ``step()`` runs one forward pass and returns (loss,
    estimate); ``step`` adds the input noise itself.

    Stops after ``optimisation.max_iterations``, when ``early_stopping`` says so, or at the first
    non-finite loss (``diverged``; a RuntimeWarning names the iteration). Without early stopping, or
    before its first full window, the estimate is the last finite one. ``should_stop``, asked before every
    iteration, lets a caller on another thread end the fit early (``interrupted``) with the estimate so far.
    """
    max_iterations = optimisation.max_iterations
    optimiser = torch.optim.Adam(list(parameters), lr=optimisation.lr)
    losses: list[float] = []
    last: torch.Tensor | None = None
    diverged = False
    interrupted = False
    iteration = 0
    for step_number in tqdm(
        range(1, max_iterations + 1), desc=description, disable=not progress, leave=False
    ):
        if should_stop is not None and should_stop():
            interrupted = True
            break
        iteration = step_number
        optimiser.zero_grad(set_to_none=True)
        loss, estimate = step()
        value = float(loss.detach())
        losses.append(value)
        if not np.isfinite(value):
            diverged = True
            warnings.warn(
                f"{description} diverged: the loss is {value} at iteration {iteration}; returning the "
                "fallback. Lower lr or check the input for extreme values",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        last = estimate.detach()
        if early_stopping is not None and early_stopping.update(last):
            break
        loss.backward()
        optimiser.step()
    use_best = early_stopping is not None and early_stopping.best is not None
    return DipFit(
        estimate=early_stopping.best if use_best else last,
        stop_iteration=iteration,
        best_iteration=early_stopping.best_iteration + 1 if use_best else len(losses) - diverged,
        diverged=diverged,
        losses=np.asarray(losses),
        interrupted=interrupted,
    )


# ----------------------------------------------------------------------------------------------------------
# Denoising


@dataclass(frozen=True)
class DipResult:
    """A finished denoise: the image (dtype and shape of the input), where it stopped, the loss per step."""

    denoised: np.ndarray
    stop_iteration: int
    diverged: bool
    losses: np.ndarray
    best_iteration: int
    """The iteration (from 1) whose output was kept: ES-WMV's variance minimum."""
    interrupted: bool = False
    """``should_stop`` ended the fit early; ``denoised`` is the estimate so far (the input before any)."""


def image_to_channels(image: np.ndarray, complex_channels: ComplexChannels | str) -> np.ndarray:
    """(H, W) real → (1, H, W); complex → (2, H, W) as real/imaginary or amplitude/phase (radians)."""
    if not np.iscomplexobj(image):
        return image[None].astype(np.float64)
    if ComplexChannels(complex_channels) is ComplexChannels.REAL_IMAG:
        return np.stack([image.real, image.imag]).astype(np.float64)
    return np.stack([np.abs(image), np.angle(image)]).astype(np.float64)


def channels_to_image(
    channels: np.ndarray, complex_channels: ComplexChannels | str, is_complex: bool
) -> np.ndarray:
    """Inverse of :func:`image_to_channels`."""
    if not is_complex:
        return channels[0]
    if ComplexChannels(complex_channels) is ComplexChannels.REAL_IMAG:
        return channels[0] + 1j * channels[1]
    return channels[0] * np.exp(1j * channels[1])


def _check_denoise_input(image: np.ndarray) -> None:
    if image.ndim != 2:
        raise FrameValidationError(f"image has shape {image.shape}: dip_denoise takes one 2D (H, W) image")
    if not np.isfinite(image).all():
        raise FrameValidationError(
            f"image holds {int((~np.isfinite(image)).sum())} NaN or infinite values: replace them first"
        )


def _channel_ranges(channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each channel's minimum and range (at least ``NORMALISATION_FLOOR``): the map to [0, 1] and back."""
    low = channels.min(axis=(1, 2), keepdims=True)
    return low, np.maximum(channels.max(axis=(1, 2), keepdims=True) - low, NORMALISATION_FLOOR)


def dip_denoise(
    image: np.ndarray,
    options: DenoiseOptions | None = None,
    *,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> DipResult:
    """Denoise one (H, W) real or complex image with a DIP and ES-WMV (the module docstring).

    Each channel is brought to [0, 1] by its own minimum and maximum, fitted with a mean squared error and
    a sigmoid output, and mapped back. Amplitude/phase channels (``options.network.representation``) suit
    objects whose phase does not wrap; real/imaginary channels always do. On a non-finite loss the fit
    stops, ``diverged`` is True and the input comes back unchanged. ``should_stop`` is passed to
    :func:`fit_dip`.
    """
    options = options if options is not None else DenoiseOptions()
    image = np.asarray(image)
    _check_denoise_input(image)
    with torch_threads(options.execution.num_threads):
        return _denoise(image, options, progress, should_stop)


def _denoise(
    image: np.ndarray,
    options: DenoiseOptions,
    progress: bool,
    should_stop: Callable[[], bool] | None,
) -> DipResult:
    resolved = default_device(options.execution.device)
    config = skip_net_config(options.network.architecture)
    complex_channels = options.network.representation
    input_noise_std = options.optimisation.input_noise_std
    is_complex = np.iscomplexobj(image)
    channels = image_to_channels(image, complex_channels)
    low, span = _channel_ranges(channels)
    target = torch.as_tensor((channels - low) / span, dtype=torch.float32, device=resolved)[None]
    height, width = image.shape
    grid = dip_grid_shape((height, width), config)
    generator = torch.Generator().manual_seed(options.execution.seed)
    (network,) = seeded_skip_nets(config, len(channels), seed=options.execution.seed, device=resolved)
    z = random_input(config.input_channels, grid, generator, resolved)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        noisy_input = z + input_noise_std * torch.randn(z.shape, generator=generator).to(resolved)
        output = network(noisy_input)[..., :height, :width]
        return nn.functional.mse_loss(output, target), output[0]

    fit = fit_dip(
        network.parameters(),
        step,
        options.optimisation,
        early_stopping=EsWmv(options.early_stopping),
        progress=progress,
        description=f"DIP {config.levels}-level denoise",
        should_stop=should_stop,
    )
    if fit.diverged or fit.estimate is None:
        denoised = image.copy()
    else:
        estimate = fit.estimate.to("cpu", torch.float64).numpy() * span + low
        denoised = channels_to_image(estimate, complex_channels, is_complex).astype(image.dtype)
    return DipResult(
        denoised, fit.stop_iteration, fit.diverged, fit.losses, fit.best_iteration, fit.interrupted
    )

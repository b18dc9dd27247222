"""Double deep image prior: plane-wave CDI phase retrieval with two untrained networks.

Reference: Z. Zhuang, D. Yang, F. Hofmann, D. Barmherzig and J. Sun, "Practical phase retrieval using double
deep image priors", Electronic Imaging 2023 (arXiv:2211.00799, 2022). The object is written as two DIPs,
magnitude and phase (or real and imaginary part), each a skip network
(:mod:`phasestream.models.nets.skip_net`, fitted as in :mod:`phasestream.models.nets.dip`) with its own fixed
random input:

    x = k · g₁(z₁) · exp(i π (2 g₂(z₂) − 1))        (magnitude / phase; g in (0, 1) from a sigmoid)
    x = k · ((2 g₁(z₁) − 1) + i (2 g₂(z₂) − 1))     (real / imaginary)

on a box half the pattern's size in each direction, centred in the array and zero outside; this box is the
only object-domain constraint (oversampling 2 per axis), with no tight support and no shrink-wrap, as in the
paper. Both networks and the learnable scale k minimise the misfit between |F x| and the measured pattern
(:class:`~phasestream.models.cdi.options.FitLoss`, squared amplitude error by default; F the project's centred
orthonormal FFT) with Adam; ES-WMV stops the fit (Wang et al. 2023). k starts from Parseval,
Σ|x|² = Σ Y. The result is defined up to the usual CDI ambiguities: global phase, translation within the
box and the twin image x*(−r).

Real and imaginary parts are the default: on a compact complex test object (32-px pattern, 1e5 photons,
800 iterations) they reached a 5 % error at the noise floor of the misfit, while magnitude and phase
stalled at 50 % (the phase network has to move across ±π). The fit's settings are
:class:`~phasestream.models.cdi.options.DoubleDipOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from phasestream.errors import ConfigError
from phasestream.models.cdi.lodip import data_misfit, measured_in_fft_layout
from phasestream.models.cdi.options import CdiOptions, DoubleDipOptions
from phasestream.models.cdi.phasing import CdiSolver, amplitude_from_intensity, validate_pattern
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.nets.dip import EsWmv, fit_dip
from phasestream.models.nets.dip_options import ComplexChannels, ExecutionOptions, SkipNetConfig
from phasestream.models.nets.skip_net import (
    dip_grid_shape,
    random_input,
    seeded_skip_nets,
    skip_net_config,
)

FALLBACK_OPTIONS = CdiOptions(schedule={"hio_iterations": 180, "er_iterations": 20, "cycles": 2})
"""HIO/ER on the half-size box: what a diverged fit returns instead (on the fit's device and seed)."""


@dataclass(frozen=True)
class DoubleDipResult:
    """The complex object on the pattern's array (zero off the box), where fitting stopped, the losses."""

    object: np.ndarray
    stop_iteration: int
    diverged: bool
    losses: np.ndarray
    best_iteration: int


def object_box(shape: tuple[int, int]) -> tuple[slice, slice]:
    """The centred box half the pattern's size along each axis: the object's only constraint."""
    return tuple(slice(side // 4, side // 4 + side // 2) for side in shape)


def _combine(first: torch.Tensor, second: torch.Tensor, representation: ComplexChannels) -> torch.Tensor:
    """The unscaled complex object from two sigmoid outputs (module docstring)."""
    if representation is ComplexChannels.AMPLITUDE_PHASE:
        return torch.polar(first, torch.pi * (2 * second - 1))
    return torch.complex(2 * first - 1, 2 * second - 1)


class _DipPair:
    """The two seeded networks and their fixed inputs, and the unscaled object they make on the box."""

    def __init__(
        self,
        config: SkipNetConfig,
        box_shape: tuple[int, int],
        representation: ComplexChannels,
        seed: int,
        device: torch.device,
    ) -> None:
        self.box_shape = box_shape
        self.representation = representation
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.networks = seeded_skip_nets(config, 1, seed=seed, device=device, count=2)
        grid = dip_grid_shape(box_shape, config)
        self.inputs = [random_input(config.input_channels, grid, self.generator, device) for _ in range(2)]

    def parameters(self) -> list[torch.Tensor]:
        return [*self.networks[0].parameters(), *self.networks[1].parameters()]

    def unscaled_object(self, noise_std: float) -> torch.Tensor:
        """Both networks on their inputs plus fresh noise of ``noise_std``, cropped to the box, combined."""
        outputs = [
            network(z + noise_std * torch.randn(z.shape, generator=self.generator).to(self.device))[
                0, 0, : self.box_shape[0], : self.box_shape[1]
            ]
            for network, z in zip(self.networks, self.inputs, strict=True)
        ]
        return _combine(*outputs, self.representation)


def _check_double_dip_pattern(pattern: np.ndarray) -> None:
    validate_pattern(torch.as_tensor(pattern), "pattern")
    if pattern.ndim != 2:
        raise ConfigError(f"pattern has shape {pattern.shape}: double DIP takes one 2D pattern")
    if min(pattern.shape) < 8:
        raise ConfigError(f"pattern has shape {pattern.shape}: the half-size object box needs at least 8 px")


def _parseval_log_scale(pair: _DipPair, pattern: np.ndarray) -> nn.Parameter:
    """log k₀ with Σ|x|² = Σ Y (module docstring), a learnable parameter."""
    with torch.no_grad():
        initial_energy = float((pair.unscaled_object(0.0).abs() ** 2).sum())
    initial_log_scale = 0.5 * np.log(pattern.sum() / max(initial_energy, 1e-12))
    return nn.Parameter(torch.tensor(initial_log_scale, dtype=torch.float32, device=pair.device))


def _hio_er_fallback(
    pattern: np.ndarray, box: tuple[slice, slice], execution: ExecutionOptions, device: torch.device
) -> np.ndarray:
    """What a diverged fit returns: HIO/ER with the box as the support."""
    support = np.zeros(pattern.shape, dtype=bool)
    support[box] = True
    options = FALLBACK_OPTIONS.replace(execution={**execution.model_dump(), "device": str(device)})
    solver = CdiSolver(amplitude_from_intensity(pattern), support, options)
    solver.run()
    return solver.final_image().cpu().numpy()


def double_dip(
    pattern: np.ndarray, options: DoubleDipOptions | None = None, *, progress: bool = False
) -> DoubleDipResult:
    """Retrieve a complex object from one 2D centred pattern (counts) with two DIPs (module docstring).

    On a non-finite loss the fit stops, ``diverged`` is True and the object is the HIO/ER fallback on the
    same box.
    """
    options = options if options is not None else DoubleDipOptions()
    pattern = np.asarray(pattern, dtype=np.float64)
    _check_double_dip_pattern(pattern)
    with torch_threads(options.execution.num_threads):
        return _double_dip(pattern, options, progress)


def _double_dip(pattern: np.ndarray, options: DoubleDipOptions, progress: bool) -> DoubleDipResult:
    execution = options.execution
    resolved = default_device(execution.device)
    box = object_box(pattern.shape)
    box_shape = tuple(s.stop - s.start for s in box)
    measured, measured_amplitude = measured_in_fft_layout(pattern, resolved)
    config = skip_net_config(options.network.architecture)
    pair = _DipPair(config, box_shape, options.network.representation, execution.seed, resolved)
    pad = (box[1].start, pattern.shape[1] - box[1].stop, box[0].start, pattern.shape[0] - box[0].stop)
    log_scale = _parseval_log_scale(pair, pattern)
    input_noise_std = options.optimisation.input_noise_std

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        obj = log_scale.exp() * pair.unscaled_object(input_noise_std)
        # The modulus of a spectrum does not change when the object moves, so the padded object goes to
        # the FFT as it is and only the measured pattern is taken to the FFT's layout.
        spectrum = torch.fft.fft2(nn.functional.pad(obj, pad), norm="ortho")
        return data_misfit(spectrum, measured, measured_amplitude, options.loss), obj

    fit = fit_dip(
        [*pair.parameters(), log_scale],
        step,
        options.optimisation,
        early_stopping=EsWmv(options.early_stopping),
        progress=progress,
        description="double DIP",
    )
    if fit.diverged or fit.estimate is None:
        obj = _hio_er_fallback(pattern, box, execution, resolved)
    else:
        obj = np.zeros(pattern.shape, dtype=np.complex128)
        obj[box] = fit.estimate.cpu().numpy()
    return DoubleDipResult(obj, fit.stop_iteration, fit.diverged, fit.losses, fit.best_iteration)

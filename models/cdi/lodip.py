"""LoDIP: low-dose phase retrieval with a deep image prior and an in-situ CDI static region; HIO-stat.

Reference: R. Manekar, E. Negrini, M. Pham, D. Jacobs, J. Srivastava, S. J. Osher and J. Miao, "Low-light
phase retrieval with implicit generative priors" (LoDIP), arXiv:2402.17745. The measurement is in-situ CDI
(:mod:`phasestream.simulators.insitu_cdi`): a sample X on its support S beside a static region U that is
lit r times more strongly, Y = |F(X + U)|² with Poisson noise, F the project's centred orthonormal FFT.

1. **Static region first, at high dose.** U does not change between measurements, so it is measured alone
   at a high dose and reconstructed with HIO then ER (:mod:`phasestream.models.cdi.phasing`, Fienup 1982)
   under its
   known support and positivity (:func:`reconstruct_static`). A support that is not centrosymmetric (the
   simulator's triangle) leaves no twin ambiguity. U is then rescaled to the low-dose pattern's units by
   √(r s / s_s), s and s_s the incident photons per pixel of the two exposures
   (:func:`static_in_pattern_units`).

2. **LoDIP** (the paper's model): X = k · g_W(z) ⊙ S with g_W a DIP skip network
   (:mod:`phasestream.models.nets.skip_net`, fitted as in :mod:`phasestream.models.nets.dip`) whose
   input z is the measured pattern itself (log(1 + Y), scaled to [0, 1], because counts span decades),
   sigmoid output and a learnable scale k; W and k minimise a data misfit between Y and

       Ŷ = |F(k · g_W(z) ⊙ S + U)|²,

   with Adam and ES-WMV early stopping. The misfit is the squared amplitude error
   mean (|F(·)| − √Y)² (default: the usual choice for DIP phase retrieval; the square root evens out the
   Poisson variance, and at 1 photon per pixel it scored 2-3 dB above the alternative on three simulated
   samples, at 1,000 the same) or the Poisson negative log-likelihood mean (Ŷ − Y log Ŷ)
   (:class:`~phasestream.models.cdi.options.FitLoss`). k starts from Parseval: supports that do not
   overlap make Σ Y ≈ Σ |X|² + Σ |U|², so k₀ = √((Σ Y − Σ U²) / Σ_S g₀²).

3. **HIO-stat**, the paper's baseline: HIO with β = 0.9 on the sample support and positivity, the static
   region reset to U after every iteration, then ER (:func:`hio_stat`).

Samples are taken as real and non-negative (the paper's setting; the generator ends in a sigmoid). The
solvers' settings are :class:`~phasestream.models.cdi.options.LodipOptions` and
:class:`~phasestream.models.cdi.options.HioStatOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from phasestream.errors import ConfigError
from phasestream.models.cdi.options import (
    CdiAlgorithm,
    CdiOptions,
    FitLoss,
    HioStatOptions,
    LodipOptions,
    Precision,
)
from phasestream.models.cdi.phasing import amplitude_from_intensity, best_of_random_starts, validate_pattern
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.nets.dip import EsWmv, fit_dip
from phasestream.models.nets.dip_options import ExecutionOptions
from phasestream.models.nets.skip_net import SkipNet, dip_grid_shape, seeded_skip_nets, skip_net_config
from phasestream.models.physics import FOURIER_EPSILON

STATIC_OPTIONS = CdiOptions(
    constraints={"positivity": True},
    schedule={"hio_iterations": 180, "er_iterations": 20, "cycles": 3},
    execution={"precision": Precision.COMPLEX128},
)
"""HIO/ER for the high-dose static pattern: on the simulator's triangles U comes back to about 0.1 %."""
STATIC_STARTS = 3
"""Random starts of the static reconstruction, seeded from the execution's seed on."""
INTENSITY_FLOOR = 1e-6
"""Added to Ŷ inside the Poisson log-likelihood: keeps log Ŷ finite where the model is dark; far below one
photon, so it does not bias pixels that recorded any."""
MIN_SAMPLE_ENERGY_FRACTION = 1e-3
"""When noise makes Σ Y − Σ U² nearly zero or negative, k₀ uses this fraction of Σ Y instead."""


@dataclass(frozen=True)
class LodipResult:
    """The sample (real, pattern amplitude units, zero off S), where fitting stopped, the loss per step."""

    sample: np.ndarray
    stop_iteration: int
    diverged: bool
    losses: np.ndarray
    best_iteration: int
    scale: float
    """The fitted k."""


def _as_mask(mask: np.ndarray | torch.Tensor, name: str, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ConfigError(
            f"{name} has shape {mask.shape} but the pattern is {shape}: pass a mask of that shape"
        )
    mask = mask.astype(bool)
    if not mask.any():
        raise ConfigError(f"{name} selects no pixel: pass the region as a boolean mask of the array")
    return mask


def validate_insitu(
    pattern: np.ndarray,
    static_field: np.ndarray,
    sample_support: np.ndarray,
    static_support: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check an in-situ CDI problem and return (pattern, static field, sample support, static support).

    Raises FrameValidationError for a pattern with no photons, NaN or negative counts, and ConfigError for
    supports of the wrong shape, empty, or overlapping, and for a static field nonzero off its support.
    """
    pattern = np.asarray(pattern, dtype=np.float64)
    validate_pattern(torch.as_tensor(pattern), "pattern")
    if pattern.ndim != 2:
        raise ConfigError(f"pattern has shape {pattern.shape}: LoDIP takes one 2D pattern")
    static_field = np.asarray(static_field)
    if static_field.shape != pattern.shape:
        raise ConfigError(
            f"static_field has shape {static_field.shape} but the pattern is {pattern.shape}: "
            "reconstruct the static region on the pattern's array"
        )
    if np.iscomplexobj(static_field):
        static_field = static_field.real
    sample_support = _as_mask(sample_support, "sample_support", pattern.shape)
    static_support = _as_mask(static_support, "static_support", pattern.shape)
    overlap = int((sample_support & static_support).sum())
    if overlap:
        raise ConfigError(
            f"the static region overlaps the sample support on {overlap} px: in-situ CDI needs them apart; "
            "fix the masks"
        )
    stray = float(np.abs(static_field[~static_support]).max(initial=0.0))
    if stray > 0:
        raise ConfigError(
            f"static_field is nonzero (up to {stray:.3g}) off static_support: multiply it by the support"
        )
    return pattern, static_field.astype(np.float64), sample_support, static_support


def reconstruct_static(
    static_pattern: np.ndarray, static_support: np.ndarray, execution: ExecutionOptions | None = None
) -> np.ndarray:
    """U from its high-dose, static-only pattern: HIO/ER with the fixed support and positivity
    (:data:`STATIC_OPTIONS`, on ``execution``'s device and threads), the best χ² of :data:`STATIC_STARTS`.

    Returns U (real, zero off the support) in the static pattern's amplitude units (√counts).
    """
    static_pattern = np.asarray(static_pattern, dtype=np.float64)
    static_support = _as_mask(static_support, "static_support", static_pattern.shape)
    execution = execution if execution is not None else ExecutionOptions()
    options = STATIC_OPTIONS.replace(execution=execution.model_dump())
    result = best_of_random_starts(
        amplitude_from_intensity(static_pattern), static_support, options, STATIC_STARTS
    )
    return result.image.real.cpu().numpy() * static_support


def static_in_pattern_units(
    static_estimate: np.ndarray,
    static_incident_photons_per_px: float,
    incident_photons_per_px: float,
    illumination_ratio: float,
) -> np.ndarray:
    """Rescale U from the static-only measurement (s_s photons per static pixel) to the in-situ one (r s).

    The fluxes are the experiment's incident photons per pixel of unit transmission (known from the
    exposure and the beam monitor; :class:`~phasestream.simulators.insitu_cdi.InSituCdiData` holds them).
    """
    for name, value in (
        ("static_incident_photons_per_px", static_incident_photons_per_px),
        ("incident_photons_per_px", incident_photons_per_px),
        ("illumination_ratio", illumination_ratio),
    ):
        if not value > 0:
            raise ConfigError(f"{name}={value!r} must be positive")
    factor = np.sqrt(illumination_ratio * incident_photons_per_px / static_incident_photons_per_px)
    return np.asarray(static_estimate) * factor


def hio_stat(
    pattern: np.ndarray,
    static_field: np.ndarray,
    sample_support: np.ndarray,
    static_support: np.ndarray,
    options: HioStatOptions | None = None,
) -> np.ndarray:
    """HIO-stat: Fienup's HIO/ER on the sample support with positivity, the static region held at U.

    Starts from U alone (no sample); returns the real sample (pattern amplitude units, zero off S).
    """
    options = options if options is not None else HioStatOptions()
    pattern, static_field, sample_support, static_support = validate_insitu(
        pattern, static_field, sample_support, static_support
    )
    resolved = default_device(options.execution.device)
    with torch_threads(options.execution.num_threads):
        return _hio_stat(pattern, static_field, sample_support, static_support, options, resolved)


def _hio_stat(
    pattern: np.ndarray,
    static_field: np.ndarray,
    sample_support: np.ndarray,
    static_support: np.ndarray,
    options: HioStatOptions,
    resolved: torch.device,
) -> np.ndarray:
    # As in lodip(): only the pattern goes to the FFT's layout; the real-space arrays stay as they are.
    amplitude = torch.as_tensor(np.fft.ifftshift(np.sqrt(pattern)), device=resolved)
    support = torch.as_tensor(sample_support, device=resolved)
    static_mask = torch.as_tensor(static_support, device=resolved)
    static = torch.as_tensor(static_field, dtype=torch.complex128, device=resolved)
    image = static.clone()
    zero = torch.zeros((), dtype=torch.complex128, device=resolved)
    for algorithm, count in options.schedule.steps():
        for _ in range(count):
            spectrum = torch.fft.fft2(image, norm="ortho")
            corrected = spectrum * (amplitude / spectrum.abs().clamp_min(FOURIER_EPSILON))
            projected = torch.fft.ifft2(corrected, norm="ortho")
            allowed = support & (projected.real >= 0)
            outside = zero if algorithm is CdiAlgorithm.ER else image - options.beta * projected
            image = torch.where(allowed, projected.real.to(image.dtype), outside)
            image = torch.where(static_mask, static, image)
    sample = torch.where(support & (image.real >= 0), image.real, torch.zeros((), dtype=torch.float64))
    return sample.cpu().numpy()


def data_misfit(
    model_spectrum: torch.Tensor, measured: torch.Tensor, measured_amplitude: torch.Tensor, loss: FitLoss
) -> torch.Tensor:
    """The :class:`FitLoss` between a model far field and the measured counts (same layout)."""
    intensity = model_spectrum.real**2 + model_spectrum.imag**2
    if loss is FitLoss.POISSON:
        return (intensity - measured * torch.log(intensity + INTENSITY_FLOOR)).mean()
    return ((intensity + FOURIER_EPSILON**2).sqrt() - measured_amplitude).square().mean()


def measured_in_fft_layout(pattern: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The measured counts and their square root, float32, in the FFT's layout (zero frequency first).

    Only the pattern goes to the FFT's layout: real-space arrays stay as they are, since moving the whole
    object changes the phase of its spectrum but not the modulus compared with the data.
    """
    measured = torch.as_tensor(np.fft.ifftshift(pattern), dtype=torch.float32, device=device)
    return measured, measured.sqrt()


def pattern_input(pattern: np.ndarray, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The DIP input z built from the pattern: log(1 + Y) / max, zero-padded to the network's grid."""
    logged = np.log1p(pattern)
    logged = logged / max(float(logged.max()), np.finfo(float).tiny)
    padded = np.zeros(grid)
    padded[: pattern.shape[0], : pattern.shape[1]] = logged
    return torch.as_tensor(padded, dtype=torch.float32, device=device)[None, None]


def _initial_log_scale(
    network: SkipNet,
    z: torch.Tensor,
    pattern: np.ndarray,
    static_field: np.ndarray,
    sample_support: np.ndarray,
    device: torch.device,
) -> nn.Parameter:
    """log k₀ from Parseval (module docstring), a learnable parameter: the untrained output scaled to the
    pattern's energy less the static region's."""
    n_y, n_x = pattern.shape
    with torch.no_grad():
        initial = network(z)[0, 0, :n_y, :n_x].cpu().numpy()
    sample_energy = max(
        pattern.sum() - float((static_field**2).sum()), MIN_SAMPLE_ENERGY_FRACTION * pattern.sum()
    )
    initial_scale = np.sqrt(sample_energy / float((initial**2)[sample_support].sum()))
    return nn.Parameter(torch.tensor(np.log(initial_scale), dtype=torch.float32, device=device))


def lodip(
    pattern: np.ndarray,
    static_field: np.ndarray,
    sample_support: np.ndarray,
    static_support: np.ndarray,
    options: LodipOptions | None = None,
    *,
    progress: bool = False,
) -> LodipResult:
    """Fit Y ≈ |F(k · g_W(z) ⊙ S + U)|² (module docstring); ``static_field`` is U in pattern units.

    On a non-finite loss the fit stops, ``diverged`` is True, and the sample is the HIO-stat fallback
    (default :class:`HioStatOptions` on the same device and threads).
    """
    options = options if options is not None else LodipOptions()
    problem = validate_insitu(pattern, static_field, sample_support, static_support)
    with torch_threads(options.execution.num_threads):
        return _lodip(problem, options, progress)


def _lodip(
    problem: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], options: LodipOptions, progress: bool
) -> LodipResult:
    pattern, static_field, sample_support, _ = problem
    execution = options.execution
    resolved = default_device(execution.device)
    config = skip_net_config(options.network.architecture)
    n_y, n_x = pattern.shape
    grid = dip_grid_shape((n_y, n_x), config)
    z = pattern_input(pattern, grid, resolved)
    measured, measured_amplitude = measured_in_fft_layout(pattern, resolved)
    support = torch.as_tensor(sample_support, dtype=torch.float32, device=resolved)
    static = torch.as_tensor(static_field, dtype=torch.float32, device=resolved)
    generator = torch.Generator().manual_seed(execution.seed)
    (network,) = seeded_skip_nets(config, 1, seed=execution.seed, device=resolved, in_channels=1)
    log_scale = _initial_log_scale(network, z, pattern, static_field, sample_support, resolved)
    input_noise_std = options.optimisation.input_noise_std

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        noisy_input = z + input_noise_std * torch.randn(z.shape, generator=generator).to(resolved)
        sample = log_scale.exp() * network(noisy_input)[0, 0, :n_y, :n_x] * support
        spectrum = torch.fft.fft2(sample + static, norm="ortho")
        return data_misfit(spectrum, measured, measured_amplitude, options.loss), sample

    fit = fit_dip(
        [*network.parameters(), log_scale],
        step,
        options.optimisation,
        early_stopping=EsWmv(options.early_stopping),
        progress=progress,
        description="LoDIP",
    )
    if fit.diverged or fit.estimate is None:
        sample = _hio_stat(*problem, HioStatOptions(execution=execution), resolved)
    else:
        sample = fit.estimate.to("cpu", torch.float64).numpy()
    scale = float(log_scale.detach().exp())
    return LodipResult(sample, fit.stop_iteration, fit.diverged, fit.losses, fit.best_iteration, scale)

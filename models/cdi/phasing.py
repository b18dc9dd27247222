"""Error reduction (ER) and hybrid input-output (HIO) for coherent diffractive imaging, 2D and 3D.

Reference: J. R. Fienup, "Phase retrieval algorithms: a comparison", Appl. Opt. 21, 2758-2769 (1982).
With F the project's centred, orthonormal far field over the last 2 or 3 axes,

    F ρ = fftshift(fftn(ρ, norm="ortho"))

(the convention of :mod:`phasestream.models.physics`, here N-dimensional), the measured amplitude a = sqrt(I)
and the Fourier-modulus projection ρ' = F⁻¹[ a · Fρ / |Fρ| ] (measured pixels only; pixels flagged as
unmeasured keep Fρ), one iteration is, with γ the pixels that violate the object constraints (outside the
support S, or Re ρ' < 0 when positivity is on):

    ER:                ρ_{k+1} = ρ'                 off γ,    0                  on γ
    HIO:               ρ_{k+1} = ρ'                 off γ,    ρ_k − β ρ'         on γ    (β = 0.9)

With positivity the object is taken as real and non-negative (Fienup's object-domain constraint), so ρ'
is replaced by its real part off γ. The error reported per iteration is the normalised Fourier χ² of the
iterate ρ_k, over measured pixels M:

    χ²_k = Σ_M (|Fρ_k| − a)² / Σ_M a²

For ER it never rises (Fienup 1982 proves this for error reduction). The support follows the image
with shrink-wrap (:mod:`phasestream.models.cdi.support`). Everything the solver is told is a
:class:`~phasestream.models.cdi.options.CdiOptions`. The amplitude is stored ``ifftshift``-ed: the
projection acts pixel by pixel, so the solver works in the FFT's native layout and never shifts per
iteration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.models.cdi.options import CdiAlgorithm, CdiOptions, Precision
from phasestream.models.cdi.support import ShrinkWrap
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.physics import FOURIER_EPSILON

_SPATIAL_DIMS = (2, 3)
_DTYPES = {Precision.COMPLEX64: torch.complex64, Precision.COMPLEX128: torch.complex128}


def cdi_far_field(image: torch.Tensor, ndim: int) -> torch.Tensor:
    """Centred, orthonormal far field over the last ``ndim`` axes: fftshift(fftn(ρ, norm="ortho"))."""
    dims = tuple(range(-ndim, 0))
    return torch.fft.fftshift(torch.fft.fftn(image, dim=dims, norm="ortho"), dim=dims)


def amplitude_from_intensity(intensity: np.ndarray | torch.Tensor) -> torch.Tensor:
    """sqrt(I) as float32, after the checks of :func:`validate_pattern`: the input of :class:`CdiSolver`."""
    intensity = torch.as_tensor(intensity)
    validate_pattern(intensity, "intensity")
    return intensity.to(torch.float32).sqrt()


def validate_pattern(
    pattern: torch.Tensor, name: str = "amplitude", unmeasured: torch.Tensor | None = None
) -> None:
    """Raise FrameValidationError for a pattern that is not 2D/3D, holds NaN or negative measured values, or
    holds no signal. Pixels flagged in ``unmeasured`` are not checked."""
    if pattern.ndim not in _SPATIAL_DIMS:
        raise FrameValidationError(
            f"{name} has shape {tuple(pattern.shape)}: pass one 2D (ny, nx) or 3D (nz, ny, nx) pattern"
        )
    if pattern.is_complex():
        raise FrameValidationError(f"{name} is complex ({pattern.dtype}): pass the measured real {name}")
    measured = pattern if unmeasured is None else pattern[~unmeasured]
    n_nan = int(torch.isnan(measured).sum())
    if n_nan:
        raise FrameValidationError(
            f"{name} holds {n_nan} NaN values: flag those pixels in `unmeasured` or replace them"
        )
    n_infinite = int(torch.isinf(measured).sum())
    if n_infinite:
        raise FrameValidationError(
            f"{name} holds {n_infinite} infinite values: flag those pixels in `unmeasured` or replace them"
        )
    n_negative = int((measured < 0).sum())
    if n_negative:
        raise FrameValidationError(
            f"{name} holds {n_negative} negative values (minimum {float(measured.min())!r}): clip the "
            "background subtraction at zero or flag those pixels in `unmeasured`"
        )
    if not bool((measured > 0).any()):
        raise FrameValidationError(
            f"{name} is zero on every measured pixel: no diffraction was recorded; check the detector"
        )


def _unmeasured_mask(
    unmeasured: np.ndarray | torch.Tensor | None, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """The ``unmeasured`` flags as a bool tensor of the pattern's shape, or None when every pixel counts."""
    if unmeasured is None:
        return None
    mask = torch.as_tensor(unmeasured).to(torch.bool)
    if tuple(mask.shape) != shape:
        raise ConfigError(
            f"unmeasured has shape {tuple(mask.shape)} but the pattern is {shape}: "
            "pass a mask of the pattern's shape"
        )
    return mask


def _support_of_shape(support: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    support = torch.as_tensor(support)
    if tuple(support.shape) != shape:
        raise ConfigError(
            f"support has shape {tuple(support.shape)} but the pattern is {shape}: pass a support of the "
            "pattern's shape (real-space pixels of the same box)"
        )
    return support


@dataclass(frozen=True)
class CdiResult:
    """A finished reconstruction: image (support applied), support, χ² per iteration and the final χ²."""

    image: torch.Tensor
    support: torch.Tensor
    fourier_errors: torch.Tensor
    final_error: float
    seed: int


class CdiSolver:
    """ER/HIO with optional shrink-wrap and positivity, for one 2D or 3D centred diffraction amplitude.

    ``amplitude``: sqrt(I), centred (zero frequency at N//2 on every axis). ``support``: bool array of the
    same shape, the first support guess (a loose box or blob). ``options``: everything about the
    iterations (:class:`~phasestream.models.cdi.options.CdiOptions`: shrink-wrap, positivity, β, the
    schedule :meth:`run` follows by default, device, seed and precision). ``unmeasured``: bool, True where
    the detector recorded nothing (beamstop, gaps); the modulus there stays free. ``initial_image``: a
    warm start (e.g. a neural-network prediction); without it the start is F⁻¹[a · e^{iφ}] with uniform
    random φ from ``execution.seed``, cut to the support. Everything lives on ``execution.device`` (CUDA
    when present); ``execution.num_threads`` holds for :meth:`run`.
    """

    def __init__(
        self,
        amplitude: np.ndarray | torch.Tensor,
        support: np.ndarray | torch.Tensor,
        options: CdiOptions | None = None,
        *,
        unmeasured: np.ndarray | torch.Tensor | None = None,
        initial_image: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        self.options = options if options is not None else CdiOptions()
        execution = self.options.execution
        self.device = default_device(execution.device)
        self.dtype = _DTYPES[execution.precision]
        amplitude = torch.as_tensor(amplitude)
        shape = tuple(amplitude.shape)
        self.ndim = amplitude.ndim
        unmeasured_mask = _unmeasured_mask(unmeasured, shape)
        validate_pattern(amplitude, "amplitude", unmeasured_mask)
        support = _support_of_shape(support, shape)
        self._dims = tuple(range(-self.ndim, 0))
        real_dtype = torch.float64 if self.dtype == torch.complex128 else torch.float32
        measured = torch.ones(shape, dtype=torch.bool) if unmeasured_mask is None else ~unmeasured_mask
        amplitude = torch.where(measured, amplitude, torch.zeros((), dtype=amplitude.dtype))
        self._amplitude = self._unshift(amplitude.to(self.device, real_dtype))
        self._measured = self._unshift(measured.to(self.device))
        self._all_measured = unmeasured_mask is None
        self._amplitude_norm = float((self._amplitude**2).sum())
        self.support = support.to(self.device, torch.bool)
        if not bool(self.support.any()):
            raise ConfigError("support selects no pixel: pass a support that covers the object")
        self.positivity = self.options.constraints.positivity
        self.beta = self.options.constraints.beta
        self.shrink_wrap = ShrinkWrap(self.options.support) if self.options.support.shrink_wrap else None
        self.seed = execution.seed
        self.iteration = 0
        self._errors: list[torch.Tensor] = []
        self.image = self._start_image(initial_image, shape)

    def _start_image(
        self, initial_image: np.ndarray | torch.Tensor | None, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """The warm start as given, or F⁻¹[a · e^{iφ}] with uniform random φ from ``seed``, cut to the
        support."""
        if initial_image is None:
            generator = torch.Generator().manual_seed(self.seed)
            phase = 2 * torch.pi * torch.rand(shape, generator=generator, dtype=torch.float64)
            spectrum = self._amplitude.to(torch.float64).cpu() * torch.exp(1j * phase)
            start = torch.fft.ifftn(spectrum, dim=self._dims, norm="ortho").to(self.device, self.dtype)
            return self._object_projection(start)
        start = torch.as_tensor(initial_image)
        if tuple(start.shape) != shape:
            raise ConfigError(
                f"initial_image has shape {tuple(start.shape)} but the pattern is {shape}: "
                "pass a warm start of the pattern's shape"
            )
        return start.to(self.device, self.dtype)

    def _unshift(self, pattern: torch.Tensor) -> torch.Tensor:
        return torch.fft.ifftshift(pattern, dim=self._dims).contiguous()

    @property
    def fourier_errors(self) -> torch.Tensor:
        """χ² of every iteration run so far (float64, on the CPU)."""
        if not self._errors:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack(self._errors).to("cpu", torch.float64)

    def _fourier_projection(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ρ' = F⁻¹[a Fρ/|Fρ|] on measured pixels, and χ² of ρ (a 0-d tensor: no device sync)."""
        spectrum = torch.fft.fftn(image, dim=self._dims, norm="ortho")
        modulus = spectrum.abs()
        residual = modulus - self._amplitude
        if not self._all_measured:
            residual = residual * self._measured
        error = (residual**2).sum() / self._amplitude_norm
        corrected = spectrum * (self._amplitude / modulus.clamp_min(FOURIER_EPSILON))
        if not self._all_measured:
            corrected = torch.where(self._measured, corrected, spectrum)
        return torch.fft.ifftn(corrected, dim=self._dims, norm="ortho"), error

    def _allowed(self, projected: torch.Tensor) -> torch.Tensor:
        """Pixels where ρ' meets the object constraints (the complement of Fienup's γ)."""
        return self.support & (projected.real >= 0) if self.positivity else self.support

    def _object_projection(self, image: torch.Tensor) -> torch.Tensor:
        """ER's object step: ρ' where allowed (real part with positivity), 0 elsewhere."""
        kept = image.real.to(image.dtype) if self.positivity else image
        return torch.where(
            self._allowed(image), kept, torch.zeros((), dtype=image.dtype, device=image.device)
        )

    def step(self, algorithm: CdiAlgorithm | str) -> torch.Tensor:
        """One ER or HIO iteration (then a shrink-wrap update when one is due); returns the iterate's χ²."""
        algorithm = CdiAlgorithm(algorithm)
        projected, error = self._fourier_projection(self.image)
        if algorithm is CdiAlgorithm.ER:
            self.image = self._object_projection(projected)
        else:
            kept = projected.real.to(projected.dtype) if self.positivity else projected
            self.image = torch.where(self._allowed(projected), kept, self.image - self.beta * projected)
        self.iteration += 1
        self._errors.append(error)
        if self.shrink_wrap is not None and self.iteration % self.shrink_wrap.interval == 0:
            self.support = self.shrink_wrap.update(self.image, self.ndim)
        return error

    def run(self, schedule: Iterable[tuple[CdiAlgorithm | str, int]] | None = None) -> torch.Tensor:
        """Run the options' schedule, or one given as e.g. ``[("hio", 180), ("er", 20)] * 5``; returns the
        χ² of the iterations of this call."""
        if schedule is None:
            schedule = self.options.schedule.steps()
        steps = [(CdiAlgorithm(name), int(count)) for name, count in schedule]
        for name, count in steps:
            if count < 0:
                raise ConfigError(f"schedule asks for {count} iterations of {name}: counts must be ≥ 0")
        start = len(self._errors)
        with torch_threads(self.options.execution.num_threads):
            for algorithm, count in steps:
                for _ in range(count):
                    self.step(algorithm)
        return self.fourier_errors[start:]

    def final_image(self) -> torch.Tensor:
        """The current iterate with the object constraints applied (what HIO's iterate stands for)."""
        return self._object_projection(self.image)

    def fourier_error(self) -> float:
        """χ² of :meth:`final_image`."""
        return float(self._fourier_projection(self.final_image())[1])

    def result(self) -> CdiResult:
        return CdiResult(
            self.final_image(), self.support.clone(), self.fourier_errors, self.fourier_error(), self.seed
        )


def best_of_random_starts(
    amplitude: np.ndarray | torch.Tensor,
    support: np.ndarray | torch.Tensor,
    options: CdiOptions,
    starts: int = 4,
    *,
    unmeasured: np.ndarray | torch.Tensor | None = None,
) -> CdiResult:
    """Run the options' schedule from ``starts`` random starts and keep the result with the lowest final χ².

    Start k is seeded with ``options.execution.seed + k``; each has its own shrink-wrap schedule when
    ``options.support.shrink_wrap`` is on (its σ is state).
    """
    if starts < 1:
        raise ConfigError(f"starts={starts!r}: give at least one random start")
    best: CdiResult | None = None
    for seed in range(options.execution.seed, options.execution.seed + starts):
        solver = CdiSolver(
            amplitude, support, options.replace(execution={"seed": seed}), unmeasured=unmeasured
        )
        solver.run()
        result = solver.result()
        if best is None or result.final_error < best.final_error:
            best = result
    return best

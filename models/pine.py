"""PINE: ePIE with a learned nonexpansive denoiser between sweeps.

Reference: Yamada et al. (2024), PINE, as summarised in the project's DESIGN.md. Each iteration is one
ePIE sweep over every position in random order, then

    O ← (1 − ρ) O + ρ D(O),        ρ = 0.49,

with D applied to the real and the imaginary part of O separately. D is a DnCNN made nonexpansive
(Lipschitz constant ≤ 1) with real spectral normalisation (E. K. Ryu, J. Liu, S. Wang, X. Chen, Z. Wang and
W. Yin, "Plug-and-play methods provably converge with properly trained denoisers", ICML 2019), trained on
formula-driven dead-leaves images only (:mod:`phasestream.models.dncnn`,
:mod:`phasestream.simulators.dead_leaves_shapes`). With D nonexpansive and ρ < 1/2 the step is an averaged
operator, which is what makes the plug-and-play iteration stable; the paper reports ePIE's resolution in
about half the iterations, also at low dose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from phasestream.errors import ConfigError

if TYPE_CHECKING:
    from phasestream.models.epie import EpieSolver

DEFAULT_RHO = 0.49


class PineRegulariser:
    """O ← (1 − ρ) O + ρ D(O): the :class:`~phasestream.models.epie.ObjectRegulariser` of PINE."""

    def __init__(self, denoiser: torch.nn.Module, rho: float = DEFAULT_RHO) -> None:
        if not 0 < rho < 1:
            raise ConfigError(f"rho={rho!r} is outside (0, 1); PINE uses 0.49 (below 1/2: an averaged step)")
        self.denoiser = denoiser
        self.rho = rho

    def __call__(self, obj: torch.Tensor) -> torch.Tensor:
        from phasestream.models.dncnn import apply_to_complex

        return obj.mul(1 - self.rho).add_(apply_to_complex(self.denoiser, obj), alpha=self.rho)


def pine_solver(
    denoiser: torch.nn.Module | None = None, rho: float = DEFAULT_RHO, **epie_options: object
) -> EpieSolver:
    """An :class:`EpieSolver` with PINE's regulariser; the shipped denoiser unless one is given."""
    from phasestream.models.dncnn import load_denoiser
    from phasestream.models.epie import EpieSolver

    device = epie_options.get("device")
    denoiser = denoiser if denoiser is not None else load_denoiser(device=device)
    return EpieSolver(object_regulariser=PineRegulariser(denoiser, rho), **epie_options)

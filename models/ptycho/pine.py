"""PINE: ePIE with a learned nonexpansive denoiser between sweeps.

Reference: Yamada et al. (2024), PINE. Each iteration is one
ePIE sweep over every position in random order, then

    O ← (1 − ρ) O + ρ D(O),        ρ = 0.49,

with D applied to the real and the imaginary part of O separately. D is a DnCNN made nonexpansive
(Lipschitz constant ≤ 1) with real spectral normalisation (E. K. Ryu, J. Liu, S. Wang, X. Chen, Z. Wang and
W. Yin, "Plug-and-play methods provably converge with properly trained denoisers", ICML 2019), trained on
formula-driven dead-leaves images only (:mod:`phasestream.models.nets.dncnn`,
:mod:`phasestream.simulators.dead_leaves_shapes`). With D nonexpansive and ρ < 1/2 the step is an averaged
operator, which is what makes the plug-and-play iteration stable; the paper reports ePIE's resolution in
about half the iterations, also at low dose.

**Value range.** D works on [0, 1] images (:func:`~phasestream.models.nets.dncnn.apply_to_complex` maps
Re O and
Im O there with one affine map). The map's range is taken between the :data:`RANGE_QUANTILE` and
1 − :data:`RANGE_QUANTILE` quantiles of the parts, not their extremes: at low dose ePIE fits noise where
only the probe's dim tails reach (the edge of the scan), and there the extremes grew from 1.6 to 8 over
300 sweeps of the 2,000-photon Siemens-star benchmark (:mod:`phasestream_bench.pine`) while the
object inside stayed within [−0.5, 1.2]. Through the extremes, D saw the object's noise five times weaker
than it is, and left it alone. Pass ``value_range`` to fix the map over a reconstruction when the averaged-
operator guarantee must hold between sweeps.
"""

from __future__ import annotations

from typing import Any

import torch

from phasestream.models.execution import default_device
from phasestream.models.nets.dncnn import apply_to_complex, load_denoiser
from phasestream.models.ptycho.epie import EpieSolver
from phasestream.models.ptycho.options import EpieOptions, PineOptions

RANGE_QUANTILE = 0.01
"""1 % of the real and imaginary values at each end are left out of the range D's map is built from: the
scan's edge (where the probe is dim and ePIE fits noise) is a few per cent of a canvas."""


def robust_value_range(obj: torch.Tensor, quantile: float = RANGE_QUANTILE) -> tuple[float, float]:
    """The interval between the ``quantile`` and 1 − ``quantile`` quantiles of Re O and Im O together.

    Where those quantiles coincide (a canvas still blank but for a few windows, early in a live scan) the
    extremes are used instead: an empty range would blow the few changed pixels far out of D's range.
    """
    parts = torch.stack([obj.real, obj.imag]).flatten()
    # kthvalue rather than torch.quantile, which refuses inputs above 2**24 elements (a 3,000² canvas).
    rank = min(max(round(quantile * len(parts)), 1), len(parts))
    low = float(parts.kthvalue(rank).values)
    high = float(parts.kthvalue(len(parts) + 1 - rank).values)
    if high > low:
        return low, high
    return float(parts.min()), float(parts.max())


class PineRegulariser:
    """O ← (1 − ρ) O + ρ D(O): the :class:`~phasestream.models.ptycho.epie.ObjectRegulariser` of PINE."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        options: PineOptions | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.rho = (options if options is not None else PineOptions()).rho
        self.value_range = value_range

    def __call__(self, obj: torch.Tensor) -> torch.Tensor:
        value_range = self.value_range if self.value_range is not None else robust_value_range(obj)
        return obj.mul(1 - self.rho).add_(apply_to_complex(self.denoiser, obj, value_range), alpha=self.rho)


def pine_solver(
    options: EpieOptions | None = None,
    pine: PineOptions | None = None,
    denoiser: torch.nn.Module | None = None,
    **start: Any,
) -> EpieSolver:
    """An :class:`EpieSolver` with PINE's regulariser; the shipped denoiser, on the solver's device, unless
    one is given. ``start`` is the solver's start (``probe``, ``object_guess``, ``canvas_shape_px``,
    ``unmeasured``)."""

    options = options if options is not None else EpieOptions()
    if denoiser is None:
        denoiser = load_denoiser(device=default_device(options.execution.device))
    return EpieSolver(options, object_regulariser=PineRegulariser(denoiser, pine), **start)

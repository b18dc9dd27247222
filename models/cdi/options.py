"""Everything a CDI phase retrieval is told, validated once: HIO/ER, HIO-stat, LoDIP and double DIP.

HIO/ER (:class:`~phasestream.models.cdi.phasing.CdiSolver`) takes a :class:`CdiOptions`, grouped as pty-chi
groups a solver's options: the support and its shrink-wrap (:class:`SupportOptions`), the object-domain
constraints (:class:`ConstraintOptions`: positivity and HIO's β), the iterations (:class:`ScheduleOptions`:
HIO then ER, repeated) and where it runs (:class:`CdiExecutionOptions`). HIO-stat
(:func:`~phasestream.models.cdi.lodip.hio_stat`) takes a :class:`HioStatOptions`. LoDIP and double DIP
are deep image prior fits: :class:`LodipOptions` and :class:`DoubleDipOptions` hold the groups of
:mod:`phasestream.models.nets.dip_options` and the data misfit (:class:`FitLoss`).

Every bound is declared once; where a solver starts from other defaults (HIO-stat's schedule, LoDIP's
patience) it subclasses a group and sets the default with an annotated type declared once
(:data:`HioIterations`, :data:`Patience`…), so that a group given in part keeps that solver's defaults for
the rest. The solvers take these models as they are, and the cdi stage embeds the same groups, so a YAML
file, a benchmark and a test are checked by the same rules. Every model is frozen;
:meth:`~phasestream.models.nets.dip_options.SolverOptions.replace` makes a validated copy.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from phasestream.models.nets.dip_options import (
    ComplexNetworkOptions,
    EarlyStoppingOptions,
    ExecutionOptions,
    NetworkOptions,
    OptimisationOptions,
    Patience,
)
from phasestream.models.options import SolverOptions

HIO_BETA = 0.9
"""Fienup's feedback parameter β; he found 0.5 to 1 to work, 0.9 is the usual choice."""
SHRINK_WRAP_INTERVAL = 20
"""Iterations between support updates (Marchesini et al. 2003)."""
SHRINK_WRAP_START_SIGMA_PX = 3.0
SHRINK_WRAP_MIN_SIGMA_PX = 1.5
SHRINK_WRAP_SIGMA_FACTOR = 0.99
"""σ shrinks by 1 % per update, from 3 px to the 1.5 px floor (reached after 69 updates)."""
SHRINK_WRAP_THRESHOLD = 0.2
"""Fraction of the blurred maximum that stays in the support (20 % in the paper)."""
LODIP_PATIENCE = 300
"""ES-WMV patience for LoDIP: the variance minimum of a phase-retrieval fit is broad, so a few hundred
iterations past it suffice."""

HioBeta = Annotated[
    float,
    Field(gt=0, le=1, description="Fienup's HIO feedback β: where ρ' breaks the constraints the iterate "
          "becomes ρ − β ρ'; 0.5 to 1 work, 0.9 is the usual choice"),
]  # fmt: skip
HioIterations = Annotated[int, Field(ge=0, description="HIO iterations at the start of each cycle")]
ErIterations = Annotated[int, Field(ge=0, description="ER iterations that close each cycle")]
Cycles = Annotated[int, Field(ge=1, le=1000, description="how many times the HIO-then-ER cycle runs")]


class CdiAlgorithm(StrEnum):
    """One iteration of Fienup's: error reduction or hybrid input-output."""

    ER = "er"
    HIO = "hio"


class Precision(StrEnum):
    """The complex dtype the solver computes in."""

    COMPLEX64 = "complex64"
    COMPLEX128 = "complex128"


class FitLoss(StrEnum):
    """The data misfit of a DIP phase retrieval (:func:`~phasestream.models.cdi.lodip.data_misfit`)."""

    AMPLITUDE = "amplitude"
    POISSON = "poisson"


Misfit = Annotated[
    FitLoss,
    Field(description="the data misfit: amplitude, mean (|F x| − √Y)²; or poisson, the Poisson negative "
          "log-likelihood"),
]  # fmt: skip


class SupportOptions(SolverOptions):
    """The support: kept as given, or shrink-wrapped to follow the image (Marchesini et al. 2003)."""

    shrink_wrap: bool = Field(
        default=False,
        description="update the support from the image every interval iterations; false keeps it as given",
    )
    interval: int = Field(
        default=SHRINK_WRAP_INTERVAL, ge=1, description="iterations between shrink-wrap updates"
    )
    start_sigma_px: float = Field(
        default=SHRINK_WRAP_START_SIGMA_PX, gt=0, description="σ of the Gaussian blur at the first update"
    )
    min_sigma_px: float = Field(
        default=SHRINK_WRAP_MIN_SIGMA_PX, gt=0, description="the floor σ shrinks to, at most start_sigma_px"
    )
    sigma_factor: float = Field(
        default=SHRINK_WRAP_SIGMA_FACTOR, gt=0, le=1,
        description="σ ← max(sigma_factor σ, min_sigma_px) after each update; 0.99 shrinks it by 1 %",
    )  # fmt: skip
    threshold: float = Field(
        default=SHRINK_WRAP_THRESHOLD, gt=0, lt=1,
        description="fraction of the blurred |image|'s maximum that stays in the support (0.2 in the paper)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _sigma_floor_below_start(self) -> SupportOptions:
        if self.min_sigma_px > self.start_sigma_px:
            raise ValueError(
                f"min_sigma_px={self.min_sigma_px!r} exceeds start_sigma_px={self.start_sigma_px!r}: σ only "
                "shrinks, so give a floor at most the start"
            )
        return self


class ConstraintOptions(SolverOptions):
    """What the object must satisfy besides the support."""

    positivity: bool = Field(
        default=False,
        description="take the object as real and non-negative (Fienup's object-domain constraint)",
    )
    beta: HioBeta = HIO_BETA


class ScheduleOptions(SolverOptions):
    """The iterations of one run: ``cycles`` × (``hio_iterations`` HIO, then ``er_iterations`` ER)."""

    hio_iterations: HioIterations = 180
    er_iterations: ErIterations = 20
    cycles: Cycles = 1

    def steps(self) -> list[tuple[CdiAlgorithm, int]]:
        """The schedule as (algorithm, iterations) pairs, as :meth:`CdiSolver.run` takes it."""
        return [(CdiAlgorithm.HIO, self.hio_iterations), (CdiAlgorithm.ER, self.er_iterations)] * self.cycles

    @property
    def iterations(self) -> int:
        """Iterations of the whole schedule."""
        return (self.hio_iterations + self.er_iterations) * self.cycles


class CdiExecutionOptions(ExecutionOptions):
    """Where HIO/ER runs, its random start and its precision."""

    precision: Precision = Field(
        default=Precision.COMPLEX64,
        description="complex64, or complex128 (twice the memory and time) where single precision's "
        "rounding limits χ², as on high-dose data",
    )


class CdiOptions(SolverOptions):
    """Every option of one HIO/ER reconstruction, grouped; the defaults are HIO/ER on a fixed support."""

    support: SupportOptions = Field(default_factory=SupportOptions)
    constraints: ConstraintOptions = Field(default_factory=ConstraintOptions)
    schedule: ScheduleOptions = Field(default_factory=ScheduleOptions)
    execution: CdiExecutionOptions = Field(default_factory=CdiExecutionOptions)


class HioStatSchedule(ScheduleOptions):
    """HIO-stat's iterations: (450 HIO + 50 ER) × 2 by default."""

    hio_iterations: HioIterations = 450
    er_iterations: ErIterations = 50
    cycles: Cycles = 2


class HioStatOptions(SolverOptions):
    """HIO-stat: HIO/ER with positivity on the sample support, the static region held (always real)."""

    beta: HioBeta = HIO_BETA
    schedule: HioStatSchedule = Field(default_factory=HioStatSchedule)
    execution: ExecutionOptions = Field(default_factory=ExecutionOptions)


class LodipEarlyStopping(EarlyStoppingOptions):
    """LoDIP's ES-WMV: the patience of :data:`LODIP_PATIENCE`."""

    patience: Patience = LODIP_PATIENCE


class LodipOptions(SolverOptions):
    """Every option of a LoDIP fit (:func:`~phasestream.models.cdi.lodip.lodip`), grouped."""

    loss: Misfit = FitLoss.AMPLITUDE
    network: NetworkOptions = Field(default_factory=NetworkOptions)
    optimisation: OptimisationOptions = Field(default_factory=OptimisationOptions)
    early_stopping: LodipEarlyStopping = Field(default_factory=LodipEarlyStopping)
    execution: ExecutionOptions = Field(default_factory=ExecutionOptions)


class DoubleDipOptions(SolverOptions):
    """Every option of a double DIP fit (:func:`~phasestream.models.cdi.double_dip.double_dip`), grouped;
    ``network.representation`` is what the two networks model (real and imaginary part, or magnitude and
    phase)."""

    loss: Misfit = FitLoss.AMPLITUDE
    network: ComplexNetworkOptions = Field(default_factory=ComplexNetworkOptions)
    optimisation: OptimisationOptions = Field(default_factory=OptimisationOptions)
    early_stopping: EarlyStoppingOptions = Field(default_factory=EarlyStoppingOptions)
    execution: ExecutionOptions = Field(default_factory=ExecutionOptions)

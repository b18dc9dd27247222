"""Everything an ePIE/rPIE reconstruction is told, validated once: :class:`EpieOptions`.

The options come in the groups pty-chi uses: how the object and the probe are updated
(:class:`ObjectOptions`, :class:`ProbeOptions`), whether the scan positions are refined
(:class:`PositionOptions`), what holds the update to the data and to physics (:class:`ConstraintOptions`),
and where and how the sweeps run (:class:`ExecutionOptions`). Every bound is declared here and nowhere
else: the solver (:class:`~phasestream.models.ptycho.epie.EpieSolver`) takes an :class:`EpieOptions` as
it is, and the refine stage's configuration embeds the same groups, so a YAML file, a benchmark and a
test are checked by the same rules. Every model is frozen: a solver's options never change under it;
:meth:`EpieOptions.replace` makes a validated copy with some values changed.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from phasestream.errors import ConfigError
from phasestream.models.execution import parse_device
from phasestream.models.options import SolverOptions

DEFAULT_BATCH_SIZE = 32
"""Positions per mini-batch, tuned on two CPU cores: for 516 patterns of 128×128, batches of 8 to 64 took
the same time per epoch (within 10 %) and reached the same error after 5 epochs; 32 keeps each complex
batch buffer at 4 MiB. A GPU wants larger batches (hundreds) to fill its cores."""


class EpieVariant(StrEnum):
    """How an epoch visits the positions: one at a time, or in mini-batches solved together."""

    SEQUENTIAL = "sequential"
    BATCHED = "batched"


class UpdateRule(StrEnum):
    """The update's denominator: ePIE's max|F|², or rPIE's (1 − w)|F|² + w max|F|² (Maiden et al. 2017)."""

    EPIE = "epie"
    RPIE = "rpie"


class FourierConstraint(StrEnum):
    """How a step pulls the far field towards the counts (:mod:`phasestream.models.ptycho.fourier_update`)."""

    PROJECTION = "projection"
    POISSON = "poisson"


class ObjectOptions(SolverOptions):
    """How each step moves the object (the sample's complex transmission)."""

    step: float = Field(
        default=1.0, gt=0, le=2,
        description="ePIE's α: the fraction of the computed correction applied to the object at each step; "
        "1 is the paper's, and ePIE is stable in (0, 2]",
    )  # fmt: skip
    rpie_alpha: float = Field(
        default=0.1, gt=0, le=1,
        description="rPIE's object weight α (update_rule rpie only): smaller values take bigger steps where "
        "the probe is dim; 0.1 as Maiden et al. recommend, 1 is ePIE's step",
    )  # fmt: skip


class ProbeOptions(SolverOptions):
    """How the probe (the beam's complex illumination) is refined."""

    step: float = Field(
        default=1.0, gt=0, le=2,
        description="ePIE's β: the fraction of the computed correction applied to the probe at each step",
    )  # fmt: skip
    rpie_beta: float = Field(
        default=1.0, gt=0, le=1,
        description="rPIE's probe weight β (update_rule rpie only); 1 keeps ePIE's probe step",
    )  # fmt: skip
    update_start_epoch: int | None = Field(
        default=2, ge=0,
        description="first epoch (counting from 0) that updates the probe: a few object-only epochs keep a "
        "rough probe guess from absorbing object structure; None keeps the probe as given",
    )  # fmt: skip
    modes: int = Field(
        default=1, ge=1, le=16,
        description="incoherent probe modes for a partially coherent beam (mixed states); 1 is a coherent "
        "probe",
    )  # fmt: skip


class PositionOptions(SolverOptions):
    """Whether the scan positions are refined, and how far they may move."""

    correction_start_epoch: int | None = Field(
        default=None, ge=0,
        description="refine the scan positions (sub-pixel) from this epoch on, for stages whose encoders "
        "err; None keeps the positions as measured",
    )  # fmt: skip
    max_step_px: float = Field(
        default=1.0, gt=0, le=8,
        description="largest correction of one position per epoch and axis, in object pixels",
    )  # fmt: skip


class ConstraintOptions(SolverOptions):
    """What pulls each exit wave towards the measured counts, and the physical bounds kept after epochs."""

    fourier_constraint: FourierConstraint = Field(
        default=FourierConstraint.PROJECTION,
        description="projection puts the measured modulus on the model; poisson takes a Poisson likelihood "
        "step instead, better at low dose (a few photons per pixel)",
    )
    fix_probe_power: bool = Field(
        default=False,
        description="hold the probe's total power from its first update on, so that probe and object cannot "
        "trade scale (needed at low dose with the probe updated, together with max_object_amplitude)",
    )
    probe_power_photons: float | None = Field(
        default=None, gt=0,
        description="with fix_probe_power: the direct beam's photons per frame (an empty-beam frame's total) "
        "to hold the probe at, which makes |O| the sample's transmission; None holds the start probe's power",
    )  # fmt: skip
    max_object_amplitude: float | None = Field(
        default=None, gt=0,
        description="bound on the object's amplitude |O|, 1 for a transmission sample (it cannot amplify "
        "the beam); None leaves it free",
    )  # fmt: skip

    @model_validator(mode="after")
    def _power_needs_fixing(self) -> ConstraintOptions:
        if self.probe_power_photons is not None and not self.fix_probe_power:
            raise ValueError(
                f"probe_power_photons={self.probe_power_photons!r} is given but fix_probe_power is false: "
                "set fix_probe_power to hold the probe at that power, or leave probe_power_photons out"
            )
        return self


class ExecutionOptions(SolverOptions):
    """Where the sweeps run and in what order; none of it changes what the reconstruction converges to."""

    variant: EpieVariant = Field(
        default=EpieVariant.BATCHED,
        description="sequential visits one position at a time (the paper's algorithm); batched solves a "
        "mini-batch of positions at once, much faster on a GPU",
    )
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE, ge=1, le=4096,
        description="positions per mini-batch (batched variant): 32 suits a CPU, a GPU wants hundreds; 1 "
        "reproduces sequential ePIE",
    )  # fmt: skip
    seed: int = Field(
        default=0, description="seeds the random order of positions in each epoch and the extra probe modes"
    )
    device: str | None = Field(
        default=None, description="torch device: cpu, cuda or cuda:<index>; None or auto: cuda when present"
    )
    num_threads: int | None = Field(
        default=None, ge=1,
        description="CPU threads for torch during each epoch; None: 1 for the sequential variant on a CPU "
        "(its small operations gain nothing from more), else the process's setting",
    )  # fmt: skip

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | None) -> str | None:
        try:
            parse_device(device)
        except ConfigError as exc:  # a ValueError is what pydantic reports with the field's name
            raise ValueError(str(exc)) from exc
        return device


class PineOptions(SolverOptions):
    """PINE's regularisation step O ← (1 − ρ) O + ρ D(O) after every sweep (:mod:`.pine`)."""

    rho: float = Field(
        default=0.49, gt=0, lt=1,
        description="PINE's ρ, how far each step moves the object towards the denoised one; below 1/2 the "
        "step is averaged, which keeps the iteration stable",
    )  # fmt: skip


class EpieOptions(SolverOptions):
    """Every option of one ePIE/rPIE solver, grouped; the defaults are plain ePIE in mini-batches."""

    update_rule: UpdateRule = Field(
        default=UpdateRule.EPIE,
        description="epie: the classic step; rpie: regularised steps (object.rpie_alpha, probe.rpie_beta) "
        "that converge faster on well-exposed data",
    )
    object: ObjectOptions = Field(default_factory=ObjectOptions)
    probe: ProbeOptions = Field(default_factory=ProbeOptions)
    positions: PositionOptions = Field(default_factory=PositionOptions)
    constraints: ConstraintOptions = Field(default_factory=ConstraintOptions)
    execution: ExecutionOptions = Field(default_factory=ExecutionOptions)

    @property
    def object_weight(self) -> float:
        """w of the object update's denominator (1 − w)|P|² + w max|P|²; 1 for ePIE."""
        return self.object.rpie_alpha if self.update_rule is UpdateRule.RPIE else 1.0

    @property
    def probe_weight(self) -> float:
        """w of the probe update's denominator (1 − w)|O|² + w max|O|²; 1 for ePIE."""
        return self.probe.rpie_beta if self.update_rule is UpdateRule.RPIE else 1.0

"""Everything a deep image prior fit is told, validated once: the option groups of the DIP solvers.

The options come in groups, in the manner of pty-chi: the network (:class:`NetworkOptions`; with the map
between complex values and two real channels, :class:`ComplexNetworkOptions`), the Adam fit
(:class:`OptimisationOptions`), ES-WMV early stopping (:class:`EarlyStoppingOptions`) and where the fit
runs (:class:`ExecutionOptions`). :class:`DenoiseOptions` holds them for
:func:`~phasestream.models.nets.dip.dip_denoise`; LoDIP and double DIP hold the same groups, and HIO/ER
its execution group (:mod:`phasestream.models.cdi.options`); the denoise and cdi stages embed them in their
configurations, so a YAML file, a benchmark and a test are checked by the same rules. The network
presets (:class:`DipArchitecture`, :data:`ARCHITECTURES`) and a network of one's own
(:class:`SkipNetConfig`) are declared here too, so that importing the options (a stage's configuration)
does not load torch.

Every bound is declared once. Where solvers or stages start from other defaults (LoDIP's patience, a
stage's iteration cap) they subclass a group and set the default with the annotated type declared here
(:data:`MaxIterations`, :data:`Window`, :data:`Patience`, :data:`NumThreads`), so that a group given in
part keeps that solver's defaults for the rest. Every model is frozen: :meth:`SolverOptions.replace` makes
a validated copy with some values changed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phasestream.errors import ConfigError
from phasestream.models.execution import parse_device
from phasestream.models.options import SolverOptions

DEFAULT_INPUT_NOISE_STD = 1 / 30
"""σ_z of Ulyanov et al.'s denoising."""
DEFAULT_LEARNING_RATE = 0.01
"""Adam step of Ulyanov et al."""
DEFAULT_MAX_ITERATIONS = 3000
DEFAULT_WINDOW = 100
DEFAULT_PATIENCE = 500
"""ES-WMV window and patience (iterations). A window of 100 averages over the iteration-to-iteration jitter
of Adam and of the input noise; a patience of a few hundred iterations sees the variance rise well past its
minimum on the images of this project and keeps a CPU denoise to tens of seconds."""

INPUT_CHANNELS = 32
"""Channels of the random input z in Ulyanov et al.'s denoising experiments."""

MaxIterations = Annotated[
    int, Field(ge=1, description="cap on fitting iterations (Adam steps); ES-WMV usually stops earlier")
]
Window = Annotated[
    int,
    Field(ge=2, description="ES-WMV window: the running variance is taken over this many latest outputs"),
]
Patience = Annotated[
    int,
    Field(ge=1, description="ES-WMV patience: the fit stops after this many iterations without a new "
          "variance minimum and returns the output at the minimum"),
]  # fmt: skip
NumThreads = Annotated[
    int | None,
    Field(ge=1, description="CPU threads for torch while the solver runs; None keeps the process's setting"),
]


class ComplexChannels(StrEnum):
    """How complex values map to two real network channels."""

    REAL_IMAG = "real_imag"
    AMPLITUDE_PHASE = "amplitude_phase"


class DipArchitecture(StrEnum):
    """The two skip networks of Erin et al. (2025)."""

    ARCH1 = "arch1"
    ARCH2 = "arch2"


class SkipNetConfig(BaseModel):
    """Filters per level (down and up paths alike) and skip filters per level, shallowest first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        min_length=1, max_length=8, description="filters of each level, shallowest first"
    )
    skip_channels: tuple[Annotated[int, Field(ge=0)], ...] = Field(
        min_length=1, max_length=8, description="skip filters of each level, shallowest first; 0: no skip"
    )
    input_channels: int = Field(default=INPUT_CHANNELS, ge=1, description="channels of the random input z")
    kernel_size: int = Field(default=3, ge=1, description="side of the convolutions, odd")

    @model_validator(mode="after")
    def _levels_agree(self) -> SkipNetConfig:
        if len(self.channels) != len(self.skip_channels):
            raise ValueError(
                f"channels {self.channels} and skip_channels {self.skip_channels} must have one entry per "
                "level"
            )
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd so that convolutions keep the grid")
        return self

    @property
    def levels(self) -> int:
        return len(self.channels)


ARCHITECTURES = {
    DipArchitecture.ARCH1: SkipNetConfig(channels=(8, 16, 32, 64, 128), skip_channels=(0, 0, 0, 4, 4)),
    DipArchitecture.ARCH2: SkipNetConfig(channels=(128,) * 6, skip_channels=(4,) * 6),
}


class NetworkOptions(SolverOptions):
    """The untrained skip network (:mod:`phasestream.models.nets.skip_net`)."""

    architecture: DipArchitecture | SkipNetConfig = Field(
        default=DipArchitecture.ARCH1,
        description="arch1 or arch2 (Erin et al. 2025), or {channels: [...], skip_channels: [...]}",
    )


class ComplexNetworkOptions(NetworkOptions):
    """The network and how it represents a complex image."""

    representation: ComplexChannels = Field(
        default=ComplexChannels.REAL_IMAG,
        description="the two real channels of a complex image: real_imag, or amplitude_phase, which suits "
        "phases that do not wrap",
    )


class OptimisationOptions(SolverOptions):
    """Adam on the network's weights, from a fixed input perturbed at every step (Ulyanov et al.)."""

    max_iterations: MaxIterations = DEFAULT_MAX_ITERATIONS
    lr: float = Field(default=DEFAULT_LEARNING_RATE, gt=0, description="Adam's step; Ulyanov et al. use 0.01")
    input_noise_std: float = Field(
        default=DEFAULT_INPUT_NOISE_STD, ge=0,
        description="σ_z: std of the Gaussian noise added to the network's input at every step (1/30 in "
        "Ulyanov et al.'s denoising); it regularises the fit",
    )  # fmt: skip


class EarlyStoppingOptions(SolverOptions):
    """ES-WMV, windowed-moving-variance early stopping (Wang et al. 2023)."""

    window: Window = DEFAULT_WINDOW
    patience: Patience = DEFAULT_PATIENCE


class ExecutionOptions(SolverOptions):
    """Where and with what random draws a solver runs."""

    device: str | None = Field(
        default=None, description="torch device: cpu, cuda or cuda:<index>; None or auto: cuda when present"
    )
    num_threads: NumThreads = None
    seed: int = Field(
        default=0, ge=0,
        description="seeds what the solver draws: network weights, network input and its noise, random "
        "starts (HIO-stat draws nothing)",
    )  # fmt: skip

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | None) -> str | None:
        try:
            parse_device(device)
        except ConfigError as exc:  # a ValueError is what pydantic reports with the field's name
            raise ValueError(str(exc)) from exc
        return device


class DenoiseOptions(SolverOptions):
    """Every option of a DIP denoise (:func:`~phasestream.models.nets.dip.dip_denoise`), grouped."""

    network: ComplexNetworkOptions = Field(default_factory=ComplexNetworkOptions)
    optimisation: OptimisationOptions = Field(default_factory=OptimisationOptions)
    early_stopping: EarlyStoppingOptions = Field(default_factory=EarlyStoppingOptions)
    execution: ExecutionOptions = Field(default_factory=ExecutionOptions)

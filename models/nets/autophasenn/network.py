"""AutoPhaseNN: single-shot phase retrieval by a CNN trained without real-space images; 3D and 2D.

References: Y. Yao, H. Chan, S. Sankaranarayanan, P. Balaprakash, R. J. Harder and M. J. Cherukara,
"AutoPhaseNN: unsupervised physics-aware deep learning of 3D nanoscale Bragg coherent diffraction imaging",
npj Comput. Mater. 8, 124 (2022); M. J. Cherukara, T. Zhou, Y. Nashed, P. Enfedaque, A. Hexemer, R. J. Harder
and M. V. Holt, "AI-enabled high-resolution scanning coherent diffraction imaging", Appl. Phys. Lett. 117,
044103 (2020) (PtychoNN, the 2D ptychography network whose size the 2D variant takes).

**Network** (the paper's Fig. 1): one encoder, two decoders. Each encoder level is conv 3 → LeakyReLU(0.01)
→ batch norm, then a stride-2 conv → LeakyReLU → batch norm that halves the grid (the authors' PyTorch code
offers strided convs in place of max pooling; on a CPU they cost half as much). Each decoder level is twice
conv → LeakyReLU → batch norm, then ×2 linear upsampling. The amplitude head ends in a sigmoid, the phase head
in π·tanh. The paper's filter widths are 32…512; ``widths`` is configurable so that a small variant trains on
a CPU.

**3D, Bragg CDI.** Input a = sqrt(I) on a 64³ grid, max-normalised to 1. The decoders stop at 32³: the object
lives in the central half of the box (oversampling ≥ 2) and is zero outside it. Support S = {A ≥ 0.1} and
ρ = A·1_S·e^{iφ}. The physics-aware loss is the mean absolute error between a and |Fρ| / max|Fρ| (the
input is max-normalised, so the prediction's far field is too, as in the authors' code), with F the
project's centred, orthonormal FFT (:func:`phasestream.models.cdi.phasing.cdi_far_field`). No real-space image
enters the training.

**2D, ptychography** (PtychoNN-sized: 64×64 in, 64×64 out). A ptychography frame is the far field of the
exit wave P·O, with P the known probe (stored with the weights). The decoders return to the full window and
predict the object transmission O = A·e^{iφ}, A ∈ (0, 1) since a passive specimen does not amplify. The
pattern is given in units of the incident beam, a = sqrt(I / N_incident) with Σ|P|² = 1, so the loss
MAE(a, |F(P·O)|) (F = :func:`phasestream.models.physics.far_field`) keeps the transmission's scale. The
probe confines the exit wave, so the 2D object needs no support; O is only determined where P is not small.
The loss is blind to a global phase and, in 3D, to a translation and to the twin image ρ*(−r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from phasestream.errors import ConfigError
from phasestream.models.cdi.phasing import cdi_far_field
from phasestream.models.physics import far_field

INPUT_SIZE_PX = 64
"""Pattern edge of both networks: 64³ in 3D (the paper), 64×64 in 2D (PtychoNN)."""
SUPPORT_THRESHOLD = 0.1
"""The 3D support is where the predicted amplitude reaches this (the paper's threshold)."""
LEAKY_RELU_SLOPE = 0.01
PEAK_NORMALISATION_FLOOR = 1e-12
"""Keeps max|Fρ| nonzero when a 3D prediction's support is empty; far below any real peak."""


class AutoPhaseNNArchitecture(BaseModel):
    """Which network: dimension, filter widths per encoder level and the input edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: Literal[2, 3]
    widths: tuple[int, ...] = Field(min_length=2, max_length=6, description="filters per encoder level")
    input_size_px: int = Field(default=INPUT_SIZE_PX, ge=16, le=1024)

    @model_validator(mode="after")
    def _levels_fit_the_grid(self) -> AutoPhaseNNArchitecture:
        if any(width < 1 for width in self.widths):
            raise ValueError(f"widths={self.widths}: every level needs at least one filter")
        levels = len(self.widths)
        if self.input_size_px % 2**levels:
            raise ValueError(
                f"input_size_px={self.input_size_px} is not divisible by 2^{levels}: "
                f"{levels} encoder levels each halve the grid"
            )
        return self

    def describe(self) -> str:
        edge = self.input_size_px
        shape = "×".join([str(edge)] * self.dim)
        return f"{self.dim}D AutoPhaseNN ({shape} input, widths {list(self.widths)})"

    @property
    def output_size_px(self) -> int:
        """3D predicts the central half of the box, 2D the whole window."""
        return self.input_size_px // 2 if self.dim == 3 else self.input_size_px


class _OneDnnConvolution:
    """Inference on the CPU always through oneDNN.

    For a batch of one PyTorch takes its im2col kernel when N·C·D·H ≤ 20480 (a heuristic tuned for 2D
    images), and on this network's inner levels that kernel is several times slower than oneDNN. Forcing
    oneDNN, with the channels-last layout that ``load_autophasenn`` gives CPU models, took one 64³ prediction
    from 122 to 26 ms on one core and a 64×64 frame from 5.5 to 2.9 ms (docs/benchmarks.md). Training
    (gradients on) keeps PyTorch's own choice.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        cpu_inference = (
            input.device.type == "cpu" and input.dtype == torch.float32 and not torch.is_grad_enabled()
        )
        if cpu_inference and torch.backends.mkldnn.is_available():
            return torch.ops.aten.mkldnn_convolution(
                input, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super().forward(input)


class _Conv2d(_OneDnnConvolution, nn.Conv2d):
    pass


class _Conv3d(_OneDnnConvolution, nn.Conv3d):
    pass


def _convolution(dim: int, c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    conv = _Conv3d if dim == 3 else _Conv2d
    norm = nn.BatchNorm3d if dim == 3 else nn.BatchNorm2d
    return [conv(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(LEAKY_RELU_SLOPE), norm(c_out)]


def _encoder(architecture: AutoPhaseNNArchitecture) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 1
    for width in architecture.widths:
        layers += _convolution(architecture.dim, channels, width)
        layers += _convolution(architecture.dim, width, width, stride=2)
        channels = width
    return nn.Sequential(*layers)


def _decoder(architecture: AutoPhaseNNArchitecture, head: nn.Module) -> nn.Sequential:
    dim = architecture.dim
    widths = list(reversed(architecture.widths[:-1]))
    if dim == 2:
        widths.append(architecture.widths[0])
    layers: list[nn.Module] = []
    channels = architecture.widths[-1]
    for width in widths:
        layers += _convolution(dim, channels, width) + _convolution(dim, width, width)
        layers.append(nn.Upsample(scale_factor=2, mode="trilinear" if dim == 3 else "bilinear"))
        channels = width
    conv = _Conv3d if dim == 3 else _Conv2d
    return nn.Sequential(*layers, conv(channels, 1, 3, padding=1), head)


def far_field_amplitude(exit_wave: torch.Tensor, dim: int) -> torch.Tensor:
    """|F ψ| over the last ``dim`` axes, with the project's centred, orthonormal far field."""
    spectrum = far_field(exit_wave) if dim == 2 else cdi_far_field(exit_wave, dim)
    return spectrum.abs()


@dataclass(frozen=True)
class AutoPhaseNNOutput:
    """One forward pass over a batch (torch tensors, batch first)."""

    object: torch.Tensor
    """complex64: 3D ρ in the full box (zero outside the central half); 2D the transmission O."""
    amplitude: torch.Tensor
    """|object|; in 3D zero off the support."""
    phase: torch.Tensor
    """π·tanh head, in (−π, π); in 3D zero outside the central half."""
    support: torch.Tensor
    """bool: 3D {A ≥ 0.1}; 2D everywhere."""
    modelled_amplitude: torch.Tensor
    """|F(prediction)| as the loss compares it with the input: 3D max-normalised, 2D |F(P·O)|."""


class AutoPhaseNN(nn.Module):
    """The network and its forward model; 2D needs the probe (complex, input_size_px², Σ|P|² = 1)."""

    def __init__(self, architecture: AutoPhaseNNArchitecture, probe: torch.Tensor | None = None) -> None:
        super().__init__()
        self.architecture = architecture
        self.encoder = _encoder(architecture)
        self.amplitude_decoder = _decoder(architecture, nn.Sigmoid())
        self.phase_decoder = _decoder(architecture, nn.Tanh())
        edge = architecture.input_size_px
        # Σ a² ≤ 1 spreads a 2D pattern over edge² pixels: scaling by the edge brings it to order one.
        self._input_gain = float(edge) if architecture.dim == 2 else 1.0
        if architecture.dim == 2:
            if probe is None:
                raise ConfigError("the 2D AutoPhaseNN needs the probe: pass a complex (64, 64) probe")
            probe = torch.as_tensor(probe).to(torch.complex64)
            if tuple(probe.shape) != (edge, edge):
                raise ConfigError(
                    f"probe has shape {tuple(probe.shape)}: the 2D network needs ({edge}, {edge})"
                )
            self.register_buffer("probe", probe)

    def forward(self, measured_amplitude: torch.Tensor) -> AutoPhaseNNOutput:
        """``measured_amplitude``: (batch, *grid); 3D max-normalised, 2D in units of the incident beam."""
        dim = self.architecture.dim
        features = self.encoder(measured_amplitude.unsqueeze(1) * self._input_gain)
        amplitude = self.amplitude_decoder(features).squeeze(1)
        phase = math.pi * self.phase_decoder(features).squeeze(1)
        dims = tuple(range(-dim, 0))
        if dim == 3:
            support = amplitude >= SUPPORT_THRESHOLD
            amplitude = amplitude * support
            margin = (self.architecture.input_size_px - self.architecture.output_size_px) // 2
            padding = (margin,) * (2 * dim)
            amplitude = nn.functional.pad(amplitude, padding)
            phase = nn.functional.pad(phase, padding)
            support = nn.functional.pad(support, padding)
            obj = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
            modelled = far_field_amplitude(obj, dim)
            modelled = modelled / modelled.amax(dim=dims, keepdim=True).clamp_min(PEAK_NORMALISATION_FLOOR)
        else:
            support = torch.ones_like(amplitude, dtype=torch.bool)
            obj = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
            modelled = far_field_amplitude(self.probe * obj, dim)
        return AutoPhaseNNOutput(obj, amplitude, phase, support, modelled)


def physics_loss(output: AutoPhaseNNOutput, measured_amplitude: torch.Tensor) -> torch.Tensor:
    """The paper's unsupervised loss: mean absolute error between the input amplitude and |F(prediction)|."""
    return (output.modelled_amplitude - measured_amplitude).abs().mean()

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
import pickle
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.models.cdi.phasing import CdiAlgorithm, CdiResult, CdiSolver, cdi_far_field
from phasestream.models.cdi.support import ShrinkWrap
from phasestream.models.nets.shipped_weights import shipped_weights
from phasestream.models.physics import far_field
from phasestream.models.ptycho.epie import default_device

INPUT_SIZE_PX = 64
"""Pattern edge of both networks: 64³ in 3D (the paper), 64×64 in 2D (PtychoNN)."""
SUPPORT_THRESHOLD = 0.1
"""The 3D support is where the predicted amplitude reaches this (the paper's threshold)."""
LEAKY_RELU_SLOPE = 0.01
WEIGHTS_FORMAT = "phasestream-autophasenn-1"
AUTOCORRELATION_THRESHOLD = 0.002
"""The autocorrelation of a compact object falls towards its edge (twice the object's width) over about two
decades; 0.2 % of its peak finds that edge on the measured BCDI pattern in ``tests/data`` to within 15 % of
the oversampling its source quotes, where 4 % (a usual support threshold) underestimates the width by 40 %."""
BIN_OVERSAMPLING_MARGIN = 1.1
"""Binning by k needs oversampling ≥ 2k; the estimate runs up to 10 % high on simulated crystals, so binning
asks for 10 % more."""
PEAK_NORMALISATION_FLOOR = 1e-12
"""Keeps max|Fρ| nonzero when a 3D prediction's support is empty; far below any real peak."""


class FitAction(StrEnum):
    """What :func:`fit_pattern` did to one axis of a pattern."""

    KEEP = "keep"
    CROP = "crop"
    BIN = "bin"


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


def default_weights_path(dim: int) -> Path:
    return shipped_weights(f"autophasenn_{dim}d.pt")


def weights_payload(model: AutoPhaseNN, **extra: object) -> dict:
    """What a weights file holds: format tag, architecture, state dict, and ``extra`` (training record…)."""
    return {
        "format": WEIGHTS_FORMAT,
        "architecture": model.architecture.model_dump(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        **extra,
    }


def _architecture_from_state(state: dict) -> str:
    """Describe the network a state dict belongs to, from its tensor shapes, for error messages."""
    convs = [
        tensor for name, tensor in state.items() if name.startswith("encoder.") and tensor.ndim in (4, 5)
    ]
    if not convs:
        return "an unknown network (no encoder convolutions)"
    dim = convs[0].ndim - 2
    widths = [int(tensor.shape[0]) for tensor in convs[::2]]
    return f"{dim}D AutoPhaseNN (widths {widths})"


def load_autophasenn(
    dim: int,
    path: str | Path | None = None,
    device: torch.device | str | None = None,
    architecture: AutoPhaseNNArchitecture | None = None,
) -> AutoPhaseNN:
    """Load weights (default: the shipped ``models/weights/autophasenn_{dim}d.pt``) in eval mode.

    ``architecture``, when given, must match the file's. Raises ConfigError naming the architecture asked
    for and the one in the file when they differ, and when the file is missing or not AutoPhaseNN weights.
    """
    if dim not in (2, 3):
        raise ConfigError(f"dim={dim!r}: AutoPhaseNN exists in 2D (ptychography) and 3D (Bragg CDI)")
    path = Path(path) if path is not None else default_weights_path(dim)
    grid = "×".join([str(INPUT_SIZE_PX)] * dim)
    wanted = architecture.describe() if architecture is not None else f"a {dim}D AutoPhaseNN ({grid} input)"
    if not path.is_file():
        raise ConfigError(
            f"no AutoPhaseNN weights at {path}: train them with `phasestream train autophasenn --dim {dim}`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise ConfigError(
            f"{path} is not a readable torch weights file ({error}): retrain or re-download"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"{path} does not hold {WEIGHTS_FORMAT} weights: expected {wanted}")
    try:
        found = AutoPhaseNNArchitecture(**payload["architecture"])
    except (ValidationError, TypeError) as error:
        raise ConfigError(f"{path} describes no valid architecture ({error}); expected {wanted}") from error
    if found.dim != dim or (architecture is not None and found != architecture):
        raise ConfigError(
            f"{path} holds weights for {found.describe()}, but {wanted} was asked for: "
            f"pass the weights of {wanted}, or ask for {found.describe()}"
        )
    state = payload["state_dict"]
    placeholder_probe = state.get("probe") if dim == 2 else None
    model = AutoPhaseNN(found, probe=placeholder_probe)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"{path} declares {found.describe()} but its tensors belong to "
            f"{_architecture_from_state(state)}: the file is inconsistent; retrain it"
        ) from error
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type == "cpu" and torch.backends.mkldnn.is_available():
        # oneDNN's fastest kernels want channels last (see _OneDnnConvolution).
        model = model.to(memory_format=torch.channels_last_3d if dim == 3 else torch.channels_last)
    return model.to(resolved).eval()


# ----------------------------------------------------------------------------------------------------------
# Preparing a measured pattern for the network


@dataclass(frozen=True)
class PatternFit:
    """How a pattern was brought to the network's grid, axis by axis."""

    input_shape: tuple[int, ...]
    actions: tuple[FitAction, ...]
    bin_factors: tuple[int, ...]


def estimate_oversampling(amplitude: np.ndarray, dim: int) -> np.ndarray:
    """Linear oversampling per axis, n / object width, from the extent of the pattern's autocorrelation.

    The autocorrelation F⁻¹(I) of an object w pixels wide spans 2w − 1 pixels, so σ ≈ 2n / extent. A leading
    batch axis is summed over first (the frames of one scan share their geometry).
    """
    intensity = np.asarray(amplitude, dtype=np.float64) ** 2
    if intensity.ndim > dim:
        intensity = intensity.reshape(-1, *intensity.shape[-dim:]).sum(axis=0)
    autocorrelation = np.abs(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(intensity))))
    inside = autocorrelation >= AUTOCORRELATION_THRESHOLD * autocorrelation.max()
    oversampling = np.empty(dim)
    for axis, n in enumerate(intensity.shape):
        profile = inside.any(axis=tuple(other for other in range(dim) if other != axis))
        offsets = np.abs(np.nonzero(profile)[0] - n // 2)
        oversampling[axis] = 2 * n / (2 * offsets.max() + 1)
    return oversampling


def _bin_axis(pattern: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Sum blocks of ``factor`` pixels along ``axis``, with the zero frequency kept in the middle block.

    Rolling by factor // 2 first puts the centre pixel n//2 at the middle of block (n/factor)//2, the centre
    of the binned pattern; a block boundary through the centre would add a half-pixel phase ramp to the
    object. The roll wraps factor // 2 edge pixels (the highest frequencies, the faintest) round.
    """
    rolled = np.roll(pattern, factor // 2, axis=axis)
    shape = list(rolled.shape)
    shape[axis : axis + 1] = [shape[axis] // factor, factor]
    return rolled.reshape(shape).sum(axis=axis + 1)


def fit_pattern(
    amplitude: np.ndarray, dim: int, size_px: int = INPUT_SIZE_PX
) -> tuple[np.ndarray, PatternFit]:
    """Bring a centred amplitude (optionally with a leading batch axis) to ``size_px`` on every axis.

    Per axis: a pattern of the right size is kept. A larger one is binned by k = n / size when k is a whole
    number and the object stays in the central half after binning (binning keeps the pixel size and cuts the
    field of view by k, so it needs oversampling ≥ 2k); otherwise it is cropped about its centre (cropping
    keeps the field of view and coarsens the pixel, which is always sound, at some loss of resolution).
    Binning adds intensities, so the amplitude is binned as sqrt(Σ a²). A smaller pattern is refused:
    padding would invent frequencies nobody measured.
    """
    spatial = tuple(amplitude.shape[-dim:])
    expected = (size_px,) * dim
    if any(n < size_px for n in spatial):
        raise FrameValidationError(
            f"pattern has shape {spatial} but the {dim}D AutoPhaseNN expects {expected}: a smaller pattern "
            "cannot be fitted soundly (padding would invent unmeasured frequencies); crop or bin the "
            f"detector to {expected}",
            reason="wrong_shape",
        )
    actions: list[FitAction] = []
    factors: list[int] = []
    oversampling = None
    intensity = np.asarray(amplitude, dtype=np.float64) ** 2
    for offset, n in enumerate(spatial):
        axis = intensity.ndim - dim + offset
        factor = n // size_px
        if n == size_px:
            actions.append(FitAction.KEEP)
            factors.append(1)
            continue
        if n % size_px == 0 and oversampling is None:
            oversampling = estimate_oversampling(amplitude, dim)
        if n % size_px == 0 and oversampling[offset] >= 2 * factor * BIN_OVERSAMPLING_MARGIN:
            intensity = _bin_axis(intensity, axis, factor)
            actions.append(FitAction.BIN)
            factors.append(factor)
        else:
            start = n // 2 - size_px // 2
            intensity = np.take(intensity, np.arange(start, start + size_px), axis=axis)
            actions.append(FitAction.CROP)
            factors.append(1)
    fit = PatternFit(tuple(amplitude.shape), tuple(actions), tuple(factors))
    return np.sqrt(intensity).astype(np.float32), fit


def apply_fit(amplitude: np.ndarray, fit: PatternFit, size_px: int = INPUT_SIZE_PX) -> np.ndarray:
    """Bring more patterns to the network's grid exactly as ``fit`` (from :func:`fit_pattern`) did.

    A live scan fixes its fit on the first frames, so that every frame's object pixel is the same; a
    pattern of another shape is refused with the shape the fit expects.
    """
    dim = len(fit.actions)
    expected = fit.input_shape[-dim:]
    if tuple(amplitude.shape[-dim:]) != tuple(expected):
        raise FrameValidationError(
            f"pattern has shape {tuple(amplitude.shape[-dim:])} but this scan's frames were {expected}: "
            "the detector shape changed within the scan",
            reason="wrong_shape",
        )
    intensity = np.asarray(amplitude, dtype=np.float64) ** 2
    for offset, (action, factor) in enumerate(zip(fit.actions, fit.bin_factors, strict=True)):
        axis = intensity.ndim - dim + offset
        n = intensity.shape[axis]
        if action is FitAction.BIN:
            intensity = _bin_axis(intensity, axis, factor)
        elif action is FitAction.CROP:
            start = n // 2 - size_px // 2
            intensity = np.take(intensity, np.arange(start, start + size_px), axis=axis)
    return np.sqrt(intensity).astype(np.float32)


def fitted_probe(probe: np.ndarray, size_px: int = INPUT_SIZE_PX, bin_factor: int = 1) -> np.ndarray:
    """The probe a network sees when an N-pixel detector is binned by ``bin_factor`` and then cropped to its
    central ``size_px`` pixels.

    Binning the far field by k keeps the object pixel and cuts the field of view to N / k (so the probe must
    fit in the central N / k pixels); a centred crop keeps the detector pixel and drops the high angles, so
    the object pixel grows by (N / k) / size_px and the probe is low-passed. Here: the central N / k pixels of
    the probe, its far field cut to the central ``size_px``², back in real space on the coarser grid (centred
    on pixel size_px // 2), Σ|P|² = 1. A 2D network for fitted frames is trained with this probe.
    """
    probe = np.asarray(probe)
    n = probe.shape[-1]
    field_px = n // bin_factor if bin_factor >= 1 else 0
    if probe.ndim != 2 or probe.shape[0] != n or field_px < size_px:
        raise ConfigError(
            f"probe has shape {probe.shape} and bin_factor={bin_factor}: pass a square probe of at least "
            f"{size_px} × bin_factor pixels"
        )
    first = n // 2 - field_px // 2
    field = probe[first : first + field_px, first : first + field_px].astype(np.complex128)
    start = field_px // 2 - size_px // 2
    spectrum = np.fft.fftshift(np.fft.fft2(field, norm="ortho"))
    window = spectrum[start : start + size_px, start : start + size_px]
    coarse = np.fft.ifft2(np.fft.ifftshift(window), norm="ortho")
    return (coarse / np.linalg.norm(coarse)).astype(np.complex64)


def validate_network_input(amplitude: np.ndarray, dim: int) -> None:
    """Raise FrameValidationError for a pattern the network must not see: wrong rank, complex, NaN, negative,
    zero everywhere, or saturated (a plateau of at least 3^dim pixels at the maximum, or an integer pattern
    at its type's maximum: the true peak is unknown, and the network would read a flat top as structure)."""
    if amplitude.ndim not in (dim, dim + 1):
        raise FrameValidationError(
            f"pattern has shape {amplitude.shape}: the {dim}D AutoPhaseNN takes one {dim}D pattern "
            f"or a batch (n, {', '.join(['size'] * dim)})",
            reason="wrong_shape",
        )
    if np.iscomplexobj(amplitude):
        raise FrameValidationError(
            "pattern is complex: pass the measured amplitude sqrt(I), a real array", reason="complex"
        )
    frames = amplitude.reshape(-1, *amplitude.shape[-dim:])
    for index, frame in enumerate(frames):
        where = f"frame {index}" if amplitude.ndim > dim else "pattern"
        if not np.isfinite(frame).all():
            raise FrameValidationError(
                f"{where} holds NaN or infinite values: replace or mask those pixels", reason="not_finite"
            )
        if (frame < 0).any():
            raise FrameValidationError(
                f"{where} holds negative values (minimum {frame.min()!r}): clip the background "
                "subtraction at 0",
                reason="negative",
            )
        peak = frame.max()
        if not peak > 0:
            raise FrameValidationError(
                f"{where} is zero everywhere: no diffraction was recorded; check the shutter and the "
                "detector",
                reason="zero_photons",
            )
        if np.issubdtype(frame.dtype, np.integer) and peak == np.iinfo(frame.dtype).max:
            raise FrameValidationError(
                f"{where} reaches {peak}, the maximum of {frame.dtype}: the detector saturated; "
                "attenuate the beam or mask the saturated pixels",
                reason="saturated",
            )
        plateau_px = int(np.count_nonzero(frame >= peak * (1 - 1e-6)))
        if plateau_px >= 3**dim:
            raise FrameValidationError(
                f"{where} has {plateau_px} pixels at its maximum {peak!r}: the detector saturated "
                "(or too few photons to resolve the peak); attenuate the beam or mask the saturated pixels",
                reason="saturated",
            )


@dataclass(frozen=True)
class AutoPhaseNNPrediction:
    """A prediction as NumPy arrays; a leading batch axis when the input had one."""

    object: np.ndarray  # complex64: 3D ρ in the 64³ box, 2D the transmission O of the window
    amplitude: np.ndarray  # float32
    phase: np.ndarray  # float32, radians
    support: np.ndarray  # bool
    measured: np.ndarray  # float32: the input as the network saw it (fitted, normalised)
    modelled: np.ndarray  # float32: |F(prediction)|, comparable with ``measured``
    fit: PatternFit


def predict(
    model: AutoPhaseNN,
    amplitude: np.ndarray | torch.Tensor,
    *,
    incident_photons: float | Sequence[float] | None = None,
) -> AutoPhaseNNPrediction:
    """Invert centred diffraction amplitude(s) sqrt(I) with a trained network.

    The pattern is validated (:func:`validate_network_input`) and fitted to the network's grid
    (:func:`fit_pattern`). 3D patterns are max-normalised. 2D patterns are divided by sqrt(incident photons
    per frame), the training's units; without ``incident_photons`` each frame's own total Σ I stands in for
    it, which assumes the specimen transmits most of the beam.
    """
    dim = model.architecture.dim
    if isinstance(amplitude, torch.Tensor):
        amplitude = amplitude.detach().cpu().numpy()
    amplitude = np.asarray(amplitude)
    validate_network_input(amplitude, dim)
    batched = amplitude.ndim == dim + 1
    fitted, fit = fit_pattern(amplitude, dim, model.architecture.input_size_px)
    frames = fitted.reshape(-1, *fitted.shape[-dim:]).astype(np.float64)
    axes = tuple(range(1, dim + 1))
    if dim == 3:
        frames /= frames.max(axis=axes, keepdims=True)
    else:
        photons = (frames**2).sum(axis=axes) if incident_photons is None else np.asarray(incident_photons)
        photons = np.broadcast_to(np.asarray(photons, dtype=np.float64), (len(frames),))
        if not (photons > 0).all():
            raise ConfigError(f"incident_photons={incident_photons!r}: give a positive count per frame")
        frames /= np.sqrt(photons).reshape(-1, *([1] * dim))
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        output = model(torch.from_numpy(frames.astype(np.float32)).to(device))

    def numpy_of(tensor: torch.Tensor) -> np.ndarray:
        array = tensor.cpu().numpy()
        return array if batched else array[0]

    return AutoPhaseNNPrediction(
        object=numpy_of(output.object).astype(np.complex64),
        amplitude=numpy_of(output.amplitude).astype(np.float32),
        phase=numpy_of(output.phase).astype(np.float32),
        support=numpy_of(output.support),
        measured=frames.astype(np.float32) if batched else frames[0].astype(np.float32),
        modelled=numpy_of(output.modelled_amplitude).astype(np.float32),
        fit=fit,
    )


# ----------------------------------------------------------------------------------------------------------
# Benchmark (figures for docs/benchmarks.md; never asserted in tests)


def _median_seconds(action, repeats: int) -> float:
    """Median wall time of ``action()`` over ``repeats`` runs, after one untimed warm-up run."""
    action()
    seconds = []
    for _ in range(repeats):
        started_s = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started_s)
    return statistics.median(seconds)


def refine_prediction(
    prediction: AutoPhaseNNPrediction,
    iterations: int = 50,
    *,
    shrink_wrap: bool = False,
    device: torch.device | str | None = None,
) -> CdiResult:
    """ER from a 3D prediction (the paper's refinement): the predicted object, scaled to the measured
    amplitude by least squares, is the warm start and the predicted support the support."""
    modelled = np.abs(np.fft.fftshift(np.fft.fftn(prediction.object.astype(np.complex128), norm="ortho")))
    scale = float(np.sum(modelled * prediction.measured) / max(np.sum(modelled**2), 1e-30))
    solver = CdiSolver(
        prediction.measured,
        prediction.support,
        initial_image=prediction.object * scale,
        shrink_wrap=ShrinkWrap() if shrink_wrap else None,
        device=device,
    )
    solver.run([(CdiAlgorithm.ER, iterations)])
    return solver.result()


def bench_autophasenn(
    amplitude_path: str | Path,
    *,
    repeats: int = 5,
    er_iterations: int = 50,
    hio_er_blocks: int = 3,
    device: str | None = None,
    num_threads: int | None = None,
) -> dict:
    """Speed of the shipped networks, and prediction + ER against HIO/ER from a random start.

    ``amplitude_path``: a measured 64³ BCDI amplitude (``tests/data/bcdi_amplitude_64.npy``). Reports the
    median ms per 64³ prediction, 2D frames/s at batch 1, 8 and 64, and on the measured pattern the χ² and
    wall time of prediction + ``er_iterations`` ER against ``hio_er_blocks`` × (180 HIO + 20 ER) with
    shrink-wrap from a random start (600 iterations, :func:`phasestream_bench.solvers.bench_cdi`'s
    recipe: the start support is the autocorrelation's at 4 % of its peak). χ² depends on the support's
    size (a looser support fits more), so both supports' voxel counts are reported with it.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    resolved = torch.device(device) if device is not None else default_device()
    model_3d = load_autophasenn(3, device=resolved)
    model_2d = load_autophasenn(2, device=resolved)
    amplitude = np.load(amplitude_path).astype(np.float32)
    ms_per_3d_prediction = 1e3 * _median_seconds(lambda: predict(model_3d, amplitude), repeats)
    frames = np.abs(np.random.default_rng(0).standard_normal((64, INPUT_SIZE_PX, INPUT_SIZE_PX)))
    frames_per_s = {
        batch: batch / _median_seconds(lambda batch=batch: predict(model_2d, frames[:batch]), repeats)
        for batch in (1, 8, 64)
    }

    def neural_then_er() -> CdiResult:
        return refine_prediction(predict(model_3d, amplitude), er_iterations, device=resolved)

    started_s = time.perf_counter()
    refined = neural_then_er()
    neural_s = time.perf_counter() - started_s
    autocorrelation = np.abs(np.fft.ifftn(np.fft.ifftshift(amplitude.astype(np.float64) ** 2)))
    loose_support = np.fft.fftshift(autocorrelation > 0.04 * autocorrelation.max())
    solver = CdiSolver(amplitude, loose_support, shrink_wrap=ShrinkWrap(), seed=0, device=resolved)
    started_s = time.perf_counter()
    solver.run([(CdiAlgorithm.HIO, 180), (CdiAlgorithm.ER, 20)] * hio_er_blocks)
    iterative_s = time.perf_counter() - started_s
    return {
        "device": str(resolved),
        "num_threads": torch.get_num_threads(),
        "ms_per_3d_prediction": ms_per_3d_prediction,
        "frames_per_s_2d": frames_per_s,
        "prediction_er_iterations": er_iterations,
        "prediction_er_chi2": refined.final_error,
        "prediction_er_seconds": neural_s,
        "prediction_er_support_voxels": int(refined.support.sum()),
        "hio_er_iterations": 200 * hio_er_blocks,
        "hio_er_chi2": solver.fourier_error(),
        "hio_er_seconds": iterative_s,
        "hio_er_support_voxels": int(solver.support.sum()),
        "time_ratio_hio_er_over_prediction_er": iterative_s / neural_s,
    }

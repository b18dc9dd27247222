"""The nonexpansive DnCNN denoiser D of PINE, its shipped weights, and its use on complex objects.

References: K. Zhang, W. Zuo, Y. Chen, D. Meng and L. Zhang, "Beyond a Gaussian denoiser: residual learning
of deep CNN for image denoising", IEEE TIP 26, 3142 (2017) (DnCNN: 3×3 conv + ReLU layers, a residual
output); E. K. Ryu et al., ICML 2019 (RealSN, :mod:`phasestream.models.nets.realsn`); Yamada et al. (2024)
(PINE: 17 layers × 64 channels, no batch norm, trained on dead leaves, applied to Re O and Im O).

**Nonexpansive formulation.** N is the DnCNN stack (conv-ReLU, …, conv; no batch norm) and every
convolution is a RealSN layer of operator norm 1, so Lip(N) ≤ 1 (ReLU is 1-Lipschitz). The denoiser is
Ryu et al.'s residual form,

    D(x) = x − N(x):        N estimates the noise, D(x) − D(y) = (I − J_N)(x − y) along any segment.

Lip(N) ≤ 1 bounds Lip(D) only by 2. D is nonexpansive where I − J_N has norm ≤ 1, i.e. where N acts like
a projection onto the noise; trained on the MSE alone, N learned a little edge steepening on top of that and
the estimated Lip(D) ended at 1.045. Training therefore also penalises the secant ratio
‖D(x + h v) − D(x)‖ / h along the power-iteration direction of largest expansion
(:mod:`phasestream_bench.training.dncnn`), with a target of 0.97. The shipped D has an estimated Lip(D) of
0.967 (power iteration on J_Dᵀ J_D, :func:`lipschitz_estimate`) on dead leaves and on white noise, written
into the weights file; the tests require ≤ 1.05 on dead leaves, a Siemens star and white noise.

The alternative with a guarantee by construction, the firmly nonexpansive D = ½ (x + M(x)) with M a RealSN
stack (Lip(D) ≤ 1 for any weights; Pesquet et al., SIAM J. Imaging Sci. 14, 1206, 2021), fails with
layer-wise normalisation: M has to carry the image through every ReLU with gain 1 besides removing the
noise, and a ReLU between norm-1 layers passes at most half the energy of a zero-mean signal. Trained for
the same 400 steps on the same data (depth 8, width 32), it ended *below* the noisy input (22.2 dB from
26.0 dB at σ = 0.05), where the residual form reached 26.8 dB, and 22.3 dB from 20.0 dB at σ = 0.1, with an
estimated Lip(D) of 0.994.

D is trained on images in [0, 1] with additive Gaussian noise (σ in the training range, blind), see
:mod:`phasestream_bench.training.dncnn`. **Limit:** the small blind network cannot tell fine texture from
weak noise, so it smooths every input as if σ were about 0.04: a clean dead-leaves image or Siemens star
comes out at 29-31 dB, and at σ = 0.02 D lowers the PSNR (34 → 29-30 dB). It gains from σ ≈ 0.04 up
(+0.7 dB on dead leaves and +1.2 dB on the star at σ = 0.05; +2.7 and +2.9 dB at σ = 0.1). Weighting the
training loss by the inverse noise power kept clean images at 34-37 dB but cut the σ = 0.1 gain to +1.1 dB.

**Complex objects.** :func:`apply_to_complex` maps Re O and Im O to the training range with one affine map
x ↦ (x − offset) / s and back, with a common scale s (the offsets may differ): s D((x − a) / s) + a has the
Lipschitz constant of D, so for a fixed map the complex denoiser stays nonexpansive in the Euclidean norm
of Cⁿ = R²ⁿ. A map chosen from O itself changes with O; pass ``value_range`` to fix it over a
reconstruction when the guarantee must hold between sweeps.
"""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from phasestream.errors import ConfigError
from phasestream.models.execution import default_device
from phasestream.models.nets.realsn import DEFAULT_POWER_IMAGE_PX, RealSNConv2d
from phasestream.models.nets.shipped_weights import shipped_weights

WEIGHTS_FORMAT = "phasestream-dncnn-realsn-1"
DEFAULT_WEIGHTS_PATH = shipped_weights("dncnn_realsn.pt")
PAPER_DEPTH, PAPER_WIDTH = 17, 64
TRAINING_RANGE = (0.0, 1.0)
"""Values of the clean training images (:mod:`phasestream.simulators.dead_leaves_shapes`)."""
COMPLEX_MARGIN = 0.1
"""Fraction of the training range left free at each end by :func:`apply_to_complex`: noise in O pushes
values past its current extremes, and the denoiser saw values beyond [0, 1] only through noise."""


class DncnnArchitecture(BaseModel):
    """The shape of the network; stored in every weights file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(default=PAPER_DEPTH, ge=2, le=64, description="convolution layers")
    width: int = Field(default=PAPER_WIDTH, ge=1, le=512, description="channels of the hidden layers")
    kernel_px: int = Field(default=3, ge=1, le=7, description="odd kernel side")
    lipschitz_bound: float = Field(default=1.0, gt=0, le=1, description="spectral-norm bound of every layer")

    def describe(self) -> str:
        return (
            f"DnCNN-RealSN depth {self.depth}, width {self.width}, "
            f"{self.kernel_px}×{self.kernel_px} kernels, layer norm ≤ {self.lipschitz_bound:g}"
        )


class NonexpansiveDncnn(nn.Module):
    """D(x) = x − N(x) on (batch, 1, H, W) images; N = the RealSN conv-ReLU stack (module docstring)."""

    def __init__(
        self, architecture: DncnnArchitecture, power_image_px: tuple[int, int] = DEFAULT_POWER_IMAGE_PX
    ) -> None:
        super().__init__()
        if architecture.kernel_px % 2 != 1:
            raise ConfigError(f"kernel_px={architecture.kernel_px}: use an odd kernel (3 in DnCNN)")
        self.architecture = architecture
        channels = [1] + [architecture.width] * (architecture.depth - 1) + [1]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            layers.append(
                RealSNConv2d(
                    c_in,
                    c_out,
                    architecture.kernel_px,
                    bound=architecture.lipschitz_bound,
                    power_image_px=power_image_px,
                )
            )
            if index < architecture.depth - 1:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image - self.body(image)


def weights_payload(model: NonexpansiveDncnn, **extra: object) -> dict:
    """What a weights file holds: format tag, architecture, state dict, and ``extra`` (training record…)."""
    return {
        "format": WEIGHTS_FORMAT,
        "architecture": model.architecture.model_dump(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        **extra,
    }


def architecture_from_state(state: dict) -> str:
    """Describe the network a state dict belongs to, from its tensor shapes, for error messages."""
    kernels = [tensor for name, tensor in state.items() if name.endswith(".weight") and tensor.ndim == 4]
    if not kernels:
        return "an unknown network (no convolution kernels)"
    side = int(kernels[0].shape[-1])
    return f"DnCNN depth {len(kernels)}, width {int(kernels[0].shape[0])}, {side}×{side} kernels"


def load_denoiser(
    path: str | Path | None = None, device: torch.device | str | None = None
) -> NonexpansiveDncnn:
    """Load D (default: the shipped ``models/weights/dncnn_realsn.pt``) in eval mode, gradients off.

    Raises ConfigError when the file is missing, is not DnCNN-RealSN weights, or its tensors do not match
    the architecture it declares (naming both).
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS_PATH
    if not path.is_file():
        raise ConfigError(f"no DnCNN weights at {path}: train them with `phasestream train dncnn`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise ConfigError(f"{path} is not a readable torch weights file ({error}): retrain it") from error
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"{path} does not hold {WEIGHTS_FORMAT} weights: pass a DnCNN-RealSN weights file")
    try:
        architecture = DncnnArchitecture(**payload["architecture"])
    except (ValidationError, TypeError, KeyError) as error:
        raise ConfigError(f"{path} describes no valid DnCNN architecture ({error}): retrain it") from error
    state = payload.get("state_dict", {})
    model = NonexpansiveDncnn(architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"{path} declares {architecture.describe()} but its tensors belong to "
            f"{architecture_from_state(state)}: the file is inconsistent; retrain it"
        ) from error
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type == "cpu":
        # oneDNN's convolutions run 1.6–1.8× faster on channels-last weights: D on a 512² canvas pair
        # 806 → 493 ms on two threads (docs/benchmarks.md, PINE).
        model = model.to(memory_format=torch.channels_last)
    return model.to(resolved).eval().requires_grad_(False)


def complex_value_range(obj: torch.Tensor) -> tuple[float, float]:
    """The interval holding both Re O and Im O: the default range of :func:`apply_to_complex`."""
    parts = torch.stack([obj.real, obj.imag])
    return float(parts.min()), float(parts.max())


@torch.no_grad()
def apply_to_complex(
    denoiser: nn.Module, obj: torch.Tensor, value_range: tuple[float, float] | None = None
) -> torch.Tensor:
    """D applied to the real and the imaginary part of a 2D complex ``obj``; returns a complex tensor.

    Both parts share one affine map of ``value_range`` (default: :func:`complex_value_range` of ``obj``)
    onto the training range less a margin of :data:`COMPLEX_MARGIN` at each end, and back; a common scale
    keeps the complex denoiser nonexpansive (module docstring).
    """
    if obj.ndim != 2 or not obj.is_complex():
        raise ConfigError(
            f"obj has shape {tuple(obj.shape)} and dtype {obj.dtype}: pass one complex 2D object"
        )
    low, high = value_range if value_range is not None else complex_value_range(obj)
    if not high >= low:
        raise ConfigError(f"value_range=({low}, {high}): the upper end must not be below the lower end")
    train_low, train_high = TRAINING_RANGE
    margin = COMPLEX_MARGIN * (train_high - train_low)
    # A flat object has no range; any scale maps it into the training range.
    scale = max(high - low, torch.finfo(torch.float32).eps) / (train_high - train_low - 2 * margin)
    offset = low - (train_low + margin) * scale
    weight = next(denoiser.parameters())
    parts = torch.stack([obj.real, obj.imag])[:, None].to(device=weight.device, dtype=weight.dtype)
    denoised = denoiser((parts - offset) / scale) * scale + offset
    denoised = denoised[:, 0].to(device=obj.device, dtype=obj.real.dtype)
    return torch.complex(denoised[0], denoised[1])


def jacobian_spectral_norm(denoiser: nn.Module, image: torch.Tensor, iterations: int = 30) -> float:
    """‖J_D(x)‖₂ at one image x of shape (1, 1, H, W), by power iteration on Jᵀ J (Jacobian-vector and
    vector-Jacobian products). D is piecewise linear (ReLU), so its Lipschitz constant is the largest such
    norm over all x."""
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(image.shape, generator=generator).to(image)
    vector /= torch.linalg.vector_norm(vector)
    _, pullback = torch.func.vjp(denoiser, image)
    for _ in range(iterations):
        _, pushed = torch.func.jvp(denoiser, (image,), (vector,))
        (vector,) = pullback(pushed)
        vector = vector / torch.linalg.vector_norm(vector)
    _, pushed = torch.func.jvp(denoiser, (image,), (vector,))
    return float(torch.linalg.vector_norm(pushed.detach()))


def lipschitz_estimate(denoiser: nn.Module, images: torch.Tensor, iterations: int = 30) -> float:
    """The largest :func:`jacobian_spectral_norm` over ``images`` (batch, 1, H, W); a lower bound of Lip(D)
    that power iteration from several starting images makes tight in practice."""
    was_training = denoiser.training
    denoiser.eval()
    try:
        return max(jacobian_spectral_norm(denoiser, image[None], iterations) for image in images)
    finally:
        denoiser.train(was_training)

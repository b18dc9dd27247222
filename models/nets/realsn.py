"""Real spectral normalisation (RealSN): convolutions whose norm *as operators on images* is bounded.

Reference: E. K. Ryu, J. Liu, S. Wang, X. Chen, Z. Wang and W. Yin, "Plug-and-play methods provably
converge with properly trained denoisers", ICML 2019, section 4.2. Spectral normalisation as Miyato et al.
do it divides a convolution's kernel by the largest singular value of the kernel reshaped to a
C_out × (C_in k²) matrix; that number is not the Lipschitz constant of the convolution (which can be up to
k times larger). RealSN bounds the operator itself, K: R^{C_in × H × W} → R^{C_out × H × W} (zero
padding, stride 1, bias left out since it does not change Lipschitz constants), with power iteration on
KᵀK, where K is ``conv2d`` and Kᵀ is ``conv_transpose2d`` with the same weight and padding:

    u ← Kᵀ K u / ‖Kᵀ K u‖,        σ(K) ≈ ‖K u‖  (‖u‖ = 1)

The vector u is image shaped, belongs to the layer and persists between optimiser steps: the weights move
little per step, so one or two iterations per step keep u on the top singular vector, as in Ryu et al.'s
(and Miyato et al.'s) implementation. In training mode a layer divides its weight by σ (the gradient then
flows through σ), and after every optimiser step :func:`normalise_` rescales the stored weight,
W ← W · bound / σ, so that eval mode (weights as stored) computes the same function. A network of such
layers and 1-Lipschitz activations (ReLU) is ``bound^depth``-Lipschitz.

The norm of a zero-padded convolution grows slowly with the image (a small image embeds in a large one
with zeros around it) towards that of the circular convolution; the power vector's image size should
therefore be at least that of the training patches, and the final normalisation of a trained network
should use a larger image and many iterations (:func:`normalise_` takes both).
"""

from __future__ import annotations

import torch
from torch import nn

from phasestream.errors import ConfigError

DEFAULT_POWER_IMAGE_PX = (64, 64)
"""Image size of a layer's persistent power vector when none is given: the training patch size."""


class RealSNConv2d(nn.Conv2d):
    """A stride-1, zero-padded ``nn.Conv2d`` ("same" output size) normalised to σ(K) = ``bound``.

    In training mode the forward pass uses W · bound / σ(W), with σ = ‖K u‖ from the persistent power
    vector u (held fixed, so the gradient flows through σ as in Ryu et al.'s and Miyato et al.'s
    implementations: it has no component that would only change σ). :func:`normalise_`, called after each
    optimiser step, advances u and rescales the stored weight to σ = ``bound``, so that in eval mode the
    weight is used as stored and the two modes compute the same function.

    The vector is a non-persistent buffer: it is not part of the ``state_dict`` (a denoiser needs only its
    weights), so training checkpoints save it explicitly (:func:`power_vectors`, :func:`load_power_vectors_`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_px: int = 3,
        *,
        bound: float = 1.0,
        bias: bool = True,
        power_image_px: tuple[int, int] = DEFAULT_POWER_IMAGE_PX,
    ) -> None:
        if kernel_px % 2 != 1:
            raise ConfigError(f"kernel_px={kernel_px}: RealSN layers need an odd kernel for 'same' padding")
        if not bound > 0:
            raise ConfigError(
                f"bound={bound}: a spectral-norm bound must be positive (1: nonexpansive layers)"
            )
        super().__init__(in_channels, out_channels, kernel_px, padding=kernel_px // 2, bias=bias)
        self.bound = bound
        self.register_buffer(
            "power_vector", _unit(torch.randn(1, in_channels, *power_image_px)), persistent=False
        )

    def operator(self, image: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """K x: the convolution without its bias."""
        return nn.functional.conv2d(image, self.weight if weight is None else weight, padding=self.padding)

    def adjoint(self, image: torch.Tensor) -> torch.Tensor:
        """Kᵀ y: for stride 1 and 'same' zero padding, the transposed convolution with the same weight."""
        return nn.functional.conv_transpose2d(image, self.weight, padding=self.padding)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.training:
            sigma = torch.linalg.vector_norm(self.operator(self.power_vector))
            weight = weight * (self.bound / sigma)
        return nn.functional.conv2d(image, weight, self.bias, padding=self.padding)

    @torch.no_grad()
    def power_iteration_(self, iterations: int = 1) -> float:
        """Advance the persistent vector by ``iterations`` steps and return the estimate of σ(K)."""
        vector = self.power_vector
        for _ in range(iterations):
            vector = _unit(self.adjoint(self.operator(vector)))
        self.power_vector.copy_(vector)
        return float(torch.linalg.vector_norm(self.operator(vector)))

    @torch.no_grad()
    def normalise_(self, iterations: int = 1) -> float:
        """Rescale the weight to σ(K) = ``bound``; returns σ(K) as estimated before rescaling."""
        sigma = self.power_iteration_(iterations)
        self.weight.mul_(self.bound / sigma)
        return sigma


def realsn_layers(model: nn.Module) -> list[RealSNConv2d]:
    return [module for module in model.modules() if isinstance(module, RealSNConv2d)]


@torch.no_grad()
def normalise_(
    model: nn.Module, iterations: int = 1, power_image_px: tuple[int, int] | None = None
) -> list[float]:
    """Rescale every RealSN layer of ``model`` to σ(K) = its bound; call after each optimiser step.

    Returns each layer's σ(K) as estimated before rescaling. ``power_image_px`` restarts the power vectors
    on a new image size first (for the final, tighter normalisation of a trained network).
    """
    layers = realsn_layers(model)
    if power_image_px is not None:
        for layer in layers:
            start = torch.randn(1, layer.in_channels, *power_image_px, device=layer.weight.device)
            layer.power_vector = _unit(start.to(layer.weight.dtype))
    return [layer.normalise_(iterations) for layer in layers]


def power_vectors(model: nn.Module) -> list[torch.Tensor]:
    """The persistent power vectors, in layer order, for a training checkpoint."""
    return [layer.power_vector.detach().clone() for layer in realsn_layers(model)]


def load_power_vectors_(model: nn.Module, vectors: list[torch.Tensor]) -> None:
    layers = realsn_layers(model)
    if len(vectors) != len(layers):
        raise ConfigError(
            f"checkpoint holds {len(vectors)} power vectors but the model has {len(layers)} RealSN layers: "
            "resume with the depth the checkpoint was trained with"
        )
    for layer, vector in zip(layers, vectors, strict=True):
        layer.power_vector = vector.to(layer.weight.device)


@torch.no_grad()
def operator_spectral_norm(
    conv: nn.Conv2d, input_shape: tuple[int, int, int], iterations: int = 200, seed: int = 0
) -> float:
    """σ(K) of ``conv`` (bias excluded) on images of ``input_shape`` = (channels, height, width).

    An independent estimate from a fresh, seeded start vector; it does not touch the layer's own power
    vector. Power iteration approaches σ from below, at a rate set by the gap to the next singular value.
    """
    if input_shape[0] != conv.in_channels:
        raise ConfigError(
            f"input_shape={input_shape} has {input_shape[0]} channels but the convolution takes "
            f"{conv.in_channels}: pass (in_channels, height, width)"
        )
    same_padding = tuple(size // 2 for size in conv.kernel_size)
    if conv.stride != (1, 1) or conv.padding_mode != "zeros" or conv.padding != same_padding:
        raise ConfigError(
            f"stride={conv.stride}, padding={conv.padding}, padding_mode={conv.padding_mode!r}: only "
            f"stride-1 convolutions with zero padding {same_padding} ('same' size) are supported"
        )
    generator = torch.Generator().manual_seed(seed)
    vector = _unit(torch.randn(1, *input_shape, generator=generator).to(conv.weight))
    for _ in range(iterations):
        vector = _unit(
            nn.functional.conv_transpose2d(
                nn.functional.conv2d(vector, conv.weight, padding=conv.padding),
                conv.weight,
                padding=conv.padding,
            )
        )
    return float(torch.linalg.vector_norm(nn.functional.conv2d(vector, conv.weight, padding=conv.padding)))


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / torch.linalg.vector_norm(vector).clamp_min(torch.finfo(vector.dtype).tiny)

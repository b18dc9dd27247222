"""The skip hourglass of the deep image prior: an untrained U-Net with optional skip connections.

References: D. Ulyanov, A. Vedaldi and V. Lempitsky, "Deep image prior", CVPR 2018 (and IJCV 128, 1867,
2020); the two architectures of Erin et al. (2025), who denoise position-binned fly-scan ptychography with a
DIP. How the network is fitted is in :mod:`phasestream.models.nets.dip`.

**Network** (Ulyanov et al.'s "skip" hourglass, from their supplementary material and code). Level i
(of L) takes its input d_i and computes

    deeper_i = up×2( level_{i+1}( act(BN(conv3(act(BN(conv3_stride2(d_i))))))) )
    out_i    = act(BN(conv1(act(BN(conv3(BN([skip_i(d_i), deeper_i])))))))
    skip_i   = act(BN(conv1(d_i)))  with ``skip_channels[i]`` filters, absent when that is 0

with LeakyReLU(0.2), reflection padding and bilinear upsampling (Ulyanov's denoising settings); a 1×1
convolution and a sigmoid map out_0 to the image channels. Erin et al.'s **Arch1** has channels
[8, 16, 32, 64, 128] with skips [0, 0, 0, 4, 4]; **Arch2** has [128]×6, here with Ulyanov's 4 skip
filters per level. Each level halves the grid, and batch norm needs at least 2×2 values at the deepest
level, so the network works on a grid that is a multiple of 2^L and at least 2^(L+1) on each side
(:func:`dip_grid_shape`); images are fitted on its top-left corner. The presets and the configuration of a
network of one's own (:class:`~phasestream.models.nets.dip_options.SkipNetConfig`) are options, in
:mod:`phasestream.models.nets.dip_options`.
"""

from __future__ import annotations

import torch
from torch import nn

from phasestream.errors import ConfigError
from phasestream.models.nets.dip_options import ARCHITECTURES, DipArchitecture, SkipNetConfig

LEAKY_RELU_SLOPE = 0.2
"""Ulyanov et al.'s LeakyReLU slope."""
INPUT_SCALE = 0.1
"""z is uniform in [0, 0.1) (Ulyanov et al.)."""


def skip_net_config(architecture: DipArchitecture | str | SkipNetConfig) -> SkipNetConfig:
    """The config of a preset name, or the config itself."""
    if isinstance(architecture, SkipNetConfig):
        return architecture
    try:
        return ARCHITECTURES[DipArchitecture(architecture)]
    except ValueError as error:
        presets = ", ".join(preset.value for preset in DipArchitecture)
        raise ConfigError(f"architecture={architecture!r} is not a preset: use one of {presets}") from error


def dip_grid_shape(
    shape: tuple[int, int], architecture: DipArchitecture | str | SkipNetConfig
) -> tuple[int, int]:
    """The grid the network runs on for an image of ``shape``: each side a multiple of 2^L, at least 2^(L+1).

    L stride-2 levels need a multiple of 2^L; batch norm needs more than one value per channel at the
    deepest level, hence at least 2×2 there.
    """
    levels = skip_net_config(architecture).levels
    step = 2**levels
    return tuple(max(-(-side // step) * step, 2 * step) for side in shape)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        padding_mode="reflect",
    )


def _conv_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [
        _conv(in_channels, out_channels, kernel_size, stride),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(LEAKY_RELU_SLOPE),
    ]


class _SkipLevel(nn.Module):
    """One level of the hourglass: a strided path to the next level and back, plus an optional skip."""

    def __init__(
        self, in_channels: int, channels: int, skip_channels: int, kernel_size: int, deeper: _SkipLevel | None
    ) -> None:
        super().__init__()
        self.out_channels = channels
        self.skip = nn.Sequential(*_conv_block(in_channels, skip_channels, 1)) if skip_channels else None
        self.down = nn.Sequential(
            *_conv_block(in_channels, channels, kernel_size, stride=2),
            *_conv_block(channels, channels, kernel_size),
        )
        self.deeper = deeper
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        merged = skip_channels + (deeper.out_channels if deeper is not None else channels)
        self.merge = nn.Sequential(
            nn.BatchNorm2d(merged),
            *_conv_block(merged, channels, kernel_size),
            *_conv_block(channels, channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        deeper = self.down(features)
        if self.deeper is not None:
            deeper = self.deeper(deeper)
        deeper = self.upsample(deeper)
        if self.skip is not None:
            deeper = torch.cat([self.skip(features), deeper], dim=1)
        return self.merge(deeper)


class SkipNet(nn.Module):
    """Ulyanov et al.'s skip hourglass: (batch, input_channels, H, W) → (batch, out_channels, H, W).

    H and W must be multiples of 2^L and at least 2^(L+1) (see :func:`dip_grid_shape`). ``sigmoid``
    bounds the output to (0, 1), as for images brought to that range.
    """

    def __init__(
        self,
        architecture: DipArchitecture | str | SkipNetConfig,
        out_channels: int,
        *,
        in_channels: int | None = None,
        sigmoid: bool = True,
    ) -> None:
        super().__init__()
        self.config = skip_net_config(architecture)
        self.in_channels = in_channels if in_channels is not None else self.config.input_channels
        level_inputs = (self.in_channels, *self.config.channels[:-1])
        deeper: _SkipLevel | None = None
        for in_ch, channels, skip in reversed(
            list(zip(level_inputs, self.config.channels, self.config.skip_channels, strict=True))
        ):
            deeper = _SkipLevel(in_ch, channels, skip, self.config.kernel_size, deeper)
        self.body = deeper
        self.head = nn.Conv2d(self.config.channels[0], out_channels, 1)
        self.sigmoid = sigmoid

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        grid = dip_grid_shape(tuple(z.shape[-2:]), self.config)
        if tuple(z.shape[-2:]) != grid:
            raise ConfigError(
                f"input grid {tuple(z.shape[-2:])} does not suit {self.config.levels} levels: use "
                f"dip_grid_shape(), here {grid}"
            )
        out = self.head(self.body(z))
        return torch.sigmoid(out) if self.sigmoid else out


def seeded_skip_nets(
    architecture: DipArchitecture | str | SkipNetConfig,
    out_channels: int,
    *,
    seed: int,
    device: torch.device,
    count: int = 1,
    in_channels: int | None = None,
) -> list[SkipNet]:
    """``count`` skip networks initialised one after another from ``seed``: the same weights on every run,
    and torch's global random state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [SkipNet(architecture, out_channels, in_channels=in_channels).to(device) for _ in range(count)]


def random_input(
    channels: int, grid: tuple[int, int], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Ulyanov's fixed input z: (1, channels, *grid), uniform in [0, 0.1)."""
    return INPUT_SCALE * torch.rand((1, channels, *grid), generator=generator).to(device)

"""The measured diffraction patterns of a growing scan, as an ePIE solver keeps them on its device.

Patterns are stored once as float32 sqrt(I), already ``ifftshift``-ed: the solver works in the FFT's native
layout and never shifts per iteration. That is the project's centred far field (see
:mod:`phasestream.models.physics`), since the Fourier-modulus projection acts pixel by pixel. Detector
pixels marked unmeasured (gaps, dead or hot pixels) are stored as 0 and left unconstrained by the updates.
"""

from __future__ import annotations

import numpy as np
import torch

from phasestream.errors import ConfigError, FrameValidationError

_FLOAT_KINDS = "fc"
_SIGNED_INT_KIND = "i"


class PatternStore:
    """Measured amplitudes (n, ny, nx) in a buffer whose capacity doubles, and the unmeasured-pixel mask.

    ``amplitudes`` is the whole buffer: rows from :attr:`count` on are spare capacity, never read by an
    epoch, which indexes only positions already added.
    """

    def __init__(self, device: torch.device, unmeasured: np.ndarray | None = None) -> None:
        self.device = device
        self.amplitudes = torch.empty((0, 0, 0), dtype=torch.float32, device=device)
        self.count = 0
        self.measured_energy = 0.0
        """Σ_j ‖sqrt(I_j)‖² over the measured pixels: the Fourier error's normalisation."""
        self.unmeasured: torch.Tensor | None = None
        if unmeasured is not None:
            mask = np.asarray(unmeasured, dtype=bool)
            if mask.ndim != 2:
                raise ConfigError(f"unmeasured has shape {mask.shape}: pass one (ny, nx) detector mask")
            # Stored in the FFT's native layout, like the amplitudes.
            self.unmeasured = torch.from_numpy(np.fft.ifftshift(mask).copy()).to(device)

    def append(self, intensities: torch.Tensor) -> None:
        """Store sqrt(I) of validated intensities (n, ny, nx), centred, in the FFT's layout."""
        pattern_shape = tuple(intensities.shape[1:])
        if self.unmeasured is not None and tuple(self.unmeasured.shape) != pattern_shape:
            raise FrameValidationError(
                f"patterns are {pattern_shape} but the unmeasured-pixel mask is "
                f"{tuple(self.unmeasured.shape)}: pass a mask of the detector's (binned) shape"
            )
        amplitudes = torch.fft.ifftshift(intensities.sqrt(), dim=(-2, -1))
        if self.unmeasured is not None:
            amplitudes.masked_fill_(self.unmeasured, 0.0)
        self.measured_energy += float(amplitudes.square().sum(dtype=torch.float64).item())
        # Capacity doubles, so a scan arriving in many small batches costs amortised O(n) copies.
        needed = self.count + len(amplitudes)
        if needed > len(self.amplitudes):
            grown = torch.empty(
                (max(needed, 2 * len(self.amplitudes)), *amplitudes.shape[1:]),
                dtype=torch.float32,
                device=self.device,
            )
            if self.count:
                grown[: self.count] = self.amplitudes[: self.count]
            self.amplitudes = grown
        self.amplitudes[self.count : needed] = amplitudes
        self.count = needed


def validated_intensities(patterns: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Counts (n, ny, nx) of any integer or float dtype as float32 on ``device``; refuses what no detector
    can count (NaN, infinities, negative counts) with the fix."""
    raw = patterns.cpu().numpy() if isinstance(patterns, torch.Tensor) else np.asarray(patterns)
    if raw.ndim != 3 or 0 in raw.shape:
        raise FrameValidationError(
            f"patterns has shape {raw.shape}: pass a stack (n, ny, nx) of at least one pattern"
        )
    if raw.dtype.kind not in _FLOAT_KINDS + _SIGNED_INT_KIND + "u":
        raise FrameValidationError(f"patterns have dtype {raw.dtype}: pass integer or float counts")
    counts = np.asarray(raw, dtype=np.float32)
    # Unsigned integers can be neither negative nor NaN: skip two passes over the data for them.
    if raw.dtype.kind in _FLOAT_KINDS and not np.isfinite(counts).all():
        raise FrameValidationError("patterns hold NaN or infinite counts: mask bad pixels with 0 first")
    if raw.dtype.kind in _FLOAT_KINDS + _SIGNED_INT_KIND and (counts < 0).any():
        raise FrameValidationError(
            f"patterns hold negative counts (min {counts.min()}): subtract dark frames with clipping at 0"
        )
    return torch.from_numpy(counts).to(device)

"""Mixed-state probes and sub-pixel positions for the ePIE/rPIE solver.

Mixed states: P. Thibault and A. Menzel, "Reconstructing state mixtures from diffraction measurements",
Nature 494, 68-71 (2013). A partially coherent beam is a sum of K mutually incoherent modes P_k; a pattern
is the sum of their intensities, I_j = Σ_k |F(P_k O_j)|², and the Fourier constraint scales every mode's
far field by the same factor, Ψ'_k = Ψ_k sqrt(I) / sqrt(Σ_k |Ψ_k|²) (their eq. 3). The modes are only
defined up to a unitary mix, so they are kept orthogonal and sorted by power (:func:`orthogonalise_modes`).

Sub-pixel positions: the window is cut from the object at the nearest whole pixel and the probe is moved by
the remaining fraction with a Fourier phase ramp (exact for band-limited probes, no interpolation blur).

Position correction: the least-squares (Gauss-Newton) shift of each position given the current exit-wave
update Δ = ψ' − ψ, as in M. Odstrčil, A. Menzel and M. Guizar-Sicairos, "Iterative least-squares solver for
generalized maximum-likelihood ptychography", Opt. Express 26, 3108 (2018), section 3.3:

    δr_j = Re Σ_k ⟨P_jk ∂_r O_j, Δ_jk⟩ / Σ_k ‖P_jk ∂_r O_j‖²       (r = y, x separately)

A whole-wave translation only tilts the far-field phase, so it cannot change the fit: the numerator's
component along ∇ψ is purely imaginary, and taking the object's gradient instead of the probe's is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from phasestream.errors import ConfigError
from phasestream.models.physics import FOURIER_EPSILON
from phasestream.models.ptycho.fourier_update import amplitude_misfit, poisson_ratio

_DIVISION_FLOOR = 1e-30
SECOND_MODE_POWER = 0.05
"""Power of each extra mode at the start, as a fraction of the first mode's: enough for the data to grow
them, small enough not to spoil a good single-mode start."""


def initial_modes(probe: torch.Tensor, n_modes: int, seed: int = 0) -> torch.Tensor:
    """(K, ny, nx) modes from one probe: the probe itself, then K − 1 weak copies with smooth random phases.

    The extra modes keep the first mode's footprint (a partially coherent beam's modes share its envelope)
    and start orthogonal to it after :func:`orthogonalise_modes`.
    """
    if n_modes < 1:
        raise ConfigError(f"probe_modes={n_modes!r}: use at least 1 (1 is a coherent probe)")
    if probe.ndim == 3:
        probe = probe[0]
    modes = [probe]
    generator = torch.Generator().manual_seed(seed)
    ny, nx = probe.shape
    y = torch.linspace(-1, 1, ny).view(-1, 1)
    x = torch.linspace(-1, 1, nx).view(1, -1)
    for _ in range(n_modes - 1):
        a, b, c = (torch.rand(3, generator=generator) * 2 - 1) * torch.pi
        phase = (a * y + b * x + c * (x * x - y * y)).to(probe.device)
        modes.append(probe * torch.polar(torch.ones_like(phase), phase) * SECOND_MODE_POWER**0.5)
    return orthogonalise_modes(torch.stack(modes).to(torch.complex64))


def orthogonalise_modes(modes: torch.Tensor) -> torch.Tensor:
    """The same incoherent mixture as orthogonal modes sorted by power, strongest first.

    The mixture's density matrix Σ_k |P_k⟩⟨P_k| is unchanged by any unitary mix U of the modes; the
    eigenvectors of the K × K Gram matrix G = M M^H (M: modes as rows) give the U that makes them
    orthogonal, and the eigenvalues are the modes' powers.
    """
    if len(modes) == 1:
        return modes.clone()
    flat = modes.reshape(len(modes), -1)
    gram = (flat @ flat.conj().T).to(torch.complex128)
    powers, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(powers, descending=True)
    mix = vectors[:, order].conj().T.to(modes.dtype)
    return (mix @ flat).reshape(modes.shape)


def mode_powers(modes: torch.Tensor) -> np.ndarray:
    """Each mode's share of the total probe power (sums to 1)."""
    power = (modes * modes.conj()).real.sum(dim=(-2, -1)).double().cpu().numpy()
    return power / max(power.sum(), _DIVISION_FLOOR)


def split_positions(corners_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Window corners → (nearest whole pixel int64, remaining fraction in [−0.5, 0.5] float32)."""
    whole = np.rint(corners_px).astype(np.int64)
    return whole, (corners_px - whole).astype(np.float32)


def fourier_frequencies(shape_px: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies in cycles per pixel along y (ny, 1) and x (1, nx), in the FFT's native order."""
    fy = torch.fft.fftfreq(shape_px[0], device=device).view(-1, 1)
    fx = torch.fft.fftfreq(shape_px[1], device=device).view(1, -1)
    return fy, fx


def shift_ramps(shifts_px: torch.Tensor, frequencies: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """exp(−2πi f·s) per shift (B, 2) → (B, ny, nx): multiplying a spectrum by it moves the image by +s."""
    fy, fx = frequencies
    phase = (fy * shifts_px[:, 0].view(-1, 1, 1) + fx * shifts_px[:, 1].view(-1, 1, 1)) * (-2 * torch.pi)
    return torch.polar(torch.ones_like(phase), phase)


def shifted_modes(modes_spectrum: torch.Tensor, ramps: torch.Tensor) -> torch.Tensor:
    """(B, K, ny, nx): every mode moved by every window's sub-pixel fraction (spectrum (K, ny, nx))."""
    return torch.fft.ifft2(modes_spectrum.unsqueeze(0) * ramps.unsqueeze(1))


def unshift(waves: torch.Tensor, ramps: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shifted_modes` on (B, K, ny, nx) waves, given the same ramps: move each by −s."""
    return torch.fft.ifft2(torch.fft.fft2(waves) * ramps.conj().unsqueeze(1))


def position_gradient_steps(patches: torch.Tensor, probes: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Least-squares shift (B, 2) (y, x) in pixels of each window that best explains its update Δ.

    ``patches`` (B, ny, nx) are the object windows, ``probes`` (B, K, ny, nx) the (shifted) probe modes and
    ``delta`` (B, K, ny, nx) the exit-wave updates ψ' − ψ. The object's gradient uses central differences
    inside the window (one-sided at its edge), where the probe is weak anyway.
    """
    steps = []
    for axis in (-2, -1):
        (derivative,) = torch.gradient(patches, dim=axis)
        d_wave = probes * derivative.unsqueeze(1)
        numerator = (d_wave.conj() * delta).real.sum(dim=(1, 2, 3))
        denominator = (d_wave * d_wave.conj()).real.sum(dim=(1, 2, 3)).clamp_min(_DIVISION_FLOOR)
        # Moving the window by +δ samples O(r + δ): ψ(δ) ≈ ψ + δ P ∂O, so δ solves P ∂O δ ≈ Δ.
        steps.append(numerator / denominator)
    return torch.stack(steps, dim=1)


def modal_fourier_update(
    exit_waves: torch.Tensor, measured: torch.Tensor, unmeasured: torch.Tensor | None, poisson: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Δ_k = ψ'_k − ψ_k with Ψ'_k = Ψ_k sqrt(I) / sqrt(Σ_k |Ψ_k|²) (Thibault & Menzel 2013, eq. 3).

    Σ_k ‖Δ_k‖² = ‖sqrt(Σ_k |Ψ_k|²) − sqrt(I)‖², the same error as for one mode. With ``poisson`` every
    mode takes the Poisson step's factor instead (:mod:`phasestream.models.ptycho.fourier_update`), and that
    amplitude misfit comes back beside Δ (0-d; None for the projection). Unmeasured pixels keep Ψ_k.
    """
    wave = torch.fft.fft2(exit_waves, norm="ortho")
    total = (wave * wave.conj()).real.sum(dim=1).clamp_min_(FOURIER_EPSILON**2)
    misfit = amplitude_misfit(total, measured, unmeasured) if poisson else None
    ratio = poisson_ratio(total, measured) if poisson else measured * total.rsqrt_()
    if unmeasured is not None:
        ratio.masked_fill_(unmeasured, 1.0)
    wave.mul_(ratio.unsqueeze(1))
    return torch.fft.ifft2(wave, norm="ortho").sub_(exit_waves), misfit

"""The general ePIE/rPIE epochs: mixed-state probes, sub-pixel windows and position correction.

The equations are in :mod:`phasestream.models.ptycho.modes`. Mini-batches are as in the batched fast path
(the sequential variant is a batch of one): the object update is Σ_k P_k* Δ_k over the summed-illumination
denominator (rPIE's when chosen), each mode's probe update is the batch mean of O_j* Δ_jk / max|O_j|²
moved back by the window's sub-pixel fraction, and the modes are re-orthogonalised after the epoch.

:func:`position_correction_epoch` also collects a least-squares step for every window over the epoch and
applies them at its end, each clipped to ``positions.max_step_px`` per axis, less their mean (the data
cannot tell a common shift of every window, so the mean position stays where the caller put it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phasestream.models.ptycho.epochs import DIVISION_FLOOR, is_poisson, squared_norm
from phasestream.models.ptycho.illumination import batch_illumination_peak
from phasestream.models.ptycho.modes import (
    fourier_frequencies,
    modal_fourier_update,
    orthogonalise_modes,
    position_gradient_steps,
    shift_ramps,
    shifted_modes,
    unshift,
)
from phasestream.models.ptycho.options import EpieOptions, EpieVariant
from phasestream.models.ptycho.state import ScanState


@dataclass(frozen=True)
class WindowGeometry:
    """Flat canvas offset of every window corner (n,), flat offsets inside a window (1, ny, nx), and for
    sub-pixel windows their fractions (n, 2) and the FFT frequencies that move the probe by them."""

    flat_offsets: torch.Tensor
    window_grid: torch.Tensor
    subpixel_px: torch.Tensor | None
    frequencies: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class Windows:
    """A mini-batch's windows: flat canvas index of every pixel, object patches (B, ny, nx), probe modes
    (B, K, ny, nx) moved by each window's sub-pixel fraction, exit waves (B, K, ny, nx), and the phase
    ramps used for the move (None when every window sits on whole pixels)."""

    flat_index: torch.Tensor
    patches: torch.Tensor
    probes: torch.Tensor
    exit_waves: torch.Tensor
    ramps: torch.Tensor | None


def window_geometry(state: ScanState, shifted: bool) -> WindowGeometry:
    """Where every window lies, built once per sweep: the positions do not move within one."""
    flat_offsets, window_grid = state.flat_window_index()
    if not shifted:
        return WindowGeometry(flat_offsets, window_grid, None, None)
    subpixel = torch.from_numpy(state.subpixel_px).to(state.device)
    return WindowGeometry(
        flat_offsets, window_grid, subpixel, fourier_frequencies(state.window_px, state.device)
    )


def windows(state: ScanState, batch: torch.Tensor, geometry: WindowGeometry) -> Windows:
    """Object patches, each window's probe modes and their exit waves for the positions ``batch``."""
    flat_index = (geometry.flat_offsets[batch].view(-1, 1, 1) + geometry.window_grid).view(-1)
    patches = state.object.view(-1)[flat_index].view(len(batch), *state.window_px)
    ramps = None
    if geometry.subpixel_px is not None:
        ramps = shift_ramps(geometry.subpixel_px[batch], geometry.frequencies)
        probes = shifted_modes(torch.fft.fft2(state.probe), ramps)
    else:
        probes = state.probe.unsqueeze(0).expand(len(batch), -1, -1, -1)
    return Windows(flat_index, patches, probes, probes * patches.unsqueeze(1), ramps)


def modes_epoch(state: ScanState, options: EpieOptions, order: torch.Tensor, update_probe: bool) -> float:
    """One epoch with every probe mode and sub-pixel window, the positions kept as they are."""
    squared_error = _modal_sweep(state, options, order, update_probe, position_steps=None)
    _orthogonalise(state, update_probe)
    return squared_error


def position_correction_epoch(
    state: ScanState, options: EpieOptions, order: torch.Tensor, update_probe: bool
) -> float:
    """:func:`modes_epoch` that also refines every window's position, moved at the end of the epoch."""
    position_steps = torch.zeros((state.n_positions, 2), dtype=torch.float32, device=state.device)
    squared_error = _modal_sweep(state, options, order, update_probe, position_steps)
    _orthogonalise(state, update_probe)
    state.move_positions(position_steps.cpu().numpy(), options.positions.max_step_px)
    return squared_error


def _orthogonalise(state: ScanState, update_probe: bool) -> None:
    if update_probe and state.n_modes > 1:
        state.probe.copy_(orthogonalise_modes(state.probe))


def _modal_sweep(
    state: ScanState,
    options: EpieOptions,
    order: torch.Tensor,
    update_probe: bool,
    position_steps: torch.Tensor | None,
) -> float:
    """Object and probe updates over every position; each window's position step into ``position_steps``
    (n, 2) when given. Returns the summed squared Fourier misfit."""
    modes, canvas, device = state.probe, state.object, state.device
    batch_size = 1 if options.execution.variant is EpieVariant.SEQUENTIAL else options.execution.batch_size
    corners, order_list = state.canvas_corners(), order.tolist()
    illumination = torch.empty(canvas.shape, dtype=torch.float32, device=device)
    object_w, object_step = options.object_weight, options.object.step
    squared_errors = []
    geometry = window_geometry(state, position_steps is not None or state.has_subpixel_windows)
    for start in range(0, state.n_positions, batch_size):
        batch = order[start : start + batch_size].to(device)
        batch_windows = windows(state, batch, geometry)
        delta, misfit = modal_fourier_update(
            batch_windows.exit_waves, state.patterns.amplitudes[batch], state.patterns.unmeasured,
            is_poisson(options),
        )  # fmt: skip
        squared_errors.append(squared_norm(delta) if misfit is None else misfit)
        if position_steps is not None:
            position_steps[batch] = position_gradient_steps(
                batch_windows.patches, batch_windows.probes, delta
            )
        probe_intensity = (modes * modes.conj()).real.sum(dim=0)
        batch_order = order_list[start : start + batch_size]
        peak = batch_illumination_peak(
            probe_intensity, batch_windows.flat_index, corners, batch_order, illumination
        )
        object_update = (batch_windows.probes.conj() * delta).sum(dim=1)
        if object_w != 1.0:
            denominator = illumination.view(-1)[batch_windows.flat_index].view(object_update.shape)
            denominator.mul_(1.0 - object_w).add_(peak * object_w).clamp_min_(DIVISION_FLOOR)
            object_update.div_(denominator).mul_(object_step)
        else:
            object_update.mul_(object_step / peak.clamp_min(DIVISION_FLOOR))
        if update_probe:
            probe_update = _modal_probe_update(batch_windows, delta, options)
        canvas.view(-1).index_add_(0, batch_windows.flat_index, object_update.view(-1))
        if update_probe:
            modes.add_(probe_update)
    return float(torch.stack(squared_errors).real.sum().item())


def _modal_probe_update(batch_windows: Windows, delta: torch.Tensor, options: EpieOptions) -> torch.Tensor:
    """β · mean_j O_j* Δ_jk / max|O_j|² per mode k (rPIE: (1 − w)|O_j|² + w max|O_j|²), unshifted."""
    patches, probe_w = batch_windows.patches, options.probe_weight
    patch_intensity = (patches * patches.conj()).real.clamp_min(DIVISION_FLOOR)
    denominator = patch_intensity.flatten(1).amax(dim=1).view(-1, 1, 1)
    if probe_w != 1.0:
        denominator = patch_intensity * (1.0 - probe_w) + denominator * probe_w
    gradients = patches.conj().unsqueeze(1) * delta / denominator.unsqueeze(1)
    if batch_windows.ramps is not None:
        gradients = unshift(gradients, batch_windows.ramps)
    return gradients.mean(dim=0).mul_(options.probe.step)


def fourier_r_factor(state: ScanState, batch_size: int) -> float:
    """Σ_j Σ_q | |Ψ_j(q)| − sqrt(I_j(q)) | / Σ_j Σ_q sqrt(I_j(q)) for the state's object and probe,
    |Ψ| summed over the probe modes in intensity; ``batch_size`` windows at a time, changing nothing."""
    geometry = window_geometry(state, shifted=state.has_subpixel_windows)
    misfit, total = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, state.n_positions, batch_size):
            stop = min(start + batch_size, state.n_positions)
            batch = torch.arange(start, stop, device=state.device)
            wave = torch.fft.fft2(windows(state, batch, geometry).exit_waves, norm="ortho")
            model = (wave * wave.conj()).real.sum(dim=1).sqrt()
            if state.patterns.unmeasured is not None:
                model.masked_fill_(state.patterns.unmeasured, 0.0)  # the stored amplitude is 0 there too
            measured = state.patterns.amplitudes[batch]
            misfit += float((model - measured).abs().sum(dtype=torch.float64).item())
            total += float(measured.sum(dtype=torch.float64).item())
    return misfit / max(total, DIVISION_FLOOR)

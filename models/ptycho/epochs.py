"""One ePIE or rPIE epoch with a single coherent probe on whole-pixel windows: the fast paths.

Each function sweeps once over every position of a :class:`~phasestream.models.ptycho.state.ScanState`
in the given order, updates its object (and probe, with ``update_probe``) in place, and returns the sum of
the squared Fourier misfits, each taken before its position's update. The equations are in
:mod:`phasestream.models.ptycho.epie`; these functions only lay them out for speed: preallocated buffers,
in-place operations, and no temporaries inside the loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phasestream.models.ptycho.fourier_update import replace_modulus_
from phasestream.models.ptycho.illumination import batch_illumination_peak
from phasestream.models.ptycho.options import EpieOptions, FourierConstraint
from phasestream.models.ptycho.state import ScanState

DIVISION_FLOOR = 1e-30
"""Keeps the ePIE step finite where a probe or object patch is exactly zero (the update is zero there)."""


def squared_norm(wave: torch.Tensor) -> torch.Tensor:
    """Σ|w|² as a 0-d complex tensor: no device sync, and vdot is the fastest reduction for complex64."""
    flat = wave.reshape(-1)
    return torch.vdot(flat, flat)


def is_poisson(options: EpieOptions) -> bool:
    return options.constraints.fourier_constraint is FourierConstraint.POISSON


def _scaled_conjugate(
    field: torch.Tensor,
    step: float,
    squared_modulus: torch.Tensor,
    scratch: torch.Tensor,
    *,
    out: torch.Tensor,
    regularisation: float = 1.0,
) -> None:
    """out = step · conj(field) / max|field|²: the factor that turns ψ' − ψ into an ePIE update.

    The maximum is taken over a contiguous real copy of |field|²: reducing the strided ``.real`` view of a
    complex tensor is about 4× slower on a CPU. ``squared_modulus`` and ``scratch`` are buffers shaped
    like ``field`` (complex and real).

    With ``regularisation`` w < 1 the denominator is rPIE's (1 − w)|field|² + w max|field|², pixel by
    pixel; w = 1 is ePIE's max|field|² and takes the cheaper scalar path.
    """
    torch.mul(field, field.conj(), out=squared_modulus)
    torch.clamp_min(squared_modulus.real, DIVISION_FLOOR, out=scratch)
    if regularisation == 1.0:
        torch.mul(field.conj(), step / scratch.amax(), out=out)
        return
    peak = scratch.amax()
    scratch.mul_(1.0 - regularisation).add_(peak * regularisation)
    torch.div(field.conj(), scratch, out=out).mul_(step)


def sequential_epoch(
    state: ScanState, options: EpieOptions, order: torch.Tensor, update_probe: bool
) -> float:
    """The paper's ePIE (or rPIE): one position at a time, both updates from the state before its step."""
    probe, canvas, amplitudes = state.probe[0], state.object, state.patterns.amplitudes
    unmeasured, poisson = state.patterns.unmeasured, is_poisson(options)
    window_y_px, window_x_px = probe.shape
    corners = state.canvas_corners()
    exit_wave, wave, squared_modulus, probe_gradient, object_weight = (
        torch.empty_like(probe) for _ in range(5)
    )
    ratio = torch.empty(probe.shape, dtype=torch.float32, device=state.device)
    object_step, probe_step = options.object.step, options.probe.step
    object_w, probe_w = options.object_weight, options.probe_weight
    _scaled_conjugate(probe, object_step, squared_modulus, ratio, out=object_weight, regularisation=object_w)
    squared_errors = []
    for index in order.tolist():
        y_px, x_px = corners[index]
        patch = canvas[y_px : y_px + window_y_px, x_px : x_px + window_x_px]
        torch.mul(probe, patch, out=exit_wave)
        torch.fft.fft2(exit_wave, norm="ortho", out=wave)
        misfit = replace_modulus_(wave, amplitudes[index], squared_modulus, ratio, unmeasured, poisson)
        torch.fft.ifft2(wave, norm="ortho", out=wave)
        delta = wave.sub_(exit_wave)
        squared_errors.append(squared_norm(delta) if misfit is None else misfit)
        if update_probe:
            # The probe step needs the object from before this position's object step.
            _scaled_conjugate(
                patch, probe_step, squared_modulus, ratio, out=probe_gradient, regularisation=probe_w
            )
            probe_gradient.mul_(delta)
            patch.addcmul_(object_weight, delta)
            probe.add_(probe_gradient)
            _scaled_conjugate(
                probe, object_step, squared_modulus, ratio, out=object_weight, regularisation=object_w
            )
        else:
            patch.addcmul_(object_weight, delta)
    return float(torch.stack(squared_errors).real.sum().item())


@dataclass(frozen=True)
class _Batch:
    """One mini-batch's views into the epoch's buffers, after its Fourier step."""

    flat_index: torch.Tensor
    patches: torch.Tensor
    delta: torch.Tensor
    squared_modulus: torch.Tensor
    ratio: torch.Tensor
    measured: torch.Tensor


def batched_epoch(state: ScanState, options: EpieOptions, order: torch.Tensor, update_probe: bool) -> float:
    """Mini-batches solved from the same object and probe, their object updates summed on the canvas over
    the summed illumination, the probe update their mean (see :mod:`phasestream.models.ptycho.epie`)."""
    probe, amplitudes, device = state.probe[0], state.patterns.amplitudes, state.device
    unmeasured, poisson = state.patterns.unmeasured, is_poisson(options)
    batch_size, n_positions = options.execution.batch_size, state.n_positions
    flat_offsets, window_grid = state.flat_window_index()
    flat_canvas = state.object.view(-1)
    order_on_device, order_list = order.to(device), order.tolist()
    corners = state.canvas_corners()
    illumination = torch.empty(state.object.shape, dtype=torch.float32, device=device)
    buffer_shape = (min(batch_size, n_positions), *probe.shape)
    complex_buffers = torch.empty((3, *buffer_shape), dtype=torch.complex64, device=device)
    real_buffers = torch.empty((2, *buffer_shape), dtype=torch.float32, device=device)
    probe_intensity = torch.empty_like(probe)
    squared_errors = []
    for start in range(0, n_positions, batch_size):
        batch = order_on_device[start : start + batch_size]
        n_batch = len(batch)
        patches, exit_wave, squared_modulus = complex_buffers[:, :n_batch]
        ratio, measured = real_buffers[:, :n_batch]
        flat_index = (flat_offsets[batch].view(-1, 1, 1) + window_grid).view(-1)
        torch.index_select(flat_canvas, 0, flat_index, out=patches.view(-1))
        torch.mul(patches, probe, out=exit_wave)
        # FFTs into fresh tensors: with out= torch computes into a temporary and copies (slower on CPU).
        wave = torch.fft.fft2(exit_wave, norm="ortho")
        torch.index_select(amplitudes, 0, batch, out=measured)
        misfit = replace_modulus_(wave, measured, squared_modulus, ratio, unmeasured, poisson)
        delta = torch.fft.ifft2(wave, norm="ortho").sub_(exit_wave)
        squared_errors.append(squared_norm(delta) if misfit is None else misfit)
        torch.mul(probe, probe.conj(), out=probe_intensity)
        batch_order = order_list[start : start + batch_size]
        peak = batch_illumination_peak(probe_intensity.real, flat_index, corners, batch_order, illumination)
        parts = _Batch(flat_index, patches, delta, squared_modulus, ratio, measured)
        _batch_step(probe, flat_canvas, parts, illumination, peak, options, update_probe)
    return float(torch.stack(squared_errors).real.sum().item())


def _batch_step(
    probe: torch.Tensor,
    flat_canvas: torch.Tensor,
    batch: _Batch,
    illumination: torch.Tensor,
    peak: torch.Tensor,
    options: EpieOptions,
    update_probe: bool,
) -> None:
    """The object (and probe) update of one mini-batch, in place; overwrites the batch's buffers."""
    object_w, object_step = options.object_weight, options.object.step
    if object_w != 1.0:
        # rPIE: (1 − α) Σ|P|² + α max Σ|P|² at every window pixel, the same for all windows of the batch
        # that cover it, so dividing each window's update by it divides their sum.
        denominator = batch.ratio.view(-1)
        torch.index_select(illumination.view(-1), 0, batch.flat_index, out=denominator)
        denominator.mul_(1.0 - object_w).add_(peak * object_w).clamp_min_(DIVISION_FLOOR)
    object_scale = object_step / peak.clamp_min(DIVISION_FLOOR)
    if update_probe:
        probe_update = _batch_probe_update(batch, options)
    if object_w != 1.0:
        batch.delta.mul_(probe.conj() * object_step).div_(batch.ratio)
    else:
        batch.delta.mul_(probe.conj() * object_scale)
    flat_canvas.index_add_(0, batch.flat_index, batch.delta.view(-1))
    if update_probe:
        probe.add_(probe_update)


def _batch_probe_update(batch: _Batch, options: EpieOptions) -> torch.Tensor:
    """Mean over the batch of β O_j* (ψ'_j − ψ_j) / max|O_j|²; overwrites the patches and ``measured``.

    For rPIE each term's denominator is (1 − β_r)|O_j|² + β_r max|O_j|² instead.
    """
    patches, delta, scratch = batch.patches, batch.delta, batch.measured
    n_batch = len(patches)
    torch.mul(patches, patches.conj(), out=batch.squared_modulus)
    # A contiguous real copy first: the per-patch max over a strided .real view is several times slower.
    torch.clamp_min(batch.squared_modulus.real, DIVISION_FLOOR, out=scratch)
    patch_max = scratch.view(n_batch, -1).amax(dim=1)
    probe_w, probe_step = options.probe_weight, options.probe.step
    if probe_w != 1.0:
        scratch.mul_(1.0 - probe_w).add_((patch_max * probe_w).view(-1, 1, 1))
        gradients = patches.conj_physical_().mul_(delta).div_(scratch)
        return gradients.sum(dim=0).mul_(probe_step / n_batch)
    weights = ((probe_step / n_batch) / patch_max).to(torch.complex64)
    gradients = patches.conj_physical_().mul_(delta)
    # The weighted sum over the batch is a matrix-vector product: one BLAS call, no temporaries.
    return (weights @ gradients.view(n_batch, -1)).view(patches.shape[1:])

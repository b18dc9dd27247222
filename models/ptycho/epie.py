"""ePIE, the extended ptychographical iterative engine, for a scan that grows while it is being solved.

Reference: A. M. Maiden and J. M. Rodenburg, "An improved ptychographical phase retrieval algorithm for
diffractive imaging", Ultramicroscopy 109, 1256-1262 (2009), its object and probe update functions. For
one position j with window offset R_j, exit wave ψ = P(r − R_j) O(r) and Fourier-constrained exit wave ψ'
(the measured modulus put on the far field of ψ):

    O(r)       += α P*(r − R_j) (ψ' − ψ) / max |P|²
    P(r − R_j) += β O*(r)       (ψ' − ψ) / max |O(r)|²      (max over the illuminated patch)

Both updates use the probe and object from before the step.

``UpdateRule.RPIE`` swaps the ePIE denominators for those of rPIE, the regularised PIE of A. M. Maiden,
D. Johnson and P. Li, "Further improvements to the ptychographical iterative engine", Optica 4, 736 (2017).
With a weight w in (0, 1] the denominator max|F|² becomes

    (1 − w) |F(r)|² + w max |F|²        (F = P for the object update with w = α, F = O for the probe with β)

a pixel-by-pixel mix of a Wiener-like division by |F|² (fast where the probe is weak) and ePIE's global
maximum (stable); w = 1 is ePIE's denominator. The paper recommends α ≈ 0.1 for the object and keeps β
near 1; here ``object_step`` and ``probe_step`` still multiply the update (1 gives the paper's rPIE).

Two variants share one solver:

- ``SEQUENTIAL``: the paper's algorithm, one position at a time in a fresh random order every epoch.
- ``BATCHED``: a mini-batch of positions is solved in parallel from the same object and probe (batched
  FFTs); their object updates are summed on the canvas with ``index_add_`` and normalised by the maximum of
  the summed illumination, max_r Σ_j |P(r − R_j)|², and the probe update is the batch mean of the per-
  position ePIE probe updates. With a batch of one position this *is* the sequential step; with larger
  batches the summed-illumination denominator keeps overlapping updates in the same batch from
  overshooting, as in the compact/parallel ePIE variants. For rPIE the object denominator is built from
  the summed illumination in the same way, (1 − α) Σ_j |P(r − R_j)|² + α max_r Σ_j |P(r − R_j)|², and
  the probe update is the batch mean of the per-position rPIE probe updates.

Measured patterns are stored once as float32 sqrt(I), already ``ifftshift``-ed: the solver works in the
FFT's native layout and never shifts per iteration. That is the project's centred far field (see
:mod:`phasestream.models.physics`), since the Fourier-modulus projection acts pixel by pixel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch

from phasestream.errors import ConfigError, FrameValidationError, PositionError
from phasestream.models.physics import probe_from_patterns
from phasestream.models.ptycho.constraints import ScaleConstraints
from phasestream.models.ptycho.fourier_update import FourierConstraint, replace_modulus_
from phasestream.models.ptycho.illumination import (
    max_summed_illumination_scatter,
    max_summed_illumination_slices,
)
from phasestream.models.ptycho.modes import (
    fourier_frequencies,
    initial_modes,
    modal_fourier_update,
    orthogonalise_modes,
    position_gradient_steps,
    shift_ramps,
    shifted_modes,
    split_positions,
    unshift,
)

DEFAULT_BATCH_SIZE = 32
"""Positions per mini-batch, tuned on two CPU cores: for 516 patterns of 128×128, batches of 8 to 64 took
the same time per epoch (within 10 %) and reached the same error after 5 epochs; 32 keeps each complex
batch buffer at 4 MiB. A GPU wants larger batches (hundreds) to fill its cores."""

_DIVISION_FLOOR = 1e-30
"""Keeps the ePIE step finite where a probe or object patch is exactly zero (the update is zero there)."""

_FLOAT_KINDS = "fc"
_SIGNED_INT_KIND = "i"


class ObjectRegulariser(Protocol):
    """O ← R(O) after every epoch, e.g. PINE's (1 − ρ) O + ρ D(O) (:mod:`phasestream.models.ptycho.pine`)."""

    def __call__(self, obj: torch.Tensor) -> torch.Tensor: ...


class EpieVariant(StrEnum):
    SEQUENTIAL = "sequential"
    BATCHED = "batched"


class UpdateRule(StrEnum):
    """The update's denominator: ePIE's max|F|², or rPIE's (1 − w)|F|² + w max|F|² (Maiden et al. 2017)."""

    EPIE = "epie"
    RPIE = "rpie"


def default_device() -> torch.device:
    """CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set for the block and restored after; None leaves it alone."""
    if num_threads is None:
        yield
        return
    threads_before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)


def _squared_norm(wave: torch.Tensor) -> torch.Tensor:
    """Σ|w|² as a 0-d complex tensor: no device sync, and vdot is the fastest reduction for complex64."""
    flat = wave.reshape(-1)
    return torch.vdot(flat, flat)


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
    torch.clamp_min(squared_modulus.real, _DIVISION_FLOOR, out=scratch)
    if regularisation == 1.0:
        torch.mul(field.conj(), step / scratch.amax(), out=out)
        return
    peak = scratch.amax()
    scratch.mul_(1.0 - regularisation).add_(peak * regularisation)
    torch.div(field.conj(), scratch, out=out).mul_(step)


class EpieSolver:
    """ePIE on a growing set of diffraction patterns; object, probe and data stay on ``device``.

    Call :meth:`add_patterns` whenever frames arrive (also between epochs) and :meth:`run_epoch` to sweep
    once over every position added so far. Window corners are pixels (y, x) in the caller's frame, whole
    or fractional; the canvas grows, padded with ones (free space), when a window falls outside it (also
    when position correction moves one out), and :attr:`canvas_origin_px` says where the caller's (0, 0)
    lies in :attr:`object`.

    ``probe_modes`` > 1 reconstructs a partially coherent beam as that many incoherent modes;
    ``position_correction_start_epoch`` refines the window corners from that epoch on, at most
    ``max_position_step_px`` per epoch and axis (:mod:`phasestream.models.ptycho.modes`). ``unmeasured``
    is a (ny, nx) detector mask, centred like the patterns: those pixels stay unconstrained.
    ``fourier_constraint`` POISSON replaces the modulus projection by a Poisson likelihood step, for low
    dose (:mod:`phasestream.models.ptycho.fourier_update`).
    ``object_regulariser`` is applied to the object after every epoch (PINE).
    ``fix_probe_power`` keeps the probe's total power, from the first probe update on, at ``probe_power``
    (the direct beam's photons per frame) or else at what it was then (the given probe, or the one built
    from the mean pattern), and ``max_object_amplitude`` bounds |O| (1 for a transmission sample); at low
    dose with the probe updated they are needed together (:mod:`phasestream.models.ptycho.constraints`).

    The object starts as ``object_guess`` (e.g. the neural preview mosaic) or as ones on a canvas of
    ``canvas_shape_px`` (or just large enough for the first windows). ``object_step`` and ``probe_step``
    are the paper's α and β. The probe is updated from epoch ``probe_update_start_epoch`` on (counting
    from 0; None keeps it fixed): a few object-only epochs first keep a rough probe guess from absorbing
    object structure.
    ``update_rule`` picks ePIE's or rPIE's denominators; for rPIE, ``rpie_alpha`` (object) and
    ``rpie_beta`` (probe) are the paper's α and β in (0, 1]: 1 gives ePIE's denominator, smaller values
    take bigger steps where the probe (or object) is weak. Defaults: α = 0.1 as the paper recommends,
    β = 1 (ePIE's probe denominator).
    Each epoch visits the positions in the order of ``torch.randperm`` drawn from a generator seeded
    with ``seed``.

    ``num_threads`` sets torch's intra-op threads during :meth:`run_epoch` and restores them after. By
    default it is 1 for ``SEQUENTIAL`` on a CPU, whose 128×128 operations gain nothing from a second
    thread and ran 3.5× slower with two while another process kept one core busy; otherwise the default
    leaves torch's setting. ``BATCHED`` on two cores runs 1.7× faster with both threads, but OpenMP's
    spinning threads make it up to 20× slower when other processes compete for the cores, unless the
    process runs with ``OMP_WAIT_POLICY=PASSIVE``.
    """

    def __init__(
        self,
        *,
        probe: np.ndarray | torch.Tensor | None = None,
        variant: EpieVariant = EpieVariant.BATCHED,
        update_rule: UpdateRule = UpdateRule.EPIE,
        rpie_alpha: float = 0.1,
        rpie_beta: float = 1.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        object_step: float = 1.0,
        probe_step: float = 1.0,
        probe_update_start_epoch: int | None = 2,
        probe_modes: int = 1,
        position_correction_start_epoch: int | None = None,
        max_position_step_px: float = 1.0,
        unmeasured: np.ndarray | None = None,
        fourier_constraint: FourierConstraint = FourierConstraint.PROJECTION,
        object_regulariser: ObjectRegulariser | None = None,
        fix_probe_power: bool = False,
        probe_power: float | None = None,
        max_object_amplitude: float | None = None,
        canvas_shape_px: tuple[int, int] | None = None,
        object_guess: np.ndarray | torch.Tensor | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be at least 1 (1 reproduces sequential ePIE)")
        for name, value in (("object_step", object_step), ("probe_step", probe_step)):
            if not 0 < value <= 2:
                raise ConfigError(f"{name}={value!r} is outside (0, 2], where ePIE is stable; 1 is usual")
        for name, value in (("rpie_alpha", rpie_alpha), ("rpie_beta", rpie_beta)):
            if not 0 < value <= 1:
                raise ConfigError(f"{name}={value!r} is outside (0, 1]; rPIE uses α ≈ 0.1 and β ≈ 1")
        if probe_update_start_epoch is not None and probe_update_start_epoch < 0:
            raise ConfigError(
                f"probe_update_start_epoch={probe_update_start_epoch!r} must be 0 or more, or None to keep "
                "the probe fixed"
            )
        if probe_modes < 1:
            raise ConfigError(f"probe_modes={probe_modes!r} must be at least 1 (1 is a coherent probe)")
        if position_correction_start_epoch is not None and position_correction_start_epoch < 0:
            raise ConfigError(
                f"position_correction_start_epoch={position_correction_start_epoch!r} must be 0 or more, "
                "or None to keep the positions as given"
            )
        if not 0 < max_position_step_px <= 8:
            raise ConfigError(
                f"max_position_step_px={max_position_step_px!r} is outside (0, 8] px; 1 px per epoch is usual"
            )
        if num_threads is not None and num_threads < 1:
            raise ConfigError(f"num_threads={num_threads!r} must be at least 1, or None for torch's setting")
        self.variant = EpieVariant(variant)
        self.update_rule = UpdateRule(update_rule)
        self.rpie_alpha = rpie_alpha
        self.rpie_beta = rpie_beta
        self.batch_size = batch_size
        self.object_step = object_step
        self.probe_step = probe_step
        self.probe_update_start_epoch = probe_update_start_epoch
        self.n_modes = probe_modes
        self.position_correction_start_epoch = position_correction_start_epoch
        self.max_position_step_px = max_position_step_px
        self.device = torch.device(device) if device is not None else default_device()
        if num_threads is None and self.variant is EpieVariant.SEQUENTIAL and self.device.type == "cpu":
            num_threads = 1
        self.num_threads = num_threads
        self._seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        self._probe: torch.Tensor | None = None
        if probe is not None:
            given = torch.as_tensor(probe).to(self.device, torch.complex64)
            if given.ndim not in (2, 3) or (given.ndim == 3 and len(given) > probe_modes):
                raise ConfigError(
                    f"probe has shape {tuple(given.shape)} for probe_modes={probe_modes}: pass one probe "
                    "(ny, nx) or at most probe_modes modes (k, ny, nx)"
                )
            self._set_probe(given)
        if object_guess is not None:
            self._object = torch.as_tensor(object_guess).to(self.device, torch.complex64).clone()
            if self._object.ndim != 2 or canvas_shape_px not in (None, tuple(self._object.shape)):
                raise ConfigError(
                    f"object_guess has shape {tuple(self._object.shape)} and canvas_shape_px is "
                    f"{canvas_shape_px!r}: pass one 2D guess and leave canvas_shape_px out"
                )
        else:
            canvas_shape = (0, 0) if canvas_shape_px is None else tuple(canvas_shape_px)
            self._object = torch.ones(canvas_shape, dtype=torch.complex64, device=self.device)
        self._origin_px = np.zeros(2, dtype=np.int64)
        self._amplitudes = torch.empty((0, 0, 0), dtype=torch.float32, device=self.device)
        self._corners_px = np.empty((0, 2), dtype=np.int64)
        self._subpixel_px = np.empty((0, 2), dtype=np.float32)
        self._n_positions = 0
        self._measured_energy = 0.0
        self._unmeasured: torch.Tensor | None = None
        if unmeasured is not None:
            mask = np.asarray(unmeasured, dtype=bool)
            if mask.ndim != 2:
                raise ConfigError(f"unmeasured has shape {mask.shape}: pass one (ny, nx) detector mask")
            # Stored in the FFT's native layout, like the amplitudes.
            self._unmeasured = torch.from_numpy(np.fft.ifftshift(mask).copy()).to(self.device)
        self.object_regulariser = object_regulariser
        self.constraints = ScaleConstraints(fix_probe_power, probe_power, max_object_amplitude)
        self._poisson = FourierConstraint(fourier_constraint) is FourierConstraint.POISSON
        self._epochs_run = 0

    @property
    def _object_regularisation(self) -> float:
        """w of the object update's denominator (1 − w)|P|² + w max|P|²; 1 for ePIE."""
        return self.rpie_alpha if self.update_rule is UpdateRule.RPIE else 1.0

    @property
    def _probe_regularisation(self) -> float:
        """w of the probe update's denominator (1 − w)|O|² + w max|O|²; 1 for ePIE."""
        return self.rpie_beta if self.update_rule is UpdateRule.RPIE else 1.0

    # ------------------------------------------------------------------ state, as NumPy copies
    @property
    def object(self) -> np.ndarray:
        """Complex64 copy of the whole object canvas."""
        return self._object.to("cpu", copy=True).numpy()

    @property
    def probe(self) -> np.ndarray:
        """Complex64 copy of the probe (the strongest mode); raises before the first patterns if no probe
        guess was given."""
        return self.probe_modes[0]

    @property
    def probe_modes(self) -> np.ndarray:
        """Complex64 copy of every probe mode (k, ny, nx), strongest first."""
        if self._probe is None:
            raise ConfigError("the probe is not known yet: add patterns first or pass probe= to EpieSolver")
        return self._probe.to("cpu", copy=True).numpy()

    @property
    def positions_px(self) -> np.ndarray:
        """Window corners (n, 2) (y, x) in the caller's frame, float64, as refined so far."""
        return self._corners_px + self._subpixel_px.astype(np.float64)

    def _set_probe(self, probe: torch.Tensor) -> None:
        """Store (k, ny, nx) modes, topping a single probe or too few modes up to ``n_modes``."""
        modes = probe.unsqueeze(0) if probe.ndim == 2 else probe
        if len(modes) < self.n_modes:
            extra = initial_modes(modes[0], self.n_modes - len(modes) + 1, seed=self._seed)[1:]
            modes = torch.cat([modes, extra.to(modes.device)])
        self._probe = modes.to(self.device, torch.complex64).clone()

    @property
    def _window_px(self) -> tuple[int, int]:
        return tuple(self._probe.shape[-2:])

    @property
    def _is_modal(self) -> bool:
        """Whether epochs need the general path: several modes, sub-pixel windows or position refinement."""
        return (
            self.n_modes > 1
            or self.position_correction_start_epoch is not None
            or bool(self._subpixel_px.any())
        )

    @property
    def canvas_origin_px(self) -> tuple[int, int]:
        """Canvas pixel (y, x) of the caller's window corner (0, 0); grows when the canvas grows up/left."""
        return int(self._origin_px[0]), int(self._origin_px[1])

    @property
    def n_positions(self) -> int:
        return self._n_positions

    @property
    def epochs_run(self) -> int:
        return self._epochs_run

    def illumination(self) -> np.ndarray:
        """Σ_j |P(r − R_j)|² on the canvas (float32): where it is high the object is well determined."""
        if self._probe is None or self._n_positions == 0:
            return np.zeros(tuple(self._object.shape), dtype=np.float32)
        total = torch.zeros(self._object.numel(), dtype=torch.float32, device=self.device)
        probe_intensity = (self._probe * self._probe.conj()).real.sum(dim=0)
        flat_offsets, window_grid = self._flat_window_index()
        for start in range(0, self._n_positions, self.batch_size):
            offsets = flat_offsets[start : start + self.batch_size]
            index = (offsets.view(-1, 1, 1) + window_grid).view(-1)
            total.index_add_(0, index, probe_intensity.expand(len(offsets), -1, -1).reshape(-1))
        return total.view(self._object.shape).cpu().numpy()

    # ------------------------------------------------------------------ data
    def add_patterns(self, patterns: np.ndarray | torch.Tensor, top_left_px: np.ndarray) -> None:
        """Append diffraction intensities (n, ny, nx), centred, and their window corners (n, 2) (y, x).

        Counts may be any integer or float dtype (uint16, uint32, float32, ...); sqrt(I) is stored once as
        float32. Without a probe guess the first call sets the probe from these patterns' mean. Corners may
        be fractional: the window is cut at the nearest pixel and the probe moved by the rest.
        """
        intensities = self._validated_intensities(patterns)
        corners = self._validated_corners(top_left_px, len(intensities))
        pattern_shape = tuple(intensities.shape[1:])
        if self._probe is None:
            self._set_probe(probe_from_patterns(intensities.mean(dim=0)))
        if self._window_px != pattern_shape:
            raise FrameValidationError(
                f"patterns are {pattern_shape} but the probe is {self._window_px}: "
                "bin or crop the frames to the probe's shape, or start a new solver"
            )
        whole_px, subpixel_px = split_positions(corners)
        self._grow_canvas_to_fit(whole_px)
        amplitudes = torch.fft.ifftshift(intensities.sqrt(), dim=(-2, -1))
        if self._unmeasured is not None:
            if tuple(self._unmeasured.shape) != pattern_shape:
                raise FrameValidationError(
                    f"patterns are {pattern_shape} but the unmeasured-pixel mask is "
                    f"{tuple(self._unmeasured.shape)}: pass a mask of the detector's (binned) shape"
                )
            amplitudes.masked_fill_(self._unmeasured, 0.0)
        self._measured_energy += float(amplitudes.square().sum(dtype=torch.float64).item())
        self._append_amplitudes(amplitudes)
        self._corners_px = np.concatenate([self._corners_px, whole_px])
        self._subpixel_px = np.concatenate([self._subpixel_px, subpixel_px])
        self._n_positions += len(intensities)

    def _validated_intensities(self, patterns: np.ndarray | torch.Tensor) -> torch.Tensor:
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
        return torch.from_numpy(counts).to(self.device)

    def _validated_corners(self, top_left_px: np.ndarray, n_patterns: int) -> np.ndarray:
        corners = np.asarray(top_left_px)
        if corners.shape != (n_patterns, 2):
            raise PositionError(
                f"top_left_px has shape {corners.shape}: pass ({n_patterns}, 2) window corners (y, x)"
            )
        if corners.dtype.kind not in "iuf" or not np.isfinite(corners).all():
            raise PositionError(
                f"top_left_px (dtype {corners.dtype}) holds non-finite or non-numeric corners: "
                "fix the position source; every window needs a finite (y, x)"
            )
        return corners.astype(np.float64)

    def _append_amplitudes(self, amplitudes: torch.Tensor) -> None:
        # Capacity doubles, so a scan arriving in many small batches costs amortised O(n) copies.
        needed = self._n_positions + len(amplitudes)
        if needed > len(self._amplitudes):
            grown = torch.empty(
                (max(needed, 2 * len(self._amplitudes)), *amplitudes.shape[1:]),
                dtype=torch.float32,
                device=self.device,
            )
            if self._n_positions:
                grown[: self._n_positions] = self._amplitudes[: self._n_positions]
            self._amplitudes = grown
        self._amplitudes[self._n_positions : needed] = amplitudes

    def _grow_canvas_to_fit(self, corners: np.ndarray) -> None:
        window_px = np.asarray(self._window_px)
        canvas_px = np.asarray(self._object.shape)
        first_px = corners.min(axis=0) + self._origin_px
        end_px = corners.max(axis=0) + self._origin_px + window_px
        pad_before = np.maximum(0, -first_px)
        pad_after = np.maximum(0, end_px - canvas_px)
        if not (pad_before.any() or pad_after.any()):
            return
        grown_shape = tuple(canvas_px + pad_before + pad_after)
        grown = torch.ones(grown_shape, dtype=torch.complex64, device=self.device)
        top_px, left_px = pad_before
        grown[top_px : top_px + canvas_px[0], left_px : left_px + canvas_px[1]] = self._object
        self._object = grown
        self._origin_px = self._origin_px + pad_before

    def _flat_window_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat canvas offset of every window corner (n,) and the flat offsets inside a window (1, ny, nx)."""
        canvas_width = self._object.shape[1]
        corners = torch.from_numpy(self._corners_px + self._origin_px).to(self.device)
        flat_offsets = corners[:, 0] * canvas_width + corners[:, 1]
        rows = torch.arange(self._window_px[0], device=self.device).view(-1, 1)
        cols = torch.arange(self._window_px[1], device=self.device).view(1, -1)
        return flat_offsets, (rows * canvas_width + cols).unsqueeze(0)

    # ------------------------------------------------------------------ iterations
    def run_epoch(self) -> float:
        """One sweep over every position in a fresh random order; returns the normalised Fourier error.

        Error = Σ_j ‖|Ψ_j| − sqrt(I_j)‖² / Σ_j ‖sqrt(I_j)‖², each term taken before position j's update.
        It is computed as ‖ψ' − ψ‖² (Parseval), which equals ‖|Ψ| − sqrt(I)‖² wherever |Ψ| ≥ ε.
        """
        if self._n_positions == 0:
            raise ConfigError("run_epoch() before any add_patterns(): add at least one pattern first")
        update_probe = _started(self.probe_update_start_epoch, self._epochs_run)
        correct_positions = _started(self.position_correction_start_epoch, self._epochs_run)
        self.constraints.before_sweep(self._probe, self._object, update_probe)
        order = torch.randperm(self._n_positions, generator=self._generator)
        with _torch_threads(self.num_threads):
            if self._is_modal:
                squared_error = self._modal_epoch(order, update_probe, correct_positions)
            elif self.variant is EpieVariant.SEQUENTIAL:
                squared_error = self._sequential_epoch(order.tolist(), update_probe)
            else:
                squared_error = self._batched_epoch(order, update_probe)
        self.constraints.after_sweep(self._probe, self._object, update_probe)
        if self.object_regulariser is not None:
            with torch.no_grad():
                self._object.copy_(self.object_regulariser(self._object))
        self.constraints.after_epoch(self._object)
        self._epochs_run += 1
        return squared_error / max(self._measured_energy, _DIVISION_FLOOR)

    def _sequential_epoch(self, order: list[int], update_probe: bool) -> float:
        probe, canvas, amplitudes = self._probe[0], self._object, self._amplitudes
        window_y_px, window_x_px = probe.shape
        corners = (self._corners_px + self._origin_px).tolist()
        exit_wave, wave, squared_modulus, probe_gradient, object_weight = (
            torch.empty_like(probe) for _ in range(5)
        )
        ratio = torch.empty(probe.shape, dtype=torch.float32, device=self.device)
        object_w, probe_w = self._object_regularisation, self._probe_regularisation
        _scaled_conjugate(
            probe, self.object_step, squared_modulus, ratio, out=object_weight, regularisation=object_w
        )
        squared_errors = []
        for index in order:
            y_px, x_px = corners[index]
            patch = canvas[y_px : y_px + window_y_px, x_px : x_px + window_x_px]
            torch.mul(probe, patch, out=exit_wave)
            torch.fft.fft2(exit_wave, norm="ortho", out=wave)
            misfit = replace_modulus_(
                wave, amplitudes[index], squared_modulus, ratio, self._unmeasured, self._poisson
            )
            torch.fft.ifft2(wave, norm="ortho", out=wave)
            delta = wave.sub_(exit_wave)
            squared_errors.append(_squared_norm(delta) if misfit is None else misfit)
            if update_probe:
                # The probe step needs the object from before this position's object step.
                _scaled_conjugate(
                    patch, self.probe_step, squared_modulus, ratio, out=probe_gradient, regularisation=probe_w
                )
                probe_gradient.mul_(delta)
                patch.addcmul_(object_weight, delta)
                probe.add_(probe_gradient)
                _scaled_conjugate(
                    probe, self.object_step, squared_modulus, ratio, out=object_weight,
                    regularisation=object_w,
                )  # fmt: skip
            else:
                patch.addcmul_(object_weight, delta)
        return float(torch.stack(squared_errors).real.sum().item())

    def _batched_epoch(self, order: torch.Tensor, update_probe: bool) -> float:
        probe, canvas, amplitudes = self._probe[0], self._object, self._amplitudes
        window_px = tuple(probe.shape)
        flat_offsets, window_grid = self._flat_window_index()
        flat_canvas = canvas.view(-1)
        order_on_device = order.to(self.device)
        order_list = order.tolist()
        corners = (self._corners_px + self._origin_px).tolist()
        scatter_illumination = self.device.type != "cpu"
        illumination = torch.empty(canvas.shape, dtype=torch.float32, device=self.device)
        batch_capacity = min(self.batch_size, self._n_positions)
        buffer_shape = (batch_capacity, *window_px)
        complex_buffers = torch.empty((3, *buffer_shape), dtype=torch.complex64, device=self.device)
        real_buffers = torch.empty((2, *buffer_shape), dtype=torch.float32, device=self.device)
        probe_intensity = torch.empty_like(probe)
        squared_errors = []
        for start in range(0, self._n_positions, self.batch_size):
            batch = order_on_device[start : start + self.batch_size]
            n_batch = len(batch)
            patches, exit_wave, squared_modulus = complex_buffers[:, :n_batch]
            ratio, measured = real_buffers[:, :n_batch]
            flat_index = (flat_offsets[batch].view(-1, 1, 1) + window_grid).view(-1)
            torch.index_select(flat_canvas, 0, flat_index, out=patches.view(-1))
            torch.mul(patches, probe, out=exit_wave)
            # FFTs into fresh tensors: with out= torch computes into a temporary and copies (slower on CPU).
            wave = torch.fft.fft2(exit_wave, norm="ortho")
            torch.index_select(amplitudes, 0, batch, out=measured)
            misfit = replace_modulus_(wave, measured, squared_modulus, ratio, self._unmeasured, self._poisson)
            delta = torch.fft.ifft2(wave, norm="ortho").sub_(exit_wave)
            squared_errors.append(_squared_norm(delta) if misfit is None else misfit)

            torch.mul(probe, probe.conj(), out=probe_intensity)
            if scatter_illumination:
                peak = max_summed_illumination_scatter(probe_intensity.real, flat_index, illumination)
            else:
                batch_corners = [corners[index] for index in order_list[start : start + self.batch_size]]
                peak = max_summed_illumination_slices(probe_intensity.real, batch_corners, illumination)
            object_w = self._object_regularisation
            if object_w != 1.0:
                # rPIE: (1 − α) Σ|P|² + α max Σ|P|² at every window pixel, the same for all windows of the
                # batch that cover it, so dividing each window's update by it divides their sum.
                denominator = ratio.view(-1)
                torch.index_select(illumination.view(-1), 0, flat_index, out=denominator)
                denominator.mul_(1.0 - object_w).add_(peak * object_w).clamp_min_(_DIVISION_FLOOR)
            object_scale = self.object_step / peak.clamp_min(_DIVISION_FLOOR)
            if update_probe:
                probe_update = self._batch_probe_update(patches, delta, squared_modulus, measured)
            if object_w != 1.0:
                delta.mul_(probe.conj() * self.object_step).div_(ratio)
            else:
                delta.mul_(probe.conj() * object_scale)
            flat_canvas.index_add_(0, flat_index, delta.view(-1))
            if update_probe:
                probe.add_(probe_update)
        return float(torch.stack(squared_errors).real.sum().item())

    def _window_geometry(self, shifted: bool) -> _WindowGeometry:
        """Where every window lies, built once per sweep: the positions do not move within one."""
        flat_offsets, window_grid = self._flat_window_index()
        if not shifted:
            return _WindowGeometry(flat_offsets, window_grid, None, None)
        subpixel = torch.from_numpy(self._subpixel_px).to(self.device)
        return _WindowGeometry(
            flat_offsets, window_grid, subpixel, fourier_frequencies(self._window_px, self.device)
        )

    def _windows(self, batch: torch.Tensor, geometry: _WindowGeometry) -> _Windows:
        """Object patches, each window's probe modes and their exit waves for the positions ``batch``."""
        flat_index = (geometry.flat_offsets[batch].view(-1, 1, 1) + geometry.window_grid).view(-1)
        patches = self._object.view(-1)[flat_index].view(len(batch), *self._window_px)
        ramps = None
        if geometry.subpixel_px is not None:
            ramps = shift_ramps(geometry.subpixel_px[batch], geometry.frequencies)
            probes = shifted_modes(torch.fft.fft2(self._probe), ramps)
        else:
            probes = self._probe.unsqueeze(0).expand(len(batch), -1, -1, -1)
        return _Windows(flat_index, patches, probes, probes * patches.unsqueeze(1), ramps)

    def _modal_epoch(self, order: torch.Tensor, update_probe: bool, correct_positions: bool) -> float:
        """One epoch with mixed-state probes, sub-pixel windows and position refinement.

        The equations are in :mod:`phasestream.models.ptycho.modes`. Mini-batches are as in ``BATCHED``
        (``SEQUENTIAL`` is a batch of one): the object update is Σ_k P_k* Δ_k over the summed-illumination
        denominator (rPIE's when chosen), each mode's probe update is the batch mean of O_j* Δ_jk / max|O_j|²
        moved back by the window's sub-pixel fraction, and the modes are re-orthogonalised after the epoch.
        Position steps are collected over the epoch and applied at its end, each clipped to
        ``max_position_step_px`` per axis, less their mean (the data cannot tell a common shift of every
        window, so the mean position stays where the caller put it).
        """
        modes, canvas = self._probe, self._object
        batch_size = 1 if self.variant is EpieVariant.SEQUENTIAL else self.batch_size
        shifted = correct_positions or bool(self._subpixel_px.any())
        corners = (self._corners_px + self._origin_px).tolist()
        order_list = order.tolist()
        illumination = torch.empty(canvas.shape, dtype=torch.float32, device=self.device)
        position_steps = torch.zeros((self._n_positions, 2), dtype=torch.float32, device=self.device)
        object_w, probe_w = self._object_regularisation, self._probe_regularisation
        squared_errors = []
        geometry = self._window_geometry(shifted)
        for start in range(0, self._n_positions, batch_size):
            batch = order[start : start + batch_size].to(self.device)
            windows = self._windows(batch, geometry)
            delta, misfit = modal_fourier_update(
                windows.exit_waves, self._amplitudes[batch], self._unmeasured, self._poisson
            )
            squared_errors.append(_squared_norm(delta) if misfit is None else misfit)
            if correct_positions:
                position_steps[batch] = position_gradient_steps(windows.patches, windows.probes, delta)

            probe_intensity = (modes * modes.conj()).real.sum(dim=0)
            if self.device.type != "cpu":
                peak = max_summed_illumination_scatter(probe_intensity, windows.flat_index, illumination)
            else:
                batch_corners = [corners[index] for index in order_list[start : start + batch_size]]
                peak = max_summed_illumination_slices(probe_intensity, batch_corners, illumination)
            object_update = (windows.probes.conj() * delta).sum(dim=1)
            if object_w != 1.0:
                denominator = illumination.view(-1)[windows.flat_index].view(object_update.shape)
                denominator.mul_(1.0 - object_w).add_(peak * object_w).clamp_min_(_DIVISION_FLOOR)
                object_update.div_(denominator).mul_(self.object_step)
            else:
                object_update.mul_(self.object_step / peak.clamp_min(_DIVISION_FLOOR))
            if update_probe:
                probe_update = self._modal_probe_update(windows, delta, probe_w)
            canvas.view(-1).index_add_(0, windows.flat_index, object_update.view(-1))
            if update_probe:
                modes.add_(probe_update)
        if update_probe and self.n_modes > 1:
            modes.copy_(orthogonalise_modes(modes))
        if correct_positions:
            self._apply_position_steps(position_steps.cpu().numpy())
        return float(torch.stack(squared_errors).real.sum().item())

    def _modal_probe_update(self, windows: _Windows, delta: torch.Tensor, probe_w: float) -> torch.Tensor:
        """β · mean_j O_j* Δ_jk / max|O_j|² per mode k (rPIE: (1 − w)|O_j|² + w max|O_j|²), unshifted."""
        patch_intensity = (windows.patches * windows.patches.conj()).real.clamp_min(_DIVISION_FLOOR)
        denominator = patch_intensity.flatten(1).amax(dim=1).view(-1, 1, 1)
        if probe_w != 1.0:
            denominator = patch_intensity * (1.0 - probe_w) + denominator * probe_w
        gradients = windows.patches.conj().unsqueeze(1) * delta / denominator.unsqueeze(1)
        if windows.ramps is not None:
            gradients = unshift(gradients, windows.ramps)
        return gradients.mean(dim=0).mul_(self.probe_step)

    def _apply_position_steps(self, steps_px: np.ndarray) -> None:
        # Clip, then centre: the mean position stays exactly where the caller put it.
        steps_px = np.clip(steps_px, -self.max_position_step_px, self.max_position_step_px)
        steps_px -= steps_px.mean(axis=0)
        whole_px, subpixel_px = split_positions(self.positions_px + steps_px)
        self._grow_canvas_to_fit(whole_px)
        self._corners_px, self._subpixel_px = whole_px, subpixel_px

    def fourier_r_factor(self) -> float:
        """R = Σ_j Σ_q | |Ψ_j(q)| − sqrt(I_j(q)) | / Σ_j Σ_q sqrt(I_j(q)) for the current object and probe.

        The crystallographers' R-factor on amplitudes, |Ψ| summed over the probe modes in intensity; it
        needs one forward pass over every position and changes nothing.
        """
        if self._n_positions == 0:
            raise ConfigError("fourier_r_factor() before any add_patterns(): add at least one pattern first")
        geometry = self._window_geometry(shifted=bool(self._subpixel_px.any()))
        misfit, total = 0.0, 0.0
        with torch.no_grad(), _torch_threads(self.num_threads):
            for start in range(0, self._n_positions, self.batch_size):
                stop = min(start + self.batch_size, self._n_positions)
                batch = torch.arange(start, stop, device=self.device)
                wave = torch.fft.fft2(self._windows(batch, geometry).exit_waves, norm="ortho")
                model = (wave * wave.conj()).real.sum(dim=1).sqrt()
                if self._unmeasured is not None:
                    model.masked_fill_(self._unmeasured, 0.0)  # the stored amplitude is 0 there too
                measured = self._amplitudes[batch]
                misfit += float((model - measured).abs().sum(dtype=torch.float64).item())
                total += float(measured.sum(dtype=torch.float64).item())
        return misfit / max(total, _DIVISION_FLOOR)

    def _batch_probe_update(
        self, patches: torch.Tensor, delta: torch.Tensor, squared_modulus: torch.Tensor, scratch: torch.Tensor
    ) -> torch.Tensor:
        """Mean over the batch of β O_j* (ψ'_j − ψ_j) / max|O_j|²; overwrites ``patches`` and the scratch.

        For rPIE each term's denominator is (1 − β_r)|O_j|² + β_r max|O_j|² instead.
        """
        n_batch = len(patches)
        torch.mul(patches, patches.conj(), out=squared_modulus)
        # A contiguous real copy first: the per-patch max over a strided .real view is several times slower.
        torch.clamp_min(squared_modulus.real, _DIVISION_FLOOR, out=scratch)
        patch_max = scratch.view(n_batch, -1).amax(dim=1)
        probe_w = self._probe_regularisation
        if probe_w != 1.0:
            scratch.mul_(1.0 - probe_w).add_((patch_max * probe_w).view(-1, 1, 1))
            gradients = patches.conj_physical_().mul_(delta).div_(scratch)
            return gradients.sum(dim=0).mul_(self.probe_step / n_batch)
        weights = ((self.probe_step / n_batch) / patch_max).to(torch.complex64)
        gradients = patches.conj_physical_().mul_(delta)
        # The weighted sum over the batch is a matrix-vector product: one BLAS call, no temporaries.
        return (weights @ gradients.view(n_batch, -1)).view(patches.shape[1:])


@dataclass(frozen=True)
class _WindowGeometry:
    """Flat canvas offset of every window corner (n,), flat offsets inside a window (1, ny, nx), and for
    sub-pixel windows their fractions (n, 2) and the FFT frequencies that move the probe by them."""

    flat_offsets: torch.Tensor
    window_grid: torch.Tensor
    subpixel_px: torch.Tensor | None
    frequencies: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class _Windows:
    """A mini-batch's windows: flat canvas index of every pixel, object patches (B, ny, nx), probe modes
    (B, K, ny, nx) moved by each window's sub-pixel fraction, exit waves (B, K, ny, nx), and the phase
    ramps used for the move (None when every window sits on whole pixels)."""

    flat_index: torch.Tensor
    patches: torch.Tensor
    probes: torch.Tensor
    exit_waves: torch.Tensor
    ramps: torch.Tensor | None


def _started(start_epoch: int | None, epochs_run: int) -> bool:
    return start_epoch is not None and epochs_run >= start_epoch

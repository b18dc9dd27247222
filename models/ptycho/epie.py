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
near 1; here ``object.step`` and ``probe.step`` still multiply the update (1 gives the paper's rPIE).

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

The solver is three parts: its settings (:class:`~phasestream.models.ptycho.options.EpieOptions`), its
state (:class:`~phasestream.models.ptycho.state.ScanState`: object canvas, probe modes, window positions
and the measured patterns), and one function per kind of epoch: the fast single-mode paths
(:mod:`~phasestream.models.ptycho.epochs`) and the general path for probe modes, sub-pixel windows and
position correction (:mod:`~phasestream.models.ptycho.modal_epochs`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from phasestream.errors import ConfigError
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.ptycho.constraints import ScaleConstraints
from phasestream.models.ptycho.epochs import DIVISION_FLOOR, batched_epoch, sequential_epoch
from phasestream.models.ptycho.modal_epochs import fourier_r_factor, modes_epoch, position_correction_epoch
from phasestream.models.ptycho.options import EpieOptions, EpieVariant
from phasestream.models.ptycho.state import ScanState


class ObjectRegulariser(Protocol):
    """O ← R(O) after every epoch, e.g. PINE's (1 − ρ) O + ρ D(O) (:mod:`phasestream.models.ptycho.pine`)."""

    def __call__(self, obj: torch.Tensor) -> torch.Tensor: ...


class EpieSolver:
    """ePIE on a growing set of diffraction patterns; object, probe and data stay on the options' device.

    Call :meth:`add_patterns` whenever frames arrive (also between epochs) and :meth:`run_epoch` to sweep
    once over every position added so far. Window corners are pixels (y, x) in the caller's frame, whole
    or fractional; the canvas grows, padded with ones (free space), when a window falls outside it (also
    when position correction moves one out), and :attr:`canvas_origin_px` says where the caller's (0, 0)
    lies in :attr:`object`.

    ``options`` say everything about the updates (:mod:`phasestream.models.ptycho.options`); the other
    arguments are the start: ``probe`` (one probe, or up to ``probe.modes`` modes; None: built from the
    first patterns' mean), ``object_guess`` (e.g. the neural preview mosaic) or else ones on a canvas of
    ``canvas_shape_px`` (or just large enough for the first windows), and ``unmeasured``, a (ny, nx)
    detector mask, centred like the patterns, whose pixels stay unconstrained.
    ``object_regulariser`` is applied to the object after every epoch (PINE).

    Each epoch visits the positions in the order of ``torch.randperm`` drawn from a generator seeded
    with ``execution.seed``.

    ``execution.num_threads`` sets torch's intra-op threads during :meth:`run_epoch` and restores them
    after. By default it is 1 for ``SEQUENTIAL`` on a CPU, whose 128×128 operations gain nothing from a
    second thread and ran 3.5× slower with two while another process kept one core busy; otherwise the
    default leaves torch's setting. ``BATCHED`` on two cores runs 1.7× faster with both threads, but
    OpenMP's spinning threads make it up to 20× slower when other processes compete for the cores, unless
    the process runs with ``OMP_WAIT_POLICY=PASSIVE``.
    """

    def __init__(
        self,
        options: EpieOptions | None = None,
        *,
        probe: np.ndarray | torch.Tensor | None = None,
        object_guess: np.ndarray | torch.Tensor | None = None,
        canvas_shape_px: tuple[int, int] | None = None,
        unmeasured: np.ndarray | None = None,
        object_regulariser: ObjectRegulariser | None = None,
    ) -> None:
        self.options = options if options is not None else EpieOptions()
        execution = self.options.execution
        self.device = default_device(execution.device)
        self.num_threads = execution.num_threads
        """torch's intra-op threads during each epoch; None leaves the process's setting."""
        if (
            self.num_threads is None
            and execution.variant is EpieVariant.SEQUENTIAL
            and self.device.type == "cpu"
        ):
            self.num_threads = 1
        self.state = ScanState(
            self.device, n_modes=self.options.probe.modes, seed=execution.seed, probe=probe,
            object_guess=object_guess, canvas_shape_px=canvas_shape_px, unmeasured=unmeasured,
        )  # fmt: skip
        self.object_regulariser = object_regulariser
        self.constraints = ScaleConstraints(self.options.constraints)
        self._generator = torch.Generator().manual_seed(execution.seed)
        self._epochs_run = 0

    # ------------------------------------------------------------------ state, as NumPy copies
    @property
    def object(self) -> np.ndarray:
        """Complex64 copy of the whole object canvas."""
        return self.state.object.to("cpu", copy=True).numpy()

    @property
    def probe(self) -> np.ndarray:
        """Complex64 copy of the probe (the strongest mode); raises before the first patterns if no probe
        guess was given."""
        return self.probe_modes[0]

    @property
    def probe_modes(self) -> np.ndarray:
        """Complex64 copy of every probe mode (k, ny, nx), strongest first."""
        if self.state.probe is None:
            raise ConfigError("the probe is not known yet: add patterns first or pass probe= to EpieSolver")
        return self.state.probe.to("cpu", copy=True).numpy()

    @property
    def positions_px(self) -> np.ndarray:
        """Window corners (n, 2) (y, x) in the caller's frame, float64, as refined so far."""
        return self.state.positions_px

    @property
    def canvas_origin_px(self) -> tuple[int, int]:
        """Canvas pixel (y, x) of the caller's window corner (0, 0); grows when the canvas grows up/left."""
        origin_px = self.state.origin_px
        return int(origin_px[0]), int(origin_px[1])

    @property
    def n_positions(self) -> int:
        return self.state.n_positions

    @property
    def epochs_run(self) -> int:
        return self._epochs_run

    def illumination(self) -> np.ndarray:
        """Σ_j |P(r − R_j)|² on the canvas (float32): where it is high the object is well determined."""
        return self.state.illumination(self.options.execution.batch_size)

    # ------------------------------------------------------------------ data
    def add_patterns(self, patterns: np.ndarray | torch.Tensor, top_left_px: np.ndarray) -> None:
        """Append diffraction intensities (n, ny, nx), centred, and their window corners (n, 2) (y, x).

        Counts may be any integer or float dtype (uint16, uint32, float32, ...); sqrt(I) is stored once as
        float32. Without a probe guess the first call sets the probe from these patterns' mean. Corners may
        be fractional: the window is cut at the nearest pixel and the probe moved by the rest.
        """
        self.state.add(patterns, top_left_px)

    # ------------------------------------------------------------------ iterations
    def run_epoch(self) -> float:
        """One sweep over every position in a fresh random order; returns the normalised Fourier error.

        Error = Σ_j ‖|Ψ_j| − sqrt(I_j)‖² / Σ_j ‖sqrt(I_j)‖², each term taken before position j's update.
        It is computed as ‖ψ' − ψ‖² (Parseval), which equals ‖|Ψ| − sqrt(I)‖² wherever |Ψ| ≥ ε.
        """
        state = self.state
        if state.n_positions == 0:
            raise ConfigError("run_epoch() before any add_patterns(): add at least one pattern first")
        update_probe = _started(self.options.probe.update_start_epoch, self._epochs_run)
        self.constraints.before_sweep(state.probe, state.object, update_probe)
        order = torch.randperm(state.n_positions, generator=self._generator)
        with torch_threads(self.num_threads):
            squared_error = self._epoch_function()(state, self.options, order, update_probe)
        self.constraints.after_sweep(state.probe, state.object, update_probe)
        if self.object_regulariser is not None:
            with torch.no_grad():
                state.object.copy_(self.object_regulariser(state.object))
        self.constraints.after_epoch(state.object)
        self._epochs_run += 1
        return squared_error / max(state.patterns.measured_energy, DIVISION_FLOOR)

    def _epoch_function(self) -> EpochFunction:
        """The epoch this solver's options and state call for: the general path for several probe modes,
        sub-pixel windows or position refinement (from its start epoch on), else the fast one."""
        positions = self.options.positions
        if _started(positions.correction_start_epoch, self._epochs_run):
            return position_correction_epoch
        modal = self.state.n_modes > 1 or positions.correction_start_epoch is not None
        if modal or self.state.has_subpixel_windows:
            return modes_epoch
        if self.options.execution.variant is EpieVariant.SEQUENTIAL:
            return sequential_epoch
        return batched_epoch

    def fourier_r_factor(self) -> float:
        """R = Σ_j Σ_q | |Ψ_j(q)| − sqrt(I_j(q)) | / Σ_j Σ_q sqrt(I_j(q)) for the current object and probe.

        The crystallographers' R-factor on amplitudes, |Ψ| summed over the probe modes in intensity; it
        needs one forward pass over every position and changes nothing.
        """
        if self.state.n_positions == 0:
            raise ConfigError("fourier_r_factor() before any add_patterns(): add at least one pattern first")
        with torch_threads(self.num_threads):
            return fourier_r_factor(self.state, self.options.execution.batch_size)


class EpochFunction(Protocol):
    """One sweep over every position of ``state`` in ``order``; returns the summed squared misfit."""

    def __call__(
        self, state: ScanState, options: EpieOptions, order: torch.Tensor, update_probe: bool
    ) -> float: ...


def _started(start_epoch: int | None, epochs_run: int) -> bool:
    return start_epoch is not None and epochs_run >= start_epoch

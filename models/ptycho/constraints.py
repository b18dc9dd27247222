"""Two constraints that keep ePIE's probe and object from trading scale at low dose.

The exit wave ψ = P·O does not change under P → cP, O → O/c, so the data cannot decide how the scale is
split between probe and object. With the probe updated at a low dose, photon noise walks that split: on
200 frames of 2,000 photons (a Siemens star under a 24-px zone plate, the PINE benchmark's scan) from a
blurred probe, the probe's power grew 10× every 10 epochs after the 20th while the object's amplitude in
the scanned field fell towards 0, and the Fourier error went 0.31 → 14 by epoch 60. Neither constraint
alone stops it: a fixed probe power makes the object carry the growth (outside the scanned field, where
nothing pulls it back, it blew up), and a bounded object amplitude still let the probe grow. Together they
hold (error 0.33 after 60 epochs, the probe at its start power).

- :func:`keep_probe_power_` puts the probe's total power Σ_k ‖P_k‖² back to a chosen value and moves the
  factor into the object, so that every exit wave, and so the Fourier error, stays as it was. The value is
  the direct beam's photons per frame when known (an empty-beam frame's total: then |O| is the sample's
  transmission), else the start probe's power. Frame totals cannot stand in for it when the scan never
  leaves the sample: on the benchmark's Siemens star the brightest frames hold 2,190 photons against the
  beam's 3,906.
- :func:`clip_object_amplitude_` bounds |O|: a transmission sample does not amplify the beam, so |O| ≤ 1
  where free space is 1 (the solver's blank canvas). The phase is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from phasestream.errors import ConfigError

if TYPE_CHECKING:
    from phasestream.models.ptycho.options import ConstraintOptions


class ScaleConstraints:
    """The constraints one solver applies around each epoch (see the module's text).

    ``fix_probe_power`` holds Σ_k ‖P_k‖² from the first epoch that updates the probe on, at
    ``probe_power_photons`` or, without it, at the power the probe has then; ``max_object_amplitude``
    bounds |O| after each epoch.
    """

    def __init__(self, options: ConstraintOptions) -> None:
        self.fix_probe_power = options.fix_probe_power
        self.max_object_amplitude = options.max_object_amplitude
        self._held_power = options.probe_power_photons
        self._holding = False

    def before_sweep(self, modes: torch.Tensor, obj: torch.Tensor, update_probe: bool) -> None:
        """At the first epoch that updates the probe: take its power, or put it at the given one. Later
        epochs start where :meth:`after_sweep` left the power, so there is nothing to do."""
        if self.fix_probe_power and update_probe and not self._holding:
            if self._held_power is None:
                self._held_power = total_power(modes)
            keep_probe_power_(modes, obj, self._held_power)
            self._holding = True

    def after_sweep(self, modes: torch.Tensor, obj: torch.Tensor, update_probe: bool) -> None:
        if self.fix_probe_power and update_probe:
            keep_probe_power_(modes, obj, self._held_power)

    def after_epoch(self, obj: torch.Tensor) -> None:
        if self.max_object_amplitude is not None:
            clip_object_amplitude_(obj, self.max_object_amplitude)


def total_power(modes: torch.Tensor) -> float:
    """Σ_k ‖P_k‖²: with the solver's unitary FFT, the photons one frame through free space would count."""
    return float((modes * modes.conj()).real.sum().item())


def keep_probe_power_(modes: torch.Tensor, obj: torch.Tensor, power: float) -> float:
    """In place: P_k ← c·P_k and O ← O/c with c² = power / Σ_k ‖P_k‖². Returns c."""
    current = total_power(modes)
    if not current > 0:
        raise ConfigError(
            f"the probe's power is {current!r}: the probe has gone to zero or NaN, so its power cannot be "
            "restored; start from a probe guess that illuminates the frames"
        )
    factor = (power / current) ** 0.5
    modes.mul_(factor)
    obj.div_(factor)
    return factor


def clip_object_amplitude_(obj: torch.Tensor, max_amplitude: float) -> None:
    """In place: O ← O · min(1, max_amplitude / |O|), which keeps the phase."""
    obj.mul_(max_amplitude / obj.abs().clamp_min(max_amplitude))

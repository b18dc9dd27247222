"""The probe-power and object-amplitude constraints, alone and in the low-dose scan they were made for."""

import numpy as np
import pytest
import torch
from phasestream_bench.pine import blurred_probe, low_dose_scan
from pydantic import ValidationError

from phasestream.errors import ConfigError
from phasestream.models.ptycho.constraints import clip_object_amplitude_, keep_probe_power_, total_power
from phasestream.models.ptycho.epie import EpieSolver
from phasestream.models.ptycho.options import ConstraintOptions, EpieOptions, EpieVariant


def random_complex(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64))


def test_restoring_the_probe_power_leaves_every_exit_wave_as_it_was():
    modes, obj = random_complex((2, 8, 8), seed=0), random_complex((8, 8), seed=1)
    exit_waves, start_power = modes * obj, total_power(modes)
    factor = keep_probe_power_(modes, obj, power=5.0)
    assert total_power(modes) == pytest.approx(5.0, rel=1e-5)
    np.testing.assert_allclose((modes * obj).numpy(), exit_waves.numpy(), rtol=1e-5, atol=1e-6)
    assert factor == pytest.approx((5.0 / start_power) ** 0.5, rel=1e-6)


def test_a_vanished_probe_is_an_error_that_says_so():
    with pytest.raises(ConfigError, match="gone to zero or NaN"):
        keep_probe_power_(torch.zeros((1, 4, 4), dtype=torch.complex64), torch.ones((4, 4)), power=1.0)


def test_clipping_bounds_the_amplitude_and_keeps_the_phase():
    obj = random_complex((16, 16), seed=2)
    before = obj.clone()
    clip_object_amplitude_(obj, 1.0)
    assert obj.abs().max() <= 1.0 + 1e-6
    inside = before.abs() <= 1.0
    np.testing.assert_array_equal(obj[inside].numpy(), before[inside].numpy())
    outside = ~inside
    np.testing.assert_allclose(obj[outside].abs().numpy(), 1.0, rtol=1e-6)
    phase_change = obj[outside] * before[outside].conj()
    np.testing.assert_allclose(torch.angle(phase_change).numpy(), 0.0, atol=1e-6)


def test_a_bound_that_is_not_positive_is_refused():
    with pytest.raises(ValidationError, match=r"max_object_amplitude\n.*greater than 0.*input_value=0"):
        ConstraintOptions(max_object_amplitude=0)


@pytest.mark.parametrize("fix, power", [(False, 100.0), (True, 0.0), (True, -5.0)])
def test_a_probe_power_without_fix_probe_power_or_not_positive_is_refused(fix, power):
    # Either the bound itself (the field, its input) or the missing fix_probe_power (its value named).
    refused = rf"probe_power_photons\n.*input_value={power!r}|probe_power_photons={power!r} .*fix_probe_power"
    with pytest.raises(ValidationError, match=refused):
        ConstraintOptions(fix_probe_power=fix, probe_power_photons=power)


def test_a_given_probe_power_replaces_the_start_probes_from_the_first_probe_update():
    scan = low_dose_scan(30, 2e3, seed=1)
    beam_photons = float(np.sum(np.abs(scan.probe_truth) ** 2))
    options = EpieOptions(
        probe={"update_start_epoch": 1},
        constraints={"fix_probe_power": True, "probe_power_photons": beam_photons},
        execution={"device": "cpu"},
    )
    solver = EpieSolver(options, probe=0.5 * scan.probe_truth, object_guess=np.ones_like(scan.object_truth))
    solver.add_patterns(scan.frames, scan.positions_object_px() - scan.config.detector_size_px // 2)
    solver.run_epoch()
    assert float(np.sum(np.abs(solver.probe) ** 2)) == pytest.approx(beam_photons / 4, rel=1e-5)
    for _ in range(3):
        solver.run_epoch()
    assert float(np.sum(np.abs(solver.probe) ** 2)) == pytest.approx(beam_photons, rel=1e-4)


@pytest.mark.slow
def test_low_dose_probe_retrieval_stays_put_with_both_constraints_and_runs_away_without():
    """The failure ptycho_constraints describes, at 2,000 photons per frame from a blurred probe."""
    scan = low_dose_scan(200, 2e3, seed=0)
    corners_px = scan.positions_object_px() - scan.config.detector_size_px // 2
    guess = blurred_probe(scan.probe_truth)
    runs = {}
    for constrained in (False, True):
        options = EpieOptions(
            probe={"update_start_epoch": 0},
            constraints={
                "fix_probe_power": constrained,
                "max_object_amplitude": 1.0 if constrained else None,
            },
            execution={"variant": EpieVariant.SEQUENTIAL, "device": "cpu", "seed": 0},
        )
        solver = EpieSolver(options, probe=guess, object_guess=np.ones_like(scan.object_truth))
        solver.add_patterns(scan.frames, corners_px)
        errors = [solver.run_epoch() for _ in range(40)]
        runs[constrained] = errors, total_power(torch.from_numpy(solver.probe_modes)), np.abs(solver.object)
    free_errors, free_power, _ = runs[False]
    held_errors, held_power, held_amplitude = runs[True]
    start_power = float(np.sum(np.abs(guess) ** 2))
    assert free_power > 100 * start_power and free_errors[-1] > 1.5 * free_errors[9]
    assert held_power == pytest.approx(start_power, rel=1e-4)
    assert held_amplitude.max() <= 1.0 + 1e-6
    assert held_errors[-1] <= 1.02 * held_errors[9] and held_errors[-1] < 0.6 * free_errors[-1]

"""ePIE: kernels against a NumPy reference, streaming behaviour, convergence on simulated and public data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from phasestream_bench.solvers import bench_epie, simulate_scan
from pydantic import ValidationError

from phasestream.errors import ConfigError, FrameValidationError, PositionError
from phasestream.models.physics import far_field
from phasestream.models.ptycho.epie import EpieSolver
from phasestream.models.ptycho.illumination import (
    max_summed_illumination_scatter,
    max_summed_illumination_slices,
)
from phasestream.models.ptycho.options import EpieOptions, EpieVariant, UpdateRule
from phasestream.models.quality import aligned_error

TIKE_DATASET = Path(__file__).parent / "data" / "ptycho_sim_tike_setup.npz"
SMALL_PROBLEM_THREADS = 1
"""32×32 windows gain nothing from a second thread, and a busy second core (other tests running beside
these) made the batched convergence test 25× slower with two."""

# --------------------------------------------------------------------------------------------------------
# Independent NumPy reference: ePIE written out as in the paper, complex128, no shortcuts, no torch.


def reference_far_field_step(exit_wave: np.ndarray, intensity: np.ndarray) -> tuple[np.ndarray, float]:
    """ψ' − ψ for the project's centred far field, and ‖|Ψ| − sqrt(I)‖²."""
    far = np.fft.fftshift(np.fft.fft2(exit_wave, norm="ortho"))
    corrected_far = np.sqrt(intensity) * np.exp(1j * np.angle(far))
    corrected = np.fft.ifft2(np.fft.ifftshift(corrected_far), norm="ortho")
    return corrected - exit_wave, float(np.sum((np.abs(far) - np.sqrt(intensity)) ** 2))


def reference_epie_step(obj, probe, corner, intensity, alpha, beta):
    """One ePIE position (Maiden & Rodenburg 2009): both updates from the old object and probe."""
    obj = obj.astype(np.complex128)
    probe = probe.astype(np.complex128)
    y, x = corner
    window = (slice(y, y + probe.shape[0]), slice(x, x + probe.shape[1]))
    patch = obj[window].copy()
    difference, squared_error = reference_far_field_step(probe * patch, intensity)
    obj[window] = patch + alpha * np.conj(probe) * difference / np.max(np.abs(probe) ** 2)
    new_probe = probe + beta * np.conj(patch) * difference / np.max(np.abs(patch) ** 2)
    return obj, new_probe, squared_error


def reference_batched_step(obj, probe, corners, intensities, alpha, beta):
    """All positions from the same object and probe; object updates summed and divided by the maximum of
    the summed illumination, probe update the mean of the per-position ePIE probe updates."""
    obj = obj.astype(np.complex128)
    probe = probe.astype(np.complex128)
    object_update = np.zeros_like(obj)
    illumination = np.zeros(obj.shape)
    probe_update = np.zeros_like(probe)
    squared_error = 0.0
    for (y, x), intensity in zip(corners, intensities, strict=True):
        window = (slice(y, y + probe.shape[0]), slice(x, x + probe.shape[1]))
        patch = obj[window]
        difference, position_error = reference_far_field_step(probe * patch, intensity)
        object_update[window] += np.conj(probe) * difference
        illumination[window] += np.abs(probe) ** 2
        probe_update += np.conj(patch) * difference / np.max(np.abs(patch) ** 2)
        squared_error += position_error
    return (
        obj + alpha * object_update / illumination.max(),
        probe + beta * probe_update / len(corners),
        squared_error,
    )


def rpie_denominator(field: np.ndarray, weight: float) -> np.ndarray:
    """rPIE (Maiden, Johnson & Li 2017): (1 − w)|F|² + w max|F|²."""
    intensity = np.abs(field) ** 2
    return (1 - weight) * intensity + weight * intensity.max()


def reference_rpie_step(obj, probe, corner, intensity, alpha, beta, object_step=1.0, probe_step=1.0):
    """One rPIE position: ePIE with the regularised denominators, both updates from the old state."""
    obj = obj.astype(np.complex128)
    probe = probe.astype(np.complex128)
    y, x = corner
    window = (slice(y, y + probe.shape[0]), slice(x, x + probe.shape[1]))
    patch = obj[window].copy()
    difference, squared_error = reference_far_field_step(probe * patch, intensity)
    obj[window] = patch + object_step * np.conj(probe) * difference / rpie_denominator(probe, alpha)
    new_probe = probe + probe_step * np.conj(patch) * difference / rpie_denominator(patch, beta)
    return obj, new_probe, squared_error


def reference_batched_rpie_step(obj, probe, corners, intensities, alpha, beta):
    """Batched rPIE: summed object updates over (1 − α) Σ|P|² + α max Σ|P|², mean of the per-position
    rPIE probe updates."""
    obj = obj.astype(np.complex128)
    probe = probe.astype(np.complex128)
    object_update = np.zeros_like(obj)
    illumination = np.zeros(obj.shape)
    probe_update = np.zeros_like(probe)
    for (y, x), intensity in zip(corners, intensities, strict=True):
        window = (slice(y, y + probe.shape[0]), slice(x, x + probe.shape[1]))
        patch = obj[window]
        difference, _ = reference_far_field_step(probe * patch, intensity)
        object_update[window] += np.conj(probe) * difference
        illumination[window] += np.abs(probe) ** 2
        probe_update += np.conj(patch) * difference / rpie_denominator(patch, beta)
    denominator = (1 - alpha) * illumination + alpha * illumination.max()
    return obj + object_update / denominator, probe + probe_update / len(corners)


# --------------------------------------------------------------------------------------------------------


def random_problem(n_positions: int, seed: int = 0, window_px: int = 16, canvas_px: int = 40):
    """Random object, probe, corners and intensities that do *not* match: large, generic updates."""
    rng = np.random.default_rng(seed)
    obj = rng.uniform(0.5, 1, (canvas_px, canvas_px)) * np.exp(
        1j * rng.uniform(-1, 1, (canvas_px, canvas_px))
    )
    probe = rng.standard_normal((window_px, window_px)) + 1j * rng.standard_normal((window_px, window_px))
    corners = rng.integers(0, canvas_px - window_px + 1, (n_positions, 2))
    intensities = rng.uniform(0, 50, (n_positions, window_px, window_px)).astype(np.float32)
    return obj.astype(np.complex64), probe.astype(np.complex64), corners, intensities


def solver_for(obj, probe, corners, intensities, /, **changes) -> EpieSolver:
    """A solver on the problem, the probe updated from the first epoch; ``changes`` as EpieOptions.replace."""
    options = EpieOptions(probe={"update_start_epoch": 0}).replace(**changes)
    solver = EpieSolver(options, probe=probe, object_guess=obj)
    solver.add_patterns(intensities, corners)
    return solver


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_sequential_step_matches_the_numpy_reference() -> None:
    obj, probe, corners, intensities = random_problem(1)
    solver = solver_for(
        obj, probe, corners, intensities, execution={"variant": EpieVariant.SEQUENTIAL},
        object={"step": 0.7}, probe={"step": 0.5},
    )  # fmt: skip
    error = solver.run_epoch()
    expected_obj, expected_probe, squared_error = reference_epie_step(
        obj, probe, corners[0], intensities[0], 0.7, 0.5
    )
    assert relative_difference(solver.object, expected_obj) < 1e-5
    assert relative_difference(solver.probe, expected_probe) < 1e-5
    assert error == pytest.approx(squared_error / intensities.sum(), rel=1e-5)


def test_sequential_epoch_matches_the_reference_in_the_seeded_order() -> None:
    obj, probe, corners, intensities = random_problem(6, seed=1)
    solver = solver_for(
        obj, probe, corners, intensities, execution={"variant": EpieVariant.SEQUENTIAL, "seed": 7},
        object={"step": 0.9},
    )  # fmt: skip
    error = solver.run_epoch()
    # The documented order: torch.randperm from a generator seeded with ``seed``.
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7)).tolist()
    expected_obj, expected_probe, squared_error = obj, probe, 0.0
    for index in order:
        expected_obj, expected_probe, position_error = reference_epie_step(
            expected_obj, expected_probe, corners[index], intensities[index], 0.9, 1.0
        )
        squared_error += position_error
    assert relative_difference(solver.object, expected_obj) < 1e-5
    assert relative_difference(solver.probe, expected_probe) < 1e-5
    assert error == pytest.approx(squared_error / intensities.sum(), rel=1e-5)


def test_batched_step_matches_the_numpy_reference() -> None:
    # One batch holding every position: the sums do not depend on the order.
    obj, probe, corners, intensities = random_problem(5, seed=2)
    solver = solver_for(
        obj, probe, corners, intensities, execution={"variant": EpieVariant.BATCHED, "batch_size": 8},
        object={"step": 0.8}, probe={"step": 0.6},
    )  # fmt: skip
    error = solver.run_epoch()
    expected_obj, expected_probe, squared_error = reference_batched_step(
        obj, probe, corners, intensities, 0.8, 0.6
    )
    assert relative_difference(solver.object, expected_obj) < 1e-5
    assert relative_difference(solver.probe, expected_probe) < 1e-5
    assert error == pytest.approx(squared_error / intensities.sum(), rel=1e-5)


@pytest.mark.parametrize("update_rule", list(UpdateRule))
def test_batched_with_batch_size_one_equals_sequential(update_rule: UpdateRule) -> None:
    scan = simulate_scan(n_positions=30, size_px=32, seed=3)
    results = []
    for variant in (EpieVariant.SEQUENTIAL, EpieVariant.BATCHED):
        # rpie_beta 0.5 so that rPIE's probe denominator differs from ePIE's (it is ignored by ePIE).
        options = EpieOptions(
            update_rule=update_rule, probe={"update_start_epoch": 1, "rpie_beta": 0.5},
            execution={"variant": variant, "batch_size": 1, "seed": 5},
        )  # fmt: skip
        solver = EpieSolver(options)
        solver.add_patterns(scan.intensities, scan.top_left_px)
        errors = [solver.run_epoch() for _ in range(3)]
        results.append((solver.object, solver.probe, errors))
    (sequential_obj, sequential_probe, sequential_errors), (batched_obj, batched_probe, batched_errors) = (
        results
    )
    assert relative_difference(batched_obj, sequential_obj) < 1e-5
    assert relative_difference(batched_probe, sequential_probe) < 1e-5
    np.testing.assert_allclose(batched_errors, sequential_errors, rtol=1e-5)


@pytest.mark.parametrize("variant", list(EpieVariant))
def test_rpie_step_matches_the_numpy_reference(variant) -> None:
    # β = 0.3 rather than the default 1 so the probe update's regularised denominator is exercised too.
    obj, probe, corners, intensities = random_problem(1, seed=12)
    solver = solver_for(
        obj, probe, corners, intensities, execution={"variant": variant}, update_rule=UpdateRule.RPIE,
        object={"rpie_alpha": 0.1, "step": 0.8}, probe={"rpie_beta": 0.3, "step": 0.6},
    )  # fmt: skip
    error = solver.run_epoch()
    expected_obj, expected_probe, squared_error = reference_rpie_step(
        obj, probe, corners[0], intensities[0], 0.1, 0.3, object_step=0.8, probe_step=0.6
    )
    assert relative_difference(solver.object, expected_obj) < 1e-5
    assert relative_difference(solver.probe, expected_probe) < 1e-5
    assert error == pytest.approx(squared_error / intensities.sum(), rel=1e-5)
    # The regularised step differs from ePIE's by far more than the tolerance.
    epie_obj, _, _ = reference_epie_step(obj, probe, corners[0], intensities[0], 0.8, 0.6)
    assert relative_difference(epie_obj, expected_obj) > 1e-2


def test_batched_rpie_step_matches_the_numpy_reference() -> None:
    obj, probe, corners, intensities = random_problem(5, seed=13)
    solver = solver_for(
        obj, probe, corners, intensities, execution={"variant": EpieVariant.BATCHED, "batch_size": 8},
        update_rule=UpdateRule.RPIE, object={"rpie_alpha": 0.2}, probe={"rpie_beta": 0.5},
    )  # fmt: skip
    solver.run_epoch()
    expected_obj, expected_probe = reference_batched_rpie_step(obj, probe, corners, intensities, 0.2, 0.5)
    assert relative_difference(solver.object, expected_obj) < 1e-5
    assert relative_difference(solver.probe, expected_probe) < 1e-5


def test_rpie_with_weights_one_is_epie() -> None:
    obj, probe, corners, intensities = random_problem(4, seed=14)
    for variant in EpieVariant:
        execution = {"variant": variant, "batch_size": 2}
        epie = solver_for(obj, probe, corners, intensities, execution=execution)
        rpie = solver_for(
            obj, probe, corners, intensities, execution=execution,
            update_rule=UpdateRule.RPIE, object={"rpie_alpha": 1.0}, probe={"rpie_beta": 1.0},
        )  # fmt: skip
        assert rpie.run_epoch() == pytest.approx(epie.run_epoch(), rel=1e-6)
        assert relative_difference(rpie.object, epie.object) < 1e-6
        assert relative_difference(rpie.probe, epie.probe) < 1e-6


def test_summed_illumination_maximum_is_the_same_by_scatter_and_by_slices() -> None:
    rng = np.random.default_rng(4)
    probe_intensity = torch.from_numpy(rng.uniform(0, 1, (8, 8)).astype(np.float32))
    corners = rng.integers(0, 12, (5, 2))
    canvas_shape = (20, 22)
    flat_index = torch.from_numpy(
        (corners[:, 0, None, None] + np.arange(8)[None, :, None]) * canvas_shape[1]
        + corners[:, 1, None, None]
        + np.arange(8)[None, None, :]
    ).reshape(-1)
    expected = np.zeros(canvas_shape)
    for y, x in corners:
        expected[y : y + 8, x : x + 8] += probe_intensity.numpy()
    by_scatter = max_summed_illumination_scatter(probe_intensity, flat_index, torch.empty(canvas_shape))
    by_slices = max_summed_illumination_slices(probe_intensity, corners.tolist(), torch.empty(canvas_shape))
    assert float(by_scatter) == pytest.approx(expected.max(), rel=1e-6)
    assert float(by_slices) == pytest.approx(expected.max(), rel=1e-6)


def test_a_fixed_probe_stays_fixed() -> None:
    obj, probe, corners, intensities = random_problem(4, seed=11)
    solver = EpieSolver(EpieOptions(probe={"update_start_epoch": None}), probe=probe, object_guess=obj)
    solver.add_patterns(intensities, corners)
    solver.run_epoch()
    np.testing.assert_array_equal(solver.probe, probe)
    assert not np.array_equal(solver.object, obj)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", list(EpieVariant))
@pytest.mark.parametrize("update_rule", list(UpdateRule))
def test_cuda_epoch_matches_the_cpu_epoch(variant, update_rule) -> None:
    # On CUDA the batched illumination (maximum, and rPIE's map) comes from index_add_, not slice adds.
    obj, probe, corners, intensities = random_problem(6, seed=10)
    results = {}
    for device in ("cpu", "cuda"):
        solver = solver_for(
            obj, probe, corners, intensities,
            execution={"variant": variant, "batch_size": 4, "device": device},
            update_rule=update_rule, probe={"rpie_beta": 0.5},
        )  # fmt: skip
        results[device] = (solver.run_epoch(), solver.object, solver.probe)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4)
    assert relative_difference(results["cuda"][1], results["cpu"][1]) < 1e-4
    assert relative_difference(results["cuda"][2], results["cpu"][2]) < 1e-4


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.float32, np.float64])
def test_pattern_dtypes_give_the_same_epoch_and_the_input_is_left_alone(dtype) -> None:
    obj, probe, corners, intensities = random_problem(3, seed=5)
    counts = np.rint(intensities).astype(dtype)
    untouched = counts.copy()
    reference = solver_for(obj, probe, corners, np.rint(intensities).astype(np.float32)).run_epoch()
    assert solver_for(obj, probe, corners, counts).run_epoch() == pytest.approx(reference, rel=1e-6)
    np.testing.assert_array_equal(counts, untouched)


def test_patterns_added_in_pieces_equal_patterns_added_at_once() -> None:
    scan = simulate_scan(n_positions=20, size_px=32, seed=6)
    sequential = EpieOptions(execution={"variant": EpieVariant.SEQUENTIAL})
    at_once = EpieSolver(sequential, probe=scan.probe)
    at_once.add_patterns(scan.intensities, scan.top_left_px)
    in_pieces = EpieSolver(sequential, probe=scan.probe)
    for piece in (slice(0, 1), slice(1, 4), slice(4, 11), slice(11, 20)):  # grows the buffer several times
        in_pieces.add_patterns(scan.intensities[piece], scan.top_left_px[piece])
    assert in_pieces.n_positions == 20
    assert in_pieces.run_epoch() == pytest.approx(at_once.run_epoch(), rel=1e-6)
    np.testing.assert_allclose(in_pieces.object, at_once.object, atol=1e-6)


@pytest.mark.parametrize("variant", list(EpieVariant))
def test_canvas_grows_with_ones_when_a_new_window_falls_outside(variant) -> None:
    scan = simulate_scan(n_positions=12, size_px=32, seed=7)
    solver = EpieSolver(EpieOptions(execution={"variant": variant, "batch_size": 4}), probe=scan.probe)
    solver.add_patterns(scan.intensities[:10], scan.top_left_px[:10])
    solver.run_epoch()
    before = solver.object
    # One window 5 px above the canvas, one reaching 9 px past its right edge.
    corners_outside = np.array([[-5, 3], [0, before.shape[1] - 32 + 9]])
    solver.add_patterns(scan.intensities[10:], corners_outside)
    grown = solver.object
    assert solver.canvas_origin_px == (5, 0)
    assert grown.shape == (before.shape[0] + 5, before.shape[1] + 9)
    np.testing.assert_array_equal(grown[5:, : before.shape[1]], before)
    np.testing.assert_array_equal(grown[:5], 1)
    assert np.isfinite(solver.run_epoch())
    assert solver.n_positions == 12 and solver.epochs_run == 2


def test_invalid_input_is_refused_with_the_value_and_the_fix() -> None:
    obj, probe, corners, intensities = random_problem(2, seed=8)
    solver = EpieSolver(probe=probe)
    with pytest.raises(ConfigError, match="add_patterns"):
        solver.run_epoch()
    with pytest.raises(FrameValidationError, match="negative counts"):
        solver.add_patterns(-intensities, corners)
    with pytest.raises(FrameValidationError, match="NaN"):
        solver.add_patterns(np.full_like(intensities, np.nan), corners)
    with pytest.raises(FrameValidationError, match="bin or crop"):
        solver.add_patterns(np.ones((2, 8, 8), np.float32), corners)
    with pytest.raises(FrameValidationError, match=r"\(n, ny, nx\)"):
        solver.add_patterns(intensities[0], corners)
    with pytest.raises(PositionError, match="non-finite"):
        solver.add_patterns(intensities, np.where(corners == corners[0, 0], np.nan, corners))
    with pytest.raises(PositionError, match=r"\(2, 2\)"):
        solver.add_patterns(intensities, corners[:1])
    assert solver.n_positions == 0
    # Every bound is the options' own: checked when the options are built, before any solver exists.
    with pytest.raises(ValidationError, match=r"execution\.batch_size\n.*greater than or equal to 1"):
        EpieOptions(execution={"batch_size": 0})
    with pytest.raises(ValidationError, match=r"object\.step\n.*greater than 0"):
        EpieOptions(object={"step": 0.0})
    with pytest.raises(ValidationError, match=r"object\.rpie_alpha\n.*greater than 0"):
        EpieOptions(update_rule=UpdateRule.RPIE, object={"rpie_alpha": 0.0})
    with pytest.raises(ValidationError, match=r"probe\.modes\n.*greater than or equal to 1"):
        EpieOptions(probe={"modes": 0})
    with pytest.raises(ConfigError, match=r"probe has shape \(3, 4, 4\) for probe\.modes=2"):
        EpieSolver(EpieOptions(probe={"modes": 2}), probe=np.ones((3, 4, 4), np.complex64))
    with pytest.raises(ValidationError, match=r"positions\.max_step_px\n.*greater than 0"):
        EpieOptions(positions={"max_step_px": 0.0})
    with pytest.raises(ValidationError, match=r"probe\.rpie_beta\n.*less than or equal to 1"):
        EpieOptions(update_rule=UpdateRule.RPIE, probe={"rpie_beta": 1.5})
    with pytest.raises(ConfigError, match="leave canvas_shape_px out"):
        EpieSolver(object_guess=obj, canvas_shape_px=(3, 3))


# ----------------------------------------------------------------------------------------- convergence


def converge(
    scan, variant: EpieVariant, epochs: int, batch_size: int = 1, update_rule: UpdateRule = UpdateRule.EPIE
) -> tuple[EpieSolver, list[float]]:
    """ePIE from a blank object and the probe guessed from the patterns, probe retrieval from epoch 3."""
    options = EpieOptions(
        update_rule=update_rule,
        probe={"update_start_epoch": 3},
        execution={"variant": variant, "batch_size": batch_size, "num_threads": SMALL_PROBLEM_THREADS},
    )
    solver = EpieSolver(options, canvas_shape_px=scan.object.shape)
    solver.add_patterns(scan.intensities, scan.top_left_px)
    return solver, [solver.run_epoch() for _ in range(epochs)]


def well_illuminated(solver: EpieSolver) -> np.ndarray:
    illumination = solver.illumination()
    return illumination > 0.3 * illumination.max()


def object_error(solver: EpieSolver, truth: np.ndarray) -> float:
    # Blind ptychography fixes the object only up to a complex scale, a translation and a linear phase
    # ramp (each shared with the probe); aligned_error removes exactly those.
    return aligned_error(
        solver.object, truth, well_illuminated(solver), fit_amplitude=True, remove_phase_ramp=True
    )


@pytest.mark.slow
def test_sequential_epie_recovers_a_simulated_object_and_probe() -> None:
    scan = simulate_scan(n_positions=100, size_px=32, overlap=0.7, seed=1)
    solver, errors = converge(scan, EpieVariant.SEQUENTIAL, epochs=100)
    # Noise-free data: the true object is an exact solution, so the Fourier error has no floor. Here it
    # falls from 3e-2 to 4e-7 in 100 epochs on an Intel CPU and to 3e-6 on an AMD EPYC, whose FFT rounds
    # differently; it decreases steadily once the probe has settled. A stalled solver stays near 1e-2.
    assert errors[-1] < 1e-3 * errors[0]
    assert errors[-1] < errors[74] < errors[49] < errors[24]
    # The object error, about 7e-4 after 100 epochs on this scan (0.16 after 20, 1e-5 after 200), shows
    # convergence to the truth and not to another fixed point; 5e-3 leaves room for rounding
    # differences between machines and still fails a solver that stalls or converges slowly.
    assert object_error(solver, scan.object) < 5e-3


@pytest.mark.slow
def test_batched_epie_recovers_a_simulated_object_and_probe() -> None:
    scan = simulate_scan(n_positions=100, size_px=32, overlap=0.7, seed=1)
    solver, errors = converge(scan, EpieVariant.BATCHED, epochs=150, batch_size=4)
    # Mini-batches converge more slowly per epoch than sequential ePIE (one probe step per batch, and
    # overlapping windows in a batch share one object step): about 6e-3 after 150 epochs here.
    assert errors[-1] < 1e-2 * errors[0]
    assert object_error(solver, scan.object) < 2e-2


@pytest.mark.slow
def test_rpie_reaches_the_object_faster_than_epie_on_a_simulated_scan() -> None:
    scan = simulate_scan(n_positions=100, size_px=32, overlap=0.7, seed=1)
    rpie, rpie_errors = converge(scan, EpieVariant.SEQUENTIAL, epochs=20, update_rule=UpdateRule.RPIE)
    epie, _ = converge(scan, EpieVariant.SEQUENTIAL, epochs=20)
    # Measured after 20 epochs (α = 0.1, β = 1), over solver seeds 0, 1, 2: rPIE's object error is
    # 2.6e-2 to 3.3e-2, ePIE's 0.15 to 0.16, about 5× larger (0.13 against 0.24 already after 10). 0.06
    # is about twice rPIE's worst and the ratio is asserted at 2, well inside the measured 5.
    # On this noise-free scan rPIE with α = 0.1 then levels off near 1.3e-2 (Fourier error 2e-4) while
    # ePIE continues down to 7e-4 by epoch 100: rPIE is the faster start, not the better end point here.
    assert rpie_errors[-1] < 0.1 * rpie_errors[0]
    rpie_object_error = object_error(rpie, scan.object)
    assert rpie_object_error < 0.06
    assert object_error(epie, scan.object) > 2 * rpie_object_error


def test_simulated_scan_is_self_consistent_with_the_requested_overlap() -> None:
    scan = simulate_scan(n_positions=40, size_px=32, overlap=0.7, seed=9)
    windows = np.stack([scan.object[y : y + 32, x : x + 32] for y, x in scan.top_left_px])
    expected = (far_field(torch.from_numpy(windows * scan.probe)).abs() ** 2).numpy()
    np.testing.assert_allclose(scan.intensities, expected, rtol=1e-5, atol=1e-6 * expected.max())
    # Probe diameter 16 px, 70 % overlap: neighbours about 16 · 0.3 = 4.8 px apart.
    distances = np.linalg.norm(scan.top_left_px[:, None] - scan.top_left_px[None], axis=-1).astype(float)
    np.fill_diagonal(distances, np.inf)
    assert 3.5 < np.median(distances.min(axis=1)) < 6.0


def test_bench_epie_reports_per_epoch_times_and_their_median() -> None:
    # A smoke test of the report only; speed is measured by ``phasestream bench``, never asserted.
    result = bench_epie(
        n_positions=8, size_px=16, batched=True, epochs=3, batch_size=4, device="cpu", progress=False
    )
    assert len(result["seconds_per_epoch"]) == 3
    assert result["median_s_per_epoch"] == sorted(result["seconds_per_epoch"])[1]
    assert result["variant"] == "batched" and result["device"] == "cpu" and np.isfinite(result["final_error"])


# ------------------------------------------------------------------------------------------------ tike


@pytest.fixture(scope="module")
def tike_scan() -> dict[str, np.ndarray]:
    if not TIKE_DATASET.exists():
        pytest.skip(f"{TIKE_DATASET} is not on this machine")
    with np.load(TIKE_DATASET) as stored:
        return {name: stored[name] for name in stored.files}


def tike_forward(obj, probe_modes, corners, *, embed: str, centred: bool) -> np.ndarray:
    """Σ over incoherent modes of |FFT(ortho)(window)|², with the 16×16 exit wave brought to 32×32."""
    size_px = probe_modes.shape[-1]
    patterns = []
    for y, x in corners:
        pattern = 0
        for mode in probe_modes:
            exit_wave = mode * obj[y : y + size_px, x : x + size_px]
            if embed == "pad":
                exit_wave = np.pad(exit_wave, size_px // 2)
            else:  # 2× nearest-neighbour upsampling
                exit_wave = np.kron(exit_wave, np.ones((2, 2)))
            far = np.fft.fft2(exit_wave, norm="ortho")
            pattern = pattern + np.abs(np.fft.fftshift(far) if centred else far) ** 2
        patterns.append(pattern)
    return np.array(patterns)


def test_tike_convention_zero_padded_uncentred_orthonormal_sum_over_modes(tike_scan) -> None:
    data = tike_scan["data"]
    obj = tike_scan["object"][0]
    modes = tike_scan["probe"][0, 0]
    corners = tike_scan["scan_px"].astype(np.int64)
    assert np.array_equal(corners, tike_scan["scan_px"])  # whole-pixel corners: no sub-pixel shifts

    def residual(model: np.ndarray) -> float:
        return relative_difference(model, data)

    # The 16×16 exit wave zero-padded to 32×32 (where in the window does not change |FFT|), orthonormal
    # FFT with the zero frequency at pixel (0, 0), intensities of the two modes added: 2e-7, float32 noise.
    assert residual(tike_forward(obj, modes, corners, embed="pad", centred=False)) < 1e-5
    # That is the project's centred far field up to one fftshift of each pattern.
    padded_windows = np.stack([np.pad(mode, 8) for mode in modes])[:, None] * np.stack(
        [np.pad(obj, 8, constant_values=1)[y : y + 32, x : x + 32] for y, x in corners]
    )
    ours = (far_field(torch.from_numpy(padded_windows)).abs() ** 2).sum(dim=0).numpy()
    assert relative_difference(ours, np.fft.fftshift(data, axes=(-2, -1))) < 1e-5
    # Every other choice misses by far: centred patterns, upsampling instead of padding (even with the best
    # scale), one mode only, the unnormalised FFT.
    assert residual(tike_forward(obj, modes, corners, embed="pad", centred=True)) > 0.5
    upsampled = tike_forward(obj, modes, corners, embed="upsample", centred=False)
    best_scale = np.sum(upsampled * data) / np.sum(upsampled**2)
    assert residual(best_scale * upsampled) > 0.5
    assert residual(tike_forward(obj, modes[:1], corners, embed="pad", centred=False)) > 0.1
    assert residual(32**2 * tike_forward(obj, modes, corners, embed="pad", centred=False)) > 0.5


@pytest.mark.slow
def test_single_mode_epie_on_the_tike_scan(tike_scan) -> None:
    data = np.fft.fftshift(tike_scan["data"], axes=(-2, -1))  # tike's patterns are uncentred
    truth = tike_scan["object"][0]
    first_mode = np.pad(tike_scan["probe"][0, 0, 0], 8)  # the probe guess a beamline would bring
    options = EpieOptions(
        probe={"update_start_epoch": 3},
        execution={"variant": EpieVariant.SEQUENTIAL, "num_threads": SMALL_PROBLEM_THREADS},
    )
    solver = EpieSolver(options, probe=first_mode)
    # Windows are 32 px with the 16 px probe in the middle: corners move 8 px up and left, off the object.
    solver.add_patterns(data, tike_scan["scan_px"].astype(np.int64) - 8)
    errors = [solver.run_epoch() for _ in range(30)]
    # One coherent mode cannot hold the 20 % of the power in the second, incoherent mode: even the true
    # object with the first mode scaled to the total power leaves a Fourier error of 2.1e-2. ePIE fits
    # the data at least that well (1.1e-2 after 30 epochs, from 0.44).
    assert errors[-1] < 2.1e-2 < errors[0]
    origin_y, origin_x = solver.canvas_origin_px
    estimate = solver.object[origin_y : origin_y + 128, origin_x : origin_x + 128]
    illumination = solver.illumination()[origin_y : origin_y + 128, origin_x : origin_x + 128]
    mask = illumination > 0.3 * illumination.max()
    # The same model error keeps the object from the truth: 0.31 here, against 0.66 for a blank object.
    # 0.4 is a regression bound, not a claim of accuracy.
    blank_error = aligned_error(np.ones_like(estimate), truth, mask, fit_amplitude=True)
    assert blank_error > 0.6
    assert aligned_error(estimate, truth, mask, fit_amplitude=True, remove_phase_ramp=True) < 0.4


# ---------------------------------------------------------------------------------------------- refine


@pytest.mark.parametrize(("algorithm", "rule"), [("epie", UpdateRule.EPIE), ("rpie", UpdateRule.RPIE)])
def test_refine_builds_the_solver_with_the_configured_update_rule(algorithm, rule) -> None:
    from phasestream.stages.refine.stage import RefineConfig, RefineStage

    stage = RefineStage.__new__(RefineStage)  # only the solver factory: no placement or pipeline needed
    stage.config = RefineConfig(algorithm=algorithm, object={"rpie_alpha": 0.25})
    solver = stage._new_solver(None, (40, 40))
    assert solver.options.update_rule is rule and solver.options.object.rpie_alpha == 0.25
    for bad_alpha in (0.0, 1.5):
        with pytest.raises(ValidationError, match=r"object\.rpie_alpha"):
            RefineConfig(algorithm=algorithm, object={"rpie_alpha": bad_alpha})

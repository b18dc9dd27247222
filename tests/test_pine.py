"""PINE: ePIE sweeps, then O ← (1 − ρ) O + ρ D(O) with D on the real and imaginary parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phasestream_bench.pine import ConvergenceTrace
from phasestream_bench.solvers import simulate_scan
from pydantic import ValidationError
from torch import nn

from phasestream.models.nets.dncnn import COMPLEX_MARGIN, TRAINING_RANGE, load_denoiser
from phasestream.models.ptycho.epie import EpieSolver
from phasestream.models.ptycho.options import EpieOptions, EpieVariant, PineOptions, UpdateRule
from phasestream.models.ptycho.pine import RANGE_QUANTILE, PineRegulariser, pine_solver, robust_value_range


class MeanFilter(nn.Module):
    """A linear, nonexpansive stand-in for D whose action NumPy can reproduce exactly: a 3×3 box mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def np_box_mean(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, 1)
    return (
        sum(padded[dy : dy + image.shape[0], dx : dx + image.shape[1]] for dy in range(3) for dx in range(3))
        / 9
    )


def np_pine_regularise(obj: np.ndarray, rho: float) -> np.ndarray:
    """(1 − ρ) O + ρ D(O), with D's affine map onto the training range written out independently: from the
    RANGE_QUANTILE-th smallest and largest of all real and imaginary values (order statistics)."""
    parts = np.sort(np.concatenate([obj.real.ravel(), obj.imag.ravel()]))
    rank = round(RANGE_QUANTILE * len(parts))
    low, high = parts[rank - 1], parts[len(parts) - rank]
    train_low, train_high = TRAINING_RANGE
    margin = COMPLEX_MARGIN * (train_high - train_low)
    scale = (high - low) / (train_high - train_low - 2 * margin)
    offset = low - (train_low + margin) * scale
    denoised = [np_box_mean((part - offset) / scale) * scale + offset for part in (obj.real, obj.imag)]
    return (1 - rho) * obj + rho * (denoised[0] + 1j * denoised[1])


def test_one_pine_epoch_is_an_epie_epoch_then_the_regularisation_step() -> None:
    scan = simulate_scan(n_positions=12, size_px=16, seed=5)
    options = EpieOptions(execution={"variant": EpieVariant.SEQUENTIAL, "seed": 3, "num_threads": 1})
    epie = EpieSolver(options, probe=scan.probe)
    pine = pine_solver(options, PineOptions(rho=0.49), MeanFilter(), probe=scan.probe)
    for solver in (epie, pine):
        solver.add_patterns(scan.intensities, scan.top_left_px)
    epie_error, pine_error = epie.run_epoch(), pine.run_epoch()
    # The same sweep (same order, same data) gives the same Fourier error, measured before D acts...
    assert pine_error == pytest.approx(epie_error, rel=1e-6)
    # ...and the object is the ePIE result pulled towards D of it.
    np.testing.assert_allclose(
        pine.object, np_pine_regularise(epie.object.astype(np.complex128), 0.49), atol=2e-5
    )


def test_rho_outside_the_unit_interval_is_refused() -> None:
    for rho in (0.0, 1.0, 1.5):
        with pytest.raises(ValidationError, match=rf"rho\n.*input_value={rho!r}"):
            PineOptions(rho=rho)


def test_the_shipped_denoiser_keeps_a_flat_object_and_smooths_noise() -> None:
    solver = pine_solver(EpieOptions(execution={"device": "cpu"}), PineOptions(rho=0.49))
    rng = np.random.default_rng(0)
    flat = torch.full((48, 48), 0.8 + 0.3j, dtype=torch.complex64)
    noisy = flat + torch.from_numpy(
        (rng.normal(0, 0.05, (48, 48)) + 1j * rng.normal(0, 0.05, (48, 48))).astype(np.complex64)
    )
    regularised = solver.object_regulariser(noisy)
    # Pulled towards the flat truth, by about ρ of the way when D removes the noise.
    before = torch.linalg.norm(noisy - flat)
    after = torch.linalg.norm(regularised - flat)
    assert after < 0.8 * before


@pytest.mark.parametrize("fourier_constraint", ["projection", "poisson"])
@pytest.mark.slow
def test_bench_pine_traces_every_solver_and_draws_the_figure(tmp_path, fourier_constraint) -> None:
    from phasestream_bench.pine import bench_pine

    figure = tmp_path / "frc.png"
    traces = bench_pine(
        n_positions=30, long_iterations=4, pine_iterations=2, every=2, denoiser=MeanFilter(), figure=figure,
        fourier_constraint=fourier_constraint, progress=False,
    )  # fmt: skip
    assert [t.iterations for t in traces.values()] == [[2, 4], [2, 4], [2]]
    for trace in traces.values():
        assert all(r > 0 for r in trace.resolution_px) and all(-1 <= m <= 1 for m in trace.mean_frc)
        assert all(0 < e < 2 for e in trace.nrmse)
    assert figure.stat().st_size > 10_000


def test_the_reconstructed_probe_start_updates_a_blurred_probe_at_its_power() -> None:
    from phasestream_bench.pine import low_dose_scan, reconstructed_probe_start

    scan = low_dose_scan(30, 2e3, seed=0)
    start = reconstructed_probe_start(scan, seed=0)
    guess = start.probe
    power = np.sum(np.abs(scan.probe_truth) ** 2)
    assert np.sum(np.abs(guess) ** 2) == pytest.approx(power, rel=1e-5)
    assert np.linalg.norm(guess - scan.probe_truth) > 0.1 * np.sqrt(power)
    solver = start.solver()
    solver.add_patterns(scan.frames, scan.positions_object_px() - scan.config.detector_size_px // 2)
    for _ in range(4):
        solver.run_epoch()
    assert not np.allclose(solver.probe, guess)
    assert np.sum(np.abs(solver.probe) ** 2) == pytest.approx(power, rel=1e-4)
    assert np.abs(solver.object).max() <= 1 + 1e-6


def test_bench_pine_seeds_tabulates_every_solver_at_every_checkpoint(tmp_path) -> None:
    from phasestream_bench.pine import bench_pine_seeds, format_table, rpie_alpha_study

    study = rpie_alpha_study((0.5, 1.0), n_positions=20, iterations=2, every=1, progress=False)
    figure = tmp_path / "frc.png"
    rows, runs = bench_pine_seeds(
        (0, 1), checkpoints=(1, 2), figure=figure, rpie_study=study, n_positions=20, long_iterations=2,
        pine_iterations=2, every=1, denoiser=MeanFilter(), progress=False,
    )  # fmt: skip
    assert [(row.solver, row.iteration, row.n_seeds) for row in rows] == [
        (name, iteration, 2) for name in ("ePIE", "rPIE", "PINE") for iteration in (1, 2)
    ]
    epie_at_2 = [run["ePIE"].at(2)[1] for run in runs]
    assert rows[1].mean_frc[0] == pytest.approx(np.mean(epie_at_2))
    assert format_table(rows).count("\n") == len(rows) + 1
    assert figure.stat().st_size > 10_000


def test_the_value_range_ignores_the_noisy_edge_of_the_scan() -> None:
    """At low dose ePIE fits noise where only the probe's tails reach; those few pixels set the extremes of
    the object (they grew from 1.6 to 8 wide over 300 sweeps of the benchmark). 20 such pixels out of 4,096
    must change neither the range D's map is built from nor how much the regulariser removes inside."""
    rng = np.random.default_rng(1)
    yy, xx = np.indices((64, 64))
    checkerboard = np.where((yy // 8 + xx // 8) % 2 == 0, 0.9 + 0.2j, 0.4 + 0.6j)
    truth = torch.from_numpy(checkerboard.astype(np.complex64))
    noise = rng.normal(0, 0.1, (2, 64, 64)).astype(np.float32)
    noisy = truth + torch.complex(*torch.from_numpy(noise))
    edge = noisy.clone()
    wild = rng.choice(64 * 64, 20, replace=False)
    edge.view(-1)[wild] += torch.from_numpy((3 * rng.standard_normal(20) * (1 + 1j)).astype(np.complex64))
    inside = torch.ones(64 * 64, dtype=torch.bool)
    inside[wild] = False
    inside = inside.view(64, 64)
    low, high = robust_value_range(edge)
    # The parts lie in [0.2, 0.9] plus noise of σ = 0.1: the 1 % quantiles sit about 2.3 σ outside.
    assert -0.2 < low < 0.2 and 0.9 < high < 1.3
    regulariser = PineRegulariser(load_denoiser(device="cpu"))
    removed = [
        float(torch.linalg.norm((regulariser(obj) - truth)[inside]))
        / float(torch.linalg.norm((obj - truth)[inside]))
        for obj in (noisy, edge)
    ]
    # Measured: 0.80 of the noise left without the wild pixels, 0.81 with them (0.83 through the extremes).
    assert removed[0] < 0.85
    assert removed[1] == pytest.approx(removed[0], abs=0.02)


def small_low_dose_runs(photons_per_frame: float, names: tuple[str, ...]) -> dict[str, ConvergenceTrace]:
    """Some of ePIE, rPIE (α = 0.1) and PINE on 60 positions of the benchmark scan: NRMSE and mean FRC
    after 4 and 8 sweeps, with the true probe, as the benchmark runs them."""
    from phasestream_bench.pine import known_probe_start, low_dose_scan, run_trace

    scan = low_dose_scan(60, photons_per_frame, seed=0)
    start = known_probe_start(scan, seed=0)
    solvers = {
        "ePIE": lambda: start.solver(),
        "rPIE": lambda: start.solver(update_rule=UpdateRule.RPIE, object={"rpie_alpha": 0.1}),
        "PINE": lambda: pine_solver(start.options, probe=start.probe, object_guess=start.object_guess),
    }
    return {name: run_trace(name, solvers[name](), scan, 8, 4, progress=False) for name in names}


@pytest.mark.slow
def test_rpie_at_low_alpha_amplifies_photon_noise_and_pine_keeps_epie_resolution() -> None:
    """At 2,000 photons per frame (0.5 per pixel) rPIE's step 1/((1 − α)|P|² + α max|P|²) is up to 1/α = 10
    times ePIE's where the probe is dim, and there ψ' − ψ is mostly photon noise: its error grows with every
    sweep (measured 0.50 → 0.60 from sweep 4 to 8) to more than twice ePIE's (0.25). At 2·10⁵ photons the
    same α converges (0.07; ePIE 0.04). PINE's FRC equals ePIE's at this dose (measured 0.3329 against
    0.3330); 0.01 is a third of the sweep-to-sweep spread of ePIE's FRC across seeds."""
    low = small_low_dose_runs(2e3, ("ePIE", "rPIE", "PINE"))
    assert low["rPIE"].nrmse[1] > low["rPIE"].nrmse[0]
    assert low["rPIE"].nrmse[1] > 2 * low["ePIE"].nrmse[1]
    assert low["PINE"].mean_frc[1] >= low["ePIE"].mean_frc[1] - 0.01
    high = small_low_dose_runs(2e5, ("rPIE",))
    assert high["rPIE"].nrmse[1] < 0.1

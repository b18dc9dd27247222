"""PINE: ePIE sweeps, then O ← (1 − ρ) O + ρ D(O) with D on the real and imaginary parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from phasestream.errors import ConfigError
from phasestream.models.benchmarks import simulate_scan
from phasestream.models.dncnn import COMPLEX_MARGIN, TRAINING_RANGE
from phasestream.models.epie import EpieSolver, EpieVariant
from phasestream.models.pine import PineRegulariser, pine_solver


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
    """(1 − ρ) O + ρ D(O), with D's affine map onto the training range written out independently."""
    low = min(obj.real.min(), obj.imag.min())
    high = max(obj.real.max(), obj.imag.max())
    train_low, train_high = TRAINING_RANGE
    margin = COMPLEX_MARGIN * (train_high - train_low)
    scale = (high - low) / (train_high - train_low - 2 * margin)
    offset = low - (train_low + margin) * scale
    denoised = [np_box_mean((part - offset) / scale) * scale + offset for part in (obj.real, obj.imag)]
    return (1 - rho) * obj + rho * (denoised[0] + 1j * denoised[1])


def test_one_pine_epoch_is_an_epie_epoch_then_the_regularisation_step() -> None:
    scan = simulate_scan(n_positions=12, size_px=16, seed=5)
    options = {"probe": scan.probe, "variant": EpieVariant.SEQUENTIAL, "seed": 3, "num_threads": 1}
    epie = EpieSolver(**options)
    pine = pine_solver(MeanFilter(), rho=0.49, **options)
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
        with pytest.raises(ConfigError, match="rho"):
            PineRegulariser(MeanFilter(), rho)


def test_the_shipped_denoiser_keeps_a_flat_object_and_smooths_noise() -> None:
    solver = pine_solver(rho=0.49, device="cpu")
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


def test_bench_pine_traces_every_solver_and_draws_the_figure(tmp_path) -> None:
    from phasestream.models.bench_pine import bench_pine

    figure = tmp_path / "frc.png"
    traces = bench_pine(
        n_positions=30, long_iterations=4, pine_iterations=2, every=2, denoiser=MeanFilter(), figure=figure,
        progress=False,
    )  # fmt: skip
    assert [t.iterations for t in traces.values()] == [[2, 4], [2, 4], [2]]
    for trace in traces.values():
        assert all(r > 0 for r in trace.resolution_px) and all(-1 <= m <= 1 for m in trace.mean_frc)
    assert figure.stat().st_size > 10_000

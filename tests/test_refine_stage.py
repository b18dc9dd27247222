"""The refine stage's own handling, called directly (no sockets): what it does with dark frames."""

from __future__ import annotations

from pathlib import Path

import pytest
from phasestream_bench.solvers import simulate_scan

from phasestream.runtime.config import load_pipeline
from phasestream.runtime.messages import FrameBatch, Geometry, Reconstruction, ScanStart
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.topology import place

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def refine_stage(**config):
    pipeline = load_pipeline(DEPLOY / "demo.yaml")
    placement = place(pipeline, "refine", 0)
    placement.spec.config.update(config)
    stage = resolve_stage(placement.spec.stage).from_placement(placement, pipeline)
    stage.setup()
    return stage


def test_zero_photon_frames_are_left_out_counted_and_the_rest_reconstructed() -> None:
    scan = simulate_scan(n_positions=24, size_px=32, seed=2)
    stage = refine_stage(
        min_positions=4, probe_search_epochs=0, emit_every_epochs=1, execution={"num_threads": 1}
    )
    geometry = Geometry(
        energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6, detector_shape_px=(32, 32),
        detector_dtype="uint16",
    )  # fmt: skip
    list(stage.on_scan_start(ScanStart(scan_uid="dark", seq=0, geometry=geometry, planned_frames=24)))
    frames = scan.intensities.copy()
    frames[[3, 10, 11]] = 0  # the shutter closed three times
    dx = stage._solves["dark"].pixel_size_m
    batch = FrameBatch(
        scan_uid="dark", seq=1, frame_indices=list(range(24)), frames=frames,
        positions_m=scan.top_left_px * dx,
    )  # fmt: skip
    list(stage.process(batch))
    counts = stage.scan("dark").counts
    assert counts["rejected_zero_photons"] == 3 and counts["frames_used"] == 21
    solve = stage._solves["dark"]
    assert solve.solver.n_positions == 21
    (snapshot,) = list(stage.idle())
    assert isinstance(snapshot, Reconstruction)
    # The R-factor comes with every snapshot and matches the solver's own after that epoch.
    assert snapshot.quality["r_factor"] == solve.solver.fourier_r_factor() > 0


def test_the_probe_power_and_amplitude_bound_reach_the_solver_and_hold_over_epochs() -> None:
    import numpy as np

    scan = simulate_scan(n_positions=24, size_px=32, seed=3)
    stage = refine_stage(
        min_positions=4, probe_search_epochs=0, emit_every_epochs=1, execution={"num_threads": 1},
        probe={"update_start_epoch": 0},
        constraints={"fix_probe_power": True, "probe_power_photons": 500.0, "max_object_amplitude": 0.9},
    )  # fmt: skip
    geometry = Geometry(
        energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6, detector_shape_px=(32, 32),
        detector_dtype="uint16",
    )  # fmt: skip
    list(stage.on_scan_start(ScanStart(scan_uid="held", seq=0, geometry=geometry, planned_frames=24)))
    dx = stage._solves["held"].pixel_size_m
    batch = FrameBatch(
        scan_uid="held", seq=1, frame_indices=list(range(24)), frames=scan.intensities,
        positions_m=scan.top_left_px * dx,
    )  # fmt: skip
    list(stage.process(batch))
    solver = stage._solves["held"].solver
    for _ in range(3):
        list(stage.idle())
    assert solver.epochs_run == 3
    assert float(np.sum(np.abs(solver.probe_modes) ** 2)) == pytest.approx(500.0, rel=1e-4)
    assert np.abs(solver.object).max() <= 0.9 + 1e-6


def test_the_poisson_step_is_chosen_in_the_stages_config() -> None:
    from phasestream.errors import ConfigError
    from phasestream.models.ptycho.options import FourierConstraint

    stage = refine_stage(constraints={"fourier_constraint": "poisson"}, probe_search_epochs=0)
    solver = stage._new_solver(probe=None, canvas_shape_px=(48, 48))
    assert solver.options.constraints.fourier_constraint is FourierConstraint.POISSON
    with pytest.raises(ConfigError, match=r"constraints\.fourier_constraint.*\(given 'gaussian'\)"):
        refine_stage(constraints={"fourier_constraint": "gaussian"})

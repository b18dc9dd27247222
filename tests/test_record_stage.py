"""The record stage: a live scan saved to CXI reads back, and replays, as the frames that passed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from phasestream.formats.cxi import read_cxi
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import FrameBatch, Geometry, ScanEnd, ScanStart
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.topology import place


def record_stage(directory: Path):
    pipeline = validate_pipeline(
        {
            "name": "record",
            "run_dir": str(directory),
            "stages": [
                {"name": "record", "stage": "record", "config": {"directory": str(directory / "scans")}}
            ],
        }
    )
    placement = place(pipeline, "record", 0)
    stage = resolve_stage("record").from_placement(placement, pipeline)
    stage.setup()
    return stage


def test_recorded_frames_and_positions_read_back_exactly_and_pass_through(tmp_path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.poisson(0.3, size=(10, 16, 16)).astype(np.uint16)
    positions_m = rng.uniform(-2e-6, 2e-6, size=(10, 2))
    geometry = Geometry(
        energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6, detector_shape_px=(16, 16),
        detector_dtype="uint16",
    )  # fmt: skip
    stage = record_stage(tmp_path)
    start = ScanStart(scan_uid="live-1", geometry=geometry, planned_frames=10, scan_shape=(10,))
    assert list(stage.on_scan_start(start)) == [start]
    # Two batches, the second with a gap (frame 6 was rejected upstream).
    kept = [0, 1, 2, 3, 4, 5, 7, 8, 9]
    for indices in (kept[:4], kept[4:]):
        batch = FrameBatch(
            scan_uid="live-1", frame_indices=indices, frames=frames[indices], positions_m=positions_m[indices]
        )
        assert list(stage.process(batch)) == [batch]
    list(stage.on_scan_end(ScanEnd(scan_uid="live-1", frames_sent=10)))
    assert stage.scan("live-1").counts["frames_recorded"] == 9

    recorded = read_cxi(tmp_path / "scans" / "live-1.cxi")
    assert recorded.n_frames == 9 and recorded.bslz4_passthrough
    np.testing.assert_array_equal(np.concatenate(list(recorded.iter_frames())), frames[kept])
    np.testing.assert_allclose(recorded.positions_m, positions_m[kept], rtol=1e-12)
    assert (recorded.energy_kev, recorded.detector_distance_m) == (8.8, 2.0)


def test_frames_that_cannot_be_recorded_still_pass_and_are_counted(tmp_path) -> None:
    geometry = Geometry(
        energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6, detector_shape_px=(16, 16),
        detector_dtype="uint16",
    )  # fmt: skip
    stage = record_stage(tmp_path)
    list(stage.on_scan_start(ScanStart(scan_uid="binned", geometry=geometry, planned_frames=2)))
    # Frames binned 2×2 upstream no longer fit the detector-shaped file.
    batch = FrameBatch(
        scan_uid="binned",
        frame_indices=[0, 1],
        frames=np.ones((2, 8, 8), np.uint16),
        positions_m=np.zeros((2, 2)),
    )
    assert list(stage.process(batch)) == [batch]
    counts = stage.scan("binned").counts
    assert counts["frames_not_recorded"] == 2 and counts["frames_recorded"] == 0

"""The position-binning + DIP fly-scan benchmark: binning against NumPy, and the bench end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from phasestream_bench.flyscan import FLYSCAN_DIP, OBJECT_PIXEL_NM, bench_flyscan, binned_scan, flyscan_config

from phasestream.errors import ConfigError
from phasestream.simulators.scan_simulation import simulate_scan


@pytest.fixture(scope="module")
def tiny_scan():
    return simulate_scan(
        flyscan_config(rows=6, photons_per_frame=1e4, overlap_fraction=1 - 2 / 24, fly_substeps=2, seed=1)
    )


def test_binning_sums_k_frames_per_row_and_averages_their_positions(tiny_scan) -> None:
    k = 3
    patterns, positions = binned_scan(tiny_scan, k)
    rows, columns = tiny_scan.scan_shape
    frames = tiny_scan.frames.astype(np.float64).reshape(rows, columns // k, k, *tiny_scan.frames.shape[1:])
    reference_patterns = frames.sum(axis=2).reshape(-1, *frames.shape[-2:]) / k
    reference_positions = tiny_scan.positions_m.reshape(rows, columns // k, k, 2).mean(axis=2).reshape(-1, 2)
    assert patterns.shape == (rows * columns // k, *tiny_scan.frames.shape[1:])
    np.testing.assert_allclose(patterns, reference_patterns, rtol=1e-6)
    np.testing.assert_allclose(positions, reference_positions, rtol=1e-12)
    # Per detector frame, the dose is kept: binning only regroups the photons.
    assert patterns.sum() * k == pytest.approx(tiny_scan.frames.sum(dtype=np.int64), rel=1e-6)
    # A bin never straddles two rows: every binned position lies on its row's y.
    np.testing.assert_allclose(positions[:, 0], np.repeat(tiny_scan.positions_m[::columns, 0], columns // k))


def test_the_geometry_gives_the_stated_object_pixel(tiny_scan) -> None:
    assert tiny_scan.object_pixel_size_m * 1e9 == pytest.approx(OBJECT_PIXEL_NM, rel=1e-9)


def test_a_bin_size_that_does_not_divide_a_row_is_refused(tiny_scan) -> None:
    with pytest.raises(ConfigError, match="does not divide"):
        binned_scan(tiny_scan, 4)


@pytest.mark.slow
def test_the_bench_runs_end_to_end_on_a_tiny_scan(tmp_path, capsys) -> None:
    threads = torch.get_num_threads()
    figure = tmp_path / "flyscan.png"
    try:
        results = bench_flyscan(
            rows=21, k=3, photons_per_frame=1e5, epochs=3, architectures=("arch1",), figure=figure,
            dip=FLYSCAN_DIP.replace(
                optimisation={"max_iterations": 30}, early_stopping={"window": 5, "patience": 10}
            ),
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    resolutions = [case.resolution_nm for case in results.values()]
    resolutions += [d.resolution_nm for case in results.values() for d in case.denoised.values()]
    assert len(resolutions) == 4
    # Finite, and no finer than the Nyquist period of two object pixels.
    assert all(math.isfinite(r) and r >= 2 * OBJECT_PIXEL_NM - 1e-6 for r in resolutions), resolutions
    assert results["binning"].positions * 3 == results["no binning"].positions == 21 * 21
    denoised = results["binning"].denoised["arch1"]
    assert 1 <= denoised.stop_iteration <= 30 and denoised.image.shape == results["binning"].image.shape
    assert figure.stat().st_size > 10_000
    rows = json.loads(figure.with_suffix(".png.json").read_text())["rows"]
    assert [row["case"] for row in rows] == [
        "no binning", "no binning + DIP (arch1)", "binning", "binning + DIP (arch1)",
    ]  # fmt: skip
    assert "| binning + DIP (arch1) |" in capsys.readouterr().out

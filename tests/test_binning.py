"""Position and pixel binning against a plain NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from phasestream.stages.binning import bin_pixels, bin_positions


def _reference(frames, positions, k):
    out_frames, out_positions = [], []
    for start in range(0, len(frames), k):
        out_frames.append(frames[start : start + k].astype(np.int64).sum(axis=0))
        out_positions.append(positions[start : start + k].mean(axis=0))
    return np.array(out_frames), np.array(out_positions)


@pytest.mark.parametrize(("n", "k"), [(64, 4), (10, 3), (5, 1), (7, 8)])
def test_position_binning_sums_frames_and_averages_positions(n: int, k: int) -> None:
    rng = np.random.default_rng(n * 10 + k)
    frames = rng.integers(0, 65535, (n, 6, 5), dtype=np.uint16)
    positions = rng.normal(scale=1e-6, size=(n, 2))
    summed, binned_positions, starts, per_group = bin_positions(frames, positions, [1] * n, k)
    ref_frames, ref_positions = _reference(frames, positions, k)
    assert summed.dtype == np.uint32  # sums of full-scale uint16 frames must not wrap
    assert np.array_equal(summed, ref_frames)
    np.testing.assert_allclose(binned_positions, ref_positions, rtol=1e-12)
    assert starts == list(range(0, n, k))
    assert sum(per_group) == n and per_group[0] == min(k, n)


def test_binned_frames_carry_their_weight_when_binned_again() -> None:
    frames = np.ones((4, 2, 2), np.uint16)
    positions = np.array([[0.0, 0.0], [3.0, 3.0], [10.0, 10.0], [20.0, 20.0]])
    _, binned_positions, _, per_group = bin_positions(frames, positions, [3, 1, 1, 1], 2)
    # The first bin holds 3 + 1 detector frames: its position is their weighted mean.
    np.testing.assert_allclose(binned_positions[0], [0.75, 0.75])
    assert per_group == [4, 2]


def test_pixel_binning_sums_blocks() -> None:
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 1000, (3, 8, 6), dtype=np.uint16)
    binned = bin_pixels(frames, 2)
    reference = frames.astype(np.int64).reshape(3, 4, 2, 3, 2).sum(axis=(2, 4))
    assert binned.shape == (3, 4, 3) and np.array_equal(binned, reference)
    assert binned.sum() == frames.astype(np.int64).sum()

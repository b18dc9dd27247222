"""``phasestream bench autophasenn``: speed of the shipped AutoPhaseNN networks, and prediction + ER against
HIO/ER from a random start on a measured pattern (figures for docs/benchmarks.md; never asserted in tests)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from phasestream_bench.solvers import BENCH_CDI

from phasestream.models.cdi.phasing import CdiResult, CdiSolver
from phasestream.models.execution import default_device
from phasestream.models.nets.autophasenn.inference import predict, refine_prediction
from phasestream.models.nets.autophasenn.network import INPUT_SIZE_PX
from phasestream.models.nets.autophasenn.weights import load_autophasenn


def _median_seconds(action: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``action()`` over ``repeats`` runs, after one untimed warm-up run."""
    action()
    seconds = []
    for _ in range(repeats):
        started_s = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started_s)
    return statistics.median(seconds)


def bench_autophasenn(
    amplitude_path: str | Path,
    *,
    repeats: int = 5,
    er_iterations: int = 50,
    hio_er_blocks: int = 3,
    device: str | None = None,
    num_threads: int | None = None,
) -> dict:
    """Speed of the shipped networks, and prediction + ER against HIO/ER from a random start.

    ``amplitude_path``: a measured 64³ BCDI amplitude (``tests/data/bcdi_amplitude_64.npy``). Reports the
    median ms per 64³ prediction, 2D frames/s at batch 1, 8 and 64, and on the measured pattern the χ² and
    wall time of prediction + ``er_iterations`` ER against ``hio_er_blocks`` × (180 HIO + 20 ER) with
    shrink-wrap from a random start (600 iterations, :data:`phasestream_bench.solvers.BENCH_CDI`, as in
    :func:`~phasestream_bench.solvers.bench_cdi`: the start support is the autocorrelation's at 4 % of its
    peak). χ² depends on the support's size (a looser support fits more), so both supports' voxel counts
    are reported with it.
    """
    if num_threads:
        torch.set_num_threads(num_threads)
    resolved = torch.device(device) if device is not None else default_device()
    model_3d = load_autophasenn(3, device=resolved)
    model_2d = load_autophasenn(2, device=resolved)
    amplitude = np.load(amplitude_path).astype(np.float32)
    ms_per_3d_prediction = 1e3 * _median_seconds(lambda: predict(model_3d, amplitude), repeats)
    frames = np.abs(np.random.default_rng(0).standard_normal((64, INPUT_SIZE_PX, INPUT_SIZE_PX)))
    frames_per_s = {
        batch: batch / _median_seconds(lambda batch=batch: predict(model_2d, frames[:batch]), repeats)
        for batch in (1, 8, 64)
    }

    def neural_then_er() -> CdiResult:
        return refine_prediction(predict(model_3d, amplitude), er_iterations, device=resolved)

    started_s = time.perf_counter()
    refined = neural_then_er()
    neural_s = time.perf_counter() - started_s
    autocorrelation = np.abs(np.fft.ifftn(np.fft.ifftshift(amplitude.astype(np.float64) ** 2)))
    loose_support = np.fft.fftshift(autocorrelation > 0.04 * autocorrelation.max())
    options = BENCH_CDI.replace(schedule={"cycles": hio_er_blocks}, execution={"device": str(resolved)})
    solver = CdiSolver(amplitude, loose_support, options)
    started_s = time.perf_counter()
    solver.run()
    iterative_s = time.perf_counter() - started_s
    return {
        "device": str(resolved),
        "num_threads": torch.get_num_threads(),
        "ms_per_3d_prediction": ms_per_3d_prediction,
        "frames_per_s_2d": frames_per_s,
        "prediction_er_iterations": er_iterations,
        "prediction_er_chi2": refined.final_error,
        "prediction_er_seconds": neural_s,
        "prediction_er_support_voxels": int(refined.support.sum()),
        "hio_er_iterations": 200 * hio_er_blocks,
        "hio_er_chi2": solver.fourier_error(),
        "hio_er_seconds": iterative_s,
        "hio_er_support_voxels": int(solver.support.sum()),
        "time_ratio_hio_er_over_prediction_er": iterative_s / neural_s,
    }

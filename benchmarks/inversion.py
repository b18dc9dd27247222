"""``phasestream bench inversion``: how fast AutoPhaseNN inverts, per frame in 2D and per 64³ volume in 3D.

Figures for docs/benchmarks.md, never asserted in tests. Each figure is the median over ``repeats`` timed
calls of
:func:`phasestream.models.nets.autophasenn.inference.predict` (validation, normalisation, the network and
the copy back to the host) after one untimed warm-up call; on a GPU the copy back synchronises the device, so
the time covers the whole forward pass. 2D input: Poisson frames of the 2D network's own simulated patches
(:func:`phasestream.simulators.crystals.simulate_ptycho_patches`); 3D input: one simulated crystal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from phasestream.models.execution import default_device, torch_threads
from phasestream.models.nets.autophasenn.inference import predict
from phasestream.models.nets.autophasenn.weights import load_autophasenn
from phasestream.simulators.crystals import simulate_crystals, simulate_ptycho_patches

BATCH_SIZES = (1, 8, 64)


def _median_seconds(action: Callable[[], object], repeats: int, bar: tqdm) -> float:
    action()  # warm-up: allocator, cuDNN autotuning, lazy imports
    seconds = []
    for _ in range(repeats):
        started_s = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started_s)
        bar.update()
    return statistics.median(seconds)


def bench_inversion(
    *,
    repeats: int = 7,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    device: str | None = None,
    num_threads: int | None = None,
    weights_2d: str | Path | None = None,
    weights_3d: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """2D frames/s at each batch size and ms per 64³ prediction, on ``device`` (default cuda when present).

    ``num_threads`` sets torch's CPU threads for the run (restored after). Returns a dict ready for JSON.
    """
    resolved = default_device(device)
    with torch_threads(num_threads):
        model_2d = load_autophasenn(2, weights_2d, device=resolved)
        model_3d = load_autophasenn(3, weights_3d, device=resolved)
        rng = np.random.default_rng(0)
        patches = simulate_ptycho_patches(max(batch_sizes), rng, probe=model_2d.probe.cpu().numpy())
        counts = patches.amplitudes * np.sqrt(patches.photons)[:, None, None]
        volume = simulate_crystals(1, rng).amplitudes[0]
        with tqdm(
            total=repeats * (len(batch_sizes) + 1), desc="bench inversion", unit="call", disable=not progress
        ) as bar:
            frames_per_s = {}
            for batch in batch_sizes:
                frames, photons = counts[:batch], patches.photons[:batch]

                def invert(frames=frames, photons=photons) -> object:
                    return predict(model_2d, frames, incident_photons=photons)

                seconds = _median_seconds(invert, repeats, bar)
                frames_per_s[batch] = batch / seconds
            ms_per_3d = 1e3 * _median_seconds(lambda: predict(model_3d, volume), repeats, bar)
        return {
            "device": str(resolved),
            "device_name": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else "cpu",
            "num_threads": torch.get_num_threads(),
            "repeats": repeats,
            "architecture_2d": model_2d.architecture.describe(),
            "architecture_3d": model_3d.architecture.describe(),
            "frames_per_s_2d": frames_per_s,
            "ms_per_3d_prediction": ms_per_3d,
        }

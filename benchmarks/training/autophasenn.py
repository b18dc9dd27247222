"""Unsupervised training of AutoPhaseNN on data simulated on the fly; one process, or many with DDP.

Reference: Yao et al., npj Comput. Mater. 8, 124 (2022) (see
:mod:`phasestream.models.nets.autophasenn.network`): the loss compares the input amplitude with
|F(prediction)| only, so the simulated ground truth never reaches the network. 3D trains on random crystals
(:func:`~phasestream.simulators.crystals.simulate_crystals`), 2D on probe-lit patches
(:func:`~phasestream.simulators.crystals.simulate_ptycho_patches`).

**Processes.** Without torchrun (no ``WORLD_SIZE`` in the environment) everything runs in the calling
process, on a CPU as well. Under ``torchrun --nproc-per-node N`` each process reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, joins the process group (NCCL on CUDA, one GPU per
process; gloo on a CPU) and wraps the model in DistributedDataParallel, which averages the gradients.
:func:`spawn_local_training` starts N gloo processes on one machine without torchrun.

**Data split.** Step s of rank r draws its batch from ``SeedSequence([seed, s, r, 0])``: disjoint streams per
rank, like DistributedSampler's split of a dataset, and a global batch of ``batch_size × world_size``. The
data of a step depend on nothing else, so a resumed run sees exactly the batches of an uninterrupted one.
Batch norm keeps per-process statistics (DDP broadcasts rank 0's buffers each step).

**Checkpoints** (rank 0, written atomically): weights, optimiser, step, torch RNG state and the loss history;
``resume=True`` continues from the last one. Adam, with the learning rate decaying on a cosine from ``lr`` to
``lr / 10`` over ``steps``.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from phasestream_bench.training.checkpoints import move_optimiser_state, save_atomically
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from phasestream.errors import ConfigError
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.nets.autophasenn.network import AutoPhaseNN, AutoPhaseNNArchitecture, physics_loss
from phasestream.models.nets.autophasenn.weights import weights_payload
from phasestream.simulators.crystals import (
    CrystalConfig,
    PtychoPatchConfig,
    ptycho_probe,
    simulate_crystals,
    simulate_ptycho_patches,
)

PAPER_WIDTHS_3D = (32, 64, 128, 256, 512)
"""The paper's 3D filter widths (Yao et al. 2022): a GPU network."""
PTYCHONN_WIDTHS_2D = (32, 64, 128)
"""PtychoNN's widths (Cherukara et al. 2020)."""
CPU_WIDTHS = {3: (8, 16, 32, 64), 2: (16, 32, 64)}
"""Small variants that train in minutes on one CPU thread: the shipped weights use them."""
FINAL_LR_FRACTION = 0.1
_TRAINING_STREAM = 0
"""Last word of the training SeedSequence; evaluation draws from other streams, so it never sees a training
sample."""


@dataclass(frozen=True)
class TrainingResult:
    """What one call to :func:`train_autophasenn` did (in the calling process)."""

    start_step: int
    final_step: int
    losses: list[float] = field(repr=False)
    """Loss of every step run by this call, averaged over the processes."""
    seconds: float
    weights_path: Path
    checkpoint_path: Path
    world_size: int


@dataclass(frozen=True)
class _RunOptions:
    """:func:`train_autophasenn`'s keyword options as the training loop uses them."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    checkpoint_every: int
    resume: bool
    crystal_config: CrystalConfig | None
    patch_config: PtychoPatchConfig | None
    probe: np.ndarray | None
    progress: bool


@dataclass(frozen=True)
class _Distributed:
    rank: int
    world_size: int
    local_rank: int
    started_here: bool


def _join_process_group(device: torch.device) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Distributed(0, 1, 0, started_here=False)
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")), started_here)


def learning_rate(lr: float, step: int, steps: int) -> float:
    """Cosine decay from ``lr`` at step 0 to ``lr · FINAL_LR_FRACTION`` at the last step."""
    progress = step / max(steps - 1, 1)
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(
    dim: int,
    rng: np.random.Generator,
    batch_size: int,
    crystal_config: CrystalConfig | None = None,
    patch_config: PtychoPatchConfig | None = None,
    probe: np.ndarray | None = None,
) -> torch.Tensor:
    """Simulated input amplitudes (batch, *grid), float32: crystals in 3D, probe-lit patches in 2D."""
    if dim == 3:
        return torch.from_numpy(simulate_crystals(batch_size, rng, crystal_config).amplitudes)
    return torch.from_numpy(simulate_ptycho_patches(batch_size, rng, patch_config, probe).amplitudes)


def _resume_state(
    checkpoint_path: Path, architecture: AutoPhaseNNArchitecture, model: AutoPhaseNN, optimiser
) -> tuple[int, list[float]]:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    found = AutoPhaseNNArchitecture(**checkpoint["architecture"])
    if found != architecture:
        raise ConfigError(
            f"checkpoint {checkpoint_path} holds {found.describe()}, but this run trains "
            f"{architecture.describe()}: pass the same --dim and --widths, or start without --resume"
        )
    model.load_state_dict(checkpoint["state_dict"])
    optimiser.load_state_dict(checkpoint["optimiser"])
    torch.set_rng_state(checkpoint["torch_rng_state"])
    return int(checkpoint["step"]), [float(value) for value in checkpoint["losses"]]


def train_autophasenn(
    dim: int,
    out_path: str | Path,
    *,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float = 1e-3,
    widths: Sequence[int] | None = None,
    seed: int = 0,
    checkpoint_every: int = 100,
    resume: bool = False,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    checkpoint_path: str | Path | None = None,
    crystal_config: CrystalConfig | None = None,
    patch_config: PtychoPatchConfig | None = None,
    probe: np.ndarray | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train a ``dim``-D AutoPhaseNN for ``steps`` optimiser steps and write its weights to ``out_path``.

    ``batch_size`` is per process. ``widths``: filters per encoder level, default :data:`CPU_WIDTHS`.
    Checkpoints go to ``checkpoint_path`` (default ``out_path`` with the suffix ``.ckpt``) every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from it (the step count is the total, so
    ``steps`` must exceed the checkpoint's step to train further). ``num_threads`` sets torch's intra-op
    threads for the run. ``probe`` (2D) replaces the simulated patch probe, e.g. a detector's probe as the
    inversion stage's binning and crop show it (``fitted_probe``).
    """
    if dim not in (2, 3):
        raise ConfigError(f"dim={dim!r}: AutoPhaseNN trains in 2D (ptychography) or 3D (Bragg CDI)")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{name}={value!r} must be at least 1")
    if not lr > 0:
        raise ConfigError(f"lr={lr!r} must be positive; the paper's Adam starts at 1e-3")
    architecture = AutoPhaseNNArchitecture(dim=dim, widths=tuple(widths or CPU_WIDTHS[dim]))
    out_path = Path(out_path)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else out_path.with_suffix(".ckpt")
    resolved = torch.device(device) if device is not None else default_device()
    options = _RunOptions(
        steps, batch_size, lr, seed, checkpoint_every, resume, crystal_config, patch_config, probe, progress
    )
    with torch_threads(num_threads):
        processes = _join_process_group(resolved)
        if resolved.type == "cuda" and processes.world_size > 1:
            resolved = torch.device("cuda", processes.local_rank)
            torch.cuda.set_device(resolved)
        try:
            return _train(architecture, out_path, checkpoint_path, processes, resolved, options)
        finally:
            if processes.started_here:
                dist.destroy_process_group()


def _train(
    architecture: AutoPhaseNNArchitecture,
    out_path: Path,
    checkpoint_path: Path,
    processes: _Distributed,
    device: torch.device,
    options: _RunOptions,
) -> TrainingResult:
    torch.manual_seed(options.seed)
    probe = options.probe
    if architecture.dim == 2 and probe is None:
        probe = ptycho_probe(options.patch_config)
    model = AutoPhaseNN(architecture, probe=None if probe is None else torch.from_numpy(probe))
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
    start_step, losses = 0, []
    if options.resume and checkpoint_path.is_file():
        start_step, losses = _resume_state(checkpoint_path, architecture, model, optimiser)
    model.to(device)
    move_optimiser_state(optimiser, device)
    network = model
    if processes.world_size > 1:
        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    started_s = time.perf_counter()
    first_new_loss = len(losses)
    _run_steps(
        network, model, optimiser, losses, start_step, checkpoint_path, processes, device, probe, options
    )
    seconds = time.perf_counter() - started_s
    if processes.rank == 0:
        record = _training_record(options, processes, losses, device)
        save_atomically(weights_payload(model, training=record), out_path)
    if processes.world_size > 1:
        dist.barrier()
    return TrainingResult(
        start_step=start_step,
        final_step=max(options.steps, start_step),
        losses=losses[first_new_loss:],
        seconds=seconds,
        weights_path=out_path,
        checkpoint_path=checkpoint_path,
        world_size=processes.world_size,
    )


def _run_steps(
    network: torch.nn.Module,
    model: AutoPhaseNN,
    optimiser: torch.optim.Optimizer,
    losses: list[float],
    start_step: int,
    checkpoint_path: Path,
    processes: _Distributed,
    device: torch.device,
    probe: np.ndarray | None,
    options: _RunOptions,
) -> None:
    """Optimiser steps ``start_step`` … ``steps`` − 1, appending each step's loss (averaged over the
    processes) to ``losses``; rank 0 writes a checkpoint every ``checkpoint_every`` steps and at the end."""
    dim = model.architecture.dim
    is_writer = processes.rank == 0

    def save_checkpoint(step: int) -> None:
        payload = weights_payload(
            model,
            optimiser=optimiser.state_dict(),
            step=step,
            torch_rng_state=torch.get_rng_state(),
            losses=list(losses),
        )
        save_atomically(payload, checkpoint_path)

    model.train()
    bar = tqdm(
        range(start_step, options.steps),
        initial=start_step,
        total=options.steps,
        desc=f"AutoPhaseNN {dim}D",
        unit="step",
        disable=not (options.progress and is_writer),
    )
    for step in bar:
        rng = np.random.default_rng([options.seed, step, processes.rank, _TRAINING_STREAM])
        batch = training_batch(
            dim, rng, options.batch_size, options.crystal_config, options.patch_config, probe
        ).to(device)
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(options.lr, step, options.steps)
        loss = physics_loss(network(batch), batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        reported = loss.detach()
        if processes.world_size > 1:
            dist.all_reduce(reported)
            reported = reported / processes.world_size
        losses.append(float(reported))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if is_writer and ((step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps):
            save_checkpoint(step + 1)


def _training_record(
    options: _RunOptions, processes: _Distributed, losses: list[float], device: torch.device
) -> dict:
    """How the weights were trained, written beside them."""
    return {
        "steps": options.steps,
        "batch_size_per_process": options.batch_size,
        "world_size": processes.world_size,
        "lr": options.lr,
        "seed": options.seed,
        "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
        "device": str(device),
        "torch": str(torch.__version__),
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


def _spawned_worker(rank: int, world_size: int, port: int, dim: int, out_path: str, options: dict) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    train_autophasenn(dim, out_path, device="cpu", **options)


def spawn_local_training(world_size: int, dim: int, out_path: str | Path, **options) -> None:
    """Train with ``world_size`` CPU processes on this machine (gloo backend), without torchrun.

    ``options`` are :func:`train_autophasenn`'s keyword arguments (not ``device``: the processes use the
    CPU). Returns when every process has finished; the weights are in ``out_path``.
    """
    if world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be at least 1")
    if "device" in options:
        raise ConfigError("spawn_local_training runs CPU processes: leave out `device`; use torchrun on GPUs")
    torch.multiprocessing.spawn(
        _spawned_worker,
        args=(world_size, _free_port(), dim, str(out_path), options),
        nprocs=world_size,
        join=True,
    )

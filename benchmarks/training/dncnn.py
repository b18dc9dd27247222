"""Training of PINE's nonexpansive DnCNN on formula-driven dead-leaves images (no real data).

The denoiser (:mod:`phasestream.models.nets.dncnn`) learns to map a clean dead-leaves patch
(:func:`~phasestream.simulators.dead_leaves_shapes.dead_leaves_shapes`, values in [0, 1]) plus white
Gaussian noise of σ drawn per patch from ``sigma_range`` back to the clean patch (mean squared error,
Zhang et al. 2017). Adam, the learning rate decaying on a cosine from ``lr`` to ``lr / 10`` over ``steps``.

**RealSN** (Ryu et al. 2019): every convolution is divided by its operator norm in the forward pass, and
after every optimiser step :func:`~phasestream.models.nets.realsn.normalise_` advances each layer's power
vector and rescales the stored weight to norm 1. When training ends, the norms are measured again with many
iterations on images larger than the patches and the weights rescaled once more, so that every layer of the
written network has σ(K) ≤ 1 to within the power iteration's accuracy; the Lipschitz constant of the
trained D is then estimated (:func:`~phasestream.models.nets.dncnn.lipschitz_estimate`) and written with the
weights.

**Nonexpansiveness.** RealSN gives Lip(N) ≤ 1 only, hence Lip(D) = Lip(x − N(x)) ≤ 2. Trained on the MSE
alone, the 8 × 32 network of 2,000 steps ended with an estimated Lip(D) of 1.045: it learns to steepen edges a
little. Each step therefore also penalises the secant ratio ‖D(x + h v) − D(x)‖ / h along the direction v of
largest expansion, found by power iteration on J_Dᵀ J_D (Jacobian-vector products), as Pesquet et al.
("Learning maximally monotone operators for image recovery", SIAM J. Imaging Sci. 14, 1206, 2021) do for
their firmly nonexpansive denoisers. The singular values of J_D crowd just below 1 (D passes image structure
unchanged), so power iteration needs hundreds of steps to single out the few above 1, and the direction found
at one image is no start for the next. The probes are therefore fixed: :data:`LIPSCHITZ_PROBES` noisy
dead-leaves patches, each with its own persistent direction; every step advances one of them (in turn) by
:data:`LIPSCHITZ_POWER_STEPS` and penalises its ratio, so that over a training run every probe's direction
gets hundreds of iterations while each step pays for a small patch.

**Data and resume.** Step s draws its batch from ``SeedSequence([seed, s, 0])``: the data of a step depend
on nothing else, so a resumed run sees exactly the batches of an uninterrupted one. Checkpoints (written
atomically) hold the weights, the power vectors (of the layers and of the probes), the optimiser, the step,
the torch RNG state and the loss history; ``resume=True`` continues from the checkpoint beside ``out_path``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from phasestream_bench.training.checkpoints import move_optimiser_state, save_atomically
from tqdm import tqdm

from phasestream.errors import ConfigError
from phasestream.models.execution import default_device, torch_threads
from phasestream.models.nets.dncnn import (
    DEFAULT_WEIGHTS_PATH,
    DncnnArchitecture,
    NonexpansiveDncnn,
    lipschitz_estimate,
    weights_payload,
)
from phasestream.models.nets.realsn import load_power_vectors_, normalise_, power_vectors
from phasestream.simulators.dead_leaves_shapes import dead_leaves_shapes, noisy_batch

CPU_DEPTH, CPU_WIDTH = 8, 32
"""The shipped network: trains in about a quarter of an hour on one CPU thread (the paper's 17 × 64 is
about ten times the compute per step)."""
DEFAULT_SIGMA_RANGE = (0.0, 0.15)
"""Blind over σ ∈ [0, 0.15] of the [0, 1] range: covers the σ = 0.05 and 0.1 of the quality checks with
room above, and σ = 0 teaches D to leave clean images alone."""
FINAL_LR_FRACTION = 0.1
FINAL_POWER_ITERATIONS = 300
FINAL_POWER_IMAGE_PX = (96, 96)
"""The final normalisation's power iteration: larger images than the patches (a zero-padded convolution's
norm grows with the image) and enough iterations to converge to 1e-4."""
LIPSCHITZ_CHECK_IMAGES = 4
LIPSCHITZ_TARGET = 0.97
"""Secant ratio ‖D(x + h v) − D(x)‖ / h above which training is penalised: 3 % under 1, so that images
never trained on stay below the 1.05 of the acceptance test."""
LIPSCHITZ_PENALTY_WEIGHT = 10.0
"""μ of the squared hinge μ · max(0, ratio − target)²: a 5 % excess costs about as much as the mean squared
error of a σ = 0.05 image, enough to hold the ratio at the target without dominating the fit."""
LIPSCHITZ_PROBES = 8
LIPSCHITZ_PROBE_PX = 32
"""Probe patches: larger than the 17-px receptive field of the 8-layer network, small enough to be cheap."""
LIPSCHITZ_POWER_STEPS = 2
SECANT_STEP = 1e-2
_TRAINING_STREAM = 0
"""Last word of the training SeedSequence; evaluation draws from other streams, so it never sees a training
sample."""
_CHECK_STREAM = 1
_PROBE_STREAM = 2


@dataclass(frozen=True)
class TrainingResult:
    """What one call to :func:`train_dncnn` did."""

    start_step: int
    final_step: int
    losses: list[float] = field(repr=False)
    """Loss (mean squared error) of every step run by this call."""
    seconds: float
    weights_path: Path
    checkpoint_path: Path
    lipschitz_estimate: float


@dataclass(frozen=True)
class _RunOptions:
    """:func:`train_dncnn`'s keyword options as the training loop uses them."""

    steps: int
    batch_size: int
    patch_px: int
    sigma_range: tuple[float, float]
    lr: float
    seed: int
    checkpoint_every: int
    power_iterations: int
    progress: bool


def learning_rate(lr: float, step: int, steps: int) -> float:
    """Cosine decay from ``lr`` at step 0 to ``lr · FINAL_LR_FRACTION`` at the last step."""
    progress = step / max(steps - 1, 1)
    return lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(
    seed: int, step: int, batch_size: int, patch_px: int, sigma_range: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy, clean) patches of step ``step``, (batch, 1, patch, patch) float32."""
    rng = np.random.default_rng([seed, step, _TRAINING_STREAM])
    noisy, clean = noisy_batch(rng, batch_size, patch_px, sigma_range)
    return torch.from_numpy(noisy), torch.from_numpy(clean)


def lipschitz_probes(seed: int, sigma_range: tuple[float, float]) -> torch.Tensor:
    """The fixed noisy patches at which training holds the secant ratio down, (probes, 1, px, px)."""
    rng = np.random.default_rng([seed, 0, _PROBE_STREAM])
    noisy, _ = noisy_batch(rng, LIPSCHITZ_PROBES, LIPSCHITZ_PROBE_PX, sigma_range)
    return torch.from_numpy(noisy)


def default_checkpoint_path(out_path: Path) -> Path:
    return out_path.with_suffix(".ckpt")


def _check_options(
    steps: int,
    batch_size: int,
    patch_px: int,
    sigma_range: tuple[float, float],
    lr: float,
    checkpoint_every: int,
) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value < 1:
            raise ConfigError(f"{name}={value!r} must be at least 1")
    if patch_px < 8:
        raise ConfigError(f"patch_px={patch_px!r}: patches below 8 px hold no shapes; DnCNN used 40")
    if not 0 <= sigma_range[0] <= sigma_range[1]:
        raise ConfigError(f"sigma_range={sigma_range}: need 0 <= min <= max, e.g. {DEFAULT_SIGMA_RANGE}")
    if not lr > 0:
        raise ConfigError(f"lr={lr!r} must be positive; DnCNN's Adam starts at 1e-3")


def _resume_state(
    checkpoint_path: Path, architecture: DncnnArchitecture, model: NonexpansiveDncnn, optimiser
) -> tuple[int, list[float], torch.Tensor]:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    found = DncnnArchitecture(**checkpoint["architecture"])
    if found != architecture:
        raise ConfigError(
            f"checkpoint {checkpoint_path} holds {found.describe()}, but this run trains "
            f"{architecture.describe()}: pass the same --depth and --width, or start without --resume"
        )
    model.load_state_dict(checkpoint["state_dict"])
    load_power_vectors_(model, checkpoint["power_vectors"])
    optimiser.load_state_dict(checkpoint["optimiser"])
    torch.set_rng_state(checkpoint["torch_rng_state"])
    losses = [float(value) for value in checkpoint["losses"]]
    return int(checkpoint["step"]), losses, checkpoint["probe_directions"]


def train_dncnn(
    out_path: str | Path = DEFAULT_WEIGHTS_PATH,
    *,
    steps: int = 2000,
    batch_size: int = 16,
    patch_px: int = 40,
    sigma_range: tuple[float, float] = DEFAULT_SIGMA_RANGE,
    depth: int = CPU_DEPTH,
    width: int = CPU_WIDTH,
    lr: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 250,
    resume: bool = False,
    device: str | torch.device | None = None,
    num_threads: int | None = 1,
    power_iterations: int = 2,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train D for ``steps`` optimiser steps (the total, counting any resumed ones); write it to ``out_path``.

    Checkpoints go to ``checkpoint_path`` (default ``out_path`` with the suffix ``.ckpt``) every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from it. ``power_iterations``: power
    steps per optimiser step and layer. ``num_threads`` sets torch's intra-op threads for the run.
    """
    _check_options(steps, batch_size, patch_px, sigma_range, lr, checkpoint_every)
    architecture = DncnnArchitecture(depth=depth, width=width)
    out_path = Path(out_path)
    checkpoint_path = (
        Path(checkpoint_path) if checkpoint_path is not None else default_checkpoint_path(out_path)
    )
    resolved = torch.device(device) if device is not None else default_device()
    options = _RunOptions(
        steps, batch_size, patch_px, sigma_range, lr, seed, checkpoint_every, power_iterations, progress
    )
    with torch_threads(num_threads):
        return _train(architecture, out_path, checkpoint_path, resolved, resume, options)


def _train(
    architecture: DncnnArchitecture,
    out_path: Path,
    checkpoint_path: Path,
    device: torch.device,
    resume: bool,
    options: _RunOptions,
) -> TrainingResult:
    torch.manual_seed(options.seed)
    model = NonexpansiveDncnn(architecture, power_image_px=(options.patch_px, options.patch_px))
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
    start_step, losses = 0, []
    probes = lipschitz_probes(options.seed, options.sigma_range)
    directions = _unit_images(torch.randn(probes.shape))
    if resume and checkpoint_path.is_file():
        start_step, losses, directions = _resume_state(checkpoint_path, architecture, model, optimiser)
    else:
        # Start from normalised layers, so that the first forward passes already see norm-1 operators.
        normalise_(model, iterations=20)
    model.to(device)
    probes, directions = probes.to(device), directions.to(device)
    move_optimiser_state(optimiser, device)
    first_new_loss = len(losses)
    started_s = time.perf_counter()
    _run_steps(model, optimiser, losses, probes, directions, start_step, checkpoint_path, device, options)
    seconds = time.perf_counter() - started_s
    lipschitz = _final_normalisation(model, options, device)
    record = _training_record(options, start_step, losses, lipschitz, device)
    save_atomically(weights_payload(model, training=record), out_path)
    return TrainingResult(
        start_step=start_step,
        final_step=max(options.steps, start_step),
        losses=losses[first_new_loss:],
        seconds=seconds,
        weights_path=out_path,
        checkpoint_path=checkpoint_path,
        lipschitz_estimate=lipschitz,
    )


def _run_steps(
    model: NonexpansiveDncnn,
    optimiser: torch.optim.Optimizer,
    losses: list[float],
    probes: torch.Tensor,
    directions: torch.Tensor,
    start_step: int,
    checkpoint_path: Path,
    device: torch.device,
    options: _RunOptions,
) -> None:
    """Optimiser steps ``start_step`` … ``steps`` − 1, each with one probe's power steps (``directions`` is
    updated in place), the penalised loss and RealSN's normalisation; appends each step's mean squared
    error to ``losses`` and writes a checkpoint every ``checkpoint_every`` steps and at the end."""
    model.train()
    bar = tqdm(
        range(start_step, options.steps),
        initial=start_step,
        total=options.steps,
        desc="DnCNN",
        unit="step",
        disable=not options.progress,
    )
    for step in bar:
        noisy, clean = (
            tensor.to(device)
            for tensor in training_batch(
                options.seed, step, options.batch_size, options.patch_px, options.sigma_range
            )
        )
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(options.lr, step, options.steps)
        probe = slice(step % LIPSCHITZ_PROBES, step % LIPSCHITZ_PROBES + 1)
        for _ in range(LIPSCHITZ_POWER_STEPS):
            directions[probe] = _power_step(model, probes[probe], directions[probe])
        loss = torch.nn.functional.mse_loss(model(noisy), clean)
        ratio = _secant_ratio(model, probes[probe], directions[probe])
        penalty = LIPSCHITZ_PENALTY_WEIGHT * torch.relu(ratio - LIPSCHITZ_TARGET).square().mean()
        optimiser.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        optimiser.step()
        normalise_(model, iterations=options.power_iterations)
        losses.append(float(loss.detach()))
        bar.set_postfix(
            loss=f"{losses[-1]:.3g}",
            psnr_db=f"{-10 * math.log10(max(losses[-1], 1e-12)):.2f}",
            probe_lipschitz=f"{float(ratio.detach().max()):.3f}",
        )
        if (step + 1) % options.checkpoint_every == 0 or step + 1 == options.steps:
            _save_checkpoint(checkpoint_path, model, optimiser, directions, step + 1, losses)


def _save_checkpoint(
    path: Path,
    model: NonexpansiveDncnn,
    optimiser: torch.optim.Optimizer,
    directions: torch.Tensor,
    step: int,
    losses: list[float],
) -> None:
    payload = weights_payload(
        model,
        power_vectors=[vector.cpu() for vector in power_vectors(model)],
        probe_directions=directions.cpu(),
        optimiser=optimiser.state_dict(),
        step=step,
        torch_rng_state=torch.get_rng_state(),
        losses=list(losses),
    )
    save_atomically(payload, path)


def _final_normalisation(model: NonexpansiveDncnn, options: _RunOptions, device: torch.device) -> float:
    """Rescale every layer to norm 1 with the final, long power iteration, then estimate Lip(D) on
    dead-leaves images training never saw."""
    model.eval()
    normalise_(model, iterations=FINAL_POWER_ITERATIONS, power_image_px=FINAL_POWER_IMAGE_PX)
    check_rng = np.random.default_rng([options.seed, 0, _CHECK_STREAM])
    check_images = dead_leaves_shapes(LIPSCHITZ_CHECK_IMAGES, (options.patch_px, options.patch_px), check_rng)
    return lipschitz_estimate(model, torch.from_numpy(check_images[:, None]).to(device))


def _training_record(
    options: _RunOptions, start_step: int, losses: list[float], lipschitz: float, device: torch.device
) -> dict:
    """How the weights were trained, written beside them."""
    return {
        "steps": max(options.steps, start_step),
        "batch_size": options.batch_size,
        "patch_px": options.patch_px,
        "sigma_range": list(options.sigma_range),
        "lr": options.lr,
        "seed": options.seed,
        "power_iterations": options.power_iterations,
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "lipschitz_estimate": lipschitz,
        "device": str(device),
        "torch": str(torch.__version__),
    }


def _unit_images(images: torch.Tensor) -> torch.Tensor:
    """Each image of a (batch, 1, H, W) stack divided by its own norm."""
    return images / torch.linalg.vector_norm(images.flatten(1), dim=1).clamp_min(1e-30)[:, None, None, None]


def _power_step(model: torch.nn.Module, images: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """One power-iteration step v ← J_Dᵀ J_D v / ‖·‖ at every image; D acts on each image alone, so the
    batch's Jacobian is block diagonal and every image keeps its own direction."""
    with torch.no_grad():
        _, pushed = torch.func.jvp(model, (images,), (direction,))
        _, pullback = torch.func.vjp(model, images)
        (pulled,) = pullback(pushed)
    return _unit_images(pulled)


def _secant_ratio(model: torch.nn.Module, images: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """‖D(x + h v) − D(x)‖ / h per image (‖v‖ = 1): the quotient that Lip(D) bounds, differentiable in the
    weights."""
    both = model(torch.cat([images, images + SECANT_STEP * direction]))
    difference = both[images.shape[0] :] - both[: images.shape[0]]
    return torch.linalg.vector_norm(difference.flatten(1), dim=1) / SECANT_STEP

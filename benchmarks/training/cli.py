"""``phasestream train ...``: train the shipped networks' weights."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train(sub: argparse._SubParsersAction) -> None:
    """``phasestream train NETWORK``: the entry point of the ``phasestream.commands`` group."""
    p = sub.add_parser(
        "train", help="train the shipped networks on simulated data (progress bars, checkpoints)"
    )
    train = p.add_subparsers(dest="train", required=True, metavar="NETWORK")
    _add_autophasenn(train)
    _add_dncnn(train)


def _add_autophasenn(train: argparse._SubParsersAction) -> None:
    p = train.add_parser(
        "autophasenn",
        help="unsupervised AutoPhaseNN training on simulated data (torchrun for several GPUs)",
        description="Trains on simulated diffraction patterns only, with the physics-aware loss. "
        "Several GPUs: "
        "torchrun --nproc-per-node N -m phasestream train autophasenn ...",
    )
    p.add_argument("--dim", type=int, choices=(2, 3), required=True)
    p.add_argument("--out", type=Path, required=True, help="weights file to write")
    p.add_argument("--steps", type=int, default=1000, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=8, help="per process (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="default %(default)s")
    p.add_argument("--widths", type=int, nargs="+", default=None, help="filters per encoder level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="default %(default)s")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <out>.ckpt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_autophasenn)


def _cmd_train_autophasenn(args: argparse.Namespace) -> int:
    from phasestream_bench.training.autophasenn import train_autophasenn

    train_autophasenn(
        args.dim, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, widths=args.widths,
        seed=args.seed, checkpoint_every=args.checkpoint_every, checkpoint_path=args.checkpoint,
        resume=args.resume, device=args.device, num_threads=args.threads, progress=not args.no_progress,
    )  # fmt: skip
    return 0


def _add_dncnn(train: argparse._SubParsersAction) -> None:
    p = train.add_parser(
        "dncnn",
        help="the nonexpansive DnCNN denoiser of PINE, on formula-driven dead-leaves images",
        description="Trains D(x) = x − N(x) with RealSN layers on dead-leaves images with Gaussian noise; "
        "no real data. Writes the weights file and periodic checkpoints (--resume continues).",
    )
    p.add_argument(
        "--out", type=Path, default=Path("models/weights/dncnn_realsn.pt"), help="default %(default)s"
    )
    p.add_argument("--steps", type=int, default=2000, help="default %(default)s")
    p.add_argument("--batch-size", type=int, default=16, help="default %(default)s")
    p.add_argument("--patch-px", type=int, default=40, help="default %(default)s")
    p.add_argument("--sigma-min", type=float, default=0.0, help="default %(default)s")
    p.add_argument("--sigma-max", type=float, default=0.15, help="default %(default)s")
    p.add_argument("--depth", type=int, default=8, help="conv layers (paper 17; default %(default)s)")
    p.add_argument("--width", type=int, default=32, help="channels (paper 64; default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="default %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=250, help="default %(default)s")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <out>.ckpt")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1, help="default %(default)s")
    p.add_argument("--power-iterations", type=int, default=2, help="RealSN power steps per update")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_dncnn)


def _cmd_train_dncnn(args: argparse.Namespace) -> int:
    from phasestream_bench.training.dncnn import train_dncnn

    train_dncnn(
        args.out, steps=args.steps, batch_size=args.batch_size, patch_px=args.patch_px,
        sigma_range=(args.sigma_min, args.sigma_max), depth=args.depth, width=args.width, lr=args.lr,
        seed=args.seed, checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device,
        num_threads=args.threads, power_iterations=args.power_iterations, checkpoint_path=args.checkpoint,
        progress=not args.no_progress,
    )  # fmt: skip
    return 0

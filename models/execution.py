"""Where torch runs and on how many CPU threads: one rule for every stage, solver and benchmark.

A device is asked for by name (``cpu``, ``cuda``, ``cuda:1``), or left to the machine with None or
``auto``: CUDA when torch sees a GPU, else the CPU. A stage sets torch's CPU threads once, at setup, with
:func:`set_torch_threads` (None: one per logical core); a solver or benchmark that wants another count for
a stretch of work takes it with :func:`torch_threads`, which puts the count back afterwards.

torch is imported on first use, not with this module: configurations that name a device are validated
(by the launcher, for every stage) without loading torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from phasestream.errors import ConfigError

if TYPE_CHECKING:
    import torch

AUTO_DEVICE = "auto"
"""The device name that means: CUDA when present, else the CPU (as does None)."""


def parse_device(requested: str | torch.device | None) -> torch.device | None:
    """The named device, or None for ``auto``/None; a name torch does not know is a ConfigError.

    Checks the spelling only, so a configuration can be validated on a host without the GPU it names.
    """
    import torch

    if requested is None or requested == AUTO_DEVICE:
        return None
    try:
        return torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"device {requested!r} is not a torch device: use auto, cpu, cuda or cuda:<index>"
        ) from exc


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to compute on: ``requested``, or CUDA when present else the CPU for None or ``auto``.

    A CUDA device asked for on a machine where torch sees none is a ConfigError, not a silent fall-back
    to the CPU (which can be 100× slower for the same settings).
    """
    import torch

    device = parse_device(requested)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {requested!r} was asked for but torch sees no CUDA device here: use device auto "
            "(CUDA when present, else cpu) or cpu, or run on a GPU host"
        )
    return device


def set_torch_threads(num_threads: int | None) -> int:
    """Set torch's intra-op CPU threads for the calling thread from now on; returns the count set.

    None takes one thread per logical core. OpenMP keeps the count per calling thread, so a stage that
    computes on a worker thread calls this there too.
    """
    import torch

    threads = (os.cpu_count() or 1) if num_threads is None else num_threads
    torch.set_num_threads(threads)
    return threads


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``num_threads`` for the block and restored after; None leaves
    the count as it is."""
    import torch

    if num_threads is None:
        yield
        return
    threads_before = torch.get_num_threads()
    set_torch_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)

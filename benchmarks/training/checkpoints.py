"""Training checkpoints shared by the network trainers: atomic writes and optimiser state on a device."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomically(payload: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def move_optimiser_state(optimiser: torch.optim.Optimizer, device: torch.device) -> None:
    """Put a resumed optimiser's moment tensors on ``device`` (Adam keeps its step count on the CPU)."""
    for state in optimiser.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)

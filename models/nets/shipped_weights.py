"""Where the shipped network weights live: package data beside the models, so an installed wheel finds
them."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# Wheels install as plain files, so the package resource is a real path that torch.load can open.
WEIGHTS_DIR = Path(str(resources.files("phasestream.models").joinpath("weights")))


def shipped_weights(file_name: str) -> Path:
    return WEIGHTS_DIR / file_name

"""AutoPhaseNN weights files: what one holds, where the shipped ones live, and loading one for inference."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from pydantic import ValidationError

from phasestream.errors import ConfigError
from phasestream.models.execution import default_device
from phasestream.models.nets.autophasenn.network import INPUT_SIZE_PX, AutoPhaseNN, AutoPhaseNNArchitecture
from phasestream.models.nets.shipped_weights import shipped_weights

WEIGHTS_FORMAT = "phasestream-autophasenn-1"


def default_weights_path(dim: int) -> Path:
    return shipped_weights(f"autophasenn_{dim}d.pt")


def weights_payload(model: AutoPhaseNN, **extra: object) -> dict:
    """What a weights file holds: format tag, architecture, state dict, and ``extra`` (training record…)."""
    return {
        "format": WEIGHTS_FORMAT,
        "architecture": model.architecture.model_dump(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        **extra,
    }


def _architecture_from_state(state: dict) -> str:
    """Describe the network a state dict belongs to, from its tensor shapes, for error messages."""
    convs = [
        tensor for name, tensor in state.items() if name.startswith("encoder.") and tensor.ndim in (4, 5)
    ]
    if not convs:
        return "an unknown network (no encoder convolutions)"
    dim = convs[0].ndim - 2
    widths = [int(tensor.shape[0]) for tensor in convs[::2]]
    return f"{dim}D AutoPhaseNN (widths {widths})"


def load_autophasenn(
    dim: int,
    path: str | Path | None = None,
    device: torch.device | str | None = None,
    architecture: AutoPhaseNNArchitecture | None = None,
) -> AutoPhaseNN:
    """Load weights (default: the shipped ``models/weights/autophasenn_{dim}d.pt``) in eval mode.

    ``architecture``, when given, must match the file's. Raises ConfigError naming the architecture asked
    for and the one in the file when they differ, and when the file is missing or not AutoPhaseNN weights.
    """
    if dim not in (2, 3):
        raise ConfigError(f"dim={dim!r}: AutoPhaseNN exists in 2D (ptychography) and 3D (Bragg CDI)")
    path = Path(path) if path is not None else default_weights_path(dim)
    grid = "×".join([str(INPUT_SIZE_PX)] * dim)
    wanted = architecture.describe() if architecture is not None else f"a {dim}D AutoPhaseNN ({grid} input)"
    if not path.is_file():
        raise ConfigError(
            f"no AutoPhaseNN weights at {path}: train them with `phasestream train autophasenn --dim {dim}`"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise ConfigError(
            f"{path} is not a readable torch weights file ({error}): retrain or re-download"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ConfigError(f"{path} does not hold {WEIGHTS_FORMAT} weights: expected {wanted}")
    try:
        found = AutoPhaseNNArchitecture(**payload["architecture"])
    except (ValidationError, TypeError) as error:
        raise ConfigError(f"{path} describes no valid architecture ({error}); expected {wanted}") from error
    if found.dim != dim or (architecture is not None and found != architecture):
        raise ConfigError(
            f"{path} holds weights for {found.describe()}, but {wanted} was asked for: "
            f"pass the weights of {wanted}, or ask for {found.describe()}"
        )
    state = payload["state_dict"]
    placeholder_probe = state.get("probe") if dim == 2 else None
    model = AutoPhaseNN(found, probe=placeholder_probe)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            f"{path} declares {found.describe()} but its tensors belong to "
            f"{_architecture_from_state(state)}: the file is inconsistent; retrain it"
        ) from error
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type == "cpu" and torch.backends.mkldnn.is_available():
        # oneDNN's fastest kernels want channels last (see autophasenn._OneDnnConvolution).
        model = model.to(memory_format=torch.channels_last_3d if dim == 3 else torch.channels_last)
    return model.to(resolved).eval()

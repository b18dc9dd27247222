"""AutoPhaseNN inference on NumPy patterns, and ER refinement from a 3D prediction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from phasestream.errors import ConfigError
from phasestream.models.cdi.options import CdiAlgorithm, CdiOptions
from phasestream.models.cdi.phasing import CdiResult, CdiSolver
from phasestream.models.nets.autophasenn.fit import PatternFit, fit_pattern, validate_network_input
from phasestream.models.nets.autophasenn.network import AutoPhaseNN


@dataclass(frozen=True)
class AutoPhaseNNPrediction:
    """A prediction as NumPy arrays; a leading batch axis when the input had one."""

    object: np.ndarray  # complex64: 3D ρ in the 64³ box, 2D the transmission O of the window
    amplitude: np.ndarray  # float32
    phase: np.ndarray  # float32, radians
    support: np.ndarray  # bool
    measured: np.ndarray  # float32: the input as the network saw it (fitted, normalised)
    modelled: np.ndarray  # float32: |F(prediction)|, comparable with ``measured``
    fit: PatternFit


def predict(
    model: AutoPhaseNN,
    amplitude: np.ndarray | torch.Tensor,
    *,
    incident_photons: float | Sequence[float] | None = None,
) -> AutoPhaseNNPrediction:
    """Invert centred diffraction amplitude(s) sqrt(I) with a trained network.

    The pattern is validated (:func:`validate_network_input`) and fitted to the network's grid
    (:func:`fit_pattern`). 3D patterns are max-normalised. 2D patterns are divided by sqrt(incident photons
    per frame), the training's units; without ``incident_photons`` each frame's own total Σ I stands in for
    it, which assumes the specimen transmits most of the beam.
    """
    dim = model.architecture.dim
    if isinstance(amplitude, torch.Tensor):
        amplitude = amplitude.detach().cpu().numpy()
    amplitude = np.asarray(amplitude)
    validate_network_input(amplitude, dim)
    batched = amplitude.ndim == dim + 1
    fitted, fit = fit_pattern(amplitude, dim, model.architecture.input_size_px)
    frames = fitted.reshape(-1, *fitted.shape[-dim:]).astype(np.float64)
    axes = tuple(range(1, dim + 1))
    if dim == 3:
        frames /= frames.max(axis=axes, keepdims=True)
    else:
        photons = (frames**2).sum(axis=axes) if incident_photons is None else np.asarray(incident_photons)
        photons = np.broadcast_to(np.asarray(photons, dtype=np.float64), (len(frames),))
        if not (photons > 0).all():
            raise ConfigError(f"incident_photons={incident_photons!r}: give a positive count per frame")
        frames /= np.sqrt(photons).reshape(-1, *([1] * dim))
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        output = model(torch.from_numpy(frames.astype(np.float32)).to(device))

    def numpy_of(tensor: torch.Tensor) -> np.ndarray:
        array = tensor.cpu().numpy()
        return array if batched else array[0]

    return AutoPhaseNNPrediction(
        object=numpy_of(output.object).astype(np.complex64),
        amplitude=numpy_of(output.amplitude).astype(np.float32),
        phase=numpy_of(output.phase).astype(np.float32),
        support=numpy_of(output.support),
        measured=frames.astype(np.float32) if batched else frames[0].astype(np.float32),
        modelled=numpy_of(output.modelled_amplitude).astype(np.float32),
        fit=fit,
    )


def refine_prediction(
    prediction: AutoPhaseNNPrediction,
    iterations: int = 50,
    *,
    shrink_wrap: bool = False,
    device: torch.device | str | None = None,
) -> CdiResult:
    """ER from a 3D prediction (the paper's refinement): the predicted object, scaled to the measured
    amplitude by least squares, is the warm start and the predicted support the support."""
    modelled = np.abs(np.fft.fftshift(np.fft.fftn(prediction.object.astype(np.complex128), norm="ortho")))
    scale = float(np.sum(modelled * prediction.measured) / max(np.sum(modelled**2), 1e-30))
    options = CdiOptions(
        support={"shrink_wrap": shrink_wrap}, execution={"device": None if device is None else str(device)}
    )
    solver = CdiSolver(
        prediction.measured, prediction.support, options, initial_image=prediction.object * scale
    )
    solver.run([(CdiAlgorithm.ER, iterations)])
    return solver.result()

"""What ``run`` and ``replay`` let the user set for the scans: the first probe, the geometry, a mask.

``--probe`` goes to every refine stage's ``initial_probe``; ``--energy-kev``, ``--detector-distance-m``,
``--pixel-size-m``, ``--beam-centre``, ``--window-px`` and ``--mask`` to every ingest stage's
``geometry``. Both are checked here, when the pipeline is loaded, so that a probe file that cannot be
used or a mask that cannot be read stops the command before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from phasestream.errors import ConfigError
from phasestream.runtime.config import PipelineConfig, StageSpec, format_validation_error
from phasestream.runtime.geometry import GeometrySettings
from phasestream.stages.refine.stage import RefineConfig

_INGEST_STAGES = ("ingest",)
_REFINE_STAGES = ("refine",)


@dataclass(frozen=True)
class ScanOptions:
    """Per-pipeline scan settings from the command line; None leaves the topology's value."""

    initial_probe: str | None = None
    energy_kev: float | None = None
    detector_distance_m: float | None = None
    pixel_size_m: float | None = None
    beam_centre_px: tuple[float, float] | None = None
    window_px: int | None = None
    mask_file: str | None = None

    def geometry(self) -> dict[str, Any]:
        values = {
            "energy_kev": self.energy_kev,
            "detector_distance_m": self.detector_distance_m,
            "pixel_size_m": self.pixel_size_m,
            "beam_centre_px": self.beam_centre_px,
            "window_px": self.window_px,
            "mask_file": self.mask_file,
        }
        return {name: value for name, value in values.items() if value is not None}


def with_scan_options(pipeline: PipelineConfig, options: ScanOptions) -> PipelineConfig:
    """The pipeline with ``options`` written into its ingest and refine stages, validated."""
    geometry = options.geometry()
    if options.initial_probe is not None and not _stages_of(pipeline, _REFINE_STAGES):
        raise ConfigError(
            f"--probe {options.initial_probe}: pipeline {pipeline.name!r} has no refine stage to use it"
        )
    if geometry and not _stages_of(pipeline, _INGEST_STAGES):
        raise ConfigError(
            f"geometry options {sorted(geometry)}: pipeline {pipeline.name!r} has no ingest stage for them"
        )
    stages = []
    for spec in pipeline.stages:
        config = dict(spec.config)
        if spec.stage in _REFINE_STAGES and options.initial_probe is not None:
            config["initial_probe"] = options.initial_probe
            _check_refine(spec, config)
        if spec.stage in _INGEST_STAGES and geometry:
            config["geometry"] = {**config.get("geometry", {}), **geometry}
            _check_geometry(spec, config["geometry"])
        stages.append(spec.model_copy(update={"config": config}))
    return pipeline.model_copy(update={"stages": stages})


def _stages_of(pipeline: PipelineConfig, kinds: tuple[str, ...]) -> list[StageSpec]:
    return [spec for spec in pipeline.stages if spec.stage in kinds]


def _check_refine(spec: StageSpec, config: dict[str, Any]) -> None:
    try:
        RefineConfig(**config)
    except ValidationError as error:
        raise ConfigError(f"stage {spec.name!r}: {format_validation_error(error)}") from None


def _check_geometry(spec: StageSpec, geometry: dict[str, Any]) -> None:
    try:
        GeometrySettings(**geometry)
    except ValidationError as error:
        raise ConfigError(f"stage {spec.name!r} geometry: {format_validation_error(error)}") from None

"""The strict configuration tree: a pipeline YAML, overridable by ``PHASESTREAM_`` environment variables.

Nested fields use ``__``: ``PHASESTREAM_TILED__URI=http://host:8000`` overrides ``tiled.uri``.
Environment variables win over the YAML, so one topology file serves every beamline host.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from phasestream.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TiledSettings(StrictModel):
    uri: str | None = Field(default=None, description="Existing Tiled server; None starts an embedded one")
    api_key: str | None = Field(default=None, description="API key; generated for the embedded server")
    data_dir: Path = Field(default=Path("phasestream-data"), description="Embedded server's catalog")


class DetectorSettings(StrictModel):
    """Where the detector (or its simulator) streams. The detector binds; ingest connects."""

    data_endpoint: str = "tcp://127.0.0.1:31001"
    positions_endpoint: str = "tcp://127.0.0.1:31002"


class StageSpec(StrictModel):
    """One stage of the topology: which implementation, how many workers, its own config."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    stage: str = Field(description="registry name (ingest, binning, ...) or 'module:attr'")
    workers: int = Field(default=1, ge=1, le=64)
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0: any free port; worker i adds i")
    config: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(BaseSettings):
    """A whole topology. The stages form a chain in the order given."""

    model_config = SettingsConfigDict(
        env_prefix="PHASESTREAM_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: Path = Field(default=Path("phasestream-data/run"), description="ipc sockets and logs")
    high_water_mark: int = Field(default=16, ge=1, description="messages queued per socket before blocking")
    exit_after_scan: bool = Field(default=False, description="stages exit after one scan (demo, tests)")
    tiled: TiledSettings = Field(default_factory=TiledSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    stages: list[StageSpec] = Field(min_length=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment before init: the YAML is passed as init kwargs, and the environment must win.
        return env_settings, init_settings

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {duplicates}")
        return stages

    @model_validator(mode="after")
    def _run_dir_short_enough(self) -> PipelineConfig:
        # ipc:// paths are limited to about 107 bytes by the kernel (sun_path).
        longest = max(len(f"{s.name}-{s.workers - 1}.sock") for s in self.stages)
        if len(str(self.run_dir.absolute())) + longest + 8 > 107:
            raise ValueError(
                f"run_dir {self.run_dir.absolute()} is too long for ipc:// socket paths (107 bytes); "
                "choose a shorter run_dir"
            )
        return self

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"no stage named {name!r} in pipeline {self.name!r}; stages are {[s.name for s in self.stages]}"
        )

    def config_hash(self) -> str:
        """A short hash of what shapes the result (stages and their configs), for provenance."""
        payload = json.dumps([s.model_dump(mode="json") for s in self.stages], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_pipeline(path: Path | str, **overrides: Any) -> PipelineConfig:
    """Read a pipeline YAML (or the JSON the launcher writes) and validate it, environment overrides last."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"pipeline file {path} does not exist; see deploy/*.yaml for examples") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline file {path} must hold a mapping with a 'stages' list")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_pipeline(data, source=str(path))


def validate_pipeline(data: dict[str, Any], source: str = "pipeline") -> PipelineConfig:
    try:
        return PipelineConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {format_validation_error(exc)}") from exc


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: where, what was given, what is wrong."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (given {given!r})"
        lines.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(lines)

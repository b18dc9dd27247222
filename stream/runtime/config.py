"""The strict configuration tree: a pipeline YAML, overridable by ``PHASESTREAM_`` environment variables.

Nested fields use ``__``: ``PHASESTREAM_TILED__URI=http://host:8000`` overrides ``tiled.uri``.
Environment variables win over the YAML, so one topology file serves every beamline host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from phasestream.errors import ConfigError
from phasestream.runtime.curve import CurveSettings

# Names under hosts: (they also name control sockets and systemd instances).
_HOST_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
# A DNS label sequence (RFC 1123): what a peer may connect to instead of an IP, e.g. a Kubernetes Service.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TiledSettings(StrictModel):
    uri: str | None = Field(default=None, description="Existing Tiled server; None starts an embedded one")
    # repr=False: a config printed or logged never shows the key.
    api_key: str | None = Field(
        default=None, repr=False, description="API key; generated for the embedded server"
    )
    api_key_file: Path | None = Field(
        default=None, description="file holding the API key (mode 0600); else api_key or the environment"
    )
    data_dir: Path = Field(default=Path("phasestream-data"), description="Embedded server's catalog")

    @model_validator(mode="after")
    def _key_from_file(self) -> TiledSettings:
        if self.api_key_file is None:
            return self
        key = read_secret_file(self.api_key_file, what="Tiled API key")
        # The launcher's pipeline.json holds both, the same key: only two different keys are a conflict.
        if self.api_key is not None and self.api_key != key:
            raise ValueError(
                f"tiled.api_key and tiled.api_key_file ({self.api_key_file}) give two different keys: "
                "give only one (PHASESTREAM_TILED__API_KEY or the file)"
            )
        self.api_key = key
        return self


def read_secret_file(path: Path, what: str) -> str:
    """The first line of a file that only its owner may read; the value itself never enters a message."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(
                f"the {what} file {path} is readable by other users (mode {stat.S_IMODE(mode):o}): "
                f"run `chmod 600 {path}`"
            )
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(
            f"cannot read the {what} file {path} ({exc.strerror}): give a readable file"
        ) from None
    if not lines or not lines[0].strip():
        raise ValueError(f"the {what} file {path} is empty: write the key on its first line")
    return lines[0].strip()


class DetectorSettings(StrictModel):
    """Where the detector (or its simulator) streams. The detector binds; ingest connects."""

    data_endpoint: str = "tcp://127.0.0.1:31001"
    positions_endpoint: str = "tcp://127.0.0.1:31002"


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


class HostSpec(StrictModel):
    """A machine (or container) that runs some stages; their inboxes listen on its address over tcp."""

    address: str = Field(description="IP address or DNS name the other hosts connect to")
    bind_address: str | None = Field(
        default=None,
        description="IP address the inboxes bind; default: address (0.0.0.0 in a container behind a Service)",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, address: str) -> str:
        if not (_is_ip(address) or _DNS_NAME.fullmatch(address)):
            raise ValueError(
                f"{address!r} is neither an IP address nor a host name: give the address that the other "
                "hosts reach this one at, e.g. 10.0.0.12 or refine.beamline.local"
            )
        return address

    @field_validator("bind_address")
    @classmethod
    def _bind_ip(cls, address: str | None) -> str | None:
        if address is not None and not _is_ip(address):
            raise ValueError(
                f"bind_address {address!r} is not an IP address: give an interface's address, or 0.0.0.0 "
                "for every interface"
            )
        return address

    @model_validator(mode="after")
    def _bindable(self) -> HostSpec:
        # ZeroMQ binds to interfaces, not names: a name needs the IP to bind spelled out.
        if self.bind_address is None and not _is_ip(self.address):
            raise ValueError(
                f"address {self.address!r} is a name, which a socket cannot bind: add bind_address "
                "(this host's IP, or 0.0.0.0 in a container)"
            )
        return self

    @property
    def listen_address(self) -> str:
        return self.bind_address or self.address


class StageSpec(StrictModel):
    """One stage of the topology: which implementation, how many workers, its own config."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    stage: str = Field(description="registry name (ingest, binning, ...) or 'module:attr'")
    workers: int = Field(default=1, ge=1, le=64)
    host: str | None = Field(
        default=None,
        description="a name under hosts: the stage runs there; None: ipc:// on the launcher's host",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="with host: worker k's inbox listens on tcp port+k"
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0: any free port; worker i adds i")
    metrics_address: str = Field(
        default="127.0.0.1", description="address /metrics binds; another than loopback exposes it"
    )
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metrics_address")
    @classmethod
    def _ip_address(cls, address: str) -> str:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(
                f"{address!r} is not an IP address: use 127.0.0.1 (the default), an interface's address, "
                "or 0.0.0.0 for every interface"
            ) from None
        return address


class RestartSettings(StrictModel):
    """What the launcher does when a stage worker dies while the pipeline runs."""

    max_restarts: int = Field(default=3, ge=0, le=100, description="per worker; 0: never restart")
    backoff_s: float = Field(
        default=1.0, ge=0, description="wait before the first restart, doubled each time"
    )
    max_backoff_s: float = Field(default=30.0, ge=0, description="longest wait between restarts")


def user_run_root() -> Path:
    """Where this user's pipelines keep their run directories by default: private to the user.

    ``$XDG_RUNTIME_DIR/phasestream`` when that directory is this user's own and private (as systemd makes
    it), else ``<tmp>/phasestream-<uid>``. The launcher creates it with mode 0700 and refuses one that
    another user owns.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and _private_to_user(Path(runtime)):
        return Path(runtime) / "phasestream"
    return Path(tempfile.gettempdir()) / f"phasestream-{os.getuid()}"


def _private_to_user(directory: Path) -> bool:
    try:
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)


def default_run_dir(name: str) -> Path:
    """The run directory of pipeline ``name`` when its YAML gives none: one per user and pipeline name."""
    return user_run_root() / name


class PipelineConfig(BaseSettings):
    """A whole topology. The stages form a chain in the order given."""

    model_config = SettingsConfigDict(
        env_prefix="PHASESTREAM_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    name: str = Field(default="pipeline", pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: Path = Field(
        # Per user: a fixed path such as /tmp/phasestream-live would be shared by every user of the host.
        default_factory=lambda data: default_run_dir(data.get("name", "pipeline")),
        description="ipc sockets, logs and the launcher's lock; default <user_run_root()>/<name>",
    )
    high_water_mark: int = Field(default=16, ge=1, description="messages queued per socket before blocking")
    exit_after_scan: bool = Field(default=False, description="stages exit after one scan (demo, tests)")
    scan_end_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="close a scan that some but not all upstream workers ended after this long without "
        "a message for it (a worker died holding its ScanEnd)",
    )
    restarts: RestartSettings = Field(default_factory=RestartSettings)
    tiled: TiledSettings = Field(default_factory=TiledSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    hosts: dict[str, HostSpec] = Field(
        default_factory=dict,
        description="where stages run when not all on one host; see deploy/multihost.yaml",
    )
    curve: CurveSettings | None = Field(default=None, description="CurveZMQ on every tcp stage socket")
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

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts: dict[str, HostSpec]) -> dict[str, HostSpec]:
        bad = sorted(name for name in hosts if not _HOST_KEY.fullmatch(name))
        if bad:
            raise ValueError(f"host names {bad} may hold only lower-case letters, digits, '_' and '-'")
        return hosts

    @model_validator(mode="after")
    def _placement(self) -> PipelineConfig:
        """Every stage on a declared host, with a port, and no two inboxes on one host:port."""
        for spec in self.stages:
            if spec.host is not None and spec.host not in self.hosts:
                raise ValueError(
                    f"stage {spec.name!r} is placed on host {spec.host!r}, which is not under hosts "
                    f"({sorted(self.hosts)}): add it there with its address, or fix the name"
                )
            if spec.host is None and spec.port is not None:
                raise ValueError(
                    f"stage {spec.name!r} has port {spec.port} but no host: a port applies only to a stage "
                    "placed on a host (add host: NAME), else drop it"
                )
        if not self.hosts:
            return self
        unplaced = [s.name for s in self.stages if s.host is None]
        if unplaced:
            # An ipc:// inbox is reachable only from its own host, which a launcher elsewhere cannot know.
            raise ValueError(
                f"the pipeline declares hosts, so every stage needs one; stages {unplaced} have none: "
                f"add host: NAME (one of {sorted(self.hosts)})"
            )
        taken: dict[tuple[str, int], str] = {}
        for spec in self.stages[1:]:  # the first stage is the source: it has no inbox
            if spec.port is None:
                raise ValueError(
                    f"stage {spec.name!r} on host {spec.host!r} has no port: add port: N (worker k's inbox "
                    "listens on tcp port N+k)"
                )
            if spec.port + spec.workers - 1 > 65535:
                raise ValueError(
                    f"stage {spec.name!r}: port {spec.port} + {spec.workers} workers runs past 65535: "
                    "choose a lower port"
                )
            for port in range(spec.port, spec.port + spec.workers):
                other = taken.setdefault((str(spec.host), port), spec.name)
                if other != spec.name:
                    raise ValueError(
                        f"stages {other!r} and {spec.name!r} both listen on {spec.host}:{port} (worker k "
                        f"uses port+k): give {spec.name!r} a port outside the other's range"
                    )
        return self

    @model_validator(mode="after")
    def _run_dir_short_enough(self) -> PipelineConfig:
        # ipc:// paths are limited to about 107 bytes by the kernel (sun_path).
        names = [f"{s.name}-{s.workers - 1}.sock" for s in self.stages]
        names += [f"control-{host}.sock" for host in self.hosts]
        longest = max(len(name) for name in names)
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
        # Where a stage runs does not shape the result.
        stages = [s.model_dump(mode="json", exclude={"host", "port"}) for s in self.stages]
        payload = json.dumps(stages, sort_keys=True)
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

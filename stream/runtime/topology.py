"""Where each stage worker listens and whom it sends to, computed from the pipeline config alone.

The launcher and a stage started by hand (``phasestream stage NAME``) derive the same endpoints, so
a topology needs no registry service: the YAML is the single source of truth.

A stage without a host listens on ``ipc://<run_dir>/<stage>-<worker>.sock`` on the launcher's host. A
stage placed on a host (``hosts:`` in the YAML, ``host:`` and ``port:`` on the stage) listens on
``tcp://<bind address>:<port + worker>`` there, and its upstream connects to ``<address>:<port + worker>``.

Control stays on each host: every host's launcher binds its own ``ipc://<run_dir>/control-<host>.sock``
and hears only its own workers, so status never crosses the network and a host can restart its workers
without asking the others. The per-host name keeps launchers apart even where hosts share ``run_dir``
(an NFS home, or network namespaces on one machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from phasestream.errors import ConfigError
from phasestream.runtime.config import PipelineConfig, StageSpec


@dataclass(frozen=True)
class WorkerPlacement:
    spec: StageSpec
    worker: int
    input_endpoint: str | None  # what this worker binds
    output_endpoints: tuple[str, ...]  # what it connects to: one per downstream worker
    upstream_workers: int
    control_endpoint: str
    metrics_port: int
    metrics_address: str = "127.0.0.1"
    downstream: str | None = None  # the next stage's name: its public key secures the outputs

    @property
    def is_source(self) -> bool:
        return self.input_endpoint is None

    @property
    def label(self) -> str:
        return f"{self.spec.name}.{self.worker}"


def _tcp(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def input_endpoint(pipeline: PipelineConfig, stage: StageSpec, worker: int, *, bind: bool = False) -> str:
    """Worker ``worker``'s inbox: the address it binds (``bind``) or the one its upstream connects to."""
    if stage.host is None or stage.port is None:
        return f"ipc://{pipeline.run_dir.absolute()}/{stage.name}-{worker}.sock"
    host = pipeline.hosts[stage.host]
    return _tcp(host.listen_address if bind else host.address, stage.port + worker)


def control_endpoint(pipeline: PipelineConfig, host: str | None = None) -> str:
    """The control socket of the launcher on ``host`` (None: a pipeline without hosts)."""
    name = "control.sock" if host is None else f"control-{host}.sock"
    return f"ipc://{pipeline.run_dir.absolute()}/{name}"


def stages_on(pipeline: PipelineConfig, host: str | None) -> list[StageSpec]:
    """The stages the launcher on ``host`` runs; None: every stage, all on this machine."""
    if host is None:
        return list(pipeline.stages)
    if host not in pipeline.hosts:
        raise ConfigError(
            f"--host {host!r} is not a host of pipeline {pipeline.name!r}; its hosts are "
            f"{sorted(pipeline.hosts)}: pass one of them, or no --host to run every stage here"
        )
    stages = [spec for spec in pipeline.stages if spec.host == host]
    if not stages:
        raise ConfigError(
            f"no stage of pipeline {pipeline.name!r} is placed on host {host!r}: add host: {host} to a "
            "stage, or start the launchers of the other hosts only"
        )
    return stages


def place(pipeline: PipelineConfig, stage_name: str, worker: int) -> WorkerPlacement:
    """The placement of one worker; the first stage of the chain is the source (it faces the detector)."""
    spec = pipeline.stage(stage_name)
    index = pipeline.stages.index(spec)
    downstream = pipeline.stages[index + 1] if index + 1 < len(pipeline.stages) else None
    upstream = pipeline.stages[index - 1] if index > 0 else None
    return WorkerPlacement(
        spec=spec,
        worker=worker,
        input_endpoint=None if upstream is None else input_endpoint(pipeline, spec, worker, bind=True),
        output_endpoints=()
        if downstream is None
        else tuple(input_endpoint(pipeline, downstream, w) for w in range(downstream.workers)),
        upstream_workers=1 if upstream is None else upstream.workers,
        control_endpoint=control_endpoint(pipeline, spec.host),
        metrics_port=spec.metrics_port + worker if spec.metrics_port else 0,
        metrics_address=spec.metrics_address,
        downstream=None if downstream is None else downstream.name,
    )

"""Where each stage worker listens and whom it sends to, computed from the pipeline config alone.

The launcher and a stage started by hand (``phasestream stage NAME``) derive the same endpoints, so
a topology needs no registry service: the YAML is the single source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass

from phasestream.config import PipelineConfig, StageSpec


@dataclass(frozen=True)
class WorkerPlacement:
    spec: StageSpec
    worker: int
    input_endpoint: str | None
    output_endpoints: tuple[str, ...]
    upstream_workers: int
    control_endpoint: str
    metrics_port: int

    @property
    def is_source(self) -> bool:
        return self.input_endpoint is None

    @property
    def label(self) -> str:
        return f"{self.spec.name}.{self.worker}"


def input_endpoint(pipeline: PipelineConfig, stage: StageSpec, worker: int) -> str:
    return f"ipc://{pipeline.run_dir.absolute()}/{stage.name}-{worker}.sock"


def control_endpoint(pipeline: PipelineConfig) -> str:
    return f"ipc://{pipeline.run_dir.absolute()}/control.sock"


def place(pipeline: PipelineConfig, stage_name: str, worker: int) -> WorkerPlacement:
    """The placement of one worker; the first stage of the chain is the source (it faces the detector)."""
    spec = pipeline.stage(stage_name)
    index = pipeline.stages.index(spec)
    downstream = pipeline.stages[index + 1] if index + 1 < len(pipeline.stages) else None
    upstream = pipeline.stages[index - 1] if index > 0 else None
    return WorkerPlacement(
        spec=spec,
        worker=worker,
        input_endpoint=None if upstream is None else input_endpoint(pipeline, spec, worker),
        output_endpoints=()
        if downstream is None
        else tuple(input_endpoint(pipeline, downstream, w) for w in range(downstream.workers)),
        upstream_workers=1 if upstream is None else upstream.workers,
        control_endpoint=control_endpoint(pipeline),
        metrics_port=spec.metrics_port + worker if spec.metrics_port else 0,
    )

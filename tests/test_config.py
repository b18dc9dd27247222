"""The pipeline config: strict, environment overrides win, the shipped topologies validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from phasestream.config import load_pipeline, validate_pipeline
from phasestream.errors import ConfigError
from phasestream.registry import resolve_stage
from phasestream.topology import place

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_environment_overrides_the_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHASESTREAM_TILED__URI", "http://beamline-tiled:8000")
    monkeypatch.setenv("PHASESTREAM_HIGH_WATER_MARK", "4")
    config = validate_pipeline(
        {"tiled": {"uri": "http://yaml:1", "api_key": "k"}, "stages": [{"name": "ingest", "stage": "ingest"}]}
    )
    assert config.tiled.uri == "http://beamline-tiled:8000"
    assert config.tiled.api_key == "k"
    assert config.high_water_mark == 4


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"stages": [{"name": "a", "stage": "ingest", "colour": "red"}]}, "stages.0.colour: Extra inputs"),
        ({"stages": [{"name": "a", "stage": "ingest", "workers": 0}]}, "stages.0.workers"),
        ({"stages": [{"name": "a", "stage": "x"}, {"name": "a", "stage": "y"}]}, "repeated: ['a']"),
        ({"stages": []}, "stages"),
        ({"run_dir": "/tmp/" + "d" * 120, "stages": [{"name": "a", "stage": "x"}]}, "too long for ipc"),
    ],
)
def test_bad_configs_say_where_and_what(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        validate_pipeline(data)


@pytest.mark.parametrize("name", ["demo.yaml", "live.yaml"])
def test_shipped_topologies_validate_and_resolve(name: str) -> None:
    pipeline = load_pipeline(DEPLOY / name)
    for spec in pipeline.stages:
        stage_cls = resolve_stage(spec.stage)
        stage_cls.Config.model_validate(spec.config)
    first, last = place(pipeline, pipeline.stages[0].name, 0), place(pipeline, pipeline.stages[-1].name, 0)
    assert first.is_source and not last.output_endpoints


def test_fan_out_placement_counts_upstream_workers() -> None:
    pipeline = load_pipeline(DEPLOY / "live.yaml")
    binning = place(pipeline, "binning", 1)
    refine = place(pipeline, "refine", 0)
    assert binning.metrics_port == 9112
    assert refine.upstream_workers == 2
    assert len(place(pipeline, "ingest", 0).output_endpoints) == 2


def test_unknown_stage_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="use one of"):
        resolve_stage("refin")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_stage("no.such.module:Thing")

"""The pipeline config: strict, environment overrides win, the shipped topologies validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from phasestream.errors import ConfigError
from phasestream.runtime.config import load_pipeline, validate_pipeline
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.topology import place, stages_on

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


@pytest.mark.parametrize("name", ["demo.yaml", "replay.yaml", "live.yaml"])
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


def test_metrics_bind_loopback_unless_the_config_names_an_address() -> None:
    exposed = {"name": "b", "stage": "binning", "metrics_address": "0.0.0.0"}
    stages = [{"name": "a", "stage": "ingest"}, exposed]
    pipeline = validate_pipeline({"stages": stages})
    assert place(pipeline, "a", 0).metrics_address == "127.0.0.1"
    assert place(pipeline, "b", 0).metrics_address == "0.0.0.0"
    with pytest.raises(ConfigError, match=r"metrics_address.*not an IP address"):
        validate_pipeline({"stages": [{"name": "a", "stage": "ingest", "metrics_address": "every"}]})


KEY = "s3cretkey0123456789"


def _with_key_file(path: Path, mode: int) -> dict:
    path.write_text(KEY + "\n")
    path.chmod(mode)
    return {"tiled": {"api_key_file": str(path)}, "stages": [{"name": "a", "stage": "ingest"}]}


def test_the_tiled_api_key_comes_from_a_private_file_and_is_never_shown(tmp_path: Path) -> None:
    config = validate_pipeline(_with_key_file(tmp_path / "key", 0o600))
    assert config.tiled.api_key == KEY
    assert KEY not in repr(config) and KEY not in str(config.tiled)
    # The launcher's pipeline.json holds the resolved key and the file: read back, they agree.
    assert validate_pipeline(config.model_dump(mode="json")).tiled.api_key == KEY


def test_a_group_or_world_readable_key_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "key"
    with pytest.raises(ConfigError, match=f"{path} is readable by other users.*chmod 600 {path}") as info:
        validate_pipeline(_with_key_file(path, 0o644))
    assert KEY not in str(info.value)


def test_the_tiled_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PHASESTREAM_TILED__API_KEY", KEY)
    config = validate_pipeline({"stages": [{"name": "a", "stage": "ingest"}]})
    assert config.tiled.api_key == KEY and KEY not in repr(config)
    # A file with another key beside it is a conflict, said without either key.
    data = _with_key_file(tmp_path / "key", 0o600)
    (tmp_path / "key").write_text("anotherkey\n")
    with pytest.raises(ConfigError, match="two different keys") as info:
        validate_pipeline(data)
    assert KEY not in str(info.value) and "anotherkey" not in str(info.value)


# ---- stages on several hosts -------------------------------------------------------------------------


def _placed(**changes: dict) -> dict:
    """A two-host pipeline; ``changes`` replace stages by name."""
    stages = {
        "ingest": {"name": "ingest", "stage": "ingest", "host": "det"},
        "binning": {"name": "binning", "stage": "binning", "host": "gpu", "port": 41000, "workers": 2},
        "refine": {"name": "refine", "stage": "refine", "host": "gpu", "port": 42000},
    }
    stages.update(changes)
    hosts = {"det": {"address": "10.0.0.1"}, "gpu": {"address": "10.0.0.2"}}
    return {"run_dir": "/tmp/ps", "hosts": hosts, "stages": list(stages.values())}


def test_placed_stages_listen_on_their_host_and_connect_to_the_next() -> None:
    pipeline = validate_pipeline(_placed())
    ingest, binning, refine = (
        place(pipeline, name, w) for name, w in [("ingest", 0), ("binning", 1), ("refine", 0)]
    )
    assert ingest.is_source
    assert ingest.output_endpoints == ("tcp://10.0.0.2:41000", "tcp://10.0.0.2:41001")
    assert binning.input_endpoint == "tcp://10.0.0.2:41001"
    assert binning.output_endpoints == ("tcp://10.0.0.2:42000",) and binning.downstream == "refine"
    assert refine.upstream_workers == 2 and refine.downstream is None
    # Each host's launcher has its own control socket; a pipeline without hosts keeps control.sock.
    assert ingest.control_endpoint == "ipc:///tmp/ps/control-det.sock"
    assert refine.control_endpoint == "ipc:///tmp/ps/control-gpu.sock"
    assert [s.name for s in stages_on(pipeline, "gpu")] == ["binning", "refine"]
    assert [s.name for s in stages_on(pipeline, None)] == ["ingest", "binning", "refine"]
    with pytest.raises(ConfigError, match=r"--host 'cpu' is not a host.*\['det', 'gpu'\]"):
        stages_on(pipeline, "cpu")
    unplaced = validate_pipeline({"run_dir": "/tmp/ps", "stages": [{"name": "a", "stage": "ingest"}]})
    assert place(unplaced, "a", 0).control_endpoint == "ipc:///tmp/ps/control.sock"


def test_a_container_binds_every_interface_and_is_reached_by_its_service_name() -> None:
    data = _placed()
    data["hosts"]["gpu"] = {"address": "phasestream-gpu.beamline.svc", "bind_address": "0.0.0.0"}
    pipeline = validate_pipeline(data)
    assert place(pipeline, "refine", 0).input_endpoint == "tcp://0.0.0.0:42000"
    assert place(pipeline, "binning", 0).output_endpoints == ("tcp://phasestream-gpu.beamline.svc:42000",)
    data["hosts"]["gpu"] = {"address": "fd00::2"}
    assert place(validate_pipeline(data), "refine", 0).input_endpoint == "tcp://[fd00::2]:42000"


def test_placement_does_not_change_the_config_hash() -> None:
    placed = validate_pipeline(_placed())
    local = validate_pipeline({"stages": [s.model_dump(exclude={"host", "port"}) for s in placed.stages]})
    assert placed.config_hash() == local.config_hash()


@pytest.mark.parametrize(
    ("changes", "hosts", "fragment"),
    [
        (
            {"refine": {"name": "refine", "stage": "refine", "host": "gpu2", "port": 42000}},
            None,
            r"host 'gpu2', which is not under hosts \(\['det', 'gpu'\]\): add it",
        ),
        (
            {"refine": {"name": "refine", "stage": "refine", "host": "gpu"}},
            None,
            r"stage 'refine' on host 'gpu' has no port: add port: N",
        ),
        (
            {"refine": {"name": "refine", "stage": "refine", "host": "gpu", "port": 41001}},
            None,
            r"'binning' and 'refine' both listen on gpu:41001.*give 'refine' a port outside",
        ),
        (
            {"refine": {"name": "refine", "stage": "refine"}},
            None,
            r"stages \['refine'\] have none: add host: NAME",
        ),
        (
            {"refine": {"name": "refine", "stage": "refine", "host": "gpu", "port": 65535, "workers": 2}},
            None,
            "runs past 65535",
        ),
        (
            {},
            {"det": {"address": "10.0.0.1"}, "gpu": {"address": "gpu.local"}},
            r"'gpu.local' is a name, which a socket cannot bind: add bind_address",
        ),
        (
            {},
            {"det": {"address": "10.0.0.1"}, "gpu": {"address": "10.0.0.2", "bind_address": "any"}},
            r"bind_address 'any' is not an IP address",
        ),
        (
            {},
            {"det": {"address": "10.0.0.1"}, "gpu": {"address": "not an address!"}},
            r"'not an address!' is neither an IP address nor a host name",
        ),
        ({}, {"det": {"address": "10.0.0.1"}, "gpu": {"address": "10.0.0.2", "port": 1}}, "Extra inputs"),
    ],
)
def test_bad_placements_say_what_and_the_fix(changes: dict, hosts: dict | None, fragment: str) -> None:
    data = _placed(**changes)
    if hosts is not None:
        data["hosts"] = hosts
    with pytest.raises(ConfigError, match=fragment):
        validate_pipeline(data)


def test_a_port_without_a_host_is_refused() -> None:
    stages = [{"name": "a", "stage": "ingest"}, {"name": "b", "stage": "binning", "port": 41000}]
    with pytest.raises(ConfigError, match=r"stage 'b' has port 41000 but no host"):
        validate_pipeline({"stages": stages})


def test_the_multihost_example_validates_with_curve() -> None:
    pipeline = load_pipeline(DEPLOY / "multihost.yaml")
    assert pipeline.curve is not None and str(pipeline.curve.keys_dir) == "/etc/phasestream/keys"
    for spec in pipeline.stages:
        resolve_stage(spec.stage).Config.model_validate(spec.config)
    assert {spec.host for spec in pipeline.stages} == set(pipeline.hosts)
    ingest = place(pipeline, "ingest", 0)
    assert ingest.output_endpoints == ("tcp://10.0.0.12:41000", "tcp://10.0.0.12:41001")


def test_the_kubernetes_example_has_a_deployment_per_stage_and_gpus_where_they_are_used() -> None:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "phasestream.yaml").read_text()))
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in documents:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    pipeline = validate_pipeline(
        yaml.safe_load(by_kind["ConfigMap"]["phasestream-pipeline"]["data"]["pipeline.yaml"])
    )
    assert pipeline.curve is not None
    assert sorted(by_kind["Deployment"]) == sorted(f"phasestream-{s.name}" for s in pipeline.stages)
    gpu_stages = {"inversion", "refine", "denoise"}
    for spec in pipeline.stages:
        resolve_stage(spec.stage).Config.model_validate(spec.config)
        pod = by_kind["Deployment"][f"phasestream-{spec.name}"]["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["args"] == ["run", "/etc/phasestream/pipeline.yaml", "--host", spec.host]
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (spec.name in gpu_stages)
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(spec.metrics_port)
        secret = next(v for v in pod["spec"]["volumes"] if "secret" in v)["secret"]
        private = [item["path"] for item in secret["items"] if item["path"].startswith("private/")]
        assert private == [f"private/{spec.name}.key_secret"]  # each pod holds only its own secret key
        if spec.port is None:
            continue
        host = pipeline.hosts[spec.host]
        service = by_kind["Service"][host.address]
        assert [p["port"] for p in service["spec"]["ports"]] == list(
            range(spec.port, spec.port + spec.workers)
        )
        assert service["spec"]["selector"] == pod["metadata"]["labels"]

"""Monitoring: the shipped Prometheus config, alert rules and Grafana dashboard, checked by the real tools.

Debian's ``prometheus`` and ``promtool`` binaries check the config, the rules and our exposition format,
unit-test every alert on synthetic series, and scrape a running pipeline on loopback, where every
dashboard query is evaluated too. Without them these tests fail (not skip) and say how to install them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, generate_latest

from phasestream.apps.launch.launcher import Launcher
from phasestream.runtime import metrics
from phasestream.runtime.config import PipelineConfig, load_pipeline
from phasestream.runtime.topology import place
from phasestream.simulators.scan_file import save_scan
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
INSTALL_HINT = (
    "is not installed: these tests run Debian's real Prometheus. "
    "Install it with `sudo apt-get install --no-install-recommends prometheus` (it provides prometheus "
    "and promtool; the service it registers need not run)"
)
N_POSITIONS = 40
# Dashboard panels whose queries must return series from a pipeline that ran one clean scan. The others
# show drops and rejections (none in a clean scan) and the R-factor (set by the solver stage).
PANELS_WITH_DATA = {
    "Workers up",
    "Throughput per stage",
    "Queue depth",
    "End-to-end latency",
    "Stage processing time",
    "Solver iteration rate",
    "Fourier R-factor",
    "Tiled publish time",
}
ALERTS = {
    "PhasestreamFramesDropped",
    "PhasestreamMessagesRejected",
    "PhasestreamStageDown",
    "PhasestreamLatencyHigh",
    "PhasestreamQueueSaturated",
}


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} {INSTALL_HINT}", pytrace=False)
    return path


def _promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [_binary("promtool"), *args], input=stdin, capture_output=True, timeout=60, cwd=cwd
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, f"promtool {' '.join(args)} failed ({result.returncode}):\n{output}"
    return output


def _wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` and its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not seen within {timeout_s:.0f} s; last: {value!r}")
        time.sleep(0.2)


def _sample_names() -> set[str]:
    """The names of every series phasestream exports, with the suffixes the client adds."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    collectors = [c for c in vars(metrics).values() if isinstance(c, Counter | Gauge | Histogram)]
    return {
        family.name + suffix
        for collector in collectors
        for family in collector.describe()
        for suffix in suffixes[family.type]
    }


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "phasestream-dashboard.json").read_text())


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


# ---- the shipped files ------------------------------------------------------------------------------


def test_shipped_config_scrapes_every_worker_of_the_live_topology() -> None:
    pipeline = load_pipeline(DEPLOY / "live.yaml")
    expected = {
        (f"127.0.0.1:{place(pipeline, spec.name, w).metrics_port}", spec.name, str(w))
        for spec in pipeline.stages
        for w in range(spec.workers)
    }
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    scraped = {
        (target, group["labels"]["stage"], group["labels"]["worker"])
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert scraped == expected
    assert {group["labels"]["pipeline"] for group in job["static_configs"]} == {pipeline.name}
    assert config["rule_files"] == ["alerts.yml"]
    # promtool resolves rule_files beside the config and checks them as well.
    output = _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert "5 rules found" in output


def test_alert_rules_pass_promtool_and_name_every_alert() -> None:
    output = _promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert "SUCCESS: 5 rules found" in output
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        used = set(re.findall(r"phasestream_\w+", rule["expr"]))
        assert used <= _sample_names(), f"{rule['alert']} uses unknown series {used - _sample_names()}"


# Synthetic series, one per scenario, evaluated by `promtool test rules` with the shipped rules. Each
# alert has a case that must fire and one that must not.
RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      # A stage's first drops: the series appears at 60 s already at 3 (increase() alone misses this).
      - series: 'phasestream_frames_dropped_total{{pipeline="live",
          stage="binning",worker="0",reason="position"}}'
        values: '_ _ _ _ 3x40'
      # One rejection per 15 s from 2m15s: 11 by 5m, all inside the 5-minute window.
      - series: 'phasestream_messages_rejected_total{{pipeline="live",
          stage="ingest",worker="0",reason="wire_format"}}'
        values: '0x8 0+1x32'
      - series: 'up{{job="phasestream",pipeline="live",stage="refine",worker="0",instance="127.0.0.1:9121"}}'
        values: '1 1 0x38'
      - series: 'up{{job="phasestream",pipeline="live",stage="ingest",worker="0",instance="127.0.0.1:9101"}}'
        values: '1x40'
      # refine: every frame takes 5-10 s from ingest; binning: all under 1 s.
      - series: 'phasestream_end_to_end_latency_seconds_bucket{{pipeline="live",
          stage="refine",worker="0",le="1"}}'
        values: '0x40'
      - series: 'phasestream_end_to_end_latency_seconds_bucket{{pipeline="live",
          stage="refine",worker="0",le="5"}}'
        values: '0x40'
      - series: 'phasestream_end_to_end_latency_seconds_bucket{{pipeline="live",
          stage="refine",worker="0",le="10"}}'
        values: '0+10x40'
      - series: 'phasestream_end_to_end_latency_seconds_bucket{{pipeline="live",
          stage="refine",worker="0",le="+Inf"}}'
        values: '0+10x40'
      - series: 'phasestream_end_to_end_latency_seconds_bucket{{pipeline="live",
          stage="binning",worker="0",le="1"}}'
        values: '0+10x40'
      - series: 'phasestream_end_to_end_latency_seconds_bucket{{pipeline="live",
          stage="binning",worker="0",le="+Inf"}}'
        values: '0+10x40'
      - series: 'phasestream_queue_depth{{pipeline="live",stage="refine",worker="0"}}'
        values: '16 20 16x38'
      - series: 'phasestream_queue_depth{{pipeline="live",stage="binning",worker="0"}}'
        values: '3 30 1x38'
    alert_rule_test:
      - eval_time: 90s
        alertname: PhasestreamFramesDropped
        exp_alerts:
          - exp_labels: {{severity: warning, pipeline: live, stage: binning, reason: position}}
            exp_annotations:
              summary: binning dropped frames (position)
              description: >-
                Stage binning of pipeline live could not use 3 frames in the last 5 minutes, reason
                position. The stage's log (run_dir/logs/<stage>.<worker>.log) says which frames and how
                to fix it; the scan's ScanEnd accounting counts them too.
      # No drops since: quiet once the first ones leave the 5-minute window.
      - eval_time: 9m
        alertname: PhasestreamFramesDropped
        exp_alerts: []
      - eval_time: 5m
        alertname: PhasestreamMessagesRejected
        exp_alerts:
          - exp_labels: {{severity: warning, pipeline: live, stage: ingest, reason: wire_format}}
            exp_annotations:
              summary: ingest rejected messages (wire_format)
              description: >-
                Stage ingest of pipeline live rejected 11 messages in the last 5 minutes, reason
                wire_format: bad input or an internal error. See the stage's log for the message and the
                fix.
      - eval_time: 45s
        alertname: PhasestreamStageDown
        exp_alerts: []
      - eval_time: 2m
        alertname: PhasestreamStageDown
        exp_alerts:
          - exp_labels:
              {{severity: critical, job: phasestream, pipeline: live, stage: refine, worker: "0",
               instance: "127.0.0.1:9121"}}
            exp_annotations:
              summary: refine worker 0 is down
              description: >-
                Prometheus cannot scrape 127.0.0.1:9121 (refine.0 of pipeline live) for 30 s: the worker
                died or hangs, and its upstream is blocked. Read run_dir/logs/refine.0.log and restart the
                pipeline.
      - eval_time: 1m
        alertname: PhasestreamLatencyHigh
        exp_alerts: []
      - eval_time: 5m
        alertname: PhasestreamLatencyHigh
        exp_alerts:
          - exp_labels: {{severity: warning, pipeline: live, stage: refine}}
            exp_annotations:
              summary: "refine: 95 % of frames take over 5 s from ingest"
              description: >-
                The 95th percentile of the time from a frame's arrival at ingest to its use by refine
                (pipeline live) is 9.8 s. A stage upstream of it is the bottleneck: see
                PhasestreamQueueSaturated and the dashboard's queue depth; add workers to that stage or
                lower the detector's frame rate.
      - eval_time: 5m
        alertname: PhasestreamQueueSaturated
        exp_alerts:
          - exp_labels: {{severity: warning, pipeline: live, stage: refine, worker: "0"}}
            exp_annotations:
              summary: refine worker 0 cannot keep up
              description: >-
                refine.0 of pipeline live has found on average 16 messages waiting for 2 minutes: its inbox
                is full and upstream stages are blocked. Add workers to refine in the pipeline YAML.
"""


def test_every_alert_fires_on_its_scenario_and_stays_quiet_otherwise(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(DEPLOY / "alerts.yml"))))
    output = _promtool("test", "rules", str(tests))
    assert "SUCCESS" in output
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS))
    assert tested == ALERTS


def test_exposition_of_every_phasestream_metric_passes_promtool() -> None:
    labels = {"stage": "prometheus_test", "worker": "0"}
    for collector in (metrics.FRAMES_DROPPED, metrics.MESSAGES_REJECTED):
        collector.labels(reason="test", **labels).inc()
    for collector in (metrics.FRAMES_RECEIVED, metrics.FRAMES_SENT, metrics.ITERATIONS):
        collector.labels(**labels).inc()
    for collector in (metrics.PROCESS_SECONDS, metrics.END_TO_END_LATENCY, metrics.PUBLISH_SECONDS):
        collector.labels(**labels).observe(0.01)
    metrics.QUEUE_DEPTH.labels(**labels).set(3)
    metrics.FOURIER_R_FACTOR.labels(**labels).set(0.12)
    metrics.RESULTS_PENDING.labels(**labels).set(1)
    metrics.WORKER_RESTARTS.labels(**labels).inc()
    metrics.SCANS_TIMED_OUT.labels(reason="test", **labels).inc()
    text = generate_latest()
    assert b'phasestream_fourier_r_factor{stage="prometheus_test",worker="0"} 0.12' in text
    assert {name for name in _sample_names() if name.encode() + b"{" not in text} == set()
    # Silent with rc 0 when clean; it names the metric and the rule it breaks otherwise.
    assert _promtool("check", "metrics", stdin=text) == ""


def test_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable() -> None:
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["pipeline"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    assert titles >= PANELS_WITH_DATA | {"Fourier R-factor", "Frames dropped and messages rejected"}
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids) >= 1, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    # Panels never overlap on Grafana's 24-column grid.
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells))
    for title, expr in _dashboard_queries():
        used = set(re.findall(r"phasestream_\w+", expr))
        assert used <= _sample_names(), f"panel {title!r} uses unknown series {used - _sample_names()}"
        assert 'pipeline=~"$pipeline"' in expr, f"panel {title!r} ignores the pipeline variable"


# ---- the real Prometheus against a running pipeline -------------------------------------------------


@contextmanager
def _prometheus(config: dict[str, Any], directory: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``prometheus`` on a free loopback port; yield its base URL once ``/-/ready`` answers 200."""
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = directory / "prometheus.log"
    command = [
        _binary("prometheus"),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={directory / 'data'}",
        # Port 0: the kernel picks a free port, and Prometheus logs the address it got.
        "--web.listen-address=127.0.0.1:0",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:

        def listening() -> str | None:
            assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
            found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', log_path.read_text())
            return found and found.group(1)

        base = f"http://{_wait_for(listening, timeout_s, 'prometheus listening')}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(ready, timeout_s, "prometheus /-/ready")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def _panels_with_data(base: str, pipeline_name: str) -> set[str]:
    """Titles of the dashboard panels whose queries return series, as Grafana would send them."""
    titles = set()
    for title, expr in _dashboard_queries():
        concrete = expr.replace("$pipeline", pipeline_name).replace("$__rate_interval", "10s")
        if _query(base, concrete):
            titles.add(title)
    return titles


SMALL_PIPELINE_STAGES = [
    {"name": "ingest", "stage": "ingest", "config": {"batch_size": 8}},
    {"name": "binning", "stage": "binning", "workers": 2},
    {
        "name": "refine",
        "stage": "refine",
        "config": {
            "min_positions": 20,
            "epochs_after_scan": 4,
            "emit_every_epochs": 2,
            "probe_search_epochs": 0,
            "execution": {"num_threads": 1},
        },
    },
    {"name": "publish", "stage": "publish"},
]


def _scrape_config(pipeline: PipelineConfig, launcher: Launcher, rules: Path) -> dict[str, Any]:
    """The shipped config with this pipeline's workers as targets: same job, labels and rules."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [
        {
            "targets": [f"127.0.0.1:{worker.metrics_port}"],
            "labels": {"pipeline": pipeline.name, "stage": stage, "worker": index},
        }
        for label, worker in launcher.workers.items()
        for stage, index in [label.split(".")]
    ]
    return config


@pytest.mark.slow
def test_real_prometheus_scrapes_a_running_pipeline(
    launch_pipeline, tmp_path: Path, short_run_dir: Path
) -> None:
    _binary("prometheus")
    run_dir = short_run_dir
    scan = simulate_scan(
        ScanSimulationConfig(
            detector_size_px=64,
            probe_diameter_px=24,
            probe_bright_field_diameter_px=32,
            n_positions=N_POSITIONS,
        )
    )
    save_scan(scan, run_dir / "scan.npz")
    with launch_pipeline("promtest", SMALL_PIPELINE_STAGES) as running:
        pipeline, launcher = running.config, running.launcher
        config = _scrape_config(pipeline, launcher, DEPLOY / "alerts.yml")
        with _prometheus(config, tmp_path) as base:
            emitter = subprocess.run(
                running.simulate_command(run_dir / "scan.npz", str(uuid.uuid4())),
                capture_output=True,
                timeout=60,
            )
            assert emitter.returncode == 0, emitter.stderr.decode()
            running.until_published(timeout_s=60)
            scraped = {
                label: httpx.get(f"http://127.0.0.1:{w.metrics_port}/metrics", timeout=5).content
                for label, w in launcher.workers.items()
            }

            def received_per_stage() -> dict[str, float] | None:
                result = _query(base, "sum by (stage) (phasestream_frames_received_total)")
                counts = {r["metric"]["stage"]: float(r["value"][1]) for r in result}
                frame_stages = {"ingest", "binning", "refine"}
                # publish's series (0: it receives reconstructions) may come one scrape later.
                done = (frame_stages | {"publish"}) <= set(counts) and all(
                    counts[s] >= N_POSITIONS for s in frame_stages
                )
                return counts if done else None

            received = _wait_for(received_per_stage, 20, "every frame counted in Prometheus")

            def up_per_worker() -> dict[str, str] | None:
                result = _query(base, f'up{{job="phasestream", pipeline="{pipeline.name}"}}')
                up = {f"{r['metric']['stage']}.{r['metric']['worker']}": r["value"][1] for r in result}
                return up if set(up) == set(launcher.workers) else None

            up = _wait_for(up_per_worker, 10, "a scrape of every worker")
            series = _query(base, "phasestream_frames_received_total")

            def rules_evaluated() -> list[dict[str, Any]] | None:
                groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                evaluated = all(not r["lastEvaluation"].startswith("0001") for r in rules)
                return rules if rules and evaluated else None

            rules = _wait_for(rules_evaluated, 10, "every alert rule evaluated")
            # The publisher writes to Tiled in its own thread: its series may need one more scrape.
            deadline = time.monotonic() + 20
            while True:
                without_data = PANELS_WITH_DATA - _panels_with_data(base, pipeline.name)
                if not without_data or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            firing = _query(base, 'ALERTS{alertstate="firing"}')

    # The counters as Prometheus stored them: the detector's 40 frames reached each frame stage once,
    # the two binning workers together; publish receives reconstructions, not frames.
    assert received == {"ingest": N_POSITIONS, "binning": N_POSITIONS, "refine": N_POSITIONS, "publish": 0}
    # Every worker answered its scrape, and each series kept one stage label (honor_labels).
    assert up == dict.fromkeys(launcher.workers, "1")
    assert all("exported_stage" not in s["metric"] and s["metric"]["job"] == "phasestream" for s in series)
    # The shipped rules loaded, evaluate without error on real data, and none fired on a clean scan.
    assert {rule["name"] for rule in rules} == ALERTS
    assert all(rule["health"] == "ok" for rule in rules), rules
    assert firing == []
    # Every dashboard query is valid PromQL here (_query checks the status) and the core panels show data.
    assert without_data == set()
    for label, text in scraped.items():
        assert _promtool("check", "metrics", stdin=text) == "", label

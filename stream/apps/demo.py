"""``phasestream demo``: a whole live scan on one machine, from a simulated SELUN to a picture.

It simulates a scan with its ground truth, starts an embedded Tiled server and the demo topology,
streams the scan from a separate emitter process over DECTRIS Stream V2, shows progress, and at the
end reads the final reconstruction back from Tiled, compares it with the truth and draws both.
"""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from phasestream.apps.demo_figure import compare_with_truth, draw_comparison
from phasestream.apps.launch.launcher import Launcher
from phasestream.apps.serve import tiled_for
from phasestream.errors import ConfigError, PhasestreamError
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import DetectorSettings, PipelineConfig, TiledSettings, load_pipeline
from phasestream.runtime.tiled.access import public_uri, read_api_key_file
from phasestream.simulators.scan_file import save_scan
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan

# The shipped topologies: package data, so an installed wheel finds them from any directory.
SHIPPED_TOPOLOGIES = Path(str(importlib.resources.files("phasestream.deploy")))


class DemoError(PhasestreamError):
    reason = "demo"


@dataclass
class DemoProgress:
    """What the control channel told us, with the times the key events arrived."""

    frames_received: int = 0
    first_frame_s: float | None = None
    iteration: int = 0
    fourier_error: float = float("nan")
    last_frame_s: float | None = None
    final_published_s: float | None = None
    accounting: dict[str, dict[str, int]] = field(default_factory=dict)
    frames_sent: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DemoOptions:
    """What ``phasestream demo`` lets the user choose; None takes the default of the scan's size."""

    out: Path = Path("phasestream-data")  # the data folder: run directory, Tiled data, the picture
    large: bool = False  # 900 positions and twice the epochs after the scan
    n_positions: int | None = None  # default 420, 900 when large
    rate_hz: float | None = None  # detector frame rate; default 30 Hz, so that refine runs live
    epochs_after_scan: int | None = None  # default: the topology's, doubled when large
    pipeline_file: Path | None = None  # default: the shipped deploy/demo.yaml
    tiled_uri: str | None = None  # default: the topology's, else an embedded server
    tiled_api_key_file: Path | None = None  # a private file; default: the topology's key

    @property
    def positions(self) -> int:
        """The scan's positions: ``n_positions``, else 420, or 900 when large."""
        return self.n_positions or (900 if self.large else 420)


def run_demo(options: DemoOptions) -> int:
    """Simulate a scan, reconstruct it live through the demo topology, and report against the truth."""

    out = options.out
    n_positions = options.positions
    rate_hz = options.rate_hz or 30.0
    pipeline = _demo_pipeline(options)
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)

    print(f"Simulating a {n_positions}-position Fermat-spiral scan on a 192×192 SELUN ...")
    scan = simulate_scan(ScanSimulationConfig(n_positions=n_positions, seed=0))
    scan_file = pipeline.run_dir / "scan.npz"
    save_scan(scan, scan_file)
    scan_uid = str(uuid.uuid4())

    with tiled_for(pipeline) as resolved:
        tiled_uri = public_uri(resolved.tiled.uri)  # never the key, even when it came in the URI
        print(f"Tiled server: {tiled_uri}  (API key in {resolved.run_dir / 'pipeline.json'})")
        print("Starting stages: " + " → ".join(s.name for s in resolved.stages))
        mosaic = FirstArrival(resolved.tiled.uri, resolved.tiled.api_key, scan_uid, "mosaic")
        with Launcher(resolved) as launcher:
            emitter = _start_emitter(resolved, scan_file, scan_uid, rate_hz)
            mosaic.start()
            try:
                print(f"Live result: {tiled_uri}/api/v1/metadata/reconstructions/{scan_uid}")
                progress = _follow(launcher, resolved, n_positions, emitter)
                launcher.wait_for_exit(30)
            finally:
                mosaic.stop()
                # On Ctrl-C or a failed stage the simulated detector must not go on streaming to nobody.
                if emitter.poll() is None:
                    emitter.terminate()
                emitter.wait(10)
        reconstruction = _read_back(resolved, scan_uid)
    return _report(scan, reconstruction, progress, mosaic.arrived_s, out)


class FirstArrival(threading.Thread):
    """Polls Tiled as a user's client would, and notes when a scan's ``node`` (the mosaic) first exists."""

    def __init__(
        self, uri: str, api_key: str | None, scan_uid: str, node: str, interval_s: float = 0.1
    ) -> None:
        super().__init__(name=f"first-{node}", daemon=True)
        self._uri, self._api_key = uri, api_key
        self._scan_uid, self._node, self._interval_s = scan_uid, node, interval_s
        self._done = threading.Event()
        self.arrived_s: float | None = None

    def run(self) -> None:
        from tiled.client import from_uri

        client = from_uri(self._uri, api_key=self._api_key)
        while not self._done.is_set():
            try:
                client["reconstructions"][self._scan_uid][self._node]
            except KeyError:
                self._done.wait(self._interval_s)
                continue
            self.arrived_s = time.monotonic()
            return

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def _demo_pipeline(options: DemoOptions) -> PipelineConfig:
    path = options.pipeline_file or SHIPPED_TOPOLOGIES / "demo.yaml"
    if not path.exists():
        raise ConfigError(f"demo topology {path} not found: pass --pipeline deploy/demo.yaml from a checkout")
    pipeline = load_pipeline(path)
    out = options.out
    run_dir = out / "run"
    stages = []
    for spec in pipeline.stages:
        if spec.stage == "refine":
            config = dict(spec.config)
            if options.epochs_after_scan is not None:
                config["epochs_after_scan"] = options.epochs_after_scan
            elif options.large:
                config["epochs_after_scan"] = 2 * config.get("epochs_after_scan", 40)
            spec = spec.model_copy(update={"config": config})
        stages.append(spec)
    key_file = options.tiled_api_key_file  # a private file; else the pipeline's key, from the environment
    tiled = TiledSettings(
        uri=options.tiled_uri or pipeline.tiled.uri,
        api_key=read_api_key_file(key_file) if key_file is not None else pipeline.tiled.api_key,
        data_dir=out / "tiled",
    )
    detector = DetectorSettings(
        data_endpoint=f"ipc://{run_dir.absolute()}/detector-data.sock",
        positions_endpoint=f"ipc://{run_dir.absolute()}/detector-positions.sock",
    )
    return pipeline.model_copy(
        update={
            "run_dir": run_dir,
            "tiled": tiled,
            "detector": detector,
            "exit_after_scan": True,
            "stages": stages,
        }
    )


def _start_emitter(
    pipeline: PipelineConfig, scan_file: Path, scan_uid: str, rate_hz: float
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "phasestream", "simulate", "--from", str(scan_file),
        "--data-endpoint", pipeline.detector.data_endpoint,
        "--positions-endpoint", pipeline.detector.positions_endpoint,
        "--rate-hz", str(rate_hz), "--scan-uid", scan_uid, "--no-progress",
    ]  # fmt: skip
    log = (pipeline.run_dir / "logs" / "emitter.log").open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _follow(
    launcher: Launcher, pipeline: PipelineConfig, n_frames: int, emitter: subprocess.Popen
) -> DemoProgress:
    progress = DemoProgress()
    source, solver, sink = pipeline.stages[0].name, "refine", pipeline.stages[-1].name
    frames_bar = tqdm(total=n_frames, desc="frames in", unit="frame", position=0)
    refine_bar = tqdm(desc="refine", unit="epoch", position=1, bar_format="{desc}: {n} epochs {postfix}")
    try:
        for event in launcher.events(timeout_s=600):
            stage = event["sender"].split(".")[0]
            if event["event"] == "status" and stage == source and "frames_received" in event:
                progress.frames_received = event["frames_received"]
                if progress.first_frame_s is None and progress.frames_received:
                    progress.first_frame_s = time.monotonic()
                frames_bar.update(progress.frames_received - frames_bar.n)
            elif event["event"] == "status" and stage == solver and "iteration" in event:
                progress.iteration, progress.fourier_error = event["iteration"], event["fourier_error"]
                refine_bar.update(progress.iteration - refine_bar.n)
                refine_bar.set_postfix_str(
                    f"error {progress.fourier_error:.4f}, {event.get('positions_used', 0)} positions"
                )
            elif event["event"] == "log":
                tqdm.write(f"  [{event['sender']}] {event['reason']}: {event['text']}")
                progress.warnings.append(event["text"])
            elif event["event"] == "scan_end" and stage == source:
                progress.last_frame_s = time.monotonic()
                frames_bar.update(n_frames - frames_bar.n)
            elif event["event"] == "scan_end" and stage == sink:
                progress.final_published_s = time.monotonic()
                progress.accounting, progress.frames_sent = event["accounting"], event["frames_sent"]
                return progress
            elif event["event"] == "died":
                raise DemoError(f"stage {event['sender']} died (code {event['code']}):\n{event['log']}")
            if emitter.poll() not in (None, 0):
                raise DemoError(
                    f"the detector emitter exited with code {emitter.returncode}; "
                    f"see {pipeline.run_dir / 'logs' / 'emitter.log'}"
                )
        raise DemoError("the scan did not finish within 10 minutes; see the logs in " + str(pipeline.run_dir))
    finally:
        frames_bar.close()
        refine_bar.close()


def _read_back(pipeline: PipelineConfig, scan_uid: str) -> dict[str, Any]:
    from tiled.client import from_uri

    client = from_uri(pipeline.tiled.uri, api_key=pipeline.tiled.api_key)
    node = client["reconstructions"][scan_uid]
    products = {name: node[name].read() for name in ("object", "probe", "mosaic") if name in node}
    return {**products, "metadata": dict(node.metadata)}


def _report(
    scan: Any, reconstruction: dict[str, Any], progress: DemoProgress, mosaic_s: float | None, out: Path
) -> int:
    comparison = compare_with_truth(scan, reconstruction)
    latency = (
        progress.final_published_s - progress.last_frame_s
        if progress.final_published_s and progress.last_frame_s
        else float("nan")
    )
    timings = [f"last frame → final object in Tiled: {latency:.1f} s"]
    if mosaic_s is not None and progress.first_frame_s is not None:
        # Both ends as a user sees them: ingest reports its first frame at once, and the poll is 0.1 s.
        timings.insert(0, f"first frame → first mosaic in Tiled: {mosaic_s - progress.first_frame_s:.1f} s")
    png = out / "demo.png"
    draw_comparison(scan, reconstruction, comparison, png, timings)
    print(f"\nScan complete: {progress.frames_sent} frames sent by the detector.")
    for stage, counts in progress.accounting.items():
        print(f"  {stage:<10} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    missing = unaccounted_frames(progress.frames_sent, progress.accounting)
    print("  every frame accounted for" if not missing else f"  UNACCOUNTED: {missing}")
    meta = reconstruction["metadata"]
    print(f"Final reconstruction: ePIE iteration {meta.get('iteration')}, "
          f"object error vs truth (ambiguities removed) {comparison.error:.3f}")  # fmt: skip
    for line in timings:
        print(line[0].upper() + line[1:])
    print(f"Picture: {png}")
    return 0 if not missing else 1

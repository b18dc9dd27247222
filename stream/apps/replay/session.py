"""One ``phasestream replay``: the scan its source names, sent to a running pipeline or into one started here.

The source is a CXI or NXmx file (``ScanSource.file``), or a Bluesky run in Tiled as TiledWriter stores it
(``ScanSource.tiled_run``, ``http://host:port/RUN_UID``). Without ``into_pipeline`` the scan goes to the
detector endpoints, where a pipeline started with ``phasestream run`` listens; with it, this process starts
deploy/replay.yaml (the demo chain without AutoPhaseNN) and an embedded Tiled server unless one is given,
replays into it, prints the frame accounting and where the result file is.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from phasestream.apps.demo import SHIPPED_TOPOLOGIES
from phasestream.apps.launch.launcher import Launcher
from phasestream.apps.replay.replay import (
    ReplayRate,
    read_recorded_scan,
    replay,
    replay_rate_hz,
    replay_scan,
    source_label,
)
from phasestream.apps.replay.to_tiled import read_tiled_run, split_run_uri
from phasestream.apps.scan_options import ScanOptions, with_scan_options
from phasestream.apps.serve import tiled_for
from phasestream.errors import ConfigError, PhasestreamError
from phasestream.formats.recorded_scan import RecordedScan
from phasestream.formats.units import LengthUnit
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import DetectorSettings, PipelineConfig, TiledSettings, load_pipeline
from phasestream.runtime.tiled.access import read_api_key
from phasestream.simulators.selun import DEFAULT_DATA_ENDPOINT, DEFAULT_POSITIONS_ENDPOINT, SelunEmitter


@dataclass(frozen=True)
class ScanSource:
    """Where the scan comes from: ``file``, or ``tiled_run`` with the motors read as the options say."""

    file: Path | None = None  # a CXI file (scan.cxi::/entry_1/data_2 picks a data group) or an NXmx master
    positions_file: Path | None = None  # NXmx without sample translations: a .npy of (n, 2) metres (y, x)
    tiled_run: str | None = None  # http://host:port/RUN_UID
    tiled_api_key: str | None = None  # the run's server; None: from the environment
    y_motor: str | None = None  # None: as the detector's configuration in the run names it
    x_motor: str | None = None
    motor_unit: LengthUnit | None = None  # None: from the run
    invert_y: bool = False  # negate y: the motor moves the sample
    invert_x: bool = False


@dataclass(frozen=True)
class ReplayOptions:
    """How the scan is sent: pace, detector endpoints, the scan uid it is announced under."""

    rate: ReplayRate | float = ReplayRate.RECORDED
    data_endpoint: str = DEFAULT_DATA_ENDPOINT
    positions_endpoint: str = DEFAULT_POSITIONS_ENDPOINT
    scan_uid: str | None = None  # None: a new uuid
    progress: bool = True


@dataclass(frozen=True)
class IntoPipeline:
    """deploy/replay.yaml started here, with the replay as its detector (``replay --pipeline``)."""

    out: Path = Path("phasestream-data")  # run directory, embedded Tiled data, result files
    tiled_uri: str | None = None  # an existing Tiled server instead of an embedded one
    tiled_api_key: str | None = None  # its key; None: the topology's, from the environment
    scan_options: ScanOptions = field(default_factory=ScanOptions)  # first probe, geometry, mask


def run_replay(source: ScanSource, options: ReplayOptions, into_pipeline: IntoPipeline | None = None) -> int:
    """What ``phasestream replay`` runs: 0 when every frame was sent (and, into a pipeline, accounted for)."""
    scan = read_scan(source)
    scan_uid = options.scan_uid or str(uuid.uuid4())
    rate = options.rate
    if into_pipeline is not None:
        if rate == ReplayRate.RECORDED and scan.frame_time_s is None:
            # Into its own pipeline nothing waits on the detector's pace: a file without one still runs.
            tqdm.write(f"replay: {source_label(scan)} records no frame time; sending as fast as possible")
            rate = ReplayRate.MAX
        return _replay_into_pipeline(scan, replay_rate_hz(rate, scan), scan_uid, options, into_pipeline)
    report = replay(
        scan,
        rate,
        options.data_endpoint,
        options.positions_endpoint,
        progress=options.progress,
        scan_uid=scan_uid,
    )
    print(
        f"replayed {report.frames_sent} frames of scan {scan_uid} in {report.elapsed_s:.2f} s "
        f"({report.frames_per_s:,.0f} frames/s{', stored bslz4 sent as is' if report.passthrough else ''})",
        flush=True,
    )
    return 0


def read_scan(source: ScanSource) -> RecordedScan:
    """The scan ``source`` names: its file, or its Tiled run; exactly one of the two must be given."""
    if (source.file is None) == (source.tiled_run is None):
        raise ConfigError(
            "give either a scan file (CXI or NXmx master) or --tiled-run http://host:port/RUN_UID, not "
            f"{'both' if source.tiled_run else 'neither'}"
        )
    if source.tiled_run is None:
        positions_m = _load_side_channel(source.positions_file) if source.positions_file else None
        return read_recorded_scan(source.file, positions_m)
    if source.positions_file:
        raise ConfigError("--positions is for NXmx files: a Tiled run's positions are its motor readbacks")
    tiled_uri, run_uid = split_run_uri(source.tiled_run)
    return read_tiled_run(
        tiled_uri,
        run_uid,
        api_key=source.tiled_api_key if source.tiled_api_key is not None else read_api_key(None),
        y_motor=source.y_motor,
        x_motor=source.x_motor,
        motor_unit=source.motor_unit,
        invert_y=source.invert_y,
        invert_x=source.invert_x,
    )


def _load_side_channel(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--positions {path}: not a .npy array ({error}); save (n, 2) metres with np.save"
        ) from error


def probe_option_for(scan: RecordedScan, asked: str | None) -> str:
    """The refine stage's first probe: what ``--probe`` asked, else the probe stored in the file."""
    if asked is not None:
        return asked
    probe_path = getattr(scan, "probe_path", None)
    if scan.probe is not None and probe_path and isinstance(scan.source, Path):
        spec = f"{scan.source}::{probe_path}"
        tqdm.write(f"replay: starting from the probe stored in {spec} (--probe auto searches instead)")
        return spec
    return "auto"


def _replay_pipeline(scan: RecordedScan, into: IntoPipeline) -> PipelineConfig:
    """deploy/replay.yaml under ``into.out``, its detector on sockets there, with the scan options applied
    (the first probe, when none is asked, is the one stored in the scan's file)."""

    run_dir = into.out / "run"
    demo = load_pipeline(SHIPPED_TOPOLOGIES / "replay.yaml")
    tiled = TiledSettings(
        uri=into.tiled_uri or demo.tiled.uri,
        api_key=into.tiled_api_key or demo.tiled.api_key,
        data_dir=into.out / "tiled",
    )
    detector = DetectorSettings(
        data_endpoint=f"ipc://{run_dir.absolute()}/detector-data.sock",
        positions_endpoint=f"ipc://{run_dir.absolute()}/detector-positions.sock",
    )
    pipeline = demo.model_copy(
        update={"run_dir": run_dir, "exit_after_scan": True, "tiled": tiled, "detector": detector}
    )
    probe = probe_option_for(scan, into.scan_options.initial_probe)
    options = dataclasses.replace(into.scan_options, initial_probe=probe)
    return with_results_dir(with_scan_options(pipeline, options), into.out.absolute())


def _replay_into_pipeline(
    scan: RecordedScan, rate_hz: float | None, scan_uid: str, options: ReplayOptions, into: IntoPipeline
) -> int:
    """Start the replay pipeline, send the scan from a thread, and report what the last stage accounted."""

    pipeline = _replay_pipeline(scan, into)
    pipeline.run_dir.mkdir(parents=True, exist_ok=True)
    detector = pipeline.detector
    failures: list[BaseException] = []
    with tiled_for(pipeline) as resolved, Launcher(resolved) as launcher:
        # A stage that dies mid-scan leaves the sender blocked: the timeout turns that into an error.
        emitter = SelunEmitter(detector.data_endpoint, detector.positions_endpoint, send_timeout_s=120)
        sender = threading.Thread(
            target=_send_in_thread,
            args=(emitter, scan, rate_hz, scan_uid, options.progress, failures),
            name="replay",
            daemon=True,
        )
        sender.start()
        try:
            final = _wait_for_sink(launcher, resolved.stages[-1].name, failures)
            launcher.wait_for_exit(30)
        finally:
            sender.join(timeout=10)
            if not sender.is_alive():  # a socket belongs to one thread: never close it under a blocked send
                emitter.close()
    return _report(final, into.out, scan_uid)


def _report(final: dict[str, Any], out: Path, scan_uid: str) -> int:
    """Print the last stage's accounting and where the result file is; 1 when a frame is unaccounted."""

    missing = unaccounted_frames(final["frames_sent"], final["accounting"])
    for stage, counts in final["accounting"].items():
        print(f"  {stage:<10} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print("  every frame accounted for" if not missing else f"  UNACCOUNTED: {missing}")
    result_file = _result_file_in(out, scan_uid)
    if result_file.is_file():
        print(f"reconstruction of scan {scan_uid}: {result_file}")
    else:
        print(f"  NO RESULT FILE at {result_file}: see the publish stage's log in {out / 'run'}")
    return 0 if not missing else 1


def _send_in_thread(
    emitter: SelunEmitter,
    scan: RecordedScan,
    rate_hz: float | None,
    scan_uid: str,
    progress: bool,
    failures: list[BaseException],
) -> None:
    try:
        replay_scan(emitter, scan, rate_hz, scan_uid, progress=progress)
    except Exception as error:  # reported by the main thread, which owns the launcher
        failures.append(error)


def _wait_for_sink(launcher: Any, sink: str, failures: list[BaseException]) -> dict[str, Any]:
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        if failures:
            raise failures[0]
        for event in launcher.events(timeout_s=1.0):
            stage = event["sender"].split(".")[0]
            if event["event"] == "log":
                tqdm.write(f"  [{event['sender']}] {event['reason']}: {event['text']}")
            elif event["event"] == "died":
                raise PhasestreamError(
                    f"stage {event['sender']} died (code {event['code']}):\n{event['log']}"
                )
            elif event["event"] == "scan_end" and stage == sink:
                return event
    raise PhasestreamError(f"the replay did not reach {sink} within an hour; see the logs in the run folder")


def _result_file_in(out: Path, scan_uid: str) -> Path:
    """Where the publish stage writes the scan's result file (see ``with_results_dir``)."""
    return out.absolute() / f"reconstruction-{scan_uid}.cxi"


def with_results_dir(pipeline: PipelineConfig, folder: Path) -> PipelineConfig:
    """The pipeline with its publish stages writing result files into ``folder``."""
    stages = [
        spec.model_copy(update={"config": {**spec.config, "results_dir": str(folder)}})
        if spec.stage == "publish"
        else spec
        for spec in pipeline.stages
    ]
    return pipeline.model_copy(update={"stages": stages})

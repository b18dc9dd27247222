"""``phasestream run``: a topology, a Tiled server to publish into, and a clean stop on Ctrl-C."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from phasestream.apps.launch.launcher import Launcher
from phasestream.apps.launch.run_dir import RunDirLock
from phasestream.apps.scan_options import ScanOptions, with_scan_options
from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key, write_api_key_file
from phasestream.errors import ConfigError
from phasestream.runtime.config import PipelineConfig, TiledSettings, load_pipeline
from phasestream.runtime.tiled.access import check_tiled, public_uri, read_api_key_file

# Where ``phasestream run`` keeps the embedded Tiled server's key, in the run directory.
EMBEDDED_API_KEY_FILE = "tiled-api-key"


@contextlib.contextmanager
def tiled_for(pipeline: PipelineConfig) -> Iterator[PipelineConfig]:
    """Yield the pipeline with a reachable Tiled server: the configured one, else an embedded one."""

    tiled = pipeline.tiled
    if tiled.uri:
        check_tiled(tiled.uri, tiled.api_key)
        yield pipeline
        return
    api_key = tiled.api_key or generate_api_key()
    with EmbeddedTiledServer(tiled.data_dir, api_key=api_key) as server:
        settings = TiledSettings(uri=server.uri, api_key=api_key, data_dir=tiled.data_dir)
        yield pipeline.model_copy(update={"tiled": settings})


def serve_pipeline(
    path: Path,
    *,
    tiled_uri: str | None = None,
    tiled_api_key_file: Path | None = None,
    host: str | None = None,
    options: ScanOptions | None = None,
) -> int:
    """Serve ``path``'s pipeline; with ``host``, only the stages placed on that host (``hosts:``);
    ``options`` sets the first probe, the geometry and the mask of every scan.

    The run directory is locked before anything starts (``RunDirLock``): a second ``run`` on it fails at
    once. An embedded Tiled server's key goes to ``<run_dir>/tiled-api-key`` (mode 0600), whose path is
    printed, never the key.
    """
    pipeline = _pipeline_to_serve(path, tiled_uri, tiled_api_key_file, host, options or ScanOptions())
    run_dir_lock = RunDirLock.for_launcher(pipeline, host)
    with (
        run_dir_lock,
        tiled_for(pipeline) as resolved,
        Launcher(resolved, host=host, run_dir_lock=run_dir_lock) as launcher,
    ):
        _print_where(resolved, launcher, embedded_tiled=not pipeline.tiled.uri)
        try:
            while True:
                for event in launcher.events(timeout_s=3600):
                    _print_event(event, last_stage=resolved.stages[-1].name)
                    if resolved.exit_after_scan and launcher.wait_for_exit(0):
                        return 0
        except KeyboardInterrupt:
            print("\nphasestream: stopping")
    return 0


def _pipeline_to_serve(
    path: Path, tiled_uri: str | None, tiled_api_key_file: Path | None, host: str | None, options: ScanOptions
) -> PipelineConfig:
    """The topology with the scan options and the Tiled server and key given on the command line."""

    pipeline = with_scan_options(load_pipeline(path), options)
    api_key = read_api_key_file(tiled_api_key_file) if tiled_api_key_file is not None else None
    if tiled_uri or api_key:
        # The file given here replaces the YAML's key and key file, which a worker would read again.
        update = {
            "uri": tiled_uri or pipeline.tiled.uri,
            "api_key": api_key or pipeline.tiled.api_key,
            "api_key_file": None if api_key else pipeline.tiled.api_key_file,
        }
        pipeline = pipeline.model_copy(update={"tiled": pipeline.tiled.model_copy(update=update)})
    if host is not None and not pipeline.tiled.uri:
        raise ConfigError(
            f"--host {host}: a pipeline across hosts publishes to one Tiled server, and each host's launcher "
            "would start its own embedded one; set tiled.uri in the YAML or pass --tiled-uri"
        )
    return pipeline


def _print_where(resolved: PipelineConfig, launcher: Launcher, *, embedded_tiled: bool) -> None:
    """Where results, the embedded server's key file, the run directory, the detector and metrics are."""

    tiled_uri = public_uri(resolved.tiled.uri)  # never the key, even when it came in the URI
    print(f"phasestream: pipeline {resolved.name!r} is up; results in Tiled at {tiled_uri}")
    if embedded_tiled and resolved.tiled.api_key:
        key_file = write_api_key_file(resolved.run_dir / EMBEDDED_API_KEY_FILE, resolved.tiled.api_key)
        print(f"  the embedded Tiled server's API key is in {key_file} (mode 0600); watch with:")
        print(f"    phasestream view --tiled-uri {tiled_uri} --tiled-api-key-file {key_file}")
    print(f"  run directory {resolved.run_dir} (logs, sockets), locked while this runs")
    detector = resolved.detector
    print(f"  detector: data {detector.data_endpoint}, positions {detector.positions_endpoint}")
    for label, worker in launcher.workers.items():
        address = resolved.stage(label.rsplit(".", 1)[0]).metrics_address
        print(f"  {label:<14} /metrics on http://{address}:{worker.metrics_port}/metrics")
    print("Ctrl-C stops every stage.")


def _print_event(event: dict, last_stage: str) -> None:
    kind = event["event"]
    if kind == "log":
        print(f"  [{event['sender']}] {event['reason']}: {event['text']}")
    elif kind == "died":
        print(f"  [{event['sender']}] exited with code {event['code']}:\n{event['log']}")
    elif kind == "scan_end" and event["sender"].split(".")[0] == last_stage:
        print(f"  scan {event['scan_uid']} complete: {event['frames_sent']} frames sent by the detector")
        for stage, counts in event["accounting"].items():
            print(f"    {stage:<12} {counts}")

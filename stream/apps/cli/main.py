"""The ``phasestream`` command line. Each subcommand's --help says what it does and how to use it."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

from phasestream.apps.scan_options import ScanOptions
from phasestream.errors import PhasestreamError

EPILOG = """\
Start here:
  phasestream demo                      simulate a scan and reconstruct it live (about 2 minutes)
  phasestream run deploy/live.yaml      serve a pipeline beside a real or simulated detector
  phasestream simulate                  stream a simulated SELUN scan (DECTRIS Stream V2)
  phasestream replay scan.cxi           replay a recorded CXI or NXmx scan through the same path
  phasestream view --tiled-uri URI      watch reconstructions live in a browser
  phasestream bench ingest | epie | cdi | replay | tpx3 | viewer | autophasenn | dip | lodip | pine
                                        measure throughput (figures go in docs/benchmarks.md)
"""


def main(argv: list[str] | None = None) -> int:
    # bitshuffle's OpenMP threads spin while they wait: without this, compressing a frame in the emitter
    # took 1.7-7 ms instead of 0.2 ms beside busy stages. It must be set before bitshuffle is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("demo", "run", "replay", "view"):
        # A service manager stops with SIGTERM: tidy up (stop every stage, the emitter, Tiled) as on Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request to Tiled, or per database migration step of the embedded server, would bury
    # the progress bars.
    for chatty in ("httpx", "alembic", "numexpr"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except PhasestreamError as exc:
        print(f"phasestream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("phasestream: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phasestream",
        description="Live phase retrieval for coherent X-ray imaging: detector frames in, "
        "reconstructions in Tiled out, Prometheus metrics from every stage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_run(sub)
    _add_simulate(sub)
    _add_replay(sub)
    _add_view(sub)
    _add_stage(sub)
    _add_keys(sub)
    _add_bluesky_bridge(sub)
    _add_bluesky_tiled_writer(sub)
    for group in sorted(entry_points(group="phasestream.commands"), key=lambda ep: ep.name):
        group.load()(sub)
    return parser


def _add_tiled_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tiled-uri",
        help="an existing Tiled server (default: start an embedded one; env PHASESTREAM_TILED__URI)",
    )
    _add_tiled_key_file_option(parser, parser)


def _add_tiled_key_file_option(
    parser: argparse.ArgumentParser, group: argparse.ArgumentParser | argparse._ArgumentGroup
) -> None:
    """``--tiled-api-key-file``: the key comes from a private file or the environment, never a value on the
    command line, which every user of the host can read (``ps``)."""
    group.add_argument(
        "--tiled-api-key-file",
        type=Path,
        metavar="PATH",
        help="file holding the Tiled API key, readable only by you (chmod 600); default: "
        "$PHASESTREAM_TILED__API_KEY",
    )
    # Else argparse would take `--tiled-api-key KEY` as this option abbreviated, and KEY as a path.
    parser.allow_abbrev = False


def _add_scan_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "probe and geometry (override the topology and the detector's start message)"
    )
    group.add_argument(
        "--probe",
        metavar="SPEC",
        help="first probe: auto (searched in the data), previous (the last scan's with this geometry), or "
        "a file: probe.npy, scan.cxi::/entry_1/instrument_1/source_1/illumination, a CXI, .ptyr or "
        "phasestream result file",
    )
    group.add_argument("--energy-kev", type=float, help="photon energy, keV")
    group.add_argument("--detector-distance-m", type=float, help="sample–detector distance, m")
    group.add_argument("--pixel-size-m", type=float, help="detector pixel, m")
    group.add_argument(
        "--beam-centre",
        type=float,
        nargs=2,
        metavar=("ROW", "COLUMN"),
        help="direct beam on the detector, px",
    )
    group.add_argument("--window-px", type=int, help="crop frames to this square window around the beam")
    group.add_argument(
        "--mask",
        metavar="FILE",
        help="bad pixels: .npy (non-zero = bad), file.h5::/dataset, or a CXI / NXmx file",
    )


def scan_options(args: argparse.Namespace) -> ScanOptions:
    """The typed scan options of ``run`` and ``replay``."""
    return ScanOptions(
        initial_probe=args.probe,
        energy_kev=args.energy_kev,
        detector_distance_m=args.detector_distance_m,
        pixel_size_m=args.pixel_size_m,
        beam_centre_px=tuple(args.beam_centre) if args.beam_centre else None,
        window_px=args.window_px,
        mask_file=args.mask,
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="simulate a ptychography scan and reconstruct it live, end to end",
        description="Simulates a sample, a focused probe and a Fermat-spiral scan on a SELUN detector, "
        "streams it through emitter → ingest → binning → inversion (AutoPhaseNN) → refine (ePIE) → publish "
        "into an embedded Tiled server, shows progress, reports when the first neural mosaic and the final "
        "object reached Tiled, and writes a PNG of the reconstruction beside the truth and the mosaic.",
    )
    p.add_argument(
        "--large", action="store_true", help="900 positions, twice the epochs (about 2.5 minutes on 2 cores)"
    )
    p.add_argument("--positions", type=int, help="number of scan positions (default 420, 900 with --large)")
    p.add_argument(
        "--rate-hz",
        type=float,
        help="detector frame rate in Hz (default 30: a 14 s scan, so it refines live)",
    )
    p.add_argument("--epochs-after-scan", type=int, help="ePIE epochs after the last frame")
    p.add_argument(
        "--out", type=Path, default=Path("phasestream-data"), help="data folder (default %(default)s)"
    )
    p.add_argument("--pipeline", type=Path, help="topology to run (default deploy/demo.yaml)")
    _add_tiled_options(p)
    p.set_defaults(func=_cmd_demo)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="start a pipeline from a topology YAML and serve until Ctrl-C",
        description="Starts one process per stage worker as the YAML says, an embedded Tiled server "
        "unless --tiled-uri is given, and prints where results and metrics are. Ctrl-C stops it cleanly.",
    )
    p.add_argument("pipeline", type=Path, help="topology file, e.g. deploy/live.yaml")
    p.add_argument(
        "--host",
        help="run only the stages the pipeline's hosts: section places on this host (default: every stage "
        "here); see deploy/multihost.yaml",
    )
    _add_tiled_options(p)
    _add_scan_options(p)
    p.set_defaults(func=_cmd_run)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="stream a simulated SELUN scan over DECTRIS Stream V2 (for a pipeline started with run)",
        description="Binds the detector's PUSH sockets (Stream V2 CBOR frames, bslz4) and a position "
        "channel, waits for a client, and streams a simulated or saved scan.",
    )
    p.add_argument("--data-endpoint", default="tcp://127.0.0.1:31001", help="default %(default)s")
    p.add_argument("--positions-endpoint", default="tcp://127.0.0.1:31002", help="default %(default)s")
    p.add_argument("--rate-hz", type=float, help="frame rate; default: as fast as possible")
    p.add_argument("--positions", type=int, default=420, help="scan positions (default %(default)s)")
    p.add_argument("--from", dest="scan_file", type=Path, help="stream a scan saved by the demo (.npz)")
    p.add_argument("--scan-uid", help="scan uid to announce (default: a new uuid)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "replay",
        help="replay a recorded CXI or NXmx scan, or a Bluesky run in Tiled, through the simulated SELUN",
        description="Sends a recorded scan as a SELUN would (Stream V2 plus the position channel), at the "
        "recorded rate, at --rate-hz, or as fast as ingest takes it, with a progress bar. With --pipeline "
        "it also starts the demo pipeline and an embedded Tiled server and reconstructs the scan.",
    )
    parser.add_argument(
        "file",
        type=Path,
        nargs="?",
        help="a CXI file (scan.cxi::/entry_1/data_2 picks one of several data groups) or a DECTRIS NXmx "
        "master file (*_master.h5)",
    )
    tiled = parser.add_argument_group("a Bluesky run in Tiled (instead of FILE)")
    tiled.add_argument(
        "--tiled-run", metavar="URI/RUN_UID", help="replay a Bluesky run from Tiled: http://host:port/RUN_UID"
    )
    _add_tiled_key_file_option(parser, tiled)
    tiled.add_argument(
        "--y-motor", help="the run's y motor (default: as the detector's configuration in the run names it)"
    )
    tiled.add_argument(
        "--x-motor", help="the run's x motor (default: as the detector's configuration names it)"
    )
    tiled.add_argument("--motor-unit", choices=["m", "mm", "um", "nm"], help="default: from the run")
    tiled.add_argument("--invert-y", action="store_true", help="negate y (the motor moves the sample)")
    tiled.add_argument("--invert-x", action="store_true", help="negate x (the motor moves the sample)")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--rate-hz", type=float, help="frame rate (default: the rate the file recorded)")
    rate.add_argument(
        "--as-fast-as-possible", action="store_true", help="send frames as fast as ingest takes them"
    )
    parser.add_argument("--data-endpoint", default="tcp://127.0.0.1:31001", help="default %(default)s")
    parser.add_argument("--positions-endpoint", default="tcp://127.0.0.1:31002", help="default %(default)s")
    parser.add_argument(
        "--positions",
        type=Path,
        help="positions side channel for an NXmx file without sample translations: a .npy of (n, 2) probe "
        "centres (y, x) in metres",
    )
    parser.add_argument("--scan-uid", help="scan uid to announce (default: a new uuid)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="start deploy/replay.yaml (the demo chain without AutoPhaseNN) with an embedded Tiled server "
        "and replay into it",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("phasestream-data"),
        help="data folder with --pipeline (default %(default)s)",
    )
    parser.add_argument(
        "--tiled-uri",
        help="with --pipeline: an existing Tiled server instead of an embedded one (its key: "
        "--tiled-api-key-file)",
    )
    _add_scan_options(parser)
    parser.set_defaults(func=_cmd_replay)


def _add_view(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="serve a live web page of the latest reconstruction in Tiled",
        description="Follows /reconstructions through Tiled's websocket subscriptions and serves, on "
        "127.0.0.1, the object's amplitude and phase with the scan positions, the probe, the neural mosaic, "
        "the iteration, the R-factor and frames/s per stage. The API key never reaches the browser.",
    )
    p.add_argument("--tiled-uri", help="the Tiled server (env PHASESTREAM_TILED__URI)")
    _add_tiled_key_file_option(p, p)
    p.add_argument(
        "--metrics",
        nargs="+",
        action="extend",
        default=[],
        metavar="URL",
        help="stage /metrics endpoints for frames/s: URL, host:port or port (repeatable)",
    )
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one, printed)")
    p.add_argument("--scan", help="show this scan uid instead of the newest")
    p.set_defaults(func=_cmd_view)


def _cmd_view(args: argparse.Namespace) -> int:
    from phasestream.apps.viewer.app import run_viewer

    return run_viewer(args)


def _add_stage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="run one stage worker of a pipeline (the launcher does this for you)",
        description="Runs one worker of one stage. Use it to place stages on other hosts by hand; "
        "endpoints follow from the pipeline file.",
    )
    p.add_argument("name", help="stage name in the pipeline file")
    p.add_argument("--pipeline", type=Path, required=True, help="pipeline YAML or the launcher's JSON")
    p.add_argument("--worker", type=int, default=0, help="worker index (default 0)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_cmd_stage)


def _add_bluesky_bridge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bluesky-bridge",
        help="send a Bluesky RunEngine's motor positions to the pipeline's position channel",
        description="Subscribes to bluesky-0MQ-proxy (msgpack documents, never pickle) and, for each run, "
        "sends every event's motor readbacks in metres on the position channel, keyed by the detector's "
        "image id. See deploy/bluesky.md.",
    )
    p.add_argument(
        "--proxy",
        default="127.0.0.1:5578",
        help="the proxy's out address, host:port or ipc://path (default %(default)s)",
    )
    p.add_argument(
        "--positions-endpoint",
        default="tcp://127.0.0.1:31002",
        help="position channel to bind; ingest connects (default %(default)s)",
    )
    p.add_argument("--y-motor", required=True, help="ophyd name (readback data key) of the y motor")
    p.add_argument("--x-motor", required=True, help="ophyd name (readback data key) of the x motor")
    p.add_argument(
        "--motor-unit", choices=["m", "mm", "um", "nm"], default="um", help="motor unit (default %(default)s)"
    )
    p.add_argument(
        "--invert-y", action="store_true", help="negate y (the motor moves the sample, not the probe)"
    )
    p.add_argument(
        "--invert-x", action="store_true", help="negate x (the motor moves the sample, not the probe)"
    )
    p.add_argument(
        "--stream", default="primary", help="event stream with the detector's frames (default %(default)s)"
    )
    p.add_argument("--image-id-key", default="selun_image_id", help="default %(default)s")
    p.add_argument("--series-id-key", default="selun_series_id", help="default %(default)s")
    p.add_argument(
        "--metrics-port", type=int, help="serve /metrics on 127.0.0.1 at this port (0: any free one)"
    )
    p.set_defaults(func=_cmd_bluesky_bridge)


def _cmd_bluesky_bridge(args: argparse.Namespace) -> int:
    from phasestream.apps.bluesky.bridge import run_bluesky_bridge

    return run_bluesky_bridge(args)


def _add_bluesky_tiled_writer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bluesky-tiled-writer",
        help="write Bluesky runs from the 0MQ proxy into Tiled (bluesky-tiled-plugins' TiledWriter)",
        description="Subscribes to bluesky-0MQ-proxy (msgpack, never pickle) and writes every run, with the "
        "detector's frame files as external assets, into Tiled in its own process, beside the "
        "reconstructions. See deploy/bluesky.md.",
    )
    p.add_argument("--proxy", default="127.0.0.1:5578", help="the proxy's out address (default %(default)s)")
    p.add_argument("--tiled-uri", required=True, help="the writable Tiled server, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--tiled-api-key-file",
        type=Path,
        help="file holding the server's API key (default: $PHASESTREAM_TILED__API_KEY, else $TILED_API_KEY)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="events per write; 1 (default) streams each event at once"
    )
    p.set_defaults(func=_cmd_bluesky_tiled_writer)


def _cmd_bluesky_tiled_writer(args: argparse.Namespace) -> int:
    from phasestream.apps.bluesky.tiled_writer import run_bluesky_tiled_writer

    return run_bluesky_tiled_writer(args)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CurveZMQ keys for stages on several hosts")
    keys = p.add_subparsers(dest="keys", required=True, metavar="ACTION")
    generate = keys.add_parser(
        "generate", help="write keypairs: DIR/public/<name>.key and DIR/private/<name>.key_secret"
    )
    generate.add_argument("directory", type=Path)
    generate.add_argument(
        "--pipeline", type=Path, help="one keypair per stage of this topology, plus 'launcher'"
    )
    generate.add_argument("--name", action="append", default=[], help="a keypair with this name (repeatable)")
    generate.set_defaults(func=_cmd_keys_generate)


def _cmd_keys_generate(args: argparse.Namespace) -> int:
    from phasestream.runtime.curve import run_keys_generate

    return run_keys_generate(args.directory, args.name, args.pipeline)


def _cmd_demo(args: argparse.Namespace) -> int:
    from phasestream.apps.demo import run_demo

    return run_demo(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from phasestream.apps.serve import serve_pipeline

    return serve_pipeline(
        args.pipeline,
        tiled_uri=args.tiled_uri,
        tiled_api_key_file=args.tiled_api_key_file,
        host=args.host,
        options=scan_options(args),
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from phasestream.apps.simulate import run_simulate

    return run_simulate(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from phasestream.apps.replay.replay import run_replay
    from phasestream.runtime.tiled_access import read_api_key_file

    # replay.py takes the key of --tiled-uri as args.tiled_api_key (None: the pipeline's, from the
    # environment); a key file must be private to the user.
    key_file = args.tiled_api_key_file
    args.tiled_api_key = read_api_key_file(key_file) if key_file is not None else None
    return run_replay(args, scan_options(args))


def _cmd_stage(args: argparse.Namespace) -> int:
    from phasestream.runtime.config import load_pipeline
    from phasestream.runtime.registry import resolve_stage
    from phasestream.runtime.topology import place

    pipeline = load_pipeline(args.pipeline)
    placement = place(pipeline, args.name, args.worker)
    stage_cls = resolve_stage(placement.spec.stage)
    stage_cls.from_placement(placement, pipeline).run()
    return 0

"""``phasestream replay``: a recorded scan, or a Bluesky run in Tiled, through the simulated SELUN."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.apps.cli.options import (
    DEFAULT_DATA_ENDPOINT,
    DEFAULT_POSITIONS_ENDPOINT,
    add_scan_options,
    add_tiled_key_file_option,
    scan_options,
)
from phasestream.apps.replay import session
from phasestream.apps.replay.replay import ReplayRate
from phasestream.formats.units import LengthUnit
from phasestream.runtime.tiled.access import read_api_key_file


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    _add_tiled_run_options(parser)
    _add_sending_options(parser)
    _add_pipeline_options(parser)
    add_scan_options(parser)
    parser.set_defaults(func=replay)


def _add_tiled_run_options(parser: argparse.ArgumentParser) -> None:
    tiled = parser.add_argument_group("a Bluesky run in Tiled (instead of FILE)")
    tiled.add_argument(
        "--tiled-run", metavar="URI/RUN_UID", help="replay a Bluesky run from Tiled: http://host:port/RUN_UID"
    )
    add_tiled_key_file_option(parser, tiled)
    tiled.add_argument(
        "--y-motor", help="the run's y motor (default: as the detector's configuration in the run names it)"
    )
    tiled.add_argument(
        "--x-motor", help="the run's x motor (default: as the detector's configuration names it)"
    )
    tiled.add_argument(
        "--motor-unit", choices=[unit.value for unit in LengthUnit], help="default: from the run"
    )
    tiled.add_argument("--invert-y", action="store_true", help="negate y (the motor moves the sample)")
    tiled.add_argument("--invert-x", action="store_true", help="negate x (the motor moves the sample)")


def _add_sending_options(parser: argparse.ArgumentParser) -> None:
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--rate-hz", type=float, help="frame rate (default: the rate the file recorded)")
    rate.add_argument(
        "--as-fast-as-possible", action="store_true", help="send frames as fast as ingest takes them"
    )
    parser.add_argument("--data-endpoint", default=DEFAULT_DATA_ENDPOINT, help="default %(default)s")
    parser.add_argument(
        "--positions-endpoint", default=DEFAULT_POSITIONS_ENDPOINT, help="default %(default)s"
    )
    parser.add_argument(
        "--positions",
        type=Path,
        help="positions side channel for an NXmx file without sample translations: a .npy of (n, 2) probe "
        "centres (y, x) in metres",
    )
    parser.add_argument("--scan-uid", help="scan uid to announce (default: a new uuid)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
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


def replay(args: argparse.Namespace) -> int:
    # A key file must be private to the user; without one, each server's key comes from the environment.
    key_file = args.tiled_api_key_file
    api_key = read_api_key_file(key_file) if key_file is not None else None
    rate: ReplayRate | float = (
        ReplayRate.MAX
        if args.as_fast_as_possible
        else args.rate_hz
        if args.rate_hz is not None
        else ReplayRate.RECORDED
    )
    options = session.ReplayOptions(
        rate=rate,
        data_endpoint=args.data_endpoint,
        positions_endpoint=args.positions_endpoint,
        scan_uid=args.scan_uid,
        progress=not args.no_progress,
    )
    into = (
        session.IntoPipeline(args.out, args.tiled_uri, api_key, scan_options(args)) if args.pipeline else None
    )
    return session.run_replay(_scan_source(args, api_key), options, into)


def _scan_source(args: argparse.Namespace, api_key: str | None) -> session.ScanSource:
    return session.ScanSource(
        file=args.file,
        positions_file=args.positions,
        tiled_run=args.tiled_run,
        tiled_api_key=api_key,
        y_motor=args.y_motor,
        x_motor=args.x_motor,
        motor_unit=LengthUnit(args.motor_unit) if args.motor_unit else None,
        invert_y=args.invert_y,
        invert_x=args.invert_x,
    )

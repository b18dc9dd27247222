"""``phasestream simulate``: a simulated SELUN detector for a pipeline started with ``run``."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.apps.cli.options import DEFAULT_DATA_ENDPOINT, DEFAULT_POSITIONS_ENDPOINT
from phasestream.apps.simulate import run_simulate


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="stream a simulated SELUN scan over DECTRIS Stream V2 (for a pipeline started with run)",
        description="Binds the detector's PUSH sockets (Stream V2 CBOR frames, bslz4) and a position "
        "channel, waits for a client, and streams a simulated or saved scan.",
    )
    p.add_argument("--data-endpoint", default=DEFAULT_DATA_ENDPOINT, help="default %(default)s")
    p.add_argument("--positions-endpoint", default=DEFAULT_POSITIONS_ENDPOINT, help="default %(default)s")
    p.add_argument("--rate-hz", type=float, help="frame rate; default: as fast as possible")
    p.add_argument("--positions", type=int, default=420, help="scan positions (default %(default)s)")
    p.add_argument("--from", dest="scan_file", type=Path, help="stream a scan saved by the demo (.npz)")
    p.add_argument("--scan-uid", help="scan uid to announce (default: a new uuid)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=simulate)


def simulate(args: argparse.Namespace) -> int:
    return run_simulate(
        data_endpoint=args.data_endpoint,
        positions_endpoint=args.positions_endpoint,
        rate_hz=args.rate_hz,
        n_positions=args.positions,
        scan_file=args.scan_file,
        scan_uid=args.scan_uid,
        progress=not args.no_progress,
    )

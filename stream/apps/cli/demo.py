"""``phasestream demo``: a simulated scan reconstructed live, end to end, on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.apps import demo as demo_app
from phasestream.apps.cli.options import add_tiled_options


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_tiled_options(p)
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    options = demo_app.DemoOptions(
        out=args.out,
        large=args.large,
        n_positions=args.positions,
        rate_hz=args.rate_hz,
        epochs_after_scan=args.epochs_after_scan,
        pipeline_file=args.pipeline,
        tiled_uri=args.tiled_uri,
        tiled_api_key_file=args.tiled_api_key_file,
    )
    return demo_app.run_demo(options)

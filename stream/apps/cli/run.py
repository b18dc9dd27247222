"""``phasestream run``: serve a pipeline from its topology file until Ctrl-C."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.apps.cli.options import add_scan_options, add_tiled_options, scan_options
from phasestream.apps.serve import serve_pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_tiled_options(p)
    add_scan_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return serve_pipeline(
        args.pipeline,
        tiled_uri=args.tiled_uri,
        tiled_api_key_file=args.tiled_api_key_file,
        host=args.host,
        options=scan_options(args),
    )

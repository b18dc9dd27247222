"""``phasestream view``: a live web page of the latest reconstruction in Tiled."""

from __future__ import annotations

import argparse

from phasestream.apps.cli.options import add_tiled_key_file_option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="serve a live web page of the latest reconstruction in Tiled",
        description="Follows /reconstructions through Tiled's websocket subscriptions and serves, on "
        "127.0.0.1, the object's amplitude and phase with the scan positions, the probe, the neural mosaic, "
        "the iteration, the R-factor and frames/s per stage. The API key never reaches the browser.",
    )
    p.add_argument("--tiled-uri", help="the Tiled server (env PHASESTREAM_TILED__URI)")
    add_tiled_key_file_option(p, p)
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
    p.set_defaults(func=view)


def view(args: argparse.Namespace) -> int:
    from phasestream.apps.viewer.app import run_viewer

    return run_viewer(
        tiled_uri=args.tiled_uri,
        tiled_api_key_file=args.tiled_api_key_file,
        metrics_urls=tuple(args.metrics),
        port=args.port,
        scan_uid=args.scan,
    )

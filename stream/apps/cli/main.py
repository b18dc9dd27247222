"""The ``phasestream`` command line. Each subcommand's --help says what it does and how to use it.

Each command group is a module of this package with an ``add_parser(subparsers)``; its command functions
turn the parsed options into typed values and call the library.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from importlib.metadata import entry_points

from phasestream.apps.cli import bluesky, demo, keys, replay, run, simulate, stage, view
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
# Commands that tidy up on SIGTERM as on Ctrl-C; the Bluesky commands handle both signals themselves.
STOPPED_BY_SIGTERM = ("demo", "run", "replay", "view")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in STOPPED_BY_SIGTERM:
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
    for module in (demo, run, simulate, replay, view, stage, keys, bluesky):
        module.add_parser(sub)
    # Command groups of other installed packages (phasestream_bench's bench and train, a facility's own).
    for group in sorted(entry_points(group="phasestream.commands"), key=lambda ep: ep.name):
        group.load()(sub)
    return parser

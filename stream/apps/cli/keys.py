"""``phasestream keys``: CurveZMQ keypairs for a pipeline whose stages run on several hosts."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.apps.keys import run_keys_generate


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    generate.set_defaults(func=generate_keys)


def generate_keys(args: argparse.Namespace) -> int:
    return run_keys_generate(args.directory, args.name, args.pipeline)

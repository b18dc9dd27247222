"""``phasestream stage``: one worker of one stage, as the launcher starts it (or by hand on another host)."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.runtime.config import load_pipeline
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.topology import place


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=stage)


def stage(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.pipeline)
    placement = place(pipeline, args.name, args.worker)
    stage_cls = resolve_stage(placement.spec.stage)
    stage_cls.from_placement(placement, pipeline).run()
    return 0

"""``phasestream keys generate``: CurveZMQ keypairs by name, or one per stage of a pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from phasestream.runtime.config import load_pipeline
from phasestream.runtime.curve import (
    PRIVATE_DIR,
    PUBLIC_DIR,
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    generate_keys,
    key_names,
)


def run_keys_generate(directory: Path, names: Sequence[str], pipeline_file: Path | None) -> int:
    """``phasestream keys generate DIR [--name NAME]... [--pipeline FILE]``: print what was written."""
    all_names = list(names)
    if pipeline_file is not None:
        pipeline = load_pipeline(pipeline_file)
        all_names += [n for n in key_names([s.name for s in pipeline.stages]) if n not in all_names]
    for secret_file in generate_keys(directory, all_names):
        name = secret_file.name.removesuffix(SECRET_SUFFIX)
        print(f"  {name:<12} public {directory / PUBLIC_DIR / (name + PUBLIC_SUFFIX)}, secret {secret_file}")
    print(
        f"Copy {directory / PUBLIC_DIR} to every host of the pipeline, and each "
        f"{PRIVATE_DIR}/<name>{SECRET_SUFFIX} only to the hosts that run <name> (keep it mode 0600)."
    )
    return 0

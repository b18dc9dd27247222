"""Prove from a ScanEnd's accounting that every frame the detector announced is accounted for.

The source stage must explain each announced frame: forwarded, rejected for a reason, or missing
(never arrived). Between stages, what one stage sent the next must have received.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

REJECTED_PREFIX = "rejected_"
# Frames the detector did not announce: a second copy of a frame counted once elsewhere, and images
# numbered beyond number_of_images. They are rejected and counted, but are not among the announced frames.
_NOT_ANNOUNCED = ("rejected_duplicate_frame", "rejected_image_id_out_of_range")


def per_stage(accounting: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Sum the counts of all workers of each stage (keys in accounting are ``stage.worker``)."""
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for label, counts in accounting.items():
        stage = label.rsplit(".", 1)[0]
        for key, value in counts.items():
            totals[stage][key] += value
    return {stage: dict(counts) for stage, counts in totals.items()}


def unaccounted_frames(frames_sent: int, accounting: dict[str, dict[str, int]]) -> list[str]:
    """Every discrepancy, in words; an empty list means every frame is accounted for."""
    stages = per_stage(accounting)
    if not stages:
        return ["no stage reported any accounting"]
    order = list(stages)
    problems = []
    source = stages[order[0]]
    rejected = sum(v for k, v in source.items() if k.startswith(REJECTED_PREFIX) and k not in _NOT_ANNOUNCED)
    explained = source.get("frames_forwarded", 0) + rejected + source.get("missing_frames", 0)
    if explained != frames_sent:
        problems.append(
            f"{order[0]}: the detector announced {frames_sent} frames, but {explained} are explained "
            f"(forwarded + rejected + missing)"
        )
    for upstream, downstream in itertools.pairwise(order):
        sent = stages[upstream].get("frames_sent", 0)
        received = stages[downstream].get("frames_received", 0)
        if sent != received:
            problems.append(f"{upstream} sent {sent} frames but {downstream} received {received}")
    return problems

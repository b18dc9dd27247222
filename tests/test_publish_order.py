"""Publish keeps the newest estimate per scan and product, whatever order several upstream workers deliver."""

from __future__ import annotations

from collections import Counter

import numpy as np

from phasestream.runtime.messages import Product, Reconstruction
from phasestream.stages.publish import PublishStage


def _stage() -> PublishStage:
    stage = PublishStage.__new__(PublishStage)  # no Tiled server needed for the ordering rule
    stage._latest = {}
    counts: Counter[str] = Counter()
    stage.count = lambda scan_uid, key, n=1: counts.update({key: n})  # type: ignore[method-assign]
    stage.counts = counts  # type: ignore[attr-defined]
    return stage


def _rec(iteration: int, final: bool = False, product: Product = Product.OBJECT) -> Reconstruction:
    return Reconstruction(
        scan_uid="s",
        seq=iteration,
        product=product,
        algorithm="epie",
        iteration=iteration,
        positions_used=4,
        final=final,
        object_pixel_size_m=1e-8,
        object=np.ones((4, 4), np.complex64),
        probe=np.ones((2, 2), np.complex64),
    )


def test_a_snapshot_arriving_after_the_final_object_is_dropped_and_counted() -> None:
    stage = _stage()
    assert not stage._is_stale(_rec(40, final=True))
    assert stage._is_stale(_rec(38))
    assert stage.counts["object_stale_dropped"] == 1


def test_products_are_ordered_separately_and_newer_snapshots_pass() -> None:
    stage = _stage()
    assert not stage._is_stale(_rec(10))
    assert not stage._is_stale(_rec(12))
    assert stage._is_stale(_rec(11))
    # A denoised copy of an older iteration is not stale against the object: it is another node.
    assert not stage._is_stale(_rec(8, product=Product.DENOISED))
    assert not stage._is_stale(_rec(12, final=True))

"""Publish reconstructions to Tiled under ``/reconstructions/<scan_uid>/``, never blocking the pipeline.

The writer thread of ``TiledPublisher`` keeps only the latest pending array per node, so a slow or
unreachable server costs intermediate previews, never frames or the solver's time. At the end of a
scan the stage waits (bounded) for the final estimate to land and records the scan's accounting.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import ConfigError
from phasestream.messages import FrameBatch, Message, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.stage import Stage
from phasestream.tiled_publisher import TiledPublisher


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flush_timeout_s: float = Field(default=60.0, gt=0, description="wait for the final write at scan end")


class PublishStage(Stage):
    Config = PublishConfig
    config: PublishConfig

    def setup(self) -> None:
        tiled = self.pipeline.tiled
        if not tiled.uri:
            raise ConfigError(
                "publish needs tiled.uri: run the pipeline with `phasestream run` (it starts an embedded "
                "server) or pass --tiled-uri / set PHASESTREAM_TILED__URI"
            )
        self._publisher = TiledPublisher(tiled.uri, tiled.api_key, stage=self.stage_name, worker=self.worker)
        # The newest (final, iteration) published per scan and product: see _is_stale.
        self._latest: dict[tuple[str, Product], tuple[bool, int]] = {}

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        self._publisher.submit_metadata(
            message.scan_uid,
            {
                "scan_uid": message.scan_uid,
                "status": "running",
                "planned_frames": message.planned_frames,
                "geometry": message.geometry.model_dump(mode="json"),
                "config_hash": message.config_hash,
            },
        )
        return ()

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            # Frames are not published: count them so the accounting still closes.
            self.count(message.scan_uid, "frames_not_published", len(message.frame_indices))
            return ()
        if isinstance(message, Reconstruction):
            self._publish(message)
        return ()

    def _is_stale(self, rec: Reconstruction) -> bool:
        """Whether a newer estimate of this product was already published.

        With several upstream workers (denoise scaled out) publish reads several sockets, and a snapshot
        can arrive after the final object that followed it by milliseconds: it must not replace it.
        """
        key, order = (rec.scan_uid, rec.product), (rec.final, rec.iteration)
        if order < self._latest.get(key, (False, -1)):
            self.count(rec.scan_uid, f"{rec.product.value}_stale_dropped")
            return True
        self._latest[key] = order
        return False

    def _publish(self, rec: Reconstruction) -> None:
        if self._is_stale(rec):
            return
        summary = {
            "algorithm": rec.algorithm,
            "iteration": rec.iteration,
            "positions_used": rec.positions_used,
            "object_pixel_size_m": rec.object_pixel_size_m,
            "origin_m": list(rec.origin_m),
            "final": rec.final,
            "quality": rec.quality,
        }
        if rec.product is Product.OBJECT:
            self._publisher.submit_array(rec.scan_uid, "object", rec.object)
            self._publisher.submit_array(rec.scan_uid, "probe", rec.probe)
            if len(rec.positions_m):
                self._publisher.submit_array(rec.scan_uid, "positions", np.ascontiguousarray(rec.positions_m))
            self._publisher.submit_metadata(rec.scan_uid, summary)
        else:
            # A preview or a denoised copy sits beside the object; its figures are kept under its own
            # name so they never overwrite the solver's iteration and quality.
            self._publisher.submit_array(rec.scan_uid, rec.product.value, rec.object, metadata=summary)
            self._publisher.submit_metadata(rec.scan_uid, {rec.product.value: summary})
        self.count(rec.scan_uid, f"{rec.product.value}_reconstructions_received")
        self.report_status(scan_uid=rec.scan_uid, published_iteration=rec.iteration, final=rec.final)

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        for product in Product:
            self._latest.pop((message.scan_uid, product), None)
        self._publisher.submit_metadata(
            message.scan_uid,
            {"status": "complete", "frames_sent": message.frames_sent, "accounting": message.accounting},
        )
        landed = self._publisher.flush(self.config.flush_timeout_s)
        self.count(message.scan_uid, "publish_failures", self._publisher.failed)
        if not landed:
            self.count(message.scan_uid, "publish_flush_timeouts")
        return ()

    def close(self) -> None:
        self._publisher.close()

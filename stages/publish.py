"""Publish reconstructions to Tiled under ``/reconstructions/<scan_uid>/``, never blocking the pipeline.

The writer thread of ``TiledPublisher`` keeps only the latest pending array per node, so a slow or
unreachable server costs intermediate previews, never frames or the solver's time. At the end of a
scan the stage waits (bounded) for the final estimate to land and records the scan's accounting.

The final result (the final object, probe and positions, and the scan's complete metadata: geometry,
planned frames, config hash, the final figures, status and accounting) goes to Tiled at the scan's end as
one delivery that survives an outage: it is kept in ``<run_dir>/pending/<worker>/`` until Tiled has taken
every part, re-sent on a schedule meanwhile (also after the scan, across later scans, and by the next start
of this worker), and counted as ``results_pending`` in the scan's accounting and in
``phasestream_results_pending``.

Each completed scan is also written as one CXI result file (``phasestream.formats.result_file``) in
``results_dir``: object, probe modes, the positions used, pixel size and origin, geometry, the pipeline's
stage settings, the error history and the frame accounting, for people to keep and open elsewhere.

A scan uid that is not a safe name (``phasestream.runtime.scan_uid``) would name a file outside
``results_dir``
or a node outside ``/reconstructions/``: such a scan is refused (``unsafe_scan_uid``, counted and said
once), and nothing of it is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import ConfigError, PhasestreamError
from phasestream.formats.result_file import ResultGeometry, ScanResult, write_result_file
from phasestream.runtime import metrics
from phasestream.runtime.messages import FrameBatch, Message, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.scan_uid import check_scan_uid
from phasestream.runtime.stage import Stage
from phasestream.runtime.tiled.publisher import TiledPublisher
from phasestream.runtime.tiled.updates import FinalResult

RESULTS_PENDING = "results_pending"  # the accounting key of a scan whose final result waits for Tiled


class PublishConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flush_timeout_s: float = Field(default=60.0, gt=0, description="wait for the final write at scan end")
    result_retry_s: float = Field(
        default=30.0,
        gt=0,
        description="longest wait between re-sends of a final result that Tiled has not taken yet",
    )
    results_dir: Path | None = Field(
        default=None,
        description="one CXI result file per completed scan goes here; default: results/ beside the "
        "pipeline's run_dir",
    )


class PublishStage(Stage):
    Config = PublishConfig
    config: PublishConfig

    def setup(self) -> None:
        tiled = self.pipeline.tiled
        # Final results wait here until Tiled has them; per worker, so that each re-sends its own.
        self._pending_dir = self.pipeline.run_dir / "pending" / self.placement.label
        if not tiled.uri:
            raise ConfigError(
                "publish needs tiled.uri: run the pipeline with `phasestream run` (it starts an embedded "
                "server) or pass --tiled-uri / set PHASESTREAM_TILED__URI"
            )
        self._publisher = TiledPublisher(
            tiled.uri,
            tiled.api_key,
            stage=self.stage_name,
            worker=self.worker,
            pending_dir=self._pending_dir,
            result_retry_s=self.config.result_retry_s,
        )
        # The newest (final, iteration) published per scan and product: see _is_stale.
        self._latest: dict[tuple[str, Product], tuple[bool, int]] = {}
        self._starts: dict[str, ScanStart] = {}
        self._finals: dict[str, Reconstruction] = {}
        self._unsafe_uids: set[str] = set()
        self._results_dir = self.config.results_dir or self.pipeline.run_dir.absolute().parent / "results"

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        if self._refused(message.scan_uid, "its ScanStart"):
            return ()
        self._starts[message.scan_uid] = message
        self._publisher.submit_metadata(message.scan_uid, _start_metadata(message))
        return ()

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            # Frames are not published: count them so the accounting still closes.
            self.count(message.scan_uid, "frames_not_published", len(message.frame_indices))
            return ()
        if isinstance(message, Reconstruction) and not self._refused(message.scan_uid, "a Reconstruction"):
            self._publish(message)
        return ()

    def _refused(self, scan_uid: str, where: str) -> bool:
        """Whether the uid is unsafe as a file or node name: then counted, and said once per scan."""
        try:
            check_scan_uid(scan_uid, f"{where} at {self.placement.label}")
        except PhasestreamError as error:
            self.count(scan_uid, f"{error.reason}_messages")
            metrics.MESSAGES_REJECTED.labels(reason=error.reason, **self._labels).inc()
            if scan_uid not in self._unsafe_uids:
                self._unsafe_uids.add(scan_uid)
                self.warn(error.reason, f"{error}; nothing of this scan is published or written")
            return True
        return False

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
        # Units travel with the first and the final arrays only: each costs one more request.
        with_units = rec.final or (rec.scan_uid, rec.product) not in self._latest
        if self._is_stale(rec):
            return
        summary = _summary(rec)
        if rec.product is Product.OBJECT and rec.final:
            # It goes to Tiled with the scan's end, as part of the final result that survives an outage.
            self._finals[rec.scan_uid] = rec
        elif rec.product is Product.OBJECT:
            units = (_object_units(rec), _probe_units(rec), _POSITION_UNITS) if with_units else ({}, {}, {})
            self._publisher.submit_array(rec.scan_uid, "object", rec.object, metadata=units[0])
            self._publisher.submit_array(rec.scan_uid, "probe", rec.probe, metadata=units[1])
            if len(rec.positions_m):
                positions = np.ascontiguousarray(rec.positions_m)
                self._publisher.submit_array(rec.scan_uid, "positions", positions, metadata=units[2])
            self._publisher.submit_metadata(rec.scan_uid, summary)
        else:
            # A preview or a denoised copy sits beside the object; its figures are kept under its own
            # name so they never overwrite the solver's iteration and quality.
            self._publisher.submit_array(rec.scan_uid, rec.product.value, rec.object, metadata=summary)
            self._publisher.submit_metadata(rec.scan_uid, {rec.product.value: summary})
        self.count(rec.scan_uid, f"{rec.product.value}_reconstructions_received")
        self.report_status(scan_uid=rec.scan_uid, published_iteration=rec.iteration, final=rec.final)

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        uid = message.scan_uid
        for product in Product:
            self._latest.pop((uid, product), None)
        start, final = self._starts.pop(uid, None), self._finals.pop(uid, None)
        if self._refused(uid, "its ScanEnd"):
            self._unsafe_uids.discard(uid)
            return ()
        result_file = self._write_result(message, start, final)
        self._publisher.submit_result(self._final_result(message, start, final, result_file))
        landed = self._publisher.flush(self.config.flush_timeout_s)
        # This scan's own failures: the publisher's total runs over every scan it served.
        self.count(uid, "publish_failures", self._publisher.take_failures(uid))
        if not landed:
            self.count(uid, "publish_flush_timeouts")
        if self._publisher.is_pending(uid):
            self.count(uid, RESULTS_PENDING)
            self.warn(
                RESULTS_PENDING,
                f"scan {uid}: Tiled at {self._publisher.uri} has not taken its final result yet; it is "
                f"kept in {self._pending_dir} and re-sent until Tiled takes it "
                f"({self._publisher.pending_results} result(s) wait)",
            )
        return ()

    def _final_result(
        self, end: ScanEnd, start: ScanStart | None, final: Reconstruction | None, result_file: Path | None
    ) -> FinalResult:
        """What Tiled must end up holding for the scan: all of its metadata, and the final estimate."""
        metadata: dict[str, Any] = {"scan_uid": end.scan_uid}
        if start is not None:
            metadata.update(_start_metadata(start))
        arrays: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        if final is not None:
            metadata.update(_summary(final))
            arrays["object"] = (final.object, _object_units(final))
            arrays["probe"] = (final.probe, _probe_units(final))
            if len(final.positions_m):
                arrays["positions"] = (np.ascontiguousarray(final.positions_m), _POSITION_UNITS)
        metadata.update(status="complete", frames_sent=end.frames_sent, accounting=end.accounting)
        if result_file is not None:
            metadata["result_file"] = str(result_file)
        return FinalResult(end.scan_uid, metadata, arrays)

    def _write_result(
        self, end: ScanEnd, start: ScanStart | None, final: Reconstruction | None
    ) -> Path | None:
        """The scan's result file, from its final object; a scan without one (no frames) has none."""
        if start is None or final is None:
            return None
        geometry = start.geometry
        result = ScanResult(
            scan_uid=end.scan_uid,
            object=final.object,
            probe=final.probe if final.probe.ndim == 3 else final.probe[None],
            positions_m=final.positions_m,
            object_pixel_size_m=final.object_pixel_size_m,
            origin_m=final.origin_m,
            geometry=ResultGeometry(
                energy_kev=geometry.energy_kev,
                detector_distance_m=geometry.detector_distance_m,
                detector_pixel_size_m=geometry.pixel_size_m,
                detector_shape_px=geometry.detector_shape_px,
            ),
            algorithm=final.algorithm,
            settings={spec.name: spec.config for spec in self.pipeline.stages},
            error_history=final.error_history,
            epochs=len(final.error_history),
            stop_reason=final.stop_reason,
            accounting=end.accounting,
            config_hash=start.config_hash,
        )
        path = self._results_dir / f"reconstruction-{end.scan_uid}.cxi"
        try:
            self._results_dir.mkdir(parents=True, exist_ok=True)
            write_result_file(path, result)
        except (OSError, PhasestreamError) as error:
            self.count(end.scan_uid, "result_file_failures")
            self.warn("result_file", f"scan {end.scan_uid}: cannot write {path} ({error}); check results_dir")
            return None
        self.note("result_file", f"scan {end.scan_uid}: result written to {path}")
        return path

    def close(self) -> None:
        self._publisher.close()


_POSITION_UNITS = {"units": "m", "columns": ["y", "x"], "meaning": "probe centres on the sample"}


def _start_metadata(start: ScanStart) -> dict[str, Any]:
    return {
        "scan_uid": start.scan_uid,
        "status": "running",
        "planned_frames": start.planned_frames,
        "geometry": start.geometry.model_dump(mode="json"),
        "config_hash": start.config_hash,
    }


def _summary(rec: Reconstruction) -> dict[str, Any]:
    """A reconstruction's figures, as the scan's metadata (or a product's entry in it) carries them."""
    summary: dict[str, Any] = {
        "algorithm": rec.algorithm,
        "iteration": rec.iteration,
        "positions_used": rec.positions_used,
        "object_pixel_size_m": rec.object_pixel_size_m,
        "origin_m": list(rec.origin_m),
        "final": rec.final,
        "quality": rec.quality,
    }
    if rec.final and rec.error_history:
        summary.update(epochs=len(rec.error_history), error_history=rec.error_history)
        summary["stop_reason"] = rec.stop_reason
    return summary


def _object_units(rec: Reconstruction) -> dict[str, object]:
    return {
        "units": "complex transmission",
        "pixel_size_m": rec.object_pixel_size_m,
        "origin_m": list(rec.origin_m),
        "axes": ["y", "x"],
    }


def _probe_units(rec: Reconstruction) -> dict[str, object]:
    return {
        "units": "sqrt(photons) per pixel",
        "pixel_size_m": rec.object_pixel_size_m,
        "axes": ["mode", "y", "x"] if np.ndim(rec.probe) == 3 else ["y", "x"],
    }

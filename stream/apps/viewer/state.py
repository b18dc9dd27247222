"""What the live viewer's page shows, kept current by the Tiled follower and the metrics scraper.

Writers (one follower thread, one scraper thread) call the ``set_*`` methods; each change bumps a version.
Readers (one thread per open page, serving Server-Sent Events) wait for a newer version and send the
summary as JSON; images and positions, the bulky parts, are fetched by the page only when their own
version changes. Nothing here ever holds the Tiled API key.
"""

from __future__ import annotations

import json
import math
import threading
import time
from enum import StrEnum
from typing import Any

import numpy as np

from phasestream.apps.viewer.images import RenderedImage

# Scan metadata the publish stage writes (``phasestream.stages.publish``) that the page shows as is.
SCAN_FIELDS = ("status", "algorithm", "iteration", "positions_used", "planned_frames", "frames_sent", "final")
QUALITY_FIELDS = ("r_factor", "fourier_error")
POSITION_DECIMALS = 2  # 1/100 px: finer than any screen shows, and a third of the JSON of full floats


class LinkState(StrEnum):
    """How the viewer stands with Tiled."""

    CONNECTING = "connecting"
    WAITING = "waiting"  # connected, but no scan to show yet
    LIVE = "live"
    UNREACHABLE = "unreachable"


class ImageName(StrEnum):
    AMPLITUDE = "amplitude"
    PHASE = "phase"
    PROBE = "probe"
    MOSAIC = "mosaic"


def _json_value(value: Any) -> Any:
    """``value`` unless it is a float JSON cannot hold (NaN, ±inf): those become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def scan_summary(scan_uid: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The scan's figures for the page from its Tiled metadata; absent figures are None."""
    quality = metadata.get("quality")
    quality = quality if isinstance(quality, dict) else {}
    summary = {"uid": scan_uid}
    summary.update({name: _json_value(metadata.get(name)) for name in SCAN_FIELDS})
    summary.update({name: _json_value(quality.get(name)) for name in QUALITY_FIELDS})
    return summary


class LiveView:
    """The latest state of the page, versioned; thread-safe."""

    def __init__(self, tiled_uri: str) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._version = 0
        self._tiled_uri = tiled_uri
        self._link: dict[str, str] = {"state": LinkState.CONNECTING, "detail": ""}
        self._scan: dict[str, Any] | None = None
        self._images: dict[ImageName, tuple[int, RenderedImage]] = {}
        self._positions: tuple[int, bytes, int] | None = None  # version, JSON, count
        self._stages: list[dict[str, float | str]] = []
        self._metrics_errors: dict[str, str] = {}
        self._summary_json: tuple[int, bytes] | None = None

    # -- writers ----------------------------------------------------------------------------------

    def set_link(self, state: LinkState, detail: str = "") -> None:
        with self._cond:
            if self._link != {"state": state, "detail": detail}:
                self._link = {"state": state, "detail": detail}
                self._changed()

    def start_scan(self, scan_uid: str | None, metadata: dict[str, Any] | None = None) -> None:
        """Show ``scan_uid`` (None: no scan), forgetting the images and positions of the previous one."""
        with self._cond:
            # When the scan last changed is unknown until its next update arrives.
            self._scan = None if scan_uid is None else scan_summary(scan_uid, metadata or {})
            self._images.clear()
            self._positions = None
            self._changed()

    def set_scan_metadata(self, scan_uid: str, metadata: dict[str, Any]) -> None:
        """The scan's metadata as it just changed in Tiled."""
        with self._cond:
            self._scan = {**scan_summary(scan_uid, metadata), "updated_unix_s": time.time()}
            self._changed()

    def set_image(self, name: ImageName, image: RenderedImage) -> None:
        with self._cond:
            self._version += 1
            self._images[name] = (self._version, image)
            self._changed(bumped=True)

    def set_positions(self, positions_px: np.ndarray | None) -> None:
        """Probe centres (n, 2) in pixels of the object plane, or None to show none."""
        with self._cond:
            if positions_px is None:
                self._positions = None
            else:
                self._version += 1
                rounded = np.round(np.asarray(positions_px, dtype=np.float64), POSITION_DECIMALS)
                body = {
                    "version": self._version,
                    "y_px": rounded[:, 0].tolist(),
                    "x_px": rounded[:, 1].tolist(),
                }
                self._positions = (self._version, json.dumps(body).encode(), len(rounded))
            self._changed(bumped=positions_px is not None)

    def set_stages(self, rows: list[dict[str, float | str]], errors: dict[str, str]) -> None:
        with self._cond:
            self._stages = rows
            self._metrics_errors = dict(errors)
            self._changed()

    def close(self) -> None:
        """Wake every waiting reader for good."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _changed(self, bumped: bool = False) -> None:
        if not bumped:
            self._version += 1
        self._summary_json = None
        self._cond.notify_all()

    # -- readers ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self) -> tuple[int, bytes]:
        """The current version and the page's summary as JSON."""
        with self._cond:
            return self._snapshot()

    def wait_newer(self, version: int, timeout_s: float) -> tuple[int, bytes] | None:
        """The first snapshot newer than ``version``, or None after ``timeout_s`` or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed or self._version > version, timeout_s):
                return None
            return None if self._closed else self._snapshot()

    def image_png(self, name: ImageName) -> bytes | None:
        with self._cond:
            shown = self._images.get(name)
            return None if shown is None else shown[1].png

    def positions_json(self) -> bytes | None:
        with self._cond:
            return None if self._positions is None else self._positions[1]

    def _snapshot(self) -> tuple[int, bytes]:
        if self._summary_json is None or self._summary_json[0] != self._version:
            images = {
                name.value: {
                    "version": version,
                    "shape_px": list(image.shape_px),
                    "source_shape_px": list(image.source_shape_px),
                }
                for name, (version, image) in self._images.items()
            }
            positions = None
            if self._positions is not None:
                positions = {"version": self._positions[0], "count": self._positions[2]}
            summary = {
                "version": self._version,
                "tiled_uri": self._tiled_uri,
                "link": self._link,
                "scan": self._scan,
                "images": images,
                "positions": positions,
                "stages": self._stages,
                "metrics_errors": self._metrics_errors,
            }
            self._summary_json = (self._version, json.dumps(summary).encode())
        return self._summary_json

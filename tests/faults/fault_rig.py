"""What the fault tests share: stages the launcher runs by ``module:Class``, and a launched pipeline.

The launcher's workers import this module because the rig puts this folder on ``PYTHONPATH``. The
pipeline is ingest (the real stage, fed by the SELUN emitter) → ``relay`` (``Relay`` below, two workers)
→ ``collect`` (``Collector``), so a test can kill a relay worker, or make it raise, while frames flow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict

from phasestream.apps.launch.launcher import Launcher
from phasestream.formats.position_channel import encode_positions, encode_positions_end
from phasestream.formats.stream_v2.encode import encode_image, encode_message, end_fields, start_fields
from phasestream.runtime.config import validate_pipeline
from phasestream.runtime.messages import FrameBatch, Message, ScanEnd
from phasestream.runtime.stage import Stage
from phasestream.simulators.selun import SelunEmitter

_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
FAULTS_DIR = Path(__file__).resolve().parent
SHAPE_PX = (8, 8)
BATCH_SIZE = 4
SCAN_END_TIMEOUT_S = 2.0
STALLED_SCAN_TIMEOUT_S = 2.0


class RelayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_s: float = 0.0  # per batch: a slow worker holds frames in its queue, as a busy solver would
    fail_on_index: int | None = None  # raise on the batch holding this frame index


class Relay(Stage):
    """Passes frames on, slowly if asked; raises on one chosen batch (a bug that hits one message)."""

    Config = RelayConfig
    config: RelayConfig

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            if self.config.fail_on_index in message.frame_indices:
                raise RuntimeError(f"injected fault on frame {self.config.fail_on_index}")
            time.sleep(self.config.delay_s)
        yield message


class CollectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_dir: str


class Collector(Stage):
    """The last stage: writes the frame indices it received to ``<out_dir>/<scan_uid>.json``."""

    Config = CollectorConfig
    config: CollectorConfig

    def setup(self) -> None:
        self._indices: dict[str, list[int]] = {}

    def process(self, message: Message) -> Iterable[Message]:
        if isinstance(message, FrameBatch):
            self._indices.setdefault(message.scan_uid, []).extend(message.frame_indices)
        return ()

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        path = Path(self.config.out_dir) / f"{message.scan_uid}.json"
        path.write_text(json.dumps(self._indices.pop(message.scan_uid, [])))
        return ()


@dataclass
class Scan:
    """One SELUN series: ``n`` frames of which the detector sends the first ``sent`` (all by default)."""

    scan_uid: str
    series_id: int
    n: int

    def data_messages(self, sent: int | None = None, end: bool = True) -> list[bytes]:
        unique_id = f"series-{self.scan_uid}"
        start = start_fields(
            series_id=self.series_id, series_unique_id=unique_id, shape_px=SHAPE_PX, dtype="uint16",
            number_of_images=self.n, energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6,
            count_time_s=1e-3, frame_time_s=1e-3,
            user_data={"scan_uid": self.scan_uid, "scan_shape": [self.n]},
        )  # fmt: skip
        frames = np.ones((self.n, *SHAPE_PX), dtype=np.uint16)
        images = [
            encode_image(frames[i], series_id=self.series_id, series_unique_id=unique_id, image_id=i,
                         series_date=datetime.now(UTC))
            for i in range(self.n if sent is None else sent)
        ]  # fmt: skip
        end_message = encode_message(end_fields(series_id=self.series_id, series_unique_id=unique_id))
        return [encode_message(start), *images, *([end_message] if end else [])]

    def position_messages(self, first: int = 0, stop: int | None = None, end: bool = True) -> list[bytes]:
        """Positions of frames ``first`` to ``stop`` (all by default) in one batch, then the series end."""
        indices = list(range(first, self.n if stop is None else stop))
        positions = np.column_stack([np.asarray(indices) * 1e-7, np.zeros(len(indices))])
        batch = encode_positions(self.series_id, indices, positions)
        return [batch, *([encode_positions_end(self.series_id)] if end else [])]


@dataclass
class FaultRig:
    launcher: Launcher
    emitter: SelunEmitter
    run_dir: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    _series: int = 1

    def new_scan(self, name: str, n: int) -> Scan:
        self._series += 1
        return Scan(f"{name}-{self._series}", self._series, n)

    def wait_for(self, predicate, timeout_s: float = 60.0) -> dict[str, Any]:
        """The first control event (kept in ``events``) for which ``predicate`` holds."""
        for event in self.launcher.events(timeout_s=timeout_s):
            self.events.append(event)
            if predicate(event):
                return event
        pytest.fail(f"no such event within {timeout_s} s; last events: {self.events[-5:]}")

    def scan_end(self, scan_uid: str, sender: str = "collect.0") -> dict[str, Any]:
        return self.wait_for(
            lambda e: e["event"] == "scan_end" and e["sender"] == sender and e["scan_uid"] == scan_uid
        )

    def collected(self, scan_uid: str) -> list[int]:
        return json.loads((self.run_dir / f"{scan_uid}.json").read_text())

    def metric(self, label: str, name: str, **labels: str) -> float:
        """Worker ``label``'s sample of ``name`` with ``labels`` (stage and worker are the worker's)."""
        stage, worker = label.rsplit(".", 1)
        wanted = {"stage": stage, "worker": worker, **labels}
        port = self.launcher.workers[label].metrics_port
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
            match = _SAMPLE.match(line)
            if match and match[1] == name and dict(_LABEL.findall(match[2])) == wanted:
                return float(match[3])
        return 0.0

    def logs(self, reason: str) -> list[str]:
        return [e["text"] for e in self.events if e["event"] == "log" and e["reason"] == reason]


@contextmanager
def fault_rig(
    relay: dict[str, Any], max_restarts: int = 3, scan_end_timeout_s: float = SCAN_END_TIMEOUT_S
) -> Iterator[FaultRig]:
    run_dir = Path(tempfile.mkdtemp(prefix="ps-fault-", dir="/tmp"))
    config = validate_pipeline(
        {
            "name": "faults",
            "run_dir": str(run_dir),
            "scan_end_timeout_s": scan_end_timeout_s,
            "restarts": {"max_restarts": max_restarts, "backoff_s": 0.2, "max_backoff_s": 1.0},
            "detector": {
                "data_endpoint": f"ipc://{run_dir}/det.sock",
                "positions_endpoint": f"ipc://{run_dir}/pos.sock",
            },
            "stages": [
                {
                    "name": "ingest",
                    "stage": "ingest",
                    "config": {"batch_size": BATCH_SIZE, "stalled_scan_timeout_s": STALLED_SCAN_TIMEOUT_S},
                },
                {"name": "relay", "stage": "fault_rig:Relay", "workers": 2, "config": relay},
                {"name": "collect", "stage": "fault_rig:Collector", "config": {"out_dir": str(run_dir)}},
            ],
        }
    )
    emitter = SelunEmitter(config.detector.data_endpoint, config.detector.positions_endpoint, linger_s=1.0)
    launcher = Launcher(config)
    try:
        with pytest.MonkeyPatch.context() as patch:
            path = os.pathsep.join(filter(None, [str(FAULTS_DIR), os.getenv("PYTHONPATH")]))
            patch.setenv("PYTHONPATH", path)
            launcher.start(ready_timeout_s=60)
        yield FaultRig(launcher, emitter, run_dir)
    finally:
        launcher.stop()
        emitter.close()
        shutil.rmtree(run_dir, ignore_errors=True)

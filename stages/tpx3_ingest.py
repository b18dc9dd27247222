"""Timepix3 ingest: reads SERVAL's raw TCP stream, decodes it, bins the hits into one frame per TDC
trigger, and hands the frames to the SELUN ingest's machinery (validation, the join with the position
channel, batching, ``ScanEnd`` accounting), which it subclasses.

SERVAL's raw destination ``tcp://listen@host:port`` listens and the client connects; a ZeroMQ STREAM
socket speaks plain TCP, so the runtime polls it beside the position channel. STREAM delivers
``[peer id, bytes]`` and an empty message when the connection opens and when it closes. A measurement is
one connection: the first bytes open a scan, the close is the detector's end of it. The raw stream carries
no metadata, so the geometry, the region of the chip that makes a frame and the number of triggers
(SERVAL's ``nTriggers``: the frames the scan announces) come from this stage's config. Frame ``k`` is the
hits from trigger ``k`` to the next one (or for ``exposure_s`` after it); its image id, and so the
position it joins, follows the TDC trigger counter.

The position channel is the SELUN path's (``position_channel.py``); since the detector stream names no
series, a scan adopts the first series the channel announces: one already waiting when the scan opens,
else the first to arrive after. Received bytes are decoded in slabs of ``decode_bytes``, or when the
socket falls quiet, because the decoder's fixed cost per call (tens of µs) would dominate at the few kB
a TCP read returns. Decoding problems (unknown packet types, truncated chunks) are counted in the scan's
accounting and ``phasestream_messages_rejected_total``, reported as warnings, and cost nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum

import numpy as np
import zmq
from pydantic import Field, model_validator

from phasestream.errors import DetectorMessageError, FrameValidationError
from phasestream.formats.position_channel import PositionBatch, PositionsEnd
from phasestream.formats.stream_v2.decode import EndMessage, ImageMessage, StartMessage
from phasestream.formats.tpx3.decode import Tpx3Decoder
from phasestream.formats.tpx3.frames import BuiltFrame, FrameBuilder
from phasestream.formats.tpx3.packets import CHIP_SIZE_PX, TICK_NS, TdcEdge, Tpx3Decoded
from phasestream.runtime import metrics
from phasestream.runtime.inbox import RawInput
from phasestream.runtime.messages import Message
from phasestream.stages.ingest.config import IngestConfig
from phasestream.stages.ingest.stage import IngestStage

# A series id no position channel sends (they are non-negative): the scan has not adopted one yet.
_NO_SERIES = -1


class TriggerEdge(StrEnum):
    TDC1_RISE = "tdc1_rise"
    TDC1_FALL = "tdc1_fall"
    TDC2_RISE = "tdc2_rise"
    TDC2_FALL = "tdc2_fall"


class FrameDtype(StrEnum):
    UINT16 = "uint16"
    UINT32 = "uint32"


class Tpx3IngestConfig(IngestConfig):
    n_triggers: int = Field(ge=1, description="exposures per scan (SERVAL nTriggers): the frames announced")
    energy_kev: float = Field(gt=0, description="photon energy (keV)")
    detector_distance_m: float = Field(gt=0, description="sample to detector distance (m)")
    pixel_size_m: float = Field(default=55e-6, gt=0, description="Timepix3: 55 µm")
    roi_origin_px: tuple[int, int] = Field(
        default=(0, 0), description="chip (row, column) of frame pixel 0,0"
    )
    roi_shape_px: tuple[int, int] = Field(
        default=(CHIP_SIZE_PX, CHIP_SIZE_PX), description="frame (rows, cols)"
    )
    exposure_s: float | None = Field(
        default=None, gt=0, description="frame = hits this long after its trigger; None: until the next one"
    )
    lateness_s: float = Field(
        default=1e-3, ge=0, description="readout disorder allowed: a frame goes out this long after its end"
    )
    trigger_edge: TriggerEdge = Field(
        default=TriggerEdge.TDC1_RISE, description="the TDC input and edge that marks each exposure's start"
    )
    chip: int = Field(default=0, ge=0, le=255, description="chip index whose hits make the frames")
    frame_dtype: FrameDtype = Field(default=FrameDtype.UINT16, description="dtype of the frames built")
    scan_uid_prefix: str = Field(
        default="tpx3", pattern=r"^[A-Za-z0-9_.-]+$", description="scan uids are <prefix>-<UTC time>-<count>"
    )
    scan_shape: tuple[int, ...] = Field(default=(), description="grid shape of the scan, if any (rows, cols)")
    decode_bytes: int = Field(default=1 << 20, ge=8, description="received bytes gathered before a decode")

    @model_validator(mode="after")
    def _roi_on_chip(self) -> Tpx3IngestConfig:
        (row, col), (height, width) = self.roi_origin_px, self.roi_shape_px
        if min(row, col) < 0 or min(height, width) < 1 or max(row + height, col + width) > CHIP_SIZE_PX:
            raise ValueError(
                f"roi_origin_px={self.roi_origin_px} with roi_shape_px={self.roi_shape_px} leaves the "
                f"{CHIP_SIZE_PX}×{CHIP_SIZE_PX} chip: choose a region inside it"
            )
        return self


class Tpx3IngestStage(IngestStage):
    Config = Tpx3IngestConfig
    config: Tpx3IngestConfig

    def setup(self) -> None:
        super().setup()
        self._received: list[bytes] = []
        self._received_bytes = 0
        self._decoder: Tpx3Decoder | None = None
        self._builder: FrameBuilder | None = None
        self._series_adopted = False
        self._measurements = 0

    def raw_inputs(self) -> dict[str, RawInput]:
        inputs = super().raw_inputs()
        inputs["detector"] = RawInput(zmq.STREAM, self.pipeline.detector.data_endpoint)
        return inputs

    def handle_raw(self, port: str, frames: list[bytes]) -> Iterable[Message]:
        if port != "detector":
            return super().handle_raw(port, frames)
        if len(frames) != 2:
            raise DetectorMessageError(
                f"detector message has {len(frames)} parts; a ZeroMQ STREAM socket delivers "
                "[peer id, bytes]: point detector.data_endpoint at SERVAL's raw TCP destination"
            )
        data = frames[1]
        if not data:  # the connection opened or closed
            return self._end_measurement() if self._decoder is not None else ()
        messages = self._start_measurement() if self._decoder is None else []
        self._received.append(data)
        self._received_bytes += len(data)
        if self._received_bytes >= self.config.decode_bytes:
            messages += self._decode_received()
        return messages

    def idle(self) -> Iterable[Message]:
        # The socket fell quiet: decode what came, so frames do not wait for a full slab.
        yield from self._decode_received()
        yield from super().idle()

    # ---- one measurement = one TCP connection --------------------------------------------------------
    def _start_measurement(self) -> list[Message]:
        config = self.config
        self._measurements += 1
        scan_uid = f"{config.scan_uid_prefix}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{self._measurements}"
        self._decoder = Tpx3Decoder()
        self._builder = FrameBuilder(
            config.roi_shape_px,
            config.roi_origin_px,
            exposure_ticks=None if config.exposure_s is None else _ticks(config.exposure_s),
            lateness_ticks=_ticks(config.lateness_s),
            trigger_edge=TdcEdge[config.trigger_edge.name],
            chip=config.chip,
            dtype=np.dtype(config.frame_dtype.value),
        )
        # Positions that came before the data belong to this scan (the oldest series waiting).
        waiting = sorted(self._pending_positions)
        self._series_adopted = bool(waiting)
        start = StartMessage(
            series_id=waiting[0] if waiting else _NO_SERIES,
            series_unique_id=scan_uid,
            shape_px=config.roi_shape_px,
            dtype=np.dtype(config.frame_dtype.value),
            number_of_images=config.n_triggers,
            energy_kev=config.energy_kev,
            detector_distance_m=config.detector_distance_m,
            pixel_size_m=config.pixel_size_m,
            count_time_s=config.exposure_s,
            frame_time_s=None,
            user_data={"scan_uid": scan_uid, "scan_shape": list(config.scan_shape)},
        )
        return list(self._on_start(start))

    def _on_positions(self, message: PositionBatch | PositionsEnd) -> Iterable[Message]:
        scan = self._open
        if scan is not None and not self._series_adopted:
            scan.series_id = message.series_id
            self._series_adopted = True
        return super()._on_positions(message)

    def _decode_received(self) -> list[Message]:
        if not self._received or self._decoder is None:
            return []
        if self._open is None:
            # The scan was closed as stalled while the connection stayed open: it cannot take these events.
            metrics.MESSAGES_REJECTED.labels(
                reason="no_open_scan", stage=self.stage_name, worker=self.worker
            ).inc()
            self.warn(
                "no_open_scan",
                f"{self._received_bytes} bytes of Timepix3 data came after their scan was closed as stalled "
                f"(stalled_scan_timeout_s={self.config.stalled_scan_timeout_s}); they are dropped. Raise "
                "stalled_scan_timeout_s if the detector pauses this long within a scan",
            )
            self._received.clear()
            self._received_bytes = 0
            return []
        data = b"".join(self._received)
        self._received.clear()
        self._received_bytes = 0
        return self._use(self._decoder.feed(data))

    def _end_measurement(self) -> list[Message]:
        assert self._decoder is not None and self._builder is not None
        if self._open is None:
            # The scan was already closed as stalled (stalled_scan_timeout_s): drop this connection's state.
            self._decoder = self._builder = None
            return []
        messages = self._decode_received()
        messages += self._use(self._decoder.finish())
        messages += self._images(self._builder.finish())
        scan = self._open
        for key, n in self._builder.counts.items():
            self.count(scan.start.scan_uid, f"tpx3_{key}", n)
        self._decoder = self._builder = None
        end = EndMessage(series_id=scan.series_id, series_unique_id=scan.start.scan_uid)
        return messages + list(self._on_detector_end(end))

    # ---- decoded data → frames → the SELUN ingest's image path -----------------------------------------
    def _use(self, decoded: Tpx3Decoded) -> list[Message]:
        assert self._builder is not None and self._open is not None
        uid = self._open.start.scan_uid
        for kind, n in decoded.packet_counts.items():
            self.count(uid, f"tpx3_words_{kind}", n)
        for problem in decoded.problems:
            self.count(uid, problem.reason)
            metrics.MESSAGES_REJECTED.labels(
                reason=problem.reason, stage=self.stage_name, worker=self.worker
            ).inc()
            self.warn(problem.reason, str(problem))
        return self._images(self._builder.add(decoded))

    def _images(self, frames: list[BuiltFrame]) -> list[Message]:
        scan = self._open
        assert scan is not None
        messages: list[Message] = []
        for built in frames:
            image = ImageMessage(scan.series_id, scan.start.scan_uid, built.image_id, built.frame, "tpx3")
            try:
                messages += self._on_image(image)
            except FrameValidationError as error:
                # One bad frame (a repeated trigger, an id past n_triggers) must not cost the others.
                self._count_error(error)
        return messages


def _ticks(seconds: float) -> int:
    return round(seconds * 1e9 / TICK_NS)

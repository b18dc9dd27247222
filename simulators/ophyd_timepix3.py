"""A simulated Timepix3 behind ASI SERVAL as an ophyd device, so a Bluesky RunEngine drives it frame by frame.

Each ``trigger()`` reads the two motors, takes the photon-counted pattern for the probe there from a
``FrameSource`` (the SELUN device's, so the counts are known) and turns it into one exposure of the chip: a
TDC trigger word, then one pixel hit per photon at a random time inside ``timing.exposure_s`` after it
(``scan_events`` and ``encode_tpx3`` of ``phasestream.simulators.timepix3``). The exposure's chunks go out
at once on the run's TCP connection, so the Timepix3 ingest stage bins them while the scan runs (it emits
frame k once trigger k + 1, or the end of the measurement, shows that the window is over).

Detector time: the chip's clock runs on its own. Trigger k of the device's life sits at
``timing.start_s + k * timing.period_s`` whatever the RunEngine's pace, across runs, and the encoder wraps
every counter as the chip does (ToA, the 34-bit pixel time every 26.84 s, the TDC, the 12-bit trigger
counter). Each measurement opens with a global-time pair, so the decoder places its times absolutely.

A run is one measurement. SERVAL's raw destination ``tcp://listen@host:port`` listens and ingest connects
(``data_endpoint``): the run's first trigger accepts that connection within ``accept_timeout_s``, and
``unstage()`` (or the next run's first trigger) closes it, which ingest reads as the measurement's end. The
trigger counter restarts at 1 per measurement, so ingest's image ids, which follow it, are the trigger
numbers within the run from 0; the reading's ``<name>_image_id`` reports the same number. As for the SELUN,
the device learns the run from the RunEngine's start document (``RE.subscribe(detector.on_run_start,
"start")``) and refuses a trigger beyond the run's ``num_points``.

Positions. The raw stream names no series; the ingest stage adopts the first series the position channel
announces for each measurement. Two ways to feed that channel, joined by image id either way:

- With ``positions_endpoint`` the device binds the channel itself and sends each trigger's motor readbacks
  (metres, y then x; series id = the run's number on this device) right after the exposure's bytes, and
  the channel's ``end`` when the measurement ends: one process, no proxy, as ``Tpx3Emitter`` does.
- Without it, ``phasestream bluesky-bridge --image-id-key <name>_image_id --series-id-key <name>_series_id``
  sends each event's readbacks, as on the SELUN path.

Ingest's config follows the device: ``roi_origin_px`` = ``detector.origin_px``, ``roi_shape_px`` = the
source's ``shape_px``, ``n_triggers`` = the run's ``num_points``, ``chip`` = ``chip``. The raw stream
carries no run uid, so ingest names the scan itself (``scan_uid_prefix``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from ophyd import Component, DeviceStatus, Kind, Signal

from phasestream.errors import ConfigError
from phasestream.formats.position_channel import encode_positions, encode_positions_end
from phasestream.formats.tpx3.packets import CHIP_SIZE_PX, TICK_NS
from phasestream.formats.units import LengthUnit
from phasestream.simulators.ophyd_scan_detector import RunInfo, ScanDetector
from phasestream.simulators.ophyd_selun import FrameSource
from phasestream.simulators.timepix3 import (
    DEFAULT_CHUNK_WORDS,
    DEFAULT_RAW_PORT,
    Tpx3Emitter,
    Tpx3Measurement,
    Tpx3Timing,
    encode_tpx3,
    ns_to_ticks,
    scan_events,
)


@dataclass
class _Measurement:
    run: RunInfo
    series_id: int
    connection: Tpx3Measurement
    next_image_id: int = 0


class Timepix3Detector(ScanDetector):
    """A Timepix3 on SERVAL's raw TCP destination that images ``source`` where ``y_motor`` and ``x_motor``
    are.

    Subscribe ``on_run_start`` to the RunEngine's start documents before a run. The server listens from
    construction (port 0 lets the OS choose; ``data_endpoint`` reports it) so ingest can connect before
    the first run; ``close()`` releases it. ``origin_px`` places the frame's pixel (0, 0) on the chip
    (default: the frame centred on the chip).
    """

    exposure_s = Component(Signal, value=0.0, kind=Kind.config)

    def __init__(
        self,
        prefix: str = "",
        *,
        name: str,
        y_motor: Any,
        x_motor: Any,
        source: FrameSource,
        host: str = "127.0.0.1",
        port: int = DEFAULT_RAW_PORT,
        positions_endpoint: str | None = None,
        motor_unit: LengthUnit = LengthUnit.MICROMETRE,
        timing: Tpx3Timing | None = None,
        origin_px: tuple[int, int] | None = None,
        chip: int = 0,
        chunk_words: int = DEFAULT_CHUNK_WORDS,
        accept_timeout_s: float = 30.0,
        send_timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(prefix, name=name, **kwargs)
        height, width = source.shape_px
        row, col = (
            origin_px
            if origin_px is not None
            else ((CHIP_SIZE_PX - height) // 2, (CHIP_SIZE_PX - width) // 2)
        )
        if min(row, col) < 0 or max(row + height, col + width) > CHIP_SIZE_PX:
            raise ConfigError(
                f"frames of {height}×{width} pixels at chip origin {(row, col)} leave the "
                f"{CHIP_SIZE_PX}×{CHIP_SIZE_PX} Timepix3 chip: use a smaller frame or another origin_px"
            )
        self._attach(y_motor, x_motor, source, motor_unit)
        self.timing = timing if timing is not None else Tpx3Timing()
        self.origin_px = (row, col)
        self.chip = chip
        self.chunk_words = chunk_words
        self._send_timeout_s = send_timeout_s
        self.exposure_s.put(float(self.timing.exposure_s))
        self._measurement: _Measurement | None = None
        self._series_count = 0
        self._triggers = 0  # over the device's life: the chip's clock advances one period per trigger
        self._emitter = Tpx3Emitter(
            host,
            port,
            positions_endpoint=positions_endpoint,
            accept_timeout_s=accept_timeout_s,
            positions_send_timeout_s=send_timeout_s,
        )

    @property
    def data_endpoint(self) -> str:
        return self._emitter.endpoint

    @property
    def positions_endpoint(self) -> str | None:
        return self._emitter.positions_endpoint

    def trigger(self) -> DeviceStatus:
        measurement = self._open_measurement()
        image_id = measurement.next_image_id
        run = measurement.run
        if run.num_points is not None and image_id >= run.num_points:
            raise ConfigError(
                f"trigger {image_id + 1} in run {run.uid}, whose start document announced "
                f"num_points={run.num_points}: the plan triggers more often than it announced"
            )
        position_m = self.position_m()
        frame = self.source.frame(position_m)
        measurement.connection.send(self._exposure(frame, image_id))
        if self.positions_endpoint is not None:
            self._emitter.send_positions(
                [encode_positions(measurement.series_id, [image_id], np.array([position_m]))]
            )
        measurement.next_image_id += 1
        self._triggers += 1
        self.image_id.put(image_id)
        status = DeviceStatus(self)
        status.set_finished()
        return status

    def unstage(self) -> list[Any]:
        self._end_measurement()
        return super().unstage()

    def close(self) -> None:
        # An open measurement's connection is closed (ingest sees its end); no position end is sent, as no
        # ingest may be left to take it.
        if self._measurement is not None:
            self._measurement.connection.close()
            self._measurement = None
        self._emitter.close()

    def _exposure(self, frame: np.ndarray, image_id: int) -> bytes:
        """The exposure's TDC word and hits as whole chunks; a global-time pair first in a measurement."""
        timing = self.timing
        trigger_ticks = int(ns_to_ticks(timing.start_s * 1e9)) + self._triggers * int(
            ns_to_ticks(timing.period_s * 1e9)
        )
        # A seed per trigger: every exposure draws its own hit times and order.
        exposure = timing.model_copy(
            update={"start_s": trigger_ticks * TICK_NS * 1e-9, "seed": timing.seed + self._triggers}
        )
        events = scan_events(frame[np.newaxis], exposure, self.origin_px)
        return encode_tpx3(
            events.x_px,
            events.y_px,
            events.toa_ns,
            events.tot_ns,
            events.trigger_ns,
            first_trigger_count=1 + image_id,
            chip=self.chip,
            chunk_words=self.chunk_words,
            global_time=image_id == 0,
            readout_jitter_ns=timing.readout_jitter_ns,
            seed=exposure.seed,
        )

    def _open_measurement(self) -> _Measurement:
        run = self._run
        if run is None:
            raise ConfigError(
                f"{self.name} was triggered outside a run it knows of: subscribe it to the RunEngine's "
                f'start documents with RE.subscribe({self.name}.on_run_start, "start")'
            )
        if self._measurement is not None and self._measurement.run.uid == run.uid:
            return self._measurement
        self._end_measurement()  # a new run without an unstage in between
        connection = self._emitter.open_measurement(self._send_timeout_s)
        self._series_count += 1
        self._measurement = _Measurement(run=run, series_id=self._series_count, connection=connection)
        self.series_id.put(self._series_count)
        return self._measurement

    def _end_measurement(self) -> None:
        measurement, self._measurement = self._measurement, None
        if measurement is None:
            return
        measurement.connection.close()
        if self.positions_endpoint is not None:
            self._emitter.send_positions([encode_positions_end(measurement.series_id)])

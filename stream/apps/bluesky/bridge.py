"""``phasestream bluesky-bridge``: scan positions from a Bluesky run's documents onto the position channel.

A RunEngine publishes its documents to ``bluesky-0MQ-proxy``; this bridge subscribes to the proxy with
bluesky's ``RemoteDispatcher`` and, for every run, sends each event's motor readbacks on the position
channel (``phasestream.formats.position_channel``) keyed by the detector's image id and series id, then the
channel's ``end`` at the run's stop document. Ingest joins them to the detector's frames by image id, and
the detector's Stream V2 start carries the run uid as the scan uid, so the reconstruction lands in Tiled
at ``/reconstructions/<run uid>/``.

What it reads from the documents:

- ``start``: ``uid``, ``plan_name`` and ``motors``; a run that does not move both configured motors is
  rejected (counted, logged with the fix) and the bridge goes on with the next run.
- ``descriptor`` of the configured stream (``primary``): the data keys must hold both motor readbacks and
  the detector's image id and series id; a motor's ``units``, when the descriptor gives one, must be the
  configured length unit.
- ``event`` (or ``event_page``): readbacks, never setpoints (the position the stage reached), with the
  image id the detector reported for that event.
- ``stop``: the channel's ``end`` for the run's series, also for a rejected run whose detector fired, so
  ingest closes that scan at once and accounts for its frames as frames without a position.

Motor units: ophyd motors report bare numbers in the controller's engineering unit. The bridge assumes
``motor_unit`` (micrometres by default, the usual unit of piezo sample stages) and converts to metres;
``invert_y`` / ``invert_x`` flip an axis whose motor moves the sample rather than the probe, so that
positions are the probe's position on the sample. The position channel carries y then x.

Wire format: documents travel as msgpack with msgpack-numpy arrays, never pickle. The RunEngine side
publishes with ``Publisher(address, serializer=encode_document)``; ``decode_document`` reads
msgpack-numpy's format but refuses object and structured arrays (msgpack-numpy would unpickle the first
and read raw bytes as object pointers in the second).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, NoReturn

import msgpack
import msgpack_numpy
import numpy as np
import zmq
from event_model import DocumentRouter
from prometheus_client import Counter as PrometheusCounter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from phasestream.apps.bluesky.dispatcher import DispatcherRunner
from phasestream.errors import ConfigError, PhasestreamError, PositionError, WireFormatError
from phasestream.formats.position_channel import encode_positions, encode_positions_end
from phasestream.formats.units import LengthUnit, parse_length_unit
from phasestream.runtime import metrics

logger = logging.getLogger(__name__)

STAGE_LABEL = "bluesky_bridge"
DEFAULT_PROXY_ADDRESS = "127.0.0.1:5578"  # bluesky-0MQ-proxy's out address
DEFAULT_POSITIONS_ENDPOINT = "tcp://127.0.0.1:31002"  # the SELUN position channel ingest connects to
# Reports of the most recent runs kept in memory: enough for a person or a test to look back a few runs,
# bounded for a bridge that runs for weeks.
RUNS_KEPT = 32

POSITIONS_SENT = PrometheusCounter(
    "phasestream_positions_sent", "Scan positions sent on the position channel", ["stage", "worker"]
)


# Boolean, integers, floats, complex, byte and unicode strings, datetimes and timedeltas.
_PLAIN_DTYPE_KINDS = frozenset("biufcSUMm")


class Rejection(StrEnum):
    """Why a run's positions were not bridged (the ``reason`` label)."""

    MISSING_MOTORS = "missing_motors"
    MISSING_DETECTOR = "missing_detector_keys"
    MOTOR_UNITS = "motor_units"
    BAD_EVENT = "bad_event"
    MISSED_START = "missed_run_start"
    UNDECODABLE = "undecodable_document"


class BridgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proxy_address: str = Field(
        default=DEFAULT_PROXY_ADDRESS, description="bluesky-0MQ-proxy's out address: host:port or ipc://path"
    )
    positions_endpoint: str = Field(
        default=DEFAULT_POSITIONS_ENDPOINT,
        description="the position channel (this bridge binds, ingest connects)",
    )
    y_motor: str = Field(min_length=1, description="data key of the y motor's readback (its ophyd name)")
    x_motor: str = Field(min_length=1, description="data key of the x motor's readback (its ophyd name)")
    motor_unit: LengthUnit = Field(default=LengthUnit.MICROMETRE, description="unit of the motor positions")
    invert_y: bool = Field(default=False, description="negate y: the motor moves the sample, not the probe")
    invert_x: bool = Field(default=False, description="negate x: the motor moves the sample, not the probe")
    stream_name: str = Field(default="primary", min_length=1, description="event stream that has the frames")
    image_id_key: str = Field(default="selun_image_id", description="data key of the detector's image id")
    series_id_key: str = Field(default="selun_series_id", description="data key of the detector's series id")
    send_hwm: int = Field(default=10_000, ge=1, description="positions queued for ingest before send blocks")
    send_timeout_s: float = Field(
        default=10.0, gt=0, description="give up on a position that ingest does not take for this long"
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="serve /metrics; 0: any port")

    @field_validator("proxy_address")
    @classmethod
    def _explicit_host(cls, address: str) -> str:
        # bluesky turns a bare port into tcp://0.0.0.0:PORT, i.e. every interface.
        if "://" not in address and ":" not in address:
            raise ValueError(
                f"{address!r}: give host:port (e.g. 127.0.0.1:5578) or ipc://path, not a bare port"
            )
        return address


@dataclass
class RunRecord:
    """What the bridge did with one run."""

    run_uid: str
    plan_name: str
    series_id: int | None = None
    image_ids: list[int] = field(default_factory=list)
    positions_m: list[tuple[float, float]] = field(default_factory=list)  # (y, x) per image id above
    rejected: str | None = None  # the error, when the run's positions were not bridged
    ended: bool = False  # its stop document arrived


@dataclass
class BridgeReport:
    documents_received: int = 0
    positions_sent: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by reason
    runs: OrderedDict[str, RunRecord] = field(default_factory=OrderedDict)  # the last RUNS_KEPT runs


def encode_document(doc: dict[str, Any]) -> bytes:
    """The RunEngine side's serializer: ``Publisher(address, serializer=encode_document)``."""
    return msgpack.packb(doc, default=msgpack_numpy.encode)


def decode_document(buffer: bytes) -> dict[str, Any]:
    """The bridge side's deserializer: msgpack with msgpack-numpy's numbers and arrays of plain dtypes.

    msgpack-numpy's own decoder runs ``pickle.loads`` on object arrays and builds structured arrays from
    any bytes (an object field then reads raw bytes as pointers), so both are refused here; Bluesky
    documents hold numbers, strings and plain arrays.
    """
    try:
        return msgpack.unpackb(buffer, object_hook=_decode_numpy)
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as error:
        raise WireFormatError(
            f"a {len(buffer)}-byte Bluesky document is not msgpack with plain numpy values ({error}); "
            "publish with Publisher(..., serializer=phasestream.apps.bluesky.bridge.encode_document), "
            "not pickle",
            reason=Rejection.UNDECODABLE,
        ) from error


def _decode_numpy(obj: dict[Any, Any]) -> Any:
    if b"nd" in obj:
        descr = obj[b"type"]
        dtype = np.dtype(descr) if isinstance(descr, str) else None
        if dtype is None or dtype.kind not in _PLAIN_DTYPE_KINDS:
            raise ValueError(f"a numpy value of dtype {descr!r} is refused: only plain numbers and strings")
        if obj[b"nd"] is True:
            return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
        return np.frombuffer(obj[b"data"], dtype=dtype)[0]
    if obj.get(b"complex") is True:
        return complex(obj[b"data"].decode() if isinstance(obj[b"data"], bytes) else obj[b"data"])
    return obj


@dataclass
class _OpenRun:
    record: RunRecord
    descriptors: set[str] = field(default_factory=set)  # uids of the configured stream's descriptors


class PositionsRouter(DocumentRouter):
    """Turns one RunEngine's documents into position-channel messages handed to ``send``.

    Problems raise ``PhasestreamError`` after the router has recorded them, so the caller counts the
    reason and carries on; a rejected run stays rejected until its stop document.
    """

    def __init__(self, config: BridgeConfig, send: Callable[[bytes], None], report: BridgeReport) -> None:
        super().__init__()
        self.config = config
        self._send = send
        self.report = report
        self._runs: dict[str, _OpenRun] = {}
        self._descriptor_runs: dict[str, _OpenRun] = {}
        self._y_scale = config.motor_unit.metres * (-1.0 if config.invert_y else 1.0)
        self._x_scale = config.motor_unit.metres * (-1.0 if config.invert_x else 1.0)

    def start(self, doc: dict[str, Any]) -> None:
        record = RunRecord(run_uid=doc["uid"], plan_name=str(doc.get("plan_name", "")))
        self.report.runs[record.run_uid] = record
        while len(self.report.runs) > RUNS_KEPT:
            self.report.runs.popitem(last=False)
        run = self._runs[record.run_uid] = _OpenRun(record)
        motors = list(doc.get("motors") or [])
        wanted = (self.config.y_motor, self.config.x_motor)
        if any(motor not in motors for motor in wanted):
            self._reject(
                run,
                Rejection.MISSING_MOTORS,
                f"run {record.run_uid} (plan {record.plan_name!r}) moves {motors or 'no motors'}, but the "
                f"bridge expects y motor {wanted[0]!r} and x motor {wanted[1]!r}: scan those motors, or "
                "start the bridge with --y-motor/--x-motor naming the motors this beamline scans",
            )

    def descriptor(self, doc: dict[str, Any]) -> None:
        if doc.get("name") != self.config.stream_name:
            return  # another stream: baseline, monitors
        run = self._runs.get(doc["run_start"])
        if run is None:
            raise PositionError(
                f"run {doc['run_start']} began before this bridge subscribed (its start document never "
                "arrived), so its frames get no positions and ingest counts them as frames without one; "
                "start the bridge before the RunEngine's runs",
                reason=Rejection.MISSED_START,
            )
        run.descriptors.add(doc["uid"])
        self._descriptor_runs[doc["uid"]] = run
        if run.record.rejected:
            return
        data_keys = doc.get("data_keys", {})
        config = self.config
        missing_motors = [key for key in (config.y_motor, config.x_motor) if key not in data_keys]
        if missing_motors:
            self._reject(
                run,
                Rejection.MISSING_MOTORS,
                f"run {run.record.run_uid}: the {config.stream_name!r} stream does not read "
                f"{missing_motors}; read the motors in every event (bluesky's scan plans do)",
            )
        missing_detector = [
            key for key in (config.image_id_key, config.series_id_key) if key not in data_keys
        ]
        if missing_detector:
            self._reject(
                run,
                Rejection.MISSING_DETECTOR,
                f"run {run.record.run_uid}: the {config.stream_name!r} stream has no {missing_detector}, so "
                "its frames cannot be matched to positions: put the SELUN detector in the plan's detectors "
                "(or set --image-id-key/--series-id-key to its reading's keys)",
            )
        for key in (config.y_motor, config.x_motor):
            self._check_unit(run, key, str(data_keys[key].get("units") or ""))

    def _check_unit(self, run: _OpenRun, key: str, units: str) -> None:
        try:
            unit = parse_length_unit(units)
        except ConfigError as error:
            self._reject(run, Rejection.MOTOR_UNITS, f"run {run.record.run_uid}, motor {key!r}: {error}")
        if unit is not None and unit != self.config.motor_unit:
            self._reject(
                run,
                Rejection.MOTOR_UNITS,
                f"run {run.record.run_uid}: motor {key!r} reports {unit.value} but the bridge assumes "
                f"{self.config.motor_unit.value}: start it with --motor-unit {unit.value}",
            )

    def event(self, doc: dict[str, Any]) -> None:
        run = self._descriptor_runs.get(doc["descriptor"])
        if run is None:
            return
        record, data, config = run.record, doc["data"], self.config
        series_id, image_id = (
            _whole_number(data.get(key)) for key in (config.series_id_key, config.image_id_key)
        )
        if series_id is not None and record.series_id is None:
            record.series_id = series_id
        if record.rejected:
            return
        y_m = _finite(data.get(config.y_motor)) * self._y_scale
        x_m = _finite(data.get(config.x_motor)) * self._x_scale
        if series_id is None or image_id is None or image_id < 0 or not math.isfinite(y_m + x_m):
            raise PositionError(
                f"run {record.run_uid}, event {doc.get('seq_num')}: series id "
                f"{data.get(config.series_id_key)!r}, image id {data.get(config.image_id_key)!r}, "
                f"y {data.get(config.y_motor)!r}, "
                f"x {data.get(config.x_motor)!r}: expected whole numbers and finite positions; this frame "
                "gets no position (check the detector's and the motors' readings)",
                reason=Rejection.BAD_EVENT,
            )
        if series_id != record.series_id:
            raise PositionError(
                f"run {record.run_uid}, event {doc.get('seq_num')}: the detector's series changed from "
                f"{record.series_id} to {series_id} within one run; the bridge keeps to one series per run "
                "(re-arm the detector only between runs)",
                reason=Rejection.BAD_EVENT,
            )
        self._send(encode_positions(series_id, [image_id], np.array([[y_m, x_m]])))
        record.image_ids.append(image_id)
        record.positions_m.append((y_m, x_m))
        self.report.positions_sent += 1
        POSITIONS_SENT.labels(stage=STAGE_LABEL, worker="0").inc()

    def stop(self, doc: dict[str, Any]) -> None:
        run = self._runs.pop(doc["run_start"], None)
        if run is None:
            return
        for uid in run.descriptors:
            self._descriptor_runs.pop(uid, None)
        record = run.record
        if record.series_id is not None:
            self._send(encode_positions_end(record.series_id))
        record.ended = True
        if not record.rejected:
            logger.info(
                "run %s (%s): %d positions sent for series %s",
                record.run_uid,
                record.plan_name,
                len(record.image_ids),
                record.series_id,
            )

    def _reject(self, run: _OpenRun, reason: Rejection, message: str) -> NoReturn:
        run.record.rejected = message
        raise PositionError(message, reason=reason)


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return None
    return int(value)


def _finite(value: Any) -> float:
    """The value as a float, NaN for anything that is not a real number (so the caller reports it)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return math.nan
    return float(value)


class BlueskyBridge:
    """Binds the position channel, subscribes to the proxy and bridges runs until ``stop()``.

    ``serve()`` blocks (it runs ``RemoteDispatcher``'s asyncio loop); ``stop()`` may be called from any
    thread or a signal handler. ``first_document`` is set once the first document has arrived, and
    ``wait_for_run`` waits for a run's stop document: both are there so that a caller can prove the
    PUB/SUB path is up and a run went through, instead of sleeping.
    """

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.report = BridgeReport()
        self.first_document = threading.Event()
        self._changed = threading.Condition()
        self._runner = DispatcherRunner()
        self._context = zmq.Context()
        self._positions = self._context.socket(zmq.PUSH)
        self._positions.setsockopt(zmq.SNDHWM, config.send_hwm)
        self._positions.setsockopt(zmq.SNDTIMEO, round(config.send_timeout_s * 1000))
        self._positions.setsockopt(zmq.LINGER, round(config.send_timeout_s * 1000))
        try:
            self._positions.bind(config.positions_endpoint)
        except zmq.ZMQError as error:
            self.close()
            raise ConfigError(
                f"cannot bind the position channel to {config.positions_endpoint!r} ({error}): is a "
                "detector simulator or another bridge bound there? Pick a free endpoint, the one ingest "
                "connects to (detector.positions_endpoint)"
            ) from error
        self._router = PositionsRouter(config, self._send, self.report)
        if config.metrics_port is not None:
            self.metrics_port: int | None = metrics.serve_metrics(config.metrics_port)
        else:
            self.metrics_port = None

    @property
    def positions_endpoint(self) -> str:
        return self._positions.getsockopt_string(zmq.LAST_ENDPOINT)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """The dispatcher's callback: route one document; count and log its problem, never raise."""
        with self._changed:
            self.report.documents_received += 1
            self.first_document.set()
            try:
                self._router(name, doc)
            except PhasestreamError as error:
                self._count_error(error)
            self._changed.notify_all()

    def serve(self) -> None:
        self._runner.run(self.config.proxy_address, self, self._decode, on_started=self._log_start)

    def _log_start(self) -> None:
        logger.info(
            "bridging Bluesky runs from %s to the position channel %s (y %s, x %s, in %s)",
            self.config.proxy_address,
            self.positions_endpoint,
            self.config.y_motor,
            self.config.x_motor,
            self.config.motor_unit.value,
        )

    def stop(self) -> None:
        self._runner.stop()

    def wait_for_run(self, run_uid: str, timeout_s: float) -> RunRecord:
        """The run's record once its stop document has arrived; ``TimeoutError`` if it does not."""

        def ended() -> bool:
            record = self.report.runs.get(run_uid)
            return record is not None and record.ended

        with self._changed:
            if not self._changed.wait_for(ended, timeout=timeout_s):
                raise TimeoutError(
                    f"run {run_uid} did not end at the bridge within {timeout_s} s "
                    f"({self.report.documents_received} documents received): is the RunEngine publishing "
                    f"to the proxy that the bridge subscribes to ({self.config.proxy_address})?"
                )
            return self.report.runs[run_uid]

    def close(self) -> None:
        self._positions.close()
        self._context.term()

    def __enter__(self) -> BlueskyBridge:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self.close()

    def _decode(self, buffer: bytes) -> dict[str, Any]:
        try:
            return decode_document(buffer)
        except WireFormatError as error:
            with self._changed:
                self._count_error(error)
            raise  # RemoteDispatcher drops the message and goes on

    def _send(self, message: bytes) -> None:
        try:
            self._positions.send(message)
        except zmq.Again:
            raise PositionError(
                f"ingest did not take a position within send_timeout_s={self.config.send_timeout_s} on "
                f"{self.positions_endpoint}: is the pipeline running, with detector.positions_endpoint "
                "set to this endpoint? The position is lost and its frame will be counted without one",
                reason="positions_not_sent",
            ) from None

    def _count_error(self, error: PhasestreamError) -> None:
        self.report.errors[error.reason] += 1
        metrics.MESSAGES_REJECTED.labels(stage=STAGE_LABEL, worker="0", reason=error.reason).inc()
        logger.error("%s", error)


def run_bluesky_bridge(config: BridgeConfig) -> int:
    """``phasestream bluesky-bridge``: bridge runs until Ctrl-C or SIGTERM."""
    with BlueskyBridge(config) as bridge:
        # Ctrl-C or a service manager's SIGTERM cancels the dispatcher inside its loop; a KeyboardInterrupt
        # raised into the loop instead leaves bluesky's poll task pending ("Task was destroyed").
        stop_signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, lambda *_: bridge.stop()) for sig in stop_signals}
        try:
            port = bridge.metrics_port
            metrics_note = "" if port is None else f", metrics on 127.0.0.1:{port}"
            print(
                f"Bluesky bridge: documents from {config.proxy_address}, positions on "
                f"{bridge.positions_endpoint}{metrics_note}",
                flush=True,
            )
            bridge.serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print(f"Bluesky bridge stopped: {bridge.report.positions_sent} positions sent", flush=True)
    return 0

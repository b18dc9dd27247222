"""The sockets of one stage worker, made from its placement: inbox, raw inputs, outlet and status channel.

``WorkerSockets.open`` creates them in one ZeroMQ context, securing each tcp socket with CurveZMQ when the
pipeline sets ``curve`` (and warning when it does not); ``close`` releases them in the order libzmq needs:
sockets, then the authenticator whose socket lives in the context, then the context.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import zmq

from phasestream.runtime.config import PipelineConfig
from phasestream.runtime.curve import StageCurve
from phasestream.runtime.inbox import INBOX_PORT, RawInput
from phasestream.runtime.topology import WorkerPlacement
from phasestream.runtime.transport import Outlet, StatusChannel

log = logging.getLogger(__name__)

_OUTLET_LINGER_MS = 5000
_RAW_INPUT_MIN_HWM = 1000  # detector messages are small and come in bursts


@dataclass
class WorkerSockets:
    """A worker's sockets; ``ports`` maps each polled socket to its port (``INBOX_PORT`` or a raw input's)."""

    context: zmq.Context[zmq.Socket[bytes]]
    poller: zmq.Poller
    ports: dict[zmq.Socket[bytes], str]
    outlet: Outlet
    status: StatusChannel
    curve: StageCurve | None

    @classmethod
    def open(
        cls,
        placement: WorkerPlacement,
        pipeline: PipelineConfig,
        raw_inputs: Mapping[str, RawInput],
        stop: threading.Event,
    ) -> WorkerSockets:
        """Create and bind or connect every socket of the worker; ``stop`` ends a send blocked on a full
        downstream queue."""
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        curve = _worker_curve(placement, pipeline, context)
        ports: dict[zmq.Socket[bytes], str] = {}
        if placement.input_endpoint is not None:
            inbox = context.socket(zmq.PULL)
            inbox.setsockopt(zmq.RCVHWM, pipeline.high_water_mark)
            if curve is not None and _is_tcp(placement.input_endpoint):
                curve.serve(inbox)
            inbox.bind(placement.input_endpoint)
            ports[inbox] = INBOX_PORT
        for port, raw in raw_inputs.items():
            ports[_raw_socket(context, raw, pipeline.high_water_mark)] = port
        poller = zmq.Poller()
        for sock in ports:
            poller.register(sock, zmq.POLLIN)
        outlet = Outlet(
            context, placement.output_endpoints, pipeline.high_water_mark, stop, _securer(placement, curve)
        )
        status = StatusChannel(context, placement.control_endpoint, placement.label)
        return cls(context, poller, ports, outlet, status, curve)

    def close(self) -> None:
        self.outlet.close(linger_ms=_OUTLET_LINGER_MS)
        self.status.close()
        for sock in self.ports:
            sock.close(linger=0)
        if self.curve is not None:
            self.curve.close()  # its authenticator's socket lives in this context
        self.context.term()


def _raw_socket(
    context: zmq.Context[zmq.Socket[bytes]], raw: RawInput, high_water_mark: int
) -> zmq.Socket[bytes]:
    sock = context.socket(raw.socket_type)
    sock.setsockopt(zmq.RCVHWM, max(high_water_mark, _RAW_INPUT_MIN_HWM))
    if raw.max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, raw.max_message_bytes)
    if raw.bind:
        sock.bind(raw.endpoint)
    else:
        sock.connect(raw.endpoint)
    return sock


def _securer(
    placement: WorkerPlacement, curve: StageCurve | None
) -> Callable[[zmq.Socket[bytes]], None] | None:
    """What prepares each outlet socket before it connects: CurveZMQ keys for a downstream over tcp."""
    downstream = placement.downstream
    if curve is None or downstream is None or not _is_tcp(*placement.output_endpoints):
        return None
    return functools.partial(curve.connect_to, server_name=downstream)


def _worker_curve(
    placement: WorkerPlacement, pipeline: PipelineConfig, context: zmq.Context[zmq.Socket[bytes]]
) -> StageCurve | None:
    """This worker's CurveZMQ keys when the pipeline sets ``curve`` and a socket of it is tcp."""
    endpoints = [e for e in (placement.input_endpoint, *placement.output_endpoints) if e]
    if not any(_is_tcp(e) for e in endpoints):
        return None
    if pipeline.curve is None:
        log.warning(
            "%s talks tcp without CurveZMQ: anyone who reaches %s may send to or read from it; set "
            "curve: in the pipeline (docs/operations.md, 'CurveZMQ between hosts')",
            placement.label, ", ".join(endpoints),
        )  # fmt: skip
        return None
    downstream = placement.downstream
    peers = [downstream] if downstream is not None and _is_tcp(*placement.output_endpoints) else []
    return StageCurve(pipeline.curve, context, placement.spec.name, peers)


def _is_tcp(*endpoints: str) -> bool:
    return bool(endpoints) and all(e.startswith("tcp://") for e in endpoints)

"""Prometheus metrics, named ``phasestream_<noun>_<verb>_<unit>`` with labels stage, worker, reason only.

Each stage process serves its own ``/metrics`` on 127.0.0.1 (one port per process, so Prometheus gets
``process_*`` metrics for free and adds ``instance``).
"""

from __future__ import annotations

import os

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

from prometheus_client import Counter, Gauge, Histogram, start_http_server

FRAMES_RECEIVED = Counter(
    "phasestream_frames_received", "Detector frames received by a stage", ["stage", "worker"]
)
FRAMES_SENT = Counter("phasestream_frames_sent", "Detector frames sent downstream", ["stage", "worker"])
FRAMES_DROPPED = Counter(
    "phasestream_frames_dropped", "Frames a stage shed or could not use", ["stage", "worker", "reason"]
)
MESSAGES_REJECTED = Counter(
    "phasestream_messages_rejected", "Messages rejected as bad input", ["stage", "worker", "reason"]
)
PROCESS_SECONDS = Histogram(
    "phasestream_stage_process_seconds",
    "Time a stage spends on the messages it drains from a socket at once (up to 64)",
    ["stage", "worker"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
QUEUE_DEPTH = Gauge("phasestream_queue_depth", "Messages waiting in a stage's inbox", ["stage", "worker"])
END_TO_END_LATENCY = Histogram(
    "phasestream_end_to_end_latency_seconds",
    "Time from a frame's arrival at ingest to its use by this stage",
    ["stage", "worker"],
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
# A restarted worker starts this at the number of restarts before it, so the series survives the restart.
WORKER_RESTARTS = Counter(
    "phasestream_worker_restarts",
    "Times the launcher restarted this worker after it died",
    ["stage", "worker"],
)
SCANS_TIMED_OUT = Counter(
    "phasestream_scans_timed_out",
    "Scans a stage closed after a timeout instead of on their ScanEnd",
    ["stage", "worker", "reason"],
)
ITERATIONS = Counter("phasestream_iterations", "Solver iterations (epochs) completed", ["stage", "worker"])
PUBLISH_SECONDS = Histogram(
    "phasestream_publish_seconds",
    "Time to write one array or metadata update to Tiled",
    ["stage", "worker"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)

# Final scan results (object, probe, positions, metadata) that Tiled has not acknowledged yet: kept on disk
# in the run directory and re-sent until it does; 0 once everything reached Tiled.
RESULTS_PENDING = Gauge(
    "phasestream_results_pending",
    "Final scan results kept on disk until Tiled acknowledges them",
    ["stage", "worker"],
)

# The latest value, not a histogram: one number per solver worker, falling as the fit improves. No scan uid
# label (unbounded cardinality); the scan it belongs to is in the Tiled metadata beside the same figure.
FOURIER_R_FACTOR = Gauge(
    "phasestream_fourier_r_factor",
    "Fourier R-factor sum||Psi|-sqrt(I)| / sum sqrt(I) of the latest reconstruction (0: perfect fit)",
    ["stage", "worker"],
)


def serve_metrics(port: int = 0, addr: str = "127.0.0.1") -> int:
    """Start the ``/metrics`` endpoint in a daemon thread and return the port it listens on."""
    server, _thread = start_http_server(port, addr=addr)
    return int(server.server_port)

"""``phasestream simulate``: a simulated SELUN streaming DECTRIS Stream V2, as a detector would."""

from __future__ import annotations

import uuid
from pathlib import Path

from phasestream.simulators.scan_file import load_scan
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan
from phasestream.simulators.selun import SelunEmitter


def run_simulate(
    *,
    data_endpoint: str,
    positions_endpoint: str,
    rate_hz: float | None = None,
    n_positions: int = 420,
    scan_file: Path | None = None,
    scan_uid: str | None = None,
    progress: bool = True,
) -> int:
    """Bind the detector's sockets and stream ``scan_file`` (a demo's .npz), else a simulated scan of
    ``n_positions``; ``rate_hz`` None sends as fast as the client takes the frames."""

    scan = load_scan(scan_file) if scan_file else simulate_scan(ScanSimulationConfig(n_positions=n_positions))
    scan_uid = scan_uid or str(uuid.uuid4())
    with SelunEmitter(data_endpoint, positions_endpoint, rate_hz=rate_hz) as emitter:
        print(
            f"SELUN simulator: {len(scan.frames)} frames of {scan.frames.shape[1]}×{scan.frames.shape[2]} "
            f"on {emitter.data_endpoint}, positions on {emitter.positions_endpoint}, scan {scan_uid}",
            flush=True,
        )
        report = emitter.emit(scan, scan_uid, progress=progress)
    print(f"sent {report.data_messages_sent} messages in {report.elapsed_s:.2f} s", flush=True)
    return 0

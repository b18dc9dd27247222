"""``phasestream simulate``: a simulated SELUN streaming DECTRIS Stream V2, as a detector would."""

from __future__ import annotations

import argparse
import uuid


def run_simulate(args: argparse.Namespace) -> int:
    from phasestream.simulators.scan_file import load_scan
    from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan
    from phasestream.simulators.selun import SelunEmitter

    scan = (
        load_scan(args.scan_file)
        if args.scan_file
        else simulate_scan(ScanSimulationConfig(n_positions=args.positions))
    )
    scan_uid = args.scan_uid or str(uuid.uuid4())
    with SelunEmitter(args.data_endpoint, args.positions_endpoint, rate_hz=args.rate_hz) as emitter:
        print(
            f"SELUN simulator: {len(scan.frames)} frames of {scan.frames.shape[1]}×{scan.frames.shape[2]} "
            f"on {emitter.data_endpoint}, positions on {emitter.positions_endpoint}, scan {scan_uid}",
            flush=True,
        )
        report = emitter.emit(scan, scan_uid, progress=not args.no_progress)
    print(f"sent {report.data_messages_sent} messages in {report.elapsed_s:.2f} s", flush=True)
    return 0

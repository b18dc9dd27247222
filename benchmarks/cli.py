"""``phasestream bench ...``: one subcommand per benchmark, each parsing its options and calling the
benchmark's library function; figures go in docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phasestream_bench.beamline import TABLE_HEADER, bench_beamline
from phasestream_bench.ingest import bench_ingest
from phasestream_bench.replay import bench_replay
from phasestream_bench.soak import bench_soak
from phasestream_bench.tpx3 import bench_tpx3

from phasestream.simulators.beamline_scans import BeamlineCase

# Public datasets in the repository (see tests/data/README.md for their origin and licence); the paths
# are relative to the repository root, where the benchmarks run.
TEST_DATA = Path("tests") / "data"


def add_bench(sub: argparse._SubParsersAction) -> None:
    """``phasestream bench WHAT``: the entry point of the ``phasestream.commands`` group."""
    p = sub.add_parser("bench", help="measure throughput; figures go in docs/benchmarks.md")
    bench = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    for add in (
        _add_ingest,
        _add_inversion,
        _add_flyscan,
        _add_soak,
        _add_epie,
        _add_cdi,
        _add_beamline,
        _add_replay,
        _add_autophasenn,
        _add_pine,
        _add_lodip,
        _add_dip,
        _add_viewer,
        _add_tpx3,
    ):
        add(bench)


def _add_ingest(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "ingest", help="frames/s through emitter → ingest → binning for 192×192 bslz4 low-dose frames"
    )
    p.add_argument("--frames", type=int, default=200_000, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="runs; the median is quoted")
    p.add_argument(
        "--batch-size", type=int, default=64, help="ingest frames per FrameBatch (default %(default)s)"
    )
    p.add_argument(
        "--binning-workers", type=int, default=1, help="binning workers, fanned out (default %(default)s)"
    )
    p.set_defaults(func=_cmd_bench_ingest)


def _cmd_bench_ingest(args: argparse.Namespace) -> int:
    bench_ingest(
        n_frames=args.frames,
        repeats=args.repeats,
        batch_size=args.batch_size,
        binning_workers=args.binning_workers,
    )
    return 0


def _add_inversion(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "inversion", help="AutoPhaseNN: 2D frames/s at batch 1, 8, 64 and ms per 64³ prediction"
    )
    p.add_argument("--repeats", type=int, default=7, help="default %(default)s")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=_cmd_bench_inversion)


def _cmd_bench_inversion(args: argparse.Namespace) -> int:
    from phasestream_bench.inversion import bench_inversion

    print(json.dumps(bench_inversion(repeats=args.repeats, num_threads=args.threads), indent=2))
    return 0


def _add_flyscan(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "flyscan", help="position binning + DIP on a simulated fly scan: FRC resolution of four cases"
    )
    p.add_argument("--rows", type=int, default=48, help="raster rows = columns (default %(default)s)")
    p.add_argument("--k", type=int, default=3, help="frames per bin (default %(default)s)")
    p.add_argument("--photons", type=float, default=2e4, help="photons per frame (default %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="ePIE sweeps (default %(default)s)")
    p.add_argument("--arch", nargs="+", default=["arch1", "arch2"], choices=["arch1", "arch2"])
    p.add_argument("--dip-iterations", type=int, default=2000, help="default %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", type=Path, default=Path("flyscan_dip.png"), help="default %(default)s")
    p.set_defaults(func=_cmd_bench_flyscan)


def _cmd_bench_flyscan(args: argparse.Namespace) -> int:
    from phasestream_bench.flyscan import FLYSCAN_DIP, bench_flyscan

    bench_flyscan(
        rows=args.rows,
        k=args.k,
        photons_per_frame=args.photons,
        epochs=args.epochs,
        architectures=tuple(args.arch),
        dip=FLYSCAN_DIP.replace(optimisation={"max_iterations": args.dip_iterations}),
        seed=args.seed,
        figure=args.figure,
    )
    print(f"Figure: {args.figure}")
    return 0


def _add_soak(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "soak", help="hold a high frame rate for minutes: frames accounted, memory flat, latency percentiles"
    )
    p.add_argument("--duration-s", type=float, default=300.0, help="default %(default)s")
    p.add_argument("--scan-frames", type=int, default=20_000, help="frames per scan (default %(default)s)")
    p.add_argument(
        "--load", type=float, default=0.9, help="fraction of the sustained rate to hold (default %(default)s)"
    )
    p.add_argument("--rate", type=float, help="frames/s to hold instead of --load × the sustained rate")
    p.add_argument(
        "--hostile-fraction",
        type=float,
        default=0.0,
        help="fraction of each scan's messages that are hostile (garbage, truncated CBOR, decompression "
        "bombs, wrong shapes and image ids, multipart floods, bad positions), plus one series with an "
        "unsafe scan uid before each scan (default %(default)s)",
    )
    p.set_defaults(func=_cmd_bench_soak)


def _cmd_bench_soak(args: argparse.Namespace) -> int:
    result = bench_soak(
        args.duration_s,
        scan_frames=args.scan_frames,
        load=args.load,
        frames_per_s=args.rate,
        hostile_fraction=args.hostile_fraction,
    )
    return 1 if result.problems or result.hostile_problems() else 0


def _add_epie(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("epie", help="seconds per ePIE epoch, sequential and batched")
    p.add_argument("--positions", type=int, default=516, help="default %(default)s")
    p.add_argument("--size", type=int, default=128, help="pattern side in pixels (default %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per variant (default %(default)s)")
    p.add_argument(
        "--rule", choices=["epie", "rpie", "pine"], default="epie", help="algorithm (default %(default)s)"
    )
    p.add_argument("--modes", type=int, default=1, help="incoherent probe modes (default %(default)s)")
    p.add_argument(
        "--position-correction", action="store_true", help="refine positions every epoch (general path)"
    )
    p.set_defaults(func=_cmd_bench_epie)


def _cmd_bench_epie(args: argparse.Namespace) -> int:
    from phasestream_bench.solvers import bench_epie

    results = {
        batched: bench_epie(
            n_positions=args.positions,
            size_px=args.size,
            batched=batched,
            epochs=args.epochs,
            algorithm=args.rule,
            probe_modes=args.modes,
            position_correction=args.position_correction,
        )
        for batched in (False, True)
    }
    sequential_s, batched_s = (results[b]["median_s_per_epoch"] for b in (False, True))
    label = {"epie": "ePIE", "rpie": "rPIE", "pine": "PINE"}[args.rule]
    if args.modes > 1:
        label += f" with {args.modes} probe modes"
    if args.position_correction:
        label += " and position correction"
    print(f"{label}, {args.positions} positions of {args.size}×{args.size}, {results[True]['machine']}")
    for result in results.values():
        runs = ", ".join(f"{s:.3f}" for s in result["seconds_per_epoch"])
        print(f"  {result['variant']:<10} median {result['median_s_per_epoch']:.3f} s/epoch  ({runs})")
    print(f"  batched / sequential time: {batched_s / sequential_s:.2f}")
    return 0


def _beamline_cases() -> list:
    return list(BeamlineCase)


def _add_beamline(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "beamline",
        help="replay scans of real beamlines' probes and detector effects, with no probe given and with "
        "the true one: start chosen, epochs, object error",
    )
    p.add_argument("--positions", type=int, default=150, help="positions per scan (default %(default)s)")
    p.add_argument(
        "--case", action="append", choices=[c.value for c in _beamline_cases()], help="only these cases"
    )
    p.add_argument(
        "--out", type=Path, default=Path("phasestream-data/bench-beamline"), help="default %(default)s"
    )
    p.set_defaults(func=_cmd_bench_beamline)


def _cmd_bench_beamline(args: argparse.Namespace) -> int:
    print(TABLE_HEADER)
    bench_beamline(args.out, args.positions, tuple(BeamlineCase(c) for c in args.case or ()))
    return 0


def _add_replay(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("replay", help="frames/s replaying CXI and NXmx files as fast as possible")
    p.add_argument(
        "--frames", type=int, nargs="+", default=[420, 10_000], help="file sizes (default %(default)s)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per file; the median is quoted")
    p.set_defaults(func=_cmd_bench_replay)


def _cmd_bench_replay(args: argparse.Namespace) -> int:
    bench_replay(tuple(args.frames), args.repeats)
    return 0


def _add_autophasenn(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "autophasenn", help="ms per 64³ prediction, 2D frames/s, prediction + 50 ER against 600 HIO/ER"
    )
    p.add_argument(
        "--amplitude", default=str(TEST_DATA / "bcdi_amplitude_64.npy"), help="default %(default)s"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_bench_autophasenn)


def _cmd_bench_autophasenn(args: argparse.Namespace) -> int:
    from phasestream_bench.autophasenn_timing import bench_autophasenn

    print(bench_autophasenn(args.amplitude, device=args.device, num_threads=args.threads))
    return 0


def _add_pine(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "pine",
        help="FRC per iteration of ePIE and rPIE (300) against PINE (150) on a low-dose scan, as a PNG",
    )
    p.add_argument("--photons", type=float, default=2e3, help="photons per frame (default %(default)g)")
    p.add_argument("--positions", type=int, default=200, help="default %(default)s")
    p.add_argument("--figure", type=Path, default=Path("pine_frc.png"), help="default %(default)s")
    p.add_argument(
        "--probe", choices=["known", "reconstructed"], default="known",
        help="the true probe held fixed, or a blurred probe each solver reconstructs (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=1, help="scans (noise and sweep order) to average over")
    p.add_argument(
        "--fourier", choices=["projection", "poisson"], default="projection",
        help="every solver's Fourier step: the modulus projection or the Poisson step (default %(default)s)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_bench_pine)


def _cmd_bench_pine(args: argparse.Namespace) -> int:
    from phasestream_bench.pine import ProbeStart, bench_pine_seeds, format_table

    rows, _ = bench_pine_seeds(
        range(args.seeds), figure=args.figure, n_positions=args.positions, photons_per_frame=args.photons,
        probe_start=ProbeStart(args.probe), fourier_constraint=args.fourier,
    )  # fmt: skip
    print(format_table(rows))
    print(f"FRC curves: {args.figure}")
    return 0


def _add_lodip(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("lodip", help="PSNR of HIO-stat, LoDIP and double DIP on simulated in-situ CDI")
    p.add_argument("--samples", type=int, default=20, help="default %(default)s")
    p.add_argument("--photons", type=float, nargs="+", default=[1000.0, 1.0], help="photons per pixel")
    p.add_argument("--size", type=int, default=64, help="array side (default %(default)s)")
    p.add_argument("--sample-size", type=int, default=16, help="sample side (default %(default)s)")
    p.add_argument("--lodip-iterations", type=int, default=300, help="default %(default)s")
    p.add_argument("--double-dip-iterations", type=int, default=150, help="default %(default)s")
    p.add_argument("--threads", type=int, default=1, help="default %(default)s")
    p.set_defaults(func=_cmd_bench_lodip)


def _cmd_bench_lodip(args: argparse.Namespace) -> int:
    from phasestream_bench.dip import BENCH_DOUBLE_DIP, BENCH_LODIP, bench_lodip

    double_dip_iterations = {"max_iterations": args.double_dip_iterations}
    bench_lodip(
        args.samples, tuple(args.photons), size_px=args.size, sample_size_px=args.sample_size,
        lodip_options=BENCH_LODIP.replace(optimisation={"max_iterations": args.lodip_iterations}),
        double_dip_options=BENCH_DOUBLE_DIP.replace(optimisation=double_dip_iterations), threads=args.threads,
    )  # fmt: skip
    return 0


def _add_dip(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("dip", help="seconds per DIP denoise (ES-WMV), Arch1 and Arch2")
    p.add_argument("--size", type=int, default=64, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=1, help="default %(default)s")
    p.add_argument("--max-iterations", type=int, default=1000, help="default %(default)s")
    p.add_argument("--threads", type=int, default=1, help="default %(default)s")
    p.set_defaults(func=_cmd_bench_dip)


def _cmd_bench_dip(args: argparse.Namespace) -> int:
    from phasestream_bench.dip import BENCH_DENOISE, bench_dip_denoise

    bench_dip_denoise(
        size_px=args.size, repeats=args.repeats, threads=args.threads,
        options=BENCH_DENOISE.replace(optimisation={"max_iterations": args.max_iterations}),
    )  # fmt: skip
    return 0


def _add_viewer(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("viewer", help="latency from a Tiled write to the viewer's page")
    p.add_argument("--updates", type=int, default=30, help="default %(default)s")
    p.add_argument("--size", type=int, default=256, help="object side in pixels (default %(default)s)")
    p.set_defaults(func=_cmd_bench_viewer)


def _cmd_bench_viewer(args: argparse.Namespace) -> int:
    from phasestream_bench.viewer import bench_viewer

    bench_viewer(args.updates, args.size)
    return 0


def _add_tpx3(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("tpx3", help="Timepix3 raw decode: events/s on one core")
    p.add_argument("--events", type=int, default=10_000_000, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=5, help="runs; the median is quoted")
    p.add_argument("--frames", action="store_true", help="also bin 256×256 frames per trigger")
    p.set_defaults(func=_cmd_bench_tpx3)


def _cmd_bench_tpx3(args: argparse.Namespace) -> int:
    rate = bench_tpx3(args.events, args.repeats, build_frames=args.frames)
    what = "decode + frames" if args.frames else "decode"
    print(f"Timepix3 {what}: {rate / 1e6:.1f} M events/s (median of {args.repeats}, one core)")
    return 0


def _add_cdi(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("cdi", help="600 HIO/ER iterations with shrink-wrap on a measured 64³ BCDI pattern")
    p.add_argument(
        "--amplitude", default=str(TEST_DATA / "bcdi_amplitude_64.npy"), help="default %(default)s"
    )
    p.set_defaults(func=_cmd_bench_cdi)


def _cmd_bench_cdi(args: argparse.Namespace) -> int:
    from phasestream_bench.solvers import bench_cdi

    result = bench_cdi(args.amplitude)
    print(
        f"HIO/ER + shrink-wrap, 64³, {result['iterations']} iterations on {result['machine']}: "
        f"{result['seconds']:.1f} s ({result['seconds_per_iteration'] * 1e3:.1f} ms/iteration), "
        f"χ² {result['first_chi2']:.3g} → {result['final_chi2']:.3g}"
    )
    return 0

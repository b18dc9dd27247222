"""``phasestream bluesky-bridge`` and ``bluesky-tiled-writer``: a Bluesky RunEngine's documents, from
bluesky-0MQ-proxy, onto the position channel and into Tiled."""

from __future__ import annotations

import argparse
from pathlib import Path

from phasestream.apps.cli.options import DEFAULT_POSITIONS_ENDPOINT, validated
from phasestream.formats.units import LengthUnit

# bluesky-0MQ-proxy's out address (as phasestream.apps.bluesky.bridge), written out here so that building the
# parser imports no Bluesky.
DEFAULT_PROXY_ADDRESS = "127.0.0.1:5578"


def add_parser(sub: argparse._SubParsersAction) -> None:
    _add_bridge(sub)
    _add_tiled_writer(sub)


def _add_bridge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bluesky-bridge",
        help="send a Bluesky RunEngine's motor positions to the pipeline's position channel",
        description="Subscribes to bluesky-0MQ-proxy (msgpack documents, never pickle) and, for each run, "
        "sends every event's motor readbacks in metres on the position channel, keyed by the detector's "
        "image id. See deploy/bluesky.md.",
    )
    p.add_argument(
        "--proxy",
        default=DEFAULT_PROXY_ADDRESS,
        help="the proxy's out address, host:port or ipc://path (default %(default)s)",
    )
    p.add_argument(
        "--positions-endpoint",
        default=DEFAULT_POSITIONS_ENDPOINT,
        help="position channel to bind; ingest connects (default %(default)s)",
    )
    p.add_argument("--y-motor", required=True, help="ophyd name (readback data key) of the y motor")
    p.add_argument("--x-motor", required=True, help="ophyd name (readback data key) of the x motor")
    p.add_argument(
        "--motor-unit",
        choices=[unit.value for unit in LengthUnit],
        default=LengthUnit.MICROMETRE.value,
        help="motor unit (default %(default)s)",
    )
    p.add_argument(
        "--invert-y", action="store_true", help="negate y (the motor moves the sample, not the probe)"
    )
    p.add_argument(
        "--invert-x", action="store_true", help="negate x (the motor moves the sample, not the probe)"
    )
    p.add_argument(
        "--stream", default="primary", help="event stream with the detector's frames (default %(default)s)"
    )
    p.add_argument("--image-id-key", default="selun_image_id", help="default %(default)s")
    p.add_argument("--series-id-key", default="selun_series_id", help="default %(default)s")
    p.add_argument(
        "--metrics-port", type=int, help="serve /metrics on 127.0.0.1 at this port (0: any free one)"
    )
    p.set_defaults(func=bridge)


def bridge(args: argparse.Namespace) -> int:
    from phasestream.apps.bluesky.bridge import BridgeConfig, run_bluesky_bridge

    config = validated(
        BridgeConfig,
        "bluesky-bridge",
        proxy_address=args.proxy,
        positions_endpoint=args.positions_endpoint,
        y_motor=args.y_motor,
        x_motor=args.x_motor,
        motor_unit=LengthUnit(args.motor_unit),
        invert_y=args.invert_y,
        invert_x=args.invert_x,
        stream_name=args.stream,
        image_id_key=args.image_id_key,
        series_id_key=args.series_id_key,
        metrics_port=args.metrics_port,
    )
    return run_bluesky_bridge(config)


def _add_tiled_writer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bluesky-tiled-writer",
        help="write Bluesky runs from the 0MQ proxy into Tiled (bluesky-tiled-plugins' TiledWriter)",
        description="Subscribes to bluesky-0MQ-proxy (msgpack, never pickle) and writes every run, with the "
        "detector's frame files as external assets, into Tiled in its own process, beside the "
        "reconstructions. See deploy/bluesky.md.",
    )
    p.add_argument(
        "--proxy", default=DEFAULT_PROXY_ADDRESS, help="the proxy's out address (default %(default)s)"
    )
    p.add_argument("--tiled-uri", required=True, help="the writable Tiled server, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--tiled-api-key-file",
        type=Path,
        help="file holding the server's API key (default: $PHASESTREAM_TILED__API_KEY, else $TILED_API_KEY)",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="events per write; 1 (default) streams each event at once"
    )
    p.set_defaults(func=tiled_writer)


def tiled_writer(args: argparse.Namespace) -> int:
    from phasestream.apps.bluesky.tiled_writer import TiledWriterConfig, run_bluesky_tiled_writer

    config = validated(
        TiledWriterConfig,
        "bluesky-tiled-writer",
        proxy_address=args.proxy,
        tiled_uri=args.tiled_uri,
        batch_size=args.batch_size,
    )
    return run_bluesky_tiled_writer(config, tiled_api_key_file=args.tiled_api_key_file)

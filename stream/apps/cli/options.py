"""Options that several commands share: the Tiled server and its key file, the scan's probe and geometry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from phasestream.apps.scan_options import ScanOptions
from phasestream.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)

# The simulated SELUN's sockets (phasestream.simulators.selun's defaults), written out here so that building
# the parser imports neither ZeroMQ nor the codecs.
DEFAULT_DATA_ENDPOINT = "tcp://127.0.0.1:31001"
DEFAULT_POSITIONS_ENDPOINT = "tcp://127.0.0.1:31002"


def add_tiled_options(parser: argparse.ArgumentParser) -> None:
    """``--tiled-uri`` (else an embedded server) and ``--tiled-api-key-file``."""
    parser.add_argument(
        "--tiled-uri",
        help="an existing Tiled server (default: start an embedded one; env PHASESTREAM_TILED__URI)",
    )
    add_tiled_key_file_option(parser, parser)


def add_tiled_key_file_option(
    parser: argparse.ArgumentParser, group: argparse.ArgumentParser | argparse._ArgumentGroup
) -> None:
    """``--tiled-api-key-file``: the key comes from a private file or the environment, never a value on the
    command line, which every user of the host can read (``ps``)."""
    group.add_argument(
        "--tiled-api-key-file",
        type=Path,
        metavar="PATH",
        help="file holding the Tiled API key, readable only by you (chmod 600); default: "
        "$PHASESTREAM_TILED__API_KEY",
    )
    # Else argparse would take `--tiled-api-key KEY` as this option abbreviated, and KEY as a path.
    parser.allow_abbrev = False


def add_scan_options(parser: argparse.ArgumentParser) -> None:
    """The first probe and the geometry of ``run`` and ``replay`` (read back by ``scan_options``)."""
    group = parser.add_argument_group(
        "probe and geometry (override the topology and the detector's start message)"
    )
    group.add_argument(
        "--probe",
        metavar="SPEC",
        help="first probe: auto (searched in the data), previous (the last scan's with this geometry), or "
        "a file: probe.npy, scan.cxi::/entry_1/instrument_1/source_1/illumination, a CXI, .ptyr or "
        "phasestream result file",
    )
    group.add_argument("--energy-kev", type=float, help="photon energy, keV")
    group.add_argument("--detector-distance-m", type=float, help="sample–detector distance, m")
    group.add_argument("--pixel-size-m", type=float, help="detector pixel, m")
    group.add_argument(
        "--beam-centre",
        type=float,
        nargs=2,
        metavar=("ROW", "COLUMN"),
        help="direct beam on the detector, px",
    )
    group.add_argument("--window-px", type=int, help="crop frames to this square window around the beam")
    group.add_argument(
        "--mask",
        metavar="FILE",
        help="bad pixels: .npy (non-zero = bad), file.h5::/dataset, or a CXI / NXmx file",
    )


def scan_options(args: argparse.Namespace) -> ScanOptions:
    """The typed scan options that ``add_scan_options`` parsed."""
    return ScanOptions(
        initial_probe=args.probe,
        energy_kev=args.energy_kev,
        detector_distance_m=args.detector_distance_m,
        pixel_size_m=args.pixel_size_m,
        beam_centre_px=(args.beam_centre[0], args.beam_centre[1]) if args.beam_centre else None,
        window_px=args.window_px,
        mask_file=args.mask,
    )


def validated(model: type[Model], command: str, **values: Any) -> Model:
    """``model(**values)``, with a value it refuses reported as a ``ConfigError`` naming ``command``."""
    try:
        return model(**values)
    except ValidationError as error:
        raise ConfigError(f"{command} options: {error}") from None

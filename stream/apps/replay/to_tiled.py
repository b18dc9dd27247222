"""A Bluesky run stored in Tiled by TiledWriter, read as a recorded scan that ``phasestream replay`` sends.

Layout read (``bluesky_tiled_plugins.TiledWriter``, spec ``BlueskyRun`` v3; see
``phasestream.apps.bluesky.tiled_writer``)::

    /<run uid>                       metadata {start, stop}
        <stream>/                    the stream of the frames, ``primary`` unless the start's hints say
            metadata                 the descriptor: data_keys, configuration (per device)
            internal                 table: seq_num, time, motor readbacks, setpoints, detector ids, ...
            <det>_image              (N, H, W) frames, an array node backed by the detector's HDF5 file

What comes from where:

- Frames: the stream's external 2-D array key (the one whose descriptor entry is ``external`` with a 2-D
  ``shape``; ``frames_key`` picks one when several are), frame i of the event with ``seq_num`` i + 1, in
  the dtype the descriptor's ``dtype_numpy`` announced (uint16 for the SELUN), read 64 frames per request.
- Positions: the y and x motors' **readbacks** (never the setpoints), per event, as the live bridge sends
  them (``phasestream.apps.bluesky.bridge``). Which motors, and in which unit, comes from the detector's
  configuration (``<det>_y_motor_name``, ``<det>_x_motor_name``, ``<det>_motor_unit_name``, written by
  ``simulators.ophyd_selun.SelunDetector``), else from the arguments; a motor's descriptor ``units``, when
  given, decides the unit. Both motors must be among the start document's ``motors``.
- Geometry: ``<det>_energy_kev``, ``<det>_detector_distance_m``, ``<det>_pixel_size_m`` from the
  detector's configuration, else ``energy_kev``, ``detector_distance_m``, ``pixel_size_m`` in the start
  document (``RE(plan, energy_kev=8.8, ...)``).
- Frame time: the median time between events (what the RunEngine achieved, moves included), so that
  ``--rate recorded`` replays at the run's pace.

Checks, each failing with the value and the fix (as the CXI reader's): the run exists and is a Bluesky
run, it holds frames and one event per frame, the motors are the ones the run moved, the geometry is in
range, and the positions have the scale of a ptychography scan in metres (a motor unit mix-up fails).

The API key never appears in a message; errors show the server's URI without query.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from phasestream.errors import ConfigError, PositionError, PublishError, ScanFileError
from phasestream.formats.recorded_scan import READ_CHUNK_FRAMES, RecordedScan
from phasestream.formats.scan_geometry import check_geometry, check_position_scale, pixel_size_per_axis_m
from phasestream.formats.units import LengthUnit, parse_length_unit
from phasestream.runtime.tiled.access import check_tiled, public_uri

logger = logging.getLogger(__name__)

DEFAULT_STREAM = "primary"
GEOMETRY_KEYS = ("energy_kev", "detector_distance_m", "pixel_size_m")
# The run's most recent uids named when a uid is not found: enough to spot a typo or a different server.
RECENT_RUNS_SHOWN = 5


@dataclass(frozen=True)
class TiledRunScan(RecordedScan):
    """A scan whose frames stay in Tiled: ``iter_frames`` reads them from the frames node in chunks.

    ``source`` is the run uid; ``run_uri`` names the server and the run for people (no API key).
    """

    frames_node: Any = None  # tiled.client.array.ArrayClient of shape (N, H, W)
    frame_count: int = 0
    run_uri: str = ""

    @property
    def n_frames(self) -> int:
        return self.frame_count

    def iter_frames(self, chunk_frames: int = READ_CHUNK_FRAMES) -> Iterator[np.ndarray]:
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames}: use at least 1")
        for start in range(0, self.frame_count, chunk_frames):
            yield _read_frames(self, start, min(start + chunk_frames, self.frame_count))


def split_run_uri(run_uri: str) -> tuple[str, str]:
    """``http://host:8000/<run uid>`` → (``http://host:8000``, run uid); the uid is the last path segment.

    A URI copied from Tiled's browser or API (``.../api/v1/metadata/<uid>``) works too.
    """
    try:
        url = httpx.URL(run_uri)
    except httpx.InvalidURL as error:
        raise ConfigError(
            f"--tiled-run {run_uri!r} is not a URI ({error}): use http://host:port/RUN_UID"
        ) from None
    path = url.path.rstrip("/")
    if url.scheme not in ("http", "https") or "/" not in path or not path.rsplit("/", 1)[1]:
        raise ConfigError(
            f"--tiled-run {public_uri(run_uri)!r}: give the Tiled server and the run uid as "
            "http://host:port/RUN_UID (the uid the RunEngine returned: (uid,) = RE(plan))"
        )
    site_path, run_uid = path.rsplit("/", 1)
    site_path = site_path.split("/api/", 1)[0]
    return str(url.copy_with(path=site_path or "/", fragment=None)).rstrip("/"), run_uid


def read_tiled_run(
    tiled_uri: str,
    run_uid: str,
    *,
    api_key: str | None = None,
    stream: str | None = None,
    frames_key: str | None = None,
    y_motor: str | None = None,
    x_motor: str | None = None,
    motor_unit: LengthUnit | str | None = None,
    invert_y: bool = False,
    invert_x: bool = False,
) -> TiledRunScan:
    """Read run ``run_uid`` from the Tiled server at ``tiled_uri``; the arguments override what the run says.

    ``invert_y`` / ``invert_x`` negate an axis whose motor moves the sample rather than the probe, as the
    bridge's options of the same name do.
    """
    shown = public_uri(tiled_uri)
    where = f"run {run_uid} in Tiled at {shown}"
    run = _run_node(_client(tiled_uri, api_key, run_uid), run_uid, shown)
    start = dict(run.metadata.get("start") or {})
    stream_name = stream or _frames_stream(start)
    stream_node, data_keys, key = _frames_stream_node(run, stream_name, frames_key, where)
    detector = str(data_keys[key].get("object_name") or "")
    descriptor_config = (dict(stream_node.metadata).get("configuration") or {}).get(detector) or {}
    config = dict(descriptor_config.get("data") or {})
    energy_kev, distance_m, pixel_m = _run_geometry(detector, config, start, where)
    motors = _motors(y_motor, x_motor, detector, config, start, data_keys, where)
    unit = _motor_unit(motor_unit, motors, detector, config, data_keys, where)
    table, frames_node = _events_and_frames(stream_node, stream_name, key, motors, where)
    n_frames, height, width = frames_node.shape
    positions_m = _positions_m(table, motors, unit, (invert_y, invert_x), where)
    frame_shape_px = (int(height), int(width))
    pixel_per_axis_m = pixel_size_per_axis_m(energy_kev, distance_m, frame_shape_px, pixel_m)
    _check_motor_scale(positions_m, frame_shape_px, pixel_per_axis_m, motors, unit, where, detector)
    scan = TiledRunScan(
        source=Path(run_uid),
        blocks=(),
        frame_shape_px=frame_shape_px,
        frame_dtype=np.dtype(frames_node.dtype),
        positions_m=positions_m,
        energy_kev=energy_kev,
        detector_distance_m=distance_m,
        detector_pixel_size_m=pixel_m,
        frame_time_s=_frame_time_s(table),
        probe=None,
        scan_shape=_scan_shape(start, n_frames),
        bslz4_passthrough=False,
        frames_node=frames_node,
        frame_count=int(n_frames),
        run_uri=f"{shown}/{run_uid}",
    )
    _read_frames(scan, 0, 1)  # an unreadable file fails now, before any socket is bound
    return scan


def _run_geometry(
    detector: str, config: dict[str, Any], start: dict[str, Any], where: str
) -> tuple[float, float, float]:
    """Energy (keV), detector distance and pixel size (m) as the detector's configuration or the start
    document give them, checked."""
    energy_kev, distance_m, pixel_m = (
        _geometry(name, detector, config, start, where) for name in GEOMETRY_KEYS
    )
    check_geometry(
        energy_kev,
        distance_m,
        pixel_m,
        {name: f"{where} ({detector or 'start'} {name})" for name in ("energy", "distance", "pixel")},
    )
    return energy_kev, distance_m, pixel_m


def _check_motor_scale(
    positions_m: np.ndarray,
    frame_shape_px: tuple[int, int],
    pixel_per_axis_m: tuple[float, float],
    motors: tuple[str, str],
    unit: LengthUnit,
    where: str,
    detector: str,
) -> None:
    """Refuse positions whose span cannot be the scan's at this geometry: most often a wrong motor unit."""
    try:
        check_position_scale(
            positions_m,
            frame_shape_px,
            pixel_per_axis_m,
            f"{where} (motors {motors[0]}, {motors[1]} read as {unit.value})",
        )
    except PositionError as error:
        raise PositionError(
            f"{error}. A Bluesky run's motor unit is the motors' descriptor units, else --motor-unit, else "
            f"the detector's {detector}_motor_unit_name (now {unit.value}): give the right --motor-unit"
        ) from None


def _events_and_frames(
    stream_node: Any, stream_name: str, key: str, motors: tuple[str, str], where: str
) -> tuple[Any, Any]:
    """The stream's events table and its frames node, one frame per event."""
    base = stream_node.base if hasattr(stream_node, "base") else stream_node
    table = _events_table(base, where, stream_name, motors)
    frames_node = _frames_node(base, key, where)
    n_frames = frames_node.shape[0]
    if n_frames != len(table):
        raise ScanFileError(
            f"{where} holds {n_frames} frames under {key!r} but {len(table)} events: the run is still being "
            "written, or the TiledWriter process lost documents (see its log); replay it once it has ended"
        )
    return table, frames_node


def _client(tiled_uri: str, api_key: str | None, run_uid: str) -> Any:
    """A Tiled client of the server, checked first so that a wrong server or key is named as such."""
    from tiled.client import from_uri

    try:
        check_tiled(tiled_uri, api_key)
    except PublishError as error:
        raise ScanFileError(
            f"cannot read run {run_uid} from Tiled at {public_uri(tiled_uri)} ({error.reason}): give the "
            "server that TiledWriter writes to, and its API key in --tiled-api-key-file, "
            "PHASESTREAM_TILED__API_KEY or TILED_API_KEY"
        ) from error
    # Data sources ride along so that an unreadable frames file can be named in the error.
    return from_uri(tiled_uri, api_key=api_key).include_data_sources()


def _frames_stream_node(
    run: Any, stream_name: str, frames_key: str | None, where: str
) -> tuple[Any, dict[str, Any], str]:
    """The stream that holds the frames, its descriptor's data keys, and the frames' key among them."""
    try:
        stream_node = run[stream_name]
    except KeyError:
        raise ScanFileError(
            f"{where} has no stream {stream_name!r}, only {sorted(run)}: name the stream of the frames"
        ) from None
    data_keys = dict(dict(stream_node.metadata).get("data_keys") or {})
    key = frames_key or _frames_key(data_keys, where, stream_name)
    if key not in data_keys:
        raise ScanFileError(
            f"{where}: stream {stream_name!r} has no data key {key!r}; it has {sorted(data_keys)}"
        )
    return stream_node, data_keys, key


def _positions_m(
    table: Any, motors: tuple[str, str], unit: LengthUnit, inverted: tuple[bool, bool], where: str
) -> np.ndarray:
    """The probe positions (y, x) in metres from the motors' readbacks, each event's finite."""
    signs = np.array([-1.0 if invert else 1.0 for invert in inverted])
    readbacks = table[list(motors)].to_numpy(dtype=np.float64)
    positions_m = readbacks * unit.metres * signs
    if not np.isfinite(positions_m).all():
        bad = int(np.flatnonzero(~np.isfinite(positions_m).all(axis=1))[0])
        raise PositionError(
            f"{where}: event {int(table['seq_num'].iloc[bad])} has readbacks {readbacks[bad].tolist()} for "
            f"{list(motors)}; every event needs finite motor readbacks"
        )
    return positions_m


def _run_node(client: Any, run_uid: str, shown: str) -> Any:
    try:
        run = client[run_uid]
    except KeyError:
        recent = list(client.keys()[-1 : -RECENT_RUNS_SHOWN - 1 : -1])  # newest first
        raise ScanFileError(
            f"no run {run_uid!r} in Tiled at {shown} (the most recent entries there: {recent or 'none'}); "
            "check the uid (the RunEngine returns it: (uid,) = RE(plan)) and that the TiledWriter process "
            "(phasestream bluesky-tiled-writer) writes to this server"
        ) from None
    specs = [spec.name for spec in run.specs]
    if "BlueskyRun" not in specs:
        raise ScanFileError(
            f"{run_uid} in Tiled at {shown} is not a Bluesky run (specs {specs}); give the uid of a run "
            "that TiledWriter wrote"
        )
    return run


def _frames_stream(start: dict[str, Any]) -> str:
    """The stream that the start document's hints name for the scan's dimensions, else ``primary``."""
    dimensions = (start.get("hints") or {}).get("dimensions") or []
    streams = {dimension[1] for dimension in dimensions if len(dimension) == 2}
    return streams.pop() if len(streams) == 1 else DEFAULT_STREAM


def _frames_key(data_keys: dict[str, Any], where: str, stream: str) -> str:
    candidates = [
        key
        for key, description in data_keys.items()
        if "external" in description and len(description.get("shape") or ()) == 2
    ]
    if not candidates:
        raise ScanFileError(
            f"{where}: stream {stream!r} holds no frames (no external 2-D array among {sorted(data_keys)}): "
            "put a detector that writes files in the plan's detectors (SelunDetector with frames_dir)"
        )
    if len(candidates) > 1:
        raise ConfigError(f"{where}: stream {stream!r} holds several frame keys {candidates}: pick one")
    return candidates[0]


def _geometry(name: str, detector: str, config: dict[str, Any], start: dict[str, Any], where: str) -> float:
    value = config.get(f"{detector}_{name}", start.get(name))
    if value is None:
        raise ScanFileError(
            f"{where} records no {name}: neither the detector's configuration ({detector}_{name}) nor the "
            f"start document ({name}) holds it; start the run with RE(plan, {name}=...)"
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ScanFileError(f"{where}: {name} is {value!r}, not a number") from None


def _motors(
    y_motor: str | None,
    x_motor: str | None,
    detector: str,
    config: dict[str, Any],
    start: dict[str, Any],
    data_keys: dict[str, Any],
    where: str,
) -> tuple[str, str]:
    y = y_motor or config.get(f"{detector}_y_motor_name")
    x = x_motor or config.get(f"{detector}_x_motor_name")
    if not y or not x:
        raise ConfigError(
            f"{where} does not say which motors position the probe (its detector {detector!r} has no "
            f"{detector}_y_motor_name / {detector}_x_motor_name): give --y-motor and --x-motor"
        )
    moved = list(start.get("motors") or [])
    missing = [motor for motor in (y, x) if motor not in moved or motor not in data_keys]
    if missing:
        raise ScanFileError(
            f"{where} moves {moved or 'no motors'}, but the replay needs y motor {y!r} and x motor {x!r} "
            f"({missing} not scanned): replay a run that scans them, or name this run's motors with "
            "--y-motor/--x-motor"
        )
    return str(y), str(x)


def _motor_unit(
    requested: LengthUnit | str | None,
    motors: tuple[str, str],
    detector: str,
    config: dict[str, Any],
    data_keys: dict[str, Any],
    where: str,
) -> LengthUnit:
    described = {
        unit
        for motor in motors
        if (unit := parse_length_unit(str(data_keys[motor].get("units") or ""))) is not None
    }
    if len(described) > 1:
        raise ScanFileError(f"{where}: motors {list(motors)} report different units {sorted(described)}")
    requested_unit = LengthUnit(requested) if requested is not None else None
    if described:
        unit = described.pop()
        if requested_unit is not None and requested_unit != unit:
            raise ConfigError(
                f"{where}: motors {list(motors)} report {unit.value}, but --motor-unit is "
                f"{requested_unit.value}: drop --motor-unit or give {unit.value}"
            )
        return unit
    if requested_unit is not None:
        return requested_unit
    configured = config.get(f"{detector}_motor_unit_name")
    return LengthUnit(configured) if configured else LengthUnit.MICROMETRE


def _events_table(base: Any, where: str, stream: str, motors: tuple[str, str]) -> Any:
    try:
        table = base["internal"].read()
    except KeyError:
        raise ScanFileError(
            f"{where}: stream {stream!r} has no events table ('internal'); was it written by "
            "bluesky_tiled_plugins.TiledWriter (BlueskyRun v3)?"
        ) from None
    table = table.sort_values("seq_num").reset_index(drop=True)
    seq_nums = table["seq_num"].to_numpy()
    if not np.array_equal(seq_nums, np.arange(1, len(table) + 1)):
        raise ScanFileError(
            f"{where}: stream {stream!r} has events with seq_num {seq_nums[:10].tolist()}...; expected 1, 2, "
            "3, ... with one frame per event"
        )
    return table


def _frames_node(base: Any, key: str, where: str) -> Any:
    try:
        node = base[key]
    except KeyError:
        raise ScanFileError(
            f"{where}: the frames {key!r} were announced but never registered (no stream datum reached "
            "Tiled); check the TiledWriter process's log"
        ) from None
    if len(node.shape) != 3 or node.shape[0] == 0:
        raise ScanFileError(f"{where}: frames {key!r} have shape {node.shape}; expected (N ≥ 1, H, W)")
    return node


def _read_frames(scan: TiledRunScan, start: int, stop: int) -> np.ndarray:
    from tiled.client.utils import ClientError

    try:
        frames = scan.frames_node[start:stop]
    except (ClientError, httpx.HTTPError) as error:
        assets = [asset.data_uri for source in scan.frames_node.data_sources() for asset in source.assets]
        raise ScanFileError(
            f"Tiled could not read frames {start}–{stop} of {scan.run_uri} ({error}): the server must list "
            f"the folder of {assets} as readable storage (tiled serve ... -r <folder>, or "
            "EmbeddedTiledServer(readable_storage=[folder])) and be able to open the file"
        ) from None
    return np.asarray(frames, dtype=scan.frame_dtype)


def _frame_time_s(table: Any) -> float | None:
    times = table["time"].to_numpy(dtype=np.float64)
    steps = np.diff(times)
    if len(steps) == 0 or not np.median(steps) > 0:
        return None
    return float(np.median(steps))


def _scan_shape(start: dict[str, Any], n_frames: int) -> tuple[int, ...]:
    shape = tuple(int(n) for n in start.get("shape") or ())
    return shape if shape and int(np.prod(shape)) == n_frames else (n_frames,)

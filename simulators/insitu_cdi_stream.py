"""In-situ CDI patterns as a detector stream: Stream V2 messages plus (0, 0) positions, and the reference.

An in-situ CDI series (:mod:`phasestream.simulators.insitu_cdi`) is a run of patterns of one sample beside
a fixed static region, with no scan. Ingest joins every frame to a position by image id, so
:func:`insitu_cdi_messages` sends the position (0, 0) m for every frame on the position channel
(:mod:`phasestream.formats.position_channel`); the ``cdi`` stage ignores positions. The patterns travel
as uint32 counts (a bright in-situ pattern exceeds 65535 counts in its centre).

:func:`save_static_reference` writes what the ``cdi`` stage needs about the static region: its high-dose,
static-only pattern, the static and sample supports, and the incident flux of that exposure.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from phasestream.errors import FrameValidationError
from phasestream.formats.position_channel import POSITIONS_BATCH_SIZE, encode_positions_end, position_messages
from phasestream.formats.stream_v2.encode import (
    NOMINAL_FRAME_TIME_S,
    encode_image,
    encode_message,
    end_fields,
    start_fields,
)
from phasestream.simulators.insitu_cdi import InSituCdiData

ENERGY_KEV = 8.8
DETECTOR_DISTANCE_M = 2.0
DETECTOR_PIXEL_SIZE_M = 75e-6
"""The SELUN geometry of the ptychography simulator; a 64-px pattern then has a 57 nm object pixel."""
UINT32_MAX = int(np.iinfo(np.uint32).max)


def pattern_counts(patterns: np.ndarray) -> np.ndarray:
    """(n, H, W) counts as uint32, as the detector sends them; FrameValidationError beyond that range."""
    patterns = np.asarray(patterns)
    if patterns.ndim != 3:
        raise FrameValidationError(f"patterns have shape {patterns.shape}: pass a (n, H, W) stack")
    rounded = np.rint(patterns)
    if not np.isfinite(rounded).all() or rounded.min() < 0 or rounded.max() > UINT32_MAX:
        raise FrameValidationError(
            f"pattern counts span [{rounded.min()}, {rounded.max()}]: a detector sends finite counts in "
            f"[0, {UINT32_MAX}]"
        )
    return rounded.astype(np.uint32)


def insitu_cdi_messages(
    patterns: np.ndarray | Sequence[np.ndarray],
    scan_uid: str,
    *,
    series_id: int = 1,
    energy_kev: float = ENERGY_KEV,
    detector_distance_m: float = DETECTOR_DISTANCE_M,
    pixel_size_m: float = DETECTOR_PIXEL_SIZE_M,
    frame_time_s: float = NOMINAL_FRAME_TIME_S,
    positions_batch_size: int = POSITIONS_BATCH_SIZE,
) -> tuple[list[bytes], list[bytes]]:
    """(data messages: start, one image per pattern, end; position messages: (0, 0) per image, end).

    Send them with :meth:`phasestream.simulators.selun.SelunEmitter.emit_messages`.
    """
    frames = pattern_counts(np.stack(list(patterns)) if not isinstance(patterns, np.ndarray) else patterns)
    series_unique_id = f"phasestream-insitu-cdi-{scan_uid}-{series_id}"
    start = start_fields(
        series_id=series_id,
        series_unique_id=series_unique_id,
        shape_px=(frames.shape[1], frames.shape[2]),
        dtype=frames.dtype,
        number_of_images=len(frames),
        energy_kev=energy_kev,
        detector_distance_m=detector_distance_m,
        pixel_size_m=pixel_size_m,
        count_time_s=frame_time_s,
        frame_time_s=frame_time_s,
        user_data={"scan_uid": scan_uid, "scan_shape": [len(frames)], "positions_source": "position_channel"},
    )
    series_date = datetime.now(UTC)
    data = [encode_message(start)]
    data += [
        encode_image(
            frame, series_id=series_id, series_unique_id=series_unique_id, image_id=image_id,
            frame_time_s=frame_time_s, series_date=series_date,
        )
        for image_id, frame in enumerate(frames)
    ]  # fmt: skip
    data.append(encode_message(end_fields(series_id=series_id, series_unique_id=series_unique_id)))
    # No scan: every frame sits at the origin, so that ingest's join by image id still closes.
    origin_m = np.zeros((len(frames), 2))
    positions = list(position_messages(series_id, origin_m, positions_batch_size))
    positions.append(encode_positions_end(series_id))
    return data, positions


def save_static_reference(path: Path, data: InSituCdiData) -> Path:
    """Write the static-only pattern, both supports and the static exposure's flux for the ``cdi`` stage."""
    with Path(path).open("wb") as stream:
        np.savez(
            stream,
            static_pattern=data.static_pattern,
            static_support=data.static_support,
            sample_support=data.sample_support,
            static_incident_photons_per_px=np.float64(data.static_incident_photons_per_px),
        )
    return Path(path)

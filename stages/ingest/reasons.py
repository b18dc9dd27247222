"""The reasons ingest counts what it does not pass on: a frame it rejects (``Reject``), and a start message
or position message it refuses or changes (``Refuse``). Each is the ``reason`` label of
``phasestream_messages_rejected_total`` and, for frames, the scan's accounting key."""

from __future__ import annotations

from enum import StrEnum

from phasestream.formats.stream_v2.decode import FRAME_TOO_LARGE
from phasestream.runtime.scan_uid import UNSAFE_SCAN_UID


class Reject(StrEnum):
    """Why a frame did not reach the next stage (the ``reason`` label and accounting key)."""

    NO_SCAN = "no_open_scan"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NOT_FINITE = "not_finite"
    NEGATIVE = "negative_counts"
    DUPLICATE_FRAME = "duplicate_frame"
    DUPLICATE_POSITION = "duplicate_position"
    FRAME_WITHOUT_POSITION = "frame_without_position"
    POSITION_WITHOUT_FRAME = "position_without_frame"
    INDEX_OUT_OF_RANGE = "image_id_out_of_range"
    FRAME_TOO_LARGE = FRAME_TOO_LARGE
    UNDECODABLE_FRAME = "undecodable_frame"


class Refuse(StrEnum):
    """Why ingest refused or changed what a start message or the position channel said (the ``reason``)."""

    TOO_MANY_IMAGES = "too_many_images"
    UNSAFE_SCAN_UID = UNSAFE_SCAN_UID
    BAD_USER_DATA = "bad_user_data"
    ORPHAN_POSITIONS = "orphan_positions"

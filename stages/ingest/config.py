"""What the ingest stages (``ingest``, and ``tpx3_ingest``, which extends it) are configured with: batching,
the limits that bound what a detector can make ingest hold, and the geometry that overrides the
detector's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from phasestream.runtime.geometry import GeometrySettings


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=64, ge=1, le=4096, description="frames per FrameBatch")
    batch_timeout_s: float = Field(
        default=0.05, gt=0, description="send a partial batch when no frame came for this long"
    )
    position_grace_s: float = Field(
        default=5.0, ge=0, description="after the detector's end, wait this long for late positions"
    )
    max_message_bytes: int = Field(
        default=128 * 2**20,
        ge=2**16,
        description="largest detector message accepted; a sender of a larger one is disconnected before "
        "anything is allocated for it (a 4096 x 4096 uint32 frame uncompressed is 64 MiB)",
    )
    max_frame_bytes: int = Field(
        default=2**27,
        ge=1,
        description="largest frame (image_size_y x image_size_x x bytes per pixel) accepted: a start message "
        "with larger frames is refused, and an image declaring more is refused before it is decompressed "
        "(an EIGER2 XE 16M frame of uint32 is 72 MB)",
    )
    max_images_per_scan: int = Field(
        default=10_000_000,
        ge=1,
        description="a start message announcing more images (number_of_images) is refused with its scan",
    )
    orphan_positions_max_age_s: float = Field(
        default=60.0,
        gt=0,
        description="positions of a series whose start message has not come are held this long, then "
        "dropped and counted (orphan_positions)",
    )
    max_orphan_positions: int = Field(
        default=1_000_000,
        ge=0,
        description="at most this many positions (each position message at least one) of series whose start "
        "has not come are held; beyond it the oldest series' are dropped and counted (orphan_positions)",
    )
    stalled_scan_timeout_s: float | None = Field(
        default=120.0,
        gt=0,
        description="close a scan whose detector sent nothing for this long and no end message "
        "(a crashed DCU or a stopped acquisition); None waits for ever",
    )
    geometry: GeometrySettings = Field(
        default_factory=GeometrySettings,
        description="energy, distance, pixel size, beam centre and window, and a bad-pixel mask file that "
        "replace the detector's; a scan's start document may override them again",
    )

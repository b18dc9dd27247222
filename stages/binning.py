"""Position binning (sum k neighbouring frames, average their positions) and optional 2×2 pixel binning.

Binning trades position density for dose per pattern: in a fly scan, neighbouring frames in time are
neighbours in space, and their sum is one pattern of a slightly blurred probe (Erin et al. 2025 bin
positions before DIP denoising). Pixel binning halves the pattern side, doubles the detector pixel and
so halves the reconstructed field of view per pattern, at a quarter of the solver's cost.

Bins never straddle two batches, so several binning workers may share a scan; a batch whose length is
not a multiple of k ends with a partial bin, and ``detector_frames`` says how many frames each bin holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.runtime.messages import FrameBatch, Message, ScanStart
from phasestream.runtime.stage import Stage


class BinningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positions_per_bin: int = Field(default=1, ge=1, le=256, description="k neighbouring frames summed")
    pixel_binning: Literal[1, 2] = Field(default=1, description="2: sum 2×2 detector pixels")


def bin_positions(
    frames: np.ndarray, positions_m: np.ndarray, detector_frames: list[int], k: int
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Sum groups of k consecutive frames; average their positions weighted by the frames they hold.

    Returns summed frames (uint32, so sums of uint16 counts cannot wrap; float32 for float intensities),
    positions, the index of the first frame of each group (within the batch) and the detector frames
    each group holds.
    """
    n = frames.shape[0]
    starts = np.arange(0, n, k)
    summed = np.add.reduceat(frames, starts, axis=0, dtype=summed_dtype(frames.dtype))
    weights = np.asarray(detector_frames, dtype=np.float64)
    weighted = np.add.reduceat(positions_m * weights[:, None], starts, axis=0)
    per_group = np.add.reduceat(weights, starts)
    return summed, weighted / per_group[:, None], starts.tolist(), per_group.astype(int).tolist()


def bin_pixels(frames: np.ndarray, factor: int) -> np.ndarray:
    """Sum factor×factor pixel blocks of (n, H, W) frames."""
    n, height, width = frames.shape
    blocks = frames.reshape(n, height // factor, factor, width // factor, factor)
    return blocks.sum(axis=(2, 4), dtype=summed_dtype(frames.dtype))


def summed_dtype(dtype: np.dtype | str) -> np.dtype:
    """Counts sum as uint32; float intensities (a detector or file that sends float32) stay float32."""
    return np.dtype(np.float32) if np.dtype(dtype).kind == "f" else np.dtype(np.uint32)


class BinningStage(Stage):
    Config = BinningConfig
    config: BinningConfig

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        factor = self.config.pixel_binning
        geometry = message.geometry
        height, width = geometry.detector_shape_px
        if height % factor or width % factor:
            raise ConfigError(
                f"pixel_binning={factor} needs a detector shape divisible by {factor}, got {height}×{width}; "
                "set pixel_binning: 1"
            )
        if self._is_passthrough():
            yield message
            return
        mask = message.detector_mask()
        binned_mask = (
            mask.reshape(height // factor, factor, width // factor, factor).any(axis=(1, 3))
            if mask is not None and factor > 1
            else message.bad_pixel_mask
        )  # a binned pixel with a bad one inside is not a measurement of the sum
        yield message.model_copy(
            update={
                "bad_pixel_mask": binned_mask,
                "geometry": geometry.model_copy(
                    update={
                        "pixel_size_m": geometry.pixel_size_m * factor,
                        "detector_shape_px": (height // factor, width // factor),
                        "detector_dtype": str(summed_dtype(geometry.detector_dtype)),
                    }
                ),
                "frames_per_position": message.frames_per_position * self.config.positions_per_bin,
            }
        )

    def process(self, message: Message) -> Iterable[Message]:
        if not isinstance(message, FrameBatch) or self._is_passthrough():
            yield message
            return
        frames, positions = message.frames, message.positions_m
        if frames.ndim != 3 or positions.shape != (frames.shape[0], 2):
            raise FrameValidationError(
                f"batch {message.first_index}..{message.last_index}: frames {frames.shape} and positions "
                f"{positions.shape} do not match (expected (n, H, W) and (n, 2))",
                reason="wrong_shape",
            )
        detector_frames = message.detector_frames or [1] * frames.shape[0]
        summed, positions, starts, per_group = bin_positions(
            frames, positions, detector_frames, self.config.positions_per_bin
        )
        if self.config.pixel_binning > 1:
            summed = bin_pixels(summed, self.config.pixel_binning)
        self.count(message.scan_uid, "bins_out", len(starts))
        yield message.model_copy(
            update={
                "frame_indices": [message.frame_indices[i] for i in starts],
                "detector_frames": per_group,
                "frames": summed,
                "positions_m": positions,
            }
        )

    def _is_passthrough(self) -> bool:
        return self.config.positions_per_bin == 1 and self.config.pixel_binning == 1

"""Inversion: AutoPhaseNN on every frame, stitched by scan position into a live object mosaic.

Each FrameBatch is forwarded unchanged before the network sees it, so refine never waits for inference.
Frames are fitted to the network's input (a centred crop, or binning where the pattern is oversampled
enough;
:func:`phasestream.models.nets.autophasenn.fit.fit_pattern`), inverted in batches, and each predicted
transmission patch is added to a mosaic on the real-space grid refine uses (Yao et al., npj Comput. Mater.
8, 124 (2022); PtychoNN, Cherukara et al., Appl. Phys. Lett. 117, 044103 (2020), stitch per-position
predictions the same way). Where patches overlap, each counts with the probe intensity |P|² it was lit
by: the network only determines O where P is not small.

The mosaic goes downstream as a ``Reconstruction(product=MOSAIC)``: the first as soon as the first batch
is inverted, then at most every ``emit_interval_s`` (latest wins: publish keeps only the newest), and a
final one at scan end, before the ScanEnd.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from phasestream.errors import FrameValidationError
from phasestream.models.execution import default_device, set_torch_threads
from phasestream.models.nets.shipped_weights import shipped_weights
from phasestream.runtime.messages import FrameBatch, Message, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.stage import Stage

if TYPE_CHECKING:
    from phasestream.models.nets.autophasenn.fit import PatternFit
    from phasestream.models.nets.autophasenn.network import AutoPhaseNN

DEMO_WEIGHTS = shipped_weights("autophasenn_2d_selun192.pt")
"""2D weights trained with the demo's probe as a 192-px SELUN frame binned 2×2 and cropped to 64 px shows it
(:func:`phasestream.models.nets.autophasenn.fit.fitted_probe`)."""


class DeviceChoice(StrEnum):
    AUTO = "auto"  # cuda when present, else cpu
    CPU = "cpu"
    CUDA = "cuda"


class FitMode(StrEnum):
    """How a detector frame is brought to the network's input edge."""

    AUTO = "auto"  # fit_pattern's choice on the scan's first frames (bin when oversampled, else crop)
    CROP = "crop"  # always the centred crop: keeps the detector pixel, coarsens the object pixel
    EXACT = "exact"  # refuse any frame that is not already the network's size


class InversionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights_path: Path = Field(default=DEMO_WEIGHTS, description="2D AutoPhaseNN weights (with their probe)")
    batch_size: int = Field(default=64, ge=1, le=4096, description="frames per network call")
    device: DeviceChoice = Field(
        default=DeviceChoice.AUTO, description="auto (cuda when present), cuda or cpu"
    )
    bin_factor: int = Field(
        default=2, ge=1, le=16, description="sum k×k detector pixels before the fit, as the weights expect"
    )
    fit: FitMode = Field(
        default=FitMode.CROP,
        description="crop: centred crop; auto: bin when oversampled; exact: refuse others",
    )
    emit_interval_s: float = Field(
        default=1.0, ge=0, description="at most one mosaic per this many seconds while the scan runs"
    )
    incident_photons: float | None = Field(
        default=None,
        gt=0,
        description="photons per detector frame inside the fitted window; None: the brightest frame so far",
    )
    min_weight_fraction: float = Field(
        default=0.05, gt=0, lt=1, description="mosaic pixels lit below this fraction of the peak stay 0"
    )
    margin_px: int = Field(default=4, ge=0, description="free canvas around the outermost windows")
    torch_threads: int | None = Field(default=1, ge=1, description="CPU threads for torch")


class Mosaic:
    """Object patches stitched on one grid: O(r) = Σ_j w_j(r) O_j(r) / Σ_j w_j(r), w_j = |P(r − r_j)|².

    Positions map to window corners as in refine (:func:`phasestream.models.physics.positions_to_pixels`):
    corner = rint((p − origin_m) / dx) + margin, with the probe centre at corner + N // 2. A window that
    falls above or left of the canvas grows it; ``offset_px`` says where the first canvas's (0, 0) went.
    """

    def __init__(
        self, pixel_size_m: float, weight: np.ndarray, origin_m: np.ndarray | None = None, margin_px: int = 4
    ) -> None:
        self.pixel_size_m = pixel_size_m
        self.weight = np.asarray(weight, dtype=np.float64)
        self.window_px = self.weight.shape
        self.origin_m = None if origin_m is None else np.asarray(origin_m, dtype=np.float64)
        self.margin_px = margin_px
        self.offset_px = np.zeros(2, dtype=np.int64)
        self._numerator = np.zeros((0, 0), dtype=np.complex128)
        self._denominator = np.zeros((0, 0), dtype=np.float64)
        self.patches_added = 0

    def corners_px(self, positions_m: np.ndarray) -> np.ndarray:
        from phasestream.models.physics import positions_to_pixels

        if self.origin_m is None:
            self.origin_m = np.asarray(positions_m, dtype=np.float64).min(axis=0)
        pixels = positions_to_pixels(
            positions_m, self.pixel_size_m, self.window_px, margin_px=self.margin_px,
            origin_m=tuple(self.origin_m),
        )  # fmt: skip
        return pixels.top_left_px

    def add(self, patches: np.ndarray, positions_m: np.ndarray) -> None:
        """Add (n, N, N) transmission patches whose probe centres are ``positions_m`` (n, 2) in metres."""
        if not len(patches):
            return
        corners = self.corners_px(positions_m)
        self._grow_to_fit(corners)
        height, width = self.window_px
        for (top, left), patch in zip(corners + self.offset_px, patches, strict=True):
            self._numerator[top : top + height, left : left + width] += self.weight * patch
            self._denominator[top : top + height, left : left + width] += self.weight
        self.patches_added += len(patches)

    def _grow_to_fit(self, corners: np.ndarray) -> None:
        shape = np.asarray(self._numerator.shape)
        first = corners.min(axis=0) + self.offset_px
        end = corners.max(axis=0) + self.offset_px + np.asarray(self.window_px) + self.margin_px
        before = np.maximum(0, -first)
        after = np.maximum(0, end - shape)
        if not (before.any() or after.any()):
            return
        padding = ((before[0], after[0]), (before[1], after[1]))
        self._numerator = np.pad(self._numerator, padding)
        self._denominator = np.pad(self._denominator, padding)
        self.offset_px = self.offset_px + before

    def image(self, min_weight_fraction: float = 0.05) -> np.ndarray:
        """The stitched transmission, complex64; 0 where the weight is below that share of its peak."""
        peak = self._denominator.max(initial=0.0)
        lit = self._denominator > min_weight_fraction * peak if peak > 0 else self._denominator > 0
        out = np.zeros(self._numerator.shape, dtype=np.complex64)
        out[lit] = self._numerator[lit] / self._denominator[lit]
        return out

    def weights(self) -> np.ndarray:
        return self._denominator.astype(np.float32)

    def pixel_origin_m(self) -> tuple[float, float]:
        """Position (y, x) in metres of mosaic pixel (0, 0), in the frame of the scan positions."""
        centre_px = self.margin_px + self.offset_px + np.asarray(self.window_px) // 2
        origin = self.origin_m - centre_px * self.pixel_size_m
        return float(origin[0]), float(origin[1])


def resample_object(
    image: np.ndarray,
    image_origin_m: tuple[float, float],
    image_pixel_size_m: float,
    shape_px: tuple[int, int],
    origin_m: tuple[float, float],
    pixel_size_m: float,
    fill: complex = 1.0,
) -> np.ndarray:
    """Bilinear resampling of a complex image onto another grid; ``fill`` where the image has no value.

    Pixel (i, j) of either grid sits at origin + (i, j) · pixel size. Pixels of ``image`` that are exactly
    0 (the mosaic's unlit ones) count as missing, so the output takes ``fill`` (free space) there.
    """
    axes = [
        (origin_m[axis] + np.arange(shape_px[axis]) * pixel_size_m - image_origin_m[axis])
        / image_pixel_size_m
        for axis in (0, 1)
    ]
    rows, cols = np.meshgrid(*axes, indexing="ij")
    top, left = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    dy, dx = rows - top, cols - left
    total = np.zeros(shape_px, dtype=np.complex128)
    weight = np.zeros(shape_px, dtype=np.float64)
    for oy, ox, w in (
        (0, 0, (1 - dy) * (1 - dx)),
        (0, 1, (1 - dy) * dx),
        (1, 0, dy * (1 - dx)),
        (1, 1, dy * dx),
    ):
        y, x = top + oy, left + ox
        inside = (y >= 0) & (y < image.shape[0]) & (x >= 0) & (x < image.shape[1])
        values = np.zeros(shape_px, dtype=np.complex128)
        values[inside] = image[y[inside], x[inside]]
        known = inside & (values != 0)
        total += np.where(known, w * values, 0)
        weight += np.where(known, w, 0)
    out = np.full(shape_px, fill, dtype=np.complex128)
    # Where more than half of the interpolation weight is missing the edge would be a guess: use fill.
    good = weight > 0.5
    out[good] = total[good] / weight[good]
    return out.astype(np.complex64)


@dataclass
class ScanInversion:
    """One scan's pending frames, fit and mosaic."""

    start: ScanStart
    pending_frames: list[np.ndarray] = field(default_factory=list)
    pending_positions: list[np.ndarray] = field(default_factory=list)
    fits: list[PatternFit] = field(default_factory=list)
    mosaic: Mosaic | None = None
    brightest_photons: float = 0.0
    last_emit_s: float | None = None
    emitted_patches: int = 0
    seq: int = 0

    @property
    def pending_count(self) -> int:
        return sum(len(frames) for frames in self.pending_frames)


class InversionStage(Stage):
    Config = InversionConfig
    config: InversionConfig
    # Partial batches are inverted when the inbox is empty; 50 ms keeps that prompt without a busy loop.
    idle_poll_ms = 50

    def setup(self) -> None:
        from phasestream.models.nets.autophasenn.weights import load_autophasenn

        set_torch_threads(self.config.torch_threads)
        device = default_device(self.config.device.value)
        self._model: AutoPhaseNN = load_autophasenn(2, self.config.weights_path, device=device)
        self._input_px = self._model.architecture.input_size_px
        self._weight = np.abs(self._model.probe.cpu().numpy()) ** 2
        self._inversions: dict[str, ScanInversion] = {}

    def on_scan_start(self, message: ScanStart) -> Iterable[Message]:
        self._inversions[message.scan_uid] = ScanInversion(start=message)
        yield message

    def process(self, message: Message) -> Iterator[Message]:
        yield message  # first, so that refine never waits for the network
        if not isinstance(message, FrameBatch):
            return
        scan = self._inversions.get(message.scan_uid)
        if scan is None:
            self._not_inverted(
                message.scan_uid, "no_scan_start", len(message.frame_indices),
                f"frames {message.first_index}..{message.last_index} arrived before their ScanStart: "
                "they were forwarded but not inverted; check the stage before inversion",
            )  # fmt: skip
            return
        frames, positions = self._usable(scan, message)
        if len(frames):
            scan.pending_frames.append(frames)
            scan.pending_positions.append(positions)
        while scan.pending_count >= self.config.batch_size:
            self._invert(scan, self.config.batch_size)
        yield from self._maybe_emit(scan)

    def idle(self) -> Iterator[Message]:
        for scan in self._inversions.values():
            if scan.pending_count:
                self._invert(scan, self.config.batch_size)
                yield from self._maybe_emit(scan)

    def on_scan_end(self, message: ScanEnd) -> Iterable[Message]:
        scan = self._inversions.pop(message.scan_uid, None)
        if scan is not None:
            while scan.pending_count:
                self._invert(scan, self.config.batch_size)
            if scan.mosaic is not None and scan.mosaic.patches_added:
                yield self._reconstruction(scan, final=True)
        yield message

    # ---- frames to network input -------------------------------------------------------------------
    def _usable(self, scan: ScanInversion, batch: FrameBatch) -> tuple[np.ndarray, np.ndarray]:
        """The batch's frames fitted to the network (amplitude per detector frame) and their positions;
        frames the network must not see are counted with the reason and left out."""
        from phasestream.models.nets.autophasenn.fit import apply_fit, validate_network_input

        frames = np.asarray(batch.frames)
        positions = np.asarray(batch.positions_m, dtype=np.float64)
        if frames.ndim != 3 or positions.shape != (len(frames), 2):
            self._not_inverted(
                batch.scan_uid, "wrong_shape", len(batch.frame_indices),
                f"batch {batch.first_index}..{batch.last_index}: frames {frames.shape} and positions "
                f"{positions.shape} do not match (expected (n, H, W) and (n, 2))",
            )  # fmt: skip
            return np.empty((0, self._input_px, self._input_px), np.float32), np.empty((0, 2))
        keep = np.ones(len(frames), dtype=bool)
        for index, frame in enumerate(frames):
            try:
                if not np.isfinite(positions[index]).all():
                    raise FrameValidationError("its position holds NaN or inf", reason="not_finite_position")
                validate_network_input(frame, 2)
                if not scan.fits:
                    scan.fits = self._first_fits(frame)
            except FrameValidationError as error:
                keep[index] = False
                self._not_inverted(
                    batch.scan_uid,
                    error.reason,
                    1,
                    f"frame {batch.frame_indices[index]} not inverted: {error}",
                )
        if not keep.any():
            return np.empty((0, self._input_px, self._input_px), np.float32), np.empty((0, 2))
        per_detector_frame = np.asarray(batch.detector_frames or [1] * len(frames), dtype=np.float64)[keep]
        intensity = frames[keep].astype(np.float64) / per_detector_frame[:, None, None]
        fitted = np.sqrt(intensity)
        try:
            for fit in scan.fits:
                fitted = apply_fit(fitted, fit, self._input_px)
        except FrameValidationError as error:
            text = f"frames {batch.first_index}..{batch.last_index} not inverted: {error}"
            self._not_inverted(batch.scan_uid, error.reason, int(keep.sum()), text)
            return np.empty((0, self._input_px, self._input_px), np.float32), np.empty((0, 2))
        return fitted, positions[keep]

    def _first_fits(self, frame: np.ndarray) -> list[PatternFit]:
        """The steps that bring this scan's frames to the network: binning by ``bin_factor``, then the fit."""
        from phasestream.models.nets.autophasenn.fit import FitAction, PatternFit, apply_fit, fit_pattern

        size, factor = self._input_px, self.config.bin_factor
        shape = tuple(frame.shape)
        fits = []
        amplitude = np.sqrt(np.asarray(frame, dtype=np.float64))
        if factor > 1:
            if any(n % factor or n // factor < size for n in shape):
                raise FrameValidationError(
                    f"frame has shape {shape}: bin_factor={factor} needs both sides divisible by {factor} "
                    f"and at least {size * factor} pixels for the ({size}, {size}) network; set bin_factor",
                    reason="wrong_shape",
                )
            fits.append(PatternFit(shape, (FitAction.BIN, FitAction.BIN), (factor, factor)))
            amplitude = apply_fit(amplitude, fits[0], size)
            shape = tuple(amplitude.shape)
        if self.config.fit is FitMode.EXACT and shape != (size, size):
            raise FrameValidationError(
                f"frame has shape {shape} (after binning by {factor}) but the network expects ({size}, "
                f"{size}) and fit is 'exact': set fit: crop or auto, or bin the detector to that size",
                reason="wrong_shape",
            )
        if self.config.fit is FitMode.AUTO or min(shape) < size:
            fits.append(fit_pattern(amplitude, 2, size)[1])  # a smaller frame raises, naming the shape
        else:
            actions = tuple(FitAction.KEEP if n == size else FitAction.CROP for n in shape)
            fits.append(PatternFit(shape, actions, (1, 1)))
        return fits

    # ---- network and mosaic --------------------------------------------------------------------------
    def _invert(self, scan: ScanInversion, n: int) -> None:
        from phasestream.models.nets.autophasenn.inference import predict
        from phasestream.models.physics import object_pixel_size_m

        frames = np.concatenate(scan.pending_frames)
        positions = np.concatenate(scan.pending_positions)
        scan.pending_frames = [frames[n:]] if len(frames) > n else []
        scan.pending_positions = [positions[n:]] if len(positions) > n else []
        frames, positions = frames[:n], positions[:n]
        photons = (frames.astype(np.float64) ** 2).sum(axis=(1, 2))
        if self.config.incident_photons is not None:
            incident = np.full(len(frames), self.config.incident_photons)
        else:
            # The brightest frame so far is the best lower bound on the beam: a transmission cannot exceed
            # 1, and a frame's own total would make every patch look clear.
            scan.brightest_photons = max(scan.brightest_photons, float(photons.max()))
            incident = np.full(len(frames), scan.brightest_photons)
        try:
            prediction = predict(self._model, frames, incident_photons=incident)
        except FrameValidationError as error:
            # Frames that passed as a whole can fail once fitted (all their photons outside the crop).
            text = f"{len(frames)} fitted frames not inverted: {error}"
            self._not_inverted(scan.start.scan_uid, error.reason, len(frames), text)
            return
        if scan.mosaic is None:
            geometry = scan.start.geometry
            bin_factor = int(np.prod([fit.bin_factors[-1] for fit in scan.fits]))
            pixel_size_m = object_pixel_size_m(
                geometry.energy_kev, geometry.detector_distance_m, geometry.pixel_size_m * bin_factor,
                self._input_px,
            )  # fmt: skip
            origin_m = None
            if scan.start.scan_extent_m is not None:
                y_min, _, x_min, _ = scan.start.scan_extent_m
                origin_m = np.array([y_min, x_min])
            scan.mosaic = Mosaic(pixel_size_m, self._weight, origin_m, self.config.margin_px)
        scan.mosaic.add(prediction.object, positions)
        self.count(scan.start.scan_uid, "frames_inverted", len(frames))

    def _maybe_emit(self, scan: ScanInversion) -> Iterator[Message]:
        mosaic = scan.mosaic
        if mosaic is None or mosaic.patches_added == scan.emitted_patches:
            return
        now = time.monotonic()
        if scan.last_emit_s is not None and now - scan.last_emit_s < self.config.emit_interval_s:
            return
        scan.last_emit_s = now
        yield self._reconstruction(scan, final=False)

    def _reconstruction(self, scan: ScanInversion, final: bool) -> Reconstruction:
        mosaic = scan.mosaic
        scan.seq += 1
        scan.emitted_patches = mosaic.patches_added
        self.report_status(scan_uid=scan.start.scan_uid, frames_inverted=mosaic.patches_added, final=final)
        return Reconstruction(
            scan_uid=scan.start.scan_uid,
            seq=scan.seq,
            product=Product.MOSAIC,
            algorithm="autophasenn-mosaic",
            iteration=0,
            positions_used=mosaic.patches_added,
            final=final,
            object_pixel_size_m=mosaic.pixel_size_m,
            origin_m=mosaic.pixel_origin_m(),
            object=mosaic.image(self.config.min_weight_fraction),
            probe=self._model.probe.cpu().numpy(),
        )

    def _not_inverted(self, scan_uid: str, reason: str, n: int, text: str) -> None:
        # The frames went on to refine, so they are not lost: counted apart from rejected_* (which the
        # accounting reads as frames that left the pipeline).
        self.count(scan_uid, f"not_inverted_{reason}", n)
        self.warn(reason, text)

"""What a real pixel detector and scan stage do to clean ptychography patterns.

:func:`apply_detector_effects` turns expected patterns (or photon counts) into the frames a hybrid pixel
detector such as a SELUN or an EIGER records, with a mask of the pixels that measured nothing useful:

- dead pixels read 0 and hot pixels a large constant, in every frame;
- module gaps: whole rows and columns between sensor modules read 0;
- a beam stop, a disc on the pattern's centre (pixel N // 2), lets ``beamstop_transmission`` of the beam
  through, so it reads about 0;
- a flat background (air scatter, fluorescence) adds Poisson counts of ``background_counts`` per pixel.

Dead, hot, gap and beam-stop pixels are True in ``bad_pixel_mask`` (not measured); the background is not
masked, since it is everywhere. :func:`perturbed_positions_m` draws the positions a stage really reached
when its encoder reports the nominal ones: frames are computed at those, files record the nominal ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phasestream.errors import ConfigError
from phasestream.simulators.diffraction import UINT16_MAX


@dataclass(frozen=True)
class DetectorEffects:
    """Detector and stage imperfections; the defaults are a perfect detector and stage.

    ``row_gaps_px`` and ``column_gaps_px`` are (first row or column, width) of each gap between modules.
    ``position_error_fraction`` is the rms position error per axis as a fraction of the scan step.
    """

    dead_pixel_fraction: float = 0.0
    hot_pixel_fraction: float = 0.0
    hot_pixel_counts: int = UINT16_MAX
    row_gaps_px: tuple[tuple[int, int], ...] = ()
    column_gaps_px: tuple[tuple[int, int], ...] = ()
    beamstop_radius_px: float = 0.0
    beamstop_transmission: float = 0.0
    background_counts: float = 0.0
    position_error_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dead_pixel_fraction", "hot_pixel_fraction", "beamstop_transmission"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"DetectorEffects.{name}={getattr(self, name)!r}: use a fraction in [0, 1]")
        for name in ("beamstop_radius_px", "background_counts", "position_error_fraction"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"DetectorEffects.{name}={getattr(self, name)!r} must be zero or positive")
        if not 0 < self.hot_pixel_counts <= UINT16_MAX:
            raise ConfigError(
                f"DetectorEffects.hot_pixel_counts={self.hot_pixel_counts!r}: use 1 to {UINT16_MAX} "
                "(frames are uint16)"
            )
        for name in ("row_gaps_px", "column_gaps_px"):
            for first, width in getattr(self, name):
                if first < 0 or width < 1:
                    raise ConfigError(
                        f"DetectorEffects.{name} holds ({first}, {width}): give (first pixel >= 0, "
                        "width >= 1)"
                    )


@dataclass(frozen=True)
class DetectorDefects:
    """Which pixels of an (N, N) frame are dead, hot, in a module gap or behind the beam stop."""

    dead: np.ndarray
    hot: np.ndarray
    gaps: np.ndarray
    beamstop: np.ndarray

    @property
    def bad_pixel_mask(self) -> np.ndarray:
        """True where a pixel measured nothing useful."""
        return self.dead | self.hot | self.gaps | self.beamstop


@dataclass(frozen=True)
class DetectedFrames:
    frames: np.ndarray  # (n, N, N) uint16 counts as the detector records them
    bad_pixel_mask: np.ndarray  # (N, N) bool, True = not measured
    clipped_pixel_count: int  # pixel readings above 65535 clipped to it (hot pixels not counted)


def detector_defects(
    effects: DetectorEffects, shape_px: tuple[int, int], rng: np.random.Generator
) -> DetectorDefects:
    """Draw the dead and hot pixels (a hot pixel is never also dead) and lay out the gaps and beam stop."""
    n_pixels = shape_px[0] * shape_px[1]
    n_dead = round(effects.dead_pixel_fraction * n_pixels)
    n_hot = round(effects.hot_pixel_fraction * n_pixels)
    if n_dead + n_hot > n_pixels:
        raise ConfigError(
            f"dead_pixel_fraction + hot_pixel_fraction = "
            f"{effects.dead_pixel_fraction + effects.hot_pixel_fraction} exceeds 1: lower them"
        )
    chosen = rng.choice(n_pixels, size=n_dead + n_hot, replace=False)
    dead = np.zeros(n_pixels, dtype=bool)
    hot = np.zeros(n_pixels, dtype=bool)
    dead[chosen[:n_dead]] = True
    hot[chosen[n_dead:]] = True
    gaps = np.zeros(shape_px, dtype=bool)
    for first, width in effects.row_gaps_px:
        gaps[first : first + width, :] = True
    for first, width in effects.column_gaps_px:
        gaps[:, first : first + width] = True
    y = np.arange(shape_px[0])[:, None] - shape_px[0] // 2
    x = np.arange(shape_px[1])[None, :] - shape_px[1] // 2
    beamstop = (np.hypot(y, x) <= effects.beamstop_radius_px) & (effects.beamstop_radius_px > 0)
    return DetectorDefects(dead.reshape(shape_px), hot.reshape(shape_px), gaps, beamstop)


def apply_detector_effects(
    patterns: np.ndarray, effects: DetectorEffects, rng: np.random.Generator
) -> DetectedFrames:
    """Frames (n, N, N) as the detector records them, from clean ``patterns`` of the same shape.

    Float patterns are expected counts: the beam stop attenuates them, the background is added and the sum
    is Poisson-sampled. Integer patterns are counts already: the beam stop thins them (binomially) and
    Poisson background counts are added. Then dead and gap pixels read 0 and hot pixels
    ``hot_pixel_counts``.
    """
    patterns = np.asarray(patterns)
    if patterns.ndim != 3:
        raise ConfigError(f"patterns has shape {patterns.shape}: pass a stack (n, ny, nx)")
    defects = detector_defects(effects, patterns.shape[1:], rng)
    transmission = np.where(defects.beamstop, effects.beamstop_transmission, 1.0)
    if patterns.dtype.kind in "iu":
        counts = rng.binomial(patterns.astype(np.int64), transmission) + rng.poisson(
            effects.background_counts, patterns.shape
        )
    elif patterns.dtype.kind == "f":
        counts = rng.poisson(np.clip(patterns, 0, None) * transmission + effects.background_counts)
    else:
        raise ConfigError(
            f"patterns have dtype {patterns.dtype}: pass float expected counts or integer counts"
        )
    counts[:, defects.dead | defects.gaps | defects.hot] = 0
    clipped_pixel_count = int(np.count_nonzero(counts > UINT16_MAX))
    frames = np.minimum(counts, UINT16_MAX).astype(np.uint16)
    frames[:, defects.hot] = effects.hot_pixel_counts
    return DetectedFrames(frames, defects.bad_pixel_mask, clipped_pixel_count)


def perturbed_positions_m(
    nominal_m: np.ndarray, step_m: float, error_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Positions (n, 2) the stage reached: nominal plus Gaussian errors, rms fraction × step per axis."""
    nominal_m = np.asarray(nominal_m, dtype=np.float64)
    if not step_m > 0:
        raise ConfigError(f"step_m={step_m!r} must be positive: pass the scan step in metres")
    return nominal_m + rng.normal(0.0, error_fraction * step_m, nominal_m.shape)

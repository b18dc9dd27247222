"""Formula-driven training images for the PINE denoiser: dead leaves of rotated, textured shapes.

PINE (Yamada et al. 2024) trains its denoiser on synthetic dead-leaves images, so that no real data enters
the prior. The dead-leaves model (Matheron 1968; Lee, Mumford & Huang, "Occlusion models for natural
images", IJCV 41, 35-59, 2001) stacks occluding random shapes whose sizes follow p(r) ∝ r⁻³: the image
statistics are then scale invariant, like those of natural images. Compared with the discs of
:func:`phasestream.simulators.samples.dead_leaves_material`, the leaves here

- come in several shapes (discs, ellipses, rectangles and regular polygons with 3 to 6 sides), each rotated,
  stretched and sized independently, so that the denoiser sees straight edges and corners at every angle;
- carry a texture (a flat grey, a linear gradient, or a sinusoidal grating of random period and
  orientation), so that it also sees smooth ramps and oscillations that it must not flatten.

Rendering is vectorised: every leaf is tested only on its own bounding window (leaves with equal windows
in one array operation), the front-most leaf of every pixel is found with one ``np.maximum.at`` over leaf
indices (later leaves lie in front), and the textures are evaluated once per pixel. Edges are
antialiased by rendering at ``supersample`` times the resolution and averaging, as a detector pixel would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from phasestream.errors import ConfigError


class LeafShape(StrEnum):
    DISC = "disc"
    ELLIPSE = "ellipse"
    RECTANGLE = "rectangle"
    POLYGON = "polygon"


class LeafTexture(StrEnum):
    FLAT = "flat"
    GRADIENT = "gradient"
    GRATING = "grating"


POLYGON_SIDES = (3, 4, 5, 6)
ASPECT_RANGE = (0.25, 1.0)
"""Minor / major semi-axis of ellipses, rectangles and polygons; below 1:4 shapes become lines."""

GRATING_PERIOD_RANGE_PX = (3.0, 24.0)
"""Periods from just above the Nyquist limit (2 px) to a third of a 64-px patch, drawn log-uniform."""


@dataclass(frozen=True)
class _Leaves:
    """One row per leaf, coordinates in supersampled pixels; the texture in output pixels."""

    centre_y: np.ndarray
    centre_x: np.ndarray
    semi_major: np.ndarray
    semi_minor: np.ndarray
    orientation_rad: np.ndarray
    sides: np.ndarray
    vertex_phase_rad: np.ndarray
    # value(p) = offset + gradient · p + amplitude sin(wavevector · p + phase), p in output pixels
    offset: np.ndarray
    gradient_y: np.ndarray
    gradient_x: np.ndarray
    amplitude: np.ndarray
    wavevector_y: np.ndarray
    wavevector_x: np.ndarray
    phase_rad: np.ndarray


def mean_leaf_area_px2(radius_min_px: float, radius_max_px: float) -> float:
    """Mean area of a leaf of radius r ~ p(r) ∝ r⁻³ on [r_min, r_max], for a disc of that radius.

    E[r²] = 2 ln(r_max / r_min) / (r_min⁻² − r_max⁻²); ellipses, rectangles and polygons are smaller or
    larger than the disc by factors of order one, which only shifts the coverage a little.
    """
    if radius_min_px == radius_max_px:
        return float(np.pi * radius_min_px**2)
    mean_square = 2 * np.log(radius_max_px / radius_min_px) / (radius_min_px**-2 - radius_max_px**-2)
    return float(np.pi * mean_square)


def dead_leaves_shapes(
    n_images: int,
    shape_px: tuple[int, int],
    rng: np.random.Generator,
    *,
    radius_min_px: float = 1.0,
    radius_max_px: float | None = None,
    coverage: float = 3.0,
    supersample: int = 2,
) -> np.ndarray:
    """``n_images`` dead-leaves images of rotated textured shapes, float32 in [0, 1], shape (n, H, W).

    Each image holds a textured background and ``coverage × H W / mean leaf area`` leaves with radii drawn
    from p(r) ∝ r⁻³ on [``radius_min_px``, ``radius_max_px``] (default: the longer image side); a
    fraction of about e^−coverage of the background stays visible.
    """
    height, width = shape_px
    radius_max_px = float(max(shape_px)) if radius_max_px is None else radius_max_px
    _check_arguments(n_images, shape_px, radius_min_px, radius_max_px, coverage, supersample)
    leaves_per_image = 1 + int(
        np.ceil(coverage * height * width / mean_leaf_area_px2(radius_min_px, radius_max_px))
    )
    leaves = _draw_leaves(
        rng, n_images, leaves_per_image, (radius_min_px, radius_max_px), supersample, shape_px
    )
    fine_shape = (height * supersample, width * supersample)
    front_leaf = _front_leaf_index(leaves, n_images, leaves_per_image, fine_shape)
    fine = _texture_values(leaves, front_leaf, supersample)
    image = fine.reshape(n_images, height, supersample, width, supersample).mean(axis=(2, 4))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def noisy_batch(
    rng: np.random.Generator, batch_size: int, patch_px: int, sigma_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """One (noisy, clean) batch of shape (batch, 1, patch, patch), float32.

    Each patch gets additive white Gaussian noise of its own σ, drawn uniformly from ``sigma_range``, so
    that one network learns every noise level in the range (a blind denoiser). The noisy patches are not
    clipped: clipping would make the noise depend on the signal near 0 and 1.
    """
    sigma_min, sigma_max = sigma_range
    if not 0 <= sigma_min <= sigma_max:
        raise ConfigError(f"sigma_range={sigma_range}: need 0 <= min <= max, e.g. (0.0, 0.15)")
    clean = dead_leaves_shapes(batch_size, (patch_px, patch_px), rng)[:, None]
    sigma = rng.uniform(sigma_min, sigma_max, size=(batch_size, 1, 1, 1)).astype(np.float32)
    noise = rng.standard_normal(clean.shape, dtype=np.float32)
    return clean + sigma * noise, clean


def noisy_training_batches(
    rng: np.random.Generator, batch_size: int, patch_px: int, sigma_range: tuple[float, float]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless :func:`noisy_batch` batches from one generator."""
    while True:
        yield noisy_batch(rng, batch_size, patch_px, sigma_range)


def _check_arguments(
    n_images: int,
    shape_px: tuple[int, int],
    radius_min_px: float,
    radius_max_px: float,
    coverage: float,
    supersample: int,
) -> None:
    if n_images < 1 or min(shape_px) < 1:
        raise ConfigError(f"n_images={n_images}, shape_px={shape_px}: need at least one image of >= 1 px")
    if not 0 < radius_min_px <= radius_max_px:
        raise ConfigError(
            f"leaf radii [{radius_min_px}, {radius_max_px}] px: need 0 < radius_min_px <= radius_max_px"
        )
    if not coverage > 0:
        raise ConfigError(f"coverage={coverage}: must be positive (3 leaves per pixel on average is typical)")
    if supersample < 1:
        raise ConfigError(f"supersample={supersample}: must be >= 1 (2 antialiases the edges)")


def _draw_placement(
    rng: np.random.Generator,
    n_leaves: int,
    leaves_per_image: int,
    radius_range_px: tuple[float, float],
    shape_px: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radius and centre (y, x) of every leaf in pixels; the first leaf of each image is its background."""
    radius_min_px, radius_max_px = radius_range_px
    # Inverse-CDF sample of p(r) ∝ r⁻³ on [r_min, r_max], as in samples.dead_leaves_material.
    u = rng.random(n_leaves)
    radius_px = (radius_min_px**-2 - u * (radius_min_px**-2 - radius_max_px**-2)) ** -0.5
    centre_y_px = rng.uniform(-radius_px, shape_px[0] + radius_px)
    centre_x_px = rng.uniform(-radius_px, shape_px[1] + radius_px)
    # The background leaf (first of each image) is centred and spans the image, so that its texture
    # stays inside [0, 1] everywhere.
    background = slice(None, None, leaves_per_image)
    radius_px[background] = np.hypot(*shape_px) / 2
    centre_y_px[background] = shape_px[0] / 2
    centre_x_px[background] = shape_px[1] / 2
    return radius_px, centre_y_px, centre_x_px


def _draw_outlines(rng: np.random.Generator, n_leaves: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Aspect ratio, number of polygon sides (0 for a disc or an ellipse) and vertex phase of every leaf."""
    kind = rng.integers(len(LeafShape), size=n_leaves)
    is_disc = kind == list(LeafShape).index(LeafShape.DISC)
    is_rectangle = kind == list(LeafShape).index(LeafShape.RECTANGLE)
    is_polygon = kind == list(LeafShape).index(LeafShape.POLYGON)
    aspect = np.where(is_disc, 1.0, rng.uniform(*ASPECT_RANGE, size=n_leaves))
    sides = np.where(is_polygon, rng.choice(POLYGON_SIDES, size=n_leaves), 0)
    sides = np.where(is_rectangle, 4, sides)
    # A square (4-gon with vertices on the diagonals) stretched along one axis is a rectangle.
    vertex_phase_rad = np.where(is_rectangle, np.pi / 4, 0.0)
    return aspect, sides, vertex_phase_rad


def _draw_leaves(
    rng: np.random.Generator,
    n_images: int,
    leaves_per_image: int,
    radius_range_px: tuple[float, float],
    supersample: int,
    shape_px: tuple[int, int],
) -> _Leaves:
    n_leaves = n_images * leaves_per_image
    radius_px, centre_y_px, centre_x_px = _draw_placement(
        rng, n_leaves, leaves_per_image, radius_range_px, shape_px
    )
    aspect, sides, vertex_phase_rad = _draw_outlines(rng, n_leaves)
    texture = rng.integers(len(LeafTexture), size=n_leaves)
    mean = rng.random(n_leaves)
    # Headroom keeps every texture inside [0, 1] over the whole leaf, so that no value needs clipping.
    headroom = np.minimum(mean, 1.0 - mean)
    has_gradient = texture == list(LeafTexture).index(LeafTexture.GRADIENT)
    has_grating = texture == list(LeafTexture).index(LeafTexture.GRATING)
    slope = np.where(has_gradient, rng.random(n_leaves) * headroom / radius_px, 0.0)
    slope_angle_rad = rng.uniform(0, 2 * np.pi, n_leaves)
    amplitude = np.where(has_grating, rng.random(n_leaves) * headroom, 0.0)
    log_period = rng.uniform(*np.log(GRATING_PERIOD_RANGE_PX), size=n_leaves)
    wavenumber = 2 * np.pi / np.exp(log_period)
    wave_angle_rad = rng.uniform(0, 2 * np.pi, n_leaves)
    phase_rad = rng.uniform(0, 2 * np.pi, n_leaves)

    gradient_y, gradient_x = slope * np.sin(slope_angle_rad), slope * np.cos(slope_angle_rad)
    wavevector_y, wavevector_x = wavenumber * np.sin(wave_angle_rad), wavenumber * np.cos(wave_angle_rad)
    # Textures are centred on the leaf: value(p) = mean + g·(p − c) + A sin(k·(p − c) + φ).
    return _Leaves(
        centre_y=centre_y_px * supersample,
        centre_x=centre_x_px * supersample,
        semi_major=radius_px * supersample,
        semi_minor=radius_px * aspect * supersample,
        orientation_rad=rng.uniform(0, np.pi, n_leaves),
        sides=sides,
        vertex_phase_rad=vertex_phase_rad,
        offset=mean - gradient_y * centre_y_px - gradient_x * centre_x_px,
        gradient_y=gradient_y,
        gradient_x=gradient_x,
        amplitude=amplitude,
        wavevector_y=wavevector_y,
        wavevector_x=wavevector_x,
        phase_rad=phase_rad - wavevector_y * centre_y_px - wavevector_x * centre_x_px,
    )


def _front_leaf_index(
    leaves: _Leaves, n_images: int, leaves_per_image: int, fine_shape: tuple[int, int]
) -> np.ndarray:
    """(n, H, W) index of the front-most leaf over every pixel; leaf 0 of each image is its background.

    Leaves are numbered back to front within an image, so the front-most leaf is the largest index; the
    background leaf is never rasterised and covers every pixel no other leaf does.
    """
    height, width = fine_shape
    image_of_leaf = np.repeat(np.arange(n_images), leaves_per_image)
    front = np.repeat(np.arange(n_images) * leaves_per_image, height * width)
    is_background = np.arange(image_of_leaf.size) % leaves_per_image == 0
    # A window of side 2⌈R⌉ + 2 around ⌊c⌋ holds the whole leaf; clamped into the image it still holds
    # every pixel of the leaf that is inside the image.
    window_px = 2 * np.ceil(leaves.semi_major).astype(np.int64) + 2
    for side in np.unique(window_px[~is_background]):
        chosen = np.flatnonzero((window_px == side) & ~is_background)
        rows = _window_coordinates(leaves.centre_y[chosen], min(side, height), height)
        cols = _window_coordinates(leaves.centre_x[chosen], min(side, width), width)
        inside = _inside_leaf(leaves, chosen, rows, cols)
        pixel = (
            image_of_leaf[chosen, None, None] * (height * width) + rows[:, :, None] * width + cols[:, None, :]
        )
        leaf_index = np.broadcast_to(chosen[:, None, None], inside.shape)
        np.maximum.at(front, pixel[inside], leaf_index[inside])
    return front.reshape(n_images, height, width)


def _window_coordinates(centre: np.ndarray, side: int, extent: int) -> np.ndarray:
    first = np.clip(np.floor(centre).astype(np.int64) - side // 2 + 1, 0, extent - side)
    return first[:, None] + np.arange(side)


def _inside_leaf(leaves: _Leaves, chosen: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Whether each window pixel centre lies inside its leaf.

    In the leaf's frame (rotated by its orientation, scaled by its semi-axes) an ellipse is the unit disc
    and a polygon is the regular n-gon of circumradius 1, whose edges have unit normals at angles
    φ₀ + (2k + 1) π / n and lie at distance cos(π / n) from the centre.
    """
    dy = (rows + 0.5 - leaves.centre_y[chosen, None]).astype(np.float32)[:, :, None]
    dx = (cols + 0.5 - leaves.centre_x[chosen, None]).astype(np.float32)[:, None, :]
    cos_o = np.cos(leaves.orientation_rad[chosen]).astype(np.float32)[:, None, None]
    sin_o = np.sin(leaves.orientation_rad[chosen]).astype(np.float32)[:, None, None]
    along = (cos_o * dx + sin_o * dy) / leaves.semi_major[chosen, None, None].astype(np.float32)
    across = (cos_o * dy - sin_o * dx) / leaves.semi_minor[chosen, None, None].astype(np.float32)
    inside = along**2 + across**2 <= 1
    sides = leaves.sides[chosen]
    angular = np.flatnonzero(sides > 0)
    if angular.size:
        # Polygons with fewer than the most sides repeat their last normal, which changes nothing.
        edge = np.minimum(np.arange(max(POLYGON_SIDES)), sides[angular, None] - 1)
        normal_rad = (
            leaves.vertex_phase_rad[chosen[angular], None] + (2 * edge + 1) * np.pi / sides[angular, None]
        )
        along_a, across_a = along[angular], across[angular]
        cos_n = np.cos(normal_rad).astype(np.float32)[:, :, None, None]
        sin_n = np.sin(normal_rad).astype(np.float32)[:, :, None, None]
        distance = along_a * cos_n[:, 0] + across_a * sin_n[:, 0]
        for k in range(1, normal_rad.shape[1]):
            np.maximum(distance, along_a * cos_n[:, k] + across_a * sin_n[:, k], out=distance)
        inside[angular] = distance <= np.cos(np.pi / sides[angular]).astype(np.float32)[:, None, None]
    return inside


def _texture_values(leaves: _Leaves, front_leaf: np.ndarray, supersample: int) -> np.ndarray:
    """Each pixel's value from its front-most leaf's texture, in float32: values lie in [0, 1] and the
    grating's phase stays below a few hundred radians, far inside float32's precision."""
    _, height, width = front_leaf.shape
    y_px = ((np.arange(height, dtype=np.float32) + 0.5) / supersample)[:, None]
    x_px = ((np.arange(width, dtype=np.float32) + 0.5) / supersample)[None, :]

    def at_pixels(parameter: np.ndarray) -> np.ndarray:
        return parameter.astype(np.float32)[front_leaf]

    ramp = (
        at_pixels(leaves.offset) + at_pixels(leaves.gradient_y) * y_px + at_pixels(leaves.gradient_x) * x_px
    )
    wave_argument = (
        at_pixels(leaves.wavevector_y) * y_px
        + at_pixels(leaves.wavevector_x) * x_px
        + at_pixels(leaves.phase_rad)
    )
    return ramp + at_pixels(leaves.amplitude) * np.sin(wave_argument)

"""In-situ CDI patterns: a sample next to a strongly illuminated static region, with Poisson noise.

In-situ CDI (Y. H. Lo et al., "In situ coherent diffractive imaging", Nat. Commun. 9, 1826, 2018) puts a
static structure U beside the sample X and lights it more strongly; its diffraction interferes with the
sample's, which acts as a holographic reference and makes phase retrieval robust at low dose. LoDIP
(R. Manekar, E. Negrini, M. Pham, D. Jacobs, J. Srivastava, S. J. Osher and J. Miao, "Low-light phase
retrieval with implicit generative priors", arXiv:2402.17745) models the pattern as Y = |F(X + U)|² with
Poisson noise at N photons per pixel (its Section 4). Written out for this simulator, with F the project's
centred, orthonormal FFT (so Σ_q |Fψ|² = Σ_r |ψ|², Parseval) on an n × n array:

    ψ = X + √r · U                                   exit wave for unit flux on the sample and r (the
                                                      illumination ratio) on the static region
    I = s · |F ψ|²,     s = N n² / Σ |ψ|²             expected counts: N photons per detector pixel
    Y ~ Poisson(I)                                    the measured pattern

so s is the incident flux, in photons per sample pixel of unit transmission (:attr:`InSituCdiData
.incident_photons_per_px`). The paper's text was not at hand; "photons per pixel" is read as the mean count
per detector pixel, which puts the doses in the range of the paper's PSNR figures (a reading as the incident
flux s would be about 5 times lower for the default geometry). X (real, in [0, 1], zero off its square
support S) and U (real, in [0.5, 1], zero off its static support) do not overlap. The static region is
first measured alone at a high dose, Y_s ~ Poisson(s_s |F U|²) with s_s = N_s n² / Σ U², from which it is
reconstructed (:mod:`phasestream.models.cdi.lodip`). The default ratio r = 10 is this simulator's choice.

The static support is a right triangle: unlike a rectangle it is not centrosymmetric, so its twin image
U(−r) does not fit it, and a static-only reconstruction with that support has no twin ambiguity.
Samples and the static texture are dead-leaves images (:func:`dead_leaves_material`). The paper used
256 × 256 arrays with a 70 × 70 sample; the defaults here, 64 × 64 with a 16 × 16 sample, keep the
sample at the same quarter of the array and fit a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from phasestream.errors import ConfigError
from phasestream.simulators.diffraction import far_field_intensity
from phasestream.simulators.samples import dead_leaves_material

STATIC_TEXTURE_FLOOR = 0.5
"""The static region's transmission lies in [0.5, 1]: no dark holes, so its support stays tight."""
DEAD_LEAVES_RADII_PER_SIDE = (1 / 12, 1 / 2)
"""Leaf radii as fractions of the region's side: from just over a pixel to half the region."""


class InSituCdiConfig(BaseModel):
    """Geometry (array pixels), doses and seed of one simulated in-situ CDI measurement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size_px: int = Field(default=64, ge=16, le=4096, description="square array and detector, N × N")
    sample_size_px: int = Field(default=16, ge=2, description="side of the square sample support")
    sample_top_left_px: tuple[int, int] | None = Field(
        default=None, description="corner (y, x) of the sample support; default: sample and static centred"
    )
    static_shape_px: tuple[int, int] = Field(default=(16, 12), description="(height, width) of the triangle")
    static_top_left_px: tuple[int, int] | None = Field(
        default=None, description="corner (y, x) of the static region; default: gap_px right of the sample"
    )
    gap_px: int = Field(default=2, ge=0)
    illumination_ratio: float = Field(
        default=10.0, gt=0.0, le=1e6, description="r: photons per pixel on the static region / on the sample"
    )
    photons_per_px: float = Field(default=1000.0, gt=0.0, le=1e9, description="N: mean count per detector px")
    static_photons_per_px: float = Field(
        default=1e5, gt=0.0, le=1e9, description="N_s: mean count per detector px of the static-only pattern"
    )
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _regions_fit(self) -> InSituCdiConfig:
        height, width = self.static_shape_px
        if min(height, width) < 2:
            raise ConfigError(f"static_shape_px={self.static_shape_px}: the triangle needs at least 2 × 2 px")
        sample_corner, static_corner = self.sample_corner_px, self.static_corner_px
        for name, corner, shape in (
            ("sample support", sample_corner, (self.sample_size_px,) * 2),
            ("static region", static_corner, self.static_shape_px),
        ):
            if min(corner) < 0 or corner[0] + shape[0] > self.size_px or corner[1] + shape[1] > self.size_px:
                raise ConfigError(
                    f"the {name} at {corner} of shape {shape} leaves the {self.size_px}² array: move it "
                    f"inside [0, {self.size_px}) or enlarge size_px"
                )
        overlap = _box_overlap(sample_corner, (self.sample_size_px,) * 2, static_corner, self.static_shape_px)
        if overlap:
            raise ConfigError(
                f"the static region at {static_corner} overlaps the sample support at {sample_corner} "
                f"({overlap} px of their boxes): in-situ CDI needs them apart; move static_top_left_px"
            )
        extent = self.object_extent_px
        if max(extent) > self.size_px // 2:
            raise ConfigError(
                f"sample and static region span {extent} px, more than half the {self.size_px}-px array: the "
                "pattern would be undersampled (oversampling < 2); shrink them or enlarge size_px"
            )
        return self

    @property
    def sample_corner_px(self) -> tuple[int, int]:
        if self.sample_top_left_px is not None:
            return self.sample_top_left_px
        span_y = max(self.sample_size_px, self.static_shape_px[0])
        span_x = self.sample_size_px + self.gap_px + self.static_shape_px[1]
        return ((self.size_px - span_y) // 2, (self.size_px - span_x) // 2)

    @property
    def static_corner_px(self) -> tuple[int, int]:
        if self.static_top_left_px is not None:
            return self.static_top_left_px
        top, left = self.sample_corner_px
        return (top, left + self.sample_size_px + self.gap_px)

    @property
    def object_extent_px(self) -> tuple[int, int]:
        """(height, width) of the smallest box holding the sample support and the static region."""
        (sy, sx), (uy, ux) = self.sample_corner_px, self.static_corner_px
        side = self.sample_size_px
        height, width = self.static_shape_px
        return (max(sy + side, uy + height) - min(sy, uy), max(sx + side, ux + width) - min(sx, ux))


def _box_overlap(
    corner_a: tuple[int, int], shape_a: tuple[int, int], corner_b: tuple[int, int], shape_b: tuple[int, int]
) -> int:
    rows = min(corner_a[0] + shape_a[0], corner_b[0] + shape_b[0]) - max(corner_a[0], corner_b[0])
    cols = min(corner_a[1] + shape_a[1], corner_b[1] + shape_b[1]) - max(corner_a[1], corner_b[1])
    return max(rows, 0) * max(cols, 0)


@dataclass(frozen=True)
class InSituCdiData:
    """One simulated measurement. Fields X and U are in units of the incident amplitude (transmissions)."""

    config: InSituCdiConfig
    pattern: np.ndarray
    """float64 (n, n) counts Y of sample and static region, N per detector pixel on average."""
    static_pattern: np.ndarray
    """float64 (n, n) counts Y_s of the static region alone, N_s per detector pixel on average."""
    sample_truth: np.ndarray
    """float64 X, in [0, 1] on the sample support, zero elsewhere."""
    static_truth: np.ndarray
    """float64 U, in [0.5, 1] on the static support, zero elsewhere."""
    sample_support: np.ndarray
    static_support: np.ndarray
    incident_photons_per_px: float
    """s: photons on each sample pixel; X in the pattern's amplitude units is √s · X."""
    static_incident_photons_per_px: float
    """s_s: photons on each static pixel in the static-only measurement."""

    @property
    def sample_scale(self) -> float:
        """√s: X in the pattern's amplitude units is √s · X."""
        return float(np.sqrt(self.incident_photons_per_px))

    @property
    def static_scale(self) -> float:
        """√(r s): U in the pattern's amplitude units."""
        return float(np.sqrt(self.config.illumination_ratio * self.incident_photons_per_px))

    @property
    def static_pattern_scale(self) -> float:
        """√s_s: U in the static-only pattern's amplitude units."""
        return float(np.sqrt(self.static_incident_photons_per_px))


def triangle_mask(shape_px: tuple[int, int]) -> np.ndarray:
    """Right triangle filling the lower-left half of a (height, width) box, the right angle at bottom left.

    A pixel is inside when its lower-left corner lies on or below the diagonal from the box's top-left to
    its bottom-right corner, so the mask always holds the first column and the last row.
    """
    height, width = shape_px
    lower_edge = (np.arange(height)[:, None] + 1) / height
    left_edge = np.arange(width)[None, :] / width
    return left_edge <= lower_edge


def _dead_leaves(shape_px: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    side = min(shape_px)
    low, high = (max(fraction * side, 1.0) for fraction in DEAD_LEAVES_RADII_PER_SIDE)
    material, _ = dead_leaves_material(shape_px, rng, low, max(high, low))
    return material


def simulate_insitu_cdi(config: InSituCdiConfig | None = None) -> InSituCdiData:
    """Draw a sample and a static texture from ``config.seed`` and return both noisy patterns (module doc)."""
    config = config if config is not None else InSituCdiConfig()
    rng = np.random.default_rng(config.seed)
    n = config.size_px
    side = config.sample_size_px
    (sy, sx), (uy, ux) = config.sample_corner_px, config.static_corner_px
    height, width = config.static_shape_px

    sample = np.zeros((n, n))
    sample[sy : sy + side, sx : sx + side] = _dead_leaves((side, side), rng)
    sample_support = np.zeros((n, n), dtype=bool)
    sample_support[sy : sy + side, sx : sx + side] = True

    static_support = np.zeros((n, n), dtype=bool)
    static_support[uy : uy + height, ux : ux + width] = triangle_mask((height, width))
    static = np.zeros((n, n))
    texture = STATIC_TEXTURE_FLOOR + (1 - STATIC_TEXTURE_FLOOR) * _dead_leaves((height, width), rng)
    static[uy : uy + height, ux : ux + width] = texture
    static *= static_support

    exit_wave = sample + np.sqrt(config.illumination_ratio) * static
    counts = config.photons_per_px * n * n
    incident = counts / float((exit_wave**2).sum())
    static_incident = config.static_photons_per_px * n * n / float((static**2).sum())
    pattern = rng.poisson(incident * far_field_intensity(exit_wave)).astype(np.float64)
    static_pattern = rng.poisson(static_incident * far_field_intensity(static)).astype(np.float64)
    return InSituCdiData(
        config,
        pattern,
        static_pattern,
        sample,
        static,
        sample_support,
        static_support,
        incident,
        static_incident,
    )

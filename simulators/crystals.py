"""AutoPhaseNN training data: random faceted crystals for 3D Bragg CDI, probe-lit ptychography patches.

Reference: Y. Yao, H. Chan, S. Sankaranarayanan, P. Balaprakash, R. J. Harder and M. J. Cherukara,
"AutoPhaseNN: unsupervised physics-aware deep learning of 3D nanoscale Bragg coherent diffraction imaging",
npj Comput. Mater. 8, 124 (2022); the network trains on diffraction amplitudes of simulated crystals only.

**Crystals.** A crystal is a convex polyhedron, the intersection of half-spaces n_i · r ≤ d_i. Its facets are
the {100} and {111} families of a randomly oriented cubic crystal (a truncated octahedron, the usual shape of
an fcc nanocrystal), each facet at its own distance, plus a few random planes; a sphere of the crystal's
radius R caps whatever the facets leave open. With the signed distance s(r) = max_i (n_i · r − d_i), which
is exact near a facet, the density ρ = clip(½ − s, 0, 1) has one-pixel antialiased facets, as the Siemens
star of :mod:`phasestream.simulators.samples` does. The crystal sits in the central half of the box (R at
most a quarter of the box), so the oversampling is at least 2 on every axis.

The Bragg phase φ = G · u(r) of a smooth displacement field is a random quadratic form plus Gaussian bumps,
shifted to zero mean over the crystal and scaled so that max |φ| over the crystal is uniform in
[0, max_phase_rad]. No linear term: a phase ramp only moves the Bragg peak, and measured patterns are centred
on the peak.

The amplitude follows the project's convention (:mod:`phasestream.models.physics`, here in 3D):
a = |fftshift(fftn(ρ e^{iφ}, norm="ortho"))|, drawn as Poisson counts whose peak is log-uniform in the
configured range, then a = sqrt(counts) / max, the max-normalised input of the network.

**Ptychography patches.** Windows of a Siemens star or dead-leaves object under a zone-plate probe
(:mod:`phasestream.simulators.probes`, Σ|P|² = 1), with Poisson counts for N incident photons; the
amplitude is given in units of the incident beam, a = sqrt(counts / N), so |F(P · O)| is its expectation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from phasestream.simulators.probes import ProbeKind, make_probe
from phasestream.simulators.samples import complex_transmission, dead_leaves_material, siemens_star_material

_CUBE_NORMALS = np.eye(3)
_CUBE_NORMALS = np.concatenate([_CUBE_NORMALS, -_CUBE_NORMALS])
_OCTAHEDRON_NORMALS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) / math.sqrt(3)


class CrystalConfig(BaseModel):
    """Random crystals in a cubic box; lengths in voxels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box_px: int = Field(default=64, ge=16, le=512, description="edge of the cubic box")
    radius_min_px: float = Field(default=9.0, gt=1.0)
    radius_max_px: float = Field(default=14.5, gt=1.0, description="at most box/4 − 1: the central half")
    random_facets_max: int = Field(default=6, ge=0, le=64, description="extra random facets, 0 to this")
    max_phase_rad: float = Field(
        default=math.pi / 2, ge=0.0, le=math.pi, description="largest |φ| over the crystal"
    )
    peak_counts_min: float = Field(default=1e4, gt=0.0)
    peak_counts_max: float = Field(default=1e7, gt=0.0)

    @model_validator(mode="after")
    def _crystal_fits_the_central_half(self) -> CrystalConfig:
        # Half a voxel of antialiasing and half a voxel of random offset must stay inside the central half.
        largest_px = self.box_px / 4 - 1
        if self.radius_max_px > largest_px:
            raise ValueError(
                f"radius_max_px={self.radius_max_px} does not keep the crystal in the central half of a "
                f"{self.box_px}-px box: use at most {largest_px}"
            )
        if self.radius_min_px > self.radius_max_px:
            raise ValueError(
                f"radius_min_px={self.radius_min_px} exceeds radius_max_px={self.radius_max_px}: swap them"
            )
        if self.peak_counts_min > self.peak_counts_max:
            raise ValueError(
                f"peak_counts_min={self.peak_counts_min:g} exceeds peak_counts_max={self.peak_counts_max:g}"
            )
        return self


@dataclass(frozen=True)
class CrystalPatterns:
    """A batch of simulated crystals with their ground truth."""

    objects: np.ndarray  # complex64 (n, box, box, box): ρ e^{iφ}, zero outside the crystal
    amplitudes: np.ndarray  # float32 (n, box, box, box): sqrt(Poisson counts), max-normalised to 1
    peak_counts: np.ndarray  # float64 (n,): expected counts at the brightest pixel


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed 3×3 rotation (QR of a Gaussian matrix with the signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def crystal_density(config: CrystalConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased density ρ ∈ [0, 1] of one random crystal on the box's central half, and the voxel
    coordinates (3, m, m, m) relative to the crystal's centre, in units of its radius R."""
    half = config.box_px // 2
    radius_px = rng.uniform(config.radius_min_px, config.radius_max_px)
    offset_px = rng.uniform(-0.5, 0.5, size=3)
    axis = np.arange(half, dtype=np.float64) - half // 2
    coordinates = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")) - offset_px[:, None, None, None]
    n_random = int(rng.integers(0, config.random_facets_max + 1))
    random_normals = rng.standard_normal((n_random, 3))
    random_normals /= np.linalg.norm(random_normals, axis=1, keepdims=True)
    rotation = random_rotation(rng)
    normals = np.concatenate([_CUBE_NORMALS @ rotation.T, _OCTAHEDRON_NORMALS @ rotation.T, random_normals])
    # {100} facets closer than the {111} ones truncate the octahedron; distances vary per facet so that the
    # crystal is not centrosymmetric, like a real one grown on a substrate.
    distances_px = radius_px * np.concatenate(
        [
            rng.uniform(0.6, 0.9, size=len(_CUBE_NORMALS)),
            rng.uniform(0.65, 1.0, size=len(_OCTAHEDRON_NORMALS)),
            rng.uniform(0.7, 1.0, size=n_random),
        ]
    )
    signed_distance_px = np.linalg.norm(coordinates, axis=0) - radius_px
    for normal, distance_px in zip(normals, distances_px, strict=True):
        plane_px = np.tensordot(normal, coordinates, axes=1) - distance_px
        np.maximum(signed_distance_px, plane_px, out=signed_distance_px)
    density = np.clip(0.5 - signed_distance_px, 0.0, 1.0)
    return density, coordinates / radius_px


def strain_phase(
    coordinates: np.ndarray, density: np.ndarray, max_phase_rad: float, rng: np.random.Generator
) -> np.ndarray:
    """Smooth Bragg phase on the crystal: quadratic form plus 1–3 Gaussian bumps, zero mean, random peak."""
    quadratic = rng.standard_normal((3, 3))
    phase = np.einsum("i...,ij,j...->...", coordinates, quadratic + quadratic.T, coordinates)
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(-0.7, 0.7, size=3)[:, None, None, None]
        width = rng.uniform(0.3, 0.7)
        weight = rng.standard_normal()
        phase += weight * np.exp(-np.sum((coordinates - centre) ** 2, axis=0) / (2 * width**2)) * 4
    inside = density > 0.5
    phase -= phase[inside].mean()
    peak = np.abs(phase[inside]).max()
    target_rad = rng.uniform(0.0, max_phase_rad)
    return phase * (target_rad / peak) if peak > 0 else phase


def centred_far_field_3d(image: np.ndarray) -> np.ndarray:
    """fftshift(fftn(ρ, norm="ortho")) over the last three axes: the project's convention in 3D."""
    axes = (-3, -2, -1)
    return np.fft.fftshift(np.fft.fftn(image, axes=axes, norm="ortho"), axes=axes)


def simulate_crystals(
    n: int, rng: np.random.Generator, config: CrystalConfig | None = None
) -> CrystalPatterns:
    """``n`` random crystals (objects in the full box) and their noisy, max-normalised amplitudes."""
    config = config or CrystalConfig()
    box = config.box_px
    low = box // 2 - box // 4
    objects = np.zeros((n, box, box, box), dtype=np.complex64)
    amplitudes = np.empty((n, box, box, box), dtype=np.float32)
    peak_counts = np.exp(rng.uniform(np.log(config.peak_counts_min), np.log(config.peak_counts_max), size=n))
    for index in range(n):
        density, coordinates = crystal_density(config, rng)
        phase = strain_phase(coordinates, density, config.max_phase_rad, rng)
        objects[index, low : low + box // 2, low : low + box // 2, low : low + box // 2] = density * np.exp(
            1j * phase
        )
        # Single precision: the FFT rounds at about 1e-7 of the peak amplitude, far below the amplitude of one
        # photon (3e-4 of the peak at 1e7 peak counts).
        intensity = np.abs(centred_far_field_3d(objects[index])).astype(np.float64) ** 2
        counts = rng.poisson(intensity * (peak_counts[index] / intensity.max()))
        amplitude = np.sqrt(counts.astype(np.float64))
        amplitudes[index] = amplitude / amplitude.max()
    return CrystalPatterns(objects, amplitudes, peak_counts)


class PtychoPatchConfig(BaseModel):
    """Object windows under a probe on a small detector; lengths in pixels of the window's grid.

    The default probe is the demo's geometry (:mod:`phasestream.simulators.scan_simulation`: a zone-plate
    probe a third of the window wide, a bright field half the detector wide) on a 64-pixel detector.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_px: int = Field(default=64, ge=16, le=1024)
    probe: ProbeKind = ProbeKind.ZONE_PLATE
    probe_diameter_px: float = Field(default=64 / 3, gt=0.0)
    probe_bright_field_diameter_px: float = Field(default=32.0, gt=0.0)
    zone_plate_central_stop_fraction: float = Field(default=0.4, ge=0.0, lt=1.0)
    canvas_px: int = Field(default=128, ge=32, le=8192, description="object canvas the windows are cut from")
    amplitude_min_range: tuple[float, float] = Field(default=(0.3, 0.95), description="|O| minimum, drawn")
    phase_range_rad_range: tuple[float, float] = Field(default=(0.3, 2.0), description="arg O span, drawn")
    photons_min: float = Field(default=1e4, gt=0.0, description="incident photons per frame, log-uniform")
    photons_max: float = Field(default=1e7, gt=0.0)

    @model_validator(mode="after")
    def _windows_fit_the_canvas(self) -> PtychoPatchConfig:
        if self.canvas_px < self.window_px:
            raise ValueError(f"canvas_px={self.canvas_px} is smaller than window_px={self.window_px}")
        for name, (low, high) in (
            ("amplitude_min_range", self.amplitude_min_range),
            ("phase_range_rad_range", self.phase_range_rad_range),
        ):
            if not 0 <= low <= high:
                raise ValueError(f"{name}=({low}, {high}): need 0 <= low <= high")
        if self.amplitude_min_range[1] > 1:
            raise ValueError(f"amplitude_min_range={self.amplitude_min_range}: a transmission stays <= 1")
        if self.photons_min > self.photons_max:
            raise ValueError(f"photons_min={self.photons_min:g} exceeds photons_max={self.photons_max:g}")
        return self


@dataclass(frozen=True)
class PtychoPatches:
    """A batch of probe-lit windows with their ground truth."""

    objects: np.ndarray  # complex64 (n, w, w): the object transmission O in each window
    amplitudes: np.ndarray  # float32 (n, w, w): sqrt(counts / incident photons), centred
    photons: np.ndarray  # float64 (n,): incident photons of each frame


def ptycho_probe(config: PtychoPatchConfig | None = None) -> np.ndarray:
    """The probe of :func:`simulate_ptycho_patches`, complex64 (w, w), Σ|P|² = 1."""
    config = config or PtychoPatchConfig()
    return make_probe(
        config.probe,
        config.window_px,
        config.probe_diameter_px,
        config.probe_bright_field_diameter_px,
        config.zone_plate_central_stop_fraction,
    )


def random_object_canvas(config: PtychoPatchConfig, rng: np.random.Generator) -> np.ndarray:
    """A Siemens star (random spokes, centre and size) or a dead-leaves object, complex64 canvas."""
    shape = (config.canvas_px, config.canvas_px)
    if rng.random() < 0.5:
        centre = tuple(int(v) for v in rng.integers(0, config.canvas_px, size=2))
        radius_px = rng.uniform(0.3, 1.0) * config.canvas_px
        material = siemens_star_material(shape, int(rng.integers(8, 48)), radius_px, centre)
        absorption, phase = material, material
    else:
        absorption, phase = dead_leaves_material(shape, rng, 2.0, config.canvas_px / 4)
    amplitude_min = rng.uniform(*config.amplitude_min_range)
    phase_range_rad = rng.uniform(*config.phase_range_rad_range)
    return complex_transmission(absorption, phase, amplitude_min, phase_range_rad)


def simulate_ptycho_patches(
    n: int, rng: np.random.Generator, config: PtychoPatchConfig | None = None, probe: np.ndarray | None = None
) -> PtychoPatches:
    """``n`` random windows of one random canvas, under ``probe`` (default :func:`ptycho_probe`)."""
    config = config or PtychoPatchConfig()
    probe = ptycho_probe(config) if probe is None else probe
    window = config.window_px
    canvas = random_object_canvas(config, rng)
    corners = rng.integers(0, config.canvas_px - window + 1, size=(n, 2))
    objects = np.stack([canvas[y : y + window, x : x + window] for y, x in corners])
    photons = np.exp(rng.uniform(np.log(config.photons_min), np.log(config.photons_max), size=n))
    spectrum = np.fft.fftshift(np.fft.fft2(objects * probe, norm="ortho"), axes=(-2, -1))
    counts = rng.poisson(np.abs(spectrum) ** 2 * photons[:, None, None])
    amplitudes = np.sqrt(counts / photons[:, None, None]).astype(np.float32)
    return PtychoPatches(objects.astype(np.complex64), amplitudes, photons)

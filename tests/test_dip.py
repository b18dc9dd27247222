"""DIP networks, ES-WMV, the in-situ CDI simulator, LoDIP, HIO-stat and double DIP.

Three tiers: kernels against NumPy references (running variance, misfits, channel maps, alignment); invariants
(shapes, Parseval, disjoint supports, the twin's modulus, no hallucinated periodic peaks); convergence on
simulated data with justified thresholds. Fits use small networks and few iterations so that the file stays
within its time budget on a 2-core CPU; the paper-sized runs are ``phasestream bench lodip``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phasestream_bench.dip import BENCH_NETWORK, align_to_truth, periodic_peaks, sample_psnr, twin
from pydantic import ValidationError

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.models.cdi.double_dip import double_dip, object_box
from phasestream.models.cdi.lodip import (
    data_misfit,
    hio_stat,
    lodip,
    reconstruct_static,
    static_in_pattern_units,
)
from phasestream.models.cdi.options import (
    DoubleDipOptions,
    FitLoss,
    HioStatOptions,
    LodipOptions,
)
from phasestream.models.nets.dip import EsWmv, channels_to_image, dip_denoise, image_to_channels
from phasestream.models.nets.dip_options import (
    ARCHITECTURES,
    ComplexChannels,
    DenoiseOptions,
    DipArchitecture,
    EarlyStoppingOptions,
    ExecutionOptions,
    SkipNetConfig,
)
from phasestream.models.nets.skip_net import SkipNet, dip_grid_shape, skip_net_config
from phasestream.models.quality import psnr
from phasestream.simulators.insitu_cdi import (
    InSituCdiConfig,
    InSituCdiData,
    simulate_insitu_cdi,
    triangle_mask,
)
from phasestream.simulators.samples import dead_leaves_material

TINY = SkipNetConfig(channels=(8, 16), skip_channels=(4, 4), input_channels=8)
"""Two levels: enough to exercise the fitting loop in milliseconds per step."""
SMALL_GEOMETRY = {"size_px": 32, "sample_size_px": 8, "static_shape_px": (8, 6)}
CPU = {"device": "cpu"}


def denoise_options(architecture=TINY, **changes) -> DenoiseOptions:
    """DenoiseOptions on the CPU with this network and some groups changed."""
    return DenoiseOptions(network={"architecture": architecture}, execution=CPU).replace(**changes)


def lodip_options(architecture=TINY, **changes) -> LodipOptions:
    return LodipOptions(network={"architecture": architecture}, execution=CPU).replace(**changes)


def double_dip_options(architecture=TINY, **changes) -> DoubleDipOptions:
    return DoubleDipOptions(network={"architecture": architecture}, execution=CPU).replace(**changes)


pytestmark = pytest.mark.usefixtures("one_thread")


def dead_leaves(size_px: int, seed: int) -> np.ndarray:
    """A [0, 1] dead-leaves image: occluding discs, no periodic content."""
    material, _ = dead_leaves_material((size_px, size_px), np.random.default_rng(seed), 2.0, size_px / 3)
    return material


# --------------------------------------------------------------------------------------------------------
# Networks


def test_presets_have_the_channels_and_skips_of_erin_et_al() -> None:
    assert ARCHITECTURES[DipArchitecture.ARCH1].channels == (8, 16, 32, 64, 128)
    assert ARCHITECTURES[DipArchitecture.ARCH1].skip_channels == (0, 0, 0, 4, 4)
    assert ARCHITECTURES[DipArchitecture.ARCH2].channels == (128,) * 6


@pytest.mark.parametrize(
    ("architecture", "shape", "grid"),
    [
        (DipArchitecture.ARCH1, (64, 64), (64, 64)),
        (DipArchitecture.ARCH1, (50, 70), (64, 96)),
        (DipArchitecture.ARCH2, (64, 64), (128, 128)),
    ],
)
def test_skip_nets_build_and_run_at_their_grids(architecture, shape, grid) -> None:
    assert dip_grid_shape(shape, architecture) == grid
    network = SkipNet(architecture, 2)
    with torch.no_grad():
        out = network(torch.rand(1, 32, *grid))
    assert out.shape == (1, 2, *grid)
    assert float(out.min()) > 0 and float(out.max()) < 1
    levels, level = [], network.body
    while level is not None:
        levels.append(level)
        level = level.deeper
    assert len(levels) == skip_net_config(architecture).levels
    has_skip = [level.skip is not None for level in levels]
    assert has_skip == [width > 0 for width in skip_net_config(architecture).skip_channels]


def test_skip_net_rejects_a_grid_its_levels_cannot_halve() -> None:
    with pytest.raises(ConfigError, match="dip_grid_shape"):
        SkipNet(DipArchitecture.ARCH1, 1)(torch.rand(1, 32, 48, 48))


def test_bad_network_configs_are_rejected() -> None:
    with pytest.raises(ValidationError, match="one entry per level"):
        SkipNetConfig(channels=(8, 16), skip_channels=(4,))
    with pytest.raises(ValidationError, match=r"channels\.1"):
        SkipNetConfig(channels=(8, 0), skip_channels=(4, 4))
    with pytest.raises(ValidationError, match=r"skip_channels\.0"):
        SkipNetConfig(channels=(8, 16), skip_channels=(-1, 4))
    with pytest.raises(ConfigError, match="arch1, arch2"):
        skip_net_config("arch3")


# --------------------------------------------------------------------------------------------------------
# ES-WMV


@pytest.mark.parametrize("is_complex", [False, True])
def test_es_wmv_variance_matches_a_numpy_reference(is_complex) -> None:
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((30, 4, 5)) * np.linspace(1, 3, 30)[:, None, None]
    if is_complex:
        frames = frames + 1j * rng.standard_normal(frames.shape)
    window = 7
    stopper = EsWmv(EarlyStoppingOptions(window=window, patience=1000))
    for frame in frames:
        stopper.update(torch.as_tensor(frame))
    pairs = np.stack([frames.real, frames.imag], axis=-1) if is_complex else frames
    expected = [np.var(pairs[t - window + 1 : t + 1], axis=0).mean() for t in range(window - 1, len(frames))]
    np.testing.assert_allclose(stopper.variances, expected, rtol=1e-10)


def test_es_wmv_stops_patience_steps_after_a_known_variance_minimum() -> None:
    """Frames c + a(t)·ε_t with a(t) = 0.02 + |t − 400| / 400: the expected windowed variance is the
    window's mean of a², smallest for the window centred on t = 400, i.e. ending at 400 + (W − 1)/2."""
    rng = np.random.default_rng(1)
    window, patience = 40, 150
    amplitude = 0.02 + np.abs(np.arange(2000) - 400) / 400
    expected_variance = np.convolve(amplitude**2, np.ones(window) / window, mode="valid")
    expected_best = int(np.argmin(expected_variance)) + window - 1
    stopper = EsWmv(EarlyStoppingOptions(window=window, patience=patience))
    frames = []
    for t in range(2000):
        frames.append(0.5 + amplitude[t] * rng.standard_normal((16, 16)))
        if stopper.update(torch.as_tensor(frames[-1])):
            break
    assert abs(stopper.best_iteration - expected_best) <= window // 4
    assert stopper.iteration == stopper.best_iteration + patience
    np.testing.assert_array_equal(stopper.best.numpy(), frames[stopper.best_iteration])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"early_stopping": {"window": 1}}, "early_stopping.window"),
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience"),
        ({"optimisation": {"max_iterations": 0}}, "optimisation.max_iterations"),
        ({"optimisation": {"lr": 0.0}}, "optimisation.lr"),
        ({"optimisation": {"input_noise_std": -0.1}}, "optimisation.input_noise_std"),
        ({"network": {"representation": "polar"}}, "network.representation"),
        ({"execution": {"seed": -1}}, "execution.seed"),
        ({"execution": {"num_threads": 0}}, "execution.num_threads"),
        ({"execution": {"device": "gpu"}}, "execution.device"),
    ],
)
def test_dip_options_out_of_bounds_are_refused_naming_the_option(changes, field) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        denoise_options(**changes)


def test_solver_defaults_hold_for_a_group_given_in_part() -> None:
    """LoDIP's patience is its own; a partial early_stopping group keeps it, as replace() keeps the rest."""
    assert LodipOptions(early_stopping={"window": 20}).early_stopping.patience == 300
    assert DoubleDipOptions(early_stopping={"window": 20}).early_stopping.patience == 500
    options = lodip_options(optimisation={"lr": 0.5})
    assert options.optimisation.lr == 0.5 and options.network.architecture == TINY
    assert options.execution == ExecutionOptions(device="cpu")


# --------------------------------------------------------------------------------------------------------
# Denoising


@pytest.mark.parametrize("mode", list(ComplexChannels))
def test_complex_images_map_to_two_channels_and_back(mode) -> None:
    rng = np.random.default_rng(2)
    image = (1 + rng.random((5, 6))) * np.exp(1j * rng.uniform(-3, 3, (5, 6)))
    channels = image_to_channels(image, mode)
    reference = (
        np.stack([image.real, image.imag])
        if mode is ComplexChannels.REAL_IMAG
        else np.stack([np.abs(image), np.angle(image)])
    )
    np.testing.assert_allclose(channels, reference)
    np.testing.assert_allclose(channels_to_image(channels, mode, True), image)


@pytest.mark.parametrize(
    ("image", "mode"),
    [
        (dead_leaves(16, 0).astype(np.float32), ComplexChannels.REAL_IMAG),
        (np.exp(1j * dead_leaves(16, 1)).astype(np.complex64), ComplexChannels.REAL_IMAG),
        (np.exp(1j * dead_leaves(16, 1)).astype(np.complex64), ComplexChannels.AMPLITUDE_PHASE),
    ],
)
def test_dip_denoise_keeps_shape_and_dtype(image, mode) -> None:
    options = denoise_options(network={"representation": mode}, optimisation={"max_iterations": 5})
    result = dip_denoise(image, options)
    assert result.denoised.shape == image.shape and result.denoised.dtype == image.dtype
    assert result.stop_iteration == 5 and len(result.losses) == 5 and not result.diverged
    assert np.isfinite(result.denoised).all()


@pytest.mark.slow
def test_dip_denoise_removes_noise_from_a_smooth_image() -> None:
    """A smooth 32-px image with σ = 0.2 noise: a DIP fits the smooth content before the noise, so the
    ES-WMV output must beat the noisy input by a clear margin (3 dB = half the squared error)."""
    rng = np.random.default_rng(3)
    frequency = np.hypot(np.fft.fftfreq(32)[:, None], np.fft.fftfreq(32)[None, :])
    clean = np.fft.ifft2(np.fft.fft2(rng.standard_normal((32, 32))) * np.exp(-((frequency / 0.06) ** 2))).real
    clean = (clean - clean.min()) / (clean.max() - clean.min())
    noisy = clean + 0.2 * rng.standard_normal(clean.shape)
    options = denoise_options(
        BENCH_NETWORK, optimisation={"max_iterations": 400}, early_stopping={"window": 20, "patience": 60}
    )
    result = dip_denoise(noisy, options)
    assert psnr(result.denoised, clean, 1.0) > psnr(noisy, clean, 1.0) + 3


def test_a_diverging_fit_stops_reports_and_returns_the_input() -> None:
    image = dead_leaves(16, 4)
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = dip_denoise(image, denoise_options(optimisation={"max_iterations": 200, "lr": 1e30}))
    assert result.diverged and result.stop_iteration < 200
    assert not np.isfinite(result.losses[-1])
    np.testing.assert_array_equal(result.denoised, image)


def test_dip_denoise_rejects_bad_images() -> None:
    with pytest.raises(FrameValidationError, match="NaN"):
        dip_denoise(np.full((16, 16), np.nan), denoise_options())
    with pytest.raises(FrameValidationError, match="2D"):
        dip_denoise(np.zeros((2, 16, 16)), denoise_options())


@pytest.mark.parametrize(
    ("architecture", "iterations"), [(DipArchitecture.ARCH1, 120), (DipArchitecture.ARCH2, 12)]
)
@pytest.mark.slow
def test_dip_output_has_no_new_periodic_peaks(architecture, iterations) -> None:
    """Strided downsampling and upsampling can print a grid onto DIP outputs (the hallucination Erin et al.
    saw); on an image with no periodic content the output must add no isolated spectral peak. The detector
    is checked on the same output with a faint (2 %) period-4 grid added: it must find the grid's
    harmonics (to within the Hann window's one-pixel spread) and nothing else."""
    rng = np.random.default_rng(5)
    clean = dead_leaves(64, 5)
    noisy = clean + 0.1 * rng.standard_normal(clean.shape)
    result = dip_denoise(noisy, denoise_options(architecture, optimisation={"max_iterations": iterations}))
    assert periodic_peaks(result.denoised) - periodic_peaks(noisy) == set()
    grid = 0.02 * (np.arange(64)[:, None] % 4 == 0)
    found = periodic_peaks(result.denoised + grid) - periodic_peaks(result.denoised)
    harmonics = np.array([(16, 0), (32, 0), (48, 0)])
    offsets = (np.array(sorted(found))[:, None, :] - harmonics[None] + 32) % 64 - 32
    assert found and (np.abs(offsets).max(axis=2).min(axis=1) <= 1).all()


# --------------------------------------------------------------------------------------------------------
# In-situ CDI simulator


def test_pattern_counts_follow_the_dose_and_parseval() -> None:
    config = InSituCdiConfig(photons_per_px=50.0, illumination_ratio=4.0)
    data = simulate_insitu_cdi(config)
    exit_wave = data.sample_truth + np.sqrt(4.0) * data.static_truth
    n = config.size_px
    assert data.incident_photons_per_px * (exit_wave**2).sum() == pytest.approx(50.0 * n * n, rel=1e-12)
    # Poisson: the mean count over n² pixels is N within a few standard errors sqrt(N) / n.
    assert abs(data.pattern.mean() - 50.0) < 5 * np.sqrt(50.0) / n
    assert abs(data.static_pattern.mean() - config.static_photons_per_px) < 5 * np.sqrt(1e5) / n
    assert data.sample_scale**2 == pytest.approx(data.incident_photons_per_px)
    assert data.static_scale**2 == pytest.approx(4.0 * data.incident_photons_per_px)


def test_regions_are_disjoint_and_the_static_support_has_no_twin() -> None:
    data = simulate_insitu_cdi()
    assert not (data.sample_support & data.static_support).any()
    assert (
        not data.sample_truth[~data.sample_support].any()
        and not data.static_truth[~data.static_support].any()
    )
    assert data.sample_truth.max() <= 1 and data.static_truth[data.static_support].min() >= 0.5
    triangle = triangle_mask((16, 12))
    assert not np.array_equal(np.flip(triangle), triangle)
    assert triangle[:, 0].all() and triangle[-1].all()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"static_top_left_px": (24, 30)}, "overlaps the sample support"),
        ({"sample_top_left_px": (60, 10)}, "leaves the 64"),
        ({"sample_size_px": 30}, "undersampled"),
    ],
)
def test_bad_geometry_is_a_config_error(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        InSituCdiConfig(**settings)


# --------------------------------------------------------------------------------------------------------
# LoDIP and HIO-stat


def small_case(photons_per_px: float, seed: int = 0) -> tuple[InSituCdiData, np.ndarray]:
    data = simulate_insitu_cdi(InSituCdiConfig(**SMALL_GEOMETRY, photons_per_px=photons_per_px, seed=seed))
    estimate = reconstruct_static(data.static_pattern, data.static_support, ExecutionOptions(**CPU))
    static = static_in_pattern_units(
        estimate,
        data.static_incident_photons_per_px,
        data.incident_photons_per_px,
        data.config.illumination_ratio,
    )
    return data, static


@pytest.mark.parametrize("loss", list(FitLoss))
def test_data_misfit_matches_numpy(loss) -> None:
    rng = np.random.default_rng(6)
    spectrum = rng.standard_normal((8, 8)) + 1j * rng.standard_normal((8, 8))
    counts = rng.poisson(2.0, (8, 8)).astype(float)
    intensity = np.abs(spectrum) ** 2
    if loss is FitLoss.POISSON:
        expected = np.mean(intensity - counts * np.log(intensity + 1e-6))
    else:
        expected = np.mean((np.abs(spectrum) - np.sqrt(counts)) ** 2)
    value = data_misfit(
        torch.as_tensor(spectrum), torch.as_tensor(counts), torch.as_tensor(counts).sqrt(), loss
    )
    assert float(value) == pytest.approx(expected, rel=1e-9)


def test_static_region_is_recovered_from_its_high_dose_pattern() -> None:
    """At 1e5 counts per detector pixel the Poisson error of each amplitude is far below 1 %; the triangle
    support removes translation and twin, so U must come back to within 1 %."""
    data, static = small_case(1000.0)
    truth = data.static_scale * data.static_truth
    assert np.linalg.norm(static - truth) / np.linalg.norm(truth) < 0.01


def test_hio_stat_recovers_the_sample_at_high_dose() -> None:
    """At 1e4 photons per detector pixel each sample pixel receives about 5e4 photons, so shot noise leaves
    an error near 0.5 / √(5e4) ≈ 0.2 % of the range (≈ 50 dB; seeds 0-3 give 49-50 dB). 40 dB (1 % RMS)
    leaves room for other seeds while any failure to phase would score near 10 dB."""
    data, static = small_case(1e4)
    sample = hio_stat(
        data.pattern, static, data.sample_support, data.static_support, HioStatOptions(execution=CPU)
    )
    assert sample_psnr(sample, data) > 40
    assert not sample[~data.sample_support].any()


@pytest.mark.slow
def test_lodip_recovers_the_sample_at_high_dose() -> None:
    """At 1e4 photons per pixel the data allow about 50 dB (HIO-stat above); a DIP reaches that slowly,
    but within 400 iterations it must resolve the leaves: 20 dB (RMS error 10 % of the range) against
    10-11 dB for the best constant image. (Seeds 0-3 reach 29-36 dB here.)"""
    data, static = small_case(1e4, seed=1)
    options = lodip_options(BENCH_NETWORK, optimisation={"max_iterations": 400})
    result = lodip(data.pattern, static, data.sample_support, data.static_support, options)
    constant = np.full(data.sample_support.sum(), data.sample_truth[data.sample_support].mean())
    assert psnr(constant, data.sample_truth[data.sample_support], 1.0) < 12
    assert sample_psnr(result.sample, data) > 20
    assert not result.diverged and not result.sample[~data.sample_support].any()


def test_a_diverging_lodip_returns_hio_stat() -> None:
    data, static = small_case(100.0)
    problem = (data.pattern, static, data.sample_support, data.static_support)
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = lodip(*problem, lodip_options(optimisation={"lr": 1e30, "max_iterations": 100}))
    assert result.diverged
    np.testing.assert_allclose(result.sample, hio_stat(*problem, HioStatOptions(execution=CPU)))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ("no_photons", FrameValidationError, "no diffraction"),
        ("overlap", ConfigError, "overlaps the sample support"),
        ("stray_static", ConfigError, "nonzero"),
        ("wrong_shape", ConfigError, "shape"),
    ],
)
def test_insitu_solvers_reject_bad_input(change, error, message) -> None:
    data, static = small_case(100.0)
    pattern, sample_support, static_support = data.pattern, data.sample_support, data.static_support
    if change == "no_photons":
        pattern = np.zeros_like(pattern)
    elif change == "overlap":
        static_support = static_support | sample_support
    elif change == "stray_static":
        static = static + 1.0
    else:
        sample_support = sample_support[:-1]
    for solver, options in ((hio_stat, HioStatOptions(execution=CPU)), (lodip, lodip_options())):
        with pytest.raises(error, match=message):
            solver(pattern, static, sample_support, static_support, options)


# --------------------------------------------------------------------------------------------------------
# Double DIP and the alignment of reference-free results


def test_twin_keeps_the_fourier_modulus_and_alignment_undoes_it() -> None:
    rng = np.random.default_rng(7)
    image = np.zeros((32, 32), dtype=complex)
    image[10:20, 8:22] = rng.random((10, 14)) * np.exp(1j * rng.random((10, 14)))
    np.testing.assert_allclose(np.abs(np.fft.fft2(twin(image))), np.abs(np.fft.fft2(image)), rtol=1e-10)
    moved = np.exp(0.7j) * np.roll(twin(image), (3, -2), axis=(0, 1))
    np.testing.assert_allclose(align_to_truth(moved, image), image, atol=1e-10)


@pytest.mark.slow
def test_double_dip_fits_a_plane_wave_pattern_inside_its_half_size_box() -> None:
    data = simulate_insitu_cdi(InSituCdiConfig(**SMALL_GEOMETRY, photons_per_px=1e4))
    options = double_dip_options(
        BENCH_NETWORK, optimisation={"max_iterations": 150}, early_stopping={"window": 20, "patience": 1000}
    )
    result = double_dip(data.pattern, options)
    outside = np.ones(data.pattern.shape, dtype=bool)
    outside[object_box(data.pattern.shape)] = False
    assert result.object.shape == data.pattern.shape and not result.object[outside].any()
    # The misfit of the first step is that of the networks' initial, almost flat object; fitting must
    # remove most of it.
    assert result.losses[-1] < 0.2 * result.losses[0]


def test_double_dip_rejects_an_empty_pattern_and_falls_back_when_it_diverges() -> None:
    with pytest.raises(FrameValidationError, match="no diffraction"):
        double_dip(np.zeros((32, 32)), double_dip_options(optimisation={"max_iterations": 2}))
    data = simulate_insitu_cdi(InSituCdiConfig(**SMALL_GEOMETRY, photons_per_px=100.0))
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = double_dip(
            data.pattern, double_dip_options(optimisation={"lr": 1e30, "max_iterations": 100})
        )
    assert result.diverged and np.isfinite(result.object).all() and np.abs(result.object).max() > 0

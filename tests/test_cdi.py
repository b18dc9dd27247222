"""ER/HIO/shrink-wrap: kernels against a NumPy reference, invariants, convergence in 2D and 3D, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from phasestream.errors import ConfigError, FrameValidationError
from phasestream.models.cdi.options import CdiOptions, HioStatOptions, ScheduleOptions, SupportOptions
from phasestream.models.cdi.phasing import CdiSolver, amplitude_from_intensity, best_of_random_starts
from phasestream.models.cdi.support import ShrinkWrap
from phasestream.models.quality import aligned_error

BCDI_AMPLITUDE = Path(__file__).parent / "data" / "bcdi_amplitude_64.npy"
CPU = CdiOptions(execution={"device": "cpu"})
SHRINK_WRAP = {"shrink_wrap": True}


def on_cpu(**changes) -> CdiOptions:
    """CdiOptions on the CPU with some groups changed (mappings of the fields to change)."""
    return CPU.replace(**changes)


# --------------------------------------------------------------------------------------------------------
# Independent NumPy reference: Fienup (1982) written out, complex128, centred patterns, no torch.


def centred_far_field(image: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(image, norm="ortho"))


def reference_fourier_projection(image, amplitude, measured):
    far = centred_far_field(image)
    corrected = np.where(measured, amplitude * np.exp(1j * np.angle(far)), far)
    return np.fft.ifftn(np.fft.ifftshift(corrected), norm="ortho")


def reference_step(image, amplitude, measured, support, algorithm, positivity, beta=0.9):
    projected = reference_fourier_projection(image, amplitude, measured)
    allowed = support & (projected.real >= 0) if positivity else support
    kept = projected.real.astype(complex) if positivity else projected
    if algorithm == "er":
        return np.where(allowed, kept, 0)
    return np.where(allowed, kept, image - beta * projected)


def reference_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Periodic separable Gaussian blur as explicit sums of rolled copies (no FFT)."""
    blurred = image.astype(np.float64)
    for axis, n in enumerate(image.shape):
        offsets = np.arange(-(n // 2), n - n // 2)
        weights = np.exp(-0.5 * (offsets / sigma_px) ** 2)
        blurred = sum(w * np.roll(blurred, int(d), axis=axis) for d, w in zip(offsets, weights, strict=True))
    return blurred


# --------------------------------------------------------------------------------------------------------
# Simulated objects


def blob_2d(n: int = 64, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Compact complex blob: an ellipse 23 × 17 px with smooth random amplitude and phase (oversampling
    64/23 ≈ 2.8 and 64/17 ≈ 3.8), and a loose 35 × 27 px box support around it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] - n // 2
    inside = np.hypot(yy / 11, xx / 8) < 1
    frequency = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.fftfreq(n)[None, :])
    noise = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    smooth = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-((frequency / 0.08) ** 2)))
    smooth /= np.abs(smooth).max()
    obj = inside * (0.6 + 0.4 * np.abs(smooth)) * np.exp(1.5j * smooth.real)
    return obj, (np.abs(yy) < 18) & (np.abs(xx) < 14)


def faceted_crystal_3d(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Convex polyhedron from ten half-spaces (a cube of side 12 px with four corners cut by {111}
    planes), uniform density and a smooth strain-like phase, in a 32³ box (oversampling ≈ 2.7); a loose
    19³ box support."""
    centres = np.indices((n, n, n)).reshape(3, -1).T - n // 2 + 0.5
    normals = np.array(
        [
            *([1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]),
            *([1, 1, 1], [-1, -1, -1], [1, -1, 1], [-1, 1, -1]),
        ],
        dtype=float,
    )
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    distances_px = np.array([6.0] * 6 + [7.0] * 4)
    inside = ((centres @ normals.T) <= distances_px).all(axis=1).reshape(n, n, n)
    z, y, x = np.indices((n, n, n)) - n // 2
    obj = inside * np.exp(0.6j * np.sin(2 * np.pi * (z + 0.5 * y) / 24))
    return obj, (np.abs(z) < 10) & (np.abs(y) < 10) & (np.abs(x) < 10)


def twin_aware_error_3d(estimate: np.ndarray, truth: np.ndarray) -> float:
    """‖e^{iφ} shift(x) − truth‖ / ‖truth‖ with the best whole-pixel (circular) shift and global phase,
    minimised over x = estimate and its twin conj(flip(estimate))."""
    errors = []
    for candidate in (estimate, np.conj(np.flip(estimate))):
        correlation = np.fft.ifftn(np.fft.fftn(truth) * np.conj(np.fft.fftn(candidate)))
        shift = np.unravel_index(np.argmax(np.abs(correlation)), correlation.shape)
        aligned = np.roll(candidate, shift, axis=tuple(range(truth.ndim)))
        aligned = aligned * np.exp(1j * np.angle(np.vdot(aligned, truth)))
        errors.append(np.linalg.norm(aligned - truth) / np.linalg.norm(truth))
    return float(min(errors))


def twin_aware_error_2d(estimate: np.ndarray, truth: np.ndarray) -> float:
    return min(aligned_error(estimate, truth), aligned_error(np.conj(np.flip(estimate)), truth))


# Arrays of 64² to 64³ gain little from a second thread, and with the second core busy (other tests
# beside these) two threads made this file 10x slower (45 s instead of 4 s).
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------------
# Tier 1: one iteration against the NumPy reference


@pytest.mark.parametrize("algorithm", ["er", "hio"])
@pytest.mark.parametrize("positivity", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_one_iteration_matches_numpy_reference(algorithm, positivity, with_mask):
    rng = np.random.default_rng(7)
    n = 24
    truth = np.zeros((n, n), complex)
    truth[8:16, 9:15] = rng.random((8, 6)) + 0.3j * rng.random((8, 6))
    amplitude = np.abs(centred_far_field(truth))
    unmeasured = np.zeros((n, n), bool)
    if with_mask:
        unmeasured[n // 2 - 1 : n // 2 + 2, n // 2 - 1 : n // 2 + 2] = True  # a beamstop
        amplitude[unmeasured] = np.nan  # never read
    support = np.zeros((n, n), bool)
    support[6:18, 7:17] = True
    start = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))

    solver = CdiSolver(
        amplitude,
        support,
        on_cpu(constraints={"positivity": positivity}, execution={"precision": "complex128"}),
        unmeasured=unmeasured if with_mask else None,
        initial_image=start,
    )
    solver.step(algorithm)

    expected = reference_step(
        start, np.nan_to_num(amplitude), ~unmeasured, support, algorithm, positivity, beta=0.9
    )
    difference = np.linalg.norm(solver.image.numpy() - expected) / np.linalg.norm(expected)
    assert difference < 1e-5
    far = centred_far_field(start)
    measured = ~unmeasured
    expected_error = np.sum((np.abs(far) - amplitude)[measured] ** 2) / np.sum(amplitude[measured] ** 2)
    assert float(solver.fourier_errors[0]) == pytest.approx(expected_error, rel=1e-9)


# --------------------------------------------------------------------------------------------------------
# Tier 2: invariants


@pytest.mark.parametrize("positivity", [False, True])
def test_er_error_never_rises(positivity):
    obj, loose_support = blob_2d()
    if positivity:
        obj = np.abs(obj)
    amplitude = np.abs(centred_far_field(obj))
    unmeasured = np.zeros(obj.shape, bool)
    unmeasured[30:34, 30:34] = True
    solver = CdiSolver(
        amplitude,
        loose_support,
        on_cpu(constraints={"positivity": positivity}, execution={"seed": 3, "precision": "complex128"}),
        unmeasured=unmeasured,
    )
    errors = solver.run([("er", 50)]).numpy()
    assert errors[-1] < 0.5 * errors[0]  # it does make progress
    # Fienup 1982: E_{k+1} ≤ E_k for error reduction; the tolerance covers float64 rounding only.
    assert np.all(np.diff(errors) <= 1e-12 * errors[:-1])


def test_perfect_start_stays_put():
    obj, _ = blob_2d()
    true_support = np.abs(obj) > 0
    amplitude = np.abs(centred_far_field(obj))
    solver = CdiSolver(
        amplitude,
        true_support,
        on_cpu(schedule={"hio_iterations": 10, "er_iterations": 10}),
        initial_image=obj,
    )
    errors = solver.run()
    assert float(errors.max()) < 1e-10
    change = np.linalg.norm(solver.image.numpy() - obj) / np.linalg.norm(obj)
    assert change < 1e-5  # complex64 rounding of 20 FFT pairs


def test_shrink_wrap_matches_thresholded_blur():
    n = 40
    yy, xx = np.mgrid[:n, :n]
    disc = np.hypot(yy - 15, xx - 22) < 7
    blob = disc * (1.2 - np.hypot(yy - 15, xx - 22) / 14)
    blob[27:33, 4:10] = 0.6  # a second, weaker piece: the 20 % threshold must keep it
    image = torch.as_tensor(blob * np.exp(1j * xx / 7))
    shrink_wrap = ShrinkWrap(SupportOptions(**SHRINK_WRAP))
    support = shrink_wrap.update(image, ndim=2).numpy()

    blurred = reference_blur(blob, sigma_px=3.0)
    expected = blurred >= 0.2 * blurred.max()
    assert np.array_equal(support, expected)
    assert support[disc].all() and support.sum() > disc.sum()  # the 3 px blur grows the support
    assert support[30, 7] and not support[0, 0]
    assert shrink_wrap.sigma_px == pytest.approx(2.97)


def test_shrink_wrap_sigma_floor_and_interval():
    obj, loose_support = blob_2d()
    amplitude = np.abs(centred_far_field(obj))
    solver = CdiSolver(amplitude, loose_support, on_cpu(support=SHRINK_WRAP))
    solver.run([("hio", 19)])
    assert np.array_equal(solver.support.numpy(), loose_support)
    solver.run([("hio", 1)])
    assert not np.array_equal(solver.support.numpy(), loose_support)
    solver.shrink_wrap.sigma_px = 1.51
    solver.run([("er", 40)])
    assert solver.shrink_wrap.sigma_px == 1.5


# --------------------------------------------------------------------------------------------------------
# Tier 3: convergence on simulated data


@pytest.mark.slow
def test_convergence_2d_hio_er_shrink_wrap():
    obj, loose_support = blob_2d()
    amplitude = np.abs(centred_far_field(obj))
    result = best_of_random_starts(
        amplitude, loose_support, on_cpu(support=SHRINK_WRAP, schedule={"cycles": 10}), 3
    )
    # Measured: best of seeds 0-2 has χ² 1.7e-10 and error 0.0045 after 2,000 iterations (single seeds
    # after 1,200 iterations: 0.04-0.07); 0.02 leaves a 4x margin and still fails for a stagnated or
    # twin-mixed result, which sits above 0.1.
    assert result.final_error < 1e-6
    assert twin_aware_error_2d(result.image.numpy(), obj) < 0.02
    assert len(result.fourier_errors) == 2000


@pytest.mark.slow
def test_convergence_3d_faceted_crystal_best_of_random_starts():
    obj, loose_support = faceted_crystal_3d()
    amplitude = np.abs(centred_far_field(obj))
    options = on_cpu(support=SHRINK_WRAP, schedule={"cycles": 5}, execution={"seed": 2})
    result = best_of_random_starts(amplitude, loose_support, options, 3)
    # Measured after 1,000 iterations (seeds 0-5): five-in-six starts reach χ² ≈ 1e-9 and an error of
    # 0.001-0.0034; seeds 2 and 3 stagnate at χ² ≈ 7e-6 with an error of 0.064. Keeping the lowest χ²
    # must therefore pick seed 4 (0.0033); 0.02 is a 6x margin that a stagnated start cannot meet.
    assert result.final_error < 1e-7
    assert twin_aware_error_3d(result.image.numpy(), obj) < 0.02


@pytest.mark.slow
def test_warm_start_from_noisy_truth_converges_fast():
    obj, _ = faceted_crystal_3d()
    amplitude = np.abs(centred_far_field(obj))
    rng = np.random.default_rng(0)
    noisy = obj + 0.2 * (rng.standard_normal(obj.shape) + 1j * rng.standard_normal(obj.shape))
    support = np.abs(obj) > 0
    solver = CdiSolver(amplitude, support, CPU, initial_image=noisy)
    errors = solver.run([("er", 50)])
    start_error = twin_aware_error_3d(noisy * support, obj)
    final_error = twin_aware_error_3d(solver.final_image().numpy(), obj)
    # Measured: χ² falls by more than 100 and the object error from 0.28 to 0.020 in 50 ER iterations.
    assert float(errors[-1]) < 0.01 * float(errors[0])
    assert final_error < start_error / 5


@pytest.mark.skipif(not BCDI_AMPLITUDE.exists(), reason="public BCDI amplitude not present")
@pytest.mark.slow
def test_public_bcdi_amplitude_error_falls():
    amplitude = np.load(BCDI_AMPLITUDE)  # already sqrt(counts): an amplitude, not an intensity
    autocorrelation = np.abs(np.fft.ifftn(np.fft.ifftshift(amplitude.astype(np.float64) ** 2)))
    support = np.fft.fftshift(autocorrelation > 0.04 * autocorrelation.max())
    solver = CdiSolver(amplitude, support, on_cpu(support=SHRINK_WRAP))
    errors = solver.run()
    # Measured over 200 iterations: χ² 0.67 → 0.0026 (seed 0); seeds 1 and 2 fall by 530 and 240. Asking
    # for a factor of 50 keeps a ≥ 5x margin; a solver that fails to use the data stays near χ² ≈ 0.1.
    assert float(errors[-1]) < float(errors[0]) / 50


# --------------------------------------------------------------------------------------------------------
# Bad input


def test_support_shape_mismatch_raises():
    with pytest.raises(ConfigError, match=r"support has shape \(16, 16\) but the pattern is \(32, 32\)"):
        CdiSolver(np.ones((32, 32)), np.ones((16, 16), bool), CPU)


def test_negative_and_nan_intensities_raise_with_count():
    intensity = np.ones((16, 16))
    intensity[0, :3] = -1.0
    with pytest.raises(FrameValidationError, match=r"intensity holds 3 negative values.*clip"):
        amplitude_from_intensity(intensity)
    intensity[0, :3] = 1.0
    intensity[5, 5] = np.nan
    intensity[6, 6] = np.nan
    with pytest.raises(FrameValidationError, match=r"intensity holds 2 NaN values.*unmeasured"):
        amplitude_from_intensity(intensity)


def test_nan_on_unmeasured_pixels_is_allowed():
    amplitude = np.ones((16, 16))
    unmeasured = np.zeros((16, 16), bool)
    amplitude[8, 8] = np.nan
    with pytest.raises(FrameValidationError, match="1 NaN"):
        CdiSolver(amplitude, np.ones((16, 16), bool), CPU)
    unmeasured[8, 8] = True
    solver = CdiSolver(amplitude, np.ones((16, 16), bool), CPU, unmeasured=unmeasured)
    assert np.isfinite(solver.run([("er", 2)]).numpy()).all()


def test_all_zero_pattern_raises():
    with pytest.raises(FrameValidationError, match="zero on every measured pixel"):
        CdiSolver(np.zeros((16, 16)), np.ones((16, 16), bool), CPU)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"unmeasured": np.zeros((8, 8), bool)}, r"unmeasured has shape \(8, 8\)"),
        ({"initial_image": np.zeros((8, 8))}, r"initial_image has shape \(8, 8\)"),
    ],
)
def test_bad_arrays_raise(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        CdiSolver(np.ones((16, 16)), np.ones((16, 16), bool), CPU, **kwargs)


@pytest.mark.parametrize(
    ("groups", "field"),
    [
        ({"constraints": {"beta": 1.5}}, "constraints.beta"),
        ({"constraints": {"beta": 0}}, "constraints.beta"),
        ({"support": {"threshold": 1.0}}, "support.threshold"),
        ({"support": {"interval": 0}}, "support.interval"),
        ({"support": {"min_sigma_px": 4.0}}, "min_sigma_px"),
        ({"schedule": {"er_iterations": -1}}, "schedule.er_iterations"),
        ({"execution": {"device": "gpu"}}, "execution.device"),
        ({"execution": {"precision": "float16"}}, "execution.precision"),
    ],
)
def test_options_out_of_bounds_are_refused_naming_the_option(groups, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        on_cpu(**groups)


def test_a_group_given_in_part_keeps_its_solvers_defaults():
    assert HioStatOptions(schedule={"cycles": 3}).schedule.steps() == [("hio", 450), ("er", 50)] * 3
    assert ScheduleOptions(cycles=2).iterations == 400
    options = on_cpu(support={"interval": 5})
    assert options.support.threshold == 0.2 and options.execution.device == "cpu"
    assert CdiSolver(np.ones((16, 16)), np.ones((16, 16), bool), options).shrink_wrap is None


def test_bad_pattern_and_support_raise():
    with pytest.raises(FrameValidationError, match=r"shape \(16,\)"):
        CdiSolver(np.ones(16), np.ones(16, bool), CPU)
    with pytest.raises(ConfigError, match="support selects no pixel"):
        CdiSolver(np.ones((16, 16)), np.zeros((16, 16), bool), CPU)
    with pytest.raises(ConfigError, match="-3 iterations of hio"):
        CdiSolver(np.ones((16, 16)), np.ones((16, 16), bool), CPU).run([("hio", -3)])
    with pytest.raises(ConfigError, match="starts=0"):
        best_of_random_starts(np.ones((16, 16)), np.ones((16, 16), bool), CPU, 0)
    with pytest.raises(ValueError, match="'raar'"):
        CdiSolver(np.ones((16, 16)), np.ones((16, 16), bool), CPU).run([("raar", 3)])

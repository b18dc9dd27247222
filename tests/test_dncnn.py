"""PINE's denoiser: RealSN against a dense NumPy reference, the shipped D's nonexpansiveness and quality,
the dead-leaves generator, training, resume and the weights loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from phasestream_bench.training.dncnn import train_dncnn, training_batch

from phasestream.errors import ConfigError
from phasestream.models.nets.dncnn import (
    DncnnArchitecture,
    NonexpansiveDncnn,
    apply_to_complex,
    load_denoiser,
    weights_payload,
)
from phasestream.models.nets.realsn import RealSNConv2d, normalise_, operator_spectral_norm, realsn_layers
from phasestream.simulators.dead_leaves_shapes import (
    _front_leaf_index,
    _Leaves,
    dead_leaves_shapes,
    noisy_batch,
)
from phasestream.simulators.samples import siemens_star_material

HELD_OUT_SEED = 20_240_601
"""Training draws from SeedSequence([seed, step, 0]); a plain integer seed is a different stream."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped() -> NonexpansiveDncnn:
    return load_denoiser(device="cpu")


# --------------------------------------------------------------------------------------------------------
# Independent NumPy reference: a zero-padded convolution written out as a dense matrix.


def dense_convolution_matrix(weight: np.ndarray, height: int, width: int) -> np.ndarray:
    """The matrix of out[o, y, x] = Σ_{i, dy, dx} w[o, i, dy, dx] in[i, y + dy − p, x + dx − p], zero padded,
    acting on images flattened in (channel, row, column) order."""
    c_out, c_in, k, _ = weight.shape
    pad = k // 2
    matrix = np.zeros((c_out, height, width, c_in, height, width))
    for o in range(c_out):
        for i in range(c_in):
            for dy in range(k):
                for dx in range(k):
                    for y in range(height):
                        for x in range(width):
                            source_y, source_x = y + dy - pad, x + dx - pad
                            if 0 <= source_y < height and 0 <= source_x < width:
                                matrix[o, y, x, i, source_y, source_x] += weight[o, i, dy, dx]
    return matrix.reshape(c_out * height * width, c_in * height * width)


def largest_singular_value(conv: torch.nn.Conv2d, height: int, width: int) -> float:
    weight = conv.weight.detach().double().numpy()
    return float(np.linalg.svd(dense_convolution_matrix(weight, height, width), compute_uv=False)[0])


def tiny_layer(seed: int = 0) -> RealSNConv2d:
    torch.manual_seed(seed)
    return RealSNConv2d(2, 3, 3, power_image_px=(6, 7)).double()


def test_operator_norm_matches_the_dense_matrix() -> None:
    layer = tiny_layer()
    reference = largest_singular_value(layer, 6, 7)
    assert operator_spectral_norm(layer, (2, 6, 7), iterations=2000) == pytest.approx(reference, rel=1e-6)
    assert layer.power_iteration_(2000) == pytest.approx(reference, rel=1e-6)
    # The reshaped-kernel norm (Miyato et al.'s SN) is a different, smaller number here: RealSN is needed.
    kernel_matrix_norm = np.linalg.norm(layer.weight.detach().numpy().reshape(3, -1), 2)
    assert kernel_matrix_norm < 0.9 * reference


def test_adjoint_is_the_transposed_convolution() -> None:
    layer = tiny_layer(1)
    image, output = torch.randn(1, 2, 6, 7).double(), torch.randn(1, 3, 6, 7).double()
    with torch.no_grad():
        forward = float(torch.sum(layer.operator(image) * output))
        backward = float(torch.sum(image * layer.adjoint(output)))
    assert forward == pytest.approx(backward, rel=1e-12)


@pytest.mark.parametrize("bound", [1.0, 0.5])
def test_normalise_sets_the_dense_norm_to_the_bound(bound: float) -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        RealSNConv2d(1, 4, bound=bound, power_image_px=(6, 6)),
        RealSNConv2d(4, 2, bound=bound, power_image_px=(6, 6)),
    ).double()
    before = [largest_singular_value(layer, 6, 6) for layer in realsn_layers(model)]
    estimates = normalise_(model, iterations=1000)
    # Power iteration converges at the rate (σ₂/σ₁)^2k: close top singular values leave ~1e-5 here.
    assert estimates == pytest.approx(before, rel=1e-4)
    for layer in realsn_layers(model):
        assert largest_singular_value(layer, 6, 6) == pytest.approx(bound, rel=1e-4)


def test_training_mode_divides_by_sigma_and_matches_eval_after_normalise() -> None:
    torch.manual_seed(3)
    layer = RealSNConv2d(2, 3, power_image_px=(6, 6)).double()
    layer.weight.data.mul_(5.0)
    layer.power_iteration_(1000)
    image = torch.randn(2, 2, 6, 6).double()
    trained = layer.train()(image)
    normalise_(layer, iterations=1)
    assert torch.allclose(layer.eval()(image), trained, atol=1e-10)
    assert largest_singular_value(layer, 6, 6) == pytest.approx(1.0, rel=1e-6)


def test_operator_norm_rejects_a_mismatched_shape() -> None:
    with pytest.raises(ConfigError, match="channels"):
        operator_spectral_norm(tiny_layer(), (3, 6, 7))


# --------------------------------------------------------------------------------------------------------
# The shipped denoiser


@pytest.mark.slow
def test_every_shipped_layer_is_nonexpansive(shipped: NonexpansiveDncnn) -> None:
    layers = realsn_layers(shipped)
    assert len(layers) == shipped.architecture.depth
    for layer in layers:
        sigma = operator_spectral_norm(layer, (layer.in_channels, 96, 96), iterations=150)
        assert sigma <= 1 + 1e-3
        assert sigma >= 0.99  # RealSN normalises to 1, it does not just clip


def lipschitz_by_finite_differences(denoiser, image: torch.Tensor, iterations: int = 25) -> float:
    """Power iteration on Jᵀ J with J v from central differences of D and Jᵀ w from autograd."""
    step = 1e-2
    vector = torch.randn(image.shape, generator=torch.Generator().manual_seed(5))
    vector /= vector.norm()
    ratio = 0.0
    for _ in range(iterations):
        with torch.no_grad():
            pushed = (denoiser(image + step * vector) - denoiser(image - step * vector)) / (2 * step)
        ratio = float(pushed.norm())
        point = image.clone().requires_grad_(True)
        (pulled,) = torch.autograd.grad(denoiser(point), point, grad_outputs=pushed)
        vector = pulled / pulled.norm()
    return ratio


def check_images() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(HELD_OUT_SEED)
    leaves = dead_leaves_shapes(1, (64, 64), rng)[0]
    star = siemens_star_material((64, 64), 16, 28, (32, 32)).astype(np.float32)
    images = {
        "dead leaves σ 0.1": leaves + 0.1 * rng.standard_normal(leaves.shape),
        "siemens star σ 0.05": star + 0.05 * rng.standard_normal(star.shape),
        "white noise": rng.random((64, 64)),
    }
    return {name: torch.from_numpy(image.astype(np.float32))[None, None] for name, image in images.items()}


@pytest.mark.slow
def test_shipped_denoiser_is_nonexpansive(shipped: NonexpansiveDncnn) -> None:
    """Lip(D) ≤ 1.05 at three kinds of images; ReLU networks are piecewise linear, so local Jacobian norms
    are what Lip(D) is made of. Random pairs give a lower bound that must also stay below 1."""
    for name, image in check_images().items():
        assert lipschitz_by_finite_differences(shipped, image) <= 1.05, name
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    pairs = torch.from_numpy(dead_leaves_shapes(8, (48, 48), rng)[:, None])
    other = pairs + 0.1 * torch.from_numpy(rng.standard_normal(pairs.shape).astype(np.float32))
    with torch.no_grad():
        ratios = (shipped(pairs) - shipped(other)).flatten(1).norm(dim=1) / (pairs - other).flatten(1).norm(
            dim=1
        )
    assert float(ratios.max()) <= 1.0


def psnr_db(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((estimate - truth) ** 2)))


def best_gaussian_filter_psnr_db(noisy: np.ndarray, truth: np.ndarray) -> float:
    """The best PSNR of a Gaussian low-pass, its width chosen knowing the truth: a linear oracle baseline."""
    ky = np.fft.fftfreq(noisy.shape[0])[:, None]
    kx = np.fft.fftfreq(noisy.shape[1])[None, :]
    spectrum = np.fft.fft2(noisy)
    best = psnr_db(noisy, truth)
    for sigma_px in np.linspace(0.3, 3.0, 28):
        transfer = np.exp(-2 * (np.pi * sigma_px) ** 2 * (ky**2 + kx**2))
        best = max(best, psnr_db(np.fft.ifft2(spectrum * transfer).real, truth))
    return best


@pytest.mark.parametrize("sigma", [0.05, 0.1])
def test_shipped_denoiser_raises_psnr(shipped: NonexpansiveDncnn, sigma: float) -> None:
    """The yardstick is the best Gaussian low-pass, its width chosen knowing the truth. A nonexpansive D
    cannot sharpen, so on dense dead leaves (leaves down to 1 px, little redundancy) it can only come close
    to that oracle: it must reach 80 % of the oracle's gain. On the Siemens star (never trained on) its
    edge-preserving must beat the oracle by 0.5 dB, a third of the noise power the oracle leaves at σ = 0.1.
    Measured on these images: dead leaves +0.41 / +2.54 dB (oracle +0.44 / +2.08), star +1.24 / +2.88 dB
    (oracle +0.29 / +1.87) at σ = 0.05 / 0.1."""
    rng = np.random.default_rng(HELD_OUT_SEED + 2)
    truths = {
        "dead leaves": dead_leaves_shapes(4, (64, 64), rng),
        "siemens star": siemens_star_material((128, 128), 32, 56, (64, 64))[None].astype(np.float32),
    }
    for name, truth in truths.items():
        noisy = (truth + sigma * rng.standard_normal(truth.shape)).astype(np.float32)
        with torch.no_grad():
            denoised = shipped(torch.from_numpy(noisy)[:, None])[:, 0].numpy()
        noisy_db = psnr_db(noisy, truth)
        oracle_db = np.mean([best_gaussian_filter_psnr_db(n, t) for n, t in zip(noisy, truth, strict=True)])
        assert psnr_db(denoised, truth) - noisy_db >= 0.8 * (oracle_db - noisy_db) > 0.2, name
        if name == "siemens star":
            assert psnr_db(denoised, truth) >= oracle_db + 0.5


def test_apply_to_complex_is_nonexpansive_and_maps_back(shipped: NonexpansiveDncnn) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(HELD_OUT_SEED + 3)
    amplitude, phase = dead_leaves_shapes(2, (48, 48), rng)
    obj = torch.from_numpy((0.5 + 0.5 * amplitude) * np.exp(2j * phase)).to(torch.complex64)
    other = obj + 0.05 * torch.randn(obj.shape, dtype=torch.complex64)
    value_range = (-1.0, 1.0)
    first = apply_to_complex(shipped, obj, value_range)
    second = apply_to_complex(shipped, other, value_range)
    assert first.dtype == torch.complex64 and first.shape == obj.shape
    assert float((first - second).abs().norm()) <= float((obj - other).abs().norm())
    # The real part goes through the same affine map as a real image would: (x + 1) · 0.4 + 0.1 ↦ [0.1, 0.9].
    with torch.no_grad():
        real = shipped(((obj.real + 1) * 0.4 + 0.1)[None, None])[0, 0]
    assert torch.allclose(first.real, (real - 0.1) / 0.4 - 1, atol=1e-5)
    # Noise of σ = 0.25 per part is σ = 0.1 in the training range (scale 2.5): D brings it closer to obj.
    noisy = obj + 0.25 * np.sqrt(2) * torch.randn(obj.shape, dtype=torch.complex64)
    denoised = apply_to_complex(shipped, noisy, value_range)
    assert float((denoised - obj).abs().norm()) < 0.8 * float((noisy - obj).abs().norm())


# --------------------------------------------------------------------------------------------------------
# Dead leaves


def test_dead_leaves_range_shape_and_seed() -> None:
    images = dead_leaves_shapes(6, (40, 48), np.random.default_rng(7))
    assert images.shape == (6, 40, 48) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert np.array_equal(images, dead_leaves_shapes(6, (40, 48), np.random.default_rng(7)))
    assert not np.array_equal(images, dead_leaves_shapes(6, (40, 48), np.random.default_rng(8)))
    # Occlusion makes images piecewise smooth, not flat: every image has texture and many edges.
    assert np.all(images.std(axis=(1, 2)) > 0.05)
    assert len(np.unique(np.round(images[0], 3))) > 50


def test_noisy_batch_adds_noise_of_the_requested_sigma() -> None:
    noisy, clean = noisy_batch(np.random.default_rng(9), 64, 32, (0.05, 0.1))
    assert noisy.shape == clean.shape == (64, 1, 32, 32)
    residual_std = (noisy - clean).std(axis=(1, 2, 3))
    assert residual_std.min() > 0.05 * 0.9 and residual_std.max() < 0.1 * 1.1
    with pytest.raises(ConfigError):
        noisy_batch(np.random.default_rng(9), 2, 32, (0.1, 0.05))


@pytest.mark.parametrize(
    ("sides", "vertex_phase_rad", "area_factor"),
    [
        (0, 0.0, np.pi),  # ellipse: π a b
        (4, np.pi / 4, 2.0),  # rectangle of half-diagonals (a, b) along the axes: 2 a b
        (3, 0.0, 3 * np.sqrt(3) / 4),  # stretched regular triangle, circumradius 1: (n/2) sin(2π/n) a b
        (6, 0.0, 3 * np.sqrt(3) / 2),
    ],
)
def test_leaf_rasterisation_area_matches_geometry(
    sides: int, vertex_phase_rad: float, area_factor: float
) -> None:
    """One rotated leaf of semi-axes (40, 24) px on a 128² canvas covers the analytic area to 1 %."""
    semi_major, semi_minor = 40.0, 24.0

    def column(value: float) -> np.ndarray:
        return np.array([0.0, value])  # leaf 0 is the background, never rasterised

    leaf = _Leaves(
        centre_y=column(63.7), centre_x=column(64.2),
        semi_major=column(semi_major), semi_minor=column(semi_minor),
        orientation_rad=column(0.6), sides=np.array([0, sides]), vertex_phase_rad=column(vertex_phase_rad),
        offset=column(0), gradient_y=column(0), gradient_x=column(0), amplitude=column(0),
        wavevector_y=column(0), wavevector_x=column(0), phase_rad=column(0),
    )  # fmt: skip
    covered = int(np.sum(_front_leaf_index(leaf, 1, 2, (128, 128)) == 1))
    assert covered == pytest.approx(area_factor * semi_major * semi_minor, rel=0.01)


# --------------------------------------------------------------------------------------------------------
# Training, resume and loading

TINY = {"batch_size": 8, "patch_px": 16, "depth": 3, "width": 8, "progress": False, "device": "cpu"}


@pytest.mark.slow
def test_a_few_training_steps_lower_the_loss(tmp_path) -> None:
    """At σ = 0.1 the identity scores a mean squared error of σ² = 0.01; 40 steps of a tiny network must
    already do 10 % better than that and better than its own first steps."""
    sigma = 0.1
    result = train_dncnn(
        tmp_path / "d.pt", steps=40, lr=3e-3, sigma_range=(sigma, sigma), checkpoint_every=100, **TINY
    )
    losses = np.array(result.losses)
    assert len(losses) == 40
    assert losses[-10:].mean() < min(0.9 * sigma**2, losses[:10].mean())
    assert result.lipschitz_estimate <= 2.0  # Lip(N) ≤ 1 by RealSN, so Lip(x − N(x)) ≤ 2
    model = load_denoiser(tmp_path / "d.pt", device="cpu")
    assert model.architecture == DncnnArchitecture(depth=3, width=8)
    assert not model.training


class InterruptedRunError(Exception):
    """Stands for a run killed between checkpoints."""


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(tmp_path, monkeypatch) -> None:
    """A run killed after its step-3 checkpoint and resumed ends where an uninterrupted run does: the batch
    of a step depends only on (seed, step), and the checkpoint restores weights, power vectors and Adam."""
    straight = train_dncnn(tmp_path / "straight.pt", steps=6, checkpoint_every=3, **TINY)

    def batch_until_step_3(seed, step, *args):
        if step == 3:
            raise InterruptedRunError
        return training_batch(seed, step, *args)

    monkeypatch.setattr("phasestream_bench.training.dncnn.training_batch", batch_until_step_3)
    with pytest.raises(InterruptedRunError):
        train_dncnn(tmp_path / "resumed.pt", steps=6, checkpoint_every=3, **TINY)
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed.ckpt", weights_only=True)["step"] == 3
    resumed = train_dncnn(tmp_path / "resumed.pt", steps=6, checkpoint_every=3, resume=True, **TINY)
    assert (resumed.start_step, resumed.final_step, len(resumed.losses)) == (3, 6, 3)
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-5)
    first = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "resumed.pt", weights_only=True)["state_dict"]
    for name, tensor in first.items():
        assert torch.allclose(tensor, second[name], atol=1e-6), name


@pytest.mark.slow
def test_resume_rejects_another_architecture(tmp_path) -> None:
    train_dncnn(tmp_path / "d.pt", steps=1, checkpoint_every=1, **TINY)
    with pytest.raises(ConfigError, match="depth 4"):
        train_dncnn(tmp_path / "d.pt", steps=2, resume=True, **{**TINY, "depth": 4})


def test_mismatched_weights_name_both_architectures(tmp_path) -> None:
    declared = DncnnArchitecture(depth=4, width=8)
    actual = NonexpansiveDncnn(DncnnArchitecture(depth=3, width=16))
    payload = weights_payload(actual)
    payload["architecture"] = declared.model_dump()
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    with pytest.raises(ConfigError) as raised:
        load_denoiser(path)
    message = str(raised.value)
    assert declared.describe() in message
    assert "DnCNN depth 3, width 16" in message


def test_missing_or_foreign_weights_raise_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no DnCNN weights"):
        load_denoiser(tmp_path / "absent.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="does not hold"):
        load_denoiser(tmp_path / "foreign.pt")

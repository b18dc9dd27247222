"""The inversion stage: stitching against NumPy, forwarding, bad frames, the mosaic's quality on held-out
simulated scans, refine starting from the mosaic, and a launched pipeline that publishes the mosaic to Tiled
before the final object."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from tiled.client import from_uri

from phasestream.apps.tiled_server import EmbeddedTiledServer
from phasestream.errors import ConfigError
from phasestream.models.nets.autophasenn.weights import default_weights_path
from phasestream.models.quality import aligned_error
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import load_pipeline
from phasestream.runtime.messages import FrameBatch, Geometry, Product, Reconstruction, ScanEnd, ScanStart
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.topology import place
from phasestream.simulators.scan_file import save_scan
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan
from phasestream.stages.inversion import Mosaic, resample_object

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
GENERIC_WEIGHTS = default_weights_path(2)  # 64-px frames, the training's own probe: no binning
UID = "scan"


pytestmark = pytest.mark.usefixtures("one_thread")


def inversion_stage(**config):
    pipeline = load_pipeline(DEPLOY / "demo.yaml")
    placement = place(pipeline, "inversion", 0)
    placement.spec.config.update({"device": "cpu", **config})
    return resolve_stage(placement.spec.stage).from_placement(placement, pipeline)


def geometry_of(scan: SimulatedScan) -> Geometry:
    size = scan.frames.shape[-1]
    return Geometry(
        energy_kev=scan.energy_kev, detector_distance_m=scan.detector_distance_m,
        pixel_size_m=scan.detector_pixel_size_m, detector_shape_px=(size, size), detector_dtype="uint16",
    )  # fmt: skip


def run_scan(stage, scan: SimulatedScan, frames: np.ndarray | None = None, batch: int = 16) -> list:
    """Every message the stage sends for one scan, in order, with the batches it was given."""
    frames = scan.frames if frames is None else frames
    out = list(
        stage.on_scan_start(ScanStart(scan_uid=UID, geometry=geometry_of(scan), planned_frames=len(frames)))
    )
    sent = []
    for first in range(0, len(frames), batch):
        indices = list(range(first, min(first + batch, len(frames))))
        message = FrameBatch(
            scan_uid=UID, seq=len(sent) + 1, frame_indices=indices, frames=frames[indices],
            positions_m=scan.positions_m[indices],
        )  # fmt: skip
        sent.append(message)
        out += list(stage.process(message))
    out += list(stage.on_scan_end(ScanEnd(scan_uid=UID, frames_sent=len(frames))))
    return sent, out


def small_scan(n_positions: int = 40, seed: int = 3) -> SimulatedScan:
    """The generic 2D network's own geometry: 64-px frames, probe a third of the window, bright field half."""
    config = ScanSimulationConfig(
        detector_size_px=64,
        probe_diameter_px=64 / 3,
        probe_bright_field_diameter_px=32,
        n_positions=n_positions,
        seed=seed,
    )
    return simulate_scan(config)


# --------------------------------------------------------------------------------------------------------
# Tier 1: stitching and resampling against NumPy


def numpy_mosaic(patches, corners, weight, shape):
    numerator = np.zeros(shape, complex)
    denominator = np.zeros(shape)
    for patch, (top, left) in zip(patches, corners, strict=True):
        for i in range(weight.shape[0]):
            for j in range(weight.shape[1]):
                numerator[top + i, left + j] += weight[i, j] * patch[i, j]
                denominator[top + i, left + j] += weight[i, j]
    lit = denominator > 0.05 * denominator.max()
    return np.where(lit, numerator / np.where(lit, denominator, 1), 0)


def test_known_patches_at_known_positions_stitch_to_the_numpy_weighted_mean():
    rng = np.random.default_rng(0)
    dx, window, margin = 10e-9, 8, 2
    weight = rng.uniform(0.1, 1.0, (window, window))
    corners = np.array([[0, 0], [3, 5], [6, 1], [9, 9]])
    positions = corners * dx + np.array([1e-6, -2e-6])
    patches = rng.standard_normal((4, window, window)) + 1j * rng.standard_normal((4, window, window))
    mosaic = Mosaic(dx, weight, margin_px=margin)
    mosaic.add(patches[:2], positions[:2])
    mosaic.add(patches[2:], positions[2:])
    expected = numpy_mosaic(patches, corners + margin, weight, (9 + window + 2 * margin,) * 2)
    np.testing.assert_allclose(mosaic.image(0.05), expected, atol=1e-6)
    # The probe centre of each position lands on pixel corner + N//2, as in refine's published object.
    origin = np.asarray(mosaic.pixel_origin_m())
    centre_px = (positions - origin) / dx
    np.testing.assert_allclose(centre_px, corners + margin + window // 2, atol=1e-9)


def test_a_position_above_and_left_of_the_origin_grows_the_canvas_and_keeps_the_grid():
    rng = np.random.default_rng(1)
    dx, window = 10e-9, 6
    weight = np.ones((window, window))
    positions = np.array([[0.0, 0.0], [4 * dx, 2 * dx], [-3 * dx, -5 * dx]])
    patches = rng.standard_normal((3, window, window)) + 0j
    mosaic = Mosaic(dx, weight, origin_m=np.zeros(2), margin_px=0)
    mosaic.add(patches[:2], positions[:2])
    mosaic.add(patches[2:], positions[2:])  # grows 3 rows up and 5 columns left
    corners = np.array([[3, 5], [7, 7], [0, 0]])
    expected = numpy_mosaic(patches, corners, weight, mosaic.image().shape)
    np.testing.assert_allclose(mosaic.image(), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mosaic.pixel_origin_m()), -np.array([3, 5]) * dx - window // 2 * dx)


def test_resampling_onto_a_shifted_grid_is_a_slice_and_fills_outside():
    rng = np.random.default_rng(2)
    image = rng.uniform(0.5, 1, (10, 12)) * np.exp(1j * rng.uniform(-1, 1, (10, 12)))
    dx = 5e-9
    shifted = resample_object(image, (0.0, 0.0), dx, (4, 5), (2 * dx, 3 * dx), dx)
    np.testing.assert_allclose(shifted, image[2:6, 3:8], rtol=1e-6)
    outside = resample_object(image, (0.0, 0.0), dx, (3, 3), (-10 * dx, 0.0), dx, fill=1.0)
    np.testing.assert_array_equal(outside, np.ones((3, 3)))
    # Half a pixel: the mean of the two neighbours (bilinear).
    half = resample_object(image, (0.0, 0.0), dx, (1, 1), (0.0, 0.5 * dx), dx)
    np.testing.assert_allclose(half[0, 0], (image[0, 0] + image[0, 1]) / 2, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------
# The stage: forwarding, accounting, bad input


def test_frames_are_forwarded_unchanged_in_order_and_a_final_mosaic_precedes_scan_end():
    scan = small_scan()
    stage = inversion_stage(weights_path=str(GENERIC_WEIGHTS), bin_factor=1, batch_size=8, emit_interval_s=60)
    sent, out = run_scan(stage, scan)
    forwarded = [m for m in out if isinstance(m, FrameBatch)]
    assert forwarded == sent and all(a is b for a, b in zip(forwarded, sent, strict=True))
    kinds = [type(m).__name__ for m in out]
    assert kinds[0] == "ScanStart" and kinds[-1] == "ScanEnd"
    mosaics = [m for m in out if isinstance(m, Reconstruction)]
    # Latest wins: the first mosaic at once, then none within emit_interval_s, then the final one.
    assert [m.final for m in mosaics] == [False, True] and out[-2] is mosaics[-1]
    assert all(m.product is Product.MOSAIC for m in mosaics)
    assert mosaics[-1].positions_used == len(scan.frames)
    assert stage.scan(UID).counts["frames_inverted"] == len(scan.frames)
    # Each batch is forwarded before the network runs on it: the first mosaic follows the batch that
    # filled the network's first batch of 8.
    assert out.index(mosaics[0]) == 1 + 1


def test_wrong_size_zero_and_saturated_frames_are_forwarded_but_not_inverted_and_counted():
    scan = small_scan(n_positions=16)
    frames = scan.frames.copy()
    frames[2] = 0  # shutter closed
    frames[5, 30:34, 30:34] = np.iinfo(np.uint16).max  # saturated centre
    stage = inversion_stage(weights_path=str(GENERIC_WEIGHTS), bin_factor=1, batch_size=4)
    sent, out = run_scan(stage, scan, frames)
    assert [m for m in out if isinstance(m, FrameBatch)] == sent
    counts = stage.scan(UID).counts
    assert counts["not_inverted_zero_photons"] == 1 and counts["not_inverted_saturated"] == 1
    assert counts["frames_inverted"] == 14
    # Too small for the 64-px network: refused with the expected shape, counted, forwarded.
    small = small_scan(n_positions=4)
    stage = inversion_stage(weights_path=str(GENERIC_WEIGHTS), bin_factor=1)
    warnings = []
    stage.warn = lambda reason, text: warnings.append(text)
    _, out = run_scan(stage, small, small.frames[:, :48, :48].copy())
    assert stage.scan(UID).counts["not_inverted_wrong_shape"] == 4
    assert "(64, 64)" in warnings[0] and "(48, 48)" in warnings[0]
    assert not [m for m in out if isinstance(m, Reconstruction)]
    # A frame that bin_factor cannot divide is refused with the factor in the message.
    stage = inversion_stage(weights_path=str(GENERIC_WEIGHTS), bin_factor=2)
    stage.warn = lambda reason, text: warnings.append(text)
    run_scan(stage, small)
    assert stage.scan(UID).counts["not_inverted_wrong_shape"] == 4 and "bin_factor=2" in warnings[-1]


def test_larger_frames_are_cropped_to_the_network_with_a_coarser_object_pixel():
    scan = simulate_scan(
        ScanSimulationConfig(
            detector_size_px=96, probe_diameter_px=32, probe_bright_field_diameter_px=32, n_positions=8
        )
    )
    stage = inversion_stage(weights_path=str(GENERIC_WEIGHTS), bin_factor=1, fit="crop")
    _, out = run_scan(stage, scan)
    (mosaic,) = [m for m in out if isinstance(m, Reconstruction)]
    assert stage.scan(UID).counts["frames_inverted"] == 8
    # A 64-px crop of a 96-px detector keeps the detector pixel: the object pixel grows by 96 / 64.
    assert mosaic.object_pixel_size_m == pytest.approx(scan.object_pixel_size_m * 96 / 64, rel=1e-9)


def test_weights_of_another_architecture_are_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"3D AutoPhaseNN.*2D AutoPhaseNN"):
        inversion_stage(weights_path=str(default_weights_path(3)))
    with pytest.raises(ConfigError, match="no AutoPhaseNN weights"):
        inversion_stage(weights_path=str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------------------------------------
# Tier 3: the demo's mosaic against the truth on held-out simulated scans


def demo_mosaic_scores(sample: str, seed: int, n_positions: int = 150) -> dict[str, float]:
    """Final mosaic of a demo-geometry scan (192-px SELUN, the shipped demo weights) against the truth
    resampled onto the mosaic's grid, over the disc the scan covers."""
    scan = simulate_scan(ScanSimulationConfig(n_positions=n_positions, sample=sample, seed=seed))
    _, out = run_scan(inversion_stage(), scan, batch=32)
    mosaic = [m for m in out if isinstance(m, Reconstruction)][-1]
    image = mosaic.object
    truth = resample_object(
        scan.object_truth, scan.object_top_left_m, scan.object_pixel_size_m, image.shape, mosaic.origin_m,
        mosaic.object_pixel_size_m,
    )  # fmt: skip
    y, x = (mosaic.origin_m[a] + np.arange(image.shape[a]) * mosaic.object_pixel_size_m for a in (0, 1))
    covered = np.hypot(y[:, None], x[None, :]) < np.hypot(*scan.positions_m.T).max()
    mask = covered & (np.abs(image) > 0)
    return {
        "error": aligned_error(image, truth, mask),
        "flat_error": aligned_error(np.ones_like(truth), truth, mask),
        "amplitude_correlation": float(np.corrcoef(np.abs(image)[mask], np.abs(truth)[mask])[0, 1]),
    }


@pytest.mark.slow
def test_demo_mosaic_resembles_the_truth_on_held_out_scans():
    """Held out: the network was trained on random 64-px patches, never on a scan, and these scans are new.
    The discriminating figure is the correlation of |mosaic| with |truth| over the scanned disc (blind to the
    scale the incident-flux estimate sets): measured 0.69 on dead leaves and 0.36 on the Siemens star
    (0.68 on the full 420-position demo scan), against 0.35 and 0.03 for the generic 2D weights, trained
    for another probe. The complex error after removing the global phase (0.43 and 0.66, against 0.69 and
    0.79 for a clear object) only says the mosaic is no worse than a flat start: the network does not learn
    the phase, which Yao et al. refine iteratively, and the generic weights score 0.48 and 0.64 on it too."""
    leaves = demo_mosaic_scores("dead_leaves", seed=21)
    assert leaves["amplitude_correlation"] > 0.5, leaves
    assert leaves["error"] < 0.75 * leaves["flat_error"], leaves
    star = demo_mosaic_scores("siemens_star", seed=21)
    assert star["amplitude_correlation"] > 0.2, star
    assert star["error"] < star["flat_error"], star


# --------------------------------------------------------------------------------------------------------
# Refine starts from the mosaic


def refine_stage(**config):
    pipeline = load_pipeline(DEPLOY / "demo.yaml")
    placement = place(pipeline, "refine", 0)
    placement.spec.config.update(config)
    return resolve_stage(placement.spec.stage).from_placement(placement, pipeline)


@pytest.mark.parametrize("initial_object", ["flat", "mosaic", "mosaic_amplitude"])
def test_refine_starts_from_a_mosaic_that_arrives_before_its_first_epoch(initial_object):
    """A mosaic that is the truth itself, on the simulator's grid, with the scan's origin on a truth pixel:
    refine's start canvas must then be the truth shifted by a whole number of pixels, which holds only if
    both stages map positions to pixels the same way."""
    scan = small_scan(n_positions=12)
    stage = refine_stage(
        initial_object=initial_object, min_positions=4, probe_search_epochs=0, execution={"num_threads": 1}
    )
    dx, top_left = scan.object_pixel_size_m, np.asarray(scan.object_top_left_m)
    corner_px = np.floor((scan.positions_m.min(axis=0) - top_left) / dx)
    y_min, x_min = top_left + corner_px * dx
    extent = (y_min, float(scan.positions_m[:, 0].max()), x_min, float(scan.positions_m[:, 1].max()))
    start = ScanStart(scan_uid=UID, geometry=geometry_of(scan), planned_frames=12, scan_extent_m=extent)
    list(stage.on_scan_start(start))
    mosaic = Reconstruction(
        scan_uid=UID, product=Product.MOSAIC, algorithm="truth", iteration=0, positions_used=12,
        object_pixel_size_m=dx, origin_m=scan.object_top_left_m, object=scan.object_truth,
        probe=scan.probe_truth,
    )  # fmt: skip
    assert list(stage.process(mosaic)) == [mosaic]  # forwarded to publish in any case
    batch = FrameBatch(
        scan_uid=UID, frame_indices=list(range(12)), frames=scan.frames, positions_m=scan.positions_m
    )
    list(stage.process(batch))
    start_object = stage._solves[UID].solver.object
    if initial_object == "flat":
        np.testing.assert_array_equal(start_object, np.ones_like(start_object))
        return
    # Canvas pixel c sits at origin + (c − margin − N//2)·dx, so it is truth pixel c + shift.
    shift = corner_px.astype(int) - 4 - scan.frames.shape[-1] // 2
    rows = np.arange(start_object.shape[0]) + shift[0]
    cols = np.arange(start_object.shape[1]) + shift[1]
    inside_rows = (rows >= 0) & (rows < scan.object_truth.shape[0])
    inside_cols = (cols >= 0) & (cols < scan.object_truth.shape[1])
    expected = scan.object_truth[np.ix_(rows[inside_rows], cols[inside_cols])]
    if initial_object == "mosaic_amplitude":
        expected = np.abs(expected)
    np.testing.assert_allclose(start_object[np.ix_(inside_rows, inside_cols)], expected, atol=1e-5)
    assert np.abs(expected - 1).mean() > 0.3  # the truth is far from the flat start


# --------------------------------------------------------------------------------------------------------
# A launched pipeline: the mosaic reaches Tiled before the final object, and refine starts from it


E2E_STAGES = [
    {"name": "ingest", "stage": "ingest", "config": {"batch_size": 8}},
    {
        "name": "inversion",
        "stage": "phasestream.stages.inversion:InversionStage",
        "config": {
            "weights_path": str(GENERIC_WEIGHTS),
            "bin_factor": 1,
            "batch_size": 8,
            "device": "cpu",
            "emit_interval_s": 0.2,
        },
    },
    {
        "name": "refine",
        "stage": "refine",
        "config": {
            "min_positions": 24,
            "epochs_after_scan": 10,
            "emit_every_epochs": 5,
            "probe_search_epochs": 0,
            "execution": {"batch_size": 16, "num_threads": 1},
            "initial_object": "mosaic_amplitude",
        },
    },
    {"name": "publish", "stage": "publish"},
]


def _products(client, scan_uid: str) -> tuple[set[str], bool]:
    """Which nodes of the scan exist in Tiled now, and whether the object there is final."""
    try:
        node = client["reconstructions"][scan_uid]
    except KeyError:
        return set(), False
    return set(node), bool(node.metadata.get("final"))


@pytest.mark.slow
def test_launched_pipeline_publishes_the_mosaic_before_the_final_object(
    launch_pipeline, short_run_dir: Path, tiled_server: EmbeddedTiledServer
) -> None:
    n_positions = 48
    scan = small_scan(n_positions=n_positions, seed=4)
    scan_file = short_run_dir / "scan.npz"
    save_scan(scan, scan_file)
    scan_uid = str(uuid.uuid4())
    client = from_uri(tiled_server.uri, api_key=tiled_server.api_key)
    seen: dict[str, float] = {}
    statuses = []

    def watch(event: dict) -> None:
        if event["event"] == "status":
            statuses.append(event)
        products, final = _products(client, scan_uid)
        now = time.monotonic()
        if "mosaic" in products:
            seen.setdefault("mosaic", now)
        if final:
            seen.setdefault("final_object", now)

    with launch_pipeline("e2e-inversion", E2E_STAGES) as running:
        emitter = subprocess.Popen(running.simulate_command(scan_file, scan_uid, "--rate-hz", "40"))
        ends = running.until_published(timeout_s=180, on_event=watch)
        assert emitter.wait(30) == 0
    node = client["reconstructions"][scan_uid]
    mosaic, metadata = node["mosaic"].read(), dict(node.metadata)
    seen.setdefault("final_object", time.monotonic())
    assert seen["mosaic"] < seen["final_object"], seen
    assert np.iscomplexobj(mosaic) and mosaic.ndim == 2 and np.abs(mosaic).max() > 0
    assert metadata["mosaic"]["final"] is True and metadata["mosaic"]["positions_used"] == n_positions
    final = ends["publish.0"]
    assert unaccounted_frames(final["frames_sent"], final["accounting"]) == []
    assert final["accounting"]["inversion.0"]["frames_inverted"] == n_positions
    assert final["accounting"]["refine.0"]["frames_used"] == n_positions
    # Refine started from the mosaic, which had arrived before its first epoch.
    assert any(s.get("object_start") == "mosaic_amplitude" for s in statuses), statuses[:5]


def test_a_detector_shape_change_within_a_scan_is_counted_not_fatal():
    scan = small_scan(n_positions=8)
    stage = inversion_stage(weights_path=str(GENERIC_WEIGHTS), bin_factor=1, batch_size=4)
    start = ScanStart(scan_uid=UID, geometry=geometry_of(scan), planned_frames=16)
    list(stage.on_scan_start(start))
    first = FrameBatch(
        scan_uid=UID, frame_indices=list(range(8)), frames=scan.frames, positions_m=scan.positions_m
    )
    larger = np.pad(scan.frames, ((0, 0), (8, 8), (8, 8)))
    second = first.model_copy(update={"frame_indices": list(range(8, 16)), "frames": larger})
    forwarded = list(stage.process(first))  # all of it: the network runs after the batch is yielded
    assert forwarded[0] is first
    assert list(stage.process(second)) == [second]
    counts = stage.scan(UID).counts
    assert counts["frames_inverted"] == 8 and counts["not_inverted_wrong_shape"] == 8

"""The cdi stage: in-situ CDI patterns reconstructed with HIO-stat or LoDIP, bad input counted, and one
series streamed through the launched pipeline (ingest → cdi → publish) into a real Tiled server."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest
from tiled.client import from_uri

from phasestream.apps.tiled_server import EmbeddedTiledServer
from phasestream.errors import ConfigError
from phasestream.models.cdi.options import LodipOptions
from phasestream.models.quality import psnr
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.config import load_pipeline
from phasestream.runtime.messages import FrameBatch, Geometry, Reconstruction, ScanEnd, ScanStart, encode
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.topology import place
from phasestream.simulators.diffraction import far_field_intensity
from phasestream.simulators.insitu_cdi import InSituCdiConfig, InSituCdiData, simulate_insitu_cdi
from phasestream.simulators.insitu_cdi_stream import insitu_cdi_messages, save_static_reference
from phasestream.simulators.selun import SelunEmitter
from phasestream.stages.cdi_stage import BAD_REFERENCE, CdiStageConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SIZE_PX = 64
# HIO-stat on this simulator at 1,000 photons per detector pixel scored 40.2 ± 0.5 dB over 20 samples
# (docs/benchmarks.md, `phasestream bench lodip`), the paper 37.9 dB; an all-zero sample scores about
# 6 dB. 30 dB fails a static region in the wrong units (flux or illumination ratio), a shifted or flipped
# reference, or a pattern/support layout mix-up, and leaves ten dB for the noise of one sample.
PSNR_THRESHOLD_DB = 30.0


@pytest.fixture(scope="module")
def data() -> InSituCdiData:
    return simulate_insitu_cdi(InSituCdiConfig(size_px=SIZE_PX, photons_per_px=1000.0, seed=4))


@pytest.fixture
def reference(tmp_path: Path, data: InSituCdiData) -> Path:
    return save_static_reference(tmp_path / "static_reference.npz", data)


def another_draw(data: InSituCdiData, seed: int) -> np.ndarray:
    """A second Poisson draw of the same in-situ pattern (the same sample, another exposure)."""
    exit_wave = data.sample_truth + np.sqrt(data.config.illumination_ratio) * data.static_truth
    expected = data.incident_photons_per_px * far_field_intensity(exit_wave)
    return np.random.default_rng(seed).poisson(expected).astype(np.float64)


def cdi_stage(reference: Path, data: InSituCdiData, **config):
    pipeline = load_pipeline(DEPLOY / "lodip.yaml")
    placement = place(pipeline, "cdi", 0)
    placement.spec.config.update(
        static_reference=str(reference), incident_photons_per_px=data.incident_photons_per_px, **config
    )
    return resolve_stage(placement.spec.stage).from_placement(placement, pipeline)


def start(scan_uid: str, shape_px: int = SIZE_PX) -> ScanStart:
    geometry = Geometry(
        energy_kev=8.8, detector_distance_m=2.0, pixel_size_m=75e-6, detector_shape_px=(shape_px, shape_px),
        detector_dtype="uint32",
    )  # fmt: skip
    return ScanStart(scan_uid=scan_uid, geometry=geometry, planned_frames=3)


def batch(scan_uid: str, patterns: list[np.ndarray]) -> FrameBatch:
    return FrameBatch(
        scan_uid=scan_uid, seq=1, frame_indices=list(range(len(patterns))),
        frames=np.stack(patterns).astype(np.uint32), positions_m=np.zeros((len(patterns), 2)),
    )  # fmt: skip


def sample_psnr(obj: np.ndarray, data: InSituCdiData) -> float:
    support = data.sample_support
    return psnr(obj.real[support], data.sample_truth[support], data_range=1.0)


@pytest.mark.slow
def test_hio_stat_recovers_each_pattern_and_leaves_out_a_dark_one(reference, data) -> None:
    stage = cdi_stage(reference, data, algorithm="hio_stat")
    assert list(stage.on_scan_start(start("hio"))) == [start("hio")]
    dark = np.zeros_like(data.pattern)
    outputs = list(stage.process(batch("hio", [data.pattern, dark, another_draw(data, 1)])))
    assert [type(out) for out in outputs] == [Reconstruction, Reconstruction]
    counts = stage.scan("hio").counts
    assert counts["rejected_zero_photons"] == 1 and counts["frames_used"] == 2
    for out, pattern_index in zip(outputs, (0, 2), strict=True):
        assert out.quality["pattern_index"] == pattern_index
        assert out.object.dtype == np.complex64 and out.object.shape == (SIZE_PX, SIZE_PX)
        assert np.all(out.object[~data.sample_support] == 0)
        assert sample_psnr(out.object, data) > PSNR_THRESHOLD_DB
        assert 0 < out.quality["r_factor"] < 0.5
    assert sample_psnr(np.zeros_like(outputs[0].object), data) < PSNR_THRESHOLD_DB - 15
    # The probe slot carries the static region in transmission units: it matches the truth.
    static = data.static_support
    np.testing.assert_allclose(outputs[0].probe.real[static], data.static_truth[static], atol=0.05)
    assert [out.iteration for out in outputs] == [1, 2]  # publish's latest-wins order
    final, end = list(stage.on_scan_end(ScanEnd(scan_uid="hio", frames_sent=3)))
    assert final.final and final.iteration == 2 and isinstance(end, ScanEnd)


@pytest.mark.slow
def test_lodip_runs_within_its_iteration_cap(reference, data) -> None:
    stage = cdi_stage(
        reference, data, algorithm="lodip", optimisation={"max_iterations": 40},
        early_stopping={"window": 10, "patience": 20},
    )  # fmt: skip
    list(stage.on_scan_start(start("lodip")))
    (out,) = list(stage.process(batch("lodip", [data.pattern])))
    assert out.algorithm == "lodip"
    assert 1 <= out.quality["solver_iterations"] <= 40
    assert np.isfinite(out.object).all() and np.all(out.object[~data.sample_support] == 0)
    assert out.object.real.min() >= 0  # LoDIP's generator ends in a sigmoid: a non-negative sample
    assert 0 < out.quality["r_factor"] < 1


def test_the_config_embeds_the_solvers_option_groups_with_the_stages_defaults(reference, data) -> None:
    config = CdiStageConfig(
        static_reference=reference, incident_photons_per_px=1.0, early_stopping={"window": 20},
        execution={"seed": 5},
    )  # fmt: skip
    # A group given in part keeps the stage's defaults for the rest, not the library's.
    assert (config.early_stopping.window, config.early_stopping.patience) == (20, 150)
    assert config.optimisation.max_iterations == 600 and config.execution.num_threads == 1
    options = config.lodip_options(frame_index=3)
    assert isinstance(options, LodipOptions) and options.execution.seed == 8
    assert options.early_stopping == config.early_stopping and options.network == config.network
    hio_stat = config.hio_stat_options()
    assert hio_stat.schedule.steps() == [("hio", 450), ("er", 50)] * 2 and hio_stat.execution.num_threads == 1
    for bad, name in (({"hio_stat": {"cycles": 0}}, "cycles"), ({"execution": {"device": "gpu"}}, "device")):
        with pytest.raises(ValueError, match=name):
            CdiStageConfig(static_reference=reference, incident_photons_per_px=1.0, **bad)


def _counted(stage, message) -> None:
    """Hand one message to the runtime's per-message handling, which catches, counts and goes on."""
    stage._handle_group("in", [encode(message)])


@pytest.mark.parametrize(
    ("change", "shape_px", "expected"),
    [
        ("overlap", SIZE_PX, "overlaps the sample support"),
        (None, 48, "outside the array"),
    ],
)
@pytest.mark.slow
def test_a_bad_reference_rejects_the_scans_frames_and_the_next_scan_goes_on(
    tmp_path, data, change, shape_px, expected
) -> None:
    path = tmp_path / "reference.npz"
    bad = data
    if change == "overlap":
        overlapping = data.sample_support.copy()
        overlapping |= np.roll(data.static_support, -4, axis=1)  # the support reaches into the static region
        bad = dataclasses.replace(data, sample_support=overlapping)
    save_static_reference(path, bad)
    stage = cdi_stage(path, data, algorithm="hio_stat", hio_stat={"cycles": 1})
    assert list(stage.on_scan_start(start("bad", shape_px))) == [start("bad", shape_px)]
    with pytest.raises(ConfigError, match=expected) as raised:
        list(stage.process(batch("bad", [data.pattern[:shape_px, :shape_px]])))
    assert raised.value.reason == BAD_REFERENCE
    stage._current = None
    _counted(stage, batch("bad", [data.pattern[:shape_px, :shape_px]] * 2))
    assert stage.scan("bad").counts[f"rejected_{BAD_REFERENCE}"] == 2
    # The reference is read again at the next scan: fixed, that scan is reconstructed.
    save_static_reference(path, data)
    list(stage.on_scan_start(start("next")))
    (out,) = list(stage.process(batch("next", [data.pattern])))
    assert sample_psnr(out.object, data) > PSNR_THRESHOLD_DB


def test_a_missing_reference_file_is_a_counted_rejection(tmp_path, data) -> None:
    stage = cdi_stage(tmp_path / "absent.npz", data, algorithm="hio_stat")
    list(stage.on_scan_start(start("absent")))
    _counted(stage, batch("absent", [data.pattern]))
    assert stage.scan("absent").counts[f"rejected_{BAD_REFERENCE}"] == 1


def test_emitter_messages_carry_every_pattern_at_the_origin(data) -> None:
    from phasestream.formats.position_channel import PositionBatch, decode_positions
    from phasestream.formats.stream_v2.decode import ImageMessage, decode_stream_v2

    patterns = [data.pattern, another_draw(data, 2)]
    frames, positions = insitu_cdi_messages(patterns, "uid")
    images = [decode_stream_v2(message) for message in frames[1:-1]]
    assert all(isinstance(image, ImageMessage) for image in images)
    for image, pattern in zip(images, patterns, strict=True):
        assert np.array_equal(image.frame, pattern.astype(np.uint32))
    (joined, _end) = [decode_positions(message) for message in positions]
    assert isinstance(joined, PositionBatch) and joined.image_ids.tolist() == [0, 1]
    assert np.all(joined.positions_m == 0)


@pytest.mark.slow
def test_an_insitu_series_streams_through_cdi_into_tiled(
    launch_pipeline, short_run_dir: Path, tiled_server: EmbeddedTiledServer, data
) -> None:
    reference = save_static_reference(short_run_dir / "static_reference.npz", data)
    patterns = [data.pattern, np.zeros_like(data.pattern), another_draw(data, 3)]
    scan_uid = str(uuid.uuid4())
    pipeline = load_pipeline(DEPLOY / "lodip.yaml")
    stages = []
    for spec in pipeline.stages:
        if spec.name == "cdi":
            config = {
                **spec.config, "algorithm": "hio_stat", "hio_stat": {"cycles": 1},
                "static_reference": str(reference),
                "incident_photons_per_px": data.incident_photons_per_px,
            }  # fmt: skip
            spec = spec.model_copy(update={"config": config})
        stages.append(spec)
    with launch_pipeline(pipeline.name, stages) as running:
        data_messages, position_messages = insitu_cdi_messages(patterns, scan_uid)
        detector = running.config.detector
        with SelunEmitter(detector.data_endpoint, detector.positions_endpoint, send_timeout_s=60) as emitter:
            emitter.emit_messages(data_messages, position_messages)
            ends = running.until_published(timeout_s=120)
    node = from_uri(tiled_server.uri, api_key=tiled_server.api_key)["reconstructions"][scan_uid]
    obj, metadata = node["object"].read(), dict(node.metadata)

    final = ends["publish.0"]
    assert final["frames_sent"] == 3
    assert unaccounted_frames(final["frames_sent"], final["accounting"]) == []
    cdi = final["accounting"]["cdi.0"]
    assert cdi["frames_used"] == 2 and cdi["rejected_zero_photons"] == 1
    assert metadata["status"] == "complete" and metadata["final"] is True
    assert metadata["algorithm"] == "hio_stat" and metadata["quality"]["pattern_index"] == 2
    assert sample_psnr(obj, data) > PSNR_THRESHOLD_DB

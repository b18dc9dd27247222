"""Geometry the user sets: overrides of the detector's values, a window around the beam, bad-pixel masks.

Unit tests of ``phasestream.runtime.geometry`` on mask files written with plain h5py and NumPy in the layouts
CXI, DECTRIS NXmx and PtyPy use; then a real ingest process (the launcher, the SELUN emitter's sockets)
that applies the pipeline's and a scan's overrides, crops every frame and zeroes masked pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_ingest import IngestPipeline, Series, launched_ingest

from phasestream.errors import ConfigError
from phasestream.runtime.geometry import (
    GeometryOverrides,
    GeometrySettings,
    MaskPolarity,
    per_scan_overrides,
    read_mask_file,
    resolve_geometry,
)

DETECTOR_PX = (24, 32)
WINDOW_PX = 16
BEAM_CENTRE_PX = (12.0, 18.0)


# ---- resolving values ------------------------------------------------------------------------------------
def test_the_scan_overrides_the_pipeline_which_overrides_the_detector() -> None:
    pipeline = GeometryOverrides(energy_kev=9.0, detector_distance_m=3.0)
    scan = GeometryOverrides(detector_distance_m=4.5)
    geometry = resolve_geometry(8.8, 2.0, 75e-6, (192, 192), pipeline, scan)
    assert (geometry.energy_kev, geometry.detector_distance_m, geometry.pixel_size_m) == (9.0, 4.5, 75e-6)
    assert geometry.sources == {"energy_kev": "pipeline", "detector_distance_m": "scan"}
    assert geometry.crop is None and geometry.shape_px == (192, 192)


def test_the_window_is_centred_on_the_beam() -> None:
    overrides = GeometryOverrides(beam_centre_px=BEAM_CENTRE_PX, window_px=WINDOW_PX)
    geometry = resolve_geometry(8.8, 2.0, 75e-6, DETECTOR_PX, overrides, GeometryOverrides())
    rows, columns = geometry.crop
    # Pixel N//2 of the window (where the solver puts zero frequency) is the beam.
    assert (rows.start + WINDOW_PX // 2, columns.start + WINDOW_PX // 2) == (12, 18)
    assert geometry.shape_px == (WINDOW_PX, WINDOW_PX)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (GeometryOverrides(window_px=64), "window_px=64"),
        (GeometryOverrides(window_px=16, beam_centre_px=(2.0, 16.0)), "beam_centre_px"),
    ],
)
def test_a_window_that_leaves_the_detector_is_refused(overrides: GeometryOverrides, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        resolve_geometry(8.8, 2.0, 75e-6, DETECTOR_PX, overrides, GeometryOverrides())


@pytest.mark.parametrize(
    ("user_data", "named"),
    [
        ({"geometry": {"energy_kev": "hot"}}, "energy_kev"),
        ({"geometry": {"energy_kev": 8800.0}}, "energy_kev"),  # eV given as keV
        ({"geometry": {"wavelength": 1.0}}, "wavelength"),
        ({"geometry": [8.8]}, "geometry"),
    ],
)
def test_a_bad_per_scan_override_is_named(user_data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        per_scan_overrides(user_data)


def test_no_per_scan_override_is_an_empty_one() -> None:
    assert per_scan_overrides({"scan_uid": "x"}).given() == {}
    assert per_scan_overrides(None).given() == {}


# ---- mask files as other tools write them ---------------------------------------------------------------
def _defects() -> np.ndarray:
    mask = np.zeros(DETECTOR_PX, dtype=bool)
    mask[3, 4] = True  # a dead pixel
    mask[:, 10] = True  # a module gap
    return mask


def test_a_cxi_mask_is_a_bit_field_where_has_signal_is_no_defect(tmp_path: Path) -> None:
    bits = np.zeros(DETECTOR_PX, dtype=np.uint32)
    bits[_defects()] = 0x8  # dead
    bits[5, 5] = 0x1000  # "has signal": not a defect
    path = tmp_path / "scan.cxi"
    with h5py.File(path, "w") as file:
        file["/entry_1/instrument_1/detector_1/mask"] = bits
    np.testing.assert_array_equal(read_mask_file(str(path), MaskPolarity.BAD), _defects())


def test_an_nxmx_pixel_mask_uses_its_low_sixteen_bits(tmp_path: Path) -> None:
    bits = np.zeros(DETECTOR_PX, dtype=np.uint32)
    bits[_defects()] = 1  # gap
    bits[0, 0] = 1 << 31  # virtual pixel: above the defect bits
    path = tmp_path / "series_master.h5"
    with h5py.File(path, "w") as file:
        file["/entry/instrument/detector/detectorSpecific/pixel_mask"] = bits
    np.testing.assert_array_equal(read_mask_file(str(path), MaskPolarity.BAD), _defects())


def test_a_plain_dataset_and_a_ptypy_valid_pixel_mask(tmp_path: Path) -> None:
    path = tmp_path / "masks.h5"
    with h5py.File(path, "w") as file:
        file["bad"] = _defects().astype(np.uint8)
        file["valid"] = (~_defects()).astype(np.uint8)  # PtyPy: 1 = valid
    np.testing.assert_array_equal(read_mask_file(f"{path}::/bad", MaskPolarity.BAD), _defects())
    np.testing.assert_array_equal(read_mask_file(f"{path}::/valid", MaskPolarity.GOOD), _defects())
    np.save(tmp_path / "mask.npy", _defects())
    np.testing.assert_array_equal(read_mask_file(str(tmp_path / "mask.npy"), MaskPolarity.BAD), _defects())


@pytest.mark.parametrize("case", ["missing file", "missing dataset", "no standard mask", "3-D", "text"])
def test_an_unusable_mask_file_is_refused_at_config_load(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as file:
        file["cube"] = np.zeros((2, 3, 4))
        file["words"] = "x-ray"
    spec = {
        "missing file": str(tmp_path / "absent.npy"),
        "missing dataset": f"{path}::/nothing",
        "no standard mask": str(path),
        "3-D": f"{path}::/cube",
        "text": f"{path}::/words",
    }[case]
    with pytest.raises(ConfigError, match="mask_file"):
        GeometrySettings(mask_file=spec)


# ---- through a real ingest process ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def overriding_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestPipeline]:
    mask_file = tmp_path_factory.mktemp("mask") / "mask.npy"
    np.save(mask_file, _defects())
    config = {
        "batch_size": 4,
        "position_grace_s": 1.0,
        "geometry": {
            "energy_kev": 9.5,
            "beam_centre_px": list(BEAM_CENTRE_PX),
            "window_px": WINDOW_PX,
            "mask_file": str(mask_file),
        },
    }
    with launched_ingest("geometry-test", config) as launched:
        yield launched


def _scan(series: Series, n: int, user_geometry: object) -> tuple[list[bytes], list[bytes], np.ndarray]:
    rng = np.random.default_rng(series.series_id)
    frames = rng.integers(1, 100, size=(n, *DETECTOR_PX), dtype=np.uint16)
    frames[:, _defects()] = 65535  # what a defect reads: a flag value, no measurement
    start = Series.start(series, n, shape_px=DETECTOR_PX)
    if user_geometry is not None:
        start = _start_with_geometry(series, n, user_geometry)
    data = [start, *(series.image(i, frames[i]) for i in range(n)), series.end()]
    positions = [series.positions(range(n), np.zeros((n, 2)) + np.arange(n)[:, None] * 1e-7)]
    return data, positions, frames


def _start_with_geometry(series: Series, n: int, geometry: object) -> bytes:
    from phasestream.formats.stream_v2.encode import encode_message, start_fields

    fields = start_fields(
        series_id=series.series_id,
        series_unique_id=series.unique_id,
        shape_px=DETECTOR_PX,
        dtype="uint16",
        number_of_images=n,
        energy_kev=8.8,
        detector_distance_m=2.0,
        pixel_size_m=75e-6,
        count_time_s=1e-3,
        frame_time_s=1e-3,
        user_data={"scan_uid": series.scan_uid, "scan_shape": [n], "geometry": geometry},
    )
    return encode_message(fields)


@pytest.mark.slow
def test_ingest_applies_the_overrides_crops_and_masks(overriding_pipeline: IngestPipeline) -> None:
    series = Series.new("geometry")
    data, positions, frames = _scan(series, 6, {"detector_distance_m": 3.25})
    result = overriding_pipeline.run_scan(series.scan_uid, data, positions)
    geometry = result.start["geometry"]
    assert geometry["energy_kev"] == 9.5  # the pipeline's
    assert geometry["detector_distance_m"] == 3.25  # the scan's
    assert geometry["pixel_size_m"] == 75e-6  # the detector's
    assert tuple(geometry["detector_shape_px"]) == (WINDOW_PX, WINDOW_PX)
    assert result.start["geometry_overrides"] == {
        "energy_kev": "pipeline",
        "beam_centre_px": "pipeline",
        "window_px": "pipeline",
        "detector_distance_m": "scan",
    }
    rows = slice(12 - WINDOW_PX // 2, 12 + WINDOW_PX // 2)
    columns = slice(18 - WINDOW_PX // 2, 18 + WINDOW_PX // 2)
    mask = _defects()[rows, columns]
    expected = frames[:, rows, columns].copy()
    expected[:, mask] = 0
    np.testing.assert_array_equal(result.frames, expected)
    assert any("detector_distance_m from the scan" in text for text in _notes(result))


@pytest.mark.slow
def test_a_bad_per_scan_override_is_reported_and_the_scan_goes_on(
    overriding_pipeline: IngestPipeline,
) -> None:
    series = Series.new("badgeom")
    data, positions, _ = _scan(series, 4, {"energy_kev": "hot"})
    result = overriding_pipeline.run_scan(series.scan_uid, data, positions)
    assert result.accounting["ingest.0"]["geometry_override_rejected"] == 1
    assert any("energy_kev" in text and "hot" in text for text in result.warnings_for("geometry_override"))
    assert result.start["geometry"]["energy_kev"] == 9.5  # the pipeline's values still apply
    assert len(result.frames) == 4


def _notes(result: object) -> list[str]:
    return [w.text for w in result.warnings if w.reason == "geometry"]

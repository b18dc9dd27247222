"""Result files: fields round trip, units are stated, CXI paths hold what they should, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from phasestream.formats import result_file
from phasestream.formats.probe_source import load_probe, parse_probe_spec
from phasestream.formats.result_file import (
    ResultFileError,
    ResultGeometry,
    ScanResult,
    read_result_file,
    write_result_file,
)
from phasestream.formats.scan_geometry import positions_from_sample_translation
from phasestream.formats.units import JOULES_PER_EV

# Every length and energy dataset of the layout, and its units.
UNITS = {
    "/entry_1/image_1/x_pixel_size": "m",
    "/entry_1/image_1/y_pixel_size": "m",
    "/entry_1/image_1/origin": "m",
    "/entry_1/data_1/x": "m",
    "/entry_1/data_1/y": "m",
    "/entry_1/instrument_1/source_1/energy": "J",
    "/entry_1/instrument_1/detector_1/distance": "m",
    "/entry_1/instrument_1/detector_1/x_pixel_size": "m",
    "/entry_1/instrument_1/detector_1/y_pixel_size": "m",
    "/entry_1/instrument_1/detector_1/basis_vectors": "m",
    "/entry_1/sample_1/geometry_1/translation": "m",
}


def make_result(seed: int = 0, **changes) -> ScanResult:
    rng = np.random.default_rng(seed)
    fields = dict(
        scan_uid=f"scan-{seed}",
        object=(rng.random((40, 52)) * np.exp(1j * rng.random((40, 52)))).astype(np.complex64),
        probe=(rng.random((2, 24, 24)) + 1j * rng.random((2, 24, 24))).astype(np.complex64),
        positions_m=rng.normal(scale=1e-7, size=(7, 2)),
        object_pixel_size_m=19.6e-9,
        origin_m=(-3.1e-7, -4.2e-7),
        geometry=ResultGeometry(
            energy_kev=8.8, detector_distance_m=2.0, detector_pixel_size_m=75e-6, detector_shape_px=(24, 24)
        ),
        algorithm="rpie",
        settings={"batch_size": 32, "object_step": 1.0, "max_object_amplitude": None, "modes": ["a", "b"]},
        error_history=[0.9, 0.5, 0.31],
        epochs=3,
        stop_reason="epochs_after_scan reached",
        accounting={"ingest-0": {"frames_received": 7, "rejected_nan": 1}, "refine-0": {"frames_used": 7}},
        config_hash="abc123",
        created="2025-01-02T03:04:05+00:00",
    )
    fields.update(changes)
    return ScanResult(**fields)


def test_every_field_round_trips(tmp_path: Path) -> None:
    result = make_result()
    path = write_result_file(tmp_path / "results" / "scan-0.h5", result)
    back = read_result_file(path)
    for name in ("object", "probe", "positions_m"):
        expected = getattr(result, name)
        np.testing.assert_array_equal(getattr(back, name), expected)
        assert getattr(back, name).dtype == (np.float64 if name == "positions_m" else np.complex64)
    assert back.geometry.energy_kev == pytest.approx(result.geometry.energy_kev, rel=1e-12)
    assert back.geometry.detector_distance_m == result.geometry.detector_distance_m
    assert back.geometry.detector_pixel_size_m == result.geometry.detector_pixel_size_m
    assert back.geometry.detector_shape_px == result.geometry.detector_shape_px
    for name in (
        "scan_uid", "object_pixel_size_m", "origin_m", "algorithm", "settings", "error_history", "epochs",
        "stop_reason", "accounting", "config_hash", "created",
    ):  # fmt: skip
        assert getattr(back, name) == getattr(result, name), name


def test_lengths_and_energies_carry_units(tmp_path: Path) -> None:
    path = write_result_file(tmp_path / "scan.h5", make_result())
    with h5py.File(path, "r") as file:
        for name, units in UNITS.items():
            assert file[name].attrs["units"] == units, name
        # No float dataset other than the error history (dimensionless) goes without units.
        unitless = []
        file.visititems(
            lambda name, node: (
                unitless.append(name)
                if isinstance(node, h5py.Dataset) and node.dtype.kind == "f" and "units" not in node.attrs
                else None
            )
        )
        assert unitless == ["entry_1/image_1/process_1/error_history"]


def test_the_file_opens_with_plain_h5py_at_the_documented_paths(tmp_path: Path) -> None:
    result = make_result(seed=3)
    path = write_result_file(tmp_path / "scan.cxi", result)
    with h5py.File(path, "r") as file:
        assert file["cxi_version"][()] == 150
        assert file["entry_1"].attrs["NX_class"] == "NXentry"
        image = file["entry_1/image_1"]
        np.testing.assert_array_equal(image["data"][()], result.object)
        assert image["data_type"][()] == b"amplitude" and image["data_space"][()] == b"real"
        assert image["is_fft_shifted"][()] == 0 and image["dimensionality"][()] == 2
        assert image["x_pixel_size"][()] == image["y_pixel_size"][()] == result.object_pixel_size_m
        np.testing.assert_array_equal(image["origin"][()], result.origin_m)
        assert image["source_1/energy"][()] == pytest.approx(8.8e3 * JOULES_PER_EV)  # the soft link
        # The NeXus default plot: the object with its coordinates in metres.
        data = file["entry_1/data_1"]
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "data"
        np.testing.assert_array_equal(data["data"][()], result.object)
        assert data["x"][()][0] == result.origin_m[1]
        assert data["y"][()][-1] == pytest.approx(result.origin_m[0] + 39 * result.object_pixel_size_m)
        np.testing.assert_array_equal(file["entry_1/instrument_1/source_1/illumination"][()], result.probe)
        detector = file["entry_1/instrument_1/detector_1"]
        assert detector["distance"][()] == 2.0 and detector["x_pixel_size"][()] == 75e-6
        np.testing.assert_array_equal(detector["data_size"][()], [24, 24])
        # The sample translation reads back, under the scan files' convention, as the positions used.
        translation = file["entry_1/sample_1/geometry_1/translation"][()]
        assert translation.shape == (7, 3)
        np.testing.assert_array_equal(positions_from_sample_translation(translation), result.positions_m)
        process = file["entry_1/image_1/process_1"]
        assert process.attrs["NX_class"] == "NXprocess"
        assert process["algorithm"][()] == b"rpie" and process["scan_uid"][()] == b"scan-3"
        assert json.loads(process["settings"][()]) == result.settings
        assert json.loads(process["accounting"][()]) == result.accounting
        np.testing.assert_array_equal(process["error_history"][()], result.error_history)
        assert process["epochs"][()] == 3 and process["stop_reason"][()] == result.stop_reason.encode()


def test_load_probe_reads_the_probe_and_its_pixel_size(tmp_path: Path) -> None:
    result = make_result(seed=5)
    path = write_result_file(tmp_path / "scan-5.h5", result)
    loaded = load_probe(parse_probe_spec(str(path)))
    np.testing.assert_array_equal(loaded.probe, result.probe)
    assert loaded.pixel_size_m == result.object_pixel_size_m
    assert loaded.source == f"{path}:/entry_1/instrument_1/source_1/illumination"


def test_a_single_2d_probe_is_stored_as_one_mode(tmp_path: Path) -> None:
    probe = make_result().probe[0]
    back = read_result_file(write_result_file(tmp_path / "one.h5", make_result(probe=probe)))
    assert back.probe.shape == (1, 24, 24)
    np.testing.assert_array_equal(back.probe[0], probe)


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "scan.h5"
    write_result_file(path, make_result(seed=1))

    def disk_full(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(result_file, "_write_process", disk_full)  # after the object and probe are written
    with pytest.raises(OSError, match="No space left"):
        write_result_file(path, make_result(seed=2))
    with pytest.raises(OSError, match="No space left"):
        write_result_file(tmp_path / "new.h5", make_result(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5"]
    assert read_result_file(path).scan_uid == "scan-1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"settings": {"path": Path("/x")}}, r"settings of the result cannot be stored as JSON.*PosixPath"),
        ({"accounting": {"a": {"b": float("nan")}}}, r"accounting .*JSON"),
        ({"object": np.ones((2, 3, 4))}, r"object has shape \(2, 3, 4\)"),
        ({"positions_m": np.full((3, 2), np.nan)}, r"positions_m of shape \(3, 2\) must be finite"),
        ({"object_pixel_size_m": 0.0}, r"object_pixel_size_m=0.0 must be positive"),
    ],
)
def test_results_that_cannot_be_stored_are_refused_before_writing(
    tmp_path: Path, changes: dict, message: str
) -> None:
    with pytest.raises(ResultFileError, match=message):
        write_result_file(tmp_path / "bad.h5", make_result(**changes))
    assert list(tmp_path.iterdir()) == []


def test_reading_a_file_that_is_not_a_result_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "scan.cxi"
    with h5py.File(path, "w") as file:
        file.create_dataset("cxi_version", data=160)
        file.create_dataset("entry_1/sample_1/geometry_1/translation", data=np.zeros((3, 3)))
    with pytest.raises(ResultFileError, match=r"scan\.cxi lacks /entry_1/instrument_1/detector_1/data_size"):
        read_result_file(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ResultFileError, match=r"cannot open .*text\.h5 as HDF5"):
        read_result_file(tmp_path / "text.h5")

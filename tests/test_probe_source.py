"""Starting probes: the spec text, reading each layout tools write, the refusals, and resampling."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from phasestream.errors import ConfigError
from phasestream.formats.probe_source import (
    ProbeSpec,
    ProbeStartKind,
    load_probe,
    parse_probe_spec,
    validate_probe,
)
from phasestream.formats.result_file import ResultGeometry, ScanResult, write_result_file
from phasestream.formats.units import JOULES_PER_EV, object_pixel_size_m
from phasestream.models.ptycho.probe_resample import MAX_CROP_LOSS, resample_probe

ILLUMINATION = "/entry_1/instrument_1/source_1/illumination"
# λ z of the defocus phase below: its local frequency stays far under the Nyquist of a 10 nm grid.
DEFOCUS_LAMBDA_Z_M2 = 2e-14


def defocused_gaussian(n_px: int, pitch_m: float, sigma_m: float = 60e-9, centre_px: float | None = None):
    """A Gaussian beam with a defocus (quadratic) phase, sampled on n × n pixels centred on n // 2."""
    centre = n_px // 2 if centre_px is None else centre_px
    axis_m = (np.arange(n_px) - centre) * pitch_m
    r2 = axis_m[:, None] ** 2 + axis_m[None, :] ** 2
    return np.exp(-r2 / (2 * sigma_m**2) + 1j * np.pi * r2 / DEFOCUS_LAMBDA_Z_M2)


def two_modes(n_px: int = 32) -> np.ndarray:
    first = defocused_gaussian(n_px, 10e-9)
    return np.stack([first, 0.3 * first * np.exp(1j * np.linspace(0, 3, n_px))[None, :]]).astype(np.complex64)


def power(values: np.ndarray) -> float:
    return float(np.sum(np.abs(np.asarray(values, dtype=np.complex128)) ** 2))


def centroid_px(values: np.ndarray) -> tuple[float, float]:
    intensity = np.sum(np.abs(np.asarray(values).reshape(-1, *values.shape[-2:])) ** 2, axis=0)
    rows, columns = np.indices(intensity.shape)
    return float((rows * intensity).sum() / intensity.sum()), float(
        (columns * intensity).sum() / intensity.sum()
    )


def write_cxi_scan(path: Path, frame_px: int = 32, energy_kev: float = 8.0, distance_m: float = 2.0) -> float:
    """A CXI scan file's geometry and frames (no probe); returns the object pixel λ z / (N p)."""
    pixel_m = 75e-6
    with h5py.File(path, "w") as file:
        file.create_dataset("cxi_version", data=150)
        detector = file.create_group("entry_1/instrument_1/detector_1")
        detector.create_dataset("data", data=np.zeros((3, frame_px, frame_px), dtype=np.uint16))
        for name, value in (("distance", distance_m), ("x_pixel_size", pixel_m), ("y_pixel_size", pixel_m)):
            detector.create_dataset(name, data=value).attrs["units"] = "m"
        source = file.create_group("entry_1/instrument_1/source_1")
        source.create_dataset("energy", data=energy_kev * 1e3 * JOULES_PER_EV).attrs["units"] = "J"
        file["entry_1/data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
    return object_pixel_size_m(energy_kev, distance_m, frame_px, pixel_m)


def load(text: str | Path):
    return load_probe(parse_probe_spec(str(text)))


# ---- the spec text ---------------------------------------------------------------------------------------


def test_spec_text_names_auto_previous_a_file_or_a_dataset() -> None:
    assert parse_probe_spec("auto") == ProbeSpec(ProbeStartKind.AUTO)
    assert parse_probe_spec(" Previous ") == ProbeSpec(ProbeStartKind.PREVIOUS)
    assert parse_probe_spec("runs/probe.npy") == ProbeSpec(ProbeStartKind.FILE, Path("runs/probe.npy"))
    spec = parse_probe_spec("scan.cxi::entry_1/instrument_1/source_1/illumination")
    assert spec == ProbeSpec(ProbeStartKind.FILE, Path("scan.cxi"), ILLUMINATION)
    assert parse_probe_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "''"),
        ("::/entry_1/probe", "'::/entry_1/probe'"),
        ("scan.cxi::", "'scan.cxi::'"),
        ("scan.cxi::/", "'scan.cxi::/'"),
        ("probe.npy::/probe", "probe.npy"),
    ],
)
def test_bad_spec_text_is_refused_naming_it(text: str, named: str) -> None:
    with pytest.raises(ConfigError, match="probe") as error:
        parse_probe_spec(text)
    assert named in str(error.value)


def test_auto_and_previous_are_not_loaded_from_a_file() -> None:
    with pytest.raises(ConfigError, match="'previous' is not a file"):
        load_probe(parse_probe_spec("previous"))


# ---- layouts ---------------------------------------------------------------------------------------------


def test_cxi_file_without_dataset_path_gives_illumination_on_the_frames_object_grid(tmp_path: Path) -> None:
    path = tmp_path / "scan.cxi"
    expected_pixel_m = write_cxi_scan(path)
    probe = two_modes()
    with h5py.File(path, "a") as file:
        file.create_dataset(ILLUMINATION, data=probe)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.probe, probe)
    assert loaded.probe.dtype == np.complex64 and loaded.probe.shape == (2, 32, 32)
    assert loaded.pixel_size_m == pytest.approx(expected_pixel_m, rel=1e-9)
    assert loaded.source == f"{path}:{ILLUMINATION}"
    # Naming the dataset finds the same thing.
    named = load(f"{path}::{ILLUMINATION}")
    np.testing.assert_array_equal(named.probe, probe)
    assert named.pixel_size_m == loaded.pixel_size_m


def test_nxcxi_ptycho_string_source_probe_is_skipped_for_the_illumination(tmp_path: Path) -> None:
    path = tmp_path / "nx.cxi"
    probe = defocused_gaussian(16, 10e-9).real  # a real-valued illumination is a probe too
    with h5py.File(path, "w") as file:
        source = file.create_group("entry_1/instrument_1/source_1")
        source.create_dataset("probe", data="x-ray")  # NXsource's radiation type
        source.create_dataset("illumination", data=probe).attrs["pixel_size_m"] = 12e-9
    loaded = load(path)
    np.testing.assert_allclose(loaded.probe[0], probe.astype(np.complex64))
    assert loaded.pixel_size_m == pytest.approx(12e-9)
    with pytest.raises(ConfigError, match=r"'x-ray'.*source_1/illumination"):
        load(f"{path}::/entry_1/instrument_1/source_1/probe")


def test_cosmic_detector_probe_takes_the_object_pixel_not_the_detector_pixel(tmp_path: Path) -> None:
    path = tmp_path / "cosmic.cxi"
    expected_pixel_m = write_cxi_scan(path, frame_px=16)
    probe = defocused_gaussian(16, 10e-9)
    with h5py.File(path, "a") as file:
        file.create_dataset("entry_1/instrument_1/source_1/probe", data="x-ray")
        file.create_dataset("entry_1/instrument_1/detector_1/probe", data=probe)
    loaded = load(path)
    assert loaded.source.endswith("/entry_1/instrument_1/detector_1/probe")
    np.testing.assert_allclose(loaded.probe[0], probe, rtol=1e-6)
    # Beside detector_1/probe sits detector_1/x_pixel_size (75 µm): the detector's, not the probe's.
    assert loaded.pixel_size_m == pytest.approx(expected_pixel_m, rel=1e-9)


def test_data_illumination_and_compound_complex(tmp_path: Path) -> None:
    path = tmp_path / "compound.cxi"
    probe = defocused_gaussian(16, 10e-9)
    stored = np.empty(probe.shape, dtype=[("r", "<f4"), ("i", "<f4")])
    stored["r"], stored["i"] = probe.real, probe.imag
    with h5py.File(path, "w") as file:
        file.create_dataset("entry_1/data_illumination", data=stored)
    loaded = load(path)
    np.testing.assert_allclose(loaded.probe[0], probe, rtol=1e-6, atol=1e-7)
    assert loaded.pixel_size_m is None  # no geometry, no attribute
    np.testing.assert_allclose(validate_probe(stored, "memory")[0], probe, rtol=1e-6, atol=1e-7)


def test_ptyr_probe_storage_and_its_psize(tmp_path: Path) -> None:
    path = tmp_path / "run.ptyr"
    probe = two_modes(24)
    with h5py.File(path, "w") as file:
        file.create_dataset("header/kind", data="minimal")
        storage = file.create_group("content/probe/Sscan_00G00")
        storage.create_dataset("data", data=probe)
        storage.create_dataset("_psize", data=[21e-9, 21e-9])
        file.create_dataset("content/obj/Sscan_00G00/data", data=np.ones((40, 40), dtype=np.complex64))
    loaded = load(path)
    np.testing.assert_array_equal(loaded.probe, probe)
    assert loaded.pixel_size_m == pytest.approx(21e-9)
    assert loaded.source == f"{path}:/content/probe/Sscan_00G00/data"
    # The storage group stands for its data.
    assert load(f"{path}::/content/probe/Sscan_00G00").pixel_size_m == pytest.approx(21e-9)


def test_ptyr_with_several_probe_storages_asks_which(tmp_path: Path) -> None:
    path = tmp_path / "two.ptyr"
    with h5py.File(path, "w") as file:
        for storage in ("SaG00", "SbG00"):
            file.create_dataset(f"content/probe/{storage}/data", data=two_modes(16))
    with pytest.raises(
        ConfigError, match=r"2 PtyPy probe storages.*SaG00, SbG00.*::/content/probe/SaG00/data"
    ):
        load(path)
    assert load(f"{path}::/content/probe/SbG00/data").probe.shape == (2, 16, 16)


def test_ptychodus_four_dimensional_probe_takes_the_first_opr_mode(tmp_path: Path) -> None:
    path = tmp_path / "product.h5"
    probe = np.stack([two_modes(16), 0.1 * two_modes(16)[::-1]])  # (OPR 2, incoherent 2, 16, 16)
    with h5py.File(path, "w") as file:
        stored = file.create_dataset("probe", data=probe)
        stored.attrs["pixel_width_m"] = 15e-9
        stored.attrs["pixel_height_m"] = 15e-9
    loaded = load(path)
    assert loaded.probe.shape == (2, 16, 16)
    np.testing.assert_array_equal(loaded.probe, probe[0])
    assert loaded.pixel_size_m == pytest.approx(15e-9)


def test_npy_probe_has_no_pixel_size(tmp_path: Path) -> None:
    path = tmp_path / "probe.npy"
    probe = defocused_gaussian(20, 10e-9)
    np.save(path, probe)
    loaded = load(path)
    assert loaded.probe.shape == (1, 20, 20)
    np.testing.assert_allclose(loaded.probe[0], probe, rtol=1e-6)
    assert loaded.pixel_size_m is None
    assert loaded.source == str(path)


def test_image_class_data_with_sibling_pixel_sizes_in_nanometres(tmp_path: Path) -> None:
    path = tmp_path / "sharp.cxi"
    probe = defocused_gaussian(16, 10e-9)
    with h5py.File(path, "w") as file:
        image = file.create_group("entry_1/image_2")
        image.create_dataset("data", data=probe)
        for name in ("x_pixel_size", "y_pixel_size"):
            image.create_dataset(name, data=8.5).attrs["units"] = "nm"
    assert load(f"{path}::/entry_1/image_2/data").pixel_size_m == pytest.approx(8.5e-9)


def test_result_file_is_a_probe_source(tmp_path: Path) -> None:
    probe = two_modes(16)
    result = ScanResult(
        scan_uid="scan-1",
        object=np.ones((30, 30), dtype=np.complex64),
        probe=probe,
        positions_m=np.zeros((2, 2)),
        object_pixel_size_m=13e-9,
        origin_m=(0.0, 0.0),
        geometry=ResultGeometry(8.0, 2.0, 75e-6, (16, 16)),
        algorithm="epie",
        settings={},
        error_history=[0.5],
        epochs=1,
        stop_reason="epochs",
        accounting={},
        config_hash="0",
    )
    path = write_result_file(tmp_path / "scan-1.h5", result)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.probe, probe)
    # image_1's pixel, not the far-field geometry's (λ z / (16 × 75 µm) = 1.03 µm).
    assert loaded.pixel_size_m == pytest.approx(13e-9)


# ---- refusals --------------------------------------------------------------------------------------------


def write_h5(path: Path, data, name: str = "probe") -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset(name, data=data)
    return path


def test_nan_probe_is_refused_naming_the_value_and_where(tmp_path: Path) -> None:
    probe = defocused_gaussian(16, 10e-9)
    probe[3, 5] = complex(np.nan, 1.0)
    path = write_h5(tmp_path / "nan.h5", probe)
    with pytest.raises(ConfigError, match=r"nan\.h5:/probe holds 1 non-finite.*\(0, 3, 5\).*nan"):
        load(path)


def test_values_that_overflow_complex64_are_refused() -> None:
    probe = np.ones((8, 8)) * 1e300
    with pytest.raises(ConfigError, match=r"non-finite.*1e\+300"):
        validate_probe(probe, "big.npy")


def test_zero_power_probe_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "zero.npy"
    np.save(path, np.zeros((2, 16, 16), dtype=np.complex64))
    with pytest.raises(ConfigError, match=r"zero\.npy has zero power.*\(2, 16, 16\)"):
        load(path)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((64,), r"shape \(64,\) \(rank 1\)"),
        ((1, 1, 2, 16, 16), r"rank 5"),
        ((16, 12), r"16×12 window"),
        ((4, 4), r"4×4 window.*at least 8×8"),
        ((17, 8, 8), r"17 modes"),
        ((0, 8, 8), r"0 modes"),
    ],
)
def test_wrong_shapes_are_refused_naming_the_shape(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_probe(np.ones(shape, dtype=np.complex64), "p.npy")


def test_missing_dataset_is_refused_listing_the_complex_ones(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "other.h5", two_modes(16), "entry_1/guess")
    with pytest.raises(ConfigError, match=r"/entry_1/nothing in .*other\.h5 is missing.*/entry_1/guess"):
        load(f"{path}::/entry_1/nothing")
    with pytest.raises(ConfigError, match=r"has no probe where tools write one.*/entry_1/guess"):
        load(path)


def test_string_dataset_is_refused_naming_its_value(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "text.h5", "just a note")
    with pytest.raises(ConfigError, match="'just a note'"):
        load(f"{path}::/probe")


def test_missing_file_and_not_hdf5_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"absent\.cxi does not exist"):
        load(tmp_path / "absent.cxi")
    text = tmp_path / "probe.txt"
    text.write_text("1 2 3")
    with pytest.raises(ConfigError, match=r"probe\.txt is neither a \.npy array nor an HDF5 file"):
        load(text)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"pixel_size_m": 10.0}, r"probe pixel of 10 m"),
        ({"x_pixel_size": 10e-9, "y_pixel_size": 20e-9}, r"2e-08 m × 1e-08 m \(y × x\)"),
    ],
)
def test_implausible_or_rectangular_pixels_are_refused(tmp_path: Path, attributes, message: str) -> None:
    path = tmp_path / "pixel.h5"
    with h5py.File(path, "w") as file:
        file.create_dataset("probe", data=two_modes(16)).attrs.update(attributes)
    with pytest.raises(ConfigError, match=message):
        load(path)


# ---- resampling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_in", "pitch_in_m", "n_out", "pitch_out_m"),
    [
        (128, 5e-9, 64, 10e-9),  # at half the pitch: coarsen ×0.5
        (64, 10e-9, 128, 5e-9),  # refine ×2
        (96, 5e-9, 50, 7.3e-9),  # a ratio with no small whole-number form, odd window
    ],
)
def test_resampled_probe_matches_the_analytic_one_at_the_target_pitch(
    n_in: int, pitch_in_m: float, n_out: int, pitch_out_m: float
) -> None:
    source = defocused_gaussian(n_in, pitch_in_m)
    expected = defocused_gaussian(n_out, pitch_out_m)
    expected *= np.sqrt(power(source) / power(expected))
    result = resample_probe(source, pitch_in_m, pitch_out_m, (n_out, n_out))
    assert result.probe.shape == (1, n_out, n_out) and result.probe.dtype == np.complex64
    assert np.abs(result.probe[0] - expected).max() < 1e-4 * np.abs(expected).max()
    assert power(result.probe) == pytest.approx(power(source), rel=1e-5)
    assert centroid_px(result.probe) == pytest.approx((n_out // 2, n_out // 2), abs=1e-3)


def test_note_says_sizes_pitches_and_factor() -> None:
    result = resample_probe(defocused_gaussian(128, 9.8e-9), 9.8e-9, 19.6e-9, (64, 64))
    assert result.note == "probe 128×128 at 9.8 nm resampled to 64×64 at 19.6 nm (×0.5)"


def test_modes_keep_their_relative_power() -> None:
    probe = two_modes(32)
    result = resample_probe(probe, 10e-9, 15e-9, (24, 24))
    ratio_in = power(probe[1]) / power(probe[0])
    assert power(result.probe[1]) / power(result.probe[0]) == pytest.approx(ratio_in, rel=1e-3)
    assert power(result.probe) == pytest.approx(power(probe), rel=1e-5)


def test_unknown_pitch_only_crops_or_pads() -> None:
    probe = defocused_gaussian(40, 10e-9).astype(np.complex64)
    cropped = resample_probe(probe, None, 10e-9, (32, 32))
    # Cropping drops a few edge pixels of a Gaussian: the rest is exactly the centre, scaled back up.
    centre = probe[4:36, 4:36]
    np.testing.assert_allclose(cropped.probe[0], centre * np.sqrt(power(probe) / power(centre)), rtol=1e-6)
    padded = resample_probe(probe, None, 10e-9, (48, 48))
    np.testing.assert_array_equal(padded.probe[0, 4:44, 4:44], probe)
    assert np.count_nonzero(padded.probe) == probe.size
    assert "unknown pixel size" in padded.note and "48×48" in padded.note


def test_an_off_centre_probe_is_recentred_on_pixel_n_half() -> None:
    probe = defocused_gaussian(64, 10e-9, centre_px=40)
    result = resample_probe(probe, 10e-9, 10e-9, (64, 64))
    assert centroid_px(result.probe) == pytest.approx((32, 32), abs=0.05)
    assert "recentred" in result.note and "(8, 8)" in result.note
    # Odd window, other pitch: the centroid goes to N // 2 as well.
    odd = resample_probe(probe, 10e-9, 12e-9, (45, 45))
    assert centroid_px(odd.probe) == pytest.approx((22, 22), abs=0.05)


def test_a_window_that_cannot_hold_the_probe_is_refused() -> None:
    wide = defocused_gaussian(128, 10e-9, sigma_m=250e-9)
    with pytest.raises(
        ConfigError, match=r"128×128 pixels at 10 nm.*32×32 window at 20 nm.*limit is 10%"
    ) as error:
        resample_probe(wide, 10e-9, 20e-9, (32, 32))
    loss = float(str(error.value).split("leave out ")[1].split("%")[0]) / 100
    assert loss > MAX_CROP_LOSS
    # Twice the window holds it.
    assert resample_probe(wide, 10e-9, 20e-9, (96, 96)).probe.shape == (1, 96, 96)


@pytest.mark.parametrize("bad", [0.0, -1e-9, float("nan")])
def test_non_positive_pitch_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="to_pixel_m"):
        resample_probe(two_modes(16), 10e-9, bad, (16, 16))

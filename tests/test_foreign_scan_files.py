"""Scan files written by other tools, built here with plain h5py in the layouts they document.

Layouts (see the module docstring of ``phasestream.formats.cxi``): the cxidb CXI 1.5 spec file, a
SHARP/COSMIC file (float32 frames, probe beside the source or the detector), a PtyPy file (only
``data_1``), an NXcxi_ptycho file (motor datasets with units, ``source_1/probe`` the radiation type), an
entry with two ``data_N`` groups and a DECTRIS NXmx master with a pixel mask. Each test reads a file and
compares what the reader found (frames, positions, energy, probe, mask, the wire dtype) with the values
written; the refusals check that the error names the dataset.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from phasestream.apps.replay.replay import _image_batches, _start_message, wire_dtype
from phasestream.errors import DetectorMessageError, ScanFileError
from phasestream.formats.cxi import CxiPath, read_cxi, split_dataset_spec
from phasestream.formats.nxmx import read_nxmx
from phasestream.formats.recorded_scan import COUNTS_DTYPE, INTENSITIES_DTYPE
from phasestream.formats.stream_v2.decode import ImageMessage, StartMessage, decode_stream_v2
from phasestream.formats.stream_v2.encode import channel_array, encode_message, start_fields
from phasestream.formats.units import JOULES_PER_EV

N_FRAMES = 20
SHAPE = (32, 32)
ENERGY_KEV = 8.8
DISTANCE_M = 2.0
PIXEL_M = 75e-6
STEP_M = 0.5e-6  # about 4 object pixels of 117 nm: overlapping frames


def _translation_m(n: int) -> np.ndarray:
    """(n, 3) sample translations (x, y, z) on a raster, 5 points per row, metres."""
    index = np.arange(n)
    return np.stack([(index % 5) * STEP_M, (index // 5) * STEP_M, np.zeros(n)], axis=1)


def _counts(n: int = N_FRAMES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(5.0, (n, *SHAPE)).astype(np.float32)


def _probe(modes: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(1)
    shape = SHAPE if modes is None else (modes, *SHAPE)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _detector(entry: h5py.Group, frames: np.ndarray | None, pixel_units: str | None = None) -> h5py.Group:
    detector = entry.create_group("instrument_1/detector_1")
    if frames is not None:
        detector["data"] = frames
    detector["distance"] = DISTANCE_M
    pixel = PIXEL_M if pixel_units is None else PIXEL_M / 1e-6
    for name in ("x_pixel_size", "y_pixel_size"):
        detector[name] = pixel
        if pixel_units:
            detector[name].attrs["units"] = pixel_units
    return detector


def write_spec_cxi(path: Path, frames: np.ndarray, mask: np.ndarray | None = None) -> Path:
    """The cxidb CXI 1.5 layout: translation in sample_1/geometry_1, soft links, energy in J."""
    with h5py.File(path, "w") as file:
        file["cxi_version"] = 150
        entry = file.create_group("entry_1")
        entry["sample_1/geometry_1/translation"] = _translation_m(len(frames))
        detector = _detector(entry, frames)
        if mask is not None:
            detector["mask"] = mask
        detector["translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
        entry["instrument_1/source_1/energy"] = ENERGY_KEV * 1000 * JOULES_PER_EV
        entry["data_1/data"] = h5py.SoftLink(CxiPath.DETECTOR_DATA)
        entry["data_1/translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
    return path


def _read_all(scan) -> np.ndarray:
    return np.concatenate(list(scan.iter_frames()))


def _sent(scan) -> tuple[StartMessage, np.ndarray]:
    """The scan encoded by replay's own functions, then decoded as ingest does."""
    dtype = wire_dtype(scan.frame_dtype)
    start = decode_stream_v2(_start_message(scan, "uid", "series", dtype, 1e-3))
    images = [decode_stream_v2(m) for batch in _image_batches(scan, dtype, "series", 1e-3) for m in batch]
    assert isinstance(start, StartMessage) and all(isinstance(image, ImageMessage) for image in images)
    return start, np.stack([image.frame for image in images])


# ---- the cxidb spec layout -------------------------------------------------------------------------------


def test_cxi_spec_file_with_a_mask(tmp_path: Path) -> None:
    frames = _counts().astype(np.uint16)
    mask = np.zeros(SHAPE, np.uint32)
    mask[3, 4] = 0x1  # invalid
    mask[5, 6] = 0x1000  # "has signal": a good pixel
    mask[7, 8] = 0x1008  # dead, with signal
    frames[:, 3, 4] = frames[:, 7, 8] = 65535  # what a detector leaves in masked pixels
    scan = read_cxi(write_spec_cxi(tmp_path / "spec.cxi", frames, mask))

    expected_bad = np.zeros(SHAPE, bool)
    expected_bad[3, 4] = expected_bad[7, 8] = True
    np.testing.assert_array_equal(scan.bad_pixel_mask, expected_bad)
    expected = np.where(expected_bad, 0, frames)
    np.testing.assert_array_equal(_read_all(scan), expected)
    translation = _translation_m(N_FRAMES)
    # Default CXI basis (rows −y, columns −x): probe (y, x) equals the sample translation's (y, x).
    np.testing.assert_allclose(scan.positions_m, translation[:, [1, 0]], rtol=1e-12)
    assert scan.energy_kev == pytest.approx(ENERGY_KEV, rel=1e-12)
    assert scan.frame_dtype == np.uint16 and scan.probe is None and scan.probe_path is None

    start, sent = _sent(scan)
    assert start.pixel_mask.dtype == np.uint32
    np.testing.assert_array_equal(start.pixel_mask != 0, expected_bad)
    np.testing.assert_array_equal(sent, expected)


def test_mask_of_the_wrong_shape_or_polarity_is_refused(tmp_path: Path) -> None:
    frames = _counts().astype(np.uint16)
    with pytest.raises(ScanFileError, match=rf"{CxiPath.MASK} has shape \(16, 32\) but the frames are"):
        read_cxi(write_spec_cxi(tmp_path / "small.cxi", frames, np.zeros((16, 32), np.uint32)))
    with pytest.raises(ScanFileError, match=rf"{CxiPath.MASK} flags every pixel .* inverted"):
        read_cxi(write_spec_cxi(tmp_path / "inverted.cxi", frames, np.ones(SHAPE, np.uint32)))


# ---- float frames ----------------------------------------------------------------------------------------


def test_whole_float_counts_travel_as_uint32(tmp_path: Path) -> None:
    frames = _counts()
    scan = read_cxi(write_spec_cxi(tmp_path / "floored.cxi", frames))
    assert scan.frame_dtype == COUNTS_DTYPE and wire_dtype(scan.frame_dtype) == np.dtype("<u4")
    start, sent = _sent(scan)
    assert start.dtype == np.uint32 and sent.dtype == np.uint32
    np.testing.assert_array_equal(sent, frames.astype(np.uint32))


@pytest.mark.parametrize("stored", [np.float32, np.float64])
def test_fractional_intensities_travel_as_float32(tmp_path: Path, stored: type) -> None:
    frames = (_counts() * 0.5).astype(stored)  # half the pixels hold x.5
    scan = read_cxi(write_spec_cxi(tmp_path / "intensities.cxi", frames))
    assert scan.frame_dtype == INTENSITIES_DTYPE
    start, sent = _sent(scan)
    assert start.dtype == np.float32 and sent.dtype == np.float32
    np.testing.assert_array_equal(sent, frames.astype(np.float32))
    fields = start_fields(
        series_id=1,
        series_unique_id="s",
        shape_px=SHAPE,
        dtype=np.float32,
        number_of_images=1,
        energy_kev=ENERGY_KEV,
        detector_distance_m=DISTANCE_M,
        pixel_size_m=PIXEL_M,
        count_time_s=1e-3,
        frame_time_s=1e-3,
        user_data=None,
    )
    assert "saturation_value" not in fields  # float images do not saturate


@pytest.mark.parametrize(
    ("value", "frame", "problem"),
    [
        (np.nan, 3, "is not finite"),
        (np.inf, 4, "is not finite"),
        (-2.0, 5, "is negative"),
    ],
)
def test_bad_float_values_are_refused_with_their_frame(
    tmp_path: Path, value: float, frame: int, problem: str
) -> None:
    frames = _counts()
    frames[frame, 9, 10] = value
    with pytest.raises(ScanFileError) as raised:
        read_cxi(write_spec_cxi(tmp_path / "bad.cxi", frames))
    message = str(raised.value)
    assert f"{CxiPath.DATA}" in message and f"frame {frame} pixel (y=9, x=10)" in message
    assert problem in message and "mask" in message


def test_a_masked_nan_travels_as_zero(tmp_path: Path) -> None:
    frames = _counts()
    frames[:, 9, 10] = np.nan
    mask = np.zeros(SHAPE, np.uint32)
    mask[9, 10] = 0x200  # missing
    scan = read_cxi(write_spec_cxi(tmp_path / "masked.cxi", frames, mask))
    assert scan.frame_dtype == COUNTS_DTYPE
    assert (_read_all(scan)[:, 9, 10] == 0).all()


def test_a_fraction_after_the_first_chunk_is_refused_on_the_way(tmp_path: Path) -> None:
    frames = _counts(70)  # the first chunk (64 frames) holds whole counts only
    frames[66, 1, 2] = 2.5
    scan = read_cxi(write_spec_cxi(tmp_path / "mixed.cxi", frames))
    assert scan.frame_dtype == COUNTS_DTYPE
    with pytest.raises(
        ScanFileError, match=r"frame 66 pixel \(y=1, x=2\) holds .*2\.5.*whole number.*np\.rint"
    ):
        _read_all(scan)


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (np.ones((N_FRAMES, *SHAPE), np.complex64), "complex numbers"),
        (np.ones((4, 5, *SHAPE), np.float32), "4-D frames"),
    ],
)
def test_frames_that_cannot_be_detector_images_are_refused(
    tmp_path: Path, frames: np.ndarray, expected: str
) -> None:
    with pytest.raises(ScanFileError, match=f"{CxiPath.DATA} .*{expected}"):
        read_cxi(write_spec_cxi(tmp_path / "odd.cxi", frames))


def test_frame_and_translation_counts_must_agree(tmp_path: Path) -> None:
    path = write_spec_cxi(tmp_path / "short.cxi", _counts())
    with h5py.File(path, "a") as file:
        del file[CxiPath.TRANSLATION]
        file[CxiPath.TRANSLATION] = _translation_m(N_FRAMES - 2)
    with pytest.raises(ScanFileError, match=r"translation has shape \(18, 3\) but the file holds 20 frames"):
        read_cxi(path)


def test_pynx_transposed_translation_reads_the_same(tmp_path: Path) -> None:
    path = write_spec_cxi(tmp_path / "pynx.cxi", _counts())
    expected = read_cxi(path).positions_m
    with h5py.File(path, "a") as file:
        rows = file[CxiPath.TRANSLATION][()]
        del file[CxiPath.TRANSLATION]
        file[CxiPath.TRANSLATION] = rows.T
    np.testing.assert_array_equal(read_cxi(path).positions_m, expected)


# ---- SHARP / COSMIC and PtyPy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe_at", "modes"),
    [
        (CxiPath.ILLUMINATION, None),
        (CxiPath.ILLUMINATION, 3),
        (CxiPath.DETECTOR_PROBE, None),
        (CxiPath.DATA_ILLUMINATION, None),
    ],
)
def test_sharp_and_cosmic_probes_are_found(tmp_path: Path, probe_at: str, modes: int | None) -> None:
    probe = _probe(modes)
    path = write_spec_cxi(tmp_path / "sharp.cxi", _counts())
    with h5py.File(path, "a") as file:
        file[probe_at] = probe
        if probe_at == CxiPath.ILLUMINATION:
            file[CxiPath.SOURCE_PROBE] = h5py.SoftLink(CxiPath.ILLUMINATION)  # as SHARP's scripts add it
        file["entry_1/instrument_1/detector_1/probe_mask"] = np.ones(SHAPE, bool)  # COSMIC: not a pixel mask
    scan = read_cxi(path)
    assert scan.probe_path == probe_at and scan.bad_pixel_mask is None
    np.testing.assert_array_equal(scan.probe, probe)
    assert scan.frame_dtype == COUNTS_DTYPE  # COSMIC's float32 floored counts


def test_a_probe_of_another_size_is_passed_over(tmp_path: Path) -> None:
    path = write_spec_cxi(tmp_path / "big-probe.cxi", _counts())
    with h5py.File(path, "a") as file:
        file[CxiPath.ILLUMINATION] = np.ones((64, 64), np.complex64)
    with pytest.warns(RuntimeWarning, match=r"source_1/illumination has shape \(64, 64\)"):
        scan = read_cxi(path)
    assert scan.probe is None and scan.probe_path is None


def test_ptypy_file_with_only_data_1(tmp_path: Path) -> None:
    frames = _counts().astype(np.int32)
    translation = _translation_m(N_FRAMES)
    translation[:, 0] *= -1  # a sample moving towards −x
    with h5py.File(tmp_path / "ptypy.cxi", "w") as file:
        entry = file.create_group("entry_1")
        entry["data_1/data"] = frames
        entry["data_1/translation"] = translation
        _detector(entry, None)  # geometry only, as PtyPy's ALS loader reads it
        entry["instrument_1/source_1/energy"] = ENERGY_KEV * 1000 * JOULES_PER_EV
    scan = read_cxi(tmp_path / "ptypy.cxi")
    np.testing.assert_array_equal(_read_all(scan), frames)
    np.testing.assert_allclose(scan.positions_m, translation[:, [1, 0]], rtol=1e-12)
    assert scan.positions_m[:, 1].max() == 0.0 and scan.positions_m[:, 1].min() < 0


# ---- NXcxi_ptycho --------------------------------------------------------------------------------------


def write_nxcxi_ptycho(
    path: Path, frames: np.ndarray, *, translations: bool = True, beam: bool = True
) -> Path:
    """NXcxi_ptycho: NX_INT frames, positions in µm with units, source_1/probe the radiation type."""
    translation_um = _translation_m(len(frames)) / 1e-6
    with h5py.File(path, "w") as file:
        file["cxi_version"] = 150
        entry = file.create_group("entry_1")
        entry["definition"] = "NXcxi_ptycho"
        detector = _detector(entry, frames, pixel_units="um")
        detector["distance"].attrs["units"] = "m"
        source = entry.create_group("instrument_1/source_1")
        source["name"] = "Diamond"
        source["energy"] = 3e9 * JOULES_PER_EV  # the storage ring, 3 GeV
        source["probe"] = "x-ray"
        source["type"] = "Synchrotron X-ray Source"
        if beam:
            entry["instrument_1/beam_1/energy"] = ENERGY_KEV * 1000
            entry["instrument_1/beam_1/energy"].attrs["units"] = "eV"
        if translations:
            detector["translation"] = translation_um
            detector["translation"].attrs["units"] = "um"
            detector["translation"].attrs["axes"] = "translation:slow:fast"
            entry["sample_1/geometry_1/translation"] = h5py.SoftLink(CxiPath.DETECTOR_TRANSLATION)
            entry["data_1/translation"] = h5py.SoftLink(CxiPath.DETECTOR_TRANSLATION)
        transformations = entry.create_group("sample_1/transformations")
        for axis, column in (("x", 0), ("y", 1)):
            transformations[axis] = translation_um[:, column]
            transformations[axis].attrs["units"] = "um"
            transformations[axis].attrs["vector"] = np.eye(3)[column]
        entry["data_1/data"] = h5py.SoftLink(CxiPath.DETECTOR_DATA)
    return path


@pytest.mark.parametrize("translations", [True, False], ids=["detector_1/translation", "transformations"])
def test_nxcxi_ptycho_positions_in_micrometres(tmp_path: Path, translations: bool) -> None:
    frames = _counts().astype(np.int32)
    scan = read_cxi(write_nxcxi_ptycho(tmp_path / "nx.cxi", frames, translations=translations))
    np.testing.assert_allclose(scan.positions_m, _translation_m(N_FRAMES)[:, [1, 0]], rtol=1e-9, atol=1e-15)
    assert scan.energy_kev == pytest.approx(ENERGY_KEV)  # from beam_1, not the ring's 3 GeV
    assert scan.detector_pixel_size_m == pytest.approx(PIXEL_M)
    assert scan.probe is None and scan.probe_path is None  # "x-ray" is no probe
    np.testing.assert_array_equal(_read_all(scan), frames)


def test_nxcxi_ptycho_without_the_photon_energy_is_refused(tmp_path: Path) -> None:
    path = write_nxcxi_ptycho(tmp_path / "nx.cxi", _counts().astype(np.int32), beam=False)
    with pytest.raises(ScanFileError, match=rf"lacks {CxiPath.BEAM_ENERGY} .*storage ring"):
        read_cxi(path)


# ---- several data groups ---------------------------------------------------------------------------------


def test_data_1_is_read_unless_another_group_is_named(tmp_path: Path) -> None:
    first, second = _counts(seed=1), _counts(seed=2)
    path = write_spec_cxi(tmp_path / "two.cxi", first)
    with h5py.File(path, "a") as file:
        file["entry_1/data_2/data"] = second
        file["entry_1/data_2/translation"] = h5py.SoftLink(CxiPath.TRANSLATION)
    with pytest.warns(RuntimeWarning, match=r"data_1, data_2; reading /entry_1/data_1.*::/entry_1/data_2"):
        default = read_cxi(path)
    np.testing.assert_array_equal(_read_all(default), first)

    file_path, group = split_dataset_spec(f"{path}::/entry_1/data_2")
    assert file_path == path and group == "/entry_1/data_2"
    assert split_dataset_spec(str(path)) == (path, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named group needs no warning
        for name in (group, "data_2"):
            np.testing.assert_array_equal(_read_all(read_cxi(file_path, name)), second)
    with pytest.raises(ScanFileError, match=r"no frames at /entry_1/data_3/data.*'/entry_1/data_2'"):
        read_cxi(path, "data_3")
    with pytest.raises(ScanFileError, match="FILE::GROUP"):
        split_dataset_spec("scan.cxi::")


# ---- DECTRIS NXmx ----------------------------------------------------------------------------------------


def write_nxmx_master(path: Path, frames: np.ndarray, pixel_mask: np.ndarray | None) -> Path:
    """A master file holding its frames (bslz4, one chunk per frame), as with nimages_per_file 0."""
    translation = _translation_m(len(frames))
    with h5py.File(path, "w") as file:
        file.create_dataset(
            "entry/data/data", data=frames, chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4")
        )
        file["entry/instrument/beam/incident_wavelength"] = 12.3984198 / ENERGY_KEV
        detector = file.create_group("entry/instrument/detector")
        detector["detector_distance"] = DISTANCE_M
        detector["x_pixel_size"] = detector["y_pixel_size"] = PIXEL_M
        if pixel_mask is not None:
            detector["detectorSpecific/pixel_mask"] = pixel_mask
        for name, column in (("sample_x", 0), ("sample_y", 1)):
            dataset = file.create_dataset(f"entry/sample/transformations/{name}", data=translation[:, column])
            dataset.attrs.update(
                {"units": "m", "transformation_type": "translation", "vector": np.eye(3)[column]}
            )
    return path


def test_nxmx_pixel_mask_travels_in_the_start_message(tmp_path: Path) -> None:
    frames = _counts().astype(np.uint16)
    pixel_mask = np.zeros(SHAPE, np.uint32)
    pixel_mask[0, :] = 1  # gap
    pixel_mask[10, 11] = 1 << 4  # noisy
    pixel_mask[12, 13] = 1 << 31  # virtual pixel: information, not a defect
    frames[:, 0, :] = frames[:, 10, 11] = 65535
    scan = read_nxmx(write_nxmx_master(tmp_path / "s_master.h5", frames, pixel_mask))
    bad = (pixel_mask & 0xFFFF) != 0
    np.testing.assert_array_equal(scan.bad_pixel_mask, bad)
    assert not scan.bslz4_passthrough  # the masked pixels must be zeroed first
    np.testing.assert_allclose(scan.positions_m, _translation_m(N_FRAMES)[:, [1, 0]], rtol=1e-12)
    start, sent = _sent(scan)
    np.testing.assert_array_equal(start.pixel_mask != 0, bad)
    np.testing.assert_array_equal(sent, np.where(bad, 0, frames))

    clean = read_nxmx(write_nxmx_master(tmp_path / "clean_master.h5", frames, np.zeros(SHAPE, np.uint32)))
    assert clean.bslz4_passthrough  # nothing masked: the stored chunks go out as they are


def test_nxmx_pixel_mask_of_another_detector_is_refused(tmp_path: Path) -> None:
    path = write_nxmx_master(
        tmp_path / "m_master.h5", _counts().astype(np.uint16), np.zeros((64, 64), np.uint32)
    )
    with pytest.raises(ScanFileError, match=r"detectorSpecific/pixel_mask has shape \(64, 64\)"):
        read_nxmx(path)


# ---- the pixel mask on the wire --------------------------------------------------------------------------


def _start_with_mask(mask: np.ndarray, **overrides: object) -> bytes:
    fields = start_fields(
        series_id=1,
        series_unique_id="s",
        shape_px=SHAPE,
        dtype=np.uint16,
        number_of_images=1,
        energy_kev=ENERGY_KEV,
        detector_distance_m=DISTANCE_M,
        pixel_size_m=PIXEL_M,
        count_time_s=1e-3,
        frame_time_s=1e-3,
        user_data=None,
        pixel_mask=mask,
    )
    return encode_message({**fields, **overrides})


def test_decoder_reads_the_pixel_mask_and_refuses_a_wrong_one() -> None:
    mask = np.zeros(SHAPE, np.uint32)
    mask[2, 3] = 0x10
    start = decode_stream_v2(_start_with_mask(mask))
    assert start.pixel_mask.dtype == np.uint32 and start.pixel_mask.shape == SHAPE
    np.testing.assert_array_equal(start.pixel_mask, mask)
    assert decode_stream_v2(_start_with_mask(mask, pixel_mask=None)).pixel_mask is None

    with pytest.raises(DetectorMessageError, match=r"pixel_mask\['threshold_1'\] has shape \[16, 32\]"):
        decode_stream_v2(_start_with_mask(np.zeros((16, 32), np.uint32)))
    with pytest.raises(DetectorMessageError, match=r"pixel_mask\['threshold_1'\] is float32"):
        float_mask = channel_array(np.zeros(SHAPE, np.float32))
        decode_stream_v2(_start_with_mask(mask, pixel_mask={"threshold_1": float_mask}))
    with pytest.raises(DetectorMessageError, match="pixel_mask is int"):
        decode_stream_v2(_start_with_mask(mask, pixel_mask=7))


def test_a_huge_declared_mask_is_refused_before_decompressing() -> None:
    tiny = np.zeros((2, 2), np.uint32)
    huge = channel_array(tiny, declared_shape=(100_000, 100_000))  # would need 40 GB
    with pytest.raises(
        DetectorMessageError, match=r"has shape \[100000, 100000\], but the images are \[32, 32\]"
    ):
        decode_stream_v2(_start_with_mask(tiny, pixel_mask={"threshold_1": huge}))

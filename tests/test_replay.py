"""Recorded scans: CXI and DECTRIS NXmx files written, read back, and replayed through the SELUN emitter.

The replay tests bind the real emitter sockets (ipc in a short temporary folder) and read them with real
ZeroMQ PULL sockets in a thread, decoding with ingest's own decoders, so a frame or position that the
file, the reader or the encoder got wrong shows up as a mismatch with the simulated truth.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zmq
from dectris.compression import decompress

from phasestream.apps.replay.replay import (
    ReplayRate,
    detect_format,
    read_recorded_scan,
    replay,
    replay_rate_hz,
    wire_dtype,
)
from phasestream.errors import ConfigError, DetectorMessageError, PositionError, ScanFileError
from phasestream.formats.cxi import CxiPath, read_cxi, write_cxi
from phasestream.formats.nxmx import read_nxmx, write_nxmx
from phasestream.formats.position_channel import PositionBatch, PositionsEnd, decode_positions
from phasestream.formats.recorded_scan import BITSHUFFLE_FILTER_ID, FrameCompression
from phasestream.formats.stream_v2.decode import EndMessage, ImageMessage, StartMessage, decode_stream_v2
from phasestream.simulators.scan_simulation import ScanSimulationConfig, SimulatedScan, simulate_scan

N_FRAMES = 70  # one full positions batch of 64 and a partial one
PLANCK_J_S = 6.62607015e-34
LIGHT_M_PER_S = 299_792_458.0
ELECTRON_VOLT_J = 1.602176634e-19


@pytest.fixture(scope="module")
def scan() -> SimulatedScan:
    return simulate_scan(
        ScanSimulationConfig(
            detector_size_px=64,
            probe_diameter_px=24,
            probe_bright_field_diameter_px=32,
            n_positions=N_FRAMES,
            seed=5,
        )
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """ipc:// paths must stay under ~100 characters, which pytest's tmp_path does not promise."""
    folder = Path(tempfile.mkdtemp(prefix="psr-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _frames(recorded: Any, chunk_frames: int = 64) -> np.ndarray:
    return np.concatenate(list(recorded.iter_frames(chunk_frames)))


# ---- CXI ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(FrameCompression))
def test_cxi_round_trip_is_exact(scan: SimulatedScan, tmp_path: Path, compression: FrameCompression) -> None:
    path = write_cxi(tmp_path / "scan.cxi", scan, frame_time_s=2e-3, compression=compression)
    recorded = read_cxi(path)
    np.testing.assert_array_equal(_frames(recorded), scan.frames)
    assert recorded.frame_dtype == scan.frames.dtype and recorded.n_frames == N_FRAMES
    np.testing.assert_allclose(recorded.positions_m, scan.positions_m, rtol=1e-12, atol=1e-18)
    assert recorded.energy_kev == pytest.approx(scan.energy_kev, rel=1e-12)
    assert recorded.detector_distance_m == scan.detector_distance_m
    assert recorded.detector_pixel_size_m == scan.detector_pixel_size_m
    assert recorded.frame_time_s == 2e-3
    np.testing.assert_array_equal(recorded.probe, scan.probe_truth)
    assert recorded.scan_shape == scan.scan_shape
    # Only one bitshuffle-LZ4 chunk per frame can travel as it is stored.
    assert recorded.bslz4_passthrough is (compression is FrameCompression.BSLZ4)


def test_cxi_layout_and_position_convention(scan: SimulatedScan, tmp_path: Path) -> None:
    path = write_cxi(tmp_path / "scan.cxi", scan)
    with h5py.File(path, "r") as file:
        assert file["cxi_version"][()] == 160
        assert file["entry_1"].attrs["NX_class"] == "NXentry"
        assert file["entry_1/data_1"].attrs["NX_class"] == "NXdata"
        link = file["entry_1/data_1"].get("data", getlink=True)
        assert isinstance(link, h5py.SoftLink) and link.path == CxiPath.DETECTOR_DATA
        assert file[CxiPath.DATA].shape == scan.frames.shape
        energy_j = file[CxiPath.ENERGY][()]
        translation = file[CxiPath.TRANSLATION][()]
        basis = file[CxiPath.BASIS_VECTORS][()]
    assert energy_j == pytest.approx(8.8e3 * ELECTRON_VOLT_J, rel=1e-12)
    # CXI's default detector basis: rows along −y, columns along −x, one pixel long.
    np.testing.assert_array_equal(basis, [[0, -75e-6, 0], [-75e-6, 0, 0]])
    # The sample moves by +t, so the probe sits at −t on it; projected on rows (−y) and columns (−x) the
    # two signs cancel: the stored (x, y) translation equals the probe's (column, row) position.
    assert translation.shape == (N_FRAMES, 3)
    np.testing.assert_array_equal(translation[:, 0], scan.positions_m[:, 1])
    np.testing.assert_array_equal(translation[:, 1], scan.positions_m[:, 0])
    np.testing.assert_array_equal(translation[:, 2], 0.0)


@pytest.mark.parametrize(
    ("basis", "rows_from", "columns_from"),
    [
        # rows along +y, columns along +x: both coordinates change sign
        ([[0, 1, 0], [1, 0, 0]], (1, -1.0), (0, -1.0)),
        # a transposed detector, rows along −x and columns along −y
        ([[-1, 0, 0], [0, -1, 0]], (0, 1.0), (1, 1.0)),
    ],
)
def test_positions_follow_the_detector_basis_vectors(
    scan: SimulatedScan, tmp_path: Path, basis: list[list[float]], rows_from: tuple, columns_from: tuple
) -> None:
    path = write_cxi(tmp_path / "scan.cxi", scan)
    with h5py.File(path, "a") as file:
        file[CxiPath.BASIS_VECTORS][...] = np.asarray(basis) * 75e-6
        translation = file[CxiPath.TRANSLATION][()]
    recorded = read_cxi(path)
    (row_axis, row_sign), (column_axis, column_sign) = rows_from, columns_from
    np.testing.assert_array_equal(recorded.positions_m[:, 0], row_sign * translation[:, row_axis])
    np.testing.assert_array_equal(recorded.positions_m[:, 1], column_sign * translation[:, column_axis])


def test_pynx_transposed_translation_reads_the_same(scan: SimulatedScan, tmp_path: Path) -> None:
    path = write_cxi(tmp_path / "scan.cxi", scan)
    with h5py.File(path, "a") as file:
        rows = file[CxiPath.TRANSLATION][()]
        del file[CxiPath.TRANSLATION]
        file[CxiPath.TRANSLATION] = rows.T  # PyNX writes (3, N)
    np.testing.assert_array_equal(read_cxi(path).positions_m, scan.positions_m)


def test_positions_in_object_pixels_from_the_geometry(scan: SimulatedScan, tmp_path: Path) -> None:
    recorded = read_cxi(write_cxi(tmp_path / "scan.cxi", scan))
    # Independent reference: λ = h c / E, Δ = λ z / (N p).
    wavelength_m = PLANCK_J_S * LIGHT_M_PER_S / (8.8e3 * ELECTRON_VOLT_J)
    pixel_m = wavelength_m * 2.0 / (64 * 75e-6)
    assert recorded.object_pixel_size_m == pytest.approx((pixel_m, pixel_m), rel=1e-8)
    positions_px = recorded.positions_object_px()
    np.testing.assert_allclose(
        np.diff(positions_px, axis=0), np.diff(scan.positions_m, axis=0) / pixel_m, rtol=1e-7
    )
    # The grid is the smallest that holds every window: the top-most and left-most centres sit N // 2 in.
    np.testing.assert_allclose(positions_px.min(axis=0), [32, 32], atol=1e-9)
    # Against the simulator's own grid the positions differ by one constant offset only.
    offset = positions_px - scan.positions_object_px()
    np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape), atol=1e-6)


def test_frames_are_read_a_chunk_at_a_time(scan: SimulatedScan, tmp_path: Path) -> None:
    recorded = read_cxi(write_cxi(tmp_path / "scan.cxi", scan))
    assert [len(chunk) for chunk in recorded.iter_frames(16)] == [16, 16, 16, 16, 6]
    # A block may cover only the start of its dataset (the replay benchmark repeats a file this way).
    (block,) = recorded.blocks
    partial = dataclasses.replace(recorded, blocks=(block, dataclasses.replace(block, count=20)))
    assert [len(chunk) for chunk in partial.iter_frames(16)] == [16, 16, 16, 16, 6, 16, 4]
    np.testing.assert_array_equal(_frames(partial)[N_FRAMES:], scan.frames[:20])
    assert len(list(partial.iter_bslz4())) == N_FRAMES + 20
    passthrough = list(recorded.iter_bslz4())
    assert len(passthrough) == N_FRAMES
    # The stored chunk is a complete HDF5-framed bslz4 payload: DECTRIS's decoder restores the frame.
    restored = np.frombuffer(decompress(passthrough[9], "bslz4", elem_size=2), np.uint16).reshape(64, 64)
    np.testing.assert_array_equal(restored, scan.frames[9])


# ---- NXmx -----------------------------------------------------------------------------------------------


def test_nxmx_round_trip_with_bslz4_through_hdf5plugin(scan: SimulatedScan, tmp_path: Path) -> None:
    master = write_nxmx(tmp_path / "series_7_master.h5", scan, frames_per_data_file=32, frame_time_s=1e-3)
    expected = {"series_7_data_000001.h5": (1, 32), "series_7_data_000002.h5": (33, 64)}
    expected["series_7_data_000003.h5"] = (65, 70)
    with h5py.File(master, "r") as file:
        links = {name: file["entry/data"].get(name, getlink=True) for name in file["entry/data"]}
        wavelength = file["entry/instrument/beam/incident_wavelength"]
        assert wavelength.attrs["units"] == "angstrom"
        assert wavelength[()] == pytest.approx(12.3984198 / 8.8)
    assert sorted(links) == ["data_000001", "data_000002", "data_000003"]
    assert {link.filename for link in links.values()} == set(expected)
    for name, (low, high) in expected.items():
        with h5py.File(tmp_path / name, "r") as file:
            data = file["entry/data/data"]
            filter_id, _, values, _ = data.id.get_create_plist().get_filter(0)
            assert (filter_id, values[4]) == (BITSHUFFLE_FILTER_ID, 2)  # bitshuffle with LZ4
            assert data.chunks == (1, 64, 64)
            assert (data.attrs["image_nr_low"], data.attrs["image_nr_high"]) == (low, high)
            # Decoded by HDF5 through the hdf5plugin filter, as any NXmx reader would.
            np.testing.assert_array_equal(data[()], scan.frames[low - 1 : high])

    recorded = read_nxmx(master)
    np.testing.assert_array_equal(_frames(recorded, 20), scan.frames)
    np.testing.assert_allclose(recorded.positions_m, scan.positions_m, rtol=1e-12, atol=1e-18)
    assert recorded.energy_kev == pytest.approx(8.8, rel=1e-9)
    assert (recorded.detector_distance_m, recorded.detector_pixel_size_m) == (2.0, 75e-6)
    assert recorded.frame_time_s == 1e-3
    assert recorded.bslz4_passthrough and [b.count for b in recorded.blocks] == [32, 32, 6]
    assert recorded.scan_shape == scan.scan_shape


def test_nxmx_with_every_frame_in_the_master_file(scan: SimulatedScan, tmp_path: Path) -> None:
    master = write_nxmx(tmp_path / "one_master.h5", scan, frames_per_data_file=0)
    recorded = read_nxmx(master)
    np.testing.assert_array_equal(_frames(recorded), scan.frames)
    assert [path.name for path in tmp_path.iterdir()] == ["one_master.h5"]


def test_nxmx_without_translations_needs_the_side_channel(scan: SimulatedScan, tmp_path: Path) -> None:
    master = write_nxmx(tmp_path / "s_master.h5", scan, 40)
    with h5py.File(master, "a") as file:
        del file["entry/sample/transformations"]
    with pytest.raises(ScanFileError, match=r"/entry/sample/transformations.*--positions"):
        read_nxmx(master)
    np.testing.assert_array_equal(read_nxmx(master, scan.positions_m).positions_m, scan.positions_m)
    with pytest.raises(PositionError, match=r"\(69, 2\).*70 frames"):
        read_nxmx(master, scan.positions_m[:-1])


def test_nxmx_beam_off_the_frame_centre_is_reported(scan: SimulatedScan, tmp_path: Path) -> None:
    master = write_nxmx(tmp_path / "s_master.h5", scan, 100)
    with h5py.File(master, "a") as file:
        file["entry/instrument/detector/beam_center_x"][...] = 20.0
    with pytest.warns(RuntimeWarning, match=r"beam_center_x = 20 px.*frame centre \(32 px\)"):
        read_nxmx(master)


def test_nxmx_missing_data_file_is_named(scan: SimulatedScan, tmp_path: Path) -> None:
    master = write_nxmx(tmp_path / "s_master.h5", scan, 40)
    (tmp_path / "s_data_000002.h5").unlink()
    with pytest.raises(
        ScanFileError, match=r"data_000002 links to .*s_data_000002\.h5, which does not exist"
    ):
        read_nxmx(master)


def test_nxmx_can_be_saved_as_cxi(scan: SimulatedScan, tmp_path: Path) -> None:
    from_nxmx = read_nxmx(write_nxmx(tmp_path / "s_master.h5", scan, 50, frame_time_s=1e-3))
    recorded = read_cxi(write_cxi(tmp_path / "copy.cxi", from_nxmx))
    np.testing.assert_array_equal(_frames(recorded), scan.frames)
    np.testing.assert_array_equal(recorded.positions_m, from_nxmx.positions_m)
    assert recorded.frame_time_s == 1e-3


# ---- replay through the emitter's sockets -----------------------------------------------------------------


class Receiver(threading.Thread):
    """PULL sockets on the emitter's endpoints; decodes everything until both end messages."""

    def __init__(self, data_endpoint: str, positions_endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoints = (data_endpoint, positions_endpoint)
        self.data: list[Any] = []
        self.positions: list[Any] = []
        self.failure: str | None = None

    def run(self) -> None:
        context = zmq.Context()
        try:
            data, positions = context.socket(zmq.PULL), context.socket(zmq.PULL)
            data.connect(self.endpoints[0])
            positions.connect(self.endpoints[1])
            self._drain(data, decode_stream_v2, EndMessage, self.data)
            self._drain(positions, decode_positions, PositionsEnd, self.positions)
        finally:
            context.destroy(linger=0)

    def _drain(self, socket: zmq.Socket, decode: Any, end: type, out: list[Any]) -> None:
        while not (out and isinstance(out[-1], end)):
            if not socket.poll(30_000):
                self.failure = f"nothing arrived for 30 s after {len(out)} messages"
                return
            try:
                out.append(decode(socket.recv()))
            except DetectorMessageError as error:  # kept, so that a bad message fails the test at once
                out.append(error)


def _write(kind: str, scan: SimulatedScan, folder: Path) -> Path:
    if kind == "nxmx":
        return write_nxmx(folder / "r_master.h5", scan, 30, frame_time_s=1e-3)
    compression = FrameCompression.BSLZ4 if kind == "cxi-bslz4" else FrameCompression.NONE
    return write_cxi(folder / "r.cxi", scan, frame_time_s=1e-3, compression=compression)


def _replay_into_receiver(path: Path | Any, folder: Path, rate: Any) -> tuple[Any, Receiver]:
    endpoints = (f"ipc://{folder}/data.sock", f"ipc://{folder}/pos.sock")
    receiver = Receiver(*endpoints)
    receiver.start()
    report = replay(path, rate, *endpoints, progress=False, scan_uid="uid-replay", send_timeout_s=30)
    receiver.join(timeout=30)
    assert not receiver.is_alive() and receiver.failure is None, receiver.failure
    return report, receiver


@pytest.mark.parametrize("kind", ["cxi-bslz4", "cxi-none", "nxmx"])
def test_replay_delivers_every_frame_with_its_position(
    scan: SimulatedScan, short_dir: Path, kind: str
) -> None:
    path = _write(kind, scan, short_dir)
    report, received = _replay_into_receiver(path, short_dir, ReplayRate.MAX)

    start, *images, end = received.data
    assert isinstance(start, StartMessage) and isinstance(end, EndMessage)
    assert (start.number_of_images, start.shape_px, start.dtype) == (N_FRAMES, (64, 64), np.dtype("<u2"))
    assert start.energy_kev == pytest.approx(8.8) and start.detector_distance_m == pytest.approx(2.0)
    assert start.pixel_size_m == pytest.approx(75e-6)
    assert start.user_data["scan_uid"] == "uid-replay"
    (y_min, x_min), (y_max, x_max) = scan.positions_m.min(axis=0), scan.positions_m.max(axis=0)
    assert start.user_data["scan_extent_m"] == pytest.approx([y_min, y_max, x_min, x_max])
    assert all(isinstance(image, ImageMessage) for image in images)
    assert [image.image_id for image in images] == list(range(N_FRAMES))
    np.testing.assert_array_equal(np.stack([image.frame for image in images]), scan.frames)

    *batches, positions_end = received.positions
    assert all(isinstance(batch, PositionBatch) for batch in batches) and isinstance(
        positions_end, PositionsEnd
    )
    assert [len(batch.image_ids) for batch in batches] == [64, 6]
    np.testing.assert_array_equal(np.concatenate([b.image_ids for b in batches]), np.arange(N_FRAMES))
    np.testing.assert_allclose(np.concatenate([b.positions_m for b in batches]), scan.positions_m, rtol=1e-12)
    assert report.frames_sent == N_FRAMES and report.rate_hz is None
    assert report.passthrough is (kind != "cxi-none")


def test_a_scan_already_read_replays_as_its_file(scan: SimulatedScan, short_dir: Path) -> None:
    path = _write("cxi-bslz4", scan, short_dir)
    _, from_path = _replay_into_receiver(path, short_dir, ReplayRate.MAX)
    _, from_scan = _replay_into_receiver(read_recorded_scan(path), short_dir, ReplayRate.MAX)
    frames = [np.stack([m.frame for m in r.data[1:-1]]) for r in (from_path, from_scan)]
    np.testing.assert_array_equal(frames[0], frames[1])
    assert from_scan.data[0].user_data["replay_of"] == str(path)
    with pytest.raises(ConfigError, match="has its positions: drop the positions side channel"):
        replay(read_recorded_scan(path), ReplayRate.MAX, progress=False, positions_m=scan.positions_m)


def test_recorded_rate_paces_the_replay(scan: SimulatedScan, short_dir: Path) -> None:
    path = write_cxi(short_dir / "paced.cxi", scan, frame_time_s=2e-3)
    report, received = _replay_into_receiver(path, short_dir, ReplayRate.RECORDED)
    assert report.rate_hz == 500.0 and len(received.data) == N_FRAMES + 2
    # The schedule is absolute: 70 frames at 500 Hz take 69 intervals, less the 0.5 ms by which a frame
    # may leave early rather than after a sleep.
    assert report.elapsed_s >= 69 * 2e-3 - 5e-4


# ---- bad input ---------------------------------------------------------------------------------------------


def test_recorded_rate_needs_a_frame_time(scan: SimulatedScan, tmp_path: Path) -> None:
    recorded = read_cxi(write_cxi(tmp_path / "untimed.cxi", scan))
    assert recorded.frame_time_s is None
    with pytest.raises(ConfigError, match=r"records no frame time.*--rate-hz R or --as-fast-as-possible"):
        replay_rate_hz(ReplayRate.RECORDED, recorded)
    assert replay_rate_hz(ReplayRate.MAX, recorded) is None and replay_rate_hz(250, recorded) == 250.0
    with pytest.raises(ConfigError, match=r"-5\.0 Hz"):
        replay_rate_hz(-5, recorded)


@pytest.mark.parametrize(
    "removed",
    [CxiPath.ENERGY, CxiPath.DISTANCE, CxiPath.X_PIXEL_SIZE, CxiPath.TRANSLATION, CxiPath.DETECTOR_DATA],
)
def test_missing_required_dataset_names_its_path(scan: SimulatedScan, tmp_path: Path, removed: str) -> None:
    path = write_cxi(tmp_path / "broken.cxi", scan)
    with h5py.File(path, "a") as file:
        del file[removed]
        if removed == CxiPath.DETECTOR_DATA:
            del file[CxiPath.DATA]  # the soft link to it
        if removed == CxiPath.TRANSLATION:
            del file[CxiPath.DATA_TRANSLATION]
    with pytest.raises(ScanFileError, match=f"lacks {removed} "):
        read_cxi(path)


def test_translation_count_must_match_the_frames(scan: SimulatedScan, tmp_path: Path) -> None:
    path = write_cxi(tmp_path / "short.cxi", scan)
    with h5py.File(path, "a") as file:
        rows = file[CxiPath.TRANSLATION][()]
        del file[CxiPath.TRANSLATION]
        file[CxiPath.TRANSLATION] = rows[:-3]
    with pytest.raises(ScanFileError, match=r"shape \(67, 3\) but the file holds 70 frames"):
        read_cxi(path)


@pytest.mark.parametrize(
    ("factor", "unit"), [(1e3, "millimetres"), (1e6, "micrometres"), (1e9, "nanometres")]
)
def test_positions_in_the_wrong_unit_are_refused(
    scan: SimulatedScan, tmp_path: Path, factor: float, unit: str
) -> None:
    path = write_cxi(tmp_path / "units.cxi", scan)
    with h5py.File(path, "a") as file:
        file[CxiPath.TRANSLATION][...] *= factor  # stored in mm, µm or nm, labelled metres
    with pytest.raises(PositionError) as caught:
        read_cxi(path)
    message = str(caught.value)
    assert CxiPath.TRANSLATION in message and "implausibly large" in message
    assert f"likely stored in {unit}" in message and f"× {1 / factor:g}" in message
    # The message names the offending value: the median distance between neighbours, in "metres".
    step_m = float(message.split("median ")[1].split(" m apart")[0])
    assert 0.2e-6 * factor < step_m < 2e-6 * factor  # the simulated step is 8.4 px of 58.7 nm


def test_metres_labelled_as_nanometres_are_refused(scan: SimulatedScan, tmp_path: Path) -> None:
    path = write_cxi(tmp_path / "units.cxi", scan)
    with h5py.File(path, "a") as file:
        file[CxiPath.TRANSLATION].attrs["units"] = "nm"
    with pytest.raises(PositionError, match=r"implausibly small.*units attribute"):
        read_cxi(path)


@pytest.mark.parametrize(
    ("path", "value", "hint"),
    [
        (CxiPath.ENERGY, 8800.0, "looks like eV"),
        (CxiPath.DISTANCE, 2000.0, "looks like millimetres"),
        (CxiPath.X_PIXEL_SIZE, 75.0, "looks like micrometres"),
    ],
)
def test_geometry_in_the_wrong_unit_is_refused(
    scan: SimulatedScan, tmp_path: Path, path: str, value: float, hint: str
) -> None:
    cxi = write_cxi(tmp_path / "geometry.cxi", scan)
    with h5py.File(cxi, "a") as file:
        file[path][...] = value
        if path == CxiPath.X_PIXEL_SIZE:
            file[CxiPath.Y_PIXEL_SIZE][...] = value
    with pytest.raises(ScanFileError, match=f"{path} gives .*{hint}"):
        read_cxi(cxi)


def test_format_detection(scan: SimulatedScan, tmp_path: Path) -> None:
    assert detect_format(write_cxi(tmp_path / "a.cxi", scan)) == "cxi"
    assert detect_format(write_nxmx(tmp_path / "b_master.h5", scan, 100)) == "nxmx"
    with h5py.File(tmp_path / "other.h5", "w") as file:
        file["image"] = np.zeros(3)
    with pytest.raises(ScanFileError, match=r"neither CXI .* holds \['image'\]"):
        read_recorded_scan(tmp_path / "other.h5")
    (tmp_path / "notes.txt").write_text("not HDF5")
    with pytest.raises(ScanFileError, match=r"cannot open .*notes\.txt as HDF5"):
        read_recorded_scan(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="is CXI"):
        read_recorded_scan(tmp_path / "a.cxi", positions_m=scan.positions_m)


def test_frames_travel_as_the_nearest_stream_v2_dtype() -> None:
    assert wire_dtype(np.dtype(np.uint16)) == np.dtype("<u2")
    assert wire_dtype(np.dtype(">u2")) == np.dtype("<u2")
    assert wire_dtype(np.dtype(np.float64)) == np.dtype("<f4")
    assert wire_dtype(np.dtype(np.int16)) == np.dtype("<i4")
    with pytest.raises(ScanFileError, match="complex"):
        wire_dtype(np.dtype(np.complex64))

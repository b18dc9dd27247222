"""``--probe`` and the geometry flags of ``run`` and ``replay``: written into the topology and checked when
the pipeline loads, so a probe or mask that cannot be used stops the command before any worker starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phasestream.apps.scan_options import ScanOptions, with_scan_options
from phasestream.errors import ConfigError
from phasestream.runtime.config import load_pipeline
from phasestream.simulators.beamline_scans import BeamlineCase, simulate_beamline_scan
from phasestream.simulators.foreign_layouts import ForeignLayout, write_foreign_cxi

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_options_reach_the_refine_and_ingest_stages(tmp_path: Path) -> None:
    np.save(tmp_path / "probe.npy", np.ones((32, 32), np.complex64))
    np.save(tmp_path / "mask.npy", np.zeros((64, 64), bool))
    options = ScanOptions(
        initial_probe=str(tmp_path / "probe.npy"),
        energy_kev=9.1,
        beam_centre_px=(30.0, 34.0),
        window_px=32,
        mask_file=str(tmp_path / "mask.npy"),
    )
    pipeline = with_scan_options(load_pipeline(DEPLOY / "live.yaml"), options)
    refine, ingest = pipeline.stage("refine").config, pipeline.stage("ingest").config
    assert refine["initial_probe"] == str(tmp_path / "probe.npy")
    assert ingest["geometry"] == {
        "energy_kev": 9.1,
        "beam_centre_px": (30.0, 34.0),
        "window_px": 32,
        "mask_file": str(tmp_path / "mask.npy"),
    }
    assert pipeline.stage("binning").config == load_pipeline(DEPLOY / "live.yaml").stage("binning").config


@pytest.mark.parametrize(
    ("probe", "named"),
    [
        (np.full((32, 32), np.nan + 1j, np.complex64), "finite"),
        (np.zeros((32, 32), np.complex64), "power"),
        (np.ones((2, 2, 2, 2, 32), np.complex64), "shape"),
    ],
)
def test_a_probe_that_cannot_be_used_is_refused_at_load(
    tmp_path: Path, probe: np.ndarray, named: str
) -> None:
    path = tmp_path / "probe.npy"
    np.save(path, probe)
    with pytest.raises(ConfigError, match=named) as error:
        with_scan_options(load_pipeline(DEPLOY / "live.yaml"), ScanOptions(initial_probe=str(path)))
    assert str(path) in str(error.value)


def test_bad_geometry_options_are_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="energy_kev"):
        with_scan_options(load_pipeline(DEPLOY / "live.yaml"), ScanOptions(energy_kev=8800.0))
    with pytest.raises(ConfigError, match="mask_file"):
        with_scan_options(
            load_pipeline(DEPLOY / "live.yaml"), ScanOptions(mask_file=str(tmp_path / "no.npy"))
        )


@pytest.mark.slow
def test_replay_refuses_a_bad_probe_before_starting_anything(tmp_path: Path) -> None:
    scan = simulate_beamline_scan(BeamlineCase.FILL_30, 8)
    path = write_foreign_cxi(
        tmp_path / "scan.cxi", scan, ForeignLayout.CXIDB, float_intensities=True, with_probe=False
    )
    np.save(tmp_path / "probe.npy", np.zeros((64, 64), np.complex64))
    command = [sys.executable, "-m", "phasestream", "replay", str(path), "--pipeline"]
    command += ["--probe", str(tmp_path / "probe.npy"), "--out", str(tmp_path / "out")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "probe.npy" in completed.stderr and "power" in completed.stderr
    assert not (tmp_path / "out" / "run").exists() or not any((tmp_path / "out" / "run").glob("*.log"))

"""The command line a newcomer meets: every command is listed, errors name the problem and exit 2, and each
command hands the library typed options, never the parsed namespace."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import phasestream.apps.demo
import phasestream.apps.replay.session
import phasestream.apps.viewer.app
from phasestream.apps.cli.main import main
from phasestream.apps.demo import DemoOptions
from phasestream.apps.replay.replay import ReplayRate
from phasestream.apps.replay.session import IntoPipeline, ReplayOptions, ScanSource
from phasestream.apps.scan_options import ScanOptions
from phasestream.formats.units import LengthUnit

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(autouse=True)
def sigterm_handler_kept() -> Iterator[None]:
    """``main()`` turns SIGTERM into KeyboardInterrupt for some commands; put back pytest's handler."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _called_with(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[tuple[Any, ...]]:
    """Replace ``module.name`` by a recorder of its arguments that returns 0."""
    calls: list[tuple[Any, ...]] = []

    def record(*args: Any, **kwargs: Any) -> int:
        calls.append((*args, kwargs))
        return 0

    monkeypatch.setattr(module, name, record)
    return calls


def test_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "phasestream", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "run", "simulate", "replay", "view", "stage", "keys", "bench", "train"):
        assert f"    {command}" in result.stdout
    assert "bluesky-bridge" in result.stdout and "bluesky-tiled-writer" in result.stdout


def test_unknown_stage_in_a_pipeline_exits_2_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "refin", "--pipeline", str(DEPLOY / "demo.yaml")]) == 2
    assert "no stage named 'refin'" in capsys.readouterr().err


def test_missing_pipeline_file_says_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such.yaml"]) == 2
    assert "does not exist; see deploy/*.yaml" in capsys.readouterr().err


def test_replay_without_a_source_exits_2_naming_both_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "--as-fast-as-possible"]) == 2
    assert "give either a scan file (CXI or NXmx master) or --tiled-run" in capsys.readouterr().err


def test_demo_options_arrive_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _called_with(monkeypatch, phasestream.apps.demo, "run_demo")
    assert main(["demo", "--large", "--rate-hz", "12.5", "--out", str(tmp_path)]) == 0
    ((options, kwargs),) = calls
    assert kwargs == {}
    assert options == DemoOptions(out=tmp_path, large=True, rate_hz=12.5)
    assert options.positions == 900
    assert DemoOptions(n_positions=7, large=True).positions == 7


def test_replay_options_arrive_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _called_with(monkeypatch, phasestream.apps.replay.session, "run_replay")
    argv = ["replay", "scan.cxi", "--rate-hz", "0", "--no-progress", "--scan-uid", "u1"]
    assert (
        main([*argv, "--pipeline", "--out", str(tmp_path), "--beam-centre", "3", "4", "--probe", "p.npy"])
        == 0
    )
    assert main(["replay", "--tiled-run", "http://h:1/r", "--motor-unit", "mm", "--as-fast-as-possible"]) == 0
    (file_source, options, into), (run_source, fast, no_pipeline) = (call[:3] for call in calls)
    assert file_source == ScanSource(file=Path("scan.cxi"))
    # A rate of 0 Hz reaches the library, which refuses it, rather than meaning "as recorded".
    assert options == ReplayOptions(rate=0.0, scan_uid="u1", progress=False)
    assert into == IntoPipeline(
        tmp_path, scan_options=ScanOptions(initial_probe="p.npy", beam_centre_px=(3, 4))
    )
    assert run_source.tiled_run == "http://h:1/r" and run_source.motor_unit is LengthUnit.MILLIMETRE
    assert fast.rate is ReplayRate.MAX and no_pipeline is None


def test_view_options_arrive_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _called_with(monkeypatch, phasestream.apps.viewer.app, "run_viewer")
    assert main(["view", "--tiled-uri", "http://t:8000", "--metrics", "9101", "h:9102", "--scan", "s"]) == 0
    ((kwargs,),) = calls
    assert kwargs == {
        "tiled_uri": "http://t:8000",
        "tiled_api_key_file": None,
        "metrics_urls": ("9101", "h:9102"),
        "port": 0,
        "scan_uid": "s",
    }

"""The command line a newcomer meets: every command is listed, errors name the problem and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phasestream.apps.cli.main import main

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "phasestream", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "run", "simulate", "stage", "bench"):
        assert f"    {command}" in result.stdout


def test_unknown_stage_in_a_pipeline_exits_2_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stage", "refin", "--pipeline", str(DEPLOY / "demo.yaml")]) == 2
    assert "no stage named 'refin'" in capsys.readouterr().err


def test_missing_pipeline_file_says_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such.yaml"]) == 2
    assert "does not exist; see deploy/*.yaml" in capsys.readouterr().err

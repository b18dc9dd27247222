"""docs/write-a-stage.md works as written: its files, put in a folder, make a stage that runs in a pipeline.

The guide marks each file it shows with a ``<!-- file: NAME -->`` line right before the code block. These
tests write every marked block into a fresh folder on ``sys.path`` and check that the topology names a stage
that imports and accepts its config (fast), then run the guide's own test, which launches the pipeline.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from phasestream.runtime.config import load_pipeline
from phasestream.runtime.registry import STAGES, resolve_stage
from phasestream.runtime.stage import Stage

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "write-a-stage.md"
_FILE_BLOCK = re.compile(r"^<!-- file: (\S+) -->\n```\w*\n(.*?)^```$", re.M | re.S)
GUIDE_FILES = ("bright_frames.py", "bright.yaml", "test_bright_frames.py")


def guide_files() -> dict[str, str]:
    """The guide's marked code blocks by file name."""
    files: dict[str, str] = {}
    for name, text in _FILE_BLOCK.findall(GUIDE.read_text()):
        assert name not in files, f"{GUIDE} marks two blocks as {name}"
        files[name] = text
    return files


@pytest.fixture
def guide_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The guide's files written into a folder that is first on ``sys.path``."""
    folder = tmp_path / "guide"
    folder.mkdir()
    for name, text in guide_files().items():
        (folder / name).write_text(text)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for module in ("bright_frames", "test_bright_frames"):
        sys.modules.pop(module, None)  # the next test imports its own copy


def test_the_guide_marks_its_three_files() -> None:
    assert sorted(guide_files()) == sorted(GUIDE_FILES)


def test_the_topology_names_a_stage_that_takes_its_config(guide_folder: Path) -> None:
    pipeline = load_pipeline(guide_folder / "bright.yaml", run_dir=guide_folder / "run")
    custom = [spec for spec in pipeline.stages if spec.stage not in STAGES]
    assert [spec.stage for spec in custom] == ["bright_frames:BrightFrames"]
    stage_class = resolve_stage(custom[0].stage)
    assert issubclass(stage_class, Stage)
    config = stage_class.Config.model_validate(custom[0].config)
    assert config.min_photons == 1000


@pytest.mark.slow
def test_the_guides_test_passes(guide_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guide's test, run as its reader would: it starts the launcher, the stage and a simulated SELUN."""
    path = guide_folder / "test_bright_frames.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert len(tests) == 1, f"the guide's test module should hold one test, not {len(tests)}"
    run_folder = tmp_path / "t"
    run_folder.mkdir()
    tests[0](run_folder, monkeypatch)

"""The wheel works on its own: built, installed outside the checkout, run from another directory, and
reading nothing from the checkout (topologies, weights and viewer assets are package data)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Installed in every Python process of the run (the demo's stage workers too): records each file opened
# inside the checkout, except the virtual environment that holds the dependencies.
AUDIT_SITECUSTOMIZE = """
import json, os, sys
_repo = os.environ["PHASESTREAM_AUDIT_REPO"]
_allowed = tuple(os.environ["PHASESTREAM_AUDIT_ALLOWED"].split(os.pathsep))
_log = os.environ["PHASESTREAM_AUDIT_LOG"]

def _audit(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.realpath(os.fsdecode(args[0]))
    if path.startswith(_repo + os.sep) and not path.startswith(_allowed):
        with open(_log, "a") as log:
            log.write(json.dumps(path) + "\\n")

# A fresh environment has no editable install of the checkout: drop its path entries before anything
# is imported, so only the wheel and the dependencies can be found.
sys.path[:] = [
    entry for entry in sys.path
    if not entry
    or not os.path.realpath(entry).startswith(_repo + os.sep)
    or os.path.realpath(entry).startswith(_allowed)
]
sys.addaudithook(_audit)
"""


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel from a copy of the tracked files and installed into a fresh folder."""
    workdir = tmp_path_factory.mktemp("wheel")
    source = workdir / "source"
    tracked = (
        subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    wheels = workdir / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True
    )
    (wheel,) = wheels.glob("phasestream-*.whl")
    site = workdir / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    audit = workdir / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    return workdir


def _run_installed(
    workdir: Path, args: list[str], timeout_s: float
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    log = workdir / "opened-in-checkout.jsonl"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(workdir / "audit"), str(workdir / "site")]),
        "PHASESTREAM_AUDIT_REPO": str(REPO),
        "PHASESTREAM_AUDIT_ALLOWED": os.pathsep.join([os.path.realpath(sys.prefix) + os.sep]),
        "PHASESTREAM_AUDIT_LOG": str(log),
    }
    code = (
        "import sys, phasestream; "
        "assert phasestream.__file__.startswith(sys.argv[1]), phasestream.__file__; "
        "from phasestream.apps.cli.main import main; sys.exit(main(sys.argv[2:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "site"), *args],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    opened = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, opened


@pytest.mark.slow
def test_the_installed_wheel_holds_topologies_weights_and_viewer_assets(installed_wheel: Path) -> None:
    site = installed_wheel / "site" / "phasestream"
    for shipped in [
        "deploy/demo.yaml",
        "deploy/replay.yaml",
        "models/weights/autophasenn_2d_selun192.pt",
        "apps/viewer/static/index.html",
        "py.typed",
    ]:
        assert (site / shipped).is_file(), shipped


@pytest.mark.slow
def test_replay_help_runs_from_the_wheel_without_the_checkout(installed_wheel: Path) -> None:
    done, opened = _run_installed(installed_wheel, ["replay", "--help"], timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert "--probe" in done.stdout
    assert opened == []


@pytest.mark.slow
def test_the_demo_runs_from_the_wheel_and_reads_nothing_in_the_checkout(installed_wheel: Path) -> None:
    done, opened = _run_installed(installed_wheel, ["demo", "--out", "demo-out"], timeout_s=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (installed_wheel / "elsewhere" / "demo-out").is_dir()
    assert opened == [], f"read from the checkout: {sorted(set(opened))[:10]}"

"""Fixtures shared by the test modules: one torch thread, a real Tiled server, a free port, and a launched
pipeline fed by the scan simulator.

Tests that start several processes or run for seconds carry the ``slow`` mark; ``python -m pytest`` leaves
them out and ``python -m pytest -m "slow or not slow"`` runs everything.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from phasestream.apps.launch.launcher import Launcher
from phasestream.apps.tiled_server import EmbeddedTiledServer, generate_api_key
from phasestream.runtime.config import PipelineConfig, StageSpec, validate_pipeline

Event = dict[str, Any]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test, then back to the previous count.

    The machine is shared: small convolutions and FFTs gain nothing from a second thread while other
    tests or stage processes busy the other core, and spinning threads can make them many times slower.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch  # here: modules that never touch torch do not pay for its import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiled_server(tmp_path: Path) -> Iterator[EmbeddedTiledServer]:
    """A writable Tiled server on a free loopback port with a fresh API key (``.uri``, ``.api_key``),
    its catalog under the test's tmp_path, stopped after the test."""
    with EmbeddedTiledServer(tmp_path / "tiled", api_key=generate_api_key()) as server:
        yield server


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that nothing listens on now: a Tiled URI that is down, or a port to bind."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def short_run_dir() -> Iterator[Path]:
    """A run folder under /tmp, removed afterwards: ipc:// socket paths must stay under 107 bytes, which
    pytest's tmp_path can exceed."""
    run_dir = Path(tempfile.mkdtemp(prefix="ps-test-", dir="/tmp"))
    yield run_dir
    shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class RunningPipeline:
    """A launched pipeline whose detector sockets are ipc:// endpoints in ``run_dir``."""

    config: PipelineConfig
    launcher: Launcher
    run_dir: Path

    def simulate_command(self, scan_file: Path, scan_uid: str, *options: str) -> list[str]:
        """The ``phasestream simulate`` command line that sends ``scan_file`` to this pipeline's detector
        sockets as scan ``scan_uid``; ``options`` are further flags (``--rate-hz``)."""
        detector = self.config.detector
        return [
            sys.executable, "-m", "phasestream", "simulate", "--from", str(scan_file),
            "--data-endpoint", detector.data_endpoint, "--positions-endpoint", detector.positions_endpoint,
            "--scan-uid", scan_uid, "--no-progress", *options,
        ]  # fmt: skip

    def until_published(
        self, timeout_s: float, on_event: Callable[[Event], None] | None = None
    ) -> dict[str, Event]:
        """The ``scan_end`` event of each worker, by sender, up to publish.0's; ``on_event`` sees every
        control event on the way. A worker that died or no scan end from publish.0 in time fails the test."""
        ends: dict[str, Event] = {}
        for event in self.launcher.events(timeout_s=timeout_s):
            assert event["event"] != "died", event
            if on_event is not None:
                on_event(event)
            if event["event"] == "scan_end":
                ends[event["sender"]] = event
            if "publish.0" in ends:
                return ends
        pytest.fail(f"publish.0 reported no scan end within {timeout_s} s; ends so far: {sorted(ends)}")


LaunchPipeline = Callable[
    [str, Sequence[dict[str, Any] | StageSpec]], contextlib.AbstractContextManager[RunningPipeline]
]


@pytest.fixture
def launch_pipeline(short_run_dir: Path, tiled_server: EmbeddedTiledServer) -> LaunchPipeline:
    """Start a pipeline of the given stages that publishes to ``tiled_server``, for a ``with`` block.

    ``launch_pipeline(name, stages)`` takes the stages as in a topology file (dicts or ``StageSpec``),
    runs them in ``short_run_dir`` (also where a test puts its scan file) with ipc:// detector sockets,
    and stops every worker on leaving the block, so their exit codes can be checked after it.
    """

    @contextlib.contextmanager
    def launch(name: str, stages: Sequence[dict[str, Any] | StageSpec]) -> Iterator[RunningPipeline]:
        config = validate_pipeline(
            {
                "name": name,
                "run_dir": str(short_run_dir),
                "tiled": {"uri": tiled_server.uri, "api_key": tiled_server.api_key},
                "detector": {
                    "data_endpoint": f"ipc://{short_run_dir}/det.sock",
                    "positions_endpoint": f"ipc://{short_run_dir}/pos.sock",
                },
                "stages": list(stages),
            }
        )
        launcher = Launcher(config)
        launcher.start()
        try:
            yield RunningPipeline(config, launcher, short_run_dir)
        finally:
            launcher.stop()

    return launch

"""Stages on three hosts over tcp: network namespaces on this machine, one launcher per host.

The hosts are Linux network namespaces joined by veth pairs on a bridge (``tests/netns_hosts.py``): each
has its own interfaces, routes and 127.0.0.1, so a stage on one reaches another only over the bridge,
through the kernel's TCP stack. The detector host runs the simulated SELUN and ingest, the compute host
two binning workers and the AutoPhaseNN inversion, the GPU host refine and publish, which writes to the
embedded Tiled server in the root namespace. Each host's launcher runs in its namespace with
``Launcher(pipeline, host=NAME)``, what ``phasestream run PIPELINE --host NAME`` does. With ``curve:`` every
tcp socket is CurveZMQ, and peers
without the right key are shown to get nothing into a stage.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml
import zmq
from netns_hosts import NetnsHost, netns_available, netns_hosts, tcp_forward
from tiled.client import from_uri
from zmq.utils.monitor import recv_monitor_message

from phasestream.apps.tiled_server import EmbeddedTiledServer
from phasestream.runtime.accounting import unaccounted_frames
from phasestream.runtime.curve import PUBLIC_DIR, generate_keys, key_names, load_keypair, load_public_key
from phasestream.simulators.scan_file import save_scan
from phasestream.simulators.scan_simulation import ScanSimulationConfig, simulate_scan

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(netns_available() is not None, reason=str(netns_available())),
]

N_POSITIONS = 60
BINNING_PORT, REFINE_PORT, PUBLISH_PORT, INVERSION_PORT = 41000, 42000, 43000, 44000
# The generic 2D weights: trained for 64-pixel frames, as this scan's (the demo weights expect 192 binned).
WEIGHTS_2D = Path(__file__).resolve().parents[1] / "models" / "weights" / "autophasenn_2d.pt"
EVENT_TIMEOUT_S = 240
MONITOR_TIMEOUT_MS = 10_000
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

# One host's launcher, as `phasestream run PIPELINE --host NAME` runs it: its events go to stdout as JSON
# lines (the first, "up", once every worker of the host is ready), and SIGTERM stops it.
HOST_LAUNCHER = """
import json, signal, sys
from phasestream.runtime.config import load_pipeline
from phasestream.apps.launch.launcher import Launcher

stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
launcher = Launcher(load_pipeline(sys.argv[1]), host=sys.argv[2])
launcher.start()
ports = {label: worker.metrics_port for label, worker in launcher.workers.items()}
print(json.dumps({"event": "up", "metrics_ports": ports}), flush=True)
try:
    while not stopping:
        event = launcher.next_event(timeout_s=0.2)
        if event is not None:
            print(json.dumps(event, default=str), flush=True)
finally:
    launcher.stop()
    codes = {label: worker.process.returncode for label, worker in launcher.workers.items()}
    print(json.dumps({"event": "stopped", "exit_codes": codes}), flush=True)
"""


@pytest.fixture(scope="module")
def small_scan():
    config = ScanSimulationConfig(
        detector_size_px=64,
        probe_diameter_px=24,
        probe_bright_field_diameter_px=32,
        n_positions=N_POSITIONS,
        seed=3,
    )
    return simulate_scan(config)


def _topology(hosts: dict[str, NetnsHost], run_dir: Path, tiled_uri: str, api_key: str) -> dict:
    def metrics_on(host: str) -> dict:
        # /metrics on the host's own address, so that the test (and a Prometheus elsewhere) can scrape it.
        return {"host": host, "metrics_address": hosts[host].address}

    return {
        "name": "multihost",
        "run_dir": str(run_dir),
        "tiled": {"uri": tiled_uri, "api_key": api_key},
        "hosts": {name: {"address": host.address} for name, host in hosts.items()},
        "stages": [
            {"name": "ingest", "stage": "ingest", **metrics_on("detector"), "config": {"batch_size": 8}},
            {"name": "binning", "stage": "binning", "workers": 2, "port": BINNING_PORT}
            | metrics_on("compute"),
            {
                "name": "inversion",
                "stage": "inversion",
                "port": INVERSION_PORT,
                **metrics_on("compute"),
                "config": {"weights_path": str(WEIGHTS_2D), "bin_factor": 1, "batch_size": 8},
            },
            {
                "name": "refine",
                "stage": "refine",
                "port": REFINE_PORT,
                **metrics_on("gpu"),
                "config": {
                    "min_positions": 20,
                    "epochs_after_scan": 4,
                    "emit_every_epochs": 2,
                    "probe_search_epochs": 2,
                    "execution": {"batch_size": 16, "num_threads": 1},
                },
            },
            {"name": "publish", "stage": "publish", "port": PUBLISH_PORT, **metrics_on("gpu")},
        ],
    }


class HostLaunchers:
    """One launcher process per host, in its namespace; their events merged into one queue."""

    def __init__(self, hosts: dict[str, NetnsHost], pipeline_file: Path) -> None:
        self.events: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.processes: dict[str, subprocess.Popen[str]] = {}
        for name, host in hosts.items():
            command = host.command([sys.executable, "-c", HOST_LAUNCHER, str(pipeline_file), name])
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            self.processes[name] = process
            threading.Thread(target=self._read, args=(name, process), daemon=True).start()

    def _read(self, host: str, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.events.put((host, json.loads(line)))
        self.events.put((host, {"event": "exited", "code": process.wait()}))

    def next(self) -> tuple[str, dict]:
        host, event = self.events.get(timeout=EVENT_TIMEOUT_S)
        assert event["event"] not in ("died", "exited"), (host, event)
        return host, event

    def wait_until_up(self) -> dict[str, int]:
        """Every host's launcher has had every ``ready``: the metrics port of each worker."""
        ports: dict[str, int] = {}
        waiting = set(self.processes)
        while waiting:
            host, event = self.next()
            if event["event"] == "up":
                waiting.discard(host)
                ports.update(event["metrics_ports"])
        return ports

    def stop(self) -> dict[str, int]:
        """SIGTERM each launcher (it stops its workers); the exit codes of every worker."""
        for process in self.processes.values():
            process.terminate()
        codes: dict[str, int] = {}
        for process in self.processes.values():
            process.wait(60)
        while not self.events.empty():
            _, event = self.events.get()
            if event["event"] == "stopped":
                codes.update(event["exit_codes"])
        return codes


def _scrape(address: str, port: int) -> dict[str, float]:
    text = httpx.get(f"http://{address}:{port}/metrics", timeout=5, trust_env=False).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("phasestream_"))
    return {name: float(value) for name, value in samples}


def _sockets(host: NetnsHost, *filters: str) -> list[tuple[str, str]]:
    """(local, peer) of the host's tcp sockets as ``ss`` lists them, e.g. ``-l`` for listening ones."""
    out = subprocess.run(host.command(["ss", "-Htn", *filters]), check=True, capture_output=True, text=True)
    rows = [line.split() for line in out.stdout.splitlines()]
    return [(row[-2], row[-1]) for row in rows]


def _refused(sock: zmq.Socket, endpoint: str) -> tuple[int, int]:
    """Connect ``sock`` to ``endpoint``, send a message, and return how its handshake failed."""
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    sock.connect(endpoint)
    sock.send_multipart([b'{"kind": "scan_end"}', b"not from the pipeline"], flags=zmq.NOBLOCK)
    assert monitor.poll(MONITOR_TIMEOUT_MS), "no handshake event within 10 s"
    event = recv_monitor_message(monitor)
    monitor.close(linger=0)
    return event["event"], event["value"]


def _intrude(keys_dir: Path, outsider_dir: Path, endpoint: str) -> None:
    """A plain PUSH and a CURVE client with an unauthorised key, both told no during the handshake."""
    context = zmq.Context()
    try:
        plain = context.socket(zmq.PUSH)
        event, _ = _refused(plain, endpoint)
        # The server finds the mechanism mismatch; the client sees it as such or as a bare close.
        assert event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        outsider = context.socket(zmq.PUSH)
        keypair = load_keypair(outsider_dir, "binning")  # named like a stage, but not the pipeline's key
        outsider.curve_secretkey, outsider.curve_publickey = keypair.secret_key, keypair.public_key
        outsider.curve_serverkey = load_public_key(keys_dir / PUBLIC_DIR, "refine")
        assert _refused(outsider, endpoint) == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400)
    finally:
        context.destroy(linger=0)


def _log_tails(run_dir: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
        for path in sorted((run_dir / "logs").glob("*.log"))
    )


@pytest.fixture
def hosts() -> Iterator[dict[str, NetnsHost]]:
    with netns_hosts(["detector", "compute", "gpu"]) as made:
        yield made


@pytest.mark.parametrize("curve", [False, True], ids=["tcp", "curve"])
def test_scan_crosses_three_hosts_into_tiled(
    small_scan, hosts, short_run_dir: Path, tiled_server: EmbeddedTiledServer, tmp_path: Path, curve: bool
) -> None:
    run_dir, server, api_key = short_run_dir, tiled_server, tiled_server.api_key
    scan_file = run_dir / "scan.npz"
    save_scan(small_scan, scan_file)
    scan_uid = str(uuid.uuid4())
    bridge = "10.77.0.254"  # the root namespace on the hosts' bridge (netns_hosts)
    with ExitStack() as stack:
        tiled_port = stack.enter_context(tcp_forward(bridge, int(server.uri.rsplit(":", 1)[1])))
        topology = _topology(hosts, run_dir, f"http://{bridge}:{tiled_port}", api_key)
        if curve:
            keys_dir = tmp_path / "keys"
            generate_keys(keys_dir, key_names([s["name"] for s in topology["stages"]]))
            generate_keys(tmp_path / "outsider", ["binning"])
            topology["curve"] = {"keys_dir": str(keys_dir)}
        pipeline_file = run_dir / "multihost.yaml"
        pipeline_file.write_text(yaml.safe_dump(topology))

        launchers = HostLaunchers(hosts, pipeline_file)
        exit_codes: dict[str, int] = {}
        try:
            ports = launchers.wait_until_up()
            gpu = hosts["gpu"]
            refine_inbox = f"tcp://{gpu.address}:{REFINE_PORT}"
            if curve:
                before = _scrape(gpu.address, ports["refine.0"])
                _intrude(keys_dir, tmp_path / "outsider", refine_inbox)
                # Refused during the handshake: refine neither received nor rejected anything.
                assert _scrape(gpu.address, ports["refine.0"]) == before

            emitter = subprocess.Popen(
                hosts["detector"].command(
                    [
                        sys.executable, "-m", "phasestream", "simulate", "--from", str(scan_file),
                        "--scan-uid", scan_uid, "--rate-hz", "60", "--no-progress",
                    ]
                )
            )  # fmt: skip
            ends: dict[str, dict] = {}
            while "publish.0" not in ends:
                _, event = launchers.next()
                if event["event"] == "scan_end":
                    ends[event["sender"]] = event
            assert emitter.wait(30) == 0

            # The inboxes listen on their hosts' addresses, and what reached them came from the other hosts.
            for host, inbox_ports in (("compute", (BINNING_PORT, BINNING_PORT + 1)), ("gpu", (REFINE_PORT,))):
                address = hosts[host].address
                listening = {local for local, _ in _sockets(hosts[host], "-l")}
                assert {f"{address}:{port}" for port in inbox_ports} <= listening
                assert not {f"127.0.0.1:{port}" for port in inbox_ports} & listening
            upstream = {"compute": hosts["detector"].address, "gpu": hosts["compute"].address}
            for host, inbox_ports in (("compute", (BINNING_PORT, BINNING_PORT + 1)), ("gpu", (REFINE_PORT,))):
                peers = {
                    peer.rsplit(":", 1)[0]
                    for local, peer in _sockets(hosts[host], "state", "established")
                    if int(local.rsplit(":", 1)[1]) in inbox_ports
                }
                assert peers == {upstream[host]}, (host, peers)
            refine_metrics = _scrape(gpu.address, ports["refine.0"])
        except BaseException:
            print(_log_tails(run_dir))
            raise
        finally:
            exit_codes = launchers.stop()

        node = from_uri(server.uri, api_key=api_key)["reconstructions"][scan_uid]
        metadata = dict(node.metadata)
        object_shape = node["object"].shape

    assert sorted(exit_codes) == [
        "binning.0",
        "binning.1",
        "ingest.0",
        "inversion.0",
        "publish.0",
        "refine.0",
    ]
    assert set(exit_codes.values()) == {0}
    final = ends["publish.0"]
    assert final["frames_sent"] == N_POSITIONS
    assert unaccounted_frames(final["frames_sent"], final["accounting"]) == []
    assert sum(final["accounting"][f"binning.{w}"]["frames_received"] for w in (0, 1)) == N_POSITIONS
    assert final["accounting"]["inversion.0"]["frames_inverted"] == N_POSITIONS
    assert final["accounting"]["refine.0"]["frames_used"] == N_POSITIONS
    # Nothing but the scan reached refine (with curve, not the intruders' messages either).
    assert refine_metrics['phasestream_frames_received_total{stage="refine",worker="0"}'] == N_POSITIONS
    assert not any(name.startswith("phasestream_messages_rejected_total") for name in refine_metrics)
    assert metadata["status"] == "complete" and metadata["final"] is True
    assert len(object_shape) == 2

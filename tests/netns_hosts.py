"""Hosts made on this machine from Linux network namespaces, for tests that must cross a real network.

Each host is a namespace with its own loopback and one veth interface whose peer sits on a bridge in the
root namespace, so the hosts reach each other (and the root namespace reaches them) over 10.x.y.0/24
through the kernel's real TCP stack: separate routing tables, separate 127.0.0.1, nothing shared but the
filesystem. A process runs "on" a host with ``ip netns exec NAME ...``. Creating namespaces needs root
(CAP_SYS_ADMIN and CAP_NET_ADMIN); ``netns_available()`` says whether this machine allows it.

``tcp_forward`` makes a server that listens on the root namespace's 127.0.0.1 (the embedded Tiled server)
reachable from the hosts at the bridge address.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass


@dataclass(frozen=True)
class NetnsHost:
    name: str  # the stage-placement name tests use ("detector", "gpu", ...)
    namespace: str  # the kernel namespace, unique per test run
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not (for a skip message)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"psprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as error:
        return f"`ip netns add` failed: {error.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


@contextmanager
def netns_hosts(names: Sequence[str], subnet: str = "10.77.0") -> Iterator[dict[str, NetnsHost]]:
    """Namespaces ``names`` on one bridge, addresses ``subnet``.1, .2, ...; all removed on exit."""
    tag = uuid.uuid4().hex[:5]
    bridge = f"psbr{tag}"
    hosts: dict[str, NetnsHost] = {}
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        for index, name in enumerate(names, start=1):
            host = NetnsHost(name, f"ps{tag}{index}", f"{subnet}.{index}")
            outside, inside = f"psv{tag}{index}", f"psn{tag}{index}"
            _ip("netns", "add", host.namespace)
            hosts[name] = host
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inside)
            _ip("-n", host.namespace, "link", "set", inside, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for host in hosts.values():
            subprocess.run(["ip", "netns", "delete", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)


@contextmanager
def tcp_forward(listen_address: str, target_port: int) -> Iterator[int]:
    """Relay ``listen_address:<free port>`` to ``127.0.0.1:target_port``; yields the port to connect to."""
    listener = socket.create_server((listen_address, 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass  # the other direction closed both sockets
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", target_port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(source, sink), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join()
        listener.close()

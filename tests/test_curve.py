"""CurveZMQ: key files, and real tcp sockets on 127.0.0.1 where only authorised peers' messages arrive.

Whether a peer got in is read from the sockets' monitors (handshake succeeded or failed, and why), so no
test waits on a sleep: a message can only arrive over a connection whose handshake succeeded, and a
client refused by the authenticator (ZAP status 400) is disconnected and does not try again.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from phasestream.apps.keys import run_keys_generate
from phasestream.errors import ConfigError
from phasestream.runtime.config import PipelineConfig, validate_pipeline
from phasestream.runtime.curve import (
    PRIVATE_DIR,
    PUBLIC_DIR,
    CurveAuthenticator,
    CurveSettings,
    StageCurve,
    generate_keys,
    key_names,
    load_keypair,
    load_public_key,
    make_curve_client,
    make_curve_server,
)
from phasestream.runtime.registry import resolve_stage
from phasestream.runtime.stage import Stage
from phasestream.runtime.topology import place

TIMEOUT_MS = 10_000
HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
ZAP_DENIED = 400  # RFC 27: authentication failure


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """Keys for a pipeline's ``binning`` (server) and ``ingest`` (client), plus an outsider's."""
    generate_keys(tmp_path / "keys", ["binning", "ingest"])
    generate_keys(tmp_path / "outsider", ["ingest"])
    return tmp_path


class Server:
    """A CURVE PULL server on tcp://127.0.0.1 with a monitor on its handshakes."""

    def __init__(self, context: zmq.Context, keys_dir: Path, authenticator: CurveAuthenticator) -> None:
        self.sock = context.socket(zmq.PULL)
        make_curve_server(self.sock, load_keypair(keys_dir, "binning"), authenticator)
        self.monitor = self.sock.get_monitor_socket(HANDSHAKE_EVENTS)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.last_endpoint.decode()

    def next_handshake(self) -> tuple[int, int]:
        return _next_event(self.monitor)

    def receive(self) -> bytes:
        assert self.sock.poll(TIMEOUT_MS), "no message within 10 s"
        return self.sock.recv()


def _next_event(monitor: zmq.Socket) -> tuple[int, int]:
    """The next (event, value) from a socket monitor; value is the ZAP status or the errno."""
    assert monitor.poll(TIMEOUT_MS), "no socket event within 10 s"
    event = recv_monitor_message(monitor)
    return event["event"], event["value"]


def _client(context: zmq.Context, keys_dir: Path | None, server_key: bytes, endpoint: str) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.linger = 0
    if keys_dir is not None:
        make_curve_client(sock, load_keypair(keys_dir, "ingest"), server_key)
    sock.connect(endpoint)
    return sock


def _server_key(keys: Path) -> bytes:
    return load_public_key(keys / "keys" / PUBLIC_DIR, "binning")


# ---- key files ------------------------------------------------------------------------------------


def test_generated_keys_pair_up_and_the_secret_is_private(tmp_path: Path) -> None:
    written = generate_keys(tmp_path, key_names(["ingest", "refine"]))
    assert [p.name for p in written] == ["launcher.key_secret", "ingest.key_secret", "refine.key_secret"]
    assert stat.S_IMODE((tmp_path / PRIVATE_DIR).stat().st_mode) == 0o700
    for name in ("launcher", "ingest", "refine"):
        secret_file = tmp_path / PRIVATE_DIR / f"{name}.key_secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        public_text = (tmp_path / PUBLIC_DIR / f"{name}.key").read_text()
        assert "secret-key" not in public_text
        keypair = load_keypair(tmp_path, name)
        # The public key is the one the secret derives (Curve25519), and the public file agrees.
        assert zmq.curve_public(keypair.secret_key) == keypair.public_key
        assert load_public_key(tmp_path / PUBLIC_DIR, name) == keypair.public_key
        assert keypair.secret_key.decode() not in repr(keypair)
    assert sorted(p.name for p in (tmp_path / PRIVATE_DIR).iterdir()) == [p.name for p in sorted(written)]


def test_generate_never_overwrites_a_key(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["refine"])
    before = (tmp_path / PRIVATE_DIR / "refine.key_secret").read_bytes()
    with pytest.raises(ConfigError, match=r"already exist: .*refine\.key.*Remove them first"):
        generate_keys(tmp_path, ["ingest", "refine"])
    assert (tmp_path / PRIVATE_DIR / "refine.key_secret").read_bytes() == before
    assert not (tmp_path / PRIVATE_DIR / "ingest.key_secret").exists()
    with pytest.raises(ConfigError, match="may hold only"):
        generate_keys(tmp_path, ["../etc"])


def test_keys_generate_command_names_one_key_per_stage(tmp_path: Path, capsys) -> None:
    pipeline = Path(__file__).resolve().parents[1] / "deploy" / "live.yaml"
    assert run_keys_generate(tmp_path, ["viewer"], pipeline) == 0
    names = sorted(p.name.removesuffix(".key") for p in (tmp_path / PUBLIC_DIR).iterdir())
    assert names == ["binning", "ingest", "launcher", "publish", "refine", "viewer"]
    out = capsys.readouterr().out
    assert "refine" in out and "0600" in out
    for name in names:
        assert load_keypair(tmp_path, name).secret_key.decode() not in out


def test_unsafe_or_missing_keys_are_refused_with_the_fix(keys: Path) -> None:
    secret_file = keys / "keys" / PRIVATE_DIR / "ingest.key_secret"
    secret_file.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by other users \(mode 644\): chmod 600"):
        load_keypair(keys / "keys", "ingest")
    with pytest.raises(ConfigError, match="phasestream keys generate"):
        load_keypair(keys / "keys", "refine")
    # A public key file given where the secret is expected.
    public_only = keys / "keys" / PRIVATE_DIR / "viewer.key_secret"
    public_only.write_text((keys / "keys" / PUBLIC_DIR / "binning.key").read_text())
    public_only.chmod(0o600)
    with pytest.raises(ConfigError, match="no secret-key line"):
        load_keypair(keys / "keys", "viewer")
    with pytest.raises(ConfigError, match=r"copy refine\.key"):
        load_public_key(keys / "keys" / PUBLIC_DIR, "refine")


def test_authenticator_needs_keys_and_the_sockets_context(keys: Path, context: zmq.Context) -> None:
    (keys / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no authorised public keys \(\*\.key\)"):
        CurveAuthenticator(context, keys / "empty")
    other = zmq.Context()
    try:
        with CurveAuthenticator(other, keys / "keys" / PUBLIC_DIR) as authenticator:
            sock = context.socket(zmq.PULL)
            with pytest.raises(ConfigError, match=r"another zmq\.Context"):
                make_curve_server(sock, load_keypair(keys / "keys", "binning"), authenticator)
            sock.close(linger=0)
    finally:
        other.destroy(linger=0)


# ---- real sockets -------------------------------------------------------------------------------------


def test_authorised_peer_is_heard_and_an_unknown_key_never_is(keys: Path, context: zmq.Context) -> None:
    with CurveAuthenticator(context, keys / "keys" / PUBLIC_DIR) as authenticator:
        server = Server(context, keys / "keys", authenticator)
        outsider = _client(context, keys / "outsider", _server_key(keys), server.endpoint)
        outsider_events = outsider.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED
        )
        outsider.send(b"from an unknown key")
        assert server.next_handshake() == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, ZAP_DENIED)
        # The outsider is told why and dropped; with its only connection gone its message cannot arrive.
        assert _next_event(outsider_events) == (zmq.EVENT_HANDSHAKE_FAILED_AUTH, ZAP_DENIED)
        assert _next_event(outsider_events)[0] == zmq.EVENT_DISCONNECTED
        member = _client(context, keys / "keys", _server_key(keys), server.endpoint)
        member.send(b"from ingest")
        assert server.next_handshake()[0] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        assert server.receive() == b"from ingest"
        assert server.sock.poll(0) == 0
        for sock in (outsider, outsider_events, member, server.sock, server.monitor):
            sock.close(linger=0)


def test_plain_peer_without_curve_is_refused(keys: Path, context: zmq.Context) -> None:
    with CurveAuthenticator(context, keys / "keys" / PUBLIC_DIR) as authenticator:
        server = Server(context, keys / "keys", authenticator)
        plain = _client(context, None, b"", server.endpoint)
        plain.send(b"in the clear")
        assert server.next_handshake() == (
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH,
        )
        assert server.sock.poll(0) == 0
        for sock in (plain, server.sock, server.monitor):
            sock.close(linger=0)


def test_client_sends_nothing_to_a_server_with_another_key(keys: Path, context: zmq.Context) -> None:
    """Server authentication: an impostor holding another keypair on the expected address learns nothing."""
    with CurveAuthenticator(context, keys / "keys" / PUBLIC_DIR) as authenticator:
        impostor = Server(context, keys / "keys", authenticator)
        expected_key = load_public_key(keys / "outsider" / PUBLIC_DIR, "ingest")
        member = _client(context, keys / "keys", expected_key, impostor.endpoint)
        member.send(b"for the real binning only")
        event = impostor.next_handshake()
        assert event == (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
        assert impostor.sock.poll(0) == 0
        for sock in (member, impostor.sock, impostor.monitor):
            sock.close(linger=0)


def test_curve_server_fails_closed_without_an_authenticator(keys: Path, context: zmq.Context) -> None:
    """libzmq admits any CURVE client when no ZAP handler runs, unless the ZAP domain is enforced.

    The options ``make_curve_server`` sets go onto a socket in a context where no authenticator ever ran
    (stopping one instead races with libzmq's asynchronous unbinding of the ZAP endpoint).
    """
    keypair = load_keypair(keys / "keys", "binning")
    with CurveAuthenticator(context, keys / "keys" / PUBLIC_DIR) as authenticator:
        configured = context.socket(zmq.PULL)
        make_curve_server(configured, keypair, authenticator)
    bare_context = zmq.Context()
    try:
        server = bare_context.socket(zmq.PULL)
        server.curve_secretkey, server.curve_publickey = keypair.secret_key, keypair.public_key
        for option in (zmq.CURVE_SERVER, zmq.ZAP_DOMAIN, zmq.ZAP_ENFORCE_DOMAIN):
            server.setsockopt(option, configured.getsockopt(option))
        monitor = server.get_monitor_socket(HANDSHAKE_EVENTS)
        server.bind("tcp://127.0.0.1:*")
        member = _client(bare_context, keys / "keys", _server_key(keys), server.last_endpoint.decode())
        member.send(b"nobody checks me")
        # No ZAP handler to ask: the handshake fails instead of letting even a known peer in.
        assert _next_event(monitor)[0] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        assert server.poll(0) == 0
        for sock in (member, server, monitor, configured):
            sock.close(linger=0)
    finally:
        bare_context.destroy(linger=0)


def test_stage_curve_connects_two_stages_of_a_pipeline(keys: Path, context: zmq.Context) -> None:
    settings = CurveSettings(keys_dir=keys / "keys")
    binning, ingest = StageCurve(settings, context, "binning"), StageCurve(settings, context, "ingest")
    try:
        inbox = context.socket(zmq.PULL)
        binning.serve(inbox)
        inbox.bind("tcp://127.0.0.1:*")
        outlet = context.socket(zmq.PUSH)
        ingest.connect_to(outlet, "binning")
        outlet.connect(inbox.last_endpoint.decode())
        outlet.send_multipart([b"header", b"payload"])
        assert inbox.poll(TIMEOUT_MS)
        assert inbox.recv_multipart() == [b"header", b"payload"]
        for sock in (inbox, outlet):
            sock.close(linger=0)
    finally:
        binning.close()
        ingest.close()


def _tcp_pipeline(keys_dir: Path) -> PipelineConfig:
    hosts = {"here": {"address": "127.0.0.1"}}
    stages = [
        {"name": "ingest", "stage": "ingest", "host": "here"},
        {"name": "binning", "stage": "binning", "host": "here", "port": 41000},
    ]
    return validate_pipeline({"hosts": hosts, "curve": {"keys_dir": str(keys_dir)}, "stages": stages})


def test_a_stage_without_its_keys_stops_at_start_with_the_fix(tmp_path: Path) -> None:
    """Checked before any socket binds or any thread starts: the worker exits and the launcher says why."""
    keys_dir = tmp_path / "keys"
    pipeline = _tcp_pipeline(keys_dir)
    stage = resolve_stage("ingest").from_placement(place(pipeline, "ingest", 0), pipeline)
    with pytest.raises(ConfigError, match=r"no secret key .*ingest\.key_secret.*keys generate"):
        _run_in_thread(stage)
    generate_keys(keys_dir, ["ingest"])  # its own keypair, but not the public key of the stage it feeds
    with pytest.raises(ConfigError, match=r"no public key .*binning\.key: copy binning\.key"):
        _run_in_thread(stage)


def _run_in_thread(stage: Stage) -> None:
    """``stage.run()`` off the main thread, so that it leaves pytest's signal handlers alone."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            stage.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_MS / 1000)
    assert not thread.is_alive(), "the stage did not stop at start"
    if raised:
        raise raised[0]

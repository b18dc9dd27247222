"""CurveZMQ between stage hosts: key files, CURVE server and client sockets, and who may connect.

CurveZMQ (RFC 26, http://rfc.zeromq.org/spec:26) encrypts a ZMTP connection and authenticates both ends
with Curve25519 keypairs. The server proves its identity by its public key, which the client must know
beforehand; the client presents its own public key, which a ZAP handler (RFC 27) checks against the
authorised keys. Here the ZAP handler is pyzmq's ``ThreadAuthenticator``, allowing exactly the ``*.key``
files of one directory.

Keys are named after what holds them, so that they follow from the topology as endpoints do: one keypair
per stage (a stage's workers present it as the server of their inbox and as the client of the next
stage) and one for the launcher. ``phasestream keys generate DIR`` writes them as

    DIR/public/<name>.key           public key only: copy to every host of the pipeline
    DIR/private/<name>.key_secret   public and secret key, mode 0600: only on the hosts that run <name>

and ``DIR/public`` is then also the directory of authorised keys: a peer whose public key is not in it
cannot connect.

Two pitfalls this module closes (both checked in ``tests/test_curve.py``): without a ZAP handler libzmq
lets *any* CURVE client that knows the server's public key connect, so CURVE servers here set
``ZAP_ENFORCE_DOMAIN`` and refuse everyone until an authenticator runs; and the authenticator reads the
key directory once, when configured, swallowing errors, so the directory is checked here first.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import zmq
import zmq.auth
from pydantic import BaseModel, ConfigDict, Field
from zmq.auth.thread import ThreadAuthenticator

from phasestream.errors import ConfigError

PUBLIC_DIR = "public"
PRIVATE_DIR = "private"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
LAUNCHER_KEY = "launcher"
# One ZAP domain for every phasestream socket: the authenticator's key list applies to it.
ZAP_DOMAIN = "phasestream"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_GENERATE_FIX = "create it with `phasestream keys generate {dir} --name {name}`"


class CurveSettings(BaseModel):
    """CurveZMQ for a pipeline whose stages talk over tcp between hosts."""

    model_config = ConfigDict(extra="forbid")

    keys_dir: Path = Field(description="written by `phasestream keys generate`: public/ and private/")
    authorized_keys_dir: Path | None = Field(
        default=None, description="public keys of the peers allowed to connect; default keys_dir/public"
    )

    @property
    def authorized_dir(self) -> Path:
        return self.authorized_keys_dir or self.keys_dir / PUBLIC_DIR


@dataclass(frozen=True)
class CurveKeyPair:
    """Z85-encoded Curve25519 keys (40 bytes each). The secret never appears in a repr or a log."""

    public_key: bytes
    secret_key: bytes = field(repr=False)


def key_names(stage_names: Sequence[str]) -> list[str]:
    """The keypairs a pipeline needs: one per stage and one for the launcher's control socket."""
    return [LAUNCHER_KEY, *stage_names]


def generate_keys(directory: Path, names: Sequence[str]) -> list[Path]:
    """Write one keypair per name (``zmq.auth.create_certificates``); return the secret files written.

    Existing keys are never overwritten: a new keypair would silently lock out every host that holds the
    old public key. The private folder is 0700 and each secret file 0600, like ``~/.ssh``.
    """
    if not names:
        raise ConfigError("no key names given: pass --name NAME, or --pipeline FILE for one key per stage")
    for name in names:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"key name {name!r} may hold only letters, digits, '_', '.' and '-'")
    public_dir, private_dir = directory / PUBLIC_DIR, directory / PRIVATE_DIR
    taken = [
        path
        for name in names
        for path in (public_dir / f"{name}{PUBLIC_SUFFIX}", private_dir / f"{name}{SECRET_SUFFIX}")
        if path.exists()
    ]
    if taken:
        raise ConfigError(
            f"keys already exist: {', '.join(map(str, taken))}; they stay as they are. Remove them first "
            "to replace them, then copy the new public keys to every host of the pipeline"
        )
    public_dir.mkdir(parents=True, exist_ok=True)
    private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_dir.chmod(0o700)
    written = []
    for name in names:
        public_file, secret_file = zmq.auth.create_certificates(private_dir, name)
        # create_certificates writes both files with the umask's mode: the secret becomes 0600 before
        # anything else happens, and the public file moves to where peers' keys are collected.
        Path(secret_file).chmod(0o600)
        Path(public_file).replace(public_dir / f"{name}{PUBLIC_SUFFIX}")
        written.append(Path(secret_file))
    return written


def load_keypair(keys_dir: Path, name: str) -> CurveKeyPair:
    """This host's keypair ``name`` from ``keys_dir/private``; refuses a secret that others may read."""
    path = keys_dir / PRIVATE_DIR / f"{name}{SECRET_SUFFIX}"
    if not path.is_file():
        raise ConfigError(
            f"no secret key {path}: {_GENERATE_FIX.format(dir=keys_dir, name=name)} on one host and copy "
            f"{PRIVATE_DIR}/{name}{SECRET_SUFFIX} to the hosts that run {name!r}"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"secret key {path} is readable by other users (mode {mode:o}): chmod 600 {path}")
    public_key, secret_key = zmq.auth.load_certificate(path)
    if secret_key is None:
        raise ConfigError(f"{path} holds no secret-key line: use the {SECRET_SUFFIX} file that was generated")
    return CurveKeyPair(public_key=public_key, secret_key=secret_key)


def load_public_key(directory: Path, name: str) -> bytes:
    """The public key ``name`` from ``directory`` (``keys_dir/public`` or an authorised-keys folder)."""
    path = directory / f"{name}{PUBLIC_SUFFIX}"
    if not path.is_file():
        raise ConfigError(f"no public key {path}: copy {name}{PUBLIC_SUFFIX} from the host that generated it")
    try:
        public_key, _ = zmq.auth.load_certificate(path)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a ZeroMQ certificate ({exc}): regenerate it") from exc
    return public_key


class CurveAuthenticator:
    """The ZAP handler of one ``zmq.Context``: only clients whose public key is in ``authorized_dir``.

    There can be one per context (it binds ``inproc://zeromq.zap.01``). Keys added to the directory later
    take effect after ``reload()``.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], authorized_dir: Path) -> None:
        self.context = context
        self.authorized_dir = authorized_dir
        self._check_directory()
        self._authenticator = ThreadAuthenticator(context)
        self._authenticator.start()
        self.reload()

    def _check_directory(self) -> list[Path]:
        keys = sorted(self.authorized_dir.glob(f"*{PUBLIC_SUFFIX}"))
        if not keys:
            # An empty list would refuse every peer, and a missing folder fails silently inside pyzmq.
            raise ConfigError(
                f"no authorised public keys (*{PUBLIC_SUFFIX}) in {self.authorized_dir}: copy the peers' "
                f"{PUBLIC_DIR}/*{PUBLIC_SUFFIX} files there (see `phasestream keys generate`)"
            )
        return keys

    def reload(self) -> None:
        """Read the authorised keys again, e.g. after a peer's key was added."""
        self._check_directory()
        self._authenticator.configure_curve(domain=ZAP_DOMAIN, location=str(self.authorized_dir))

    def stop(self) -> None:
        self._authenticator.stop()

    def __enter__(self) -> CurveAuthenticator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def make_curve_server(
    sock: zmq.Socket[bytes], keypair: CurveKeyPair, authenticator: CurveAuthenticator
) -> None:
    """Make ``sock`` a CURVE server whose peers the authenticator checks. Call it before ``bind()``."""
    if authenticator.context is not sock.context:
        raise ConfigError(
            "the CurveAuthenticator runs in another zmq.Context than this socket, so it would never be "
            "asked: create the socket and the authenticator from the same context"
        )
    sock.curve_secretkey = keypair.secret_key
    sock.curve_publickey = keypair.public_key
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()
    # Fail closed: with no ZAP handler libzmq would accept any client that knows our public key.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def make_curve_client(sock: zmq.Socket[bytes], keypair: CurveKeyPair, server_public_key: bytes) -> None:
    """Make ``sock`` a CURVE client that talks only to the server holding ``server_public_key``.

    Call it before ``connect()``. A server with another key fails the handshake, so nothing is sent to it.
    """
    sock.curve_secretkey = keypair.secret_key
    sock.curve_publickey = keypair.public_key
    sock.curve_serverkey = server_public_key


class StageCurve:
    """What one stage worker needs: its own keypair, an authenticator for its inbox, peers' public keys.

    ``serve(inbox)`` before the inbox binds; ``connect_to(sock, "refine")`` before a socket connects to a
    worker of stage ``refine``; ``close()`` when the stage stops, before ``context.term()``.
    """

    def __init__(
        self,
        settings: CurveSettings,
        context: zmq.Context[zmq.Socket[bytes]],
        name: str,
        peers: Sequence[str] = (),
    ) -> None:
        """``peers``: the stages this one connects to, whose public keys are read now, so that a missing
        key stops the worker at start, before any socket or thread exists."""
        self.settings = settings
        self.keypair = load_keypair(settings.keys_dir, name)
        self._peer_keys = {peer: load_public_key(settings.keys_dir / PUBLIC_DIR, peer) for peer in peers}
        self._context = context
        self._authenticator: CurveAuthenticator | None = None

    def serve(self, sock: zmq.Socket[bytes]) -> None:
        if self._authenticator is None:
            self._authenticator = CurveAuthenticator(self._context, self.settings.authorized_dir)
        make_curve_server(sock, self.keypair, self._authenticator)

    def connect_to(self, sock: zmq.Socket[bytes], server_name: str) -> None:
        server_key = self._peer_keys.get(server_name)
        if server_key is None:
            server_key = load_public_key(self.settings.keys_dir / PUBLIC_DIR, server_name)
        make_curve_client(sock, self.keypair, server_key)

    def close(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

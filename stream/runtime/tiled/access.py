"""Reaching a Tiled server as a client: the API key rules, where the key comes from, and a start-up check.

The key comes from a file only its owner can read, or from the environment, never from the command line
(where ``ps`` shows it); ``check_tiled`` proves at start-up that the server answers and accepts the key, so
a typo fails in the first second with the fix instead of as a stream of failed writes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx

from phasestream.errors import ConfigError, PublishError
from phasestream.runtime.config import read_secret_file

LOOPBACK_HOST = "127.0.0.1"
API_KEY_ENV = "PHASESTREAM_TILED__API_KEY"
TILED_CLIENT_API_KEY_ENV = "TILED_API_KEY"
API_KEY_FIX = (
    f"give it in a file only you can read (--tiled-api-key-file PATH, chmod 600) or in ${API_KEY_ENV}"
)
URI_FIX = "start one or drop --tiled-uri to use the embedded server"
# Tiled's own rule: its server refuses a single-user key that is not alphanumeric (tiled/server/app.py,
# `single_user_api_key.isalnum()`; tiled/config.py, pattern [a-zA-Z0-9]+). ASCII only: the key travels in
# an HTTP header, where a non-ASCII letter that isalnum() accepts cannot go.
TILED_API_KEY_PATTERN = re.compile(r"[A-Za-z0-9]+")


def validate_api_key(api_key: str | None) -> None:
    """Raise ``ConfigError`` for a key that Tiled would refuse; the message never quotes the key."""
    if api_key is not None and not TILED_API_KEY_PATTERN.fullmatch(api_key):
        raise ConfigError(
            "the Tiled API key may hold only letters and digits (A-Z, a-z, 0-9), as Tiled requires; "
            f"{len(api_key)} characters given: {API_KEY_FIX}"
        )


def read_api_key_file(path: Path) -> str:
    """The Tiled API key on the first line of ``path``, a file that only its owner may read.

    Raises ``ConfigError`` naming the file and the fix when it is readable by group or others, cannot be
    read, is empty, or holds a key that Tiled would refuse.
    """
    try:
        key = read_secret_file(Path(path), what="Tiled API key")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    validate_api_key(key)
    return key


def read_api_key(api_key_file: Path | None) -> str | None:
    """The Tiled API key from ``api_key_file``, else from ``$PHASESTREAM_TILED__API_KEY``, else from
    ``$TILED_API_KEY`` (the variable Tiled's own client reads), else None.

    A file or the environment, never a command-line value, which every user of the host sees in ``ps``.
    An ``?api_key=`` inside a Tiled URI is honoured by the clients, and never shown.
    """
    if api_key_file is not None:
        return read_api_key_file(api_key_file)
    for variable in (API_KEY_ENV, TILED_CLIENT_API_KEY_ENV):
        if key := os.environ.get(variable, "").strip():
            validate_api_key(key)
            return key
    return None


def public_uri(uri: str) -> str:
    """``uri`` without query or fragment, so an ``?api_key=`` in it never reaches a log or an error."""
    return str(httpx.URL(uri).copy_with(query=None, fragment=None))


def api_root(uri: str) -> str:
    """The ``/api/v1`` root for a server given as ``http://host:port`` or any URI below ``/api``."""
    url = httpx.URL(uri)
    site_path = url.path.split("/api", 1)[0].rstrip("/")
    return str(url.copy_with(path=f"{site_path}/api/v1", query=None, fragment=None))


def check_tiled(uri: str, api_key: str | None, *, timeout_s: float = 5.0) -> None:
    """Raise ``PublishError`` unless a Tiled server answers at ``uri`` and accepts ``api_key``.

    Plain httpx with one request and no retries: tiled's own client retries a refused connection for
    about 25 s before it raises, far too long for a start-up check.
    """
    try:
        api_key = api_key or httpx.URL(uri).params.get("api_key")
        metadata_url = f"{api_root(uri)}/metadata/"
    except httpx.InvalidURL as exc:
        raise ConfigError(
            f"--tiled-uri {uri!r} is not a valid URI ({exc}): use e.g. http://host:8000"
        ) from exc
    validate_api_key(api_key)
    shown = public_uri(uri)
    headers = {"Authorization": f"Apikey {api_key}"} if api_key else {}
    try:
        response = httpx.get(metadata_url, headers=headers, timeout=timeout_s, follow_redirects=True)
    except httpx.TransportError as exc:
        raise PublishError(
            f"no Tiled server answers at {shown} ({type(exc).__name__}: {exc}): {URI_FIX}",
            reason="tiled_unreachable",
        ) from exc
    status = response.status_code
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        raise PublishError(
            f"Tiled at {shown} refused the API key ({status}): {API_KEY_FIX}", reason="tiled_rejected"
        )
    if status != httpx.codes.OK:
        raise PublishError(
            f"{shown} answered {status} {response.reason_phrase} to GET {metadata_url}: "
            "is it a Tiled server? Give its base URI, e.g. http://host:8000",
            reason="tiled_rejected",
        )

"""Scan uids that are safe to use as names: downstream they name Tiled nodes, files and folders.

A scan uid comes from outside (a detector's start message, a Bluesky start document, a file), so it may
hold ``/``, ``..``, an absolute path, nothing at all, or ten kilobytes. ``SAFE_SCAN_UID`` is the shape every
stage may rely on; ``safe_scan_uid`` maps anything else to a safe uid that still shows where it came from,
and ``check_scan_uid`` refuses an unsafe one where no mapping is wanted.
"""

from __future__ import annotations

import hashlib
import re

from phasestream.errors import PhasestreamError

# A letter or digit first (no hidden files, no "-option"), then letters, digits, '.', '_', '-': no path
# separators, and at most 128 characters, so that a uid fits in a file name with room for a suffix.
SAFE_SCAN_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UNSAFE_SCAN_UID = "unsafe_scan_uid"  # the reason label of a refused or replaced uid
# The readable part kept of an unsafe uid; the hash after it tells uids with the same readable part apart.
_READABLE_CHARS = 64
_HASH_CHARS = 16
# How much of an unsafe uid is kept as sent (a start message may carry megabytes in it).
AS_SENT_MAX_CHARS = 1024
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_NOT_A_FIRST_CHAR = re.compile(r"^[^A-Za-z0-9]+")


def is_safe_scan_uid(uid: object) -> bool:
    """Whether ``uid`` is a string of the safe shape (and not ``.`` or ``..``, which the pattern excludes)."""
    return type(uid) is str and SAFE_SCAN_UID.fullmatch(uid) is not None


def safe_scan_uid(raw: object) -> tuple[str, str | None]:
    """The uid to use for ``raw`` and, when that is not ``raw`` itself, ``raw`` as sent (else None).

    An unsafe uid becomes its safe characters (``../victim`` → ``victim``), or ``scan`` when none are
    left, then ``-`` and 16 hex digits of the SHA-256 of what was sent, so two different unsafe uids never
    share a scan. What was sent is kept as a string: its ``repr`` when it is not one, cut to
    ``AS_SENT_MAX_CHARS`` characters.
    """
    if is_safe_scan_uid(raw):
        return str(raw), None
    as_sent = raw if type(raw) is str else _printed(raw)
    digest = hashlib.sha256(f"{type(raw).__name__}:{as_sent}".encode(errors="surrogatepass")).hexdigest()
    readable = _NOT_A_FIRST_CHAR.sub("", _UNSAFE_CHARS.sub("_", as_sent[: _READABLE_CHARS * 4]))
    readable = readable[:_READABLE_CHARS].rstrip("._-") or "scan"
    return f"{readable}-{digest[:_HASH_CHARS]}", as_sent[:AS_SENT_MAX_CHARS]


def _printed(value: object) -> str:
    try:
        return repr(value)
    except (ValueError, RecursionError):  # an integer too long to print, or nesting too deep
        return f"<{type(value).__name__} too large to print>"


def check_scan_uid(uid: object, where: str) -> str:
    """``uid`` when it is safe; else a ``PhasestreamError`` (reason ``unsafe_scan_uid``) naming it and
    ``where`` it came from."""
    if is_safe_scan_uid(uid):
        return str(uid)
    shown = _printed(uid)
    raise PhasestreamError(
        f"scan uid {shown[:80]}{'…' if len(shown) > 80 else ''} from {where} is not a safe name: a scan uid "
        f"names Tiled nodes and files, so it must match {SAFE_SCAN_UID.pattern} (letters, digits, '.', "
        "'_', '-'; a letter or digit first; at most 128 characters); rename the scan at its source",
        reason=UNSAFE_SCAN_UID,
    )

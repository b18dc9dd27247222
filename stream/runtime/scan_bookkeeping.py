"""What a stage worker keeps per scan: counts, frame-index ledgers, and the journal of its open scans.

``ScanState`` holds one scan's counts (they travel in its ScanEnd) and the frame indices in and out of
this worker, from which ``own_ledger`` makes the ledger the last stage audits (``audit_lost_frames``).

``ScanJournal`` keeps the ScanStart of each open scan in ``<run_dir>/scans/<worker>/`` until the scan ends
here: a worker the launcher restarts mid-scan reads them back and resumes those scans. The launcher clears
the journal when it starts a pipeline, so what a worker finds there at start a previous run of it left open.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from phasestream.runtime.accounting import FrameIndexSet, LedgerKind, ledger_label
from phasestream.runtime.messages import ScanEnd, ScanStart

_JOURNAL_NAME_CHARS = 24  # of the scan uid's SHA-256: a file name whatever characters the uid holds


@dataclass
class ScanState:
    start: ScanStart | None = None
    ends_received: int = 0
    frames_sent_by_detector: int = 0
    accounting: dict[str, dict[str, int]] = field(default_factory=dict)
    counts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Frame indices in and out of this worker, and the upstream ledgers its ScanEnds brought.
    received: FrameIndexSet = field(default_factory=FrameIndexSet)
    sent: FrameIndexSet = field(default_factory=FrameIndexSet)
    ledgers: dict[str, dict[str, int]] = field(default_factory=dict)
    last_end: ScanEnd | None = None
    last_message_s: float = field(default_factory=time.monotonic)
    recovered: bool = False  # opened from the journal by a restarted worker
    finished: bool = False
    lost: FrameIndexSet | None = None

    @property
    def scan_uid(self) -> str:
        """The uid from the scan's ScanStart or last ScanEnd; "?" before either arrived."""
        message = self.start or self.last_end
        return message.scan_uid if message is not None else "?"


def own_ledger(state: ScanState, worker_label: str, is_source: bool) -> dict[str, dict[str, int]]:
    """This worker's ledger of the scan: what the source sent, or what came to rest in a later stage."""
    if is_source:
        if state.sent.overflowed or not len(state.sent):
            return {}
        return {ledger_label(worker_label, LedgerKind.SENT): state.sent.to_ledger()}
    rested = state.received.difference(state.sent)
    if not len(rested):
        return {}
    return {ledger_label(worker_label, LedgerKind.RESTED): rested.to_ledger()}


class ScanJournal:
    """The ScanStarts of one worker's open scans, one JSON file each in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, scan_uid: str) -> Path:
        name = hashlib.sha256(scan_uid.encode()).hexdigest()[:_JOURNAL_NAME_CHARS]
        return self.folder / f"{name}.json"

    def keep(self, start: ScanStart) -> None:
        """Keep the ScanStart (a few hundred bytes), whole or not at all; OSError when the disk refuses."""
        path = self.path(start.scan_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(start.model_dump_json())
        partial.replace(path)

    def forget(self, scan_uid: str) -> None:
        with contextlib.suppress(OSError):
            self.path(scan_uid).unlink(missing_ok=True)

    def kept(self) -> list[Path]:
        """The files of the scans left open, in a stable order."""
        return sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []

    @staticmethod
    def read(path: Path) -> ScanStart:
        return ScanStart.model_validate_json(path.read_text())

"""What a stage worker says: warnings, notes and rejections, in its log and to the launcher.

A flood of bad messages must not fill the worker's log (the metrics count every one): ``LogLimiter`` lets
at most ``_LOG_BURST`` lines of one reason through per ``_LOG_INTERVAL_S``, then one line that says how
many were left out. ``StageLog`` applies it and sends each line that passes to the launcher as well.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from phasestream.runtime.transport import StatusChannel

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 5.0
_LOG_BURST = 10
_LOG_FLOOD_INTERVAL_S = 30.0


@dataclass
class _LogWindow:
    start_s: float
    lines: int = 0
    suppressed: int = 0
    flooding: bool = False  # the reason's previous window had lines left out


class LogLimiter:
    """Decides which lines of each reason reach the log: ``burst`` per ``interval_s``, then none until the
    interval is over, when one line says how many were left out. A reason still flooding after that gets
    one line per ``flood_interval_s``, so a sustained flood of several reasons costs tens of bytes a
    second, not kilobytes (a 5-minute soak at 10 % hostile messages wrote 1.4 MB with bursts alone)."""

    def __init__(
        self,
        interval_s: float = _LOG_INTERVAL_S,
        burst: int = _LOG_BURST,
        flood_interval_s: float = _LOG_FLOOD_INTERVAL_S,
    ) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self.flood_interval_s = flood_interval_s
        self._windows: dict[str, _LogWindow] = {}
        self._suppressing = False  # any window with lines left out: only then is there anything to flush

    def _length_s(self, window: _LogWindow) -> float:
        return self.flood_interval_s if window.flooding else self.interval_s

    def admit(self, reason: str, now_s: float) -> int | None:
        """None: leave this line out. Else how many lines of ``reason`` were left out before it."""
        window = self._windows.get(reason)
        if window is None or now_s - window.start_s >= self._length_s(window):
            left_out = window.suppressed if window is not None else 0
            self._windows[reason] = _LogWindow(now_s, lines=1, flooding=left_out > 0)
            return left_out
        if window.lines < (1 if window.flooding else self.burst):
            window.lines += 1
            return 0
        window.suppressed += 1
        self._suppressing = True
        return None

    def overdue(self, now_s: float, force: bool = False) -> list[tuple[str, int]]:
        """(reason, lines left out) of each interval that is over (all, with ``force``), forgetting them."""
        if not self._suppressing:
            return []
        due = [
            (reason, window.suppressed)
            for reason, window in self._windows.items()
            if window.suppressed and (force or now_s - window.start_s >= self._length_s(window))
        ]
        for reason, _ in due:
            # The reason stays in flood mode: its next line opens a window of flood_interval_s.
            self._windows[reason] = _LogWindow(now_s, lines=1, flooding=True)
        self._suppressing = any(window.suppressed for window in self._windows.values())
        return due


class StageLog:
    """One worker's lines, labelled with the worker: in its log and, once ``status`` is set (the worker's
    sockets exist), as events to the launcher. Warnings and rejections pass ``LogLimiter`` first."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.limiter = LogLimiter()
        self.status: StatusChannel | None = None

    def report(self, event: str, **fields: Any) -> None:
        """An event to the launcher; nothing while the worker has no status channel (a stage under test)."""
        if self.status is not None:
            self.status.report(event, **fields)

    def warn(self, reason: str, text: str) -> None:
        """What was discarded and the fix, unless ``LogLimiter`` leaves the line out."""
        left_out = self.limiter.admit(reason, time.monotonic())
        if left_out is None:
            return
        text += _left_out_note(left_out, self.limiter.interval_s)
        log.warning("%s (%s): %s", self.label, reason, text)
        self.report("log", level="warning", reason=reason, text=text)

    def note(self, reason: str, text: str) -> None:
        """What the stage decided (a start chosen, a value overridden); never left out."""
        log.info("%s (%s): %s", self.label, reason, text)
        self.report("log", level="info", reason=reason, text=text)

    def rejected(self, reason: str, text: str, with_traceback: bool = False) -> None:
        """A refused message, unless ``LogLimiter`` leaves the line out; ``with_traceback`` from the
        ``except`` clause at hand."""
        left_out = self.limiter.admit(reason, time.monotonic())
        if left_out is None:
            return
        text += _left_out_note(left_out, self.limiter.interval_s)
        log.warning("%s rejected a message (%s): %s", self.label, reason, text, exc_info=with_traceback)
        self.report("log", level="warning", reason=reason, text=text)

    def flush_left_out(self, force: bool = False) -> None:
        """One line for each reason whose lines ``LogLimiter`` left out in an interval that is over."""
        interval_s = self.limiter.interval_s
        for reason, n in self.limiter.overdue(time.monotonic(), force):
            text = (
                f"{n} more lines of this reason were left out of the log in the last {interval_s:g} s; "
                "the metrics (phasestream_messages_rejected_total, ...) count every one"
            )
            log.warning("%s (%s): %s", self.label, reason, text)
            self.report("log", level="warning", reason=reason, text=text)


def _left_out_note(left_out: int, interval_s: float) -> str:
    """What a line adds when lines of its reason were left out before it."""
    if not left_out:
        return ""
    return f" ({left_out} more lines of this reason were left out of the log in the last {interval_s:g} s)"

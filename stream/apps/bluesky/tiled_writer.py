"""``phasestream bluesky-tiled-writer``: Bluesky's raw runs into Tiled, in a process of their own.

``bluesky_tiled_plugins.TiledWriter`` stores each run at ``/<run uid>/`` (spec ``BlueskyRun`` v3): the start
and stop documents as metadata, each stream (``primary``) as a container whose ``internal`` table holds the
events' readings (motor readbacks, image ids) and whose external keys are array nodes backed by the
detector's files (the SELUN's ``selun_image``, see ``phasestream.simulators.ophyd_selun``). phasestream's
reconstructions land beside them at ``/reconstructions/<run uid>/``, and ``phasestream replay --tiled-run``
reads a run back from there.

Why a process of its own, behind ``bluesky-0MQ-proxy``: TiledWriter costs about 70 ms per event against a
local server (``notes/ecosystem.md`` §2.3), so subscribed to the RunEngine it would stretch a scan more
than ten-fold. ``batch_size=1`` writes every event and every frame's stream datum at once, so viewers and
replays see a run while it grows.

Wire format: documents arrive as msgpack with plain numpy values (``bluesky_bridge.decode_document``),
never pickle. A document that TiledWriter cannot take is counted by reason, logged, and the writer goes on.
Resources of a run whose start document never arrived (the writer subscribed mid-run) are skipped: their
run cannot be written.

Serving external files: the Tiled server must list the detector's file folder as readable storage
(``tiled serve ... -r <folder>``, ``EmbeddedTiledServer(readable_storage=[folder])``); otherwise the run
is registered but reading its frames answers HTTP 500.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from phasestream.apps.bluesky.bridge import DEFAULT_PROXY_ADDRESS, decode_document
from phasestream.apps.bluesky.dispatcher import DispatcherRunner
from phasestream.errors import PhasestreamError, WireFormatError
from phasestream.runtime.tiled.access import check_tiled, public_uri, read_api_key

logger = logging.getLogger(__name__)

# Environment variables that may hold the Tiled API key, first found wins: phasestream's own, then
# tiled's (which tiled's client also reads).
# Runs whose outcome is kept for wait_for_run: a few runs back, bounded for a writer that runs for weeks.
RUNS_KEPT = 32


class WriteFailure(StrEnum):
    """Why a document did not reach Tiled (the key of ``WriterReport.errors``)."""

    UNDECODABLE = "undecodable_document"
    MISSED_START = "missed_run_start"
    TILED_WRITE = "tiled_write_failed"


class TiledWriterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proxy_address: str = Field(
        default=DEFAULT_PROXY_ADDRESS, description="bluesky-0MQ-proxy's out address: host:port or ipc://path"
    )
    tiled_uri: str = Field(min_length=1, description="the writable Tiled server, e.g. http://127.0.0.1:8000")
    batch_size: int = Field(
        default=1, ge=1, description="events (and stream datums) per write; 1 streams each at once"
    )

    @field_validator("proxy_address")
    @classmethod
    def _explicit_host(cls, address: str) -> str:
        # bluesky turns a bare port into tcp://0.0.0.0:PORT, i.e. every interface.
        if "://" not in address and ":" not in address:
            raise ValueError(
                f"{address!r}: give host:port (e.g. 127.0.0.1:5578) or ipc://path, not a bare port"
            )
        return address


@dataclass
class WriterReport:
    documents_received: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by WriteFailure
    runs_written: OrderedDict[str, int] = field(default_factory=OrderedDict)  # run uid → events written


class RawRunWriter:
    """Subscribes TiledWriter to the proxy and writes runs until ``stop()``.

    ``serve()`` blocks (it runs ``RemoteDispatcher``'s asyncio loop); ``stop()`` may be called from any
    thread or a signal handler. ``first_document`` is set once any document has arrived (proof that the
    PUB/SUB path is up) and ``wait_for_run`` waits until a run's stop document has been written.
    """

    def __init__(self, config: TiledWriterConfig, api_key: str | None) -> None:
        from bluesky_tiled_plugins import TiledWriter
        from tiled.client import from_uri

        self.config = config
        # Fails at once with the fix for a wrong URI or key, not at the first run's first write.
        check_tiled(config.tiled_uri, api_key)
        self._writer = TiledWriter(from_uri(config.tiled_uri, api_key=api_key), batch_size=config.batch_size)
        self.report = WriterReport()
        self.first_document = threading.Event()
        self._changed = threading.Condition()
        self._runner = DispatcherRunner()
        self._open_runs: dict[str, int] = {}  # run uid → events so far
        self._descriptor_runs: dict[str, str] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """The dispatcher's callback: hand one document to TiledWriter; count and log a failure."""
        with self._changed:
            self.report.documents_received += 1
            if not self.first_document.is_set():
                logger.info("receiving documents from %s", self.config.proxy_address)
                self.first_document.set()
            try:
                self._write(name, doc)
            except PhasestreamError as error:
                self._count(error.reason, str(error))
            self._changed.notify_all()

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        if name == "resource" and "run_start" in doc and doc["run_start"] not in self._open_runs:
            logger.debug(
                "skipped resource %s of run %r: its start never arrived", doc["uid"], doc["run_start"]
            )
            return
        try:
            self._writer(name, doc)
        except (KeyError, RuntimeError, ValueError, OSError, httpx.HTTPError) as error:
            # TiledWriter's errors come from several layers (event_model's router, httpx, tiled's
            # client, pyarrow); any of them loses this document, not the writer.
            reason = WriteFailure.MISSED_START if isinstance(error, KeyError) else WriteFailure.TILED_WRITE
            raise PhasestreamError(
                f"{name} document {doc.get('uid', '')} did not reach Tiled at "
                f"{public_uri(self.config.tiled_uri)} ({type(error).__name__}: {error})",
                reason=reason,
            ) from error
        self._track(name, doc)

    def _track(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self._open_runs[doc["uid"]] = 0
        elif name == "descriptor":
            self._descriptor_runs[doc["uid"]] = doc["run_start"]
        elif name in ("event", "event_page"):
            run_uid = self._descriptor_runs.get(doc["descriptor"])
            if run_uid in self._open_runs:
                self._open_runs[run_uid] += len(doc["seq_num"]) if name == "event_page" else 1
        elif name == "stop":
            events = self._open_runs.pop(doc["run_start"], 0)
            self.report.runs_written[doc["run_start"]] = events
            while len(self.report.runs_written) > RUNS_KEPT:
                self.report.runs_written.popitem(last=False)
            logger.info("run %s written to Tiled: %d events", doc["run_start"], events)

    def serve(self) -> None:
        self._runner.run(self.config.proxy_address, self, self._decode)

    def stop(self) -> None:
        self._runner.stop()

    def wait_for_run(self, run_uid: str, timeout_s: float) -> int:
        """Events written for the run once its stop document is in Tiled; ``TimeoutError`` if it is not."""
        with self._changed:
            if not self._changed.wait_for(lambda: run_uid in self.report.runs_written, timeout=timeout_s):
                raise TimeoutError(
                    f"run {run_uid} was not written to Tiled within {timeout_s} s "
                    f"({self.report.documents_received} documents received): is the RunEngine publishing "
                    f"to the proxy this writer subscribes to ({self.config.proxy_address})?"
                )
            return self.report.runs_written[run_uid]

    def __enter__(self) -> RawRunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _decode(self, buffer: bytes) -> dict[str, Any]:
        try:
            return decode_document(buffer)
        except WireFormatError as error:
            with self._changed:
                self._count(WriteFailure.UNDECODABLE, str(error))
            raise  # RemoteDispatcher drops the message and goes on

    def _count(self, reason: str, message: str) -> None:
        self.report.errors[reason] += 1
        logger.error("%s", message)


def run_bluesky_tiled_writer(config: TiledWriterConfig, *, tiled_api_key_file: Path | None = None) -> int:
    """``phasestream bluesky-tiled-writer``: write runs until Ctrl-C or SIGTERM; the key comes from
    ``tiled_api_key_file``, else the environment (``read_api_key``)."""
    writer = RawRunWriter(config, read_api_key(tiled_api_key_file))
    # Ctrl-C or SIGTERM cancels the dispatcher inside its loop (as the bridge does).
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: writer.stop()) for sig in stop_signals}
    try:
        print(
            f"Bluesky TiledWriter: documents from {config.proxy_address} into {public_uri(config.tiled_uri)}",
            flush=True,
        )
        writer.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"Bluesky TiledWriter stopped: {len(writer.report.runs_written)} runs written", flush=True)
    return 0


if __name__ == "__main__":
    # ``python -m phasestream.apps.bluesky.tiled_writer`` takes the options of the command of the same name.
    from phasestream.apps.cli.main import main

    sys.exit(main(["bluesky-tiled-writer", *sys.argv[1:]]))

"""Serving a Bluesky ``RemoteDispatcher`` in a thread that another thread can stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class DispatcherRunner:
    """Runs a ``RemoteDispatcher`` in the calling thread until ``stop()``, which any thread may call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop_requested = False
        self._dispatcher: Any = None

    def run(
        self,
        proxy_address: str,
        callback: Any,
        decode: Any,
        on_started: Any = None,
    ) -> None:
        """Subscribe ``callback`` to the proxy's documents, decoded by ``decode``, and serve until stopped."""
        from bluesky.callbacks.zmq import RemoteDispatcher

        dispatcher = RemoteDispatcher(proxy_address, deserializer=decode)
        dispatcher.subscribe(callback)
        with self._lock:
            if self._stop_requested:
                return
            self._dispatcher = dispatcher
        if on_started is not None:
            on_started()
        # stop() cancels the dispatcher's task; start()'s own finally has then closed its socket and loop.
        with contextlib.suppress(asyncio.CancelledError):
            dispatcher.start()

    def stop(self) -> None:
        with self._lock:
            self._stop_requested = True
            dispatcher = self._dispatcher
        if dispatcher is None or dispatcher.closed:
            return
        # RemoteDispatcher.stop() from outside its loop would close a running loop; cancelling its task
        # makes start() return, and start() then stops it. A RuntimeError says the loop closed meanwhile.
        with contextlib.suppress(RuntimeError):
            dispatcher.loop.call_soon_threadsafe(_cancel, dispatcher)


def _cancel(dispatcher: Any) -> None:
    if dispatcher._task is not None:
        dispatcher._task.cancel()

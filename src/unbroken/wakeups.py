"""Notifications of a shared database, delivered to the event loop (layer: engine).

On PostgreSQL (a ``Notifying`` storage) a ``Wakeups`` holds one listening connection in a
thread of its own and hands each batch of ``(topic, payload)`` notifications to a callback
on the event loop. When the connection fails it reconnects with backoff and delivers
``RESYNC`` first: notifications sent meanwhile are lost, so whoever listens must look again.
Polling stays the fallback either way; notifications only make the wake-up immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence

from .errors import StorageError
from .storage.base import Listener, Notifying

__all__ = ["RESYNC", "Wakeups"]

log = logging.getLogger("unbroken")

RESYNC = ("", "")
"""Delivered after (re)connecting: anything may have been missed, look again."""

_WAIT_SECS = 30.0
_MAX_BACKOFF_SECS = 5.0


class Wakeups:
    """Listens for ``topics`` and calls ``deliver(notes)`` on the loop for every batch.

    Args:
        storage: the storage to listen on.
        topics: what to listen for (``WORK_TOPIC``, ``PROMISES_TOPIC``).
        deliver: called on the event loop with a list of ``(topic, payload)`` pairs.
    """

    def __init__(
        self,
        storage: Notifying,
        topics: Sequence[str],
        deliver: Callable[[list[tuple[str, str]]], None],
    ) -> None:
        self._storage = storage
        self._topics = list(topics)
        self._deliver = deliver
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._listener: Listener | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start listening (call from the event loop). Idempotent."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="unbroken-listen", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop listening and wait for the thread (it is woken at once)."""
        self._stop.set()
        with self._mutex:
            if self._listener is not None:
                self._listener.interrupt()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10.0)

    def _run(self) -> None:
        backoff = 0.1
        listener: Listener | None = None
        try:
            while not self._stop.is_set():
                try:
                    if listener is None:
                        listener = self._connect()
                        if listener is None:
                            return
                        self._post([RESYNC])
                        backoff = 0.1
                    notes = listener.wait(_WAIT_SECS)
                except StorageError as exc:
                    log.warning("listening for notifications failed (%s); polling meanwhile", exc)
                    self._drop(listener)
                    listener = None
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_SECS)
                    continue
                if notes:
                    self._post(notes)
        finally:
            self._drop(listener)

    def _connect(self) -> Listener | None:
        listener = self._storage.listen(self._topics)
        with self._mutex:
            if self._stop.is_set():
                listener.close()
                return None
            self._listener = listener
        return listener

    def _drop(self, listener: Listener | None) -> None:
        with self._mutex:
            self._listener = None
        if listener is not None:
            listener.close()

    def _post(self, notes: list[tuple[str, str]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._deliver, notes)

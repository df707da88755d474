"""The journal writer: one thread that owns every write of an engine (layer: engine).

Buffered entries (idempotent and at-least-once results) are group committed every
``flush_interval_ms`` or as soon as ``max_batch`` are waiting. An acknowledged append first
flushes everything buffered before it (INV-4): both go into one transaction, so replay
always sees a contiguous committed prefix. Acknowledged work that is not confirmed within
``ack_timeout_ms`` raises ``JournalUnavailable``; the caller decides whether to degrade
(INV-12, FR-DE-11). The thread is supervised: if its loop dies it logs, re-reads
``MAX(seq)`` and starts again (FR-DE-12).

The event loop never blocks on the database: it only appends to a deque under a lock and,
for acknowledged work, awaits a future the writer thread resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import JournalUnavailable
from .journal import JournalEntry
from .storage import Signer, Storage

__all__ = ["JournalWriter"]

log = logging.getLogger("unbroken.writer")

T = TypeVar("T")


@dataclass(slots=True)
class _Request:
    """Acknowledged work: a journal entry to append, or a storage call to make."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    entry: JournalEntry | None = None
    call: Callable[[Storage], Any] | None = None


@dataclass(slots=True)
class _Stats:
    commits: int = 0
    entries: int = 0
    dropped: int = 0
    restarts: int = 0
    resume_seq: int = 0
    last_seq: int = 0


class JournalWriter:
    """Group-committing journal writer on a dedicated thread."""

    def __init__(
        self,
        storage: Storage,
        *,
        flush_interval_ms: int = 10,
        max_batch: int = 256,
        ack_timeout_ms: int = 5000,
        signer: Signer | None = None,
    ) -> None:
        self._storage = storage
        self._signer = signer
        self._interval = max(flush_interval_ms, 1) / 1000
        self._max_batch = max(max_batch, 1)
        self.ack_timeout_ms = ack_timeout_ms
        self._items: deque[JournalEntry | _Request] = deque()
        self._buffered = 0
        self._requests = 0
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stats = _Stats()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._supervise, name="unbroken-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread. Blocking: call it off the loop."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._closed = True

    @property
    def is_open(self) -> bool:
        """Whether the writer accepts work."""
        return self._thread is not None and not self._closing

    # -- the event-loop side ------------------------------------------------------------

    def append_buffered(self, entry: JournalEntry) -> None:
        """Queue an entry for the next group commit; never blocks, never raises."""
        with self._cond:
            if self._closing:
                self.stats.dropped += 1
                log.warning("journal writer is closed; a buffered entry was dropped "
                            "(its step re-runs safely on resume)")
                return
            self._items.append(entry)
            self._buffered += 1
            if self._buffered == 1 or self._buffered >= self._max_batch:
                self._cond.notify()

    async def append_acked(self, entry: JournalEntry) -> int:
        """Append an entry durably, after everything buffered before it.

        Entries waiting together commit in one transaction; the returned seq is that
        transaction's last (at or after this entry's own).

        Raises:
            JournalUnavailable: not confirmed within ``ack_timeout_ms``.
            StorageError: the database refused the entry.
        """
        seq: int = await self._submit(_Request(asyncio.get_running_loop(), _new_future(), entry))
        return seq

    async def call(self, fn: Callable[[Storage], T]) -> T:
        """Run ``fn(storage)`` on the writer thread after flushing what is buffered."""
        result: T = await self._submit(
            _Request(asyncio.get_running_loop(), _new_future(), call=fn)
        )
        return result

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        await self.call(_noop)

    async def _submit(self, request: _Request) -> Any:
        with self._cond:
            if self._closing:
                raise JournalUnavailable(self.ack_timeout_ms)
            self._items.append(request)
            self._requests += 1
            self._cond.notify()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives just as the reply does.
            async with asyncio.timeout(self.ack_timeout_ms / 1000):
                return await request.future
        except TimeoutError:
            raise JournalUnavailable(self.ack_timeout_ms) from None

    # -- the writer thread --------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            try:
                self.stats.resume_seq = self._storage.max_seq()
                log.debug("journal writer started after seq %d", self.stats.resume_seq)
                self._run()
                return
            except Exception:
                self.stats.restarts += 1
                log.exception("journal writer failed; restarting")
                time.sleep(0.05)

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._process(batch)

    def _take(self) -> list[JournalEntry | _Request] | None:
        """Wait for work worth committing; ``None`` when closed and drained."""
        with self._cond:
            while not self._items:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self._interval
            while (
                not self._requests
                and not self._closing
                and self._buffered < self._max_batch
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            items = list(self._items)
            self._items.clear()
            self._buffered = 0
            self._requests = 0
            return items

    def _process(self, items: list[JournalEntry | _Request]) -> None:
        """Commit everything taken in one transaction, acknowledged entries included (a
        group commit for them too); storage calls run in their place in the order."""
        entries: list[JournalEntry] = []
        acked: list[_Request] = []
        for item in items:
            if isinstance(item, JournalEntry):
                entries.append(item)
            elif item.entry is not None:
                entries.append(item.entry)
                acked.append(item)
            else:
                self._commit_group(entries, acked)
                entries, acked = [], []
                self._run_call(item)
        self._commit_group(entries, acked)

    def _commit_group(self, entries: list[JournalEntry], acked: list[_Request]) -> None:
        """One transaction for the group; everything before an acknowledged entry commits
        with it or before it (INV-4)."""
        if not entries:
            return
        try:
            seq = self._storage.append(entries, self._signer)
        except Exception:
            self._commit_apart(entries, acked)
            return
        self._count(len(entries), seq)
        for request in acked:
            _resolve(request, seq, None)

    def _commit_apart(self, entries: list[JournalEntry], acked: list[_Request]) -> None:
        """The group failed: one bad entry must not sink the others. The buffered entries
        commit together (or are dropped with a WARN), then each acknowledged one alone,
        its caller getting its own outcome."""
        mine = {id(request.entry) for request in acked}
        self._commit_buffered([e for e in entries if id(e) not in mine])
        for request in acked:
            assert request.entry is not None
            try:
                seq = self._storage.append([request.entry], self._signer)
            except Exception as exc:
                _resolve(request, None, exc)
            else:
                self._count(1, seq)
                _resolve(request, seq, None)

    def _commit_buffered(self, pending: list[JournalEntry]) -> None:
        if not pending:
            return
        try:
            seq = self._storage.append(pending, self._signer)
        except Exception:
            self.stats.dropped += len(pending)
            log.warning(
                "journal group commit of %d entries failed; they were dropped "
                "(their steps re-run safely on resume)",
                len(pending),
                exc_info=True,
            )
        else:
            self._count(len(pending), seq)

    def _run_call(self, request: _Request) -> None:
        assert request.call is not None
        try:
            result = request.call(self._storage)
        except Exception as exc:
            _resolve(request, None, exc)
        else:
            _resolve(request, result, None)

    def _count(self, n: int, seq: int) -> None:
        self.stats.commits += 1
        self.stats.entries += n
        self.stats.last_seq = seq


def _noop(_: Storage) -> None:
    return None


def _new_future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


def _resolve(request: _Request, value: Any, exc: BaseException | None) -> None:
    def apply() -> None:
        if request.future.done():
            return  # the caller timed out and moved on
        if exc is not None:
            request.future.set_exception(exc)
        else:
            request.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        request.loop.call_soon_threadsafe(apply)

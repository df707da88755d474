"""The journal writer: one thread that owns every write of an engine (layer: engine).

Buffered entries (idempotent and at-least-once results) are group committed every
``flush_interval_ms`` or as soon as ``max_batch`` are waiting. An acknowledged append first
flushes everything buffered before it (INV-4): both go into one transaction, so replay
always sees a contiguous committed prefix. Acknowledged work that is not confirmed within
``ack_timeout_ms`` raises ``JournalUnavailable``; the caller decides whether to degrade
(INV-12, FR-DE-11). The thread is supervised: if its loop dies it logs, re-reads
``MAX(seq)`` and starts again (FR-DE-12).

On local storage (``LocalWrites``: SQLite) the event loop's thread commits itself while
the writer is idle: an acknowledged append or a call takes the commit mutex without
blocking and commits everything queued before it in the same transaction; due buffered
entries are committed from a loop timer. Tasks that ask after another task committed in
the same loop iteration join one group commit at its end. When the mutex is taken or
another connection holds the database's write lock, the work goes to the writer thread,
so the loop never waits for a lock; both take the mutex before the queue, keeping its
order; the thread checkpoints the log of inline commits (``_checkpoint``). PostgreSQL and
``memory://`` keep every commit on the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar, cast

from .errors import JournalUnavailable
from .group_commit import GroupCommit, Request, WriterStats
from .journal import JournalEntry
from .storage import Signer, Storage
from .storage.base import LocalWrites

__all__ = ["JournalWriter"]

log = logging.getLogger("unbroken.writer")

T = TypeVar("T")


_DECLINED: Any = object()  # ``_inline``: the work cannot be done on this thread now


class JournalWriter:
    """Group-committing journal writer on a dedicated thread, used from one event loop at a
    time (an engine's)."""

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
        self._items: deque[JournalEntry | Request] = deque()
        self._buffered = 0
        self._requests = 0
        self._mutex = threading.Lock()  # the condition's: taken directly where no one waits
        self._cond = threading.Condition(self._mutex)
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stats = WriterStats()
        # Held by whoever runs a transaction of this writer (its thread, or the loop's).
        self._commit = threading.Lock()
        self._local: LocalWrites | None = storage if isinstance(storage, LocalWrites) else None
        self._ready = False  # the thread has read MAX(seq): inline commits may start
        self._due_now = False  # the loop asks the thread to commit buffered entries now
        self._timer: asyncio.TimerHandle | None = None
        self._log_pages = 0  # estimated log pages written inline since the last checkpoint
        self._checkpoint_pages = self._local.checkpoint_pages if self._local is not None else 0
        self._groups = GroupCommit(storage, signer, self.stats)  # the thread's, or inline's
        self._checkpoint_due = False
        self._owner: asyncio.Task[Any] | None = None  # committed inline this loop iteration
        self._group_scheduled = False
        self._deadlines = _Deadlines(ack_timeout_ms)

    @property
    def ack_timeout_ms(self) -> int:
        """How long acknowledged work waits for the writer before ``JournalUnavailable``."""
        return self._deadlines.timeout_ms

    @property
    def commits_inline(self) -> bool:
        """Whether commits run on the caller's thread while the writer is idle."""
        return self._local is not None

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
        with self._mutex:
            if self._closing:
                self.stats.dropped += 1
                log.warning("journal writer is closed; a buffered entry was dropped "
                            "(its step re-runs safely on resume)")
                return
            self._items.append(entry)
            self._buffered += 1
            waiting = self._buffered
            if self._local is None:
                if waiting == 1 or waiting >= self._max_batch:
                    self._cond.notify()
                return
        if waiting >= self._max_batch:
            self._flush_due()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop: the thread commits it
                self._hand_over_buffered()
            else:
                self._timer = loop.call_later(self._interval, self._flush_due)

    def _flush_due(self) -> None:
        """Group commit what is buffered, on this thread if the writer is idle."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._inline(None) is _DECLINED:
            self._hand_over_buffered()

    def _hand_over_buffered(self) -> None:
        with self._cond:
            self._due_now = True
            self._cond.notify()

    async def append_acked(self, entry: JournalEntry) -> int:
        """Append an entry durably, after everything buffered before it.

        Entries waiting together commit in one transaction; the returned seq is that
        transaction's last (at or after this entry's own).

        Raises:
            JournalUnavailable: not confirmed within ``ack_timeout_ms``.
            StorageError: the database refused the entry.
        """
        seq: int = await self._acknowledged(entry, None)
        return seq

    async def call(self, fn: Callable[[Storage], T]) -> T:
        """Run ``fn(storage)`` after flushing what is buffered: on the writer thread, or on
        this one (local storage, writer idle)."""
        result: T = await self._acknowledged(None, fn)
        return result

    async def _acknowledged(
        self, entry: JournalEntry | None, fn: Callable[[Storage], Any] | None
    ) -> Any:
        """Inline when idle; in the group commit at this loop iteration's end when another
        task committed inline in it; else on the writer thread."""
        if self._local is not None and self._ready:
            task = asyncio.current_task()
            if self._owner is None:
                self._owner = task
                asyncio.get_running_loop().call_soon(self._next_iteration)
            elif self._owner is not task:
                return await self._join_group(_request(entry, fn))
            done = self._inline(entry, fn)
            if done is not _DECLINED:
                return done
            self.stats.handed_over += 1
        return await self._submit(_request(entry, fn))

    def _next_iteration(self) -> None:  # a new loop iteration: whoever asks first goes inline
        self._owner = None

    async def _join_group(self, request: Request) -> Any:
        with self._cond:
            if self._closing:
                raise JournalUnavailable(self.ack_timeout_ms)
            self._items.append(request)
            self._requests += 1
        if not self._group_scheduled:
            self._group_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_group)
        return await self._reply_of(request)

    def _flush_group(self) -> None:
        self._group_scheduled = False
        if self._inline(None) is _DECLINED:
            with self._cond:
                self._cond.notify()  # requests are queued: the thread commits them

    def _inline(
        self, entry: JournalEntry | None, fn: Callable[[Storage], Any] | None = None
    ) -> Any:
        """Commit what is queued, then ``entry``, then run ``fn``, all in one transaction
        on this thread; ``_DECLINED`` if the writer is busy, is closing, or the database
        would make this thread wait (the thread then takes the queue over, in order).

        Raises:
            StorageError: ``fn`` failed (what was queued before it still commits).
        """
        local = self._local
        if local is None or not self._commit.acquire(blocking=False):
            return _DECLINED
        try:
            with self._cond:
                if self._closing:
                    return _DECLINED
                requests = self._requests
                items = self._take_locked()
            if requests:
                return self._inline_group(local, items, Request(None, None, entry, fn))
            # Only buffered entries are queued: a plain group commit, no savepoints.
            taken = cast("list[JournalEntry]", items)
            batch = [*taken, entry] if entry is not None else taken
            try:
                done = self._inline_commit(local, batch, fn)
            except BaseException:
                self._requeue(taken)  # nothing was committed
                raise
            if done is None:  # refused, or the batch failed: the thread takes it over
                self._requeue(taken)
                return _DECLINED
            seq, value, error = done
            if error is not None:
                raise error
            return value if fn is not None else seq
        finally:
            self._commit.release()

    def _inline_commit(
        self, local: LocalWrites, batch: list[JournalEntry], fn: Callable[[Storage], Any] | None
    ) -> tuple[int, Any, Exception | None] | None:
        """One transaction: ``batch``, then ``fn`` (a savepoint after the batch, so its
        failure leaves the batch to commit); ``None`` if refused or the batch failed."""
        signer = self._signer

        def work(storage: Storage) -> tuple[int, Any, Exception | None]:
            seq = storage.append(batch, signer) if batch else self.stats.last_seq
            if fn is None or not batch:
                return seq, fn(storage) if fn is not None else None, None
            try:
                return seq, fn(storage), None
            except Exception as exc:  # its savepoint is undone; the batch still commits
                return seq, None, exc

        try:
            done, result = local.try_write(work)
        except Exception:
            if not batch:
                raise  # fn's own failure, with nothing else in the transaction
            return None  # the thread retries, sets a bad entry apart, then runs fn
        if not done or result is None:
            return None
        if batch:
            self._groups.count(len(batch), result[0])
            self._groups.settle()
            self._inline_done(len(batch))
        return result

    def _inline_group(
        self, local: LocalWrites, items: list[JournalEntry | Request], own: Request
    ) -> Any:
        """Queued requests too: ``GroupCommit.process`` (the thread's) in one transaction,
        each write a savepoint, so one refused entry or failed call is set apart as on the
        thread."""
        mine = own.entry is not None or own.call is not None
        work: list[JournalEntry | Request] = [*items, own] if mine else items
        try:
            done, _ = local.try_write(lambda storage: self._groups.process(work), isolate=True)
        except Exception:
            done = False
        # Rolled back whole, nothing was committed or dropped: the thread does it anew.
        replies, entries = self._groups.settle(done)
        if not done:
            self._requeue(items)
            return _DECLINED
        self._inline_done(entries)
        value, error = None, None
        for request, result, exc in replies:
            if request is own:
                value, error = result, exc
            elif request.future is not None and not request.future.done():
                if exc is None:
                    request.future.set_result(result)
                else:
                    request.future.set_exception(exc)
        if error is not None:
            raise error
        return value

    def _requeue(self, items: list[JournalEntry] | list[JournalEntry | Request]) -> None:
        """Put taken items back at the front of the queue, in their order."""
        with self._cond:
            self._items.extendleft(reversed(items))
            for item in items:
                if isinstance(item, JournalEntry):
                    self._buffered += 1
                else:
                    self._requests += 1

    def _inline_done(self, n: int) -> None:
        self.stats.inline_commits += 1
        # About a page per row (the idempotency-key index is random) and a few per commit.
        self._log_pages += n + 4
        if self._log_pages >= self._checkpoint_pages:
            self._log_pages = 0
            with self._cond:
                self._checkpoint_due = True
                self._cond.notify()

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        await self.call(_noop)

    async def _submit(self, request: Request) -> Any:
        with self._cond:
            if self._closing:
                raise JournalUnavailable(self.ack_timeout_ms)
            self._items.append(request)
            self._requests += 1
            self._cond.notify()
        return await self._reply_of(request)

    async def _reply_of(self, request: Request) -> Any:
        future, loop = request.future, request.loop
        assert future is not None and loop is not None
        self._deadlines.watch(loop, future)
        return await future

    # -- the writer thread --------------------------------------------------------------

    def _supervise(self) -> None:
        while True:
            try:
                with self._commit:
                    self.stats.resume_seq = self._storage.max_seq()
                    self.stats.last_seq = max(self.stats.last_seq, self.stats.resume_seq)
                self._ready = True
                log.debug("journal writer started after seq %d", self.stats.resume_seq)
                if self._local is not None:  # off the loop: its first commit opens nothing
                    self._local.prepare_writes()
                self._run()
                return
            except Exception:
                self.stats.restarts += 1
                log.exception("journal writer failed; restarting")
                time.sleep(0.05)

    def _run(self) -> None:
        while self._wait_for_work():
            if self._checkpoint_due and self._local is not None:
                self._checkpoint_due = False
                try:
                    self._checkpoint(self._local)
                except Exception:  # the log only grows until the next one succeeds
                    log.warning("journal log checkpoint failed", exc_info=True)
                else:
                    self.stats.checkpoints += 1
                if not (self._requests or self._due_now or self._closing):
                    continue  # woken for the checkpoint only: leave the mutex to the loop
            # The mutex first, then the queue: an inline commit on the loop's thread
            # cannot slip between taking the items and committing them.
            with self._commit:
                batch = self._take()
                if batch:
                    self._groups.process(batch)
                replies, _ = self._groups.settle()
            # Replies go out once the mutex is free: whoever resumes finds the writer idle.
            for request, value, exc in replies:
                _resolve(request, value, exc)

    def _checkpoint(self, local: LocalWrites) -> None:
        """Copy the log of the inline commits into the database: most of it while commits
        go on, the rest holding the commit mutex. Only a complete checkpoint lets the log
        start over; one that commits slip past leaves it growing for good. The second pass
        syncs the log and the database file: acknowledged work meanwhile goes to this
        thread and waits for it (milliseconds, once per ``checkpoint_pages``)."""
        local.checkpoint()
        with self._commit:
            local.checkpoint()

    def _wait_for_work(self) -> bool:
        """Wait for work worth committing; ``False`` when closed and drained."""
        with self._cond:
            if self._local is not None:
                # Buffered entries are the loop's to commit, from its timer, unless it
                # hands them over; requests and closing are the thread's.
                while not (
                    self._requests or self._due_now or self._closing or self._checkpoint_due
                ):
                    self._cond.wait()
                return bool(self._items) or not self._closing
            while not self._items:
                if self._closing:
                    return False
                self._cond.wait()
            deadline = time.monotonic() + self._interval
            while (
                not self._requests
                and not self._closing
                and not self._due_now
                and self._buffered < self._max_batch
                and self._items
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return True

    def _take(self) -> list[JournalEntry | Request]:
        """Everything queued, in order (the caller holds the commit mutex)."""
        with self._cond:
            return self._take_locked()

    def _take_locked(self) -> list[JournalEntry | Request]:
        items = list(self._items)
        self._items.clear()
        self._buffered = 0
        self._requests = 0
        self._due_now = False
        return items


class _Deadlines:
    """Replies awaited from the writer thread, oldest first, each failed with
    ``JournalUnavailable`` once ``timeout_ms`` passed without it. One loop timer serves
    them all (every wait of its own, ``asyncio.timeout``, would cost a timer handle and a
    scope per acknowledged append): armed for the oldest wait not answered, and again at
    its expiry for the next one. Every wait is as long, so the oldest is always the next
    due; replies that came are dropped as waits are added. Waits come from one event loop
    at a time (the engine's); a wait from another loop starts the list over.
    """

    __slots__ = ("_loop", "_timer", "_waiting", "timeout_ms")

    def __init__(self, timeout_ms: int) -> None:
        self.timeout_ms = timeout_ms
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        """Fail ``future`` (awaited on ``loop``) if it is not done in time."""
        waiting = self._waiting
        if loop is not self._loop:  # the previous loop's timer and waits went with it
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._loop = None, loop
            waiting.clear()
        while waiting and waiting[0][1].done():
            waiting.popleft()
        due = loop.time() + self.timeout_ms / 1000
        waiting.append((due, future))
        if self._timer is None:
            self._timer = loop.call_at(due, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        waiting, now = self._waiting, loop.time()
        while waiting:
            due, future = waiting[0]
            if not future.done():
                if due > now:
                    self._timer = loop.call_at(due, self._expire, loop)
                    return
                # The caller moves on; a reply still to come finds the future done.
                future.set_exception(JournalUnavailable(self.timeout_ms))
            waiting.popleft()


def _noop(_: Storage) -> None:
    """Nothing: ``flush`` waits for a call that does nothing."""


def _request(entry: JournalEntry | None, fn: Callable[[Storage], Any] | None) -> Request:
    loop = asyncio.get_running_loop()
    return Request(loop, loop.create_future(), entry, fn)


def _resolve(request: Request, value: Any, exc: BaseException | None) -> None:
    """Settle a request's future on its loop (from the writer thread)."""
    future, loop = request.future, request.loop
    assert future is not None and loop is not None

    def apply() -> None:
        if future.done():
            return  # the caller timed out and moved on
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(apply)

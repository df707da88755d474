"""Where a step's operation runs (layer: engine).

An async operation runs in the task that awaits it. A sync one runs in a worker thread with
the context variables copied (``start_operation``). The threads are unbroken's own rather
than the loop's default executor: a job is one ``SimpleQueue.put`` and a result one append
to the loop's inbox, which wakes the loop once for every burst of results
(``loop.run_in_executor`` costs several times more per call). Like the default executor,
the pool grows while every thread is busy, up to ``min(32, cpu_count + 4)`` threads, and a
thread idle for a minute ends.

When nothing else on the loop is ready to run (no callback, no timer due: the journal's
group commit is one) and no other sync step function is running, the loop's thread would
only sleep in its selector until the result's wake-up: it waits for the job itself
instead, up to half a millisecond (``StepThreads.call``), which saves the self-pipe write,
the selector's return and a loop iteration, and the GIL hand-overs they cost. Still
running after that, the job resolves through the inbox as usual.

With the engine's ``sync_step_inline_us`` set (0, the default, keeps every sync function
in worker threads), a function that has shown itself quick runs on the loop's thread
instead, with no hand-over at all: once its last ``QUICK_RUNS`` runs in a worker thread
each returned, without raising, within that many microseconds. It runs there with the
running loop hidden (``asyncio.get_running_loop()`` fails, as in a worker thread), timed:
a run over the limit, or that raised, sends the function back to the worker threads (to
show itself quick again), one over ten times the limit for good (logged), so a function
that turns slow blocks the loop at most once; time the process spent collecting garbage
meanwhile does not count. What is learned is learned per function object, for the
process; anything else (a ``functools.partial``, a bound method, a callable object) always
runs in a worker thread. A function that can wait for work of the loop itself (a queue its
tasks fill) would wait forever there: that is why it is opt-in.

A task that got ``_HOLDS_BEFORE_YIELD`` results in a row without yielding (inline, or while
the loop waited) takes the worker-thread path once, which yields, so the selector is polled
now and then.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import gc
import inspect
import logging
import os
import queue
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["QUICK_RUNS", "StepThreads", "start_operation"]

log = logging.getLogger("unbroken")


class _Inbox:
    """Results for one event loop: posted from worker threads, settled on the loop, one
    wake-up (``call_soon_threadsafe``) per burst."""

    __slots__ = ("__weakref__", "_items", "_lock", "_loop", "_signaled", "holds")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the pool's map of inboxes must not keep loops alive
        self._lock = threading.Lock()
        self._items: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._signaled = False
        self.holds = 0  # sync steps in a row that finished inline or while the loop waited

    def post(self, future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
        with self._lock:
            self._items.append((future, value, exc))
            if self._signaled:
                return  # the loop has been woken and has not drained yet
            self._signaled = True
        loop = self._loop()
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._signaled = False
        for future, value, exc in items:
            if future.done():
                continue  # the step was cancelled meanwhile
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(_settled(exc))


def _settled(exc: BaseException) -> BaseException:
    """What a step function's exception becomes (a future cannot hold ``StopIteration``)."""
    if isinstance(exc, StopIteration):
        return RuntimeError("a step function raised StopIteration")
    return exc


_HOLDS_BEFORE_YIELD = 32
"""Steps that finished inline or while the loop waited, in a row, before the task yields."""

QUICK_RUNS = 8
"""Quick runs in a row in a worker thread before a sync function runs on the loop's thread."""

_NEVER = -1  # in ``StepThreads._quick``: was slow on the loop's thread, never runs there again
_SLOW_FOR_GOOD = 10  # times the limit: a run on the loop's thread this long bans the function


class _GcClock:
    """Seconds the process has spent collecting garbage: a run is timed without them (a
    full collection that happens to start inside a quick function is not its slowness)."""

    __slots__ = ("_began", "running", "spent")

    def __init__(self) -> None:
        self._began = 0.0
        self.spent = 0.0
        self.running = False

    def start(self) -> None:
        """Count from now on (only an engine that learns speeds makes every collection
        pay for it)."""
        if not self.running:
            self.running = True
            gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.spent += time.perf_counter() - self._began


_GC_CLOCK = _GcClock()


def _timed(ctx: contextvars.Context, fn: Callable[[], Any]) -> tuple[Any, Any, float]:
    """``fn()`` in ``ctx``: its value, its exception (the step's outcome, whatever it is)
    and how long it took, garbage collection meanwhile not counted."""
    collecting = _GC_CLOCK.spent
    start = time.perf_counter()
    try:
        value, exc = ctx.run(fn), None
    except BaseException as error:
        value, exc = None, error
    return value, exc, time.perf_counter() - start - (_GC_CLOCK.spent - collecting)


class _Job:
    """One call of a sync step function. Its outcome goes to ``future`` through the
    loop's inbox, or, while the loop's thread waits for it (``StepThreads.call``), into
    the job itself, ``done`` released."""

    __slots__ = (
        "ctx", "done", "exc", "finished", "fn", "future", "inbox", "learn", "limit", "value"
    )

    def __init__(
        self,
        ctx: contextvars.Context,
        fn: Callable[[], Any],
        inbox: _Inbox | None,
        future: asyncio.Future[Any] | None,
        done: threading.Lock | None,
        learn: types.FunctionType | None = None,
        limit: float = 0.0,
    ) -> None:
        self.ctx = ctx
        self.fn = fn
        self.inbox = inbox
        self.future = future
        self.done = done
        self.learn = learn  # the step function, when its speed is being learned
        self.limit = limit  # seconds: a run within this is quick
        self.finished = False
        self.value: Any = None
        self.exc: BaseException | None = None


class StepThreads:
    """The worker threads sync step functions run in (see the module docstring)."""

    def __init__(
        self, max_workers: int | None = None, idle_secs: float = 60.0, hold_secs: float = 0.0005
    ) -> None:
        self._hold_secs = hold_secs
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._all_done = threading.Condition(self._lock)
        self._threads = 0
        self._outstanding = 0  # submitted and not finished
        self._max = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._idle_secs = idle_secs
        self._inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = (
            weakref.WeakKeyDictionary()
        )
        # A function's quick runs in a row in worker threads, or _NEVER (under ``_lock``);
        # weak: a closure made for one call is forgotten with it.
        self._quick: weakref.WeakKeyDictionary[types.FunctionType, int] = (
            weakref.WeakKeyDictionary()
        )

    def call(
        self, fn: Callable[[], Any], learn: types.FunctionType | None = None, limit: float = 0.0
    ) -> _Job | asyncio.Future[Any]:
        """Run ``fn()`` in a worker thread in a copy of the current context: a future (of the
        running loop) gets its result or exception, except that a finished job may come
        back itself (``.value``, ``.exc``):

        - when ``learn`` (the step function ``fn`` calls) has shown itself quick
          (``QUICK_RUNS`` runs in a row in worker threads, each within ``limit`` seconds,
          none raising), ``fn()`` runs right here, on the loop's thread, timed;
        - else, when nothing else on the loop is ready to run (no callback, no timer due)
          and no other sync step function is running, the loop's thread waits for ``fn()``
          up to ``hold_secs``, which saves the loop's wake-up and its extra iteration.

        With no ``learn``, ``fn``'s speed is not learned. A loop without a visible ready
        queue (not asyncio's own) never waits.
        """
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        timers = getattr(loop, "_scheduled", None)
        inbox = self._inbox(loop)
        due = inbox.holds >= _HOLDS_BEFORE_YIELD or (
            timers and timers[0].when() <= loop.time()  # e.g. the journal's flush
        )
        if not due and learn is not None and self._quick.get(learn, 0) >= QUICK_RUNS:
            inbox.holds += 1
            return self._inline(loop, fn, learn, limit)
        if ready is None or ready or self._outstanding or due:
            inbox.holds = 0
            future: asyncio.Future[Any] = loop.create_future()
            self._submit(_Job(contextvars.copy_context(), fn, inbox, future, None, learn, limit))
            return future
        done = threading.Lock()
        done.acquire()
        job = _Job(contextvars.copy_context(), fn, None, None, done, learn, limit)
        self._submit(job)
        if done.acquire(timeout=self._hold_secs):
            inbox.holds += 1
            return job
        with self._lock:
            if not job.finished:  # still running: its outcome goes through the inbox
                job.inbox, job.future = inbox, loop.create_future()
                inbox.holds = 0
                return job.future
        return job

    def _inline(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[], Any],
        learn: types.FunctionType,
        limit: float,
    ) -> _Job:
        """Run ``fn()`` on this thread as a worker would (a copy of the context, no running
        loop); a run that raised or took longer than ``limit`` ends its inline runs."""
        job = _Job(contextvars.copy_context(), fn, None, None, None)
        asyncio._set_running_loop(None)
        try:
            job.value, job.exc, took = _timed(job.ctx, fn)
        finally:
            asyncio._set_running_loop(loop)
        job.finished = True
        if job.exc is not None or took > limit:
            slow = took > _SLOW_FOR_GOOD * limit
            with self._lock:
                self._quick[learn] = _NEVER if slow else 0
            if slow:
                log.warning(
                    "sync step function %s took %.1f ms on the event loop's thread, holding "
                    "up everything else on it; it runs in worker threads from now on",
                    learn.__qualname__, took * 1e3,
                )
        return job

    def _learn(self, fn: types.FunctionType, quick: bool) -> None:
        """Count a run in a worker thread (caller holds ``_lock``)."""
        runs = self._quick.get(fn, 0)
        if runs != _NEVER:
            self._quick[fn] = runs + 1 if quick else 0

    def _inbox(self, loop: asyncio.AbstractEventLoop) -> _Inbox:
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes.setdefault(loop, _Inbox(loop))
        return inbox

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._outstanding += 1
            grow = self._outstanding > self._threads and self._threads < self._max
            if grow:
                self._threads += 1
        self._jobs.put(job)  # last: the thread it wakes finds the caller about to wait
        if grow:
            threading.Thread(target=self._work, name="unbroken-step", daemon=True).start()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=self._idle_secs)
            except queue.Empty:
                with self._lock:
                    if self._threads > self._outstanding:
                        self._threads -= 1
                        return
                continue
            learn = job.learn
            if learn is None:
                try:
                    value, exc = job.ctx.run(job.fn), None
                except BaseException as error:  # the step's outcome, whatever it is
                    value, exc = None, error
            else:
                value, exc, took = _timed(job.ctx, job.fn)
            with self._lock:
                if learn is not None:
                    self._learn(learn, exc is None and took <= job.limit)
                self._outstanding -= 1
                if not self._outstanding:
                    self._all_done.notify_all()
                inbox = job.inbox
                if inbox is None:  # the loop's thread waits for it (or is about to look)
                    job.value, job.exc, job.finished = value, exc, True
            if inbox is None:
                assert job.done is not None
                job.done.release()
            else:
                assert job.future is not None
                inbox.post(job.future, value, exc)
            del job, inbox, value, exc, learn  # nothing of the job outlives it

    def wait_idle(self) -> None:
        """Block until no step function is running (at exit, as the default executor's
        shutdown does: a process does not end in the middle of a sync operation)."""
        with self._all_done:
            while self._outstanding:
                self._all_done.wait()


_STEP_THREADS = StepThreads()
"""One pool per process, like a loop's default executor (results go to each job's loop)."""
atexit.register(_STEP_THREADS.wait_idle)


def start_operation(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    inline_us: int = 0,
) -> Awaitable[Any]:
    """A step's operation, started: an async one is its coroutine (it runs in the awaiting
    task), a sync one runs in a worker thread with the context variables copied, or, with
    ``inline_us``, on the loop's thread once its runs have shown it returns within that
    many microseconds (see the module docstring)."""
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_flags & inspect.CO_COROUTINE:
        awaitable: Awaitable[Any] = fn(*args, **kwargs)  # plain ``async def``: the fast path
        return awaitable
    # A plain ``def`` with no attributes set (``inspect.markcoroutinefunction`` sets one)
    # is sync: no need to ask ``iscoroutinefunction``.
    plain = type(fn) is types.FunctionType and not fn.__dict__
    if not plain and inspect.iscoroutinefunction(fn):
        awaitable = fn(*args, **kwargs)
        return awaitable
    call = functools.partial(fn, *args, **kwargs)
    if inline_us and type(fn) is types.FunctionType:
        _GC_CLOCK.start()
        return _run_sync(call, fn, inline_us / 1e6)
    return _run_sync(call, None, 0.0)


_NEVER_AWAITABLE = frozenset({int, str, float, bool, bytes, type(None), dict, list, tuple})
"""Result types of sync step functions that ``inspect.isawaitable`` need not look at."""


async def _run_sync(
    fn: Callable[[], Any], learn: types.FunctionType | None, limit: float
) -> Any:
    outcome = _STEP_THREADS.call(fn, learn, limit)
    if isinstance(outcome, _Job):  # it finished inline, or while the loop's thread waited
        if outcome.exc is not None:
            raise _settled(outcome.exc)
        result = outcome.value
    else:
        result = await outcome
    if type(result) not in _NEVER_AWAITABLE and inspect.isawaitable(result):
        # e.g. a lambda that returns a coroutine
        result = await result
    return result

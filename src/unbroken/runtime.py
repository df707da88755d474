"""What a running execution shares with its context: services, signals, the step handle,
the threads sync step functions run in (layer: engine).

``Diverged`` and ``Stopped`` derive from ``BaseException`` so that a workflow's
``except Exception`` cannot swallow them.

A sync step function runs in a worker thread with the context variables copied
(``run_sync``). The threads are unbroken's own rather than the loop's default executor: a
job is one ``SimpleQueue.put`` and a result one append to the loop's inbox, which wakes the
loop once for every burst of results (``loop.run_in_executor`` costs several times more per
call). Like the default executor, the pool grows while every thread is busy, up to
``min(32, cpu_count + 4)`` threads, and a thread idle for a minute ends.

When nothing else on the loop is ready to run (no callback, no timer due: the journal's
group commit is one) and no other sync step function is running, the loop's thread would
only sleep in its selector until the result's wake-up: it waits for the job itself
instead, up to half a millisecond (``StepThreads.call``), which saves the self-pipe write,
the selector's return and a loop iteration, and the GIL hand-overs they cost. Still
running after that, the job resolves through the inbox as usual. A task that got 32
results in a row this way yields once, so the selector is polled now and then.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import functools
import inspect
import os
import queue
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock
from .config import Config
from .effects import Step
from .errors import DecodeError, IntegrityError, PayloadTooLarge, ReplayDivergence
from .payloads import Payloads
from .storage import Storage
from .waiting import PromiseWaiters
from .writer import JournalWriter

__all__ = [
    "Diverged",
    "FaultPlan",
    "IntegrityAbort",
    "Metrics",
    "RunServices",
    "SimulatedCrash",
    "StepHandle",
    "Stopped",
    "current_step",
    "enter_step",
    "now_ms",
    "retry_operation",
    "running_task",
    "set_current_step",
    "start_operation",
]


def now_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class Diverged(BaseException):
    """Internal: the code diverged from the journal; unwinds the workflow (INV-3)."""

    def __init__(self, error: ReplayDivergence) -> None:
        super().__init__(str(error))
        self.error = error


class IntegrityAbort(BaseException):
    """Internal: the journal failed an integrity check; the execution is aborted."""

    def __init__(self, error: IntegrityError | DecodeError | PayloadTooLarge) -> None:
        super().__init__(str(error))
        self.error = error


class Stopped(BaseException):
    """Internal: the execution must stop at this await (engine closing, generation dead)."""


class SimulatedCrash(BaseException):
    """Raised by ``unbroken.testing`` fault injection where a real process would die."""


@dataclass(slots=True)
class FaultPlan:
    """Where ``unbroken.testing`` makes an execution die, as if its process were killed."""

    crash_after_step: int | None = None
    """Die once this step's result is committed."""
    crash_in_window_of_step: int | None = None
    """Die after this guarded step's operation returned, before its result is written."""
    fired: bool = False

    def after_result(self, step_id: int) -> bool:
        """Whether to die now that ``step_id``'s result is journaled."""
        return self._fire(self.crash_after_step, step_id)

    def in_window(self, step_id: int) -> bool:
        """Whether to die inside ``step_id``'s ambiguous window."""
        return self._fire(self.crash_in_window_of_step, step_id)

    def _fire(self, planned: int | None, step_id: int) -> bool:
        if self.fired or planned != step_id:
            return False
        self.fired = True
        return True


@dataclass(frozen=True, slots=True)
class StepHandle:
    """The running step, as ``unbroken.current_step()`` returns it."""

    execution_id: str
    step_id: int
    name: str
    idempotency_key: bytes
    attempt: int

    @property
    def idempotency_key_hex(self) -> str:
        """The key as 64 lowercase hex characters: the ``Idempotency-Key`` header value."""
        return self.idempotency_key.hex()


_StepFields = tuple[str, int, str, bytes, int]
"""``StepHandle``'s fields: the handle itself is only built if the operation asks for it."""

_CURRENT_STEP: contextvars.ContextVar[_StepFields] = contextvars.ContextVar("unbroken_step")


def current_step() -> StepHandle:
    """The step whose operation is running now (sync or async).

    Raises:
        RuntimeError: called outside a step's operation.
    """
    try:
        return StepHandle(*_CURRENT_STEP.get())
    except LookupError:
        raise RuntimeError("unbroken.current_step() called outside a running step") from None


def enter_step(
    execution_id: str, step_id: int, name: str, key: bytes, attempt: int
) -> contextvars.Token[_StepFields]:
    """Make this the current step; reset with ``token.var.reset(token)``."""
    return _CURRENT_STEP.set((execution_id, step_id, name, key, attempt))


def set_current_step(handle: StepHandle) -> contextvars.Token[_StepFields]:
    """Make ``handle`` the current step; reset with ``token.var.reset(token)``."""
    return enter_step(
        handle.execution_id, handle.step_id, handle.name, handle.idempotency_key, handle.attempt
    )


# -- sync step functions ------------------------------------------------------------------


class _Inbox:
    """Results for one event loop: posted from worker threads, settled on the loop, one
    wake-up (``call_soon_threadsafe``) per burst."""

    __slots__ = ("__weakref__", "_items", "_lock", "_loop", "_signaled", "holds")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the pool's map of inboxes must not keep loops alive
        self._lock = threading.Lock()
        self._items: deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = deque()
        self._signaled = False
        self.holds = 0  # sync steps in a row that finished while the loop's thread waited

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
"""Steps that finished while the loop waited, in a row, before the task yields once."""


class _Job:
    """One call of a sync step function. Its outcome goes to ``future`` through the
    loop's inbox, or, while the loop's thread waits for it (``StepThreads.call``), into
    the job itself, ``done`` released."""

    __slots__ = ("ctx", "done", "exc", "finished", "fn", "future", "inbox", "value")

    def __init__(
        self,
        ctx: contextvars.Context,
        fn: Callable[[], Any],
        inbox: _Inbox | None,
        future: asyncio.Future[Any] | None,
        done: threading.Lock | None,
    ) -> None:
        self.ctx = ctx
        self.fn = fn
        self.inbox = inbox
        self.future = future
        self.done = done
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

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn()`` in a worker thread in a copy of the current context; the future
        (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._submit(_Job(contextvars.copy_context(), fn, self._inbox(loop), future, None))
        return future

    def call(self, fn: Callable[[], Any]) -> _Job | asyncio.Future[Any]:
        """``run``, except that when nothing else on the loop is ready to run (no callback,
        no timer due) and no other sync step function is running, the loop's thread waits
        for ``fn()`` up to
        ``hold_secs``: a finished job comes back itself (``.value``, ``.exc``), with
        neither the loop's wake-up nor its extra iteration.

        A loop without a visible ready queue (not asyncio's own) never waits.
        """
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        timers = getattr(loop, "_scheduled", None)
        inbox = self._inbox(loop)
        if (
            ready is None
            or ready
            or self._outstanding
            or inbox.holds >= _HOLDS_BEFORE_YIELD
            or (timers and timers[0].when() <= loop.time())  # e.g. the journal's flush
        ):
            inbox.holds = 0
            future: asyncio.Future[Any] = loop.create_future()
            self._submit(_Job(contextvars.copy_context(), fn, inbox, future, None))
            return future
        done = threading.Lock()
        done.acquire()
        job = _Job(contextvars.copy_context(), fn, None, None, done)
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
            try:
                value, exc = job.ctx.run(job.fn), None
            except BaseException as error:  # the step's outcome, whatever it is
                value, exc = None, error
            with self._lock:
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
            del job, inbox, value, exc  # nothing of the job outlives it

    def wait_idle(self) -> None:
        """Block until no step function is running (at exit, as the default executor's
        shutdown does: a process does not end in the middle of a sync operation)."""
        with self._all_done:
            while self._outstanding:
                self._all_done.wait()


_STEP_THREADS = StepThreads()
"""One pool per process, like a loop's default executor (results go to each job's loop)."""
atexit.register(_STEP_THREADS.wait_idle)


def running_task() -> tuple[asyncio.AbstractEventLoop | None, asyncio.Task[Any] | None]:
    """The running loop and its current task; ``(None, None)`` off a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None, None
    return loop, asyncio.current_task(loop)


async def retry_operation(
    execution_id: str,
    step_id: int,
    step: Step,
    key: bytes,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    exc: Exception,
    check: Callable[[], None],
) -> Any:
    """The attempts of a step's operation after its first failed with ``exc``, while the
    step's retry policy allows (``check`` raises when the run must stop first); raises
    the last attempt's exception."""
    policy = step.retry
    attempt = 1
    while True:
        if attempt >= policy.max_attempts or not isinstance(exc, policy.retry_on):
            raise exc
        check()
        await asyncio.sleep(policy.delay_before(attempt + 1))
        attempt += 1
        token = enter_step(execution_id, step_id, step.name, key, attempt)
        try:
            return await start_operation(fn, args, kwargs)
        except Exception as error:
            exc = error
        finally:
            token.var.reset(token)


def start_operation(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Awaitable[Any]:
    """A step's operation, started: an async one is its coroutine (it runs in the awaiting
    task), a sync one runs in a worker thread with the context variables copied."""
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
    return _run_sync(functools.partial(fn, *args, **kwargs))


_NEVER_AWAITABLE = frozenset({int, str, float, bool, bytes, type(None), dict, list, tuple})
"""Result types of sync step functions that ``inspect.isawaitable`` need not look at."""


async def _run_sync(fn: Callable[[], Any]) -> Any:
    outcome = _STEP_THREADS.call(fn)
    if isinstance(outcome, _Job):  # it finished while the loop's thread waited
        if outcome.exc is not None:
            raise _settled(outcome.exc)
        result = outcome.value
    else:
        result = await outcome
    if type(result) not in _NEVER_AWAITABLE and inspect.isawaitable(result):
        # e.g. a lambda that returns a coroutine
        result = await result
    return result


@dataclass(slots=True)
class Metrics:
    """Counters an engine keeps (exported to OpenTelemetry when it is configured)."""

    degraded_appends: int = 0
    executions_started: int = 0
    executions_recovered: int = 0
    divergences: int = 0




@dataclass(slots=True)
class RunServices:
    """Everything a context needs from its engine, for one generation of one execution."""

    execution_id: str
    workflow: str
    generation: int
    storage: Storage
    writer: JournalWriter
    config: Config
    metrics: Metrics
    read: Callable[..., Any]
    """``await read(fn, *args)`` runs a storage read off the event loop."""
    payloads: Payloads
    clock: Clock
    waiters: PromiseWaiters
    stopping: Callable[[], bool] = field(default=lambda: False)
    faults: FaultPlan | None = None

    def check_stop(self) -> None:
        """Raise ``Stopped`` if the engine is closing."""
        if self.stopping():
            raise Stopped()

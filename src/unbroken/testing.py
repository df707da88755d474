"""Tools for testing your own workflows (layer: edges).

- ``memory_engine()``: an engine on in-memory storage that survives engine restarts in
  the same process (pass ``storage=`` of a previous one).
- ``crash_after_step(engine, n)`` / ``crash_in_ambiguous_window(engine, n)``: the next
  execution dies at that point as if its process had been killed; ``engine.run`` raises
  ``SimulatedCrash`` and the execution stays ``running`` for a resume.
- ``VirtualClock``: pass ``Engine(clock=VirtualClock())`` and durable sleeps and promise
  deadlines skip ahead: a workflow that sleeps for three days finishes in milliseconds.
- ``check_resume_at_every_step(engine, workflow, *args)``: one execution killed after each
  of its steps in turn and resumed each time; fails if a resume diverges from the
  journal, which catches nondeterministic workflow code.

Example::

    storage = MemoryStorage()
    async with Engine(storage=storage) as engine:
        with crash_after_step(engine, 2), pytest.raises(SimulatedCrash):
            await engine.run(checkout, "cart-1", execution_id="order-1")
        assert await engine.run(checkout, execution_id="order-1") == expected
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .engine import Engine
from .ids import new_execution_id
from .runtime import FaultPlan, SimulatedCrash
from .storage.memory import MemoryStorage

__all__ = [
    "MemoryStorage",
    "SimulatedCrash",
    "VirtualClock",
    "check_resume_at_every_step",
    "crash_after_step",
    "crash_in_ambiguous_window",
    "memory_engine",
]


class VirtualClock:
    """A clock whose time moves only when told to, or when everything is asleep.

    With ``autojump_after`` set (default 10 ms of real time), once the sleepers have
    waited that long the clock jumps to the earliest deadline and wakes it; ``advance``
    moves it by hand. Durable timers and promise deadlines of an engine built with
    ``Engine(clock=VirtualClock())`` follow it.
    """

    def __init__(self, start: float | None = None, *, autojump_after: float | None = 0.01):
        self._now = time.time() if start is None else float(start)
        self._autojump = autojump_after
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._count = 0
        self._handle: asyncio.TimerHandle | None = None

    def now(self) -> float:
        """Virtual Unix time in seconds."""
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        """Return once virtual time reaches ``deadline``."""
        if deadline <= self._now:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._count += 1
        heapq.heappush(self._sleepers, (deadline, self._count, future))
        self._arm(loop)
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper that is due."""
        self._now += seconds
        self._release()

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is None and self._autojump is not None:
            self._handle = loop.call_later(self._autojump, self._jump, loop)

    def _jump(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)  # a cancelled sleeper
        if self._sleepers:
            self._now = max(self._now, self._sleepers[0][0])
            self._release()
        if self._sleepers:
            self._arm(loop)

    def _release(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


def memory_engine(storage: MemoryStorage | None = None, **settings: Any) -> Engine:
    """An engine on in-memory storage (a new one, or ``storage`` to resume from)."""
    return Engine(storage=storage or MemoryStorage(), **settings)


@contextmanager
def crash_after_step(engine: Engine, step_id: int) -> Iterator[FaultPlan]:
    """Executions started in this block die once step ``step_id``'s result is committed."""
    with _plan(engine, FaultPlan(crash_after_step=step_id)) as plan:
        yield plan


@contextmanager
def crash_in_ambiguous_window(engine: Engine, step_id: int) -> Iterator[FaultPlan]:
    """Executions started in this block die inside guarded step ``step_id``'s window:
    its operation has run, its result is not written."""
    with _plan(engine, FaultPlan(crash_in_window_of_step=step_id)) as plan:
        yield plan


@contextmanager
def _plan(engine: Engine, plan: FaultPlan) -> Iterator[FaultPlan]:
    previous = engine._faults
    engine._faults = plan
    try:
        yield plan
    finally:
        engine._faults = previous


async def check_resume_at_every_step(
    engine: Engine,
    workflow: Callable[..., Awaitable[Any]] | str,
    /,
    *args: Any,
    execution_id: str | None = None,
    **kwargs: Any,
) -> Any:
    """Run one execution that is killed after each of its steps in turn and resumed.

    Every resume replays the steps before the kill; none may diverge from the journal (a
    divergence means the workflow's code is not deterministic outside its steps). Returns
    the execution's output, for the caller to compare with a crash-free run.

    Raises:
        AssertionError: a resume diverged from the journal.
    """
    eid = execution_id or new_execution_id()
    step_id = 0
    while True:
        before = engine.metrics.divergences
        with crash_after_step(engine, step_id) as plan:
            try:
                output = await engine.run(workflow, *args, execution_id=eid, **kwargs)
            except SimulatedCrash:
                output = _CRASHED
        if engine.metrics.divergences != before:
            raise AssertionError(f"resuming after step {step_id - 1} diverged from the journal")
        if output is not _CRASHED and not plan.fired:
            return output
        step_id += 1


_CRASHED = object()

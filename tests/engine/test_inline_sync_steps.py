"""With ``sync_step_inline_us`` (opt-in), sync step functions that have shown themselves
quick run on the event loop's thread; one that turns slow there goes back to worker
threads."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import unbroken
from unbroken import Context, StepFailed, operations
from unbroken.operations import QUICK_RUNS

from ..conftest import EngineFactory

LIMIT_US = 20_000  # generous: a loaded machine must not make a quick function look slow
QUIET_MS = 60_000  # no group commit comes due mid-test (a due timer sends a step to a worker)
REQUEST = contextvars.ContextVar("request", default="none")


@pytest.fixture(autouse=True)
def _unlearned() -> None:
    """What the pool learned of a function lasts the process: each test's functions start
    unknown, whichever backend ran them before."""
    operations._STEP_THREADS._quick.clear()


def _where(idents: list[int]) -> list[str]:
    loop_thread = threading.get_ident()
    return ["loop" if ident == loop_thread else "worker" for ident in idents]


async def test_a_quick_sync_function_runs_on_the_loop_s_thread_after_its_quick_runs(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    seen: list[tuple[str, int, int]] = []

    def op(i: int) -> int:
        step = unbroken.current_step()
        seen.append((REQUEST.get(), step.step_id, threading.get_ident()))
        REQUEST.set("changed in the step")  # in the step's copy of the context only
        return i * 2

    @engine.workflow
    async def wf(ctx: Context) -> list[int]:
        REQUEST.set("req")
        values = [await ctx.step("op", op, i) for i in range(QUICK_RUNS + 4)]
        assert REQUEST.get() == "req"
        return values

    async with engine:
        assert await engine.run(wf) == [i * 2 for i in range(QUICK_RUNS + 4)]
    where = _where([ident for _, _, ident in seen])
    assert where == ["worker"] * QUICK_RUNS + ["loop"] * 4
    assert [(request, step) for request, step, _ in seen] == [
        ("req", i) for i in range(QUICK_RUNS + 4)
    ]


async def test_by_default_sync_functions_always_run_in_worker_threads(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []

    def op() -> None:
        idents.append(threading.get_ident())

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for _ in range(QUICK_RUNS + 4):
            await ctx.step("op", op)

    async with engine:
        await engine.run(wf)
    assert set(_where(idents)) == {"worker"}


async def test_a_function_slow_on_the_loop_s_thread_goes_back_to_worker_threads_for_good(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []
    slow_at = QUICK_RUNS  # its first run on the loop's thread

    def op(i: int) -> None:
        idents.append(threading.get_ident())
        if i == slow_at:
            time.sleep(12 * LIMIT_US / 1e6)  # over ten times the limit

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(3 * QUICK_RUNS):
            await ctx.step("op", op, i)

    async with engine:
        await engine.run(wf)
    where = _where(idents)
    assert where[slow_at] == "loop"
    assert set(where[slow_at + 1 :]) == {"worker"}  # quick again, and never back


async def test_a_function_a_little_slow_on_the_loop_s_thread_shows_itself_quick_again(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []
    slow_at = QUICK_RUNS

    def op(i: int) -> None:
        idents.append(threading.get_ident())
        if i == slow_at:
            time.sleep(2 * LIMIT_US / 1e6)  # over the limit, under ten times it

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(2 * QUICK_RUNS + 3):
            await ctx.step("op", op, i)

    async with engine:
        await engine.run(wf)
    where = _where(idents)
    assert where[slow_at] == "loop"
    assert where[slow_at + 1 : 2 * QUICK_RUNS + 1] == ["worker"] * QUICK_RUNS
    assert where[2 * QUICK_RUNS + 1 :] == ["loop"] * 2


async def test_a_function_that_raises_is_not_taken_for_quick(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []

    def flaky(i: int) -> int:
        idents.append(threading.get_ident())
        if i % 2:
            raise KeyError(i)
        return i

    @engine.workflow
    async def wf(ctx: Context) -> list[str]:
        errors = []
        for i in range(3 * QUICK_RUNS):
            try:
                await ctx.step("flaky", flaky, i)
            except StepFailed as failed:
                assert isinstance(failed.__cause__, KeyError)
                errors.append(failed.error_type)
        return errors

    async with engine:
        assert await engine.run(wf) == ["KeyError"] * (3 * QUICK_RUNS // 2)
    assert set(_where(idents)) == {"worker"}  # never QUICK_RUNS clean runs in a row


async def test_a_quick_function_s_errors_on_the_loop_s_thread_are_the_step_s(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []

    def op(i: int) -> int:
        idents.append(threading.get_ident())
        if i == QUICK_RUNS:
            raise StopIteration  # as from a worker thread: a RuntimeError
        if i == QUICK_RUNS + QUICK_RUNS + 1:
            raise ValueError("bad input")
        return i

    @engine.workflow
    async def wf(ctx: Context) -> list[Any]:
        outcomes: list[Any] = []
        for i in range(2 * QUICK_RUNS + 2):
            try:
                outcomes.append(await ctx.step("op", op, i))
            except StepFailed as failed:
                outcomes.append(failed.error_type)
        return outcomes

    async with engine:
        outcomes = await engine.run(wf)
    assert outcomes[QUICK_RUNS] == "RuntimeError"
    assert outcomes[2 * QUICK_RUNS + 1] == "ValueError"
    where = _where(idents)
    assert where[QUICK_RUNS] == "loop" and where[2 * QUICK_RUNS + 1] == "loop"
    # an error on the loop's thread sends the function back to show itself quick again
    assert where[QUICK_RUNS + 1 : 2 * QUICK_RUNS + 1] == ["worker"] * QUICK_RUNS


@pytest.mark.parametrize("kind", ["partial", "callable object", "bound method"])
async def test_a_callable_that_is_not_a_function_always_runs_in_worker_threads(
    make_engine: EngineFactory, kind: str
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []

    class Record:
        def __call__(self) -> None:
            idents.append(threading.get_ident())

        def record(self) -> None:
            idents.append(threading.get_ident())

    fn: Any = {
        "partial": functools.partial(lambda: idents.append(threading.get_ident())),
        "callable object": Record(),
        "bound method": Record().record,
    }[kind]

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for _ in range(2 * QUICK_RUNS):
            await ctx.step("op", fn)

    async with engine:
        await engine.run(wf)
    assert set(_where(idents)) == {"worker"}


async def test_garbage_collection_inside_a_quick_function_is_not_its_slowness(
    make_engine: EngineFactory,
) -> None:
    limit_us = 500
    engine = make_engine(sync_step_inline_us=limit_us, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []
    heap = [[i] for i in range(400_000)]  # a full collection takes milliseconds
    collect_at = QUICK_RUNS
    collected: list[float] = []

    def op(i: int) -> None:
        idents.append(threading.get_ident())
        if i == collect_at:
            started = time.perf_counter()
            gc.collect()  # as if the allocation threshold had been crossed here
            collected.append(time.perf_counter() - started)

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(QUICK_RUNS + 4):
            await ctx.step("op", op, i)

    async with engine:
        await engine.run(wf)
    assert len(heap) == 400_000
    assert collected[0] > 10 * limit_us / 1e6  # long enough to ban it, were it counted
    assert _where(idents)[QUICK_RUNS:] == ["loop"] * 4


async def test_functions_that_share_their_code_are_learned_apart(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: dict[str, list[int]] = {"quick": [], "other": []}

    def make(label: str) -> Callable[[], None]:
        def op() -> None:  # one code object, two functions
            idents[label].append(threading.get_ident())

        return op

    quick, other = make("quick"), make("other")

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for _ in range(QUICK_RUNS + 1):
            await ctx.step("quick", quick)
        await ctx.step("other", other)

    async with engine:
        await engine.run(wf)
    assert _where(idents["quick"])[-1] == "loop"
    assert _where(idents["other"]) == ["worker"]  # nothing shown of it yet


async def test_on_the_loop_s_thread_a_function_sees_no_running_loop(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    seen: list[tuple[int, bool]] = []

    def op() -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            running = False
        else:
            running = True
        seen.append((threading.get_ident(), running))

    @engine.workflow
    async def wf(ctx: Context) -> bool:
        for _ in range(QUICK_RUNS + 1):
            await ctx.step("op", op)
        asyncio.get_running_loop()  # the workflow's own loop is back
        return True

    async with engine:
        assert await engine.run(wf)
    where = _where([ident for ident, _ in seen])
    assert where == ["worker"] * QUICK_RUNS + ["loop"]
    assert [running for _, running in seen] == [False] * (QUICK_RUNS + 1)  # as in a worker

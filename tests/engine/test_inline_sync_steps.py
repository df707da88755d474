"""Sync step functions that have shown themselves quick run on the event loop's thread
(``sync_step_inline_us``); one that turns slow there goes back to worker threads."""

from __future__ import annotations

import contextvars
import functools
import gc
import threading
import time
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
    """What the pool learned of a function (by its code) lasts the process: each test's
    functions start unknown, whichever backend ran them before."""
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


async def test_with_the_setting_at_zero_sync_functions_always_run_in_worker_threads(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(sync_step_inline_us=0, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for _ in range(QUICK_RUNS + 4):
            await ctx.step("op", lambda: idents.append(threading.get_ident()))

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


@pytest.mark.parametrize("kind", ["partial", "callable object"])
async def test_a_function_without_code_of_its_own_always_runs_in_worker_threads(
    make_engine: EngineFactory, kind: str
) -> None:
    engine = make_engine(sync_step_inline_us=LIMIT_US, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []

    class Record:
        def __call__(self) -> None:
            idents.append(threading.get_ident())

    fn: Any = (
        functools.partial(lambda: idents.append(threading.get_ident()))
        if kind == "partial"
        else Record()
    )

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
    engine = make_engine(sync_step_inline_us=1_000, journal_flush_interval_ms=QUIET_MS)
    idents: list[int] = []
    heap = [[i] for i in range(2_000_000)]  # a full collection of this takes > 10 ms
    collect_at = QUICK_RUNS

    def op(i: int) -> None:
        idents.append(threading.get_ident())
        if i == collect_at:
            started = time.perf_counter()
            gc.collect()  # as if the allocation threshold had been crossed here
            assert time.perf_counter() - started > 10 * 1_000 / 1e6

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(QUICK_RUNS + 4):
            await ctx.step("op", op, i)

    async with engine:
        await engine.run(wf)
    assert len(heap) == 2_000_000
    assert _where(idents)[QUICK_RUNS:] == ["loop"] * 4

"""The fresh step's path: sync operations in worker threads (context copied), and the
every-step-acknowledged mode (``journal_ack_every_step``; INV-12, FR-DE-11 when the journal
is unavailable)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import unbroken
from unbroken import Context, Engine, Step, StepFailed, operations
from unbroken.config import load_config
from unbroken.journal import EntryKind, JournalEntry
from unbroken.operations import _STEP_THREADS, StepThreads, start_operation
from unbroken.storage import Signer
from unbroken.storage.memory import MemoryStorage

from ..conftest import EngineFactory

REQUEST = contextvars.ContextVar("request", default="none")


# -- sync operations ----------------------------------------------------------------------


async def test_sync_operations_run_in_parallel_worker_threads(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    barrier = threading.Barrier(4, timeout=30)  # each waits for the three others
    loop_thread = threading.get_ident()

    def meet(i: int) -> int:
        assert threading.get_ident() != loop_thread
        barrier.wait()
        return i

    @engine.workflow
    async def wf(ctx: Context) -> list[int]:
        return list(await asyncio.gather(*(ctx.step(f"m{i}", meet, i) for i in range(4))))

    async with engine:
        assert await engine.run(wf) == [0, 1, 2, 3]


async def test_sync_operations_see_a_copy_of_the_context(make_engine: EngineFactory) -> None:
    engine = make_engine()
    seen: list[tuple[str, int, int]] = []

    def op() -> str:
        step = unbroken.current_step()
        seen.append((REQUEST.get(), step.step_id, step.attempt))
        REQUEST.set("changed in the thread")
        return REQUEST.get()

    @engine.workflow
    async def wf(ctx: Context) -> tuple[str, str]:
        REQUEST.set("req-1")
        inner = await ctx.step("a", op)
        return inner, REQUEST.get()

    async with engine:
        assert await engine.run(wf) == ("changed in the thread", "req-1")
    assert seen == [("req-1", 0, 1)]


async def test_a_sync_operation_s_error_and_returned_coroutine(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()

    def boom() -> None:
        raise KeyError("missing")

    async def later() -> str:
        return "awaited"

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        value = await ctx.step("lazy", lambda: later())
        try:
            await ctx.step("boom", boom)
        except StepFailed as failed:
            assert isinstance(failed.__cause__, KeyError)
            return value, failed.error_type
        return None

    async with engine:
        assert await engine.run(wf) == ("awaited", "KeyError")


async def _result(outcome: Any) -> Any:
    """What ``StepThreads.call`` gave: awaited if a future, else the finished job's value."""
    if isinstance(outcome, asyncio.Future):
        return await outcome
    assert outcome.exc is None
    return outcome.value


async def test_step_threads_grow_only_while_every_thread_is_busy() -> None:
    pool = StepThreads(max_workers=2)
    idents = [await _result(pool.call(threading.get_ident)) for _ in range(5)]
    assert len(set(idents)) == 1  # one after the other: one thread

    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> int:
        started.release()
        release.wait(30)
        return threading.get_ident()

    first, second = pool.call(hold), pool.call(hold)
    assert isinstance(first, asyncio.Future) and isinstance(second, asyncio.Future)
    for _ in range(2):
        await asyncio.get_running_loop().run_in_executor(None, started.acquire)
    third = pool.call(threading.get_ident)  # both threads are busy and the cap is 2
    assert isinstance(third, asyncio.Future)
    await asyncio.sleep(0.05)
    assert not third.done()
    release.set()
    ran = await asyncio.gather(first, second, third)
    assert len(set(ran[:2])) == 2 and ran[2] in ran[:2]


async def test_a_cancelled_step_s_late_result_is_dropped() -> None:
    pool = StepThreads()
    release = threading.Event()
    future = pool.call(lambda: release.wait(30))
    assert isinstance(future, asyncio.Future)  # it outlasted the loop's wait
    future.cancel()
    release.set()
    assert await _result(pool.call(lambda: "next")) == "next"  # the late result went nowhere


async def test_a_sync_operation_the_loop_waits_for_gives_its_value_error_and_context() -> None:
    pool = StepThreads(hold_secs=30)
    loop_thread = threading.get_ident()
    REQUEST.set("outer")

    def op() -> tuple[str, bool]:
        REQUEST.set("inner")  # in the copy only
        return REQUEST.get(), threading.get_ident() != loop_thread

    def stop() -> None:
        raise StopIteration

    outcomes = []
    for fn in (op, stop):
        job = pool.call(fn)
        outcomes.append(job if isinstance(job, asyncio.Future) else (job.value, job.exc))
    # nothing else runs on this loop: the thread waited, so both came back finished
    assert outcomes[0] == (("inner", True), None)
    assert isinstance(outcomes[1], tuple) and isinstance(outcomes[1][1], StopIteration)
    assert REQUEST.get() == "outer"
    with pytest.raises(RuntimeError, match="StopIteration"):
        await start_operation(stop, (), {})


async def test_a_sync_operation_that_outlasts_the_wait_resolves_through_the_loop() -> None:
    pool = StepThreads()
    release = threading.Event()
    job = pool.call(lambda: release.wait(30) and "late")
    assert isinstance(job, asyncio.Future)  # the loop's thread stopped waiting for it
    release.set()
    assert await job == "late"


async def test_fast_sync_steps_in_a_row_still_let_the_loop_poll(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    polled: list[int] = []
    seen: list[int] = []
    # Each step makes a socket readable from its thread: only the loop's select sees
    # that, which needs the workflow's task to yield (a thread waiting for a step does not).
    reader, writer = socket.socketpair()
    reader.setblocking(False)

    def op(i: int) -> int:
        writer.send(b"x")
        return i

    def on_readable() -> None:
        polled.append(len(reader.recv(4096)))

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(200):
            await ctx.step("op", op, i)
            seen.append(len(polled))

    loop = asyncio.get_running_loop()
    loop.add_reader(reader, on_readable)
    try:
        async with engine:
            await engine.run(wf)
    finally:
        loop.remove_reader(reader)
        reader.close()
        writer.close()
    assert seen[-1] - seen[0] >= 200 // 32  # the workflow's task yielded now and then


async def test_fast_sync_steps_in_a_row_leave_the_group_commit_on_time(
    make_engine: EngineFactory, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend != "sqlite":
        pytest.skip("only local storage group commits from the loop's timer")
    # Never a yield for the count of steps: only a due flush timer ends the waiting.
    monkeypatch.setattr(operations, "_HOLDS_BEFORE_YIELD", 1 << 30)
    engine = make_engine(journal_flush_interval_ms=1, journal_max_batch=100_000)
    commits: list[int] = []

    def op(i: int) -> int:
        return i

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(400):  # some milliseconds of steps: the 1 ms flush comes due
            await ctx.step("op", op, i)
            commits.append(engine._writer.stats.commits)

    async with engine:
        await engine.run(wf)
    assert commits[-1] > commits[0]  # group commits ran while the steps did


def test_event_loops_that_ran_sync_steps_are_not_kept_alive() -> None:
    def sync_step() -> int:
        return 1

    async def once() -> int:
        result: int = await start_operation(sync_step, (), {})
        return result

    for _ in range(5):
        assert asyncio.run(once()) == 1
    gc.collect()
    assert not list(_STEP_THREADS._inboxes)


def test_the_process_ends_only_after_a_running_sync_operation(tmp_path: Path) -> None:
    marker = tmp_path / "finished"
    script = f"""
import asyncio, time
from pathlib import Path
from unbroken.operations import start_operation

def slow():
    time.sleep(0.3)
    Path({str(marker)!r}).write_text("done")

async def main():
    asyncio.ensure_future(start_operation(slow, (), {{}}))
    await asyncio.sleep(0.05)  # the operation is running; the program ends here

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "done"


# -- every step acknowledged ----------------------------------------------------------------


def test_the_mode_is_a_setting_with_an_environment_variable() -> None:
    assert load_config(environ={}).journal_ack_every_step is False
    env = {"UNBROKEN_JOURNAL_ACK_EVERY_STEP": "true"}
    assert load_config(environ=env).journal_ack_every_step is True


@pytest.mark.parametrize("acked", [True, False])
async def test_every_step_s_result_is_committed_when_it_returns(
    make_engine: EngineFactory, acked: bool
) -> None:
    # A flush interval far longer than the test: only an acknowledgement commits.
    engine = make_engine(journal_ack_every_step=acked, journal_flush_interval_ms=600_000)
    committed: list[list[tuple[int, str]]] = []

    async def op(i: int) -> int:
        return i

    @engine.workflow
    async def wf(ctx: Context) -> None:
        await ctx.step("a", op, 1)
        await ctx.step(Step.at_least_once("b"), op, 2)
        info = await engine.get_execution(ctx.execution_id)
        assert info is not None
        committed.append([(s.step_id, s.kind.value) for s in info.steps])

    async with engine:
        await engine.run(wf, execution_id="acked")
    assert committed == [[(0, "result"), (1, "result")] if acked else []]


class StallableStorage(MemoryStorage):
    """Memory storage whose appends can be held, as a stalled database would."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        self.gate.wait(10)
        return super().append(entries, signer)


async def test_an_unacknowledged_step_degrades_with_a_warning_inv12(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = StallableStorage()
    engine = Engine(storage=storage, journal_ack_every_step=True, journal_ack_timeout_ms=50)
    calls: list[str] = []

    @engine.workflow
    async def wf(ctx: Context) -> str:
        storage.gate.clear()
        try:
            return str(await ctx.step("fetch", lambda: calls.append("fetch") or "value"))
        finally:
            storage.gate.set()

    with caplog.at_level(logging.WARNING, logger="unbroken"):
        async with engine:
            assert await engine.run(wf, execution_id="slow") == "value"
    assert calls == ["fetch"]
    assert engine.metrics.degraded_appends == 1
    assert "degrades to non-durable mode" in caplog.text
    # the late commit still landed once the database came back (the thread kept it)
    storage.open()
    assert [e.kind for e in storage.read_segment("slow", 0, 0, 10)] == [EntryKind.RESULT]

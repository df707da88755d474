"""Retention (TTL, caps, batches, sweep) and the step cap with its checkpoint fold."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from unbroken import Context, StepCapExceeded
from unbroken.journal import EntryKind, ExecutionStatus
from unbroken.testing import SimulatedCrash, VirtualClock, crash_after_step

from ..conftest import EngineFactory

DAY = 86_400


def _register(engine: Any) -> Any:
    @engine.workflow(name="wf")
    async def wf(ctx: Context, fail: bool = False) -> str:
        await ctx.step("a", lambda: "a")
        if fail:
            raise RuntimeError("boom")
        return "ok"

    return wf


async def test_prune_removes_terminal_executions_past_their_ttl(make_engine: EngineFactory) -> None:
    clock = VirtualClock(autojump_after=None)
    engine = make_engine(clock=clock)
    wf = _register(engine)
    async with engine:
        await engine.run(wf, execution_id="done")
        with pytest.raises(RuntimeError):
            await engine.run(wf, True, execution_id="failed")
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="running")
        clock.advance(8 * DAY)
        report = await engine.prune()
        assert report.executions == 1 and report.by_ttl == 1
        assert await engine.get_execution("done") is None
        assert await engine.get_execution("failed") is not None  # 30-day TTL
        clock.advance(30 * DAY)
        dry = await engine.prune(dry_run=True)
        assert dry.executions == 1 and await engine.get_execution("failed") is not None
        await engine.prune()
        assert await engine.get_execution("failed") is None
        info = await engine.get_execution("running")
    assert info is not None and info.status == "running"  # never pruned


async def test_the_count_cap_prunes_the_oldest_terminal_executions(
    make_engine: EngineFactory,
) -> None:
    clock = VirtualClock(autojump_after=None)
    engine = make_engine(clock=clock, max_executions=2)
    wf = _register(engine)
    async with engine:
        for i in range(5):
            await engine.run(wf, execution_id=f"e{i}")
            clock.advance(1)
        report = await engine.prune()
        left = [i for i in range(5) if await engine.get_execution(f"e{i}") is not None]
    assert report.by_count_cap == 3 and left == [3, 4]


async def test_the_size_cap_prunes_until_the_payloads_fit(make_engine: EngineFactory) -> None:
    clock = VirtualClock(autojump_after=None)
    engine = make_engine(clock=clock, max_journal_bytes=3000, max_executions=0)

    @engine.workflow(name="big")
    async def big(ctx: Context) -> None:
        await ctx.step("blob", lambda: "x" * 1000)

    async with engine:
        for i in range(6):
            await engine.run(big, execution_id=f"b{i}")
            clock.advance(1)
        report = await engine.prune()
        left = [i for i in range(6) if await engine.get_execution(f"b{i}") is not None]
    assert report.by_size_cap >= 3 and left == list(range(6))[-len(left):] and len(left) <= 2


async def test_the_sweep_aborts_only_stale_orphans_of_unregistered_workflows(
    make_engine: EngineFactory,
) -> None:
    clock = VirtualClock(autojump_after=None)
    first = make_engine(clock=clock)
    wf = _register(first)
    async with first:
        with crash_after_step(first, 0), pytest.raises(SimulatedCrash):
            await first.run(wf, execution_id="orphan")
    clock.advance(120)
    sweeper = make_engine(clock=clock, stale_running_after_secs=60)  # wf not registered
    async with sweeper:
        await sweeper.prune()
        info = await sweeper.get_execution("orphan")
    assert info is not None and info.status == ExecutionStatus.ABORTED


async def test_a_fresh_orphan_is_not_swept(make_engine: EngineFactory) -> None:
    clock = VirtualClock(autojump_after=None)
    first = make_engine(clock=clock)
    wf = _register(first)
    async with first:
        with crash_after_step(first, 0), pytest.raises(SimulatedCrash):
            await first.run(wf, execution_id="orphan")
    sweeper = make_engine(clock=clock, stale_running_after_secs=3600)
    async with sweeper:
        await sweeper.prune()
        info = await sweeper.get_execution("orphan")
    assert info is not None and info.status == ExecutionStatus.RUNNING


async def test_the_step_cap_aborts_the_execution(make_engine: EngineFactory) -> None:
    engine = make_engine(max_steps_per_execution=5)

    @engine.workflow
    async def wf(ctx: Context) -> None:
        for i in range(10):
            await ctx.step(f"s{i}", lambda: None)

    async with engine:
        with pytest.raises(StepCapExceeded, match="step cap of 5"):
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert info is not None and info.status == ExecutionStatus.ABORTED


async def test_a_long_execution_folds_its_prefix_and_replays_after_a_crash(
    make_engine: EngineFactory,
) -> None:
    calls: Counter[int] = Counter()
    engine = make_engine(max_steps_per_execution=50)

    async def wf(ctx: Context) -> list[int]:
        out = []
        for i in range(48):
            out.append(await ctx.step(f"s{i}", lambda i=i: calls.update([i]) or i * 2))
            if i == 45:
                await asyncio.sleep(0.2)  # let the background fold (started at step 45) land
        return out

    engine.workflow(name="wf")(wf)
    async with engine:
        with crash_after_step(engine, 46), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
        assert info is not None
        kinds = Counter(s.kind for s in info.steps)
        assert kinds[EntryKind.CHECKPOINT] == 1
        assert kinds[EntryKind.RESULT] < 47  # the prefix was folded away
        result = await engine.run(wf, execution_id="x")  # replays through the checkpoint
    assert result == [i * 2 for i in range(48)]
    assert set(calls.values()) == {1} and len(calls) == 48


async def test_a_crash_after_a_fold_before_the_next_step_committed_replays_and_runs_on(
    make_engine: EngineFactory,
) -> None:
    # The checkpoint row sits at the first step after the folded prefix; that step has no
    # row of its own yet when the process dies, and runs fresh on resume.
    calls: Counter[int] = Counter()
    crash = [True]

    async def step(i: int) -> int:
        calls.update([i])
        if i == 45 and crash[0]:
            await asyncio.sleep(0.3)  # the background fold (started at step 45) lands
            raise SimulatedCrash()  # the process dies inside step 45
        return i * 2

    async def wf(ctx: Context) -> list[int]:
        return [await ctx.step(f"s{i}", step, i) for i in range(48)]

    engine = make_engine(max_steps_per_execution=50)
    engine.workflow(name="wf")(wf)
    async with engine:
        with pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert info is not None
    kinds = Counter((s.kind, s.step_id) for s in info.steps)
    assert kinds[(EntryKind.CHECKPOINT, 45)] == 1
    assert not any(step_id == 45 for kind, step_id in kinds if kind != EntryKind.CHECKPOINT)

    crash[0] = False
    engine2 = make_engine(max_steps_per_execution=50)
    engine2.workflow(name="wf")(wf)
    async with engine2:
        result = await engine2.run(wf, execution_id="x")
    assert result == [i * 2 for i in range(48)]
    assert calls == Counter({**dict.fromkeys(range(48), 1), 45: 2})


async def test_a_resume_under_a_lower_step_cap_stops_at_the_cap_inside_the_journal(
    make_engine: EngineFactory,
) -> None:
    calls: Counter[int] = Counter()

    async def step(i: int) -> int:
        calls.update([i])
        return i

    async def wf(ctx: Context) -> int:
        for i in range(40):
            await ctx.step("s", step, i)
        return 40

    engine = make_engine(max_steps_per_execution=0)
    engine.workflow(name="wf")(wf)
    async with engine:
        with crash_after_step(engine, 30), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")

    engine2 = make_engine(max_steps_per_execution=20)  # journaled steps 20..30 are past it
    engine2.workflow(name="wf")(wf)
    async with engine2:
        with pytest.raises(StepCapExceeded, match="step cap of 20"):
            await engine2.run(wf, execution_id="x")
        info = await engine2.get_execution("x")
    assert info is not None and info.status == ExecutionStatus.ABORTED
    assert calls == Counter(range(31))

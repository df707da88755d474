"""Cancel (INV-16'): cooperative in this engine, refused for another live owner, races
with finalize and recovery have exactly one terminal winner."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from unbroken import Context, Engine, ExecutionCanceled, ExecutionLocked, UnknownExecution
from unbroken.journal import ExecutionStatus
from unbroken.testing import SimulatedCrash, VirtualClock, crash_after_step

from ..conftest import EngineFactory


async def test_a_running_execution_stops_at_its_next_wait_and_never_resumes(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    ran: list[int] = []

    async def wf(ctx: Context) -> str:
        for i in range(100):
            await ctx.step(f"s{i}", lambda i=i: ran.append(i))
            await ctx.sleep(0.01)
        return "finished"

    engine.workflow(name="wf")(wf)
    async with engine:
        handle = await engine.start(wf, execution_id="x")
        while len(ran) < 3:
            await asyncio.sleep(0.005)
        assert await engine.cancel("x") is True
        with pytest.raises(ExecutionCanceled):
            await handle.result()
        stopped_at = len(ran)
        with pytest.raises(ExecutionCanceled):
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert info is not None and info.status == "canceled"
    again = make_engine()
    again.workflow(name="wf")(wf)
    async with again:  # recovery never resumes a canceled execution
        await asyncio.sleep(0.05)
    assert len(ran) == stopped_at < 100


async def test_cancel_right_after_start_before_the_run_began_cancels_and_frees_it(
    make_engine: EngineFactory,
) -> None:
    """``cancel`` straight after ``start`` stops a run whose task never began: the handle
    says canceled, the row is ``canceled``, and ownership is free (no leaked lock)."""
    ran: list[int] = []
    engine = make_engine()

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> int:
        ran.append(1)
        return int(await ctx.step("a", lambda: 1))

    async with engine:
        handle = await engine.start(wf, execution_id="early")
        assert await engine.cancel("early") is True  # no await between: it never began
        with pytest.raises(ExecutionCanceled):
            await handle.result()
        info = await engine.get_execution("early")
        assert info is not None and info.status == "canceled"
        assert await engine.run(wf, execution_id="other") == 1  # the engine goes on
    assert ran == [1]  # only "other" ran
    again = make_engine()
    again.workflow(name="wf")(wf)
    async with again:
        with pytest.raises(ExecutionCanceled):  # canceled for good, and not locked
            await again.run(wf, execution_id="early")


async def test_cancel_of_an_orphan_and_of_terminal_and_unknown_ids(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> int:
        return int(await ctx.step("a", lambda: 1))

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="orphan")
        assert await engine.cancel("orphan") is True
        assert await engine.cancel("orphan") is False  # idempotent
        await engine.run(wf, execution_id="done")
        assert await engine.cancel("done") is False  # completed stays completed
        with pytest.raises(UnknownExecution):
            await engine.cancel("nope")
        info = await engine.get_execution("done")
    assert info is not None and info.status == "completed"


async def test_cancel_is_refused_for_an_execution_another_owner_holds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    owner = Engine(url, clock=VirtualClock(autojump_after=None))

    @owner.workflow(name="wf")
    async def wf(ctx: Context) -> None:
        await ctx.sleep(3600)

    async with owner:
        await owner.start(wf, execution_id="held")
        await asyncio.sleep(0.05)
        async with Engine(url) as other:  # separate flocks: as another process
            with pytest.raises(ExecutionLocked, match="'held'"):
                await other.cancel("held")


@pytest.mark.parametrize("trial", range(20))
async def test_cancel_racing_finalize_has_exactly_one_terminal_winner(
    make_engine: EngineFactory, trial: int
) -> None:
    engine = make_engine()

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> str:
        await ctx.step("a", asyncio.sleep, 0.001 * (trial % 4))
        return "done"

    async with engine:
        handle = await engine.start(wf, execution_id="race")
        await asyncio.sleep(0.001 * (trial % 5))
        canceled = await engine.cancel("race")
        outcome: object
        try:
            outcome = await handle.result()
        except ExecutionCanceled:
            outcome = "canceled"
        info = await engine.get_execution("race")
    assert info is not None
    if canceled:
        assert outcome == "canceled" and info.status == ExecutionStatus.CANCELED
    else:
        assert outcome == "done" and info.status == ExecutionStatus.COMPLETED


@pytest.mark.parametrize("trial", range(20))
async def test_cancel_racing_recovery_has_exactly_one_terminal_winner(
    tmp_path: Path, trial: int
) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    first = Engine(url)

    async def wf(ctx: Context) -> str:
        await ctx.step("a", lambda: None)
        await ctx.step("b", asyncio.sleep, 0.002 * (trial % 3))
        return "done"

    first.workflow(name="wf")(wf)
    async with first:
        with crash_after_step(first, 0), pytest.raises(SimulatedCrash):
            await first.run(wf, execution_id="orphan")
    recoverer = Engine(url)
    recoverer.workflow(name="wf")(wf)
    canceler = Engine(url)  # its own flocks: as another process

    async def cancel() -> str:
        await asyncio.sleep(0.001 * (trial % 4))
        try:
            return "canceled" if await canceler.cancel("orphan") else "not-canceled"
        except ExecutionLocked:
            return "refused"

    async with canceler:
        verdict, _ = await asyncio.gather(cancel(), recoverer.__aenter__())  # a real race
        try:
            outcome = await recoverer.run(wf, execution_id="orphan")
        except ExecutionCanceled:
            outcome = "canceled"
        finally:
            await recoverer.close()
        info = await canceler.get_execution("orphan")
    assert info is not None
    if verdict == "canceled":
        assert info.status == ExecutionStatus.CANCELED and outcome == "canceled"
    else:
        assert info.status == ExecutionStatus.COMPLETED and outcome == "done"

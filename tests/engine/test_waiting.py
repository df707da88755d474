"""Durable timers and promises (FR-DE-05, FR-DE-06, INV-9) with the virtual clock."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from unbroken import (
    Context,
    Engine,
    PromiseRejected,
    ReplayDivergence,
    StepFailed,
    UnknownPromise,
)
from unbroken.errors import InvalidArgument, PromiseTimeout
from unbroken.journal import ExecutionStatus
from unbroken.storage.memory import MemoryStorage
from unbroken.testing import SimulatedCrash, VirtualClock, crash_after_step

from ..conftest import EngineFactory

THREE_DAYS = 3 * 86_400


async def test_a_three_day_sleep_takes_milliseconds_on_the_virtual_clock(
    make_engine: EngineFactory,
) -> None:
    clock = VirtualClock()
    engine = make_engine(clock=clock)
    start = clock.now()

    @engine.workflow
    async def wf(ctx: Context) -> float:
        await ctx.sleep(timedelta(days=3))
        return (await ctx.now()).timestamp()

    async with engine:
        finished = await asyncio.wait_for(engine.run(wf, execution_id="x"), 5)
    assert finished - start >= THREE_DAYS - 0.001  # due times have millisecond resolution


async def test_a_timer_due_while_no_process_ran_fires_at_once_fr_de_06(
    make_engine: EngineFactory,
) -> None:
    clock = VirtualClock(autojump_after=None)  # time moves only by hand
    first = make_engine(clock=clock)
    ran: list[str] = []

    async def wf(ctx: Context) -> str:
        await ctx.step("before", lambda: ran.append("before"))
        await ctx.sleep(3600)
        await ctx.step("after", lambda: ran.append("after"))
        return "woke"

    first.workflow(name="wf")(wf)
    async with first:
        handle = await first.start(wf, execution_id="x")
        while "before" not in ran:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the timer is armed and waiting
    assert not handle.done() or handle._future.cancelled()

    clock.advance(7200)  # the process was down past the due time
    second = make_engine(clock=clock)
    second.workflow(name="wf")(wf)
    async with second:
        assert await asyncio.wait_for(second.run(wf, execution_id="x"), 5) == "woke"
    assert ran == ["before", "after"]


async def test_a_restarted_sleep_waits_only_for_what_is_left(make_engine: EngineFactory) -> None:
    clock = VirtualClock(autojump_after=None)
    first = make_engine(clock=clock)

    async def wf(ctx: Context) -> float:
        await ctx.sleep(100)
        return clock.now()

    first.workflow(name="wf")(wf)
    async with first:
        await first.start(wf, execution_id="x")
        await asyncio.sleep(0.05)
    clock.advance(60)
    armed_at = clock.now() - 60
    second = make_engine(clock=clock)
    second.workflow(name="wf")(wf)
    async with second:
        handle = await second.start(wf, execution_id="x")
        await asyncio.sleep(0.05)
        assert not handle.done()
        clock.advance(40.01)  # due times are whole milliseconds, rounded up
        assert await asyncio.wait_for(handle.result(), 5) == pytest.approx(armed_at + 100.01)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "soon"])
async def test_bad_sleeps_are_named_errors(make_engine: EngineFactory, bad: Any) -> None:
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> None:
        with pytest.raises(InvalidArgument):
            ctx.sleep(bad)
        with pytest.raises(InvalidArgument, match="aware datetime"):
            ctx.sleep_until(datetime(2030, 1, 1))  # naive: refused, not guessed

    async with engine:
        await engine.run(wf)


async def test_sleep_until_an_aware_datetime(make_engine: EngineFactory) -> None:
    clock = VirtualClock()
    engine = make_engine(clock=clock)
    target = datetime.fromtimestamp(clock.now(), UTC) + timedelta(hours=5)

    @engine.workflow
    async def wf(ctx: Context) -> float:
        await ctx.sleep_until(target)
        return clock.now()

    async with engine:
        assert await engine.run(wf) >= target.timestamp()


async def test_replacing_a_step_by_a_sleep_is_a_divergence(make_engine: EngineFactory) -> None:
    engine = make_engine(clock=VirtualClock())
    version = {"v": 1}

    @engine.workflow(name="wf", on_divergence="fail")
    async def wf(ctx: Context) -> str:
        if version["v"] == 1:
            await ctx.step("work", lambda: 1)
        else:
            await ctx.sleep(1)
        return str(await ctx.step("tail", lambda: "t"))

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        version["v"] = 2
        with pytest.raises(ReplayDivergence, match="'work'"):
            await engine.run(wf, execution_id="x")


# -- promises -----------------------------------------------------------------------------


async def _promise_of(engine: Engine, eid: str) -> tuple[str, bytes]:
    for _ in range(500):
        info = await engine.get_execution(eid)
        if info is not None and any(s.effect_class == "promise" for s in info.steps):
            break
        await asyncio.sleep(0.01)
    return PROMISES[eid]


PROMISES: dict[str, tuple[str, bytes]] = {}


def _approval_workflow(engine: Engine, **promise_kw: Any) -> Any:
    @engine.workflow(name="approval")
    async def approval(ctx: Context) -> Any:
        p = await ctx.promise("approval", **promise_kw)
        if p.token is not None:
            PROMISES[ctx.execution_id] = (p.id, p.token)
        return await p

    return approval


async def test_a_promise_resolves_with_its_token_and_wakes_the_waiter_fr_de_05(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    wf = _approval_workflow(engine)
    async with engine:
        handle = await engine.start(wf, execution_id="p1")
        pid, token = await _promise_of(engine, "p1")
        assert isinstance(pid, str) and len(token) == 32
        with pytest.raises(PromiseRejected):
            await engine.resolve_promise(pid, bytes(32), {"ok": False})
        with pytest.raises(UnknownPromise):
            await engine.resolve_promise("no-such-promise", token, 1)
        assert await engine.resolve_promise(pid, token.hex(), {"ok": True}) is True
        assert await asyncio.wait_for(handle.result(), 2) == {"ok": True}
        assert await engine.resolve_promise(pid, token, {"ok": "again"}) is False  # no-op


async def test_a_promise_resolved_while_no_process_runs_is_delivered_on_start(
    make_engine: EngineFactory,
) -> None:
    first = make_engine()
    wf = _approval_workflow(first)
    async with first:
        await first.start(wf, execution_id="p2")
        pid, token = await _promise_of(first, "p2")
    resolver = make_engine()  # another process, no workflow registered
    async with resolver:
        assert await resolver.resolve_promise(pid, token, "approved")
        info = await resolver.get_execution("p2")
        assert info is not None and info.status == "running"
    second = make_engine()
    _approval_workflow(second)
    async with second:
        assert await asyncio.wait_for(second.run("approval", execution_id="p2"), 5) == "approved"


async def test_a_promise_resolved_by_another_process_wakes_the_waiter_by_polling(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    owner = Engine(url, promise_poll_interval_secs=0.05)
    wf = _approval_workflow(owner)
    async with owner:
        handle = await owner.start(wf, execution_id="p3")
        pid, token = await _promise_of(owner, "p3")
        async with Engine(url) as other:  # the same database, its own connections
            assert await other.resolve_promise(pid, token, 42)
        assert await asyncio.wait_for(handle.result(), 2) == 42


async def test_a_promise_resolved_by_another_engine_wakes_the_waiter_at_once_on_postgres(
    make_engine: EngineFactory, backend: str
) -> None:
    if backend != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; the others poll")
    owner = make_engine(promise_poll_interval_secs=60)  # a poll would take a minute
    wf = _approval_workflow(owner)
    async with owner:
        handle = await owner.start(wf, execution_id="p4")
        pid, token = await _promise_of(owner, "p4")
        await asyncio.sleep(0.3)  # the waiter's engine is listening by now
        async with make_engine() as other:  # its own storage and sessions: another process
            assert await other.resolve_promise(pid, token, 7)
        assert await asyncio.wait_for(handle.result(), 5) == 7


async def test_a_rejected_promise_raises_step_failed_live_and_on_replay(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    seen: list[str] = []

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> str:
        p = await ctx.promise("approval")
        if p.token is not None:
            PROMISES["r"] = (p.id, p.token)
        try:
            await p
        except StepFailed as exc:
            seen.append(f"{exc.error_type}:{exc.message}")
        await ctx.step("tail", lambda: None)
        return "done"

    async with engine:
        handle = await engine.start(wf, execution_id="r")
        pid, token = await _promise_of(engine, "r")
        await engine.reject_promise(pid, token, PermissionError("denied by ops"))
        assert await handle.result() == "done"
    assert seen == ["PermissionError:denied by ops"]


async def test_a_promise_timeout_is_journaled_so_replays_agree(make_engine: EngineFactory) -> None:
    clock = VirtualClock()
    engine = make_engine(clock=clock)
    outcomes: list[str] = []

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> str:
        p = await ctx.promise("approval", timeout=timedelta(days=2))
        if p.token is not None:
            PROMISES["t"] = (p.id, p.token)
        try:
            await p
            outcomes.append("value")
        except PromiseTimeout:
            outcomes.append("timeout")
        await ctx.step("tail", lambda: None)
        return outcomes[-1]

    async with engine:
        with crash_after_step(engine, 1), pytest.raises(SimulatedCrash):
            await asyncio.wait_for(engine.run(wf, execution_id="t"), 5)
        pid, token = PROMISES["t"]
        # resolved after the workflow saw the timeout: the replay still times out
        assert await engine.resolve_promise(pid, token, "late") is True
        assert await engine.run(wf, execution_id="t") == "timeout"
    assert outcomes == ["timeout", "timeout"]


async def test_promise_names_are_unique_in_an_execution(make_engine: EngineFactory) -> None:
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> None:
        await ctx.promise("a")
        with pytest.raises(InvalidArgument, match="already used"):
            ctx.promise("a")

    async with engine:
        handle = await engine.start(wf)
        await asyncio.sleep(0.05)
        await engine.cancel(handle.execution_id)


async def test_a_promise_of_a_canceled_execution_cannot_be_resolved(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    wf = _approval_workflow(engine)
    async with engine:
        await engine.start(wf, execution_id="c1")
        pid, token = await _promise_of(engine, "c1")
        assert await engine.cancel("c1") is True
        with pytest.raises(UnknownPromise):
            await engine.resolve_promise(pid, token, 1)
        info = await engine.get_execution("c1")
    assert info is not None and info.status == ExecutionStatus.CANCELED


async def test_the_resolver_token_never_reaches_the_database_or_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="unbroken")
    db = tmp_path / "t.db"
    engine = Engine(f"sqlite:///{db}")
    wf = _approval_workflow(engine)
    async with engine:
        handle = await engine.start(wf, execution_id="tok")
        pid, token = await _promise_of(engine, "tok")
        errors = []
        try:
            await engine.resolve_promise(pid, bytes(32), 1)
        except PromiseRejected as exc:
            errors.append(str(exc))
        await engine.resolve_promise(pid, token, "fine")
        await handle.result()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("t.db*") if p.is_file())
    assert token not in stored and token.hex().encode() not in stored
    texts = errors + [r.getMessage() for r in caplog.records]
    assert all(token.hex() not in t for t in texts)


async def test_a_memory_engine_shares_promises_across_engines_on_one_storage() -> None:
    storage = MemoryStorage()
    first = Engine(storage=storage)
    wf = _approval_workflow(first)
    async with first:
        await first.start(wf, execution_id="m")
        pid, token = await _promise_of(first, "m")
        assert await first.resolve_promise(pid, token, "v")


async def test_a_value_that_is_not_json_able_is_refused_and_nothing_is_lost(
    make_engine: EngineFactory,
) -> None:
    from unbroken import EncodeError

    engine = make_engine()
    wf = _approval_workflow(engine)
    async with engine:
        handle = await engine.start(wf, execution_id="j")
        pid, token = await _promise_of(engine, "j")
        with pytest.raises(EncodeError):
            await engine.resolve_promise(pid, token, object())
        assert await engine.resolve_promise(pid, token, "fine")  # still pending, still works
        assert await handle.result() == "fine"


async def test_a_promise_of_a_pruned_execution_is_unknown(make_engine: EngineFactory) -> None:
    clock = VirtualClock(autojump_after=None)
    engine = make_engine(clock=clock, ttl_failed_secs=1)
    wf = _approval_workflow(engine)
    async with engine:
        await engine.start(wf, execution_id="gone")
        pid, token = await _promise_of(engine, "gone")
        await engine.cancel("gone")
        clock.advance(10)
        await engine.prune()
        assert await engine.get_execution("gone") is None
        with pytest.raises(UnknownPromise):
            await engine.resolve_promise(pid, token, 1)

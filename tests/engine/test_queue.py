"""Queued work: ``engine.enqueue``, ``engine.claim`` and the worker loop, on every backend."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from unbroken import Context, Engine, UnknownWorkflow
from unbroken.errors import InvalidArgument
from unbroken.journal import ExecutionStatus
from unbroken.testing import SimulatedCrash, crash_after_step
from unbroken.worker import WorkerStats, run_worker

from ..conftest import EngineFactory

POLL = 0.05  # the workers' poll interval in these tests


class Gauge:
    """Counts executions inside their slow step, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.calls: list[str] = []

    async def slow(self, tag: str, seconds: float) -> str:
        self.calls.append(tag)
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1
        return tag.upper()


def register(engine: Engine, gauge: Gauge, seconds: float = 0.0) -> Callable[..., Any]:
    @engine.workflow(name="queued")
    async def queued(ctx: Context, tag: str, extra: int = 0) -> str:
        first = await ctx.step("slow", gauge.slow, tag, seconds)
        second = await ctx.step("add", lambda: extra + 1)
        return f"{first}:{second}"

    return queued


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def all_completed(engine: Engine, ids: list[str]) -> bool:
    for eid in ids:
        info = await engine.get_execution(eid)
        if info is None or info.status != ExecutionStatus.COMPLETED:
            return False
    return True


async def drain(engines: list[Engine], ids: list[str], **worker: Any) -> list[WorkerStats]:
    """Run a worker per engine until every execution of ``ids`` completed."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_worker(e, stop=stop, poll_interval=POLL, **worker)) for e in engines
    ]
    try:
        await until(lambda: all_completed(engines[0], ids))
    finally:
        stop.set()
        stats = await asyncio.gather(*tasks)
    return stats


async def test_enqueue_stores_the_execution_without_running_it_and_is_idempotent(
    make_engine: EngineFactory,
) -> None:
    gauge = Gauge()
    engine = make_engine()
    queued = register(engine, gauge)
    async with engine:
        eid = await engine.enqueue(queued, "a", execution_id="job-1", extra=4)
        assert eid == "job-1"
        assert await engine.enqueue(queued, "changed", execution_id="job-1") == "job-1"
        generated = await engine.enqueue("queued", "b", queue="emails")
        info = await engine.get_execution("job-1")
        assert info is not None and info.status == ExecutionStatus.RUNNING
        rows = {
            r.execution_id: r for r in map(engine.storage.get_execution, ["job-1", generated]) if r
        }
        assert (rows["job-1"].queue, rows[generated].queue) == ("default", "emails")
        await asyncio.sleep(0.1)
    # Opening another engine recovers orphans, but queued work is left to workers.
    second = make_engine()
    register(second, gauge)
    async with second:
        assert await second.recover() == []
        await asyncio.sleep(0.1)
    assert gauge.calls == []
    third = make_engine()
    register(third, gauge)
    async with third:
        await drain([third], ["job-1"])
        assert await third.run("queued", execution_id="job-1") == "A:5"  # first inputs kept


async def test_enqueue_refuses_bad_queues_and_unknown_workflows(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    queued = register(engine, Gauge())
    async with engine:
        for bad in ("", "x" * 201, "new\nline"):
            with pytest.raises(InvalidArgument):
                await engine.enqueue(queued, "a", queue=bad)
        with pytest.raises(UnknownWorkflow):
            await engine.enqueue("nobody", "a")
        assert engine.storage.list_executions() == []


async def test_a_worker_drains_every_enqueued_execution(make_engine: EngineFactory) -> None:
    gauge = Gauge()
    engine = make_engine()
    register(engine, gauge)
    async with engine:
        ids = [await engine.enqueue("queued", f"t{i}", extra=i) for i in range(30)]
        [stats] = await drain([engine], ids, concurrency=8)
        for i, eid in enumerate(ids):
            assert await engine.run("queued", execution_id=eid) == f"T{i}:{i + 1}"
    assert sorted(gauge.calls) == sorted(f"t{i}" for i in range(30))  # each ran once
    assert stats.claimed == 30


async def test_a_worker_takes_only_its_queues(make_engine: EngineFactory) -> None:
    gauge = Gauge()
    engine = make_engine()
    register(engine, gauge)
    async with engine:
        mine = [await engine.enqueue("queued", "m", queue="mine") for _ in range(3)]
        theirs = await engine.enqueue("queued", "t", queue="theirs")
        await drain([engine], mine, queues=["mine", "also-mine"])
        info = await engine.get_execution(theirs)
        assert info is not None and info.status == ExecutionStatus.RUNNING
    assert gauge.calls == ["m", "m", "m"]


async def test_per_worker_concurrency_is_respected(make_engine: EngineFactory) -> None:
    gauge = Gauge()
    engine = make_engine()
    register(engine, gauge, seconds=0.05)
    async with engine:
        ids = [await engine.enqueue("queued", f"t{i}") for i in range(12)]
        await drain([engine], ids, concurrency=3)
    assert gauge.most == 3
    assert len(gauge.calls) == 12


async def test_a_queue_limit_holds_across_workers(make_engine: EngineFactory) -> None:
    gauge = Gauge()
    engines = [make_engine(queue_concurrency={"default": 2}) for _ in range(3)]
    for engine in engines:
        register(engine, gauge, seconds=0.05)
    async with engines[0], engines[1], engines[2]:
        ids = [await engines[0].enqueue("queued", f"t{i}") for i in range(10)]
        await drain(engines, ids, concurrency=5)
    assert gauge.most == 2
    assert sorted(gauge.calls) == sorted(f"t{i}" for i in range(10))


async def test_an_execution_a_dead_worker_left_is_finished_by_another(
    make_engine: EngineFactory,
) -> None:
    gauge = Gauge()
    first = make_engine()
    register(first, gauge)
    async with first:
        await first.enqueue("queued", "x", execution_id="job")
        with crash_after_step(first, 0):
            [handle] = await first.claim("default", 5)
            with pytest.raises(SimulatedCrash):
                await handle.result()
    assert gauge.calls == ["x"]
    second = make_engine()
    register(second, gauge)
    async with second:
        await drain([second], ["job"])
        assert await second.run("queued", execution_id="job") == "X:1"
    assert gauge.calls == ["x"]  # step 0 was replayed, not run again


async def test_stopping_a_worker_leaves_its_executions_queued_for_another(
    make_engine: EngineFactory,
) -> None:
    gauge = Gauge()
    first = make_engine()
    register(first, gauge, seconds=30)
    stop = asyncio.Event()
    async with first:
        await first.enqueue("queued", "x", execution_id="job")
        task = asyncio.create_task(run_worker(first, stop=stop, poll_interval=POLL))
        await until(lambda: asyncio.sleep(0, result=gauge.now == 1))
        stop.set()
        stats = await asyncio.wait_for(task, 5)
        assert (stats.claimed, stats.ended) == (1, 0)
    second = make_engine()
    register(second, Gauge())  # a quick one this time
    async with second:
        info = await second.get_execution("job")
        assert info is not None and info.status == ExecutionStatus.RUNNING
        await drain([second], ["job"])


async def test_a_notification_wakes_an_idle_worker_at_once(
    make_engine: EngineFactory, backend: str
) -> None:
    if backend != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; the others poll")
    gauge = Gauge()
    worker_engine, client = make_engine(), make_engine()
    register(worker_engine, gauge)
    register(client, gauge)
    stop = asyncio.Event()
    async with worker_engine, client:
        task = asyncio.create_task(run_worker(worker_engine, stop=stop, poll_interval=60))
        try:
            await asyncio.sleep(0.5)  # idle: listening, next poll in about a minute
            start = time.monotonic()
            eid = await client.enqueue("queued", "n")
            await until(lambda: all_completed(client, [eid]), seconds=10)
            assert time.monotonic() - start < 5
        finally:
            stop.set()
            await task


async def test_an_idle_worker_costs_one_claim_per_poll_interval(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    register(engine, Gauge())
    stop = asyncio.Event()
    async with engine:
        # A queue of its own: another test run's notifications on this database must not
        # wake it.
        queue = f"idle-{os.urandom(4).hex()}"
        task = asyncio.create_task(run_worker(engine, queues=[queue], stop=stop, poll_interval=0.1))
        await asyncio.sleep(1.0)
        stop.set()
        stats = await task
    assert 5 <= stats.claims <= 14, stats  # 10 expected, with ±25% jitter


async def test_a_storm_of_notifications_costs_a_worker_a_bounded_number_of_claims(
    make_engine: EngineFactory, backend: str
) -> None:
    if backend != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's; the others poll")
    worker_engine, client = make_engine(), make_engine()
    register(client, Gauge())  # the worker does not run this workflow: it finds nothing
    stop = asyncio.Event()
    async with worker_engine, client:
        task = asyncio.create_task(run_worker(worker_engine, stop=stop, poll_interval=1.0))
        await asyncio.sleep(0.3)
        start, sent = time.monotonic(), 0
        while time.monotonic() - start < 2.0:  # each one notifies the worker
            await client.enqueue("queued", f"t{sent}")
            sent += 1
        stop.set()
        stats = await task
    # Backing off from 50 ms to a quarter of the interval: about 10 claims in 2 s, where
    # one claim per 50 ms would be 40 and one per notification hundreds.
    assert sent > 100
    assert 2 <= stats.claims <= 16, stats

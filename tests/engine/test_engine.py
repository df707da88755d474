"""Engine: idempotent start, statuses and reopen (INV-16, INV-16'), recovery, degradation
(INV-12), bad input."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from unbroken import (
    Context,
    Engine,
    EngineNotOpen,
    ExecutionCanceled,
    Intent,
    JournalUnavailable,
    OnAmbiguous,
    Step,
    UnknownWorkflow,
)
from unbroken.errors import NotAnUnbrokenDatabase, SchemaTooNew, WorkflowMismatch
from unbroken.journal import ExecutionStatus, JournalEntry
from unbroken.storage import Signer
from unbroken.storage.memory import MemoryStorage
from unbroken.testing import SimulatedCrash, crash_after_step

from ..conftest import EngineFactory


async def test_starting_an_existing_completed_id_returns_the_journaled_output(
    make_engine: EngineFactory,
) -> None:
    runs: list[str] = []
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context, name: str) -> str:
        runs.append(name)
        return await ctx.step("greet", lambda: f"hello {name}")

    async with engine:
        assert await engine.run(wf, "ada", execution_id="x") == "hello ada"
        # the call's arguments are ignored for an existing execution: inputs are journaled
        assert await engine.run(wf, "bob", execution_id="x") == "hello ada"
    assert runs == ["ada"]


async def test_concurrent_starts_of_one_id_share_one_run(make_engine: EngineFactory) -> None:
    runs: list[int] = []
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> int:
        runs.append(1)
        await ctx.step("slow", asyncio.sleep, 0.05)
        return len(runs)

    async with engine:
        results = await asyncio.gather(*(engine.run(wf, execution_id="x") for _ in range(5)))
    assert results == [1] * 5 and runs == [1]


async def test_reopen_of_failed_and_aborted_runs_again_under_replay_inv16(
    make_engine: EngineFactory,
) -> None:
    state = {"fail": True, "a": 0}
    engine = make_engine()

    def a() -> str:
        state["a"] += 1
        return "a"

    @engine.workflow
    async def wf(ctx: Context) -> str:
        await ctx.step("a", a)
        await engine.flush()
        if state["fail"]:
            raise RuntimeError("transient")
        return "done"

    async with engine:
        with pytest.raises(RuntimeError):
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
        assert info is not None and info.status == "failed" and info.finalized_at is not None
        state["fail"] = False
        assert await engine.run(wf, execution_id="x") == "done"
        info = await engine.get_execution("x")
    assert info is not None and info.status == "completed"
    assert state["a"] == 1  # the committed step was replayed, not re-run


async def test_a_canceled_execution_never_resumes_inv16_prime(make_engine: EngineFactory) -> None:
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> str:
        return await ctx.step("a", lambda: "a")

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        engine.storage.finalize_execution("x", ExecutionStatus.CANCELED, 1)
        with pytest.raises(ExecutionCanceled, match="'x' was canceled"):
            await engine.run(wf, execution_id="x")


async def test_orphans_are_recovered_when_the_engine_opens(
    make_engine: EngineFactory,
) -> None:
    calls: list[str] = []
    first = make_engine()

    async def wf(ctx: Context, n: int) -> list[str]:
        def op(i: int) -> str:
            calls.append(f"s{i}")
            return f"v{i}"

        return [await ctx.step(f"s{i}", op, i) for i in range(n)]

    first.workflow(name="wf")(wf)
    async with first:
        with crash_after_step(first, 1), pytest.raises(SimulatedCrash):
            await first.run(wf, 4, execution_id="orphan")

    second = make_engine()
    second.workflow(name="wf")(wf)
    async with second:
        # recovery scheduled it on entry; run() attaches to the recovered execution
        assert second.metrics.executions_recovered == 1
        assert await second.run(wf, 4, execution_id="orphan") == ["v0", "v1", "v2", "v3"]
    assert calls == ["s0", "s1", "s2", "s3"]


async def test_an_unregistered_workflow_stays_running_on_recovery(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    first = make_engine()

    @first.workflow(name="gone")
    async def wf(ctx: Context) -> str:
        return await ctx.step("a", lambda: "a")

    async with first:
        with crash_after_step(first, 0), pytest.raises(SimulatedCrash):
            await first.run(wf, execution_id="x")
    with caplog.at_level(logging.WARNING, logger="unbroken"):
        async with make_engine() as second:
            info = await second.get_execution("x")
    assert info is not None and info.status == "running"
    assert any("unregistered workflow 'gone'" in r.getMessage() for r in caplog.records)


async def test_unknown_workflow_and_closed_engine_are_named_errors(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()

    async def stray(ctx: Context) -> None:
        return None

    with pytest.raises(EngineNotOpen, match="async with engine"):
        await engine.run(stray)
    async with engine:
        with pytest.raises(UnknownWorkflow, match="'nope'"):
            await engine.run("nope")
        with pytest.raises(UnknownWorkflow):
            await engine.run(stray)


async def test_an_id_of_another_workflow_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine()

    @engine.workflow(name="one")
    async def one(ctx: Context) -> int:
        return 1

    @engine.workflow(name="two")
    async def two(ctx: Context) -> int:
        return 2

    async with engine:
        await engine.run(one, execution_id="x")
        with pytest.raises(WorkflowMismatch, match="belongs to workflow 'one'"):
            await engine.run(two, execution_id="x")


async def test_workflows_are_named_module_qualname_or_explicitly() -> None:
    engine = Engine("memory://")

    @engine.workflow
    async def auto(ctx: Context) -> None:
        return None

    with pytest.raises(TypeError, match="async function"):
        engine.workflow(lambda ctx: None)  # type: ignore[arg-type]
    async with engine:
        handle = await engine.start(auto)
        await handle.result()
        info = await engine.get_execution(handle.execution_id)
    assert info is not None
    qualname = "test_workflows_are_named_module_qualname_or_explicitly.<locals>.auto"
    assert info.workflow.endswith(qualname)
    assert info.workflow.startswith("tests.engine.test_engine.")


class StallableStorage(MemoryStorage):
    """Memory storage whose appends can be held, as a stalled database would."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        self.gate.wait(10)
        return super().append(entries, signer)


async def test_cost_bearing_steps_degrade_when_the_journal_is_unavailable_inv12() -> None:
    storage = StallableStorage()
    engine = Engine(storage=storage, journal_ack_timeout_ms=50)
    calls: list[str] = []

    @engine.workflow
    async def wf(ctx: Context) -> str:
        storage.gate.clear()
        step = Step.guarded("llm", Intent.COST_BEARING)
        value = await ctx.step(step, lambda: calls.append("llm") or "answer")
        storage.gate.set()
        return str(value)

    async with engine:
        assert await engine.run(wf) == "answer"
    assert calls == ["llm"]
    assert engine.metrics.degraded_appends == 2  # the intent and the result


async def test_other_guarded_steps_never_run_without_their_intent_inv12() -> None:
    storage = StallableStorage()
    engine = Engine(storage=storage, journal_ack_timeout_ms=50)
    calls: list[str] = []
    step = Step.guarded("pay", Intent.MONEY_MOVING, on_ambiguous=OnAmbiguous.FAIL)

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        storage.gate.clear()
        try:
            return await ctx.step(step, lambda: calls.append("pay"))
        finally:
            storage.gate.set()

    async with engine:
        with pytest.raises(JournalUnavailable):
            await engine.run(wf)
    assert calls == []


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_file_that_is_not_ours_is_refused_and_left_intact(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    db.write_bytes(b"this is not a database" * 100)
    before = db.read_bytes()

    async def main() -> None:
        async with Engine(f"sqlite:///{db}"):
            pass

    with pytest.raises(NotAnUnbrokenDatabase, match="not an unbroken database"):
        _run(main())
    assert db.read_bytes() == before


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "u.db"

    async def main() -> None:
        async with Engine(f"sqlite:///{db}"):
            pass

    _run(main())
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaTooNew, match="version 99"):
        _run(main())

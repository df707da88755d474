"""Lock files go when their executions end (INV-15 on SQLite): the owner removes the file of
an execution that completed, failed, was aborted or canceled; retention removes those of
the executions it prunes; the file of an execution still running stays."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from unbroken import Context, Engine, ExecutionCanceled, IntegrityViolation, UnknownExecution
from unbroken.ids import lock_name
from unbroken.journal import ExecutionStatus
from unbroken.lockfiles import LockDir
from unbroken.ownership import Ownership
from unbroken.testing import SimulatedCrash, VirtualClock, crash_after_step

DAY = 86_400


def _engine(tmp_path: Path, **settings: Any) -> Engine:
    return Engine(f"sqlite:///{tmp_path / 'app.db'}", **settings)


def _lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "app.db.locks"


def _files(tmp_path: Path) -> set[str]:
    """The executions' lock files in the lock directory (spares not counted)."""
    return {p.name for p in _lock_dir(tmp_path).glob("*.lock")}


def _file(execution_id: str) -> str:
    return f"{lock_name(execution_id)}.lock"


def _register(engine: Engine, waiting: dict[str, asyncio.Event]) -> Any:
    @engine.workflow(name="wf")
    async def wf(ctx: Context, how: str) -> str:
        await ctx.step("a", lambda: how)
        if how == "fail":
            raise RuntimeError("boom")
        if how == "wait":
            promise = await ctx.promise("approval")
            waiting[ctx.execution_id].set()
            await promise
        return how

    return wf


async def test_an_ended_execution_leaves_no_lock_file_and_a_running_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    engine = _engine(tmp_path)
    waiting = {"canceled": asyncio.Event(), "running": asyncio.Event()}
    wf = _register(engine, waiting)
    async with engine:
        assert await engine.run(wf, "ok", execution_id="completed") == "ok"
        with pytest.raises(RuntimeError):
            await engine.run(wf, "fail", execution_id="failed")
        canceled = await engine.start(wf, "wait", execution_id="canceled")
        await engine.start(wf, "wait", execution_id="running")
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in waiting.values())), 10)
        assert _files(tmp_path) == {_file("canceled"), _file("running")}
        assert await engine.cancel("canceled") is True
        with pytest.raises(ExecutionCanceled):
            await canceled.result()
        assert _files(tmp_path) == {_file("running")}
    # Closing the engine stops the waiting one: it stays running, and its file stays.
    assert _files(tmp_path) == {_file("running")}


async def test_a_crashed_run_keeps_its_file_until_the_sweep_aborts_it(tmp_path: Path) -> None:
    clock = VirtualClock(autojump_after=None)
    first = _engine(tmp_path, clock=clock)
    wf = _register(first, {})
    async with first:
        with crash_after_step(first, 0), pytest.raises(SimulatedCrash):
            await first.run(wf, "ok", execution_id="orphan")
    assert _files(tmp_path) == {_file("orphan")}
    clock.advance(120)
    sweeper = _engine(tmp_path, clock=clock, stale_running_after_secs=60)  # wf unregistered
    async with sweeper:
        await sweeper.prune()
        info = await sweeper.get_execution("orphan")
    assert info is not None and info.status == ExecutionStatus.ABORTED
    assert _files(tmp_path) == set()


async def test_prune_removes_the_lock_files_of_pruned_executions_no_one_holds(
    tmp_path: Path,
) -> None:
    clock = VirtualClock(autojump_after=None)
    engine = _engine(tmp_path, clock=clock)
    waiting = {"running": asyncio.Event()}
    wf = _register(engine, waiting)
    async with engine:
        for eid in ("old", "reused"):
            await engine.run(wf, "ok", execution_id=eid)
        await engine.start(wf, "wait", execution_id="running")
        await asyncio.wait_for(waiting["running"].wait(), 10)
        # The files an earlier version kept after the executions ended.
        for eid in ("old", "reused"):
            (_lock_dir(tmp_path) / _file(eid)).write_text(f"{os.getpid()}\n")
        clock.advance(8 * DAY)
        dry = await engine.prune(dry_run=True)
        assert dry.executions == 2
        assert _files(tmp_path) == {_file(e) for e in ("old", "reused", "running")}
        # Someone owns "reused" again (a new execution under the same id): its file stays.
        with Ownership(_lock_dir(tmp_path)).acquire("reused"):
            report = await engine.prune()
        assert report.executions == 2
        assert _files(tmp_path) == {_file("reused"), _file("running")}


async def test_an_execution_aborted_for_failing_its_integrity_check_leaves_no_lock_file(
    tmp_path: Path,
) -> None:
    first = _engine(tmp_path)
    wf = _register(first, {})
    async with first:
        with crash_after_step(first, 0), pytest.raises(SimulatedCrash):
            await first.run(wf, "ok", execution_id="tampered")
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn, conn:
        conn.execute("DELETE FROM journal WHERE execution_id = 'tampered'")
    again = _engine(tmp_path)
    _register(again, {})
    async with again:
        with pytest.raises(IntegrityViolation):
            await again.run("wf", "ok", execution_id="tampered")
        info = await again.get_execution("tampered")
    assert info is not None and info.status == ExecutionStatus.ABORTED
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("gone", ["before the read under the lock", "before the reopen"])
async def test_a_start_that_finds_its_execution_pruned_under_the_lock_leaves_no_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    engine = _engine(tmp_path)
    wf = _register(engine, {})
    async with engine:
        with pytest.raises(RuntimeError):
            await engine.run(wf, "fail", execution_id="gone")  # failed: a start reopens it
        storage, reads = engine.storage, 0
        real_read = storage.get_execution

        def prune() -> None:
            with closing(sqlite3.connect(tmp_path / "app.db")) as conn, conn:
                for table in ("journal", "integrity", "executions"):
                    conn.execute(f"DELETE FROM {table} WHERE execution_id = 'gone'")

        def read(execution_id: str) -> Any:
            nonlocal reads
            reads += 1
            if reads == 2 and gone == "before the read under the lock":
                prune()
            row = real_read(execution_id)
            if reads == 2 and gone == "before the reopen":
                prune()
            return row

        monkeypatch.setattr(storage, "get_execution", read)
        with pytest.raises(UnknownExecution):
            await engine.run(wf, "ok", execution_id="gone")
    assert reads == 2
    assert _files(tmp_path) == set()


async def test_cancel_of_an_execution_another_engine_left_running_removes_its_lock_file(
    tmp_path: Path,
) -> None:
    first = _engine(tmp_path)
    waiting = {"left": asyncio.Event()}
    wf = _register(first, waiting)
    async with first:
        await first.start(wf, "wait", execution_id="left")
        await asyncio.wait_for(waiting["left"].wait(), 10)
    assert _files(tmp_path) == {_file("left")}
    other = _engine(tmp_path)  # its workflow is not registered here: nothing resumes it
    async with other:
        assert await other.cancel("left") is True
        info = await other.get_execution("left")
    assert info is not None and info.status == ExecutionStatus.CANCELED
    assert _files(tmp_path) == set()


async def test_a_claimed_execution_canceled_before_it_starts_leaves_no_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tmp_path)
    wf = _register(engine, {})
    async with engine:
        await engine.enqueue(wf, "ok", execution_id="queued")
        storage = engine.storage
        claim_queued = storage.claim_queued

        def claimed_then_canceled(*args: Any, **kwargs: Any) -> list[tuple[str, str]]:
            # The row is canceled between the claim and the start (written past the lock:
            # a cancel that takes it is refused while the claim holds it).
            claimed = claim_queued(*args, **kwargs)
            for eid, _ in claimed:
                storage.finalize_execution(eid, ExecutionStatus.CANCELED, int(time.time() * 1e3))
            return claimed

        monkeypatch.setattr(storage, "claim_queued", claimed_then_canceled)
        assert await engine.claim() == []
        info = await engine.get_execution("queued")
    assert info is not None and info.status == ExecutionStatus.CANCELED
    assert _files(tmp_path) == set()


async def test_prune_goes_on_when_the_lock_directory_cannot_be_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = VirtualClock(autojump_after=None)
    first = _engine(tmp_path, clock=clock)
    wf = _register(first, {})
    async with first:
        for eid in ("a", "b", "c"):
            await first.run(wf, "ok", execution_id=eid)
    shutil.rmtree(_lock_dir(tmp_path))
    _lock_dir(tmp_path).write_text("not a directory")
    clock.advance(8 * DAY)
    async with _engine(tmp_path, clock=clock, prune_batch_size=1) as pruner:
        report = await pruner.prune()
    assert report.executions == 3
    assert "lock files of pruned executions stay" in caplog.text  # said, not raised
    assert LockDir(_lock_dir(tmp_path)).discard(["a"]) == 0

"""The application ``unbroken worker tests.crash.queue_app:engine`` runs in the worker tests.

Its workflow ``small`` runs three steps; each step's operation appends ``start`` and ``end``
lines (execution id, pid, step, wall time) to ``$QUEUE_APP_RECORDS/<pid>.log`` with one
unbuffered ``write`` each, so a SIGKILLed worker leaves every line it wrote and the test
can tell whether two processes ever ran one execution at once.
"""

from __future__ import annotations

import asyncio
import os
import time

from unbroken import Context, Engine, current_step

engine = Engine()  # UNBROKEN_DATABASE_URL, UNBROKEN_KEY and the rest from the environment

if os.environ.get("QUEUE_APP_NO_LOCK_HEARTBEAT"):
    # For tests only: no heartbeat touches the PostgreSQL lock session, so a lapsed lease
    # is first noticed by whatever uses that session next (a write), and the write-time
    # fence alone has to refuse it.
    from unbroken.storage.postgres_locks import PostgresLocks

    setattr(PostgresLocks, "_heartbeat", lambda self: None)  # noqa: B010

STEPS = 3

_records: int | None = None


def _record(phase: str, step: int) -> None:
    global _records
    if _records is None:
        path = os.path.join(os.environ["QUEUE_APP_RECORDS"], f"{os.getpid()}.log")
        _records = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    eid = current_step().execution_id
    os.write(_records, f"{eid} {os.getpid()} {step} {phase} {time.time():.6f}\n".encode())


async def _work(step: int, seconds: float) -> int:
    _record("start", step)
    await asyncio.sleep(seconds)
    _record("end", step)
    return step


@engine.workflow(name="small")
async def small(ctx: Context, seconds: float) -> int:
    total = 0
    for step in range(STEPS):
        total += await ctx.step(f"work{step}", _work, step, seconds)
    return total


def _traced_work(step: int, seconds: float) -> int:
    """A sync step (it runs in a worker thread, so a cancellation cannot cut it short):
    it records, sleeps and returns the pid that computed the result."""
    _record("start", step)
    time.sleep(seconds)
    _record("end", step)
    return os.getpid()


@engine.workflow(name="traced")
async def traced(ctx: Context, seconds: float) -> list[int]:
    """Three steps; the output names, per step, the process whose result was journaled."""
    return [await ctx.step(f"work{step}", _traced_work, step, seconds) for step in range(STEPS)]


def _gated_work() -> int:
    """A sync step that records its start, then waits until the test creates
    ``$QUEUE_APP_GATES/<pid>`` before it ends and returns the pid that computed it."""
    _record("start", 0)
    gate = os.path.join(os.environ["QUEUE_APP_GATES"], str(os.getpid()))
    while not os.path.exists(gate):
        time.sleep(0.01)
    _record("end", 0)
    return os.getpid()


@engine.workflow(name="gated")
async def gated(ctx: Context) -> int:
    """One step held by its gate; the output is the process whose result was journaled."""
    return await ctx.step("work0", _gated_work)

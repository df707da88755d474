"""Step cost, writer throughput, concurrency and resume time of unbroken on SQLite.

Usage: python bench/steps.py [--quick] [--only NAME ...] [--out bench/results/DATE-steps.json]

Measures, each on a fresh SQLite database in a temporary directory, as the median of
several repetitions (the machine is shared: medians, not means, and min/max beside them):

- the commit floor: one ``BEGIN IMMEDIATE; UPDATE one row; COMMIT``, on ``NORMAL`` and
  ``FULL``, the unit the SPEC §8 targets are stated in;
- wall time per fresh idempotent step, with a sync and with an async step function, and
  with a sync one under ``sync_step_inline_us = 100`` (opt-in: run on the loop's thread);
- wall time per fresh guarded (``COST_BEARING``) step, sync and async, on ``NORMAL`` and
  ``FULL``: two acknowledged commits each (intent, result);
- wall time per idempotent step under ``journal_ack_every_step`` (one acknowledged commit
  each), on ``NORMAL`` and ``FULL``;
- wall time per guarded step of 1,000 run at once (``asyncio.gather`` in one workflow):
  their acknowledgements are group committed;
- buffered journal appends per second through the writer (pre-built entries, group
  committed, then flushed);
- steps per second of 500 concurrent executions of 10 async idempotent steps each;
- time to open an engine and resume an execution of 5,000 committed steps to its result;
- the async idempotent and the guarded step again with payload encryption off, to show
  what sealing costs per step.

Everything runs with synchronous=NORMAL (the default) unless the name says ``full``.
Step workloads also record the process's CPU time per step (``cpu_median``, all threads):
on a shared machine it moves less than wall time. The load average before and after the
run is in the JSON, and each SPEC §8 target next to its figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unbroken import Context, Engine, Intent, Step
from unbroken.journal import EntryKind, JournalEntry
from unbroken.storage.sqlite import SqliteStorage
from unbroken.testing import SimulatedCrash, crash_after_step
from unbroken.writer import JournalWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import tree_state

GUARDED = Step.guarded("paid", Intent.COST_BEARING)
FULL = {"sqlite_synchronous": "FULL"}
ACKED = {"journal_ack_every_step": True}
PLAIN = {"encrypt_payloads": False}
INLINE = {"sync_step_inline_us": 100}  # quick sync step functions on the loop's thread


def _sync_op(i: int) -> int:
    return i


async def _async_op(i: int) -> int:
    return i


def _engine(db: Path, **settings: Any) -> Engine:
    engine = Engine(f"sqlite:///{db}", **settings)

    @engine.workflow(name="sync_steps")
    async def sync_steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step("s", _sync_op, i)
        return n

    @engine.workflow(name="async_steps")
    async def async_steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step("s", _async_op, i)
        return n

    @engine.workflow(name="guarded_steps")
    async def guarded_steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step(GUARDED, _sync_op, i)
        return n

    @engine.workflow(name="guarded_parallel_steps")
    async def guarded_parallel_steps(ctx: Context, n: int) -> int:
        await asyncio.gather(*(ctx.step(GUARDED, _async_op, i) for i in range(n)))
        return n

    @engine.workflow(name="guarded_async_steps")
    async def guarded_async_steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step(GUARDED, _async_op, i)
        return n

    return engine


async def _per_step_us(
    db: Path, workflow: str, n: int, **settings: Any
) -> tuple[float, float]:
    async with _engine(db, **settings) as engine:
        await engine.run(workflow, 10)  # warm-up
        cpu, start = time.process_time(), time.perf_counter()
        await engine.run(workflow, n)
        await engine.flush()
        wall = (time.perf_counter() - start) / n * 1e6
        return wall, (time.process_time() - cpu) / n * 1e6


async def _concurrent_steps_per_s(db: Path, executions: int, steps: int) -> float:
    async with _engine(db) as engine:
        await engine.run("async_steps", 2)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(engine.run("async_steps", steps) for _ in range(executions)))
        await engine.flush()
        return executions * steps / (time.perf_counter() - start)


async def _buffered_appends_per_s(db: Path, n: int) -> float:
    storage = SqliteStorage(db)
    storage.open()
    storage.create_execution("bench", "bench", b"", 0)
    writer = JournalWriter(storage)
    writer.start()
    await writer.flush()
    key, payload = bytes(32), bytes(64)
    entries = [
        JournalEntry("bench", 0, i, EntryKind.RESULT, "s", "idempotent", key, payload, 0)
        for i in range(n)
    ]
    start = time.perf_counter()
    for entry in entries:
        writer.append_buffered(entry)
    await writer.flush()
    elapsed = time.perf_counter() - start
    await asyncio.get_running_loop().run_in_executor(None, writer.close)
    storage.close()
    return n / elapsed


def _commit_floor_us(db: Path, synchronous: str, n: int) -> float:
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER)")
        conn.execute("INSERT INTO t VALUES (1, 0)")
        start = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE t SET v = ? WHERE k = 1", (i,))
            conn.execute("COMMIT")
        return (time.perf_counter() - start) / n * 1e6


async def _prepare_resume(db: Path, n: int) -> None:
    engine = _engine(db)
    async with engine:
        with crash_after_step(engine, n - 1), contextlib.suppress(SimulatedCrash):
            await engine.run("async_steps", n + 1, execution_id="resume-me")


async def _resume_ms(db: Path) -> float:
    """Open an engine and resume to the result, as ``compare.py`` times every system (the
    close after it, which checkpoints the log into the database file, is not counted)."""
    start = time.perf_counter()
    async with _engine(db) as engine:
        await engine.run("async_steps", execution_id="resume-me")
        return (time.perf_counter() - start) * 1e3


Figure = float | tuple[float, float]
"""A workload's figure, or its wall figure and its CPU-time counterpart."""


def _measure(fn: Callable[[], Figure], repeats: int) -> dict[str, float]:
    runs = [fn() for _ in range(repeats)]
    samples = [run[0] if isinstance(run, tuple) else run for run in runs]
    result = {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "repeats": repeats,
    }
    cpu = [run[1] for run in runs if isinstance(run, tuple)]
    if cpu:
        result["cpu_median"] = statistics.median(cpu)
    return result


def _targets(results: dict[str, Any]) -> dict[str, float]:
    """SPEC §8's targets for the figures measured, from the commit floors of this run."""
    floors = {
        name: results[f"commit_floor_{name}_us"]["median"]
        for name in ("normal", "full")
        if f"commit_floor_{name}_us" in results
    }
    targets = {
        "idempotent_step_sync_us": 30.0,
        "idempotent_step_sync_inline_us": 30.0,
        "idempotent_step_async_us": 10.0,
        "guarded_step_us": 60.0,
        "guarded_step_async_us": 60.0,
        "buffered_appends_per_s": 100_000.0,
        "concurrent_500x10_steps_per_s": 30_000.0,
        "resume_5000_steps_ms": 25.0,
    }
    if "normal" in floors:
        targets["ack_every_step_async_us"] = floors["normal"] + 40
    if "full" in floors:
        targets["guarded_step_async_full_us"] = 2 * floors["full"] + 40
        targets["ack_every_step_async_full_us"] = floors["full"] + 40
    return {name: value for name, value in targets.items() if name in results}


def _workloads(quick: bool, fresh_db: Callable[[], Path]) -> dict[str, Callable[[], Figure]]:
    """Every workload by name: a function that runs it once and returns its figure."""
    n_fast, n_acked, n_full, n_resume = (500, 200, 100, 5000) if quick else (5000, 2000, 500, 5000)
    n_appends = 20_000 if quick else 100_000

    def steps(workflow: str, n: int, settings: dict[str, Any]) -> Callable[[], Figure]:
        return lambda: asyncio.run(_per_step_us(fresh_db(), workflow, n, **settings))

    def resume_once() -> float:
        db = fresh_db()
        asyncio.run(_prepare_resume(db, n_resume))
        return asyncio.run(_resume_ms(db))

    return {
        "commit_floor_normal_us": lambda: _commit_floor_us(fresh_db(), "NORMAL", 2000),
        "commit_floor_full_us": lambda: _commit_floor_us(fresh_db(), "FULL", 300),
        "idempotent_step_sync_us": steps("sync_steps", n_fast, {}),
        "idempotent_step_sync_inline_us": steps("sync_steps", n_fast, INLINE),
        "idempotent_step_async_us": steps("async_steps", n_fast, {}),
        "guarded_step_us": steps("guarded_steps", n_acked, {}),
        "guarded_step_async_us": steps("guarded_async_steps", n_acked, {}),
        "guarded_step_async_full_us": steps("guarded_async_steps", n_full, FULL),
        "guarded_parallel_1000_us": steps("guarded_parallel_steps", 1000, {}),
        "ack_every_step_async_us": steps("async_steps", n_acked, ACKED),
        "ack_every_step_async_full_us": steps("async_steps", n_full, {**ACKED, **FULL}),
        "buffered_appends_per_s": lambda: asyncio.run(
            _buffered_appends_per_s(fresh_db(), n_appends)
        ),
        "concurrent_500x10_steps_per_s": lambda: asyncio.run(
            _concurrent_steps_per_s(fresh_db(), 500, 10)
        ),
        "idempotent_step_async_unencrypted_us": steps("async_steps", n_fast, PLAIN),
        "guarded_step_unencrypted_us": steps("guarded_steps", n_acked, PLAIN),
        "resume_5000_steps_ms": resume_once,
    }


def run(quick: bool, only: list[str] | None = None) -> dict[str, Any]:
    """Run every workload (or those named in ``only``); return the results."""
    repeats = 3 if quick else 5
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(1_000_000))

        def fresh_db() -> Path:
            return Path(tmp) / f"b{next(counter)}.db"

        for name, workload in _workloads(quick, fresh_db).items():
            if only and name not in only:
                continue
            results[name] = _measure(workload, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these workloads")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = run(args.quick, args.only)
    targets = _targets(results)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "machine": platform.machine(),
        "sqlite_synchronous": "NORMAL unless the name says full",
        "command": "python bench/steps.py" + (" --quick" if args.quick else ""),
        "unbroken_tree": tree_state(),
        "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "results": results,
        "targets": targets,
    }
    print(f"{'workload':<38} {'median':>10} {'min':>10} {'max':>10} {'cpu':>8} {'target':>9}")
    for name, r in results.items():
        cpu = f"{r['cpu_median']:>8.1f}" if "cpu_median" in r else f"{'':>8}"
        target = f"{targets[name]:>9.1f}" if name in targets else ""
        print(f"{name:<38} {r['median']:>10.1f} {r['min']:>10.1f} {r['max']:>10.1f} {cpu} {target}")
    out = args.out or Path(__file__).parent / "results" / f"{datetime.now(UTC):%Y-%m-%d}-steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

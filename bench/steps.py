"""Step cost and resume time of unbroken on SQLite.

Usage: python bench/steps.py [--quick] [--out bench/results/DATE-steps.json]

Measures, on a fresh SQLite database in a temporary directory (synchronous=NORMAL, the
default), each as the median of several repetitions:
- wall time per fresh idempotent step, with a sync and with an async step function;
- wall time per fresh guarded (COST_BEARING) step, sync step function;
- time to open an engine and resume an execution of 5,000 committed steps;
- the async idempotent and the guarded step again with payload encryption off, to show
  what sealing costs per step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from unbroken import Context, Engine, Intent, Step
from unbroken.testing import SimulatedCrash, crash_after_step

GUARDED = Step.guarded("paid", Intent.COST_BEARING)


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

    return engine


async def _per_step_us(db: Path, workflow: str, n: int, **settings: Any) -> float:
    async with _engine(db, **settings) as engine:
        await engine.run(workflow, 10)  # warm-up
        start = time.perf_counter()
        await engine.run(workflow, n)
        await engine.flush()
        return (time.perf_counter() - start) / n * 1e6


async def _prepare_resume(db: Path, n: int) -> None:
    engine = _engine(db)
    async with engine:
        with crash_after_step(engine, n - 1), contextlib.suppress(SimulatedCrash):
            await engine.run("async_steps", n + 1, execution_id="resume-me")


async def _resume_ms(db: Path) -> float:
    start = time.perf_counter()
    async with _engine(db) as engine:
        await engine.run("async_steps", execution_id="resume-me")
    return (time.perf_counter() - start) * 1e3


def _measure(fn: Any, repeats: int) -> dict[str, float]:
    samples = [fn() for _ in range(repeats)]
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "repeats": repeats,
    }


def run(quick: bool) -> dict[str, Any]:
    """Run every workload; return the results."""
    repeats = 3 if quick else 5
    n_fast, n_guarded, n_resume = (500, 200, 5000) if quick else (5000, 1000, 5000)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(1_000_000))

        def fresh_db() -> Path:
            return Path(tmp) / f"b{next(counter)}.db"

        plain = {"encrypt_payloads": False}
        for label, workflow, n, settings in (
            ("idempotent_step_sync_us", "sync_steps", n_fast, {}),
            ("idempotent_step_async_us", "async_steps", n_fast, {}),
            ("guarded_step_us", "guarded_steps", n_guarded, {}),
            ("idempotent_step_async_unencrypted_us", "async_steps", n_fast, plain),
            ("guarded_step_unencrypted_us", "guarded_steps", n_guarded, plain),
        ):
            results[label] = _measure(
                lambda w=workflow, k=n, s=settings: asyncio.run(
                    _per_step_us(fresh_db(), w, k, **s)
                ),
                repeats,
            )

        def resume_once() -> float:
            db = fresh_db()
            asyncio.run(_prepare_resume(db, n_resume))
            return asyncio.run(_resume_ms(db))

        results["resume_5000_steps_ms"] = _measure(resume_once, repeats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    results = run(args.quick)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "sqlite_synchronous": "NORMAL",
        "results": results,
    }
    print(f"{'workload':<38} {'median':>10} {'min':>10} {'max':>10}")
    for name, r in results.items():
        print(f"{name:<38} {r['median']:>10.1f} {r['min']:>10.1f} {r['max']:>10.1f}")
    out = args.out or Path(__file__).parent / "results" / f"{datetime.now(UTC):%Y-%m-%d}-steps.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

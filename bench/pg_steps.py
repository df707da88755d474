"""Write-path cost of unbroken on PostgreSQL.

Usage: python bench/pg_steps.py [--url URL] [--quick] [--repeats N] [--out FILE.json]

The URL defaults to ``UNBROKEN_TEST_POSTGRES_URL``; every repetition runs in a fresh schema
of that database, dropped afterwards. ``UNBROKEN_KEY`` is set to a fresh key when unset
(encryption is mandatory on PostgreSQL). Each figure is the median of several repetitions:

- ``commit_floor_us``: one ``INSERT`` and its ``COMMIT`` on a plain psycopg connection, the
  cost of one durable commit on this server (what SPEC §8 calls a commit floor);
- ``append_one_us``: ``PostgresStorage.append`` of one signed entry for an owned execution
  (fence, insert, high-water mark, commit): the storage half of one acknowledged append;
- ``guarded_step_us``: wall time per fresh guarded (``COST_BEARING``) step, two
  acknowledged appends each;
- ``idempotent_step_us``: wall time per fresh idempotent step (buffered, group committed);
- ``acked_step_us``: the same with ``journal_ack_every_step``: one acknowledged append each;
- ``guarded_16_step_us`` and ``acked_16_step_us``: wall time per step of those two with 16
  executions running at once (what concurrency gains: their appends share statements);
- ``empty_workflow_ms``: start→result of a workflow with no steps, sequentially.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from unbroken import Context, Engine, Intent, Step
from unbroken.ids import lock_name
from unbroken.journal import EntryKind, JournalEntry
from unbroken.storage.postgres import PostgresStorage

GUARDED = Step.guarded("paid", Intent.COST_BEARING)
ACK_EVERY_STEP: dict[str, Any] = {"journal_ack_every_step": True}


def _op(i: int) -> int:
    return i


async def _async_op(i: int) -> int:
    return i


def _schema_url(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


@contextmanager
def _fresh_schema(url: str) -> Iterator[str]:
    """The URL of a new, empty schema, dropped with everything in it afterwards."""
    name = f"bench_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        yield _schema_url(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


def _engine(url: str, **settings: Any) -> Engine:
    engine = Engine(url, **settings)

    @engine.workflow(name="guarded_steps")
    async def guarded_steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step(GUARDED, _op, i)
        return n

    @engine.workflow(name="idempotent_steps")
    async def idempotent_steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step("s", _async_op, i)
        return n

    @engine.workflow(name="empty")
    async def empty(ctx: Context) -> None:
        return None

    return engine


def commit_floor_us(url: str, n: int) -> float:
    """Per ``INSERT`` + ``COMMIT`` on one plain connection (a durable commit each)."""
    with _fresh_schema(url) as schema_url, psycopg.connect(schema_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE floor (id BIGSERIAL PRIMARY KEY, v BYTEA)")
        start = time.perf_counter()
        for _ in range(n):
            conn.execute("INSERT INTO floor (v) VALUES (%s)", (b"x" * 64,))
        return (time.perf_counter() - start) / n * 1e6


def append_one_us(url: str, n: int) -> float:
    """Per ``append`` of one signed result entry for an execution this storage owns."""
    with _fresh_schema(url) as schema_url:
        storage = PostgresStorage(schema_url)
        storage.open()
        try:
            eid = "bench-append"
            storage.create_execution(eid, "wf", b"", 0)
            assert storage.try_lock(lock_name(eid)) is None
            key = secrets.token_bytes(32)

            def entry(step: int) -> JournalEntry:
                return JournalEntry(
                    eid, 0, step, EntryKind.RESULT, "s", "idempotent", key, b"v" * 64, step
                )

            def signer(execution_id: str, count: int) -> bytes:
                return secrets.token_bytes(33)

            for step in range(20):  # warm-up (prepared statements, caches)
                storage.append([entry(step)], signer)
            start = time.perf_counter()
            for step in range(20, 20 + n):
                storage.append([entry(step)], signer)
            return (time.perf_counter() - start) / n * 1e6
        finally:
            storage.close()


async def _per_step_us(url: str, workflow: str, n: int, **settings: Any) -> float:
    async with _engine(url, **settings) as engine:
        await engine.run(workflow, 10)  # warm-up
        start = time.perf_counter()
        await engine.run(workflow, n)
        await engine.flush()
        return (time.perf_counter() - start) / n * 1e6


async def _concurrent_per_step_us(
    url: str, workflow: str, n: int, executions: int, **settings: Any
) -> float:
    async with _engine(url, **settings) as engine:
        await engine.run(workflow, 10)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(engine.run(workflow, n) for _ in range(executions)))
        await engine.flush()
        return (time.perf_counter() - start) / (n * executions) * 1e6


async def _empty_ms(url: str, n: int) -> float:
    async with _engine(url) as engine:
        for _ in range(10):  # warm-up
            await engine.run("empty")
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await engine.run("empty")
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3


def _measure(fn: Callable[[], float], repeats: int) -> dict[str, float]:
    samples = [fn() for _ in range(repeats)]
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "repeats": repeats,
    }


def run(url: str, quick: bool, repeats: int) -> dict[str, Any]:
    """Run every workload; return the results."""
    n_floor, n_guarded, n_idem, n_empty = (200, 100, 500, 50) if quick else (1000, 500, 3000, 200)

    def in_schema(fn: Callable[[str], Any]) -> Callable[[], float]:
        def once() -> float:
            with _fresh_schema(url) as schema_url:
                return float(asyncio.run(fn(schema_url)))

        return once

    return {
        "commit_floor_us": _measure(lambda: commit_floor_us(url, n_floor), repeats),
        "append_one_us": _measure(lambda: append_one_us(url, n_floor), repeats),
        "guarded_step_us": _measure(
            in_schema(lambda u: _per_step_us(u, "guarded_steps", n_guarded)), repeats
        ),
        "idempotent_step_us": _measure(
            in_schema(lambda u: _per_step_us(u, "idempotent_steps", n_idem)), repeats
        ),
        "acked_step_us": _measure(
            in_schema(lambda u: _per_step_us(u, "idempotent_steps", n_guarded, **ACK_EVERY_STEP)),
            repeats,
        ),
        "guarded_16_step_us": _measure(
            in_schema(lambda u: _concurrent_per_step_us(u, "guarded_steps", n_guarded // 4, 16)),
            repeats,
        ),
        "acked_16_step_us": _measure(
            in_schema(
                lambda u: _concurrent_per_step_us(
                    u, "idempotent_steps", n_guarded // 4, 16, **ACK_EVERY_STEP
                )
            ),
            repeats,
        ),
        "empty_workflow_ms": _measure(in_schema(lambda u: _empty_ms(u, n_empty)), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("UNBROKEN_TEST_POSTGRES_URL", ""))
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per figure")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if not args.url:
        parser.error("pass --url or set UNBROKEN_TEST_POSTGRES_URL")
    if not os.environ.get("UNBROKEN_KEY"):
        os.environ["UNBROKEN_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()
    results = run(args.url, args.quick, max(args.repeats, 1))
    print(f"{'workload':<22} {'median':>10} {'min':>10} {'max':>10}")
    for name, r in results.items():
        print(f"{name:<22} {r['median']:>10.1f} {r['min']:>10.1f} {r['max']:>10.1f}")
    if args.out is not None:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()

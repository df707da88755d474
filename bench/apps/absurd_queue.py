"""Absurd in bench/workers.py: a task of three steps, its worker and its enqueuer.

    python bench/apps/absurd_queue.py enqueue --db-url URL --executions N
    python bench/apps/absurd_queue.py worker --db-url URL --concurrency C --poll SECONDS

The driver installs Absurd's schema and the queue ``bench`` in a template database with
``absurdctl init`` and ``absurdctl create-queue``. A worker is an ``AsyncAbsurd`` client
on its own connection running ``start_worker(concurrency=C, poll_interval=...)`` until
SIGTERM. The enqueuer is an ``AsyncAbsurd`` client on a connection it opened without
autocommit: all N ``spawn`` calls run in one transaction, committed when the driver says
``go``, so the work appears at once while the workers are already polling.

Each ``ctx.step`` checkpoint is committed before the task moves on: it compares with
unbroken's guarded steps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

import psycopg
from absurd_sdk import AsyncAbsurd
from gate import QUEUE, STEPS, say, stamp, wait_go_async


async def value(i: int) -> int:
    return i


def register(app: AsyncAbsurd) -> None:
    @app.register_task("three")
    async def three(params: Any, ctx: Any) -> int:
        total = 0
        for i in range(STEPS):
            total += await ctx.step(f"s{i}", lambda i=i: value(i))
        return total


async def work(url: str, concurrency: int, poll: float) -> None:
    app = AsyncAbsurd(url, queue_name=QUEUE)
    register(app)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, app.stop_worker)
    await app.list_queues()  # connected (and the queue is there) before saying ready
    say("ready")
    await app.start_worker(
        worker_id=f"bench-{os.getpid()}",
        concurrency=concurrency,
        poll_interval=poll,
        claim_timeout=120,
    )


async def enqueue(url: str, executions: int) -> None:
    conn = await psycopg.AsyncConnection.connect(url, autocommit=False)
    app = AsyncAbsurd(conn, queue_name=QUEUE)
    register(app)
    for i in range(executions):
        await app.spawn("three", {"n": i}, max_attempts=5)
    say("prepared")
    if not await wait_go_async():
        await conn.rollback()
        return
    at = stamp()
    await conn.commit()
    say("committed", at)
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("enqueue", "worker"))
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--executions", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--poll", type=float, default=0.01)
    args = parser.parse_args()
    if args.role == "enqueue":
        asyncio.run(enqueue(args.db_url, args.executions))
    else:
        asyncio.run(work(args.db_url, args.concurrency, args.poll))


if __name__ == "__main__":
    main()

"""unbroken in bench/workers.py: a workflow of three steps, its worker and its enqueuer.

    python bench/apps/unbroken_queue.py enqueue --executions N --workflow three[_guarded]
    python bench/apps/unbroken_queue.py worker --concurrency C

The database and key come from ``UNBROKEN_DATABASE_URL`` and ``UNBROKEN_KEY``, as for
``unbroken worker``. Both workflows run three async steps that return a small value at
once: ``three`` with default (idempotent) steps, durable within one group commit;
``three_guarded`` with ``Step.guarded(..., Intent.COST_BEARING)`` steps, whose intent is
committed before the step function runs and whose result is committed before the step
returns (the like-for-like case against a DBOS step or an Absurd checkpoint).

unbroken has no batch enqueue, so the enqueuer puts all N executions in the queue first
(one commit each), and the workers are gated instead: each opens its engine (schema,
recovery, listeners), prints ``ready``, and enters ``run_worker`` (the loop that
``unbroken worker`` runs) when the driver says ``go``. SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from gate import QUEUE, STEPS, say, wait_go_async

from unbroken import Context, Engine, Intent, Step
from unbroken.worker import run_worker

engine = Engine()

GUARDED = [Step.guarded(f"s{i}", Intent.COST_BEARING) for i in range(STEPS)]


async def value(i: int) -> int:
    return i


@engine.workflow(name="three")
async def three(ctx: Context, n: int) -> int:
    total = 0
    for i in range(STEPS):
        total += await ctx.step(f"s{i}", value, i)
    return total


@engine.workflow(name="three_guarded")
async def three_guarded(ctx: Context, n: int) -> int:
    total = 0
    for i in range(STEPS):
        total += await ctx.step(GUARDED[i], value, i)
    return total


async def enqueue(executions: int, workflow: str) -> None:
    async with engine:
        for i in range(executions):
            await engine.enqueue(workflow, i, execution_id=f"e{i:06d}", queue=QUEUE)
    say("committed")


async def work(concurrency: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with engine:
        say("ready")
        if await wait_go_async():
            await run_worker(engine, queues=[QUEUE], concurrency=concurrency, stop=stop)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("enqueue", "worker"))
    parser.add_argument("--executions", type=int, default=0)
    parser.add_argument("--workflow", default="three", choices=("three", "three_guarded"))
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if args.role == "enqueue":
        asyncio.run(enqueue(args.executions, args.workflow))
    else:
        asyncio.run(work(args.concurrency))


if __name__ == "__main__":
    main()

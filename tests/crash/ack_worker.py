"""A crash-test worker for the every-step-acknowledged mode: it SIGKILLs itself right after
a step returns, without flushing anything.

Run as a script by ``test_ack_every_step.py``::

    python ack_worker.py DB OPS_LOG --steps N --kill-after K --marker FILE

The workflow runs N idempotent steps (even ones sync, odd ones async); each operation
appends its step id to OPS_LOG, so the test counts how often each one ran. With a flush
interval of ten minutes nothing buffered is ever group committed before the kill: only an
acknowledgement (``UNBROKEN_JOURNAL_ACK_EVERY_STEP``, read from the environment) makes a
result durable. Right after step K returns the worker creates the marker and SIGKILLs
itself, unless the marker exists (the resumed run goes through and prints ``{"result": N}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from unbroken import Context, Engine

OPS_LOG = ""


def record(step: int) -> int:
    """The sync operation (it runs in a worker thread): note that ``step`` ran."""
    fd = os.open(OPS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{step}\n".encode())
    finally:
        os.close(fd)
    return step


async def record_async(step: int) -> int:
    """The async operation (it runs on the event loop)."""
    return record(step)


def _die(marker: str) -> None:
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


async def main(args: argparse.Namespace) -> int:
    global OPS_LOG
    OPS_LOG = args.ops_log
    engine = Engine("sqlite:///" + args.db, journal_flush_interval_ms=600_000)

    @engine.workflow(name="crash.ack")
    async def steps(ctx: Context, n: int) -> int:
        for i in range(n):
            await ctx.step(f"s{i}", record if i % 2 == 0 else record_async, i)
            if i == args.kill_after and not os.path.exists(args.marker):
                _die(args.marker)
        return n

    async with engine:
        result = await engine.run(steps, args.steps, execution_id="ack-1")
    print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("ops_log")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--kill-after", type=int, required=True)
    parser.add_argument("--marker", required=True)
    sys.exit(asyncio.run(main(parser.parse_args())))

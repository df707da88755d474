"""The Restate services measured by restate_adapter.py, served by hypercorn.

Served in its own process by ``python -m peers.restate_serve PORT`` (run from bench/),
registered with the Restate server's admin API, and invoked through the server's HTTP
ingress. Each ``ctx.run_typed`` result is journaled by the server
before the handler continues, so a Restate step compares with unbroken's acknowledged
(guarded) class.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import restate

from peers.common import payload

_CRASH_AT = int(os.environ.get("BENCH_RESTATE_CRASH_AT", "0")) or None
_RETRY_FAST = restate.InvocationRetryPolicy(
    initial_interval=timedelta(milliseconds=10),
    exponentiation_factor=1.0,
    max_interval=timedelta(milliseconds=10),
    max_attempts=1_000_000,  # keep retrying while the service is down; never pause
)

bench = restate.Service("Bench")
resume_svc = restate.Service("Resume", invocation_retry_policy=_RETRY_FAST)
promise_wf = restate.Workflow("PromiseWf")


async def _result(size: int) -> str:
    return payload(size)


async def _wall() -> float:
    return time.time()


async def _lateness(t0: float, duration: float) -> float:
    return (time.time() - t0 - duration) * 1e3


@bench.handler()
async def empty(ctx: restate.Context) -> None:
    return None


@bench.handler()
async def steps(ctx: restate.Context, req: dict[str, Any]) -> int:
    n, size = req["n"], req["size"]
    for _ in range(n):
        await ctx.run_typed("s", _result, restate.RunOptions(), size)
    return n


@bench.handler()
async def fanout(ctx: restate.Context, req: dict[str, Any]) -> int:
    n, size = req["n"], req["size"]
    futures = [ctx.run_typed(f"s{i}", _result, restate.RunOptions(), size) for i in range(n)]
    await restate.gather(*futures)
    return n


@bench.handler()
async def timer(ctx: restate.Context, req: dict[str, Any]) -> list[float]:
    count, duration = req["count"], req["duration"]
    late = []
    for k in range(count):
        t0 = await ctx.run_typed(f"t0-{k}", _wall)
        await ctx.sleep(timedelta(seconds=duration))
        late.append(await ctx.run_typed(f"late-{k}", _lateness, restate.RunOptions(), t0, duration))
    return late


async def _numbered(i: int) -> int:
    if _CRASH_AT is not None and i == _CRASH_AT:
        os._exit(0)  # the server has journaled every earlier step
    return i


@resume_svc.handler()
async def run(ctx: restate.Context, n: int) -> int:
    for i in range(n + 1):
        await ctx.run_typed("s", _numbered, restate.RunOptions(), i)
    return n


@promise_wf.main()
async def wait(ctx: restate.WorkflowContext) -> str:
    return await ctx.promise("p").value()


@promise_wf.handler()
async def resolve(ctx: restate.WorkflowSharedContext, value: str) -> None:
    await ctx.promise("p").resolve(value)


app = restate.app(services=[bench, resume_svc, promise_wf])

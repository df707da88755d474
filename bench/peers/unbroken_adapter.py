"""unbroken, through its public API only (``Engine``, ``ctx.step``, ``Step.guarded``).

Durability classes, measured separately and labelled in every figure:
- ``buffered (idempotent)``: ``ctx.step(name, fn)``; the result is group committed with
  others (within ``journal_flush_interval_ms``, 10 ms), so it is durable within one group
  commit, not before the next step starts;
- ``acknowledged (guarded)``: ``ctx.step(Step.guarded(name, Intent.COST_BEARING), fn)``;
  the intent is committed before ``fn`` runs and the result before the step returns.

An execution's start and its final output are acknowledged in both classes, so every
start→result figure ends with everything committed. Encryption is on (the default): on
SQLite the key is the ``<database>.key`` file made at first open, on PostgreSQL the
driver sets ``UNBROKEN_KEY`` to a fresh key.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from unbroken import Context, Engine, Intent, Step

from .common import Env, Skip, now, payload, record, size_label, tagged

GUARDED = Step.guarded("s", Intent.COST_BEARING)
CLASSES = {"buffered (idempotent)": "s", "acknowledged (guarded)": GUARDED}

_PROMISES: asyncio.Queue[tuple[str, str]] | None = None
_CRASH_AT: int | None = None  # resume_prepare: the process dies when this step starts
_ENGINE: Engine | None = None


async def _result(size: int) -> str:
    return payload(size)


def _result_sync(size: int) -> str:
    return payload(size)


async def _maybe_die(i: int) -> int:
    if _CRASH_AT is not None and i == _CRASH_AT and _ENGINE is not None:
        await _ENGINE.flush()  # every earlier step committed, then a hard exit
        os._exit(0)
    return i


def make_engine(env: Env) -> Engine:
    global _ENGINE
    engine = Engine(env.db_url)
    _ENGINE = engine

    @engine.workflow(name="empty")
    async def empty(ctx: Context) -> None:
        return None

    @engine.workflow(name="steps")
    async def steps(ctx: Context, n: int, size: int, cls: str) -> int:
        desc = CLASSES[cls]
        for _ in range(n):
            await ctx.step(desc, _result, size)
        return n

    @engine.workflow(name="steps_sync_fn")
    async def steps_sync_fn(ctx: Context, n: int, size: int) -> int:
        for _ in range(n):
            await ctx.step("s", _result_sync, size)
        return n

    @engine.workflow(name="fanout")
    async def fanout(ctx: Context, n: int, size: int, cls: str) -> int:
        desc = CLASSES[cls]
        await asyncio.gather(*(ctx.step(desc, _result, size) for _ in range(n)))
        return n

    @engine.workflow(name="resume")
    async def resume(ctx: Context, n: int) -> int:
        for i in range(n + 1):
            await ctx.step("s", _maybe_die, i)
        return n

    @engine.workflow(name="timer")
    async def timer(ctx: Context, count: int, duration: float) -> list[float]:
        late = []
        for _ in range(count):
            t0 = await ctx.step("t0", time.time)
            await ctx.sleep(duration)
            late.append((time.time() - t0 - duration) * 1e3)
        return late

    @engine.workflow(name="promise")
    async def promise(ctx: Context) -> Any:
        p = await ctx.promise("p")
        assert _PROMISES is not None
        _PROMISES.put_nowait((p.id, p.token))
        return await p

    return engine


async def run(
    workloads: list[str], params: dict[str, dict[str, Any]], env: Env
) -> list[dict[str, Any]]:
    out = []
    for workload in workloads:
        out += tagged(workload, await _run(workload, params[workload], env))
    return out


async def _run(workload: str, params: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    if workload == "resume":
        return await _resume(params, env)
    if workload == "resume_prepare":
        return await _resume_prepare(params, env)
    engine = make_engine(env)
    async with engine:
        await engine.run("steps", 20, 100, "buffered (idempotent)")  # warm-up
        await engine.run("steps", 5, 100, "acknowledged (guarded)")
        fn = {
            "empty": _empty,
            "steps": _steps,
            "fanout": _fanout,
            "concurrent": _concurrent,
            "timer": _timer,
            "promise": _promise,
        }.get(workload)
        if fn is None:
            raise Skip(f"unknown workload {workload!r}")
        return await fn(engine, params)


async def _empty(engine: Engine, p: dict[str, Any]) -> list[dict[str, Any]]:
    count = p["count"]
    start = now()
    for _ in range(count):
        await engine.run("empty")
    per = (now() - start) / count * 1e6
    return [record(f"×{count} sequential", "µs/execution", per)]


async def _steps(engine: Engine, p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n, size, execs in p["cases"]:
        for cls in CLASSES:
            start = now()
            for _ in range(execs):
                await engine.run("steps", n, size, cls)
            per = (now() - start) / (n * execs) * 1e6
            case = f"N={n}, {size_label(size)}"
            out.append(record(case, "µs/step", per, durability=cls))
    n, size = p.get("sync_fn_case", (0, 0))
    if n:  # the same buffered steps with a plain (sync) step function
        start = now()
        await engine.run("steps_sync_fn", n, size)
        per = (now() - start) / n * 1e6
        case = f"N={n}, {size_label(size)}, sync step fn"
        out.append(record(case, "µs/step", per, durability="buffered (idempotent)"))
    return out


async def _fanout(engine: Engine, p: dict[str, Any]) -> list[dict[str, Any]]:
    n, size = p["n"], p["size"]
    out = []
    for cls in CLASSES:
        start = now()
        await engine.run("fanout", n, size, cls)
        per = (now() - start) / n * 1e6
        out.append(record(f"parallel, {size_label(size)}", "µs/step", per, durability=cls))
    return out


async def _concurrent(engine: Engine, p: dict[str, Any]) -> list[dict[str, Any]]:
    execs, steps, size = p["execs"], p["steps"], p["size"]
    out = []
    for cls in CLASSES:
        start = now()
        await asyncio.gather(*(engine.run("steps", steps, size, cls) for _ in range(execs)))
        wall = now() - start
        per = wall / (execs * steps) * 1e6
        case = f"{steps} steps each"
        out.append(record(case, "µs/step", per, durability=cls))
    return out


async def _timer(engine: Engine, p: dict[str, Any]) -> list[dict[str, Any]]:
    count, duration = p["count"], p["duration"]
    late = await engine.run("timer", count, duration)
    med = sorted(late)[len(late) // 2]
    case = f"sleep {duration * 1e3:.0f} ms ×{count}"
    return [record(case, "ms late", med, samples=late)]


async def _promise(engine: Engine, p: dict[str, Any]) -> list[dict[str, Any]]:
    global _PROMISES
    _PROMISES = asyncio.Queue()
    samples = []
    for _ in range(p["count"]):
        handle = await engine.start("promise")
        pid, token = await _PROMISES.get()
        await asyncio.sleep(p.get("settle", 0.05))  # the execution is parked on the promise
        start = now()
        await engine.resolve_promise(pid, token, "ok")
        assert await handle.result() == "ok"
        samples.append((now() - start) * 1e6)
    med = sorted(samples)[len(samples) // 2]
    note = "resolved in the waiting engine's process"
    return [record(f"×{p['count']}", "µs/round trip", med, samples=samples, note=note)]


async def _resume_prepare(params: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    global _CRASH_AT
    _CRASH_AT = params["n"]
    engine = make_engine(env)
    async with engine:
        await engine.run("resume", params["n"], execution_id="resume-me")
    raise RuntimeError("the prepare run should have exited at its last step")


async def _resume(params: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    n = params["n"]
    start = now()
    engine = make_engine(env)  # opening recovers the orphan at once
    async with engine:
        assert await engine.run("resume", execution_id="resume-me") == n
        wall = now() - start
    return [
        record("crash, then open and resume", "ms/resume", wall * 1e3),
        record("same, per committed step", "µs/step", wall / n * 1e6),
    ]

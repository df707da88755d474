"""unbroken, through its public API only (``Engine``, ``ctx.step``, ``Step.guarded``).

Durability classes, measured separately and labelled in every figure:
- ``buffered (idempotent)``: ``ctx.step(name, fn)``; the result is group committed with
  others (within ``journal_flush_interval_ms``, 10 ms), so it is durable within one group
  commit, not before the next step starts;
- ``acknowledged (guarded)``: ``ctx.step(Step.guarded(name, Intent.COST_BEARING), fn)``;
  the intent is committed before ``fn`` runs and the result before the step returns;
- ``acknowledged every step (idempotent)``: ``ctx.step(name, fn)`` on an engine with
  ``journal_ack_every_step = true``: the result is committed before the step returns
  (sequential steps only, one case).

An execution's start and its final output are acknowledged in both classes, so every
start→result figure ends with everything committed. Encryption is on (the default): on
SQLite the key is the ``<database>.key`` file made at first open, on PostgreSQL the
driver sets ``UNBROKEN_KEY`` to a fresh key.

Resume workloads open an engine on a journal a crashed process left behind and time it
until the execution's result is back; the step cap is off (``max_steps_per_execution =
0``) so any length resumes. A journal of ``"bulk": true`` size is written straight
through the storage API (sealed results, keys and the signed high-water mark exactly as
the engine writes them) rather than by running the steps, which would take minutes;
the engine resumes it for real. The PostgreSQL driver is imported with the adapter,
before any clock starts, as the peers' adapters import theirs.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import resource
import time
from typing import Any

from unbroken import Context, Engine, Intent, Step
from unbroken.config import load_config
from unbroken.effects import as_step
from unbroken.ids import idempotency_key
from unbroken.journal import EntryKind, JournalEntry
from unbroken.payloads import open_payloads
from unbroken.storage import open_storage

from .common import Env, Skip, now, payload, record, size_label, tagged

RESUME_ID = "resume-me"
RESUMES = ("resume", "resume_small", "resume_large")
BULK_BATCH = 50_000

GUARDED = Step.guarded("s", Intent.COST_BEARING)
CLASSES = {"buffered (idempotent)": "s", "acknowledged (guarded)": GUARDED}
EVERY_STEP = "acknowledged every step (idempotent)"

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


def make_engine(env: Env, **settings: Any) -> Engine:
    global _ENGINE
    engine = Engine(env.db_url, **settings)
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
    if env.backend == "postgres":  # process start-up, not engine open (as for the peers)
        importlib.import_module("unbroken.storage.postgres")
    out = []
    for workload in workloads:
        out += tagged(workload, await _run(workload, params[workload], env))
    return out


async def _run(workload: str, params: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    if workload in RESUMES:
        return await _resume(params, env)
    if workload == "resume_prepare":
        if params.get("bulk"):
            return _bulk_journal(params["n"], env)
        return await _resume_prepare(params, env)
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
    engine = make_engine(env)
    async with engine:
        await _warm_up(engine)
        out = await fn(engine, params)
    if workload != "steps":
        return out
    # Settings are per engine: these cases get an engine of their own.
    n, size = params.get("ack_every_step_case", (0, 0))
    if n:
        per = await _own_engine_per_step(env, {"journal_ack_every_step": True}, "steps", n,
                                         size, "buffered (idempotent)")  # fmt: skip
        out.append(record(f"N={n}, {size_label(size)}", "µs/step", per, durability=EVERY_STEP))
    n, size = params.get("sync_fn_case", (0, 0))
    if n:  # sync step functions on the loop's thread once quick (opt-in)
        per = await _own_engine_per_step(env, {"sync_step_inline_us": INLINE_US},
                                         "steps_sync_fn", n, size)  # fmt: skip
        case = f"N={n}, {size_label(size)}, sync step fn, sync_step_inline_us={INLINE_US}"
        out.append(record(case, "µs/step", per, durability="buffered (idempotent)"))
    return out


async def _per_step_us(engine: Engine, workflow: str, n: int, *args: Any) -> float:
    """µs per step of one run of ``workflow`` with ``n`` steps."""
    start = now()
    await engine.run(workflow, n, *args)
    return (now() - start) / n * 1e6


async def _own_engine_per_step(
    env: Env, settings: dict[str, Any], workflow: str, n: int, *args: Any
) -> float:
    """``_per_step_us`` on a warmed-up engine of its own with ``settings``."""
    engine = make_engine(env, **settings)
    async with engine:
        await _warm_up(engine)
        return await _per_step_us(engine, workflow, n, *args)


INLINE_US = 100  # ``sync_step_inline_us`` of the opted-in sync step case


async def _warm_up(engine: Engine) -> None:
    await engine.run("steps", 20, 100, "buffered (idempotent)")
    await engine.run("steps", 5, 100, "acknowledged (guarded)")


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
    if n:  # the same buffered steps with a plain (sync) step function, in worker threads
        per = await _per_step_us(engine, "steps_sync_fn", n, size)
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
    engine = make_engine(env, max_steps_per_execution=0)
    async with engine:
        await engine.run("resume", params["n"], execution_id=RESUME_ID)
    raise RuntimeError("the prepare run should have exited at its last step")


def _bulk_journal(n: int, env: Env) -> list[dict[str, Any]]:
    """What ``_resume_prepare`` leaves behind, written through the storage API: a
    ``running`` execution of ``resume(n)`` whose steps 0..n-1 are committed results."""
    config = load_config(env.db_url, {})
    storage = open_storage(env.db_url)
    storage.open()
    try:
        payloads = open_payloads(storage, config)
        inputs = payloads.seal(
            {"args": (n,), "kwargs": {}}, "inputs", execution_id=RESUME_ID, kind="inputs"
        )
        at = time.time_ns() // 1_000_000
        storage.create_execution(RESUME_ID, "resume", inputs, at)
        key_input = as_step("s").key_input
        for start in range(0, n, BULK_BATCH):
            batch = []
            for i in range(start, min(start + BULK_BATCH, n)):
                key = idempotency_key(RESUME_ID, i, key_input)
                sealed = payloads.seal(
                    i, "result", execution_id=RESUME_ID, step_id=i, kind="result", idem_key=key
                )
                batch.append(
                    JournalEntry(
                        RESUME_ID, 0, i, EntryKind.RESULT, "s", "idempotent", key, sealed, at
                    )
                )
            storage.append(batch, payloads.signer)
    finally:
        storage.close()
    return []


async def _resume(params: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    n = params["n"]
    start = now()
    engine = make_engine(env, max_steps_per_execution=0)  # opening recovers the orphan
    async with engine:
        assert await engine.run("resume", execution_id=RESUME_ID) == n
        wall = now() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return [
        record("crash, then open and resume", "ms/resume", wall * 1e3),
        record("same, per committed step", "µs/step", wall / n * 1e6),
        record("peak RSS of the resuming process", "MiB", peak),
    ]

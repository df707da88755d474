"""Absurd (PostgreSQL-only durable tasks), through its Python SDK ``absurd_sdk``.

The driver installs the schema into this run's fresh database with ``absurdctl init``
and creates the queue ``bench`` with ``absurdctl create-queue``. One ``AsyncAbsurd``
worker (its own connection, ``start_worker``) runs the registered tasks; a second client
(its own connection) spawns tasks and reads their results with ``fetch_task_result``.
Each ``ctx.step`` checkpoint is written with an autocommit statement before the task
moves on, so an Absurd step is durable before the next starts: it compares with
unbroken's acknowledged (guarded) class.

Settings that are not the SDK's defaults, chosen so polling does not dominate: the worker
polls for work every 10 ms (default 250 ms) and the client polls a task's result every
2 ms (the SDK's ``await_task_result`` backs off from 50 ms).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from absurd_sdk import AsyncAbsurd

from .common import Env, Skip, now, payload, record, require_known, size_label, tagged

QUEUE = "bench"
DURABLE = "every step committed before the next"
WORKER_POLL = 0.01
RESULT_POLL = 0.002
_CRASH_AT: int | None = None


async def _result(size: int) -> str:
    return payload(size)


async def _wall() -> float:
    return time.time()


def _register(app: AsyncAbsurd) -> None:
    @app.register_task("empty")
    async def empty(params: Any, ctx: Any) -> None:
        return None

    @app.register_task("steps")
    async def steps(params: Any, ctx: Any) -> int:
        n, size = params["n"], params["size"]
        for _ in range(n):
            await ctx.step("s", lambda: _result(size))
        return n

    @app.register_task("fanout")
    async def fanout(params: Any, ctx: Any) -> int:
        n, size = params["n"], params["size"]
        await asyncio.gather(*(ctx.step(f"s{i}", lambda: _result(size)) for i in range(n)))
        return n

    @app.register_task("resume")
    async def resume(params: Any, ctx: Any) -> int:
        n = params["n"]
        for i in range(n + 1):

            async def numbered(i: int = i) -> int:
                if _CRASH_AT is not None and i == _CRASH_AT:
                    os._exit(0)  # every earlier checkpoint is committed
                return i

            await ctx.step("s", numbered)
        return n

    @app.register_task("timer")
    async def timer(params: Any, ctx: Any) -> list[float]:
        count, duration = params["count"], params["duration"]
        late = []
        for k in range(count):
            t0 = await ctx.step(f"t0-{k}", _wall)
            await ctx.sleep_for(f"sleep-{k}", duration)

            async def lateness(t0: float = t0) -> float:
                return (time.time() - t0 - duration) * 1e3

            late.append(await ctx.step(f"late-{k}", lateness))
        return late

    @app.register_task("promise")
    async def promise(params: Any, ctx: Any) -> Any:
        return await ctx.await_event(params["event"])


class _Client:
    def __init__(self, env: Env, concurrency: int, claim_timeout: int = 120) -> None:
        self.worker = AsyncAbsurd(env.db_url, queue_name=QUEUE)
        _register(self.worker)
        self.client = AsyncAbsurd(env.db_url, queue_name=QUEUE)
        _register(self.client)
        self.concurrency = concurrency
        self.claim_timeout = claim_timeout
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Client:
        self._task = asyncio.create_task(
            self.worker.start_worker(
                worker_id=f"bench-{os.getpid()}",
                claim_timeout=self.claim_timeout,
                concurrency=self.concurrency,
                poll_interval=WORKER_POLL,
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.worker.stop_worker()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except TimeoutError:
                self._task.cancel()
        await self.worker.close()
        await self.client.close()

    async def spawn(self, name: str, params: Any) -> str:
        spawned = await self.client.spawn(name, params, max_attempts=5)
        return str(spawned["task_id"])

    async def result(self, task_id: str, limit: float = 300) -> Any:
        deadline = time.monotonic() + limit
        while True:
            snap = await self.client.fetch_task_result(task_id)
            if snap is not None and snap.state == "completed":
                return snap.result
            if snap is not None and snap.state in ("failed", "cancelled"):
                raise RuntimeError(f"task {task_id} {snap.state}: {json.dumps(snap.failure)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} did not finish in {limit} s")
            await asyncio.sleep(RESULT_POLL)

    async def call(self, name: str, params: Any) -> Any:
        return await self.result(await self.spawn(name, params))


async def run(
    workloads: list[str], params: dict[str, dict[str, Any]], env: Env
) -> list[dict[str, Any]]:
    if env.backend != "postgres":
        raise Skip("Absurd stores its tasks in PostgreSQL only")
    if workloads == ["resume_prepare"]:
        return await _resume_prepare(params["resume_prepare"], env)
    if workloads == ["resume"]:
        return tagged("resume", await _resume(params["resume"], env))
    fns = {
        "empty": _empty,
        "steps": _steps,
        "fanout": _fanout,
        "concurrent": _concurrent,
        "timer": _timer,
        "promise": _promise,
    }
    require_known(workloads, fns)
    concurrency = max([4] + [params[w].get("execs", 1) for w in workloads if w == "concurrent"])
    out = []
    async with _Client(env, concurrency) as c:
        await c.call("steps", {"n": 20, "size": 100})  # warm-up
        for w in workloads:
            out += tagged(w, await fns[w](c, params[w]))
    return out


async def _empty(c: _Client, p: dict[str, Any]) -> list[dict[str, Any]]:
    count = p["count"]
    start = now()
    for _ in range(count):
        await c.call("empty", {})
    per = (now() - start) / count * 1e6
    return [record(f"×{count} sequential", "µs/execution", per, durability=DURABLE)]


async def _steps(c: _Client, p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n, size, execs in p["cases"]:
        start = now()
        for _ in range(execs):
            await c.call("steps", {"n": n, "size": size})
        per = (now() - start) / (n * execs) * 1e6
        out.append(record(f"N={n}, {size_label(size)}", "µs/step", per, durability=DURABLE))
    return out


async def _fanout(c: _Client, p: dict[str, Any]) -> list[dict[str, Any]]:
    n, size = p["n"], p["size"]
    start = now()
    await c.call("fanout", {"n": n, "size": size})
    per = (now() - start) / n * 1e6
    note = "asyncio.gather over ctx.step; the SDK runs one task's queries on one connection"
    case = f"parallel, {size_label(size)}"
    return [record(case, "µs/step", per, durability=DURABLE, note=note)]


async def _concurrent(c: _Client, p: dict[str, Any]) -> list[dict[str, Any]]:
    execs, steps, size = p["execs"], p["steps"], p["size"]
    start = now()
    ids = [await c.spawn("steps", {"n": steps, "size": size}) for _ in range(execs)]
    for task_id in ids:
        await c.result(task_id)
    wall = now() - start
    per = wall / (execs * steps) * 1e6
    note = f"one worker, concurrency {execs}"
    return [record(f"{steps} steps each", "µs/step", per, durability=DURABLE, note=note)]


async def _timer(c: _Client, p: dict[str, Any]) -> list[dict[str, Any]]:
    count, duration = p["count"], p["duration"]
    late = await c.call("timer", {"count": count, "duration": duration})
    med = sorted(late)[len(late) // 2]
    note = f"a suspended task is claimed again by the worker's poll ({WORKER_POLL * 1e3:.0f} ms)"
    case = f"sleep {duration * 1e3:.0f} ms ×{count}"
    return [record(case, "ms late", med, samples=late, note=note)]


async def _promise(c: _Client, p: dict[str, Any]) -> list[dict[str, Any]]:
    samples = []
    for k in range(p["count"]):
        event = f"ev-{os.getpid()}-{k}"
        task_id = await c.spawn("promise", {"event": event})
        await asyncio.sleep(p.get("settle", 0.05))  # the task is suspended in await_event
        start = now()
        await c.client.emit_event(event, "ok")
        assert await c.result(task_id) == "ok"
        samples.append((now() - start) * 1e6)
    med = sorted(samples)[len(samples) // 2]
    note = "emit_event from the same process; the woken task is claimed by the worker's poll"
    return [record(f"×{p['count']}", "µs/round trip", med, samples=samples, note=note)]


async def _resume_prepare(p: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    global _CRASH_AT
    _CRASH_AT = p["n"]
    async with _Client(env, 1, claim_timeout=1) as c:
        task_id = await c.spawn("resume", {"n": p["n"]})
        (env.workdir / "absurd-task-id").write_text(task_id)
        await c.result(task_id)
    raise RuntimeError("the prepare run should have exited at its last step")


async def _resume(p: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    n = p["n"]
    task_id = (env.workdir / "absurd-task-id").read_text()
    await asyncio.sleep(1.2)  # the dead worker's 1 s lease has run out
    start = now()
    async with _Client(env, 1) as c:
        assert await c.result(task_id) == n
        wall = now() - start
    note = "a new worker claims the task once the dead worker's lease expired"
    return [
        record("crash, then open and resume", "ms/resume", wall * 1e3, note=note),
        record("same, per committed step", "µs/step", wall / n * 1e6),
    ]

"""DBOS Transact, through its documented decorators and methods.

``DBOS(config={"name": ..., "system_database_url": ...})`` then ``DBOS.launch()``;
workflows are ``@DBOS.workflow()`` functions and steps ``@DBOS.step()`` functions. A DBOS
step's output is recorded in the system database before the workflow moves on, so every
DBOS step is durable before the next starts: it compares with unbroken's acknowledged
(guarded) class. Sequential workloads use sync workflows and steps (DBOS's own fast
path); fan-out and concurrent executions use async workflows on the caller's event loop
(``DBOS.start_workflow_async``) with ``asyncio.gather`` over async steps.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from dbos import DBOS, SetWorkflowID

from .common import Env, now, payload, record, require_known, size_label, tagged

DURABLE = "every step committed before the next"
_CRASH_AT: int | None = None


@DBOS.step()
def result_step(size: int) -> str:
    return payload(size)


@DBOS.step()
async def result_step_async(size: int) -> str:
    return payload(size)


@DBOS.step()
def numbered_step(i: int) -> int:
    if _CRASH_AT is not None and i == _CRASH_AT:
        os._exit(0)  # every earlier step is already committed
    return i


@DBOS.step()
def wall_clock() -> float:
    return time.time()


@DBOS.workflow()
def empty_wf() -> None:
    return None


@DBOS.workflow()
def steps_wf(n: int, size: int) -> int:
    for _ in range(n):
        result_step(size)
    return n


@DBOS.workflow()
async def steps_async_wf(n: int, size: int) -> int:
    for _ in range(n):
        await result_step_async(size)
    return n


@DBOS.workflow()
async def fanout_wf(n: int, size: int) -> int:
    await asyncio.gather(*(result_step_async(size) for _ in range(n)))
    return n


@DBOS.workflow()
def resume_wf(n: int) -> int:
    for i in range(n + 1):
        numbered_step(i)
    return n


@DBOS.workflow()
def timer_wf(count: int, duration: float) -> list[float]:
    late = []
    for _ in range(count):
        t0 = wall_clock()
        DBOS.sleep(duration)
        late.append((time.time() - t0 - duration) * 1e3)
    return late


@DBOS.workflow()
def promise_wf() -> Any:
    return DBOS.recv("p", timeout_seconds=60)


def _launch(env: Env) -> None:
    DBOS(config={"name": "bench", "system_database_url": env.db_url})
    DBOS.launch()


def run(workloads: list[str], params: dict[str, dict[str, Any]], env: Env) -> list[dict[str, Any]]:
    """Sync workloads run outside any event loop (as DBOS requires of its sync API); the
    async ones afterwards in one ``asyncio.run``. No ``DBOS.destroy()``: the process
    ends right after measuring."""
    if workloads == ["resume"]:
        return tagged("resume", _resume(params["resume"], env))
    fns = {
        "empty": _empty,
        "steps": _steps,
        "fanout": _fanout,
        "concurrent": _concurrent,
        "timer": _timer,
        "promise": _promise,
        "resume_prepare": _resume_prepare,
    }
    require_known(workloads, fns)
    _launch(env)
    steps_wf(20, 100)  # warm-up
    out: list[dict[str, Any]] = []
    later = []
    for w in workloads:
        if asyncio.iscoroutinefunction(fns[w]):
            later.append(w)
        else:
            out += tagged(w, fns[w](params[w]))
    if later:

        async def async_part() -> None:
            await steps_async_wf(5, 100)  # warm-up on this event loop
            for w in later:
                out.extend(tagged(w, await fns[w](params[w])))

        asyncio.run(async_part())
    return out


def _empty(p: dict[str, Any]) -> list[dict[str, Any]]:
    count = p["count"]
    start = now()
    for _ in range(count):
        empty_wf()
    per = (now() - start) / count * 1e6
    return [record(f"×{count} sequential", "µs/execution", per, durability=DURABLE)]


def _steps(p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n, size, execs in p["cases"]:
        start = now()
        for _ in range(execs):
            steps_wf(n, size)
        per = (now() - start) / (n * execs) * 1e6
        out.append(record(f"N={n}, {size_label(size)}", "µs/step", per, durability=DURABLE))
    return out


async def _fanout(p: dict[str, Any]) -> list[dict[str, Any]]:
    n, size = p["n"], p["size"]
    start = now()
    handle = await DBOS.start_workflow_async(fanout_wf, n, size)
    await handle.get_result()
    per = (now() - start) / n * 1e6
    return [record(f"parallel, {size_label(size)}", "µs/step", per, durability=DURABLE)]


async def _concurrent(p: dict[str, Any]) -> list[dict[str, Any]]:
    execs, steps, size = p["execs"], p["steps"], p["size"]
    start = now()
    handles = await asyncio.gather(
        *(DBOS.start_workflow_async(steps_async_wf, steps, size) for _ in range(execs))
    )
    await asyncio.gather(*(h.get_result() for h in handles))
    wall = now() - start
    per = wall / (execs * steps) * 1e6
    return [record(f"{steps} steps each", "µs/step", per, durability=DURABLE)]


def _timer(p: dict[str, Any]) -> list[dict[str, Any]]:
    count, duration = p["count"], p["duration"]
    late = timer_wf(count, duration)
    med = sorted(late)[len(late) // 2]
    return [record(f"sleep {duration * 1e3:.0f} ms ×{count}", "ms late", med, samples=late)]


def _promise(p: dict[str, Any]) -> list[dict[str, Any]]:
    samples = []
    for _ in range(p["count"]):
        handle = DBOS.start_workflow(promise_wf)
        time.sleep(p.get("settle", 0.05))  # the workflow is parked in DBOS.recv
        start = now()
        DBOS.send(handle.get_workflow_id(), "ok", "p")
        assert handle.get_result() == "ok"
        samples.append((now() - start) * 1e6)
    med = sorted(samples)[len(samples) // 2]
    note = (
        "DBOS.recv / DBOS.send from the same process; on SQLite DBOS learns of a message "
        "by polling every notification_listener_polling_interval_sec (default 1 s, kept)"
    )
    return [record(f"×{p['count']}", "µs/round trip", med, samples=samples, note=note)]


def _resume_prepare(p: dict[str, Any]) -> list[dict[str, Any]]:
    global _CRASH_AT
    _CRASH_AT = p["n"]
    with SetWorkflowID("resume-me"):
        resume_wf(p["n"])
    raise RuntimeError("the prepare run should have exited at its last step")


def _resume(p: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    n = p["n"]
    start = now()
    _launch(env)  # launch recovers pending workflows of this executor
    handle = DBOS.retrieve_workflow("resume-me")
    assert handle.get_result() == n
    wall = now() - start
    return [
        record("crash, then open and resume", "ms/resume", wall * 1e3),
        record("same, per committed step", "µs/step", wall / n * 1e6),
    ]

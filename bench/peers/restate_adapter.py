"""Restate: its server (npm package @restatedev/restate-server, started by the driver,
bound to 127.0.0.1) and the Python SDK app of restate_app.py served by hypercorn.

This process starts hypercorn serving the app (peers/restate_serve.py) as a child
process (its own process and event loop), registers it with the admin API, and invokes
handlers through the HTTP ingress with httpx: start→result is one ingress request.
Restate keeps its journal in the server's own store (RocksDB with a fsynced WAL): it has
no SQLite or PostgreSQL backend, so the driver runs it once per repetition and lists it
beside the SQLite figures.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from .common import Env, Skip, now, record, require_known, size_label, tagged

DURABLE = "every step journaled by the server before the next"
BENCH_DIR = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Service:
    """hypercorn serving restate_app in a child process, registered with the server."""

    def __init__(self, env: Env, port: int | None = None, crash_at: int | None = None):
        self.env = env
        self.port = port or _free_port()
        self.crash_at = crash_at
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> None:
        environ = dict(os.environ)
        if self.crash_at is not None:
            environ["BENCH_RESTATE_CRASH_AT"] = str(self.crash_at)
        with open(self.env.workdir / f"hypercorn-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "peers.restate_serve", str(self.port)],
                cwd=BENCH_DIR,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def start(self, register: bool = True) -> None:
        self._spawn()
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("hypercorn did not start") from None
                await asyncio.sleep(0.02)
        if register:
            async with httpx.AsyncClient(base_url=self.env.restate_admin, timeout=30) as admin:
                r = await admin.post(
                    "/deployments", json={"uri": f"http://127.0.0.1:{self.port}", "force": True}
                )
                r.raise_for_status()

    def stop(self) -> None:
        """Kill the service: measuring is over, and a graceful hypercorn shutdown waits
        for the server's long-lived HTTP/2 connections to close."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def run(
    workloads: list[str], params: dict[str, dict[str, Any]], env: Env
) -> list[dict[str, Any]]:
    if not env.restate_ingress:
        raise Skip("no Restate server (see the driver's log)")
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
    out = []
    service = _Service(env)
    await service.start()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    try:
        async with httpx.AsyncClient(
            base_url=env.restate_ingress, timeout=300, limits=limits
        ) as client:
            await _call(client, "/Bench/steps", {"n": 20, "size": 100})  # warm-up
            for w in workloads:
                out += tagged(w, await fns[w](client, params[w]))
            return out
    finally:
        service.stop()


async def _call(client: httpx.AsyncClient, path: str, body: Any = None) -> Any:
    r = await client.post(path, json=body)
    r.raise_for_status()
    return r.json() if r.content else None


async def _empty(client: httpx.AsyncClient, p: dict[str, Any]) -> list[dict[str, Any]]:
    count = p["count"]
    start = now()
    for _ in range(count):
        await _call(client, "/Bench/empty")
    per = (now() - start) / count * 1e6
    return [record(f"×{count} sequential", "µs/execution", per, durability=DURABLE)]


async def _steps(client: httpx.AsyncClient, p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n, size, execs in p["cases"]:
        start = now()
        for _ in range(execs):
            await _call(client, "/Bench/steps", {"n": n, "size": size})
        per = (now() - start) / (n * execs) * 1e6
        out.append(record(f"N={n}, {size_label(size)}", "µs/step", per, durability=DURABLE))
    return out


async def _fanout(client: httpx.AsyncClient, p: dict[str, Any]) -> list[dict[str, Any]]:
    n, size = p["n"], p["size"]
    start = now()
    await _call(client, "/Bench/fanout", {"n": n, "size": size})
    per = (now() - start) / n * 1e6
    case = f"parallel, {size_label(size)}"
    return [record(case, "µs/step", per, durability=DURABLE, note="restate.gather over ctx.run")]


async def _concurrent(client: httpx.AsyncClient, p: dict[str, Any]) -> list[dict[str, Any]]:
    execs, steps, size = p["execs"], p["steps"], p["size"]
    body = {"n": steps, "size": size}
    start = now()
    await asyncio.gather(*(_call(client, "/Bench/steps", body) for _ in range(execs)))
    wall = now() - start
    per = wall / (execs * steps) * 1e6
    return [record(f"{steps} steps each", "µs/step", per, durability=DURABLE)]


async def _timer(client: httpx.AsyncClient, p: dict[str, Any]) -> list[dict[str, Any]]:
    count, duration = p["count"], p["duration"]
    late = await _call(client, "/Bench/timer", {"count": count, "duration": duration})
    med = sorted(late)[len(late) // 2]
    return [record(f"sleep {duration * 1e3:.0f} ms ×{count}", "ms late", med, samples=late)]


async def _promise(client: httpx.AsyncClient, p: dict[str, Any]) -> list[dict[str, Any]]:
    samples = []
    for _ in range(p["count"]):
        key = uuid.uuid4().hex
        (await client.post(f"/PromiseWf/{key}/wait/send")).raise_for_status()
        attach = asyncio.create_task(client.get(f"/restate/workflow/PromiseWf/{key}/attach"))
        await asyncio.sleep(p.get("settle", 0.05))  # the workflow is parked on its promise
        start = now()
        await _call(client, f"/PromiseWf/{key}/resolve", "ok")
        r = await attach
        r.raise_for_status()
        assert r.json() == "ok"
        samples.append((now() - start) * 1e6)
    med = sorted(samples)[len(samples) // 2]
    note = "workflow durable promise resolved through the ingress"
    return [record(f"×{p['count']}", "µs/round trip", med, samples=samples, note=note)]


async def _resume_prepare(p: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    n = p["n"]
    service = _Service(env, crash_at=n)
    await service.start()
    async with httpx.AsyncClient(base_url=env.restate_ingress, timeout=60) as client:
        r = await client.post("/Resume/run/send", json=n)
        r.raise_for_status()
        (env.workdir / "restate-resume").write_text(f"{r.json()['invocationId']} {service.port}")
    assert service.proc is not None
    await asyncio.to_thread(service.proc.wait, 600)  # the service dies at step n
    return []


async def _resume(p: dict[str, Any], env: Env) -> list[dict[str, Any]]:
    n = p["n"]
    invocation, port = (env.workdir / "restate-resume").read_text().split()
    service = _Service(env, port=int(port))
    await service.start(register=False)  # same address as the registered deployment
    start = now()  # the service listens: from here on it is the server's retry and replay
    try:
        async with httpx.AsyncClient(base_url=env.restate_ingress, timeout=120) as client:
            r = await client.get(f"/restate/invocation/{invocation}/attach")
            r.raise_for_status()
            assert r.json() == n
            wall = now() - start
    finally:
        service.stop()
    note = "timed from the restarted service listening; the server retries every 10 ms"
    return [
        record("crash, then open and resume", "ms/resume", wall * 1e3, note=note),
        record("same, per committed step", "µs/step", wall / n * 1e6),
    ]

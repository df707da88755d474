"""``unbroken demo``: a worker is SIGKILLed mid-run and a second one resumes it (layer: edges).

The parent starts a local paid service that counts requests and the operations it really
performs (a repeated ``Idempotency-Key`` gets the stored response), then runs a worker
subprocess (``python -m unbroken.demo worker``) and kills it with SIGKILL inside the slow
``write_report`` step. A second worker opens the same SQLite file: entering ``async with
engine`` recovers the orphaned execution, ``engine.run`` attaches to it, the committed
steps are replayed and the paid call is not made again. Needs no server, key or config.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from .context import Context
from .effects import Intent, Step
from .engine import Engine
from .errors import UnbrokenError
from .runtime import current_step
from .storage import open_storage

__all__ = ["run_demo"]

EXECUTION_ID = "demo-order-1"
WORKFLOW_NAME = "unbroken.demo.order"
ORDER_ID = "A-1042"
REPORT_SECONDS = 2.0
"""How long ``write_report`` works: the parent kills run 1 during this time."""
WORKER_TIMEOUT_SECS = 30.0
PLAN = [("fetch_order", "idempotent")] + [(f"quote_{c}", "idempotent, parallel") for c in "abc"]
PLAN += [("paid_call", "guarded, cost-bearing"), ("write_report", "idempotent, slow"),
         ("send_receipt", "idempotent")]


# -- the worker: one workflow, one JSON line per step ------------------------------------


def _emit(event: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once: the parent reads it live."""
    print(json.dumps(event), flush=True)


def _step(ctx: Context, step: str | Step, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """``ctx.step_recorded`` (numbered now, INV-2) that reports the outcome on stdout."""
    name = step if isinstance(step, str) else step.name
    pending = ctx.step_recorded(step, fn, *args)

    async def report() -> Any:
        """Await the step, then print its line."""
        outcome = await pending
        _emit({"step": name, "id": outcome.step_id, "replayed": outcome.was_replayed,
               "pid": os.getpid()})
        return outcome.value

    return report()


def _fetch_order(order_id: str) -> dict[str, Any]:
    """Load the order (a sync step function: it runs in a worker thread)."""
    return {"order_id": order_id, "items": 3, "amount_cents": 4200}


async def _quote(carrier: str, amount_cents: int) -> dict[str, Any]:
    """Ask one carrier for a shipping quote (three of these run in parallel)."""
    await asyncio.sleep(0.05)
    return {"carrier": carrier, "cents": amount_cents // 10 + 100 * (ord(carrier) - ord("a"))}


def _paid_call(service: str, order_id: str, cents: int) -> dict[str, Any]:
    """POST to the paid service with the step's idempotency key as ``Idempotency-Key``."""
    request = urllib.request.Request(
        f"{service}/v1/charges",
        data=json.dumps({"order_id": order_id, "amount_cents": cents}).encode(),
        headers={"Content-Type": "application/json",
                 "Idempotency-Key": current_step().idempotency_key_hex},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


async def _write_report(order_id: str, charge_id: str) -> str:
    """Slow work: the parent kills run 1 while this sleeps."""
    _emit({"event": "inside", "step": "write_report", "pid": os.getpid()})
    await asyncio.sleep(REPORT_SECONDS)
    return f"report-{order_id}-{charge_id}.pdf"


def _send_receipt(order_id: str) -> str:
    """The last step: only run 2 gets here."""
    return f"receipt for {order_id} sent"


def _register(engine: Engine, service: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    """Register the order workflow under a fixed name, so any process can recover it."""
    @engine.workflow(name=WORKFLOW_NAME)
    async def order(ctx: Context, order_id: str) -> dict[str, Any]:
        """Fetch, quote in parallel, pay once, write the report, send the receipt."""
        details = await _step(ctx, "fetch_order", _fetch_order, order_id)
        quotes = await asyncio.gather(
            *(_step(ctx, f"quote_{c}", _quote, c, details["amount_cents"]) for c in "abc")
        )
        best = min(quotes, key=lambda q: q["cents"])
        paid = Step.guarded("paid_call", Intent.COST_BEARING)
        charge = await _step(ctx, paid, _paid_call, service, order_id, best["cents"])
        report = await _step(ctx, "write_report", _write_report, order_id, charge["charge_id"])
        await _step(ctx, "send_receipt", _send_receipt, order_id)
        return {"order": order_id, "carrier": best["carrier"], "charge": charge["charge_id"],
                "report": report}

    return order


async def _worker(db: str, service: str) -> int:
    """Start (run 1) or attach to the recovered (run 2) execution and print its result."""
    engine = Engine(db)
    order = _register(engine, service)
    try:
        async with engine:
            recovered = engine.metrics.executions_recovered
            _emit({"event": "start", "pid": os.getpid(), "recovered": recovered})
            result = await engine.run(order, ORDER_ID, execution_id=EXECUTION_ID)
    except UnbrokenError as exc:
        _emit({"event": "error", "error": str(exc), "pid": os.getpid()})
        return 1
    _emit({"event": "result", "result": result, "pid": os.getpid()})
    return 0


# -- the parent: a counting paid service and two workers ---------------------------------


class _PaidService(ThreadingHTTPServer):
    """A stand-in for a paid API that deduplicates by ``Idempotency-Key``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PaidHandler)
        self.lock = threading.Lock()
        self.requests = 0
        self.performed = 0
        self.responses: dict[str, bytes] = {}

    def server_bind(self) -> None:
        """Bind without HTTPServer's FQDN lookup, which can stall on a slow DNS."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])
        self.url = f"http://127.0.0.1:{self.server_port}"

    def charge(self, key: str, body: dict[str, Any]) -> bytes:
        """Count the request; perform the operation unless the key was seen before."""
        with self.lock:
            self.requests += 1
            if key and key in self.responses:
                return self.responses[key]
            self.performed += 1
            answer = {"charge_id": f"ch_{self.performed:04d}",
                      "amount_cents": body.get("amount_cents")}
            self.responses[key] = json.dumps(answer).encode()
            return self.responses[key]


class _PaidHandler(BaseHTTPRequestHandler):
    """Serves the paid service's one endpoint."""

    server: _PaidService

    def do_POST(self) -> None:
        """``POST /v1/charges``: the paid operation."""
        size = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(size) or b"{}")
        data = self.server.charge(self.headers.get("Idempotency-Key", ""), body)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the demo keeps stderr for real problems."""


class _DemoError(Exception):
    """The demo could not run to the end (a worker hung, died or failed)."""


@dataclass
class _RunLog:
    """What one worker reported: its pid, each step as name: (id, replayed), its end."""

    pid: int = 0
    recovered: int = 0
    steps: dict[str, tuple[int, bool]] = field(default_factory=dict)
    killed_in: str | None = None
    result: dict[str, Any] | None = None
    error: str = ""
    returncode: int | None = None


def _spawn(argv: list[str], workdir: Path, stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start a worker isolated from the caller's UNBROKEN_* settings and config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
    src = str(Path(__file__).resolve().parent.parent)  # importable even when not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, cwd=workdir, env=env)


def _pump(out: IO[bytes], lines: queue.Queue[bytes | None]) -> None:
    """Move the worker's stdout lines to ``lines``; ``None`` marks its end."""
    for line in out:
        lines.put(line)
    lines.put(None)


def _events(lines: queue.Queue[bytes | None], deadline: float) -> Iterator[dict[str, Any]]:
    """The worker's JSON lines until it closes stdout; ``_DemoError`` past ``deadline``."""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise _DemoError(f"sent no result within {WORKER_TIMEOUT_SECS:.0f} s") from None
        if line is None:
            return
        try:
            event = json.loads(line)
        except ValueError:
            continue  # not one of the worker's lines
        if isinstance(event, dict):
            yield event


def _follow(lines: queue.Queue[bytes | None], pid: int, log: _RunLog, kill_in: str | None) -> None:
    """Record the worker's events; SIGKILL it once it reports being inside ``kill_in``."""
    for event in _events(lines, time.monotonic() + WORKER_TIMEOUT_SECS):
        log.pid, kind = int(event.get("pid", log.pid)), event.get("event")
        if "step" in event and "id" in event:
            log.steps[str(event["step"])] = (int(event["id"]), bool(event["replayed"]))
        elif kind == "start":
            log.recovered = int(event.get("recovered", 0))
        elif kind == "inside" and event.get("step") == kill_in:
            os.kill(pid, signal.SIGKILL)  # a real kill, mid-step
            log.killed_in = kill_in
        elif kind in ("result", "error"):
            log.result, log.error = event.get("result"), str(event.get("error", ""))


def _run_worker(argv: list[str], workdir: Path, label: str, kill_in: str | None) -> _RunLog:
    """Run one worker to its end (or its kill); ``_DemoError`` if it failed or hung."""
    log, lines = _RunLog(), queue.Queue[bytes | None]()
    with tempfile.TemporaryFile(dir=workdir) as stderr:
        proc = _spawn(argv, workdir, stderr)
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        pump.start()
        try:
            _follow(lines, proc.pid, log, kill_in)
        except _DemoError as exc:
            raise _DemoError(f"{label} (pid {proc.pid}) {exc}") from None
        finally:
            if proc.poll() is None:
                proc.kill()  # it hung, or the parent is being interrupted
            log.returncode = proc.wait(timeout=10)
            pump.join(timeout=5)  # the pipe is at EOF once the worker is gone
            proc.stdout.close()
        if log.returncode in (0, -signal.SIGKILL) and (kill_in or log.result is not None):
            return log
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    why = log.error or " | ".join(tail) or "nothing on stderr"
    raise _DemoError(f"{label} (pid {proc.pid}) exited with {log.returncode}: {why}")


def _cell(log: _RunLog, name: str) -> str:
    """What a run did with a step."""
    if name in log.steps:
        return "replayed from the journal" if log.steps[name][1] else "ran"
    return "KILLED here (SIGKILL)" if name == log.killed_in else "-"


def _plural(count: int, noun: str) -> str:
    """``1 request``, ``2 requests``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _timeline(first: _RunLog, second: _RunLog) -> None:
    """The two runs side by side, one row per step."""
    print(f"\nrun 1 (pid {first.pid}) started {EXECUTION_ID}; the parent killed it with "
          f"SIGKILL inside {first.killed_in}")
    print(f"run 2 (pid {second.pid}) recovered {_plural(second.recovered, 'orphaned execution')} "
          "on entering the engine and attached with engine.run\n")
    rows = [("step", "name", "effect", f"run 1 (pid {first.pid})", f"run 2 (pid {second.pid})")]
    for i, (name, effect) in enumerate(PLAN):
        step_id = str(second.steps.get(name, (i, False))[0])
        again = name == first.killed_in and _cell(second, name) == "ran"
        second_cell = "ran again (its result was never committed)" if again else _cell(second, name)
        rows.append((step_id, name, effect, _cell(first, name), second_cell))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _status(db: str) -> str:
    """The execution's status, read back from the database file."""
    storage = open_storage(db, create=False)
    storage.open()
    try:
        record = storage.get_execution(EXECUTION_ID)
    finally:
        storage.close()
    return record.status.value if record is not None else "missing"


def _verdict(first: _RunLog, second: _RunLog, service: _PaidService) -> list[str]:
    """Every way the proof fails; empty when it holds."""
    problems = []
    if not (first.killed_in and first.returncode == -signal.SIGKILL):
        problems.append("run 1 was not killed mid-run")
    problems += [f"{n} was committed in run 1 but not replayed in run 2"
                 for n in first.steps if not second.steps.get(n, (0, False))[1]]
    problems += [f"{n} did not complete in run 2" for n, _ in PLAN if n not in second.steps]
    if (service.requests, service.performed) != (1, 1):
        problems.append(f"the paid service saw {_plural(service.requests, 'request')} and "
                        f"performed {_plural(service.performed, 'operation')}, not 1 and 1")
    return problems


def _report(first: _RunLog, second: _RunLog, service: _PaidService, db: str) -> bool:
    """Print the timeline, the counters and the verdict; whether the proof holds."""
    _timeline(first, second)
    keys = ", ".join(k[:16] + "..." for k in service.responses) or "none"
    print(f"\npaid call: {_plural(service.requests, 'request')}, "
          f"{_plural(service.performed, 'operation')} performed (Idempotency-Key {keys})")
    print(f"execution {EXECUTION_ID}: {_status(db)}, result {json.dumps(second.result)}")
    problems = _verdict(first, second, service)
    if problems:
        print("\nPROOF FAILED: " + "; ".join(problems))
        return False
    print("\nPROOF HOLDS: every step committed before the kill was replayed, not re-run, "
          "and the paid call happened exactly once.")
    return True


def run_demo(*, keep: bool = False) -> int:
    """Run the crash-and-resume demo; 0 if the proof holds, 1 otherwise.

    Args:
        keep: keep the temporary directory with the database for inspection.
    """
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="unbroken-demo-"))
    db = f"sqlite:///{workdir / 'demo.db'}"
    service = _PaidService()
    threading.Thread(target=service.serve_forever, args=(0.05,), daemon=True).start()
    argv = [sys.executable, "-m", "unbroken.demo", "worker", "--db", db, "--service", service.url]
    print("unbroken demo: a workflow is killed with SIGKILL mid-run, then resumed\n"
          f"  database  {db}\n  service   {service.url} (paid; dedups by Idempotency-Key)")
    try:
        first = _run_worker(argv, workdir, "run 1", kill_in="write_report")
        second = _run_worker(argv, workdir, "run 2", kill_in=None)
        ok = _report(first, second, service, db)
    except (_DemoError, UnbrokenError, OSError) as exc:
        print(f"error: the demo did not complete: {exc}", file=sys.stderr)
        ok = False
    finally:
        service.shutdown()
        service.server_close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    kept = f"; database kept: unbroken --db {db} show {EXECUTION_ID}" if keep else ""
    print(f"({time.monotonic() - started:.1f} s{kept})")
    return 0 if ok else 1


def _main(argv: list[str]) -> int:
    """``python -m unbroken.demo`` runs the demo; ``... worker --db URL --service URL`` is
    the worker process it spawns."""
    if argv[:1] != ["worker"]:
        return run_demo()
    parser = argparse.ArgumentParser(prog="python -m unbroken.demo worker")
    parser.add_argument("--db", required=True)
    parser.add_argument("--service", required=True)
    args = parser.parse_args(argv[1:])
    return asyncio.run(_worker(args.db, args.service))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

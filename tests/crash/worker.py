"""A crash-test worker: runs one mixed workflow on a SQLite database, maybe killing itself.

Run as a script by the crash tests::

    python worker.py DB SERVICE_URL [--execution-id ID] [--policy skip|rerun|fail]
                     [--crash POINT --marker FILE [--hang] [--no-flush]]
                     [--op-delay S] [--flush-ms N] [--rename OP]

The workflow (step ids in brackets) is::

    [0] load            idempotent
    [1] notify          at-least-once
    [2..4] quote_a/b/c  idempotent, one parallel group (asyncio.gather)
    [5] charge          guarded COST_BEARING (default policy SKIP)
    [6] pay             guarded MONEY_MOVING, policy from --policy
    [7] receipt         idempotent

Every step's operation POSTs to ``SERVICE_URL/op/<name>`` with the step's idempotency key
as the ``Idempotency-Key`` header, so the test counts how often each operation ran.

Crash points (``--crash``); the worker SIGKILLs itself there, only if ``--marker`` does not
exist yet (it creates the marker first, so the resumed run goes through):

- ``begin``: the execution row exists, no step has run.
- ``after:K``: step K (for the group: all of it, K=4) has returned and every journal entry
  is committed (``engine.flush()``); nothing of the next step has happened.
- ``before-intent:K``: just before guarded step K is called (nothing of it journaled).
- ``start:K``: inside step K's operation before it calls the service, with everything
  buffered before committed; for a guarded step its intent is committed (ambiguous window,
  before the effect).
- ``effect:K``: inside step K's operation after the service performed it, before the
  operation returns (for a guarded step: the ambiguous window after the effect).
- ``group``: inside the parallel group: quote_a's result is committed while quote_b and
  quote_c have called the service and not returned.

``--no-flush`` makes ``start:K`` and ``effect:K`` die without committing what is buffered
first (with a long ``--flush-ms`` buffered results are then still in memory).

``--rename OP`` renames an unguarded step (to ``OP_v2``; the operation and its value stay),
so a resumed run diverges from the journal there (INV-3) and restarts as a new generation.

With ``--hang`` the worker blocks at the crash point instead (bounded), to be killed by the
test. It prints one JSON line: ``{"result": ..., "ops": n, ...}`` on success (exit 0), or
``{"error": "<type>", "message": ..., ...}`` on failure (exit 1). ``ops`` is how many
service calls this process made; ``audit`` the ambiguous-window audit records it logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from typing import Any

import unbroken
from unbroken import Context, Engine, Intent, OnAmbiguous, Step
from unbroken.journal import EntryKind

HANG_LIMIT_SECS = 60.0
WAIT_LIMIT_SECS = 10.0

ARGS: argparse.Namespace
ENGINE: Engine
LOOP: asyncio.AbstractEventLoop
OPS_CALLED = 0
_OPS_LOCK = threading.Lock()
AUDIT: list[dict[str, Any]] = []
QUOTE_C_CALLED = threading.Event()


class _AuditCollector(logging.Handler):
    """Keeps the fields of every ``unbroken.audit`` record (FR-DE-10)."""

    FIELDS = ("execution_id", "step_id", "step_name", "effect_class", "idem_key_prefix",
              "on_ambiguous")

    def emit(self, record: logging.LogRecord) -> None:
        AUDIT.append({name: getattr(record, name, None) for name in self.FIELDS})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("service_url")
    parser.add_argument("--execution-id", default="crash-1")
    parser.add_argument("--policy", choices=["skip", "rerun", "fail"], default="skip")
    parser.add_argument("--crash", default=None)
    parser.add_argument("--marker", default=None)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--op-delay", type=float, default=0.0)
    parser.add_argument("--flush-ms", type=int, default=10)
    parser.add_argument("--rename", action="append", default=[], metavar="OP")
    parser.add_argument("--no-flush", action="store_true")
    args = parser.parse_args(argv)
    if args.crash is not None and args.marker is None:
        parser.error("--crash needs --marker")
    if "://" not in args.db:
        args.db = os.path.abspath(args.db)
    return args


# -- crashing ---------------------------------------------------------------------------


def _armed(*points: str) -> bool:
    """Whether the crash point is one of ``points`` and this is the first run."""
    return ARGS.crash in points and not os.path.exists(ARGS.marker)


def _die() -> None:
    """Create the marker, then SIGKILL this process (or block, with ``--hang``)."""
    fd = os.open(ARGS.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    if ARGS.hang:
        deadline = time.monotonic() + HANG_LIMIT_SECS
        while time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(5)  # nobody killed us: the test has gone
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(HANG_LIMIT_SECS)  # not reached: SIGKILL cannot be caught


async def boundary(*points: str) -> None:
    """A crash point in the workflow body: commit everything, then die."""
    if _armed(*points):
        await ENGINE.flush()
        _die()


def _on_loop(coro: Any) -> Any:
    """Run a coroutine on the worker's event loop from an operation's thread."""
    return asyncio.run_coroutine_threadsafe(coro, LOOP).result(WAIT_LIMIT_SECS)


def _die_in_op() -> None:
    """A crash point inside an operation: commit what is buffered (unless ``--no-flush``),
    then die."""
    if not ARGS.no_flush:
        _on_loop(ENGINE.flush())
    _die()


def _wait_committed(step_id: int) -> None:
    """Block until the result of ``step_id`` is committed (or give up, exit code 4)."""
    deadline = time.monotonic() + WAIT_LIMIT_SECS
    while time.monotonic() < deadline:
        _on_loop(ENGINE.flush())
        info = _on_loop(ENGINE.get_execution(ARGS.execution_id))
        if any(s.step_id == step_id and s.kind is EntryKind.RESULT for s in info.steps):
            return
        time.sleep(0.005)
    os._exit(4)


# -- the operations ---------------------------------------------------------------------


def call_service(op: str, payload: Any) -> str:
    """POST to the counting service with the step's idempotency key; return its value."""
    global OPS_CALLED
    request = urllib.request.Request(
        f"{ARGS.service_url}/op/{op}",
        data=json.dumps(payload).encode(),
        headers={
            "Content-Type": "application/json",
            "Idempotency-Key": unbroken.current_step().idempotency_key_hex,
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=WAIT_LIMIT_SECS) as response:
        reply = json.loads(response.read())
    with _OPS_LOCK:
        OPS_CALLED += 1
    return str(reply["value"])


def operation(op: str, payload: Any) -> str:
    """The operation of every step (sync: it runs in a worker thread)."""
    step_id = unbroken.current_step().step_id
    if ARGS.op_delay:
        time.sleep(ARGS.op_delay)
    if _armed(f"start:{step_id}"):
        _die_in_op()
    group_armed = op == "quote_c" and _armed("group")
    value = call_service(op, payload)
    if op == "quote_c":
        QUOTE_C_CALLED.set()
    if group_armed:
        time.sleep(WAIT_LIMIT_SECS)  # in flight until quote_b kills the process
    if _armed(f"effect:{step_id}"):
        _die_in_op()
    if op == "quote_b" and _armed("group"):
        QUOTE_C_CALLED.wait(WAIT_LIMIT_SECS)  # both other branches are in flight
        _wait_committed(step_id - 1)  # quote_a's result is in the journal
        _die()
    return value


# -- the workflow -----------------------------------------------------------------------


def named(op: str) -> str:
    """The step name of ``op``: ``<op>_v2`` when ``--rename op`` changed the code's shape."""
    return f"{op}_v2" if op in ARGS.rename else op


def register(engine: Engine, policy: OnAmbiguous) -> Any:
    @engine.workflow(name="crash.mixed")
    async def mixed(ctx: Context, order: str) -> dict[str, Any]:
        await boundary("begin")
        loaded = await ctx.step(named("load"), operation, "load", {"order": order})
        await boundary("after:0")
        notified = await ctx.step(
            Step.at_least_once(named("notify")), operation, "notify", {"loaded": loaded}
        )
        await boundary("after:1")
        quotes = await asyncio.gather(
            ctx.step(named("quote_a"), operation, "quote_a", {"order": order, "n": 1}),
            ctx.step(named("quote_b"), operation, "quote_b", {"order": order, "n": 2}),
            ctx.step(named("quote_c"), operation, "quote_c", {"order": order, "n": 3}),
        )
        await boundary("after:4", "before-intent:5")
        charge = await ctx.step(
            Step.guarded("charge", Intent.COST_BEARING),
            operation,
            "charge",
            {"quotes": quotes},
        )
        await boundary("after:5", "before-intent:6")
        pay = await ctx.step(
            Step.guarded("pay", Intent.MONEY_MOVING, on_ambiguous=policy),
            operation,
            "pay",
            {"charge": charge},
        )
        await boundary("after:6")
        receipt = await ctx.step(named("receipt"), operation, "receipt", {"pay": pay})
        await boundary("after:7")
        return {
            "loaded": loaded,
            "notified": notified,
            "quotes": list(quotes),
            "charge": charge,
            "pay": pay,
            "receipt": receipt,
        }

    return mixed


async def main() -> int:
    global ENGINE, LOOP
    LOOP = asyncio.get_running_loop()
    audit = logging.getLogger("unbroken.audit")
    audit.addHandler(_AuditCollector())
    audit.setLevel(logging.INFO)
    url = ARGS.db if "://" in ARGS.db else "sqlite:///" + ARGS.db
    ENGINE = Engine(url, journal_flush_interval_ms=ARGS.flush_ms)
    workflow = register(ENGINE, OnAmbiguous(ARGS.policy))
    began = time.monotonic()
    report: dict[str, Any] = {"pid": os.getpid()}
    try:
        async with ENGINE:
            result = await ENGINE.run(workflow, "order-7", execution_id=ARGS.execution_id)
    except Exception as exc:
        report.update(
            error=type(exc).__name__,
            message=str(exc),
            holder_pid=getattr(exc, "holder_pid", None),
        )
        code = 1
    else:
        report["result"] = result
        code = 0
    report.update(ops=OPS_CALLED, audit=AUDIT, elapsed=time.monotonic() - began)
    print(json.dumps(report), flush=True)
    return code


if __name__ == "__main__":
    ARGS = parse_args(sys.argv[1:])
    with contextlib.suppress(BrokenPipeError):
        sys.exit(asyncio.run(main()))

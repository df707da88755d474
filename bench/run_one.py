"""Run one workload on one system, in this process only, and print one JSON line.

Usage: python bench/run_one.py SYSTEM WORKLOAD[,WORKLOAD...] --backend sqlite|postgres
           --db-url URL --workdir DIR [--params JSON] [--restate-ingress URL --restate-admin URL]

SYSTEM is unbroken, dbos, absurd or restate (``bench/peers/SYSTEM_adapter.py``); several
workloads run one after the other in this process (one start-up for a group of short
workloads), each with its own parameters (``--params '{"steps": {...}, ...}'``). The last
line of stdout is ``{"system": ..., "workload": ..., "ok": true, "results": [...]}`` (each
result names its workload), or ``"ok": false`` with ``"skipped"`` (the system cannot run
this) or ``"error"``.
bench/compare.py starts one such process per system, workload, backend and repetition,
so systems never share a process, an event loop or a connection pool.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers.common import Env, Skip

SYSTEMS = ("unbroken", "dbos", "absurd", "restate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("workload")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--params", default="{}")
    parser.add_argument("--restate-ingress", default="")
    parser.add_argument("--restate-admin", default="")
    args = parser.parse_args()
    env = Env(
        args.backend,
        args.db_url,
        args.workdir,
        restate_ingress=args.restate_ingress,
        restate_admin=args.restate_admin,
    )
    out: dict[str, Any] = {"system": args.system, "workload": args.workload}
    try:
        module = importlib.import_module(f"peers.{args.system}_adapter")
        workloads = args.workload.split(",")
        params = json.loads(args.params)
        results = module.run(workloads, {w: params.get(w, {}) for w in workloads}, env)
        if asyncio.iscoroutine(results):
            results = asyncio.run(results)
        out.update(ok=True, results=results)
    except Skip as exc:
        out.update(ok=False, skipped=str(exc))
    except BaseException as exc:  # reported to the driver, which records it
        out.update(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
    print(json.dumps(out), flush=True)
    sys.stderr.flush()
    # Measurement is over: skip the systems' teardown (thread joins, pool drains).
    os._exit(0 if out["ok"] or "skipped" in out else 1)


if __name__ == "__main__":
    main()

"""Worker scaling on PostgreSQL: executions/s and steps/s with 1, 2 and 4 worker processes,
for unbroken (buffered and guarded steps), DBOS and Absurd, on the same local server.

Usage: python bench/workers.py [--quick | --smoke] [--reps N] [--warmup N] [--executions E]
           [--workers 1,2,4] [--systems unbroken,unbroken-guarded,dbos,absurd]
           [--concurrency C] [--budget SECONDS] [--out-dir DIR]

Workload: E executions of a workflow of three steps whose functions return a small value
at once, queued on a fresh database (a copy of a per-system template that holds only the
system's schema), drained by K worker processes (each running up to ``--concurrency``
executions at once). Start-up is excluded alike for every system: the K workers are
started, connected and idle before the clock starts, and the clock starts at the moment
all E executions become claimable at once:

- DBOS and Absurd: the enqueuer inserts all E in one transaction (``enqueue_in_transaction``
  / ``spawn`` on a connection without autocommit) while the workers already poll, and the
  clock starts at its commit;
- unbroken has no batch enqueue: the E executions are enqueued first (one commit each),
  the workers open their engines and wait at a gate, and the clock starts when the driver
  opens the gate (each worker then enters ``run_worker``, the loop of ``unbroken worker``).

The clock stops when the driver, polling the database every 10 ms, sees all E executions
completed. Each figure is the median of the measured repetitions with their min–max; the
systems take turns within each repetition for each K, in an order rotated from one
repetition to the next, after one smaller warm-up repetition.

Peers come from ``bench/.peers-venv`` (``bench/setup_peers.sh``), which also holds the
project, so every process runs on one interpreter; a peer that cannot run is reported as
skipped with the reason. PostgreSQL is the server of ``--server`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``; ``--smoke`` uses the server of
``UNBROKEN_TEST_POSTGRES_URL``), where this script creates and drops its databases.

Writes ``bench/results/<YYYY-MM-DD>-workers.json`` and ``-workers.md`` and prints the
table. ``--smoke`` runs unbroken alone with tiny sizes (K = 1 and 2), writes to a temporary
directory unless ``--out-dir`` is given, and exits 0 when the harness works (or when no
server is configured, saying it skipped).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import not_run, tree_state
from workers_run import Fleet, RunError, Server, System, systems_by_name

BENCH = Path(__file__).resolve().parent
PEERS_PYTHON = BENCH / ".peers-venv" / "bin" / "python"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
STEPS = 3
RETRY_PAUSE_SECS = 5.0

SIZES: dict[str, dict[str, Any]] = {
    "full": {"executions": 400, "warmup_executions": 150, "reps": 3, "warmup": 1},
    "quick": {"executions": 200, "warmup_executions": 100, "reps": 1, "warmup": 1},
    "smoke": {"executions": 20, "warmup_executions": 0, "reps": 1, "warmup": 0},
}


@dataclass
class Plan:
    systems: list[System]
    workers: list[int]
    executions: int
    warmup_executions: int
    reps: int
    warmup: int
    concurrency: int
    budget: float
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    retries: list[dict[str, str]] = field(default_factory=list)

    def skip(self, system: System | str, reason: str, workers: str = "all") -> None:
        name = system if isinstance(system, str) else system.name
        self.skipped.append({"system": name, "workers": workers, "reason": reason})


def run_all(plan: Plan, fleet: Fleet) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Every repetition: for each K, each system in turn (rotated per repetition)."""
    samples: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    started = time.monotonic()
    systems = list(plan.systems)
    durations: list[float] = []  # of the measured repetitions so far
    for rep in range(plan.warmup + plan.reps):
        warm = rep < plan.warmup
        elapsed = time.monotonic() - started
        expected = statistics.median(durations) if durations else 0.0
        if not warm and elapsed + expected > plan.budget:
            for s in plan.systems:
                plan.skip(
                    s,
                    f"repetition {rep - plan.warmup + 1} would end past the time budget of "
                    f"{plan.budget:.0f} s ({elapsed:.0f} s spent, {expected:.0f} s a repetition)",
                )
            break
        executions = plan.warmup_executions if warm else plan.executions
        counts = plan.workers[:1] if warm else plan.workers
        shift = rep % len(systems) if systems else 0
        for k in counts:
            for system in systems[shift:] + systems[:shift]:
                if system not in plan.systems:
                    continue  # it failed earlier in this run
                tag = "warm-up" if warm else f"rep {rep - plan.warmup + 1}"
                t0 = time.monotonic()
                try:
                    out = measure(plan, fleet, system, k, executions, tag)
                except RunError as exc:
                    print(f"  {system.name:<17} K={k} {tag:<7} FAILED: {exc}", flush=True)
                    plan.errors.append(
                        {"system": system.name, "workers": str(k), "error": str(exc)}
                    )
                    plan.systems.remove(system)
                    continue
                print(
                    f"  {system.name:<17} K={k} {tag:<7} {out['executions_per_s']:8.0f} exec/s "
                    f"({out['seconds']:.2f} s timed, {time.monotonic() - t0:.1f} s in all)",
                    flush=True,
                )
                if not warm:
                    samples[(system.name, k)].append(out)
        if not warm:
            durations.append(time.monotonic() - started - elapsed)
    return samples


def measure(
    plan: Plan, fleet: Fleet, system: System, k: int, executions: int, tag: str
) -> dict[str, Any]:
    """One run, tried a second time after a pause when it fails (the shared server may be
    restarting); a retry is recorded in the report."""
    try:
        return fleet.run(system, k, executions, plan.concurrency)
    except RunError as exc:
        print(f"  {system.name:<17} K={k} {tag:<7} failed ({exc}); retrying once", flush=True)
        plan.retries.append({"system": system.name, "workers": str(k), "error": str(exc)})
        time.sleep(RETRY_PAUSE_SECS)
    return fleet.run(system, k, executions, plan.concurrency)


def aggregate(
    plan: Plan, samples: dict[tuple[str, int], list[dict[str, Any]]], order: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for (name, k), runs in sorted(
        samples.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))
    ):
        rates = [r["executions_per_s"] for r in runs]
        rows.append(
            {
                "system": name,
                "workers": k,
                "executions": runs[0]["executions"],
                "executions_per_s": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "steps_per_s": statistics.median(rates) * STEPS,
                "worker_cpu_ms_per_execution": _median_or_none(
                    [r["worker_cpu_ms_per_execution"] for r in runs]
                ),
                "server_cpu_ms_per_execution": _median_or_none(
                    [r["server_cpu_ms_per_execution"] for r in runs]
                ),
                "runs": runs,
            }
        )
    by = {(r["system"], r["workers"]): r for r in rows}
    for r in rows:
        for base in ("unbroken-guarded", "unbroken"):
            ref = by.get((base, r["workers"]))
            ratio = None
            if ref and not r["system"].startswith("unbroken"):
                ratio = r["executions_per_s"] / ref["executions_per_s"]
            r[f"ratio_vs_{base.replace('-', '_')}"] = ratio
    return rows


def _median_or_none(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _cpu(workers: float | None, server: float | None) -> str:
    if workers is None:
        return "—"
    return f"{workers:.1f}" + ("" if server is None else f" + {server:.1f}")


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def markdown(report: dict[str, Any], systems: dict[str, System]) -> str:
    lines = [
        f"# Worker scaling on PostgreSQL ({report['date'][:10]})",
        "",
        f"`{report['command']}` on {report['machine']}, Python {report['python']}, "
        f"PostgreSQL {report['postgres']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items()))
        + f" (unbroken at {report['unbroken_tree']}). {report['warmup']} warm-up "
        f"(K=1, {report['warmup_executions']} executions) + "
        f"{report['repetitions']} measured repetitions; median and min–max of executions/s; "
        f"{report['wall_seconds']:.0f} s in all; 1-minute load average "
        f"{report['load_average']['start'][0]:.1f} at the start, "
        f"{report['load_average']['end'][0]:.1f} at the end.",
        "",
        f"Workload: {report['executions']:,} queued executions of a workflow of {STEPS} steps "
        "that return a small value at once, on a fresh database per run, drained by K worker "
        f"processes of up to {report['concurrency']} executions each. {report['timing']}",
        "",
        "Durability: an unbroken *buffered* step is durable within one group commit (10 ms), "
        "not before the next step starts; a *guarded* step, a DBOS step and an Absurd "
        "checkpoint are each committed before the workflow moves on, so the like-for-like "
        "ratio is **peer ÷ unbroken guarded**. Ratios are of executions/s: above 1 the peer "
        "is faster. *CPU ms/execution* is the user + system CPU time, during the timed part "
        "and per execution, of the K worker processes + of the PostgreSQL backends serving "
        "the run's database (shared server processes such as the WAL writer are not in it): "
        "with 2 cores shared by workers and server, it bounds how far more workers can help.",
        "",
        "| system | workers | executions/s | steps/s | min–max executions/s "
        "| peer ÷ unbroken guarded | peer ÷ unbroken buffered | CPU ms/execution |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        label = systems[r["system"]].label if r["system"] in systems else r["system"]
        lines.append(
            f"| {label} | {r['workers']} | {_num(r['executions_per_s'])} "
            f"| {_num(r['steps_per_s'])} | {_num(r['min'])}–{_num(r['max'])} "
            f"| {_ratio(r['ratio_vs_unbroken_guarded'])} | {_ratio(r['ratio_vs_unbroken'])} "
            f"| {_cpu(r['worker_cpu_ms_per_execution'], r['server_cpu_ms_per_execution'])} |"
        )
    notes = sorted(
        {
            systems[n].note
            for n in {r["system"] for r in report["rows"]}
            if n in systems and systems[n].note
        }
    )
    if notes:
        lines += ["", "Settings:", ""] + [f"- {n}" for n in notes]
    lines += not_run(
        "Nothing: every system ran with every worker count.",
        [
            ("skipped", [_where(s) + s["reason"] for s in report["skipped"]]),
            ("retried once", [_where(e) + e["error"] for e in report["retries"]]),
            ("failed", [_where(e) + e["error"] for e in report["errors"]]),
        ],
    )
    lines.append("")
    return "\n".join(lines)


def _where(r: dict[str, Any]) -> str:
    return f"{r['system']} (workers: {r['workers']}): "


def _peer_status() -> dict[str, str]:
    path = BENCH / ".peers-venv" / "peers-status.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def choose_systems(plan: Plan, wanted: list[str], smoke: bool) -> Path:
    """Drop the systems that cannot run here (recording why); the interpreter to use."""
    use_peers = PEERS_PYTHON.exists() and not smoke
    status = _peer_status()
    for system in list(plan.systems):
        if system.name not in wanted:
            plan.systems.remove(system)
            continue
        if system.needs and not use_peers:
            plan.skip(system, "bench/.peers-venv is missing: run bench/setup_peers.sh")
            plan.systems.remove(system)
            continue
        missing = [n for n in system.needs if status.get(n) != "ok"]
        if missing:
            plan.skip(system, f"{missing[0]}: {status.get(missing[0]) or 'not installed'}")
            plan.systems.remove(system)
    return PEERS_PYTHON if use_peers else Path(sys.executable)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="200 executions, 1 repetition")
    size.add_argument("--smoke", action="store_true", help="unbroken only, tiny, K=1,2")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--executions", type=int, default=None)
    parser.add_argument("--workers", default=None, help="worker counts (1,2,4)")
    parser.add_argument("--systems", default="unbroken,unbroken-guarded,dbos,absurd")
    parser.add_argument("--concurrency", type=int, default=16, help="executions per worker")
    parser.add_argument(
        "--budget",
        type=float,
        default=200.0,
        help="seconds the measured repetitions may take; one that would end later is skipped",
    )
    parser.add_argument("--server", default=None, help="PostgreSQL maintenance URL")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    started = time.monotonic()
    load_before = os.getloadavg()
    command = "python bench/workers.py" + "".join(f" {a}" for a in sys.argv[1:])
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = SIZES[mode]
    workers = [int(k) for k in (args.workers or ("1,2" if args.smoke else "1,2,4")).split(",")]
    wanted = ["unbroken", "unbroken-guarded"] if args.smoke else args.systems.split(",")
    known = systems_by_name()
    bad = [w for w in wanted if w not in known]
    if bad:
        parser.error(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(known)}")
    plan = Plan(
        list(known.values()),
        workers,
        args.executions or sizes["executions"],
        sizes["warmup_executions"] or args.executions or sizes["executions"],
        args.reps or sizes["reps"],
        sizes["warmup"] if args.warmup is None else args.warmup,
        args.concurrency,
        args.budget,
    )
    python = choose_systems(plan, wanted, args.smoke)
    server_url = args.server or (
        os.environ.get("UNBROKEN_TEST_POSTGRES_URL") if args.smoke else None
    )
    if args.smoke and not server_url:
        for s in list(plan.systems):
            plan.skip(s, "UNBROKEN_TEST_POSTGRES_URL is not set")
        plan.systems.clear()
    server = Server(server_url or DEFAULT_SERVER)
    problem = server.problem() if plan.systems else None
    if problem:
        for s in plan.systems:
            plan.skip(s, problem)
        plan.systems.clear()

    log_dir = Path(tempfile.mkdtemp(prefix="workers-"))
    key = base64.b64encode(os.urandom(32)).decode()
    fleet = Fleet(server, python, BENCH / "apps", log_dir, key)
    print(
        f"workers: {', '.join(s.name for s in plan.systems) or 'nothing to run'}; K = "
        f"{', '.join(map(str, workers))}; {plan.executions} executions; {plan.warmup} warm-up + "
        f"{plan.reps} repetitions; logs in {log_dir}",
        flush=True,
    )
    for s in plan.skipped:
        print(f"  skipped {s['system']}: {s['reason']}", flush=True)
    try:
        for system in list(plan.systems):
            try:
                fleet.prepare(system)
            except RunError as exc:
                plan.errors.append(
                    {"system": system.name, "workers": "all", "error": f"setup failed: {exc}"}
                )
                plan.systems.remove(system)
        samples = run_all(plan, fleet)
    finally:
        fleet.close()
    rows = aggregate(plan, samples, list(known))
    now = datetime.now(UTC)
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "postgres": server.version(),
        "unbroken_tree": tree_state(),
        "versions": fleet.versions([s.name for s in known.values() if s.name in wanted]),
        "executions": plan.executions,
        "warmup_executions": plan.warmup_executions,
        "concurrency": plan.concurrency,
        "workers": workers,
        "warmup": plan.warmup,
        "repetitions": plan.reps,
        "sizes": mode,
        "timing": TIMING,
        "wall_seconds": time.monotonic() - started,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "skipped": plan.skipped,
        "errors": plan.errors,
        "retries": plan.retries,
        "rows": rows,
    }
    text = markdown(report, known)
    out_dir = args.out_dir
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="smoke-")) if args.smoke else BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y-%m-%d}-workers"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out_dir / f"{stem}.md").write_text(text)
    print()
    print(text)
    print(f"written to {out_dir / stem}.json and .md ({report['wall_seconds']:.0f} s)")
    if plan.errors or plan.retries:
        print(f"the processes' stderr is kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    if args.smoke:
        return 1 if plan.errors or (plan.systems and not rows) else 0
    return 0


TIMING = (
    "Start-up is excluded alike: the K workers are started, connected and idle before the "
    "clock starts, and the clock starts when all executions become claimable at once — "
    "for DBOS and Absurd at the commit of one transaction that enqueued them all (the "
    "workers already polling), for unbroken (no batch enqueue) when the driver opens a "
    "gate the workers wait at, the executions having been enqueued beforehand. It stops "
    "when a 10 ms poll of the database sees every execution completed."
)


if __name__ == "__main__":
    sys.exit(main())

"""unbroken against DBOS, Absurd and Restate, in one run, on SQLite and PostgreSQL.

Usage: python bench/compare.py [--quick | --smoke] [--reps N] [--warmup N]
           [--systems unbroken,dbos,...] [--workloads steps,...] [--backends sqlite,postgres]
           [--budget SECONDS] [--out-dir DIR]

Each figure comes from its own process (``bench/run_one.py SYSTEM WORKLOAD ...``) on a
fresh database: a SQLite file in a new directory, or a PostgreSQL database created for
that one run on 127.0.0.1 and dropped after it. For every workload and backend the
systems take turns within each repetition, in an order rotated from one repetition to
the next; the first ``--warmup`` repetitions are discarded. Each figure is the median of
the measured repetitions, with their min–max.

Peers come from ``bench/.peers-venv`` (made by ``bench/setup_peers.sh``, which also puts
the project in it so every adapter runs on one interpreter); the Restate server comes from
``bench/.node`` and is started here, bound to 127.0.0.1, on a fresh data directory. A
peer that is not installed, or whose setup fails here, is reported as skipped with the
reason, never dropped.

Writes ``bench/results/<YYYY-MM-DD>-compare.json`` and ``-compare.md`` and prints the
table. ``--smoke`` runs unbroken alone on SQLite with tiny sizes in a few seconds, writes
to a temporary directory unless ``--out-dir`` is given, and exits 0 when the harness works.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import not_run, tree_state

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS_VENV = BENCH / ".peers-venv"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
NODE_DIR = BENCH / ".node"
WORK = BENCH / ".work"
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}

SYSTEMS = ("unbroken", "dbos", "absurd", "restate")
LABEL = {"unbroken": "unbroken", "dbos": "DBOS", "absurd": "Absurd", "restate": "Restate"}
BACKENDS = ("sqlite", "postgres")
WORKLOADS = (
    "empty",
    "steps",
    "fanout",
    "concurrent",
    "resume",
    "resume_small",
    "resume_large",
    "timer",
    "promise",
)
# Workloads that share one process per system and repetition (one start-up for all).
GROUPS = (
    ("empty", "timer", "promise"),
    ("steps",),
    ("resume",),
    ("resume_small",),
    ("fanout", "concurrent"),
    ("resume_large",),  # last: the longest, and the first the time budget cuts
)
# Each opens an engine on a journal a crashed process left (prepared once, then copied
# for every repetition; with one repetition, prepared in the run's own store).
RESUMES = ("resume", "resume_small", "resume_large")
TITLE = {
    "empty": "empty workflow, start→result",
    "steps": "sequential steps",
    "fanout": "fan-out of parallel steps",
    "concurrent": "concurrent executions",
    "resume": "resume after a crash",
    "resume_small": "resume, memory baseline",
    "resume_large": "resume of a long execution",
    "timer": "timer wake-up lateness",
    "promise": "promise round trip",
}
# Workloads only unbroken runs, and why each peer does not.
UNBROKEN_ONLY = {
    "resume_small": {
        peer: "the peak-RSS baseline of unbroken's 1,000,000-step resume; peers are compared "
        "on the 5,000-step resume"
        for peer in ("dbos", "absurd", "restate")
    },
    "resume_large": {
        "dbos": "DBOS replays a step in about a millisecond (its 5,000-step resume above): "
        "1,000,000 would take tens of minutes alone, beyond the whole run's budget",
        "absurd": "compared on the 5,000-step resume only (time budget)",
        "restate": "compared on the 5,000-step resume only (time budget)",
    },
}
# Measured repetitions where the default would not fit the time budget.
REPS = {"resume_large": 1}
# What each system needs from bench/.peers-venv/peers-status.json.
NEEDS = {
    "dbos": ("dbos",),
    "absurd": ("absurd-sdk", "absurdctl"),
    "restate": ("restate-sdk", "hypercorn", "httpx", "restate-server"),
}
ACK = "acknowledged (guarded)"
BUFFERED = "buffered (idempotent)"
EVERY_STEP = "acknowledged every step (idempotent)"

STEP_CASES = [[n, size] for size in (100, 10240) for n in (1, 10, 100, 1000)]


def _execs(n: int) -> int:
    """Executions per case, so that small N still times a few hundred steps' worth."""
    return {1: 20, 10: 5}.get(n, 1)


FULL: dict[str, dict[str, Any]] = {
    "empty": {"count": 30},
    "steps": {
        "cases": [[n, size, _execs(n)] for n, size in STEP_CASES],
        "sync_fn_case": [1000, 100],
        "ack_every_step_case": [1000, 100],
    },
    "fanout": {"n": 1000, "size": 100},
    "concurrent": {"execs": 500, "steps": 10, "size": 100},
    "resume": {"n": 5000},
    # 1,000,000 steps: written through the storage API (running them would take minutes)
    "resume_small": {"n": 1000},
    "resume_large": {"n": 1_000_000, "bulk": True},
    "timer": {"count": 3, "duration": 0.1},
    "promise": {"count": 5},
}
QUICK: dict[str, dict[str, Any]] = {
    "empty": {"count": 10},
    "steps": {
        "cases": [[1, 100, 5], [10, 100, 2], [100, 100, 1], [100, 10240, 1]],
        "ack_every_step_case": [100, 100],
    },
    "fanout": {"n": 200, "size": 100},
    "concurrent": {"execs": 50, "steps": 10, "size": 100},
    "resume": {"n": 1000},
    "resume_small": {"n": 1000},
    "resume_large": {"n": 100_000, "bulk": True},
    "timer": {"count": 2, "duration": 0.05},
    "promise": {"count": 3},
}
SMOKE: dict[str, dict[str, Any]] = {
    "empty": {"count": 3},
    "steps": {"cases": [[1, 100, 2], [10, 10240, 1]], "ack_every_step_case": [10, 100]},
    "fanout": {"n": 20, "size": 100},
    "concurrent": {"execs": 5, "steps": 3, "size": 100},
    "resume": {"n": 50},
    "resume_small": {"n": 20},
    "resume_large": {"n": 200, "bulk": True},
    "timer": {"count": 1, "duration": 0.02},
    "promise": {"count": 1},
}
# Where a full size does not fit the time budget on this 2-core machine, a smaller one
# runs for that system alone; the table's "ran" column says so.
OVERRIDES: dict[tuple[str, str, str], dict[str, Any]] = {
    # On PostgreSQL every system runs 100 concurrent executions: 500 × 10 acknowledged
    # steps take 30 s a run there (unbroken's as much as DBOS's).
    ("unbroken", "postgres", "concurrent"): {"execs": 100, "steps": 10, "size": 100},
    ("dbos", "postgres", "concurrent"): {"execs": 100, "steps": 10, "size": 100},
    ("absurd", "postgres", "concurrent"): {"execs": 100, "steps": 10, "size": 100},
    # DBOS's async path on SQLite runs ~100–200 steps/s here: 500 × 10 would take 30–50 s
    # a run.
    ("dbos", "sqlite", "concurrent"): {"execs": 100, "steps": 10, "size": 100},
}
RUN_TIMEOUT = 300.0


# -- environment ------------------------------------------------------------------------


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def _psql(db: str, sql: str) -> subprocess.CompletedProcess[str]:
    return _run(
        ["psql", "-h", PG["host"], "-p", PG["port"], "-U", PG["user"], "-d", db, "-qAtc", sql]
    )


def _pg_url(db: str) -> str:
    return f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{db}"


def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used here, or None."""
    if shutil.which("psql") is None:
        return "psql not found"
    r = _psql("postgres", "select 1")
    if r.returncode != 0:
        return f"PostgreSQL at {PG['host']}:{PG['port']} unreachable: {r.stderr.strip()[:200]}"
    return None


def wait_for_postgres(backend: str, timeout: float = 60.0) -> None:
    """After a failed run on PostgreSQL: wait until the server answers again (it may be
    restarting), then a little longer for it to settle."""
    if backend != "postgres":
        return
    deadline = time.monotonic() + timeout
    while postgres_problem() is not None and time.monotonic() < deadline:
        time.sleep(1.0)
    time.sleep(2.0)


def create_db(template: str | None = None) -> str:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    tmpl = f' TEMPLATE "{template}"' if template else ""
    r = _psql("postgres", f'CREATE DATABASE "{name}"{tmpl}')
    if r.returncode != 0:
        raise RuntimeError(f"createdb failed: {r.stderr.strip()}")
    return name


def drop_db(name: str) -> None:
    _psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RestateServer:
    """The Restate server, on 127.0.0.1 only, with a fresh data directory."""

    binary: Path
    base: Path
    ingress: str = ""
    admin: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ports = {k: _free_port() for k in ("ingress", "admin", "node")}
        env = dict(os.environ)
        env.update(
            RESTATE_DISABLE_TELEMETRY="true",
            RESTATE_INGRESS__BIND_PORT=str(ports["ingress"]),
            RESTATE_ADMIN__BIND_PORT=str(ports["admin"]),
            RESTATE_BIND_PORT=str(ports["node"]),
            RESTATE_LOG_DISABLE_ANSI_CODES="true",
        )
        self.base.mkdir(parents=True, exist_ok=True)
        log = open(self.base / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "--no-logo",
                "--bind-ip",
                "127.0.0.1",
                "--listen-mode",
                "tcp",
                "--base-dir",
                str(self.base / "data"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ingress = f"http://127.0.0.1:{ports['ingress']}"
        self.admin = f"http://127.0.0.1:{ports['admin']}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"restate-server exited with {self.proc.returncode}")
            if _http_ok(self.admin + "/health") and _http_ok(self.ingress + "/restate/health"):
                return
            time.sleep(0.2)
        raise RuntimeError("restate-server did not become healthy within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:  # loopback only
            return bool(r.status == 200)
    except OSError:
        return False


def restate_binary() -> Path | None:
    found = sorted(NODE_DIR.glob("node_modules/@restatedev/restate-server-*/bin/restate-server"))
    return found[0] if found else None


# -- the plan -----------------------------------------------------------------------------


@dataclass
class Plan:
    systems: list[str]
    backends: list[str]
    workloads: list[str]
    sizes: dict[str, dict[str, Any]]
    reps: int
    warmup: int
    budget: float
    smoke: bool
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    retries: list[dict[str, str]] = field(default_factory=list)

    def params(
        self, system: str, backend: str, workload: str, warmup: bool = False
    ) -> dict[str, Any]:
        if warmup and self.sizes is FULL and workload not in RESUMES:
            return QUICK[workload]  # a warm-up only has to warm: the small sizes do
        if not self.smoke and self.sizes is FULL:
            override = OVERRIDES.get((system, backend, workload))
            if override is not None:
                return override
        return self.sizes[workload]

    def skip(self, system: str, backend: str, workload: str, reason: str) -> None:
        self.skipped.append(
            {"system": system, "backend": backend, "workload": workload, "reason": reason}
        )


def peer_status() -> dict[str, str]:
    path = PEERS_VENV / "peers-status.json"
    if not path.exists():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def system_problem(system: str, status: dict[str, str]) -> str | None:
    if system == "unbroken":
        return None
    if not PEERS_PYTHON.exists():
        return "bench/.peers-venv is missing: run bench/setup_peers.sh (make bench does)"
    for need in NEEDS[system]:
        state = status.get(need)
        if state != "ok":
            return f"{need}: {state or 'not installed'}"
    return None


def backends_for(system: str) -> list[str]:
    """Where a system runs: Absurd on PostgreSQL only; Restate on its own store, listed
    with the SQLite figures (both are single-node local stores)."""
    return {"absurd": ["postgres"], "restate": ["sqlite"]}.get(system, list(BACKENDS))


# -- running one figure --------------------------------------------------------------------


@dataclass
class Context:
    plan: Plan
    python: Path
    restate: RestateServer | None
    log: Path


def _invoke(
    ctx: Context,
    system: str,
    workload: str,
    backend: str,
    params: dict[str, Any],
    workdir: Path,
    url: str,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    cmd = [
        str(ctx.python),
        str(BENCH / "run_one.py"),
        system,
        workload,
        "--backend",
        backend,
        "--db-url",
        url,
        "--workdir",
        str(workdir),
        "--params",
        json.dumps(params),
    ]
    if ctx.restate is not None:
        cmd += ["--restate-ingress", ctx.restate.ingress, "--restate-admin", ctx.restate.admin]
    env = dict(os.environ)
    env.pop("UNBROKEN_DATABASE_URL", None)
    env.pop("UNBROKEN_KEY", None)
    env.pop("UNBROKEN_KEY_FILE", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env,
            cwd=workdir,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "error": f"timed out after {RUN_TIMEOUT:.0f} s", "stderr": str(exc)}
    with ctx.log.open("a") as log:
        log.write(f"\n== {system} {workload} {backend} rc={proc.returncode}\n")
        log.write(proc.stderr[-4000:])
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            out = json.loads(line)
        except ValueError:
            continue
        if isinstance(out, dict) and out.get("system") == system:
            return out
    if workload == "resume_prepare" and proc.returncode == 0:
        return {"ok": True, "results": []}  # the prepare run ends with a hard exit
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"ok": False, "error": f"exit {proc.returncode}: {' | '.join(tail)[:500]}"}


@dataclass
class Store:
    """A fresh database for one run (and how to throw it away)."""

    url: str
    workdir: Path
    pg_name: str | None = None
    key: str | None = None

    def env(self, system: str) -> dict[str, str]:
        return {"UNBROKEN_KEY": self.key} if (system == "unbroken" and self.key) else {}

    def discard(self) -> None:
        if self.pg_name:
            drop_db(self.pg_name)
        shutil.rmtree(self.workdir, ignore_errors=True)


def fresh_store(system: str, backend: str, template: Store | None = None) -> Store:
    workdir = Path(tempfile.mkdtemp(prefix=f"{system}-{backend}-", dir=WORK))
    if template is not None:
        for item in template.workdir.iterdir():
            target = workdir / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
    if backend == "sqlite":
        return Store(f"sqlite:///{workdir / 'bench.db'}", workdir)
    name = create_db(template.pg_name if template else None)
    key = template.key if template else base64.b64encode(os.urandom(32)).decode()
    store = Store(_pg_url(name), workdir, pg_name=name, key=key)
    if system == "absurd" and template is None:
        absurdctl = PEERS_VENV / "bin" / "absurdctl"
        for args in (["init"], ["create-queue", "bench"]):
            r = _run([str(absurdctl), *args, "-d", store.url])
            if r.returncode != 0:
                store.discard()
                raise RuntimeError(f"absurdctl {args[0]} failed: {r.stderr.strip()[:300]}")
    return store


def run_figure(
    ctx: Context,
    system: str,
    workload: str,
    backend: str,
    params: dict[str, Any],
    template: Store | None,
) -> dict[str, Any]:
    """One measured run of a group of workloads on one system, on a fresh database."""
    try:
        store = fresh_store(system, backend, template)
    except RuntimeError as exc:
        return {"ok": False, "error": str(exc)}
    try:
        if workload in RESUMES and template is None:  # prepared in this run's own store
            prep_params = {"resume_prepare": params[workload]}
            prep = _invoke(
                ctx,
                system,
                "resume_prepare",
                backend,
                prep_params,
                store.workdir,
                store.url,
                store.env(system),
            )
            if not prep.get("ok"):
                return prep
        return _invoke(
            ctx, system, workload, backend, params, store.workdir, store.url, store.env(system)
        )
    finally:
        store.discard()


def prepare_resume(
    ctx: Context, plan: Plan, system: str, backend: str, params: dict[str, Any]
) -> Store:
    """A database holding one crashed execution with ``n`` committed steps, copied for
    every repetition so each resumes the same journal on a fresh database."""
    try:
        return _prepare_resume(ctx, system, backend, params)
    except RuntimeError as exc:
        if backend != "postgres":
            raise
        # Once more (reported): the database server is shared and may restart.
        plan.retries.append(_err(system, backend, "resume_prepare", str(exc)))
        wait_for_postgres(backend)
        return _prepare_resume(ctx, system, backend, params)


def _prepare_resume(ctx: Context, system: str, backend: str, params: dict[str, Any]) -> Store:
    store = fresh_store(system, backend)
    out = _invoke(
        ctx,
        system,
        "resume_prepare",
        backend,
        {"resume_prepare": params},
        store.workdir,
        store.url,
        store.env(system),
    )
    if not out.get("ok"):
        store.discard()
        raise RuntimeError(out.get("error") or out.get("skipped") or "prepare failed")
    return store


# -- the run --------------------------------------------------------------------------------


def run_all(ctx: Context) -> list[dict[str, Any]]:
    plan = ctx.plan
    samples: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    ran: dict[tuple[str, str, str], dict[str, Any]] = {}
    started = time.monotonic()
    for group in GROUPS:
        workloads = [w for w in group if w in plan.workloads]
        if not workloads:
            continue
        name = ",".join(workloads)
        for backend in plan.backends:
            systems = [s for s in plan.systems if backend in backends_for(s)]
            for system, reason in UNBROKEN_ONLY.get(name, {}).items():
                if system in systems:
                    plan.skip(system, backend, name, reason)
                    systems.remove(system)
            if not systems:
                continue
            templates: dict[str, Store] = {}
            reps = REPS.get(name, plan.reps) if not plan.smoke else plan.reps
            if name in RESUMES and reps > 1:
                for system in list(systems):
                    if system == "restate":
                        continue  # its journal lives in the server: prepared per run
                    try:
                        templates[system] = prepare_resume(
                            ctx, plan, system, backend, plan.params(system, backend, name)
                        )
                    except RuntimeError as exc:
                        plan.errors.append(_err(system, backend, name, str(exc)))
                        systems.remove(system)
            # A resume is a cold start by nature (a new process opening the database), and
            # its template was just written: no warm-up repetition.
            warmup = 0 if name in RESUMES else plan.warmup
            try:
                for rep in range(warmup + reps):
                    if time.monotonic() - started > plan.budget:
                        for system in systems:
                            plan.skip(system, backend, name, "time budget exhausted")
                        break
                    shift = rep % len(systems) if systems else 0
                    for system in systems[shift:] + systems[:shift]:
                        warm = rep < warmup
                        params = {w: plan.params(system, backend, w, warm) for w in workloads}
                        template = templates.get(system)
                        t0 = time.monotonic()
                        out = run_figure(ctx, system, name, backend, params, template)
                        if not out.get("ok") and "skipped" not in out and backend == "postgres":
                            # Once more (reported): the database server is shared and may
                            # restart.
                            plan.retries.append(_err(system, backend, name, str(out.get("error"))))
                            _progress(system, name, backend, rep, warmup, out)
                            wait_for_postgres(backend)
                            t0 = time.monotonic()
                            out = run_figure(ctx, system, name, backend, params, template)
                        out["seconds"] = time.monotonic() - t0
                        _progress(system, name, backend, rep, warmup, out)
                        if not out.get("ok"):
                            if "skipped" in out:
                                plan.skip(system, backend, name, out["skipped"])
                            else:
                                plan.errors.append(
                                    _err(system, backend, name, str(out.get("error")))
                                )
                            systems.remove(system)
                            continue
                        if warm:
                            continue
                        for w in workloads:
                            ran[(system, backend, w)] = params[w]
                        for r in out["results"]:
                            key = (
                                r["workload"],
                                backend,
                                system,
                                r["case"],
                                r.get("durability", ""),
                            )
                            samples[key].append(r)
            finally:
                for store in templates.values():
                    store.discard()
    return _aggregate(samples, ran)


def _err(system: str, backend: str, workload: str, error: str) -> dict[str, str]:
    return {"system": system, "backend": backend, "workload": workload, "error": error}


def _progress(
    system: str, workload: str, backend: str, rep: int, warmup: int, out: dict[str, Any]
) -> None:
    tag = "warm-up" if rep < warmup else f"rep {rep - warmup + 1}"
    head = f"  {backend:<8} {system:<8} {tag:<7} {out.get('seconds', 0):5.1f}s"
    if not out.get("ok"):
        why = out.get("skipped") or out.get("error")
        print(f"{head} {workload}: NOT RUN: {why}", flush=True)
        return
    for r in out["results"]:
        cls = f" [{r['durability']}]" if r.get("durability") else ""
        print(
            f"{head} {r['workload']:<10} {r['case']}{cls}: {r['value']:,.1f} {r['unit']}",
            flush=True,
        )


def _aggregate(
    samples: dict[tuple[str, ...], list[dict[str, Any]]],
    ran: dict[tuple[str, str, str], dict[str, Any]],
) -> list[dict[str, Any]]:
    rows = []
    for (workload, backend, system, case, durability), rs in samples.items():
        values = [r["value"] for r in rs]
        notes = sorted({r["note"] for r in rs if r.get("note")})
        rows.append(
            {
                "workload": workload,
                "backend": backend,
                "system": system,
                "case": case,
                "durability": durability,
                "unit": rs[0]["unit"],
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "repetitions": len(values),
                "values": values,
                "params": ran.get((system, backend, workload)),
                "notes": notes,
            }
        )
    _ratios(rows)
    order = {w: i for i, w in enumerate(WORKLOADS)}
    sysorder = {s: i for i, s in enumerate(SYSTEMS)}
    rows.sort(
        key=lambda r: (
            order.get(r["workload"], 99),
            _case_key(r["case"]),
            BACKENDS.index(r["backend"]),
            sysorder[r["system"]],
            r["durability"] != ACK,
        )
    )
    return rows


def _case_key(case: str) -> tuple[Any, ...]:
    """Sort 'N=10, 100 B' by size then N; other cases by their text."""
    if case.startswith("N="):
        n, _, rest = case[2:].partition(", ")
        return (0, "KiB" in rest, "sync" in rest, int(n))
    return (1, case)


def _ratios(rows: list[dict[str, Any]]) -> None:
    """peer ÷ unbroken on the same workload, case and backend: against the acknowledged
    (guarded) class (like for like with peers whose every step is durable before the
    next), and against the buffered class where it was measured."""
    ref: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    ref_params: dict[tuple[str, str], Any] = {}
    for r in rows:
        if r["system"] == "unbroken":
            ref[(r["workload"], r["backend"], r["case"])][r["durability"]] = r["median"]
            ref_params[(r["workload"], r["backend"])] = r["params"]
    for r in rows:
        r["size_differs"] = (
            r["system"] != "unbroken"
            and ref_params.get((r["workload"], r["backend"]), r["params"]) != r["params"]
            and r["workload"] != "steps"
        )
        base = ref.get((r["workload"], r["backend"], r["case"]), {})
        ack = base.get(ACK, base.get(""))
        buf = base.get(BUFFERED)
        if r["system"] == "unbroken" or ack is None or ack <= 0:
            r["ratio_vs_acknowledged"] = None
        else:
            r["ratio_vs_acknowledged"] = r["median"] / ack
        if r["system"] != "unbroken" and buf:
            r["ratio_vs_buffered"] = r["median"] / buf
        else:
            r["ratio_vs_buffered"] = None


# -- the report -----------------------------------------------------------------------------


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ran(r: dict[str, Any]) -> str:
    p = r.get("params") or {}
    w = r["workload"]
    if w == "steps":
        if r["durability"] == EVERY_STEP:
            return "1 exec"
        for n, _size, execs in p.get("cases", []):
            if r["case"].startswith(f"N={n}, "):
                return f"{execs} exec{'s' if execs > 1 else ''}"
        return ""
    if w == "concurrent":
        rate = 1e6 / r["median"] if r["median"] > 0 else 0
        return f"{p.get('execs')} × {p.get('steps')} ({rate:,.0f} steps/s)"
    if w == "fanout":
        return f"{p.get('n')} steps"
    if w in RESUMES:
        runs = r["repetitions"]
        return f"{p.get('n', 0):,} steps" + (f", {runs} run" if runs == 1 else "")
    if w in ("empty", "promise"):
        return f"{p.get('count')} times"
    if w == "timer":
        return f"{p.get('count')} sleeps"
    return ""


def _who(r: dict[str, Any]) -> str:
    if r["system"] == "unbroken":
        return f"unbroken {r['durability']}" if r["durability"] else "unbroken"
    label = LABEL[r["system"]]
    return f"{label} (own store)" if r["system"] == "restate" else label


def _ratio(v: float | None, differs: bool = False) -> str:
    if v is None:
        return ""
    text = f"{v:,.2f}×" if v < 10 else f"{v:,.0f}×"
    return f"{text} †" if differs else text


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        f"# unbroken against peers, {report['date'][:10]}",
        "",
        f"`{report['command']}` on {report['machine']}, Python {report['python']}, unbroken "
        f"at {report.get('unbroken_tree', 'unknown')}; "
        f"{report['warmup']} warm-up + {report['repetitions']} measured repetitions per "
        f"figure, systems alternating; median and min–max over the repetitions; every run "
        f"in its own process on a fresh database. Total wall time "
        f"{report['wall_seconds'] / 60:.1f} min; 1-minute load average "
        f"{report['load_average']['start'][0]:.1f} at the start and "
        f"{report['load_average']['end'][0]:.1f} at the end (other work shared the "
        f"machine: compare figures within a row, not across runs).",
        "",
        "Peers: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "**Durability is not the same across rows.** unbroken *buffered (idempotent)* steps "
        "are group committed: durable within one group commit (≤ 10 ms), not before the "
        "next step starts. unbroken *acknowledged (guarded)* steps commit an intent before "
        "the step function runs and the result before the step returns. unbroken "
        "*acknowledged every step (idempotent)* steps (an engine with "
        "`journal_ack_every_step`) commit their result, once, before the step returns. "
        "A DBOS step, an "
        "Absurd checkpoint and a Restate `ctx.run` are each durable before the next step "
        "starts, so the like-for-like ratio is **peer ÷ unbroken acknowledged**; the "
        "ratio against buffered is shown separately and is not like for like. Ratios above "
        "1 mean the peer takes longer. Restate keeps its journal in its own server store "
        "(RocksDB, fsynced WAL): it has no SQLite or PostgreSQL option and is listed with "
        "the SQLite rows.",
        "",
        "| workload | case | backend | ran | system | median | min–max | unit "
        "| peer ÷ unbroken acknowledged | peer ÷ unbroken buffered |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|",
    ]
    lines += [
        f"| {TITLE.get(r['workload'], r['workload'])} | {r['case']} | {r['backend']} "
        f"| {_ran(r)} | {_who(r)} | {_fmt(r['median'])} "
        f"| {_fmt(r['min'])}–{_fmt(r['max'])} | {r['unit']} "
        f"| {_ratio(r['ratio_vs_acknowledged'], r['size_differs'])} "
        f"| {_ratio(r['ratio_vs_buffered'], r['size_differs'])} |"
        for r in rows
    ]
    if any(r["size_differs"] for r in rows):
        lines += [
            "",
            "† the peer ran a smaller size than unbroken (see *ran*) because the full size "
            "does not fit the time budget on this machine; the ratio compares per-step or "
            "per-resume figures of different sizes.",
        ]
    lines += _rss_growth(rows)
    notes = sorted({(r["system"], r["workload"], n) for r in rows for n in r["notes"]})
    if notes:
        lines += ["", "Notes from the adapters:", ""]
        lines += [f"- {LABEL[s]}, {TITLE[w]}: {n}" for s, w, n in notes]
    lines += not_run(
        "Nothing: every system ran every workload it supports.",
        [
            ("skipped", [_where(s) + s["reason"] for s in report["skipped"]]),
            ("retried once", [_where(e) + e["error"] for e in report.get("retries", [])]),
            ("failed", [_where(e) + e["error"] for e in report["errors"]]),
        ],
    )
    lines.append("")
    return "\n".join(lines)


def _where(r: dict[str, Any]) -> str:
    return f"{LABEL[r['system']]}, {r['workload']} on {r['backend']}: "


def _rss_growth(rows: list[dict[str, Any]]) -> list[str]:
    """How much more memory resuming the long execution took than the baseline."""
    peak = {
        (r["workload"], r["backend"]): r
        for r in rows
        if r["system"] == "unbroken" and r["unit"] == "MiB"
    }
    found = []
    for backend in BACKENDS:
        small, large = peak.get(("resume_small", backend)), peak.get(("resume_large", backend))
        if small and large:
            n_small = (small["params"] or {}).get("n", 0)
            n_large = (large["params"] or {}).get("n", 0)
            found.append(
                f"- {backend}: resuming {n_large:,} steps peaked {large['median']:.1f} MiB, "
                f"{large['median'] - small['median']:+.1f} MiB over resuming {n_small:,} "
                f"({small['median']:.1f} MiB)"
            )
    if not found:
        return []
    head = "Peak RSS of the resuming process (the whole process, interpreter included):"
    return ["", head, "", *found]


def versions(python: Path, systems: list[str]) -> dict[str, str]:
    names = {
        "unbroken": ["unbroken"],
        "dbos": ["dbos"],
        "absurd": ["absurd-sdk"],
        "restate": ["restate-sdk", "hypercorn"],
    }
    wanted = [n for s in systems for n in names[s]]
    code = (
        "import importlib.metadata as m, json\n"
        "out = {}\n"
        f"for name in {wanted!r}:\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    r = _run([str(python), "-c", code])
    try:
        found: dict[str, str] = json.loads(r.stdout)
    except ValueError:
        found = {}
    binary = restate_binary()
    if binary is not None and "restate" in systems:
        v = _run([str(binary), "--version"]).stdout.split()
        if v:
            found["restate-server"] = v[-1]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, 2 repetitions")
    size.add_argument("--smoke", action="store_true", help="unbroken on SQLite, tiny sizes")
    parser.add_argument("--reps", type=int, default=None, help="measured repetitions (3)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded repetitions (1)")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument(
        "--budget",
        type=float,
        default=660.0,
        help="seconds after which the remaining repetitions are skipped (make bench also "
        "runs bench/workers.py and must stay under 15 minutes)",
    )
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    started = time.monotonic()
    load_before = os.getloadavg()
    command = "python bench/compare.py" + "".join(f" {a}" for a in sys.argv[1:])
    if args.smoke:
        systems, backends, sizes = ["unbroken"], ["sqlite"], SMOKE
        reps, warmup = args.reps or 1, args.warmup or 0
    else:
        systems = [s for s in args.systems.split(",") if s]
        backends = [b for b in args.backends.split(",") if b]
        sizes = QUICK if args.quick else FULL
        reps = args.reps or (2 if args.quick else 3)
        warmup = args.warmup if args.warmup is not None else 1
    workloads = [w for w in args.workloads.split(",") if w]
    for name, given, allowed in (
        ("system", systems, SYSTEMS),
        ("backend", backends, BACKENDS),
        ("workload", workloads, WORKLOADS),
    ):
        bad = [g for g in given if g not in allowed]
        if bad:
            parser.error(f"unknown {name}(s): {', '.join(bad)}; choose from {', '.join(allowed)}")
    plan = Plan(systems, backends, workloads, sizes, reps, warmup, args.budget, args.smoke)

    # The interpreter every adapter runs on: the peers' venv (which holds the project
    # too), or this one for unbroken alone when the peers are not installed.
    python = PEERS_PYTHON if (PEERS_PYTHON.exists() and not args.smoke) else Path(sys.executable)
    status = peer_status()
    for system in list(plan.systems):
        problem = system_problem(system, status)
        if problem:
            for b in backends_for(system):
                if b in plan.backends:
                    plan.skip(system, b, "all", problem)
            plan.systems.remove(system)
    if "absurd" in plan.systems and "sqlite" in plan.backends:
        plan.skip("absurd", "sqlite", "all", "Absurd stores its tasks in PostgreSQL only")
    if "postgres" in plan.backends:
        problem = postgres_problem()
        if problem:
            for s in plan.systems:
                if "postgres" in backends_for(s):
                    plan.skip(s, "postgres", "all", problem)
            plan.backends.remove("postgres")

    WORK.mkdir(exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    restate: RestateServer | None = None
    if "restate" in plan.systems and "sqlite" in plan.backends:
        binary = restate_binary()
        try:
            if binary is None:
                raise RuntimeError("restate-server binary not found under bench/.node")
            restate = RestateServer(binary, run_dir / "restate")
            restate.start()
        except RuntimeError as exc:
            plan.skip("restate", "sqlite", "all", f"Restate server did not start: {exc}")
            plan.systems.remove("restate")
            if restate is not None:
                restate.stop()
            restate = None
    ctx = Context(plan, python, restate, run_dir / "runs.log")
    print(
        f"compare: systems {', '.join(plan.systems) or 'none'}; backends "
        f"{', '.join(plan.backends) or 'none'}; {warmup} warm-up + {reps} repetitions; "
        f"log {ctx.log.relative_to(ROOT)}",
        flush=True,
    )
    for s in plan.skipped:
        print(f"  skipped {s['system']} on {s['backend']}: {s['reason']}", flush=True)
    try:
        rows = run_all(ctx)
    finally:
        if restate is not None:
            restate.stop()
    now = datetime.now(UTC)
    report = {
        "date": now.isoformat(timespec="seconds"),
        "command": command,
        "unbroken_tree": tree_state(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "versions": versions(python, plan.systems),
        "warmup": warmup,
        "repetitions": reps,
        "sizes": "smoke" if args.smoke else "quick" if args.quick else "full",
        "wall_seconds": time.monotonic() - started,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "skipped": plan.skipped,
        "errors": plan.errors,
        "retries": plan.retries,
        "rows": rows,
    }
    text = markdown(report)
    out_dir = args.out_dir
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="smoke-")) if args.smoke else BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y-%m-%d}-compare"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out_dir / f"{stem}.md").write_text(text)
    print()
    print(text)
    print(f"written to {out_dir / stem}.json and .md ({report['wall_seconds']:.0f} s)")
    if plan.errors and not args.smoke:
        print(f"the runs' stderr is kept in {ctx.log}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.smoke:
        return 0 if rows and not plan.errors else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

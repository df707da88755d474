"""One run of bench/workers.py: a fresh database, K worker processes, an enqueuer, a clock.

``Fleet.prepare(system)`` makes a template database holding only the system's schema;
``Fleet.run(system, k, executions, concurrency)`` copies it into a fresh database, starts
the enqueuer and the K workers (``bench/apps/<system>_queue.py``), waits until every one
is ready, starts the clock (see ``System.gated``), polls the database every 10 ms until
every execution is completed, stops the workers with SIGTERM and drops the database.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

STEPS = 3
PEER_POLL_SECS = 0.01
POLL_SECS = 0.01
READY_TIMEOUT = 90.0
RUN_TIMEOUT = 180.0
MARK = "@@bench"


class RunError(Exception):
    """A run could not be measured; the message says why."""


@dataclass(frozen=True)
class System:
    name: str
    label: str
    app: str  # bench/apps/<app>.py
    counts: str  # SQL: (completed, failed) executions
    steps: str  # SQL: step records journaled
    gated: bool  # True: enqueue first, then open the workers' gate; False: batch commit
    needs: tuple[str, ...] = ()
    enqueue_args: tuple[str, ...] = ()
    note: str = ""


def systems_by_name() -> dict[str, System]:
    unbroken_counts = (
        "SELECT count(*) FILTER (WHERE status = 'completed'), "
        "count(*) FILTER (WHERE status IN ('failed', 'aborted', 'canceled')) FROM executions"
    )
    unbroken_steps = "SELECT count(*) FROM journal WHERE kind = 'result'"
    unbroken_note = (
        "unbroken: `run_worker` with its defaults (claims at once when a slot frees or "
        "NOTIFY announces work; 1 s fallback poll); payloads sealed with XChaCha20-Poly1305 "
        "(mandatory on PostgreSQL; the peers store plain JSON)"
    )
    found = [
        System(
            "unbroken",
            "unbroken, buffered steps",
            "unbroken_queue",
            unbroken_counts,
            unbroken_steps,
            gated=True,
            enqueue_args=("--workflow", "three"),
            note=unbroken_note,
        ),
        System(
            "unbroken-guarded",
            "unbroken, guarded steps",
            "unbroken_queue",
            unbroken_counts,
            unbroken_steps,
            gated=True,
            enqueue_args=("--workflow", "three_guarded"),
            note=unbroken_note,
        ),
        System(
            "dbos",
            "DBOS",
            "dbos_queue",
            "SELECT count(*) FILTER (WHERE status = 'SUCCESS'), count(*) FILTER (WHERE status "
            "IN ('ERROR', 'CANCELLED', 'MAX_RECOVERY_ATTEMPTS_EXCEEDED')) "
            "FROM dbos.workflow_status WHERE queue_name = 'bench'",
            "SELECT count(*) FROM dbos.operation_outputs",
            gated=False,
            needs=("dbos",),
            note="DBOS: sync workflow and steps (its faster path here); queue "
            "`worker_concurrency` = the per-worker concurrency, "
            f"`polling_interval_sec={PEER_POLL_SECS}` (default 1 s, which would cap each worker "
            "at one batch a second); a distinct `DBOS__VMID` per worker",
        ),
        System(
            "absurd",
            "Absurd",
            "absurd_queue",
            "SELECT count(*) FILTER (WHERE state = 'completed'), "
            "count(*) FILTER (WHERE state IN ('failed', 'cancelled')) FROM absurd.t_bench",
            "SELECT count(*) FROM absurd.c_bench",
            gated=False,
            needs=("absurd-sdk", "absurdctl"),
            note=f"Absurd: `start_worker(concurrency=…, poll_interval={PEER_POLL_SECS})` "
            "(default 0.25 s); it claims a batch and finishes it before claiming again",
        ),
    ]
    return {s.name: s for s in found}


@dataclass
class Server:
    """The PostgreSQL server where runs create and drop their databases."""

    url: str  # any database on it; the maintenance database ``postgres`` is used

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.db_url("postgres"), autocommit=True, connect_timeout=5)

    def db_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        user = info.get("user") or "postgres"
        password = f":{info['password']}" if info.get("password") else ""
        host = info.get("host") or "127.0.0.1"
        port = info.get("port") or "5432"
        return f"postgresql://{user}{password}@{host}:{port}/{name}"

    def problem(self) -> str | None:
        try:
            with self._admin() as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return f"PostgreSQL at {self.db_url('postgres')} unreachable: {str(exc)[:200]}"
        return None

    def version(self) -> str:
        try:
            with self._admin() as conn:
                row = conn.execute("SHOW server_version").fetchone()
        except psycopg.Error:
            return "unknown"
        return str(row[0]).split()[0] if row else "unknown"

    def create(self, template: str | None = None) -> str:
        name = f"bench_w_{uuid.uuid4().hex[:12]}"
        tmpl = f' TEMPLATE "{template}"' if template else ""
        for attempt in range(5):  # a template just released may still show a session
            try:
                with self._admin() as conn:
                    conn.execute(f'CREATE DATABASE "{name}"{tmpl}'.encode())
                return name
            except psycopg.Error as exc:
                if attempt == 4:
                    raise RunError(f"CREATE DATABASE failed: {str(exc).strip()[:300]}") from None
                time.sleep(0.5)
        raise AssertionError("unreachable")

    def drop(self, name: str) -> None:
        """Drop database ``name``, retrying while the server restarts (best effort: the
        run is over either way)."""
        for attempt in range(6):
            try:
                with self._admin() as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
                return
            except psycopg.Error:
                if attempt < 5:
                    time.sleep(1.0)


@dataclass
class Child:
    """A child process whose marked stdout lines arrive on ``lines``."""

    name: str
    proc: subprocess.Popen[str]
    lines: queue.Queue[tuple[str, str]]

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died; the wait for its markers reports it

    def close_stdin(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass


def _pump(name: str, stream: IO[str], lines: queue.Queue[tuple[str, str]]) -> None:
    for line in stream:
        if line.startswith(MARK):
            lines.put((name, line[len(MARK) :].strip()))
    lines.put((name, "<eof>"))


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _ticks(pid: int, comm: str | None = None) -> int | None:
    """User + system CPU ticks of process ``pid`` (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if comm is not None and not stat[stat.index("(") + 1 :].startswith(comm):
        return None  # not the server's process (the server is on another machine)
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


@dataclass
class _Usage:
    """CPU ticks so far of the workers and of the server processes serving this database
    (its backends other than the driver's own; shared server processes are not in it)."""

    workers: int | None
    backends: dict[int, int]

    @classmethod
    def take(cls, conn: psycopg.Connection[Any], workers: list[Child]) -> _Usage:
        ticks = [_ticks(w.proc.pid) for w in workers]
        total = None if None in ticks else sum(t for t in ticks if t is not None)
        rows = conn.execute(
            b"SELECT pid FROM pg_stat_activity "
            b"WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        backends = {}
        for (pid,) in rows:
            t = _ticks(int(pid), "postgres")
            if t is not None:
                backends[int(pid)] = t
        return cls(total, backends)

    def since(self, before: _Usage, executions: int) -> dict[str, float | None]:
        """CPU ms per execution between ``before`` and this; a backend that was not there
        before counts from zero, one that ended meanwhile is missed."""
        workers = None
        if self.workers is not None and before.workers is not None:
            workers = (self.workers - before.workers) / _TICKS * 1e3 / executions
        server = None
        if self.backends:
            used = sum(t - before.backends.get(pid, 0) for pid, t in self.backends.items())
            server = used / _TICKS * 1e3 / executions
        return {"worker_cpu_ms_per_execution": workers, "server_cpu_ms_per_execution": server}


def _connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise RunError(f"PostgreSQL: {str(exc).strip()[:300]}") from None


@dataclass
class Fleet:
    server: Server
    python: Path
    apps: Path
    log_dir: Path
    key: str
    templates: dict[str, str] = field(default_factory=dict)

    # -- processes ---------------------------------------------------------------------

    def _env(self, system: System, url: str, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UNBROKEN_", "DBOS"))}
        env["PYTHONUNBUFFERED"] = "1"
        if system.app == "unbroken_queue":
            env["UNBROKEN_DATABASE_URL"] = url
            env["UNBROKEN_KEY"] = self.key
        if system.name == "dbos":
            env["DBOS__VMID"] = f"bench-{role}"
        return env

    def _start(
        self, system: System, url: str, role: str, args: list[str], lines: queue.Queue[Any]
    ) -> Child:
        cmd = [str(self.python), str(self.apps / f"{system.app}.py"), *args]
        if system.app != "unbroken_queue":
            cmd += ["--db-url", url]
        log = open(self.log_dir / f"{system.name}.log", "a")  # noqa: SIM115 - child holds it
        log.write(f"\n== {role}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self._env(system, url, role),
            cwd=self.apps,
        )
        log.close()
        child = Child(role, proc, lines)
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(role, proc.stdout, lines), daemon=True).start()
        return child

    @staticmethod
    def _await(
        lines: queue.Queue[tuple[str, str]], want: dict[str, str], timeout: float
    ) -> dict[str, str]:
        """Wait until every child in ``want`` printed its marker; what they said."""
        got: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(want):
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = sorted(set(want) - set(got))
                raise RunError(f"{', '.join(waiting)} not ready after {timeout:.0f} s")
            try:
                who, text = lines.get(timeout=left)
            except queue.Empty:
                continue
            if text == "<eof>" and who in want and who not in got:
                raise RunError(f"{who} exited before saying {want[who]!r}")
            if who in want and text.split()[0] == want[who]:
                got[who] = text
        return got

    @staticmethod
    def _stop(children: list[Child]) -> None:
        for c in children:
            c.close_stdin()
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        for c in children:
            try:
                c.proc.wait(15)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()

    # -- templates -----------------------------------------------------------------------

    def prepare(self, system: System) -> None:
        """A template database with the system's schema and nothing else."""
        if system.app in self.templates:
            return
        name = self.server.create()
        self.templates[system.app] = name
        url = self.server.db_url(name)
        if system.app == "absurd_queue":
            ctl = self.python.parent / "absurdctl"
            for args in (["init"], ["create-queue", "bench"]):
                r = subprocess.run(
                    [str(ctl), *args, "-d", url], capture_output=True, text=True, check=False
                )
                if r.returncode != 0:
                    raise RunError(f"absurdctl {args[0]}: {r.stderr.strip()[:300]}")
            return
        lines: queue.Queue[tuple[str, str]] = queue.Queue()
        args = ["setup"] if system.app == "dbos_queue" else ["enqueue", "--executions", "0"]
        child = self._start(system, url, "setup", args, lines)
        try:
            self._await(
                lines,
                {"setup": "ready" if system.app == "dbos_queue" else "committed"},
                READY_TIMEOUT,
            )
        finally:
            self._stop([child])

    def close(self) -> None:
        for name in self.templates.values():
            self.server.drop(name)
        self.templates.clear()

    # -- one run -------------------------------------------------------------------------

    def run(self, system: System, k: int, executions: int, concurrency: int) -> dict[str, Any]:
        """One measured run on a fresh database; its figures."""
        self.prepare(system)
        db = self.server.create(self.templates[system.app])
        url = self.server.db_url(db)
        lines: queue.Queue[tuple[str, str]] = queue.Queue()
        children: list[Child] = []
        started = time.monotonic()
        try:
            enq, workers = self._launch(system, url, k, executions, concurrency, lines, children)
            setup = time.monotonic() - started
            conn = _connect(url)
            with conn:
                before = _Usage.take(conn, workers)
                if system.gated:
                    t0 = time.time()
                    for w in workers:
                        w.send("go")
                else:
                    enq.send("go")
                    said = self._await(lines, {"enqueuer": "committed"}, READY_TIMEOUT)
                    t0 = float(said["enqueuer"].split()[1])
                t1 = self._drain(conn, system, executions, workers)
                after = _Usage.take(conn, workers)
                steps = conn.execute(system.steps.encode()).fetchone()
        except psycopg.Error as exc:
            raise RunError(f"PostgreSQL: {str(exc).strip()[:300]}") from None
        finally:
            stopping = time.monotonic()
            self._stop(children)
            stop = time.monotonic() - stopping
            self.server.drop(db)
        recorded = int(steps[0]) if steps else 0
        if recorded != STEPS * executions:
            raise RunError(f"{recorded} step records for {executions} executions of {STEPS} steps")
        seconds = t1 - t0
        return {
            "executions": executions,
            "workers": k,
            "seconds": seconds,
            "executions_per_s": executions / seconds,
            "steps_per_s": executions * STEPS / seconds,
            "steps_recorded": recorded,
            **after.since(before, executions),
            "setup_seconds": setup,
            "stop_seconds": stop,
        }

    def _launch(
        self,
        system: System,
        url: str,
        k: int,
        executions: int,
        concurrency: int,
        lines: queue.Queue[tuple[str, str]],
        children: list[Child],
    ) -> tuple[Child, list[Child]]:
        """Start the enqueuer and K workers together; return once all are ready and the
        executions are in place (gated: enqueued and committed; batch: in the open
        transaction). A gated worker may open its engine while the enqueuer still works:
        it claims nothing before the gate opens."""
        args = ["enqueue", "--executions", str(executions), *system.enqueue_args]
        enq = self._start(system, url, "enqueuer", args, lines)
        children.append(enq)
        args = ["worker", "--concurrency", str(concurrency)]
        if not system.gated:
            args += ["--poll", str(PEER_POLL_SECS)]
        workers = [self._start(system, url, f"worker-{i}", args, lines) for i in range(k)]
        children += workers
        want = {w.name: "ready" for w in workers}
        want["enqueuer"] = "committed" if system.gated else "prepared"
        self._await(lines, want, READY_TIMEOUT)
        return enq, workers

    def _drain(
        self, conn: psycopg.Connection[Any], system: System, executions: int, workers: list[Child]
    ) -> float:
        """Poll until every execution completed; the wall time it was first seen."""
        deadline = time.monotonic() + RUN_TIMEOUT
        query = system.counts.encode()
        while True:
            row = conn.execute(query).fetchone()
            now = time.time()
            done, failed = (int(row[0]), int(row[1])) if row else (0, 0)
            if failed:
                raise RunError(f"{failed} executions failed")
            if done >= executions:
                return now
            if time.monotonic() > deadline:
                raise RunError(f"only {done} of {executions} completed in {RUN_TIMEOUT:.0f} s")
            dead = [w.name for w in workers if w.proc.poll() is not None]
            if dead:
                raise RunError(f"{', '.join(dead)} exited during the run")
            time.sleep(POLL_SECS)

    def versions(self, names: list[str]) -> dict[str, str]:
        wanted = {
            "unbroken": "unbroken",
            "unbroken-guarded": "unbroken",
            "dbos": "dbos",
            "absurd": "absurd-sdk",
        }
        dists = sorted({wanted[n] for n in names if n in wanted})
        code = (
            "import importlib.metadata as m, json\n"
            "out = {}\n"
            f"for name in {dists!r}:\n"
            "    try: out[name] = m.version(name)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))\n"
        )
        r = subprocess.run(
            [str(self.python), "-c", code], capture_output=True, text=True, check=False
        )
        try:
            return dict(json.loads(r.stdout))
        except ValueError:
            return {}

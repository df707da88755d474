"""Fixtures of the crash tests: the counting service, worker subprocesses, the oracle, and
the queued work that worker processes of ``queue_app.py`` drain.

Workers are real processes (``worker.py``) that SIGKILL themselves at a chosen point; the
tests resume them on the same database and compare against a crash-free run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from unbroken import Context, Engine, ExecutionInfo
from unbroken.journal import EntryKind

from ..storage.conftest import admin_execute, fresh_schema, schema_url
from .service import CountingService

WORKER = Path(__file__).with_name("worker.py")
WORKER_TIMEOUT_SECS = 30.0
EXECUTION_ID = "crash-1"

OPS = ("load", "notify", "quote_a", "quote_b", "quote_c", "charge", "pay", "receipt")
"""The operations of the worker's workflow, by step id."""
STEP_OF = {op: step_id for step_id, op in enumerate(OPS)}
GUARDED = ("charge", "pay")


@dataclass
class WorkerRun:
    """How one worker process ended."""

    returncode: int
    stdout: str
    stderr: str
    report: dict[str, Any] | None = field(default=None)

    @property
    def killed(self) -> bool:
        """Whether SIGKILL ended it."""
        return self.returncode == -signal.SIGKILL

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr[-4000:]}"


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


POSTGRES_URL = os.environ.get("UNBROKEN_TEST_POSTGRES_URL", "")
KEYS: dict[str, str] = {}
"""The payload key of each PostgreSQL database URL a test made (encryption is required)."""


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgres",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="UNBROKEN_TEST_POSTGRES_URL unset"),
        ),
    ]
)
def crash_backend(request: pytest.FixtureRequest) -> str:
    """The database the worker processes share: a SQLite file, or a PostgreSQL schema."""
    return str(request.param)


class Workers:
    """Starts worker processes against one counting service; kills leftovers at teardown."""

    def __init__(self, tmp_path: Path, service: CountingService, backend: str = "sqlite") -> None:
        self.tmp_path = tmp_path
        self.service = service
        self.backend = backend
        self._procs: list[subprocess.Popen[str]] = []
        self._schemas: dict[str, str] = {}

    def db(self, name: str = "journal.db") -> Any:
        """The database called ``name``: a file path, or a PostgreSQL URL (str)."""
        if self.backend == "sqlite":
            return self.tmp_path / name
        if name not in self._schemas:
            schema = f"c_{secrets.token_hex(6)}"
            admin_execute(f"CREATE SCHEMA {schema}")
            self._schemas[name] = schema
            KEYS[schema_url(schema)] = base64.b64encode(os.urandom(32)).decode()
        return schema_url(self._schemas[name])

    def marker(self, name: str = "crashed.marker") -> Path:
        return self.tmp_path / name

    def start(self, db: Path, *extra: str) -> subprocess.Popen[str]:
        """Start ``worker.py DB SERVICE_URL *extra`` (cwd: the test's tmp dir)."""
        env = _clean_env()
        if str(db) in KEYS:
            env["UNBROKEN_KEY"] = KEYS[str(db)]
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(db), self.service.url, *extra],
            cwd=self.tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._procs.append(proc)
        return proc

    def finish(
        self, proc: subprocess.Popen[str], timeout: float = WORKER_TIMEOUT_SECS
    ) -> WorkerRun:
        """Wait for ``proc`` (killing it if it overruns) and parse its JSON line."""
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"worker overran {timeout}s\nstdout: {stdout}\nstderr: {stderr}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        run = WorkerRun(proc.returncode, stdout, stderr)
        lines = [line for line in stdout.splitlines() if line.strip()]
        if lines:
            try:
                run.report = json.loads(lines[-1])
            except ValueError:
                run.report = None
        return run

    def run(self, db: Path, *extra: str, timeout: float = WORKER_TIMEOUT_SECS) -> WorkerRun:
        """Run one worker to its end."""
        return self.finish(self.start(db, *extra), timeout)

    def cleanup(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()
        for schema in self._schemas.values():
            admin_execute(f"DROP SCHEMA {schema} CASCADE")
        self._schemas.clear()


@pytest.fixture
def service() -> Iterator[CountingService]:
    """A counting service (no dedup: every request performs)."""
    with CountingService() as svc:
        yield svc


@pytest.fixture
def workers(
    tmp_path: Path, service: CountingService, crash_backend: str
) -> Iterator[Workers]:
    """Worker processes calling ``service``; every one is killed and reaped at teardown."""
    pool = Workers(tmp_path, service, crash_backend)
    try:
        yield pool
    finally:
        pool.cleanup()


@dataclass(frozen=True)
class Baseline:
    """The crash-free run of the workflow: its result and its per-operation calls."""

    result: dict[str, Any]
    counts: dict[str, int]
    keys: dict[str, str | None]


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """Run the workflow once without any crash, on a database of its own."""
    tmp = tmp_path_factory.mktemp("crash-free")
    with CountingService() as svc:
        pool = Workers(tmp, svc)
        try:
            run = pool.run(pool.db())
        finally:
            pool.cleanup()
        assert run.returncode == 0, run.describe()
        assert run.report is not None and "result" in run.report, run.describe()
        counts = svc.counts()
        keys = {op: svc.keys(op)[0] for op in OPS}
    assert counts == dict.fromkeys(OPS, 1)
    return Baseline(run.report["result"], counts, keys)


# -- the oracle -------------------------------------------------------------------------


def inspect_execution(db: Path, execution_id: str = EXECUTION_ID) -> ExecutionInfo:
    """``engine.get_execution`` from the test process, on the worker's database."""

    url = str(db) if str(db) in KEYS else "sqlite:///" + str(Path(db).resolve())
    if url in KEYS:
        os.environ["UNBROKEN_KEY"] = KEYS[url]

    async def go() -> ExecutionInfo:
        async with Engine(url) as engine:
            info = await engine.get_execution(execution_id)
        assert info is not None, f"no execution {execution_id!r} in {db}"
        return info

    try:
        return asyncio.run(go())
    finally:
        os.environ.pop("UNBROKEN_KEY", None)


def rows_by_kind(info: ExecutionInfo, kind: EntryKind) -> Counter[int]:
    """How many journal rows of ``kind`` each step id has."""
    return Counter(step.step_id for step in info.steps if step.kind is kind)


def assert_journal_complete(info: ExecutionInfo) -> None:
    """Completed; each step id has exactly one result row and each guarded one intent."""
    assert info.status == "completed", (info.status, info.error_type)
    assert rows_by_kind(info, EntryKind.RESULT) == Counter(range(len(OPS))), info.steps
    assert rows_by_kind(info, EntryKind.INTENT) == Counter(STEP_OF[op] for op in GUARDED)
    assert rows_by_kind(info, EntryKind.ERROR) == Counter()
    assert {step.generation for step in info.steps} == {0}, "no divergence restart expected"
    for step in info.steps:
        assert step.name == OPS[step.step_id], step


# -- queued work: ``python -m unbroken worker`` processes of queue_app.py on PostgreSQL ----

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.crash.queue_app:engine"
STEP_SECS = 0.01
STALE_OWNER_SECS = 2


@dataclass
class Queue:
    """A fresh schema, its URL and the environment of its workers."""

    schema: str
    url: str
    records: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """A worker process; its stderr goes to a file (a pipe nobody reads while it runs
        would fill up and block the worker's logging)."""
        log_path = self.records.parent / f"worker-{len(self.procs)}.err"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "unbroken", "worker", APP, *args],
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log_path
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        """What ``proc`` wrote to stderr so far."""
        return self.logs[proc.pid].read_text(errors="replace")

    def count(self, status: str, queue: str = "default") -> int:
        rows = admin_execute(
            f"SELECT COUNT(*) FROM {self.schema}.executions WHERE status = %s AND queue = %s",
            (status, queue),
        )
        return int(rows[0][0])

    def stop(self, proc: subprocess.Popen[bytes]) -> tuple[int, str]:
        """SIGTERM ``proc``; its exit code and stderr."""
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return proc.returncode, self.stderr(proc)


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Queue]:
    """A fresh schema; every worker started on it is killed and reaped afterwards."""
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("UNBROKEN_KEY", key)  # the test process enqueues and inspects
    records = tmp_path / "records"
    records.mkdir()
    with fresh_schema() as schema:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
        env |= {
            "UNBROKEN_DATABASE_URL": schema_url(schema),
            "UNBROKEN_KEY": key,
            "UNBROKEN_STALE_OWNER_SECS": str(STALE_OWNER_SECS),
            "UNBROKEN_WORKER_POLL_INTERVAL_SECS": "0.5",
            "UNBROKEN_QUEUE_CONCURRENCY": "limited=2",
            "QUEUE_APP_RECORDS": str(records),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        q = Queue(schema, schema_url(schema), records, env)
        try:
            yield q
        finally:
            for proc in q.procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


def enqueue(
    q: Queue,
    count: int,
    *,
    queue: str = "default",
    seconds: float = STEP_SECS,
    workflow: str = "small",
    ids: str | None = None,
) -> None:
    """Enqueue ``count`` executions of ``workflow`` (ids ``<ids or queue>-00000``...),
    running none."""

    async def never(ctx: Context, seconds: float) -> int:
        raise AssertionError("the test process never runs queued work")

    async def go() -> None:
        engine = Engine(q.url)
        engine.workflow(name=workflow)(never)
        async with engine:
            for i in range(count):
                eid = f"{ids or queue}-{i:05d}"
                await engine.enqueue(workflow, seconds, execution_id=eid, queue=queue)

    asyncio.run(go())


@dataclass
class Record:
    pid: int
    step: int
    phase: str
    at: float


def read_records(directory: Path) -> dict[str, list[Record]]:
    """Every line the workers wrote, by execution id (a torn last line is dropped)."""
    found: dict[str, list[Record]] = defaultdict(list)
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                eid, pid, step, phase, at = parts
                found[eid].append(Record(int(pid), int(step), phase, float(at)))
    return found

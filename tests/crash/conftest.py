"""Fixtures of the crash tests: the counting service, worker subprocesses, the oracle.

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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from unbroken import Engine, ExecutionInfo
from unbroken.journal import EntryKind

from ..storage.conftest import admin_execute, schema_url
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

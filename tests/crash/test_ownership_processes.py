"""Process-exclusive ownership of an execution across real processes (INV-15, SPEC §3).

A worker paused inside a slow step owns its execution: a second process that opens it gets
``ExecutionLocked`` naming the holder's pid. Once the holder is SIGKILLed the kernel drops
its lock, so the next process reclaims the orphan at once (no stale-owner wait on SQLite)
and finishes it; two processes racing for the orphan never both run it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from unbroken.ids import lock_name

from .conftest import (
    EXECUTION_ID,
    OPS,
    Baseline,
    Workers,
    assert_journal_complete,
    inspect_execution,
)
from .service import CountingService

pytestmark = pytest.mark.crash

READY_TIMEOUT_SECS = 15.0
RECLAIM_LIMIT_SECS = 5.0
"""Well under ``stale_owner_secs`` (10 s): on SQLite an orphan is reclaimed at once."""


def start_holder(workers: Workers, db: Path) -> subprocess.Popen[str]:
    """A worker that stops inside step 0's operation (before calling the service) and
    stays there, owning the execution, until it is killed."""
    marker = workers.marker("holder.marker")
    proc = workers.start(db, "--crash", "start:0", "--marker", str(marker), "--hang")
    deadline = time.monotonic() + READY_TIMEOUT_SECS
    while not marker.exists():
        if proc.poll() is not None:
            run = workers.finish(proc)
            pytest.fail(f"the holder ended before pausing: {run.describe()}")
        if time.monotonic() > deadline:
            pytest.fail("the holder did not reach its slow step in time")
        time.sleep(0.01)
    return proc


def kill_holder(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def lock_file(workers: Workers, db: Path) -> Path | None:
    """The execution's lock file on SQLite (PostgreSQL has none)."""
    if workers.backend != "sqlite":
        return None
    return Path(f"{db}.locks") / f"{lock_name(EXECUTION_ID)}.lock"


def test_INV_15_live_owner_locks_out_others_and_its_death_frees_the_execution(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    db = workers.db()
    holder = start_holder(workers, db)
    file = lock_file(workers, db)
    assert file is None or file.exists()
    try:
        second = workers.run(db)
        assert second.returncode == 1, second.describe()
        assert second.report is not None, second.describe()
        assert second.report["error"] == "ExecutionLocked"
        assert second.report["holder_pid"] == holder.pid
        assert f"pid {holder.pid}" in second.report["message"]
        assert second.report["ops"] == 0
        assert service.counts() == {}  # nobody ran anything: the holder is paused
        assert inspect_execution(db).status == "running"
    finally:
        kill_holder(holder)
    assert file is None or file.exists()  # a dead owner's file stays, its lock dropped

    recovered = workers.run(db)
    assert recovered.returncode == 0, recovered.describe()
    assert recovered.report is not None
    assert recovered.report["result"] == baseline.result
    assert recovered.report["elapsed"] < RECLAIM_LIMIT_SECS  # reclaimed at once
    assert recovered.report["ops"] == len(OPS)
    assert service.counts() == dict.fromkeys(OPS, 1)
    assert_journal_complete(inspect_execution(db))
    assert file is None or not file.exists()  # completed: its lock file went with it


@pytest.mark.parametrize("op_delay", ["0", "0.05"])
def test_INV_15_two_processes_recovering_one_orphan_run_it_once(
    op_delay: str, workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """Both start at once after the crash: exactly one runs the execution; the other is
    refused with ExecutionLocked or attaches to the completed output; the service saw
    every operation exactly once."""
    db = workers.db()
    kill_holder(start_holder(workers, db))

    procs = [workers.start(db, "--op-delay", op_delay) for _ in range(2)]
    runs = [workers.finish(proc) for proc in procs]

    for run in runs:
        assert run.report is not None, run.describe()
        if run.returncode == 0:
            assert run.report["result"] == baseline.result
        else:
            assert run.returncode == 1, run.describe()
            assert run.report["error"] == "ExecutionLocked", run.describe()
            assert run.report["holder_pid"] in {proc.pid for proc in procs}
    drivers = [run for run in runs if run.report is not None and run.report["ops"]]
    assert len(drivers) == 1, [run.report for run in runs]
    assert drivers[0].returncode == 0
    assert drivers[0].report is not None and drivers[0].report["ops"] == len(OPS)
    assert service.counts() == dict.fromkeys(OPS, 1)
    assert_journal_complete(inspect_execution(db))
    file = lock_file(workers, db)
    assert file is None or not file.exists()  # whoever held it last saw it completed

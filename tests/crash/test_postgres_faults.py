"""PostgreSQL faults under real worker processes: a server restart mid-run, and a worker
paused (SIGSTOP) past its lease (SPEC §9 "Faults", INV-15 fencing).

Workers run ``tests.crash.queue_app:engine`` as in ``test_workers.py``; its step records
say which process started and ended which step when. The restart test needs to restart
the local server (``pg_ctlcluster``, as root) and is skipped where it cannot.

In the first pause test the resumed worker's lock heartbeat usually notices the lapsed
lease before its steps write, so it checks the whole (heartbeat and fence) and cannot tell
one from the other; the second takes the heartbeat away and holds the step until the
worker resumes, so the write-time fence alone must refuse the late result. The storage
tests in ``tests/storage/test_postgres_fencing.py`` take away each other protection.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from unbroken import Context, Engine

from ..storage.conftest import POSTGRES_URL, admin_execute
from .conftest import STALE_OWNER_SECS, Queue, enqueue, read_records

pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(not POSTGRES_URL, reason="UNBROKEN_TEST_POSTGRES_URL is not set"),
]

DRAIN_LIMIT_SECS = 60.0


def _cluster() -> tuple[str, str] | None:
    """The (version, name) of the local cluster this test may restart, if any."""
    host = urlsplit(POSTGRES_URL).hostname or ""
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None:
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return (versions[-1], "main") if versions else None


def _count(q: Queue, status: str, workflow: str) -> int | None:
    """Executions of ``workflow`` in ``status``; ``None`` while the server is away."""
    try:
        rows = admin_execute(
            f"SELECT COUNT(*) FROM {q.schema}.executions WHERE status = %s AND workflow = %s",
            (status, workflow),
        )
    except psycopg.OperationalError:
        return None
    return int(rows[0][0])


def _wait_for(q: Queue, workflow: str, done: int, workers: list[subprocess.Popen[bytes]]) -> None:
    _wait_until(
        f"fewer than {done} executions completed",
        lambda: (_count(q, "completed", workflow) or 0) >= done,
        q,
        workers,
    )


def _log_lines(err: str) -> list[str]:
    """The last log lines of a worker's stderr, without traceback bodies."""
    lines = [line for line in err.splitlines() if line[:1].isupper() and "Traceback" not in line]
    return lines[-25:]


def _outputs(q: Queue, count: int) -> dict[str, list[int]]:
    """The journaled output of every ``traced`` execution (read, not re-run)."""
    return _journaled(q, "traced", [f"traced-{i:05d}" for i in range(count)])


def _journaled(q: Queue, workflow: str, execution_ids: list[str]) -> dict[str, Any]:
    """The journaled outputs of completed executions of ``workflow`` (read, not re-run)."""

    async def never(ctx: Context, *inputs: Any) -> Any:
        raise AssertionError("a completed execution is never run again")

    async def go() -> dict[str, Any]:
        engine = Engine(q.url)
        engine.workflow(name=workflow)(never)
        async with engine:
            return {eid: await engine.run(workflow, execution_id=eid) for eid in execution_ids}

    return asyncio.run(go())


@pytest.mark.skipif(_cluster() is None, reason="needs root and a local pg_ctlcluster")
def test_a_server_restart_mid_run_loses_no_committed_step(queue: Queue) -> None:
    total = 600
    enqueue(queue, total, seconds=0.1)  # ~6 s of work: the restart lands well inside it
    workers = [queue.start("--concurrency", "16") for _ in range(2)]
    _wait_for(queue, "small", total // 4, workers)
    committed = admin_execute(
        f"SELECT execution_id, name FROM {queue.schema}.journal WHERE kind = 'result'"
    )
    snapshot_at = time.time()
    cluster = _cluster()
    assert cluster is not None
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    ready = time.monotonic() + 30
    while _count(queue, "completed", "small") is None:  # accepting connections again
        assert time.monotonic() < ready, "the server did not come back"
        time.sleep(0.1)
    assert (_count(queue, "completed", "small") or 0) < total, "the restart came too late"
    _wait_for(queue, "small", total, workers)
    for proc in workers:
        code, err = queue.stop(proc)
        assert code == 0, err

    records = read_records(queue.records)
    assert len(records) == total
    for eid, rows in records.items():
        assert {r.step for r in rows if r.phase == "end"} == {0, 1, 2}, f"{eid} lost a step"
    # No step whose result was committed before the restart ran again afterwards.
    assert committed
    for eid, name in committed:
        step = int(name.removeprefix("work"))
        again = [r for r in records[eid] if r.step == step and r.phase == "start"]
        assert all(r.at <= snapshot_at for r in again), f"{eid} re-ran committed {name}"
    # The restart cut work short: some step started before it ran again after it.
    rerun = [
        eid
        for eid, rows in records.items()
        if any(
            sum(1 for r in rows if r.step == s and r.phase == "start") > 1 for s in range(3)
        )
    ]
    assert rerun, "the restart interrupted nothing"


def test_a_worker_paused_past_its_lease_commits_nothing_after_it_resumes(
    queue: Queue,
) -> None:
    total, seconds = 48, 0.4
    enqueue(queue, total, seconds=seconds, workflow="traced", ids="traced")
    paused = queue.start("--concurrency", "16")
    records_of_paused = queue.records / f"{paused.pid}.log"
    deadline = time.monotonic() + 60
    while not records_of_paused.exists() or "start" not in records_of_paused.read_text():
        assert paused.poll() is None, queue.stderr(paused)
        assert time.monotonic() < deadline, "the first worker never started a step"
        time.sleep(0.02)
    paused.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        time.sleep(0.2)
        inflight = {
            eid
            for eid, rows in read_records(queue.records).items()
            if any(r.phase == "start" for r in rows) and len(rows) < 6
        }
        assert inflight, "the paused worker had nothing in flight"
        other = queue.start("--concurrency", "16")
        # Resume the paused worker as soon as the other one runs a step of an execution it
        # had in flight: only fencing keeps its late results from committing first.
        deadline = time.monotonic() + 60
        while not any(
            r.pid == other.pid and r.at > stopped_at
            for eid, rows in read_records(queue.records).items()
            if eid in inflight
            for r in rows
        ):
            assert other.poll() is None, queue.stderr(other)
            assert time.monotonic() < deadline, (
                "the other worker never took over",
                admin_execute(
                    "SELECT state, wait_event, left(query, 60) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    (f"unbroken pid {paused.pid}",),
                ),
                _log_lines(queue.stderr(other)),
            )
            time.sleep(0.02)
        assert time.time() - stopped_at > STALE_OWNER_SECS  # not before the lease lapsed
    finally:
        continued_at = time.time()  # before the signal: anything it ends later, it ended resumed
        paused.send_signal(signal.SIGCONT)
    _wait_for(queue, "traced", total, [paused, other])
    time.sleep(1.0)  # anything the paused worker still tries lands now
    for proc in (paused, other):
        code, err = queue.stop(proc)
        assert code == 0, err

    records = read_records(queue.records)
    # Steps the paused worker started before the pause and ended after it resumed (once
    # resumed it may also claim new work legitimately, under a new lock session).
    late = [
        (eid, r.step)
        for eid, rows in records.items()
        for r in rows
        if r.pid == paused.pid
        and r.phase == "end"
        and r.at >= continued_at
        and any(
            s.pid == paused.pid and s.step == r.step and s.phase == "start" and s.at < stopped_at
            for s in rows
        )
    ]
    assert late, "the paused worker computed nothing after it resumed"
    outputs = _outputs(queue, total)
    for eid, step in late:
        assert outputs[eid][step] != paused.pid, f"{eid} step {step}: a fenced result committed"
    # Of the executions it had in flight, whatever it committed it computed before the pause.
    for eid in inflight:
        for step, pid in enumerate(outputs[eid]):
            if pid == paused.pid:
                ends = [r.at for r in records[eid] if r.pid == pid and r.step == step]
                assert ends and min(ends) < stopped_at, f"{eid} step {step}"
    results = admin_execute(
        f"SELECT execution_id, name, COUNT(*) FROM {queue.schema}.journal "
        "WHERE kind = 'result' GROUP BY execution_id, name"
    )
    counts = {(eid, name): n for eid, name, n in results}
    expected = {(eid, f"work{step}") for eid in outputs for step in range(3)}
    missing = sorted(expected - set(counts))
    assert not missing, missing  # every result journaled
    assert set(counts.values()) == {1}  # and none twice


def _wait_until(
    what: str, done: Callable[[], bool], q: Queue, workers: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + DRAIN_LIMIT_SECS
    while not done():
        for proc in workers:
            assert proc.poll() is None, q.stderr(proc)
        if time.monotonic() > deadline:
            raise AssertionError(what, [_log_lines(q.stderr(proc)) for proc in workers])
        time.sleep(0.02)


def test_a_resumed_owner_whose_step_ends_before_anything_noticed_the_lapse_commits_nothing(
    queue: Queue, tmp_path: Path
) -> None:
    """The race the heartbeat usually wins, made certain: the paused worker runs without
    a lock heartbeat, and its step is held until the test opens its gate, so after SIGCONT
    the first use of its (lapsed) lock session is the write of that step's result. Only
    the write-time fence can refuse it; the new owner's result is the one journaled."""
    gates = tmp_path / "gates"
    gates.mkdir()
    queue.env |= {"QUEUE_APP_GATES": str(gates), "QUEUE_APP_NO_LOCK_HEARTBEAT": "1"}

    async def never(ctx: Context) -> int:
        raise AssertionError("the test process never runs queued work")

    async def go() -> None:
        engine = Engine(queue.url)
        engine.workflow(name="gated")(never)
        async with engine:
            await engine.enqueue("gated", execution_id="gated-1")

    asyncio.run(go())

    def started_by(proc: subprocess.Popen[bytes]) -> bool:
        rows = read_records(queue.records).get("gated-1", [])
        return any(r.pid == proc.pid and r.phase == "start" for r in rows)

    paused = queue.start("--concurrency", "1")  # full while it runs the one execution
    _wait_until(
        "the first worker never started the step", lambda: started_by(paused), queue, [paused]
    )
    paused.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        other = queue.start("--concurrency", "1")
        _wait_until(  # only once the paused worker's lease lapsed
            "the other worker never took over", lambda: started_by(other), queue, [other]
        )
        assert time.time() - stopped_at > STALE_OWNER_SECS
        (gates / str(paused.pid)).touch()
    finally:
        paused.send_signal(signal.SIGCONT)
    # Its step ends at once and its result goes to the lapsed lock session; the loss is
    # reported after that write, so once it is logged the write was refused or committed.
    _wait_until(
        "the paused worker never wrote after it resumed",
        lambda: "ownership of 1 execution(s) is lost" in queue.stderr(paused),
        queue,
        [paused, other],
    )
    ended = [
        r
        for r in read_records(queue.records)["gated-1"]
        if r.pid == paused.pid and r.phase == "end"
    ]
    assert ended, "the paused worker computed nothing after it resumed"
    (gates / str(other.pid)).touch()
    _wait_for(queue, "gated", 1, [paused, other])
    for proc in (paused, other):
        code, err = queue.stop(proc)
        assert code == 0, err

    late = _journaled(queue, "gated", ["gated-1"])["gated-1"]
    assert late == other.pid, "the paused worker's late result committed"
    results = admin_execute(f"SELECT COUNT(*) FROM {queue.schema}.journal WHERE kind = 'result'")
    assert results == [(1,)]

"""Queued work across real worker processes on PostgreSQL (SPEC §4, INV-15).

``python -m unbroken worker tests.crash.queue_app:engine`` processes drain a queue; every
step operation appends ``start``/``end`` lines (execution, pid, step, time) to a per-process
file, and the oracle checks from them that no execution was ever run by two processes at
once, that none was lost, and that only the executions a SIGKILLed worker had in flight
ran any step twice. Skipped without ``UNBROKEN_TEST_POSTGRES_URL``.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from pathlib import Path

import pytest

from ..storage.conftest import POSTGRES_URL, admin_execute
from .conftest import STALE_OWNER_SECS, Queue, Record, enqueue, read_records

pytestmark = [
    pytest.mark.crash,
    pytest.mark.skipif(not POSTGRES_URL, reason="UNBROKEN_TEST_POSTGRES_URL is not set"),
]

EXECUTIONS = 2000
WORKERS = 4
CONCURRENCY = 16
DRAIN_LIMIT_SECS = 120.0
RECLAIM_LIMIT_SECS = STALE_OWNER_SECS + 8.0
"""A dead worker's executions end this soon after the kill: its locks lapse with its
session at once, the survivors claim them (oldest first) at their next free slot."""


def spans(
    records: list[Record], killed: int | None, kill_at: float
) -> dict[int, tuple[float, float]]:
    """Per pid, from its first step start to its last step end for one execution; a step
    the killed worker started and never ended lasts until the kill."""
    out: dict[int, tuple[float, float]] = {}
    for r in records:
        end = r.at
        if r.phase == "start" and r.pid == killed:
            end = kill_at if not _ended(records, r) else r.at
        lo, hi = out.get(r.pid, (r.at, end))
        out[r.pid] = (min(lo, r.at), max(hi, end))
    return out


def _ended(records: list[Record], start: Record) -> bool:
    return any(
        r.pid == start.pid and r.step == start.step and r.phase == "end" and r.at >= start.at
        for r in records
    )


def assert_never_two_at_once(
    records: dict[str, list[Record]], killed: int | None, kill_at: float
) -> None:
    for eid, rows in records.items():
        ordered = sorted(spans(rows, killed, kill_at).items(), key=lambda item: item[1])
        for (pid_a, (_, end_a)), (pid_b, (start_b, _)) in itertools.pairwise(ordered):
            assert end_a <= start_b, f"{eid} ran in pids {pid_a} and {pid_b} at once"


def _running_steps(log: Path) -> bool:
    """Whether a worker's record file shows a step it started and has not ended yet."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return False
    open_steps: set[tuple[str, str]] = set()
    for line in lines:
        fields = line.split()
        if len(fields) != 5:
            continue  # a line being written
        eid, _, step, phase, _ = fields
        (open_steps.add if phase == "start" else open_steps.discard)((eid, step))
    return bool(open_steps)


def test_the_oracle_sees_two_processes_running_one_execution_at_once() -> None:
    rows = [Record(1, 0, "start", 1.0), Record(1, 0, "end", 2.0), Record(2, 1, "start", 1.5)]
    rows.append(Record(2, 1, "end", 3.0))
    with pytest.raises(AssertionError, match="at once"):
        assert_never_two_at_once({"x": rows}, None, 0.0)
    dangling = [Record(1, 0, "start", 1.0), Record(2, 0, "start", 4.0), Record(2, 0, "end", 5.0)]
    assert_never_two_at_once({"x": dangling}, killed=1, kill_at=3.0)  # killed at 3, taken at 4
    with pytest.raises(AssertionError, match="at once"):
        assert_never_two_at_once({"x": dangling}, killed=1, kill_at=4.5)


def test_four_workers_drain_2000_executions_and_finish_a_killed_ones_work(queue: Queue) -> None:
    enqueue(queue, EXECUTIONS)
    start = time.monotonic()
    workers = [queue.start("--concurrency", str(CONCURRENCY)) for _ in range(WORKERS)]
    victim = workers[0]
    victim_log = queue.records / f"{victim.pid}.log"
    # A quarter drained, and the victim running steps (a worker slow to start on a loaded
    # machine could otherwise be killed with nothing in flight).
    while queue.count("completed") < EXECUTIONS // 4 or not _running_steps(victim_log):
        assert victim.poll() is None, queue.stderr(victim)
        assert time.monotonic() - start < DRAIN_LIMIT_SECS, "the workers made no progress"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    kill_at = time.time()
    assert victim.wait(10) == -signal.SIGKILL
    while (done := queue.count("completed")) < EXECUTIONS:
        assert time.monotonic() - start < DRAIN_LIMIT_SECS, f"only {done} of {EXECUTIONS} done"
        time.sleep(0.1)
    elapsed = time.monotonic() - start
    print(
        f"\n{WORKERS} workers drained {EXECUTIONS} executions in {elapsed:.1f} s "
        f"({EXECUTIONS / elapsed:.0f}/s, one SIGKILLed at 25%)"
    )
    for proc in workers[1:]:
        code, err = queue.stop(proc)
        assert code == 0, err
    assert queue.count("running") == 0

    records = read_records(queue.records)
    assert len(records) == EXECUTIONS  # every execution ran its steps somewhere
    assert_never_two_at_once(records, victim.pid, kill_at)
    orphans = {eid for eid, rows in records.items() if any(r.pid == victim.pid for r in rows)}
    for eid, rows in records.items():
        ended = {r.step for r in rows if r.phase == "end"}
        assert ended == {0, 1, 2}, f"{eid} lost a step"
        starts = [r.step for r in rows if r.phase == "start"]
        if eid not in orphans:
            assert sorted(starts) == [0, 1, 2], f"{eid} ran a step twice"
    finalized = dict(
        admin_execute(f"SELECT execution_id, finalized_at FROM {queue.schema}.executions")
    )
    reclaimed = [eid for eid in orphans if finalized[eid] / 1000 > kill_at]
    assert reclaimed, "the killed worker had nothing in flight"
    late = max(finalized[eid] / 1000 for eid in reclaimed) - kill_at
    assert late < RECLAIM_LIMIT_SECS, f"a dead worker's execution ended {late:.1f} s after the kill"


def test_a_queue_limit_of_two_holds_across_three_workers(queue: Queue) -> None:
    count = 24
    enqueue(queue, count, queue="limited", seconds=0.05)
    owned_query = (
        f"SELECT COUNT(*) FROM {queue.schema}.executions WHERE queue = 'limited' "
        "AND status = 'running' AND lock_key IN (SELECT (l.classid::bigint << 32) "
        "| l.objid::bigint FROM pg_locks l WHERE l.locktype = 'advisory' AND l.objsubid = 1 "
        "AND l.granted)"
    )
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            samples.append(int(admin_execute(owned_query)[0][0]))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # One execution per worker: reaching the limit of 2 takes two workers, so the limit
        # is enforced across workers, not inside one.
        workers = [queue.start("--queue", "limited", "--concurrency", "1") for _ in range(3)]
        deadline = time.monotonic() + 60
        while queue.count("completed", "limited") < count:
            assert time.monotonic() < deadline, "the limited queue did not drain"
            time.sleep(0.05)
    finally:
        sampling.set()
        sampler.join()
    for proc in workers:
        code, err = queue.stop(proc)
        assert code == 0, err
    assert max(samples) == 2, samples  # reached, never exceeded (sampled)
    records = read_records(queue.records)
    assert len(records) == count
    assert_never_two_at_once(records, None, 0.0)
    # From the records, exactly: never more than two executions inside their steps at once.
    events = sorted(
        (at, +1 if first else -1)
        for rows in records.values()
        for first, at in ((True, min(r.at for r in rows)), (False, max(r.at for r in rows)))
    )
    running = most = 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    assert most <= 2
    assert len({r.pid for rows in records.values() for r in rows}) >= 2  # shared out

"""Commits on the event loop's thread for local storage (SQLite): ``try_write``, the
writer's inline path and its fallback to the writer thread, with INV-4's ordering, the ack
timeout (INV-12, FR-DE-11) and close semantics kept."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from unbroken.errors import JournalUnavailable, StorageError, UnknownExecution
from unbroken.journal import EntryKind, ExecutionStatus, JournalEntry
from unbroken.storage.base import LocalWrites, Storage
from unbroken.storage.memory import MemoryStorage
from unbroken.storage.sqlite import SqliteStorage
from unbroken.writer import JournalWriter


def _entry(step: int, kind: EntryKind = EntryKind.RESULT, eid: str = "e") -> JournalEntry:
    return JournalEntry(eid, 0, step, kind, f"s{step}", "idempotent", bytes(32), b"1", 0)


def _sign(execution_id: str, count: int) -> bytes:
    return f"{execution_id}:{count}".encode()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "j.db"


@pytest.fixture
def storage(db: Path) -> Iterator[SqliteStorage]:
    s = SqliteStorage(db)
    s.open()
    s.create_execution("e", "wf", b"", 0)
    yield s
    s.close()


@pytest.fixture
async def writer(storage: SqliteStorage) -> AsyncIterator[JournalWriter]:
    w = JournalWriter(storage, flush_interval_ms=60_000, ack_timeout_ms=30_000)
    w.start()
    await w.flush()  # the thread has read MAX(seq): inline commits may start
    yield w
    await asyncio.get_running_loop().run_in_executor(None, w.close)


@contextmanager
def write_lock_held(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection (as another process would) holds the database's write lock."""
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield other
        finally:
            other.execute("ROLLBACK")


def _journal(db: Path) -> list[tuple[int, int, str]]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT seq, step_id, kind FROM journal ORDER BY seq").fetchall()
    return [(int(seq), int(step), str(kind)) for seq, step, kind in rows]


def _steps(db: Path) -> list[int]:
    return [step for _, step, _ in _journal(db)]


# -- the storage's no-wait write --------------------------------------------------------


def test_sqlite_offers_local_writes_and_memory_keeps_the_writer_thread(
    storage: SqliteStorage,
) -> None:
    assert isinstance(storage, LocalWrites)
    assert JournalWriter(storage).commits_inline
    assert not isinstance(MemoryStorage(), LocalWrites)
    assert not JournalWriter(MemoryStorage()).commits_inline


def test_try_write_runs_the_write_when_the_lock_is_free(storage: SqliteStorage) -> None:
    done, seq = storage.try_write(lambda s: s.append([_entry(0)]))
    assert done and seq == 1
    assert storage.read_segment("e", 0, 0, 10)[0].step_id == 0


def test_try_write_commits_through_a_connection_prepared_on_another_thread(
    storage: SqliteStorage,
) -> None:
    worker = threading.Thread(target=storage.prepare_writes)  # as the writer thread does
    worker.start()
    worker.join()
    storage.prepare_writes()  # again: a no-op
    done, seq = storage.try_write(lambda s: s.append([_entry(0)]))
    assert done and seq == 1
    storage.close()
    storage.prepare_writes()  # closed: nothing to open, and nothing raised
    with pytest.raises(StorageError, match="not open"):
        storage.try_write(lambda s: s.append([_entry(1)]))


def test_try_write_declines_at_once_when_another_connection_writes(
    storage: SqliteStorage, db: Path
) -> None:
    ran: list[str] = []

    def write(s: Storage) -> int:
        ran.append("before")
        return s.append([_entry(0)])

    with write_lock_held(db):
        assert storage.try_write(write) == (False, None)  # no 5 s busy wait: declined
    assert ran == []  # nothing of it ran
    assert _journal(db) == []
    assert storage.try_write(write) == (True, 1)
    assert ran == ["before"]


def test_try_write_is_one_transaction_whose_later_writes_fail_alone(
    storage: SqliteStorage, db: Path
) -> None:
    def writes(s: SqliteStorage) -> list[int]:
        s.append([_entry(0)])
        with pytest.raises(StorageError, match="already exists"):
            s.append([_entry(1), _entry(0)])  # a savepoint: undone alone
        s.append([_entry(2)])
        return [e.step_id for e in s.read_segment("e", 0, 0, 10)]  # sees its own writes

    assert storage.try_write(writes) == (True, [0, 2])
    assert _steps(db) == [0, 2]

    def fails(s: SqliteStorage) -> None:
        s.append([_entry(3)])
        raise RuntimeError("the caller's own error")

    with pytest.raises(RuntimeError, match="own error"):
        storage.try_write(fails)
    assert _steps(db) == [0, 2]  # all of it rolled back


def test_try_write_passes_on_the_write_s_own_errors(storage: SqliteStorage) -> None:
    storage.append([_entry(0)])
    with pytest.raises(StorageError, match="already exists"):
        storage.try_write(lambda s: s.append([_entry(0)]))
    assert storage.try_write(lambda s: s.append([_entry(1)])) == (True, 2)


def test_append_signs_the_high_water_mark_in_one_statement(storage: SqliteStorage) -> None:
    storage.create_execution("f", "wf", b"", 0)
    storage.append([_entry(0), _entry(0, eid="f"), _entry(1, EntryKind.INTENT)], _sign)
    storage.append([_entry(1), _entry(2)], _sign)
    assert storage.read_integrity("e") == (3, b"e:3")
    assert storage.read_integrity("f") == (1, b"f:1")
    assert storage.count_outcomes("e") == 3


def test_batches_of_any_size_keep_their_order_and_return_the_last_seq(
    storage: SqliteStorage, db: Path
) -> None:
    step, last = 0, 0
    for size in (1, 2, 3, 63, 64, 65, 100, 127, 128, 129, 300):
        batch = [_entry(step + i) for i in range(size)]
        step += size
        seq = storage.append(batch)
        assert seq == last + size
        last = seq
    assert _journal(db) == [(i + 1, i, "result") for i in range(step)]


def test_a_bad_row_anywhere_in_a_batch_inserts_none_of_it(storage: SqliteStorage) -> None:
    storage.append([_entry(0)])
    with pytest.raises(StorageError, match="already exists"):
        storage.append([_entry(i) for i in range(1, 70)] + [_entry(0)])
    assert [e.step_id for e in storage.read_segment("e", 0, 0, 100)] == [0]


def test_a_signer_that_fails_rolls_the_append_back(storage: SqliteStorage) -> None:
    storage.append([_entry(0)], _sign)

    def broken(execution_id: str, count: int) -> bytes:
        raise RuntimeError("no key")

    with pytest.raises(StorageError):
        storage.append([_entry(1)], broken)
    assert [e.step_id for e in storage.read_segment("e", 0, 0, 10)] == [0]
    assert storage.read_integrity("e") == (1, b"e:1")


# -- the writer's inline path -------------------------------------------------------------


async def test_an_acked_append_commits_inline_with_what_was_buffered_inv4(
    writer: JournalWriter, db: Path
) -> None:
    writer.append_buffered(_entry(0))
    writer.append_buffered(_entry(1))
    before = writer.stats.commits
    seq = await writer.append_acked(_entry(2, EntryKind.INTENT))
    # committed when the call returns, in one transaction with the buffered prefix
    assert _journal(db) == [(1, 0, "result"), (2, 1, "result"), (3, 2, "intent")]
    assert seq == 3
    assert writer.stats.commits == before + 1
    assert writer.stats.inline_commits >= 1 and writer.stats.handed_over == 0


async def test_a_due_group_commit_runs_on_the_loop(storage: SqliteStorage, db: Path) -> None:
    w = JournalWriter(storage, flush_interval_ms=1)
    w.start()
    await w.flush()
    w.append_buffered(_entry(0))
    w.append_buffered(_entry(1))
    for _ in range(500):
        if _steps(db) == [0, 1]:
            break
        await asyncio.sleep(0.01)
    assert _steps(db) == [0, 1]
    assert w.stats.inline_commits >= 1 and w.stats.handed_over == 0
    await asyncio.get_running_loop().run_in_executor(None, w.close)


async def test_a_full_batch_commits_at_once(storage: SqliteStorage, db: Path) -> None:
    w = JournalWriter(storage, flush_interval_ms=60_000, max_batch=3)
    w.start()
    await w.flush()
    for i in range(3):
        w.append_buffered(_entry(i))
    assert _steps(db) == [0, 1, 2]  # the third append committed the batch
    await asyncio.get_running_loop().run_in_executor(None, w.close)


async def test_calls_run_inline_after_the_buffered_entries(
    writer: JournalWriter, db: Path
) -> None:
    writer.append_buffered(_entry(0))
    found = await writer.call(lambda s: [e.step_id for e in s.read_segment("e", 0, 0, 10)])
    assert found == [0]
    assert writer.stats.handed_over == 0


async def test_a_failed_call_leaves_what_was_buffered_committed(
    writer: JournalWriter, db: Path
) -> None:
    writer.append_buffered(_entry(0))
    with pytest.raises(UnknownExecution):
        await writer.call(lambda s: s.reopen_execution("nobody", 0))
    assert _steps(db) == [0]
    assert writer.stats.handed_over == 0  # it ran inline, in one transaction with the entry
    assert await writer.call(lambda s: s.finalize_execution("e", ExecutionStatus.FAILED, 1))
    assert (await writer.call(lambda s: s.get_execution("e"))).status == "failed"


async def test_a_busy_database_hands_the_work_to_the_writer_thread_in_order_inv4(
    writer: JournalWriter, db: Path
) -> None:
    writer.append_buffered(_entry(0))
    with write_lock_held(db):
        first = asyncio.ensure_future(writer.append_acked(_entry(1, EntryKind.INTENT)))
        await asyncio.sleep(0.05)
        assert not first.done()  # the thread waits for the lock; the loop does not
        writer.append_buffered(_entry(2))
        second = asyncio.ensure_future(writer.append_acked(_entry(3, EntryKind.INTENT)))
        await asyncio.sleep(0)
        assert _journal(db) == []
    await asyncio.gather(first, second)
    assert _steps(db) == [0, 1, 2, 3]  # the order the loop appended in, across both paths
    assert writer.stats.handed_over == 2
    inline = writer.stats.inline_commits
    await writer.append_acked(_entry(4, EntryKind.INTENT))  # idle again: inline
    assert writer.stats.inline_commits == inline + 1
    assert _steps(db) == [0, 1, 2, 3, 4]


async def test_an_ack_the_busy_database_does_not_confirm_in_time_times_out_fr_de_11(
    storage: SqliteStorage, db: Path
) -> None:
    w = JournalWriter(storage, ack_timeout_ms=100)
    w.start()
    await w.flush()
    with write_lock_held(db), pytest.raises(JournalUnavailable, match="100 ms"):
        await w.append_acked(_entry(0, EntryKind.INTENT))
    await asyncio.get_running_loop().run_in_executor(None, w.close)


async def test_close_commits_what_is_buffered_and_refuses_acks_inv12(
    writer: JournalWriter, db: Path
) -> None:
    writer.append_buffered(_entry(0))
    await asyncio.get_running_loop().run_in_executor(None, writer.close)
    assert _steps(db) == [0]
    with pytest.raises(JournalUnavailable):
        await writer.append_acked(_entry(1, EntryKind.INTENT))
    writer.append_buffered(_entry(2))  # dropped with a warning, never raises
    assert writer.stats.dropped == 1


async def test_a_bad_entry_committed_inline_is_set_apart_by_the_thread(
    writer: JournalWriter, db: Path
) -> None:
    await writer.append_acked(_entry(0))
    writer.append_buffered(_entry(1))
    with pytest.raises(StorageError):
        await writer.append_acked(_entry(0))  # a second result for step 0
    assert _steps(db) == [0, 1]  # the buffered entry before it still committed


async def test_the_thread_checkpoints_the_log_of_inline_commits(
    writer: JournalWriter, storage: SqliteStorage, db: Path
) -> None:
    commits = storage.checkpoint_pages // 4  # each writes a few pages: past the threshold
    for i in range(commits):
        await writer.append_acked(_entry(i))
    for _ in range(500):
        if writer.stats.checkpoints:
            break
        await asyncio.sleep(0.01)
    assert writer.stats.checkpoints >= 1
    assert len(_steps(db)) == commits


async def test_the_log_stays_short_while_inline_commits_keep_coming(
    writer: JournalWriter, storage: SqliteStorage, db: Path
) -> None:
    # A checkpoint that commits can slip past is never complete, so the log never starts
    # over: it grows by every commit's pages for as long as the process runs.
    for i in range(8000):
        await writer.append_acked(_entry(i))
    for _ in range(500):
        if writer.stats.checkpoints >= 3:
            break
        await asyncio.sleep(0.01)
    assert writer.stats.checkpoints >= 3
    with closing(sqlite3.connect(db)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    log_bytes = db.with_name(db.name + "-wal").stat().st_size
    assert log_bytes < 3 * storage.checkpoint_pages * page_size  # it grew past 100 MB
    assert len(_steps(db)) == 8000


# -- concurrent acknowledgements: one group commit ---------------------------------------


async def test_concurrent_acked_appends_share_a_transaction(
    writer: JournalWriter, db: Path
) -> None:
    writer.append_buffered(_entry(0))
    before = writer.stats.inline_commits
    seqs = await asyncio.gather(
        *(writer.append_acked(_entry(i, EntryKind.INTENT)) for i in range(1, 101))
    )
    assert _steps(db) == list(range(101))  # every one, in the order they were appended
    assert all(seq >= step for seq, step in zip(seqs, range(2, 102), strict=True))
    assert writer.stats.inline_commits - before <= 3  # not one commit per task
    assert writer.stats.handed_over == 0


async def test_one_failure_in_a_group_is_set_apart(writer: JournalWriter, db: Path) -> None:
    await writer.append_acked(_entry(0))

    async def create(n: int) -> object:
        return await writer.call(lambda s: s.create_execution(f"x{n}", "wf", b"", 0))

    outcomes = await asyncio.gather(
        writer.append_acked(_entry(1)),
        writer.append_acked(_entry(0)),  # a second result for step 0: refused alone
        writer.call(lambda s: s.reopen_execution("nobody", 0)),  # fails alone
        *(create(n) for n in range(5)),
        writer.append_acked(_entry(2)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], StorageError)
    assert isinstance(outcomes[2], UnknownExecution)
    assert not any(isinstance(o, BaseException) for o in outcomes[:1] + outcomes[3:])
    assert _steps(db) == [0, 1, 2]
    for n in range(5):
        assert await writer.call(lambda s, n=n: s.get_execution(f"x{n}")) is not None


async def test_a_group_the_busy_database_refuses_goes_to_the_thread_in_order(
    writer: JournalWriter, db: Path
) -> None:
    with write_lock_held(db):
        acks = asyncio.gather(
            *(writer.append_acked(_entry(i, EntryKind.INTENT)) for i in range(20))
        )
        await asyncio.sleep(0.05)
        assert _journal(db) == []
    await acks
    assert _steps(db) == list(range(20))


async def test_interleaved_work_on_both_paths_keeps_every_task_s_order_inv4(
    writer: JournalWriter, db: Path
) -> None:
    """Tasks append buffered and acknowledged entries while another connection now and
    then holds the write lock: each acknowledgement returns only once it and everything
    its task appended before it are committed, on whichever path it took."""
    rng = random.Random(7)
    storage_steps = iter(range(100_000))
    committed_at_ack: list[bool] = []

    async def task(eid: str) -> list[int]:
        mine: list[int] = []
        for _ in range(30):
            step = next(storage_steps)
            mine.append(step)
            if rng.random() < 0.6:
                writer.append_buffered(_entry(step, eid=eid))
            else:
                await writer.append_acked(_entry(step, EntryKind.INTENT, eid=eid))
                rows = {s for _, s, _ in _journal(db)}
                committed_at_ack.append(set(mine) <= rows)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        return mine

    async def contend() -> None:
        for _ in range(10):
            await asyncio.sleep(rng.random() / 200)
            with write_lock_held(db):
                await asyncio.sleep(rng.random() / 200)

    for n in range(4):
        await writer.call(lambda s, n=n: s.create_execution(f"t{n}", "wf", b"", 0))
    *orders, _ = await asyncio.gather(*(task(f"t{n}") for n in range(4)), contend())
    await writer.flush()
    journal = _journal(db)
    position = {step: i for i, (_, step, _) in enumerate(journal)}
    assert sorted(position) == sorted(s for order in orders for s in order)
    for order in orders:
        assert [position[s] for s in order] == sorted(position[s] for s in order)
    assert committed_at_ack and all(committed_at_ack)

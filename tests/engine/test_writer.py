"""The journal writer: group commit, INV-4, ack timeout (INV-12, FR-DE-11), FR-DE-12."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from unbroken.errors import JournalUnavailable, StorageError
from unbroken.group_commit import GroupCommit, Request, WriterStats
from unbroken.journal import EntryKind, JournalEntry
from unbroken.storage import Signer
from unbroken.storage.memory import MemoryStorage
from unbroken.storage.sqlite import SqliteStorage
from unbroken.writer import JournalWriter


def _entry(step: int, kind: EntryKind = EntryKind.RESULT, eid: str = "e") -> JournalEntry:
    return JournalEntry(eid, 0, step, kind, f"s{step}", "idempotent", bytes(32), b"1", 0)


class RecordingStorage(MemoryStorage):
    """Memory storage that records each append call (one call = one transaction)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[tuple[int, str]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        self.gate.wait()
        self.calls.append([(e.step_id, e.kind.value) for e in entries])
        return super().append(entries, signer)


@pytest.fixture
def storage() -> Iterator[RecordingStorage]:
    s = RecordingStorage()
    s.open()
    s.create_execution("e", "wf", b"", 0)
    yield s
    s.close()


def _writer(storage: RecordingStorage, **kw: int) -> JournalWriter:
    w = JournalWriter(storage, **kw)
    w.start()
    return w


async def test_buffered_entries_are_group_committed(storage: RecordingStorage) -> None:
    w = _writer(storage, flush_interval_ms=50)
    for i in range(10):
        w.append_buffered(_entry(i))
    await w.flush()
    assert len(storage.calls) == 1 and len(storage.calls[0]) == 10
    w.close()


async def test_a_full_batch_commits_before_the_interval(storage: RecordingStorage) -> None:
    w = _writer(storage, flush_interval_ms=60_000, max_batch=4)
    for i in range(4):
        w.append_buffered(_entry(i))
    for _ in range(200):
        if storage.calls:
            break
        await asyncio.sleep(0.01)
    assert storage.calls == [[(0, "result"), (1, "result"), (2, "result"), (3, "result")]]
    w.close()


async def test_acked_append_flushes_what_was_buffered_before_it_inv4(
    storage: RecordingStorage,
) -> None:
    w = _writer(storage, flush_interval_ms=60_000)
    w.append_buffered(_entry(0))
    w.append_buffered(_entry(1))
    seq = await w.append_acked(_entry(2, EntryKind.INTENT))
    # one transaction: the buffered prefix commits with (never after) the acked entry
    assert storage.calls == [[(0, "result"), (1, "result"), (2, "intent")]]
    assert seq == storage.max_seq() == 3
    w.close()


async def test_acked_append_times_out_when_the_writer_is_stalled_fr_de_11(
    storage: RecordingStorage,
) -> None:
    w = _writer(storage, ack_timeout_ms=50)
    storage.gate.clear()
    with pytest.raises(JournalUnavailable, match="50 ms"):
        await w.append_acked(_entry(0, EntryKind.INTENT))
    storage.gate.set()
    w.close()


async def test_each_acked_append_gets_its_own_full_timeout(storage: RecordingStorage) -> None:
    """Waits overlap: each fails a full timeout after it began, not at an earlier one's
    expiry and not never; an answered wait leaves the others' clocks alone."""
    w = _writer(storage, ack_timeout_ms=300)
    loop = asyncio.get_running_loop()
    await w.append_acked(_entry(0))  # answered at once
    storage.gate.clear()
    first = asyncio.ensure_future(w.append_acked(_entry(1, EntryKind.INTENT)))
    await asyncio.sleep(0.2)
    began = loop.time()
    second = asyncio.ensure_future(w.append_acked(_entry(2, EntryKind.INTENT)))
    with pytest.raises(JournalUnavailable):
        await asyncio.wait_for(first, 2)
    assert not second.done()  # 100 ms left of its own 300
    with pytest.raises(JournalUnavailable):
        await asyncio.wait_for(second, 2)  # never failing would be a TimeoutError
    assert loop.time() - began >= 0.29
    storage.gate.set()
    assert await w.append_acked(_entry(3, EntryKind.INTENT)) > 0
    w.close()


def test_acked_waits_time_out_on_each_event_loop_the_writer_serves(
    storage: RecordingStorage,
) -> None:
    """A writer outlives an event loop (``asyncio.run`` after ``asyncio.run``): the timeout
    of a wait on the second loop must not hang on the first loop's timer."""
    w = _writer(storage, ack_timeout_ms=100)

    async def answered() -> None:  # its loop ends with the wait's timer still armed
        await w.append_acked(_entry(0))

    async def stalled() -> None:
        storage.gate.clear()
        try:
            with pytest.raises(JournalUnavailable):
                await asyncio.wait_for(w.append_acked(_entry(1, EntryKind.INTENT)), 2)
        finally:
            storage.gate.set()

    asyncio.run(answered())
    asyncio.run(stalled())  # never failing would be a TimeoutError
    w.close()


async def test_acked_append_errors_when_the_writer_is_gone_inv12(storage: RecordingStorage) -> None:
    w = _writer(storage)
    await asyncio.get_running_loop().run_in_executor(None, w.close)
    with pytest.raises(JournalUnavailable):
        await w.append_acked(_entry(0, EntryKind.INTENT))
    w.append_buffered(_entry(1))  # dropped with a warning, never raises or blocks
    assert w.stats.dropped == 1


async def test_an_acked_entry_the_database_refuses_raises_storage_error(
    storage: RecordingStorage,
) -> None:
    w = _writer(storage)
    await w.append_acked(_entry(0))
    with pytest.raises(StorageError):
        await w.append_acked(_entry(0))  # a second result for the same step
    w.close()


async def test_a_failed_group_commit_does_not_block_the_acked_entry(
    storage: RecordingStorage,
) -> None:
    w = _writer(storage, flush_interval_ms=60_000)
    await w.append_acked(_entry(0))
    w.append_buffered(_entry(0))  # duplicate: its group commit fails and is dropped
    seq = await w.append_acked(_entry(1, EntryKind.INTENT))
    assert seq > 0
    assert w.stats.dropped == 1
    w.close()


async def test_writer_resumes_after_max_seq_fr_de_12(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    first = SqliteStorage(db)
    first.open()
    first.create_execution("e", "wf", b"", 0)
    w = _writer(first)  # type: ignore[arg-type]
    for i in range(3):
        await w.append_acked(_entry(i))
    await asyncio.get_running_loop().run_in_executor(None, w.close)
    first.close()

    second = SqliteStorage(db)
    second.open()
    w2 = _writer(second)  # type: ignore[arg-type]
    seq = await w2.append_acked(_entry(3))
    assert w2.stats.resume_seq == 3
    assert seq == 4
    await asyncio.get_running_loop().run_in_executor(None, w2.close)
    second.close()


async def test_calls_run_in_order_after_buffered_entries(storage: RecordingStorage) -> None:
    w = _writer(storage, flush_interval_ms=60_000)
    w.append_buffered(_entry(0))
    count = await w.call(lambda s: len(s.read_segment("e", 0, 0, 10)))
    assert count == 1
    w.close()


def test_a_group_rolled_back_counts_and_logs_nothing_it_did(
    storage: RecordingStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """An inline group commit runs inside a transaction that may roll back: what it wrote
    or dropped counts only once settled as committed."""
    stats = WriterStats()
    groups = GroupCommit(storage, None, stats)
    storage.append([_entry(0)])
    batch: list[JournalEntry | Request] = [_entry(0), _entry(1)]  # a duplicate: dropped
    groups.process(batch)
    assert groups.settle(committed=False) == ([], 0)
    assert (stats.commits, stats.entries, stats.dropped) == (0, 0, 0)
    assert "dropped" not in caplog.text
    groups.process([_entry(0), _entry(2)])
    groups.process([_entry(3)])
    assert groups.settle() == ([], 1)
    assert (stats.commits, stats.entries, stats.dropped) == (1, 1, 2)
    assert "journal group commit of 2 entries failed" in caplog.text

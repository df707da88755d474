"""PostgreSQL's write path: the writer connection, signed marks written with the batch,
and single-statement starts.

These run when ``UNBROKEN_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from unbroken.errors import StorageError
from unbroken.ids import lock_name
from unbroken.journal import EntryKind, ExecutionStatus, RetentionPolicy

from .conftest import admin_execute, needs_postgres, signer
from .test_contract import create, entry, key, run_concurrently

pytest.importorskip("psycopg")

from unbroken.storage.postgres import PostgresStorage

pytestmark = needs_postgres
APPLICATION = f"unbroken pid {os.getpid()}"


def end_every_session_of_this_process() -> None:
    """``pg_terminate_backend`` on every session this process opened, and wait until the
    server has ended them all."""
    rows = admin_execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (APPLICATION,)
    )
    pids = [pid for (pid,) in rows]
    assert pids
    admin_execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    for _ in range(200):
        left = admin_execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = ANY(%s::int[])", (pids,)
        )
        if left[0][0] == 0:
            return
        time.sleep(0.025)
    pytest.fail("the server did not end the sessions")


def test_writes_and_reads_go_on_after_the_server_ended_every_session(
    opened: PostgresStorage,
) -> None:
    create(opened, "a")
    opened.append([entry("a", 0)], signer=signer)
    assert opened.get_execution("a") is not None

    end_every_session_of_this_process()

    opened.append([entry("a", 1)], signer=signer)  # on a new writer connection
    assert opened.read_integrity("a") == (2, b"a:2")  # on a new pooled connection
    end_every_session_of_this_process()
    assert opened.create_execution("b", "wf", b"", 1)[1]
    end_every_session_of_this_process()
    assert opened.finalize_execution("a", ExecutionStatus.COMPLETED, 2, output=b"out")
    assert [e.step_id for e in opened.read_segment("a", 0, 0, 10)] == [0, 1]


def test_a_mark_moved_by_another_storage_is_read_again_not_overwritten(url: str) -> None:
    one, two = PostgresStorage(url), PostgresStorage(url)
    one.open()
    two.open()
    try:
        create(one, "a")
        one.append([entry("a", 0)], signer=signer)  # one expects 1 from now on
        two.append([entry("a", 1), entry("a", 2)], signer=signer)
        one.append([entry("a", 3), entry("a", 3, EntryKind.INTENT, idem_key=key(99))], signer)
        assert one.read_integrity("a") == (4, b"a:4")
        two.append([entry("a", 4)], signer=signer)
        assert two.read_integrity("a") == (5, b"a:5")
        assert one.count_outcomes("a") == 5
    finally:
        one.close()
        two.close()


def test_a_refused_batch_leaves_the_mark_as_it_was_and_the_next_one_signs_on(
    opened: PostgresStorage,
) -> None:
    create(opened, "a")
    create(opened, "b")
    opened.append([entry("a", 0), entry("b", 0)], signer=signer)
    secret = b"SECRET-PAYLOAD-BYTES"
    with pytest.raises(StorageError) as refused:
        opened.append([entry("b", 1, payload=secret), entry("a", 0, payload=secret)], signer)
    assert "already exists" in str(refused.value)
    assert "SECRET" not in str(refused.value)
    assert opened.read_integrity("a") == (1, b"a:1")
    assert opened.read_integrity("b") == (1, b"b:1")
    opened.append([entry("b", 1), entry("a", 1)], signer=signer)
    assert opened.read_integrity("a") == (2, b"a:2")
    assert opened.read_integrity("b") == (2, b"b:2")


def test_an_execution_owned_anew_has_its_mark_read_again(url: str) -> None:
    """While it was owned elsewhere it may have ended, been pruned and started again: a
    count remembered from before must not be signed on."""
    one, two = PostgresStorage(url), PostgresStorage(url)
    one.open()
    two.open()
    try:
        create(one, "a")
        assert one.try_lock(lock_name("a")) is None
        one.append([entry("a", 0), entry("a", 1)], signer=signer)
        one.unlock(lock_name("a"))

        assert two.finalize_execution("a", ExecutionStatus.CANCELED, 2_000)
        assert two.prune(RetentionPolicy(ttl_failed_ms=0), 3_000).executions == 1
        create(two, "a")  # the same id, started again

        assert one.try_lock(lock_name("a")) is None
        one.append([entry("a", 0)], signer=signer)
        assert one.read_integrity("a") == (1, b"a:1")
    finally:
        one.close()
        two.close()


def test_many_storages_starting_one_execution_at_once_create_it_once(url: str) -> None:
    stores = [PostgresStorage(url) for _ in range(4)]
    for store in stores:
        store.open()
    try:
        for trial in range(10):
            eid = f"race-{trial}"
            results = run_concurrently(
                8, lambda i, eid=eid: stores[i % 4].create_execution(eid, "wf", b"", i)
            )
            assert sum(created for _, created in results) == 1
            assert len({record.created_at_ms for record, _ in results}) == 1
    finally:
        for store in stores:
            store.close()


def test_writes_from_many_threads_at_once_all_commit_with_exact_marks(
    opened: PostgresStorage,
) -> None:
    for i in range(6):
        create(opened, f"e{i}")

    def write(i: int) -> None:
        for step in range(30):
            opened.append([entry(f"e{i}", step)], signer=signer)

    run_concurrently(6, write)
    for i in range(6):
        assert opened.read_integrity(f"e{i}") == (30, f"e{i}:30".encode())


def test_refused_writes_leave_the_writer_connection_usable_and_the_log_quiet(
    opened: PostgresStorage, caplog: pytest.LogCaptureFixture
) -> None:
    create(opened, "a")
    with caplog.at_level(logging.WARNING):
        for step in range(20):
            opened.append([entry("a", step)], signer=signer)
            with pytest.raises(StorageError, match="already exists"):
                opened.append([entry("a", step)], signer=signer)
            with pytest.raises(StorageError, match="does not exist"):
                opened.append([entry("unknown", step)], signer=signer)
    assert opened.read_integrity("a") == (20, b"a:20")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []

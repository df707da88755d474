"""PostgreSQL-only behaviour: the schema and its migrations, refusals, connection errors,
concurrent engines, and the advisory locks that carry ownership across machines.

Tests that need a server run when ``UNBROKEN_TEST_POSTGRES_URL`` is set; the contract
suite runs on PostgreSQL through the ``storage`` fixture as well.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from unbroken.errors import ConfigurationError, NotAnUnbrokenDatabase, SchemaTooNew, StorageError
from unbroken.ids import lock_name
from unbroken.journal import EntryKind, ExecutionStatus, PromiseState, RetentionPolicy
from unbroken.storage.base import SCHEMA_VERSION
from unbroken.storage.sqlite import SqliteStorage

from .conftest import admin_execute, fresh_schema, needs_postgres, schema_url, signer
from .test_contract import control, create, entry, key, promise, run_concurrently

pytest.importorskip("psycopg")

from unbroken.storage.postgres import PostgresStorage
from unbroken.storage.postgres_locks import lock_key
from unbroken.storage.postgres_schema import MIGRATIONS

PASSWORD = "s3cr3t-pw"
LOCK = "00112233445566778899aabbccddeeff"


def tables(schema: str) -> set[str]:
    rows = admin_execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))
    return {name for (name,) in rows}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- URLs and connection errors (no server needed) ------------------------------------


def test_a_malformed_url_is_a_configuration_error_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        PostgresStorage("postgresql://app:s3cr%zz@db.example/app")
    assert "s3cr" not in str(excinfo.value)


def test_pool_sizes_must_make_sense() -> None:
    with pytest.raises(ConfigurationError):
        PostgresStorage("postgresql://db.example/app", min_size=4, max_size=2)


def test_an_unreachable_server_is_a_quick_storage_error_naming_the_address() -> None:
    port = free_port()
    store = PostgresStorage(f"postgresql://alice:{PASSWORD}@127.0.0.1:{port}/test")
    started = time.monotonic()
    with pytest.raises(StorageError) as excinfo:
        store.open()
    assert time.monotonic() - started < 5
    assert excinfo.value.op == "open"
    message = str(excinfo.value)
    assert f"connection refused at 127.0.0.1:{port}" in message
    assert PASSWORD not in message and "alice:***@" in message
    assert excinfo.value.__cause__ is None and excinfo.value.__context__ is None
    with pytest.raises(StorageError):  # never opened
        store.max_seq()
    store.close()


# -- logins ---------------------------------------------------------------------------


@needs_postgres
@pytest.mark.parametrize(
    "login",
    [
        f"nosuchuser:{PASSWORD}@127.0.0.1:5432/test",
        f"127.0.0.1:5432/test?user=nosuchuser&password={PASSWORD}",
    ],
)
def test_a_refused_login_names_the_user_but_never_the_password(login: str) -> None:
    with pytest.raises(StorageError) as excinfo:
        PostgresStorage(f"postgresql://{login}").open()
    message = str(excinfo.value)
    assert excinfo.value.op == "open"
    assert "nosuchuser" in message and "refused the login" in message
    assert PASSWORD not in message


# -- schema and migrations ------------------------------------------------------------


@needs_postgres
def test_the_schema_is_the_sqlite_schema_in_postgres_types(
    opened: PostgresStorage, postgres_schema: str, tmp_path: Path
) -> None:
    lite = SqliteStorage(tmp_path / "j.db")
    lite.open()
    lite.close()
    with closing(sqlite3.connect(tmp_path / "j.db")) as conn:
        master = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
        want = {
            name: [column[1] for column in conn.execute(f"PRAGMA table_info({name})")]
            for kind, name in master
            if kind == "table" and not name.startswith("sqlite_")
        }
    want_indexes = {n for k, n in master if k == "index" and not n.startswith("sqlite_")}
    rows = admin_execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s ORDER BY table_name, ordinal_position",
        (postgres_schema,),
    )
    have: dict[str, list[str]] = {}
    for table, column, data_type in rows:
        have.setdefault(table, []).append(column)
        assert data_type in ("text", "bytea", "bigint"), (table, column, data_type)
    assert have.pop("unbroken_meta") == ["key", "value"]
    assert have == want
    indexes = dict(
        admin_execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s",
            (postgres_schema,),
        )
    )
    assert {n for n in indexes if n.startswith("idx_")} == want_indexes
    outcome = indexes["idx_journal_outcome"]
    assert "UNIQUE" in outcome and "WHERE" in outcome and "'result'" in outcome
    assert "WHERE (effect = 'exactly_once_guarded'" in indexes["idx_journal_idem_key"]
    assert "WHERE (kind = 'checkpoint'" in indexes["idx_journal_checkpoint"]
    assert "WHERE (queue IS NOT NULL)" in indexes["idx_executions_queue"]
    assert admin_execute(f"SELECT key, value FROM {postgres_schema}.unbroken_meta") == [
        ("schema_version", str(SCHEMA_VERSION))
    ]


@needs_postgres
def test_four_storages_opening_a_fresh_schema_at_once_migrate_it_once() -> None:
    for _ in range(3):
        with fresh_schema() as schema:
            stores = [PostgresStorage(schema_url(schema)) for _ in range(4)]
            try:
                run_concurrently(4, lambda i, stores=stores: stores[i].open())
                stores[0].create_execution("ex-1", "wf", b"", 1)
                assert all(s.get_execution("ex-1") is not None for s in stores)
            finally:
                for store in stores:
                    store.close()
            assert admin_execute(f"SELECT key, value FROM {schema}.unbroken_meta") == [
                ("schema_version", str(SCHEMA_VERSION))
            ]


@needs_postgres
def test_an_older_schema_is_migrated_in_place_and_keeps_its_rows(
    url: str, postgres_schema: str
) -> None:
    meta = "CREATE TABLE unbroken_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    older = [meta, *MIGRATIONS[0], *MIGRATIONS[1]]
    for statement in older:
        admin_execute(f"SET search_path = {postgres_schema}; {statement}")
    admin_execute(
        f"INSERT INTO {postgres_schema}.unbroken_meta VALUES ('schema_version', '2');"
        f"INSERT INTO {postgres_schema}.executions (execution_id, workflow, status, "
        "created_at, updated_at) VALUES ('old', 'wf', 'running', 1, 1)"
    )
    store = PostgresStorage(url)
    store.open()
    try:
        assert store.get_execution("old") is not None
        store.append([replace(entry("old", 0, EntryKind.CHECKPOINT), folded=2)])
        assert store.count_outcomes("old") == 2  # the v3 column
        assert store.promise_states(["p"]) == {}  # the v3 table
    finally:
        store.close()
    assert admin_execute(f"SELECT value FROM {postgres_schema}.unbroken_meta") == [
        (str(SCHEMA_VERSION),)
    ]


@needs_postgres
def test_a_newer_schema_version_is_refused_and_left_unchanged(
    url: str, postgres_schema: str
) -> None:
    store = PostgresStorage(url)
    store.open()
    store.create_execution("ex-1", "wf", b"", 1)
    store.close()
    newer = SCHEMA_VERSION + 1
    admin_execute(f"UPDATE {postgres_schema}.unbroken_meta SET value = %s", (str(newer),))
    with pytest.raises(SchemaTooNew) as excinfo:
        PostgresStorage(url).open()
    assert excinfo.value.found == newer
    assert admin_execute(f"SELECT value FROM {postgres_schema}.unbroken_meta") == [(str(newer),)]
    assert admin_execute(f"SELECT execution_id FROM {postgres_schema}.executions") == [("ex-1",)]


@needs_postgres
@pytest.mark.parametrize(
    "foreign",
    [
        "CREATE TABLE {s}.executions (id integer)",
        "CREATE TABLE {s}.journal (id integer)",
        "CREATE TABLE {s}.unbroken_meta (key text, value text)",  # no schema_version
    ],
)
def test_a_schema_holding_our_table_names_but_not_ours_is_refused_untouched(
    url: str, postgres_schema: str, foreign: str
) -> None:
    admin_execute(foreign.format(s=postgres_schema))
    before = tables(postgres_schema)
    with pytest.raises(NotAnUnbrokenDatabase) as excinfo:
        PostgresStorage(url).open()
    assert postgres_schema in str(excinfo.value)
    assert tables(postgres_schema) == before


@needs_postgres
def test_other_applications_tables_may_share_the_schema(url: str, postgres_schema: str) -> None:
    admin_execute(f"CREATE TABLE {postgres_schema}.customers (id integer)")
    store = PostgresStorage(url)
    store.open()
    store.close()
    assert {"customers", "journal", "unbroken_meta"} <= tables(postgres_schema)


@needs_postgres
def test_create_false_refuses_an_empty_schema_and_opens_an_existing_one(
    url: str, postgres_schema: str
) -> None:
    with pytest.raises(NotAnUnbrokenDatabase):
        PostgresStorage(url, create=False).open()
    assert tables(postgres_schema) == set()
    store = PostgresStorage(url)
    store.open()
    store.create_execution("ex-1", "wf", b"", 1)
    store.close()
    tool = PostgresStorage(url, create=False)
    tool.open()
    try:
        assert tool.get_execution("ex-1") is not None
    finally:
        tool.close()


@needs_postgres
def test_a_search_path_without_an_existing_schema_is_a_clear_error() -> None:
    with pytest.raises(StorageError) as excinfo:
        PostgresStorage(schema_url("no_such_schema_here")).open()
    assert "search_path" in str(excinfo.value)


@needs_postgres
def test_connections_carry_the_pid_in_their_application_name(opened: PostgresStorage) -> None:
    opened.max_seq()
    rows = admin_execute(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = %s",
        (f"unbroken pid {os.getpid()}",),
    )
    assert rows[0][0] >= 1


# -- concurrent engines ---------------------------------------------------------------


@needs_postgres
def test_four_engines_appending_at_once_keep_the_high_water_mark_exact(url: str) -> None:
    stores = [PostgresStorage(url) for _ in range(4)]
    for store in stores:
        store.open()
    try:
        create(stores[0], "a")
        create(stores[0], "b")

        def writer(i: int) -> None:
            for n in range(25):
                step = i * 1_000 + n
                batch = [
                    entry("a", step, EntryKind.INTENT, idem_key=key(step)),
                    entry("a", step),
                    entry("b", step),
                ]
                # half the writers list "b" first: the marks must still not deadlock
                stores[i].append(batch if i % 2 else batch[::-1], signer=signer)

        run_concurrently(4, writer)
        assert stores[1].read_integrity("a") == (100, b"a:100")
        assert stores[2].read_integrity("b") == (100, b"b:100")
        assert stores[3].count_outcomes("a") == 100
    finally:
        for store in stores:
            store.close()


@needs_postgres
def test_two_engines_pruning_at_once_delete_each_execution_once(url: str) -> None:
    stores = [PostgresStorage(url) for _ in range(2)]
    for store in stores:
        store.open()
    try:
        for n in range(40):
            create(stores[0], f"ex-{n}")
            stores[0].append([entry(f"ex-{n}", 0)])
            stores[0].finalize_execution(f"ex-{n}", ExecutionStatus.COMPLETED, 2_000)
        policy = RetentionPolicy(0, 0, max_executions=0, max_journal_bytes=0, batch_size=5)
        reports = run_concurrently(2, lambda i: stores[i].prune(policy, 10_000))
        assert sum(r.executions for r in reports) == 40
        assert sum(r.journal_rows for r in reports) == 40
        assert not stores[0].has_executions()
    finally:
        for store in stores:
            store.close()


# -- ownership locks ------------------------------------------------------------------


@needs_postgres
def test_a_held_lock_names_its_holder_until_unlocked_or_closed(url: str) -> None:
    first, second = PostgresStorage(url), PostgresStorage(url)
    first.open()
    second.open()
    try:
        assert first.try_lock(LOCK) is None
        assert first.try_lock(LOCK) == os.getpid()  # held once, even by its holder
        assert second.try_lock(LOCK) == os.getpid()
        assert second.try_lock("ff" * 16) is None  # another name is another lock
        first.unlock(LOCK)
        first.unlock(LOCK)  # not held: nothing to do
        assert second.try_lock(LOCK) is None
        assert first.try_lock(LOCK) == os.getpid()
        second.close()
        assert first.try_lock(LOCK) is None
    finally:
        first.close()
        second.close()


@needs_postgres
def test_locks_are_keyed_by_name_within_the_schema(opened: PostgresStorage) -> None:
    name = "80" + "00" * 7 + "aa" * 8
    assert opened.try_lock(name) is None
    schema = opened._namespace  # the schema the storage's tables live in
    key = lock_key(name, schema) & 0xFFFF_FFFF_FFFF_FFFF
    rows = admin_execute(
        "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
        "AND objsubid = 1 AND pid IN "
        "(SELECT pid FROM pg_stat_activity WHERE application_name = %s)",
        (f"unbroken pid {os.getpid()}",),
    )
    assert (key >> 32, key & 0xFFFF_FFFF) in rows
    assert lock_key(name) == -(2**63)  # without a namespace: the name's first 8 bytes
    assert lock_key(name, "a") != lock_key(name, "b")  # two schemas never contend
    with pytest.raises(ValueError):
        opened.try_lock("0011")
    with pytest.raises(ValueError):
        opened.try_lock("not hex")


@needs_postgres
def test_try_lock_after_close_is_a_storage_error(url: str) -> None:
    store = PostgresStorage(url)
    store.open()
    store.close()
    with pytest.raises(StorageError) as excinfo:
        store.try_lock(LOCK)
    assert excinfo.value.op == "try_lock"


@needs_postgres
def test_the_server_releases_the_locks_of_a_killed_process(url: str) -> None:
    code = (
        "import sys, time\n"
        "from unbroken.storage.postgres import PostgresStorage\n"
        "store = PostgresStorage(sys.argv[1])\n"
        "store.open()\n"
        "assert store.try_lock(sys.argv[2]) is None\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, url, LOCK], stdout=subprocess.PIPE, text=True
    )
    store = PostgresStorage(url)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        store.open()
        assert store.try_lock(LOCK) == child.pid
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while (holder := store.try_lock(LOCK)) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder is None
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        store.close()


@needs_postgres
def test_try_lock_is_safe_from_many_threads(opened: PostgresStorage, url: str) -> None:
    names = [f"{n:016x}{0:016x}" for n in range(1, 41)]  # 40 distinct keys
    results = run_concurrently(8, lambda i: [opened.try_lock(n) for n in names[i::8]])
    assert all(r is None for batch in results for r in batch)
    other = PostgresStorage(url)
    other.open()
    try:
        assert {other.try_lock(n) for n in names} == {os.getpid()}
        run_concurrently(8, lambda i: [opened.unlock(n) for n in names[i::8]])
        assert {other.try_lock(n) for n in names} == {None}
    finally:
        other.close()


# -- queued work and notifications ----------------------------------------------------


class Recording:
    """A claimant that owns whatever it is offered and records the offers."""

    def __init__(self) -> None:
        self.offered: list[str] = []

    def try_own(self, execution_id: str) -> bool:
        self.offered.append(execution_id)
        return True

    def is_owned(self, execution_id: str) -> bool:
        return False


@needs_postgres
def test_executions_owned_by_any_session_are_skipped_and_counted_in_sql(
    opened: PostgresStorage, url: str
) -> None:
    for i in range(4):
        opened.enqueue_execution(f"e{i}", "wf", b"in", "q", i)
    other = PostgresStorage(url)  # another worker: its own lock session
    other.open()
    try:
        assert other.try_lock(lock_name("e0")) is None
        assert other.try_lock(lock_name("e2")) is None
        recording = Recording()
        assert opened.claim_queued("q", 5, recording, ["wf"]) == [("e1", "wf"), ("e3", "wf")]
        assert recording.offered == ["e1", "e3"]  # owned rows are never even offered
        other.unlock(lock_name("e2"))
        # The recording claimant took no real locks: only e0 is owned.
        assert opened.claim_queued("q", 5, Recording(), ["wf"], cap=2) == [("e1", "wf")]
        assert opened.claim_queued("q", 5, Recording(), ["wf"], cap=1) == []
    finally:
        other.close()


@needs_postgres
def test_enqueue_finalize_and_settle_notify_listeners(opened: PostgresStorage) -> None:
    # Channels are per database: other schemas' notifications (a concurrent test run) may
    # arrive too, so this test's queue and promise carry names no one else uses.
    queue, pid = f"emails-{os.urandom(6).hex()}", f"p-{os.urandom(6).hex()}"
    listener = opened.listen(["work", "promises"])
    try:
        opened.enqueue_execution("e1", "wf", b"in", queue, 1)
        opened.enqueue_execution("e1", "wf", b"in", queue, 2)  # exists: no notification
        create(opened, "plain")
        opened.finalize_execution("plain", ExecutionStatus.COMPLETED, 3)  # not queued: silent
        opened.finalize_execution("e1", ExecutionStatus.COMPLETED, 4)
        create(opened, "waiting")
        opened.create_promise(control("waiting", 0), promise(pid, "waiting"))
        assert opened.settle_promise(pid, PromiseState.RESOLVED, None, 5)
        assert not opened.settle_promise(pid, PromiseState.RESOLVED, None, 6)  # silent
        notes: list[tuple[str, str]] = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # wait a while: nothing more may come
            notes += [n for n in listener.wait(0.5) if n[1] in (queue, pid)]
        assert notes == [("work", queue), ("work", queue), ("promises", pid)]
        listener.interrupt()
        start = time.monotonic()
        listener.wait(5)  # returns at once: interrupted
        assert time.monotonic() - start < 1
    finally:
        listener.close()
        listener.close()
    with pytest.raises(StorageError):
        listener.wait(0.01)


@needs_postgres
def test_a_process_with_over_1024_open_files_keeps_its_locks_reads_and_writes(
    url: str,
) -> None:
    """Connections get descriptor numbers above 1024 in a busy server process; checking
    them must not mistake them for dead ones (which would drop every lock)."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1300:
        pytest.skip("the open-file limit is too low to push descriptors past 1024")
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    store = PostgresStorage(url)
    lost: list[list[str]] = []
    try:
        store.open()
        store.watch(60.0, lost.append)
        create(store, "busy")
        assert store.try_lock(lock_name("busy")) is None
        store.append([entry("busy", 0)])
        assert store.get_execution("busy") is not None
        assert store.try_lock(lock_name("other")) is None
        store.append([entry("busy", 1)])
        assert [e.step_id for e in store.read_segment("busy", 0, 0, 10)] == [0, 1]
        assert lost == []
        assert store._lock_conn is not None and store._lock_conn.fileno() >= 1024
    finally:
        store.close()
        for fd in spare:
            os.close(fd)


# -- queue claims and the lock session --------------------------------------------------


def test_a_claim_waiting_for_its_queue_lock_holds_up_no_one_taking_ownership(
    opened: PostgresStorage, url: str
) -> None:
    """A claim takes ownership locks while it holds its queue's lock: were it to wait for
    that queue lock on the lock session, it would hold the session from ``try_lock``, and a
    claimer holding the queue lock and waiting in ``try_lock`` would deadlock with it."""
    import psycopg

    from unbroken.storage.postgres_queue import _QUEUE_LOCK_CLASS

    from .test_contract import claims, enqueue

    enqueue(opened, "e0", 0)
    claimed: list[list[tuple[str, str]]] = []
    taken: list[int | None] = []
    with psycopg.connect(url) as other:  # another claimer, inside its transaction
        queue_key = opened._queue_key(other, "q")
        other.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_QUEUE_LOCK_CLASS, queue_key))
        claim = threading.Thread(
            target=lambda: claimed.append(
                opened.claim_queued("q", 1, claims(opened), ["wf"], cap=5)
            ),
            daemon=True,
        )
        claim.start()
        for _ in range(200):  # until the claim waits for the queue lock
            waiting = admin_execute(
                "SELECT COUNT(*) FROM pg_locks WHERE NOT granted AND locktype = 'advisory' "
                "AND classid = %s AND objid = %s",
                (_QUEUE_LOCK_CLASS, queue_key & 0xFFFF_FFFF),
            )
            if waiting != [(0,)]:
                break
            time.sleep(0.025)
        else:
            pytest.fail("the claim never waited for the queue lock")
        taker = threading.Thread(
            target=lambda: taken.append(opened.try_lock(lock_name("elsewhere"))), daemon=True
        )
        taker.start()
        taker.join(5)
        assert taken == [None], "taking ownership waited for a claim blocked on its queue lock"
        other.rollback()
    claim.join(10)
    assert claimed == [[("e0", "wf")]]

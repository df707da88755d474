"""SQLite-only behaviour: PRAGMAs, refusing foreign files, migrations, URLs."""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from unbroken.errors import (
    ConfigurationError,
    NotAnUnbrokenDatabase,
    SchemaTooNew,
    StorageError,
)
from unbroken.journal import (
    EntryKind,
    ExecutionStatus,
    JournalEntry,
    PromiseRecord,
    PromiseState,
    PruneReport,
    RetentionPolicy,
    TimerRecord,
)
from unbroken.storage.base import SCHEMA_VERSION
from unbroken.storage.memory import MemoryStorage
from unbroken.storage.schema import APPLICATION_ID, MIGRATIONS, migration_statements
from unbroken.storage.sqlite import SqliteStorage
from unbroken.storage.url import open_storage, redact_url

from .conftest import sqlite_at_version


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteStorage]:
    storage = SqliteStorage(db_path)
    storage.open()
    try:
        yield storage
    finally:
        storage.close()


def pragma(storage: SqliteStorage, name: str) -> object:
    """A PRAGMA as the storage's own connection for this thread sees it."""
    return storage._conn("test").execute(f"PRAGMA {name}").fetchone()[0]


def raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Run one statement on a plain connection (closed afterwards) and fetch its rows."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


def result(execution_id: str, step_id: int) -> JournalEntry:
    return JournalEntry(
        execution_id, 0, step_id, EntryKind.RESULT, "s", "idempotent", b"k" * 32, b"v", 1
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- PRAGMAs --------------------------------------------------------------------------


def test_connections_use_wal_foreign_keys_busy_timeout_and_normal_sync(
    store: SqliteStorage, db_path: Path
) -> None:
    assert pragma(store, "journal_mode") == "wal"
    assert pragma(store, "foreign_keys") == 1
    assert pragma(store, "busy_timeout") == 5000
    assert pragma(store, "synchronous") == 1  # NORMAL
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]  # persistent in the file


def test_every_thread_gets_its_own_configured_connection(store: SqliteStorage) -> None:
    seen: list[tuple[sqlite3.Connection, object]] = []
    all_probed = threading.Barrier(3)

    def probe() -> None:
        seen.append((store._conn("t"), pragma(store, "foreign_keys")))
        all_probed.wait()  # keep every thread (and its connection) alive until all probed

    threads = [threading.Thread(target=probe) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(conn) for conn, _ in seen} | {id(store._conn("t"))}) == 4
    assert all(fk == 1 for _, fk in seen)


def test_synchronous_full_is_honoured_on_every_connection(db_path: Path) -> None:
    storage = SqliteStorage(db_path, synchronous="FULL")
    storage.open()
    try:
        assert pragma(storage, "synchronous") == 2  # FULL
        other: list[object] = []
        thread = threading.Thread(target=lambda: other.append(pragma(storage, "synchronous")))
        thread.start()
        thread.join()
        assert other == [2]
    finally:
        storage.close()


def test_an_invalid_synchronous_level_is_a_configuration_error(db_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        SqliteStorage(db_path, synchronous="OFF")  # type: ignore[arg-type]


def test_close_closes_the_connections_of_every_thread(store: SqliteStorage) -> None:
    connections: list[sqlite3.Connection] = []
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        connections.append(store._conn("t"))
        ready.set()
        release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait()
    connections.append(store._conn("t"))
    store.close()
    release.set()
    thread.join()
    for conn in connections:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")
    with pytest.raises(StorageError, match="not open"):
        store.max_seq()


def test_the_connection_of_a_thread_that_ended_is_closed(store: SqliteStorage) -> None:
    connections: list[sqlite3.Connection] = []
    thread = threading.Thread(target=lambda: connections.append(store._conn("t")))
    thread.start()
    thread.join()
    with pytest.raises(sqlite3.ProgrammingError):
        connections[0].execute("SELECT 1")
    assert connections[0] not in store._connections


# -- opening and refusing -------------------------------------------------------------


def test_a_new_database_is_stamped_with_application_id_and_schema_version(
    store: SqliteStorage, db_path: Path
) -> None:
    assert raw(db_path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert len(MIGRATIONS) == SCHEMA_VERSION
    tables = {name for (name,) in raw(db_path, "SELECT name FROM sqlite_master")}
    assert {"executions", "journal", "idx_journal_outcome", "idx_journal_idem_key"} <= tables


def test_migration_statements_end_by_stamping_the_file_and_skip_a_current_database() -> None:
    statements = migration_statements(0)
    assert statements[-2:] == [
        f"PRAGMA application_id = {APPLICATION_ID}",
        f"PRAGMA user_version = {SCHEMA_VERSION}",
    ]
    assert migration_statements(SCHEMA_VERSION) == []


def test_create_false_on_a_missing_file_raises_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    storage = SqliteStorage(path, create=False)
    with pytest.raises(StorageError) as excinfo:
        storage.open()
    assert excinfo.value.op == "open"
    assert str(path) in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []
    storage.close()


def test_create_false_opens_an_existing_database(db_path: Path) -> None:
    first = SqliteStorage(db_path)
    first.open()
    first.create_execution("ex-1", "wf", b"", 1)
    first.close()
    second = SqliteStorage(db_path, create=False)
    second.open()
    try:
        assert second.get_execution("ex-1") is not None
    finally:
        second.close()


@pytest.mark.parametrize("size", [10, 100, 8192])
def test_a_file_of_random_bytes_is_refused_and_left_byte_identical(
    tmp_path: Path, size: int
) -> None:
    path = tmp_path / "noise.db"
    path.write_bytes(random.Random(size).randbytes(size))
    before = snapshot(tmp_path)
    storage = SqliteStorage(path)
    with pytest.raises(NotAnUnbrokenDatabase) as excinfo:
        storage.open()
    assert str(path) in str(excinfo.value)
    assert excinfo.value.op == "open"
    storage.close()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_a_foreign_sqlite_database_is_refused_and_left_unchanged(
    tmp_path: Path, journal_mode: str
) -> None:
    path = tmp_path / "app.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA journal_mode = {journal_mode}")
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    before = snapshot(tmp_path)
    storage = SqliteStorage(path)
    with pytest.raises(NotAnUnbrokenDatabase):
        storage.open()
    storage.close()
    assert snapshot(tmp_path) == before
    assert raw(path, "SELECT name FROM users") == [("ada",)]


def test_an_empty_sqlite_file_of_another_application_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA application_id = 1234")
    before = snapshot(tmp_path)
    with pytest.raises(NotAnUnbrokenDatabase):
        SqliteStorage(path).open()
    assert snapshot(tmp_path) == before


def test_an_empty_file_is_initialised_as_a_new_database(db_path: Path) -> None:
    db_path.write_bytes(b"")
    storage = SqliteStorage(db_path)
    storage.open()
    storage.close()
    assert raw(db_path, "PRAGMA application_id") == [(APPLICATION_ID,)]


def test_a_newer_schema_version_is_refused_with_schema_too_new_and_left_unchanged(
    store: SqliteStorage, db_path: Path
) -> None:
    store.create_execution("ex-1", "wf", b"", 1)
    store.close()
    raw(db_path, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = snapshot(db_path.parent)
    newer = SqliteStorage(db_path)
    with pytest.raises(SchemaTooNew) as excinfo:
        newer.open()
    assert (excinfo.value.found, excinfo.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    newer.close()
    assert snapshot(db_path.parent) == before


def test_reopening_an_existing_database_keeps_its_data(store: SqliteStorage, db_path: Path) -> None:
    store.create_execution("ex-1", "wf", b"in", 1)
    seq = store.append([result("ex-1", 0)])
    store.close()
    again = SqliteStorage(db_path)
    again.open()
    try:
        record = again.get_execution("ex-1")
        assert record is not None and record.inputs == b"in"
        assert again.max_seq() == seq
        assert again.append([result("ex-1", 1)]) == seq + 1
    finally:
        again.close()


def test_two_storages_opening_a_new_file_at_once_both_succeed(db_path: Path) -> None:
    storages = [SqliteStorage(db_path) for _ in range(4)]
    barrier = threading.Barrier(len(storages))
    errors: list[BaseException] = []

    def open_one(storage: SqliteStorage) -> None:
        barrier.wait()
        try:
            storage.open()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for storage in storages:
        storage.close()
    assert errors == []
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_two_storages_on_one_file_appending_concurrently_lose_nothing(db_path: Path) -> None:
    storages = [SqliteStorage(db_path) for _ in range(2)]
    for storage in storages:
        storage.open()
    storages[0].create_execution("ex-1", "wf", b"", 1)
    barrier = threading.Barrier(2)
    seqs: list[list[int]] = [[], []]

    def writer(index: int) -> None:
        barrier.wait()
        for i in range(100):
            seqs[index].append(storages[index].append([result("ex-1", index * 1000 + i)]))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(set(seqs[0]) | set(seqs[1])) == 200
        assert len(storages[1].read_segment("ex-1", 0, 0, 1000)) == 200
        assert storages[1].max_seq() == max(seqs[0] + seqs[1])
    finally:
        for storage in storages:
            storage.close()


def test_a_failing_batch_leaves_the_connection_usable(store: SqliteStorage) -> None:
    store.create_execution("ex-1", "wf", b"", 1)
    with pytest.raises(StorageError) as excinfo:
        store.append([result("ex-1", 0), result("ex-1", 0)])
    assert isinstance(excinfo.value.__cause__, sqlite3.IntegrityError)
    assert not store._conn("t").in_transaction
    assert store.append([result("ex-1", 0)]) == 1


def test_lock_dir_and_display_url(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    assert storage.lock_dir == Path(str(db_path) + ".locks")
    assert storage.display_url == f"sqlite:///{db_path}"
    assert storage.display_url.startswith("sqlite:////")


# -- URLs -----------------------------------------------------------------------------


def test_sqlite_url_with_three_slashes_is_relative_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage("sqlite:///data/app.db")
    assert isinstance(storage, SqliteStorage)
    assert storage.path == tmp_path / "data" / "app.db"


def test_sqlite_url_with_four_slashes_is_absolute(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/app.db")
    assert isinstance(storage, SqliteStorage)
    assert storage.path == tmp_path / "app.db"
    assert storage.display_url == f"sqlite:///{tmp_path}/app.db"


def test_open_storage_returns_an_unopened_storage(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/app.db")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError, match="not open"):
        storage.max_seq()


def test_open_storage_passes_synchronous_and_create(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/a.db", synchronous="full")
    assert isinstance(storage, SqliteStorage)
    storage.open()
    try:
        assert pragma(storage, "synchronous") == 2
    finally:
        storage.close()
    missing = open_storage(f"sqlite:///{tmp_path}/b.db", create=False)
    with pytest.raises(StorageError):
        missing.open()
    assert not (tmp_path / "b.db").exists()


@pytest.mark.parametrize("level", ["OFF", "extra", ""])
def test_open_storage_rejects_other_synchronous_levels(level: str) -> None:
    with pytest.raises(ConfigurationError, match="NORMAL or FULL"):
        open_storage("memory://", synchronous=level)


def test_memory_url_gives_a_memory_storage() -> None:
    storage = open_storage("memory://")
    assert isinstance(storage, MemoryStorage)
    assert storage.lock_dir is None
    assert storage.display_url == "memory://"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
def test_postgres_urls_give_an_unopened_postgres_storage_without_leaking_the_password(
    scheme: str,
) -> None:
    pytest.importorskip("psycopg")
    from unbroken.storage.postgres import PostgresStorage

    storage = open_storage(f"{scheme}://app:hunter2@db.example:5432/unbroken?password=hunter3")
    assert isinstance(storage, PostgresStorage)  # built, not connected: no server needed
    assert storage.lock_dir is None
    url = storage.display_url
    assert "hunter2" not in url and "hunter3" not in url
    assert "app:***@db.example:5432" in url
    with pytest.raises(StorageError) as excinfo:
        storage.get_execution("x")
    assert "not open" in str(excinfo.value)


@pytest.mark.parametrize("url", ["mysql://u:pw@host/db", "file:///tmp/x.db", "sqlite3:///x"])
def test_unknown_schemes_are_refused_naming_the_scheme_and_the_supported_ones(url: str) -> None:
    with pytest.raises(ConfigurationError) as excinfo:
        open_storage(url)
    message = str(excinfo.value)
    assert repr(url.partition("://")[0]) in message
    assert "sqlite:///" in message and "memory://" in message
    assert "pw@" not in message


@pytest.mark.parametrize(
    "url", ["journal.db", "sqlite://host/x.db", "sqlite:///", "memory://extra"]
)
def test_malformed_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_storage(url)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (
            "postgresql://h/db?user=u&password=secret&x=1",
            "postgresql://h/db?user=u&password=***&x=1",
        ),
        ("sqlite:////abs/path.db", "sqlite:////abs/path.db"),
        ("memory://", "memory://"),
    ],
)
def test_redact_url_replaces_only_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_operator_tools_never_turn_an_empty_file_into_a_journal(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    storage = SqliteStorage(empty, create=False)
    with pytest.raises(NotAnUnbrokenDatabase):
        storage.open()
    storage.close()
    assert empty.read_bytes() == b""


def test_a_memory_url_with_credentials_is_refused_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_storage("memory://bob:hunter2@x")
    assert "hunter2" not in str(caught.value)


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite_at_version(db, 1) as conn:
        conn.execute(
            "INSERT INTO journal (execution_id, generation, step_id, kind, name, effect, "
            "idem_key, payload, created_at) VALUES ('old', 0, 0, 'result', 's', 'idempotent', "
            "x'00', x'31', 1)"
        )
    storage = SqliteStorage(db)
    storage.open()
    try:
        (row,) = storage.read_segment("old", 0, 0, 10)
        assert row.payload == b"1" and row.hmac is None
        assert storage.read_integrity("old") is None
        assert storage.key_verifiers() == {}
    finally:
        storage.close()
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_a_version_2_database_is_migrated_to_3_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "v2.db"
    with sqlite_at_version(db, 2) as conn:
        conn.execute(
            "INSERT INTO journal (execution_id, generation, step_id, kind, name, effect, "
            "idem_key, payload, created_at, hmac) VALUES ('old', 0, 0, 'result', 's', "
            "'idempotent', x'00', x'31', 1, NULL), ('old', 0, 1, 'intent', 's', "
            "'exactly_once_guarded', x'01', NULL, 1, x'0a0b')"
        )
        conn.execute("INSERT INTO integrity VALUES ('old', 1, x'0102', 1)")
        conn.execute("INSERT INTO keys VALUES (0, x'0303', 1)")
    storage = SqliteStorage(db)
    storage.open()
    try:
        rows = storage.read_segment("old", 0, 0, 10)
        assert [(r.kind, r.payload, r.hmac, r.folded) for r in rows] == [
            (EntryKind.RESULT, b"1", None, 0),
            (EntryKind.INTENT, None, b"\x0a\x0b", 0),
        ]
        assert storage.read_integrity("old") == (1, b"\x01\x02")
        assert storage.key_verifiers() == {0: b"\x03\x03"}
        assert storage.count_outcomes("old") == 1
        # the v3 tables work on the migrated file
        control = JournalEntry(
            "old", 0, 2, EntryKind.CONTROL, "wait", "idempotent", b"k" * 32, None, 2
        )
        storage.create_promise(
            control,
            PromiseRecord("p", "old", 0, 2, "wait", b"h" * 32, PromiseState.PENDING, None, 2),
        )
        assert storage.promise_states(["p"]) == {"p": PromiseState.PENDING}
    finally:
        storage.close()
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    tables = {name for (name,) in raw(db, "SELECT name FROM sqlite_master")}
    assert {"promises", "timers", "idx_timers_due", "idx_promises_execution"} <= tables


def _finished(store: SqliteStorage, execution_id: str, finalized_at_ms: int = 2_000) -> None:
    """A completed execution with a result, a promise, a timer and an integrity row."""
    store.create_execution(execution_id, "wf", b"in", 1)
    store.append([result(execution_id, 0)], signer=lambda eid, n: b"mac")
    for step, kind in ((1, "promise"), (2, "timer")):
        control = JournalEntry(
            execution_id, 0, step, EntryKind.CONTROL, kind, "idempotent", b"k" * 32, None, 1
        )
        if kind == "promise":
            record = PromiseRecord(
                f"p-{execution_id}",
                execution_id,
                0,
                1,
                "p",
                b"h" * 32,
                PromiseState.RESOLVED,
                b"value",
                1,
                1,
            )
            store.create_promise(control, record)
        else:
            store.arm_timer(
                control, TimerRecord(f"t-{execution_id}", execution_id, 0, 2, 9, False, 1)
            )
    store.finalize_execution(execution_id, ExecutionStatus.COMPLETED, finalized_at_ms)


_EVERY_TABLE = ("executions", "journal", "promises", "timers", "integrity")


def _table_counts(db: Path) -> dict[str, object]:
    """The number of rows of each table that holds an execution's data."""
    return {t: raw(db, f"SELECT COUNT(*) FROM {t}")[0][0] for t in _EVERY_TABLE}


def test_prune_deletes_every_row_of_an_execution_and_nothing_else(
    store: SqliteStorage, db_path: Path
) -> None:
    _finished(store, "gone", finalized_at_ms=1_000)
    _finished(store, "kept", finalized_at_ms=9_000)
    policy = RetentionPolicy(5_000, 5_000, max_executions=0, max_journal_bytes=0)
    assert store.prune(policy, 6_000) == PruneReport(executions=1, journal_rows=3, by_ttl=1)
    assert _table_counts(db_path) == {
        "executions": 1,
        "journal": 3,
        "promises": 1,
        "timers": 1,
        "integrity": 1,
    }
    assert raw(db_path, "SELECT DISTINCT execution_id FROM journal") == [("kept",)]


def test_prune_commits_one_transaction_per_batch(store: SqliteStorage, db_path: Path) -> None:
    for n in range(7):
        _finished(store, f"ex-{n}", finalized_at_ms=1_000 + n)
    statements: list[str] = []
    store._conn("t").set_trace_callback(statements.append)
    policy = RetentionPolicy(0, 0, max_executions=0, max_journal_bytes=0, batch_size=3)
    try:
        assert store.prune(policy, 10_000).executions == 7
    finally:
        store._conn("t").set_trace_callback(None)
    assert statements.count("BEGIN IMMEDIATE") == 3  # 3 + 3 + 1
    assert statements.count("COMMIT") == 3
    deletes = [s for s in statements if s.startswith("DELETE FROM executions")]
    assert [d.count("'ex-") or d.count("?") for d in deletes] == [3, 3, 1]
    assert _table_counts(db_path) == dict.fromkeys(_EVERY_TABLE, 0)


def test_a_dry_run_does_not_wait_for_the_write_lock(store: SqliteStorage, db_path: Path) -> None:
    _finished(store, "ex-1", finalized_at_ms=1_000)
    policy = RetentionPolicy(0, 0, max_executions=0, max_journal_bytes=0)
    with closing(sqlite3.connect(db_path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process is writing
        try:
            assert store.prune(policy, 5_000, dry_run=True).executions == 1
        finally:
            other.execute("ROLLBACK")
    assert store.get_execution("ex-1") is not None


def test_storage_errors_of_promises_and_folds_carry_metadata_only(store: SqliteStorage) -> None:
    _finished(store, "ex-1")
    secret = b"TOP-SECRET-VALUE"
    control = JournalEntry("ex-1", 0, 7, EntryKind.CONTROL, "p", "idempotent", secret, secret, 1)
    record = PromiseRecord("p-ex-1", "ex-1", 0, 7, "p", secret, PromiseState.PENDING, secret, 1)
    with pytest.raises(StorageError) as excinfo:
        store.create_promise(control, record)
    assert "already exists" in str(excinfo.value)
    checkpoint = JournalEntry(
        "ex-1", 0, 9, EntryKind.CHECKPOINT, "c", "idempotent", secret, secret, 1, folded=5
    )
    with pytest.raises(StorageError) as fold_error:
        store.fold(checkpoint, [1])
    for error in (excinfo.value, fold_error.value):
        assert secret.decode() not in str(error)
    assert not store._conn("t").in_transaction

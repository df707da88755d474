"""Schema version 5 (no AUTOINCREMENT, a partial key index, a checkpoint index): a version 4
database migrates in place on both backends and keeps every row, seq and mark."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from unbroken import Context, Engine, Intent, Step
from unbroken.journal import EntryKind, JournalEntry, PromiseState
from unbroken.storage import postgres_schema, sqlite_connection
from unbroken.storage.base import SCHEMA_VERSION
from unbroken.storage.schema import MIGRATIONS
from unbroken.storage.sqlite import SqliteStorage
from unbroken.testing import SimulatedCrash, crash_after_step

from .conftest import (
    POSTGRES_URL,
    admin_execute,
    fresh_schema,
    needs_postgres,
    schema_url,
    sqlite_at_version,
)
from .test_contract import run_concurrently

GUARDED = Step.guarded("pay", Intent.COST_BEARING)
G = "exactly_once_guarded"


def _v4_file(db: Path) -> None:
    """A version 4 SQLite database built with the version 4 DDL, holding one execution:
    idempotent results, a guarded intent and result, a checkpoint, a control row with its
    promise and timer, an integrity mark and a key; seqs with a gap where rows were
    deleted."""
    with sqlite_at_version(db, 4) as conn:
        rows = [
            (1, 0, "result", "idempotent", b"k0", b"r0", 0),
            (2, 1, "intent", G, b"k1", None, 0),
            (3, 1, "result", G, b"k1", b"r1", 0),
            (7, 2, "checkpoint", "checkpoint", b"ck", b"c", 5),
            (9, 3, "control", "idempotent", b"k3", None, 0),
        ]
        conn.executemany(
            "INSERT INTO journal (seq, execution_id, generation, step_id, kind, name, effect, "
            "idem_key, payload, created_at, folded) VALUES (?, 'old', 0, ?, ?, 's', ?, ?, ?, "
            "1, ?)",
            rows,
        )
        conn.execute(
            "INSERT INTO promises VALUES ('p', 'old', 0, 3, 'w', x'00', 'pending', NULL, 1, NULL)"
        )
        conn.execute("INSERT INTO timers VALUES ('t', 'old', 0, 3, 50, 0, 1)")
        conn.execute("INSERT INTO integrity VALUES ('old', 7, x'0102', 1)")
        conn.execute("INSERT INTO keys VALUES (0, x'0303', 1)")
        # What AUTOINCREMENT remembers: rows up to seq 12 existed once.
        conn.execute("UPDATE sqlite_sequence SET seq = 12 WHERE name = 'journal'")


def _raw(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        return conn.execute(sql).fetchall()


def test_a_version_4_sqlite_database_migrates_in_place_and_keeps_every_row(
    tmp_path: Path,
) -> None:
    db = tmp_path / "v4.db"
    _v4_file(db)
    before = _raw(db, "SELECT * FROM journal ORDER BY seq")
    store = SqliteStorage(db)
    store.open()
    try:
        assert _raw(db, "SELECT * FROM journal ORDER BY seq") == before
        assert [(e.seq, e.kind) for e in store.read_segment("old", 0, 0, 10)] == [
            (1, EntryKind.RESULT),
            (2, EntryKind.INTENT),
            (3, EntryKind.RESULT),
            (7, EntryKind.CHECKPOINT),
            (9, EntryKind.CONTROL),
        ]
        assert [(e.seq, e.kind) for e in store.find_by_key("old", b"k1")] == [
            (2, EntryKind.INTENT),
            (3, EntryKind.RESULT),
        ]
        assert store.find_by_key("old", b"k0") == []  # not guarded: never looked up by key
        assert [e.seq for e in store.read_checkpoints("old", 0)] == [7]
        assert store.count_outcomes("old") == 7
        assert store.read_integrity("old") == (7, b"\x01\x02")
        assert store.key_verifiers() == {0: b"\x03\x03"}
        assert store.promise_states(["p"]) == {"p": PromiseState.PENDING}
        assert [t.timer_id for t in store.due_timers(100, 10)] == ["t"]
        assert store.max_seq() == 9
        added = JournalEntry("old", 0, 4, EntryKind.RESULT, "s", "idempotent", b"k4", b"r", 2)
        assert store.append([added]) == 10  # after MAX(seq) (FR-DE-12)
    finally:
        store.close()
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert _raw(db, "SELECT name FROM sqlite_sequence WHERE name = 'journal'") == []
    journal = _raw(db, "SELECT sql FROM sqlite_master WHERE name = 'journal'")[0][0]
    assert "AUTOINCREMENT" not in journal.upper()


def test_the_reads_of_a_v5_sqlite_database_use_its_partial_indexes(tmp_path: Path) -> None:
    db = tmp_path / "v5.db"
    store = SqliteStorage(db)
    store.open()
    statements: list[str] = []
    try:
        store._conn("test").set_trace_callback(statements.append)
        reads = {
            "find_by_key": (lambda: store.find_by_key("e", b"k"), ["idx_journal_idem_key"]),
            "read_checkpoints": (
                lambda: store.read_checkpoints("e", 0),
                ["idx_journal_checkpoint"],
            ),
            "count_outcomes": (
                lambda: store.count_outcomes("e"),
                ["idx_journal_outcome", "idx_journal_checkpoint"],
            ),
            "claim_queued": (
                lambda: store.claim_queued("q", 1, lambda *_: True, ["wf"]),
                ["idx_executions_queue"],
            ),
        }
        for op, (read, indexes) in reads.items():
            statements.clear()
            read()
            (sql,) = (s for s in statements if s.startswith("SELECT"))
            plan = " ".join(row[-1] for row in _raw(db, f"EXPLAIN QUERY PLAN {sql}"))
            for index in indexes:
                assert f"USING INDEX {index}" in plan, (op, plan)
            # (a claim sorts only the ties of one created_at by id: RIGHT PART OF ORDER BY)
            assert "TEMP B-TREE FOR ORDER BY" not in plan, (op, plan)
            assert "SCAN journal" not in plan, (op, plan)
            assert "SCAN executions" not in plan, (op, plan)
    finally:
        store.close()


def test_storages_opening_a_version_4_file_at_once_migrate_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Running the v5 rebuild twice would leave the same rows: count the migrations run.
    migrated: list[int] = []
    real = sqlite_connection.migration_statements

    def recorded(from_version: int) -> list[str]:
        statements = real(from_version)
        if statements:
            migrated.append(from_version)
        return statements

    monkeypatch.setattr(sqlite_connection, "migration_statements", recorded)
    for attempt in range(3):
        migrated.clear()
        db = tmp_path / f"v4-{attempt}.db"
        _v4_file(db)
        before = _raw(db, "SELECT * FROM journal ORDER BY seq")
        stores = [SqliteStorage(db) for _ in range(4)]
        try:
            run_concurrently(4, lambda i, stores=stores: stores[i].open())
            assert all(len(s.read_segment("old", 0, 0, 10)) == 5 for s in stores)
        finally:
            for store in stores:
                store.close()
        assert migrated == [4]
        assert _raw(db, "SELECT * FROM journal ORDER BY seq") == before
        assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_opening_waits_for_the_write_lock_as_long_as_a_migration_may_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "v4.db"
    _v4_file(db)
    _raw(db, "PRAGMA journal_mode = WAL")
    # Another process migrating a long journal holds the write lock longer than a write
    # ever waits for it.
    monkeypatch.setattr(sqlite_connection, "_BUSY_TIMEOUT_MS", 50)
    with closing(sqlite3.connect(db, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        store = SqliteStorage(db)
        opening = threading.Thread(target=store.open)
        opening.start()
        time.sleep(1.0)  # the opener waits for the lock meanwhile
        holder.execute("COMMIT")
        opening.join()
    try:
        assert len(store.read_segment("old", 0, 0, 10)) == 5
    finally:
        store.close()
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_a_fold_gives_its_checkpoint_a_seq_past_the_rows_it_replaces(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "j.db")
    store.open()
    try:
        store.create_execution("e", "wf", b"", 1)
        rows = [
            JournalEntry("e", 0, i, EntryKind.RESULT, "s", "idempotent", b"k%d" % i, b"v", 1)
            for i in range(3)
        ]
        last = store.append(rows)
        checkpoint = JournalEntry(
            "e", 0, 2, EntryKind.CHECKPOINT, "c", "checkpoint", b"ck", b"c", 2, folded=3
        )
        # The replaced rows are the newest in the table: their seqs are free afterwards.
        store.fold(checkpoint, [last - 2, last - 1, last])
        (kept,) = store.read_checkpoints("e", 0)
        assert kept.seq is not None and kept.seq > last
    finally:
        store.close()


# -- an engine resumes an execution journaled under version 4 -------------------------


def _sqlite_to_v4(db: Path) -> None:
    """Rebuild a current SQLite database's journal with the version 4 DDL, in place."""
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ALTER TABLE journal RENAME TO journal_new")
        conn.execute(MIGRATIONS[0][2])  # CREATE TABLE journal ... AUTOINCREMENT
        conn.execute(MIGRATIONS[1][0])  # hmac
        conn.execute(MIGRATIONS[2][0])  # folded
        conn.execute("INSERT INTO journal SELECT * FROM journal_new")
        conn.execute("DROP TABLE journal_new")
        for sql in MIGRATIONS[0][3:]:
            conn.execute(sql)
        conn.execute("DROP INDEX idx_executions_queue")
        conn.execute(MIGRATIONS[3][2])
        conn.execute("PRAGMA user_version = 4")
        conn.execute("COMMIT")


def _postgres_to_v4(schema: str) -> None:
    """Put a current PostgreSQL schema's indexes back as version 4 made them."""
    v4_key_index = postgres_schema.MIGRATIONS[0][-1]
    v4_queue_index = postgres_schema.MIGRATIONS[3][-1]
    admin_execute(
        f"SET search_path = {schema}; DROP INDEX idx_journal_checkpoint; "
        f"DROP INDEX idx_journal_idem_key; {v4_key_index}; "
        f"DROP INDEX idx_executions_queue; {v4_queue_index}; "
        "UPDATE unbroken_meta SET value = '4'"
    )


async def _crash_fold_downgrade_resume(make: Any, downgrade: Any) -> None:
    calls: Counter[int] = Counter()

    async def wf(ctx: Context) -> list[int]:
        out = []
        for i in range(48):
            if i % 7 == 3:
                out.append(await ctx.step(GUARDED, lambda i=i: calls.update([i]) or i * 2))
            else:
                out.append(await ctx.step(f"s{i}", lambda i=i: calls.update([i]) or i * 2))
            if i == 45:
                await asyncio.sleep(0.2)  # let the background fold (started at step 45) land
        return out

    engine: Engine = make()
    engine.workflow(name="wf")(wf)
    async with engine:
        with crash_after_step(engine, 46), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
    downgrade()
    engine = make()  # a restarted process with the new code, on the version 4 journal
    engine.workflow(name="wf")(wf)
    async with engine:
        result = await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert result == [i * 2 for i in range(48)]
    assert set(calls.values()) == {1} and len(calls) == 48, "a committed step ran again"
    assert info is not None
    assert Counter(s.kind for s in info.steps)[EntryKind.CHECKPOINT] == 1


async def test_an_execution_journaled_under_version_4_resumes_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "unbroken.db"
    await _crash_fold_downgrade_resume(
        lambda: Engine(f"sqlite:///{db}", max_steps_per_execution=50), lambda: _sqlite_to_v4(db)
    )
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


@needs_postgres
async def test_an_execution_journaled_under_version_4_resumes_on_postgres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import base64
    import os

    monkeypatch.setenv("UNBROKEN_KEY", base64.b64encode(os.urandom(32)).decode())
    with fresh_schema() as schema:
        url = schema_url(schema)
        await _crash_fold_downgrade_resume(
            lambda: Engine(url, max_steps_per_execution=50), lambda: _postgres_to_v4(schema)
        )
        assert admin_execute(f"SELECT value FROM {schema}.unbroken_meta") == [
            (str(SCHEMA_VERSION),)
        ]
        indexes = dict(
            admin_execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s", (schema,)
            )
        )
        assert f"WHERE (effect = '{G}'::text)" in indexes["idx_journal_idem_key"]
        assert "WHERE (kind = 'checkpoint'::text)" in indexes["idx_journal_checkpoint"]


@needs_postgres
def test_postgres_storages_opening_a_version_4_schema_at_once_migrate_it_once() -> None:
    from unbroken.storage.postgres import PostgresStorage

    meta = "CREATE TABLE unbroken_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    older = [meta, *(sql for m in postgres_schema.MIGRATIONS[:4] for sql in m)]
    with fresh_schema() as schema:
        for statement in older:
            admin_execute(f"SET search_path = {schema}; {statement}")
        admin_execute(
            f"SET search_path = {schema}; "
            "INSERT INTO unbroken_meta VALUES ('schema_version', '4'); "
            "INSERT INTO executions (execution_id, workflow, status, created_at, updated_at) "
            "VALUES ('old', 'wf', 'running', 1, 1); "
            "INSERT INTO journal (execution_id, generation, step_id, kind, name, effect, "
            f"idem_key, payload, created_at) VALUES ('old', 0, 0, 'intent', 's', '{G}', "
            f"'\\x6b'::bytea, NULL, 1), ('old', 0, 0, 'result', 's', '{G}', '\\x6b'::bytea, "
            "'\\x31'::bytea, 1)"
        )
        stores = [PostgresStorage(schema_url(schema)) for _ in range(4)]
        try:
            run_concurrently(4, lambda i: stores[i].open())
            for store in stores:
                found = store.find_by_key("old", b"k")
                assert [(e.kind, e.payload) for e in found] == [
                    (EntryKind.INTENT, None),
                    (EntryKind.RESULT, b"1"),
                ]
        finally:
            for store in stores:
                store.close()
        assert admin_execute(f"SELECT value FROM {schema}.unbroken_meta") == [
            (str(SCHEMA_VERSION),)
        ]


@needs_postgres
def test_every_read_of_a_v5_postgres_journal_can_use_its_index(
    postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statements the storage sends for its key and checkpoint reads (recorded as it
    runs them) are planned on their partial indexes."""
    import psycopg
    from psycopg import sql

    from unbroken.storage.postgres import PostgresStorage

    store = PostgresStorage(schema_url(postgres_schema))
    store.open()
    sent: list[tuple[str, str, Any]] = []
    query = store._query

    def recorded(op: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        sent.append((op, statement, params))
        return query(op, statement, params)

    monkeypatch.setattr(store, "_query", recorded)
    reads = {
        "find_by_key": (lambda: store.find_by_key("e", b"\x00"), "idx_journal_idem_key"),
        "read_checkpoints": (lambda: store.read_checkpoints("e", 0), "idx_journal_checkpoint"),
    }
    try:
        for read, _ in reads.values():
            read()
    finally:
        store.close()
    assert [op for op, _, _ in sent] == list(reads)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"SET search_path = {postgres_schema}")
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        # psycopg prepares a statement a connection runs often, and the server may then
        # plan it once for any parameters: plan it so here (a partial index whose predicate
        # only a parameter's value could imply is of no use to such a plan).
        conn.execute("SET plan_cache_mode = force_generic_plan")
        for op, statement, params in sent:
            numbered = statement.split("%s")
            prepared = numbered[0] + "".join(
                f"${n}{rest}" for n, rest in enumerate(numbered[1:], 1)
            )
            conn.execute(f"PREPARE {op} AS {prepared}")
            explain = sql.SQL("EXPLAIN EXECUTE {} ({})").format(
                sql.Identifier(op), sql.SQL(", ").join(map(sql.Literal, params))
            )
            plan = " ".join(row[0] for row in conn.execute(explain).fetchall())
            index = reads[op][1]
            assert f"using {index} on journal" in plan, (op, plan)

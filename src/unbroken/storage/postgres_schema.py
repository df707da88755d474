"""The versioned PostgreSQL schema: the SQLite schema's tables in PostgreSQL types (layer: storage).

The logical schema is the one ``storage/schema.py`` describes, version for version: the
same tables, columns, checks and indexes, with ``TEXT``, ``BYTEA`` and ``BIGINT`` columns
and a ``BIGSERIAL`` journal ``seq``. Ids are ``TEXT COLLATE "C"`` so they sort byte by
byte, as SQLite sorts them, whatever collation the database was created with.

PostgreSQL has no ``PRAGMA user_version`` or ``application_id``: the table
``unbroken_meta`` marks a schema as ours and holds its ``schema_version``. Every table lives
in the connection's current schema (the first existing schema on ``search_path``), so one
database can hold several independent journals.
"""

from __future__ import annotations

from .base import SCHEMA_VERSION

__all__ = [
    "META_TABLE",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "OUR_TABLES",
    "VERSION_KEY",
    "migration_statements",
]

MIGRATION_LOCK = 0x756E_6272_6F6B_656E
"""``pg_advisory_xact_lock`` key every migration holds: ASCII ``'unbroken'``, so processes
that open one database at the same moment migrate it one after another."""

META_TABLE = "unbroken_meta"
VERSION_KEY = "schema_version"
OUR_TABLES = (META_TABLE, "executions", "journal", "integrity", "keys", "promises", "timers")
"""Names a schema must not hold unless it is ours (checked before anything is created)."""

_META: tuple[str, ...] = (
    # What PRAGMA application_id and user_version say on SQLite.
    f"CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

_V1: tuple[str, ...] = (
    """
    CREATE TABLE executions (
        execution_id TEXT COLLATE "C" PRIMARY KEY,
        workflow     TEXT NOT NULL,
        status       TEXT NOT NULL
                     CHECK (status IN ('running','completed','failed','aborted','canceled')),
        generation   BIGINT NOT NULL DEFAULT 0,
        inputs       BYTEA,
        output       BYTEA,
        error_type   TEXT,
        error        BYTEA,
        created_at   BIGINT NOT NULL,
        updated_at   BIGINT NOT NULL,
        finalized_at BIGINT
    )
    """,
    "CREATE INDEX idx_executions_status_time ON executions (status, finalized_at)",
    """
    CREATE TABLE journal (
        seq          BIGSERIAL PRIMARY KEY,
        execution_id TEXT COLLATE "C" NOT NULL REFERENCES executions(execution_id),
        generation   BIGINT NOT NULL,
        step_id      BIGINT NOT NULL,
        kind         TEXT NOT NULL
                     CHECK (kind IN ('result','error','intent','control','checkpoint')),
        name         TEXT NOT NULL,
        effect       TEXT NOT NULL,
        idem_key     BYTEA NOT NULL,
        payload      BYTEA,
        created_at   BIGINT NOT NULL
    )
    """,
    "CREATE INDEX idx_journal_exec_step ON journal (execution_id, generation, step_id, seq)",
    # At most one committed outcome per (execution, generation, step): a database-level
    # defence behind the writer's own bookkeeping.
    """
    CREATE UNIQUE INDEX idx_journal_outcome ON journal (execution_id, generation, step_id)
    WHERE kind IN ('result','error')
    """,
    # INV-13: a guarded step's key is looked up across generations in O(log n).
    "CREATE INDEX idx_journal_idem_key ON journal (execution_id, idem_key)",
)

_V2: tuple[str, ...] = (
    # A control entry's MAC (key id ‖ keyed BLAKE3) when payloads are encrypted.
    "ALTER TABLE journal ADD COLUMN hmac BYTEA",
    # The signed high-water mark of each execution.
    """
    CREATE TABLE integrity (
        execution_id TEXT COLLATE "C" PRIMARY KEY REFERENCES executions(execution_id),
        outcomes     BIGINT NOT NULL,
        mac          BYTEA NOT NULL,
        updated_at   BIGINT NOT NULL
    )
    """,
    # Key-check values: a key that does not match the database is refused at open.
    """
    CREATE TABLE keys (
        key_id     BIGINT PRIMARY KEY,
        verifier   BYTEA NOT NULL,
        created_at BIGINT NOT NULL
    )
    """,
)

_V3: tuple[str, ...] = (
    # On a checkpoint row: how many outcome rows the fold replaced.
    "ALTER TABLE journal ADD COLUMN folded BIGINT NOT NULL DEFAULT 0",
    # Durable promises: the resolver token is stored only as its BLAKE3 hash (INV-9).
    """
    CREATE TABLE promises (
        promise_id   TEXT COLLATE "C" PRIMARY KEY,
        execution_id TEXT COLLATE "C" NOT NULL REFERENCES executions(execution_id),
        generation   BIGINT NOT NULL,
        step_id      BIGINT NOT NULL,
        name         TEXT NOT NULL,
        token_hash   BYTEA NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('pending','resolved','rejected')),
        payload      BYTEA,
        created_at   BIGINT NOT NULL,
        settled_at   BIGINT
    )
    """,
    "CREATE INDEX idx_promises_execution ON promises (execution_id)",
    # Durable timers: the absolute due time of a sleeping step.
    """
    CREATE TABLE timers (
        timer_id     TEXT COLLATE "C" PRIMARY KEY,
        execution_id TEXT COLLATE "C" NOT NULL REFERENCES executions(execution_id),
        generation   BIGINT NOT NULL,
        step_id      BIGINT NOT NULL,
        due_at       BIGINT NOT NULL,
        fired        BIGINT NOT NULL DEFAULT 0,
        created_at   BIGINT NOT NULL
    )
    """,
    "CREATE INDEX idx_timers_due ON timers (fired, due_at)",
    "CREATE INDEX idx_timers_execution ON timers (execution_id)",
)

_V4: tuple[str, ...] = (
    # Queued work: the queue an enqueued execution waits in until a worker claims it.
    "ALTER TABLE executions ADD COLUMN queue TEXT",
    # The advisory lock key of a queued execution's ownership (``postgres_locks.lock_key``),
    # so a claim can tell from pg_locks which queued executions are owned.
    "ALTER TABLE executions ADD COLUMN lock_key BIGINT",
    # A claim reads a queue's running executions oldest first.
    "CREATE INDEX idx_executions_queue ON executions (queue, status, created_at)",
)

_V5: tuple[str, ...] = (
    # SQLite's v5 rebuilds its journal without AUTOINCREMENT; a BIGSERIAL has nothing of
    # the kind to drop. The indexes change as there.
    # INV-13: only guarded steps are looked up by key, so only their rows are indexed by it.
    "DROP INDEX idx_journal_idem_key",
    """
    CREATE INDEX idx_journal_idem_key ON journal (execution_id, idem_key)
    WHERE effect = 'exactly_once_guarded'
    """,
    # A resume reads a generation's checkpoint rows without visiting its other rows.
    """
    CREATE INDEX idx_journal_checkpoint ON journal (execution_id, generation, seq)
    WHERE kind = 'checkpoint'
    """,
    # Only queued executions are looked up by queue (``queue = ?`` implies the predicate):
    # creating and finishing any other execution skips this index's page.
    "DROP INDEX idx_executions_queue",
    """
    CREATE INDEX idx_executions_queue ON executions (queue, status, created_at)
    WHERE queue IS NOT NULL
    """,
)

MIGRATIONS: list[tuple[str, ...]] = [_V1, _V2, _V3, _V4, _V5]
"""``MIGRATIONS[v - 1]`` migrates a schema from version ``v - 1`` to ``v``."""

assert len(MIGRATIONS) == SCHEMA_VERSION, "every schema version needs exactly one migration"


def migration_statements(from_version: int) -> list[str]:
    """The statements that take a schema from ``from_version`` to ``SCHEMA_VERSION``.

    The list starts by creating ``unbroken_meta`` (for a new schema) and ends by stamping
    its ``schema_version``; run it in one transaction under ``MIGRATION_LOCK`` so a crash
    leaves the schema at the old version or the new one.

    Args:
        from_version: The ``schema_version`` the schema holds now (0 for a new one).

    Returns:
        The SQL statements, in order; empty when the schema is current.
    """
    if from_version >= SCHEMA_VERSION:
        return []
    statements = list(_META) if from_version == 0 else []
    statements += [sql for migration in MIGRATIONS[from_version:] for sql in migration]
    statements.append(
        f"INSERT INTO {META_TABLE} (key, value) VALUES ('{VERSION_KEY}', '{SCHEMA_VERSION}') "
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
    )
    return statements

"""The versioned SQLite schema: one migration per version (layer: storage).

``MIGRATIONS[v - 1]`` holds the statements that take a database from version ``v - 1`` to
version ``v``; a later schema version appends a migration and bumps ``SCHEMA_VERSION`` in
``storage/base.py``. The version a database is at lives in ``PRAGMA user_version``; the
file is marked as ours with ``PRAGMA application_id``. Timestamps are Unix milliseconds.

Each journal row carries its generation, step name and effect class, so replay, the
divergence check and INV-13's key lookup never need a second table.
"""

from __future__ import annotations

from .base import SCHEMA_VERSION

__all__ = ["APPLICATION_ID", "MIGRATIONS", "migration_statements"]

APPLICATION_ID = 0x756E6272
"""``PRAGMA application_id`` of every unbroken database: ASCII ``'unbr'``."""

_V1: tuple[str, ...] = (
    """
    CREATE TABLE executions (
        execution_id TEXT PRIMARY KEY,
        workflow     TEXT NOT NULL,
        status       TEXT NOT NULL
                     CHECK (status IN ('running','completed','failed','aborted','canceled')),
        generation   INTEGER NOT NULL DEFAULT 0,
        inputs       BLOB,
        output       BLOB,
        error_type   TEXT,
        error        BLOB,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        finalized_at INTEGER
    )
    """,
    "CREATE INDEX idx_executions_status_time ON executions (status, finalized_at)",
    """
    CREATE TABLE journal (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        execution_id TEXT NOT NULL REFERENCES executions(execution_id),
        generation   INTEGER NOT NULL,
        step_id      INTEGER NOT NULL,
        kind         TEXT NOT NULL
                     CHECK (kind IN ('result','error','intent','control','checkpoint')),
        name         TEXT NOT NULL,
        effect       TEXT NOT NULL,
        idem_key     BLOB NOT NULL,
        payload      BLOB,
        created_at   INTEGER NOT NULL
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
    "ALTER TABLE journal ADD COLUMN hmac BLOB",
    # The signed high-water mark of each execution: deleted or duplicated outcome rows
    # change the count the journal holds, and the count cannot be re-signed without the key.
    """
    CREATE TABLE integrity (
        execution_id TEXT PRIMARY KEY REFERENCES executions(execution_id),
        outcomes     INTEGER NOT NULL,
        mac          BLOB NOT NULL,
        updated_at   INTEGER NOT NULL
    )
    """,
    # Key-check values: a key that does not match the database is refused at open.
    """
    CREATE TABLE keys (
        key_id     INTEGER PRIMARY KEY,
        verifier   BLOB NOT NULL,
        created_at INTEGER NOT NULL
    )
    """,
)

_V3: tuple[str, ...] = (
    # On a checkpoint row: how many outcome rows the fold replaced, so the high-water
    # mark's count of committed outcomes survives a legitimate fold.
    "ALTER TABLE journal ADD COLUMN folded INTEGER NOT NULL DEFAULT 0",
    # Durable promises: the resolver token is stored only as its BLAKE3 hash (INV-9).
    """
    CREATE TABLE promises (
        promise_id   TEXT PRIMARY KEY,
        execution_id TEXT NOT NULL REFERENCES executions(execution_id),
        generation   INTEGER NOT NULL,
        step_id      INTEGER NOT NULL,
        name         TEXT NOT NULL,
        token_hash   BLOB NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('pending','resolved','rejected')),
        payload      BLOB,
        created_at   INTEGER NOT NULL,
        settled_at   INTEGER
    )
    """,
    "CREATE INDEX idx_promises_execution ON promises (execution_id)",
    # Durable timers: the absolute due time of a sleeping step.
    """
    CREATE TABLE timers (
        timer_id     TEXT PRIMARY KEY,
        execution_id TEXT NOT NULL REFERENCES executions(execution_id),
        generation   INTEGER NOT NULL,
        step_id      INTEGER NOT NULL,
        due_at       INTEGER NOT NULL,
        fired        INTEGER NOT NULL DEFAULT 0,
        created_at   INTEGER NOT NULL
    )
    """,
    "CREATE INDEX idx_timers_due ON timers (fired, due_at)",
    "CREATE INDEX idx_timers_execution ON timers (execution_id)",
)

_V4: tuple[str, ...] = (
    # Queued work: the queue an enqueued execution waits in until a worker claims it.
    "ALTER TABLE executions ADD COLUMN queue TEXT",
    # On PostgreSQL, the advisory lock key of a queued execution's ownership, so a claim
    # can tell from pg_locks which ones are owned; NULL here, where owners hold lock files.
    "ALTER TABLE executions ADD COLUMN lock_key INTEGER",
    # A claim reads a queue's running executions oldest first.
    "CREATE INDEX idx_executions_queue ON executions (queue, status, created_at)",
)

_V5: tuple[str, ...] = (
    # Cheaper commits: the journal is rebuilt without AUTOINCREMENT, whose sqlite_sequence
    # row cost a page write per commit. A new row's seq is one past the largest in the
    # table, so seqs still grow within an execution (the only order anything reads); the
    # seqs of a pruned execution's last rows may be given again, to another execution.
    """
    CREATE TABLE journal_v5 (
        seq          INTEGER PRIMARY KEY,
        execution_id TEXT NOT NULL REFERENCES executions(execution_id),
        generation   INTEGER NOT NULL,
        step_id      INTEGER NOT NULL,
        kind         TEXT NOT NULL
                     CHECK (kind IN ('result','error','intent','control','checkpoint')),
        name         TEXT NOT NULL,
        effect       TEXT NOT NULL,
        idem_key     BLOB NOT NULL,
        payload      BLOB,
        created_at   INTEGER NOT NULL,
        hmac         BLOB,
        folded       INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    INSERT INTO journal_v5 (seq, execution_id, generation, step_id, kind, name, effect,
        idem_key, payload, created_at, hmac, folded)
    SELECT seq, execution_id, generation, step_id, kind, name, effect, idem_key, payload,
        created_at, hmac, folded FROM journal ORDER BY seq
    """,
    "DROP TABLE journal",
    "ALTER TABLE journal_v5 RENAME TO journal",
    "CREATE INDEX idx_journal_exec_step ON journal (execution_id, generation, step_id, seq)",
    """
    CREATE UNIQUE INDEX idx_journal_outcome ON journal (execution_id, generation, step_id)
    WHERE kind IN ('result','error')
    """,
    # INV-13: only guarded steps are looked up by key, so only their rows are indexed by
    # it; every other row's commit skips this index's page. A query must say
    # ``effect = 'exactly_once_guarded'`` for the planner to use it.
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
"""``MIGRATIONS[v - 1]`` migrates a database from version ``v - 1`` to ``v``."""

assert len(MIGRATIONS) == SCHEMA_VERSION, "every schema version needs exactly one migration"


def migration_statements(from_version: int) -> list[str]:
    """The statements that take a database from ``from_version`` to ``SCHEMA_VERSION``.

    The list ends by stamping ``application_id`` and ``user_version``; run it inside one
    write transaction so a crash leaves the database at the old version or the new one.

    Args:
        from_version: The ``user_version`` the database holds now (0 for a new file).

    Returns:
        The SQL statements, in order; empty when the database is current.
    """
    if from_version >= SCHEMA_VERSION:
        return []
    statements = [sql for migration in MIGRATIONS[from_version:] for sql in migration]
    statements.append(f"PRAGMA application_id = {APPLICATION_ID}")
    statements.append(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return statements

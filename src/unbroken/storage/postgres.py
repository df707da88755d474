"""PostgreSQL storage: executions, the journal, integrity marks and keys (layer: storage).

``PostgresStorage`` is the PostgreSQL backend of the ``Storage`` protocol, for many engine
processes on many machines sharing one database. It is assembled from parts named for what
they hold: ``postgres_connection`` (the pool, the schema check, transactions),
``postgres_schema`` (the tables), ``postgres_rows`` (journal inserts), ``postgres_locks``
(ownership through advisory locks), ``postgres_queue`` (queued work and
``LISTEN/NOTIFY``), ``postgres_waits`` (promises and timers) and
``postgres_retention`` (checkpoint folds and pruning); the methods here are the
executions, the journal and its integrity.

Where SQLite relies on ``BEGIN IMMEDIATE`` serialising writers, this backend relies on
single guarded statements (``UPDATE ... WHERE status = 'running'``, ``INSERT ... ON
CONFLICT``) and row locks: PostgreSQL re-checks an ``UPDATE``'s guard after waiting for a
concurrent writer, and the high-water mark is bumped by an upsert that adds to the stored
count under the row's lock, so concurrent engines never lose an outcome.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ExecutionCanceled, StorageError, UnknownExecution
from ..journal import (
    ExecutionRecord,
    ExecutionStatus,
    ExecutionSummary,
    JournalEntry,
)
from .base import WORK_TOPIC, Signer, outcomes_by_execution
from .postgres_queue import PostgresQueue, notify
from .postgres_retention import PostgresRetention
from .postgres_rows import insert_entries
from .postgres_waits import PostgresWaits
from .sql_reads import SqlReads

__all__ = ["PostgresStorage"]

_EXECUTION_COLUMNS = (
    "execution_id, workflow, status, generation, inputs, output, error_type, error, "
    "created_at, updated_at, finalized_at, queue"
)
_SELECT_EXECUTION = f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE execution_id = %s"
# Adds this batch's outcomes to the stored count under the row's lock (a concurrent
# append waits, then adds to the new count); the MAC is set by _SIGN once the count is
# known, before the transaction commits.
_BUMP_INTEGRITY = (
    "INSERT INTO integrity (execution_id, outcomes, mac, updated_at) "
    "VALUES (%s, %s, ''::bytea, %s) ON CONFLICT (execution_id) DO UPDATE SET "
    "outcomes = integrity.outcomes + EXCLUDED.outcomes, updated_at = EXCLUDED.updated_at "
    "RETURNING outcomes"
)
_SIGN = "UPDATE integrity SET mac = %s WHERE execution_id = %s"
_COUNT_SEALED = (
    "SELECT (SELECT COUNT(*) FROM journal WHERE SUBSTRING(payload FROM 1 FOR 1) = %(k)s) "
    "+ (SELECT COUNT(*) FROM journal WHERE SUBSTRING(hmac FROM 1 FOR 1) = %(k)s) "
    "+ (SELECT COUNT(*) FROM executions WHERE SUBSTRING(inputs FROM 1 FOR 1) = %(k)s) "
    "+ (SELECT COUNT(*) FROM executions WHERE SUBSTRING(output FROM 1 FOR 1) = %(k)s) "
    "+ (SELECT COUNT(*) FROM executions WHERE SUBSTRING(error FROM 1 FOR 1) = %(k)s) "
    "+ (SELECT COUNT(*) FROM integrity WHERE SUBSTRING(mac FROM 1 FOR 1) = %(k)s) "
    "+ (SELECT COUNT(*) FROM promises WHERE SUBSTRING(payload FROM 1 FOR 1) = %(k)s)"
)
_STEPS_OF_CURRENT_GENERATION = (
    "(SELECT COUNT(*) FROM journal j WHERE j.execution_id = e.execution_id "
    "AND j.generation = e.generation AND j.kind IN ('result', 'error'))"
)


class PostgresStorage(SqlReads, PostgresQueue, PostgresWaits, PostgresRetention):
    """The PostgreSQL backend of the ``Storage`` protocol: a psycopg connection pool on
    one database, tables in the connection's current schema.

    Beyond the protocol it offers ``try_lock(name)`` and ``unlock(name)``: session
    advisory locks for cross-machine ownership, released by the server when their owner's
    connection ends.

    Args:
        url: A libpq URL, ``postgresql://user:password@host:5432/dbname``; its query may
            carry libpq parameters, e.g. ``options=-csearch_path%3Dmyschema`` to keep the
            tables in ``myschema``.
        create: Whether ``open`` may create the schema in an empty one (operator tools
            pass ``False``).
        min_size: Connections the pool keeps open.
        max_size: Connections the pool opens at most.

    Raises:
        ConfigurationError: the URL is malformed or the pool sizes are inconsistent.
    """

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution unless one exists; return ``(row, created)``."""
        with self._write("create_execution") as conn:
            cursor = conn.execute(
                "INSERT INTO executions (execution_id, workflow, status, inputs, created_at, "
                "updated_at) VALUES (%s, %s, 'running', %s, %s, %s) "
                "ON CONFLICT (execution_id) DO NOTHING",
                (execution_id, workflow, inputs, now_ms, now_ms),
            )
            created = cursor.rowcount == 1
            row = conn.execute(_SELECT_EXECUTION, (execution_id,)).fetchone()
        if row is None:  # pruned between the two statements
            raise StorageError("create_execution", "the execution was deleted meanwhile")
        return _execution(row), created

    def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """The execution row, or ``None``."""
        rows = self._query("get_execution", _SELECT_EXECUTION, (execution_id,))
        return _execution(rows[0]) if rows else None

    def reopen_execution(self, execution_id: str, now_ms: int) -> ExecutionRecord:
        """Un-finalize a terminal execution (INV-16); return the row as it is now.

        Raises:
            ExecutionCanceled: the execution was canceled (INV-16').
            UnknownExecution: no such execution.
        """
        with self._write("reopen_execution") as conn:
            conn.execute(
                "UPDATE executions SET status = 'running', finalized_at = NULL, "
                "output = NULL, error_type = NULL, error = NULL, updated_at = %s "
                "WHERE execution_id = %s AND status IN ('completed', 'failed', 'aborted')",
                (now_ms, execution_id),
            )
            row = conn.execute(_SELECT_EXECUTION, (execution_id,)).fetchone()
        if row is None:
            raise UnknownExecution(execution_id)
        record = _execution(row)
        if record.status is ExecutionStatus.CANCELED:
            raise ExecutionCanceled(execution_id)
        return record

    def finalize_execution(
        self,
        execution_id: str,
        status: ExecutionStatus,
        now_ms: int,
        *,
        output: bytes | None = None,
        error_type: str | None = None,
        error: bytes | None = None,
    ) -> bool:
        """Set a terminal status while ``running``; ``False`` if another status won."""
        status = ExecutionStatus(status)
        finalized_at = now_ms if status.is_terminal else None
        with self._write("finalize_execution") as conn:
            self.fence(conn, "finalize_execution", (execution_id,))
            row = conn.execute(
                "UPDATE executions SET status = %s, output = %s, error_type = %s, error = %s, "
                "updated_at = %s, finalized_at = %s "
                "WHERE execution_id = %s AND status = 'running' RETURNING queue",
                (status.value, output, error_type, error, now_ms, finalized_at, execution_id),
            ).fetchone()
            if row is not None and row[0] is not None:
                notify(conn, WORK_TOPIC, row[0])  # a slot of the queue is free
            return row is not None

    def abort_generation(self, execution_id: str, generation: int, now_ms: int) -> int:
        """Mark ``generation`` aborted and start the next one; return the current generation.

        Guarded: if the execution already moved past ``generation`` nothing changes.

        Raises:
            UnknownExecution: no such execution.
        """
        with self._write("abort_generation") as conn:
            row = conn.execute(
                "UPDATE executions SET generation = generation + 1, updated_at = %s "
                "WHERE execution_id = %s AND generation = %s RETURNING generation",
                (now_ms, execution_id, generation),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT generation FROM executions WHERE execution_id = %s", (execution_id,)
                ).fetchone()
        if row is None:
            raise UnknownExecution(execution_id)
        return int(row[0])

    def list_executions(
        self, *, status: ExecutionStatus | None = None, limit: int = 100
    ) -> list[ExecutionSummary]:
        """Newest first, metadata only; ``steps`` counts results and errors of the current
        generation."""
        where = "" if status is None else "WHERE e.status = %s"
        params: list[Any] = [] if status is None else [ExecutionStatus(status).value]
        rows = self._query(
            "list_executions",
            f"SELECT e.execution_id, e.workflow, e.status, {_STEPS_OF_CURRENT_GENERATION}, "
            f"e.created_at, e.finalized_at FROM executions e {where} "
            "ORDER BY e.created_at DESC, e.execution_id DESC LIMIT %s",
            [*params, max(limit, 0)],
        )
        return [
            ExecutionSummary(eid, wf, ExecutionStatus(st), int(steps), created, finalized)
            for eid, wf, st, steps, created, finalized in rows
        ]

    def running_executions(self) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of every ``running`` execution that is not in a
        queue, oldest first."""
        rows = self._query(
            "running_executions",
            "SELECT execution_id, workflow FROM executions WHERE status = 'running' "
            "AND queue IS NULL ORDER BY created_at, execution_id",
        )
        return [(eid, wf) for eid, wf in rows]

    def stale_running(self, updated_before_ms: int, limit: int) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of ``running`` executions not updated since then,
        least recently updated first."""
        rows = self._query(
            "stale_running",
            "SELECT execution_id, workflow FROM executions WHERE status = 'running' "
            "AND updated_at < %s ORDER BY updated_at, execution_id LIMIT %s",
            (updated_before_ms, max(limit, 0)),
        )
        return [(eid, wf) for eid, wf in rows]

    # -- journal ----------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        """Insert entries in one transaction; return the last ``seq`` (0 if none).

        With a ``signer`` the high-water mark of every execution that gains an outcome is
        re-signed in the same transaction; executions are visited in id order, so two
        batches touching the same executions cannot deadlock.

        Raises:
            StorageError: a second result or error for one (execution, generation, step),
                an unknown execution, or a database failure; nothing was inserted.
        """
        if not entries:
            return 0
        with self._write("append") as conn:
            self.fence(conn, "append", {e.execution_id for e in entries})
            seq = insert_entries(conn, entries)
            if signer is not None:
                now = entries[-1].created_at_ms
                for eid, added in sorted(outcomes_by_execution(entries).items()):
                    row = conn.execute(_BUMP_INTEGRITY, (eid, added, now)).fetchone()
                    count = int(row[0]) if row else added
                    conn.execute(_SIGN, (signer(eid, count), eid))
        return seq

    def _select(self, op: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a shared read, its ``?`` placeholders rewritten to psycopg's ``%s``."""
        return self._query(op, sql.replace("?", "%s"), params)

    # -- integrity and keys -----------------------------------------------------------

    def add_key_verifier(self, key_id: int, verifier: bytes, now_ms: int) -> None:
        """Record a key's check value unless one is recorded for that id."""
        with self._write("add_key_verifier") as conn:
            conn.execute(
                "INSERT INTO keys (key_id, verifier, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (key_id) DO NOTHING",
                (key_id, verifier, now_ms),
            )

    def count_sealed(self, key_id: int) -> int:
        """Stored blobs and MACs whose first byte names ``key_id``."""
        rows = self._query("count_sealed", _COUNT_SEALED, {"k": bytes([key_id])})
        return int(rows[0][0])


def _execution(row: Sequence[Any]) -> ExecutionRecord:
    """An ``executions`` row (``_EXECUTION_COLUMNS`` order) as a record."""
    return ExecutionRecord(row[0], row[1], ExecutionStatus(row[2]), *row[3:])

"""PostgreSQL storage: executions, the journal, integrity marks and keys (layer: storage).

``PostgresStorage`` is the PostgreSQL backend of the ``Storage`` protocol, for many engine
processes on many machines sharing one database. It is assembled from parts named for what
they hold: ``postgres_connection`` (the writer connection and the read pool, the schema
check, transactions), ``postgres_schema`` (the tables), ``postgres_rows`` (journal inserts
and high-water marks), ``postgres_locks`` (ownership through advisory locks),
``postgres_queue`` (queued work and ``LISTEN/NOTIFY``), ``postgres_waits`` (promises and
timers) and ``postgres_retention`` (checkpoint folds and pruning); the methods here are
the executions, the journal and its integrity.

Where SQLite relies on ``BEGIN IMMEDIATE`` serialising writers, this backend relies on
single guarded statements (``UPDATE ... WHERE status = 'running'``, ``INSERT ... ON
CONFLICT``) and row locks: PostgreSQL re-checks an ``UPDATE``'s guard after waiting for a
concurrent writer, and a high-water mark is only ever replaced under its row's lock by a
count checked against the stored one (``postgres_rows``), so concurrent engines never lose
an outcome.

The hot writes are few round trips: an append is the fence and then one statement that
inserts the batch and writes its signed marks, sent with ``COMMIT``; starting an execution
is one statement; finishing one is the fence and one statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import StorageError, UnknownExecution
from ..journal import ExecutionRecord, ExecutionStatus, JournalEntry
from .base import WORK_TOPIC, Signer, outcomes_by_execution
from .postgres_queue import CHANNEL_PREFIX, PG_SELECT_EXECUTION, PostgresQueue
from .postgres_retention import PostgresRetention
from .postgres_rows import (
    Mark,
    OutcomeCounts,
    StaleMark,
    append_statement,
    bump_marks,
    last_seq,
    sign_marks,
)
from .postgres_waits import PostgresWaits
from .sql_reads import EXECUTION_COLUMNS, SqlReads, execution_from_row
from .sql_writes import (
    ABORT,
    ADD_KEY_VERIFIER,
    FINALIZE,
    GENERATION,
    REOPEN,
    finalize_params,
    pg_placeholders,
    reopened,
)

__all__ = ["PostgresStorage"]

# The new row, or none when the id exists (then it is read with PG_SELECT_EXECUTION).
_CREATE = (
    "INSERT INTO executions (execution_id, workflow, status, inputs, created_at, updated_at) "
    "VALUES (%s, %s, 'running', %s, %s, %s) "
    f"ON CONFLICT (execution_id) DO NOTHING RETURNING {EXECUTION_COLUMNS}"
)
# A row (its queue) when this call set the status; a queued execution's end frees a slot
# of its queue, which its workers hear of when the transaction commits.
_FINALIZE = (
    f"WITH ended AS ({pg_placeholders(FINALIZE)} RETURNING queue) "
    "SELECT queue, CASE WHEN queue IS NOT NULL THEN pg_notify(%s, queue)::text END FROM ended"
)
_REOPEN = pg_placeholders(REOPEN)
# The new generation, or none when another call moved it (then it is read anew).
_ABORT = f"{pg_placeholders(ABORT)} RETURNING generation"
_GENERATION = pg_placeholders(GENERATION)
_ADD_KEY_VERIFIER = pg_placeholders(ADD_KEY_VERIFIER)


class PostgresStorage(SqlReads, PostgresQueue, PostgresWaits, PostgresRetention):
    """The PostgreSQL backend of the ``Storage`` protocol: a writer connection and a
    psycopg connection pool on one database, tables in the connection's current schema.

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

    def __init__(
        self, url: str, *, create: bool = True, min_size: int = 1, max_size: int = 8
    ) -> None:
        super().__init__(url, create=create, min_size=min_size, max_size=max_size)
        self._counts = OutcomeCounts()

    def try_lock(self, name: str) -> int | None:
        """Take the ownership lock ``name`` (see ``PostgresLocks.try_lock``); an execution
        owned anew has its high-water mark read again before it is next signed."""
        holder = super().try_lock(name)
        if holder is None:
            self._counts.forget_lock(name)
        return holder

    def close(self) -> None:
        """Close every connection, releasing every lock. Idempotent."""
        super().close()
        self._counts.clear()

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution unless one exists; return ``(row, created)``."""
        op = "create_execution"
        with self._writing(op) as conn:
            params = (execution_id, workflow, inputs, now_ms, now_ms)
            row = conn.execute(_CREATE, params).fetchone()
            created = row is not None
            if row is None:  # it exists: the callers' rarer case costs a round trip more
                row = conn.execute(PG_SELECT_EXECUTION, (execution_id,)).fetchone()
        if row is None:  # pruned meanwhile
            raise StorageError(op, "the execution was deleted meanwhile")
        if created:
            self._counts.remember({execution_id: 0})  # no outcome yet, so no mark
        return execution_from_row(row), created

    def reopen_execution(self, execution_id: str, now_ms: int) -> ExecutionRecord:
        """Un-finalize a terminal execution (INV-16); return the row as it is now.

        Raises:
            ExecutionCanceled: the execution was canceled (INV-16').
            UnknownExecution: no such execution.
        """
        with self._write("reopen_execution", (execution_id,)) as conn:
            conn.execute(_REOPEN, (now_ms, execution_id))
            cursor = conn.execute(PG_SELECT_EXECUTION, (execution_id,))
        return reopened(execution_id, cursor.fetchone())

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
        values = finalize_params(execution_id, status, now_ms, output, error_type, error)
        with self._write("finalize_execution", (execution_id,), one_statement=True) as conn:
            cursor = conn.execute(_FINALIZE, (*values, CHANNEL_PREFIX + WORK_TOPIC))
        if status.is_terminal:
            self._counts.forget((execution_id,))
        return cursor.fetchone() is not None

    def abort_generation(self, execution_id: str, generation: int, now_ms: int) -> int:
        """Mark ``generation`` aborted and start the next one; return the current generation.

        Guarded: if the execution already moved past ``generation`` nothing changes.

        Raises:
            UnknownExecution: no such execution.
        """
        with self._write("abort_generation", (execution_id,)) as conn:
            row = conn.execute(_ABORT, (now_ms, execution_id, generation)).fetchone()
            if row is None:  # read anew: a concurrent abort may just have moved it
                row = conn.execute(_GENERATION, (execution_id,)).fetchone()
        if row is None:
            raise UnknownExecution(execution_id)
        return int(row[0])

    # -- journal ----------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        """Insert entries in one transaction; return the last ``seq`` (0 if none).

        With a ``signer`` the high-water mark of every execution that gains an outcome is
        re-signed in the same transaction, in execution id order, so two batches touching
        the same executions cannot deadlock. The counts this storage committed last are
        signed ahead and checked by the database; unknown or stale ones are read in the
        transaction first (a round trip more).

        Raises:
            OwnershipLost: this storage lost the lock of one of the executions.
            StorageError: a second result or error for one (execution, generation, step),
                an unknown execution, or a database failure; nothing was inserted.
        """
        if not entries:
            return 0
        added = outcomes_by_execution(entries) if signer is not None else {}
        if signer is None or not added:
            with self._write("append", _ids_of(entries), one_statement=True) as conn:
                cursor = conn.execute(*append_statement(entries))
            return last_seq(cursor)
        try:
            stored = self._counts.expected(added)
            if stored is not None:
                try:
                    return self._append_signed(entries, signer, added, stored)
                except StaleMark:
                    pass  # another writer moved a mark: read them this time
            return self._append_counted(entries, signer, added)
        except BaseException:
            self._counts.forget(added)  # the write may or may not have committed
            raise

    def _append_signed(
        self,
        entries: Sequence[JournalEntry],
        signer: Signer,
        added: Mapping[str, int],
        stored: Mapping[str, int],
    ) -> int:
        """One statement inserts the batch and writes marks signed for ``stored + added``.

        Raises:
            StaleMark: a stored count was not the one in ``stored``; nothing was written.
        """
        counts = {eid: stored[eid] + n for eid, n in added.items()}
        marks = [Mark(eid, n, signer(eid, n), stored[eid]) for eid, n in counts.items()]
        statement = append_statement(entries, marks)
        with self._write("append", _ids_of(entries), one_statement=True) as conn:
            cursor = conn.execute(*statement)
        self._counts.remember(counts)
        return last_seq(cursor)

    def _append_counted(
        self, entries: Sequence[JournalEntry], signer: Signer, added: Mapping[str, int]
    ) -> int:
        """Insert the batch, add its outcomes to the stored counts, sign what they became."""
        with self._write("append", _ids_of(entries)) as conn:
            cursor = conn.execute(*append_statement(entries))
            counts = bump_marks(conn, added, entries[-1].created_at_ms)
            sign_marks(conn, {eid: signer(eid, count) for eid, count in counts.items()})
        self._counts.remember(counts)
        return last_seq(cursor)

    def _select(self, op: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a shared read, its ``?`` placeholders rewritten to psycopg's ``%s``."""
        return self._query(op, pg_placeholders(sql), params)

    # -- integrity and keys -----------------------------------------------------------

    def add_key_verifier(self, key_id: int, verifier: bytes, now_ms: int) -> None:
        """Record a key's check value unless one is recorded for that id."""
        self._execute("add_key_verifier", _ADD_KEY_VERIFIER, (key_id, verifier, now_ms))


def _ids_of(entries: Sequence[JournalEntry]) -> list[str]:
    """The executions a batch writes for, in id order."""
    return sorted({e.execution_id for e in entries})

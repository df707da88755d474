"""SQLite storage: executions, the journal, integrity marks and keys (layer: storage).

``SqliteStorage`` is the SQLite backend of the ``Storage`` protocol, assembled from parts
named for what they hold: ``sqlite_connection`` (the file, per-thread connections,
transactions), ``sqlite_waits`` (promises and timers), ``sqlite_retention`` (checkpoint
folds and pruning); the methods here are the executions, the journal and its integrity.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from ..errors import UnknownExecution
from ..journal import ExecutionRecord, ExecutionStatus, JournalEntry
from .base import Claimant, Signer, outcomes_by_execution
from .rules import claim_in_order
from .sql_reads import SELECT_EXECUTION, SqlReads, execution_from_row
from .sql_writes import (
    ABORT,
    ADD_KEY_VERIFIER,
    FINALIZE,
    GENERATION,
    REOPEN,
    finalize_params,
    reopened,
)
from .sqlite_retention import SqliteRetention
from .sqlite_rows import insert_entries, signing
from .sqlite_waits import SqliteWaits

__all__ = ["SqliteStorage"]

_RUNNING_IN_QUEUE = (
    "SELECT execution_id, workflow FROM executions WHERE queue = ? AND status = 'running' "
    "ORDER BY created_at, execution_id"
)
# One statement re-signs a high-water mark: unbroken_hwm (sqlite_rows) signs the new count.
_BUMP_INTEGRITY = (
    "UPDATE integrity SET outcomes = outcomes + ?, mac = unbroken_hwm(execution_id, "
    "outcomes + ?), updated_at = ? WHERE execution_id = ?"
)
_INSERT_INTEGRITY = (
    "INSERT INTO integrity (execution_id, outcomes, mac, updated_at) VALUES (?, ?, ?, ?)"
)


class SqliteStorage(SqlReads, SqliteWaits, SqliteRetention):
    """The SQLite backend of the ``Storage`` protocol: one database file in WAL mode, one
    connection per thread.

    Args:
        path: The database file; created on ``open`` unless ``create`` is false.
        synchronous: ``NORMAL`` survives a process crash, ``FULL`` also a power loss.
        create: Whether ``open`` may create a missing file.
    """

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        return self._insert(execution_id, workflow, inputs, None, now_ms)

    def enqueue_execution(
        self, execution_id: str, workflow: str, inputs: bytes, queue: str, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution waiting in ``queue`` unless the id exists."""
        return self._insert(execution_id, workflow, inputs, queue, now_ms)

    def _insert(
        self, execution_id: str, workflow: str, inputs: bytes, queue: str | None, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        op = "create_execution" if queue is None else "enqueue_execution"
        with self._write(op) as conn:
            cursor = conn.execute(
                "INSERT INTO executions (execution_id, workflow, status, inputs, created_at, "
                "updated_at, queue) VALUES (?, ?, 'running', ?, ?, ?, ?) "
                "ON CONFLICT (execution_id) DO NOTHING",
                (execution_id, workflow, inputs, now_ms, now_ms, queue),
            )
            if cursor.rowcount == 1:  # the row is what was inserted: no read back
                return ExecutionRecord.created(execution_id, workflow, inputs, now_ms, queue), True
            row = conn.execute(SELECT_EXECUTION, (execution_id,)).fetchone()
        return execution_from_row(row), False

    def reopen_execution(self, execution_id: str, now_ms: int) -> ExecutionRecord:
        """Un-finalize a terminal execution (INV-16); return the row as it is now.

        Raises:
            ExecutionCanceled: the execution was canceled (INV-16').
            UnknownExecution: no such execution.
        """
        with self._write("reopen_execution") as conn:
            conn.execute(REOPEN, (now_ms, execution_id))
            row = conn.execute(SELECT_EXECUTION, (execution_id,)).fetchone()
        return reopened(execution_id, row)

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
        params = finalize_params(execution_id, status, now_ms, output, error_type, error)
        with self._write("finalize_execution") as conn:
            cursor = conn.execute(FINALIZE, params)
        return cursor.rowcount == 1

    def abort_generation(self, execution_id: str, generation: int, now_ms: int) -> int:
        """Mark ``generation`` aborted and start the next one; return the current generation.

        Guarded: if the execution already moved past ``generation`` nothing changes.

        Raises:
            UnknownExecution: no such execution.
        """
        with self._write("abort_generation") as conn:
            conn.execute(ABORT, (now_ms, execution_id, generation))
            row = conn.execute(GENERATION, (execution_id,)).fetchone()
        if row is None:
            raise UnknownExecution(execution_id)
        return int(row[0])

    def claim_queued(
        self,
        queue: str,
        limit: int,
        claimant: Claimant,
        workflows: Sequence[str],
        *,
        cap: int = 0,
    ) -> list[tuple[str, str]]:
        """Claim up to ``limit`` running executions of ``queue``, oldest first.

        Owners hold lock files, which SQL cannot see: the queue's running executions are
        offered to ``claimant`` in turn (and, with ``cap``, probed first to count the owned
        ones), inside ``BEGIN IMMEDIATE`` so claimers in every process take turns.
        """
        with self._write("claim_queued") as conn:
            running = [(eid, wf) for eid, wf in conn.execute(_RUNNING_IN_QUEUE, (queue,))]
            return claim_in_order(running, limit, claimant, workflows, cap)

    # -- journal ----------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        """Insert entries in one transaction; return the last ``seq`` (0 if none).

        With a ``signer`` the high-water mark of every execution that gains an outcome is
        re-signed in the same transaction.

        Raises:
            StorageError: a second result or error for one (execution, generation, step),
                an unknown execution, or a database failure; nothing was inserted.
        """
        if not entries:
            return 0
        with self._write("append") as conn:
            return _insert_entries(conn, entries, signer)

    def _select(self, op: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a shared read (``?`` placeholders are SQLite's own)."""
        return self._query(op, sql, params)

    # -- integrity and keys -----------------------------------------------------------

    def add_key_verifier(self, key_id: int, verifier: bytes, now_ms: int) -> None:
        """Record a key's check value unless one is recorded for that id."""
        with self._write("add_key_verifier") as conn:
            conn.execute(ADD_KEY_VERIFIER, (key_id, verifier, now_ms))


def _insert_entries(
    conn: sqlite3.Connection, entries: Sequence[JournalEntry], signer: Signer | None
) -> int:
    """Insert the rows and re-sign the high-water marks they move, inside the caller's
    transaction; return the last ``seq``."""
    seq = insert_entries(conn, entries)
    if signer is not None:
        counts = outcomes_by_execution(entries)
        if counts:
            now = entries[-1].created_at_ms
            signing.signer = signer
            try:
                for eid, added in counts.items():
                    bumped = conn.execute(_BUMP_INTEGRITY, (added, added, now, eid)).rowcount
                    if not bumped:
                        conn.execute(_INSERT_INTEGRITY, (eid, added, signer(eid, added), now))
            finally:
                signing.signer = None
    return seq

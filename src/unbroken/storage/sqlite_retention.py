"""SQLite checkpoint folds and retention: what shrinks the journal (layer: storage).

``SqliteRetention`` holds these methods of ``SqliteStorage``; the candidate choice and the
prune loop are ``sql_retention``'s, the deletions (chunked ``IN`` lists) are here.
``select_batch`` and ``delete_executions`` run inside one
``BEGIN IMMEDIATE``, so the candidates are chosen under the write lock and an execution
reopened meanwhile (status ``running``, ``finalized_at`` NULL) is never deleted. A dry run
calls ``select_batch`` with no limit inside one read snapshot and deletes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from ..journal import JournalEntry, PruneReport, RetentionPolicy
from .rules import check_checkpoint, check_folded, missing_seqs
from .sql_retention import (
    RetentionSql,
    run_prune,
)
from .sqlite_connection import SqliteConnections
from .sqlite_rows import chunks, insert_entry, marks

__all__ = [
    "SqliteRetention",
    "count_journal_rows",
    "delete_executions",
    "delete_replaced_rows",
]

RETENTION_SQL = RetentionSql.build("?", "LENGTH")
_CHILD_TABLES = ("journal", "promises", "timers", "integrity")


def count_journal_rows(conn: sqlite3.Connection, execution_ids: Sequence[str]) -> int:
    """How many journal rows the executions hold."""
    total = 0
    for chunk in chunks(execution_ids):
        sql = f"SELECT COUNT(*) FROM journal WHERE execution_id IN ({marks(len(chunk))})"
        total += int(conn.execute(sql, tuple(chunk)).fetchone()[0])
    return total


def delete_executions(conn: sqlite3.Connection, execution_ids: Sequence[str]) -> int:
    """Delete the executions with their journal rows, promises, timers and integrity rows
    (children first: foreign keys are on); return the number of journal rows deleted.

    The caller chose the ids in this same write transaction; the execution rows are still
    deleted only while terminal, as a defence.
    """
    journal_rows = 0
    for chunk in chunks(execution_ids):
        in_list = marks(len(chunk))
        params = tuple(chunk)
        for table in _CHILD_TABLES:
            cursor = conn.execute(f"DELETE FROM {table} WHERE execution_id IN ({in_list})", params)
            if table == "journal":
                journal_rows += cursor.rowcount
        conn.execute(
            f"DELETE FROM executions WHERE execution_id IN ({in_list}) AND status != 'running'",
            params,
        )
    return journal_rows


def delete_replaced_rows(conn: sqlite3.Connection, execution_id: str, seqs: Sequence[int]) -> int:
    """Delete the journal rows a fold replaces; return the outcomes they counted for.

    Outcomes are ``result`` and ``error`` rows, plus the ``folded`` count of any
    checkpoint row being re-folded, so ``count_outcomes`` stays what it was.

    Raises:
        StorageError: a seq names no journal row of ``execution_id`` (nothing is deleted
            here; the caller's transaction rolls back).
    """
    wanted = sorted(set(seqs))
    outcomes = 0
    found = 0
    for chunk in chunks(wanted):
        row = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN kind IN ('result', 'error') THEN 1 "
            "WHEN kind = 'checkpoint' THEN folded ELSE 0 END), 0) FROM journal "
            f"WHERE execution_id = ? AND seq IN ({marks(len(chunk))})",
            (execution_id, *chunk),
        ).fetchone()
        found += int(row[0])
        outcomes += int(row[1])
    if found != len(wanted):
        raise missing_seqs(len(wanted), found)
    for chunk in chunks(wanted):
        conn.execute(
            f"DELETE FROM journal WHERE execution_id = ? AND seq IN ({marks(len(chunk))})",
            (execution_id, *chunk),
        )
    return outcomes


class SqliteRetention(SqliteConnections):
    """Checkpoint folds and pruning of ``SqliteStorage``."""

    # -- checkpoint folds -------------------------------------------------------------

    def fold(self, checkpoint: JournalEntry, replaced_seqs: Sequence[int]) -> None:
        """Insert a checkpoint row and delete the rows it replaces, in one transaction.

        ``checkpoint.folded`` must equal the outcomes among the replaced rows (``result``
        and ``error`` rows, plus the ``folded`` count of a checkpoint folded again), so
        ``count_outcomes`` and the high-water mark are unchanged.

        Raises:
            ValueError: the entry is not a checkpoint.
            StorageError: ``checkpoint.folded`` does not match, or a seq names no journal
                row of the checkpoint's execution; nothing changed.
        """
        check_checkpoint(checkpoint)
        with self._write("fold") as conn:
            # Inserted first, so its seq is past the rows it replaces: seqs are not
            # AUTOINCREMENT, and a seq freed by the delete could otherwise be given again.
            insert_entry(conn, checkpoint)
            replaced = delete_replaced_rows(conn, checkpoint.execution_id, replaced_seqs)
            check_folded(checkpoint, replaced)

    # -- pruning ----------------------------------------------------------------------

    def prune(
        self,
        policy: RetentionPolicy,
        now_ms: int,
        *,
        dry_run: bool = False,
        on_pruned: Callable[[Sequence[str]], None] | None = None,
    ) -> PruneReport:
        """Delete terminal executions past their TTL, then the oldest terminal ones past
        the count and size caps, ``batch_size`` per transaction; ``running`` ones never.

        Each transaction chooses its candidates under the write lock. A dry run reads one
        snapshot, counts what a real run would delete and changes nothing. ``on_pruned``
        hears each batch's ids once it committed.
        """
        return run_prune(
            self, self._write, RETENTION_SQL, policy, now_ms, dry_run,
            delete_executions, count_journal_rows, on_pruned,
        )  # fmt: skip

"""PostgreSQL checkpoint folds and retention: what shrinks the journal (layer: storage).

Pruning chooses each batch inside the transaction that deletes it, with
``FOR UPDATE SKIP LOCKED`` on the candidate execution rows: a row another transaction is
changing (a reopen, say) is skipped, and a row changed since the statement's snapshot is
re-checked against the terminal-status condition before it is locked. The locks also keep
journal inserts for those executions out until the batch commits. An execution reopened
meanwhile is therefore never deleted, and several processes can prune at once. A dry run
reads one ``REPEATABLE READ`` snapshot, locks nothing and deletes nothing. The candidate
choice and the prune loop are ``sql_retention``'s; the deletions (arrays, ``RETURNING``)
and the fenced fold are here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..journal import JournalEntry, PruneReport, RetentionPolicy
from .postgres_locks import PostgresLocks
from .postgres_rows import Connection, append_statement
from .rules import check_checkpoint, check_folded, missing_seqs
from .sql_retention import (
    RetentionSql,
    run_prune,
)

__all__ = [
    "PostgresRetention",
    "count_journal_rows",
    "delete_executions",
    "delete_replaced_rows",
]

RETENTION_SQL = RetentionSql.build("%s", "OCTET_LENGTH", " FOR UPDATE SKIP LOCKED")
_OTHER_CHILD_TABLES = ("promises", "timers", "integrity")


def count_journal_rows(conn: Connection, execution_ids: Sequence[str]) -> int:
    """How many journal rows the executions hold."""
    row = conn.execute(
        "SELECT COUNT(*) FROM journal WHERE execution_id = ANY(%s::text[])",
        (list(execution_ids),),
    ).fetchone()
    return int(row[0]) if row else 0


def delete_executions(conn: Connection, execution_ids: Sequence[str]) -> int:
    """Delete the executions with their journal rows, promises, timers and integrity rows
    (children first, for the foreign keys); return the number of journal rows deleted.

    The caller locked the execution rows in this same transaction while they were
    terminal; the execution rows are still deleted only while terminal, as a defence.
    """
    if not execution_ids:
        return 0
    ids = list(execution_ids)
    journal = conn.execute(
        "WITH gone AS (DELETE FROM journal WHERE execution_id = ANY(%s::text[]) RETURNING 1) "
        "SELECT COUNT(*) FROM gone",
        (ids,),
    )
    for table in _OTHER_CHILD_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE execution_id = ANY(%s::text[])", (ids,))
    conn.execute(
        "DELETE FROM executions WHERE execution_id = ANY(%s::text[]) AND status != 'running'",
        (ids,),
    )
    row = journal.fetchone()
    return int(row[0]) if row else 0


def delete_replaced_rows(conn: Connection, execution_id: str, seqs: Sequence[int]) -> int:
    """Delete the journal rows a fold replaces; return the outcomes they counted for.

    Outcomes are ``result`` and ``error`` rows, plus the ``folded`` count of any
    checkpoint row being re-folded, so ``count_outcomes`` stays what it was.

    Raises:
        StorageError: a seq names no journal row of ``execution_id`` (the caller's
            transaction rolls the deletion back).
    """
    wanted = sorted(set(seqs))
    rows = conn.execute(
        "DELETE FROM journal WHERE execution_id = %s AND seq = ANY(%s::bigint[]) "
        "RETURNING kind, folded",
        (execution_id, wanted),
    ).fetchall()
    if len(rows) != len(wanted):
        raise missing_seqs(len(wanted), len(rows))
    return sum(
        1 if kind in ("result", "error") else int(folded) if kind == "checkpoint" else 0
        for kind, folded in rows
    )


class PostgresRetention(PostgresLocks):
    """Checkpoint folds and pruning of ``PostgresStorage``."""

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
        with self._write("fold", (checkpoint.execution_id,)) as conn:
            replaced = delete_replaced_rows(conn, checkpoint.execution_id, replaced_seqs)
            check_folded(checkpoint, replaced)
            conn.execute(*append_statement([checkpoint]))

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

        Each transaction locks its candidates as it chooses them. A dry run reads one
        snapshot, counts what a real run would delete and changes nothing. ``on_pruned``
        hears each batch's ids once it committed.
        """
        # On a pooled connection: pruned rows are terminal (nothing to fence), and a batch on
        # the lock session would hold it from ``try_lock`` and the heartbeat meanwhile.
        return run_prune(
            self, self._pooled_write, RETENTION_SQL, policy, now_ms, dry_run,
            delete_executions, count_journal_rows, on_pruned,
        )  # fmt: skip

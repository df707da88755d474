"""PostgreSQL checkpoint folds and retention: what shrinks the journal (layer: storage).

Pruning chooses each batch inside the transaction that deletes it, with
``FOR UPDATE SKIP LOCKED`` on the candidate execution rows: a row another transaction is
changing (a reopen, say) is skipped, and a row changed since the statement's snapshot is
re-checked against the terminal-status condition before it is locked. The locks also keep
journal inserts for those executions out until the batch commits. An execution reopened
meanwhile is therefore never deleted, and several processes can prune at once. A dry run
reads one ``REPEATABLE READ`` snapshot, locks nothing and deletes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import StorageError
from ..journal import EntryKind, JournalEntry, PruneReport, RetentionPolicy
from .postgres_locks import PostgresLocks
from .postgres_rows import Connection, append_statement
from .rules import PHASES, Phase, active_phases, count_excess, take_to_fit, ttl_cutoffs

__all__ = ["PostgresRetention", "Removed", "delete_executions", "select_batch"]

_TERMINAL = "status IN ('completed', 'failed', 'aborted', 'canceled') AND finalized_at IS NOT NULL"
_OLDEST_FIRST = "ORDER BY finalized_at, created_at, execution_id"
_TTL_CANDIDATES = (
    f"SELECT execution_id FROM executions WHERE {_TERMINAL} AND ("
    "(status = 'completed' AND finalized_at <= %s) OR "
    "(status IN ('failed', 'aborted', 'canceled') AND finalized_at <= %s)) "
    f"{_OLDEST_FIRST} LIMIT %s"
)
_CAP_CANDIDATES = f"SELECT execution_id FROM executions WHERE {_TERMINAL} {_OLDEST_FIRST} LIMIT %s"
_LOCKED = " FOR UPDATE SKIP LOCKED"
_EXECUTION_BYTES = (
    "SELECT COALESCE(OCTET_LENGTH(inputs), 0) + COALESCE(OCTET_LENGTH(output), 0) "
    "+ COALESCE(OCTET_LENGTH(error), 0) "
    "+ (SELECT COALESCE(SUM(OCTET_LENGTH(payload)), 0) FROM journal WHERE execution_id = %(e)s) "
    "+ (SELECT COALESCE(SUM(OCTET_LENGTH(payload)), 0) FROM promises WHERE execution_id = %(e)s) "
    "FROM executions WHERE execution_id = %(e)s"
)
_TOTAL_BYTES = (
    "SELECT (SELECT COALESCE(SUM(OCTET_LENGTH(payload)), 0) FROM journal) "
    "+ (SELECT COALESCE(SUM(COALESCE(OCTET_LENGTH(inputs), 0) + COALESCE(OCTET_LENGTH(output), 0) "
    "+ COALESCE(OCTET_LENGTH(error), 0)), 0) FROM executions) "
    "+ (SELECT COALESCE(SUM(OCTET_LENGTH(payload)), 0) FROM promises)"
)
_OTHER_CHILD_TABLES = ("promises", "timers", "integrity")
_UNLIMITED = 1 << 62
_MIN_INT64 = -(1 << 63)


@dataclass(slots=True)
class Removed:
    """What a dry run has already counted as gone: later rules see the rest only."""

    ids: set[str] = field(default_factory=set)
    bytes: int = 0


def select_batch(
    conn: Connection,
    phase: Phase,
    policy: RetentionPolicy,
    now_ms: int,
    limit: int,
    removed: Removed | None = None,
) -> list[str]:
    """The ids of at most ``limit`` terminal executions the rule ``phase`` removes next.

    Without ``removed`` the candidates are locked (``FOR UPDATE SKIP LOCKED``) for the
    caller's transaction. ``removed`` (dry runs) lists executions already counted as
    gone: they are skipped and no longer count towards the caps; nothing is locked.
    Oldest first (``finalized_at``, then ``created_at``).
    """
    gone = removed or Removed()
    lock = "" if removed is not None else _LOCKED
    # Enough rows that ``limit`` remain once the ones already gone are skipped.
    fetch = min(limit + len(gone.ids), _UNLIMITED)
    if phase == "ttl":
        # saturate: a TTL of centuries must not leave the 64-bit range
        cutoffs = [max(c, _MIN_INT64) for c in ttl_cutoffs(policy, now_ms)]
        rows = conn.execute(_TTL_CANDIDATES + lock, (*cutoffs, fetch)).fetchall()
        return _fresh(rows, gone)[:limit]
    if phase == "count":
        if policy.max_executions <= 0:
            return []
        counted = conn.execute("SELECT COUNT(*) FROM executions").fetchone()
        excess = count_excess(policy, (int(counted[0]) if counted else 0) - len(gone.ids))
        if excess <= 0:
            return []
        fetch = min(min(excess, limit) + len(gone.ids), _UNLIMITED)
        rows = conn.execute(_CAP_CANDIDATES + lock, (fetch,)).fetchall()
        return _fresh(rows, gone)[: min(excess, limit)]
    if policy.max_journal_bytes <= 0:
        return []
    total_row = conn.execute(_TOTAL_BYTES).fetchone()
    total = (int(total_row[0]) if total_row else 0) - gone.bytes
    if total <= policy.max_journal_bytes:
        return []
    rows = conn.execute(_CAP_CANDIDATES + lock, (fetch,)).fetchall()
    return take_to_fit(_fresh(rows, gone), total, policy, limit, lambda e: execution_bytes(conn, e))


def _fresh(rows: Sequence[tuple[str, ...]], gone: Removed) -> list[str]:
    """The ids of ``rows`` that are not already gone, in order."""
    return [row[0] for row in rows if row[0] not in gone.ids]


def execution_bytes(conn: Connection, execution_id: str) -> int:
    """The payload bytes stored for one execution: its inputs, output and error, its
    journal payloads and its promise payloads."""
    row = conn.execute(_EXECUTION_BYTES, {"e": execution_id}).fetchone()
    return int(row[0]) if row else 0


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
        raise StorageError(
            "fold",
            f"{len(wanted) - len(rows)} of {len(wanted)} replaced seqs name no journal row "
            "of this execution",
        )
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
        if EntryKind(checkpoint.kind) is not EntryKind.CHECKPOINT:
            raise ValueError("fold needs an entry of kind checkpoint")
        with self._write("fold") as conn:
            self.fence(conn, "fold", (checkpoint.execution_id,))
            replaced = delete_replaced_rows(conn, checkpoint.execution_id, replaced_seqs)
            if replaced != checkpoint.folded:
                raise StorageError(
                    "fold",
                    f"the checkpoint folds {checkpoint.folded} outcomes but the replaced rows "
                    f"hold {replaced}",
                )
            conn.execute(*append_statement([checkpoint]))

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        return self._entries(
            "read_checkpoints",
            "execution_id = %s AND generation = %s AND kind = 'checkpoint' ORDER BY seq",
            (execution_id, generation),
        )

    # -- pruning ----------------------------------------------------------------------

    def prune(self, policy: RetentionPolicy, now_ms: int, *, dry_run: bool = False) -> PruneReport:
        """Delete terminal executions past their TTL, then the oldest terminal ones past
        the count and size caps, ``batch_size`` per transaction; ``running`` ones never.

        Each transaction locks its candidates as it chooses them. A dry run reads one
        snapshot, counts what a real run would delete and changes nothing.
        """
        counts = dict.fromkeys(PHASES, 0)
        journal_rows = 0
        if dry_run:
            removed = Removed()
            with self._snapshot("prune") as conn:
                for phase in PHASES:
                    ids = select_batch(conn, phase, policy, now_ms, _UNLIMITED, removed)
                    counts[phase] = len(ids)
                    journal_rows += count_journal_rows(conn, ids)
                    removed.ids.update(ids)
                    if policy.max_journal_bytes > 0:
                        removed.bytes += sum(execution_bytes(conn, i) for i in ids)
        else:
            batch = max(policy.batch_size, 1)
            for phase in active_phases(policy):
                while True:
                    with self._write("prune") as conn:
                        ids = select_batch(conn, phase, policy, now_ms, batch)
                        journal_rows += delete_executions(conn, ids)
                    counts[phase] += len(ids)
                    if len(ids) < batch:
                        break
        return PruneReport(
            sum(counts.values()), journal_rows, counts["ttl"], counts["count"], counts["size"]
        )

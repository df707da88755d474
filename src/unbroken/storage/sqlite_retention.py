"""SQLite checkpoint folds and retention: what shrinks the journal (layer: storage).

``SqliteRetention`` holds these methods of ``SqliteStorage``; the retention SQL is in
functions taking a connection. ``select_batch`` and ``delete_executions`` run inside one
``BEGIN IMMEDIATE``, so the candidates are chosen under the write lock and an execution
reopened meanwhile (status ``running``, ``finalized_at`` NULL) is never deleted. A dry run
calls ``select_batch`` with no limit inside one read snapshot and deletes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import StorageError
from ..journal import EntryKind, JournalEntry, PruneReport, RetentionPolicy
from .rules import PHASES, Phase, active_phases, count_excess, take_to_fit, ttl_cutoffs
from .sqlite_connection import SqliteConnections
from .sqlite_rows import chunks, insert_entry, marks

__all__ = [
    "Removed",
    "SqliteRetention",
    "count_journal_rows",
    "delete_executions",
    "delete_replaced_rows",
    "execution_bytes",
    "select_batch",
]

_TERMINAL = "status IN ('completed', 'failed', 'aborted', 'canceled') AND finalized_at IS NOT NULL"
_OLDEST_FIRST = "ORDER BY finalized_at, created_at, execution_id"
_TTL_CANDIDATES = (
    f"SELECT execution_id FROM executions WHERE {_TERMINAL} AND ("
    "(status = 'completed' AND finalized_at <= ?) OR "
    "(status IN ('failed', 'aborted', 'canceled') AND finalized_at <= ?)) "
    f"{_OLDEST_FIRST}"
)
_CAP_CANDIDATES = f"SELECT execution_id FROM executions WHERE {_TERMINAL} {_OLDEST_FIRST}"
_EXECUTION_BYTES = (
    "SELECT COALESCE(LENGTH(inputs), 0) + COALESCE(LENGTH(output), 0) "
    "+ COALESCE(LENGTH(error), 0) "
    "+ (SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM journal WHERE execution_id = :e) "
    "+ (SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM promises WHERE execution_id = :e) "
    "FROM executions WHERE execution_id = :e"
)
_TOTAL_BYTES = (
    "SELECT (SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM journal) "
    "+ (SELECT COALESCE(SUM(COALESCE(LENGTH(inputs), 0) + COALESCE(LENGTH(output), 0) "
    "+ COALESCE(LENGTH(error), 0)), 0) FROM executions) "
    "+ (SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM promises)"
)
_CHILD_TABLES = ("journal", "promises", "timers", "integrity")
_UNLIMITED = 1 << 62
_MIN_INT64 = -(1 << 63)


@dataclass(slots=True)
class Removed:
    """What a dry run has already counted as gone: later rules see the rest only."""

    ids: set[str] = field(default_factory=set)
    bytes: int = 0


def select_batch(
    conn: sqlite3.Connection,
    phase: Phase,
    policy: RetentionPolicy,
    now_ms: int,
    limit: int,
    removed: Removed | None = None,
) -> list[str]:
    """The ids of at most ``limit`` terminal executions the rule ``phase`` removes next.

    ``removed`` (dry runs) lists executions already counted as gone: they are skipped and
    no longer count towards the caps. Oldest first (``finalized_at``, then ``created_at``).
    """
    gone = removed or Removed()
    if phase == "ttl":
        # saturate: a TTL of centuries must not overflow SQLite's 64-bit integers
        cutoffs = [max(c, _MIN_INT64) for c in ttl_cutoffs(policy, now_ms)]
        return _take(conn.execute(_TTL_CANDIDATES, cutoffs), gone, limit)
    if phase == "count":
        if policy.max_executions <= 0:
            return []
        total = conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0] - len(gone.ids)
        excess = count_excess(policy, total)
        if excess <= 0:
            return []
        return _take(conn.execute(_CAP_CANDIDATES), gone, min(excess, limit))
    if policy.max_journal_bytes <= 0:
        return []
    return _take_to_fit(conn, policy, limit, gone)


def _take(cursor: sqlite3.Cursor, gone: Removed, limit: int) -> list[str]:
    """The first ``limit`` ids the cursor yields that are not already gone."""
    chosen: list[str] = []
    try:
        for (execution_id,) in cursor:
            if len(chosen) >= limit:
                break
            if execution_id not in gone.ids:
                chosen.append(execution_id)
    finally:
        cursor.close()
    return chosen


def _take_to_fit(
    conn: sqlite3.Connection, policy: RetentionPolicy, limit: int, gone: Removed
) -> list[str]:
    """The oldest terminal ids (at most ``limit``, none already gone) whose removal brings
    the stored payload bytes down to the size cap."""
    total = conn.execute(_TOTAL_BYTES).fetchone()[0] - gone.bytes
    cursor = conn.execute(_CAP_CANDIDATES)
    try:
        candidates = (eid for (eid,) in cursor if eid not in gone.ids)
        return take_to_fit(candidates, total, policy, limit, lambda e: execution_bytes(conn, e))
    finally:
        cursor.close()


def execution_bytes(conn: sqlite3.Connection, execution_id: str) -> int:
    """The payload bytes stored for one execution: its inputs, output and error, its
    journal payloads and its promise payloads."""
    row = conn.execute(_EXECUTION_BYTES, {"e": execution_id}).fetchone()
    return int(row[0]) if row else 0


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
        raise StorageError(
            "fold",
            f"{len(wanted) - found} of {len(wanted)} replaced seqs name no journal row "
            "of this execution",
        )
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
        if EntryKind(checkpoint.kind) is not EntryKind.CHECKPOINT:
            raise ValueError("fold needs an entry of kind checkpoint")
        with self._write("fold") as conn:
            # Inserted first, so its seq is past the rows it replaces: seqs are not
            # AUTOINCREMENT, and a seq freed by the delete could otherwise be given again.
            insert_entry(conn, checkpoint)
            replaced = delete_replaced_rows(conn, checkpoint.execution_id, replaced_seqs)
            if replaced != checkpoint.folded:
                raise StorageError(
                    "fold",
                    f"the checkpoint folds {checkpoint.folded} outcomes but the replaced rows "
                    f"hold {replaced}",
                )

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        return self._entries(
            "read_checkpoints",
            "execution_id = ? AND generation = ? AND kind = 'checkpoint' ORDER BY seq",
            (execution_id, generation),
        )

    # -- pruning ----------------------------------------------------------------------

    def prune(self, policy: RetentionPolicy, now_ms: int, *, dry_run: bool = False) -> PruneReport:
        """Delete terminal executions past their TTL, then the oldest terminal ones past
        the count and size caps, ``batch_size`` per transaction; ``running`` ones never.

        Each transaction chooses its candidates under the write lock. A dry run reads one
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

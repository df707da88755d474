"""Schema v3 on SQLite: promises, timers, checkpoint folds and retention (layer: storage).

``SqliteV3Methods`` holds these methods of ``SqliteStorage`` (which owns the connections,
the transactions and the journal row encoding); the retention SQL is in functions taking a
connection. ``select_batch`` and ``delete_executions`` run inside one ``BEGIN IMMEDIATE``,
so the candidates are chosen under the write lock and an execution reopened meanwhile
(status ``running``, ``finalized_at`` NULL) is never deleted. A dry run calls
``select_batch`` with no limit inside one read snapshot and deletes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import StorageError
from ..journal import (
    EntryKind,
    JournalEntry,
    PromiseRecord,
    PromiseState,
    PruneReport,
    RetentionPolicy,
    TimerRecord,
)

__all__ = [
    "PHASES",
    "Phase",
    "Removed",
    "SqliteV3Methods",
    "active_phases",
    "check_control",
    "chunks",
    "count_journal_rows",
    "delete_executions",
    "delete_replaced_rows",
    "execution_bytes",
    "select_batch",
    "settled_state",
]

Phase = Literal["ttl", "count", "size"]
PHASES: tuple[Phase, ...] = ("ttl", "count", "size")
"""The order pruning applies its rules in: TTL first, then the count cap, then the size."""

CHUNK = 500
"""Ids per ``IN (...)`` list: far below SQLite's limit on bound parameters."""

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
_PROMISE_COLUMNS = (
    "promise_id, execution_id, generation, step_id, name, token_hash, state, payload, "
    "created_at, settled_at"
)
_TIMER_COLUMNS = "timer_id, execution_id, generation, step_id, due_at, fired, created_at"
_UNLIMITED = 1 << 62
_MIN_INT64 = -(1 << 63)


@dataclass(slots=True)
class Removed:
    """What a dry run has already counted as gone: later rules see the rest only."""

    ids: set[str] = field(default_factory=set)
    bytes: int = 0


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


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
        cutoffs = (now_ms - policy.ttl_completed_ms, now_ms - policy.ttl_failed_ms)
        # saturate: a TTL of centuries must not overflow SQLite's 64-bit integers
        cursor = conn.execute(_TTL_CANDIDATES, [max(c, _MIN_INT64) for c in cutoffs])
        return _take(cursor, gone, limit)
    if phase == "count":
        if policy.max_executions <= 0:
            return []
        total = conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0] - len(gone.ids)
        excess = total - policy.max_executions
        if excess <= 0:
            return []
        return _take(conn.execute(_CAP_CANDIDATES), gone, min(excess, limit))
    if policy.max_journal_bytes <= 0:
        return []
    total = conn.execute(_TOTAL_BYTES).fetchone()[0] - gone.bytes
    chosen: list[str] = []
    cursor = conn.execute(_CAP_CANDIDATES)
    try:
        for (execution_id,) in cursor:
            if total <= policy.max_journal_bytes or len(chosen) >= limit:
                break
            if execution_id in gone.ids:
                continue
            chosen.append(execution_id)
            total -= execution_bytes(conn, execution_id)
    finally:
        cursor.close()
    return chosen


def active_phases(policy: RetentionPolicy) -> list[Phase]:
    """The rules a policy turns on: the TTL always, each cap unless it is zero."""
    caps = {"count": policy.max_executions, "size": policy.max_journal_bytes}
    return [phase for phase in PHASES if caps.get(phase, 1) > 0]


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


def execution_bytes(conn: sqlite3.Connection, execution_id: str) -> int:
    """The payload bytes stored for one execution: its inputs, output and error, its
    journal payloads and its promise payloads."""
    row = conn.execute(_EXECUTION_BYTES, {"e": execution_id}).fetchone()
    return int(row[0]) if row else 0


def count_journal_rows(conn: sqlite3.Connection, execution_ids: Sequence[str]) -> int:
    """How many journal rows the executions hold."""
    total = 0
    for chunk in chunks(execution_ids):
        sql = f"SELECT COUNT(*) FROM journal WHERE execution_id IN ({_marks(len(chunk))})"
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
        marks = _marks(len(chunk))
        params = tuple(chunk)
        for table in _CHILD_TABLES:
            cursor = conn.execute(f"DELETE FROM {table} WHERE execution_id IN ({marks})", params)
            if table == "journal":
                journal_rows += cursor.rowcount
        conn.execute(
            f"DELETE FROM executions WHERE execution_id IN ({marks}) AND status != 'running'",
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
            f"WHERE execution_id = ? AND seq IN ({_marks(len(chunk))})",
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
            f"DELETE FROM journal WHERE execution_id = ? AND seq IN ({_marks(len(chunk))})",
            (execution_id, *chunk),
        )
    return outcomes


class SqliteV3Methods:
    """Promises, timers, checkpoint folds and retention of ``SqliteStorage``.

    The first methods are hooks ``SqliteStorage`` provides.
    """

    def _write(self, op: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _snapshot(self, op: str) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _query(self, op: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        raise NotImplementedError

    def _entries(self, op: str, where: str, params: Sequence[Any]) -> list[JournalEntry]:
        raise NotImplementedError

    def _insert_entry(self, conn: sqlite3.Connection, entry: JournalEntry) -> None:
        raise NotImplementedError

    # -- promises and timers ----------------------------------------------------------

    def _insert_control(
        self, op: str, entry: JournalEntry, table: Literal["promises", "timers"], row: Sequence[Any]
    ) -> None:
        """A control row and its promise or timer row (``row[0]`` is its id), in one
        transaction.

        Raises:
            StorageError: the promise or timer id exists, or a control row already holds
                the step; nothing was inserted.
        """
        noun, columns = (
            ("promise", _PROMISE_COLUMNS) if table == "promises" else ("timer", _TIMER_COLUMNS)
        )
        with self._write(op) as conn:
            if conn.execute(f"SELECT 1 FROM {table} WHERE {noun}_id = ?", (row[0],)).fetchone():
                raise StorageError(op, f"a {noun} with this id already exists")
            if conn.execute(
                "SELECT 1 FROM journal WHERE execution_id = ? AND generation = ? AND step_id = ? "
                "AND kind = 'control' LIMIT 1",
                (entry.execution_id, entry.generation, entry.step_id),
            ).fetchone():
                raise StorageError(op, "a control row already holds this step")
            self._insert_entry(conn, entry)
            conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({_marks(len(row))})", row)

    def create_promise(self, entry: JournalEntry, promise: PromiseRecord) -> None:
        """Insert a promise's control row and its promise row in one transaction.

        Raises:
            ValueError: ``entry`` is not a control row of the promise's execution.
            StorageError: the promise id or the control row's slot already exists, or the
                execution does not; nothing was inserted.
        """
        check_control(entry, promise.execution_id)
        p = promise
        head = (p.promise_id, p.execution_id, p.generation, p.step_id, p.name, p.token_hash)
        row = (*head, PromiseState(p.state).value, p.payload, p.created_at_ms, p.settled_at_ms)
        self._insert_control("create_promise", entry, "promises", row)

    def get_promise(self, promise_id: str) -> PromiseRecord | None:
        """The promise row, or ``None``."""
        rows = self._query(
            "get_promise",
            f"SELECT {_PROMISE_COLUMNS} FROM promises WHERE promise_id = ?",
            (promise_id,),
        )
        if not rows:
            return None
        pid, eid, generation, step_id, name, token_hash, state, payload, created, settled = rows[0]
        return PromiseRecord(
            pid,
            eid,
            generation,
            step_id,
            name,
            token_hash,
            PromiseState(state),
            payload,
            created,
            settled,
        )

    def settle_promise(
        self, promise_id: str, state: PromiseState, payload: bytes | None, now_ms: int
    ) -> bool:
        """Resolve or reject a ``pending`` promise; ``False`` if it was not pending.

        Raises:
            ValueError: ``state`` is ``pending``.
        """
        settled = settled_state(state)
        with self._write("settle_promise") as conn:
            cursor = conn.execute(
                "UPDATE promises SET state = ?, payload = ?, settled_at = ? "
                "WHERE promise_id = ? AND state = 'pending'",
                (settled.value, payload, now_ms, promise_id),
            )
        return cursor.rowcount == 1

    def promise_states(self, promise_ids: Sequence[str]) -> dict[str, PromiseState]:
        """The state of each promise that exists (one query per 500 ids)."""
        states: dict[str, PromiseState] = {}
        for chunk in chunks(list(dict.fromkeys(promise_ids))):
            marks = _marks(len(chunk))
            sql = f"SELECT promise_id, state FROM promises WHERE promise_id IN ({marks})"
            for promise_id, state in self._query("promise_states", sql, chunk):
                states[promise_id] = PromiseState(state)
        return states

    def arm_timer(self, entry: JournalEntry, timer: TimerRecord) -> None:
        """Insert a timer's control row and its timer row in one transaction.

        Raises:
            ValueError: ``entry`` is not a control row of the timer's execution.
            StorageError: the timer id or the control row's slot already exists, or the
                execution does not; nothing was inserted.
        """
        check_control(entry, timer.execution_id)
        t = timer
        head = (t.timer_id, t.execution_id, t.generation, t.step_id, t.due_at_ms)
        self._insert_control("arm_timer", entry, "timers", (*head, int(t.fired), t.created_at_ms))

    def fire_timer(self, timer_id: str, now_ms: int) -> bool:
        """Mark a timer fired; ``False`` if it was already fired or is unknown."""
        with self._write("fire_timer") as conn:
            cursor = conn.execute(
                "UPDATE timers SET fired = 1 WHERE timer_id = ? AND fired = 0", (timer_id,)
            )
        return cursor.rowcount == 1

    def due_timers(self, now_ms: int, limit: int) -> list[TimerRecord]:
        """Unfired timers due at or before ``now_ms``, earliest first."""
        rows = self._query(
            "due_timers",
            f"SELECT {_TIMER_COLUMNS} FROM timers WHERE fired = 0 AND due_at <= ? "
            "ORDER BY due_at, timer_id LIMIT ?",
            (now_ms, max(limit, 0)),
        )
        return [
            TimerRecord(tid, eid, generation, step_id, due_at, bool(fired), created)
            for tid, eid, generation, step_id, due_at, fired, created in rows
        ]

    # -- folding and retention --------------------------------------------------------

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
            replaced = delete_replaced_rows(conn, checkpoint.execution_id, replaced_seqs)
            if replaced != checkpoint.folded:
                raise StorageError(
                    "fold",
                    f"the checkpoint folds {checkpoint.folded} outcomes but the replaced rows "
                    f"hold {replaced}",
                )
            self._insert_entry(conn, checkpoint)

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        return self._entries(
            "read_checkpoints",
            "execution_id = ? AND generation = ? AND kind = 'checkpoint' ORDER BY seq",
            (execution_id, generation),
        )

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

    def stale_running(self, updated_before_ms: int, limit: int) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of ``running`` executions not updated since then,
        least recently updated first."""
        rows = self._query(
            "stale_running",
            "SELECT execution_id, workflow FROM executions WHERE status = 'running' "
            "AND updated_at < ? ORDER BY updated_at, execution_id LIMIT ?",
            (updated_before_ms, max(limit, 0)),
        )
        return [(eid, wf) for eid, wf in rows]


def check_control(entry: JournalEntry, execution_id: str) -> None:
    """Refuse a promise's or timer's journal row that is not its control row."""
    if EntryKind(entry.kind) is not EntryKind.CONTROL or entry.execution_id != execution_id:
        raise ValueError("the journal entry must be a control row of the same execution")


def settled_state(state: PromiseState) -> PromiseState:
    """``state`` as a member; ``ValueError`` unless it is resolved or rejected."""
    settled = PromiseState(state)
    if settled is PromiseState.PENDING:
        raise ValueError("a promise is settled as resolved or rejected, not pending")
    return settled

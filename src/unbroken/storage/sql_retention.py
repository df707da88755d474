"""Retention SQL and the prune loop shared by the SQL backends (layer: storage).

Which terminal executions a rule removes next, how many bytes they hold, and the loop
that runs the rules batch by batch are the same on SQLite and PostgreSQL: they are
written once here, with the SQL built per dialect (placeholder, byte-length function, the
locking clause that keeps chosen rows for the deleting transaction). How rows are
deleted (chunked ``IN`` lists or arrays), how a batch's transaction is opened and how a
fold is fenced stay per backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..journal import PruneReport, RetentionPolicy
from .rules import (
    PHASES,
    Phase,
    active_phases,
    count_excess,
    take_to_fit,
    tell_pruned,
    ttl_cutoffs,
)

__all__ = [
    "UNLIMITED",
    "Removed",
    "RetentionSql",
    "execution_bytes",
    "run_prune",
    "select_batch",
]

UNLIMITED = 1 << 62
_MIN_INT64 = -(1 << 63)
_TERMINAL = "status IN ('completed', 'failed', 'aborted', 'canceled') AND finalized_at IS NOT NULL"
_OLDEST_FIRST = "ORDER BY finalized_at, created_at, execution_id"


class _Cursor(Protocol):
    def fetchone(self) -> Any: ...

    def close(self) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...


class _Connection(Protocol):
    def execute(self, sql: Any, params: Any = ..., /) -> _Cursor: ...


@dataclass(frozen=True, slots=True)
class RetentionSql:
    """The retention statements in one dialect, built once per backend."""

    ttl_candidates: str
    cap_candidates: str
    execution_bytes: str
    total_bytes: str
    lock: str

    @classmethod
    def build(cls, mark: str, length: str, lock: str = "") -> RetentionSql:
        """``mark`` is the placeholder (``?`` or ``%s``), ``length`` the byte-length
        function, ``lock`` what follows a candidate query that must lock its rows."""

        def size(column: str) -> str:
            return f"COALESCE({length}({column}), 0)"

        row = f"{size('inputs')} + {size('output')} + {size('error')}"
        return cls(
            ttl_candidates=(
                f"SELECT execution_id FROM executions WHERE {_TERMINAL} AND ("
                f"(status = 'completed' AND finalized_at <= {mark}) OR "
                f"(status IN ('failed', 'aborted', 'canceled') AND finalized_at <= {mark})) "
                f"{_OLDEST_FIRST} LIMIT {mark}"
            ),
            cap_candidates=(
                f"SELECT execution_id FROM executions WHERE {_TERMINAL} {_OLDEST_FIRST} "
                f"LIMIT {mark}"
            ),
            execution_bytes=(
                f"SELECT {row} "
                f"+ (SELECT COALESCE(SUM({length}(payload)), 0) FROM journal "
                f"WHERE execution_id = {mark}) "
                f"+ (SELECT COALESCE(SUM({length}(payload)), 0) FROM promises "
                f"WHERE execution_id = {mark}) "
                f"FROM executions WHERE execution_id = {mark}"
            ),
            total_bytes=(
                f"SELECT (SELECT COALESCE(SUM({length}(payload)), 0) FROM journal) "
                f"+ (SELECT COALESCE(SUM({row}), 0) FROM executions) "
                f"+ (SELECT COALESCE(SUM({length}(payload)), 0) FROM promises)"
            ),
            lock=lock,
        )


@dataclass(slots=True)
class Removed:
    """What a dry run has already counted as gone: later rules see the rest only."""

    ids: set[str] = field(default_factory=set)
    bytes: int = 0


def select_batch(
    conn: _Connection,
    sql: RetentionSql,
    phase: Phase,
    policy: RetentionPolicy,
    now_ms: int,
    limit: int,
    removed: Removed | None = None,
) -> list[str]:
    """The ids of at most ``limit`` terminal executions the rule ``phase`` removes next.

    Without ``removed`` the candidates are locked with ``sql.lock`` for the caller's
    transaction. ``removed`` (dry runs) lists executions already counted as gone: they
    are skipped and no longer count towards the caps; nothing is locked. Oldest first
    (``finalized_at``, then ``created_at``).
    """
    gone = removed or Removed()
    lock = "" if removed is not None else sql.lock
    if phase == "ttl":
        # saturate: a TTL of centuries must not leave the 64-bit range
        cutoffs = [max(c, _MIN_INT64) for c in ttl_cutoffs(policy, now_ms)]
        cursor = conn.execute(sql.ttl_candidates + lock, (*cutoffs, _fetch(limit, gone)))
        return _take_fresh(cursor, gone, limit)
    if phase == "count":
        if policy.max_executions <= 0:
            return []
        counted = conn.execute("SELECT COUNT(*) FROM executions").fetchone()
        excess = count_excess(policy, (int(counted[0]) if counted else 0) - len(gone.ids))
        if excess <= 0:
            return []
        take = min(excess, limit)
        cursor = conn.execute(sql.cap_candidates + lock, (_fetch(take, gone),))
        return _take_fresh(cursor, gone, take)
    if policy.max_journal_bytes <= 0:
        return []
    total_row = conn.execute(sql.total_bytes).fetchone()
    total = (int(total_row[0]) if total_row else 0) - gone.bytes
    if total <= policy.max_journal_bytes:
        return []
    cursor = conn.execute(sql.cap_candidates + lock, (_fetch(limit, gone),))
    try:
        fresh = (eid for (eid,) in cursor if eid not in gone.ids)
        return take_to_fit(fresh, total, policy, limit, lambda e: execution_bytes(conn, sql, e))
    finally:
        cursor.close()


def _fetch(limit: int, gone: Removed) -> int:
    """Enough rows that ``limit`` remain once the ones already gone are skipped."""
    return min(limit + len(gone.ids), UNLIMITED)


def _take_fresh(cursor: _Cursor, gone: Removed, limit: int) -> list[str]:
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


def execution_bytes(conn: _Connection, sql: RetentionSql, execution_id: str) -> int:
    """The payload bytes stored for one execution: its inputs, output and error, its
    journal payloads and its promise payloads."""
    row = conn.execute(sql.execution_bytes, (execution_id,) * 3).fetchone()
    return int(row[0]) if row else 0


class _Host(Protocol):
    def _snapshot(self, op: str) -> AbstractContextManager[Any]: ...


def run_prune(
    host: _Host,
    write: Callable[[str], AbstractContextManager[Any]],
    sql: RetentionSql,
    policy: RetentionPolicy,
    now_ms: int,
    dry_run: bool,
    delete: Callable[[Any, Sequence[str]], int],
    count_rows: Callable[[Any, Sequence[str]], int],
    on_pruned: Callable[[Sequence[str]], None] | None = None,
) -> PruneReport:
    """Run the retention rules in order, ``batch_size`` executions per ``write``
    transaction (``delete`` removes a batch, returning its journal rows; ``on_pruned``
    hears its ids once it committed); a dry run counts (``count_rows``) inside one
    ``host._snapshot`` and changes nothing."""
    counts = dict.fromkeys(PHASES, 0)
    journal_rows = 0
    if dry_run:
        removed = Removed()
        with host._snapshot("prune") as conn:
            for phase in PHASES:
                ids = select_batch(conn, sql, phase, policy, now_ms, UNLIMITED, removed)
                counts[phase] = len(ids)
                journal_rows += count_rows(conn, ids)
                removed.ids.update(ids)
                if policy.max_journal_bytes > 0 and phase != PHASES[-1]:  # read by later phases
                    removed.bytes += sum(execution_bytes(conn, sql, i) for i in ids)
    else:
        batch = max(policy.batch_size, 1)
        for phase in active_phases(policy):
            while True:
                with write("prune") as conn:
                    ids = select_batch(conn, sql, phase, policy, now_ms, batch)
                    journal_rows += delete(conn, ids)
                counts[phase] += len(ids)
                tell_pruned(on_pruned, ids)
                if len(ids) < batch:
                    break
    return PruneReport(
        sum(counts.values()), journal_rows, counts["ttl"], counts["count"], counts["size"]
    )

"""PostgreSQL journal rows and high-water marks: a batch in one statement (layer: storage).

The journal has the same columns on both backends, so a row reads back into a
``JournalEntry`` and an entry becomes insert parameters exactly as on SQLite
(``sqlite_rows`` holds those two conversions). What differs is the insert: PostgreSQL
takes a batch as one array per column (a single entry as plain values, cheaper to send)
and inserts it in one statement, one round trip whatever the batch size.

The signed high-water mark of each execution (ref §4.7) is written in the same statement
when the caller knows the counts it committed last (``OutcomeCounts``): it signs the new
counts before the statement is sent, and the statement refuses the whole batch if a stored
count is not the one expected (``StaleMark``), so a count is never signed unchecked. When
the counts are not known, ``bump_marks`` adds the batch's outcomes to the stored counts
and returns them, to be signed by ``sign_marks`` in the same transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors

from ..errors import StorageError
from ..ids import lock_name
from ..journal import JournalEntry
from .sqlite_rows import ENTRY_COLUMNS, entry_from_row, insert_params

__all__ = [
    "ENTRY_COLUMNS",
    "Connection",
    "Mark",
    "OutcomeCounts",
    "StaleMark",
    "append_statement",
    "bump_marks",
    "entry_from_row",
    "is_stale_mark",
    "last_seq",
    "sign_marks",
]

Connection = psycopg.Connection[tuple[Any, ...]]
"""A psycopg connection returning rows as tuples (its default)."""


class Mark(NamedTuple):
    """An execution's new high-water mark, and the count it must replace."""

    execution_id: str
    outcomes: int
    mac: bytes
    stored: int


_INSERT_COLUMNS = (
    "execution_id, generation, step_id, kind, name, effect, idem_key, payload, created_at, "
    "hmac, folded"
)
_ARRAY_TYPES = (
    "text[]", "bigint[]", "bigint[]", "text[]", "text[]", "text[]",
    "bytea[]", "bytea[]", "bigint[]", "bytea[]", "bigint[]",
)  # fmt: skip
_INSERT_ONE = (
    f"INSERT INTO journal ({_INSERT_COLUMNS}) VALUES ({', '.join(['%s'] * 11)}) RETURNING seq"
)
# Rows are inserted in batch order (WITH ORDINALITY ... ORDER BY), so their seqs ascend
# in the order the caller listed them.
_INSERT_MANY = (
    f"INSERT INTO journal ({_INSERT_COLUMNS}) "
    f"SELECT {_INSERT_COLUMNS} FROM unnest("
    + ", ".join(f"%s::{t}" for t in _ARRAY_TYPES)
    + f") WITH ORDINALITY AS batch ({_INSERT_COLUMNS}, position) ORDER BY position "
    "RETURNING seq"
)

# Each execution's new count and MAC, for the count the caller expects to be stored: a
# stored count that differs makes the new one NULL, which NOT NULL refuses, and the whole
# statement fails (``is_stale_mark``). Marks are written in execution id order, so two
# batches touching the same executions cannot deadlock.
_MARK_ONE = (
    "INSERT INTO integrity (execution_id, outcomes, mac, updated_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (execution_id) DO UPDATE SET outcomes = CASE WHEN integrity.outcomes = %s "
    "THEN EXCLUDED.outcomes END, mac = EXCLUDED.mac, updated_at = EXCLUDED.updated_at"
)
_MARK_MANY = (
    "INSERT INTO integrity (execution_id, outcomes, mac, updated_at) "
    "SELECT mark.execution_id, mark.outcomes, mark.mac, %s "
    "FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) AS mark (execution_id, outcomes, mac) "
    "ORDER BY mark.execution_id "
    "ON CONFLICT (execution_id) DO UPDATE SET outcomes = CASE WHEN integrity.outcomes = ("
    "SELECT was.outcomes FROM unnest(%s::text[], %s::bigint[]) AS was (execution_id, outcomes) "
    "WHERE was.execution_id = EXCLUDED.execution_id) THEN EXCLUDED.outcomes END, "
    "mac = EXCLUDED.mac, updated_at = EXCLUDED.updated_at"
)
# One statement per shape (single row or batch, with or without marks), each the same text
# every time, so the server prepares it once per connection.
_APPEND = {
    (rows, marks): (
        f"WITH marked AS ({marks}), inserted AS ({rows}) SELECT MAX(seq) FROM inserted"
        if marks
        else f"WITH inserted AS ({rows}) SELECT MAX(seq) FROM inserted"
    )
    for rows in (_INSERT_ONE, _INSERT_MANY)
    for marks in ("", _MARK_ONE, _MARK_MANY)
}

# Adds each execution's new outcomes to its stored count under the row's lock (a
# concurrent append waits, then adds to the new count); the MAC is set by _SIGN once the
# count is known, before the transaction commits.
_BUMP = (
    "INSERT INTO integrity (execution_id, outcomes, mac, updated_at) "
    "SELECT bump.execution_id, bump.added, ''::bytea, %s "
    "FROM unnest(%s::text[], %s::bigint[]) AS bump (execution_id, added) "
    "ORDER BY bump.execution_id "
    "ON CONFLICT (execution_id) DO UPDATE SET "
    "outcomes = integrity.outcomes + EXCLUDED.outcomes, updated_at = EXCLUDED.updated_at "
    "RETURNING execution_id, outcomes"
)
_SIGN = (
    "UPDATE integrity SET mac = sign.mac "
    "FROM unnest(%s::text[], %s::bytea[]) AS sign (execution_id, mac) "
    "WHERE integrity.execution_id = sign.execution_id"
)
_KNOWN_LIMIT = 10_000


class StaleMark(StorageError):
    """A stored high-water mark was not the count this storage expected (another writer
    moved it, or it was never read): nothing was written."""


def is_stale_mark(exc: psycopg.Error) -> bool:
    """Whether ``exc`` is an append refusing a mark whose stored count was unexpected."""
    return (
        isinstance(exc, pg_errors.NotNullViolation)
        and exc.diag.table_name == "integrity"
        and exc.diag.column_name == "outcomes"
    )


class OutcomeCounts:
    """The committed outcome count of each execution as this storage last wrote it: what
    it expects to find in ``integrity``. A hint the database checks, never trusted.

    The check cannot tell a mark that was deleted from one never written, so counts are
    forgotten whenever an execution may have changed out of this storage's sight: when it
    finishes here, and when ownership of it is taken (``forget_lock``): it may have been
    finished, pruned and started again while another process owned it.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._counts: dict[str, int] = {}
        self._names: dict[str, str] = {}  # execution id -> lock name
        self._ids: dict[str, str] = {}  # lock name -> execution id

    def expected(self, execution_ids: Iterable[str]) -> dict[str, int] | None:
        """The count of each execution, or ``None`` unless every one is known."""
        with self._mutex:
            try:
                return {eid: self._counts[eid] for eid in execution_ids}
            except KeyError:
                return None

    def remember(self, counts: Mapping[str, int]) -> None:
        """Record committed counts (all are forgotten past a few thousand executions)."""
        with self._mutex:
            if len(self._counts) + len(counts) > _KNOWN_LIMIT:
                self._clear()
            for eid, count in counts.items():
                if eid not in self._names:
                    name = self._names[eid] = lock_name(eid)
                    self._ids[name] = eid
                self._counts[eid] = count

    def forget(self, execution_ids: Iterable[str]) -> None:
        """Drop counts that may no longer hold (a failed write, a finished execution)."""
        with self._mutex:
            for eid in execution_ids:
                self._forget(eid)

    def forget_lock(self, name: str) -> None:
        """Drop the count of the execution whose lock is ``name``, if one is known."""
        with self._mutex:
            eid = self._ids.get(name)
            if eid is not None:
                self._forget(eid)

    def clear(self) -> None:
        """Forget every count."""
        with self._mutex:
            self._clear()

    def _forget(self, eid: str) -> None:
        self._counts.pop(eid, None)
        name = self._names.pop(eid, None)
        if name is not None:
            del self._ids[name]

    def _clear(self) -> None:
        self._counts.clear()
        self._names.clear()
        self._ids.clear()


def append_statement(
    entries: Sequence[JournalEntry], marks: Sequence[Mark] = ()
) -> tuple[str, list[Any]]:
    """The statement that inserts ``entries`` (at least one) and writes ``marks``, and its
    parameters; it returns one row, the last ``seq``.

    A single row or mark is sent as plain values, a batch as one array per column.
    """
    if len(entries) == 1:
        rows_sql, params = _INSERT_ONE, list(insert_params(entries[0]))
    else:
        rows_sql = _INSERT_MANY
        params = [list(column) for column in zip(*map(insert_params, entries), strict=True)]
    if not marks:
        return _APPEND[rows_sql, ""], params
    now = entries[-1].created_at_ms
    if len(marks) == 1:
        eid, outcomes, mac, stored = marks[0]
        return _APPEND[rows_sql, _MARK_ONE], [eid, outcomes, mac, now, stored, *params]
    ids, counts, macs, was = map(list, zip(*sorted(marks), strict=True))
    return _APPEND[rows_sql, _MARK_MANY], [now, ids, counts, macs, ids, was, *params]


def last_seq(cursor: psycopg.Cursor[tuple[Any, ...]]) -> int:
    """The ``seq`` an insert statement returned, 0 if none."""
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def bump_marks(conn: Connection, added: Mapping[str, int], now_ms: int) -> dict[str, int]:
    """Add each execution's new outcomes to its stored count; return the new counts (a
    round trip: the caller signs them with ``sign_marks`` before committing)."""
    ids = sorted(added)
    rows = conn.execute(_BUMP, (now_ms, ids, [added[i] for i in ids])).fetchall()
    return {str(eid): int(count) for eid, count in rows}


def sign_marks(conn: Connection, macs: Mapping[str, bytes]) -> None:
    """Set each execution's signed mark (after ``bump_marks``, in its transaction)."""
    ids = sorted(macs)
    conn.execute(_SIGN, (ids, [macs[i] for i in ids]))

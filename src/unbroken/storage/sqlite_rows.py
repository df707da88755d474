"""SQLite journal rows and SQL fragments the SQLite modules share (layer: storage).

How a ``JournalEntry`` becomes a ``journal`` row and back, how a list of ids becomes
``IN (...)`` lists short enough for SQLite's limit on bound parameters, and the SQL function
``unbroken_hwm`` that signs a high-water mark inside the statement that updates it.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ..journal import EntryKind, JournalEntry
from .base import Signer

__all__ = [
    "CHUNK",
    "ENTRY_COLUMNS",
    "INSERT_ENTRY",
    "add_functions",
    "chunks",
    "entry_from_row",
    "insert_entries",
    "insert_entry",
    "insert_params",
    "marks",
    "signing",
]

CHUNK = 500
"""Ids per ``IN (...)`` list: far below SQLite's limit on bound parameters."""

ENTRY_COLUMNS = (
    "execution_id, generation, step_id, kind, name, effect, idem_key, payload, created_at, seq, "
    "hmac, folded"
)
INSERT_ENTRY = (
    "INSERT INTO journal (execution_id, generation, step_id, kind, name, effect, idem_key, "
    "payload, created_at, hmac, folded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def marks(n: int) -> str:
    """``n`` comma-separated ``?`` placeholders."""
    return ", ".join("?" * n)


def insert_params(e: JournalEntry) -> tuple[Any, ...]:
    """The ``INSERT_ENTRY`` parameters of an entry (its ``seq`` is the database's to give)."""
    kind = e.kind
    value = kind._value_ if type(kind) is EntryKind else EntryKind(kind).value
    return (
        e.execution_id,
        e.generation,
        e.step_id,
        value,
        e.name,
        e.effect,
        e.idem_key,
        e.payload,
        e.created_at_ms,
        e.hmac,
        e.folded,
    )


class _Signing(threading.local):
    signer: Signer | None = None


signing = _Signing()
"""The signer of the append running on this thread, for ``unbroken_hwm``."""


def _hwm(execution_id: str, count: int) -> bytes:
    signer = signing.signer
    if signer is None:
        raise RuntimeError("unbroken_hwm called outside a signed append")
    return signer(execution_id, count)


def add_functions(conn: sqlite3.Connection) -> None:
    """Register ``unbroken_hwm(execution_id, count)``: the signed high-water mark, made
    with the signer of the append running on this thread."""
    conn.create_function("unbroken_hwm", 2, _hwm, deterministic=True)


def insert_entry(conn: sqlite3.Connection, entry: JournalEntry) -> None:
    """Insert one journal row inside the caller's write transaction."""
    conn.execute(INSERT_ENTRY, insert_params(entry))


_ROWS_PER_INSERT = 64
"""Rows per multi-row ``INSERT`` (704 parameters: under every SQLite's limit)."""

_INSERT_ROWS = {
    n: INSERT_ENTRY + ", (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)" * (n - 1)
    for n in (64, 32, 16, 8, 4, 2, 1)
}
"""Multi-row inserts of 64, 32, ... 1 rows: any batch is a few of them, and the connection's
statement cache keeps all seven prepared."""


def insert_entries(conn: sqlite3.Connection, entries: Sequence[JournalEntry]) -> int:
    """Insert journal rows inside the caller's write transaction; return the last ``seq``.

    Multi-row statements rather than ``executemany``: one statement per 64 rows (one call
    into SQLite with the GIL released) instead of one per row.
    """
    seq: int | None = None
    start, total = 0, len(entries)
    while start < total:
        left = total - start
        size = _ROWS_PER_INSERT if left >= _ROWS_PER_INSERT else 1 << (left.bit_length() - 1)
        params: list[Any] = []
        for entry in entries[start : start + size]:
            params.extend(insert_params(entry))
        seq = conn.execute(_INSERT_ROWS[size], params).lastrowid
        start += size
    return int(seq or 0)


def entry_from_row(row: Sequence[Any]) -> JournalEntry:
    """A ``journal`` row (``ENTRY_COLUMNS`` order) as an entry."""
    eid, generation, step_id, kind, name, effect, idem_key, payload, created, seq, mac, n = row
    return JournalEntry(
        eid,
        generation,
        step_id,
        EntryKind(kind),
        name,
        effect,
        idem_key,
        payload,
        created,
        seq,
        mac,
        n,
    )

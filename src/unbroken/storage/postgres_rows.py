"""PostgreSQL journal rows: a batch of entries in one ``INSERT`` (layer: storage).

The journal has the same columns on both backends, so a row reads back into a
``JournalEntry`` and an entry becomes insert parameters exactly as on SQLite
(``sqlite_rows`` holds those two conversions). What differs is the insert: PostgreSQL
takes the whole batch as one array per column and inserts it in one statement, one round
trip whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..journal import JournalEntry
from .sqlite_rows import ENTRY_COLUMNS, entry_from_row, insert_params

__all__ = ["ENTRY_COLUMNS", "Connection", "entry_from_row", "insert_entries"]

Connection = psycopg.Connection[tuple[Any, ...]]
"""A psycopg connection returning rows as tuples (its default)."""

_INSERT_COLUMNS = (
    "execution_id, generation, step_id, kind, name, effect, idem_key, payload, created_at, "
    "hmac, folded"
)
_ARRAY_TYPES = (
    "text[]", "bigint[]", "bigint[]", "text[]", "text[]", "text[]",
    "bytea[]", "bytea[]", "bigint[]", "bytea[]", "bigint[]",
)  # fmt: skip
# Rows are inserted in batch order (WITH ORDINALITY ... ORDER BY), so their seqs ascend
# in the order the caller listed them.
_INSERT_ENTRIES = (
    f"WITH inserted AS (INSERT INTO journal ({_INSERT_COLUMNS}) "
    f"SELECT {_INSERT_COLUMNS} FROM unnest("
    + ", ".join(f"%s::{t}" for t in _ARRAY_TYPES)
    + f") WITH ORDINALITY AS batch ({_INSERT_COLUMNS}, position) ORDER BY position "
    "RETURNING seq) SELECT MAX(seq) FROM inserted"
)


def insert_entries(conn: Connection, entries: Sequence[JournalEntry]) -> int:
    """Insert journal rows inside the caller's transaction; return the last ``seq``."""
    rows = [insert_params(entry) for entry in entries]
    columns: list[list[Any]] = [list(column) for column in zip(*rows, strict=True)]
    row = conn.execute(_INSERT_ENTRIES, columns).fetchone()
    return int(row[0]) if row and row[0] is not None else 0

"""SQLite promises and timers: what a waiting execution waits on (layer: storage).

Each promise and timer is a row of its own table plus a ``control`` row in the journal,
inserted together in one ``BEGIN IMMEDIATE``; settling a promise or firing a timer is a
guarded ``UPDATE``, so the first caller wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import StorageError
from ..journal import JournalEntry, PromiseState
from .rules import settled_state
from .sql_waits import SqlWaits, WaitSql, WaitTable
from .sqlite_connection import SqliteConnections
from .sqlite_rows import chunks, insert_entry, marks

__all__ = ["SqliteWaits"]

_WAIT_SQL = WaitSql.build("?")


class SqliteWaits(SqlWaits, SqliteConnections):
    """Promises and timers of ``SqliteStorage``."""

    def _insert_control(
        self, op: str, entry: JournalEntry, table: WaitTable, row: Sequence[Any]
    ) -> None:
        """A control row and its promise or timer row (``row[0]`` is its id), in one
        transaction.

        Raises:
            StorageError: the promise or timer id exists, or a control row already holds
                the step; nothing was inserted.
        """
        sql = _WAIT_SQL[table]
        slot = (entry.execution_id, entry.generation, entry.step_id)
        with self._write(op) as conn:
            if conn.execute(sql.taken, (row[0],)).fetchone():
                raise StorageError(op, f"a {sql.noun} with this id already exists")
            if conn.execute(sql.held, slot).fetchone():
                raise StorageError(op, "a control row already holds this step")
            insert_entry(conn, entry)
            conn.execute(sql.insert, row)

    # -- promises ---------------------------------------------------------------------

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
            in_list = marks(len(chunk))
            sql = f"SELECT promise_id, state FROM promises WHERE promise_id IN ({in_list})"
            for promise_id, state in self._query("promise_states", sql, chunk):
                states[promise_id] = PromiseState(state)
        return states

    # -- timers -----------------------------------------------------------------------

    def fire_timer(self, timer_id: str, now_ms: int) -> bool:
        """Mark a timer fired; ``False`` if it was already fired or is unknown."""
        with self._write("fire_timer") as conn:
            cursor = conn.execute(
                "UPDATE timers SET fired = 1 WHERE timer_id = ? AND fired = 0", (timer_id,)
            )
        return cursor.rowcount == 1

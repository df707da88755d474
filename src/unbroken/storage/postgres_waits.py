"""PostgreSQL promises and timers: what a waiting execution waits on (layer: storage).

Each promise and timer is a row of its own table plus a ``control`` row in the journal,
inserted together in one fenced transaction that first locks the execution's row, so two
engines cannot both claim one step's control slot; its checks go out together and cost one
round trip. Settling a promise or firing a timer is
a guarded ``UPDATE``: PostgreSQL re-checks the guard after waiting for a concurrent
writer, so the first caller wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import StorageError
from ..journal import JournalEntry, PromiseState
from .base import PROMISES_TOPIC
from .postgres_locks import PostgresLocks
from .postgres_queue import CHANNEL_PREFIX
from .postgres_rows import append_statement
from .rules import settled_state
from .sql_waits import SqlWaits, WaitSql, WaitTable

__all__ = ["PostgresWaits"]

_LOCK_EXECUTION = "SELECT 1 FROM executions WHERE execution_id = %s FOR NO KEY UPDATE"
# A row when the promise was pending; its waiter's engine hears of it at commit.
_SETTLE = (
    "WITH settled AS (UPDATE promises SET state = %s, payload = %s, settled_at = %s "
    "WHERE promise_id = %s AND state = 'pending' RETURNING promise_id) "
    "SELECT pg_notify(%s, promise_id)::text FROM settled"
)
_WAIT_SQL = WaitSql.build("%s")


class PostgresWaits(SqlWaits, PostgresLocks):
    """Promises and timers of ``PostgresStorage``."""

    def _insert_control(
        self, op: str, entry: JournalEntry, table: WaitTable, row: Sequence[Any]
    ) -> None:
        """A control row and its promise or timer row (``row[0]`` is its id), in one
        transaction.

        Raises:
            StorageError: the execution does not exist, the promise or timer id exists, or
                a control row already holds the step; nothing was inserted.
        """
        sql = _WAIT_SQL[table]
        slot = (entry.execution_id, entry.generation, entry.step_id)
        with self._write(op, (entry.execution_id,)) as conn:
            # Serialises control inserts per execution: the slot check below stays true.
            execution = conn.execute(_LOCK_EXECUTION, (entry.execution_id,))
            taken = conn.execute(sql.taken, (row[0],))
            held = conn.execute(sql.held, slot)
            if execution.fetchone() is None:
                raise StorageError(op, "the journal entry names an execution that does not exist")
            if taken.fetchone():
                raise StorageError(op, f"a {sql.noun} with this id already exists")
            if held.fetchone():
                raise StorageError(op, "a control row already holds this step")
            conn.execute(*append_statement([entry]))
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
        values = (settled.value, payload, now_ms, promise_id, CHANNEL_PREFIX + PROMISES_TOPIC)
        return bool(self._execute("settle_promise", _SETTLE, values))

    def promise_states(self, promise_ids: Sequence[str]) -> dict[str, PromiseState]:
        """The state of each promise that exists (one query for any number of ids)."""
        if not promise_ids:
            return {}
        rows = self._query(
            "promise_states",
            "SELECT promise_id, state FROM promises WHERE promise_id = ANY(%s::text[])",
            (list(dict.fromkeys(promise_ids)),),
        )
        return {promise_id: PromiseState(state) for promise_id, state in rows}

    # -- timers -----------------------------------------------------------------------

    def fire_timer(self, timer_id: str, now_ms: int) -> bool:
        """Mark a timer fired; ``False`` if it was already fired or is unknown."""
        rows = self._execute(
            "fire_timer",
            "UPDATE timers SET fired = 1 WHERE timer_id = %s AND fired = 0 RETURNING 1",
            (timer_id,),
        )
        return bool(rows)

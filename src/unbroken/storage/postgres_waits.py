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
from typing import Any, Literal

from ..errors import StorageError
from ..journal import JournalEntry, PromiseRecord, PromiseState, TimerRecord
from .base import PROMISES_TOPIC
from .postgres_locks import PostgresLocks
from .postgres_queue import CHANNEL_PREFIX
from .postgres_rows import append_statement
from .rules import check_control, settled_state
from .sql_reads import PROMISE_COLUMNS, TIMER_COLUMNS

__all__ = ["PostgresWaits"]

_LOCK_EXECUTION = "SELECT 1 FROM executions WHERE execution_id = %s FOR NO KEY UPDATE"
# A row when the promise was pending; its waiter's engine hears of it at commit.
_SETTLE = (
    "WITH settled AS (UPDATE promises SET state = %s, payload = %s, settled_at = %s "
    "WHERE promise_id = %s AND state = 'pending' RETURNING promise_id) "
    "SELECT pg_notify(%s, promise_id)::text FROM settled"
)
_CONTROL_EXISTS = (
    "SELECT 1 FROM journal WHERE execution_id = %s AND generation = %s AND step_id = %s "
    "AND kind = 'control' LIMIT 1"
)


class PostgresWaits(PostgresLocks):
    """Promises and timers of ``PostgresStorage``."""

    def _insert_control(
        self, op: str, entry: JournalEntry, table: Literal["promises", "timers"], row: Sequence[Any]
    ) -> None:
        """A control row and its promise or timer row (``row[0]`` is its id), in one
        transaction.

        Raises:
            StorageError: the execution does not exist, the promise or timer id exists, or
                a control row already holds the step; nothing was inserted.
        """
        noun, columns = (
            ("promise", PROMISE_COLUMNS) if table == "promises" else ("timer", TIMER_COLUMNS)
        )
        slot = (entry.execution_id, entry.generation, entry.step_id)
        with self._write(op) as conn:
            self.fence(conn, op, (entry.execution_id,))
            # Serialises control inserts per execution: the slot check below stays true.
            execution = conn.execute(_LOCK_EXECUTION, (entry.execution_id,))
            taken = conn.execute(f"SELECT 1 FROM {table} WHERE {noun}_id = %s", (row[0],))
            held = conn.execute(_CONTROL_EXISTS, slot)
            if execution.fetchone() is None:
                raise StorageError(op, "the journal entry names an execution that does not exist")
            if taken.fetchone():
                raise StorageError(op, f"a {noun} with this id already exists")
            if held.fetchone():
                raise StorageError(op, "a control row already holds this step")
            conn.execute(*append_statement([entry]))
            marks = ", ".join(["%s"] * len(row))
            conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", row)

    # -- promises ---------------------------------------------------------------------

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
        rows = self._execute(
            "fire_timer",
            "UPDATE timers SET fired = 1 WHERE timer_id = %s AND fired = 0 RETURNING 1",
            (timer_id,),
        )
        return bool(rows)

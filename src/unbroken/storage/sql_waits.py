"""Promise and timer rows shared by the SQL backends (layer: storage).

A promise or timer is a row of its own table plus a ``control`` row in the journal. Which
row a record becomes and the statements that check and insert it are the same on SQLite
and PostgreSQL: they are written once here, per placeholder style. The transaction that
inserts the pair (fenced and locking on PostgreSQL), settling and firing stay per backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..journal import JournalEntry, PromiseRecord, PromiseState, TimerRecord
from .rules import check_control
from .sql_reads import PROMISE_COLUMNS, TIMER_COLUMNS

__all__ = ["SqlWaits", "WaitSql", "WaitTable"]

WaitTable = Literal["promises", "timers"]


@dataclass(frozen=True, slots=True)
class WaitSql:
    """The statements ``_insert_control`` runs for one table, in one dialect."""

    noun: str
    taken: str
    held: str
    insert: str

    @classmethod
    def build(cls, mark: str) -> dict[WaitTable, WaitSql]:
        """Both tables' statements with ``mark`` (``?`` or ``%s``) as placeholder."""
        held = (
            f"SELECT 1 FROM journal WHERE execution_id = {mark} AND generation = {mark} "
            f"AND step_id = {mark} AND kind = 'control' LIMIT 1"
        )
        tables: dict[WaitTable, tuple[str, str]] = {
            "promises": ("promise", PROMISE_COLUMNS),
            "timers": ("timer", TIMER_COLUMNS),
        }
        built: dict[WaitTable, WaitSql] = {}
        for table, (noun, columns) in tables.items():
            values = ", ".join([mark] * len(columns.split(",")))
            built[table] = cls(
                noun,
                f"SELECT 1 FROM {table} WHERE {noun}_id = {mark}",
                held,
                f"INSERT INTO {table} ({columns}) VALUES ({values})",
            )
        return built


class SqlWaits:
    """``create_promise`` and ``arm_timer`` for the SQL backends."""

    def _insert_control(
        self, op: str, entry: JournalEntry, table: WaitTable, row: Sequence[Any]
    ) -> None:
        """A control row and its promise or timer row (``row[0]`` is its id), in one
        transaction."""
        raise NotImplementedError  # each backend inserts under its own locking

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

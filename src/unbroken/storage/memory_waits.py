"""In-memory promises and timers: what a waiting execution waits on (layer: storage).

Each promise and timer is a record of its own plus a ``control`` row in the journal,
inserted together under the lock; settling a promise or firing a timer succeeds once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..errors import StorageError
from ..journal import EntryKind, JournalEntry, PromiseRecord, PromiseState, TimerRecord
from .memory_tables import MemoryTables
from .rules import check_control, settled_state

__all__ = ["MemoryWaits"]


class MemoryWaits(MemoryTables):
    """Promises and timers of ``MemoryStorage``."""

    def _insert_control(self, op: str, entry: JournalEntry, exists: bool, noun: str) -> None:
        """Append a control row after the checks ``create_promise``/``arm_timer`` share
        (caller holds the lock and inserts its own row afterwards)."""
        self._check_open(op)
        if exists:
            raise StorageError(op, f"a {noun} with this id already exists")
        if entry.execution_id not in self._executions:
            raise StorageError(op, "the journal entry names an execution that does not exist")
        if any(
            e.kind is EntryKind.CONTROL
            and (e.generation, e.step_id) == (entry.generation, entry.step_id)
            for e in self._journal.get(entry.execution_id, ())
        ):
            raise StorageError(op, "a control row already holds this step")
        self._last_seq += 1
        stored = replace(entry, kind=EntryKind.CONTROL, seq=self._last_seq)
        self._journal.setdefault(entry.execution_id, []).append(stored)

    # -- promises ---------------------------------------------------------------------

    def create_promise(self, entry: JournalEntry, promise: PromiseRecord) -> None:
        """Insert a promise's control row and its promise row in one step.

        Raises:
            ValueError: ``entry`` is not a control row of the promise's execution.
            StorageError: the promise id or the control row's slot already exists, or the
                execution does not; nothing was inserted.
        """
        check_control(entry, promise.execution_id)
        with self._lock:
            exists = promise.promise_id in self._promises
            self._insert_control("create_promise", entry, exists, "promise")
            self._promises[promise.promise_id] = replace(promise, state=PromiseState(promise.state))

    def get_promise(self, promise_id: str) -> PromiseRecord | None:
        """The promise row, or ``None``."""
        with self._lock:
            self._check_open("get_promise")
            return self._promises.get(promise_id)

    def settle_promise(
        self, promise_id: str, state: PromiseState, payload: bytes | None, now_ms: int
    ) -> bool:
        """Resolve or reject a ``pending`` promise; ``False`` if it was not pending.

        Raises:
            ValueError: ``state`` is ``pending``.
        """
        settled = settled_state(state)
        with self._lock:
            self._check_open("settle_promise")
            promise = self._promises.get(promise_id)
            if promise is None or promise.state is not PromiseState.PENDING:
                return False
            self._promises[promise_id] = replace(
                promise, state=settled, payload=payload, settled_at_ms=now_ms
            )
            return True

    def promise_states(self, promise_ids: Sequence[str]) -> dict[str, PromiseState]:
        """The state of each promise that exists."""
        with self._lock:
            self._check_open("promise_states")
            found = (self._promises.get(pid) for pid in promise_ids)
            return {p.promise_id: p.state for p in found if p is not None}

    # -- timers -----------------------------------------------------------------------

    def arm_timer(self, entry: JournalEntry, timer: TimerRecord) -> None:
        """Insert a timer's control row and its timer row in one step.

        Raises:
            ValueError: ``entry`` is not a control row of the timer's execution.
            StorageError: the timer id or the control row's slot already exists, or the
                execution does not; nothing was inserted.
        """
        check_control(entry, timer.execution_id)
        with self._lock:
            exists = timer.timer_id in self._timers
            self._insert_control("arm_timer", entry, exists, "timer")
            self._timers[timer.timer_id] = replace(timer, fired=bool(timer.fired))

    def fire_timer(self, timer_id: str, now_ms: int) -> bool:
        """Mark a timer fired; ``False`` if it was already fired or is unknown."""
        with self._lock:
            self._check_open("fire_timer")
            timer = self._timers.get(timer_id)
            if timer is None or timer.fired:
                return False
            self._timers[timer_id] = replace(timer, fired=True)
            return True

    def due_timers(self, now_ms: int, limit: int) -> list[TimerRecord]:
        """Unfired timers due at or before ``now_ms``, earliest first."""
        with self._lock:
            self._check_open("due_timers")
            due = [t for t in self._timers.values() if not t.fired and t.due_at_ms <= now_ms]
        due.sort(key=lambda t: (t.due_at_ms, t.timer_id))
        return due[: max(limit, 0)]

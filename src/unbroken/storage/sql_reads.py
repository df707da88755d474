"""Execution, journal, integrity and key reads shared by the SQL backends (layer: storage).

SQLite and PostgreSQL answer these reads with the same SQL: it is written once here with
``?`` placeholders, and each backend runs it through its own ``_select`` (PostgreSQL
rewrites the placeholders to ``%s``). Writes run in each backend's own transactions, where
their locking rules differ (the statements they share are ``sql_writes``'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    ExecutionSummary,
    JournalEntry,
    PromiseRecord,
    PromiseState,
    StepInfo,
    TimerRecord,
)
from .rules import GUARDED
from .sqlite_rows import ENTRY_COLUMNS, entry_from_row

__all__ = [
    "EXECUTION_COLUMNS",
    "PROMISE_COLUMNS",
    "SELECT_EXECUTION",
    "TIMER_COLUMNS",
    "SqlReads",
    "execution_from_row",
]

EXECUTION_COLUMNS = (
    "execution_id, workflow, status, generation, inputs, output, error_type, error, "
    "created_at, updated_at, finalized_at, queue"
)
SELECT_EXECUTION = f"SELECT {EXECUTION_COLUMNS} FROM executions WHERE execution_id = ?"

PROMISE_COLUMNS = (
    "promise_id, execution_id, generation, step_id, name, token_hash, state, payload, "
    "created_at, settled_at"
)
TIMER_COLUMNS = "timer_id, execution_id, generation, step_id, due_at, fired, created_at"
_SEGMENT_COLUMNS = "step_id, kind, name, effect, idem_key, payload, created_at, seq, hmac, folded"
_REPLAY_COLUMNS = "step_id, kind, name, effect, idem_key, payload, hmac"  # replay.ReplayRow
_KINDS = {kind.value: kind for kind in EntryKind}
# Each column a key can have sealed: one COUNT per column, each counting first bytes.
_SEALED_COLUMNS = (
    ("journal", "payload"),
    ("journal", "hmac"),
    ("executions", "inputs"),
    ("executions", "output"),
    ("executions", "error"),
    ("integrity", "mac"),
    ("promises", "payload"),
)
_COUNT_SEALED = "SELECT " + " + ".join(
    f"(SELECT COUNT(*) FROM {table} WHERE SUBSTR({column}, 1, 1) = ?)"
    for table, column in _SEALED_COLUMNS
)
_STEPS_OF_CURRENT_GENERATION = (
    "(SELECT COUNT(*) FROM journal j WHERE j.execution_id = e.execution_id "
    "AND j.generation = e.generation AND j.kind IN ('result', 'error'))"
)


def execution_from_row(row: Sequence[Any]) -> ExecutionRecord:
    """An ``executions`` row (``EXECUTION_COLUMNS`` order) as a record."""
    return ExecutionRecord(row[0], row[1], ExecutionStatus(row[2]), *row[3:])


class SqlReads:
    """The read-only half of the ``Storage`` protocol for the SQL backends."""

    def _select(self, op: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one read statement written with ``?`` placeholders; fetch every row."""
        raise NotImplementedError  # each backend runs it in its own dialect

    def _rows(self, op: str, where: str, params: Sequence[Any]) -> list[JournalEntry]:
        rows = self._select(op, f"SELECT {ENTRY_COLUMNS} FROM journal WHERE {where}", params)
        return [entry_from_row(row) for row in rows]

    # -- executions -------------------------------------------------------------------

    def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """The execution row, or ``None``."""
        rows = self._select("get_execution", SELECT_EXECUTION, (execution_id,))
        return execution_from_row(rows[0]) if rows else None

    def list_executions(
        self, *, status: ExecutionStatus | None = None, limit: int = 100
    ) -> list[ExecutionSummary]:
        """Newest first, metadata only; ``steps`` counts results and errors of the current
        generation."""
        where = "" if status is None else "WHERE e.status = ?"
        params: list[Any] = [] if status is None else [ExecutionStatus(status).value]
        rows = self._select(
            "list_executions",
            f"SELECT e.execution_id, e.workflow, e.status, {_STEPS_OF_CURRENT_GENERATION}, "
            f"e.created_at, e.finalized_at FROM executions e {where} "
            "ORDER BY e.created_at DESC, e.execution_id DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [
            ExecutionSummary(eid, wf, ExecutionStatus(st), int(steps), created, finalized)
            for eid, wf, st, steps, created, finalized in rows
        ]

    def running_executions(self) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of every ``running`` execution that is not in a
        queue, oldest first."""
        rows = self._select(
            "running_executions",
            "SELECT execution_id, workflow FROM executions WHERE status = 'running' "
            "AND queue IS NULL ORDER BY created_at, execution_id",
        )
        return [(eid, wf) for eid, wf in rows]

    def stale_running(self, updated_before_ms: int, limit: int) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of ``running`` executions not updated since then,
        least recently updated first."""
        rows = self._select(
            "stale_running",
            "SELECT execution_id, workflow FROM executions WHERE status = 'running' "
            "AND updated_at < ? ORDER BY updated_at, execution_id LIMIT ?",
            (updated_before_ms, max(limit, 0)),
        )
        return [(eid, wf) for eid, wf in rows]

    # -- journal ----------------------------------------------------------------------

    def read_segment(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[JournalEntry]:
        """Rows of one generation from ``from_step`` on, by ``(step_id, seq)``."""
        # Replay reads every row of an execution through here: the columns it already
        # knows are not fetched, and every entry shares the caller's id string.
        rows = self._select(
            "read_segment",
            f"SELECT {_SEGMENT_COLUMNS} FROM journal WHERE execution_id = ? AND generation = ? "
            "AND step_id >= ? ORDER BY step_id, seq LIMIT ?",
            (execution_id, generation, from_step, max(limit, 0)),
        )
        kinds = _KINDS
        return [
            JournalEntry(
                execution_id,
                generation,
                step,
                kinds[kind],
                name,
                effect,
                key,
                payload,
                created,
                seq,
                mac,
                folded,
            )
            for step, kind, name, effect, key, payload, created, seq, mac, folded in rows
        ]

    def read_replay(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[Any]:
        """``read_segment`` less checkpoint rows, as ``replay.ReplayRow`` tuples (no
        records)."""
        # The driver's row tuples are the result: nothing is built per row.
        return self._select(
            "read_replay",
            f"SELECT {_REPLAY_COLUMNS} FROM journal WHERE execution_id = ? AND generation = ? "
            "AND step_id >= ? AND kind <> 'checkpoint' ORDER BY step_id, seq LIMIT ?",
            (execution_id, generation, from_step, max(limit, 0)),
        )

    def find_by_key(self, execution_id: str, idem_key: bytes) -> list[JournalEntry]:
        """Every guarded row of any generation with this idempotency key, by ``seq``
        (INV-13)."""
        # The effect term is the predicate of the partial index on (execution, key):
        # without it the planner cannot use the index.
        where = f"execution_id = ? AND idem_key = ? AND effect = '{GUARDED}' ORDER BY seq"
        return self._rows("find_by_key", where, (execution_id, idem_key))

    def list_steps(self, execution_id: str) -> list[StepInfo]:
        """Metadata of every journal row of the execution, by ``seq``; payloads stay in
        the database (INV-5): only their length is read."""
        rows = self._select(
            "list_steps",
            "SELECT step_id, name, effect, kind, generation, seq, created_at, "
            "COALESCE(LENGTH(payload), 0), SUBSTR(idem_key, 1, 8) "
            "FROM journal WHERE execution_id = ? ORDER BY seq",
            (execution_id,),
        )
        return [
            StepInfo(step, name, effect, EntryKind(kind), gen, seq, created, size, bytes(key).hex())
            for step, name, effect, kind, gen, seq, created, size, key in rows
        ]

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        return self._rows(
            "read_checkpoints",
            "execution_id = ? AND generation = ? AND kind = 'checkpoint' ORDER BY seq",
            (execution_id, generation),
        )

    def max_seq(self) -> int:
        """The highest ``seq`` in the journal, 0 when empty (FR-DE-12)."""
        rows = self._select("max_seq", "SELECT COALESCE(MAX(seq), 0) FROM journal")
        return int(rows[0][0])

    def read_integrity(self, execution_id: str) -> tuple[int, bytes] | None:
        """The signed high-water mark ``(count, mac)`` of an execution, or ``None``."""
        rows = self._select(
            "read_integrity",
            "SELECT outcomes, mac FROM integrity WHERE execution_id = ?",
            (execution_id,),
        )
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def count_outcomes(self, execution_id: str) -> int:
        """``result`` and ``error`` rows of the execution, every generation, plus the
        ``folded`` counts of its checkpoint rows."""
        # Two index scans: outcome rows through their partial unique index, which holds
        # nothing else (no table lookup per row, as the (execution, generation, step)
        # index would need), and checkpoint rows through theirs.
        rows = self._select(
            "count_outcomes",
            "SELECT (SELECT COUNT(*) FROM journal WHERE execution_id = ? "
            "AND kind IN ('result','error')) + (SELECT COALESCE(SUM(folded), 0) FROM journal "
            "WHERE execution_id = ? AND kind = 'checkpoint')",
            (execution_id, execution_id),
        )
        return int(rows[0][0])

    def count_sealed(self, key_id: int) -> int:
        """Stored blobs and MACs whose first byte names ``key_id``."""
        first = bytes([key_id])
        rows = self._select("count_sealed", _COUNT_SEALED, (first,) * len(_SEALED_COLUMNS))
        return int(rows[0][0])

    def key_verifiers(self) -> dict[int, bytes]:
        """Key-check values of every key id that has sealed data here."""
        rows = self._select("key_verifiers", "SELECT key_id, verifier FROM keys")
        return {int(k): bytes(v) for k, v in rows}

    def has_executions(self) -> bool:
        """Whether any execution (hence any payload) is stored."""
        return bool(self._select("has_executions", "SELECT 1 FROM executions LIMIT 1"))

    def get_promise(self, promise_id: str) -> PromiseRecord | None:
        """The promise row, or ``None``."""
        rows = self._select(
            "get_promise",
            f"SELECT {PROMISE_COLUMNS} FROM promises WHERE promise_id = ?",
            (promise_id,),
        )
        if not rows:
            return None
        pid, eid, generation, step_id, name, token_hash, state, payload, created, settled = rows[0]
        head = (pid, eid, generation, step_id, name, bytes(token_hash))
        return PromiseRecord(*head, PromiseState(state), payload, created, settled)

    def due_timers(self, now_ms: int, limit: int) -> list[TimerRecord]:
        """Unfired timers due at or before ``now_ms``, earliest first."""
        rows = self._select(
            "due_timers",
            f"SELECT {TIMER_COLUMNS} FROM timers WHERE fired = 0 AND due_at <= ? "
            "ORDER BY due_at, timer_id LIMIT ?",
            (now_ms, max(limit, 0)),
        )
        return [
            TimerRecord(tid, eid, generation, step_id, due_at, bool(fired), created)
            for tid, eid, generation, step_id, due_at, fired, created in rows
        ]

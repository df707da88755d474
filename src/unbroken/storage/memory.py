"""In-process storage in plain dicts and lists, for tests and ``memory://`` (layer: storage).

Same semantics as the SQLite backend (the contract suite in ``tests/storage`` runs against
both); nothing survives the process. One lock serialises every call, so each call is atomic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..errors import ExecutionCanceled, StorageError, UnknownExecution
from ..journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    ExecutionSummary,
    JournalEntry,
    StepInfo,
)
from ..replay import ReplayRow, row_of
from .base import Claimant, Signer, outcomes_by_execution
from .memory_retention import MemoryRetention
from .memory_tables import OUTCOME_KINDS
from .memory_waits import MemoryWaits
from .rules import GUARDED, claim_in_order, outcomes_of

__all__ = ["MemoryStorage"]

_REOPENABLE = (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.ABORTED)


class MemoryStorage(MemoryWaits, MemoryRetention):
    """The in-memory backend of the ``Storage`` protocol; ``seq`` counts from 1.

    Its parts are named for what they hold: ``memory_tables`` (the state and its lock),
    ``memory_waits`` (promises and timers), ``memory_retention`` (checkpoint folds and
    pruning); the methods here are the executions, the journal and its integrity.
    """

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution unless one exists; return ``(row, created)``."""
        return self._insert(execution_id, workflow, inputs, None, now_ms)

    def enqueue_execution(
        self, execution_id: str, workflow: str, inputs: bytes, queue: str, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution waiting in ``queue`` unless the id exists."""
        return self._insert(execution_id, workflow, inputs, queue, now_ms)

    def _insert(
        self, execution_id: str, workflow: str, inputs: bytes, queue: str | None, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        op = "create_execution" if queue is None else "enqueue_execution"
        with self._lock:
            self._check_open(op)
            existing = self._executions.get(execution_id)
            if existing is not None:
                return existing, False
            record = ExecutionRecord.created(execution_id, workflow, inputs, now_ms, queue)
            self._executions[execution_id] = record
            return record, True

    def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """The execution row, or ``None``."""
        with self._lock:
            self._check_open("get_execution")
            return self._executions.get(execution_id)

    def reopen_execution(self, execution_id: str, now_ms: int) -> ExecutionRecord:
        """Un-finalize a terminal execution (INV-16); return the row as it is now.

        Raises:
            ExecutionCanceled: the execution was canceled (INV-16').
            UnknownExecution: no such execution.
        """
        with self._lock:
            self._check_open("reopen_execution")
            record = self._executions.get(execution_id)
            if record is None:
                raise UnknownExecution(execution_id)
            if record.status is ExecutionStatus.CANCELED:
                raise ExecutionCanceled(execution_id)
            if record.status in _REOPENABLE:
                record = replace(
                    record,
                    status=ExecutionStatus.RUNNING,
                    finalized_at_ms=None,
                    output=None,
                    error_type=None,
                    error=None,
                    updated_at_ms=now_ms,
                )
                self._executions[execution_id] = record
            return record

    def finalize_execution(
        self,
        execution_id: str,
        status: ExecutionStatus,
        now_ms: int,
        *,
        output: bytes | None = None,
        error_type: str | None = None,
        error: bytes | None = None,
    ) -> bool:
        """Set a terminal status while ``running``; ``False`` if another status won."""
        status = ExecutionStatus(status)
        with self._lock:
            self._check_open("finalize_execution")
            record = self._executions.get(execution_id)
            if record is None or record.status is not ExecutionStatus.RUNNING:
                return False
            self._executions[execution_id] = replace(
                record,
                status=status,
                output=output,
                error_type=error_type,
                error=error,
                updated_at_ms=now_ms,
                finalized_at_ms=now_ms if status.is_terminal else None,
            )
            return True

    def abort_generation(self, execution_id: str, generation: int, now_ms: int) -> int:
        """Mark ``generation`` aborted and start the next one; return the current generation.

        Guarded: if the execution already moved past ``generation`` nothing changes.

        Raises:
            UnknownExecution: no such execution.
        """
        with self._lock:
            self._check_open("abort_generation")
            record = self._executions.get(execution_id)
            if record is None:
                raise UnknownExecution(execution_id)
            if record.generation == generation:
                record = replace(record, generation=generation + 1, updated_at_ms=now_ms)
                self._executions[execution_id] = record
            return record.generation

    def list_executions(
        self, *, status: ExecutionStatus | None = None, limit: int = 100
    ) -> list[ExecutionSummary]:
        """Newest first, metadata only; ``steps`` counts results and errors of the current
        generation."""
        wanted = None if status is None else ExecutionStatus(status)
        with self._lock:
            self._check_open("list_executions")
            records = [r for r in self._executions.values() if wanted in (None, r.status)]
            records.sort(key=lambda r: (r.created_at_ms, r.execution_id), reverse=True)
            return [
                ExecutionSummary(
                    r.execution_id,
                    r.workflow,
                    r.status,
                    self._count_outcomes(r),
                    r.created_at_ms,
                    r.finalized_at_ms,
                )
                for r in records[: max(limit, 0)]
            ]

    def _count_outcomes(self, record: ExecutionRecord) -> int:
        """Results and errors of the record's current generation (caller holds the lock)."""
        return sum(
            1
            for e in self._journal.get(record.execution_id, ())
            if e.generation == record.generation and e.kind in OUTCOME_KINDS
        )

    def running_executions(self) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of every ``running`` execution that is not in a
        queue, oldest first."""
        return self._running("running_executions", None)

    def _running(self, op: str, queue: str | None) -> list[tuple[str, str]]:
        """Running executions of ``queue`` (``None``: of no queue), oldest first."""
        with self._lock:
            self._check_open(op)
            running = [
                r
                for r in self._executions.values()
                if r.status is ExecutionStatus.RUNNING and r.queue == queue
            ]
        running.sort(key=lambda r: (r.created_at_ms, r.execution_id))
        return [(r.execution_id, r.workflow) for r in running]

    def claim_queued(
        self,
        queue: str,
        limit: int,
        claimant: Claimant,
        workflows: Sequence[str],
        *,
        cap: int = 0,
    ) -> list[tuple[str, str]]:
        """Claim up to ``limit`` running executions of ``queue``, oldest first; with
        ``cap`` the queue's owned executions (probed through ``claimant``) stay within it."""
        with self._claim_lock:
            running = self._running("claim_queued", queue)
            return claim_in_order(running, limit, claimant, workflows, cap)

    def stale_running(self, updated_before_ms: int, limit: int) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of ``running`` executions not updated since then,
        least recently updated first."""
        with self._lock:
            self._check_open("stale_running")
            stale = [
                r
                for r in self._executions.values()
                if r.status is ExecutionStatus.RUNNING and r.updated_at_ms < updated_before_ms
            ]
        stale.sort(key=lambda r: (r.updated_at_ms, r.execution_id))
        return [(r.execution_id, r.workflow) for r in stale[: max(limit, 0)]]

    # -- journal ----------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        """Insert entries in one step; return the last ``seq`` (0 if none).

        Raises:
            StorageError: a second result or error for one (execution, generation, step),
                or an unknown execution; nothing was inserted.
        """
        if not entries:
            return 0
        with self._lock:
            self._check_open("append")
            outcomes = self._validate(entries)
            for entry in entries:
                self._last_seq += 1
                stored = replace(entry, kind=EntryKind(entry.kind), seq=self._last_seq)
                self._journal.setdefault(entry.execution_id, []).append(stored)
            self._outcomes.update(outcomes)
            if signer is not None:
                for eid, added in outcomes_by_execution(entries).items():
                    count = self._integrity.get(eid, (0, b""))[0] + added
                    self._integrity[eid] = (count, signer(eid, count))
            return self._last_seq

    def _validate(self, entries: Sequence[JournalEntry]) -> set[tuple[str, int, int]]:
        """The outcome slots the batch fills; raise if any entry may not be written."""
        outcomes: set[tuple[str, int, int]] = set()
        for entry in entries:
            if entry.execution_id not in self._executions:
                raise StorageError(
                    "append", "the journal entry names an execution that does not exist"
                )
            if EntryKind(entry.kind) not in OUTCOME_KINDS:
                continue
            slot = (entry.execution_id, entry.generation, entry.step_id)
            if slot in self._outcomes or slot in outcomes:
                raise StorageError(
                    "append",
                    "a result or error already exists for this (execution, generation, step)",
                )
            outcomes.add(slot)
        return outcomes

    def read_segment(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[JournalEntry]:
        """Rows of one generation from ``from_step`` on, by ``(step_id, seq)``."""
        return self._segment("read_segment", execution_id, generation, from_step, limit, True)

    def read_replay(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[ReplayRow]:
        """``read_segment`` less checkpoint rows, as ``ReplayRow`` tuples."""
        rows = self._segment("read_replay", execution_id, generation, from_step, limit, False)
        return [row_of(e) for e in rows]

    def _segment(
        self, op: str, execution_id: str, generation: int, from_step: int, limit: int,
        checkpoints: bool,
    ) -> list[JournalEntry]:
        with self._lock:
            self._check_open(op)
            rows = [
                e
                for e in self._journal.get(execution_id, ())
                if e.generation == generation
                and e.step_id >= from_step
                and (checkpoints or e.kind is not EntryKind.CHECKPOINT)
            ]
        rows.sort(key=lambda e: (e.step_id, e.seq or 0))
        return rows[: max(limit, 0)]

    def find_by_key(self, execution_id: str, idem_key: bytes) -> list[JournalEntry]:
        """Every guarded row of any generation with this idempotency key, by ``seq``
        (INV-13)."""
        with self._lock:
            self._check_open("find_by_key")
            rows = self._journal.get(execution_id, ())
            return [e for e in rows if e.idem_key == idem_key and e.effect == GUARDED]

    def list_steps(self, execution_id: str) -> list[StepInfo]:
        """Metadata of every journal row of the execution, by ``seq`` (INV-5: no payloads)."""
        with self._lock:
            self._check_open("list_steps")
            rows = list(self._journal.get(execution_id, ()))
        return [
            StepInfo(
                e.step_id,
                e.name,
                e.effect,
                e.kind,
                e.generation,
                e.seq or 0,
                e.created_at_ms,
                len(e.payload) if e.payload is not None else 0,
                e.idem_key[:8].hex(),
            )
            for e in rows
        ]

    def max_seq(self) -> int:
        """The highest ``seq`` in the journal, 0 when empty (FR-DE-12)."""
        with self._lock:
            self._check_open("max_seq")
            return self._last_seq

    # -- integrity and keys -----------------------------------------------------------

    def read_integrity(self, execution_id: str) -> tuple[int, bytes] | None:
        """The signed high-water mark ``(count, mac)`` of an execution, or ``None``."""
        with self._lock:
            self._check_open("read_integrity")
            return self._integrity.get(execution_id)

    def count_outcomes(self, execution_id: str) -> int:
        """``result`` and ``error`` rows of the execution, every generation, plus the
        ``folded`` counts of its checkpoint rows."""
        with self._lock:
            self._check_open("count_outcomes")
            return sum(map(outcomes_of, self._journal.get(execution_id, ())))

    def key_verifiers(self) -> dict[int, bytes]:
        """Key-check values of every key id that has sealed data here."""
        with self._lock:
            self._check_open("key_verifiers")
            return dict(self._keys)

    def add_key_verifier(self, key_id: int, verifier: bytes, now_ms: int) -> None:
        """Record a key's check value unless one is recorded for that id."""
        with self._lock:
            self._check_open("add_key_verifier")
            self._keys.setdefault(key_id, verifier)

    def has_executions(self) -> bool:
        """Whether any execution (hence any payload) is stored."""
        with self._lock:
            self._check_open("has_executions")
            return bool(self._executions)

    def count_sealed(self, key_id: int) -> int:
        """Stored blobs and MACs whose first byte names ``key_id``."""
        with self._lock:
            self._check_open("count_sealed")
            blobs: list[bytes | None] = []
            for rows in self._journal.values():
                blobs.extend(blob for e in rows for blob in (e.payload, e.hmac))
            for r in self._executions.values():
                blobs.extend((r.inputs, r.output, r.error))
            blobs.extend(mac for _, mac in self._integrity.values())
            blobs.extend(p.payload for p in self._promises.values())
        return sum(1 for blob in blobs if blob and blob[0] == key_id)

"""In-process storage in plain dicts and lists, for tests and ``memory://`` (layer: storage).

Same semantics as the SQLite backend (the contract suite in ``tests/storage`` runs against
both); nothing survives the process. One lock serialises every call, so each call is atomic.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import ExecutionCanceled, StorageError, UnknownExecution
from ..journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    ExecutionSummary,
    JournalEntry,
    PromiseRecord,
    PromiseState,
    PruneReport,
    RetentionPolicy,
    StepInfo,
    TimerRecord,
)
from .base import Signer, outcomes_by_execution
from .sqlite_retention import PHASES, Phase, active_phases, check_control, settled_state

__all__ = ["MemoryStorage"]

_OUTCOMES = (EntryKind.RESULT, EntryKind.ERROR)
_REOPENABLE = (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.ABORTED)
_UNLIMITED = 1 << 62


class MemoryStorage:
    """The in-memory backend of the ``Storage`` protocol; ``seq`` counts from 1."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._is_open = False
        self._executions: dict[str, ExecutionRecord] = {}
        self._journal: dict[str, list[JournalEntry]] = {}
        self._outcomes: set[tuple[str, int, int]] = set()
        self._last_seq = 0
        self._integrity: dict[str, tuple[int, bytes]] = {}
        self._keys: dict[int, bytes] = {}
        self._promises: dict[str, PromiseRecord] = {}
        self._timers: dict[str, TimerRecord] = {}

    @property
    def lock_dir(self) -> Path | None:
        """``None``: ownership is in-process."""
        return None

    @property
    def display_url(self) -> str:
        """``memory://``."""
        return "memory://"

    def open(self) -> None:
        """Make the storage usable; data kept from an earlier open stays."""
        with self._lock:
            self._is_open = True

    def close(self) -> None:
        """Refuse further calls until ``open``. Idempotent."""
        with self._lock:
            self._is_open = False

    def _check_open(self, op: str) -> None:
        """Raise ``StorageError(op)`` unless open (caller holds the lock)."""
        if not self._is_open:
            raise StorageError(op, "the storage is not open")

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution unless one exists; return ``(row, created)``."""
        with self._lock:
            self._check_open("create_execution")
            existing = self._executions.get(execution_id)
            if existing is not None:
                return existing, False
            record = ExecutionRecord(
                execution_id,
                workflow,
                ExecutionStatus.RUNNING,
                0,
                inputs,
                None,
                None,
                None,
                now_ms,
                now_ms,
                None,
            )
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
            if e.generation == record.generation and e.kind in _OUTCOMES
        )

    def running_executions(self) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of every ``running`` execution, oldest first."""
        with self._lock:
            self._check_open("running_executions")
            running = [r for r in self._executions.values() if r.status is ExecutionStatus.RUNNING]
        running.sort(key=lambda r: (r.created_at_ms, r.execution_id))
        return [(r.execution_id, r.workflow) for r in running]

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
            if EntryKind(entry.kind) not in _OUTCOMES:
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
        with self._lock:
            self._check_open("read_segment")
            rows = [
                e
                for e in self._journal.get(execution_id, ())
                if e.generation == generation and e.step_id >= from_step
            ]
        rows.sort(key=lambda e: (e.step_id, e.seq or 0))
        return rows[: max(limit, 0)]

    def find_by_key(self, execution_id: str, idem_key: bytes) -> list[JournalEntry]:
        """Every row of any generation with this idempotency key, by ``seq`` (INV-13)."""
        with self._lock:
            self._check_open("find_by_key")
            return [e for e in self._journal.get(execution_id, ()) if e.idem_key == idem_key]

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
            return sum(map(_outcomes_of, self._journal.get(execution_id, ())))

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

    # -- promises and timers ----------------------------------------------------------

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

    # -- folding and retention --------------------------------------------------------

    def fold(self, checkpoint: JournalEntry, replaced_seqs: Sequence[int]) -> None:
        """Insert a checkpoint row and delete the rows it replaces, in one step.

        ``checkpoint.folded`` must equal the outcomes among the replaced rows (``result``
        and ``error`` rows, plus the ``folded`` count of a checkpoint folded again).

        Raises:
            ValueError: the entry is not a checkpoint.
            StorageError: ``checkpoint.folded`` does not match, or a seq names no journal
                row of the checkpoint's execution; nothing changed.
        """
        if EntryKind(checkpoint.kind) is not EntryKind.CHECKPOINT:
            raise ValueError("fold needs an entry of kind checkpoint")
        wanted = set(replaced_seqs)
        eid = checkpoint.execution_id
        with self._lock:
            self._check_open("fold")
            if eid not in self._executions:
                raise StorageError(
                    "fold", "the journal entry names an execution that does not exist"
                )
            rows = self._journal.get(eid, [])
            replaced = [e for e in rows if e.seq in wanted]
            if len(replaced) != len(wanted):
                missing = len(wanted) - len(replaced)
                raise StorageError(
                    "fold",
                    f"{missing} of {len(wanted)} replaced seqs name no journal row of this "
                    "execution",
                )
            outcomes = sum(map(_outcomes_of, replaced))
            if outcomes != checkpoint.folded:
                raise StorageError(
                    "fold",
                    f"the checkpoint folds {checkpoint.folded} outcomes but the replaced rows "
                    f"hold {outcomes}",
                )
            rows[:] = [e for e in rows if e.seq not in wanted]
            self._outcomes.difference_update(
                (e.execution_id, e.generation, e.step_id) for e in replaced if e.kind in _OUTCOMES
            )
            self._last_seq += 1
            rows.append(replace(checkpoint, kind=EntryKind.CHECKPOINT, seq=self._last_seq))
            self._journal[eid] = rows

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        with self._lock:
            self._check_open("read_checkpoints")
            return [
                e
                for e in self._journal.get(execution_id, ())
                if e.kind is EntryKind.CHECKPOINT and e.generation == generation
            ]

    def prune(self, policy: RetentionPolicy, now_ms: int, *, dry_run: bool = False) -> PruneReport:
        """Delete terminal executions past their TTL, then the oldest terminal ones past
        the count and size caps, ``batch_size`` per locked step; ``running`` ones never.

        A dry run counts what a real run would delete and changes nothing.
        """
        counts = dict.fromkeys(PHASES, 0)
        journal_rows = 0
        if dry_run:
            gone: set[str] = set()
            with self._lock:
                self._check_open("prune")
                for phase in PHASES:
                    ids = self._prune_batch(phase, policy, now_ms, _UNLIMITED, gone)
                    counts[phase] = len(ids)
                    journal_rows += sum(len(self._journal.get(i, ())) for i in ids)
                    gone.update(ids)
        else:
            batch = max(policy.batch_size, 1)
            for phase in active_phases(policy):
                while True:
                    with self._lock:
                        self._check_open("prune")
                        ids = self._prune_batch(phase, policy, now_ms, batch, set())
                        journal_rows += sum(map(self._delete_execution, ids))
                    counts[phase] += len(ids)
                    if len(ids) < batch:
                        break
        return PruneReport(
            sum(counts.values()), journal_rows, counts["ttl"], counts["count"], counts["size"]
        )

    def _prune_batch(
        self, phase: Phase, policy: RetentionPolicy, now_ms: int, limit: int, gone: set[str]
    ) -> list[str]:
        """At most ``limit`` ids the rule ``phase`` removes next, oldest first, skipping
        ``gone`` (what a dry run already counted); caller holds the lock."""
        terminal = [
            r
            for r in self._executions.values()
            if r.status.is_terminal and r.finalized_at_ms is not None and r.execution_id not in gone
        ]
        terminal.sort(key=lambda r: (r.finalized_at_ms or 0, r.created_at_ms, r.execution_id))
        if phase == "ttl":
            ids = [r.execution_id for r in terminal if _expired(r, policy, now_ms)]
            return ids[:limit]
        if phase == "count":
            excess = len(self._executions) - len(gone) - policy.max_executions
            if policy.max_executions <= 0 or excess <= 0:
                return []
            return [r.execution_id for r in terminal[: min(excess, limit)]]
        if policy.max_journal_bytes <= 0:
            return []
        total = sum(self._bytes_of(eid) for eid in self._executions if eid not in gone)
        chosen: list[str] = []
        for record in terminal:
            if total <= policy.max_journal_bytes or len(chosen) >= limit:
                break
            chosen.append(record.execution_id)
            total -= self._bytes_of(record.execution_id)
        return chosen

    def _bytes_of(self, execution_id: str) -> int:
        """Stored payload bytes of an execution: inputs, output, error, journal payloads and
        promise payloads (caller holds the lock)."""
        record = self._executions[execution_id]
        blobs: list[bytes | None] = [record.inputs, record.output, record.error]
        blobs.extend(e.payload for e in self._journal.get(execution_id, ()))
        blobs.extend(p.payload for p in self._promises.values() if p.execution_id == execution_id)
        return sum(len(b) for b in blobs if b is not None)

    def _delete_execution(self, execution_id: str) -> int:
        """Remove an execution and everything it owns; return its journal row count
        (caller holds the lock)."""
        rows = self._journal.pop(execution_id, [])
        self._outcomes = {slot for slot in self._outcomes if slot[0] != execution_id}
        for pid in [k for k, p in self._promises.items() if p.execution_id == execution_id]:
            del self._promises[pid]
        for tid in [k for k, t in self._timers.items() if t.execution_id == execution_id]:
            del self._timers[tid]
        self._integrity.pop(execution_id, None)
        del self._executions[execution_id]
        return len(rows)

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


def _outcomes_of(entry: JournalEntry) -> int:
    """How many committed outcomes a row stands for: 1 for a result or error, ``folded``
    for a checkpoint, 0 otherwise."""
    if entry.kind in _OUTCOMES:
        return 1
    return entry.folded if entry.kind is EntryKind.CHECKPOINT else 0


def _expired(record: ExecutionRecord, policy: RetentionPolicy, now_ms: int) -> bool:
    """Whether a terminal execution is past its TTL."""
    ttl = policy.ttl_completed_ms
    if record.status is not ExecutionStatus.COMPLETED:
        ttl = policy.ttl_failed_ms
    return record.finalized_at_ms is not None and record.finalized_at_ms <= now_ms - ttl

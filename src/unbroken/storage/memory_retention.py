"""In-memory checkpoint folds and retention: what shrinks the journal (layer: storage).

Pruning applies the same rules in the same order as on SQLite (``rules``); each batch is
chosen and deleted under one hold of the lock, so an execution reopened meanwhile is never
deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from ..errors import StorageError
from ..journal import EntryKind, JournalEntry, PruneReport, RetentionPolicy
from .memory_tables import OUTCOME_KINDS, MemoryTables
from .rules import (
    PHASES,
    Phase,
    active_phases,
    check_checkpoint,
    check_folded,
    count_excess,
    expired,
    missing_seqs,
    outcomes_of,
    take_to_fit,
    tell_pruned,
)

__all__ = ["MemoryRetention"]

_UNLIMITED = 1 << 62


class MemoryRetention(MemoryTables):
    """Checkpoint folds and pruning of ``MemoryStorage``."""

    # -- checkpoint folds -------------------------------------------------------------

    def fold(self, checkpoint: JournalEntry, replaced_seqs: Sequence[int]) -> None:
        """Insert a checkpoint row and delete the rows it replaces, in one step.

        ``checkpoint.folded`` must equal the outcomes among the replaced rows (``result``
        and ``error`` rows, plus the ``folded`` count of a checkpoint folded again).

        Raises:
            ValueError: the entry is not a checkpoint.
            StorageError: ``checkpoint.folded`` does not match, or a seq names no journal
                row of the checkpoint's execution; nothing changed.
        """
        check_checkpoint(checkpoint)
        wanted = set(replaced_seqs)
        eid = checkpoint.execution_id
        with self._lock:
            self._check_open("fold")
            replaced = self._replaced_rows(eid, wanted)
            outcomes = sum(map(outcomes_of, replaced))
            check_folded(checkpoint, outcomes)
            rows = self._journal.get(eid, [])
            rows[:] = [e for e in rows if e.seq not in wanted]
            self._outcomes.difference_update(
                (e.execution_id, e.generation, e.step_id)
                for e in replaced
                if e.kind in OUTCOME_KINDS
            )
            self._last_seq += 1
            rows.append(replace(checkpoint, kind=EntryKind.CHECKPOINT, seq=self._last_seq))
            self._journal[eid] = rows

    def _replaced_rows(self, execution_id: str, wanted: set[int]) -> list[JournalEntry]:
        """The rows of the execution whose ``seq`` is in ``wanted``; raise unless the
        execution exists and every seq names one of its rows (caller holds the lock)."""
        if execution_id not in self._executions:
            raise StorageError("fold", "the journal entry names an execution that does not exist")
        replaced = [e for e in self._journal.get(execution_id, ()) if e.seq in wanted]
        if len(replaced) != len(wanted):
            raise missing_seqs(len(wanted), len(replaced))
        return replaced

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        with self._lock:
            self._check_open("read_checkpoints")
            return [
                e
                for e in self._journal.get(execution_id, ())
                if e.kind is EntryKind.CHECKPOINT and e.generation == generation
            ]

    # -- pruning ----------------------------------------------------------------------

    def prune(
        self,
        policy: RetentionPolicy,
        now_ms: int,
        *,
        dry_run: bool = False,
        on_pruned: Callable[[Sequence[str]], None] | None = None,
    ) -> PruneReport:
        """Delete terminal executions past their TTL, then the oldest terminal ones past
        the count and size caps, ``batch_size`` per locked step; ``running`` ones never.

        A dry run counts what a real run would delete and changes nothing. ``on_pruned``
        hears each batch's ids once they are deleted.
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
                    tell_pruned(on_pruned, ids)
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
            return [r.execution_id for r in terminal if expired(r, policy, now_ms)][:limit]
        if phase == "count":
            excess = count_excess(policy, len(self._executions) - len(gone))
            return [r.execution_id for r in terminal[: min(excess, limit)]] if excess > 0 else []
        if policy.max_journal_bytes <= 0:
            return []
        total = sum(self._bytes_of(eid) for eid in self._executions if eid not in gone)
        candidates = (r.execution_id for r in terminal)
        return take_to_fit(candidates, total, policy, limit, self._bytes_of)

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

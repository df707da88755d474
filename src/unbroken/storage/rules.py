"""Rules every backend applies the same way: retention, control rows, outcomes (layer: storage).

The backends differ in how they find and delete rows (SQL on SQLite, dict scans in memory),
not in what they decide: which rules pruning runs and in what order, when a terminal
execution is past its TTL, how far over a cap the store is, which candidates a size cap
takes, what a promise or timer's journal row must be, what a settled promise is, which
rows a key lookup finds, and which queued executions a claim takes where the backend
cannot see owners in SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from ..effects import EffectClass
from ..errors import StorageError
from ..journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    JournalEntry,
    PromiseState,
    RetentionPolicy,
)

if TYPE_CHECKING:
    from .base import Claimant

GUARDED = EffectClass.EXACTLY_ONCE_GUARDED.value
"""The ``effect`` of the rows ``find_by_key`` finds: only guarded steps are looked up by
key, so only their rows are in the key index."""

__all__ = [
    "GUARDED",
    "PHASES",
    "Phase",
    "active_phases",
    "check_checkpoint",
    "check_control",
    "check_folded",
    "claim_in_order",
    "count_excess",
    "expired",
    "missing_seqs",
    "outcomes_of",
    "settled_state",
    "take_to_fit",
    "ttl_cutoffs",
]

Phase = Literal["ttl", "count", "size"]
PHASES: tuple[Phase, ...] = ("ttl", "count", "size")
"""The order pruning applies its rules in: TTL first, then the count cap, then the size."""

_OUTCOMES = (EntryKind.RESULT, EntryKind.ERROR)


def active_phases(policy: RetentionPolicy) -> list[Phase]:
    """The rules a policy turns on: the TTL always, each cap unless it is zero."""
    caps = {"count": policy.max_executions, "size": policy.max_journal_bytes}
    return [phase for phase in PHASES if caps.get(phase, 1) > 0]


def ttl_cutoffs(policy: RetentionPolicy, now_ms: int) -> tuple[int, int]:
    """``(completed, failed)``: a terminal execution finalized at or before its cutoff is
    past its TTL; the second cutoff is for ``failed``, ``aborted`` and ``canceled``."""
    return now_ms - policy.ttl_completed_ms, now_ms - policy.ttl_failed_ms


def expired(record: ExecutionRecord, policy: RetentionPolicy, now_ms: int) -> bool:
    """Whether a terminal execution is past its TTL."""
    completed, failed = ttl_cutoffs(policy, now_ms)
    cutoff = completed if record.status is ExecutionStatus.COMPLETED else failed
    return record.finalized_at_ms is not None and record.finalized_at_ms <= cutoff


def count_excess(policy: RetentionPolicy, executions: int) -> int:
    """How many executions the count cap removes from ``executions`` (0 when it is off)."""
    if policy.max_executions <= 0:
        return 0
    return max(executions - policy.max_executions, 0)


def take_to_fit(
    candidates: Iterable[str],
    total_bytes: int,
    policy: RetentionPolicy,
    limit: int,
    bytes_of: Callable[[str], int],
) -> list[str]:
    """The first candidates (at most ``limit``) whose removal brings ``total_bytes`` down
    to the size cap; ``bytes_of`` gives what removing one frees."""
    chosen: list[str] = []
    for execution_id in candidates:
        if total_bytes <= policy.max_journal_bytes or len(chosen) >= limit:
            break
        chosen.append(execution_id)
        total_bytes -= bytes_of(execution_id)
    return chosen


def outcomes_of(entry: JournalEntry) -> int:
    """How many committed outcomes a row stands for: 1 for a result or error, ``folded``
    for a checkpoint, 0 otherwise."""
    if entry.kind in _OUTCOMES:
        return 1
    return entry.folded if entry.kind is EntryKind.CHECKPOINT else 0


def check_control(entry: JournalEntry, execution_id: str) -> None:
    """Refuse a promise's or timer's journal row that is not its control row."""
    if EntryKind(entry.kind) is not EntryKind.CONTROL or entry.execution_id != execution_id:
        raise ValueError("the journal entry must be a control row of the same execution")


def check_checkpoint(entry: JournalEntry) -> None:
    """Refuse to fold into a row that is not a checkpoint row."""
    if EntryKind(entry.kind) is not EntryKind.CHECKPOINT:
        raise ValueError("fold needs an entry of kind checkpoint")


def check_folded(checkpoint: JournalEntry, replaced: int) -> None:
    """Raise unless the checkpoint folds exactly the outcomes its replaced rows held.

    Raises:
        StorageError: the counts differ (the caller rolls the fold back).
    """
    if replaced != checkpoint.folded:
        raise StorageError(
            "fold",
            f"the checkpoint folds {checkpoint.folded} outcomes but the replaced rows "
            f"hold {replaced}",
        )


def settled_state(state: PromiseState) -> PromiseState:
    """``state`` as a member; ``ValueError`` unless it is resolved or rejected."""
    settled = PromiseState(state)
    if settled is PromiseState.PENDING:
        raise ValueError("a promise is settled as resolved or rejected, not pending")
    return settled


def claim_in_order(
    running: Sequence[tuple[str, str]],
    limit: int,
    claimant: Claimant,
    workflows: Iterable[str],
    cap: int,
) -> list[tuple[str, str]]:
    """Claim from a queue's running executions (oldest first) through ``claimant``.

    With ``cap > 0`` every running execution of the queue is probed first (``is_owned``),
    so the claim leaves room for the ones other owners run. The caller serialises claims.
    """
    room = max(limit, 0)
    if cap > 0:
        owned = sum(1 for execution_id, _ in running if claimant.is_owned(execution_id))
        room = min(room, cap - owned)
    wanted = set(workflows)
    claimed: list[tuple[str, str]] = []
    for execution_id, workflow in running:
        if len(claimed) >= room:
            break
        if workflow in wanted and claimant.try_own(execution_id):
            claimed.append((execution_id, workflow))
    return claimed


def missing_seqs(wanted: int, found: int) -> StorageError:
    """The error of a fold whose replaced seqs name ``wanted - found`` rows the execution
    does not have."""
    return StorageError(
        "fold",
        f"{wanted - found} of {wanted} replaced seqs name no journal row of this execution",
    )


def tell_pruned(on_pruned: Callable[[Sequence[str]], None] | None, ids: Sequence[str]) -> None:
    """Give ``prune``'s ``on_pruned`` a committed batch; what it raises is logged, never
    raised: the batch is gone either way, and the next batches are pruned still."""
    if not ids or on_pruned is None:
        return
    try:
        on_pruned(ids)
    except Exception as exc:
        logging.getLogger("unbroken").warning(
            "after pruning %d executions: %s", len(ids), type(exc).__name__, exc_info=exc
        )

"""The backend-neutral rules both backends apply (``storage/rules.py``)."""

from __future__ import annotations

import pytest

from unbroken.journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    JournalEntry,
    PromiseState,
    RetentionPolicy,
)
from unbroken.storage.rules import (
    active_phases,
    check_control,
    count_excess,
    expired,
    outcomes_of,
    settled_state,
    take_to_fit,
)


def _record(status: ExecutionStatus, finalized_at_ms: int | None) -> ExecutionRecord:
    return ExecutionRecord("e", "wf", status, 0, None, None, None, None, 0, 0, finalized_at_ms)


def _entry(kind: EntryKind, folded: int = 0) -> JournalEntry:
    return JournalEntry("e", 0, 1, kind, "s", "pure", b"k", None, 0, None, None, folded)


def test_active_phases_keep_the_ttl_and_drop_caps_that_are_off() -> None:
    assert active_phases(RetentionPolicy()) == ["ttl", "count", "size"]
    off = RetentionPolicy(max_executions=0, max_journal_bytes=0)
    assert active_phases(off) == ["ttl"]


def test_expired_uses_the_ttl_of_the_status() -> None:
    policy = RetentionPolicy(ttl_completed_ms=10, ttl_failed_ms=100)
    assert expired(_record(ExecutionStatus.COMPLETED, 90), policy, 100)
    assert not expired(_record(ExecutionStatus.COMPLETED, 91), policy, 100)
    for status in (ExecutionStatus.FAILED, ExecutionStatus.ABORTED, ExecutionStatus.CANCELED):
        assert expired(_record(status, 0), policy, 100)
        assert not expired(_record(status, 1), policy, 100)
    assert not expired(_record(ExecutionStatus.COMPLETED, None), policy, 100)


def test_count_excess_is_zero_when_the_cap_is_off_or_not_reached() -> None:
    assert count_excess(RetentionPolicy(max_executions=3), 5) == 2
    assert count_excess(RetentionPolicy(max_executions=3), 2) == 0
    assert count_excess(RetentionPolicy(max_executions=0), 5) == 0


def test_take_to_fit_stops_at_the_cap_or_the_limit() -> None:
    size = {"a": 4, "b": 4, "c": 4}.__getitem__
    policy = RetentionPolicy(max_journal_bytes=5)
    assert take_to_fit(iter("abc"), 12, policy, 10, size) == ["a", "b"]
    assert take_to_fit(iter("abc"), 12, policy, 1, size) == ["a"]
    assert take_to_fit(iter("abc"), 5, policy, 10, size) == []


def test_outcomes_of_counts_results_errors_and_folded_checkpoints() -> None:
    assert outcomes_of(_entry(EntryKind.RESULT)) == 1
    assert outcomes_of(_entry(EntryKind.ERROR)) == 1
    assert outcomes_of(_entry(EntryKind.CHECKPOINT, folded=7)) == 7
    assert outcomes_of(_entry(EntryKind.CONTROL)) == 0


def test_control_rows_and_settled_states_are_checked() -> None:
    check_control(_entry(EntryKind.CONTROL), "e")
    with pytest.raises(ValueError):
        check_control(_entry(EntryKind.RESULT), "e")
    with pytest.raises(ValueError):
        check_control(_entry(EntryKind.CONTROL), "other")
    assert settled_state(PromiseState.RESOLVED) is PromiseState.RESOLVED
    with pytest.raises(ValueError):
        settled_state(PromiseState.PENDING)

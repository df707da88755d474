"""The storage contract: every backend keeps the semantics ``storage/base.py`` documents.

Each test runs once per backend (the ``storage`` fixture is parametrized over ``memory``
and ``sqlite``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from typing import TypeVar

import pytest

from unbroken.errors import ExecutionCanceled, StorageError, UnknownExecution
from unbroken.journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    JournalEntry,
    PromiseRecord,
    PromiseState,
    PruneReport,
    RetentionPolicy,
    StepInfo,
    TimerRecord,
)
from unbroken.ownership import ownership_for
from unbroken.queueing import Claims
from unbroken.replay import row_of
from unbroken.storage.base import Storage

T = TypeVar("T")

SECRET = b"SECRET-PAYLOAD-BYTES"
TERMINAL = [
    ExecutionStatus.COMPLETED,
    ExecutionStatus.FAILED,
    ExecutionStatus.ABORTED,
    ExecutionStatus.CANCELED,
]


def key(n: int) -> bytes:
    """A distinct 32-byte idempotency key."""
    return n.to_bytes(4, "big") * 8


def entry(
    execution_id: str,
    step_id: int,
    kind: EntryKind = EntryKind.RESULT,
    *,
    generation: int = 0,
    idem_key: bytes | None = None,
    payload: bytes | None = b"payload",
    name: str = "step",
    effect: str = "idempotent",
    created_at_ms: int = 1_000,
) -> JournalEntry:
    """A journal entry with defaults for everything the test does not care about."""
    return JournalEntry(
        execution_id=execution_id,
        generation=generation,
        step_id=step_id,
        kind=kind,
        name=name,
        effect=effect,
        idem_key=idem_key if idem_key is not None else key(step_id),
        payload=payload,
        created_at_ms=created_at_ms,
    )


def create(storage: Storage, execution_id: str = "ex-1", now_ms: int = 1_000) -> ExecutionRecord:
    """Create a running execution and return its row."""
    record, created = storage.create_execution(execution_id, "wf", b"inputs", now_ms)
    assert created
    return record


def run_concurrently(n: int, fn: Callable[[int], T]) -> list[T]:
    """Call ``fn(0..n-1)`` from ``n`` threads released at the same moment."""
    barrier = threading.Barrier(n)

    def call(i: int) -> T:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(call, range(n)))


# -- lifecycle ------------------------------------------------------------------------


def test_close_is_idempotent_and_calls_after_close_raise_storage_error(storage: Storage) -> None:
    create(storage)
    storage.close()
    storage.close()
    with pytest.raises(StorageError) as excinfo:
        storage.get_execution("ex-1")
    assert excinfo.value.op == "get_execution"


def test_reopening_the_storage_keeps_its_data(storage: Storage) -> None:
    create(storage)
    seq = storage.append([entry("ex-1", 0)])
    storage.close()
    storage.open()
    storage.open()  # idempotent
    assert storage.get_execution("ex-1") is not None
    assert storage.max_seq() == seq


# -- executions -----------------------------------------------------------------------


def test_create_execution_inserts_a_running_row(storage: Storage) -> None:
    record, created = storage.create_execution("ex-1", "wf", b"inputs", 1_234)
    assert created
    assert record == ExecutionRecord(
        execution_id="ex-1",
        workflow="wf",
        status=ExecutionStatus.RUNNING,
        generation=0,
        inputs=b"inputs",
        output=None,
        error_type=None,
        error=None,
        created_at_ms=1_234,
        updated_at_ms=1_234,
        finalized_at_ms=None,
    )
    assert storage.get_execution("ex-1") == record


def test_create_execution_is_idempotent_and_leaves_the_existing_row_untouched(
    storage: Storage,
) -> None:
    first = create(storage)
    storage.finalize_execution("ex-1", ExecutionStatus.COMPLETED, 2_000, output=b"out")
    stored = storage.get_execution("ex-1")
    again, created = storage.create_execution("ex-1", "other-wf", b"other", 9_999)
    assert not created
    assert again == stored
    assert again is not None and again.created_at_ms == first.created_at_ms


def test_get_execution_of_unknown_id_is_none(storage: Storage) -> None:
    assert storage.get_execution("nope") is None


@pytest.mark.parametrize(
    "status", [ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.ABORTED]
)
def test_reopen_unfinalizes_completed_failed_and_aborted_inv16(
    storage: Storage, status: ExecutionStatus
) -> None:
    create(storage)
    storage.abort_generation("ex-1", 0, 1_500)
    storage.finalize_execution(
        "ex-1", status, 2_000, output=b"out", error_type="ValueError", error=b"err"
    )
    record = storage.reopen_execution("ex-1", 3_000)
    assert record.status is ExecutionStatus.RUNNING
    assert record.finalized_at_ms is None
    assert (record.output, record.error_type, record.error) == (None, None, None)
    assert record.updated_at_ms == 3_000
    assert record.generation == 1  # reopening resumes, it does not start a generation
    assert record.inputs == b"inputs"
    assert storage.get_execution("ex-1") == record
    assert storage.running_executions() == [("ex-1", "wf")]


def test_reopen_of_a_running_execution_returns_it_unchanged_inv16(storage: Storage) -> None:
    record = create(storage)
    assert storage.reopen_execution("ex-1", 5_000) == record


def test_reopen_refuses_a_canceled_execution_inv16_prime(storage: Storage) -> None:
    create(storage)
    storage.finalize_execution("ex-1", ExecutionStatus.CANCELED, 2_000)
    with pytest.raises(ExecutionCanceled) as excinfo:
        storage.reopen_execution("ex-1", 3_000)
    assert excinfo.value.execution_id == "ex-1"
    after = storage.get_execution("ex-1")
    assert after is not None
    assert after.status is ExecutionStatus.CANCELED
    assert after.finalized_at_ms == 2_000


def test_reopen_of_an_unknown_execution_raises_unknown_execution(storage: Storage) -> None:
    with pytest.raises(UnknownExecution):
        storage.reopen_execution("nope", 1_000)
    assert storage.get_execution("nope") is None


@pytest.mark.parametrize("status", TERMINAL)
def test_finalize_sets_status_payloads_and_finalized_at(
    storage: Storage, status: ExecutionStatus
) -> None:
    create(storage)
    assert storage.finalize_execution(
        "ex-1", status, 2_000, output=b"out", error_type="KeyError", error=b"err"
    )
    record = storage.get_execution("ex-1")
    assert record is not None
    assert record.status is status
    assert (record.output, record.error_type, record.error) == (b"out", "KeyError", b"err")
    assert (record.updated_at_ms, record.finalized_at_ms) == (2_000, 2_000)


def test_finalize_first_terminal_write_wins(storage: Storage) -> None:
    create(storage)
    assert storage.finalize_execution("ex-1", ExecutionStatus.COMPLETED, 2_000, output=b"ok")
    for status in TERMINAL:
        assert not storage.finalize_execution("ex-1", status, 3_000, error_type="X", error=b"late")
    record = storage.get_execution("ex-1")
    assert record is not None
    assert record.status is ExecutionStatus.COMPLETED
    assert (record.output, record.error, record.finalized_at_ms) == (b"ok", None, 2_000)


def test_finalize_of_an_unknown_execution_changes_nothing(storage: Storage) -> None:
    assert not storage.finalize_execution("nope", ExecutionStatus.COMPLETED, 2_000)
    assert storage.get_execution("nope") is None


def test_finalize_race_has_exactly_one_winner_in_each_of_20_trials(storage: Storage) -> None:
    for trial in range(20):
        execution_id = f"race-{trial}"
        create(storage, execution_id)

        def finalize(i: int, execution_id: str = execution_id) -> bool:
            return storage.finalize_execution(
                execution_id, TERMINAL[i], 2_000 + i, error_type=f"T{i}"
            )

        wins = run_concurrently(len(TERMINAL), finalize)
        assert wins.count(True) == 1, wins
        record = storage.get_execution(execution_id)
        assert record is not None
        winner = wins.index(True)
        assert record.status is TERMINAL[winner]
        assert record.error_type == f"T{winner}"


def test_abort_generation_starts_the_next_generation_and_is_guarded(storage: Storage) -> None:
    create(storage)
    assert storage.abort_generation("ex-1", 0, 2_000) == 1
    assert storage.abort_generation("ex-1", 0, 3_000) == 1  # stale: nothing changes
    record = storage.get_execution("ex-1")
    assert record is not None
    assert (record.generation, record.updated_at_ms) == (1, 2_000)
    assert record.status is ExecutionStatus.RUNNING  # the execution stays running
    assert storage.abort_generation("ex-1", 1, 4_000) == 2
    assert storage.abort_generation("ex-1", 5, 5_000) == 2


def test_abort_generation_race_advances_exactly_once(storage: Storage) -> None:
    create(storage)
    results = run_concurrently(6, lambda i: storage.abort_generation("ex-1", 0, 2_000 + i))
    assert results == [1] * 6
    record = storage.get_execution("ex-1")
    assert record is not None and record.generation == 1


def test_abort_generation_of_an_unknown_execution_raises(storage: Storage) -> None:
    with pytest.raises(UnknownExecution):
        storage.abort_generation("nope", 0, 1_000)


def test_list_executions_is_newest_first_with_status_filter_and_limit(storage: Storage) -> None:
    create(storage, "a", now_ms=1_000)
    create(storage, "b", now_ms=3_000)
    create(storage, "c", now_ms=2_000)
    create(storage, "d", now_ms=3_000)  # same time as "b": the id breaks the tie
    storage.finalize_execution("c", ExecutionStatus.FAILED, 4_000, error_type="E")
    listed = storage.list_executions()
    assert [s.execution_id for s in listed] == ["d", "b", "c", "a"]
    failed = storage.list_executions(status=ExecutionStatus.FAILED)
    assert [(s.execution_id, s.status, s.finalized_at_ms) for s in failed] == [
        ("c", ExecutionStatus.FAILED, 4_000)
    ]
    assert [s.execution_id for s in storage.list_executions(limit=2)] == ["d", "b"]
    assert storage.list_executions(status=ExecutionStatus.CANCELED) == []
    assert listed[0].workflow == "wf" and listed[0].created_at_ms == 3_000


def test_list_executions_counts_results_and_errors_of_the_current_generation(
    storage: Storage,
) -> None:
    create(storage)
    create(storage, "other")
    storage.append(
        [
            entry("ex-1", 0),
            entry("ex-1", 1, EntryKind.INTENT),
            entry("ex-1", 1, EntryKind.ERROR),
            entry("ex-1", 2, EntryKind.CONTROL),
            entry("ex-1", 3, EntryKind.CHECKPOINT),
            entry("other", 0),
        ]
    )
    counts = {s.execution_id: s.steps for s in storage.list_executions()}
    assert counts == {"ex-1": 2, "other": 1}
    storage.abort_generation("ex-1", 0, 2_000)
    storage.append([entry("ex-1", 0, generation=1)])
    counts = {s.execution_id: s.steps for s in storage.list_executions()}
    assert counts == {"ex-1": 1, "other": 1}


def test_running_executions_lists_running_ones_oldest_first(storage: Storage) -> None:
    create(storage, "late", now_ms=3_000)
    create(storage, "early", now_ms=1_000)
    create(storage, "done", now_ms=2_000)
    storage.finalize_execution("done", ExecutionStatus.COMPLETED, 4_000)
    assert storage.running_executions() == [("early", "wf"), ("late", "wf")]


# -- journal --------------------------------------------------------------------------


def test_append_of_nothing_returns_zero(storage: Storage) -> None:
    assert storage.append([]) == 0
    assert storage.max_seq() == 0


def test_append_assigns_increasing_seqs_and_returns_the_last(storage: Storage) -> None:
    create(storage)
    first = storage.append([entry("ex-1", 0)])
    last = storage.append([entry("ex-1", 1), entry("ex-1", 2), entry("ex-1", 3)])
    assert first >= 1
    assert last == first + 3
    seqs = [e.seq for e in storage.read_segment("ex-1", 0, 0, 100)]
    assert seqs == [first, first + 1, first + 2, first + 3]


def test_appended_entries_read_back_unchanged_with_their_seq(storage: Storage) -> None:
    create(storage)
    written = [
        entry("ex-1", 0, payload=b"\x00\xffbinary", name="fetch", effect="at_least_once"),
        entry("ex-1", 1, EntryKind.INTENT, payload=None, effect="exactly_once_guarded"),
    ]
    last = storage.append(written)
    read = storage.read_segment("ex-1", 0, 0, 10)
    assert read == [replace(written[0], seq=last - 1), replace(written[1], seq=last)]
    assert all(isinstance(e.kind, EntryKind) for e in read)


def test_read_replay_gives_the_segment_as_replay_rows_without_checkpoints(
    storage: Storage,
) -> None:
    create(storage)
    written = [
        entry("ex-1", 0, payload=b"\x00\xffbinary", name="fetch", effect="at_least_once"),
        replace(
            entry("ex-1", 1, EntryKind.INTENT, payload=None, effect="exactly_once_guarded"),
            hmac=b"\x01mac",
        ),
        entry("ex-1", 1, effect="exactly_once_guarded"),
        replace(entry("ex-1", 2, EntryKind.CHECKPOINT, payload=b"snapshot"), folded=1),
        entry("ex-1", 2, EntryKind.CONTROL, name="unbroken.sleep", effect="timer"),
        entry("ex-1", 3, generation=1),
    ]
    storage.append(written)
    expected = [row_of(e) for e in written[:3] + written[4:5]]
    assert [tuple(r) for r in storage.read_replay("ex-1", 0, 0, 10)] == expected
    assert [tuple(r) for r in storage.read_replay("ex-1", 0, 1, 2)] == expected[1:3]
    assert [tuple(r) for r in storage.read_replay("ex-1", 1, 0, 10)] == [row_of(written[5])]
    assert storage.read_replay("ex-1", 0, 3, 10) == []


def test_append_is_atomic_a_duplicate_result_rolls_back_the_whole_batch(
    storage: Storage,
) -> None:
    create(storage)
    before = storage.append([entry("ex-1", 0)])
    batch = [
        entry("ex-1", 1, EntryKind.INTENT, payload=SECRET),
        entry("ex-1", 1, payload=SECRET),
        entry("ex-1", 0, EntryKind.ERROR, payload=SECRET),  # step 0 already has a result
    ]
    with pytest.raises(StorageError) as excinfo:
        storage.append(batch)
    assert excinfo.value.op == "append"
    assert SECRET.decode() not in str(excinfo.value)
    assert storage.max_seq() == before
    assert [e.step_id for e in storage.read_segment("ex-1", 0, 0, 100)] == [0]
    assert [s.steps for s in storage.list_executions()] == [1]
    # the storage is still usable, and the rejected rows can be written on their own
    assert storage.append(batch[:2]) > before


def test_append_rejects_two_outcomes_for_one_step_within_a_batch(storage: Storage) -> None:
    create(storage)
    with pytest.raises(StorageError) as excinfo:
        storage.append([entry("ex-1", 0), entry("ex-1", 0, EntryKind.ERROR)])
    assert excinfo.value.op == "append"
    assert storage.max_seq() == 0
    assert storage.read_segment("ex-1", 0, 0, 10) == []


def test_append_allows_one_outcome_per_step_in_each_generation(storage: Storage) -> None:
    create(storage)
    storage.append(
        [
            entry("ex-1", 0, EntryKind.INTENT),
            entry("ex-1", 0, EntryKind.CONTROL),
            entry("ex-1", 0, EntryKind.CONTROL),
            entry("ex-1", 0),
            entry("ex-1", 0, generation=1),
            entry("ex-1", 0, EntryKind.ERROR, generation=2),
        ]
    )
    assert len(storage.list_steps("ex-1")) == 6


def test_append_for_an_unknown_execution_raises_and_inserts_nothing(storage: Storage) -> None:
    create(storage)
    with pytest.raises(StorageError) as excinfo:
        storage.append([entry("ex-1", 0), entry("ghost", 0)])
    assert excinfo.value.op == "append"
    assert storage.max_seq() == 0


def test_concurrent_appends_from_many_threads_lose_nothing(storage: Storage) -> None:
    create(storage)

    def writer(thread: int) -> list[int]:
        return [storage.append([entry("ex-1", thread * 1_000 + i)]) for i in range(25)]

    seqs = [seq for batch in run_concurrently(4, writer) for seq in batch]
    assert len(set(seqs)) == 100
    assert storage.max_seq() == max(seqs)
    assert len(storage.read_segment("ex-1", 0, 0, 1_000)) == 100


def test_read_segment_orders_by_step_then_seq_with_from_step_and_limit(storage: Storage) -> None:
    create(storage)
    storage.append([entry("ex-1", 2), entry("ex-1", 0), entry("ex-1", 1, EntryKind.INTENT)])
    storage.append([entry("ex-1", 1), entry("ex-1", 3, EntryKind.CONTROL)])
    rows = storage.read_segment("ex-1", 0, 0, 100)
    assert [(e.step_id, e.kind) for e in rows] == [
        (0, EntryKind.RESULT),
        (1, EntryKind.INTENT),
        (1, EntryKind.RESULT),
        (2, EntryKind.RESULT),
        (3, EntryKind.CONTROL),
    ]
    seqs = [e.seq or 0 for e in rows if e.step_id == 1]
    assert seqs == sorted(seqs)
    assert [e.step_id for e in storage.read_segment("ex-1", 0, 1, 3)] == [1, 1, 2]
    assert [e.step_id for e in storage.read_segment("ex-1", 0, 3, 100)] == [3]
    assert storage.read_segment("ex-1", 0, 4, 100) == []
    assert storage.read_segment("ex-1", 0, 0, 0) == []


def test_read_segment_returns_only_the_requested_generation_and_execution(
    storage: Storage,
) -> None:
    create(storage)
    create(storage, "other")
    storage.append(
        [
            entry("ex-1", 0, generation=0, payload=b"g0"),
            entry("ex-1", 0, generation=1, payload=b"g1"),
            entry("other", 0, generation=1, payload=b"other"),
        ]
    )
    assert [e.payload for e in storage.read_segment("ex-1", 1, 0, 10)] == [b"g1"]
    assert [e.payload for e in storage.read_segment("ex-1", 0, 0, 10)] == [b"g0"]
    assert storage.read_segment("ex-1", 2, 0, 10) == []
    assert storage.read_segment("nope", 0, 0, 10) == []


def test_find_by_key_returns_guarded_rows_of_every_generation_by_seq_inv13(
    storage: Storage,
) -> None:
    create(storage)
    create(storage, "other")
    k = key(77)
    g = "exactly_once_guarded"
    storage.append(
        [
            entry("ex-1", 4, EntryKind.INTENT, generation=0, idem_key=k, payload=None, effect=g),
            entry("ex-1", 4, generation=0, idem_key=key(5), effect=g),
            entry("other", 4, generation=0, idem_key=k, effect=g),
            # only guarded steps are looked up by key: other rows are not in the key index
            entry("ex-1", 7, generation=0, idem_key=k, effect="idempotent"),
            entry("ex-1", 9, generation=1, idem_key=k, payload=b"committed", effect=g),
        ]
    )
    found = storage.find_by_key("ex-1", k)
    assert [(e.generation, e.step_id, e.kind) for e in found] == [
        (0, 4, EntryKind.INTENT),
        (1, 9, EntryKind.RESULT),
    ]
    assert found[0].seq is not None and found[1].seq is not None
    assert found[0].seq < found[1].seq
    assert found[1].payload == b"committed"
    assert storage.find_by_key("ex-1", key(999)) == []


def test_list_steps_reports_metadata_and_payload_sizes_only_inv5(storage: Storage) -> None:
    create(storage)
    k = bytes(range(32))
    last = storage.append(
        [
            entry("ex-1", 0, payload=b"x" * 300, name="fetch", idem_key=k, created_at_ms=5),
            entry("ex-1", 1, EntryKind.INTENT, payload=None, effect="exactly_once_guarded"),
            entry("ex-1", 1, EntryKind.ERROR, generation=1, payload=b""),
        ]
    )
    steps = storage.list_steps("ex-1")
    assert steps[0] == StepInfo(
        step_id=0,
        name="fetch",
        effect_class="idempotent",
        kind=EntryKind.RESULT,
        generation=0,
        seq=last - 2,
        created_at_ms=5,
        payload_bytes=300,
        idem_key_prefix="0001020304050607",
    )
    assert [(s.kind, s.generation, s.payload_bytes, s.seq) for s in steps[1:]] == [
        (EntryKind.INTENT, 0, 0, last - 1),
        (EntryKind.ERROR, 1, 0, last),
    ]
    assert steps[1].effect_class == "exactly_once_guarded"
    assert not any(f.name == "payload" for f in fields(StepInfo))
    assert storage.list_steps("nope") == []


def test_max_seq_is_zero_when_empty_and_grows_monotonically_fr_de_12(storage: Storage) -> None:
    assert storage.max_seq() == 0
    create(storage)
    create(storage, "other")
    seen = [storage.max_seq()]
    for i in range(5):
        execution_id = "ex-1" if i % 2 else "other"
        last = storage.append([entry(execution_id, i)])
        assert storage.max_seq() == last
        seen.append(last)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


# -- integrity and keys -------------------------------------------------------------------


def _signer(eid: str, count: int) -> bytes:
    return f"{eid}:{count}".encode()


def test_append_with_a_signer_bumps_the_high_water_mark_in_the_same_transaction(
    storage: Storage,
) -> None:
    storage.create_execution("a", "wf", b"", 1)
    storage.create_execution("b", "wf", b"", 1)
    assert storage.read_integrity("a") is None
    storage.append(
        [entry("a", 0), entry("a", 1, EntryKind.INTENT, idem_key=key(9)), entry("b", 0)],
        signer=_signer,
    )
    storage.append([entry("a", 1, EntryKind.ERROR, idem_key=key(9))], signer=_signer)
    assert storage.read_integrity("a") == (2, b"a:2")  # intents do not count
    assert storage.read_integrity("b") == (1, b"b:1")
    assert storage.count_outcomes("a") == 2
    # a refused batch changes neither the journal nor the mark
    with pytest.raises(StorageError):
        storage.append([entry("a", 2), entry("a", 0)], signer=_signer)
    assert storage.read_integrity("a") == (2, b"a:2")
    assert storage.count_outcomes("a") == 2


def test_outcomes_are_counted_across_generations(storage: Storage) -> None:
    storage.create_execution("a", "wf", b"", 1)
    storage.append([entry("a", 0), entry("a", 0, generation=1)], signer=_signer)
    assert storage.count_outcomes("a") == 2
    assert storage.read_integrity("a") == (2, b"a:2")


def test_control_entry_macs_round_trip(storage: Storage) -> None:
    storage.create_execution("a", "wf", b"", 1)
    mac = b"\x00" + b"m" * 32
    intent = entry("a", 0, EntryKind.INTENT, payload=None, effect="exactly_once_guarded")
    storage.append([replace(intent, hmac=mac)])
    (row,) = storage.read_segment("a", 0, 0, 10)
    assert row.hmac == mac
    assert storage.find_by_key("a", row.idem_key)[0].hmac == mac


def test_key_verifiers_are_recorded_once_per_key_id(storage: Storage) -> None:
    assert storage.key_verifiers() == {}
    storage.add_key_verifier(0, b"v0", 1)
    storage.add_key_verifier(0, b"other", 2)  # the first one stays
    storage.add_key_verifier(3, b"v3", 3)
    assert storage.key_verifiers() == {0: b"v0", 3: b"v3"}


def test_count_sealed_counts_blobs_by_their_key_id_byte(storage: Storage) -> None:
    assert not storage.has_executions()
    storage.create_execution("a", "wf", b"\x01inputs", 1)
    assert storage.has_executions()
    storage.append(
        [
            entry("a", 0, payload=b"\x01sealed"),
            entry("a", 1, payload=b"\x02sealed"),
            replace(entry("a", 2, EntryKind.INTENT, payload=None), hmac=b"\x01mac"),
        ],
        signer=lambda eid, n: b"\x01" + bytes(n),
    )
    storage.finalize_execution("a", ExecutionStatus.COMPLETED, 2, output=b"\x02out")
    assert storage.count_sealed(1) == 4  # inputs, one payload, one hmac, the integrity mac
    assert storage.count_sealed(2) == 2
    assert storage.count_sealed(7) == 0


def test_folded_counts_round_trip_through_append_and_count_as_outcomes(storage: Storage) -> None:
    create(storage)
    storage.append([entry("ex-1", 0), replace(entry("ex-1", 5, EntryKind.CHECKPOINT), folded=4)])
    checkpoint = storage.read_segment("ex-1", 0, 5, 10)[0]
    assert checkpoint.folded == 4
    assert storage.read_segment("ex-1", 0, 0, 1)[0].folded == 0
    assert storage.count_outcomes("ex-1") == 5


# -- promises -------------------------------------------------------------------------


def control(execution_id: str, step_id: int, *, generation: int = 0) -> JournalEntry:
    """The control row of a promise or timer."""
    return entry(execution_id, step_id, EntryKind.CONTROL, generation=generation, payload=None)


def promise(
    promise_id: str, execution_id: str = "ex-1", step_id: int = 0, *, created_at_ms: int = 1_000
) -> PromiseRecord:
    """A pending promise row."""
    return PromiseRecord(
        promise_id=promise_id,
        execution_id=execution_id,
        generation=0,
        step_id=step_id,
        name=f"approval-{step_id}",
        token_hash=b"h" * 32,
        state=PromiseState.PENDING,
        payload=None,
        created_at_ms=created_at_ms,
    )


def timer(
    timer_id: str, due_at_ms: int, execution_id: str = "ex-1", step_id: int = 0
) -> TimerRecord:
    """An unfired timer row."""
    return TimerRecord(timer_id, execution_id, 0, step_id, due_at_ms, False, 1_000)


def test_create_promise_inserts_the_control_row_and_the_promise(storage: Storage) -> None:
    create(storage)
    record = promise("p-1", step_id=3)
    storage.create_promise(control("ex-1", 3), record)
    assert storage.get_promise("p-1") == record
    (row,) = storage.read_segment("ex-1", 0, 0, 10)
    assert (row.kind, row.step_id, row.seq) == (EntryKind.CONTROL, 3, storage.max_seq())
    assert storage.get_promise("nope") is None


def test_settle_promise_settles_once(storage: Storage) -> None:
    create(storage)
    storage.create_promise(control("ex-1", 0), promise("p-1"))
    assert storage.settle_promise("p-1", PromiseState.RESOLVED, b"value", 2_000)
    assert not storage.settle_promise("p-1", PromiseState.REJECTED, b"late", 3_000)
    assert not storage.settle_promise("p-1", PromiseState.RESOLVED, b"again", 3_000)
    settled = storage.get_promise("p-1")
    assert settled is not None
    assert (settled.state, settled.payload, settled.settled_at_ms) == (
        PromiseState.RESOLVED,
        b"value",
        2_000,
    )
    assert not storage.settle_promise("nope", PromiseState.RESOLVED, b"x", 2_000)


def test_settle_promise_rejects_and_refuses_pending_as_a_target(storage: Storage) -> None:
    create(storage)
    storage.create_promise(control("ex-1", 0), promise("p-1"))
    with pytest.raises(ValueError):
        storage.settle_promise("p-1", PromiseState.PENDING, None, 2_000)
    assert storage.promise_states(["p-1"]) == {"p-1": PromiseState.PENDING}
    assert storage.settle_promise("p-1", PromiseState.REJECTED, b"error", 2_000)
    assert storage.promise_states(["p-1"]) == {"p-1": PromiseState.REJECTED}


def test_settle_promise_race_has_exactly_one_winner(storage: Storage) -> None:
    create(storage)
    storage.create_promise(control("ex-1", 0), promise("p-1"))
    states = [PromiseState.RESOLVED, PromiseState.REJECTED] * 3
    wins = run_concurrently(
        len(states), lambda i: storage.settle_promise("p-1", states[i], bytes([i]), 2_000 + i)
    )
    assert wins.count(True) == 1
    settled = storage.get_promise("p-1")
    assert settled is not None and settled.payload == bytes([wins.index(True)])


def test_promise_states_reports_the_existing_ones_across_many_ids(storage: Storage) -> None:
    create(storage)
    for step in range(3):
        storage.create_promise(control("ex-1", step), promise(f"p-{step}", step_id=step))
    storage.settle_promise("p-1", PromiseState.RESOLVED, b"v", 2_000)
    storage.settle_promise("p-2", PromiseState.REJECTED, b"e", 2_000)
    wanted = [f"ghost-{i}" for i in range(1_100)]
    wanted[7], wanted[600], wanted[1_099] = "p-0", "p-1", "p-2"  # one per chunk of 500
    assert storage.promise_states(wanted) == {
        "p-0": PromiseState.PENDING,
        "p-1": PromiseState.RESOLVED,
        "p-2": PromiseState.REJECTED,
    }
    assert storage.promise_states([]) == {}


def test_a_duplicate_promise_id_is_refused_and_leaves_no_control_row(storage: Storage) -> None:
    create(storage)
    storage.create_promise(control("ex-1", 0), promise("p-1"))
    before = storage.max_seq()
    with pytest.raises(StorageError) as excinfo:
        storage.create_promise(control("ex-1", 1), promise("p-1", step_id=1))
    assert excinfo.value.op == "create_promise"
    assert storage.max_seq() == before
    assert [e.step_id for e in storage.read_segment("ex-1", 0, 0, 10)] == [0]
    original = storage.get_promise("p-1")
    assert original is not None and original.step_id == 0


def test_a_control_slot_holds_one_promise_or_timer(storage: Storage) -> None:
    create(storage)
    storage.create_promise(control("ex-1", 0), promise("p-1"))
    with pytest.raises(StorageError):
        storage.create_promise(control("ex-1", 0), promise("p-2"))
    with pytest.raises(StorageError):
        storage.arm_timer(control("ex-1", 0), timer("t-1", 5_000))
    assert storage.get_promise("p-2") is None
    assert storage.due_timers(10_000, 10) == []
    assert len(storage.read_segment("ex-1", 0, 0, 10)) == 1
    # the same step of the next generation is a new slot
    storage.create_promise(control("ex-1", 0, generation=1), replace(promise("p-2"), generation=1))
    assert storage.promise_states(["p-2"]) == {"p-2": PromiseState.PENDING}


def test_a_promise_of_an_unknown_execution_is_refused(storage: Storage) -> None:
    with pytest.raises(StorageError) as excinfo:
        storage.create_promise(control("ghost", 0), promise("p-1", "ghost"))
    assert excinfo.value.op == "create_promise"
    assert storage.get_promise("p-1") is None
    assert storage.max_seq() == 0


def test_promise_and_timer_rows_need_a_control_entry_of_their_execution(storage: Storage) -> None:
    create(storage)
    create(storage, "other")
    with pytest.raises(ValueError):
        storage.create_promise(entry("ex-1", 0), promise("p-1"))
    with pytest.raises(ValueError):
        storage.create_promise(control("other", 0), promise("p-1"))
    with pytest.raises(ValueError):
        storage.arm_timer(entry("ex-1", 0, EntryKind.INTENT), timer("t-1", 5))
    assert storage.max_seq() == 0


# -- timers ---------------------------------------------------------------------------


def test_due_timers_are_unfired_ones_due_by_now_earliest_first(storage: Storage) -> None:
    create(storage)
    for step, (timer_id, due) in enumerate([("late", 3_000), ("early", 1_000), ("mid", 2_000)]):
        storage.arm_timer(control("ex-1", step), timer(timer_id, due, step_id=step))
    storage.arm_timer(control("ex-1", 9), replace(timer("done", 500, step_id=9), fired=True))
    assert [t.timer_id for t in storage.due_timers(2_000, 10)] == ["early", "mid"]
    assert [t.timer_id for t in storage.due_timers(5_000, 2)] == ["early", "mid"]
    assert storage.due_timers(999, 10) == []
    assert storage.due_timers(5_000, 0) == []
    (first,) = storage.due_timers(1_000, 10)
    assert first == timer("early", 1_000, step_id=1)
    assert [e.kind for e in storage.read_segment("ex-1", 0, 0, 10)] == [EntryKind.CONTROL] * 4


def test_fire_timer_fires_once(storage: Storage) -> None:
    create(storage)
    storage.arm_timer(control("ex-1", 0), timer("t-1", 1_000))
    assert storage.fire_timer("t-1", 1_500)
    assert not storage.fire_timer("t-1", 1_600)
    assert not storage.fire_timer("nope", 1_600)
    assert storage.due_timers(10_000, 10) == []
    for step in range(1, 4):
        storage.arm_timer(control("ex-1", step), timer(f"race-{step}", 1_000, step_id=step))
    wins = run_concurrently(6, lambda i: storage.fire_timer(f"race-{1 + i % 3}", 2_000))
    assert wins.count(True) == 3
    assert storage.due_timers(10_000, 10) == []


def test_a_duplicate_timer_id_is_refused_and_leaves_no_control_row(storage: Storage) -> None:
    create(storage)
    storage.arm_timer(control("ex-1", 0), timer("t-1", 1_000))
    before = storage.max_seq()
    with pytest.raises(StorageError) as excinfo:
        storage.arm_timer(control("ex-1", 1), timer("t-1", 9_000, step_id=1))
    assert excinfo.value.op == "arm_timer"
    assert storage.max_seq() == before
    assert [t.due_at_ms for t in storage.due_timers(10_000, 10)] == [1_000]


# -- checkpoint folds -----------------------------------------------------------------


def _fold_fixture(storage: Storage) -> list[JournalEntry]:
    """``ex-1`` with results at steps 0..4, an intent at step 5, and ``other`` with one
    result; the integrity mark of ``ex-1`` is signed. Returns the rows of ``ex-1``."""
    create(storage)
    create(storage, "other")
    storage.append(
        [entry("ex-1", step) for step in range(5)]
        + [entry("ex-1", 5, EntryKind.INTENT, payload=None), entry("other", 0)],
        signer=_signer,
    )
    return storage.read_segment("ex-1", 0, 0, 100)


def checkpoint(step_id: int, folded: int, execution_id: str = "ex-1") -> JournalEntry:
    """A checkpoint row folding ``folded`` outcomes."""
    return replace(
        entry(execution_id, step_id, EntryKind.CHECKPOINT, payload=b"snapshot"), folded=folded
    )


def test_fold_replaces_rows_and_keeps_the_outcome_count(storage: Storage) -> None:
    rows = _fold_fixture(storage)
    assert storage.count_outcomes("ex-1") == 5
    storage.fold(checkpoint(3, 3), [e.seq or 0 for e in rows[:3]])
    assert storage.count_outcomes("ex-1") == 5
    assert storage.read_integrity("ex-1") == (5, b"ex-1:5")
    remaining = storage.read_segment("ex-1", 0, 0, 100)
    assert [(e.step_id, e.kind) for e in remaining] == [
        (3, EntryKind.RESULT),
        (3, EntryKind.CHECKPOINT),
        (4, EntryKind.RESULT),
        (5, EntryKind.INTENT),
    ]
    assert [e.step_id for e in storage.read_segment("other", 0, 0, 10)] == [0]
    assert storage.count_outcomes("other") == 1
    (stored,) = storage.read_checkpoints("ex-1", 0)
    assert stored == replace(checkpoint(3, 3), seq=storage.max_seq())
    assert storage.read_checkpoints("ex-1", 1) == []
    assert storage.read_checkpoints("other", 0) == []


def test_fold_can_fold_a_checkpoint_again(storage: Storage) -> None:
    rows = _fold_fixture(storage)
    storage.fold(checkpoint(2, 2), [e.seq or 0 for e in rows[:2]])
    first = storage.read_checkpoints("ex-1", 0)[0]
    storage.fold(checkpoint(4, 4), [first.seq or 0, rows[2].seq or 0, rows[3].seq or 0])
    assert storage.count_outcomes("ex-1") == 5
    assert [e.folded for e in storage.read_checkpoints("ex-1", 0)] == [4]


def test_fold_refuses_a_wrong_folded_count_and_changes_nothing(storage: Storage) -> None:
    rows = _fold_fixture(storage)
    steps_before = storage.list_steps("ex-1")
    seqs = [e.seq or 0 for e in rows[:3]] + [rows[5].seq or 0]  # three results, one intent
    for wrong in (2, 4):
        with pytest.raises(StorageError) as excinfo:
            storage.fold(checkpoint(3, wrong), seqs)
        assert excinfo.value.op == "fold"
    assert storage.list_steps("ex-1") == steps_before
    assert storage.read_checkpoints("ex-1", 0) == []
    assert storage.count_outcomes("ex-1") == 5
    storage.fold(checkpoint(3, 3), seqs)  # the right count goes through
    assert storage.count_outcomes("ex-1") == 5


def test_fold_never_deletes_the_rows_of_another_execution(storage: Storage) -> None:
    rows = _fold_fixture(storage)
    (theirs,) = storage.read_segment("other", 0, 0, 10)
    with pytest.raises(StorageError):
        storage.fold(checkpoint(1, 2), [rows[0].seq or 0, theirs.seq or 0])
    with pytest.raises(StorageError):
        storage.fold(checkpoint(1, 1), [rows[0].seq or 0, 10_000])  # no such row
    assert storage.read_segment("other", 0, 0, 10) == [theirs]
    assert len(storage.read_segment("ex-1", 0, 0, 100)) == len(rows)
    with pytest.raises(ValueError):
        storage.fold(entry("ex-1", 1), [rows[0].seq or 0])


def test_a_checkpoint_is_not_an_outcome_of_its_step(storage: Storage) -> None:
    rows = _fold_fixture(storage)
    storage.fold(checkpoint(4, 1), [rows[0].seq or 0])
    storage.append([entry("ex-1", 6)])  # the unique index ignores checkpoint rows
    assert storage.count_outcomes("ex-1") == 6


# -- retention ------------------------------------------------------------------------

OFF = RetentionPolicy(
    ttl_completed_ms=1 << 50, ttl_failed_ms=1 << 50, max_executions=0, max_journal_bytes=0
)
"""A policy that removes nothing: tests turn on the rule they exercise."""


def finished(
    storage: Storage,
    execution_id: str,
    status: ExecutionStatus = ExecutionStatus.COMPLETED,
    *,
    created_at_ms: int = 1_000,
    finalized_at_ms: int = 2_000,
    payload: bytes = b"payload",
) -> None:
    """A terminal execution with one result row and one promise."""
    create(storage, execution_id, now_ms=created_at_ms)
    storage.append([entry(execution_id, 0, payload=payload)], signer=_signer)
    storage.create_promise(control(execution_id, 1), promise(f"p-{execution_id}", execution_id, 1))
    storage.finalize_execution(execution_id, status, finalized_at_ms, output=b"out")


def ids(storage: Storage) -> set[str]:
    return {s.execution_id for s in storage.list_executions(limit=10_000)}


@pytest.mark.parametrize("status", TERMINAL)
def test_prune_by_ttl_uses_the_completed_or_the_failed_ttl(
    storage: Storage, status: ExecutionStatus
) -> None:
    finished(storage, "ex-1", status, finalized_at_ms=10_000)
    policy = replace(OFF, ttl_completed_ms=1_000, ttl_failed_ms=5_000)
    ttl = 1_000 if status is ExecutionStatus.COMPLETED else 5_000
    assert storage.prune(policy, 10_000 + ttl - 1) == PruneReport()
    if status is not ExecutionStatus.COMPLETED:
        assert storage.prune(policy, 11_000) == PruneReport()  # past the completed TTL only
    assert storage.prune(policy, 10_000 + ttl) == PruneReport(
        executions=1, journal_rows=2, by_ttl=1
    )
    assert storage.get_execution("ex-1") is None


def test_prune_never_deletes_a_running_execution(storage: Storage) -> None:
    create(storage, "run-1", now_ms=1)
    create(storage, "run-2", now_ms=1)
    storage.append([entry("run-1", 0)])
    finished(storage, "done")
    policy = RetentionPolicy(0, 0, max_executions=1, max_journal_bytes=1, batch_size=1)
    report = storage.prune(policy, 1 << 40)
    assert (report.executions, report.by_ttl) == (1, 1)
    assert ids(storage) == {"run-1", "run-2"}
    assert storage.prune(policy, 1 << 40) == PruneReport()


def test_prune_by_count_cap_removes_the_oldest_terminal_ones(storage: Storage) -> None:
    finished(storage, "f4", finalized_at_ms=4_000)
    finished(storage, "f2-late", created_at_ms=1_500, finalized_at_ms=2_000)
    finished(storage, "f2-early", created_at_ms=1_000, finalized_at_ms=2_000)
    finished(storage, "f3", ExecutionStatus.FAILED, finalized_at_ms=3_000)
    create(storage, "running", now_ms=1)
    report = storage.prune(replace(OFF, max_executions=3), 10_000)
    assert report == PruneReport(executions=2, journal_rows=4, by_count_cap=2)
    assert ids(storage) == {"f3", "f4", "running"}
    assert storage.prune(replace(OFF, max_executions=3), 10_000) == PruneReport()
    # a cap below the number of running executions removes every terminal one and stops
    assert storage.prune(replace(OFF, max_executions=0 + 1), 10_000).by_count_cap == 2
    assert ids(storage) == {"running"}


def test_prune_by_size_cap_removes_the_oldest_terminal_ones_until_under(storage: Storage) -> None:
    # each finished execution stores 6 (inputs) + 100 (journal) + 3 (output) bytes and two
    # journal rows; its promise resolves with 50 more: 159 bytes
    for n in range(4):
        finished(storage, f"f{n}", finalized_at_ms=2_000 + n, payload=b"x" * 100)
        storage.settle_promise(f"p-f{n}", PromiseState.RESOLVED, b"v" * 50, 3_000)
    create(storage, "running", now_ms=1)  # 6 bytes
    storage.append([entry("running", 0, payload=b"r" * 100)])  # 106 in all
    total = 4 * 159 + 106
    assert storage.prune(replace(OFF, max_journal_bytes=total), 10_000) == PruneReport()
    report = storage.prune(replace(OFF, max_journal_bytes=total - 159 - 1), 10_000)
    assert report == PruneReport(executions=2, journal_rows=4, by_size_cap=2)
    assert ids(storage) == {"f2", "f3", "running"}
    report = storage.prune(replace(OFF, max_journal_bytes=1), 10_000)
    assert report.by_size_cap == 2
    assert ids(storage) == {"running"}


def test_prune_respects_the_batch_size_and_prunes_everything_eligible(storage: Storage) -> None:
    for n in range(7):
        finished(storage, f"ex-{n}", finalized_at_ms=1_000 + n)
    report = storage.prune(replace(OFF, ttl_completed_ms=0, batch_size=3), 10_000)
    assert report == PruneReport(executions=7, journal_rows=14, by_ttl=7)
    assert ids(storage) == set()
    assert not storage.has_executions()


def test_prune_tells_its_caller_each_batch_once_deleted_and_a_dry_run_nothing(
    storage: Storage,
) -> None:
    for n in range(7):
        finished(storage, f"ex-{n}", finalized_at_ms=1_000 + n)
    create(storage, "running")
    heard: list[list[str]] = []

    def on_pruned(batch: Sequence[str]) -> None:
        assert [storage.get_execution(e) for e in batch] == [None] * len(batch)  # committed
        heard.append(list(batch))

    policy = replace(OFF, ttl_completed_ms=0, batch_size=3)
    storage.prune(policy, 10_000, dry_run=True, on_pruned=on_pruned)
    assert heard == []
    storage.prune(policy, 10_000, on_pruned=on_pruned)
    assert heard == [["ex-0", "ex-1", "ex-2"], ["ex-3", "ex-4", "ex-5"], ["ex-6"]]


def test_prune_goes_through_every_batch_when_on_pruned_raises(storage: Storage) -> None:
    for n in range(7):
        finished(storage, f"ex-{n}", finalized_at_ms=1_000 + n)
    heard: list[list[str]] = []

    def on_pruned(batch: Sequence[str]) -> None:
        heard.append(list(batch))
        raise OSError("lock files cannot be removed")

    policy = replace(OFF, ttl_completed_ms=0, batch_size=3)
    report = storage.prune(policy, 10_000, on_pruned=on_pruned)
    assert report == PruneReport(executions=7, journal_rows=14, by_ttl=7)
    assert ids(storage) == set()
    assert heard == [["ex-0", "ex-1", "ex-2"], ["ex-3", "ex-4", "ex-5"], ["ex-6"]]


def test_prune_dry_run_changes_nothing_and_reports_what_a_run_removes(storage: Storage) -> None:
    finished(storage, "ttl", ExecutionStatus.FAILED, finalized_at_ms=1_000)
    for n in range(5):
        finished(storage, f"f{n}", finalized_at_ms=5_000 + n, payload=b"x" * 100)
    create(storage, "running")
    policy = RetentionPolicy(
        ttl_completed_ms=1 << 40,
        ttl_failed_ms=5_000,
        max_executions=5,
        max_journal_bytes=300,  # f1..f4 hold 109 bytes each, "running" 6
        batch_size=2,
    )
    before = (storage.list_executions(limit=100), storage.max_seq(), storage.list_steps("f0"))
    dry = storage.prune(policy, 7_000, dry_run=True)
    assert dry == PruneReport(executions=4, journal_rows=8, by_ttl=1, by_count_cap=1, by_size_cap=2)
    assert storage.prune(policy, 7_000, dry_run=True) == dry
    assert (storage.list_executions(limit=100), storage.max_seq(), storage.list_steps("f0")) == (
        before
    )
    assert storage.prune(policy, 7_000) == dry
    assert ids(storage) == {"f3", "f4", "running"}


def test_prune_removes_journal_rows_promises_timers_and_integrity(storage: Storage) -> None:
    finished(storage, "gone")
    storage.arm_timer(control("gone", 2), timer("t-gone", 5_000, "gone", 2))
    finished(storage, "kept", finalized_at_ms=9_000)
    storage.arm_timer(control("kept", 2), timer("t-kept", 5_000, "kept", 2))
    report = storage.prune(replace(OFF, ttl_completed_ms=5_000), 8_000)
    assert report == PruneReport(executions=1, journal_rows=3, by_ttl=1)
    assert storage.get_execution("gone") is None
    assert storage.list_steps("gone") == []
    assert storage.get_promise("p-gone") is None
    assert storage.read_integrity("gone") is None
    assert [t.timer_id for t in storage.due_timers(10_000, 10)] == ["t-kept"]
    assert len(storage.list_steps("kept")) == 3
    assert storage.get_promise("p-kept") is not None
    assert storage.read_integrity("kept") == (1, b"kept:1")
    # the id can be used again from scratch
    create(storage, "gone")
    storage.append([entry("gone", 0)])
    assert storage.count_outcomes("gone") == 1


def test_prune_spares_a_reopened_execution(storage: Storage) -> None:
    finished(storage, "ex-1", finalized_at_ms=1_000)
    storage.reopen_execution("ex-1", 2_000)
    policy = RetentionPolicy(0, 0, max_executions=1, max_journal_bytes=1, batch_size=10)
    assert storage.prune(policy, 1 << 40, dry_run=True) == PruneReport()
    assert storage.prune(policy, 1 << 40) == PruneReport()
    assert ids(storage) == {"ex-1"}
    assert len(storage.list_steps("ex-1")) == 2


def test_prune_racing_reopen_never_leaves_a_half_deleted_execution(storage: Storage) -> None:
    policy = replace(OFF, ttl_completed_ms=0, batch_size=1)
    for trial in range(20):
        eid = f"race-{trial}"
        finished(storage, eid, finalized_at_ms=1_000)
        storage.arm_timer(control(eid, 2), timer(f"t-{eid}", 5_000, eid, 2))

        # vary who reaches the write lock first: either thread may wait up to 0.6 ms
        skew = (trial % 5 - 2) * 0.0003

        def act(i: int, eid: str = eid, skew: float = skew) -> str:
            if i == 0:
                time.sleep(max(-skew, 0))
                return "pruned" if storage.prune(policy, 5_000).executions else "spared"
            time.sleep(max(skew, 0))
            try:
                storage.reopen_execution(eid, 4_000)
            except UnknownExecution:
                return "gone"
            return "reopened"

        pruner, reopener = run_concurrently(2, act)
        record = storage.get_execution(eid)
        timers = {t.timer_id for t in storage.due_timers(1 << 40, 1_000)}
        if record is None:
            assert (pruner, reopener) == ("pruned", "gone")
            assert storage.list_steps(eid) == []
            assert storage.get_promise(f"p-{eid}") is None
            assert storage.read_integrity(eid) is None
            assert f"t-{eid}" not in timers
        else:
            assert (pruner, reopener) == ("spared", "reopened")
            assert record.status is ExecutionStatus.RUNNING
            assert len(storage.list_steps(eid)) == 3
            assert storage.get_promise(f"p-{eid}") is not None
            assert storage.read_integrity(eid) == (1, f"{eid}:1".encode())
            assert f"t-{eid}" in timers


def test_stale_running_lists_running_executions_not_updated_since(storage: Storage) -> None:
    create(storage, "new", now_ms=3_000)
    create(storage, "old", now_ms=1_000)
    create(storage, "mid", now_ms=2_000)
    create(storage, "done", now_ms=500)
    storage.finalize_execution("done", ExecutionStatus.FAILED, 600)
    create(storage, "touched", now_ms=100)
    storage.abort_generation("touched", 0, 5_000)  # bumps updated_at
    assert storage.stale_running(3_000, 10) == [("old", "wf"), ("mid", "wf")]
    assert storage.stale_running(3_001, 1) == [("old", "wf")]
    assert storage.stale_running(1_000, 10) == []
    assert storage.stale_running(10_000, 0) == []


# -- queued work ----------------------------------------------------------------------


def enqueue(
    storage: Storage, execution_id: str, now_ms: int, queue: str = "q", wf: str = "wf"
) -> None:
    _, created = storage.enqueue_execution(execution_id, wf, b"inputs", queue, now_ms)
    assert created


def claims(storage: Storage) -> Claims:
    """A claimant taking real ownership locks of the storage (files, sessions, in-process)."""
    return Claims(ownership_for(storage))


def test_enqueue_inserts_a_running_row_in_its_queue_and_is_idempotent(storage: Storage) -> None:
    record, created = storage.enqueue_execution("ex-1", "wf", b"inputs", "emails", 1_000)
    assert created
    assert (record.status, record.queue, record.inputs) == (
        ExecutionStatus.RUNNING,
        "emails",
        b"inputs",
    )
    again, created = storage.enqueue_execution("ex-1", "other", b"changed", "reports", 2_000)
    assert not created
    assert again == record == storage.get_execution("ex-1")
    started = create(storage, "ex-2")
    assert started.queue is None
    _, created = storage.enqueue_execution("ex-2", "wf", b"x", "emails", 3_000)
    assert not created and storage.get_execution("ex-2") == started


def test_running_executions_leave_queued_ones_to_workers(storage: Storage) -> None:
    create(storage, "started", 1_000)
    enqueue(storage, "queued", 500)
    assert storage.running_executions() == [("started", "wf")]


def test_claim_takes_the_oldest_of_its_queue_and_registered_workflows(storage: Storage) -> None:
    for i, eid in enumerate(["c", "a", "b", "d"]):
        enqueue(storage, eid, 1_000 + i)
    enqueue(storage, "elsewhere", 1, queue="other")
    enqueue(storage, "unknown-wf", 2, wf="nobody-runs-this")
    create(storage, "started", 3)
    claimant = claims(storage)
    try:
        assert storage.claim_queued("q", 2, claimant, ["wf"]) == [("c", "wf"), ("a", "wf")]
        assert claimant.is_owned("c") and claimant.is_owned("a") and not claimant.is_owned("b")
        # Owned executions are not claimed again, by anyone.
        other = claims(storage)
        assert storage.claim_queued("q", 10, other, ["wf"]) == [("b", "wf"), ("d", "wf")]
        other.release_all()
        assert storage.claim_queued("q", 0, claims(storage), ["wf"]) == []
        assert storage.claim_queued("q", 5, claims(storage), []) == []
    finally:
        claimant.release_all()


def test_a_released_claim_is_claimable_again_and_an_ended_one_never(storage: Storage) -> None:
    enqueue(storage, "a", 1)
    enqueue(storage, "b", 2)
    first = claims(storage)
    assert storage.claim_queued("q", 2, first, ["wf"]) == [("a", "wf"), ("b", "wf")]
    assert storage.finalize_execution("a", ExecutionStatus.COMPLETED, 10)
    first.release_all()  # as a worker that dies: its locks lapse
    second = claims(storage)
    try:
        assert storage.claim_queued("q", 5, second, ["wf"]) == [("b", "wf")]
    finally:
        second.release_all()


def test_claim_keeps_the_queue_within_its_cap(storage: Storage) -> None:
    for i in range(6):
        enqueue(storage, f"e{i}", i)
    holder = claims(storage)
    try:
        assert len(storage.claim_queued("q", 2, holder, ["wf"], cap=3)) == 2
        other = claims(storage)
        assert storage.claim_queued("q", 5, other, ["wf"], cap=3) == [("e2", "wf")]
        assert storage.claim_queued("q", 5, claims(storage), ["wf"], cap=3) == []
        other.release_all()
        assert len(storage.claim_queued("q", 5, other, ["wf"], cap=3)) == 1
        assert storage.claim_queued("q", 5, claims(storage), ["wf"], cap=0) == [
            ("e3", "wf"),
            ("e4", "wf"),
            ("e5", "wf"),
        ]  # no cap: everything left
    finally:
        holder.release_all()


def test_concurrent_claimers_never_share_an_execution_nor_pass_the_cap(storage: Storage) -> None:
    for i in range(20):
        enqueue(storage, f"e{i:02d}", i)
    claimants = [claims(storage) for _ in range(4)]
    try:
        got = run_concurrently(
            4, lambda i: storage.claim_queued("q", 3, claimants[i], ["wf"], cap=5)
        )
        ids = [eid for batch in got for eid, _ in batch]
        assert len(ids) == len(set(ids)) == 5
        got = run_concurrently(4, lambda i: storage.claim_queued("q", 3, claimants[i], ["wf"]))
        more = [eid for batch in got for eid, _ in batch]
        assert 0 < len(more) == len(set(more)) <= 12 and not set(more) & set(ids)
        # Skipped rows (locked by a concurrent claimer) wait for the next claim.
        rest = [eid for eid, _ in storage.claim_queued("q", 20, claimants[0], ["wf"])]
        assert sorted(ids + more + rest) == [f"e{i:02d}" for i in range(20)]
    finally:
        for claimant in claimants:
            claimant.release_all()

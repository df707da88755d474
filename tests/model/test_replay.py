"""The segment-buffered replay cursor (ref §4.4): classification, segments, O(segment) memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from unbroken.journal import EntryKind, JournalEntry
from unbroken.replay import ReplayCursor, row_of


def _row(step: int, kind: EntryKind, seq: int) -> JournalEntry:
    return JournalEntry("e", 0, step, kind, f"s{step}", "idempotent", bytes(32), b"1", 0, seq)


def _journal(kinds_per_step: list[list[EntryKind]]) -> list[JournalEntry]:
    rows, seq = [], 0
    for step, kinds in enumerate(kinds_per_step):
        for kind in kinds:
            seq += 1
            rows.append(_row(step, kind, seq))
    return rows


def _read(rows: list[JournalEntry], from_step: int, limit: int) -> list[JournalEntry]:
    chosen = sorted((r for r in rows if r.step_id >= from_step), key=lambda r: (r.step_id, r.seq))
    return chosen[:limit]


def _lookup(cursor: ReplayCursor, rows: list[JournalEntry], step: int):  # type: ignore[no-untyped-def]
    while (from_step := cursor.needs(step)) is not None:
        cursor.feed([row_of(r) for r in _read(rows, from_step, cursor.row_limit)])
    return cursor.take(step)


def test_lookup_classifies_result_intent_error_and_fresh() -> None:
    rows = _journal([[EntryKind.RESULT], [EntryKind.INTENT], [EntryKind.INTENT, EntryKind.RESULT],
                     [EntryKind.ERROR]])
    cursor = ReplayCursor(segment_steps=2)
    first = _lookup(cursor, rows, 0)
    assert first is not None and first.result is not None and first.intent is None
    ambiguous = _lookup(cursor, rows, 1)
    assert ambiguous is not None and ambiguous.intent is not None and ambiguous.outcome is None
    both = _lookup(cursor, rows, 2)
    assert both is not None and both.outcome is both.result and both.intent is not None
    failed = _lookup(cursor, rows, 3)
    assert failed is not None and failed.outcome is failed.error
    assert _lookup(cursor, rows, 4) is None
    assert cursor.exhausted


def test_a_second_lookup_of_a_step_is_fresh_consume_on_lookup() -> None:
    rows = _journal([[EntryKind.RESULT]])
    cursor = ReplayCursor()
    assert _lookup(cursor, rows, 0) is not None
    assert _lookup(cursor, rows, 0) is None


def test_segmented_reads_cover_a_long_journal_in_bounded_memory() -> None:
    rows = _journal([[EntryKind.INTENT, EntryKind.RESULT]] * 25 + [[EntryKind.RESULT]] * 475)
    cursor = ReplayCursor(segment_steps=10)
    peak = 0
    for step in range(500):
        found = _lookup(cursor, rows, step)
        assert found is not None and found.result is not None and found.result.step_id == step
        peak = max(peak, cursor.resident)
    assert peak <= 20
    assert cursor.segments_read >= 500 // 20


@given(
    st.lists(
        st.sampled_from(
            [
                [EntryKind.RESULT],
                [EntryKind.INTENT],
                [EntryKind.INTENT, EntryKind.RESULT],
                [EntryKind.ERROR],
                [EntryKind.CONTROL],
            ]
        ),
        max_size=60,
    ),
    st.integers(min_value=1, max_value=7),
    st.randoms(use_true_random=False),
)
def test_any_journal_and_any_lookup_order_within_segments_is_exact(kinds, segment, rnd) -> None:  # type: ignore[no-untyped-def]
    rows = _journal(kinds)
    cursor = ReplayCursor(segment_steps=segment)
    order = list(range(len(kinds) + 3))
    # out-of-order lookups inside a window of the segment size, as gather produces
    for start in range(0, len(order), segment):
        chunk = order[start : start + segment]
        rnd.shuffle(chunk)
        order[start : start + segment] = chunk
    for step in order:
        found = _lookup(cursor, rows, step)
        expected = [r for r in rows if r.step_id == step]
        if not expected:
            assert found is None
            continue
        assert found is not None
        got = [e for e in (found.intent, found.result, found.error, found.control) if e is not None]
        assert sorted(e.kind for e in got) == sorted(r.kind for r in expected)
        assert all(e.step_id == step and e.name == f"s{step}" for e in got)


def test_take_result_hands_over_a_result_under_the_key_once_read() -> None:
    rows = _journal([[EntryKind.RESULT], [EntryKind.INTENT, EntryKind.RESULT],
                     [EntryKind.ERROR], [EntryKind.CONTROL], [EntryKind.RESULT]])
    cursor = ReplayCursor(segment_steps=10)
    key = bytes(32)
    assert cursor.take_result(0, key) is None  # nothing read yet: a read decides
    cursor.preload([row_of(rows[0])])
    assert cursor.take_result(0, key) is None  # preloaded, but a read could add rows
    _lookup(cursor, rows, 0)  # reads the journal (and takes step 0)
    assert cursor.take_result(4, bytes(31) + b"\x01") is None  # another key: divergence
    for step in (2, 3):  # an error, a control row: the full lookup
        assert cursor.take_result(step, key) is None
        assert cursor.take(step) is not None
    assert cursor.take_result(1, key) == row_of(rows[2])  # the result beside the intent
    assert cursor.take(1) is None  # the step's rows went with it
    row = cursor.take_result(4, key)
    assert row == row_of(rows[-1])
    assert cursor.take_result(4, key) is None and cursor.take(4) is None  # consumed

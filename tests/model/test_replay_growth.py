"""The replay cursor's growing segments: fewer reads for small steps, bounded by steps and
by payload bytes, and lookups as exact as with fixed segments (ref §4.4)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from unbroken.journal import EntryKind, JournalEntry
from unbroken.replay import ReplayCursor, row_of


def _journal(steps: int, *, rows_per_step: int = 1, size: int = 1) -> list[JournalEntry]:
    kinds = [EntryKind.INTENT, EntryKind.RESULT][-rows_per_step:]
    rows, seq = [], 0
    for step in range(steps):
        for kind in kinds:
            seq += 1
            payload = b"x" * size
            rows.append(
                JournalEntry("e", 0, step, kind, "s", "idempotent", bytes(32), payload, 0, seq)
            )
    return rows


def _read(rows: list[JournalEntry], from_step: int, limit: int) -> list[JournalEntry]:
    return [r for r in rows if r.step_id >= from_step][:limit]


def _replay_all(cursor: ReplayCursor, rows: list[JournalEntry], steps: int) -> list[int]:
    """Look every step up in order; return the row limit of each read."""
    limits = []
    for step in range(steps):
        while (from_step := cursor.needs(step)) is not None:
            limits.append(cursor.row_limit)
            cursor.feed([row_of(r) for r in _read(rows, from_step, cursor.row_limit)])
        found = cursor.take(step)
        assert found is not None and found.result is not None and found.result.step_id == step
        assert cursor.resident <= cursor.row_limit
    return limits


def test_segments_double_up_to_the_step_bound() -> None:
    rows = _journal(2000)
    cursor = ReplayCursor(10, max_segment_steps=80)
    limits = _replay_all(cursor, rows, 2000)
    assert limits[:4] == [20, 40, 80, 160]
    assert set(limits[4:]) == {160}
    assert cursor.segments_read == len(limits) < 2000 // 20


def test_without_a_bound_segments_keep_their_size() -> None:
    rows = _journal(300)
    cursor = ReplayCursor(10)
    assert set(_replay_all(cursor, rows, 300)) == {20}


def test_segments_of_large_payloads_stop_growing() -> None:
    rows = _journal(400, size=1000)
    cursor = ReplayCursor(10, max_segment_steps=1000, segment_bytes=50_000)
    limits = _replay_all(cursor, rows, 400)
    # 20 rows hold 20 kB (< 25 kB, half the budget): grow once; 40 rows hold 40 kB: stop.
    assert limits[:3] == [20, 40, 40]
    assert max(limits) == 40


def test_steps_with_several_rows_grow_and_replay_exactly() -> None:
    rows = _journal(500, rows_per_step=2)
    cursor = ReplayCursor(3, max_segment_steps=48)
    limits = _replay_all(cursor, rows, 500)
    assert max(limits) == 96
    assert cursor.take(500) is None and cursor.exhausted


@given(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=40),
    st.sampled_from([1, 2]),
)
def test_any_length_and_bounds_replay_every_step_once(
    steps: int, segment: int, growth: int, rows_per_step: int
) -> None:
    rows = _journal(steps, rows_per_step=rows_per_step)
    cursor = ReplayCursor(segment, max_segment_steps=segment * growth)
    _replay_all(cursor, rows, steps)
    while (from_step := cursor.needs(steps)) is not None:
        cursor.feed([row_of(r) for r in _read(rows, from_step, cursor.row_limit)])
    assert cursor.take(steps) is None
    assert cursor.exhausted and cursor.resident == 0
    assert cursor.row_limit <= 2 * segment * growth

"""Journal records: the fast constructor of the step path builds the same frozen record."""

from __future__ import annotations

import dataclasses

import pytest

from unbroken.journal import EntryKind, JournalEntry, _EntryDraft, new_entry


def test_new_entry_builds_the_record_the_constructor_builds() -> None:
    fields = ("order-42", 1, 7, EntryKind.RESULT, "charge", "idempotent", b"k" * 32, b"p", 5)
    fast = new_entry(*fields, b"mac")
    assert type(fast) is JournalEntry
    assert fast == JournalEntry(*fields, hmac=b"mac")
    assert hash(fast) == hash(JournalEntry(*fields, hmac=b"mac"))
    assert (fast.seq, fast.folded) == (None, 0)
    assert dataclasses.replace(fast, seq=3).seq == 3


def test_a_new_entry_is_frozen() -> None:
    entry = new_entry("e", 0, 0, EntryKind.RESULT, "s", "idempotent", b"k", None, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.step_id = 1  # type: ignore[misc]


def test_the_draft_has_the_record_s_fields_in_its_order() -> None:
    def layout(cls: type) -> list[tuple[str, object]]:
        return [(f.name, f.default) for f in dataclasses.fields(cls)]

    assert layout(_EntryDraft) == layout(JournalEntry)
    assert _EntryDraft.__slots__ == JournalEntry.__slots__  # type: ignore[attr-defined]

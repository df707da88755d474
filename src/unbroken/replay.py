"""The segment-buffered replay cursor, which does no I/O itself (layer: model).

Resuming an execution reads its journal in segments; each step is removed from the window
when it is looked up (consume-on-lookup), so memory stays O(segment) whatever the
execution's length (ref §4.4). The cursor says which segment it needs (``needs``); the
caller reads it from storage and hands the rows back (``feed``).

The first segment holds ``segment_steps`` steps. With ``max_segment_steps`` above that,
each full segment doubles the next one, up to that many steps and as long as the
segment just read held under ``segment_bytes`` of payload: a long journal of small
steps is read in few round trips, one of large steps stays in small segments.

Rows are grouped per step generically: a step may have an intent, a result or an error,
and control rows; a read of ``2 × steps`` rows may cut the last step's group in two, so
that step is read again with the next segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from .journal import EntryKind, JournalEntry

__all__ = ["ReplayCursor", "StepRows"]

SEGMENT_BYTES = 1 << 20
"""Payload bytes of a segment past which the next segment does not grow."""


@dataclass(slots=True)
class StepRows:
    """What the journal holds for one step of the current generation."""

    result: JournalEntry | None = None
    error: JournalEntry | None = None
    intent: JournalEntry | None = None
    control: JournalEntry | None = None

    def add(self, entry: JournalEntry) -> None:
        """File a row under its kind."""
        if entry.kind is EntryKind.RESULT:
            self.result = entry
        elif entry.kind is EntryKind.ERROR:
            self.error = entry
        elif entry.kind is EntryKind.INTENT:
            self.intent = entry
        elif entry.kind is EntryKind.CONTROL:
            self.control = entry

    @property
    def outcome(self) -> JournalEntry | None:
        """The row that decides the step: its result or error (a result wins)."""
        return self.result or self.error

    @property
    def any(self) -> JournalEntry:
        """A row that carries the step's key, name and effect class."""
        entry = self.result or self.error or self.intent or self.control
        assert entry is not None
        return entry


class ReplayCursor:
    """Walks one generation of an execution's journal, a segment at a time."""

    def __init__(
        self,
        segment_steps: int = 100,
        *,
        max_segment_steps: int = 0,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self.segment_steps = max(segment_steps, 1)
        self._max_rows = 2 * max(max_segment_steps, self.segment_steps)
        self._segment_bytes = segment_bytes
        self.row_limit = 2 * self.segment_steps
        """The row limit of the next read."""
        self._window: dict[int, StepRows] = {}
        self._next = 0
        self._exhausted = False
        self.segments_read = 0

    @property
    def exhausted(self) -> bool:
        """Whether the whole journal has been read."""
        return self._exhausted

    def needs(self, step_id: int) -> int | None:
        """The ``from_step`` of the segment to read before ``step_id`` can be answered."""
        if self._exhausted or step_id < self._next:
            return None
        return self._next

    def feed(self, rows: list[JournalEntry]) -> None:
        """Merge one segment read with ``from_step = needs(...)`` and ``limit = row_limit``."""
        limit = self.row_limit
        self.segments_read += 1
        if len(rows) < limit:
            self._insert(rows)
            self._exhausted = True
            if rows:
                self._next = rows[-1].step_id + 1
            return
        last = rows[-1].step_id
        if rows[0].step_id == last:
            # One step filled the whole read: take it all so the cursor always advances.
            self._insert(rows)
            self._next = last + 1
        else:
            self._insert([row for row in rows if row.step_id != last])
            self._next = last
        self._grow(rows, limit)

    def _grow(self, rows: list[JournalEntry], limit: int) -> None:
        """Double the next read after a full one, within the step and byte bounds."""
        if limit >= self._max_rows:
            return
        size = 0
        for row in rows:
            if row.payload is not None:
                size += len(row.payload)
        if size < self._segment_bytes // 2:
            self.row_limit = min(2 * limit, self._max_rows)

    def preload(self, rows: list[JournalEntry]) -> None:
        """Add rows that live outside the segments: a checkpoint's folded steps."""
        self._insert(rows)

    def take(self, step_id: int) -> StepRows | None:
        """Remove and return what the journal holds for ``step_id`` (``None``: fresh)."""
        return self._window.pop(step_id, None)

    @property
    def resident(self) -> int:
        """Steps held in memory now."""
        return len(self._window)

    def _insert(self, rows: list[JournalEntry]) -> None:
        window = self._window
        for row in rows:
            slot = window.get(row.step_id)
            if slot is None:
                slot = window[row.step_id] = StepRows()
            slot.add(row)

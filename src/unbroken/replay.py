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

The window holds rows as storage returns them (``ReplayRow`` tuples, no records): a
step replayed from its result (most steps of a long journal) is handed over as that row
by ``take_result``. ``take`` files a step's rows as journal records (``StepRows``) for
everything else: errors, the ambiguous window, control rows, divergence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .journal import EntryKind, JournalEntry

__all__ = ["ReplayCursor", "ReplayRow", "StepRows", "row_of"]

ReplayRow = tuple[int, str, str, str, bytes, bytes | None, bytes | None]
"""One journal row as replay reads it: ``(step_id, kind, name, effect, idem_key, payload,
hmac)``, the kind as its stored string."""

_KINDS = {kind.value: kind for kind in EntryKind}

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
        execution_id: str = "",
        generation: int = 0,
    ) -> None:
        self.segment_steps = max(segment_steps, 1)
        self._max_rows = 2 * max(max_segment_steps, self.segment_steps)
        self._segment_bytes = segment_bytes
        self._execution_id = execution_id
        self._generation = generation
        self.row_limit = 2 * self.segment_steps
        """The row limit of the next read."""
        self._window: dict[int, Any] = {}
        """A step's row, or the list of its rows when it has several."""
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

    def feed(self, rows: list[ReplayRow]) -> None:
        """Merge one segment read with ``from_step = needs(...)`` and ``limit = row_limit``."""
        limit = self.row_limit
        self.segments_read += 1
        if len(rows) < limit:
            self._insert(rows)
            self._exhausted = True
            if rows:
                self._next = rows[-1][0] + 1
            return
        last = rows[-1][0]
        if rows[0][0] == last:
            # One step filled the whole read: take it all so the cursor always advances.
            self._insert(rows)
            self._next = last + 1
        else:
            cut = len(rows) - 1
            while rows[cut - 1][0] == last:
                cut -= 1
            self._insert(rows[:cut])
            self._next = last
        self._grow(rows, limit)

    def _grow(self, rows: list[ReplayRow], limit: int) -> None:
        """Double the next read after a full one, within the step and byte bounds."""
        if limit >= self._max_rows:
            return
        size = 0
        for row in rows:
            payload = row[5]
            if payload is not None:
                size += len(payload)
        if size < self._segment_bytes // 2:
            self.row_limit = min(2 * limit, self._max_rows)

    def preload(self, rows: list[ReplayRow]) -> None:
        """Add rows that live outside the segments: a checkpoint's folded steps."""
        self._insert(rows)

    def take_result(self, step_id: int, idem_key: bytes) -> ReplayRow | None:
        """If no read is needed (``needs``) and the step has a result row under
        ``idem_key``, remove the step's rows and return that one (a result decides the
        step whatever else it holds, as in ``StepRows``); otherwise change nothing and
        return ``None`` (``needs`` and ``take`` decide)."""
        row = self._window.get(step_id)
        if type(row) is list:  # an intent, a control row beside the result
            row = next((r for r in row if r[1] == "result"), None)
        if (
            row is None
            or row[1] != "result"
            or row[4] != idem_key
            or (step_id >= self._next and not self._exhausted)  # a read may add rows
        ):
            return None
        del self._window[step_id]
        return row  # type: ignore[no-any-return]

    def take(self, step_id: int) -> StepRows | None:
        """Remove and return what the journal holds for ``step_id`` (``None``: fresh)."""
        held = self._window.pop(step_id, None)
        if held is None:
            return None
        found = StepRows()
        for row in held if type(held) is list else (held,):
            found.add(self._entry(row))
        return found

    def _entry(self, row: ReplayRow) -> JournalEntry:
        """The journal record of a row (replay reads no commit time or ``seq``: 0, None)."""
        step_id, kind, name, effect, idem_key, payload, hmac = row
        return JournalEntry(
            self._execution_id,
            self._generation,
            step_id,
            _KINDS[kind],
            name,
            effect,
            idem_key,
            payload,
            0,
            hmac=hmac,
        )

    @property
    def resident(self) -> int:
        """Steps held in memory now."""
        return len(self._window)

    def _insert(self, rows: list[ReplayRow]) -> None:
        window = self._window
        for row in rows:
            step_id = row[0]
            held = window.get(step_id)
            if held is None:
                window[step_id] = row
            elif type(held) is list:
                held.append(row)
            else:
                window[step_id] = [held, row]


def row_of(entry: JournalEntry) -> ReplayRow:
    """A journal record as replay reads it."""
    return (
        entry.step_id,
        entry.kind.value,
        entry.name,
        entry.effect,
        entry.idem_key,
        entry.payload,
        entry.hmac,
    )

"""The checkpoint fold, and the reads that feed replay (layer: engine).

When an execution passes 90% of ``max_steps_per_execution`` a background task folds the
committed outcome rows of its idempotent steps below that point into one sealed
checkpoint row (ref §6.4). The rows keep their own sealed payloads inside the snapshot, so
a replay preloads them into the cursor and opens them exactly as before; the checkpoint
records how many outcome rows it replaced, so the signed high-water mark still matches.
A fold never runs on the step hot path, and never folds a guarded step (INV-13 finds those
by key).

``ReplayReader`` feeds a generation's replay cursor: the checkpoints' folded rows first,
then the journal's segments, growing from ``replay_segment_steps`` steps to
``SEGMENT_GROWTH`` times that while the payloads are small (see ``replay``). Its
``replayed`` is the replay fast path: the value of a step whose result is journaled under
the caller's key, opened straight from the row storage returned.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from .effects import EffectClass
from .errors import DecodeError, IntegrityError, PayloadTooLarge, StepFailed
from .journal import EntryKind, JournalEntry
from .replay import ReplayCursor, StepRows, row_of
from .runtime import IntegrityAbort, RunServices, now_ms

__all__ = ["MISS", "ReplayReader", "fold", "fold_point", "open_outcome", "read_folded"]

log = logging.getLogger("unbroken")

_READ_ROWS = 1000
_ROW_OVERHEAD = 160
"""A folded row's encoded size beyond its payload (name, key, numbers, JSON framing)."""


_CHECKPOINT_KEY = bytes(32)
"""A checkpoint row's key: it stands for no single step."""

SEGMENT_GROWTH = 16
"""A replay segment grows up to this many times ``replay_segment_steps`` (small payloads)."""

MISS: Any = object()
"""What ``ReplayReader.replayed`` returns when the full lookup has to decide."""


class ReplayReader:
    """Reads one generation's journal into its replay cursor: the checkpoints' folded
    rows first, then the segments, each when a lookup needs it."""

    __slots__ = ("_cursor", "_lock", "_open_result", "_preloaded", "_run", "fold_at")

    def __init__(self, run: RunServices) -> None:
        steps = run.config.replay_segment_steps
        self._run = run
        self._cursor = ReplayCursor(
            steps,
            max_segment_steps=steps * SEGMENT_GROWTH,
            execution_id=run.execution_id,
            generation=run.generation,
        )
        self._lock = asyncio.Lock()
        self._preloaded = False
        self._open_result: Callable[[bytes | None, int, bytes], Any] | None = None
        self.fold_at = fold_point(run.config.max_steps_per_execution)
        """Where the step cap's checks and fold start: the full lookup's from there on."""

    def ready(self, step_id: int) -> bool:
        """Whether ``take(step_id)`` can answer without reading."""
        return self._preloaded and self._cursor.needs(step_id) is None

    async def fill(self, step_id: int) -> None:
        """Read until the cursor can answer ``step_id``."""
        if self.ready(step_id):
            return
        async with self._lock:
            run, cursor = self._run, self._cursor
            if not self._preloaded:
                cursor.preload([row_of(entry) for entry in await read_folded(run)])
                self._open_result = run.payloads.opener(run.execution_id, run.generation, "result")
                self._preloaded = True
            while (from_step := cursor.needs(step_id)) is not None:
                rows = await run.read(
                    run.storage.read_replay,
                    run.execution_id,
                    run.generation,
                    from_step,
                    cursor.row_limit,
                )
                cursor.feed(rows)

    async def lookup(self, step_id: int) -> StepRows | None:
        """``fill``, then ``take``."""
        await self.fill(step_id)
        return self._cursor.take(step_id)

    def replayed(self, step_id: int, idem_key: bytes) -> Any:
        """The value of ``step_id`` if the cursor holds, without reading, its result row
        under ``idem_key`` (the step's rows are consumed); else (and before the first
        ``fill``: a run that does not replay) ``MISS`` and nothing changes: the full
        lookup decides (divergence, errors, the ambiguous window, control rows, reads, and
        the step cap and its fold). It never awaits, so the step needs no task entry.

        Raises:
            IntegrityAbort: the row does not open (fail closed, as the full lookup does).
        """
        open_result = self._open_result
        if open_result is None or step_id >= self.fold_at:
            return MISS
        row = self._cursor.take_result(step_id, idem_key)
        if row is None:
            return MISS
        try:
            return open_result(row[5], step_id, idem_key)
        except (IntegrityError, DecodeError, PayloadTooLarge) as exc:
            raise IntegrityAbort(exc) from exc

    @property
    def finished(self) -> bool:
        """Whether every journaled step has been read and taken."""
        return self._cursor.exhausted and self._cursor.resident == 0

    @property
    def cursor(self) -> ReplayCursor:
        """The cursor this reader feeds."""
        return self._cursor


def open_outcome(run: RunServices, name: str, step_id: int, entry: JournalEntry) -> Any:
    """The value of step ``step_id``'s journaled outcome row (an earlier generation's may
    sit at another position); an error row raises its ``StepFailed``.

    Raises:
        StepFailed: the row is the step's journaled error.
        IntegrityError: the row does not open (and what ``open_entry`` raises).
    """
    value = run.payloads.open_entry(entry)
    if entry.kind is not EntryKind.ERROR:
        return value
    if not isinstance(value, dict):
        raise StepFailed(name, step_id, "unknown", "")
    raise StepFailed(name, step_id, str(value.get("type")), str(value.get("message")))


def fold_point(cap: int) -> int:
    """The step from which a run checks its step cap and folds its journal (90% of the
    cap ``max_steps_per_execution``; no cap, 0: never)."""
    return cap * 9 // 10 if cap else sys.maxsize


def _where(run: RunServices, step_id: int) -> dict[str, Any]:
    return {
        "execution_id": run.execution_id,
        "generation": run.generation,
        "step_id": step_id,
        "kind": EntryKind.CHECKPOINT.value,
        "idem_key": _CHECKPOINT_KEY,
    }


async def read_folded(run: RunServices) -> list[JournalEntry]:
    """The rows every checkpoint of this generation replaced, ready for the cursor."""
    rows: list[JournalEntry] = []
    for checkpoint in await run.read(
        run.storage.read_checkpoints, run.execution_id, run.generation
    ):
        snapshot = run.payloads.open_entry(checkpoint)
        rows.extend(
            JournalEntry(
                run.execution_id,
                run.generation,
                item["s"],
                EntryKind(item["k"]),
                item["n"],
                item["e"],
                item["key"],
                item["p"],
                item["at"],
            )
            for item in snapshot
        )
    return rows


async def fold(run: RunServices, up_to: int) -> None:
    """Fold the idempotent outcomes below step ``up_to`` that fit in one payload."""
    try:
        await run.writer.flush()  # the prefix is mostly still buffered when the fold starts
        picked = _fitting(await _prefix(run, up_to), run.config.max_payload_bytes)
        if not picked:
            return
        end = picked[-1].step_id + 1
        snapshot = [
            {
                "s": r.step_id,
                "k": r.kind.value,
                "n": r.name,
                "e": r.effect,
                "key": r.idem_key,
                "p": r.payload,
                "at": r.created_at_ms,
            }
            for r in picked
        ]
        payload = run.payloads.seal(snapshot, "a checkpoint", **_where(run, end))
        checkpoint = JournalEntry(
            run.execution_id,
            run.generation,
            end,
            EntryKind.CHECKPOINT,
            "unbroken.checkpoint",
            "checkpoint",
            _CHECKPOINT_KEY,
            payload,
            now_ms(),
            folded=len(picked),
        )
        seqs = [r.seq for r in picked if r.seq is not None]
        await run.writer.call(lambda s: s.fold(checkpoint, seqs))
        log.info("execution %r: folded %d steps into a checkpoint", run.execution_id, len(seqs))
    except Exception:
        log.warning(
            "checkpoint fold of execution %r failed; the journal is unchanged",
            run.execution_id,
            exc_info=True,
        )


async def _prefix(run: RunServices, up_to: int) -> list[JournalEntry]:
    """Committed idempotent outcome rows of this generation below ``up_to``, by step."""
    found: dict[int, JournalEntry] = {}
    from_step = 0
    while from_step < up_to:
        rows = await run.read(
            run.storage.read_segment, run.execution_id, run.generation, from_step, _READ_ROWS
        )
        for row in rows:
            if (
                row.step_id < up_to
                and row.kind in (EntryKind.RESULT, EntryKind.ERROR)
                and row.effect == EffectClass.IDEMPOTENT.value
            ):
                found[row.step_id] = row
        if len(rows) < _READ_ROWS:
            break
        from_step = max(rows[-1].step_id, from_step + 1)
    return [found[s] for s in sorted(found)]


def _fitting(rows: list[JournalEntry], limit: int) -> list[JournalEntry]:
    """The longest prefix whose snapshot stays within 90% of the payload limit."""
    budget = limit * 9 // 10
    total = 0
    for i, row in enumerate(rows):
        total += len(row.payload or b"") * 4 // 3 + len(row.name) + _ROW_OVERHEAD
        if total > budget:
            return rows[:i]
    return rows

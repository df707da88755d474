"""In-memory tables: the dicts and lists the memory backend keeps rows in (layer: storage).

``MemoryTables`` owns the state every part of ``MemoryStorage`` shares and the one lock
that serialises every call, so each call is atomic; nothing survives the process.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import StorageError
from ..journal import EntryKind, ExecutionRecord, JournalEntry, PromiseRecord, TimerRecord

__all__ = ["OUTCOME_KINDS", "MemoryTables"]

OUTCOME_KINDS = (EntryKind.RESULT, EntryKind.ERROR)
"""The kinds of journal row that record a step's outcome: at most one per step slot."""


class MemoryTables:
    """The tables of ``MemoryStorage`` and its lock; ``seq`` counts from 1."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()  # serialises queue claims (count, then own)
        self._is_open = False
        self._executions: dict[str, ExecutionRecord] = {}
        self._journal: dict[str, list[JournalEntry]] = {}
        self._outcomes: set[tuple[str, int, int]] = set()
        self._last_seq = 0
        self._integrity: dict[str, tuple[int, bytes]] = {}
        self._keys: dict[int, bytes] = {}
        self._promises: dict[str, PromiseRecord] = {}
        self._timers: dict[str, TimerRecord] = {}

    @property
    def lock_dir(self) -> Path | None:
        """``None``: ownership is in-process."""
        return None

    @property
    def display_url(self) -> str:
        """``memory://``."""
        return "memory://"

    def open(self) -> None:
        """Make the storage usable; data kept from an earlier open stays."""
        with self._lock:
            self._is_open = True

    def close(self) -> None:
        """Refuse further calls until ``open``. Idempotent."""
        with self._lock:
            self._is_open = False

    def _check_open(self, op: str) -> None:
        """Raise ``StorageError(op)`` unless open (caller holds the lock)."""
        if not self._is_open:
            raise StorageError(op, "the storage is not open")

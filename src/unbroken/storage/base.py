"""The storage protocol every backend implements (layer: storage).

The protocol is synchronous: ``sqlite3`` is, psycopg has a sync API, and the engine calls
storage only from its writer thread and its reader thread, never from the event loop.
Implementations must be safe to call from several threads at once (one connection per
thread, or a lock).

Semantics every implementation keeps (the contract suite in ``tests/storage`` checks them):

- ``create_execution`` is idempotent on the id: an existing row is returned untouched.
- ``finalize_execution`` and ``abort_generation`` are guarded (``WHERE status='running'``,
  ``WHERE generation=?``): the first writer wins, later calls change nothing.
- ``reopen_execution`` turns ``completed``/``failed``/``aborted`` back into ``running``
  (INV-16) and refuses ``canceled`` with ``ExecutionCanceled`` (INV-16').
- ``append`` writes all entries in one transaction, or none; at most one ``result`` or
  ``error`` row exists per (execution, generation, step).
- ``read_segment`` returns the rows of one generation with ``step_id >= from_step``, ordered
  by ``(step_id, seq)``, at most ``limit`` rows; ``read_replay`` the same rows less the
  checkpoint rows, as ``ReplayRow`` tuples.
- ``enqueue_execution`` is ``create_execution`` for a row that waits in a queue for a
  worker; it is idempotent on the id too. ``running_executions`` leaves queued executions
  out (workers claim them; recovery must not start them beside the queue's limits).
- ``claim_queued`` offers running executions of one queue, oldest first, to the caller's
  ``Claimant`` until it owns ``limit`` of them, never letting the queue's owned executions
  exceed ``cap`` (when ``cap > 0``); claimers of one queue are serialised while they count.
- ``append`` with a ``signer`` also updates, in the same transaction, each execution's
  high-water mark: the count of its committed outcomes (``result`` and ``error`` rows of
  every generation) and ``signer(execution_id, count)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    ExecutionSummary,
    JournalEntry,
    PromiseRecord,
    PromiseState,
    PruneReport,
    RetentionPolicy,
    StepInfo,
    TimerRecord,
)
from ..replay import ReplayRow

__all__ = [
    "PROMISES_TOPIC",
    "SCHEMA_VERSION",
    "WORK_TOPIC",
    "Claimant",
    "Listener",
    "LocalWrites",
    "Notifying",
    "Signer",
    "Storage",
    "outcomes_by_execution",
]

SCHEMA_VERSION = 5
"""The schema version this code writes; a database with a higher one is refused."""

Signer = Callable[[str, int], bytes]
"""``signer(execution_id, committed_outcomes)`` → the signed high-water mark (ref §4.7)."""


WORK_TOPIC = "work"
"""Notified with a queue's name when work is enqueued there or one of its executions ends."""
PROMISES_TOPIC = "promises"
"""Notified with a promise's id when it is resolved or rejected."""


class Listener(Protocol):
    """Notifications of a shared database, received on a connection of their own."""

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """Block up to ``timeout`` seconds; return the ``(topic, payload)`` pairs received
        (empty on timeout or ``interrupt``).

        Raises:
            StorageError: the connection failed; open a new listener.
        """
        ...

    def interrupt(self) -> None:
        """Make a ``wait`` in another thread return now."""
        ...

    def close(self) -> None:
        """Close the connection. Idempotent."""
        ...


@runtime_checkable
class Notifying(Protocol):
    """A storage that tells other processes about new work and settled promises
    (PostgreSQL ``LISTEN/NOTIFY``); the others are polled."""

    def listen(self, topics: Sequence[str]) -> Listener:
        """A new listener for ``topics`` (``WORK_TOPIC``, ``PROMISES_TOPIC``)."""
        ...


T = TypeVar("T")


@runtime_checkable
class LocalWrites(Protocol):
    """A storage on local media (a file, memory) whose commits are cheap enough for the
    event loop's thread to make itself, as long as they never wait for a lock.

    The journal writer commits on the caller's thread through ``try_write`` when its own
    thread is idle, and hands the work to that thread when ``try_write`` declines. A
    storage whose commits are network round trips (PostgreSQL) does not offer it: every
    commit stays on the writer thread.
    """

    def try_write(
        self, fn: Callable[[Any], T], *, isolate: bool = False
    ) -> tuple[bool, T | None]:
        """Run ``fn(self)`` in one write transaction, now, unless another connection
        holds the write lock.

        Returns ``(True, result)`` once committed, or ``(False, None)`` when the lock is
        held elsewhere (nothing ran). ``fn``'s own writes nest in the transaction: its
        second and later ones (every one with ``isolate``) fail alone, without undoing
        the others. An exception out of ``fn`` rolls everything back and propagates. Its
        commits leave moving the log into the database to ``checkpoint``.
        """
        ...

    @property
    def checkpoint_pages(self) -> int:
        """Log pages written by ``try_write`` worth a ``checkpoint``."""
        ...

    def checkpoint(self) -> None:
        """Move committed log pages into the database file, without waiting for readers
        or writers (the writer thread calls it, so the caller of ``try_write`` never
        pays for it)."""
        ...

    def prepare_writes(self) -> None:
        """Open what ``try_write`` commits through now, from this thread (the writer's, as
        it starts), so that the first commit on the caller's thread does not. Blocking."""
        ...


class Claimant(Protocol):
    """Who claims queued executions: takes their ownership locks (INV-15) for the storage."""

    def try_own(self, execution_id: str) -> bool:
        """Take the execution's ownership lock; ``False`` if another owner holds it."""
        ...

    def is_owned(self, execution_id: str) -> bool:
        """Whether any owner (this claimant included) holds the execution's lock now."""
        ...


class Storage(Protocol):
    """A journal store: executions and their journal rows."""

    @property
    def lock_dir(self) -> Path | None:
        """Directory of per-execution lock files, or ``None`` for in-process ownership."""
        ...

    @property
    def display_url(self) -> str:
        """The URL with any password removed: safe for logs and errors."""
        ...

    def open(self) -> None:
        """Connect, create or migrate the schema; refuse foreign or newer databases."""
        ...

    def close(self) -> None:
        """Release every connection. Idempotent."""
        ...

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution unless one exists; return ``(row, created)``."""
        ...

    def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """The execution row, or ``None``."""
        ...

    def reopen_execution(self, execution_id: str, now_ms: int) -> ExecutionRecord:
        """Un-finalize a terminal execution (INV-16); return the row as it is now.

        Raises:
            ExecutionCanceled: the execution was canceled (INV-16').
            UnknownExecution: no such execution.
        """
        ...

    def finalize_execution(
        self,
        execution_id: str,
        status: ExecutionStatus,
        now_ms: int,
        *,
        output: bytes | None = None,
        error_type: str | None = None,
        error: bytes | None = None,
    ) -> bool:
        """Set a terminal status while ``running``; ``False`` if another status won."""
        ...

    def abort_generation(self, execution_id: str, generation: int, now_ms: int) -> int:
        """Mark ``generation`` aborted and start the next one; return the current generation.

        Guarded: if the execution already moved past ``generation`` nothing changes.
        """
        ...

    def list_executions(
        self, *, status: ExecutionStatus | None = None, limit: int = 100
    ) -> list[ExecutionSummary]:
        """Newest first, metadata only."""
        ...

    def running_executions(self) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of every ``running`` execution that is not in a
        queue, oldest first."""
        ...

    # -- queued work ------------------------------------------------------------------

    def enqueue_execution(
        self, execution_id: str, workflow: str, inputs: bytes, queue: str, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution waiting in ``queue`` unless the id exists; return
        ``(row, created)`` (an existing row is returned untouched)."""
        ...

    def claim_queued(
        self,
        queue: str,
        limit: int,
        claimant: Claimant,
        workflows: Sequence[str],
        *,
        cap: int = 0,
    ) -> list[tuple[str, str]]:
        """Claim up to ``limit`` running executions of ``queue`` whose workflow is one of
        ``workflows``, oldest first; return ``(execution_id, workflow)`` of each one
        ``claimant`` now owns.

        With ``cap > 0`` the queue's owned executions (every owner's, as far as the
        backend can see them) plus the new claims never exceed ``cap``: claimers of one
        queue are serialised while they count and claim.
        """
        ...

    # -- journal ----------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        """Insert entries in one transaction; return the last ``seq`` (0 if none)."""
        ...

    def read_segment(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[JournalEntry]:
        """Rows of one generation from ``from_step`` on, by ``(step_id, seq)``."""
        ...

    def read_replay(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[ReplayRow]:
        """``read_segment`` without checkpoint rows, as replay reads it: tuples of the
        columns it needs (``replay.ReplayRow``), no records."""
        ...

    def find_by_key(self, execution_id: str, idem_key: bytes) -> list[JournalEntry]:
        """Every guarded row (effect ``exactly_once_guarded``) of any generation with this
        idempotency key, by ``seq`` (INV-13): only guarded steps are looked up by key."""
        ...

    def list_steps(self, execution_id: str) -> list[StepInfo]:
        """Metadata of every journal row of the execution, by ``seq``."""
        ...

    def max_seq(self) -> int:
        """The highest ``seq`` in the journal, 0 when empty (FR-DE-12)."""
        ...

    # -- integrity and keys -----------------------------------------------------------

    def read_integrity(self, execution_id: str) -> tuple[int, bytes] | None:
        """The signed high-water mark ``(count, mac)`` of an execution, or ``None``."""
        ...

    def count_outcomes(self, execution_id: str) -> int:
        """``result`` and ``error`` rows of the execution, every generation, plus the
        ``folded`` counts of its checkpoint rows."""
        ...

    def key_verifiers(self) -> dict[int, bytes]:
        """Key-check values of every key id that has sealed data here."""
        ...

    def add_key_verifier(self, key_id: int, verifier: bytes, now_ms: int) -> None:
        """Record a key's check value unless one is recorded for that id."""
        ...

    def has_executions(self) -> bool:
        """Whether any execution (hence any payload) is stored."""
        ...

    def count_sealed(self, key_id: int) -> int:
        """Stored blobs and MACs whose first byte names ``key_id``."""
        ...


    # -- promises and timers ----------------------------------------------------------

    def create_promise(self, entry: JournalEntry, promise: PromiseRecord) -> None:
        """Insert a promise's control row and its promise row in one transaction.

        Raises:
            StorageError: the promise id or the control row's slot already exists.
        """
        ...

    def get_promise(self, promise_id: str) -> PromiseRecord | None:
        """The promise row, or ``None``."""
        ...

    def settle_promise(
        self, promise_id: str, state: PromiseState, payload: bytes | None, now_ms: int
    ) -> bool:
        """Resolve or reject a ``pending`` promise; ``False`` if it was not pending."""
        ...

    def promise_states(self, promise_ids: Sequence[str]) -> dict[str, PromiseState]:
        """The state of each promise that exists (one query for many waiters)."""
        ...

    def arm_timer(self, entry: JournalEntry, timer: TimerRecord) -> None:
        """Insert a timer's control row and its timer row in one transaction."""
        ...

    def fire_timer(self, timer_id: str, now_ms: int) -> bool:
        """Mark a timer fired; ``False`` if it was already fired or is unknown."""
        ...

    def due_timers(self, now_ms: int, limit: int) -> list[TimerRecord]:
        """Unfired timers due at or before ``now_ms``, earliest first."""
        ...

    # -- folding and retention --------------------------------------------------------

    def fold(self, checkpoint: JournalEntry, replaced_seqs: Sequence[int]) -> None:
        """Insert a checkpoint row and delete the rows it replaces, in one transaction.

        ``checkpoint.folded`` must equal the number of outcome rows among
        ``replaced_seqs`` so ``count_outcomes`` (and the high-water mark) is unchanged.
        """
        ...

    def read_checkpoints(self, execution_id: str, generation: int) -> list[JournalEntry]:
        """The checkpoint rows of one generation, by ``seq``."""
        ...

    def prune(
        self,
        policy: RetentionPolicy,
        now_ms: int,
        *,
        dry_run: bool = False,
        on_pruned: Callable[[Sequence[str]], None] | None = None,
    ) -> PruneReport:
        """Delete terminal executions past their TTL, then the oldest terminal ones past
        the count and size caps, ``batch_size`` per transaction; ``running`` ones never.

        An execution is deleted with its journal rows, promises, timers and integrity row.
        ``on_pruned`` is given the ids of each batch once it is deleted (committed), on the
        calling thread (what it raises is logged, and pruning goes on); a dry run deletes
        nothing and calls it never.
        """
        ...

    def stale_running(self, updated_before_ms: int, limit: int) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of ``running`` executions not updated since then."""
        ...


_OUTCOME_KINDS = (EntryKind.RESULT, EntryKind.ERROR)


def outcomes_by_execution(entries: Sequence[JournalEntry]) -> dict[str, int]:
    """How many outcome rows (``result``/``error``) a batch adds to each execution."""
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.kind in _OUTCOME_KINDS:
            counts[entry.execution_id] = counts.get(entry.execution_id, 0) + 1
    return counts

"""Journal and execution records (layer: model).

Records are frozen, slotted dataclasses; enum values are the strings the database stores.
Payload fields hold the bytes the codec (and, when configured, the cipher) produced: the
storage layer never interprets them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, cast

__all__ = [
    "EntryKind",
    "ExecutionInfo",
    "ExecutionRecord",
    "ExecutionStatus",
    "ExecutionSummary",
    "JournalEntry",
    "PromiseRecord",
    "PromiseState",
    "PruneReport",
    "RetentionPolicy",
    "StepInfo",
    "TimerRecord",
    "ms_to_datetime",
    "new_entry",
]


class ExecutionStatus(str, Enum):
    """Where an execution stands; ``info.status == "completed"`` holds."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """Whether the status ends the execution (until a reopen, INV-16)."""
        return self is not ExecutionStatus.RUNNING

    def __str__(self) -> str:
        return self.value


class EntryKind(str, Enum):
    """The kind of a journal row."""

    RESULT = "result"
    """A step's committed value."""
    ERROR = "error"
    """A step that failed for good; replayed as ``StepFailed``."""
    INTENT = "intent"
    """A guarded step's intent, committed before its operation runs."""
    CONTROL = "control"
    """A timer, promise or other control point that holds a step id."""
    CHECKPOINT = "checkpoint"
    """A folded prefix of idempotent results."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journal row.

    ``seq`` is assigned by the database on append (global order); it is ``None`` before.
    ``effect`` is an ``EffectClass`` value; ``idem_key`` the 32-byte idempotency key.
    """

    execution_id: str
    generation: int
    step_id: int
    kind: EntryKind
    name: str
    effect: str
    idem_key: bytes
    payload: bytes | None
    created_at_ms: int
    seq: int | None = None
    hmac: bytes | None = None
    """A control entry's MAC (``key_id ‖ mac``) when payloads are encrypted."""
    folded: int = 0
    """On a checkpoint row: how many outcome rows the fold replaced."""


_EntryDraft = make_dataclass(
    "_EntryDraft",
    [(f.name, f.type, field(default=f.default)) for f in fields(JournalEntry)],
    slots=True,
)
"""``JournalEntry``'s fields in its slot layout (derived from it), without its frozen
``__init__`` (which sets each field through ``object.__setattr__``, about a microsecond
per entry)."""


def new_entry(
    execution_id: str,
    generation: int,
    step_id: int,
    kind: EntryKind,
    name: str,
    effect: str,
    idem_key: bytes,
    payload: bytes | None,
    created_at_ms: int,
    hmac: bytes | None = None,
) -> JournalEntry:
    """A new ``JournalEntry`` (equal to one built by its constructor), built the fast way:
    filled in as a draft of the same slot layout, then made a ``JournalEntry``, frozen
    from then on. Every step journals one; nothing else needs this."""
    entry: Any = _EntryDraft(
        execution_id, generation, step_id, kind, name, effect, idem_key, payload,
        created_at_ms, None, hmac,
    )
    entry.__class__ = JournalEntry
    return cast(JournalEntry, entry)


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """One execution row as storage holds it (payload fields are encoded bytes)."""

    execution_id: str
    workflow: str
    status: ExecutionStatus
    generation: int
    inputs: bytes | None
    output: bytes | None
    error_type: str | None
    error: bytes | None
    created_at_ms: int
    updated_at_ms: int
    finalized_at_ms: int | None
    queue: str | None = None
    """The queue an enqueued execution waits in for a worker; ``None`` for one started."""

    @classmethod
    def created(
        cls, execution_id: str, workflow: str, inputs: bytes, now_ms: int, queue: str | None
    ) -> ExecutionRecord:
        """The row of a new execution, as storage inserts it: running, generation 0."""
        return cls(
            execution_id,
            workflow,
            ExecutionStatus.RUNNING,
            generation=0,
            inputs=inputs,
            output=None,
            error_type=None,
            error=None,
            created_at_ms=now_ms,
            updated_at_ms=now_ms,
            finalized_at_ms=None,
            queue=queue,
        )


@dataclass(frozen=True, slots=True)
class ExecutionSummary:
    """A listing row: metadata only."""

    execution_id: str
    workflow: str
    status: ExecutionStatus
    steps: int
    created_at_ms: int
    finalized_at_ms: int | None


@dataclass(frozen=True, slots=True)
class StepInfo:
    """Metadata of one journal row: never its payload (INV-5)."""

    step_id: int
    name: str
    effect_class: str
    kind: EntryKind
    generation: int
    seq: int
    created_at_ms: int
    payload_bytes: int
    idem_key_prefix: str


@dataclass(frozen=True, slots=True)
class ExecutionInfo:
    """What ``engine.get_execution`` returns: metadata of an execution and its steps."""

    execution_id: str
    workflow: str
    status: ExecutionStatus
    generation: int
    created_at: datetime
    updated_at: datetime
    finalized_at: datetime | None
    error_type: str | None
    steps: list[StepInfo]


class PromiseState(str, Enum):
    """Where a durable promise stands."""

    PENDING = "pending"
    RESOLVED = "resolved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class PromiseRecord:
    """A durable promise row. ``token_hash`` is the BLAKE3 hash of its resolver token
    (INV-9); ``payload`` the sealed value (resolved) or error record (rejected)."""

    promise_id: str
    execution_id: str
    generation: int
    step_id: int
    name: str
    token_hash: bytes
    state: PromiseState
    payload: bytes | None
    created_at_ms: int
    settled_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TimerRecord:
    """A durable timer row: the absolute time a sleeping step is due."""

    timer_id: str
    execution_id: str
    generation: int
    step_id: int
    due_at_ms: int
    fired: bool
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """What pruning removes; every limit applies to terminal executions only.

    A zero ``max_executions`` or ``max_journal_bytes`` turns that cap off.
    """

    ttl_completed_ms: int = 7 * 86_400_000
    ttl_failed_ms: int = 30 * 86_400_000
    max_executions: int = 10_000
    max_journal_bytes: int = 1 << 30
    batch_size: int = 500


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What a prune removed (or, dry, would remove)."""

    executions: int = 0
    journal_rows: int = 0
    by_ttl: int = 0
    by_count_cap: int = 0
    by_size_cap: int = 0


def ms_to_datetime(ms: int) -> datetime:
    """Unix milliseconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)

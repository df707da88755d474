"""Durable timers and promises inside a workflow: ``ctx.sleep``, ``ctx.promise`` (layer: engine).

Each takes a step id when called and journals a sealed control row at that position, with
a key derived like a step's (effect ``timer`` or ``promise``), so replacing a step by a
sleep is a divergence. A timer's row holds its absolute due time: one that came due while
no process ran fires at once on resume (FR-DE-06). A promise's row holds its id and
deadline; its outcome (value, rejection or timeout) is journaled as the step's result or
error once the workflow observes it, so a replay sees the same outcome.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument, JournalUnavailable, PromiseTimeout, StepFailed
from .ids import fingerprint_input, idempotency_key, promise_id, resolver_token_hash, timer_id
from .journal import EntryKind, JournalEntry, PromiseRecord, PromiseState, TimerRecord
from .runtime import now_ms
from .waiting import promise_aad

if TYPE_CHECKING:
    from .context import Context

__all__ = ["ControlCall", "Promise", "duration_seconds", "instant_seconds"]

TIMER = "timer"
PROMISE = "promise"


@dataclass(frozen=True, slots=True)
class ControlCall:
    """One timer or promise call: its position, name, effect tag and key."""

    step_id: int
    name: str
    effect: str
    key: bytes

    @classmethod
    def at(cls, execution_id: str, step_id: int, name: str, effect: str) -> ControlCall:
        """The call at ``step_id``, keyed like a step (SPEC §2 "Keys")."""
        key = idempotency_key(execution_id, step_id, fingerprint_input(name, effect, b""))
        return cls(step_id, name, effect, key)


def duration_seconds(value: object) -> float:
    """Seconds of a sleep or timeout: a non-negative finite number or ``timedelta``.

    Raises:
        InvalidArgument: negative, NaN, infinite, or not a number.
    """
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidArgument(f"a duration is seconds or a timedelta, not {type(value).__name__}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise InvalidArgument(f"a duration must be finite and not negative, not {seconds}")
    return float(seconds)


def instant_seconds(when: object) -> float:
    """Unix seconds of an aware ``datetime``; naive ones are refused (their zone is a guess).

    Raises:
        InvalidArgument: not a datetime, or a naive one.
    """
    if not isinstance(when, datetime):
        raise InvalidArgument(f"sleep_until takes a datetime, not {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidArgument(
            "sleep_until needs an aware datetime (e.g. datetime.now(UTC) + ...): a naive "
            "one is refused rather than guessed"
        )
    return when.timestamp()


async def sleep_until(
    ctx: Context, call: ControlCall, deadline: float | None, delay: float
) -> None:
    """Arm (or find) the timer of ``call`` and wait until it is due."""
    ctx._check_alive()
    run = ctx._run
    row = await ctx._control_row(call)
    if row is not None:
        due_ms = int(run.payloads.open_entry(row)["due_at_ms"])
    else:
        due_ms = math.ceil((deadline if deadline is not None else run.clock.now() + delay) * 1000)
        entry = ctx._control_entry(call, {"due_at_ms": due_ms})
        eid, gen = run.execution_id, run.generation
        timer = TimerRecord(
            timer_id(eid, gen, call.step_id), eid, gen, call.step_id, due_ms, False, now_ms()
        )
        try:
            await run.writer.call(lambda s: s.arm_timer(entry, timer))
        except JournalUnavailable:
            ctx._degraded_control(call)
    await run.clock.sleep_until(due_ms / 1000)
    ctx._check_alive()
    tid = timer_id(run.execution_id, run.generation, call.step_id)
    with contextlib.suppress(JournalUnavailable):
        await run.writer.call(lambda s: s.fire_timer(tid, now_ms()))


class Promise:
    """A durable promise: resolved from outside by id and token, awaited inside.

    ``id`` is a ``str``; ``token`` is the 32-byte resolver token on the run that created
    the promise and ``None`` when resumed (it is stored only as a hash, INV-9).
    """

    __slots__ = ("_call", "_ctx", "_deadline_ms", "_outcome", "id", "token")

    def __init__(
        self,
        ctx: Context,
        call: ControlCall,
        promise: str,
        token: bytes | None,
        deadline_ms: int | None,
        outcome: JournalEntry | None,
    ) -> None:
        self._ctx = ctx
        self._call = call
        self.id = promise
        self.token = token
        self._deadline_ms = deadline_ms
        self._outcome = outcome

    @property
    def name(self) -> str:
        """The promise's name in its execution."""
        return self._call.name

    def __await__(self) -> Any:
        return self.wait().__await__()

    async def wait(self, timeout: float | timedelta | None = None) -> Any:  # noqa: ASYNC109
        """The promise's value, once settled.

        Raises:
            PromiseTimeout: its deadline (or ``timeout``) passed first; journaled, so a
                replay raises it too.
            StepFailed: it was rejected (``error_type`` names the resolver's error).
        """
        if self._outcome is None:
            self._outcome = await _settle_outcome(self, timeout)
        return _replay_outcome(self, self._outcome)

    def __repr__(self) -> str:
        return f"Promise(id={self.id!r}, name={self.name!r})"


async def create_promise(
    ctx: Context, call: ControlCall, timeout: float | None  # noqa: ASYNC109
) -> Promise:
    """Persist (or find) the promise of ``call``; acknowledged before it returns."""
    ctx._check_alive()
    run = ctx._run
    eid, gen = run.execution_id, run.generation
    pid = promise_id(eid, gen, call.step_id)
    rows = await ctx._control_rows(call)
    if rows is not None and rows.control is not None:
        meta = run.payloads.open_entry(rows.control)
        return Promise(ctx, call, pid, None, meta.get("deadline_ms"), rows.outcome)
    token = os.urandom(32)
    deadline_ms = int((run.clock.now() + timeout) * 1000) if timeout is not None else None
    entry = ctx._control_entry(call, {"promise_id": pid, "deadline_ms": deadline_ms})
    record = PromiseRecord(
        pid,
        eid,
        gen,
        call.step_id,
        call.name,
        resolver_token_hash(pid, eid, token),
        PromiseState.PENDING,
        None,
        now_ms(),
    )
    await run.writer.call(lambda s: s.create_promise(entry, record))
    return Promise(ctx, call, pid, token, deadline_ms, None)


async def _settle_outcome(
    promise: Promise, timeout: float | timedelta | None  # noqa: ASYNC109
) -> JournalEntry:
    """Wait for the promise, then journal what the workflow observed."""
    ctx = promise._ctx
    run = ctx._run
    deadlines = [promise._deadline_ms / 1000] if promise._deadline_ms is not None else []
    if timeout is not None:
        deadlines.append(run.clock.now() + duration_seconds(timeout))
    record = await run.waiters.wait(promise.id, min(deadlines) if deadlines else None)
    ctx._check_alive()
    if record is None:
        kind, value = EntryKind.ERROR, {"type": "PromiseTimeout", "message": ""}
    elif record.state is PromiseState.RESOLVED:
        kind = EntryKind.RESULT
        value = run.payloads.open(record.payload, "a promise value", **promise_aad(record))
    else:
        kind = EntryKind.ERROR
        value = run.payloads.open(record.payload, "a promise rejection", **promise_aad(record))
    return ctx._journal_control_outcome(promise._call, kind, value)


def _replay_outcome(promise: Promise, entry: JournalEntry) -> Any:
    value = promise._ctx._run.payloads.open_entry(entry)
    if entry.kind is EntryKind.RESULT:
        return value
    record = value if isinstance(value, dict) else {}
    call = promise._call
    if record.get("type") == "PromiseTimeout":
        raise PromiseTimeout(call.name, call.step_id)
    raise StepFailed(call.name, call.step_id, str(record.get("type")), str(record.get("message")))

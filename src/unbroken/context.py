"""The workflow context: ``ctx.step`` and its replay, guard and journal logic (layer: engine).

A step id is taken when ``ctx.step`` is *called* (INV-2): ``ctx.step`` is a plain function
that numbers the step and returns a coroutine, so ``asyncio.gather(ctx.step(a),
ctx.step(b))`` numbers a=0, b=1 whatever finishes first.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from . import checkpoints, control
from .control import PROMISE, TIMER, ControlCall, Promise, duration_seconds, instant_seconds
from .effects import EffectClass, Intent, OnAmbiguous, Step, as_step
from .errors import (
    AmbiguousEffect,
    DecodeError,
    IntegrityError,
    InvalidArgument,
    InvalidStep,
    JournalUnavailable,
    PayloadTooLarge,
    ReplayDivergence,
    StepCapExceeded,
    StepFailed,
)
from .ids import step_keys
from .journal import EntryKind, JournalEntry, new_entry
from .operations import start_operation
from .replay import StepRows
from .runtime import (
    Diverged,
    IntegrityAbort,
    RunServices,
    SimulatedCrash,
    Stopped,
    enter_step,
    now_ms,
    retry_pause,
    running_task,
)

__all__ = ["Context", "StepOutcome"]

log = logging.getLogger("unbroken")
audit = logging.getLogger("unbroken.audit")

_LABELS: dict[EntryKind | EffectClass, str] = {
    member: member.value for enum in (EntryKind, EffectClass) for member in enum
}
"""The stored string of each entry kind and effect class (``.value`` costs a lookup)."""


@dataclass(slots=True)
class _Call:
    """One call of ``ctx.step``: its position, descriptor, key and operation (never
    changed once made; not frozen, which would cost every step a slower ``__init__``)."""

    step_id: int
    desc: Step
    key: bytes
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """What ``ctx.step_recorded`` returns: the value and how it was obtained."""

    value: Any
    was_replayed: bool
    step_id: int
    idempotency_key: bytes


class Context:
    """The handle a workflow gets as its first argument."""

    __slots__ = (
        "_ack_all",
        "_background",
        "_dead",
        "_derive_key",
        "_fold_at",
        "_folding",
        "_loop",
        "_next_step",
        "_owner",
        "_promise_names",
        "_reader",
        "_replaying",
        "_run",
        "_tasks",
    )

    def __init__(self, run: RunServices, *, replaying: bool) -> None:
        self._run = run
        self._next_step = 0
        self._replaying = replaying
        self._reader = checkpoints.ReplayReader(run)
        self._dead = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._promise_names: set[str] = set()
        self._folding = False
        self._background: set[asyncio.Task[None]] = set()
        self._derive_key = step_keys(run.execution_id)
        self._ack_all = run.config.journal_ack_every_step
        # No cap check below this step.
        self._fold_at = self._reader.fold_at
        # The workflow's task also calls ``cancel_inflight``: only other tasks' steps are
        # tracked in ``_tasks``.
        self._loop, self._owner = running_task()

    @property
    def execution_id(self) -> str:
        """The id of the running execution."""
        return self._run.execution_id

    @property
    def generation(self) -> int:
        """The journal generation (it grows each time a divergence restarts the workflow)."""
        return self._run.generation

    @property
    def is_replaying(self) -> bool:
        """Whether journaled steps may still be replayed."""
        return self._replaying

    # -- steps --------------------------------------------------------------------------

    def step(
        self, step: str | Step, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Awaitable[Any]:
        """Run ``fn(*args, **kwargs)`` as a journaled step and return its value.

        ``step`` is a name (an idempotent step) or a ``Step`` descriptor. ``fn`` may be
        sync (it runs in a worker thread with the context variables copied) or async.
        The step id is taken now, before anything is awaited (INV-2).

        Raises:
            InvalidStep: ``step`` or ``fn`` is not usable (raised at once).
            StepFailed: the operation failed after its retries (live and on replay).
            AmbiguousEffect: a guarded step found in the ambiguous window under ``FAIL``.
        """
        return self._run_step(self._take_step(step, fn, args, kwargs), recorded=False)

    def step_recorded(
        self, step: str | Step, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Awaitable[StepOutcome]:
        """Like ``step``, but return a ``StepOutcome`` that says whether it was replayed."""
        return self._run_step(self._take_step(step, fn, args, kwargs), recorded=True)

    async def now(self) -> datetime:
        """The current UTC time, journaled: a replay returns the same instant."""
        clock = self._run.clock

        async def read_clock() -> datetime:
            return datetime.fromtimestamp(clock.now(), UTC)

        value: datetime = await self.step("unbroken.now", read_clock)
        return value

    async def uuid(self) -> _uuid.UUID:
        """A random UUID (v4), journaled."""
        value: _uuid.UUID = await self.step("unbroken.uuid", _uuid4)
        return value

    async def random(self) -> float:
        """A random float in [0, 1), journaled."""
        value: float = await self.step("unbroken.random", _random_float)
        return value

    # -- timers and promises ------------------------------------------------------------

    def sleep(self, duration: float | timedelta) -> Awaitable[None]:
        """Sleep durably for ``duration`` (seconds or a ``timedelta``).

        The absolute due time is journaled at this step's position: after a restart the
        sleep only waits for what is left, and not at all if it came due meanwhile
        (FR-DE-06). Waiting holds no thread.

        Raises:
            InvalidArgument: a negative, NaN or infinite duration (at once).
        """
        seconds = duration_seconds(duration)
        call = self._take_control("unbroken.sleep", TIMER)
        return control.sleep_until(self, call, None, seconds)

    def sleep_until(self, when: datetime) -> Awaitable[None]:
        """Sleep durably until ``when``, an aware datetime (a naive one is refused).

        Raises:
            InvalidArgument: not an aware datetime (at once).
        """
        deadline = instant_seconds(when)
        call = self._take_control("unbroken.sleep_until", TIMER)
        return control.sleep_until(self, call, deadline, 0.0)

    def promise(self, name: str, *, timeout: float | timedelta | None = None) -> Awaitable[Promise]:
        """Create (or, on replay, find) a durable promise; persisted when this returns.

        ``await ctx.promise("approval")`` gives a ``Promise``: its ``id`` and ``token``
        go to whoever resolves it (``engine.resolve_promise``); ``await promise`` gives
        its value. ``timeout`` sets a durable deadline (``PromiseTimeout``).

        Raises:
            InvalidArgument: an empty name, a name already used in this execution, or a
                bad timeout (at once).
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument("a promise name must be a non-empty str")
        if name in self._promise_names:
            raise InvalidArgument(f"promise name {name!r} is already used in this execution")
        limit = duration_seconds(timeout) if timeout is not None else None
        self._promise_names.add(name)
        call = self._take_control(name, PROMISE)
        return control.create_promise(self, call, limit)

    def _take_control(self, name: str, effect: str) -> ControlCall:
        step_id = self._next_step
        self._next_step = step_id + 1
        return ControlCall.at(self._run.execution_id, step_id, name, effect)

    async def _control_rows(self, call: ControlCall) -> StepRows | None:
        """The journal's rows at a control call's position, checked and authenticated."""
        if not self._replaying:
            return None
        try:
            rows = await self._lookup(call.step_id)
            if rows is not None:
                self._check_divergence(call.step_id, call.name, call.effect, call.key, rows)
                for entry in (rows.control, rows.outcome):
                    if entry is not None:
                        self._authenticate(entry)
        except (IntegrityError, DecodeError, PayloadTooLarge) as exc:
            raise IntegrityAbort(exc) from exc
        return rows

    async def _control_row(self, call: ControlCall) -> JournalEntry | None:
        rows = await self._control_rows(call)
        return rows.control if rows is not None else None

    def _control_entry(self, call: ControlCall, value: dict[str, Any]) -> JournalEntry:
        payload = self._seal(call.step_id, call.name, call.key, EntryKind.CONTROL, value)
        return self._row(call.step_id, call.name, call.effect, call.key, EntryKind.CONTROL, payload)

    def _journal_control_outcome(
        self, call: ControlCall, kind: EntryKind, value: Any
    ) -> JournalEntry:
        """Journal what a workflow observed of a promise (buffered: order is enough)."""
        payload = self._seal(call.step_id, call.name, call.key, kind, value)
        entry = self._row(call.step_id, call.name, call.effect, call.key, kind, payload)
        self._run.writer.append_buffered(entry)
        return entry

    def _seal(self, step_id: int, name: str, key: bytes, kind: EntryKind, value: Any) -> bytes:
        run = self._run
        return run.payloads.seal(
            value,
            lambda: f"the {kind.value} of step {step_id} ({name!r})",  # only for an error
            execution_id=run.execution_id,
            generation=run.generation,
            step_id=step_id,
            kind=kind.value,
            idem_key=key,
        )

    def _degraded_control(self, call: ControlCall) -> None:
        self._run.metrics.degraded_appends += 1
        log.warning(
            "journal writer unavailable; timer at step %d of execution %r is not durable",
            call.step_id, self._run.execution_id,
        )

    def _take_step(
        self,
        step: str | Step,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _Call:
        desc = as_step(step)
        if not callable(fn):
            raise InvalidStep(f"step {desc.name!r}: the operation must be callable")
        step_id = self._next_step
        self._next_step = step_id + 1
        key = self._derive_key(step_id, desc.key_input)
        return _Call(step_id, desc, key, fn, args, kwargs)

    async def _run_step(self, call: _Call, *, recorded: bool) -> Any:
        if self._replaying:  # the fast path: a result under this very key, never awaits
            self._check_alive()
            value = self._reader.replayed(call.step_id, call.key)  # MISS: the full lookup
            if value is not checkpoints.MISS:
                return StepOutcome(value, True, call.step_id, call.key) if recorded else value
        # Given the loop, ``current_task`` need not look the running one up (a getpid).
        task = asyncio.current_task(self._loop)
        tracked = task is not None and task is not self._owner
        if tracked:
            self._tasks.add(task)  # type: ignore[arg-type]
        try:
            if self._replaying or call.desc.is_guarded or call.step_id >= self._fold_at:
                value, replayed = await self._resolve(call)
            else:  # a fresh step far from the cap: what ``_resolve`` comes down to
                self._check_alive()
                value, replayed = await self._execute(call), False
        finally:
            if tracked:
                self._tasks.discard(task)
        if recorded:
            return StepOutcome(value, replayed, call.step_id, call.key)
        return value

    async def _resolve(self, call: _Call) -> tuple[Any, bool]:
        """Replay, resolve the ambiguous window, find an earlier generation's, or run
        (``_run_step`` has tried the replay fast path first)."""
        self._check_alive()
        cap = self._run.config.max_steps_per_execution
        if cap and call.step_id >= cap:
            raise StepCapExceeded(cap)
        if call.step_id >= self._fold_at and not self._folding:
            self._folding = True  # one background fold per run, never on the hot path
            task = asyncio.get_running_loop().create_task(
                checkpoints.fold(self._run, self._fold_at)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if not self._replaying and not call.desc.is_guarded:
            return await self._execute(call), False  # nothing of it can be journaled yet
        try:
            found = await self._journaled(call)
        except (IntegrityError, DecodeError, PayloadTooLarge) as exc:
            raise IntegrityAbort(exc) from exc  # fail closed: the journal cannot be trusted
        if isinstance(found, JournalEntry):
            return await self._ambiguous(call), False
        if found is not None:
            return found
        return await self._fresh(call), False

    async def _journaled(self, call: _Call) -> tuple[Any, bool] | JournalEntry | None:
        """What the journal holds for this step: its replayed outcome, an authenticated
        intent without outcome (the ambiguous window), or nothing."""
        if self._replaying:
            rows = await self._lookup(call.step_id)
            if rows is not None:
                self._check_divergence(
                    call.step_id, call.desc.name, call.desc.effect.value, call.key, rows
                )
                if rows.outcome is not None:
                    return self._replay(call, rows.outcome), True
                if rows.intent is not None and call.desc.is_guarded:
                    self._run.payloads.check_entry_mac(rows.intent)
                    return rows.intent
        if call.desc.is_guarded and self._run.generation > 0:
            return await self._earlier_generation(call)
        return None

    # -- replay -------------------------------------------------------------------------

    async def _lookup(self, step_id: int) -> StepRows | None:
        rows_for_step = await self._reader.lookup(step_id)
        if rows_for_step is None and self._reader.finished:
            self._replaying = False  # past the journal's end: no more lookups
        return rows_for_step

    def _check_divergence(
        self, step_id: int, name: str, effect: str, key: bytes, rows: StepRows
    ) -> None:
        """INV-3: a journaled step is returned only if the code called the same step."""
        entry = rows.any
        if entry.idem_key == key:
            return
        self._authenticate(entry)  # a tampered row is an integrity failure, not a divergence
        note = ""
        if rows.result is not None and entry.effect == EffectClass.EXACTLY_ONCE_GUARDED.value:
            note = (
                f"a committed guarded effect ({entry.name!r}) is journaled at this position; "
                "if the code moved it, its new position has a new idempotency key and "
                "it will run again there"
            )
        error = ReplayDivergence(
            step_id, journaled=(entry.name, entry.effect), called=(name, effect), note=note
        )
        log.warning(
            "replay divergence in execution %r: %s; the journal generation is aborted",
            self._run.execution_id, error,
        )
        self._dead = True
        raise Diverged(error)

    def _authenticate(self, entry: JournalEntry) -> None:
        if entry.kind is EntryKind.INTENT:
            self._run.payloads.check_entry_mac(entry)
        else:
            self._run.payloads.open_entry(entry)

    def _replay(self, call: _Call, entry: JournalEntry) -> Any:
        return checkpoints.open_outcome(self._run, call.desc.name, call.step_id, entry)

    async def _earlier_generation(self, call: _Call) -> tuple[Any, bool] | JournalEntry | None:
        """INV-13: a guarded effect committed in an earlier generation is never re-fired."""
        run = self._run
        found = StepRows()
        for row in await run.read(run.storage.find_by_key, run.execution_id, call.key):
            found.add(row)
        if found.outcome is not None:
            return self._replay(call, found.outcome), True
        if found.intent is not None:
            self._run.payloads.check_entry_mac(found.intent)
            return found.intent
        return None

    async def _ambiguous(self, call: _Call) -> Any:
        """Resolve a guarded step whose intent is committed and result is not (FR-DE-10)."""
        policy = call.desc.on_ambiguous or OnAmbiguous.FAIL
        audit.warning(
            "step resumed in the ambiguous window; applying on_ambiguous=%s",
            policy.value,
            extra={
                "execution_id": self._run.execution_id,
                "step_id": call.step_id,
                "step_name": call.desc.name,
                "effect_class": call.desc.effect.value,
                "idem_key_prefix": call.key[:8].hex(),
                "on_ambiguous": policy.value,
            },
        )
        if policy is OnAmbiguous.FAIL:
            raise AmbiguousEffect(self._run.execution_id, call.step_id, call.desc.name)
        return await self._execute(call)

    # -- fresh runs ---------------------------------------------------------------------

    async def _fresh(self, call: _Call) -> Any:
        if call.desc.is_guarded:
            intent = self._entry(call, EntryKind.INTENT, None)
            mac = self._run.payloads.entry_mac(intent)
            if mac is not None:  # a new record: cheaper than dataclasses.replace
                intent = self._row(
                    call.step_id, intent.name, intent.effect, call.key, EntryKind.INTENT, None,
                    hmac=mac, at=intent.created_at_ms,
                )
            try:
                await self._run.writer.append_acked(intent)
            except JournalUnavailable:
                if call.desc.intent is not Intent.COST_BEARING:
                    raise  # exactly-once is never silently dropped: the operation does not run
                self._degraded(call)
        return await self._execute(call)

    async def _execute(self, call: _Call) -> Any:
        """Run the operation (``operations.start_operation``) with ``unbroken.current_step()``
        set, retrying per policy (``runtime.retry_pause``), and journal its outcome."""
        attempt = 1
        while True:  # an operation that succeeds at once costs no more than this block
            token = enter_step(
                self._run.execution_id, call.step_id, call.desc.name, call.key, attempt
            )
            try:
                value = await start_operation(
                    call.fn, call.args, call.kwargs, self._run.config.sync_step_inline_us
                )
                break
            except Exception as exc:
                failed = exc
            finally:
                token.var.reset(token)
            try:
                await retry_pause(call.desc.retry, attempt, failed, self._check_alive)
            except Exception as exc:
                await self._failed(call, exc)
            del failed  # its traceback holds this frame: no cycle kept across attempts
            attempt += 1
        self._check_alive()
        faults = self._run.faults
        if faults is not None and call.desc.is_guarded and faults.in_window(call.step_id):
            raise SimulatedCrash()
        if self._acks(call):
            await self._journal(call, EntryKind.RESULT, value)
        else:  # the hot path: no await
            self._buffer(call, EntryKind.RESULT, value)
        if faults is not None:
            await self._fault_after(call.step_id)
        return value

    async def _failed(self, call: _Call, exc: Exception) -> NoReturn:
        """The operation failed for good with ``exc``: journal it, raise ``StepFailed``."""
        self._check_alive()
        record = {"type": type(exc).__name__, "message": str(exc)}
        await self._journal(call, EntryKind.ERROR, record)
        await self._fault_after(call.step_id)
        name, step_id = call.desc.name, call.step_id
        raise StepFailed(name, step_id, record["type"], record["message"]) from exc

    async def _fault_after(self, step_id: int) -> None:
        """``unbroken.testing``: die once this step's outcome is committed."""
        faults = self._run.faults
        if faults is not None and faults.after_result(step_id):
            await self._run.writer.flush()
            raise SimulatedCrash()

    def _acks(self, call: _Call) -> bool:
        """Whether the step's outcome is acknowledged (durable) before the step returns:
        guarded steps always, every step under ``journal_ack_every_step``."""
        return call.desc.is_guarded or self._ack_all

    async def _journal(self, call: _Call, kind: EntryKind, value: Any) -> None:
        if not self._acks(call):
            self._buffer(call, kind, value)
            return
        try:
            await self._run.writer.append_acked(self._outcome(call, kind, value))
        except JournalUnavailable:
            self._degraded(call)  # the operation ran: hand its value back

    def _buffer(self, call: _Call, kind: EntryKind, value: Any) -> None:
        """Journal an outcome for the next group commit (INV-4 orders it before any later
        acknowledged entry)."""
        self._run.writer.append_buffered(self._outcome(call, kind, value))

    def _outcome(self, call: _Call, kind: EntryKind, value: Any) -> JournalEntry:
        """A step outcome's sealed journal row (every step makes one: written out, not
        layered)."""
        run, desc, step_id, label = self._run, call.desc, call.step_id, _LABELS[kind]
        payload = run.payloads.seal_at(
            value,
            lambda: f"the {label} of step {step_id} ({desc.name!r})",  # only for an error
            run.execution_id,
            run.generation,
            step_id,
            label,
            call.key,
        )
        effect = _LABELS[desc.effect]
        eid, generation, key, at = run.execution_id, run.generation, call.key, now_ms()
        return new_entry(eid, generation, step_id, kind, desc.name, effect, key, payload, at)

    def _entry(self, call: _Call, kind: EntryKind, payload: bytes | None) -> JournalEntry:
        desc = call.desc
        return self._row(call.step_id, desc.name, desc.effect.value, call.key, kind, payload)

    def _row(
        self,
        step_id: int,
        name: str,
        effect: str,
        key: bytes,
        kind: EntryKind,
        payload: bytes | None,
        *,
        hmac: bytes | None = None,
        at: int | None = None,
    ) -> JournalEntry:
        run = self._run
        at = now_ms() if at is None else at
        return new_entry(
            run.execution_id, run.generation, step_id, kind, name, effect, key, payload, at, hmac
        )

    def _degraded(self, call: _Call) -> None:
        self._run.metrics.degraded_appends += 1
        log.warning(
            "journal writer unavailable; step %d (%r) of execution %r degrades to non-durable mode",
            call.step_id, call.desc.name, self._run.execution_id,
        )

    # -- lifecycle ----------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._dead or self._run.stopping():  # ``RunServices.check_stop``, inlined
            raise Stopped()

    async def cancel_inflight(self) -> None:
        """Stop every step still running (after a divergence); their results are dropped."""
        self._dead = True
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _uuid4() -> _uuid.UUID:
    return _uuid.uuid4()


async def _random_float() -> float:
    return _random.random()

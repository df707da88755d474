"""What a running execution shares with its context: services, signals, the step handle,
the retries of a step's operation (layer: engine).

``Diverged`` and ``Stopped`` derive from ``BaseException`` so that a workflow's
``except Exception`` cannot swallow them.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .clock import Clock
from .config import Config
from .effects import RetryPolicy
from .errors import DecodeError, IntegrityError, PayloadTooLarge, ReplayDivergence
from .payloads import Payloads
from .storage import Storage
from .waiting import PromiseWaiters
from .writer import JournalWriter

__all__ = [
    "Diverged",
    "FaultPlan",
    "IntegrityAbort",
    "Metrics",
    "RunServices",
    "SimulatedCrash",
    "StepHandle",
    "Stopped",
    "current_step",
    "enter_step",
    "now_ms",
    "retry_pause",
    "running_task",
    "set_current_step",
]


def now_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class Diverged(BaseException):
    """Internal: the code diverged from the journal; unwinds the workflow (INV-3)."""

    def __init__(self, error: ReplayDivergence) -> None:
        super().__init__(str(error))
        self.error = error


class IntegrityAbort(BaseException):
    """Internal: the journal failed an integrity check; the execution is aborted."""

    def __init__(self, error: IntegrityError | DecodeError | PayloadTooLarge) -> None:
        super().__init__(str(error))
        self.error = error


class Stopped(BaseException):
    """Internal: the execution must stop at this await (engine closing, generation dead)."""


class SimulatedCrash(BaseException):
    """Raised by ``unbroken.testing`` fault injection where a real process would die."""


@dataclass(slots=True)
class FaultPlan:
    """Where ``unbroken.testing`` makes an execution die, as if its process were killed."""

    crash_after_step: int | None = None
    """Die once this step's result is committed."""
    crash_in_window_of_step: int | None = None
    """Die after this guarded step's operation returned, before its result is written."""
    fired: bool = False

    def after_result(self, step_id: int) -> bool:
        """Whether to die now that ``step_id``'s result is journaled."""
        return self._fire(self.crash_after_step, step_id)

    def in_window(self, step_id: int) -> bool:
        """Whether to die inside ``step_id``'s ambiguous window."""
        return self._fire(self.crash_in_window_of_step, step_id)

    def _fire(self, planned: int | None, step_id: int) -> bool:
        if self.fired or planned != step_id:
            return False
        self.fired = True
        return True


@dataclass(frozen=True, slots=True)
class StepHandle:
    """The running step, as ``unbroken.current_step()`` returns it."""

    execution_id: str
    step_id: int
    name: str
    idempotency_key: bytes
    attempt: int

    @property
    def idempotency_key_hex(self) -> str:
        """The key as 64 lowercase hex characters: the ``Idempotency-Key`` header value."""
        return self.idempotency_key.hex()


_StepFields = tuple[str, int, str, bytes, int]
"""``StepHandle``'s fields: the handle itself is only built if the operation asks for it."""

_CURRENT_STEP: contextvars.ContextVar[_StepFields] = contextvars.ContextVar("unbroken_step")


def current_step() -> StepHandle:
    """The step whose operation is running now (sync or async).

    Raises:
        RuntimeError: called outside a step's operation.
    """
    try:
        return StepHandle(*_CURRENT_STEP.get())
    except LookupError:
        raise RuntimeError("unbroken.current_step() called outside a running step") from None


def enter_step(
    execution_id: str, step_id: int, name: str, key: bytes, attempt: int
) -> contextvars.Token[_StepFields]:
    """Make this the current step; reset with ``token.var.reset(token)``."""
    return _CURRENT_STEP.set((execution_id, step_id, name, key, attempt))


def set_current_step(handle: StepHandle) -> contextvars.Token[_StepFields]:
    """Make ``handle`` the current step; reset with ``token.var.reset(token)``."""
    return enter_step(
        handle.execution_id, handle.step_id, handle.name, handle.idempotency_key, handle.attempt
    )


def running_task() -> tuple[asyncio.AbstractEventLoop | None, asyncio.Task[Any] | None]:
    """The running loop and its current task; ``(None, None)`` off a loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None, None
    return loop, asyncio.current_task(loop)


async def retry_pause(
    policy: RetryPolicy, attempt: int, exc: Exception, check: Callable[[], None]
) -> None:
    """After attempt ``attempt`` of a step's operation failed with ``exc``: raise ``exc``
    when the step's retry policy allows no further attempt; otherwise ``check`` (it raises
    when the run must stop first), then wait out the delay before the next attempt."""
    if attempt >= policy.max_attempts or not isinstance(exc, policy.retry_on):
        raise exc
    check()
    await asyncio.sleep(policy.delay_before(attempt + 1))


@dataclass(slots=True)
class Metrics:
    """Counters an engine keeps (exported to OpenTelemetry when it is configured)."""

    degraded_appends: int = 0
    executions_started: int = 0
    executions_recovered: int = 0
    divergences: int = 0




@dataclass(slots=True)
class RunServices:
    """Everything a context needs from its engine, for one generation of one execution."""

    execution_id: str
    workflow: str
    generation: int
    storage: Storage
    writer: JournalWriter
    config: Config
    metrics: Metrics
    read: Callable[..., Any]
    """``await read(fn, *args)`` runs a storage read off the event loop."""
    payloads: Payloads
    clock: Clock
    waiters: PromiseWaiters
    stopping: Callable[[], bool] = field(default=lambda: False)
    faults: FaultPlan | None = None

    def check_stop(self) -> None:
        """Raise ``Stopped`` if the engine is closing."""
        if self.stopping():
            raise Stopped()

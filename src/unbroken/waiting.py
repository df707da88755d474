"""Durable timers and promises: arming, waiting, settling (layer: engine).

A timer or promise takes a step id like any step and journals a control row (sealed, its
key derived like a step's), so replacing a step by a sleep is detected as divergence.
Settling a promise is one function, ``settle``, run by the engine on its writer thread and
by ``unbroken resolve`` directly on the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

from .clock import Clock
from .errors import InvalidArgument, PromiseRejected, UnknownPromise
from .ids import resolver_token_hash
from .journal import ExecutionStatus, PromiseRecord, PromiseState
from .payloads import Payloads
from .storage import Storage
from .storage.base import PROMISES_TOPIC, Notifying
from .wakeups import RESYNC, Wakeups

__all__ = ["PromiseWaiters", "parse_token", "promise_aad", "settle"]

log = logging.getLogger("unbroken")

TOKEN_BYTES = 32


def parse_token(token: bytes | str) -> bytes:
    """A resolver token given as 32 bytes or 64 lowercase hex characters.

    Raises:
        InvalidArgument: anything else (the message never holds the token).
    """
    if isinstance(token, bytes) and len(token) == TOKEN_BYTES:
        return token
    if isinstance(token, str) and len(token) == 2 * TOKEN_BYTES:
        with contextlib.suppress(ValueError):
            if token == token.lower():
                return bytes.fromhex(token)
    raise InvalidArgument("a resolver token is 32 bytes or 64 lowercase hex characters")


def promise_aad(record: PromiseRecord) -> dict[str, Any]:
    """Where a promise's sealed value belongs."""
    return {
        "execution_id": record.execution_id,
        "generation": record.generation,
        "step_id": record.step_id,
        "kind": "promise",
    }


def settle(
    storage: Storage,
    payloads: Payloads,
    promise_id: str,
    token: bytes | str,
    value: Any,
    *,
    state: PromiseState,
    now_ms: int,
) -> bool:
    """Resolve or reject a promise; ``False`` if it was already settled (a no-op).

    The token is checked in constant time before anything else about the promise is
    revealed (INV-9). Blocking: runs on the writer thread or in a CLI.

    Raises:
        UnknownPromise: no such promise, or its execution was canceled, pruned or has
            moved to a newer generation.
        PromiseRejected: the token does not authenticate.
    """
    raw = parse_token(token)
    record = storage.get_promise(promise_id)
    if record is None:
        raise UnknownPromise()
    expected = resolver_token_hash(promise_id, record.execution_id, raw)
    if not hmac.compare_digest(expected, record.token_hash):
        raise PromiseRejected()
    execution = storage.get_execution(record.execution_id)
    if (
        execution is None
        or execution.status is ExecutionStatus.CANCELED
        or execution.generation != record.generation
    ):
        raise UnknownPromise()
    if record.state is not PromiseState.PENDING:
        return False
    what = f"the value of promise {record.name!r}"
    payload = payloads.seal(value, what, **promise_aad(record))
    return storage.settle_promise(promise_id, state, payload, now_ms)


class PromiseWaiters:
    """The promises this engine's executions wait for, woken in-process at once and from
    other processes by one poll query per interval for all of them; on PostgreSQL also at
    once, by ``LISTEN unbroken_promises`` (listening starts with the first wait)."""

    def __init__(
        self,
        read: Callable[..., Any],
        storage: Storage,
        clock: Clock,
        poll_interval: float,
    ) -> None:
        self._read = read
        self._storage = storage
        self._clock = clock
        self._interval = max(poll_interval, 0.01)
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wakeups = (
            Wakeups(storage, [PROMISES_TOPIC], self._notified)
            if isinstance(storage, Notifying)
            else None
        )

    def wake(self, promise_id: str) -> None:
        """A promise was settled in this process: wake its waiters now."""
        event = self._events.get(promise_id)
        if event is not None:
            event.set()

    async def wait(self, promise_id: str, deadline: float | None) -> PromiseRecord | None:
        """The settled promise, or ``None`` if ``deadline`` passed first."""
        event = self._events.setdefault(promise_id, asyncio.Event())
        self._waiting[promise_id] = self._waiting.get(promise_id, 0) + 1
        try:
            while True:
                record: PromiseRecord | None = await self._read(
                    self._storage.get_promise, promise_id
                )
                if record is None:
                    raise UnknownPromise()
                if record.state is not PromiseState.PENDING:
                    return record
                self._ensure_poller()
                if not await self._wait_event(event, deadline):
                    return None
                event.clear()
        finally:
            self._waiting[promise_id] -= 1
            if not self._waiting[promise_id]:
                del self._waiting[promise_id]
                self._events.pop(promise_id, None)

    async def _wait_event(self, event: asyncio.Event, deadline: float | None) -> bool:
        if deadline is None:
            await event.wait()
            return True
        waiter = asyncio.ensure_future(event.wait())
        timer = asyncio.ensure_future(self._clock.sleep_until(deadline))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, timer):
                task.cancel()
        return event.is_set()

    def _notified(self, notes: list[tuple[str, str]]) -> None:
        """Promises settled in other processes (``RESYNC``: any of them may have been)."""
        for note in notes:
            if note == RESYNC:
                for event in self._events.values():
                    event.set()
            elif note[0] == PROMISES_TOPIC:
                self.wake(note[1])

    def _ensure_poller(self) -> None:
        if self._wakeups is not None:
            self._wakeups.start()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """One query per interval for every waited-for promise (other processes' news)."""
        while self._events:
            await asyncio.sleep(self._interval)
            ids = list(self._events)
            try:
                states = await self._read(self._storage.promise_states, ids)
            except Exception:
                log.warning("polling promise states failed; retrying", exc_info=True)
                continue
            for pid in ids:
                if states.get(pid, PromiseState.PENDING) is not PromiseState.PENDING:
                    self.wake(pid)

    async def close(self) -> None:
        """Stop polling and listening."""
        if self._wakeups is not None:
            await self._wakeups.close()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

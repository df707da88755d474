"""Queued work: claiming enqueued executions and starting them under ownership (layer: engine).

``engine.enqueue`` stores an execution with its sealed inputs in a queue and runs nothing.
A worker calls ``engine.claim(queue, limit)``: the storage offers the queue's waiting
executions, oldest first, to a ``Claims`` object that takes each one's ownership lock
(INV-15), and the claimed executions start through the launcher like any other, handing
over the lock they already hold, so they resume and replay as usual.

The queue's cap (``queue_concurrency``) is enforced by the storage while it claims: on
PostgreSQL by counting the owned executions of the queue from ``pg_locks`` under a
per-queue transaction lock (``storage/postgres_queue.py``), on SQLite and in memory by
probing their ownership locks inside a serialised claim. A worker that dies loses its
locks, so its executions wait in the queue again and the next claim takes them.

An execution holds its slot (and its ownership) for as long as it runs, including durable
sleeps and promise waits: its owner keeps it in memory and wakes it itself, so due timers
need no notification, and a long wait counts against the queue's limit.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping

from .errors import ExecutionLocked, InvalidArgument, UnbrokenError
from .execution import ExecutionHandle, Workflow
from .launcher import Launcher
from .ownership import OwnedLock, Ownership
from .storage import Storage

__all__ = ["Claims", "claim", "validate_queue"]

log = logging.getLogger("unbroken")

MAX_QUEUE_NAME = 200
"""Characters in a queue name at most (it travels as a notification payload)."""


def validate_queue(queue: str) -> str:
    """A queue name: 1 to 200 printable characters.

    Raises:
        InvalidArgument: anything else.
    """
    if not isinstance(queue, str) or not 0 < len(queue) <= MAX_QUEUE_NAME:
        raise InvalidArgument(f"a queue name is 1 to {MAX_QUEUE_NAME} characters")
    if not queue.isprintable():
        raise InvalidArgument("a queue name holds printable characters only")
    return queue


class Claims:
    """The ``Claimant`` of one claim: takes ownership locks and keeps them for the caller."""

    def __init__(self, ownership: Ownership) -> None:
        self._ownership = ownership
        self._locks: dict[str, OwnedLock] = {}

    def try_own(self, execution_id: str) -> bool:
        """Take the execution's ownership lock; ``False`` if another owner holds it."""
        try:
            # The claim's FOR UPDATE SKIP LOCKED row lock is the barrier here.
            self._locks[execution_id] = self._ownership.acquire(execution_id, barrier=False)
        except ExecutionLocked:
            return False
        return True

    def is_owned(self, execution_id: str) -> bool:
        """Whether anyone holds the execution's ownership lock now."""
        return execution_id in self._locks or self._ownership.is_held(execution_id)

    def take(self, execution_id: str) -> OwnedLock | None:
        """The held lock of a claimed execution, now the caller's to release."""
        return self._locks.pop(execution_id, None)

    def release_all(self) -> None:
        """Give back every lock nobody took (a claim that failed half-way)."""
        locks, self._locks = self._locks, {}
        for lock in locks.values():
            lock.release()


async def claim(
    storage: Storage,
    ownership: Ownership,
    launcher: Launcher,
    workflows: Mapping[str, Workflow],
    queue: str,
    limit: int,
    cap: int,
) -> list[ExecutionHandle]:
    """Claim up to ``limit`` executions of ``queue`` and start them; return their handles.

    An execution that cannot start (canceled meanwhile, failing its integrity check) is
    logged and skipped; its lock is released.
    """
    claims = Claims(ownership)
    call = functools.partial(storage.claim_queued, queue, limit, claims, list(workflows), cap=cap)
    # The claim runs in a thread; if this task is cancelled meanwhile, wait for the thread
    # anyway, so the locks it takes are released rather than leaked.
    pending = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        claimed = await asyncio.shield(pending)
    except asyncio.CancelledError:
        await asyncio.wait({pending})
        claims.release_all()
        raise
    except BaseException:
        claims.release_all()
        raise
    handles: list[ExecutionHandle] = []
    try:
        for execution_id, name in claimed:
            lock = claims.take(execution_id)
            if lock is None:
                continue
            try:
                handle = await launcher.start(workflows[name], execution_id, (), {}, owned=lock)
            except UnbrokenError as exc:
                log.warning("queued execution %r was not started: %s", execution_id, exc)
                continue
            handles.append(handle)
    finally:
        claims.release_all()
    return handles

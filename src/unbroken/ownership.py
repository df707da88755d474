"""Process-exclusive ownership of executions, INV-15 (layer: engine).

Exactly one live process owns an execution at a time. With a lock directory (SQLite) an
owner holds ``fcntl.flock(LOCK_EX)`` on ``<lock_dir>/<lock_name(id)>.lock``; the kernel drops
the lock when the owner's process dies, so an orphan is reclaimable at once (the files are
``lockfiles.LockDir``'s). A file is removed by its holder when the execution has ended
(``OwnedLock.release(ended=True)``) or was pruned (``discard``), never while it is still
running; ``lockfiles`` says why removing a held file is safe.

``flock`` locks belong to an open file description, so a second ``acquire`` of the same id
in the same process fails too; a forked child inherits the description and the lock.

On PostgreSQL (``SessionLocks``) ownership is a session advisory lock held on a lease; see
``storage/postgres_locks.py`` for the lease, the fence and the barrier.

Without a lock directory (``memory://``) ownership is in-process: ids conflict within one
``scope`` object (for instance the storage they live in), tracked in a weak registry.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

from unbroken.errors import ExecutionLocked
from unbroken.ids import lock_name
from unbroken.lockfiles import LockDir

__all__ = ["OwnedLock", "Ownership", "SessionLocks", "ownership_for"]

_registry_guard = threading.Lock()
_registry: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()


class OwnedLock:
    """Ownership of one execution, held until ``release`` (or the end of a ``with``)."""

    __slots__ = ("_on_release", "execution_id", "remote")

    def __init__(
        self, execution_id: str, on_release: Callable[[bool], None], *, remote: bool = False
    ) -> None:
        self.execution_id = execution_id
        self._on_release: Callable[[bool], None] | None = on_release
        self.remote = remote
        """Whether releasing it is a database round trip (keep it off the event loop)."""

    @property
    def held(self) -> bool:
        """Whether this lock has not been released yet."""
        return self._on_release is not None

    def release(self, *, ended: bool = False) -> None:
        """Give up ownership; releasing twice is harmless.

        Args:
            ended: the execution's status is terminal (completed, failed, aborted or
                canceled): nothing resumes it under this lock, so a lock file is removed
                (while still held) rather than kept. Never for one that is still running.
        """
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release(ended)

    def __enter__(self) -> OwnedLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@runtime_checkable
class SessionLocks(Protocol):
    """Locks a shared database holds for its client's session (PostgreSQL advisory locks):
    the server releases them when the owning process dies."""

    def try_lock(self, name: str) -> int | None:
        """Take the lock ``name``; ``None`` on success, else the holder's pid (0 if unknown)."""
        ...

    def unlock(self, name: str) -> None:
        """Give the lock ``name`` back."""
        ...

    def barrier(self, execution_id: str) -> None:
        """After taking an execution's lock: wait out its previous owner's last write."""
        ...

    def watch(self, lease_secs: float, on_lost: Callable[[list[str]], None]) -> None:
        """Hold locks on a lease; ``on_lost(names)`` hears of locks lost with the session."""
        ...

    def lapsed(self, name: str) -> bool:
        """Whether the lock ``name`` was lost with its session and not given back yet."""
        ...


class Ownership:
    """Grants process-exclusive ownership of executions.

    Args:
        lock_dir: the directory of lock files (created with mode 0700 if missing), or
            ``None`` for session locks or in-process ownership.
        scope: with no ``lock_dir``, the object within which ids conflict (held weakly);
            defaults to this ``Ownership`` itself.
        session: a shared database's session locks, used when there is no ``lock_dir``.
        ahead: with ``lock_dir``, make lock files ahead of need on a thread of their own
            (an engine's many starts); ``close`` stops it.
    """

    def __init__(
        self,
        lock_dir: Path | None,
        *,
        scope: object | None = None,
        session: SessionLocks | None = None,
        ahead: bool = False,
    ) -> None:
        self._files = LockDir(lock_dir, ahead=ahead) if lock_dir is not None else None
        self._scope: object = self if scope is None else scope
        self._session = session

    def acquire(self, execution_id: str, *, barrier: bool = True) -> OwnedLock:
        """Take ownership of an execution without waiting.

        Args:
            execution_id: the execution to own.
            barrier: with session locks, wait out a write of the previous owner still in
                flight before returning; a queue claim, whose row lock already excludes
                one, passes ``False``.

        Returns:
            The held lock; ``release`` it (or use it as a context manager) to give it up.

        Raises:
            ExecutionLocked: another owner holds it (``holder_pid`` 0 when unknown).
            StorageError: the lock directory or file cannot be created or opened.
        """
        if self._files is not None:
            fd = self._files.acquire(execution_id)
            return OwnedLock(execution_id, functools.partial(self._files.release, fd, execution_id))
        if self._session is not None:
            return _acquire_session(self._session, execution_id, barrier)
        return self._acquire_in_process(execution_id)

    def discard(self, execution_ids: Sequence[str]) -> None:
        """The executions are gone (pruned): remove their lock files that no one holds.
        Nothing without lock files (session and in-process locks leave nothing behind).

        Each file's lock is taken for a moment, so an ``acquire`` racing it (in another
        process, or on another thread of this one) can fail as if the execution were
        owned (as with ``is_held``).
        """
        if self._files is not None and execution_ids:
            self._files.discard(execution_ids)

    def short(self) -> bool:
        """Whether lock files are made ahead and none is ready now (``made`` waits)."""
        return self._files is not None and self._files.short()

    async def made(self) -> None:
        """Wait until more lock files were made ahead (or their maker stopped)."""
        if self._files is not None:
            await self._files.made()

    def close(self) -> None:
        """Stop making lock files ahead and close the lock directory (locks still held stay
        held). Blocking: call it off the event loop."""
        if self._files is not None:
            self._files.close()

    @property
    def remote(self) -> bool:
        """Whether taking and giving back ownership are database round trips."""
        return self._session is not None

    def watch(self, lease_secs: float, on_lost: Callable[[list[str]], None]) -> None:
        """With session locks: lose them after ``lease_secs`` of silence, and call
        ``on_lost(lock_names)`` (from any thread) when they lapse. Otherwise nothing: file
        and in-process locks end only with their owner."""
        if self._session is not None:
            self._session.watch(lease_secs, on_lost)

    def barrier(self, execution_id: str) -> None:
        """With session locks, after taking ``execution_id``'s lock without one: wait out
        a write of its previous owner still in flight. Otherwise nothing."""
        if self._session is not None:
            self._session.barrier(execution_id)

    def lapsed(self, execution_id: str) -> bool:
        """Whether this process's ownership of the execution lapsed with its database
        session (only session locks lapse; file and in-process locks end with their owner)."""
        return self._session is not None and self._session.lapsed(lock_name(execution_id))

    def is_held(self, execution_id: str) -> bool:
        """Whether any owner (this process included) holds the execution now.

        A probe: on lock files it takes and drops a shared lock, so an ``acquire`` racing
        it in another process can fail as if the execution were owned.

        Raises:
            StorageError: the lock file exists but cannot be opened.
        """
        if self._files is not None:
            return self._files.held(execution_id)
        if self._session is not None:
            name = lock_name(execution_id)
            if self._session.try_lock(name) is not None:
                return True
            self._session.unlock(name)
            return False
        with _registry_guard:
            return execution_id in _registry.get(self._scope, ())

    def _acquire_in_process(self, execution_id: str) -> OwnedLock:
        with _registry_guard:
            held = _registry.setdefault(self._scope, set())
            if execution_id in held:
                raise ExecutionLocked(execution_id, os.getpid())
            held.add(execution_id)

        def release(ended: bool) -> None:
            with _registry_guard:
                held.discard(execution_id)

        return OwnedLock(execution_id, release)


def _acquire_session(session: SessionLocks, execution_id: str, barrier: bool) -> OwnedLock:
    name = lock_name(execution_id)
    holder = session.try_lock(name)
    if holder is not None:
        raise ExecutionLocked(execution_id, holder)
    if barrier:
        try:
            session.barrier(execution_id)
        except BaseException:
            session.unlock(name)
            raise
    return OwnedLock(execution_id, lambda ended: session.unlock(name), remote=True)


def ownership_for(storage: object, *, ahead: bool = False) -> Ownership:
    """The ownership a storage supports: lock files, session locks, or in-process;
    ``ahead``: make lock files ahead of need (see ``Ownership``)."""
    lock_dir = getattr(storage, "lock_dir", None)
    session = storage if isinstance(storage, SessionLocks) else None
    return Ownership(lock_dir, scope=storage, session=session, ahead=ahead)

"""Process-exclusive ownership of executions, INV-15 (layer: engine).

Exactly one live process owns an execution at a time. With a lock directory (SQLite) an
owner holds ``fcntl.flock(LOCK_EX)`` on ``<lock_dir>/<lock_name(id)>.lock``; the kernel drops
the lock when the owner's process dies, so an orphan is reclaimable at once. The file holds
the owner's pid, for error messages only, and is never unlinked: a waiter that opened the
old inode and a newcomer that created a new one could then both hold "the" lock.

``flock`` locks belong to an open file description, so a second ``acquire`` of the same id
in the same process fails too; a forked child inherits the description and the lock.

On PostgreSQL (``SessionLocks``) ownership is a session advisory lock held on a lease; see
``storage/postgres_locks.py`` for the lease, the fence and the barrier.

Without a lock directory (``memory://``) ownership is in-process: ids conflict within one
``scope`` object (for instance the storage they live in), tracked in a weak registry.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

from unbroken.errors import ExecutionLocked, StorageError
from unbroken.ids import lock_name

__all__ = ["OwnedLock", "Ownership", "SessionLocks", "ownership_for"]

_PID_BYTES = 32

_registry_guard = threading.Lock()
_registry: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()


class OwnedLock:
    """Ownership of one execution, held until ``release`` (or the end of a ``with``)."""

    __slots__ = ("_on_release", "execution_id", "remote")

    def __init__(
        self, execution_id: str, on_release: Callable[[], None], *, remote: bool = False
    ) -> None:
        self.execution_id = execution_id
        self._on_release: Callable[[], None] | None = on_release
        self.remote = remote
        """Whether releasing it is a database round trip (keep it off the event loop)."""

    @property
    def held(self) -> bool:
        """Whether this lock has not been released yet."""
        return self._on_release is not None

    def release(self) -> None:
        """Give up ownership; releasing twice is harmless."""
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()

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
    """

    def __init__(
        self,
        lock_dir: Path | None,
        *,
        scope: object | None = None,
        session: SessionLocks | None = None,
    ) -> None:
        self._lock_dir = lock_dir
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
        if self._lock_dir is not None:
            return _acquire_file(self._lock_dir, execution_id)
        if self._session is not None:
            return _acquire_session(self._session, execution_id, barrier)
        return self._acquire_in_process(execution_id)

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
        if self._lock_dir is not None:
            return _file_held(self._lock_dir, execution_id)
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

        def release() -> None:
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
    return OwnedLock(execution_id, lambda: session.unlock(name), remote=True)


def _acquire_file(lock_dir: Path, execution_id: str) -> OwnedLock:
    path = lock_dir / f"{lock_name(execution_id)}.lock"
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError("lock execution", exc.strerror or type(exc).__name__) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise ExecutionLocked(execution_id, holder) from None
    except BaseException:
        os.close(fd)
        raise
    _write_pid(fd)
    return OwnedLock(execution_id, lambda: os.close(fd))


def _file_held(lock_dir: Path, execution_id: str) -> bool:
    """Whether another open file description holds the lock file (a missing file: no)."""
    path = lock_dir / f"{lock_name(execution_id)}.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError("lock execution", exc.strerror or type(exc).__name__) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


def _holder_pid(fd: int) -> int:
    """The holder's pid; it writes it just after taking the lock, so an empty file is
    re-read a few times (2 ms apart) before the pid is reported unknown (0)."""
    for _ in range(5):
        pid = _read_pid(fd)
        if pid:
            return pid
        time.sleep(0.002)
    return 0


def _read_pid(fd: int) -> int:
    """The pid the holder wrote, or 0 if it cannot be read (being rewritten, garbage)."""
    try:
        pid = int(os.pread(fd, _PID_BYTES, 0).decode("ascii").strip())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return 0
    return pid if pid > 0 else 0


def _write_pid(fd: int) -> None:
    """Record our pid for others' error messages; the lock does not depend on it."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        pass


def ownership_for(storage: object) -> Ownership:
    """The ownership a storage supports: lock files, session locks, or in-process."""
    lock_dir = getattr(storage, "lock_dir", None)
    session = storage if isinstance(storage, SessionLocks) else None
    return Ownership(lock_dir, scope=storage, session=session)

"""PostgreSQL ownership locks: session advisory locks that lapse with their owner (layer: storage).

An execution is owned by whoever holds a session-level ``pg_advisory_lock`` on its key.
The locks live on one dedicated connection per storage, outside the pool, held from the
first ``try_lock`` until ``close``: the server releases every one of them when that
connection ends, so an owner that dies (on any machine) frees its executions as soon as
the server notices its socket is gone.

If the lock connection fails, every lock it held is already released server-side; the
call that notices raises ``StorageError`` saying so, and the next ``try_lock`` opens a new
connection.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from contextlib import suppress

import blake3
import psycopg

from ..errors import StorageError
from ..ids import lock_name
from .postgres_connection import PostgresConnections
from .postgres_rows import Connection

__all__ = ["PostgresLocks", "lock_key"]

_HOLDER = (
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid::bigint = %s AND l.objid::bigint = %s LIMIT 1"
)
_HELD_BY = (
    "SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
    "AND granted AND objsubid = 1 AND pid = %s"
)
_APPLICATION_PID = re.compile(r"unbroken pid (\d+)")


def lock_key(name: str, namespace: str = "") -> int:
    """The advisory lock key of a lock name, as a signed 64-bit integer.

    Advisory locks are per database, not per schema: with a ``namespace`` (the schema the
    tables live in) the key is the first 8 bytes of a BLAKE3 hash of namespace and name,
    so two deployments in two schemas of one database never contend; without one it is
    the name's first 8 bytes.

    Raises:
        ValueError: ``name`` is not hex or names fewer than 8 bytes.
    """
    raw = bytes.fromhex(name)
    if len(raw) < 8:
        raise ValueError(f"a lock name needs at least 8 bytes of hex, not {len(raw)}")
    if namespace:
        raw = blake3.blake3(namespace.encode("utf-8") + b"\0" + raw).digest(length=8)
    return int.from_bytes(raw[:8], "big", signed=True)


class PostgresLocks(PostgresConnections):
    """Cross-machine ownership of ``PostgresStorage``: ``try_lock`` and ``unlock``."""

    def __init__(
        self, url: str, *, create: bool = True, min_size: int = 1, max_size: int = 8
    ) -> None:
        super().__init__(url, create=create, min_size=min_size, max_size=max_size)
        self._lock_mutex = threading.Lock()
        self._lock_conn: Connection | None = None
        self._held: set[int] = set()
        self._namespace = ""
        self._lock_pid = 0

    def try_lock(self, name: str) -> int | None:
        """Take the session advisory lock of ``name`` (hex; its first 8 bytes are the key).

        A lock is held once: taking one this storage already holds fails like taking one
        held elsewhere (as a second ``flock`` of a lock file does), so one ``unlock`` never
        releases a lock two callers think they own.

        Returns:
            ``None`` when the lock is now held here; otherwise the pid its holder put in
            its ``application_name`` (``unbroken pid <pid>``; this process's pid when this
            storage holds it), or 0 when that is unknown.

        Raises:
            ValueError: ``name`` is not a lock name.
            StorageError: the storage is closed, or the lock connection failed (every lock
                this storage held is then released).
        """
        lock_key(name)  # validate before any I/O
        with self._lock_mutex:
            conn = self._lock_connection("try_lock")
            key = lock_key(name, self._namespace)
            if key in self._held:
                return os.getpid()
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                if row is not None and row[0]:
                    self._held.add(key)
                    return None
                return self._holder(conn, key)
            except psycopg.Error as exc:
                raise self._locks_lost("try_lock", exc) from None

    def unlock(self, name: str) -> None:
        """Release the lock of ``name`` if this storage holds it.

        Raises:
            ValueError: ``name`` is not a lock name.
            StorageError: the lock connection failed (every lock this storage held, this
                one included, is released).
        """
        lock_key(name)
        with self._lock_mutex:
            key = lock_key(name, self._namespace)
            if key not in self._held or self._lock_conn is None:
                return
            try:
                self._lock_conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.Error as exc:
                raise self._locks_lost("unlock", exc) from None
            self._held.discard(key)

    def fence(self, conn: Connection, op: str, execution_ids: Iterable[str]) -> None:
        """Refuse a write for an execution whose lock this storage took but no longer has.

        Runs inside the write's transaction: an owner whose lock session ended (a network
        partition, a server restart) must not write for an execution another process may
        now own. Executions this storage never locked (operator tools) pass.

        Raises:
            StorageError: ownership of one of them was lost; the transaction rolls back.
        """
        with self._lock_mutex:
            mine = {eid: lock_key(lock_name(eid), self._namespace) for eid in execution_ids}
            mine = {eid: key for eid, key in mine.items() if key in self._held}
            pid = self._lock_pid
        if not mine:
            return
        rows = conn.execute(_HELD_BY, (pid,)).fetchall()
        held = {((hi << 32) | lo) for hi, lo in rows}
        for eid, key in mine.items():
            if key & 0xFFFF_FFFF_FFFF_FFFF not in held:
                raise StorageError(
                    op,
                    f"ownership of execution {eid!r} was lost (its lock session ended); "
                    "nothing was written",
                )

    def close(self) -> None:
        """Close the pool and the lock connection, releasing every lock. Idempotent."""
        super().close()
        with self._lock_mutex:
            self._drop_lock_connection()

    def _lock_connection(self, op: str) -> Connection:
        """The lock connection, opened on first use (caller holds ``_lock_mutex``)."""
        self._require(op)
        conn = self._lock_conn
        if conn is not None and (conn.closed or conn.broken):
            if self._held:
                raise self._locks_lost(op, None)
            self._drop_lock_connection()
            conn = None
        if conn is None:
            conn = self._lock_conn = self._connect(op)
            try:
                row = conn.execute("SELECT current_schema()").fetchone()
            except psycopg.Error as exc:
                raise self._locks_lost(op, exc) from None
            self._namespace = str(row[0]) if row and row[0] else ""
            self._lock_pid = conn.info.backend_pid
        return conn

    def _holder(self, conn: Connection, key: int) -> int:
        """The pid in the ``application_name`` of the session holding ``key``, or 0."""
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        row = conn.execute(_HOLDER, (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
        match = _APPLICATION_PID.fullmatch(str(row[0])) if row else None
        return int(match[1]) if match else 0

    def _locks_lost(self, op: str, exc: psycopg.Error | None) -> StorageError:
        """Drop the failed lock connection; the error says its locks are gone."""
        self._drop_lock_connection()
        cause = f" ({self._detail(op, exc)})" if exc is not None else ""
        return StorageError(
            op, f"the lock connection failed and every lock this storage held is released{cause}"
        )

    def _drop_lock_connection(self) -> None:
        """Close the lock connection (caller holds ``_lock_mutex``)."""
        conn, self._lock_conn = self._lock_conn, None
        held, self._held = self._held, set()
        if conn is not None:
            # The server ends a closed session asynchronously: release the locks first so
            # they are free when close returns. On a broken connection this fails, and the
            # locks are released with the session anyway.
            with suppress(psycopg.Error):
                if held and not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock_all()")
                conn.close()

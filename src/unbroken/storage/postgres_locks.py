"""PostgreSQL ownership locks: session advisory locks that lapse with their owner (layer: storage).

An execution is owned by whoever holds a session-level ``pg_advisory_lock`` on its key.
The locks live on one dedicated connection per storage, outside the pool, held from the
first ``try_lock`` until ``close``: the server releases every one of them when that
connection ends, so an owner that dies (on any machine) frees its executions as soon as
the server notices its socket is gone.

A lease bounds how long a silent owner keeps them (``watch``): the lock session runs with
``idle_session_timeout`` set to the lease and a heartbeat thread touches it four times per
lease, so a process that is paused (SIGSTOP), hung or cut off loses its locks one lease
after it fell silent, and the server ends the session. Locks lost with their session
(a server restart, a network failure, a lapsed lease) are remembered as lost: ``watch``'s
callback hears their names, and every later write for those executions is refused. A write
that finds the session dead, or under which it dies, loses them there and then (a write for
one of those executions raises ``OwnershipLost``); otherwise the heartbeat notices.

Fencing. Writes run on the lock session itself (it is also the writer connection): a
transaction there commits only while that session, and with it every lock it holds, is
alive, so ``fence`` only checks in memory that the lock is held (not lost). Writes are not
pipelined, so a session frozen mid-transaction is ended by
``idle_in_transaction_session_timeout`` (= the lease) like an idle one. A write that finds
the lock session busy runs on a pooled connection, where ``fence`` locks the execution rows
``FOR KEY SHARE`` and checks ``pg_locks``; a new owner that is not claiming through the
queue (whose ``FOR UPDATE SKIP LOCKED`` already skips rows a writer holds) passes
``barrier`` after taking the lock: ``FOR UPDATE`` on the row waits out such a write, which
either committed before the new owner reads the journal or sees the lock gone.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import blake3
import psycopg

from ..errors import ExecutionLocked, OwnershipLost, StorageError
from ..ids import lock_name
from .postgres_connection import PostgresConnections, usable
from .postgres_rows import Connection

__all__ = ["PostgresLocks", "lock_key"]

log = logging.getLogger("unbroken")

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
_GUARD = (
    "SELECT set_config('idle_in_transaction_session_timeout', %s, true), "
    "(SELECT COUNT(*) FROM (SELECT 1 FROM executions WHERE execution_id = ANY(%s::text[]) "
    "FOR KEY SHARE) rows)"
)
_BARRIER = "SELECT 1 FROM executions WHERE execution_id = %s FOR UPDATE"
_BEATS_PER_LEASE = 4
_KEYS_KEPT = 10_000
"""Executions whose lock key ``fence`` remembers (all are forgotten past that)."""
_WAIT_FOR_SESSION_SECS = 0.005
"""How long a write waits for the lock session before taking a pooled connection."""


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
    """Cross-machine ownership of ``PostgresStorage``: ``try_lock``, ``unlock``, ``watch``,
    ``barrier`` and ``fence``."""

    def __init__(
        self, url: str, *, create: bool = True, min_size: int = 1, max_size: int = 8
    ) -> None:
        super().__init__(url, create=create, min_size=min_size, max_size=max_size)
        # One mutex for the lock session, which is also the writer connection. Claims and
        # prunes, which hold server locks of their own while they work, use pooled
        # connections: they must never wait for this mutex's holder, nor it for them.
        self._lock_mutex = threading.RLock()
        self._lock_conn: Connection | None = None
        self._held: dict[int, str] = {}  # key -> lock name, on the current lock session
        # Lapsed with an earlier session: writes are refused. The value says whether its
        # owner has let go (only then may this storage take it again).
        self._lost: dict[int, bool] = {}
        self._namespace = ""
        self._keys: dict[str, tuple[str, int]] = {}  # execution id -> (namespace, lock key)
        self._lock_pid = 0
        self._lease_ms = 0
        self._on_lost: Callable[[list[str]], None] | None = None
        # Names of locks lost with a session and not yet reported: whichever thread lost
        # them reports them once it has let go of the mutex (``_report``), whatever failed
        # after (a reconnect to a server still down, say).
        self._unreported: deque[str] = deque()
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None

    def watch(self, lease_secs: float, on_lost: Callable[[list[str]], None]) -> None:
        """Hold locks on a lease of ``lease_secs`` and call ``on_lost(names)`` (from any
        thread) when locks lapse with their session. Starts the heartbeat."""
        with self._lock_mutex:
            self._lease_ms = max(int(lease_secs * 1000), 1000)
            self._on_lost = on_lost
            if self._lock_conn is not None:
                self._apply_lease(self._lock_conn)
            if self._beat is None:
                self._beat = threading.Thread(
                    target=self._heartbeat, name="unbroken-lock-heartbeat", daemon=True
                )
                self._beat.start()

    def try_lock(self, name: str) -> int | None:
        """Take the session advisory lock of ``name`` (hex; its first 8 bytes are the key).

        A lock is held once: taking one this storage already holds fails like taking one
        held elsewhere (as a second ``flock`` of a lock file does), so one ``unlock`` never
        releases a lock two callers think they own. A lock lost with its session counts as
        held here until its owner calls ``unlock``.

        Returns:
            ``None`` when the lock is now held here; otherwise the pid its holder put in
            its ``application_name`` (``unbroken pid <pid>``; this process's pid when this
            storage holds it), or 0 when that is unknown.

        Raises:
            ValueError: ``name`` is not a lock name.
            StorageError: the storage is closed, or the server cannot be reached.
        """
        lock_key(name)  # validate before any I/O
        try:
            with self._lock_mutex:
                conn = self._lock_connection("try_lock")
                key = lock_key(name, self._namespace)
                if key in self._held or self._lost.get(key) is False:
                    return os.getpid()  # a lapsed lock stays ours until its owner lets go
                try:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                    if row is not None and row[0]:
                        self._held[key] = name
                        self._lost.pop(key, None)
                        return None
                    return self._holder(conn, key)
                except psycopg.Error as exc:
                    self._lose_session()
                    raise self._failure("try_lock", exc) from None
        finally:
            self._report()

    def unlock(self, name: str) -> None:
        """Release the lock of ``name`` if this storage holds it; forget it if it lapsed.

        Never raises for a failed lock connection: the lock is gone with its session.

        Raises:
            ValueError: ``name`` is not a lock name.
        """
        lock_key(name)
        with self._lock_mutex:
            key = lock_key(name, self._namespace)
            if key in self._lost:
                # Still refused to writes: entries its run queued may not have drained.
                self._lost[key] = True
                return
            if key not in self._held or self._lock_conn is None:
                return
            try:
                self._lock_conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.Error:
                self._lose_session()
                self._lost[key] = True
                with suppress(ValueError):
                    self._unreported.remove(name)  # let go of: not news to its owner
            else:
                del self._held[key]
        self._report()

    def lapsed(self, name: str) -> bool:
        """Whether the lock ``name`` was lost with a session and not yet given back.

        Raises:
            ValueError: ``name`` is not a lock name.
        """
        # No mutex: a dict lookup is atomic, and the event loop must not wait on a
        # heartbeat stuck in the network.
        return self._lost.get(lock_key(name, self._namespace)) is False

    def barrier(self, execution_id: str, timeout_secs: float | None = None) -> None:
        """After taking ``execution_id``'s lock: wait out any write of its previous owner
        still in flight (``FOR UPDATE`` on its row), so the journal read next is final.

        Raises:
            ExecutionLocked: the previous owner's write held the row past the timeout
                (the lease by default).
            StorageError: PostgreSQL failed.
        """
        ms = int((timeout_secs * 1000) if timeout_secs is not None else self._lease_ms or 10_000)
        # On a pooled connection: waiting here must not hold the lock session, which a
        # claim holding the row may need to finish.
        pool = self._require("barrier")
        try:
            with pool.connection() as conn, conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{ms}ms",))
                conn.execute(_BARRIER, (execution_id,))
        except psycopg.errors.LockNotAvailable:
            raise ExecutionLocked(execution_id, 0) from None
        except psycopg.Error as exc:
            raise self._failure("barrier", exc) from None

    def fence(self, conn: Connection, op: str, execution_ids: Iterable[str]) -> None:
        """Refuse a write for an execution whose lock this storage took but no longer has.

        Runs inside the write's transaction, first. On the lock session itself (where
        writes go unless it is busy) the write commits only while that session, and so
        every lock it holds, is alive: knowing the lock is held there is enough. On any
        other connection the rows are locked ``FOR KEY SHARE`` (see the module docstring)
        and the lock session must hold each lock in ``pg_locks``. Executions this storage
        never locked (operator tools) pass.

        Raises:
            OwnershipLost: ownership of one of them was lost; the transaction rolls back.
        """
        # No mutex: membership tests are atomic, and the caller may hold it (re-entrant,
        # but another thread's heartbeat must not wait on a write for this).
        mine: dict[str, int] = {}
        for eid in execution_ids:
            key = self._key_of(eid)
            if key in self._lost:
                raise OwnershipLost(op, eid, write="refused")
            if key in self._held:
                mine[eid] = key
        if not mine or conn is self._lock_conn:
            return
        pid = self._lock_pid
        lease = f"{self._lease_ms}ms" if self._lease_ms else "0"
        conn.execute(_GUARD, (lease, list(mine)))
        rows = conn.execute(_HELD_BY, (pid,)).fetchall()
        held = {((hi << 32) | lo) for hi, lo in rows}
        for eid, key in mine.items():
            if key & 0xFFFF_FFFF_FFFF_FFFF not in held:
                raise OwnershipLost(op, eid, write="refused")

    # -- writes -----------------------------------------------------------------------

    @contextmanager
    def _writing(self, op: str, execution_ids: Iterable[str] = ()) -> Iterator[Connection]:
        """The lock session for a write, or a pooled connection while another thread has
        held it for longer than ``_WAIT_FOR_SESSION_SECS``. A lock session found dead, or
        that dies under the write, is lost at once (``watch``'s callback hears its locks)
        rather than at the next heartbeat.

        Raises:
            OwnershipLost: the lock session died under the write and took the lock of one
                of ``execution_ids`` with it (the write is unconfirmed: a commit whose reply
                was lost with the session may have landed, before the session ended and so
                before any other owner could take the lock).
            StorageError: PostgreSQL failed.
        """
        pool = self._require(op)
        if not self._lock_mutex.acquire(timeout=_WAIT_FOR_SESSION_SECS):
            try:
                with pool.connection() as conn:
                    yield conn
            except psycopg.Error as exc:
                raise self._failure(op, exc) from None
            return
        try:
            conn = self._lock_connection(op)
            try:
                yield conn
            except psycopg.Error as exc:
                failure = self._failure(op, exc)
                raise (self._died_under(op, conn, execution_ids) or failure) from None
            except StorageError:
                lost = self._died_under(op, conn, execution_ids)
                if lost is None:
                    raise
                raise lost from None
        finally:
            self._lock_mutex.release()
            self._report()

    @contextmanager
    def _write(
        self, op: str, execution_ids: Iterable[str], *, one_statement: bool = False
    ) -> Iterator[Connection]:
        """A writing connection inside one transaction behind ``fence``, so that the write
        commits only while this storage owns every one of ``execution_ids`` it locked; the
        transaction commits when the block ends. For ``one_statement`` on the lock session
        the block's single statement runs alone in autocommit, one round trip (its own
        transaction: atomic, and over before the server waits on the client again).

        Not pipelined: each statement's reply ends with the server ready for the next,
        so a client that freezes mid-transaction (SIGSTOP, a hung host) is cut off by
        ``idle_in_transaction_session_timeout`` and its row and advisory locks freed. A
        pipeline left without its closing sync keeps the server waiting with no timeout
        at all.

        Raises:
            OwnershipLost: as ``_writing`` says.
            StorageError: PostgreSQL failed.
        """
        ids = list(execution_ids)
        with self._writing(op, ids) as conn:
            if one_statement and conn is self._lock_conn:
                self.fence(conn, op, ids)  # in memory only, on the lock session
                yield conn
                return
            with conn.transaction():
                self.fence(conn, op, ids)
                yield conn

    def _execute(self, op: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one writing statement, committed on its own (one round trip); its rows."""
        with self._writing(op) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def _died_under(
        self, op: str, conn: Connection, execution_ids: Iterable[str]
    ) -> OwnershipLost | None:
        """If the lock session died under a write that failed: lose its locks, and the
        ``OwnershipLost`` of the first of ``execution_ids`` among them."""
        if not conn.broken:
            return None
        self._lose_session()
        for eid in execution_ids:
            if self._key_of(eid) in self._lost:
                return OwnershipLost(op, eid, write="unconfirmed")
        return None

    def _key_of(self, execution_id: str) -> int:
        """The lock key of an execution, remembered: ``fence`` runs before every write, and
        a key costs two BLAKE3 hashes."""
        namespace = self._namespace
        known = self._keys.get(execution_id)
        if known is not None and known[0] == namespace:
            return known[1]
        key = lock_key(lock_name(execution_id), namespace)
        if len(self._keys) >= _KEYS_KEPT:
            self._keys.clear()
        self._keys[execution_id] = (namespace, key)
        return key

    def close(self) -> None:
        """Close the pool and the lock connection, releasing every lock. Idempotent."""
        self._beat_stop.set()
        beat, self._beat = self._beat, None
        if beat is not None and beat is not threading.current_thread():
            beat.join(5)
        super().close()
        with self._lock_mutex:
            self._drop_lock_connection()
            self._held.clear()
            self._lost.clear()

    # -- the lock session ------------------------------------------------------------

    def _lock_connection(self, op: str) -> Connection:
        """The lock connection, opened on first use or after the last one failed (whose
        locks are then lost). Caller holds ``_lock_mutex``."""
        self._require(op)
        conn = self._lock_conn
        if conn is not None and not _usable(conn):
            self._lose_session()
            conn = None
        if conn is None:
            conn = self._connect(op)
            try:
                row = conn.execute("SELECT current_schema()").fetchone()
                self._apply_lease(conn)
            except psycopg.Error as exc:
                with suppress(psycopg.Error):
                    conn.close()
                raise self._failure(op, exc) from None
            self._lock_conn = conn
            self._namespace = str(row[0]) if row and row[0] else ""
            self._lock_pid = conn.info.backend_pid
        return conn

    def _apply_lease(self, conn: Connection) -> None:
        """End the session if it stays silent for a lease (PostgreSQL 14 and newer)."""
        if not self._lease_ms:
            return
        lease = f"{self._lease_ms}ms"
        # A session paused inside a transaction is not idle: that needs its own timeout.
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (lease,)
        )
        try:
            conn.execute("SELECT set_config('idle_session_timeout', %s, false)", (lease,))
        except psycopg.errors.UndefinedObject:
            log.warning(
                "this PostgreSQL has no idle_session_timeout (it needs 14 or newer): a paused "
                "owner keeps its executions until its connection ends"
            )

    def _heartbeat(self) -> None:
        """Touch the lock session a few times per lease; report locks lost with it."""
        while not self._beat_stop.wait(max(self._lease_ms / 1000 / _BEATS_PER_LEASE, 0.05)):
            with self._lock_mutex:
                conn = self._lock_conn
                if conn is not None:
                    try:
                        conn.execute("SELECT 1")
                    except psycopg.Error:
                        self._lose_session()
            self._report()

    def _lose_session(self) -> None:
        """The lock session failed: its locks are gone. Remember them as lost, and to be
        reported (``_report``). Caller holds ``_lock_mutex``."""
        held = dict(self._held)
        # Lost before forgotten: ``fence`` on a pooled connection (no mutex) passes keys
        # in neither map unguarded, as executions this storage never locked.
        self._lost.update(dict.fromkeys(held, False))
        self._drop_lock_connection()
        self._held.clear()
        self._unreported.extend(held.values())

    def _report(self) -> None:
        """Tell the watcher which locks were lost since the last report (call it outside
        ``_lock_mutex``)."""
        pending = self._unreported
        if not pending:
            return
        names: list[str] = []
        with suppress(IndexError):  # another thread may be reporting them meanwhile
            while True:
                names.append(pending.popleft())
        if names:
            log.warning(
                "the PostgreSQL lock session ended; ownership of %d execution(s) is lost",
                len(names),
            )
        callback = self._on_lost
        if names and callback is not None:
            try:
                callback(names)
            except Exception:
                log.exception("the lost-ownership callback failed")

    def _holder(self, conn: Connection, key: int) -> int:
        """The pid in the ``application_name`` of the session holding ``key``, or 0."""
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        row = conn.execute(_HOLDER, (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
        match = _APPLICATION_PID.fullmatch(str(row[0])) if row else None
        return int(match[1]) if match else 0

    def _drop_lock_connection(self) -> None:
        """Close the lock connection (caller holds ``_lock_mutex``)."""
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            # The server ends a closed session asynchronously: release the locks first so
            # they are free when close returns. On a broken connection this fails, and the
            # locks are released with the session anyway.
            with suppress(psycopg.Error):
                if self._held and not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock_all()")
                conn.close()


def _usable(conn: Connection) -> bool:
    """Whether the lock session can still be used: not closed or broken, and, while idle,
    not ended by the server (checked without a round trip)."""
    if conn.closed or conn.broken:
        return False
    return conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE or usable(conn)


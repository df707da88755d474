"""PostgreSQL queued work and notifications: enqueue, claim, LISTEN/NOTIFY (layer: storage).

A queued execution is a ``running`` row with a ``queue`` and, in ``lock_key``, the advisory
lock key of its ownership (``postgres_locks.lock_key``). An execution is *owned* while some
session holds that lock, and ``pg_locks`` shows every session's locks, so SQL can tell the
owned executions of a queue from the waiting ones.

A claim is one short transaction, on a pooled connection (never the lock session: it takes
ownership locks while it holds the queue lock, see ``_pooled_write``):

1. with a cap, ``pg_advisory_xact_lock`` on the queue (a two-int key, a key space apart
   from the one-bigint ownership keys) serialises the queue's claimers, and the owned
   executions of the queue are counted from ``pg_locks``;
2. the oldest waiting rows are selected ``FOR UPDATE SKIP LOCKED``, so concurrent claimers
   of an uncapped queue take different rows instead of queueing behind each other;
3. the claimant takes each one's ownership lock (on the storage's lock connection) until
   it owns enough; the transaction then commits, releasing the queue lock and the rows.

Ownership locks, not row locks, are what keep an execution from running twice at once; the
row locks only keep claimers from fighting over the same rows, and the queue lock makes
"count, then claim" atomic, so a cap is never exceeded across workers. A worker that dies
loses its session and with it its ownership locks: its executions are waiting again.

Notifications travel on channels ``unbroken_<topic>``: enqueueing and finishing a queued
execution notify ``unbroken_work`` with the queue's name, settling a promise notifies
``unbroken_promises`` with its id, in the same transaction (delivered at commit). Channels
are per database, not per schema: a listener of another schema in the same database gets
a spurious wake-up, which costs it one poll.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Sequence
from contextlib import suppress

import blake3
import psycopg
from psycopg import sql

from ..errors import StorageError
from ..ids import lock_name
from ..journal import ExecutionRecord
from .base import WORK_TOPIC, Claimant
from .postgres_locks import PostgresLocks, lock_key
from .postgres_rows import Connection
from .sql_reads import EXECUTION_COLUMNS, SELECT_EXECUTION, execution_from_row
from .sql_writes import pg_placeholders

__all__ = ["CHANNEL_PREFIX", "PostgresListener", "PostgresQueue"]

CHANNEL_PREFIX = "unbroken_"
_QUEUE_LOCK_CLASS = 0x756E_6272  # ASCII 'unbr': the first int of a queue's two-int lock
PG_SELECT_EXECUTION = pg_placeholders(SELECT_EXECUTION)
# The new row and True (its queue's workers hear of it at commit), or the existing one and
# False. A row inserted by a transaction that committed after this statement's snapshot is
# neither: it is read again (PG_SELECT_EXECUTION).
_ENQUEUE = (
    "WITH created AS (INSERT INTO executions (execution_id, workflow, status, inputs, "
    "created_at, updated_at, queue, lock_key) VALUES (%(id)s, %(wf)s, 'running', %(in)s, "
    "%(now)s, %(now)s, %(queue)s, %(key)s) ON CONFLICT (execution_id) DO NOTHING "
    f"RETURNING {EXECUTION_COLUMNS}), "
    "notified AS MATERIALIZED (SELECT pg_notify(%(channel)s, queue) FROM created) "
    f"SELECT {EXECUTION_COLUMNS}, (SELECT COUNT(*) FROM notified) = 1 FROM created UNION ALL "
    f"SELECT {EXECUTION_COLUMNS}, false FROM executions WHERE execution_id = %(id)s "
    "AND NOT EXISTS (SELECT 1 FROM created)"
)
# Keys of every granted one-bigint advisory lock in this database, as signed bigints.
_HELD = (
    "SELECT (l.classid::bigint << 32) | l.objid::bigint FROM pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_COUNT_OWNED = (
    "SELECT COUNT(*) FROM executions WHERE queue = %s AND status = 'running' "
    f"AND lock_key IN ({_HELD})"
)
_CANDIDATES = (
    "SELECT execution_id, workflow FROM executions WHERE queue = %s AND status = 'running' "
    f"AND workflow = ANY(%s::text[]) AND lock_key NOT IN ({_HELD}) "
    "ORDER BY created_at, execution_id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_SLACK = 2
"""Extra candidates per claim, for an ownership lock taken outside a claim (a direct
``start``) between the ``pg_locks`` read and the try; more would only lock rows that
concurrent claimers then skip."""


class PostgresQueue(PostgresLocks):
    """Queued work and notifications of ``PostgresStorage``."""

    _key_namespace: str | None = None

    def enqueue_execution(
        self, execution_id: str, workflow: str, inputs: bytes, queue: str, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution waiting in ``queue`` unless the id exists, and
        notify the queue's workers; return ``(row, created)``."""
        op = "enqueue_execution"
        with self._writing(op) as conn:
            key = lock_key(lock_name(execution_id), self._namespace_of(conn))
            params = {
                "id": execution_id, "wf": workflow, "in": inputs, "now": now_ms,
                "queue": queue, "key": key, "channel": CHANNEL_PREFIX + WORK_TOPIC,
            }  # fmt: skip
            row = conn.execute(_ENQUEUE, params).fetchone()
            if row is None:  # created by a transaction younger than the statement
                found = conn.execute(PG_SELECT_EXECUTION, (execution_id,)).fetchone()
                row = None if found is None else (*found, False)
        if row is None:  # pruned meanwhile
            raise StorageError(op, "the execution was deleted meanwhile")
        return execution_from_row(row[:-1]), bool(row[-1])

    def claim_queued(
        self,
        queue: str,
        limit: int,
        claimant: Claimant,
        workflows: Sequence[str],
        *,
        cap: int = 0,
    ) -> list[tuple[str, str]]:
        """Claim up to ``limit`` waiting executions of ``queue``, oldest first, in one
        transaction (see the module docstring); with ``cap`` the owned executions of the
        queue, every session's, stay within it."""
        if limit <= 0 or not workflows:
            return []
        with self._pooled_write("claim_queued") as conn:
            room = limit
            if cap > 0:
                conn.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s)",
                    (_QUEUE_LOCK_CLASS, self._queue_key(conn, queue)),
                )
                row = conn.execute(_COUNT_OWNED, (queue,)).fetchone()
                room = min(room, cap - (int(row[0]) if row else 0))
                if room <= 0:
                    return []
            rows = conn.execute(_CANDIDATES, (queue, list(workflows), room + _SLACK)).fetchall()
            claimed: list[tuple[str, str]] = []
            for execution_id, workflow in rows:
                if len(claimed) >= room:
                    break
                if claimant.try_own(execution_id):
                    claimed.append((execution_id, workflow))
            return claimed

    def listen(self, topics: Sequence[str]) -> PostgresListener:
        """A listener on a connection of its own for ``topics``.

        Raises:
            StorageError: the storage is closed or the connection failed.
        """
        self._require("listen")
        conn = self._connect("listen")
        try:
            for topic in topics:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL_PREFIX + topic)))
        except psycopg.Error as exc:
            conn.close()
            raise self._failure("listen", exc) from None
        return PostgresListener(conn, self._detail)

    def _namespace_of(self, conn: Connection) -> str:
        """The schema that namespaces advisory lock keys (as ``postgres_locks`` finds it)."""
        if self._key_namespace is None:
            row = conn.execute("SELECT current_schema()").fetchone()
            self._key_namespace = str(row[0]) if row and row[0] else ""
        return self._key_namespace

    def _queue_key(self, conn: Connection, queue: str) -> int:
        """The second int of a queue's transaction lock: 4 bytes of a BLAKE3 hash of the
        schema and the queue's name (a collision only serialises two queues' claims)."""
        data = self._namespace_of(conn).encode("utf-8") + b"\0" + queue.encode("utf-8")
        return int.from_bytes(blake3.blake3(data).digest(length=4), "big", signed=True)


class PostgresListener:
    """A connection that LISTENs; ``wait`` blocks in ``select`` on its socket and on a
    pipe that ``interrupt`` writes to, so another thread can wake it at once."""

    def __init__(self, conn: Connection, detail: Callable[[str, psycopg.Error], str]) -> None:
        self._conn = conn
        self._detail = detail
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """The ``(topic, payload)`` pairs received within ``timeout`` seconds.

        Raises:
            StorageError: the connection failed or the listener is closed.
        """
        if self._closed:
            raise StorageError("listen", "the listener is closed")
        try:
            poller = select.poll()  # not select.select: it fails for descriptors >= 1024
            poller.register(self._conn.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(max(timeout, 0) * 1000)}
            if self._wake_r in ready:
                with suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            notes = self._conn.notifies(timeout=0) if self._conn.fileno() in ready else ()
            return [(n.channel.removeprefix(CHANNEL_PREFIX), n.payload) for n in notes]
        except psycopg.Error as exc:
            reason = self._detail("listen", exc)
        except (OSError, ValueError) as exc:  # the socket went away under select
            reason = type(exc).__name__
        raise StorageError("listen", f"the notification connection failed: {reason}")

    def interrupt(self) -> None:
        """Make a ``wait`` in another thread return now."""
        with suppress(OSError):
            os.write(self._wake_w, b"!")

    def close(self) -> None:
        """Close the connection and the pipe. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with suppress(psycopg.Error):
            self._conn.close()
        for fd in (self._wake_r, self._wake_w):
            with suppress(OSError):
                os.close(fd)

"""PostgreSQL connections: the pool, the schema check at open, transactions (layer: storage).

Most writes run on the session that holds the ownership locks (``postgres_locks.py``);
the pooled transactions here (``_pooled_write``) are for those that must not. Reads are
single statements in autocommit mode on pooled connections.

A connection is checked before each use without a round trip (a session the server ended,
by a restart or ``pg_terminate_backend``, has left its last message and end-of-file on the
socket): a dead writer connection is re-opened, a dead pooled one replaced.

``open`` first connects on its own (so a refused connection is reported as such, not as a
pool timeout), inspects the schema before it writes anything, and migrates under
``pg_advisory_xact_lock`` so processes opening one database at once take turns.

psycopg's messages can quote row values (a failing row's ``DETAIL``) and connection
strings, so errors are re-raised as ``StorageError`` built from metadata only (class,
SQLSTATE, constraint, primary message) with every spelling of the password scrubbed, and
the psycopg exception is not chained.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from ..errors import (
    ConfigurationError,
    NotAnUnbrokenDatabase,
    SchemaTooNew,
    StorageError,
    StorageUnavailable,
)
from .base import SCHEMA_VERSION
from .postgres_rows import (
    Connection,
    StaleMark,
    is_stale_mark,
)
from .postgres_schema import (
    META_TABLE,
    MIGRATION_LOCK,
    OUR_TABLES,
    VERSION_KEY,
    migration_statements,
)
from .url import redact_url

__all__ = ["CONNECT_TIMEOUT_SECS", "PostgresConnections"]

CONNECT_TIMEOUT_SECS = 5
"""libpq ``connect_timeout`` unless the URL sets one: an unreachable server fails fast."""

_POOL_TIMEOUT_SECS = 30.0
_INSPECT = (
    "SELECT current_schema(), ARRAY(SELECT c.relname::text FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relname = ANY(%s))"
)
_DUPLICATE = {
    "idx_journal_outcome": "a result or error already exists for this (execution, generation, "
    "step)",
    "promises_pkey": "a promise with this id already exists",
    "timers_pkey": "a timer with this id already exists",
}


class PostgresConnections:
    """The connection pool and the transactions and reads every part of
    ``PostgresStorage`` runs on (whose docstring describes the arguments)."""

    def __init__(
        self, url: str, *, create: bool = True, min_size: int = 1, max_size: int = 8
    ) -> None:
        self._url = url
        self._display_url = redact_url(url)
        self._secrets = _secrets_of(url)
        self._params = self._parse(url)
        if min_size < 0 or max_size < max(min_size, 1):
            raise ConfigurationError(
                f"the pool needs 0 <= min_size <= max_size and max_size >= 1, "
                f"not {min_size}..{max_size}"
            )
        self._create = create
        self._min_size = min_size
        self._max_size = max_size
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Connection] | None = None

    @property
    def lock_dir(self) -> None:
        """``None``: executions are owned through session advisory locks, not files."""
        return None

    @property
    def display_url(self) -> str:
        """The URL with any password replaced by ``***``."""
        return self._display_url

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create or migrate the schema; refuse foreign or newer schemas.

        Raises:
            StorageError: the server is unreachable or refused the login (``op`` is
                ``open``), or PostgreSQL failed.
            NotAnUnbrokenDatabase: the schema holds tables named like ours but is not
                ours, or is empty and ``create`` is false.
            SchemaTooNew: the schema was written by a newer unbroken.
        """
        with self._lock:
            if self._pool is not None:
                return
            with self._connect("open") as conn:
                try:
                    self._prepare(conn)
                except psycopg.Error as exc:
                    raise self._failure("open", exc) from None
            pool: ConnectionPool[Connection] = ConnectionPool(
                self._url,
                kwargs=self._connect_kwargs(),
                min_size=self._min_size,
                max_size=self._max_size,
                open=False,
                name="unbroken",
                timeout=_POOL_TIMEOUT_SECS,
                check=_check_alive,
            )
            try:
                pool.open(wait=self._min_size > 0, timeout=2.0 * CONNECT_TIMEOUT_SECS)
            except psycopg.Error as exc:
                pool.close()
                raise self._failure("open", exc) from None
            self._pool = pool

    def close(self) -> None:
        """Close the pool and every connection in it (the subclass closes its writer
        connection). Idempotent."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _connect_kwargs(self) -> dict[str, Any]:
        """Connection settings on top of the URL's: autocommit (writes open their own
        transactions), our pid in ``application_name`` (so an advisory lock's holder can be
        named), and a short ``connect_timeout`` unless the URL chose one."""
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "application_name": f"unbroken pid {os.getpid()}",
        }
        if "connect_timeout" not in self._params:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT_SECS
        return kwargs

    def _connect(self, op: str) -> Connection:
        """A new connection outside the pool; a refused connection says why."""
        try:
            return psycopg.connect(self._url, **self._connect_kwargs())
        except psycopg.Error as exc:
            reason = self._connect_reason(exc)
            kind = StorageUnavailable if _unavailable(exc) else StorageError
        # Raised outside the handler, so psycopg's message is not even the context.
        raise kind(op, reason)

    def _parse(self, url: str) -> dict[str, Any]:
        """The URL's libpq parameters; ``ConfigurationError`` if libpq cannot parse it."""
        try:
            return conninfo_to_dict(url)
        except psycopg.Error as exc:
            reason = self._scrub(" ".join(str(exc).split()))
        raise ConfigurationError(f"malformed PostgreSQL URL {self._display_url!r}: {reason}")

    def _prepare(self, conn: Connection) -> None:
        """Inspect the schema (reads only), then migrate it under the migration lock."""
        schema, version = self._inspect(conn)
        if version == SCHEMA_VERSION:
            return
        if version == 0 and not self._create:
            # Operator tools open with create=False: never turn an empty schema into a journal.
            raise NotAnUnbrokenDatabase(self._where(schema, empty=True))
        if schema is None:
            raise StorageError("open", "the search_path names no existing schema to create in")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            # Re-read under the lock: another process may have migrated meanwhile.
            _, version = self._inspect(conn)
            for statement in migration_statements(version):
                conn.execute(statement)

    def _inspect(self, conn: Connection) -> tuple[str | None, int]:
        """``(current schema, schema_version)`` of an acceptable schema (0 when it holds
        none of our tables); raise for any other."""
        row = conn.execute(_INSPECT, (list(OUR_TABLES),)).fetchone()
        schema, tables = (row[0], set(row[1])) if row else (None, set())
        if META_TABLE not in tables:
            if tables:
                raise NotAnUnbrokenDatabase(self._where(schema))
            return schema, 0
        query = sql.SQL("SELECT value FROM {} WHERE key = %s").format(
            sql.Identifier(str(schema), META_TABLE)
        )
        found = conn.execute(query, (VERSION_KEY,)).fetchone()
        if found is None or not str(found[0]).isdigit():
            raise NotAnUnbrokenDatabase(self._where(schema))
        version = int(found[0])
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(version, SCHEMA_VERSION)
        return schema, version

    def _where(self, schema: str | None, *, empty: bool = False) -> str:
        """How errors name the schema: ``schema 'x' of postgresql://...``."""
        if schema is None:
            return f"the search_path of {self._display_url}, which names no existing schema,"
        return f"{'the empty ' if empty else ''}schema {schema!r} of {self._display_url}"

    # -- transactions and reads -------------------------------------------------------

    def _require(self, op: str) -> ConnectionPool[Connection]:
        """The open pool; ``StorageError(op)`` once closed."""
        pool = self._pool
        if pool is None:
            raise StorageError(op, "the storage is not open")
        return pool

    @contextmanager
    def _pooled_write(self, op: str) -> Iterator[Connection]:
        """A pooled connection inside one transaction, for a transaction that takes
        ownership locks while it holds row or advisory locks of its own: on the lock
        session it would hold the session's mutex while it waits for those locks, and a
        thread holding them could be waiting for that mutex (``try_lock``) — a deadlock."""
        pool = self._require(op)
        try:
            with pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise self._failure(op, exc) from None

    @contextmanager
    def _snapshot(self, op: str) -> Iterator[Connection]:
        """A pooled connection inside a read-only ``REPEATABLE READ`` transaction: every
        statement sees one consistent snapshot."""
        pool = self._require(op)
        try:
            with pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn
        except psycopg.Error as exc:
            raise self._failure(op, exc) from None

    def _query(self, op: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one read statement (binary results) and fetch every row."""
        pool = self._require(op)
        try:
            with pool.connection() as conn:
                return conn.execute(query, params, binary=True).fetchall()
        except psycopg.Error as exc:
            raise self._failure(op, exc) from None

    # -- errors -----------------------------------------------------------------------

    def _failure(self, op: str, exc: psycopg.Error) -> StorageError:
        """A metadata-only ``StorageError(op)`` for a psycopg failure; a lost or refused
        connection (the server restarting, the network failing) is ``StorageUnavailable``,
        an unexpected stored high-water mark ``StaleMark``."""
        if is_stale_mark(exc):
            return StaleMark(op, "a stored high-water mark was not the expected one")
        kind = StorageUnavailable if _unavailable(exc) else StorageError
        return kind(op, self._detail(op, exc))

    def _detail(self, op: str, exc: psycopg.Error) -> str:
        """What went wrong, from metadata only, password-free."""
        if isinstance(exc, PoolClosed):
            return "the storage is not open"
        if isinstance(exc, PoolTimeout):
            if op == "open":
                return f"the pool could not connect to {self._display_url} in time"
            return (
                f"no free connection to {self._display_url} within {_POOL_TIMEOUT_SECS:g} s "
                f"(pool of {self._max_size})"
            )
        if exc.sqlstate is not None:
            return self._scrub(_describe(exc))
        text = " ".join(str(exc).split())
        if not isinstance(exc, psycopg.OperationalError):  # raised by psycopg itself
            return self._scrub(f"{type(exc).__name__}: {text}")
        if op == "open":
            return self._connect_reason(exc)
        return self._scrub(f"the connection to {self._display_url} failed: {text}")

    def _connect_reason(self, exc: psycopg.Error) -> str:
        """Why a connection failed, in a few words, password-free."""
        text = " ".join(str(exc).split())
        lowered = text.lower()
        host = self._params.get("host") or self._params.get("hostaddr") or "the local socket"
        where = f"{host}:{self._params.get('port') or 5432}"
        if "connection refused" in lowered:
            reason = f"connection refused at {where}"
        elif "fatal:" in lowered:
            reason = "the server refused the login: " + text[lowered.rindex("fatal:") + 6 :]
        elif "timeout expired" in lowered:
            timeout = self._params.get("connect_timeout", CONNECT_TIMEOUT_SECS)
            reason = f"no answer from {where} within {timeout} s"
        else:
            reason = text.removeprefix("connection failed: ")
        return self._scrub(f"cannot connect to {self._display_url}: {reason.strip()}")

    def _scrub(self, text: str) -> str:
        """``text`` with every spelling of the URL's password replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _describe(exc: psycopg.Error) -> str:
    """Class, SQLSTATE and primary message of a server error: never its ``DETAIL``,
    which can quote the values of a failing row."""
    diag = exc.diag
    if isinstance(exc, pg_errors.UniqueViolation) and diag.constraint_name in _DUPLICATE:
        return _DUPLICATE[diag.constraint_name]
    if isinstance(exc, pg_errors.ForeignKeyViolation) and diag.table_name == "journal":
        return "the journal entry names an execution that does not exist"
    primary = diag.message_primary or "(no message)"
    return f"{type(exc).__name__} (SQLSTATE {exc.sqlstate}): {primary}"


def _secrets_of(url: str) -> list[str]:
    """Every way the password may appear in a message: raw and percent-decoded, from the
    userinfo and from a ``password=`` query parameter; longest first."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            found.update((parts.password, unquote(parts.password)))
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name.lower() == "password" and value:
                found.add(value)
        for chunk in parts.query.split("&"):
            name, _, raw = chunk.partition("=")
            if name.lower() == "password" and raw:
                found.add(raw)
    except ValueError:
        pass
    return sorted((s for s in found if s), key=len, reverse=True)


_IDLE = pq.TransactionStatus.IDLE


_EOF_GRACE_MS = 50


def usable(conn: Connection) -> bool:
    """Whether an idle connection is still usable, without a round trip: a session the
    server ended (a restart, ``pg_terminate_backend``) has left a last message and then
    end-of-file on the socket, which reading reveals."""
    if conn.closed or conn.broken or conn.info.transaction_status != _IDLE:
        return False
    try:
        poller = select.poll()  # not select.select: it fails for descriptors >= 1024
        poller.register(conn.fileno(), select.POLLIN)
        wait_ms = 0
        for _ in range(3):  # a notice or the server's last message, then end-of-file
            if not poller.poll(wait_ms):
                return True
            conn.pgconn.consume_input()
            # Something arrived unasked: a session being ended sends its last message
            # and then closes; give the close a moment to arrive rather than trust it.
            wait_ms = _EOF_GRACE_MS
    except (psycopg.Error, OSError, ValueError):
        return False
    return False  # still more to read: not a connection to trust


def _check_alive(conn: Connection) -> None:
    """The pool's check of a connection it hands out: one the server ended is replaced."""
    if not usable(conn):
        raise psycopg.OperationalError("the server ended the session")


_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03"})
"""admin_shutdown, crash_shutdown, cannot_connect_now: the server is going or coming back."""


def _unavailable(exc: psycopg.Error) -> bool:
    """Whether ``exc`` says the server is out of reach rather than refusing the work."""
    if isinstance(exc, PoolTimeout):
        return True
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)  # the socket failed, no reply
    return state.startswith("08") or state in _UNAVAILABLE_STATES

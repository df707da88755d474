"""SQLite connections: the database file, one connection per thread, transactions (layer: storage).

Every write runs in an explicit ``BEGIN IMMEDIATE ... COMMIT`` (``ROLLBACK`` on error), so a
batch is all-or-nothing and two processes never interleave half-written batches. Reads are
single statements in autocommit mode. ``open`` inspects a database before it writes
anything: a file that is not SQLite, holds someone else's tables or carries a newer schema
is refused and left exactly as it was. ``try_write`` runs writes in one transaction on a
connection of its own that never waits for the write lock (``busy_timeout = 0``): the
journal writer uses it to commit on the event loop's thread, and hands the work to its
own thread when the lock is held elsewhere.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from ..errors import ConfigurationError, NotAnUnbrokenDatabase, SchemaTooNew, StorageError
from .base import SCHEMA_VERSION
from .schema import APPLICATION_ID, migration_statements
from .sqlite_rows import add_functions

__all__ = ["SqliteConnections"]

_BUSY_TIMEOUT_MS = 5000
_MIGRATION_WAIT_MS = 600_000
"""How long ``open`` waits for the write lock to migrate: a migration that rebuilds the
journal holds it for seconds per million rows, while other processes open the file."""

T = TypeVar("T")

_INSPECT = (
    "SELECT (SELECT application_id FROM pragma_application_id), "
    "(SELECT user_version FROM pragma_user_version), (SELECT COUNT(*) FROM sqlite_master)"
)


class _Holder:
    """Lives in the thread-local slot; when its thread ends, its connection is closed."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class SqliteConnections:
    """The database file and one connection per thread to it: open, migrate, close, and
    the transactions and reads every part of ``SqliteStorage`` runs on (whose docstring
    describes the arguments)."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        create: bool = True,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigurationError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self._path = Path(path)
        self._synchronous = synchronous
        self._create = create
        # Re-entrant: a thread's connection may be released (see _release) while it holds it.
        self._lock = threading.RLock()
        self._local = threading.local()
        self._connections: set[sqlite3.Connection] = set()
        self._is_open = False
        # try_write's connection: busy_timeout 0, used by one caller at a time.
        self._nowait: sqlite3.Connection | None = None
        self._nowait_lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def lock_dir(self) -> Path | None:
        """``<db>.locks``: the directory of per-execution lock files (INV-15)."""
        return Path(str(self._path) + ".locks")

    @property
    def display_url(self) -> str:
        """``sqlite:///`` followed by the path (four slashes for an absolute path)."""
        return "sqlite:///" + str(self._path)

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create or migrate the schema; refuse foreign or newer databases.

        Raises:
            StorageError: the file is missing and ``create`` is false, or SQLite failed.
            NotAnUnbrokenDatabase: the file is not SQLite or holds someone else's data.
            SchemaTooNew: the database was written by a newer unbroken.
        """
        with self._lock:
            if self._is_open:
                return
            if not self._create and not self._path.exists():
                raise StorageError("open", f"database file {self._path} does not exist")
            self._track(self._connect("open", prepare=True))
            self._is_open = True

    def close(self) -> None:
        """Close every connection of every thread. Idempotent."""
        with self._nowait_lock, self._lock:
            connections, self._connections = self._connections, set()
            old_local, self._local = self._local, threading.local()
            self._is_open = False
            self._nowait = None
        del old_local  # its holders' finalizers run now, outside the lock
        for conn in connections:
            _close_quietly(conn)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Inspect the database (reads only), then switch to WAL and migrate."""
        version = self._inspect(conn)
        if version == 0 and not self._create:
            # Operator tools open with create=False: never turn an empty file into a journal.
            raise NotAnUnbrokenDatabase(str(self._path))
        _enable_wal(conn)
        if version == SCHEMA_VERSION:
            return
        conn.execute(f"PRAGMA busy_timeout = {_MIGRATION_WAIT_MS}")
        try:
            with _transaction(conn, "open"):
                # Re-read under the write lock: another process may have migrated meanwhile.
                for sql in migration_statements(self._inspect(conn)):
                    conn.execute(sql)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")

    def _inspect(self, conn: sqlite3.Connection) -> int:
        """The schema version of an acceptable database; raise for any other."""
        # One statement, so one snapshot: another process may be migrating right now.
        app_id, version, objects = conn.execute(_INSPECT).fetchone()
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(version, SCHEMA_VERSION)
            return int(version)
        if app_id == 0 and version == 0 and objects == 0:
            return 0
        raise NotAnUnbrokenDatabase(str(self._path))

    def _connect(self, op: str, *, prepare: bool = False) -> sqlite3.Connection:
        """A new connection with the per-connection PRAGMAs.

        With ``prepare`` (on ``open``) the database is inspected before anything is
        written to it, then switched to WAL and migrated.
        """
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._failure(op, exc) from exc
        try:
            # Wait for another connection's write lock instead of failing with SQLITE_BUSY.
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # SQLite leaves foreign keys off by default; journal rows must name an execution.
            conn.execute("PRAGMA foreign_keys = ON")
            # NORMAL survives a process crash in WAL mode; FULL also survives power loss.
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            add_functions(conn)
            if prepare:
                self._prepare(conn)
            else:
                _enable_wal(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._failure(op, exc) from exc
            raise
        return conn

    def _failure(self, op: str, exc: sqlite3.Error) -> StorageError:
        """``NotAnUnbrokenDatabase`` if the file is not SQLite, else ``StorageError(op)``."""
        if getattr(exc, "sqlite_errorname", None) == "SQLITE_NOTADB":
            return NotAnUnbrokenDatabase(str(self._path))
        return _storage_error(op, exc)

    def _track(self, conn: sqlite3.Connection) -> None:
        """Register ``conn`` as this thread's connection (caller holds ``self._lock``)."""
        holder = _Holder(conn)
        self._local.holder = holder
        self._connections.add(conn)
        weakref.finalize(holder, _release, self._lock, self._connections, conn)

    def _conn(self, op: str) -> sqlite3.Connection:
        """This thread's connection, opened on first use (inside ``try_write``: its
        connection, so reads see the transaction's writes)."""
        local = self._local
        nowait: _Nowait | None = getattr(local, "nowait", None)
        if nowait is not None:
            return nowait.conn
        holder: _Holder | None = getattr(local, "holder", None)
        if holder is not None:
            return holder.conn
        with self._lock:
            if not self._is_open:
                raise StorageError(op, "the storage is not open")
            conn = self._connect(op)
            self._track(conn)
        return conn

    def _write(self, op: str) -> _Transaction:
        """This thread's connection inside a ``BEGIN IMMEDIATE`` transaction; inside
        ``try_write``, part of its transaction (a savepoint after its first write)."""
        nowait: _Nowait | None = getattr(self._local, "nowait", None)
        if nowait is not None:
            # A later write may fail alone; the first fails with all, unless isolated.
            nested = nowait.isolate or nowait.writes > 0
            nowait.writes += 1
            return _Transaction(nowait.conn, op, begin=_SAVEPOINT if nested else None)
        return _Transaction(self._conn(op), op)

    def try_write(
        self, fn: Callable[[Any], T], *, isolate: bool = False
    ) -> tuple[bool, T | None]:
        """Run ``fn(self)`` in one write transaction, now, unless another connection holds
        the write lock: ``(True, result)`` once committed, or ``(False, None)`` with
        nothing run. ``fn``'s own transactions become part of this one (its second and
        later ones savepoints, every one with ``isolate``, so a failed one is undone
        alone); reads see its writes. An exception out of ``fn`` rolls everything back
        and propagates.

        Raises:
            StorageError: the storage is not open, or SQLite failed.
        """
        if not self._nowait_lock.acquire(blocking=False):
            return False, None
        try:
            conn = self._nowait or self._open_nowait()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if (getattr(exc, "sqlite_errorname", None) or "").startswith("SQLITE_BUSY"):
                    return False, None  # another connection writes: nothing was run
                raise _storage_error("try_write", exc) from exc
            local = self._local
            local.nowait = _Nowait(conn, isolate)
            try:
                result = fn(self)
            except BaseException:
                _rollback(conn)
                raise
            finally:
                local.nowait = None
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise _storage_error("try_write", exc) from exc
            return True, result
        finally:
            self._nowait_lock.release()

    @property
    def checkpoint_pages(self) -> int:
        """Log pages between checkpoints of ``try_write``'s commits. A checkpoint syncs the
        log and the database file: under ``NORMAL``, where commits do not sync, fewer and
        longer ones cost less (the pages a log repeats are copied once); under ``FULL``,
        where each commit syncs the log already, a long log only costs (SQLite's 1,000).
        The other connections keep SQLite's own checkpoints every 1,000 pages."""
        return 4000 if self._synchronous == "NORMAL" else 1000

    def checkpoint(self) -> None:
        """Copy what the log holds into the database file as far as readers allow
        (``PASSIVE``: waits for no one), from this thread's connection."""
        self._query("checkpoint", "PRAGMA wal_checkpoint(PASSIVE)")

    def prepare_writes(self) -> None:
        """Open ``try_write``'s connection now, unless it is open or a commit holds it.
        A failure is left to ``try_write``, which opens it again and reports it."""
        if not self._nowait_lock.acquire(blocking=False):
            return
        try:
            with suppress(StorageError, sqlite3.Error):
                if self._nowait is None:
                    self._open_nowait()
        finally:
            self._nowait_lock.release()

    def _open_nowait(self) -> sqlite3.Connection:
        """``try_write``'s connection (caller holds ``_nowait_lock``)."""
        with self._lock:
            if not self._is_open:
                raise StorageError("try_write", "the storage is not open")
            conn = self._connect("try_write")
            # Never wait for the write lock: the caller (the event loop's thread) hands the
            # write to the writer thread instead.
            conn.execute("PRAGMA busy_timeout = 0")
            # A checkpoint costs milliseconds (and syncs): never on the caller's thread;
            # the writer thread runs them (checkpoint).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._connections.add(conn)
            self._nowait = conn
        return conn

    @contextmanager
    def _snapshot(self, op: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside a read transaction: one consistent snapshot
        (inside ``try_write``, its write transaction already is one)."""
        conn = self._conn(op)
        if conn.in_transaction:
            yield conn
            return
        with _transaction(conn, op, "BEGIN DEFERRED"):
            yield conn

    def _query(self, op: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """Run one read statement and fetch every row."""
        conn = self._conn(op)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(op, exc) from exc


# -- helpers --------------------------------------------------------------------------


class _Nowait:
    """``try_write``'s transaction, as the thread running it sees it."""

    __slots__ = ("conn", "isolate", "writes")

    def __init__(self, conn: sqlite3.Connection, isolate: bool) -> None:
        self.conn = conn
        self.isolate = isolate
        self.writes = 0


_SAVEPOINT = ("SAVEPOINT unbroken_write", "RELEASE unbroken_write", "ROLLBACK TO unbroken_write")
_TOP = ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` on a connection; ``ROLLBACK`` and re-raise on
    any error, ``sqlite3`` errors as ``StorageError(op)`` with the cause chained.

    Inside ``try_write``'s transaction it is a savepoint (``begin=_SAVEPOINT``), or
    nothing of its own (``begin=None``: it commits or fails with the whole).
    A class rather than a generator: it wraps every journal append.
    """

    __slots__ = ("_conn", "_op", "_sql")

    def __init__(
        self, conn: sqlite3.Connection, op: str, begin: tuple[str, str, str] | None = _TOP
    ) -> None:
        self._conn = conn
        self._op = op
        self._sql = begin

    def __enter__(self) -> sqlite3.Connection:
        if self._sql is not None:
            try:
                self._conn.execute(self._sql[0])
            except sqlite3.Error as exc:
                raise _storage_error(self._op, exc) from exc
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, sql = self._conn, self._sql
        if exc_type is None:
            if sql is not None:
                try:
                    conn.execute(sql[1])
                except sqlite3.Error as error:
                    _undo(conn, sql)
                    raise _storage_error(self._op, error) from error
            return
        if sql is not None:
            _undo(conn, sql)
        if isinstance(exc, sqlite3.Error):
            raise _storage_error(self._op, exc) from exc


def _undo(conn: sqlite3.Connection, sql: tuple[str, str, str]) -> None:
    """Roll the transaction, or the savepoint, back (and release the savepoint)."""
    if sql is _TOP:
        _rollback(conn)
        return
    with suppress(sqlite3.Error):  # the enclosing transaction reports what went wrong
        conn.execute(sql[2])
        conn.execute(sql[1])


@contextmanager
def _transaction(
    conn: sqlite3.Connection, op: str, begin: str = "BEGIN IMMEDIATE"
) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` and re-raise on any error.

    ``sqlite3`` errors come out as ``StorageError(op)`` with the cause chained.
    """
    try:
        conn.execute(begin)
    except sqlite3.Error as exc:
        raise _storage_error(op, exc) from exc
    try:
        yield
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(conn)
        raise _storage_error(op, exc) from exc
    except BaseException:
        _rollback(conn)
        raise


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the database to WAL (persistent; a no-op once set).

    Changing the journal mode can fail with ``SQLITE_BUSY`` without consulting the busy
    handler (two processes creating one file at once), so it is retried here.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            # WAL: readers never block the writer, and a commit appends to the log only.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorname", None) in ("SQLITE_BUSY", "SQLITE_LOCKED")
            if not busy or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"could not enable WAL (journal_mode is {mode})")


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so."""
    if conn.in_transaction:
        # The transaction is gone either way; the original error is the one to report.
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _release(
    lock: threading.RLock, connections: set[sqlite3.Connection], conn: sqlite3.Connection
) -> None:
    """Forget and close the connection of a thread that ended."""
    with lock:
        connections.discard(conn)
    _close_quietly(conn)


def _close_quietly(conn: sqlite3.Connection) -> None:
    """Close ``conn``; a failure leaves it unusable anyway, so it is not reported."""
    with suppress(sqlite3.Error):
        conn.close()


def _storage_error(op: str, exc: sqlite3.Error) -> StorageError:
    """A metadata-only ``StorageError`` for a sqlite3 failure (SQLite never echoes values)."""
    text = str(exc)
    if "UNIQUE constraint failed: journal." in text:
        detail = "a result or error already exists for this (execution, generation, step)"
    elif "FOREIGN KEY constraint failed" in text:
        detail = "the journal entry names an execution that does not exist"
    else:
        detail = f"{getattr(exc, 'sqlite_errorname', None) or type(exc).__name__}: {text}"
    return StorageError(op, detail)

"""SQLite storage: one database file in WAL mode, one connection per thread (layer: storage).

Every write runs in an explicit ``BEGIN IMMEDIATE ... COMMIT`` (``ROLLBACK`` on error), so a
batch is all-or-nothing and two processes never interleave half-written batches. Reads are
single statements in autocommit mode. ``open`` inspects a database before it writes
anything: a file that is not SQLite, holds someone else's tables or carries a newer schema
is refused and left exactly as it was.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from ..errors import (
    ConfigurationError,
    ExecutionCanceled,
    NotAnUnbrokenDatabase,
    SchemaTooNew,
    StorageError,
    UnknownExecution,
)
from ..journal import (
    EntryKind,
    ExecutionRecord,
    ExecutionStatus,
    ExecutionSummary,
    JournalEntry,
    StepInfo,
)
from .base import SCHEMA_VERSION, Signer, outcomes_by_execution
from .schema import APPLICATION_ID, migration_statements
from .sqlite_retention import SqliteV3Methods

__all__ = ["SqliteStorage"]

_BUSY_TIMEOUT_MS = 5000

_EXECUTION_COLUMNS = (
    "execution_id, workflow, status, generation, inputs, output, error_type, error, "
    "created_at, updated_at, finalized_at"
)
_SELECT_EXECUTION = f"SELECT {_EXECUTION_COLUMNS} FROM executions WHERE execution_id = ?"
_ENTRY_COLUMNS = (
    "execution_id, generation, step_id, kind, name, effect, idem_key, payload, created_at, seq, "
    "hmac, folded"
)
_INSERT_ENTRY = (
    "INSERT INTO journal (execution_id, generation, step_id, kind, name, effect, idem_key, "
    "payload, created_at, hmac, folded) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_BUMP_INTEGRITY = (
    "INSERT INTO integrity (execution_id, outcomes, mac, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (execution_id) DO UPDATE SET outcomes = excluded.outcomes, "
    "mac = excluded.mac, updated_at = excluded.updated_at"
)
_COUNT_SEALED = (
    "SELECT (SELECT COUNT(*) FROM journal WHERE SUBSTR(payload, 1, 1) = :k) "
    "+ (SELECT COUNT(*) FROM journal WHERE SUBSTR(hmac, 1, 1) = :k) "
    "+ (SELECT COUNT(*) FROM executions WHERE SUBSTR(inputs, 1, 1) = :k) "
    "+ (SELECT COUNT(*) FROM executions WHERE SUBSTR(output, 1, 1) = :k) "
    "+ (SELECT COUNT(*) FROM executions WHERE SUBSTR(error, 1, 1) = :k) "
    "+ (SELECT COUNT(*) FROM integrity WHERE SUBSTR(mac, 1, 1) = :k) "
    "+ (SELECT COUNT(*) FROM promises WHERE SUBSTR(payload, 1, 1) = :k)"
)
_INSPECT = (
    "SELECT (SELECT application_id FROM pragma_application_id), "
    "(SELECT user_version FROM pragma_user_version), (SELECT COUNT(*) FROM sqlite_master)"
)
_STEPS_OF_CURRENT_GENERATION = (
    "(SELECT COUNT(*) FROM journal j WHERE j.execution_id = e.execution_id "
    "AND j.generation = e.generation AND j.kind IN ('result', 'error'))"
)


class _Holder:
    """Lives in the thread-local slot; when its thread ends, its connection is closed."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class SqliteStorage(SqliteV3Methods):
    """The SQLite backend of the ``Storage`` protocol (promises, timers, folds and
    retention live in ``SqliteV3Methods``).

    Args:
        path: The database file; created on ``open`` unless ``create`` is false.
        synchronous: ``NORMAL`` survives a process crash, ``FULL`` also a power loss.
        create: Whether ``open`` may create a missing file.
    """

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
        with self._lock:
            connections, self._connections = self._connections, set()
            old_local, self._local = self._local, threading.local()
            self._is_open = False
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
        with _transaction(conn, "open"):
            # Re-read under the write lock: another process may have migrated meanwhile.
            for sql in migration_statements(self._inspect(conn)):
                conn.execute(sql)

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
        """This thread's connection, opened on first use."""
        holder: _Holder | None = getattr(self._local, "holder", None)
        if holder is not None:
            return holder.conn
        with self._lock:
            if not self._is_open:
                raise StorageError(op, "the storage is not open")
            conn = self._connect(op)
            self._track(conn)
        return conn

    @contextmanager
    def _write(self, op: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside a ``BEGIN IMMEDIATE`` transaction."""
        conn = self._conn(op)
        with _transaction(conn, op):
            yield conn

    @contextmanager
    def _snapshot(self, op: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside a read transaction: one consistent snapshot."""
        conn = self._conn(op)
        with _transaction(conn, op, "BEGIN DEFERRED"):
            yield conn

    def _query(
        self, op: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()
    ) -> list[Any]:
        """Run one read statement and fetch every row."""
        conn = self._conn(op)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(op, exc) from exc

    def _entries(self, op: str, where: str, params: Sequence[Any]) -> list[JournalEntry]:
        """The journal rows ``WHERE <where>`` as entries."""
        rows = self._query(op, f"SELECT {_ENTRY_COLUMNS} FROM journal WHERE {where}", params)
        return [_entry(row) for row in rows]

    def _insert_entry(self, conn: sqlite3.Connection, entry: JournalEntry) -> None:
        """Insert one journal row inside the caller's write transaction."""
        conn.execute(_INSERT_ENTRY, _insert_params(entry))

    # -- executions -------------------------------------------------------------------

    def create_execution(
        self, execution_id: str, workflow: str, inputs: bytes, now_ms: int
    ) -> tuple[ExecutionRecord, bool]:
        """Insert a ``running`` execution unless one exists; return ``(row, created)``."""
        with self._write("create_execution") as conn:
            cursor = conn.execute(
                "INSERT INTO executions (execution_id, workflow, status, inputs, created_at, "
                "updated_at) VALUES (?, ?, 'running', ?, ?, ?) "
                "ON CONFLICT (execution_id) DO NOTHING",
                (execution_id, workflow, inputs, now_ms, now_ms),
            )
            row = conn.execute(_SELECT_EXECUTION, (execution_id,)).fetchone()
        return _execution(row), cursor.rowcount == 1

    def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """The execution row, or ``None``."""
        rows = self._query("get_execution", _SELECT_EXECUTION, (execution_id,))
        return _execution(rows[0]) if rows else None

    def reopen_execution(self, execution_id: str, now_ms: int) -> ExecutionRecord:
        """Un-finalize a terminal execution (INV-16); return the row as it is now.

        Raises:
            ExecutionCanceled: the execution was canceled (INV-16').
            UnknownExecution: no such execution.
        """
        with self._write("reopen_execution") as conn:
            conn.execute(
                "UPDATE executions SET status = 'running', finalized_at = NULL, output = NULL, "
                "error_type = NULL, error = NULL, updated_at = ? WHERE execution_id = ? "
                "AND status IN ('completed', 'failed', 'aborted')",
                (now_ms, execution_id),
            )
            row = conn.execute(_SELECT_EXECUTION, (execution_id,)).fetchone()
        if row is None:
            raise UnknownExecution(execution_id)
        record = _execution(row)
        if record.status is ExecutionStatus.CANCELED:
            raise ExecutionCanceled(execution_id)
        return record

    def finalize_execution(
        self,
        execution_id: str,
        status: ExecutionStatus,
        now_ms: int,
        *,
        output: bytes | None = None,
        error_type: str | None = None,
        error: bytes | None = None,
    ) -> bool:
        """Set a terminal status while ``running``; ``False`` if another status won."""
        status = ExecutionStatus(status)
        finalized_at = now_ms if status.is_terminal else None
        with self._write("finalize_execution") as conn:
            cursor = conn.execute(
                "UPDATE executions SET status = ?, output = ?, error_type = ?, error = ?, "
                "updated_at = ?, finalized_at = ? WHERE execution_id = ? AND status = 'running'",
                (status.value, output, error_type, error, now_ms, finalized_at, execution_id),
            )
        return cursor.rowcount == 1

    def abort_generation(self, execution_id: str, generation: int, now_ms: int) -> int:
        """Mark ``generation`` aborted and start the next one; return the current generation.

        Guarded: if the execution already moved past ``generation`` nothing changes.

        Raises:
            UnknownExecution: no such execution.
        """
        with self._write("abort_generation") as conn:
            conn.execute(
                "UPDATE executions SET generation = generation + 1, updated_at = ? "
                "WHERE execution_id = ? AND generation = ?",
                (now_ms, execution_id, generation),
            )
            row = conn.execute(
                "SELECT generation FROM executions WHERE execution_id = ?", (execution_id,)
            ).fetchone()
        if row is None:
            raise UnknownExecution(execution_id)
        return int(row[0])

    def list_executions(
        self, *, status: ExecutionStatus | None = None, limit: int = 100
    ) -> list[ExecutionSummary]:
        """Newest first, metadata only; ``steps`` counts results and errors of the current
        generation."""
        where = "" if status is None else "WHERE e.status = ?"
        params: list[Any] = [] if status is None else [ExecutionStatus(status).value]
        rows = self._query(
            "list_executions",
            f"SELECT e.execution_id, e.workflow, e.status, {_STEPS_OF_CURRENT_GENERATION}, "
            f"e.created_at, e.finalized_at FROM executions e {where} "
            "ORDER BY e.created_at DESC, e.execution_id DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [
            ExecutionSummary(eid, wf, ExecutionStatus(st), steps, created, finalized)
            for eid, wf, st, steps, created, finalized in rows
        ]

    def running_executions(self) -> list[tuple[str, str]]:
        """``(execution_id, workflow)`` of every ``running`` execution, oldest first."""
        rows = self._query(
            "running_executions",
            "SELECT execution_id, workflow FROM executions WHERE status = 'running' "
            "ORDER BY created_at, execution_id",
        )
        return [(eid, wf) for eid, wf in rows]

    # -- journal ----------------------------------------------------------------------

    def append(self, entries: Sequence[JournalEntry], signer: Signer | None = None) -> int:
        """Insert entries in one transaction; return the last ``seq`` (0 if none).

        With a ``signer`` the high-water mark of every execution that gains an outcome is
        re-signed in the same transaction.

        Raises:
            StorageError: a second result or error for one (execution, generation, step),
                an unknown execution, or a database failure; nothing was inserted.
        """
        if not entries:
            return 0
        with self._write("append") as conn:
            conn.executemany(_INSERT_ENTRY, map(_insert_params, entries))
            seq = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            if signer is not None:
                for eid, added in outcomes_by_execution(entries).items():
                    row = conn.execute(
                        "SELECT outcomes FROM integrity WHERE execution_id = ?", (eid,)
                    ).fetchone()
                    count = (row[0] if row else 0) + added
                    now = entries[-1].created_at_ms
                    conn.execute(_BUMP_INTEGRITY, (eid, count, signer(eid, count), now))
        return int(seq)

    def read_segment(
        self, execution_id: str, generation: int, from_step: int, limit: int
    ) -> list[JournalEntry]:
        """Rows of one generation from ``from_step`` on, by ``(step_id, seq)``."""
        return self._entries(
            "read_segment",
            "execution_id = ? AND generation = ? AND step_id >= ? ORDER BY step_id, seq LIMIT ?",
            (execution_id, generation, from_step, max(limit, 0)),
        )

    def find_by_key(self, execution_id: str, idem_key: bytes) -> list[JournalEntry]:
        """Every row of any generation with this idempotency key, by ``seq`` (INV-13)."""
        where = "execution_id = ? AND idem_key = ? ORDER BY seq"
        return self._entries("find_by_key", where, (execution_id, idem_key))

    def list_steps(self, execution_id: str) -> list[StepInfo]:
        """Metadata of every journal row of the execution, by ``seq``; payloads stay in
        the database (INV-5): only their length is read."""
        rows = self._query(
            "list_steps",
            "SELECT step_id, name, effect, kind, generation, seq, created_at, "
            "COALESCE(LENGTH(payload), 0), LOWER(HEX(SUBSTR(idem_key, 1, 8))) "
            "FROM journal WHERE execution_id = ? ORDER BY seq",
            (execution_id,),
        )
        return [
            StepInfo(step, name, effect, EntryKind(kind), gen, seq, created, size, prefix)
            for step, name, effect, kind, gen, seq, created, size, prefix in rows
        ]

    def max_seq(self) -> int:
        """The highest ``seq`` in the journal, 0 when empty (FR-DE-12)."""
        rows = self._query("max_seq", "SELECT COALESCE(MAX(seq), 0) FROM journal")
        return int(rows[0][0])

    # -- integrity and keys -----------------------------------------------------------

    def read_integrity(self, execution_id: str) -> tuple[int, bytes] | None:
        """The signed high-water mark ``(count, mac)`` of an execution, or ``None``."""
        rows = self._query(
            "read_integrity",
            "SELECT outcomes, mac FROM integrity WHERE execution_id = ?",
            (execution_id,),
        )
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def count_outcomes(self, execution_id: str) -> int:
        """``result`` and ``error`` rows of the execution, every generation, plus the
        ``folded`` counts of its checkpoint rows."""
        rows = self._query(
            "count_outcomes",
            "SELECT COALESCE(SUM(CASE WHEN kind IN ('result', 'error') THEN 1 "
            "WHEN kind = 'checkpoint' THEN folded ELSE 0 END), 0) FROM journal "
            "WHERE execution_id = ?",
            (execution_id,),
        )
        return int(rows[0][0])

    def key_verifiers(self) -> dict[int, bytes]:
        """Key-check values of every key id that has sealed data here."""
        rows = self._query("key_verifiers", "SELECT key_id, verifier FROM keys")
        return {int(k): bytes(v) for k, v in rows}

    def add_key_verifier(self, key_id: int, verifier: bytes, now_ms: int) -> None:
        """Record a key's check value unless one is recorded for that id."""
        with self._write("add_key_verifier") as conn:
            conn.execute(
                "INSERT INTO keys (key_id, verifier, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key_id) DO NOTHING",
                (key_id, verifier, now_ms),
            )

    def has_executions(self) -> bool:
        """Whether any execution (hence any payload) is stored."""
        return bool(self._query("has_executions", "SELECT 1 FROM executions LIMIT 1"))

    def count_sealed(self, key_id: int) -> int:
        """Stored blobs and MACs whose first byte names ``key_id``."""
        rows = self._query("count_sealed", _COUNT_SEALED, {"k": bytes([key_id])})
        return int(rows[0][0])


# -- helpers --------------------------------------------------------------------------


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


def _execution(row: Sequence[Any]) -> ExecutionRecord:
    """An ``executions`` row (``_EXECUTION_COLUMNS`` order) as a record."""
    return ExecutionRecord(row[0], row[1], ExecutionStatus(row[2]), *row[3:])


def _insert_params(e: JournalEntry) -> tuple[Any, ...]:
    """The ``_INSERT_ENTRY`` parameters of an entry (its ``seq`` is the database's to give)."""
    kind = EntryKind(e.kind).value
    head = (e.execution_id, e.generation, e.step_id, kind, e.name, e.effect)
    return (*head, e.idem_key, e.payload, e.created_at_ms, e.hmac, e.folded)


def _entry(row: Sequence[Any]) -> JournalEntry:
    """A ``journal`` row (``_ENTRY_COLUMNS`` order) as an entry."""
    eid, generation, step_id, kind, name, effect, idem_key, payload, created, seq, mac, n = row
    return JournalEntry(
        eid, generation, step_id, EntryKind(kind), name, effect, idem_key, payload, created, seq,
        mac, n,
    )

"""Execution-row and key writes shared by the SQL backends (layer: storage).

Reopening, finalizing and aborting a generation change one ``executions`` row, and a key's
check value is recorded, with the same SQL on SQLite and PostgreSQL: the statements are
written once here with ``?`` placeholders (PostgreSQL rewrites them once, at import, with
``pg_placeholders``), together with what turns their results into the protocol's answers.
The transactions they run in stay per backend: ``BEGIN IMMEDIATE`` on SQLite; on
PostgreSQL the execution writes are fenced, and finalizing also notifies the queue in the
same statement.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ..errors import ExecutionCanceled, UnknownExecution
from ..journal import ExecutionRecord, ExecutionStatus
from .sql_reads import execution_from_row

__all__ = [
    "ABORT",
    "ADD_KEY_VERIFIER",
    "FINALIZE",
    "GENERATION",
    "REOPEN",
    "finalize_params",
    "pg_placeholders",
    "reopened",
]

REOPEN = (
    "UPDATE executions SET status = 'running', finalized_at = NULL, output = NULL, "
    "error_type = NULL, error = NULL, updated_at = ? WHERE execution_id = ? "
    "AND status IN ('completed', 'failed', 'aborted')"
)
"""Un-finalize a terminal execution that was not canceled: ``(now_ms, execution_id)``."""
FINALIZE = (
    "UPDATE executions SET status = ?, output = ?, error_type = ?, error = ?, "
    "updated_at = ?, finalized_at = ? WHERE execution_id = ? AND status = 'running'"
)
"""Set the status of a ``running`` execution: ``finalize_params(...)``."""
ABORT = (
    "UPDATE executions SET generation = generation + 1, updated_at = ? "
    "WHERE execution_id = ? AND generation = ?"
)
"""Start the next generation unless another call did: ``(now_ms, execution_id, gen)``."""
GENERATION = "SELECT generation FROM executions WHERE execution_id = ?"
ADD_KEY_VERIFIER = (
    "INSERT INTO keys (key_id, verifier, created_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key_id) DO NOTHING"
)
"""Record a key's check value unless one is: ``(key_id, verifier, now_ms)``."""


@functools.lru_cache(maxsize=256)
def pg_placeholders(sql: str) -> str:
    """``sql`` with psycopg's ``%s`` placeholders (each text rewritten once: the shared
    reads pass theirs on every call)."""
    return sql.replace("?", "%s")


def finalize_params(
    execution_id: str,
    status: ExecutionStatus,
    now_ms: int,
    output: bytes | None,
    error_type: str | None,
    error: bytes | None,
) -> tuple[Any, ...]:
    """``FINALIZE``'s parameters; ``finalized_at`` is set for a terminal status only."""
    finalized_at = now_ms if status.is_terminal else None
    return (status.value, output, error_type, error, now_ms, finalized_at, execution_id)


def reopened(execution_id: str, row: Sequence[Any] | None) -> ExecutionRecord:
    """The execution row read after ``REOPEN``, as a record.

    Raises:
        ExecutionCanceled: the execution was canceled (INV-16').
        UnknownExecution: no such execution.
    """
    if row is None:
        raise UnknownExecution(execution_id)
    record = execution_from_row(row)
    if record.status is ExecutionStatus.CANCELED:
        raise ExecutionCanceled(execution_id)
    return record

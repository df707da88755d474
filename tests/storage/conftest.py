"""Fixtures for the storage tests: one ``storage`` per backend, opened and closed.

The ``postgres`` backend runs when ``UNBROKEN_TEST_POSTGRES_URL`` names a database the
tests may create schemas in; each test gets a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from unbroken.storage.base import Storage
from unbroken.storage.memory import MemoryStorage
from unbroken.storage.schema import APPLICATION_ID, MIGRATIONS
from unbroken.storage.sqlite import SqliteStorage

if TYPE_CHECKING:
    from unbroken.storage.postgres import PostgresStorage

POSTGRES_URL = os.environ.get("UNBROKEN_TEST_POSTGRES_URL", "")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="UNBROKEN_TEST_POSTGRES_URL is not set"
)


def admin_execute(query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on the test database outside any storage; return its rows."""
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def schema_url(schema: str) -> str:
    """The test database's URL with ``schema`` as the connection's current schema."""
    separator = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A new, empty schema (its name), dropped with everything in it afterwards."""
    name = f"t_{secrets.token_hex(6)}"
    admin_execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        admin_execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """The name of a fresh schema in the test database (skips without one)."""
    if not POSTGRES_URL:
        pytest.skip("UNBROKEN_TEST_POSTGRES_URL is not set")
    with fresh_schema() as name:
        yield name


def signer(execution_id: str, count: int) -> bytes:
    """A stand-in for a high-water-mark signer: readable, and distinct per count."""
    return f"{execution_id}:{count}".encode()


@pytest.fixture
def url(postgres_schema: str) -> str:
    """The URL of a fresh, empty schema."""
    return schema_url(postgres_schema)


@contextmanager
def open_storage(url: str) -> Iterator[PostgresStorage]:
    """A PostgreSQL storage opened on ``url``, closed afterwards."""
    from unbroken.storage.postgres import PostgresStorage

    store = PostgresStorage(url)
    store.open()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def opened(url: str) -> Iterator[PostgresStorage]:
    """An open PostgreSQL storage on a fresh schema."""
    with open_storage(url) as store:
        yield store


def make_storage(backend: str, tmp_path: Path, schema: str = "") -> Storage:
    """An unopened storage of the named backend (SQLite in ``tmp_path``, PostgreSQL in
    ``schema``)."""
    if backend == "memory":
        return MemoryStorage()
    if backend == "sqlite":
        return SqliteStorage(tmp_path / "journal.db")
    if backend == "postgres":
        from unbroken.storage.postgres import PostgresStorage

        return PostgresStorage(schema_url(schema))
    raise ValueError(backend)


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """An open storage of each backend; closed after the test."""
    schema = request.getfixturevalue("postgres_schema") if request.param == "postgres" else ""
    store = make_storage(request.param, tmp_path, schema)
    store.open()
    try:
        yield store
    finally:
        store.close()


@contextmanager
def sqlite_at_version(db: Path, version: int) -> Iterator[sqlite3.Connection]:
    """A SQLite file made with the DDL of schema ``version`` and stamped as ours, holding
    one ``running`` execution ``'old'``; what the block adds is committed at its end."""
    with closing(sqlite3.connect(db)) as conn:
        for migration in MIGRATIONS[:version]:
            for sql in migration:
                conn.execute(sql)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.execute(
            "INSERT INTO executions (execution_id, workflow, status, created_at, updated_at) "
            "VALUES ('old', 'wf', 'running', 1, 1)"
        )
        yield conn
        conn.commit()

"""Fixtures for the storage tests: one ``storage`` per backend, opened and closed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unbroken.storage.base import Storage
from unbroken.storage.memory import MemoryStorage
from unbroken.storage.sqlite import SqliteStorage


def make_storage(backend: str, tmp_path: Path) -> Storage:
    """An unopened storage of the named backend (SQLite in ``tmp_path``)."""
    if backend == "memory":
        return MemoryStorage()
    if backend == "sqlite":
        return SqliteStorage(tmp_path / "journal.db")
    raise ValueError(backend)


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """An open storage of each backend; closed after the test."""
    store = make_storage(request.param, tmp_path)
    store.open()
    try:
        yield store
    finally:
        store.close()

"""Shared fixtures: engines on every backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unbroken import Engine
from unbroken.storage.memory import MemoryStorage

EngineFactory = Callable[..., Engine]


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_engine(backend: str, tmp_path: Path) -> Iterator[EngineFactory]:
    """Build engines that share one database for the test (a restart = a new engine)."""
    shared = MemoryStorage()

    def factory(**settings: Any) -> Engine:
        if backend == "memory":
            return Engine(storage=shared, **settings)
        return Engine(f"sqlite:///{tmp_path / 'unbroken.db'}", **settings)

    yield factory

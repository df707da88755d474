"""Shared fixtures: engines on every backend.

The ``postgres`` backend runs when ``UNBROKEN_TEST_POSTGRES_URL`` is set; each test gets
its own schema (dropped afterwards) and a payload key, as PostgreSQL requires one (INV-8).
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unbroken import Engine
from unbroken.storage.memory import MemoryStorage

EngineFactory = Callable[..., Engine]

POSTGRES_URL = os.environ.get("UNBROKEN_TEST_POSTGRES_URL", "")


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param(
            "postgres",
            marks=pytest.mark.skipif(not POSTGRES_URL, reason="UNBROKEN_TEST_POSTGRES_URL unset"),
        ),
    ]
)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_engine(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EngineFactory]:
    """Build engines that share one database for the test (a restart = a new engine)."""
    if backend == "postgres":
        from .storage.conftest import fresh_schema, schema_url

        monkeypatch.setenv("UNBROKEN_KEY", base64.b64encode(os.urandom(32)).decode())
        with fresh_schema() as schema:
            url = schema_url(schema)
            yield lambda **settings: Engine(url, **settings)
        return
    shared = MemoryStorage()

    def factory(**settings: Any) -> Engine:
        if backend == "memory":
            return Engine(storage=shared, **settings)
        return Engine(f"sqlite:///{tmp_path / 'unbroken.db'}", **settings)

    yield factory


@pytest.fixture
def public_bindings_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """``cut()``: from then on PyNaCl's private cffi module fails to import, so that what is
    built afterwards uses PyNaCl's public AEAD bindings; it returns the (growing) list of
    the bindings called, ``"encrypt"`` or ``"decrypt"``."""
    from nacl import bindings

    from unbroken import cipher

    calls: list[str] = []

    def spy(what: str) -> None:
        name = f"crypto_aead_xchacha20poly1305_ietf_{what}"
        real = getattr(bindings, name)

        def called(*args: Any) -> Any:
            calls.append(what)
            return real(*args)

        monkeypatch.setattr(bindings, name, called)

    def cut() -> list[str]:
        spy("encrypt")
        spy("decrypt")
        monkeypatch.setitem(sys.modules, "nacl._sodium", None)  # importing it fails
        cipher.libsodium.cache_clear()  # loaded once per process: load it again
        return calls

    try:
        yield cut
    finally:
        monkeypatch.undo()
        cipher.libsodium.cache_clear()  # what is built after the test loads it again

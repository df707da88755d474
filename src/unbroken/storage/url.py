"""Storage URLs: pick a backend from one string, and print URLs safely (layer: storage).

Supported:

- ``sqlite:///relative/path.db`` (three slashes: relative to the current directory, which
  is resolved when the URL is parsed) and ``sqlite:////abs/path.db`` (four: absolute);
- ``postgresql://user:password@host:5432/dbname`` (or ``postgres://``): any libpq URL; the
  tables go in the connection's current schema, which ``options=-csearch_path%3Dname``
  in the query chooses. Needs the ``postgres`` extra (psycopg), imported only here;
- ``memory://`` (in-process, for tests).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from ..errors import ConfigurationError
from .base import Storage
from .memory import MemoryStorage
from .sqlite import SqliteStorage

__all__ = ["open_storage", "redact_url"]

_SUPPORTED = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "postgresql://user@host/dbname, memory://"
)
_AUTHORITY = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#]*)")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&#]*")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: safe for logs and error messages.

    Both the ``user:password@`` form and a ``password=`` query parameter are redacted.

    Args:
        url: A storage URL.

    Returns:
        The URL, unchanged apart from the password.
    """

    def authority(match: re.Match[str]) -> str:
        userinfo, at, hostport = match["authority"].rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.partition(":")[0]
            return f"{match['scheme']}{user}:***@{hostport}"
        return match[0]

    return _QUERY_PASSWORD.sub(r"\1***", _AUTHORITY.sub(authority, url, count=1))


def open_storage(url: str, *, synchronous: str = "NORMAL", create: bool = True) -> Storage:
    """The storage a URL names, not yet opened.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db``,
            ``postgresql://user:password@host/dbname`` or ``memory://``.
        synchronous: SQLite durability: ``NORMAL`` (survives a process crash) or ``FULL``
            (survives power loss); case-insensitive.
        create: Whether opening may create a missing SQLite file or the tables in an
            empty PostgreSQL schema.

    Returns:
        An unopened ``Storage``; call ``open()`` before use.

    Raises:
        ConfigurationError: an unsupported or malformed URL, a bad ``synchronous``, or a
            PostgreSQL URL without psycopg installed.
    """
    level = _synchronous(synchronous)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigurationError(
            f"storage URL {redact_url(url)!r} has no scheme; supported: {_SUPPORTED}"
        )
    if scheme == "sqlite":
        return SqliteStorage(_sqlite_path(rest), synchronous=level, create=create)
    if scheme == "memory":
        if rest:
            raise ConfigurationError(
                f"a memory URL takes nothing after 'memory://': {redact_url(url)!r}"
            )
        return MemoryStorage()
    if scheme in ("postgresql", "postgres"):
        return _postgres(f"{scheme}://{rest}", create=create)
    raise ConfigurationError(f"unsupported storage URL scheme {scheme!r}; supported: {_SUPPORTED}")


def _postgres(url: str, *, create: bool) -> Storage:
    """A ``PostgresStorage``; psycopg is imported here, never by ``import unbroken``."""
    try:
        from .postgres import PostgresStorage
    except ImportError as exc:
        raise ConfigurationError(
            f"the PostgreSQL backend needs psycopg ({exc.name} is missing): "
            "pip install 'unbroken[postgres]'"
        ) from None
    return PostgresStorage(url, create=create)


def _synchronous(value: str) -> Literal["NORMAL", "FULL"]:
    """``NORMAL`` or ``FULL`` from a case-insensitive setting."""
    level = value.upper()
    if level == "NORMAL":
        return "NORMAL"
    if level == "FULL":
        return "FULL"
    raise ConfigurationError(f"synchronous must be NORMAL or FULL, not {value!r}")


def _sqlite_path(rest: str) -> Path:
    """The database path from what follows ``sqlite://``; relative paths join the cwd."""
    if not rest.startswith("/"):
        raise ConfigurationError(
            "a sqlite URL has no host: use sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    path = Path(rest[1:])
    if not rest[1:]:
        raise ConfigurationError("a sqlite URL needs a file path, e.g. sqlite:///unbroken.db")
    return path if path.is_absolute() else Path.cwd() / path

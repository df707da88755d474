"""Storage URLs: pick a backend from one string, and print URLs safely (layer: storage).

Supported:

- ``sqlite:///relative/path.db`` (three slashes: relative to the current directory, which
  is resolved when the URL is parsed) and ``sqlite:////abs/path.db`` (four: absolute);
- ``memory://`` (in-process, for tests).

``postgresql://`` and ``postgres://`` are recognised but refused: the PostgreSQL backend is
not part of this version.
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

_SUPPORTED = "sqlite:///relative/path.db, sqlite:////absolute/path.db, memory://"
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
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``memory://``.
        synchronous: SQLite durability: ``NORMAL`` (survives a process crash) or ``FULL``
            (survives power loss); case-insensitive.
        create: Whether opening may create a missing SQLite file.

    Returns:
        An unopened ``Storage``; call ``open()`` before use.

    Raises:
        ConfigurationError: an unsupported or malformed URL, or a bad ``synchronous``.
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
        raise ConfigurationError(
            f"the PostgreSQL backend is not available in this version of unbroken "
            f"({redact_url(url)}); supported: {_SUPPORTED}"
        )
    raise ConfigurationError(f"unsupported storage URL scheme {scheme!r}; supported: {_SUPPORTED}")


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

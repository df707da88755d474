"""Payload keys from the environment, a key file or the process (layer: engine).

Precedence (SPEC §5): ``UNBROKEN_KEY`` (plus ``UNBROKEN_KEY_PREVIOUS`` during a rotation),
else a key file named by ``UNBROKEN_KEY_FILE`` or the configuration, else on local SQLite
the file ``<database file>.key`` beside the database, which the engine may create on first
open. ``memory://`` storage uses one random key per process.

A key is written ``BASE64`` (key id 0) or ``ID:BASE64`` (id 0..255), base64 of 32 bytes in
the standard alphabet. A key file holds the current key on its first line and, during a
rotation window, the previous key on the second.

Key material never reaches a log record, a ``repr`` or an error message: errors name the
source (variable, file and line) and the problem, never the text that was read.
"""

from __future__ import annotations

import binascii
import errno
import logging
import os
import secrets
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from unbroken.cipher import KEY_BYTES, Key
from unbroken.errors import ConfigurationError

__all__ = [
    "KeyRing",
    "format_key",
    "load_keys",
    "parse_key",
    "process_key",
    "read_key_file",
    "rotated",
    "without_previous",
    "write_key_file",
]

log = logging.getLogger("unbroken")

MAX_KEY_FILE_BYTES = 4096
"""Two keys take under 100 bytes; anything much larger is not a key file."""

_ROTATE_HINT = (
    "a previous key is still configured; drop it first (unbroken rotate-key --drop-previous)"
)


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys an engine seals and opens payloads with.

    Attributes:
        current: seals every new payload.
        previous: still opens payloads sealed before a rotation; ``None`` outside one.
        source: where the keys came from, for messages (never key material).
    """

    current: Key
    previous: Key | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.previous is not None and self.previous.key_id == self.current.key_id:
            where = f" from {self.source}" if self.source else ""
            raise ConfigurationError(
                f"the current and previous keys{where} both have key id "
                f"{self.current.key_id}; each key needs its own id"
            )


def parse_key(text: str, *, what: str) -> Key:
    """Read one key written ``BASE64`` (key id 0) or ``ID:BASE64``.

    Args:
        text: the key; surrounding whitespace is ignored.
        what: names the source in errors, e.g. ``"UNBROKEN_KEY"``.

    Raises:
        ConfigurationError: the text is not a key; the message names the problem, never
            the text.
    """
    text = text.strip()
    if not text:
        raise _not_a_key(what, "it is empty")
    key_id = 0
    encoded = text
    if ":" in text:  # ':' is outside the base64 alphabet, so the split is unambiguous
        id_text, encoded = text.split(":", 1)
        key_id = _parse_key_id(id_text, what)
    try:
        secret = binascii.a2b_base64(encoded, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise _not_a_key(what, "not base64 (standard alphabet, with padding)") from None
    if len(secret) != KEY_BYTES:
        raise _not_a_key(what, f"decodes to {len(secret)} bytes, expected {KEY_BYTES}")
    return Key(key_id, secret)


def _parse_key_id(id_text: str, what: str) -> int:
    if not (id_text.isascii() and id_text.isdigit()):
        raise _not_a_key(what, "the key id before ':' is not a decimal number")
    if len(id_text) > 3 or int(id_text) > 255:
        raise _not_a_key(what, "key id out of range (0..255)")
    return int(id_text)


def _not_a_key(what: str, reason: str) -> ConfigurationError:
    return ConfigurationError(f"{what} is not a valid key: {reason}")


def format_key(key: Key) -> str:
    """Write a key as ``ID:BASE64``, the id always included."""
    return f"{key.key_id}:{binascii.b2a_base64(key.secret, newline=False).decode('ascii')}"


def read_key_file(path: Path) -> KeyRing:
    """Read a key file: the current key, then optionally the previous key.

    Raises:
        ConfigurationError: the file cannot be read, is not a regular file, is accessible
            by other users, is empty, holds more than two keys or a malformed line.
    """
    data = _read_private_file(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(f"key file {path} is not ASCII text") from None
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not numbered:
        raise ConfigurationError(f"key file {path} is empty: it holds no key")
    if len(numbered) > 2:
        raise ConfigurationError(
            f"key file {path} holds {len(numbered)} keys; it holds at most two "
            "(the current key, then the previous key)"
        )
    keys = [parse_key(line, what=f"key file {path} line {n}") for n, line in numbered]
    return KeyRing(keys[0], keys[1] if len(keys) > 1 else None, source=f"key file {path}")


def _read_private_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {path}: {_reason(exc)}") from None
    try:
        # Checked on the open descriptor, so the file read is the file checked.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise ConfigurationError(
                f"key file {path} is {_exposure(mode)} by other users (mode {mode:04o}); "
                "chmod 600 it"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_KEY_FILE_BYTES:
                raise ConfigurationError(
                    f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes; "
                    "it is not a key file"
                )
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigurationError(f"cannot read key file {path}: {_reason(exc)}") from None
    finally:
        os.close(fd)


def _exposure(mode: int) -> str:
    readable, writable = bool(mode & 0o044), bool(mode & 0o022)
    if readable and writable:
        return "readable and writable"
    if readable:
        return "readable"
    return "writable" if writable else "accessible"


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory"
    return exc.strerror or type(exc).__name__


def write_key_file(path: Path, ring: KeyRing, *, exclusive: bool = False) -> None:
    """Write a key file (mode 0600) holding the ring's current and previous keys.

    The file appears whole or not at all: the keys go to a private temporary file beside
    it, which is synced, then linked (``exclusive``) or renamed over ``path``, and the
    directory is synced.

    Args:
        path: the key file.
        ring: the keys to write.
        exclusive: create the file only if ``path`` does not exist yet.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists (the caller handles the race).
        OSError: the file could not be written.
    """
    content = format_key(ring.current) + "\n"
    if ring.previous is not None:
        content += format_key(ring.previous) + "\n"
    # A random suffix too: two threads of one process may write the same file.
    temp = Path(f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    _write_new_file(temp, content.encode("ascii"))
    try:
        if not exclusive:
            os.replace(temp, path)
        else:
            try:
                # link() fails if path exists, and never shows a half-written key file to
                # a process that lost the race to create it.
                os.link(temp, path)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                # No hard links on this file system: O_EXCL on the file itself.
                _write_new_file(path, content.encode("ascii"))
    finally:
        temp.unlink(missing_ok=True)  # gone already after a rename
    _fsync_directory(path.parent)


def _write_new_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # the file system cannot sync directories
            raise
    finally:
        os.close(fd)


def load_keys(
    *,
    environ: Mapping[str, str],
    key_file: Path | None,
    local_db: Path | None,
    may_create: bool,
) -> KeyRing | None:
    """Find the engine's keys, in precedence order.

    Args:
        environ: the environment (``UNBROKEN_KEY``, ``UNBROKEN_KEY_PREVIOUS``).
        key_file: a key file named by ``UNBROKEN_KEY_FILE`` or the configuration.
        local_db: the local SQLite database file, whose default key file is
            ``<local_db>.key``.
        may_create: create the default key file if it is missing (only when the database
            holds no sealed row).

    Returns:
        The keys, or ``None`` when there are none and none may be created.

    Raises:
        ConfigurationError: a malformed key, or a key file that cannot be used or created.
    """
    if "UNBROKEN_KEY" in environ:
        current = parse_key(environ["UNBROKEN_KEY"], what="UNBROKEN_KEY")
        previous = None
        if "UNBROKEN_KEY_PREVIOUS" in environ:
            previous = parse_key(environ["UNBROKEN_KEY_PREVIOUS"], what="UNBROKEN_KEY_PREVIOUS")
        return KeyRing(current, previous, source="UNBROKEN_KEY")
    if "UNBROKEN_KEY_PREVIOUS" in environ:
        raise ConfigurationError("UNBROKEN_KEY_PREVIOUS is set but UNBROKEN_KEY is not")
    if key_file is not None:
        return read_key_file(key_file)
    if local_db is None:
        return None
    default = Path(f"{local_db}.key")
    if os.path.lexists(default):
        return read_key_file(default)
    if not may_create:
        return None
    return _create_default(default)


def _create_default(path: Path) -> KeyRing:
    ring = KeyRing(Key.generate(0), source=f"key file {path}")
    try:
        write_key_file(path, ring, exclusive=True)
    except FileExistsError:  # another engine created it first: use that one
        return read_key_file(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot create key file {path}: {_reason(exc)}") from None
    log.info(
        "created a new key file at %s; keep it safe: without it the journal cannot be read",
        path,
    )
    return ring


_process_lock = threading.Lock()
_process_ring: KeyRing | None = None


def process_key() -> KeyRing:
    """The random key of this process, for ``memory://`` storage (created once)."""
    global _process_ring
    with _process_lock:
        if _process_ring is None:
            _process_ring = KeyRing(Key.generate(0), source="process key")
        return _process_ring


def rotated(ring: KeyRing) -> KeyRing:
    """Start a rotation: a fresh current key under the next id, the old one as previous.

    Raises:
        ConfigurationError: the ring still holds a previous key.
    """
    if ring.previous is not None:
        raise ConfigurationError(_ROTATE_HINT)
    new_id = (ring.current.key_id + 1) % 256
    return KeyRing(Key.generate(new_id), ring.current, source=ring.source)


def without_previous(ring: KeyRing) -> KeyRing:
    """End a rotation: the same current key, no previous key."""
    return KeyRing(ring.current, None, source=ring.source)

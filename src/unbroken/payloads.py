"""Payloads at rest: encode, then seal, with bound associated data and limits (layer: engine).

Serialisation (``codec``) and encryption (``cipher``) are two separate byte stages. Every
sealed blob's associated data names where it belongs (execution, generation, step, kind,
idempotency key), so a blob copied to another row fails to open (``ReplayIntegrity``).
Execution-level payloads (inputs, output, error) use step id ``OUTSIDE_STEPS``.

Which keys an engine uses is decided once, at open (``open_payloads``):

- ``memory://``: a random key per process;
- local SQLite: ``UNBROKEN_KEY``, else ``UNBROKEN_KEY_FILE`` / ``key_file``, else
  ``<database>.key``, created on first open only while the database holds no execution;
- any other backend: a key is required (``EncryptionRequired``, INV-8);
- ``encrypt_payloads = false`` is honoured on local SQLite and ``memory://`` only, with a
  WARN at every open, and never for a database that already holds sealed data.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import codec
from .cipher import SEAL_OVERHEAD, XChaChaCipher, aad, control_fields
from .config import Config
from .errors import (
    ConfigurationError,
    ControlIntegrity,
    EncryptionRequired,
    IntegrityViolation,
    PayloadTooLarge,
)
from .journal import JournalEntry
from .keys import KeyRing, load_keys, process_key
from .storage import Signer, Storage
from .storage.memory import MemoryStorage
from .storage.sqlite import SqliteStorage

__all__ = ["OUTSIDE_STEPS", "READ_SLACK_BYTES", "Payloads", "key_file_path", "open_payloads"]

log = logging.getLogger("unbroken")

OUTSIDE_STEPS = 0xFFFFFFFF
"""The step id in the associated data of execution-level payloads."""

READ_SLACK_BYTES = 128
"""Read-side allowance over ``max_payload_bytes`` and the seal overhead (INV-11)."""


class Payloads:
    """Encodes and seals values for storage, and opens and decodes them back."""

    __slots__ = ("_cipher", "_limit", "_read_ceiling")

    def __init__(self, cipher: XChaChaCipher | None, limit: int) -> None:
        self._cipher = cipher
        self._limit = limit
        overhead = SEAL_OVERHEAD if cipher is not None else 0
        self._read_ceiling = limit + overhead + READ_SLACK_BYTES

    @property
    def cipher(self) -> XChaChaCipher | None:
        """The cipher, or ``None`` when encryption is off."""
        return self._cipher

    def seal(
        self,
        value: Any,
        what: str,
        *,
        execution_id: str,
        generation: int = 0,
        step_id: int = OUTSIDE_STEPS,
        kind: str,
        idem_key: bytes = b"",
    ) -> bytes:
        """Encode ``value`` (``PayloadTooLarge`` past the limit), then seal it."""
        data = codec.encode(value, what=what)
        if len(data) > self._limit:
            raise PayloadTooLarge(len(data), self._limit, what)
        if self._cipher is None:
            return data
        return self._cipher.seal(data, aad(execution_id, generation, step_id, kind, idem_key))

    def open(
        self,
        blob: bytes | None,
        what: str,
        *,
        execution_id: str,
        generation: int = 0,
        step_id: int = OUTSIDE_STEPS,
        kind: str,
        idem_key: bytes = b"",
    ) -> Any:
        """Open and decode a stored blob; an oversize one is refused unread (INV-11)."""
        if blob is None:
            return None
        if len(blob) > self._read_ceiling:
            raise PayloadTooLarge(len(blob), self._read_ceiling, f"stored {what}")
        if self._cipher is not None:
            blob = self._cipher.open(blob, aad(execution_id, generation, step_id, kind, idem_key))
        return codec.decode(blob)

    def reveal(self, blob: bytes | None, **where: Any) -> str | None:
        """The stored JSON text of a blob (operator ``--reveal`` only)."""
        if blob is None:
            return None
        if self._cipher is not None:
            blob = self._cipher.open(blob, aad(**where))
        return blob.decode("utf-8", errors="replace")

    def open_entry(self, entry: JournalEntry) -> Any:
        """The value of a journal row, opened under the row's own coordinates."""
        return self.open(
            entry.payload,
            f"{entry.kind.value} of step {entry.step_id}",
            execution_id=entry.execution_id,
            generation=entry.generation,
            step_id=entry.step_id,
            kind=entry.kind.value,
            idem_key=entry.idem_key,
        )

    def entry_mac(self, entry: JournalEntry) -> bytes | None:
        """The MAC a control entry (an intent) carries, or ``None`` without a key."""
        if self._cipher is None:
            return None
        return self._cipher.control_mac(_fields(entry))

    def check_entry_mac(self, entry: JournalEntry) -> None:
        """Authenticate a control entry before acting on it.

        Raises:
            ControlIntegrity: missing, altered or unexpected MAC.
        """
        if self._cipher is None:
            if entry.hmac is not None:
                raise ControlIntegrity(
                    f"control entry of step {entry.step_id} carries a MAC but no key is "
                    "configured"
                )
            return
        self._cipher.verify_control_mac(entry.hmac, _fields(entry))

    @property
    def signer(self) -> Signer | None:
        """Signs high-water marks, or ``None`` without a key."""
        cipher = self._cipher
        if cipher is None:
            return None

        def sign(execution_id: str, count: int) -> bytes:
            return cipher.hwm_mac(execution_id, count)

        return sign

    def verify_high_water_mark(
        self, execution_id: str, stored: tuple[int, bytes] | None, outcomes: int
    ) -> None:
        """Check the signed count of committed outcomes against the journal (ref §4.7).

        Raises:
            IntegrityViolation: rows were deleted, duplicated or forged, or the mark is.
        """
        if self._cipher is None:
            return
        if stored is None:
            if outcomes:
                raise IntegrityViolation(
                    execution_id, f"{outcomes} committed outcomes but no signed high-water mark"
                )
            return
        count, mac = stored
        if not self._cipher.verify_hwm_mac(execution_id, count, mac):
            raise IntegrityViolation(execution_id, "the high-water mark's signature is invalid")
        if count != outcomes:
            raise IntegrityViolation(
                execution_id,
                f"the journal holds {outcomes} committed outcomes where the signed "
                f"high-water mark says {count} (rows deleted, duplicated or forged)",
            )


def _fields(entry: JournalEntry) -> bytes:
    return control_fields(
        entry.execution_id,
        entry.generation,
        entry.step_id,
        entry.kind.value,
        entry.name,
        entry.effect,
        entry.idem_key,
    )


def open_payloads(
    storage: Storage,
    config: Config,
    environ: Mapping[str, str] | None = None,
    *,
    read_only: bool = False,
) -> Payloads:
    """Decide the engine's keys and check them against the database. Blocking.

    ``read_only`` (operator tools) never creates a key file or records a key.

    Raises:
        EncryptionRequired: no key where one is needed.
        ConfigurationError: a key that does not match the database, or a mode change.
    """
    env = os.environ if environ is None else environ
    local = isinstance(storage, SqliteStorage | MemoryStorage)
    verifiers = storage.key_verifiers()
    if not config.encrypt_payloads:
        if not local:
            raise EncryptionRequired(
                f"payload encryption is required on {storage.display_url} and cannot be off"
            )
        if verifiers:
            raise ConfigurationError(
                "encrypt_payloads is false but this database holds encrypted data"
            )
        log.warning(
            "payload encryption is OFF for %s: journal payloads are stored in the clear",
            storage.display_url,
        )
        return Payloads(None, config.max_payload_bytes)
    if not verifiers and storage.has_executions():
        raise ConfigurationError(
            f"{storage.display_url} was written without encryption; open it with "
            "encrypt_payloads = false"
        )
    ring = _key_ring(storage, config, env, may_create=not read_only)
    cipher = XChaChaCipher(ring.current, ring.previous)
    _check_keys(storage, cipher, ring, verifiers)
    if not read_only and ring.current.key_id not in verifiers:
        now_ms = time.time_ns() // 1_000_000
        storage.add_key_verifier(ring.current.key_id, cipher.verifier(ring.current), now_ms)
    return Payloads(cipher, config.max_payload_bytes)


def key_file_path(storage: Storage, config: Config, environ: Mapping[str, str]) -> Path | None:
    """The key file an engine on ``storage`` reads, when its keys come from a file."""
    if environ.get("UNBROKEN_KEY"):
        return None
    named = config.key_file or environ.get("UNBROKEN_KEY_FILE")
    if named:
        return Path(named)
    if isinstance(storage, SqliteStorage):
        return Path(str(storage.path) + ".key")
    return None


def _key_ring(
    storage: Storage, config: Config, env: Mapping[str, str], *, may_create: bool
) -> KeyRing:
    if isinstance(storage, MemoryStorage):
        return process_key()
    key_file = config.key_file or env.get("UNBROKEN_KEY_FILE") or None
    local_db = storage.path if isinstance(storage, SqliteStorage) else None
    has_data = storage.has_executions()
    ring = load_keys(
        environ=env,
        key_file=Path(key_file) if key_file else None,
        local_db=local_db,
        may_create=may_create and not has_data,
    )
    if ring is None:
        orphan = " (it holds encrypted data: a new key would orphan it)" if has_data else ""
        raise EncryptionRequired(
            f"no key for {storage.display_url}: set UNBROKEN_KEY or UNBROKEN_KEY_FILE{orphan}"
        )
    return ring


def _check_keys(
    storage: Storage, cipher: XChaChaCipher, ring: KeyRing, verifiers: dict[int, bytes]
) -> None:
    for key in (ring.current, ring.previous):
        if key is None:
            continue
        known = verifiers.get(key.key_id)
        if known is not None and known != cipher.verifier(key):
            raise ConfigurationError(
                f"the key with id {key.key_id} from {ring.source} (fingerprint "
                f"{key.fingerprint()}) does not match {storage.display_url}"
            )
    for key_id in verifiers:
        if cipher.key_for(key_id) is None and storage.count_sealed(key_id) > 0:
            raise EncryptionRequired(
                f"{storage.display_url} holds data sealed under key id {key_id}, which "
                f"{ring.source} does not provide"
            )

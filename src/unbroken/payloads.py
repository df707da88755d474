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

Sealing is on every step's path, so ``Payloads`` (``_Sealer``) seals and opens with the
current key through the cipher's one-call functions (``XChaChaCipher.sealing``,
``.opening``), with the associated data's head cached per execution and nonces taken from a
buffer of ``os.urandom`` bytes (each nonce handed out once; a forked child discards the
buffer). What they cannot open goes through ``XChaChaCipher.open``, which says why. Replay
opens its rows into one reused buffer through the cipher's libsodium (``Payloads.opener``).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import codec
from .cipher import (
    AAD_VERSION,
    NONCE_BYTES,
    SEAL_OVERHEAD,
    TAG_BYTES,
    XChaChaCipher,
    aad,
    control_fields,
    libsodium,
)
from .config import Config
from .errors import (
    ConfigurationError,
    ControlIntegrity,
    EncodeError,
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

_NONCES_PER_FILL = 512
_SCRATCH_BYTES = 4096
"""Plaintexts up to this size are opened into an opener's one reused buffer."""
_GEN_STEP = struct.Struct("<II")
_U32 = struct.Struct("<I")


class _Nonces:
    """Random nonces cut from a buffer of ``os.urandom`` bytes, each handed out once.

    One ``getrandom`` call per 512 nonces instead of one per seal (it also releases the
    GIL, a hand-over on every step when another thread wants it). The nonces wait in a
    list: ``list.pop`` is atomic, so no two callers get the same one and taking one needs
    no lock; refilling does. A forked child must never reuse its parent's nonces:
    ``os.register_at_fork`` empties the list there.
    """

    __slots__ = ("_lock", "_pool")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: list[bytes] = []

    def take(self) -> bytes:
        try:
            return self._pool.pop()
        except IndexError:
            return self._refill()

    def _refill(self) -> bytes:
        with self._lock:
            if not self._pool:
                data = os.urandom(NONCE_BYTES * _NONCES_PER_FILL)
                self._pool = [
                    data[i : i + NONCE_BYTES] for i in range(0, len(data), NONCE_BYTES)
                ]
        return self.take()

    def discard(self) -> None:
        """Forget the pool (in a forked child: the parent holds the same nonces)."""
        self._lock = threading.Lock()  # the parent may have held it at the fork
        self._pool = []


_NONCES = _Nonces()
os.register_at_fork(after_in_child=_NONCES.discard)


class _Sealer:
    """Seals and opens with the current key, with ``cipher``'s associated data cached."""

    __slots__ = ("_heads", "_kinds", "open", "seal")

    def __init__(self, cipher: XChaChaCipher) -> None:
        # seal(plaintext, aad) -> key_id ‖ nonce ‖ ciphertext ‖ tag, under the current key;
        # open(blob, aad) -> the plaintext, or None (another key, too short, or not
        # authentic: the cipher then says which, and raises).
        self.seal = cipher.sealing(_NONCES.take)
        self.open = cipher.opening()
        self._heads: dict[str, bytes] = {}
        self._kinds: dict[str, bytes] = {}

    def aad(
        self, execution_id: str, generation: int, step_id: int, kind: str, idem_key: bytes
    ) -> bytes:
        """``cipher.aad`` with the execution's part cached (same bytes; same errors)."""
        head = self._heads.get(execution_id)
        label = self._kinds.get(kind)
        if (
            head is None
            or label is None
            or not 0 <= generation <= 0xFFFFFFFF
            or not 0 <= step_id <= 0xFFFFFFFF
            or len(idem_key) > 255
        ):
            found = aad(execution_id, generation, step_id, kind, idem_key)  # checks, raises
            self._remember(execution_id, kind)
            return found
        key_len = bytes((len(idem_key),))
        return b"".join((head, _GEN_STEP.pack(generation, step_id), label, key_len, idem_key))

    def control_fields(self, entry: JournalEntry) -> bytes:
        """``cipher.control_fields`` of an entry, with the execution's part cached."""
        head = self._heads.get(entry.execution_id)
        kind = entry.kind.value
        label = self._kinds.get(kind)
        name = entry.name.encode("utf-8")
        effect = entry.effect.encode("ascii")
        key = entry.idem_key
        if (
            head is None
            or label is None
            or not 0 <= entry.generation <= 0xFFFFFFFF
            or not 0 <= entry.step_id <= 0xFFFFFFFF
            or len(name) > 0xFFFFFFFF
            or len(effect) > 255
            or len(key) > 255
        ):
            self._remember(entry.execution_id, kind)
            return _fields(entry)  # checks, raises
        return b"".join((
            head, _GEN_STEP.pack(entry.generation, entry.step_id), label,
            _U32.pack(len(name)), name, bytes((len(effect),)), effect, bytes((len(key),)), key,
        ))

    def _remember(self, execution_id: str, kind: str) -> None:
        if len(self._heads) >= 4096:
            self._heads.clear()  # a bound, not a cache policy: heads are cheap to redo
        e = execution_id.encode("utf-8")
        self._heads[execution_id] = bytes((AAD_VERSION,)) + _U32.pack(len(e)) + e
        label = kind.encode("ascii")
        self._kinds[kind] = bytes((len(label),)) + label


class Payloads:
    """Encodes and seals values for storage, and opens and decodes them back."""

    __slots__ = ("_cipher", "_limit", "_read_ceiling", "_sealer")

    def __init__(self, cipher: XChaChaCipher | None, limit: int) -> None:
        self._cipher = cipher
        self._limit = limit
        overhead = SEAL_OVERHEAD if cipher is not None else 0
        self._read_ceiling = limit + overhead + READ_SLACK_BYTES
        self._sealer = _Sealer(cipher) if cipher is not None else None

    @property
    def cipher(self) -> XChaChaCipher | None:
        """The cipher, or ``None`` when encryption is off."""
        return self._cipher

    def seal(
        self,
        value: Any,
        what: str | Callable[[], str],
        *,
        execution_id: str,
        generation: int = 0,
        step_id: int = OUTSIDE_STEPS,
        kind: str,
        idem_key: bytes = b"",
    ) -> bytes:
        """Encode ``value`` (``PayloadTooLarge`` past the limit), then seal it.

        ``what`` names the value in errors; a callable is only called for an error.

        Raises:
            EncodeError: the codec cannot encode the value.
            PayloadTooLarge: the encoded value is over ``max_payload_bytes`` (INV-11).
        """
        return self.seal_at(value, what, execution_id, generation, step_id, kind, idem_key)

    def seal_at(
        self,
        value: Any,
        what: str | Callable[[], str],
        execution_id: str,
        generation: int,
        step_id: int,
        kind: str,
        idem_key: bytes,
    ) -> bytes:
        """``seal`` with positional arguments (the step path calls it once per step)."""
        try:
            data = codec.encode(value)
        except EncodeError:
            codec.encode(value, what=_named(what))  # raises it again, naming the value
            raise
        if len(data) > self._limit:
            raise PayloadTooLarge(len(data), self._limit, _named(what))
        sealer = self._sealer
        if sealer is None:
            return data
        return sealer.seal(data, sealer.aad(execution_id, generation, step_id, kind, idem_key))

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
        return self.open_at(blob, execution_id, generation, step_id, kind, idem_key, what)

    def open_at(
        self,
        blob: bytes | None,
        execution_id: str,
        generation: int,
        step_id: int,
        kind: str,
        idem_key: bytes,
        what: str | None = None,
    ) -> Any:
        """``open`` with positional arguments (replay calls it once per step); ``what``
        defaults to the kind and step."""
        if blob is None:
            return None
        if len(blob) > self._read_ceiling:
            named = what if what is not None else f"{kind} of step {step_id}"
            raise PayloadTooLarge(len(blob), self._read_ceiling, f"stored {named}")
        sealer = self._sealer
        if sealer is not None and self._cipher is not None:
            where = sealer.aad(execution_id, generation, step_id, kind, idem_key)
            plain = sealer.open(blob, where)
            blob = plain if plain is not None else self._cipher.open(blob, where)
        return codec.decode(blob)

    def opener(
        self, execution_id: str, generation: int, kind: str
    ) -> Callable[[bytes | None, int, bytes], Any]:
        """``open_row(blob, step_id, idem_key)``: ``open_at`` for the rows of one kind of one
        generation, with everything but the step and key bound once (replay opens every
        step through it). A blob it cannot open at once goes through ``open_at``, which
        raises what ``open`` raises."""
        slow = self.open_at
        sealer, cipher = self._sealer, self._cipher
        sodium = libsodium() if cipher is not None else None

        def open_slowly(blob: bytes | None, step_id: int, idem_key: bytes) -> Any:
            return slow(blob, execution_id, generation, step_id, kind, idem_key)

        if sealer is None or cipher is None or sodium is None:
            return open_slowly
        # The associated data around step and key, cut from one ``sealer.aad`` built
        # (and checked) here: ``head ‖ u32 generation ‖ u32 step ‖ label ‖ u8 32 ‖ key``
        # for the 32-byte keys steps have; any other key goes through ``open_at``.
        first = sealer.aad(execution_id, generation, 0, kind, bytes(32))
        tail = 1 + len(kind) + 1 + 32
        before, after = first[: -(4 + tail)], first[-tail:-32]
        pack_step = _U32.pack
        join = b"".join
        if join((before, pack_step(0), after, bytes(32))) != first:
            return open_slowly
        ffi, lib = sodium
        new, buffer, null = ffi.new, ffi.buffer, ffi.NULL
        decrypt = lib.crypto_aead_xchacha20poly1305_ietf_decrypt
        key_id, key = cipher.current.key_id, cipher.current.secret
        low, high = SEAL_OVERHEAD, self._read_ceiling
        decode = codec.decode
        # One plaintext buffer for every small row: ``open_row`` copies the row out before
        # it returns, and an opener serves one replay (one thread) at a time.
        small = new("unsigned char[]", _SCRATCH_BYTES)

        def open_row(blob: bytes | None, step_id: int, idem_key: bytes) -> Any:
            if (
                blob is None
                or not low <= len(blob) <= high
                or blob[0] != key_id
                or len(idem_key) != 32
                or not 0 <= step_id <= 0xFFFFFFFF
            ):
                return open_slowly(blob, step_id, idem_key)
            where = join((before, pack_step(step_id), after, idem_key))
            size = len(blob) - SEAL_OVERHEAD
            out = small if size <= _SCRATCH_BYTES else new("unsigned char[]", size)
            status = decrypt(
                out, null, null, blob[1 + NONCE_BYTES :], size + TAG_BYTES,
                where, len(where), blob[1 : 1 + NONCE_BYTES], key,
            )
            if status != 0:
                return open_slowly(blob, step_id, idem_key)  # it says why, and raises
            return decode(buffer(out, size)[:])

        return open_row

    def reveal(self, blob: bytes | None, **where: Any) -> str | None:
        """The stored JSON text of a blob (operator ``--reveal`` only)."""
        if blob is None:
            return None
        if self._cipher is not None:
            blob = self._cipher.open(blob, aad(**where))
        return blob.decode("utf-8", errors="replace")

    def open_entry(self, entry: JournalEntry) -> Any:
        """The value of a journal row, opened under the row's own coordinates."""
        return self.open_at(
            entry.payload,
            entry.execution_id,
            entry.generation,
            entry.step_id,
            entry.kind.value,
            entry.idem_key,
        )

    def entry_mac(self, entry: JournalEntry) -> bytes | None:
        """The MAC a control entry (an intent) carries, or ``None`` without a key."""
        if self._cipher is None or self._sealer is None:
            return None
        return self._cipher.control_mac(self._sealer.control_fields(entry))

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


def _named(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


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

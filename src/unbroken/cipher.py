"""Payload encryption, control-entry HMACs and the high-water-mark MAC (layer: model).

Serialisation, then encryption, as two byte stages (SPEC §5, ref §3.7, §4.6, §4.7). The
formats below are what the database holds, so they are stable; integers are little-endian.

Sealed payload (XChaCha20-Poly1305, a fresh random nonce per seal, always the current key)::

    key_id(1) ‖ nonce(24) ‖ ciphertext ‖ tag(16)            # len = 41 + len(plaintext)

Associated data, which binds a payload to its place so that a moved row fails to open::

    AAD_VERSION(1) ‖ u32(len(e)) ‖ e ‖ u32(generation) ‖ u32(step_id)
                   ‖ u8(len(kind)) ‖ kind ‖ u8(len(idem_key)) ‖ idem_key

``e`` is the execution id as UTF-8, ``kind`` the entry kind as ASCII (``"result"``,
``"error"``, ``"inputs"``, ``"output"``, ``"promise"``, ``"checkpoint"``), ``idem_key`` the
step's idempotency key or ``b""``. Every variable-length field is length-prefixed, so the
encoding is injective. Control fields (what a control entry's MAC covers) extend the same
head with ``u32(len(name)) ‖ name ‖ u8(len(effect)) ‖ effect`` before the idempotency key.

Subkeys are BLAKE3 ``derive_key`` over the 32 key bytes, one context per use, derived once
per key: a control MAC is ``key_id(1) ‖ keyed_hash(control subkey, fields)(32)``; a
high-water-mark MAC is ``key_id(1) ‖ keyed_hash(hwm subkey, u32(len(e)) ‖ e ‖ u64(count))``;
the key check stored in the database is ``keyed_hash(key-check subkey, b"unbroken key check
v1")`` and a key's printable fingerprint is the first 4 bytes of it in hex. Error messages
carry key ids and lengths only, never key material or payload bytes (INV-5).
"""

from __future__ import annotations

import functools
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3

from unbroken.errors import ConfigurationError, ControlIntegrity, DecodeError, ReplayIntegrity
from unbroken.ids import CONTEXT_CONTROL_HMAC, CONTEXT_HIGH_WATER_MARK

__all__ = [
    "AAD_VERSION", "CONTEXT_KEY_CHECK", "KEY_BYTES", "MAC_BYTES", "NONCE_BYTES", "SEAL_OVERHEAD",
    "TAG_BYTES", "Key", "PayloadCipher", "XChaChaCipher", "aad", "control_fields", "libsodium",
    "preload",
]

KEY_BYTES = 32
NONCE_BYTES = 24
TAG_BYTES = 16
SEAL_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
AAD_VERSION = 1
MAC_BYTES = 1 + 32
CONTEXT_KEY_CHECK = "unbroken v1 key-check"
_KEY_CHECK_MESSAGE = b"unbroken key check v1"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_Seal = Callable[[bytes, bytes], bytes]
_Open = Callable[[bytes, bytes], bytes | None]


def preload() -> None:
    """Load libsodium now (an engine does it while its storage opens). Raises what
    importing PyNaCl raises."""
    if libsodium() is None:
        import nacl.bindings  # noqa: F401  (what the fallback seals and opens through)


@functools.cache
def libsodium() -> tuple[Any, Any] | None:
    """PyNaCl's cffi module as ``(ffi, lib)``, libsodium initialised; ``None`` without it.

    ``nacl.bindings`` imports and checks every libsodium binding (3-4 ms of each engine
    open in a new process), this module only the library; and its functions check every
    argument on every call, where the callers here pass a 24-byte nonce and a 32-byte key
    (``Key`` checks its secret). The module is private to PyNaCl: a PyNaCl without it is
    used through its public bindings (``_sealing``, ``_opening``).
    """
    try:
        from nacl._sodium import ffi, lib
    except ImportError:
        return None
    if lib.sodium_init() < 0:
        raise RuntimeError("libsodium failed to initialise")
    return ffi, lib


def _sealing(key: Key, nonce: Callable[[], bytes]) -> _Seal:
    """``seal(plaintext, aad)``: ``key_id ‖ nonce ‖ ciphertext ‖ tag`` under ``key``, the
    nonce from ``nonce()``; one Python call per seal (it is on every step's path)."""
    key_id, secret = bytes((key.key_id,)), key.secret
    raw = libsodium()
    if raw is None:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt as checked

        def seal_checked(plaintext: bytes, aad: bytes) -> bytes:
            fresh = nonce()
            return b"".join((key_id, fresh, checked(plaintext, aad, fresh, secret)))

        return seal_checked
    ffi, lib = raw
    new, buffer, null = ffi.new, ffi.buffer, ffi.NULL
    array = ffi.typeof("unsigned char[]")  # parsed once
    encrypt = lib.crypto_aead_xchacha20poly1305_ietf_encrypt

    def seal(plaintext: bytes, aad: bytes) -> bytes:
        fresh = nonce()
        size = len(plaintext) + TAG_BYTES
        out = new(array, size)
        if encrypt(out, null, plaintext, len(plaintext), aad, len(aad), null, fresh, secret):
            raise RuntimeError("libsodium refused to seal a payload")
        return b"".join((key_id, fresh, buffer(out, size)[:]))

    return seal


def _opening(key: Key) -> _Open:
    """``open(blob, aad)``: the plaintext of a blob sealed under ``key``, or ``None`` when
    it names another key id, is too short or does not authenticate (one Python call)."""
    key_id, secret = key.key_id, key.secret
    raw = libsodium()
    if raw is None:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt as checked
        from nacl.exceptions import CryptoError

        def open_checked(blob: bytes, aad: bytes) -> bytes | None:
            if len(blob) < SEAL_OVERHEAD or blob[0] != key_id:
                return None
            nonce = blob[1 : 1 + NONCE_BYTES]
            try:
                plain: bytes = checked(blob[1 + NONCE_BYTES :], aad, nonce, secret)
            except CryptoError:
                return None
            return plain

        return open_checked
    ffi, lib = raw
    new, buffer, null = ffi.new, ffi.buffer, ffi.NULL
    array = ffi.typeof("unsigned char[]")
    decrypt = lib.crypto_aead_xchacha20poly1305_ietf_decrypt

    def open_blob(blob: bytes, aad: bytes) -> bytes | None:
        if len(blob) < SEAL_OVERHEAD or blob[0] != key_id:
            return None
        size = len(blob) - SEAL_OVERHEAD
        out = new(array, size or 1)
        status = decrypt(
            out, null, null, blob[1 + NONCE_BYTES :], size + TAG_BYTES, aad, len(aad),
            blob[1 : 1 + NONCE_BYTES], secret,
        )
        return buffer(out, size)[:] if status == 0 else None

    return open_blob


def _derive(context: str, secret: bytes) -> bytes:
    subkey: bytes = blake3.blake3(secret, derive_key_context=context).digest()
    return subkey


def _keyed(subkey: bytes, data: bytes) -> bytes:
    digest: bytes = blake3.blake3(data, key=subkey).digest()
    return digest


@dataclass(frozen=True, slots=True)
class Key:
    """A 32-byte payload key and the one-byte id stored in front of every sealed blob.

    ``repr`` and ``str`` show the id and fingerprint, never the secret.

    Raises:
        ConfigurationError: the id is not an int in 0..255, or the secret is not 32 bytes.
    """

    key_id: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key_id, int) or isinstance(self.key_id, bool):
            raise ConfigurationError(f"key id must be an int, not {type(self.key_id).__name__}")
        if not 0 <= self.key_id <= 255:
            raise ConfigurationError(f"key id must be in 0..255, got {self.key_id}")
        if not isinstance(self.secret, bytes):
            raise ConfigurationError(f"key secret must be bytes, not {type(self.secret).__name__}")
        if (size := len(self.secret)) != KEY_BYTES:
            raise ConfigurationError(f"key secret must be {KEY_BYTES} bytes, not {size}")

    @classmethod
    def generate(cls, key_id: int = 0) -> Key:
        """Return a new random key with the given id."""
        return cls(key_id, os.urandom(KEY_BYTES))

    def fingerprint(self) -> str:
        """Eight hex characters identifying the key, safe to print or log."""
        return _keyed(_derive(CONTEXT_KEY_CHECK, self.secret), _KEY_CHECK_MESSAGE)[:4].hex()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        # Constant time: comparing keys must not leak how many leading bytes agree.
        return self.key_id == other.key_id and hmac.compare_digest(self.secret, other.secret)

    def __hash__(self) -> int:
        return hash((Key, self.key_id))

    def __repr__(self) -> str:
        return f"Key(key_id={self.key_id}, fingerprint={self.fingerprint()!r})"


def _u32(what: str, n: int) -> bytes:
    if not 0 <= n <= 0xFFFFFFFF:
        raise ValueError(f"{what} must fit in 32 bits, got {n}")
    return _U32.pack(n)


def _short(what: str, data: bytes) -> bytes:
    if len(data) > 255:
        raise ValueError(f"{what} must be at most 255 bytes, got {len(data)}")
    return bytes((len(data),)) + data


def _head(execution_id: str, generation: int, step_id: int, kind: str) -> bytes:
    e = execution_id.encode("utf-8")
    head = bytes((AAD_VERSION,)) + _u32("execution id length", len(e))
    numbers = _u32("generation", generation) + _u32("step id", step_id)
    return b"".join((head, e, numbers, _short("kind", kind.encode("ascii"))))


def aad(execution_id: str, generation: int, step_id: int, kind: str, idem_key: bytes) -> bytes:
    """The associated data that binds a sealed payload to its place (layout: module doc).

    Raises:
        ValueError: a number does not fit in 32 bits, or ``kind``/``idem_key`` is too long.
        UnicodeEncodeError: ``kind`` is not ASCII.
    """
    return _head(execution_id, generation, step_id, kind) + _short("idempotency key", idem_key)


def control_fields(
    execution_id: str, generation: int, step_id: int, kind: str, name: str, effect: str,
    idem_key: bytes,
) -> bytes:
    """The injective byte string a control entry's MAC covers (layout: module doc)."""
    n = name.encode("utf-8")
    head = _head(execution_id, generation, step_id, kind)
    tail = _short("effect", effect.encode("ascii")) + _short("idempotency key", idem_key)
    return b"".join((head, _u32("name length", len(n)), n, tail))


class PayloadCipher(Protocol):
    """Seals and opens payload bytes under associated data."""

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` bound to ``aad``."""
        ...

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt a sealed ``blob`` bound to ``aad``."""
        ...


@dataclass(frozen=True, slots=True)
class _KeySlot:
    key: Key
    control: bytes
    hwm: bytes
    check: bytes
    open: _Open


def _key_slot(key: Key) -> _KeySlot:
    control, hwm, check = (
        _derive(context, key.secret)
        for context in (CONTEXT_CONTROL_HMAC, CONTEXT_HIGH_WATER_MARK, CONTEXT_KEY_CHECK)
    )
    return _KeySlot(key, control, hwm, check, _opening(key))


_random_nonce = functools.partial(os.urandom, NONCE_BYTES)  # what nacl.utils.random does


class XChaChaCipher:
    """XChaCha20-Poly1305 payload cipher with a current key and an optional previous one.

    Seals and MACs always use the current key; the previous key (rotation window) still
    opens and verifies what it made.
    """

    __slots__ = ("_by_id", "_current", "_previous", "_seal")

    def __init__(self, current: Key, previous: Key | None = None) -> None:
        """Build the cipher and derive each key's subkeys once.

        Raises:
            ConfigurationError: a key is not a ``Key``, or both keys have the same id.
        """
        for key in (current, previous):
            if key is not None and not isinstance(key, Key):
                raise ConfigurationError(f"cipher keys must be Key, not {type(key).__name__}")
        if previous is not None and previous.key_id == current.key_id:
            raise ConfigurationError(
                f"the previous key must have another key id than the current key ({current.key_id})"
            )
        # PyNaCl is loaded when a cipher is built, not when unbroken is imported.
        self._seal = _sealing(current, _random_nonce)
        self._current = current
        self._previous = previous
        self._by_id = {k.key_id: _key_slot(k) for k in (previous, current) if k is not None}

    @property
    def current(self) -> Key:
        """The key new seals and MACs use."""
        return self._current

    @property
    def previous(self) -> Key | None:
        """The key of the rotation window, still accepted for opening and verifying."""
        return self._previous

    def key_for(self, key_id: int) -> Key | None:
        """The current or previous key with this id, or ``None``."""
        slot = self._by_id.get(key_id)
        return slot.key if slot is not None else None

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt under the current key: ``key_id ‖ nonce ‖ ciphertext ‖ tag``."""
        return self._seal(plaintext, aad)

    def sealing(self, nonce: Callable[[], bytes]) -> Callable[[bytes, bytes], bytes]:
        """``seal`` as one function, its nonces from ``nonce()``, which must never hand
        out the same 24 bytes twice (for a caller that seals on every step)."""
        return _sealing(self._current, nonce)

    def opening(self) -> Callable[[bytes, bytes], bytes | None]:
        """``open(blob, aad)`` as one function for blobs sealed under the current key: it
        returns ``None`` where ``open`` would raise, or for a blob of another key."""
        return self._by_id[self._current.key_id].open

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a sealed blob with the key its first byte names.

        Raises:
            DecodeError: the blob is too short, or names a key id this cipher does not hold.
            ReplayIntegrity: the blob did not authenticate under ``aad`` (moved, altered,
                or sealed under another key with the same id).
        """
        if len(blob) < SEAL_OVERHEAD:
            raise DecodeError("sealed blob shorter than key id + nonce + tag")
        slot = self._by_id.get(blob[0])
        if slot is None:
            raise DecodeError(f"no cipher key registered for key id {blob[0]}")
        plaintext = slot.open(blob, aad)
        if plaintext is None:
            raise ReplayIntegrity(
                f"sealed payload of {len(blob)} bytes failed authentication under key id "
                f"{blob[0]} (moved, altered or sealed under another key)"
            )
        return plaintext

    def control_mac(self, fields: bytes) -> bytes:
        """MAC a control entry's fields under the current key (33 bytes)."""
        slot = self._by_id[self._current.key_id]
        return bytes((slot.key.key_id,)) + _keyed(slot.control, fields)

    def verify_control_mac(self, mac: bytes | None, fields: bytes) -> None:
        """Check a control MAC made under the current or previous key.

        Raises:
            ControlIntegrity: the MAC is missing, malformed, names an unknown key id, or
                does not match ``fields``.
        """
        if mac is None:
            raise ControlIntegrity("control entry has no HMAC but a key is configured")
        if len(mac) != MAC_BYTES:
            raise ControlIntegrity(f"control entry HMAC is {len(mac)} bytes, not {MAC_BYTES}")
        slot = self._by_id.get(mac[0])
        if slot is None:
            raise ControlIntegrity(f"control entry HMAC names unknown key id {mac[0]}")
        if not hmac.compare_digest(mac[1:], _keyed(slot.control, fields)):
            raise ControlIntegrity(f"control entry HMAC did not authenticate (key id {mac[0]})")

    def hwm_mac(self, execution_id: str, count: int, key_id: int | None = None) -> bytes:
        """MAC an execution's committed count under the current key, or the one named.

        Raises:
            DecodeError: ``key_id`` names a key this cipher does not hold.
        """
        slot = self._by_id.get(self._current.key_id if key_id is None else key_id)
        if slot is None:
            raise DecodeError(f"no cipher key registered for key id {key_id}")
        return bytes((slot.key.key_id,)) + _keyed(slot.hwm, _hwm_message(execution_id, count))

    def verify_hwm_mac(self, execution_id: str, count: int, mac: bytes) -> bool:
        """Whether ``mac`` signs ``(execution_id, count)`` under the key its first byte names."""
        slot = self._by_id.get(mac[0]) if len(mac) == MAC_BYTES else None
        if slot is None:
            return False
        expected = _keyed(slot.hwm, _hwm_message(execution_id, count))
        return hmac.compare_digest(mac[1:], expected)

    def verifier(self, key: Key) -> bytes:
        """The 32-byte key check stored in the database to detect a wrong key at open."""
        slot = self._by_id.get(key.key_id)
        check = slot.check if slot is not None and slot.key == key else None
        if check is None:
            check = _derive(CONTEXT_KEY_CHECK, key.secret)
        return _keyed(check, _KEY_CHECK_MESSAGE)

    def __repr__(self) -> str:
        return f"XChaChaCipher(current={self._current!r}, previous={self._previous!r})"


def _hwm_message(execution_id: str, count: int) -> bytes:
    e = execution_id.encode("utf-8")
    if not 0 <= count <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"count must fit in 64 bits, got {count}")
    return b"".join((_u32("execution id length", len(e)), e, _U64.pack(count)))

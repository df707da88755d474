"""Identifiers and keys (layer: model).

Idempotency keys leave the process as ``Idempotency-Key`` headers, so their derivation is
pinned (SPEC §2 "Keys") and covered by test vectors: BLAKE3 ``derive_key`` with the context
``"unbroken v1 idempotency-key"`` over

    u32le(len(e)) ‖ e ‖ u32le(step_id) ‖ u32le(len(n)) ‖ n ‖ u32le(len(c)) ‖ c ‖ fp

where ``e`` is the execution id (UTF-8), ``n`` the step name (UTF-8), ``c`` the effect class
value and ``fp`` the user's fingerprint bytes. Every variable-length field but the last is
length-prefixed, so the encoding is injective. The journal generation is not part of the
key: INV-13 finds a guarded effect committed in an earlier generation by its key.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

import blake3

__all__ = [
    "CONTEXT_CONTROL_HMAC",
    "CONTEXT_HIGH_WATER_MARK",
    "CONTEXT_IDEMPOTENCY_KEY",
    "CONTEXT_LOCK_NAME",
    "CONTEXT_PROMISE_ID",
    "CONTEXT_RESOLVER_TOKEN",
    "CONTEXT_TIMER_ID",
    "MAX_EXECUTION_ID_BYTES",
    "fingerprint_input",
    "idempotency_key",
    "lock_name",
    "new_execution_id",
    "promise_id",
    "resolver_token_hash",
    "step_keys",
    "timer_id",
    "validate_execution_id",
]

CONTEXT_IDEMPOTENCY_KEY = "unbroken v1 idempotency-key"
CONTEXT_PROMISE_ID = "unbroken v1 promise-id"
CONTEXT_TIMER_ID = "unbroken v1 timer-id"
CONTEXT_RESOLVER_TOKEN = "unbroken v1 resolver-token"
CONTEXT_CONTROL_HMAC = "unbroken v1 control-hmac"
CONTEXT_HIGH_WATER_MARK = "unbroken v1 high-water-mark"
CONTEXT_LOCK_NAME = "unbroken v1 lock-name"

MAX_EXECUTION_ID_BYTES = 255

_U32 = struct.Struct("<I")


def new_execution_id() -> str:
    """Return a fresh, time-ordered execution id (a UUIDv7 in canonical form)."""
    # Imported at the first new id, not with unbroken: uuid6 reads its version from the
    # installed package metadata when imported (importlib.metadata, ~20 ms of start-up).
    import uuid6

    return str(uuid6.uuid7())


def validate_execution_id(execution_id: object) -> str:
    """Check a user-supplied execution id and return it.

    Raises:
        TypeError: the id is not a ``str``.
        ValueError: the id is empty, too long, or holds control characters.
    """
    if isinstance(execution_id, uuid.UUID):
        return str(execution_id)
    if not isinstance(execution_id, str):
        raise TypeError(
            f"execution_id must be a str, not {type(execution_id).__name__}"
        )
    if not execution_id:
        raise ValueError("execution_id must not be empty")
    if len(execution_id.encode("utf-8")) > MAX_EXECUTION_ID_BYTES:
        raise ValueError(f"execution_id must be at most {MAX_EXECUTION_ID_BYTES} bytes of UTF-8")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in execution_id):
        raise ValueError("execution_id must not contain control characters")
    return execution_id


def fingerprint_input(name: str, effect_class: str, fingerprint: bytes) -> bytes:
    """The step-descriptor part of the key input: ``len(n) ‖ n ‖ len(c) ‖ c ‖ fp``."""
    n = name.encode("utf-8")
    c = effect_class.encode("ascii")
    return b"".join((_U32.pack(len(n)), n, _U32.pack(len(c)), c, fingerprint))


def idempotency_key(execution_id: str, step_id: int, descriptor_input: bytes) -> bytes:
    """Derive the 32-byte idempotency key of one step (SPEC §2 "Keys").

    Args:
        execution_id: the execution id.
        step_id: the step's call position.
        descriptor_input: ``fingerprint_input(name, effect_class, fingerprint)``.
    """
    e = execution_id.encode("utf-8")
    data = b"".join((_U32.pack(len(e)), e, _U32.pack(step_id), descriptor_input))
    return blake3.blake3(data, derive_key_context=CONTEXT_IDEMPOTENCY_KEY).digest()


def step_keys(execution_id: str) -> Callable[[int, bytes], bytes]:
    """``idempotency_key`` for the steps of one execution: ``derive(step_id,
    descriptor_input)``, with the execution's part of the input hashed once (BLAKE3 is a
    stream: the same key as hashing the whole input)."""
    e = execution_id.encode("utf-8")
    base = blake3.blake3(_U32.pack(len(e)) + e, derive_key_context=CONTEXT_IDEMPOTENCY_KEY)
    pack = _U32.pack

    def derive(step_id: int, descriptor_input: bytes) -> bytes:
        hasher = base.copy()
        hasher.update(pack(step_id) + descriptor_input)
        return hasher.digest()

    return derive


def lock_name(execution_id: str) -> str:
    """The lock file name of an execution: hex of a 128-bit BLAKE3 derivation of its id."""
    digest = blake3.blake3(
        execution_id.encode("utf-8"), derive_key_context=CONTEXT_LOCK_NAME
    ).digest(length=16)
    return digest.hex()


def _position(execution_id: str, generation: int, step_id: int) -> bytes:
    e = execution_id.encode("utf-8")
    return b"".join((_U32.pack(len(e)), e, _U32.pack(generation), _U32.pack(step_id)))


def _uuid8(context: str, data: bytes) -> str:
    b = bytearray(blake3.blake3(data, derive_key_context=context).digest(length=16))
    b[6] = (b[6] & 0x0F) | 0x80  # version 8
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return str(uuid.UUID(bytes=bytes(b)))


def promise_id(execution_id: str, generation: int, step_id: int) -> str:
    """The id of the promise created at a step: a UUIDv8 derived from its position.

    The generation is part of it: a promise of an aborted generation is never confused
    with the one a restarted workflow creates at the same step.
    """
    return _uuid8(CONTEXT_PROMISE_ID, _position(execution_id, generation, step_id))


def timer_id(execution_id: str, generation: int, step_id: int) -> str:
    """The id of the timer armed at a step (UUIDv8, like ``promise_id``)."""
    return _uuid8(CONTEXT_TIMER_ID, _position(execution_id, generation, step_id))


def resolver_token_hash(promise: str, execution_id: str, token: bytes) -> bytes:
    """What is stored of a resolver token: a BLAKE3 hash bound to promise and execution."""
    p = promise.encode("utf-8")
    e = execution_id.encode("utf-8")
    data = b"".join((_U32.pack(len(p)), p, _U32.pack(len(e)), e, token))
    return blake3.blake3(data, derive_key_context=CONTEXT_RESOLVER_TOKEN).digest()

"""Pinned key derivations (SPEC §2 "Keys"): keys leave the process, so they never change."""

from __future__ import annotations

import struct
import subprocess
import sys
import uuid

import blake3
import pytest

from unbroken.effects import EffectClass, Step
from unbroken.ids import (
    fingerprint_input,
    idempotency_key,
    lock_name,
    new_execution_id,
    step_keys,
    validate_execution_id,
)


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def test_idempotency_key_test_vector() -> None:
    key = idempotency_key("order-42", 3, fingerprint_input("charge", "exactly_once_guarded", b""))
    assert key.hex() == "f6087b53d831f4644707a9fa4c01df0f041bbe7701a6bf92d5f4e90537004587"


def test_idempotency_key_test_vector_with_fingerprint() -> None:
    key = idempotency_key("order-42", 0, fingerprint_input("load_cart", "idempotent", b"v2"))
    assert key.hex() == "1516a79362a46773929a230c6178eee1cb53d416786965dfac45ce8ce2a259d6"


def test_idempotency_key_layout_matches_the_spec() -> None:
    e, n, c, fp = b"order-42", b"charge", b"exactly_once_guarded", b"\x01\x02"
    data = _u32(len(e)) + e + _u32(7) + _u32(len(n)) + n + _u32(len(c)) + c + fp
    expected = blake3.blake3(data, derive_key_context="unbroken v1 idempotency-key").digest()
    assert idempotency_key("order-42", 7, fingerprint_input("charge", c.decode(), fp)) == expected


def test_an_execution_s_step_keys_are_its_idempotency_keys() -> None:
    derive = step_keys("order-42")
    assert derive(3, fingerprint_input("charge", "exactly_once_guarded", b"")).hex() == (
        "f6087b53d831f4644707a9fa4c01df0f041bbe7701a6bf92d5f4e90537004587"
    )
    for eid in ("order-42", "é-ünïcode", "x" * 300):
        derive = step_keys(eid)
        for step_id in (0, 1, 7, 2**32 - 1):
            for fp in (b"", b"v2", bytes(range(256))):
                descriptor = fingerprint_input("load_cart", "idempotent", fp)
                assert derive(step_id, descriptor) == idempotency_key(eid, step_id, descriptor)


def test_step_descriptor_feeds_name_class_and_fingerprint() -> None:
    step = Step.idempotent("load", fingerprint=b"x")
    assert step.key_input == fingerprint_input("load", EffectClass.IDEMPOTENT.value, b"x")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("e", 1, "n", "idempotent", b""), ("e", 2, "n", "idempotent", b"")),
        (("e", 1, "n", "idempotent", b""), ("f", 1, "n", "idempotent", b"")),
        (("e", 1, "n", "idempotent", b""), ("e", 1, "m", "idempotent", b"")),
        (("e", 1, "n", "idempotent", b""), ("e", 1, "n", "at_least_once", b"")),
        (("e", 1, "n", "idempotent", b""), ("e", 1, "n", "idempotent", b"x")),
        # framing: moving bytes between name and fingerprint must change the key
        (("e", 1, "ab", "idempotent", b""), ("e", 1, "a", "idempotent", b"b")),
    ],
)
def test_idempotency_key_varies_with_each_input(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    def key(e: str, s: int, n: str, c: str, fp: bytes) -> bytes:
        return idempotency_key(e, s, fingerprint_input(n, c, fp))

    assert key(*a) != key(*b)


def test_lock_name_is_blake3_128_hex_of_the_id() -> None:
    expected = blake3.blake3(b"order-42", derive_key_context="unbroken v1 lock-name").digest(16)
    assert lock_name("order-42") == expected.hex() == "ffe2fd944b9ab5c31d7c01530b0bfe80"


def test_new_execution_ids_are_uuid7_and_time_ordered() -> None:
    ids = [new_execution_id() for _ in range(50)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 50


@pytest.mark.parametrize("bad", ["", "a\nb", "x" * 300])
def test_malformed_execution_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="execution_id"):
        validate_execution_id(bad)


def test_execution_id_of_wrong_type_is_refused() -> None:
    with pytest.raises(TypeError, match="execution_id must be a str"):
        validate_execution_id(42)


def test_importing_unbroken_defers_uuid6_to_the_first_new_id() -> None:
    # uuid6 loads importlib.metadata when imported: start-up pays for it only when an
    # id is made.
    code = (
        "import sys, unbroken; from unbroken.ids import new_execution_id; "
        "before = 'uuid6' in sys.modules; eid = new_execution_id(); "
        "print(before, 'uuid6' in sys.modules, eid.count('-'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "4"]

"""Payload cipher, AAD framing, control and high-water-mark MACs, key checks (SPEC §5)."""

from __future__ import annotations

import base64
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken import cipher as cipher_module
from unbroken.cipher import (
    CONTEXT_KEY_CHECK,
    KEY_BYTES,
    NONCE_BYTES,
    SEAL_OVERHEAD,
    TAG_BYTES,
    Key,
    PayloadCipher,
    XChaChaCipher,
    aad,
    control_fields,
)
from unbroken.errors import (
    ConfigurationError,
    ControlIntegrity,
    DecodeError,
    ReplayIntegrity,
)
from unbroken.ids import CONTEXT_CONTROL_HMAC, CONTEXT_HIGH_WATER_MARK

CURRENT = Key.generate(1)
PREVIOUS = Key.generate(0)
IMPOSTOR = Key.generate(1)  # same id as CURRENT, another secret
STRANGER = Key.generate(7)
ALL_KEYS = (CURRENT, PREVIOUS, IMPOSTOR, STRANGER)

IDEM = bytes(range(32))
AAD = aad("order-42", 0, 3, "result", IDEM)


def _cipher() -> XChaChaCipher:
    return XChaChaCipher(CURRENT, PREVIOUS)


def _secret_forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret),
        secret.decode("latin-1"),
    ]


def _assert_clean(text: str, *secrets: bytes) -> None:
    for secret in (*secrets, *(k.secret for k in ALL_KEYS)):
        for form in _secret_forms(secret):
            assert form not in text


def _raises(error: type[Exception], fn: Callable[..., Any], *args: Any) -> str:
    """Call ``fn``, expect ``error``, and check its message holds no key material."""
    with pytest.raises(error) as info:
        fn(*args)
    message = str(info.value)
    _assert_clean(message)
    return message


# --- seal / open ---------------------------------------------------------------------------


def test_cipher_satisfies_the_protocol() -> None:
    payload_cipher: PayloadCipher = _cipher()
    assert payload_cipher.open(payload_cipher.seal(b"x", AAD), AAD) == b"x"


@pytest.mark.parametrize("size", [0, 1, 1024, 1024 * 1024])
def test_seal_open_round_trip(size: int) -> None:
    plaintext = bytes(i % 251 for i in range(size))
    c = _cipher()
    assert c.open(c.seal(plaintext, AAD), AAD) == plaintext


def test_blob_layout() -> None:
    c = _cipher()
    first, second = c.seal(b"hello", AAD), c.seal(b"hello", AAD)
    assert SEAL_OVERHEAD == 1 + NONCE_BYTES + TAG_BYTES == 41
    assert len(first) == SEAL_OVERHEAD + 5
    assert first[0] == CURRENT.key_id
    assert first[1 : 1 + NONCE_BYTES] != second[1 : 1 + NONCE_BYTES]
    assert first != second


def test_blob_is_the_libsodium_aead_of_the_plaintext() -> None:
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt as encrypt

    blob = _cipher().seal(b"payload", AAD)
    nonce = blob[1 : 1 + NONCE_BYTES]
    assert blob[1 + NONCE_BYTES :] == encrypt(b"payload", AAD, nonce, CURRENT.secret)


def test_without_pynacls_cffi_module_the_cipher_uses_its_public_bindings(
    public_bindings_only: Callable[[], list[str]],
) -> None:
    fast = XChaChaCipher(CURRENT, PREVIOUS)
    fast_blob = fast.seal(b"back", AAD)  # sealed through the cffi module
    calls = public_bindings_only()
    assert cipher_module.libsodium() is None
    fallback = XChaChaCipher(CURRENT, PREVIOUS)
    blob = fallback.seal(b"payload", AAD)
    assert calls == ["encrypt"]  # the fallback, not the cffi module
    assert fast.open(blob, AAD) == b"payload"
    assert fallback.open(fast_blob, AAD) == b"back"
    assert calls == ["encrypt", "decrypt"]
    with pytest.raises(ReplayIntegrity):
        fallback.open(blob[:-1] + bytes((blob[-1] ^ 1,)), AAD)


def test_no_nonce_repeats_in_100k_seals() -> None:
    c = _cipher()
    seal = c.seal
    nonces = {seal(b"", b"")[1 : 1 + NONCE_BYTES] for _ in range(100_000)}
    assert len(nonces) == 100_000


_FIELDS: dict[str, tuple[Any, ...]] = {
    "execution id": ("order-43", 0, 3, "result", IDEM),
    "generation": ("order-42", 1, 3, "result", IDEM),
    "step id": ("order-42", 0, 4, "result", IDEM),
    "kind": ("order-42", 0, 3, "error", IDEM),
    "idem key": ("order-42", 0, 3, "result", IDEM[:-1] + b"\xff"),
    "no idem key": ("order-42", 0, 3, "result", b""),
}


@pytest.mark.parametrize("field", list(_FIELDS))
def test_every_aad_field_binds_the_payload(field: str) -> None:
    c = _cipher()
    blob = c.seal(b"secret value", AAD)
    moved = aad(*_FIELDS[field])
    assert moved != AAD
    message = _raises(ReplayIntegrity, c.open, blob, moved)
    assert "secret value" not in message


def test_aad_layout_matches_the_module_doc() -> None:
    e = "exé".encode()
    expected = (
        b"\x01" + struct.pack("<I", len(e)) + e + struct.pack("<II", 7, 9)
        + b"\x06result" + b"\x02ik"
    )
    assert aad("exé", 7, 9, "result", b"ik") == expected


def test_aad_framing_is_injective_on_a_shifted_boundary() -> None:
    assert aad("ab", 0, 0, "c", b"") != aad("a", 0, 0, "bc", b"")
    assert aad("a", 0, 0, "b", b"c") != aad("a", 0, 0, "bc", b"")
    assert aad("", 0, 0, "", b"") != aad("", 0, 0, "", b"\x00")


def test_aad_rejects_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="generation"):
        aad("e", 2**32, 0, "result", b"")
    with pytest.raises(ValueError, match="step id"):
        aad("e", 0, -1, "result", b"")
    with pytest.raises(ValueError, match="idempotency key"):
        aad("e", 0, 0, "result", bytes(256))
    with pytest.raises(ValueError):
        aad("e", 0, 0, "résultat", b"")


_small_text = st.text(alphabet="ab\x00é", max_size=3)
_small_ascii = st.text(alphabet="ab\x00", max_size=3)
_small_int = st.sampled_from([0, 1, 256, 2**32 - 1])
_small_bytes = st.binary(max_size=3)
_aad_fields = st.tuples(_small_text, _small_int, _small_int, _small_ascii, _small_bytes)
_control = st.tuples(
    _small_text, _small_int, _small_int, _small_ascii, _small_text, _small_ascii, _small_bytes
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_aad_fields, max_size=30))
def test_distinct_aad_fields_give_distinct_aad(fields: list[tuple[Any, ...]]) -> None:
    assert len({aad(*f) for f in fields}) == len(set(fields))


@settings(max_examples=300, deadline=None)
@given(st.lists(_control, max_size=30))
def test_distinct_control_fields_give_distinct_bytes(fields: list[tuple[Any, ...]]) -> None:
    assert len({control_fields(*f) for f in fields}) == len(set(fields))


def test_a_bit_flip_anywhere_is_detected() -> None:
    c = XChaChaCipher(CURRENT)
    blob = c.seal(b"0123456789abcdef" * 4, AAD)
    for position in range(1, len(blob)):
        for bit in (0x01, 0x80):
            flipped = bytearray(blob)
            flipped[position] ^= bit
            _raises(ReplayIntegrity, c.open, bytes(flipped), AAD)


@pytest.mark.parametrize("bit", [0x01, 0x02, 0x80])
def test_a_bit_flip_in_the_key_id_is_detected(bit: int) -> None:
    c = _cipher()
    blob = bytearray(c.seal(b"value", AAD))
    blob[0] ^= bit
    with pytest.raises((DecodeError, ReplayIntegrity)) as info:
        c.open(bytes(blob), AAD)
    _assert_clean(str(info.value))
    # 1 ^ 0x01 = 0 is the previous key's id: it names a key, which then fails to authenticate.
    assert isinstance(info.value, ReplayIntegrity if blob[0] == PREVIOUS.key_id else DecodeError)


@pytest.mark.parametrize("size", [0, 1, SEAL_OVERHEAD - 1])
def test_short_blob_is_a_decode_error(size: int) -> None:
    blob = _cipher().seal(b"", AAD)[:size]
    assert "shorter than key id + nonce + tag" in _raises(DecodeError, _cipher().open, blob, AAD)


def test_a_tag_only_blob_of_an_empty_plaintext_opens() -> None:
    blob = _cipher().seal(b"", AAD)
    assert len(blob) == SEAL_OVERHEAD
    assert _cipher().open(blob, AAD) == b""


def test_unknown_key_id_names_the_id() -> None:
    blob = b"\xc8" + _cipher().seal(b"value", AAD)[1:]
    assert "200" in _raises(DecodeError, _cipher().open, blob, AAD)


def test_wrong_key_with_the_same_id_fails_authentication() -> None:
    blob = _cipher().seal(b"value", AAD)
    _raises(ReplayIntegrity, XChaChaCipher(IMPOSTOR).open, blob, AAD)


def test_rotation_window() -> None:
    old_blob = XChaChaCipher(PREVIOUS).seal(b"old", AAD)
    rotated = XChaChaCipher(CURRENT, PREVIOUS)
    assert rotated.open(old_blob, AAD) == b"old"
    new_blob = rotated.seal(b"new", AAD)
    assert new_blob[0] == CURRENT.key_id
    assert XChaChaCipher(CURRENT).open(new_blob, AAD) == b"new"
    # Once the window closes, the old key's blobs are no longer readable.
    assert str(PREVIOUS.key_id) in _raises(DecodeError, XChaChaCipher(CURRENT).open, old_blob, AAD)


def test_key_for_and_properties() -> None:
    c = _cipher()
    assert c.current is CURRENT
    assert c.previous is PREVIOUS
    assert c.key_for(1) is CURRENT
    assert c.key_for(0) is PREVIOUS
    assert c.key_for(7) is None
    assert XChaChaCipher(CURRENT).previous is None


def test_previous_key_must_have_another_id() -> None:
    _raises(ConfigurationError, XChaChaCipher, CURRENT, IMPOSTOR)


def test_cipher_keys_must_be_keys() -> None:
    _raises(ConfigurationError, XChaChaCipher, CURRENT.secret)


# --- control MAC ---------------------------------------------------------------------------

FIELDS = control_fields("order-42", 0, 3, "intent", "charge", "exactly_once_guarded", IDEM)


def test_control_mac_round_trip_and_layout() -> None:
    c = _cipher()
    mac = c.control_mac(FIELDS)
    subkey = blake3.blake3(CURRENT.secret, derive_key_context=CONTEXT_CONTROL_HMAC).digest()
    assert mac == bytes([CURRENT.key_id]) + blake3.blake3(FIELDS, key=subkey).digest()
    assert len(mac) == 33
    c.verify_control_mac(mac, FIELDS)


def test_control_mac_rejects_missing_truncated_altered_and_foreign_macs() -> None:
    c = _cipher()
    mac = c.control_mac(FIELDS)
    altered = mac[:-1] + bytes([mac[-1] ^ 1])
    other_fields = control_fields("order-42", 0, 3, "intent", "charge", "idempotent", IDEM)
    _raises(ControlIntegrity, c.verify_control_mac, None, FIELDS)
    _raises(ControlIntegrity, c.verify_control_mac, mac[:-1], FIELDS)
    _raises(ControlIntegrity, c.verify_control_mac, b"", FIELDS)
    _raises(ControlIntegrity, c.verify_control_mac, altered, FIELDS)
    _raises(ControlIntegrity, c.verify_control_mac, mac, other_fields)
    _raises(ControlIntegrity, c.verify_control_mac, XChaChaCipher(IMPOSTOR).control_mac(FIELDS),
            FIELDS)
    message = _raises(ControlIntegrity, c.verify_control_mac,
                      XChaChaCipher(STRANGER).control_mac(FIELDS), FIELDS)
    assert "7" in message


def test_control_mac_of_the_previous_key_is_accepted_in_the_window() -> None:
    old_mac = XChaChaCipher(PREVIOUS).control_mac(FIELDS)
    _cipher().verify_control_mac(old_mac, FIELDS)
    assert _cipher().control_mac(FIELDS)[0] == CURRENT.key_id
    _raises(ControlIntegrity, XChaChaCipher(CURRENT).verify_control_mac, old_mac, FIELDS)


# --- high-water mark -----------------------------------------------------------------------


def test_hwm_mac_round_trip_and_layout() -> None:
    c = _cipher()
    mac = c.hwm_mac("order-42", 17)
    subkey = blake3.blake3(CURRENT.secret, derive_key_context=CONTEXT_HIGH_WATER_MARK).digest()
    message = struct.pack("<I", 8) + b"order-42" + struct.pack("<Q", 17)
    assert mac == bytes([CURRENT.key_id]) + blake3.blake3(message, key=subkey).digest()
    assert c.verify_hwm_mac("order-42", 17, mac)


def test_hwm_mac_rejects_altered_count_execution_or_mac() -> None:
    c = _cipher()
    mac = c.hwm_mac("order-42", 17)
    assert not c.verify_hwm_mac("order-42", 16, mac)
    assert not c.verify_hwm_mac("order-42", 18, mac)
    assert not c.verify_hwm_mac("order-43", 17, mac)
    assert not c.verify_hwm_mac("order-42", 17, mac[:-1] + bytes([mac[-1] ^ 1]))
    assert not c.verify_hwm_mac("order-42", 17, mac[:-1])
    assert not c.verify_hwm_mac("order-42", 17, b"")
    assert not c.verify_hwm_mac("order-42", 17, XChaChaCipher(IMPOSTOR).hwm_mac("order-42", 17))
    assert not c.verify_hwm_mac("order-42", 17, XChaChaCipher(STRANGER).hwm_mac("order-42", 17))


def test_hwm_mac_under_a_named_key() -> None:
    c = _cipher()
    old = c.hwm_mac("order-42", 5, key_id=PREVIOUS.key_id)
    assert old[0] == PREVIOUS.key_id
    assert old == XChaChaCipher(PREVIOUS).hwm_mac("order-42", 5)
    assert c.verify_hwm_mac("order-42", 5, old)
    assert not XChaChaCipher(CURRENT).verify_hwm_mac("order-42", 5, old)
    assert "200" in _raises(DecodeError, c.hwm_mac, "order-42", 5, 200)


# --- key checks, keys, reprs ---------------------------------------------------------------


def test_verifier_is_deterministic_and_differs_per_key() -> None:
    c = _cipher()
    check = c.verifier(CURRENT)
    assert len(check) == 32
    assert check == XChaChaCipher(CURRENT).verifier(CURRENT) == XChaChaCipher(STRANGER).verifier(
        CURRENT
    )
    assert len({c.verifier(k) for k in ALL_KEYS}) == len(ALL_KEYS)
    subkey = blake3.blake3(CURRENT.secret, derive_key_context=CONTEXT_KEY_CHECK).digest()
    assert check == blake3.blake3(b"unbroken key check v1", key=subkey).digest()
    assert CURRENT.fingerprint() == check[:4].hex()


def test_subkeys_are_derived_once_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _cipher()

    def fail(context: str, secret: bytes) -> bytes:
        raise AssertionError(f"derived {context!r} again")

    monkeypatch.setattr(cipher_module, "_derive", fail)
    c.verify_control_mac(c.control_mac(FIELDS), FIELDS)
    assert c.verify_hwm_mac("e", 1, c.hwm_mac("e", 1, key_id=PREVIOUS.key_id))
    c.verifier(CURRENT)
    c.verifier(PREVIOUS)


def test_fingerprint() -> None:
    assert len(CURRENT.fingerprint()) == 8
    int(CURRENT.fingerprint(), 16)
    assert CURRENT.fingerprint() == Key(1, CURRENT.secret).fingerprint()
    assert len({k.fingerprint() for k in ALL_KEYS}) == len(ALL_KEYS)


def test_key_equality_and_hash() -> None:
    assert Key(1, CURRENT.secret) == CURRENT
    assert hash(Key(1, CURRENT.secret)) == hash(CURRENT)
    assert CURRENT != IMPOSTOR
    assert Key(2, CURRENT.secret) != CURRENT


def test_reprs_show_ids_and_fingerprints_only() -> None:
    c = _cipher()
    for text in (repr(CURRENT), str(CURRENT), repr(c), str(c), repr(XChaChaCipher(STRANGER))):
        _assert_clean(text)
    assert repr(CURRENT) == f"Key(key_id=1, fingerprint={CURRENT.fingerprint()!r})"
    assert CURRENT.fingerprint() in repr(c)
    assert PREVIOUS.fingerprint() in repr(c)


def test_generate() -> None:
    key = Key.generate(9)
    assert key.key_id == 9
    assert len(key.secret) == KEY_BYTES
    assert Key.generate().key_id == 0
    assert Key.generate().secret != Key.generate().secret


@pytest.mark.parametrize(
    ("key_id", "secret", "names"),
    [
        (0, bytes(range(31)), "32 bytes"),
        (0, bytes(range(33)), "32 bytes"),
        (0, b"", "32 bytes"),
        (0, bytearray(range(32)), "bytes"),
        (0, bytes(range(32)).hex(), "bytes"),
        (256, bytes(range(32)), "0..255"),
        (-1, bytes(range(32)), "0..255"),
        ("1", bytes(range(32)), "int"),
        (True, bytes(range(32)), "int"),
    ],
)
def test_key_validation(key_id: Any, secret: Any, names: str) -> None:
    message = _raises(ConfigurationError, Key, key_id, secret)
    assert names in message
    raw = bytes(secret) if isinstance(secret, bytes | bytearray) else secret.encode()
    if raw:
        _assert_clean(message, raw)


def test_importing_the_cipher_module_does_not_load_pynacl() -> None:
    code = "import sys, unbroken.cipher; print('nacl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

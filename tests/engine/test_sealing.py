"""Payload sealing on the step path: the same layout, associated data and MACs as
``cipher``, a fresh nonce per seal (INV-7) that a forked child never repeats, and errors
that still name the value (INV-5, INV-11)."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unbroken.cipher import SEAL_OVERHEAD, Key, XChaChaCipher, aad, control_fields
from unbroken.errors import DecodeError, EncodeError, PayloadTooLarge, ReplayIntegrity
from unbroken.journal import EntryKind, JournalEntry
from unbroken.payloads import Payloads

KINDS = ["result", "error", "intent", "control", "checkpoint", "inputs", "output"]


def _payloads(limit: int = 1 << 20) -> tuple[Payloads, XChaChaCipher]:
    cipher = XChaChaCipher(Key.generate(7), Key.generate(3))
    return Payloads(cipher, limit), cipher


def _where(eid: str = "order-42", step: int = 5, kind: str = "result") -> dict[str, object]:
    return {
        "execution_id": eid,
        "generation": 1,
        "step_id": step,
        "kind": kind,
        "idem_key": bytes(range(32)),
    }


def test_a_sealed_step_value_opens_with_the_cipher_under_its_own_place_inv7() -> None:
    payloads, cipher = _payloads()
    blob = payloads.seal({"n": 1}, "the result", **_where())
    assert blob[0] == 7  # the current key's id
    assert len(blob) == SEAL_OVERHEAD + len(b'{"n":1}')
    here = aad("order-42", 1, 5, "result", bytes(range(32)))
    assert cipher.open(blob, here) == b'{"n":1}'
    assert payloads.open(blob, "the result", **_where()) == {"n": 1}
    with pytest.raises(ReplayIntegrity):
        payloads.open(blob, "moved", **_where(step=6))


def test_blobs_open_under_the_current_and_the_previous_key_and_fail_closed() -> None:
    payloads, cipher = _payloads()
    here = aad("order-42", 1, 5, "result", bytes(range(32)))
    old = XChaChaCipher(cipher.previous)  # type: ignore[arg-type]  # sealed before a rotation
    for blob, value in (
        (payloads.seal("now", "v", **_where()), "now"),
        (old.seal(b'"before"', here), "before"),
        (payloads.seal("", "v", **_where()), ""),
    ):
        assert payloads.open(blob, "v", **_where()) == value
    blob = bytearray(payloads.seal("now", "v", **_where()))
    blob[-1] ^= 1
    with pytest.raises(ReplayIntegrity, match="failed authentication under key id 7"):
        payloads.open(bytes(blob), "v", **_where())
    stranger = XChaChaCipher(Key.generate(9)).seal(b"1", here)
    with pytest.raises(DecodeError, match="no cipher key registered for key id 9"):
        payloads.open(stranger, "v", **_where())
    with pytest.raises(DecodeError, match="shorter"):
        payloads.open(b"\x07short", "v", **_where())


@settings(max_examples=200, deadline=None)
@given(
    eid=st.text(min_size=1, max_size=40),
    generation=st.integers(0, 0xFFFFFFFF),
    step=st.integers(0, 0xFFFFFFFF),
    kind=st.sampled_from(KINDS),
    key=st.binary(max_size=255),
    name=st.text(max_size=30),
    effect=st.sampled_from(["idempotent", "at_least_once", "exactly_once_guarded"]),
)
def test_the_bound_data_is_the_cipher_s_byte_for_byte(
    eid: str, generation: int, step: int, kind: str, key: bytes, name: str, effect: str
) -> None:
    payloads, cipher = _payloads()
    where = {"execution_id": eid, "generation": generation, "step_id": step, "kind": kind}
    for _ in range(2):  # the first call fills the cache, the second uses it
        blob = payloads.seal([1, "x"], "v", idem_key=key, **where)
        assert cipher.open(blob, aad(eid, generation, step, kind, key)) == b'[1,"x"]'
    entry = JournalEntry(eid, generation, step, EntryKind.INTENT, name, effect, key, None, 0)
    fields = control_fields(eid, generation, step, "intent", name, effect, key)
    for _ in range(2):
        mac = payloads.entry_mac(entry)
        assert mac == cipher.control_mac(fields)
        payloads.check_entry_mac(JournalEntry(*fields_of(entry), hmac=mac))


def fields_of(entry: JournalEntry) -> tuple[object, ...]:
    return (
        entry.execution_id, entry.generation, entry.step_id, entry.kind, entry.name,
        entry.effect, entry.idem_key, entry.payload, entry.created_at_ms,
    )


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ({"generation": 1 << 32}, ValueError),
        ({"step_id": -1}, ValueError),
        ({"idem_key": bytes(256)}, ValueError),
        ({"kind": "résultat"}, UnicodeEncodeError),
    ],
)
def test_bound_data_out_of_range_is_refused_as_the_cipher_refuses_it(
    where: dict[str, object], error: type[Exception]
) -> None:
    payloads, _ = _payloads()
    payloads.seal(1, "v", **_where())  # cache this execution
    with pytest.raises(error):
        payloads.seal(1, "v", **{**_where(), **where})


def test_every_seal_takes_a_fresh_nonce_inv7() -> None:
    payloads, _ = _payloads()
    nonces = {payloads.seal(1, "v", **_where())[1:25] for _ in range(3000)}
    assert len(nonces) == 3000


def test_threads_sealing_at_once_never_share_a_nonce_inv7() -> None:
    payloads, _ = _payloads()
    start = threading.Barrier(4, timeout=30)

    def seal_many() -> list[bytes]:
        start.wait()
        return [payloads.seal(1, "v", **_where())[1:25] for _ in range(2000)]

    with ThreadPoolExecutor(4) as pool:
        nonces = [n for batch in pool.map(lambda _: seal_many(), range(4)) for n in batch]
    assert len(set(nonces)) == len(nonces) == 8000


def test_a_forked_child_never_reuses_the_parent_s_nonces_inv7() -> None:
    payloads, _ = _payloads()
    payloads.seal(1, "v", **_where())  # the buffer is filled
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: report its next nonces, then leave at once
        try:
            os.close(read)
            blobs = [payloads.seal(1, "v", **_where())[1:25] for _ in range(20)]
            os.write(write, b"".join(blobs))
        finally:
            os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 4096):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = b"".join(payloads.seal(1, "v", **_where())[1:25] for _ in range(20))
    assert len(child) == len(parent) == 20 * 24
    child_nonces = {child[i : i + 24] for i in range(0, len(child), 24)}
    parent_nonces = {parent[i : i + 24] for i in range(0, len(parent), 24)}
    assert not child_nonces & parent_nonces


def test_errors_name_the_value_even_when_its_name_is_made_lazily_inv5() -> None:
    payloads, _ = _payloads(limit=16)
    named: list[str] = []

    def what() -> str:
        named.append("asked")
        return "the result of step 3 ('charge')"

    payloads.seal("short", what, **_where())
    assert named == []  # no error: the name is never made
    with pytest.raises(EncodeError, match=r"the result of step 3 \('charge'\) cannot be"):
        payloads.seal(object(), what, **_where())
    with pytest.raises(PayloadTooLarge, match=r"step 3 \('charge'\)") as excinfo:
        payloads.seal("x" * 100, what, **_where())
    assert "xxxx" not in str(excinfo.value)


def test_without_a_key_values_are_stored_encoded_only() -> None:
    payloads = Payloads(None, 1 << 20)
    assert payloads.seal({"a": 1}, "v", **_where()) == b'{"a":1}'
    entry = JournalEntry("e", 0, 1, EntryKind.INTENT, "s", "idempotent", b"k", None, 0)
    assert payloads.entry_mac(entry) is None


def test_without_pynacl_s_private_binding_sealing_goes_through_the_public_one(
    public_bindings_only: Callable[[], list[str]],
) -> None:
    key = Key.generate(7)
    cipher = XChaChaCipher(key)  # built with the cffi module
    calls = public_bindings_only()
    payloads = Payloads(XChaChaCipher(key), 1 << 20)  # built without it
    blob = payloads.seal({"n": 1}, "v", **_where())
    assert calls == ["encrypt"]  # the fallback, not the cffi module
    assert cipher.open(blob, aad("order-42", 1, 5, "result", bytes(range(32)))) == b'{"n":1}'
    assert payloads.open(blob, "v", **_where()) == {"n": 1}
    opened = payloads.opener("order-42", 1, "result")(blob, 5, bytes(range(32)))
    assert opened == {"n": 1}
    assert calls == ["encrypt", "decrypt", "decrypt"]


@given(
    st.text(max_size=20),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.sampled_from(KINDS),
    st.binary(max_size=40),
)
@settings(max_examples=60)
def test_an_opener_opens_what_open_at_opens_and_only_that(
    eid: str, generation: int, step: int, kind: str, key: bytes
) -> None:
    payloads, _ = _payloads()
    opened = payloads.opener(eid, generation, kind)
    blob = payloads.seal(
        [step, "v"], "v", execution_id=eid, generation=generation, step_id=step, kind=kind,
        idem_key=key,
    )
    assert opened(blob, step, key) == [step, "v"]
    assert opened(blob, step, key) == payloads.open_at(blob, eid, generation, step, kind, key)
    elsewhere = [(step ^ 1, key), (step, key + b"x")]
    for other_step, other_key in elsewhere:
        with pytest.raises(ReplayIntegrity):
            opened(blob, other_step, other_key)
    other = payloads.opener(eid, generation ^ 1, kind)
    with pytest.raises(ReplayIntegrity):
        other(blob, step, key)
    assert opened(None, step, key) is None


def test_an_opener_opens_rows_of_any_size_in_turn_each_to_its_own_value() -> None:
    payloads, _ = _payloads()
    opened = payloads.opener("order-42", 1, "result")
    key = bytes(range(32))
    values = ["x" * n for n in (5000, 3, 4094, 4095, 0, 9000, 17)]
    blobs = [
        payloads.seal(v, "v", execution_id="order-42", generation=1, step_id=i, kind="result",
                      idem_key=key)
        for i, v in enumerate(values)
    ]
    held = [opened(blob, i, key) for i, blob in enumerate(blobs)]
    assert held == values


def test_an_opener_fails_closed_like_open_and_opens_the_previous_keys_blobs() -> None:
    payloads, cipher = _payloads(limit=64)
    opened = payloads.opener("order-42", 1, "result")
    where = _where()
    blob = payloads.seal("now", "v", **where)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(ReplayIntegrity):
        opened(bytes(tampered), 5, bytes(range(32)))
    with pytest.raises(DecodeError):
        opened(blob[: SEAL_OVERHEAD - 1], 5, bytes(range(32)))
    with pytest.raises(PayloadTooLarge):
        opened(blob + bytes(200), 5, bytes(range(32)))
    old = XChaChaCipher(cipher.previous)  # type: ignore[arg-type]
    before = old.seal(b'"before"', aad("order-42", 1, 5, "result", bytes(range(32))))
    assert opened(before, 5, bytes(range(32))) == "before"
    plain = Payloads(None, 64).opener("order-42", 1, "result")
    assert plain(b'{"$t":["tuple",[1]]}', 5, b"") == (1,)
    not_json = cipher.seal(b"{not json", aad("order-42", 1, 5, "result", bytes(range(32))))
    with pytest.raises(DecodeError):
        opened(not_json, 5, bytes(range(32)))

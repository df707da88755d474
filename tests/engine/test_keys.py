"""Keys from the environment, key files and the process (SPEC §5 "Keys").

Every test runs under a guard that remembers each key built and each error message seen,
and checks at the end that no log record or error message holds key material.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from unbroken import cipher
from unbroken.cipher import Key
from unbroken.errors import ConfigurationError
from unbroken.keys import (
    KeyRing,
    format_key,
    load_keys,
    parse_key,
    process_key,
    read_key_file,
    rotated,
    without_previous,
    write_key_file,
)

SECRET = bytes(range(32))
B64 = base64.b64encode(SECRET).decode()


class Guard:
    """Collects key material and error messages; nothing secret may reach the messages."""

    def __init__(self) -> None:
        self.material: list[str] = []
        self.messages: list[str] = []

    def secret(self, raw: bytes) -> None:
        encoded = base64.b64encode(raw).decode()
        self.material += [encoded, encoded.rstrip("="), raw.hex()]
        self.material.append(base64.urlsafe_b64encode(raw).decode().rstrip("="))

    def text(self, text: str) -> None:
        if text.strip():
            self.material.append(text.strip())

    def refused(self, match: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        with pytest.raises(ConfigurationError, match=match) as info:
            call(*args, **kwargs)
        message = str(info.value)
        self.messages.append(message)
        return message


@pytest.fixture(autouse=True)
def guard(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    found = Guard()
    found.secret(SECRET)
    original = Key.__post_init__

    def remembering(self: Key) -> None:
        original(self)
        found.secret(self.secret)

    monkeypatch.setattr(cipher.Key, "__post_init__", remembering)
    caplog.set_level(logging.DEBUG)
    yield found
    records = caplog.get_records("setup") + caplog.get_records("call")
    written = [r.getMessage() for r in records] + found.messages
    for message in written:
        for material in found.material:
            assert material not in message


def _b64(size: int) -> str:
    return base64.b64encode(bytes(range(size))).decode()


def _key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- parse_key and format_key ----------------------------------------------------------


def test_parse_plain_key_has_id_zero() -> None:
    key = parse_key(B64, what="UNBROKEN_KEY")
    assert key == Key(0, SECRET)


def test_parse_id_prefixed_key_ignores_surrounding_whitespace() -> None:
    key = parse_key(f"  7:{B64}\n", what="UNBROKEN_KEY")
    assert (key.key_id, key.secret) == (7, SECRET)
    assert parse_key(f"255:{B64}", what="x").key_id == 255


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (_b64(31), "decodes to 31 bytes, expected 32"),
        (_b64(33), "decodes to 33 bytes, expected 32"),
        (f"3:{_b64(31)}", "decodes to 31 bytes, expected 32"),
        ("not base64 at all!", "not base64"),
        (B64.rstrip("="), "not base64"),  # padding is required
        (base64.urlsafe_b64encode(b"\xfb" * 32).decode(), "not base64"),  # '-' and '_'
        (B64[:20] + " " + B64[20:], "not base64"),
        (B64[:-1] + "é", "not base64"),
        (f"256:{B64}", "key id out of range"),
        (f"1000:{B64}", "key id out of range"),
        (f"x:{B64}", "key id before ':' is not a decimal number"),
        (f"-1:{B64}", "key id before ':' is not a decimal number"),
        (f":{B64}", "key id before ':' is not a decimal number"),
        ("", "it is empty"),
        (" \n\t", "it is empty"),
    ],
)
def test_parse_key_refusals_name_the_problem_not_the_text(
    guard: Guard, text: str, reason: str
) -> None:
    guard.text(text)
    guard.text(text.partition(":")[2])
    message = guard.refused(re.escape(reason), parse_key, text, what="UNBROKEN_KEY")
    assert message.startswith("UNBROKEN_KEY is not a valid key: ")


def test_format_key_always_writes_the_id() -> None:
    assert format_key(Key(0, SECRET)) == f"0:{B64}"
    assert format_key(Key(42, SECRET)) == f"42:{B64}"
    key = Key.generate(9)
    assert parse_key(format_key(key), what="x") == key


# -- read_key_file ---------------------------------------------------------------------


def test_read_key_file_with_one_key(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n")
    ring = read_key_file(path)
    assert ring == KeyRing(Key(0, SECRET), None, source=f"key file {path}")


def test_read_key_file_with_previous_key(tmp_path: Path) -> None:
    old = Key.generate(0)
    path = _key_file(tmp_path / "k.key", f"\n1:{B64}\n\n{format_key(old)}\n")
    ring = read_key_file(path)
    assert ring.current == Key(1, SECRET)
    assert ring.previous == old


def test_world_readable_key_file_is_refused_with_chmod_hint(guard: Guard, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n", 0o644)
    guard.refused(
        re.escape(f"key file {path} is readable by other users (mode 0644); chmod 600 it"),
        read_key_file,
        path,
    )


def test_group_writable_key_file_is_refused(guard: Guard, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n", 0o620)
    guard.refused(
        re.escape(f"key file {path} is writable by other users (mode 0620); chmod 600 it"),
        read_key_file,
        path,
    )


def test_missing_key_file_is_refused(guard: Guard, tmp_path: Path) -> None:
    path = tmp_path / "absent.key"
    guard.refused(re.escape(f"cannot read key file {path}: not found"), read_key_file, path)


def test_directory_is_not_a_key_file(guard: Guard, tmp_path: Path) -> None:
    path = tmp_path / "dir.key"
    path.mkdir(mode=0o700)
    guard.refused(re.escape(f"key file {path} is not a regular file"), read_key_file, path)


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root reading")
def test_unreadable_key_file_is_refused(guard: Guard, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n", 0o000)
    guard.refused(re.escape(f"cannot read key file {path}: permission denied"), read_key_file, path)


@pytest.mark.parametrize("text", ["", "\n \n\t\n"])
def test_empty_key_file_is_refused(guard: Guard, tmp_path: Path, text: str) -> None:
    path = _key_file(tmp_path / "k.key", text)
    guard.refused(re.escape(f"key file {path} is empty"), read_key_file, path)


def test_key_file_with_three_keys_is_refused(guard: Guard, tmp_path: Path) -> None:
    lines = "".join(format_key(Key.generate(i)) + "\n" for i in range(3))
    path = _key_file(tmp_path / "k.key", lines)
    guard.refused(re.escape(f"key file {path} holds 3 keys"), read_key_file, path)


def test_malformed_line_names_file_and_line(guard: Guard, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"1:{B64}\n\n{_b64(16)}\n")
    guard.text(_b64(16))
    guard.refused(
        re.escape(f"key file {path} line 3 is not a valid key: decodes to 16 bytes"),
        read_key_file,
        path,
    )


def test_binary_key_file_is_refused(guard: Guard, tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"\xff\xfe" + SECRET)
    path.chmod(0o600)
    guard.refused(re.escape(f"key file {path} is not ASCII text"), read_key_file, path)


def test_current_and_previous_need_distinct_ids(guard: Guard, tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n{format_key(Key.generate(0))}\n")
    guard.refused(re.escape(f"keys from key file {path} both have key id 0"), read_key_file, path)
    guard.refused("both have key id 4", KeyRing, Key.generate(4), Key.generate(4))


# -- write_key_file --------------------------------------------------------------------


def test_write_key_file_round_trip_private_and_tidy(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    new, old = Key.generate(3), Key.generate(2)
    ring = KeyRing(new, old, source=f"key file {path}")
    old_umask = os.umask(0)  # the file is private whatever the umask
    try:
        write_key_file(path, ring)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == f"{format_key(new)}\n{format_key(old)}\n"
    assert read_key_file(path) == ring
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_write_key_file_replaces_an_existing_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n")
    ring = KeyRing(Key.generate(1))
    write_key_file(path, ring)
    assert read_key_file(path).current == ring.current
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_exclusive_write_refuses_an_existing_file(tmp_path: Path) -> None:
    path = _key_file(tmp_path / "k.key", f"{B64}\n")
    with pytest.raises(FileExistsError):
        write_key_file(path, KeyRing(Key.generate(0)), exclusive=True)
    assert path.read_text() == f"{B64}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_exclusive_write_creates_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    ring = KeyRing(Key.generate(0))
    write_key_file(path, ring, exclusive=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path).current == ring.current
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


# -- load_keys -------------------------------------------------------------------------


def test_environment_comes_before_key_file_and_default(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    file_key, default_key = Key.generate(5), Key.generate(6)
    key_file = _key_file(tmp_path / "named.key", format_key(file_key) + "\n")
    _key_file(tmp_path / "app.db.key", format_key(default_key) + "\n")
    env = {"UNBROKEN_KEY": f"2:{B64}"}

    ring = load_keys(environ=env, key_file=key_file, local_db=db, may_create=True)
    assert ring == KeyRing(Key(2, SECRET), None, source="UNBROKEN_KEY")
    ring = load_keys(environ={}, key_file=key_file, local_db=db, may_create=True)
    assert ring is not None and ring.current == file_key
    assert ring.source == f"key file {key_file}"
    ring = load_keys(environ={}, key_file=None, local_db=db, may_create=True)
    assert ring is not None and ring.current == default_key
    assert ring.source == f"key file {tmp_path / 'app.db.key'}"


def test_environment_previous_key(guard: Guard) -> None:
    old = Key.generate(0)
    env = {"UNBROKEN_KEY": f"1:{B64}", "UNBROKEN_KEY_PREVIOUS": format_key(old)}
    ring = load_keys(environ=env, key_file=None, local_db=None, may_create=False)
    assert ring is not None
    assert (ring.current, ring.previous) == (Key(1, SECRET), old)

    env["UNBROKEN_KEY_PREVIOUS"] = _b64(8)
    guard.text(_b64(8))
    guard.refused(
        re.escape("UNBROKEN_KEY_PREVIOUS is not a valid key: decodes to 8 bytes"),
        load_keys,
        environ=env,
        key_file=None,
        local_db=None,
        may_create=False,
    )
    guard.refused(
        "UNBROKEN_KEY_PREVIOUS is set but UNBROKEN_KEY is not",
        load_keys,
        environ={"UNBROKEN_KEY_PREVIOUS": format_key(old)},
        key_file=None,
        local_db=None,
        may_create=False,
    )


def test_malformed_environment_key_is_refused_even_with_a_key_file(
    guard: Guard, tmp_path: Path
) -> None:
    key_file = _key_file(tmp_path / "named.key", f"{B64}\n")
    guard.text("abc")
    guard.refused(
        "UNBROKEN_KEY is not a valid key: not base64",
        load_keys,
        environ={"UNBROKEN_KEY": "abc"},
        key_file=key_file,
        local_db=None,
        may_create=True,
    )


def test_default_key_file_is_created_once_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "app.db"
    path = tmp_path / "app.db.key"
    first = load_keys(environ={}, key_file=None, local_db=db, may_create=True)
    assert first is not None and first.previous is None
    assert first.source == f"key file {path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"(0:)?[A-Za-z0-9+/]{43}=\n", path.read_text())

    again = load_keys(environ={}, key_file=None, local_db=db, may_create=True)
    assert again == first
    records = [r for r in caplog.records if r.name == "unbroken"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert str(path) in records[0].getMessage()
    assert "journal cannot be read" in records[0].getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db.key"]


def _open_concurrently(db: Path, count: int) -> list[KeyRing | None]:
    start = threading.Barrier(count)
    rings: list[KeyRing | None] = []
    errors: list[BaseException] = []

    def open_db() -> None:
        start.wait()
        try:
            rings.append(load_keys(environ={}, key_file=None, local_db=db, may_create=True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_db) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return rings


def test_concurrent_creation_agrees_on_one_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for attempt in range(20):
        rings = _open_concurrently(tmp_path / f"app{attempt}.db", 4)
        assert len(rings) == 4
        assert rings[0] is not None
        assert all(r is not None and r.current == rings[0].current for r in rings)
    created = [r for r in caplog.records if "created a new key file" in r.getMessage()]
    assert len(created) == 20
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".key"] * 20


def test_exclusive_write_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "k.key"
    ring = KeyRing(Key.generate(0))
    write_key_file(path, ring, exclusive=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path).current == ring.current
    with pytest.raises(FileExistsError):
        write_key_file(path, KeyRing(Key.generate(0)), exclusive=True)
    assert read_key_file(path).current == ring.current
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]


def test_no_key_and_creation_not_allowed_gives_none(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    assert load_keys(environ={}, key_file=None, local_db=db, may_create=False) is None
    assert not (tmp_path / "app.db.key").exists()
    assert load_keys(environ={}, key_file=None, local_db=None, may_create=True) is None


def test_existing_default_key_file_is_read_without_creation_rights(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _key_file(tmp_path / "app.db.key", f"{B64}\n")
    ring = load_keys(environ={}, key_file=None, local_db=db, may_create=False)
    assert ring is not None and ring.current == Key(0, SECRET)


def test_bad_default_key_file_is_refused_not_replaced(guard: Guard, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    path = _key_file(tmp_path / "app.db.key", f"{B64}\n", 0o644)
    guard.refused(
        "readable by other users",
        load_keys,
        environ={},
        key_file=None,
        local_db=db,
        may_create=True,
    )
    assert path.read_text() == f"{B64}\n"


def test_key_file_that_cannot_be_created_is_a_configuration_error(
    guard: Guard, tmp_path: Path
) -> None:
    db = tmp_path / "missing-dir" / "app.db"
    guard.refused(
        re.escape(f"cannot create key file {db}.key: not found"),
        load_keys,
        environ={},
        key_file=None,
        local_db=db,
        may_create=True,
    )


# -- process key, rotation, repr -------------------------------------------------------


def test_process_key_is_stable_within_the_process() -> None:
    seen: list[KeyRing] = []
    threads = [threading.Thread(target=lambda: seen.append(process_key())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ring = process_key()
    assert all(r is ring for r in seen)
    assert ring.source == "process key"
    assert ring.previous is None


def test_rotation_then_dropping_the_previous_key(guard: Guard) -> None:
    ring = KeyRing(Key(4, SECRET), source="key file /x.key")
    turned = rotated(ring)
    assert turned.current.key_id == 5
    assert turned.current != ring.current
    assert turned.previous == ring.current
    assert turned.source == ring.source
    guard.refused(
        re.escape(
            "a previous key is still configured; drop it first "
            "(unbroken rotate-key --drop-previous)"
        ),
        rotated,
        turned,
    )
    dropped = without_previous(turned)
    assert dropped == KeyRing(turned.current, None, source=ring.source)
    assert rotated(dropped).current.key_id == 6


def test_rotation_wraps_the_key_id() -> None:
    ring = rotated(KeyRing(Key(255, SECRET)))
    assert ring.current.key_id == 0
    assert ring.previous is not None and ring.previous.key_id == 255


def test_repr_shows_no_secret() -> None:
    key = Key.generate(1)
    ring = KeyRing(Key(0, SECRET), key, source="UNBROKEN_KEY")
    shown = repr(ring) + str(ring)
    for secret in (SECRET, key.secret):
        assert base64.b64encode(secret).decode() not in shown
        assert secret.hex() not in shown
        assert repr(secret) not in shown
    assert "UNBROKEN_KEY" in shown

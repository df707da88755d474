"""Encryption at rest and tamper evidence (INV-5, INV-7, INV-8, INV-11, FR-DE-15, ref §4.7)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from unbroken import (
    Context,
    ControlIntegrity,
    EncryptionRequired,
    Engine,
    IntegrityViolation,
    Intent,
    OnAmbiguous,
    PayloadTooLarge,
    ReplayIntegrity,
    Step,
    StepFailed,
)
from unbroken.cipher import Key
from unbroken.errors import ConfigurationError
from unbroken.keys import KeyRing, format_key, write_key_file
from unbroken.testing import SimulatedCrash, crash_after_step, crash_in_ambiguous_window

MARK = "PLAINTEXT-MARKER-7781"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNBROKEN_KEY", "UNBROKEN_KEY_PREVIOUS", "UNBROKEN_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="unbroken")
    yield caplog


def _engine(db: Path, **settings: Any) -> Engine:
    engine = Engine(f"sqlite:///{db}", **settings)

    async def op(label: str) -> str:
        return f"{label}:{MARK}"

    async def fail() -> None:
        raise ValueError(f"card declined {MARK}")

    @engine.workflow(name="wf")
    async def wf(ctx: Context, secret: str) -> dict[str, Any]:
        a = await ctx.step("a", op, "a")
        with contextlib.suppress(StepFailed):
            await ctx.step("boom", fail)
        pay = Step.guarded("pay", Intent.MONEY_MOVING, on_ambiguous=OnAmbiguous.RERUN)
        b = await ctx.step(pay, op, "b")
        c = await ctx.step("c", op, "c")
        return {"a": a, "b": b, "c": c, "secret": secret}

    return engine


async def _run(engine: Engine, eid: str = "x", **kw: Any) -> Any:
    async with engine:
        return await engine.run("wf", f"input {MARK}", execution_id=eid, **kw)


async def _crash(engine: Engine, eid: str, step: int, *, window: bool = False) -> None:
    inject = crash_in_ambiguous_window if window else crash_after_step
    async with engine:
        with inject(engine, step), pytest.raises(SimulatedCrash):
            await engine.run("wf", f"input {MARK}", execution_id=eid)


def _db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


def _sql(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
    return rows


async def test_no_plaintext_reaches_the_database_file(db: Path) -> None:
    result = await _run(_engine(db))
    assert result["secret"] == f"input {MARK}"
    assert MARK.encode() not in _db_bytes(db)
    assert b"card declined" not in _db_bytes(db)


async def test_a_key_file_is_created_once_beside_a_new_database(
    db: Path, logs: pytest.LogCaptureFixture
) -> None:
    await _run(_engine(db))
    await _run(_engine(db), eid="y")
    key_file = Path(str(db) + ".key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    created = [r for r in logs.records if "created a new key file" in r.getMessage()]
    assert len(created) == 1
    secret = key_file.read_text().strip().split(":")[-1]
    assert all(secret not in r.getMessage() for r in logs.records)


async def test_a_lost_key_is_refused_and_nothing_is_lost(db: Path) -> None:
    await _run(_engine(db))
    key_file = Path(str(db) + ".key")
    saved = key_file.read_bytes()
    key_file.unlink()
    before = _sql(db, "SELECT execution_id, status FROM executions")
    with pytest.raises(EncryptionRequired, match="would orphan"):
        await _run(_engine(db), eid="y")
    assert not key_file.exists()  # never a new key that silently orphans the data
    assert _sql(db, "SELECT execution_id, status FROM executions") == before
    key_file.write_bytes(saved)
    os.chmod(key_file, 0o600)
    assert (await _run(_engine(db)))["a"] == f"a:{MARK}"


async def test_a_key_that_does_not_match_the_database_is_refused_at_open(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _run(_engine(db))
    monkeypatch.setenv("UNBROKEN_KEY", format_key(Key.generate(0)))
    with pytest.raises(ConfigurationError, match="does not match"):
        await _run(_engine(db))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (base64.b64encode(b"x" * 31).decode(), "expected 32"),
        ("not base64 at all!", "not base64"),
    ],
)
async def test_a_malformed_environment_key_is_a_clear_error(
    db: Path, monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    monkeypatch.setenv("UNBROKEN_KEY", value)
    with pytest.raises(ConfigurationError, match=reason) as caught:
        await _run(_engine(db))
    assert value not in str(caught.value)


async def test_a_world_readable_key_file_is_refused(db: Path) -> None:
    await _run(_engine(db))
    os.chmod(str(db) + ".key", 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        await _run(_engine(db))


async def test_previous_key_opens_old_rows_during_a_rotation_window(db: Path) -> None:
    await _crash(_engine(db), "x", 0)
    key_file = Path(str(db) + ".key")
    old = KeyRing(Key(0, base64.b64decode(key_file.read_text().split(":")[-1])))
    write_key_file(key_file, KeyRing(Key.generate(1), old.current))
    result = await _run(_engine(db))
    assert result["a"] == f"a:{MARK}"  # step 0 was sealed under key 0 and replayed
    rows = _sql(db, "SELECT payload FROM journal WHERE payload IS NOT NULL")
    payload_ids = {row[0][0] for row in rows}
    assert payload_ids == {0, 1}


async def test_a_payload_moved_to_another_execution_fails_to_open(db: Path) -> None:
    await _run(_engine(db), eid="other")
    await _crash(_engine(db), "victim", 2)
    (other_payload,) = _sql(
        db, "SELECT payload FROM journal WHERE execution_id='other' AND step_id=0"
    )[0]
    _sql(
        db,
        "UPDATE journal SET payload=? WHERE execution_id='victim' AND step_id=0",
        (other_payload,),
    )
    with pytest.raises(ReplayIntegrity):
        await _run(_engine(db), eid="victim")
    assert _sql(db, "SELECT status FROM executions WHERE execution_id='victim'") == [("aborted",)]
    # every other execution keeps working
    assert (await _run(_engine(db), eid="fresh"))["c"] == f"c:{MARK}"


async def test_a_bit_flip_in_a_stored_payload_is_detected(db: Path) -> None:
    await _crash(_engine(db), "x", 2)
    (blob,) = _sql(db, "SELECT payload FROM journal WHERE step_id=0")[0]
    flipped = bytes([blob[0], *blob[1:-1], blob[-1] ^ 0x01])
    _sql(db, "UPDATE journal SET payload=? WHERE step_id=0", (flipped,))
    with pytest.raises(ReplayIntegrity):
        await _run(_engine(db))


async def test_a_deleted_journal_row_is_caught_on_resume(db: Path) -> None:
    await _crash(_engine(db), "x", 3)
    _sql(db, "DELETE FROM journal WHERE step_id=0")
    with pytest.raises(IntegrityViolation, match="rows deleted, duplicated or forged"):
        await _run(_engine(db))
    assert _sql(db, "SELECT status FROM executions") == [("aborted",)]


async def test_a_duplicated_journal_row_is_caught_on_resume(db: Path) -> None:
    await _crash(_engine(db), "x", 3)
    _sql(
        db,
        "INSERT INTO journal (execution_id, generation, step_id, kind, name, effect, idem_key, "
        "payload, created_at) SELECT execution_id, generation + 1, step_id, kind, name, effect, "
        "idem_key, payload, created_at FROM journal WHERE step_id = 0",
    )
    with pytest.raises(IntegrityViolation):
        await _run(_engine(db))


async def test_a_forged_high_water_mark_is_caught(db: Path) -> None:
    await _crash(_engine(db), "x", 3)
    _sql(db, "DELETE FROM journal WHERE step_id=0")
    _sql(db, "UPDATE integrity SET outcomes = outcomes - 1")
    with pytest.raises(IntegrityViolation, match="signature"):
        await _run(_engine(db))


async def test_a_forged_intent_is_caught_before_it_is_acted_on(db: Path) -> None:
    await _crash(_engine(db), "x", 2, window=True)
    _sql(db, "UPDATE journal SET hmac = NULL WHERE kind = 'intent'")
    with pytest.raises(ControlIntegrity):
        await _run(_engine(db))


async def test_oversize_stored_blobs_are_refused_before_decryption(db: Path) -> None:
    await _crash(_engine(db), "x", 2)
    _sql(db, "UPDATE journal SET payload = zeroblob(5000) WHERE step_id = 0")
    with pytest.raises(PayloadTooLarge, match="stored"):
        await _run(_engine(db, max_payload_bytes=1000))


async def test_encryption_off_is_local_only_and_warns_at_every_open(
    db: Path, logs: pytest.LogCaptureFixture
) -> None:
    await _run(_engine(db, encrypt_payloads=False))
    await _run(_engine(db, encrypt_payloads=False), eid="y")
    warnings = [r for r in logs.records if "encryption is OFF" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)
    assert MARK.encode() in _db_bytes(db)
    assert not Path(str(db) + ".key").exists()
    with pytest.raises(ConfigurationError, match="written without encryption"):
        await _run(_engine(db))


async def test_an_encrypted_database_cannot_be_opened_with_encryption_off(db: Path) -> None:
    await _run(_engine(db))
    with pytest.raises(ConfigurationError, match="holds encrypted data"):
        await _run(_engine(db, encrypt_payloads=False))


async def test_no_secret_or_payload_in_any_log_record_or_error(
    db: Path, logs: pytest.LogCaptureFixture
) -> None:
    await _crash(_engine(db), "x", 2)
    _sql(db, "DELETE FROM journal WHERE step_id=0")
    errors: list[str] = []
    try:
        await _run(_engine(db))
    except Exception as exc:
        errors.append(str(exc))
    secret = Path(str(db) + ".key").read_text().strip().split(":")[-1]
    texts = errors + [r.getMessage() for r in logs.records]
    assert texts
    assert all(MARK not in t and secret not in t for t in texts)
    await asyncio.sleep(0)


async def test_postgresql_refuses_to_run_without_a_key_inv8(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ..storage.conftest import POSTGRES_URL, fresh_schema, schema_url

    if not POSTGRES_URL:
        pytest.skip("UNBROKEN_TEST_POSTGRES_URL is not set")
    with fresh_schema() as schema:
        url = schema_url(schema)
        with pytest.raises(EncryptionRequired, match="no key"):
            async with Engine(url):
                pass
        with pytest.raises(EncryptionRequired, match="required"):
            async with Engine(url, encrypt_payloads=False):
                pass
        monkeypatch.setenv("UNBROKEN_KEY", base64.b64encode(os.urandom(32)).decode())
        async with Engine(url) as engine:  # with a key it runs
            assert await engine.get_execution("nothing") is None

"""``unbroken show --reveal`` and ``unbroken rotate-key`` (INV-5, rotation window)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from unbroken import Context, Engine
from unbroken.cli import REVEAL_WARNING, main
from unbroken.keys import read_key_file

SECRET = "REVEAL-ME-4411"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNBROKEN_KEY", "UNBROKEN_KEY_PREVIOUS", "UNBROKEN_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def _run(db: Path, eid: str = "x") -> None:
    engine = Engine(f"sqlite:///{db}")

    @engine.workflow(name="wf")
    async def wf(ctx: Context, who: str) -> str:
        return str(await ctx.step("greet", lambda: f"hello {who} {SECRET}"))

    async def main_() -> None:
        async with engine:
            await engine.run(wf, "ada", execution_id=eid)

    asyncio.run(main_())


def _cli(db: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--db", f"sqlite:///{db}", *args])
    return result.exit_code, result.stdout, result.stderr


def test_show_prints_payloads_only_with_reveal_after_a_warning(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _run(db)
    code, out, err = _cli(db, "show", "x")
    assert code == 0 and SECRET not in out + err
    code, out, err = _cli(db, "show", "x", "--reveal")
    assert code == 0
    assert SECRET in out and REVEAL_WARNING in err
    code, out, err = _cli(db, "show", "x", "--reveal", "--json")
    document = json.loads(out)
    assert any(SECRET in str(v) for v in document["payloads"].values())
    assert document["payloads"]["inputs"]["args"]["$t"][0] == "tuple"


def test_rotate_key_keeps_old_data_readable_and_new_writes_use_the_new_key(
    tmp_path: Path,
) -> None:
    db = tmp_path / "u.db"
    _run(db, "before")
    key_file = Path(str(db) + ".key")
    old = read_key_file(key_file).current
    code, out, _ = _cli(db, "rotate-key", "--dry-run")
    assert code == 0 and "would rotate" in out
    assert read_key_file(key_file).current == old
    code, out, _ = _cli(db, "rotate-key")
    assert code == 0 and "new key id 1" in out
    ring = read_key_file(key_file)
    assert ring.current.key_id == 1 and ring.previous == old
    _run(db, "after")  # new writes under key 1
    code, out, _ = _cli(db, "show", "before", "--reveal")
    assert code == 0 and SECRET in out  # old rows open with the previous key
    code, out, err = _cli(db, "rotate-key")
    assert code == 2 and "previous key is still configured" in err


def test_drop_previous_is_refused_while_data_needs_it_and_says_how_many(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _run(db, "before")
    assert _cli(db, "rotate-key")[0] == 0
    code, _, err = _cli(db, "rotate-key", "--drop-previous")
    assert code == 1
    assert "stored values still need the previous key (id 0)" in err
    count = int(err.split("refused: ")[1].split()[0])
    assert count > 0
    assert read_key_file(Path(str(db) + ".key")).previous is not None


def test_drop_previous_succeeds_once_nothing_needs_it(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _run(db, "before")
    assert _cli(db, "rotate-key")[0] == 0
    _run(db, "after")
    with closing(sqlite3.connect(db)) as conn:  # what pruning "before" will do
        for table in ("journal", "integrity", "executions"):
            conn.execute(f"DELETE FROM {table} WHERE execution_id = 'before'")
        conn.commit()
    code, out, _ = _cli(db, "rotate-key", "--drop-previous", "--dry-run")
    assert code == 0 and "would drop" in out
    assert read_key_file(Path(str(db) + ".key")).previous is not None
    code, out, _ = _cli(db, "rotate-key", "--drop-previous")
    assert code == 0 and "dropped the previous key (id 0)" in out
    assert read_key_file(Path(str(db) + ".key")).previous is None
    code, out, _ = _cli(db, "show", "after", "--reveal")
    assert code == 0 and SECRET in out


def test_rotate_key_refuses_keys_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "u.db"
    _run(db)
    key = Path(str(db) + ".key").read_text().strip()
    monkeypatch.setenv("UNBROKEN_KEY", key)
    code, _, err = _cli(db, "rotate-key")
    assert code == 2 and "UNBROKEN_KEY" in err
    assert key.split(":")[-1] not in err

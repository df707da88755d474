"""The ``unbroken`` command line on a real database (SPEC §6, INV-5).

The database is built by a real ``Engine`` run; the CLI then reads it with no application
running. Payloads never reach the output: the workflow journals ``SECRET`` as a step result,
an error message and an execution output, and no command may print it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from unbroken import Context, Engine, Intent, Step, StepFailed, current_step
from unbroken.cli import main
from unbroken.ids import idempotency_key
from unbroken.storage.url import open_storage

SECRET = "TOP-SECRET-PAYLOAD"
_CHARGE = Step.guarded("charge", Intent.COST_BEARING)
_CHARGE_KEY_PREFIX = idempotency_key("order-1", 1, _CHARGE.key_input)[:8].hex()


def _secret() -> str:
    return SECRET


def _charge() -> str:
    assert current_step().idempotency_key_hex.startswith(_CHARGE_KEY_PREFIX)
    return SECRET


def _boom() -> None:
    raise ValueError(SECRET)


async def _build(url: str) -> None:
    engine = Engine(url)

    @engine.workflow(name="checkout")
    async def checkout(ctx: Context, cart: str) -> str:
        await ctx.step("load_cart", _secret)
        await ctx.step(_CHARGE, _charge)
        await asyncio.gather(ctx.step("quote_a", _secret), ctx.step("quote_b", _secret))
        return SECRET

    @engine.workflow(name="broken")
    async def broken(ctx: Context) -> None:
        await ctx.step("explode", _boom)

    async with engine:
        assert await engine.run(checkout, SECRET, execution_id="order-1") == SECRET
        with pytest.raises(StepFailed):
            await engine.run(broken, execution_id="order-2")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with one completed, one failed and one running execution."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'journal.db'}"
    asyncio.run(_build(url))
    storage = open_storage(url)
    storage.open()
    try:
        storage.create_execution("order-3", "checkout", b"", 0)  # left running
    finally:
        storage.close()
    return url


Invoke = Callable[..., Result]


@pytest.fixture
def cli() -> Invoke:
    """Run the CLI in-process; stdout and stderr stay apart."""

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def _no_leak(result: Result) -> None:
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_list_prints_an_aligned_table(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "list")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["EXECUTION", "ID", "WORKFLOW", "STATUS"]
    assert {line.split()[0] for line in lines[1:]} == {"order-1", "order-2", "order-3"}
    status_column = lines[0].index("STATUS")
    assert {line[status_column:].split()[0] for line in lines[1:]} == {
        "completed",
        "failed",
        "running",
    }
    assert result.stderr == ""
    _no_leak(result)


def test_list_json_is_only_a_json_array(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "list", "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)  # the whole of stdout parses
    assert isinstance(rows, list)
    by_id = {row["execution_id"]: row for row in rows}
    assert set(by_id) == {"order-1", "order-2", "order-3"}
    for row in rows:
        assert set(row) == {
            "execution_id",
            "workflow",
            "status",
            "steps",
            "created_at",
            "finalized_at",
        }
    done = by_id["order-1"]
    assert (done["workflow"], done["status"], done["steps"]) == ("checkout", "completed", 4)
    assert by_id["order-2"]["status"] == "failed"
    assert by_id["order-3"]["finalized_at"] is None
    for stamp in (done["created_at"], done["finalized_at"], by_id["order-3"]["created_at"]):
        parsed = datetime.fromisoformat(stamp)
        assert parsed.utcoffset() == timedelta(0)
    _no_leak(result)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("completed", {"order-1"}),
        ("failed", {"order-2"}),
        ("running", {"order-3"}),
        ("canceled", set()),
    ],
)
def test_list_status_filter(cli: Invoke, db: str, status: str, expected: set[str]) -> None:
    result = cli("--db", db, "list", "--json", "--status", status)
    assert result.exit_code == 0, result.stderr
    assert {row["execution_id"] for row in json.loads(result.stdout)} == expected


def test_list_limit(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "list", "--json", "--limit", "2")
    assert len(json.loads(result.stdout)) == 2


def test_list_bad_status_is_a_usage_error(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "list", "--status", "bogus")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


def test_show_prints_steps_and_key_prefixes_not_payloads(cli: Invoke, db: str) -> None:
    """INV-5: metadata only; the key prefix is the one the running step forwarded."""
    result = cli("--db", db, "show", "order-1")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "order-1" in lines[0] and "checkout" in lines[1] and "completed" in lines[2]
    for name in ("load_cart", "charge", "quote_a", "quote_b"):
        assert name in result.stdout
    charge_rows = [line.split() for line in lines if " charge " in line]
    assert [row[4] for row in charge_rows] == ["intent", "result"]
    assert all(row[3] == "exactly_once_guarded" for row in charge_rows)
    assert all(row[-1] == _CHARGE_KEY_PREFIX for row in charge_rows)
    _no_leak(result)


def test_show_json(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "show", "order-2", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["execution_id"], info["status"], info["error_type"]) == (
        "order-2",
        "failed",
        "StepFailed",
    )
    (row,) = info["journal"]
    assert (row["step_id"], row["name"], row["kind"]) == (0, "explode", "error")
    assert row["payload_bytes"] > 0
    datetime.fromisoformat(info["finalized_at"])
    _no_leak(result)


@pytest.mark.parametrize("command", ["list", "show order-1", "show order-2", "show order-3"])
@pytest.mark.parametrize("as_json", [False, True])
def test_no_command_prints_a_payload(cli: Invoke, db: str, command: str, as_json: bool) -> None:
    """INV-5: results, inputs, outputs and error messages all hold SECRET; none is shown."""
    result = cli("--db", db, *command.split(), *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.stderr
    _no_leak(result)


def test_show_unknown_id_exits_1(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "show", "x")
    assert result.exit_code == 1
    assert "no execution with id 'x'" in result.stderr
    assert result.stdout == ""


def test_show_unknown_id_json_keeps_stdout_clean(cli: Invoke, db: str) -> None:
    result = cli("--db", db, "show", "x", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""


def test_missing_database_is_reported_not_created(cli: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    for args in (["list"], ["list", "--json"], ["show", "x"]):
        result = cli("--db", f"sqlite:///{path}", *args)
        assert result.exit_code == 2
        assert result.stderr.startswith("error: ")
        assert "does not exist" in result.stderr
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_default_url_comes_from_the_environment(
    cli: Invoke, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNBROKEN_DATABASE_URL", db)
    result = cli("list", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)) == 3


def test_default_url_is_relative_and_never_created(
    cli: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UNBROKEN_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    result = cli("list")
    assert result.exit_code == 2
    assert "unbroken.db" in result.stderr
    assert not (tmp_path / "unbroken.db").exists()


def test_a_file_that_is_not_a_database(cli: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are not the tables you are looking for\n" * 100)
    result = cli("--db", f"sqlite:///{path}", "list")
    assert result.exit_code == 2
    assert "is not an unbroken database" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_text().startswith("these are not")


def test_a_foreign_sqlite_database(cli: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    result = cli("--db", f"sqlite:///{path}", "show", "x")
    assert result.exit_code == 2
    assert "is not an unbroken database" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:s3cr3t-pw@db.example/app",
        "postgres://alice:s3cr3t-pw@db.example/app?sslmode=require",
        "postgresql://db.example/app?password=s3cr3t-pw",
        "memory://alice:s3cr3t-pw@somewhere",
    ],
)
def test_a_password_is_never_printed(cli: Invoke, url: str) -> None:
    result = cli("--db", url, "list")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "s3cr3t-pw" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_url_without_scheme(cli: Invoke) -> None:
    result = cli("--db", "unbroken.db", "list")
    assert result.exit_code == 2
    assert "scheme" in result.stderr


def test_unknown_command_is_a_usage_error(cli: Invoke) -> None:
    assert cli("frobnicate").exit_code == 2


def test_every_command_has_help() -> None:
    assert main.help
    assert main.commands
    for name, command in main.commands.items():
        assert command.help, f"{name} has no docstring help"
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, name
        assert f"{name} [OPTIONS]" in result.stdout
        assert " ".join(command.help.split()[:3]) in result.stdout


def test_main_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in main.commands:
        assert name in result.stdout
    assert isinstance(main, click.Group)


def test_python_dash_m_unbroken(db: str) -> None:
    """``python -m unbroken`` is the same CLI, with real exit codes and streams."""
    ok = subprocess.run(
        [sys.executable, "-m", "unbroken", "--db", db, "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)) == 3
    missing = subprocess.run(
        [sys.executable, "-m", "unbroken", "--db", db, "show", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no execution with id 'nope'"

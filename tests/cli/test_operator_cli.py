"""``unbroken cancel``, ``unbroken resolve`` and ``unbroken prune`` on a real database
(SPEC §6, INV-9, INV-15, INV-16').

Each database is built by a real ``Engine`` on a temporary SQLite file; the CLI then
changes it with no application running, and a later engine sees the change.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from unbroken import Context, Engine, ExecutionCanceled, StepFailed
from unbroken.cli import main
from unbroken.ids import lock_name
from unbroken.ownership import Ownership
from unbroken.testing import SimulatedCrash, crash_after_step

SECRET = "SECRET-VALUE-5521"


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "UNBROKEN_KEY",
        "UNBROKEN_KEY_PREVIOUS",
        "UNBROKEN_KEY_FILE",
        "UNBROKEN_RESOLVER_TOKEN",
        "UNBROKEN_DATABASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)


def _cli(db: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["--db", f"sqlite:///{db}", *args])
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def _status(db: Path, eid: str) -> str:
    code, out, _ = _cli(db, "show", eid, "--json")
    assert code == 0
    return str(json.loads(out)["status"])


# -- cancel -------------------------------------------------------------------------------


def _one_step(engine: Engine) -> Any:
    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> int:
        first = await ctx.step("a", lambda: 1)
        return int(await ctx.step("b", lambda: first + 1))

    return wf


def _orphan_and_completed(db: Path) -> None:
    """``orphan`` left running by a crash after step 0; ``done`` completed."""
    engine = Engine(f"sqlite:///{db}")
    wf = _one_step(engine)

    async def go() -> None:
        async with engine:
            with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
                await engine.run(wf, execution_id="orphan")
            assert await engine.run(wf, execution_id="done") == 2

    asyncio.run(go())


def _lock_file(db: Path, eid: str) -> Path:
    return Path(f"{db}.locks") / f"{lock_name(eid)}.lock"


def test_cancel_an_orphan_and_it_never_resumes(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _orphan_and_completed(db)
    assert _status(db, "orphan") == "running"
    assert _lock_file(db, "orphan").exists()
    code, out, err = _cli(db, "cancel", "orphan")
    assert (code, out, err) == (0, "canceled orphan\n", "")
    assert _status(db, "orphan") == "canceled"
    assert not _lock_file(db, "orphan").exists()  # it ended: its lock file went with it
    code, out, _ = _cli(db, "cancel", "orphan")
    assert (code, out) == (0, "orphan is already canceled\n")

    engine = Engine(f"sqlite:///{db}")
    wf = _one_step(engine)

    async def again() -> None:
        async with engine:  # recovery does not resume it either
            with pytest.raises(ExecutionCanceled):
                await engine.run(wf, execution_id="orphan")

    asyncio.run(again())
    assert _status(db, "orphan") == "canceled"


def test_cancel_of_a_completed_execution_leaves_it_completed(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _orphan_and_completed(db)
    code, out, _ = _cli(db, "cancel", "done")
    assert (code, out) == (0, "done is already completed\n")
    assert _status(db, "done") == "completed"


def test_cancel_of_an_unknown_id_exits_1(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _orphan_and_completed(db)
    code, out, err = _cli(db, "cancel", "nope")
    assert (code, out) == (1, "")
    assert "no execution with id 'nope'" in err


def test_cancel_is_refused_while_a_live_owner_holds_the_execution(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _orphan_and_completed(db)
    # A separate Ownership has its own flock: it conflicts like another process would.
    with Ownership(Path(str(db) + ".locks")).acquire("orphan"):
        code, out, err = _cli(db, "cancel", "orphan")
        assert (code, out) == (1, "")
        assert "'orphan'" in err and f"pid {os.getpid()}" in err
        assert len(err.strip().splitlines()) == 1
        assert _status(db, "orphan") == "running"
    code, out, _ = _cli(db, "cancel", "orphan")  # once released, it goes through
    assert (code, out) == (0, "canceled orphan\n")


def test_cancel_of_a_missing_database_is_reported_not_created(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    code, _, err = _cli(db, "cancel", "x")
    assert code == 2 and "error:" in err
    assert not db.exists()


# -- resolve ------------------------------------------------------------------------------

PROMISES: dict[str, tuple[str, bytes]] = {}


def _approval(engine: Engine) -> Any:
    @engine.workflow(name="approval")
    async def approval(ctx: Context) -> Any:
        p = await ctx.promise("approval")
        if p.token is not None:  # only the run that created it knows the token
            PROMISES[ctx.execution_id] = (p.id, p.token)
        try:
            return await p
        except StepFailed as exc:
            return {"failed": exc.error_type, "message": exc.message}

    return approval


def _waiting(db: Path, eid: str) -> tuple[str, str]:
    """Start an execution that waits on a promise, then stop the engine (it stays
    running); return the promise id and its token in hex."""
    PROMISES.pop(eid, None)
    engine = Engine(f"sqlite:///{db}")
    wf = _approval(engine)

    async def go() -> None:
        async with engine:
            await engine.start(wf, execution_id=eid)
            for _ in range(500):
                if eid in PROMISES:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(go())
    pid, token = PROMISES[eid]
    return pid, token.hex()


def _resume(db: Path, eid: str) -> Any:
    """A new engine resumes the execution; its result."""
    engine = Engine(f"sqlite:///{db}")
    wf = _approval(engine)

    async def go() -> Any:
        async with engine:
            return await asyncio.wait_for(engine.run(wf, execution_id=eid), 10)

    return asyncio.run(go())


def test_resolve_delivers_the_value_to_the_next_engine(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r1")
    assert _status(db, "r1") == "running"
    code, out, err = _cli(db, "resolve", pid, "--token", token, "--value", '{"ok": true}')
    assert (code, out) == (0, f"resolved {pid}\n")
    assert token not in out + err
    code, out, err = _cli(db, "resolve", pid, "--token", token, "--value", "2")
    assert (code, out) == (0, f"{pid} was already settled\n")
    assert _resume(db, "r1") == {"ok": True}
    assert _status(db, "r1") == "completed"


def test_resolve_with_a_wrong_token_exits_1_and_never_prints_it(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r2")
    wrong = "ab" * 32
    code, out, err = _cli(db, "resolve", pid, "--token", wrong, "--value", "1")
    assert code == 1 and out == ""
    assert wrong not in err and token not in err and "token" in err
    assert json.loads(_cli(db, "show", "r2", "--json")[1])["status"] == "running"
    code, _, _ = _cli(db, "resolve", pid, "--token", token, "--value", "1")
    assert code == 0  # the promise was left pending


@pytest.mark.parametrize(
    "bad",
    ["not-a-token-at-all-0123", "AB" * 32, "zz" * 32, "ab" * 31],
)
def test_resolve_with_a_malformed_token_exits_2_and_never_prints_it(
    tmp_path: Path, bad: str
) -> None:
    db = tmp_path / "u.db"
    pid, _ = _waiting(db, "r3")
    code, out, err = _cli(db, "resolve", pid, "--token", bad, "--value", "1")
    assert code == 2 and out == ""
    assert bad not in err and "token" in err


def test_a_token_given_in_the_wrong_place_is_not_echoed(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r4")
    code, out, err = _cli(db, "resolve", pid, token, "--value", "1")
    assert code == 2 and token not in out + err


@pytest.mark.parametrize("value", ["{not json", f'{{"a": "{SECRET}"', "NaN", ""])
def test_resolve_with_invalid_json_exits_2_without_echoing_it(tmp_path: Path, value: str) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r5")
    code, out, err = _cli(db, "resolve", pid, "--token", token, "--value", value)
    assert code == 2 and out == ""
    assert "not valid JSON" in err
    assert SECRET not in err and token not in err
    assert _cli(db, "resolve", pid, "--token", token, "--value", "1")[0] == 0  # still pending


def test_resolve_of_an_unknown_promise_exits_1(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _, token = _waiting(db, "r6")
    code, out, err = _cli(db, "resolve", "no-such-promise", "--token", token, "--value", "1")
    assert code == 1 and out == ""
    assert "'no-such-promise'" in err and token not in err


def test_resolve_of_a_canceled_execution_s_promise_exits_1(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r7")
    assert _cli(db, "cancel", "r7")[0] == 0
    code, _, err = _cli(db, "resolve", pid, "--token", token, "--value", "1")
    assert code == 1 and token not in err


def test_reject_makes_the_waiter_see_step_failed(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r8")
    code, out, _ = _cli(db, "resolve", pid, "--token", token, "--reject", "not approved")
    assert (code, out) == (0, f"rejected {pid}\n")
    assert _resume(db, "r8") == {"failed": "Rejected", "message": "not approved"}


def test_the_token_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r9")
    code, _, err = _cli(db, "resolve", pid, "--value", "1")
    assert code == 2 and "UNBROKEN_RESOLVER_TOKEN" in err
    monkeypatch.setenv("UNBROKEN_RESOLVER_TOKEN", token)
    code, out, err = _cli(db, "resolve", pid, "--value", f'"{SECRET}"')
    assert (code, out) == (0, f"resolved {pid}\n")
    assert token not in out + err and SECRET not in out + err
    assert _resume(db, "r9") == SECRET


@pytest.mark.parametrize("extra", [[], ["--value", "1", "--reject", "no"]], ids=["neither", "both"])
def test_resolve_needs_exactly_one_of_value_and_reject(tmp_path: Path, extra: list[str]) -> None:
    db = tmp_path / "u.db"
    pid, token = _waiting(db, "r10")
    code, out, err = _cli(db, "resolve", pid, "--token", token, *extra)
    assert code == 2 and out == "" and token not in err
    assert "--value" in err and "--reject" in err


def test_resolve_help_names_the_environment_variable() -> None:
    result = CliRunner().invoke(main, ["resolve", "--help"])
    assert result.exit_code == 0 and "UNBROKEN_RESOLVER_TOKEN" in result.stdout


# -- prune --------------------------------------------------------------------------------


def _completed_and_running(db: Path) -> None:
    _orphan_and_completed(db)
    time.sleep(0.01)  # the completed one ends strictly before the prune's "now"


def test_prune_removes_a_completed_execution_past_its_ttl_and_keeps_a_running_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "u.db"
    _completed_and_running(db)
    _lock_file(db, "done").write_text("1\n")  # as versions that kept lock files left it
    monkeypatch.setenv("UNBROKEN_TTL_COMPLETED_SECS", "0")
    code, out, err = _cli(db, "prune", "--dry-run")
    assert code == 0 and err == ""
    assert out.startswith("would prune 1 execution (") and "1 by TTL" in out
    assert _status(db, "done") == "completed"  # the dry run changed nothing
    assert _lock_file(db, "done").exists()
    code, out, _ = _cli(db, "prune")
    assert code == 0 and out.startswith("pruned 1 execution (") and "1 by TTL" in out
    assert _cli(db, "show", "done")[0] == 1
    assert not _lock_file(db, "done").exists()
    assert _status(db, "orphan") == "running"
    assert _lock_file(db, "orphan").exists()
    code, out, _ = _cli(db, "prune")
    assert code == 0 and out.startswith("pruned 0 executions (0 journal rows)")


def test_prune_json_is_only_a_json_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "u.db"
    _completed_and_running(db)
    monkeypatch.setenv("UNBROKEN_TTL_COMPLETED_SECS", "0")
    code, out, _ = _cli(db, "prune", "--dry-run", "--json")
    assert code == 0
    dry = json.loads(out)
    assert dry["dry_run"] is True and dry["executions"] == 1 and dry["by_ttl"] == 1
    assert dry["journal_rows"] >= 2 and dry["by_count_cap"] == dry["by_size_cap"] == 0
    code, out, _ = _cli(db, "prune", "--json")
    assert code == 0
    done = json.loads(out)
    assert {**done, "dry_run": True} == dry


def test_prune_with_the_default_policy_keeps_recent_executions(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    _completed_and_running(db)
    code, out, _ = _cli(db, "prune")
    assert code == 0 and out.startswith("pruned 0 executions")
    assert _status(db, "done") == "completed"


def test_prune_with_a_bad_setting_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "u.db"
    _completed_and_running(db)
    monkeypatch.setenv("UNBROKEN_TTL_COMPLETED_SECS", "soon")
    code, out, err = _cli(db, "prune", "--json")
    assert code == 2 and out == "" and "error:" in err

"""``unbroken worker APP``: a real worker process drains a queue and stops on SIGTERM (SPEC §6)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from unbroken import Engine
from unbroken.cli import main

APP = textwrap.dedent(
    """
    import os
    from unbroken import Context, Engine

    engine = Engine(os.environ["APP_DB"], worker_poll_interval_secs=0.1)

    @engine.workflow(name="double")
    async def double(ctx: Context, n: int) -> int:
        return await ctx.step("double", lambda: 2 * n)

    not_an_engine = 42
    """
)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "queue_app.py").write_text(APP)
    for name in ("UNBROKEN_KEY", "UNBROKEN_KEY_FILE", "UNBROKEN_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the worker puts the cwd first
    yield tmp_path
    sys.modules.pop("queue_app", None)


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", "no-colon"], "module:attribute"),
        (["worker", "no_such_module_xyz:engine"], "cannot import"),
        (["worker", "queue_app:missing"], "no attribute"),
        (["worker", "queue_app:not_an_engine"], "not an unbroken Engine"),
        (["--db", "sqlite:///x.db", "worker", "queue_app:engine"], "--db does not apply"),
        (["worker", "queue_app:engine", "--concurrency", "0"], "0"),
    ],
)
def test_bad_worker_arguments_are_usage_errors(
    app_dir: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(app_dir)
    monkeypatch.setenv("APP_DB", f"sqlite:///{app_dir / 'app.db'}")
    code, err = _invoke(*args)
    assert code == 2
    assert message in err


def test_the_worker_drains_the_queue_and_exits_0_on_sigterm(app_dir: Path) -> None:
    url = f"sqlite:///{app_dir / 'app.db'}"

    async def enqueue() -> list[str]:
        engine = Engine(url)
        engine.workflow(name="double")(_double)
        async with engine:
            return [await engine.enqueue("double", n) for n in range(10)]

    ids = asyncio.run(enqueue())
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
    env["APP_DB"] = url
    proc = subprocess.Popen(
        [sys.executable, "-m", "unbroken", "worker", "queue_app:engine", "--concurrency", "3"],
        cwd=app_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _all_done(url, ids):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker did not drain the queue"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr
        assert "10 claimed, 10 ended" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    async def outputs() -> list[int]:
        engine = Engine(url)
        engine.workflow(name="double")(_double)
        async with engine:
            return [await engine.run("double", execution_id=eid) for eid in ids]

    assert asyncio.run(outputs()) == [2 * n for n in range(10)]


async def _double(ctx: object, n: int) -> int:  # never runs here: the worker runs it
    raise AssertionError("the test process must not run queued work")


def _all_done(url: str, ids: list[str]) -> bool:
    async def check() -> bool:
        async with Engine(url) as engine:
            infos = [await engine.get_execution(eid) for eid in ids]
        return all(i is not None and i.status == "completed" for i in infos)

    return asyncio.run(check())

"""Timers and promises across real process deaths (FR-DE-06, FR-DE-05)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.crash

SCRIPT = r"""
import asyncio, json, sys, time
from unbroken import Context, Engine

db, mode = sys.argv[1], sys.argv[2]
engine = Engine(f"sqlite:///{db}", promise_poll_interval_secs=0.05)

@engine.workflow(name="sleeper")
async def sleeper(ctx: Context) -> str:
    await ctx.step("before", lambda: None)
    await ctx.sleep(2)
    return "woke"

@engine.workflow(name="waiter")
async def waiter(ctx: Context) -> object:
    p = await ctx.promise("approval")
    if p.token is not None:
        print(json.dumps({"promise": p.id, "token": p.token.hex()}), flush=True)
    return await p

async def main() -> None:
    async with engine:
        if mode == "resume":
            ids = sys.argv[3:]
            started = time.monotonic()
            results = [await engine.run(i.split(":")[0], execution_id=i.split(":")[1]) for i in ids]
            print(json.dumps({"results": results, "secs": time.monotonic() - started}), flush=True)
            return
        handle = await engine.start(mode, execution_id=f"{mode}-1")
        print(json.dumps({"started": handle.execution_id}), flush=True)
        await handle.result()

asyncio.run(main())
"""


@contextmanager
def _spawn(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A worker process; killed and reaped (pipes closed) however the test ends."""
    script = tmp_path / "w.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "w.db"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def _line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    return json.loads(line)  # type: ignore[no-any-return]


def _finish(tmp_path: Path, *args: str) -> dict[str, object]:
    with _spawn(tmp_path, *args) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_killed_during_a_two_second_sleep_and_restarted_later_finishes_at_once(
    tmp_path: Path,
) -> None:
    with _spawn(tmp_path, "sleeper") as proc:
        _line(proc)
        time.sleep(0.5)  # inside the sleep: the timer is armed
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(3)  # nobody runs while the timer comes due
    done = _finish(tmp_path, "resume", "sleeper:sleeper-1")
    assert done["results"] == ["woke"]
    assert float(done["secs"]) < 1.0  # fired at once on resume (FR-DE-06)


def test_a_promise_resolved_while_no_process_runs_is_delivered_on_the_next_start(
    tmp_path: Path,
) -> None:
    with _spawn(tmp_path, "waiter") as proc:
        _line(proc)
        promise = _line(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    resolve = subprocess.run(
        [
            sys.executable,
            "-m",
            "unbroken",
            "--db",
            f"sqlite:///{tmp_path / 'w.db'}",
            "resolve",
            str(promise["promise"]),
            "--value",
            '{"approved": true}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")},
            "UNBROKEN_RESOLVER_TOKEN": str(promise["token"]),
        },
    )
    assert resolve.returncode == 0, resolve.stderr
    assert str(promise["token"]) not in resolve.stdout + resolve.stderr
    done = _finish(tmp_path, "resume", "waiter:waiter-1")
    assert done["results"] == [{"approved": True}]


def test_a_promise_resolved_by_another_process_wakes_the_live_waiter(tmp_path: Path) -> None:
    with _spawn(tmp_path, "waiter") as proc:
        _line(proc)
        promise = _line(proc)
        started = time.monotonic()
        resolve = subprocess.run(
            [
                sys.executable,
                "-m",
                "unbroken",
                "--db",
                f"sqlite:///{tmp_path / 'w.db'}",
                "resolve",
                str(promise["promise"]),
                "--token",
                str(promise["token"]),
                "--value",
                "7",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")},
        )
        assert resolve.returncode == 0, resolve.stderr
        proc.wait(10)  # the waiter saw it by polling and finished
        assert time.monotonic() - started < 8
        assert proc.returncode == 0

"""A real process SIGKILLed right after a step returns (SPEC §9): under
``journal_ack_every_step`` nothing it returned is lost and no finished step runs again;
without it, buffered results not yet group committed are lost and their steps re-run."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest

pytestmark = pytest.mark.crash

WORKER = Path(__file__).with_name("ack_worker.py")
STEPS = 10
KILL_AFTER = 5


def _run(tmp_path: Path, acked: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNBROKEN_")}
    if acked:
        env["UNBROKEN_JOURNAL_ACK_EVERY_STEP"] = "1"
    args = [
        sys.executable, str(WORKER), str(tmp_path / "journal.db"), str(tmp_path / "ops.log"),
        "--steps", str(STEPS), "--kill-after", str(KILL_AFTER),
        "--marker", str(tmp_path / "killed.marker"),
    ]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)


def _results(db: Path) -> list[int]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT step_id FROM journal WHERE kind = 'result' ORDER BY step_id"
        ).fetchall()
    return [int(step) for (step,) in rows]


def _runs(tmp_path: Path) -> Counter[int]:
    return Counter(int(line) for line in (tmp_path / "ops.log").read_text().split())


@pytest.mark.parametrize("acked", [True, False], ids=["ack-every-step", "buffered"])
def test_a_kill_right_after_a_step_returns(tmp_path: Path, acked: bool) -> None:
    killed = _run(tmp_path, acked)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = list(range(KILL_AFTER + 1))
    # acknowledged: every step that returned is in the journal; buffered: none yet
    assert _results(tmp_path / "journal.db") == (done if acked else [])

    resumed = _run(tmp_path, acked)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1]) == {"result": STEPS}
    assert _results(tmp_path / "journal.db") == list(range(STEPS))
    again = 1 if acked else 2  # how often each step that had returned ran in all
    assert _runs(tmp_path) == Counter({i: again if i in done else 1 for i in range(STEPS)})

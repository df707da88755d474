"""The worker-scaling harness works on PostgreSQL (no timings are asserted: figures live in
bench/results). Skipped without ``UNBROKEN_TEST_POSTGRES_URL``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not os.environ.get("UNBROKEN_TEST_POSTGRES_URL"),
    reason="UNBROKEN_TEST_POSTGRES_URL is not set",
)


def test_the_worker_harness_drains_a_queue_with_one_and_two_workers(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "workers.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (table,) = tmp_path.glob("*-workers.md")
    text = table.read_text()
    assert "| system | workers | executions/s |" in text
    assert "unbroken, guarded steps" in text
    (raw,) = tmp_path.glob("*-workers.json")
    report = json.loads(raw.read_text())
    assert not report["errors"]
    assert {(r["system"], r["workers"]) for r in report["rows"]} == {
        (s, k) for s in ("unbroken", "unbroken-guarded") for k in (1, 2)
    }
    for row in report["rows"]:  # every execution ran its three steps
        (run,) = row["runs"]
        assert run["steps_recorded"] == 3 * run["executions"]

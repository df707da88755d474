"""``unbroken demo``: a real SIGKILL mid-run, then a resume that replays (SPEC §6, §9)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.crash
def test_demo_proves_crash_and_resume() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unbroken", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert proc.stderr == ""
    assert "paid call: 1 request, 1 operation performed" in out
    assert "PROOF HOLDS" in out
    assert "KILLED here (SIGKILL)" in out
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s+\d+\s+\w", line)}
    for name in ("fetch_order", "quote_a", "quote_b", "quote_c", "paid_call"):
        assert rows[name].rstrip().endswith("replayed from the journal"), rows[name]
    assert "KILLED" in rows["write_report"]
    assert rows["send_receipt"].rstrip().endswith("ran")
    pids = re.findall(r"run [12] \(pid (\d+)\)", out)
    assert len(set(pids)) == 2  # two different processes

"""Fixtures of the engine tests shared by several modules: a lock directory, and a real
other process owning an execution through it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import unbroken

EXECUTION = "order-42"

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from unbroken.ownership import Ownership

    lock = Ownership(Path(sys.argv[1])).acquire(sys.argv[2])
    print("locked", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "app.db.locks"


def subprocess_env() -> dict[str, str]:
    """This environment, with this checkout's ``unbroken`` first on the import path."""
    env = dict(os.environ)
    src = str(Path(unbroken.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def holder(lock_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A real other process that owns EXECUTION through the library."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), EXECUTION],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)

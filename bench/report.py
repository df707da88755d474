"""What the benchmark reports share: the measured commit and the section that lists what
did not run."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def tree_state() -> str:
    """The commit unbroken was measured at, and whether src/ differed from it."""
    git = ["git", "-C", str(_REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes in src/" if dirty.stdout.strip() else "")


def not_run(nothing: str, groups: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """The "Not run" section: ``- <label>: <what>`` for each item of each group, or the
    ``nothing`` sentence when every group is empty."""
    items = [f"- {label}: {what}" for label, whats in groups for what in whats]
    return ["", "## Not run", "", *(items or [nothing])]

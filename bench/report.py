"""What the comparison reports share: the section that lists what did not run."""

from __future__ import annotations

from collections.abc import Iterable


def not_run(nothing: str, groups: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """The "Not run" section: ``- <label>: <what>`` for each item of each group, or the
    ``nothing`` sentence when every group is empty."""
    items = [f"- {label}: {what}" for label, whats in groups for what in whats]
    return ["", "## Not run", "", *(items or [nothing])]

"""Time as the engine sees it: the system clock, or a virtual one in tests (layer: engine).

Durable timers and promise deadlines are absolute Unix times. Waiting for one holds no
thread and no busy loop: a coroutine sleeps on the event loop until the deadline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """What the engine needs of time."""

    def now(self) -> float:
        """Unix time in seconds."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline`` (at once if it already is)."""
        ...


class SystemClock:
    """Wall-clock time and ``asyncio.sleep``."""

    def now(self) -> float:
        """Unix time in seconds."""
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        """Sleep on the event loop until ``deadline``; a clock step backwards is re-checked."""
        # A durable deadline on the wall clock: re-checked if the clock stepped meanwhile.
        while (delay := deadline - time.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)

"""The worker loop: claim queued executions and run them until told to stop (layer: edges).

``run_worker(engine, queues=..., concurrency=...)`` runs inside ``async with engine`` (which
recovers orphans and keeps recovering them every ``stale_owner_secs``). It claims from its
queues while it has room (``concurrency`` executions at once in this worker; a queue's
``queue_concurrency`` limit holds across all workers), then waits for one of:

- a slot of its own freeing (one of its executions ended): it claims again at once;
- a notification (PostgreSQL ``LISTEN unbroken_work``: work enqueued, or an execution of
  one of its queues ended in any process): it claims again, but no sooner than a gap
  after its previous claim; the gap starts at ``MIN_CLAIM_GAP_SECS`` and doubles with each
  claim that finds nothing, up to a quarter of the poll interval, so a worker that keeps
  losing the race for new work makes at most a few claims per interval however many
  notifications arrive (a thousand workers woken for one execution back off together);
- ``worker_poll_interval_secs`` (with ±25% jitter, so idle workers spread out) passing:
  the fallback that also picks up a dead worker's executions once its locks lapse. An
  idle worker costs one cheap query per queue per interval.

When ``stop`` is set it stops claiming and returns; leaving ``async with engine`` then
stops its in-flight executions at their next await (they stay ``running`` in their queue
and another worker takes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import Engine
from .errors import EngineNotOpen, UnbrokenError
from .queueing import validate_queue
from .storage.base import WORK_TOPIC, Notifying
from .wakeups import RESYNC, Wakeups

__all__ = ["MIN_CLAIM_GAP_SECS", "WorkerStats", "run_worker"]

log = logging.getLogger("unbroken.worker")

MIN_CLAIM_GAP_SECS = 0.05
"""The shortest gap between two claims a notification triggers."""
_JITTER = 0.25


@dataclass(slots=True)
class WorkerStats:
    """What one ``run_worker`` call did."""

    claimed: int = 0
    """Executions claimed and started."""
    ended: int = 0
    """Of those, the ones that ended while the worker ran (any outcome)."""
    claims: int = 0
    """Claim queries made."""


async def run_worker(
    engine: Engine,
    *,
    queues: Sequence[str] = ("default",),
    concurrency: int = 8,
    stop: asyncio.Event | None = None,
    poll_interval: float | None = None,
) -> WorkerStats:
    """Claim and run queued executions of ``queues`` until ``stop`` is set.

    Args:
        engine: an open engine with the workflows registered.
        queues: the queues to take work from, in turn.
        concurrency: executions running at once in this worker.
        stop: set it to make the worker return (default: run until cancelled).
        poll_interval: seconds between looks when idle (default: the engine's
            ``worker_poll_interval_secs``).

    Returns:
        Counts of what the worker did.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    names = [validate_queue(q) for q in dict.fromkeys(queues)]
    if not names:
        raise ValueError("a worker needs at least one queue")
    interval = engine.config.worker_poll_interval_secs if poll_interval is None else poll_interval
    loop = _Loop(engine, names, concurrency, stop or asyncio.Event(), max(interval, 0.01))
    return await loop.run()


class _Loop:
    def __init__(
        self,
        engine: Engine,
        queues: list[str],
        concurrency: int,
        stop: asyncio.Event,
        interval: float,
    ) -> None:
        self.engine = engine
        self.queues = queues
        self.concurrency = concurrency
        self.stop = stop
        self.interval = interval
        self.stats = WorkerStats()
        self.freed = asyncio.Event()  # one of this worker's executions ended
        self.notified = asyncio.Event()  # work for its queues may be waiting
        self.inflight: set[asyncio.Future[object]] = set()
        self.gap = MIN_CLAIM_GAP_SECS
        self.max_gap = max(interval / 4, MIN_CLAIM_GAP_SECS)
        self.last_claim = 0.0
        self._turn = 0

    async def run(self) -> WorkerStats:
        storage = self.engine.storage
        wakeups = (
            Wakeups(storage, [WORK_TOPIC], self._notified)
            if isinstance(storage, Notifying)
            else None
        )
        if wakeups is not None:
            wakeups.start()
        try:
            while not self.stop.is_set():
                queries = self.stats.claims
                claimed, short = await self._claim_round()
                if claimed:
                    self.gap = MIN_CLAIM_GAP_SECS
                elif self.stats.claims > queries:  # it looked and found nothing
                    self.gap = min(2 * self.gap, self.max_gap)
                if self.stop.is_set():
                    break
                if len(self.inflight) >= self.concurrency:
                    await self._wait([self.freed], None)  # full: only a freed slot helps
                elif short:
                    poll = self.interval * random.uniform(1 - _JITTER, 1 + _JITTER)
                    await self._wait([self.freed, self.notified], poll)
                    if self.notified.is_set() and not self.freed.is_set():
                        await self._pause(self.last_claim + self.gap - time.monotonic())
        finally:
            if wakeups is not None:
                await wakeups.close()
            for waiter in list(self.inflight):
                waiter.cancel()  # stops watching; the executions run until the engine closes
        return self.stats

    async def _claim_round(self) -> tuple[int, bool]:
        """Claim from each queue in turn while there is room; how many were claimed, and
        whether some queue gave fewer than asked (so it is drained or at its limit)."""
        self.freed.clear()
        self.notified.clear()
        self.last_claim = time.monotonic()
        claimed, short = 0, False
        for i in range(len(self.queues)):
            room = self.concurrency - len(self.inflight)
            if room <= 0 or self.stop.is_set():
                break
            queue = self.queues[(self._turn + i) % len(self.queues)]
            try:
                handles = await self.engine.claim(queue, room)
            except EngineNotOpen:
                raise
            except UnbrokenError as exc:
                log.warning("claiming from queue %r failed (%s); retrying", queue, exc)
                return claimed, True
            self.stats.claims += 1
            self.stats.claimed += len(handles)
            claimed += len(handles)
            for handle in handles:
                waiter = asyncio.ensure_future(handle.result())
                self.inflight.add(waiter)
                waiter.add_done_callback(self._ended)
            short = short or len(handles) < room
        self._turn += 1
        return claimed, short

    def _ended(self, waiter: asyncio.Future[object]) -> None:
        self.inflight.discard(waiter)
        self.freed.set()
        if waiter.cancelled():
            return
        self.stats.ended += 1
        exc = waiter.exception()  # retrieved: the workflow's failure is its journaled outcome
        if exc is not None:
            log.info("a queued execution ended with %s", type(exc).__name__)

    def _notified(self, notes: list[tuple[str, str]]) -> None:
        for note in notes:
            if note == RESYNC or (note[0] == WORK_TOPIC and note[1] in self.queues):
                self.notified.set()
                return

    async def _wait(self, events: list[asyncio.Event], seconds: float | None) -> None:
        """Until one of ``events`` is set, the worker is stopped or ``seconds`` pass."""
        waits = [asyncio.ensure_future(e.wait()) for e in [*events, self.stop]]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*waits, return_exceptions=True)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` (if positive) unless stopped meanwhile."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), seconds)

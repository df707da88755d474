"""Retention: pruning old terminal executions and sweeping dead orphans (layer: engine).

A background task of each engine, every ``prune_interval_secs``: first the orphan sweep
(only when ``stale_running_after_secs`` is set), then ``storage.prune`` with the TTLs and
caps of the configuration. Both run on the engine's I/O thread, never on the step hot
path; pruning deletes in batches of ``prune_batch_size`` executions per transaction, and
then the lock files of each batch that no one holds (left by versions that kept them, or
by an owner that could not remove its own).

Orphans of registered workflows are resumed by recovery, not swept. The sweep aborts a
``running`` execution only when its workflow is not registered here, no live process owns
it (its ownership lock can be taken, and is held while the row is written) and it has not
progressed for ``stale_running_after_secs``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from .clock import Clock
from .config import Config
from .errors import ExecutionLocked
from .journal import ExecutionStatus, PruneReport, RetentionPolicy
from .ownership import Ownership
from .storage import Storage

__all__ = ["Retention", "policy_from"]

log = logging.getLogger("unbroken")


def policy_from(config: Config) -> RetentionPolicy:
    """The retention policy a configuration asks for."""
    return RetentionPolicy(
        ttl_completed_ms=config.ttl_completed_secs * 1000,
        ttl_failed_ms=config.ttl_failed_secs * 1000,
        max_executions=config.max_executions,
        max_journal_bytes=config.max_journal_bytes,
        batch_size=max(config.prune_batch_size, 1),
    )


class Retention:
    """An engine's pruning and sweeping."""

    def __init__(
        self,
        storage: Storage,
        config: Config,
        clock: Clock,
        ownership: Ownership,
        io: Callable[..., Any],
        registered: Callable[[str], bool],
    ) -> None:
        self._storage = storage
        self._config = config
        self._clock = clock
        self._ownership = ownership
        self._io = io
        self._registered = registered

    async def run_forever(self) -> None:
        """Prune and sweep every ``prune_interval_secs`` until cancelled."""
        interval = max(self._config.prune_interval_secs, 1.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_once()
            except Exception:
                log.warning("retention run failed; retrying next interval", exc_info=True)

    async def run_once(self, *, dry_run: bool = False) -> tuple[int, PruneReport]:
        """One sweep and one prune; returns (executions swept, prune report)."""
        swept = 0 if dry_run else await self.sweep()
        now_ms = int(self._clock.now() * 1000)
        prune = functools.partial(
            self._storage.prune, dry_run=dry_run, on_pruned=self._ownership.discard
        )
        report: PruneReport = await self._io(prune, policy_from(self._config), now_ms)
        if swept or report.executions:
            log.info(
                "retention: swept %d orphans, pruned %d executions (%d journal rows)",
                swept,
                report.executions,
                report.journal_rows,
            )
        return swept, report

    async def sweep(self) -> int:
        """Abort stale orphans of unregistered workflows that no live process owns."""
        stale = self._config.stale_running_after_secs
        if not stale:
            return 0
        cutoff = int((self._clock.now() - stale) * 1000)
        candidates = await self._io(self._storage.stale_running, cutoff, 500)
        swept = 0
        for execution_id, workflow in candidates:
            if self._registered(workflow):
                continue  # recovery resumes those
            try:
                lock = self._ownership.acquire(execution_id)
            except ExecutionLocked:
                continue  # a live owner
            ended = False
            try:
                now_ms = int(self._clock.now() * 1000)
                if await self._io(
                    self._storage.finalize_execution, execution_id, ExecutionStatus.ABORTED, now_ms
                ):
                    swept += 1
                    log.warning(
                        "swept orphaned execution %r of unregistered workflow %r",
                        execution_id,
                        workflow,
                    )
                ended = True  # aborted now, or ended meanwhile
            finally:
                lock.release(ended=ended)
        return swept

"""The writer's group commits: a taken batch in one transaction, and what happens when
it fails (layer: engine).

One bad entry must not sink the others: a failed group is retried with its buffered entries
together and each acknowledged entry alone, and a failed buffered group once per execution,
so a refused entry (a duplicate outcome, an execution this engine no longer owns) drops only
its own; dropped buffered entries are counted and logged, never raised (their steps re-run
safely on resume). Replies to acknowledged work are collected for the caller to deliver.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import OwnershipLost, StorageError
from .journal import JournalEntry
from .storage import Signer, Storage

__all__ = ["GroupCommit", "Request", "WriterStats"]

log = logging.getLogger("unbroken.writer")


@dataclass(slots=True)
class Request:
    """Acknowledged work: a journal entry to append, or a storage call to make."""

    loop: asyncio.AbstractEventLoop | None  # None: the caller's own work, done inline
    future: asyncio.Future[Any] | None
    entry: JournalEntry | None = None
    call: Callable[[Storage], Any] | None = None


@dataclass(slots=True)
class WriterStats:
    """What a writer has done (read by tests, benchmarks and metrics)."""

    commits: int = 0
    entries: int = 0
    dropped: int = 0
    restarts: int = 0
    resume_seq: int = 0
    last_seq: int = 0
    inline_commits: int = 0  # made on the caller's thread (local storage)
    handed_over: int = 0  # acknowledged work that found the writer busy: to its thread
    checkpoints: int = 0  # log checkpoints the thread ran for the inline commits


class GroupCommit:
    """Commits batches the writer took, in order. What a batch did (its replies, counts and
    dropped entries) is held until ``settle`` says whether its transaction committed: an
    inline group commit runs ``process`` inside one transaction that may yet roll back."""

    def __init__(self, storage: Storage, signer: Signer | None, stats: WriterStats) -> None:
        self._storage = storage
        self._signer = signer
        self._stats = stats
        self._replies: list[tuple[Request, Any, BaseException | None]] = []
        self._commits: list[tuple[int, int]] = []  # (entries, seq) of each group committed
        self._drops: list[tuple[int, BaseException | None]] = []  # (entries, why)

    def settle(
        self, committed: bool = True
    ) -> tuple[list[tuple[Request, Any, BaseException | None]], int]:
        """End what ``process`` and ``count`` did since the last call: counted and logged
        if it committed, else forgotten (nothing was written, nothing dropped). Returns
        its replies (none if rolled back) and the entries committed."""
        replies, commits, drops = self._replies, self._commits, self._drops
        self._replies, self._commits, self._drops = [], [], []
        if not committed:
            return [], 0
        stats = self._stats
        for entries, seq in commits:
            stats.commits += 1
            stats.entries += entries
            stats.last_seq = seq
        for entries, error in drops:
            stats.dropped += entries
            expected = isinstance(error, StorageError)  # a metadata-only message says it all
            log.warning(
                "journal group commit of %d entries failed; they were dropped "
                "(their steps re-run safely on resume): %s",
                entries, error if expected else type(error).__name__,
                exc_info=None if expected else error,
            )
        return replies, sum(entries for entries, _ in commits)

    def process(self, items: list[JournalEntry | Request]) -> None:
        """Commit everything taken in one transaction, acknowledged entries included (a
        group commit for them too); storage calls run in their place in the order."""
        entries: list[JournalEntry] = []
        acked: list[Request] = []
        for item in items:
            if isinstance(item, JournalEntry):
                entries.append(item)
            elif item.entry is not None:
                entries.append(item.entry)
                acked.append(item)
            else:
                self._commit_group(entries, acked)
                entries, acked = [], []
                self._run_call(item)
        self._commit_group(entries, acked)

    def _commit_group(self, entries: list[JournalEntry], acked: list[Request]) -> None:
        """One transaction for the group; everything before an acknowledged entry commits
        with it or before it (INV-4)."""
        if not entries:
            return
        try:
            seq = self._storage.append(entries, self._signer)
        except Exception:
            self._commit_apart(entries, acked)
            return
        self.count(len(entries), seq)
        for request in acked:
            self._reply(request, seq, None)

    def _commit_apart(self, entries: list[JournalEntry], acked: list[Request]) -> None:
        """The group failed: one bad entry must not sink the others. The buffered entries
        commit together (or are dropped with a WARN), then each acknowledged one alone,
        its caller getting its own outcome."""
        mine = {id(request.entry) for request in acked}
        self._commit_buffered([e for e in entries if id(e) not in mine])
        for request in acked:
            assert request.entry is not None
            try:
                seq = self._storage.append([request.entry], self._signer)
            except Exception as exc:
                self._reply(request, None, exc)
            else:
                self.count(1, seq)
                self._reply(request, seq, None)

    def _commit_buffered(self, pending: list[JournalEntry]) -> None:
        while pending:
            try:
                seq = self._storage.append(pending, self._signer)
            except OwnershipLost as exc:
                # The entries of an execution this engine no longer owns are refused (its
                # run is being stopped); the other executions' entries still commit.
                kept = [e for e in pending if e.execution_id != exc.execution_id]
                if len(kept) < len(pending):
                    self._stats.dropped += len(pending) - len(kept)
                    pending = kept
                    continue
                self._dropped(pending)
            except Exception:
                self._commit_each_execution(pending)
            else:
                self.count(len(pending), seq)
            return

    def _commit_each_execution(self, pending: list[JournalEntry]) -> None:
        """A group of several executions failed: commit each execution's entries on their
        own, so one refused entry (a duplicate outcome, say) drops only its own group."""
        groups: dict[str, list[JournalEntry]] = {}
        for entry in pending:
            groups.setdefault(entry.execution_id, []).append(entry)
        if len(groups) == 1:
            self._dropped(pending)
            return
        for group in groups.values():
            try:
                seq = self._storage.append(group, self._signer)
            except Exception:
                self._dropped(group)
            else:
                self.count(len(group), seq)

    def _dropped(self, pending: list[JournalEntry]) -> None:
        """Called from an ``except`` block: the group failed and is dropped."""
        self._drops.append((len(pending), sys.exc_info()[1]))

    def _run_call(self, request: Request) -> None:
        assert request.call is not None
        try:
            result = request.call(self._storage)
        except Exception as exc:
            self._reply(request, None, exc)
        else:
            self._reply(request, result, None)

    def _reply(self, request: Request, value: Any, exc: BaseException | None) -> None:
        self._replies.append((request, value, exc))

    def count(self, n: int, seq: int) -> None:
        """``n`` entries were written, up to ``seq`` (counted when settled)."""
        self._commits.append((n, seq))

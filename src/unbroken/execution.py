"""Driving one execution: generations, divergence restart, finalize (layer: engine)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from .context import Context
from .errors import (
    EncodeError,
    ExecutionCanceled,
    ExecutionFailed,
    OwnershipLost,
    PayloadTooLarge,
    StepCapExceeded,
    StorageUnavailable,
)
from .journal import ExecutionStatus
from .ownership import OwnedLock
from .runtime import Diverged, IntegrityAbort, RunServices, SimulatedCrash, Stopped, now_ms
from .storage import Storage

__all__ = ["ExecutionHandle", "Run", "Workflow"]

log = logging.getLogger("unbroken")


@dataclass(frozen=True, slots=True)
class Workflow:
    """A registered workflow function."""

    name: str
    fn: Callable[..., Awaitable[Any]]
    on_divergence: Literal["restart", "fail"] = "restart"


class ExecutionHandle:
    """A started execution: ``await handle.result()`` gives its output."""

    __slots__ = ("_future", "execution_id")

    def __init__(self, execution_id: str, future: asyncio.Future[Any]) -> None:
        self.execution_id = execution_id
        self._future = future

    async def result(self) -> Any:
        """The workflow's return value; raises the exception that ended the execution."""
        return await asyncio.shield(self._future)

    def done(self) -> bool:
        """Whether the execution has ended (in this process)."""
        return self._future.done()

    def __repr__(self) -> str:
        return f"ExecutionHandle({self.execution_id!r}, done={self.done()})"


@dataclass(slots=True)
class Run:
    """One execution driven by this engine, across its generations."""

    services: RunServices
    workflow: Workflow
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    replaying: bool
    lock: OwnedLock
    future: asyncio.Future[Any]
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    canceled: bool = False
    lost: bool = False
    """Its ownership lapsed (the lock session ended): it stops without finalizing."""
    started: bool = False
    """Its task began ``drive``."""
    stop_requested: bool = False
    ended: bool = False
    """A terminal status is written (by this run or, first, by another writer): its lock
    file goes with its lock."""

    def stop(self) -> None:
        """Stop it at its next await; one whose task has not begun yet stops as it begins
        (cancelling a task before it starts would skip every cleanup of ``drive``)."""
        self.stop_requested = True
        if self.started and self.task is not None and not self.task.done():
            self.task.cancel()

    async def drive(self) -> None:
        """Run the workflow until it ends, release ownership, then settle ``future``: who
        sees the outcome can take the execution over at once."""
        self.started = True
        public = self.future
        self.future = asyncio.get_running_loop().create_future()
        try:
            await self._drive()
        finally:
            outcome, self.future = self.future, public
            _transfer(outcome, public)

    async def _drive(self) -> None:
        stopped = False
        try:
            if self.stop_requested:
                raise Stopped()
            output = await self._generations()
        except (Stopped, asyncio.CancelledError):
            stopped = True
            if self.cancel_requested:
                await self._canceled()
            elif self.lost:
                self.future.set_exception(OwnershipLost("run", self.services.execution_id))
            else:
                self.future.cancel()  # the engine is closing: the execution stays running
        except SimulatedCrash as crash:
            self.future.set_exception(crash)  # as if the process died: no finalize
        except BaseException as exc:
            self.lost = self.lost or isinstance(exc, (OwnershipLost, StorageUnavailable))
            if not self.future.done():
                self.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not self.future.done():
                self.future.set_result(output)
        finally:
            if self.lost or stopped:
                # Unfinished: what it queued must land (or be refused) before another
                # owner can take the execution.
                await self._drain()
            await self._release()

    async def _release(self) -> None:
        """Give ownership back, removing the lock file of an ended execution (on the
        loop, as the file's release always was: the unlink, and the inode freed at
        close); a database lock is released off the event loop (and is released even if
        this task is cancelled meanwhile)."""
        ended = self.ended and not self.lost
        if not self.lock.remote:
            self.lock.release(ended=ended)
            return
        release = functools.partial(self.lock.release, ended=ended)
        done = asyncio.get_running_loop().run_in_executor(None, release)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            pass  # the shielded release goes on
        except Exception as exc:  # the server frees it when the lease lapses
            log.warning(
                "releasing ownership of execution %r failed (%s); it is freed when its "
                "lease lapses", self.services.execution_id, type(exc).__name__,
            )  # fmt: skip

    async def _drain(self) -> None:
        """Before giving up a lapsed ownership: let the writer take what this run queued
        (the storage refuses it), so none of it can land once the execution is owned
        again, by this process or another."""
        # Errors: the database is away (nothing queued can commit) or the engine closes.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(self.services.writer.flush())

    async def _generations(self) -> Any:
        services = self.services
        while True:
            ctx = Context(services, replaying=self.replaying)
            try:
                output = await self.workflow.fn(ctx, *self.args, **self.kwargs)
            except Diverged as diverged:
                await ctx.cancel_inflight()
                services.metrics.divergences += 1
                if self.workflow.on_divergence == "fail":
                    await self._finalize(ExecutionStatus.ABORTED, error=diverged.error)
                    raise diverged.error from None
                services.generation = await self._next_generation()
                self.replaying = False
                continue
            except (Stopped, SimulatedCrash, asyncio.CancelledError):
                await asyncio.shield(ctx.cancel_inflight())  # as a dying process would
                raise
            except IntegrityAbort as abort:
                await ctx.cancel_inflight()
                log.error(
                    "execution %r failed an integrity check and is aborted: %s",
                    services.execution_id,
                    abort.error,
                )
                await self._finalize(ExecutionStatus.ABORTED, error=abort.error)
                raise abort.error from None
            except (OwnershipLost, StorageUnavailable):
                # The database is out of reach or the execution has another owner: not the
                # workflow's failure. It stays running and is resumed from the journal.
                await ctx.cancel_inflight()
                raise
            except Exception as exc:
                status = (
                    ExecutionStatus.ABORTED
                    if isinstance(exc, StepCapExceeded)
                    else ExecutionStatus.FAILED
                )
                await self._finalize(status, error=exc)
                raise
            try:
                await self._finalize(ExecutionStatus.COMPLETED, output=output)
            except (EncodeError, PayloadTooLarge) as exc:
                await self._finalize(ExecutionStatus.FAILED, error=exc)
                raise
            return output

    async def _canceled(self) -> None:
        """A cooperative cancel stopped the workflow: finalize ``canceled`` (INV-16')."""
        eid = self.services.execution_id
        self.canceled = await self.services.writer.call(
            lambda s: s.finalize_execution(eid, ExecutionStatus.CANCELED, now_ms())
        )
        self.ended = True  # canceled now, or ended already
        if self.future.done():
            return
        if self.canceled:
            self.future.set_exception(ExecutionCanceled(eid))
            self.future.exception()  # retrieved: a canceled run needs no one to await it
            return
        # The workflow's own finalize won the race: report what it wrote.
        services = self.services
        row = await services.read(services.storage.get_execution, eid)
        if row is not None and row.status is ExecutionStatus.COMPLETED:
            output = services.payloads.open(
                row.output, "execution output", execution_id=eid, kind="output"
            )
            self.future.set_result(output)
        else:
            status = row.status.value if row is not None else "pruned"
            error_type = (row.error_type if row is not None else None) or "unknown"
            self.future.set_exception(ExecutionFailed(eid, error_type, status))

    async def _next_generation(self) -> int:
        """Mark the current generation aborted; the execution stays ``running`` (FR-DE-03)."""
        eid, generation = self.services.execution_id, self.services.generation

        def abort(storage: Storage) -> int:
            return storage.abort_generation(eid, generation, now_ms())

        return await self.services.writer.call(abort)

    async def _finalize(
        self,
        status: ExecutionStatus,
        *,
        output: Any = None,
        error: BaseException | None = None,
    ) -> None:
        services = self.services
        eid = services.execution_id
        seal = services.payloads.seal
        output_blob = (
            seal(output, f"the output of execution {eid!r}", execution_id=eid, kind="output")
            if status is ExecutionStatus.COMPLETED
            else None
        )
        error_type = type(error).__name__ if error is not None else None
        error_blob = (
            seal(
                {"type": error_type, "message": str(error)},
                "an execution error",
                execution_id=eid,
                kind="execution_error",
            )
            if error is not None
            else None
        )
        won = await services.writer.call(
            lambda s: s.finalize_execution(
                services.execution_id,
                status,
                now_ms(),
                output=output_blob,
                error_type=error_type,
                error=error_blob,
            )
        )
        self.ended = True  # by this write, or by an earlier one (first terminal write wins)
        if not won:
            row = await services.read(services.storage.get_execution, services.execution_id)
            if row is not None and row.status is ExecutionStatus.CANCELED:
                raise ExecutionCanceled(services.execution_id)
            if row is not None:
                raise ExecutionFailed(services.execution_id, "a concurrent finalize", row.status)


def _transfer(outcome: asyncio.Future[Any], public: asyncio.Future[Any]) -> None:
    """Settle ``public`` as ``outcome`` was (cancelled if it never was)."""
    if public.done():
        return
    if not outcome.done() or outcome.cancelled():
        public.cancel()
        return
    error = outcome.exception()
    if error is None:
        public.set_result(outcome.result())
        return
    public.set_exception(error)
    if isinstance(error, ExecutionCanceled):
        public.exception()  # retrieved: a canceled run needs no one to await it


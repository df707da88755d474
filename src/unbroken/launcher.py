"""Starting, attaching, reopening and resuming executions under ownership (layer: engine).

The engine hands every ``start`` (and every orphan recovery) to its launcher: the
launcher reads the row, settles what needs no run (completed, canceled), takes the
execution's ownership lock (INV-15), creates, reopens (INV-16) or resumes the row, checks
the journal's signed high-water mark before any resume, and drives the run as a task.
One future per execution id serves every caller that attaches in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .config import Config
from .errors import ExecutionCanceled, IntegrityViolation, UnknownExecution, WorkflowMismatch
from .execution import ExecutionHandle, Run, Workflow
from .journal import ExecutionRecord, ExecutionStatus
from .ownership import OwnedLock, Ownership
from .payloads import Payloads
from .runtime import FaultPlan, Metrics, RunServices, now_ms
from .storage import Storage
from .waiting import PromiseWaiters
from .writer import JournalWriter

__all__ = ["Launcher"]

log = logging.getLogger("unbroken")

_ENDED = (ExecutionCanceled, IntegrityViolation, UnknownExecution)
"""What a start raises for an execution that will not run again: canceled, aborted for
failing its integrity check, or gone (pruned while it was being reopened)."""


@dataclass(slots=True)
class Launcher:
    """Claims and drives executions for one open engine."""

    _storage: Storage
    _writer: JournalWriter
    _ownership: Ownership
    _payloads: Payloads
    _config: Config
    _metrics: Metrics
    _clock: Clock
    _waiters: PromiseWaiters
    _read: Callable[..., Any]
    _stopping: Callable[[], bool]
    _faults: Callable[[], FaultPlan | None]
    results: dict[str, asyncio.Future[Any]]
    runs: dict[str, Run]

    async def start(
        self,
        wf: Workflow,
        eid: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        owned: OwnedLock | None = None,
        fresh: bool = False,
    ) -> ExecutionHandle:
        """Start, attach to, reopen or resume ``eid``; return its handle at once.

        ``owned`` is the execution's ownership lock when the caller already holds it (a
        worker's claim); the run releases it, or this call does if nothing runs.
        ``fresh`` says ``eid`` was just generated, so no row can exist yet: the read that
        looks for one is skipped (the insert still refuses an existing id).
        """
        existing = self.results.get(eid)
        if existing is not None:
            if owned is not None:
                owned.release()
            return ExecutionHandle(eid, existing)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.results[eid] = future
        try:
            await self._begin(wf, eid, future, args, kwargs, owned, fresh)
        except BaseException as exc:
            self.results.pop(eid, None)
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: the caller gets it raised
            raise
        return ExecutionHandle(eid, future)

    async def _begin(
        self,
        wf: Workflow,
        eid: str,
        future: asyncio.Future[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        owned: OwnedLock | None,
        fresh: bool,
    ) -> None:
        try:
            row = None if fresh else await self._read(self._storage.get_execution, eid)
            settled = row is not None and self._settled(wf, row, future)
            inputs = b"" if row is not None else self.encode_inputs(eid, args, kwargs)
        except BaseException as exc:
            if owned is not None:
                owned.release(ended=isinstance(exc, _ENDED))
            raise
        if settled:
            if owned is not None:
                owned.release(ended=True)
            self.results.pop(eid, None)
            return
        # A row that did not exist a moment ago has no previous owner's write to wait out.
        lock = owned if owned is not None else await self._acquire(eid, row is not None)
        try:
            row, replaying = await self._claim(wf, eid, inputs, row)
            if row is None:  # it completed meanwhile
                lock.release(ended=True)
                self.results.pop(eid, None)
                return
            self._launch(wf, row, replaying, lock, future)
        except BaseException as exc:
            lock.release(ended=isinstance(exc, _ENDED))
            raise

    async def _acquire(self, eid: str, barrier: bool) -> OwnedLock:
        """Take ownership; on a shared database (round trips) off the event loop. A new
        execution's lock file is one made ahead: while none is ready, wait for one (the
        loop runs other executions meanwhile) rather than create it here."""
        ownership = self._ownership
        acquire = functools.partial(ownership.acquire, eid, barrier=barrier)
        if not ownership.remote:
            while not barrier and ownership.short():
                await ownership.made()
            return acquire()
        loop = asyncio.get_running_loop()
        pending = loop.run_in_executor(None, acquire)
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            # Cancelled while the thread takes the lock: wait for it (through further
            # cancellations), then give it back off the loop.
            while not pending.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({pending})
            if not pending.cancelled() and pending.exception() is None:
                loop.run_in_executor(None, pending.result().release)
            raise

    async def _claim(
        self, wf: Workflow, eid: str, inputs: bytes, row: ExecutionRecord | None
    ) -> tuple[ExecutionRecord | None, bool]:
        """Under the lock: create, reopen or resume the row. ``None``: it settled meanwhile."""
        writer = self._writer
        if row is None:
            row, created = await writer.call(
                lambda s: s.create_execution(eid, wf.name, inputs, now_ms())
            )
            if created:
                self._metrics.executions_started += 1
                return row, False
            if self._ownership.remote:  # another process created it meanwhile
                await asyncio.get_running_loop().run_in_executor(
                    None, self._ownership.barrier, eid
                )
        row = await self._read(self._storage.get_execution, eid)
        if row is None:  # pruned since the first read
            raise UnknownExecution(eid)
        future = self.results[eid]
        if self._settled(wf, row, future):
            return None, False
        if row.status is not ExecutionStatus.RUNNING:
            row = await writer.call(lambda s: s.reopen_execution(eid, now_ms()))
        await self._verify_integrity(eid)
        return row, True

    async def _verify_integrity(self, eid: str) -> None:
        """Before resuming: the signed high-water mark must match the journal (ref §4.7)."""
        storage = self._storage
        stored, outcomes = await self._read(
            lambda: (storage.read_integrity(eid), storage.count_outcomes(eid))  # one hop
        )
        try:
            self._payloads.verify_high_water_mark(eid, stored, outcomes)
        except IntegrityViolation as exc:
            log.error("execution %r is aborted: %s", eid, exc)
            writer = self._writer
            error = self._payloads.seal(
                {"type": type(exc).__name__, "message": str(exc)},
                "an execution error",
                execution_id=eid,
                kind="execution_error",
            )
            kind = type(exc).__name__
            await writer.call(
                lambda s: s.finalize_execution(
                    eid, ExecutionStatus.ABORTED, now_ms(), error_type=kind, error=error
                )
            )
            raise

    def _settled(self, wf: Workflow, row: ExecutionRecord, future: asyncio.Future[Any]) -> bool:
        """Settle ``future`` from a row that needs no run (completed); refuse canceled."""
        if row.workflow != wf.name:
            raise WorkflowMismatch(row.execution_id, row.workflow, wf.name)
        if row.status is ExecutionStatus.CANCELED:
            raise ExecutionCanceled(row.execution_id)
        if row.status is ExecutionStatus.COMPLETED:
            output = self._payloads.open(
                row.output, "execution output", execution_id=row.execution_id, kind="output"
            )
            future.set_result(output)
            return True
        return False

    def _launch(
        self,
        wf: Workflow,
        row: ExecutionRecord,
        replaying: bool,
        lock: OwnedLock,
        future: asyncio.Future[Any],
    ) -> None:
        writer = self._writer
        inputs = self._payloads.open(
            row.inputs, "execution inputs", execution_id=row.execution_id, kind="inputs"
        )
        if not isinstance(inputs, dict):
            inputs = {}
        services = RunServices(
            execution_id=row.execution_id,
            workflow=wf.name,
            generation=row.generation,
            storage=self._storage,
            writer=writer,
            config=self._config,
            metrics=self._metrics,
            read=self._read,
            payloads=self._payloads,
            clock=self._clock,
            waiters=self._waiters,
            stopping=self._stopping,
            faults=self._faults(),
        )
        run = Run(
            services,
            wf,
            tuple(inputs.get("args", ())),
            dict(inputs.get("kwargs", {})),
            replaying,
            lock,
            future,
        )
        self.runs[row.execution_id] = run
        run.task = asyncio.get_running_loop().create_task(
            self._drive(run), name=f"unbroken:{row.execution_id}"
        )
        if self._ownership.lapsed(row.execution_id):
            # Its lock lapsed while it was being started (the engine stops runs it knows
            # of when that happens; this one was not one yet): it stops as it begins.
            run.lost = True
            run.stop()

    async def _drive(self, run: Run) -> None:
        eid = run.services.execution_id
        try:
            await run.drive()
        finally:
            self.runs.pop(eid, None)
            if self.results.get(eid) is run.future:
                del self.results[eid]

    def encode_inputs(self, eid: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """The sealed inputs of a new execution (``PayloadTooLarge`` if over the limit)."""
        return self._payloads.seal(
            {"args": args, "kwargs": kwargs},
            f"the inputs of {eid!r}",
            execution_id=eid,
            kind="inputs",
        )

"""The engine: workflow registry, starting and attaching, recovery, lifecycle (layer: engine).

Use an engine inside ``async with engine:``. Entering opens storage (creating or migrating
the schema), starts the journal writer and resumes every orphaned execution of a
registered workflow (one that is ``running`` and whose owner process is dead). Leaving
stops in-flight executions at their next await (they stay ``running`` and are recovered
later), flushes the writer and releases ownership. Calling ``run``/``start`` on an engine
that is not open raises ``EngineNotOpen``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from .cipher import preload as preload_cipher
from .clock import Clock, SystemClock
from .config import Config, load_config
from .errors import (
    EngineNotOpen,
    UnbrokenError,
    UnknownExecution,
    UnknownWorkflow,
)
from .execution import ExecutionHandle, Run, Workflow
from .ids import lock_name, new_execution_id, validate_execution_id
from .journal import (
    ExecutionInfo,
    ExecutionStatus,
    PromiseState,
    PruneReport,
    ms_to_datetime,
)
from .launcher import Launcher
from .ownership import Ownership, ownership_for
from .payloads import Payloads, open_payloads
from .queueing import claim, validate_queue
from .retention import Retention
from .runtime import FaultPlan, Metrics, now_ms
from .storage import Storage, open_storage
from .waiting import PromiseWaiters, settle
from .writer import JournalWriter

__all__ = ["Engine"]

log = logging.getLogger("unbroken")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
T = TypeVar("T")


class Engine:
    """Durable execution of registered workflows on one database.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``memory://`` or
            ``postgresql://...``; see ``unbroken.config`` for the precedence of sources.
        storage: an unopened storage to use instead of one built from the URL.
        **settings: any ``Config`` field, e.g. ``journal_flush_interval_ms=5``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        storage: Storage | None = None,
        clock: Clock | None = None,
        **settings: Any,
    ):
        self.config: Config = load_config(url, settings)
        self.clock: Clock = clock or SystemClock()
        self._storage = storage or open_storage(
            self.config.database_url, synchronous=self.config.sqlite_synchronous
        )
        self._by_name: dict[str, Workflow] = {}
        self._by_fn: dict[Callable[..., Any], Workflow] = {}
        self._results: dict[str, asyncio.Future[Any]] = {}
        self._runs: dict[str, Run] = {}
        self.metrics = Metrics()
        self._open = False
        self._stopping = False
        self._reader: ThreadPoolExecutor | None = None
        self._writer: JournalWriter | None = None
        self._ownership: Ownership | None = None
        self._faults: FaultPlan | None = None  # set by unbroken.testing only
        self._waiters: PromiseWaiters | None = None
        self._launcher: Launcher | None = None
        self._warned: set[str] = set()  # unregistered orphans already reported
        self._retention: Retention | None = None
        self._background: list[asyncio.Task[None]] = []
        self._payloads = Payloads(None, self.config.max_payload_bytes)  # replaced at open

    # -- registry -----------------------------------------------------------------------

    @overload
    def workflow(self, fn: F, /) -> F: ...

    @overload
    def workflow(
        self, *, name: str | None = ..., on_divergence: Literal["restart", "fail"] = ...
    ) -> Callable[[F], F]: ...

    def workflow(
        self,
        fn: Callable[..., Awaitable[Any]] | None = None,
        *,
        name: str | None = None,
        on_divergence: Literal["restart", "fail"] = "restart",
    ) -> Any:
        """Register an async workflow function ``async def wf(ctx, *args, **kwargs)``.

        The name defaults to ``module.qualname`` (``__main__`` replaced by the script's
        file stem); pass ``name=`` for anything that must be recovered across deployments.
        """

        def register(func: F) -> F:
            if not _is_async(func):
                raise TypeError(f"workflow {func.__qualname__!r} must be an async function")
            if on_divergence not in ("restart", "fail"):
                raise ValueError("on_divergence must be 'restart' or 'fail'")
            wf = Workflow(name or _default_name(func), func, on_divergence)
            if wf.name in self._by_name and self._by_name[wf.name].fn is not func:
                raise ValueError(f"a different workflow is already registered as {wf.name!r}")
            self._by_name[wf.name] = wf
            self._by_fn[func] = wf
            return func

        return register(fn) if fn is not None else register

    def _resolve(self, workflow: Callable[..., Any] | str) -> Workflow:
        found = (
            self._by_name.get(workflow) if isinstance(workflow, str) else self._by_fn.get(workflow)
        )
        if found is None:
            name = workflow if isinstance(workflow, str) else getattr(workflow, "__qualname__", "?")
            raise UnknownWorkflow(str(name))
        return found

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        loop = asyncio.get_running_loop()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unbroken-reader")
        try:
            opening = loop.run_in_executor(self._reader, self._storage.open)
            if self.config.encrypt_payloads:
                preload_cipher()  # on this thread meanwhile: SQLite lets go of the GIL
            await opening
            self._payloads = await loop.run_in_executor(
                self._reader, open_payloads, self._storage, self.config
            )
        except BaseException:
            await loop.run_in_executor(self._reader, self._storage.close)
            self._reader.shutdown(wait=False)
            raise
        self._ownership = ownership_for(self._storage, ahead=True)
        cfg = self.config
        self._ownership.watch(
            cfg.stale_owner_secs, functools.partial(self._ownership_lost, loop)
        )
        self._writer = JournalWriter(
            self._storage,
            flush_interval_ms=cfg.journal_flush_interval_ms,
            max_batch=cfg.journal_max_batch,
            ack_timeout_ms=cfg.journal_ack_timeout_ms,
            signer=self._payloads.signer,
        )
        self._writer.start()
        self._waiters = PromiseWaiters(
            self._read, self._storage, self.clock, cfg.promise_poll_interval_secs
        )
        self._retention = Retention(
            self._storage,
            cfg,
            self.clock,
            self._ownership,
            self._read,
            lambda name: name in self._by_name,
        )
        self._launcher = Launcher(
            self._storage,
            self._writer,
            self._ownership,
            self._payloads,
            self.config,
            self.metrics,
            self.clock,
            self._waiters,
            self._read,
            lambda: self._stopping,
            lambda: self._faults,
            self._results,
            self._runs,
        )
        self._background = [
            loop.create_task(self._retention.run_forever()),
            loop.create_task(self._recover_forever()),
        ]
        self._stopping = False
        self._open = True
        await self.recover()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop in-flight executions (they stay running), flush, release everything."""
        if not self._open:
            return
        self._stopping = True
        for task in self._background:
            task.cancel()
        if self._waiters is not None:
            await self._waiters.close()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for run in self._runs.values():
            run.stop()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        assert self._reader is not None
        # One hop to the reader's thread, idle now, rather than three to the loop's default
        # executor, whose threads would be started for this alone.
        await asyncio.get_running_loop().run_in_executor(self._reader, self._release)
        self._reader.shutdown(wait=True)
        self._open = False

    def _release(self) -> None:
        """Commit what the writer holds and stop it, stop making lock files, close the
        storage. Blocking."""
        assert self._writer is not None
        self._writer.close()
        if self._ownership is not None:
            self._ownership.close()
        self._storage.close()

    def _require_launcher(self) -> Launcher:
        if not self._open or self._launcher is None:
            raise EngineNotOpen()
        return self._launcher

    def _require_open(self) -> tuple[JournalWriter, Ownership]:
        if not self._open or self._writer is None or self._ownership is None:
            raise EngineNotOpen()
        return self._writer, self._ownership

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, functools.partial(fn, *args))

    # -- starting -----------------------------------------------------------------------

    async def run(
        self,
        workflow: Callable[..., Awaitable[T]] | str,
        /,
        *args: Any,
        execution_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Start (or attach to) an execution and return its output.

        For an id that exists: ``completed`` returns the journaled output without running
        the workflow; ``running`` attaches; ``failed`` and ``aborted`` are reopened and run
        again under replay (INV-16); ``canceled`` raises ``ExecutionCanceled``. The
        journaled inputs are used and this call's arguments are ignored.

        Raises:
            ExecutionLocked: another live process owns the execution.
            ExecutionCanceled: the execution was canceled.
            Exception: whatever ended the execution (the same object in-process).
        """
        handle = await self.start(workflow, *args, execution_id=execution_id, **kwargs)
        return await handle.result()

    async def start(
        self,
        workflow: Callable[..., Awaitable[Any]] | str,
        /,
        *args: Any,
        execution_id: str | None = None,
        **kwargs: Any,
    ) -> ExecutionHandle:
        """Start (or attach to) an execution and return its handle at once."""
        launcher = self._require_launcher()
        wf = self._resolve(workflow)
        if execution_id is None:
            return await launcher.start(wf, new_execution_id(), args, kwargs, fresh=True)
        return await launcher.start(wf, validate_execution_id(execution_id), args, kwargs)

    # -- queued work --------------------------------------------------------------------

    async def enqueue(
        self,
        workflow: Callable[..., Awaitable[Any]] | str,
        /,
        *args: Any,
        execution_id: str | None = None,
        queue: str = "default",
        **kwargs: Any,
    ) -> str:
        """Store an execution in ``queue`` for a worker (``unbroken worker``) to run; return
        its id. Nothing runs here.

        The keywords ``execution_id`` and ``queue`` are reserved; other arguments go to
        the workflow, sealed like ``start``'s. An id that exists is left as it is (its id
        is returned), so enqueueing is idempotent.

        Raises:
            InvalidArgument: the queue name is empty, too long or not printable.
            PayloadTooLarge: the encoded inputs are over ``max_payload_bytes``.
        """
        writer, _ = self._require_open()
        launcher = self._require_launcher()
        wf = self._resolve(workflow)
        eid = new_execution_id() if execution_id is None else validate_execution_id(execution_id)
        queue = validate_queue(queue)
        inputs = launcher.encode_inputs(eid, args, kwargs)
        await writer.call(lambda s: s.enqueue_execution(eid, wf.name, inputs, queue, now_ms()))
        return eid

    async def claim(self, queue: str = "default", limit: int = 1) -> list[ExecutionHandle]:
        """Claim up to ``limit`` waiting executions of ``queue`` (oldest first) of
        registered workflows, start them here and return their handles.

        Claimed executions are owned by this process (INV-15) and resume or replay as
        ``start`` would; the queue's ``queue_concurrency`` limit holds across all workers.
        """
        _, ownership = self._require_open()
        launcher = self._require_launcher()
        cap = self.config.queue_concurrency.get(validate_queue(queue), 0)
        return await claim(self._storage, ownership, launcher, self._by_name, queue, limit, cap)

    # -- recovery -----------------------------------------------------------------------

    async def recover(self) -> list[str]:
        """Resume every orphaned execution of a registered workflow; return their ids.

        Queued executions are left to workers (``claim``), which take a dead worker's
        executions back from the queue once its ownership locks lapse.

        Runs on entering ``async with engine`` and every ``stale_owner_secs`` after; the
        executions run as background tasks (their failures are logged). One whose workflow
        is not registered stays ``running`` with a WARN (once per engine); one owned by a
        live process is left to it.
        """
        self._require_open()
        recovered: list[str] = []
        for eid, name in await self._read(self._storage.running_executions):
            if eid in self._results:
                continue
            wf = self._by_name.get(name)
            if wf is None:
                if eid in self._warned:
                    continue
                self._warned.add(eid)
                log.warning(
                    "execution %r of unregistered workflow %r stays running; register the "
                    "workflow to resume it",
                    eid,
                    name,
                )
                continue
            try:
                handle = await self.start(wf.fn, execution_id=eid)
            except UnbrokenError as exc:
                log.debug("recovery skipped execution %r: %s", eid, exc)
                continue
            recovered.append(eid)
            self.metrics.executions_recovered += 1
            handle._future.add_done_callback(functools.partial(_log_outcome, eid))
        return recovered

    def _ownership_lost(self, loop: asyncio.AbstractEventLoop, names: list[str]) -> None:
        """From the lock heartbeat's thread: locks lapsed with their database session."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs any more
            loop.call_soon_threadsafe(self._stop_lost, frozenset(names))

    def _stop_lost(self, names: frozenset[str]) -> None:
        """Stop the runs whose ownership lapsed, at their next await, without finalizing:
        another process may own them now, and whoever does resumes them."""
        for eid, run in list(self._runs.items()):
            if run.task is not None and not run.task.done() and lock_name(eid) in names:
                run.lost = True
                run.stop()

    async def _recover_forever(self) -> None:
        """Pick up executions whose owner died while this engine runs, every
        ``stale_owner_secs`` (a sibling worker's crash leaves its executions to us)."""
        while True:
            await asyncio.sleep(max(self.config.stale_owner_secs, 0.1))
            try:
                await self.recover()
            except Exception:
                log.warning("periodic recovery failed; retrying", exc_info=True)

    # -- inspection ---------------------------------------------------------------------

    async def get_execution(self, execution_id: str) -> ExecutionInfo | None:
        """Metadata of an execution and its journal rows (never payloads), or ``None``."""
        self._require_open()
        row = await self._read(self._storage.get_execution, execution_id)
        if row is None:
            return None
        steps = await self._read(self._storage.list_steps, execution_id)
        return ExecutionInfo(
            execution_id=row.execution_id,
            workflow=row.workflow,
            status=row.status,
            generation=row.generation,
            created_at=ms_to_datetime(row.created_at_ms),
            updated_at=ms_to_datetime(row.updated_at_ms),
            finalized_at=(
                ms_to_datetime(row.finalized_at_ms) if row.finalized_at_ms is not None else None
            ),
            error_type=row.error_type,
            steps=steps,
        )

    # -- promises and cancel ------------------------------------------------------------

    async def resolve_promise(self, promise_id: str, token: bytes | str, value: Any = None) -> bool:
        """Resolve a durable promise with ``value``; ``False`` if it was already settled.

        The token (32 bytes or 64 lowercase hex characters) is checked in constant time
        before anything else is revealed (INV-9). A waiter in this engine wakes at once;
        one in another process within ``promise_poll_interval_secs``.

        Raises:
            UnknownPromise: no such promise, or its execution was canceled or restarted.
            PromiseRejected: the token does not authenticate.
            PayloadTooLarge: ``value`` is over ``max_payload_bytes``.
        """
        return await self._settle(promise_id, token, value, PromiseState.RESOLVED)

    async def reject_promise(
        self, promise_id: str, token: bytes | str, error: BaseException | str
    ) -> bool:
        """Reject a durable promise: its waiter gets ``StepFailed`` naming the error."""
        kind = type(error).__name__ if isinstance(error, BaseException) else "Rejected"
        record = {"type": kind, "message": str(error)}
        return await self._settle(promise_id, token, record, PromiseState.REJECTED)

    async def _settle(
        self, promise_id: str, token: bytes | str, value: Any, state: PromiseState
    ) -> bool:
        writer, _ = self._require_open()
        payloads = self._payloads
        settled = await writer.call(
            lambda s: settle(s, payloads, promise_id, token, value, state=state, now_ms=now_ms())
        )
        if settled and self._waiters is not None:
            self._waiters.wake(promise_id)
        return settled

    async def cancel(self, execution_id: str) -> bool:
        """Cancel an execution; it never resumes (INV-16'). ``True`` if this call did it.

        One this engine drives stops at its next step or wait. One owned by another live
        process is refused with ``ExecutionLocked`` naming it; an already terminal one is
        left as it is (``False``).

        Raises:
            UnknownExecution: no such execution.
            ExecutionLocked: another live process owns it.
        """
        writer, ownership = self._require_open()
        run = self._runs.get(execution_id)
        if run is not None and run.task is not None and not run.task.done():
            run.cancel_requested = True
            run.stop()
            await asyncio.wait({run.task})
            return run.canceled
        row = await self._read(self._storage.get_execution, execution_id)
        if row is None:
            raise UnknownExecution(execution_id)
        if row.status is not ExecutionStatus.RUNNING:
            return False
        lock = ownership.acquire(execution_id)
        try:
            won: bool = await writer.call(
                lambda s: s.finalize_execution(execution_id, ExecutionStatus.CANCELED, now_ms())
            )
        except BaseException:
            lock.release()
            raise
        lock.release(ended=True)  # canceled now, or ended meanwhile
        return won

    async def prune(self, *, dry_run: bool = False) -> PruneReport:
        """Run retention now: sweep orphans (if configured) and prune; see ``retention``."""
        self._require_open()
        assert self._retention is not None
        _, report = await self._retention.run_once(dry_run=dry_run)
        return report

    async def flush(self) -> None:
        """Wait until every buffered journal entry is committed."""
        writer, _ = self._require_open()
        await writer.flush()

    @property
    def storage(self) -> Storage:
        """The engine's storage (for tools and tests)."""
        return self._storage


def _log_outcome(eid: str, future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("recovered execution %r ended with %s", eid, type(exc).__name__)


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn)


def _default_name(fn: Callable[..., Any]) -> str:
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        module = Path(main_file).stem if main_file else "__main__"
    return f"{module}.{fn.__qualname__}"

"""Every error unbroken raises, in one tree (layer: model).

Messages carry metadata only (INV-5): execution ids, step ids, step names, type names and
sizes, never payload bytes, resolver tokens or key material.

::

    UnbrokenError(Exception)
    ├── ConfigurationError
    │   └── EncryptionRequired
    ├── EngineNotOpen
    ├── UnknownWorkflow
    ├── WorkflowMismatch
    ├── StorageError
    │   ├── StorageUnavailable
    │   ├── OwnershipLost
    │   ├── NotAnUnbrokenDatabase
    │   └── SchemaTooNew
    ├── JournalUnavailable
    ├── ReplayDivergence
    ├── AmbiguityPolicyRequired (also TypeError)
    ├── AmbiguousEffect
    ├── PayloadTooLarge
    ├── EncodeError (also TypeError)
    ├── DecodeError
    ├── StepCapExceeded
    ├── StepFailed
    ├── InvalidStep (also TypeError)
    ├── InvalidArgument (also ValueError)
    ├── PromiseTimeout
    ├── UnknownPromise
    ├── PromiseRejected
    ├── ExecutionLocked
    ├── ExecutionCanceled
    ├── ExecutionFailed
    ├── UnknownExecution (also LookupError)
    └── IntegrityError
        ├── ReplayIntegrity      (a sealed payload did not authenticate)
        ├── ControlIntegrity     (a control entry's HMAC did not authenticate)
        └── IntegrityViolation   (the high-water mark does not match the journal)

Control flow that a user's ``except Exception`` must not swallow (divergence restart,
shutdown, cancel) derives from ``BaseException`` and lives in the engine layer.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "AmbiguityPolicyRequired",
    "AmbiguousEffect",
    "ConfigurationError",
    "ControlIntegrity",
    "DecodeError",
    "EncodeError",
    "EncryptionRequired",
    "EngineNotOpen",
    "ExecutionCanceled",
    "ExecutionFailed",
    "ExecutionLocked",
    "IntegrityError",
    "IntegrityViolation",
    "InvalidArgument",
    "InvalidStep",
    "JournalUnavailable",
    "NotAnUnbrokenDatabase",
    "OwnershipLost",
    "PayloadTooLarge",
    "PromiseRejected",
    "PromiseTimeout",
    "ReplayDivergence",
    "ReplayIntegrity",
    "SchemaTooNew",
    "StepCapExceeded",
    "StepFailed",
    "StorageError",
    "StorageUnavailable",
    "UnbrokenError",
    "UnknownExecution",
    "UnknownPromise",
    "UnknownWorkflow",
    "WorkflowMismatch",
]


class UnbrokenError(Exception):
    """Base of every error unbroken raises."""


class ConfigurationError(UnbrokenError):
    """The engine's configuration (URL, environment, config file) is not usable."""


class EncryptionRequired(ConfigurationError):
    """A deployment that must encrypt payloads has no key (INV-8)."""


class EngineNotOpen(UnbrokenError):
    """The engine was used outside ``async with engine``."""

    def __init__(self) -> None:
        super().__init__(
            "the engine is not open: use it inside 'async with engine:' "
            "(it opens storage, the journal writer and recovery there)"
        )


class UnknownWorkflow(UnbrokenError):
    """No workflow is registered under the given name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no workflow is registered under the name {name!r}")
        self.name = name


class WorkflowMismatch(UnbrokenError):
    """An existing execution id was started with a different workflow."""

    def __init__(self, execution_id: str, journaled: str, called: str) -> None:
        super().__init__(
            f"execution {execution_id!r} belongs to workflow {journaled!r}, not {called!r}"
        )
        self.execution_id = execution_id


class StorageError(UnbrokenError):
    """A storage operation failed; ``op`` names it, the cause is chained, not printed."""

    def __init__(self, op: str, detail: str = "") -> None:
        suffix = f": {detail}" if detail else ""
        super().__init__(f"storage operation {op!r} failed{suffix}")
        self.op = op


class StorageUnavailable(StorageError):
    """The database could not be reached or dropped the connection (a server restart, a
    network failure): nothing of the failed operation is known to be written, and the same
    call may succeed once the server is back."""


class OwnershipLost(StorageError):
    """This process no longer owns the execution (its ownership lock lapsed with a lost
    database session). A write for it (``write``) was refused whole, or is unconfirmed: the
    session died under it, and its commit may have landed, before the session ended and so
    before any other owner could take the lock. Another process may own it now; the run
    stops without finalizing, and whoever owns it next resumes it from the journal."""

    def __init__(
        self,
        op: str,
        execution_id: str,
        *,
        write: Literal["refused", "unconfirmed"] | None = None,
    ) -> None:
        lost = f"ownership of execution {execution_id!r} was lost"
        if write is not None:
            lost += _WRITE_OUTCOMES[write]
        super().__init__(op, lost)
        self.execution_id = execution_id


_WRITE_OUTCOMES = {
    "refused": "; the write was refused, nothing was written",
    "unconfirmed": "; the write may have committed",
}


class NotAnUnbrokenDatabase(StorageError):
    """The database exists but was not created by unbroken."""

    def __init__(self, where: str) -> None:
        UnbrokenError.__init__(
            self,
            f"{where} is not an unbroken database (it holds other tables, or is no database)",
        )
        self.op = "open"


class SchemaTooNew(StorageError):
    """The database was written by a newer unbroken whose schema this version cannot read."""

    def __init__(self, found: int, supported: int) -> None:
        UnbrokenError.__init__(
            self,
            f"the database schema is version {found}, newer than the {supported} this "
            "version of unbroken supports; upgrade unbroken to open it",
        )
        self.op = "open"
        self.found = found
        self.supported = supported


class JournalUnavailable(UnbrokenError):
    """An acknowledged journal append was not confirmed in time (INV-12, FR-DE-11)."""

    def __init__(self, timeout_ms: int | None = None) -> None:
        within = f" within {timeout_ms} ms" if timeout_ms is not None else ""
        super().__init__(f"journal writer unavailable: append was not acknowledged{within}")


class ReplayDivergence(UnbrokenError):
    """The code called something else at a step than the journal holds (INV-3)."""

    def __init__(
        self,
        step_id: int,
        *,
        journaled: tuple[str, str],
        called: tuple[str, str],
        note: str = "",
    ) -> None:
        extra = f"; {note}" if note else ""
        super().__init__(
            f"replay divergence at step {step_id}: the journal holds "
            f"{journaled[0]!r} ({journaled[1]}) but the code called "
            f"{called[0]!r} ({called[1]}){extra}"
        )
        self.step_id = step_id
        self.journaled = journaled
        self.called = called


class AmbiguityPolicyRequired(UnbrokenError, TypeError):
    """A guarded step of this intent needs an explicit ``on_ambiguous`` (FR-DE-09)."""

    def __init__(self, step: str, intent: str) -> None:
        super().__init__(
            f"step {step!r} is a guarded {intent} effect and requires an explicit "
            "on_ambiguous policy (OnAmbiguous.SKIP, RERUN or FAIL)"
        )
        self.step = step


class AmbiguousEffect(UnbrokenError):
    """A guarded step resumed in the ambiguous window under ``OnAmbiguous.FAIL``."""

    def __init__(self, execution_id: str, step_id: int, step: str) -> None:
        super().__init__(
            f"step {step_id} ({step!r}) of execution {execution_id!r} resumed in the "
            "ambiguous window (its intent was committed, its result was not) and its "
            "on_ambiguous policy is 'fail': the operation was not run again"
        )
        self.execution_id = execution_id
        self.step_id = step_id
        self.step = step


class PayloadTooLarge(UnbrokenError):
    """An encoded value exceeds ``max_payload_bytes`` (INV-11)."""

    def __init__(self, size: int, limit: int, what: str = "payload") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class EncodeError(UnbrokenError, TypeError):
    """A value cannot be encoded by the journal codec."""

    def __init__(self, what: str, type_name: str) -> None:
        super().__init__(
            f"{what} cannot be journaled: values of type {type_name!r} are not supported by "
            "the codec (JSON types, tuples, bytes, datetimes, UUIDs, Decimals, sets, "
            "dataclasses and pydantic models are)"
        )
        self.type_name = type_name


class DecodeError(UnbrokenError):
    """A stored entry could not be decoded."""

    def __init__(self, context: str) -> None:
        super().__init__(f"failed to decode journal entry: {context}")


class StepCapExceeded(UnbrokenError):
    """An execution went past ``max_steps_per_execution``."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"execution exceeded the step cap of {cap} steps")
        self.cap = cap


class StepFailed(UnbrokenError):
    """A step failed after its retries; identical on the live run and on replay.

    ``str()`` names the step and the error type only; ``message`` holds the original
    error text (user data: never logged by unbroken).
    """

    def __init__(self, step_name: str, step_id: int, error_type: str, message: str) -> None:
        super().__init__(f"step {step_id} ({step_name!r}) failed with {error_type}")
        self.step_name = step_name
        self.step_id = step_id
        self.error_type = error_type
        self.message = message


class InvalidStep(UnbrokenError, TypeError):
    """``ctx.step`` was called with something that is not a step name or descriptor."""


class InvalidArgument(UnbrokenError, ValueError):
    """An argument of a context or engine call is out of range (a negative sleep, a naive
    datetime, a reused promise name, a malformed token)."""


class PromiseTimeout(UnbrokenError):
    """A durable promise was not settled before its deadline (journaled: replays agree)."""

    def __init__(self, name: str, step_id: int) -> None:
        super().__init__(f"promise {name!r} (step {step_id}) was not settled before its deadline")
        self.name = name
        self.step_id = step_id


class UnknownPromise(UnbrokenError):
    """No resolvable promise exists under that id."""

    def __init__(self) -> None:
        super().__init__("promise resolution failed: no such promise")


class PromiseRejected(UnbrokenError):
    """The resolver token did not authenticate."""

    def __init__(self) -> None:
        super().__init__("promise resolution rejected: resolver token did not authenticate")


class ExecutionLocked(UnbrokenError):
    """Another live process owns the execution (INV-15)."""

    def __init__(self, execution_id: str, holder_pid: int) -> None:
        holder = f"pid {holder_pid}" if holder_pid else "pid unknown"
        super().__init__(
            f"execution {execution_id!r} is already open in another process ({holder})"
        )
        self.execution_id = execution_id
        self.holder_pid = holder_pid


class ExecutionCanceled(UnbrokenError):
    """The execution was canceled and never resumes (INV-16')."""

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"execution {execution_id!r} was canceled and cannot be resumed")
        self.execution_id = execution_id


class ExecutionFailed(UnbrokenError):
    """The execution ended in failure in another process; names the error type."""

    def __init__(self, execution_id: str, error_type: str, status: str = "failed") -> None:
        super().__init__(f"execution {execution_id!r} ended {status} with {error_type}")
        self.execution_id = execution_id
        self.error_type = error_type
        self.status = status


class UnknownExecution(UnbrokenError, LookupError):
    """No execution exists under that id."""

    def __init__(self, execution_id: str) -> None:
        super().__init__(f"no execution with id {execution_id!r}")
        self.execution_id = execution_id


class IntegrityError(UnbrokenError):
    """Stored data failed an integrity check; the execution is aborted, others go on."""


class ReplayIntegrity(IntegrityError):
    """A sealed payload did not authenticate (moved, altered or under another key)."""


class ControlIntegrity(IntegrityError):
    """A control entry's HMAC did not authenticate."""


class IntegrityViolation(IntegrityError):
    """The signed high-water mark does not match the journal (rows deleted or forged)."""

    def __init__(self, execution_id: str, reason: str) -> None:
        super().__init__(f"integrity violation in execution {execution_id!r}: {reason}")
        self.execution_id = execution_id
        self.reason = reason

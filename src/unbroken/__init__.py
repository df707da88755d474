"""unbroken: durable execution for Python.

Wrap a workflow's work in journaled steps; when the process crashes, is killed or
redeployed, the same execution resumes at the point of failure instead of starting over.
"""

from __future__ import annotations

from .context import Context, StepOutcome
from .effects import EffectClass, Intent, OnAmbiguous, RetryPolicy, Step
from .engine import Engine
from .errors import (
    AmbiguityPolicyRequired,
    AmbiguousEffect,
    ControlIntegrity,
    DecodeError,
    EncodeError,
    EncryptionRequired,
    EngineNotOpen,
    ExecutionCanceled,
    ExecutionFailed,
    ExecutionLocked,
    IntegrityError,
    IntegrityViolation,
    JournalUnavailable,
    PayloadTooLarge,
    PromiseRejected,
    ReplayDivergence,
    ReplayIntegrity,
    StepCapExceeded,
    StepFailed,
    UnbrokenError,
    UnknownExecution,
    UnknownPromise,
    UnknownWorkflow,
)
from .execution import ExecutionHandle
from .journal import ExecutionInfo, ExecutionStatus, StepInfo
from .runtime import StepHandle, current_step

__version__ = "0.1.0"

__all__ = [
    "AmbiguityPolicyRequired",
    "AmbiguousEffect",
    "Context",
    "ControlIntegrity",
    "DecodeError",
    "EffectClass",
    "EncodeError",
    "EncryptionRequired",
    "Engine",
    "EngineNotOpen",
    "ExecutionCanceled",
    "ExecutionFailed",
    "ExecutionHandle",
    "ExecutionInfo",
    "ExecutionLocked",
    "ExecutionStatus",
    "IntegrityError",
    "IntegrityViolation",
    "Intent",
    "JournalUnavailable",
    "OnAmbiguous",
    "PayloadTooLarge",
    "PromiseRejected",
    "ReplayDivergence",
    "ReplayIntegrity",
    "RetryPolicy",
    "Step",
    "StepCapExceeded",
    "StepFailed",
    "StepHandle",
    "StepInfo",
    "StepOutcome",
    "UnbrokenError",
    "UnknownExecution",
    "UnknownPromise",
    "UnknownWorkflow",
    "__version__",
    "current_step",
]

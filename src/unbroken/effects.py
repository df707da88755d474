"""Effect classes, intents, ambiguity policies and step descriptors (layer: model).

A step descriptor says what replay may assume about a step's operation (ref §3.3):

- ``IDEMPOTENT``: once its result is committed the operation never runs again.
- ``AT_LEAST_ONCE``: may run again after a crash.
- ``EXACTLY_ONCE_GUARDED``: an intent is committed before the operation and the result
  after it; a crash between the two is resolved by the step's ``OnAmbiguous`` policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from .errors import AmbiguityPolicyRequired, InvalidStep
from .ids import fingerprint_input

__all__ = [
    "EffectClass",
    "Intent",
    "OnAmbiguous",
    "RetryPolicy",
    "Step",
]


class EffectClass(str, Enum):
    """What replay may assume about a step's operation; the value is what is stored."""

    IDEMPOTENT = "idempotent"
    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE_GUARDED = "exactly_once_guarded"


class Intent(str, Enum):
    """The kind of a guarded effect; all but ``COST_BEARING`` need an explicit policy."""

    COST_BEARING = "cost_bearing"
    DESTRUCTIVE = "destructive"
    SECURITY_RELEVANT = "security_relevant"
    MONEY_MOVING = "money_moving"
    CUSTOM = "custom"

    @property
    def requires_explicit_policy(self) -> bool:
        """Whether a descriptor of this intent must name its ``OnAmbiguous`` policy."""
        return self is not Intent.COST_BEARING


class OnAmbiguous(str, Enum):
    """What to do with a guarded step found with an intent but no result."""

    SKIP = "skip"
    """Assume it happened; call again with the same idempotency key so the boundary dedups."""
    RERUN = "rerun"
    """Assume it did not happen; call again."""
    FAIL = "fail"
    """Raise ``AmbiguousEffect`` without calling the operation."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a failing step operation is tried before the step fails for good.

    Args:
        max_attempts: total attempts, the first included (1 = no retry).
        initial_interval: seconds before the second attempt.
        backoff: factor applied to the interval after each attempt.
        max_interval: ceiling of the interval in seconds.
        retry_on: exception types that are retried; others fail the step at once.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 60.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be an int >= 1")
        for name in ("initial_interval", "backoff", "max_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise ValueError(f"RetryPolicy.{name} must be a non-negative number")

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2 = the first retry)."""
        delay = self.initial_interval * self.backoff ** max(attempt - 2, 0)
        return float(min(delay, self.max_interval))


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True, slots=True)
class Step:
    """A step descriptor: name, effect class, ambiguity policy and fingerprint.

    Build one with ``Step.idempotent``, ``Step.at_least_once`` or ``Step.guarded``; a plain
    string passed to ``ctx.step`` means ``Step.idempotent(name)``.
    """

    name: str
    effect: EffectClass
    intent: Intent | None = None
    on_ambiguous: OnAmbiguous | None = None
    fingerprint: bytes = b""
    retry: RetryPolicy = NO_RETRY
    key_input: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not isinstance(self.fingerprint, bytes):
            raise InvalidStep(
                f"step {self.name!r}: fingerprint must be bytes, "
                f"not {type(self.fingerprint).__name__}"
            )
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidStep(f"step {self.name!r}: retry must be a RetryPolicy")
        object.__setattr__(
            self, "key_input", fingerprint_input(self.name, self.effect.value, self.fingerprint)
        )

    @classmethod
    def idempotent(
        cls, name: str, *, fingerprint: bytes = b"", retry: RetryPolicy | None = None
    ) -> Step:
        """A step whose committed result is replayed and whose operation never re-runs."""
        return cls(name, EffectClass.IDEMPOTENT, fingerprint=fingerprint, retry=retry or NO_RETRY)

    @classmethod
    def at_least_once(
        cls, name: str, *, fingerprint: bytes = b"", retry: RetryPolicy | None = None
    ) -> Step:
        """A step whose operation may run again if a crash comes before its result is written."""
        return cls(
            name, EffectClass.AT_LEAST_ONCE, fingerprint=fingerprint, retry=retry or NO_RETRY
        )

    @classmethod
    def guarded(
        cls,
        name: str,
        intent: Intent,
        *,
        on_ambiguous: OnAmbiguous | None = None,
        fingerprint: bytes = b"",
        retry: RetryPolicy | None = None,
    ) -> Step:
        """An exactly-once-guarded step: intent committed before, result after (FR-DE-04).

        Raises:
            AmbiguityPolicyRequired: ``intent`` needs an explicit policy and none was given
                (FR-DE-09).
        """
        if not isinstance(intent, Intent):
            raise InvalidStep(f"step {name!r}: intent must be an Intent, not {intent!r}")
        if on_ambiguous is None:
            if intent.requires_explicit_policy:
                raise AmbiguityPolicyRequired(name, intent.value)
            on_ambiguous = OnAmbiguous.SKIP
        elif not isinstance(on_ambiguous, OnAmbiguous):
            raise InvalidStep(f"step {name!r}: on_ambiguous must be an OnAmbiguous")
        return cls(
            name,
            EffectClass.EXACTLY_ONCE_GUARDED,
            intent=intent,
            on_ambiguous=on_ambiguous,
            fingerprint=fingerprint,
            retry=retry or NO_RETRY,
        )

    @property
    def is_guarded(self) -> bool:
        """Whether the step follows the intent-before, result-after protocol."""
        return self.effect is EffectClass.EXACTLY_ONCE_GUARDED


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise InvalidStep(f"a step name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidStep("a step name must not be empty")


def as_step(step: object) -> Step:
    """Accept a name or a descriptor, as ``ctx.step`` does."""
    if type(step) is str and (known := _BY_NAME.get(step)) is not None:
        return known  # the common case, one lookup
    if isinstance(step, Step):
        return step
    if isinstance(step, str):
        return _idempotent_by_name(step)
    raise InvalidStep(
        "ctx.step takes a step name (str) or a Step descriptor first, "
        f"not {type(step).__name__}"
    )


_BY_NAME: dict[str, Step] = {}


def _idempotent_by_name(name: str) -> Step:
    # Plain names repeat on every call of a workflow: build each descriptor once.
    step = _BY_NAME.get(name)
    if step is None:
        step = Step.idempotent(name)
        if len(_BY_NAME) < 10_000:
            _BY_NAME[name] = step
    return step

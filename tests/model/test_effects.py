"""Step descriptors and their construction-time rules (FR-DE-09)."""

from __future__ import annotations

import pytest

from unbroken import AmbiguityPolicyRequired, EffectClass, Intent, OnAmbiguous, RetryPolicy, Step
from unbroken.effects import as_step
from unbroken.errors import InvalidStep


@pytest.mark.parametrize(
    "intent",
    [Intent.DESTRUCTIVE, Intent.SECURITY_RELEVANT, Intent.MONEY_MOVING, Intent.CUSTOM],
)
def test_guarded_without_policy_is_refused_at_construction_fr_de_09(intent: Intent) -> None:
    with pytest.raises(AmbiguityPolicyRequired, match="explicit on_ambiguous"):
        Step.guarded("drop_table", intent)


def test_cost_bearing_defaults_to_skip() -> None:
    step = Step.guarded("llm", Intent.COST_BEARING)
    assert step.on_ambiguous is OnAmbiguous.SKIP
    assert step.effect is EffectClass.EXACTLY_ONCE_GUARDED


def test_explicit_policy_overrides_the_default() -> None:
    step = Step.guarded("llm", Intent.COST_BEARING, on_ambiguous=OnAmbiguous.FAIL)
    assert step.on_ambiguous is OnAmbiguous.FAIL


def test_non_guarded_descriptors_have_no_policy() -> None:
    assert Step.idempotent("a").on_ambiguous is None
    assert Step.at_least_once("a").on_ambiguous is None


def test_enum_values_are_the_stored_strings() -> None:
    assert [c.value for c in EffectClass] == ["idempotent", "at_least_once", "exactly_once_guarded"]
    assert [p.value for p in OnAmbiguous] == ["skip", "rerun", "fail"]


@pytest.mark.parametrize("bad", [42, None, b"name", ""])
def test_a_step_name_of_the_wrong_type_is_a_named_error(bad: object) -> None:
    with pytest.raises(InvalidStep):
        as_step(bad)


def test_a_fingerprint_of_the_wrong_type_is_a_named_error() -> None:
    with pytest.raises(InvalidStep, match="fingerprint must be bytes"):
        Step.idempotent("a", fingerprint="v2")  # type: ignore[arg-type]


def test_retry_policy_validates_and_backs_off() -> None:
    policy = RetryPolicy(max_attempts=4, initial_interval=0.5, backoff=2.0, max_interval=1.5)
    assert [policy.delay_before(a) for a in (2, 3, 4)] == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_interval"):
        RetryPolicy(initial_interval=float("nan"))

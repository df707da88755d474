"""Whole workflows, generated: any shape, any crash point, the same oracle (SPEC §9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unbroken
from unbroken import Context, Intent, OnAmbiguous, Step, StepFailed
from unbroken.testing import (
    MemoryStorage,
    SimulatedCrash,
    crash_after_step,
    crash_in_ambiguous_window,
    memory_engine,
)

# A workflow is a list of items; each item is one step or a parallel group of steps.
STEP_KINDS = ["idempotent", "at_least_once", "guarded", "failing"]
ITEM = st.one_of(
    st.sampled_from(STEP_KINDS).map(lambda k: [k]),
    st.lists(st.sampled_from(["idempotent", "guarded"]), min_size=2, max_size=4),
)
SHAPE = st.lists(ITEM, min_size=1, max_size=8)


def _descriptor(kind: str, name: str) -> Step:
    if kind == "at_least_once":
        return Step.at_least_once(name)
    if kind == "guarded":
        return Step.guarded(name, Intent.MONEY_MOVING, on_ambiguous=OnAmbiguous.SKIP)
    return Step.idempotent(name)


def _build(shape: list[list[str]], calls: Counter[str], keys: dict[str, set[str]]) -> Any:
    async def op(name: str, kind: str) -> str:
        calls[name] += 1
        keys.setdefault(name, set()).add(unbroken.current_step().idempotency_key_hex)
        await asyncio.sleep(0)
        if kind == "failing":
            raise ValueError(f"{name} failed")
        return f"{name}:ok"

    async def workflow(ctx: Context) -> list[Any]:
        out: list[Any] = []
        for i, item in enumerate(shape):
            names = [f"i{i}s{j}" for j in range(len(item))]
            pairs = zip(item, names, strict=True)
            steps = [ctx.step(_descriptor(k, n), op, n, k) for k, n in pairs]
            try:
                out.extend(await asyncio.gather(*steps))
            except StepFailed as exc:
                out.append(("failed", exc.step_name, exc.error_type))
        return out

    return workflow


def _step_count(shape: list[list[str]]) -> int:
    return sum(len(item) for item in shape)


Outcome = tuple[Any, Counter[str], dict[str, set[str]]]


async def _run(shape: list[list[str]], crash: tuple[str, int] | None) -> Outcome:
    calls: Counter[str] = Counter()
    keys: dict[str, set[str]] = {}
    storage = MemoryStorage()
    engine = memory_engine(storage)
    wf = engine.workflow(name="generated")(_build(shape, calls, keys))
    async with engine:
        if crash is not None:
            where, step_id = crash
            inject = crash_after_step if where == "after" else crash_in_ambiguous_window
            with inject(engine, step_id) as plan, contextlib.suppress(SimulatedCrash):
                await engine.run(wf, execution_id="x")
            assert plan.fired
    resumed = memory_engine(storage)
    resumed.workflow(name="generated")(_build(shape, calls, keys))
    async with resumed:
        result = await resumed.run("generated", execution_id="x")
        info = await resumed.get_execution("x")
    assert info is not None and info.status == "completed" and info.generation == 0
    return result, calls, keys


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SHAPE, st.data())
async def test_any_workflow_killed_after_any_step_resumes_to_the_same_result(
    shape: list[list[str]], data: st.DataObject
) -> None:
    expected, _, _ = await _run(shape, None)
    crash_at = data.draw(st.integers(min_value=0, max_value=_step_count(shape) - 1))
    result, calls, keys = await _run(shape, ("after", crash_at))
    assert result == expected
    # a crash after a committed step re-runs nothing: every operation ran exactly once
    assert set(calls.values()) == {1}
    assert all(len(k) == 1 for k in keys.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SHAPE, st.data())
async def test_a_crash_in_any_ambiguous_window_reissues_once_with_the_same_key(
    shape: list[list[str]], data: st.DataObject
) -> None:
    guarded = [
        (i, j) for i, item in enumerate(shape) for j, kind in enumerate(item) if kind == "guarded"
    ]
    if not guarded:
        return
    i, j = data.draw(st.sampled_from(guarded))
    step_id = sum(len(item) for item in shape[:i]) + j
    expected, _, _ = await _run(shape, None)
    result, calls, keys = await _run(shape, ("window", step_id))
    assert result == expected
    reissued = f"i{i}s{j}"
    assert calls[reissued] == 2 and len(keys[reissued]) == 1  # SKIP: same key, boundary dedups
    # A guarded sibling in the same parallel group may have been in its own window when
    # the process died: it is re-issued too, with its same key. Nothing else runs twice.
    siblings = {f"i{i}s{k}" for k, kind in enumerate(shape[i]) if kind == "guarded"}
    for name, n in calls.items():
        if name in siblings:
            assert n in (1, 2) and len(keys[name]) == 1
        elif name != reissued:
            assert n == 1, name

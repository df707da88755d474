"""ctx.step: replay, ids, guard, guarded protocol, failures (INV-2, INV-3, INV-10, INV-13,
FR-DE-01..04, FR-DE-10)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import pytest

import unbroken
from unbroken import (
    AmbiguousEffect,
    Context,
    Intent,
    OnAmbiguous,
    ReplayDivergence,
    RetryPolicy,
    Step,
    StepFailed,
)
from unbroken.errors import EncodeError, InvalidStep, PayloadTooLarge
from unbroken.testing import SimulatedCrash, crash_after_step, crash_in_ambiguous_window

from ..conftest import EngineFactory


class Ops:
    """Counts how often each operation ran."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.keys: dict[str, list[str]] = {}

    def op(self, name: str, value: Any = None) -> Any:
        self.calls[name] += 1
        self.keys.setdefault(name, []).append(unbroken.current_step().idempotency_key_hex)
        return value if value is not None else f"{name}-done"

    async def aop(self, name: str, value: Any = None, delay: float = 0.0) -> Any:
        await asyncio.sleep(delay)
        return self.op(name, value)


async def test_fresh_step_runs_op_and_journals_result_fr_de_01(make_engine: EngineFactory) -> None:
    ops = Ops()
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        return await ctx.step("a", ops.op, "a", {"n": 1, "t": (1, 2)})

    async with engine:
        assert await engine.run(wf, execution_id="x") == {"n": 1, "t": (1, 2)}
        info = await engine.get_execution("x")
    assert info is not None and info.status == "completed"
    assert [(s.step_id, s.name, s.kind.value) for s in info.steps] == [(0, "a", "result")]


async def test_replayed_idempotent_step_skips_op_inv10_fr_de_02(make_engine: EngineFactory) -> None:
    ops = Ops()
    engine = make_engine()
    seen: list[tuple[Any, bool]] = []

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        a = await ctx.step_recorded("a", ops.op, "a", (1, b"\x00"))
        seen.append((a.value, a.was_replayed))
        b = await ctx.step("b", ops.op, "b")
        return [a.value, b]

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
    engine2 = make_engine()  # a restarted process
    engine2.workflow(wf)
    async with engine2:
        result = await engine2.run(wf, execution_id="x")
    assert result == [(1, b"\x00"), "b-done"]
    assert ops.calls == {"a": 1, "b": 1}
    assert seen == [((1, b"\x00"), True)]  # the first run died inside step 0


async def test_step_ids_follow_call_order_not_completion_order_inv2(
    make_engine: EngineFactory,
) -> None:
    ops = Ops()
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        slow = ctx.step_recorded("slow", ops.aop, "slow", None, 0.05)
        mid = ctx.step_recorded("mid", ops.aop, "mid", None, 0.02)
        fast = ctx.step_recorded("fast", ops.aop, "fast", None, 0.0)
        outcomes = await asyncio.gather(fast, slow, mid)  # gathered in another order
        return {o.value: o.step_id for o in outcomes}

    async with engine:
        assert await engine.run(wf, execution_id="x") == {
            "slow-done": 0, "mid-done": 1, "fast-done": 2,
        }


async def test_parallel_group_replays_by_position_after_a_crash(make_engine: EngineFactory) -> None:
    ops = Ops()
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        group = await asyncio.gather(
            *(ctx.step(f"q{i}", ops.aop, f"q{i}", i, 0.01 * (3 - i)) for i in range(3))
        )
        tail = await ctx.step("tail", ops.op, "tail")
        return [*group, tail]

    async with engine:
        with crash_after_step(engine, 3), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        assert await engine.run(wf, execution_id="x") == [0, 1, 2, "tail-done"]
    assert ops.calls == {"q0": 1, "q1": 1, "q2": 1, "tail": 1}


async def test_steps_running_in_other_tasks_are_cancelled_with_the_generation(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    ran: list[str] = []

    async def hang() -> None:
        ran.append("hang")
        await asyncio.Event().wait()

    async def quick() -> str:
        return "own"

    @engine.workflow
    async def wf(ctx: Context) -> tuple[str, bool]:
        other = asyncio.ensure_future(ctx.step("hang", hang))  # a task of its own
        own = await ctx.step("quick", quick)  # in the workflow's task
        while not ran:
            await asyncio.sleep(0)
        await ctx.cancel_inflight()  # what a divergence or a stop does
        cancelled = other.cancelled()
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        return own, cancelled

    async with engine:
        assert await engine.run(wf) == ("own", True)


async def test_guarded_step_commits_intent_before_result_fr_de_04(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    kinds_seen_by_op: list[list[str]] = []

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        async def charge() -> str:
            info = await engine.get_execution(ctx.execution_id)
            assert info is not None
            kinds_seen_by_op.append([s.kind.value for s in info.steps])
            return "charged"

        return await ctx.step(Step.guarded("charge", Intent.COST_BEARING), charge)

    async with engine:
        assert await engine.run(wf, execution_id="x") == "charged"
        info = await engine.get_execution("x")
    assert kinds_seen_by_op == [["intent"]]  # durable before the operation ran
    assert info is not None and [s.kind.value for s in info.steps] == ["intent", "result"]


@pytest.mark.parametrize("policy", [OnAmbiguous.SKIP, OnAmbiguous.RERUN])
async def test_ambiguous_window_reruns_with_the_same_key_and_audits_fr_de_10(
    make_engine: EngineFactory, policy: OnAmbiguous, caplog: pytest.LogCaptureFixture
) -> None:
    ops = Ops()
    engine = make_engine()
    step = Step.guarded("pay", Intent.MONEY_MOVING, on_ambiguous=policy)

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        return await ctx.step(step, ops.op, "pay", "paid")

    async with engine:
        with crash_in_ambiguous_window(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        with caplog.at_level(logging.WARNING, logger="unbroken.audit"):
            assert await engine.run(wf, execution_id="x") == "paid"
    assert ops.calls["pay"] == 2
    assert len(set(ops.keys["pay"])) == 1  # the boundary can dedup by the same key
    records = [r for r in caplog.records if r.name == "unbroken.audit"]
    assert len(records) == 1
    record: Any = records[0]
    assert record.execution_id == "x" and record.step_id == 0
    assert record.effect_class == "exactly_once_guarded" and record.on_ambiguous == policy.value
    assert record.idem_key_prefix == ops.keys["pay"][0][:16]


async def test_ambiguous_window_fail_policy_does_not_run_the_op(make_engine: EngineFactory) -> None:
    ops = Ops()
    engine = make_engine()
    step = Step.guarded("pay", Intent.MONEY_MOVING, on_ambiguous=OnAmbiguous.FAIL)

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        return await ctx.step(step, ops.op, "pay")

    async with engine:
        with crash_in_ambiguous_window(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        with pytest.raises(AmbiguousEffect, match="ambiguous window"):
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert ops.calls["pay"] == 1
    assert info is not None and info.status == "failed"


async def test_divergence_restarts_as_a_new_generation_inv3_fr_de_03(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    ops = Ops()
    engine = make_engine()
    version = {"v": 1}
    guarded = Step.guarded("llm", Intent.COST_BEARING)

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> Any:
        first = await ctx.step("a" if version["v"] == 1 else "a2", ops.op, "a")
        paid = await ctx.step(guarded, ops.op, "llm", "answer")
        return [first, paid, await ctx.step("c", ops.op, "c")]

    async with engine:
        with crash_after_step(engine, 1), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        version["v"] = 2
        with caplog.at_level(logging.WARNING):
            result = await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert result == ["a-done", "answer", "c-done"]
    # INV-13: the guarded effect committed in generation 0 is not fired again
    assert ops.calls == {"a": 2, "llm": 1, "c": 1}
    assert info is not None and info.generation == 1 and info.status == "completed"
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "step 0" in message and "'a'" in message and "'a2'" in message


async def test_divergence_in_fail_mode_aborts_the_execution(make_engine: EngineFactory) -> None:
    ops = Ops()
    engine = make_engine()
    version = {"v": 1}

    @engine.workflow(name="wf", on_divergence="fail")
    async def wf(ctx: Context) -> Any:
        if version["v"] == 1:
            await ctx.step("a", ops.op, "a")
        else:
            await ctx.step(Step.at_least_once("a"), ops.op, "a")
        return await ctx.step("b", ops.op, "b")

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        version["v"] = 2
        with pytest.raises(ReplayDivergence) as caught:
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert caught.value.step_id == 0
    assert caught.value.journaled == ("a", "idempotent")
    assert caught.value.called == ("a", "at_least_once")
    assert info is not None and info.status == "aborted"


async def test_divergence_is_not_swallowed_by_except_exception(make_engine: EngineFactory) -> None:
    ops = Ops()
    engine = make_engine()
    version = {"v": 1}

    @engine.workflow(name="wf", on_divergence="fail")
    async def wf(ctx: Context) -> Any:
        try:
            await ctx.step("a" if version["v"] == 1 else "other", ops.op, "a")
        except Exception:
            return "swallowed"
        return "ok"

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        version["v"] = 2
        with pytest.raises(ReplayDivergence):
            await engine.run(wf, execution_id="x")


async def test_step_failure_is_journaled_and_identical_on_replay(
    make_engine: EngineFactory,
) -> None:
    calls = Counter[str]()
    engine = make_engine()
    caught: list[tuple[str, str, str, bool]] = []

    def boom() -> None:
        calls["boom"] += 1
        raise ValueError("card declined")

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        try:
            await ctx.step("boom", boom)
        except StepFailed as exc:
            caught.append((exc.step_name, exc.error_type, exc.message,
                           isinstance(exc.__cause__, ValueError)))
        return await ctx.step("after", lambda: "after")

    async with engine:
        with crash_after_step(engine, 1), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        assert await engine.run(wf, execution_id="x") == "after"
    assert calls["boom"] == 1
    assert caught == [("boom", "ValueError", "card declined", True),
                      ("boom", "ValueError", "card declined", False)]


async def test_retry_policy_retries_then_succeeds(make_engine: EngineFactory) -> None:
    attempts: list[int] = []
    engine = make_engine()

    def flaky() -> str:
        attempts.append(unbroken.current_step().attempt)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "ok"

    step = Step.idempotent("flaky", retry=RetryPolicy(max_attempts=3, initial_interval=0.001))

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        return await ctx.step(step, flaky)

    async with engine:
        assert await engine.run(wf) == "ok"
    assert attempts == [1, 2, 3]


async def test_unhandled_exception_fails_the_execution_with_the_same_object(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    error = RuntimeError("bad")

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        raise error

    async with engine:
        with pytest.raises(RuntimeError) as caught:
            await engine.run(wf, execution_id="x")
        info = await engine.get_execution("x")
    assert caught.value is error
    assert info is not None and info.status == "failed" and info.error_type == "RuntimeError"


async def test_current_step_exposes_the_key_in_sync_and_async_ops(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()
    handles: list[unbroken.StepHandle] = []

    async def aop() -> None:
        handles.append(unbroken.current_step())

    def sop() -> None:
        handles.append(unbroken.current_step())

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        a = await ctx.step_recorded("a", aop)
        b = await ctx.step_recorded("b", sop)
        return [a.idempotency_key, b.idempotency_key]

    async with engine:
        keys = await engine.run(wf, execution_id="x")
    assert [h.step_id for h in handles] == [0, 1]
    assert [h.idempotency_key for h in handles] == keys
    assert all(len(h.idempotency_key_hex) == 64 for h in handles)
    with pytest.raises(RuntimeError, match="outside a running step"):
        unbroken.current_step()


async def test_now_uuid_and_random_are_journaled(make_engine: EngineFactory) -> None:
    engine = make_engine()
    seen: list[Any] = []

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        values = [await ctx.now(), await ctx.uuid(), await ctx.random()]
        seen.append(values)
        await ctx.step("tail", lambda: None)
        return values

    async with engine:
        with crash_after_step(engine, 3), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
        result = await engine.run(wf, execution_id="x")
    assert seen[0] == seen[1] == result
    assert result[0].tzinfo is not None


async def test_a_non_json_able_result_is_a_named_error(make_engine: EngineFactory) -> None:
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        return await ctx.step("sock", lambda: object())

    async with engine:
        with pytest.raises(EncodeError, match="step 0"):
            await engine.run(wf, execution_id="x")


async def test_oversize_results_are_refused_on_write_inv11(make_engine: EngineFactory) -> None:
    engine = make_engine(max_payload_bytes=1000)

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        return await ctx.step("big", lambda: "x" * 2000)

    async with engine:
        with pytest.raises(PayloadTooLarge, match="exceeds the 1000-byte limit"):
            await engine.run(wf, execution_id="x")


async def test_bad_step_arguments_raise_at_call_time(make_engine: EngineFactory) -> None:
    engine = make_engine()

    @engine.workflow
    async def wf(ctx: Context) -> Any:
        with pytest.raises(InvalidStep, match="step name"):
            ctx.step(42, lambda: None)  # type: ignore[arg-type]
        with pytest.raises(InvalidStep, match="callable"):
            ctx.step("a", "not callable")  # type: ignore[arg-type]
        return await ctx.step("a", lambda: 1)

    async with engine:
        assert await engine.run(wf) == 1


async def test_oversize_stored_values_are_refused_on_read_before_decoding_inv11(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine()

    @engine.workflow(name="wf")
    async def wf(ctx: Context) -> Any:
        return await ctx.step("big", lambda: "x" * 5000)

    async with engine:
        with crash_after_step(engine, 0), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="x")
    strict = make_engine(max_payload_bytes=1000)
    strict.workflow(name="wf")(wf)
    async with strict:
        with pytest.raises(PayloadTooLarge, match="stored"):
            await strict.run("wf", execution_id="x")

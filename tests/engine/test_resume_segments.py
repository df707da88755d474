"""Resuming long executions: segmented replay across many segment boundaries, divergence
found past them, and memory bounded by the segment, not the journal (ref §4.4, INV-3)."""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from unbroken import Context, Intent, OnAmbiguous, ReplayDivergence, Step, StepFailed
from unbroken.errors import ReplayIntegrity
from unbroken.testing import SimulatedCrash, crash_after_step

from ..conftest import EngineFactory

GUARDED = Step.guarded("pay", Intent.MONEY_MOVING, on_ambiguous=OnAmbiguous.FAIL)


class Flaky(Exception):
    """What the failing steps raise."""


def _mixed_workflow(calls: Counter[int], seen: dict[int, bool], n: int) -> Any:
    """Idempotent, guarded (intent and result rows) and failed steps, interleaved so that
    segment reads cut steps' row groups in two."""

    async def mixed(ctx: Context) -> list[Any]:
        out: list[Any] = []
        for i in range(n):
            if i % 7 == 3:
                outcome = await ctx.step_recorded(GUARDED, _op, calls, i)
            elif i % 11 == 5:
                try:
                    outcome = await ctx.step_recorded("boom", _fail, calls, i)
                except StepFailed as exc:
                    out.append(("failed", exc.step_name, exc.error_type, exc.message))
                    continue
            else:
                outcome = await ctx.step_recorded("s", _op, calls, i)
            seen[i] = outcome.was_replayed
            out.append(outcome.value)
        return out

    return mixed


async def _op(calls: Counter[int], i: int) -> dict[str, Any]:
    calls[i] += 1
    return {"i": i, "t": (i, str(i))}


async def _fail(calls: Counter[int], i: int) -> None:
    calls[i] += 1
    raise Flaky(f"step {i} failed")


async def _diverge(
    make_engine: EngineFactory,
    calls: Counter[int],
    n: int,
    changed_at: int,
    changed: Step | str,
    **settings: Any,
) -> pytest.ExceptionInfo[ReplayDivergence]:
    """Crash an execution of ``n`` steps ``"s"`` after its last step, then resume it with
    step ``changed_at`` made ``changed``: the divergence it raises."""

    def workflow(edit: bool) -> Any:
        async def steps(ctx: Context) -> int:
            for i in range(n):
                await ctx.step(changed if edit and i == changed_at else "s", _op, calls, i)
            return n

        return steps

    engine = make_engine(**settings)
    engine.workflow(name="long", on_divergence="fail")(workflow(False))
    async with engine:
        with crash_after_step(engine, n - 1), pytest.raises(SimulatedCrash):
            await engine.run("long", execution_id="d")
    engine2 = make_engine(**settings)
    engine2.workflow(name="long", on_divergence="fail")(workflow(True))
    async with engine2:
        with pytest.raises(ReplayDivergence) as excinfo:
            await engine2.run("long", execution_id="d")
    return excinfo


async def test_a_resume_across_many_segments_returns_journaled_results_without_rerunning(
    make_engine: EngineFactory,
) -> None:
    n, crash_at = 500, 399
    calls: Counter[int] = Counter()
    first_seen: dict[int, bool] = {}
    engine = make_engine(replay_segment_steps=3)
    wf = engine.workflow(name="mixed")(_mixed_workflow(calls, first_seen, n))
    async with engine:
        with crash_after_step(engine, crash_at), pytest.raises(SimulatedCrash):
            await engine.run(wf, execution_id="long")
    assert set(calls) == set(range(crash_at + 1))

    seen: dict[int, bool] = {}
    engine2 = make_engine(replay_segment_steps=3)  # a restarted process
    engine2.workflow(name="mixed")(_mixed_workflow(calls, seen, n))
    async with engine2:
        result = await engine2.run("mixed", execution_id="long")

    assert all(count == 1 for count in calls.values()), "a committed step ran again"
    assert set(calls) == set(range(n))
    assert all(replayed for i, replayed in seen.items() if i <= crash_at)
    assert not any(replayed for i, replayed in seen.items() if i > crash_at)
    assert len(seen) > n * 9 // 10
    expected: list[Any] = []
    for i in range(n):
        if i % 7 != 3 and i % 11 == 5:
            expected.append(("failed", "boom", "Flaky", f"step {i} failed"))
        else:
            expected.append({"i": i, "t": (i, str(i))})
    assert result == expected


async def test_divergence_far_past_the_first_segment_is_detected_inv3(
    make_engine: EngineFactory,
) -> None:
    n, changed_at = 400, 333
    calls: Counter[int] = Counter()
    excinfo = await _diverge(make_engine, calls, n, changed_at, "renamed", replay_segment_steps=4)
    assert excinfo.value.step_id == changed_at
    assert excinfo.value.journaled == ("s", "idempotent")
    assert excinfo.value.called == ("renamed", "idempotent")
    assert all(count == 1 for count in calls.values()), "a step before the divergence re-ran"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_resume_memory_is_bounded_by_the_segment_not_the_journal(
    make_engine: EngineFactory,
) -> None:
    n, size = 6000, 1024  # a journal of over 6 MB of payloads
    engine = make_engine(max_steps_per_execution=0)

    @engine.workflow(name="big")
    async def big(ctx: Context) -> int:
        total = 0
        for i in range(n):
            total += len(await ctx.step("s", _blob, i, size))
        return total

    async with engine:
        with crash_after_step(engine, n - 1), pytest.raises(SimulatedCrash):
            await engine.run(big, execution_id="big")

    engine2 = make_engine(max_steps_per_execution=0)
    engine2.workflow(name="big")(big)
    gc.collect()
    tracemalloc.start()
    try:
        async with engine2:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            assert await engine2.run(big, execution_id="big") == n * size
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Holding the journal would take over 6 MB; a segment of 1 KiB steps stops growing
    # at about 0.5 MB of payloads.
    assert peak - before < 3 * 1024 * 1024


async def _blob(i: int, size: int) -> str:
    return str(i % 10) * size


@pytest.mark.parametrize(
    "changed",
    [Step.idempotent("s", fingerprint=b"v2"), Step.at_least_once("s")],
    ids=["fingerprint", "effect-class"],
)
async def test_a_step_changed_only_in_its_key_inside_a_segment_is_divergence_inv3(
    make_engine: EngineFactory, changed: Step
) -> None:
    # Same name at the same position: only the idempotency key tells the steps apart.
    n, changed_at = 60, 37
    calls: Counter[int] = Counter()
    excinfo = await _diverge(make_engine, calls, n, changed_at, changed)
    assert excinfo.value.step_id == changed_at
    assert excinfo.value.journaled == ("s", "idempotent")
    assert excinfo.value.called == ("s", changed.effect.value)
    assert calls == Counter(range(n)), "a journaled step ran again"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_tampered_result_inside_a_segment_aborts_without_running_it(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    n, tampered_at = 60, 41
    calls: Counter[int] = Counter()
    engine = make_engine()

    @engine.workflow(name="t")
    async def steps(ctx: Context) -> int:
        for i in range(n):
            await ctx.step("s", _op, calls, i)
        return n

    async with engine:
        with crash_after_step(engine, n - 1), pytest.raises(SimulatedCrash):
            await engine.run(steps, execution_id="t")
    with contextlib.closing(sqlite3.connect(tmp_path / "unbroken.db")) as conn, conn:
        (blob,) = conn.execute("SELECT payload FROM journal WHERE step_id = ?", (tampered_at,))
        flipped = bytes([*blob[0][:-1], blob[0][-1] ^ 1])
        conn.execute("UPDATE journal SET payload = ? WHERE step_id = ?", (flipped, tampered_at))

    engine2 = make_engine()
    engine2.workflow(name="t")(steps)
    async with engine2:
        with pytest.raises(ReplayIntegrity):
            await engine2.run(steps, execution_id="t")
        info = await engine2.get_execution("t")
    assert info is not None and info.status == "aborted"
    assert calls == Counter(range(n)), "a journaled step ran again"


async def test_a_guarded_step_replays_from_its_result_and_a_changed_key_is_divergence(
    make_engine: EngineFactory,
) -> None:
    n, guarded_at = 60, 37
    calls: Counter[int] = Counter()
    moved = Step.guarded(
        "pay", Intent.MONEY_MOVING, on_ambiguous=OnAmbiguous.FAIL, fingerprint=b"v2"
    )

    def workflow(changed: bool) -> Any:
        async def wf(ctx: Context) -> list[Any]:
            out = []
            for i in range(n):
                step = (moved if changed else GUARDED) if i == guarded_at else "s"
                out.append(await ctx.step_recorded(step, _op, calls, i))
            return [o.was_replayed for o in out]

        return wf

    async def crash(eid: str) -> None:
        # One execution crashed at a time: entering an engine recovers every orphan with the
        # code it registers, which would finish "changed" with the old code.
        engine = make_engine()
        engine.workflow(name="g", on_divergence="fail")(workflow(False))
        async with engine:
            with crash_after_step(engine, n - 1), pytest.raises(SimulatedCrash):
                await engine.run("g", execution_id=eid)

    await crash("same")
    engine2 = make_engine()  # the same code: every step replays, the guarded one too
    engine2.workflow(name="g", on_divergence="fail")(workflow(False))
    async with engine2:
        assert await engine2.run("g", execution_id="same") == [True] * n

    await crash("changed")
    assert calls == Counter({i: 2 for i in range(n)})
    engine3 = make_engine()  # the guarded step's fingerprint changed: its key did
    engine3.workflow(name="g", on_divergence="fail")(workflow(True))
    async with engine3:
        with pytest.raises(ReplayDivergence) as excinfo:
            await engine3.run("g", execution_id="changed")
    assert excinfo.value.step_id == guarded_at
    assert excinfo.value.journaled == ("pay", "exactly_once_guarded")
    assert "committed guarded effect" in str(excinfo.value)
    assert calls == Counter({i: 2 for i in range(n)}), "a journaled step ran again"

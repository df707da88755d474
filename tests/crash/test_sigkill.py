"""A real worker process is SIGKILLed at each journal write boundary and resumed (SPEC §9).

Each test crashes ``worker.py`` at one point of its mixed workflow, checks what the journal
holds at the crash (ref §9.1), resumes it on the same database and checks the oracle: the
resumed run returns the crash-free result, an operation whose result was committed never
runs again, and a guarded effect is never performed twice. The counting service over HTTP
says how many times each operation ran and with which ``Idempotency-Key``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from unbroken.journal import EntryKind

from .conftest import (
    GUARDED,
    OPS,
    STEP_OF,
    Baseline,
    WorkerRun,
    Workers,
    assert_journal_complete,
    inspect_execution,
    rows_by_kind,
)
from .service import CountingService

pytestmark = pytest.mark.crash

GUARDED_IDS = frozenset(STEP_OF[op] for op in GUARDED)
GROUP = frozenset({STEP_OF["quote_a"], STEP_OF["quote_b"], STEP_OF["quote_c"]})


@dataclass(frozen=True)
class CrashState:
    """What a crash point leaves behind (ref §9.1)."""

    results: frozenset[int]
    """Step ids whose result is committed at the crash."""
    intents: frozenset[int]
    """Step ids whose guarded intent is committed at the crash."""
    in_flight: frozenset[int]
    """Step ids whose operation reached the service but whose result is not committed."""


def crash_state(point: str) -> CrashState:
    """The journal and service state the worker's crash ``point`` leaves (see worker.py)."""
    if point == "begin":
        return CrashState(frozenset(), frozenset(), frozenset())
    if point == "group":
        return CrashState(
            frozenset({0, 1, STEP_OF["quote_a"]}),
            frozenset(),
            frozenset({STEP_OF["quote_b"], STEP_OF["quote_c"]}),
        )
    kind, _, k = point.partition(":")
    step = int(k)
    if kind == "after":
        done = frozenset(range(step + 1))
        return CrashState(done, GUARDED_IDS & done, frozenset())
    before = frozenset(range(step))
    if kind == "before-intent":
        return CrashState(before, GUARDED_IDS & before, frozenset())
    intents = GUARDED_IDS & (before | {step})
    if kind == "start":
        return CrashState(before, intents, frozenset())
    if kind == "effect":
        return CrashState(before, intents, frozenset({step}))
    raise ValueError(point)


def expected_calls(state: CrashState) -> dict[str, int]:
    """Service calls per operation over the crashed run and the resumed one.

    A step runs once, plus once more if it was in flight at the crash (its result was
    not committed, so it re-runs; a guarded one re-runs in the ambiguous window with the
    same key under SKIP/RERUN). A step whose result was committed never runs again.
    """
    return {op: 1 + (STEP_OF[op] in state.in_flight) for op in OPS}


def assert_crash_journal(db: Path, state: CrashState) -> None:
    """At the crash the execution is running and its journal holds exactly ``state``."""
    info = inspect_execution(db)
    assert info.status == "running"
    assert set(rows_by_kind(info, EntryKind.RESULT)) == state.results, info.steps
    assert set(rows_by_kind(info, EntryKind.INTENT)) == state.intents, info.steps
    assert max(rows_by_kind(info, EntryKind.RESULT).values(), default=1) == 1


def assert_resumed_ok(run: WorkerRun, baseline: Baseline) -> dict[str, Any]:
    assert run.returncode == 0, run.describe()
    assert run.report is not None, run.describe()
    assert run.report["result"] == baseline.result
    return run.report


def assert_same_keys(service: CountingService, baseline: Baseline) -> None:
    """Every call of an operation carried the key of its step (position-stable)."""
    for op in OPS:
        assert set(service.keys(op)) <= {baseline.keys[op]}, op


def audit_steps(report: dict[str, Any]) -> list[int]:
    return [record["step_id"] for record in report["audit"]]


# -- one test per crash point and guarantee ---------------------------------------------


def crash_then_resume(
    workers: Workers, point: str, *extra: str
) -> tuple[Path, dict[str, Any] | None, WorkerRun]:
    """Crash at ``point``, check the journal at the crash, resume; return the resumed run."""
    db = workers.db()
    marker = workers.marker()
    args = ("--crash", point, "--marker", str(marker), *extra)
    crashed = workers.run(db, *args)
    assert crashed.killed, f"{point}: {crashed.describe()}"
    assert crashed.report is None  # killed before printing anything
    assert_crash_journal(db, crash_state(point))
    resumed = workers.run(db, *args)
    return db, resumed.report, resumed


@pytest.mark.parametrize("point", ["after:0", "after:1", "after:4"])
def test_INV_10_committed_idempotent_step_never_reruns(
    point: str, workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """(a) SIGKILL right after idempotent / at-least-once results are committed: the
    resumed run replays them without calling their operations."""
    db, report, resumed = crash_then_resume(workers, point)
    assert_resumed_ok(resumed, baseline)
    assert report is not None and report["audit"] == []
    assert report["ops"] == len(OPS) - len(crash_state(point).results)
    assert service.counts() == dict.fromkeys(OPS, 1)
    assert_same_keys(service, baseline)
    assert_journal_complete(inspect_execution(db))


@pytest.mark.parametrize("policy", ["skip", "rerun"])
def test_FR_DE_10_ambiguous_window_reissues_with_same_key(
    policy: str, workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """(b) SIGKILL after the money-moving effect reached the service, before its result
    was committed: SKIP and RERUN call the operation again with the same Idempotency-Key
    (a deduplicating boundary performs it once), and an audit record names step and policy.
    """
    service.dedup = True
    db, _, resumed = crash_then_resume(workers, "effect:6", "--policy", policy)
    report = assert_resumed_ok(resumed, baseline)

    key = baseline.keys["pay"]
    assert service.keys("pay") == [key, key]
    assert service.performed("pay") == 1
    assert service.counts() == {**dict.fromkeys(OPS, 1), "pay": 2}
    assert report["audit"] == [
        {
            "execution_id": "crash-1",
            "step_id": STEP_OF["pay"],
            "step_name": "pay",
            "effect_class": "exactly_once_guarded",
            "idem_key_prefix": key[:16],
            "on_ambiguous": policy,
        }
    ]
    assert_journal_complete(inspect_execution(db))


def test_FR_DE_10_cost_bearing_defaults_to_skip_in_the_ambiguous_window(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """(b) A COST_BEARING step (no explicit policy) crashed in its ambiguous window is
    re-issued once with the same key: the paid boundary dedups it."""
    service.dedup = True
    db, _, resumed = crash_then_resume(workers, "effect:5")
    report = assert_resumed_ok(resumed, baseline)
    key = baseline.keys["charge"]
    assert service.keys("charge") == [key, key]
    assert service.performed("charge") == 1
    assert service.counts() == {**dict.fromkeys(OPS, 1), "charge": 2}
    assert [(r["step_id"], r["on_ambiguous"]) for r in report["audit"]] == [(5, "skip")]
    assert_journal_complete(inspect_execution(db))


@pytest.mark.parametrize(("point", "pay_calls"), [("effect:6", 1), ("start:6", 0)])
def test_FR_DE_10_ambiguous_window_fail_policy_raises_without_calling(
    point: str, pay_calls: int, workers: Workers, service: CountingService
) -> None:
    """(b) Under FAIL the resumed run raises AmbiguousEffect and never calls the operation,
    whether the crashed run reached the service (effect) or not (start); reopening the
    failed execution again (INV-16) applies the policy again and still does not call it."""
    db, report, resumed = crash_then_resume(workers, point, "--policy", "fail")
    assert resumed.returncode == 1, resumed.describe()
    assert report is not None and report["error"] == "AmbiguousEffect", resumed.describe()
    assert [(r["step_id"], r["on_ambiguous"]) for r in report["audit"]] == [(6, "fail")]
    expected = {**dict.fromkeys(OPS[:-2], 1), "pay": pay_calls}
    assert {op: n for op, n in service.counts().items() if n} == {
        op: n for op, n in expected.items() if n
    }

    info = inspect_execution(db)
    assert info.status == "failed"
    assert info.error_type == "AmbiguousEffect"
    assert set(rows_by_kind(info, EntryKind.RESULT)) == set(range(STEP_OF["pay"]))
    assert rows_by_kind(info, EntryKind.INTENT) == Counter(GUARDED_IDS)

    again = workers.run(db, "--policy", "fail")
    assert again.returncode == 1, again.describe()
    assert again.report is not None and again.report["error"] == "AmbiguousEffect"
    assert again.report["ops"] == 0
    assert service.calls("pay") == pay_calls
    assert service.calls("receipt") == 0


@pytest.mark.parametrize("point", ["after:5", "after:6", "start:7"])
def test_FR_DE_04_committed_guarded_result_is_never_rerun(
    point: str, workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """(c) SIGKILL once a guarded result is committed (acknowledged), including at the
    start of the next step: the resumed run replays it and does not call the operation."""
    db, _, resumed = crash_then_resume(workers, point, "--policy", "fail")
    report = assert_resumed_ok(resumed, baseline)
    assert service.counts() == dict.fromkeys(OPS, 1)
    assert report["audit"] == []  # nothing was ambiguous, even under FAIL
    assert_same_keys(service, baseline)
    assert_journal_complete(inspect_execution(db))


def test_INV_2_crash_inside_a_parallel_group(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """(d) SIGKILL while quote_a's result is committed and quote_b, quote_c are in flight:
    quote_a is replayed, the other two re-run under the same step ids (ids by call order,
    so their keys are unchanged) and the result is the crash-free one."""
    db, report, resumed = crash_then_resume(workers, "group")
    assert_resumed_ok(resumed, baseline)
    assert service.counts() == {**dict.fromkeys(OPS, 1), "quote_b": 2, "quote_c": 2}
    assert_same_keys(service, baseline)
    assert report is not None and report["ops"] == len(OPS) - 3  # quote_a was replayed
    assert_journal_complete(inspect_execution(db))


@pytest.mark.parametrize("point", ["before-intent:5", "before-intent:6"])
def test_FR_DE_04_crash_before_intent_runs_guarded_op_once(
    point: str, workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """(e) SIGKILL before a guarded step's intent is committed: nothing of it is in the
    journal, so the resumed run runs it fresh, once overall, with no ambiguity."""
    db, report, resumed = crash_then_resume(workers, point, "--policy", "fail")
    assert_resumed_ok(resumed, baseline)
    assert report is not None and report["audit"] == []
    assert service.counts() == dict.fromkeys(OPS, 1)
    assert_journal_complete(inspect_execution(db))


def test_FR_DE_10_ambiguous_resolution_is_journaled_and_survives_a_second_crash(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """Crash in pay's ambiguous window; the resumed run re-issues pay (SKIP) and is killed
    again at the start of the next step; the third run replays pay's journaled result."""
    service.dedup = True
    db = workers.db()
    first = workers.run(db, "--crash", "effect:6", "--marker", str(workers.marker("m1")))
    assert first.killed, first.describe()
    second = workers.run(db, "--crash", "start:7", "--marker", str(workers.marker("m2")))
    assert second.killed, second.describe()
    assert_crash_journal(db, crash_state("start:7"))
    third = workers.run(db)
    report = assert_resumed_ok(third, baseline)
    assert report["audit"] == []
    assert report["ops"] == 1  # receipt only
    assert service.counts() == {**dict.fromkeys(OPS, 1), "pay": 2}
    assert service.keys("pay") == [baseline.keys["pay"]] * 2
    assert service.performed("pay") == 1
    assert_journal_complete(inspect_execution(db))


def test_INV_4_acked_intent_commits_the_buffered_prefix_first(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """With a 5 s group-commit interval the results of steps 0-4 are still buffered when
    charge's intent is acknowledged; the intent's commit must carry them, so a SIGKILL
    inside charge (no explicit flush) finds all five results committed."""
    db, _, resumed = crash_then_resume(workers, "start:5", "--flush-ms", "5000", "--no-flush")
    assert_resumed_ok(resumed, baseline)
    assert service.counts() == dict.fromkeys(OPS, 1)
    assert_journal_complete(inspect_execution(db))


def test_buffered_result_not_yet_committed_reruns_by_class(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """Ref §9.1: an idempotent result still in the group-commit buffer at the crash is
    lost, and the step runs again on resume (acceptable for its effect class)."""
    db = workers.db()
    marker = workers.marker()
    args = ("--crash", "start:1", "--marker", str(marker), "--flush-ms", "5000", "--no-flush")
    crashed = workers.run(db, *args)
    assert crashed.killed, crashed.describe()
    assert_crash_journal(db, CrashState(frozenset(), frozenset(), frozenset()))
    resumed = workers.run(db, *args)
    assert_resumed_ok(resumed, baseline)
    assert service.counts() == {**dict.fromkeys(OPS, 1), "load": 2}
    assert service.keys("load") == [baseline.keys["load"]] * 2
    assert_journal_complete(inspect_execution(db))


def test_INV_13_divergence_after_crash_never_refires_committed_guarded_effect(
    workers: Workers, service: CountingService, baseline: Baseline
) -> None:
    """A crash in pay's ambiguous window, then a resume by changed code (the at-least-once
    step renamed): replay diverges at step 1, generation 0 is aborted and the workflow
    restarts fresh as generation 1. The committed charge is found by its key and not
    re-fired (INV-13); pay, with only an intent in generation 0, is in the ambiguous
    window and its SKIP policy re-issues it with the same key."""
    service.dedup = True
    db = workers.db()
    marker = workers.marker()
    crashed = workers.run(db, "--crash", "effect:6", "--marker", str(marker))
    assert crashed.killed, crashed.describe()
    resumed = workers.run(db, "--rename", "notify")
    report = assert_resumed_ok(resumed, baseline)

    rerun = {op: 2 for op in OPS if op not in GUARDED}  # fresh generation: unguarded re-run
    assert service.counts() == {**rerun, "charge": 1, "pay": 2, "receipt": 1}
    assert service.keys("pay") == [baseline.keys["pay"]] * 2
    assert service.performed("pay") == 1
    assert [(r["step_id"], r["on_ambiguous"]) for r in report["audit"]] == [(6, "skip")]

    info = inspect_execution(db)
    assert info.status == "completed"
    assert info.generation == 1
    latest = Counter(s.step_id for s in info.steps if s.kind is EntryKind.RESULT
                     and s.generation == 1)
    assert max(latest.values()) == 1
    assert set(latest) == set(range(len(OPS))) - {STEP_OF["charge"]}  # charge: gen 0's
    for op in GUARDED:
        results = [s for s in info.steps if s.kind is EntryKind.RESULT and s.name == op]
        assert len(results) == 1, (op, results)


# -- the crash matrix -------------------------------------------------------------------

MATRIX = (
    "begin",
    "after:0",
    "start:1",
    "effect:1",
    "after:1",
    "group",
    "after:4",
    "start:5",
    "effect:5",
    "after:5",
    "start:6",
    "effect:6",
    "after:6",
    "start:7",
    "effect:7",
    "after:7",
)
"""Every journal write boundary of the worker's workflow, in order: before the first
step, around each step's operation, inside the parallel group, around each guarded step's
intent and result, and after the last step before the execution is finalized."""


def test_crash_matrix_every_write_boundary(
    tmp_path: Path, service: CountingService, baseline: Baseline, crash_backend: str
) -> None:
    """SPEC §9 crash matrix: for each boundary, SIGKILL there, resume, and check that the
    result is the crash-free one, that no committed step re-ran (FR-DE-04, INV-10) and
    that no guarded effect was performed twice (dedup boundary, same key)."""
    service.dedup = True
    for point in MATRIX:
        service.reset()
        case = tmp_path / point.replace(":", "-")
        case.mkdir()
        pool = Workers(case, service, crash_backend)
        try:
            state = crash_state(point)
            _, report, resumed = crash_then_resume(pool, point)
            assert_resumed_ok(resumed, baseline)
            assert report is not None
            assert report["ops"] == len(OPS) - len(state.results), point  # replayed: no call
            assert service.counts() == expected_calls(state), point
            for op in GUARDED:
                assert service.performed(op) == 1, (point, op)
            assert_same_keys(service, baseline)
            ambiguous = sorted(state.intents - state.results)
            assert audit_steps(report) == ambiguous, point
            assert_journal_complete(inspect_execution(pool.db()))
        finally:
            pool.cleanup()

"""PostgreSQL fencing (SPEC §3 INV-15): each test takes away what one protection alone
must stop, so each fails when that protection is removed.

- A write on the lock session, after that session was killed unnoticed (no heartbeat
  ran), is refused: right after the kill it finds the session dead or fails on it (which
  way is timing), losing its locks there; after a take-over, on the new session it
  reconnected, only the in-memory record of lost locks refuses it.
- A lock session that dies under a write (inside its transaction, or under its one
  autocommitted statement) is lost there and then: the write fails as ``OwnershipLost``
  (unconfirmed) and ``watch``'s callback hears it, even when reconnecting fails.
- A write that finds the lock session busy runs on a pooled connection: it is refused
  when the lock session no longer holds the lock in ``pg_locks``.
- The barrier: a new owner's ``barrier`` (which taking ownership runs) waits out an old
  owner's pooled write that passed the fence, so the journal it reads next holds it.

These run when ``UNBROKEN_TEST_POSTGRES_URL`` is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import pytest

from unbroken.errors import ExecutionLocked, OwnershipLost, StorageUnavailable
from unbroken.ids import lock_name
from unbroken.journal import ExecutionStatus
from unbroken.ownership import ownership_for

from .conftest import admin_execute, needs_postgres, open_storage, signer
from .test_contract import claims, create, enqueue, entry

pytest.importorskip("psycopg")

from unbroken.storage.postgres import PostgresStorage
from unbroken.storage.postgres_rows import Connection

pytestmark = needs_postgres
OWNED = "owned"
OTHER = "other"


@pytest.fixture
def old(url: str) -> Iterator[PostgresStorage]:
    """The first owner."""
    with open_storage(url) as store:
        yield store


@pytest.fixture
def new(url: str) -> Iterator[PostgresStorage]:
    """The owner that takes over once the first one's lock session ended."""
    with open_storage(url) as store:
        yield store


def end_lock_session(old: PostgresStorage) -> None:
    """End ``old``'s lock session on the server (as a lapsed lease does) without ``old``
    noticing, and wait until the server has ended it (and released its locks)."""
    pid = old._lock_pid
    admin_execute("SELECT pg_terminate_backend(%s)", (pid,))
    for _ in range(400):
        if admin_execute("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(0,)]:
            return
        time.sleep(0.025)
    pytest.fail("the server did not end the lock session")


def end_lock_session_and_take_over(old: PostgresStorage, new: PostgresStorage) -> None:
    """``end_lock_session``, then take ``OWNED``'s lock in ``new``."""
    end_lock_session(old)
    assert new.try_lock(lock_name(OWNED)) is None


@contextmanager
def lock_session_busy(store: PostgresStorage) -> Iterator[None]:
    """Another thread holds ``store``'s lock session meanwhile: writes take a pooled
    connection."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with store._lock_mutex:
            held.set()
            done.wait()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    held.wait()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def write_stalled_after_fence(
    old: PostgresStorage, monkeypatch: pytest.MonkeyPatch, step: int
) -> Iterator[list[BaseException]]:
    """``old`` appends ``OWNED``'s entry ``step`` on a pooled connection (its lock session
    is busy meanwhile): the write passes the fence while ``old`` holds the lock, then stalls
    before its insert until the block ends, and goes on. Yields the write's failures."""
    fenced, resume = threading.Event(), threading.Event()
    real_fence = old.fence

    def stalling_fence(conn: Connection, op: str, execution_ids: Iterable[str]) -> None:
        real_fence(conn, op, execution_ids)
        if conn is not old._lock_conn:
            fenced.set()
            resume.wait()

    monkeypatch.setattr(old, "fence", stalling_fence)
    failures: list[BaseException] = []

    def write() -> None:
        try:
            old.append([entry(OWNED, step)])
        except BaseException as exc:
            failures.append(exc)

    with lock_session_busy(old):
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            assert fenced.wait(30), failures
            yield failures
        finally:
            resume.set()
            writer.join()


def steps(store: PostgresStorage) -> list[int]:
    return [e.step_id for e in store.read_segment(OWNED, 0, 0, 10)]


@pytest.mark.parametrize("taken_over", [False, True], ids=["just-killed", "taken-over"])
def test_writes_after_the_lock_session_was_killed_are_refused_as_ownership_lost(
    old: PostgresStorage, new: PostgresStorage, taken_over: bool
) -> None:
    """No heartbeat tells ``old`` its session was killed. Right after the kill, its write
    either finds the session dead before sending or fails on it; once another owner has
    taken the lock, it reconnects a new lock session, where only the remembered loss of
    the lock refuses it. Either way the whole batch is refused, the loss reported, and
    every later write for the execution refused too."""
    reported: list[list[str]] = []
    old.watch(60.0, reported.append)  # no heartbeat within the test
    create(old, OWNED)
    create(old, OTHER)
    assert old.try_lock(lock_name(OWNED)) is None
    old.append([entry(OWNED, 0)])
    if taken_over:
        end_lock_session_and_take_over(old, new)
    else:
        admin_execute("SELECT pg_terminate_backend(%s)", (old._lock_pid,))

    with pytest.raises(OwnershipLost, match=f"ownership of execution '{OWNED}' was lost"):
        old.append([entry(OWNED, 1), entry(OTHER, 0)])
    assert reported == [[lock_name(OWNED)]]
    with pytest.raises(OwnershipLost):
        old.append([entry(OWNED, 1)])
    with pytest.raises(OwnershipLost):
        old.finalize_execution(OWNED, ExecutionStatus.COMPLETED, 5)
    assert old._lock_conn is not None and not old._lock_conn.broken  # it did reconnect
    assert steps(new) == [0]
    assert new.read_segment(OTHER, 0, 0, 10) == []  # the whole batch was refused
    if taken_over:
        new.append([entry(OWNED, 1)])  # the new owner writes on
        assert steps(new) == [0, 1]


WRITES_ON_THE_LOCK_SESSION: dict[str, Callable[[PostgresStorage], object]] = {
    "signed append": lambda store: store.append([entry(OWNED, 1)], signer),
    "abort": lambda store: store.abort_generation(OWNED, 0, 5_000),
    "append": lambda store: store.append([entry(OWNED, 1)]),  # one statement, autocommit
    "finalize": lambda store: store.finalize_execution(OWNED, ExecutionStatus.COMPLETED, 5),
}


@pytest.mark.parametrize("write", list(WRITES_ON_THE_LOCK_SESSION))
def test_a_lock_session_dying_under_a_write_is_ownership_lost_and_reported_at_once(
    old: PostgresStorage, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    """The lock session ends inside the write's transaction, after its fence: the write's
    next statement fails on the dead session, which loses its locks there and then."""
    reported: list[list[str]] = []
    old.watch(60.0, reported.append)  # no heartbeat within the test
    create(old, OWNED)
    assert old.try_lock(lock_name(OWNED)) is None  # its signed counts are read anew
    old.append([entry(OWNED, 0)])
    real_fence = old.fence

    def fence_then_end_session(conn: Connection, op: str, ids: Iterable[str]) -> None:
        real_fence(conn, op, ids)
        if conn is old._lock_conn:
            end_lock_session(old)

    monkeypatch.setattr(old, "fence", fence_then_end_session)
    with pytest.raises(OwnershipLost, match=f"'{OWNED}' was lost; the write may have"):
        WRITES_ON_THE_LOCK_SESSION[write](old)
    assert reported == [[lock_name(OWNED)]]
    assert old.lapsed(lock_name(OWNED))
    assert steps(old) == [0]
    record = old.get_execution(OWNED)
    assert record is not None and record.generation == 0
    assert record.status is ExecutionStatus.RUNNING


def test_locks_lost_with_a_session_are_reported_when_reconnecting_fails(
    old: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next write finds the lock session dead and the server still unreachable: the
    write fails to connect, and the locks that went with the session are reported all the
    same (no heartbeat would: there is no session left to beat on)."""
    reported: list[list[str]] = []
    old.watch(60.0, reported.append)  # no heartbeat within the test
    create(old, OWNED)
    assert old.try_lock(lock_name(OWNED)) is None
    end_lock_session(old)

    def unreachable(op: str) -> Connection:
        raise StorageUnavailable(op, "the server cannot be reached")

    monkeypatch.setattr(old, "_connect", unreachable)
    with pytest.raises(StorageUnavailable):
        old.create_execution("another", "wf", b"", 0)  # a write that names no lock
    assert reported == [[lock_name(OWNED)]]
    assert old.lapsed(lock_name(OWNED))


def test_a_pooled_write_is_refused_once_the_lock_session_no_longer_holds_the_lock(
    old: PostgresStorage, new: PostgresStorage
) -> None:
    """The lock session is busy, so the write runs on a pooled connection, where only the
    ``pg_locks`` check can tell that the lock went with its session."""
    create(old, OWNED)
    assert old.try_lock(lock_name(OWNED)) is None
    with lock_session_busy(old):
        old.append([entry(OWNED, 0)])  # the pooled path writes while the lock is held
    end_lock_session_and_take_over(old, new)

    with lock_session_busy(old), pytest.raises(OwnershipLost, match=f"'{OWNED}'"):
        old.append([entry(OWNED, 1)])
    assert steps(new) == [0]


def test_the_barrier_waits_out_a_pooled_write_that_passed_the_fence(
    old: PostgresStorage, new: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``old`` passes the fence on a pooled connection while it still holds the lock, then
    stalls before its insert; meanwhile its lock session ends and ``new`` takes the lock.
    ``new``'s barrier must not let it read the journal until that write has committed."""
    create(old, OWNED)
    assert old.try_lock(lock_name(OWNED)) is None
    old.append([entry(OWNED, 0)])
    with write_stalled_after_fence(old, monkeypatch, 1) as failures:
        end_lock_session_and_take_over(old, new)
        with pytest.raises(ExecutionLocked):
            new.barrier(OWNED, timeout_secs=0.2)  # the write still holds the row
    assert failures == []  # it passed the fence while the lock was held: it commits
    new.barrier(OWNED)
    assert steps(new) == [0, 1]  # so the new owner reads it before going on


def test_taking_ownership_does_not_return_while_the_old_owners_write_may_commit(
    old: PostgresStorage, new: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, through ``Ownership.acquire`` (what an engine resuming an execution
    calls): it refuses while the old owner's write is in flight, then returns with that
    write in the journal."""
    create(old, OWNED)
    assert old.try_lock(lock_name(OWNED)) is None
    old.append([entry(OWNED, 0)])
    new.watch(1.0, lambda names: None)  # the barrier waits one lease at most
    ownership = ownership_for(new)
    with write_stalled_after_fence(old, monkeypatch, 1) as failures:
        end_lock_session(old)
        with pytest.raises(ExecutionLocked):
            ownership.acquire(OWNED)
    assert failures == []
    with ownership.acquire(OWNED):
        assert steps(new) == [0, 1]


class _ClearHook(dict[int, str]):
    """The held-locks map, calling ``on_clear`` as the storage forgets them."""

    on_clear: Callable[[], None] = staticmethod(lambda: None)

    def clear(self) -> None:
        super().clear()
        self.on_clear()


def test_a_pooled_write_while_the_lock_session_is_being_dropped_is_refused(
    old: PostgresStorage, new: PostgresStorage
) -> None:
    """A write finds the lock session dead and drops it; another thread's write, which finds
    the session busy meanwhile, runs on a pooled connection. Checked just as the storage
    forgets its held locks, it must already see them as lost, not as never locked (which
    operator writes pass unguarded)."""
    create(old, OWNED)
    create(old, "other")
    assert old.try_lock(lock_name(OWNED)) is None
    assert old.try_lock(lock_name("other")) is None
    end_lock_session_and_take_over(old, new)
    failures: list[BaseException] = []

    def pooled_write() -> None:  # the dropping thread holds the lock session
        try:
            old.append([entry(OWNED, 0)])
        except BaseException as exc:
            failures.append(exc)

    def write_meanwhile() -> None:
        thread = threading.Thread(target=pooled_write)
        thread.start()
        thread.join()

    hooked = _ClearHook(old._held)
    hooked.on_clear = write_meanwhile
    old._held = hooked
    with pytest.raises(OwnershipLost):
        old.append([entry("other", 0)])  # finds the session dead and drops it
    assert [type(exc) for exc in failures] == [OwnershipLost]
    assert steps(new) == []


def test_a_queue_claim_skips_an_execution_while_its_old_owners_write_is_in_flight(
    old: PostgresStorage, new: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers claim from the queue without the barrier: the claim's row locks must skip
    an execution whose lapsed owner still has a write in flight, and take it after."""
    enqueue(old, OWNED, 1_000)
    assert old.claim_queued("q", 1, claims(old), ["wf"]) == [(OWNED, "wf")]
    taker = claims(new)
    claimed: list[list[tuple[str, str]]] = []

    def claim() -> None:
        claimed.append(new.claim_queued("q", 1, taker, ["wf"]))

    with write_stalled_after_fence(old, monkeypatch, 0) as failures:
        end_lock_session(old)
        thread = threading.Thread(target=claim, daemon=True)
        thread.start()
        thread.join(30)  # a claim waiting on the row (not skipping it) never returns
        assert claimed == [[]], "claimed while the old owner's write was in flight"
    assert failures == []
    try:
        assert new.claim_queued("q", 1, taker, ["wf"]) == [(OWNED, "wf")]
        assert steps(new) == [0]
    finally:
        taker.release_all()

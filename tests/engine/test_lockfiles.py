"""INV-15 with lock files made ahead of need (``Ownership(..., ahead=True)``, as an engine
uses it): a file linked into place is a lock like any other."""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import unbroken
from unbroken import Engine, lockfiles
from unbroken.errors import ExecutionLocked, StorageError
from unbroken.ids import lock_name
from unbroken.lockfiles import LockDir
from unbroken.ownership import Ownership

from .conftest import EXECUTION, subprocess_env

TRY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from unbroken.errors import ExecutionLocked, StorageError
    from unbroken.ownership import Ownership

    try:
        Ownership(Path(sys.argv[1])).acquire(sys.argv[2]).release()
    except ExecutionLocked as exc:
        print("locked", exc.holder_pid)
    else:
        print("acquired")
    """
)


def _try_elsewhere(lock_dir: Path, execution_id: str) -> str:
    """What another process gets when it tries to own the execution."""
    done = subprocess.run(
        [sys.executable, "-c", TRY, str(lock_dir), execution_id],
        capture_output=True, text=True, env=subprocess_env(), timeout=60, check=True,
    )
    return done.stdout.strip()


def _ready(ownership: Ownership) -> Ownership:
    async def wait() -> None:
        while ownership.short():
            await ownership.made()

    asyncio.run(wait())
    return ownership


def _spares(lock_dir: Path) -> dict[int, str]:
    return {p.stat().st_ino: p.name for p in (lock_dir / ".spares").iterdir()}


def _lock_file(lock_dir: Path, execution_id: str = EXECUTION) -> Path:
    return lock_dir / f"{lock_name(execution_id)}.lock"


def test_inv15_a_lock_file_made_ahead_locks_out_another_process(lock_dir: Path) -> None:
    ownership = _ready(Ownership(lock_dir, ahead=True))
    try:
        spares = _spares(lock_dir)
        with ownership.acquire(EXECUTION):
            assert _lock_file(lock_dir).stat().st_ino in spares  # linked, not created
            assert _lock_file(lock_dir).read_text() == f"{os.getpid()}\n"
            assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
        assert _try_elsewhere(lock_dir, EXECUTION) == "acquired"
    finally:
        ownership.close()


def test_inv15_a_file_made_ahead_never_replaces_a_held_lock_file(
    lock_dir: Path, holder: subprocess.Popen[str]
) -> None:
    inode = _lock_file(lock_dir).stat().st_ino
    ownership = _ready(Ownership(lock_dir, ahead=True))
    try:
        spares = _spares(lock_dir)
        with pytest.raises(ExecutionLocked) as info:
            ownership.acquire(EXECUTION)
        assert info.value.holder_pid == holder.pid
        assert _lock_file(lock_dir).stat().st_ino == inode
        # The spare went back unused (the maker may have made more meanwhile).
        assert spares.items() <= _spares(lock_dir).items()
        with ownership.acquire("other"):
            assert _lock_file(lock_dir, "other").stat().st_ino in spares
    finally:
        ownership.close()


def test_inv15_a_lock_file_made_ahead_stays_while_its_execution_runs(lock_dir: Path) -> None:
    ownership = _ready(Ownership(lock_dir, ahead=True))
    try:
        with ownership.acquire(EXECUTION):
            inode = _lock_file(lock_dir).stat().st_ino
        with ownership.acquire(EXECUTION):
            assert _lock_file(lock_dir).stat().st_ino == inode
    finally:
        ownership.close()
    assert _lock_file(lock_dir).stat().st_ino == inode


def test_inv15_an_ended_execution_s_file_goes_and_its_next_owner_links_a_spare(
    lock_dir: Path,
) -> None:
    ownership = _ready(Ownership(lock_dir, ahead=True))
    try:
        ownership.acquire(EXECUTION).release(ended=True)
        assert not _lock_file(lock_dir).exists()
        _ready(ownership)
        spares = _spares(lock_dir)
        with ownership.acquire(EXECUTION):  # reopened (a failed one runs again)
            assert _lock_file(lock_dir).stat().st_ino in spares
            assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
        assert _try_elsewhere(lock_dir, EXECUTION) == "acquired"
    finally:
        ownership.close()


def test_closing_removes_unused_spares_and_a_dead_process_spares_go_too(
    lock_dir: Path,
) -> None:
    _ready(Ownership(lock_dir, ahead=True)).close()
    assert _spares(lock_dir) == {}
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (lock_dir / ".spares" / f"{gone.stdout.strip()}-0").touch()
    ownership = _ready(Ownership(lock_dir, ahead=True))
    try:
        assert all(not name.startswith(f"{gone.stdout.strip()}-")
                   for name in _spares(lock_dir).values())
    finally:
        ownership.close()


def test_lock_files_are_created_in_place_when_none_can_be_made_ahead(
    lock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock_dir.mkdir(parents=True)
    (lock_dir / ".spares").write_text("not a directory")
    ownership = Ownership(lock_dir, ahead=True)
    try:
        assert not ownership.short()  # nothing to wait for
        with ownership.acquire(EXECUTION):
            assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
    finally:
        ownership.close()
    assert "not made ahead" in caplog.text


async def test_an_engine_starts_many_executions_on_lock_files_made_ahead(
    tmp_path: Path,
) -> None:
    engine = Engine(f"sqlite:///{tmp_path / 'app.db'}")

    @engine.workflow(name="twice")
    async def twice(ctx: unbroken.Context, n: int) -> int:
        return await ctx.step("double", lambda: n * 2)  # type: ignore[no-any-return]

    async with engine:
        results = await asyncio.gather(*(engine.run("twice", n) for n in range(100)))
    assert results == [n * 2 for n in range(100)]
    locks = tmp_path / "app.db.locks"
    assert list(locks.glob("*.lock")) == []  # each went with its execution's end
    assert _spares(locks) == {}  # the engine's close removed those not used


async def test_an_engine_that_starts_nothing_makes_no_lock_files_ahead(tmp_path: Path) -> None:
    async with Engine(f"sqlite:///{tmp_path / 'app.db'}"):
        pass
    assert not (tmp_path / "app.db.locks" / ".spares").exists()


class Gate:
    """Holds the spare maker before each file it makes, until ``allow``ed or ``open``."""

    def __init__(self) -> None:
        self.entered = threading.Event()  # the maker reached the gate
        self._allowed = threading.Semaphore(0)
        self._open = threading.Event()

    def count(self) -> Iterator[int]:
        """``itertools.count`` for the maker's spare names, through the gate."""
        for n in itertools.count():
            self.entered.set()
            if not self._open.is_set():
                self._allowed.acquire()
            yield n

    def allow(self, files: int) -> None:
        self._allowed.release(files)

    def open(self) -> None:
        self._open.set()
        self._allowed.release()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    monkeypatch.setattr(lockfiles, "itertools", types.SimpleNamespace(count=held.count))
    try:
        yield held
    finally:
        held.open()


async def test_a_start_cancelled_while_waiting_for_a_spare_is_forgotten(
    lock_dir: Path, gate: Gate
) -> None:
    files = LockDir(lock_dir, ahead=True)
    try:
        assert files.short()  # the maker starts, held before its first file
        cancelled = [asyncio.create_task(files.made()) for _ in range(8)]
        await asyncio.sleep(0)
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        waiting = asyncio.create_task(files.made())
        await asyncio.sleep(0)
        gate.allow(1)
        # The first file is the one waiter's: it is not kept waiting for eight more.
        await asyncio.wait_for(waiting, 2)
    finally:
        gate.open()
        await asyncio.to_thread(files.close)


def test_a_removed_lock_directory_does_not_make_acquire_wait_for_the_maker(
    lock_dir: Path, gate: Gate
) -> None:
    files = LockDir(lock_dir, ahead=True)
    before = set(threading.enumerate())
    assert files.short()  # the maker starts, held before its first file
    (maker,) = (t for t in threading.enumerate() if t not in before and t.name == "unbroken-locks")
    assert gate.entered.wait(10)
    shutil.rmtree(lock_dir)
    acquired = threading.Event()

    def acquire() -> None:  # on the event loop's thread, as an engine's start does
        os.close(files.acquire(EXECUTION))
        acquired.set()

    thread = threading.Thread(target=acquire)
    closing = threading.Thread(target=files.close)
    thread.start()
    try:
        assert acquired.wait(2), "acquire waited for the maker's file in progress"
        closing.start()
        closing.join(0.2)
        assert closing.is_alive(), "close did not wait for the maker stopped meanwhile"
    finally:
        gate.open()
        thread.join()
        if closing.ident is None:
            closing.start()
        closing.join()
    assert not maker.is_alive()  # no spare is made once close returned
    assert _lock_file(lock_dir).exists()


def _flock_hook(monkeypatch: pytest.MonkeyPatch, before: Callable[[int], None]) -> None:
    """``lockfiles`` takes its locks through a ``flock`` that first calls ``before(fd)``:
    what another process does between a lock file's open and its flock."""

    def flock(fd: int, operation: int) -> None:
        before(fd)
        fcntl.flock(fd, operation)

    names = ("LOCK_EX", "LOCK_NB", "LOCK_SH")
    hooked = types.SimpleNamespace(flock=flock, **{n: getattr(fcntl, n) for n in names})
    monkeypatch.setattr(lockfiles, "fcntl", hooked)


def _removed_by_its_owner(lock_dir: Path) -> Callable[[int], None]:
    """An owner holds the lock; the ``before`` of the first flock after: the owner's
    execution ends, so it unlinks the file while it holds it, then closes it."""
    owner = LockDir(lock_dir)
    owner_fd = owner.acquire(EXECUTION)
    opened: list[int] = []

    def before(fd: int) -> None:
        if not opened:
            opened.append(os.fstat(fd).st_ino)
            assert opened[0] == _lock_file(lock_dir).stat().st_ino  # the owner's file
            owner.release(owner_fd, EXECUTION, remove=True)
            assert not _lock_file(lock_dir).exists()

    return before


def test_inv15_an_acquire_that_flocked_a_removed_file_takes_the_current_one(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _flock_hook(monkeypatch, _removed_by_its_owner(lock_dir))
    fd = LockDir(lock_dir).acquire(EXECUTION)
    monkeypatch.undo()
    try:
        # It holds the file the name gives, so a third process is locked out; holding the
        # removed one, both would own the execution.
        assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
        assert os.fstat(fd).st_ino == _lock_file(lock_dir).stat().st_ino
    finally:
        os.close(fd)
    assert _try_elsewhere(lock_dir, EXECUTION) == "acquired"


def test_an_acquire_whose_file_is_removed_at_every_open_fails_naming_it(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _lock_file(lock_dir)
    _flock_hook(monkeypatch, lambda fd: path.unlink())
    with pytest.raises(StorageError, match=r"removed after each of \d+ opens"):
        LockDir(lock_dir).acquire(EXECUTION)


def _replaced_before_the_flock(lock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Before the next flock: the owner removes its file, and a newcomer takes the lock of
    a new one under the name (its file descriptor lands in the list returned)."""
    removed = _removed_by_its_owner(lock_dir)
    newcomer = LockDir(lock_dir)
    later: list[int] = []

    def before(fd: int) -> None:
        removed(fd)
        monkeypatch.undo()
        later.append(newcomer.acquire(EXECUTION))

    _flock_hook(monkeypatch, before)
    return later


def test_the_probe_looks_at_the_current_file_when_its_file_was_removed(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = _replaced_before_the_flock(lock_dir, monkeypatch)
    try:
        assert LockDir(lock_dir).held(EXECUTION)
    finally:
        monkeypatch.undo()
        for fd in later:
            os.close(fd)
    assert not LockDir(lock_dir).held(EXECUTION)


def test_inv15_a_discard_that_flocked_a_removed_file_leaves_the_new_owner_s_file(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = _replaced_before_the_flock(lock_dir, monkeypatch)  # ended; started again
    try:
        assert LockDir(lock_dir).discard([EXECUTION]) == 0
        monkeypatch.undo()
        assert _lock_file(lock_dir).stat().st_ino == os.fstat(later[0]).st_ino
        assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
    finally:
        monkeypatch.undo()
        for fd in later:
            os.close(fd)


def test_inv15_a_release_after_the_lock_directory_was_made_again_leaves_the_new_file(
    lock_dir: Path,
) -> None:
    files = LockDir(lock_dir)
    fd = files.acquire(EXECUTION)
    shutil.rmtree(lock_dir)  # the directory is removed under its owner, then made again
    files.release(files.acquire("other"), "other")
    other = LockDir(lock_dir).acquire(EXECUTION)  # a new file in the new directory
    try:
        files.release(fd, EXECUTION, remove=True)  # the execution ended
        assert _lock_file(lock_dir).stat().st_ino == os.fstat(other).st_ino
        assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
    finally:
        os.close(other)


def test_inv15_an_acquire_refused_by_a_file_its_holder_just_removed_takes_a_new_one(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner_fd = LockDir(lock_dir).acquire(EXECUTION)
    inode = _lock_file(lock_dir).stat().st_ino

    def before(fd: int) -> None:
        # After our open its owner's execution ends: it unlinks the file it still holds.
        if os.fstat(fd).st_ino == inode:
            _lock_file(lock_dir).unlink()

    _flock_hook(monkeypatch, before)
    try:
        fd = LockDir(lock_dir).acquire(EXECUTION)
    finally:
        monkeypatch.undo()
        os.close(owner_fd)
    try:
        assert os.fstat(fd).st_ino == _lock_file(lock_dir).stat().st_ino
        assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
    finally:
        os.close(fd)


def test_inv15_a_forked_child_s_release_leaves_its_parent_s_lock_file(lock_dir: Path) -> None:
    files = LockDir(lock_dir)
    fd = files.acquire(EXECUTION)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child gives back what it inherited, as if its execution ended
            code = 1
            try:
                files.release(fd, EXECUTION, remove=True)
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert os.fstat(fd).st_ino == _lock_file(lock_dir).stat().st_ino
        assert _try_elsewhere(lock_dir, EXECUTION) == f"locked {os.getpid()}"
    finally:
        files.release(fd, EXECUTION)

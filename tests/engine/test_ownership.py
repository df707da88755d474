"""INV-15: exactly one live process owns an execution at a time."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
from pathlib import Path

import pytest

from unbroken.errors import ExecutionLocked
from unbroken.ids import lock_name
from unbroken.ownership import Ownership, _registry

from .conftest import EXECUTION


def test_inv15_second_acquire_fails_naming_execution_and_holder(lock_dir: Path) -> None:
    ownership = Ownership(lock_dir)
    with ownership.acquire(EXECUTION):
        with pytest.raises(ExecutionLocked) as info:
            Ownership(lock_dir).acquire(EXECUTION)
        assert info.value.execution_id == EXECUTION
        assert info.value.holder_pid == os.getpid()
        assert EXECUTION in str(info.value) and str(os.getpid()) in str(info.value)


def test_inv15_same_ownership_object_cannot_acquire_twice(lock_dir: Path) -> None:
    ownership = Ownership(lock_dir)
    lock = ownership.acquire(EXECUTION)
    try:
        with pytest.raises(ExecutionLocked):
            ownership.acquire(EXECUTION)
    finally:
        lock.release()


def test_inv15_distinct_executions_do_not_contend(lock_dir: Path) -> None:
    ownership = Ownership(lock_dir)
    with ownership.acquire("a"), ownership.acquire("b"), Ownership(lock_dir).acquire("c"):
        pass


def test_inv15_reacquire_after_release_succeeds(lock_dir: Path) -> None:
    ownership = Ownership(lock_dir)
    lock = ownership.acquire(EXECUTION)
    lock.release()
    lock.release()  # idempotent
    assert not lock.held
    with Ownership(lock_dir).acquire(EXECUTION) as again:
        assert again.held and again.execution_id == EXECUTION
    assert not again.held


def test_inv15_a_lock_file_stays_while_its_execution_runs(lock_dir: Path) -> None:
    path = lock_dir / f"{lock_name(EXECUTION)}.lock"
    with Ownership(lock_dir).acquire(EXECUTION):
        inode = path.stat().st_ino
    assert path.exists()
    with Ownership(lock_dir).acquire(EXECUTION):
        assert path.stat().st_ino == inode


def test_inv15_lock_file_named_by_hash_not_by_id(lock_dir: Path) -> None:
    execution_id = "customer-secret-id/../x"
    with Ownership(lock_dir).acquire(execution_id):
        names = [p.name for p in lock_dir.iterdir()]
    assert names == [f"{lock_name(execution_id)}.lock"]
    assert "customer" not in names[0] and "secret" not in names[0]
    assert len(lock_name(execution_id)) == 32


def test_inv15_lock_dir_and_file_are_private(lock_dir: Path) -> None:
    nested = lock_dir / "deeper"
    with Ownership(nested).acquire(EXECUTION):
        assert nested.stat().st_mode & 0o077 == 0
        file_mode = (nested / f"{lock_name(EXECUTION)}.lock").stat().st_mode & 0o777
        assert file_mode & 0o077 == 0


def test_inv15_lock_file_holds_owner_pid(lock_dir: Path) -> None:
    with Ownership(lock_dir).acquire(EXECUTION):
        text = (lock_dir / f"{lock_name(EXECUTION)}.lock").read_text()
    assert text.strip() == str(os.getpid())


def test_inv15_garbage_in_lock_file_reports_unknown_holder(lock_dir: Path) -> None:
    path = lock_dir / f"{lock_name(EXECUTION)}.lock"
    with Ownership(lock_dir).acquire(EXECUTION):
        path.write_bytes(b"\xffnot a pid")
        with pytest.raises(ExecutionLocked) as info:
            Ownership(lock_dir).acquire(EXECUTION)
    assert info.value.holder_pid == 0
    assert "pid unknown" in str(info.value)


def test_inv15_lock_held_by_other_process(lock_dir: Path, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(ExecutionLocked) as info:
        Ownership(lock_dir).acquire(EXECUTION)
    assert info.value.holder_pid == holder.pid
    with Ownership(lock_dir).acquire("other-execution"):
        pass


def test_inv15_lock_of_killed_process_is_acquirable_at_once(
    lock_dir: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(ExecutionLocked):
        Ownership(lock_dir).acquire(EXECUTION)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    with Ownership(lock_dir).acquire(EXECUTION) as lock:
        assert lock.held


def test_inv15_in_process_scope_conflicts_within_a_scope() -> None:
    class Scope:
        pass

    scope = Scope()
    first = Ownership(None, scope=scope)
    with first.acquire(EXECUTION):
        with pytest.raises(ExecutionLocked) as info:
            Ownership(None, scope=scope).acquire(EXECUTION)
        assert info.value.holder_pid == os.getpid()
        with first.acquire("other"):
            pass
    with Ownership(None, scope=scope).acquire(EXECUTION):
        pass


def test_inv15_in_process_scopes_do_not_conflict_across_scopes() -> None:
    class Scope:
        pass

    with Ownership(None, scope=Scope()).acquire(EXECUTION):
        with Ownership(None, scope=Scope()).acquire(EXECUTION):
            pass
        with Ownership(None).acquire(EXECUTION):  # default scope: the Ownership itself
            pass


def test_inv15_in_process_registry_does_not_keep_scopes_alive() -> None:
    class Scope:
        pass

    scope = Scope()
    Ownership(None, scope=scope).acquire(EXECUTION).release()
    assert scope in _registry
    del scope
    gc.collect()
    assert not any(isinstance(key, Scope) for key in list(_registry.keys()))

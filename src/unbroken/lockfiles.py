"""Lock files of executions on a local file system, INV-15 (layer: engine).

An owner holds ``fcntl.flock(LOCK_EX)`` on ``<lock_dir>/<lock_name(id)>.lock``; the kernel
drops the lock when the owner's process dies. The file holds the owner's pid, for error
messages only.

Lock files are removed, or they would add up to one (an inode) per execution ever run;
each only by a process holding its lock: by its owner once the execution has ended
(``release`` with ``remove``: completed, failed, aborted or canceled; never one still
running), and by anyone who can take the lock of an execution that was pruned
(``discard``). Unlinking a file in use is unsafe by itself: a process that opened the old
inode before the unlink can flock it after, while a newcomer creates a new file under the
name and flocks that, and both would hold "the" lock. So ``acquire``, once its flock
succeeded, checks that the name still names the inode it opened (same ``st_dev`` and
``st_ino``) and opens the name again if not; the ``held`` probe checks the same. A file
is created only where the name is missing and unlinked only by its holder, so while it is
held the name names it: whoever passed the check holds the lock of the file every later
``acquire`` opens; a flock refused by a file whose holder removed it meanwhile is tried
again on the name's file too. A release unlinks its name in the directory it opened the
file in; once the directory was opened again (it was removed: the name there may be
another's file) it leaves the name alone. Versions of this library that do not make the
check must not share a lock directory with one that removes files.

The directory is opened once and every file is opened relative to it (no path walk and no
``mkdir`` per lock). Creating a file allocates an inode, which costs some file systems
hundreds of µs of kernel time (it depends on how full the inode table's group is); a
``LockDir`` with ``ahead`` makes files in ``<lock_dir>/.spares`` on a thread of its own,
and a new lock file is one of them linked into place (``link`` fails if the name exists,
so an existing lock file is never replaced), its spare name removed later by that thread.
A spare that is missing (another process tidied it away) only means the file is created
in place as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from unbroken.errors import ExecutionLocked, StorageError
from unbroken.ids import lock_name

__all__ = ["LockDir"]

log = logging.getLogger("unbroken")

_PID_BYTES = 32
_SPARES = ".spares"
_FIRST_KEEP = 16  # spares kept at first; more once starts had to wait for one
_MAX_KEEP = 512
_BATCH = 16  # spares made between two looks at what is used and wanted
_OPEN = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
_ATTEMPTS = 5  # opens of one lock file that each found it removed once flocked


class _Held(NamedTuple):
    """What ``release`` needs of a file ``acquire`` took: its name, the ``generation`` of
    the directory it was opened in, and the process that took it."""

    name: str
    generation: int
    pid: int


class LockDir:
    """The lock directory of one database, opened on first use and kept open.

    Args:
        path: the directory (created with mode 0700 if missing).
        ahead: make spare lock files ahead of need on a thread (``close`` stops it).
    """

    def __init__(self, path: Path, *, ahead: bool = False) -> None:
        self.path = path
        self._ahead = ahead
        self._guard = threading.Lock()
        self._handles = _Handles()
        self._held: dict[int, _Held] = {}  # what ``release`` needs of each file acquired
        self._started = False  # the first ``short`` starts making spares
        self._closer = weakref.finalize(self, self._handles.close)

    def acquire(self, execution_id: str) -> int:
        """Take the execution's lock without waiting; return the open file that holds it
        (closing it gives the lock back).

        Raises:
            ExecutionLocked: another open file description holds it.
            StorageError: the directory or file cannot be created or opened, or the file
                was removed under this call again and again.
        """
        name = f"{lock_name(execution_id)}.lock"
        for _ in range(_ATTEMPTS):
            try:
                fd, made, dir_fd, generation = self._open(name)
            except OSError as exc:
                raise _failed(exc) from exc
            try:
                opened = _take(fd, name, dir_fd, execution_id)
            except OSError as exc:
                os.close(fd)
                raise _failed(exc) from exc
            except BaseException:
                os.close(fd)
                raise
            if opened is not None:
                # A spare made ahead holds our pid already; a file found empty does not (a
                # holder removed the name between the link and the open, and we made it).
                if not made or opened.st_size == 0:
                    _write_pid(fd)
                self._held[fd] = _Held(name, generation, os.getpid())
                return fd
            # Its owner removed the file between our open and our flock (see the module
            # docstring): the lock of that inode locks nothing. Open the name again.
            os.close(fd)
        raise StorageError(
            "lock execution",
            f"lock file {name} was removed after each of {_ATTEMPTS} opens before its flock",
        )

    def release(self, fd: int, execution_id: str, remove: bool = False) -> None:
        """Give back the lock ``acquire`` returned as ``fd``. ``remove``: the execution has
        ended, so first unlink its file, while ``fd`` still holds it; not if the directory
        was opened again since the file was (it was removed: the name there is another's
        file), nor in a forked child (the parent holds the same lock)."""
        held = self._held.pop(fd, None)
        try:
            if remove and held is not None and held.pid == os.getpid():
                with self._guard:  # the directory stays open until the unlink is done
                    handles = self._handles
                    if handles.dir_fd is not None and handles.generation == held.generation:
                        os.unlink(held.name, dir_fd=handles.dir_fd)
        except OSError as exc:  # the file stays; pruning its execution removes it
            log.debug("lock file of %r not removed: %s", execution_id, exc)
        finally:
            os.close(fd)

    def discard(self, execution_ids: Iterable[str]) -> int:
        """Remove the lock files of executions that are gone (pruned), each only if its
        lock can be taken (no one owns the execution, as a new one with the same id
        might); return how many were removed. Creates neither a file nor the directory."""
        try:
            dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        except OSError as exc:  # not ours to open (another user): pruning goes on
            log.warning("lock files of pruned executions stay: %s", exc.strerror or exc)
            return 0
        removed = 0
        failed: OSError | None = None
        try:
            for execution_id in execution_ids:
                try:
                    removed += _discard(f"{lock_name(execution_id)}.lock", dir_fd)
                except OSError as exc:
                    failed = exc
        finally:
            os.close(dir_fd)
        if failed is not None:
            log.warning("some lock files of pruned executions stay: %s", failed)
        return removed

    def held(self, execution_id: str) -> bool:
        """Whether another open file description holds the lock (a missing file: no; one
        removed under the probe at each of its attempts: yes, it was in use all along).

        Raises:
            StorageError: the lock file exists but cannot be opened.
        """
        path = self.path / f"{lock_name(execution_id)}.lock"
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise _failed(exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                if _named(fd, path, None) is not None:
                    return False
            except BlockingIOError:
                return True
            except OSError as exc:
                raise _failed(exc) from exc
            finally:
                os.close(fd)  # closing drops the probe's shared lock
            # Removed by its owner since our open: the probe looked at a file no longer
            # in use; look at the one the name gives now (or none).
        return True  # removed under the probe again and again: in use all along

    def short(self) -> bool:
        """Whether spares are made ahead but none is ready now (``made`` waits for one).
        The first call starts the maker (an engine that only resumes never needs one)."""
        if self._ahead and not self._started:
            self._start_spares()
        spares = self._spares()
        return spares is not None and spares.short()

    async def made(self) -> None:
        """Wait until the spare maker made more (or stopped)."""
        spares = self._spares()
        if spares is not None:
            await spares.made()

    def _spares(self) -> _Spares | None:
        """The spares, unless this is a forked child (the maker thread stayed behind)."""
        spares = self._handles.spares
        return spares if spares is not None and spares.pid == os.getpid() else None

    def close(self) -> None:
        """Stop making spares, remove those not used, close the directory; no spare is made
        once it returns. Blocking (it waits for the file the maker is making, and for a
        maker stopped when the directory was removed): call it off the event loop."""
        with self._guard:
            self._handles.close()

    def _open(self, name: str) -> tuple[int, bool, int, int]:
        """The lock file ``name`` opened, whether it is a spare linked into place, and the
        directory it was opened in with that directory's ``generation``."""
        handles = self._handles
        generation = handles.generation  # read first: it may only be older than dir_fd's
        dir_fd = handles.dir_fd
        if dir_fd is None:
            dir_fd, generation = self._open_dir()
        spares = self._spares()
        spare = spares.take() if spares is not None else None
        made = False
        if spares is not None and spare is not None:
            try:
                os.link(spare, name, src_dir_fd=spares.dir_fd, dst_dir_fd=dir_fd)
            except FileExistsError:
                spares.give_back(spare)  # the lock file exists: open it as it is
            except OSError:
                pass  # the spare is gone: create the file in place
            else:
                spares.used(spare)
                made = True
        try:
            return os.open(name, _OPEN, 0o600, dir_fd=dir_fd), made, dir_fd, generation
        except FileNotFoundError:  # the directory was removed: make it again, once
            with self._guard:
                if handles.dir_fd == dir_fd:
                    handles.close(wait=False)  # on the event loop: ``close`` waits for it
                    self._started = False
            dir_fd, generation = self._open_dir()
            return os.open(name, _OPEN, 0o600, dir_fd=dir_fd), False, dir_fd, generation

    def _open_dir(self) -> tuple[int, int]:
        """The directory, opened (and made) if it is not, and its ``generation``."""
        with self._guard:
            handles = self._handles
            if handles.dir_fd is None:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                handles.dir_fd = os.open(
                    self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
                handles.generation += 1
            return handles.dir_fd, handles.generation

    def _start_spares(self) -> None:
        try:
            dir_fd, _ = self._open_dir()
        except OSError:
            return  # ``acquire`` reports it
        with self._guard:
            if self._started or self._handles.dir_fd != dir_fd:
                return
            self._started = True
            try:
                self._handles.spares = _Spares(dir_fd)
            except OSError as exc:
                log.warning("lock files are not made ahead: %s", exc.strerror or exc)


class _Handles:
    """What a ``LockDir`` holds open (closed by ``close``, or when it is collected)."""

    __slots__ = ("dir_fd", "generation", "spares", "stopped")

    def __init__(self) -> None:
        self.dir_fd: int | None = None
        self.generation = 0  # how many times the directory was opened
        self.spares: _Spares | None = None
        self.stopped: list[_Spares] = []  # told to stop, not waited for yet

    def close(self, *, wait: bool = True) -> None:
        """Close what is open; ``wait``: wait for every maker to end, else only tell the
        one running to stop (those that ended are closed: each holds its directory)."""
        spares, self.spares = self.spares, None
        dir_fd, self.dir_fd = self.dir_fd, None
        if spares is not None:
            spares.stop()
            self.stopped.append(spares)
        running = []
        for maker in self.stopped:
            if wait or not maker.running:
                maker.close()
            else:
                running.append(maker)
        self.stopped = running
        if dir_fd is not None:
            os.close(dir_fd)


class _Spares:
    """Files in ``<lock_dir>/.spares`` made by a thread of their own, each holding this
    process's pid (as a lock file does) and named ``<pid>-<n>``, so that a later maker
    removes those of a dead process."""

    def __init__(self, lock_dir_fd: int) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(_SPARES, 0o700, dir_fd=lock_dir_fd)
        self.dir_fd = os.open(
            _SPARES, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=lock_dir_fd
        )
        self._ready: deque[str] = deque()
        self._used: deque[str] = deque()
        self._keep = _FIRST_KEEP
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.pid = os.getpid()
        self._names = (f"{self.pid}-{n}" for n in itertools.count())
        self._pid_text = f"{self.pid}\n".encode("ascii")
        self._thread = threading.Thread(target=self._run, name="unbroken-locks", daemon=True)
        self._thread.start()

    def take(self) -> str | None:
        """A spare's name, or ``None`` if none is ready (the maker is asked for more)."""
        try:
            name = self._ready.popleft()
        except IndexError:
            name = None
        if len(self._ready) < self._keep // 2:
            with self._cond:
                if name is None:
                    self._keep = min(self._keep * 2, _MAX_KEEP)
                self._cond.notify()
        return name

    def give_back(self, name: str) -> None:
        self._ready.appendleft(name)

    def used(self, name: str) -> None:
        """``name`` is linked into place: the maker removes its spare name (here, that
        would wait for the maker's ``open`` in the same directory)."""
        self._used.append(name)

    def short(self) -> bool:
        return not self._ready and not self._closed

    async def made(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        with self._cond:
            if self._closed or self._ready:
                return
            self._waiting.append(waiter)
            # Keep as many ready as waited at once: the next burst like it waits for none.
            self._keep = min(max(self._keep, len(self._waiting)), _MAX_KEEP)
            self._cond.notify()
        try:
            await future
        except asyncio.CancelledError:
            # Forget it: counted, it would take the place of a waiter behind it (which a
            # spare would then not wake) and keep the maker making for no one.
            with self._cond, contextlib.suppress(ValueError):  # woken already
                self._waiting.remove(waiter)
            raise

    @property
    def running(self) -> bool:
        """Whether the maker has not ended (a forked child's never runs)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Tell the maker to stop after the file it is making, without waiting for it."""
        if self.pid == os.getpid():  # (in a forked child no maker could release the lock)
            with self._cond:
                self._closed = True
                self._cond.notify()

    def close(self) -> None:
        """Stop the maker and wait for it, remove the spares not used, close the directory."""
        if self.pid != os.getpid():  # a forked child: the spares are its parent's
            os.close(self.dir_fd)
            return
        self.stop()
        self._thread.join()
        self._ready.extend(self._used)
        self._remove(self._ready)
        os.close(self.dir_fd)

    def _run(self) -> None:
        try:
            self._tidy()
            while self._wait():
                self._remove(self._used)
                for _ in range(_BATCH):
                    if self._closed:
                        break
                    name = next(self._names)
                    fd = os.open(name, _OPEN | os.O_EXCL, 0o600, dir_fd=self.dir_fd)
                    try:
                        os.write(fd, self._pid_text)
                    finally:
                        os.close(fd)
                    self._ready.append(name)
                    if self._waiting and len(self._ready) >= len(self._waiting):
                        self._report()  # every waiter is served: no need to wait for more
                self._report()
        except Exception as exc:  # each lock file is then created in place
            log.warning("lock files are no longer made ahead: %s", exc)
        finally:
            with self._cond:
                self._closed = True
            self._report()

    def _wait(self) -> bool:
        with self._cond:
            while not self._closed and len(self._ready) >= self._keep and not self._waiting:
                self._cond.wait()
            return not self._closed

    def _report(self) -> None:
        """Wake as many waiting callers as there are spares ready (all once closed), each
        loop's at once: waking every waiter for every batch would cost the loop a task
        step per waiter per batch."""
        with self._cond:
            n = len(self._waiting) if self._closed else len(self._ready)
            woken, self._waiting = self._waiting[:n], self._waiting[n:]
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, future in woken:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # its loop closed: no one waits
                loop.call_soon_threadsafe(_settle, futures)

    def _remove(self, names: deque[str]) -> None:
        while names:
            with contextlib.suppress(OSError):
                os.unlink(names.popleft(), dir_fd=self.dir_fd)

    def _tidy(self) -> None:
        """Remove the spares of processes that are gone."""
        for name in os.listdir(self.dir_fd):
            pid = name.partition("-")[0]
            if pid.isdigit() and int(pid) != self.pid and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.dir_fd)


def _settle(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is not ours to signal
        return True
    return True


def _failed(exc: OSError) -> StorageError:
    """What a lock file's open, flock or stat that failed is reported as."""
    return StorageError("lock execution", exc.strerror or type(exc).__name__)


def _named(fd: int, name: str | Path, dir_fd: int | None) -> os.stat_result | None:
    """The file open as ``fd`` if ``name`` (relative to ``dir_fd``) still names it."""
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    opened = os.fstat(fd)
    same = named.st_ino == opened.st_ino and named.st_dev == opened.st_dev
    return opened if same else None


def _take(fd: int, name: str, dir_fd: int, execution_id: str) -> os.stat_result | None:
    """Flock ``fd``; the file if ``name`` still names it, ``None`` if its holder removed
    it between our open and our flock (the name is to be opened again).

    Raises:
        ExecutionLocked: another open file description holds the name's file.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if _named(fd, name, dir_fd) is None:
            return None  # refused by a holder that has removed the file since
        raise ExecutionLocked(execution_id, _holder_pid(fd)) from None
    return _named(fd, name, dir_fd)


def _discard(name: str, dir_fd: int) -> bool:
    """Unlink the lock file ``name`` while holding its lock, if no one else holds it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)  # as ``acquire``'s
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _named(fd, name, dir_fd) is None:
            return False  # removed since our open, by whoever held it
        os.unlink(name, dir_fd=dir_fd)
        return True
    except BlockingIOError:
        return False  # owned: an execution started again with this id
    finally:
        os.close(fd)


def _holder_pid(fd: int) -> int:
    """The holder's pid; it writes it just after taking the lock, so an empty file is
    re-read a few times (2 ms apart) before the pid is reported unknown (0)."""
    for _ in range(5):
        pid = _read_pid(fd)
        if pid:
            return pid
        time.sleep(0.002)
    return 0


def _read_pid(fd: int) -> int:
    """The pid the holder wrote, or 0 if it cannot be read (being rewritten, garbage)."""
    try:
        pid = int(os.pread(fd, _PID_BYTES, 0).decode("ascii").strip())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return 0
    return pid if pid > 0 else 0


def _write_pid(fd: int) -> None:
    """Record our pid for others' error messages; the lock does not depend on it.

    Written over what is there, then cut to its length: truncating to zero first would
    make ext4 flush the file's data when it is closed (``auto_da_alloc``), a cost at every
    release. A reader that comes in between sees no valid pid and reads again
    (``_holder_pid``).
    """
    text = f"{os.getpid()}\n".encode("ascii")
    try:
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
    except OSError:
        pass

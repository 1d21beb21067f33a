"""``flock`` descriptors that stay with the process that opened them.

A ``flock`` belongs to an open file description, which ``fork()`` shares with the child: a child
(a DataLoader worker) that kept its copy would hold the lock after its parent died, and every
writer waiting for it would wait for the child. So every descriptor that holds (or is about to
take) a lock is opened through :func:`open_held`, and a forked child lets go of its copies at once.

``open_held`` opens without holding the module's lock (an open can block: a FIFO waits for a
writer, an NFS server for its network), so a fork can come between the open and the tracking;
each fork is counted, and a descriptor that a fork may have copied untracked is closed and
opened again: the lock is then taken on the new open file description, which the child's copy
does not share (a lock on the first one would cover the copy). Forks that keep racing its opens
(a slow file system, a process forking all the time) would make that endless: the last of
``OPEN_TRIES`` opens holds the module's lock, and forks in other threads wait for it (so that
open must not wait for a child such a fork would make).

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder, locked_folder(folder) as fd:
...     fd in _HELD
True
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable, Iterator

from .errors import TierIOError

_HELD: set[int] = set()  # this process's descriptors that hold or take locks
# held across tracking a descriptor and across a fork: a fork sees a descriptor tracked or not,
# and counts itself in _forks; reentrant, as a signal handler (a preemption checkpoint) may take
# a lock, or fork, while its thread is inside open_held
_OPENING = threading.RLock()
_forks = 0  # forks so far (under _OPENING): one since an open began may have copied it
OPEN_TRIES = 3  # open_held's opens at most (raced by forks, each opens again); the last holds forks


def _before_fork() -> None:
    """Wait for a descriptor's tracking to end, so the child sees it tracked (and closes it)."""
    _OPENING.acquire()


def _after_fork_in_parent() -> None:
    global _forks
    _forks += 1
    _OPENING.release()


def _after_fork_in_child() -> None:
    """In a forked child: let go of its copies of the parent's lock descriptors (the parent keeps
    the locks). Each number is pointed at ``/dev/null`` rather than closed, and stays tracked
    until its owner (a copied store or writer) releases it: a lock the child opens never gets
    that number, so such a release never closes the child's own lock."""
    global _forks
    _forks += 1  # an open_held under way in this thread (a signal handler forked) opens again
    try:
        try:
            null: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /dev/null (a bare chroot): closed then, the only way left
            null = None
        for fd in list(_HELD):
            with contextlib.suppress(OSError):
                if null is None:
                    _HELD.discard(fd)
                    os.close(fd)
                else:
                    os.dup2(null, fd, inheritable=False)
        if null is not None:
            os.close(null)
    finally:
        _OPENING.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def open_held(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
    """``os.open(path, flags | O_CLOEXEC, mode)``, tracked: a forked child lets go of its copy.
    Close it with :func:`release`. A blocking open (a FIFO) holds up no fork, unless forks raced
    its opens ``OPEN_TRIES - 1`` times: the last try opens holding them up (no endless retry)."""
    path = os.fspath(path)  # once: a path object's __fspath__ may run code (and fork)
    tries = 0
    while True:
        tries += 1
        # forks kept coming while it opened (a slow file system): the last tries hold them up,
        # and only a signal handler's in this thread can come between the open and the tracking
        with _OPENING if tries >= OPEN_TRIES else contextlib.nullcontext():
            forks = _forks
            fd = os.open(path, flags | os.O_CLOEXEC, mode)
            if _tracked(fd, forks):
                return fd
            os.close(fd)  # a fork since the open may hold an untracked copy: a new one


def _tracked(fd: int, forks: int) -> bool:
    """Track ``fd`` if no fork came since ``_forks`` was ``forks`` (whether it did); ``fd`` is
    closed when an exception (Ctrl-C while a fork holds the lock) interrupts."""
    try:
        with _OPENING:
            _HELD.add(fd)  # tracked first: a fork from here on (a signal handler's) sees it
            if _forks == forks:
                return True
            _HELD.discard(fd)
    except BaseException:
        _HELD.discard(fd)
        os.close(fd)
        raise
    return False


def release(fd: int) -> None:
    """Close a descriptor from :func:`open_held` (its lock goes with it; in a forked child, the
    stand-in the fork left at its number)."""
    if fd in _HELD:
        # unlocked first: a child forked a moment ago may not have let go of its copy yet (nor
        # one forked between forgetting and closing it), and its copy would keep the lock
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        _HELD.discard(fd)
        os.close(fd)


def exclusive_now(fd: int, path: str | os.PathLike[str]) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (the file ``path``) if no one holds one: whether
    it was taken; TierIOError naming ``path`` when ``flock`` fails otherwise (ENOLCK)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise TierIOError(
            exc.errno,
            f"{path}: cannot lock it ({exc.strerror}); expected a file system with flock",
            str(path),
        ) from None
    return True


def flock_holder(path: str | os.PathLike[str]) -> str | None:
    """Who holds an exclusive ``flock`` on the file ``path``, from ``/proc/locks``: 'this
    process (pid N)' or 'process N (COMMAND)'; None where it cannot tell (no ``/proc``, a holder
    outside this pid namespace, none any more)."""
    try:
        info = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    file = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:  # "N: FLOCK  ADVISORY  WRITE PID MAJOR:MINOR:INODE 0 EOF" (a waiter: "->")
        fields = line.split()
        if len(fields) >= 6 and fields[1:4:2] == ["FLOCK", "WRITE"] and fields[5] == file:
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid <= 0:
                return None
            if pid == os.getpid():
                return f"this process (pid {pid})"
            try:
                with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    return f"process {pid} ({f.read().strip()})"
            except OSError:  # ended meanwhile, or hidden
                return f"process {pid}"
    return None


@contextlib.contextmanager
def locked_folder(path: str | os.PathLike[str]) -> Iterator[int]:
    """An exclusive ``flock`` on the folder ``path`` while inside (cooperating writers of its
    files serialise on it); yields the folder's descriptor."""
    fd = open_held(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        release(fd)


@contextlib.contextmanager
def exclusive_run(
    path: str | os.PathLike[str], busy: Callable[[str], Exception], *, remove: bool = False
) -> Iterator[None]:
    """One run at a time of a job keyed on the lock file ``path`` (made if missing; the kernel
    lets go when the process dies): raises ``busy(holder)`` at once while another run holds it
    (``holder``: who, as :func:`flock_holder` names it).
    ``remove``: the file goes at the end (a run that took the lock on a file removed meanwhile
    takes it again on the one at ``path`` now, so two runs never hold two files of one name)."""
    while True:
        fd = open_held(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not exclusive_now(fd, path):
                raise busy(flock_holder(path) or "another run, in this process or another")
            if not remove or _names(path, fd):
                break
        except BaseException:  # busy, no flock here (ENOLCK), Ctrl-C
            release(fd)
            raise
        release(fd)
    try:
        yield
    finally:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        release(fd)


def _names(path: str | os.PathLike[str], fd: int) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

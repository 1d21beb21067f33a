"""``flock`` descriptors that stay with the process that opened them.

A ``flock`` belongs to an open file description, which ``fork()`` shares with the child: a child
(a DataLoader worker) that kept its copy would hold the lock after its parent died, and every
writer waiting for it would wait for the child. So every descriptor that holds (or is about to
take) a lock is opened through :func:`open_held`, and a forked child closes its copies at once.

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
from collections.abc import Iterator

_HELD: set[int] = set()  # this process's descriptors that hold or take locks
_OPENING = threading.Lock()  # held across open + track, and across a fork: no copy escapes


def _before_fork() -> None:
    """Wait for a descriptor being opened to be tracked, so the child sees and closes it."""
    _OPENING.acquire()


def _after_fork_in_parent() -> None:
    _OPENING.release()


def _after_fork_in_child() -> None:
    """In a forked child: close its copies of the parent's lock descriptors (the parent keeps
    the locks)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _OPENING.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def open_held(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
    """``os.open(path, flags | O_CLOEXEC, mode)``, tracked: a forked child closes its copy.
    Close it with :func:`release`."""
    with _OPENING:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        _HELD.add(fd)
    return fd


def release(fd: int) -> None:
    """Close a descriptor from :func:`open_held` (its lock goes with it), unless a fork in this
    process's child already closed it there."""
    if fd in _HELD:
        _HELD.discard(fd)
        os.close(fd)


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

"""One daemon thread that runs a store's collectives in submission order.

Collectives must be issued in the same order on every rank, so a store's lookups and prefetches
all go through one queue. The thread is a daemon: a collective stuck on a dead peer never keeps
the process from exiting (``concurrent.futures`` workers are joined at exit); at the exit the
round under way ends first, up to ``prefetch.EXIT_WAIT_S`` (``end_at_exit``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import StoreClosedError
from ..prefetch import drain

__all__ = ["CollectiveThread"]

_AT_EXIT = (
    "sharded store: this call was queued as the interpreter exited, which runs none of those "
    "(it waits only for the round under way, up to prefetch.EXIT_WAIT_S); expected it made and "
    "collected before the exit began"
)


class CollectiveThread:
    """Run submitted calls one after another on a daemon thread; ``submit`` returns a Future.
    Each call runs, its Future cancelled or not (every rank runs its collectives)."""

    def __init__(self, name: str, failed: Callable[[Exception], None] | None = None) -> None:
        """``failed``: called on the thread with a call's error before its Future holds it (what
        the call's caller, interrupted meanwhile, would never see); its own error is dropped."""
        self._failed = failed
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # nothing is queued behind the stop marker
        self._closing = False
        self._exited = False  # ended by the interpreter's exit (``end_at_exit``)
        self._pid = os.getpid()  # where its rounds run (a forked child has no thread for them)
        self._forked = False  # in a forked child (set by its fork hook, ``forked``)
        _THREADS.add(self)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; the Future holds its result or exception (StoreClosedError at
        once when ``close`` came first: the thread would never run it)."""
        future: Future = Future()
        with self._lock:
            if self._forked:
                future.set_exception(StoreClosedError(self.forked_text()))
            elif self._exited:
                future.set_exception(StoreClosedError(_AT_EXIT))
            elif self._closing:
                future.set_exception(
                    StoreClosedError("sharded store is closed; open a new ShardedStore")
                )
            else:
                self._queue.put((future, fn, args))
        return future

    def close(self, timeout: float | None) -> bool:
        """Stop after the queued calls; wait up to ``timeout`` s; True if the thread ended."""
        with self._lock:
            self._closing = True
            self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def forked_text(self) -> str | None:
        """Why a forked child cannot run this thread's calls (None in the process it started in)."""
        if not self._forked:
            return None
        if os.getppid() == self._pid:
            how = f"which forked this one ({os.getpid()})"
        else:  # a child of a forked child
            how = f"from which this one ({os.getpid()}) was forked (by process {os.getppid()})"
        return (
            f"sharded store: opened in process {self._pid}, {how}: its rounds run only there "
            "(no thread runs them here, and this "
            "process holds no place of its own in the group); expected a ShardedStore opened in "
            "this process"
        )

    def forked(self) -> None:
        """In a forked child: no thread gone holds the lock, and the calls queued at the fork
        fail (pending, a lookup of the child's copy of a prefetch waited out the timeout)."""
        self._forked = True
        self._lock = threading.Lock()
        self._fail_queued(self.forked_text())

    def end_at_exit(self, deadline: float) -> None:
        """At the interpreter's exit: fail the calls not started, naming the exit, and wait
        until ``deadline`` (``time.monotonic()``) for the one running (the daemon thread inside
        a torch op as the interpreter ended aborted the process: 'terminate called without an
        active exception', exit status 134)."""
        with self._lock:
            self._closing = self._exited = True
            self._fail_queued(_AT_EXIT)
            self._queue.put(None)
        self._thread.join(max(deadline - time.monotonic(), 0.0))

    def _fail_queued(self, text: str) -> None:
        """Take every call queued (stop markers too) and fail each not cancelled with ``text``."""
        for item in drain(self._queue):
            if item is not None and item[0].set_running_or_notify_cancel():
                item[0].set_exception(StoreClosedError(text))

    def _run(self) -> None:
        """The thread's loop."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            # a call cancelled while queued runs all the same, its outcome dropped: a collective
            # skipped on one rank left the others' rounds paired with the wrong ones
            kept = future.set_running_or_notify_cancel()
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the waiting caller
                if self._failed is not None and isinstance(exc, Exception):
                    with contextlib.suppress(Exception):  # the Future gets its error whatever
                        self._failed(exc)
                if kept:
                    future.set_exception(exc)
            else:
                if kept:
                    future.set_result(result)
            result = None  # (a cancelled call's rows are not kept while the thread waits)


_THREADS: weakref.WeakSet[CollectiveThread] = weakref.WeakSet()  # every one, for a fork's child


def _forked_threads() -> None:
    """In a forked child, each thread's calls queued fail (``CollectiveThread.forked``)."""
    for thread in list(_THREADS):
        thread.forked()


os.register_at_fork(after_in_child=_forked_threads)

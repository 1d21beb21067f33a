"""One daemon thread that runs a store's collectives in submission order.

Collectives must be issued in the same order on every rank, so a store's lookups and prefetches
all go through one queue. The thread is a daemon: a collective stuck on a dead peer never keeps
the process from exiting (``concurrent.futures`` workers are joined at exit).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import StoreClosedError

__all__ = ["CollectiveThread"]


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
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; the Future holds its result or exception (StoreClosedError at
        once when ``close`` came first: the thread would never run it)."""
        future: Future = Future()
        with self._lock:
            if self._closing:
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

"""The store's lock, which also passes the request queue's news on to the tiers.

``TieredStore.announce`` and ``release`` change the queue under its own lock, then post the news
(the request; for a release, the rows it was the earliest request for and their next request)
here, in queue order, and never wait for the store's lock: a server's compute turn is not spent
queueing behind lookups. Whoever holds the lock tells the tiers before deciding anything, and
again on letting go of it (news that came meanwhile, whose senders found it taken), so no news
waits for the next lookup.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .cache_plan import CacheHierarchy
    from .request_queue import QueuedRequest


class StoreLock:
    """``with lock:`` takes the store's lock with the tiers up to date with the queue."""

    def __init__(self, caches: CacheHierarchy) -> None:
        self._lock = threading.Lock()
        self._caches = caches
        # announced (moved None) or released requests the tiers have not been told of yet
        self._news: deque[tuple[QueuedRequest, tuple[torch.Tensor, torch.Tensor] | None]] = deque()

    def __enter__(self) -> StoreLock:
        self._lock.acquire()
        if self._news:
            try:
                self._tell_tiers()
            except BaseException:
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()
        if self._news:  # posted while it was held
            self.tell_if_free()

    def post(self, request: QueuedRequest, moved: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """News in queue order: ``request`` announced (``moved`` None) or released (``moved``:
        what ``QueuedRequests.remove`` returned). Post it where the queue's order is kept (a
        release under the store's release lock); then :meth:`tell_if_free`."""
        self._news.append((request, moved))

    def tell_if_free(self) -> None:
        """Tell the tiers now if the lock is free; else its holder does when it lets go."""
        if self._lock.acquire(blocking=False):
            try:
                self._tell_tiers()
            finally:
                self._lock.release()

    def _tell_tiers(self) -> None:
        """Under the lock: the tiers learn the news so far, in the order it came."""
        while self._news:
            request, moved = self._news.popleft()
            if moved is None:
                self._caches.queued(request)
            else:
                self._caches.unqueued(request, moved)

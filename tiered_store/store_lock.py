"""The store's lock, which also passes the request queue's news on to the tiers; and the count of
calls under way that ``close()`` waits for (``InFlight``).

``TieredStore.announce`` and ``release`` change the queue under its own lock, then post the news
(the request; for a release, the rows it was the earliest request for and their next request)
here, in queue order, and do not wait for the store's lock (but for a store's first announce,
which gives the tiers their per-slot queue state under it): a server's compute turn is not spent
queueing behind lookups. Whoever holds the lock tells the tiers before deciding anything (the
news there when it took it: news that keeps coming cannot hold a lookup for ever), and again on
letting go of it (news that came meanwhile, whose senders found it taken), so no news waits for
the next lookup. Only a poster that finds more than ``NEWS_BACKLOG`` news waiting (posting
faster than the tiers take it in) waits for the lock, and tells the tiers itself.

Telling can fail (out of memory probing a tier). News that failed is kept, first in line, with
the tiers it reached noted, and told again by the next holder, after ``NEWS_TRIES`` failures it
is dropped with a warning (a tier that missed an announce or a release only ranks victims less
well: no lookup reads a wrong row; one that missed a batch served is told its request's every
row at the release). Neither is raised into the holder's own work (a lookup is
not failed by another request's news), except to an announce whose own news failed, which
withdraws its request. ``news_failures`` and ``news_dropped`` count them (metrics).

On a CUDA store the holder works on the store's stream: every change to the hot tier's device
state (its slots, index, free list, policy and queue state) is queued on one stream, in the
order the lock was taken, whichever thread made it. The stream first waits for the work the
taking thread had queued on its own, unless it takes the lock with ``host_inputs()``: work whose
inputs are all on the host (telling the news, a warm restart, a save) needs none of it, and later
prefetch copies on the stream would wait for it too (a model's whole queued forward pass).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .errors import StoreClosedError, warn_at_caller
from .prefetch import take_once

if TYPE_CHECKING:
    from .cache_plan import CacheHierarchy
    from .request_queue import QueuedRequest
    from .row_cache import RowCache


NEWS_BACKLOG = 1024  # news waiting before a poster waits for the lock to tell the tiers itself
TELL_PASSES = 8  # passes of news a thread letting go of the lock tells at most (then the next)
NEWS_TRIES = 3  # failed tellings of one piece of news before it is dropped
CLOSE_POLL_S = 0.005  # InFlight.close() checks this often whether calls still run


class _News:
    """One announce (``moved`` None) or release (``moved``: what ``QueuedRequests.remove``
    returned; ``gone`` False: a batch served, what ``served`` returned) of ``request``, the tiers
    not told of it yet, and how often telling it failed."""

    __slots__ = ("failures", "gone", "moved", "request", "untold")

    def __init__(
        self,
        request: QueuedRequest,
        moved: tuple[torch.Tensor, torch.Tensor] | None,
        untold: list[RowCache],
        gone: bool = True,
    ) -> None:
        self.request, self.moved, self.untold, self.failures = request, moved, untold, 0
        self.gone = gone

    def tell(self) -> None:
        """Tell each tier not told yet, noting each one told (a failure leaves the rest). A
        release of a request whose batch a tier missed tells every row of it, each waiting for
        the request that looks it up first now (a tier that has it elsewhere changes nothing)."""
        if self.moved is not None and self.gone and self.request.missed_batch:
            rows = self.request.rows
            self.moved = (rows, self.request.owner.next_use(rows))
            self.request.missed_batch = False  # (this news is told again with them if it fails)
        while self.untold:
            if self.moved is None:
                self.untold[0].queued(self.request)
            else:
                self.untold[0].unqueued(self.request, *self.moved, gone=self.gone)
            self.untold.pop(0)


class StoreLock:
    """``with lock:`` takes the store's lock with the tiers up to date with the queue."""

    def __init__(self, caches: CacheHierarchy, stream: torch.cuda.Stream | None = None) -> None:
        # an RLock for its owner, noted as it is taken (held_here); never taken twice (_take)
        self._lock = threading.RLock()
        self._caches = caches
        self._stream = stream
        self._on_stream: contextlib.AbstractContextManager | None = None  # the holder's
        # announced (moved None) or released requests the tiers have not been told of yet
        self._news: deque[_News] = deque()
        self.news_failures = 0  # tellings of news that failed (told again, but an announce's own)
        self.news_dropped = 0  # news dropped after NEWS_TRIES failures

    def __enter__(self) -> StoreLock:
        return self._take(after_caller=True)

    @contextlib.contextmanager
    def host_inputs(self) -> Iterator[StoreLock]:
        """``with lock.host_inputs():`` the lock for work whose inputs are all on the host: the
        store's stream does not wait for what the taking thread queued on its own."""
        self._take(after_caller=False)
        try:
            yield self
        finally:
            self.__exit__()

    def _take(self, *, after_caller: bool) -> StoreLock:
        """Take the lock, on the store's stream, and tell the tiers the news waiting."""
        if self.held_here():
            raise RuntimeError(
                "store lock: taken again on a thread that holds it (a signal handler's call "
                "inside a call?): it would wait for itself for good; expected the store's calls "
                "outside its calls (set a flag in the handler and call after the call)"
            )
        try:  # a failure (a CUDA error, Ctrl-C, as soon as the acquire returns) lets it go:
            self._lock.acquire()  # held, every later call would wait
            self._enter_stream(after_caller)
            if self._news:
                self._tell_tiers()
        except BaseException:
            if self.held_here():
                self._let_go()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._let_go()
        if self._news:  # posted while it was held
            self.tell_if_free()

    def post(
        self,
        request: QueuedRequest,
        moved: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        gone: bool = True,
    ) -> None:
        """News in queue order: ``request`` announced (``moved`` None) or released (``moved``:
        what ``QueuedRequests.remove`` returned; ``gone`` False: a batch of it served, what
        ``served`` returned). Post it where the queue's order is kept (a release or a batch
        served under the store's release lock); then :meth:`tell_if_free`."""
        self._news.append(_News(request, moved, [self._caches.hot, self._caches.warm], gone))

    def tell_if_free(self, own: QueuedRequest | None = None) -> None:
        """Tell the tiers now if the lock is free, again while news came meanwhile (its posters
        found the lock taken; at most ``TELL_PASSES`` times: the next holder tells the rest);
        else its holder does when it lets go. Past ``NEWS_BACKLOG`` waiting, wait for the lock:
        news posted faster than the tiers take it in would otherwise grow without end. A failure
        telling the announce of ``own`` is raised (it is dropped: the caller withdraws it)."""
        for _ in range(TELL_PASSES):
            if not self._news or self.held_here():  # (a handler's, inside a call: its holder)
                return
            try:
                if not self._lock.acquire(blocking=len(self._news) > NEWS_BACKLOG):
                    return
                self._enter_stream(after_caller=False)  # the news is on the host (its rows)
                told = self._tell_tiers(own)
            finally:
                if self.held_here():
                    self._let_go()
            if not told:  # failed: the next holder tries again
                return

    def _enter_stream(self, after_caller: bool) -> None:
        """Just taken: the holder's work on the store's stream (``after_caller``: after what the
        holder queued on its own)."""
        if self._stream is None:
            return
        current = torch.cuda.current_stream(self._stream.device)
        if after_caller and current != self._stream:
            self._stream.wait_stream(current)
        on_stream = torch.cuda.stream(self._stream)
        on_stream.__enter__()
        self._on_stream = on_stream  # entered: the let-go leaves it

    def _let_go(self) -> None:
        """Back on the holder's own stream, and the lock released."""
        on_stream, self._on_stream = self._on_stream, None
        try:
            if on_stream is not None:
                on_stream.__exit__(None, None, None)
        finally:
            self._lock.release()

    def held_here(self) -> bool:
        """Whether the calling thread holds the lock (a signal handler's code inside a call):
        taking it there would wait for good. Its owner is noted as it is taken, in one step:
        noted after, a handler run just then found it not held there, and waited for it."""
        return self._lock._is_owned()

    def _tell_tiers(self, own: QueuedRequest | None = None) -> bool:
        """Under the lock: the tiers learn the news so far, in the order it came (what comes
        meanwhile waits for the next holder, which tells it before its own work); whether all of
        it was told. News that fails stays first (see the module's docstring)."""
        for _ in range(len(self._news)):
            news = self._news[0]
            try:
                news.tell()
            except Exception as exc:
                self.news_failures += 1
                news.failures += 1
                if news.request is own and news.moved is None:
                    self._news.popleft()  # withdrawn by its announce, told of again
                    raise
                if news.failures < NEWS_TRIES:
                    return False
                self._news.popleft()
                self.news_dropped += 1
                if not news.gone:  # the request's release makes up for the batch
                    news.request.missed_batch = True
                what = "announce" if news.moved is None else "release" if news.gone else "batch"
                then = (
                    "that tier ranks its victims without it"
                    if news.gone
                    else "its release tells that tier every row of the request"
                )
                warn_at_caller(
                    f"request queue: telling the {news.untold[0].name} tier of a request's "
                    f"{what} failed {news.failures} times ({type(exc).__name__}: {exc}); "
                    f"dropped: {then}",
                    RuntimeWarning,
                )
                return False
            self._news.popleft()
        return True


class InFlight:
    """Calls under way that read or write a store's files: ``close()`` refuses new ones and waits
    for these to end before it closes the files (a lookup racing a close read a closed table);
    when it gives up waiting, the last of them to end closes the files (``then``). ``refusal``
    makes the error a call entered after ``close()`` raises (default: ``StoreClosedError``).

    Calls are counted per thread, and each ``close()`` waits only for other threads' calls than
    its own (two closes at once each wait for the other's thread's calls): a Ctrl-C
    handled as a call's ``with`` is left (``__exit__`` entered, the count not yet down) leaves
    its thread counted for good, and a close by that thread (the main one, where a Ctrl-C is
    raised) would wait for it without end. No lock: each thread changes only its own count (one
    dict operation at a time, atomic under the GIL), a call counts itself before it checks for a
    close and a close marks itself before it checks the counts, so either the call is refused or
    the close sees it (one entered once the close began is refused before it counts: only one
    racing its start can still leave ``then``'s action to its refusal, which ``ColdTable.close``
    waits for); ``then``'s action is
    taken once (``take_once``) by whichever of it and the last call's exit finds the other done.
    A lock held there let a signal handler's close, run on a thread inside a call's enter or
    exit, wait for another thread's call that waited for that lock to leave its own, for good.
    ``close()`` checks the counts every ``CLOSE_POLL_S`` (nothing wakes it, so no wake-up can be
    lost). A forked child keeps only the forking thread's count (the others' threads are gone)."""

    def __init__(self, refusal: Callable[[], BaseException] | None = None) -> None:
        self._refusal = refusal or _store_closed
        self._calls: dict[int, int] = {}  # thread ident -> its calls under way (its own to change)
        _COUNTS.add(self)  # a forked child forgets other threads' calls (_forget_other_threads)
        self._closing = False
        # run by the last call: (the closer not waited for, the action, its token: take_once)
        self._then: tuple[int | None, Callable[[], None], list] | None = None

    def entered(self) -> InFlight:
        """One call's passage (``with in_flight.entered():``); ``StoreClosedError`` (or the
        ``refusal``) once it is closing. A plain context manager, not a generator: it is on
        every cold read."""
        return self

    def __enter__(self) -> None:
        if self._closing:  # refused uncounted: counted, a close's then() just then left its
            raise self._refusal()  # action to this call (close() returned, the files open)
        me = threading.get_ident()
        self._calls[me] = self._calls.get(me, 0) + 1  # counted, then checked (see the class)
        if self._closing:
            self.__exit__()
            raise self._refusal()

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        if self._calls.get(me, 0) > 1:
            self._calls[me] -= 1
        else:
            self._calls.pop(me, None)
        then = self._then  # set only after close(): a call ending may run it
        if then is not None and not self._running(then[0]) and take_once(then[2]):
            then[1]()

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new calls; return once those under way in other threads have ended (True), or
        after ``timeout`` seconds with some still running (False)."""
        me = threading.get_ident()
        end = None if timeout is None else time.monotonic() + max(timeout, 0)
        self._closing = True
        while True:
            if not self._running(me):
                return True
            left = CLOSE_POLL_S if end is None else end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, CLOSE_POLL_S))

    def then_pending(self) -> bool:
        """Whether ``then``'s action waits for calls still under way (not run yet)."""
        then = self._then
        return then is not None and bool(then[2])

    def then(self, action: Callable[[], None], *, own: bool = False) -> None:
        """After ``close()``: run ``action`` once no call of another thread than the caller's
        (close()'s) is under way (``own``: nor of the caller's, a signal handler's close inside
        one): now, or as the last one ends."""
        if not self._closing:  # a call ending before close() would never run it
            raise RuntimeError("InFlight.then() before close()")
        then = self._then = (None if own else threading.get_ident(), action, [True])
        if not self._running(then[0]) and take_once(then[2]):
            action()

    def running_here(self) -> bool:
        """Whether a call of the calling thread is under way (a signal handler's code in it)."""
        return threading.get_ident() in self._calls

    def _running(self, closer: int | None) -> bool:
        """Whether calls of other threads than ``closer`` (None: any) are under way."""
        return bool(self._calls.keys() - {closer})


_COUNTS: weakref.WeakSet[InFlight] = weakref.WeakSet()  # every InFlight, for a forked child


def _forget_other_threads() -> None:
    """In a forked child: only the forking thread is left, so the calls the parent's other
    threads had under way never end here; kept, a close in the child waited for them for good."""
    me = threading.get_ident()
    for counts in list(_COUNTS):
        counts._calls = {me: counts._calls[me]} if me in counts._calls else {}


os.register_at_fork(after_in_child=_forget_other_threads)


def _store_closed() -> StoreClosedError:
    """What a call entered after a store's ``close()`` raises."""
    return StoreClosedError("store is closed; open a new TieredStore")

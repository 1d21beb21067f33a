"""Background staging of lookups: ``prefetch(ids)`` starts the work, ``lookup(ids, handle)`` collects it."""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from typing import TypeVar

import torch

from .errors import StoreClosedError, TieredStoreError
from .latency import LatencyHistogram

T = TypeVar("T")


def single_intra_op_thread() -> None:
    """Run this thread's torch ops on one intra-op thread (a worker's start).

    The store's workers (prefetch, cold readers) do small, latency-bound ops beside the caller's
    model; with the default intra-op team each of them would also start one OpenMP team as wide as
    the machine, and those teams' spinning threads take cores from the model's. The setting is per
    thread: the caller's own ``torch.get_num_threads()`` is unchanged."""
    torch.set_num_threads(1)


def take_once(token: list) -> bool:
    """Take the one item of ``token``: True for the one caller that gets it, of any number at once
    (list.pop is atomic), False for the others."""
    try:
        token.pop()
    except IndexError:
        return False
    return True


def drain(q: queue.SimpleQueue) -> list:
    """Every item queued in ``q`` now, taken out of it in order."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


class RunnerPool:
    """Up to ``size`` daemon threads running the calls submitted (in order, with one), each
    started by a submit while fewer run, ``started()`` first (failing, its calls fail). Not a
    ``ThreadPoolExecutor``: its workers are joined at the interpreter's exit, so one hung in a
    read (a dead disk) kept the process from exiting after a ``close(wait_s=...)`` gave up on
    it."""

    def __init__(self, size: int, name: str, started: Callable[[], None] | None = None) -> None:
        self._size, self._name, self._started = size, name, started
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._running: set[Future] = set()  # the calls its threads run now
        self._lock = threading.Lock()
        self._shutdown = False
        self.ended_at_exit = False  # shut down by the interpreter's exit (``end_at_exit``)
        _POOLS.add(self)  # a forked child starts its threads anew

    def submit(self, fn: Callable[..., T], *args: object) -> Future:
        """Queue ``fn(*args)``, its outcome in the future returned; RuntimeError when shut down,
        or when a thread it starts cannot start (a process limit, no memory for its stack: the
        call stays queued for the running ones)."""
        with self._lock:
            if self._shutdown:
                at_exit = " by the interpreter's exit" if self.ended_at_exit else ""
                raise RuntimeError(f"{self._name} pool is shut down{at_exit}")
            future: Future = Future()
            self._queue.put((future, fn, args))
            if len(self._threads) < self._size:
                token = [True]  # taken by the thread as it runs, or here if it never did
                thread = threading.Thread(
                    target=self._work,
                    args=(token,),
                    name=f"{self._name}_{len(self._threads)}",
                    daemon=True,
                )
                try:  # counted first: interrupted (Ctrl-C) in start()'s wait for it, it runs
                    self._threads.append(thread)  # (uncounted, a second one started and the
                    thread.start()  # first never got its stop marker)
                except BaseException:
                    if take_once(token) and thread in self._threads:  # it never ran, nor will:
                        self._threads.remove(thread)  # counted, no other thread would start
                    raise
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Let the threads end once the calls queued have run; ``wait``: wait for them."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def forked(self) -> None:
        """In a forked child: the parent's threads are not there (counted, no call queued would
        ever run: a prefetch's lookup waited for good), nor whoever held the lock at the fork.
        The calls queued or running then fail (pending, the child's copy of a prefetch's handle
        was waited for for good): they are the parent's, which runs them."""
        self._lock = threading.Lock()
        self._threads = []
        lost, self._running = list(self._running), set()
        lost += [call[0] for call in drain(self._queue) if call is not None]
        for future in lost:
            if not future.done():
                future.set_exception(
                    RuntimeError(
                        f"{self._name} pool: this call was queued or under way in process "
                        f"{os.getppid()} as it forked this one ({os.getpid()}), where no thread "
                        "runs it; expected a call made in this process: make it again here"
                    )
                )

    def end_at_exit(self, deadline: float) -> None:
        """At the interpreter's exit: fail the calls not started, naming the exit (cancelled,
        a prefetch's lookup said its caller had cancelled it), and wait, until ``deadline``
        (``time.monotonic()``), for those running (a daemon thread still inside a torch op as
        the interpreter ends aborts the process: 'terminate called without an active
        exception')."""
        with self._lock:
            self._shutdown = self.ended_at_exit = True
            threads, stops = list(self._threads), 0
            for call in drain(self._queue):
                if call is None:
                    stops += 1
                elif call[0].set_running_or_notify_cancel():  # (not cancelled by its caller)
                    call[0].set_exception(
                        RuntimeError(
                            f"{self._name} pool: this call was still queued as the interpreter "
                            "exited, which runs none of those (it waits only for the one under "
                            "way); expected it collected before the exit began"
                        )
                    )
            for _ in range(max(stops, len(threads))):
                self._queue.put(None)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _work(self, token: list) -> None:
        """A thread's loop: run calls until the stop marker; none when its submit, interrupted,
        took ``token`` first (it no longer counts the thread). It lets go of each call once run:
        kept while it waited for the next, the last kept its owner (a dropped table) for good.
        A start hook that fails fails every call the thread takes (ended, it stayed counted: the
        calls queued, and later ones, never completed)."""
        if not take_once(token):
            return
        failed: Exception | None = None
        if self._started is not None:
            try:
                self._started()
            except Exception as exc:  # noqa: BLE001 (each call's future raises it)
                failed = exc
        while (call := self._queue.get()) is not None:
            if failed is None:
                self._running.add(call[0])  # (failed in a child forked meanwhile)
                try:
                    _run_into(*call)
                finally:
                    self._running.discard(call[0])
            elif call[0].set_running_or_notify_cancel():  # an error each (each raise grows
                error = RuntimeError(  # the traceback of the one raised)
                    f"{self._name} pool: its thread's start failed ({type(failed).__name__}: "
                    f"{failed}); expected it to start, so no call of it runs"
                )
                error.__cause__ = failed
                call[0].set_exception(error)
            call = None  # an idle thread keeps nothing of the last call (its owner, say)


_POOLS: weakref.WeakSet[RunnerPool] = weakref.WeakSet()  # every pool, for a fork's child
_PREFETCHERS: weakref.WeakSet[Prefetcher] = weakref.WeakSet()  # every prefetcher, likewise


def _forked_pools() -> None:
    """In a forked child, each prefetcher has new locks (``Prefetcher.forked``), then each pool
    starts its threads anew and fails the parent's calls (``RunnerPool.forked``), whose done
    callbacks take those locks and free their slots, then each prefetcher has its depth free: a
    new semaphore, so the slots the parent's running fetches kept count no more."""
    prefetchers = list(_PREFETCHERS)
    for prefetcher in prefetchers:
        prefetcher.forked()
    for pool in list(_POOLS):
        pool.forked()
    for prefetcher in prefetchers:
        prefetcher._in_flight = threading.BoundedSemaphore(prefetcher._depth)


os.register_at_fork(after_in_child=_forked_pools)


def _run_into(future: Future, fn: Callable[..., T], args: tuple) -> None:
    """``fn(*args)`` with its result or error set in ``future`` (unless it was cancelled)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args)
    except BaseException as exc:  # noqa: BLE001 (the future's to raise, as an executor's)
        future.set_exception(exc)
    else:
        future.set_result(result)


class PrefetchHandleError(TieredStoreError, ValueError):
    """A prefetch handle was used with other ids, twice, on another store, after the store
    closed, or cancelled."""


CONSUMED = "lookup: this prefetch handle was already consumed; prefetch again"
CANCELLED = (
    "lookup: this prefetch was cancelled (its future's cancel()) before its fetch ran, so it "
    "holds no rows; prefetch again, or look up without the handle"
)
OTHER_STORE = (
    "lookup: this prefetch handle comes from another store's prefetch; pass a handle from this "
    "store's"
)


class PrefetchHandle:
    """A lookup in flight. Its rows are staged in its own buffer, so no eviction can take them away
    before ``lookup(ids, handle)`` consumes it."""

    def __init__(
        self,
        ids: object,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        packed: bool,
        future: Future,
        owner: object,
        write_seq: int = 0,
        host: torch.Tensor | None = None,
    ) -> None:
        self.ids = ids
        self.flat = flat
        self.host = host  # the ids given on the CPU, flat, as prefetched (None: on the GPU)
        self.shape = shape
        self.packed = packed  # rows staged as stored (quantised tables), not dequantised
        self.future = future
        self.owner = owner  # what made it (a store's prefetcher): good for its own store only
        self._untaken = [True]  # popped by the collect that takes it: of two at once, one
        self.write_seq = write_seq  # the owner's writes when it was queued (later ones: newer)

    @property
    def consumed(self) -> bool:
        """True once a lookup collected it (or is waiting for its rows)."""
        return not self._untaken

    def done(self) -> bool:
        """True once the rows are staged (on CUDA the copy may still be in flight on the store stream)."""
        return self.future.done()

    def take(self, wait: Callable[..., T], *args: object) -> T:
        """``wait(future, *args)`` as the one collect of this handle; refused once it was collected.
        A wait that raises other than its fetch's failure (Ctrl-C: no rows came out) gives the
        handle back, to be collected again."""
        if not take_once(self._untaken):  # checked and marked at once: a check, then a mark,
            raise PrefetchHandleError(CONSUMED)  # let two threads both pass and get the rows
        try:
            return wait(self.future, *args)
        except BaseException:
            if not self._failed():
                self._untaken.append(True)
            raise

    def _failed(self) -> bool:
        """True once the fetch ended in an error (the collect that raised it spent the handle)."""
        future = self.future
        return future.done() and not future.cancelled() and future.exception() is not None

    def check_ids(self, flat: torch.Tensor, shape: tuple[int, ...]) -> None:
        """Refuse ids (``flat``, of ``shape``) other than those this handle prefetched, compared
        where the handle keeps its own: ids on the CPU with its host copy, if it has one."""
        # on the host a check waits for nothing (on the device it would wait for the store's
        # stream, later batches' copies included)
        kept = self.flat if self.host is None or flat.is_cuda else self.host
        if tuple(shape) != tuple(self.shape):
            raise PrefetchHandleError(
                f"lookup: ids (shape {tuple(shape)}) differ from the ids this handle prefetched "
                f"(shape {tuple(self.shape)}); pass the same ids"
            )
        given = flat.to(kept.device, torch.int64)
        if not torch.equal(given, kept):  # the same shape: name the first id that differs
            at = int(torch.nonzero(given != kept)[0])
            raise PrefetchHandleError(
                f"lookup: ids differ from the ids this handle prefetched at flat position {at} "
                f"(id {int(given[at])}; prefetched {int(kept[at])}); pass the same ids"
            )


class Prefetcher:
    """One worker thread (so batches resolve in the order they were queued) and a bound on depth."""

    def __init__(self, fetch: Callable[[torch.Tensor, bool], tuple], depth: int) -> None:
        self._fetch = fetch
        self._workers: list[threading.Thread] = []  # the pool's one worker, once started
        self._pool = RunnerPool(
            1, "tiered-store-prefetch", functools.partial(_worker_started, self._workers)
        )
        weakref.finalize(self, self._pool.shutdown, False)  # one never closed: its worker ends
        _LIVE_POOLS.add(self._pool)  # a fetch under way at the interpreter's exit ends first
        self._depth = depth
        self._in_flight = threading.BoundedSemaphore(depth)  # a new one in a forked child
        self.wait_histogram = LatencyHistogram()
        self.handles = 0
        self._queued: dict[int, torch.Tensor] = {}  # handle number -> ids not yet being fetched
        self._queued_lock = threading.Lock()
        self._numbers = itertools.count()
        self._closed: Future | None = None  # close()'s no-op, queued behind every fetch
        self._submitting = threading.Lock()  # no fetch is queued behind that no-op
        _PREFETCHERS.add(self)  # a forked child has its depth free

    def submit(
        self,
        ids: object,
        flat: torch.Tensor,
        shape: tuple[int, ...],
        packed: bool = False,
        write_seq: int = 0,
        host: torch.Tensor | None = None,
    ) -> PrefetchHandle:
        """Queue a fetch of ``flat`` (``ids`` validated and flattened from ``shape``); blocks while
        ``depth`` fetches are already in flight. ``write_seq``: the owner's writes so far;
        ``host``: a CPU snapshot of the ids given on the CPU, which lookup checks against."""
        slot = [True]  # taken by who frees the depth slot: the fetch as it starts, or below
        number = next(self._numbers)
        self._in_flight.acquire()
        try:
            with self._queued_lock:
                self._queued[number] = flat
            with self._submitting:  # else a fetch could be queued behind close()'s no-op
                try:
                    future = self._pool.submit(self._run, number, flat, packed, slot)
                except RuntimeError as exc:
                    if self._closed is None and self._pool.ended_at_exit:
                        raise RuntimeError(
                            "prefetch: the interpreter is exiting and its exit hook ended the "
                            "prefetch worker, so no fetch runs any more; expected prefetch() "
                            "before the exit began"
                        ) from None
                    if self._closed is None:  # open: its worker could not start
                        raise RuntimeError(
                            f"prefetch: cannot start the prefetch worker ({exc}); expected room "
                            "for one more thread (a process limit, memory for its stack)"
                        ) from exc
                    raise StoreClosedError(
                        "prefetch: the store is closed; open a new TieredStore"
                    ) from None
                self.handles += 1
            future.add_done_callback(functools.partial(self._never_ran, number, slot))
        except BaseException:  # closed, or interrupted (Ctrl-C) on the way: no handle comes out,
            self._never_ran(number, slot)  # and a fetch not started yet never will
            raise
        return PrefetchHandle(ids, flat, shape, packed, future, self, write_seq, host)

    def queued_ids(self) -> torch.Tensor | None:
        """Ids of prefetches still waiting in the queue (what the store will need next)."""
        with self._queued_lock:
            pending = list(self._queued.values())
        return torch.cat(pending) if pending else None

    def _never_ran(self, number: int, slot: list, future: Future | None = None) -> None:
        """A fetch done without running (its caller cancelled it while queued, the worker's
        start failed it: its done callback; or its prefetch() interrupted) frees its slot and ids
        now; kept, depth such fetches hung prefetch(). One that ran took its slot as it started."""
        if take_once(slot):
            with self._queued_lock:
                self._queued.pop(number, None)
            self._in_flight.release()

    def _run(self, number: int, flat: torch.Tensor, packed: bool, slot: list) -> tuple | None:
        """Fetch one queued batch, dropping it from the queued ids first; its slot is free after.
        Nothing when its prefetch() was interrupted before it started (that freed its slot: were
        it fetched, depth + 1 would be in flight)."""
        if not take_once(slot):
            return None
        try:
            with self._queued_lock:
                self._queued.pop(number, None)
            return self._fetch(flat, packed)
        finally:
            self._in_flight.release()

    def collect(
        self, handle: PrefetchHandle, then: Callable[[tuple], tuple] | None = None
    ) -> tuple:
        """Wait for a handle's result, recording how long the caller stalled; ``then``: what
        the caller makes of it (a fetch again), part of the collect: interrupted, it gives the
        handle back too."""
        if handle.owner is not self:  # its rows are another table's
            raise PrefetchHandleError(OTHER_STORE)
        return handle.take(self._wait, then)

    def _wait(self, future: Future, then: Callable[[tuple], tuple] | None = None) -> tuple:
        """A fetch's result (``then`` of it), recording how long the caller stalled for it."""
        start = time.perf_counter()
        try:
            result = future.result()
        except futures.CancelledError:  # (its caller's cancel() while it was queued)
            raise PrefetchHandleError(CANCELLED) from None
        finally:  # a fetch that failed was waited for too
            self.wait_histogram.observe(time.perf_counter() - start)
        return result if then is None else then(result)

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued work and stop the worker, waiting at most ``timeout`` seconds (None: until
        it is done); False when a fetch still runs (it ends on its own). From the worker itself
        (a fetch's done callback) it waits for nothing: the queue runs on after it returns."""
        with self._submitting:  # one worker runs jobs in order: a no-op queued last ends last,
            if self._closed is None:  # after every fetch queued (an interrupted prefetch's too)
                self._closed = self._queue_last()
            self._pool.shutdown(wait=False)  # each time: a close interrupted before it did not
            _LIVE_POOLS.discard(self._pool)  # the exit waits no more for what close gave up on
        # on the worker its no-op runs after this job: waited for, it would hang
        futures.wait([self._closed], 0 if self.on_worker() else timeout)
        return self._closed.done()

    def forked(self) -> None:
        """In a forked child: no thread gone holds a lock; no fetch is in flight (the parent's
        fail there, ``RunnerPool.forked``), so ``_forked_pools`` then frees ``depth`` slots (the
        parent's running fetch kept its slot for good, as ``depth`` of them hung every
        prefetch)."""
        self._queued_lock = threading.Lock()
        self._submitting = threading.Lock()
        self._queued.clear()

    def on_worker(self) -> bool:
        """True on this prefetcher's worker thread (where a fetch's done callbacks run)."""
        return threading.current_thread() in self._workers

    def _queue_last(self) -> Future:
        """A no-op queued behind every fetch; done at once when the pool takes no more work."""
        try:
            return self._pool.submit(_nothing)
        except RuntimeError:
            ended: Future = Future()
            ended.set_result(None)
            return ended


EXIT_WAIT_S = 10.0  # how long the interpreter's exit waits in all for calls under way (hung)
_LIVE_POOLS: weakref.WeakSet[RunnerPool] = weakref.WeakSet()  # prefetchers' pools, not shut down


@functools.cache  # the first hook's, for all of them
def exit_deadline() -> float:
    """The ``time.monotonic()`` by which every exit hook's wait ends: ``EXIT_WAIT_S`` from the
    first hook's call, for all of them (each taking its own, the exit waited that much per hook)."""
    return time.monotonic() + EXIT_WAIT_S


@atexit.register
def _end_fetches_at_exit() -> None:
    """Let the fetches under way end before the interpreter does (see ``RunnerPool.end_at_exit``):
    a script that exits without ``close()`` mid-fetch aborted, exit status 134."""
    deadline = exit_deadline()
    for pool in list(_LIVE_POOLS):
        pool.end_at_exit(deadline)


def _worker_started(workers: list[threading.Thread]) -> None:
    """A prefetch worker's start: noted in ``workers`` (a close() from it must not wait for the
    queue behind it), on one intra-op thread. Not a bound method: the worker keeps its pool,
    which would keep the prefetcher for good."""
    workers.append(threading.current_thread())
    single_intra_op_thread()


def _nothing() -> None:
    """What ``Prefetcher.close`` queues behind every fetch, to wait for them."""

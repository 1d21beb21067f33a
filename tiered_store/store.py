"""``TieredStore``: one lookup over a hot (compute device), warm (host RAM) and cold (disk) tier."""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import numbers
import operator
import reprlib
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache_plan import CacheHierarchy, IgnoredSettingWarning, ignored_tier_settings, shard_rows
from .capacity import available_host_memory, format_bytes
from .cold_table import ColdTable
from .config import StoreConfig, in_config_file, naming_file
from .delta.row_delta import GREW_STEP, RowDelta, committed_mark, delta_path
from .delta.table_versions import (
    current_version,
    open_current_version,
    refuse_a_lost_pointer,
    release,
    take_writer_lock,
)
from .delta.write_back import WriteBack, merge_last_wins
from .errors import (
    CommitError,
    ConfigError,
    RowDataError,
    RowIdError,
    StoreClosedError,
    TierIOError,
    warn_at_caller,
)
from .id_ops import array_for_torch, ids_on_gpu, nonzero, snapshot_of
from .integers import bool_among
from .latency import LatencyHistogram
from .prefetch import Prefetcher, PrefetchHandle, PrefetchHandleError
from .quantization import dequantize_rows
from .request_queue import QueuedRequest, QueuedRequestError
from .row_cache import RowCache, most_valuable_first, pinned_rows_of
from .slot_pool import SlotPool
from .stats import hit_ratio
from .store_lock import InFlight, StoreLock
from .table_sources import describe_tensor, tensor_without_values
from .warm_restart import (
    RestartState,
    RestartWarning,
    load_restart,
    remove_abandoned_saves,
    restart_path,
    restart_warning,
    save_restart,
    table_identity,
)


class UncommittedWritesWarning(UserWarning):
    """``close()`` dropped rows written since the last commit (as a crash would), or left them
    staged by a sharded commit that did not finish (the shards' next open resolves them)."""


# A warm restart reads its rows back in steps of RESTORE_CHUNK_BYTES (at most RESTORE_CHUNK_ROWS),
# each step in one cold read sorted by row id: the saved rows of a small-row table
# are dense in the file (several per page), so a large step reads each page once, in long extents
# (620k 32-byte rows: 0.92 s in 65,536-row steps, 0.16 s in one). Where a tier's policy ranks
# restored rows by their saved age (``restores_order``: LRU) each row lands with its own rank;
# other policies take RESTORE_ORDERED_ROWS per step, one clock batch each. Least valuable first.
RESTORE_CHUNK_BYTES = 64 << 20
RESTORE_CHUNK_ROWS = 1 << 22
RESTORE_ORDERED_ROWS = 65_536


def seconds_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``), at least 0; None for no deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def no_seconds(wait_s: object) -> bool:
    """``wait_s`` is given (not None) but no number of seconds (a bool, a string, NaN)."""
    return wait_s is not None and (
        isinstance(wait_s, bool) or not isinstance(wait_s, numbers.Real) or math.isnan(wait_s)
    )


def _touches_files(method: Callable) -> Callable:
    """A call that reads or writes the table's files: ``close()`` waits for it to end."""

    @functools.wraps(method)
    def counted(self: TieredStore, *args: Any, **kwargs: Any) -> Any:
        with self._file_calls.entered():
            return method(self, *args, **kwargs)

    return counted


class TieredStore:
    """A ``rows x dim`` table served through hot, warm and cold tiers.

    Results are bit-exact with indexing the table directly, whatever the capacities. Lookups are
    thread-safe; the cold reads of one lookup run outside the store's lock.

    A table of packed quantised rows (DeepSeek-V4.1's fp8 codes + ue8m0 scales; the manifest's
    ``quantization``) stays packed in every tier; lookups dequantise on the compute device and
    return ``[..., values]`` bfloat16 rows (``packed=True``: the packed ``uint8`` rows). With
    ``table.out_of_range: zero`` ids outside ``[0, rows)`` give all-zero rows instead of an error.

    Parameters
    ----------
    config : StoreConfig
        Table path, tier capacities and policies, cold I/O and prefetch depth.

    Examples
    --------
    >>> import numpy as np, torch, tempfile, os
    >>> from tiered_store import TieredStore, StoreConfig, create_table
    >>> d = tempfile.mkdtemp()
    >>> _ = create_table(os.path.join(d, "t.npy"), np.arange(40, dtype=np.float32).reshape(10, 4), progress=False)
    >>> cfg = StoreConfig.from_dict({"table": {"path": "t.npy"},
    ...     "tiers": {"hot": {"capacity": 2}, "warm": {"capacity": "50%"}}}, base_dir=Path(d))
    >>> with TieredStore(cfg) as store:
    ...     out = store.lookup(torch.tensor([[3, 9], [3, 0]]))
    ...     handle = store.prefetch(torch.tensor([1, 2]))
    ...     later = store.lookup(torch.tensor([1, 2]), handle)
    >>> out.shape, out[0, 0].tolist()
    (torch.Size([2, 2, 4]), [12.0, 13.0, 14.0, 15.0])
    """

    keeps_stats = True  # ``stats()`` counts lookups, hits and reads per tier (a TableBackend flag)

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        tiers = config.tiers
        self.device = compute_device(tiers.hot.device)
        # held (a shared lock) from before the open: old versions outlive their readers
        self.cold, self.generation, self._version_hold = self._open_current_version(config)
        self._writer_lock: int | None = None
        try:
            self._check_table_matches(config)
            self.quantization = self.cold.manifest.quantization
            self.rows, self.row_bytes = self.cold.rows, self.cold.row_bytes
            self.row_width, self.row_dtype = self.cold.dim, self.cold.dtype  # as stored, per tier
            self.dim = self.cold.manifest.values_per_row  # as returned
            self.dtype = torch.bfloat16 if self.quantization else self.row_dtype
            self.zero_out_of_range = config.table.out_of_range == "zero"
            self.caches = CacheHierarchy.from_config(config, self.rows, self.row_bytes, self.device)
            for line in ignored_tier_settings(config):
                warn_at_caller(in_config_file(line), IgnoredSettingWarning)
            self.hot, self.warm = self.caches.hot, self.caches.warm
            _check_host_memory(self.warm.capacity, self.hot.capacity, self.row_bytes, self.device)
            pin = tiers.warm.pin_memory is True or (
                tiers.warm.pin_memory == "auto" and self.device.type == "cuda"
            )
            self._pin = pin and torch.cuda.is_available()  # rows staged for the GPU: pinned
            self.hot_pool = SlotPool(self.hot.capacity, self.row_width, self.row_dtype, self.device)
            self.warm_pool = SlotPool(
                self.warm.capacity, self.row_width, self.row_dtype, torch.device("cpu")
            )
        except BaseException:
            self.cold.close()
            release(self._version_hold)
            raise
        # every change to the tiers' device state runs on this stream (store_lock.py)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._lock = StoreLock(self.caches, self._stream)  # also tells the tiers the queue's news
        self._releasing = threading.Lock()  # announced requests released one at a time
        self.lookup_latency = LatencyHistogram()
        self._prefetcher = Prefetcher(self._fetch, config.prefetch.depth)
        self._closed = False
        self._closing = threading.RLock()  # one close() at a time: a second waits, then returns
        self._closer: int | None = None  # the thread whose close() holds it (a handler's, at once)
        self._save_order = threading.RLock()  # warm-restart saves: the files land in taken order
        # (an RLock: a signal handler's close inside a save of its thread saves, not waits)
        self._saves_taken = self._saves_written = 0
        self._file_calls = InFlight()  # calls reading or writing the files: close() waits for them
        self._left_calls = False  # a close gave up waiting for them (close's wait_s)
        self._closed_step = 0  # the committed step when close() closed the delta
        self._writes: WriteBack | None = None  # the write path, once the table has a delta
        self._staged: tuple[int, np.ndarray, int] | None = None  # prepare_commit's step, ids, seq
        self._write_seq = 0  # write() calls so far: a fetch that spans one re-reads its rows
        self.commit_errors = 0
        self._stop = threading.Event()  # set by close(): background restore and saves end
        self._threads: list[threading.Thread] = []
        self.restore_seconds: float | None = None  # how long the last warm restart took
        self._hot_restored = threading.Event()  # set once the restore has done the hot tier
        self._unrestored = RestartState({})  # per tier, saved rows until the restore is done
        # zipf-tuned's online re-pin: lookups set this when an interval ends; a thread plans it
        self._repin_wanted = threading.Event() if self.caches.online else None
        try:
            self._start(config)
        except BaseException:  # nothing left open: no fd, lock, pinned reader or thread
            self._stop_background()
            self._close_files()
            raise

    def _start(self, config: StoreConfig) -> None:
        """The rest of the open: the delta (a reader's view), the warm start, the restore, save
        and re-pin threads."""
        if delta_path(self.cold.path).is_dir():  # a reader's view: one commit, until reopened
            with contextlib.suppress(ConfigError):  # a delta never initialised: none
                self._open_writes(create=False, pinned=True)
        # a warm restart's saved tiers are read before the warm start: a re-pinning tier whose
        # pins come back does not preload its profile's (they would fill the slots they need)
        saved = None
        if config.tiers.restart.enabled:
            path = restart_path(config.table.path)
            remove_abandoned_saves(path)  # a killed save's temporary (a whole copy of the file)
            saved = load_restart(path, table_identity(self.cold, self.generation))
            if saved is not None:
                self._restore_profiles(path, saved)
                self._unrestored = RestartState(dict(saved.held), dict(saved.pinned))
        restored = [
            c.name for c in self.caches.online if saved is not None and c.name in saved.pinned
        ]
        # on the store's stream, which lookups gather on, after the tiers' state made so far
        with self._lock:
            metadata = self.cold.manifest.metadata
            shard = shard_rows(metadata)  # a shard: lists name table rows
            layout = self.cold.manifest.engram_layout  # what convert/init recorded
            layouts = [(f"the table {config.table.path}", layout)] if layout is not None else []
            for cache, ids, slots in self.caches.warm_start(config, restored, shard, layouts):
                pool = self.hot_pool if cache is self.hot else self.warm_pool
                order = torch.argsort(ids)
                pool.write(slots[order.to(slots.device)], self._read_cold(ids[order]))
        for cache in self.caches.online:  # full windows are counted in that thread
            cache.online.deferred = True
        if config.tiers.restart.enabled:
            self._start_restart_threads(saved, config.tiers.restart.save_every_s)
        if self._repin_wanted is not None:
            repin = threading.Thread(target=self._repin_loop, name="repin", daemon=True)
            self._threads.append(repin)
            repin.start()

    @classmethod
    def open(cls, config: str | Path | dict | StoreConfig) -> TieredStore:
        """Open from a YAML path, a plain dict or a ``StoreConfig``.

        Examples
        --------
        >>> store = TieredStore.open("examples/tiers.yaml")  # doctest: +SKIP
        """
        if isinstance(config, StoreConfig):
            return cls(config)
        if isinstance(config, dict):
            return cls(StoreConfig.from_dict(config, base_dir=Path.cwd()))
        checked = StoreConfig.from_yaml(config)  # its errors name the file themselves
        with naming_file(config):  # and so do those found at open, of the file's keys
            return cls(checked)

    # -- the lookup interface ----------------------------------------------------------------------
    def lookup(
        self, ids: Any, handle: PrefetchHandle | None = None, *, packed: bool = False
    ) -> torch.Tensor:
        """Rows for ``ids`` (an integer tensor, array or list of any shape) -> ``[..., dim]`` on the
        compute device. With ``handle`` from ``prefetch(ids)``, collects the staged result.

        ``packed=True`` (quantised tables) returns the rows as stored, ``uint8 [..., row_width]``;
        a prefetch handle carries the form it was prefetched in."""
        start = time.perf_counter()
        try:
            if handle is not None:
                self._check_open()  # the rows it staged may hold writes that close dropped
                out, event = self._collect(ids, handle, packed)
            else:
                flat, shape = self._validate(ids)
                out, event = self._fetch(flat, packed)
                out = out.view(*shape, out.shape[-1])
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
                out.record_stream(torch.cuda.current_stream(self.device))
            return out
        finally:  # every call, returned or raised (as the prefetch stall counts a failed fetch)
            self.lookup_latency.observe(time.perf_counter() - start)

    def prefetch(self, ids: Any, *, packed: bool = False) -> PrefetchHandle:
        """Start fetching ``ids`` in the background; pass the handle to ``lookup(ids, handle)``.

        Validation happens here, so bad ids raise at once. At most ``prefetch.depth`` fetches run
        ahead; a further call blocks until one finishes. Quantised rows are dequantised in the
        background too, unless ``packed``."""
        self._check_open()
        tensor = as_id_tensor(ids)
        flat, host = self._checked_flat(tensor), None
        if flat.is_cuda:
            flat = self._to_device(flat, given=tensor)
        else:
            # the caller may refill its ids as soon as this returns. From pinned ids the copy to
            # the device is asynchronous, queued behind earlier fetches, and would read the
            # refilled buffer: it copies a snapshot on the host, pinned too (torch's pinned
            # allocator reuses its memory only once the copy is done). From pageable ids CUDA
            # stages the copy before it returns. The handle keeps the snapshot: lookup(ids,
            # handle) compares the caller's ids with it on the host, waiting for no device work.
            # A store on the CPU copies its ids to no GPU: it asks no is_pinned() (which may
            # start a CUDA context).
            if self.device.type == "cuda" and tensor.is_pinned():  # int32 converted as copied:
                host = torch.empty(flat.shape, dtype=torch.int64, pin_memory=True).copy_(flat)
            else:  # pageable: CUDA stages their copy before it returns
                host = snapshot_of(flat.to(torch.int64), tensor, pinnable=False)
            flat = self._to_device(host)
        # the writes so far, read before the fetch can start: no write slips between
        return self._prefetcher.submit(
            ids, flat, tuple(tensor.shape), packed, self._write_seq, host
        )

    @property
    def engram_layout(self) -> dict[str, Any] | None:
        """The Engram layout the table's manifest records (``metadata["engram"]``: layer, head
        primes, seed, ... as convert wrote it), which an Engram model checks it against; None
        for a table that records none."""
        return self.cold.manifest.engram_layout

    @property
    def prefetch_wait_latency(self) -> LatencyHistogram:
        """How long lookups waited for their prefetch handles (read at scrape time)."""
        return self._prefetcher.wait_histogram

    @property
    def prefetches_started(self) -> int:
        """Prefetches started since the store opened."""
        return self._prefetcher.handles

    @property
    def queue_news(self) -> dict[str, int]:
        """Tellings of an announce, batch served or release to the tiers that failed (``failures``: out of
        memory, say; each is told again by the lock's next holder, but an announce's own, which
        raises and withdraws its request) and news ``dropped`` after ``store_lock.NEWS_TRIES``
        failures (a tier then ranks its victims without it)."""
        return {"failures": self._lock.news_failures, "dropped": self._lock.news_dropped}

    def announce(self, ids: Any) -> QueuedRequest:
        """Tell the store a request that will look up ``ids`` is queued (or being served): until
        ``release(request)``, both cache tiers evict rows no announced request looks up first,
        then those needed furthest back in the queue. A server knows a request's row ids when it
        queues it (Engram's depend only on the tokens); how much this saves:
        docs/policies.md, "A queue known ahead".

        Examples
        --------
        >>> request = store.announce(row_ids)        # doctest: +SKIP
        >>> rows = store.lookup(row_ids)              # doctest: +SKIP
        >>> store.release(request)                    # doctest: +SKIP
        """
        self._check_open()
        # left where the caller has them: the queue copies them to the CPU on the current stream
        flat = self._in_table(self._checked_flat(as_id_tensor(ids)))
        # the tiers keep per-slot queue state from the first on (or the first after one failed)
        if self.hot.queue is None or self.warm.queue is None:
            with self._lock.host_inputs():  # made on the store's stream: no wait for the caller's
                self.caches.attach_queue()
        made: list[QueuedRequest] = []  # the request, as soon as it is made
        try:
            request = self.caches.queue.add(flat, made)  # its own lock: lookups go on meanwhile
            self._lock.post(request, None)
            self._lock.tell_if_free(own=request)  # waits for the lock only past a backlog
        except BaseException:  # (out of memory telling the tiers; a Ctrl-C as the queue took it,
            # or before its news was posted) never returned: never released, so withdrawn; the
            # lock's next holder tells the tiers, the request again first: a tier may have missed it
            if made and made[0] in self.caches.queue:
                with self._releasing:
                    self._lock.post(made[0], None)
                    self._unqueue(made[0])  # (rows passed on)
            raise
        return request

    def release(self, request: QueuedRequest) -> None:
        """A request from ``announce`` was served or cancelled; its rows lose their standing. A
        no-op once the store is closed (a server releasing in a ``finally``)."""
        if self._closed:
            return
        with self._releasing:  # one release at a time: each reads the queue the last one left
            self._unqueue(request)
        self._lock.tell_if_free()  # waits for the lock only past a backlog of news (NEWS_BACKLOG)

    def _unqueue(self, request: QueuedRequest) -> None:
        """Drop ``request`` from the queue and post the news (``_releasing`` held). A Ctrl-C once
        it is dropped (raised as ``remove`` returns, or before the news is posted) posts every
        row of it instead, each waiting for the request that looks it up first then: its rows
        would wait in the tiers for a request gone, for good."""
        queue = self.caches.queue
        try:  # the queue's own lock: lookups go on meanwhile
            self._lock.post(request, queue.remove(request))
        except BaseException as exc:  # (a refusal changed nothing)
            mine = isinstance(request, QueuedRequest) and request.owner is queue
            if mine and request not in queue and not isinstance(exc, QueuedRequestError):
                self._lock.post(request, (request.rows, queue.next_use(request.rows)))
            raise

    def served(self, request: QueuedRequest, ids: Any = None) -> None:
        """A request from ``announce`` served in several lookups: call this with each batch's
        ``ids`` just before looking them up. The rows none of its later batches look up lose its
        standing (they wait for the next request that looks them up, if any), so this batch's
        admissions evict them before rows the requests behind it need. Ids it did not announce
        are not counted. ``ids`` omitted: every lookup it has left, for its last batch (its
        whole lookup, served in one), whatever the batches before took; taken from the queue (no
        check nor copy of the ids; on CUDA, no wait for the device). ``release`` it after its
        last batch, as usual. A no-op once the store is closed.

        Examples
        --------
        >>> request = store.announce(row_ids)        # doctest: +SKIP
        >>> for batch in row_ids.split(1024):        # doctest: +SKIP
        ...     store.served(request, batch)
        ...     rows = store.lookup(batch)
        >>> store.release(request)                    # doctest: +SKIP
        """
        if self._closed:
            return
        flat = None if ids is None else self._in_table(self._checked_flat(as_id_tensor(ids)))
        with self._releasing:  # in queue order with the releases
            passes = request.passes if isinstance(request, QueuedRequest) else 0
            try:
                moved = self.caches.queue.served(request, flat)  # its own lock, as a release's
                self._lock.post(request, moved, gone=False)
            except BaseException:  # (a Ctrl-C as the pass returns) its pairs finished, perhaps,
                # with no news posted: its release tells the tiers every row of it. A failure
                # before the pass (a refusal) or in it (out of memory) changed nothing
                if isinstance(request, QueuedRequest) and request.passes != passes:
                    request.missed_batch = True
                raise
        self._lock.tell_if_free()

    # -- the write interface ---------------------------------------------------------------------
    @_touches_files
    def write(self, ids: Any, rows: Any) -> None:
        """Make ``rows`` (``[..., row_width]``, as stored) the current version of ``ids``: every
        later lookup sees them; ``commit()`` makes them durable (``close()`` drops those not
        committed, as a crash would, with an ``UncommittedWritesWarning``). For a repeated id the
        last row wins. An id outside the table (``RowIdError``), rows of another shape, or holding
        a NaN, an inf or a value the table's dtype cannot hold (``RowDataError``) write nothing.
        One that raises (out of memory) has applied whole or not at all (out of
        memory again while it recovered: each row old or new), and every later lookup and
        ``commit()`` see which. The first write creates the table's LMDB delta
        (``TABLE.npy.delta/``).

        Examples
        --------
        >>> import tempfile, os
        >>> from tiered_store import create_table
        >>> d = tempfile.mkdtemp()
        >>> _ = create_table(os.path.join(d, "t.npy"), np.zeros((10, 2), np.float32), progress=False)
        >>> cfg = {"table": {"path": os.path.join(d, "t.npy")}, "tiers": {"hot": {"capacity": 2}}}
        >>> with TieredStore.open(cfg) as store:
        ...     store.write([3, 7], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
        ...     store.commit()
        1
        >>> with TieredStore.open(cfg) as store:  # reopened: the committed rows
        ...     store.lookup([7, 3, 0]).tolist(), store.committed_step
        ([[2.0, 2.0], [1.0, 1.0], [0.0, 0.0]], 1)
        """
        self._check_open()
        if self.quantization is not None:
            raise RowDataError(
                f"write: {self.cold.path.name} holds packed quantised rows; writes need a table "
                "of float rows"
            )
        flat, shape = self._host_ids(ids)  # out_of_range: zero reads, never writes
        rows = as_rows(rows, (*shape, self.row_width), self.row_dtype)
        unique_ids, last_rows = merge_last_wins([flat], [rows])
        with self._lock:
            self._become_writer()
            try:
                self._writes.write(unique_ids, last_rows)
            finally:  # one that raised may have applied (WriteBack.write): staged rows are stale
                self._write_seq += 1

    @_touches_files
    def commit(self, step: int | None = None, *, redo: bool = False) -> int:
        """Make every write so far durable in one LMDB transaction, with ``step`` (default: the
        last committed step + 1; an integer above the last, or equal to it with nothing written
        since, and below 2**63 - 1, else ``ConfigError``: readers elsewhere tell commits apart by
        their step, and 2**63 - 1 marks a map grown in another process); returns
        the step. After it returns, a crash (kill -9, power loss) loses none of it; a crash during
        it leaves every row as of this commit or the last. Raises ``CommitError`` (the last commit
        intact, the writes still pending) when it fails, and while the table holds a sharded
        commit's staged step (``ShardedStore``'s open finishes or drops it). ``redo``: writes may
        be committed at the last step again (a shard redoing the step of shards left at two
        steps; ``prepare_commit`` takes the same flag for a sharded store)."""
        self._check_open()
        with self._lock:
            step, ids, rows = self._rows_to_commit(step, redo)
            try:
                self._writes.delta.commit(ids, rows, step)
            except CommitError:
                self.commit_errors += 1
                raise
            self._writes.committed(ids)
        return step

    # -- the two phases of a sharded commit (ShardedStore's building blocks) ---------------------
    @_touches_files
    def prepare_commit(self, step: int, *, redo: bool = False, round_id: str | None = None) -> int:
        """Phase 1: stage every write so far at ``step`` (checked as ``commit`` checks it) in one
        durable transaction beside the last commit, which stays the committed step (no reader
        sees the staged rows), with the sharded commit round's ``round_id``; the writes stay
        pending. Returns the step. ``CommitError`` when it fails (what was staged before
        stands)."""
        self._check_open()
        with self._lock:
            step, ids, rows = self._rows_to_commit(step, redo)
            try:
                self._writes.delta.stage(ids, rows, step, round_id)
            except CommitError:
                self.commit_errors += 1
                raise
            self._staged = (step, ids, self._write_seq)
        return step

    @_touches_files
    def finish_commit(self, step: int) -> None:
        """Phase 2: commit the rows staged at ``step`` in one durable transaction; the writes
        they hold are committed, as by ``commit`` (written again since the staging, they stay
        pending). ``CommitError`` when it fails (they stay staged). Rows another store staged
        are committed too, but this store's cached copies of them stay older: reopen it."""
        self._check_open()
        with self._lock:
            self._become_writer()
            try:
                self._writes.delta.commit_staged(step)
            except CommitError:
                self.commit_errors += 1
                raise
            staged, self._staged = self._staged, None
            if staged is not None and staged[0] == step and staged[2] == self._write_seq:
                self._writes.committed(staged[1])

    @_touches_files
    def abort_commit(self) -> None:
        """Drop the rows staged on disk (by ``prepare_commit`` here or elsewhere), durably; the
        writes stay pending. ``CommitError`` when it fails."""
        self._check_open()
        with self._lock:
            self._become_writer()
            self._staged = None
            try:
                self._writes.delta.drop_staged()
            except CommitError:
                self.commit_errors += 1
                raise

    @property
    def staged_step(self) -> int | None:
        """The step staged on disk (as of this store's view) and not yet committed or dropped:
        a sharded commit interrupted between its phases; None when nothing is."""
        return None if self._writes is None else self._writes.delta.staged_step

    @property
    def commit_rounds(self) -> tuple[str | None, str | None] | None:
        """The delta's (staged round, last committed round) (``RowDelta.commit_rounds``), the
        committed one that of the compaction this version came from where the delta has none;
        None for a store that never wrote, of a version no compaction recorded a round in."""
        compacted = (self.cold.manifest.metadata or {}).get("committed_round")
        if self._writes is None:
            return None if compacted is None else (None, compacted)
        staged, committed = self._writes.delta.commit_rounds
        return staged, compacted if committed is None else committed

    def _rows_to_commit(self, step: int | None, redo: bool) -> tuple[int, np.ndarray, np.ndarray]:
        """As the writer: the commit's step, checked, and every row written since the last
        (sorted unique ids, rows as stored bytes); ``redo``: the last step may take them again."""
        self._become_writer()
        last = self._writes.delta.step
        step = _commit_step(last + 1 if step is None else step, last)
        ids, rows = self._writes.collect()
        if ids.size and step == last and not redo:
            raise ConfigError(
                f"commit: step {step} is the last committed step, and {ids.size:,} written "
                "rows are waiting: readers in other processes tell commits apart by their "
                f"step, so they would never see these; expected {step + 1} or more"
            )
        return step, ids, rows

    @_touches_files
    def adopt_writer_lock(self, lock: int) -> None:
        """Become the table's writer under ``lock``, its writer lock (``take_writer_lock``) that
        the caller took before opening this store, so that no other writer came between (as
        ``tiered-store train`` holds its run's before touching it). Adopted, ``close()`` releases
        it; refused because the table moved on since the open (``TierIOError``), it is released."""
        self._check_open()
        with self._lock:
            if self._writer_lock is not None:
                raise ConfigError(
                    f"adopt_writer_lock: this store already holds {self.cold.path.name}'s writer "
                    "lock; expected a store that has not written yet"
                )
            self._become_writer(lock)

    @_touches_files
    def read_committed(self, ids: Any) -> tuple[int, torch.Tensor]:
        """(step, rows) of ``ids`` as of the last commit, from one LMDB read transaction over the
        base table: never an uncommitted write, never a mix of two commits. Bypasses the caches
        (a reader's view, for checks and other processes' readers; lookups see writes at once)."""
        self._check_open()
        flat, shape = self._host_ids(ids)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = self.cold.read_rows(unique.numpy())
        step = self._base_step
        if self._writes is not None:
            step, found, raw = self._writes.delta.snapshot(unique.numpy())
            if found.any():
                rows[torch.from_numpy(found)] = torch.from_numpy(raw[found]).view(self.row_dtype)
        return step, rows[inverse].view(*shape, self.row_width)

    @property
    def committed_step(self) -> int:
        """The step of the table's last commit (0 for a table never written), across
        compactions; after close, as close left it."""
        if self._writes is None:
            return self._base_step
        return self._closed_step if self._closed else self._writes.delta.step

    @property
    def _base_step(self) -> int:
        """The step a compacted version was made at (0 for a first version)."""
        return int((self.cold.manifest.metadata or {}).get("committed_step", 0))

    def stats(self) -> dict[str, dict[str, float]]:
        """Per tier: lookups, hits, misses, hit_rate, admissions, evictions, bytes_in, occupancy,
        capacity; cold: rows and bytes read, read requests, errors and checksum failures; prefetch: handles and stall seconds; queue: requests announced and not released, their distinct rows, and the failed and dropped tellings of the queue's news to the tiers (``queue_news``).
        Read without the store's lock, so a scrape never waits for lookups or a commit: while
        lookups run, the two tiers may be read a batch apart (warm's lookups are hot's misses
        once they pause)."""
        out: dict[str, dict[str, float]] = {}
        for cache in (self.hot, self.warm):  # never waits on the store lock (a commit's fsync)
            c = cache.counters.as_dict()
            c["hit_rate"] = hit_ratio(c["hits"], c["lookups"])
            c["bytes_in"] = (c["admissions"] + c["preloaded"]) * self.row_bytes
            c["occupancy"] = cache.occupancy
            c["capacity"] = cache.capacity
            if cache.online is not None:
                c["pinned"] = cache.pinned_count
                c["repins"], c["rows_repinned"] = cache.online.repins, cache.online.rows_pinned
            out[cache.name] = c
        out["cold"] = {
            k: getattr(self.cold, k)
            for k in (
                "rows_read",
                "bytes_read",
                "read_requests",
                "read_errors",
                "checksum_failures",
            )
        }
        out["prefetch"] = {
            "handles": self._prefetcher.handles,
            "wait_seconds_total": self._prefetcher.wait_histogram.sum,
        }
        out["queue"] = {  # requests announced and not released (``announce``)
            "requests": len(self.caches.queue),
            "rows": self.caches.queue.rows,
            **{f"news_{k}": v for k, v in self.queue_news.items()},
        }
        out["lookup"] = {
            "calls": self.lookup_latency.count,
            "seconds_total": self.lookup_latency.sum,
        }
        if self._writes is not None:
            w = self._writes
            out["writes"] = {
                "rows_written": w.rows_written,
                "dirty_rows": w.dirty_rows,
                "spilled_rows": w.spilled_rows,
                "commits": w.delta.commits,
                "commit_errors": self.commit_errors,
                "map_grows": w.delta.map_grows,
                "committed_step": self._closed_step if self._closed else w.delta.step,
            }
        return out

    def write_counters(self) -> dict[str, int]:
        """The write path's counters, named as their metrics (zeros for a table never written)."""
        w = self._writes
        return {
            "written_rows_total": w.rows_written if w else 0,
            "dirty_rows": w.dirty_rows if w else 0,
            "written_back_rows_total": w.spilled_rows if w else 0,
            "commits_total": w.delta.commits if w else 0,
            "commit_errors_total": self.commit_errors,
            "delta_map_grows_total": w.delta.map_grows if w else 0,
            "delta_read_errors_total": w.delta.read_errors if w else 0,
        }

    def memory_report(self) -> dict[str, Any]:
        """Payload bytes per tier, metadata bytes per table row and per cached slot, and the bytes
        announced requests hold now (``queue_bytes``: the queue's (row, request) pairs, each
        request's own arrays (``QueuedRequest.nbytes``) and both tiers' victim candidates in its
        order)."""
        with self._lock.host_inputs():  # the tiers' candidates change under lookups
            queued = sum(c.queue_candidate_bytes() for c in (self.hot, self.warm))
        return {
            "hot_payload_bytes": self.hot_pool.nbytes,
            "warm_payload_bytes": self.warm_pool.nbytes,
            "hot_metadata": self.hot.metadata_bytes(),
            "warm_metadata": self.warm.metadata_bytes(),
            "queue_bytes": self.caches.queue.nbytes + self.caches.queue.request_bytes + queued,
        }

    def save_restart(self) -> Path:
        """Save the rows hot and warm hold (most valuable first) to ``TABLE.npy.restart`` for a
        warm restart; ``close()`` calls it when ``tiers.restart.enabled``. Returns the path.
        A closed store raises ``StoreClosedError`` (its close saved what it held), as does a
        save under way when a close that timed out came (it saved nothing, see ``close``).

        Examples
        --------
        >>> import tempfile, os
        >>> from tiered_store import create_table
        >>> d = tempfile.mkdtemp()
        >>> _ = create_table(os.path.join(d, "t.npy"), np.zeros((100, 2), np.float32), progress=False)
        >>> cfg = {"table": {"path": os.path.join(d, "t.npy")},
        ...        "tiers": {"warm": {"capacity": 10}, "restart": {"enabled": True}}}
        >>> with TieredStore.open(cfg) as store:
        ...     _ = store.lookup([5, 6, 7])
        >>> with TieredStore.open(cfg) as store:  # the rows come back in the background
        ...     store.wait_restored(), sorted(store.warm.held_rows().tolist())
        (True, [5, 6, 7])
        """
        self._check_open()  # closed, its rows would land over a later store's file
        with self._lock.host_inputs():  # it reads the tiers' state: nothing the caller queued
            held = {  # copies, ranked once the lock is let go: lookups never wait on the sort
                cache.name: (*cache.held(), self._unrestored.held.get(cache.name), cache.capacity)
                for cache in (self.hot, self.warm)
            }
            saved_pins = {c.name: self._unrestored.pinned.get(c.name) for c in self.caches.online}
            pin_flags = {c.name: c.pin_flags().clone() for c in self.caches.online}
            # the counts as the lookups so far leave them: counted and copied off the lock
            points = {c.name: c.online.save_point(held[c.name][0]) for c in self.caches.online}
            taken = self._saves_taken = self._saves_taken + 1
        with self._on_store_stream():  # where the copies were queued: read after they are made
            held_rows = {name: _rows_to_save(*parts) for name, parts in held.items()}
            pinned = {
                name: pinned_rows_of(held[name][0], pin_flags[name]).cpu().numpy()
                if saved is None
                else saved
                for name, saved in saved_pins.items()
            }
            profiles = {c.name: c.online.saved_profile(points[c.name]) for c in self.caches.online}
        state = RestartState(held_rows, pinned, profiles)
        path = restart_path(self.config.table.path)

        def still_current() -> None:
            """Refuse the save once the table moved on or the store closed (a close that timed
            out while it wrote, saving nothing of its own): before writing, and before the
            rename, which would land over the file a store opened since had saved."""
            self._check_open()
            if self._moved_on() is not None:
                raise TierIOError(  # the file is the current version's: a newer store saves it
                    errno.ESTALE,
                    f"warm restart: {path.name} not saved: {self.cold.path.name} moved on to a "
                    "newer version since this store opened",
                )

        with self._save_order:  # a save taken earlier never replaces a later one's file
            still_current()
            if taken > self._saves_written:
                identity = table_identity(self.cold, self.generation)
                save_restart(path, identity, state, still_current)  # checked again at its rename
                self._saves_written = taken
        return path

    def wait_repinned(self, timeout: float | None = None) -> bool:
        """Wait until no tier waits for its online re-pin (tests and benchmarks call it after a
        lookup to re-pin at the same batch boundary as replay); True when none does. A closed
        store re-pins no more: it returns at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.caches.repin_waiting() and not self._closed:  # closed: no thread to wait on
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._repin_wanted.set()  # updates a restore queued wake the thread too
            time.sleep(0.0005)
        return not self.caches.repin_waiting()

    def wait_restored(self, timeout: float | None = None) -> bool:
        """Wait for a background warm restart to finish; True when none is running."""
        restoring = [t for t in self._threads if t.name == "restore"]
        for thread in restoring:
            thread.join(timeout)
        return not any(t.is_alive() for t in restoring)

    def close(self, *, wait_s: float | None = None) -> bool:
        """Finish in-flight prefetches, wait for lookups, writes and committed reads under way
        and refuse new ones, then close the table file; idempotent. With
        ``tiers.restart.enabled``, first saves which rows the tiers hold (a warning if it fails).
        ``wait_s``: return after at most this long (``math.inf``: no bound, as None) with calls
        still under way (a read hung on a dying disk); the store is closed to new calls, and the
        last of those closes the files (no save: it needs the store's lock, which such a call
        may hold). Called from a fetch's
        done callback while another thread closes the store, it returns at once. Returns False
        when it left calls under way (now or at an earlier close), or returned at once so, as a
        signal handler's close on a thread inside its own close does (that close finishes the
        job). Called on a thread holding the store's lock (a signal handler's, inside a lookup),
        it raises RuntimeError: it would wait for that lock for good."""
        if no_seconds(wait_s):
            raise ConfigError(
                f"close: wait_s={wait_s!r}; expected a number of seconds, or None to wait for "
                "the calls under way to end"
            )
        if wait_s is not None and wait_s >= threading.TIMEOUT_MAX:  # no bound (a join's
            wait_s = None  # timeout past it overflows)
        me = threading.get_ident()
        if self._closer == me:  # a signal handler's, inside this thread's close (one that came
            return False  # before this was set takes the RLock again, and closes or finds closed)
        if self._lock.held_here():
            raise RuntimeError(
                f"close: called on a thread inside a call that holds the lock of the store of "
                f"{self.cold.path.name} (a signal handler's close during a lookup?): it would "
                "wait for that call, which cannot go on before close returns; expected close() "
                "outside the store's calls (set a flag in the handler and close after the call)"
            )
        # on the prefetch worker (a fetch's done callback), a close under way on another thread
        # waits for this very thread: waiting for its lock, each would wait for the other
        if not self._closing.acquire(blocking=not self._prefetcher.on_worker()):
            return False  # that close finishes the job
        try:
            self._closer = me
            if self._closed:
                return not self._left_calls
            deadline = None if wait_s is None else time.monotonic() + wait_s
            self._stop_background(deadline)
            if self._file_calls.close(seconds_left(deadline)):
                try:
                    self._save_on_close()
                finally:  # interrupted (Ctrl-C), or a warning made an error: the files close
                    self._close_files()
                return True
            if self._writes is not None:  # for stats() meanwhile (the delta closes later)
                self._closed_step = self._writes.delta.step
            self._closed = True  # new calls are refused; the files stay open under those running
            warn_at_caller(
                f"close: calls to {self.cold.path.name} still under way after {wait_s:g} s; the "
                "last of them to end closes its files (no warm-restart save)",
                RuntimeWarning,
            )
            self._file_calls.then(self._close_files_late)
            self._left_calls = True
            return False
        finally:
            self._closer = None
            self._closing.release()

    def _stop_background(self, deadline: float | None = None) -> None:
        """End the restore, save and re-pin threads and let in-flight prefetches land, waiting
        until ``deadline`` (``time.monotonic()``; None: until they end)."""
        self._stop.set()
        if self._repin_wanted is not None:
            self._repin_wanted.set()  # wakes the re-pin thread to end
        for thread in self._threads:
            if thread.ident is not None:  # one whose start failed (an open unwinding) never ran
                thread.join(seconds_left(deadline))
        self._prefetcher.close(seconds_left(deadline))  # they land first: the save has them

    def _save_on_close(self) -> None:
        """Count what the re-pin thread left, warn of writes not committed, save the restart."""
        with self._lock.host_inputs():
            for cache in self.caches.online:  # updates the re-pin thread had not applied yet
                try:
                    cache.online.count_pending()
                except Exception as exc:  # noqa: BLE001 (a fault the re-pin thread survives:
                    # raised here, the files stayed open and each close failed on it again)
                    warn_at_caller(
                        f"online re-pin of the {cache.name} tier: counting its last updates at "
                        f"close failed ({type(exc).__name__}: {exc}); they are dropped, as "
                        "after a failed count in the re-pin thread",
                        RuntimeWarning,
                    )
                    try:
                        cache.online.drop_pending()
                    except Exception as again:  # noqa: BLE001 (no memory for the slots to
                        # reset: raised here, close skipped its save and the writes' warning)
                        warn_at_caller(
                            f"online re-pin of the {cache.name} tier: dropping them failed too "
                            f"({type(again).__name__}: {again}); the warm-restart save may hold "
                            "rows admitted since the last count with their slots' old counts",
                            RuntimeWarning,
                        )
            writing = self._writes is not None and self._writer_lock is not None
            dropped = self._writes.dirty_rows if writing else 0
        if dropped:
            staged = self._staged  # prepare_commit's, not committed or dropped since
            since = (
                f"close: {dropped:,} rows written to {self.cold.path.name} since its last "
                f"commit (step {self._writes.delta.step})"
            )
            warn_at_caller(
                f"{since} are not committed here, but staged at step {staged[0]} by a sharded "
                "commit whose second phase did not finish: the shards' next open (ShardedStore, "
                "on every rank) commits them if every shard staged that step, else drops them"
                if staged is not None and staged[2] == self._write_seq  # no write since
                else f"{since} are dropped, as a crash would drop them; call commit() before "
                "close() to keep them",
                UncommittedWritesWarning,
            )
        if self.config.tiers.restart.enabled:
            try:
                self.save_restart()
            except Exception as exc:  # noqa: BLE001 (an unreadable version pointer, no memory for
                # a copy: raised here, the files stayed open)
                kept = getattr(exc, "errno", None) == errno.ESTALE  # the newer version's file stays
                path = restart_path(self.config.table.path)
                warn_at_caller(
                    f"warm restart: could not save {path} ({type(exc).__name__}: {exc}); "
                    + (
                        "the newer version's own file is kept"
                        if kept
                        else "the file is left as it was: the next open restores it only if "
                        "it is intact and of this table version (an earlier save, the rows held "
                        "then)"
                        if path.is_file()  # a periodic save's, the last close's, or one this
                        # store found stale or corrupt at its open (not checked again here)
                        else "the next open starts cold"
                    ),
                    RestartWarning,
                )

    def _close_files(self) -> None:
        """Close the table file and the delta, and release the version hold and writer lock."""
        if self._writes is not None:  # for committed_step and stats() after close
            with contextlib.suppress(TierIOError):  # unreadable: close goes on all the same
                self._closed_step = self._writes.delta.step
        self._closed = True
        try:
            if self._stream is not None:  # the tiers' device memory, allocated on the opener's
                # stream, is freed with the store: no work of the store's stream may still use
                # it (a prefetch's admissions never collected), or the allocator hands it out
                self._stream.synchronize()
        finally:  # a device error raised there still closes the files and releases the locks
            self.cold.close()
            if self._writes is not None:  # uncommitted writes are dropped, as a crash would
                self._writes.delta.close()
            for fd in (self._version_hold, self._writer_lock):
                if fd is not None:
                    release(fd)

    def _close_files_late(self) -> None:
        """``_close_files`` from the last call that outlived a timed-out close: a failure is a
        warning, never that call's error."""
        try:
            self._close_files()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(
                f"close: closing {self.cold.path.name} failed ({exc})", RuntimeWarning, stacklevel=2
            )

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TieredStore({self.cold.path.name}: {self.rows:,} x {self.dim} {str(self.dtype).removeprefix('torch.')}, "
            f"hot {self.hot.capacity:,} rows on {self.device}, warm {self.warm.capacity:,} rows, "
            f"cold {self.config.tiers.cold.io})"
        )

    # -- internals ---------------------------------------------------------------------------------
    def _on_store_stream(self) -> contextlib.AbstractContextManager:
        """The context that runs work on the store's CUDA stream (nothing on the CPU)."""
        if self._stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._stream)

    def _fetch(
        self, flat: torch.Tensor, packed: bool = False
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Resolve one batch of validated ids; returns ([n, dim] on the device, ready-event or None)."""
        with self._file_calls.entered(), self._on_store_stream():
            inside = None
            if self.zero_out_of_range:
                inside = (flat >= 0) & (flat < self.rows)
                if bool(inside.all()):
                    inside = None
                else:
                    flat = flat[inside]
            out = self._resolve(flat)
            if inside is not None:  # all-zero rows where the ids fall outside the table
                full = torch.zeros(
                    (inside.numel(), self.row_width), dtype=out.dtype, device=out.device
                )
                full[inside] = out
                out = full
            if self.quantization is not None and not packed:
                out = dequantize_rows(out, self.quantization)
            event = None
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
        return out, event

    def _resolve(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows as stored for in-range ids, through the tiers (on the current stream)."""
        with self._lock:
            plan = self.caches.plan(flat)
            write_seq = self._write_seq
            if self.hot.capacity:
                out = self.hot_pool.gather(plan.hot_slots.clamp(min=0))
            else:
                out = torch.empty(
                    (flat.numel(), self.row_width), dtype=self.row_dtype, device=self.device
                )
            if not plan.all_hit:
                staged = torch.empty(
                    (plan.unique_ids.numel(), self.row_width),
                    dtype=self.row_dtype,
                    pin_memory=self._pin,
                )
                if not plan.cold_idx.numel():  # every miss hit warm: one gather into place
                    self.warm_pool.gather(plan.warm_slots, out=staged)
                else:
                    warm_hit = nonzero(plan.warm_slots >= 0)
                    if warm_hit.numel():
                        warm_slots = torch.index_select(plan.warm_slots, 0, warm_hit)
                        staged.index_copy_(0, warm_hit, self.warm_pool.gather(warm_slots))
        if not plan.all_hit:
            if plan.cold_idx.numel():  # outside the lock: other lookups go on meanwhile
                rows = self.cold.read_rows(plan.cold_ids.numpy())
                staged.index_copy_(0, plan.cold_idx, rows)
            if self._writes is None:  # (a first write landing before the lock is seen there)
                device_rows = staged.to(self.device, non_blocking=True)
            lookahead = self._prefetcher.queued_ids() if self.config.prefetch.lookahead else None
            if lookahead is not None:
                lookahead = self._in_table(lookahead)
            with self._lock:
                if self._writes is not None:  # written rows over base rows, under writes' lock
                    if self._write_seq != write_seq:  # a write landed since the rows were staged
                        self._newest_rows(plan.unique_ids, staged)
                    elif plan.cold_idx.numel():
                        self._writes.overlay(plan.cold_ids, staged, plan.cold_idx)
                    device_rows = staged.to(self.device, non_blocking=True)
                # each tier's rows written before the next admits: one whose admission raises
                # (out of memory spilling dirty victims) leaves no slot without its row
                warm_src, warm_slots = self.caches.admit_warm(plan, lookahead)
                _write_or_drop(self.warm, self.warm_pool, warm_slots, staged, warm_src)
                hot_src, hot_slots = self.caches.admit_hot(plan, lookahead)
                _write_or_drop(self.hot, self.hot_pool, hot_slots, device_rows, hot_src)
            out.index_copy_(0, plan.miss_pos, device_rows.index_select(0, plan.inverse))
        if self._repin_wanted is not None and self.caches.repin_worth_waking():
            self._repin_wanted.set()  # after this batch's admissions, where replay re-pins
        return out

    def _start_restart_threads(
        self, saved: RestartState | None, save_every_s: float | None
    ) -> None:
        """Read the saved tiers back in the background; save periodically if asked."""
        if saved is not None:
            self._threads.append(
                threading.Thread(target=self._restore, args=(saved,), name="restore", daemon=True)
            )
        if save_every_s is not None:
            self._threads.append(
                threading.Thread(
                    target=self._save_periodically, args=(save_every_s,), name="save", daemon=True
                )
            )
        for thread in self._threads:
            thread.start()
        waits_for = self.config.tiers.restart.open_waits_for
        if saved is not None and waits_for == "hot":
            self._hot_restored.wait()
        elif saved is not None and waits_for == "all":
            self.wait_restored()

    def _restore_profiles(self, path: Path, saved: RestartState) -> None:
        """Load each re-pinning tier's saved online profile now; one saved for another tier size,
        episode window or offline profile, or one that does not load, is dropped (with its pins),
        with a warning naming the file and the mismatch."""
        for cache in self.caches.online:
            if cache.name not in saved.profiles:
                saved.pinned.pop(cache.name, None)
                continue
            meta, sketch = saved.profiles[cache.name]
            why = cache.online.mismatch(meta)
            if why is None and sketch.shape != tuple(cache.online.profile.sketch.shape):
                why = f"sketch shape {sketch.shape}"
            if why is not None:
                why = f"was saved for another tier: {why}"
            else:
                fresh = cache.online.state(), cache.online.profile.sketch.cpu().numpy().copy()
                try:
                    cache.online.load_state(meta, sketch)
                    continue
                except (KeyError, TypeError, ValueError, OverflowError) as exc:
                    cache.online.load_state(*fresh)  # what it had: nothing counted yet
                    why = (
                        "was saved for this tier, but its counters do not load "
                        f"({type(exc).__name__}: {exc})"
                    )
            saved.pinned.pop(cache.name, None)
            restart_warning(
                path, f"the {cache.name} tier's online profile {why}; it starts counting afresh"
            )

    def _restore(self, saved: RestartState) -> None:
        """Preload the saved rows, chunk by chunk, into free slots (lookups go on meanwhile):
        per tier, hot first (its rows serve the most lookups), its saved pins, then its rows.

        Each tier's saved rows that fit go in least valuable step first, so the tier ranks them as
        it did when saved (LRU: the most recent last), above the rows lookups admitted before they
        landed. Where the policy ranks restored rows by their saved age (``restores_order``: LRU),
        steps are large (fast reads) and each row lands with its saved rank; otherwise each step
        is one batch of the policy's clock, its rows inserted least valuable first. Rows lookups need meanwhile are admitted by those
        lookups as usual (and skipped here)."""
        start = time.perf_counter()
        # the lock is taken with host_inputs() here: the saved rows are on the host, and a wait
        # for this thread's stream (the default one, where a model queues its forward passes)
        # would hold every prefetch copy queued after it
        try:
            for cache, pool in ((self.hot, self.hot_pool), (self.warm, self.warm_pool)):
                if cache.online is not None and cache.name in saved.pinned:
                    self._restore_pins(cache, pool, torch.from_numpy(saved.pinned[cache.name]))
                    if self._stop.is_set():
                        return
                    with self._lock.host_inputs():
                        self._unrestored.pinned.pop(cache.name, None)
                ids = torch.from_numpy(saved.held.get(cache.name, np.zeros(0, np.int64)))
                # the saved pins (and rows lookups admitted) are in already
                with self._lock.host_inputs():
                    held = (cache.probe(ids.to(cache.device)) >= 0).cpu()
                    ids = ids[~held][: cache.capacity - cache.occupancy]
                ranked = cache.eviction.restores_order
                for at, end in self._restore_steps(ids.numel(), ranked=ranked):
                    if self._stop.is_set():
                        return
                    end = self._restorable_end(cache, ids, end)
                    if end <= at:
                        continue
                    ages = torch.arange(at, end) if ranked else None
                    if not self._restore_chunk(cache, pool, ids[at:end], ages=ages):
                        break
                with self._lock.host_inputs():  # this tier is done: saves list what it holds
                    self._unrestored.held.pop(cache.name, None)
                    if cache is self.warm:  # rows it holds again that hot pins: left to hot
                        self.caches.leave_hot_pins_to_hot()
                if cache is self.hot:
                    self._hot_restored.set()  # what open waits for with open_waits_for: hot
        except StoreClosedError:  # closing: what is left stays in the saved list
            return
        except Exception as exc:  # noqa: BLE001 (a failed read, no memory: lookups go on, cold;
            # a thread dead of it left a tier waiting for its saved pins, never re-pinning again)
            with self._lock.host_inputs():  # saves list what the tiers hold from now on
                self._unrestored = RestartState({})
                self.caches.leave_hot_pins_to_hot()  # those warm got back before it stopped
            warnings.warn(
                f"warm restart: reading the saved rows back from {self.cold.path} failed "
                f"({exc}); the rest start cold (serving is unaffected)",
                RestartWarning,
                stacklevel=1,
            )
        finally:
            self.restore_seconds = time.perf_counter() - start
            self._hot_restored.set()

    def _restorable_end(self, cache: Any, ids: torch.Tensor, end: int) -> int:
        """How much of the saved ``ids[:end]`` (most valuable first) is left to read once
        lookups took free slots meanwhile: the rows not held yet are cut to the free slots from
        the least valuable end (rows a lookup admitted from the list take no slot of their own)."""
        with self._lock.host_inputs():
            room = cache.capacity - cache.occupancy
            if room >= end:  # all of it fits: no probe
                return end
            # read on the host under the lock: made on the store's stream, which this thread's
            # own stream does not wait for
            missing = torch.nonzero(cache.probe(ids[:end].to(cache.device)) < 0).squeeze(1).cpu()
        if missing.numel() <= room:
            return end
        return int(missing[room - 1]) + 1 if room > 0 else 0  # just past the room-th missing row

    def _restore_pins(self, cache: Any, pool: SlotPool, pins: torch.Tensor) -> None:
        """The saved pinned rows replace the tier's pins: those it holds are pinned at once, the
        others read back (pinned) into free slots, chunk by chunk."""
        with self._lock.host_inputs():
            cache.pin_resident(pins, only=True)
            missing = pins[(cache.probe(pins.to(cache.device)) < 0).cpu()]
        for at, end in self._restore_steps(missing.numel(), ranked=True):
            if self._stop.is_set() or not self._restore_chunk(
                cache, pool, missing[at:end], pin=True
            ):
                break

    def _restore_steps(self, n: int, *, ranked: bool) -> list[tuple[int, int]]:
        """The [start, end) steps a warm restart reads ``n`` saved rows in, in reading order, from
        the least valuable (see ``RESTORE_CHUNK_BYTES``; larger where ``ranked``)."""
        step = RESTORE_ORDERED_ROWS
        if ranked:
            step = max(1, min(RESTORE_CHUNK_ROWS, RESTORE_CHUNK_BYTES // self.cold.row_bytes))
        return [(a, min(n, a + step)) for a in reversed(range(0, n, step))]

    def _repin_loop(self) -> None:
        """Count the full windows lookups queued, then plan each due tier's re-pin off the lock
        (estimates over its resident rows, a sort) and apply it (pin flags only) under the lock;
        until close."""
        while True:
            self._repin_wanted.wait()
            if self._stop.is_set():
                return
            self._repin_wanted.clear()
            for cache in self.caches.online:
                due = False  # the interval was over when this pass began: its re-pin was tried
                counting = False  # in count_pending: a failure there leaves its updates suspect
                try:
                    with self._on_store_stream():
                        # the tier copied off the lock, then the updates queued so far marked
                        # under it: every row the copy shows has its admission counted, so no
                        # slot is planned with the count of the row it held before (a count
                        # newer than the copy is caught: apply checks each slot's row)
                        queued = None
                        due = cache.online.due and not self._restoring_pins(cache)
                        if due:
                            snapshot = (cache.row_of_slot.clone(), cache.pin_flags().clone())
                            with self._lock.host_inputs():
                                queued = cache.online.queued_total
                        counting = True
                        cache.online.count_pending(queued)
                        counting = False
                        if not due:
                            continue
                        moves = cache.online.plan(*snapshot)
                        with self._lock:  # apply checks each slot still holds the planned row
                            if self._restoring_pins(cache):  # planned before the restore began
                                continue
                            self.caches.apply_repin(cache, moves)
                except Exception as exc:  # noqa: BLE001 (serving goes on with the pins it has;
                    # a thread that died here left its tier's updates queued and never re-pinned)
                    warnings.warn(
                        f"online re-pin of the {cache.name} tier failed ({exc}); its pins stay",
                        RuntimeWarning,
                        stacklevel=1,
                    )
                    try:
                        self._after_a_failed_repin(cache, due, drop=counting)
                    except Exception as again:  # noqa: BLE001 (a thread dead of it left lookups
                        # queueing updates for it without end)
                        warnings.warn(
                            f"online re-pin of the {cache.name} tier: dropping its updates after "
                            f"that failed too ({type(again).__name__}: {again}); rows admitted "
                            "since the last count may keep their slots' old counts",
                            RuntimeWarning,
                            stacklevel=1,
                        )

    def _after_a_failed_repin(self, cache: Any, due: bool, *, drop: bool) -> None:
        """After a failed count (``drop``), drop ``cache``'s queued updates (rows admitted
        meanwhile count from 0; a failed plan or apply leaves them to the next count), and close
        the interval the failure was in when its re-pin was ``due``: the next one tries again."""
        if drop:  # off the lock (a save may hold the counting), on the stream it counts on
            with self._on_store_stream():
                cache.online.drop_pending()
        if due:  # close the interval it failed in (not one lookups ended while the drop waited,
            # whose re-pin was never tried)
            with self._lock.host_inputs():
                cache.online.skip()  # (no re-pin counted)

    def _restoring_pins(self, cache: Any) -> bool:
        """The warm restart has not brought ``cache``'s saved pins back yet: they replace its
        pins, so a re-pin waits for them (pins it added meanwhile would stay beside them, up to
        every slot of the tier pinned: one that admits nothing, so never re-pins again)."""
        return cache.name in self._unrestored.pinned

    def _restore_chunk(
        self,
        cache: Any,
        pool: SlotPool,
        ids: torch.Tensor,
        *,
        pin: bool = False,
        ages: torch.Tensor | None = None,
    ) -> bool:
        """Preload ``ids`` (most valuable first; ``ages``: their saved ranks, or None) into
        ``cache``'s free slots with their current rows, the most valuable where they do not all
        fit; False once the tier is full. Rows the tier holds by then (a lookup admitted them) are
        skipped. The cold read runs outside the lock (sorted by id: each page read once); under
        it, written rows and copies another tier holds (maybe dirty) replace them, as a lookup's
        admission does; the delta's rows are read with the cold ones, off the lock (a delta of
        many rows held every lookup for seconds), and again under it only if a commit came
        between."""
        if self._closed:
            return False
        sorted_ids, order = torch.sort(ids)  # order: each id's position in the saved order
        writes, delta_ids = self._writes, None
        with self._file_calls.entered():  # a close waits for the reads (or leaves it the files)
            rows = self.cold.read_rows(sorted_ids.numpy())
            if writes is not None:
                delta_ids = writes.delta_ids  # a commit of rows replaces it
                every = torch.arange(sorted_ids.numel())
                writes.overlay_committed(sorted_ids, rows, every, delta_ids)
        with self._lock.host_inputs():
            if pin:  # saved pins a lookup admitted meanwhile: preload skips them, so pin them here
                cache.pin_resident(sorted_ids, only=False)
            room = cache.capacity - cache.occupancy
            if self._closed or room <= 0:
                return False
            if room < sorted_ids.numel():  # lookups took free slots meanwhile: the most valuable
                # of the rows not held yet (a lookup's admission of a saved row takes no room)
                missing = nonzero(cache.probe(sorted_ids.to(cache.device)) < 0).cpu()
                best = missing[torch.argsort(order[missing])[:room]]
                pick = torch.sort(best).values
                sorted_ids, order, rows = sorted_ids[pick], order[pick], rows[pick]
            if self._writes is not None:
                read = self._writes is writes and writes.delta_ids is delta_ids
                self._newest_rows(sorted_ids, rows, committed=not read)
            if ages is None:  # one batch, its rows queued as they go in: least valuable first
                cache.begin_batch()
                back = torch.argsort(order, descending=True)
                sorted_ids, order, rows = sorted_ids[back], order[back], rows[back]
            pos, slots = cache.preload(
                sorted_ids, pin=pin, ages=None if ages is None else ages[order]
            )
            with self._on_store_stream():  # the stream lookups gather on: they see these rows
                _write_or_drop(cache, pool, slots, rows, pos.cpu())
            return cache.occupancy < cache.capacity

    def _newest_rows(
        self, ids: torch.Tensor, rows: torch.Tensor, *, committed: bool = True
    ) -> None:
        """Replace ``rows`` (of sorted unique CPU ``ids``, read earlier) by each row's newest
        version: the written one (committed or pending), then the copy a tier holds, which may
        be dirty (newer still). Under the lock, with writes: a cold read or a staged copy that a
        write overtook must not reach a tier. ``committed=False``: the delta's rows are in
        ``rows`` already (read since the last commit)."""
        every = torch.arange(ids.numel())
        if committed:
            self._writes.overlay(ids, rows, every)
        else:
            self._writes.overlay_pending(ids, rows, every)
        for cache, pool in ((self.warm, self.warm_pool), (self.hot, self.hot_pool)):
            if cache.capacity == 0:
                continue
            slots = cache.probe(ids.to(cache.device))
            held = torch.nonzero(slots >= 0).squeeze(1)
            if held.numel():
                rows[held.cpu()] = pool.gather(slots[held]).cpu()

    def _save_periodically(self, every_s: float) -> None:
        """Save the tiers every ``every_s`` seconds until close (a warning when a save fails)."""
        while not self._stop.wait(every_s):
            try:
                self.save_restart()
            except StoreClosedError:  # a close timed out meanwhile (no save of its own)
                return
            except Exception as exc:  # noqa: BLE001 (no memory for a copy too: a thread dead of
                # it saved no more, without a word)
                warnings.warn(
                    f"warm restart: periodic save failed ({type(exc).__name__}: {exc})",
                    RestartWarning,
                    stacklevel=2,
                )

    def _read_cold(self, ids: torch.Tensor) -> torch.Tensor:
        """Current rows of sorted unique ``ids`` from cold: base, then the delta and pending."""
        rows = self.cold.read_rows(ids.numpy())
        if self._writes is not None:
            self._writes.overlay(ids, rows, torch.arange(ids.numel()))
        return rows

    def _open_current_version(self, config: StoreConfig) -> tuple[ColdTable, int, int]:
        """The table's current version (see ``delta.table_versions``), its generation, and the
        shared lock that keeps it from removal, taken before any of its files is opened (a
        version removed after the pointer was read is then missing whole, and read again)."""
        tiers = config.tiers
        if Path(config.table.path).is_dir():
            raise ConfigError(
                f"table.path: {config.table.path} is a directory; expected a table file "
                "(NAME.npy, made by `tiered-store init`)"
            )

        def open_cold(path: Path) -> ColdTable:
            return ColdTable(
                path,
                io=tiers.cold.io,
                threads=tiers.cold.threads,
                queue_depth=tiers.cold.queue_depth,
            )

        try:
            return open_current_version(config.table.path, open_cold)
        except FileNotFoundError as exc:
            path, generation = current_version(config.table.path)
            if Path(path).exists():  # a file missing beside it, its manifest say
                raise ConfigError(f"table.path: {path}: {exc.strerror}") from None
            if generation:  # compaction's current version gone from beside its pointer
                raise ConfigError(f"table.path: {exc.strerror}") from None
            raise ConfigError(
                f"table.path: {path} does not exist; expected a table made by `tiered-store init`"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigError(
                f"table.path: {config.table.path} is a loop of symbolic links; expected a table "
                "file (NAME.npy, made by `tiered-store init`)"
            ) from None

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has closed this store."""
        return self._closed

    @property
    def calls_left(self) -> bool:
        """Whether calls a ``close(wait_s=)`` gave up waiting for are still under way (the last
        of them closes the files)."""
        return self._left_calls and self._file_calls.then_pending()

    def is_stale(self) -> bool:
        """Whether the table on disk moved on since this store opened (a compaction made a new
        version, the file was made anew, or a writer elsewhere committed): reopen to see it. A
        writing store never is by commits."""
        if self._moved_on() is not None:
            return True
        return self._writer_lock is None and self._committed_elsewhere()

    def _moved_on(self) -> str | None:
        """How the table's path moved on from the version this store opened (None: it did not):
        compacted into a newer version, or made anew over the path."""
        if current_version(self.config.table.path)[1] != self.generation:
            return "was compacted into a newer version"
        return "was made anew" if self.cold.replaced() else None

    def _committed_elsewhere(self) -> bool:
        """Whether another process committed to this version's delta since this store's view
        (by step, round and redo: a shard's redone step is committed again at its step)."""
        if self._writes is None:  # opened without a delta: has one been committed to since?
            mark = committed_mark(self.cold.path, self.row_bytes)
            return mark not in (None, (self._base_step, None, None))
        return self._writes.delta.latest_mark() != self._writes.delta.mark

    def _become_writer(self, lock: int | None = None) -> None:
        """Take the table's single-writer lock (once; ``lock``: the one the caller took), then open
        or create the delta and read its newest commit from now on."""
        if self._writer_lock is None:
            self._writer_lock = take_writer_lock(self.config.table.path) if lock is None else lock
            why = self._moved_on()  # made anew or removed: its delta went with the old file
            if why is None and not self.cold.path.exists():
                why = "was removed"
            if why is None and self._committed_elsewhere():  # its cached rows are older
                why = "was written by another process"
            try:
                if why is not None:
                    raise TierIOError(
                        errno.ESTALE,
                        f"write: {self.cold.path.name} {why} since this store opened; reopen the "
                        "store to write",
                    )
                refuse_a_lost_pointer(self.config.table.path)  # else commits go to an old version
            except BaseException:
                release(self._writer_lock)
                self._writer_lock = None
                raise
            if self._writes is not None:  # was a reader: read the newest commit from now on
                self._writes.delta.unpin()
        if self._writes is None:
            self._open_writes(create=True)

    def _open_writes(self, create: bool, *, pinned: bool = False) -> None:
        """Open (or create) the version's LMDB delta and hook write-back into the tiers;
        ``pinned``: a reader's view of one commit, pinned before the write-back reads which rows
        the delta holds (pinned after, a commit landing between showed its step over the rows
        of the commit before: a reader saw step 162 with the rows of 160)."""
        delta = RowDelta(
            delta_path(self.cold.path),
            self.row_bytes,
            create=create,
            table_rows=self.rows,
            initial_step=self._base_step,
        )
        if pinned:
            delta.pin()
        self._writes = WriteBack(
            delta,
            [(self.warm, self.warm_pool), (self.hot, self.hot_pool)],
            self.row_width,
            self.row_dtype,
        )

    def _collect(self, ids: Any, handle: PrefetchHandle, packed: bool) -> tuple[torch.Tensor, Any]:
        """Check a handle belongs to ``ids`` and to this call's ``packed``, and wait for it."""
        if not isinstance(handle, PrefetchHandle):
            raise PrefetchHandleError(
                f"lookup: handle is {type(handle).__name__}; expected a PrefetchHandle"
            )
        if packed != handle.packed:
            raise PrefetchHandleError(
                f"lookup: packed={packed} but the handle was prefetched with "
                f"packed={handle.packed}; pass the same"
            )
        if ids is not handle.ids or not ids_on_gpu(ids):  # a CPU buffer may have been refilled
            if ids_on_gpu(ids):
                flat, shape = self._validate(ids)
            else:  # equal to the handle's checked ids, or refused: no range check of its own
                tensor = as_id_tensor(ids)
                flat, shape = tensor.reshape(-1), tuple(tensor.shape)
            with self._on_store_stream():  # where _validate queued the copy of CUDA ids
                handle.check_ids(flat, shape)  # CPU ids: with the handle's host snapshot
        out, event = self._prefetcher.collect(handle, lambda fetched: self._fresh(handle, fetched))
        return out.view(*handle.shape, out.shape[-1]), event

    def _fresh(self, handle: PrefetchHandle, fetched: tuple) -> tuple:
        """A handle's fetched rows, or fetched again when written since prefetch(), so that the
        writes are seen."""
        if handle.write_seq == self._write_seq:
            return fetched
        return self._fetch(handle.flat, handle.packed)

    def _validate(self, ids: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Integer ids in [0, rows) -> flat int64 on the compute device, and the original shape."""
        tensor = as_id_tensor(ids)
        return self._to_device(self._checked_flat(tensor)), tuple(tensor.shape)

    def _to_device(self, flat: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """Checked flat ids -> int64 on the compute device (``given``: the caller's ids, which
        the result must not share memory with: they may be refilled)."""
        if self._stream is None:
            flat = flat.to(device=self.device, dtype=torch.int64)
            return flat if given is None else snapshot_of(flat, given)
        # ids on the GPU may come from the caller's stream (e.g. hashed there): order the store's
        # stream after it. Ids on the CPU wait for nothing queued, so a prefetch overlaps the
        # caller's queued compute. Either way they are copied on the store's stream, where the
        # fetch reads them.
        if flat.is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            # the store's stream reads the caller's memory: keep the allocator from handing it
            # out again before that (the caller may free its ids as soon as this returns)
            if flat.device == self._stream.device:
                flat.record_stream(self._stream)
        with torch.cuda.stream(self._stream):
            flat = flat.to(device=self.device, dtype=torch.int64, non_blocking=True)
            if given is not None:
                flat = snapshot_of(flat, given)
        return flat

    def _host_ids(self, ids: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Ids every one inside the table -> flat int64 on the CPU, and the original shape."""
        # used on the host: copied there on the caller's stream (which made any CUDA ids), never
        # through the store's, whose copy would land after queued fetches and unseen by the host
        tensor = as_id_tensor(ids)
        flat = self._checked_flat(tensor, inside=True)
        return flat.to("cpu", torch.int64), tuple(tensor.shape)

    def _checked_flat(self, tensor: torch.Tensor, *, inside: bool = False) -> torch.Tensor:
        """``tensor`` flattened, where it is, after checking its ids are in [0, rows) (unless
        out-of-range ids read as zeros and ``inside`` is not asked for)."""
        flat = tensor.reshape(-1)
        if flat.numel() and (inside or not self.zero_out_of_range):
            lo, hi = torch.aminmax(flat)
            lo, hi = torch.stack([lo, hi]).tolist() if flat.is_cuda else (int(lo), int(hi))
            if lo < 0 or hi >= self.rows:
                bad_pos = int(torch.nonzero((flat < 0) | (flat >= self.rows))[0])
                raise RowIdError(
                    f"ids: value {int(flat[bad_pos])} at flat position {bad_pos} is out of range; "
                    f"expected 0 <= id < {self.rows:,} (the table's rows)"
                )
        return flat

    def _in_table(self, flat: torch.Tensor) -> torch.Tensor:
        """Checked ids without those outside the table (read as zeros: no row to keep)."""
        if self.zero_out_of_range:
            return flat[(flat >= 0) & (flat < self.rows)]
        return flat

    def _check_open(self) -> None:
        """Raise StoreClosedError once the store is closed."""
        if self._closed:
            raise StoreClosedError("store is closed; open a new TieredStore")

    def _check_table_matches(self, config: StoreConfig) -> None:
        """The YAML's optional dim/dtype must agree with the table's manifest."""
        want = config.table
        have_dtype = str(self.cold.dtype).removeprefix("torch.")
        if want.dim is not None and want.dim != self.cold.dim:
            raise ConfigError(
                f"table.dim: config says {want.dim}, but {self.cold.path} has dim {self.cold.dim}"
            )
        if want.dtype is not None and want.dtype != have_dtype:
            raise ConfigError(
                f"table.dtype: config says {want.dtype!r}, but {self.cold.path} holds {have_dtype!r}"
            )


def _write_or_drop(
    cache: RowCache, pool: SlotPool, slots: torch.Tensor, rows: torch.Tensor, src: torch.Tensor
) -> None:
    """Write ``rows[src]`` into the ``slots`` ``cache`` just gave them; if that raises (out of
    memory), the slots are emptied (``RowCache.drop``): none keeps a row id without its row."""
    try:
        pool.write(slots, rows.index_select(0, src))
    except BaseException:
        cache.drop(slots)
        raise


UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)  # torch lacks min/max for these on CPU


def as_id_tensor(ids: Any) -> torch.Tensor:
    """Any integer tensor/array/list -> torch tensor (no copy where possible); rejects floats and bools."""
    if isinstance(ids, torch.Tensor):
        tensor = ids
        problem = tensor_without_values(tensor)
        if problem is not None:
            raise RowIdError(f"ids: tensor {describe_tensor(tensor)} {problem}")
    elif isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise RowIdError(f"ids: dtype {ids.dtype}; expected an integer array")
        return torch.from_numpy(array_for_torch(_int64_array(ids)))
    elif (array := _integer_list(ids)) is not None:
        return torch.from_numpy(_int64_array(array))  # NumPy's new array: torch can share it
    else:
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            array = _ids_numpy_reads(ids)
            if array is not None:
                return as_id_tensor(array)  # the ndarray branch checks uint64's range
            raise RowIdError(
                f"ids: {type(ids).__name__} cannot be read as integers ({exc})"
            ) from None
        if tensor.numel() == 0:  # an empty list reads as float32: no ids
            tensor = tensor.to(torch.int64)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise RowIdError(f"ids: dtype {tensor.dtype}; expected an integer tensor (row ids)")
    if isinstance(ids, list | tuple):  # torch read it (one-element tensors as numbers): True as 1
        _refuse_bools(ids)
    if tensor.dtype in UNSIGNED:
        if tensor.dtype == torch.uint64:  # 2**63 and more read as negative int64: refuse them
            wide = tensor.view(torch.int64) < 0
            if bool(wide.any()):
                value = int(np.asarray(tensor.cpu()[wide.cpu()][:1])[0])
                raise RowIdError(f"ids: value {value} does not fit int64; expected valid row ids")
        tensor = tensor.to(torch.int64)
    return tensor


def _int64_array(ids: np.ndarray) -> np.ndarray:
    """An integer array as int64 (no copy where possible); uint64s past int64 refused."""
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:
        raise RowIdError(f"ids: value {ids.max()} does not fit int64; expected valid row ids")
    return ids.astype(np.int64, copy=False)


def _integer_list(ids: Any) -> np.ndarray | None:
    """A list or tuple of integers as NumPy reads it (several times faster than torch does), its
    leaves checked for bools, which NumPy and torch read as 1 or 0; None for anything else."""
    if not isinstance(ids, list | tuple):
        return None
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError, RuntimeError):  # ragged, CUDA tensors inside: torch's to name
        return None
    if array.dtype.kind not in "iu":
        return None
    _refuse_bools(ids)
    return array


def _refuse_bools(ids: Any) -> None:
    """Refuse a bool among the leaves of ``ids`` (NumPy and torch read one as 1 or 0)."""
    if (found := bool_among(ids)) is not None:
        raise RowIdError(f"ids: {found[1]!r} is a bool; expected integer row ids")


def _ids_numpy_reads(ids: Any) -> np.ndarray | None:
    """Ids torch refuses (NumPy uint64 scalars or lists of them) as NumPy reads them, or None."""
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: torch's
        return None
    if array.dtype.kind not in "iufO":
        return None
    given = np.asarray(ids, dtype=object)
    _refuse_bools(given)  # as given: NumPy read True as 1
    if array.dtype.kind in "iu":
        return array
    values = []  # uint64 beside a signed int: NumPy reads float64; an int past int64: object
    for value in given.ravel().tolist():
        try:
            values.append(operator.index(value))
        except TypeError:
            raise RowIdError(
                f"ids: {type(ids).__name__} cannot be read as integers ({reprlib.repr(value)} is not an "
                "integer)"
            ) from None
        except RuntimeError as exc:  # torch's, e.g. for a uint64 tensor past int64
            raise RowIdError(
                f"ids: {type(ids).__name__} cannot be read as integers ({reprlib.repr(value)}: {exc})"
            ) from None
    wide = next((v for v in values if not -(2**63) <= v < 2**63), None)
    if wide is not None:
        raise RowIdError(f"ids: value {wide} does not fit int64; expected valid row ids")
    return np.array(values, dtype=np.int64).reshape(given.shape)


def _commit_step(step: Any, last: int) -> int:
    """A commit's ``step``, checked: an integer that fits int64, below ``GREW_STEP`` (which
    marks a map grown elsewhere), no lower than ``last``."""
    try:
        value = None if isinstance(step, bool) else operator.index(step)  # True is not step 1
    except TypeError:
        value = None
    if value is None:
        raise ConfigError(f"commit: step {step!r}; expected an integer step")
    if not -(2**63) <= value < GREW_STEP:
        raise ConfigError(
            f"commit: step {value} is outside the steps a commit may have; expected an integer "
            f"step from -2**63 to {GREW_STEP - 1} (2**63 - 2: {GREW_STEP} marks a map grown in "
            "another process)"
        )
    if value < last:
        raise ConfigError(
            f"commit: step {value} is lower than the last committed step {last}; expected "
            f"{last} or more (steps only move forward)"
        )
    return value


def as_rows(rows: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rows for a write -> ``[n, width]`` CPU tensor of the table's dtype; checks shape, finiteness."""
    try:
        tensor = torch.as_tensor(rows)
        if tensor.is_floating_point() and not isinstance(rows, (torch.Tensor, np.ndarray)):
            tensor = torch.as_tensor(rows, dtype=torch.float64)  # Python floats: not float32's
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RowDataError(
            f"rows: {type(rows).__name__} cannot be read as numbers ({exc})"
        ) from None
    problem = tensor_without_values(tensor)
    if problem is not None:
        raise RowDataError(f"rows: tensor {describe_tensor(tensor)} {problem}")
    if tuple(tensor.shape) != shape:
        raise RowDataError(
            f"rows: shape {tuple(tensor.shape)}; expected {shape} (the ids' shape + the row width)"
        )
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
        raise RowDataError(f"rows: dtype {tensor.dtype}; expected floating-point rows")
    given = tensor.detach().reshape(-1, shape[-1])
    tensor = given.to("cpu", dtype)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad, col = (int(i) for i in torch.nonzero(~torch.isfinite(tensor))[0])
        value = given[bad, col].item()
        if math.isfinite(value):  # finite as given, not in the table's dtype
            raise RowDataError(
                f"rows: row {bad} holds {value:g}, which overflows "
                f"{str(dtype).removeprefix('torch.')} (the table's dtype); expected values in "
                f"its range (|x| <= {torch.finfo(dtype).max:g})"
            )
        raise RowDataError(
            f"rows: row {bad} holds a non-finite value ({value}); expected finite rows"
        )
    if not given.is_floating_point() and given.numel():  # integers the dtype rounds: refused
        inexact = tensor.to(given.dtype) != given.cpu()
        if bool(inexact.any()):
            bad, col = (int(i) for i in torch.nonzero(inexact)[0])
            raise RowDataError(
                f"rows: row {bad} holds the integer {int(given[bad, col])}, which "
                f"{str(dtype).removeprefix('torch.')} (the table's dtype) cannot hold exactly "
                f"(it would be stored as {tensor[bad, col].item():g}); expected values it holds, "
                "or float rows"
            )
    return tensor


def compute_device(name: str, key: str = "tiers.hot.device") -> torch.device:
    """The device ``name`` (setting ``key``), checked to exist here (``cuda`` -> ``cuda:N``)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {name!r} but CUDA is not available here; expected 'cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            indices = "'cuda:0'" if count == 1 else f"'cuda:0'..'cuda:{count - 1}'"
            raise ConfigError(
                f"{key}: {name!r} but only {count} CUDA device(s) exist; expected 'cpu', 'cuda' "
                f"or {indices}"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_host_memory(
    warm_rows: int,
    hot_rows: int,
    row_bytes: int,
    device: torch.device,
    available: int | None = None,
) -> None:
    """Refuse tiers that cannot fit in the RAM ``available`` now (default: ``MemAvailable``):
    the warm tier's slots, and the hot tier's too when it lives on the CPU."""
    available = available_host_memory() if available is None else available
    on_cpu = device.type == "cpu"
    nbytes = (warm_rows + (hot_rows if on_cpu else 0)) * row_bytes
    if available is not None and nbytes > available:
        key = (
            "tiers.warm.capacity + tiers.hot.capacity (hot on cpu)"
            if on_cpu and hot_rows
            else ("tiers.warm.capacity")
        )
        raise ConfigError(
            f"{key}: needs {format_bytes(nbytes)} of host RAM but only {format_bytes(available)} is "
            "available; expected a smaller capacity"
        )


def _rows_to_save(
    row_of_slot: torch.Tensor,
    priority: Callable[[], torch.Tensor] | None,
    saved: np.ndarray | None,
    capacity: int,
) -> np.ndarray:
    """The rows a tier holds (``RowCache.held``), most valuable first; while the restore has not
    done the tier, those lookups admitted, then the saved rows in their saved order (read back or
    not): a store closed before its restore finished keeps what it was given."""
    held = most_valuable_first(row_of_slot, priority).cpu().numpy()
    if saved is None:
        return held
    admitted = held[~np.isin(held, saved)]
    return np.concatenate([admitted, saved])[:capacity]

"""``ShardedStore``: ``TieredStore``'s interface over a table sharded across a process group.

Every rank holds its shard as its own ``TieredStore`` (hot/warm/cold, its own shard table file).
A lookup is a collective every rank joins (with its own ids, possibly none): each rank
deduplicates its ids (``torch.unique``; the unique ids come out sorted, hence grouped by owning
rank), exchanges per-rank counts, then the ids, then the rows with ``all_to_all_single`` and
uneven splits, and restores its ids' order with the inverse of the dedup. Rows travel as stored
(packed fp8 rows stay packed) and are dequantised by the rank that asked.

Lookups and prefetches run on one background thread per store, in call order, so a prefetch's
exchange overlaps the caller's compute and every rank issues its collectives in the same order.
The caller waits at most ``sharding.timeout_s``; a failed or silent exchange then raises
``RankFailureError`` naming the rank that died, hung or stopped calling (see :mod:`.liveness`).
A shard that cannot serve its rows of a lookup (a failed read, a page failing its checksum) fails
that lookup only: the ranks tell each other in one small all-reduce before the rows travel, the
failed rank raises its own error and the others ``ShardReadError`` naming it, and the group stays
in step for the next lookup.

Writes route the same way: ``write`` sends each row to the rank that owns it (which writes it to
its shard's ``TieredStore``), ``commit`` commits every shard with one step, and ``update_rows``
(training: ``TrainableTable.step``) sends row gradients to their owners, which sum them and apply
the optimizer where the rows live. Each ends with every rank learning every rank's outcome, so a
shard's failure raises on every rank, naming it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import logging
import numbers
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import prefetch as prefetch_module
from ..config import ShardingConfig, StoreConfig, naming_file
from ..delta.row_optimizers import first_non_finite_row, stored_row_fault
from ..delta.table_versions import pointer_path, release, take_writer_lock
from ..delta.write_back import merge_last_wins
from ..errors import (
    CommitError,
    ConfigError,
    RankFailureError,
    RowDataError,
    RowIdError,
    ShardMismatchError,
    ShardReadError,
    StepMismatchError,
    StoreClosedError,
    TableFormatError,
    TieredStoreError,
    TierIOError,
    TornCommitWarning,
    UpdateRefusedError,
    error_text,
    warn_at_caller,
)
from ..id_ops import ids_on_gpu, snapshot_of, unique_inverse_counts
from ..latency import LatencyHistogram
from ..page_checksums import ChecksumError
from ..prefetch import (
    CANCELLED,
    CONSUMED,
    OTHER_STORE,
    PrefetchHandle,
    PrefetchHandleError,
    take_once,
)
from ..quantization import dequantize_rows
from ..store import TieredStore, as_id_tensor, as_rows, compute_device, no_seconds, seconds_left
from .collective_thread import CollectiveThread
from .liveness import Heartbeat, ranks_named, shared_connection
from .shard_files import ShardInfo, mixed_runs, read_shard, shard_path
from .shard_map import ShardMap

__all__ = ["ShardedStore", "init_process_group_from_env"]

log = logging.getLogger("tiered_store.distributed")

# this process's open stores
_OPEN: weakref.WeakSet = weakref.WeakSet()


@dataclass
class _EnvGroup:
    """The default group ``init_process_group_from_env`` made, if any, and whether a store failed
    on it (then it goes with the last store to close; else at exit)."""

    group: Any = None
    failed: bool = False


_ENV_GROUP = _EnvGroup()

# the format of the messages ranks exchange (fingerprint, rounds): one more when a release changes
# it, so that ranks of two such releases are refused at open instead of misreading each other
PROTOCOL_VERSION = 2
RESOLVE_LOCK_WAIT_S = 5.0  # an open waits this long (at most timeout_s / 4) for a shard's lock
_EXCHANGE_KEYS = (
    "lookups",
    "ids",
    "unique_ids",
    "ids_sent",
    "rows_served",
    "bytes_sent",
    "bytes_received",
    "seconds_total",
)


class _LookupFailed(Exception):
    """A lookup round that a shard could not serve: ``error`` is raised to the caller, and the
    store stays usable (every rank finished the round)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# what a rank tells the others when its shard fails a lookup, by its error's type (the first that
# matches; its code is the index + 1)
_SHARD_FAILURES = (
    (ChecksumError, "rows failed their checksum"),
    (TableFormatError, "its shard file failed a check"),
    ((TierIOError, OSError), "a cold read failed"),
    (Exception, "its lookup raised an error"),
)


def diagnosis_connect_s(timeout_s: float) -> float:
    """Seconds a failure's diagnosis waits to connect to the group's store: ``timeout_s / 4``,
    so that a gone host (torch's client tries twice, with a back-off: 2-3 x this in all) is named
    within ``timeout_s``; at least 3 s, or a host slow to accept under a small ``timeout_s``
    would be called dead."""
    return max(timeout_s / 4, 3.0)


class ShardedStore:
    """One table over the ranks of a process group; each rank's shard is a ``TieredStore``.

    Open it on every rank with the same YAML (its ``sharding:`` section names the ranks, the
    sharding mode and the timeout). ``lookup`` and ``prefetch`` are collectives: every rank calls
    them the same number of times, in the same order, each with its own ids (or none).

    Examples
    --------
    >>> store = ShardedStore.open("layer1.yaml")        # under torchrun  # doctest: +SKIP
    >>> rows = store.lookup(torch.tensor([[3, 9], [3, 0]]))  # doctest: +SKIP
    >>> handle = store.prefetch(next_ids)                    # doctest: +SKIP
    >>> rows = store.lookup(next_ids, handle)                # doctest: +SKIP
    """

    keeps_stats = True

    def __init__(
        self,
        config: StoreConfig,
        group: dist.ProcessGroup | None = None,
        *,
        missing_table: Callable[[], BaseException | None] | None = None,
    ) -> None:
        """Open this rank's shard and check that every rank agrees; ``group``: the ranks to use
        (default: a new group of all ranks, made by every rank together); ``missing_table``: on a
        rank whose shard does not exist, the error for the whole table when it is missing too
        (an Engram checkpoint's names what writes it), said with the shard's (as is an error it
        raises, on every rank)."""
        if config.sharding is None:
            raise ConfigError(
                "sharding: missing; expected a sharding section (ranks, by) to open a ShardedStore"
            )
        sharding: ShardingConfig = config.sharding
        self.config = config
        self._missing_table = missing_table
        self.timeout_s = sharding.timeout_s
        self.owns_group = init_process_group_from_env(sharding, config.tiers.hot.device)
        _check_group(group)
        self._failure: BaseException | None = None
        self._failing = threading.Lock()  # one diagnosis of a failure (``_fail``, a round's)
        self._closed = False
        self._closed_in_time = True  # False once close() left its shard's calls under way
        self.local: TieredStore | None = None
        self.exchange = dict.fromkeys(_EXCHANGE_KEYS, 0.0)
        self.lookup_latency = LatencyHistogram()
        self.prefetch_wait_latency = LatencyHistogram()  # lookups waiting for their handles
        self._slots = threading.BoundedSemaphore(config.prefetch.depth)
        self._prefetches = 0
        self._write_rounds = 0  # write and update rounds joined: a handle older than one is refused
        self._unfinished: int | None = None  # a decided step this shard holds staged, uncommitted
        self._unresolved: str | None = None  # why the open left this shard's staged step as it was
        self._torn_update: str | None = None  # an update round applied on some shards only
        self._thread: CollectiveThread | None = None  # both stopped by _shutdown once started
        self._heartbeat: Heartbeat | None = None
        self.owns_subgroup = False
        # its own group: several stores (one per Engram layer) then never interleave their
        # collectives, and the backend's timeout is this store's
        backend = dist.get_backend(group)
        opening: Heartbeat | None = None  # the heartbeat under keys of the group's ranks
        try:  # a failure from here on ends what the open started (subgroup, threads)
            # the group's ranks (a new group of all ranks numbers them as the default group does)
            ranks = dist.group.WORLD if group is None else group
            self.rank, self.world = dist.get_rank(ranks), dist.get_world_size(ranks)
            self.exchange_device = (
                torch.device("cuda", torch.cuda.current_device())
                if backend == "nccl"
                else torch.device("cpu")
            )
            self.path = shard_path(config.table.path, self.rank, sharding.ranks, sharding.shards)
            # the diagnosis reads the heartbeats for 3 intervals: the whole error comes within timeout_s
            self._interval = min(max(self.timeout_s / 12, 0.05), 2.0)
            self._wait_s = max(self.timeout_s - 3 * self._interval - 0.1, 0.1)
            self._thread = CollectiveThread(f"sharded-store-rank{self.rank}", self._round_failed)
            # until the open's exchange agrees on this store's own keys, the beats go under keys of
            # the group's ranks (an entry left by an earlier open over them does not move: stopped),
            # from before the subgroup is made: a rank that never opens the store is named
            self._heartbeat = opening = self._beat_under(f"opening/{_ranks_digest(ranks)}")
            self._check_arrived(opening)
            self.group = group
            if group is None:
                try:
                    self.group = dist.new_group(
                        backend=backend, timeout=timedelta(seconds=self.timeout_s)
                    )
                except Exception as exc:  # torch's timeout, naming no rank
                    self._fail("open", exc, _backend_error(exc))
                self.owns_subgroup = True
            info, error = self._open_local()
            prints = self._wait(
                self._thread.submit(self._all_gather, self._fingerprint(info, error)), "open"
            )
            self.shard_map: ShardMap = check_fingerprints(prints, self.world)
            # keys no other store shares, whatever its group or the stores each rank opened before
            self._heartbeat = self._beat_under(prints[0]["heartbeat"])
            opening.stop()
            steps = self._resolve_staged(prints)
        except BaseException:
            if opening is not None:  # stopped, never marked closed: a later open over these
                opening.stop()  # ranks read a rank not yet at it as one that closed its store
                if self._heartbeat is opening:
                    self._heartbeat = None
            self._shutdown()
            raise
        _OPEN.add(self)
        local = self.local
        self.rows = self.shard_map.rows
        self.quantization = local.quantization
        self.row_width, self.row_dtype, self.row_bytes = (
            local.row_width,
            local.row_dtype,
            local.row_bytes,
        )
        self.dim, self.dtype, self.device = local.dim, local.dtype, local.device
        self.zero_out_of_range = local.zero_out_of_range
        self._starts = self.shard_map.starts(self.exchange_device)
        # every shard's committed step at open, kept while they differ (a torn commit)
        self._torn_steps = _torn_steps(steps)
        if self._torn_steps is not None:
            warn_at_caller(_torn_message(self.rank, self._torn_steps), TornCommitWarning)

    @classmethod
    def open(
        cls, config: str | Path | dict | StoreConfig, group: dist.ProcessGroup | None = None
    ) -> ShardedStore:
        """Open from a YAML path, a plain dict or a ``StoreConfig`` (on every rank)."""
        if isinstance(config, dict):
            config = StoreConfig.from_dict(config, base_dir=Path.cwd())
        elif not isinstance(config, StoreConfig):
            checked = StoreConfig.from_yaml(config)  # its errors name the file themselves
            if checked.sharding is not None:  # refused before naming the file: not its keys
                _check_environment()
                _check_group(group)
            with naming_file(config):  # and so do those found at open, of the file's keys
                return cls(checked, group)
        return cls(config, group)

    # -- the lookup interface ----------------------------------------------------------------------
    def lookup(
        self, ids: Any, handle: PrefetchHandle | None = None, *, packed: bool = False
    ) -> torch.Tensor:
        """Rows for ``ids`` (any shape) -> ``[..., dim]``; a collective every rank joins.

        With ``handle`` from ``prefetch(ids)``, collects that exchange instead of starting one."""
        start = time.perf_counter()
        try:
            self._check_usable()
            if handle is None:
                flat, shape = self._validate(ids)
                future = self._thread.submit(self._exchange, flat, packed, _queued_on(flat))
                out = self._wait(future, "lookup")
            else:  # taken as the wait starts: given back if it is interrupted
                shape = self._collect(ids, handle, packed)
                out = handle.take(self._wait_for_handle)
            if out.is_cuda:  # made on the collective thread's stream: kept until this one is done
                out.record_stream(torch.cuda.current_stream(out.device))
            return out.view(*shape, out.shape[-1])
        finally:  # every call, returned or raised (a failed rank's wait included)
            self.lookup_latency.observe(time.perf_counter() - start)

    def prefetch(self, ids: Any, *, packed: bool = False) -> PrefetchHandle:
        """Start the exchange for ``ids`` in the background (a collective, like ``lookup``).

        At most ``prefetch.depth`` run ahead; a further call waits (up to the timeout)."""
        self._check_usable()
        flat, shape = self._validate(ids, snapshot=True)  # the caller may refill its ids
        slot = [True]  # taken by who frees the slot: the round as it starts, or as below
        if not self._slots.acquire(timeout=self._wait_s):
            self._fail("prefetch", None, "no earlier prefetch finished")
        try:
            future = self._thread.submit(self._prefetch_round, slot, flat, packed, _queued_on(flat))
        except BaseException:  # interrupted (Ctrl-C) before its round started, queued or not:
            self._free(slot)  # kept, depth of them failed the store as if a rank were silent
            raise
        future.add_done_callback(lambda _: self._free(slot))  # a round that never ran (closed)
        self._prefetches += 1
        return PrefetchHandle(ids, flat, shape, packed, future, self, self._write_rounds)

    # -- writes and training ---------------------------------------------------------------------
    def write(self, ids: Any, rows: Any) -> None:
        """Make ``rows`` (``[..., row_width]``, as stored) the current version of ``ids`` on the
        ranks that own them; a collective every rank joins, each with its own ids (or none).
        For an id repeated in one call the last row wins; for one written by several ranks in the
        same round, the highest rank's. ``commit()`` makes the writes durable. One that fails
        on a shard raises on every rank; the other shards took their rows, and the failed
        shard's write applied whole or not at all (``TieredStore.write``). The next ``commit()``
        makes that durable as it is (write the rows again first); closing every rank's store
        without committing drops every write since the last commit instead.

        Examples
        --------
        >>> store.write(torch.tensor([5, 9]), rows)  # every rank, its own ids  # doctest: +SKIP
        >>> store.commit()                                                    # doctest: +SKIP
        1
        """
        self._check_usable()
        self._check_float_rows("write")
        self._write_rounds += 1  # a round on every rank, this one's rows refused or not
        try:
            flat, shape = self._validate_write_ids(ids)
            rows = as_rows(rows, (*shape, self.row_width), self.row_dtype)
        except TieredStoreError:  # join the round with nothing, so the others are not kept waiting
            self._thread.submit(self._write_round, *self._no_rows())
            raise
        unique, last = merge_last_wins([flat], [rows])
        errors = self._wait(self._thread.submit(self._write_round, unique, last), "write")
        self._raise_failed("write", errors, then=_FAILED_WRITE)

    def commit(self, step: int | None = None) -> int:
        """Commit every rank's shard with one ``step`` (default: ``committed_step`` + 1: after a
        torn commit, the oldest shard's + 1, the first step to redo); a collective. Returns the step. Ranks passing different steps raise
        ``StepMismatchError`` on every rank (nothing committed anywhere).

        Two phases, so that the shards end at one step whatever fails: first every shard stages
        its writes (``TieredStore.prepare_commit``: durable, beside its last commit, unseen by
        readers); if any shard fails to, every rank drops what it staged and raises
        ``CommitError`` naming it: nothing was committed on any shard, and the writes are kept
        for the next ``commit()``. Once every shard has staged, the step is decided: every shard
        commits what it staged (``finish_commit``). A shard that fails to keeps it staged, every
        rank raises ``CommitError`` naming it, ``committed_step`` is ``step`` on every rank, and
        the shard finishes it at the next ``commit()``, or the shards' next open does (as it
        does for a rank killed in either phase: docs/design.md, "Torn commits"). After a
        torn commit of an older version (see ``committed_step``), a shard already at ``step`` or
        beyond commits its redone writes at its own step again (``committed_step`` stays the
        oldest shard's until every shard is at one step)."""
        self._check_usable()
        if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)):
            self._thread.submit(self._commit_round, _refused(step))  # the others fail too
            raise ConfigError(f"commit: step {step!r}; expected an integer step (or None)")
        step = None if step is None else int(step)
        result, staged, finished, undropped = self._wait(
            self._thread.submit(self._commit_round, step), "commit"
        )
        self._raise_failed(
            f"commit of step {result} (its first phase, staging)",
            staged,
            CommitError,
            "nothing was committed on any shard (what the others staged was dropped"
            + (
                ""
                if undropped is None
                else f", but not this rank's: {undropped}; it stays staged, unseen by readers, "
                "until the next commit stages over it or the shards' next open drops it"
            )
            + ") and the writes are kept: commit again",
        )
        self._raise_failed(
            f"commit of step {result} (its second phase)",
            finished,
            CommitError,
            f"every shard had staged it, so step {result} is committed: the failed shards keep "
            "it staged and finish it at the next commit() or when the shards are next opened",
        )
        return result

    def update_rows(
        self,
        ids: Any,
        grads: torch.Tensor,
        update: Callable[[torch.Tensor, torch.Tensor], Any],
        step: int | None = None,
        *,
        skip: bool = False,
        optimizer_step: int | None = None,
    ) -> int | None:
        """Send the gradients ``grads`` (``[n, g]``) of ``ids`` to the ranks owning them; each
        owner sums the gradients it received per row (in rank order), reads its rows and writes
        ``update(rows, summed)``; a collective (``TrainableTable.step`` through a sharded store).
        Every rank must send gradients of one width (at least 1) and, when given, the same
        optimizer ``step`` and ``optimizer_step`` (the count ``update`` corrects Adam's bias with,
        where it is not ``step``: each owner applies its own ``update`` to the rows it holds)
        (else every rank raises ``StepMismatchError``, naming the ranks, and
        no row changes); a non-finite gradient is refused likewise (``RowDataError`` on its
        rank; on every rank, naming the row, where a row as stored among those it updates is
        not finite), and an update that is not finite on any shard (``RowDataError`` on every rank,
        before any shard writes). Returns how many rows this rank updated.

        A shard whose write fails looks its rows up: when none wrote, every rank raises
        ``UpdateRefusedError`` (no row changed); when every shard holds the step all the same,
        every rank warns and returns; when some shards hold it and some do not, every rank raises
        ``TierIOError`` naming them, and the store refuses every further call (a rank interrupted
        meanwhile too, and a call it made before the round ended) until every rank closes it
        without committing and reopens it (each shard at its last commit). A shard whose rows the
        step leaves as they were (a zero gradient) counts for neither.

        ``skip``: this rank's gradients overflowed under a ``GradScaler`` (``ids`` and the
        gradients' shape are checked as for any step, their values not read): when any rank
        passes it, no shard changes and every rank returns None, once the owners read the rows
        as stored (a NaN there, looked up, makes every step's gradients NaN: named as above,
        never skipped)."""
        self._check_usable()
        self._check_float_rows("update_rows")
        self._write_rounds += 1
        if optimizer_step is not None and optimizer_step != step:  # the ranks agree on both
            step = f"{step} (optimizer_step {optimizer_step})"
        try:
            flat, _ = self._validate_write_ids(ids)
            try:
                grads = torch.as_tensor(grads).detach()
            except (TypeError, ValueError, RuntimeError) as exc:
                raise RowDataError(
                    f"grads: {type(grads).__name__} cannot be read as numbers ({exc})"
                ) from None
            if (
                not grads.is_floating_point()
                or grads.ndim != 2
                or len(grads) != flat.numel()
                or (len(grads) and grads.shape[1] == 0)
            ):
                raise RowDataError(
                    f"grads: {grads.dtype} of shape {tuple(grads.shape)}; expected floating-point "
                    f"[{flat.numel()}, width], one row per id, width >= 1"
                )
            # refused on every rank in the round, once the owners named a row as stored whose
            # NaN (looked up, it makes a model's every gradient NaN) is behind it
            nonfinite = None
            pos = None if skip else first_non_finite_row(grads)  # skipped: the ranks' overflow
            if pos is not None:
                value = grads[pos][~torch.isfinite(grads[pos])][0].item()
                nonfinite = (
                    f"grads: the gradient of row {int(flat[pos])} holds a non-finite value "
                    f"({value}); expected finite gradients (no shard's rows changed)"
                )
        except TieredStoreError:
            self._join_refused(update, step)
            raise
        grads = grads.to("cpu", torch.float32)
        updated, outcomes, apart = self._wait(
            self._thread.submit(self._update_round, flat, grads, update, step, skip, nonfinite),
            "update_rows",
        )
        self._raise_failed_update(outcomes, apart)
        return updated

    def refuse_update(self, step: Any) -> None:
        """This rank refused its part of an update round (``TrainableTable.step`` with a step
        below 1 or not above the last): join the round with nothing, so every rank refuses it
        (the others raise ``StepMismatchError`` naming this rank); the caller raises its own."""
        self._check_usable()
        self._write_rounds += 1
        self._join_refused(lambda rows, grads: rows, step)

    def _join_refused(self, update: Callable, step: Any) -> None:
        """Join an update round with no gradients and a step no rank passes: every rank refuses
        the round (an optimizer step is applied everywhere or nowhere)."""
        self._thread.submit(self._update_round, *_NO_GRADIENTS, update, _refused(step))

    @property
    def committed_step(self) -> int:
        """The step of the shards' last commit, the same on every rank: after a commit whose
        second phase failed on some shards, its step (decided; they finish it later). When the
        shards were opened at different steps (shards committed one by one, or by a version
        before the two-phase commit), the oldest of them on every rank until commits bring every
        shard to one step: a training job resumes from it and redoes the newer steps on every
        shard."""
        # each read once: the commit round (on the store's thread) may clear it meanwhile
        if (torn := self._torn_steps) is not None:
            return min(torn)
        if (unfinished := self._unfinished) is not None:  # decided: staged here, committed on
            return unfinished  # the others
        return self.local.committed_step

    @property
    def cold(self) -> Any:
        """This rank's shard table (its ``ColdTable``)."""
        return self.local.cold

    @property
    def engram_layout(self) -> dict[str, Any] | None:
        """The whole table's Engram layout, as this rank's shard records it (None: none)."""
        return self.local.engram_layout

    @property
    def prefetches_started(self) -> int:
        """Prefetches started since the store opened."""
        return self._prefetches

    def stats(self) -> dict[str, dict[str, float]]:
        """The local shard's ``TieredStore.stats()`` with this store's ``prefetch`` (handles and
        stall seconds) and ``lookup`` (this rank's calls and their seconds, exchange and waits for
        the other ranks included), plus ``exchange`` (ids, rows and bytes this rank sent to and received from
        the others) and ``shard`` (rank, ranks, rows); its
        ``writes`` say the shards' ``committed_step``, as every rank does (not the local shard's
        own, older where its second phase failed)."""
        out = self.local.stats()
        if "writes" in out and (self._torn_steps is not None or self._unfinished is not None):
            out["writes"]["committed_step"] = self.committed_step  # never the closed local's
        # this store's prefetches and lookups, not its shard's store's share of the rounds (it
        # never prefetches; its lookups serve the rounds' rows, every rank's)
        out["prefetch"] = {
            "handles": self._prefetches,
            "wait_seconds_total": self.prefetch_wait_latency.sum,
        }
        out["lookup"] = {
            "calls": self.lookup_latency.count,
            "seconds_total": self.lookup_latency.sum,
        }
        out["exchange"] = dict(self.exchange)
        start, stop = self.shard_map.shard_range(self.rank)
        out["shard"] = {"rank": self.rank, "ranks": self.world, "rows": stop - start}
        return out

    def close(self, *, wait_s: float | None = None) -> bool:
        """Finish queued exchanges (up to the timeout) and a commit whose second phase failed
        here, close the shard; idempotent. Not a collective; a process group opened from the
        environment is destroyed. ``wait_s``: wait at most this long in all (a server's stop
        passes what is left of its own deadline), never longer than ``sharding.timeout_s`` (0 or
        less: no wait; not a number: ``ConfigError``, the store left open). Returns False when
        the shard's close left calls under way (a read hung on a dying disk, past that wait:
        ``TieredStore.close``), now or at an earlier close: the interpreter's exit would wait
        for them."""
        if no_seconds(wait_s):  # refused before the store is marked closed: else never shut down
            raise ConfigError(
                f"close: wait_s {wait_s!r}; expected a number of seconds (or None: "
                "sharding.timeout_s)"
            )
        if self._closed:
            return self._closed_in_time
        self._closed = True
        deadline = None if wait_s is None else time.monotonic() + min(wait_s, self.timeout_s)
        if self._thread is not None and self._thread.forked_text() is not None:
            # a forked child: the group, the heartbeat and their connections are the parent's (a
            # close here marked the parent's rank closed, on the parent's own connection)
            _OPEN.discard(self)
            if self.local is not None:
                self._closed_in_time = self.local.close(wait_s=seconds_left(deadline))
            return self._closed_in_time
        if self._unfinished is not None and self._failure is None:  # a decided step, still
            # staged here: committed now (after the queued exchanges), else by the next open
            done = self._thread.submit(self._local_error, self._finish_shard, self._unfinished)
            with contextlib.suppress(Exception):
                wait = self._wait_s if deadline is None else seconds_left(deadline)
                done.result(timeout=min(self._wait_s, wait))
        self._closed_in_time = self._shutdown(deadline)
        return self._closed_in_time

    @property
    def calls_left(self) -> bool:
        """Whether calls its shard's close gave up waiting for are still under way
        (``TieredStore.calls_left``)."""
        return self.local is not None and self.local.calls_left

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ShardedStore(rank {self.rank} of {self.world}, by {self.shard_map.by}, "
            f"rows [{self.shard_map.bounds[self.rank]:,}, {self.shard_map.bounds[self.rank + 1]:,}) "
            f"of {self.rows:,}: {self.local!r})"
        )

    # -- internals ---------------------------------------------------------------------------------
    def _check_arrived(self, opening: Heartbeat) -> None:
        """Within the timeout (as long as torch's wait making the subgroup: a slow rank is late,
        not gone), every rank's opening heartbeat is there, or this open fails naming the ranks
        without one (that wait named none, and the diagnosis after it read them as ranks that
        stopped); those not there after a round's wait are logged. An entry an earlier open
        over these ranks left is there, and the rounds' diagnosis names a rank that does not
        come as stopped."""
        absent = opening.absent(self._wait_s)
        if absent:
            log.warning(
                "rank %d: %s not yet at this store's open after %.1f s; waiting for %s up to "
                "sharding.timeout_s=%g",
                self.rank,
                ranks_named(absent),
                self._wait_s,
                "it" if len(absent) == 1 else "them",
                self.timeout_s,
            )
            absent = opening.absent(self.timeout_s - self._wait_s)
        if absent:
            has, it, them = ("has", "it", "it") if len(absent) == 1 else ("have", "they", "them")
            self._failure = RankFailureError(
                f"rank {self.rank}: {_in_round('open', 0)} failed: {ranks_named(absent)} {has} not come to this "
                f"store's open: no heartbeat from {them} under the open's keys within "
                f"sharding.timeout_s={self.timeout_s:g} ({it} {has} not called "
                "ShardedStore.open: busy elsewhere, or died before)"
            )
            raise self._failure

    def _open_local(self) -> tuple[ShardInfo | None, str | None]:
        """``_open_shard``, this rank's heartbeat saying ``serving`` meanwhile: an open that
        hangs (a file system that stopped answering) is named by the others' diagnosis."""
        with self._heartbeat.own_part():
            return self._open_shard()

    def _open_shard(self) -> tuple[ShardInfo | None, str | None]:
        """Open this rank's shard (its current version: a compacted shard's first file is gone);
        an error is kept to be reported to every rank."""
        if not Path(self.path).exists() and not pointer_path(self.path).exists():
            sharding = self.config.sharding
            out = f" --out '{sharding.shards}'" if sharding.shards else ""
            gone = ""
            try:
                if self._missing_table is not None and (table := self._missing_table()):
                    gone = f", from its table, which is missing too: {error_text(table)}"
            except Exception as exc:  # noqa: BLE001 (any: told to every rank, so they stay in step)
                gone = (  # not known to be missing: its version pointer unreadable, say
                    f"; its table {self.config.table.path} cannot be read either "
                    f"({type(exc).__name__}: {error_text(exc)})"
                )
            return None, (
                f"{self.path} does not exist; expected the shards `tiered-store shard "
                f"{self.config.table.path} --ranks {sharding.ranks} --by {sharding.by}{out}` "
                f"makes{gone}"
            )
        try:
            local_config = self.config.model_copy(
                update={"table": self.config.table.model_copy(update={"path": str(self.path)})}
            )
            self.local = TieredStore(local_config)
            return read_shard(self.local.cold.path), None  # the version the store holds
        except Exception as exc:  # noqa: BLE001 (any, torch's out of memory too: told to every rank)
            return None, f"{type(exc).__name__}: {error_text(exc)}"

    def _fingerprint(self, info: ShardInfo | None, error: str | None) -> dict[str, Any]:
        """What every rank must agree on, as this rank sees it (a shard whose commit state
        cannot be read: its error, told to every rank)."""
        sharding = self.config.sharding
        state = (None, None, None)  # committed step, staged step, commit rounds
        if self.local is not None:
            try:
                local = self.local
                state = (local.committed_step, local.staged_step, local.commit_rounds)
            except Exception as exc:  # noqa: BLE001 (any: raised on every rank, in step)
                info, error = None, f"{type(exc).__name__}: {error_text(exc)}"
        doc: dict[str, Any] = {
            "protocol": PROTOCOL_VERSION,
            "shard": str(self.path),
            "error": error,
            "heartbeat": uuid.uuid4().hex,  # rank 0's names this store's heartbeat keys
            "committed_step": state[0],
            "staged_step": state[1],
            "commit_rounds": state[2],
            "world": self.world,
            "config": {
                "ranks": sharding.ranks,
                "by": sharding.by,
                "out_of_range": self.config.table.out_of_range,
            },
        }
        if info is not None:
            quant = info.manifest.quantization
            doc["shard_rank"] = info.rank
            doc["run"] = info.run
            doc["map"] = info.shard_map.to_json()
            doc["rows"] = {
                "dim": info.manifest.dim,
                "dtype": info.manifest.dtype,
                "quantization": quant.to_json() if quant else None,
            }
        return doc

    def _resolve_staged(self, prints: list[dict[str, Any]]) -> list[int]:
        """Finish or drop what a two-phase commit interrupted between its phases left staged on
        the shards (``staged_decided`` decides, the same on every rank); every shard's committed
        step once that is done (a shard another store resolved otherwise meanwhile: its own). A
        shard that cannot (its writer lock held elsewhere past a short
        wait: that writer's commit may be under way; a read-only delta) is left as it is, with a
        warning on every rank; this store then refuses to commit until reopened."""
        committed = [doc["committed_step"] for doc in prints]
        staged = [doc["staged_step"] for doc in prints]
        rounds = [doc["commit_rounds"] for doc in prints]
        decided = staged_decided(committed, staged, rounds)
        steps = [s if d else c for c, s, d in zip(committed, staged, decided, strict=True)]
        if all(s is None for s in staged):
            return steps  # the usual open: no further round
        mine, finish = staged[self.rank], decided[self.rank]
        action, error = "commit" if finish else "drop", None
        if mine is not None:
            error = self._resolve_mine(mine, finish)
            if error is None and self.local is not None:  # tiers filled before: reopened
                self.local.close()
                self.local = None
                _, error = self._open_local()
                if error is not None:
                    error = f"the {action} was made, but reopening its shard failed: {error}"
            else:
                self._unfinished = mine if finish else None  # decided: committed_step says so
                self._unresolved = (
                    f"rank {self.rank}: its shard {self.path} holds step {mine} staged by an "
                    f"interrupted sharded commit, which this store's open could not {action} "
                    f"({error}); expected it resolved: close "
                    "every store of this table, then reopen the ShardedStore on every rank"
                )
        # the step this shard is at: another store holding its lock may have resolved it otherwise
        if mine is None or error:
            step = steps[self.rank]
        else:  # read: a read failing here is told to every rank (raised on every one)
            step = None
            try:
                step = self.local.committed_step
            except Exception as exc:  # noqa: BLE001 (any: raised on every rank, in step)
                error = (
                    f"the {action} was made, but reading its shard's committed step failed: "
                    f"{type(exc).__name__}: {error_text(exc)}"
                )
        doc = {"error": error, "reopened": self.local is not None, "step": step}
        errors = self._wait(self._thread.submit(self._all_gather, doc), "open")
        if not all(e["reopened"] and e["step"] is not None for e in errors):  # on every rank
            raise ShardMismatchError(
                f"rank {self.rank}: resolving a sharded commit interrupted between its phases: "
                + "; ".join(f"rank {r}: {e['error']}" for r, e in enumerate(errors) if e["error"])
            )
        left = [f"rank {r}: {e['error']}" for r, e in enumerate(errors) if e["error"]]
        if left:
            warn_at_caller(
                f"rank {self.rank}: a sharded commit left staged rows (interrupted between its "
                "phases, or under way in the writer holding a shard's lock) that this open "
                f"could not resolve on {len(left)} shard(s) ({'; '.join(left)}); lookups there "
                "show the step before, and this store refuses to commit: close every store of "
                "this table (a writer holding a shard's lock finishes its own commit), then "
                "reopen on every rank",
                TornCommitWarning,
            )
        return [e["step"] for e in errors]

    def _resolve_mine(self, mine: int, finish: bool) -> str | None:
        """Commit (``finish``) or drop the step ``mine`` staged on this shard, under its writer
        lock, waited for a moment while another store holds it (another store's open resolving
        it); then read again: a shard another store resolved meanwhile is left as it is. A drop
        decided before a wait is not made (the holder may have been that commit's writer, going
        on with it). This rank's error as text, or None."""
        waited = False
        try:
            try:
                lock = take_writer_lock(self.path)
            except TierIOError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                waited = True
                lock = take_writer_lock(self.path, min(RESOLVE_LOCK_WAIT_S, self.timeout_s / 4))
        except Exception as exc:  # noqa: BLE001 (told to every rank, raised on every rank)
            return f"{type(exc).__name__}: {error_text(exc)}"
        left: str | None = None  # why the shard is left as the lock's holder left it
        try:
            if waited or self.local.is_stale():  # its view predates what that store did
                self.local.close()
                self.local = None
                _, error = self._open_local()
                if error is not None:
                    left = f"reopening its shard after waiting for its writer lock: {error}"
            if left is None and self.local.staged_step != mine:
                left = ""  # resolved by the store that held the lock
            if left is None and waited and not finish:
                left = (
                    f"its writer lock was held by another store as this open decided to drop step "
                    f"{mine}, which that store may have been committing"
                )
        except Exception as exc:  # noqa: BLE001 (told to every rank, raised on every rank)
            left = f"{type(exc).__name__}: {error_text(exc)}"
        except BaseException:
            release(lock)
            raise
        if left is not None:
            release(lock)
            return left or None

        def resolve() -> None:
            self.local.adopt_writer_lock(lock)  # released with the store, or when refused
            if self.local.staged_step != mine:  # read now: a drop made before this open's lock
                return  # (unseen by its view, which a drop does not make stale)
            if finish:
                self.local.finish_commit(mine)
            else:
                self.local.abort_commit()

        return self._local_error(resolve)

    def _beat_under(self, key: str) -> Heartbeat:
        """This rank's heartbeat under ``tiered_store/sharded/<key>/`` of the default store, on
        this process's heartbeat connection (no new connection after the first store's open)."""
        prefix, default = f"tiered_store/sharded/{key}/", dist.distributed_c10d._get_default_store()
        beats = dist.PrefixStore(prefix, shared_connection(default))
        diagnosis = dist.PrefixStore(prefix, shared_connection(default, "diagnosis"))
        return Heartbeat(
            dist.PrefixStore(prefix, default),
            self.rank,
            self.world,
            self._interval,
            beats,
            diagnosis,
            diagnosis_connect_s(self.timeout_s),
            kind="open",  # until the first round: a rank whose shard's open hangs is named so
        )

    def _all_gather(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``doc``, in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, doc, group=self.group)
        return out

    def _validate(
        self, ids: Any, *, snapshot: bool = False
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Flat int64 ids and their shape (``snapshot``: never sharing memory with the caller's
        ids); out-of-range ids (unless ``zero``) raise RowIdError after this rank joined the round
        with no ids, so the others are not kept waiting; so do ids that are not integers."""
        try:
            tensor = as_id_tensor(ids)
        except TieredStoreError:
            self._thread.submit(self._exchange, torch.empty(0, dtype=torch.int64), False)
            raise
        flat = tensor.reshape(-1).to(torch.int64)
        if flat.numel() and not self.zero_out_of_range:
            bad = (flat < 0) | (flat >= self.rows)
            if bool(bad.any()):
                pos = int(torch.nonzero(bad)[0])
                self._thread.submit(self._exchange, flat[:0], False)
                raise RowIdError(
                    f"ids: value {int(flat[pos])} at flat position {pos} is out of range; "
                    f"expected 0 <= id < {self.rows:,} (the table's rows, over {self.world} ranks)"
                )
        if snapshot:  # pinned kept pinned on a GPU exchange; on the CPU's, is_pinned() unasked
            flat = snapshot_of(flat, tensor, pinnable=self.exchange_device.type == "cuda")
        return flat, tuple(tensor.shape)

    def _collect(self, ids: Any, handle: PrefetchHandle, packed: bool) -> tuple[int, ...]:
        """Check a handle belongs to ``ids`` and to this call's ``packed``; its shape."""
        if not isinstance(handle, PrefetchHandle):
            raise PrefetchHandleError(
                f"lookup: handle is {type(handle).__name__}; expected a PrefetchHandle"
            )
        if handle.owner is not self:  # its rows are another shard group's
            raise PrefetchHandleError(OTHER_STORE)
        if handle.consumed:
            raise PrefetchHandleError(CONSUMED)
        if packed != handle.packed:
            raise PrefetchHandleError(
                f"lookup: packed={packed} but the handle was prefetched with "
                f"packed={handle.packed}; pass the same"
            )
        if ids is not handle.ids or not ids_on_gpu(ids):  # a CPU buffer may have been refilled
            tensor = as_id_tensor(ids)
            handle.check_ids(tensor.reshape(-1), tuple(tensor.shape))
        if handle.write_seq != self._write_rounds:  # fetching again would be a round of this
            handle.take(self._wait, "lookup")  # rank's alone: it is let go, then refused
            raise PrefetchHandleError(
                "lookup: this handle was prefetched before a write or update round, so its rows "
                "may be older than them; prefetch after writing, or look up without the handle"
            )
        return handle.shape

    def _prefetch_round(self, slot: list, *args: Any) -> torch.Tensor:
        """``_exchange(*args)``, holding its prefetch slot to its end (a Ctrl-C in prefetch()
        after it was queued, before a callback could be attached, kept the slot for good); run
        without it when that interrupted prefetch() freed it first (every rank joins the round)."""
        held = take_once(slot)
        try:
            return self._exchange(*args)
        finally:
            if held:
                self._slots.release()

    def _free(self, slot: list) -> None:
        """Free a prefetch's depth slot, once (``slot``: its one-item token)."""
        if take_once(slot):
            self._slots.release()

    def _wait_for_handle(self, future: Future) -> torch.Tensor:
        """A prefetch's rows (``_wait``), recording how long the lookup stalled for them."""
        waited = time.perf_counter()
        try:
            return self._wait(future, "lookup")
        finally:  # its round failed or not
            self.prefetch_wait_latency.observe(time.perf_counter() - waited)

    def _exchange(
        self, flat: torch.Tensor, packed: bool, queued: torch.cuda.Event | None = None
    ) -> torch.Tensor:
        """One collective round: route unique ids to their owners, serve theirs, gather the rows.
        ``queued``: recorded where the caller made ``flat`` on the GPU (this thread waits for it);
        rows on the GPU are ready when this returns, for a caller on any stream."""
        self._enter("lookup")
        start = time.perf_counter()
        if queued is not None:
            torch.cuda.current_stream(flat.device).wait_event(queued)
        device = self.exchange_device
        flat = flat.to(device)
        n = flat.numel()
        inside = None
        if self.zero_out_of_range and n:
            inside = (flat >= 0) & (flat < self.rows)
            if bool(inside.all()):
                inside = None
            else:
                flat = flat[inside]
        unique, inverse, _ = unique_inverse_counts(flat)  # sorted: grouped by owner
        owner = self.shard_map.owner(unique)
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        asked = torch.empty(sum(recvs), dtype=torch.int64, device=device)
        dist.all_to_all_single(asked, unique - self._starts[owner], recvs, sends, group=self.group)
        try:
            with self._heartbeat.own_part():
                served, failed_here = self.local.lookup(asked, packed=True), None
        except Exception as exc:  # noqa: BLE001 (any: told to every rank, so they stay in step)
            served, failed_here = None, exc
        try:
            self._check_served(failed_here, device)
        except _LookupFailed:  # a round joined all the same: its ids crossed, its rows did not
            self._count(n, unique.numel(), sends, recvs, time.perf_counter() - start, rows=False)
            raise
        payload = served.to(device).contiguous().view(torch.uint8)
        received = torch.empty((unique.numel(), self.row_bytes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, payload, sends, recvs, group=self.group)
        rows = received.view(self.row_dtype)[inverse]
        if inside is not None:  # all-zero rows where the ids fall outside the table
            full = torch.zeros((n, self.row_width), dtype=self.row_dtype, device=device)
            full[inside] = rows
            rows = full
        rows = rows.to(self.device)
        if self.quantization is not None and not packed:
            rows = dequantize_rows(rows, self.quantization)
        if rows.is_cuda:
            torch.cuda.current_stream(rows.device).synchronize()
        self._count(n, unique.numel(), sends, recvs, time.perf_counter() - start)
        return rows

    def _check_served(self, failed_here: BaseException | None, device: torch.device) -> None:
        """Tell every rank whether this one's shard served its rows (a collective); when any did
        not, end the round on every rank before the rows travel: the failed rank raises its own
        error, the others ``ShardReadError`` naming it."""
        status = torch.zeros(self.world, dtype=torch.int64, device=device)
        if failed_here is not None:
            status[self.rank] = 1 + next(
                i for i, (kind, _) in enumerate(_SHARD_FAILURES) if isinstance(failed_here, kind)
            )
        dist.all_reduce(status, group=self.group)
        if not bool(status.any()):
            return
        if failed_here is not None:
            raise _LookupFailed(failed_here)
        failed = {r: _SHARD_FAILURES[int(c) - 1][1] for r, c in enumerate(status.tolist()) if c}
        named = "; ".join(f"rank {r}: {why}" for r, why in failed.items())
        raise _LookupFailed(
            ShardReadError(
                f"rank {self.rank}: {_in_round('lookup', self._heartbeat.entered)}: {len(failed)} of "
                f"{self.world} rank(s) could not serve their rows ({named}; see their logs); "
                "this lookup failed on every rank, the next is served as usual",
                failed,
            )
        )

    def _check_float_rows(self, what: str) -> None:
        """Writes need float rows (the same answer on every rank: the layout is agreed)."""
        if self.quantization is not None:
            raise RowDataError(
                f"{what}: the shards hold packed quantised rows; writes need a table of float rows"
            )

    def _validate_write_ids(self, ids: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Flat int64 CPU ids, every one inside the table (``out_of_range: zero`` or not)."""
        tensor = as_id_tensor(ids)
        flat = tensor.reshape(-1).to("cpu", torch.int64)
        bad = (flat < 0) | (flat >= self.rows)
        if bool(bad.any()):
            pos = int(torch.nonzero(bad)[0])
            raise RowIdError(
                f"ids: value {int(flat[pos])} at flat position {pos} is out of range; expected "
                f"0 <= id < {self.rows:,} to write (the table's rows, over {self.world} ranks)"
            )
        return flat, tuple(tensor.shape)

    def _no_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """No ids and no rows: a rank's share of a round it joins with nothing."""
        return torch.empty(0, dtype=torch.int64), torch.empty(
            (0, self.row_width), dtype=self.row_dtype
        )

    def _route(self, ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send sorted ``ids`` and their ``rows`` to the owners; (local ids, rows) this rank got,
        in source-rank order (rows of the senders' width and of ``rows``' dtype)."""
        device = self.exchange_device
        ids = ids.to(device)
        owner = self.shard_map.owner(ids)
        per_rank = torch.bincount(owner, minlength=self.world)
        row_bytes = rows.shape[1] * rows.element_size()
        send_counts = torch.stack([per_rank, per_rank * row_bytes], 1)  # [world, (ids, bytes)]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        (sends, send_bytes), (recvs, recv_bytes) = send_counts.T.tolist(), recv_counts.T.tolist()
        local_ids = torch.empty(sum(recvs), dtype=torch.int64, device=device)
        dist.all_to_all_single(local_ids, ids - self._starts[owner], recvs, sends, group=self.group)
        payload = rows.contiguous().to(device).view(torch.uint8).reshape(-1)
        received = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(received, payload, recv_bytes, send_bytes, group=self.group)
        n = local_ids.numel()
        width = received.numel() // n // rows.element_size() if n else rows.shape[1]
        return local_ids.cpu(), received.cpu().view(rows.dtype).reshape(n, width)

    def _write_round(self, ids: torch.Tensor, rows: torch.Tensor) -> list[str | None]:
        """One write: route the rows, write them to this shard; every rank's error (or None)."""
        self._enter("write")
        local_ids, received = self._route(ids, rows)
        return self._all_gather(self._local_error(self.local.write, local_ids, received))

    def _commit_round(
        self, step: int | str | None
    ) -> tuple[int, list[str | None], list[str | None], str | None]:
        """Agree on the step, stage this shard's writes, then (every shard staged) commit them;
        (the step, every rank's error of each phase or None: no second phase, none; this rank's
        error dropping what it staged after a failed first phase, or None)."""
        self._enter("commit")
        try:  # a read failing here is told to every rank (raised on its own, the others wait)
            last, unread = self.local.committed_step, None
        except Exception as exc:  # noqa: BLE001 (any: raised on every rank, in step)
            last, unread = None, f"{type(exc).__name__}: {error_text(exc)}"
        asked = self._all_gather((last, step, uuid.uuid4().hex, unread))
        if any(u is not None for *_, u in asked):  # raised on every rank: they stay in step
            raise CommitError(
                f"rank {self.rank}: commit: reading the committed step of a shard failed ("
                + "; ".join(f"rank {r}: {u}" for r, (*_, u) in enumerate(asked) if u is not None)
                + "); expected every shard's step readable: nothing was committed on any shard, "
                "and the writes are kept: commit again"
            )
        if len({s for _, s, _, _ in asked}) > 1:  # raised on every rank: they stay in step
            raise StepMismatchError(
                f"rank {self.rank}: commit: ranks passed different steps "
                f"({_ranks_by_value([s for _, s, _, _ in asked])}); expected the same step on "
                "every rank (or None on all); nothing was committed on any shard"
            )
        if step is None:  # committed_step + 1 (torn: the oldest shard's, the same on every rank)
            torn = self._torn_steps
            step = (max(c for c, _, _, _ in asked) if torn is None else min(torn)) + 1
        round_id = asked[0][2]  # rank 0's: each shard stages it, and keeps it once committed
        here: list[int] = []  # the step this shard staged at (its own, ahead, in a redo)
        staged = self._all_gather(self._local_error(self._prepare_shard, step, round_id, here))
        if any(e is not None for e in staged):
            # every rank that staged drops it; a failed drop leaves it to the next commit's
            # staging or the next open (a shard did not stage it: the open drops it)
            undropped = None
            if staged[self.rank] is None:
                undropped = self._local_error(self.local.abort_commit)
            return step, staged, [None] * self.world, undropped
        # every shard is at ``step`` (or its own, ahead: torn still) now, or finishes it (in the
        # round: a caller interrupted too); phase 2 commits the step phase 1 staged here (not
        # read again: a read failing here would leave this rank out of phase 2, the others waiting)
        torn = self._torn_steps
        self._torn_steps = None if torn is None else _torn_steps([max(step, t) for t in torn])
        return step, staged, self._all_gather(self._local_error(self._finish_shard, here[0])), None

    def _prepare_shard(self, step: int, round_id: str, here: list[int]) -> None:
        """Phase 1 on this shard: finish the step it staged and failed to commit in an earlier
        round, then stage ``step`` (appended to ``here``: the step it staged at); after a torn
        commit, a shard already at ``step`` takes the redone step's writes at that step (its
        newer rows are rewritten, the others reach it)."""
        if self._unresolved is not None:
            raise CommitError(self._unresolved)
        if self._unfinished is not None:
            self._finish_shard(self._unfinished)
        at, redo = self._step_here(step)
        here.append(self.local.prepare_commit(at, redo=redo, round_id=round_id))

    def _step_here(self, step: int) -> tuple[int, bool]:
        """The step this shard stages a round's ``step`` at, and whether it redoes its own: after
        a torn commit, a shard ahead of the oldest (never the oldest's own step, committed whole)
        and at ``step`` or beyond takes the redone writes at its own step (steps never go back:
        readers tell commits apart by them)."""
        torn = self._torn_steps
        if torn is not None and min(torn) < step <= max(torn):  # (else no shard's step is read)
            last = self.local.committed_step
            if step <= last <= max(torn):
                return last, True
        return step, False

    def _finish_shard(self, step: int) -> None:
        """Phase 2 on this shard: commit what it staged; failing, it stays staged, decided."""
        try:
            self.local.finish_commit(step)
        except Exception:
            self._unfinished = step
            raise
        self._unfinished = None

    def _update_round(
        self,
        ids: torch.Tensor,
        grads: torch.Tensor,
        update: Callable,
        step: int | None,
        skip: bool = False,
        nonfinite: str | None = None,
    ) -> tuple[int | None, list[tuple[str | None, str | None]], str | None]:
        """Agree on the gradients' width and the step, route the gradients, sum them per row,
        apply ``update`` to this shard's rows; when any rank skips, the rows are only read and
        none is updated (None rows). When any rank's gradients are not finite (``nonfinite``:
        why), every rank raises; a row as stored among those read that is not finite is named
        first on every rank (its NaN, looked up, made them), a skipped round's too. Returns the
        rows this rank updated, every rank's (write error, what its shard holds: ``_holds``,
        read only once a shard's write failed) and ``_record_torn``'s account."""
        self._enter("update")
        # the width from the shape: [n, 0] gradients are refused before, never read as "none"
        asked = self._all_gather((grads.shape[1] if len(grads) else None, step, skip, nonfinite))
        refused = _disagreeing([(width, s) for width, s, _, _ in asked])
        if any(refused):  # raised on every rank: they stay in step
            named = "; ".join(f"rank {r}: {why}" for r, why in enumerate(refused) if why)
            raise StepMismatchError(
                f"rank {self.rank}: update_rows: {named}; nothing was updated on any shard"
            )
        bad = [why for *_, why in asked]
        skipped = any(s for _, _, s, _ in asked)  # a rank's gradients overflowed: rows only read
        reading = skipped or any(bad)  # no update: only the ids go (the gradients' width agreed)
        width = next((w for w, *_ in asked if w is not None), 0)
        order = torch.argsort(ids, stable=True)  # grouped by owner
        local_ids, received = self._route(
            ids[order], grads[order][:, :0] if reading else grads[order]
        )
        unique, inverse, _ = unique_inverse_counts(local_ids)
        if not reading:
            summed = torch.zeros((unique.numel(), received.shape[1]), dtype=received.dtype)
            summed.index_add_(0, inverse, received)

        new_rows: list[torch.Tensor] = []  # and the rows before

        def compute() -> None:
            if unique.numel():
                current = self.local.lookup(unique)
                if reading:  # no update: a row as stored behind NaN gradients
                    self._finite_stored(unique, current, width)
                    return
                rows = update(current, summed.to(current))
                new_rows.append(self._finite_update(unique, current, rows, summed.shape[1]))
                new_rows.append(current)

        # every shard's new rows are made and checked before any is written: applied on the
        # others, a step one shard refuses (an optimizer state overflowing) set them a step apart
        refused = self._all_gather(self._local_error(compute))
        if all(e is None or e.startswith("RowDataError") for e in refused):
            failed = [f"rank {r}: {e}" for r, e in enumerate(refused) if e is not None]
            if failed:
                raise RowDataError(
                    f"rank {self.rank}: update_rows: {'; '.join(failed)}; nothing was updated on "
                    "any shard"
                )
        else:
            self._raise_failed(  # no shard wrote: the caller keeps its gradients
                "update_rows",
                refused,
                UpdateRefusedError,
                then="nothing was updated on any shard",
            )
        self._refuse_nonfinite(bad)  # as refused input: no rank skips
        if skipped:
            return None, [(None, None)] * self.world, None

        def write() -> None:
            if new_rows:
                self.local.write(unique, new_rows[0])

        errors = self._all_gather(self._local_error(write))
        if all(e is None for e in errors):  # every shard wrote: no shard's rows are compared
            return unique.numel(), [(None, None)] * self.world, None
        held = self._holds(unique, *new_rows, wrote=errors[self.rank] is None) if new_rows else None
        outcomes = list(zip(errors, self._all_gather(held), strict=True))
        # in the round: a caller interrupted meanwhile records it too
        return unique.numel(), outcomes, self._record_torn(outcomes)

    def _holds(
        self, local_ids: torch.Tensor, rows: torch.Tensor, before: torch.Tensor, *, wrote: bool
    ) -> str | None:
        """What this shard holds after its write of ``rows`` over ``before`` (``wrote``: it
        returned; else it failed, applied whole or not at all, or each row old or new:
        ``TieredStore.write``, and is looked up): None when ``rows`` are ``before`` (the step
        left them as they were: either holds it), ``_WROTE`` (every row new), ``_LOST`` (every
        row as before) or ``_UNKNOWN``."""
        try:
            stored = rows.to(before.device, before.dtype)  # as written: in the table's dtype
            if torch.equal(stored, before):
                return None
            if wrote:
                return _WROTE
            with self._heartbeat.own_part():
                now = self.local.lookup(local_ids)
            if torch.equal(now, stored):
                return _WROTE
            return _LOST if torch.equal(now, before) else _UNKNOWN
        except Exception:  # noqa: BLE001 (told to every rank: the shard's state is unknown)
            return _WROTE if wrote else _UNKNOWN

    def _raise_failed_update(
        self, outcomes: list[tuple[str | None, str | None]], apart: str | None
    ) -> None:
        """After an update round whose write failed on a shard, on every rank (``apart``: where
        its step applied, from ``_record_torn``): a warning when every shard holds the step all
        the same; ``UpdateRefusedError`` when none does; else (the shards a step apart, which no
        retry mends in place: the step would apply twice where it was written) ``TierIOError``
        naming the ranks, and this store refuses every further call."""
        errors = [e for e, _ in outcomes]
        if apart is not None:
            self._raise_failed(
                "update_rows",
                errors,
                then=f"{apart}: no retry mends that in place (the step would apply twice where it "
                "was written), so this store refuses every further call; close every rank's store "
                "without committing and reopen it (each shard reopens at its last commit)",
            )
        if any(held == _LOST for _, held in outcomes):  # and none holds it (else apart)
            self._raise_failed(
                "update_rows",
                errors,
                UpdateRefusedError,
                then="no shard holds the step (a failed shard's write applies whole or not at "
                "all, and none applied): nothing was updated on any shard; step again with the "
                "gradients kept",
            )
        said = []  # the round did what it is for: the step is made on every shard
        for how, left in (("after it applied", False), ("where the step left it as it was", True)):
            failed = "; ".join(
                f"rank {r}: {e}"
                for r, (e, held) in enumerate(outcomes)
                if e is not None and (held is None) == left
            )
            if failed:
                said.append(f"a shard's write raised {how} ({failed})")
        if said:
            warn_at_caller(
                f"rank {self.rank}: sharded update_rows: {'; '.join(said)}; every shard holds "
                "the step: the next commit makes it durable",
                RuntimeWarning,
            )

    def _record_torn(self, outcomes: list[tuple[str | None, str | None]]) -> str | None:
        """Where an update round's step applied when some shards hold it and others may not
        (this store then refuses every further call), or None."""
        wrote = [r for r, (_, held) in enumerate(outcomes) if held == _WROTE]
        lacks = [r for r, (_, held) in enumerate(outcomes) if held in (_LOST, _UNKNOWN)]
        unknown = [r for r, (_, held) in enumerate(outcomes) if held == _UNKNOWN]
        if not lacks or not (wrote or unknown):
            return None
        failed = "its lookup" if len(unknown) == 1 else "their lookups"
        partly = f" ({ranks_named(unknown)}: partly, or {failed} failed)" if unknown else ""
        applied = ranks_named(wrote) if wrote else "no rank"
        apart = (
            f"the step applied on the shards of {applied} and not on those of "
            f"{ranks_named(lacks)}{partly}"
        )
        # apart for certain when a shard wrote and another's write is known not to have applied
        are = "are" if wrote and any(held == _LOST for _, held in outcomes) else "may be"
        self._torn_update = (
            f"an update_rows round: {apart}, so the shards {are} a step apart; expected every shard "
            "at one step: close every rank's store without committing and reopen it (each shard "
            "reopens at its last commit, every write since dropped; training resumes from "
            "committed_step)"
        )
        return apart

    def _finite_update(
        self, local_ids: torch.Tensor, current: torch.Tensor, rows: torch.Tensor, dim: int
    ) -> torch.Tensor:
        """``rows`` (the optimizer's update of this shard's ``local_ids``, stored as ``current``
        with ``dim`` weights each), or ``RowDataError`` naming the first row id whose update is
        not finite, and why: its row as stored, or the update itself."""
        first = first_non_finite_row(rows)
        if first is not None:
            self._finite_stored(local_ids, current, dim)
            row = int(local_ids[first]) + int(self._starts[self.rank])
            raise RowDataError(
                f"the update of row {row} is not finite (its weights or optimizer state overflow "
                f"{str(rows.dtype).removeprefix('torch.')}: a gradient too large); expected "
                "finite rows"
            )
        return rows

    def _refuse_nonfinite(self, bad: list[str | None]) -> None:
        """When any rank's gradients of an update round are not finite (``bad``: why, per rank),
        raise: ``RowDataError`` on those ranks, ``StepMismatchError`` naming them elsewhere."""
        if bad[self.rank] is not None:
            raise RowDataError(bad[self.rank])
        named = "; ".join(
            f"rank {r}: its gradients or step were refused there (see its own error)"
            for r, why in enumerate(bad)
            if why is not None
        )
        if named:  # the caller keeps its gradients
            raise StepMismatchError(
                f"rank {self.rank}: update_rows: {named}; nothing was updated on any shard"
            )

    def _finite_stored(self, local_ids: torch.Tensor, current: torch.Tensor, dim: int) -> None:
        """``RowDataError`` naming the first of this shard's ``local_ids`` whose row as stored
        (``current``, ``dim`` weights each) is not finite: written past the store's checks."""
        fault = stored_row_fault(local_ids, current, dim, int(self._starts[self.rank]))
        if fault is not None:
            raise RowDataError(f"{fault} (restore the shard, or write the row anew)")

    def _local_error(self, fn: Callable, *args: Any) -> str | None:
        """Run this rank's part; its error as text (to tell every rank), or None: any error, so
        that the rank stays in step with the others (an optimizer's own, too)."""
        try:
            with self._heartbeat.own_part():
                fn(*args)
        except Exception as exc:  # noqa: BLE001 (told to every rank, raised on every rank)
            return f"{type(exc).__name__}: {error_text(exc)}"
        return None

    def _raise_failed(
        self,
        what: str,
        errors: list[str | None],
        error_type: type[TierIOError] = TierIOError,
        then: str = "",
    ) -> None:
        """Raise on every rank when any rank's part of ``what`` failed, naming those ranks (and
        ``then``: what became of the round)."""
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
        if failed:
            message = (
                f"rank {self.rank}: sharded {what} failed on {len(failed)} of {self.world} "
                f"rank(s): {'; '.join(failed)}{f'; {then}' if then else ''}"
            )
            raise error_type(errno.EIO, message)

    def _count(
        self, n: int, unique: int, sends: list, recvs: list, seconds: float, rows: bool = True
    ) -> None:
        """Add one round to the exchange counters (bytes that crossed between ranks only;
        ``rows``: False for a round that ended before the rows travelled)."""
        ids_out, ids_in = sum(sends) - sends[self.rank], sum(recvs) - recvs[self.rank]
        counts, row_bytes = 8 * (self.world - 1), self.row_bytes if rows else 0
        ex = self.exchange
        ex["lookups"] += 1
        ex["ids"] += n
        ex["unique_ids"] += unique
        ex["ids_sent"] += ids_out
        ex["rows_served"] += ids_in if rows else 0
        ex["bytes_sent"] += counts + 8 * ids_out + row_bytes * ids_in
        ex["bytes_received"] += counts + 8 * ids_in + row_bytes * ids_out
        ex["seconds_total"] += seconds

    def _wait(self, future: Future, what: str) -> Any:
        """The future's result within the timeout, or a RankFailureError naming the failed rank."""
        try:
            return future.result(timeout=self._wait_s)
        except FutureTimeout:
            self._fail(what, None, f"no answer within sharding.timeout_s={self.timeout_s:g}")
        except FutureCancelled:  # a prefetch cancelled while queued (an Exception: not the
            raise PrefetchHandleError(CANCELLED) from None  # backend's, as TieredStore's says)
        except _LookupFailed as exc:  # every rank finished the round: the store stays usable
            raise exc.error from None
        except (TieredStoreError, PrefetchHandleError):
            raise
        except Exception as exc:  # the backend's error: a peer closed its connection, a timeout
            self._fail(what, exc, _backend_error(exc))

    def _round_failed(self, exc: Exception) -> None:
        """On the collective thread, a round's error: the backend's (as ``_wait`` tells them
        apart) is recorded as this store's failure in the round, so that a caller interrupted
        (Ctrl-C) while it waited, or one that never waited (its own input refused), has its next
        call refused as after a failure it saw, not run on the broken group."""
        if not isinstance(exc, (_LookupFailed, TieredStoreError, PrefetchHandleError)):
            kind = self._heartbeat.kind
            self._record_failure(_ROUND_CALLS.get(kind, kind), _backend_error(exc))

    def _fail(self, what: str, cause: BaseException | None, detail: str) -> None:
        """Name the failed rank(s), remember the failure, raise it."""
        raise self._record_failure(what, detail) from cause

    def _record_failure(self, what: str, detail: str) -> BaseException:
        """``failure``, diagnosed once: a round failing on the store's thread as its caller's
        wait runs out (or the other way round) takes the failure the first recorded, not a
        second diagnosis after it (both waiting to connect to a gone store host)."""
        with self._failing:
            if self._failure is None:
                self.failure(what, detail)
            return self._failure

    def failure(self, what: str, detail: str) -> RankFailureError:
        """The error of a failed round of the group (``what``), naming the failed rank(s); this
        store refuses further rounds from now on (the group's collectives are out of step)."""
        found = self._heartbeat.diagnose()
        self._failure = RankFailureError(
            f"rank {self.rank}: {_in_round(what, self._heartbeat.entered)} failed: "
            f"{found.describe(3 * self._interval)} ({detail})"
        )
        return self._failure

    @property
    def failed(self) -> BaseException | None:
        """The failed round that made this store unusable, or None."""
        return self._failure

    def stopped_ranks(self) -> str | None:
        """Between rounds: a sentence naming the ranks whose heartbeat stopped or that closed
        their store (see ``Heartbeat.stopped``); None when every one beats."""
        return self._heartbeat.stopped()

    @property
    def heartbeat_s(self) -> float:
        """Seconds between this rank's heartbeats."""
        return self._interval

    def _check_usable(self) -> None:
        """Raise once closed, after a failure (the group's collectives are then out of step), or
        in a forked child (its rounds run in the process that opened it: waited out, the
        timeout was diagnosed as a silent rank)."""
        if (forked := self._thread.forked_text()) is not None:
            raise StoreClosedError(forked)
        if self._closed:
            raise StoreClosedError("sharded store is closed; open a new ShardedStore")
        self._refuse_torn()
        self._refuse_failed()

    def _refuse_failed(self) -> None:
        """``RankFailureError`` once a round of the group failed (``failure``)."""
        if self._failure is not None:
            raise RankFailureError(
                f"rank {self.rank}: this sharded store failed earlier ({self._failure}); close it "
                "and reopen on a restarted group"
            )

    def _refuse_torn(self) -> None:
        """``TierIOError`` once an update round left the shards a step apart (``_record_torn``)."""
        if self._torn_update is not None:
            raise TierIOError(
                errno.EIO,
                f"rank {self.rank}: this sharded store refuses further calls: {self._torn_update}",
            )

    def _enter(self, kind: str) -> None:
        """Start this rank's collective round of ``kind``: refused before any collective once an
        update round left the shards a step apart, so that a call queued before that round ended
        (its caller interrupted, by Ctrl-C) is refused as the other ranks refuse theirs, and
        once a round failed (the group is broken)."""
        self._refuse_torn()
        self._refuse_failed()
        self._heartbeat.enter(kind)

    def _shutdown(self, deadline: float | None = None) -> bool:
        """Stop the threads, close the shard, destroy a group this store created, waiting until
        ``deadline`` (``time.monotonic()``; None: ``sharding.timeout_s`` from now); False when
        the shard's close left calls under way."""
        # after a failure a collective may still be stuck on the dead or silent rank until the
        # backend's own timeout (``sharding.timeout_s`` for a group this store made) ends it
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        if self._thread is not None:
            self._thread.close(seconds_left(deadline))
        if self._heartbeat is not None:
            self._heartbeat.close()
        closed_in_time = True
        if self.local is not None:  # a lookup of the stuck collective may still read the shard
            closed_in_time = self.local.close(wait_s=seconds_left(deadline))
        if self.owns_subgroup and self._failure is None:
            dist.destroy_process_group(self.group)
        _OPEN.discard(self)
        if self.owns_group and self._failure is not None:
            _ENV_GROUP.failed = True  # a reopen needs the ranks restarted
        if self.owns_group and dist.is_initialized() and not _OPEN and _ENV_GROUP.failed:
            # a sound group stays for the next store of this process (and goes at exit): were it
            # destroyed here, a rank reopening at once joined the old rendezvous, still up on a
            # rank not yet through its own close
            dist.destroy_process_group()
            _ENV_GROUP.group, _ENV_GROUP.failed = None, False
        return closed_in_time


def _backend_error(exc: BaseException) -> str:
    """A backend's error (torch's, gloo's) as a failure's detail: its type and first line.

    >>> _backend_error(RuntimeError())
    'RuntimeError'
    """
    first = str(exc).splitlines()[:1]
    return f"{type(exc).__name__}: {first[0][:300]}" if first else type(exc).__name__


# the call whose round of a kind failed, as a failure names it (``Heartbeat.kind``: the others')
_ROUND_CALLS = {"update": "update_rows"}


def _ranks_digest(group: dist.ProcessGroup) -> str:
    """A short digest of the group's global ranks: the same on each of them, another group's
    differs unless it has the same ranks."""
    ranks = ",".join(map(str, dist.get_process_group_ranks(group)))
    return hashlib.sha256(ranks.encode()).hexdigest()[:16]


def _disagreeing(asked: list[tuple[int | None, int | None]]) -> list[str | None]:
    """Per rank, why its (gradient width, step) of an update round disagrees with the first
    rank that sent gradients (width) and with rank 0 (step); None where it agrees.

    >>> _disagreeing([(None, 2), (4, 2), (6, 3)])[:2]
    [None, None]
    >>> _disagreeing([(None, 2), (4, 2), (6, 3)])[2]  # doctest: +ELLIPSIS
    'gradients of width 6 and step 3; rank 1 sent width 4, rank 0 step 2: expected one width...'
    """
    refused = [isinstance(s, str) and s.endswith(_REFUSED) for _, s in asked]
    if any(refused):  # a rank refused its own input: it alone is named
        return ["its gradients or step were refused there (see its own error)" if r else None for r in refused]  # fmt: skip
    senders = [r for r, (w, _) in enumerate(asked) if w is not None]
    first = senders[0] if senders else 0
    width, step = asked[first][0], asked[0][1]
    return [
        None
        if (w is None or w == width) and s == step
        else f"gradients of width {w} and step {s}; rank {first} sent width {width}, rank 0 "
        f"step {step}: expected one width and one step on every rank"
        for w, s in asked
    ]


# what became of a write round that failed on some shards (TieredStore.write)
_FAILED_WRITE = (
    "the other ranks' shards took their rows, and a failed shard's write applied whole or not "
    "at all: look its rows up to tell which. The next commit() makes what the shards hold "
    "durable, as it is; to drop this round instead, close every rank's store without committing "
    "(each shard reopens at its last commit: every write since is dropped)"
)
_WROTE, _LOST, _UNKNOWN = "wrote", "lost", "unknown"  # a shard's write of an update round
_REFUSED = " (refused)"  # the step a rank passes into a round it refused its own input to
_NO_GRADIENTS = (torch.empty(0, dtype=torch.int64), torch.empty((0, 0), dtype=torch.float32))


def _refused(step: Any) -> str:
    """The step a rank that refused its input passes into the round: no rank passes it."""
    return f"{step!r}{_REFUSED}"


def _in_round(what: str, entered: int) -> str:
    """``what`` (a call) and the store's collective round it came in: the heartbeat's count of
    rounds entered, of every kind (the number the ranks' liveness compares), not of ``what``'s.

    >>> _in_round("commit", 4)
    'commit in collective round 4 (lookups, writes, updates and commits counted)'
    >>> _in_round("open", 0)
    'open (before the first collective round)'
    """
    if entered == 0:
        return f"{what} (before the first collective round)"
    return f"{what} in collective round {entered} (lookups, writes, updates and commits counted)"


def _ranks_by_value(values: list[Any]) -> str:
    """Each distinct value with the ranks that passed it, in rank order.

    >>> _ranks_by_value([9, None, None])
    'rank 0: 9; ranks 1, 2: None'
    """
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(str(value), []).append(rank)
    return "; ".join(f"{ranks_named(ranks)}: {value}" for value, ranks in groups.items())


def staged_decided(
    committed: list[int],
    staged: list[int | None],
    rounds: list[tuple[str | None, str | None] | None],
) -> list[bool]:
    """Whether each shard commits what a two-phase commit left staged on it (False: drops it,
    or nothing is staged), from every shard's committed and staged step and its (staged, last
    committed) round ids (``RowDelta.commit_rounds``; None: a shard never written). Staged
    with its round R: committed when some shard committed R or every shard staged or committed
    R (every shard had staged it: decided), so a redone step staged on a shard already at it
    (after a torn commit) is too; else dropped. Staged without a round (a release before
    them): as ``staged_outcome``.

    >>> staged_decided([2, 2], [None, 2], [(None, "r"), ("r", None)])  # a redo, killed
    [False, True]
    >>> staged_decided([1, 2], [2, 2], [("r", None), ("r", None)])  # every shard staged it
    [True, True]
    >>> staged_decided([1, 2], [None, 2], [(None, None), ("r", None)])  # rank 0 did not stage
    [False, False]
    """
    staged_rounds = [None if r is None else r[0] for r in rounds]
    committed_rounds = [None if r is None else r[1] for r in rounds]
    steps = staged_outcome(committed, staged)

    def decided(rank: int) -> bool:
        """Whether the shard of ``rank`` commits its staged step."""
        if staged[rank] is None:
            return False
        mine = staged_rounds[rank]
        if mine is None:  # staged by a release before rounds: by the steps
            return steps[rank] != committed[rank]
        held = [mine in (s, c) for s, c in zip(staged_rounds, committed_rounds, strict=True)]
        return mine in committed_rounds or all(held)

    return [decided(rank) for rank in range(len(committed))]


def staged_outcome(committed: list[int], staged: list[int | None]) -> list[int]:
    """The step each shard ends at once what a two-phase commit left staged is resolved, from
    every shard's committed and staged step (staged by a release before round ids:
    ``staged_decided`` reads those first): a shard's staged step S is committed (rolled
    forward) when some shard committed S or every shard staged or committed it (every shard had
    staged it: it was decided); else (some shard neither staged nor committed S, so none can
    have committed it) it is dropped, as is one at or below its shard's committed step (a
    redone step: ``staged_decided`` tells it by its round).

    >>> staged_outcome([2, 1], [None, 2])  # rank 1 killed before committing: rolled forward
    [2, 2]
    >>> staged_outcome([1, 1], [2, None])  # rank 1 killed before staging: dropped
    [1, 1]
    >>> staged_outcome([1, 1, 1], [2, 2, 2])  # killed once every shard had staged
    [2, 2, 2]
    """

    def decided(step: int | None, last: int) -> bool:
        """Whether a shard at ``last`` with ``step`` staged commits it."""
        if step is None or step <= last:
            return False
        held = [c == step or t == step for c, t in zip(committed, staged, strict=True)]
        return step in committed or all(held)

    return [s if decided(s, c) else c for c, s in zip(committed, staged, strict=True)]


def _torn_steps(steps: list[int | None]) -> list[int] | None:
    """Every shard's committed step when they differ (a torn commit); None when they agree."""
    return list(steps) if len(set(steps)) > 1 else None


def _torn_message(rank: int, steps: list[int]) -> str:
    """What a rank says when it opened shards at different committed steps.

    >>> _torn_message(1, [1, 2])  # doctest: +ELLIPSIS
    'rank 1: the shards were committed at different steps (rank 0: 1; rank 1: 2): a commit...'
    """
    return (
        f"rank {rank}: the shards were committed at different steps ({_ranks_by_value(steps)}): "
        "a commit was interrupted after some ranks had committed (by a version before the "
        "two-phase commit), or shards were committed one by one, so lookups mix steps; "
        f"committed_step is the oldest, {min(steps)}, on every rank: resume from it and redo the "
        "later steps on every rank (a shard already at or past a redone step commits it again, at "
        "its own step)"
    )


# the keys of an open's fingerprint (``ShardedStore._fingerprint``): always, and of a shard opened
_PRINT_KEYS = (
    "protocol",
    "shard",
    "error",
    "heartbeat",
    "committed_step",
    "staged_step",
    "commit_rounds",
    "world",
    "config",
)
_SHARD_KEYS = ("shard_rank", "run", "map", "rows")


def check_fingerprints(prints: list[dict[str, Any]], world: int) -> ShardMap:
    """The shard map every rank agrees on; else ShardMismatchError naming the rank and shard."""
    for rank, doc in enumerate(prints):  # before any other key is read: another protocol's
        theirs = doc.get("protocol") if isinstance(doc, dict) else None
        if theirs != PROTOCOL_VERSION:
            said = "none (a release before protocol versions)" if theirs is None else repr(theirs)
            raise ShardMismatchError(
                f"rank {rank}: its open's fingerprint has protocol version {said}, this rank's is "
                f"{PROTOCOL_VERSION}; expected one protocol version on every rank: rank {rank} "
                "runs another release of tiered-store than this rank (install one release on "
                "every rank)"
            )
    for rank, doc in enumerate(prints):  # before any key is read: a rank of another release
        expected = {*_PRINT_KEYS, *(_SHARD_KEYS if doc.get("error") is None else ())}
        lacks, more = sorted(expected - set(doc)), sorted(set(doc) - expected)
        if lacks or more:
            raise ShardMismatchError(
                f"rank {rank}: its open's fingerprint lacks {', '.join(lacks) or 'no key'}, has "
                f"{', '.join(more) or 'no key'} more; expected the keys of this release's: rank "
                f"{rank} runs another release of tiered-store than this rank (install one release "
                "on every rank)"
            )
    first = prints[0]
    for rank, doc in enumerate(prints):  # the configs first: they say which shards to open
        if doc["config"] != first["config"]:
            raise ShardMismatchError(
                f"rank {rank}: config {doc['config']} differs from rank 0's {first['config']}; "
                "expected every rank to open the same store YAML"
            )
    ranks = first["config"]["ranks"]
    if ranks != world:
        raise ShardMismatchError(
            f"sharding.ranks is {ranks} but the process group has {world} ranks; expected "
            "one shard per rank"
        )
    for rank, doc in enumerate(prints):
        shard = doc["shard"]
        if doc["error"] is not None:
            raise ShardMismatchError(f"rank {rank}: cannot open its shard {shard}: {doc['error']}")
        cut_for = len(doc["map"]["bounds"]) - 1
        if cut_for != world:
            raise ShardMismatchError(
                f"rank {rank}: shard {shard} is one of {cut_for} shards, but the process group "
                f"has {world} ranks; expected shards cut for {world} (`tiered-store shard --ranks "
                f"{world}`)"
            )
        if doc["map"]["by"] != doc["config"]["by"]:
            raise ShardMismatchError(
                f"rank {rank}: shard {shard} is cut by {doc['map']['by']!r} but sharding.by is "
                f"{doc['config']['by']!r}; expected shards made with --by {doc['config']['by']}"
            )
        if doc["shard_rank"] != rank:
            raise ShardMismatchError(
                f"rank {rank}: shard {shard} is shard {doc['shard_rank']} of its set; expected "
                f"shard {rank}"
            )
        for key, what in (("map", "shard map / table version"), ("rows", "row layout")):
            if doc[key] != first[key]:
                raise ShardMismatchError(
                    f"rank {rank}: shard {shard} has {what} {doc[key]}, but rank 0's shard "
                    f"{first['shard']} has {first[key]}; expected shards cut from the same table "
                    "version by one `tiered-store shard` run"
                )
        if doc["run"] != first["run"]:  # one map, two runs: not a torn commit, a mixed set
            theirs = f"rank 0's shard {first['shard']}"
            raise ShardMismatchError(
                f"rank {rank}: shard {shard} {mixed_runs(doc['run'], first['run'], theirs)}"
            )
    return ShardMap.from_json(first["map"], first["shard"])


def init_process_group_from_env(sharding: ShardingConfig, device: str) -> bool:
    """Initialise the default process group from torchrun's environment unless one exists; True
    if it is one this function made (now or for an earlier store: it outlives the stores, until
    the process exits)."""
    if dist.is_initialized():
        return _ENV_GROUP.group is dist.group.WORLD
    _check_environment()
    if device.startswith("cuda"):  # without CUDA: a ConfigError naming the setting, not torch's
        compute_device(device)
    backend = sharding.backend
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "sharding.backend: 'nccl' but CUDA is not available here; expected 'gloo' (or "
            "'auto': gloo for a hot tier on the CPU)"
        )
    if backend == "nccl" or device.startswith("cuda"):  # a node's ranks: each on its own GPU
        torch.cuda.set_device(
            local_gpu(os.environ.get("LOCAL_RANK", "0"), torch.cuda.device_count())
        )
    dist.init_process_group(backend, timeout=timedelta(seconds=sharding.timeout_s))
    _ENV_GROUP.group = dist.group.WORLD
    return True


def _check_environment() -> None:
    """Refuse to open without a process group or torchrun's environment, naming what is unset."""
    if dist.is_initialized():
        return
    missing = [
        k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in os.environ
    ]
    if missing:
        raise ConfigError(
            f"no torch.distributed process group and {', '.join(missing)} not set; expected to "
            "run under torchrun, or after torch.distributed.init_process_group"
        )


def _check_group(group: Any) -> None:
    """Refuse a ``group`` that is neither None nor a process group holding this rank."""
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group gives a rank outside it
        raise ConfigError(
            f"group: this process (rank {dist.get_rank()} of the default group) is not one of "
            "its ranks (dist.new_group gives the ranks outside it "
            "GroupMember.NON_GROUP_MEMBER); expected a group holding this rank, or None (all "
            "ranks)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ConfigError(
            f"group: got {type(group).__name__} {group!r}; expected a torch.distributed "
            "ProcessGroup (dist.new_group(ranks)), or None (all ranks)"
        )


def local_gpu(local_rank: str, visible: int) -> int:
    """The GPU a node's rank ``local_rank`` uses among the ``visible`` ones: its own, or the only
    one when each rank is given one (a per-rank ``CUDA_VISIBLE_DEVICES``)."""
    try:
        rank = int(local_rank)
    except ValueError:
        raise ConfigError(
            f"LOCAL_RANK={local_rank!r} is not an integer; expected torchrun's"
        ) from None
    if visible == 1 or 0 <= rank < visible:
        return 0 if visible == 1 else rank
    raise ConfigError(
        f"LOCAL_RANK={rank} but this process sees {visible} GPU(s) "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); expected one "
        "GPU per rank of the node: as many visible as the node's ranks, or one per process"
    )


def _destroy_env_group() -> None:
    """At exit: destroy the default group made from the environment, if it is still up."""
    if dist.is_initialized() and dist.group.WORLD is _ENV_GROUP.group:
        dist.destroy_process_group()


def _end_rounds_at_exit() -> None:
    """At exit, before the group is destroyed: each open store's rounds queued fail and the one
    under way ends first, up to ``prefetch.EXIT_WAIT_S`` (``CollectiveThread.end_at_exit``), the
    deadline the prefetch hook's wait ends by too (``prefetch.exit_deadline``)."""
    deadline = prefetch_module.exit_deadline()
    for store in list(_OPEN):
        if store._thread is not None:
            store._thread.end_at_exit(deadline)


atexit.register(_destroy_env_group)
atexit.register(_end_rounds_at_exit)  # registered last, it runs first


def _queued_on(ids: torch.Tensor) -> torch.cuda.Event | None:
    """For ids on the GPU, an event on the caller's stream after the work that made them."""
    if not ids.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(ids.device))
    return event

"""Online re-pinning of a ``zipf-tuned`` tier: count episodes while serving, re-pin periodically.

A tier's lookups are counted in *episodes*: each row once per window of ``recency_window``
lookups (ended at a batch boundary). Where a row is counted depends on whether the tier holds it:

- **Hits** are counted per slot, exactly: a count and a window stamp per slot (8 bytes; one pass
  over the hit slots, in numba on the CPU, torch on CUDA). A re-pin ranks resident rows by these
  counts, so it needs no estimate.
- **Misses**: a full window adds one episode per distinct row to a count-min sketch
  (:class:`tiered_store.online_profile.OnlineProfile`, sized from the tier: 4 rows of
  ``sketch_width x capacity`` float32 counters, rounded up to a power of two, at least 16:
  32-64 bytes per slot at the default width 2, 256 bytes at the least, never per table row),
  conservatively (a row's counters are
  raised to their minimum plus the episode, so collisions inflate estimates less).
- A row **admitted** starts its slot's count from its sketch estimate (plus the episode of the
  miss that brought it, unless the sketch has counted that window already); a row **evicted**
  raises its sketch counters to its slot's count (a conservative update: a row's estimate is
  at least what it was counted while resident, and a second fold of the same count adds
  nothing). So a row's count survives eviction, and the sketch sees only misses: on a tier
  whose lookups nearly all hit, counting costs one pass over the hit slots. Each is one numba
  pass on the CPU, torch ops on CUDA.
- A **quiet** tier, whose rows stayed put (no admission or eviction) ``QUIET_AFTER`` windows in
  a row, samples its windows until rows come or go again: one window in a period that doubles
  as the quiet spell grows (at most half the spell so far, at most ``quiet_sample``), each
  counted window weighted by the windows it stands for (itself and those skipped since the last
  counted one). It re-pins nothing meanwhile, so its counts wait for the next eviction, and an
  all-hit tier spends little on them.

The lookup path only keeps each batch's hit slots and misses (references, no copy) for the open
window (:meth:`OnlineRepin.count`); the counting side applies the updates in the order they
happened (the hits are handed on before each admission or eviction, and at the window's end): at
once in replay (deterministic), or, when ``deferred``, queued for the store's background thread,
so every count and sketch write of the tier is on that thread (at most ``MAX_PENDING_WINDOWS``
windows wait; the next window's hits and misses are then not queued, counted in
``windows_dropped``, so lookups never wait on the counting).

Every ``every`` lookups (by default one window) in which rows came or went (a tier that holds all
it is asked for evicts nothing, so pins change nothing there) the tier is re-pinned among the rows
it already holds (frequent rows are resident through the recency segment, so nothing is read from
cold): the resident rows are ranked by their slot counts (which, when an offline profile was
given, start from its episodes times ``prior_weight``, seeded into the sketch), the pinned segment
aims at the top ``target`` of them, and at most ``budget`` rows move in (the top-counted unpinned
residents) and out (the lowest pinned rows) per re-pin; rows the tier above pins (hot, over
warm) are left out (:meth:`OnlineRepin.pinned_above`: lookups of them never reach this tier).
``target`` follows zipf-tuned's split rule: the offline profile's when one was given, else the
tier minus the measured mean distinct rows per window (at most half the tier). Past counts decay
by ``decay`` per interval of ``every`` lookups since they were made, whether or not a re-pin ran
(each update carries the interval its batch began in): new episodes are added with a weight
growing by ``1 / decay`` instead (no pass over the counters), renormalised when the weight gets
large.

:meth:`OnlineRepin.plan` (two passes over the slots' counts) reads the tier and changes
nothing; :meth:`tiered_store.row_cache.RowCache.apply_repin` flips the pin flags of the chosen
slots (checked to still hold the planned rows). Replay runs both at the batch boundary that
completes an interval; the live store plans in its background thread and only the apply runs
under its lock.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import RepinConfig
from .online_profile import OnlineProfile
from .profile import FrequencyProfile

__all__ = ["OnlineRepin", "RepinMoves"]

RENORMALISE_AT = 1e20  # window weight above which the sketch is divided back to weight 1
FORGET_AFTER = 1e30  # decay past which counts are forgotten (renormalised to about 0)
MAX_PENDING_WINDOWS = 8  # windows queued for the counting before the next one is dropped
QUIET_AFTER = 4  # windows in a row without an admission or eviction: the tier is quiet
SLOT_STATE_BYTES = 8  # per slot: the held row's count (float32) and its window stamp (int32)
PLAN_KEY_BYTES = 2  # per slot, on the CPU: a plan's 16-bit key (sketch_kernel.repin_candidates)
COUNT_DTYPE = torch.float32  # the sketch's counters: weighted (decayed) episodes


@dataclass
class RepinMoves:
    """Slots to pin and to unpin, with the rows they held when planned (to check at apply)."""

    pin_slots: torch.Tensor
    pin_rows: torch.Tensor
    unpin_slots: torch.Tensor
    unpin_rows: torch.Tensor


@dataclass(frozen=True)
class SavePoint:
    """The moment a warm restart saves the counts as of (:meth:`OnlineRepin.save_point`)."""

    queued: int  # updates queued before it (those the saved counts include)
    clock: int  # the lookup side's lookups so far, and since the last re-pin
    since_repin: int
    row_of_slot: torch.Tensor  # a copy: each slot's row then (-1: free)


class OnlineRepin:
    """One tier's online episode counts and re-pin schedule.

    Parameters
    ----------
    capacity : int
        Slots of the tier (sizes the sketch).
    config : RepinConfig
        ``every``, ``budget``, ``decay``, ``prior_weight``, ``sketch_width``.
    window : int
        Lookups per episode window (the tier's ``recency_window``).
    device : torch.device or str
        Where the tier's metadata (and so the counters) lives.
    deferred : bool
        Queue the updates for :meth:`count_pending` (the store's background thread) instead of
        applying them at once (replay).

    Examples
    --------
    A tier of 8 slots holding rows 5 and 1 (slots 0 and 1); a window of 3 lookups:

    >>> from tiered_store.config import RepinConfig
    >>> r = OnlineRepin(8, RepinConfig(every=6, budget=2), window=3)
    >>> r.admitted(torch.tensor([0, 1]), torch.tensor([5, 1]), looked_up=False)
    >>> r.count(torch.tensor([0, 0, 1]), torch.tensor([], dtype=torch.int64), lookups=3)
    >>> r.count(torch.tensor([0]), torch.tensor([2, 2]), lookups=3)  # row 2 missed twice
    >>> r.due, r.slot_count[:2].tolist(), r.profile.estimates(torch.tensor([2])).tolist()
    (True, [2.0, 1.0], [1.0])
    >>> row_of_slot = torch.tensor([5, 1, -1, -1, -1, -1, -1, -1])
    >>> moves = r.plan(row_of_slot, torch.zeros(8, dtype=torch.bool))
    >>> moves.pin_rows.tolist(), moves.unpin_rows.tolist()  # the budget: 2 rows
    ([5, 1], [])
    """

    def __init__(
        self,
        capacity: int,
        config: RepinConfig,
        *,
        window: int,
        device: torch.device | str = "cpu",
        deferred: bool = False,
        offline_profile: str | None = None,
    ) -> None:
        self.capacity = int(capacity)
        self.offline_profile = offline_profile  # which offline profile seeds it (a warm restart)
        self.every = config.every
        self.budget = config.budget
        self.decay = config.decay
        self.prior_weight = config.prior_weight
        self.quiet_sample = config.quiet_sample
        self.window = int(window)
        self.device = torch.device(device)
        self.profile = OnlineProfile(
            max(1, self.capacity),
            width_factor=config.sketch_width,
            heavy_hitters=False,
            dtype=COUNT_DTYPE,
            device=self.device,
        )
        self.weight = 1.0  # what one episode adds: 1 / decay ** intervals (renormalised)
        self.offline_target: int | None = None  # pinned rows by the offline profile's rule
        # per slot, side by side (a hit touches one 8-byte pair): the held row's episodes
        # (float32, decay-weighted) and the window it was last counted in (int32)
        self._per_slot = torch.zeros((self.capacity, 2), dtype=torch.int32, device=self.device)
        self.slot_count = self._per_slot.view(torch.float32)[:, 0]
        self.slot_stamp = self._per_slot[:, 1]
        self.slot_stamp.fill_(-1)
        # a plan's scratch on the CPU: a 16-bit key per slot (see sketch_kernel.repin_candidates)
        cpu = self.device.type == "cpu"
        self._plan_keys = np.empty(self.capacity if cpu else 0, dtype=np.uint16)
        # the lookup side: the open window, its lookups so far, the last batch's window
        self.window_no = 0
        self._in_window = 0
        self._batch_window = 0
        # the counting side: windows up to the last whose misses the sketch has counted, the open
        # window's misses and distinct hits
        self.counted_through = 0
        self._misses: list[torch.Tensor] = []
        self._hits_distinct: int | torch.Tensor = 0
        # the lookup side's open window: hit slots not handed on yet, and misses (references)
        self._hit_parts: list[torch.Tensor] = []
        self._miss_parts: list[torch.Tensor] = []
        self.deferred = deferred
        # updates waiting for count_pending(), in the order they happened (see _apply)
        self.pending: deque[tuple] = deque()
        self._queued_total = self._applied_total = 0  # updates ever queued, applied or dropped
        # window ends queued and applied: each written by one thread (the lookups, the counting)
        self._ends_queued = self._ends_applied = 0
        # what the open window's episodes weigh, times ``weight``: 0 when it is not counted
        # (a backlog, or a quiet window sampled out), else the windows it stands for (1, or more
        # for a quiet tier's sampled window: itself and those skipped before it)
        self._scale = 1
        self._backlog = False  # the open window is dropped: the background count fell behind
        self._skipped = 0  # quiet windows sampled out since the last counted one
        self._counting = threading.Lock()  # one thread applies ``pending`` at a time
        self.windows_dropped = 0  # windows not counted: the background count fell behind
        self.since_repin = 0  # lookups since the last re-pin, less its whole intervals
        # the decay's clock (lookup side): lookups so far (congruent to since_repin modulo
        # ``every``), and the interval of ``every`` lookups the batch counted last began in
        self._clock = self._interval = 0
        self._weight_interval = 0  # the counting side: the interval ``weight`` is of
        # admissions and evictions (lookup side): so far, at the last re-pin, at the window's start
        self._changes = self._changes_at_repin = self._changes_at_window = 0
        self.quiet_windows = 0  # windows in a row that ended without an admission or eviction
        # slots holding rows the tier above pins, and those rows: plans leave them out (a plan
        # reads them off the store's lock, a warm restart's thread sets them under it)
        none = torch.empty(0, dtype=torch.int64, device=self.device)
        self._above = (none, none)
        self._above_lock = threading.Lock()
        self.repins = 0
        self.rows_pinned = 0  # rows moved into the pinned segment by re-pins, in all
        self.rows_unpinned = 0

    @property
    def due(self) -> bool:
        """An interval of ``every`` lookups has passed since the last re-pin, and rows came or
        went since (pins only decide which rows an eviction takes: a tier whose rows stayed put,
        such as one that holds all it is asked for, waits for the next admission)."""
        return self.since_repin >= self.every and self._changes != self._changes_at_repin

    @property
    def windows_queued(self) -> int:
        """Full windows queued for :meth:`count_pending` and not applied yet (counted ones: a
        window not counted queues no end)."""
        return self._ends_queued - self._ends_applied

    @property
    def nbytes(self) -> int:
        """Bytes held for good: the sketch, a count and a stamp per slot, a plan's scratch (the
        lookups' hit slots and misses are held besides until counted: 8 B a lookup, at most
        ``MAX_PENDING_WINDOWS + 1`` windows)."""
        return self.profile.nbytes + self._per_slot.nbytes + self._plan_keys.nbytes

    @property
    def bytes_per(self) -> dict[str, int]:
        """:attr:`nbytes` as :meth:`bytes_for` splits it, read off what this state holds."""
        per_slot = (self._per_slot.nbytes + self._plan_keys.nbytes) // max(1, self.capacity)
        return {"per_slot": per_slot, "per_tier": self.profile.nbytes}

    @staticmethod
    def bytes_for(capacity: int, sketch_width: int, device: torch.device | str = "cpu") -> dict:
        """Bytes the state of a tier of ``capacity`` slots re-pinning with ``repin.sketch_width``
        ``sketch_width`` holds for good (:attr:`nbytes`), without building it: ``per_slot`` (a
        count and a stamp, and on the CPU a plan's key) and ``per_tier`` (the sketch, 4 rows of
        ``sketch_width x capacity`` float32 counters rounded up to a power of two).

        Examples
        --------
        >>> from tiered_store.config import RepinConfig
        >>> OnlineRepin.bytes_for(1000, 2)  # 10 B a slot, 4 x 2,048 x 4 B sketch
        {'per_slot': 10, 'per_tier': 32768}
        >>> OnlineRepin.bytes_for(2, 2)["per_tier"]  # 4 x 16 x 4 B: a sketch row's least
        256
        >>> r = OnlineRepin(1000, RepinConfig(sketch_width=2), window=64)
        >>> r.bytes_per, r.nbytes == 1000 * 10 + 32768
        ({'per_slot': 10, 'per_tier': 32768}, True)
        """
        cpu = torch.device(device).type == "cpu"
        sketch = OnlineProfile.bytes_for(
            max(1, int(capacity)), width_factor=sketch_width, heavy_hitters=False, dtype=COUNT_DTYPE
        )
        return {"per_slot": SLOT_STATE_BYTES + (PLAN_KEY_BYTES if cpu else 0), "per_tier": sketch}

    # -- the lookup side: each update applied at once (replay) or queued in order (the store) ----
    def count(self, hit_slots: torch.Tensor, miss_ids: torch.Tensor, *, lookups: int) -> None:
        """Count one batch of the tier's lookups: ``hit_slots`` (the slots of its hits) per slot,
        ``miss_ids`` in the sketch once the window of ``lookups`` is full. Duplicates count once
        per window either way. Both are kept by reference until counted (the caller does not
        write them again; the lookup path passes tensors it made for the batch); the hits are
        handed on before an admission or eviction (their order matters) and at the window's
        end, so a window that only hits is one update."""
        window = self._batch_window = self.window_no
        self._interval = self._clock // self.every  # its updates weigh as of the lookups before
        self._clock += lookups
        if self._scale:
            if hit_slots.numel():
                self._hit_parts.append(hit_slots)
            if miss_ids.numel():
                self._miss_parts.append(miss_ids)
        self._in_window += lookups
        self.since_repin += lookups
        if self._in_window >= self.window:  # the window ends with this batch
            self._hand_on_hits()
            if self._scale:  # a window not counted leaves nothing to do at its end
                self._apply(("end", window, self._miss_parts, self._weighs))
            self._miss_parts = []
            self.windows_dropped += self._backlog
            if not self._backlog:  # a counted window stood for those skipped before it
                self._skipped = 0 if self._scale else self._skipped + 1
            changed = self._changes != self._changes_at_window
            self.quiet_windows = 0 if changed else self.quiet_windows + 1
            self._changes_at_window = self._changes
            self.window_no += 1
            self._in_window = 0
            self._next_scale()

    def _next_scale(self) -> None:
        """What the window beginning now weighs: dropped behind a backlog; while the tier is quiet
        (its rows stayed put ``QUIET_AFTER`` windows in a row, so no re-pin is due and counts
        wait for the next change), one window in a period of the largest power of two at most
        half the quiet spell (and at most ``quiet_sample``), standing for itself and the windows
        skipped since the last counted one."""
        self._backlog = self.deferred and self.windows_queued >= MAX_PENDING_WINDOWS
        if self._backlog:
            self._scale = 0
        elif self.quiet_windows >= QUIET_AFTER and self.quiet_sample > 1:
            period = min(self.quiet_sample, 1 << (self.quiet_windows // 2).bit_length() - 1)
            self._scale = 0 if self.window_no % period else 1 + self._skipped
        else:
            self._scale = 1

    def _changed(self) -> None:
        """A row came or went: hand on the hits so far (at the window's weight), and count the
        rest of a sampled window as one window (the quiet spell is over)."""
        self._changes += 1
        self._hand_on_hits()
        if not self._backlog:
            self._scale, self._skipped = 1, 0

    @property
    def batch_window(self) -> int:
        """The window of the batch counted last (the one its admissions belong to)."""
        return self._batch_window

    def admitted(
        self, slots: torch.Tensor, rows: torch.Tensor, *, looked_up: bool, window: int | None = None
    ) -> None:
        """``rows`` now held in ``slots`` (``looked_up``: admitted after a miss of a batch, of
        window ``window``: by default the batch counted last; the store admits a batch's misses
        once read outside its lock, when later batches may have begun another window). Rows
        that lookups missed in the open window meanwhile count its episode too: the sketch
        counts those misses at the window's end, after it took their slots' counts."""
        if not slots.numel():
            return
        self._changed()
        if not looked_up:
            window = None
        elif window is None:
            window = self._batch_window
        if window != self.window_no and self._miss_parts:  # a window began since (or a restore)
            late = torch.isin(rows, torch.cat(self._miss_parts).to(rows.device))
            if bool(late.any()):
                self._apply(("admit", slots[late], rows[late], self.window_no, self._weighs))
                slots, rows = slots[~late], rows[~late]
        if slots.numel():
            self._apply(("admit", slots, rows, window, self._weighs))

    def evicted(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows`` leave ``slots``."""
        if slots.numel():
            self._changed()
            self._apply(("evict", slots, rows, self.window_no, self._weighs))

    def _hand_on_hits(self) -> None:
        """Apply (or queue) the hits kept since the last hand-on."""
        if self._hit_parts:
            self._apply(("hits", self._hit_parts, self.window_no, self._weighs))
            self._hit_parts = []

    def _apply(self, update: tuple) -> None:
        """Apply an update now, or queue it for :meth:`count_pending` when ``deferred``."""
        if self.deferred:
            self._ends_queued += update[0] == "end"
            self._queued_total += 1
            self.pending.append(update)
        else:
            self._run(update)

    @property
    def _weighs(self) -> tuple[int, int]:
        """What an update made now weighs: the decay interval of the batch counted last, and the
        windows its episodes stand for (``_scale``)."""
        return self._interval, self._scale

    @property
    def queued_total(self) -> int:
        """Updates queued so far (applied or not): a mark for :meth:`count_pending`."""
        return self._queued_total

    def count_pending(self, through: int | None = None) -> None:
        """Apply the updates a deferred tier queued, in order (the store's background thread);
        with ``through`` (a :attr:`queued_total` read earlier, with a snapshot of the tier) only
        those queued before it (none, where another caller applied them since)."""
        with self._counting:
            self._count_first(
                len(self.pending) if through is None else through - self._applied_total
            )

    def _count_first(self, n: int) -> None:
        """Apply the first ``n`` queued updates (fewer if fewer are queued); holds the counting
        lock."""
        for _ in range(n):
            if not self.pending:
                return
            self._run(self.pending[0])
            self.pending.popleft()  # removed once applied: empty means all were
            self._applied_total += 1

    def drop_pending(self) -> None:
        """Forget the updates queued so far (after a failed count: rows admitted meanwhile count from
        0). Called off the store's lock: the lookups only append to the queue and this takes from
        its front, as :meth:`count_pending` does, so its wait for the counting lock (a save
        copying the sketch) holds no lookup up; updates queued meanwhile are kept."""
        with self._counting:
            dropped = [self.pending.popleft() for _ in range(len(self.pending))]
            self._applied_total += len(dropped)
            self._ends_applied += sum(update[0] == "end" for update in dropped)
            self._misses, self._hits_distinct = [], 0
            admitted = [update[1] for update in dropped if update[0] == "admit"]
            if admitted:  # their slots held other rows before: those counts are not theirs
                slots = torch.cat(admitted).to(self.device)  # (out of memory: the queue is empty)
                self.slot_count[slots] = 0
                self.slot_stamp[slots] = -1

    # -- the counting side -----------------------------------------------------------------------
    def _run(self, update: tuple) -> None:
        """Apply one update to the slot counts and the sketch."""
        kind = update[0]
        interval, scale = update[-1]  # every update ends with what its episodes weigh
        step = self._weight_at(interval) * scale
        if kind == "hits":  # an episode for each slot first hit in its window
            _, parts, window, _ = update
            slots = parts[0] if len(parts) == 1 else torch.cat(parts)
            self._hits_distinct += self._count_hits(slots.to(self.device), _stamp(window), step)
        elif kind == "end":  # the window's misses into the sketch, once per distinct row
            _, window, misses, _ = update
            self._misses.extend(m.reshape(-1).to(self.device) for m in misses)
            none = torch.empty(0, dtype=torch.int64, device=self.device)
            misses = torch.cat(self._misses) if self._misses else none
            distinct = int(self._hits_distinct)
            self.profile.update(misses, weight=step, distinct_elsewhere=distinct)
            self._misses, self._hits_distinct = [], 0
            self.counted_through = window + 1
            self._ends_applied += self.deferred
        elif kind == "admit":  # from the sketch's estimate, plus the miss's episode if uncounted
            _, slots, rows, window, _ = update
            extra = step if window is not None and self.counted_through <= window else 0.0
            stamp = -1 if window is None else _stamp(window)
            if self.device.type == "cpu":  # one numba pass
                from .sketch_kernel import slots_admitted  # noqa: PLC0415 (imports numba)

                args = (_int64(slots), _int64(rows), stamp, extra)
                slots_admitted(self._per_slot.numpy(), *self.profile.numpy_sketch(), *args)
            else:
                args = (self.profile, slots, rows, stamp, extra)
                admitted_torch(self.slot_count, self.slot_stamp, *args)
        else:  # evict: raise the rows' counters to their counts; an episode of the open window
            _, slots, rows, window, _ = update  # stays with that window's misses (counted once)
            if self.device.type == "cpu":  # one numba pass
                from .sketch_kernel import slots_evicted  # noqa: PLC0415 (imports numba)

                args = (_int64(slots), _int64(rows), _stamp(window), step)
                in_window = torch.from_numpy(
                    slots_evicted(self._per_slot.numpy(), *self.profile.numpy_sketch(), *args)
                )
            else:
                args = (self.profile, slots, rows, _stamp(window), step)
                in_window = evicted_torch(self.slot_count, self.slot_stamp, *args)
            if step:  # a window not counted keeps none of its misses
                self._misses.append(rows[in_window].to(self.device))

    def _weight_at(self, interval: int) -> float:
        """What one episode of decay interval ``interval`` adds (updates come in order): the
        weight divided by ``decay`` once per interval begun since the last update, whether or not
        a re-pin ran, and renormalised past ``RENORMALISE_AT``."""
        self.weight *= self._growth(interval - self._weight_interval)
        self._weight_interval = max(interval, self._weight_interval)
        if self.weight > RENORMALISE_AT:
            self.profile.sketch.div_(self.weight)
            self.slot_count.div_(self.weight)
            self.weight = 1.0
        return self.weight

    def _growth(self, intervals: int) -> float:
        """``1 / decay ** intervals`` (1 for none), the intervals capped where the counts before
        them are gone anyway (past ``FORGET_AFTER``: no float overflow)."""
        if intervals <= 0 or self.decay == 1:
            return 1.0
        intervals = min(intervals, math.ceil(math.log(FORGET_AFTER) / -math.log(self.decay)))
        try:
            return self.decay**-intervals
        except OverflowError:  # a decay below 1 / the largest float: all before is forgotten
            return FORGET_AFTER

    def _count_hits(self, slots: torch.Tensor, window: int, step: float) -> int | torch.Tensor:
        """Add ``step`` to each slot first hit in ``window``; returns how many."""
        if self.device.type == "cpu":  # one numba pass, without the GIL
            from .sketch_kernel import slot_episodes  # noqa: PLC0415 (imports numba)

            return slot_episodes(self._per_slot.numpy(), _int64(slots), window, step)
        return count_hits_torch(self.slot_count, self.slot_stamp, slots, window, step)

    def seed(
        self,
        profile: FrequencyProfile,
        offline_target: int,
        *,
        key: str = "repin.prior_weight",
        restored: bool = False,
    ) -> None:
        """Start from an offline profile: its episodes x ``prior_weight`` (1: an offline episode
        counts as one served), and its split rule's pinned rows as the target (``key``: the
        setting an error names, for a ``prior_weight`` past the float32 counters). ``restored``:
        a warm restart brought the counts back, so only the target is set and ``prior_weight``
        checked (a config refused on a cold start is refused beside a restart file too)."""
        if self.prior_weight > 0:
            self.profile.seed(profile, self.prior_weight, key=key, add=not restored)
        self.offline_target = int(offline_target)

    def pinned_target(self) -> int:
        """Rows the pinned segment aims at: the offline rule's, else the tier minus the measured
        distinct rows per window (at most half the tier); 0 before a window was counted. Never
        the whole tier: a tier pinned full admits nothing, so it would never re-pin again."""
        if self.offline_target is not None:
            return min(self.offline_target, self.capacity - 1)
        if self.profile.windows == 0:
            return 0
        recency = min(self.capacity // 2, math.ceil(self.profile.mean_distinct_per_window))
        return self.capacity - max(1, recency)

    def budget_rows(self, target: int) -> int:
        """Rows one re-pin may move in (and out): ``budget`` (no more than the tier holds), or
        its share of ``target``."""
        if isinstance(self.budget, int):
            return min(self.budget, self.capacity)
        share = float(self.budget.strip()[:-1]) / 100
        return max(1, math.ceil(share * target))

    def plan(self, row_of_slot: torch.Tensor, pinned: torch.Tensor) -> RepinMoves:
        """Which resident slots to pin and unpin, from a snapshot of the tier (``row_of_slot``:
        -1 for free slots; ``pinned``: pin flag per slot, read only where a row is resident),
        ranked by the slots' counts, leaving out rows the tier above pins (:meth:`pinned_above`).
        Reads only: the snapshot may be older than rows listed since, so it forgets none of them
        (:meth:`forget_above` does, given the tier itself).

        The best unpinned rows fill the pinned segment up to its target, then replace the
        lowest pinned rows while they count more; at most ``budget`` rows in and out. Its cost is
        two passes over the slots that find the ``budget`` best and lowest (:meth:`_candidates`).
        """
        row_of_slot = self._without_above(row_of_slot)
        most = self.budget_rows(min(self.pinned_target(), self.capacity))  # budget <= this
        best, best_score, low, low_score, resident, n_held = self._candidates(
            row_of_slot, pinned, most
        )
        target = min(self.pinned_target(), resident)
        budget = self.budget_rows(target)
        room = max(0, target - n_held)  # free places in the pinned segment
        shrink = max(0, n_held - target)  # pinned rows over a target that fell
        lowest = low_score[0] if low.numel() else None
        # any unpinned row that counts, while there is room; then only those above the lowest
        # pinned row (they can swap with it)
        floor = lowest if lowest is not None and not room else 0.0
        keep = min(budget, int((best_score > floor).sum()))  # sorted: a prefix
        incoming, in_score = best[:keep], best_score[:keep]
        fill = min(room, incoming.numel())
        k_out = min(budget, low.numel(), shrink + incoming.numel() - fill)
        out_score = low_score[:k_out]
        pairs = min(incoming.numel() - fill, k_out - min(shrink, k_out))
        lows = out_score[min(shrink, k_out) : min(shrink, k_out) + pairs]
        swaps = int((in_score[fill : fill + pairs] > lows).sum())  # both sorted: a prefix
        incoming = incoming[: fill + swaps]
        outgoing = low[: min(shrink, k_out) + swaps]
        return RepinMoves(incoming, row_of_slot[incoming], outgoing, row_of_slot[outgoing])

    def pinned_above(self, slots: torch.Tensor, rows: torch.Tensor, released: torch.Tensor) -> None:
        """The tier above (hot, over warm) now pins ``rows``, held here in ``slots``, and no longer
        pins ``released``: plans leave the former out while this tier holds them there (lookups
        of them never reach it)."""
        with self._above_lock:
            held_slots, held_rows = self._above
            kept = ~torch.isin(held_rows, released.to(self.device))
            self._above = (
                torch.cat([held_slots[kept], slots.to(self.device)]),
                torch.cat([held_rows[kept], rows.to(self.device)]),
            )

    def leave_above(self, moves: RepinMoves) -> RepinMoves:
        """``moves`` without its pins of rows the tier above pins (a warm restart's thread may
        have listed them after the plan was made, off the lock)."""
        with self._above_lock:
            rows = self._above[1]
        if not rows.numel() or not moves.pin_rows.numel():
            return moves
        keep = ~torch.isin(moves.pin_rows.to(self.device), rows).to(moves.pin_rows.device)
        return RepinMoves(
            moves.pin_slots[keep], moves.pin_rows[keep], moves.unpin_slots, moves.unpin_rows
        )

    def forget_above(self, row_of_slot: torch.Tensor) -> None:
        """Forget the rows the tier above pins whose slot here holds another row or none now
        (``row_of_slot``: the tier's own, under the store's lock, not a plan's snapshot, which
        may predate a row listed since)."""
        with self._above_lock:
            slots, rows = self._above
            if slots.numel():
                still = row_of_slot[slots] == rows
                self._above = slots[still], rows[still]

    def _without_above(self, row_of_slot: torch.Tensor) -> torch.Tensor:
        """``row_of_slot`` with the slots holding rows the tier above pins read as free (a copy
        where there are any)."""
        with self._above_lock:
            slots, rows = self._above
        if not slots.numel():
            return row_of_slot
        row_of_slot = row_of_slot.clone()
        row_of_slot[slots[row_of_slot[slots] == rows]] = -1
        return row_of_slot

    def _candidates(
        self, row_of_slot: torch.Tensor, pinned: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The ``k`` best-counted unpinned resident slots with a count above 0 (most first), the
        ``k`` lowest pinned (least first), with their counts; resident and pinned slots. Holds
        the counting lock, so the counts read are those of one moment (no copy of them)."""
        with self._counting:
            if self.device.type == "cpu":  # two numba passes, a sort of about k slots
                from .sketch_kernel import repin_candidates  # noqa: PLC0415 (imports numba)

                found = repin_candidates(
                    row_of_slot.numpy(), pinned.numpy(), self._per_slot.numpy(), k, self._plan_keys
                )
                best, best_score, low, low_score = (torch.from_numpy(a) for a in found[:4])
                return best, best_score, low, low_score, found[4], found[5]
            return candidates_torch(row_of_slot, pinned, self.slot_count, k)

    def finish(self, moved_in: int, moved_out: int) -> None:
        """Close an interval after its re-pin was applied; the lookups past the last whole
        interval count towards the next (a re-pin runs at the first batch boundary past them).
        Past counts decay by the lookups since they were made, re-pins or not
        (:meth:`_weight_at`)."""
        self._changes_at_repin = self._changes
        self.since_repin %= self.every
        self.repins += 1
        self.rows_pinned += moved_in
        self.rows_unpinned += moved_out

    def skip(self) -> None:
        """Close an interval whose re-pin failed, counting no re-pin: the next interval tries
        again (the lookups past this one count towards it, as after :meth:`finish`)."""
        self.since_repin %= self.every

    # -- warm restart ----------------------------------------------------------------------------
    def save_point(self, row_of_slot: torch.Tensor) -> SavePoint:
        """Where a warm restart saves the counts as of, under the store's lock: the updates
        queued so far, the lookup side's clock, and ``row_of_slot`` (a copy the caller made of
        the tier's, -1: free). :meth:`saved_profile` reads the counts off the lock."""
        return SavePoint(self._queued_total, self._clock, self.since_repin, row_of_slot)

    def saved_profile(self, point: SavePoint) -> tuple[dict[str, Any], np.ndarray]:
        """What a warm restart saves at ``point``, off the store's lock: :meth:`state` and a copy
        of the sketch with the resident rows' counts folded in (their counts come back from it
        when the rows are reloaded). It applies the updates queued before the point and copies
        the counts under the counting lock only (lookups go on; the counting waits for the
        copy), then folds in the copy. Where the re-pin thread counted past the point, a slot's
        count may be that of a row admitted since, folded into the row the slot held at the
        point (an over-count, as count-min's collisions are), and the state's weight is still the
        point's interval's (the episodes counted past it weigh a later interval's)."""
        with self._counting:
            self._count_first(point.queued - self._applied_total)  # none where counted since
            state = self._state(point.clock, point.since_repin)
            sketch, counts = self.profile.sketch.clone(), self.slot_count.clone()
        slots = torch.nonzero(point.row_of_slot >= 0).squeeze(1)
        self.profile.raise_to(point.row_of_slot[slots], counts[slots], sketch=sketch)
        return state, sketch.cpu().numpy()

    def state(self) -> dict[str, Any]:
        """What a warm restart saves besides the sketch (plain numbers; ``weight``: what an
        episode counted next adds, decayed for the intervals begun since the last update)."""
        return self._state(self._clock, self.since_repin)

    def _state(self, clock: int, since_repin: int) -> dict[str, Any]:
        """:meth:`state` with the lookup side's ``clock`` and ``since_repin`` given (a save point's
        clock may be behind the counts: then the weight of its interval, in the counts' scale)."""
        ahead = clock // self.every - self._weight_interval
        weight = self.weight * self._growth(ahead) / self._growth(-ahead)
        return {
            **self.profile.state(),
            "capacity": self.capacity,
            "recency_window": self.window,
            "offline_profile": self.offline_profile,
            "weight": weight,
            "since_repin": since_repin,
        }

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """Why a saved state cannot be restored into this tier (None when it can): another
        tier size or sketch, episode window, or offline profile (its counts and pins came from
        the one it was saved with)."""
        have = self.state()  # the profile's own state within it
        bad = [
            f"{k} {state.get(k)!r} (tier now {have[k]!r})"
            for k in ("capacity", "depth", "width", "recency_window", "offline_profile")
            if state.get(k) != have[k]
        ]
        return ", ".join(bad) or None

    def load_state(self, state: dict[str, Any], sketch: np.ndarray) -> None:
        """Restore a saved state (checked with :meth:`mismatch` first). The re-pins' counters
        are this process's (exported as Prometheus counters) and start from 0: a restart file
        saved a while before a crash would otherwise take them back below what was scraped.
        Counters that are not finite numbers >= 0 (a file saved while a ``prior_weight`` past
        float32 seeded them at infinity), or a weight that is not finite and above 0, are refused
        with a ValueError: they would outrank every count served, for good."""
        bad = ~(np.isfinite(sketch) & (sketch >= 0))
        if bad.any():
            raise ValueError(
                f"{int(bad.sum()):,} of the sketch's {sketch.size:,} counters are not finite "
                f"numbers >= 0 ({sketch[bad].flat[0]}); expected decayed episode counts"
            )
        weight = float(state["weight"])
        if not 0 < weight < math.inf:
            raise ValueError(f"weight {weight}; expected a finite number above 0")
        self.profile.load_state(state, sketch)
        self.weight = weight
        self.since_repin = int(state["since_repin"])
        self._clock, self._interval = self.since_repin % self.every, 0  # the weight's interval
        self._weight_interval = 0


def _stamp(window: int) -> int:
    """A window number as the int32 slot stamps hold it, wrapped (stamps are only compared for
    equality; a CUDA tensor refused a number past 2**31: counting stopped after 2**31 windows)."""
    return (window + 2**31) % 2**32 - 2**31


def _int64(ids: torch.Tensor) -> np.ndarray:
    """A CPU tensor of ids as a contiguous int64 numpy array (for the numba kernels)."""
    return ids.to(torch.int64).contiguous().numpy()


# -- the CUDA paths (the CPU runs the numba passes of tiered_store.sketch_kernel) ----------------
def admitted_torch(
    counts: torch.Tensor,
    stamps: torch.Tensor,
    profile: OnlineProfile,
    slots: torch.Tensor,
    rows: torch.Tensor,
    stamp: int,
    extra: float,
) -> None:
    """:func:`tiered_store.sketch_kernel.slots_admitted` with torch ops (CUDA)."""
    counts[slots] = profile.estimates(rows).to(counts.device, torch.float32) + extra
    stamps[slots] = stamp


def evicted_torch(
    counts: torch.Tensor,
    stamps: torch.Tensor,
    profile: OnlineProfile,
    slots: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    step: float,
) -> torch.Tensor:
    """:func:`tiered_store.sketch_kernel.slots_evicted` with torch ops (CUDA)."""
    values = counts[slots]
    in_window = stamps[slots] == window
    values -= in_window.to(values.dtype) * step
    profile.raise_to(rows, values)
    return in_window


def count_hits_torch(
    counts: torch.Tensor, stamps: torch.Tensor, slots: torch.Tensor, window: int, weight: float
) -> torch.Tensor:
    """:func:`tiered_store.sketch_kernel.slot_episodes` with torch ops, without a host sync (no
    boolean indexing: every hit position is written, the counted ones with ``weight`` added):
    returns the count of slots first hit in ``window`` as a tensor."""
    fresh = stamps[slots] != window  # every position of a slot agrees
    counts[slots] = counts[slots] + fresh.to(counts.dtype) * weight  # repeats write one value
    stamps[slots] = window
    # distinct fresh slots: one position per slot wins the scatter
    position = torch.arange(slots.numel(), device=slots.device, dtype=torch.int32)
    owner = torch.empty(counts.numel(), dtype=torch.int32, device=slots.device)
    owner[slots] = position
    return ((owner[slots] == position) & fresh).sum()


def candidates_torch(
    row_of_slot: torch.Tensor, pinned: torch.Tensor, score: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """:func:`tiered_store.sketch_kernel.repin_candidates` with torch ops (``topk``)."""
    resident = row_of_slot >= 0
    held = torch.nonzero(pinned & resident).squeeze(1)
    cand = torch.nonzero(resident & ~pinned & (score > 0)).squeeze(1)
    top = torch.topk(score[cand], min(k, cand.numel()))
    bottom = torch.topk(score[held], min(k, held.numel()), largest=False)
    return (
        cand[top.indices],
        top.values,
        held[bottom.indices],
        bottom.values,
        int(resident.sum()),
        held.numel(),
    )

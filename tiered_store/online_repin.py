"""Online re-pinning of a ``zipf-tuned`` tier: count episodes while serving, re-pin periodically.

A tier's lookups are counted in *episodes*: each row once per window of ``recency_window``
lookups (ended at a batch boundary). Where a row is counted depends on whether the tier holds it:

- **Hits** are counted per slot, exactly, on the lookup path: a count and a window stamp per slot
  (8 bytes; one pass over the batch's hit slots, in numba on the CPU, torch on CUDA). A re-pin
  ranks resident rows by these counts, so it needs no estimate.
- **Misses** go into a window buffer; a full window adds one episode per distinct row to a
  count-min sketch (:class:`tiered_store.online_profile.OnlineProfile`, sized from the tier: 4
  rows of ``sketch_width x capacity`` float32 counters, rounded up to a power of two, plus a
  one-byte window stamp per counter on the CPU: 40-80 bytes per slot at the default width 2,
  never per table row). In replay the window is counted at once (deterministic); in the store's
  background thread when ``deferred`` (at most ``MAX_PENDING_WINDOWS`` wait; a window beyond
  them is dropped and counted in ``windows_dropped``, so lookups never wait on the counting).
- A row **admitted** starts its slot's count from its sketch estimate (plus the episode of the
  miss that brought it, unless the sketch has counted that window already); a row **evicted**
  raises its sketch counters to its slot's count (a conservative update: a row's estimate is
  at least what it was counted while resident, and a second fold of the same count adds
  nothing). So a row's count survives eviction, and the sketch sees only misses: on a tier
  whose lookups nearly all hit, counting costs one pass over the hit slots.

Every ``every`` lookups (by default one window) the tier is re-pinned among the rows it already
holds (frequent rows are resident through the recency segment, so nothing is read from cold):
the resident rows are ranked by their slot counts (which, when an offline profile was given,
start from its episodes times ``prior_weight``, seeded into the sketch), the pinned segment aims
at the top ``target`` of them, and at most ``budget`` rows move in (the top-counted unpinned
residents) and out (the lowest pinned rows) per re-pin. ``target`` follows zipf-tuned's split
rule: the offline profile's when one was given, else the tier minus the measured mean distinct
rows per window (at most half the tier). Past counts decay by ``decay`` at every re-pin: new
episodes are added with a weight growing by ``1 / decay`` instead (no pass over the counters),
renormalised when the weight gets large.

:meth:`OnlineRepin.plan` (a ``topk`` over the slots' counts) reads the tier and changes nothing;
:meth:`tiered_store.row_cache.RowCache.apply_repin` flips the pin flags of the chosen slots
(checked to still hold the planned rows). Replay runs both at the batch boundary that completes
an interval; the live store plans in a background thread and only the apply runs under its lock.
Sketch writes (windows, and folds of evicted rows) all run in that thread when ``deferred``.
"""

from __future__ import annotations

import math
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
MAX_PENDING_WINDOWS = 8  # full windows waiting for a deferred count (512 KiB each at 65,536)


@dataclass
class RepinMoves:
    """Slots to pin and to unpin, with the rows they held when planned (to check at apply)."""

    pin_slots: torch.Tensor
    pin_rows: torch.Tensor
    unpin_slots: torch.Tensor
    unpin_rows: torch.Tensor


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
        Queue sketch writes for :meth:`count_pending` (the store's background thread) instead of
        making them at once (replay).

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
    ) -> None:
        self.capacity = int(capacity)
        self.every = config.every
        self.budget = config.budget
        self.decay = config.decay
        self.prior_weight = config.prior_weight
        self.window = int(window)
        self.device = torch.device(device)
        self.profile = OnlineProfile(
            max(1, self.capacity),
            width_factor=config.sketch_width,
            heavy_hitters=False,
            dtype=torch.float32,
            device=self.device,
        )
        self.weight = 1.0  # what one episode adds now: 1 / decay ** repins (renormalised)
        self.offline_target: int | None = None  # pinned rows by the offline profile's rule
        # per slot: the held row's episodes (decay-weighted), and the window it was last counted in
        self.slot_count = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)
        self.slot_stamp = torch.full((self.capacity,), -1, dtype=torch.int32, device=self.device)
        self.window_no = 0  # the open window (windows completed so far)
        self._batch_window = 0  # the window of the last batch counted (its misses' admissions)
        self._in_window = 0  # lookups in the open window
        self._hits_distinct: int | torch.Tensor = 0  # slots first hit in the open window
        self._buffer = torch.empty(self.window, dtype=torch.int64, device=self.device)
        self._buffered = 0  # misses of the open window in the buffer
        self.deferred = deferred
        # sketch writes waiting for count_pending(): ("window", ids, hit distinct) or
        # ("fold", rows, counts); at most MAX_PENDING_WINDOWS windows
        self.pending: deque[tuple[str, torch.Tensor, Any]] = deque()
        self._pending_windows = 0
        self.windows_dropped = 0  # full windows not counted: the background count fell behind
        self.since_repin = 0  # lookups since the last re-pin
        self.repins = 0
        self.rows_pinned = 0  # rows moved into the pinned segment by re-pins, in all
        self.rows_unpinned = 0

    @property
    def due(self) -> bool:
        """An interval of ``every`` lookups has passed since the last re-pin."""
        return self.since_repin >= self.every

    @property
    def nbytes(self) -> int:
        """Bytes held: the sketch, the window buffer, and a count and a stamp per slot."""
        return (
            self.profile.nbytes
            + self._buffer.nbytes
            + self.slot_count.nbytes
            + self.slot_stamp.nbytes
        )

    def count(self, hit_slots: torch.Tensor, miss_ids: torch.Tensor, *, lookups: int) -> None:
        """Count one batch of the tier's lookups: ``hit_slots`` (the slots of its hits) per slot
        at once, ``miss_ids`` into the window buffer (the sketch counts it once the window of
        ``lookups`` is full). Duplicates count once per window either way."""
        self._batch_window = self.window_no
        if hit_slots.numel():
            self._hits_distinct += self._count_hits(hit_slots.to(self.device))
        self._buffer_misses(miss_ids)
        self._in_window += lookups
        self.since_repin += lookups
        if self._in_window >= self.window:
            self._end_window()

    def _buffer_misses(self, ids: torch.Tensor) -> None:
        """Append ``ids`` to the open window's misses."""
        end = self._buffered + ids.numel()
        if end > self._buffer.numel():  # more misses than the window: the buffer grows
            grown = torch.empty(
                max(end, 2 * self._buffer.numel()), dtype=torch.int64, device=self.device
            )
            grown[: self._buffered] = self._buffer[: self._buffered]
            self._buffer = grown
        self._buffer[self._buffered : end].copy_(ids.reshape(-1))
        self._buffered = end

    def _count_hits(self, slots: torch.Tensor) -> int | torch.Tensor:
        """Add an episode to each slot first hit in the open window; returns how many."""
        if self.device.type == "cpu":  # one numba pass, without the GIL
            from .sketch_kernel import slot_episodes  # noqa: PLC0415 (imports numba)

            return slot_episodes(
                self.slot_count.numpy(),
                self.slot_stamp.numpy(),
                slots.to(torch.int64).contiguous().numpy(),
                self.window_no,
                self.weight,
            )
        return count_hits_torch(
            self.slot_count, self.slot_stamp, slots, self.window_no, self.weight
        )

    def _end_window(self) -> None:
        """Count the full window's misses in the sketch (or queue them), and open the next."""
        misses = self._buffer[: self._buffered]
        distinct = int(self._hits_distinct)
        if not self.deferred:
            self.profile.update(misses, weight=self.weight, distinct_elsewhere=distinct)
        elif self._pending_windows < MAX_PENDING_WINDOWS:
            self.pending.append(("window", misses, distinct))
            self._pending_windows += 1
            self._buffer = torch.empty(self.window, dtype=torch.int64, device=self.device)
        else:
            self.windows_dropped += 1
        self.window_no += 1
        self._in_window = self._buffered = 0
        self._hits_distinct = 0

    def admitted(self, slots: torch.Tensor, rows: torch.Tensor, *, looked_up: bool) -> None:
        """``rows`` now held in ``slots``: their counts start from the sketch's estimates, plus
        the episode of the miss that brought them (``looked_up``) where the sketch has not
        counted its window yet."""
        if slots.numel() == 0:
            return
        start = self.profile.estimates(rows).to(self.device, torch.float32)
        missed_window_counted = not self.deferred and self._batch_window < self.window_no
        if looked_up and not missed_window_counted:
            start += self.weight
        self.slot_count[slots] = start
        self.slot_stamp[slots] = self._batch_window if looked_up else -1

    def evicted(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """``rows`` leave ``slots``: raise their sketch counters to their counts (or queue it).
        A row counted in the open window leaves that episode to the window's misses, which
        the sketch counts once with any later miss of the row in the same window."""
        if slots.numel() == 0:
            return
        counts = self.slot_count[slots]
        open_window = self.slot_stamp[slots] == self.window_no
        counts -= open_window.to(counts.dtype) * self.weight
        self._buffer_misses(rows[open_window])
        if self.deferred:
            self.pending.append(("fold", rows.clone(), counts))
        else:
            self.profile.raise_to(rows, counts)

    def count_pending(self) -> None:
        """Make the sketch writes a deferred tier queued (the store's background thread)."""
        while self.pending:  # removed once made: ``pending`` empty means all were
            kind, ids, extra = self.pending[0]
            if kind == "window":
                self.profile.update(ids, weight=self.weight, distinct_elsewhere=extra)
                self._pending_windows -= 1
            else:
                self.profile.raise_to(ids, extra)
            self.pending.popleft()

    def seed(self, profile: FrequencyProfile, offline_target: int) -> None:
        """Start from an offline profile: its episodes x ``prior_weight`` (1: an offline episode
        counts as one served), and its split rule's pinned rows as the target."""
        self.offline_target = int(offline_target)
        if self.prior_weight > 0:
            self.profile.seed(profile, self.prior_weight)

    def pinned_target(self) -> int:
        """Rows the pinned segment aims at: the offline rule's, else the tier minus the measured
        distinct rows per window (at most half the tier); 0 before a window was counted."""
        if self.offline_target is not None:
            return self.offline_target
        if self.profile.windows == 0:
            return 0
        recency = min(self.capacity // 2, math.ceil(self.profile.mean_distinct_per_window))
        return self.capacity - recency

    def budget_rows(self, target: int) -> int:
        """Rows one re-pin may move in (and out): ``budget``, or its share of ``target``."""
        if isinstance(self.budget, int):
            return self.budget
        share = float(self.budget.strip()[:-1]) / 100
        return max(1, math.ceil(share * target))

    def plan(self, row_of_slot: torch.Tensor, pinned: torch.Tensor) -> RepinMoves:
        """Which resident slots to pin and unpin, from a snapshot of the tier (``row_of_slot``:
        -1 for free slots; ``pinned``: pinned flag per slot), ranked by the slots' counts.
        Reads only.

        The best unpinned rows fill the pinned segment up to its target, then replace the
        lowest pinned rows while they count more; at most ``budget`` rows in and out. Its cost is
        one pass over the slots that keeps the ``budget`` best and lowest (:meth:`_candidates`).
        """
        most = self.budget_rows(min(self.pinned_target(), self.capacity))  # budget <= this
        best, best_score, low, low_score, resident, n_held = self._candidates(
            row_of_slot, pinned, most
        )
        target = min(self.pinned_target(), resident)
        budget = self.budget_rows(target)
        room = max(0, target - n_held)  # free places in the pinned segment
        shrink = max(0, n_held - target)  # pinned rows over a target that fell
        lowest = low_score[0] if n_held else None
        # any unpinned row that counts, while there is room; then only those above the lowest
        # pinned row (they can swap with it)
        floor = lowest if lowest is not None and not room else 0.0
        keep = min(budget, int((best_score > floor).sum()))  # sorted: a prefix
        incoming, in_score = best[:keep], best_score[:keep]
        fill = min(room, incoming.numel())
        k_out = min(budget, n_held, shrink + incoming.numel() - fill)
        out_score = low_score[:k_out]
        pairs = min(incoming.numel() - fill, k_out - min(shrink, k_out))
        lows = out_score[min(shrink, k_out) : min(shrink, k_out) + pairs]
        swaps = int((in_score[fill : fill + pairs] > lows).sum())  # both sorted: a prefix
        incoming = incoming[: fill + swaps]
        outgoing = low[: min(shrink, k_out) + swaps]
        return RepinMoves(incoming, row_of_slot[incoming], outgoing, row_of_slot[outgoing])

    def _candidates(
        self, row_of_slot: torch.Tensor, pinned: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The ``k`` best-counted unpinned resident slots with a count above 0 (most first), the
        ``k`` lowest pinned (least first), with their counts; resident and pinned slots."""
        score = self.slot_count  # lookups may go on counting: the plan reads what it finds
        if self.device.type == "cpu":  # two numba passes, a sort of about k slots
            from .sketch_kernel import repin_candidates  # noqa: PLC0415 (imports numba)

            found = repin_candidates(row_of_slot.numpy(), pinned.numpy(), score.numpy(), k)
            best, best_score, low, low_score = (torch.from_numpy(a) for a in found[:4])
            return best, best_score, low, low_score, found[4], found[5]
        return candidates_torch(row_of_slot, pinned, score, k)

    def finish(self, moved_in: int, moved_out: int) -> None:
        """Close an interval after its re-pin was applied: decay past counts."""
        self.since_repin = 0
        self.repins += 1
        self.rows_pinned += moved_in
        self.rows_unpinned += moved_out
        self.weight /= self.decay
        if self.weight > RENORMALISE_AT:
            self.count_pending()  # queued folds hold counts at the old scale
            self.profile.sketch.div_(self.weight)
            self.slot_count.div_(self.weight)
            self.weight = 1.0

    # -- warm restart ----------------------------------------------------------------------------
    def sketch_with_resident(self, row_of_slot: torch.Tensor) -> np.ndarray:
        """A copy of the sketch with the resident rows' counts folded in (what a warm restart
        saves: the rows' counts come back from it when they are reloaded)."""
        sketch = self.profile.sketch.clone()
        slots = torch.nonzero(row_of_slot >= 0).squeeze(1)
        self.profile.raise_to(row_of_slot[slots], self.slot_count[slots], sketch=sketch)
        return sketch.cpu().numpy()

    def state(self) -> dict[str, Any]:
        """What a warm restart saves besides the sketch (plain numbers)."""
        return {
            **self.profile.state(),
            "capacity": self.capacity,
            "weight": self.weight,
            "since_repin": self.since_repin,
            "repins": self.repins,
        }

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """Why a saved state cannot be restored into this tier (None when it can)."""
        have = {"capacity": self.capacity, **self.profile.state()}
        bad = [
            f"{k} {state.get(k)!r} (tier now {have[k]!r})"
            for k in ("capacity", "depth", "width")
            if state.get(k) != have[k]
        ]
        return ", ".join(bad) or None

    def load_state(self, state: dict[str, Any], sketch: np.ndarray) -> None:
        """Restore a saved state (checked with :meth:`mismatch` first)."""
        self.profile.load_state(state, sketch)
        self.weight = float(state["weight"])
        self.since_repin = int(state["since_repin"])
        self.repins = int(state["repins"])


# -- the CUDA paths (the CPU runs the numba passes of tiered_store.sketch_kernel) ----------------
def count_hits_torch(
    counts: torch.Tensor, stamps: torch.Tensor, slots: torch.Tensor, window: int, weight: float
) -> torch.Tensor:
    """:func:`tiered_store.sketch_kernel.slot_episodes` with torch ops, without a host sync:
    returns the count of slots first hit in ``window`` as a tensor."""
    fresh = slots[stamps[slots] != window]
    counts[fresh] += weight  # a slot twice in ``fresh`` gets the same value
    stamps[fresh] = window
    # distinct fresh slots: one position per slot wins the scatter
    position = torch.arange(fresh.numel(), device=slots.device, dtype=torch.int32)
    owner = torch.empty(counts.numel(), dtype=torch.int32, device=slots.device)
    owner[fresh] = position
    return (owner[fresh] == position).sum()


def candidates_torch(
    row_of_slot: torch.Tensor, pinned: torch.Tensor, score: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """:func:`tiered_store.sketch_kernel.repin_candidates` with torch ops (``topk``)."""
    resident = row_of_slot >= 0
    score = score.clone()
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

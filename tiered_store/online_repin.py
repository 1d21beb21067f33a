"""Online re-pinning of a ``zipf-tuned`` tier: count episodes while serving, re-pin periodically.

While serving, a tier's lookups go into a window buffer; every ``recency_window`` lookups (at a
batch boundary) its distinct rows add one *episode* each to a count-min sketch
(:class:`tiered_store.online_profile.OnlineProfile`, sized from the tier: 4 rows of
``sketch_width x capacity`` float32 counters, rounded up to a power of two, plus a one-byte
window stamp per counter on the CPU, i.e. 40-80 bytes per slot at the default width 2, never per
table row; and a mark and a score per slot, 5 bytes). The lookup path does one copy into the
buffer per batch (and marks the slots it used); counting a full
window (a ``unique``, the hashes, one counter update per sketch row) runs there in replay
(deterministic), and in the store's background thread when ``deferred`` (at most
``MAX_PENDING_WINDOWS`` wait; a window beyond them is dropped and counted in
``windows_dropped``, so lookups never wait on the counting).

Every ``every`` lookups (by default one window) the tier is re-pinned among the rows it already
holds (frequent rows are resident through the recency segment, so nothing is read from cold). The
tier marks each slot it looks up or fills; a re-pin re-scores only those (a row's estimate changes
only when a counted window held it) and keeps every other slot's last score: the resident rows
are ranked by their estimated episodes (plus, when an offline profile was given, its episodes
times ``prior_weight``, seeded into the sketch), the pinned segment aims at the
top ``target`` of them, and at most ``budget`` rows move in (the top-scored unpinned residents)
and out (the lowest-scored pinned rows) per re-pin. ``target`` follows zipf-tuned's split rule:
the offline profile's when one was given, else the tier minus the measured mean distinct rows
per window (at most half the tier). Past counts decay by ``decay`` at every re-pin: new windows
are added with a weight growing by ``1 / decay`` instead (no pass over the sketch), renormalised
when the weight gets large.

:meth:`OnlineRepin.plan` (the heavy part: estimates of the touched slots, a ``topk`` over the
slots) reads a snapshot and changes only the kept scores; :meth:`tiered_store.row_cache.RowCache.apply_repin` flips the pin
flags of the chosen slots (checked to still hold the planned rows). Replay runs both at the
batch boundary that completes an interval; the live store plans in a background thread and only
the apply runs under its lock.
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
        ``every``, ``budget``, ``decay``, ``prior_weight``.
    window : int
        Lookups per episode window (the tier's ``recency_window``).
    device : torch.device or str
        Where the tier's metadata (and so the sketch) lives.

    Examples
    --------
    >>> from tiered_store.config import RepinConfig
    >>> r = OnlineRepin(8, RepinConfig(every=6, budget=2), window=3)
    >>> for batch in ([5, 5, 1], [5, 2, 5]):
    ...     r.observe(torch.tensor(batch))
    >>> r.due, r.profile.estimates(torch.tensor([5, 1, 7])).tolist(), r.pinned_target()
    (True, [2.0, 1.0, 0.0], 6)
    >>> row_of_slot = torch.tensor([5, 1, 2, -1, -1, -1, -1, -1])
    >>> moves = r.plan(row_of_slot, torch.zeros(8, dtype=torch.bool), r.take_touched())
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
        self._buffer = torch.empty(self.window, dtype=torch.int64, device=self.device)
        self._buffered = 0
        self.deferred = deferred  # full windows wait in ``pending`` for count_pending()
        self.pending: deque[torch.Tensor] = deque()
        self.windows_dropped = 0  # full windows not counted: the background count fell behind
        self.since_repin = 0  # lookups since the last re-pin
        # per slot: marked when looked up or filled; the score it had when last scored
        self.touched = torch.ones(self.capacity, dtype=torch.bool, device=self.device)
        self.slot_score = torch.zeros(self.capacity, dtype=torch.float32, device=self.device)
        self.repins = 0
        self.rows_pinned = 0  # rows moved into the pinned segment by re-pins, in all
        self.rows_unpinned = 0

    @property
    def due(self) -> bool:
        """An interval of ``every`` lookups has passed since the last re-pin."""
        return self.since_repin >= self.every

    @property
    def nbytes(self) -> int:
        """Bytes held: the sketch, the window buffer, and a mark and a score per slot."""
        return (
            self.profile.nbytes + self._buffer.nbytes + self.touched.nbytes + self.slot_score.nbytes
        )

    def observe(self, ids: torch.Tensor) -> None:
        """Count one batch of the tier's lookups (a copy into the window buffer; the sketch is
        updated once the window is full)."""
        k = ids.numel()
        if k == 0:
            return
        end = self._buffered + k
        if end > self._buffer.numel():  # a batch larger than the window: the window grows
            grown = torch.empty(end, dtype=torch.int64, device=self.device)
            grown[: self._buffered] = self._buffer[: self._buffered]
            self._buffer = grown
        self._buffer[self._buffered : end].copy_(ids.reshape(-1))
        self._buffered = end
        if end >= self.window:
            if not self.deferred:
                self.profile.update(self._buffer[:end], weight=self.weight)
            elif len(self.pending) < MAX_PENDING_WINDOWS:
                self.pending.append(self._buffer[:end])
                self._buffer = torch.empty(self.window, dtype=torch.int64, device=self.device)
            else:
                self.windows_dropped += 1
            self._buffered = 0
        self.since_repin += k

    def count_pending(self) -> None:
        """Count the full windows a deferred tier queued (the store's background thread)."""
        while self.pending:  # removed once counted: ``pending`` empty means all were
            self.profile.update(self.pending[0], weight=self.weight)
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

    def touch(self, slots: torch.Tensor) -> None:
        """Mark slots looked up or filled (their rows' estimates may have changed)."""
        self.touched.index_fill_(0, slots.to(self.touched.device), True)

    def take_touched(self) -> torch.Tensor:
        """The marks since the last call, cleared (a fresh mask takes the lookups that follow)."""
        marks, self.touched = self.touched, torch.zeros_like(self.touched)
        return marks

    def plan(
        self, row_of_slot: torch.Tensor, pinned: torch.Tensor, touched: torch.Tensor
    ) -> RepinMoves:
        """Which resident slots to pin and unpin, from a snapshot of the tier (``row_of_slot``:
        -1 for free slots; ``pinned``: pinned flag per slot; ``touched``: slots looked up or
        filled since the last plan, from :meth:`take_touched`). Reads only, but for the scores.

        Only touched slots are scored afresh (a row's estimate changes only when a counted
        window held it: past counts decay by a uniform weight; the others keep the score they
        got when last touched), so a plan costs the rows served since the last one plus a few
        passes over the slots' flags and scores, not an estimate of every resident.
        The best unpinned candidates fill the pinned segment up to its target, then replace the
        lowest-scored pinned rows while they score higher; at most ``budget`` rows in and out.
        """
        resident = row_of_slot >= 0
        fresh = torch.nonzero(touched & resident).squeeze(1)
        self.slot_score[fresh] = self.profile.estimates(row_of_slot[fresh]).to(torch.float32)
        target = min(self.pinned_target(), int(resident.sum()))
        budget = self.budget_rows(target)
        held = torch.nonzero(pinned).squeeze(1)
        held_score = self.slot_score[held]
        room = max(0, target - held.numel())  # free places in the pinned segment
        shrink = max(0, held.numel() - target)  # pinned rows over a target that fell
        lowest = held_score.min() if held.numel() else None
        # worth a look: any unpinned row that scores, while there is room; then only those above
        # the lowest pinned row (they can swap with it)
        floor = lowest if lowest is not None and not room else 0.0
        cand = torch.nonzero(resident & ~pinned & (self.slot_score > floor)).squeeze(1)
        cand_score = self.slot_score[cand]
        best = torch.topk(cand_score, min(budget, cand.numel())).indices  # most first
        incoming, in_score = cand[best], cand_score[best]
        fill = min(room, incoming.numel())
        if lowest is not None and incoming.numel() > fill:  # past the room: swaps only
            incoming = incoming[: fill + int((in_score[fill:] > lowest).sum())]
        k_out = min(budget, held.numel(), shrink + incoming.numel() - fill)
        low = torch.topk(held_score, k_out, largest=False).indices  # least first
        out_score = held_score[low]
        pairs = min(incoming.numel() - fill, k_out - min(shrink, k_out))
        lows = out_score[min(shrink, k_out) : min(shrink, k_out) + pairs]
        swaps = int((in_score[fill : fill + pairs] > lows).sum())  # both sorted: a prefix
        incoming = incoming[: fill + swaps]
        outgoing = held[low[: min(shrink, k_out) + swaps]]
        return RepinMoves(incoming, row_of_slot[incoming], outgoing, row_of_slot[outgoing])

    def finish(self, moved_in: int, moved_out: int) -> None:
        """Close an interval after its re-pin was applied: decay past counts."""
        self.since_repin = 0
        self.repins += 1
        self.rows_pinned += moved_in
        self.rows_unpinned += moved_out
        self.weight /= self.decay
        if self.weight > RENORMALISE_AT:
            self.profile.sketch.div_(self.weight)
            self.weight = 1.0

    # -- warm restart ----------------------------------------------------------------------------
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

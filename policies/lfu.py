"""Least frequently used with aging, batched: a per-slot access count and last-access number."""

from __future__ import annotations

import torch

from .base import EvictionPolicy
from .errors import check_int_option

_SEQ_BITS = 40  # access sequence numbers kept below 2**40 (renumbered when they get there)
_COUNT_MAX = (1 << 23) - 1  # counts saturate here so count and recency pack into one int64 key


class LFU(EvictionPolicy):
    """Evicts the slot with the lowest access count, the least recently used among equal counts.

    A hit adds one per access (a slot read three times in a batch gains 3); a new row starts at
    1. Every ``aging_period`` accesses seen by the policy (hits plus insertions) all counts are
    halved, so a row that was hot an hour ago does not stay forever; in a batch that crosses
    ``k`` period boundaries counts are halved ``k`` times after all its accesses are counted (at
    the next batch's start, before its victims are chosen).
    Recency is an access sequence number: within a batch it follows the order of the hook
    calls (hits in lookup order, then insertions), so no two slots tie and the victims are the
    same on every device.

    Parameters
    ----------
    capacity : int
        The tier's slots.
    device : torch.device or str
        Where the counts live.
    aging_period : int, optional
        Accesses between halvings. Default ``10 * capacity``: about ten turnovers of the tier,
        long enough for a row used once per eviction horizon to stand out from one-hit rows, and
        short enough that a formerly hot row's count decays within a few periods once traffic
        moves on (the same window W-TinyLFU uses for its sketch). Counts saturate at 2**23 - 1.

    Examples
    --------
    >>> import torch
    >>> lfu = LFU(capacity=3)
    >>> lfu.on_insert(torch.tensor([0, 1, 2]))
    >>> lfu.on_hit(torch.tensor([0, 0, 2]))
    >>> lfu.count.tolist()
    [3, 1, 2]
    >>> lfu.choose_victims(2, torch.zeros(3, dtype=torch.bool)).tolist()
    [1, 2]
    """

    name = "lfu"
    #: count (int32) + last access number (int64)
    bytes_per_slot = 12

    def __init__(
        self, capacity: int, device: torch.device | str = "cpu", *, aging_period: int | None = None
    ) -> None:
        super().__init__(capacity, device)
        self.aging_period = check_int_option(
            "lfu",
            "aging_period",
            aging_period if aging_period is not None else max(10 * capacity, 1),
            1,
        )
        self.count = torch.zeros(capacity, dtype=torch.int32, device=self.device)
        self.last_used = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self.seq = 0  # sequence number of the next access
        self.accesses = 0  # since the last halving
        self.agings = 0

    def on_batch(self) -> None:
        halvings, self.accesses = divmod(self.accesses, self.aging_period)
        if halvings:
            self.count >>= min(halvings, 31)
            self.agings += halvings

    def on_hit(self, slots: torch.Tensor) -> None:
        slots = slots.to(self.device).long()
        if slots.numel() == 0:
            return
        self.count.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))
        self.count[slots] = self.count[slots].clamp(max=_COUNT_MAX)
        self.last_used.scatter_reduce_(0, slots, self._next_seq(slots.numel()), reduce="amax")
        self.accesses += slots.numel()

    def on_insert(self, slots: torch.Tensor) -> None:
        slots = slots.to(self.device).long()
        if slots.numel() == 0:
            return
        self.count[slots] = 1
        self.last_used[slots] = self._next_seq(slots.numel())
        self.accesses += slots.numel()

    def victim_priority(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        count, last = self.count, self.last_used
        if slots is not None:
            count, last = count[slots], last[slots]
        return (count.long() << _SEQ_BITS) | last.clamp(min=0)

    def _next_seq(self, m: int) -> torch.Tensor:
        """Sequence numbers for ``m`` accesses; renumbers the slots by rank when they run out."""
        if self.seq + m >= 1 << _SEQ_BITS:
            order = torch.argsort(self.last_used)  # never-used slots (-1) first
            self.last_used[order] = torch.arange(self.capacity, device=self.device)
            self.seq = self.capacity
        start, self.seq = self.seq, self.seq + m
        return torch.arange(start, self.seq, device=self.device)

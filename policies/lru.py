"""Least recently used, batched: a per-slot logical clock.

A hit stamps the slot with ``2 x batch`` and an insert with ``2 x batch + 1`` (one ``index_fill_``
each): inside a batch, rows it brought in count as more recent than rows it hit, then ties go by
slot order. Victims are the ``n`` smallest keys ``stamp x capacity + slot`` (``topk``). Every key
set after a ``topk`` is larger than every key that ``topk`` saw (the batch's hits come before its
admissions), and keys are distinct, so the tier may serve victims for many batches from one
``topk`` (``RowCache(victim_buffer=...)``) and pick exactly what a ``topk`` per batch would.

On the CPU the ``n`` smallest keys of a large tier come from a threshold instead of a ``topk`` over
every slot: a strided sample of the stamps gives a stamp that about ``n`` slots fall below, one
pass collects those slots, and ``topk`` runs on them alone (about 10x less work at millions of
slots; the result is the same, since every key at or below the threshold is a candidate).

We measured a lazy-deletion recency log as the alternative (victims in O(accesses) instead of a
pass over the slots): it made all-hit lookups 3-5x slower (every hit appends to the log) and
replay no faster, so the clock stays.

A warm restart's rows (``on_restore``) take one clock tick per saved rank as they land, the most
valuable the newest: above every row used before they landed, below every row used after. Keys
still only grow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import EvictionPolicy, smallest

THRESHOLD_MIN_SLOTS = 1 << 17  # below this a plain topk over every slot is as fast
THRESHOLD_SAMPLE = 1 << 14  # stamps sampled to place the threshold


class LRU(EvictionPolicy):
    """Evicts the slots whose last access is oldest.

    Examples
    --------
    >>> import torch
    >>> lru = LRU(capacity=3)
    >>> lru.on_batch(); lru.on_insert(torch.tensor([0, 1, 2]))
    >>> lru.on_batch(); lru.on_hit(torch.tensor([0, 2]))
    >>> lru.choose_victims(1, torch.zeros(3, dtype=torch.bool)).tolist()
    [1]

    Rows a warm restart reads back rank by their saved age (0: the most recent) as they land:

    >>> lru = LRU(capacity=3)
    >>> lru.on_batch(); lru.on_insert(torch.tensor([0]))
    >>> lru.on_restore(torch.tensor([1, 2]), torch.tensor([0, 1]))
    >>> lru.choose_victims(3, torch.zeros(3, dtype=torch.bool)).tolist()
    [0, 2, 1]
    """

    name = "lru"
    bytes_per_slot = 8
    keys_only_grow = True
    restores_order = True

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        super().__init__(capacity, device)
        self.clock = 0
        self.last_used = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)

    def on_batch(self) -> None:
        self.clock += 1

    def on_hit(self, slots: torch.Tensor) -> None:
        self.last_used.index_fill_(0, slots, 2 * self.clock)

    def on_insert(self, slots: torch.Tensor) -> None:
        self.last_used.index_fill_(0, slots, 2 * self.clock + 1)

    def on_restore(self, slots: torch.Tensor, ages: torch.Tensor) -> None:
        if ages.numel() == 0:
            return
        ages = ages.to(self.last_used.device)
        oldest, newest = int(ages.max()), int(ages.min())
        self.last_used.index_copy_(0, slots, 2 * (self.clock + 1 + oldest - ages) + 1)
        self.clock += oldest - newest + 1  # one tick per saved rank: later lookups rank above

    def victim_priority(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        if slots is None:
            return _keys(self.last_used)
        return torch.index_select(self.last_used, 0, slots) * self.capacity + slots

    def victim_priority_later(self) -> Callable[[], torch.Tensor]:
        if type(self).victim_priority is not LRU.victim_priority:  # a subclass's own keys
            return super().victim_priority_later()
        last_used = self.last_used.clone()  # a copy, and the arithmetic when asked
        return lambda: _keys(last_used)

    def smallest_keys(self, n: int, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type != "cpu" or self.capacity < THRESHOLD_MIN_SLOTS:
            return super().smallest_keys(n, protected)
        stride = max(1, self.capacity // THRESHOLD_SAMPLE)
        sample = self.last_used[::stride][~protected[::stride]]
        share = n / max(1, int(sample.numel()) * stride)
        for margin in (1.25, 2.0, 4.0):
            rank = min(sample.numel(), int(share * margin * sample.numel()) + 16)
            if rank >= sample.numel():
                break
            stamp = torch.kthvalue(sample, rank).values
            slots = torch.nonzero((self.last_used <= stamp) & ~protected).squeeze(1)
            if slots.numel() >= n:
                keys = torch.index_select(self.last_used, 0, slots) * self.capacity + slots
                keys, pick = smallest(keys, n, distinct=True)
                return keys, slots[pick]
        return super().smallest_keys(n, protected)


def _keys(last_used: torch.Tensor) -> torch.Tensor:
    """Every slot's eviction key: its last use, ties broken by slot."""
    capacity = last_used.numel()
    return last_used * capacity + torch.arange(capacity, device=last_used.device)

"""Least recently used, batched: a per-slot logical clock; ties within a batch go by slot order."""

from __future__ import annotations

import torch

from .base import EvictionPolicy


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
    """

    name = "lru"
    bytes_per_slot = 8

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        super().__init__(capacity, device)
        self.clock = 0
        self.last_used = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)

    def on_batch(self) -> None:
        self.clock += 1

    def on_hit(self, slots: torch.Tensor) -> None:
        self.last_used[slots] = self.clock

    def on_insert(self, slots: torch.Tensor) -> None:
        self.last_used[slots] = self.clock

    def victim_priority(self) -> torch.Tensor:
        return self.last_used


class ScalarLRU:
    """Reference LRU over single requests (an ordered dict); used to test the batched one."""

    def __init__(self, capacity: int) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self.entries: OrderedDict[int, None] = OrderedDict()

    def access(self, row: int) -> bool:
        """Returns True on a hit; on a miss admits ``row``, evicting the least recent."""
        if row in self.entries:
            self.entries.move_to_end(row)
            return True
        if self.capacity == 0:
            return False
        if len(self.entries) >= self.capacity:
            self.entries.popitem(last=False)
        self.entries[row] = None
        return False

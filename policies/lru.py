"""Least recently used, batched, with victims found in time proportional to the accesses.

Every access appends its slot to a recency log; a slot's entry is live only while it is the
slot's latest one (lazy deletion). Victims are the oldest live entries, popped from the front of
the log, so eviction costs O(entries popped) rather than a scan of every slot. The log is
compacted in place when it fills. Within a batch, recency follows the order of the hook calls:
hits (in lookup order), then insertions.
"""

from __future__ import annotations

import torch

from .base import EvictionPolicy
from .reference import ScalarLRU  # the scalar reference moved; kept importable from here

_MIN_SCAN = 4096  # entries examined per step of a victim search


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
    bytes_per_slot = 8 + 2 * 8  # latest log position + a log of about twice the capacity

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        super().__init__(capacity, device)
        self.latest = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        self._log = torch.empty(2 * capacity + _MIN_SCAN, dtype=torch.int64, device=self.device)
        self._head = 0  # entries before this were consumed
        self._tail = 0  # next free log position

    def on_hit(self, slots: torch.Tensor) -> None:
        self._append(slots)

    def on_insert(self, slots: torch.Tensor) -> None:
        self._append(slots)

    def victim_priority(self) -> torch.Tensor:
        return self.latest

    def on_reinstate(self, slots: torch.Tensor) -> None:
        """Put refused victims back at the old end of the log, where ``choose_victims`` took them."""
        k = slots.numel()
        if k == 0:
            return
        self._head -= k  # the entries just consumed lie right before the head, so there is room
        self._log[self._head : self._head + k] = slots
        self.latest.index_copy_(
            0, slots, torch.arange(self._head, self._head + k, device=self.device)
        )

    def choose_victims(self, n: int, protected: torch.Tensor) -> torch.Tensor:
        """The ``n`` least recent unprotected slots, oldest first."""
        found: list[torch.Tensor] = []
        need = n
        while need > 0 and self._head < self._tail:
            stop = min(self._tail, self._head + max(2 * need, _MIN_SCAN))
            slots = self._log[self._head : stop]
            positions = torch.arange(self._head, stop, device=self.device)
            live = torch.index_select(self.latest, 0, slots) == positions
            usable = torch.nonzero(live & ~torch.index_select(protected, 0, slots)).squeeze(1)
            if usable.numel() > need:  # stop right after the last one taken; the rest stay queued
                usable = usable[:need]
                stop = self._head + int(usable[-1]) + 1
            taken = torch.index_select(slots, 0, usable)
            self.latest.index_fill_(0, taken, -1)  # consumed: no longer in the log
            found.append(taken)
            need -= taken.numel()
            self._head = stop
        return torch.cat(found) if found else torch.empty(0, dtype=torch.int64, device=self.device)

    def _append(self, slots: torch.Tensor) -> None:
        """Log an access to each of ``slots`` (may repeat: the last occurrence counts)."""
        m = slots.numel()
        if m == 0:
            return
        if self._tail + m > self._log.numel():
            self._compact(m)
        positions = torch.arange(self._tail, self._tail + m, device=self.device)
        self._log[self._tail : self._tail + m] = slots
        self.latest.scatter_reduce_(0, slots, positions, reduce="amax")
        self._tail += m

    def _compact(self, room: int) -> None:
        """Drop stale entries, keep live ones in order, and grow if ``room`` still does not fit."""
        slots = self._log[self._head : self._tail]
        positions = torch.arange(self._head, self._tail, device=self.device)
        live = slots[torch.index_select(self.latest, 0, slots) == positions]
        if live.numel() + room > self._log.numel():
            self._log = torch.empty(
                2 * (live.numel() + room), dtype=torch.int64, device=self.device
            )
        self._log[: live.numel()] = live
        self.latest.index_copy_(0, live, torch.arange(live.numel(), device=self.device))
        self._head, self._tail = 0, live.numel()


__all__ = ["LRU", "ScalarLRU"]

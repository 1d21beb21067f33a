"""Batched SIEVE (after Zhang et al., NSDI'24) and FIFO, over a ring of slots in insertion order.

Batched SIEVE is SIEVE applied per batch: a batch's hits set their bits, then its victims are
chosen together, then its new rows join the queue. At one lookup per batch that is SIEVE exactly;
at more it differs from per-request SIEVE (see :class:`SIEVE`).

The queue is a ring buffer of slot numbers (int32), twice the tier's capacity long: a slot that
gets a new row is appended at the tail and its old position becomes a hole; when the tail reaches
the end, the live entries are compacted to the front (amortised O(1) per insertion). The hand is a
position in that ring. Choosing ``n`` victims scans windows of the ring from the hand with a
cumulative sum over the "evictable and not visited" mask, so the cost is proportional to the
distance the hand travels, not to the tier's size.
"""

from __future__ import annotations

import torch

from .base import EvictionPolicy


class SIEVE(EvictionPolicy):
    """Batched SIEVE: FIFO order plus one visited bit per slot and a persistent hand, per batch.

    A hit sets the slot's visited bit; a new row is appended at the newest end with the bit
    clear. To evict, the hand walks from where it last stopped toward newer rows, clearing each
    set bit it passes, and evicts the first slot whose bit is clear; past the newest row it wraps
    to the oldest. It then points at the victim's newer neighbour, or, when the victim was the
    newest, at nothing: the next eviction starts from the oldest row, even if rows were added
    since (as in the paper's code and libCacheSim). ``choose_victims(n)`` gives exactly the
    ``n`` slots that ``n`` successive single evictions would (tests prove it against
    ``policies.reference.ScalarSieve``, and libCacheSim's ``Sieve`` at batch size 1). Pinned
    slots are passed over untouched; a slot emptied without a new row (``on_free``) leaves the
    queue. A victim that the admission filter turns away
    stays cached with its bit clear; the hand has moved past it.

    Batched, not per request: the tier sets the bits of all of a batch's hits before it asks for
    the batch's victims, and inserts the new rows after. That is per-request SIEVE with each
    batch reordered (hits first, then one eviction per new row, then the new rows), exactly
    (``tests/test_policies.py``). So a row the batch reads keeps its place on the hand's first
    pass, where per-request SIEVE may evict it for an earlier miss of the same batch and then
    miss it again: with rows 1 2 3 cached, bits clear, the batch ``[4, 1]`` evicts 2 here, and 1
    then 2 per request. At one lookup per batch the two agree exactly. At more, the rows read
    from cold differ little on i.i.d. Zipf lookups (20k lookups over 4,000 rows, 400 slots, 64
    lookups per batch: 40.95% batched, 41.16% per request) and much on Engram traces (1% of the
    rows, held-out prose, 64-token batches: 54.41% batched, 71.35% per request, as libCacheSim's
    ``Sieve``). For per-request SIEVE, replay with ``batch_tokens=1``.

    Parameters
    ----------
    capacity : int
        The tier's slots.
    device : torch.device or str
        Where the queue and bits live.

    Examples
    --------
    >>> import torch
    >>> sieve = SIEVE(capacity=4)
    >>> sieve.on_batch(); sieve.on_insert(torch.tensor([0, 1, 2, 3]))  # queue 0 1 2 3, oldest first
    >>> sieve.on_batch(); sieve.on_hit(torch.tensor([0, 2]))
    >>> sieve.choose_victims(2, torch.zeros(4, dtype=torch.bool)).tolist()  # 0 spared, 1 goes, 2 spared
    [1, 3]
    >>> sieve.visited.tolist()  # the hand cleared the bits it passed
    [False, False, False, False]
    """

    name = "sieve"
    #: ring (2 x int32) + position (int32) + visited bit (bool)
    bytes_per_slot = 13
    #: whether a hit sets the visited bit (FIFO turns it off)
    marks_hits = True

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        super().__init__(capacity, device)
        self.ring = torch.full((2 * capacity,), -1, dtype=torch.int32, device=self.device)
        self.position = torch.full((capacity,), -1, dtype=torch.int32, device=self.device)
        self.visited = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.tail = 0  # ring[:tail] is the queue, oldest first (holes are -1)
        self.hand = 0  # ring position of the next entry to examine

    def on_hit(self, slots: torch.Tensor) -> None:
        if self.marks_hits:
            self.visited[slots] = True

    def on_insert(self, slots: torch.Tensor) -> None:
        slots = slots.to(self.device).long()
        k = slots.numel()
        if k == 0:
            return
        old = self.position[slots].long()
        self.ring[old[old >= 0]] = -1
        if self.tail + k > self.ring.numel():
            self._compact()
        self.ring[self.tail : self.tail + k] = slots.int()
        self.position[slots] = torch.arange(
            self.tail, self.tail + k, dtype=torch.int32, device=self.device
        )
        self.tail += k
        self.visited[slots] = False

    def on_free(self, slots: torch.Tensor) -> None:
        slots = slots.to(self.device).long()
        old = self.position[slots].long()
        self.ring[old[old >= 0]] = -1  # a hole: the hand never rests on an empty slot
        self.position[slots] = -1
        self.visited[slots] = False

    def victim_priority(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """The order the hand would evict in: slots whose bit is clear, from the hand on
        (wrapping), then those whose bit is set, in the same order; slots not queued last."""
        position = self.position if slots is None else self.position[slots]
        visited = self.visited if slots is None else self.visited[slots]
        laps = max(self.tail, 1)
        key = torch.remainder(position.long() - self.hand, laps) + visited.long() * laps
        return torch.where(position >= 0, key, 2 * laps)

    def choose_victims(self, n: int, protected: torch.Tensor) -> torch.Tensor:
        chosen: list[torch.Tensor] = []
        if n <= 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        blocked = protected  # copied before the first write
        taken: torch.Tensor | None = None  # victims chosen in earlier windows of this call
        need, pos, window, scanned = n, self.hand, max(2 * n, 256), 0
        while need:
            if pos >= self.tail:
                pos = 0  # past the newest: wrap to the oldest
            if scanned >= 2 * self.tail:  # two laps clear every bit: a third finds nothing new
                raise RuntimeError(
                    f"sieve: fewer than {n} evictable slots; the tier asked too many"
                )
            end = min(pos + window, self.tail)
            seg = self.ring[pos:end].long()
            live = seg >= 0
            seg = seg.clamp(min=0)
            open_ = live & ~blocked[seg]
            seen = open_ & self.visited[seg]
            fresh = open_ & ~seen
            run = torch.cumsum(fresh, 0)
            found = int(run[-1])
            if found >= need:
                cut = int(torch.searchsorted(run, need))  # index of the need-th fresh entry
                chosen.append(seg[: cut + 1][fresh[: cut + 1]])
                self.visited[seg[:cut][seen[:cut]]] = False
                # the hand points at the victim's newer neighbour (never a victim of this call:
                # one whose candidate is refused stays, passed); none: back to the oldest
                self.hand = self._next_queued(pos + cut + 1, taken)
                need = 0
            else:
                take = seg[fresh]
                chosen.append(take)
                self.visited[seg[seen]] = False
                if blocked is protected:
                    blocked = protected.clone()
                    taken = torch.zeros_like(protected)
                blocked[take] = True  # still queued until replaced: skip it on the next lap
                taken[take] = True
                need -= found
                scanned += end - pos
                pos = end
                window *= 2
        return torch.cat(chosen)

    def _next_queued(self, start: int, taken: torch.Tensor | None) -> int:
        """Ring position of the first slot still queued (not a hole, not taken by this call) at
        or after ``start``, 0 if none; scans outward in growing windows, usually one."""
        window = 64
        while start < self.tail:
            end = min(start + window, self.tail)
            seg = self.ring[start:end].long()
            queued = seg >= 0
            if taken is not None:
                queued &= ~taken[seg.clamp(min=0)]
            if bool(queued.any()):
                return start + int(torch.argmax(queued.to(torch.uint8)))
            start, window = end, window * 4
        return 0

    def _compact(self) -> None:
        """Move the live entries to the front of the ring, keeping order and the hand's place."""
        queue = self.ring[: self.tail]
        live = queue >= 0
        self.hand = int(live[: self.hand].sum())
        entries = queue[live].clone()
        self.ring.fill_(-1)
        m = entries.numel()
        self.ring[:m] = entries
        self.position[entries.long()] = torch.arange(m, dtype=torch.int32, device=self.device)
        self.tail = m


class FIFO(SIEVE):
    """First in, first out: SIEVE without visited bits, so the hand evicts in insertion order.

    Examples
    --------
    >>> import torch
    >>> fifo = FIFO(capacity=3)
    >>> fifo.on_batch(); fifo.on_insert(torch.tensor([2, 0, 1]))
    >>> fifo.on_batch(); fifo.on_hit(torch.tensor([2]))
    >>> fifo.choose_victims(2, torch.zeros(3, dtype=torch.bool)).tolist()
    [2, 0]
    """

    name = "fifo"
    marks_hits = False

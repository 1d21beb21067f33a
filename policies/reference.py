"""Scalar reference policies: one request at a time, plain Python containers, written for clarity.

They define what the batched policies must do: at batch size 1 the batched policy driven through a
``RowCache`` makes exactly the decisions of its reference here (``tests/test_policies.py``). They are
slow and meant for tests and small examples only.

Every reference cache follows the store's order of events for one request: the admission filter (if
any) records the id, the index is probed, a hit updates the policy, a miss is inserted into a free
slot if there is one, otherwise the eviction policy names a victim, the filter compares the two and
the candidate either replaces the victim or is turned away (the victim stays).
"""

from __future__ import annotations

from collections import OrderedDict

from .tinylfu import MASK64, mix64_int, row_seeds, sketch_width


class ScalarCache:
    """A reference cache of ``capacity`` rows over single requests; subclasses choose the victim.

    Parameters
    ----------
    capacity : int
        Rows the cache holds.
    admission : ScalarTinyLFU, optional
        Admission filter consulted when a miss would evict; None admits every miss.

    Examples
    --------
    >>> cache = ScalarLRU(2)
    >>> [cache.access(r) for r in [1, 2, 1, 3, 2]]
    [False, False, True, False, False]
    """

    def __init__(self, capacity: int, admission: ScalarTinyLFU | None = None) -> None:
        self.capacity = capacity
        self.admission = admission

    def access(self, row: int) -> bool:
        """Returns True on a hit; on a miss admits ``row`` as the policies say."""
        if self.admission is not None and self.capacity:
            self.admission.record(row)
        if row in self:
            self._hit(row)
            return True
        if self.capacity == 0:
            return False
        if len(self) >= self.capacity:
            victim = self._victim()
            if self.admission is not None and not self.admission.admit(row, victim):
                return False
            self._remove(victim)
        self._insert(row)
        return False

    # -- what a subclass defines -----------------------------------------------------------------
    def __contains__(self, row: int) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _hit(self, row: int) -> None:
        """A resident row was read."""
        raise NotImplementedError

    def _victim(self) -> int:
        """The row to evict next (may move internal state, like SIEVE's hand)."""
        raise NotImplementedError

    def _remove(self, row: int) -> None:
        """Drop the victim."""
        raise NotImplementedError

    def _insert(self, row: int) -> None:
        """Add a new row."""
        raise NotImplementedError


class ScalarLRU(ScalarCache):
    """Reference LRU: an ordered dict, least recent first."""

    def __init__(self, capacity: int, admission: ScalarTinyLFU | None = None) -> None:
        super().__init__(capacity, admission)
        self.entries: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, row: int) -> bool:
        return row in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _hit(self, row: int) -> None:
        self.entries.move_to_end(row)

    def _victim(self) -> int:
        return next(iter(self.entries))

    def _remove(self, row: int) -> None:
        del self.entries[row]

    def _insert(self, row: int) -> None:
        self.entries[row] = None


class ScalarSieve(ScalarCache):
    """Reference SIEVE (Zhang et al., NSDI'24): a FIFO queue with a visited bit per row and a hand.

    The queue runs oldest to newest; new rows join at the newest end with the bit clear, a hit sets
    the bit. To evict, the hand walks from where it stopped toward newer rows, clearing set bits,
    and stops at the first clear one; past the newest it wraps to the oldest. The hand then points
    at the victim's newer neighbour, or nowhere if the victim was the newest (the next eviction
    starts from the oldest, even if rows were added since): libCacheSim's ``Sieve`` exactly. A
    victim the admission filter turns away stays where it is.

    Examples
    --------
    >>> cache = ScalarSieve(2)
    >>> [cache.access(r) for r in [1, 2, 1, 3, 1, 2]]  # 3 evicts 2 (1 was visited), not 1
    [False, False, True, False, True, False]
    """

    #: whether a hit sets the visited bit (False turns this into FIFO)
    marks_hits = True

    def __init__(self, capacity: int, admission: ScalarTinyLFU | None = None) -> None:
        super().__init__(capacity, admission)
        self.queue: list[int] = []  # oldest first
        self.visited: dict[int, bool] = {}
        self.hand: int | None = None  # the row the hand points at; None: start from the oldest

    def __contains__(self, row: int) -> bool:
        return row in self.visited

    def __len__(self) -> int:
        return len(self.queue)

    def _hit(self, row: int) -> None:
        if self.marks_hits:
            self.visited[row] = True

    def _victim(self) -> int:
        i = 0 if self.hand is None else self.queue.index(self.hand)
        while self.visited[self.queue[i]]:
            self.visited[self.queue[i]] = False
            i = i + 1 if i + 1 < len(self.queue) else 0
        self.hand = self.queue[i + 1] if i + 1 < len(self.queue) else None
        return self.queue[i]

    def _remove(self, row: int) -> None:
        self.queue.remove(row)
        del self.visited[row]

    def _insert(self, row: int) -> None:
        self.queue.append(row)
        self.visited[row] = False


class ScalarFIFO(ScalarSieve):
    """Reference FIFO: SIEVE whose hits set nothing, so the hand evicts in insertion order."""

    marks_hits = False


class ScalarLFU(ScalarCache):
    """Reference LFU with aging: evict the lowest count, ties to the least recently used.

    A hit adds 1 to the row's count, a new row starts at 1; both are accesses. Every
    ``aging_period`` accesses all counts are halved (rounding down).

    Examples
    --------
    >>> cache = ScalarLFU(2)
    >>> [cache.access(r) for r in [1, 1, 2, 3, 1, 2]]  # 3 evicts 2: count 1 against 1's 2
    [False, True, False, False, True, False]
    """

    def __init__(
        self, capacity: int, aging_period: int | None = None, admission: ScalarTinyLFU | None = None
    ) -> None:
        super().__init__(capacity, admission)
        self.aging_period = aging_period if aging_period is not None else max(10 * capacity, 1)
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.time = 0
        self.accesses = 0

    def access(self, row: int) -> bool:
        self.time += 1
        return super().access(row)

    def __contains__(self, row: int) -> bool:
        return row in self.count

    def __len__(self) -> int:
        return len(self.count)

    def _touch(self, row: int, count: int) -> None:
        """Set the count and recency of ``row`` and age every count when a period ends."""
        self.count[row] = count
        self.last[row] = self.time
        self.accesses += 1
        if self.accesses >= self.aging_period:
            self.accesses -= self.aging_period
            self.count = {r: c >> 1 for r, c in self.count.items()}

    def _hit(self, row: int) -> None:
        self._touch(row, self.count[row] + 1)

    def _victim(self) -> int:
        return min(self.count, key=lambda r: (self.count[r], self.last[r]))

    def _remove(self, row: int) -> None:
        del self.count[row]
        del self.last[row]

    def _insert(self, row: int) -> None:
        self._touch(row, 1)


class ScalarTinyLFU:
    """Reference TinyLFU admission: a count-min sketch of saturating counters, aged by halving.

    Same hash, sizes and aging as ``policies.tinylfu.TinyLFU``; one id at a time.

    Examples
    --------
    >>> f = ScalarTinyLFU(capacity=4)
    >>> for row in [5, 5, 9]:
    ...     f.record(row)
    >>> f.frequency(5), f.admit(9, 5), f.admit(5, 9)
    (2, False, True)
    """

    def __init__(
        self,
        capacity: int,
        *,
        depth: int = 4,
        width_factor: int = 8,
        max_count: int = 15,
        sample_factor: int = 10,
        seed: int = 0,
    ) -> None:
        self.width = sketch_width(capacity, width_factor)
        self.max_count = max_count
        self.sample_size = max(sample_factor * capacity, 1)
        self.seeds = row_seeds(seed, depth)
        self.rows = [[0] * self.width for _ in range(depth)]
        self.additions = 0

    def _buckets(self, row: int) -> list[int]:
        """The bucket of ``row`` in each sketch row."""
        return [mix64_int((row & MASK64), s) & (self.width - 1) for s in self.seeds]

    def record(self, row: int) -> None:
        """Count one access; halve every counter when the sample is full."""
        for counters, b in zip(self.rows, self._buckets(row), strict=True):
            counters[b] = min(counters[b] + 1, self.max_count)
        self.additions += 1
        if self.additions >= self.sample_size:
            self.rows = [[c >> 1 for c in counters] for counters in self.rows]
            self.additions //= 2

    def frequency(self, row: int) -> int:
        """Estimated recent accesses of ``row`` (never below the truth, capped)."""
        return min(c[b] for c, b in zip(self.rows, self._buckets(row), strict=True))

    def admit(self, candidate: int, victim: int) -> bool:
        """True when ``candidate`` is estimated more frequent than ``victim``."""
        return self.frequency(candidate) > self.frequency(victim)

"""A tier's next victims in a request queue's order, found by one pass over the tier and handed
out over many batches.

With requests queued (``tiered_store.request_queue``) a tier evicts rows no queued request looks
up first, in the policy's order, then the queued rows whose next request is furthest back. Once
the queue holds many rows, the oldest rows by the policy's order are mostly queued ones, and a
search from the front of that order found too few others: it passed over every evictable slot
each batch. This keeps two runs of candidates from one such pass, each valid over many batches:

- *unqueued*: every evictable slot no queued request looks up whose key is at most the last's,
  ascending (the policy's order; keys only grow, so a slot looked up since leaves the run);
- *queued*: every evictable queued slot whose next use is at least the last's, furthest first,
  then by slot.

A run is dropped when an event can bring a slot into its range (a release, an unpin, a
reinstated victim, a request announced for the queued run) and refilled by the next pass; the
picks are those of a pass per batch (``tests/test_request_queue.py`` checks them in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from policies.base import EvictionPolicy

from .request_queue import NOT_QUEUED


@dataclass
class _Run:
    """Candidates of one class in eviction order, with their key (or next use) at the fill."""

    slots: torch.Tensor
    marks: torch.Tensor
    complete: bool  # held every slot of its class at the fill, and none has joined the class since


def furthest_first(slots: torch.Tensor, next_use: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` entries of ``slots`` (ascending) needed furthest back, furthest
    first, then by slot: every entry whose next use is at least the ``k``-th largest, ordered."""
    if k < next_use.numel():
        kth = torch.topk(next_use, k, sorted=False).values.min()
        keep = torch.nonzero(next_use >= kth).squeeze(1)
    else:
        keep = torch.arange(next_use.numel(), device=next_use.device)
    order = torch.sort(-next_use[keep], stable=True).indices
    return keep[order]


class QueueVictims:
    """Victims by the queue for a policy whose keys only grow (LRU), from runs of candidates.

    ``unevictable`` and ``next_use`` are the tier's per-slot tensors (updated in place by the
    tier); ``spare(n)``: how many candidates a pass keeps when ``n`` are needed now."""

    def __init__(
        self,
        eviction: EvictionPolicy,
        unevictable: torch.Tensor,
        next_use: torch.Tensor,
        spare: Callable[[int], int],
    ) -> None:
        self.eviction = eviction
        self.unevictable = unevictable
        self.next_use = next_use
        self.spare = spare
        self.unqueued: _Run | None = None
        self.queued: _Run | None = None
        self.passes = 0  # passes over the tier's slots (a benchmark's and the tests' figure)

    def pick(self, need: int, want: int) -> torch.Tensor:
        """Up to ``want`` unqueued victims in the policy's order; if fewer exist, all of them and
        then queued ones, furthest first, up to ``need`` in all."""
        first = self._take(want, queued=False)
        short = need - first.numel()
        if short <= 0:
            return first
        return torch.cat([first, self._take(short, queued=True)])

    def drop(self) -> None:
        """Forget both runs: slots may have entered their ranges."""
        self.unqueued = self.queued = None

    def announced(self) -> None:
        """A request joined the queue: its held rows are now needed furthest back of all."""
        self.queued = None

    def admitted(self, next_use: torch.Tensor) -> None:
        """Rows were admitted with these next uses (their keys are the newest: past the unqueued
        run's range)."""
        if not next_use.numel():
            return
        if self.unqueued is not None and bool((next_use == NOT_QUEUED).any()):
            self.unqueued.complete = False
        run = self.queued
        if run is not None:
            queued = next_use[next_use != NOT_QUEUED]
            if queued.numel() and (not run.marks.numel() or bool((queued >= run.marks[-1]).any())):
                self.queued = None  # within the run's range: a new pass places them
            elif queued.numel():
                run.complete = False

    # -- internals -------------------------------------------------------------------------------
    def _take(self, n: int, *, queued: bool) -> torch.Tensor:
        """The first ``n`` still-valid candidates of a class (fewer only when the class has
        fewer), refilling its run by a pass when it runs short before its range ends."""
        for _ in range(2):
            run = self.queued if queued else self.unqueued
            if run is None:
                run = self._fill(n, queued=queued)
            size = run.slots.numel()
            for head in (4 * n + 64, size) if 4 * n + 64 < size else (size,):
                slots, marks = run.slots[:head], run.marks[:head]
                valid = self._valid(slots, marks, queued=queued, run=run)
                taken = slots[valid]
                if taken.numel() >= n or (head == size and run.complete):
                    rest = slice(head, None)
                    run.slots = torch.cat([taken[n:], run.slots[rest]])
                    run.marks = torch.cat([marks[valid][n:], run.marks[rest]])
                    return taken[:n]
            if queued:
                self.queued = None
            else:
                self.unqueued = None
        raise AssertionError("a fresh pass holds what is asked or the whole class")

    def _valid(
        self, slots: torch.Tensor, marks: torch.Tensor, *, queued: bool, run: _Run
    ) -> torch.Tensor:
        """Entries still in their class with their mark unchanged (and still evictable)."""
        evictable = ~self.unevictable[slots]
        next_use = self.next_use[slots]
        if queued:
            return evictable & (next_use == marks)
        unqueued = evictable & (next_use == NOT_QUEUED)
        same = self.eviction.victim_priority(slots) == marks
        if run.complete and not bool((same | ~unqueued).all()):
            run.complete = False  # looked up since: still unqueued, past the run's range
        return unqueued & same

    def _fill(self, n: int, *, queued: bool) -> _Run:
        """One pass over the evictable slots: the run of a class, at least ``n`` (and spares for
        later batches) or all of it."""
        self.passes += 1
        flags = self.unevictable
        if flags.device.type == "cpu":  # numpy's pass over the flags is the cheaper one
            evictable = torch.from_numpy(np.flatnonzero(~flags.numpy()))
        else:
            evictable = torch.nonzero(~flags).squeeze(1)
        next_use = self.next_use[evictable]
        in_class = next_use != NOT_QUEUED if queued else next_use == NOT_QUEUED
        slots = evictable[in_class]
        size = min(self.spare(n), slots.numel())
        if queued:
            next_use = next_use[in_class]
            order = furthest_first(slots, next_use, size)
            run = _Run(slots[order], next_use[order], order.numel() == slots.numel())
        else:
            keys = self.eviction.victim_priority(slots)
            keys, order = torch.topk(keys, size, largest=False, sorted=True)
            run = _Run(slots[order], keys, size == slots.numel())
        if queued:
            self.queued = run
        else:
            self.unqueued = run
        return run

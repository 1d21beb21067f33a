"""A tier's next victims in a request queue's order, kept up to date as the queue changes.

With requests queued (``tiered_store.request_queue``) a tier evicts rows no queued request looks
up first, in the policy's order, then the queued rows whose next request is furthest back, then
by slot. Once the queue holds many rows, the oldest rows by the policy's order are mostly queued
ones, and a search from the front of that order found too few others: it passed over every
evictable slot each batch. This keeps, from one such pass, candidates of each class:

- *unqueued*: a run of every evictable slot no queued request looks up whose key is at most a
  limit, ascending (the policy's order; keys only grow);
- *queued*: per request token, down to a limit, every evictable slot whose next use it is,
  ascending; tokens are taken furthest first.

Lookups and evictions only take slots out of a class or push them past its limit, so a
candidate is checked when it comes up (key, or next use, unchanged; still evictable) and skipped
if not. Slots that enter a class within its limit (a release moves rows to a later
request or out of the queue, an announcement moves rows into it, rows are admitted, unpinned,
or a victim is reinstated) are merged in by ``changed``. A pass over the tier is needed only when
candidates run out before the limit, or after a merge or a pick failed (out of memory: told
again, a change would find its slots moved already and merge none; a pick's candidates taken
were never evicted). The picks are exactly those of a pass per eviction
(``tests/test_request_queue.py`` checks them in lockstep).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from policies.base import EvictionPolicy, smallest

from .id_ops import nonzero
from .request_queue import NOT_QUEUED

GROW = 4  # a class's candidates past GROW x what a pass keeps are cut back to that (stale ones)


@dataclass
class _Unqueued:
    """Unqueued candidates by key: every evictable unqueued slot with key <= ``limit`` (any key,
    when ``complete``), and possibly stale entries."""

    slots: torch.Tensor
    keys: torch.Tensor  # ascending, distinct
    limit: int
    complete: bool


@dataclass
class _Queued:
    """Queued candidates per token: every evictable slot whose next use is a token >= ``limit``
    (any, when ``complete``), and possibly stale entries. Slots that join a token wait in
    ``pending`` until the token's turn comes (most join the request being served, the last to
    be taken from)."""

    buckets: dict[int, torch.Tensor]  # token -> slots, ascending
    limit: int
    complete: bool
    pending: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the slots held, stale and waiting ones included."""
        waiting = sum(t.nbytes for chunks in self.pending.values() for t in chunks)
        return waiting + sum(b.nbytes for b in self.buckets.values())

    def size(self) -> int:
        """Entries held, stale ones included."""
        waiting = sum(t.numel() for chunks in self.pending.values() for t in chunks)
        return waiting + sum(b.numel() for b in self.buckets.values())

    def forget(self, token: int) -> None:
        """A released token: no slot waits for it any more."""
        self.buckets.pop(token, None)
        self.pending.pop(token, None)

    def take_out(self, tokens: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots of ``tokens`` (descending), those waiting merged in, out of the class: by
        token as given, then ascending, each once; and each one's token. ``size``: the tier's
        slots."""
        parts: list[torch.Tensor] = []
        owner: list[int] = []  # each part's place in ``tokens``
        for i, token in enumerate(tokens):
            chunks = self.pending.pop(token, [])
            old = self.buckets.pop(token, None)
            parts += chunks if old is None else [*chunks, old]
            owner += [i] * (len(chunks) + (old is not None))
        slots = torch.cat(parts)  # not empty: each token has a bucket or a list waiting
        lengths = torch.tensor([p.numel() for p in parts], device=slots.device)
        at = torch.repeat_interleave(torch.tensor(owner, device=slots.device), lengths)
        key = torch.unique(at * size + slots)  # sorted: by place, then by slot; each once
        token_of = torch.tensor(tokens, dtype=torch.int64, device=slots.device)
        return key % size, token_of[key // size]

    def put_back(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """``slots`` (by token, then ascending) go back into their tokens' buckets."""
        self.buckets.update(_by_token(slots, tokens))


def furthest_first(slots: torch.Tensor, next_use: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` entries of ``slots`` (ascending) needed furthest back, furthest
    first, then by slot: every entry whose next use is at least the ``k``-th largest, ordered
    (none for ``k`` <= 0)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=next_use.device)
    if k < next_use.numel():
        kth = torch.topk(next_use, k, sorted=False).values.min()
        keep = torch.nonzero(next_use >= kth).squeeze(1)
    else:
        keep = torch.arange(next_use.numel(), device=next_use.device)
    order = torch.sort(-next_use[keep], stable=True).indices
    return keep[order]


class QueueVictims:
    """Victims by the queue for a policy whose keys only grow (LRU).

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
        self.unqueued: _Unqueued | None = None
        self.queued: _Queued | None = None
        # slots ``changed`` since the last pick, merged in by the next (or once they are many):
        # a batch's news (a served batch's finished rows, its hits' keys) merged once, as of then
        self._changes: list[torch.Tensor] = []
        self._changed = 0  # slots in ``_changes``
        self.passes = 0  # passes over the tier's slots (a benchmark's and the tests' figure)

    @property
    def nbytes(self) -> int:
        """Bytes of the candidates held now, both classes, and the changed slots to merge."""
        run = self.unqueued
        unqueued = 0 if run is None else run.slots.nbytes + run.keys.nbytes
        changes = sum(t.nbytes for t in self._changes)
        return changes + unqueued + (0 if self.queued is None else self.queued.nbytes)

    def pick(self, need: int, want: int) -> torch.Tensor:
        """Up to ``want`` unqueued victims in the policy's order; if fewer exist, all of them and
        then queued ones, furthest first, up to ``need`` in all."""
        try:
            self._merge_changes()
            first = self._take_unqueued(want)
            short = need - first.numel()
            if short <= 0:
                return first
            return torch.cat([first, self._take_queued(short)])
        except BaseException:  # (out of memory) candidates taken out, never evicted: the next
            self.drop()  # pick passes over the tier
            raise

    def drop(self) -> None:
        """Forget every candidate: the next pick passes over the tier."""
        self.unqueued = self.queued = None
        self._changes, self._changed = [], 0

    def released(self, token: int) -> None:
        """Request ``token`` left the queue (its slots then ``changed``): its candidates go."""
        if self.queued is not None:
            self.queued.forget(token)

    def changed(self, slots: torch.Tensor) -> None:
        """``slots`` may have entered a class within its limit (their next use changed, they were
        admitted, unpinned or reinstated): the next pick merges them in, as they are then (their
        next use, key and pin flag: what a merge now would hold once those changes came)."""
        if not slots.numel() or (self.unqueued is None and self.queued is None):
            return
        self._changes.append(slots)
        self._changed += slots.numel()
        if self._changed > self.spare(1):  # many batches without a pick: merge, stop growing
            self._merge_changes()

    def _merge_changes(self) -> None:
        """Merge in the slots ``changed`` since the last merge."""
        if not self._changes:
            return
        changes = self._changes
        self._changes, self._changed = [], 0
        slots = changes[0] if len(changes) == 1 else torch.cat(changes)
        try:
            slots = slots.index_select(0, nonzero(~self.unevictable[slots]))
            next_use = self.next_use[slots]
            free = next_use == NOT_QUEUED
            if self.unqueued is not None:
                self._merge_unqueued(slots.index_select(0, nonzero(free)))
            if self.queued is not None:
                queued = nonzero(~free)
                self._merge_queued(slots.index_select(0, queued), next_use.index_select(0, queued))
        except BaseException:  # (out of memory) merged in part or not at all, and the change
            self.drop()  # told again finds the next uses set and merges none: a pass instead
            raise

    # -- the unqueued class -----------------------------------------------------------------------
    def _take_unqueued(self, n: int) -> torch.Tensor:
        """The first ``n`` valid unqueued candidates (fewer only when the class has fewer)."""
        for _ in range(2):
            run = self.unqueued if self.unqueued is not None else self._fill_unqueued(n)
            size = run.slots.numel()
            for head in (4 * n + 64, size) if 4 * n + 64 < size else (size,):
                slots, keys = run.slots[:head], run.keys[:head]
                unqueued = ~self.unevictable[slots] & (self.next_use[slots] == NOT_QUEUED)
                same = self.eviction.victim_priority(slots) == keys
                valid = nonzero(unqueued & same)
                moved = unqueued & ~same  # looked up since: in the class under a newer key,
                if run.complete and bool(moved.any()):  # which may rank before valid entries
                    run.slots = torch.cat([slots.index_select(0, valid), run.slots[head:]])
                    run.keys = torch.cat([keys.index_select(0, valid), run.keys[head:]])
                    self._merge_unqueued(slots.index_select(0, nonzero(moved)))
                    return self._take_unqueued(n)  # the head holds no stale entry now
                taken = slots.index_select(0, valid)
                if taken.numel() >= n or (head == size and run.complete):
                    run.slots = torch.cat([taken[n:], run.slots[head:]])
                    run.keys = torch.cat([keys.index_select(0, valid)[n:], run.keys[head:]])
                    return taken[:n]
            self.unqueued = None  # ran short before its limit
        raise AssertionError("a fresh pass holds what is asked or the whole class")

    def _fill_unqueued(self, n: int) -> _Unqueued:
        """One pass: the unqueued class's ``spare(n)`` smallest keys (or all of it)."""
        slots, _ = self._pass(queued=False)
        keys = self.eviction.victim_priority(slots)
        size = min(self.spare(n), slots.numel())
        keys, order = smallest(keys, size, distinct=True)
        limit = int(keys[-1]) if size else 0
        self.unqueued = _Unqueued(slots[order], keys, limit, size == slots.numel())
        return self.unqueued

    def _merge_unqueued(self, slots: torch.Tensor) -> None:
        """Unqueued evictable ``slots`` joined the class: those within the limit go in by key."""
        run = self.unqueued
        if run is None or not slots.numel():
            return
        keys = self.eviction.victim_priority(slots)
        if not run.complete:
            within = nonzero(keys <= run.limit)
            if not within.numel():  # (a batch's hits and admissions: keys past the limit)
                return
            slots, keys = slots.index_select(0, within), keys.index_select(0, within)
        keys, order = torch.sort(keys)
        slots = slots[order]
        once = torch.ones_like(keys, dtype=torch.bool)  # a slot named twice (two stale entries)
        once[1:] = keys[1:] != keys[:-1]
        slots, keys = slots[once], keys[once]
        at = torch.searchsorted(run.keys, keys)
        if run.keys.numel():  # an entry whose key is unchanged is still where it belongs
            new = run.keys[at.clamp(max=run.keys.numel() - 1)] != keys
            slots, keys, at = slots[new], keys[new], at[new]
        if not slots.numel():
            return
        run.slots, run.keys = _merged(run.slots, run.keys, slots, keys, at)
        keep = self.spare(1)
        if run.slots.numel() > GROW * keep:  # keep the front, stop growing
            run.slots, run.keys = run.slots[:keep], run.keys[:keep]
            run.limit, run.complete = int(run.keys[-1]), False

    # -- the queued class -------------------------------------------------------------------------
    def _take_queued(self, n: int) -> torch.Tensor:
        """The first ``n`` valid queued candidates, furthest token first, then by slot."""
        for _ in range(2):
            run = self.queued if self.queued is not None else self._fill_queued(n)
            tokens = sorted(run.buckets.keys() | run.pending.keys(), reverse=True)
            taken: list[torch.Tensor] = []
            got, start, width = 0, 0, 16
            while got < n and start < len(tokens):  # tokens in growing groups: a loop per group
                slots, owner = run.take_out(tokens[start : start + width], self.next_use.numel())
                start, width = start + width, 2 * width
                valid = nonzero(~self.unevictable[slots] & (self.next_use[slots] == owner))
                taken.append(slots.index_select(0, valid[: n - got]))
                rest = valid[n - got :]  # stale entries go
                run.put_back(slots.index_select(0, rest), owner.index_select(0, rest))
                got += taken[-1].numel()
            if got == n or run.complete:
                return torch.cat(taken) if taken else self.next_use.new_empty(0)
            self.queued = None  # ran short before its limit
        raise AssertionError("a fresh pass holds what is asked or the whole class")

    def _fill_queued(self, n: int) -> _Queued:
        """One pass: the queued class's slots of the furthest tokens, at least ``spare(n)`` of
        them (whole tokens), or all of it."""
        slots, next_use = self._pass(queued=True)
        order = furthest_first(slots, next_use, min(self.spare(n), slots.numel()))
        complete = order.numel() == slots.numel()
        buckets = _by_token(slots[order], next_use[order])
        self.queued = _Queued(buckets, min(buckets, default=0), complete)
        return self.queued

    def _merge_queued(self, slots: torch.Tensor, next_use: torch.Tensor) -> None:
        """Queued evictable ``slots`` (with their next uses) joined the class: those within the
        limit go into their token's bucket."""
        run = self.queued
        if run is None or not slots.numel():
            return
        if not run.complete:
            within = next_use >= run.limit
            slots, next_use = slots[within], next_use[within]
        if not slots.numel():
            return
        next_use, order = torch.sort(next_use, stable=True)  # a token's slots in the order given
        for token, part in _by_token(slots[order], next_use).items():  # per request, not per row
            run.pending.setdefault(token, []).append(part)
        keep = self.spare(1)
        if run.size() > GROW * keep:  # keep the furthest tokens' slots, stop growing
            tokens = sorted(run.buckets.keys() | run.pending.keys(), reverse=True)
            slots, owner = run.take_out(tokens, self.next_use.numel())
            valid = nonzero(~self.unevictable[slots] & (self.next_use[slots] == owner))
            slots, owner = slots.index_select(0, valid), owner.index_select(0, valid)
            run.limit = int(owner[keep - 1]) if slots.numel() >= keep else tokens[-1]
            run.complete = run.complete and run.limit == tokens[-1]  # none forgotten
            kept = nonzero(owner >= run.limit)  # up to the token of the keep-th slot
            run.put_back(slots.index_select(0, kept), owner.index_select(0, kept))

    # -- the pass ---------------------------------------------------------------------------------
    def _pass(self, *, queued: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The evictable slots of a class (ascending) and their next uses: a pass over the tier."""
        self.passes += 1
        flags = self.unevictable
        evictable = nonzero(~flags)
        next_use = self.next_use[evictable]
        in_class = nonzero(next_use != NOT_QUEUED if queued else next_use == NOT_QUEUED)
        return evictable.index_select(0, in_class), next_use.index_select(0, in_class)


def _by_token(slots: torch.Tensor, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """``slots`` grouped by their ``tokens`` (runs of equal tokens: sorted by token), in order."""
    values, counts = torch.unique_consecutive(tokens, return_counts=True)
    return dict(zip(values.tolist(), torch.split(slots, counts.tolist()), strict=True))


def _merged(
    slots: torch.Tensor,
    keys: torch.Tensor,
    new_slots: torch.Tensor,
    new_keys: torch.Tensor,
    at: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (slots, keys) with the sorted new entries inserted at ``at`` (their
    ``searchsorted`` positions): one scatter, no sort of the whole."""
    total = keys.numel() + new_keys.numel()
    new_at = at + torch.arange(new_keys.numel(), device=keys.device)
    old = torch.ones(total, dtype=torch.bool, device=keys.device)
    old[new_at] = False
    out_slots, out_keys = slots.new_empty(total), keys.new_empty(total)
    out_slots[new_at], out_keys[new_at] = new_slots, new_keys
    out_slots[old], out_keys[old] = slots, keys
    return out_slots, out_keys

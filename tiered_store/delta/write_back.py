"""Write-back of a store's written rows: dirty cached rows, rows spilled on eviction, and the delta.

A write updates every cached copy of a row in place (hot and warm) and marks those slots dirty;
a row cached nowhere goes to the pending buffer (host RAM). When the policy evicts a dirty slot,
its row is copied to the pending buffer before the slot is reused (``RowCache.before_evict``).
``commit`` gathers pending + dirty rows and writes them to the LMDB delta in one transaction;
until then they live only in memory. Cold reads see the newest version: base, then the delta,
then the pending buffer. All of it runs under the store's lock.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DeltaCorruptError
from ..row_cache import RowCache
from ..slot_pool import SlotPool
from .row_delta import RowDelta

__all__ = ["PendingRows", "WriteBack", "merge_last_wins"]

# rows per read transaction of the delta: a store that pins one commit (a reader) lets one thread
# at a time into its transaction, so a restore's read off the store's lock holds a lookup of a
# delta row (under the lock: every lookup) for one slice at most (~30 ms), never a whole step
DELTA_READ_ROWS = 16_384


class PendingRows:
    """Rows written (or spilled) since the last commit that no tier holds: sorted unique ids and
    their rows, on the host.

    Examples
    --------
    >>> p = PendingRows(2, torch.float32)
    >>> p.merge(torch.tensor([4, 1]), torch.tensor([[4.0, 4], [1, 1]]))
    >>> p.merge(torch.tensor([4, 7]), torch.tensor([[5.0, 5], [7, 7]]))
    >>> p.ids.tolist(), p.rows[:, 0].tolist()
    ([1, 4, 7], [1.0, 5.0, 7.0])
    """

    def __init__(self, width: int, dtype: torch.dtype) -> None:
        self.ids = torch.empty(0, dtype=torch.int64)
        self.rows = torch.empty((0, width), dtype=dtype)

    def __len__(self) -> int:
        return self.ids.numel()

    def merge(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Add or replace rows (``ids`` unique, CPU); the new version wins."""
        if ids.numel() == 0:
            return
        if self.ids.numel() == 0 and _is_sorted(ids):
            self.ids, self.rows = ids.cpu().clone(), rows.cpu().clone()
            return
        self.ids, self.rows = merge_last_wins([self.ids, ids.cpu()], [self.rows, rows.cpu()])

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of ``ids`` held here, their positions in ``rows`` where held)."""
        if self.ids.numel() == 0:
            return torch.zeros(ids.shape, dtype=torch.bool), torch.zeros(0, dtype=torch.int64)
        pos = torch.searchsorted(self.ids, ids).clamp(max=self.ids.numel() - 1)
        held = self.ids[pos] == ids
        return held, pos[held]

    def clear(self) -> None:
        """Drop everything (after a commit made it durable)."""
        self.ids = self.ids[:0]
        self.rows = self.rows[:0]


def _is_sorted(ids: torch.Tensor) -> bool:
    """Strictly increasing (sorted and unique)."""
    return ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all())


def merge_last_wins(
    ids: list[torch.Tensor], rows: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids of the concatenation and, for each, its row from the last occurrence
    (a stable radix sort, then the last of each run of equal ids).

    Examples
    --------
    >>> ids, rows = merge_last_wins([torch.tensor([5, 2, 5])], [torch.tensor([[1.0], [2], [3]])])
    >>> ids.tolist(), rows.tolist()
    ([2, 5], [[2.0], [3.0]])
    """
    all_ids = torch.cat(ids).numpy()
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    last = np.r_[sorted_ids[1:] != sorted_ids[:-1], True][: sorted_ids.size]  # none: none
    keep = torch.from_numpy(order[last])
    return torch.from_numpy(sorted_ids[last]), torch.cat(rows)[keep]


class _DirtyTier:
    """One cache tier, its payload pool and which of its slots hold unwritten rows."""

    def __init__(self, cache: RowCache, pool: SlotPool) -> None:
        self.cache, self.pool = cache, pool
        self.dirty = torch.zeros(cache.capacity, dtype=torch.bool, device=cache.device)

    def held(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots holding ``ids`` here, the mask of ``ids`` held, CPU)."""
        slots = self.cache.probe(ids.to(self.cache.device))
        held = slots >= 0
        return slots[held], held.cpu()

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite the cached copies in ``slots`` (``held``'s) with ``rows``."""
        if slots.numel():
            self.pool.write(slots, rows)
            self.dirty[slots] = True

    def drop(self, slots: torch.Tensor) -> None:
        """Empty ``slots`` (``held``'s), dirty or not: their rows are newer elsewhere."""
        self.dirty[slots] = False
        self.cache.drop(slots)

    def dirty_ids(self) -> torch.Tensor:
        """The ids of the dirty slots, on the host."""
        return self.cache.row_of_slot[torch.nonzero(self.dirty).squeeze(1)].cpu()

    def dirty_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows) of the dirty slots, on the host."""
        slots = torch.nonzero(self.dirty).squeeze(1)
        return self.cache.row_of_slot[slots].cpu(), self.pool.gather(slots).cpu()


class WriteBack:
    """The write path of one store: write, spill on eviction, overlay cold reads, commit.

    Parameters
    ----------
    delta : RowDelta
        The table's LMDB delta (committed rows).
    tiers : list of (RowCache, SlotPool)
        The store's cache tiers, lowest first (warm, then hot: the hot copy wins at commit).
    width, dtype
        A stored row's shape.
    """

    def __init__(
        self,
        delta: RowDelta,
        tiers: list[tuple[RowCache, SlotPool]],
        width: int,
        dtype: torch.dtype,
    ) -> None:
        self.delta = delta
        self.tiers = [_DirtyTier(cache, pool) for cache, pool in tiers if cache.capacity]
        self.width, self.dtype = width, dtype
        self.pending = PendingRows(width, dtype)
        self.delta_ids = delta.ids()  # sorted: which cold reads need the delta
        self.spilled_rows = 0  # dirty rows copied out of a tier on eviction
        self.rows_written = 0
        for tier in self.tiers:
            tier.cache.before_evict = self._spiller(tier)

    @property
    def dirty_rows(self) -> int:
        """Distinct rows written since the last commit (pending, dirty in a tier, or both)."""
        ids = [self.pending.ids, *(t.dirty_ids() for t in self.tiers)]
        return int(torch.unique(torch.cat(ids)).numel())

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Make ``rows`` the current version of unique ``ids`` (CPU int64; rows CPU). One that
        raises (out of memory) part way leaves the tiers written before holding the new rows,
        pending the rows no such tier holds, and the other tiers none of them: no tier keeps an
        older version beside a newer one (out of memory again in that merge, the rows only the
        other tiers held stay old there, the others are emptied: each row old or new)."""
        held = [tier.held(ids) for tier in self.tiers]
        cached = torch.zeros(ids.shape, dtype=torch.bool)
        for _, mask in held:
            cached |= mask
        in_pending, _ = self.pending.find(ids)
        to_pending = ~cached | in_pending  # cached nowhere, or an older version waits in pending
        self.pending.merge(ids[to_pending], rows[to_pending])  # first: its failure changes nothing
        written = 0
        try:
            for tier, (slots, mask) in zip(self.tiers, held, strict=True):
                tier.write(slots, rows[mask])
                written += 1
        except BaseException:
            self._unwrite(ids, rows, held, to_pending, written)
            raise
        self.rows_written += ids.numel()

    def _unwrite(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        held: list[tuple[torch.Tensor, torch.Tensor]],
        newer: torch.Tensor,
        written: int,
    ) -> None:
        """A write that raised once its first ``written`` tiers took the rows (``held``'s, and
        ``newer``: the mask of ``ids`` pending took): pending takes the rows no written tier
        holds, then the other tiers' copies of every row held newer elsewhere are emptied."""
        for _, mask in held[:written]:
            newer = newer | mask
        try:
            self.pending.merge(ids[~newer], rows[~newer])
            newer = torch.ones_like(newer)
        finally:  # (that merge out of memory too: the rows it missed keep their old copies)
            for tier, (slots, mask) in zip(self.tiers[written:], held[written:], strict=True):
                tier.drop(slots[newer[mask].to(slots.device)])

    def overlay(self, ids: torch.Tensor, staged: torch.Tensor, positions: torch.Tensor) -> None:
        """Replace base rows read from cold (``staged[positions]``, of sorted unique ``ids``) by
        their newest written version: the committed delta, then pending."""
        self.overlay_committed(ids, staged, positions, self.delta_ids)
        self.overlay_pending(ids, staged, positions)

    def overlay_committed(
        self,
        ids: torch.Tensor,
        staged: torch.Tensor,
        positions: torch.Tensor,
        delta_ids: np.ndarray,
    ) -> None:
        """``overlay``'s first half: the rows of ``delta_ids`` (``self.delta_ids`` as the caller
        read it; each commit of rows replaces that array) from the delta, ``DELTA_READ_ROWS`` per
        read. Safe off the store's lock: a commit meanwhile shows as ``self.delta_ids is not
        delta_ids``."""
        if delta_ids.size:
            ids_np = ids.numpy()
            in_delta = np.isin(ids_np, delta_ids, assume_unique=True)
            at = np.flatnonzero(in_delta)
            for start in range(0, at.size, DELTA_READ_ROWS):  # see DELTA_READ_ROWS
                part = at[start : start + DELTA_READ_ROWS]
                found, raw = self.delta.read(ids_np[part])
                if not found.all():  # the index says these rows are committed: they must be
                    self.delta.read_errors += 1
                    missing = int(ids_np[part][~found][0])
                    raise DeltaCorruptError(
                        f"delta: row {missing} is missing from {self.delta.path} though a commit "
                        "wrote it (was the delta replaced while open?)"
                    )
                rows = torch.from_numpy(raw).view(self.dtype)
                staged.index_copy_(0, positions[torch.from_numpy(part)], rows)

    def overlay_pending(
        self, ids: torch.Tensor, staged: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """``overlay``'s second half: the rows written (or spilled) since the last commit."""
        if len(self.pending):
            held, pos = self.pending.find(ids)
            if bool(held.any()):
                staged.index_copy_(0, positions[held], self.pending.rows[pos])

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row to commit: (sorted unique ids, rows as ``uint8 [n, row_bytes]``)."""
        ids, rows = [self.pending.ids], [self.pending.rows]
        for tier in self.tiers:  # warm then hot: a later copy wins (they are equal anyway)
            if bool(tier.dirty.any()):
                tier_ids, tier_rows = tier.dirty_rows()
                ids.append(tier_ids)
                rows.append(tier_rows)
        if len(ids) > 1:
            merged_ids, merged_rows = merge_last_wins(ids, rows)
        else:  # pending alone: already sorted and unique
            merged_ids, merged_rows = ids[0], rows[0]
        return merged_ids.numpy(), merged_rows.contiguous().view(torch.uint8).numpy()

    def committed(self, ids: np.ndarray) -> None:
        """The rows ``collect`` returned are durable: nothing is dirty any more. Cold reads find
        them in the delta before pending lets them go (out of memory merging the delta's ids,
        they stay pending: read, and committed again, from there)."""
        if ids.size:
            merged = np.concatenate([self.delta_ids, ids])
            merged.sort(kind="stable")  # two sorted runs: a radix sort's linear pass
            self.delta_ids = merged[np.r_[True, merged[1:] != merged[:-1]]]
        self.pending.clear()
        for tier in self.tiers:
            tier.dirty.zero_()

    def _spiller(self, tier: _DirtyTier):
        """The eviction hook of ``tier``: copy dirty victims' rows to pending before reuse."""

        def spill(slots: torch.Tensor) -> None:
            dirty = slots[tier.dirty[slots]]
            if dirty.numel():
                ids = tier.cache.row_of_slot[dirty].cpu()
                order = torch.argsort(ids)
                self.pending.merge(ids[order], tier.pool.gather(dirty).cpu()[order])
                tier.dirty[dirty] = False
                self.spilled_rows += dirty.numel()

        return spill

"""The two policy interfaces a cache tier composes: eviction (which slot goes) and admission (which row enters).

Policies see row ids and slot numbers only, never embedding values, and work on whole batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import PolicyError

# a search for the smallest keys looks at the unprotected slots alone (a pass over the flags, then
# a topk over them) where at most 1/SPARSE_SHARE of the slots are unprotected: a zipf-tuned tier
# pins most of its slots, and a topk over all of them cost a 4M-slot tier's lookups about a sixth
# of their time
SPARSE_SHARE = 8
# on the CPU a whole sort finds the n smallest of m distinct keys faster than topk once n is an
# eighth of m or more, past 16k keys (at 50k keys: 0.49 ms against 0.53 ms for an eighth, 1.3 ms
# for half; a tier much smaller than its batches refills its victims with about half its slots)
SORT_SHARE = 8
SORT_MIN = 1 << 14


def smallest(keys: torch.Tensor, n: int, *, distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` smallest of 1-D ``keys``, ascending, and their positions: ``topk``, or a sort
    where that is faster and, the keys being ``distinct``, picks the same."""
    m = keys.numel()
    if distinct and keys.device.type == "cpu" and m >= SORT_MIN and n * SORT_SHARE >= m:
        values, order = torch.sort(keys)
        return values[:n], order[:n]
    return torch.topk(keys, n, largest=False, sorted=True)


class EvictionPolicy:
    """Batch eviction: keeps per-slot metadata and chooses victims among evictable slots.

    Subclasses override the access hooks and ``victim_priority``; the tier owns the eviction loop,
    the free list and pinning (see ``tiered_store.row_cache.RowCache``).
    """

    name = "base"
    #: bytes of metadata the policy keeps per slot (reported by the memory benchmark)
    bytes_per_slot = 0
    #: True when ``victim_priority`` gives distinct keys and every key set after a ``topk`` exceeds
    #: the keys it saw (LRU): the tier may then serve victims from one ``topk`` across batches
    keys_only_grow = False
    #: True when ``on_restore`` ranks the rows a warm restart reads back by their saved age
    restores_order = False

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        self.capacity = capacity
        self.device = torch.device(device)

    def on_batch(self) -> None:
        """Called once per batch before any hook (advance a clock)."""

    def on_hit(self, slots: torch.Tensor) -> None:
        """Slots (may repeat) whose rows were read by the current batch."""

    def on_insert(self, slots: torch.Tensor) -> None:
        """Slots (unique) that just received a new row."""

    def on_restore(self, slots: torch.Tensor, ages: torch.Tensor) -> None:
        """Slots (unique) given rows a warm restart read back, with each row's age when saved (0:
        the most recently used, larger: older; distinct): they rank by it, as used now (above the
        rows already resident). Only where ``restores_order`` is True."""
        raise NotImplementedError

    def on_free(self, slots: torch.Tensor) -> None:
        """Slots (unique) emptied without a new row (``evict_headroom``): they leave the policy's
        order until a row is inserted into them again."""

    def on_reinstate(self, slots: torch.Tensor) -> None:
        """Victims from the last ``choose_victims`` that stay resident after all (their candidates
        were refused admission), oldest first; they keep their old standing."""

    def victim_priority(self, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Eviction priority of every slot, or of ``slots`` (lower goes first); any dtype ``topk``
        accepts. A new tensor, never the policy's own state: a warm-restart save reads it after
        letting the store's lock go."""
        raise NotImplementedError

    def victim_priority_later(self) -> Callable[[], torch.Tensor]:
        """``victim_priority()`` of every slot as of now, computed when the function returned is
        called: only what it needs is copied now (a warm-restart save copies under the store's
        lock and ranks once it has let it go). By default computed now."""
        priority = self.victim_priority()
        return lambda: priority

    def choose_victims(self, n: int, protected: torch.Tensor) -> torch.Tensor:
        """``n`` distinct slots to evict, never one where ``protected`` is True."""
        return self.smallest_keys(n, protected)[1]

    def smallest_keys(self, n: int, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` smallest ``victim_priority`` keys of unprotected slots, ascending, and their
        slots (``n`` <= the unprotected slots). With distinct keys (``keys_only_grow``) on the CPU,
        where few slots are unprotected, a ``topk`` over those alone: the same slots in the same
        order."""
        if self.keys_only_grow and self.device.type == "cpu":
            flags = protected.numpy()
            if (flags.size - np.count_nonzero(flags)) * SPARSE_SHARE <= flags.size:
                slots = torch.from_numpy(np.flatnonzero(~flags))
                keys, pick = smallest(self.victim_priority(slots), n, distinct=True)
                return keys, slots[pick]
        priority = self.victim_priority()
        top = torch.iinfo(priority.dtype).max if not priority.is_floating_point() else float("inf")
        priority = priority.masked_fill(protected, top)  # never among the n: n <= unprotected
        return smallest(priority, n, distinct=self.keys_only_grow)


class NoEviction(EvictionPolicy):
    """Never evicts: the tier fills once and stays (``static`` on its own)."""

    name = "none"

    def choose_victims(self, n: int, protected: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)


class AdmissionPolicy:
    """Decides which missed rows may enter a tier; sees every access to learn frequencies."""

    name = "all"
    #: bytes of metadata the filter keeps per table row
    bytes_per_row = 0
    #: bytes of metadata the filter keeps per tier, whatever the table size (e.g. a sketch)
    bytes_per_tier = 0
    #: True when ``on_access`` must see every lookup (frequency sketches); False skips the call
    learns = False
    #: True when the filter's state is sized by the tier: the registry then passes ``capacity=``
    sized_by_capacity = False

    def __init__(self, num_rows: int, device: torch.device | str = "cpu") -> None:
        self.num_rows = num_rows
        self.device = torch.device(device)

    @classmethod
    def bytes_for(cls, capacity: int) -> dict[str, int]:
        """Bytes the filter of a tier of ``capacity`` slots keeps, without building it:
        ``per_table_row`` and ``per_tier``, as ``bytes_per_row`` and ``bytes_per_tier`` say once
        it is built. This default reads them off the class, where they are numbers; a filter whose
        bytes are known only once built (a property sized by its tier, as TinyLFU's sketch) must
        override this, else it is a :class:`PolicyError` naming the filter (building one per
        capacity a budget tries could allocate its whole state many times over).

        Examples
        --------
        >>> AdmissionPolicy.bytes_for(1000)
        {'per_table_row': 0, 'per_tier': 0}
        """
        out = {"per_table_row": cls.bytes_per_row, "per_tier": cls.bytes_per_tier}
        unknown = [
            attr
            for attr, value in zip(("bytes_per_row", "bytes_per_tier"), out.values(), strict=True)
            if isinstance(value, bool) or not isinstance(value, int | float)
        ]
        if unknown:
            raise PolicyError(
                f"admission filter {cls.name!r} ({cls.__module__}.{cls.__qualname__}): "
                f"{' and '.join(unknown)} is known only once the filter is built (not a number on "
                "the class), so a memory budget cannot price its tier; expected the filter to "
                "override AdmissionPolicy.bytes_for(capacity) to give its bytes for a tier of "
                "that many slots (as policies.tinylfu.TinyLFU does)"
            )
        return out

    def on_access(self, ids: torch.Tensor) -> None:
        """Ids (duplicates included) looked up in this tier in the current batch."""

    def admit(self, candidates: torch.Tensor, victims: torch.Tensor) -> torch.Tensor:
        """Bool mask over ``candidates``: True admits. ``victims`` are the rows they would displace
        (same order, -1 for a free slot)."""
        return torch.ones(candidates.shape[0], dtype=torch.bool, device=candidates.device)

    def best_first(self, candidates: torch.Tensor) -> torch.Tensor | None:
        """An order of ``candidates``, the likeliest to be admitted first (a tier pairs them so
        with its victims in eviction order); None: any order."""
        return None

"""Row -> slot indexes of a cache tier: a dense array over the table's rows, or a hash table sized
from the tier.

The dense index is one int32 per **table** row (4 B x 384M rows = 1.5 GB per tier for a
DeepSeek-V4.1 table, whatever the tier holds); a probe is one gather. The hashed index is an
open-addressing table (linear probing, load <= 0.5) of row ids and slots, 8 B per entry at two
entries per **slot** (16 B per slot: 61 MB for a 3.84M-row hot tier over the same table); a probe
is a hash, a gather and a compare, repeated for the few ids whose chain is longer. Both are
vectorised over a batch: on the CPU the hashed index walks each id's chain in compiled code
(:mod:`tiered_store.row_index_kernels`); elsewhere a Python loop runs per probe round, never per id.

``index: auto`` picks the hashed index when the dense one would be large (>= 256 MiB) and the
table has at least 16 rows per slot, where the dense array costs several times more than the hash
table; the dense index otherwise, since it probes fastest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from policies.tinylfu import mix64

__all__ = [
    "DenseRowIndex",
    "HashedRowIndex",
    "RowIndex",
    "index_bytes",
    "index_kind",
    "make_row_index",
]

AUTO_HASHED_MIN_DENSE_BYTES = 256 << 20  # a dense index at least this large ...
AUTO_HASHED_MIN_ROWS_PER_SLOT = 16  # ... over a table this much larger than the tier: hashed
_EMPTY = -1  # never used: a probe ends here
_DELETED = -2  # used and freed: a probe goes on past it, an insert may reuse it
_SEED = 0x5EED_1DE5
_MAX_LOAD = 0.75  # the largest max_load: a full tier's probes for absent ids stay short
_ROUNDS_PER_CHECK = 4  # torch probe rounds between asks whether any id still probes (a sync)
_SEED_U64 = np.uint64(_SEED)


class RowIndex:
    """Which slot holds each resident row: ``get`` (-1 where absent), ``set``, ``delete``."""

    kind = ""

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each id (int64, same shape), -1 where the row is not resident."""
        raise NotImplementedError

    def set(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Record ``slots`` for unique ``ids`` that are not resident."""
        raise NotImplementedError

    def delete(self, ids: torch.Tensor) -> None:
        """Forget unique resident ``ids``."""
        raise NotImplementedError

    def bytes_per(self) -> dict[str, float]:
        """Index bytes per table row and per slot."""
        raise NotImplementedError


class DenseRowIndex(RowIndex):
    """One int32 per table row (-1: not resident).

    Examples
    --------
    >>> index = DenseRowIndex(num_rows=10, capacity=2)
    >>> index.set(torch.tensor([7, 2]), torch.tensor([0, 1]))
    >>> index.get(torch.tensor([2, 3, 7])).tolist()
    [1, -1, 0]
    """

    kind = "dense"

    def __init__(self, num_rows: int, capacity: int, device: torch.device | str = "cpu") -> None:
        self.slot_of = torch.full((num_rows,), -1, dtype=torch.int32, device=device)

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.slot_of, 0, ids.reshape(-1)).view(ids.shape).long()

    def set(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        self.slot_of.index_copy_(0, ids, slots.to(torch.int32))

    def delete(self, ids: torch.Tensor) -> None:
        self.slot_of.index_fill_(0, ids, -1)

    def bytes_per(self) -> dict[str, float]:
        return {"per_table_row": 4, "per_slot": 0}


class HashedRowIndex(RowIndex):
    """Open addressing with linear probing over ``capacity / max_load`` entries; deleted entries
    are marked and the table is rebuilt once they take half the room a full tier leaves (a
    quarter of the table at the default ``max_load``), into a new table beside the old one (the
    index's memory twice over, briefly), which a failed rebuild leaves as it was.

    Examples
    --------
    >>> index = HashedRowIndex(num_rows=10**9, capacity=4)
    >>> index.set(torch.tensor([999_999_937, 5]), torch.tensor([3, 0]))
    >>> index.get(torch.tensor([5, 6, 999_999_937])).tolist()
    [0, -1, 3]
    >>> index.delete(torch.tensor([5])); index.get(torch.tensor([5])).tolist()
    [-1]
    """

    kind = "hashed"

    def __init__(
        self,
        num_rows: int,
        capacity: int,
        device: torch.device | str = "cpu",
        *,
        max_load: float = 0.5,
        compiled: bool | None = None,
    ) -> None:
        if not 0 < max_load <= _MAX_LOAD:  # fuller, a probe for an absent id may never end
            raise ValueError(
                f"hashed row index: max_load {max_load!r}; expected more than 0 and at most "
                f"{_MAX_LOAD} (entries kept empty end every probe)"
            )
        self.num_rows, self.capacity = num_rows, capacity
        self.size = _hashed_entries(capacity, max_load)
        # live and deleted entries past this: rebuilt. Half the room past a full tier, so deletes
        # run (size - capacity) / 2 ahead of each rebuild, and as many entries stay empty
        self.rebuild_at = int(self.size * (1 + max_load) / 2)
        key_dtype = torch.int32 if num_rows < 2**31 else torch.int64
        self.keys = torch.full((self.size,), _EMPTY, dtype=key_dtype, device=device)
        self.slots = torch.full((self.size,), -1, dtype=torch.int32, device=device)
        self.live = 0
        self.deleted = 0
        # probes in compiled code (row_index_kernels) on the CPU, torch rounds elsewhere
        self.compiled = self.keys.device.type == "cpu" if compiled is None else compiled
        if self.compiled and self.keys.device.type != "cpu":
            raise ValueError(f"hashed row index: compiled probes run on the CPU, not {device}")

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        """First entry each id's probe looks at."""
        return torch.remainder(mix64(ids, _SEED), self.size)

    def _find(self, ids: torch.Tensor) -> torch.Tensor:
        """Entry holding each id, -1 where absent. Every id steps each round (those done stay
        put), so a round queues work without a host sync; whether any id is still probing is
        asked once per ``_ROUNDS_PER_CHECK`` rounds (on CUDA, the only syncs)."""
        found = torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
        probing = ids >= 0  # a negative id would match the empty or deleted marker
        entry = self._home(ids)
        want = ids.long()  # compared at full width: an id past the keys' never matches one
        rounds = 0
        while rounds % _ROUNDS_PER_CHECK or bool(probing.any()):
            key = self.keys[entry]
            hit = probing & (key == want)
            found = torch.where(hit, entry, found)
            probing &= ~hit & (key != _EMPTY)
            entry = torch.where(probing, (entry + 1) % self.size, entry)
            rounds += 1
        return found

    def _ids(self, ids: torch.Tensor, dtype: torch.dtype | None = None):
        """``ids`` as a contiguous NumPy array of ``dtype`` (default: the keys') for the kernels."""
        return ids.reshape(-1).to(dtype or self.keys.dtype).contiguous().numpy()

    def get(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.compiled:
            slots = torch.empty(flat.numel(), dtype=torch.int64)
            keys, table_slots = self.keys.numpy(), self.slots.numpy()
            # int64 ids: cast to int32 keys, an id past 2**31 would wrap onto a resident row
            _kernels().find_slots(
                keys, table_slots, self._ids(flat, torch.int64), _SEED_U64, slots.numpy()
            )
            return slots.view(ids.shape)
        entry = self._find(flat)
        slots = torch.where(entry >= 0, self.slots[entry.clamp(min=0)].long(), -1)
        return slots.view(ids.shape)

    def set(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        # refused as the dense index refuses them: an id past the keys' width wraps onto another
        # row, or onto the empty marker (checked on the CPU: on CUDA it would be a host sync per
        # admission; the store checks every id first anyway); past ``capacity`` the probes find
        # no free entry
        if ids.numel() and ids.device.type == "cpu":
            low, high = (int(v) for v in torch.aminmax(ids))
            if not 0 <= low <= high < self.num_rows:
                raise IndexError(
                    f"hashed row index: ids {low}..{high}; expected ids in [0, {self.num_rows:,})"
                )
        if slots.numel() != ids.numel():  # the compiled insert would read past the slots
            raise ValueError(
                f"hashed row index: {ids.numel():,} ids and {slots.numel():,} slots; expected "
                "one slot per id"
            )
        if self.live + ids.numel() > self.capacity:
            raise ValueError(
                f"hashed row index: {self.live + ids.numel():,} rows; expected at most its "
                f"capacity, {self.capacity:,}"
            )
        if self.live + self.deleted + ids.numel() > self.rebuild_at:
            self._rebuild()
        try:
            self.deleted -= self._insert(ids, slots)
        except BaseException:  # (out of memory) part way through the torch rounds
            self._unclaim(ids)
            raise
        self.live += ids.numel()

    def _unclaim(self, ids: torch.Tensor) -> None:
        """The entries an insert of ``ids`` that failed part way had claimed (their keys written,
        maybe not their slots) are marked deleted: no id stays behind without its slot, found
        where a later insert of it is not."""
        ids = ids.reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.num_rows)]  # no marker, nor a row an id would wrap onto
        self.keys.masked_fill_(torch.isin(self.keys, ids.to(self.keys.dtype)), _DELETED)
        self._settle()

    def _settle(self) -> None:
        """After a change that failed part way (out of memory): the slots of entries not held
        emptied (an insert's torch rounds keep the largest slot written to an entry) and the
        counts taken from the keys, whatever it had done."""
        self.live = int((self.keys >= 0).sum())
        self.deleted = int((self.keys == _DELETED).sum())
        self.slots.masked_fill_(self.keys < 0, -1)

    def _insert(self, ids: torch.Tensor, slots: torch.Tensor) -> int:
        """Put unique absent ``ids`` with their ``slots`` in the table (compiled on the CPU);
        returns how many deleted entries were reused."""
        if self.compiled:
            new_slots = slots.reshape(-1).to(torch.int32).contiguous().numpy()
            keys, table_slots = self.keys.numpy(), self.slots.numpy()
            return _kernels().insert_entries(
                keys, table_slots, self._ids(ids), new_slots, _SEED_U64
            )
        return self._claim(ids.reshape(-1), slots.reshape(-1).to(self.slots.dtype))

    def _claim(self, ids: torch.Tensor, slots: torch.Tensor) -> int:
        """Put each id in the first free entry of its probe; returns how many were deleted
        entries reused. Like ``_find``, every id steps each round under a mask, so a round
        queues work without a host sync: all ids at one entry read the same key, so either all
        claim it (free: one wins, the read-back says which) or all write its key back (taken)."""
        entry = self._home(ids)
        want = ids.to(self.keys.dtype)
        pending = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        reused = torch.zeros((), dtype=torch.int64, device=ids.device)
        rounds = 0
        while rounds % _ROUNDS_PER_CHECK or bool(pending.any()):
            key = self.keys[entry]
            claiming = pending & ((key == _EMPTY) | (key == _DELETED))
            self.keys[entry] = torch.where(claiming, want, key)
            won = claiming & (self.keys[entry] == want)
            # a free entry's slot is -1 and every other write puts back what is there: the
            # winner's slot is the largest written to its entry
            self.slots.scatter_reduce_(0, entry, torch.where(won, slots, self.slots[entry]), "amax")
            reused += (won & (key == _DELETED)).sum()
            pending &= ~won
            taken = pending & ~claiming  # an entry that lost its claim is tried again
            entry = torch.where(taken, (entry + 1) % self.size, entry)
            rounds += 1
        return int(reused)

    def delete(self, ids: torch.Tensor) -> None:
        if self.compiled:
            keys, slots = self.keys.numpy(), self.slots.numpy()
            gone = _kernels().delete_entries(keys, slots, self._ids(ids, torch.int64), _SEED_U64)
            self.live -= gone
            self.deleted += gone
            return
        entry = self._find(ids.reshape(-1))
        entry = entry[entry >= 0]
        try:
            self.keys[entry] = _DELETED
            self.slots[entry] = -1
        except BaseException:  # (out of memory) between the two: counted as the keys say
            self._settle()
            raise
        self.live -= entry.numel()
        self.deleted += entry.numel()

    def _rebuild(self) -> None:
        """Drop the deleted marks: re-insert every live entry into a new table, which replaces
        the old one once whole (a rebuild that fails, out of memory, leaves the index as it was)."""
        keep = self.keys >= 0
        ids, slots = self.keys[keep], self.slots[keep]
        old = self.keys, self.slots
        try:
            self.keys = torch.full_like(old[0], _EMPTY)
            self.slots = torch.full_like(old[1], -1)
            self._insert(ids, slots)
        except BaseException:
            self.keys, self.slots = old
            raise
        self.live, self.deleted = ids.numel(), 0

    def bytes_per(self) -> dict[str, float]:
        per_entry = self.keys.element_size() + self.slots.element_size()
        return {"per_table_row": 0, "per_slot": per_entry * self.size / max(1, self.capacity)}


def _hashed_entries(capacity: int, max_load: float = 0.5) -> int:
    """Entries of a hashed index for ``capacity`` slots."""
    return max(8, math.ceil(max(capacity, 1) / max_load))


def index_kind(kind: str, num_rows: int, capacity: int) -> str:
    """The index ``kind`` resolves to for a tier of ``capacity`` slots over ``num_rows`` rows
    (``auto``: see the module docstring).

    Examples
    --------
    >>> index_kind("auto", 10_300_000, 515_000), index_kind("auto", 384_006_168, 3_840_061)
    ('dense', 'hashed')
    """
    if kind == "auto":
        large = 4 * num_rows >= AUTO_HASHED_MIN_DENSE_BYTES
        sparse = num_rows >= AUTO_HASHED_MIN_ROWS_PER_SLOT * max(capacity, 1)
        return "hashed" if large and sparse else "dense"
    if kind in ("dense", "hashed"):
        return kind
    raise ValueError(f"index: got {kind!r}; expected 'auto', 'dense' or 'hashed'")


def index_bytes(kind: str, num_rows: int, capacity: int) -> dict[str, float]:
    """Bytes per table row and per slot of the index :func:`make_row_index` builds, without
    building it (what tier sizing counts against a memory budget).

    Examples
    --------
    >>> index_bytes("dense", 1000, 10), index_bytes("hashed", 1000, 10)
    ({'per_table_row': 4, 'per_slot': 0}, {'per_table_row': 0, 'per_slot': 16.0})
    """
    if index_kind(kind, num_rows, capacity) == "dense":
        return {"per_table_row": 4, "per_slot": 0}
    per_entry = (4 if num_rows < 2**31 else 8) + 4  # key, slot
    return {
        "per_table_row": 0,
        "per_slot": per_entry * _hashed_entries(capacity) / max(1, capacity),
    }


def _kernels():
    """The compiled probes (imported at first use: importing numba takes ~0.5 s)."""
    from . import row_index_kernels  # noqa: PLC0415

    return row_index_kernels


def make_row_index(
    kind: str, num_rows: int, capacity: int, device: torch.device | str = "cpu"
) -> RowIndex:
    """The index a tier of ``capacity`` slots over ``num_rows`` rows uses (``auto``, ``dense``,
    ``hashed``; see the module docstring for ``auto``).

    Examples
    --------
    >>> make_row_index("auto", 10_300_000, 515_000).kind, make_row_index("auto", 384_006_168, 3_840_061).kind
    ('dense', 'hashed')
    """
    if index_kind(kind, num_rows, capacity) == "dense":
        return DenseRowIndex(num_rows, capacity, device)
    return HashedRowIndex(num_rows, capacity, device)

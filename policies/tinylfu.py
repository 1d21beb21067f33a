"""TinyLFU admission (Einziger, Friedman, Manes 2017): a missed row enters only when a count-min
sketch says it is used more often than the row it would displace.

The sketch lives on the tier's device and is updated for whole batches with ``index_add_``; the
hash is the SplitMix64 finalizer (``policies.hash_mix``) with one seed per sketch row, computed in
wrapping int64 arithmetic on torch tensors (identical on CPU and CUDA, and to :func:`mix64_int`,
which runs ``hash_mix.splitmix64`` itself).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .base import AdmissionPolicy
from .errors import PolicyError, check_int_option
from .hash_mix import MIX_GOLDEN, MIX_M1, MIX_M2, splitmix64

MASK64 = (1 << 64) - 1
DEPTH = 4  # sketch rows (independent hashes), as Caffeine
WIDTH_FACTOR = 8  # counters per sketch row per slot, rounded up to a power of two
_SORT_LIMIT = 1 << 14  # sketch increments per batch up to which sorting them is the cheaper sum


def as_signed64(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(ids: torch.Tensor, seed: int | torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer of ``ids + seed``, as int64 bits; vectorised, CPU or CUDA.

    ``seed`` is an int, or an int64 tensor broadcast against ``ids`` (one seed per sketch row).

    Examples
    --------
    >>> int(mix64(torch.tensor([7]), 123)[0]) & 0xFFFF == mix64_int(7, 123) & 0xFFFF
    True
    """
    z = ids.long() + (seed if isinstance(seed, torch.Tensor) else as_signed64(seed & MASK64))
    tmp = torch.empty_like(z)
    for bits, mult in ((30, MIX_M1), (27, MIX_M2), (31, None)):  # in place: one temporary in all
        torch.bitwise_right_shift(z, bits, out=tmp).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(as_signed64(mult))
    return z


def mix64_int(x: int, seed: int) -> int:
    """:func:`mix64` for one Python int (the scalar reference), as an unsigned 64-bit value."""
    return int(splitmix64(np.array([(x + seed) & MASK64], dtype=np.uint64))[0])


def row_seeds(seed: int, depth: int) -> list[int]:
    """One independent 64-bit seed per sketch row, derived from ``seed``."""
    return [mix64_int(seed * depth + r, MIX_GOLDEN) for r in range(depth)]


def sketch_width(capacity: int, width_factor: int) -> int:
    """Counters per sketch row: the power of two at or above ``width_factor * capacity`` (>= 16)."""
    need = max(width_factor * capacity, 16)
    return 1 << (need - 1).bit_length()


def sketch_bytes(depth: int, width: int) -> int:
    """Bytes of a sketch of ``depth`` rows of ``width`` uint8 counters plus its int32 scratch row."""
    return depth * width + 4 * width


class TinyLFU(AdmissionPolicy):
    """Admit a missed row only when it is estimated more frequent than the row it displaces.

    Every lookup in the tier (duplicates included) increments the row's counter in each of
    ``depth`` rows of a count-min sketch; counters saturate at ``max_count``. After
    ``sample_factor * capacity`` lookups every counter is halved (the W-TinyLFU "reset"), so the
    sketch follows the recent popularity instead of all history. A candidate taking a free slot
    is always admitted; one that would evict a row is admitted when ``freq(candidate) >
    freq(victim)`` (ties keep the resident row, as in Caffeine).

    Parameters
    ----------
    num_rows : int
        Rows in the table (unused: the sketch is sized by the tier, not the table).
    device : torch.device or str
        Where the sketch lives: the tier's device.
    capacity : int
        The tier's slots. Sizes the sketch and the aging sample.
    depth : int
        Sketch rows (independent hashes). Default 4, as Caffeine.
    width_factor : int
        Counters per sketch row per slot, rounded up to a power of two. Default 8: with a tier's
        worth of distinct hot rows the sketch is at most 1/8 full, so a collision rarely lifts a
        cold row above a warm one.
    max_count : int
        Counter ceiling. Default 15 (4-bit counters, as TinyLFU): past that a row is "hot" and
        the exact count does not change any decision against a victim.
    sample_factor : int
        Lookups per aging step, in multiples of ``capacity``. Default 10, TinyLFU's W = 10 C.
    seed : int
        Hash seed.

    Notes
    -----
    Memory is per tier, not per table row: ``bytes_per_row`` is 0 and ``bytes_per_tier`` counts
    the sketch (``depth * width`` bytes, one uint8 counter each) plus an int32 scratch row of
    ``width`` used to sum a large batch's increments exactly before saturating (small batches
    sort theirs instead). With the defaults that
    is ``(4 + 4) * 8 = 64`` bytes per slot when ``8 * capacity`` is a power of two, up to twice
    that otherwise. Halving runs at most once per batch: a batch longer than the sample is
    treated as one sample (the lookups past it are not carried into the next). Not implemented:
    the doorkeeper Bloom filter and the small admission window of W-TinyLFU (compose with an
    eviction policy instead: ``lru+tinylfu``).

    Examples
    --------
    >>> import torch
    >>> f = TinyLFU(num_rows=100, capacity=4)
    >>> f.on_access(torch.tensor([5, 5, 5, 9]))
    >>> f.frequency(torch.tensor([5, 9, 1])).tolist()
    [3, 1, 0]
    >>> f.admit(torch.tensor([5, 1, 2]), torch.tensor([9, 9, -1])).tolist()
    [True, False, True]
    """

    name = "tinylfu"
    bytes_per_row = 0
    learns = True
    sized_by_capacity = True  # the sketch is sized by the tier's slots

    def __init__(
        self,
        num_rows: int,
        device: torch.device | str = "cpu",
        *,
        capacity: int,
        depth: int = DEPTH,
        width_factor: int = WIDTH_FACTOR,
        max_count: int = 15,
        sample_factor: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(num_rows, device)
        capacity, depth, width_factor, sample_factor, seed = (
            check_int_option("tinylfu", option, value, least)
            for option, value, least in (
                ("capacity", capacity, 0),
                ("depth", depth, 1),
                ("width_factor", width_factor, 1),
                ("sample_factor", sample_factor, 1),
                ("seed", seed, None),
            )
        )
        if (
            isinstance(max_count, bool)
            or not isinstance(max_count, numbers.Integral)
            or not 1 <= max_count <= 255
        ):
            raise PolicyError(
                f"tinylfu max_count: got {max_count!r}; expected 1..255 (an integer: uint8 counters)"
            )
        self.capacity = capacity
        self.width = sketch_width(capacity, width_factor)
        self.max_count = max_count
        self.sample_size = max(sample_factor * capacity, 1)
        self.seeds = row_seeds(seed, depth)
        self._seed_col = torch.tensor(
            [as_signed64(x) for x in self.seeds], dtype=torch.int64, device=self.device
        ).unsqueeze(1)
        self.sketch = torch.zeros(depth, self.width, dtype=torch.uint8, device=self.device)
        self._scratch: torch.Tensor | None = None  # int32 [width], made by the first large batch
        self._row_start = torch.arange(depth, device=self.device).unsqueeze(1) * self.width
        self.additions = 0  # lookups counted since the last halving (halved with the counters)
        self.resets = 0

    @classmethod
    def bytes_for(cls, capacity: int) -> dict[str, int]:
        """Bytes the filter the registry builds for ``capacity`` slots keeps (default shape)."""
        return {
            "per_table_row": cls.bytes_per_row,
            "per_tier": sketch_bytes(DEPTH, sketch_width(capacity, WIDTH_FACTOR)),
        }

    @property
    def bytes_per_tier(self) -> int:
        """Bytes the filter holds for its tier, whatever the table size: the sketch plus the
        int32 scratch row (counted even before a large batch has allocated it)."""
        return sketch_bytes(self.sketch.shape[0], self.width)

    def _buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """``[depth, len(ids)]``: the bucket of each id in each sketch row."""
        return mix64(ids.reshape(1, -1), self._seed_col) & (self.width - 1)

    def on_access(self, ids: torch.Tensor) -> None:
        ids = ids.reshape(-1).to(self.device)
        if ids.numel() == 0:
            return
        buckets = self._buckets(ids)
        if buckets.numel() <= _SORT_LIMIT:  # few updates: sum duplicates by sorting them
            cells, adds = torch.unique(buckets + self._row_start, return_counts=True)
            flat = self.sketch.view(-1)
            flat[cells] = (flat[cells].int() + adds).clamp_(max=self.max_count).to(torch.uint8)
        else:  # many: sum them in a scratch row, O(ids) with no sort
            if self._scratch is None:
                self._scratch = torch.zeros(self.width, dtype=torch.int32, device=self.device)
            ones = torch.ones(ids.numel(), dtype=torch.int32, device=self.device)
            for row, idx in zip(self.sketch, buckets, strict=True):
                self._scratch.index_add_(0, idx, ones)
                new = (row[idx].int() + self._scratch[idx]).clamp_(max=self.max_count)
                row[idx] = new.to(torch.uint8)  # duplicates of a bucket all write the same value
                self._scratch[idx] = 0
        self.additions += ids.numel()
        if self.additions >= self.sample_size:
            self.sketch >>= 1
            # a batch past the sample counts as one sample: its excess would halve the next ones
            self.additions = min(self.additions, self.sample_size) // 2
            self.resets += 1

    def frequency(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated recent lookups of each id (int32; never below the truth, up to ``max_count``)."""
        ids = ids.to(self.device)
        return torch.gather(self.sketch, 1, self._buckets(ids)).amin(dim=0).int()

    def best_first(self, candidates: torch.Tensor) -> torch.Tensor:
        """The most frequent first (ties in the order given)."""
        freq = self.frequency(candidates.to(self.device))
        return torch.sort(freq, descending=True, stable=True).indices.to(candidates.device)

    def admit(self, candidates: torch.Tensor, victims: torch.Tensor) -> torch.Tensor:
        victims = victims.to(self.device)
        n = candidates.numel()
        freq = self.frequency(torch.cat([candidates.to(self.device), victims.clamp(min=0)]))
        return (victims < 0) | (freq[:n] > freq[n:])

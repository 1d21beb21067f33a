"""Miss-ratio curves: how many lookups miss a cache of each capacity (in rows).

Curves computed here, all as :class:`MissRatioCurve`:

- :func:`lru_mrc` - exact LRU, every capacity at once, from stack distances in one streaming pass
  (Mattson): for each access, the number of distinct rows touched since the previous access to
  the same row, counted with a Fenwick tree over access times, O(N log D). The time axis is
  compacted whenever it fills, so memory is O(distinct rows), not O(lookups).
- :func:`shards_mrc` - SHARDS (Waldspurger et al., FAST'15): the same on a spatially hashed
  sample of rows (rate R), distances scaled by 1/R; ``fixed_size`` bounds the tracked rows
  instead (SHARDS-max) for traces whose distinct rows do not fit.
- :func:`static_topk_mrc` - an oracle that pins the K most frequent rows (by true frequency).
- :func:`belady_mrc` - Belady's MIN, the fewest misses any cache of that capacity can have.

Counting convention: every curve counts compulsory (first-access) misses, except
:func:`static_topk_mrc` by default, which models a cache preloaded from a profile (the store's
warm start). A capacity is a number of rows; a curve's capacity 0 always has miss ratio 1.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import numba
    from numba import types as _nb_types
    from numba.typed import Dict as _NbDict

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency of this module
    numba = None
    HAVE_NUMBA = False

__all__ = [
    "MissRatioCurve",
    "StackDistanceCounter",
    "belady_misses",
    "belady_mrc",
    "lru_mrc",
    "mean_absolute_error",
    "shards_mrc",
    "static_topk_mrc",
]

DENSE_ID_LIMIT = 1 << 27  # ids below this index arrays directly (4 bytes each); above: a hash map
MIN_TIME_CAPACITY = 1 << 20  # Fenwick tree length before the first compaction
SHARDS_MODULUS = 1 << 24  # fixed-rate sampling granularity: rates are multiples of 2**-24
DEFAULT_SHARDS_RATE = 0.01
DEFAULT_SHARDS_SIZE = 1 << 16  # rows tracked by fixed-size SHARDS
_NO_NEXT = np.iinfo(np.int64).max


def _njit(func: Any) -> Any:
    """``numba.njit(cache=True, nogil=True)``, or the plain function without numba."""
    return numba.njit(cache=True, nogil=True)(func) if HAVE_NUMBA else func


def _int_dict() -> Any:
    """An empty int64 -> int64 map the kernels accept."""
    if HAVE_NUMBA:
        return _NbDict.empty(key_type=_nb_types.int64, value_type=_nb_types.int64)
    return {}  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# The curve
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MissRatioCurve:
    """Miss ratio at a set of cache capacities (rows), with what it was computed from.

    Attributes
    ----------
    name : str
        Which curve: ``"lru"``, ``"shards"``, ``"static-topk"``, ``"belady"``, ...
    capacities : ndarray of int64
        Ascending capacities in rows; the first is 0.
    miss_ratio : ndarray of float64
        Misses / lookups at each capacity.
    lookups : int
        Lookups in the trace the curve describes.
    misses : ndarray of int64 or None
        Exact miss counts, where the method gives them (not for sampled curves).
    table_rows : int or None
        Rows of the table, to express capacities as a share of it.
    metadata : dict
        JSON-serialisable details: method, sampling rate, distinct rows, timings.

    Examples
    --------
    >>> c = lru_mrc(np.array([1, 2, 1, 3, 1, 2]))
    >>> c.capacities.tolist(), c.misses.tolist()
    ([0, 1, 2, 3], [6, 6, 4, 3])
    >>> round(c.at(2), 3), c.capacity_for(0.5)
    (0.667, 3)
    >>> MissRatioCurve.from_dict(c.to_dict()).misses.tolist()
    [6, 6, 4, 3]
    """

    name: str
    capacities: np.ndarray
    miss_ratio: np.ndarray
    lookups: int
    misses: np.ndarray | None = None
    table_rows: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        caps = np.asarray(self.capacities, dtype=np.int64)
        ratio = np.asarray(self.miss_ratio, dtype=np.float64)
        if caps.ndim != 1 or caps.shape != ratio.shape or caps.size == 0:
            raise ValueError(
                f"curve {self.name!r}: capacities {caps.shape} and miss_ratio {ratio.shape}; "
                "expected equal non-empty 1-D arrays"
            )
        if (np.diff(caps) <= 0).any():
            raise ValueError(f"curve {self.name!r}: capacities must be strictly ascending")
        object.__setattr__(self, "capacities", caps)
        object.__setattr__(self, "miss_ratio", ratio)
        if self.misses is not None:
            object.__setattr__(self, "misses", np.asarray(self.misses, dtype=np.int64))

    @property
    def hit_ratio(self) -> np.ndarray:
        """1 - miss ratio at each capacity."""
        return 1.0 - self.miss_ratio

    @property
    def max_capacity(self) -> int:
        """Largest capacity on the curve; beyond it the miss ratio stays flat."""
        return int(self.capacities[-1])

    def at(self, capacity: float | np.ndarray) -> float | np.ndarray:
        """Miss ratio at ``capacity`` rows: exact on grid points, linear in between, flat past the
        end."""
        out = np.interp(capacity, self.capacities, self.miss_ratio)
        return float(out) if np.ndim(out) == 0 else out

    def capacity_for(self, hit_ratio: float) -> int | None:
        """Smallest capacity on the curve whose hit ratio reaches ``hit_ratio`` (None if none)."""
        reach = np.nonzero(self.hit_ratio >= hit_ratio - 1e-12)[0]
        return int(self.capacities[reach[0]]) if reach.size else None

    def resample(self, capacities: Sequence[int] | np.ndarray) -> MissRatioCurve:
        """This curve at other capacities (interpolated as in :meth:`at`)."""
        caps = np.unique(np.concatenate([[0], np.asarray(capacities, dtype=np.int64)]))
        misses = None
        if self.misses is not None and np.isin(caps, self.capacities).all():
            misses = self.misses[np.searchsorted(self.capacities, caps)]
        return MissRatioCurve(
            self.name, caps, np.asarray(self.at(caps)), self.lookups, misses, self.table_rows,
            dict(self.metadata),
        )  # fmt: skip

    def to_dict(self, max_points: int | None = 2000) -> dict[str, Any]:
        """Plain-JSON form; curves longer than ``max_points`` are thinned to a log-spaced subset
        (ends kept)."""
        idx = np.arange(self.capacities.size)
        if max_points is not None and idx.size > max_points:
            log = np.geomspace(1, idx.size - 1, max_points // 2).astype(np.int64)
            lin = np.linspace(0, idx.size - 1, max_points // 2).astype(np.int64)
            idx = np.unique(np.concatenate([[0, idx.size - 1], log, lin]))
        return {
            "name": self.name,
            "lookups": int(self.lookups),
            "table_rows": self.table_rows,
            "capacities": self.capacities[idx].tolist(),
            "miss_ratio": [round(float(v), 9) for v in self.miss_ratio[idx]],
            "misses": None if self.misses is None else self.misses[idx].tolist(),
            "metadata": _jsonable(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MissRatioCurve:
        """Inverse of :meth:`to_dict`."""
        return cls(
            data["name"], np.asarray(data["capacities"]), np.asarray(data["miss_ratio"]),
            int(data["lookups"]),
            None if data.get("misses") is None else np.asarray(data["misses"]),
            data.get("table_rows"), dict(data.get("metadata") or {}),
        )  # fmt: skip

    def save(self, path: str | os.PathLike[str], max_points: int | None = None) -> None:
        """Write as JSON (every point unless ``max_points``)."""
        Path(path).write_text(json.dumps(self.to_dict(max_points)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MissRatioCurve:
        """Read a curve written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        return (
            f"MissRatioCurve({self.name!r}, points={self.capacities.size}, "
            f"max_capacity={self.max_capacity}, lookups={self.lookups}, "
            f"min_miss_ratio={float(self.miss_ratio.min()):.4f})"
        )


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays inside ``value`` as plain Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@_njit
def _lru_pass(ids, start, last, owner, tree, hist, state):  # noqa: ANN001, ANN202
    """Stack distances of ids[start:] until the time axis fills; returns the next position."""
    cap = tree.shape[0] - 1
    t = state[0]
    distinct = state[1]
    n = ids.shape[0]
    i = start
    while i < n and t < cap:
        x = ids[i]
        p = last[x]
        if p == 0:
            distinct += 1
            hist[0] += 1
        else:
            s = 0
            j = p
            while j > 0:
                s += tree[j]
                j &= j - 1
            hist[distinct - s + 1] += 1
            j = p
            while j <= cap:
                tree[j] -= 1
                j += j & -j
        t += 1
        j = t
        while j <= cap:
            tree[j] += 1
            j += j & -j
        last[x] = t
        owner[t] = x
        i += 1
    state[0] = t
    state[1] = distinct
    return i


@_njit
def _compact_times(last, owner, t):  # noqa: ANN001, ANN202
    """Renumber live access times 1..distinct in order; returns distinct."""
    new_t = 0
    for pos in range(1, t + 1):
        x = owner[pos]
        if last[x] == pos:
            new_t += 1
            owner[new_t] = x
            last[x] = new_t
    return new_t


@_njit
def _fenwick_ones(tree, k):  # noqa: ANN001, ANN202
    """Rebuild ``tree`` as the Fenwick tree of ones at positions 1..k, zeros after."""
    cap = tree.shape[0] - 1
    tree[:] = 0
    for i in range(1, k + 1):
        tree[i] = 1
    for i in range(1, cap + 1):
        j = i + (i & -i)
        if j <= cap:
            tree[j] += tree[i]


@_njit
def _remap(ids, table, out):  # noqa: ANN001, ANN202
    """Dense index of each id (new ids numbered in order of appearance); returns the count."""
    nxt = len(table)
    for i in range(ids.shape[0]):
        x = ids[i]
        v = table.get(x, -1)
        if v < 0:
            v = nxt
            table[x] = v
            nxt += 1
        out[i] = v
    return nxt


@_njit
def _mix64(x):  # noqa: ANN001, ANN202
    """splitmix64 finaliser of a uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@_njit
def _sample_mask(ids, seed, threshold):  # noqa: ANN001, ANN202
    """Keep ids whose 24-bit hash is below ``threshold``."""
    out = np.empty(ids.shape[0], dtype=np.bool_)
    s = np.uint64(seed)
    for i in range(ids.shape[0]):
        h = _mix64(np.uint64(ids[i]) ^ s) >> np.uint64(40)
        out[i] = h < np.uint64(threshold)
    return out


@_njit
def _next_use(ids, n_ids):  # noqa: ANN001, ANN202
    """Index of the next access to the same id, or int64 max."""
    n = ids.shape[0]
    nxt = np.empty(n, dtype=np.int64)
    seen = np.full(n_ids, np.iinfo(np.int64).max, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        x = ids[i]
        nxt[i] = seen[x]
        seen[x] = i
    return nxt


@_njit
def _belady(ids, nxt, n_ids, capacity, bypass):  # noqa: ANN001, ANN202
    """Misses of Belady's MIN at one capacity: a max-heap of cached ids keyed by next use."""
    if capacity <= 0:
        return ids.shape[0]
    key = np.zeros(n_ids, dtype=np.int64)
    pos = np.full(n_ids, -1, dtype=np.int64)
    heap = np.empty(capacity, dtype=np.int64)
    size = 0
    misses = 0
    for t in range(ids.shape[0]):
        x = ids[t]
        nu = nxt[t]
        k = pos[x]
        if k >= 0:
            key[x] = nu  # later than before: sift up
        else:
            misses += 1
            if size < capacity:
                k = size
                size += 1
            else:
                top = heap[0]
                if bypass and nu >= key[top]:
                    continue  # x is the farthest: do not cache it
                pos[top] = -1
                key[x] = nu
                heap[0] = x
                pos[x] = 0
                k = 0  # smaller-or-equal key at the root: sift down
                while True:
                    c = 2 * k + 1
                    if c >= size:
                        break
                    if c + 1 < size and key[heap[c + 1]] > key[heap[c]]:
                        c += 1
                    if key[heap[c]] <= nu:
                        break
                    heap[k] = heap[c]
                    pos[heap[k]] = k
                    k = c
                heap[k] = x
                pos[x] = k
                continue
            key[x] = nu
        while k > 0:
            parent = (k - 1) >> 1
            if key[heap[parent]] >= nu:
                break
            heap[k] = heap[parent]
            pos[heap[k]] = k
            k = parent
        heap[k] = x
        pos[x] = k
    return misses


@_njit
def _shards_fixed_size_pass(  # noqa: ANN001, ANN202
    ids, start, seed, smax, slots, slot_id, slot_hash, last, owner, tree, heap, free, hist, state,
    fstate, thresh,
):  # fmt: skip
    """SHARDS-max over ids[start:]: track at most ``smax`` sampled rows, lowering the threshold to
    the largest tracked hash when over; each sampled access adds 1/R (R = threshold / 2**64) to the
    bucket of its scaled distance. Returns the next position; stops early when the time axis or
    the histogram is full."""
    cap = tree.shape[0] - 1
    t, distinct, size, n_free = state[0], state[1], state[2], state[3]
    s = np.uint64(seed)
    n = ids.shape[0]
    i = start
    while i < n and t < cap:
        x = ids[i]
        h = _mix64(np.uint64(x) ^ s)
        if h >= thresh[0]:
            i += 1
            continue
        weight = 1.0 / (float(thresh[0]) * 5.421010862427522e-20)  # 1 / R
        slot = slots.get(x, -1)
        if slot >= 0:
            p = last[slot]
            acc = 0
            j = p
            while j > 0:
                acc += tree[j]
                j &= j - 1
            bucket = int((distinct - acc + 1) * weight + 0.5)
            if bucket >= hist.shape[0]:
                break
            hist[bucket] += weight
            j = p
            while j <= cap:
                tree[j] -= 1
                j += j & -j
        else:
            fstate[0] += weight  # cold
            n_free -= 1
            slot = free[n_free]
            slots[x] = slot
            slot_id[slot] = x
            slot_hash[slot] = h
            distinct += 1
            k = size
            size += 1
            while k > 0:
                parent = (k - 1) >> 1
                if slot_hash[heap[parent]] >= h:
                    break
                heap[k] = heap[parent]
                k = parent
            heap[k] = slot
        fstate[1] += weight
        t += 1
        j = t
        while j <= cap:
            tree[j] += 1
            j += j & -j
        last[slot] = t
        owner[t] = slot
        if size > smax:  # evict the largest hash; it becomes the threshold
            top = heap[0]
            thresh[0] = slot_hash[top]
            size -= 1
            moved = heap[size]
            k = 0
            while True:
                c = 2 * k + 1
                if c >= size:
                    break
                if c + 1 < size and slot_hash[heap[c + 1]] > slot_hash[heap[c]]:
                    c += 1
                if slot_hash[heap[c]] <= slot_hash[moved]:
                    break
                heap[k] = heap[c]
                k = c
            heap[k] = moved
            j = last[top]
            while j <= cap:
                tree[j] -= 1
                j += j & -j
            last[top] = 0
            distinct -= 1
            slots.pop(slot_id[top])
            free[n_free] = top
            n_free += 1
        i += 1
    state[0], state[1], state[2], state[3] = t, distinct, size, n_free
    return i

"""A count-min sketch update on the CPU in one pass (numba): hash and add, without the GIL.

Counting a window of a ``zipf-tuned`` tier's lookups with torch (``mix64`` per sketch row, then
``index_add_`` per row) costs about 6 ms per 56,000 distinct ids on one core; this kernel does
the same additions, with the same hash (``policies.hash_mix.splitmix64`` of ``id + seed``, as
``policies.tinylfu.mix64``), several times faster, and releases the GIL so the store's
background thread does not hold up lookups. Importing it imports numba (~0.5 s), so
:mod:`tiered_store.online_profile` imports it at its first CPU update.
"""

from __future__ import annotations

import numba
import numpy as np

from policies.hash_mix import splitmix64

_mix = numba.njit(inline="always")(splitmix64)


@numba.njit(cache=True, nogil=True)
def sketch_add(sketch: np.ndarray, seeds: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> None:
    """``sketch[d, splitmix64(ids[i] + seeds[d]) & (width - 1)] += weights[i]`` for every row
    ``d`` and id ``i`` (``width`` a power of two; wrapping uint64 arithmetic)."""
    mask = np.uint64(sketch.shape[1] - 1)
    for d in range(sketch.shape[0]):
        seed = seeds[d]
        row = sketch[d]
        for i in range(ids.size):
            h = _mix(np.uint64(ids[i]) + seed) & mask
            row[h] += weights[i]


@numba.njit(cache=True, nogil=True)
def sketch_add_window(
    sketch: np.ndarray,
    stamps: np.ndarray,
    seeds: np.ndarray,
    ids: np.ndarray,
    window: int,
    weight: float,
) -> int:
    """Count one window of ids (duplicates included) once per counter: ``sketch[d, h] +=
    weight`` the first time in this window (``stamps[d, h] != window``) that an id hashes to
    ``h`` in row ``d``. A row's estimate (its counters' minimum) stays an upper bound on the
    windows it appeared in, without deduplicating the ids first. Returns the counters of row 0
    first touched in this window: the window's distinct rows, less collisions."""
    mask = np.uint64(sketch.shape[1] - 1)
    stamp = stamps.dtype.type(window)
    first = 0
    buckets = np.empty(ids.size, np.int64)
    for d in range(sketch.shape[0]):
        seed = seeds[d]
        for i in range(ids.size):  # hashes first: the loop below then only waits on memory
            buckets[i] = np.int64(_mix(np.uint64(ids[i]) + seed) & mask)
        row, marks = sketch[d], stamps[d]
        for i in range(ids.size):
            h = buckets[i]
            if marks[h] != stamp:
                marks[h] = stamp
                row[h] += weight
                if d == 0:
                    first += 1
    return first


@numba.njit(cache=True, nogil=True)
def sketch_estimates(sketch: np.ndarray, seeds: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each id's smallest counter over the sketch rows (its count-min estimate)."""
    mask = np.uint64(sketch.shape[1] - 1)
    out = np.empty(ids.size, sketch.dtype)
    for i in range(ids.size):
        best = sketch[0, _mix(np.uint64(ids[i]) + seeds[0]) & mask]
        for d in range(1, sketch.shape[0]):
            v = sketch[d, _mix(np.uint64(ids[i]) + seeds[d]) & mask]
            if v < best:
                best = v
        out[i] = best
    return out

"""The online counters' passes on the CPU (numba, without the GIL): count-min sketch updates and
estimates, the per-slot episode count of a tier's hits, and a re-pin's candidates.

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
def sketch_add(
    sketch: np.ndarray, seeds: np.ndarray, ids: np.ndarray, weights: np.ndarray, take_max: bool
) -> None:
    """``sketch[d, splitmix64(ids[i] + seeds[d]) & (width - 1)] += weights[i]`` for every row
    ``d`` and id ``i`` (``width`` a power of two; wrapping uint64 arithmetic). ``take_max``:
    raise the counter to ``weights[i]`` instead (a conservative update: each id's estimate
    becomes at least its value; idempotent)."""
    mask = np.uint64(sketch.shape[1] - 1)
    for d in range(sketch.shape[0]):
        seed = seeds[d]
        row = sketch[d]
        for i in range(ids.size):
            h = _mix(np.uint64(ids[i]) + seed) & mask
            if not take_max:
                row[h] += weights[i]
            elif row[h] < weights[i]:
                row[h] = weights[i]


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


@numba.njit(cache=True, nogil=True)
def slot_episodes(
    counts: np.ndarray, stamps: np.ndarray, slots: np.ndarray, window: int, weight: float
) -> int:
    """Count hits once per slot and window: ``counts[s] += weight`` the first time in window
    ``window`` (``stamps[s] != window``) that slot ``s`` is looked up. Returns the slots first
    looked up in this window (distinct rows hit)."""
    stamp = stamps.dtype.type(window)
    first = 0
    for i in range(slots.size):
        s = slots[i]
        if stamps[s] != stamp:
            stamps[s] = stamp
            counts[s] += weight
            first += 1
    return first


SCORE_BINS = 1 << 15  # a non-negative float32's top 16 bits: bins in the order of the values


@numba.njit(cache=True, nogil=True)
def repin_candidates(row_of_slot: np.ndarray, pinned: np.ndarray, score: np.ndarray, k: int):
    """Two passes over a tier's slots for a re-pin: the ``k`` best-scored unpinned resident
    slots with a score above 0 (most first) and the ``k`` lowest-scored pinned slots (least
    first), and the resident and pinned slot counts. Scores are non-negative float32; the first
    pass bins them by their top bits (in value order) to find the bins that hold the ``k`` best
    and lowest, the second collects those slots, and only they are sorted.
    Returns (best, best scores, lowest, lowest scores, resident, pinned)."""
    bins = score.view(np.int32)
    best_hist = np.zeros(SCORE_BINS, np.int64)
    low_hist = np.zeros(SCORE_BINS, np.int64)
    resident = held = 0
    for s in range(row_of_slot.size):
        if row_of_slot[s] < 0:
            continue
        resident += 1
        b = max(bins[s] >> 16, 0)
        if pinned[s]:
            held += 1
            low_hist[b] += 1
        elif score[s] > 0:
            best_hist[b] += 1
    top, n_best = SCORE_BINS, 0  # the best: every bin from ``top`` up
    while top > 0 and n_best < k:
        top -= 1
        n_best += best_hist[top]
    bottom, n_low = -1, 0  # the lowest: every bin up to ``bottom``
    while bottom < SCORE_BINS - 1 and n_low < k:
        bottom += 1
        n_low += low_hist[bottom]
    best = np.empty(n_best, np.int64)
    low = np.empty(n_low, np.int64)
    i = j = 0
    for s in range(row_of_slot.size):
        if row_of_slot[s] < 0:
            continue
        b = max(bins[s] >> 16, 0)
        # bounded, should a score change between the passes (callers pass a snapshot)
        if pinned[s]:
            if b <= bottom and j < n_low:
                low[j] = s
                j += 1
        elif score[s] > 0 and b >= top and i < n_best:
            best[i] = s
            i += 1
    best, low = best[:i], low[:j]
    best = best[np.argsort(-score[best], kind="mergesort")[:k]]
    low = low[np.argsort(score[low], kind="mergesort")[:k]]
    return best, score[best], low, score[low], resident, held

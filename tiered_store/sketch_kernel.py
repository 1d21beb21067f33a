"""The online counters' passes on the CPU (numba, without the GIL): count-min sketch updates and
estimates, the per-slot episode count of a tier's hits, and a re-pin's candidates.

Counting a window of a ``zipf-tuned`` tier's lookups with torch (``unique``, ``mix64`` per sketch
row, then a gather and a scatter per row) costs milliseconds per window on one core (``unique``
plus ``index_add_`` measured 6 ms per 56,000 distinct ids); these kernels count the same, with
the same hash (``policies.hash_mix.splitmix64`` of ``id + seed``, as ``policies.tinylfu.mix64``),
in one pass without a sort, and release the GIL so the store's background thread does not hold
up lookups. Importing it imports numba (~0.5 s), so
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
def sketch_add_window(sketch: np.ndarray, seeds: np.ndarray, ids: np.ndarray, weight: float) -> int:
    """Count one window of ids (duplicates included) once per distinct id, conservatively: the
    id's counters (``h_d = splitmix64(id + seeds[d]) & (width - 1)`` in each row ``d``) are
    raised to their minimum before the window plus ``weight`` (every minimum is read before any
    counter moves, so the order of the window's ids does not matter and the torch path on CUDA
    counts the same). Duplicates are found with an open-addressing set of the window's ids
    (twice as many places as ids), so the window needs no sort. A row's estimate (its counters'
    minimum) stays an upper bound on the windows it appeared in, and overshoots less than adding
    ``weight`` to every counter: a collision only raises a counter to what the row sharing it
    has. Returns the window's distinct ids."""
    n = ids.size
    size = 2
    while size < 2 * n:
        size *= 2
    taken = np.zeros(size, np.bool_)
    keys = np.empty(size, np.int64)
    place_mask = size - 1
    mask = np.uint64(sketch.shape[1] - 1)
    step = sketch.dtype.type(weight)
    depth = sketch.shape[0]
    at = np.empty((n, depth), np.int64)  # each distinct id's counter in each row
    raised = np.empty(n, sketch.dtype)
    distinct = 0
    for i in range(n):
        x = ids[i]
        p = np.int64(_mix(np.uint64(x)) & np.uint64(place_mask))
        while taken[p] and keys[p] != x:
            p = (p + 1) & place_mask
        if taken[p]:  # a duplicate: counted once per window
            continue
        taken[p], keys[p] = True, x
        for d in range(depth):
            at[distinct, d] = np.int64(_mix(np.uint64(x) + seeds[d]) & mask)
        low = sketch[0, at[distinct, 0]]
        for d in range(1, depth):
            low = min(low, sketch[d, at[distinct, d]])
        raised[distinct] = low + step
        distinct += 1
    for j in range(distinct):
        for d in range(depth):
            sketch[d, at[j, d]] = max(sketch[d, at[j, d]], raised[j])
    return distinct


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
def slots_evicted(
    per_slot: np.ndarray,
    sketch: np.ndarray,
    seeds: np.ndarray,
    slots: np.ndarray,
    rows: np.ndarray,
    window: int,
    step: float,
) -> np.ndarray:
    """``rows`` leave ``slots`` (``per_slot``: :func:`slot_episodes`'s array): each row's sketch
    counters are raised to its slot's count, less ``step`` where the slot was counted in the open
    ``window`` (that episode stays with the window's misses). Returns which rows were (a mask)."""
    counts = per_slot.view(np.float32)
    less = np.float32(step)
    in_window = np.empty(slots.size, np.bool_)
    values = np.empty(slots.size, np.float32)
    for i in range(slots.size):
        s = slots[i]
        in_window[i] = per_slot[s, 1] == window
        values[i] = counts[s, 0] - less if in_window[i] else counts[s, 0]
    sketch_add(sketch, seeds, rows, values, True)
    return in_window


@numba.njit(cache=True, nogil=True)
def slots_admitted(
    per_slot: np.ndarray,
    sketch: np.ndarray,
    seeds: np.ndarray,
    slots: np.ndarray,
    rows: np.ndarray,
    stamp: int,
    extra: float,
) -> None:
    """``rows`` now held in ``slots``: each slot's count starts from its row's sketch estimate
    plus ``extra`` (the episode of the miss that brought it, or 0), stamped ``stamp``."""
    counts = per_slot.view(np.float32)
    start = sketch_estimates(sketch, seeds, rows)
    more = np.float32(extra)
    for i in range(slots.size):
        counts[slots[i], 0] = start[i] + more
        per_slot[slots[i], 1] = stamp


@numba.njit(cache=True, nogil=True)
def slot_episodes(per_slot: np.ndarray, slots: np.ndarray, window: int, weight: float) -> int:
    """Count hits once per slot and window, ``per_slot`` an int32 ``[slots, 2]`` array of a
    float32 count (its bits) and a window stamp: ``count[s] += weight`` the first time in window
    ``window`` (``stamp[s] != window``) that slot ``s`` is looked up. Returns the slots first
    looked up in this window (distinct rows hit). Branchless: on Zipfian hits, where a slot is
    often seen again in its window, a branch per hit mispredicts (measured 2.2x slower); count
    and stamp side by side: one cache line a hit, not two."""
    counts = per_slot.view(np.float32)
    stamp = np.int32(window)
    step = np.float32(weight)
    first = 0
    for i in range(slots.size):
        s = slots[i]
        fresh = per_slot[s, 1] != stamp
        counts[s, 0] += step * fresh
        per_slot[s, 1] = stamp
        first += fresh
    return first


# a non-negative float32's top 16 bits (sign bit 0: 2^15 values) and its low 16 bits: bins in
# the order of the values
TOP_BINS, LOW_BINS = 1 << 15, 1 << 16


@numba.njit(cache=True, nogil=True)
def _extreme(slots: np.ndarray, keys: np.ndarray, need: int, largest: bool) -> np.ndarray:
    """``need`` of ``slots`` with the largest (or smallest) ``keys`` (16-bit), any of equal keys."""
    hist = np.zeros(LOW_BINS, np.int64)
    for i in range(slots.size):
        hist[keys[i]] += 1
    edge, taken = (LOW_BINS if largest else -1), 0
    while taken < need:  # the bin where the ``need`` best end
        edge += -1 if largest else 1
        taken += hist[edge]
    out = np.empty(need, np.int64)
    n = 0
    for i in range(slots.size):  # strictly past the edge bin: all of them
        if (keys[i] > edge) if largest else (keys[i] < edge):
            out[n] = slots[i]
            n += 1
    for i in range(slots.size):  # then the edge bin's (equal keys) up to ``need``
        if n < need and keys[i] == edge:
            out[n] = slots[i]
            n += 1
    return out


@numba.njit(cache=True, nogil=True)
def repin_candidates(
    row_of_slot: np.ndarray, pinned: np.ndarray, per_slot: np.ndarray, k: int, key: np.ndarray
):
    """A re-pin's candidates in two passes (no sort of the slots): the ``k`` best-scored unpinned
    resident slots with a score above 0 (most first) and the ``k`` lowest-scored pinned slots
    (least first), and the resident and pinned slot counts. The scores are the float32 counts
    of ``per_slot`` (:func:`slot_episodes`'s array); ``pinned`` is read only where
    ``row_of_slot`` holds a row; ``key`` is scratch space, a uint16 per slot.

    Scores are non-negative float32, whose bits are in value order. The first pass over the
    slots writes each slot's 16-bit key (pinned or not, and the top 16 bits of its score, the
    bin) and counts the keys, which finds the bin where the ``k`` best (lowest) end; the second
    reads only the keys (2 B a slot, against 17 for the slot's row, flag and count) to collect
    the slots past that bin and those in it; the edge bin's slots are narrowed to the ones
    needed by their low 16 bits (:func:`_extreme`), and only the ``k`` chosen are sorted.
    Branch-free where pinned and unpinned slots interleave.
    Returns (best, best scores, lowest, lowest scores, resident, pinned)."""
    bits = per_slot[:, 0]
    score = per_slot.view(np.float32)[:, 0]
    # key: pinned << 15 | bin (a finite score's bin is at most 0x7F7F), NONE: not a candidate
    none = np.int64(0xFFFF)
    hist = np.zeros(2 * TOP_BINS, np.int64)  # unpinned slots per bin, then pinned ones
    resident = held = 0
    for s in range(row_of_slot.size):
        there = row_of_slot[s] >= 0
        side = np.int64(pinned[s])
        wanted = there & (pinned[s] | (score[s] > 0))
        kk = (side << 15) | max(bits[s] >> 16, 0)
        key[s] = kk if wanted else none
        hist[kk] += wanted
        resident += there
        held += there & pinned[s]
    top, n_top = TOP_BINS, 0
    while top > 0 and n_top < k:
        top -= 1
        n_top += hist[top]
    bottom, n_bottom = -1, 0
    while bottom < TOP_BINS - 1 and n_bottom < k:
        bottom += 1
        n_bottom += hist[TOP_BINS + bottom]
    # collect the slots past the edge bins and in them, then cut the edge bins' to ``k`` in all
    best = np.empty(n_top + 1, np.int64)
    low = np.empty(n_bottom + 1, np.int64)
    n_best = n_low = 0
    low_end = min(TOP_BINS + bottom, none - 1)  # pinned keys at or below the bottom edge
    for s in range(row_of_slot.size):
        kk = np.int64(key[s])
        take_best = (kk >= top) & (kk < TOP_BINS)  # unpinned, at or past the top edge
        take_low = (kk >= TOP_BINS) & (kk <= low_end)
        best[min(n_best, n_top)] = s  # written always, kept when taken: no branch
        n_best += take_best & (n_best < n_top)
        low[min(n_low, n_bottom)] = s
        n_low += take_low & (n_low < n_bottom)
    best, low = best[:n_best], low[:n_low]
    best = _narrow(best, bits, top, k, True)
    low = _narrow(low, bits, bottom, k, False)
    # stable: equal scores in slot order, as a stable sort of every candidate would give them
    best = best[np.argsort(-bits[best], kind="mergesort")]  # bits: in the order of the scores
    low = low[np.argsort(bits[low], kind="mergesort")]
    return best, score[best], low, score[low], resident, held


@numba.njit(cache=True, nogil=True)
def _narrow(slots: np.ndarray, bits: np.ndarray, edge: int, k: int, largest: bool) -> np.ndarray:
    """``slots`` (those past the edge bin and in it) cut to ``k``: all past it, then the edge
    bin's with the largest (smallest) low bits."""
    if slots.size <= k:
        return slots
    high = bits[slots] >> 16
    past = slots[high != edge]
    at = slots[high == edge]
    return np.concatenate((past, _extreme(at, bits[at] & 0xFFFF, k - past.size, largest)))

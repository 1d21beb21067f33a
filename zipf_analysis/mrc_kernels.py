"""Numba kernels behind the miss-ratio curves: exact LRU stack distances and SHARDS sampling.

The drivers and the curve API are in :mod:`zipf_analysis.mrc`; the Belady and static top-K
kernels are offline bounds in :mod:`policies.offline`. Every kernel works in place on arrays the
caller owns and returns where it stopped, so the caller can grow or compact them and resume.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types as nb_types
from numba.typed import Dict as NumbaDict

from policies.hash_mix import splitmix64

_njit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(inline="always")
_splitmix64 = numba.njit(splitmix64)


def int_dict() -> Any:
    """An empty int64 -> int64 map the kernels accept."""
    return NumbaDict.empty(key_type=nb_types.int64, value_type=nb_types.int64)


@_njit
def _popcount(x):
    """Set bits of a uint64, as int64."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@_inline
def _fenwick_add(tree, i, n, delta):
    """Add ``delta`` at position ``i`` (1-based) of a Fenwick tree over ``n`` positions."""
    while i <= n:
        tree[i] += delta
        i += i & -i


@_inline
def _fenwick_prefix(tree, i):
    """Sum of positions 1..``i`` of a Fenwick tree."""
    acc = 0
    while i > 0:
        acc += tree[i]
        i &= i - 1
    return acc


@_inline
def _marks_through(bits, tree, q):
    """Marks of the bitmap time axis at times 0..``q`` (the word's bits, then whole words)."""
    w = q >> 6
    return _popcount(bits[w] & (~np.uint64(0) >> np.uint64(63 - (q & 63)))) + _fenwick_prefix(
        tree, w
    )


@_inline
def _set_mark(bits, tree, n_words, q, on):
    """Set (``on``) or clear the mark at time ``q`` of the bitmap time axis."""
    w = q >> 6
    bit = np.uint64(1) << np.uint64(q & 63)
    if on:
        bits[w] |= bit
        _fenwick_add(tree, w + 1, n_words, 1)
    else:
        bits[w] &= ~bit
        _fenwick_add(tree, w + 1, n_words, -1)


@_inline
def _stamp(x, t, last, owner, bits, tree, n_words):
    """Record a lookup of ``x`` at time ``t``: its previous time's mark off, ``t``'s on; returns
    whether ``x`` had never been seen."""
    p = last[x]
    if p != 0:
        _set_mark(bits, tree, n_words, p - 1, False)
    _set_mark(bits, tree, n_words, t, True)
    owner[t] = x
    last[x] = t + 1
    return p == 0


@_njit
def lru_pass(ids, start, last, owner, bits, tree, hist, state):
    """Stack distances of ids[start:] until the time axis fills; returns the next position.

    The time axis is a bitmap (one bit per access time, set while it is some row's latest access)
    with a Fenwick tree over its 64-bit words, 64x smaller than a tree over times, so it stays in
    cache: the number of distinct rows since time q is distinct - (marks at times <= q).
    """
    n_words = tree.shape[0] - 1
    cap = n_words * 64
    t = state[0]
    distinct = state[1]
    n = ids.shape[0]
    i = start
    while i < n and t < cap:
        x = ids[i]
        p = last[x]
        hist[0 if p == 0 else distinct - _marks_through(bits, tree, p - 1) + 1] += 1
        distinct += _stamp(x, t, last, owner, bits, tree, n_words)
        t += 1
        i += 1
    state[0] = t
    state[1] = distinct
    return i


@_njit
def compact_bitmap_times(last, owner, t):
    """Renumber live access times 0..distinct-1 in order (``last`` holds time + 1); returns
    distinct."""
    new_t = 0
    for pos in range(t):
        x = owner[pos]
        if last[x] == pos + 1:
            owner[new_t] = x
            new_t += 1
            last[x] = new_t
    return new_t


@_njit
def bitmap_ones(bits, tree, k):
    """Set times 0..k-1 in the bitmap, clear the rest, and rebuild the Fenwick tree over words."""
    n_words = tree.shape[0] - 1
    bits[:] = 0
    tree[:] = 0
    full = k >> 6
    for w in range(full):
        bits[w] = ~np.uint64(0)
        tree[w + 1] = 64
    if k & 63:
        bits[full] = (np.uint64(1) << np.uint64(k & 63)) - np.uint64(1)
        tree[full + 1] = k & 63
    for i in range(1, n_words + 1):
        j = i + (i & -i)
        if j <= n_words:
            tree[j] += tree[i]


@_njit
def compact_times(last, owner, t):
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
def fenwick_ones(tree, k):
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
def sample_mask(ids, seed, threshold):
    """Keep ids whose 24-bit hash is below ``threshold``."""
    out = np.empty(ids.shape[0], dtype=np.bool_)
    s = np.uint64(seed)
    for i in range(ids.shape[0]):
        h = _splitmix64(np.uint64(ids[i]) ^ s) >> np.uint64(40)
        out[i] = h < np.uint64(threshold)
    return out


@_njit
def shards_fixed_size_pass(
    ids,
    start,
    seed,
    smax,
    slots,
    slot_id,
    slot_hash,
    last,
    owner,
    tree,
    heap,
    free,
    hist,
    state,
    fstate,
    thresh,
):
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
        h = _splitmix64(np.uint64(x) ^ s)
        if h >= thresh[0]:
            i += 1
            continue
        weight = 1.0 / (float(thresh[0]) * 5.421010862427522e-20)  # 1 / R
        slot = np.int64(-1)
        if x in slots:
            slot = slots[x]
        if slot >= 0:
            p = last[slot]
            bucket = int((distinct - _fenwick_prefix(tree, p) + 1) * weight + 0.5)
            if bucket >= hist.shape[0]:
                break
            hist[bucket] += weight
            _fenwick_add(tree, p, cap, -1)
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
        _fenwick_add(tree, t, cap, 1)
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
            _fenwick_add(tree, last[top], cap, -1)
            last[top] = 0
            distinct -= 1
            slots.pop(slot_id[top])
            free[n_free] = top
            n_free += 1
        i += 1
    state[0], state[1], state[2], state[3] = t, distinct, size, n_free
    return i


@_njit
def dict_put_identity(table, keys):
    """table[k] = k for each key."""
    for k in keys:
        table[k] = k


@_njit
def remap_from(ids, table, nxt, out):
    """Dense index of each id, new ids numbered from ``nxt`` in order of appearance; returns the
    next free number."""
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
def lru_batch_pass(ids, starts, batch, last, owner, bits, tree, state, out):
    """Batched stack distances from batch ``batch`` on, until the time axis has no room for the
    next batch; returns that batch's index.

    ``ids[starts[k]:starts[k + 1]]`` are batch k's distinct rows. Every row of a batch is measured
    before any is stamped, so ``out[i]`` is 1 + the rows more recent than the row when the batch
    begins (the row is resident in an LRU tier of that many rows or more), or 0 for a first use.
    Then the batch is stamped in the order given, oldest first (an LRU tier stamps a batch at once;
    this stands for its tie order). Same time axis as :func:`lru_pass` (a bitmap of latest uses
    with a Fenwick tree over its words).
    """
    n_words = tree.shape[0] - 1
    cap = n_words * 64
    t = state[0]
    distinct = state[1]
    n_batches = starts.shape[0] - 1
    k = batch
    while k < n_batches:
        lo = starts[k]
        hi = starts[k + 1]
        if t + (hi - lo) > cap:
            break
        for i in range(lo, hi):
            p = last[ids[i]]
            out[i] = 0 if p == 0 else distinct - _marks_through(bits, tree, p - 1) + 1
        for i in range(lo, hi):
            distinct += _stamp(ids[i], t, last, owner, bits, tree, n_words)
            t += 1
        k += 1
    state[0] = t
    state[1] = distinct
    return k

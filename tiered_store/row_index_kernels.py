"""The hashed row index's probes on the CPU, compiled (numba): one pass per batch, GIL released.

:class:`tiered_store.row_index.HashedRowIndex` with torch probes runs one Python round per probe
step, and a round is several tensor operations: a batch costs as many rounds as its longest chain,
whatever its size. Decode steps look up a few hundred ids, so on a tier of millions of slots the
rounds, not the ids, took the time (release-size V4.1 tables, 16 sequences a step: most of the
store's CPU). Here each id walks its chain in compiled code; the home entry is the same
``splitmix64(id + seed) mod size`` as the torch path's, so both paths agree entry for entry on
where an id starts. Importing this module imports numba (~0.5 s): ``row_index`` imports it at
the first CPU probe.
"""

from __future__ import annotations

import numba
import numpy as np

from policies.hash_mix import splitmix64

EMPTY = -1  # as row_index._EMPTY: a probe ends here
DELETED = -2  # as row_index._DELETED: a probe goes on past it, an insert may reuse it

_mix = numba.njit(inline="always")(splitmix64)


@numba.njit(inline="always")
def _home(row: np.int64, seed: np.uint64, size: np.int64) -> np.int64:
    """First entry ``row``'s probe looks at: the signed mix, modulo ``size`` (non-negative)."""
    mixed = np.int64(_mix(np.uint64(row) + seed))
    return mixed % size  # numba's % on signed integers follows Python: never negative


@numba.njit(inline="always")
def _chain_entry(keys: np.ndarray, want: np.int64, entry: np.int64) -> np.int64:
    """The entry of ``keys`` holding ``want`` on the chain from ``entry`` (its home), -1 where
    absent (the chain ends at an empty one; a negative ``want`` is never held: it would match
    the empty or deleted marker)."""
    if want < 0:
        return -1
    size = keys.size
    while True:
        key = keys[entry]
        if key == want:
            return entry
        if key == EMPTY:
            return -1
        entry += 1
        if entry == size:
            entry = 0


@numba.njit(cache=True, nogil=True)
def find_slots(
    keys: np.ndarray, slots: np.ndarray, ids: np.ndarray, seed: np.uint64, out: np.ndarray
) -> None:
    """``out[i]``: the slot of ``ids[i]``, -1 where absent (linear probing). Two passes: every
    home entry first (the mixing arithmetic), then the chains, whose first loads no longer wait
    behind it (2.3x faster than one pass per id at V4.1's size: ``bench/test_row_index_speed.py``)."""
    size = keys.size
    for i in range(ids.size):
        out[i] = _home(ids[i], seed, size)
    for i in range(ids.size):
        entry = _chain_entry(keys, ids[i], out[i])
        out[i] = slots[entry] if entry >= 0 else -1


@numba.njit(cache=True, nogil=True)
def insert_entries(
    keys: np.ndarray, slots: np.ndarray, ids: np.ndarray, new_slots: np.ndarray, seed: np.uint64
) -> int:
    """Put each of the (absent, unique) ``ids`` in the first empty or deleted entry of its chain,
    with its slot; returns how many deleted entries were reused."""
    size = keys.size
    reused = 0
    for i in range(ids.size):
        entry = _home(ids[i], seed, size)
        while True:
            key = keys[entry]
            if key < 0:  # empty or deleted
                if key == DELETED:
                    reused += 1
                keys[entry] = ids[i]
                slots[entry] = new_slots[i]
                break
            entry += 1
            if entry == size:
                entry = 0
    return reused


@numba.njit(cache=True, nogil=True)
def delete_entries(keys: np.ndarray, slots: np.ndarray, ids: np.ndarray, seed: np.uint64) -> int:
    """Mark the entries of resident ``ids`` deleted; returns how many were resident."""
    gone = 0
    for i in range(ids.size):
        entry = _chain_entry(keys, ids[i], _home(ids[i], seed, keys.size))
        if entry >= 0:
            keys[entry] = DELETED
            slots[entry] = -1
            gone += 1
    return gone

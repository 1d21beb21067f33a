"""Offline bounds: caches that see the whole trace before the first request.

No live tier can run them (they need the future, or the trace's own frequencies), so they are
registered apart from the online policies (``policies.registry.OFFLINE``) and used by replay and
the miss-ratio curves only, as limits to set beside every online policy (as Caffeine's simulator
lists its optimal policies beside the real ones):

- :class:`Belady` (``belady``): Belady's MIN, cold start, one request at a time: the fewest misses
  any cache of that capacity can have.
- :class:`StaticTopK` (``static-topk``): pin the K rows the trace itself uses most, loaded before
  the first request (the oracle of the store's warm start).

An offline bound answers one question, ``misses(ids, capacities)``: its misses over the trace
``ids`` at each capacity (rows).
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from .errors import PolicyError, check_int_option

DENSE_ID_LIMIT = 1 << 27  # ids below this index arrays directly; above: renumbered 0..distinct-1
INT64_MAX = (1 << 63) - 1  # the largest row id (the simulations keep ids as int64)

__all__ = ["Belady", "OfflineBound", "StaticTopK", "static_topk_misses", "whole_capacities"]


class OfflineBound:
    """A cache that knows the whole trace in advance; its misses at a capacity are a limit.

    Subclasses set ``name`` (the registry name) and ``method`` (how the misses are counted, for
    reports) and override :meth:`misses`.

    Examples
    --------
    >>> from policies.registry import offline_bound
    >>> offline_bound("belady").misses(np.array([1, 2, 3, 1, 2, 3]), [1, 2, 3]).tolist()
    [5, 4, 3]
    """

    name = "offline"
    method = ""

    def misses(self, ids: np.ndarray, capacities: Sequence[int] | np.ndarray) -> np.ndarray:
        """Misses over the trace ``ids`` (row ids >= 0, request order) at each capacity (rows),
        as int64 in the order of ``capacities``."""
        raise NotImplementedError


class Belady(OfflineBound):
    """Belady's MIN (clairvoyant) cache, cold start, one request at a time.

    O(N log C) per capacity with a next-use array and an indexed heap; the whole trace is held in
    RAM (16 bytes per lookup plus 16 bytes per possible row id per worker).

    Parameters
    ----------
    bypass : bool
        True (default): a missed row whose next use is farther than every cached row's is not
        cached: the optimum for caches with an admission filter, and a lower bound for every
        policy in this project. False: classic demand paging, every miss is cached (evicting the
        cached row used farthest in future).
    workers : int, optional
        Threads, one capacity each (default: CPU count, at most the number of capacities).

    Examples
    --------
    >>> ids = np.array([1, 2, 3, 1, 2, 3])
    >>> Belady().misses(ids, [0, 1, 2, 3]).tolist()
    [6, 5, 4, 3]
    >>> Belady(bypass=False).misses(ids, [1, 2]).tolist()   # every miss cached: 1 row thrashes
    [6, 4]
    """

    name = "belady"

    def __init__(self, *, bypass: bool = True, workers: int | None = None) -> None:
        self.bypass = _check_flag(self.name, "bypass", bypass)
        if workers is not None:
            workers = check_int_option(self.name, "workers", workers, 1)
        self.workers = workers
        self.method = "Belady MIN" + (" with bypass" if bypass else " (demand paging)")

    def misses(self, ids: np.ndarray, capacities: Sequence[int] | np.ndarray) -> np.ndarray:
        caps = _check_capacities(self.name, capacities)
        dense, n_ids = _dense(_check_ids(self.name, ids))
        if dense.size == 0:
            return np.zeros(caps.size, dtype=np.int64)
        nxt = next_use_index(dense, n_ids)
        distinct = int(np.count_nonzero(np.bincount(dense, minlength=1)))
        bypass = self.bypass

        def run(capacity: int) -> int:
            if capacity >= distinct:
                return distinct
            return int(_belady(dense, nxt, n_ids, int(capacity), bypass))

        workers = max(1, min(self.workers or os.cpu_count() or 1, caps.size))
        if workers == 1:
            return np.array([run(c) for c in caps], dtype=np.int64)
        with ThreadPoolExecutor(workers) as pool:
            return np.array(list(pool.map(run, caps.tolist())), dtype=np.int64)


class StaticTopK(OfflineBound):
    """Pin the K rows the trace itself uses most (its true counts), for every K.

    Parameters
    ----------
    preloaded : bool
        True (default): the pinned rows are in place before the first request (the store's warm
        start), so there are no compulsory misses and the misses can sit below Belady's at small
        K on short traces. False: each pinned row misses once (its first access), as the
        demand-filled caches do.

    Examples
    --------
    >>> ids = np.array([7, 7, 7, 7, 7, 3, 3, 3, 1, 2])
    >>> StaticTopK().misses(ids, [0, 1, 2, 9]).tolist()
    [10, 5, 2, 0]
    >>> StaticTopK(preloaded=False).misses(ids, [1, 2]).tolist()
    [6, 4]
    """

    name = "static-topk"
    method = "static top-K by true frequency"

    def __init__(self, *, preloaded: bool = True) -> None:
        self.preloaded = _check_flag(self.name, "preloaded", preloaded)

    def misses(self, ids: np.ndarray, capacities: Sequence[int] | np.ndarray) -> np.ndarray:
        caps = _check_capacities(self.name, capacities)
        dense, n_ids = _dense(_check_ids(self.name, ids))
        every_k = static_topk_misses(np.bincount(dense, minlength=n_ids), preloaded=self.preloaded)
        return every_k[np.minimum(caps, every_k.size - 1)]


def static_topk_misses(counts: np.ndarray, *, preloaded: bool = True) -> np.ndarray:
    """Misses of :class:`StaticTopK` at every K from 0 to the rows with a nonzero count.

    Parameters
    ----------
    counts : ndarray of int
        Lookups per row (any order; zeros ignored).
    preloaded : bool
        As for :class:`StaticTopK`.

    Examples
    --------
    >>> static_topk_misses(np.array([5, 1, 3, 1])).tolist()
    [10, 5, 2, 1, 0]
    >>> static_topk_misses(np.array([5, 1, 3, 1]), preloaded=False).tolist()
    [10, 6, 4, 4, 4]
    """
    counts = np.asarray(counts).reshape(-1)
    counts = np.sort(counts[counts > 0].astype(np.int64))[::-1]
    hits = np.concatenate([[0], np.cumsum(counts)])
    if not preloaded:
        hits = hits - np.arange(hits.size)
    return int(counts.sum()) - hits


def whole_capacities(capacities: object, what: str = "capacities") -> np.ndarray:
    """``capacities`` as int64; a PolicyError naming ``what`` for a value that is not a whole
    number of rows (a cast would truncate 2.5 to 2, and take True as 1)."""
    # a list, tuple or object array is checked value by value: a cast hides the one at fault
    # ([True, 2] is int64 [1, 2]; [1, None] an object array its first value, 1, would name)
    given = isinstance(capacities, list | tuple)
    if given or (isinstance(capacities, np.ndarray) and capacities.dtype.kind == "O"):
        values = np.asarray(capacities, dtype=object).reshape(-1)
        for value in values:
            if not _whole_value(value):
                raise PolicyError(f"{what}: got {value!r}; expected whole numbers of rows")
        if not given:  # each is whole: the array as the list of them would be
            capacities = np.asarray(values.tolist()).reshape(np.shape(capacities))
    caps = np.asarray(capacities)
    if caps.dtype.kind == "u" and caps.size and int(caps.max()) > INT64_MAX:  # cast: -1
        raise PolicyError(f"{what}: got {int(caps.max())}; expected whole numbers of rows")
    if caps.dtype.kind in "iu":
        return np.asarray(caps, dtype=np.int64)  # no copy of an int64 curve's capacities
    flat = caps.reshape(-1)
    if caps.dtype.kind == "f":
        whole = np.isfinite(flat) & (flat == np.rint(flat)) & (np.abs(flat) < 2.0**63)
    else:  # bools, objects, strings
        whole = np.zeros(flat.size, dtype=bool)
    if not whole.all():
        bad = flat[int(np.argmin(whole))]
        bad = bad.item() if isinstance(bad, np.generic) else bad
        raise PolicyError(f"{what}: got {bad!r}; expected whole numbers of rows")
    return caps.astype(np.int64)


def _whole_value(value: object) -> bool:
    """Whether one given capacity (a number, 0-d array or tensor) is a whole number of rows in
    int64; a bool, a bool array or a str is not."""
    kind = str(getattr(value, "dtype", ""))  # a NumPy or torch bool's: "bool", "torch.bool"
    if isinstance(value, str | bytes | bool | np.bool_) or "bool" in kind:
        return False
    with contextlib.suppress(TypeError, RuntimeError):
        return -(2**63) <= operator.index(value) < 2**63
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return math.isfinite(number) and number == round(number) and abs(number) < 2.0**63


def _check_flag(name: str, option: str, value: object) -> bool:
    """``value`` of ``name``'s ``option`` if it is a bool, else a PolicyError naming both."""
    if not isinstance(value, bool | np.bool_):
        raise PolicyError(f"{name} {option}: got {value!r}; expected True or False")
    return bool(value)


def _check_capacities(name: str, capacities: Sequence[int] | np.ndarray) -> np.ndarray:
    """Capacities as a flat int64 array; one that is not a whole number of rows >= 0 is a
    PolicyError naming the bound and the value."""
    caps = whole_capacities(capacities, f"{name}: capacities").reshape(-1)
    if caps.size and caps.min() < 0:
        raise PolicyError(f"{name}: capacities must be >= 0; got {int(caps.min())}")
    return caps


def _check_ids(name: str, ids: np.ndarray) -> np.ndarray:
    """Row ids as a flat contiguous int64 array; other dtypes, negative ids and ids past int64
    (a uint64 is named as given, not wrapped negative) are PolicyErrors naming the bound."""
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype.kind not in "iu" and ids.size:  # np.asarray([]) is float64: no ids
        raise PolicyError(f"{name}: row ids of dtype {ids.dtype}; expected integers")
    if ids.size and ids.min() < 0:
        raise PolicyError(f"{name}: row id {int(ids.min())}; expected row ids >= 0")
    if ids.size and int(ids.max()) > INT64_MAX:
        raise PolicyError(f"{name}: row id {int(ids.max())}; expected row ids below 2**63 (int64)")
    return np.ascontiguousarray(ids, dtype=np.int64)


def _dense(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids as dense indices (unchanged when small enough to index arrays) and the index count."""
    if ids.size == 0:
        return ids, 0
    hi = int(ids.max())
    if hi < DENSE_ID_LIMIT:
        return ids, hi + 1
    uniq, inverse = np.unique(ids, return_inverse=True)
    return inverse.astype(np.int64), int(uniq.size)


@numba.njit(cache=True, nogil=True)
def next_use_index(ids, n_ids):
    """Index of the next access to the same id, or int64 max."""
    n = ids.shape[0]
    nxt = np.empty(n, dtype=np.int64)
    seen = np.full(n_ids, np.iinfo(np.int64).max, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        x = ids[i]
        nxt[i] = seen[x]
        seen[x] = i
    return nxt


@numba.njit(cache=True, nogil=True)
def _belady(ids, nxt, n_ids, capacity, bypass):
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

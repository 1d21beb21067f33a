"""``zipf-tuned``: a pinned segment sized from a measured frequency profile, plus a recency segment.

Design (measured on Engram traces of real text, see README "Policies"):

- **Pinned segment** (warm start): the profile's rows with the most *episodes*, preloaded and never
  evicted. An episode is a run of a row's lookups at most ``episode_window`` lookups apart (the
  frequency profile that ``tiered-store analyze`` writes counts them): the recency segment serves
  all of an episode but its first lookup, so episodes are the misses pinning saves. Ranking by
  episodes instead of raw lookups skips rows that are hot inside a few documents only (measured:
  0.8-1.1 points fewer misses at 1-10% of rows, 0.2 at 25%; ``bench/bench_zipf_tuned.py``). A
  profile without episodes pins by lookups.
- **Recency segment** for those document-local rows, managed by the tier's eviction policy (LRU
  unless the spec names another, e.g. ``zipf-tuned+sieve``). Its size is the number of distinct rows
  one sequence of ``recency_window`` lookups is expected to touch under the profile's frequency
  curve, ``sum_k 1 - exp(-window * p_k)``, capped at half the tier. The pinned segment gets the
  rest. So a small tier splits about evenly, while a large one is almost all pinned: exactly the
  optimum we measured by sweeping the split (1% of rows: best pinned share 0.5-0.7; 5-25%: 0.9 or
  more).
- **Both tiers**: with ``zipf-tuned`` on hot and warm, hot pins the top of the ranking and warm the
  rows after it (a row pinned in hot never reaches warm, so a copy there would waste a slot).
- **Lookahead** (the store's, for every policy): rows that queued batches will use are never
  chosen as victims.

Tuned parameter: ``recency_window`` (default 65,536 lookups = one 4,096-token sequence times
16 heads, the reference Engram's default layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RECENCY_WINDOW = 65_536  # lookups: one 4096-token sequence x 16 heads


@dataclass(frozen=True)
class ZipfTunedSplit:
    """How a tier of ``capacity`` rows is divided."""

    capacity: int
    pinned_rows: np.ndarray  # row ids, hottest first
    recency_rows: int
    expected_distinct: float  # rows one recency window touches, from the profile

    @property
    def pin_share(self) -> float:
        """Share of the tier that is pinned."""
        return self.pinned_rows.size / self.capacity if self.capacity else 0.0


def expected_distinct_rows(counts: np.ndarray, window: int) -> float:
    """Distinct rows a window of ``window`` lookups touches if rows are drawn with the profile's
    frequencies: ``sum_k 1 - exp(-window * c_k / N)``."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0
    return float(-np.expm1(-window * counts / counts.sum()).sum())


def recency_segment_rows(
    counts: np.ndarray, capacity: int | np.ndarray, recency_window: int = DEFAULT_RECENCY_WINDOW
) -> int | np.ndarray:
    """Rows of a ``capacity``-row tier that zipf-tuned gives its recency segment (an array of
    capacities: one figure each, the profile summed once).

    The distinct rows one window of ``recency_window`` lookups is expected to touch under the
    profile's ``counts`` (:func:`expected_distinct_rows`), rounded up, at most half the tier.

    Examples
    --------
    >>> recency_segment_rows(np.array([50, 20, 10, 1]), capacity=4, recency_window=2)
    2
    >>> recency_segment_rows(np.array([50, 20, 10, 1]), capacity=100, recency_window=1)
    1
    >>> recency_segment_rows(np.array([50, 20, 10, 1]), np.array([0, 4, 100]), 2).tolist()
    [0, 2, 2]
    """
    distinct = int(np.ceil(expected_distinct_rows(counts, recency_window)))
    if np.ndim(capacity):
        return np.minimum(np.asarray(capacity, dtype=np.int64) // 2, distinct)
    return min(int(capacity) // 2, distinct)


def zipf_tuned_split(
    ranking: np.ndarray,
    counts: np.ndarray,
    capacity: int,
    *,
    recency_window: int = DEFAULT_RECENCY_WINDOW,
    pinned_above: np.ndarray | None = None,
) -> ZipfTunedSplit:
    """Split a tier between pinned profile rows and a recency segment.

    Parameters
    ----------
    ranking : ndarray of int
        Row ids, most episodes first: a frequency profile's ``top_rows(k, by="episodes")``
        (``tiered-store analyze``, on data disjoint from what is served), with ``k`` at least
        ``capacity`` plus the size of ``pinned_above`` (or every profiled row, if fewer).
    counts : ndarray of int
        Lookups of each profiled row, in any order (the profile's ``counts``): they size the
        recency segment (:func:`recency_segment_rows`).
    capacity : int
        Rows in the tier.
    recency_window : int
        Lookups the recency segment should cover (see the module docstring).
    pinned_above : ndarray, optional
        Rows a tier above already pins (they never reach this tier): skipped, so the warm tier
        pins the next rows of the ranking instead of copies of the hot tier's.

    Examples
    --------
    >>> ranking, counts = np.array([7, 3, 9, 1]), np.array([50, 20, 10, 1])
    >>> split = zipf_tuned_split(ranking, counts, capacity=4, recency_window=2)
    >>> split.pinned_rows.tolist(), split.recency_rows
    ([7, 3], 2)
    >>> below = zipf_tuned_split(ranking, counts, 4, recency_window=2, pinned_above=np.array([7]))
    >>> below.pinned_rows.tolist()
    [3, 9]
    """
    distinct = expected_distinct_rows(counts, recency_window)
    want = capacity - recency_segment_rows(counts, capacity, recency_window)
    skip = np.zeros(0, dtype=np.int64) if pinned_above is None else np.asarray(pinned_above)
    ranked = np.asarray(ranking, dtype=np.int64)[: want + skip.size]
    pinned = ranked[~np.isin(ranked, skip)][:want]
    return ZipfTunedSplit(capacity, pinned, capacity - pinned.size, distinct)

"""Synthetic Zipf-distributed row ids, for the demo and benchmarks."""

from __future__ import annotations

import numpy as np


class ZipfWorkload:
    """Draws row ids whose popularity follows ``P(rank k) ~ k^-exponent`` over a finite table.

    Ranks are mapped to rows through a seeded permutation, so hot rows are spread over the table
    as hashed N-gram rows are.

    Examples
    --------
    >>> w = ZipfWorkload(rows=1000, exponent=0.9, seed=0)
    >>> ids = w.sample(4096)
    >>> ids.shape, int(ids.max()) < 1000
    ((4096,), True)
    """

    def __init__(self, rows: int, exponent: float, seed: int = 0) -> None:
        if rows <= 0:
            raise ValueError(f"rows: got {rows}; expected a positive row count")
        if not exponent >= 0:
            raise ValueError(f"exponent: got {exponent}; expected a non-negative number")
        self.rows = rows
        self.exponent = exponent
        self._rng = np.random.default_rng(seed)
        weights = np.arange(1, rows + 1, dtype=np.float64) ** -exponent
        self._cdf = np.cumsum(weights)
        self._cdf /= self._cdf[-1]
        self.rank_to_row = self._rng.permutation(rows).astype(np.int64)

    def sample(self, size: int | tuple[int, ...]) -> np.ndarray:
        """Row ids (int64) of the given shape."""
        ranks = np.searchsorted(self._cdf, self._rng.random(size), side="right")
        return self.rank_to_row[np.minimum(ranks, self.rows - 1)]

    def hottest(self, k: int) -> np.ndarray:
        """The ``k`` most popular rows, hottest first (what a profile would pin)."""
        return self.rank_to_row[:k].copy()

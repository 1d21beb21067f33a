"""Synthetic Zipf-distributed row ids, for the demo and benchmarks."""

from __future__ import annotations

import math
import numbers

import numpy as np

from .integers import as_integer


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

    def __init__(
        self,
        rows: int,
        exponent: float,
        seed: int | np.random.Generator | None = 0,
        *,
        permute: bool = True,
    ) -> None:
        count = as_integer(rows)
        if count is None or count <= 0:
            raise ValueError(f"rows: got {rows!r}; expected a positive integer row count")
        if (
            not isinstance(exponent, numbers.Real)
            or isinstance(exponent, bool | np.bool_)
            or not exponent >= 0
        ):
            raise ValueError(f"exponent: got {exponent!r}; expected a non-negative number")
        rows = count
        self.rows = rows
        self.exponent = exponent
        self._rng = _generator(seed)
        self._cdf = _zipf_cdf(rows, float(exponent))
        if permute:  # int64 already: astype without copy=False made a second one of rows x 8 B
            self.rank_to_row = self._rng.permutation(rows).astype(np.int64, copy=False)
        else:
            self.rank_to_row = np.arange(rows, dtype=np.int64)

    def sample(self, size: int | tuple[int, ...], *, chunk: int = 1 << 23) -> np.ndarray:
        """Row ids (int64) of the given shape, drawn i.i.d. (exact discrete inverse CDF), ``chunk``
        at a time."""
        shape = _sample_shape(size)
        step = as_integer(chunk)
        if step is None or step <= 0:  # a negative step drew nothing: np.empty's bytes came back
            raise ValueError(f"chunk: got {chunk!r}; expected a positive integer (ids per pass)")
        n = math.prod(shape)
        out = np.empty(n, dtype=np.int64)
        for start in range(0, n, step):
            m = min(step, n - start)
            u = np.sort(self._rng.random(m))  # sorted needles: searchsorted walks the CDF in order
            ranks = np.minimum(np.searchsorted(self._cdf, u, side="right"), self.rows - 1)
            self._rng.shuffle(ranks)  # back to an i.i.d. order
            out[start : start + m] = self.rank_to_row[ranks]
        return out.reshape(shape)

    def hottest(self, k: int) -> np.ndarray:
        """The ``k`` most popular rows, hottest first (what a profile would pin); every row when
        ``k`` is above ``rows``."""
        count = as_integer(k)
        if count is None or count < 0:  # a negative k sliced off the coldest rows instead
            raise ValueError(f"k: got {k!r}; expected an integer >= 0 (rows to return)")
        return self.rank_to_row[:count].copy()


def _sample_shape(size: object) -> tuple[int, ...]:
    """``size`` (a count or a sequence of counts, none negative) as a shape; ValueError naming it."""
    dims = (size,) if as_integer(size) is not None else size
    try:
        shape = tuple(as_integer(d) for d in dims)
    except TypeError:  # neither a count nor a sequence
        shape = (None,)
    if any(d is None or d < 0 for d in shape):
        raise ValueError(f"size: got {size!r}; expected a count or a shape of counts >= 0")
    return shape


def _zipf_cdf(rows: int, exponent: float) -> np.ndarray:
    """``P(rank <= k)`` for k in [0, rows), computed in one array (rows x 8 bytes; the powers and
    their running sum each made another: 384M rows peaked at four arrays, 12 GB, for a 3 GB CDF)."""
    cdf = np.arange(1, rows + 1, dtype=np.float64)
    np.power(cdf, -exponent, out=cdf)
    np.cumsum(cdf, out=cdf)
    cdf /= cdf[-1]
    return cdf


def _generator(seed: object) -> np.random.Generator:
    """``seed`` as a Generator: itself, or one seeded with it (an integer >= 0, a sequence of them,
    a SeedSequence, None); ValueError naming it otherwise (NumPy's named no argument)."""
    if isinstance(seed, np.random.Generator):
        return seed
    refused = f"seed: got {seed!r}; expected an integer >= 0, a NumPy Generator or None"
    if isinstance(seed, bool | np.bool_):  # a flag passed for a seed
        raise ValueError(refused)
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{refused} ({exc})") from None

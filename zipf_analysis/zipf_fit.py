"""Zipf exponent of a rank-frequency distribution, fitted two ways, and a Zipf sampler.

Model: the row of rank r (1 = most looked up) takes a share of lookups proportional to r**-s.

- :func:`fit_least_squares` - the slope of log10(count) against log10(rank), by ordinary least
  squares on log-spaced ranks (so the dense tail does not outvote the head).
- :func:`fit_mle` - maximum likelihood for a discrete power law truncated to the rank range:
  every lookup whose row's rank r falls in [rank_min, rank_max] is a draw from
  P(r) = r**-s / sum(k**-s for k in range); the normaliser uses exact sums for the first 10**5
  ranks and Euler-Maclaurin beyond, so a fit over 10M ranks takes milliseconds.

Both fit the same rank range, chosen by :func:`default_rank_range` unless given: ranks 1 up to
the last rank whose count is at least ``min_count`` (default 10). Past it, counts are a few
lookups each and their ranks are decided by sampling noise (sorting noisy counts flattens the
tail), which biases both fits low: on 5M synthetic lookups over 1M rows the bias is about -0.01
at min_count 5, -0.005 at 10 and -0.002 at 20 for s in 0.6..1. The range is reported with each
fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from tiered_store.integers import as_integer

__all__ = [
    "ZipfFit",
    "default_rank_range",
    "fit_least_squares",
    "fit_mle",
    "fit_zipf",
    "fitted_counts",
    "sample_zipf",
]

DEFAULT_MIN_COUNT = 10  # the fit range ends at the last rank with at least this many lookups
DEFAULT_BINS_PER_DECADE = 20  # log-spaced ranks per factor of 10 for least squares
_EXACT_TERMS = 100_000  # normaliser terms summed exactly before Euler-Maclaurin takes over
_EXPONENT_BOUNDS = (0.0, 8.0)  # counts sorted hottest first never fit below 0


@dataclass(frozen=True)
class ZipfFit:
    """One fitted exponent and the range it was fitted on.

    Attributes
    ----------
    method : str
        ``"least_squares"`` or ``"mle"``.
    exponent : float
        s in count(rank) ~ rank**-s.
    rank_min, rank_max : int
        Inclusive rank range used.
    lookups : int
        Lookups taken by rows in the range (the MLE's sample size).
    points : int
        Ranks (least squares: log-spaced sample points) the fit used.
    stderr : float
        Standard error of the exponent (MLE: from the Fisher information; least squares: of the
        regression slope, which understates the true uncertainty as neighbouring ranks are
        correlated).
    r_squared : float or None
        Least squares only: coefficient of determination in log-log space.
    intercept : float or None
        Least squares only: log10 count at rank 1 of the fitted line.
    at_bound : bool
        MLE only: the likelihood still rose at the search's upper end (s = 8): the exponent is
        at least that, and ``stderr`` is NaN.
    """

    method: str
    exponent: float
    rank_min: int
    rank_max: int
    lookups: int
    points: int
    stderr: float
    r_squared: float | None = None
    intercept: float | None = None
    at_bound: bool = False

    def to_dict(self) -> dict[str, object]:
        """Plain-JSON form."""
        return asdict(self)


def _sorted_counts(counts: np.ndarray | Sequence[int]) -> np.ndarray:
    """Positive counts in descending order (rank 1 first), as float64."""
    c = np.asarray(counts).reshape(-1)
    c = c[c > 0]
    if c.size > 1 and (np.diff(c) > 0).any():
        c = np.sort(c)[::-1]
    return c.astype(np.float64)


def default_rank_range(
    counts: np.ndarray | Sequence[int], min_count: int = DEFAULT_MIN_COUNT
) -> tuple[int, int]:
    """``(1, last rank with count >= min_count)`` for counts in any order; a ValueError when
    fewer than two ranks reach ``min_count`` (no range to fit a slope on).

    Examples
    --------
    >>> default_rank_range([100, 50, 12, 9, 4, 1])
    (1, 3)
    >>> default_rank_range([12, 3, 1])
    Traceback (most recent call last):
    ValueError: 1 row has at least 10 lookups; a Zipf fit needs two or more (lower min_count, or pass rank_max)
    """
    c = _sorted_counts(counts)
    if c.size == 0:
        raise ValueError("no lookups to fit")
    last = int(np.searchsorted(-c, -min_count, side="right"))
    if last < 2:
        raise ValueError(
            f"{last} row{'s' if last != 1 else ''} {'has' if last == 1 else 'have'} at least "
            f"{min_count} lookups; a Zipf fit needs two or more (lower min_count, or pass rank_max)"
        )
    return 1, last


def _resolve_range(
    c: np.ndarray, rank_min: int | None, rank_max: int | None, min_count: int
) -> tuple[int, int]:
    """Fill in and check a rank range against the counts."""
    for name, value, least in (("rank_min", rank_min, 1), ("rank_max", rank_max, 1)):
        if value is not None and (as_integer(value) is None or value < least):
            raise ValueError(f"{name}: got {value!r}; expected an integer rank >= {least}")
    if as_integer(min_count) is None:
        raise ValueError(f"min_count: got {min_count!r}; expected an integer count of lookups")
    if rank_max is None:
        lo, hi = default_rank_range(c, min_count)
    else:
        lo, hi = 1, min(int(rank_max), c.size)
    lo = lo if rank_min is None else int(rank_min)
    if not 1 <= lo < hi:
        raise ValueError(
            f"rank range [{lo}, {hi}]: expected 1 <= rank_min < rank_max <= {c.size} (ranks with "
            "lookups); with few rows above min_count, pass rank_max or lower min_count"
        )
    return lo, hi


def fit_least_squares(
    counts: np.ndarray | Sequence[int],
    *,
    rank_min: int | None = None,
    rank_max: int | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    bins_per_decade: int = DEFAULT_BINS_PER_DECADE,
) -> ZipfFit:
    """Zipf exponent as minus the slope of log count vs log rank over a rank range.

    Parameters
    ----------
    counts : array of int
        Lookups per row, any order (zeros ignored).
    rank_min, rank_max : int, optional
        Inclusive rank range; default :func:`default_rank_range`.
    min_count : int
        Used for the default ``rank_max``.
    bins_per_decade : int
        Log-spaced sample ranks per decade (every rank when the range is smaller).

    Examples
    --------
    >>> ranks = np.arange(1, 10_001)
    >>> fit = fit_least_squares(np.round(1e6 * ranks ** -0.9))
    >>> round(fit.exponent, 2), fit.rank_min
    (0.9, 1)
    """
    if as_integer(bins_per_decade) is None or bins_per_decade < 1:
        raise ValueError(
            f"bins_per_decade: got {bins_per_decade!r}; expected an integer >= 1 (ranks per decade)"
        )
    c = _sorted_counts(counts)
    lo, hi = _resolve_range(c, rank_min, rank_max, min_count)
    n_pts = max(2, int(math.ceil(math.log10(hi / lo) * bins_per_decade)) + 1)
    ranks = np.unique(np.rint(np.geomspace(lo, hi, n_pts)).astype(np.int64))
    x = np.log10(ranks)
    y = np.log10(c[ranks - 1])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    dof = max(ranks.size - 2, 1)
    sx = float(((x - x.mean()) ** 2).sum())
    stderr = math.sqrt(float((resid**2).sum()) / dof / sx) if sx > 0 else float("nan")
    return ZipfFit(
        "least_squares",
        float(-slope),
        lo,
        hi,
        int(c[lo - 1 : hi].sum()),
        int(ranks.size),
        stderr,
        r2,
        float(intercept),
    )


def _log_norm(s: float, lo: int, hi: int, log_k: np.ndarray) -> float:
    """log of sum(k**-s, k = lo..hi): exact over ``log_k`` (ranks lo..), Euler-Maclaurin after."""
    m = lo + log_k.size  # first rank not summed exactly
    head = np.exp(-s * log_k)
    total = float(head.sum())
    if m <= hi:
        a, b = float(m), float(hi)
        integral = (
            math.log(b / a) if abs(1.0 - s) < 1e-12 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)
        )
        f_a, f_b = a**-s, b**-s
        d1 = -s * (b ** (-s - 1) - a ** (-s - 1)) / 12.0
        d3 = -s * (s + 1) * (s + 2) * (b ** (-s - 3) - a ** (-s - 3)) / 720.0
        total += integral + (f_a + f_b) / 2.0 + d1 - d3
    return math.log(total)


def fit_mle(
    counts: np.ndarray | Sequence[int],
    *,
    rank_min: int | None = None,
    rank_max: int | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> ZipfFit:
    """Zipf exponent by maximum likelihood for a discrete power law truncated to a rank range.

    Maximises ``-s * sum(c_r log r) - n log H(s)`` over lookups with ranks in the range, where
    ``H(s) = sum(k**-s)`` over the range, by bounded scalar minimisation on s in [0, 8] (a fit ending at 8 has
    ``at_bound`` set).

    Parameters
    ----------
    counts : array of int
        Lookups per row, any order (zeros ignored).
    rank_min, rank_max : int, optional
        Inclusive rank range; default :func:`default_rank_range`.
    min_count : int
        Used for the default ``rank_max``.

    Examples
    --------
    >>> rows = sample_zipf(200_000, 5_000, 0.9, seed=1)
    >>> fit = fit_mle(np.bincount(rows))
    >>> abs(fit.exponent - 0.9) < 0.03
    True
    """
    c = _sorted_counts(counts)
    lo, hi = _resolve_range(c, rank_min, rank_max, min_count)
    sel = c[lo - 1 : hi]
    n = float(sel.sum())
    ranks = np.arange(lo, hi + 1, dtype=np.float64)
    mean_log = float((sel * np.log(ranks)).sum()) / n
    log_k = np.log(np.arange(lo, min(hi, lo + _EXACT_TERMS - 1) + 1, dtype=np.float64))

    def nll(s: float) -> float:
        return s * mean_log + _log_norm(s, lo, hi, log_k)

    from scipy import optimize  # here: importing scipy costs ~0.3 s that most callers never need

    res = optimize.minimize_scalar(
        nll, bounds=_EXPONENT_BOUNDS, method="bounded", options={"xatol": 1e-7}
    )
    s = float(res.x)
    h = 1e-4
    var_log_r = (nll(s + h) - 2 * nll(s) + nll(s - h)) / (h * h)  # d2/ds2 log H = Var(log r)
    at_bound = s > _EXPONENT_BOUNDS[1] - 1e-4 and nll(_EXPONENT_BOUNDS[1]) < nll(s - h)
    stderr = 1.0 / math.sqrt(n * var_log_r) if var_log_r > 0 and not at_bound else float("nan")
    return ZipfFit("mle", s, lo, hi, int(n), hi - lo + 1, stderr, at_bound=at_bound)


def fit_zipf(
    counts: np.ndarray | Sequence[int],
    *,
    rank_min: int | None = None,
    rank_max: int | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> dict[str, ZipfFit]:
    """Both fits over the same range: ``{"least_squares": ..., "mle": ...}``.

    Examples
    --------
    >>> fits = fit_zipf(np.bincount(sample_zipf(500_000, 20_000, 0.8, seed=3)))
    >>> {k: round(v.exponent, 1) for k, v in fits.items()}
    {'least_squares': 0.8, 'mle': 0.8}
    """
    c = _sorted_counts(counts)
    lo, hi = _resolve_range(c, rank_min, rank_max, min_count)
    return {
        "least_squares": fit_least_squares(c, rank_min=lo, rank_max=hi),
        "mle": fit_mle(c, rank_min=lo, rank_max=hi),
    }


def fitted_counts(fit: ZipfFit, ranks: np.ndarray | Sequence[int]) -> np.ndarray:
    """Counts the fitted law predicts at ``ranks`` (to draw the fitted line).

    Least squares: ``10**intercept * r**-s``; MLE: ``lookups * r**-s / H(s)`` over the fit range.

    Examples
    --------
    >>> fit = fit_mle(np.round(1e5 * np.arange(1, 1001) ** -1.0), rank_max=1000)
    >>> float(fitted_counts(fit, [1])[0]) > 9e4
    True
    """
    r = np.asarray(ranks, dtype=np.float64)
    if fit.method == "least_squares":
        return 10.0 ** (fit.intercept or 0.0) * r**-fit.exponent
    lo, hi = fit.rank_min, fit.rank_max
    log_k = np.log(np.arange(lo, min(hi, lo + _EXACT_TERMS - 1) + 1, dtype=np.float64))
    return fit.lookups * r**-fit.exponent / math.exp(_log_norm(fit.exponent, lo, hi, log_k))


def zipf_probabilities(rows: int, exponent: float) -> np.ndarray:
    """P(rank = r) for r = 1..rows under a Zipf law truncated at ``rows``."""
    p = np.arange(1, rows + 1, dtype=np.float64) ** -float(exponent)
    return p / p.sum()


def sample_zipf(
    n: int,
    rows: int,
    exponent: float,
    *,
    seed: int | np.random.Generator | None = None,
    permute: bool = True,
    chunk: int = 1 << 23,
) -> np.ndarray:
    """``n`` row ids drawn i.i.d. from a Zipf law over ``rows`` rows (exact discrete inverse CDF).

    With ``permute`` (default), rank r maps to a fixed random row id, as hashing scatters the
    hot N-grams over the table; otherwise the row id is r - 1. Memory: 16 bytes per row (the CDF
    and the rank-to-row map), plus the output and ~16 bytes per id of ``chunk``.

    Examples
    --------
    >>> ids = sample_zipf(10, 100, 1.0, seed=0, permute=False)
    >>> ids.dtype, bool((ids >= 0).all() and (ids < 100).all())
    (dtype('int64'), True)
    """
    from tiered_store.workload import ZipfWorkload

    return ZipfWorkload(rows, exponent, seed, permute=permute).sample(n, chunk=chunk)

"""PNG plots of a frequency profile and of miss-ratio curves (matplotlib, Agg canvas).

Figures are drawn on ``matplotlib.figure.Figure`` with an Agg canvas, never through pyplot, so
importing this module changes no global backend and plots work on machines without a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, FuncFormatter

from tiered_store.atomic_file import atomic_write, write_step
from tiered_store.profile import FrequencyProfile

from .mrc import MissRatioCurve
from .profile import profile_fits
from .zipf_fit import ZipfFit, fitted_counts

__all__ = ["plot_miss_ratio_curves", "plot_rank_frequency"]

_MAX_POINTS = 4000  # points drawn per line; longer series are thinned log-uniformly
_STYLE = {  # per curve name: colour, line style, marker
    "lru": ("tab:blue", "-", None),
    "shards": ("tab:orange", "--", None),
    "static-topk": ("tab:green", "-.", None),
    "belady": ("tab:red", ":", "o"),
}
_SPARE_COLOURS = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
_FEW_POINTS = 16  # curves with at most this many capacities are sweeps: drawn as points
_MINOR_LABEL_DECADES = 3.35  # a log % axis wider than this labels only its powers of 10
_FIT_STYLE = {"least_squares": ("tab:orange", "--"), "mle": ("tab:red", ":")}


def _thin(n: int, max_points: int = _MAX_POINTS) -> np.ndarray:
    """Indices 0..n-1 thinned to about ``max_points``, log-uniform in index (ends kept)."""
    if n <= max_points:
        return np.arange(n)
    idx = np.unique(np.geomspace(1, n, max_points).astype(np.int64) - 1)
    return np.unique(np.concatenate([idx, [n - 1]]))


def write_png(fig: Figure, file: BinaryIO) -> None:
    """Render ``fig`` as PNG into an open binary file."""
    FigureCanvasAgg(fig)
    fig.savefig(file, dpi=120, format="png")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render to PNG at ``path``, atomically; a failed write is a TierIOError naming it."""
    path = Path(path)
    with write_step(f"cannot write {path}", "writing the plot", "nothing was written there"):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            write_png(fig, f)
    return path


def plot_rank_frequency(
    profile: FrequencyProfile,
    path: str | os.PathLike[str],
    *,
    fits: Mapping[str, ZipfFit] | None = None,
    title: str | None = None,
) -> Path:
    """Log-log rank-frequency plot with the fitted Zipf lines and the fit range shaded.

    Parameters
    ----------
    profile : FrequencyProfile
        Counts to draw.
    path : str or Path
        PNG to write.
    fits : mapping of method -> ZipfFit, optional
        Lines to draw; default ``profile_fits(profile)`` (skipped when the profile is too small to fit).
    title : str, optional
        Figure title (default: the profile's name and lookups).

    Returns
    -------
    Path
        The PNG.

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store.profile import profile_ids
    >>> from zipf_analysis.zipf_fit import sample_zipf
    >>> prof = profile_ids(sample_zipf(100_000, 10_000, 0.9, seed=0), rows=10_000)
    >>> png = plot_rank_frequency(prof, os.path.join(tempfile.mkdtemp(), "rf.png"))
    >>> png.stat().st_size > 10_000
    True
    """
    if fits is None:
        try:
            fits = profile_fits(profile)
        except ValueError:
            fits = {}
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    counts = profile.counts
    if counts.size:
        idx = _thin(counts.size)
        ax.loglog(idx + 1, counts[idx], ".", ms=2, color="tab:blue", label="observed")
    for fit in fits.values():
        colour, style = _FIT_STYLE.get(fit.method, ("k", "--"))
        r = np.geomspace(fit.rank_min, fit.rank_max, 200)
        ax.loglog(
            r,
            fitted_counts(fit, r),
            style,
            color=colour,
            lw=1.8,
            label=f"{fit.method}: s ≥ {fit.exponent:.3f} (the search's end)"
            if fit.at_bound
            else f"{fit.method}: s = {fit.exponent:.3f} ± {fit.stderr:.3f}",
        )
    if fits:
        first = next(iter(fits.values()))
        ax.axvspan(
            first.rank_min,
            first.rank_max,
            color="0.9",
            zorder=0,
            label=f"fit range: ranks {first.rank_min}..{first.rank_max}",
        )
    ax.set_xlabel("rank (1 = most looked-up row)")
    ax.set_ylabel("lookups")
    ax.set_title(
        title
        or f"{profile.name or 'rows'}: {profile.lookups:,} lookups, "
        f"{profile.distinct:,} distinct rows"
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


class _MinorPercent(Formatter):
    """Labels the 2x and 5x minor ticks of a log percent axis (others stay bare), and none when
    the axis spans more than ``_MINOR_LABEL_DECADES`` decades, where they would overlap."""

    def __call__(self, value: float, pos: int | None = None) -> str:
        low, high = sorted(self.axis.get_view_interval()) if self.axis else (0.0, 0.0)
        if value <= 0 or (low > 0 and math.log10(high / low) > _MINOR_LABEL_DECADES):
            return ""
        lead = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return f"{value:g}%" if round(lead, 6) in (2.0, 5.0) else ""


def plot_miss_ratio_curves(
    curves: Iterable[MissRatioCurve],
    path: str | os.PathLike[str],
    *,
    table_rows: int | None = None,
    title: str | None = None,
) -> Path:
    """Miss ratio vs capacity for several curves: rows on a log axis (bottom) and, when the table
    size is known, % of the table (top).

    Parameters
    ----------
    curves : iterable of MissRatioCurve
        LRU, SHARDS, static top-K, Belady, ... (capacity 0 is not drawn on the log axis).
    path : str or Path
        PNG to write.
    table_rows : int, optional
        Table size for the % axis (default: the first curve's ``table_rows``).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        The PNG.

    Examples
    --------
    >>> import tempfile, os
    >>> from zipf_analysis.mrc import lru_mrc, belady_mrc
    >>> ids = np.random.default_rng(0).zipf(1.5, 20_000) % 1000
    >>> png = plot_miss_ratio_curves([lru_mrc(ids, table_rows=1000), belady_mrc(ids)],
    ...                              os.path.join(tempfile.mkdtemp(), "mrc.png"))
    >>> png.stat().st_size > 10_000
    True
    """
    return _save(miss_ratio_figure(curves, table_rows=table_rows, title=title), path)


def miss_ratio_figure(
    curves: Iterable[MissRatioCurve], *, table_rows: int | None = None, title: str | None = None
) -> Figure:
    """The figure :func:`plot_miss_ratio_curves` writes, not yet written anywhere."""
    curves = list(curves)
    if table_rows is None:
        table_rows = next((c.table_rows for c in curves if c.table_rows), None)
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    spare = iter(_SPARE_COLOURS * 3)
    for curve in curves:
        colour, style, marker = _STYLE.get(curve.name) or (next(spare), "-", None)
        if marker is None and curve.capacities.size <= _FEW_POINTS:  # a sweep: points, not steps
            marker = "o"
        keep = curve.capacities > 0
        caps, ratio = curve.capacities[keep], curve.miss_ratio[keep]
        idx = _thin(caps.size)
        label = curve.name
        if curve.metadata.get("rate"):
            label += f" (R = {curve.metadata['rate']:.3g})"
        ax.plot(
            caps[idx],
            ratio[idx],
            linestyle=style,
            marker=marker,
            ms=3,
            color=colour,
            label=label,
            drawstyle="steps-post" if marker is None else "default",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("cache capacity (rows)")
    ax.set_ylabel("miss ratio")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    if table_rows:
        scale = 100.0 / table_rows
        top = ax.secondary_xaxis("top", functions=(lambda x: x * scale, lambda p: p / scale))
        top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        top.xaxis.set_minor_formatter(_MinorPercent())
        top.set_xlabel("capacity (% of the table's rows)")
    lookups = curves[0].lookups if curves else 0
    ax.set_title(title or f"miss-ratio curves, {lookups:,} lookups", pad=10)
    fig.tight_layout()
    return fig

"""Turn a profile and miss-ratio curves into tier sizes and a Markdown + JSON report.

:func:`recommend_tier_sizes` answers the sizing question directly: for a target hit rate per
tier, how many rows each tier needs, with a YAML snippet the store's config accepts.
:func:`write_report` writes ``report.md``, ``report.json`` and the plots into one folder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tiered_store.errors import ConfigError
from tiered_store.profile import FrequencyProfile

from .mrc import MissRatioCurve, mean_absolute_error
from .profile import profile_summary

__all__ = ["recommend_tier_sizes", "write_report"]

_PREFERRED_CURVES = ("lru", "shards")  # sizing curve when none is named: the store's default policy
_EXACT_LRU = "lru"


def _curve_list(curves: MissRatioCurve | Iterable[MissRatioCurve]) -> list[MissRatioCurve]:
    """A curve or curves as a list with unique names."""
    out = [curves] if isinstance(curves, MissRatioCurve) else list(curves)
    if not out:
        raise ConfigError("curves: got none; expected at least one miss-ratio curve")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"curves: duplicate names {names}; give each curve its own name")
    return out


def recommend_tier_sizes(
    curves: MissRatioCurve | Iterable[MissRatioCurve],
    targets: Mapping[str, float],
    *,
    curve: str | None = None,
    inclusive: bool = True,
) -> dict[str, Any]:
    """Capacities (rows) that reach target hit rates, read off a miss-ratio curve.

    Targets are cumulative, tier by tier in the order given: the first tier's (``hot``) is the
    share of lookups it serves itself; the next (``warm``) is the combined hit rate of it and
    every tier before it. The combined rate of the first k tiers needs a cache of C_k rows, the
    smallest capacity whose hit ratio reaches the target. With ``inclusive`` (default, as in the
    store, where warm keeps the rows it passes up to hot) tier k gets C_k rows; with
    ``inclusive=False`` (exclusive tiers) it gets C_k - C_(k-1).

    Parameters
    ----------
    curves : MissRatioCurve or iterable of them
        Curves to read; all are reported under ``"by_curve"``.
    targets : mapping of tier name -> hit rate in (0, 1]
        E.g. ``{"hot": 0.5, "warm": 0.9}``, non-decreasing.
    curve : str, optional
        Name of the curve the recommendation (and YAML) uses; default ``"lru"``, else
        ``"shards"``, else the first.
    inclusive : bool
        Whether a tier also holds the rows of the tiers above it.

    Returns
    -------
    dict
        ``"curve"``, ``"inclusive"``, ``"tiers"`` (per tier: ``target_hit_rate``, ``capacity``
        rows, ``combined_capacity``, ``hit_rate`` reached, ``reachable``, ``percent_of_table``),
        ``"by_curve"`` (tier -> capacity for every curve) and ``"yaml"``. An unreachable target
        (above the curve's best hit ratio: compulsory misses) gets every distinct row and
        ``reachable: False``.

    Raises
    ------
    ConfigError
        A target outside (0, 1], decreasing targets, or an unknown curve name.

    Examples
    --------
    >>> import numpy as np
    >>> from zipf_analysis.mrc import lru_mrc
    >>> ids = np.random.default_rng(0).zipf(1.3, 200_000) % 50_000
    >>> rec = recommend_tier_sizes(lru_mrc(ids, table_rows=50_000), {"hot": 0.5, "warm": 0.8})
    >>> print(rec["yaml"], end="")  # doctest: +ELLIPSIS
    tiers:
      hot:  {capacity: ...}
      warm: {capacity: ...}
    >>> rec["tiers"]["hot"]["hit_rate"] >= 0.5, rec["tiers"]["warm"]["reachable"]
    (True, True)
    """
    all_curves = _curve_list(curves)
    if not targets:
        raise ConfigError("targets: got none; expected e.g. {'hot': 0.5, 'warm': 0.9}")
    prev = 0.0
    for tier, rate in targets.items():
        if not isinstance(rate, int | float) or not 0.0 < float(rate) <= 1.0:
            raise ConfigError(f"targets.{tier}: got {rate!r}; expected a hit rate in (0, 1]")
        if float(rate) < prev:
            raise ConfigError(
                f"targets.{tier}: got {rate}; expected >= {prev}, the target of the tier before "
                "(targets are cumulative: each includes the tiers above)"
            )
        prev = float(rate)
    by_name = {c.name: c for c in all_curves}
    if curve is None:
        curve = next((n for n in _PREFERRED_CURVES if n in by_name), all_curves[0].name)
    if curve not in by_name:
        raise ConfigError(f"curve: got {curve!r}; expected one of {sorted(by_name)}")

    def size(c: MissRatioCurve) -> dict[str, dict[str, Any]]:
        tiers: dict[str, dict[str, Any]] = {}
        above = 0
        for tier, rate in targets.items():
            combined = c.capacity_for(float(rate))
            reachable = combined is not None
            if combined is None:
                combined = c.max_capacity
            combined = max(combined, above)
            cap = combined if inclusive else combined - above
            rows = c.table_rows
            tiers[tier] = {
                "target_hit_rate": float(rate),
                "capacity": int(cap),
                "combined_capacity": int(combined),
                "hit_rate": round(1.0 - float(c.at(combined)), 6),
                "reachable": reachable,
                "percent_of_table": round(100.0 * cap / rows, 4) if rows else None,
            }
            above = combined
        return tiers

    chosen = size(by_name[curve])
    width = max(len(t) for t in targets) + 1
    lines = ["tiers:"]
    for tier, info in chosen.items():
        line = f"  {tier + ':':<{width}} {{capacity: {info['capacity']}}}"
        if not info["reachable"]:
            best = 1.0 - float(by_name[curve].miss_ratio.min())
            line += f"  # target {info['target_hit_rate']} unreachable: best hit rate {best:.4f}"
        lines.append(line)
    return {
        "curve": curve,
        "inclusive": inclusive,
        "tiers": chosen,
        "by_curve": {c.name: {t: v["capacity"] for t, v in size(c).items()} for c in all_curves},
        "yaml": "\n".join(lines) + "\n",
    }


def _fmt(value: Any, digits: int = 4) -> str:
    """A table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _share_capacities(curves: Sequence[MissRatioCurve], rows: int | None) -> list[int]:
    """Capacities for the curve table: 0.1/1/10/50/100% of the table (or of the distinct rows)."""
    base = rows or max(c.max_capacity for c in curves)
    return sorted({max(1, math.ceil(f * base)) for f in (0.001, 0.01, 0.1, 0.5, 1.0)})


def write_report(
    out_dir: str | os.PathLike[str],
    profile: FrequencyProfile | None = None,
    curves: Iterable[MissRatioCurve] = (),
    *,
    targets: Mapping[str, float] | None = None,
    title: str = "Engram access analysis",
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``report.md`` and ``report.json`` (and PNG plots) describing a profile and curves.

    The JSON holds the profile summary (lookups, distinct rows, top shares of the table and of
    touched rows, collision rate, both Zipf fits with their rank range), every curve (thinned to
    2,000 points), each curve's mean absolute error against the exact LRU curve when there is
    one, and the tier recommendation for ``targets``.

    Parameters
    ----------
    out_dir : str or Path
        Folder to write into (created).
    profile : FrequencyProfile, optional
        The table's frequency profile.
    curves : iterable of MissRatioCurve
        Curves to report and plot.
    targets : mapping of tier -> hit rate, optional
        Passed to :func:`recommend_tier_sizes`.
    title : str
        Report title.
    plots : bool
        Also write ``rank_frequency.png`` and ``miss_ratio.png``.

    Returns
    -------
    dict of str -> Path
        ``"markdown"``, ``"json"`` and, with plots, ``"rank_frequency"`` / ``"miss_ratio"``.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from zipf_analysis.mrc import lru_mrc
    >>> from tiered_store.profile import profile_ids
    >>> ids = np.random.default_rng(0).zipf(1.3, 50_000) % 5_000
    >>> paths = write_report(tempfile.mkdtemp(), profile_ids(ids, rows=5_000),
    ...                      [lru_mrc(ids, table_rows=5_000)], targets={"hot": 0.5}, plots=False)
    >>> sorted(paths), "tiers:" in paths["markdown"].read_text()
    (['json', 'markdown'], True)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = list(curves)
    paths: dict[str, Path] = {}
    data: dict[str, Any] = {"title": title}
    md = [f"# {title}", ""]

    if profile is not None:
        summary = profile_summary(profile)
        data["profile"] = summary
        md += ["## Frequency profile", "", "| figure | value |", "| --- | --- |"]
        for key in (
            "name",
            "rows",
            "lookups",
            "distinct_rows",
            "touched_fraction",
            "lookups_per_distinct_row",
            "ngram_keys",
            "hash_collision_rate",
            "expected_collision_rate",
        ):
            md.append(f"| {key.replace('_', ' ')} | {_fmt(summary[key])} |")
        md += [
            "",
            "Share of lookups taken by the top rows, counted as a fraction of the table's "
            "rows and of the rows touched at least once:",
            "",
            "| top | of the table | of touched rows |",
            "| --- | --- | --- |",
        ]
        shares = summary["top_shares"]
        for label in shares["of_touched"]:
            md.append(
                f"| {label} | {_fmt(shares['of_table'][label])} | "
                f"{_fmt(shares['of_touched'][label])} |"
            )
        zipf = summary.get("zipf", {})
        if "error" in zipf:
            md += ["", f"Zipf fit: not possible ({zipf['error']})."]
        elif zipf:
            md += [
                "",
                "Zipf exponent s (count ~ rank^-s):",
                "",
                "| method | s | stderr | rank range | lookups in range | R^2 |",
                "| --- | --- | --- | --- | --- | --- |",
            ]
            for fit in zipf.values():
                md.append(
                    f"| {fit['method']} | {fit['exponent']:.4f} | {fit['stderr']:.4f} | "
                    f"{fit['rank_min']:,}..{fit['rank_max']:,} | {fit['lookups']:,} | "
                    f"{_fmt(fit['r_squared'])} |"
                )
        md.append("")

    if curves:
        reference = next((c for c in curves if c.name == _EXACT_LRU and c.misses is not None), None)
        rows = next((c.table_rows for c in curves if c.table_rows), None)
        if rows is None and profile is not None:
            rows = profile.rows
        caps = _share_capacities(curves, rows)
        unit = "of the table" if rows else "of the distinct rows"
        data["curves"] = [c.to_dict() for c in curves]
        md += [
            "## Miss-ratio curves",
            "",
            f"Miss ratio at capacities given in rows (and % {unit}). Demand-filled curves "
            "count compulsory misses; static top-K is preloaded unless its metadata says not.",
            "",
            "| curve | "
            + " | ".join(
                f"{c:,} ({100 * c / (rows or max(x.max_capacity for x in curves)):.3g}%)"
                for c in caps
            )
            + " | MAE vs exact LRU |",
            "| --- " * (len(caps) + 2) + "|",
        ]
        errors: dict[str, float] = {}
        for c in curves:
            mae = None
            if reference is not None and c is not reference:
                mae = mean_absolute_error(c, reference)
                errors[c.name] = mae
            cells = " | ".join(f"{float(c.at(x)):.4f}" for x in caps)
            md.append(f"| {c.name} | {cells} | {_fmt(mae)} |")
        data["mae_vs_exact_lru"] = errors
        md.append("")
        if targets:
            rec = recommend_tier_sizes(curves, targets)
            data["recommendation"] = rec
            md += [
                "## Recommended tier sizes",
                "",
                f"From the `{rec['curve']}` curve; targets are cumulative hit rates "
                f"({'inclusive' if rec['inclusive'] else 'exclusive'} tiers).",
                "",
                "| tier | target | capacity (rows) | % of table | hit rate reached |",
                "| --- | --- | --- | --- | --- |",
            ]
            for tier, info in rec["tiers"].items():
                md.append(
                    f"| {tier} | {info['target_hit_rate']} | {info['capacity']:,} | "
                    f"{_fmt(info['percent_of_table'])} | {info['hit_rate']:.4f} |"
                )
            md += ["", "```yaml", rec["yaml"].rstrip(), "```", ""]

    if plots:
        from .plots import plot_miss_ratio_curves, plot_rank_frequency

        if profile is not None and profile.distinct:
            paths["rank_frequency"] = plot_rank_frequency(profile, out / "rank_frequency.png")
            md += ["![rank-frequency](rank_frequency.png)", ""]
        if curves:
            paths["miss_ratio"] = plot_miss_ratio_curves(curves, out / "miss_ratio.png")
            md += ["![miss-ratio curves](miss_ratio.png)", ""]

    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text("\n".join(md))
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(data, indent=1))
    return paths

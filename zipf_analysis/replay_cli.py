"""``tiered-store replay``: replay a trace through the store's cache code, beside the offline bounds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tiered_store.capacity import resolve_capacity
from tiered_store.config import StoreConfig
from tiered_store.trace import TraceReader

from .mrc import MissRatioCurve, belady_misses, lru_mrc, static_topk_mrc
from .replay import ReplayResult, replay, table_geometry

DEFAULT_SWEEP = "1%,5%,10%,25%"


def register(sub) -> None:
    """Add the ``replay`` subcommand."""
    p = sub.add_parser(
        "replay",
        help="replay an access trace through the cache tiers and report hit rates per tier",
        description="Runs the store's own cache code (no payload) over one table of a trace, for the "
        "config's policies or each of --policies. Reports per tier the hit ratio per lookup, unique rows "
        "fetched per batch, rows and bytes moved, and a modelled stall time (the config's cost_model), "
        "the miss ratio per lookup and the fetch ratio (rows read from cold per lookup: a row missed "
        "several times in one batch is read once, the figure comparable with per-request simulators), "
        "with Belady's optimum and the oracle static top-K at the same capacities. Also sweeps a single "
        "cache tier over --sweep capacities per policy and draws its fetch ratio against capacity (PNG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", type=Path, help="store config (YAML)")
    p.add_argument(
        "trace", type=Path, help="trace file (from `tiered-store analyze` or TraceWriter)"
    )
    p.add_argument("--table", help="which table of the trace (default: the first)")
    p.add_argument(
        "--policies", help="comma-separated policies to compare, e.g. lru,sieve,lru+tinylfu"
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        help="regroup into batches of N tokens; 1 = one lookup at a time",
    )
    p.add_argument(
        "--sweep", default=DEFAULT_SWEEP, help="capacities for the miss-ratio plot ('' to skip)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("replay-out"), help="directory for replay.json and PNG"
    )
    p.add_argument(
        "--no-bounds",
        action="store_true",
        help="skip Belady / static top-K (they read the whole trace)",
    )
    p.set_defaults(run=run_replay)


def run_replay(args) -> int:
    """Replay, print the table, write JSON and the PNG."""
    config = StoreConfig.from_yaml(args.config)
    with TraceReader(args.trace) as reader:
        return _replay_and_report(args, config, reader)


def _replay_and_report(args, config: StoreConfig, reader: TraceReader) -> int:
    """The body of ``run_replay`` with the trace open."""
    table = args.table if args.table is not None else 0
    layout = reader.layout[reader.table_index(table)]
    rows, row_bytes = table_geometry(config, layout)
    policies = [p.strip() for p in args.policies.split(",")] if args.policies else [None]
    results = [
        replay(config, reader, table=table, batch_tokens=args.batch_tokens, policy=p)
        for p in policies
    ]
    ids = None if args.no_bounds else reader.read_all(table)
    if ids is not None:
        hot, warm = results[0].tiers["hot"]["capacity"], results[0].tiers["warm"]["capacity"]
        bounds = offline_bounds(ids, {"hot": hot, "hot+warm": hot + warm})
        for result in results:
            result.bounds = bounds
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "config": str(args.config),
        "trace": str(args.trace),
        "rows": rows,
        "row_bytes": row_bytes,
        "results": [r.to_dict() for r in results],
    }
    if args.sweep:
        curves = sweep(
            config,
            reader,
            table,
            [p or config.tiers.warm.policy for p in policies],
            args.sweep,
            args.batch_tokens,
            rows,
            row_bytes,
            ids,
        )
        doc["sweep"] = [c.to_dict() for c in curves]
        from .plots import plot_miss_ratio_curves

        png = plot_miss_ratio_curves(
            curves,
            args.out / "replay.png",
            table_rows=rows,
            title=f"replay: {layout.get('name', table)}",
        )
        print(f"\nmiss ratio vs capacity (replayed policies: fetch ratio): {png}")
        print_sweep(curves, rows)
    (args.out / "replay.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"results: {args.out / 'replay.json'}")
    return 0


def offline_bounds(ids: np.ndarray, capacities: dict[str, int]) -> dict[str, float]:
    """Belady's and the oracle static top-K's miss ratios at each named capacity."""
    caps = sorted(set(capacities.values()))
    belady = dict(zip(caps, belady_misses(ids, caps), strict=True))
    static = static_topk_mrc(np.bincount(ids), capacities=caps)
    static_at = dict(zip(static.capacities.tolist(), static.miss_ratio.tolist(), strict=True))
    out = {}
    for name, cap in capacities.items():
        out[f"belady@{name}"] = float(belady[cap]) / ids.size
        out[f"static-topk@{name}"] = static_at[cap]
    return out


def sweep(
    config, reader, table, policies, spec, batch_tokens, rows, row_bytes, ids
) -> list[MissRatioCurve]:
    """One cache tier (warm) at each capacity, per policy, beside exact LRU, static top-K and Belady."""
    caps = sorted(
        {
            resolve_capacity(_spec(s), table_rows=rows, row_bytes=row_bytes, key="--sweep")
            for s in spec.split(",")
            if s.strip()
        }
        - {0}
    )
    grid = [0, *caps]
    curves = []
    for policy in dict.fromkeys(policies):
        ratios = [1.0]
        for cap in caps:
            single = config.model_copy(
                update={
                    "tiers": config.tiers.model_copy(
                        update={
                            "hot": config.tiers.hot.model_copy(update={"capacity": 0}),
                            "warm": config.tiers.warm.model_copy(
                                update={"capacity": cap, "static_rows": None, "preload_rows": None}
                            ),
                        }
                    )
                }
            )
            ratios.append(
                replay(
                    single, reader, table=table, batch_tokens=batch_tokens, policy=policy
                ).fetch_ratio  # comparable with the per-request curves drawn beside it
            )
        curves.append(
            MissRatioCurve(
                policy,
                np.array(grid),
                np.array(ratios),
                int(ids.size) if ids is not None else 0,
                table_rows=rows,
                metadata={
                    "method": "replay",
                    "batch_tokens": batch_tokens,
                    "metric": "rows read from cold per lookup",
                },
            )
        )
    if ids is not None:
        curves.append(
            lru_mrc(ids, capacities=grid, table_rows=rows, name="lru (exact, per request)")
        )
        curves.append(static_topk_mrc(np.bincount(ids), capacities=grid, table_rows=rows))
        misses = belady_misses(ids, grid)
        curves.append(
            MissRatioCurve("belady", np.array(grid), misses / ids.size, int(ids.size), misses, rows)
        )
    return curves


def print_table(results: list[ReplayResult]) -> None:
    """The per-policy, per-tier summary on the terminal."""
    head = f"{'policy':<22}{'hot hit':>9}{'warm hit':>10}{'miss':>8}{'fetch':>8}{'uniq/batch':>12}{'to device':>12}{'stall s':>10}{'Mlookup/s':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.policy:<22}{r.tiers['hot']['hit_ratio']:>9.1%}{r.tiers['warm']['hit_ratio']:>10.1%}"
            f"{r.miss_ratio:>8.1%}{r.fetch_ratio:>8.1%}{r.unique_rows_per_batch:>12,.0f}{r.bytes_moved['host_to_device'] / 2**20:>9,.0f} MiB"
            f"{r.modelled_stall_seconds:>10.3f}{r.lookups_per_second / 1e6:>11.2f}"
        )
    print(
        "miss: lookups served by neither cache tier; fetch: rows read from cold per lookup "
        "(a row missed twice in one batch is read once; compare this with per-request figures)"
    )
    if results and results[0].bounds:
        b = results[0].bounds
        print(
            f"{'bounds (per request)':<22}belady: hot miss {b['belady@hot']:.1%}, hot+warm miss {b['belady@hot+warm']:.1%}; "
            f"static top-K: {b['static-topk@hot']:.1%}, {b['static-topk@hot+warm']:.1%}"
        )


def print_sweep(curves: list[MissRatioCurve], rows: int) -> None:
    """Miss ratio per curve at each swept capacity."""
    caps = curves[0].capacities[1:]
    print(f"{'curve':<26}" + "".join(f"{c / rows:>9.1%}" for c in caps))
    for c in curves:
        print(f"{c.name:<26}" + "".join(f"{c.at(int(cap)):>9.1%}" for cap in caps))


def _spec(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isdigit() else text

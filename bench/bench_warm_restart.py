"""Warm restart: the miss ratio right after a restart against the steady state and a cold start.

On one table of an ``analyze`` trace (real text), a real store (hot and warm LRU tiers over a
real table file of the trace's rows) serves ``--warmup`` lookups, saves its tiers
(``TieredStore.save_restart``), then serves the next ``--lookups`` (the **steady** state). Over
those same next lookups, in the same run:

- **restart, serving at once**: a new store opens with ``tiers.restart.enabled`` and serves at
  once while the rows are read back in the background;
- **restart, hot tier first**: the same with ``open_waits_for: hot``: open returns once the hot
  tier's rows are back (the warm tier's follow in the background);
- **restart, restored first**: the same with ``open_waits_for: all`` (the whole restore);
- **cold start**: a new store with empty tiers.

Miss ratios are per lookup: ``hot`` = lookups the hot tier missed, ``cold`` = lookups read from
the table file (missed by both tiers). The target of issue 15: restart within 1 point of steady.

Example::

    tiered-store analyze /usr/share/vim/vim90/doc --max-tokens 5000000 --holdout 0.4 \\
        --shuffle --no-curves --out A
    python bench/bench_warm_restart.py A/holdout.trace --out bench/results/warm_restart.json

On 2 shared cores the default run took under a minute on the Vim-help analysis above.
"""

from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np
import torch

from tiered_store import StoreConfig, TieredStore, create_table
from tiered_store.atomic_file import scratch_directory, write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_dir,
    fraction,
    given_path,
    output_file,
    run_script,
    wrote,
)
from tiered_store.cold_table import IO_MODES
from tiered_store.table_sources import RandomSource
from tiered_store.trace import TraceReader
from tiered_store.warm_restart import restart_path


def serve(store: TieredStore, ids: np.ndarray, batch: int) -> dict[str, float]:
    """Look up ``ids`` in batches; per-lookup hot and cold miss ratios over them, and lookups/s."""
    before = store.stats()
    start = time.perf_counter()
    for at in range(0, ids.size, batch):
        store.lookup(torch.from_numpy(ids[at : at + batch]))
    seconds = time.perf_counter() - start
    after = store.stats()
    lookups = after["hot"]["lookups"] - before["hot"]["lookups"]
    return {
        "hot_miss": (after["hot"]["misses"] - before["hot"]["misses"]) / lookups,
        "cold_miss": (after["warm"]["misses"] - before["warm"]["misses"]) / lookups,
        "lookups_per_s": lookups / seconds,
    }


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("trace", type=given_path, help="a trace from `tiered-store analyze`")
    p.add_argument("--layer", default="layer1", help="the trace's table to replay")
    share = fraction("a share of the rows in (0, 1], e.g. 0.01 for 1%")
    p.add_argument("--hot", type=share, default=0.01, help="hot tier, share of the rows")
    p.add_argument("--warm", type=share, default=0.05, help="warm tier, share of the rows")
    p.add_argument(
        "--warmup", type=at_least(1), default=5_000_000, help="lookups before the restart"
    )
    p.add_argument(
        "--lookups", type=at_least(1), default=1_000_000, help="lookups measured after it"
    )
    p.add_argument("--batch", type=at_least(1), default=4096, help="ids per lookup call")
    p.add_argument("--dim", type=at_least(1), default=8, help="row width of the table (float32)")
    p.add_argument("--io", default="pread", choices=IO_MODES, help="tiers.cold.io of the stores")
    p.add_argument(
        "--dir",
        type=existing_dir,
        help="keep the table and the restart files in a new folder made here (its name is "
        "printed); default: a temporary folder, deleted at the end",
    )
    p.add_argument("--out", type=output_file, help="write JSON here too")
    args = p.parse_args(argv)  # a bad share or count is refused by its type
    torch.set_num_threads(1)  # 2 shared cores: extra threads only spin
    with TraceReader(args.trace) as reader:
        rows = int(reader.layout[reader.table_index(args.layer)]["rows"])
        ids = reader.read_all(args.layer)[: args.warmup + args.lookups]
    if ids.size < args.warmup + args.lookups:
        p.error(f"{args.trace} holds {ids.size:,} lookups of {args.layer}; need warmup + lookups")
    warmup, measured = ids[: args.warmup], ids[args.warmup :]
    with scratch_directory("bench_warm_restart.", args.dir, keep=args.dir is not None) as work:
        if args.dir is not None:
            print(f"kept: {work}", flush=True)
        table = work / "table.npy"
        print(f"creating {table} ({rows:,} x {args.dim} float32)", flush=True)
        create_table(table, RandomSource(rows, args.dim), progress=False)

        def config(restart: bool, waits_for: str = "none") -> StoreConfig:
            """The store: hot and warm LRU tiers, warm restart on or off (what open waits for)."""
            return StoreConfig.from_dict(
                {
                    "table": {"path": str(table)},
                    "tiers": {
                        "hot": {"capacity": int(rows * args.hot)},
                        "warm": {"capacity": int(rows * args.warm)},
                        "restart": {"enabled": restart, "open_waits_for": waits_for},
                        "cold": {"io": args.io},
                    },
                }
            )

        saved = restart_path(table)
        kept = work / "restart.saved"
        report = args.trace.parent / "report.json"  # the analysis the trace came from, if any
        result = {
            "trace": str(args.trace),
            "corpus": json.loads(report.read_text())["corpus"]["description"]
            if report.exists()
            else None,
            "layer": args.layer,
            "rows": rows,
            "hot": args.hot,
            "warm": args.warm,
            "batch": args.batch,
            "dim": args.dim,
            "warmup": int(warmup.size),
            "lookups": int(measured.size),
            "io": args.io,
        }
        with TieredStore(config(False)) as store:
            serve(store, warmup, args.batch)
            start = time.perf_counter()
            store.save_restart()
            result["save_seconds"] = time.perf_counter() - start
            result["saved_bytes"] = saved.stat().st_size
            # the rows saved (what a restart restores), not those held after the steady lookups
            result["held_rows"] = {"hot": store.hot.occupancy, "warm": store.warm.occupancy}
            result["steady"] = serve(store, measured, args.batch)
        shutil.copy(saved, kept)
        variants = {
            "restart_serving_at_once": "none",
            "restart_hot_tier_first": "hot",
            "restart_restored_first": "all",
        }
        for name, waits_for in variants.items():
            shutil.copy(kept, saved)  # each restart starts from the same saved state
            start = time.perf_counter()
            with TieredStore(config(True, waits_for)) as store:
                opened = time.perf_counter() - start
                cell = serve(store, measured, args.batch)
                store.wait_restored()
                cell["open_seconds"] = opened
                cell["restore_seconds"] = store.restore_seconds
                cell["restored_rows"] = {
                    c.name: int(store.stats()[c.name]["preloaded"]) for c in (store.hot, store.warm)
                }
            result[name] = cell
        with TieredStore(config(False)) as store:
            result["cold_start"] = serve(store, measured, args.batch)
        steady = result["steady"]["cold_miss"]
        for name in ("steady", *variants, "cold_start"):
            cell = result[name]
            cell["cold_miss_points_above_steady"] = 100 * (cell["cold_miss"] - steady)
            print(
                f"{name:>24}: hot miss {100 * cell['hot_miss']:.2f}%, cold miss "
                f"{100 * cell['cold_miss']:.2f}% ({cell['cold_miss_points_above_steady']:+.2f} "
                f"points vs steady), {cell['lookups_per_s']:,.0f} lookups/s"
                + (
                    f", restore {cell['restore_seconds']:.2f} s for {cell['restored_rows']} rows"
                    if "restore_seconds" in cell
                    else ""
                ),
                flush=True,
            )
    if args.out:
        wrote(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

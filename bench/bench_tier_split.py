"""Tier sizing: the one-pass hot/warm model against full replays of the same splits, on text.

1. ``tiered-store analyze`` makes a trace of the Python standard library's sources (or
   ``--analysis DIR`` reuses one).
2. ``recommend_split`` models every (hot, warm) pair on its grid under ``--gpu-budget`` and
   ``--host-budget`` from one read of the trace (timed).
3. ``replay`` runs the recommended split and ``--replays - 1`` others from the frontier (timed):
   modelled against replayed hits, cold reads and stall, and the time of the model against one
   replay in the same run.

``--policy zipf-tuned`` models and replays zipf-tuned tiers (pins from the profile ``analyze``
wrote for the same text), and times the LRU model of the same grid in the same run as the
baseline of the model's cost. It prints the JSON results on stdout, each step on stderr as it
starts.

Example::

    python bench/bench_tier_split.py --out bench/results/tier_split.json
    python bench/bench_tier_split.py --analysis A --gpu-budget 128MiB --host-budget 1GiB
    python bench/bench_tier_split.py --analysis A --policy zipf-tuned

On 2 shared cores the first example (its own small analysis) took about 20 seconds; in
``bench/results/tier_split.json``'s run the model took 15 s and each checking replay 4-21 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from tiered_store.atomic_file import json_text, scratch_directory, write_json
from tiered_store.cache_plan import parse_policy
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    given_path,
    output_file,
    public_command,
    run_script,
    wrote,
)
from tiered_store.config import StoreConfig
from tiered_store.errors import ConfigError
from zipf_analysis.analyze.publish import refuse_unknown_table, table_choices
from zipf_analysis.replay import replay, with_policy
from zipf_analysis.tier_split import parse_budgets, recommend_split


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the JSON."""
    p = doc_parser(__doc__)  # the whole docstring, and every default
    p.add_argument("--analysis", type=given_path, help="an `analyze` output directory to reuse")
    p.add_argument(
        "--max-tokens",
        type=at_least(1, "at least 1 token"),
        default=500_000,
        help="tokens to analyse (no --analysis)",
    )
    p.add_argument("--table", default="layer1", help="the trace's table to size")
    p.add_argument("--gpu-budget", default="128MiB", help="memory for the hot tier")
    p.add_argument("--host-budget", default="1GiB", help="memory for the warm tier")
    p.add_argument(
        "--replays",
        type=at_least(1, "at least 1 (the recommended split)"),
        default=3,
        help="splits replayed to check the model",
    )
    p.add_argument(
        "--policy",
        help="both tiers' policy (default: the store config's), e.g. zipf-tuned (its profile: "
        "the analysis's)",
    )
    p.add_argument("--out", type=output_file, help="JSON results")
    args = p.parse_args(argv)
    check_args(p, args)
    # the scratch analysis goes however the run ends (an error, Ctrl-C, SIGTERM while analysing)
    with contextlib.ExitStack() as cleanup:
        work = args.analysis
        if work is None:
            from zipf_analysis.analyze import AnalyzeOptions, analyze

            work = cleanup.enter_context(scratch_directory("bench_tier_split_")) / "analysis"
            print(f"analysing {args.max_tokens:,} tokens ...", file=sys.stderr, flush=True)
            analyze(
                None,
                work,
                options=AnalyzeOptions(max_tokens=args.max_tokens, curves=False, progress=False),
            )
        doc = run(work, args)  # a budget that holds no row of this table: a ConfigError
        doc["corpus"] = json.loads((work / "report.json").read_text())["corpus"]["description"]
    doc["command"] = public_command(
        "bench/bench_tier_split.py", sys.argv[1:] if argv is None else argv
    )
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, doc))
    print(json_text(doc, indent=2))
    return 0


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a bad option value before any work, naming it and what is expected (the counts
    are refused by their types): exit 2 with the usage."""
    try:
        refuse_unknown_table(args.table, "--table", table_choices(args.analysis))
        parse_budgets(args.gpu_budget, args.host_budget)
        if args.policy:
            parse_policy(args.policy, key="--policy")
    except ConfigError as exc:
        p.error(str(exc))


def run(work: Path, args: argparse.Namespace) -> dict:
    """Model once, replay a few splits, compare."""
    config = StoreConfig.from_yaml(work / f"{args.table}.store.yaml")
    if args.policy:
        config = with_policy(config, args.policy)
        if parse_policy(args.policy, key="--policy").tuned:  # store.yaml's LRU tiers name none
            profile = str(work / f"{args.table}.profile.npz")
            tiers = {
                t: getattr(config.tiers, t).model_copy(update={"profile": profile})
                for t in ("hot", "warm")
            }
            config = config.model_copy(update={"tiers": config.tiers.model_copy(update=tiers)})
    trace = work / "trace.trace"
    budgets = {"gpu_budget": args.gpu_budget, "host_budget": args.host_budget}
    print(f"modelling the splits of {args.table} in {trace} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    rec = recommend_split(config, trace, table=args.table, **budgets)
    model_s = time.perf_counter() - start
    lru_model_s = None
    if rec.model != {"hot": "lru", "warm": "lru"}:  # the LRU model of the same grid, as baseline
        start = time.perf_counter()
        recommend_split(with_policy(config, "lru"), trace, table=args.table, **budgets)
        lru_model_s = time.perf_counter() - start
    picks = [(rec.hot_rows, rec.warm_rows)]
    frontier = [(c["hot_rows"], c["warm_rows"]) for c in rec.frontier]
    for i in np.linspace(0, len(frontier) - 2, max(0, args.replays - 1)).round().astype(int):
        if frontier[i] not in picks:
            picks.append(frontier[i])
    by_pair = {(c["hot_rows"], c["warm_rows"]): c for c in rec.candidates}
    checks, replay_s = [], []
    for n, (hot, warm) in enumerate(picks, 1):
        print(
            f"replaying split {n}/{len(picks)}: {hot:,} hot + {warm:,} warm rows ...",
            file=sys.stderr,
            flush=True,
        )
        tiers = config.tiers.model_copy(
            update={
                t: getattr(config.tiers, t).model_copy(
                    update={
                        "capacity": cap,
                        "preload_rows": None,
                        "static_rows": None,
                        **({"policy": "lru"} if rec.model[t] == "lru" else {}),
                    }
                )
                for t, cap in (("hot", hot), ("warm", warm))
            }
        )
        start = time.perf_counter()
        r = replay(config.model_copy(update={"tiers": tiers}), trace, table=args.table)
        replay_s.append(time.perf_counter() - start)
        m = by_pair[(hot, warm)]
        checks.append(
            {
                "hot_rows": hot,
                "warm_rows": warm,
                "model": {
                    k: m[k] for k in ("hot_hits", "warm_hits", "cold_reads", "stall_seconds")
                },
                "replay": {
                    "hot_hits": r.tiers["hot"]["hits"],
                    "warm_hits": r.tiers["warm"]["hits"],
                    "cold_reads": r.rows_moved["cold_reads"],
                    "stall_seconds": r.modelled_stall_seconds,
                },
                "stall_error": m["stall_seconds"] / r.modelled_stall_seconds - 1
                if r.modelled_stall_seconds
                else 0.0,
                "replay_seconds": replay_s[-1],
            }
        )
    per_replay = float(np.mean(replay_s))
    return {
        "table": args.table,
        "lookups": rec.lookups,
        "batches": rec.batches,
        "gpu_budget": args.gpu_budget,
        "host_budget": args.host_budget,
        "recommended": {
            k: getattr(rec, k)
            for k in ("hot_rows", "warm_rows", "hot_bytes", "warm_bytes", "stall_seconds")
        },
        "model": rec.model,
        "notes": rec.notes,
        "splits_modelled": len(rec.candidates),
        "stack_passes": rec.stack_passes,
        "model_seconds": model_s,
        "lru_model_seconds": lru_model_s,
        "replay_seconds_per_split": per_replay,
        "model_time_in_replays": model_s / per_replay,
        "checks": checks,
    }


if __name__ == "__main__":
    sys.exit(run_script(main))

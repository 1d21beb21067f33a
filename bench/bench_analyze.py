"""Throughput of ``tiered-store analyze`` on the default corpus, and the statistics it measures.

Runs the whole pipeline (read, tokenise, hash, write trace, profile, curves, report) on the
Python standard library's sources (every machine has them) with the reference Engram config, and
prints one JSON object: end-to-end tokens/s, seconds and tokens/s per stage, CPU seconds (on a
shared machine the wall clock includes other processes' time; the load average is recorded before
and after), peak memory, trace size, and the DESIGN.md-style figures per table: share of rows
touched, top 0.1/1/10% shares, Zipf exponents (least squares and MLE, with the rank range),
deduplication within a sequence / batch, hash-collision rate per order, SHARDS error and the
recommended tier sizes.

Example::

    python bench/bench_analyze.py --out bench/results/analyze.json              # whole stdlib
    python bench/bench_analyze.py --max-tokens 1000000 --no-belady               # ~1 minute

Stage messages and progress bars go to stderr when it is a terminal (``--no-progress``: never).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tiered_store.atomic_file import json_text, write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    given_path,
    output_file,
    output_folder,
    run_script,
    saying_made,
    wrote,
)
from tiered_store.errors import ConfigError
from tiered_store.versions import machine_info
from zipf_analysis.analyze import AnalyzeOptions, analyze, parse_targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = doc_parser(__doc__)
    p.add_argument(
        "--max-tokens", type=at_least(1), help="cap on tokens (default: the whole corpus)"
    )
    p.add_argument("--config", type=given_path, help="Engram config (default: the reference one)")
    p.add_argument("--seq-len", type=at_least(1), default=4096, help="tokens per sequence (4096)")
    p.add_argument("--batch-seqs", type=at_least(1), default=8, help="sequences per batch (8)")
    p.add_argument("--workers", type=at_least(1), help="threads (default: CPU count)")
    p.add_argument("--targets", default="hot=0.3,warm=0.6", help="target hit rates")
    p.add_argument("--no-curves", action="store_true", help="skip LRU, SHARDS and Belady")
    p.add_argument("--no-belady", action="store_true", help="skip Belady")
    p.add_argument(
        "--work-dir",
        type=output_folder,
        help="analysis output folder, made if missing in a folder that is there (default: a temp "
        "dir)",
    )
    p.add_argument("--keep", action="store_true", help="keep the analysis output folder")
    p.add_argument("--out", type=output_file, help="also write the JSON here")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="show stage messages and progress bars on stderr (default: when it is a terminal)",
    )
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option value the analysis cannot use (the counts are refused by their types),
    naming it, before any work (and before making a temporary folder): exit 2 with the usage."""
    try:
        parse_targets(args.targets)
    except ConfigError as exc:
        p.error(f"--targets {args.targets!r}: {exc}")
    if args.config is not None and not args.config.is_file():
        p.error(f"--config {args.config}: no such file; expected an Engram config")


def _pct(x: float | None) -> float | None:
    """A share as a percentage, 2 decimals."""
    return None if x is None else round(100.0 * x, 2)


def table_figures(table: dict[str, Any]) -> dict[str, Any]:
    """The DESIGN.md-style figures of one table (or of all tables together)."""
    p = table["profile"]
    zipf = p.get("zipf", {})
    shares = p["top_shares"]["of_table"]
    out: dict[str, Any] = {
        "lookups": p["lookups"],
        "rows": p["rows"],
        "rows_touched_pct": _pct(p["touched_fraction"]),
        "top_0.1pct_share_pct": _pct(shares["0.1%"]),
        "top_1pct_share_pct": _pct(shares["1%"]),
        "top_10pct_share_pct": _pct(shares["10%"]),
        "zipf_least_squares": zipf.get("least_squares", {}).get("exponent"),
        "zipf_mle": zipf.get("mle", {}).get("exponent"),
        "zipf_rank_range": [zipf["mle"]["rank_min"], zipf["mle"]["rank_max"]]
        if "mle" in zipf
        else None,
        "dedup_within_sequence_pct": _pct(table["dedup"]["removed_within_sequence"]),
        "dedup_within_batch_pct": _pct(table["dedup"]["removed_within_batch"]),
        "collision_rate_pct": _pct(table["collisions"].get("collision_rate")),
        "collision_rate_uniform_hashing_pct": _pct(table["collisions"].get("expected_uniform")),
    }
    orders = table["collisions"].get("orders")
    if orders:
        out["collision_rate_by_order_pct"] = {
            n: _pct(o["collision_rate_mean"]) for n, o in orders.items()
        }
        out["distinct_ngram_keys"] = {n: o["ngram_keys"] for n, o in orders.items()}
    if "recommendation" in table:
        out["recommended_rows"] = {
            t: v["capacity"] for t, v in table["recommendation"]["tiers"].items()
        }
        out["shards_mae_vs_exact_lru"] = table["mae_vs_exact_lru"].get("shards")
        out["curve_seconds"] = {k: v.get("seconds") for k, v in table["curves"].items()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print (and return) the JSON report."""
    args = parse_args(argv)
    options = AnalyzeOptions(
        seq_len=args.seq_len,
        batch_seqs=args.batch_seqs,
        max_tokens=args.max_tokens,
        workers=args.workers,
        targets=parse_targets(args.targets),
        curves=not args.no_curves,
        belady=not args.no_belady,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        named = "--work-dir" if args.work_dir is not None else "the temporary work folder"
        with saying_made(work, named):
            result = analyze(None, work, config=args.config, options=options, out_name=named)
        wall = time.perf_counter() - start
        report = result.report
        t = report["timings"]
        out = {
            "benchmark": "analyze",
            "machine": {
                **machine_info(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            },
            "corpus": report["corpus"]["description"],
            "max_tokens": report["corpus"]["max_tokens"],
            "engram_config": str(args.config) if args.config else "reference",
            "targets": report["targets"],
            "documents": report["corpus"]["documents"],
            "skipped_files": report["corpus"]["read"]["skipped_by_reason"],
            "tokens": t["tokens"],
            "sequences": report["corpus"]["sequences"],
            "seq_len": report["seq_len"],
            "batch_seqs": report["batch_seqs"],
            "tokenizer_reduction_pct": _pct(report["tokenizer"]["reduction"]),
            "wall_seconds": round(wall, 2),
            "cpu_seconds": t["cpu_seconds"],
            "tokens_per_second": round(t["tokens_per_second"]),
            "tokens_per_cpu_second": round(t["tokens"] / t["cpu_seconds"]),
            "stage_seconds": {k: round(v, 2) for k, v in t["stages"].items()},
            "stage_tokens_per_second": {
                k: round(v) for k, v in t["stage_tokens_per_second"].items()
            },
            "peak_rss_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            ),  # Linux: KiB
            "trace_bytes_per_lookup": round(report["traces"]["main"]["bytes_per_lookup"], 3),
            "trace_lookups": report["traces"]["main"]["lookups"],
            "tables": {n: table_figures(tab) for n, tab in report["tables"].items()},
            "all_tables": table_figures(report["overall"]),
            "options": report["options"],
        }
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, out))
    print(json_text(out, indent=2))
    if args.keep or args.work_dir:
        print(f"analysis output: {work}", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(run_script(main))

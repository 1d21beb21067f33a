"""Miss-ratio curve benchmark: exact LRU vs SHARDS on a synthetic Zipf trace.

Measures, on i.i.d. Zipf row ids (row of rank r drawn with probability ~ r**-s, ranks scattered
over the table by a fixed random permutation, as hashing does):

1. exact LRU stack distances (``lru_mrc``): lookups/s and the curve's size;
2. SHARDS fixed-rate (``shards_mrc(rate=R)``): lookups/s, speedup over exact (target >= 10x) and
   mean absolute error against the exact curve (target <= 0.01) over 1000 evenly spaced
   capacities, plus the same over 1000 log-spaced capacities (which weights caches smaller than
   1/R rows, where a sample cannot resolve anything, as much as the rest);
3. SHARDS fixed-size (``shards_mrc(fixed_size=S)``): the same;
4. optionally Belady's MIN at a few capacities (``--belady-points``);
5. memory: peak resident set size of the process and per phase (sampled every 20 ms).

Wall-clock and CPU seconds are both reported: on shared machines the wall clock includes time
other processes took; the CPU-time speedup is the stable one. Prints the JSON report on stdout;
each phase is said on stderr as it starts.

Example::

    python bench/bench_mrc.py --out bench/results/mrc.json              # 20M lookups, ~1 min
    python bench/bench_mrc.py --lookups 100000000 --out bench/results/mrc_100m.json
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import threading
import time

import numpy as np

from tiered_store.atomic_file import json_text, write_json
from tiered_store.cli_args import at_least, doc_parser, fraction, output_file, run_script, wrote
from tiered_store.versions import machine_info
from zipf_analysis.mrc import belady_mrc, lru_mrc, mean_absolute_error, shards_mrc
from zipf_analysis.zipf_fit import sample_zipf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = doc_parser(__doc__)
    p.add_argument(
        "--lookups",
        type=at_least(1, "a positive number of lookups"),
        default=20_000_000,
        help="trace length (up to 100M+)",
    )
    p.add_argument(
        "--rows",
        type=at_least(1, "a positive number of rows"),
        default=10_000_000,
        help="rows in the table",
    )
    p.add_argument("--exponent", type=float, default=0.8, help="Zipf exponent s")
    p.add_argument(
        "--rate",
        type=fraction("a sampling rate R with 0 < R <= 1"),
        default=0.01,
        help="SHARDS fixed sampling rate R",
    )
    p.add_argument(
        "--fixed-size",
        type=at_least(0, "0 (skip) or a positive number of rows"),
        default=1 << 16,
        help="SHARDS fixed-size sample (rows tracked); 0 to skip",
    )
    p.add_argument(
        "--belady-points",
        type=at_least(0, "0 (skip) or a positive number of capacities"),
        default=0,
        help="Belady capacities to compute (log-spaced; 0 to skip, slow: O(N log C) each)",
    )
    p.add_argument("--seed", type=at_least(0, "a seed >= 0"), default=0, help="trace seed")
    p.add_argument("--out", type=output_file, help="write JSON here as well as stdout")
    args = p.parse_args(argv)
    if not 0.0 <= args.exponent < math.inf:  # NaN too; counts and --rate: by their types
        p.error(f"--exponent {args.exponent}: expected a finite Zipf exponent >= 0")
    return args


class RssSampler:
    """Peak resident set size per phase, read from /proc every 20 ms in a thread."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._rss())

    def phase(self) -> tuple[int, int]:
        """(peak since the last call, current) in bytes; starts a new phase."""
        now = self._rss()
        peak, self._peak = max(self._peak, now), now
        return peak, now

    def stop(self) -> None:
        """End sampling."""
        self._stop.set()
        self._thread.join()


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def say(message: str) -> None:
    """A phase as it starts, on stderr (stdout is the JSON)."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and prints) the JSON result."""
    args = parse_args(argv)
    rss = RssSampler()
    memory: dict[str, dict[str, float]] = {}
    base_peak, base_now = rss.phase()
    memory["start"] = {"peak_mib": _mib(base_peak), "rss_mib": _mib(base_now)}

    say(f"sampling {args.lookups:,} Zipf lookups over {args.rows:,} rows ...")
    t0 = time.perf_counter()
    ids = sample_zipf(args.lookups, args.rows, args.exponent, seed=args.seed)
    gen_s = time.perf_counter() - t0
    peak, now = rss.phase()
    memory["generate"] = {
        "peak_mib": _mib(peak),
        "rss_after_mib": _mib(now),
        "trace_array_mib": _mib(ids.nbytes),
    }

    lru_mrc(ids[:10_000])  # load the compiled kernels (numba cache) outside the timings
    shards_mrc(ids[:10_000], rate=0.5)
    if args.fixed_size:
        shards_mrc(ids[:10_000], fixed_size=64)
    rss.phase()

    say("exact LRU ...")
    t0, c0 = time.perf_counter(), time.process_time()
    exact = lru_mrc(ids, table_rows=args.rows)
    exact_s, exact_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak, now = rss.phase()
    memory["exact_lru"] = {
        "peak_mib": _mib(peak),
        "over_trace_mib": _mib(peak - base_now - ids.nbytes),
    }
    result: dict = {
        "benchmark": "mrc",
        "machine": machine_info(),
        "trace": {
            "lookups": args.lookups,
            "rows": args.rows,
            "exponent": args.exponent,
            "seed": args.seed,
            "distinct_rows": exact.metadata["distinct"],
            "generate_seconds": round(gen_s, 2),
        },
        "exact_lru": {
            "seconds": round(exact_s, 3),
            "cpu_seconds": round(exact_cpu, 3),
            "lookups_per_s": round(args.lookups / exact_s),
            "curve_points": int(exact.capacities.size),
            "miss_ratio_at_1pct_table": round(float(exact.at(args.rows // 100)), 4),
            "miss_ratio_at_10pct_table": round(float(exact.at(args.rows // 10)), 4),
        },
    }

    say(f"SHARDS at rate {args.rate:g} ...")
    t0, c0 = time.perf_counter(), time.process_time()
    approx = shards_mrc(ids, rate=args.rate, table_rows=args.rows)
    shards_s, shards_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak, _ = rss.phase()
    memory["shards_fixed_rate"] = {"peak_mib": _mib(peak)}
    result["shards_fixed_rate"] = {
        "rate": approx.metadata["rate"],
        "seconds": round(shards_s, 3),
        "cpu_seconds": round(shards_cpu, 3),
        "lookups_per_s": round(args.lookups / shards_s),
        "speedup_vs_exact": round(exact_s / shards_s, 1),
        "speedup_vs_exact_cpu": round(exact_cpu / max(shards_cpu, 1e-9), 1),
        "mae_linear": round(mean_absolute_error(approx, exact), 5),
        "mae_log": round(mean_absolute_error(approx, exact, spacing="log"), 5),
        "sampled_lookups": approx.metadata["sampled_lookups"],
    }

    if args.fixed_size:
        say(f"SHARDS of {args.fixed_size:,} rows ...")
        t0, c0 = time.perf_counter(), time.process_time()
        fixed = shards_mrc(ids, fixed_size=args.fixed_size, table_rows=args.rows)
        fixed_s, fixed_cpu = time.perf_counter() - t0, time.process_time() - c0
        peak, _ = rss.phase()
        memory["shards_fixed_size"] = {"peak_mib": _mib(peak)}
        result["shards_fixed_size"] = {
            "fixed_size": args.fixed_size,
            "final_rate": round(fixed.metadata["final_rate"], 6),
            "seconds": round(fixed_s, 3),
            "cpu_seconds": round(fixed_cpu, 3),
            "lookups_per_s": round(args.lookups / fixed_s),
            "speedup_vs_exact": round(exact_s / fixed_s, 1),
            "speedup_vs_exact_cpu": round(exact_cpu / max(fixed_cpu, 1e-9), 1),
            "mae_linear": round(mean_absolute_error(fixed, exact), 5),
            "mae_log": round(mean_absolute_error(fixed, exact, spacing="log"), 5),
        }

    if args.belady_points:
        top = exact.metadata["distinct"]
        caps = np.unique(np.geomspace(max(top // 10_000, 1), top, args.belady_points).astype(int))
        say(f"Belady at {caps.size} capacities ...")
        t0 = time.perf_counter()
        bel = belady_mrc(ids, caps)
        bel_s = time.perf_counter() - t0
        peak, _ = rss.phase()
        memory["belady"] = {"peak_mib": _mib(peak)}
        result["belady"] = {
            "capacities": caps.tolist(),
            "seconds": round(bel_s, 2),
            "lookups_per_s_per_capacity": round(args.lookups * caps.size / bel_s),
            "miss_ratio": [round(float(v), 4) for v in bel.miss_ratio[1:]],
            "lru_miss_ratio": [round(float(exact.at(c)), 4) for c in caps],
        }

    rss.stop()
    memory["process_peak_mib"] = _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result["memory"] = memory
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, result, indent=1))
    print(json_text(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(run_script(main))  # main: the report (empty: failed)

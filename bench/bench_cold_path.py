"""The cold path at the disk's limit: cold-miss reads and lookups against ``fio`` on the same file.

One table file (default 1 GiB of 128-byte rows, made in ``--dir``) and, in each of ``--rounds``
rounds (variant order rotated from round to round, after one short untimed round), each variant
for about ``--seconds``:

- ``fio`` random 4 KiB reads, ``ioengine=libaio``, ``direct=1``, one job, at each ``--depths``
  queue depth (the baseline: QD32), and ``ioengine=io_uring`` at QD32 (skipped with
  ``--no-fio``, for machines without fio: the baseline is then disk_probe's io_uring at QD32);
- ``tiered_store.disk_probe``: random 4 KiB ``O_DIRECT`` reads from Python, ``--threads``
  threads with one ``preadv`` each, and one thread through an io_uring at each depth;
- ``ColdTable.read_rows`` of batches of ``--batch`` unique sorted uniform-random row ids:
  ``io="direct"`` at each thread count, ``io="uring"`` (one ring) at each depth;
- ``TieredStore.lookup`` cold misses (no cache tiers, fresh uniform ids every call):
  ``io: direct`` with 16 threads (the previous configuration) and ``io: uring``, one ring, at
  ``--store-depths``.

fio reports reads/s, ours rows/s (and read requests/s: rows whose pages touch are read in one
request). The headline is the ratio of the store's cold-miss rows/s (``io: uring``, queue depth
``--headline-depth``) to the baseline's reads/s (fio's libaio QD32), measured after the curves
in ``--pairs`` back-to-back pairs (order alternating), median over pairs: on a disk and CPUs
that other work shares, a pair sees the same conditions where a whole round does not. Writes
``--out`` (JSON, no absolute paths; ``ratio_to_baseline`` per variant, ``ratio_to_fio_qd32``
before ``--no-fio`` existed) and a PNG of the curves beside it. Exits 2 when ``fio`` is not
installed and ``--no-fio`` is not given.

Example::

    python bench/bench_cold_path.py --out bench/results/cold_path.json   # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiered_store import StoreConfig, TieredStore
from tiered_store.atomic_file import atomic_write, write_json
from tiered_store.cli_args import (
    add_table_dir,
    at_least,
    doc_parser,
    int_list,
    output_file,
    positive_number,
    public_command,
    run_script,
    wrote,
)
from tiered_store.cold_table import ColdTable
from tiered_store.config import MAX_COLD_THREADS
from tiered_store.disk_probe import fio_random_reads, probe_random_reads, probe_uring_reads
from tiered_store.errors import TierIOError
from tiered_store.io_uring import MAX_QUEUE_DEPTH
from tiered_store.table_format import PAGE_BYTES, RandomSource, create_table, read_manifest
from tiered_store.versions import machine_info

ROW_DIM = 32  # float32 values per row: 128-byte rows, as in bench/test_lookup_speed.py
FIO_BASELINE = "fio libaio QD32"
PROBE_BASELINE = "disk_probe io_uring QD32"  # with --no-fio: the same reads, issued from Python


@dataclass
class Variant:
    """One curve point: a name, its curve and x value, and a run of about ``seconds``."""

    name: str
    curve: str  # the series it is plotted in
    x: int  # queue depth or threads
    run: Callable[[float], dict[str, float]]  # seconds -> {"rate": ..., ...}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = doc_parser(__doc__)
    add_table_dir(p)
    p.add_argument("--table-gib", type=positive_number, default=1.0, help="table size in GiB")
    p.add_argument("--rounds", type=at_least(1), default=5, help="measured rounds of the curves")
    p.add_argument("--pairs", type=at_least(1), default=20, help="headline pairs (baseline, store)")
    p.add_argument(
        "--seconds", type=positive_number, default=1.0, help="time per variant per round"
    )
    p.add_argument(
        "--batch", type=at_least(1), default=16384, help="ids per read_rows / lookup call"
    )
    p.add_argument(
        "--depths", type=int_list(1), default="1,8,32,64,128", help="queue depths (fio, io_uring)"
    )
    p.add_argument(
        "--threads", type=int_list(1), default="1,8,16,32", help="thread counts (preadv readers)"
    )
    p.add_argument(
        "--store-depths", type=int_list(1), default="32,128", help="queue depths of the store"
    )
    p.add_argument(
        "--headline-depth", type=at_least(1), default=128, help="the store's queue depth"
    )
    p.add_argument(
        "--torch-threads",
        type=at_least(1),
        default=1,
        help="torch intra-op threads (the store's index ops are small: on 2 busy cores, 2 threads "
        "made a 16k-element gather take 15-40 ms instead of 0.2 ms)",
    )
    p.add_argument(
        "--no-fio",
        action="store_true",
        help="run without fio (where it is not installed): no fio curves, and the baseline is "
        f"{PROBE_BASELINE!r} (the same random 4 KiB O_DIRECT reads, from Python)",
    )
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the table and the ids")
    p.add_argument("--out", type=output_file, help="write the JSON here (and the PNG beside it)")
    args = p.parse_args(argv)
    if 32 not in args.depths:
        p.error(f"--depths {args.depths}: the baseline reads at queue depth 32; expected it listed")
    rows = int(args.table_gib * 2**30) // (ROW_DIM * 4)
    if args.batch > rows:  # a batch is distinct rows
        p.error(
            f"--batch {args.batch:,}: more than the table's {rows:,} rows (--table-gib "
            f"{args.table_gib}); expected <= {rows:,}"
        )
    if args.headline_depth not in args.store_depths:
        p.error(f"--headline-depth {args.headline_depth} is not in --store-depths")
    if max(args.threads) > MAX_COLD_THREADS:  # refused now, not once the table is made
        p.error(
            f"--threads {args.threads}: ColdTable reads with at most {MAX_COLD_THREADS} threads; "
            f"expected each <= {MAX_COLD_THREADS}"
        )
    for option, depths in (("--depths", args.depths), ("--store-depths", args.store_depths)):
        if max(depths) > MAX_QUEUE_DEPTH:
            p.error(
                f"{option} {depths}: a ring holds at most {MAX_QUEUE_DEPTH} reads in flight; "
                f"expected each <= {MAX_QUEUE_DEPTH}"
            )
    return args


def baseline_name(args) -> str:
    """The variant every rate is divided by."""
    return PROBE_BASELINE if args.no_fio else FIO_BASELINE


def fio_version(args) -> str | None:
    """``fio --version`` (None with ``--no-fio``), or exit 2 clearly when fio is not installed."""
    if args.no_fio:
        return None
    if shutil.which("fio") is None:
        print(
            "bench_cold_path: fio is not installed; it is this benchmark's baseline "
            "(Debian/Ubuntu: apt-get install fio; or run with --no-fio)",
            file=sys.stderr,
        )
        sys.exit(2)
    return subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()


def run_fio(path: Path, start: int, size: int, engine: str, depth: int, seconds: float) -> dict:
    """One fio job: random 4 KiB direct reads of [start, start + size) of ``path``."""
    try:
        return fio_random_reads(
            path, start=start, size=size, engine=engine, depth=depth, seconds=seconds
        )
    except TierIOError as exc:
        sys.exit(f"bench_cold_path: {exc}")


def timed_loop(call: Callable[[], int], seconds: float) -> dict:
    """Repeat ``call`` (which returns the units it did) for ~``seconds``: rate and CPU cores."""
    units, wall, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        units += call()
        elapsed = time.perf_counter() - wall
        if elapsed >= seconds:
            return {"rate": units / elapsed, "cpu_cores": (time.process_time() - cpu) / elapsed}


def reader_variant(table: ColdTable, batch: int, rng: np.random.Generator) -> Callable:
    """read_rows of fresh unique sorted ids; also reports read requests/s."""

    def run(seconds: float) -> dict:
        requests, wall = table.read_requests, time.perf_counter()

        def call() -> int:
            table.read_rows(np.sort(rng.choice(table.rows, batch, replace=False)))
            return batch

        out = timed_loop(call, seconds)
        out["requests_per_s"] = (table.read_requests - requests) / (time.perf_counter() - wall)
        return out

    return run


def store_variant(store: TieredStore, batch: int, rng: np.random.Generator) -> Callable:
    """Cold-miss lookups of fresh uniform ids (repeats allowed, as a real batch has)."""

    def run(seconds: float) -> dict:
        cold, wall = store.cold, time.perf_counter()
        requests, rows = cold.read_requests, cold.rows_read

        def call() -> int:
            store.lookup(torch.from_numpy(rng.integers(0, store.rows, batch)))
            return batch

        out = timed_loop(call, seconds)
        elapsed = time.perf_counter() - wall
        out["requests_per_s"] = (cold.read_requests - requests) / elapsed
        out["unique_rows_per_s"] = (cold.rows_read - rows) / elapsed
        return out

    return run


def probe_variant(call: Callable[..., Any], batch: int, **kwargs: int) -> Callable:
    """A disk_probe function, repeated with fresh seeds for ~``seconds``."""
    seeds = iter(range(10**9))

    def run(seconds: float) -> dict:
        return timed_loop(lambda: call(reads=batch, seed=next(seeds), **kwargs).reads, seconds)

    return run


def variants(args, path: Path, opened: list) -> list[Variant]:
    """Every curve point of the run (readers and stores opened once, closed by the caller)."""
    m = read_manifest(path)
    start, size = m.data_offset, (m.file_bytes - m.data_offset) // PAGE_BYTES * PAGE_BYTES
    rng = np.random.default_rng(args.seed)
    out: list[Variant] = []
    for depth in [] if args.no_fio else args.depths:
        out.append(
            Variant(
                f"fio libaio QD{depth}",
                "fio libaio",
                depth,
                lambda s, d=depth: run_fio(path, start, size, "libaio", d, s),
            )
        )
    if not args.no_fio:
        out.append(
            Variant(
                "fio io_uring QD32",
                "fio io_uring",
                32,
                lambda s: run_fio(path, start, size, "io_uring", 32, s),
            )
        )
    window = {"start": start, "stop": m.file_bytes}
    for depth in args.depths:
        run = probe_variant(probe_uring_reads, args.batch, path=path, queue_depth=depth, **window)
        out.append(Variant(f"disk_probe io_uring QD{depth}", "disk_probe io_uring", depth, run))
    for threads in args.threads:
        run = probe_variant(probe_random_reads, args.batch, path=path, threads=threads, **window)
        out.append(Variant(f"disk_probe preadv x{threads}", "disk_probe preadv", threads, run))
    for threads in args.threads:
        table = ColdTable(path, io="direct", threads=threads)
        opened.append(table)
        run = reader_variant(table, args.batch, rng)
        out.append(Variant(f"ColdTable direct x{threads}", "ColdTable direct", threads, run))
    for depth in args.depths:
        table = ColdTable(path, io="uring", threads=1, queue_depth=depth)
        opened.append(table)
        run = reader_variant(table, args.batch, rng)
        out.append(Variant(f"ColdTable uring QD{depth}", "ColdTable uring", depth, run))
    stores = [("direct", 16, 1)] + [("uring", 1, d) for d in args.store_depths]
    for io, threads, depth in stores:
        cold = {"io": io, "threads": threads, "queue_depth": depth}
        config = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": {"cold": cold}})
        store = TieredStore(config)
        opened.append(store)
        if io == "direct":
            name, curve, x = f"store lookup direct x{threads}", "store direct", threads
        else:
            name, curve, x = f"store lookup uring QD{depth}", "store uring", depth
        out.append(Variant(name, curve, x, store_variant(store, args.batch, rng)))
    return out


def measure(args, path: Path) -> tuple[list[Variant], list[dict], list[dict]]:
    """One short untimed round, ``rounds`` rounds (order rotated), then the headline pairs."""
    opened: list = []
    try:
        points = variants(args, path, opened)
        for v in points:
            v.run(min(0.5, args.seconds))
        rounds = []
        for r in range(args.rounds):
            shift = (r * len(points)) // max(1, args.rounds)
            results = {}
            for v in points[shift:] + points[:shift]:
                results[v.name] = v.run(args.seconds)
                print(f"round {r}: {v.name:<30} {results[v.name]['rate']:>10,.0f}/s", flush=True)
            rounds.append(results)
        by_name = {v.name: v for v in points}
        baseline = baseline_name(args)
        pair = [by_name[baseline], by_name[headline_name(args)]]
        pairs = []
        for i in range(args.pairs):
            results = {v.name: v.run(args.seconds) for v in (pair if i % 2 == 0 else pair[::-1])}
            pairs.append(results)
            ratio = results[pair[1].name]["rate"] / results[baseline]["rate"]
            print(f"pair {i}: {pair[1].name} / {baseline} = {ratio:.3f}", flush=True)
        return points, rounds, pairs
    finally:
        for thing in opened:
            thing.close()


def headline_name(args) -> str:
    """The variant the headline ratio is about."""
    return f"store lookup uring QD{args.headline_depth}"


def summarize(
    args, points: list[Variant], rounds: list[dict], pairs: list[dict], table: dict
) -> dict:
    """Medians per variant, ratios to the baseline within each round, the headline from pairs."""
    baseline = baseline_name(args)
    summary = {}
    for v in points:
        runs = [r[v.name] for r in rounds]
        entry = {"curve": v.curve, "x": v.x}
        for key in runs[0]:
            entry[key] = statistics.median(run[key] for run in runs)
        entry["rate_per_round"] = [run["rate"] for run in runs]
        entry["ratio_to_baseline"] = statistics.median(
            run["rate"] / r[baseline]["rate"] for run, r in zip(runs, rounds, strict=True)
        )
        summary[v.name] = entry
    headline = headline_name(args)
    per_pair = [p[headline]["rate"] / p[baseline]["rate"] for p in pairs]
    return {
        "benchmark": "cold_path",
        "command": public_command("bench/bench_cold_path.py", sys.argv[1:]),
        "machine": {**machine_info(), "fio": fio_version(args)},
        "table": table,
        "settings": {
            "rounds": args.rounds,
            "pairs": args.pairs,
            "seconds_per_variant": args.seconds,
            "batch": args.batch,
            "depths": args.depths,
            "threads": args.threads,
            "store_depths": args.store_depths,
            "torch_threads": torch.get_num_threads(),
        },
        "units": "fio and disk_probe: 4 KiB reads/s; ColdTable and store: rows/s",
        "headline": {
            "what": f"{headline} rows/s / {baseline} reads/s, back-to-back pairs",
            "baseline": baseline,
            "ratio_median": statistics.median(per_pair),
            "ratio_per_pair": per_pair,
            "ratio_in_curve_rounds": summary[headline]["ratio_to_baseline"],
            "target": 0.8,
            "store_rows_per_s": statistics.median(p[headline]["rate"] for p in pairs),
            "baseline_reads_per_s": statistics.median(p[baseline]["rate"] for p in pairs),
            "store_read_requests_per_s": statistics.median(
                p[headline]["requests_per_s"] for p in pairs
            ),
            "request_ratio_median": statistics.median(
                p[headline]["requests_per_s"] / p[baseline]["rate"] for p in pairs
            ),
        },
        "results": summary,
    }


def plot(report: dict, path: Path) -> Path:
    """Rate against queue depth (one thread) and against threads (one request each); returns
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, h = report["results"], report["headline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, curves, xlabel in (
        (
            left,
            ["fio libaio", "fio io_uring", "disk_probe io_uring", "ColdTable uring", "store uring"],
            "queue depth (one thread)",
        ),
        (
            right,
            ["disk_probe preadv", "ColdTable direct", "store direct"],
            "threads (one preadv each)",
        ),
    ):
        for curve in curves:
            pts = sorted((e["x"], e["rate"]) for e in res.values() if e["curve"] == curve)
            if pts:  # no fio curves with --no-fio
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, [y / 1e3 for y in ys], "o-", label=curve)
        base = res[h["baseline"]]["rate"] / 1e3
        ax.axhline(base, color="gray", ls="--", lw=1, label=h["baseline"])
        ax.axhline(0.8 * base, color="gray", ls=":", lw=1, label=f"0.8 x {h['baseline']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("thousand reads/s (fio, probes) or rows/s (ColdTable, store)")
    fig.suptitle(
        f"Cold path on a {report['table']['bytes'] / 2**30:.3g} GiB table, "
        f"{report['table']['row_bytes']}-byte rows: store cold-miss lookups "
        f"{h['ratio_median']:.2f}x {h['baseline']} (median of {len(h['ratio_per_pair'])} pairs)"
    )
    fig.tight_layout()
    with atomic_write(path) as f:  # a folder in the way: a clear error; no half-written plot
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fio_version(args)  # refuses clearly when fio is missing
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory(prefix="cold-path-", dir=args.dir) as tmp:
        path = Path(tmp) / "cold.npy"
        rows = int(args.table_gib * 2**30) // (ROW_DIM * 4)
        print(f"making a {rows:,}-row table ({args.table_gib} GiB) ...", flush=True)
        m = create_table(path, RandomSource(rows, ROW_DIM, seed=args.seed), progress=False)
        table = {"rows": m.rows, "row_bytes": m.row_bytes, "bytes": m.file_bytes}
        points, rounds, pairs = measure(args, path)
    report = summarize(args, points, rounds, pairs, table)
    if args.out:
        wrote(write_json(args.out, report))
        wrote(plot(report, args.out.with_suffix(".png")))
    print(f"\n{'variant':<30} {'rate/s':>10} {'vs baseline':>12} {'requests/s':>11} {'CPU':>5}")
    for name, e in report["results"].items():
        requests = f"{e['requests_per_s']:,.0f}" if "requests_per_s" in e else "-"
        print(
            f"{name:<30} {e['rate']:>10,.0f} {e['ratio_to_baseline']:>11.2f}x {requests:>11} "
            f"{e['cpu_cores']:>5.2f}"
        )
    h = report["headline"]
    print(f"\nbaseline: {h['baseline']}")
    print(f"headline: {h['what']}: {h['ratio_median']:.3f} (target >= {h['target']})")
    print(
        f"          the same in read requests/s (coalesced pages): {h['request_ratio_median']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

"""Cold-tier read benchmark: ColdTable row reads vs the disk's own random 4 KiB O_DIRECT rate.

For each thread count it measures, on one table of at least 1 GiB:

(a) ``disk``: ``threads`` Python threads, each issuing single-page ``os.preadv`` O_DIRECT reads
    at random page offsets of the table file (the ceiling for one-request-per-page I/O);
(b) ``direct``: ``ColdTable(io="direct").read_rows`` of batches of uniform-random unique sorted
    ids, in rows/s; ``ratio`` = b / a (the issue's target: >= 0.7);
(c) ``mmap`` and ``pread``: the same batches through the page cache, as found (nothing dropped).

(a) and (b) alternate in ``--rounds`` short rounds so that load from other processes on a shared
machine hits both alike; the JSON has the pooled ratio and each round's.

Example::

    python bench/bench_cold_reads.py --dir /var/tmp --threads 1,8,16 --out cold.json

Writes one JSON document to stdout (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tiered_store.cold_table import ColdTable
from tiered_store.table_format import RandomSource, create_table, read_manifest

PAGE = 4096


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dir",
        default=None,
        help="directory for the table (a real fs, not tmpfs); "
        "default: a temp dir under /var/tmp, removed afterwards",
    )
    p.add_argument(
        "--table", default=None, help="reuse this existing table instead of creating one"
    )
    p.add_argument("--gib", type=float, default=1.0, help="size of a created table (GiB; >= 1)")
    p.add_argument("--dim", type=int, default=64, help="row width of a created table")
    p.add_argument("--dtype", default="float32", help="dtype of a created table")
    p.add_argument("--threads", default="1,8,16", help="comma-separated thread counts")
    p.add_argument("--batch", type=int, default=16384, help="ids per read_rows batch")
    p.add_argument("--seconds", type=float, default=3.0, help="time per disk/direct measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating disk/direct rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    p.add_argument("--keep", action="store_true", help="keep a created table")
    return p.parse_args(argv)


def disk_reads(
    path: Path, data_offset: int, file_bytes: int, threads: int, seconds: float, seed: int
) -> tuple[int, float]:
    """(reads, seconds) of random single-page O_DIRECT preadv calls from ``threads`` threads."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    first, pages = data_offset // PAGE, (file_bytes - data_offset) // PAGE
    offsets = [
        ((first + np.random.default_rng([seed, k]).integers(0, pages, 1 << 16)) * PAGE).tolist()
        for k in range(threads)
    ]
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def worker(k: int) -> None:
        buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT needs
        offs, n = offsets[k], 0
        start.wait()
        while not stop.is_set():
            for off in offs[n % len(offs) : n % len(offs) + 64]:
                os.preadv(fd, [buf], off)
            n += 64
        counts[k] = n

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    os.close(fd)
    return sum(counts), elapsed


def batches(rows: int, batch: int, count: int, seed: int) -> list[np.ndarray]:
    """Uniform-random unique sorted id batches."""
    rng = np.random.default_rng(seed)
    return [np.unique(rng.integers(0, rows, batch)) for _ in range(count)]


def table_reads(table: ColdTable, ids: list[np.ndarray], seconds: float, first: int) -> dict:
    """Counter deltas of read_rows over the batches (from index ``first``) for ~``seconds``."""
    r0, b0, q0 = table.rows_read, table.bytes_read, table.read_requests
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        table.read_rows(ids[(first + i) % len(ids)])
        i += 1
    return {
        "rows": table.rows_read - r0,
        "requests": table.read_requests - q0,
        "bytes": table.bytes_read - b0,
        "batches": i,
        "seconds": time.perf_counter() - t0,
    }


def rates(raw: dict) -> dict:
    """Per-second figures from summed counter deltas."""
    t = raw["seconds"]
    return {
        "rows_per_s": raw["rows"] / t,
        "requests_per_s": raw["requests"] / t,
        "mb_per_s": raw["bytes"] / t / 1e6,
        "batches": raw["batches"],
        "batch_ms": 1e3 * t / raw["batches"],
    }


def measure(path: Path, m, threads: int, ids: list[np.ndarray], args) -> dict:
    """Disk rate and io='direct' in alternating rounds (shared machines drift), then pread/mmap."""
    disk_n, disk_t, ratios = 0, 0.0, []
    total = {"rows": 0, "requests": 0, "bytes": 0, "batches": 0, "seconds": 0.0}
    slice_s = args.seconds / args.rounds
    with ColdTable(path, io="direct", threads=threads) as table:
        table.read_rows(ids[0])  # start the pool, allocate buffers
        for r in range(args.rounds):
            n, t = disk_reads(path, m.data_offset, m.file_bytes, threads, slice_s, args.seed + r)
            got = table_reads(table, ids, slice_s, first=r * 7)
            ratios.append((got["rows"] / got["seconds"]) / (n / t))
            disk_n, disk_t = disk_n + n, disk_t + t
            total = {k: total[k] + got[k] for k in total}
    out = {"threads": threads, "disk_4k_reads_per_s": disk_n / disk_t, "direct": rates(total)}
    out["ratio_direct_rows_to_disk_reads"] = (
        out["direct"]["rows_per_s"] / out["disk_4k_reads_per_s"]
    )
    out["ratio_per_round"] = ratios
    for io in ("pread", "mmap"):
        with ColdTable(path, io=io, threads=threads) as table:
            table.read_rows(ids[0])
            out[io] = rates(table_reads(table, ids, args.seconds / 3, first=0))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")]
    workdir = None
    if args.table:
        path = Path(args.table)
        created = None
    else:
        if args.gib < 1:
            print("--gib must be >= 1", file=sys.stderr)
            return 2
        workdir = Path(tempfile.mkdtemp(prefix="bench-cold-", dir=args.dir or "/var/tmp"))
        path = workdir / "bench_table.npy"
        itemsize = 2 if args.dtype in ("float16", "bfloat16") else 4
        rows = int(args.gib * (1 << 30)) // (args.dim * itemsize)
        t0 = time.perf_counter()
        create_table(
            path,
            RandomSource(rows, args.dim, dtype=args.dtype, seed=args.seed),
            progress=sys.stderr.isatty(),
        )
        created = time.perf_counter() - t0
    try:
        m = read_manifest(path)
        ids = batches(m.rows, args.batch, 64, args.seed)
        results = []
        for threads in thread_counts:
            res = measure(path, m, threads, ids, args)
            results.append(res)
            print(
                f"threads={threads}: disk {res['disk_4k_reads_per_s']:,.0f} reads/s, direct "
                f"{res['direct']['rows_per_s']:,.0f} rows/s (ratio "
                f"{res['ratio_direct_rows_to_disk_reads']:.2f}; per round "
                f"{', '.join(f'{r:.2f}' for r in res['ratio_per_round'])}), pread "
                f"{res['pread']['rows_per_s']:,.0f}, mmap {res['mmap']['rows_per_s']:,.0f} rows/s",
                file=sys.stderr,
            )
        doc = {
            "benchmark": "cold_reads",
            "table": {
                "path": str(path),
                "rows": m.rows,
                "dim": m.dim,
                "dtype": m.dtype,
                "row_bytes": m.row_bytes,
                "gib": m.data_bytes / (1 << 30),
                "create_seconds": created,
            },
            "batch": args.batch,
            "mean_unique_ids_per_batch": float(np.mean([len(b) for b in ids])),
            "seconds_per_measurement": args.seconds,
            "rounds": args.rounds,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "results": results,
        }
        text = json.dumps(doc, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        else:
            print(text)
    finally:
        if workdir is not None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What page checksums cost a cold read: verified against unverified ``ColdTable.read_rows``.

One table file (default 1 GiB of 128-byte rows, made in ``--dir``), opened twice per io mode:
with page checks (the default) and with ``verify_pages=False`` (the baseline). In each of
``--pairs`` back-to-back pairs (order alternating) both read the same batch of ``--batch``
unique sorted uniform-random ids; the figure is the median over pairs of verified rows/s /
unverified rows/s. On CPUs and a disk that other work shares a pair sees the same conditions
where two separate benchmark runs do not (the pytest-benchmark group ``cold-read-verify-IO`` in
``bench/test_cold_read_speed.py`` measures the same thing as two separate medians).

``direct`` and ``uring`` read from the disk; ``pread`` and ``mmap`` from the page cache as found
(the table was just written, so it is usually there): there a read costs memory bandwidth and a
page check reads a whole 4 KiB page per row, which is what they measure. ``--from-disk`` reopens
the table and drops the file's cached pages before every read (a mapping keeps its pages, hence
the reopen), so ``pread`` and ``mmap`` read from the disk too (what a
cold read is when the table is larger than RAM). Writes ``--out`` (JSON, no absolute paths).

Example::

    python bench/bench_page_checksums.py --out bench/results/page_checksums.json  # ~2 min
    python bench/bench_page_checksums.py --io pread,mmap --from-disk \\
        --out bench/results/page_checksums_from_disk.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tiered_store.atomic_file import write_json
from tiered_store.cli_args import (
    add_table_dir,
    at_least,
    doc_parser,
    output_file,
    run_script,
    wrote,
)
from tiered_store.cold_table import IO_MODES, ColdTable
from tiered_store.disk_probe import drop_page_cache
from tiered_store.errors import TierIOError
from tiered_store.page_checksums import crc32c_backend
from tiered_store.table_format import RandomSource, create_table
from tiered_store.versions import machine_info

ROW_DIM = 32  # float32 values per row: 128-byte rows, as in bench/test_cold_read_speed.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = doc_parser(__doc__)
    add_table_dir(p)
    p.add_argument("--table-mib", type=at_least(1), default=1024, help="table size in MiB")
    p.add_argument("--pairs", type=at_least(1), default=20, help="back-to-back pairs per io mode")
    p.add_argument("--batch", type=at_least(1), default=16384, help="ids per read_rows call")
    p.add_argument(
        "--threads", type=at_least(1), default=8, help="ColdTable threads (uring: rings)"
    )
    p.add_argument("--io", default=",".join(IO_MODES), help="io modes, comma-separated")
    p.add_argument(
        "--from-disk",
        action="store_true",
        help="drop the table's page cache before every read (pread and mmap then read the disk)",
    )
    p.add_argument("--out", type=output_file, help="write the results here (JSON)")
    args = p.parse_args(argv)  # a bad count is refused by its type
    args.io = [m for m in args.io.split(",") if m]
    unknown = sorted(set(args.io) - set(IO_MODES))
    if unknown:
        p.error(f"--io: {unknown} unknown; expected some of {', '.join(IO_MODES)}")
    rows = (args.table_mib << 20) // (ROW_DIM * 4)
    if args.batch > rows:  # a batch is distinct rows
        p.error(
            f"--batch {args.batch:,}: more than the table's {rows:,} rows; expected <= {rows:,}"
        )
    return args


def measure(path: Path, io: str, args: argparse.Namespace) -> dict[str, float] | None:
    """Pairs of verified/unverified reads of the same batches; None where ``io`` is refused."""
    try:
        tables = {
            verified: ColdTable(path, io=io, threads=args.threads, verify_pages=verified)
            for verified in (False, True)
        }
    except TierIOError as exc:
        print(f"{io}: skipped ({exc})", file=sys.stderr)
        return None
    rng = np.random.default_rng(7)
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        rows = tables[True].rows
        for table in tables.values():  # start the pools, allocate the buffers
            table.read_rows(np.sort(rng.choice(rows, args.batch, replace=False)))
        for pair in range(args.pairs):
            ids = np.sort(rng.choice(rows, args.batch, replace=False))
            for verified in (False, True) if pair % 2 == 0 else (True, False):
                if args.from_disk:  # unmapped first: the kernel keeps pages a mapping holds
                    for table in tables.values():
                        table.close()
                    drop_page_cache([path])
                    tables = {
                        v: ColdTable(path, io=io, threads=args.threads, verify_pages=v)
                        for v in (False, True)
                    }
                start = time.perf_counter()
                tables[verified].read_rows(ids)
                rates[verified].append(args.batch / (time.perf_counter() - start))
    finally:
        for table in tables.values():
            table.close()
    ratios = [v / u for v, u in zip(rates[True], rates[False], strict=True)]
    return {
        "unverified_rows_per_second": statistics.median(rates[False]),
        "verified_rows_per_second": statistics.median(rates[True]),
        "ratio_median_of_pairs": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every io mode; print a table; write the JSON."""
    args = parse_args(argv)
    modes = args.io
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="page-checksums-") as tmp:
        path = Path(tmp) / "cold.npy"
        rows = (args.table_mib << 20) // (ROW_DIM * 4)  # as parse_args checked them
        create_table(path, RandomSource(rows, ROW_DIM, seed=3), progress=False)
        for io in modes:
            result = measure(path, io, args)
            if result is not None:
                results[io] = result
                # the ratio is each pair's, not the medians' beside it (which differ most at a
                # few pairs)
                print(
                    f"{io:>6}: unverified {result['unverified_rows_per_second'] / 1e3:9.1f}k "
                    f"rows/s, verified {result['verified_rows_per_second'] / 1e3:9.1f}k rows/s "
                    f"(medians); verified / unverified per pair: median "
                    f"{result['ratio_median_of_pairs']:.3f}x of {args.pairs} "
                    f"({result['ratio_min']:.3f}-{result['ratio_max']:.3f})"
                )
    doc = {
        "script": "bench/bench_page_checksums.py",
        "io": modes,
        "table_mib": args.table_mib,
        "row_bytes": ROW_DIM * 4,
        "batch": args.batch,
        "threads": args.threads,
        "pairs": args.pairs,
        "from_disk": args.from_disk,
        "crc32c": crc32c_backend(),
        "machine": machine_info(),
        "results": results,
    }
    if args.out:
        wrote(write_json(args.out, doc))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

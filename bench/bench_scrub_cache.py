"""What a whole-table pass (``verify_table``: ``tiered-store verify``, serve's scrubber) leaves in
the page cache, and how fast it reads: ``O_DIRECT`` (the pass as it is) against reads through
the page cache (the pass before it took ``O_DIRECT``), in the same run.

One table file (default 512 MiB, made in ``--dir``). In each of ``--pairs`` back-to-back pairs
(order alternating) the file's cached pages are dropped and each way reads the whole table once;
the figures are the median over pairs of the seconds per pass, their ratio (O_DIRECT / cached),
and the table's pages the page cache holds after each pass (``mincore``): those a pass through the
cache pushes the cold tier's hot pages out for. Writes ``--out`` (JSON, no absolute paths).

Example::

    python bench/bench_scrub_cache.py --out bench/results/scrub_cache.json  # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tiered_store.atomic_file import write_json
from tiered_store.cli_args import (
    add_table_dir,
    at_least,
    doc_parser,
    output_file,
    run_script,
    wrote,
)
from tiered_store.disk_probe import cached_pages, drop_page_cache
from tiered_store.page_checksums import load_page_checksums
from tiered_store.table_format import (
    RandomSource,
    _open_uncached,
    _scan_table,
    check_table,
    create_table,
)
from tiered_store.versions import machine_info

ROW_DIM = 32  # float32 values per row: 128-byte rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = doc_parser(__doc__)
    add_table_dir(p)
    p.add_argument("--table-mib", type=at_least(1), default=512, help="table size in MiB")
    p.add_argument("--pairs", type=at_least(1), default=5, help="back-to-back pairs")
    p.add_argument("--out", type=output_file, help="write the results here (JSON)")
    return p.parse_args(argv)


def one_pass(path: Path, direct: bool) -> tuple[float, int]:
    """Seconds for a whole-table pass from a dropped cache, and the pages cached after it."""
    manifest = check_table(path)
    sums = load_page_checksums(path, manifest.page_checksums)
    drop_page_cache([path])
    with _open_uncached(path) if direct else open(path, "rb", buffering=0) as f:
        start = time.perf_counter()
        _scan_table(path, manifest, False, "verify", expected_pages=sums, file=f)
        seconds = time.perf_counter() - start
    return seconds, cached_pages(path)


def main(argv: list[str] | None = None) -> int:
    """Run the pairs; print the medians; write the JSON."""
    args = parse_args(argv)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    cached: dict[bool, list[int]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="scrub-cache-") as tmp:
        path = Path(tmp) / "cold.npy"
        rows = (args.table_mib << 20) // (ROW_DIM * 4)
        create_table(path, RandomSource(rows, ROW_DIM, seed=3), progress=False)
        pages = -(-path.stat().st_size // 4096)
        for pair in range(args.pairs):
            for direct in (True, False) if pair % 2 == 0 else (False, True):
                s, c = one_pass(path, direct)
                seconds[direct].append(s)
                cached[direct].append(c)
    ratios = [d / c for d, c in zip(seconds[True], seconds[False], strict=True)]
    results = {
        "table_pages": pages,
        "cached_seconds": statistics.median(seconds[False]),
        "direct_seconds": statistics.median(seconds[True]),
        "seconds_ratio_direct_over_cached": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pages_cached_after_cached_pass": statistics.median(cached[False]),
        "pages_cached_after_direct_pass": statistics.median(cached[True]),
    }
    mib = args.table_mib
    print(
        f"through the cache: {mib / results['cached_seconds']:7.0f} MiB/s, "
        f"{results['pages_cached_after_cached_pass']:,.0f} of {pages:,} pages cached after; "
        f"O_DIRECT: {mib / results['direct_seconds']:7.0f} MiB/s, "
        f"{results['pages_cached_after_direct_pass']:,.0f} cached after; seconds ratio "
        f"{results['seconds_ratio_direct_over_cached']:.3f} (median of {args.pairs} pairs; "
        f"{results['ratio_min']:.3f}-{results['ratio_max']:.3f})"
    )
    if args.out:
        doc = {
            "script": "bench/bench_scrub_cache.py",
            "table_mib": mib,
            "pairs": args.pairs,
            "machine": machine_info(),
            "results": results,
        }
        wrote(write_json(args.out, doc))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

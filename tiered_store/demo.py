"""``tiered-store demo``: build a table, drive a Zipfian lookup workload through the store, report."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .capacity import format_bytes
from .config import StoreConfig
from .store import TieredStore
from .workload import ZipfWorkload


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="build a table and run a Zipfian lookup workload through the tiered store",
        description="Builds a random table in a work directory, drives Zipf-distributed batches of row "
        "ids through the store (prefetching the next batch while the current one is consumed), checks "
        "every result against the table itself, and prints per-tier hit rates and throughput. "
        "No arguments needed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=2_000_000, help="table rows")
    p.add_argument("--dim", type=int, default=64, help="row width")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batches", type=int, default=60, help="lookup batches to run")
    p.add_argument("--batch-size", type=int, default=65536, help="ids per batch")
    p.add_argument("--zipf", type=float, default=0.9, help="Zipf exponent of the workload")
    p.add_argument("--hot", default="2%", help="hot tier capacity (rows, bytes like 64MiB, or %%)")
    p.add_argument("--warm", default="10%", help="warm tier capacity")
    p.add_argument("--policy", default="lru", help="policy of both cache tiers")
    p.add_argument(
        "--io", default="pread", choices=["mmap", "pread", "direct"], help="cold tier I/O"
    )
    p.add_argument("--device", default="cpu", help="compute device for the hot tier")
    p.add_argument(
        "--workdir", type=Path, help="where the table goes (default: a temporary directory)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-check", action="store_true", help="skip checking results against the table"
    )
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    """Run the demo with parsed arguments; prints a report and returns 0 on success."""
    from .table_format import RandomSource, create_table

    with tempfile.TemporaryDirectory(prefix="tiered-store-demo-", dir=args.workdir) as tmp:
        table = Path(tmp) / "table.npy"
        print(f"building a {args.rows:,} x {args.dim} {args.dtype} table in {tmp}")
        create_table(
            table,
            RandomSource(args.rows, args.dim, dtype=args.dtype, seed=args.seed),
            progress=True,
        )
        config = StoreConfig.from_dict(
            {
                "table": {"path": str(table)},
                "tiers": {
                    "hot": {"capacity": args.hot, "device": args.device, "policy": args.policy},
                    "warm": {"capacity": args.warm, "policy": args.policy},
                    "cold": {"io": args.io},
                },
            }
        )
        workload = ZipfWorkload(args.rows, args.zipf, seed=args.seed)
        batches = [torch.from_numpy(workload.sample(args.batch_size)) for _ in range(args.batches)]
        reference = None if args.no_check else np.load(table, mmap_mode="r")
        with TieredStore(config) as store:
            print(store)
            elapsed, checked = _drive(store, batches, reference)
            _report(store, args, elapsed, checked)
    return 0


def _drive(store: TieredStore, batches: list[torch.Tensor], reference) -> tuple[float, int]:
    """Prefetch batch i+1 while batch i is consumed; returns (seconds in lookups, batches checked)."""
    handle = store.prefetch(batches[0])
    busy, checked = 0.0, 0
    for i in tqdm(range(len(batches)), desc="lookups", unit="batch"):
        start = time.perf_counter()
        out = store.lookup(batches[i], handle)
        if i + 1 < len(batches):
            handle = store.prefetch(batches[i + 1])
        busy += time.perf_counter() - start
        if reference is not None and i % 10 == 0:  # spot-check: bit-exact with the table itself
            want = torch.from_numpy(np.ascontiguousarray(reference[batches[i].numpy()]))
            got = out.cpu().view(want.dtype) if out.dtype == torch.bfloat16 else out.cpu()
            if not torch.equal(got, want):
                raise AssertionError(f"demo: batch {i} differs from the table")
            checked += 1
    return busy, checked


def _report(store: TieredStore, args, elapsed: float, checked: int) -> None:
    stats = store.stats()
    total = args.batches * args.batch_size
    print(
        f"\n{total:,} lookups in {elapsed:.2f} s: {total / elapsed / 1e6:.2f} M rows/s "
        f"({format_bytes(total * store.row_bytes / elapsed)}/s); results checked on {checked} batches"
    )
    print(
        f"{'tier':<6}{'capacity':>12}{'hit rate':>10}{'hits':>14}{'admissions':>12}{'evictions':>12}"
    )
    for tier in ("hot", "warm"):
        s = stats[tier]
        print(
            f"{tier:<6}{s['capacity']:>12,}{s['hit_rate']:>10.1%}{s['hits']:>14,}{s['admissions']:>12,}{s['evictions']:>12,}"
        )
    cold = stats["cold"]
    served = stats["hot"]["hits"] + stats["warm"]["hits"]
    print(
        f"{'cold':<6}{store.rows:>12,}{'':>10}{cold['rows_read']:>14,} rows read, {format_bytes(cold['bytes_read'])}"
    )
    print(
        f"overall: {served / total:.1%} of lookups served from the caches; "
        f"prefetch stall {stats['prefetch']['wait_seconds_total']:.3f} s over {stats['prefetch']['handles']} batches"
    )

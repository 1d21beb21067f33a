"""A TieredStore over a table with DeepSeek-V4.1's row count and addressing, on this machine.

One synthetic layer-1 table of the release's 384,006,168 rows (the primes of
``engram_vocab_size`` 16,000,000, 2..4-grams x 8 heads), with narrower rows so it fits a small
disk: 32 fp8 values + 1 ue8m0 scale byte = 33 B a row, 12.7 GB. It is opened with hot 1% + warm 5%
of the rows (LRU, cold reads ``io: uring``, page checksums verified), twice in the same run: with the compact hashed
row -> slot index (sized from the tiers) and with the dense one (4 B per table row per tier), and
each replays the same real text (Python stdlib sources, DeepSeek tokenizer) hashed with the
release's config, batch after batch (each batch's rows prefetched while the previous batch's are
consumed, as the Engram module does).

Reported per index: open time, RSS after open and at the end, index and policy metadata (bytes
per table row and per slot), lookups/s and tokens/s, per-tier hit ratios and counts (of the
timed batches), cold rows read per second and the cold read rate in MB/s, the all-hit lookup
rate (once every index has replayed, the stores taking turns: the median of 7 timings); and the
hashed/dense ratios.

Example::

    python bench/bench_v41_scale.py --dir /data/scratch --out bench/results/v41_scale.json
    python bench/bench_v41_scale.py --table /data/scratch/v41_layer1_384006168x33.npy --tokens 409600

``--table`` reuses a table made by an earlier run (its manifest must show 384,006,168 rows of 33
packed bytes unless ``--vocab`` is given); otherwise one is created in ``--dir`` (a few minutes,
12.7 GB of free disk needed) and kept for later runs.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tiered_store import StoreConfig, TieredStore
from tiered_store.atomic_file import write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_file,
    make_folder,
    output_file,
    output_folder,
    run_script,
    wrote,
)
from tiered_store.corpus import resolve_corpus
from tiered_store.engram import EngramConfig, NgramHasher
from tiered_store.engram.corpus import read_tokens, token_batches
from tiered_store.errors import ConfigError
from tiered_store.quantization import RowQuantization
from tiered_store.stats import hit_ratio
from tiered_store.table_format import RandomSource, create_table, read_manifest

RELEASE_VOCAB = 16_000_000  # the release's engram_vocab_size: 384,006,168 rows in layer 1
VALUES = 32  # fp8 values per row (the release has 256): 33-byte rows with the scale byte
TIERS = {"hot": "1%", "warm": "5%"}  # capacities, shares of the table's rows
INDEXES = ("hashed", "dense", "auto")


def index_list(text: str) -> str:
    """An argparse type: comma-separated row indexes, each one of ``INDEXES``."""
    kinds = text.split(",")
    if not all(kind in INDEXES for kind in kinds) or len(set(kinds)) < len(kinds):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated row indexes from {', '.join(INDEXES)}, got {text!r}"
        )
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument(
        "--dir", type=output_folder, default=".", help="where the table is created (default .)"
    )
    p.add_argument(
        "--table", type=existing_file, help="reuse this table (it must exist) instead of making one"
    )
    p.add_argument(
        "--vocab",
        type=at_least(2),
        default=RELEASE_VOCAB,
        help="engram_vocab_size (default the release's)",
    )
    p.add_argument(
        "--warmup-tokens",
        type=at_least(0),
        default=1_000_000,
        help="real-text tokens replayed untimed first (default 1M)",
    )
    p.add_argument(
        "--tokens",
        type=at_least(1),
        default=600_000,
        help="real-text tokens replayed (default 600k)",
    )
    p.add_argument(
        "--batch-size", type=at_least(1), default=4, help="sequences per batch (default 4)"
    )
    p.add_argument(
        "--seq-len", type=at_least(1), default=512, help="tokens per sequence (default 512)"
    )
    p.add_argument(
        "--threads", type=at_least(1), default=16, help="cold reader threads (default 16)"
    )
    p.add_argument(
        "--io",
        default="uring",
        choices=("uring", "direct", "pread", "mmap"),
        help="cold reads: uring (default), direct, pread, mmap",
    )
    p.add_argument(
        "--indexes",
        type=index_list,
        default="hashed,dense",
        help="row indexes to compare (default hashed,dense)",
    )
    p.add_argument(
        "--all-hit-rounds",
        type=at_least(1),
        default=7,
        help="timings of 4 all-hit lookups of the last batch, the stores taking turns, once "
        "every index has replayed; their median is reported (default 7)",
    )
    p.add_argument("--out", type=output_file, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.tokens < args.batch_size * args.seq_len:  # refused before the table is made
        p.error(
            f"argument --tokens: expected at least one batch ({args.batch_size} x "
            f"{args.seq_len} = {args.batch_size * args.seq_len:,} tokens), got {args.tokens:,}"
        )
    return args


def rss_bytes() -> int:
    """Resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make_hasher(vocab: int) -> NgramHasher:
    """The release's addressing (2..4-grams x 8 heads, layers 1 and 14) at ``vocab``."""
    return NgramHasher(
        EngramConfig(
            engram_vocab_size=vocab,
            max_ngram_size=4,
            n_head_per_ngram=8,
            n_embed_per_ngram=8 * VALUES,
            layer_ids=(1, 14),
            pad_id=2,
            geometry="deepseek-v4.1",
        )
    )


def ensure_table(args, rows: int) -> Path:
    """The table to serve: ``--table``, or a new one in ``--dir``."""
    quant = RowQuantization(values=VALUES, block=VALUES)
    path = args.table or args.dir / f"v41_layer1_{rows}x{quant.packed_bytes}.npy"
    if path.exists():
        manifest = read_manifest(path)
        if manifest.rows != rows or manifest.quantization != quant:
            raise ConfigError(
                f"{path}: {manifest.rows:,} rows of {manifest.quantization}; expected {rows:,} rows of {quant}"
            )
        return path
    print(f"creating {path} ({rows:,} x {quant.packed_bytes} B) ...", flush=True)
    # a missing --table is refused by its type: the table is in --dir
    make_folder(args.dir, "--dir")
    source = RandomSource(rows, quant.packed_bytes, dtype="uint8", seed=1, quantization=quant)
    create_table(path, source, progress=True)
    return path


def all_hit_rates(
    stores: dict[str, TieredStore], ids: np.ndarray, rounds: int = 7, repeats: int = 4
) -> dict[str, dict]:
    """Lookups/s of a batch whose rows are all resident (probe + gather + dequantise), per store:
    the median of ``rounds`` timings of ``repeats`` lookups each, with the slowest and fastest.
    The stores take turns within each round (the order reversed every other round), so a busy
    spell of the machine falls on all of them."""
    tensor = torch.from_numpy(ids)
    rates = {kind: [] for kind in stores}
    for store in stores.values():
        store.lookup(tensor)
    for round_ in range(rounds):
        for kind in list(stores)[:: -1 if round_ % 2 else 1]:
            start = time.perf_counter()
            for _ in range(repeats):
                stores[kind].lookup(tensor)
            rates[kind].append(repeats * ids.size / (time.perf_counter() - start))
    return {
        kind: {"median": float(np.median(r)), "min": min(r), "max": max(r)}
        for kind, r in rates.items()
    }


def replay(store: TieredStore, batches: list[np.ndarray]) -> dict:
    """Every batch's rows prefetched one batch ahead and then looked up; lookups/s, reads/s."""
    before = store.stats()
    start, cpu0 = time.perf_counter(), time.process_time()
    handle = store.prefetch(torch.from_numpy(batches[0]))
    for i, ids in enumerate(batches):
        nxt = store.prefetch(torch.from_numpy(batches[i + 1])) if i + 1 < len(batches) else None
        store.lookup(torch.from_numpy(ids), handle)
        handle = nxt
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    stats = store.stats()
    lookups = sum(int(b.size) for b in batches)
    rows_read = stats["cold"]["rows_read"] - before["cold"]["rows_read"]
    bytes_read = stats["cold"]["bytes_read"] - before["cold"]["bytes_read"]
    # these batches' probes: the counters since the open would count the warm-up's too
    counts = {
        tier: {k: stats[tier][k] - before[tier][k] for k in ("lookups", "hits")}
        for tier in ("hot", "warm")
    }
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "lookups": lookups,
        "lookups_per_second": lookups / seconds,
        "cold_rows_per_second": rows_read / seconds,
        "cold_mb_per_second": bytes_read / seconds / 1e6,
        "hit_ratio": {tier: hit_ratio(c["hits"], c["lookups"]) for tier, c in counts.items()},
        "tier_counts": counts,
        "rows_from_cold_per_lookup": rows_read / lookups,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    hasher = make_hasher(args.vocab)
    rows = hasher.table_rows(1)
    total = args.warmup_tokens + args.tokens
    corpus = resolve_corpus().shuffled(0)
    tokens = read_tokens(corpus, hasher.tokenizer, max_tokens=total)
    batches = [
        np.ascontiguousarray(hasher.row_ids(b.numpy())[1])
        for b in token_batches(tokens, args.batch_size, args.seq_len)
    ]
    split = args.warmup_tokens // (args.batch_size * args.seq_len)
    warmup, batches = batches[:split], batches[split:]
    tokens_per_batch = args.batch_size * args.seq_len
    if not batches:  # refused before the table is made (12.7 GB at the release's size)
        raise ConfigError(
            f"argument --tokens: the corpus ({corpus.description}) holds {len(tokens):,} "
            f"tokens, which leaves no timed batch after --warmup-tokens {args.warmup_tokens:,}; "
            f"expected --warmup-tokens + one batch ({tokens_per_batch:,} tokens) at most "
            f"{len(tokens):,}"
        )
    path = ensure_table(args, rows)
    print(
        f"{rows:,} rows; {len(warmup)} warm-up and {len(batches)} timed batches of "
        f"{tokens_per_batch} tokens ({batches[0].size:,} lookups each)"
    )
    cold = {"io": args.io, "threads": args.threads}
    # the process's one-time costs paid before the timed opens, of opening (the page-checksum
    # kernel's load and its imports) and of a replay (the first cold reads and lookups): the
    # first index in --indexes would have them in its open time and RSS
    untiered = {"hot": {"capacity": 0}, "warm": {"capacity": 0}, "cold": cold}
    table = {"path": str(path), "out_of_range": "zero"}
    with TieredStore(StoreConfig.from_dict({"table": table, "tiers": untiered})) as store:
        process_warm_up = replay(store, (warmup or batches)[:2])
    results, stores = {}, {}
    with contextlib.ExitStack() as open_stores:  # kept open for the all-hit rounds at the end
        for kind in args.indexes.split(","):
            config = StoreConfig.from_dict(
                {
                    "table": table,
                    "tiers": {
                        "hot": {"capacity": TIERS["hot"], "index": kind},
                        "warm": {"capacity": TIERS["warm"], "index": kind},
                        "cold": cold,
                    },
                }
            )
            rss0 = rss_bytes()
            start = time.perf_counter()
            store = open_stores.enter_context(TieredStore(config))
            opened = time.perf_counter() - start
            rss_open = rss_bytes() - rss0
            if warmup:
                replay(store, warmup)
            run = replay(store, batches)
            run.update(
                open_seconds=opened,
                rss_after_open_bytes=rss_open,
                rss_at_end_bytes=rss_bytes() - rss0,
                tokens_per_second=run["lookups_per_second"] / hasher.num_heads,
                memory=store.memory_report(),
            )
            results[kind], stores[kind] = run, store
        for kind, rates in all_hit_rates(stores, batches[-1], args.all_hit_rounds).items():
            results[kind]["all_hit_lookups_per_second"] = rates["median"]
            results[kind]["all_hit_lookups_per_second_range"] = [rates["min"], rates["max"]]
    for kind, run in results.items():
        print(
            f"{kind:6s}: open {run['open_seconds']:.2f} s, RSS +{run['rss_after_open_bytes'] / 2**20:,.0f} MiB "
            f"at open / +{run['rss_at_end_bytes'] / 2**20:,.0f} MiB at end, "
            f"{run['lookups_per_second'] / 1e6:.2f}M lookups/s ({run['tokens_per_second']:,.0f} tokens/s; "
            f"all-hit {run['all_hit_lookups_per_second'] / 1e6:.2f}M/s, median of {args.all_hit_rounds}), "
            f"hot {run['hit_ratio']['hot']:.1%} warm {run['hit_ratio']['warm']:.1%}, "
            f"cold {run['cold_rows_per_second'] / 1e3:.1f}k rows/s ({run['cold_mb_per_second']:.1f} MB/s)"
        )
    if {"hashed", "dense"} <= set(results):
        h, d = results["hashed"], results["dense"]
        results["hashed_vs_dense"] = {
            "lookups_per_second": h["lookups_per_second"] / d["lookups_per_second"],
            "rss_at_end": h["rss_at_end_bytes"] / d["rss_at_end_bytes"],
            "open_seconds": h["open_seconds"] / d["open_seconds"],
            "all_hit_lookups_per_second": h["all_hit_lookups_per_second"]
            / d["all_hit_lookups_per_second"],
        }
        print("hashed / dense:", {k: round(v, 3) for k, v in results["hashed_vs_dense"].items()})
    doc = {
        "table": {
            "rows": rows,
            "row_bytes": VALUES + 1,
            "file": path.name,
            "engram_vocab_size": args.vocab,
        },
        "tokens": {
            "warmup": len(warmup) * tokens_per_batch,
            "timed": len(batches) * tokens_per_batch,
        },
        "batch": {"sequences": args.batch_size, "seq_len": args.seq_len},
        # before any index is measured, untiered: what a process pays once for its first replay
        "process_warm_up": {k: process_warm_up[k] for k in ("lookups", "cold_rows_per_second")},
        "store": {"tiers": TIERS, "cold": cold},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "results": results,
    }
    if args.out:
        wrote(write_json(args.out, doc))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

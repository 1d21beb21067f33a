"""DeepSeek-V4.1 Engram on the tiered store: prefill, decode and the store alone, at the release's
row count.

Tables: synthetic, with the release's addressing (``config.json`` keys as in the release: Engram
at layers 1 and 14, 3 n-gram orders x 8 heads, ``engram_vocab_size`` 16,000,000 -> 384,006,168
and 384,016,682 rows) but narrower rows: 32 fp8 (e4m3) values + 1 ue8m0 scale byte = 33 B a row
(12.7 GB per table) instead of 264 B, seeded random codes (``RandomSource(quantization=...)``).
Tables in memory need the whole table in RAM, which the release's size does not allow here, so a
second pair of tables has the same hash geometry scaled down (``--scaled-vocab`` rows per head).

Phases (each writes its section of the report):

  scaled   the scaled tables, alternating in rounds: (a) ``memory``: both tables in RAM
           (``PackedInMemoryTable``), the baseline; (b) ``tiered``: a ``TieredStore`` per layer,
           hot + warm = ``--hot`` + ``--warm`` of the table (10%), LRU, ``--io`` (default
           ``uring``: O_DIRECT reads through io_uring),
           warm-started from a profile of other text, rows prefetched when the batch starts (and
           ``--lookahead`` batches ahead). Prefill: tokens/s, median of per-round ratios (b)/(a).
           Decode (prompt, then one token per step, batch sizes ``--decode-batch``): time per
           step, the store's time per step and the stall, prefetch started at the step's
           beginning. Logits are checked bit-identical between (a) and (b) in every round.
  release  the release-size tables, tiered as (b) (open time, RSS, metadata per row), prefill and
           decode as above, each round alternated with (a) on the scaled tables when they are
           still in RAM (same model, so the same compute; other rows, so no bit-identity check).
  store    the store alone, no model: for both layers hash (``NgramHasher.row_ids``), prefetch,
           lookup (tier probes, cold reads, dequantise), the next batch's fetch started before the
           current batch's lookup; prefill-shaped [B, T] batches and decode-shaped [16, 1] steps
           (``HashState``). Tokens/s and tokens per CPU-second (every thread of the process), for
           the release tables tiered, the scaled tables tiered and in memory; how many cores the
           paper's 9,031 tokens/s (4B dense + 100B Engram table in host memory, one H800) needs.
  cached   the store alone as in ``store``, on the scaled tables tiered with their cold tier in
           the page cache (``io: pread``, ``--cached-cold-threads`` readers, each file read once
           before): what the store's CPU sustains when the disk is not the limit.

``--policy zipf-tuned`` pins from a frequency profile of the warm-start text (saved beside the
tables as ``profile_layer{L}.npz``) instead of preloading the hottest rows into LRU tiers.

Real text: the default corpus (the Python standard library's sources), DeepSeek tokenizer; the
warm-start profile, the prefill, the decode and the store-alone batches are disjoint slices of it.
Sizes that need more text than it holds are refused before the tables are made.

Example (the published figures; ~25 GB of tables under --dir, ~30 min on 2 cores)::

    python bench/bench_v41.py --dir /var/tmp --out bench/results/v41.json

A quick try (tiny tables and model, every phase, seconds)::

    python bench/bench_v41.py --dir /tmp/v41-try --release-vocab 1000 --scaled-vocab 500 \\
        --hidden 32 --layers 15 --heads 2 --batch-size 1 --seq-len 32 --rounds 1 \\
        --batches-per-round 2 --decode-batch 1 --decode-prompt 4 --decode-steps 2 \\
        --decode-rounds 1 --store-tokens 64 --store-decode-steps 2 --store-decode-batch 1 \\
        --store-torch-threads 1 --profile-tokens 2000

The tables stay in --dir (``v41-VOCABxBYTES/``), reused by the next run with the same sizes; the
run ends by saying where and how large they are.

Where the work runs (CPU-only machine): torch's intra-op threads run the model; each store's
prefetch worker resolves a batch and its reader pool issues the O_DIRECT reads meanwhile, on the
same cores: on this machine the model's compute is ~100x the store's, which is why the store is
also measured alone.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tiered_store.atomic_file import json_text, write_json
from tiered_store.cli_args import (
    at_least,
    capacity,
    doc_parser,
    make_folder,
    output_file,
    output_folder,
    policy,
    public_command,
    run_script,
    say_kept,
    wrote,
)
from tiered_store.corpus import resolve_corpus
from tiered_store.disk_probe import drop_page_cache, fio_random_reads
from tiered_store.engram import NgramHasher
from tiered_store.engram.backend import PackedInMemoryTable
from tiered_store.engram.checkpoint import open_tables, random_tables
from tiered_store.engram.config import hf_engram_sections
from tiered_store.engram.corpus import read_tokens, token_batches
from tiered_store.engram.model import EngramLM, ModelConfig
from tiered_store.engram.pipeline import PrefetchPipeline
from tiered_store.errors import ConfigError
from tiered_store.profile import FrequencyCounter, FrequencyProfile
from tiered_store.quantization import RowQuantization
from tiered_store.versions import machine_info

RELEASE_VOCAB = 16_000_000  # the release's engram_vocab_size
RELEASE_ROWS = [384_006_168, 384_016_682]  # the release's engram_num_embeddings
PAPER_TOKENS_PER_S = 9_031  # 4B dense + 100B-parameter Engram table in host memory, one H800
PREFILL_TARGET = 0.97  # tiered tokens/s >= 0.97 x memory
STALL_TARGET = 0.05  # decode: stall <= 5% of the step
PHASES = ("scaled", "release", "store", "cached")


def parse_args(argv=None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument(
        "--dir",
        type=output_folder,
        default="/var/tmp",
        help="where table files go (O_DIRECT needs a disk)",
    )
    p.add_argument(
        "--phases", nargs="+", default=list(PHASES), choices=PHASES, help="phases to run, in order"
    )
    p.add_argument("--release-vocab", type=at_least(2), default=RELEASE_VOCAB, help="rows per head")
    p.add_argument(
        "--scaled-vocab",
        type=at_least(2),
        default=2_500_000,
        help="rows per head, in-memory tables",
    )
    p.add_argument(
        "--row-values", type=at_least(32), default=32, help="fp8 values per row (x 8 heads)"
    )
    p.add_argument("--hidden", type=at_least(1), default=512, help="backbone width")
    p.add_argument(
        "--layers", type=at_least(15), default=16, help="Transformer layers (Engram at 1, 14)"
    )
    p.add_argument("--heads", type=at_least(1), default=8, help="attention heads")
    p.add_argument("--hc-mult", type=at_least(1), default=4, help="hyper-connection branches")
    p.add_argument("--batch-size", type=at_least(1), default=4, help="prefill: sequences per batch")
    p.add_argument("--seq-len", type=at_least(1), default=512, help="prefill: tokens per sequence")
    p.add_argument(
        "--rounds", type=at_least(1), default=6, help="prefill: measured rounds (+1 untimed)"
    )
    p.add_argument(
        "--lookahead", type=at_least(0), default=1, help="prefill: batches prefetched ahead"
    )
    p.add_argument(
        "--batches-per-round",
        type=at_least(2),
        default=3,
        help="prefill: batches per variant per round (the first one's fetch cannot be ahead)",
    )
    p.add_argument(
        "--decode-batch",
        type=at_least(1),
        nargs="+",
        default=[1, 4, 16],
        help="decode: sequences per step, one run each",
    )
    p.add_argument("--decode-prompt", type=at_least(1), default=128, help="decode: prompt tokens")
    p.add_argument("--decode-steps", type=at_least(1), default=32, help="decode: steps per round")
    p.add_argument(
        "--decode-rounds", type=at_least(1), default=3, help="decode: rounds per batch size"
    )
    p.add_argument(
        "--store-tokens", type=at_least(1), default=400_000, help="store alone: tokens per run"
    )
    p.add_argument(
        "--store-decode-steps", type=at_least(1), default=200, help="store alone: decode steps"
    )
    p.add_argument(
        "--store-decode-batch",
        type=at_least(1),
        nargs="+",
        default=[16, 256],
        help="store alone: sequences per decode step, one run each",
    )
    p.add_argument("--hot", type=capacity, default="2%", help="hot tier capacity per table")
    p.add_argument("--warm", type=capacity, default="8%", help="warm tier capacity per table")
    p.add_argument(
        "--policy",
        type=policy,
        default="lru",
        help="tier policy: lru, or zipf-tuned (pins from the profile)",
    )
    p.add_argument(
        "--io",
        default="uring",
        choices=("uring", "direct", "pread", "mmap"),
        help="cold reads: uring (default; O_DIRECT), direct, pread, mmap",
    )
    p.add_argument(
        "--cold-threads",
        type=at_least(0),
        default=0,
        help="reader threads per store (0: 1 ring for io: uring, 16 threads otherwise)",
    )
    p.add_argument(
        "--cached-cold-threads",
        type=at_least(1),
        default=1,
        help="phase cached: reader threads per store (page-cache reads cost microseconds: more "
        "threads add hand-off overhead to small batches)",
    )
    p.add_argument(
        "--profile-tokens", type=at_least(1), default=2_000_000, help="warm-start profile"
    )
    p.add_argument(
        "--torch-threads", type=at_least(0), default=0, help="intra-op threads (0: default)"
    )
    p.add_argument(
        "--store-torch-threads",
        type=at_least(1),
        nargs="+",
        default=[1, 2],
        help="store alone: intra-op threads, one run each",
    )
    p.add_argument(
        "--seed",
        type=at_least(0),
        default=0,
        help="seed of the text order and model (the tables' rows are seeded by layer: a table "
        "kept in --dir is reused)",
    )
    p.add_argument("--out", type=output_file, help="write the JSON report here as well as stdout")
    args = p.parse_args(argv)
    batch = args.batch_size * args.seq_len  # refused before any table is made
    if args.row_values % 32:
        p.error(
            f"argument --row-values: expected a multiple of 32 (fp8 blocks), got {args.row_values}"
        )
    for option, value in (
        ("--store-tokens", args.store_tokens),
        ("--profile-tokens", args.profile_tokens),
    ):
        if value < batch:
            p.error(
                f"argument {option}: expected at least one batch ({args.batch_size} x "
                f"{args.seq_len} = {batch:,} tokens), got {value:,}"
            )
    return args


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss() -> dict[str, float]:
    """Resident and peak resident set of this process, GiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM")}
    return {"rss_gib": kib["VmRSS"] / 2**20, "peak_rss_gib": kib["VmHWM"] / 2**20}


def model_config(args, vocab: int, rows: list[int] | None) -> ModelConfig:
    """A V4.1 config.json's text_config (the release's keys) -> the model's configuration."""
    text = {
        "engram_layer_ids": [1, 14],
        "engram_num_embeddings": rows or [0, 0],
        "engram_max_ngram_size": 4,
        "engram_vocab_size": vocab,
        "engram_n_heads": 8,
        "engram_head_dim": args.row_values,
        "engram_pad_token_id": 2,
        "engram_compressed_vocab_size": 99_092,
        "hidden_size": args.hidden,
        "hc_mult": args.hc_mult,
        "num_hidden_layers": args.layers,
    }
    sections = hf_engram_sections({"text_config": text})
    sections["engram"]["num_embeddings"] = rows  # None: not stated (scaled tables)
    sections["transformer"] = {"num_attention_heads": args.heads}
    return ModelConfig.from_dict(sections)


def store_spec(args, io: str | None = None, cold_threads: int | None = None) -> dict:
    """The stores' configuration (without the table): tiers, cold reads, prefetch depth."""
    io = io or args.io
    threads = cold_threads or args.cold_threads or (1 if io == "uring" else 16)
    return {
        "tiers": {
            "hot": {"capacity": args.hot, "policy": args.policy},
            "warm": {"capacity": args.warm, "policy": args.policy},
            "cold": {"io": io, "threads": threads},
        },
        "prefetch": {"depth": args.lookahead + 2},
    }


def text_profiles(hasher: NgramHasher, batches: list) -> dict[int, FrequencyProfile]:
    """Each layer's frequency profile over ``batches`` (hashing only): the warm start."""
    counters = {layer: FrequencyCounter(hasher.table_rows(layer)) for layer in hasher.layer_ids}
    for ids in batches:
        for layer, rows in hasher.row_ids(ids).items():
            counters[layer].update(rows.numpy())
    return {layer: counter.profile() for layer, counter in counters.items()}


def open_tiered(
    paths, hasher, args, profile_batches, *, io: str | None = None, cold_threads: int | None = None
) -> tuple[dict, dict]:
    """Stores per layer, warm-started from the profile; their open time, memory and geometry.
    LRU tiers preload the profile's hottest rows; ``zipf-tuned`` pins from the profile itself."""
    profiles = text_profiles(hasher, profile_batches)
    hottest = {layer: p.row_ids for layer, p in profiles.items()}
    spec = store_spec(args, io, cold_threads)
    warm_start: dict | None = hottest
    if args.policy.startswith("zipf-tuned"):
        files = {}
        for layer, profile in profiles.items():
            files[layer] = Path(paths[layer]).with_name(f"profile_layer{layer}.npz")
            profile.save(files[layer])

        def spec_of(layer: int, base: dict = spec) -> dict:
            tiers = {k: dict(v) for k, v in base["tiers"].items()}
            for tier in ("hot", "warm"):
                tiers[tier]["profile"] = str(files[layer])
            return base | {"tiers": tiers}

        spec, warm_start = spec_of, None
    t0 = time.perf_counter()
    stores = open_tables(paths, hasher, spec, warm_start=warm_start)
    opened = time.perf_counter() - t0
    first = stores[hasher.layer_ids[0]]
    reports = {layer: s.memory_report() for layer, s in stores.items()}
    if warm_start is None:  # zipf-tuned: the profile's pins, loaded at open
        start = {
            "pinned_rows": {
                layer: s.hot.pinned_count + s.warm.pinned_count for layer, s in stores.items()
            }
        }
    else:  # the warm tier preloads the profile's hottest rows it holds
        start = {
            "warm_start_rows": {
                layer: int(min(len(hottest[layer]), s.warm.capacity)) for layer, s in stores.items()
            }
        }
    info = {
        "open_seconds_with_warm_start": opened,
        **start,
        "rows": {layer: s.rows for layer, s in stores.items()},
        "row_bytes": first.row_bytes,
        "hot_rows": {layer: s.hot.capacity for layer, s in stores.items()},
        "warm_rows": {layer: s.warm.capacity for layer, s in stores.items()},
        "cache_fraction": {
            layer: (s.hot.capacity + s.warm.capacity) / s.rows for layer, s in stores.items()
        },
        "metadata_bytes_per_table_row": {
            layer: r["hot_metadata"]["per_table_row"] + r["warm_metadata"]["per_table_row"]
            for layer, r in reports.items()
        },
        "payload_bytes_per_table": {
            layer: r["hot_payload_bytes"] + r["warm_payload_bytes"] for layer, r in reports.items()
        },
        **rss(),
    }
    return stores, info


def _stall(tables: dict) -> float:
    """Seconds lookups waited for prefetched rows so far, over tables that keep statistics."""
    return sum(
        t.stats()["prefetch"]["wait_seconds_total"] for t in tables.values() if t.keeps_stats
    )


def run_prefill(model, tables, batches, args) -> tuple[dict, list]:
    """One variant over one round's batches, timed per batch: the first (its fetch starts with
    it) and the rest (steady state: each fetched ``--lookahead`` batches ahead)."""
    model.set_tables(tables)
    pipeline = PrefetchPipeline(model, lookahead=args.lookahead, logits="last")
    outputs, marks, stalls = [], [time.perf_counter()], [_stall(tables)]
    cpu = time.process_time()
    for _, out in pipeline.run(batches):
        outputs.append(out)
        marks.append(time.perf_counter())
        stalls.append(_stall(tables))
    cpu = time.process_time() - cpu
    seconds, stall = np.diff(marks), np.diff(stalls)
    s = pipeline.stats
    per_batch = batches[0].numel()
    return {
        "tokens": s.tokens,
        "batch_seconds": seconds.tolist(),
        "batch_stall_seconds": stall.tolist(),
        "first_tokens_per_s": per_batch / seconds[0],
        "tokens_per_s": per_batch * (len(seconds) - 1) / seconds[1:].sum(),
        "cpu_seconds": cpu,
        "lookup_seconds": s.lookup_seconds,
        "cold_rows": sum(t["cold"]["rows_read"] for t in s.tables.values()),
        "hot_hits": sum(t["hot"]["hits"] for t in s.tables.values()),
        "warm_hits": sum(t["warm"]["hits"] for t in s.tables.values()),
        "lookups": sum(t["hot"]["lookups"] for t in s.tables.values()),
    }, outputs


def prefill_rounds(variants: dict, batches, args, check_identical: bool) -> dict:
    """Alternate the variants (name -> (model, tables)) in rounds, order rotated; medians and
    per-round ratios against the first, steady state and first batch."""
    names = list(variants)
    rounds, identical = [], True
    k = args.batches_per_round
    for r in range(args.rounds + 1):
        group = batches[r * k : (r + 1) * k]
        order = names[r % len(names) :] + names[: r % len(names)]
        results, outputs = {}, {}
        for name in order:
            results[name], outputs[name] = run_prefill(*variants[name], group, args)
            res = results[name]
            log(
                f"prefill round {r}{' (untimed)' if r == 0 else ''} {name:<14} steady "
                f"{res['tokens_per_s']:7.1f} tokens/s, first batch {res['first_tokens_per_s']:7.1f}"
                f"; stall {sum(res['batch_stall_seconds'][1:]):.3f} s + first "
                f"{res['batch_stall_seconds'][0]:.3f} s"
            )
        if check_identical:
            identical &= all(
                torch.equal(a, b)
                for name in names[1:]
                for a, b in zip(outputs[names[0]], outputs[name], strict=True)
            )
        if r:
            rounds.append(results)
    base = names[0]
    out = {"baseline": base, "bit_identical_outputs": identical if check_identical else None}
    steady_batches = len(rounds) * (k - 1)
    for name in names:
        ratios = [r[name]["tokens_per_s"] / r[base]["tokens_per_s"] for r in rounds]
        first = [r[name]["first_tokens_per_s"] / r[base]["first_tokens_per_s"] for r in rounds]
        lookups = sum(r[name]["lookups"] for r in rounds)
        entry = {
            "tokens_per_s_median": statistics.median(r[name]["tokens_per_s"] for r in rounds),
            "ratio_median": statistics.median(ratios),
            "ratio_mean": statistics.fmean(ratios),
            "ratio_stderr": statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0,
            "ratio_rounds": ratios,
            "stall_seconds_per_batch": sum(sum(r[name]["batch_stall_seconds"][1:]) for r in rounds)
            / steady_batches,
            "first_batch": {
                "tokens_per_s_median": statistics.median(
                    r[name]["first_tokens_per_s"] for r in rounds
                ),
                "ratio_median": statistics.median(first),
                "stall_seconds_median": statistics.median(
                    r[name]["batch_stall_seconds"][0] for r in rounds
                ),
            },
            "cpu_ms_per_token": 1e3
            * sum(r[name]["cpu_seconds"] for r in rounds)
            / sum(r[name]["tokens"] for r in rounds),
            "lookup_seconds_per_batch": sum(r[name]["lookup_seconds"] for r in rounds)
            / (len(rounds) * k),
        }
        if lookups:
            entry["hit_rate"] = {
                "hot": sum(r[name]["hot_hits"] for r in rounds) / lookups,
                "warm_of_all": sum(r[name]["warm_hits"] for r in rounds) / lookups,
                "cold_share_of_lookups": sum(r[name]["cold_rows"] for r in rounds) / lookups,
            }
        out[name] = entry
    out["rounds"] = rounds
    return out


def decode_rounds(variants: dict, pool: np.ndarray, args, check_identical: bool) -> dict:
    """Per batch size: rounds of prompt + steps, the variants (name -> (model, tables))
    alternating; per-step figures."""
    names, out = list(variants), {}
    span = args.decode_prompt + args.decode_steps
    offset = 0
    for size in args.decode_batch:
        steps = {name: [] for name in names}
        identical = True
        for r in range(args.decode_rounds):
            need = size * span
            if offset + need > len(pool):
                offset = 0
            tokens = torch.from_numpy(pool[offset : offset + need].reshape(size, span).copy())
            offset += need
            order = names[r % len(names) :] + names[: r % len(names)]
            outputs = {}
            for name in order:
                model, tables = variants[name]
                model.set_tables(tables)
                pipeline = PrefetchPipeline(model, logits="last")
                outputs[name], stats = pipeline.decode(tokens, args.decode_prompt)
                steps[name].append(stats)
                s = stats.summary()
                log(
                    f"decode batch {size} round {r} {name:<16} step {s['step_ms_median']:.1f} ms "
                    f"store {s['store_ms_median']:.2f} ms stall {s['stall_ms_median']:.2f} ms"
                )
            if check_identical:
                identical &= all(
                    torch.equal(a, b)
                    for name in names[1:]
                    for a, b in zip(outputs[names[0]], outputs[name], strict=True)
                )
        entry = {"bit_identical_outputs": identical if check_identical else None}
        for name in names:
            runs = steps[name]
            merged = type(runs[0])(
                size,
                args.decode_prompt,
                sum(s.prefill_seconds for s in runs),
                *(
                    np.concatenate([getattr(s, f) for s in runs])
                    for f in ("step_seconds", "prepare_seconds", "lookup_seconds", "stall_seconds")
                ),
            )
            summary = merged.summary()
            cold = sum(s.tables[k]["cold"]["rows_read"] for s in runs for k in s.tables)
            looked = sum(s.tables[k]["hot"]["lookups"] for s in runs for k in s.tables)
            if looked:
                summary["cold_share_of_lookups"] = cold / looked
            base = statistics.median(
                np.median(b.step_seconds) / np.median(v.step_seconds)
                for b, v in zip(steps[names[0]], runs, strict=True)
            )
            summary["step_speed_vs_baseline_median"] = float(base)
            entry[name] = summary
        out[str(size)] = entry
    return out


def store_alone(hasher, tables: dict, batches: list, decode, *, label: str, threads: int) -> dict:
    """Hash + prefetch + lookup for both layers, no model; the next batch's fetch started before
    the current batch's lookup. Tokens/s and tokens per CPU-second, ``threads`` intra-op threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _store_alone(hasher, tables, batches, label, decode) | {"torch_threads": threads}
    finally:
        torch.set_num_threads(saved)


def cached_store_alone(paths, hasher, args, profile, store_text) -> list[dict]:
    """Phase ``cached``: the store alone on the scaled tables, their cold tier in the page cache."""
    for path in paths.values():
        with open(path, "rb") as f:  # read once: every cold read then hits the page cache
            while f.read(1 << 24):
                pass
    stores, _ = open_tiered(
        paths, hasher, args, profile, io="pread", cold_threads=args.cached_cold_threads
    )
    runs = []
    try:
        for threads in args.store_torch_threads:
            batches, decode = next(store_text)
            for shape in ((batches, None), *(([], d) for d in decode)):
                run = store_alone(hasher, stores, *shape, label="scaled cached", threads=threads)
                runs.append(
                    run
                    | {
                        "cold_tier": "page cache",
                        "io": "pread",
                        "cold_threads": args.cached_cold_threads,
                    }
                )
    finally:
        for store in stores.values():
            store.close()
    return runs


def fio_same_run(path: Path, seconds: float = 3.0) -> dict | None:
    """Random 4 KiB O_DIRECT reads/s that ``fio`` (libaio, QD32) gets from the table file now, for
    the store-alone runs' cold rows/s to be read against; None when fio is not installed."""
    try:
        fio = fio_random_reads(path, engine="libaio", depth=32, seconds=seconds)
    except FileNotFoundError:
        return None
    return fio | {"engine": "libaio", "depth": 32}


def with_disk_rate(run: dict, path: Path) -> dict:
    """``run`` with fio's rate on ``path`` measured right after it, and the cold rows/s ratio."""
    fio = fio_same_run(path)
    if fio is None or "cold_rows_per_s" not in run:
        return run
    return run | {"fio_after": fio, "cold_rows_per_s_vs_fio": run["cold_rows_per_s"] / fio["rate"]}


def store_slices(tokens: np.ndarray, args):
    """Disjoint slices of real text, each as prefill-shaped batches and [16, steps] decode ids."""
    per = args.store_tokens + sum(args.store_decode_batch) * args.store_decode_steps
    for start in range(0, len(tokens) - per + 1, per):
        chunk = tokens[start : start + per]
        batches = token_batches(chunk[: args.store_tokens], args.batch_size, args.seq_len)
        rest, decode = chunk[args.store_tokens :], []
        for size in args.store_decode_batch:
            need = size * args.store_decode_steps
            decode.append(torch.from_numpy(rest[:need].reshape(size, -1).copy()))
            rest = rest[need:]
        yield batches, decode


def _store_alone(hasher, tables: dict, batches: list, label: str, decode) -> dict:
    """One store-alone run (see ``store_alone``)."""
    layers = list(tables)
    state = hasher.new_state(decode.shape[0]) if decode is not None else None
    items = batches if decode is None else [decode[:, t : t + 1] for t in range(decode.shape[1])]

    def start(ids):
        rows = hasher.row_ids(ids, state=state)
        return rows, {layer: tables[layer].prefetch(rows[layer]) for layer in layers}

    before = {
        layer: tables[layer].stats() if tables[layer].keeps_stats else None for layer in layers
    }
    wall, cpu = time.perf_counter(), time.process_time()
    pending = start(items[0])
    tokens = 0
    checksum = 0.0
    for i in range(len(items)):
        rows, handles = pending
        if i + 1 < len(items):
            pending = start(items[i + 1])
        for layer in layers:
            out = tables[layer].lookup(rows[layer], handles[layer])
        checksum += float(out[..., 0].float().sum())  # consume the rows
        tokens += items[i].numel()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "tables": label,
        "shape": list(items[0].shape),
        "batches": len(items),
        "tokens": tokens,
        "seconds": wall,
        "cpu_seconds": cpu,
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_second": tokens / cpu,
        "cores_for_paper_rate": PAPER_TOKENS_PER_S * cpu / tokens,
        "keeps_up_on_this_machine": tokens / wall >= PAPER_TOKENS_PER_S,
        "checksum": checksum,
    }
    if before[layers[0]] is not None:
        after = {layer: tables[layer].stats() for layer in layers}
        lookups = sum(after[k]["hot"]["lookups"] - before[k]["hot"]["lookups"] for k in layers)
        cold = sum(after[k]["cold"]["rows_read"] - before[k]["cold"]["rows_read"] for k in layers)
        stall = sum(
            after[k]["prefetch"]["wait_seconds_total"] - before[k]["prefetch"]["wait_seconds_total"]
            for k in layers
        )
        result.update(cold_share_of_lookups=cold / lookups, cold_rows_per_s=cold / wall)
        result["stall_seconds"] = stall
    log(
        f"store alone {label:<16} {result['shape']} {torch.get_num_threads()} thread(s): "
        f"{result['tokens_per_s']:,.0f} tokens/s, "
        f"{result['tokens_per_cpu_second']:,.0f} tokens per CPU-s"
    )
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    quant = RowQuantization(values=args.row_values, block=32)
    scaled_cfg = model_config(args, args.scaled_vocab, None)
    release_rows = RELEASE_ROWS if args.release_vocab == RELEASE_VOCAB else None
    release_cfg = model_config(args, args.release_vocab, release_rows)
    scaled_hasher, release_hasher = NgramHasher(scaled_cfg.engram), NgramHasher(release_cfg.engram)
    # Real text (read before the tables are made: sizes past the corpus are refused first):
    # disjoint slices for the profile, the prefill, the decode and the store alone.
    per_batch = args.batch_size * args.seq_len
    decode_need = (
        max(args.decode_batch) * (args.decode_prompt + args.decode_steps) * args.decode_rounds
    )
    sizes = {
        "profile": args.profile_tokens,
        "prefill": (args.rounds + 1) * args.batches_per_round * per_batch,
        "decode": decode_need * len(args.decode_batch),
        # a fresh slice per store-alone run of the tiered tables (a slice already served would
        # hit the caches): (scaled, release) x threads x (prefill-shaped, decode-shaped)
        "store": (2 + ("cached" in args.phases))
        * len(args.store_torch_threads)
        * (args.store_tokens + sum(args.store_decode_batch) * args.store_decode_steps),
    }
    corpus = resolve_corpus().shuffled(args.seed)
    log(f"tokenising {sum(sizes.values()):,} tokens ...")
    tokens = read_tokens(corpus, scaled_hasher.tokenizer, max_tokens=sum(sizes.values()))
    if len(tokens) < sum(sizes.values()):  # a slice cut short ends a phase in a traceback
        need = ", ".join(f"{name} {n:,}" for name, n in sizes.items())
        raise ConfigError(
            f"corpus ({corpus.description}): {len(tokens):,} tokens; the phases need "
            f"{sum(sizes.values()):,} ({need}: --profile-tokens, the prefill rounds, the decode "
            "and store-alone sizes); expected sizes whose text the corpus holds"
        )
    cuts = np.cumsum([0, *sizes.values()])
    text = {name: tokens[cuts[i] : cuts[i + 1]] for i, name in enumerate(sizes)}
    profile = token_batches(text["profile"], args.batch_size, args.seq_len)
    prefill = token_batches(text["prefill"], args.batch_size, args.seq_len)
    store_text = store_slices(text["store"], args)

    directory = args.dir
    make_folder(directory, "--dir")
    t_setup = time.perf_counter()
    paths = {
        "scaled": random_tables(
            directory / f"v41-{args.scaled_vocab}x{quant.packed_bytes}",
            scaled_hasher,
            quantization=quant,
            log=log,
        ),
        "release": random_tables(
            directory / f"v41-{args.release_vocab}x{quant.packed_bytes}",
            release_hasher,
            quantization=quant,
            log=log,
        ),
    }
    for group in paths.values():
        drop_page_cache(group.values())

    torch.manual_seed(args.seed)
    log("loading the scaled tables into memory ...")
    memory = {l: PackedInMemoryTable.from_table(str(p)) for l, p in paths["scaled"].items()}
    drop_page_cache(paths["scaled"].values())
    model = EngramLM(scaled_cfg, hasher=scaled_hasher, tables=memory).eval()
    dense = model.dense_parameters()
    report: dict = {
        "benchmark": "engram_v41",
        "command": public_command("bench/bench_v41.py", sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "attention_heads": args.heads,
            "hc_mult": args.hc_mult,
            "engram_layers": list(scaled_cfg.engram.layer_ids),
            "dense_parameters": dense,
            "row_lookups_per_token": 2 * scaled_cfg.engram.num_heads,
        },
        "tables": {
            name: {
                "engram_vocab_size": vocab,
                "rows": {layer: h.table_rows(layer) for layer in h.layer_ids},
                "row_bytes": quant.packed_bytes,
                "row_values": quant.values,
                "bytes_on_disk": {l: p.stat().st_size for l, p in paths[name].items()},
            }
            for name, vocab, h in (
                ("scaled", args.scaled_vocab, scaled_hasher),
                ("release", args.release_vocab, release_hasher),
            )
        },
        "workload": {
            "prefill_batch": [args.batch_size, args.seq_len],
            "prefill_rounds": args.rounds,
            "prefill_batches_per_round": args.batches_per_round,
            "lookahead": args.lookahead,
            "decode_batches": args.decode_batch,
            "decode_prompt": args.decode_prompt,
            "decode_steps_per_round": args.decode_steps,
            "decode_rounds": args.decode_rounds,
            "profile_tokens": len(text["profile"]),
            "corpus": re.sub(r"/[^\s)]*", "<path>", corpus.description),  # no machine paths
        },
        "store": store_spec(args),
        "rss_after_memory_tables": rss(),
        "load_average_at_start": os.getloadavg(),
    }
    report["setup_seconds"] = time.perf_counter() - t_setup
    stores: dict = {}
    try:
        if "scaled" in args.phases or "store" in args.phases:
            log("opening the scaled stores (warm start) ...")
            stores["scaled"], report["scaled_store"] = open_tiered(
                paths["scaled"], scaled_hasher, args, profile
            )
        if "scaled" in args.phases:
            variants = {"memory": (model, memory), "tiered": (model, stores["scaled"])}
            report["scaled_prefill"] = prefill_rounds(variants, prefill, args, True)
            report["scaled_decode"] = decode_rounds(variants, text["decode"], args, True)
            del variants
        if "store" in args.phases:
            report["store_alone"] = []
            for threads in args.store_torch_threads:
                batches, decode = next(store_text)  # the same text for both: memory keeps no state
                for shape in ((batches, None), *(([], d) for d in decode)):
                    for label, tables in (
                        ("scaled memory", memory),
                        ("scaled tiered", stores["scaled"]),
                    ):
                        run = store_alone(
                            scaled_hasher, tables, *shape, label=label, threads=threads
                        )
                        if tables is not memory:
                            run = with_disk_rate(run, paths["scaled"][scaled_hasher.layer_ids[0]])
                        report["store_alone"].append(run)
        model.set_tables(memory)  # drop the scaled stores before the release-size ones open
        for store in stores.pop("scaled", {}).values():
            store.close()
        tables = None  # the store-alone loop held the scaled stores
        gc.collect()
        if "cached" in args.phases:
            report.setdefault("store_alone", []).extend(
                cached_store_alone(paths["scaled"], scaled_hasher, args, profile, store_text)
            )
        report["rss_after_scaled_phases"] = rss()
        if "release" in args.phases or "store" in args.phases:
            log("opening the release-size stores (warm start) ...")
            stores["release"], report["release_store"] = open_tiered(
                paths["release"], release_hasher, args, profile
            )
            # the same dense weights as the scaled model: the same compute, other rows
            release = EngramLM(release_cfg, hasher=release_hasher, tables=stores["release"])
            release.load_state_dict(model.state_dict())
            release.eval()
        if "release" in args.phases:
            variants = {"scaled_memory": (model, memory), "tiered": (release, stores["release"])}
            report["release_prefill"] = prefill_rounds(variants, prefill, args, False)
            report["release_decode"] = decode_rounds(variants, text["decode"], args, False)
        if "store" in args.phases:
            for threads in args.store_torch_threads:
                batches, decode = next(store_text)
                for shape in ((batches, None), *(([], d) for d in decode)):
                    run = store_alone(
                        release_hasher,
                        stores["release"],
                        *shape,
                        label="release tiered",
                        threads=threads,
                    )
                    layer = release_hasher.layer_ids[0]
                    report["store_alone"].append(with_disk_rate(run, paths["release"][layer]))
        report["rss_end"] = rss()
        report["load_average_at_end"] = os.getloadavg()  # the machine is shared
    finally:
        for group in stores.values():
            for store in group.values():
                store.close()
    report["targets"] = targets(report)
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, report))
    print(json_text(report, indent=2))  # NaN as null, NumPy scalars as numbers
    print_summary(report)
    say_kept(path for group in paths.values() for path in group.values())
    return 0


def targets(report: dict) -> dict:
    """The issue's targets, each with the measured figure and whether it is met."""
    out = {}
    for phase in ("scaled_prefill", "release_prefill"):
        if phase in report:
            ratio = report[phase]["tiered"]["ratio_median"]
            out[phase] = {"tiered_vs_memory": ratio, "target": PREFILL_TARGET}
            out[phase]["met"] = ratio >= PREFILL_TARGET
    for phase in ("scaled_decode", "release_decode"):
        if phase in report:
            shares = {b: e["tiered"]["stall_share_of_step"] for b, e in report[phase].items()}
            out[phase] = {"stall_share_of_step": shares, "target": STALL_TARGET}
            out[phase]["met"] = all(v <= STALL_TARGET for v in shares.values())
    for run in report.get("store_alone", []):
        if run["tables"] in ("release tiered", "scaled cached"):
            key = f"store_alone {run['tables']} {run['shape']} {run['torch_threads']} thread(s)"
            out[key] = {
                "tokens_per_s": run["tokens_per_s"],
                "target": PAPER_TOKENS_PER_S,
                "met": run["keeps_up_on_this_machine"],
                "cores_for_paper_rate": run["cores_for_paper_rate"],
            }
    return out


def print_summary(report: dict) -> None:
    """The headline figures, one line each."""
    for phase in ("scaled_prefill", "release_prefill"):
        if phase in report:
            r = report[phase]
            base = r["baseline"]
            print(
                f"{phase}: tiered {r['tiered']['tokens_per_s_median']:.1f} tokens/s vs {base} "
                f"{r[base]['tokens_per_s_median']:.1f}: {r['tiered']['ratio_median']:.3f}x "
                f"(mean {r['tiered']['ratio_mean']:.3f} +- {r['tiered']['ratio_stderr']:.3f}), "
                f"stall {r['tiered']['stall_seconds_per_batch']:.3f} s/batch; first batch of a "
                f"round (fetch from its start): {r['tiered']['first_batch']['ratio_median']:.3f}x",
                file=sys.stderr,
            )
    for phase in ("scaled_decode", "release_decode"):
        for size, e in report.get(phase, {}).items():
            t = e["tiered"]
            print(
                f"{phase} batch {size}: step {t['step_ms_median']:.1f} ms, store "
                f"{t['store_ms_median']:.2f} ms, stall {t['stall_ms_median']:.2f} ms "
                f"({t['stall_share_of_step']:.1%} of step time), step speed vs baseline "
                f"{t['step_speed_vs_baseline_median']:.3f}",
                file=sys.stderr,
            )
    for run in report.get("store_alone", []):
        print(
            f"store alone {run['tables']:<15} {run['shape']} {run['torch_threads']} thread(s): "
            f"{run['tokens_per_s']:,.0f} tokens/s, {run['tokens_per_cpu_second']:,.0f} tokens per "
            f"CPU-s, {run['cores_for_paper_rate']:.2f} cores for {PAPER_TOKENS_PER_S:,} tokens/s"
            + (
                f"; cold reads {run['cold_rows_per_s']:,.0f} rows/s = "
                f"{run['cold_rows_per_s_vs_fio']:.2f}x fio QD32 right after"
                if "fio_after" in run
                else ""
            ),
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(run_script(main))

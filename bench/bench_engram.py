"""Engram LM throughput with its tables in memory vs in the tiered store (the headline figure).

One model, one run, the same real-text batches (Python stdlib sources, DeepSeek tokenizer),
prefill-style forward passes (hidden states for every token, logits for the last position), four
ways of serving the Engram tables:

  (a) memory      every table loaded into RAM (``InMemoryTable``): the baseline
  (b) tiered      ``TieredStore`` per layer: hot 5% + warm 20% of the table (so at most 1/4),
                  LRU, cold reads ``io: direct`` (page cache bypassed; ``--io``), every Engram
                  layer's rows prefetched when the batch starts (and ``--lookahead`` batches
                  ahead when a round has several)
  (c) no-prefetch the same store configuration, every lookup fetched synchronously in the forward
  (d) mmap        the table file memory-mapped with no caches (``io: mmap``, zero capacity),
                  prefetched like (b); the OS page cache is dropped for the files at the start

The variants alternate in rounds (each round a fresh batch, variant order rotated), because the
machine is shared and noisy: one batch per variant per round keeps the four measurements of a
round close in time. The report gives the median tokens/s, the median and the mean (+- standard
error) of the per-round ratios against (a), per-tier hit rates, the time spent inside lookups and
the part of it spent waiting for prefetched rows (stall). (b) and (c) start from the same warm
start: their hot and warm tiers preload the rows that are hottest in a profile of *other* text
(hashing only, 2 M tokens), as a store that has served traffic before would hold; one untimed
round comes first. Every round also checks that all four variants' logits are bit-identical.

Sizes default to Engram's regime: the reference Engram configuration (2 orders x 8 heads,
646,400 rows per head, 64-wide rows: 10.3 M rows per layer) at two layers, bfloat16 on disk
(2 x 1.32 GB), against a 1024-wide, 8-layer backbone (~243 M dense parameters, token embedding
included): the tables hold 5.4x the dense parameters.

Example::

    python bench/bench_engram.py --out bench/results/engram.json      # ~8 min on 2 cores

Where the work runs (2 cores here): torch's intra-op threads (2) run the model; each store's
prefetch worker resolves a batch (probe, dedup, admission) and its cold-read pool issues the
O_DIRECT reads meanwhile. On this CPU-only machine they compete for the same cores, so prefetch
hides the read latency but not the store's CPU time (about 0.1 CPU-s per 2,048-token batch for
both layers, measured against ~12 CPU-s of model compute per batch); on a GPU server the model
runs on the device and the store's work uses host cores that are otherwise idle. ``--device
cuda`` measures that: the model, (a)'s tables and the stores' hot tiers on the GPU (rows copied
host-to-device on each store's side stream), the warm tiers in pageable host RAM (rows bound for
the GPU are staged in a pinned buffer per batch).

The default run took 7 minutes on this project's 2 shared cores (both ways, its rounds
alternating); ``--rounds`` and ``--batches-per-round`` scale it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

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
from tiered_store.disk_probe import drop_page_cache
from tiered_store.engram import NgramHasher
from tiered_store.engram.checkpoint import load_table_in_memory, open_tables, random_tables
from tiered_store.engram.corpus import read_tokens, token_batches
from tiered_store.engram.model import EngramLM, ModelConfig
from tiered_store.engram.pipeline import PrefetchPipeline, profile_rows
from tiered_store.versions import machine_info

VARIANTS = ("memory", "tiered", "no_prefetch", "mmap")
TARGET = 0.97  # (b) tokens/s >= 0.97 x (a)


def parse_args(argv=None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument(
        "--dir",
        type=output_folder,
        default="/var/tmp",
        help="where the table files go, in engram-bench-DTYPE/ (a real disk: O_DIRECT needs one); "
        "they stay, reused by the next run with the same sizes",
    )
    p.add_argument("--hidden", type=at_least(1), default=1024, help="backbone width")
    p.add_argument("--layers", type=at_least(1), default=8, help="Transformer layers")
    p.add_argument("--heads", type=at_least(1), default=16, help="attention heads")
    p.add_argument("--hc-mult", type=at_least(1), default=4, help="hyper-connection branches")
    p.add_argument(
        "--engram-layers",
        type=at_least(0),
        nargs="+",
        default=[1, 4],
        help="layers carrying Engram",
    )
    p.add_argument(
        "--engram-vocab",
        type=at_least(2),
        default=646_400,
        help="rows per head before prime rounding",
    )
    p.add_argument(
        "--engram-heads", type=at_least(1), default=8, help="hash heads per n-gram order"
    )
    p.add_argument(
        "--engram-embed", type=at_least(1), default=512, help="embedding width per order"
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["float32", "float16", "bfloat16"],
        help="table rows' dtype",
    )
    p.add_argument("--batch-size", type=at_least(1), default=4, help="sequences per batch")
    p.add_argument("--seq-len", type=at_least(1), default=512, help="tokens per sequence")
    p.add_argument(
        "--rounds", type=at_least(1), default=12, help="measured rounds (plus one untimed)"
    )
    p.add_argument(
        "--batches-per-round",
        type=at_least(1),
        default=1,
        help="batches per variant per round (1: the variants' measurements are closest in time)",
    )
    p.add_argument("--hot", type=capacity, default="5%", help="hot tier capacity per table")
    p.add_argument("--warm", type=capacity, default="20%", help="warm tier capacity per table")
    p.add_argument("--policy", type=policy, default="lru", help="policy of both cache tiers")
    p.add_argument(
        "--io",
        default="direct",
        choices=("direct", "uring", "pread", "mmap"),
        help="cold reads of (b) and (c): direct (default; O_DIRECT, page cache bypassed), uring "
        "(O_DIRECT through io_uring), pread, mmap",
    )
    p.add_argument(
        "--cold-threads",
        type=at_least(1),
        default=8,
        help="cold-tier reader threads per store (io: uring: rings)",
    )
    p.add_argument(
        "--lookahead", type=at_least(0), default=1, help="batches prefetched ahead in (b)"
    )
    p.add_argument(
        "--profile-tokens",
        type=at_least(1),
        default=2_000_000,
        help="tokens of other text for the warm start",
    )
    p.add_argument(
        "--logits", default="last", choices=["last", "all"], help="last: prefill; all: scoring"
    )
    p.add_argument(
        "--torch-threads",
        type=at_least(0, "0 (torch's default) or more threads"),
        default=0,
        help="intra-op threads (0: torch's default)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model runs, (a)'s tables live and the stores' hot tiers are: cpu, cuda, "
        "cuda:N (warm tiers stay in pageable host RAM; on CUDA their rows reach the GPU through a "
        "pinned staging buffer)",
    )
    p.add_argument(
        "--seed",
        type=at_least(0),
        default=0,
        help="seed of the weights and text order (the tables' rows are seeded by layer: a table "
        "kept in --dir is reused)",
    )
    p.add_argument("--out", type=output_file, help="write the JSON report here as well as stdout")
    args = p.parse_args(argv)  # a bad count is refused by its type
    try:
        args.device = compute_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    return args


def compute_device(name: str) -> torch.device:
    """``--device`` as a torch device; ValueError, naming the option, where it does not exist."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name!r}: CUDA is not available here (torch {torch.__version__})"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and device.index is None:  # named as the report gives it
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def model_config(args) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "engram": {
                "engram_vocab_size": [args.engram_vocab, args.engram_vocab],
                "n_head_per_ngram": args.engram_heads,
                "n_embed_per_ngram": args.engram_embed,
                "layer_ids": args.engram_layers,
            },
            "backbone": {
                "hidden_size": args.hidden,
                "hc_mult": args.hc_mult,
                "num_layers": args.layers,
            },
            "transformer": {"num_attention_heads": args.heads},
        }
    )


def store_spec(args) -> dict:
    return {
        "tiers": {
            "hot": {"capacity": args.hot, "policy": args.policy, "device": str(args.device)},
            "warm": {"capacity": args.warm, "policy": args.policy},
            "cold": {"io": args.io, "threads": args.cold_threads},
        },
        "prefetch": {"depth": args.lookahead + 1},
    }


def run_variant(model, name, tables, batches, args) -> tuple[dict, list[torch.Tensor]]:
    """One pass of one variant over a round's batches; returns its measurements and outputs."""
    model.set_tables(tables)
    pipeline = PrefetchPipeline(
        model,
        lookahead=args.lookahead,
        prefetch=name != "no_prefetch",
        logits=args.logits,
    )
    cpu = time.process_time()  # every thread of the process: model, prefetch workers, readers
    outputs = [out for _, out in pipeline.run(batches)]
    cpu = time.process_time() - cpu
    s = pipeline.stats
    tiers = {}
    for tier in ("hot", "warm", "cold"):
        summed: dict[str, float] = {}
        for layer_stats in s.tables.values():
            for key, value in layer_stats[tier].items():
                if key not in ("hit_rate", "occupancy"):
                    summed[key] = summed.get(key, 0) + value
        tiers[tier] = summed
    return {
        "tokens": s.tokens,
        "seconds": s.seconds,
        "tokens_per_s": s.tokens_per_second,
        "cpu_seconds": cpu,
        "forward_seconds": s.forward_seconds,
        "prepare_seconds": s.prepare_seconds,
        "lookup_seconds": s.lookup_seconds,
        "stall_seconds": s.stall_seconds,
        "tiers": tiers,
    }, outputs


def summarize(rounds: list[dict]) -> dict:
    """Medians, ratios against (a), hit rates and stall over the measured rounds."""
    out = {}
    for name in VARIANTS:
        rates = [r[name]["tokens_per_s"] for r in rounds]
        ratios = [r[name]["tokens_per_s"] / r["memory"]["tokens_per_s"] for r in rounds]
        cpu = [r[name]["cpu_seconds"] / r[name]["tokens"] for r in rounds]
        cpu_ratios = [r["memory"]["cpu_seconds"] / r[name]["cpu_seconds"] for r in rounds]
        batches = sum(r[name]["batches"] for r in rounds)
        entry = {
            "tokens_per_s_median": statistics.median(rates),
            "tokens_per_s_rounds": rates,
            "ratio_vs_memory_median": statistics.median(ratios),
            "ratio_vs_memory_mean": statistics.fmean(ratios),
            "ratio_vs_memory_stderr": (
                statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
            ),
            "ratio_vs_memory_total_time": sum(r["memory"]["seconds"] for r in rounds)
            / sum(r[name]["seconds"] for r in rounds),
            "ratio_vs_memory_rounds": ratios,
            # CPU time of the whole process per token ((a)'s / this variant's for the ratio). Less
            # sensitive to other processes than wall time, but it also counts the OpenMP threads'
            # spin-waiting, so it is a rough guide only.
            "cpu_ms_per_token_median": 1e3 * statistics.median(cpu),
            "cpu_ratio_vs_memory_median": statistics.median(cpu_ratios),
            "stall_seconds_per_batch": sum(r[name]["stall_seconds"] for r in rounds) / batches,
            "lookup_seconds_per_batch": sum(r[name]["lookup_seconds"] for r in rounds) / batches,
        }
        hot = {
            k: sum(r[name]["tiers"]["hot"].get(k, 0) for r in rounds) for k in ("lookups", "hits")
        }
        warm = {
            k: sum(r[name]["tiers"]["warm"].get(k, 0) for r in rounds) for k in ("lookups", "hits")
        }
        cold_rows = sum(r[name]["tiers"]["cold"].get("rows_read", 0) for r in rounds)
        if hot["lookups"]:
            entry["hit_rate"] = {
                "hot": hot["hits"] / hot["lookups"],
                "warm": warm["hits"] / warm["lookups"] if warm["lookups"] else 0.0,
                "cached": (hot["hits"] + warm["hits"]) / hot["lookups"],
                "cold_rows_per_batch": cold_rows / batches,
                "cold_share_of_lookups": cold_rows / hot["lookups"],
            }
        out[name] = entry
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    config = model_config(args)
    hasher = NgramHasher(config.engram)
    t0 = time.perf_counter()
    make_folder(args.dir, "--dir")
    paths = random_tables(
        args.dir / f"engram-bench-{args.dtype}",
        hasher,
        dtype=args.dtype,
        log=lambda m: print(m, file=sys.stderr),
    )
    drop_page_cache(paths.values())
    print("loading the tables into memory for (a) ...", file=sys.stderr)
    memory = {layer: load_table_in_memory(p).to(args.device) for layer, p in paths.items()}
    model = EngramLM(config, hasher=hasher, tables=memory).eval().to(args.device)
    dense = model.dense_parameters()
    table_params = model.table_parameters()
    table_bytes = {layer: p.stat().st_size for layer, p in paths.items()}
    drop_page_cache(paths.values())  # loading (a) read them through the page cache

    per_batch = args.batch_size * args.seq_len
    measured = (args.rounds + 1) * args.batches_per_round * per_batch
    profiled = -(-args.profile_tokens // per_batch) * per_batch
    print(f"tokenising {profiled + measured:,} tokens ...", file=sys.stderr)
    corpus = resolve_corpus().shuffled(args.seed)
    tokens = read_tokens(corpus, hasher.tokenizer, max_tokens=profiled + measured)
    batches = token_batches(tokens[profiled:], args.batch_size, args.seq_len)
    print("profiling the warm start ...", file=sys.stderr)
    hottest = profile_rows(model, token_batches(tokens[:profiled], args.batch_size, args.seq_len))

    spec = store_spec(args)
    mmap_spec = {
        "tiers": {
            "hot": {"device": str(args.device)},  # no capacity: where its rows are returned
            "cold": {"io": "mmap", "threads": args.cold_threads},
        },
        "prefetch": spec["prefetch"],
    }
    print("opening the stores (warm start) ...", file=sys.stderr)
    tables = {
        "memory": memory,
        "tiered": open_tables(paths, hasher, spec, warm_start=hottest),
        "no_prefetch": open_tables(paths, hasher, spec, warm_start=hottest),
        "mmap": open_tables(paths, hasher, mmap_spec),
    }
    store = next(iter(tables["tiered"].values()))
    capacity = {
        "hot_rows": store.hot.capacity,
        "warm_rows": store.warm.capacity,
        "rows": store.rows,
    }
    setup_seconds = time.perf_counter() - t0
    rounds, identical = [], True
    try:
        for r in range(args.rounds + 1):
            group = batches[r * args.batches_per_round : (r + 1) * args.batches_per_round]
            order = VARIANTS[r % 4 :] + VARIANTS[: r % 4]
            results, outputs = {}, {}
            for name in order:
                results[name], outputs[name] = run_variant(model, name, tables[name], group, args)
                results[name]["batches"] = len(group)
                print(
                    f"round {r}{' (untimed)' if r == 0 else ''} {name:<12} "
                    f"{results[name]['tokens_per_s']:8.1f} tokens/s  "
                    f"stall {results[name]['stall_seconds']:.3f} s",
                    file=sys.stderr,
                )
            identical &= all(
                torch.equal(a, b)
                for name in VARIANTS[1:]
                for a, b in zip(outputs["memory"], outputs[name], strict=True)
            )
            if r:
                rounds.append(results)
    finally:
        for name in VARIANTS[1:]:
            for s in tables[name].values():
                s.close()

    summary = summarize(rounds)
    report = {
        "benchmark": "engram_lm_throughput",
        "command": public_command("bench/bench_engram.py", sys.argv[1:] if argv is None else argv),
        "machine": machine_info(args.device),
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "attention_heads": args.heads,
            "hc_mult": args.hc_mult,
            "engram_layers": args.engram_layers,
            "dense_parameters": dense,
            "table_parameters": table_params,
            "table_to_dense": table_params / dense,
            "table_bytes_on_disk": table_bytes,
            "table_bytes_total": sum(table_bytes.values()),
            "table_dtype": args.dtype,
            "table_rows_per_layer": {layer: hasher.table_rows(layer) for layer in paths},
            "row_lookups_per_token": len(paths) * config.engram.num_heads,
        },
        "workload": {
            "batch": [args.batch_size, args.seq_len],
            "logits": args.logits,
            "rounds": args.rounds,
            "batches_per_round": args.batches_per_round,
            "profile_tokens": profiled,
            "corpus": corpus.description,
        },
        "store": {
            **spec,
            "capacity_per_table": capacity,
            "cache_fraction": (capacity["hot_rows"] + capacity["warm_rows"]) / capacity["rows"],
        },
        "setup_seconds": setup_seconds,
        "bit_identical_outputs": identical,
        "results": summary,
        "target": {
            "tiered_vs_memory": TARGET,
            "met": summary["tiered"]["ratio_vs_memory_median"] >= TARGET,
        },
        "rounds": rounds,
    }
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, report))
    print(json_text(report, indent=2))
    print_table(report, file=sys.stderr)
    say_kept(paths.values())
    return 0


def print_table(report: dict, file=sys.stderr) -> None:
    """The headline table, paper style."""
    res, m = report["results"], report["model"]
    print(
        f"\nEngram LM {m['layers']}x{m['hidden']} (hc {m['hc_mult']}), Engram at "
        f"{m['engram_layers']}: {m['dense_parameters'] / 1e6:.0f}M dense, tables "
        f"{m['table_parameters'] / 1e9:.2f}B ({m['table_to_dense']:.1f}x), "
        f"{m['table_bytes_total'] / 2**30:.2f} GiB on disk; medians of "
        f"{report['workload']['rounds']} rounds",
        file=file,
    )
    print(
        f"{'variant':<16}{'tokens/s':>9}{'vs (a)':>8}{'mean +- s.e.':>15}{'lookup s':>10}"
        f"{'stall s':>9}{'hot':>7}{'warm':>7}{'cold':>7}",
        file=file,
    )
    for label, name in zip("abcd", VARIANTS, strict=True):
        r = res[name]
        h = r.get("hit_rate")
        if h:  # a table that keeps statistics (the tiered store)
            waits = f"{r['lookup_seconds_per_batch']:>10.3f}{r['stall_seconds_per_batch']:>9.3f}"
            rates = f"{h['hot']:>7.1%}{h['warm']:>7.1%}{h['cold_share_of_lookups']:>7.1%}"
        else:
            waits, rates = f"{'-':>10}{'-':>9}", f"{'-':>7}{'-':>7}{'-':>7}"
        print(
            f"({label}) {name:<12}{r['tokens_per_s_median']:>9.1f}"
            f"{r['ratio_vs_memory_median']:>8.3f}"
            f"{r['ratio_vs_memory_mean']:>9.3f} +-{r['ratio_vs_memory_stderr']:.3f}"
            f"{waits}{rates}",
            file=file,
        )
    print(
        "(tokens/s: median over rounds; vs (a): median of per-round ratios, then their mean "
        "+- standard error; lookup / stall: seconds per batch inside table lookups / waiting for "
        "prefetched rows; hot, warm: hit rates of row lookups; cold: rows read from the table "
        "file per row lookup)",
        file=file,
    )
    t = report["target"]
    print(
        f"target (b) >= {t['tiered_vs_memory']} x (a): {'met' if t['met'] else 'NOT met'}; "
        f"bit-identical outputs: {report['bit_identical_outputs']}",
        file=file,
    )


if __name__ == "__main__":
    sys.exit(run_script(main))

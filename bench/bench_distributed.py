"""Sharded lookups across ranks: measured here (gloo over loopback), and modelled at 8-64 ranks.

Part 1, measured. One Engram layer's table (2 orders x 8 heads, ``--engram-vocab`` rows per head
before prime rounding, 64-wide bfloat16 rows) and the row ids of real text (Python stdlib
sources, or ``--corpus``; DeepSeek tokenizer, the project's hasher): at least ``(--rounds + 2)
x --tokens`` per rank of the largest world, else it is refused before the ranks start. At 1, 2 and 4 ranks (spawned processes, gloo
on loopback), every rank looks up its own batch of ``--tokens`` tokens (x 16 heads) per round
through a ``ShardedStore`` sharded by heads and by rows, and through a ``TieredStore`` over the
whole table on the same rank (the baseline: no exchange), in rotated order, on the same ids, in
the same round. Reported: ids looked up per second over the group (the round's time is its
slowest rank's), bytes exchanged between ranks per round, the dedup ratio, and the sharded
lookup's time over the local lookup's (median of the per-round, per-rank ratios).

Part 2, a model driven by the same real text. For R ranks (8 per node) and a step of
``--model-tokens`` tokens per rank, the row ids of R such steps are hashed with the reference
Engram layout (646,400 rows per head), deduplicated per rank and routed with the real shard map
of each mode; from the per-(rank, rank) counts it gives the bytes each rank and each node sends,
the exchange time on the stated network (``--node-gbps`` per node between nodes,
``--nvlink-gbyteps`` per GPU inside a node, ``--latency-us`` per collective round, 4 rounds) and
the load imbalance (most rows any rank serves over the mean), and the busiest rank's shard lookup
(which sits between the ids round and the rows round) with the replay cost model
(``cost_model`` defaults: an H200-class GPU, PCIe 5, a datacentre NVMe) at the hot and warm hit
rates the shards reached in part 1. Stall per step is exchange plus that lookup, less
``--overlap-ms`` of compute it can hide behind (prefetch); 0 by default: fully exposed.

Example::

    python bench/bench_distributed.py --out bench/results/distributed.json   # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from tiered_store.atomic_file import json_text, write_json
from tiered_store.capacity import resolve_capacity
from tiered_store.cli_args import (
    at_least,
    capacity,
    doc_parser,
    make_folder,
    output_file,
    output_folder,
    public_command,
    run_script,
    wrote,
)
from tiered_store.config import CostModelConfig
from tiered_store.corpus import Corpus, CorpusError, resolve_corpus
from tiered_store.distributed import ShardedStore, plan_shards, write_shards
from tiered_store.engram.checkpoint import table_metadata
from tiered_store.engram.config import EngramConfig
from tiered_store.engram.corpus import read_tokens
from tiered_store.engram.hashing import NgramHasher
from tiered_store.errors import ConfigError
from tiered_store.store import TieredStore
from tiered_store.table_format import RandomSource, TableManifest, create_table
from tiered_store.versions import machine_info
from zipf_analysis.replay import batch_fetch_seconds

LAYER = 1
SEQ_LEN = 512
ROW_BYTES = 128  # the measured table's rows: 64 x bfloat16


def parse_args(argv=None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument(
        "--dir",
        type=output_folder,
        help="where the table, its shards and the id batches go, and stay (default: a temporary "
        "folder, removed at the end)",
    )
    p.add_argument(
        "--engram-vocab", type=at_least(2), default=32_000, help="measured: rows per head"
    )
    p.add_argument(
        "--engram-heads", type=at_least(1), default=8, help="hash heads per n-gram order"
    )
    p.add_argument(
        "--ranks", type=at_least(1), nargs="+", default=[1, 2, 4], help="measured world sizes"
    )
    p.add_argument(
        "--tokens", type=at_least(1), default=2048, help="measured: tokens per rank per round"
    )
    p.add_argument(
        "--rounds", type=at_least(1), default=12, help="measured rounds (plus 2 untimed)"
    )
    p.add_argument(
        "--hot",
        type=capacity,
        default="5%",
        help="hot tier capacity (of the shard, or the table): rows, bytes or a percentage",
    )
    p.add_argument("--warm", type=capacity, default="20%", help="warm tier capacity")
    p.add_argument(
        "--model-ranks",
        type=at_least(1),
        nargs="+",
        default=[8, 16, 24, 32, 48, 64],
        help="modelled: world sizes (ranks, one GPU each)",
    )
    p.add_argument(
        "--model-tokens",
        type=at_least(1),
        nargs="+",
        default=[256, 8192],
        help="tokens per rank per step",
    )
    p.add_argument("--model-vocab", type=at_least(2), default=646_400, help="model: rows per head")
    p.add_argument(
        "--row-bytes", type=at_least(1), default=128, help="model: bytes per row (64 x bf16)"
    )
    p.add_argument(
        "--gpus-per-node", type=at_least(1), default=8, help="modelled: ranks sharing NVLink"
    )
    p.add_argument("--node-gbps", type=float, default=400.0, help="network per node, Gb/s")
    p.add_argument("--nvlink-gbyteps", type=float, default=450.0, help="per GPU in a node, GB/s")
    p.add_argument(
        "--latency-us",
        type=float,
        default=15.0,
        help="per collective round (a lookup has 4: counts, ids, status, rows)",
    )
    p.add_argument("--overlap-ms", type=float, default=0.0, help="compute prefetch hides behind")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the table and the ids")
    p.add_argument(
        "--corpus", nargs="+", metavar="PATH", help="the text (default: the stdlib's sources)"
    )
    p.add_argument("--out", type=output_file, help="write the JSON report here as well as stdout")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, a value that would end in a traceback or a meaningless figure,
    naming the option, the value and what is expected; the world sizes sorted, each once."""
    for option, value, low in (
        ("--node-gbps", args.node_gbps, None),
        ("--nvlink-gbyteps", args.nvlink_gbyteps, None),
        ("--latency-us", args.latency_us, 0.0),
        ("--overlap-ms", args.overlap_ms, 0.0),
    ):
        ok = math.isfinite(value) and (value > 0 if low is None else value >= low)
        if not ok:
            p.error(f"{option} {value:g}: expected a number {'> 0' if low is None else '>= 0'}")
    args.ranks = sorted(set(args.ranks))  # the largest world last: its shards' hit rates
    args.model_ranks = sorted(set(args.model_ranks))
    args.model_tokens = sorted(set(args.model_tokens))
    measured = layout_manifest(hasher_for(args.engram_vocab, args.engram_heads))
    model = layout_manifest(hasher_for(args.model_vocab, args.engram_heads))
    smallest = measured.rows  # the fewest rows a store of the measured part opens: table or shard
    for option, vocab, manifest, worlds in (
        ("--engram-vocab", args.engram_vocab, measured, args.ranks),
        ("--model-vocab", args.model_vocab, model, args.model_ranks),
    ):
        for world in worlds:
            for by in ("heads", "rows"):
                try:
                    bounds = plan_shards(manifest, world, by).bounds
                except ConfigError as exc:
                    p.error(f"{option} {vocab}: too few rows for {world} ranks by {by} ({exc})")
                if manifest is measured:
                    smallest = min(
                        smallest, *(b - a for a, b in zip(bounds, bounds[1:], strict=False))
                    )
    for option, spec in (("--hot", args.hot), ("--warm", args.warm)):
        try:
            resolve_capacity(spec, table_rows=smallest, row_bytes=ROW_BYTES, key=option)
        except ConfigError as exc:
            shard = f"the smallest measured has {smallest:,} rows"
            p.error(f"{exc} (a tier's capacity is of each shard: {shard})")
    try:  # not once the tokens are read; resolved once: what was checked is read
        args.texts = resolve_corpus(args.corpus)
    except CorpusError as exc:
        p.error(f"--corpus {' '.join(args.corpus or ['(default)'])}: {exc}")
    if args.dir is not None:  # the user's folder, made here: last, once every value is good
        make_folder(args.dir, "--dir")


def layout_manifest(hasher: NgramHasher) -> TableManifest:
    """The manifest of layer ``LAYER``'s table as ``hasher`` lays it out (no file: what shard
    maps are planned from, the rows and the heads)."""
    return TableManifest(
        rows=hasher.table_rows(LAYER),
        dim=hasher.config.head_dim,
        dtype="bfloat16",
        row_bytes=ROW_BYTES,
        data_offset=0,
        block_bytes=4096,
        block_checksums=(),
        metadata=table_metadata(hasher, LAYER),
    )


def hasher_for(vocab: int, heads: int) -> NgramHasher:
    """The Engram layout: 2..3-grams, ``heads`` heads each, 64-wide rows, one layer."""
    return NgramHasher(
        EngramConfig(
            engram_vocab_size=(vocab, vocab),
            n_head_per_ngram=heads,
            n_embed_per_ngram=64 * heads,
            layer_ids=(LAYER,),
            max_ngram_size=3,
        )
    )


def row_ids(hasher: NgramHasher, tokens: np.ndarray) -> np.ndarray:
    """Row ids of every token of ``tokens`` (hashed as sequences of SEQ_LEN), int64 [N, H]."""
    n = len(tokens) // SEQ_LEN * SEQ_LEN
    ids = hasher.row_ids_layer(torch.from_numpy(tokens[:n]).view(-1, SEQ_LEN), LAYER)
    return ids.reshape(n, -1).numpy()


# -- part 1: measured ---------------------------------------------------------------------------------
def store_config(table: Path, world: int, by: str | None, args) -> dict:
    cfg = {
        "table": {"path": str(table)},
        "tiers": {
            "hot": {"capacity": args.hot},
            "warm": {"capacity": args.warm},
            "cold": {"io": "pread", "threads": 2},
        },
    }
    if by is not None:
        cfg["sharding"] = {
            "ranks": world,
            "by": by,
            "shards": str(table.with_name(f"{table.stem}.{by}.{{rank}}-of-{{ranks}}.npy")),
            "timeout_s": 120,
        }
    return cfg


def measure_worker(rank, world, port, table, ids_path, modes, args, out) -> None:
    """One rank: rounds of (local, sharded by each mode) lookups on this rank's batches."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    batches = np.load(ids_path, mmap_mode="r")
    stores = {"local": TieredStore.open(store_config(table, world, None, args))}
    for by in modes:
        stores[by] = ShardedStore.open(store_config(table, world, by, args))
    names = list(stores)
    times = {name: [] for name in names}
    sent = {name: [] for name in names if name != "local"}
    for round_ in range(args.rounds + 2):
        ids = torch.from_numpy(np.array(batches[round_ * world + rank]))
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            store = stores[name]
            before = store.stats()["exchange"]["bytes_sent"] if name != "local" else 0
            dist.barrier()  # every rank starts the variant together
            start = time.perf_counter()
            store.lookup(ids)
            seconds = time.perf_counter() - start
            if round_ >= 2:
                times[name].append(seconds)
                if name != "local":
                    sent[name].append(store.stats()["exchange"]["bytes_sent"] - before)
    report = {"times": times, "bytes_sent": sent, "ids_per_round": int(batches.shape[1])}
    report["stats"] = {name: store.stats() for name, store in stores.items()}
    for store in stores.values():
        store.close()
    dist.destroy_process_group()
    write_json(Path(out) / f"rank{rank}.json", report)


def run_world(world: int, table: Path, ids_path: Path, args, work: Path) -> dict:
    """Spawn ``world`` ranks, collect their reports, summarise the world size."""
    modes = ["rows"] if world == 1 else ["heads", "rows"]
    for by in modes:
        template = store_config(table, world, by, args)["sharding"]["shards"]
        write_shards(table, world, by, template=template, progress=False, overwrite=True)
    out = work / f"world{world}"
    out.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = mp.start_processes(
        measure_worker,
        args=(world, port, table, ids_path, modes, args, out),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    try:
        while not ranks.join():
            pass
    except BaseException:  # Ctrl-C or SIGTERM: the ranks stop too, before the work folder goes
        for rank in ranks.processes:
            rank.terminate()
        for rank in ranks.processes:
            rank.join(10)
        raise
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    result = {"world": world}
    local_step = [max(r["times"]["local"][i] for r in ranks) for i in range(args.rounds)]
    ids_per_round = world * ranks[0]["ids_per_round"]
    result["local"] = {"ids_per_s": ids_per_round / statistics.median(local_step)}
    for by in modes:
        step = [max(r["times"][by][i] for r in ranks) for i in range(args.rounds)]
        ratios = [
            r["times"][by][i] / r["times"]["local"][i] for r in ranks for i in range(args.rounds)
        ]
        exchange = [r["stats"][by]["exchange"] for r in ranks]
        hot = [r["stats"][by]["hot"] for r in ranks]
        warm = [r["stats"][by]["warm"] for r in ranks]
        result[by] = {
            "ids_per_s": ids_per_round / statistics.median(step),
            "median_step_ms": 1e3 * statistics.median(step),
            "bytes_exchanged_per_round": statistics.median(
                [sum(r["bytes_sent"][by][i] for r in ranks) for i in range(args.rounds)]
            ),
            "unique_over_ids": sum(e["unique_ids"] for e in exchange)
            / sum(e["ids"] for e in exchange),
            "time_over_local_median": statistics.median(ratios),
            "hot_hit_rate": sum(h["hits"] for h in hot) / max(sum(h["lookups"] for h in hot), 1),
            "warm_hit_rate": sum(w["hits"] for w in warm) / max(sum(w["lookups"] for w in warm), 1),
        }
    return result


# -- part 2: the model ----------------------------------------------------------------------------------
def model_step(ids_by_rank: list[np.ndarray], owner_of, ranks: int, args) -> dict:
    """Exchange of one step from each rank's row ids: bytes, time on the network, imbalance."""
    counts = np.zeros((ranks, ranks), dtype=np.int64)  # [asking rank, owning rank] unique ids
    total = unique = 0
    for r, ids in enumerate(ids_by_rank):
        flat = np.unique(ids)
        total, unique = total + ids.size, unique + flat.size
        counts[r] = np.bincount(owner_of(flat), minlength=ranks)
    remote = counts.copy()
    np.fill_diagonal(remote, 0)
    row_b, id_b = args.row_bytes, 8
    sent = id_b * remote.sum(1) + row_b * remote.sum(0)  # ids asked + rows served, per rank
    node = np.arange(ranks) // args.gpus_per_node
    node_bytes = []  # per node: the larger of the bytes leaving and entering it
    for n in range(node.max() + 1):
        inside = node == n
        asked_out = remote[inside][:, ~inside].sum()  # ids this node asks others for
        asked_in = remote[~inside][:, inside].sum()  # ids others ask this node for
        out = id_b * asked_out + row_b * asked_in
        into = id_b * asked_in + row_b * asked_out
        node_bytes.append(max(out, into))
    node_out = np.array(node_bytes)
    intra = np.where(node[:, None] == node[None, :], remote, 0)
    gpu_intra = np.maximum(
        id_b * intra.sum(1) + row_b * intra.sum(0), id_b * intra.sum(0) + row_b * intra.sum(1)
    )
    inter_s = node_out.max() / (args.node_gbps / 8 * 1e9)
    intra_s = gpu_intra.max() / (args.nvlink_gbyteps * 1e9)
    # four rounds: counts, ids, every shard's status (ShardedStore._check_served), rows
    exchange_s = 4 * args.latency_us * 1e-6 + max(inter_s, intra_s)
    served = counts.sum(0)
    busiest = int(served.max())  # its shard lookup sits between the ids and the rows rounds
    hot, warm = args.hot_hit_rate, args.warm_hit_rate
    serve_s = batch_fetch_seconds(
        CostModelConfig(),
        row_b,
        hot_hits=round(hot * busiest),
        warm_rows=round((1 - hot) * busiest),
        device_rows=round((1 - hot) * busiest),
        cold_rows=round((1 - hot) * (1 - warm) * busiest),
    )
    return {
        "unique_over_ids": unique / total,
        "bytes_per_rank": float(sent.mean()),
        "bytes_per_node_max": float(node_out.max()),
        "exchange_ms": 1e3 * exchange_s,
        "busiest_shard_lookup_ms": 1e3 * serve_s,
        "stall_ms": max(0.0, 1e3 * (exchange_s + serve_s) - args.overlap_ms),
        "imbalance": float(served.max() / served.mean()),
    }


def run_model(ids: np.ndarray, manifest, args) -> list[dict]:
    """Every (ranks, tokens per rank, mode) of the model, from the real-text row ids."""
    rng = np.random.default_rng(args.seed)
    rows = []
    for tokens in args.model_tokens:
        for ranks in args.model_ranks:
            if ranks * tokens > len(ids):
                continue
            if tokens >= SEQ_LEN:  # prefill/training: contiguous text per rank
                steps = [ids[r * tokens : (r + 1) * tokens] for r in range(ranks)]
            else:  # decode: one token of each of `tokens` different sequences
                picks = rng.choice(len(ids), size=(ranks, tokens), replace=False)
                steps = [ids[p] for p in picks]
            for by in ("heads", "rows"):
                smap = plan_shards(manifest, ranks, by)
                bounds = torch.tensor(smap.bounds[1:-1])

                def owner_of(flat, bounds=bounds):
                    return torch.searchsorted(bounds, torch.from_numpy(flat), right=True).numpy()

                rows.append(
                    {"ranks": ranks, "tokens": tokens, "by": by}
                    | model_step(steps, owner_of, ranks, args)
                )
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.dir is None:  # scratch: removed at the end, failed or not
        scratch = tempfile.TemporaryDirectory(prefix="bench-distributed-")
    else:  # the user's (made by check_args): what is written there stays
        scratch = contextlib.nullcontext(args.dir)
    with scratch as work:
        report = run(args, Path(work))
    report["command"] = public_command(
        "bench/bench_distributed.py", sys.argv[1:] if argv is None else argv
    )
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, report, indent=1))
    print(json_text(report, indent=1))
    print_table(report)
    return 0


def check_tokens(have: int, read: int, corpus: Corpus, args: argparse.Namespace) -> None:
    """Refuse a corpus too short for the measured rounds (each rank looks up a batch of
    ``--tokens`` per round): the ranks would fail on a batch past the last."""
    need = (args.rounds + 2) * max(args.ranks) * args.tokens
    if have < need:
        source = f"--corpus {' '.join(args.corpus)}" if args.corpus else corpus.description
        raise ConfigError(
            f"{have:,} tokens in whole sequences of {SEQ_LEN} ({read:,} read) of {source}; "
            f"expected at least --tokens {args.tokens} x (--rounds {args.rounds} + 2) x "
            f"{max(args.ranks)} rank(s): {need:,} tokens (each rank looks up a batch of --tokens "
            "per round, the first 2 untimed); give more text or fewer tokens, rounds or ranks"
        )


def run(args: argparse.Namespace, work: Path) -> dict:
    """Both parts, their files in ``work``: the report (all but the command)."""
    t0 = time.perf_counter()
    hasher = hasher_for(args.engram_vocab, args.engram_heads)
    model_hasher = hasher_for(args.model_vocab, args.engram_heads)
    need = max(
        (args.rounds + 2) * max(args.ranks) * args.tokens,
        max(r * t for r in args.model_ranks for t in args.model_tokens),
    )
    need = -(-need // SEQ_LEN) * SEQ_LEN
    print(f"tokenising {need:,} tokens of real text ...", file=sys.stderr)
    corpus = args.texts.shuffled(args.seed)
    tokens = read_tokens(corpus, hasher.tokenizer, max_tokens=need)
    ids = row_ids(hasher, tokens)
    check_tokens(len(ids), len(tokens), corpus, args)  # before the table and the ranks
    table = work / "engram_layer1.npy"
    rows, dim = hasher.table_rows(LAYER), hasher.config.head_dim
    print(f"creating {table} ({rows:,} x {dim} bfloat16) ...", file=sys.stderr)
    create_table(
        table,
        RandomSource(rows, dim, dtype="bfloat16", seed=args.seed),
        metadata=table_metadata(hasher, LAYER),
        overwrite=True,
        progress=False,
    )
    ids_path = work / "batches.npy"
    batches = len(ids) // args.tokens
    np.save(ids_path, ids[: batches * args.tokens].reshape(batches, -1))
    measured = []
    for world in args.ranks:  # sorted: the largest last
        print(f"measuring {world} rank(s) ...", file=sys.stderr)
        measured.append(run_world(world, table, ids_path, args, work))
    print(f"modelling {', '.join(map(str, args.model_ranks))} ranks ...", file=sys.stderr)
    largest = measured[-1].get("heads") or measured[-1]["rows"]  # the shards' hit rates, this run
    args.hot_hit_rate, args.warm_hit_rate = largest["hot_hit_rate"], largest["warm_hit_rate"]
    modelled = run_model(row_ids(model_hasher, tokens), layout_manifest(model_hasher), args)
    return {
        "benchmark": "bench_distributed",
        "command": None,  # main's: the command line without machine paths
        "machine": machine_info(),
        "measured_table": {"rows": rows, "dim": dim, "heads": hasher.num_heads},
        "measured": measured,
        "model_layout": {
            "rows": model_hasher.table_rows(LAYER),
            "heads": model_hasher.num_heads,
            "row_bytes": args.row_bytes,
        },
        "shard_hit_rates": {"hot": args.hot_hit_rate, "warm": args.warm_hit_rate},
        "cost_model": CostModelConfig().model_dump(),
        "network": {
            "node_gbps": args.node_gbps,
            "nvlink_gbyteps": args.nvlink_gbyteps,
            "gpus_per_node": args.gpus_per_node,
            "latency_us": args.latency_us,
            "overlap_ms": args.overlap_ms,
        },
        "model": modelled,
        "seconds": time.perf_counter() - t0,
    }


def print_table(report: dict, file=sys.stderr) -> None:
    print("\nmeasured (gloo, loopback)", file=file)
    for m in report["measured"]:
        for by in ("heads", "rows"):
            if by in m:
                r = m[by]
                print(
                    f"  {m['world']} rank(s) by {by:5s}: {r['ids_per_s']:>12,.0f} ids/s "
                    f"(local {m['local']['ids_per_s']:,.0f}), "
                    f"{r['bytes_exchanged_per_round'] / 1e6:.2f} MB/round, "
                    f"x{r['time_over_local_median']:.2f} local time",
                    file=file,
                )
    print("\nmodel", file=file)
    for row in report["model"]:
        print(
            f"  R={row['ranks']:3d} tokens={row['tokens']:5d} {row['by']:5s}: "
            f"{row['bytes_per_rank'] / 1e6:8.2f} MB/rank, exchange {row['exchange_ms']:7.3f} ms, "
            f"stall {row['stall_ms']:7.3f} ms, imbalance {row['imbalance']:.3f}",
            file=file,
        )


if __name__ == "__main__":
    sys.exit(run_script(main))

"""Throughput of ``NgramHasher.hash``: token positions per second, NumPy and torch input.

Prints one JSON object. The default config is the reference default (``EngramConfig()``, the same
as the golden ``engram_default.json``: orders 2..3, 8 heads per order, layers 1 and 15).

    python bench/bench_hasher.py --batch 16 --seq 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tiered_store.engram import CompressedTokenizer, EngramConfig, NgramHasher, load_engram_config


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print (and return) the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; best is kept")
    parser.add_argument("--config", help="Engram config YAML/JSON (default: reference default)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="torch device for the torch input")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.config:
        config, _ = load_engram_config(args.config, ignore_unknown=True)
    else:
        config = EngramConfig()
    start = time.perf_counter()
    tokenizer = CompressedTokenizer()
    hasher = NgramHasher(config, tokenizer)
    setup_s = time.perf_counter() - start

    rng = np.random.default_rng(args.seed)
    ids_np = rng.integers(0, tokenizer.vocab_size, size=(args.batch, args.seq), dtype=np.int64)
    ids_t = torch.from_numpy(ids_np).to(args.device)
    positions = args.batch * args.seq
    layers = len(config.layer_ids)

    def sync() -> None:
        if ids_t.device.type == "cuda":
            torch.cuda.synchronize()

    report: dict[str, Any] = {
        "config": config.to_dict(),
        "batch": args.batch,
        "seq": args.seq,
        "heads_per_layer": config.num_heads,
        "setup_seconds": round(setup_s, 4),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    for name, ids in (("numpy", ids_np), ("torch", ids_t)):
        seconds = _best_seconds(lambda ids=ids: (hasher.hash(ids), sync()), args.repeats)
        compress_s = _best_seconds(lambda ids=ids: (tokenizer.compress(ids), sync()), args.repeats)
        per_layer = {
            str(layer): round(
                positions
                / _best_seconds(
                    lambda ids=ids, layer=layer: (hasher.hash_layer(ids, layer), sync()),
                    args.repeats,
                )
            )
            for layer in config.layer_ids
        }
        report[name] = {
            "hash_all_layers_seconds": round(seconds, 5),
            "positions_per_second_all_layers": round(positions / seconds),
            "positions_per_second_per_layer": round(positions * layers / seconds),
            "hash_layer_positions_per_second": per_layer,
            "compress_positions_per_second": round(positions / compress_s),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

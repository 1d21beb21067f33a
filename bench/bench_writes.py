"""The write path: training through the store, commit throughput, recovery after kill -9, and the
read path of tables that were never written, each as a ratio against a baseline in the same run.

- ``training``: an EngramLM trained with its Engram tables (row-wise Adagrad) in a ``TieredStore``
  (hot 5% + warm 20% = 25% of the table, ``io: direct``, a commit every ``--commit-every`` steps)
  against the same model with the same tables and optimizer arithmetic in memory (a tensor of
  rows indexed directly); rounds alternate, tokens/s ratio per round, median reported.
- ``commit``: ``TieredStore.commit()`` of ``--dirty`` written rows (collect, CRC32C, one LMDB
  write transaction, fsync) against LMDB's own ``putmulti`` of the same keys and values (already
  encoded) into an environment with the same flags; dirty rows/s, ratio per round, median.
- ``recovery``: a writer process committing batches is killed with SIGKILL; the time to reopen
  the store and serve a lookup, by table size (the delta holds 10% of the rows).
- ``readpath``: all-hit (hot tier holds the table) and cold-miss (no cache tiers, ``io: pread``)
  lookups of a table without a delta, this tree's code against ``--baseline-root`` (a checkout of
  main), in alternating subprocesses; per-lookup time ratio (this / main), median of rounds.

Example::

    TIERED_STORE_BENCH_TORCH_THREADS=1 python bench/bench_writes.py \\
        --baseline-root /path/to/main --out bench/results/writes.json   # ~10 min
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import lmdb
import numpy as np
import torch

from tiered_store import TieredStore
from tiered_store.atomic_file import json_text, write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_dir,
    given_path,
    output_file,
    run_script,
    wrote,
)
from tiered_store.corpus import CorpusError, resolve_corpus
from tiered_store.delta.row_delta import HEADER_BYTES
from tiered_store.delta.row_optimizers import make_row_optimizer
from tiered_store.delta.trainable import TableSlice, TrainableTable, create_trainable_table
from tiered_store.engram.config import ModelConfig
from tiered_store.engram.corpus import read_tokens, token_batches
from tiered_store.engram.model import EngramLM
from tiered_store.store import UncommittedWritesWarning
from tiered_store.table_format import RandomSource, create_table
from tiered_store.versions import machine_info

MODEL = {
    "engram": {
        "engram_vocab_size": [100000, 100000],
        "n_embed_per_ngram": 128,
        "n_head_per_ngram": 4,
        "layer_ids": [1, 3],
    },
    "backbone": {"hidden_size": 128, "hc_mult": 2, "num_layers": 4},
    "transformer": {"num_attention_heads": 4},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = doc_parser(__doc__)
    p.add_argument(
        "--dir",
        type=existing_dir,
        help="where the temporary directory of the tables goes (deleted at the end; default: "
        "the system's temporary directory)",
    )
    p.add_argument("--only", default="training,commit,recovery,readpath", help="sections")
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="the training section's text (default: the stdlib's sources)",
    )
    p.add_argument(
        "--rounds",
        type=at_least(1, "at least 1 (rounds)"),
        default=4,
        help="alternating rounds per section",
    )
    p.add_argument(
        "--steps",
        type=at_least(1, "at least 1 (steps)"),
        default=6,
        help="training steps per variant per round",
    )
    p.add_argument(
        "--batch-size",
        type=at_least(1, "at least 1 (sequences)"),
        default=4,
        help="training sequences per step",
    )
    p.add_argument(
        "--seq-len",
        type=at_least(1, "at least 1 (tokens)"),
        default=128,
        help="tokens per training sequence",
    )
    p.add_argument(
        "--commit-every",
        type=at_least(1, "at least 1 (steps)"),
        default=3,
        help="training steps per commit",
    )
    p.add_argument(
        "--dirty",
        type=at_least(1, "at least 1 (rows)"),
        default=100_000,
        help="rows per commit (commit section)",
    )
    p.add_argument("--recovery-rows", default="100000,1000000,4000000", help="table sizes")
    p.add_argument("--baseline-root", type=given_path, help="a checkout of main (readpath section)")
    p.add_argument("--out", type=output_file, help="write the results here (JSON)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


SECTIONS = ("training", "commit", "recovery", "readpath")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option value the benchmark cannot use, naming it, before any work (the counts
    are refused by their types): exit 2 with the usage."""
    unknown = [name for name in args.only.split(",") if name not in SECTIONS]
    if unknown or not args.only:
        p.error(
            f"--only {args.only!r}: unknown: {', '.join(unknown)}; expected some of "
            f"{','.join(SECTIONS)}"
        )
    try:
        sizes = [int(x) for x in args.recovery_rows.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 10:
        p.error(
            f"--recovery-rows {args.recovery_rows!r}: expected table sizes of at least 10 rows "
            "(the delta holds a tenth), comma-separated"
        )
    if args.baseline_root is not None and not (args.baseline_root / "tiered_store").is_dir():
        p.error(f"--baseline-root {args.baseline_root}: expected a checkout holding tiered_store/")
    if args.only.strip() == "readpath" and args.baseline_root is None:
        p.error("--only readpath: needs --baseline-root (a checkout of main to compare with)")
    args.texts = None  # the training section's corpus, resolved once: what was checked is read
    if "training" in args.only.split(","):  # not once its table is made
        try:
            args.texts = resolve_corpus(args.corpus)
        except CorpusError as exc:
            p.error(f"--corpus {' '.join(args.corpus or ['(default)'])}: {exc}")


class DenseRows:
    """The in-memory baseline: the same stored rows (weights | optimizer state) in one tensor."""

    keeps_stats = False
    committed_step = 0  # nothing durable: a TrainableTable over it starts at step 1

    def __init__(self, rows: torch.Tensor) -> None:
        self.table = rows.clone()
        self.rows, self.dim = rows.shape

    def lookup(self, ids, handle=None):
        return self.table[ids]

    def prefetch(self, ids):
        return None

    def write(self, ids, rows):
        self.table[ids] = rows

    def commit(self, step=None):
        return step

    def stats(self):
        return {}

    def close(self):
        return None


class _Meta:
    """What TrainableTable reads of a store's table file (its manifest's metadata and
    quantization, and its name)."""

    def __init__(self, dim: int, name: str) -> None:
        fields = {"metadata": {"trainable": {"dim": dim}}, "quantization": None}
        self.manifest = type("M", (), fields)()
        self.path = Path(name)


def bench_training(args, work: Path) -> dict:
    """Tokens/s of training with the tables tiered vs in memory, alternating rounds."""
    torch.manual_seed(0)
    base = EngramLM(ModelConfig.from_dict(MODEL))
    layers = list(base.engram_layers)
    init = torch.cat([base.tables[layer].weight.detach() for layer in layers])
    sizes = [base.tables[layer].rows for layer in layers]
    offsets = np.cumsum([0, *sizes[:-1]])
    opt = make_row_optimizer("rowwise_adagrad", lr=0.05)
    path = work / "train_tables.npy"
    create_trainable_table(path, init, opt, progress=False)
    stored = torch.cat([init, torch.zeros(init.shape[0], 1)], 1)
    store = TieredStore.open(
        {
            "table": {"path": str(path)},
            "tiers": {
                "hot": {"capacity": "5%"},
                "warm": {"capacity": "20%"},
                "cold": {"io": "direct"},
            },
        }
    )
    dense_rows = DenseRows(stored)
    dense_rows.cold = _Meta(init.shape[1], "memory")
    variants = {}
    for name, backend in (("memory", dense_rows), ("tiered", store)):
        model = copy.deepcopy(base)
        table = TrainableTable(backend, opt)
        model.set_tables(
            {
                layer: TableSlice(table, int(off), rows)
                for layer, off, rows in zip(layers, offsets, sizes, strict=True)
            }
        )
        variants[name] = (model, table, torch.optim.Adam(model.parameters(), lr=1e-3))
    per_batch = args.batch_size * args.seq_len
    tokens = read_tokens(
        args.texts.shuffled(0),
        base.hasher.tokenizer,
        max_tokens=per_batch * args.steps * args.rounds,
    )
    batches = token_batches(tokens, args.batch_size, args.seq_len)
    rates: dict[str, list[float]] = {"memory": [], "tiered": []}
    step = {"memory": 0, "tiered": 0}
    for r in range(args.rounds):
        order = ("memory", "tiered") if r % 2 == 0 else ("tiered", "memory")
        # past the corpus the batches wrap around, as train's do (a round of none timed nothing)
        chunk = [batches[(r * args.steps + i) % len(batches)] for i in range(args.steps)]
        for name in order:
            model, table, dense = variants[name]
            start = time.perf_counter()
            for batch in chunk:
                step[name] += 1
                loss = model.loss(batch)
                dense.zero_grad()
                loss.backward()
                dense.step()
                table.step(step[name])
                if step[name] % args.commit_every == 0:
                    table.commit(step[name])
            rates[name].append(per_batch * len(chunk) / (time.perf_counter() - start))
    ratios = [t / m for t, m in zip(rates["tiered"], rates["memory"], strict=True)]
    same = torch.equal(store.lookup(torch.arange(store.rows)), dense_rows.table)
    out = {
        "table_rows": int(init.shape[0]),
        "row_values": int(stored.shape[1]),
        "hot_warm_share": 0.25,
        "io": "direct",
        "tokens_per_step": per_batch,
        "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "ratio_tiered_vs_memory": statistics.median(ratios),
        "ratios": ratios,
        "tables_identical_after_training": bool(same),
        "store": store.stats()["writes"],
    }
    with warnings.catch_warnings():  # a scratch table: its last steps need not be kept
        warnings.simplefilter("ignore", UncommittedWritesWarning)
        store.close()
    return out


def bench_commit(args, work: Path) -> dict:
    """Dirty rows/s of TieredStore.commit against LMDB's putmulti of the same rows."""
    rows, dim = max(4 * args.dirty, 400_000), 64
    path = work / "commit_table.npy"
    create_table(path, RandomSource(rows, dim, "float32"), progress=False)
    store = TieredStore.open({"table": {"path": str(path)}, "tiers": {"hot": {"capacity": 0}}})
    rng = np.random.default_rng(0)
    ours, raw = [], []
    env = lmdb.open(  # grows across rounds as the store's delta does
        str(work / "lmdb_baseline"),
        map_size=1 << 34,
        sync=True,
        metasync=True,
        max_dbs=2,
        readahead=False,
    )
    db = env.open_db(b"rows")
    for r in range(args.rounds):
        ids = np.sort(rng.choice(rows, args.dirty, replace=False))
        values = torch.from_numpy(rng.standard_normal((args.dirty, dim)).astype(np.float32))
        keys = ids.astype(">i8").view("V8").tolist()
        encoded = [bytes(HEADER_BYTES) + v.tobytes() for v in values.numpy()]  # same sizes

        def lmdb_commit(env=env, db=db, keys=keys, encoded=encoded):
            start = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.cursor(db=db).putmulti(zip(keys, encoded, strict=True))
            return args.dirty / (time.perf_counter() - start)

        def store_commit(ids=ids, values=values):
            store.write(torch.from_numpy(ids), values)
            start = time.perf_counter()
            store.commit()
            return args.dirty / (time.perf_counter() - start)

        first, second = (lmdb_commit, store_commit) if r % 2 == 0 else (store_commit, lmdb_commit)
        a, b = first(), second()
        raw.append(a if first is lmdb_commit else b)
        ours.append(b if first is lmdb_commit else a)
    env.close()
    store.close()
    ratios = [o / b for o, b in zip(ours, raw, strict=True)]
    return {
        "dirty_rows": args.dirty,
        "row_bytes": dim * 4,
        "rows_per_s": {
            "store_commit": statistics.median(ours),
            "lmdb_putmulti": statistics.median(raw),
        },
        "ratio_store_vs_putmulti": statistics.median(ratios),
        "ratios": ratios,
    }


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C: the script kills it (no traceback)
    if sys.platform == "linux":  # killed with the script however it ends (kill -9, out of memory)
        import ctypes
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[3]):  # the script ended before that
        sys.exit(1)
    import numpy as np, torch
    from tiered_store import TieredStore
    path, n = sys.argv[1], int(sys.argv[2])
    store = TieredStore.open({"table": {"path": path}, "tiers": {"hot": {"capacity": 0}}})
    rng = np.random.default_rng(1)
    ids = rng.choice(store.rows, n, replace=False)
    for k in range(0, n, 50000):
        part = torch.from_numpy(ids[k:k + 50000])
        store.write(part, torch.ones(part.numel(), store.dim))
        store.commit()
    print("committed", flush=True)
    while True:  # killed inside one of these commits; they rewrite rows the delta holds
        part = torch.from_numpy(rng.choice(ids, min(n, 50000), replace=False))
        store.write(part, torch.zeros(part.numel(), store.dim))
        store.commit()
    """
)


def bench_recovery(args, work: Path) -> dict:
    """Reopen time after kill -9 of a writer, by table size (delta: 10% of the rows)."""
    results = []
    for rows in [int(x) for x in args.recovery_rows.split(",")]:
        path = work / f"recovery_{rows}.npy"
        create_table(path, RandomSource(rows, 16, "float32"), progress=False)
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(rows // 10), str(os.getpid())],
            stdout=subprocess.PIPE,
        )
        try:  # killed however this ends: it commits in a loop until then
            # it ended before (not an assert: python -O timed a table no writer had written)
            if proc.stdout.readline().strip() != b"committed":
                raise RuntimeError(
                    f"recovery: the writer on {path.name} ended with exit status {proc.wait()} "
                    "before its first commits; expected it to say 'committed' and commit until "
                    "killed (its error, if it had one, is above)"
                )
            time.sleep(0.3)  # inside a later commit, most likely
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        start = time.perf_counter()
        with TieredStore.open({"table": {"path": str(path)}}) as store:
            opened = time.perf_counter() - start
            store.lookup(torch.arange(1000))
            total = time.perf_counter() - start
            delta_rows = len(store._writes.delta)
        results.append(
            {
                "table_rows": rows,
                "delta_rows": delta_rows,
                "open_s": opened,
                "open_and_lookup_s": total,
            }
        )
        path.unlink()
    return {"by_table_size": results}


_LOOKUPS = textwrap.dedent(
    """
    import json, sys, time, numpy as np, torch
    torch.set_num_threads(1)
    from tiered_store import TieredStore
    path, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tiers = ({"hot": {"capacity": "100%"}} if mode == "all_hit"
             else {"hot": {"capacity": 0}, "warm": {"capacity": 0}, "cold": {"io": "pread"}})
    store = TieredStore.open({"table": {"path": path}, "tiers": tiers})
    rng = np.random.default_rng(0)
    if mode == "all_hit":
        store.lookup(torch.arange(store.rows))
    times = []
    for _ in range(n):
        ids = torch.from_numpy(rng.integers(0, store.rows, 4096))
        t = time.perf_counter(); store.lookup(ids); times.append(time.perf_counter() - t)
    print(json.dumps(float(np.median(times))))
    """
)


def bench_readpath(args, work: Path) -> dict:
    """Lookup time of a table without delta: this tree vs main, alternating subprocesses."""
    if args.baseline_root is None:
        return {"skipped": "no --baseline-root"}
    path = work / "readpath.npy"
    create_table(path, RandomSource(200_000, 64, "float32"), progress=False)
    here = Path(__file__).resolve().parents[1]
    out: dict = {"baseline_root": str(args.baseline_root)}
    for mode in ("all_hit", "cold_miss"):
        times: dict[str, list[float]] = {"this": [], "main": []}
        for r in range(args.rounds):
            order = ("this", "main") if r % 2 == 0 else ("main", "this")
            for name in order:
                root = here if name == "this" else args.baseline_root.resolve()
                env = {**os.environ, "PYTHONPATH": str(root)}
                done = subprocess.run(
                    [sys.executable, "-c", _LOOKUPS, str(path), mode, "300"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=root,
                )
                times[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        ratios = [t / m for t, m in zip(times["this"], times["main"], strict=True)]
        out[mode] = {
            "median_lookup_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_this_vs_main": statistics.median(ratios),
            "ratios": ratios,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the sections asked for; print and optionally save JSON."""
    args = parse_args(argv)
    threads = int(os.environ.get("TIERED_STORE_BENCH_TORCH_THREADS", "1"))
    torch.set_num_threads(threads)
    sections = {
        "training": bench_training,
        "commit": bench_commit,
        "recovery": bench_recovery,
        "readpath": bench_readpath,
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {
            "machine": machine_info(),
            "args": {
                k: str(v)
                for k, v in vars(args).items()
                if k not in ("out", "dir", "baseline_root", "texts")
            },
        }
        for name in args.only.split(","):
            started = time.perf_counter()
            results[name] = sections[name](args, Path(tmp))
            results[name]["section_seconds"] = time.perf_counter() - started
            print(json_text({name: results[name]}, indent=1), flush=True)
    if args.out:
        wrote(write_json(args.out, results))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

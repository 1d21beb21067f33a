"""How long a warm-restart save makes lookups wait, against no save, in the same run.

A real store over a random table (``--rows`` x ``--dim`` float16) with one warm tier of
``--slots`` rows, filled at open (``preload_rows``), per policy of ``--policies``: ``lru``, and
``zipf-tuned`` learning online, whose save also holds its online profile (the sketch and the
held rows' counts: 134 MB at 4M slots). A thread looks up ``--ids`` resident rows every
millisecond and times each call; meanwhile the store first serves ``--seconds`` without a save
(**baseline**), then runs ``--saves`` saves (``TieredStore.save_restart``, as ``close()`` and a
periodic save do) a second apart. Reported per policy: the save's seconds (median), the longest
lookup during each save (median over the saves), the longest lookup in a window as long as a
save without one (median over the baseline's windows), and their ratio: how long lookups wait
for a save (the store lock it holds for its save point).

A zipf-tuned tier first serves ``--warmup`` lookups of random rows (batches of 65,536), so its
sketch and counts hold something and its re-pin thread has run.

Example::

    python bench/bench_save_stall.py --out bench/results/save_stall.json

On 2 cores the default (4M slots) took about 40 s on a quiet machine, 3 minutes on a busy one.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tiered_store import StoreConfig, TieredStore, create_table
from tiered_store.atomic_file import scratch_directory, write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    output_file,
    positive_number,
    run_script,
    wrote,
)
from tiered_store.table_sources import RandomSource

POLICIES = ("lru", "zipf-tuned")
WARMUP_BATCH = 65_536


class LookupTimer:
    """A thread that looks up ``ids`` every millisecond and keeps each call's (start, seconds)."""

    def __init__(self, store: TieredStore, ids: torch.Tensor):
        self.store, self.ids = store, ids
        self.calls: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lookup-timer", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.store.lookup(self.ids)
            self.calls.append((start, time.perf_counter() - start))
            time.sleep(0.001)

    def __enter__(self) -> LookupTimer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def longest(self, start: float, end: float) -> float:
        """The longest call that was running at some moment of ``[start, end]``."""
        return max((s for t, s in list(self.calls) if t <= end and t + s >= start), default=0.0)


def measure(table: Path, policy: str, args) -> dict[str, float]:
    """One policy's figures (module docstring)."""
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(table)},
            "tiers": {
                "warm": {
                    "capacity": args.slots,
                    "policy": policy,
                    "preload_rows": str(table.parent / "resident.npy"),
                },
                "restart": {"enabled": False},  # saved here, not again at close
            },
        }
    )
    rng = np.random.default_rng(0)
    with TieredStore(config) as store:
        if policy == "zipf-tuned":
            for _ in tqdm(
                range(0, args.warmup, WARMUP_BATCH), desc=f"{policy} warm-up", leave=False
            ):
                store.lookup(torch.from_numpy(rng.integers(0, args.rows, WARMUP_BATCH)))
        with LookupTimer(store, torch.arange(args.ids)) as timer:
            quiet = (time.perf_counter(), time.perf_counter() + args.seconds)
            time.sleep(args.seconds)
            saves, waits = [], []
            for _ in tqdm(range(args.saves), desc=f"{policy} saves", leave=False):
                time.sleep(1.0)
                start = time.perf_counter()
                store.save_restart()
                end = time.perf_counter()
                saves.append(end - start)
                time.sleep(0.05)  # a lookup still waiting when the save returned finishes
                waits.append(timer.longest(start, end))
            lookups = len(timer.calls)
            save_seconds = statistics.median(saves)
            windows = (
                np.arange(quiet[0], quiet[1] - save_seconds, save_seconds)
                if save_seconds < args.seconds
                else [quiet[0]]
            )
            baseline = statistics.median(timer.longest(w, w + save_seconds) for w in windows)
    during = statistics.median(waits)
    return {
        "save_seconds": save_seconds,
        "longest_lookup_during_save_ms": 1e3 * during,
        "longest_lookup_without_save_ms": 1e3 * baseline,
        "ratio": during / baseline if baseline else float("inf"),
        "timed_lookups": lookups,
    }


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--slots", type=at_least(1), default=4_000_000, help="warm tier rows")
    p.add_argument(
        "--rows", type=at_least(1), help="table rows, at least --slots (default: 2 x --slots)"
    )
    p.add_argument("--dim", type=at_least(1), default=4, help="row width (float16)")
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated, of {', '.join(POLICIES)}",
    )
    p.add_argument("--saves", type=at_least(1), default=5, help="saves timed per policy")
    p.add_argument(
        "--seconds",
        type=positive_number,
        default=5.0,
        help="the baseline: seconds of timed lookups without a save",
    )
    p.add_argument("--ids", type=at_least(1), default=64, help="resident rows per timed lookup")
    p.add_argument(
        "--warmup",
        type=at_least(0),
        default=4_000_000,
        help="random lookups a zipf-tuned tier serves first",
    )
    p.add_argument("--out", type=output_file, help="write JSON here too")
    args = p.parse_args(argv)
    args.rows = 2 * args.slots if args.rows is None else args.rows
    if args.rows < args.slots:
        p.error(f"--rows: got {args.rows:,}; expected at least --slots ({args.slots:,})")
    if args.ids > args.slots:
        p.error(f"--ids: got {args.ids:,}; expected at most --slots ({args.slots:,})")
    policies = args.policies.split(",")
    unknown = [name for name in policies if name not in POLICIES]
    if unknown or not policies:
        p.error(f"--policies: got {args.policies!r}; expected names of {', '.join(POLICIES)}")
    torch.set_num_threads(1)  # 2 shared cores: extra threads only spin
    result = {k: getattr(args, k) for k in ("slots", "rows", "dim", "saves", "seconds", "ids")}
    with scratch_directory("bench_save_stall.") as work:
        table = work / "table.npy"
        print(f"creating {table} ({args.rows:,} x {args.dim} float16)", flush=True)
        create_table(table, RandomSource(args.rows, args.dim, dtype="float16"), progress=False)
        np.save(work / "resident.npy", np.arange(args.slots, dtype=np.int64))
        for policy in policies:
            cell = result[policy] = measure(table, policy, args)
            print(
                f"{policy:>10}: save {cell['save_seconds']:.3f} s; longest lookup during a save "
                f"{cell['longest_lookup_during_save_ms']:.1f} ms, without "
                f"{cell['longest_lookup_without_save_ms']:.1f} ms ({cell['ratio']:.1f}x)",
                flush=True,
            )
    if args.out:
        wrote(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

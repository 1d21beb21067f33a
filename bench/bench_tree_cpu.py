"""CPU time of a queued replay under two source trees, alternating: what a change costs replay.

Each round runs the same replay once under each tree, in a process of its own whose PYTHONPATH
(and working folder) is that tree, the two trees alternating which goes first; the figure is
the CPU time (``time.process_time``: every thread of the process) of the last of ``--replays``
replays in each process, the ones before it warming up (imports, numba's compiled kernels).
The trace, written once by this tree and replayed by both: ``--tokens`` tokens x 16 heads of
Zipf(1.0) ids over ``--rows`` rows, one LRU tier of 5% of the rows, ``--batch-tokens`` batches,
``--queued`` requests of ``--request-tokens`` tokens announced ahead (as
``bench/test_queued_replay.py``). On a shared machine the pytest-benchmark rounds are too noisy
to tell 20%; CPU time per process, the trees alternating, is not.

Prints the JSON report on stdout: per tree its CPU times and their median, the fetch ratio
(a change that should not alter what replay decides leaves it equal), the ratio of the medians
(new / base) and the median of the rounds' ratios, and which trees they were (``base``, ``new``:
the commit each is at and whether it had changes not committed, null where git knows no
commit); each round is said on stderr as it ends. A replay or git that fails ends the run with
one line, ``bench_tree_cpu.py: error: ...`` (and what the replay printed on stderr), exit 2.
The base tree, by default, is a ``git worktree`` of ``--rev`` (HEAD: what this tree's changes
cost), made in the temporary folder and removed at the end; the new tree is this one.

Example::

    python bench/bench_tree_cpu.py                                # this tree vs HEAD, ~2 min
    python bench/bench_tree_cpu.py --rev e772e8e --rounds 6 --out bench/results/tree_cpu.json
    python bench/bench_tree_cpu.py --rev e772e8e --queued 1024 --request-tokens 64  # short ones
    python bench/bench_tree_cpu.py --trees /src/before /src/after  # two checkouts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from tiered_store.atomic_file import json_text, write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_dir,
    output_file,
    public_command,
    run_script,
    wrote,
)
from tiered_store.errors import TieredStoreError
from tiered_store.trace import TraceWriter
from tiered_store.versions import machine_info
from tiered_store.workload import ZipfWorkload

HERE = Path(__file__).resolve().parents[1]
HEADS = 16
TIER_SHARE = 20  # one LRU tier of 5% of the rows

# One process's replays under the tree it runs in; prints one JSON line. Only the library's
# public replay and config, so that an older tree runs it too.
_CHILD = textwrap.dedent(
    """
    import json, sys, time
    job = json.loads(sys.argv[1])
    import torch
    torch.set_num_threads(job["threads"])
    import policies, tiered_store, zipf_analysis
    from tiered_store.config import StoreConfig
    from zipf_analysis.replay import replay
    config = StoreConfig.from_dict(job["config"])
    cpu = []
    for _ in range(job["replays"]):
        start = time.process_time()
        result = replay(config, job["trace"], batch_tokens=job["batch_tokens"],
                        queued_requests=job["queued"], request_tokens=job["request_tokens"])
        cpu.append(time.process_time() - start)
    print(json.dumps({"cpu_s": cpu, "fetch_ratio": result.fetch_ratio,
                      "lookups": result.lookups,
                      "imported": [m.__file__ for m in (policies, tiered_store, zipf_analysis)]}))
    """
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = doc_parser(__doc__)
    p.add_argument(
        "--trees",
        nargs=2,
        type=existing_dir,
        metavar=("BASE", "NEW"),
        help="two checkouts to compare (default: a git worktree of --rev, and this tree)",
    )
    p.add_argument(
        "--rev", help="the base tree's revision, without --trees (a git rev; default: HEAD)"
    )
    p.add_argument("--rounds", type=at_least(1), default=6, help="rounds, one process per tree")
    p.add_argument(
        "--replays",
        type=at_least(1),
        default=2,
        help="replays per process; the last is timed, those before it warm up",
    )
    p.add_argument("--rows", type=at_least(TIER_SHARE), default=4_000_000, help="table rows")
    p.add_argument(
        "--tokens", type=at_least(1), default=250_000, help="tokens of the trace (16 ids each)"
    )
    p.add_argument(
        "--queued", type=at_least(0), default=16, help="requests announced ahead (0: no queue)"
    )
    p.add_argument(
        "--request-tokens", type=at_least(1), default=4096, help="tokens per queued request"
    )
    p.add_argument("--batch-tokens", type=at_least(1), default=64, help="tokens per batch")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads per process")
    p.add_argument("--seed", type=at_least(0), default=11, help="the trace's seed")
    p.add_argument(
        "--dir",
        type=existing_dir,
        help="where the temporary folder of the trace and the base worktree goes (deleted at "
        "the end; default: the system's temporary directory)",
    )
    p.add_argument("--out", type=output_file, help="write the JSON report here as well")
    args = p.parse_args(argv)
    for tree in args.trees or ():
        if not (tree / "tiered_store").is_dir() or not (tree / "zipf_analysis").is_dir():
            p.error(f"--trees: {str(tree)!r} holds no tiered_store/ and zipf_analysis/; "
                    "expected a checkout of this project")  # fmt: skip
    if args.trees is not None and args.rev is not None:  # else ignored: not the base measured
        p.error(f"--rev {args.rev!r}: the base is the first of --trees; expected one of them")
    if args.trees is None:
        args.rev = args.rev or "HEAD"
        found = _git("rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}")
        if found.returncode != 0:
            why = found.stderr.strip() or "git rev-parse found none"
            p.error(f"--rev {args.rev!r}: not a commit of {HERE} ({why}); expected one git knows")
        args.commit = found.stdout.strip()
    return args


def _git(*args: str, tree: Path = HERE) -> subprocess.CompletedProcess:
    """``git ARGS`` in ``tree`` (this one by default); no git is an error naming it."""
    try:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    except OSError as exc:
        raise TieredStoreError(
            f"git: cannot run it ({exc.strerror or exc}); expected git on PATH (or --trees)"
        ) from None


def tree_state(tree: Path) -> dict:
    """The commit ``tree`` is at and whether it has changes not committed (files git does not
    ignore, new ones too); both None where git knows no commit there."""
    head = _git("rev-parse", "--verify", "--quiet", "HEAD", tree=tree)
    status = _git("status", "--porcelain", tree=tree)
    if head.returncode != 0 or status.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_trace(path: Path, args: argparse.Namespace) -> int:
    """The replayed trace, as ``bench/test_queued_replay.py`` writes it; its lookups."""
    ids = ZipfWorkload(args.rows, 1.0, seed=args.seed).sample((args.tokens, HEADS))
    with TraceWriter(path, {"tables": [{"name": "zipf", "rows": args.rows, "heads": HEADS}]}) as w:
        for sequence in np.array_split(ids, max(1, len(ids) // args.request_tokens)):
            w.write(sequence, "zipf")
            w.end_batch()
    return int(ids.size)


def run_child(tree: Path, job: dict) -> dict:
    """One process's replays under ``tree``: its PYTHONPATH and working folder, so that it
    imports that tree's library (checked), not this one's."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(job["threads"])}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(job)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise TieredStoreError(
            f"the replay under {tree} ended with exit status {done.returncode}; expected a JSON "
            f"line of its CPU times. Its stderr ends:\n{done.stderr[-3000:]}"
        )
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # no line, or not JSON
        raise TieredStoreError(
            f"the replay under {tree} printed {done.stdout[-200:]!r}; expected a JSON line of "
            "its CPU times last"
        ) from None
    wrong = [f for f in result["imported"] if not Path(f).resolve().is_relative_to(tree)]
    if wrong:
        raise TieredStoreError(
            f"the replay under {tree} imported {wrong}; expected its own library"
        )
    return result


def measure(args: argparse.Namespace, trees: dict[str, Path], work: Path) -> dict:
    """The rounds, the trees alternating which goes first; the report."""
    trace = work / "queued.trace"
    lookups = write_trace(trace, args)
    config = {
        "table": {"path": str(work / "none.npy"), "dim": 64, "dtype": "float16"},
        "tiers": {"warm": {"capacity": args.rows // TIER_SHARE, "policy": "lru"}},
    }
    job = {
        "config": config,
        "trace": str(trace),
        "replays": args.replays,
        "batch_tokens": args.batch_tokens,
        "queued": args.queued,
        "request_tokens": args.request_tokens,
        "threads": args.threads,
    }
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    fetch: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            result = run_child(trees[name], job)
            if result["lookups"] != lookups:
                raise TieredStoreError(
                    f"the replay under {trees[name]} counted {result['lookups']} lookups; "
                    f"expected the trace's {lookups}"
                )
            cpu[name].append(result["cpu_s"][-1])
            fetch[name] = result["fetch_ratio"]
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{name} {cpu[name][-1]:.3f} s" for name in trees),
            file=sys.stderr,
            flush=True,
        )
    medians = {name: statistics.median(times) for name, times in cpu.items()}
    rounds = [new / base for base, new in zip(cpu["base"], cpu["new"], strict=True)]
    return {
        "lookups": lookups,
        "trees": {
            name: {"cpu_s": cpu[name], "median_cpu_s": medians[name], "fetch_ratio": fetch[name]}
            for name in trees
        },
        "ratio_new_to_base": medians["new"] / medians["base"],
        "median_round_ratio": statistics.median(rounds),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the rounds; returns (and prints) the JSON report."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-tree-cpu-") as tmp:
        work = Path(tmp).resolve()  # (a linked folder: the children import resolved paths)
        base_rev = None if args.trees is not None else args.commit
        try:  # the worktree removed even when its add failed once it had registered it
            if base_rev is None:
                trees = {"base": args.trees[0].resolve(), "new": args.trees[1].resolve()}
            else:
                base = work / "base"
                added = _git("worktree", "add", "--detach", str(base), base_rev)
                if added.returncode != 0:
                    why = added.stderr.strip()
                    raise TieredStoreError(f"git worktree add {base} {args.rev}: {why}")
                trees = {"base": base, "new": HERE}
            # as measured (a --rev base is named by its commit: its worktree's state unread)
            states = {n: tree_state(t) for n, t in trees.items() if n == "new" or base_rev is None}
            report = measure(args, trees, work)
        finally:
            if base_rev is not None:
                _git("worktree", "remove", "--force", str(work / "base"))
    report = {
        "command": public_command(
            "bench/bench_tree_cpu.py", sys.argv[1:] if argv is None else argv
        ),
        "machine": machine_info(),
        "base": {"rev": args.rev, "commit": base_rev} if base_rev else states["base"],
        "new": states["new"],
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("trees", "rev", "dir", "out", "commit")
        },
        **report,
    }
    print(
        f"median CPU time: base {report['trees']['base']['median_cpu_s']:.3f} s, new "
        f"{report['trees']['new']['median_cpu_s']:.3f} s; new / base "
        f"{report['ratio_new_to_base']:.3f}x",
        file=sys.stderr,
    )
    if args.out:
        wrote(write_json(args.out, report, indent=1))
    print(json_text(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(run_script(main))

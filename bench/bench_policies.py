"""Policy quality on Engram traces of real text: miss ratios beside libCacheSim's and the bounds.

1. ``tiered-store analyze`` turns a corpus (default: the Python standard library's sources) into
   two disjoint traces, split by document: the profile comes from one, replay runs on the other.
2. Quality: miss ratio of a single cache tier at 1/5/10/25% of the table's rows for the project's
   policies (batched replay, ``--batch-tokens`` tokens per batch) and its offline bounds (``belady``,
   ``static-topk``: registry names, replayed per request by the same ``replay`` call) beside
   libCacheSim's LRU, ARC, LIRS, 2Q, S3-FIFO, SIEVE, W-TinyLFU and Belady (per request) on the
   same lookups. Ours are fetch ratios (rows read from cold per lookup): a row missed twice in one
   batch is read once, as a per-request simulator misses it once and then hits. The per-lookup
   miss ratios (every occurrence of a missed row counted) are recorded too. The gap zipf-tuned
   closes is measured against libCacheSim's Belady (demand paging), as before.
Replay speed against libCacheSim's own LRU is a micro-benchmark: ``./dev bench -k replay``
(``bench/test_replay_speed.py``).

Example::

    python bench/bench_policies.py --out bench/results/policies.json
    python bench/bench_policies.py --max-tokens 200000 --lookups 200000 --keep   # smoke run
    # quick: reuse an `analyze --holdout` output, only zipf-tuned and its baselines, at 5% and 10%
    tiered-store analyze --max-tokens 5000000 --holdout 0.4 --shuffle --no-curves --out A
    python bench/bench_policies.py --analysis A --policies zipf-tuned --shares 5%,10%

The full run takes 35-40 minutes on 2 cores (tokenising, hashing, 5 policies x 4 sizes of
20M-lookup batched replays, libCacheSim); the quick one 5-20 minutes. Each replay shows a progress bar.
The work directory (traces, profile, the libCacheSim trace) is deleted at the end unless ``--keep``;
an ``--analysis`` directory is never deleted.

``--queued-requests 4,16`` adds ``zipf-tuned``, pin-by-lookups + LRU (``static+lru``) and ``lru`` in
batched replay with that many requests of ``--request-tokens`` tokens announced ahead, as a server that
knows its queue announces them (``TieredStore.announce``; docs/policies.md, "A queue known ahead").

Beside the policies, two per-request baselines from ``policies.pinned_lru`` (the store's own
decisions at one lookup per batch) on the same split as ``zipf-tuned``'s (pinned segment and LRU
segment sizes): ``pin-by-lookups+lru`` (the profile's most-looked-up rows pinned: what
``zipf-tuned`` must beat by a point) and ``zipf-tuned`` itself, per request.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from policies.pinned_lru import pinned_lru_misses
from policies.registry import is_offline
from policies.zipf_tuned import zipf_tuned_split
from tiered_store.atomic_file import atomic_write, json_text, scratch_directory, write_json
from tiered_store.cache_plan import parse_policy
from tiered_store.capacity import parse_shares
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_dir,
    existing_file,
    fraction,
    int_list,
    output_file,
    run_script,
    wrote,
)
from tiered_store.config import StoreConfig
from tiered_store.errors import ConfigError
from tiered_store.profile import FrequencyProfile
from tiered_store.trace import TraceReader, TraceWriter
from zipf_analysis.analyze import AnalyzeOptions, analyze
from zipf_analysis.analyze.publish import refuse_unknown_table, table_choices
from zipf_analysis.replay import ReplayResult, replay

SHARES = (0.01, 0.05, 0.10, 0.25)
BASELINE = "pin-by-lookups+lru"
# lfu and +tinylfu work too, but take ~30 min here; the last two are offline bounds
OURS = ("lru", "sieve", "zipf-tuned", "belady", "static-topk")
# what plot_results reads of a report (--replot checks them before it draws)
REPORT_KEYS = ("capacity_shares", "ours_miss_ratio", "libcachesim_miss_ratio", "layer", "corpus")
LIBCACHESIM = ("LRU", "ARC", "LIRS", "TwoQ", "S3FIFO", "Sieve", "WTinyLFU")


def parse_args(argv=None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("corpus", nargs="*", help="text files/dirs/globs (default: the stdlib sources)")
    p.add_argument(
        "--dir",
        type=existing_dir,
        default="/var/tmp",
        help="where the work directory goes (traces: a few hundred MB; deleted at the end unless --keep)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the work directory (traces) and print where"
    )
    p.add_argument(
        "--analysis",
        metavar="DIR",
        help="reuse this `tiered-store analyze --holdout` output instead of analysing a corpus",
    )
    p.add_argument(
        "--shares",
        default=",".join(f"{s:.0%}" for s in SHARES),
        help="tier sizes, as shares of the table's rows",
    )
    p.add_argument(
        "--max-tokens", type=at_least(1), default=5_000_000, help="tokens over both parts"
    )
    p.add_argument(
        "--holdout",
        type=fraction("a share of the documents in (0, 1)", below_one=True),
        default=0.4,
        help="share of the documents replayed (the rest: profile)",
    )
    p.add_argument(
        "--lookups",
        type=at_least(1),
        default=20_000_000,
        help="replayed lookups (of the holdout part)",
    )
    p.add_argument("--layer", default="layer1", help="which Engram table")
    p.add_argument(
        "--batch-tokens",
        type=at_least(1),
        default=64,
        help="tokens per replay batch for the quality table",
    )
    p.add_argument(
        "--policies", default=",".join(OURS), help="our policies to replay, comma-separated"
    )
    p.add_argument(
        "--queued-requests",
        type=int_list(1),
        default=[],
        metavar="N[,N...]",
        help="also replay zipf-tuned, pin-by-lookups + LRU and lru with N requests of "
        "--request-tokens tokens known ahead (TieredStore.announce), at each N",
    )
    p.add_argument(
        "--request-tokens",
        type=at_least(1),
        default=4096,
        help="tokens per request for --queued-requests",
    )
    p.add_argument(
        "--out", type=output_file, help="write JSON here too, and the plot beside it (.png)"
    )
    p.add_argument(
        "--replot",
        type=existing_file,
        metavar="JSON",
        help="only redraw the plot of an earlier --out",
    )
    args = p.parse_args(argv)
    try:  # refused before any work, not after the analysis
        check_analysis(args)
        args.shares = parse_shares(args.shares, key="--shares")
        for name in args.policies.split(","):  # replay_tier's names: the baseline, a bound, a spec
            if name != BASELINE and not is_offline(name):
                parse_policy(name, key="--policies")
    except ConfigError as exc:
        p.error(str(exc))
    return args


def check_analysis(args: argparse.Namespace) -> None:
    """A ConfigError for an --analysis that is not an `analyze --holdout` output, or a --layer
    that the analysis (given, or the one this run makes) has no table of."""
    choices = table_choices(args.analysis)
    if args.analysis and not (Path(args.analysis) / "holdout.trace").exists():
        raise ConfigError(
            f"--analysis {args.analysis}: no holdout.trace; expected the output of "
            "`tiered-store analyze --holdout FRACTION`"
        )
    refuse_unknown_table(args.layer, "--layer", choices)


def write_oracle_trace(ids: np.ndarray, path: Path) -> None:
    """libCacheSim's oracleGeneral binary format: time, id, size, next access (-1: none)."""
    n = ids.size
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rec["t"], rec["id"], rec["size"] = np.arange(n, dtype=np.uint32), ids, 1
    order = np.argsort(ids, kind="stable")
    same = ids[order][1:] == ids[order][:-1]
    nxt = np.full(n, np.iinfo(np.int64).max, np.int64)  # libCacheSim wants a large "never"
    nxt[order[:-1][same]] = order[1:][same]
    rec["next"] = nxt
    rec.tofile(path)


def libcachesim_miss_ratio(path: Path, name: str, capacity: int) -> float:
    """Miss ratio of one libCacheSim policy, per request."""
    import libcachesim as lcs

    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    miss_ratio, _ = getattr(lcs, name)(cache_size=capacity).process_trace(reader)
    return miss_ratio


def analyze_corpus(corpus: list[str], out_dir: Path, max_tokens: int, holdout: float):
    """Profile part and replayed part of the corpus, disjoint by document (``analyze --holdout``)."""
    if (out_dir / "report.json").exists():  # --analysis: a finished run, reused
        return SimpleNamespace(report=json.loads((out_dir / "report.json").read_text()))
    options = AnalyzeOptions(
        max_tokens=max_tokens, holdout=holdout, shuffle=True, curves=False, progress=True
    )
    return analyze(corpus or None, out_dir, options=options)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        try:
            result = json.loads(args.replot.read_text())
        except ValueError as exc:  # not JSON, not UTF-8
            raise ConfigError(f"--replot {args.replot}: {exc}; expected an earlier --out") from None
        missing = [k for k in REPORT_KEYS if not isinstance(result, dict) or k not in result]
        if missing:  # another script's report, or JSON of another shape: plot's KeyError
            raise ConfigError(
                f"--replot {args.replot}: no {missing[0]!r} in it (not this script's report); "
                "expected an earlier --out"
            )
        wrote(plot_results(result, Path(args.replot).with_suffix(".png")))
        return 0
    with scratch_directory("bench-policies-", args.dir, keep=args.keep) as work:
        try:
            measured = measure(args, work)
        finally:
            if args.keep:
                print(f"work directory kept: {work}", flush=True)
    result = summarise(args, **measured)
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, result))
        wrote(plot_results(result, Path(args.out).with_suffix(".png")))
    print(json_text(result, indent=2))
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Analyze, replay every policy at every share, run libCacheSim (replay speed against
    libCacheSim is a micro-benchmark: bench/test_replay_speed.py)."""
    out_dir = Path(args.analysis) if args.analysis else work / "analysis"  # checked: parse_args
    analysis = analyze_corpus(args.corpus, out_dir, args.max_tokens, args.holdout)
    profile = out_dir / f"{args.layer}.profile.npz"
    with TraceReader(out_dir / "holdout.trace") as reader:
        layout = reader.layout[reader.table_index(args.layer)]
        rows = int(layout["rows"])
        ids = reader.read_all(args.layer)[: args.lookups]
    with TraceWriter(work / "replay.trace", {"tables": [layout]}) as writer:
        for chunk in np.array_split(ids, max(1, ids.size // (4096 * 16))):
            writer.write(chunk, args.layer)
            writer.end_batch()
    write_oracle_trace(ids, work / "replay.oracleGeneral.bin")
    shares = args.shares
    caps = [int(rows * s) for s in shares]
    table, per_lookup = {}, {}
    for policy in args.policies.split(","):
        row = []
        for share, cap in zip(shares, caps, strict=True):
            start = time.perf_counter()
            result = replay_tier(args, work, profile, policy, cap)
            row.append((result.fetch_ratio, result.miss_ratio))
            print(
                f"  {policy} at {100 * share:g}%: fetch {100 * result.fetch_ratio:.2f}% "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        table[policy] = [f for f, _ in row]
        per_lookup[policy] = [m for _, m in row]
        print(policy, "fetch", [f"{100 * f:.2f}" for f, _ in row], flush=True)
    queued = {
        f"{name}, {n} queued": [
            queued_fetch_ratio(args, work, profile, name, share, cap, n)
            for share, cap in zip(shares, caps, strict=True)
        ]
        for n in args.queued_requests
        for name in ("zipf-tuned", BASELINE, "lru")
    }
    per_request = pinned_baselines(ids, rows, profile, caps)
    for name, ratios in per_request.items():
        print(f"per request: {name}", [f"{100 * r:.2f}" for r in ratios], flush=True)
    lcs_table = {}
    for name in (*LIBCACHESIM, "Belady"):
        lcs_table[name] = [
            libcachesim_miss_ratio(work / "replay.oracleGeneral.bin", name, c) for c in caps
        ]
        print("libCacheSim", name, [f"{100 * r:.2f}" for r in lcs_table[name]], flush=True)
    return {
        "analysis": analysis,
        "rows": rows,
        "lookups": int(ids.size),
        "shares": shares,
        "table": table,
        "per_lookup": per_lookup,
        "per_request": per_request,
        "lcs_table": lcs_table,
        "queued": queued,
    }


def queued_fetch_ratio(
    args: argparse.Namespace, work: Path, profile: Path, name: str, share: float, cap: int, n: int
) -> float:
    """Fetch ratio of ``name`` at ``cap`` rows with ``n`` requests announced ahead."""
    start = time.perf_counter()
    result = replay_tier(args, work, profile, name, cap, queued=n)
    print(
        f"  {name} with {n} requests queued at {100 * share:g}%: fetch "
        f"{100 * result.fetch_ratio:.2f}% ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return result.fetch_ratio


def replay_tier(
    args: argparse.Namespace, work: Path, profile: Path, name: str, cap: int, queued: int = 0
) -> ReplayResult:
    """One warm tier of ``cap`` rows (the rows libCacheSim gets: a "0.1%" would read "0%") in
    batched replay: ``name`` a policy, or pin-by-lookups + LRU on zipf-tuned's split
    (``static+lru``); with ``queued`` requests announced ahead."""
    warm = {"capacity": cap, "profile": str(profile)}
    if name == BASELINE:
        prof = FrequencyProfile.load(profile)
        split = zipf_tuned_split(prof.top_rows(cap, by="episodes"), prof.counts, cap)
        pins = work / f"pins_by_lookups_{cap}.npy"
        np.save(pins, prof.top_rows(split.pinned_rows.size, by="lookups"))
        warm = {"capacity": cap, "policy": "static+lru", "static_rows": str(pins)}
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(work / "none.npy"), "dim": 64, "dtype": "float16"},
            "tiers": {"warm": warm},
        }
    )
    return replay(
        cfg,
        work / "replay.trace",
        table=args.layer,
        batch_tokens=args.batch_tokens,
        policy=None if name == BASELINE else name,
        queued_requests=queued,
        request_tokens=args.request_tokens,
        progress=True,
    )


def pinned_baselines(ids: np.ndarray, rows: int, profile: Path, caps: list[int]) -> dict:
    """Per-request miss ratios of pinned rows + LRU on zipf-tuned's split: pinned by the
    profile's lookups (the baseline) and by its episodes (zipf-tuned itself)."""
    prof = FrequencyProfile.load(profile)
    out = {BASELINE: [], "zipf-tuned (per request)": []}
    for cap in caps:
        split = zipf_tuned_split(prof.top_rows(cap, by="episodes"), prof.counts, cap)
        pinned_rows = split.pinned_rows.size
        for name, by in ((BASELINE, "lookups"), ("zipf-tuned (per request)", "episodes")):
            pinned = np.zeros(rows, np.bool_)
            pinned[prof.top_rows(pinned_rows, by=by)] = True
            out[name].append(pinned_lru_misses(ids, pinned, split.recency_rows) / ids.size)
    return out


def summarise(
    args: argparse.Namespace,
    *,
    analysis,
    rows: int,
    lookups: int,
    shares: list[float],
    table: dict,
    per_lookup: dict,
    per_request: dict,
    lcs_table: dict,
    queued: dict,
) -> dict:
    """The JSON result: tables, zipf-tuned's gap closed towards Belady, targets."""
    best = [min(lcs_table[n][i] for n in LIBCACHESIM) for i in range(len(shares))]
    belady = lcs_table["Belady"]
    tuned = table.get("zipf-tuned")
    closure = (
        [
            ((b - t) / (b - o) if b > o else None)
            for t, b, o in zip(tuned, best, belady, strict=True)
        ]
        if tuned
        else None
    )
    baseline = per_request[BASELINE]
    gain = [b - t for t, b in zip(tuned, baseline, strict=True)] if tuned else None
    return {
        "corpus": analysis.report["corpus"]["description"],  # what was analysed, --analysis too
        "tokens": {
            "profile": analysis.report["corpus"]["tokens"],
            "replayed_part": analysis.report["holdout"]["tokens"],
        },
        "layer": args.layer,
        "rows": rows,
        "replayed_lookups": lookups,
        "batch_tokens": args.batch_tokens,
        "capacity_shares": shares,
        "ours_miss_ratio": table,  # fetch ratio: rows read from cold per lookup
        "ours_miss_ratio_per_lookup": per_lookup,  # every occurrence of a missed row counted
        "ours_offline_bounds": [
            p for p in table if is_offline(p)
        ],  # per request, see the docstring
        "per_request_miss_ratio": per_request,  # policies.pinned_lru, zipf-tuned's split
        "libcachesim_miss_ratio": lcs_table,
        "best_online": best,
        "belady": belady,
        "zipf_tuned_gap_closed": closure,
        "queued": (  # fetch ratios with requests known ahead, and zipf-tuned's standing
            {
                "request_tokens": args.request_tokens,
                "fetch_ratio": queued,
                "gap_closed": {
                    k: [
                        (b - r) / (b - o) if b > o else None
                        for r, b, o in zip(v, best, belady, strict=True)
                    ]
                    for k, v in queued.items()
                },
            }
            if queued
            else None
        ),
        "zipf_tuned_points_below_" + BASELINE: gain,
        "target_met": (
            {
                "beats_best_online": [t < b for t, b in zip(tuned, best, strict=True)],
                "closes_50pct": [c is not None and c >= 0.5 for c in closure],
                "1_point_below_" + BASELINE: [g >= 0.01 for g in gain],
            }
            if tuned
            else None
        ),
    }


def plot_results(result: dict, png: Path) -> Path:
    """Miss % against tier size: ours (fetch ratio, solid; offline bounds dotted), libCacheSim's
    (dashed), its Belady (dotted, black)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shares = [100 * s for s in result["capacity_shares"]]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    offline = set(result.get("ours_offline_bounds", []))
    lines = [
        (f"ours {k}", v, ":" if k in offline else "-", "^" if k in offline else "o")
        for k, v in result["ours_miss_ratio"].items()
    ]
    lines += [
        (f"libCacheSim {k}", v, ":" if k == "Belady" else "--", "s")
        for k, v in result["libcachesim_miss_ratio"].items()
    ]
    lines += [
        (f"ours {k}", v, "-.", "d")
        for k, v in ((result.get("queued") or {}).get("fetch_ratio") or {}).items()
    ]
    colors = iter([matplotlib.colormaps["tab20"](i) for i in range(20)])
    for name, ratios, style, marker in lines:
        tuned = name == "ours zipf-tuned"
        ax.plot(
            shares,
            [math.nan if r is None else 100 * r for r in ratios],  # null: none measured
            linestyle=style,
            marker=marker,
            linewidth=3 if tuned else 1.2,
            color="black" if name.endswith("Belady") else ("crimson" if tuned else next(colors)),
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xticks(shares, [f"{s:g}%" for s in shares])
    ax.minorticks_off()
    ax.set_xlabel("cache tier size (% of the table's rows)")
    ax.set_ylabel("miss % (ours: rows fetched per lookup)")
    ax.set_title(f"{result['layer']}: {result['corpus']}"[:90], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_write(png) as f:  # a folder in the way: a clear error; no half-written plot
        fig.savefig(f, format="png", dpi=110)
    return png


if __name__ == "__main__":
    sys.exit(run_script(main))

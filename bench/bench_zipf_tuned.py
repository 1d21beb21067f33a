"""The measurements behind zipf-tuned's design: each tuned choice swept on real Engram traces.

Runs ``tiered-store analyze`` (profile part and replayed part of the corpus disjoint by document),
then counts one cache tier's misses per request at 1/5/10/25% of the table's rows with the
library's own per-request path for pinned rows + LRU (``policies.pinned_lru``: it decides exactly
as the store's cache code at one lookup per batch, at numba speed) for:

1. **pin ranking**: pin the rows with the most lookups, or the most episodes (runs of lookups at
   most W lookups apart) for several windows W;
2. **split**: the recency segment sized by zipf-tuned's rule (distinct rows one recency window is
   expected to touch, at most half the tier) against fixed shares of the tier;
3. **admission threshold**: a missed row enters only if its profile count reaches a threshold, or
   (optionally) it missed within the last G lookups too;
4. plain LRU (no pinning) for scale;
5. (``--repin``) the pinned segment re-chosen every 1M lookups from the profile plus the episodes
   counted while serving (``policies.repin``: misses and idle pinned hits), at most a tenth of
   it moved per re-pin, counts aged by 0.9 per re-pin; and the rule's recency segment doubled
   and tripled;
6. (``--lookahead``) zipf-tuned whose recency segment knows the next L lookups (a what-if for
   prefill, where a request's row ids are known before it is served): eviction passes over rows
   looked up within them, for L from one 64-token batch to 16 requests of 4,096 tokens;
7. (``--oracle``) the pins ranked by the replayed trace's own lookups, and by its own episodes
   (oracles: what a perfect profile of each statistic could do), with the rule's split;
8. (``--segment-bound``) the same pins (zipf-tuned's, and pin-by-lookups'), with Belady's MIN
   instead of LRU on the recency segment (of the rule's size, and of twice it with fewer pins):
   what any eviction policy of the unpinned rows could win, given the pins.

Every variant pins its segment (never evicted) and runs LRU on the rest, as zipf-tuned does.

Example::

    python bench/bench_zipf_tuned.py --out bench/results/zipf_tuned_design.json

Takes about 4 minutes on 2 cores (most of it `analyze`; ``--analysis DIR`` reuses an
``analyze --holdout`` output instead); ``--repin`` adds about 5 minutes, ``--lookahead`` about 3,
``--oracle`` about 1, ``--segment-bound`` about 2.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from policies.offline import Belady
from policies.pinned_lru import pinned_lru_misses
from policies.repin import repinned_lru_misses
from policies.zipf_tuned import DEFAULT_RECENCY_WINDOW, zipf_tuned_split
from tiered_store.atomic_file import write_json
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_dir,
    output_file,
    public_command,
    run_script,
    wrote,
)
from tiered_store.profile import FrequencyCounter
from tiered_store.trace import TraceReader
from zipf_analysis.analyze import AnalyzeOptions, analyze

SHARES = (0.01, 0.05, 0.10, 0.25)  # tier sizes, as shares of the table's rows
WINDOWS = (16_384, 65_536, 262_144, 1_048_576)
RECENCY_SHARES = (0.03, 0.1, 0.3, 0.5, 0.7)
LOOKAHEADS = (1_024, 65_536, 262_144, 1_048_576)  # lookups: 64 tokens ... 16 x 4,096 tokens
THRESHOLDS = ((1, 0), (1, 1 << 20), (2, 1 << 20))  # (min profile count, ghost window in lookups)


def miss_ratios(ids, rows, order, recency_rows, admit=None, readmit_window=0, lookahead=0):
    """Per-request miss ratio at each share: pin ``order``'s first rows, LRU on the rest."""
    out = []
    for share, recency in zip(SHARES, recency_rows, strict=True):
        capacity = int(rows * share)
        pinned = np.zeros(rows, np.bool_)
        pinned[order[: capacity - recency]] = True
        misses = pinned_lru_misses(
            ids, pinned, recency, admit=admit, readmit_window=readmit_window, lookahead=lookahead
        )
        out.append(misses / ids.size)
    return out


def episodes_per_row(ids: np.ndarray, rows: int, window: int):
    """Each row's episodes in ``ids`` (runs of lookups at most ``window`` apart), and the
    profile that counted them."""
    counter = FrequencyCounter(rows, episode_window=window)
    for chunk in np.array_split(ids, max(1, ids.size // (1 << 22))):
        counter.update(chunk)
    profile = counter.profile()
    per_row = np.zeros(rows, np.int64)
    per_row[profile.row_ids] = profile.episodes
    return per_row, profile


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("corpus", nargs="*", help="text files/dirs/globs (default: the stdlib sources)")
    p.add_argument(
        "--dir",
        type=existing_dir,
        default="/var/tmp",
        help="where the temporary work folder goes (deleted at the end)",
    )
    p.add_argument(
        "--max-tokens", type=at_least(1), default=5_000_000, help="tokens analysed (both parts)"
    )
    p.add_argument(
        "--holdout", type=float, default=0.4, help="share of the documents replayed (default 0.4)"
    )
    p.add_argument("--lookups", type=at_least(1), default=20_000_000, help="replayed lookups")
    p.add_argument("--layer", default="layer1", help="the trace's table to replay")
    p.add_argument("--analysis", metavar="DIR", help="reuse an `analyze --holdout` output")
    p.add_argument("--repin", action="store_true", help="also sweep re-pinning and larger splits")
    p.add_argument(
        "--lookahead", action="store_true", help="also sweep a recency segment that knows ahead"
    )
    p.add_argument(
        "--oracle",
        action="store_true",
        help="also pin by the replayed trace's own lookups and episodes (oracles)",
    )
    p.add_argument(
        "--segment-bound",
        action="store_true",
        help="also run Belady's MIN on the recency segment behind fixed pins (a bound)",
    )
    p.add_argument("--out", type=output_file, help="write JSON here too")
    args = p.parse_args(argv)
    if not 0 < args.holdout < 1:  # NaN too
        p.error(f"--holdout {args.holdout}: expected a share of the documents in (0, 1)")
    if args.analysis and args.corpus:
        p.error(f"--analysis {args.analysis} and a corpus: give one (the analysis has its corpus)")
    if args.analysis and not (Path(args.analysis) / "holdout.trace").is_file():
        p.error(f"--analysis {args.analysis}: no holdout.trace there (analyze --holdout)")
    with tempfile.TemporaryDirectory(prefix="bench-zipf-tuned-", dir=args.dir) as tmp:
        out_dir = Path(args.analysis) if args.analysis else Path(tmp) / "analysis"
        options = AnalyzeOptions(
            max_tokens=args.max_tokens,
            holdout=args.holdout,
            shuffle=True,
            curves=False,
            progress=True,
        )
        if not args.analysis:
            analyze(args.corpus or None, out_dir, options=options)
        corpus = json.loads((out_dir / "report.json").read_text())["corpus"]["description"]
        with TraceReader(out_dir / "trace.trace") as reader:
            if args.layer not in reader.tables:
                p.error(f"--layer {args.layer!r}: expected one of the trace's {reader.tables}")
            rows = int(reader.layout[reader.table_index(args.layer)]["rows"])
            profile_ids = reader.read_all(args.layer)
        with TraceReader(out_dir / "holdout.trace") as reader:
            ids = reader.read_all(args.layer)[: args.lookups].astype(np.int64)
    counts = np.bincount(profile_ids, minlength=rows).astype(np.int64)
    by_lookups = np.lexsort((np.arange(rows), -counts))
    counted = {w: episodes_per_row(profile_ids, rows, w) for w in WINDOWS}
    episodes = {w: per_row for w, (per_row, _) in counted.items()}
    # the recency segment zipf-tuned itself would size at each share
    tuned = counted[DEFAULT_RECENCY_WINDOW][1]
    rule = [
        zipf_tuned_split(
            tuned.top_rows(int(rows * s), by="episodes"), tuned.counts, int(rows * s)
        ).recency_rows
        for s in SHARES
    ]
    by_episodes = {w: np.lexsort((np.arange(rows), -counts, -e)) for w, e in episodes.items()}
    default = by_episodes[DEFAULT_RECENCY_WINDOW]
    runs: dict[str, list[float]] = {}
    reads: dict[str, list[float]] = {}  # rows read by re-pins, per replayed lookup

    def run(name, *a, **kw):
        start = time.perf_counter()
        runs[name] = miss_ratios(ids, rows, *a, **kw)
        cells = " ".join(f"{100 * r:6.2f}" for r in runs[name])
        print(f"{name:<44}{cells}   ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"{'miss % at ' + ', '.join(f'{s:.0%}' for s in SHARES):<44}")
    run("lru (no pinning)", by_lookups, [int(rows * s) for s in SHARES])
    run("pin by lookups, rule split", by_lookups, rule)
    for w in WINDOWS:
        run(f"pin by episodes W={w:,}, rule split", by_episodes[w], rule)
    for share in RECENCY_SHARES:
        run(
            f"pin by episodes, recency share {share}",
            default,
            [int(rows * s * share) for s in SHARES],
        )
    for min_count, ghost in THRESHOLDS:
        run(
            f"+ admit count>={min_count} or missed within {ghost:,}",
            default,
            rule,
            admit=counts >= min_count,
            readmit_window=ghost,
        )
    if args.lookahead:
        for lookahead in LOOKAHEADS:
            run(
                f"zipf-tuned, {lookahead:,} lookups known ahead", default, rule, lookahead=lookahead
            )
    if args.oracle:  # the replayed trace's own statistics, ranked as the profile's are
        own_counts = np.bincount(ids, minlength=rows).astype(np.int64)
        own_episodes, _ = episodes_per_row(ids, rows, DEFAULT_RECENCY_WINDOW)
        by_own_lookups = np.lexsort((np.arange(rows), -own_counts))
        run("oracle: pin by the replay's lookups", by_own_lookups, rule)
        by_own_episodes = np.lexsort((np.arange(rows), -own_counts, -own_episodes))
        run("oracle: pin by the replay's episodes", by_own_episodes, rule)
    if args.segment_bound:  # the pins as they are, a clairvoyant recency segment behind them
        for name, order in (("zipf-tuned", default), ("pin-by-lookups", by_lookups)):
            for mult in (1, 2):
                start = time.perf_counter()
                cells = []
                for share, recency in zip(SHARES, rule, strict=True):
                    capacity = int(rows * share)
                    segment = min(capacity, mult * recency)
                    pinned = np.zeros(rows, np.bool_)
                    pinned[order[: capacity - segment]] = True
                    unpinned = ids[~pinned[ids]]
                    cells.append(float(Belady().misses(unpinned, [segment])[0]) / ids.size)
                label = f"{name} pins, Belady on a segment x{mult}"
                runs[label] = cells
                print(
                    f"{label:<44}"
                    + " ".join(f"{100 * c:6.2f}" for c in cells)
                    + f"   ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    if args.repin:
        caps = [int(rows * s) for s in SHARES]
        for mult in (2, 3):  # at most the whole tier (1%: the rule already gives half)
            larger = [min(c, mult * r) for c, r in zip(caps, rule, strict=True)]
            run(f"zipf-tuned, recency segment x{mult} (at most the tier)", default, larger)
        prior = episodes[DEFAULT_RECENCY_WINDOW] * (ids.size / profile_ids.size)
        for mult in (1, 2):
            start = time.perf_counter()
            cells = []
            for share, recency in zip(SHARES, rule, strict=True):
                lru_rows = min(int(rows * share), mult * recency)
                pinned_rows = int(rows * share) - lru_rows
                r = repinned_lru_misses(
                    ids, prior, pinned_rows, lru_rows, budget=pinned_rows // 10, decay=0.9
                )
                cells.append(r.miss_ratio)
                reads[f"repin, recency x{mult}"] = reads.get(f"repin, recency x{mult}", [])
                reads[f"repin, recency x{mult}"].append(r.repin_reads / ids.size)
            runs[f"zipf-tuned re-pinned every 1M lookups, recency x{mult}"] = cells
            print(
                f"{'re-pinned every 1M, recency x' + str(mult):<44}"
                + " ".join(f"{100 * c:6.2f}" for c in cells)
                + f"   ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    result = {
        "command": public_command("bench/bench_zipf_tuned.py", argv or sys.argv[1:]),
        "corpus": corpus,
        "layer": args.layer,
        "rows": rows,
        "profile_lookups": int(profile_ids.size),
        "replayed_lookups": int(ids.size),
        "capacity_shares": SHARES,
        "recency_rows_by_rule": rule,
        "miss_ratio_per_request": runs,
        "repin_reads_per_lookup": reads,
    }
    if args.out:
        wrote(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

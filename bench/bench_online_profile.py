"""zipf-tuned without an offline profile: pin what a bounded online counter learnt in a warm-up.

On an ``analyze --holdout`` output (profile part and replayed part disjoint by document), for a
single cache tier at each share of the table's rows, per request (``policies.pinned_lru``, the
store's own decisions at one lookup per batch), over the replayed lookups after a warm-up:

- **offline**: zipf-tuned from the offline profile (``analyze``'s episodes and its split rule);
- **online**: :class:`tiered_store.online_profile.OnlineProfile` (count-min sketch + heavy
  hitters sized from the tier) fed the warm-up's lookups one window at a time; the tier pins its
  top rows and gives the recency segment the measured distinct rows per window (at most half);
- **online, offline start**: the same counter seeded with the offline profile first;
- **exact, warm-up only**: exact episodes per row over the same warm-up (one int64 per table
  row): what the bounded counter approximates, to tell its error from the warm-up's size;
- **suffix back-off**: the same counts, each row of an n-gram raised by a hundredth of the count
  of its suffix (n-1)-gram's row in the same head rank (the structure Engram's rows carry: does
  it tell which rows seen once or twice come back?);
- **oracle, warm-up rows**: the rows the warm-up looked up, ranked by their episodes in the
  served part (the future): no ranking of what the warm-up saw pins better.

During the warm-up the online tier would run as plain LRU; the figures compare the lookups after
it. The target of issue 15: online within 1 point of offline after at most 5M lookups.

Example::

    tiered-store analyze /usr/share/vim/vim90/doc --max-tokens 5000000 --holdout 0.4 \\
        --shuffle --no-curves --out A
    python bench/bench_online_profile.py A --out bench/results/online_profile_vim.json

On 2 shared cores the default run took about 2 minutes on the Vim-help analysis above
(20M replayed lookups at 5% and 10%).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from policies.pinned_lru import pinned_lru_misses
from policies.zipf_tuned import DEFAULT_RECENCY_WINDOW, zipf_tuned_split
from tiered_store.atomic_file import write_json
from tiered_store.capacity import parse_shares
from tiered_store.cli_args import at_least, doc_parser, given_path, output_file, run_script, wrote
from tiered_store.errors import ConfigError
from tiered_store.online_profile import OnlineProfile
from tiered_store.profile import FrequencyProfile
from tiered_store.trace import TraceReader


def online_counter(ids, capacity, window, profile=None, prior_weight=0.0) -> OnlineProfile:
    """An OnlineProfile with ``capacity`` candidates fed ``ids`` a window at a time."""
    counter = OnlineProfile(candidates=capacity)
    if profile is not None:
        counter.seed(profile, prior_weight)
    for start in range(0, ids.size, window):
        counter.update(torch.from_numpy(ids[start : start + window]))
    return counter


def episodes(ids, rows, window) -> np.ndarray:
    """Exact episodes per row: windows of ``window`` lookups that look it up (float64)."""
    counts = np.zeros(rows, np.float64)
    for start in range(0, ids.size, window):
        counts[np.unique(ids[start : start + window])] += 1
    return counts


def suffix_rows(ids, orders, rows) -> np.ndarray:
    """Per table row, the row its (n-1)-gram suffix looked up in the same head rank at the row's
    first lookup in ``ids`` (``[tokens x heads]`` flattened, whole tokens; ``orders``: each
    head's n-gram order); -1 for rows of the lowest order and rows not looked up."""
    orders = np.asarray(orders)
    per_token = ids[: ids.size - ids.size % orders.size].reshape(-1, orders.size)
    parent = np.full(rows, -1, np.int64)
    for order in np.unique(orders)[1:]:
        for head, suffix in zip(
            np.flatnonzero(orders == order), np.flatnonzero(orders == order - 1), strict=False
        ):
            parent[per_token[::-1, head]] = per_token[::-1, suffix]  # the first lookup wins
    return parent


def ranked(score, k) -> np.ndarray:
    """The ``k`` rows of highest ``score`` with a positive score, ties by row id."""
    top = np.lexsort((np.arange(score.size), -score))[:k]
    return top[score[top] > 0]


def misses_after(ids, rows, pinned_ids, recency_rows) -> float:
    """Per-request miss ratio of pinned rows + LRU over ``ids``."""
    pinned = np.zeros(rows, np.bool_)
    pinned[np.asarray(pinned_ids, dtype=np.int64)] = True
    return pinned_lru_misses(ids, pinned, recency_rows) / ids.size


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("analysis", type=given_path, help="an `tiered-store analyze --holdout` output")
    p.add_argument("--layer", default="layer1", help="the trace's table to replay")
    p.add_argument("--shares", default="0.05,0.1", help="tier sizes, shares of the rows")
    lookups = at_least(1, "at least 1 lookup")
    p.add_argument(
        "--warmup", type=lookups, default=5_000_000, help="lookups the counter learns on"
    )
    p.add_argument("--lookups", type=lookups, default=20_000_000, help="replayed lookups in all")
    p.add_argument(
        "--window", type=lookups, default=DEFAULT_RECENCY_WINDOW, help="lookups per window"
    )
    p.add_argument("--out", type=output_file, help="write JSON here too")
    args = p.parse_args(argv)  # a count below 1 is refused by its type
    try:
        shares = parse_shares(args.shares, key="--shares")
    except ConfigError as exc:
        p.error(str(exc))
    if args.lookups <= args.warmup:
        p.error(
            f"--lookups {args.lookups}: expected more than --warmup ({args.warmup:,}), the "
            "lookups served after the warm-up included"
        )
    torch.set_num_threads(1)  # 2 shared cores: extra threads only spin
    prof = FrequencyProfile.load(args.analysis / f"{args.layer}.profile.npz")
    with TraceReader(args.analysis / "holdout.trace") as reader:
        table = reader.layout[reader.table_index(args.layer)]
        rows = int(table["rows"])
        ids = reader.read_all(args.layer)[: args.lookups].astype(np.int64)
    warm, served = ids[: args.warmup], ids[args.warmup :]
    if not served.size:
        raise ConfigError(
            f"--warmup {args.warmup:,}: the trace holds only {ids.size:,} lookups of "
            f"{args.layer}; expected fewer, to leave lookups to serve after it"
        )
    prior_weight = warm.size / prof.lookups  # the profile's episodes, scaled to the warm-up
    report = json.loads((args.analysis / "report.json").read_text())
    result = {
        "corpus": report["corpus"]["description"],
        "layer": args.layer,
        "window": args.window,
        "rows": rows,
        "warmup": int(warm.size),
        "served": int(served.size),
        "shares": [],
    }
    exact = episodes(warm, rows, args.window)
    parent = suffix_rows(warm, table["orders"], rows)
    backed_off = exact + 0.01 * np.where(parent >= 0, exact[parent.clip(min=0)], 0.0)
    future = np.where(exact > 0, episodes(served, rows, args.window), 0.0)
    for share in shares:
        cap = int(rows * share)
        start = time.perf_counter()
        split = zipf_tuned_split(prof.top_rows(cap, by="episodes"), prof.counts, cap)
        offline = misses_after(served, rows, split.pinned_rows, split.recency_rows)
        cell = {"share": share, "offline": offline}
        for name, seeded in (("online", None), ("online_offline_start", prof)):
            counter = online_counter(warm, cap, args.window, seeded, prior_weight)
            recency = min(cap // 2, int(np.ceil(counter.mean_distinct_per_window)))
            pinned = counter.top_rows(cap - recency).cpu().numpy()
            cell[name] = misses_after(served, rows, pinned, recency)
            cell[f"{name}_recency_rows"] = recency
            cell[f"{name}_counter_bytes"] = counter.nbytes
        cell["offline_recency_rows"] = split.recency_rows
        recency = cell["online_recency_rows"]
        for name, score in (
            ("exact_warmup", exact),
            ("suffix_backoff", backed_off),
            ("oracle_warmup_rows", future),
        ):
            cell[name] = misses_after(served, rows, ranked(score, cap - recency), recency)
        result["shares"].append(cell)
        print(
            f"{100 * share:g}%: offline {100 * offline:.2f}%, online {100 * cell['online']:.2f}%, "
            f"online from offline {100 * cell['online_offline_start']:.2f}%, "
            f"exact warm-up counts {100 * cell['exact_warmup']:.2f}%, "
            f"backed off {100 * cell['suffix_backoff']:.2f}%, "
            f"oracle of the warm-up's rows {100 * cell['oracle_warmup_rows']:.2f}% "
            f"(counter {cell['online_counter_bytes'] / 2**20:.1f} MiB; "
            f"{time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    if args.out:
        wrote(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

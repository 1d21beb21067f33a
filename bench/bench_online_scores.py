"""Which online count best predicts which rows come back: each score's top rows, scored by the
future.

On an ``analyze --holdout`` output (profile part and replayed part disjoint by document), the
replayed lookups are cut into windows of ``--window`` lookups (one episode per row and window,
as the store counts). At every ``--every`` lookups after the warm-up, each score ranks the rows
seen so far and its top ``K`` rows (a tier of each share less one window's mean distinct rows,
the store's recency segment) are scored by the **episodes they hold in the next ``--every``
lookups, as a share of all episodes there**: what pinning those rows would save, since the
recency segment keeps a row within its window (``--future returns``: only the episodes after a
window without the row, the lookups such an LRU misses). Reported per score and share: that
share at each point and its mean.

The scores, each decayed by ``--decay`` per window like the store's counts (but for "episodes,
no decay"):

- **episodes**: windows that looked the row up (what the store ranks by);
- **lookups**, **sqrt lookups**: all its lookups, or the square root of its lookups per window;
- **blocks of 4 / 16 windows**: one per block that looked it up (a burst over consecutive
  windows, one document, counts once);
- **runs**: windows that looked it up after one that did not; **episodes + runs**.

Two bounds: **offline**, the profile's episodes (other documents, ``analyze``'s ranking), and
**oracle**, the next ``--every`` lookups' own episodes. A score that captures more than
"episodes" would pin better; none of them reaches the offline profile (docs/policies.md).

Example::

    tiered-store analyze --max-tokens 5000000 --holdout 0.4 --shuffle --no-curves --out A
    python bench/bench_online_scores.py A --out bench/results/online_scores_code.json

On 2 shared cores the default run took about 1.5 minutes on a 5M-token analysis of the Vim
help.
"""

from __future__ import annotations

import sys

import numpy as np
from tqdm import tqdm

from policies.zipf_tuned import DEFAULT_RECENCY_WINDOW
from tiered_store.atomic_file import write_json
from tiered_store.capacity import parse_shares
from tiered_store.cli_args import at_least, doc_parser, given_path, output_file, run_script, wrote
from tiered_store.errors import ConfigError
from tiered_store.profile import FrequencyProfile
from tiered_store.trace import TraceReader

SCORES = (
    "episodes",
    "episodes, no decay",
    "lookups",
    "sqrt lookups",
    "blocks of 4 windows",
    "blocks of 16 windows",
    "runs",
    "episodes + runs",
)


class Scores:
    """Every score of ``SCORES`` per table row, updated a window at a time."""

    def __init__(self, rows: int, decay: float) -> None:
        self.decay = decay
        self.values = {name: np.zeros(rows) for name in SCORES if name != "episodes + runs"}
        self.last = {span: np.full(rows, -2, np.int64) for span in (1, 4, 16)}  # last window/block
        self.windows = 0

    def add(self, rows: np.ndarray, lookups: np.ndarray) -> None:
        """One window: its distinct ``rows`` and how many lookups each had."""
        for name, value in self.values.items():
            if name != "episodes, no decay":
                value *= self.decay
        v, w = self.values, self.windows
        v["episodes"][rows] += 1
        v["episodes, no decay"][rows] += 1
        v["lookups"][rows] += lookups
        v["sqrt lookups"][rows] += np.sqrt(lookups)
        v["runs"][rows[self.last[1][rows] != w - 1]] += 1
        for span in (4, 16):
            new = rows[self.last[span][rows] != w // span]
            v[f"blocks of {span} windows"][new] += 1
            self.last[span][rows] = w // span
        self.last[1][rows] = w
        self.windows += 1

    def get(self, name: str) -> np.ndarray:
        """The score ``name`` of every row."""
        if name == "episodes + runs":
            return self.values["episodes"] + self.values["runs"]
        return self.values[name]


def top_rows(score: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows of highest positive ``score`` (fewer if fewer are positive), ties by row."""
    seen = np.flatnonzero(score > 0)
    return seen[np.argsort(-score[seen], kind="stable")[:k]]


def future_counts(windows: list, start: int, span: int, rows: int, returns: bool) -> np.ndarray:
    """Per row, the windows ``start .. start + span`` that look it up: all of them, or with
    ``returns`` only those after a window that did not (the lookups an LRU of one window's rows
    misses, so pinning saves)."""
    future = np.zeros(rows)
    before = np.zeros(rows, np.bool_)
    if returns and start > 0:
        before[windows[start - 1][0]] = True
    for rows_of, _ in windows[start : start + span]:
        future[rows_of[~before[rows_of]] if returns else rows_of] += 1
        if returns:
            before[:] = False
            before[rows_of] = True
    return future


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("analysis", type=given_path, help="a `tiered-store analyze --holdout` output")
    p.add_argument("--layer", default="layer1", help="the trace's table to score")
    p.add_argument("--shares", default="5%,10%", help="tier sizes, shares of the rows")
    lookups = at_least(1, "at least 1 lookup")
    p.add_argument(
        "--warmup", type=lookups, default=5_000_000, help="lookups before the first ranking"
    )
    p.add_argument("--lookups", type=lookups, default=20_000_000, help="replayed lookups in all")
    p.add_argument(
        "--every", type=lookups, default=2_490_368, help="lookups between rankings (38 windows)"
    )
    p.add_argument(
        "--window", type=lookups, default=DEFAULT_RECENCY_WINDOW, help="lookups per window"
    )
    p.add_argument(
        "--decay", type=float, default=0.9934, help="weight of past counts per window (the store's)"
    )
    p.add_argument(
        "--future",
        choices=("episodes", "returns"),
        default="episodes",
        help="what the top rows are scored by: the next lookups' episodes, or only their "
        "returns (episodes after a window without the row: what an LRU misses)",
    )
    p.add_argument("--out", type=output_file, help="write JSON here too")
    args = p.parse_args(argv)
    try:
        shares = parse_shares(args.shares, key="--shares")
    except ConfigError as exc:
        p.error(str(exc))
    if not 0 < args.decay <= 1:
        p.error(f"--decay {args.decay}: expected a weight in (0, 1]")
    profile = FrequencyProfile.load(args.analysis / f"{args.layer}.profile.npz")
    with TraceReader(args.analysis / "holdout.trace") as reader:
        rows = int(reader.layout[reader.table_index(args.layer)]["rows"])
        ids = reader.read_all(args.layer)[: args.lookups].astype(np.int64)
    windows = [
        np.unique(ids[at : at + args.window], return_counts=True)
        for at in range(0, ids.size - ids.size % args.window, args.window)
    ]
    warmup, every = -(-args.warmup // args.window), -(-args.every // args.window)
    points = list(range(warmup, len(windows) - every + 1, every))
    if not points:  # what cut the replay short: --lookups, or the trace itself
        held = f"{args.analysis / 'holdout.trace'} holds {ids.size:,} lookups of {args.layer}"
        p.error(
            f"--warmup {args.warmup:,} and --every {args.every:,}: expected at least "
            f"{(warmup + every) * args.window:,} lookups (whole windows of {args.window:,}) to "
            f"replay; " + (f"--lookups {args.lookups:,}" if ids.size == args.lookups else held)
        )
    recency = int(np.mean([rows_of.size for rows_of, _ in windows[:warmup]]))
    ks = {share: max(0, int(rows * share) - recency) for share in shares}
    offline = {share: profile.top_rows(k, by="episodes") for share, k in ks.items()}
    captured = {name: {s: [] for s in shares} for name in ("offline", *SCORES, "oracle")}
    scores = Scores(rows, args.decay)
    for w, (rows_of, counts) in enumerate(tqdm(windows[: points[-1] + 1], desc="windows", unit="")):
        if w in points:
            future = future_counts(windows, w, every, rows, returns=args.future == "returns")
            for share, k in ks.items():
                ranked = {name: top_rows(scores.get(name), k) for name in SCORES}
                ranked.update(offline=offline[share], oracle=top_rows(future, k))
                for name, top in ranked.items():
                    captured[name][share].append(float(future[top].sum() / future.sum()))
        scores.add(rows_of, counts)
    result = {
        "trace": str(args.analysis / "holdout.trace"),
        "layer": args.layer,
        "rows": rows,
        "window": args.window,
        "decay": args.decay,
        "future": args.future,
        "rankings_at": [w * args.window for w in points],
        "every": every * args.window,
        "recency_rows": recency,
        "pinned_rows": {f"{s:g}": k for s, k in ks.items()},
        "captured": {
            name: {f"{s:g}": {"at": v, "mean": float(np.mean(v))} for s, v in cells.items()}
            for name, cells in captured.items()
        },
    }
    print(
        f"future {args.future} held by the top rows (mean over the rankings), "
        + " / ".join(f"{100 * s:g}%" for s in shares)
    )
    for name, cells in captured.items():
        print(f"  {name:22s} " + " / ".join(f"{100 * np.mean(v):5.2f}%" for v in cells.values()))
    if args.out:
        wrote(write_json(args.out, result))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

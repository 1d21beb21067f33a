"""``tiered-store replay``: replay a trace through the store's cache code, beside the offline bounds."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from policies.errors import PolicyError
from policies.registry import PolicySpec, is_offline, offline_names
from tiered_store.atomic_file import atomic_files, make_named_dir, write_step
from tiered_store.cache_plan import PinnedRowsWarning
from tiered_store.capacity import format_bytes, resolve_capacity
from tiered_store.cli_args import (
    DefaultsHelpFormatter,
    command_help,
    given_path,
    output_folder,
    saying_made,
)
from tiered_store.config import StoreConfig, naming_file
from tiered_store.errors import ConfigError
from tiered_store.trace import TraceReader

from .mrc import MissRatioCurve, lru_mrc, offline_mrc
from .replay import (
    DEFAULT_REQUEST_TOKENS,
    ReplayResult,
    check_row_ids,
    ids_checked,
    replay,
    require_lookups,
    table_geometry,
)
from .tier_split import DEFAULT_POINTS, SplitRecommendation, parse_budgets, recommend_split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_SWEEP = "1%,5%,10%,25%"


def register(sub) -> None:
    """Add the ``replay`` subcommand."""
    p = sub.add_parser(
        "replay",
        help=command_help("replay"),
        description="Runs the store's own cache code (no payload) over one table of a trace, for the "
        "config's policies or each of --policies. Reports per tier the hit ratio per lookup, unique rows "
        "fetched per batch, rows and bytes moved, and a modelled stall time (the config's cost_model), "
        "the miss ratio per lookup and the fetch ratio (rows read from cold per lookup: a row missed "
        "several times in one batch is read once, the figure comparable with per-request simulators), "
        "with the offline bounds (Belady's optimum and the oracle static top-K, per request) at the same "
        "capacities. Also sweeps a single cache tier over --sweep capacities per policy and draws its "
        "fetch ratio against capacity (PNG). With --gpu-budget and --host-budget, also recommends "
        "the hot/warm split (LRU tiers, or zipf-tuned ones with a profile and fixed pins, as the "
        "config's policies say; other policies are modelled as LRU) with the least modelled stall "
        "whose hot tier (payload and metadata) fits the GPU budget and warm tier the host budget, "
        "modelled from one read of the trace, and replays that split to check the model.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("config", type=given_path, help="store config (YAML)")
    p.add_argument(
        "trace", type=given_path, help="trace file (from `tiered-store analyze` or TraceWriter)"
    )
    p.add_argument("--table", help="which table of the trace (default: the first)")
    p.add_argument(
        "--policies",
        help="comma-separated policies to compare, e.g. lru,sieve,lru+tinylfu; offline bounds "
        f"({', '.join(offline_names())}) may be listed too (default: the config's)",
    )
    p.add_argument(
        "--batch-tokens",
        type=int,
        help="regroup into batches of N tokens; 1 = one lookup at a time (default: the trace's "
        "own batches)",
    )
    p.add_argument(
        "--queued-requests",
        type=int,
        metavar="N",
        help="replay the policies as a server that knows its next N requests of --request-tokens "
        "tokens (TieredStore.announce): rows they use are evicted last. Applied to the policy "
        "rows and the sweep, not to the bounds or the split; 0: none (the default)",
    )
    p.add_argument(
        "--request-tokens",
        type=int,
        metavar="T",
        help=f"tokens per request, only with --queued-requests (default: {DEFAULT_REQUEST_TOKENS})",
    )
    p.add_argument(
        "--sweep",
        default=DEFAULT_SWEEP,
        help="capacities for the miss-ratio plot (rows, %% or bytes; the plot starts at 0 "
        "anyway; '' to skip)",
    )
    p.add_argument(
        "--out",
        type=output_folder,
        default="replay-out",  # a string: argparse checks it with the type, as one typed
        help="directory for replay.json and PNG (made if missing, in a folder that is there)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-bounds",
        action="store_true",
        help="skip the offline bounds not named in --policies (they read the whole trace)",
    )
    p.add_argument(
        "--gpu-budget",
        metavar="BYTES",
        help="GPU memory for the hot tier, payload and metadata (e.g. 8GiB; 0: no hot tier): with "
        "--host-budget, recommend the hot/warm split (replay.json: tier_split)",
    )
    p.add_argument(
        "--host-budget",
        metavar="BYTES",
        help="host memory for the warm tier, payload and metadata (e.g. 64GiB; 0: no warm tier)",
    )
    p.add_argument(
        "--split-points",
        type=int,
        metavar="N",
        help="candidate capacities per tier for the recommendation, log-spaced up to each "
        f"budget; only with the budgets (default: {DEFAULT_POINTS})",
    )
    p.set_defaults(run=run_replay)


def run_replay(args) -> int:
    """Replay, print the table, write JSON and the PNG."""
    policies = _check_args(args)
    config = StoreConfig.from_yaml(args.config)
    with TraceReader(args.trace) as reader:
        return _replay_and_report(args, config, reader, policies)


def _check_args(args) -> list[str | None]:
    """Fail on a bad option before any work or file read, naming it; returns the policies to
    replay."""
    budgets = parse_budgets(getattr(args, "gpu_budget", None), getattr(args, "host_budget", None))
    queue = args.queued_requests is not None  # 0 given (a loop over N from 0) takes a size
    for option, value, needs, given in (  # each would be taken and change nothing
        ("--request-tokens", args.request_tokens, "--queued-requests N", queue),
        ("--split-points", args.split_points, "--gpu-budget and --host-budget", budgets),
    ):
        if value is not None and not given:
            raise ConfigError(f"{option} {value}: only with {needs}; expected no {option}")
    if args.queued_requests is None:
        args.queued_requests = 0
    if args.request_tokens is None:
        args.request_tokens = DEFAULT_REQUEST_TOKENS
    if args.split_points is None:
        args.split_points = DEFAULT_POINTS
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise ConfigError(
            f"--batch-tokens: got {args.batch_tokens}; expected a positive number of tokens"
        )
    if args.queued_requests < 0:
        raise ConfigError(
            f"--queued-requests: got {args.queued_requests}; expected a number of requests >= 0"
        )
    if args.request_tokens < 1:
        raise ConfigError(
            f"--request-tokens: got {args.request_tokens}; expected a positive number of tokens"
        )
    if args.split_points < 1:
        raise ConfigError(
            f"--split-points: got {args.split_points}; expected at least 1 capacity per tier"
        )
    if not args.policies:
        return [None]
    policies = [p.strip() for p in args.policies.split(",")]
    seen: dict[str, str] = {}  # canonical name -> as first given
    for p in policies:
        if is_offline(p):
            name = p.lower()
        else:
            try:
                name = PolicySpec.parse(p).text
            except PolicyError as exc:
                raise ConfigError(f"--policies: {exc}") from None
        if name in seen:  # replayed twice, the same figures on two lines
            raise ConfigError(
                f"--policies: {p!r} is {seen[name]!r} again; expected each policy once"
            )
        seen[name] = p
    return policies


def _replay_and_report(
    args, config: StoreConfig, reader: TraceReader, policies: list[str | None]
) -> int:
    """The body of ``run_replay`` with the trace open."""
    table = args.table if args.table is not None else 0
    index = reader.table_index(table)
    layout = reader.layout[index]
    named = Path(config.table.path).stem  # analyze's layer1.npy, serve's engram_layer1.npy
    if named in reader.tables and named != reader.tables[index]:
        print(
            f"tiered-store replay: warning: {args.config}'s table.path names trace table "
            f"{named!r}, but this replays {reader.tables[index]!r} (--table); its profile and "
            f"pinned rows, if any, are {named!r}'s",
            file=sys.stderr,
        )
    with naming_file(args.config):  # errors of the file's keys name it, as TieredStore.open's
        rows, row_bytes = table_geometry(config, layout, reader.header)
    require_lookups(reader, index)
    caps = _sweep_capacities(args.sweep, rows, row_bytes) if args.sweep else []
    with saying_made(args.out, "--out") as new:
        make_named_dir(args.out, "--out", "a writable directory")  # before any work
        try:
            return _replay_into(args, config, reader, table, policies, caps, (rows, row_bytes))
        except BaseException:
            if new:  # leave no empty folder behind
                with contextlib.suppress(OSError):
                    args.out.rmdir()
            raise


def _replay_into(args, config, reader, table, policies, caps, geometry) -> int:
    """Replay each policy, the bounds, the sweep and the split; print and write into --out."""
    layout = reader.layout[reader.table_index(table)]
    rows, row_bytes = geometry
    split = _recommend(args, config, reader, table)
    with naming_file(args.config):  # the tiers, resolved: their errors name the file
        results = [
            replay(
                config,
                reader,
                table=table,
                batch_tokens=args.batch_tokens,
                policy=p,
                queued_requests=args.queued_requests,
                request_tokens=args.request_tokens,
                progress=not args.quiet,
            )
            for p in policies
        ]
    named = {p.strip().lower() for p in policies if p is not None and is_offline(p)}
    bound_names = [n for n in offline_names() if not args.no_bounds or n in named]
    if not args.no_bounds:
        bounds = offline_bounds(config, reader, table, results)
        for result in results:
            result.bounds = bounds
    print_table(results)
    if args.queued_requests:
        batching = f"--batch-tokens {args.batch_tokens}" if args.batch_tokens else "whole requests"
        batch = min(args.batch_tokens or args.request_tokens, args.request_tokens)
        if batch == 1:  # --batch-tokens 1 replays one lookup a batch, not one token
            same = "No replay without a queue cuts the same batches (one token's lookups each)"
        elif args.request_tokens % batch:
            same = (
                f"No replay without a queue cuts the same batches: each request ends in a "
                f"batch of {args.request_tokens % batch:,} tokens"
            )
        else:
            same = f"Without a queue, the same batches are `--batch-tokens {batch}`"
        print(
            f"batches: requests of {args.request_tokens:,} tokens ({batching}), the next "
            f"{args.queued_requests:,} announced before each is served. {same}"
        )
    elif args.batch_tokens is None:
        print(
            "batches: the trace's own (the live store's batch size). docs/policies.md and "
            "per-request simulators (libCacheSim) compare the fetch ratio at --batch-tokens 64"
        )
    doc = {
        "config": str(args.config),
        "trace": str(args.trace),
        "rows": rows,
        "row_bytes": row_bytes,
        "results": [r.to_dict() for r in results],
    }
    figure = None
    if caps:
        curves = sweep(
            config,
            reader,
            table,
            [p or config.tiers.warm.policy for p in policies],
            caps,
            args.batch_tokens,
            rows,
            row_bytes,
            bound_names,
            queue=(args.queued_requests, args.request_tokens),
            progress=not args.quiet,
        )
        doc["sweep"] = [c.to_dict() for c in curves]
        from .plots import miss_ratio_figure

        figure = miss_ratio_figure(
            curves, table_rows=rows, title=f"replay: {layout.get('name', table)}"
        )
        print("\nmiss ratio vs capacity (replayed policies: fetch ratio):")
        print_sweep(curves, rows)
        if bound_names:
            print(
                "belady starts cold; static-topk holds the trace's own top rows from the start (an "
                "oracle); a policy with pinned or preloaded rows starts warm and can miss less "
                "than belady"
            )
    if split is not None:
        doc["tier_split"] = _report_split(args, config, reader, table, split)
    _write_results(args.out, doc, figure)  # named once written, not before
    if figure is not None:
        print(f"plot: {args.out / 'replay.png'}")
    print(f"results: {args.out / 'replay.json'}")
    return 0


def _write_results(out: Path, doc: dict, figure: Figure | None) -> None:
    """replay.json and its plot (none without a sweep) into ``out``, both written under
    temporary names before either replaces an earlier run's: a failed write leaves the earlier
    run's files as they were, not this run's plot beside that run's results."""
    plot, results, nothing = out / "replay.png", out / "replay.json", "nothing was written there"
    with write_step(f"cannot write {results}", "creating its temporary files", nothing):
        files = atomic_files(*([(plot, "wb")] if figure is not None else []), (results, "w"))
    try:
        if figure is not None:
            with write_step(f"cannot write {plot}", "writing the plot", nothing):
                from .plots import write_png

                write_png(figure, files[0].file)
                files[0].finish()
        with write_step(f"cannot write {results}", "writing the results", nothing):
            files[-1].file.write(json.dumps(doc, indent=2, default=float) + "\n")
            files[-1].finish()
        if figure is None and not plot.is_dir():  # an earlier run's plot would sit beside
            plot.unlink(missing_ok=True)  # this run's replay.json (a folder there is none)
        for f in files:
            f.publish()
    finally:  # after a failed write or rename: no temporary left (a published one is gone already)
        for f in files:
            f.abort()


def _recommend(args, config: StoreConfig, reader, table) -> SplitRecommendation | None:
    """The tier split for ``--gpu-budget``/``--host-budget`` (None without them); bad budgets
    fail here, before any replay."""
    budgets = parse_budgets(getattr(args, "gpu_budget", None), getattr(args, "host_budget", None))
    if budgets is None:
        return None
    gpu, host = budgets
    layout = reader.layout[reader.table_index(table)]
    rows, row_bytes = table_geometry(config, layout, reader.header)
    with naming_file(args.config):
        current = tuple(  # the config's own split is a candidate too, when it fits
            resolve_capacity(
                t.capacity, table_rows=rows, row_bytes=row_bytes, key=f"tiers.{n}.capacity"
            )
            for n, t in (("hot", config.tiers.hot), ("warm", config.tiers.warm))
        )
    if not args.quiet:  # one read of the trace, then every split: no progress bar of its own
        print(
            f"tier split: modelling table {layout.get('name', table)!r} within the budgets...",
            file=sys.stderr,
            flush=True,
        )
    return recommend_split(
        config,
        reader,
        gpu_budget=gpu,
        host_budget=host,
        table=table,
        batch_tokens=args.batch_tokens,
        points=args.split_points,
        extra=[current],
    )


def _report_split(args, config: StoreConfig, reader, table, split: SplitRecommendation) -> dict:
    """Print the recommendation, replay it with the policies the model used (to check it) and
    return its JSON."""
    print()
    for line in split.lines():
        print(line)
    if args.queued_requests:
        print(
            "note: the split is modelled and checked without a queue (--queued-requests applies "
            "to the policy rows and the sweep)"
        )
    policies = {
        t: getattr(config.tiers, t).policy if split.model[t] == "zipf-tuned" else "lru"
        for t in ("hot", "warm")
    }
    tiers = config.tiers.model_copy(
        update={
            t: getattr(config.tiers, t).model_copy(
                update={
                    "capacity": getattr(split, f"{t}_rows"),
                    "policy": policies[t],
                    "static_rows": None,
                    "preload_rows": None,
                }
            )
            for t in ("hot", "warm")
        }
    )
    check = replay(
        config.model_copy(update={"tiers": tiers}),
        reader,
        table=table,
        batch_tokens=args.batch_tokens,
        progress=not args.quiet,
    )
    print(
        f"  replayed at the recommended split ({check.policy}): hot hit "
        f"{check.tiers['hot']['hit_ratio']:.2%}, warm hit {check.tiers['warm']['hit_ratio']:.2%}, "
        f"fetch {check.fetch_ratio:.2%}, stall {check.modelled_stall_seconds:.4f} s (model "
        f"{split.stall_seconds:.4f} s)"
    )
    shown = {
        t: f"{{capacity: {getattr(split, f'{t}_rows')}, policy: {policies[t]}"
        + (f", profile: {getattr(config.tiers, t).profile}" if split.model[t] != "lru" else "")
        + "}"
        for t in ("hot", "warm")
    }
    print(f"  store config: tiers: {{hot: {shown['hot']}, warm: {shown['warm']}}}")
    doc = split.to_dict()
    doc["replayed"] = check.to_dict()
    return doc


def offline_bounds(
    config: StoreConfig, reader, table, done: list[ReplayResult]
) -> dict[str, float]:
    """Each offline bound's miss ratio at the hot capacity and at hot + warm, replayed as any
    policy is (``done``: results already replayed, reused for the bounds among them)."""
    replayed = {r.policy: r for r in done if r.offline}
    runs = [
        replayed.get(n) or replay(config, reader, table=table, policy=n) for n in offline_names()
    ]
    out = {}
    for tier, key in (("hot", "hot"), ("hot+warm", "warm")):
        for r in runs:
            out[f"{r.policy}@{tier}"] = r.tiers[key]["misses"] / r.lookups if r.lookups else 0.0
    return out


def _sweep_capacities(spec: str, rows: int, row_bytes: int) -> list[int]:
    """The ``--sweep`` capacities in rows, ascending, without 0 (every curve starts there);
    errors name --sweep, and a sweep of 0 alone (no curve to draw) is one."""
    asked = {
        resolve_capacity(_spec(s), table_rows=rows, row_bytes=row_bytes, key="--sweep")
        for s in spec.split(",")
        if s.strip()
    }
    if asked == {0}:  # would skip the sweep, silently, and drop an earlier run's plot
        raise ConfigError(
            f"--sweep: got {spec!r}, only capacity 0 (every curve starts at 0 anyway); expected "
            "capacities above 0, such as 1%,5%, or '' to skip the sweep"
        )
    return sorted(asked - {0})


def sweep(
    config,
    reader,
    table,
    policies,
    caps,
    batch_tokens,
    rows,
    row_bytes,
    bound_names,
    queue: tuple[int, int] = (0, 4096),
    progress: bool = False,
) -> list[MissRatioCurve]:
    """One cache tier (warm) at each capacity ``caps`` (rows, ascending, see
    :func:`_sweep_capacities`), per online policy, beside exact LRU and the offline bounds
    ``bound_names`` (per request, over the table's whole trace). ``queue``: requests announced
    ahead and their tokens, as the policy rows replay them (0: none); ``progress``: a bar per
    replay on stderr."""
    queued, request_tokens = queue
    grid = [0, *caps]
    ids = reader.read_all(table) if bound_names else None
    layout = reader.layout[reader.table_index(table)]
    if ids is not None and not ids_checked(layout):  # as replay checks its batches
        check_row_ids(ids, rows, f"trace table {layout.get('name')!r}")
    curves = []
    for policy in dict.fromkeys(p for p in policies if not is_offline(p)):
        ratios = []
        parsed = PolicySpec.parse(policy)
        pins = config.tiers.warm.static_rows if parsed.static and not parsed.tuned else None
        for cap in grid:  # a cold start, but for the rows a static policy pins; at 0, a batch
            # reads each of its distinct rows once (below 1 unless batches are single lookups)
            single = config.model_copy(
                update={
                    "tiers": config.tiers.model_copy(
                        update={
                            "hot": config.tiers.hot.model_copy(update={"capacity": 0}),
                            "warm": config.tiers.warm.model_copy(
                                update={"capacity": cap, "static_rows": pins, "preload_rows": None}
                            ),
                        }
                    )
                }
            )
            with warnings.catch_warnings():  # small points of a sweep may hold pins alone
                warnings.simplefilter("ignore", PinnedRowsWarning)
                ratios.append(
                    replay(
                        single,
                        reader,
                        table=table,
                        batch_tokens=batch_tokens,
                        policy=policy,
                        queued_requests=queued,
                        request_tokens=request_tokens,
                        progress=progress,
                        desc=f"sweep {policy} at {cap:,} rows",
                    ).fetch_ratio  # comparable with the per-request curves drawn beside it
                )
        curves.append(
            MissRatioCurve(
                policy,
                np.array(grid),
                np.array(ratios),
                reader.lookups(table),
                table_rows=rows,
                metadata={
                    "method": "replay",
                    "batch_tokens": batch_tokens,
                    **(
                        {"queued_requests": queued, "request_tokens": request_tokens}
                        if queued
                        else {}
                    ),  # fmt: skip
                    "metric": "rows read from cold per lookup",
                },
            )
        )
    if ids is not None:
        curves.append(
            lru_mrc(ids, capacities=grid, table_rows=rows, name="lru (exact, per request)")
        )
        curves.extend(offline_mrc(name, ids, grid, table_rows=rows) for name in bound_names)
    return curves


def print_table(results: list[ReplayResult]) -> None:
    """The per-policy, per-tier summary on the terminal."""
    head = f"{'policy':<22}{'hot hit':>9}{'warm hit':>10}{'miss':>8}{'fetch':>8}{'uniq/batch':>12}{'to device':>12}{'stall s':>10}{'Mlookup/s':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        label = f"{r.policy} (offline)" if r.offline else r.policy
        # an offline bound counts per request: no batches, so no rows per batch and no stall
        unique = f"{'-' if r.offline else _rows(r.unique_rows_per_batch):>12}"
        stall = f"{'-':>10}" if r.offline else f"{r.modelled_stall_seconds:>10.3f}"
        print(
            f"{label:<22}{r.tiers['hot']['hit_ratio']:>9.1%}{r.tiers['warm']['hit_ratio']:>10.1%}"
            f"{r.miss_ratio:>8.1%}{r.fetch_ratio:>8.1%}{unique}{format_bytes(r.bytes_moved['host_to_device']):>12}"
            f"{stall}{r.lookups_per_second / 1e6:>11.2f}"
        )
    for r in results:  # zipf-tuned tiers that learnt while replaying (repin.enabled)
        for tier, c in r.tiers.items():
            if "repins" in c:
                print(
                    f"{r.policy}: the {tier} tier re-pinned online {c['repins']:,} times, "
                    f"{c['rows_repinned']:,} rows into its pinned segment"
                )
    print(
        "hot hit: of all lookups; warm hit: of the lookups the hot tier missed; miss: lookups "
        "served by neither cache tier; fetch: rows read from cold per lookup (a row missed twice "
        "in one batch is read once; compare this with per-request figures); uniq/batch: distinct "
        "rows the hot tier missed per batch (mean), to device: their bytes copied to the device in "
        "all; stall s: modelled seconds the batches' fetches ran past their compute, in all; "
        "Mlookup/s: this replay's speed, millions of lookups per second"
        + (
            "; an offline bound replays per request, so it has no rows per batch or stall (-)"
            if any(r.offline for r in results)
            else ""
        )
    )
    if results and results[0].bounds:
        b = results[0].bounds
        names = [k.removesuffix("@hot") for k in b if k.endswith("@hot")]
        print(
            f"{'bounds (per request)':<22}"
            + "; ".join(
                f"{n}: hot miss {b[f'{n}@hot']:.1%}, hot+warm miss {b[f'{n}@hot+warm']:.1%}"
                for n in names
            )
        )


def _rows(mean: float) -> str:
    """A mean count of rows to three figures where it is small (0.83, not 1), whole past 100."""
    return f"{mean:,.0f}" if mean >= 100 else f"{mean:.1f}" if mean >= 10 else f"{mean:.2f}"


def print_sweep(curves: list[MissRatioCurve], rows: int) -> None:
    """Miss ratio per curve at each swept capacity, headed by the capacity in rows and as a
    share of the table (to three significant digits: 1,000 of 10.3M rows is 0.00971%).

    >>> curve = MissRatioCurve("lru", np.array([0, 1000, 2000]), np.array([1.0, 0.5, 0.25]), 4)
    >>> print_sweep([curve], 10_300_000)
    rows                          1,000    2,000
    share of the table         0.00971%  0.0194%
    lru                           50.0%    25.0%
    >>> wide = MissRatioCurve("lru", np.array([0, 517_208, 1_034_416]), np.array([1, .4, .3]), 4)
    >>> print_sweep([wide], 10_344_160)   # columns as wide as the widest count, and a space
    rows                          517,208  1,034,416
    share of the table                 5%        10%
    lru                             40.0%      30.0%
    """
    caps = curves[0].capacities[1:]
    width = max([9, *(len(f"{int(c):,}") + 2 for c in caps)])
    print(f"{'rows':<26}" + "".join(f"{int(c):>{width},}" for c in caps))
    shares = (f"{100 * c / rows:.3g}%" for c in caps)
    print(f"{'share of the table':<26}" + "".join(f"{share:>{width}}" for share in shares))
    for c in curves:
        print(f"{c.name:<26}" + "".join(f"{c.at(int(cap)):>{width}.1%}" for cap in caps))


def _spec(text: str) -> int | str:
    text = text.strip()
    return int(text) if text.isdigit() else text

"""zipf-tuned learning while serving: the cost of online counting, and what re-pinning buys.

(a) **All-hit lookup throughput** of a real store (a hot tier on the CPU over a real table file,
    every lookup a hit) with zipf-tuned's online counting and re-pinning on (``repin.enabled``;
    windows counted and re-pins planned in the store's background thread) against the same tier
    with it off, and plain ``lru``; rounds interleaved in the same run, median lookups/s per mode,
    ratio to off. A round's time includes waiting for its background work to finish
    (``wait_repinned``), so the figure is the whole cost, as on a machine without a spare core.
    A tier that holds every row it is asked for evicts nothing, so it re-pins only while it fills
    (``repins_after_the_fill``: 0), and once its rows stayed put a few windows it counts ever
    fewer of them (at most one in ``repin.quiet_sample``); "counting every window"
    (``quiet_sample: 1``) is the cost of counting every hit.
(b) **Fetch ratio** (rows read from cold per lookup, at ``--batch-tokens`` per batch: 64 tokens
    by default, the figure docs/policies.md compares with per-request simulators) of one warm
    tier at each share of the table's rows, over the replayed lookups after ``--warmup``
    (``replay``, the store's own decisions, re-pins included, at the same batch boundaries as the
    store), on the held-out part of an ``analyze --holdout`` output of real text (default: the
    Python standard library's sources, analysed here): ``lru``; ``zipf-tuned`` from the offline
    profile with re-pinning off (the pins fixed) and on; ``zipf-tuned`` with no profile (online
    only: it starts as LRU and learns), with the default schedule and the former one.
    The reads after the warm-up are the full replay's minus its counters at the warm-up's end
    (``replay(marks=...)``); ``--queued-requests N`` replays as a server that knows its next N
    requests (``TieredStore.announce``). Each mode's replay speed is
    also given against ``lru``'s in the same run; ``--replay-modes`` picks the modes (e.g.
    ``lru,online`` to time online re-pinning alone); ``--chunk`` adds the fetch ratio of each
    chunk of that many lookups (how the online tiers converge on the offline pins).
(c) **What any online counter could reach** (per request, ``policies.repin``, exact per-row
    counts instead of a sketch, re-pins every ``--bound-every`` lookups moving any number of rows,
    reading rows it does not hold from cold): the offline pins against online-only exact counting
    with the same split. If (c) is short of the offline profile, the gap is the data a warm-up
    sees, not the store's counter.
(d) **A large tier serving traffic with misses** (``--large-rows``, ``--large-slots``; off by
    default: it writes a table of ``--large-rows`` x 128 B): a warm tier of millions of slots
    over a table file, Zipfian ids (``--large-zipf``) spread over the table, ``lru`` against
    ``zipf-tuned`` online (no profile: it pins most of its slots), rounds interleaved after a
    warm-up that fills the tier; lookups/s (background counting and re-pins included) and the
    miss ratio per mode, ratio to ``lru``. What a tier of DeepSeek-V4.1's size pays per lookup
    for its pins: victim searches and plans that pass over the slots.

Example::

    python bench/bench_online_repin.py                        # small: 2M tokens analysed, 5%
    python bench/bench_online_repin.py --analysis A --shares 5%,10% --lookups 20000000 \\
        --out bench/results/online_repin.json                 # full size, on an analyze output
    # drift: the offline profile of code (A), the traffic prose (B: Vim help)
    tiered-store analyze /usr/share/vim/vim90/doc --max-tokens 2000000 --holdout 0.5 \\
        --shuffle --no-curves --out B
    python bench/bench_online_repin.py --analysis B --profile-from A --skip-all-hit
    # the traffic itself changes kind: 10M lookups of code (A), then the Vim help (B)
    python bench/bench_online_repin.py --analysis A --then B --switch-at 10000000 \\
        --lookups 30000000 --skip-all-hit --replay-modes online --skip-bounds --chunk 5000000
    python bench/bench_online_repin.py --skip-all-hit --skip-replay \\
        --large-rows 16000000 --large-slots 4000000         # (d): a 2 GB table, 4M slots

On 2 shared cores the first (small) example took about 1 minute; ``--replay-modes`` and the
``--skip-*`` options leave parts out of longer runs.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from policies.repin import repinned_lru_misses
from policies.zipf_tuned import zipf_tuned_split
from tiered_store import StoreConfig, TieredStore, create_table
from tiered_store.atomic_file import json_text, scratch_directory, write_json
from tiered_store.capacity import resolve_capacity
from tiered_store.cli_args import (
    at_least,
    doc_parser,
    existing_dir,
    float_list,
    fraction,
    given_path,
    int_list,
    output_file,
    public_command,
    run_script,
    wrote,
)
from tiered_store.errors import ConfigError
from tiered_store.profile import FrequencyProfile
from tiered_store.table_sources import RandomSource
from tiered_store.trace import TraceReader, TraceWriter
from tiered_store.workload import ZipfWorkload
from zipf_analysis.analyze import AnalyzeOptions, analyze
from zipf_analysis.analyze.publish import refuse_unknown_table, table_choices
from zipf_analysis.replay import replay

BATCH = 65_536  # lookups per trace batch: one 4,096-token sequence x 16 heads
# the schedule before re-pins scored only touched slots: a full plan per 1M lookups
FORMER_SCHEDULE = {"every": 1_048_576, "budget": "10%", "decay": 0.9}
REPLAY_MODES = {  # (b)'s tiers: short name (--replay-modes) -> name in the output
    "lru": "lru",
    "fixed": "zipf-tuned, offline profile, pins fixed",
    "repinned": "zipf-tuned, offline profile, re-pinned online",
    "online": "zipf-tuned, online only (no profile)",
    "former": "zipf-tuned, online only, former schedule (1M, 10%, 0.9)",
}
MODES = {
    "lru": {"policy": "lru"},
    "zipf-tuned, counting off": {"policy": "zipf-tuned", "repin": {"enabled": False}},
    # re-pins every window in which rows came or went: only while the tier fills, here; once
    # its rows stayed put 4 windows, counts ever fewer windows (up to 1 in repin.quiet_sample)
    "zipf-tuned, counting on": {"policy": "zipf-tuned"},
    "zipf-tuned, counting every window": {"policy": "zipf-tuned", "repin": {"quiet_sample": 1}},
}


def all_hit_throughput(
    work: Path, rows: int, batch: int, rounds: int, batches: int, zipf: float, device: str = "cpu"
) -> dict:
    """Median all-hit lookups/s per mode (rounds interleaved) and each mode's ratio to off, for
    ids uniform over the rows (``zipf`` 0) or Zipfian with exponent ``zipf``; the hot tier on
    ``device`` (its counts too, on CUDA)."""
    path = work / "allhit.npy"
    if not path.exists():
        create_table(path, RandomSource(rows, 64, dtype="float16", seed=1), progress=False)
    if zipf > 0:
        flat = ZipfWorkload(rows, zipf, seed=0).sample(batch * batches)
    else:
        flat = np.random.default_rng(0).integers(0, rows, batch * batches)
    work_ids = [torch.from_numpy(flat[i * batch : (i + 1) * batch]) for i in range(batches)]
    stores = {}
    for name, tier in MODES.items():
        hot = {"capacity": rows, "device": device, **tier}
        cfg = {"table": {"path": str(path)}, "tiers": {"hot": hot}}
        store = TieredStore(StoreConfig.from_dict(cfg))
        for at in range(0, rows, 65_536):  # every row resident: all later lookups hit
            store.lookup(torch.arange(at, min(rows, at + 65_536)))
        store.wait_repinned()
        stores[name] = store
    online = stores["zipf-tuned, counting on"].hot.online
    repins_at_the_fill = online.repins
    speeds: dict[str, list[float]] = {name: [] for name in MODES}
    try:
        for _ in range(rounds):
            for name, store in stores.items():
                start = time.perf_counter()
                for ids in work_ids:
                    store.lookup(ids)
                store.wait_repinned()  # its background counting and re-pins count too
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()  # the lookups' copies and counts have run
                speeds[name].append(batch * batches / (time.perf_counter() - start))
        for store in stores.values():
            assert store.stats()["hot"]["misses"] == rows  # only the fill missed
        repins_after_the_fill = online.repins - repins_at_the_fill
    finally:
        for store in stores.values():
            store.close()
    off = statistics.median(speeds["zipf-tuned, counting off"])
    out = {name: {"lookups_per_s": statistics.median(v)} for name, v in speeds.items()}
    for cell in out.values():
        cell["ratio_to_off"] = cell["lookups_per_s"] / off
    out["batch"], out["zipf"], out["repins_after_the_fill"] = batch, zipf, repins_after_the_fill
    return out


def large_tier_throughput(
    work: Path, rows: int, slots: int, zipf: float, rounds: int, per_round: int
) -> dict:
    """(d): median lookups/s per mode over interleaved rounds of ``per_round`` batches (after a
    warm-up of 3 x ``slots`` lookups), the miss ratio over all rounds, and the ratio to lru."""
    path = work / "large.npy"
    create_table(path, RandomSource(rows, 64, dtype="float16", seed=1), progress=True)
    warmup = -(-3 * slots // BATCH)
    ranks = ZipfWorkload(rows, zipf, seed=0).sample(BATCH * (warmup + rounds * per_round))
    ids = torch.from_numpy(np.random.default_rng(1).permutation(rows)[ranks])  # hot rows spread
    batches = list(torch.split(ids, BATCH))
    modes = {"lru": {"policy": "lru"}, "zipf-tuned, online": {"policy": "zipf-tuned"}}
    stores = {}
    speeds: dict[str, list[float]] = {name: [] for name in modes}
    before: dict[str, dict] = {}
    try:
        for name, tier in modes.items():
            cfg = {"table": {"path": str(path)}, "tiers": {"warm": {"capacity": slots, **tier}}}
            store = stores[name] = TieredStore(StoreConfig.from_dict(cfg))
            for batch in batches[:warmup]:
                store.lookup(batch)
            store.wait_repinned()
            before[name] = store.stats()["warm"]
        for r in range(rounds):
            work_batches = batches[warmup + r * per_round : warmup + (r + 1) * per_round]
            for name, store in stores.items():
                start = time.perf_counter()
                for batch in work_batches:
                    store.lookup(batch)
                store.wait_repinned()
                speeds[name].append(BATCH * per_round / (time.perf_counter() - start))
        out: dict = {"rows": rows, "slots": slots, "zipf": zipf}
        for name, store in stores.items():
            now, was = store.stats()["warm"], before[name]
            out[name] = {
                "lookups_per_s": statistics.median(speeds[name]),
                "miss_ratio": (now["misses"] - was["misses"]) / (now["lookups"] - was["lookups"]),
                "pinned": store.warm.pinned_count,
            }
    finally:
        for store in stores.values():
            store.close()
    for name in modes:
        out[name]["ratio_to_lru"] = out[name]["lookups_per_s"] / out["lru"]["lookups_per_s"]
    return out


def write_trace(path: Path, layout: dict, ids: np.ndarray) -> None:
    """``ids`` as batches of BATCH lookups."""
    with TraceWriter(path, {"tables": [layout]}) as writer:
        for at in range(0, ids.size, BATCH):
            writer.write(ids[at : at + BATCH], layout["name"])
            writer.end_batch()


def repin_overrides(args) -> dict:
    """The ``repin`` settings given on the command line (``--every`` ... ``--sketch-width``)."""
    given = {
        "every": args.every,
        "budget": args.budget,
        "decay": args.decay,
        "prior_weight": args.prior_weight,
        "sketch_width": args.sketch_width,
    }
    return {key: value for key, value in given.items() if value is not None}


def check_repin_overrides(args, p: argparse.ArgumentParser) -> None:
    """Refuse a ``repin`` setting the store would refuse, naming its option, before any work."""
    for key, value in repin_overrides(args).items():
        tier = {"capacity": 1, "policy": "zipf-tuned", "repin": {key: value}}
        try:
            StoreConfig.from_dict({"table": {"path": "t.npy"}, "tiers": {"warm": tier}})
        except ConfigError as exc:
            reason = str(exc).rsplit(f"repin.{key}: ", 1)[-1]
            p.error(f"--{key.replace('_', '-')} {value}: {reason}")


def fetch_ratios(args, work: Path, analysis: Path) -> dict:
    """Rows read from cold per lookup after the warm-up, per policy and share, and the
    per-request bounds (c)."""
    profile_path = (args.profile_from or analysis) / f"{args.layer}.profile.npz"
    with TraceReader(analysis / "holdout.trace") as reader:
        layout = dict(reader.layout[reader.table_index(args.layer)], name=args.layer)
        ids = reader.read_all(args.layer)[: args.lookups].astype(np.int64)
    if args.then:  # the traffic changes kind: the other analysis' held-out lookups follow
        if ids.size <= args.switch_at:
            raise ConfigError(
                f"--switch-at {args.switch_at:,}: the analysis' trace (up to --lookups) has "
                f"only {ids.size:,} lookups; expected a switch before its end"
            )
        ids = np.concatenate([ids[: args.switch_at], then_ids(args, layout)])[: args.lookups]
    warmup = args.warmup - args.warmup % BATCH  # whole batches: the mark ends a replay batch
    if ids.size <= warmup:
        raise ConfigError(
            f"--warmup {args.warmup:,}: the trace has only {ids.size:,} lookups; expected fewer, "
            "to leave lookups to serve after it"
        )
    write_trace(work / "full.trace", layout, ids)
    marks = chunk_marks(args.chunk, ids.size)
    repin = {"enabled": True, **repin_overrides(args)}
    former = {"enabled": True, **FORMER_SCHEDULE}
    every_mode = {
        REPLAY_MODES["lru"]: {"policy": "lru"},
        REPLAY_MODES["fixed"]: {
            "policy": "zipf-tuned",
            "profile": str(profile_path),
            "repin": {"enabled": False},
        },
        REPLAY_MODES["repinned"]: {
            "policy": "zipf-tuned",
            "profile": str(profile_path),
            "repin": repin,
        },
        REPLAY_MODES["online"]: {"policy": "zipf-tuned", "repin": repin},
        REPLAY_MODES["former"]: {
            "policy": "zipf-tuned",
            "repin": former,
        },
    }
    policies = {name: every_mode[name] for name in args.replay_modes}
    out = {
        "trace": str(analysis / "holdout.trace"),
        "profile": str(profile_path),
        "lookups": int(ids.size),
        "warmup": warmup,
        "then": {"trace": str(args.then / "holdout.trace"), "switch_at": args.switch_at}
        if args.then
        else None,
        "batch_tokens": args.batch_tokens,
        "queued_requests": args.queued_requests,
        "request_tokens": args.request_tokens,
        "repin": repin,
        "repin_former_schedule": former,
        "shares": {},
    }
    profile = FrequencyProfile.load(profile_path)
    for share in args.shares.split(","):
        cell = {}
        for name, tier in policies.items():
            cfg = StoreConfig.from_dict(
                {
                    "table": {"path": str(work / "none.npy"), "dim": 64, "dtype": "float16"},
                    "tiers": {"warm": {"capacity": share, **tier}},
                }
            )
            start = time.perf_counter()
            full = replay(
                cfg,
                work / "full.trace",
                table=args.layer,
                batch_tokens=args.batch_tokens,
                queued_requests=args.queued_requests,
                request_tokens=args.request_tokens,
                marks=[warmup, *marks],
            )
            head, *at_chunks = full.at_marks
            after = full.lookups - head["lookups"]
            reads = full.rows_moved["cold_reads"] - head["cold_reads"]
            missed = full.tiers["warm"]["misses"] - head["misses"]
            prefix_reads = [at["cold_reads"] for at in at_chunks]
            cell[name] = {
                "fetch_ratio_after_warmup": reads / after,
                "miss_ratio_after_warmup": missed / after,
                "fetch_ratio_all": full.fetch_ratio,
                "repins": full.tiers["warm"].get("repins", 0),
                "rows_repinned": full.tiers["warm"].get("rows_repinned", 0),
                "replay_lookups_per_s": full.lookups_per_second,
            }
            if marks:  # the fetch ratio of each chunk of lookups: how it converges
                ends, totals = (
                    [*marks, full.lookups],
                    [*prefix_reads, full.rows_moved["cold_reads"]],
                )
                cell[name]["fetch_ratio_per_chunk"] = [
                    {"from": a, "to": b, "fetch_ratio": (rb - ra) / (b - a)}
                    for a, b, ra, rb in zip(
                        [0, *ends[:-1]], ends, [0, *totals[:-1]], totals, strict=True
                    )
                ]
            chunks = cell[name].get("fetch_ratio_per_chunk", [])
            print(
                f"  {share} {name}: {100 * cell[name]['fetch_ratio_after_warmup']:.2f}% read "
                f"after the warm-up ({time.perf_counter() - start:.0f} s)"
                + (" per chunk: " + " ".join(f"{100 * c['fetch_ratio']:.2f}" for c in chunks))
                * bool(chunks),
                flush=True,
            )
        if "lru" in cell:  # each mode's replay speed against lru's in the same run
            for name in policies:
                cell[name]["replay_speed_to_lru"] = (
                    cell[name]["replay_lookups_per_s"] / cell["lru"]["replay_lookups_per_s"]
                )
        if not args.skip_bounds:
            cell["per_request_bounds"] = online_bounds(args, ids, warmup, profile, layout, share)
        out["shares"][share] = cell
    return out


def then_ids(args, layout: dict) -> np.ndarray:
    """``--then``'s held-out lookups of the same table, checked to have its geometry."""
    with TraceReader(args.then / "holdout.trace") as reader:
        other = reader.layout[reader.table_index(args.layer)]
        if other["rows"] != layout["rows"]:
            raise ConfigError(
                f"--then {args.then}: its {args.layer} has {other['rows']:,} rows, the "
                f"analysis' {layout['rows']:,}; expected the same table"
            )
        return reader.read_all(args.layer).astype(np.int64)


def chunk_marks(chunk: int, lookups: int) -> list[int]:
    """Where the chunks of ``--chunk`` lookups end (whole batches), before the trace's end
    (``chunk``: 0, none, or at least a batch, as ``main`` checks)."""
    step = chunk - chunk % BATCH
    return list(range(step, lookups, step)) if step else []


def replay_modes(given: str) -> list[str]:
    """The (b) modes ``--replay-modes`` names (short names, comma-separated), in table order;
    ValueError, naming the option, for an unknown one."""
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = sorted(set(names) - set(REPLAY_MODES))
    if unknown or not names:
        raise ValueError(
            f"--replay-modes {given!r}: expected some of {', '.join(REPLAY_MODES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return [full for short, full in REPLAY_MODES.items() if short in names]


def online_bounds(args, ids, warmup, profile, layout, share: str) -> dict:
    """(c): per request, misses after the warm-up of the offline pins and of online-only exact
    counting (same split, any row re-pinned every ``--bound-every`` lookups)."""
    rows = int(layout["rows"])
    capacity = resolve_capacity(share, table_rows=rows, row_bytes=128, key="--shares")
    split = zipf_tuned_split(profile.top_rows(capacity, by="episodes"), profile.counts, capacity)
    prior = np.zeros(rows)
    prior[profile.row_ids] = profile.episodes if profile.episodes is not None else profile.counts
    pinned, recency = split.pinned_rows.size, split.recency_rows
    runs = {
        "offline profile, pins fixed": dict(initial=split.pinned_rows, budget=0),
        "online only, exact counts, any row re-pinned": dict(
            prior_weight=0.0, interval=args.bound_every
        ),
    }
    out = {}
    for name, kw in runs.items():
        r = repinned_lru_misses(ids, prior, pinned, recency, report_from=(warmup,), **kw)
        out[name] = {
            "miss_ratio_after_warmup": r.misses_after[0] / (ids.size - warmup),
            "repin_reads_per_lookup": r.repin_reads / ids.size,
        }
        print(
            f"  {share} (c) {name}: {100 * out[name]['miss_ratio_after_warmup']:.2f}%", flush=True
        )
    return out


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    chunk_expected = f"0 or at least {BATCH:,} lookups (a batch)"  # --chunk's, two checks
    p.add_argument("corpus", nargs="*", help="text files/dirs (default: the stdlib sources)")
    p.add_argument("--analysis", type=given_path, help="reuse an `analyze --holdout` output")
    p.add_argument(
        "--max-tokens", type=at_least(1), default=2_000_000, help="tokens analysed (both parts)"
    )
    p.add_argument(
        "--holdout",
        type=fraction("a share of the documents in (0, 1)", below_one=True),
        default=0.5,
        help="share of documents replayed",
    )
    p.add_argument(
        "--profile-from",
        type=given_path,
        help="take the offline profile from this analyze output instead (traffic that drifted "
        "from the profile: e.g. a profile of code serving prose)",
    )
    p.add_argument(
        "--then",
        type=given_path,
        help="(b): traffic that changes kind while serving: after --switch-at lookups of the "
        "analysis' held-out trace, this analyze output's (e.g. code, then Vim help)",
    )
    p.add_argument(
        "--switch-at",
        type=at_least(BATCH, f"at least {BATCH:,} lookups (a batch)"),
        default=10_000_000,
        help="(b): lookups of the analysis' trace before --then's (whole batches)",
    )
    p.add_argument("--layer", default="layer1", help="the trace's table to replay")
    p.add_argument("--shares", default="5%", help="warm tier sizes, e.g. 5%%,10%%")
    p.add_argument("--warmup", type=at_least(0), default=5_000_000, help="lookups before the count")
    p.add_argument(
        "--lookups", type=at_least(1), default=20_000_000, help="replayed lookups at most"
    )
    p.add_argument("--every", type=at_least(1), help="repin.every (default: the config's)")
    p.add_argument("--budget", help="repin.budget (default: the config's)")
    p.add_argument("--decay", type=float, help="repin.decay (default: the config's)")
    p.add_argument("--prior-weight", type=float, help="repin.prior_weight (default: the config's)")
    p.add_argument(
        "--sketch-width", type=at_least(1), help="repin.sketch_width (default: the config's)"
    )
    p.add_argument(
        "--batch-tokens", type=at_least(1), default=64, help="(b): tokens per replayed batch"
    )
    p.add_argument(
        "--replay-modes",
        default=",".join(REPLAY_MODES),
        help="(b): which tiers to replay: "
        + "; ".join(f"{short}: {full}" for short, full in REPLAY_MODES.items()).replace("%", "%%"),
    )
    p.add_argument(
        "--queued-requests",
        type=at_least(0),
        default=0,
        metavar="N",
        help="(b): replay as a server that knows its next N requests (TieredStore.announce)",
    )
    p.add_argument(
        "--request-tokens",
        type=at_least(1),
        default=4096,
        help="(b): tokens per request for --queued-requests",
    )
    p.add_argument("--skip-bounds", action="store_true", help="(b) without (c)")
    p.add_argument(
        "--chunk",
        type=at_least(0, chunk_expected),
        default=0,
        help="(b): also the fetch ratio of each chunk of this many lookups (0: none), to see "
        "how online re-pinning converges",
    )
    p.add_argument(
        "--bound-every",
        type=at_least(1),
        default=262_144,
        help="(c): lookups between exact re-pins",
    )
    p.add_argument(
        "--hit-rows", type=at_least(1), default=200_000, help="(a): table rows, all resident"
    )
    p.add_argument(
        "--hit-batches", type=int_list(1), default="65536,1024", help="(a): lookups per batch"
    )
    p.add_argument(
        "--hit-device", choices=("cpu", "cuda"), default="cpu", help="(a): the hot tier's device"
    )
    p.add_argument(
        "--hit-zipf",
        type=float_list(0),
        default="0,0.75",
        help="(a): id distributions: 0 = uniform, else a Zipf exponent (real text: ~0.75)",
    )
    p.add_argument(
        "--rounds", type=at_least(1), default=5, help="(a), (d): interleaved rounds per mode"
    )
    p.add_argument(
        "--large-rows",
        type=at_least(0, "0 (skip (d)) or a positive number of rows"),
        default=0,
        help="(d): table rows (0: skip (d))",
    )
    p.add_argument(
        "--large-slots", type=at_least(1), default=4_000_000, help="(d): warm tier slots"
    )
    p.add_argument("--large-zipf", type=float, default=0.9, help="(d): Zipf exponent of the ids")
    p.add_argument("--large-batches", type=at_least(1), default=40, help="(d): batches per round")
    p.add_argument("--skip-replay", action="store_true", help="(a) only")
    p.add_argument("--skip-all-hit", action="store_true", help="(b) only")
    p.add_argument(
        "--dir",
        type=existing_dir,
        default="/var/tmp",
        help="where the temporary work folder goes (deleted at the end)",
    )
    p.add_argument("--out", type=output_file, help="write JSON here too")
    args = p.parse_args(argv)  # clear errors before any work: a bad count refused by its type
    if args.skip_replay and args.skip_all_hit and not args.large_rows:
        p.error("--skip-replay and --skip-all-hit: nothing left to measure; drop one")
    for share in args.shares.split(","):  # each one a warm tier's capacity, and a result's key
        if not re.fullmatch(r"\d+(\.\d+)?%", share.strip()) or not 0 < float(share[:-1]) <= 100:
            p.error(f"--shares {args.shares!r}: expected percentages of the rows, e.g. 5%,10%")
    try:
        args.replay_modes = replay_modes(args.replay_modes)
    except ValueError as exc:
        p.error(str(exc))
    if not 0.0 <= args.large_zipf < math.inf:  # NaN too
        p.error(f"--large-zipf {args.large_zipf}: expected a finite Zipf exponent >= 0")
    if 0 < args.chunk < BATCH:
        p.error(f"--chunk {args.chunk}: expected {chunk_expected}")
    check_repin_overrides(args, p)
    if args.then is not None:
        args.switch_at -= args.switch_at % BATCH  # whole batches, as the trace is written
        if not (args.then / "holdout.trace").is_file():
            p.error(f"--then {args.then}: no holdout.trace there (analyze --holdout)")
    if args.analysis is not None and not (args.analysis / "holdout.trace").is_file():
        p.error(f"--analysis {args.analysis}: no holdout.trace there (analyze --holdout)")
    if not args.skip_replay:  # the analysis given, or the one this run makes
        try:
            refuse_unknown_table(args.layer, "--layer", table_choices(args.analysis))
        except ConfigError as exc:
            p.error(str(exc))
    profile = f"{args.layer}.profile.npz"
    if args.profile_from is not None and not (args.profile_from / profile).is_file():
        p.error(f"--profile-from {args.profile_from}: no {profile} there (an analyze output)")
    torch.set_num_threads(1)  # shared cores: extra threads only spin
    result = {"command": public_command("bench/bench_online_repin.py", argv or sys.argv[1:])}
    with scratch_directory("bench-online-repin-", args.dir) as work:
        result["all_hit"] = {}
        zipfs = [] if args.skip_all_hit else args.hit_zipf
        for zipf in zipfs:
            for batch in args.hit_batches:
                lookups = max(1_048_576 * 3, batch)  # about three re-pin intervals per round
                cell = all_hit_throughput(
                    work, args.hit_rows, batch, args.rounds, lookups // batch, zipf, args.hit_device
                )
                result["all_hit"][f"zipf {zipf}, batch {batch}"] = cell
                print(
                    f"(a) all-hit, zipf {zipf}, {batch:,} lookups/batch: "
                    + ", ".join(
                        f"{n} {c['lookups_per_s'] / 1e6:.1f}M/s ({c['ratio_to_off']:.3f}x)"
                        for n, c in cell.items()
                        if isinstance(c, dict)
                    ),
                    flush=True,
                )
        if not args.skip_replay:
            analysis = args.analysis
            if analysis is None:
                analysis = work / "analysis"
                options = AnalyzeOptions(
                    max_tokens=args.max_tokens,
                    holdout=args.holdout,
                    shuffle=True,
                    curves=False,
                    progress=True,
                )
                analyze(args.corpus or None, analysis, options=options)
            result["fetch_ratio"] = fetch_ratios(args, work, analysis)
        if args.large_rows:
            cell = large_tier_throughput(
                work,
                args.large_rows,
                args.large_slots,
                args.large_zipf,
                args.rounds,
                args.large_batches,
            )
            result["large_tier"] = cell
            print(
                f"(d) {args.large_slots:,} slots over {args.large_rows:,} rows: "
                + ", ".join(
                    f"{n} {c['lookups_per_s'] / 1e6:.2f}M/s ({c['ratio_to_lru']:.3f}x), "
                    f"miss {c['miss_ratio']:.4f}"
                    for n, c in cell.items()
                    if isinstance(c, dict)
                ),
                flush=True,
            )
    if args.out:  # first: a reader of stdout that left (| head) ends the run where it prints
        wrote(write_json(args.out, result))
    print(json_text(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main))

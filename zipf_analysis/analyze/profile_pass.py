"""Stage 5 of ``analyze``: one streaming pass over the trace for profiles, dedup and collisions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tiered_store.profile import FrequencyCounter, FrequencyProfile
from tiered_store.trace import TraceReader

from ..profile import profile_summary
from ..report import format_cell
from .ngram_keys import NgramKeyCounter, collision_figures, sum_collisions
from .options import TRACE_NAME
from .run_context import RunContext

__all__ = ["DedupCounter", "ProfileStage", "profile_pass", "stage_profile"]


def _removed_share(unique: int, lookups: int) -> float | None:
    """Share of ``lookups`` that deduplication down to ``unique`` removes (None when no lookups)."""
    return 1.0 - unique / lookups if lookups else None


class DedupCounter:
    """Distinct rows per sequence and per batch of one table, in O(ids) per record."""

    def __init__(self, rows: int) -> None:
        self._pos = np.zeros(rows, dtype=np.int32)  # per row: a position it was last seen at
        self._stamp = np.zeros(rows, dtype=np.int64)  # per row: 1 + last batch it was seen in
        self._index = np.arange(0, dtype=np.int32)
        self.lookups = 0
        self.sequences = 0
        self.unique_per_sequence = 0
        self.unique_per_batch = 0

    def update(self, ids: np.ndarray, batch: int) -> None:
        """Count one record ``[S, ...]``: S sequences of one batch."""
        sequences = ids.shape[0] if ids.ndim > 1 else 1  # [0, T]: NumPy infers no -1 from no ids
        ids = ids.reshape(sequences, ids.size // max(sequences, 1))
        n = ids.shape[1]
        if self._index.size < n:
            self._index = np.arange(n, dtype=np.int32)
        index = self._index[:n]
        stamp = batch + 1
        for seq in ids:
            # Each row's slot ends up holding one of its positions: exactly one per distinct row
            # matches, whichever write won.
            self._pos[seq] = index
            first = seq[self._pos[seq] == index]
            self.unique_per_sequence += first.size
            self.unique_per_batch += int(np.count_nonzero(self._stamp[first] != stamp))
            self._stamp[first] = stamp
        self.lookups += ids.size
        self.sequences += ids.shape[0]

    def summary(self) -> dict[str, Any]:
        """Shares of lookups removed by deduplicating within each sequence / batch."""
        return {
            "lookups": self.lookups,
            "sequences": self.sequences,
            "unique_per_sequence": self.unique_per_sequence,
            "unique_per_batch": self.unique_per_batch,
            "removed_within_sequence": _removed_share(self.unique_per_sequence, self.lookups),
            "removed_within_batch": _removed_share(self.unique_per_batch, self.lookups),
        }


def profile_pass(
    reader: TraceReader,
    rows: Mapping[str, int],
    dedup: bool = True,
    episode_window: int = 0,
    progress: bool = False,
) -> tuple[dict[str, FrequencyCounter], dict[str, DedupCounter]]:
    """One streaming pass: lookups (and episodes) per row, and deduplication per sequence/batch,
    per table (``progress``: a bar of the lookups read on stderr)."""
    from tqdm.auto import tqdm

    counters = {
        name: FrequencyCounter(rows[name], episode_window=episode_window) for name in reader.tables
    }
    dedups = {name: DedupCounter(rows[name]) for name in reader.tables} if dedup else {}
    with tqdm(
        total=reader.n_lookups,
        unit="lookup",
        unit_scale=True,
        desc="profile",
        disable=not progress,
        leave=False,
    ) as bar:
        for chunk in reader.chunks():
            records = chunk.records
            for t, name in enumerate(reader.tables):
                counters[name].update(chunk.table_ids(t))
            if dedup:
                ends = np.cumsum(records[:, 2])
                for rec, end in zip(records, ends, strict=True):
                    batch, t, n, ndim = (int(v) for v in rec[:4])
                    if n:
                        shape = tuple(int(d) for d in rec[4 : 4 + ndim])
                        ids = chunk.ids[int(end) - n : int(end)].reshape(shape)
                        dedups[reader.tables[t]].update(ids, batch)
            bar.update(chunk.ids.size)
    return counters, dedups


def _overall(
    profiles: Mapping[str, FrequencyProfile],
    layouts: Sequence[Mapping[str, Any]],
    dedups: Mapping[str, DedupCounter],
    tables: Mapping[str, Mapping[str, Any]],
) -> tuple[FrequencyProfile, dict[str, Any]]:
    """One profile over every table (row ids offset by the tables before, in layer order), and
    its report figures."""
    offset, ids, counts, keys = 0, [], [], 0
    table_offsets = {}
    for layout in layouts:
        p = profiles[layout["name"]]
        table_offsets[layout["name"]] = offset
        ids.append(p.row_ids + offset)
        counts.append(p.counts)
        keys += p.ngram_keys or 0
        offset += int(layout["rows"])
    prof = FrequencyProfile(
        np.concatenate(ids),
        np.concatenate(counts),
        offset,
        "all",
        keys or None,
        {"table_offsets": table_offsets},
    )
    lookups = sum(d.lookups for d in dedups.values())
    seq = sum(d.unique_per_sequence for d in dedups.values())
    bat = sum(d.unique_per_batch for d in dedups.values())
    return prof, {
        "rows": offset,
        "table_offsets": table_offsets,
        "profile": profile_summary(prof),
        "dedup": {
            "lookups": lookups,
            "unique_per_sequence": seq,
            "unique_per_batch": bat,
            "removed_within_sequence": _removed_share(seq, lookups),
            "removed_within_batch": _removed_share(bat, lookups),
        },
        "collisions": sum_collisions([t["collisions"] for t in tables.values()]),
    }


@dataclass
class ProfileStage:
    """What stage 5 produced."""

    profiles: dict[str, FrequencyProfile]  # per table
    tables: dict[str, dict[str, Any]]  # per table: the report's figures so far
    overall: dict[str, Any]  # the report's figures over every table together
    all_profile: FrequencyProfile  # one profile over every table


def stage_profile(ctx: RunContext, keys: NgramKeyCounter) -> ProfileStage:
    """Stage 5: profiles (saved with their top rows), dedup and collision figures per table."""
    with ctx.times.stage("profile"):
        with TraceReader(ctx.trace) as reader:
            counters, dedups = profile_pass(
                reader,
                ctx.rows,
                episode_window=ctx.options.episode_window,
                progress=ctx.options.progress,
            )
        distinct_keys = keys.distinct()
        profiles: dict[str, FrequencyProfile] = {}
        tables: dict[str, dict[str, Any]] = {}
        meta = {"trace": TRACE_NAME, "config": ctx.engram.to_dict(), "tokenizer": ctx.tok_info}
        for layout in ctx.layouts:
            name = layout["name"]
            keys_over_heads = sum(distinct_keys.get(int(o), 0) for o in layout["orders"])
            prof = counters.pop(name).profile(
                name=name, ngram_keys=keys_over_heads, metadata={**meta, "layer": layout["layer"]}
            )
            profiles[name] = prof
            prof.save(ctx.staging / f"{name}.profile.npz")
            prof.save_top_rows(ctx.staging / f"{name}.top_rows.npy")
            tables[name] = {
                "layer": layout["layer"],
                "rows": int(layout["rows"]),
                "heads": layout["heads"],
                "dim": layout["dim"],
                "profile": profile_summary(prof),
                "dedup": dedups[name].summary(),
                "collisions": collision_figures(prof, layout, distinct_keys, keys.key_method),
                "files": {
                    "top_rows": f"{name}.top_rows.npy",
                    "profile": f"{name}.profile.npz",
                    "store_yaml": f"{name}.store.yaml",
                    "report": f"{name}/report.md",
                },
            }
        all_profile, overall = _overall(profiles, ctx.layouts, dedups, tables)
    ctx.say(
        "profile: "
        + "; ".join(
            f"{n}: {t['profile']['distinct_rows']:,} rows touched, dedup/seq "
            f"{format_cell(t['dedup']['removed_within_sequence'], pct=True)}"
            for n, t in tables.items()
        )
    )
    return ProfileStage(profiles, tables, overall, all_profile)

"""The holdout check of ``analyze``: static top-K from the main profile against the holdout's own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tiered_store.profile import FrequencyProfile
from tiered_store.trace import TraceReader

from ..mrc import static_topk_mrc
from ..report import share_capacities
from .profile_pass import profile_pass
from .traces import TracePartStats

__all__ = ["holdout_summary"]


def holdout_summary(
    path: Path,
    rows: Mapping[str, int],
    profiles: Mapping[str, FrequencyProfile],
    recs: Mapping[str, Mapping[str, Any]],
    part: TracePartStats,
) -> dict[str, Any]:
    """Profile-from-main vs oracle static top-K on the holdout trace, per table."""
    with TraceReader(path) as reader:
        counters, _ = profile_pass(reader, rows, dedup=False)
        lookups = reader.n_lookups
    out: dict[str, Any] = {
        "path": path.name,
        "documents": part.documents,
        "tokens": part.tokens,
        "sequences": part.sequences,
        "lookups": lookups,
        "truncated": part.truncated,
        "tables": {},
    }
    for name, counter in counters.items():
        held = counter.profile(name=name)
        dense = held.dense_counts(rows[name])
        main = profiles[name]
        hits = np.concatenate([[0], np.cumsum(dense[main.row_ids])])
        caps = sorted(
            set(share_capacities(rows[name], main.distinct))
            | {int(v["capacity"]) for v in recs[name]["tiers"].values()}
        )
        n = max(held.lookups, 1)
        oracle = static_topk_mrc(held, capacities=caps)
        out["tables"][name] = {
            "lookups": held.lookups,
            "distinct_rows": held.distinct,
            "unseen_share": 1.0 - float(hits[-1]) / n,
            "capacities": caps,
            "profiled_topk": [1.0 - float(hits[min(c, hits.size - 1)]) / n for c in caps],
            "oracle_topk": [float(oracle.at(c)) for c in caps],
        }
    return out

"""The store config ``analyze`` recommends per table: a complete StoreConfig YAML with comments."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

from tiered_store.capacity import format_bytes
from tiered_store.config import dump_yaml

from ..report import curve_basis
from .options import HOLDOUT_NAME

__all__ = ["store_yaml"]


def store_yaml(
    name: str,
    layout: Mapping[str, Any],
    rec: Mapping[str, Any],
    top_rows: str,
    trace: str,
    split: Mapping[str, Any] | None = None,
) -> str:
    """A complete store config (StoreConfig YAML) for one table with the recommended capacities:
    the ``split`` for the memory budgets when given (``SplitRecommendation.to_dict()``), else the
    sizes that reach the hit-rate targets (``rec``)."""
    tiers: dict[str, Any] = {}
    notes = []

    def tier_entry(capacity: int) -> dict[str, Any]:
        return {
            "capacity": capacity,
            "policy": "lru",
            "preload_rows": top_rows,  # no profile: an LRU tier ignores it (a warning at open)
        }

    for tier, info in rec["tiers"].items():
        tiers[tier] = tier_entry(int(info["capacity"]))
        notes.append(
            f"#   {tier}: target {info['target_hit_rate']:g}, the curve gives {info['hit_rate']:.4f} "
            f"at {info['combined_capacity']:,} rows (this and the tiers above as one cache)"
            + ("" if info["reachable"] else " (UNREACHABLE: every distinct row)")
        )
    basis = (
        f"Capacities read off the {rec['curve']!r} miss-ratio curve of {trace} (cumulative "
        f"targets); it is {curve_basis(rec['curve'])}; replay (below) gives what the tiers reach:"
    )
    sizing = [
        *textwrap.wrap(
            basis, 98, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
        ),
        *notes,
    ]
    if split is not None:
        for tier in ("hot", "warm"):  # both, whichever tiers the targets named
            tiers.setdefault(tier, tier_entry(0))["capacity"] = int(split[f"{tier}_rows"])
        sizing = [
            f"# Capacities: the hot/warm split with the least modelled stall (LRU, default cost "
            f"model) for GPU budget {format_bytes(split['gpu_budget'])} and host budget "
            f"{format_bytes(split['host_budget'])}, payload and metadata,",
            f"# from {trace}: hot {format_bytes(split['hot_bytes'])}, warm "
            f"{format_bytes(split['warm_bytes'])}; modelled hot hit {split['hot_hit_ratio']:.4f}, "
            f"warm hit {split['warm_hit_ratio']:.4f}, fetch {split['fetch_ratio']:.4f}, stall "
            f"{split['stall_seconds']:.4f} s (report.json: tier_split), modelled from a cold start;",
            "# the preload_rows below start both tiers warm, so replaying this file gives another, "
            "usually lower, stall",
            "# (replay it without preload_rows to check the model). The targets gave:",
            *notes,
        ]
    for entry in tiers.values():  # a tier turned off reads no rows (a warning at open)
        if entry["capacity"] == 0:
            del entry["preload_rows"]
    doc = {"table": {"path": f"{name}.npy", "dim": int(layout["dim"])}, "tiers": tiers}
    head = [
        f"# Recommended by `tiered-store analyze` for Engram table {name} "
        f"({int(layout['rows']):,} rows x {int(layout['dim'])}).",
        *sizing,
        "# preload_rows: the profile's hottest rows first (warm start). table.path is the "
        "layer's concatenated table",
        f"# (create it with `tiered-store init {name}.npy ...`). Replay: "
        f"tiered-store replay {name}.store.yaml {trace} --table {name}",
        "# Fewer misses at the same sizes (measured on held-out text, docs/policies.md in "
        "tiered-store's repository): "
        f"policy: zipf-tuned with profile: {name}.profile.npz in both tiers.",
        "# Compare on text the profile has not seen (`--holdout` writes it): replay this file "
        "and the one so changed,",
        f"#   tiered-store replay {name}.store.yaml {HOLDOUT_NAME} --table {name}",
    ]
    return "\n".join(head) + "\n" + dump_yaml(doc)

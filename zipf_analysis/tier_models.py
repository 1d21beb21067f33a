"""How the tier-split model treats each cache tier's policy: an LRU tier, or a ``zipf-tuned`` one
(pinned profile rows plus an LRU recency segment), at any capacity.

A ``zipf-tuned`` tier with a ``profile`` and fixed pins (``repin.enabled`` false, or ``auto``, the
default with a profile) and an LRU recency segment is modelled as the store builds it
(:meth:`tiered_store.cache_plan.CacheHierarchy.warm_start`, :func:`policies.zipf_tuned.zipf_tuned_split`):
at ``c`` rows it pins the profile's first ``P(c) = min(c - R(c), ranked)`` rows by episodes, never
evicted, and runs an LRU of the other ``R`` slots over the lookups of rows it does not pin, where
``R(c) = recency_segment_rows(counts, c, recency_window)``; the warm tier ranks after skipping the
rows hot pins. Every other policy is modelled as LRU, with a note saying so.

Examples
--------
>>> from tiered_store.config import StoreConfig
>>> config = StoreConfig.from_dict({"table": {"path": "t.npy", "dim": 16},
...                                 "tiers": {"warm": {"policy": "sieve"}}})
>>> models = tier_models(config, rows=1000)
>>> models["hot"].kind, models["warm"].kind
('lru', 'lru')
>>> models["warm"].note
"tiers.warm.policy 'sieve': modelled as LRU (the split model knows lru, and zipf-tuned with a profile, fixed pins and an LRU recency segment)"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies import PolicySpec
from policies.zipf_tuned import DEFAULT_RECENCY_WINDOW, recency_segment_rows
from tiered_store.cache_plan import load_tier_profile, parse_policy, repins_online
from tiered_store.config import StoreConfig
from tiered_store.row_cache import eviction_slot_bytes

__all__ = ["PinRanks", "TierModel", "tier_models"]

UNRANKED = np.iinfo(np.int64).max  # the rank of a row no profile ranks (never pinned)


@dataclass(frozen=True)
class TierModel:
    """One tier as the split model sees it: LRU (``ranking`` None), or zipf-tuned pins from a
    profile's ``ranking`` (row ids, most episodes first) plus an LRU recency segment."""

    tier: str  # "hot" or "warm"
    policy: str  # the config's policy spec
    ranking: np.ndarray | None = None
    counts: np.ndarray | None = None  # the profile's lookups per row: they size the recency segment
    recency_window: int = DEFAULT_RECENCY_WINDOW
    bytes_policy: str | None = "lru"  # the eviction policy whose metadata a slot carries
    bytes_admission: str = "all"  # the admission filter whose metadata the tier carries
    bytes_repin: int | None = None  # repin.sketch_width of a tier re-pinning online (its state)
    note: str | None = None  # what of the tier is not modelled as configured

    @property
    def kind(self) -> str:
        """``'lru'`` or ``'zipf-tuned'``: what is modelled."""
        return "lru" if self.ranking is None else "zipf-tuned"

    def segments(self, capacities: np.ndarray, available: int | None = None) -> np.ndarray:
        """Pinned rows at each capacity (the recency segment is the rest): 0 for LRU; for
        zipf-tuned ``min(c - R(c), available)``, ``available`` being the ranked rows not pinned
        above (default: the whole ranking).

        Examples
        --------
        >>> m = TierModel("hot", "zipf-tuned", np.array([7, 3, 9, 1]), np.array([50, 20, 10, 1]), 2)
        >>> m.segments(np.array([0, 1, 4, 100])).tolist(), m.segments(np.array([4]), 1).tolist()
        ([0, 1, 2, 4], [1])
        """
        caps = np.asarray(capacities, dtype=np.int64)
        if self.ranking is None:
            return np.zeros(caps.shape, dtype=np.int64)
        avail = self.ranking.size if available is None else available
        recency = recency_segment_rows(self.counts, caps.reshape(-1), self.recency_window)
        return np.minimum(caps - recency.reshape(caps.shape), avail)


def tier_models(
    config: StoreConfig, rows: int, layouts: Sequence[tuple[str, Mapping[str, Any]]] = ()
) -> dict[str, TierModel]:
    """How the split model treats the config's hot and warm tiers, for a table of ``rows`` rows.
    A zipf-tuned tier's profile is read and checked as the store reads it (same errors), against
    ``layouts`` (see ``load_tier_profile``)."""
    out = {}
    for name in ("hot", "warm"):
        tier = getattr(config.tiers, name)
        spec = parse_policy(tier.policy, key=f"tiers.{name}.policy")
        why = _not_modelled(name, tier, spec)
        headroom = (
            f"tiers.{name}.evict_headroom {tier.evict_headroom:g}: modelled as exact eviction "
            "(no headroom)"
            if tier.evict_headroom
            else None
        )
        if spec.text == "lru" or why is not None:
            note = "; ".join(n for n in (why, headroom) if n) or None
            out[name] = TierModel(
                name,
                spec.text,
                bytes_policy=_sized_as(spec),
                bytes_admission=spec.admission,
                bytes_repin=tier.repin.sketch_width if spec.tuned and repins_online(tier) else None,
                note=note,
            )
            continue
        profile = load_tier_profile(tier.profile, rows, f"tiers.{name}.profile", layouts=layouts)
        out[name] = TierModel(
            name,
            spec.text,
            profile.top_rows(profile.distinct, by="episodes").astype(np.int64),
            np.asarray(profile.counts),
            tier.recency_window,
            bytes_policy=spec.eviction,
            bytes_admission=spec.admission,
            note=headroom,
        )
    return out


def _sized_as(spec: PolicySpec) -> str | None:
    """The eviction policy whose metadata a tier modelled as LRU is sized with: its own, or
    LRU's (its clock and victim buffer) where that is more (its split is replayed and printed as
    LRU: ``static`` keeps none, SIEVE and LFU less)."""
    own = eviction_slot_bytes(spec.eviction)
    return spec.eviction if own >= eviction_slot_bytes("lru") else "lru"


def _not_modelled(name: str, tier, spec: PolicySpec) -> str | None:
    """Why a tier's policy is modelled as LRU (None: it is modelled as it is)."""
    key = f"tiers.{name}.policy {spec.text!r}"
    if spec.text == "lru":
        return None
    if spec.tuned and spec.eviction == "lru" and spec.admission == "all":
        if tier.profile is None:
            return f"{key} without tiers.{name}.profile learns its pins online: modelled as LRU"
        if repins_online(tier):
            return f"{key} re-pins online (tiers.{name}.repin.enabled): modelled as LRU"
        return None
    return (
        f"{key}: modelled as LRU (the split model knows lru, and zipf-tuned with a profile, fixed "
        "pins and an LRU recency segment)"
    )


def _ranks_of(ranking: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Each of ``rows``' position in ``ranking`` (UNRANKED where absent)."""
    out = np.full(rows.shape, UNRANKED, dtype=np.int64)
    if ranking.size == 0:
        return out
    order = np.argsort(ranking, kind="stable")
    at = np.minimum(np.searchsorted(ranking[order], rows), ranking.size - 1)
    found = ranking[order][at] == rows
    out[found] = order[at[found]]
    return out


class PinRanks:
    """Each trace row's place in the hot and warm pin orders, over the dense row numbers of
    :class:`zipf_analysis.tier_split.BatchEvents` (``ids``: the row id of each). A row is pinned
    in hot at ``P`` pinned rows iff its hot rank is below ``P``, and likewise in warm with its
    rank among the warm ranking's rows that hot does not pin.

    Examples
    --------
    >>> hot = TierModel("hot", "zipf-tuned", np.array([7, 3, 9]), np.ones(3, dtype=np.int64))
    >>> ranks = PinRanks(hot, hot, ids=np.array([1, 3, 7, 9]))
    >>> ranks.hot.tolist()[1:]  # row 1 is not ranked
    [1, 0, 2]
    >>> wr, available = ranks.warm_ranks(hot_pinned=1)  # hot pins row 7: warm ranks 3, 9
    >>> wr.tolist()[1:], available
    ([0, 9223372036854775807, 1], 2)
    """

    def __init__(self, hot: TierModel, warm: TierModel, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.size = ids.size
        self.hot = None if hot.ranking is None else _ranks_of(hot.ranking, ids)
        self.warm_model = warm
        if warm.ranking is None:
            return
        # where each warm-ranked row sits among the trace's rows, and in hot's ranking
        pos = _ranks_of(ids, warm.ranking)
        self._warm_dense = np.where(pos == UNRANKED, -1, pos)
        if hot.ranking is None:
            self._above = np.full(warm.ranking.size, UNRANKED, dtype=np.int64)
        else:
            self._above = _ranks_of(hot.ranking, warm.ranking)

    def hot_pinned(self, rows: np.ndarray, pinned: int) -> np.ndarray:
        """Whether each of ``rows`` (dense) is pinned in hot when it pins ``pinned`` rows."""
        if self.hot is None or pinned <= 0:
            return np.zeros(rows.shape, dtype=bool)
        return self.hot[rows] < pinned

    def warm_ranks(self, hot_pinned: int) -> tuple[np.ndarray | None, int]:
        """Each dense row's rank in warm's pin order when hot pins ``hot_pinned`` rows (UNRANKED:
        never pinned in warm), and how many ranked rows warm may pin. (None, 0) for LRU warm."""
        if self.warm_model.ranking is None:
            return None, 0
        skip = self._above < hot_pinned
        place = np.where(skip, UNRANKED, np.cumsum(~skip) - 1)
        out = np.full(self.size, UNRANKED, dtype=np.int64)
        here = self._warm_dense >= 0
        out[self._warm_dense[here]] = place[here]
        return out, int(skip.size - skip.sum())

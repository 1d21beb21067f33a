"""The store's cache decisions for one batch, shared by the live store and payload-free replay."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .row_cache import RowCache


@dataclass
class LookupPlan:
    """Where every id of a batch is served from."""

    hot_slots: torch.Tensor  # [n] int64 on the hot device; -1 where hot missed
    miss_pos: torch.Tensor  # positions of hot misses (hot device)
    unique_ids: torch.Tensor  # sorted unique ids among hot misses (CPU)
    inverse: torch.Tensor  # [len(miss_pos)] index into unique_ids (hot device)
    counts: torch.Tensor  # occurrences of each unique id (CPU)
    warm_slots: torch.Tensor  # [len(unique_ids)] warm slot or -1 (CPU)
    cold_idx: torch.Tensor  # positions in unique_ids that must be read from cold (CPU)

    @property
    def all_hit(self) -> bool:
        """Every id was served by the hot tier."""
        return self.miss_pos.numel() == 0


@dataclass
class AdmitPlan:
    """Rows to copy into each tier after the misses are fetched."""

    warm_src: torch.Tensor  # positions in unique_ids, CPU
    warm_slots: torch.Tensor
    hot_src: torch.Tensor  # positions in unique_ids, hot device
    hot_slots: torch.Tensor


class CacheHierarchy:
    """Hot over warm over cold: probes, counts, and admission decisions for whole batches."""

    def __init__(self, hot: RowCache, warm: RowCache) -> None:
        self.hot = hot
        self.warm = warm

    def plan(self, flat_ids: torch.Tensor) -> LookupPlan:
        """Probe hot, then warm for the (deduplicated) hot misses; record hits with the policies."""
        hot, warm = self.hot, self.warm
        hot.begin_batch()
        warm.begin_batch()
        hot.observe(flat_ids)
        hot_slots = hot.probe(flat_ids)
        hit = hot_slots >= 0
        miss_pos = torch.nonzero(~hit).squeeze(1)
        n, n_miss = flat_ids.numel(), miss_pos.numel()
        hot.record(hot_slots[hit] if n_miss else hot_slots, lookups=n, hits=n - n_miss)
        cpu_empty = torch.empty(0, dtype=torch.int64)
        if n_miss == 0:
            return LookupPlan(
                hot_slots, miss_pos, cpu_empty, miss_pos, cpu_empty, cpu_empty, cpu_empty
            )
        miss_ids = flat_ids[miss_pos]
        warm.observe(miss_ids)
        unique_ids, inverse, counts = torch.unique(
            miss_ids, return_inverse=True, return_counts=True
        )
        unique_cpu, counts_cpu = unique_ids.cpu(), counts.cpu()
        warm_slots = warm.probe(unique_cpu)
        warm_hit = warm_slots >= 0
        warm.record(warm_slots[warm_hit], lookups=n_miss, hits=int(counts_cpu[warm_hit].sum()))
        cold_idx = torch.nonzero(~warm_hit).squeeze(1)
        return LookupPlan(
            hot_slots, miss_pos, unique_cpu, inverse, counts_cpu, warm_slots, cold_idx
        )

    def admit(self, plan: LookupPlan) -> AdmitPlan:
        """Admit rows read from cold into warm, and every hot miss into hot, as the policies allow."""
        warm_pos, warm_slots = self.warm.admit(
            plan.unique_ids[plan.cold_idx], plan.counts[plan.cold_idx]
        )
        hot_src, hot_slots = self.hot.admit(plan.unique_ids, plan.counts)
        return AdmitPlan(plan.cold_idx[warm_pos.cpu()], warm_slots, hot_src, hot_slots)

"""A re-pin's candidate search (``zipf-tuned`` online re-pinning) against ``torch.topk``.

A tier of ``hit_rows`` slots (1M at the default size), every slot resident, 90% of them pinned,
with Pareto-distributed episode counts (the pinned mostly higher, some overlap, zeros among the
unpinned); a re-pin's budget of 2% of the pinned rows. Ours: the CPU path,
``tiered_store.sketch_kernel.repin_candidates`` (two numba passes over the slots, then a sort of
the chosen). Baseline: ``tiered_store.online_repin.candidates_torch`` (what the CUDA path runs:
``nonzero`` + ``topk`` over the unpinned and over the pinned slots), on the same tensors. Both
find the same slots (checked here, and in ``tests/test_online_repin.py``). Rates in slots
searched per second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tiered_store.online_repin import candidates_torch
from tiered_store.row_cache import merge_sorted
from tiered_store.sketch_kernel import repin_candidates

GROUP = "repin-plan"
PINNED_SHARE = 0.9  # the pinned segment of a zipf-tuned tier (the rest: its recency segment)
BUDGET_SHARE = 0.02  # repin.budget's default: rows moved per re-pin, of the pinned rows


@dataclass
class Tier:
    """One tier's slots as a plan reads them, and the budget."""

    row_of_slot: torch.Tensor
    pinned: torch.Tensor
    per_slot: torch.Tensor  # int32 [slots, 2]: float32 count bits, window stamp
    budget: int
    scratch: np.ndarray  # the plan's 16-bit key per slot, kept across plans as OnlineRepin does

    @property
    def counts(self) -> torch.Tensor:
        """The float32 counts (a view)."""
        return self.per_slot.view(torch.float32)[:, 0]


@pytest.fixture(scope="module")
def tier(sizes) -> Tier:
    """The tier, and a check that both searches choose the same slots."""
    n = sizes.hit_rows
    rng = np.random.default_rng(3)
    pinned = np.zeros(n, dtype=bool)
    pinned[rng.permutation(n)[: int(PINNED_SHARE * n)]] = True
    counts = (rng.pareto(1.2, n) * np.where(pinned, 4.0, 1.0) * (rng.random(n) < 0.9)).astype(
        np.float32
    )
    per_slot = np.zeros((n, 2), dtype=np.int32)
    per_slot.view(np.float32)[:, 0] = counts
    out = Tier(
        torch.from_numpy(rng.permutation(n).astype(np.int64)),
        torch.from_numpy(pinned),
        torch.from_numpy(per_slot),
        max(1, int(BUDGET_SHARE * PINNED_SHARE * n)),
        np.empty(n, dtype=np.uint16),
    )
    ours, base = _ours(out), _baseline(out)
    assert np.array_equal(ours[1], base[1].numpy()) and np.array_equal(ours[3], base[3].numpy())
    return out


def _ours(tier: Tier) -> tuple:
    """The CPU search."""
    args = (tier.row_of_slot.numpy(), tier.pinned.numpy(), tier.per_slot.numpy(), tier.budget)
    return repin_candidates(*args, tier.scratch)


def _baseline(tier: Tier) -> tuple:
    """The torch search (the CUDA path's ops)."""
    return candidates_torch(tier.row_of_slot, tier.pinned, tier.counts, tier.budget)


def test_topk_candidates(benchmark, speed, tier: Tier) -> None:
    speed.measure(
        benchmark,
        lambda: _baseline(tier),
        group=GROUP,
        per_call=tier.row_of_slot.numel(),
        unit="slots",
        baseline=True,
    )


def test_repin_candidates(benchmark, speed, tier: Tier) -> None:
    speed.measure(
        benchmark,
        lambda: _ours(tier),
        group=GROUP,
        per_call=tier.row_of_slot.numel(),
        unit="slots",
    )
    benchmark.extra_info["budget"] = tier.budget


# -- a re-pin's unpinned slots joining the victim buffer ------------------------------------------
BUFFER_GROUP = "repin-buffer-merge"
UNPINNED_PER_REPIN = 200  # slots a re-pin unpins that join the buffer (a budget's worth, small)


@pytest.fixture(scope="module")
def buffer(sizes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A victim buffer of ``hit_rows / 4`` slots (250,000 at the default size: a sixteenth of a
    4M-slot tier) with LRU keys (one stamp per 4,096-slot batch, so keys repeat), and the slots
    a re-pin unpins with their keys; both merges give the same buffer."""
    n = max(1, sizes.hit_rows // 4)
    gen = torch.Generator().manual_seed(11)
    keys = torch.arange(n, dtype=torch.int64) // 4096
    slots = torch.randperm(4 * n, generator=gen)[: n + UNPINNED_PER_REPIN]
    new_keys = torch.randint(0, int(keys[-1]) + 1, (UNPINNED_PER_REPIN,), generator=gen)
    out = (slots[:n], keys, slots[n:], new_keys)
    ours, base = merge_sorted(*out), _sort_of_both(*out)
    assert torch.equal(ours[0], base[0]) and torch.equal(ours[1], base[1])
    return out


def _sort_of_both(slots, keys, new_slots, new_keys) -> tuple[torch.Tensor, torch.Tensor]:
    """A stable sort of the buffer and the new slots together (the merge before)."""
    keys = torch.cat([keys, new_keys])
    order = torch.argsort(keys, stable=True)
    return torch.cat([slots, new_slots])[order], keys[order]


def test_stable_sort_of_the_buffer(benchmark, speed, buffer) -> None:
    speed.measure(
        benchmark,
        lambda: _sort_of_both(*buffer),
        group=BUFFER_GROUP,
        per_call=buffer[0].numel(),
        unit="slots",
        baseline=True,
    )


def test_merge_sorted_into_the_buffer(benchmark, speed, buffer) -> None:
    speed.measure(
        benchmark,
        lambda: merge_sorted(*buffer),
        group=BUFFER_GROUP,
        per_call=buffer[0].numel(),
        unit="slots",
    )

"""A victim-buffer refill of a tier that pins most of its slots, against the policy's own search.

A ``zipf-tuned`` tier of 4 x ``hit_rows`` slots (4M at the default size), every slot resident,
99% of them pinned (the rest: its recency segment, about one window's distinct rows, as on a
large tier), LRU stamps from a shuffled history. A refill asks for every evictable slot in key
order (the buffer's size, ``capacity / 16``, is more than the recency segment holds). Ours: the
LRU policy's ``smallest_keys`` (its sampled threshold finds too few evictable slots, and the
search over few unprotected slots makes a pass over the pin flags, then a ``topk`` over the
evictable slots). Baseline: a ``topk`` over every slot's key, the protected masked (what the
search did before). Both return the same slots in the same order (checked here, and per
batch in ``tests/test_row_cache.py``). Rates in slots searched per second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies import PolicySpec
from tiered_store.row_cache import RowCache

GROUP = "victim-refill"
EVICTABLE_SHARE = 0.01  # the unpinned (recency) segment of a large zipf-tuned tier


@pytest.fixture(scope="module")
def tier(sizes) -> RowCache:
    """The tier, and a check that both searches choose the same slots in the same order."""
    n = 4 * sizes.hit_rows
    cache = RowCache("warm", num_rows=n, capacity=n, spec=PolicySpec.parse("zipf-tuned"))
    order = torch.from_numpy(np.random.default_rng(3).permutation(n))
    unpinned = int(EVICTABLE_SHARE * n)
    cache.preload(torch.sort(order[unpinned:]).values, pin=True)
    cache.preload(torch.sort(order[:unpinned]).values, pin=False)
    cache.eviction.last_used.copy_(torch.from_numpy(np.random.default_rng(4).permutation(n)))
    assert int((cache.row_of_slot < 0).sum()) == 0
    ours, base = _ours(cache), _baseline(cache)
    assert torch.equal(ours[0], base[0]) and torch.equal(ours[1], base[1])
    return cache


def _evictable(cache: RowCache) -> int:
    """Slots resident and not pinned (every slot is resident)."""
    return cache.capacity - cache.pinned_count


def _ours(cache: RowCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The refill's search: the policy's, over the evictable slots."""
    return cache.eviction.smallest_keys(_evictable(cache), cache._unevictable)


def _baseline(cache: RowCache) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``topk`` over every slot."""
    keys = cache.eviction.victim_priority().masked_fill(
        cache._unevictable, torch.iinfo(torch.int64).max
    )
    return torch.topk(keys, _evictable(cache), largest=False, sorted=True)


def test_topk_over_every_slot(benchmark, speed, tier: RowCache) -> None:
    speed.measure(
        benchmark,
        lambda: _baseline(tier),
        group=GROUP,
        per_call=tier.capacity,
        unit="slots",
        baseline=True,
    )


def test_smallest_keys_over_the_evictable(benchmark, speed, tier: RowCache) -> None:
    speed.measure(
        benchmark,
        lambda: _ours(tier),
        group=GROUP,
        per_call=tier.capacity,
        unit="slots",
    )

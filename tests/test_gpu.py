"""The CUDA path: hot tier on the GPU, pinned warm tier, copies on the store's side stream.

Skipped without CUDA (marker ``gpu``); the same code runs on CPU in the other tests.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_concurrent_lookups_exact, make_table, store_config
from tiered_store import TieredStore
from tiered_store.workload import ZipfWorkload

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_store(tmp_path):
    path, data = make_table(tmp_path, rows=20000, dim=32, dtype="float16")
    cfg = store_config(path, hot={"capacity": 2000, "device": "cuda"}, warm={"capacity": 6000})
    with TieredStore(cfg) as store:
        yield store, data


def test_hot_tier_on_cuda_and_warm_pinned(gpu_store):
    store, _ = gpu_store
    assert store.hot_pool.rows.is_cuda
    assert store.warm_pool.rows.is_pinned()
    assert store.hot.index.slot_of.is_cuda


def test_lookup_on_cuda_is_bit_exact(gpu_store):
    store, data = gpu_store
    workload = ZipfWorkload(20000, 0.9, seed=0)
    for _ in range(10):
        ids = torch.from_numpy(workload.sample((8, 512)))
        out = store.lookup(ids.cuda())
        assert out.is_cuda
        assert torch.equal(out.cpu(), data[ids])


def test_prefetch_on_side_stream_is_ordered_with_compute(gpu_store):
    store, data = gpu_store
    workload = ZipfWorkload(20000, 0.9, seed=1)
    batches = [torch.from_numpy(workload.sample(4096)) for _ in range(8)]
    handles = [store.prefetch(b) for b in batches[:2]]
    for i, ids in enumerate(batches):
        a = torch.randn(1024, 1024, device="cuda")
        _ = a @ a  # compute on the default stream meanwhile
        out = store.lookup(ids, handles[i])
        if i + 2 < len(batches):
            handles.append(store.prefetch(batches[i + 2]))
        assert torch.equal(out.cpu(), data[ids])


def test_concurrent_lookups_on_cuda(gpu_store):
    store, data = gpu_store
    assert_concurrent_lookups_exact(store, data, batch=1000, rounds=10)


def test_online_re_pinning_with_the_hot_tier_on_cuda(tmp_path):
    # zipf-tuned with no profile on a CUDA hot tier: counts on the GPU (torch ops), re-pins in
    # the background thread on the store's stream; lookups stay exact and the heavy rows get
    # pinned, as replay (on the CPU) would pin them
    import numpy as np

    path, data = make_table(tmp_path, rows=20000, dim=32, dtype="float16")
    tier = {"policy": "zipf-tuned", "recency_window": 4096, "repin": {"every": 4096}}
    cfg = store_config(path, hot={"capacity": 2000, "device": "cuda", **tier})
    heavy = np.random.default_rng(0).choice(20000, 300, replace=False)
    rng = np.random.default_rng(1)
    with TieredStore(cfg) as store:
        for _ in range(200):
            ids = torch.from_numpy(
                np.concatenate([rng.choice(heavy, 512), rng.integers(0, 20000, 512)])
            )
            assert torch.equal(store.lookup(ids.cuda()).cpu(), data[ids])
            assert store.wait_repinned(timeout=30)
        assert store.hot.online.slot_count.is_cuda and store.hot.online.repins > 20
        pinned = set(store.hot.pinned_rows().cpu().tolist())
        assert len(set(heavy.tolist()) & pinned) > 250


def test_counting_hits_on_cuda_does_not_wait_for_the_device():
    # a window's hits are counted per batch: on CUDA that must queue work, never sync the host
    # (boolean indexing would); the count matches the distinct slots first hit in the window
    from tiered_store.online_repin import count_hits_torch

    counts = torch.zeros(1000, device="cuda")
    stamps = torch.full((1000,), -1, dtype=torch.int32, device="cuda")
    slots = torch.randint(0, 1000, (5000,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = count_hits_torch(counts, stamps, slots, 3, 1.5)
        again = count_hits_torch(counts, stamps, slots[:100], 3, 1.5)  # counted already
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(first) == slots.unique().numel() and int(again) == 0
    assert float(counts.sum()) == 1.5 * slots.unique().numel()

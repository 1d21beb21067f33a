"""The CUDA path: hot tier on the GPU, rows staged in pinned memory, work on the store's stream.

Skipped without CUDA (marker ``gpu``); the same code runs on CPU in the other tests.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import assert_concurrent_lookups_exact, make_table, store_config
from tiered_store import PrefetchHandleError, TieredStore
from tiered_store.workload import ZipfWorkload

pytestmark = pytest.mark.gpu

SPIN = 2_000_000_000  # clock cycles of torch.cuda._sleep: about a second


def _busy(stream: torch.cuda.Stream) -> None:
    """Keep ``stream`` busy for about a second, after every earlier piece of work is done."""
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SPIN)


@pytest.fixture
def gpu_store(tmp_path):
    path, data = make_table(tmp_path, rows=20000, dim=32, dtype="float16")
    cfg = store_config(path, hot={"capacity": 2000, "device": "cuda"}, warm={"capacity": 6000})
    with TieredStore(cfg) as store:
        yield store, data


def test_hot_tier_on_cuda_and_warm_pageable(gpu_store):
    """The warm tier is pageable: pinning it would lock a power of two above its size, for
    nothing, since its rows reach the GPU through a pinned staging buffer."""
    store, _ = gpu_store
    assert store.hot_pool.rows.is_cuda
    assert not store.warm_pool.rows.is_pinned() and store._pin
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


def test_prefetching_cpu_ids_does_not_wait_for_the_callers_queued_compute(gpu_store):
    # ids on the CPU need nothing from the caller's stream: the fetch runs while the caller's
    # queued work (a spin of about a second) is still running, and its rows are exact
    store, data = gpu_store
    ids = torch.arange(0, 20000, 7)
    store.lookup(ids + 3)  # misses of other rows: kernels loaded (lazily: it may sync) before
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # clock cycles on the current stream: ~1 s
    handle = store.prefetch(ids)
    handle.future.result(timeout=30)  # the worker has fetched them (and queued its copies)
    assert not torch.cuda.current_stream().query()  # while the caller's work still runs
    assert torch.equal(store.lookup(ids, handle).cpu(), data[ids])


def test_writes_and_commits_racing_prefetches_on_cuda(tmp_path):
    # writes, commits and prefetched lookups from two threads on a CUDA hot tier: every change to
    # the tier's device state is on the store's stream, so each lookup sees the rows written
    # before it and the committed rows are the written ones
    import threading

    path, data = make_table(tmp_path, rows=5000, dim=16, dtype="float32")
    cfg = store_config(path, hot={"capacity": 500, "device": "cuda"}, warm={"capacity": 1500})
    written = data.clone()
    with TieredStore(cfg) as store:
        stop = threading.Event()
        errors = []

        def read() -> None:
            rng = torch.Generator().manual_seed(1)
            while not stop.is_set():
                ids = torch.randint(0, 2500, (512,), generator=rng)  # rows 2500+ are written
                try:
                    out = store.lookup(ids, store.prefetch(ids)).cpu()
                    if not torch.equal(out, data[ids]):
                        errors.append("a lookup of unwritten rows changed")
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(repr(exc))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for step in range(1, 41):
                ids = torch.randint(
                    2500, 5000, (200,), generator=torch.Generator().manual_seed(step)
                )
                rows = torch.full((200, 16), float(step), device="cuda")
                store.write(ids, rows)
                written[ids] = float(step)
                assert torch.equal(store.lookup(ids.cuda()).cpu(), written[ids])
                if step % 5 == 0:
                    store.commit(step)
        finally:
            stop.set()
            reader.join()
        assert not errors, errors[:3]
        everything = torch.arange(5000)
        assert torch.equal(store.read_committed(everything)[1], written)
        assert torch.equal(store.lookup(everything.cuda()).cpu(), written)


def test_a_hashed_index_and_announced_requests_on_cuda(tmp_path):
    # the hashed index (V4.1's tables pick it) probing on the GPU inside a live store, requests
    # announced and released with ids on the GPU, and a handle collected with equal ids that are
    # another tensor: every lookup exact
    path, data = make_table(tmp_path, rows=20000, dim=32, dtype="float16")
    hot = {"capacity": 800, "device": "cuda", "index": "hashed"}
    cfg = store_config(path, hot=hot, warm={"capacity": 3000, "index": "hashed"})
    workload = ZipfWorkload(20000, 0.9, seed=2)
    batches = [torch.from_numpy(workload.sample(1024)).cuda() for _ in range(24)]
    with TieredStore(cfg) as store:
        assert store.hot.index.kind == "hashed" and store.hot.index.keys.is_cuda
        waiting = [store.announce(b) for b in batches[:4]]
        for i, ids in enumerate(batches):
            handle = store.prefetch(ids)
            out = store.lookup(ids.clone(), handle)  # equal ids, another tensor
            assert torch.equal(out.cpu(), data[ids.cpu()])
            store.release(waiting.pop(0))
            if i + 4 < len(batches):
                waiting.append(store.announce(batches[i + 4]))
        assert store.stats()["hot"]["hits"] > 0


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
        torch.cuda.synchronize()  # the last re-pin's flags were set on the store's stream
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


def test_a_snapshot_of_pinned_ids_is_pinned():
    """The pipeline pins a batch's ids so the model's copy to the GPU is asynchronous; the
    model's snapshot of them (the caller may refill its buffer) must not undo that."""
    from tiered_store.id_ops import snapshot_of

    buffer = torch.arange(6).reshape(2, 3).pin_memory()
    copy = snapshot_of(buffer.view(-1), buffer)
    assert copy.is_pinned() and copy.data_ptr() != buffer.data_ptr()
    assert copy.tolist() == list(range(6))


def test_write_and_read_committed_take_their_ids_while_the_store_stream_is_busy(gpu_store):
    # write() and read_committed() use their ids on the host: with the store's stream busy (as
    # queued fetches keep it) they must not read a copy of the ids that stream has yet to make
    # (CPU ids, copied there without waiting, and int32 ids on the GPU, converted there)
    store, data = gpu_store
    ids, ids32, unwritten = (
        torch.arange(1000, 1256),
        torch.arange(2000, 2100),
        torch.arange(3000, 3100),
    )
    rows = (10 + torch.arange(256.0)).unsqueeze(1).expand(256, 32).to(torch.float16)
    _busy(store._stream)
    store.write(ids, rows)
    _busy(store._stream)
    store.write(ids32.to("cuda", torch.int32), -rows[:100])
    store.commit()
    assert torch.equal(store.read_committed(ids)[1], rows)
    everything = torch.cat([ids, ids32, unwritten])
    _busy(store._stream)
    step, got = store.read_committed(everything)
    assert step == 1 and torch.equal(got, torch.cat([rows, -rows[:100], data[unwritten]]))
    assert torch.equal(store.lookup(everything.cuda()).cpu(), got)


def test_pinned_ids_may_be_refilled_as_soon_as_prefetch_returns(gpu_store):
    # with the store's stream busy (earlier fetches queued) the asynchronous copy of pinned ids
    # to the device has not run when prefetch returns: it must copy the ids as prefetched, not
    # the caller's buffer refilled meanwhile
    store, data = gpu_store
    ids = torch.arange(0, 20000, 9)
    buffer = ids.pin_memory()
    _busy(store._stream)
    handle = store.prefetch(buffer)
    buffer.fill_(0)
    with pytest.raises(PrefetchHandleError):
        store.lookup(buffer, handle)  # other ids now
    assert torch.equal(store.lookup(ids, handle).cpu(), data[ids])


def test_collecting_a_prefetch_of_cpu_ids_does_not_synchronize(gpu_store):
    # lookup(ids, handle) checks ids on the CPU against the handle's snapshot on the host: no
    # copy to the device, no wait for the store's stream (which may hold later batches' copies)
    store, data = gpu_store
    ids = torch.arange(0, 20000, 13)
    handle = store.prefetch(ids)
    handle.future.result(timeout=30)  # the worker's own syncs done: the debug mode is global
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = store.lookup(ids.clone(), handle)  # equal ids, another buffer: checked
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out.cpu(), data[ids])


def test_announce_release_and_save_leave_prefetches_free_of_the_callers_queued_compute(gpu_store):
    # announce, release and a save need nothing the caller queued on its stream (their inputs
    # are on the host): a prefetch after each still runs while the caller's queued work (a spin
    # of about a second) does. Each round fetches rows none fetched before, so the fetch reads
    # its misses' ids on the host and waits for everything its stream was made to wait for
    store, data = gpu_store
    # a first round without spins: the first run of each step compiles, imports or loads its
    # kernels (CUDA loads them lazily, which may synchronize), which the spins must not wait for
    for spin in (False, True):
        request = None
        for i, step in enumerate(("announce", "release", "save")):
            ids = torch.arange(i + 3 * spin, 20000, 11)  # rows no round fetched before
            if spin:
                _busy(torch.cuda.current_stream())
            if step == "announce":
                request = store.announce(ids)
            elif step == "release":
                store.release(request)
            else:
                store.save_restart()
            handle = store.prefetch(ids)
            handle.future.result(timeout=30)
            assert not spin or not torch.cuda.current_stream().query(), step
            assert torch.equal(store.lookup(ids, handle).cpu(), data[ids])


def test_close_leaves_no_work_queued_on_the_store_stream(tmp_path):
    # the tiers' device memory (slots, index, policy state) is allocated on the opener's stream
    # and written on the store's: once the store is closed and dropped, the allocator hands that
    # memory to the opener's next tensors, so close must not return while the store's stream
    # still runs work on it (here a spin of about a second; in use, the admissions of a prefetch
    # nobody collected)
    path, _ = make_table(tmp_path, rows=20000, dim=32, dtype="float16")
    store = TieredStore(store_config(path, hot={"capacity": 2000, "device": "cuda"}))
    store.lookup(torch.arange(0, 20000, 7))  # kernels loaded (lazily: it may sync) before
    _busy(store._stream)
    store.close()
    assert store._stream.query()

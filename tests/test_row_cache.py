"""RowCache and batch policies: invariants, and exact agreement with scalar reference policies."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import LRU, PolicySpec, ScalarLRU, known_names
from policies.errors import PolicyError
from tests.conftest import check_cache_invariants, run_batch
from tiered_store.cache_plan import parse_policy
from tiered_store.errors import ConfigError, RowIdError
from tiered_store.row_cache import RowCache


def _access_one(cache: RowCache, row: int) -> bool:
    """Drive a RowCache one request at a time, as the store does for a batch of one."""
    ids = torch.tensor([row])
    cache.begin_batch()
    slots = cache.probe(ids)
    hit = bool(slots[0] >= 0)
    cache.record(slots[slots >= 0], ids[slots < 0], lookups=1, hits=int(hit))
    if not hit:
        cache.admit(ids, torch.ones(1, dtype=torch.int64))
    return hit


def _check_invariants(cache: RowCache) -> None:
    check_cache_invariants(cache)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 12),
    trace=st.lists(st.integers(0, 30), min_size=1, max_size=200),
)
def test_batched_lru_per_request_equals_scalar_lru(capacity, trace):
    cache = RowCache("t", num_rows=31, capacity=capacity, spec=PolicySpec.parse("lru"))
    reference = ScalarLRU(capacity)
    for row in trace:
        assert _access_one(cache, row) == reference.access(row)
    _check_invariants(cache)
    assert cache.counters.hits + cache.counters.misses == len(trace)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 40),
    headroom=st.sampled_from([0.0, 0.1, 0.5]),
    batches=st.lists(
        st.lists(st.integers(0, 99), min_size=0, max_size=60), min_size=1, max_size=20
    ),
)
def test_batched_admission_keeps_index_consistent(capacity, headroom, batches):
    cache = RowCache(
        "t", num_rows=100, capacity=capacity, spec=PolicySpec.parse("lru"), evict_headroom=headroom
    )
    for batch in batches:
        ids = torch.tensor(batch, dtype=torch.int64)
        cache.begin_batch()
        slots = cache.probe(ids)
        cache.record(
            slots[slots >= 0], ids[slots < 0], lookups=ids.numel(), hits=int((slots >= 0).sum())
        )
        miss = ids[slots < 0]
        uniq, counts = torch.unique(miss, return_counts=True)
        cache.admit(uniq, counts)
        _check_invariants(cache)
        # everything this batch missed is now resident when it fits
        if uniq.numel() <= capacity:
            assert bool((cache.probe(uniq) >= 0).all())


@settings(max_examples=40, deadline=None)
@given(
    capacity=st.integers(1, 60),
    buffer=st.sampled_from([1, 3, 50]),
    spec=st.sampled_from(["lru", "lru+tinylfu", "static+lru"]),
    headroom=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_buffered_victims_are_exactly_the_topk_victims(capacity, buffer, spec, headroom, seed):
    # LRU keys only grow, so victims buffered from one topk equal a topk per batch, slot for slot;
    # tinylfu refuses candidates (their victims are reinstated), static pins rows.
    rng = np.random.default_rng(seed)
    caches = [
        RowCache(
            "t",
            num_rows=200,
            capacity=capacity,
            spec=PolicySpec.parse(spec),
            evict_headroom=headroom,
            victim_buffer=b,
        )
        for b in (0, buffer)
    ]
    for cache in caches:
        cache.preload(torch.arange(capacity // 4), pin=spec.startswith("static"))
    for _ in range(30):
        ids = torch.from_numpy((rng.zipf(1.3, size=int(rng.integers(1, 40))) - 1) % 200)
        for cache in caches:
            run_batch(cache, ids)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot)
        assert caches[0].counters == caches[1].counters
    _check_invariants(caches[1])


def test_lru_evicts_least_recent_batch_first():
    cache = RowCache("t", num_rows=10, capacity=3, spec=PolicySpec.parse("lru"))
    for batch in ([1, 2], [3], [1]):  # 2 is now the least recent
        ids = torch.tensor(batch)
        cache.begin_batch()
        slots = cache.probe(ids)
        cache.record(
            slots[slots >= 0], ids[slots < 0], lookups=len(batch), hits=int((slots >= 0).sum())
        )
        cache.admit(ids[slots < 0], torch.ones(int((slots < 0).sum()), dtype=torch.int64))
    cache.begin_batch()
    cache.admit(torch.tensor([7]), torch.ones(1, dtype=torch.int64))
    resident = set(torch.nonzero(cache.probe(torch.arange(10)) >= 0).squeeze(1).tolist())
    assert resident == {1, 3, 7}
    assert cache.counters.evictions == 1


def test_static_pins_rows_and_admits_nothing_else():
    cache = RowCache("t", num_rows=50, capacity=4, spec=PolicySpec.parse("static"))
    pos, slots = cache.preload(torch.tensor([5, 6, 5, 7]), pin=True)
    assert pos.tolist() == [0, 1, 3]
    cache.begin_batch()
    cache.admit(torch.tensor([1, 2, 3]), torch.ones(3, dtype=torch.int64))  # one free slot left
    assert cache.occupancy == 4
    cache.begin_batch()
    cache.admit(torch.tensor([9]), torch.ones(1, dtype=torch.int64))  # full, nothing to evict
    assert int(cache.probe(torch.tensor([9]))[0]) == -1
    assert bool((cache.probe(torch.tensor([5, 6, 7])) >= 0).all())


def test_static_plus_lru_never_evicts_pinned_rows():
    cache = RowCache("t", num_rows=1000, capacity=8, spec=PolicySpec.parse("static+lru"))
    cache.preload(torch.tensor([0, 1, 2]), pin=True)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = torch.from_numpy(rng.integers(3, 1000, size=10))
        cache.begin_batch()
        slots = cache.probe(ids)
        cache.record(slots[slots >= 0], ids[slots < 0], lookups=10, hits=int((slots >= 0).sum()))
        uniq, counts = torch.unique(ids[slots < 0], return_counts=True)
        cache.admit(uniq, counts)
        _check_invariants(cache)
    assert bool((cache.probe(torch.tensor([0, 1, 2])) >= 0).all())
    assert cache.counters.evictions > 0


def test_zero_capacity_tier_holds_nothing():
    cache = RowCache("t", num_rows=10, capacity=0, spec=PolicySpec.parse("lru"))
    cache.begin_batch()
    assert cache.admit(torch.tensor([1]), torch.ones(1, dtype=torch.int64))[0].numel() == 0
    assert cache.probe(torch.tensor([1, 2])).tolist() == [-1, -1]
    assert cache.metadata_bytes()["per_table_row"] == 0


def test_more_new_rows_than_capacity_keeps_the_most_used():
    cache = RowCache("t", num_rows=10, capacity=2, spec=PolicySpec.parse("lru"))
    cache.begin_batch()
    cache.admit(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 5, 1, 9]))
    assert set(torch.nonzero(cache.probe(torch.arange(10)) >= 0).squeeze(1).tolist()) == {2, 4}
    assert cache.counters.rejections == 2


@pytest.mark.parametrize("bad", ["", "lfu9", "lru+lru", "all"])
def test_unknown_or_malformed_policy_names_are_errors(bad):
    with pytest.raises(PolicyError):
        PolicySpec.parse(bad)
    with pytest.raises(ConfigError) as info:
        parse_policy(bad, key="tiers.hot.policy")
    assert "tiers.hot.policy" in str(info.value)


def test_unknown_policy_error_lists_known_names():
    with pytest.raises(PolicyError, match=r"expected an eviction policy \(fifo, lfu, lru, sieve\)"):
        PolicySpec.parse("bogus")
    with pytest.raises(ConfigError, match="tiers.hot.policy: unknown policy 'lur' in 'lur'; did you mean 'lru'"):  # fmt: skip
        parse_policy("lur", key="tiers.hot.policy")
    assert "lru" in known_names()


def test_lru_doc_example():
    lru = LRU(capacity=3)
    lru.on_batch()
    lru.on_insert(torch.tensor([0, 1, 2]))
    lru.on_batch()
    lru.on_hit(torch.tensor([0, 2]))
    assert lru.choose_victims(1, torch.zeros(3, dtype=torch.bool)).tolist() == [1]


def test_a_tier_pinned_almost_full_refills_its_victims_as_a_topk_over_every_slot_would():
    # where at most 1/8 of the slots are evictable the search looks at those alone (a pass over
    # the pin flags): each search returns what a topk over every slot does, and the victims, in
    # order, are those of a topk per eviction
    from policies.base import SPARSE_SHARE

    caches = [
        RowCache("warm", num_rows=5000, capacity=400, spec=PolicySpec.parse("zipf-tuned"), **kw)
        for kw in ({}, {"victim_buffer": 0})  # the second: a topk per eviction
    ]
    for cache in caches:
        cache.preload(torch.arange(370), pin=True)
    refills = []
    eviction = caches[0].eviction
    search = eviction.smallest_keys

    def checked(k: int, protected: torch.Tensor):
        refills.append(int((~protected).sum()))
        keys, slots = search(k, protected)
        every = eviction.victim_priority().masked_fill(protected, torch.iinfo(torch.int64).max)
        want_keys, want_slots = torch.topk(every, k, largest=False, sorted=True)
        assert torch.equal(keys, want_keys) and torch.equal(slots, want_slots)
        return keys, slots

    eviction.smallest_keys = checked
    rng = np.random.default_rng(7)
    for i in range(80):
        batch = rng.integers(0, 5000, 12)
        for cache in caches:
            run_batch(cache, batch)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot), i
    assert len(refills) > 5
    assert all(0 < n * SPARSE_SHARE <= caches[0].capacity for n in refills)


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the tensors an object holds: its attributes, tuples and lists of them, nested
    objects (each storage once)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, tuple | list):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@pytest.mark.parametrize("policy", ["lru", "sieve", "zipf-tuned"])
def test_metadata_bytes_cover_every_tensor_a_tier_holds(policy):
    # an LRU tier's victim buffer (a slot and a key per entry, up to every evictable slot when a
    # batch needs many victims) was left out: 11.6 B a slot more than metadata_bytes said here
    rows, capacity = 200_000, 20_000
    cache = RowCache("hot", num_rows=rows, capacity=capacity, spec=PolicySpec.parse(policy))
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        run_batch(cache, torch.randint(0, rows, (3000,), generator=g))
    meta = cache.metadata_bytes()
    counted = capacity * meta["per_slot"] + rows * meta["per_table_row"] + meta["per_tier"]
    assert _tensor_bytes(cache, set()) <= counted


def test_merging_unpinned_slots_into_the_victim_buffer_equals_a_stable_sort_of_both():
    """A re-pin's unpinned slots joined the victim buffer through a stable argsort of the whole
    buffer under the store's lock (18 ms a re-pin at 4M slots); merge_sorted places them by
    binary search instead. Same order, ties included (LRU keys repeat within a batch)."""
    from tiered_store.row_cache import merge_sorted

    gen = torch.Generator().manual_seed(7)
    for n, m, span in ((0, 3, 4), (1, 1, 1), (50, 7, 5), (1000, 200, 40), (300, 300, 1000)):
        keys = torch.sort(torch.randint(0, span, (n,), generator=gen)).values
        slots = torch.randperm(n + m, generator=gen)
        new_keys = torch.randint(0, span, (m,), generator=gen)
        want = torch.argsort(torch.cat([keys, new_keys]), stable=True)
        got = merge_sorted(slots[:n], keys, slots[n:], new_keys)
        assert torch.equal(got[0], slots[want]), (n, m, span)
        assert torch.equal(got[1], torch.cat([keys, new_keys])[want]), (n, m, span)


@pytest.mark.parametrize("index", ["dense", "hashed"])
@pytest.mark.parametrize("spec", ["lru", "sieve", "lfu", "fifo"])
@pytest.mark.parametrize("bad", [12, -1])
def test_an_id_outside_the_table_is_refused_before_the_tier_changes(index, spec, bad):
    """A hashed tier's admit evicted its victims (dropped from the index) and then refused the
    id outside the table, leaving the slots owned by rows the index no longer knew; admit and
    preload now refuse such an id before they change anything."""
    cache = RowCache("warm", num_rows=10, capacity=4, spec=PolicySpec.parse(spec), index=index)
    run_batch(cache, [0, 1, 2, 3])
    owners, counters = cache.row_of_slot.clone(), cache.counters.as_dict()
    for call in (
        lambda: cache.admit(torch.tensor([5, bad, 6]), torch.ones(3, dtype=torch.int64)),
        lambda: cache.preload(torch.tensor([5, bad]), pin=False),
    ):
        with pytest.raises(IndexError, match=rf"warm tier: .*{bad}.*expected row ids in \[0, 10\)"):
            call()
        _check_invariants(cache)
        assert torch.equal(cache.row_of_slot, owners) and cache.counters.as_dict() == counters
    run_batch(cache, [7, 8, 9])  # and it goes on serving
    _check_invariants(cache)
    assert bool((cache.probe(torch.tensor([7, 8, 9])) >= 0).all())


def _probe_and_record(cache: RowCache, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch up to its admission (as ``run_batch``); returns its unique misses and counts."""
    ids = torch.tensor(batch, dtype=torch.int64)
    cache.begin_batch()
    cache.observe(ids)
    slots = cache.probe(ids)
    hit = slots >= 0
    cache.record(slots[hit], ids[~hit], lookups=ids.numel(), hits=int(hit.sum()))
    return torch.unique(ids[~hit], return_counts=True)


@pytest.mark.parametrize("spec", ["lru", "lfu", "sieve", "lru+tinylfu", "static+lru"])
@pytest.mark.parametrize("headroom", [0.0, 0.25])
def test_an_eviction_hook_that_raises_leaves_the_tier_as_before_the_admission(spec, headroom):
    """``before_evict`` (the write-back's spill of dirty victims, which may run out of memory)
    raised after the admission had taken free slots off the free list: they stayed taken and
    empty (occupancy counted them; SIEVE never queued them, so they were lost for good). The
    free slots now return and the victims stay; LRU and LFU then decide as a tier that never
    tried that admission."""
    rng = np.random.default_rng(7)
    caches = [
        RowCache(
            "warm", num_rows=60, capacity=12, spec=PolicySpec.parse(spec), evict_headroom=headroom
        )
        for _ in range(2)
    ]
    for cache in caches:
        cache.preload(torch.tensor([50, 51]), pin=True)
    for batch in ([1, 2, 3], [4, 5, 1, 6]):
        for cache in caches:
            run_batch(cache, batch)

    def spill(slots: torch.Tensor) -> None:
        raise MemoryError("out of memory copying dirty rows out")

    failing, twin = caches
    failing.before_evict = spill
    for batch in ([7, 8, 9, 10, 11, 12, 13, 1, 2], [14, 15, 16, 17, 18, 19, 20, 21, 22, 23]):
        for cache in caches:
            missed, counts = _probe_and_record(cache, batch)
        with pytest.raises(MemoryError):
            failing.admit(missed, counts)
        _check_invariants(failing)
        assert failing.occupancy == int((failing.row_of_slot >= 0).sum()) == 8
    failing.before_evict = None
    for _ in range(30):
        batch = rng.integers(0, 40, 9).tolist()
        for cache in caches:
            run_batch(cache, batch)
        _check_invariants(failing)
        if not spec.startswith("sieve"):  # SIEVE's hand moved on over the victims it chose
            assert torch.equal(failing.row_of_slot, twin.row_of_slot)
    assert failing.occupancy == twin.occupancy > 8  # its free slots were filled again


def _raise_once(owner: object, name: str) -> None:
    """``owner.name`` raises MemoryError on its next call (out of memory there), then works."""
    real = getattr(owner, name)
    calls = []

    def once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise MemoryError(f"out of memory in {name}")
        return real(*args, **kwargs)

    setattr(owner, name, once)


@pytest.mark.parametrize("spec", ["lru", "lfu", "sieve", "lru+tinylfu", "static+lru"])
@pytest.mark.parametrize("index", ["dense", "hashed"])
@pytest.mark.parametrize("where", ["index.delete", "index.set", "eviction.on_insert"])
def test_an_admission_that_raises_once_rows_moved_leaves_its_slots_empty(spec, index, where):
    """Past the eviction hook (dirty victims written back) an admission that raised (out of
    memory in the index or the policy) left victims dropped from the index but still owning
    their slots, free slots taken and empty, or rows SIEVE never queued (every later eviction
    then 'fewer than n evictable slots'); the store then writes no row into those slots. Its
    slots are now left empty and free: victims evicted, new rows not cached, the tier goes on."""
    cache = RowCache(
        "warm", num_rows=60, capacity=12, spec=PolicySpec.parse(spec), index=index,
        evict_headroom=0.25,
    )  # fmt: skip
    cache.preload(torch.tensor([50, 51]), pin=True)
    for batch in ([1, 2, 3], [4, 5, 1, 6], [7, 8, 9, 10, 11, 12]):
        run_batch(cache, batch)
    held_before = set(cache.row_of_slot[cache.row_of_slot >= 0].tolist())
    owner, name = where.split(".")
    _raise_once(getattr(cache, owner), name)
    with pytest.raises(MemoryError):
        run_batch(cache, [20, 21, 22, 23, 24, 1])
    _check_invariants(cache)
    held = set(cache.row_of_slot[cache.row_of_slot >= 0].tolist())
    assert held < held_before and not held & {20, 21, 22, 23, 24}  # nothing new, victims gone
    assert cache.occupancy == len(held)
    rng = np.random.default_rng(3)
    for _ in range(30):
        run_batch(cache, rng.integers(0, 40, 7).tolist())
        _check_invariants(cache)
    assert cache.occupancy >= 12 - cache.headroom_rows  # its slots filled again


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_a_hashed_index_whose_rebuild_runs_out_of_memory_keeps_its_rows(compiled, monkeypatch):
    """An admission whose hashed index is rebuilt first (deleted marks piled up) and runs out of
    memory re-inserting: the rebuild had cleared the table, so every row the tier held was lost
    from the index while ``row_of_slot`` kept it (hits became misses, re-admitted into a second
    slot). A failed rebuild now leaves the index as it was."""
    from tiered_store import row_index_kernels

    cache = RowCache(
        "warm", num_rows=1000, capacity=12, spec=PolicySpec.parse("lru"), index="hashed"
    )
    index = cache.index
    index.compiled = compiled
    run_batch(cache, range(12))
    first = 100
    while index.live + index.deleted + 4 <= index.rebuild_at:  # evict 4, admit 4: marks pile up
        run_batch(cache, range(first, first + 4))
        first += 4
    held_before = set(cache.row_of_slot.tolist())
    if compiled:  # the insert's first call is the rebuild's
        monkeypatch.setattr(row_index_kernels, "insert_entries", row_index_kernels.insert_entries)
        _raise_once(row_index_kernels, "insert_entries")
    else:
        _raise_once(index, "_claim")
    with pytest.raises(MemoryError):
        run_batch(cache, range(first, first + 4))
    _check_invariants(cache)
    held = set(cache.row_of_slot[cache.row_of_slot >= 0].tolist())
    assert len(held) == 8 and held < held_before  # the victims alone left, evicted
    assert index.live == 8 and index.deleted == int((index.keys == -2).sum())
    for batch in (range(first, first + 4), range(first - 8, first + 8), range(900, 912)):
        run_batch(cache, batch)
        _check_invariants(cache)
    assert cache.occupancy == 12 and index.live == 12


def test_a_hashed_index_whose_torch_insert_fails_part_way_keeps_no_id_without_its_slot():
    """The torch rounds (a CUDA tier's insert) write an id's key, then its slot: out of memory
    between the two left keys with slot -1. The admission's clean-up probed them as absent and
    left them, so the row admitted again later went into a second entry behind that one, and
    was never found again (row_of_slot held it; each lookup missed and admitted it anew). The
    entries claimed are now marked deleted."""
    cache = RowCache(
        "hot", num_rows=1000, capacity=12, spec=PolicySpec.parse("lru"), index="hashed"
    )
    index = cache.index
    index.compiled = False
    run_batch(cache, range(8))

    def out_of_memory(*args, **kwargs):
        del index.slots.scatter_reduce_  # once: the tensor's own method again
        raise MemoryError("out of memory writing the slots")

    index.slots.scatter_reduce_ = out_of_memory  # after the first round's keys are written
    with pytest.raises(MemoryError):
        run_batch(cache, [20, 21, 22, 23])
    _check_invariants(cache)
    for batch in ([20, 21, 22, 23], [20, 21, 30, 31, 32], [20, 21, 22, 23]):
        run_batch(cache, batch)
        _check_invariants(cache)
    assert (cache.probe(torch.tensor([20, 21, 22, 23])) >= 0).all()
    assert index.live == cache.occupancy == int((index.keys >= 0).sum())
    assert index.deleted == int((index.keys == -2).sum())


def test_a_hashed_index_whose_torch_delete_fails_part_way_keeps_its_counts_and_slots(monkeypatch):
    """The torch delete (a CUDA tier's eviction) marks the entries deleted, then empties their
    slots, then counts them: out of memory between the two left the counts as they were (the
    index counted rows it no longer held: once the tier was full again every admission was
    refused as past its capacity) and the deleted entries' old slots, which the torch insert
    takes the largest of: a row put there later with a smaller slot was found at the old slot,
    another row's."""
    cache = RowCache(
        "hot", num_rows=1000, capacity=12, spec=PolicySpec.parse("lru"), index="hashed"
    )
    index = cache.index
    index.compiled = False
    run_batch(cache, range(12))
    setitem = torch.Tensor.__setitem__

    def out_of_memory(tensor, key, value):
        if tensor is not index.slots:
            return setitem(tensor, key, value)
        monkeypatch.setattr(torch.Tensor, "__setitem__", setitem)  # once
        raise MemoryError("out of memory emptying the slots")

    monkeypatch.setattr(torch.Tensor, "__setitem__", out_of_memory)
    with pytest.raises(MemoryError):
        run_batch(cache, [20, 21, 22, 23])  # evicts 0..3 first
    _check_invariants(cache)
    assert index.live == cache.occupancy == int((index.keys >= 0).sum())
    assert index.deleted == int((index.keys == -2).sum())
    assert (index.slots[index.keys < 0] == -1).all()
    for batch in ([20, 21, 22, 23], [30, 31, 32, 33, 34], [40, 41, 20, 21, 22, 23]):
        run_batch(cache, batch)
        _check_invariants(cache)
    assert index.live == cache.occupancy == 12


@pytest.mark.parametrize("pin", [True, False])
def test_dropping_preloaded_slots_frees_them_and_their_pins(pin):
    """A warm restart whose rows could not be written after ``preload`` drops the slots it
    gave them: empty, free and unpinned, so the tier neither serves nor keeps those rows."""
    cache = RowCache("warm", num_rows=60, capacity=8, spec=PolicySpec.parse("static+lru"))
    cache.preload(torch.tensor([40, 41]), pin=True)
    _, slots = cache.preload(torch.tensor([3, 5, 7]), pin=pin)
    cache.drop(slots)
    _check_invariants(cache)
    assert cache.occupancy == 2 and cache.pinned_count == 2
    assert cache.pinned_rows().tolist() == [40, 41]
    assert (cache.probe(torch.tensor([3, 5, 7])) < 0).all()
    run_batch(cache, [1, 2, 3, 4, 5, 6])
    _check_invariants(cache)
    assert cache.occupancy == 8 and cache.pinned_count == 2


@pytest.mark.parametrize("where", ["index.set", "eviction.on_insert", "eviction.on_restore"])
def test_a_preload_that_raises_leaves_its_slots_free(where):
    """A warm restart's preload that raised (out of memory in the index or the policy) after
    taking its free slots kept them taken and empty, or rows the policy never queued: the tier
    was that much smaller for good. Its slots now return to the free list."""
    cache = RowCache("warm", num_rows=60, capacity=8, spec=PolicySpec.parse("lru"))
    cache.preload(torch.tensor([40, 41]), pin=True)
    owner, name = where.split(".")
    _raise_once(getattr(cache, owner), name)
    ages = torch.tensor([2, 1, 0]) if name == "on_restore" else None
    with pytest.raises(MemoryError):
        cache.preload(torch.tensor([3, 5, 7]), pin=False, ages=ages)
    _check_invariants(cache)
    assert cache.occupancy == 2 and cache.pinned_count == 2
    assert (cache.probe(torch.tensor([3, 5, 7])) < 0).all()
    run_batch(cache, [1, 2, 3, 4, 5, 6])
    _check_invariants(cache)
    assert cache.occupancy == 8


@pytest.mark.parametrize("where", ["eviction.on_reinstate", "cache._push_free"])
def test_an_admission_that_raises_while_refusing_candidates_gives_its_free_slots_back(where):
    """The admission filter refused the candidates that would have replaced victims, and
    putting those victims back (out of memory) raised: the free slots the other candidates had
    taken stayed taken and empty, the tier that much smaller for good. They now return free and
    the victims stay, as for a failure in the filter itself."""
    cache = RowCache("warm", num_rows=60, capacity=12, spec=PolicySpec.parse("lru+tinylfu"))
    for _ in range(5):  # ten rows the filter has seen often
        run_batch(cache, list(range(10)))
    assert cache.occupancy == 10
    owner, name = where.split(".")
    _raise_once(cache if owner == "cache" else getattr(cache, owner), name)
    with pytest.raises(MemoryError):  # two new rows take the free slots, four are refused
        run_batch(cache, [40, 41, 42, 43, 44, 45])
    _check_invariants(cache)
    assert cache.occupancy == 10 and sorted(cache.held_rows().tolist()) == list(range(10))
    run_batch(cache, [40, 41])
    _check_invariants(cache)
    assert cache.occupancy == 12


@pytest.mark.gpu
def test_a_cuda_tier_refuses_an_id_outside_the_table_before_the_ids_go_to_the_device():
    """A hashed tier on CUDA checked the ids it admits or preloads after copying them there: a
    host sync per admission (its min and max read back). The caller's CPU ids are checked
    where they are, before any work on the device, and refused as before."""
    cache = RowCache(
        "hot", num_rows=10, capacity=4, spec=PolicySpec.parse("lru"), device="cuda", index="hashed"
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a sync raises: the check must come before any
    try:
        for call in (
            lambda: cache.admit(torch.tensor([5, 12, 6]), torch.ones(3, dtype=torch.int64)),
            lambda: cache.preload(torch.tensor([5, 12]), pin=False),
        ):
            with pytest.raises(RowIdError, match=r"hot tier: .*12.*expected row ids in \[0, 10\)"):
                call()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cache.occupancy == 0

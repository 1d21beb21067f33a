"""Row -> slot indexes: the hashed index behaves exactly as the dense one (and a dict) under any
sequence of inserts and deletes, rebuilds included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiered_store.row_index import DenseRowIndex, HashedRowIndex, make_row_index


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 4999), min_size=1, max_size=40)),
        min_size=1,
        max_size=30,
    ),
    st.integers(8, 64),
    st.booleans(),
)
def test_hashed_equals_dense_and_a_dict(ops, capacity, compiled):
    rows = 5000
    dense = DenseRowIndex(rows, capacity)
    hashed = HashedRowIndex(rows, capacity, compiled=compiled)
    model: dict[int, int] = {}
    free = list(range(capacity))
    for insert, ids in ops:
        ids = list(dict.fromkeys(ids))
        if insert:
            new = [i for i in ids if i not in model][: len(free)]
            slots = [free.pop() for _ in new]
            model.update(zip(new, slots, strict=True))
            for index in (dense, hashed):
                index.set(
                    torch.tensor(new, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64)
                )
        else:
            gone = [i for i in ids if i in model]
            for i in gone:
                free.append(model.pop(i))
            for index in (dense, hashed):
                index.delete(torch.tensor(gone, dtype=torch.int64))
        probe = torch.arange(rows)
        want = torch.tensor([model.get(i, -1) for i in range(rows)])
        assert torch.equal(dense.get(probe), want)
        assert torch.equal(hashed.get(probe), want)
    assert hashed.live == len(model)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_churn_far_beyond_the_table_size_keeps_lookups_exact(compiled):
    rng = np.random.default_rng(0)
    capacity, rows = 1000, 384_006_168
    index = HashedRowIndex(rows, capacity, compiled=compiled)
    resident = rng.choice(rows, capacity, replace=False)
    index.set(torch.from_numpy(resident), torch.arange(capacity))
    slot_of = dict(zip(resident.tolist(), range(capacity), strict=True))
    for _ in range(200):  # evict 100, admit 100 new, 200 times: deleted marks force rebuilds
        out = rng.choice(list(slot_of), 100, replace=False)
        slots = [slot_of.pop(int(i)) for i in out]
        index.delete(torch.from_numpy(out))
        new = rng.integers(0, rows, 100)
        new = np.array([i for i in dict.fromkeys(new.tolist()) if i not in slot_of][:100])
        index.set(torch.from_numpy(new), torch.tensor(slots[: new.size]))
        slot_of.update(zip(new.tolist(), slots, strict=False))
    ids = torch.tensor(list(slot_of))
    assert torch.equal(index.get(ids), torch.tensor(list(slot_of.values())))
    assert index.get(torch.from_numpy(out)).eq(-1).all()
    assert index.deleted <= index.size // 4 + 100 and index.keys.dtype == torch.int32


def test_memory_is_sized_from_the_tier_not_the_table():
    hot = make_row_index("auto", 384_006_168, 3_840_061)
    assert hot.kind == "hashed" and hot.bytes_per() == {
        "per_table_row": 0,
        "per_slot": pytest.approx(16, rel=1e-3),
    }
    assert hot.keys.numel() * 8 < 64 << 20  # 61 MB, not the 1.5 GB of a dense index
    assert make_row_index("auto", 10_300_000, 515_000).kind == "dense"
    assert make_row_index("dense", 100, 10).bytes_per() == {"per_table_row": 4, "per_slot": 0}
    with pytest.raises(
        ValueError, match="index: got 'sparse'; expected 'auto', 'dense' or 'hashed'"
    ):
        make_row_index("sparse", 100, 10)


def test_a_tier_decides_the_same_with_either_index():
    from policies import PolicySpec
    from tests.conftest import check_cache_invariants, run_batch
    from tiered_store.row_cache import RowCache

    rng = np.random.default_rng(1)
    caches = [
        RowCache("t", num_rows=3000, capacity=200, spec=PolicySpec.parse(policy), index=kind)
        for policy in ("lru", "sieve+tinylfu")
        for kind in ("dense", "hashed")
    ]
    for _ in range(60):
        ids = torch.from_numpy(rng.zipf(1.2, 300) % 3000)
        for cache in caches:
            run_batch(cache, ids)
    for dense, hashed in (caches[:2], caches[2:]):
        assert torch.equal(dense.row_of_slot, hashed.row_of_slot)
        assert dense.counters == hashed.counters
        check_cache_invariants(hashed)


def test_compiled_and_torch_probes_fill_the_same_entries():
    """On the CPU the chains are walked in compiled code; the torch rounds (the CUDA path) put
    each id in the same entry when inserted one batch at a time without collisions inside it."""
    rng = np.random.default_rng(2)
    rows, capacity = 384_006_168, 4096
    compiled = HashedRowIndex(rows, capacity)
    rounds = HashedRowIndex(rows, capacity, compiled=False)
    assert compiled.compiled and not rounds.compiled
    for _ in range(40):
        ids = torch.from_numpy(rng.choice(rows, 64, replace=False))
        for index in (compiled, rounds):
            index.set(ids[index.get(ids) < 0][:1], torch.tensor([7]))  # one id: no race
    assert torch.equal(compiled.keys, rounds.keys) and torch.equal(compiled.slots, rounds.slots)
    probe = torch.from_numpy(rng.integers(0, rows, 10_000))
    assert torch.equal(compiled.get(probe), rounds.get(probe))
    with pytest.raises(ValueError, match="compiled probes run on the CPU, not meta"):
        HashedRowIndex(rows, capacity, "meta", compiled=True)


@pytest.mark.parametrize("compiled", [True, False])
def test_sets_deletes_and_gets_agree_with_a_dict(compiled):
    """Both probe paths (compiled on the CPU; torch rounds, the CUDA path) over inserts, deletes
    that leave tombstones, re-inserts and rebuilds, against a dict."""
    rng = np.random.default_rng(3)
    rows, capacity = 1_000_003, 500
    index = HashedRowIndex(rows, capacity, compiled=compiled)
    want: dict[int, int] = {}
    for step in range(300):
        held = np.fromiter(want, dtype=np.int64, count=len(want))
        if held.size and rng.random() < 0.4:
            gone = rng.choice(held, min(held.size, int(rng.integers(1, 40))), replace=False)
            index.delete(torch.from_numpy(gone))
            for row in gone.tolist():
                del want[row]
        room = capacity - len(want)
        fresh = np.setdiff1d(rng.integers(0, rows, 60), held)[: min(room, 50)]
        fresh = rng.permutation(fresh)
        if fresh.size:
            slots = rng.integers(0, capacity, fresh.size)
            index.set(torch.from_numpy(fresh), torch.from_numpy(slots))
            want.update(zip(fresh.tolist(), slots.tolist(), strict=True))
        probe = np.concatenate([held, fresh, rng.integers(0, rows, 100)])
        got = index.get(torch.from_numpy(probe)).tolist()
        assert got == [want.get(row, -1) for row in probe.tolist()], step
        assert index.live == len(want) == int((index.keys >= 0).sum())
        assert index.deleted == int((index.keys == -2).sum()), step  # tombstones counted


def test_the_hashed_index_refuses_ids_outside_the_table_and_rows_past_its_capacity():
    """As the dense index refuses them (an id of 2**32 + 5 took row 5's slot, 2**32 - 1 became
    the empty marker and hid a resident row; a tenth row into a capacity of 4 never returned)."""
    index = HashedRowIndex(num_rows=100, capacity=4)
    index.set(torch.tensor([5, 15]), torch.tensor([0, 1]))
    for ids in ([2**32 + 5], [2**32 - 1], [-1], [100]):
        with pytest.raises(IndexError, match=r"expected ids in \[0, 100\)"):
            index.set(torch.tensor(ids), torch.tensor([2]))
    with pytest.raises(ValueError, match="7 rows; expected at most its capacity, 4"):
        index.set(torch.arange(20, 25), torch.arange(2, 7))
    assert index.get(torch.tensor([5, 15])).tolist() == [0, 1] and index.live == 2


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_ids_outside_the_table_are_never_resident_nor_deleted(compiled):
    """The compiled probes cast ids to the int32 keys: 2**32 + 5 read (and deleted) row 5's
    entry; -1 and -2 matched the empty and deleted markers, so deleting them counted a live
    row gone that was never there (live fell below the rows held, to -1)."""
    index = HashedRowIndex(num_rows=100, capacity=4, compiled=compiled)
    index.set(torch.tensor([5, 15]), torch.tensor([0, 1]))
    outside = torch.tensor([2**32 + 5, 2**32 + 15, -1, -2, 100])
    assert index.get(outside).tolist() == [-1] * 5
    index.delete(outside)
    assert index.get(torch.tensor([5, 15])).tolist() == [0, 1]
    assert index.live == 2 and index.deleted == int((index.keys == -2).sum()) == 0


@pytest.mark.parametrize("max_load", [1.0, 0.9, 0, -0.5])
def test_a_max_load_that_would_fill_the_table_is_refused(max_load):
    """At max_load 1 a full tier filled every entry: a probe for an absent id never ended (in
    compiled code, the GIL released). Past 0.75 each insert rebuilt the table."""
    with pytest.raises(
        ValueError, match=rf"max_load {max_load!r}; expected more than 0 and at most 0.75"
    ):
        HashedRowIndex(1000, 16, max_load=max_load)
    index = HashedRowIndex(1000, 16, max_load=0.75)
    index.set(torch.arange(16), torch.arange(16))
    assert index.get(torch.tensor([500, 15])).tolist() == [-1, 15]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("max_load", [0.5, 0.75])
def test_a_full_tier_evicts_and_admits_without_a_rebuild_each_time(max_load, compiled):
    """At max_load 0.75 a full tier filled the table up to the share past which it is rebuilt:
    every admission after an eviction rebuilt the whole table (O(capacity) per batch)."""
    capacity = 600
    index = HashedRowIndex(10**6, capacity, compiled=compiled, max_load=max_load)
    index.set(torch.arange(capacity) * 7, torch.arange(capacity))
    gone = torch.arange(20) * 7
    index.delete(gone)
    index.set(gone + 1, torch.arange(20))
    assert index.deleted == int((index.keys == -2).sum()) > 0  # the marks stay: no rebuild
    assert index.live == capacity
    probe = torch.cat([gone, gone + 1, torch.arange(20, capacity) * 7])
    want = [-1] * 20 + list(range(20)) + list(range(20, capacity))
    assert index.get(probe).tolist() == want


@pytest.mark.parametrize(
    ("rows", "capacity"),
    [
        (1, 1),
        (2, 1),
        (10, 10),
        (100, 7),
        (2**31 - 1, 64),
        (2**31, 64),
        (384_006_168, 300),
        (2**40, 100),
    ],
)
def test_both_probe_paths_agree_with_the_dense_index_at_the_edges(rows, capacity):
    """Random set/delete batches (empty ones, a full tier, rebuilds) over ids at 0, the last
    row, either side of 2**31 (where keys turn int64) and past 2**32: the compiled and torch
    probes answer as a dict does, and as the dense index where the table is small enough."""
    rng = np.random.default_rng(rows % 1000 + capacity)
    indexes = [HashedRowIndex(rows, capacity), HashedRowIndex(rows, capacity, compiled=False)]
    if rows <= 10_000:
        indexes.append(DenseRowIndex(rows, capacity))
    edge = np.unique(np.minimum([0, rows // 2, 2**31 - 1, 2**31, 2**32 + 5, rows - 1], rows - 1))
    model: dict[int, int] = {}
    free = list(range(capacity))
    for _ in range(80):
        if rng.random() < 0.55:  # admit up to the free slots (some batches empty)
            new = np.concatenate([rng.permutation(edge), rng.integers(0, rows, 20)]).tolist()
            new = [i for i in dict.fromkeys(new) if i not in model][: len(free)]
            new = new[: int(rng.integers(0, len(new) + 1))]
            slots = [free.pop() for _ in new]
            model.update(zip(new, slots, strict=True))
            change = "set", torch.tensor(new, dtype=torch.int64), torch.tensor(slots)
        else:  # evict some (or none)
            held = list(model)
            gone = [held[j] for j in rng.permutation(len(held))[: int(rng.integers(0, 8))]]
            free += [model.pop(i) for i in gone]
            change = "delete", torch.tensor(gone, dtype=torch.int64)
        probe = np.concatenate([list(model), edge, rng.integers(0, rows, 30)]).astype(np.int64)
        want = [model.get(i, -1) for i in probe.tolist()]
        for index in indexes:
            getattr(index, change[0])(*change[1:])
            assert index.get(torch.from_numpy(probe)).tolist() == want
    for index in indexes[:2]:
        assert index.live == len(model) == int((index.keys >= 0).sum())
        assert index.keys.dtype == (torch.int32 if rows < 2**31 else torch.int64)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_a_slot_count_unlike_the_id_count_is_refused(compiled):
    """The compiled insert read past a short slots array (rows 2 and 3 got slots 436260890 and
    16780016); the torch rounds broadcast the one slot to every id."""
    index = HashedRowIndex(100, 8, compiled=compiled)
    with pytest.raises(ValueError, match="3 ids and 1 slots; expected one slot per id"):
        index.set(torch.tensor([1, 2, 3]), torch.tensor([0]))
    assert index.live == 0 and index.get(torch.tensor([1, 2, 3])).tolist() == [-1, -1, -1]

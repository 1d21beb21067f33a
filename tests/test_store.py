"""TieredStore: a contract every tier configuration passes, properties, prefetch, concurrency, errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    assert_concurrent_lookups_exact,
    interrupted_once_waiting,
    make_table,
    store_config,
)
from tiered_store import (
    ConfigError,
    PrefetchHandleError,
    RandomSource,
    RowIdError,
    StoreConfig,
    TieredStore,
    TieredStoreError,
    create_table,
)
from tiered_store.cache_plan import parse_policy
from tiered_store.config import PrefetchConfig, dump_yaml, load_yaml
from tiered_store.engram.config import load_engram_config
from tiered_store.errors import StoreClosedError
from tiered_store.profile import FrequencyProfile
from tiered_store.serve.config import ServeConfig
from tiered_store.workload import ZipfWorkload

ROWS, DIM = 5000, 16


class StoreContract:
    """Every tier layout must serve exactly the table's rows, count consistently, and be thread-safe."""

    tiers: dict = {}

    @pytest.fixture
    def store(self, table):
        path, _ = table
        with TieredStore(store_config(path, **self.tiers)) as store:
            yield store

    def test_lookup_is_bit_exact_for_any_shape(self, store, table):
        _, data = table
        for shape in [(1,), (7,), (3, 4), (2, 3, 5), (0,)]:
            ids = torch.randint(0, ROWS, shape)
            out = store.lookup(ids)
            assert out.shape == (*shape, DIM)
            assert torch.equal(out, data[ids])

    def test_repeated_zipf_batches_stay_exact(self, store, table):
        _, data = table
        workload = ZipfWorkload(ROWS, 1.0, seed=1)
        for _ in range(12):
            ids = torch.from_numpy(workload.sample(700))
            assert torch.equal(store.lookup(ids), data[ids])

    def test_counters_add_up(self, store):
        workload = ZipfWorkload(ROWS, 0.9, seed=2)
        total = 0
        for _ in range(5):
            ids = torch.from_numpy(workload.sample(500))
            store.lookup(ids)
            total += ids.numel()
        stats = store.stats()
        hot, warm = stats["hot"], stats["warm"]
        assert hot["lookups"] == total
        assert hot["hits"] + hot["misses"] == total
        assert warm["lookups"] == hot["misses"]
        assert warm["hits"] + warm["misses"] == warm["lookups"]
        assert hot["occupancy"] <= hot["capacity"] and warm["occupancy"] <= warm["capacity"]
        assert stats["cold"]["rows_read"] <= warm["misses"]

    def test_prefetch_then_lookup_matches(self, store, table):
        _, data = table
        batches = [torch.randint(0, ROWS, (64, 3)) for _ in range(6)]
        handles = [store.prefetch(b) for b in batches]
        for ids, handle in zip(batches, handles, strict=True):
            assert torch.equal(store.lookup(ids, handle), data[ids])

    def test_concurrent_lookups_return_correct_rows(self, store, table):
        _, data = table
        assert_concurrent_lookups_exact(store, data, batch=300, rounds=15)


class TestHotOnly(StoreContract):
    tiers = {"hot": {"capacity": 800}}


class TestWarmOnly(StoreContract):
    tiers = {"warm": {"capacity": "10%"}}


class TestColdOnlyPread(StoreContract):
    tiers = {"cold": {"io": "pread", "threads": 4}}


class TestColdOnlyMmap(StoreContract):
    tiers = {"cold": {"io": "mmap"}}


class TestColdOnlyDirect(StoreContract):
    tiers = {"cold": {"io": "direct", "threads": 4}}


class TestAllTiers(StoreContract):
    tiers = {"hot": {"capacity": 300}, "warm": {"capacity": "20%"}, "cold": {"io": "pread"}}


class TestAllTiersHeadroom(StoreContract):
    tiers = {
        "hot": {"capacity": 300, "evict_headroom": 0.1},
        "warm": {"capacity": 1000, "evict_headroom": 0.25},
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hot=st.integers(0, 120),
    warm=st.integers(0, 200),
    batches=st.lists(
        st.lists(st.integers(0, 399), min_size=0, max_size=80), min_size=1, max_size=8
    ),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_lookup_equals_direct_indexing_for_any_capacities(
    tmp_path_factory, hot, warm, batches, dtype
):
    tmp = tmp_path_factory.mktemp("prop")
    path, data = make_table(tmp, rows=400, dim=5, dtype=dtype)
    cfg = store_config(path, hot={"capacity": hot}, warm={"capacity": warm})
    with TieredStore(cfg) as store:
        for batch in batches:
            ids = torch.tensor(batch, dtype=torch.int64)
            assert torch.equal(store.lookup(ids), data[ids])
        # and a second pass over the same batches, now partly cached
        for batch in batches:
            ids = torch.tensor(batch, dtype=torch.int64)
            assert torch.equal(store.lookup(ids), data[ids])


def test_ids_may_be_numpy_lists_and_small_int_dtypes(table):
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        assert torch.equal(store.lookup([3, 4]), data[[3, 4]])
        assert torch.equal(
            store.lookup(np.array([[1], [2]], dtype=np.uint16)), data[torch.tensor([[1], [2]])]
        )
        assert torch.equal(store.lookup(torch.tensor([9], dtype=torch.int32)), data[[9]])
        for dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no min/max for these
            assert torch.equal(store.lookup(torch.tensor([5, 7], dtype=dtype)), data[[5, 7]])
        with pytest.raises(RowIdError, match="does not fit int64"):
            store.lookup(torch.tensor([1, 2**63], dtype=torch.uint64))


def test_numpy_uint64_scalars_and_lists_of_them_are_ids(table):
    """np.uint64(7) and [np.uint64(7), np.uint64(8)] were refused as "cannot be read as
    integers" (torch reads no uint64 scalar), while a uint64 array or np.uint32(7) was taken."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        assert torch.equal(store.lookup(np.uint64(7)), data[7])
        pair = [np.uint64(7), np.uint64(8)]
        assert torch.equal(store.lookup(pair), data[[7, 8]])
        store.release(store.announce(pair))
        for wide in (np.uint64(2**63), [np.uint64(1), np.uint64(2**63)], [2**63]):
            with pytest.raises(RowIdError, match=r"value 9223372036854775808 does not fit int64"):
                store.lookup(wide)


def test_a_bool_among_numpy_uint64_ids_is_refused(table):
    """[np.uint64(7), True] was looked up as rows [7, 1] (NumPy reads a bool beside a uint64 as
    1), though bools are refused as ids."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        for ids, value in (
            ([np.uint64(7), True], "True"),
            ([np.uint64(7), np.False_], r"np.False_"),
            ([[np.uint64(1)], [True]], "True"),
        ):
            with pytest.raises(RowIdError, match=rf"^ids: {value} is a bool; expected integer row ids$"):  # fmt: skip
                store.lookup(ids)
            with pytest.raises(RowIdError, match="is a bool"):
                store.announce(ids)
        assert torch.equal(store.lookup([np.uint64(7), np.uint64(1)]), data[[7, 1]])


def test_a_bool_in_a_list_of_row_ids_is_refused(table):
    """[3, True] was looked up as rows [3, 1]: torch reads a bool beside an int as 1, and only
    the ids torch refused (NumPy uint64s) had their leaves looked at."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        for ids, value in (([3, True], "True"), ([[3, 4], (np.False_, 5)], "np.False_")):
            with pytest.raises(RowIdError, match=rf"^ids: {value} is a bool; expected integer row ids$"):  # fmt: skip
                store.lookup(ids)
            with pytest.raises(RowIdError, match="is a bool"):
                store.prefetch(ids)
        assert torch.equal(store.lookup([3, 1]), data[[3, 1]])
        assert torch.equal(
            store.lookup(((3, 4), (np.int32(1), 5))), data[torch.tensor([[3, 4], [1, 5]])]
        )


def test_a_bool_tensor_or_array_in_a_list_of_row_ids_is_refused(table):
    """[torch.tensor(True), 2] was looked up as rows [1, 2]: NumPy keeps a 0-d tensor or array
    whole, and the bool check looked at Python and NumPy bools only."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        for ids, value in (
            ([torch.tensor(True), 2], r"tensor\(True\)"),
            ([[3, 4], [np.array(False), 5]], r"array\(False\)"),
        ):
            with pytest.raises(RowIdError, match=rf"^ids: {value} is a bool; expected integer row ids$"):  # fmt: skip
                store.lookup(ids)
        assert torch.equal(store.lookup([torch.tensor(3), np.array(1)]), data[[3, 1]])


def test_a_bool_in_a_list_torch_reads_is_refused(table):
    """A list NumPy cannot read as integers (a one-element tensor beside numbers) goes to torch,
    which read [torch.tensor([True]), 2] as rows [1, 2]: its leaves were not looked at."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        for ids, value in (
            ([torch.tensor([True]), 2], r"tensor\(\[True\]\)"),
            ([[False], [torch.tensor([2])]], "False"),
        ):
            with pytest.raises(RowIdError, match=rf"^ids: {value} is a bool; expected integer row ids$"):  # fmt: skip
                store.lookup(ids)
        assert torch.equal(store.lookup([torch.tensor([3]), 1]), data[[3, 1]])


def test_a_uint64_tensor_past_int64_in_a_list_of_ids_is_named(table):
    """[torch.tensor(2**63, dtype=torch.uint64), 1] gave torch's bare RuntimeError (value cannot
    be converted to type int64_t) from NumPy's reading or the ids' one-by-one look."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        wide = torch.tensor(2**63, dtype=torch.uint64)
        for ids in ([wide], [wide, 1], [[1, 2], [wide, 3]]):
            with pytest.raises(RowIdError, match=r"^ids: list cannot be read as integers \("):
                store.lookup(ids)
        small = torch.tensor(3, dtype=torch.uint64)
        assert torch.equal(store.lookup([small, 1]), data[[3, 1]])


def test_numpy_uint64_ids_mixed_with_signed_ints_are_ids(table):
    """[np.uint64(7), np.int64(8)] was refused as "cannot be read as integers" (NumPy reads
    uint64 beside a signed int as float64); an int of 2**64 or more said Overflow when
    unpacking long long."""
    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        for ids in (
            [np.uint64(7), np.int64(8)],
            [np.int64(7), np.uint64(8)],
            [np.uint64(7), np.int32(8)],
        ):
            assert torch.equal(store.lookup(ids), data[[7, 8]])
        pairs = [[np.uint64(7), np.int64(8)], [np.int8(1), 2]]
        assert torch.equal(store.lookup(pairs), data[torch.tensor([[7, 8], [1, 2]])])
        store.release(store.announce([np.uint64(7), np.int64(8)]))
        for wide, value in (
            ([np.uint64(2**63), np.int64(1)], 2**63),
            ([np.int64(1), 2**64], 2**64),
            (2**64, 2**64),
            ([-(2**63) - 1], -(2**63) - 1),
        ):
            with pytest.raises(RowIdError, match=rf"^ids: value {value} does not fit int64; expected valid row ids$"):  # fmt: skip
                store.lookup(wide)
        with pytest.raises(RowIdError, match=r"list cannot be read as integers \(None is not an integer\)"):  # fmt: skip
            store.lookup([np.uint64(7), None])


def test_static_rows_are_pinned_and_served_from_hot(tmp_path, table):
    path, data = table
    hot_rows = np.arange(100, 150, dtype=np.int64)
    np.save(tmp_path / "pinned.npy", hot_rows)
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"hot": {"capacity": 80, "policy": "static+lru", "static_rows": "pinned.npy"}},
        },
        base_dir=tmp_path,
    )
    with TieredStore(cfg) as store:
        assert store.stats()["hot"]["preloaded"] == 50
        for _ in range(5):
            store.lookup(torch.randint(1000, 5000, (200,)))
        out = store.lookup(torch.from_numpy(hot_rows))
        assert torch.equal(out, data[torch.from_numpy(hot_rows)])
        assert store.stats()["hot"]["hits"] >= 50


@pytest.mark.parametrize(
    ("listed", "shown"),
    [
        (np.array([3, 7, 10**9], dtype=np.int64), r"\[3, 1,000,000,000\]"),
        (np.array([3, -2, 7], dtype=np.int32), r"\[-2, 7\]"),
        (np.array([3, 2**64 - 1], dtype=np.uint64), r"\[3, 18,446,744,073,709,551,615\]"),
    ],
)
def test_a_row_list_with_ids_outside_the_table_names_them(tmp_path, table, listed, shown):
    """A static_rows list with an id outside the table said only that it had some (no value, so
    the id to fix had to be searched for); a uint64 id past int64 wrapped to a negative one
    first. The ids' range is named, as the file holds them."""
    path, _ = table
    np.save(tmp_path / "pinned.npy", listed)
    tier = {"capacity": 80, "policy": "static+lru", "static_rows": "pinned.npy"}
    cfg = StoreConfig.from_dict(
        {"table": {"path": str(path)}, "tiers": {"hot": tier}}, base_dir=tmp_path
    )
    with pytest.raises(
        ConfigError,
        match=rf"hot\.static_rows: .*pinned\.npy has row ids in {shown}; expected row ids of "
        r"this table, in \[0, 5,000\)",
    ):
        TieredStore(cfg)


def test_static_rows_that_fill_the_tier_warn_and_the_store_serves(tmp_path, table):
    from tiered_store.cache_plan import PinnedRowsWarning

    path, data = table
    np.save(tmp_path / "pinned.npy", np.arange(100, 200, dtype=np.int64))
    tier = {"capacity": 80, "policy": "static+lru", "static_rows": "pinned.npy"}
    cfg = StoreConfig.from_dict(
        {"table": {"path": str(path)}, "tiers": {"hot": tier}}, base_dir=tmp_path
    )
    with pytest.warns(
        PinnedRowsWarning, match=r"hot\.static_rows: .*pinned\.npy lists 100 rows"
    ) as got:
        store = TieredStore(cfg)
    assert got[0].filename == __file__  # points at the caller's line
    with store:
        ids = torch.arange(90, 210)
        assert torch.equal(store.lookup(ids), data[ids])  # rows past the pins come from below
        assert store.stats()["hot"]["preloaded"] == 80
    only_static = {"table": {"path": str(path)}, "tiers": {"hot": {**tier, "policy": "static"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PinnedRowsWarning)  # a static-only tier is meant to be full
        TieredStore(StoreConfig.from_dict(only_static, base_dir=tmp_path)).close()


def test_row_lists_and_a_profile_of_a_tier_turned_off_are_named_at_open(tmp_path, table):
    """A tier of capacity 0 (off) never reads its static_rows, preload_rows or profile: the
    rows asked to be pinned were not, without a word (nor a missing file noticed)."""
    from tiered_store import IgnoredSettingWarning

    path, data = table
    np.save(tmp_path / "pinned.npy", np.arange(10, dtype=np.int64))
    tiers = {
        "hot": {"capacity": 0, "policy": "static+lru", "static_rows": "pinned.npy"},
        "warm": {"capacity": "0%", "policy": "zipf-tuned", "profile": "gone.npz"},
    }
    cfg = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers}, base_dir=tmp_path)
    with pytest.warns(IgnoredSettingWarning) as caught:
        store = TieredStore.open(cfg)
    with store:
        assert torch.equal(store.lookup([3, 4]), data[[3, 4]])
    assert [str(w.message) for w in caught] == [
        "tiers.hot.static_rows: the tier is off (capacity 0) and ignores it; give it a capacity "
        "or remove it",
        "tiers.warm.profile: the tier is off (capacity '0%') and ignores it; give it a capacity "
        "or remove it",
    ]


def test_settings_a_policy_ignores_are_named_at_open(tmp_path, table):
    """A profile, a repin block or static_rows on a tier whose policy does not use them: the
    store opens, with one IgnoredSettingWarning each, pointing at the caller's line."""
    from tiered_store import IgnoredSettingWarning

    path, data = table
    np.save(tmp_path / "pinned.npy", np.arange(10, dtype=np.int64))
    tiers = {
        "hot": {"capacity": 20, "policy": "lru", "static_rows": "pinned.npy"},
        "warm": {
            "capacity": 50,
            "policy": "sieve",
            "profile": "p.npz",
            "recency_window": 64,
            "repin": {"every": 512},
        },
    }
    cfg = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers}, base_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = TieredStore.open(cfg)
    with store:
        assert torch.equal(store.lookup([3, 4]), data[[3, 4]])
        assert store.stats()["hot"]["preloaded"] == 0  # static_rows not loaded by an lru tier
    ignored = [w for w in caught if issubclass(w.category, IgnoredSettingWarning)]
    assert [str(w.message) for w in ignored] == [
        "tiers.hot.static_rows: policy 'lru' ignores it; only 'static' and 'static+<eviction>' use it",
        "tiers.warm.profile: policy 'sieve' ignores it; only zipf-tuned uses it",
        "tiers.warm.recency_window: policy 'sieve' ignores it; only zipf-tuned uses it",
        "tiers.warm.repin: policy 'sieve' ignores it; only zipf-tuned uses it",
    ]
    assert {w.filename for w in ignored} == {__file__}  # the user's open, not a library line
    # a zipf-tuned tier with a profile keeps its pins fixed unless repin.enabled: its other
    # repin settings are named, and enabling re-pinning uses them
    FrequencyProfile(np.arange(30), np.arange(30, 0, -1), rows=len(data)).save(tmp_path / "p.npz")
    tuned = {"capacity": 50, "policy": "zipf-tuned", "profile": "p.npz"}
    fixed = {"warm": {**tuned, "repin": {"every": 512, "budget": 8}}}
    cfg = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": fixed}, base_dir=tmp_path)
    with pytest.warns(IgnoredSettingWarning) as caught:
        TieredStore(cfg).close()
    assert [str(w.message) for w in caught] == [
        "tiers.warm.repin: budget, every ignored; a zipf-tuned tier with a profile keeps its "
        "pins fixed unless repin.enabled is true"
    ]
    used = {
        "hot": {"capacity": 20, "policy": "static+lru", "static_rows": "pinned.npy"},
        "warm": {**tuned, "repin": {"enabled": True, "every": 512}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        TieredStore(
            StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": used}, base_dir=tmp_path)
        ).close()


def test_a_profile_that_is_not_one_for_this_table_is_named(tmp_path, table):
    path, data = table
    np.save(tmp_path / "top_rows.npy", np.arange(10))  # analyze writes it beside the profile
    FrequencyProfile(np.array([3, len(data) + 5]), np.array([4, 2])).save(tmp_path / "far.npz")
    for profile, message in (
        ("top_rows.npy", r"top_rows.npy: a .npy array .*; expected a profile .npz"),
        ("far.npz", rf"far.npz has row ids in \[3, {len(data) + 5:,}\]; expected row ids"),
    ):
        tiers = {"warm": {"capacity": 50, "policy": "zipf-tuned", "profile": profile}}
        cfg = StoreConfig.from_dict(
            {"table": {"path": str(path)}, "tiers": tiers}, base_dir=tmp_path
        )
        with pytest.raises(ConfigError, match=f"tiers.warm.profile: .*{message}"):
            TieredStore(cfg)
    # one sentence naming the file once, what it holds and what was expected: not the loader's
    # error wrapped in the config's "cannot read ... (...)" again
    tiers = {"warm": {"capacity": 50, "policy": "zipf-tuned", "profile": "top_rows.npy"}}
    cfg = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers}, base_dir=tmp_path)
    with pytest.raises(ConfigError) as caught:
        TieredStore(cfg)
    assert str(caught.value) == (
        f"tiers.warm.profile: profile {tmp_path / 'top_rows.npy'}: a .npy array (row ids, such "
        "as analyze's layer{L}.top_rows.npy); expected a profile .npz (analyze's "
        "layer{L}.profile.npz)"
    )
    with pytest.raises(ConfigError) as caught:
        TieredStore(
            StoreConfig.from_dict(
                {
                    "table": {"path": str(path)},
                    "tiers": {"warm": {**tiers["warm"], "profile": "gone.npz"}},
                },
                base_dir=tmp_path,
            )
        )
    assert str(caught.value) == (
        f"tiers.warm.profile: profile {tmp_path / 'gone.npz'}: not a readable profile (No such "
        "file or directory); expected a profile .npz (analyze's layer{L}.profile.npz)"
    )


def test_an_empty_or_cut_off_profile_or_row_list_is_named(tmp_path, table):
    """An empty file, an .npz cut off (no zip directory) or with a corrupt member: a ConfigError
    naming the key and the file, not numpy's EOFError or zipfile's BadZipFile."""
    path, _ = table
    FrequencyProfile(np.arange(50), np.arange(50, 0, -1)).save(tmp_path / "good.npz")
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "half.npz").write_bytes(raw[: len(raw) // 2])
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF  # inside a member: its CRC fails when it is read
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    for tier, key, name, message in (
        ("warm", "profile", "empty.npz", "empty or cut off"),
        ("warm", "profile", "half.npz", "empty or cut off"),
        ("warm", "profile", "flipped.npz", "Bad CRC-32"),
        ("hot", "static_rows", "empty.npy", "empty or cut off"),
        ("warm", "preload_rows", "half.npz", "empty or cut off"),
    ):
        settings = {"capacity": 50, key: name}
        if key == "profile":
            settings["policy"] = "zipf-tuned"
        elif key == "static_rows":
            settings["policy"] = "static+lru"
        cfg = StoreConfig.from_dict(
            {"table": {"path": str(path)}, "tiers": {tier: settings}}, base_dir=tmp_path
        )
        with pytest.raises(ConfigError, match=rf"tiers\.{tier}\.{key}: .*{name}.*{message}"):
            TieredStore(cfg)


def test_a_damaged_profile_whose_meta_disagrees_with_its_arrays_is_named(tmp_path, table):
    """A profile whose meta is not a mapping, or gives rows its row ids exceed (or a rows that
    is no number), raised AttributeError, RowIdError ("profile '': row ids span ...", naming
    neither the file nor the key) or numpy's UFuncTypeError from TieredStore."""
    path, _ = table
    for name, meta in (
        ("list.npz", [1]),
        ("rows.npz", {"format": 1, "rows": 10}),
        ("text.npz", {"format": 1, "rows": "many"}),
    ):
        np.savez(tmp_path / name, meta=json.dumps(meta), row_ids=np.array([50, 3]), counts=[5, 2])
        tiers = {"warm": {"capacity": 50, "policy": "zipf-tuned", "profile": name}}
        cfg = StoreConfig.from_dict(
            {"table": {"path": str(path)}, "tiers": tiers}, base_dir=tmp_path
        )
        with pytest.raises(ConfigError) as caught:
            TieredStore(cfg)
        said = str(caught.value)
        assert said.startswith(f"tiers.warm.profile: profile {tmp_path / name}: "), said
        assert said.endswith("expected a profile .npz (analyze's layer{L}.profile.npz)"), said


def test_preload_rows_warm_start(tmp_path, table):
    path, data = table
    np.save(tmp_path / "top.npy", np.array([5, 6, 7], dtype=np.int64))
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"warm": {"capacity": 10, "preload_rows": "top.npy"}},
        },
        base_dir=tmp_path,
    )
    with TieredStore(cfg) as store:
        assert torch.equal(store.lookup(torch.tensor([5, 6, 7])), data[[5, 6, 7]])
        assert store.stats()["warm"]["hits"] == 3
        assert store.stats()["cold"]["rows_read"] == 3  # only the preload itself


def test_a_profile_given_as_preload_rows_is_named_not_a_traceback(tmp_path, table):
    """analyze writes both layer1.profile.npz and layer1.top_rows.npy: the mix-up is named."""
    path, _ = table
    np.savez(tmp_path / "layer1.profile.npz", row_ids=np.arange(3), counts=np.ones(3))
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"warm": {"capacity": 10, "preload_rows": "layer1.profile.npz"}},
        },
        base_dir=tmp_path,
    )
    with pytest.raises(
        ConfigError, match=r"warm\.preload_rows: .*layer1\.profile\.npz is an \.npz"
    ):
        TieredStore(cfg)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([0, ROWS]), "out of range"),
        (torch.tensor([-1]), "out of range"),
        (torch.tensor([1.0, 2.0]), "dtype torch.float32"),
        (np.array([1.5]), "dtype float64"),
        (torch.tensor([True]), "dtype torch.bool"),
        ("abc", "cannot be read"),
    ],
)
def test_bad_ids_raise_clear_errors(table, ids, match):
    path, _ = table
    with TieredStore(store_config(path, hot={"capacity": 10})) as store:
        with pytest.raises(RowIdError, match=match):
            store.lookup(ids)
        with pytest.raises(IndexError):  # RowIdError is also an IndexError
            store.prefetch(ids)
        assert store.stats()["hot"]["lookups"] == 0


def test_handle_for_other_ids_or_used_twice_is_an_error(table):
    path, data = table
    with TieredStore(store_config(path)) as store:
        ids = torch.tensor([1, 2, 3])
        handle = store.prefetch(ids)
        with pytest.raises(PrefetchHandleError, match="differ"):
            store.lookup(torch.tensor([1, 2, 4]), handle)
        assert torch.equal(
            store.lookup(torch.tensor([1, 2, 3]), handle), data[ids]
        )  # equal ids are fine
        with pytest.raises(PrefetchHandleError, match="already consumed"):
            store.lookup(ids, handle)
        # a buffer refilled with the next batch after prefetch() is other ids, not the handle's
        for buffer in (torch.tensor([1, 2, 3]), np.array([1, 2, 3])):
            handle = store.prefetch(buffer)
            buffer[:] = torch.tensor([7, 8, 9]) if isinstance(buffer, torch.Tensor) else [7, 8, 9]
            with pytest.raises(PrefetchHandleError, match="differ"):
                store.lookup(buffer, handle)


def test_a_store_on_the_cpu_never_asks_whether_prefetched_ids_are_pinned(table):
    """prefetch asked Tensor.is_pinned() of the caller's ids (and of its snapshot of them) for
    a store whose tiers are all on the CPU, where no copy to a GPU is made: on a machine with a
    GPU that may start a CUDA context (torch asks the driver) for nothing. Only a store on a
    GPU asks; the handle still holds a snapshot the caller's refill does not change."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Asked(TorchDispatchMode):
        """Counts Tensor.is_pinned() calls."""

        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.is_pinned.default
            return func(*args, **(kwargs or {}))

    path, data = table
    with TieredStore(store_config(path)) as store:
        assert store.device.type == "cpu"
        buffer = torch.tensor([[1, 2], [3, 4]])
        with Asked() as asked:
            handle = store.prefetch(buffer)
            int32 = store.prefetch(buffer.int())
        assert asked.calls == 0
        buffer[:] = 7  # refilled: the handle's snapshot is the ids prefetched
        with pytest.raises(PrefetchHandleError, match="differ"):
            store.lookup(buffer, handle)
        ids = torch.tensor([[1, 2], [3, 4]])
        assert torch.equal(store.lookup(ids.int(), int32), data[ids])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_of_pinned_int32_ids_on_a_gpu_store_converts_them_in_one_pinned_copy(table):
    """A store on a GPU given pinned int32 ids converted them to int64 (a pageable copy), then
    pinned that (a second copy) for its snapshot. They are converted as they are copied into
    the pinned snapshot, which the caller's refill does not change; pinned int64 ids are still
    copied once, pinned."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Pinnings(TorchDispatchMode):
        """Counts Tensor.pin_memory() calls (on this thread)."""

        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten._pin_memory.default
            return func(*args, **(kwargs or {}))

    path, data = table
    with TieredStore(store_config(path, hot={"capacity": 500, "device": "cuda"})) as store:
        ids = torch.tensor([[1, 2], [3, 4999]])
        for given in (ids.int().pin_memory(), ids.pin_memory()):
            with Pinnings() as pinnings:
                handle = store.prefetch(given)
            assert pinnings.calls == 0
            assert handle.host.is_pinned() and handle.host.dtype == torch.int64
            assert handle.host.data_ptr() != given.data_ptr()
            given.fill_(7)  # refilled: the handle's snapshot is the ids prefetched
            with pytest.raises(PrefetchHandleError, match="differ"):
                store.lookup(given, handle)
            got = store.lookup(ids.to(given.dtype), handle)  # the ids prefetched: its rows
            assert torch.equal(got.cpu(), data[ids])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_device_past_the_last_one_names_the_devices_there_are():
    """compute_device('cuda:N') past the last device said "but only N CUDA device(s) exist",
    not what was expected; it names the devices there are, cuda:0..cuda:N-1."""
    from tiered_store.store import compute_device

    count = torch.cuda.device_count()
    indices = "'cuda:0'" if count == 1 else f"'cuda:0'..'cuda:{count - 1}'"
    with pytest.raises(ConfigError) as err:
        compute_device(f"cuda:{count}", "tiers.hot.device")
    assert str(err.value) == (
        f"tiers.hot.device: 'cuda:{count}' but only {count} CUDA device(s) exist; expected "
        f"'cpu', 'cuda' or {indices}"
    )
    assert compute_device(f"cuda:{count - 1}").index == count - 1


def test_a_handle_looked_up_with_other_ids_names_where_they_differ(table):
    """Other ids of the same shape were refused as "ids (shape (3,)) differ from the ids this
    handle prefetched (shape (3,))": neither where they differ nor the two ids."""
    path, data = table
    with TieredStore(store_config(path)) as store:
        handle = store.prefetch([[5, 6], [7, 8]])
        with pytest.raises(
            PrefetchHandleError, match=r"shape \(4,\)\) differ .* \(shape \(2, 2\)\)"
        ):
            store.lookup([5, 6, 7, 8], handle)
        with pytest.raises(PrefetchHandleError, match=r"at flat position 2 \(id 9; prefetched 7\)"):
            store.lookup(np.array([[5, 6], [9, 8]]), handle)
        ids = torch.tensor([[5, 6], [7, 8]])
        assert torch.equal(store.lookup(ids, handle), data[ids])


def test_something_other_than_a_handle_is_refused_as_one(table):
    """lookup(ids, handle) read ``handle.packed`` before checking it was a handle: a wrong argument
    (a row count, the ids again) gave AttributeError "'int' object has no attribute 'packed'"."""
    path, data = table
    with TieredStore(store_config(path)) as store:
        ids = torch.tensor([1, 2, 3])
        for wrong, name in ((3, "int"), (ids, "Tensor"), ("handle", "str")):
            with pytest.raises(PrefetchHandleError, match=f"handle is {name}; expected a Prefetch"):
                store.lookup(ids, wrong)
        assert torch.equal(store.lookup(ids, store.prefetch(ids)), data[ids])


def test_a_handle_from_another_store_is_refused(tmp_path):
    """Its rows are the other table's: they were once returned as this one's."""
    (path_a, data_a), (path_b, _) = make_table(tmp_path, seed=1), make_table(tmp_path, 4000)
    with TieredStore(store_config(path_a)) as a, TieredStore(store_config(path_b)) as b:
        ids = torch.tensor([1, 2, 3])
        theirs = b.prefetch(ids)
        with pytest.raises(PrefetchHandleError, match="another store's prefetch"):
            a.lookup(ids, theirs)
        assert torch.equal(a.lookup(ids, a.prefetch(ids)), data_a[ids])


def test_closed_store_refuses_lookups_and_keeps_its_stats(table):
    path, data = table
    store = TieredStore(store_config(path))
    store.write(torch.tensor([7]), data[8:9])
    store.commit(5)
    assert store.close() is True and store.close() is True  # its files closed
    with pytest.raises(TieredStoreError, match="closed"):
        store.lookup(torch.tensor([1]))
    stats = store.stats()  # final counters, after close too (the delta's step was read closed)
    assert stats["writes"]["committed_step"] == 5 and stats["writes"]["rows_written"] == 1


@pytest.mark.parametrize(
    ("tiers", "match"),
    [
        (
            {"hot": {"capacity": ROWS + 1}},
            r"tiers\.hot\.capacity: .*more than the table's 5,000 rows",
        ),
        ({"warm": {"capacity": "101%"}}, r"tiers\.warm\.capacity: .*more than 100%"),
        ({"warm": {"capacity": "100TiB"}}, r"tiers\.warm\.capacity"),
        ({"hot": {"capacity": "12 bananas"}}, r"tiers\.hot\.capacity: got '12 bananas'"),
        ({"hot": {"policy": "mru"}}, r"tiers\.hot\.policy: unknown policy 'mru'"),
        ({"hot": {"device": "tpu"}}, r"tiers\.hot\.device"),
        ({"hot": {"device": "cuda:\u00b2"}}, r"tiers\.hot\.device: got 'cuda:\u00b2'"),  # not int()
        # torch read cuda:255 as plain 'cuda' (the current GPU), cuda:128 as index -128; it
        # refused a leading 0 and an index past 2**31 with bare RuntimeErrors
        *(
            (
                {"hot": {"device": name}},
                rf"tiers\.hot\.device: got '{name}'; expected 'cuda:N' with N from 0 to 127",
            )
            for name in ("cuda:255", "cuda:128", "cuda:00", "cuda:007", "cuda:2147483648")
        ),  # fmt: skip
        ({"hot": {"capacity": 10, "policy": "static"}}, r"tiers\.hot\.static_rows"),
        ({"cold": {"io": "aio"}}, r"tiers\.cold\.io"),
        ({"cold": {"threads": 0}}, r"tiers\.cold\.threads"),
        ({"warm": {"capcity": 5}}, r"tiers\.warm\.capcity: unknown key"),
        ({"warm": {"evict_headroom": True}}, r"tiers\.warm\.evict_headroom: .*got True"),
        ({"restart": {"save_every_s": True}}, r"tiers\.restart\.save_every_s: .*got True"),
        (  # ids inline: "Input should be a valid string" before
            {"warm": {"policy": "static+lru", "static_rows": [0, 1, 2]}},
            r"tiers\.warm\.static_rows: got \[0, 1, 2\]; expected the path of a file \(row lists: a \.npy",
        ),
    ],
)
def test_bad_config_names_the_key(table, tiers, match):
    path, _ = table
    with pytest.raises(ConfigError, match=match):
        TieredStore(store_config(path, **tiers))


def test_an_unknown_sharding_key_lists_the_known_ones_and_can_be_dropped():
    """sharding: is optional (``ShardingConfig | None``): its keys were not listed, and
    ignore_unknown kept an unknown key in it, refused then all the same."""
    data = {"table": {"path": "t.npy"}, "sharding": {"ranks": 2, "rnaks_by": "rows"}}
    with pytest.raises(
        ConfigError,
        match=r"sharding\.rnaks_by: unknown key; expected one of backend, by, ranks, shards, timeout_s",
    ):
        StoreConfig.from_dict(data)
    assert StoreConfig.from_dict(data, ignore_unknown=True).sharding.ranks == 2


def test_a_capacity_over_100_percent_is_refused_when_the_config_is_read(tmp_path):
    """No table has more than 100% of its rows: the config took '101%' and only the open, once
    the table was read, refused it (serve --create-tables first built the whole checkpoint)."""
    config = tmp_path / "tiers.yaml"
    config.write_text("table: {path: missing.npy}\ntiers: {warm: {capacity: 101%}}\n")
    with pytest.raises(ConfigError, match=r"tiers.yaml: invalid configuration\n  tiers\.warm\.capacity: '101%' is more than 100% of the table; expected 0%\.\.100%"):  # fmt: skip
        StoreConfig.from_yaml(config)
    assert StoreConfig.from_dict(
        {"table": {"path": "t.npy"}, "tiers": {"warm": {"capacity": "100%"}}}
    )


@pytest.mark.parametrize("key", ["nvme_latency_us", "hbm_gbps", "compute_seconds_per_batch"])
def test_an_infinite_cost_is_refused_naming_the_key(key):
    """``.inf`` passed (only NaN and out-of-range values were refused): every modelled stall was
    infinite, the split compared infinities, and replay.json held ``Infinity`` (not JSON)."""
    with pytest.raises(ConfigError, match=rf"cost_model\.{key}: expected a finite number, got inf"):
        StoreConfig.from_dict({"table": {"path": "t.npy"}, "cost_model": {key: float("inf")}})


def test_config_dim_or_dtype_mismatch_and_missing_table(tmp_path, table):
    path, _ = table
    with pytest.raises(ConfigError, match="table.dim: config says 8"):
        TieredStore(StoreConfig.from_dict({"table": {"path": str(path), "dim": 8}}))
    with pytest.raises(ConfigError, match="table.dtype"):
        TieredStore(StoreConfig.from_dict({"table": {"path": str(path), "dtype": "float16"}}))
    with pytest.raises(ConfigError, match="table.path: .*does not exist"):
        TieredStore(StoreConfig.from_dict({"table": {"path": str(tmp_path / "nope.npy")}}))


def test_yaml_config_resolves_relative_paths(tmp_path, table):
    path, data = table
    (tmp_path / "tiers.yaml").write_text(
        f"table:\n  path: {path.name}\ntiers:\n  hot: {{capacity: 5%}}\n  warm: {{capacity: 64KiB}}\n"
    )
    with TieredStore.open(tmp_path / "tiers.yaml") as store:
        assert store.hot.capacity == ROWS * 5 // 100
        assert store.warm.capacity == (64 << 10) // (DIM * 4)
        assert torch.equal(store.lookup([1, 2]), data[[1, 2]])


def test_yaml_config_expands_a_home_folder(tmp_path, table, monkeypatch):
    """A path written ``~/tables/t.npy`` was taken relative to the YAML file's folder (a
    folder named ``~`` beside it), where a shell and the demo read the user's home."""
    path, data = table
    rows = tmp_path / "rows.npy"
    np.save(rows, np.array([3, 4]))
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "elsewhere" / "tiers.yaml"
    config.parent.mkdir()
    config.write_text(
        f"table: {{path: ~/{path.relative_to(tmp_path)}}}\n"
        "tiers: {hot: {capacity: 4, policy: static+lru, static_rows: ~/rows.npy}}\n"
    )
    cfg = StoreConfig.from_yaml(config)
    assert cfg.table.path == str(path.resolve())
    assert cfg.tiers.hot.static_rows == str(rows.resolve())
    with TieredStore.open(config) as store:
        assert torch.equal(store.lookup([3, 4]), data[[3, 4]])


def test_errors_at_open_name_the_yaml_file(tmp_path, table):
    """Errors found when a store opens from a YAML file (a policy typo, a capacity past the
    table, a missing row list, a dim the table has not) named the key but not the file, which
    ``serve`` and the file's own schema errors do."""
    path, _ = table
    config = tmp_path / "tiers.yaml"
    for tiers, message in (
        ("{hot: {capacity: 10, policy: lruu}}", "tiers.hot.policy: unknown policy 'lruu'"),
        ("{warm: {capacity: 9999999}}", "tiers.warm.capacity: 9999999 is 9,999,999 rows"),
        (
            "{hot: {capacity: 10, policy: static+lru, static_rows: gone.npy}}",
            "tiers.hot.static_rows: cannot read",
        ),
    ):
        config.write_text(f"table: {{path: {path.name}}}\ntiers: {tiers}\n")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: {re.escape(message)}"):
            TieredStore.open(config)
    config.write_text(f"table: {{path: {path.name}, dim: 3}}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: table.dim: config says 3"):
        TieredStore.open(config)
    with pytest.raises(ConfigError, match=r"^table.dim: config says 3"):  # no file to name
        TieredStore.open({"table": {"path": str(path), "dim": 3}})
    from tiered_store.distributed import ShardedStore

    config.write_text(f"table: {{path: {path.name}}}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: sharding: missing"):
        ShardedStore.open(config)


def test_warnings_at_open_name_the_yaml_file(tmp_path, table):
    """A setting its policy ignores, or static_rows that fill the tier, found as a store opens
    from a YAML file: the warning named the key but not the file, as its errors now do."""
    from tiered_store import IgnoredSettingWarning
    from tiered_store.cache_plan import PinnedRowsWarning

    path, _ = table
    np.save(tmp_path / "pinned.npy", np.arange(100, dtype=np.int64))
    config = tmp_path / "tiers.yaml"
    config.write_text(
        f"table: {{path: {path.name}}}\ntiers:\n  hot: {{capacity: 10, policy: lru, profile: p.npz}}"
        "\n  warm: {capacity: 50, policy: static+lru, static_rows: pinned.npy}\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TieredStore.open(config).close()
    messages = {w.category: str(w.message) for w in caught}
    assert messages[IgnoredSettingWarning].startswith(f"{config}: tiers.hot.profile: policy 'lru'")
    assert messages[PinnedRowsWarning].startswith(f"{config}: tiers.warm.static_rows: ")
    assert all(w.filename == __file__ for w in caught)  # still at the caller's line
    with warnings.catch_warnings(record=True) as caught:  # no file: the key alone, as before
        warnings.simplefilter("always")
        TieredStore.open(StoreConfig.from_yaml(config)).close()
    assert str(caught[0].message).startswith("tiers.hot.profile: policy 'lru'")


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("table: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        StoreConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        StoreConfig.from_yaml(tmp_path / "missing.yaml")
    # a key given twice kept the last value, silently
    for text, line in (
        ("table: {path: t.npy}\ntiers:\n  hot:\n    capacity: 50%\n    capacity: 10\n", 4),
        ("tiers: {hot: {capacity: 1, capacity: 2}}\n", 1),
    ):
        bad.write_text(text)
        with pytest.raises(
            ConfigError, match=rf"key 'capacity' given twice \(first on line {line}\)"
        ):
            StoreConfig.from_yaml(bad)
    # a merge key's values may be overridden: that is YAML, not a key given twice
    bad.write_text(
        "hot: &h {capacity: 5, policy: lru}\ntiers:\n  warm:\n    <<: *h\n    capacity: 9\n"
    )
    assert load_yaml(bad)["tiers"]["warm"] == {"capacity": 9, "policy": "lru"}


def test_a_control_character_in_a_config_is_not_valid_yaml_naming_the_file(tmp_path):
    """A NUL or a stray BEL in a config file was a bare yaml ReaderError traceback (since the
    alias-bomb check made the loader before its try), not a ConfigError naming the file."""
    bad = tmp_path / "bad.yaml"
    for text in ("table: {path: t.npy}\x07\n", "table:\n  path: t.npy\x00\n"):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: unacceptable character"):
            StoreConfig.from_yaml(bad)


def test_a_config_nested_past_the_recursion_limit_is_named(tmp_path):
    """A thousand nested brackets (PyYAML composes them recursively) was a bare RecursionError
    traceback, not a ConfigError naming the file."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("table: {path: t.npy}\nx: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml: its collections are nested deeper than"):
        StoreConfig.from_yaml(deep)
    deep.write_text("table: {path: t.npy}\nx: " + "[" * 50 + "]" * 50 + "\n")  # read, then named
    with pytest.raises(ConfigError, match=r"x: unknown key"):
        StoreConfig.from_yaml(deep)


def test_a_number_with_an_exponent_and_no_dot_is_a_number(tmp_path):
    """PyYAML reads YAML 1.1, whose floats need a dot: ``1e-06`` (as Python's json writes 1e-6)
    and ``1e3`` were strings, so a JSON config json.dump wrote was refused ("expected a finite
    number > 0, got '1e-06'") and an integer key read "got '1e3'" of what was written as a number."""
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"engram": {"layer_ids": [1, 3], "norm_eps": 1e-06}}))
    assert load_engram_config(config)[0].norm_eps == 1e-06
    config = tmp_path / "tiers.yaml"
    config.write_text(
        "table: {path: t.npy}\ncost_model: {nvme_read_iops: 5E5, compute_seconds_per_batch: 1.5e-3}"
        "\ntiers: {warm: {repin: {every: 1e3}}}\n"
    )
    data = load_yaml(config)
    assert data["cost_model"] == {"nvme_read_iops": 5e5, "compute_seconds_per_batch": 1.5e-3}
    with pytest.raises(ConfigError, match=r"repin.every: expected an integer >= 1, got 1000.0"):
        StoreConfig.from_yaml(config)  # a float where a count is expected, named as a number
    config.write_text("table: {path: '1e3'}\ntiers: {hot: {policy: lru}}\n")  # quoted: a string
    assert load_yaml(config)["table"]["path"] == "1e3"


def test_yaml_the_library_writes_reads_back_as_written(tmp_path):
    """``yaml.safe_dump`` wrote the strings '1e3' and '1.5e3' unquoted (YAML 1.1 reads them as
    text), which ``load_yaml`` reads back as numbers; ``dump_yaml`` quotes them."""
    texts = ["1e3", "1.5e3", ".5E1", "-1e-6", "+2E5", "1_000", "010", "0x10", "yes", "null", "5%"]
    doc = {"strings": texts, "numbers": [1e-06, 5e5, 1000, -8, 0.5], "nested": {"path": "1e5"}}
    config = tmp_path / "written.yaml"
    config.write_text(dump_yaml(doc))
    assert load_yaml(config) == doc


def test_a_number_with_a_leading_zero_is_refused_not_read_as_octal(tmp_path):
    """YAML 1.1 reads ``010`` as octal: ``capacity: 0100000`` made a tier of 32,768 rows, not
    100,000, without a word. A leading 0 that changes the value is refused, naming the line."""
    config = tmp_path / "tiers.yaml"
    config.write_text("table: {path: t.npy}\ntiers:\n  hot: {capacity: 0100000}\n")
    with pytest.raises(
        ConfigError,
        match=r"tiers.yaml: not valid YAML: 0100000: a leading 0 makes it octal in YAML 1.1 "
        r"\(32768\); expected the number without it \(100000\)(.|\n)*line 3",
    ):
        StoreConfig.from_yaml(config)
    # the same value either way, a string, hexadecimal: as before
    config.write_text(
        "table: {path: t.npy}\ntiers: {hot: {capacity: 07}, warm: {capacity: 0x10}}\n"
    )
    cfg = StoreConfig.from_yaml(config)
    assert (cfg.tiers.hot.capacity, cfg.tiers.warm.capacity) == (7, 16)
    config.write_text("table: {path: '010'}\n")
    assert load_yaml(config)["table"]["path"] == "010"


def test_a_path_yaml_reads_as_a_number_says_to_quote_it(tmp_path):
    """``path: 1e5`` (a number since YAML 1.2's exponents are read) or ``path: 2024`` was
    refused as "Input should be a valid string (got 100000.0)": not the name as written, nor
    how to give it."""
    config = tmp_path / "tiers.yaml"
    config.write_text("table: {path: 1e5}\n")
    with pytest.raises(
        ConfigError, match=r"table.path: got the number 100000.0; expected a path: quote it"
    ):
        StoreConfig.from_yaml(config)
    config.write_text("checkpoint: {path: 2024}\n")
    with pytest.raises(ConfigError, match=r"checkpoint.path: got the number 2024; expected a path"):
        ServeConfig.from_yaml(config)
    config.write_text("table: {path: '1e5'}\n")
    assert StoreConfig.from_yaml(config).table.path == str(tmp_path / "1e5")


def test_a_negative_number_with_a_leading_zero_is_named_with_its_sign(tmp_path):
    """``-010`` was refused as "octal in YAML 1.1 (8); expected the number without it (10)":
    both readings lost the sign the line holds."""
    config = tmp_path / "tiers.yaml"
    config.write_text("cost_model: {nvme_latency_us: -010}\n")
    with pytest.raises(
        ConfigError,
        match=r"-010: a leading 0 makes it octal in YAML 1.1 \(-8\); expected the number without "
        r"it \(-10\)",
    ):
        load_yaml(config)


def test_an_integer_longer_than_python_reads_is_named(tmp_path):
    """An integer of more than 4,300 digits (Python's limit on reading one) raised int()'s bare
    ValueError ("Exceeds the limit ...") out of load_yaml: a traceback naming no file or line."""
    config = tmp_path / "tiers.yaml"
    for value in ("7" * 5000, "0" + "7" * 5000):
        config.write_text(f"table: {{path: t.npy}}\nprefetch:\n  depth: {value}\n")
        with pytest.raises(
            ConfigError,
            match=rf"tiers.yaml: not valid YAML: an integer of {len(value):,} digits; expected at "
            r"most 4,300(.|\n)*line 3",
        ):
            StoreConfig.from_yaml(config)


def test_a_path_with_a_nul_character_is_named(tmp_path):
    """A NUL in a path (YAML's "\\0" escape) raised pathlib's bare ValueError ("embedded null
    byte") when the paths were resolved: a traceback, not the key that holds it."""
    config = tmp_path / "tiers.yaml"
    for text, key in (
        ('table: {path: "t\\0.npy"}\n', "table.path"),
        (
            'table: {path: t.npy}\ntiers: {hot: {preload_rows: "r\\0.npy"}}\n',
            "tiers.hot.preload_rows",
        ),
        ('table: {path: t.npy}\nsharding: {ranks: 2, shards: "s{rank}\\0"}\n', "sharding.shards"),
    ):
        config.write_text(text)
        with pytest.raises(
            ConfigError, match=rf"  {key}: got '.*\\x00.*'; expected a path without a NUL"
        ):
            StoreConfig.from_yaml(config)
    config.write_text('checkpoint: {path: "c\\0"}\nstore: {tiers: {warm: {profile: "p\\0.npz"}}}\n')
    with pytest.raises(
        ConfigError, match=r"checkpoint.path: got 'c\\x00'; expected a path without"
    ):
        ServeConfig.from_yaml(config)
    config.write_text('store: {tiers: {warm: {profile: "p\\0.npz"}}}\n')
    with pytest.raises(
        ConfigError, match=r"tiers.warm.profile: got '.*p\\x00.npz'; expected a path"
    ):
        ServeConfig.from_yaml(config)


def test_a_path_with_a_lone_surrogate_is_named(tmp_path):
    """A lone surrogate in a path (YAML's or JSON's "\\ud800" escape), which no file name can
    hold, raised a bare UnicodeEncodeError when the paths were resolved; it is refused by key."""
    config = tmp_path / "tiers.yaml"
    for text, key in (
        ('table: {path: "t\\ud800.npy"}\n', "table.path"),
        ('table: {path: t.npy}\ntiers: {warm: {profile: "p\\ud800.npz"}}\n', "tiers.warm.profile"),
        (
            'table: {path: t.npy}\nsharding: {ranks: 2, shards: "s{rank}\\ud800"}\n',
            "sharding.shards",
        ),
    ):
        config.write_text(text)
        with pytest.raises(ConfigError, match=rf"  {key}: got '.*\\ud800.*'; expected a path"):
            StoreConfig.from_yaml(config)
    json_config = tmp_path / "tiers.json"
    json_config.write_text('{"table": {"path": "t\\ud800.npy"}}')
    with pytest.raises(ConfigError, match=r"  table.path: got 't\\ud800.npy'; expected a path"):
        StoreConfig.from_yaml(json_config)
    config.write_text('store: {tiers: {warm: {profile: "p\\ud800.npz"}}}\n')
    with pytest.raises(ConfigError, match=r"tiers.warm.profile: got '.*p\\ud800.npz'; expected"):
        ServeConfig.from_yaml(config)
    config.write_text('checkpoint: {path: "c\\ud800"}\n')
    with pytest.raises(ConfigError, match=r"checkpoint.path: got 'c\\ud800'; expected a path"):
        ServeConfig.from_yaml(config)
    with pytest.raises(
        ConfigError, match=r"^config file '.*: expected a path without a lone surrogate"
    ):
        StoreConfig.from_yaml(tmp_path / "c\ud800.yaml")  # the file's own
    config.write_text('table: {path: "t\\udc80.npy"}\n')  # an undecodable byte's: a name
    assert StoreConfig.from_yaml(config).table.path == str(tmp_path / "t\udc80.npy")


def test_a_value_holding_an_integer_too_long_to_write_out_is_named_as_such():
    """A list holding an integer of over 4,300 digits was shown as 'an list too long to write
    out' (a one-element list, not long); it says what it holds."""
    with pytest.raises(ConfigError) as caught:
        StoreConfig.from_dict({"table": {"path": "t.npy"}, "prefetch": {"depth": [10**5000]}})
    assert "got a list holding an integer too long to write out" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        StoreConfig.from_dict({"table": {"path": "t.npy"}, "prefetch": {"depth": 10**5000}})
    assert "got an int too long to write out" in str(caught.value)


def test_a_huge_bad_value_is_shown_cut_short(tmp_path):
    """A bad value was repeated whole: a 100,000-element list where a capacity belongs made a
    690 KB message (and a 100,000-character string one of 100 KB); an integer of more digits than
    Python writes out raised its bare ValueError while the message was made."""
    items, text = list(range(100_000)), "x" * 100_000
    for data, key in (
        ({"tiers": {"hot": {"capacity": items}}}, "tiers.hot.capacity"),
        ({"tiers": {"hot": {"policy": items}}}, "tiers.hot.policy"),
        ({"tiers": {"hot": {"device": text}}}, "tiers.hot.device"),
        ({"tiers": {"cold": {"io": text}}}, "tiers.cold.io"),
        ({"prefetch": {"depth": items}}, "prefetch.depth"),
        ({"prefetch": {"depth": 16**5000}}, "prefetch.depth"),
        ({"cost_model": {"hbm_gbps": text}}, "cost_model.hbm_gbps"),
        ({"tiers": {"warm": {"repin": {"budget": text}}}}, "tiers.warm.repin.budget"),
        ({"prefetch": items}, "prefetch"),
        ({"table": {"path": f"t{text}\0"}}, "table.path"),
        ({text: 1}, "x" * 60),
    ):
        with pytest.raises(ConfigError) as caught:
            StoreConfig.from_dict({"table": {"path": "t.npy"}, **data})
        message = str(caught.value)
        assert f"  {key}" in message and len(message) < 600, message[:600]
        assert re.search(r"\.\.\. \(\d{3},\d{3} characters\)|too long to write out", message)
    for data in ({"server": {"address": text}}, {"checkpoint": {"path": items}}):
        with pytest.raises(ConfigError) as caught:
            ServeConfig.from_dict(data)
        assert len(str(caught.value)) < 600, str(caught.value)[:600]
    for name, doc in (("tiers.yaml", f"? {text}\n: 1\n? {text}\n: 2\n"), ("tiers.json", "")):
        config = tmp_path / name  # a key given twice, however long
        config.write_text(doc or json.dumps({text: 1}).replace("}", f", {json.dumps(text)}: 2}}"))
        with pytest.raises(ConfigError, match=r"given twice") as caught:
            load_yaml(config)
        assert len(str(caught.value)) < 600, str(caught.value)[:600]


def test_a_huge_policy_name_is_shown_cut_short(tmp_path, table):
    """A policy spec of 100,000 characters was repeated whole, twice, in its error (200 KB)."""
    path, _ = table
    for spec in ("x" * 100_000, "lru+" + "y" * 100_000):
        with pytest.raises(ConfigError, match=r"store.tiers.hot.policy: got 'x|'lru\+y") as caught:
            ServeConfig.from_dict({"store": {"tiers": {"hot": {"policy": spec}}}})
        assert "characters); expected at most 200 characters: an eviction policy" in str(
            caught.value
        )
        assert len(str(caught.value)) < 600
        tiers = {"hot": {"capacity": 10, "policy": spec}}
        with pytest.raises(ConfigError, match=r"^tiers.hot.policy: got ") as caught:
            TieredStore.open({"table": {"path": str(path)}, "tiers": tiers})
        assert len(str(caught.value)) < 600


def test_a_policy_refused_for_its_length_says_so():
    """A spec past 200 characters is refused unparsed, but its message gave only the grammar,
    which 'lru' padded with spaces (valid to the parser) already follows: it names the limit."""
    with pytest.raises(
        ConfigError,
        match=r"^tiers.hot.policy: got 'lru {57}'\.\.\. \(303 characters\); expected at most 200 "
        r"characters: an eviction policy",
    ):
        parse_policy("lru" + " " * 300, key="tiers.hot.policy")


def test_an_address_with_a_port_of_thousands_of_digits_is_named():
    """A port of more than 4,300 digits raised int()'s bare ValueError out of serve's address
    check; it is refused as a port out of range, shown cut short."""
    for address in ("h:" + "9" * 5000, "h:" + "0" * 5000 + "99999"):
        with pytest.raises(
            ConfigError, match=r"server.address: port 9+.*; expected a port in 0..65535"
        ) as caught:
            ServeConfig.from_dict({"server": {"address": address}})
        assert len(str(caught.value)) < 400
    assert ServeConfig.from_dict({"server": {"address": "h:" + "0" * 5000 + "80"}})


def test_an_address_with_unpaired_brackets_is_refused_naming_it():
    """An IPv6 host's brackets were stripped wherever they were, so '[::1:80' (no ']') and
    '::1]:80' were taken as '::1' port 80; an address whose host has a bracket is refused unless
    the host is one pair of them around the rest, naming the key and the value."""
    from tiered_store.config import check_address

    for address in ("[::1:80", "::1]:80", "[[::1]]:80", "[::1]x:80", "a[b]:80", "[]:80"):
        with pytest.raises(ConfigError) as caught:
            check_address(address, "server.address")
        said = str(caught.value)
        assert said.startswith(f"server.address: got {address!r}; expected"), said
        assert "'[::1]:8080'" in said, said
    assert check_address("[::1]:80", "k") == ("::1", 80)
    assert check_address("127.0.0.1:0", "k") == ("127.0.0.1", 0)


def test_an_address_with_an_ipv6_host_without_brackets_is_refused_naming_it():
    """A bare IPv6 address ('::1') was taken as host ':' port 1, and '1:2:3' as host '1:2': its
    last ':' cut the port off wherever it was. A host holding a ':' is refused unless in
    brackets, naming the key and the value; a bracketed one with a zone id is taken as given."""
    from tiered_store.config import check_address

    for address in ("::1", "::1:80", "fe80::1:80", "1:2:3", "fe80::1%eth0:80"):
        with pytest.raises(ConfigError) as caught:
            check_address(address, "server.address")
        said = str(caught.value)
        assert said.startswith(f"server.address: got {address!r}; expected"), said
        assert "an IPv6 host in one pair of brackets ('[::1]:8080')" in said, said
    assert check_address("[fe80::1%eth0]:80", "k") == ("fe80::1%eth0", 80)
    assert check_address("[::1]:0", "k") == ("::1", 0)


def test_a_config_path_with_a_nul_character_is_named():
    """A config file's own path with a NUL character raised pathlib's bare ValueError (embedded
    null byte) out of load_yaml and every from_yaml."""
    for read in (load_yaml, StoreConfig.from_yaml, ServeConfig.from_yaml, TieredStore.open):
        with pytest.raises(
            ConfigError, match=r"config file 'a\\x00b.yaml': expected a path without a NUL"
        ):
            read("a\0b.yaml")


def test_an_unreadable_json_config_is_not_called_a_yaml_file(tmp_path):
    """A .json config that was missing or not UTF-8 was refused as "expected a readable YAML
    file" (or "a YAML file"), though it is read as JSON."""
    config = tmp_path / "model.json"
    with pytest.raises(ConfigError, match=r"model.json: cannot read .*; expected a readable JSON"):
        load_yaml(config)
    config.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match=r"model.json: not UTF-8 text; expected a JSON file"):
        load_yaml(config)
    config = tmp_path / "tiers.yaml"
    with pytest.raises(ConfigError, match=r"tiers.yaml: cannot read .*; expected a readable YAML"):
        load_yaml(config)


def test_an_unreadable_config_with_a_huge_path_is_named_cut_short():
    """A 100,000-character path (a variable expanded wrong) was repeated whole in the "cannot
    read" error: a 100 KB message."""
    with pytest.raises(ConfigError, match=r"cannot read \(File name too long\)") as info:
        load_yaml("/tmp/" + "x" * 100_000 + ".yaml")
    assert len(str(info.value)) < 5_000
    assert "(100,010 characters)" in str(info.value)


def test_a_json_config_is_read_as_json(tmp_path):
    """A ``.json`` file was read by the YAML parser: JSON indented with tabs (valid JSON, which
    YAML refuses) was "not valid JSON", and a "\\ud83d\\ude00" escape read as two halves of a
    character. A key given twice is still refused, and bad JSON named as such."""
    config = tmp_path / "model.json"
    doc = {"engram": {"layer_ids": [1, 3], "seed": 7}, "note": "\U0001f600"}
    config.write_text(json.dumps(doc, indent="\t"))
    assert load_yaml(config) == doc
    config.write_text(json.dumps(doc), encoding="utf-8-sig")  # a byte-order mark first
    assert load_yaml(config) == doc
    assert load_engram_config(config, ignore_unknown=True)[0].seed == 7
    for text, message in (
        ('{"engram": {"seed": 1, "seed": 2}}', "key 'seed' given twice; expected each key once"),
        ('{"engram": {"seed": 1,}}', "not valid JSON: Expecting property name"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than JSON can be read here"),
    ):
        config.write_text(text)
        with pytest.raises(
            ConfigError, match=rf"Engram config {re.escape(str(config))}: .*{message}"
        ):
            load_engram_config(config)
    config.write_text("[1]")
    with pytest.raises(ConfigError, match=r"model.json: got a list at the top; expected a mapping"):
        load_yaml(config)
    config.write_text("")
    assert load_yaml(config) == {}


def test_a_json_config_named_in_upper_case_is_read_as_json(tmp_path):
    """``model.JSON`` (as a case-insensitive file system or a Windows tool names it) was read by
    the YAML parser: valid JSON indented with tabs was "not valid YAML"."""
    doc = {"engram": {"layer_ids": [1, 3], "seed": 7}}
    for name in ("model.JSON", "model.Json"):
        config = tmp_path / name
        config.write_text(json.dumps(doc, indent="\t"))
        assert load_yaml(config) == doc
        config.write_text('{"engram": {"seed": 1,}}')
        with pytest.raises(ConfigError, match=rf"{name}: not valid JSON: Expecting property"):
            load_yaml(config)


def test_a_section_left_empty_takes_its_defaults(tmp_path):
    """A section whose keys are all commented out (YAML's null, as in the commented examples)
    was refused ("prefetch: expected a mapping (got None)"), while serve's config, and an empty
    file, take it as the defaults."""
    config = tmp_path / "tiers.yaml"
    config.write_text(
        "table: {path: t.npy}\ntiers:\n  hot: {capacity: 5%}\n  restart:\n    # enabled: true\n"
        "prefetch:\n  # depth: 4\nsharding:\n"
    )
    cfg = StoreConfig.from_yaml(config)
    assert cfg.prefetch == PrefetchConfig() and cfg.tiers.restart.enabled is False
    assert cfg.tiers.hot.capacity == "5%" and cfg.sharding is None
    config.write_text("table:\n  # path: t.npy\n")  # a section without defaults: still named
    with pytest.raises(ConfigError, match=r"table: expected a mapping \(got None\)"):
        StoreConfig.from_yaml(config)


def test_a_key_that_is_not_a_string_is_named(tmp_path):
    """YAML 1.1 reads no/on/1 as a bool or an int: a ConfigError naming the file and line (or,
    in a dict given directly, the key path), not pydantic's "keywords must be strings"."""
    bad = tmp_path / "bad.yaml"
    for text, key, line in (
        ("table: {path: t.npy}\ntiers:\n  hot: {capacity: 5%}\n  no: {capacity: 1}\n", False, 4),
        ("table: {path: t.npy}\n1: 2\n", 1, 2),
        ("table: {path: t.npy, on: 1}\n", True, 1),
        # a list or mapping key was named before its items were read: "key []", "key {}"
        ("table: {path: t.npy}\n? [1, 2]\n: 3\n", r"\[1, 2\]", 2),
        ("table: {path: t.npy}\n? {a: 1}\n: 3\n", r"\{'a': 1\}", 2),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=rf"bad.yaml: .*key {key}: expected a string key; quote it(.|\n)*line {line}"):  # fmt: skip
            StoreConfig.from_yaml(bad)
    for data, where in (
        ({"table": {"path": "t.npy"}, 1: 2}, "config: invalid configuration\n  key 1"),
        ({"table": {"path": "t.npy"}, "tiers": {"warm": {False: 1}}}, "  tiers.warm: key False"),
    ):
        with pytest.raises(ConfigError, match=rf"{where}: expected a string key"):
            StoreConfig.from_dict(data)


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    """Nine lines of nested aliases (9**9 values) were validated, and every error message
    written out, value by value: minutes of CPU and gigabytes before any answer."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join([*lines, "table: {path: t.npy}"]) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb.yaml: its aliases \(\*name\) expand it to more"):
        StoreConfig.from_yaml(bomb)
    assert time.monotonic() - started < 5
    bomb.write_text("table: &t {path: t.npy, again: *t}\n")  # into itself: no end
    with pytest.raises(
        ConfigError, match="expand it to more than 1,000,000 values, or into itself"
    ):
        StoreConfig.from_yaml(bomb)
    bomb.write_text(
        "\n".join([*lines[:4], "table: {path: t.npy}"]) + "\n"
    )  # 9**4: an alias is fine
    assert len(load_yaml(bomb)["a3"]) == 9


def test_failed_lookup_leaves_table_file_untouched(table):
    path, _ = table
    before = path.read_bytes()
    with TieredStore(store_config(path, hot={"capacity": 10})) as store, pytest.raises(RowIdError):
        store.lookup(torch.tensor([ROWS * 2]))
    assert path.read_bytes() == before


def test_memory_report_counts_metadata(table):
    path, _ = table
    with TieredStore(store_config(path, hot={"capacity": 100}, warm={"capacity": 200})) as store:
        report = store.memory_report()
        assert report["hot_payload_bytes"] == 100 * DIM * 4
        assert report["hot_metadata"]["per_table_row"] == 4
        # owner, flag, free list, LRU clock, victim buffer (a slot and a key, at its most)
        assert report["warm_metadata"]["per_slot"] == 8 + 1 + 8 + 8 + 16


def test_lookahead_keeps_rows_of_queued_prefetches(table):
    """With lookahead on, a batch's admissions never evict rows a queued prefetch will read."""
    path, data = table
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"warm": {"capacity": 40}},
            "prefetch": {"depth": 4, "lookahead": True},
        }
    )
    with TieredStore(cfg) as store:
        keep = torch.arange(20)
        store.lookup(keep)  # resident, and the least recent from now on
        store.lookup(torch.arange(100, 120))
        store._prefetcher._queued[-1] = keep  # as if a prefetch of `keep` were waiting in the queue
        store.lookup(torch.arange(200, 230))  # needs 30 slots: only the 20 unqueued rows may go
        del store._prefetcher._queued[-1]
        assert bool((store.warm.probe(keep) >= 0).all())
        assert torch.equal(store.lookup(keep), data[keep])
    # with ids past the table read as zeros, a queued prefetch may hold some: no row to keep
    table = cfg.table.model_copy(update={"out_of_range": "zero"})
    with TieredStore(cfg.model_copy(update={"table": table})) as store:
        store.lookup(torch.arange(40))  # full
        store._prefetcher._queued[-1] = torch.tensor([-1, 5, len(data) + 3])
        assert torch.equal(store.lookup(torch.arange(100, 110)), data[100:110])
        assert bool((store.warm.probe(torch.tensor([5])) >= 0).all())


def test_prefetch_worker_runs_one_intra_op_thread_and_leaves_the_callers():
    """The prefetch worker's torch ops run on one intra-op thread (its own OpenMP team would take
    cores from the caller's model); the caller's setting stays what it was."""
    import threading

    from tiered_store.prefetch import Prefetcher

    def fetch(flat, packed):
        return threading.current_thread().name, torch.get_num_threads()

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fetcher = Prefetcher(fetch, depth=2)
        name, threads = fetcher.submit(None, torch.tensor([1]), (1,)).future.result()
        fetcher.close()
        assert name.startswith("tiered-store-prefetch") and threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_a_runner_pool_whose_start_hook_fails_fails_its_calls_not_hangs():
    """A pool thread's start hook (the prefetch worker's: one intra-op thread) that raised ended
    the thread, still counted as running: the calls queued, and every later one (no thread is
    started for it), never completed, so a lookup collecting its prefetch, and the close
    waiting for the queue, waited for good. Each call fails with the pool's error naming the
    hook's, as a ThreadPoolExecutor's initializer failure breaks its pool."""
    from tiered_store.prefetch import RunnerPool

    def hook():
        raise OSError(12, "no memory for the thread's arena")

    pool = RunnerPool(1, "tiered-store-prefetch", hook)
    first, second = pool.submit(int, "1"), pool.submit(int, "2")
    for future in (first, second, pool.submit(int, "3")):
        with pytest.raises(RuntimeError) as failed:
            future.result(timeout=60)  # a hang: a TimeoutError, and a failure
        assert str(failed.value) == (
            "tiered-store-prefetch pool: its thread's start failed (OSError: [Errno 12] no "
            "memory for the thread's arena); expected it to start, so no call of it runs"
        )
        assert isinstance(failed.value.__cause__, OSError)
    pool.shutdown()


def test_a_missing_table_or_manifest_is_named(tmp_path):
    with pytest.raises(ConfigError) as missing:
        TieredStore.open({"table": {"path": str(tmp_path / "nope.npy")}})
    assert str(missing.value) == (
        f"table.path: {tmp_path / 'nope.npy'} does not exist; expected a table made by "
        "`tiered-store init`"
    )
    lone = tmp_path / "lone.npy"
    np.save(lone, np.zeros((4, 2), np.float32))  # a .npy, but not a table: no manifest
    with pytest.raises(ConfigError) as foreign:  # it was said not to exist
        TieredStore.open({"table": {"path": str(lone)}})
    assert str(foreign.value).startswith(
        f"table.path: {lone}: table manifest {lone}.manifest.json does not exist"
    )
    with pytest.raises(ConfigError, match=r"table.path: .* is a directory; expected a table file"):
        TieredStore.open({"table": {"path": str(tmp_path)}})


def test_the_example_tier_configs_are_valid_and_the_pinned_one_opens(tmp_path):
    """examples/tiers.yaml parses (its 256 MiB warm tier needs a table of 2M rows to open);
    examples/tiers-pinned.yaml opens over a table and a hot-rows list beside it, as it says."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    plain = StoreConfig.from_yaml(examples / "tiers.yaml")
    assert (plain.tiers.warm.capacity, plain.tiers.cold.io) == ("256MiB", "direct")
    config = tmp_path / "tiers-pinned.yaml"
    config.write_text((examples / "tiers-pinned.yaml").read_text())
    create_table(tmp_path / "table.npy", RandomSource(200_000, 4), progress=False)
    np.save(tmp_path / "hot_rows.npy", np.arange(60_000, dtype=np.int64)[::-1])  # room for LRU
    with TieredStore.open(config) as store:
        assert store.hot.capacity == 100_000 and store.warm.capacity == 20_000
        assert store.hot.pinned_count == 60_000  # the list, pinned at open
        store.lookup(torch.tensor([5, 150_000]))
        assert store.stats()["hot"]["hits"] == 1


def test_close_wait_s_infinite_waits_and_a_bad_one_is_refused_before_anything_stops(tmp_path):
    """``close(wait_s=math.inf)`` (wait without end) raised ``OverflowError`` from the join of
    a background thread (a warm restart's), the store left half closed (its threads stopped,
    its files open); NaN raised ``ValueError: Invalid value NaN`` there, and a string a
    ``TypeError`` naming neither. An infinite wait_s (or one past what a join takes) closes as
    None does; NaN or a non-number is refused up front, naming the value, the store open."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    config = store_config(path, restart={"enabled": True})
    with TieredStore(config) as store:
        store.lookup(torch.arange(10))  # saved at close: the next open restores in a thread
    for bad in (math.nan, "1"):
        store = TieredStore(config)
        with pytest.raises(ConfigError, match=rf"close: wait_s={re.escape(repr(bad))}; expected"):
            store.close(wait_s=bad)
        assert not store.closed and not store._stop.is_set()  # nothing stopped
        assert torch.equal(store.lookup(torch.arange(3)), store.cold.read_rows(np.arange(3)))
        assert store.close()
    for endless in (math.inf, 1e300):
        store = TieredStore(config)
        assert store.close(wait_s=endless) and store.closed


def test_two_threads_closing_a_store_close_it_once(tmp_path, table):
    """close() from two threads at once: the second waits for the first and returns; the store
    saves and releases its locks once (a second release closed whatever reused the fd)."""
    import threading

    path, _ = table
    cfg = {
        "table": {"path": str(path)},
        "tiers": {"hot": {"capacity": 8}, "restart": {"enabled": True}},
    }
    store = TieredStore.open(cfg)
    store.lookup([1, 2, 3])
    saves, save = [], store.save_restart

    def slow_save():
        saves.append(threading.current_thread().name)
        time.sleep(0.2)  # the second closer arrives while the first is inside close()
        return save()

    store.save_restart = slow_save
    errors: list[BaseException] = []

    def closer():
        try:
            store.close()
        except BaseException as exc:  # noqa: BLE001 (the test reports any)
            errors.append(exc)

    threads = [threading.Thread(target=closer, name=f"closer{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and len(saves) == 1


def test_a_failed_open_leaves_no_fd_lock_or_reader_behind(tmp_path, table):
    """An open that fails after the table and its delta are open (here: a preload list that
    does not exist) closes them again: no fd, version hold or pinned LMDB reader is left."""
    from tiered_store.delta import row_delta
    from tiered_store.errors import ConfigError

    path, _ = table
    with TieredStore.open({"table": {"path": str(path)}}) as writer:  # the table has a delta
        writer.write([1], torch.ones(1, writer.row_width))
        writer.commit()
    bad = {
        "table": {"path": str(path)},
        "tiers": {"hot": {"capacity": 8, "preload_rows": "no.npy"}},
    }
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ConfigError, match="preload_rows"):
            TieredStore.open(bad)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert not any(str(path) in key[1] for key in row_delta._ENVS)  # no environment held


@pytest.mark.parametrize("io", ["mmap", "pread"])
def test_a_close_waits_for_lookups_under_way_and_refuses_later_ones(tmp_path, io):
    """Threads look up while another closes the store: each lookup returns the table's rows or
    raises "store is closed" (a lookup under way read the closed table: a raw RuntimeError from
    the reader pool, or numba's TypingError on the unmapped file)."""
    import threading

    from tiered_store import TieredStoreError

    path, data = make_table(tmp_path, rows=100_000, dim=8)
    outcomes: list[str] = []

    def looker(store, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        while True:
            ids = torch.randint(0, data.shape[0], (20_000,), generator=gen)
            try:
                rows = store.lookup(ids)
            except TieredStoreError as exc:
                outcomes.append(str(exc))
                return
            except Exception as exc:  # noqa: BLE001 (what the test is for)
                outcomes.append(f"raw {type(exc).__name__}: {exc}")
                return
            if not torch.equal(rows, data[ids]):
                outcomes.append("wrong rows")

    for trial in range(6):
        config = store_config(path, hot={"capacity": 100}, warm={"capacity": 1_000})
        config = config.model_copy(
            update={
                "tiers": config.tiers.model_copy(
                    update={"cold": config.tiers.cold.model_copy(update={"io": io, "threads": 2})}
                )
            }  # fmt: skip
        )
        store = TieredStore(config)
        threads = [threading.Thread(target=looker, args=(store, s)) for s in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.02 + 0.02 * trial)
        store.close()
        for t in threads:
            t.join()
    assert set(outcomes) == {"store is closed; open a new TieredStore"}, outcomes


def test_after_close_a_handle_is_refused_and_a_0_d_id_gives_one_row(tmp_path):
    """A handle collected after close is refused (it returned the rows it staged, with a write
    close had dropped); a 0-d NumPy id gives one row, [dim] (it gave [1, dim])."""
    from tiered_store import TieredStoreError

    path, data = make_table(tmp_path, rows=5_000, dim=4)
    store = TieredStore(store_config(path, hot={"capacity": 50}, warm={"capacity": 200}))
    assert store.lookup(np.array(7)).shape == (4,) == store.lookup(torch.tensor(7)).shape
    handle = store.prefetch([1, 2, 3])
    store.close()
    with pytest.raises(TieredStoreError, match="store is closed"):
        store.lookup([1, 2, 3], handle)


def test_the_concurrency_helper_fails_when_lookups_raise(tmp_path):
    """assert_concurrent_lookups_exact recorded only wrong rows: a lookup that raised ended its
    thread and the helper passed."""
    path, data = make_table(tmp_path, rows=100, dim=4)
    store = TieredStore(store_config(path))
    store.close()  # every lookup raises now
    with pytest.raises(AssertionError, match="StoreClosedError: store is closed"):
        assert_concurrent_lookups_exact(store, data, batch=10, rounds=2, threads=2)


def test_close_gives_up_waiting_after_wait_s(tmp_path):
    """A call under way that never ends (a hung cold read) holds close() at most wait_s (a
    sharded store closes its shard within sharding.timeout_s so): new calls are refused at once,
    the files stay open under the call (closed under it, a read went on through a reused fd),
    and the call closes them as it ends."""
    import threading

    from tiered_store import TieredStoreError

    path, _ = make_table(tmp_path, rows=100, dim=4)
    store = TieredStore(store_config(path))
    store.write([1], torch.ones(1, 4))
    store.commit(5)
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:  # a call under way, as a lookup blocked in a read is
        with store._file_calls.entered():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=stuck)
    thread.start()
    entered.wait(10)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="still under way after 0.3 s"):
        assert store.close(wait_s=0.3) is False  # left under the call (serve exits past it)
    assert 0.25 < time.monotonic() - start < 5
    with pytest.raises(TieredStoreError, match="store is closed"):
        store.lookup([1])
    assert not store.cold._closed  # still open under the call
    assert store.stats()["writes"]["committed_step"] == 5  # (it read 0 until the late close)
    release.set()
    thread.join()
    assert store.cold._closed  # the call closed it as it ended
    assert store.close() is False  # closed, but not by a close that waited for its calls


def _prefetch_held_in_its_read(tmp_path, monkeypatch):
    """A store (every lookup cold), its table's rows, and a prefetch of rows [1, 2, 3] whose cold
    read waits (a dying disk) until the Event returned is set (at most 30 s)."""
    import threading

    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0}))
    entered, release = threading.Event(), threading.Event()
    read_rows = store.cold.read_rows

    def hung_read(ids):
        entered.set()
        release.wait(30)
        return read_rows(ids)

    monkeypatch.setattr(store.cold, "read_rows", hung_read)
    handle = store.prefetch([1, 2, 3])
    assert entered.wait(10)
    return store, data, handle, release


def test_close_gives_up_on_a_prefetch_whose_read_hangs(tmp_path, monkeypatch):
    """A prefetch's cold read that does not return (a dying disk: the read is made to wait here)
    held close(wait_s=...) for good: the prefetch worker was joined without a limit."""

    store, data, handle, release = _prefetch_held_in_its_read(tmp_path, monkeypatch)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="still under way"):
        store.close(wait_s=0.3)
    assert time.monotonic() - start < 5
    release.set()
    assert torch.equal(handle.future.result(10)[0], data[[1, 2, 3]])  # it ended on its own


def test_a_read_hung_in_a_cold_runner_thread_does_not_hold_the_exit_after_close_gave_up(
    tmp_path,
):
    """With ``cold.threads`` > 1 a lookup's pages are read by the table's runner threads too: a
    ``ThreadPoolExecutor``'s, which the interpreter joins at exit, so one hung in a read (a dead
    disk: its read is made to wait for good here) kept the process from exiting after
    ``close(wait_s=...)`` had given up on it. In a child process: the close returns False and
    the process exits."""
    path, _ = make_table(tmp_path, rows=400, dim=1024)
    script = textwrap.dedent(
        f"""
        import os, threading, warnings
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig

        config = {{"table": {{"path": {str(path)!r}}}, "tiers": {{
            "hot": {{"capacity": 0}}, "warm": {{"capacity": 0}}, "cold": {{"threads": 4}}}}}}
        store = TieredStore(StoreConfig.from_dict(config))
        hung, preadv = threading.Event(), os.preadv

        def dead_disk(*args):  # a runner thread's read never returns
            if threading.current_thread().name.startswith("cold-read"):
                hung.set()
                threading.Event().wait()
            return preadv(*args)

        os.preadv = dead_disk
        ids = torch.arange(0, 400, 3)  # 134 extents: every runner thread reads some
        threading.Thread(target=store.lookup, args=(ids,), daemon=True).start()
        assert hung.wait(30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.3 s"
            print("closed", store.close(wait_s=0.3), flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stdout.split()) == (0, ["closed", "False"]), proc.stderr


def test_close_from_a_signal_handler_inside_a_lookup_is_an_error_not_a_deadlock(tmp_path):
    """A signal handler that closes the store ran on the main thread inside a lookup holding the
    store's lock: the close waited for that lock (its save, under it) for good, and the lookup
    under it with it. In a child process, a real signal is handled as the lookup plans under the
    lock: the close raises a RuntimeError saying so (out of the lookup), and a close after the
    lookup closes the store."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = textwrap.dedent(
        f"""
        import signal, sys
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig

        store = TieredStore(StoreConfig.from_dict({{"table": {{"path": {str(path)!r}}}}}))

        def close_on_signal(signum, frame):
            store.close()

        signal.signal(signal.SIGUSR1, close_on_signal)

        def signal_in_plan(frame, event, arg):  # handled at plan's first instruction
            if event == "call" and frame.f_code.co_name == "plan":
                sys.setprofile(None)
                signal.raise_signal(signal.SIGUSR1)

        sys.setprofile(signal_in_plan)
        try:
            store.lookup(torch.arange(10))
        except RuntimeError as exc:
            print("raised:", exc)
        sys.setprofile(None)
        print("closed", store.close(), flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "raised: close: called on a thread inside a call that holds" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "closed True", proc.stdout


def test_close_from_a_signal_handler_as_a_lookup_takes_the_lock_is_an_error_not_a_deadlock(
    tmp_path,
):
    """The store's lock noted its holder only after it was taken: a signal handler's close run on
    the main thread just then found the lock not held there, and waited for it (its save, under
    it) for good. In a child process, a real signal is handled as the lock's acquire returns in
    a lookup: the close raises the RuntimeError of a close inside a lookup, and a close after
    the lookup closes the store."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = textwrap.dedent(
        f"""
        import faulthandler, signal, sys
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure
        store = TieredStore(StoreConfig.from_dict({{"table": {{"path": {str(path)!r}}}}}))

        def close_on_signal(signum, frame):
            store.close()

        signal.signal(signal.SIGUSR1, close_on_signal)

        def signal_as_taken(frame, event, arg):  # handled as the acquire returns
            if (
                event == "c_return"
                and getattr(arg, "__name__", "") == "acquire"
                and frame.f_code.co_filename.endswith("store_lock.py")
            ):
                sys.setprofile(None)
                signal.raise_signal(signal.SIGUSR1)

        sys.setprofile(signal_as_taken)
        try:
            store.lookup(torch.arange(10))
        except RuntimeError as exc:
            print("raised:", exc)
        sys.setprofile(None)
        print("closed", store.close(), flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "raised: close: called on a thread inside a call that holds" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "closed True", proc.stdout


def test_close_from_a_signal_handler_inside_a_readers_delta_read_does_not_hang(tmp_path):
    """A store reading a table another store wrote reads its delta through one pinned
    transaction, under the delta's lock; a signal handler's close, run on the main thread inside
    such a read, let go of that transaction under the same lock, and waited for it for good. In
    a child process, a real signal is handled as ``read_committed`` reads the delta (off the
    store's lock): the close returns, the read fails as a read of the closed delta (or returns
    the rows), and the store is closed."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = textwrap.dedent(
        f"""
        import faulthandler, signal, sys
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig
        from tiered_store.errors import TierIOError

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure
        config = StoreConfig.from_dict({{"table": {{"path": {str(path)!r}}}}})
        with TieredStore(config) as writer:
            writer.write(torch.arange(10), torch.full((10, 4), 7.0))
            writer.commit()
        store = TieredStore(config)
        signal.signal(signal.SIGTERM, lambda *_: print("closed", store.close(), flush=True))

        def signal_in_read(frame, event, arg):  # handled as the delta's transaction reads
            if (
                event == "c_call"
                and frame.f_code.co_name == "snapshot"
                and getattr(arg, "__name__", "") == "get"
            ):
                sys.setprofile(None)
                signal.raise_signal(signal.SIGTERM)

        sys.setprofile(signal_in_read)
        try:
            step, rows = store.read_committed(torch.arange(10))
            print("rows", bool((rows == 7).all()))
        except TierIOError as exc:
            print("failed", "was closed during a read" in str(exc))
        finally:
            sys.setprofile(None)
        print("closed", store.closed)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["closed", "True"], proc.stdout + proc.stderr
    assert proc.stdout.split()[2:4] in (["rows", "True"], ["failed", "True"]), proc.stdout
    assert proc.stdout.split()[-2:] == ["closed", "True"], proc.stdout


def test_close_from_a_signal_handler_inside_the_same_threads_close_returns_at_once(tmp_path):
    """A SIGTERM handler that closes the store, run on the main thread while that thread's own
    close was under way (a script closing at its end), waited for that close to finish: for
    good, as it ran under the handler. In a child process, a real signal is handled at points
    of the main thread's close (before its waits, in its save under the store's lock, as it
    closes the files): the handler's close returns False at once (that close finishes the
    job), and the main thread's close closes the store."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = textwrap.dedent(
        f"""
        import faulthandler, signal, sys
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure
        config = StoreConfig.from_dict(
            {{"table": {{"path": {str(path)!r}}}, "tiers": {{"restart": {{"enabled": True}}}}}}
        )
        for point in ("_stop_background", "held", "_close_files"):
            store = TieredStore(config)
            store.lookup(torch.arange(10))
            signal.signal(signal.SIGTERM, lambda *_: print(point, "handler", store.close()))

            def signal_at(frame, event, arg):  # handled at the point's first instruction
                if event == "call" and frame.f_code.co_name == point:
                    sys.setprofile(None)
                    signal.raise_signal(signal.SIGTERM)

            sys.setprofile(signal_at)
            print(point, "main", store.close(), store.closed, flush=True)
            sys.setprofile(None)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        line
        for point in ("_stop_background", "held", "_close_files")
        for line in (f"{point} handler False", f"{point} main True True")
    ], proc.stdout + proc.stderr


def test_close_from_a_signal_handler_inside_a_save_restart_of_its_thread_saves_and_closes(
    tmp_path,
):
    """A SIGTERM handler that closes the store, run on the main thread inside its own
    ``save_restart()`` (the save's lock held while it writes and syncs the file), saved the
    restart file as the close does: it waited for that lock for good. In a child process, a
    real signal is handled as the save checks the store is open, under that lock: the
    handler's close saves and closes, the interrupted save raises StoreClosedError (the close
    saved what the store held), and the next open restores the rows."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = textwrap.dedent(
        f"""
        import faulthandler, signal, sys
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig
        from tiered_store.errors import StoreClosedError

        faulthandler.dump_traceback_later(30, exit=True)  # a hang: the stack, and a failure
        config = StoreConfig.from_dict(
            {{"table": {{"path": {str(path)!r}}}, "tiers": {{
                "restart": {{"enabled": True}}, "warm": {{"capacity": 10}}}}}}
        )
        store = TieredStore(config)
        store.lookup(torch.tensor([5, 6, 7]))
        signal.signal(signal.SIGTERM, lambda *_: print("handler", store.close()))

        def signal_in_check(frame, event, arg):  # handled at its first instruction
            if event == "call" and frame.f_code.co_name == "still_current":
                sys.setprofile(None)
                signal.raise_signal(signal.SIGTERM)

        sys.setprofile(signal_in_check)
        try:
            store.save_restart()
        except StoreClosedError:
            print("save refused: closed")
        sys.setprofile(None)
        print("main", store.close())
        with TieredStore(config) as again:
            again.wait_restored()
            print(sorted(again.warm.held_rows().tolist()))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "handler True",
        "save refused: closed",
        "main True",
        "[5, 6, 7]",
    ], proc.stdout + proc.stderr
    assert not list(tmp_path.glob(".*.tmp")), "the interrupted save left its temporary file"


def test_a_read_hung_in_the_prefetch_worker_does_not_hold_the_exit_after_close_gave_up(
    tmp_path,
):
    """A prefetch's fetch runs on the store's prefetch worker: a ``ThreadPoolExecutor``'s,
    which the interpreter joins at exit, so one hung in a read (a dead disk: its read is made to
    wait for good here) kept the process from exiting after ``close(wait_s=...)`` had given up
    on it. In a child process: the close returns False and the process exits."""
    path, _ = make_table(tmp_path, rows=400, dim=1024)
    script = textwrap.dedent(
        f"""
        import os, threading, warnings
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig

        config = {{"table": {{"path": {str(path)!r}}}, "tiers": {{
            "hot": {{"capacity": 0}}, "warm": {{"capacity": 0}}, "cold": {{"threads": 1}}}}}}
        store = TieredStore(StoreConfig.from_dict(config))
        hung, preadv = threading.Event(), os.preadv

        def dead_disk(*args):  # the prefetch worker's read never returns
            if threading.current_thread().name.startswith("tiered-store-prefetch"):
                hung.set()
                threading.Event().wait()
            return preadv(*args)

        os.preadv = dead_disk
        handle = store.prefetch(torch.arange(0, 400, 3))
        assert hung.wait(30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.3 s"
            print("closed", store.close(wait_s=0.3), handle.done(), flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stdout.split()) == (0, ["closed", "False", "False"]), proc.stderr


def test_a_prefetch_whose_worker_cannot_start_says_so_not_that_the_store_closed(tmp_path):
    """The prefetch worker starts with the first prefetch: one that could not start (no memory
    for its stack, a process limit) was reported as "the store is closed; open a new
    TieredStore", though the store stays open. In a child process under an address-space limit
    that a 256 MiB stack does not fit: the prefetch raises a RuntimeError naming the prefetch
    worker and why, and the store still looks up."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = textwrap.dedent(
        f"""
        import resource, threading
        import torch
        from tiered_store import TieredStore
        from tiered_store.config import StoreConfig

        config = {{"table": {{"path": {str(path)!r}}}, "tiers": {{"cold": {{"threads": 1}}}}}}
        store = TieredStore(StoreConfig.from_dict(config))
        store.lookup(torch.arange(10))  # everything loaded
        threading.stack_size(256 << 20)
        status = open("/proc/self/status").read()
        vm = int(status.split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
        try:
            store.prefetch(torch.arange(10))
        except Exception as exc:
            print(type(exc).__name__, exc)
        print("open", not store.closed, len(store.lookup(torch.arange(3))))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("RuntimeError prefetch: cannot start the prefetch worker"), lines
    assert "can't start new thread" in lines[0], lines
    assert lines[1] == "open True 3", lines


def test_a_prefetch_that_races_close_is_refused_as_the_store_closed(tmp_path):
    """close() can shut the fetch pool between a prefetch's open check and its submit: the
    prefetch is refused as a call to a closed store (a server answers 503 "closed"), not as a bad
    handle (a 500)."""
    path, _ = make_table(tmp_path, rows=100)
    with TieredStore(store_config(path)) as store:
        store._prefetcher.close(5.0)  # as close() does, just after the open check
        ids = torch.arange(3)
        with pytest.raises(StoreClosedError, match="prefetch: the store is closed"):
            store._prefetcher.submit(ids, ids, (3,))


def test_close_waits_for_the_prefetch_queued_last_by_any_thread(tmp_path):
    """Two threads prefetching at once could record the fetch queued last out of order (the
    earlier submit set it after the later one): close() then waited for the earlier fetch only,
    closed the files, and the later prefetch, queued before close(), failed as a call to a
    closed store instead of landing. The hooks only add waits to stage that order."""
    import threading

    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0}))
    fetcher = store._prefetcher
    submit, fetch = fetcher._pool.submit, fetcher._fetch
    first_queued, second_queued, closed = threading.Event(), threading.Event(), threading.Event()

    def staged_submit(*args):  # the first submit pauses after queueing until the second queued
        future = submit(*args)
        if threading.current_thread().name == "first":
            first_queued.set()
            second_queued.wait(1.0)  # (with the fix the second waits for this one to finish)
        else:
            second_queued.set()
        return future

    def staged_fetch(flat, packed):  # the second fetch starts only after close() returned
        if int(flat[0]) == 500:
            closed.wait(1.0)  # (with the fix close() waits for it: the wait times out)
        return fetch(flat, packed)

    fetcher._pool.submit, fetcher._fetch = staged_submit, staged_fetch
    handles = {}

    def prefetch(name: str, ids: list[int]) -> None:
        handles[name] = store.prefetch(ids)

    first = threading.Thread(target=prefetch, args=("first", [1, 2]), name="first")
    first.start()
    assert first_queued.wait(10)
    second = threading.Thread(target=prefetch, args=("second", [500, 501]), name="second")
    second.start()
    first.join(10)
    second.join(10)
    store.close()
    closed.set()
    assert torch.equal(handles["second"].future.result(10)[0], data[[500, 501]])


def test_close_waits_for_a_fetch_an_interrupted_prefetch_left_running(tmp_path):
    """close() waited for the fetch recorded last: a prefetch() interrupted (Ctrl-C) inside the
    pool's submit, once its fetch had started, never recorded it, so close() closed the files
    under that fetch, which then failed as a call to a closed store. The hooks only raise the
    interrupt and hold the fetch (close() waits for it now: the hold times out)."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0}))
    fetcher = store._prefetcher
    submit, fetch = fetcher._pool.submit, fetcher._fetch
    started, closed, landed = threading.Event(), threading.Event(), []

    def interrupted_submit(*args):  # Ctrl-C in prefetch() once the fetch it queued has started
        fetcher._pool.submit = submit
        submit(*args)
        assert started.wait(10)
        raise KeyboardInterrupt

    def held_fetch(flat, packed):
        if int(flat[0]) != 500:
            return fetch(flat, packed)
        started.set()
        closed.wait(1.0)
        try:
            landed.append((closed.is_set(), fetch(flat, packed)[0]))
        except BaseException as exc:
            landed.append((closed.is_set(), exc))
        return None

    store.lookup([1, 2], store.prefetch([1, 2]))  # one fetch recorded before
    fetcher._pool.submit, fetcher._fetch = interrupted_submit, held_fetch
    with pytest.raises(KeyboardInterrupt):
        store.prefetch([500, 501])
    store.close()
    closed.set()
    assert landed, "close() returned before the interrupted prefetch's fetch ended"
    assert not landed[0][0] and torch.equal(landed[0][1], data[[500, 501]])


def test_close_from_a_prefetchs_done_callback_does_not_wait_for_its_own_worker(tmp_path):
    """close() queues a no-op behind every fetch and waits for it; called on the prefetch worker
    itself (a done callback of a handle's future), that no-op could only run once close()
    returned: close() hung for good (``wait_s`` here: that hang ends, failing the test). It now
    returns, the store closed."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    store = TieredStore(store_config(path))
    closed = threading.Event()
    handle = store.prefetch([1, 2])
    handle.future.add_done_callback(lambda _: (store.close(wait_s=90), closed.set()))
    assert closed.wait(30), "close() from the prefetch worker waited for its own worker"
    assert store.closed
    with pytest.raises(StoreClosedError):
        store.prefetch([3])


def test_close_from_a_done_callback_while_another_thread_closes_does_not_deadlock(tmp_path):
    """A close() waits for the prefetch queue, so for the worker; a done callback there calling
    close() meanwhile waited for that close's lock: each waited for the other, for good
    (``wait_s`` here: that wait ends, failing the test). The worker's close now returns at once.
    The hook holds the fetch until the other close is under way."""
    path, _ = make_table(tmp_path, rows=100, dim=4)
    store = TieredStore(store_config(path))
    fetcher = store._prefetcher
    fetch, called_back = fetcher._fetch, threading.Event()

    def held_fetch(flat, packed):
        for _ in range(1000):  # until the other thread's close() holds its lock
            if store._closer is not None:
                break
            time.sleep(0.01)
        return fetch(flat, packed)

    fetcher._fetch = held_fetch
    handle = store.prefetch([1, 2])
    handle.future.add_done_callback(lambda _: (store.close(), called_back.set()))
    closing = threading.Thread(target=store.close, kwargs={"wait_s": 90}, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "close() and a close() from the prefetch worker deadlocked"
    assert called_back.wait(30) and store.closed


def test_a_store_closed_at_interpreter_exit_closes_cleanly(tmp_path):
    """A store closed by an atexit handler: the prefetch pool takes no more work then (its worker
    was joined, every fetch ended), and close() must not fail for it."""
    import subprocess
    import sys

    path, _ = make_table(tmp_path, rows=100, dim=4)
    script = f"""
import atexit
from tests.conftest import store_config
from tiered_store import TieredStore
store = TieredStore(store_config({str(path)!r}))
store.lookup([1], store.prefetch([1]))
atexit.register(lambda: (store.close(), print("closed")))
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "closed\n", "")


def test_the_host_ram_check_counts_a_hot_tier_on_the_cpu():
    """The open's RAM check counted the warm tier alone: a hot tier on the CPU (its slots in host
    RAM too) was left out, so two tiers that each fit but not together passed it."""
    from tiered_store.store import _check_host_memory

    gib = 1 << 30
    _check_host_memory(6, 6, gib, torch.device("meta"), available=10 * gib)  # hot off the host
    with pytest.raises(
        ConfigError,
        match=r"tiers.warm.capacity \+ tiers.hot.capacity \(hot on cpu\): needs 12.0 GiB of host "
        r"RAM but only 10.0 GiB is available; expected a smaller capacity",
    ):
        _check_host_memory(6, 6, gib, torch.device("cpu"), available=10 * gib)
    with pytest.raises(ConfigError, match=r"^tiers.warm.capacity: needs 11.0 GiB"):
        _check_host_memory(11, 0, gib, torch.device("cpu"), available=10 * gib)


def test_a_lookup_interrupted_while_waiting_for_its_handle_can_collect_it_again(
    tmp_path, monkeypatch
):
    """Ctrl-C while lookup(ids, handle) waited for the prefetch left the handle marked consumed:
    collecting it again said "already consumed; prefetch again", though no rows had come out.
    The read is made to wait here; the interrupt comes once the lookup waits for the handle."""
    store, data, handle, release = _prefetch_held_in_its_read(tmp_path, monkeypatch)

    with interrupted_once_waiting(handle.future, release):
        store.lookup([1, 2, 3], handle)
    assert torch.equal(store.lookup([1, 2, 3], handle), data[[1, 2, 3]])
    with pytest.raises(PrefetchHandleError, match="already consumed"):  # collected now
        store.lookup([1, 2, 3], handle)
    store.close()


def test_an_interrupt_inside_prefetch_leaves_its_depth_slot_free(tmp_path):
    """Ctrl-C landing inside prefetch() after it took one of prefetch.depth slots, before or
    just after the fetch was queued, kept that slot for good (and its ids in the lookahead's
    queued ids): with depth 2, two such interrupts made every later prefetch() block forever.
    The interrupt is raised here from around the real pool's submit, where a signal can land."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    with TieredStore(store_config(path, prefetch={"depth": 2})) as store:
        fetcher = store._prefetcher
        submit, queued = fetcher._pool.submit, []

        def before_queueing(*args):
            raise KeyboardInterrupt

        def after_queueing(*args):
            queued.append(submit(*args))
            raise KeyboardInterrupt

        for interrupted in (before_queueing, after_queueing):
            fetcher._pool.submit = interrupted
            with pytest.raises(KeyboardInterrupt):
                store.prefetch([1, 2, 3])
        fetcher._pool.submit = submit
        queued[0].result(30)  # queued before the interrupt: dropped, or run if it started
        assert fetcher.queued_ids() is None
        free = 0
        while fetcher._in_flight.acquire(blocking=False):  # (before the fix: none)
            free += 1
        for _ in range(free):
            fetcher._in_flight.release()
        assert free == 2
        ids = torch.tensor([4, 5])
        handles = [store.prefetch(ids) for _ in range(3)]  # a third waits for a free slot
        assert all(torch.equal(store.lookup(ids, h), data[ids]) for h in handles)


def _free_slots(fetcher) -> int:
    """How many of a prefetcher's depth slots are free now (taken and given back)."""
    free = 0
    while fetcher._in_flight.acquire(blocking=False):
        free += 1
    for _ in range(free):
        fetcher._in_flight.release()
    return free


def test_a_fetch_queued_by_an_interrupted_prefetch_keeps_its_slot_while_it_runs(
    tmp_path, monkeypatch
):
    """An interrupt in prefetch() just after its fetch was queued freed the fetch's depth slot at
    once, though the fetch still ran: one more prefetch than prefetch.depth could then be in
    flight. Now a fetch that has started keeps its slot to its end, and one not started yet is
    dropped with its slot (nobody can collect it). Reads are held here to see both."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(
        store_config(path, hot={"capacity": 0}, warm={"capacity": 0}, prefetch={"depth": 2})
    )
    fetcher, reads = store._prefetcher, []
    entered, release = threading.Event(), threading.Event()
    read_rows, submit, queued = store.cold.read_rows, fetcher._pool.submit, []

    def held_read(ids):
        reads.append(ids.copy())
        entered.set()
        assert release.wait(30)
        return read_rows(ids)

    def interrupted_after_queueing(*args):
        queued.append(submit(*args))
        raise KeyboardInterrupt

    def interrupted_once_started(*args):
        queued.append(submit(*args))
        assert entered.wait(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(store.cold, "read_rows", held_read)
    try:
        handle = store.prefetch([1, 2, 3])
        assert entered.wait(10)
        monkeypatch.setattr(fetcher._pool, "submit", interrupted_after_queueing)
        with pytest.raises(KeyboardInterrupt):
            store.prefetch([4, 5])  # queued behind the held fetch: not started
        assert _free_slots(fetcher) == 1
        release.set()
        assert torch.equal(store.lookup([1, 2, 3], handle), data[[1, 2, 3]])
        assert queued[0].result(30) is None  # dropped: its rows were never read
        assert [r.tolist() for r in reads] == [[1, 2, 3]]
        release.clear(), entered.clear()
        monkeypatch.setattr(fetcher._pool, "submit", interrupted_once_started)
        with pytest.raises(KeyboardInterrupt):
            store.prefetch([6, 7])
        assert _free_slots(fetcher) == 1  # (before: 2, while the fetch was running)
        release.set()
        assert torch.equal(queued[1].result(30)[0], data[[6, 7]])
        assert _free_slots(fetcher) == 2
    finally:
        release.set()
        monkeypatch.setattr(fetcher._pool, "submit", submit)  # close() queues its own no-op
        store.close()


def test_a_lookup_interrupted_while_fetching_written_rows_again_can_collect_its_handle(tmp_path):
    """A handle prefetched before a write is fetched again as lookup collects it (so the write is
    seen); that fetch ran after the handle was taken: Ctrl-C in it left the handle refused as
    "already consumed" though no rows had come out. The interrupt is raised by the first read."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0}))
    try:
        handle = store.prefetch([1, 2])
        handle.future.result(30)
        store.write([2], torch.full((1, 4), 7.0))
        read_rows = store.cold.read_rows

        def interrupted_read(ids):
            store.cold.read_rows = read_rows
            raise KeyboardInterrupt

        store.cold.read_rows = interrupted_read
        with pytest.raises(KeyboardInterrupt):
            store.lookup([1, 2], handle)
        want = data[[1, 2]].clone()
        want[1] = 7.0
        assert torch.equal(store.lookup([1, 2], handle), want)
        with pytest.raises(PrefetchHandleError, match="already consumed"):
            store.lookup([1, 2], handle)
        store.commit()
    finally:
        store.close()


def test_two_lookups_collecting_one_handle_at_once_give_its_rows_to_one(tmp_path):
    """Two threads collecting the same handle could both pass the "already consumed" check
    before either marked it, and both got its rows. The threads here run the collect in
    lockstep, line by line (a trace function meets a barrier at each line), so both make the
    check before either goes on: exactly one gets the rows, the other is refused."""
    import sys

    from tiered_store.prefetch import Prefetcher, PrefetchHandle

    path, data = make_table(tmp_path, rows=1_000, dim=4)
    collecting = {Prefetcher.collect.__code__, PrefetchHandle.take.__code__}
    barrier, results = threading.Barrier(2, timeout=30), {}

    def in_lockstep(frame, event, arg):
        if event == "line" and not barrier.broken:
            with contextlib.suppress(threading.BrokenBarrierError):  # the other one left
                barrier.wait()
        elif event == "return" and frame.f_code is Prefetcher.collect.__code__:
            barrier.abort()  # this one is done: the other goes on alone
        return in_lockstep

    def traced(frame, event, arg):
        return in_lockstep if frame.f_code in collecting else None

    with TieredStore(store_config(path)) as store:
        ids = torch.tensor([3, 1, 4, 1])
        handle = store.prefetch(ids)

        def collect(name: str) -> None:
            sys.settrace(traced)
            try:
                results[name] = store.lookup(ids, handle)
            except PrefetchHandleError as exc:
                results[name] = exc
            finally:
                sys.settrace(None)

        threads = [threading.Thread(target=collect, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    rows = [r for r in results.values() if isinstance(r, torch.Tensor)]
    refused = [r for r in results.values() if isinstance(r, PrefetchHandleError)]
    assert len(rows) == 1 and torch.equal(rows[0], data[ids])
    assert len(refused) == 1 and "already consumed" in str(refused[0])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_no_more_fetches_than_the_depth_are_ever_in_flight(tmp_path, depth):
    """Threads prefetch, look up and are interrupted (in prefetch() before or after its fetch is
    queued, in lookup() as it waits) in a seeded random mix. From its queueing to its end, each
    fetch that ran is in flight; at no point in the order of those events (a shared counter, no
    clock) are more than prefetch.depth in flight, every slot is free after, and every handle
    collected gives its own rows."""
    import itertools
    import random

    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(
        store_config(path, hot={"capacity": 0}, warm={"capacity": 0}, prefetch={"depth": depth})
    )
    fetcher, order, events, wrong = store._prefetcher, itertools.count(), [], []
    submit, fetch, wait = fetcher._pool.submit, fetcher._fetch, fetcher._wait
    numbers, mode = {}, threading.local()

    def submitting(run, number, flat, *args):
        if mode.interrupt == "before":
            raise KeyboardInterrupt
        numbers[id(flat)] = number
        events.append((next(order), "queued", number))
        future = submit(run, number, flat, *args)
        if mode.interrupt == "after":
            raise KeyboardInterrupt
        return future

    def fetching(flat, packed):
        number = numbers[id(flat)]
        try:
            return fetch(flat, packed)
        finally:
            events.append((next(order), "ended", number))

    def waiting(future, *args):
        if mode.interrupt == "lookup":
            raise KeyboardInterrupt
        return wait(future, *args)

    fetcher._pool.submit, fetcher._fetch, fetcher._wait = submitting, fetching, waiting

    def worker(seed: int) -> None:
        rng, held = random.Random(seed), []
        for _ in range(150):
            mode.interrupt = rng.choice([None, None, "before", "after", "lookup"])
            if held and (len(held) > 2 or rng.random() < 0.4):
                ids, handle = held[0]
                try:
                    rows = store.lookup(ids, handle)
                except KeyboardInterrupt:
                    continue  # given back: collected again later
                held.pop(0)
                if not torch.equal(rows, data[ids]):
                    wrong.append(ids)
                continue
            ids = torch.tensor(rng.sample(range(1_000), rng.randint(1, 8)))
            with contextlib.suppress(KeyboardInterrupt):
                held.append((ids, store.prefetch(ids)))
        mode.interrupt = None
        for ids, handle in held:
            if not torch.equal(store.lookup(ids, handle), data[ids]):
                wrong.append(ids)

    try:
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        submit(lambda: None).result(30)  # after every fetch queued (one worker: in order)
    finally:
        fetcher._pool.submit = submit
        store.close()
    ran = {number for _, kind, number in events if kind == "ended"}
    in_flight = most = 0
    for _, kind, number in sorted(events):
        if number in ran:
            in_flight += 1 if kind == "queued" else -1
            most = max(most, in_flight)
    assert most <= depth and in_flight == 0
    assert _free_slots(fetcher) == depth
    assert not wrong


def test_yaml_config_leaves_an_unknown_users_home_as_written(tmp_path, table):
    """A path written ``~nosuchuser/t.npy`` (a user this machine has not) failed with pathlib's
    bare RuntimeError 'Could not determine home directory'; as in a shell it is left as written,
    a path under the YAML file's folder, and the open names it."""
    config = tmp_path / "tiers.yaml"
    config.write_text("table: {path: ~no_such_user_cfg4/t.npy}\n")
    cfg = StoreConfig.from_yaml(config)
    assert cfg.table.path == str(tmp_path.resolve() / "~no_such_user_cfg4" / "t.npy")
    with pytest.raises(ConfigError, match=r"table.path: .*~no_such_user_cfg4/t.npy does not exist"):
        TieredStore.open(config)


def test_yaml_config_path_through_a_symlink_loop_is_named(tmp_path):
    """A YAML path through a symlink loop failed with pathlib's bare RuntimeError 'Symlink loop
    from ...' (Path.resolve, Python < 3.13) while the config was read, a serve config's too; it
    is read as written, for the open to find what is wrong with it."""
    from tiered_store.serve.config import ServeConfig

    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    config = tmp_path / "tiers.yaml"
    config.write_text("table: {path: a/t.npy}\n")
    assert StoreConfig.from_yaml(config).table.path == str(tmp_path.resolve() / "a" / "t.npy")
    serve = ServeConfig.from_dict({"checkpoint": {"path": "a/ckpt"}}, base_dir=tmp_path)
    assert serve.checkpoint_dir == tmp_path.resolve() / "a" / "ckpt"


def test_a_table_path_through_a_symlink_loop_is_named_at_open(tmp_path):
    """Opening a table whose path is a symlink loop failed with pathlib's bare RuntimeError
    'Symlink loop from ...' (the version pointer's path resolved with Path.resolve): the open
    names the table and what is wrong with it."""
    (tmp_path / "a.npy").symlink_to("b.npy")
    (tmp_path / "b.npy").symlink_to("a.npy")
    with pytest.raises(ConfigError, match=r"table.path: .*a\.npy"):
        TieredStore.open({"table": {"path": str(tmp_path / "a.npy")}})


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("9400", "metrics.address: got '9400'; expected 'host:port'"),
        ("127.0.0.1:\u00b2", "metrics.address: got '127.0.0.1:\u00b2'; expected 'host:port'"),
        ("h:99999", "metrics.address: port 99999 in 'h:99999'; expected a port in 0..65535"),
        (9400, "metrics.address: got 9400; expected 'host:port'"),
    ],
)
def test_yaml_config_refuses_a_bad_metrics_address(tmp_path, table, address, message):
    """A store YAML's metrics.address was checked only by ``serve``: the store and ``replay``
    took '9400' or a port past 65535 as set, and the same file then failed under ``serve``;
    it is refused wherever the file is read, naming the file and the key."""
    path, _ = table
    config = tmp_path / "tiers.yaml"
    config.write_text(f"table: {{path: {path}}}\nmetrics: {{address: {json.dumps(address)}}}\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        TieredStore.open(config)
    assert str(info.value).startswith(str(config))
    assert StoreConfig.from_dict({"table": {"path": "t.npy"}, "metrics": {"address": ""}})


def test_a_bad_metrics_address_is_shown_a_metrics_address_to_copy():
    """A bad metrics.address (in a store or serve YAML, or --metrics-address) was shown
    '127.0.0.1:8080' to write instead: the endpoint's own default port, which a copy of the
    example made the two listeners clash on; it is shown the metrics listener's default."""
    from tiered_store.serve.config import ServeConfig

    expected = "got '9400'; expected 'host:port' like '127.0.0.1:9400' or '' (off)"
    with pytest.raises(ConfigError, match=re.escape(f"metrics.address: {expected}")):
        StoreConfig.from_dict({"table": {"path": "t.npy"}, "metrics": {"address": "9400"}})
    with pytest.raises(ConfigError, match=re.escape(f"--metrics-address: {expected}")):
        ServeConfig.from_dict({}).with_overrides(metrics_address="9400")
    with pytest.raises(
        ConfigError,
        match=re.escape("--address: got '8080'; expected 'host:port' like '127.0.0.1:8080'"),
    ):
        ServeConfig.from_dict({}).with_overrides(address="8080")


def test_an_empty_path_in_a_config_is_refused_by_key():
    """A path written '' (``path: ""``, ``static_rows: ""``) was read as the config file's
    folder: a serve checkpoint.path '' put the tables beside the YAML, a row list '' failed at
    open reading a folder; it is refused by key, '.' naming the folder."""
    from tiered_store.serve.config import ServeConfig

    expected = "got ''; expected a path ('.' for the folder paths are relative to)"
    for data, key in (
        ({"table": {"path": ""}}, "table.path"),
        (
            {"table": {"path": "t.npy"}, "tiers": {"hot": {"static_rows": ""}}},
            "tiers.hot.static_rows",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: {expected}")):
            StoreConfig.from_dict(data, base_dir=Path("/srv"))
    for data, key in (
        ({"checkpoint": {"path": ""}}, "checkpoint.path"),
        ({"store": {"tiers": {"warm": {"profile": ""}}}}, "tiers.warm.profile"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: {expected}")):
            ServeConfig.from_dict(data, base_dir=Path("/srv"))
    assert ServeConfig.from_dict(
        {"checkpoint": {"path": "."}}, base_dir=Path("/srv")
    ).checkpoint_dir == Path("/srv")


def test_a_prefetch_cancelled_while_queued_frees_its_depth_slot_and_ids(tmp_path, monkeypatch):
    """A caller cancelling ``PrefetchHandle.future`` while its fetch was still queued: the
    worker skipped the cancelled fetch, so neither its depth slot nor its queued ids were ever
    given back; after prefetch.depth such cancels every prefetch() blocked for good. The first
    fetch's read is held so the second stays queued: cancelled, its slot and ids go at once."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(
        store_config(path, hot={"capacity": 0}, warm={"capacity": 0}, prefetch={"depth": 2})
    )
    fetcher, entered, release = store._prefetcher, threading.Event(), threading.Event()
    read_rows = store.cold.read_rows

    def held_read(ids):
        entered.set()
        assert release.wait(30)
        return read_rows(ids)

    monkeypatch.setattr(store.cold, "read_rows", held_read)
    try:
        first = store.prefetch([1, 2, 3])
        assert entered.wait(10)
        second = store.prefetch([4, 5])
        assert second.future.cancel()  # still queued behind the held fetch
        assert _free_slots(fetcher) == 1  # (before the fix: 0, for good)
        assert fetcher.queued_ids() is None  # (before: its ids, [4, 5])
        release.set()
        assert torch.equal(store.lookup([1, 2, 3], first), data[[1, 2, 3]])
        third, fourth = store.prefetch([6]), store.prefetch([7, 8])  # both slots free
        assert torch.equal(store.lookup([6], third), data[[6]])
        assert torch.equal(store.lookup([7, 8], fourth), data[[7, 8]])
        assert _free_slots(fetcher) == 2
    finally:
        release.set()
        store.close()


def test_a_prefetch_failed_by_its_workers_start_frees_its_depth_slot_and_ids(tmp_path, monkeypatch):
    """A prefetch worker whose start hook failed fails each fetch queued to it (b3cdb37) without
    running it, so neither the fetch's depth slot nor its queued ids were given back: after
    prefetch.depth such prefetches every prefetch() blocked for good. The hook's one intra-op
    thread setting fails here: each prefetch's lookup raises the pool's error, and their slots
    and ids are free."""
    import tiered_store.prefetch as prefetch_module

    def no_arena() -> None:
        raise OSError(12, "no memory for the thread's arena")

    path, data = make_table(tmp_path, rows=1_000, dim=4)
    monkeypatch.setattr(prefetch_module, "single_intra_op_thread", no_arena)
    store = TieredStore(store_config(path, prefetch={"depth": 2}))
    fetcher = store._prefetcher
    try:
        handles = [store.prefetch(torch.tensor([i, i + 1])) for i in range(2)]
        for handle in handles:
            with pytest.raises(RuntimeError, match="its thread's start failed"):
                handle.future.result(30)
        assert _free_slots(fetcher) == 2  # (before the fix: 0, for good)
        assert fetcher.queued_ids() is None  # (before: both prefetches' ids)
        for i, handle in enumerate(handles):
            with pytest.raises(RuntimeError, match="its thread's start failed"):
                store.lookup(torch.tensor([i, i + 1]), handle)
        third = store.prefetch(torch.tensor([5]))  # a free slot: refused by its fetch, not hung
        with pytest.raises(RuntimeError, match="its thread's start failed"):
            third.future.result(30)
        assert torch.equal(store.lookup(torch.tensor([5, 6])), data[[5, 6]])
    finally:
        store.close()


def test_a_lookup_with_a_cancelled_prefetch_handle_says_it_was_cancelled(tmp_path, monkeypatch):
    """A ``PrefetchHandle.future`` cancelled while queued (113f26b frees its slot) made its
    lookup raise a bare ``CancelledError``, no message, naming neither the handle nor what to
    do. The first fetch's read is held so the second stays queued: cancelled, its lookup
    raises ``PrefetchHandleError`` saying so, each time, and a lookup without it is served."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    store = TieredStore(store_config(path, hot={"capacity": 0}, warm={"capacity": 0}))
    entered, release = threading.Event(), threading.Event()
    read_rows = store.cold.read_rows

    def held_read(ids):
        entered.set()
        assert release.wait(30)
        return read_rows(ids)

    monkeypatch.setattr(store.cold, "read_rows", held_read)
    try:
        first = store.prefetch([1, 2, 3])
        assert entered.wait(10)
        second = store.prefetch([4, 5])
        assert second.future.cancel()  # still queued behind the held fetch
        release.set()
        for _ in range(2):
            with pytest.raises(PrefetchHandleError, match=r"this prefetch was cancelled .*"):
                store.lookup([4, 5], second)
        assert torch.equal(store.lookup([1, 2, 3], first), data[[1, 2, 3]])
        assert torch.equal(store.lookup([4, 5]), data[[4, 5]])
    finally:
        release.set()
        store.close()


def test_a_script_exiting_without_close_mid_fetch_exits_cleanly(tmp_path):
    """The prefetch worker is a daemon thread: a script that exited without ``close()`` while
    a fetch ran left it inside a torch op as the interpreter ended, and the process aborted now
    and then ('terminate called without an active exception', exit status 134). At the exit
    the fetch under way ends and those queued are cancelled, before the interpreter ends: a
    hook the script registers first (so it runs last) finds every fetch done, none running."""
    table = tmp_path / "t.npy"
    create_table(table, torch.randn(200_000, 64), progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    script = textwrap.dedent(
        f"""
        import atexit
        handles = []
        atexit.register(lambda: print(*("done" if h.done() else "left" for h in handles)))

        import torch
        from tiered_store.store import TieredStore

        store = TieredStore.open({{"table": {{"path": {str(table)!r}}}, "prefetch": {{"depth": 4}}}})
        for _ in range(4):
            handles.append(store.prefetch(torch.randint(0, 200_000, (50_000,))))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.split() == ["done"] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_prefetch_queued_at_exit_or_made_after_it_is_refused_naming_the_exit(tmp_path):
    """At the interpreter's exit the prefetches still queued were cancelled, so a lookup of one
    (an exit hook run after the store's) said its caller had cancelled it, and a prefetch made
    then was refused as if no thread could start ('expected room for one more thread'). Both
    name the exit."""
    table = tmp_path / "t.npy"
    create_table(table, torch.randn(1_000, 8), progress=False)
    script = textwrap.dedent(
        f"""
        import atexit
        state = {{}}

        def late():  # registered first: runs after the store's exit hook
            store, ids = state["store"], state["ids"]
            for call in (lambda: store.lookup(ids + 1, state["queued"]),
                         lambda: store.prefetch(ids)):
                try:
                    call()
                except Exception as exc:
                    print(type(exc).__name__, "|", exc)

        atexit.register(late)
        import time, threading, torch
        from tiered_store.store import TieredStore

        store = TieredStore.open({{"table": {{"path": {str(table)!r}}},
                                  "tiers": {{"hot": {{"capacity": 0}}, "warm": {{"capacity": 0}}}}}})
        entered, read_rows = threading.Event(), store.cold.read_rows
        pool = store._prefetcher._pool

        def held_read(ids):  # ends once the exit began (the queued one is still queued then)
            entered.set()
            while not pool.ended_at_exit:
                time.sleep(0.01)
            return read_rows(ids)

        store.cold.read_rows = held_read
        ids = torch.arange(0, 1_000, 7)
        state.update(store=store, ids=ids, running=store.prefetch(ids))
        assert entered.wait(30)
        state["queued"] = store.prefetch(ids + 1)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    queued, late = proc.stdout.splitlines()
    assert queued.startswith(
        "RuntimeError | tiered-store-prefetch pool: this call was still queued as the "
        "interpreter exited"
    ), queued
    assert late.startswith(
        "RuntimeError | prefetch: the interpreter is exiting and its exit hook ended the "
        "prefetch worker"
    ), late


def test_a_forked_child_prefetches_and_collects_on_a_copied_store(tmp_path):
    """A ``RunnerPool`` forked with its threads counted them in the child, where they are not
    there: no thread was started for the calls queued there, so a lookup collecting a prefetch
    of the copied store waited for good. In a child process that forks after a prefetch, the
    grandchild's prefetch is collected with the rows a lookup gives."""
    table = tmp_path / "t.npy"
    create_table(table, torch.randn(1_000, 8), progress=False)
    script = textwrap.dedent(
        f"""
        import os, torch
        from tiered_store.store import TieredStore

        store = TieredStore.open({{"table": {{"path": {str(table)!r}}}}})
        ids = torch.arange(0, 1_000, 7)
        want = store.lookup(ids, store.prefetch(ids))  # the worker started before the fork
        pid = os.fork()
        if pid == 0:
            handle = store.prefetch(ids)
            assert handle.future.exception(timeout=30) is None
            os._exit(0 if torch.equal(store.lookup(ids, handle), want) else 3)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"], proc.stderr


def test_a_store_whose_close_gave_up_on_a_hung_fetch_is_not_waited_for_at_exit(tmp_path):
    """The exit's wait for fetches under way (``prefetch.EXIT_WAIT_S``) took in the pools of
    stores already closed: a ``close(wait_s=...)`` that gave up on a fetch hung in a read (a
    server's stop within its ``stop_within_s``) was followed by up to that much more at the
    exit, waiting for the read it had given up on. A closed store's fetches are not waited for:
    here the exit's wait is made an hour, and the script exits past its hung read."""
    table = tmp_path / "t.npy"
    create_table(table, torch.randn(1_000, 8), progress=False)
    script = textwrap.dedent(
        f"""
        import threading
        from tiered_store import prefetch
        from tiered_store.store import TieredStore

        prefetch.EXIT_WAIT_S = 3600.0
        store = TieredStore.open({{"table": {{"path": {str(table)!r}}}}})
        entered = threading.Event()

        def hung_read(ids):
            entered.set()
            threading.Event().wait()  # a read that never returns (a dead disk)

        store.cold.read_rows = hung_read
        handle = store.prefetch([1, 2, 3])
        assert entered.wait(30)
        print(store.close(wait_s=0.5))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-c", script],  # (its close says so)
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "False\n", "")


def test_a_forked_child_fails_the_parents_fetches_at_the_fork_and_has_its_depth_free(tmp_path):
    """A child forked while a fetch ran on the parent's prefetch worker (and another was queued)
    kept their handles pending and their ``prefetch.depth`` slots held for good: a lookup of
    either waited for ever, and with ``depth`` such slots every prefetch of the child did. In
    the child both fail at once, naming the process they were made in, and the child's own
    prefetch is fetched and collected."""
    table = tmp_path / "t.npy"
    create_table(table, torch.randn(1_000, 8), progress=False)
    script = textwrap.dedent(
        f"""
        import os, threading, torch
        from tiered_store.store import TieredStore

        store = TieredStore.open({{"table": {{"path": {str(table)!r}}}, "prefetch": {{"depth": 2}},
                                  "tiers": {{"hot": {{"capacity": 0}}, "warm": {{"capacity": 0}}}}}})
        entered, release, read_rows = threading.Event(), threading.Event(), store.cold.read_rows

        def held_read(ids):
            entered.set()
            release.wait(60)
            return read_rows(ids)

        store.cold.read_rows = held_read
        ids = torch.arange(0, 1_000, 7)
        running = store.prefetch(ids)
        assert entered.wait(30)
        queued = store.prefetch(ids + 1)
        pid = os.fork()
        if pid == 0:
            store.cold.read_rows = read_rows
            for handle in (running, queued):
                try:
                    error = handle.future.exception(timeout=20)
                    print(type(error).__name__, str(error).startswith(
                        f"tiered-store-prefetch pool: this call was queued or under way in "
                        f"process {{os.getppid()}} as it forked this one ({{os.getpid()}})"))
                except TimeoutError:
                    print("pending")
            got = []
            fetched = threading.Thread(target=lambda: got.append(store.lookup(ids, store.prefetch(ids))))
            fetched.start()
            fetched.join(20)
            print(bool(got) and torch.equal(got[0], read_rows(ids)))
            os._exit(0)
        release.set()
        assert torch.equal(store.lookup(ids, running), read_rows(ids))
        assert torch.equal(store.lookup(ids + 1, queued), read_rows(ids + 1))
        os.waitpid(pid, 0)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["RuntimeError True", "RuntimeError True", "True"], proc

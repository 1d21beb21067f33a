"""Miss-ratio curves against brute-force simulations, SHARDS accuracy, sizing and the report."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml

import zipf_analysis.mrc as mrc
from tiered_store.config import StoreConfig
from tiered_store.errors import ConfigError, LimitError, RowIdError
from tiered_store.profile import profile_ids
from tiered_store.trace import TraceReader, TraceWriter
from zipf_analysis.analyze.store_yaml import store_yaml
from zipf_analysis.mrc import (
    MissRatioCurve,
    StackDistanceCounter,
    belady_misses,
    belady_mrc,
    lru_mrc,
    mean_absolute_error,
    offline_mrc,
    shards_mrc,
    static_topk_mrc,
)
from zipf_analysis.plots import miss_ratio_figure, plot_miss_ratio_curves
from zipf_analysis.replay import replay
from zipf_analysis.report import recommend_tier_sizes, write_report
from zipf_analysis.zipf_fit import sample_zipf

SHARDS_MAE_BOUND = 0.01  # mean |error| over 1000 evenly spaced capacities (as in the SHARDS paper)


def brute_lru_misses(ids, capacity):
    """Misses of an LRU cache of ``capacity`` rows, by simulation."""
    if capacity == 0:
        return len(ids)
    cache, misses = OrderedDict(), 0
    for x in ids:
        if x in cache:
            cache.move_to_end(x)
        else:
            misses += 1
            cache[x] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return misses


def brute_belady_misses(ids, capacity, bypass):
    """Misses of Belady's MIN by scanning the future at every eviction."""
    ids = list(ids)
    cache, misses = set(), 0

    def next_use(x, t):
        return next((j for j in range(t + 1, len(ids)) if ids[j] == x), len(ids) + 1)

    for t, x in enumerate(ids):
        if x in cache:
            continue
        misses += 1
        if capacity == 0:
            continue
        if len(cache) < capacity:
            cache.add(x)
            continue
        candidates = list(cache) + ([x] if bypass else [])
        victim = max(candidates, key=lambda y: next_use(y, t))
        if victim != x:
            cache.remove(victim)
            cache.add(x)
    return misses


def random_traces(count, seed=0):
    """Small random traces: uniform, skewed, and with huge (hash-mapped) ids."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n, k = int(rng.integers(1, 400)), int(rng.integers(1, 60))
        ids = rng.integers(0, k, n) if i % 2 else (rng.zipf(1.4, n) % k)
        if i % 5 == 0:
            ids = ids * (1 << 45) + 7  # beyond the dense-index limit
        yield ids.astype(np.int64)


def test_exact_lru_equals_brute_force_at_every_capacity(monkeypatch):
    monkeypatch.setattr(mrc, "MIN_TIME_CAPACITY", 8)  # compaction every few accesses
    for ids in random_traces(40):
        distinct = np.unique(ids).size
        expected = [brute_lru_misses(ids, c) for c in range(distinct + 1)]
        curve = lru_mrc(ids)
        assert curve.capacities.tolist() == list(range(distinct + 1))
        assert curve.misses.tolist() == expected
        assert curve.lookups == ids.size
        # streamed in uneven chunks through a counter: same answer
        counter = StackDistanceCounter()
        for part in np.array_split(ids, 3):
            counter.update(part)
        assert counter.curve().misses.tolist() == expected


def test_exact_lru_switches_to_hash_map_mid_stream():
    ids = np.array([1, 2, 1, 3] + [1 << 50, 2, 1 << 50, 1, 3], dtype=np.int64)
    counter = StackDistanceCounter()
    counter.update(ids[:4])
    counter.update(ids[4:])
    distinct = 4
    assert counter.curve().misses.tolist() == [
        brute_lru_misses(ids, c) for c in range(distinct + 1)
    ]


def test_exact_lru_access_times_stop_at_their_int32_limit(monkeypatch):
    # the time axis keeps access times as int32: past 2**31 of them they wrapped (wrong distances,
    # reads out of bounds); here the same limit, small, where the code takes it from
    assert np.iinfo(np.int32).max > mrc.MAX_TIME_CAPACITY  # time + 1 is stored
    monkeypatch.setattr(mrc, "MIN_TIME_CAPACITY", 64)
    monkeypatch.setattr(mrc, "MAX_TIME_CAPACITY", 256)
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.tile(np.arange(128), 12))  # 128 distinct: the axis stops at 256
    curve = lru_mrc(ids)
    assert curve.misses.tolist() == [brute_lru_misses(ids, c) for c in range(129)]
    more = np.concatenate([ids, [128], ids[:300]])  # 129 distinct: more than half the limit
    with pytest.raises(
        LimitError,
        match="stack distances over 129 distinct rows; expected at most 128: the time axis "
        "keeps access times as int32, up to 256 of them",
    ):
        lru_mrc(more)
    with pytest.raises(LimitError, match="over 129 distinct rows; expected at most 128"):
        shards_mrc(more, rate=1.0)


def test_exact_lru_row_indices_stop_at_their_int32_limit(monkeypatch):
    monkeypatch.setattr(mrc, "MAX_ROW_INDEX", 999)  # as 2**31 - 1, small
    counter = StackDistanceCounter()
    counter.update(np.array([5, 999, 5]))
    with pytest.raises(LimitError, match="1,001 row indices .*; expected at most 1,000: the time"):
        counter.update(np.array([1000]))


def test_shards_fixed_size_is_refused_past_its_int32_time_axis(monkeypatch):
    # 4 x (fixed_size + 1) int32 access times: from fixed_size 2**29 - 1 on they wrapped
    with pytest.raises(
        ValueError,
        match="fixed_size: got 536,870,912; expected a positive number of rows up to 536,870,895",
    ):
        shards_mrc(np.arange(10), fixed_size=1 << 29)
    with pytest.raises(ValueError, match="fixed_size: got 0; expected a positive"):
        shards_mrc(np.arange(10), fixed_size=0)
    for bad in (2.5, True, "64"):  # int() took 2.5 as 2, True as 1 and "64" as 64
        with pytest.raises(ValueError, match=rf"fixed_size: got {bad!r}; expected an integer"):
            shards_mrc(np.arange(10), fixed_size=bad)
    monkeypatch.setattr(mrc, "MAX_TIME_CAPACITY", 256)  # the same limit, small: 63 rows
    ids = np.random.default_rng(4).integers(0, 50, 3000)
    exact = lru_mrc(ids)
    assert mean_absolute_error(shards_mrc(ids, fixed_size=63), exact) < 1e-9  # every row tracked
    with pytest.raises(ValueError, match="fixed_size: got 64; expected .* up to 63"):
        shards_mrc(ids, fixed_size=64)


@pytest.mark.parametrize("bypass", [True, False])
def test_belady_equals_brute_force(bypass):
    for ids in random_traces(25, seed=1):
        caps = list(range(np.unique(ids).size + 2))
        expected = [brute_belady_misses(ids, c, bypass) for c in caps]
        assert belady_misses(ids, caps, bypass=bypass, workers=1).tolist() == expected
    assert belady_misses(ids, caps, bypass=bypass, workers=2).tolist() == expected


def test_offline_curves_come_from_the_registry():
    from policies.errors import PolicyError
    from policies.registry import is_offline, offline_bound, offline_names
    from tiered_store.cache_plan import parse_policy

    assert offline_names() == ["static-topk", "belady"] and is_offline(" Belady ")
    assert not is_offline("lru") and not is_offline("static")
    with pytest.raises(PolicyError, match="'lru' is not an offline bound; expected one of"):
        offline_bound("lru")
    with pytest.raises(ConfigError, match="tiers.hot.policy: 'belady' is an offline bound"):
        parse_policy("belady", key="tiers.hot.policy")
    for ids in random_traces(10, seed=2):
        caps = list(range(np.unique(ids).size + 2))
        bel = offline_mrc("belady", ids, caps, table_rows=99)
        assert bel.name == "belady" and bel.table_rows == 99
        assert bel.misses.tolist() == belady_mrc(ids, caps).misses.tolist()
        assert bel.misses[1:].tolist() == belady_misses(ids, caps[1:]).tolist()
        static = offline_mrc("static-topk", ids, caps)
        reference = static_topk_mrc(
            np.bincount(np.unique(ids, return_inverse=True)[1]), capacities=caps
        )
        assert static.name == "static-topk"
        assert static.misses.tolist() == reference.misses.tolist()
        np.testing.assert_array_equal(static.miss_ratio, reference.miss_ratio)
    with pytest.raises(ValueError, match="belady: capacities must be >= 0; got -1"):
        belady_misses(np.array([1, 2]), [-1])


def test_orderings_between_curves():
    ids = sample_zipf(20_000, 2_000, 0.9, seed=4)
    lru = lru_mrc(ids)
    caps = lru.capacities[1::97]
    bel = belady_misses(ids, caps)
    demand = belady_misses(ids, caps, bypass=False)
    assert (bel <= demand).all() and (demand <= lru.misses[caps]).all()
    # a preloaded static cache has no compulsory misses; a demand-filled one pays one per row
    counts = np.bincount(ids)
    pre, demand_static = static_topk_mrc(counts), static_topk_mrc(counts, preloaded=False)
    assert (demand_static.misses - pre.misses == np.arange(pre.misses.size)).all()
    assert pre.misses[-1] == 0 and demand_static.misses[-1] == lru.misses[-1]
    assert (demand_static.misses[caps] >= bel).all()


def test_static_topk_refuses_what_cannot_be_counts_per_row():
    """It takes counts per row: row ids given in their place (a trace's [batch, seq, heads] ids, a
    flat run of ids with the table's rows) gave a curve of nonsense in silence, and a negative
    count was dropped as no lookups."""
    ids = np.array([[3, 1], [3, 2]])
    with pytest.raises(ValueError, match=r"counts of shape \(2, 2\); expected one count per row"):
        static_topk_mrc(ids)
    with pytest.raises(ValueError, match=r"counts for 4 rows; expected table_rows=10, one per row"):
        static_topk_mrc(ids.reshape(-1), table_rows=10)
    with pytest.raises(ValueError, match=r"counts\[1\] = -2; expected lookups per row >= 0"):
        static_topk_mrc(np.array([3, -2, 1]))
    with pytest.raises(ValueError, match=r"counts of dtype float64; expected integers"):
        static_topk_mrc(np.array([2.5, 1.0]))
    assert static_topk_mrc(np.bincount(ids.reshape(-1), minlength=10), table_rows=10).lookups == 4
    assert static_topk_mrc([2, 0, 1]).misses.tolist() == [3, 1, 0]


def test_shards_without_sampling_is_exact():
    ids = sample_zipf(20_000, 1_000, 0.9, seed=3)
    exact = lru_mrc(ids)
    full_rate = shards_mrc(ids, rate=1.0)
    np.testing.assert_allclose(full_rate.at(exact.capacities), exact.miss_ratio, atol=1e-12)
    big_sample = shards_mrc(ids, fixed_size=5_000)  # more than the distinct rows: no eviction
    assert big_sample.metadata["final_rate"] > 0.999
    # its points are the distances that occurred (linear in between): exact at each of them
    np.testing.assert_allclose(big_sample.miss_ratio, exact.at(big_sample.capacities), atol=1e-9)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
@pytest.mark.parametrize("fixed_size", [None, 4])
def test_shards_refuses_a_seed_that_is_not_a_64_bit_hash_seed(seed, fixed_size):
    # it raised numpy's OverflowError 'Python integer -1 out of bounds for uint64', naming nothing
    with pytest.raises(ValueError, match=r"seed: got .*; expected an integer in \[0, 2\*\*64\)"):
        shards_mrc(np.array([1, 2, 1]), seed=seed, fixed_size=fixed_size)
    top = shards_mrc(np.array([1, 2, 1]), rate=1.0, seed=2**64 - 1, fixed_size=fixed_size)
    assert top.metadata["seed"] == 2**64 - 1


def test_shards_mae_on_zipf_trace():
    ids = sample_zipf(2_000_000, 200_000, 0.8, seed=5)
    exact = lru_mrc(ids)
    fixed_rate = shards_mrc(ids, rate=0.05)
    assert fixed_rate.metadata["rate"] == pytest.approx(0.05, rel=1e-4)
    assert mean_absolute_error(fixed_rate, exact) <= SHARDS_MAE_BOUND
    fixed_size = shards_mrc(ids, fixed_size=8192)
    assert fixed_size.metadata["final_rate"] < 0.1
    assert mean_absolute_error(fixed_size, exact) <= SHARDS_MAE_BOUND
    assert fixed_rate.misses is None and fixed_rate.miss_ratio[0] == 1.0


def test_sources_arrays_chunks_and_traces(tmp_path):
    ids = sample_zipf(30_000, 3_000, 0.8, seed=6)
    with TraceWriter(tmp_path / "t.trace", chunk_ids=4_000) as w:
        for part in np.array_split(ids, 10):
            w.write(part, "l2")
            w.end_batch()
    reference = lru_mrc(ids).misses
    with TraceReader(tmp_path / "t.trace") as r:
        assert (lru_mrc(r).misses == reference).all()
        assert (lru_mrc(r.ids("l2")).misses == reference).all()
        assert (belady_mrc(r, [10, 100]).misses == belady_misses(ids, [0, 10, 100])).all()
    assert (lru_mrc(np.array_split(ids, 4)).misses == reference).all()


@pytest.mark.parametrize(
    "curve",
    [
        lru_mrc,
        shards_mrc,
        lambda ids: belady_mrc(ids, [1]),
        lambda ids: offline_mrc("belady", ids, [1]),
    ],
)
def test_a_uint64_row_id_past_int64_is_named_as_given(curve):
    # it was cast to int64 first and refused as the "negative row id -1", which no one gave
    ids = np.array([3, 2**64 - 1, 3], dtype=np.uint64)
    with pytest.raises(RowIdError, match=rf"^row id {2**64 - 1}; expected ids below 2\*\*63"):
        curve(ids)
    with pytest.raises(RowIdError, match=r"^negative row id -2; expected ids >= 0"):
        curve(np.array([3, -2]))
    assert curve(ids[[0, 2]]).lookups == 2


@pytest.mark.parametrize(
    "make", [torch.from_numpy, lambda ids: ids.tolist(), lambda ids: tuple(ids.tolist())]
)
def test_a_tensor_or_a_list_of_ids_is_read_as_one_array(make):
    """A 1-D tensor or a list of ids was taken as an iterable of chunks, one id each: the
    kernels ran once per id through Python (20 us an id), and a 0-d tensor was a TypeError."""
    ids = sample_zipf(5_000, 300, 0.9, seed=1)
    chunks = list(mrc._iter_chunks(make(ids)))
    assert len(chunks) == 1 and (chunks[0] == ids).all()
    assert (lru_mrc(make(ids)).misses == lru_mrc(ids).misses).all()
    assert lru_mrc(torch.tensor(7)).lookups == 1
    parts = [ids[:100], ids[100:]]  # an iterable of arrays is still read chunk by chunk
    assert [c.size for c in mrc._iter_chunks(parts)] == [100, ids.size - 100]


def test_curve_api_and_json(tmp_path):
    curve = lru_mrc(np.array([1, 2, 3, 1, 2, 3, 4, 1]), table_rows=10)
    assert curve.misses.tolist() == [8, 8, 8, 5, 4]
    assert curve.at(3) == pytest.approx(5 / 8) and curve.at(100) == pytest.approx(0.5)
    assert curve.capacity_for(0.375) == 3 and curve.capacity_for(0.9) is None
    sub = curve.resample([1, 3])
    assert sub.capacities.tolist() == [0, 1, 3] and sub.misses.tolist() == [8, 8, 5]
    assert lru_mrc(np.array([1, 2, 3, 1, 2, 3, 4, 1]), capacities=[3, 9]).misses.tolist() == [
        8,
        5,
        4,
    ]
    curve.save(tmp_path / "c.json")
    back = MissRatioCurve.load(tmp_path / "c.json")
    assert back.name == "lru" and back.table_rows == 10 and back.misses.tolist() == [8, 8, 8, 5, 4]
    json.dumps(shards_mrc(np.arange(100) % 7, rate=0.5).to_dict())  # metadata is plain JSON
    big = lru_mrc(sample_zipf(50_000, 20_000, 0.7, seed=1))
    thin = big.to_dict(max_points=200)
    assert len(thin["capacities"]) <= 202 and thin["capacities"][-1] == big.max_capacity
    with pytest.raises(ValueError, match="ascending"):
        MissRatioCurve("x", np.array([0, 2, 1]), np.array([1.0, 0.5, 0.4]), 10)


def test_a_thinned_curve_keeps_its_ends_within_max_points():
    # -1 raised numpy's 'Number of samples, -1, must be non-negative', 2.5 a numpy TypeError,
    # 0 and 1 gave the two ends and 2 gave three points
    curve = lru_mrc(np.arange(5000) % 3000)
    for bad in (-1, 0, 1, 2.5, True):
        with pytest.raises(ValueError, match=rf"max_points: got {bad!r}; expected an integer >= 2"):
            curve.to_dict(max_points=bad)
    for most in (2, 3, 4, 5, 10, 200, np.int64(7)):
        caps = curve.to_dict(max_points=most)["capacities"]
        assert 2 <= len(caps) <= most and caps[0] == 0 and caps[-1] == 3000
    assert len(curve.to_dict(max_points=None)["capacities"]) == 3001


@pytest.mark.parametrize("bad", [2.5, -0.5, np.nan, np.inf, 1e30, True])
def test_a_capacity_that_is_not_a_whole_number_of_rows_is_refused_not_truncated(bad):
    # a cast to int64 truncated: capacities [0, 2.5] gave the curve at [0, 2], and -0.5 at 0
    ids = np.array([1, 2, 1, 3, 1, 2])
    calls = [
        lambda caps: lru_mrc(ids, capacities=caps),
        lambda caps: shards_mrc(ids, rate=1.0, capacities=caps),
        lambda caps: lru_mrc(ids).resample(caps),
        lambda caps: belady_mrc(ids, caps),
        lambda caps: belady_misses(ids, caps),
        lambda caps: static_topk_mrc(np.array([5, 1, 3]), capacities=caps),
    ]
    given = np.array([False, True]) if bad is True else np.array([0, bad])  # [0, True] is ints
    for call in calls:
        with pytest.raises(
            ValueError, match=r"^capacities: got .*; expected whole numbers of rows"
        ):
            call(given)
    with pytest.raises(ValueError, match=r"curve 'x': capacities: got .*; expected whole numbers"):
        MissRatioCurve("x", given, np.array([1.0, 0.5]), 2)
    whole = lru_mrc(ids, capacities=np.array([1.0, 3.0]))  # floats of whole rows are taken
    assert whole.capacities.tolist() == [0, 1, 3] and whole.misses.tolist() == [6, 6, 3]


def test_a_negative_capacity_is_refused_by_every_curve_not_only_the_exact_ones():
    ids = np.array([1, 2, 1, 3, 1, 2])
    with pytest.raises(ValueError, match="capacities must be >= 0; got -3"):
        lru_mrc(ids, capacities=[-3, 2])
    # resampled curves (SHARDS, any curve's resample) took it as a point below capacity 0
    with pytest.raises(ValueError, match="'shards': capacities must be >= 0; got -3"):
        shards_mrc(ids, rate=1.0, capacities=[-3, 2])
    with pytest.raises(ValueError, match="'lru': capacities must be >= 0; got -1"):
        lru_mrc(ids).resample([-1])


def test_the_error_of_a_curve_resolving_nothing_the_reference_covers_is_nan_without_a_warning():
    # a miniature simulation resolves no capacity below its min_capacity: against a reference
    # that ends below it no capacity is left, and numpy warned 'Mean of empty slice' from mrc.py
    reference = lru_mrc(np.arange(10) % 5)  # up to 5 rows
    mini = MissRatioCurve(
        "belady",
        np.array([0, 100, 200]),
        np.array([1.0, 0.5, 0.2]),
        10,
        metadata={"min_capacity": 100},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(mean_absolute_error(mini, reference))
        assert mean_absolute_error(reference, mini) == pytest.approx(0.15)  # 1..200 resolved


@pytest.mark.parametrize("points", [0, -5, 2.5])
def test_the_error_between_curves_refuses_a_grid_of_no_capacities(points):
    # points=0 raised ZeroDivisionError, -5 numpy's 'Number of samples, -5, must be non-negative'
    a = lru_mrc(np.arange(10) % 5)
    with pytest.raises(ValueError, match=r"points: got .*; expected a positive number of capac"):
        mean_absolute_error(a, a, points=points)
    assert mean_absolute_error(a, a, points=1) == 0.0


@pytest.mark.parametrize("points", [0, -5, 2.5, True])
def test_belady_curve_refuses_a_number_of_points_that_is_not_a_positive_integer(points):
    # points=-5 raised numpy's 'Number of samples, -5, must be non-negative', 2.5 a bare
    # TypeError, and 0 drew a curve of capacity 0 alone, True one of capacities 0 and 1
    ids = np.array([1, 2, 3, 1, 2, 3])
    with pytest.raises(ValueError, match=r"^points: got .*; expected a positive number of capac"):
        belady_mrc(ids, points=points)
    assert belady_mrc(ids, points=np.int64(2)).capacities.tolist() == [0, 1, 3]


def test_recommend_tier_sizes():
    ids = sample_zipf(100_000, 20_000, 0.9, seed=7)
    lru = lru_mrc(ids, table_rows=20_000)
    bel = belady_mrc(ids)
    rec = recommend_tier_sizes([bel, lru], {"hot": 0.4, "warm": 0.7})
    assert rec["curve"] == "lru" and rec["inclusive"]
    hot, warm = rec["tiers"]["hot"], rec["tiers"]["warm"]
    assert hot["capacity"] == lru.capacity_for(0.4) and warm["capacity"] == lru.capacity_for(0.7)
    assert lru.hit_ratio[hot["capacity"]] >= 0.4 > lru.hit_ratio[hot["capacity"] - 1]
    assert hot["percent_of_table"] == pytest.approx(100 * hot["capacity"] / 20_000, abs=1e-3)
    assert rec["by_curve"]["belady"]["hot"] < hot["capacity"]
    parsed = yaml.safe_load(rec["yaml"])
    assert parsed == {
        "tiers": {"hot": {"capacity": hot["capacity"]}, "warm": {"capacity": warm["capacity"]}}
    }
    exclusive = recommend_tier_sizes(lru, {"hot": 0.4, "warm": 0.7}, inclusive=False)
    assert exclusive["tiers"]["warm"]["capacity"] == warm["capacity"] - hot["capacity"]
    unreachable = recommend_tier_sizes(lru, {"hot": 0.5, "warm": 0.9999})
    assert not unreachable["tiers"]["warm"]["reachable"]
    assert unreachable["tiers"]["warm"]["capacity"] == lru.max_capacity
    assert "unreachable" in unreachable["yaml"]
    yaml.safe_load(unreachable["yaml"])
    with pytest.raises(ConfigError, match=r"targets\.warm"):
        recommend_tier_sizes(lru, {"hot": 0.5, "warm": 0.4})
    with pytest.raises(ConfigError, match=r"targets\.hot"):
        recommend_tier_sizes(lru, {"hot": 1.5})
    with pytest.raises(ConfigError, match="curve"):
        recommend_tier_sizes(lru, {"hot": 0.5}, curve="arc")
    # a flag is not a hit rate (True was a target of 1.0); a NumPy float32 is one
    with pytest.raises(ConfigError, match=r"^targets\.hot: got True; expected a hit rate"):
        recommend_tier_sizes(lru, {"hot": True})
    assert (
        recommend_tier_sizes(lru, {"hot": np.float32(0.5)})["tiers"]["hot"]["capacity"]
        == (recommend_tier_sizes(lru, {"hot": 0.5})["tiers"]["hot"]["capacity"])
    )


def test_recommended_yaml_is_accepted_by_store_config():
    config = pytest.importorskip("tiered_store.config")
    lru = lru_mrc(sample_zipf(20_000, 5_000, 0.9, seed=8))
    snippet = yaml.safe_load(recommend_tier_sizes(lru, {"hot": 0.3, "warm": 0.6})["yaml"])
    cfg = config.StoreConfig.from_dict({"table": {"path": "t.npy"}, **snippet})
    assert cfg.tiers.hot.capacity == snippet["tiers"]["hot"]["capacity"]


def test_target_sizes_call_their_hit_rate_the_one_cache_curves_estimate(tmp_path):
    # the store's warm tier is an LRU over hot's misses, not inclusive as the sizing said: at the
    # sizes for hot 0.3 / warm 0.6 the store's caches reach less than the curve's figure, which
    # the store config's comment said the tiers "reach"
    rows, targets = 200, {"hot": 0.3, "warm": 0.6}
    ids = (np.random.default_rng(0).zipf(1.1, 5000) - 1) % rows
    with TraceWriter(tmp_path / "t.trace", {"tables": [{"name": "a", "rows": rows}]}) as writer:
        writer.write(ids, "a")
    curve = lru_mrc(ids, table_rows=rows)
    rec = recommend_tier_sizes(curve, targets)
    tiers = {t: {"capacity": v["capacity"]} for t, v in rec["tiers"].items()}
    config = StoreConfig.from_dict({"table": {"path": "absent.npy", "dim": 16}, "tiers": tiers})
    r = replay(config, tmp_path / "t.trace", batch_tokens=1)
    reached = (r.tiers["hot"]["hits"] + r.tiers["warm"]["hits"]) / r.lookups
    assert reached < targets["warm"] <= rec["tiers"]["warm"]["hit_rate"]  # 0.5998 < 0.6 <= 0.6038
    text = store_yaml("a", {"rows": rows, "dim": 16}, rec, "a.top_rows.npy", "t.trace")
    assert "reaches" not in text and "inclusive" not in text
    assert "#   warm: target 0.6, the curve gives 0.6038 at 90 rows" in text and "estimate" in text
    md = write_report(tmp_path / "r", curves=[curve], targets=targets, plots=False)["markdown"]
    assert "inclusive" not in md.read_text() and "an estimate" in md.read_text()


def test_report_and_plots(tmp_path):
    ids = sample_zipf(100_000, 10_000, 0.8, seed=9)
    prof = profile_ids(ids, rows=10_000, name="layer2")
    curves = [
        lru_mrc(ids, table_rows=10_000),
        shards_mrc(ids, rate=0.1),
        static_topk_mrc(prof),
        belady_mrc(ids, points=8),
    ]
    png = plot_miss_ratio_curves(curves, tmp_path / "mrc.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    paths = write_report(tmp_path / "rep", prof, curves, targets={"hot": 0.3, "warm": 0.7})
    for key in ("markdown", "json", "rank_frequency", "miss_ratio"):
        assert paths[key].stat().st_size > 500, key
    data = json.loads(paths["json"].read_text())
    assert data["profile"]["zipf"]["mle"]["rank_max"] > 1
    assert {c["name"] for c in data["curves"]} == {"lru", "shards", "static-topk", "belady"}
    assert data["mae_vs_exact_lru"]["shards"] < 0.05
    text = paths["markdown"].read_text()
    assert "```yaml\ntiers:" in text and "of touched rows" in text and "rank range" in text


@pytest.mark.parametrize(("top", "rows"), [(1_000, 10_000), (100_000, 10_000_000)])
def test_percent_axis_labels_do_not_overlap(top, rows):
    # analyze draws capacities from 1 row to the distinct rows of a table of millions: the top
    # axis spans 5+ decades, and its 2x/5x minor labels used to print over each other
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    caps = np.concatenate([[0], np.unique(np.geomspace(1, top, 200).astype(np.int64))])
    curve = MissRatioCurve("lru", caps, np.linspace(1.0, 0.3, caps.size), 1000, table_rows=rows)
    fig = miss_ratio_figure([curve])
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (axis,) = fig.axes[0].child_axes  # the % of the table axis
    ticks = axis.xaxis.get_majorticklabels() + axis.xaxis.get_minorticklabels()
    box = fig.axes[0].get_window_extent(renderer)
    shown = sorted(
        (t.get_window_extent(renderer) for t in ticks if t.get_visible() and t.get_text()),
        key=lambda e: e.x0,
    )
    shown = [e for e in shown if e.x1 >= box.x0 and e.x0 <= box.x1]
    assert len(shown) >= 3
    assert all(a.x1 <= b.x0 for a, b in zip(shown[:-1], shown[1:], strict=True)), (
        "tick labels overlap"
    )
    if top == 1_000:  # a narrow axis keeps its 2x and 5x labels
        assert {"0.02%", "0.5%"} <= {t.get_text() for t in ticks}

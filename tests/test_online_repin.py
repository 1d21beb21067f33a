"""zipf-tuned learning while serving: online counts, budgeted re-pins, replay = store, restart."""

from __future__ import annotations

import itertools
import math
import threading
import warnings

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    assert_concurrent_lookups_exact,
    assert_lookups_go_on_during,
    make_table,
    resealed_restart,
)
from tiered_store import ConfigError, StoreConfig, TieredStore
from tiered_store.config import RepinConfig
from tiered_store.metrics import build_registry
from tiered_store.online_repin import OnlineRepin
from tiered_store.profile import FrequencyProfile, profile_ids
from tiered_store.trace import TraceWriter
from tiered_store.warm_restart import RestartWarning, restart_path
from zipf_analysis.replay import replay

ROWS = 5000
EVERY, BUDGET, WINDOW = 1000, 20, 200


def hot_set(seed: int = 3, size: int = 50) -> np.ndarray:
    """Rows looked up in every batch (scattered ids, not the lowest)."""
    return np.random.default_rng(seed).choice(ROWS, size, replace=False)


def batches(hot: np.ndarray, n: int = 120, seed: int = 0) -> list[np.ndarray]:
    """Batches of 100 ids: 20 from ``hot``, 80 uniform over the table (mostly seen once)."""
    rng = np.random.default_rng(seed)
    return [
        rng.permutation(np.concatenate([rng.choice(hot, 20), rng.integers(0, ROWS, 80)]))
        for _ in range(n)
    ]


def config(path, *, warm=400, hot=0, restart=False, repin=None, profile=None) -> StoreConfig:
    """zipf-tuned tiers (no profile unless given) that re-pin every EVERY lookups."""
    tier = {
        "policy": "zipf-tuned",
        "recency_window": WINDOW,
        "repin": repin or {"every": EVERY, "budget": BUDGET},
    }
    if profile is not None:
        tier["profile"] = str(profile)
    return StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {
                "hot": {**(tier if hot else {}), "capacity": hot},  # off: nothing to set
                "warm": {**tier, "capacity": warm},
                "restart": {"enabled": restart},
            },
        }
    )


def scrape_tiers(store) -> dict[tuple[str, str], float]:
    """What Prometheus would read from ``store`` now: each per-tier sample by (name, tier)."""
    text = generate_latest(build_registry({"layer1": store}, process=False)).decode()
    return {
        (s.name, s.labels["tier"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "tier" in s.labels
    }


def serve(store, data, work, on_repin=None) -> None:
    """Look each batch up (checked against the table), re-pinning at the batch boundaries replay
    uses; ``on_repin(store)`` after each re-pin of the warm tier."""
    repins = store.warm.online.repins
    for ids in work:
        t = torch.from_numpy(ids)
        assert torch.equal(store.lookup(t), data[t])
        assert store.wait_repinned(timeout=30)
        if on_repin is not None and store.warm.online.repins != repins:
            repins = store.warm.online.repins
            on_repin(store)


def test_zipf_tuned_without_a_profile_serves_and_pins_the_heavy_rows(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    hot = hot_set()
    history = []
    with TieredStore(config(path)) as store:
        assert store.warm.pinned_count == 0 and store.warm.occupancy == 0  # starts as LRU
        serve(
            store, data, batches(hot), lambda s: history.append(set(s.warm.pinned_rows().tolist()))
        )
        pinned = set(store.warm.pinned_rows().tolist())
        stats = store.stats()["warm"]
        sketch_bytes = store.warm.online.nbytes
        scraped = scrape_tiers(store)  # what Prometheus would read while serving
        online = store.warm.online
    assert scraped[("tiered_store_repins_total", "warm")] == stats["repins"] == online.repins
    assert scraped[("tiered_store_pinned_rows", "warm")] == len(pinned) > 0
    assert scraped[("tiered_store_repin_pinned_rows_total", "warm")] == online.rows_pinned > 0
    assert scraped[("tiered_store_repin_unpinned_rows_total", "warm")] == online.rows_unpinned
    assert scraped[("tiered_store_repins_total", "hot")] == 0  # the hot tier is empty here
    assert set(hot.tolist()) <= pinned  # the true heavy rows
    assert stats["repins"] == len(history) == 120 * 100 // EVERY
    before = set()
    for after in history:  # at most BUDGET rows in and BUDGET out per re-pin
        assert len(after - before) <= BUDGET and len(before - after) <= BUDGET
        before = after
    assert len(history[0]) == BUDGET  # it does move: the budget is the limit
    assert sketch_bytes <= 400 * 80 + WINDOW * 8  # sized by the tier, not the table's rows


@pytest.mark.parametrize("capacity", [1, 2])
def test_a_small_tier_keeps_a_slot_to_follow_the_traffic(tmp_path, capacity):
    """A re-pinning tier never pins all its slots: a tier of 1 pinned its only slot at its first
    re-pin, then admitted nothing, so it never re-pinned again and missed every lookup."""
    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 10, "budget": 1}}
    tiers = {"hot": {"capacity": capacity, **tier}, "warm": {"capacity": 0}}
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        for i in range(20):  # row 5 hot
            store.lookup([5] * 9 + [60 + i])
            store.wait_repinned(timeout=10)
        assert store.hot.pinned_count < capacity
        hits = store.hot.counters.hits
        for _ in range(30):  # then only row 7
            assert torch.equal(store.lookup([7] * 10), data[[7] * 10])
            store.wait_repinned(timeout=10)
        assert store.hot.counters.hits - hits >= 290 and store.hot.pinned_count < capacity


def test_budget_as_a_share_and_no_repin_when_disabled(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    work = batches(hot_set(), n=30)
    share = config(path, repin={"every": EVERY, "budget": "5%"})
    with TieredStore(share) as store:
        sizes = []
        serve(store, data, work, lambda s: sizes.append(s.warm.pinned_count))
        target = store.warm.online.pinned_target()
    assert 0 < target < 400 and sizes[0] == int(np.ceil(0.05 * target))
    with TieredStore(config(path, repin={"enabled": False})) as store:
        assert store.warm.online is None
        for ids in work:
            store.lookup(torch.from_numpy(ids))
        assert store.warm.pinned_count == 0 and "repins" not in store.stats()["warm"]


def test_concurrent_lookups_stay_exact_while_re_pinning(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    cfg = config(path, hot=60, warm=300, repin={"every": 500, "budget": 30})
    with TieredStore(cfg) as store, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_concurrent_lookups_exact(store, data, batch=150, rounds=40, threads=3)
        assert store.wait_repinned(timeout=30)
        for cache in (store.hot, store.warm):
            assert cache.online.repins > 5
            mask = cache.pinned_mask()
            assert cache.pinned_count == int(mask.sum())  # the count follows the flags
            assert (
                cache.pinned_count <= cache.capacity // 2 + 30
            )  # the target, at most a budget more
        assert_concurrent_lookups_exact(store, data, batch=150, rounds=5, threads=2)
    assert not [w for w in caught if "re-pin" in str(w.message)]  # no re-pin failed


def test_replay_re_pins_exactly_as_the_store(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    work = batches(hot_set(), n=80, seed=5)
    layout = {"tables": [{"name": "a", "rows": ROWS, "heads": 1}]}
    with TraceWriter(tmp_path / "t.trace", layout) as writer:
        for ids in work:
            writer.write(ids.astype(np.int64), "a")
            writer.end_batch()
    cfg = config(path, hot=60, warm=300)
    with TieredStore(cfg) as store:
        serve(store, data, work)
        live = store.stats()
        live_pins = {c.name: sorted(c.pinned_rows().tolist()) for c in (store.hot, store.warm)}
    result = replay(cfg, tmp_path / "t.trace", table="a")
    assert live["warm"]["repins"] > 0 and live["hot"]["repins"] > 0
    for tier in ("hot", "warm"):
        for key in ("hits", "misses", "admissions", "evictions", "repins", "rows_repinned"):
            assert result.tiers[tier][key] == live[tier][key], (tier, key)
    lru = replay(
        StoreConfig.from_dict(
            {
                "table": {"path": str(path)},
                "tiers": {"hot": {"capacity": 60}, "warm": {"capacity": 300}},
            }
        ),
        tmp_path / "t.trace",
        table="a",
    )
    assert result.miss_ratio < lru.miss_ratio  # pinning the hot set pays over plain LRU
    assert live_pins["warm"]  # and the store's pins are what replay would have held


def test_an_offline_profile_is_the_start_and_re_pinning_follows_the_traffic(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    old, new = hot_set(seed=1), hot_set(seed=2)
    profile = profile_ids(np.concatenate(batches(old, n=60, seed=9)), rows=ROWS)
    profile.save(tmp_path / "profile.npz")
    cfg = config(
        path,
        profile=tmp_path / "profile.npz",
        repin={"enabled": True, "every": EVERY, "budget": 40},
    )
    with TieredStore(cfg) as store:
        start = set(store.warm.pinned_rows().tolist())
        assert set(old.tolist()) <= start  # the offline pins
        assert store.wait_repinned(timeout=30)  # and they count from the profile's episodes
        counts = held_counts(store.warm)
        episodes = dict(zip(profile.row_ids.tolist(), profile.episodes.tolist(), strict=True))
        assert all(counts[row] >= episodes[row] > 0 for row in start)
        target = store.warm.pinned_count
        serve(store, data, batches(new, n=150, seed=4))
        now = set(store.warm.pinned_rows().tolist())
        assert store.warm.pinned_count <= target  # the offline split rule sizes the segment
    assert set(new.tolist()) - set(old.tolist()) <= now  # the traffic's heavy rows, learnt
    # by default (repin.enabled: auto) a tier with a profile keeps its pins fixed, as before
    fixed = config(path, profile=tmp_path / "profile.npz", repin={"every": EVERY})
    with TieredStore(fixed) as store:
        assert store.warm.online is None and set(store.warm.pinned_rows().tolist()) == start
        for ids in batches(new, n=30, seed=4):
            assert torch.equal(store.lookup(torch.from_numpy(ids)), data[torch.from_numpy(ids)])
        assert set(store.warm.pinned_rows().tolist()) == start


def test_the_seeded_rows_are_the_pins_ranked_by_episodes_not_by_lookups(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS)
    # 20 rows looked up 100 times in one episode each, 10 rows 5 times in 5 episodes: the
    # tier pins the 10 (most episodes), and they must start from their 5 episodes
    bursty, steady = np.arange(20), np.arange(50, 60)
    FrequencyProfile(
        np.r_[bursty, steady],
        np.r_[np.full(20, 100), np.full(10, 5)],
        rows=ROWS,
        episodes=np.r_[np.full(20, 1), np.full(10, 5)],
    ).save(tmp_path / "profile.npz")
    cfg = config(
        path, warm=16, profile=tmp_path / "profile.npz", repin={"enabled": True, "budget": 4}
    )
    with TieredStore(cfg) as store:
        pinned = store.warm.pinned_rows().tolist()
        assert set(pinned) <= set(steady.tolist()) and pinned
        counts = held_counts(store.warm)
        assert all(counts[row] >= 5 for row in pinned), counts


def test_rows_admitted_in_updates_a_failure_dropped_count_from_zero():
    # the dropped admissions left their slots the counts of the rows they replaced: a row just
    # admitted into a well-counted row's slot was re-pinned as if it were that row
    r = OnlineRepin(4, RepinConfig(every=1000), window=2, deferred=True)
    r.admitted(torch.tensor([0, 1]), torch.tensor([5, 6]), looked_up=False)
    for _ in range(3):
        r.count(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), lookups=2)
    r.count_pending()
    assert r.slot_count[0] == 3
    r.evicted(torch.tensor([0]), torch.tensor([5]))
    r.admitted(torch.tensor([0]), torch.tensor([9]), looked_up=False)
    r.drop_pending()
    assert r.slot_count[:2].tolist() == [0.0, 0.0] and r.slot_stamp[0] == -1


def test_a_count_through_a_mark_applies_none_queued_after_it():
    # the re-pin thread read len(pending) with its snapshot and applied that many: where a save
    # had counted some meanwhile, it applied updates queued after its snapshot
    r = OnlineRepin(4, RepinConfig(every=1000), window=2, deferred=True)
    r.admitted(torch.tensor([0, 1]), torch.tensor([5, 6]), looked_up=False)
    mark = r.queued_total  # with a snapshot of the tier
    r.count_pending()  # another caller (a save) counts what is queued
    r.evicted(torch.tensor([0]), torch.tensor([5]))  # after the snapshot
    r.count_pending(mark)
    assert len(r.pending) == 1
    r.count_pending(r.queued_total)
    assert not r.pending


def test_a_re_pin_never_plans_a_row_with_the_count_of_the_row_its_slot_held_before(tmp_path):
    # the re-pin thread marked the queued updates, then copied the tier: lookups between the two
    # evicted the counted rows and admitted new ones, which the copy showed in their slots with
    # the evicted rows' counts (their updates past the mark), so rows looked up once were pinned
    path, data = make_table(tmp_path, rows=1000)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 140, "budget": 20}}
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"hot": {**tier, "capacity": 0}, "warm": {**tier, "capacity": 40}},
        }
    )
    heavy, fill, new = np.arange(100, 110), np.arange(200, 230), np.arange(300, 310)
    with TieredStore(cfg) as store:
        began, go_on, first = threading.Event(), threading.Event(), [True]
        restoring = store._restoring_pins

        def held_up(cache):  # a wait only: the re-pin thread's first check, before its copy
            if first[0] and threading.current_thread() in store._threads:
                first[0] = False
                began.set()
                go_on.wait(30)
            return restoring(cache)

        store._restoring_pins = held_up
        work = [heavy] * 8 + [part for _ in range(2) for part in fill.reshape(3, 10)]
        for i, ids in enumerate(work):  # heavy: 8 episodes each; fill: 2, and more recent
            store.lookup(torch.from_numpy(ids))
            if i + 1 < len(work):  # counted as it goes; the last batch makes a re-pin due
                assert store.wait_repinned(timeout=30)
        assert began.wait(30)
        store.lookup(torch.from_numpy(new))  # evicts the heavy rows, the least recent
        go_on.set()
        assert store.wait_repinned(timeout=30) and store.warm.online.repins == 1
        pinned = set(store.warm.pinned_rows().tolist())
        held = set(store.warm.held_rows().tolist())
    assert not set(heavy.tolist()) & held
    assert len(pinned) == 20 and pinned <= set(fill.tolist()), sorted(pinned)


def held_counts(cache) -> dict[int, float]:
    """Row -> its slot's count, for the rows the tier holds."""
    slots = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
    return dict(
        zip(cache.row_of_slot[slots].tolist(), cache.online.slot_count[slots].tolist(), strict=True)
    )


def test_restart_round_trips_the_sketch_and_the_pins(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, hot=60, restart=True)) as store:
        serve(store, data, batches(hot_set(), n=60))
        # saved: the sketch with the resident rows' counts folded in
        sketches = {
            c.name: torch.from_numpy(
                c.online.saved_profile(c.online.save_point(c.row_of_slot.clone()))[1]
            )
            for c in (store.hot, store.warm)
        }
        counts = {c.name: held_counts(c) for c in (store.hot, store.warm)}
        state = {c.name: c.online.state() for c in (store.hot, store.warm)}
        pins = {c.name: set(c.pinned_rows().tolist()) for c in (store.hot, store.warm)}
        assert store.warm.online.repins > 0 and store.warm.online.rows_pinned > 0
    assert pins["warm"] and pins["hot"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RestartWarning)
        with TieredStore(config(path, hot=60, restart=True)) as store:
            assert store.wait_restored(timeout=30) and store.wait_repinned(timeout=30)
            for cache in (store.hot, store.warm):
                assert torch.equal(cache.online.profile.sketch, sketches[cache.name])
                assert cache.online.state() == state[cache.name]
                # the re-pins' counters are this process's (Prometheus counters start from 0)
                assert (cache.online.repins, cache.online.rows_pinned) == (0, 0)
                assert scrape_tiers(store)[("tiered_store_repins_total", cache.name)] == 0
                assert set(cache.pinned_rows().tolist()) == pins[cache.name]
                assert cache.pinned_count == len(pins[cache.name])
                # each row restored counts at least what it had (count-min: more on collisions)
                restored, saved = held_counts(cache), counts[cache.name]
                assert restored.keys() == saved.keys()
                assert all(restored[row] >= saved[row] - 1e-3 for row in saved)
            serve(store, data, batches(hot_set(), n=20, seed=7))  # and it goes on re-pinning
            assert store.warm.online.repins > 0


def test_lookups_go_on_while_a_save_folds_the_resident_counts_into_the_sketch(
    tmp_path, monkeypatch
):
    # the fold is a pass over every resident row (1-1.7 s at a 4M-slot tier): a periodic save
    # holding the store's lock through it stalled every lookup that long
    path, data = make_table(tmp_path, rows=ROWS)
    folding, go_on = threading.Event(), threading.Event()
    with TieredStore(config(path, hot=60, restart=True)) as store:
        serve(store, data, batches(hot_set(), n=20))
        profile = store.warm.online.profile
        raise_to = profile.raise_to

        def held_up(ids, values, sketch=None):
            if sketch is not None:  # into a copy: the save's fold
                folding.set()
                go_on.wait(30)
            return raise_to(ids, values, sketch=sketch)

        monkeypatch.setattr(profile, "raise_to", held_up)
        assert_lookups_go_on_during(store, data, store.save_restart, folding, go_on)


def hold_the_saves_counting(store, online) -> tuple[threading.Event, threading.Event]:
    """Make a save's turn at ``online``'s counting lock wait (the re-pin thread's do not): set
    the first event there and wait for the second."""
    lock, counting, go_on = online._counting, threading.Event(), threading.Event()

    class HeldUp:
        def __enter__(self):
            if threading.current_thread() not in store._threads:
                counting.set()
                go_on.wait(30)
            return lock.__enter__()

        def __exit__(self, *exc):
            return lock.__exit__(*exc)

    online._counting = HeldUp()
    return counting, go_on


def test_lookups_go_on_while_a_save_waits_to_count_and_copy_the_sketch(tmp_path):
    # the save counted the queued updates and copied the sketch (134 MB at a 4M-slot tier)
    # under the store's lock: while the counting was busy, or through the copy, lookups waited
    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, hot=60, restart=True)) as store:
        serve(store, data, batches(hot_set(), n=20))
        counting, go_on = hold_the_saves_counting(store, store.warm.online)
        assert_lookups_go_on_during(store, data, store.save_restart, counting, go_on)


def test_a_save_the_re_pin_thread_counted_past_saves_the_weight_of_its_point(tmp_path):
    # lookups went on into the next decay interval while the save waited to count, and the
    # re-pin thread counted them: the save kept its point's since_repin (500) but the later
    # interval's weight (4, not 2), so the restarted tier decayed its past counts once more
    from tiered_store.warm_restart import load_restart, table_identity

    path, data = make_table(tmp_path, rows=ROWS)
    repin = {"every": EVERY, "budget": BUDGET, "decay": 0.5}
    work = batches(hot_set(), n=30)
    with TieredStore(config(path, restart=True, repin=repin)) as store:
        serve(store, data, work[:15])  # 1,500 lookups: mid-interval
        at_point = store.warm.online.state()
        counting, go_on = hold_the_saves_counting(store, store.warm.online)
        saver = threading.Thread(target=store.save_restart)
        saver.start()
        try:
            assert counting.wait(30)
            serve(store, data, work[15:])  # into the next interval, counted by the thread
            assert store.warm.online._weight_interval == 2  # the point's is 1
        finally:
            go_on.set()
            saver.join()
        saved = load_restart(restart_path(path), table_identity(store.cold, store.generation))
    state = saved.profiles["warm"][0]
    assert (state["weight"], state["since_repin"]) == (at_point["weight"], 500) == (2.0, 500)


def test_a_prior_weight_past_the_float32_counts_is_refused_at_open_naming_the_key(tmp_path):
    # 1e300 is finite, so the config took it, and seeded the profile's rows at infinity: they
    # outranked every count served and no decay brought them down
    path, _ = make_table(tmp_path, rows=ROWS)
    FrequencyProfile(np.arange(200), np.full(200, 10), rows=ROWS, episodes=np.full(200, 10)).save(
        tmp_path / "profile.npz"
    )
    repin = {"enabled": True, "prior_weight": 1e300}
    cfg = config(path, profile=tmp_path / "profile.npz", repin=repin)
    with pytest.raises(
        ConfigError,
        match=r"tiers\.warm\.repin\.prior_weight: got 1e\+300, which scales the profile's most "
        r"episodes \(10\) to 1e\+301 .*; expected a smaller prior_weight",
    ):
        TieredStore(cfg)


def test_a_prior_weight_past_the_float32_counts_is_refused_with_a_restart_file_too(tmp_path):
    # a tier whose counts a warm restart brings back is not seeded, so the prior_weight went
    # unchecked: the same config opened beside a restart file and was refused without one
    path, data = make_table(tmp_path, rows=ROWS)
    FrequencyProfile(np.arange(200), np.full(200, 10), rows=ROWS, episodes=np.full(200, 10)).save(
        tmp_path / "profile.npz"
    )
    profile = tmp_path / "profile.npz"
    with TieredStore(config(path, restart=True, profile=profile, repin={"enabled": True})) as s:
        serve(s, data, batches(hot_set(), n=10))
    repin = {"enabled": True, "prior_weight": 1e300}
    with pytest.raises(ConfigError, match=r"tiers\.warm\.repin\.prior_weight: got 1e\+300, "):
        TieredStore(config(path, restart=True, profile=profile, repin=repin))
    assert restart_path(path).exists()  # the counts saved are still there for a good config
    with TieredStore(config(path, restart=True, profile=profile, repin={"enabled": True})) as s:
        assert s.wait_restored(timeout=30) and s.warm.online.profile.windows > 0


def test_a_restart_brings_back_pins_re_pinning_moved_away_from_the_profile(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    old = np.arange(200)  # the profile's rows; the traffic has moved to others since
    FrequencyProfile(old, np.full(200, 10), rows=ROWS, episodes=np.full(200, 10)).save(
        tmp_path / "profile.npz"
    )
    cfg = config(
        path,
        warm=100,
        restart=True,
        profile=tmp_path / "profile.npz",
        repin={"enabled": True, "every": EVERY, "budget": 20, "prior_weight": 0.01},
    )
    traffic = np.arange(1000, 1090)
    rng = np.random.default_rng(0)
    with TieredStore(cfg) as store:
        serve(store, data, [rng.choice(traffic, size=16) for _ in range(400)])
        pins, held = set(store.warm.pinned_rows().tolist()), set(store.warm.held_rows().tolist())
    assert pins and pins <= set(traffic.tolist())
    with TieredStore(cfg) as store:  # the saved pins and rows, not the profile's pins
        assert store.wait_restored(timeout=30)
        assert set(store.warm.pinned_rows().tolist()) == pins
        assert set(store.warm.held_rows().tolist()) == held
        ids = torch.from_numpy(np.sort(np.array(list(held))))
        assert torch.equal(store.lookup(ids), data[ids])


def _cold(store) -> None:
    """The store started with nothing restored: no pins, an empty sketch."""
    assert store.wait_restored(timeout=10)
    assert store.warm.pinned_count == 0 and store.warm.occupancy == 0
    assert not bool(store.warm.online.profile.sketch.any()) and store.warm.online.repins == 0


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:-100] + bytes([b[-100] ^ 4]) + b[-99:], "checksum mismatch"),  # a counter
        (
            # an older writer's file: its own magic, its checksum whole
            lambda b: resealed_restart(b"TSRESTART1\n" + b[11:-4]),
            r"older format \(TSRESTART1; expected TSRESTART2\)",
        ),
        (lambda b: b[: len(b) // 2], "checksum mismatch"),
    ],
    ids=["sketch-bit-flip", "old-format", "truncated"],
)
def test_corrupt_or_old_files_warn_and_start_cold(tmp_path, damage, why):
    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, restart=True)) as store:
        serve(store, data, batches(hot_set(), n=30))
    saved = restart_path(path)
    saved.write_bytes(damage(saved.read_bytes()))
    with pytest.warns(RestartWarning, match=rf"{saved.name}.*{why}.*starting cold"):
        store = TieredStore(config(path, restart=True))
    with store:
        _cold(store)
        serve(store, data, batches(hot_set(), n=5))


def test_a_profile_saved_for_another_tier_size_warns_and_counts_afresh(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, restart=True)) as store:
        serve(store, data, batches(hot_set(), n=30))
        held = set(store.warm.held_rows().tolist())
    with pytest.warns(
        RestartWarning,
        match=r"npy\.restart.*warm tier's online profile.*capacity 400 \(tier now 600\)",
    ):
        store = TieredStore(config(path, warm=600, restart=True))
    with store:
        assert store.wait_restored(timeout=10)
        assert set(store.warm.held_rows().tolist()) == held  # the rows come back, not the counts
        assert store.warm.pinned_count == 0 and not bool(store.warm.online.profile.sketch.any())


def test_a_stale_file_restores_no_profile(tmp_path):
    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, restart=True)) as store:
        serve(store, data, batches(hot_set(), n=30))
    from tiered_store import create_table

    create_table(path, data + 1, progress=False, overwrite=True)  # another table at the path
    with pytest.warns(RestartWarning, match="another table version"):
        store = TieredStore(config(path, restart=True))
    with store:
        _cold(store)


@pytest.mark.parametrize(
    "repin, message",
    [
        ({"budget": 0}, r"tiers\.warm\.repin\.budget: got 0; expected a row count >= 1"),
        ({"budget": "0%"}, r"tiers\.warm\.repin\.budget: got '0%'; expected .*\(above 0%"),
        ({"budget": "120%"}, r"tiers\.warm\.repin\.budget: got '120%'"),
        ({"every": 0}, r"tiers\.warm\.repin\.every: expected an integer >= 1, got 0"),
        ({"decay": 1.5}, r"tiers\.warm\.repin\.decay: .*less than or equal to 1"),
        ({"prior_weight": -1}, r"tiers\.warm\.repin\.prior_weight: .*greater than or equal to 0"),
        (
            {"sketch_width": 0},
            r"tiers\.warm\.repin\.sketch_width: expected an integer from 1 to 64, got 0",
        ),
        (
            {"quiet_sample": 0},
            r"tiers\.warm\.repin\.quiet_sample: expected an integer >= 1, got 0",
        ),
        ({"evry": 5}, r"tiers\.warm\.repin\.evry: unknown key; expected one of budget, decay"),
        (
            {"enabled": "yes"},
            r"tiers\.warm\.repin\.enabled: got 'yes'; expected true, false or 'auto'",
        ),
    ],
)
def test_bad_repin_config_names_the_key(repin, message):
    with pytest.raises(ConfigError, match=message):
        StoreConfig.from_dict(
            {"table": {"path": "t.npy"}, "tiers": {"warm": {"capacity": 10, "repin": repin}}}
        )


@pytest.mark.parametrize("profile", [None, "p.npz"])
def test_repin_settings_of_a_tier_with_re_pinning_off_name_why_they_are_ignored(profile):
    # with repin.enabled false the warning blamed a profile, which a tier without one has not
    from tiered_store.cache_plan import ignored_tier_settings

    warm = {"capacity": 10, "policy": "zipf-tuned", "repin": {"enabled": False, "every": 512}}
    if profile is not None:
        warm["profile"] = profile
    cfg = StoreConfig.from_dict({"table": {"path": "t.npy"}, "tiers": {"warm": warm}})
    assert ignored_tier_settings(cfg) == [
        "tiers.warm.repin: every ignored; repin.enabled is false: the tier neither counts nor "
        "re-pins online"
    ]


def full_plan(repin, row_of_slot, pinned) -> tuple[list, list]:
    """The plan by definition: rank every resident row by its count, fill the pinned segment up
    to its target with the best unpinned rows, then swap the best unpinned for the lowest pinned
    while they count more; at most ``budget`` in and out. Returns the counts moved in and out
    (rows of equal count are interchangeable)."""
    resident = torch.nonzero(row_of_slot >= 0).squeeze(1).tolist()
    score = dict(zip(resident, repin.slot_count[resident].tolist(), strict=True))
    target = min(repin.pinned_target(), len(resident))
    budget = repin.budget_rows(target)
    held = sorted((s for s in resident if pinned[s]), key=lambda s: score[s])
    free = sorted((s for s in resident if not pinned[s] and score[s] > 0), key=lambda s: -score[s])
    fill = min(max(0, target - len(held)), budget, len(free))
    pin, unpin = free[:fill], held[: max(0, len(held) - target)][:budget]
    for best, low in zip(free[fill:], held[len(unpin) :], strict=False):
        if len(pin) == budget or len(unpin) == budget or score[best] <= score[low]:
            break
        pin.append(best)
        unpin.append(low)
    return sorted(score[s] for s in pin), sorted(score[s] for s in unpin)


def zipf_batches(rng, rows: int, n: int, size: int) -> list[torch.Tensor]:
    """``n`` batches of ``size`` ids, Zipf-like over ``rows`` (popularity not in id order)."""
    weights = 1.0 / np.arange(1, rows + 1) ** 0.8
    order = rng.permutation(rows)
    return [
        torch.from_numpy(order[rng.choice(rows, size, p=weights / weights.sum())]) for _ in range(n)
    ]


def test_a_plan_moves_the_rows_that_ranking_every_resident_would():
    # a real tier of 4,096 slots over 6,000 rows, re-pinned every window; each plan is checked
    # against the plan by definition over the same counts
    from policies import PolicySpec
    from tiered_store.row_cache import RowCache

    from .conftest import run_batch

    cache = RowCache("warm", num_rows=6000, capacity=4096, spec=PolicySpec.parse("zipf-tuned"))
    cache.online = OnlineRepin(4096, RepinConfig(every=400, budget=200), window=400)
    moved_in = moved_out = 0
    for batch in zipf_batches(np.random.default_rng(7), 6000, 80, 400):
        run_batch(cache, batch)
        assert cache.online.due
        want = full_plan(cache.online, cache.row_of_slot, cache.pinned_mask())
        moves = cache.online.plan(cache.row_of_slot, cache.pinned_mask())
        got_in = sorted(cache.online.slot_count[moves.pin_slots].tolist())
        got_out = sorted(cache.online.slot_count[moves.unpin_slots].tolist())
        assert (got_in, got_out) == want
        pinned, unpinned = cache.apply_repin(moves)
        assert (pinned, unpinned) == (len(got_in), len(got_out))
        cache.online.finish(pinned, unpinned)
        moved_in, moved_out = moved_in + pinned, moved_out + unpinned
    assert moved_in > 2000 and moved_out > 10  # it filled the pinned segment and swapped rows


@pytest.mark.parametrize("deferred", [False, True], ids=["replay", "store"])
def test_a_rows_count_is_its_episodes_across_evictions(deferred):
    # with a sketch wide enough that rows do not collide and no decay, every resident row's
    # count is exactly the windows it was looked up in since the start, though rows come and go
    # (evicted: folded into the sketch; admitted again: counted on from it)
    from policies import PolicySpec
    from tiered_store.row_cache import RowCache

    from .conftest import run_batch

    rows, window = 3000, 300
    cache = RowCache("warm", num_rows=rows, capacity=500, spec=PolicySpec.parse("zipf-tuned"))
    config = RepinConfig(every=10**9, budget=1, decay=1.0, sketch_width=64)
    cache.online = OnlineRepin(500, config, window=window, deferred=deferred)
    episodes = np.zeros(rows)
    seen: set[int] = set()
    in_window = 0
    for batch in zipf_batches(np.random.default_rng(3), rows, 120, 100):
        run_batch(cache, batch)
        cache.online.count_pending()
        seen |= set(batch.tolist())
        in_window += batch.numel()
        if in_window >= window:  # windows end at the batch that fills them
            episodes[list(seen)] += 1
            seen, in_window = set(), 0
    episodes[list(seen)] += 1  # the open window: its hits are counted, its misses wait
    assert cache.counters.evictions > 2000  # rows came and went
    slots = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
    held = cache.row_of_slot[slots]
    counted = cache.online.slot_count[slots].numpy()
    # a row whose last miss is in the open window has that episode in its count already
    assert np.array_equal(counted, episodes[held.numpy()])
    # evicted rows: the sketch holds what they were counted (the open window's misses wait)
    gone = np.setdiff1d(np.flatnonzero(episodes), held.numpy())
    estimate = cache.online.profile.estimates(torch.from_numpy(gone)).numpy()
    assert np.array_equal(estimate, episodes[gone] - np.isin(gone, list(seen)))


def test_the_cuda_paths_count_admit_evict_and_choose_as_the_cpu_kernels():
    # the torch ops the store runs on CUDA, run here on CPU tensors, against the numba passes
    from tiered_store.online_profile import OnlineProfile
    from tiered_store.online_repin import candidates_torch, count_hits_torch
    from tiered_store.sketch_kernel import repin_candidates, slot_episodes

    rng = np.random.default_rng(11)
    # as OnlineRepin keeps them: a float32 count and an int32 stamp side by side per slot
    per_slot = {k: torch.zeros((500, 2), dtype=torch.int32) for k in ("numba", "torch")}
    counts = {k: v.view(torch.float32)[:, 0] for k, v in per_slot.items()}
    stamps = {k: v[:, 1].fill_(-1) for k, v in per_slot.items()}
    for window in range(12):
        for _ in range(3):  # batches of a window, duplicates included
            slots = torch.from_numpy(rng.integers(0, 500, 300))
            a = slot_episodes(per_slot["numba"].numpy(), slots.numpy(), window, 1.5)
            b = count_hits_torch(counts["torch"], stamps["torch"], slots, window, 1.5)
            assert a == int(b)
    assert torch.equal(counts["numba"], counts["torch"]) and counts["numba"].max() > 10
    assert torch.equal(stamps["numba"], stamps["torch"])

    row_of_slot = torch.from_numpy(np.where(rng.random(5000) < 0.1, -1, rng.permutation(5000)))
    pinned = torch.from_numpy(rng.random(5000) < 0.4)
    counts = rng.integers(0, 40, 5000).astype(np.float32)  # ties, zeros
    fractions = np.where(counts > 0, 1 + rng.random(5000), 0).astype(np.float32)  # few top bits
    for score, k in itertools.product(
        map(torch.from_numpy, (counts, fractions)), (0, 1, 50, 1999, 10_000)
    ):
        pairs = np.zeros((5000, 2), np.int32)  # the counts as OnlineRepin keeps them
        scratch = np.full(5000, 0xFFFF, np.uint16)  # what a plan before left in it
        pairs.view(np.float32)[:, 0] = score.numpy()
        cpu = repin_candidates(row_of_slot.numpy(), pinned.numpy(), pairs, k, scratch)
        cuda = candidates_torch(row_of_slot, pinned, score, k)
        assert cpu[4:] == cuda[4:]  # resident and pinned slots
        assert cpu[1].tolist() == cuda[1].tolist() == score[cpu[0]].tolist()  # most first
        assert cpu[3].tolist() == cuda[3].tolist() == score[cpu[2]].tolist()  # least first
        best, low = torch.from_numpy(cpu[0]), torch.from_numpy(cpu[2])
        assert bool((row_of_slot[best] >= 0).all() & ~pinned[best].any() & (score[best] > 0).all())
        assert bool((row_of_slot[low] >= 0).all() & pinned[low].all())

    profile = OnlineProfile(100, heavy_hitters=False, dtype=torch.float32)
    profile.update(torch.from_numpy(rng.integers(0, 1000, 400)), weight=2.0)
    other = profile.sketch.clone()
    ids = torch.from_numpy(rng.choice(1000, 300, replace=False))
    values = torch.from_numpy(rng.integers(0, 6, 300).astype(np.float32))
    profile.raise_to(ids, values)
    profile._raise_torch(other, profile._buckets(ids), values)
    assert torch.equal(profile.sketch, other)
    assert bool((profile.estimates(ids) >= values).all())

    # admissions and evictions, from the same sketch and slots: the kernels against the torch ops
    from tiered_store.online_repin import admitted_torch, evicted_torch
    from tiered_store.sketch_kernel import slots_admitted, slots_evicted

    count, stamp = per_slot["torch"].view(torch.float32)[:, 0], per_slot["torch"][:, 1]
    sketches = {k: OnlineProfile(500, heavy_hitters=False, dtype=torch.float32) for k in per_slot}
    for sketch in sketches.values():
        sketch.update(torch.from_numpy(np.arange(0, 5000, 7)), weight=2.5)
    for window in range(12, 24):
        hits = torch.from_numpy(rng.integers(0, 500, 200))  # some slots counted in this window
        slot_episodes(per_slot["numba"].numpy(), hits.numpy(), window, 1.5)
        count_hits_torch(count, stamp, hits, window, 1.5)
        slots = torch.from_numpy(rng.choice(500, 120, replace=False))
        rows = torch.from_numpy(rng.choice(5000, 120, replace=False))
        args = (slots.numpy(), rows.numpy(), window, 1.5)
        a = slots_evicted(per_slot["numba"].numpy(), *sketches["numba"].numpy_sketch(), *args)
        b = evicted_torch(count, stamp, sketches["torch"], slots, rows, window, 1.5)
        assert a.tolist() == b.tolist() and 0 < a.sum() < a.size
        extra = 1.5 * (window % 2)  # the miss's episode counted already, or not
        rows = torch.from_numpy(rng.choice(5000, 120, replace=False))
        args = (slots.numpy(), rows.numpy(), window, extra)
        slots_admitted(per_slot["numba"].numpy(), *sketches["numba"].numpy_sketch(), *args)
        admitted_torch(count, stamp, sketches["torch"], slots, rows, window, extra)
    assert torch.equal(per_slot["numba"], per_slot["torch"])
    assert torch.equal(sketches["numba"].sketch, sketches["torch"].sketch)
    assert sketches["numba"].sketch.max() > 2.5  # evictions raised counters past the window's


def test_a_counting_backlog_drops_whole_windows_and_then_counts_again():
    # the store's counting thread never runs for 20 windows: 8 wait, the hits and misses of the
    # other 12 are not queued (admissions and evictions are: the counts follow the rows), and
    # once it catches up, counting goes on as before
    from policies import PolicySpec
    from tiered_store.online_repin import MAX_PENDING_WINDOWS, OnlineRepin
    from tiered_store.row_cache import RowCache

    from .conftest import run_batch

    rows, window = 3000, 300
    cache = RowCache("warm", num_rows=rows, capacity=500, spec=PolicySpec.parse("zipf-tuned"))
    config = RepinConfig(every=10**9, budget=1, decay=1.0, sketch_width=64)
    cache.online = online = OnlineRepin(500, config, window=window, deferred=True)
    work = zipf_batches(np.random.default_rng(5), rows, 69, 100)  # 23 windows of 3 batches
    episodes = np.zeros(rows)
    for i, batch in enumerate(work[:60]):
        run_batch(cache, batch)
        if i % 3 == 2:  # a window ends: its rows' episodes, counted or not
            episodes[np.unique(np.concatenate([b.numpy() for b in work[i - 2 : i + 1]]))] += 1
    assert online.windows_dropped == 20 - MAX_PENDING_WINDOWS  # the rest wait to be counted
    assert online.windows_queued == MAX_PENDING_WINDOWS
    online.count_pending()
    assert online.windows_queued == 0 and online.profile.windows == MAX_PENDING_WINDOWS
    slots = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
    counted = online.slot_count[slots].numpy()
    assert np.all(counted <= episodes[cache.row_of_slot[slots].numpy()])  # never over-counted
    for batch in work[60:]:  # caught up: the window that began in the backlog is dropped too,
        run_batch(cache, batch)  # the two after it are counted
        online.count_pending()
    assert online.windows_dropped == 21 - MAX_PENDING_WINDOWS
    assert online.profile.windows == MAX_PENDING_WINDOWS + 2


def test_a_tier_whose_rows_stay_put_waits_for_a_change_to_re_pin(tmp_path):
    # a tier that holds all it is asked for evicts nothing: pins would change nothing, so its
    # re-pins wait (the all-hit path does no plans) and it samples its windows ever more
    # sparsely; the first admission makes a re-pin due

    path, data = make_table(tmp_path, rows=ROWS)
    rows = np.random.default_rng(5).choice(ROWS, 300, replace=False)
    with TieredStore(config(path, warm=400)) as store:
        serve(store, data, [rows[i : i + 100] for i in range(0, 300, 100)] * 4)
        online = store.warm.online
        repins, weight, windows = online.repins, online.weight, online.profile.windows
        assert repins > 0  # while the rows came in
        hits_only = [np.random.default_rng(i).choice(rows, 100) for i in range(60)]
        serve(store, data, hits_only)  # 6,000 lookups: 6 intervals, 30 windows, no admission
        assert online.repins == repins and online.since_repin >= 6 * EVERY
        assert not online.due and store.stats()["warm"]["misses"] == 300
        # quiet already (the rows came in the first 2 of 6 windows): 30 windows of a spell from
        # QUIET_AFTER to 34, 2 counted in each doubling (one in 2, 4, 8), not 30 (nor 30 / 64)
        counted = online.profile.windows - windows
        assert online.quiet_sample == 64 and 5 <= counted <= 7
        scraped = scrape_tiers(store)  # what Prometheus would read: the tier is quiet
        quiet = "tiered_store_online_quiet_windows"
        assert scraped[(quiet, "warm")] == online.quiet_windows >= 29
        assert scraped[(quiet, "hot")] == 0
        serve(
            store,
            data,
            [np.concatenate([rows[:99], [int(np.setdiff1d(np.arange(ROWS), rows)[0])]])],
        )
        assert online.repins == repins + 1  # one admission: the re-pin is due at once
        # past counts decayed once per interval of lookups, those that waited included
        intervals = (6 * 1000 + 300) // EVERY
        assert online.weight == pytest.approx(weight / online.decay**intervals, rel=1e-9)


def test_decay_over_a_long_quiet_spell_forgets_past_counts_without_overflow():

    repin = OnlineRepin(8, RepinConfig(every=3, budget=2, decay=0.5), window=3)
    repin.admitted(torch.tensor([0, 1]), torch.tensor([5, 1]), looked_up=False)
    repin.count(torch.tensor([0, 0, 1]), torch.tensor([], dtype=torch.int64), lookups=3)
    assert repin.slot_count[:2].tolist() == [1.0, 1.0]
    none = torch.tensor([], dtype=torch.int64)
    repin.count(none, none, lookups=10**15)  # a quiet tier: 3e14 intervals, no re-pin
    repin.count(torch.tensor([1]), none, lookups=3)  # renormalised: the past forgotten
    assert repin.weight == 1.0 and repin.slot_count[0] < 1e-29 and repin.repins == 0
    assert repin.slot_count[:2].tolist() == pytest.approx([0.0, 1.0])  # counting goes on


def test_a_decay_below_one_over_the_largest_float_forgets_without_overflow():
    # repin.decay accepts any number above 0; one under 1 / 1.8e308 (5e-324) made the counting
    # raise OverflowError at each interval's first update (1 / decay is past the largest float):
    # replay stopped with a traceback, the store's re-pin thread failed every interval

    none = torch.tensor([], dtype=torch.int64)
    repin = OnlineRepin(8, RepinConfig(every=2, budget=1, decay=5e-324), window=2)
    repin.admitted(torch.tensor([0, 1]), torch.tensor([5, 1]), looked_up=False)
    repin.count(torch.tensor([0, 0]), none, lookups=2)  # row 5 in interval 0
    repin.count(torch.tensor([1]), none, lookups=2)  # row 1 in interval 1: row 5 forgotten
    assert repin.weight == 1.0 and repin.slot_count[:2].tolist() == pytest.approx([0.0, 1.0])
    assert math.isfinite(repin.state()["weight"])


def test_decay_is_per_every_lookups_whatever_the_batch_size():
    # batches of 50,000 lookups against every = 65,536: a re-pin is due every second batch, but
    # past counts must decay once per 65,536 lookups (the lookups past an interval count towards
    # the next), not once per re-pin (200 re-pins where 20M lookups are 305 intervals)

    repin = OnlineRepin(64, RepinConfig(), window=65_536)
    none = torch.tensor([], dtype=torch.int64)
    for i in range(400):  # a row comes and goes in every batch: each interval is due
        slot = torch.tensor([i % 64])
        repin.evicted(slot, torch.tensor([i]))
        repin.admitted(slot, torch.tensor([i + 1000]), looked_up=False)
        repin.count(torch.tensor([0]), none, lookups=50_000)
        if repin.due:
            repin.finish(0, 0)
    assert repin.every == 65_536 and repin.decay == 0.9934
    intervals = 400 * 50_000 // 65_536
    assert repin.repins == intervals
    # what an episode counted next adds
    assert repin.state()["weight"] == pytest.approx(1 / 0.9934**intervals, rel=1e-9)


def test_counts_decay_by_the_lookups_since_them_whether_or_not_a_re_pin_ran():
    # counts aged only when a re-pin ran: through a quiet spell (nothing came or went, so no
    # re-pin) a row's episode at the end of 40 intervals weighed like one at their start,
    # until the next re-pin (row 1's one episode counted 1 / 40 of row 5's 40 old ones)

    none = torch.tensor([], dtype=torch.int64)
    repin = OnlineRepin(8, RepinConfig(every=2, budget=1, decay=0.25, quiet_sample=1), window=2)
    repin.admitted(torch.tensor([0, 1]), torch.tensor([5, 1]), looked_up=False)
    for _ in range(40):  # row 5 in each of intervals 0-39, nothing comes or goes
        repin.count(torch.tensor([0, 0]), none, lookups=2)
    repin.count(torch.tensor([1, 1]), none, lookups=2)  # row 1 once, in interval 40
    assert repin.repins == 0
    row_5, row_1 = repin.slot_count[:2].tolist()  # 4**40 against (4**40 - 1) / 3
    assert row_1 / row_5 == pytest.approx(3.0, rel=1e-5)


def test_a_quiet_tier_counts_one_window_in_quiet_sample_standing_for_them_all():
    # rows that stay put QUIET_AFTER windows in a row: one window in ``quiet_sample`` is counted,
    # weighted by it (the count stays about the episodes); the first admission ends it
    from tiered_store.online_repin import QUIET_AFTER, OnlineRepin

    repin = OnlineRepin(8, RepinConfig(every=10**9, decay=1.0, quiet_sample=4), window=2)
    none = torch.tensor([], dtype=torch.int64)
    repin.admitted(torch.tensor([0, 1]), torch.tensor([5, 1]), looked_up=False)
    counts = []
    # windows 0-19, hits only: 0-4 counted; then one in 2 (6 and 8, x2: each stands for the
    # window skipped before it), and from a spell of 8 quiet windows on one in 4 (12, 16: x4)
    for _ in range(20):
        repin.count(torch.tensor([0, 0]), none, lookups=2)
        counts.append(repin.slot_count[0].item())
    assert repin.quiet_windows == 20 - 1 and QUIET_AFTER == 4
    assert counts == [1, 2, 3, 4, 5, 5, 7, 7, 9, 9, 9, 9, 13, 13, 13, 13, 17, 17, 17, 17]
    assert repin.profile.windows == 9  # the counted windows: the mean distinct rows per window
    assert repin.profile.mean_distinct_per_window == 1.0  # is that of the counted ones
    repin.admitted(torch.tensor([2]), torch.tensor([7]), looked_up=False)  # a change in window 20
    counts = []
    for _ in range(9):  # 20 (sampled x4, counted x1 from the change on), 21-24 counted, quiet
        repin.count(torch.tensor([0]), none, lookups=2)  # again after 4 windows: 25 not, 26 x2
        counts.append(repin.slot_count[0].item())
    assert counts == [18, 19, 20, 21, 22, 22, 24, 24, 26]  # 17-19, skipped, stood for by none


def _two_caches_their_oldest_rows_pinned() -> tuple[list, list[np.ndarray], torch.Tensor]:
    """Two zipf-tuned warm tiers, one with a victim buffer and one with a topk per eviction, after
    the first 10 batches of a workload of 60, their 20 least recently used rows then pinned: the
    tiers, the workload and those rows."""
    from policies import PolicySpec
    from tiered_store.online_repin import RepinMoves
    from tiered_store.row_cache import RowCache

    from .conftest import run_batch

    caches = [
        RowCache("warm", num_rows=3000, capacity=200, spec=PolicySpec.parse("zipf-tuned"), **kw)
        for kw in ({}, {"victim_buffer": 0})  # the second: a topk per eviction
    ]
    rng = np.random.default_rng(4)
    work = [rng.integers(0, 3000, 40) for _ in range(60)]
    for batch in work[:10]:
        for cache in caches:
            run_batch(cache, batch)
    first = caches[0].held_rows()[-20:]  # the least recently used rows
    none = torch.empty(0, dtype=torch.int64)
    for cache in caches:
        assert cache.apply_repin(RepinMoves(cache.probe(first), first, none, none)) == (20, 0)
    return caches, work, first


def test_victims_after_a_re_pin_are_those_a_new_topk_would_choose():
    # a re-pin that unpins rows must not leave the victim buffer stale: the unpinned rows (the
    # least recent here) join it, so a tier with a buffer evicts exactly as one without
    from tiered_store.online_repin import RepinMoves

    from .conftest import run_batch

    caches, work, first = _two_caches_their_oldest_rows_pinned()

    def unpin(rows: torch.Tensor) -> None:
        for cache in caches:
            none = torch.empty(0, dtype=torch.int64)
            moves = RepinMoves(none, none, cache.probe(rows), rows)
            assert cache.apply_repin(moves) == (0, rows.numel())

    for i, batch in enumerate(work[10:], 10):
        for cache in caches:
            run_batch(cache, batch)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot), i
        if i == 20:  # buffered victims exist now; unpin rows older than all of them
            assert caches[0]._buffered is not None and caches[0]._buffered[0].numel()
            unpin(first)
    assert not bool(torch.isin(first, caches[0].row_of_slot).any())  # evicted first


def test_a_re_pin_whose_victim_buffer_merge_fails_leaves_no_stale_buffer(monkeypatch):
    # the unpin's flags were flipped, then the merge of the unpinned slots into the victim buffer
    # ran out of memory: the buffer kept its victims without them, so the tier evicted newer rows
    # before the unpinned ones (not what a new topk picks) until it drained. Dropping the buffer
    # then still raised with the flags flipped: the caller took the re-pin for undone (no finish,
    # hot's new pins not told to warm, "its pins stay"). The merge runs first now: its failure
    # changes nothing, and the re-pin tried again does as one that never failed
    from tiered_store import row_cache
    from tiered_store.online_repin import RepinMoves

    from .conftest import run_batch

    caches, work, first = _two_caches_their_oldest_rows_pinned()
    none = torch.empty(0, dtype=torch.int64)
    merge_sorted = row_cache.merge_sorted

    def no_memory(*args):
        raise torch.OutOfMemoryError("no memory to merge")

    for i, batch in enumerate(work[10:], 10):
        for cache in caches:
            run_batch(cache, batch)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot), i
        if i == 20:  # buffered victims exist now; unpin rows older than all of them
            assert caches[0]._buffered is not None and caches[0]._buffered[0].numel()
            monkeypatch.setattr(row_cache, "merge_sorted", no_memory)
            flags, buffered = caches[0].pin_flags().clone(), caches[0]._buffered
            with pytest.raises(torch.OutOfMemoryError, match="no memory to merge"):
                caches[0].apply_repin(RepinMoves(none, none, caches[0].probe(first), first))
            assert torch.equal(caches[0].pin_flags(), flags) and caches[0].pinned_count == 20
            assert caches[0]._buffered is buffered
            monkeypatch.setattr(row_cache, "merge_sorted", merge_sorted)
            for cache in caches:
                assert cache.apply_repin(RepinMoves(none, none, cache.probe(first), first))
            assert caches[0].pinned_count == caches[1].pinned_count == 0
    assert not bool(torch.isin(first, caches[0].row_of_slot).any())  # evicted first


def test_a_re_pin_whose_queue_search_update_fails_still_applies_whole(monkeypatch):
    # the flags flipped, then telling the queue's victim search of the unpinned slots ran out of
    # memory: the re-pin raised half done. Its search forgets its candidates instead (the next
    # passes over the tier) and the re-pin stands: victims by the queue are those a tier that
    # never failed picks
    from policies import PolicySpec
    from tiered_store.online_repin import RepinMoves
    from tiered_store.queue_victims import QueueVictims
    from tiered_store.request_queue import QueuedRequests
    from tiered_store.row_cache import RowCache

    from .conftest import run_batch

    caches = [
        RowCache("warm", num_rows=3000, capacity=200, spec=PolicySpec.parse("zipf-tuned"))
        for _ in range(2)
    ]
    queue = QueuedRequests()
    for cache in caches:
        cache.attach_queue(queue)
    rng = np.random.default_rng(5)
    work = [rng.integers(0, 3000, 40) for _ in range(60)]
    for batch in work[:10]:
        for cache in caches:
            run_batch(cache, batch)
    request = queue.add(torch.from_numpy(work[40]))  # some rows queued: victims by the queue
    for cache in caches:
        cache.queued(request)
    first = caches[0].held_rows()[-20:]  # the least recently used rows
    none = torch.empty(0, dtype=torch.int64)
    for cache in caches:
        cache.apply_repin(RepinMoves(cache.probe(first), first, none, none))
    changed = QueueVictims.changed

    def no_memory(self, slots):
        raise torch.OutOfMemoryError("no memory to merge")

    for i, batch in enumerate(work[10:], 10):
        for cache in caches:
            run_batch(cache, batch)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot), i
        if i == 20:  # unpin rows older than every candidate
            monkeypatch.setattr(QueueVictims, "changed", no_memory)
            assert caches[0].apply_repin(RepinMoves(none, none, caches[0].probe(first), first))
            monkeypatch.setattr(QueueVictims, "changed", changed)
            assert caches[1].apply_repin(RepinMoves(none, none, caches[1].probe(first), first))
            assert caches[0].pinned_count == caches[1].pinned_count == 0
    assert caches[0].counters == caches[1].counters


def test_a_miss_admitted_after_other_batches_began_a_window_counts_in_its_own(
    tmp_path, monkeypatch
):
    """A lookup reads its misses from cold outside the lock; batches of other threads may end
    its window and begin the next meanwhile. Its rows count one episode, in its own window, not
    one more in the window of the batch counted last. The read is held on an event only to fix
    the interleaving."""
    path, data = make_table(tmp_path, rows=ROWS)
    slow = 4321  # looked up once, by the held lookup (window 0)
    ((reading, go),) = _hold_cold_reads_of(slow, 1, monkeypatch)
    repin = {"every": 10**9, "budget": 1, "decay": 1.0, "sketch_width": 64}  # no collisions
    with TieredStore(config(path, warm=400, repin=repin)) as store:
        first = torch.tensor([slow, *range(99)])  # window 0: WINDOW = 200 lookups
        lookup = threading.Thread(target=lambda: store.lookup(first))
        lookup.start()
        assert reading.wait(10)
        assert torch.equal(store.lookup(torch.arange(100, 200)), data[100:200])  # ends window 0
        assert torch.equal(store.lookup(torch.arange(200, 300)), data[200:300])  # window 1
        go.set()
        lookup.join(10)
        online = _counted_through_window_1(store)
        slots = store.warm.probe(first)
        assert bool((slots >= 0).all())
        assert online.slot_count[slots].tolist() == [1.0] * 100  # not 2


def _counted_through_window_1(store: TieredStore):
    """End the warm tier's window 1 (WINDOW = 200 lookups) with a lookup of rows 300-399, apply
    every queued count, and return the tier's online state."""
    store.lookup(torch.arange(300, 400))
    assert store.wait_repinned(timeout=30)
    online = store.warm.online
    online.count_pending()
    assert online.window_no == 2
    return online


def _hold_cold_reads_of(row: int, n: int, monkeypatch) -> list[tuple]:
    """(reading, go) events of the next ``n`` cold reads that include ``row``: each sets its
    ``reading`` and waits for its ``go`` (only to fix an interleaving of lookups)."""
    from tiered_store.cold_table import ColdTable

    held = [(threading.Event(), threading.Event()) for _ in range(n)]
    waiting = list(held)
    read_rows = ColdTable.read_rows

    def read_held(self, ids, *args, **kwargs):
        if row in ids.tolist() and waiting:
            reading, go = waiting.pop(0)
            reading.set()
            go.wait(10)
        return read_rows(self, ids, *args, **kwargs)

    monkeypatch.setattr(ColdTable, "read_rows", read_held)
    return held


def test_a_row_another_lookup_missed_in_the_open_window_counts_it_once_admitted(
    tmp_path, monkeypatch
):
    """Two lookups miss a row, in windows 0 and 1; the first admits it after the second planned
    (so the second skips it): the row counts both episodes, not only its admitting lookup's (the
    sketch counts window 1's miss at its end, after the slot took its count). The reads are held
    on events only to fix the interleaving."""
    path, data = make_table(tmp_path, rows=ROWS)
    slow = 4321
    held_reads = _hold_cold_reads_of(slow, 2, monkeypatch)
    repin = {"every": 10**9, "budget": 1, "decay": 1.0, "sketch_width": 64}  # no collisions
    with TieredStore(config(path, warm=400, repin=repin)) as store:
        lookups = []
        for window, others in enumerate((range(99), range(200, 299))):
            ids = torch.tensor([slow, *others])
            lookups.append(threading.Thread(target=lambda ids=ids: store.lookup(ids)))
            lookups[-1].start()
            assert held_reads[window][0].wait(10)
            if window == 0:
                assert torch.equal(store.lookup(torch.arange(100, 200)), data[100:200])  # ends 0
        for (_, go), lookup in zip(held_reads, lookups, strict=True):  # the first admits, then
            go.set()
            lookup.join(10)
        online = _counted_through_window_1(store)
        slot = store.warm.probe(torch.tensor([slow]))
        assert online.profile.estimates(torch.tensor([slow])).tolist() == [2.0]
        assert online.slot_count[slot].tolist() == [2.0]  # not 1


def test_a_row_restored_after_a_lookup_missed_it_in_the_open_window_counts_that_miss():
    # a warm restart's preload lands a row a lookup of the open window missed (and then skips):
    # the sketch counts that miss at the window's end, so the slot takes it now

    r = OnlineRepin(8, RepinConfig(sketch_width=64), window=3)
    r.count(torch.tensor([], dtype=torch.int64), torch.tensor([7]), lookups=1)  # window 0
    r.admitted(torch.tensor([0]), torch.tensor([7]), looked_up=False)  # restored
    r.count(torch.tensor([], dtype=torch.int64), torch.tensor([3]), lookups=2)  # ends window 0
    assert r.window_no == 1 and r.profile.estimates(torch.tensor([7])).tolist() == [1.0]
    assert r.slot_count[0].item() == 1.0  # one episode: window 0 (not 0, not 2)


def _repinning_hot(path) -> StoreConfig:
    """A zipf-tuned hot tier of 64 rows that re-pins every 128 lookups, and warm restart."""
    hot = {"capacity": 64, "policy": "zipf-tuned", "recency_window": 128}
    hot["repin"] = {"enabled": True, "every": 128, "budget": 16}
    tiers = {"hot": hot, "warm": {"capacity": 0}, "restart": {"enabled": True}}
    return StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers})


def test_a_saved_pin_a_lookup_admits_during_the_restore_comes_back_pinned(tmp_path, monkeypatch):
    """The restore reads the saved pins it lacks from cold outside the lock; one a lookup admits
    meanwhile is pinned under the lock (the preload skips rows resident by then). The restore's
    read is held on an event only to fix the interleaving."""
    import threading

    from tiered_store.cold_table import ColdTable

    path, _ = make_table(tmp_path, rows=2000, dim=4)
    cfg = _repinning_hot(path)
    rng = np.random.default_rng(1)
    with TieredStore(cfg) as store:
        for _ in range(200):
            store.lookup(torch.from_numpy((rng.zipf(1.3, 128) - 1) % 2000))
            store.wait_repinned(5)
        saved = sorted(store.hot.pinned_rows().tolist())
    assert saved
    reading, go = threading.Event(), threading.Event()
    read_rows = ColdTable.read_rows

    def held(self, ids, *args, **kwargs):
        rows = read_rows(self, ids, *args, **kwargs)
        if threading.current_thread().name == "restore" and not go.is_set():
            reading.set()
            go.wait(10)
        return rows

    monkeypatch.setattr(ColdTable, "read_rows", held)
    with TieredStore(cfg) as store:
        assert reading.wait(10)  # the restore reads the pins it lacks
        store.lookup([saved[0]])  # admitted, unpinned, meanwhile
        go.set()
        assert store.wait_restored(10)
        assert sorted(store.hot.pinned_rows().tolist()) == saved


def _saved_with_pins(tmp_path) -> tuple[StoreConfig, torch.Tensor]:
    """A re-pinning hot tier of 8 slots whose warm-restart file holds 7 pinned rows: its config
    and the table's rows."""
    path, data = make_table(tmp_path, rows=200, dim=4)
    hot = {"capacity": 8, "policy": "zipf-tuned", "recency_window": 4}
    hot["repin"] = {"enabled": True, "every": 4, "budget": "100%"}
    tiers = {"hot": hot, "warm": {"capacity": 0}, "restart": {"enabled": True}}
    cfg = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers})
    with TieredStore(cfg) as store:
        for i in range(200):  # one row a window: 7 of the 10 rows pinned
            store.lookup([i % 10] * 4)
            store.wait_repinned(5)
        assert store.hot.pinned_count == 7
    return cfg, data


@pytest.mark.parametrize("hold_plan", [True, False], ids=["planned-before", "applied-before"])
def test_a_re_pin_during_the_restore_of_the_saved_pins_never_pins_the_whole_tier(
    tmp_path, monkeypatch, hold_plan
):
    """A re-pin planned (or applied) on rows lookups admitted while the restore read the saved
    pins from cold added its pins beside those the restore then loaded: every slot of the tier
    pinned, so it admitted nothing, never re-pinned again and missed every other row for good.
    Re-pins now wait for the saved pins. The restore's read and the plan are held on events only
    to fix the interleaving."""
    import threading

    from tiered_store.cold_table import ColdTable

    cfg, data = _saved_with_pins(tmp_path)
    reading, go, planning, plan_go = (threading.Event() for _ in range(4))
    if not hold_plan:
        plan_go.set()
    read_rows, plan = ColdTable.read_rows, OnlineRepin.plan

    def held_read(self, ids, *args, **kwargs):
        rows = read_rows(self, ids, *args, **kwargs)
        if threading.current_thread().name == "restore" and not go.is_set():
            reading.set()
            go.wait(10)
        return rows

    def held_plan(self, *args, **kwargs):
        if not plan_go.is_set():
            planning.set()
            plan_go.wait(10)
        return plan(self, *args, **kwargs)

    monkeypatch.setattr(ColdTable, "read_rows", held_read)
    monkeypatch.setattr(OnlineRepin, "plan", held_plan)
    with TieredStore(cfg) as store:
        assert reading.wait(10)  # the restore reads the saved pins
        store.lookup([100, 101, 102, 100])  # 3 rows admitted meanwhile: a re-pin is due
        planning.wait(1)  # (held_plan) it may plan on the tier without the saved pins
        store.wait_repinned(1)  # (applied-before) or apply its pins
        go.set()
        assert store.wait_restored(10)
        plan_go.set()
        assert store.wait_repinned(10)
        assert store.hot.pinned_count < store.hot.capacity
        hits = store.hot.counters.hits
        for row in range(150, 160):  # other rows come in and hit
            for _ in range(3):
                assert torch.equal(store.lookup([row] * 4), data[[row] * 4])
                store.wait_repinned(5)
        assert store.hot.counters.hits - hits >= 80
        assert store.hot.pinned_count < store.hot.capacity


def test_a_budget_past_the_tier_re_pins_as_the_whole_tier_does(tmp_path):
    """A ``repin.budget`` above int64 (the config takes any row count) reached the numba plan
    as is: the re-pin thread died with a TypingError, without a warning, so the tier never
    re-pinned again and its queued updates grew with every admission. A budget is now at most
    the tier's slots: one past it re-pins as a budget of the whole tier."""
    path, data = make_table(tmp_path, rows=2000, dim=4)
    pinned = []
    for budget in (10**30, 64):
        hot = {"capacity": 64, "policy": "zipf-tuned", "recency_window": 128}
        hot["repin"] = {"enabled": True, "every": 128, "budget": budget}
        tiers = {"hot": hot, "warm": {"capacity": 0}}
        cfg = StoreConfig.from_dict({"table": {"path": str(path)}, "tiers": tiers})
        rng = np.random.default_rng(1)
        with TieredStore(cfg) as store:
            for _ in range(60):
                ids = torch.from_numpy((rng.zipf(1.3, 128) - 1) % 2000)
                assert torch.equal(store.lookup(ids), data[ids])
                assert store.wait_repinned(10)
            assert store.hot.online.repins == 60 and not store.hot.online.pending
            pinned.append(sorted(store.hot.pinned_rows().tolist()))
    assert pinned[0] == pinned[1] and pinned[0]


def test_wait_repinned_returns_on_a_closed_store(tmp_path):
    """A re-pin due when the store closed never runs: wait_repinned returns at once instead of
    waking a thread that has ended (with no timeout it spun forever)."""
    import threading

    path, _ = make_table(tmp_path, rows=2000, dim=4)
    rng = np.random.default_rng(1)
    store = TieredStore(_repinning_hot(path))
    for _ in range(50):
        store.lookup(torch.from_numpy((rng.zipf(1.3, 128) - 1) % 2000))
        store.wait_repinned(5)
    store.lookup(torch.from_numpy((rng.zipf(1.3, 256) - 1) % 2000))  # due, then closed at once
    store.close()
    waiter = threading.Thread(target=store.wait_repinned, daemon=True)
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive()


def _restart_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RestartWarning)]


def test_a_restart_drops_a_profile_counted_under_another_window_or_offline_profile(tmp_path):
    """Counts made with another recency_window, or seeded from another offline profile, start
    afresh with a warning; a new offline profile then seeds and pins (both were restored
    silently: the new profile's rows were neither pinned nor counted)."""
    path, data = make_table(tmp_path, rows=ROWS)
    offline = tmp_path / "p.profile.npz"
    old, new = np.arange(0, 60), np.arange(2000, 2060)
    FrequencyProfile(old, np.full(60, 50), rows=ROWS, episodes=np.full(60, 50)).save(offline)
    with TieredStore(config(path, restart=True, repin={"enabled": True}, profile=offline)) as s:
        serve(s, data, batches(hot_set(), n=10))
    FrequencyProfile(new, np.full(60, 50), rows=ROWS, episodes=np.full(60, 50)).save(offline)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = config(path, restart=True, repin={"enabled": True}, profile=offline)
        with TieredStore(cfg) as s:
            assert s.wait_restored(timeout=30)
            pinned = set(s.warm.pinned_rows().tolist())
    assert set(new.tolist()) <= pinned and not pinned & set(old.tolist())
    (why,) = [w for w in _restart_warnings(record) if "online profile" in w]
    assert "saved for another tier: offline_profile" in why and "starts counting afresh" in why
    doc = config(path, restart=True).model_dump()
    doc["tiers"]["warm"]["recency_window"] = WINDOW // 2
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with TieredStore(StoreConfig.from_dict(doc)) as s:
            assert s.wait_restored(timeout=30) and s.warm.online.profile.windows == 0
    assert any(
        f"recency_window {WINDOW} (tier now {WINDOW // 2})" in w for w in _restart_warnings(record)
    )


def test_a_store_left_on_an_older_version_does_not_save_over_the_current_ones_file(tmp_path):
    """A compaction since it opened: its close keeps the current version's restart file (it
    wrote its old state there, and the next open started cold)."""
    from tiered_store.delta.compaction import compact_table

    path, data = make_table(tmp_path, rows=ROWS)
    old = TieredStore(config(path, restart=True))
    serve(old, data, batches(hot_set(), n=5))
    with TieredStore.open({"table": {"path": str(path)}}) as writer:
        writer.write([7], torch.ones(1, data.shape[1]))
        writer.commit()
    compact_table(path, progress=False)
    data[7] = 1.0
    with TieredStore(config(path, restart=True)) as current:
        serve(current, data, batches(hot_set(), n=20))
        held = current.warm.occupancy
    with pytest.warns(RestartWarning, match="moved on to a newer version since this store opened"):
        old.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RestartWarning)
        with TieredStore(config(path, restart=True)) as again:
            assert again.wait_restored(timeout=30) and again.warm.occupancy == held


def test_a_well_checksummed_file_whose_counters_do_not_load_starts_them_afresh(tmp_path):
    """A profile's counters missing or not numbers: a warning and fresh counts (open raised)."""
    import json
    import struct

    import crc32c

    from tiered_store.warm_restart import MAGIC

    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, restart=True)) as s:
        serve(s, data, batches(hot_set(), n=10))
    raw = restart_path(path).read_bytes()
    (size,) = struct.unpack_from("<I", raw, len(MAGIC))
    start = len(MAGIC) + 4
    header, rest = json.loads(raw[start : start + size]), raw[start + size : -4]
    header["profiles"]["warm"]["windows"] = "many"
    text = json.dumps(header).encode()
    body = MAGIC + struct.pack("<I", len(text)) + text + rest
    restart_path(path).write_bytes(body + struct.pack("<I", crc32c.crc32c(body)))
    warned = pytest.warns(RestartWarning, match="its counters do not load")
    with warned, TieredStore(config(path, restart=True)) as s:
        assert s.wait_restored(timeout=30) and s.warm.online.profile.windows == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        ("sketch", r"12 of the sketch's 4,096 counters are not finite numbers >= 0 \(inf\)"),
        ("weight", r"weight nan; expected a finite number above 0"),
    ],
)
def test_a_restart_file_with_counts_past_float32_starts_them_afresh(tmp_path, bad, message):
    """A file saved while a prior_weight of 1e300 (taken then) seeded the sketch at infinity
    brought those counters back: rows that outranked every count served, for good (a NaN weight
    made every count after it NaN). Such counters or weight now do not load (a warning and fresh
    counts)."""
    from tiered_store.warm_restart import load_restart, save_restart, table_identity

    path, data = make_table(tmp_path, rows=ROWS)
    with TieredStore(config(path, restart=True)) as s:
        serve(s, data, batches(hot_set(), n=10))
        identity = table_identity(s.cold, s.generation)
    saved = load_restart(restart_path(path), identity)
    meta, sketch = saved.profiles["warm"]
    sketch = sketch.copy()
    if bad == "sketch":
        sketch[:, :3] = np.inf
    else:
        meta["weight"] = float("nan")
    saved.profiles["warm"] = (meta, sketch)
    save_restart(restart_path(path), identity, saved)
    warned = pytest.warns(  # saved for this very tier: not "saved for another tier"
        RestartWarning,
        match=rf"warm tier's online profile was saved for this tier, but its counters do not "
        rf"load \(ValueError: {message}",
    )
    with warned, TieredStore(config(path, restart=True)) as s:
        assert s.wait_restored(timeout=30)
        assert s.warm.online.profile.windows == 0
        assert bool(torch.isfinite(s.warm.online.profile.sketch).all())


def test_a_wait_no_thread_can_take_is_refused():
    """save_every_s: .inf was taken, and the saving thread died on its first wait; the group's
    timeout_s raised an OverflowError when the store opened."""
    with pytest.raises(ConfigError, match="tiers.restart.save_every_s: expected a finite number"):
        StoreConfig.from_dict(
            {"table": {"path": "t.npy"}, "tiers": {"restart": {"save_every_s": float("inf")}}}
        )
    with pytest.raises(ConfigError, match="sharding.timeout_s: expected a finite number, got inf"):
        StoreConfig.from_dict(
            {"table": {"path": "t.npy"}, "sharding": {"ranks": 2, "timeout_s": float("inf")}}
        )


def _counts_over_windows(first_window: int, device: str) -> tuple[list[float], list[float]]:
    """Slot counts and sketch estimates after 6 windows of hits, misses, admissions and evictions
    on a tier whose window numbers start at ``first_window``."""

    r = OnlineRepin(8, RepinConfig(every=6, budget=2), window=3, device=device)
    r.window_no = first_window
    on = torch.device(device)
    r.admitted(torch.tensor([0, 1], device=on), torch.tensor([5, 1], device=on), looked_up=False)
    for k in range(6):
        r.count(torch.tensor([0, k % 2, 1], device=on), torch.tensor([2, 3], device=on), lookups=3)
        if k == 2:  # row 1 leaves slot 1 mid-run, row 7 comes in
            r.evicted(torch.tensor([1], device=on), torch.tensor([1], device=on))
            r.admitted(torch.tensor([1], device=on), torch.tensor([7], device=on), looked_up=True)
    rows = torch.tensor([2, 3, 1], device=on)
    return r.slot_count[:2].tolist(), r.profile.estimates(rows).tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")])
def test_counting_goes_on_past_two_to_the_31_windows(device):
    """Slot stamps are int32; window numbers are not: past 2**31 windows (25 days at a window a
    batch and 1,000 batches/s) the CUDA path refused to stamp (counting and re-pinning stopped).
    The counts across the wrap equal those from window 0."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    expected = _counts_over_windows(0, device)
    for first in (2**31 - 3, 2**32 - 3, 2**40):
        assert _counts_over_windows(first, device) == expected, first


def test_a_re_pin_that_fails_with_any_error_warns_and_the_next_one_runs(tmp_path, monkeypatch):
    """Only RuntimeError and ValueError were caught: any other failure of a plan (a numba
    TypingError, a TypeError) ended the re-pin thread without a word, so the tier never re-pinned
    again and wait_repinned() without a timeout never returned."""

    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 10, "budget": 1}}
    tiers = {"hot": {"capacity": 0}, "warm": {"capacity": 8, **tier}}
    plan, failures, planned = OnlineRepin.plan, [], []

    def fails_once(self, *args):  # a fault in the first plan only
        if not failures:
            failures.append(1)
            raise TypeError("a plan that fails")
        planned.append(1)
        return plan(self, *args)

    monkeypatch.setattr(OnlineRepin, "plan", fails_once)
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        with pytest.warns(
            RuntimeWarning, match="re-pin of the warm tier failed .a plan that fails"
        ):
            for i in range(40):  # row 5 hot
                assert torch.equal(store.lookup([5] * 9 + [60 + i]), data[[5] * 9 + [60 + i]])
                assert store.wait_repinned(timeout=10)
        assert failures and store.warm.online.repins > 0 and 5 in store.warm.pinned_rows()
        assert store.warm.online.repins == len(planned)  # the failed one is not counted


def test_a_restore_that_fails_with_any_error_starts_cold_and_re_pinning_goes_on(
    tmp_path, monkeypatch
):
    """Only a failed read (TieredStoreError, OSError) ended the restore with a warning: any other
    error (no memory for a step) killed its thread with the tier still waiting for its saved
    pins, so it never re-pinned again. The rest now start cold, with the same warning."""
    from tiered_store.cold_table import ColdTable
    from tiered_store.warm_restart import RestartWarning

    cfg, data = _saved_with_pins(tmp_path)
    read_rows = ColdTable.read_rows

    def no_memory(self, ids, *args, **kwargs):  # the restore's read fails (lookups' reads do not)
        if threading.current_thread().name == "restore":
            raise MemoryError("no memory for the step")
        return read_rows(self, ids, *args, **kwargs)

    monkeypatch.setattr(ColdTable, "read_rows", no_memory)
    with (
        pytest.warns(RestartWarning, match="reading the saved rows back .*no memory for the step"),
        TieredStore(cfg) as store,
    ):
        assert store.wait_restored(10)
        for row in range(150, 160):  # other rows come in, are counted and pinned
            for _ in range(3):
                assert torch.equal(store.lookup([row] * 4), data[[row] * 4])
                assert store.wait_repinned(5)
        assert store.hot.online.repins > 0 and store.hot.pinned_count > 0


def _dropping(monkeypatch) -> threading.Event:
    """Set once the re-pin thread calls ``drop_pending`` (about to wait for the counting lock)."""
    drop_pending, dropping = OnlineRepin.drop_pending, threading.Event()

    def drops(self):
        dropping.set()
        return drop_pending(self)

    monkeypatch.setattr(OnlineRepin, "drop_pending", drops)
    return dropping


def _fails_once(
    monkeypatch, method: str, message: str, held: threading.Event | None = None
) -> threading.Event:
    """``OnlineRepin.<method>``'s first call raises ``TypeError(message)``, once ``held`` is set
    where given (up to 30 s); the later ones run it. The event is set as that first call begins."""
    run, failing = getattr(OnlineRepin, method), threading.Event()

    def fails_once(self, *args):
        if not failing.is_set():
            failing.set()
            if held is not None:
                held.wait(30)
            raise TypeError(message)
        return run(self, *args)

    monkeypatch.setattr(OnlineRepin, method, fails_once)
    return failing


def test_a_failed_re_pin_drops_its_updates_while_lookups_go_on(tmp_path, monkeypatch):
    """After a failed count the thread dropped the tier's queued updates under the store's lock,
    and there waited for the counting lock, which a save holds while it counts and copies the
    sketch (134 MB at a 4M-slot tier): lookups waited for the save's copy."""

    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 10, "budget": 1}}
    tiers = {"hot": {"capacity": 0}, "warm": {"capacity": 8, **tier}}
    held, dropping = threading.Event(), _dropping(monkeypatch)
    # the first count fails once the counting lock is taken
    counting_now = _fails_once(monkeypatch, "count_pending", "a count that fails", held)
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        counting = store.warm.online._counting
        with pytest.warns(RuntimeWarning, match="re-pin of the warm tier failed .a count that"):
            ids = [5] * 9 + [60]
            assert torch.equal(store.lookup(ids), data[ids])  # an interval: a re-pin is due
            assert counting_now.wait(30)
            with counting:  # as a save copying the sketch holds it
                held.set()
                assert dropping.wait(30)
                got = []
                looker = threading.Thread(target=lambda: got.append(store.lookup([7, 8])))
                looker.start()
                looker.join(10)
                assert got and torch.equal(got[0], data[[7, 8]])  # while the copy goes on
            looker.join()
            for i in range(20):  # re-pinning goes on
                ids = [5] * 9 + [61 + i]
                assert torch.equal(store.lookup(ids), data[ids])
                assert store.wait_repinned(timeout=10)
        assert store.warm.online.repins > 0 and 5 in store.warm.pinned_rows()


@pytest.mark.gpu
def test_a_failed_re_pin_drops_its_updates_on_the_store_stream(tmp_path, monkeypatch):
    """The drop of a failed re-pin's updates zeroes the counts of the slots they admitted, which
    the counting writes on the store's stream; moved off the store's lock, it ran on the re-pin
    thread's own stream instead, unordered with the counts queued before and after it (a zero
    could land after the next admission's count, or an earlier count after the zero), and read
    slot tensors the lookups made on the store's stream before they were written."""

    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 10, "budget": 1}}
    tiers = {"hot": {"capacity": 8, "device": "cuda", **tier}, "warm": {"capacity": 16}}
    drop_pending, on_store_stream = OnlineRepin.drop_pending, []

    def drops(self):  # on the stream the counting runs on
        on_store_stream.append(torch.cuda.current_stream() == store._stream)
        return drop_pending(self)

    failed = _fails_once(monkeypatch, "count_pending", "a count that fails")  # the first only
    monkeypatch.setattr(OnlineRepin, "drop_pending", drops)
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        with pytest.warns(RuntimeWarning, match="re-pin of the hot tier failed .a count that"):
            for i in range(20):  # row 5 hot
                ids = torch.tensor([5] * 9 + [60 + i])
                assert torch.equal(store.lookup(ids.cuda()).cpu(), data[ids])
                assert store.wait_repinned(timeout=10)
        assert failed.is_set() and on_store_stream == [True]
        torch.cuda.synchronize()  # the last re-pin's flags were set on the store's stream
        assert store.hot.online.repins > 0 and 5 in store.hot.pinned_rows().tolist()


def test_a_count_that_fails_before_an_interval_is_over_decays_nothing(tmp_path, monkeypatch):
    """The re-pin thread's error path closed an interval whether or not one was due: a count
    that failed 10 lookups into an interval of 1,000 decayed the tier's counts by a whole
    interval (and recorded a re-pin), so its counts aged one interval more than its lookups."""

    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 1000, "budget": 1}}
    tiers = {"hot": {"capacity": 0}, "warm": {"capacity": 8, **tier}}
    failed = _fails_once(monkeypatch, "count_pending", "a count that fails")  # the first only
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        with pytest.warns(RuntimeWarning, match="re-pin of the warm tier failed .a count that"):
            ids = list(range(10))  # one window, a hundredth of an interval
            assert torch.equal(store.lookup(ids), data[ids])
            assert store.wait_repinned(timeout=10)
        online = store.warm.online
        assert failed.is_set() and online.since_repin == 10
        assert online.weight == 1.0 and online.repins == 0


def test_a_count_that_fails_before_an_interval_is_over_leaves_that_interval_its_re_pin(
    tmp_path, monkeypatch
):
    """The error path closed the interval if one was due once the failed count's updates were
    dropped: a drop waiting for the counting lock (a save's copy) let lookups end the interval
    meanwhile, and its re-pin, never tried, was skipped. Only the interval the failure was in is
    closed now."""

    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 5, "repin": {"every": 10, "budget": 1}}
    tiers = {"hot": {"capacity": 0}, "warm": {"capacity": 8, **tier}}
    dropping = _dropping(monkeypatch)
    # a fault in the first count, half an interval in
    failed = _fails_once(monkeypatch, "count_pending", "a count that fails")
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        online = store.warm.online
        with pytest.warns(RuntimeWarning, match="re-pin of the warm tier failed .a count that"):
            with online._counting:  # as a save copying the sketch holds it
                ids = list(range(5))  # one window, half an interval: the count fails
                assert torch.equal(store.lookup(ids), data[ids])
                assert dropping.wait(30)
                ids = list(range(20, 25))  # the interval ends while the drop waits
                assert torch.equal(store.lookup(ids), data[ids])
                assert online.due
            assert store.wait_repinned(timeout=10)
        assert failed.is_set() and online.repins == 1 and online.since_repin == 0


def test_a_count_that_fails_at_close_warns_and_the_store_closes_and_saves(tmp_path, monkeypatch):
    """close() counts the updates the re-pin thread left: a failure there (the faults that
    thread survives: a TypeError, no memory) raised out of close() before it closed the files,
    and every close() after failed on the same update, so the table and its locks stayed open.
    The updates are dropped with a warning, as the thread drops them, and close goes on."""

    path, data = make_table(tmp_path, rows=ROWS)
    cfg = config(path, restart=True)
    store = TieredStore(cfg)
    serve(store, data, batches(hot_set(), n=5))  # whole windows, each counted
    ids = torch.arange(4000, 4010)  # admitted mid-window: queued, the thread not woken
    assert torch.equal(store.lookup(ids), data[ids])
    assert store.warm.online.pending

    def fails(self, update):  # the next count fails
        raise TypeError("a count that fails")

    monkeypatch.setattr(OnlineRepin, "_run", fails)
    with pytest.warns(
        RuntimeWarning, match="warm tier: counting .* at close failed .TypeError: a count that"
    ):
        store.close()
    assert store._closed and not store.warm.online.pending
    monkeypatch.undo()
    with TieredStore(cfg) as again:  # the files were closed, and the save made
        assert again.wait_restored(timeout=30)
        assert set(range(4000, 4010)) <= set(again.warm.held_rows().tolist())


def test_a_drop_that_fails_at_close_too_still_saves_and_warns_of_uncommitted_writes(
    tmp_path, monkeypatch
):
    """close() drops the updates whose count failed; a failure there too (no memory for the
    slots to reset) raised out of close(): its warm-restart save was skipped and the rows written
    since the last commit were dropped without their UncommittedWritesWarning. It warns and goes
    on, as the re-pin thread does."""
    from tiered_store import UncommittedWritesWarning

    path, data = make_table(tmp_path, rows=ROWS)
    cfg = config(path, restart=True)
    store = TieredStore(cfg)
    serve(store, data, batches(hot_set(), n=5))
    ids = torch.arange(4000, 4010)  # admitted mid-window: queued, the thread not woken
    assert torch.equal(store.lookup(ids), data[ids])
    store.write(torch.tensor([7]), torch.ones(1, data.shape[1]))
    drop_pending = OnlineRepin.drop_pending

    def fails(self, update):  # the next count fails
        raise TypeError("a count that fails")

    def drops_then_fails(self):  # the queue emptied, then no memory to reset the slots
        drop_pending(self)
        raise torch.OutOfMemoryError("no memory for the slots")

    monkeypatch.setattr(OnlineRepin, "_run", fails)
    monkeypatch.setattr(OnlineRepin, "drop_pending", drops_then_fails)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        store.close()
    said = [str(w.message) for w in warned]
    assert any("dropping them failed too (OutOfMemoryError: no memory for" in m for m in said)
    assert any(issubclass(w.category, UncommittedWritesWarning) for w in warned), said
    assert store._closed
    monkeypatch.undo()
    with TieredStore(cfg) as again:  # the save was made
        assert again.wait_restored(timeout=30)
        assert set(range(4000, 4010)) <= set(again.warm.held_rows().tolist())


def test_warm_holds_no_pin_of_a_row_that_hot_pins(tmp_path):
    # hot serves every lookup of a row it pins, so warm never sees it again: a row warm had pinned
    # before hot pinned it stayed pinned there (its count high, so no re-pin took it out), a warm
    # slot that served nothing (41 of about 1,250 warm pins in this run)
    path, data = make_table(tmp_path, rows=50_000, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 2048, "repin": {"every": 2048}}
    tiers = {"hot": {"capacity": 500, **tier}, "warm": {"capacity": 2500, **tier}}
    work = zipf_batches(np.random.default_rng(3), 50_000, 400, 1024)
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        for ids in work:
            assert torch.equal(store.lookup(ids), data[ids])
            assert store.wait_repinned(timeout=30)
        hot_pins, warm_pins = store.hot.pinned_rows(), store.warm.pinned_rows()
        assert store.hot.online.repins > 100 and hot_pins.numel() and warm_pins.numel() > 1000
        assert not np.intersect1d(hot_pins.numpy(), warm_pins.numpy()).size


def test_a_warm_restart_leaves_the_rows_hot_pins_to_hot(tmp_path):
    # the restart saves no record of which rows warm leaves to hot: it brought back into warm the
    # rows hot pinned that warm held (with their counts), and warm's next re-pins pinned them
    # again, pinned in both (5 rows in this run), as if hot had never pinned them
    path, data = make_table(tmp_path, rows=ROWS)
    work = batches(hot_set(), n=50, seed=5)
    cfg = config(path, hot=60, warm=300, restart=True)
    with TieredStore(cfg) as store:
        serve(store, data, work[:10])
        hot_pins = store.hot.pinned_rows()
        held = hot_pins[store.warm.probe(hot_pins) >= 0]
        assert held.numel() and not store.warm.pin_flags()[store.warm.probe(held)].any()
    with TieredStore(cfg) as store:
        assert store.wait_restored(timeout=30)
        assert set(held.tolist()) <= set(store.warm.held_rows().tolist())  # back in warm
        serve(store, data, work[10:])
        assert store.warm.online.repins >= 3
        both = np.intersect1d(store.hot.pinned_rows().numpy(), store.warm.pinned_rows().numpy())
        assert not both.size


def test_a_warm_restart_that_fails_part_way_leaves_the_rows_hot_pins_to_hot(tmp_path, monkeypatch):
    # a restore stopped by a cold read error skipped what a finished one does last: warm kept the
    # rows hot pins that it had read back before the error, and re-pinned them (3 in this run)
    import tiered_store.store as store_module
    from tiered_store.table_format import read_manifest
    from tiered_store.warm_restart import load_restart, table_identity

    path, data = make_table(tmp_path, rows=ROWS, dim=1024)  # a page per row
    work = batches(hot_set(), n=50, seed=5)
    cfg = config(path, hot=60, warm=300, restart=True)
    with TieredStore(cfg) as store:
        serve(store, data, work[:10])
        hot_pins = store.hot.pinned_rows()
        held = hot_pins[store.warm.probe(hot_pins) >= 0]
        saved = load_restart(store.save_restart(), table_identity(store.cold, store.generation))
    # the most valuable row only warm's held rows list fails its checksum: read last, after the
    # less valuable ones (10 a step here), hot's pins among them
    only_warm = ~np.isin(
        saved.held["warm"], np.concatenate([*saved.pinned.values(), saved.held["hot"]])
    )
    bad = int(saved.held["warm"][only_warm][0])
    offset = read_manifest(path).data_offset + bad * 4096 + 10
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(store_module, "RESTORE_ORDERED_ROWS", 10)
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_BYTES", 10 * 1024 * 4)
    with pytest.warns(RestartWarning, match="reading the saved rows back .* failed"):
        store = TieredStore(cfg)
        assert store.wait_restored(timeout=30)
    with store:
        assert set(held.tolist()) & set(store.warm.held_rows().tolist())  # some back in warm
        serve(store, data, work[10:])
        assert store.warm.online.repins >= 3
        both = np.intersect1d(store.hot.pinned_rows().numpy(), store.warm.pinned_rows().numpy())
        assert not both.size


def test_a_warm_re_pin_planned_before_a_restore_left_hots_pins_to_hot_leaves_them(
    tmp_path, monkeypatch
):
    # warm's re-pin is planned off the lock: one planned just before a warm restore's thread left
    # hot's pins to hot, applied just after, pinned them in warm again (3 in this run), and as
    # warm's plans read those slots as hot's, no later re-pin of warm unpinned them
    from tiered_store.cache_plan import CacheHierarchy

    path, data = make_table(tmp_path, rows=ROWS)
    work = batches(hot_set(), n=80, seed=5)
    cfg = config(path, hot=60, warm=300, restart=True)
    with TieredStore(cfg) as store:
        serve(store, data, work[:10])
        hot_pins = store.hot.pinned_rows()
        assert (store.warm.probe(hot_pins) >= 0).any()
    landed, planned, left = threading.Event(), threading.Event(), threading.Event()
    warm: list[OnlineRepin] = []
    restore_chunk, plan = TieredStore._restore_chunk, OnlineRepin.plan
    leave = CacheHierarchy.leave_hot_pins_to_hot

    def chunk(self, cache, *args, **kwargs):  # warm's rows are back: wait for its plan
        done = restore_chunk(self, cache, *args, **kwargs)
        if cache is self.warm and not kwargs.get("pin"):
            landed.set()
            planned.wait(30)
        return done

    def planning(self, *args):  # warm's plan made: wait for the restore to leave hot's pins
        moves = plan(self, *args)
        if warm and self is warm[0] and landed.is_set() and not left.is_set():
            planned.set()
            left.wait(30)
        return moves

    def leaving(self):
        leave(self)
        left.set()

    monkeypatch.setattr(TieredStore, "_restore_chunk", chunk)
    monkeypatch.setattr(OnlineRepin, "plan", planning)
    monkeypatch.setattr(CacheHierarchy, "leave_hot_pins_to_hot", leaving)
    store = TieredStore(cfg)
    warm.append(store.warm.online)
    with store:
        assert landed.wait(30)
        for ids in work[10:40]:  # lookups until warm's interval is due and its plan made
            t = torch.from_numpy(ids)
            assert torch.equal(store.lookup(t), data[t])
            if planned.is_set():
                break
        assert planned.is_set() and store.wait_restored(timeout=30) and left.wait(30)
        serve(store, data, work[40:])
        assert store.warm.online.repins >= 3
        both = np.intersect1d(store.hot.pinned_rows().numpy(), store.warm.pinned_rows().numpy())
        assert not both.size


def test_a_plan_on_a_snapshot_older_than_a_row_the_tier_above_pins_still_leaves_it_out():
    # the store plans warm's re-pin on a snapshot taken off the lock: a row hot pins that a warm
    # restore brought back after the snapshot, and that was listed before the plan read it, showed
    # a free slot there, so the plan forgot it as a row warm no longer held, and warm's next
    # re-pin pinned it beside hot's pin
    none = torch.tensor([], dtype=torch.int64)
    repin = OnlineRepin(8, RepinConfig(every=2, budget=4), window=2)
    stale = torch.full((8,), -1)  # the tier as the snapshot shows it: nothing held yet
    repin.admitted(torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]), looked_up=False)
    for _ in range(3):  # row 5 (slot 0) counts the most
        repin.count(torch.tensor([0, 0, 1]), none, lookups=2)
    repin.pinned_above(torch.tensor([0]), torch.tensor([5]), released=none)  # hot pins row 5
    unpinned = torch.zeros(8, dtype=torch.bool)
    assert repin.plan(stale, unpinned).pin_rows.tolist() == []
    held = torch.tensor([5, 6, 7, -1, -1, -1, -1, -1])
    assert repin.plan(held, unpinned).pin_rows.tolist() == [6]  # 7 was never hit: no count
    # once row 5 left slot 0 (a fresh look at the tier under the lock), slot 0's row counts again
    repin.evicted(torch.tensor([0]), torch.tensor([5]))
    repin.admitted(torch.tensor([0]), torch.tensor([9]), looked_up=False)
    repin.count(torch.tensor([0, 0]), none, lookups=2)
    held[0] = 9
    repin.forget_above(held)
    assert repin.plan(held, unpinned).pin_rows.tolist() == [6, 9]


def test_a_re_pin_whose_drop_of_updates_fails_too_keeps_the_thread_re_pinning(
    tmp_path, monkeypatch
):
    """After a failed count the thread drops the tier's queued updates; a failure there too (no
    memory for the slots to reset) ended the thread: the tier never re-pinned again and lookups
    queued updates for it without end. It warns and goes on, the queue emptied."""

    path, data = make_table(tmp_path, rows=100, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 10, "budget": 1}}
    tiers = {"hot": {"capacity": 0}, "warm": {"capacity": 8, **tier}}
    drop_pending = OnlineRepin.drop_pending

    def drops_then_fails(self):  # the queue emptied, then no memory to reset the slots
        drop_pending(self)
        raise torch.OutOfMemoryError("no memory for the slots")

    failed = _fails_once(monkeypatch, "count_pending", "a count that fails")  # the first only
    monkeypatch.setattr(OnlineRepin, "drop_pending", drops_then_fails)
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        with pytest.warns(RuntimeWarning) as warned:
            for i in range(40):  # row 5 hot
                assert torch.equal(store.lookup([5] * 9 + [60 + i]), data[[5] * 9 + [60 + i]])
                assert store.wait_repinned(timeout=10)
        assert [str(w.message)[:60] for w in warned] == [
            "online re-pin of the warm tier failed (a count that fails); ",
            "online re-pin of the warm tier: dropping its updates after t",
        ]
        assert "(OutOfMemoryError: no memory for the slots)" in str(warned[1].message)
        online = store.warm.online
        assert failed.is_set() and online.repins > 0 and 5 in store.warm.pinned_rows()
        assert not online.pending


def test_a_failed_plan_keeps_the_updates_queued_since_its_count(tmp_path, monkeypatch):
    """After a failed re-pin the thread dropped every update queued so far, though a plan (or
    apply) that fails leaves the counting whole: the evictions and admissions lookups queued
    while it planned were lost, so a well-counted row evicted then kept only its misses' count
    in the sketch. Only a failed count drops its updates now."""

    path, data = make_table(tmp_path, rows=200, dim=4)
    tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 50, "budget": 1}}
    tiers = {"hot": {"capacity": 0}, "warm": {"capacity": 8, **tier}}
    go = threading.Event()
    # the first plan fails once the test's lookups are queued
    planning = _fails_once(monkeypatch, "plan", "a plan that fails", go)
    with TieredStore.open({"table": {"path": str(path)}, "tiers": tiers}) as store:
        online = store.warm.online
        with pytest.warns(RuntimeWarning, match="re-pin of the warm tier failed .a plan that"):
            for i in range(5):  # row 5 hit in five windows: an interval, its re-pin due
                ids = [5] * 9 + [60 + i]
                assert torch.equal(store.lookup(ids), data[ids])
            assert planning.wait(30)
            count = float(online.slot_count[store.warm.probe(torch.tensor([5]))[0]])
            assert count >= 4
            ids = list(range(100, 110))  # a window of other rows: row 5 evicted
            assert torch.equal(store.lookup(ids), data[ids])
            assert 5 not in store.warm.held_rows().tolist()
            go.set()
            assert store.wait_repinned(timeout=10)
        online.count_pending()
        assert float(online.profile.estimates(torch.tensor([5]))[0]) >= count - 1

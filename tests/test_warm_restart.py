"""Warm restart: the rows each tier held come back after a reopen; stale or corrupt files start cold."""

from __future__ import annotations

import signal
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import (
    assert_concurrent_lookups_exact,
    assert_lookups_go_on_during,
    make_table,
    resealed_restart,
)
from tiered_store import StoreConfig, TieredStore, create_table
from tiered_store import store as store_module
from tiered_store.warm_restart import (
    RestartWarning,
    load_restart,
    remove_abandoned_saves,
    restart_path,
    table_identity,
)
from tiered_store.workload import ZipfWorkload


def config(path, restart=None, hot=64, warm=512, hot_policy="lru", warm_policy="lru"):
    """Hot and warm tiers (LRU unless said) over ``path`` with warm restart on."""
    return StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {
                "hot": {"capacity": hot, "policy": hot_policy},
                "warm": {"capacity": warm, "policy": warm_policy},
                "restart": restart or {"enabled": True},
            },
        }
    )


def held(store) -> dict[str, set[int]]:
    """Row ids each tier holds now."""
    return {c.name: set(c.held_rows().tolist()) for c in (store.hot, store.warm)}


def serve(store, data, batches=20, seed=1) -> None:
    """Zipf lookups, each checked against the table."""
    workload = ZipfWorkload(data.shape[0], 1.0, seed=seed)
    for _ in range(batches):
        ids = torch.from_numpy(workload.sample(300))
        assert torch.equal(store.lookup(ids), data[ids])


def test_restart_restores_exactly_the_rows_held(tmp_path):
    path, data = make_table(tmp_path)
    with TieredStore(config(path)) as store:
        serve(store, data)
        store.lookup(torch.tensor([4321]))  # now the most recently used row of hot
        before, order = held(store), store.hot.held_rows()
    assert restart_path(path).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RestartWarning)
        with TieredStore(config(path)) as store:
            assert store.wait_restored(timeout=30)
            assert held(store) == before
            assert len(before["hot"]) == 64 and len(before["warm"]) == 512
            assert store.stats()["hot"]["preloaded"] == 64
            assert store.restore_seconds is not None
            assert order[0] == 4321
            serve(store, data, seed=2)
            assert store.stats()["hot"]["hits"] > 0


def test_saved_order_is_most_valuable_first(tmp_path):
    path, data = make_table(tmp_path)
    with TieredStore(config(path)) as store:
        for row in (10, 20, 30, 20):
            store.lookup(torch.tensor([row]))
        assert store.hot.held_rows()[:3].tolist() == [20, 30, 10]


def test_lookups_during_restore_are_exact(tmp_path, monkeypatch):
    path, data = make_table(tmp_path, rows=60_000, dim=8)
    with TieredStore(config(path, hot=2_000, warm=40_000)) as store:
        for start in range(0, 40_000, 4_000):  # fill warm with rows 0..39,999
            store.lookup(torch.arange(start, start + 4_000))
        before = held(store)
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 500)  # many small steps
    with TieredStore(config(path, hot=2_000, warm=40_000)) as store:
        assert_concurrent_lookups_exact(store, data, batch=2_000, rounds=10, threads=3)
        assert store.wait_restored(timeout=60)
        after = held(store)
        # rows lookups admitted meanwhile may take free slots first; the saved rows fill the rest
        assert len(after["warm"]) == 40_000
        assert len(after["warm"] & before["warm"]) > 20_000
        assert_concurrent_lookups_exact(store, data, batch=2_000, rounds=3, threads=2)


def test_stale_file_warns_and_starts_cold(tmp_path):
    path, data = make_table(tmp_path)
    with TieredStore(config(path)) as store:
        serve(store, data)
    new = torch.from_numpy(np.random.default_rng(9).standard_normal(tuple(data.shape))).float()
    create_table(path, new, progress=False, overwrite=True)  # another table at the same path
    with pytest.warns(
        RestartWarning,
        match=r"table_5000x16_float32\.npy\.restart.*another table version.*block_checksums",
    ):
        store = TieredStore(config(path))
    with store:
        assert store.wait_restored(timeout=5)
        assert store.hot.occupancy == store.warm.occupancy == 0
        serve(store, new)


def test_a_file_with_a_field_the_table_lacks_names_it(tmp_path):
    from tiered_store.warm_restart import RestartState, load_restart, save_restart

    path = tmp_path / "t.npy.restart"
    saved = {"generation": 0, "rows": 10, "block_checksums_crc32c": 7}
    save_restart(path, saved, RestartState({"hot": np.array([1])}))
    with pytest.warns(
        RestartWarning, match=r"version: block_checksums_crc32c 7 \(table now None\)"
    ):
        assert load_restart(path, {"generation": 0, "rows": 10}) is None


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:-9], "checksum mismatch"),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checksum mismatch"),
        (lambda b: b"", "not a warm-restart file"),
        (lambda b: b"garbage" * 9, "not a warm-restart file"),
        # a later release's file (its own checksum holds) was called no warm-restart file at all
        (
            lambda b: resealed_restart(b"TSRESTART3\n" + b[11:-4]),
            r"newer format \(TSRESTART3; expected",
        ),
        (
            lambda b: resealed_restart(b"TSRESTART1\n" + b[11:-4]),
            r"older format \(TSRESTART1; expected",
        ),
        # a bit flipped in this format's digit was said to be a newer format: it is corrupt
        (
            lambda b: b"TSRESTART3\n" + b[11:],
            r"checksum mismatch \(its magic reads TSRESTART3.*corrupt",
        ),
        (lambda b: b"TSRESTART6\n" + b[11:-9], r"checksum mismatch .*corrupt or truncated"),
    ],
    ids=[
        "truncated",
        "bit-flip",
        "empty",
        "garbage",
        "newer-format",
        "older-format",
        "format-digit-flip",
        "truncated-format-digit-flip",
    ],
)
def test_corrupt_file_warns_and_starts_cold(tmp_path, damage, why):
    path, data = make_table(tmp_path)
    with TieredStore(config(path)) as store:
        serve(store, data)
    saved = restart_path(path)
    saved.write_bytes(damage(saved.read_bytes()))
    with pytest.warns(RestartWarning, match=rf"{saved.name}.*{why}") as got:
        store = TieredStore(config(path))
    assert got[0].filename == __file__  # the warning points at the open, not a library line
    with store:
        assert store.wait_restored(timeout=5)
        assert store.warm.occupancy == 0
        serve(store, data)


def test_written_rows_survive_a_restart(tmp_path):
    path, data = make_table(tmp_path)
    ids = torch.arange(100, 140)
    with TieredStore(config(path)) as store:
        store.lookup(ids)  # cached in both tiers, then written: dirty in place
        committed = torch.full((40, 16), 7.0)
        store.write(ids, committed)
        store.commit()
        store.write(ids[:10], torch.full((10, 16), -1.0))  # never committed: dropped on close
        now = data.clone()
        now[ids], now[ids[:10]] = committed, -1.0
        serve(store, now, batches=3)
        assert held(store)["warm"] & set(ids.tolist())
    expect = data.clone()
    expect[ids] = committed
    with TieredStore(config(path)) as store:
        assert store.wait_restored(timeout=30)
        assert set(ids.tolist()) & (held(store)["warm"] | held(store)["hot"])
        assert torch.equal(store.lookup(ids), committed)
        serve(store, expect, seed=3)


def _trained_restart(tmp_path):
    """A table whose 1,000 even rows of 0..1,999 a commit wrote (ones), the 2,000 rows saved as
    the warm tier's; returns (config, the table's rows now)."""
    path, data = make_table(tmp_path, rows=10_000, dim=8)
    cfg = config(path, hot=0, warm=2_000)
    with TieredStore(cfg) as store:
        store.lookup(torch.arange(2_000))
        store.write(torch.arange(0, 2_000, 2), torch.ones(1_000, 8))
        store.commit()
    now = data.clone()
    now[0:2_000:2] = 1.0
    return cfg, now


def _in_the_restore(monkeypatch, then):
    """Run ``then()`` where the restore thread reads the delta (after the read), once."""
    from tiered_store.delta.row_delta import RowDelta

    snapshot = RowDelta.snapshot

    def read_then(self, ids):
        found = snapshot(self, ids)
        if threading.current_thread().name == "restore" and not then.done:
            then.done = True
            then()
        return found

    then.done = False
    monkeypatch.setattr(RowDelta, "snapshot", read_then)


def test_lookups_go_on_while_a_restore_reads_the_delta(tmp_path, monkeypatch):
    """The restore reads the delta's rows of each step off the store's lock: under it, a delta
    of 1M rows (a trained table not yet compacted) held every lookup 3.4 s."""
    cfg, now = _trained_restart(tmp_path)
    reading, looked_up = threading.Event(), threading.Event()
    waits = []

    def wait_for_a_lookup():
        reading.set()
        waits.append(looked_up.wait(10))  # a lookup runs meanwhile: it needs the store's lock

    _in_the_restore(monkeypatch, wait_for_a_lookup)
    with TieredStore(cfg) as store:
        assert reading.wait(30)
        assert torch.equal(store.lookup(torch.tensor([9_999, 0])), now[[9_999, 0]])
        looked_up.set()
        assert store.wait_restored(timeout=30)
        assert waits == [True]
        assert store.warm.occupancy == 2_000
        assert torch.equal(store.lookup(torch.arange(10_000)), now)


def test_a_commit_between_a_restores_delta_read_and_its_landing_is_not_lost(tmp_path, monkeypatch):
    """A commit after the restore read the delta's rows (off the lock) and before they land:
    they are read again under the lock, so the rows it committed land (pending before, they are
    in the delta alone by then)."""
    cfg, now = _trained_restart(tmp_path)
    written = torch.tensor([0, 1])  # a row the delta held, and one it did not
    reading, committed = threading.Event(), threading.Event()
    _in_the_restore(monkeypatch, lambda: (reading.set(), committed.wait(10)))
    now[written] = 7.0
    with TieredStore(cfg) as store:
        assert reading.wait(30)
        store.write(written, torch.full((2, 8), 7.0))
        store.commit()
        committed.set()
        assert store.wait_restored(timeout=30)
        assert store.warm.occupancy == 2_000
        assert set(written.tolist()) <= set(store.warm.held_rows().tolist())
        assert torch.equal(store.lookup(torch.arange(10_000)), now)


def test_a_restores_delta_read_holds_a_pinned_view_for_one_slice_at_a_time(tmp_path, monkeypatch):
    """A store over a table with a delta pins one commit, whose read transaction one thread at a
    time may use: the restore's off-lock read of a whole step's delta rows (one transaction)
    held every lookup needing a delta row (it waits under the store's lock) as long (345 ms of
    a 530 ms read, 300K delta rows). It reads ``DELTA_READ_ROWS`` rows per transaction."""
    from tiered_store.delta import write_back
    from tiered_store.delta.row_delta import RowDelta

    cfg, now = _trained_restart(tmp_path)
    monkeypatch.setattr(write_back, "DELTA_READ_ROWS", 100, raising=False)
    snapshot, sizes, looked_up, opened = RowDelta.snapshot, [], [], []
    open_returned = threading.Event()  # the restore starts inside the open, before ``store`` is

    def read(self, ids):
        assert self._pinned is not None  # a reader's view (the writer closed)
        if threading.current_thread().name == "restore":
            sizes.append(len(ids))
            if len(sizes) == 1 and open_returned.wait(30):  # between two of its reads, a lookup
                got = threading.Thread(target=lambda: looked_up.append(opened[0].lookup([1_998])))
                got.start()
                got.join(10)
        return snapshot(self, ids)

    monkeypatch.setattr(RowDelta, "snapshot", read)
    with TieredStore(cfg) as store:
        opened.append(store)
        open_returned.set()
        assert store.wait_restored(timeout=30)
        assert sum(sizes) == 1_000 and max(sizes) <= 100, sizes
        assert len(looked_up) == 1 and torch.equal(looked_up[0], now[[1_998]])
        assert torch.equal(store.lookup(torch.arange(10_000)), now)


def test_off_by_default_and_periodic_save(tmp_path):
    path, data = make_table(tmp_path)
    off = StoreConfig.from_dict(
        {"table": {"path": str(path)}, "tiers": {"warm": {"capacity": 100}}}
    )
    with TieredStore(off) as store:
        serve(store, data, batches=2)
    assert not restart_path(path).exists()
    with TieredStore(config(path, {"enabled": True, "save_every_s": 0.05})) as store:
        serve(store, data, batches=2)
        deadline = time.monotonic() + 10
        while not restart_path(path).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert restart_path(path).exists()


def test_lookups_go_on_while_a_save_ranks_the_rows_held(tmp_path, monkeypatch):
    # ranking a tier's rows is a sort of every slot (0.3-0.7 s at 4M slots): a periodic save
    # must not hold the store's lock through it, or every lookup stalls that long
    path, data = make_table(tmp_path)
    ranking, go_on = threading.Event(), threading.Event()
    rank = store_module.most_valuable_first

    def held_up(row_of_slot, priority):
        ranking.set()
        go_on.wait(30)
        return rank(row_of_slot, priority)

    with TieredStore(config(path)) as store:
        serve(store, data, batches=2)
        monkeypatch.setattr(store_module, "most_valuable_first", held_up)
        assert_lookups_go_on_during(store, data, store.save_restart, ranking, go_on)
        monkeypatch.undo()
        before = held(store)  # close saves them
    with TieredStore(config(path)) as store:
        assert store.wait_restored(timeout=30)
        assert held(store) == before


def test_lookups_go_on_while_a_save_computes_the_lru_keys(tmp_path, monkeypatch):
    # the keys of an LRU tier's slots (last use x capacity + slot) took 13 ms of arithmetic at
    # 4M slots under the store's lock, most of a save's lookup stall: only last_used is copied
    # there now (bench/bench_save_stall.py)
    from policies import lru

    path, data = make_table(tmp_path)
    computing, go_on = threading.Event(), threading.Event()
    keys = lru._keys

    def held_up(last_used):
        if last_used.numel() == 512:  # the warm tier's, for the save (not an eviction's)
            computing.set()
            go_on.wait(30)
        return keys(last_used)

    with TieredStore(config(path)) as store:
        serve(store, data, batches=2)
        monkeypatch.setattr(lru, "_keys", held_up)
        assert_lookups_go_on_during(store, data, store.save_restart, computing, go_on)


def test_a_save_taken_before_another_never_replaces_its_file(tmp_path, monkeypatch):
    # a periodic save ranks its rows outside the lock: one still ranking when a later save
    # (close's) writes must not land its older rows over the later file
    path, data = make_table(tmp_path)
    ranking, go_on = threading.Event(), threading.Event()
    rank = store_module.most_valuable_first

    def first_held_up(row_of_slot, priority):
        if not ranking.is_set():
            ranking.set()
            go_on.wait(30)
        return rank(row_of_slot, priority)

    with TieredStore(config(path)) as store:
        serve(store, data, batches=2)
        monkeypatch.setattr(store_module, "most_valuable_first", first_held_up)
        earlier = threading.Thread(target=store.save_restart)
        earlier.start()
        try:
            assert ranking.wait(30)
            store.lookup(torch.tensor([4321]))  # only the later save sees it
            store.save_restart()
        finally:
            go_on.set()
            earlier.join()
        saved = load_restart(restart_path(path), table_identity(store.cold, store.generation))
        assert saved.held["hot"][0] == 4321


def test_close_during_restore_stops_it_and_keeps_the_saved_rows(tmp_path, monkeypatch):
    path, data = make_table(tmp_path, rows=60_000, dim=8)
    with TieredStore(config(path, hot=0, warm=40_000)) as store:
        store.lookup(torch.arange(40_000))
        saved = store.warm.held_rows()
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 100)
    store = TieredStore(config(path, hot=0, warm=40_000))
    store.lookup(torch.arange(50_000, 50_010))  # admitted by a lookup: the newest rows
    store.close()  # at once: the restore stops after its current chunk
    assert store.restore_seconds is not None
    assert store.warm.occupancy < 40_000  # it did stop part way
    with TieredStore(config(path, hot=0, warm=40_000)) as again:
        # what it was given, read back or not, behind the rows lookups admitted meanwhile
        assert again.wait_restored(timeout=60)
        order = again.warm.held_rows()
        assert set(order[:10].tolist()) == set(range(50_000, 50_010))
        assert torch.equal(order[10:], saved[:-10])
        ids = torch.randint(0, 60_000, (5_000,))
        assert torch.equal(again.lookup(ids), data[ids])


@pytest.mark.parametrize("policy", ["lru", "sieve"])
def test_rows_lookups_admit_during_a_restore_displace_the_least_valuable(
    tmp_path, monkeypatch, policy
):
    path, data = make_table(tmp_path, rows=10_000, dim=8)
    cfg = config(path, hot=0, warm=1_000, warm_policy=policy)
    with TieredStore(cfg) as store:
        for row in range(1_000):
            store.lookup(torch.tensor([row]))
        saved = store.warm.held_rows().tolist()  # most valuable first, by the policy
    assert sorted(saved) == list(range(1_000))
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 100)  # LRU: ten steps
    monkeypatch.setattr(store_module, "RESTORE_ORDERED_ROWS", 100)  # the others: ten steps
    steps = store_module.TieredStore._restore_steps

    def steps_after_lookups(self, n, **kwargs):
        """Lookups of other rows land as the warm tier's restore starts, as serving goes on."""
        if n:  # the warm tier's rows (hot has none)
            assert torch.equal(self.lookup(torch.arange(5_000, 5_200)), data[5_000:5_200])
        return steps(self, n, **kwargs)

    monkeypatch.setattr(store_module.TieredStore, "_restore_steps", steps_after_lookups)
    with TieredStore(cfg) as store:
        assert store.wait_restored(timeout=60)
        now = set(store.warm.held_rows().tolist())
    assert now == set(saved[:800]) | set(range(5_000, 5_200))


def on_cuda(cfg):
    """``cfg`` with its hot tier on the GPU."""
    hot = cfg.tiers.hot.model_copy(update={"device": "cuda"})
    return cfg.model_copy(update={"tiers": cfg.tiers.model_copy(update={"hot": hot})})


@pytest.mark.gpu
def test_restart_with_the_hot_tier_on_cuda(tmp_path, monkeypatch):
    path, data = make_table(tmp_path, rows=60_000, dim=8)
    cfg = on_cuda(config(path, hot=4_000, warm=20_000))
    with TieredStore(cfg) as store:
        for start in range(0, 20_000, 2_000):
            store.lookup(torch.arange(start, start + 2_000))
        before = held(store)
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 500)
    with TieredStore(cfg) as store:
        assert store.wait_restored(timeout=60)
        assert held(store) == before
        ids = torch.arange(16_000, 20_000)
        assert torch.equal(store.lookup(ids).cpu(), data[ids])
    with TieredStore(cfg) as store:  # lookups while the rows come back
        assert_concurrent_lookups_exact(store, data, batch=2_000, rounds=5, threads=2)
        assert store.wait_restored(timeout=60)


@pytest.mark.gpu
def test_a_save_ranks_a_cuda_tiers_rows_once_the_stores_stream_copied_them(tmp_path):
    # the save copies the hot tier's slots on the store's stream, under the lock, and ranks them
    # after letting it go: on the saving thread's own stream it would read the copies unmade
    path, data = make_table(tmp_path, rows=60_000, dim=8)
    with TieredStore(on_cuda(config(path, hot=4_000, warm=20_000))) as store:
        for start in range(0, 20_000, 2_000):
            store.lookup(torch.arange(start, start + 2_000))
        torch.cuda.synchronize()
        want = store.hot.held_rows().cpu().numpy()
        with torch.cuda.stream(store._stream):  # busy: the copies queued after it land late
            torch.cuda._sleep(500_000_000)  # clock cycles, a few tenths of a second
        store.save_restart()
        saved = load_restart(restart_path(path), table_identity(store.cold, store.generation))
        np.testing.assert_array_equal(saved.held["hot"], want)


def test_restored_lru_order_follows_the_saved_rank(tmp_path, monkeypatch):
    path, data = make_table(tmp_path, rows=60_000, dim=8)
    order = torch.from_numpy(np.random.default_rng(3).permutation(60_000)[:2_000])
    with TieredStore(config(path, hot=0, warm=2_000)) as store:
        for start in range(0, 2_000, 100):  # 20 batches: a known recency order
            store.lookup(order[start : start + 100])
        saved = store.warm.held_rows()
    assert torch.equal(torch.sort(saved[:100]).values, torch.sort(order[-100:]).values)
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 300)  # 7 steps, each row with its rank
    with TieredStore(config(path, hot=0, warm=2_000)) as store:
        assert store.wait_restored(timeout=60)
        assert torch.equal(store.warm.held_rows(), saved)  # the same rank, row for row
        fresh = torch.from_numpy(np.setdiff1d(np.arange(60_000), order.numpy())[:500])
        assert torch.equal(store.lookup(fresh), data[fresh])
        # the 500 least valuable saved rows went first; the 500 new rows are now the most recent
        assert set(store.warm.held_rows().tolist()) == set(saved[:1_500].tolist()) | set(
            fresh.tolist()
        )
        assert torch.equal(store.warm.held_rows()[500:], saved[:1_500])


@pytest.mark.parametrize("policy", ["sieve", "lfu"])
def test_policies_without_saved_ranks_restore_the_rows_held(tmp_path, policy):
    path, data = make_table(tmp_path)
    with TieredStore(config(path, hot_policy=policy)) as store:
        serve(store, data)
        before = held(store)
    with TieredStore(config(path, hot_policy=policy)) as store:
        assert not store.hot.eviction.restores_order
        assert store.wait_restored(timeout=30)
        assert held(store) == before
        serve(store, data, seed=2)


@pytest.mark.parametrize("policy", ["sieve", "fifo", "lfu"])
def test_policies_without_saved_ranks_restore_a_step_least_valuable_first(tmp_path, policy):
    """A step of the restore (every row of a tier under 64Ki rows) went in sorted by row id: a
    sieve, fifo or lfu tier filled newest row first came back in the opposite order, and the
    first misses after the restart evicted its most valuable rows. Rows join in their saved
    order now, least valuable first: the tier evicts what it would have before."""
    path, data = make_table(tmp_path)
    with TieredStore(config(path, hot=0, warm=8, warm_policy=policy)) as store:
        for row in range(7, -1, -1):  # row 7 the oldest, 0 the newest
            store.lookup(torch.tensor([row]))
        saved = store.warm.held_rows()
    assert saved.tolist() == list(range(8))  # most valuable first
    with TieredStore(config(path, hot=0, warm=8, warm_policy=policy)) as store:
        assert store.wait_restored(timeout=30)
        assert torch.equal(store.warm.held_rows(), saved)
        fresh = torch.tensor([50, 51])
        assert torch.equal(store.lookup(fresh), data[fresh])
        assert sorted(store.warm.held_rows().tolist()) == [0, 1, 2, 3, 4, 5, 50, 51]


@pytest.mark.parametrize("waits_for", ["hot", "all"])
def test_open_can_wait_for_the_hot_tier_or_the_whole_restore(tmp_path, monkeypatch, waits_for):
    path, data = make_table(tmp_path)
    restart = {"enabled": True, "open_waits_for": waits_for}
    with TieredStore(config(path, restart=restart)) as store:  # no file yet: opens at once
        assert store.restore_seconds is None
        serve(store, data)
        before = held(store)
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 50)  # the warm tier in many steps
    with TieredStore(config(path, restart=restart)) as store:
        assert held(store)["hot"] == before["hot"]  # back before open returned, no lookup yet
        if waits_for == "all":
            assert held(store)["warm"] == before["warm"] and store.restore_seconds is not None
        assert store.wait_restored(timeout=30)
        assert held(store) == before
        serve(store, data, seed=2)


def test_a_save_writes_the_documented_layout_whatever_arrays_it_is_given(tmp_path):
    # written part by part from the arrays' memory (9f37a52), a sketch with no counters (shape
    # (2, 0)) failed with memoryview's "cannot cast view with zeros in shape or strides"
    import json
    import struct

    import crc32c

    from tiered_store.warm_restart import MAGIC, RestartState, save_restart

    ident = {"generation": 0, "rows": 100}
    held = {"hot": np.arange(20, dtype=">i8")[::3], "warm": np.zeros(0, np.int32)}
    pinned = {"hot": np.array(6)}  # 0-d
    sketches = {"hot": np.zeros((2, 0), np.float64), "warm": np.arange(6.0).reshape(2, 3).T}
    profiles = {k: ({"windows": 1}, s) for k, s in sketches.items()}
    path = tmp_path / "t.npy.restart"
    save_restart(path, ident, RestartState(held, pinned, profiles))
    header = {
        "identity": ident,
        "tiers": {"hot": 7, "warm": 0},
        "pinned": {"hot": 1},
        "profiles": {k: {"windows": 1, "shape": list(s.shape)} for k, s in sketches.items()},
    }
    raw = json.dumps(header).encode()
    body = b"".join(
        [MAGIC, struct.pack("<I", len(raw)), raw]
        + [np.asarray(v, "<i8").tobytes() for v in (*held.values(), *pinned.values())]
        + [np.asarray(s, "<f4").tobytes() for s in sketches.values()]
    )
    assert path.read_bytes() == body + struct.pack("<I", crc32c.crc32c(body))
    back = load_restart(path, ident)
    assert back.held["hot"].tolist() == list(range(0, 20, 3)) and back.pinned["hot"].tolist() == [6]
    assert back.profiles["hot"][1].shape == (2, 0)
    assert back.profiles["warm"][1].tolist() == sketches["warm"].tolist()


def test_a_well_checksummed_file_with_a_malformed_header_starts_cold(tmp_path):
    import json
    import struct

    import crc32c

    from tiered_store.warm_restart import MAGIC, table_identity

    path, data = make_table(tmp_path, rows=3000, dim=8)
    saved = restart_path(path)
    with TieredStore(config(path, hot=16, warm=64)) as store:
        ident = table_identity(store.cold, store.generation)  # past the identity check
    for header, why in [
        ({"identity": [1], "tiers": {}, "pinned": {}, "profiles": {}}, "header is unreadable"),
        (
            {"identity": {}, "tiers": {"warm": -1}, "pinned": {}, "profiles": {}},
            "header is unreadable",
        ),
        ('{"identity": ' + "[" * 100_000 + "]" * 100_000 + "}", "header is unreadable"),
        # a row count of Infinity (OverflowError), and sketch shapes whose size wraps round in
        # int64 or does not fit numpy: these crashed the open
        (
            {"identity": ident, "tiers": {"warm": float("inf")}, "pinned": {}, "profiles": {}},
            "header is unreadable",
        ),
        *(
            (
                {"identity": ident, "tiers": {}, "pinned": {}, "profiles": {"warm": {"shape": s}}},
                "header is unreadable",
            )
            for s in ([1 << 40, 1 << 40], [0, 1 << 70], [2, 2, 0])
        ),
    ]:
        raw = (header if isinstance(header, str) else json.dumps(header)).encode()
        body = MAGIC + struct.pack("<I", len(raw)) + raw
        saved.write_bytes(body + struct.pack("<I", crc32c.crc32c(body)))
        with pytest.warns(RestartWarning, match=rf"{saved.name} not used, its {why}"):
            store = TieredStore(config(path, hot=16, warm=64))
        with store:
            assert store.wait_restored(timeout=5) and store.warm.occupancy == 0
            serve(store, data)


@pytest.mark.parametrize("others", [0, 150])
def test_lookups_of_saved_rows_during_a_restore_take_no_saved_rows_room(
    tmp_path, monkeypatch, others
):
    """Lookups at a restart ask for the saved, popular rows: those need no slot of their own, so
    the saved rows fill every slot other rows did not take, most valuable first (a cut to the
    free slots left 200 of them cold; a step's cut counting held rows left 50 slots empty)."""
    path, data = make_table(tmp_path, rows=10_000, dim=8)
    cfg = config(path, hot=0, warm=1_000)
    with TieredStore(cfg) as store:
        for row in range(1_000):
            store.lookup(torch.tensor([row]))
        saved = store.warm.held_rows().tolist()
    monkeypatch.setattr(store_module, "RESTORE_CHUNK_ROWS", 100)
    steps = store_module.TieredStore._restore_steps
    asked = torch.tensor([*range(5_000, 5_000 + others), *saved[: 200 - others]])

    def steps_after_lookups(self, n, **kwargs):
        if n:  # other rows and the most valuable saved ones, as the warm tier's restore starts
            assert torch.equal(self.lookup(asked), data[asked])
        return steps(self, n, **kwargs)

    monkeypatch.setattr(store_module.TieredStore, "_restore_steps", steps_after_lookups)
    with TieredStore(cfg) as store:
        assert store.wait_restored(timeout=60)
        held_now = set(store.warm.held_rows().tolist())
    assert held_now == set(saved[: 1_000 - others]) | set(range(5_000, 5_000 + others))


def test_after_a_failed_restore_saves_list_what_the_tiers_hold(tmp_path):
    """A restore that stops on a cold read error (a page failing its checksum): later saves list
    the rows the tiers hold (they listed the old saved rows, for the rest of the store's life)."""
    from tiered_store.table_format import read_manifest
    from tiered_store.warm_restart import load_restart, table_identity

    path, data = make_table(tmp_path, rows=20_000, dim=8)
    cfg = config(path, hot=0, warm=1_000)
    with TieredStore(cfg) as store:
        store.lookup(torch.arange(1_000))
    offset = read_manifest(path).data_offset + 10  # row 0's page fails its checksum now
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(RestartWarning, match="reading the saved rows back .* failed"):
        store = TieredStore(cfg)
        assert store.wait_restored(timeout=30)
    with store:
        store.lookup(torch.arange(5_000, 6_000))  # serving goes on: the tier fills anew
        held_now = set(store.warm.held_rows().tolist())
        saved = load_restart(store.save_restart(), table_identity(store.cold, store.generation))
    assert set(saved.held["warm"].tolist()) == held_now == set(range(5_000, 6_000))


def test_a_save_that_fails_with_any_error_warns_and_saving_goes_on(tmp_path, monkeypatch):
    """Only OSError and TieredStoreError were caught: any other failure of a save (no memory for
    its copies) ended the periodic save thread, with no warning (no save after it), and raised
    out of close() before it closed the files (the writer lock held). Each is now a warning."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    cfg = config(path, hot=0, warm=100, restart={"enabled": True, "save_every_s": 0.01})
    rows_to_save, failures = store_module._rows_to_save, []

    def no_memory(*args):  # the first save fails, and the save on close
        if not failures or threading.current_thread() is threading.main_thread():
            failures.append(threading.current_thread().name)
            raise MemoryError("no memory for the save's copy")
        return rows_to_save(*args)

    monkeypatch.setattr(store_module, "_rows_to_save", no_memory)
    store = TieredStore(cfg)
    with pytest.warns(
        RestartWarning, match="periodic save failed .MemoryError: no memory for the save"
    ):
        serve(store, data, batches=2)
        deadline = time.monotonic() + 10
        while not restart_path(path).exists():  # the next periodic save
            assert time.monotonic() < deadline, failures
            time.sleep(0.01)
    assert failures[0] == "save"
    with pytest.warns(RestartWarning, match="could not save .*no memory for the save's copy"):
        store.close()
    assert store.closed and failures[-1] == "MainThread"
    monkeypatch.undo()
    with TieredStore(cfg) as again:  # the writer lock went with the store
        again.write([2], torch.ones(1, 4))
        again.commit()


def test_a_failed_save_on_close_names_the_earlier_save_the_next_open_restores(
    tmp_path, monkeypatch
):
    """A save on close that failed warned that 'the next open starts cold', but the file an
    earlier save made (a periodic one, or the last close's) stays, and the next open restores its
    rows. The warning now says so (if that file is intact and of this table version); 'starts
    cold' only where there is no such file."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    cfg = config(path, hot=0, warm=100)

    def no_memory(*args):
        raise MemoryError("no memory for the save's copy")

    with TieredStore(cfg) as store:
        serve(store, data, batches=2)
        first = held(store)["warm"]
    store = TieredStore(cfg)
    assert store.wait_restored(timeout=30)
    store.lookup(torch.arange(900, 1000))  # other rows than the saved ones
    monkeypatch.setattr(store_module, "_rows_to_save", no_memory)
    with pytest.warns(
        RestartWarning,
        match="could not save .*; the file is left as it was: the next open restores it",
    ):
        store.close()
    monkeypatch.undo()
    with TieredStore(cfg) as again:
        assert again.wait_restored(timeout=30)
        assert held(again)["warm"] == first
    restart_path(path).unlink()
    store = TieredStore(cfg)
    monkeypatch.setattr(store_module, "_rows_to_save", no_memory)
    with pytest.warns(RestartWarning, match="could not save .*; the next open starts cold"):
        store.close()


def test_a_failed_save_on_close_over_a_corrupt_file_does_not_promise_its_rows(
    tmp_path, monkeypatch
):
    # the warning said "the next open restores its last save" whenever a file was there, though
    # the file the store found corrupt at its open (it started cold) stays corrupt
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    cfg = config(path, hot=0, warm=100)
    restart_path(path).write_bytes(b"garbage" * 9)

    def no_memory(*args):
        raise MemoryError("no memory for the save's copy")

    with pytest.warns(RestartWarning, match="not a warm-restart file"):
        store = TieredStore(cfg)
    serve(store, data, batches=2)
    monkeypatch.setattr(store_module, "_rows_to_save", no_memory)
    with pytest.warns(RestartWarning, match="could not save") as warned:
        store.close()
    said = str(warned[-1].message)
    assert "restores its last save" not in said
    assert "the file is left as it was: the next open restores it only if it is intact" in said
    monkeypatch.undo()
    with pytest.warns(RestartWarning, match="not a warm-restart file"):
        TieredStore(cfg).close()


def test_a_save_on_close_interrupted_propagates_and_the_store_still_closes(tmp_path, monkeypatch):
    """A KeyboardInterrupt (or SystemExit) in the save on close is no save failure to warn of: it
    propagates. It also left the store half closed: every call refused, yet ``closed`` False,
    the table file open and the writer lock held (a writer opening the table was refused) until
    close() was called again. The files now close on the way out."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    cfg = config(path, hot=0, warm=100)

    def interrupted(*args):  # Ctrl-C during the save's copies
        raise KeyboardInterrupt

    store = TieredStore(cfg)
    serve(store, data, batches=2)
    store.write([1], torch.ones(1, 4))  # the writer lock taken
    store.commit()
    monkeypatch.setattr(store_module, "_rows_to_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    assert store.closed
    monkeypatch.undo()
    with TieredStore(cfg) as again:  # the writer lock went with the store
        again.write([2], torch.ones(1, 4))
        again.commit()


def test_a_save_that_fails_with_a_programming_error_names_its_type(tmp_path, monkeypatch):
    """Every error of a save is a warning since saves go on after any: one whose text alone says
    nothing (a KeyError's key, a bug's) warned 'periodic save failed ('warm')', naming no error
    at all. The warnings name the error's type."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    cfg = config(path, hot=0, warm=100, restart={"enabled": True, "save_every_s": 0.01})

    def a_bug(*args):
        raise KeyError("warm")

    monkeypatch.setattr(store_module, "_rows_to_save", a_bug)
    store = TieredStore(cfg)
    with pytest.warns(RestartWarning, match=r"periodic save failed \(KeyError: 'warm'\)") as got:
        serve(store, data, batches=2)
        deadline = time.monotonic() + 10
        while not got.list:  # a periodic save
            assert time.monotonic() < deadline
            time.sleep(0.01)
    with pytest.warns(RestartWarning, match=r"could not save .* \(KeyError: 'warm'\)"):
        store.close()


def test_a_save_on_close_that_cannot_read_the_version_pointer_warns_and_closes(tmp_path):
    """The save checks the table's version pointer (TABLE.npy.current); unreadable there (a
    disk error, or a file compaction did not write), close() raised TableFormatError and left
    the store open: its writer lock held, so no store in the process could write the table."""
    path, data = make_table(tmp_path, rows=1_000, dim=4)
    cfg = config(path, hot=0, warm=100, restart={"enabled": True, "save_every_s": 0.01})
    store = TieredStore(cfg)
    store.write([1], torch.ones(1, 4))
    store.commit()
    pointer = tmp_path / f"{path.name}.current"
    pointer.write_bytes(b"")
    with warnings.catch_warnings(record=True) as got:  # periodic saves warn (the thread died)
        warnings.simplefilter("always")
        deadline = time.monotonic() + 10
        while not [w for w in got if "periodic save failed" in str(w.message)]:
            assert time.monotonic() < deadline, [str(w.message) for w in got]
            time.sleep(0.01)
    with pytest.warns(
        RestartWarning, match=r"could not save .*\.npy\.restart.*pointer.*unreadable"
    ):
        store.close()
    assert store.closed
    pointer.unlink()
    with TieredStore(cfg) as again:  # the writer lock went with the store
        again.write([2], torch.ones(1, 4))
        again.commit()
        assert torch.equal(again.lookup([1, 2, 3])[:, 0], torch.tensor([1.0, 1.0, data[3, 0]]))


def test_a_fifo_at_the_restart_path_starts_cold_without_blocking(tmp_path):
    """The close's save replaced a FIFO at the restart file's path (an opt-in of its own);
    it refuses it as every writer does, with a warning: serving and the close go on."""
    import os
    import stat

    path, data = make_table(tmp_path, rows=3000, dim=8)
    os.mkfifo(restart_path(path))  # reading it would wait for a writer forever
    fifo_tmp = path.parent / f".{restart_path(path).name}.0123456789ab.tmp"
    os.mkfifo(fifo_tmp)  # named like a save's temporary: the open's clean-up passes it by
    cleanup = threading.Thread(target=remove_abandoned_saves, args=(restart_path(path),))
    cleanup.daemon = True  # a clean-up blocked in the FIFO's open fails the test, not the run
    cleanup.start()
    cleanup.join(10)
    assert not cleanup.is_alive(), "the clean-up blocked opening a FIFO"
    with pytest.warns(RestartWarning, match=r"not used, it is a FIFO \(named pipe\); expected"):
        store = TieredStore(config(path, hot=16, warm=64))
    serve(store, data, batches=2)
    # the save refuses a FIFO at its path, as every writer does (not replaced: the user's)
    with pytest.warns(RestartWarning) as said:
        store.close()
    message = str(said[0].message)
    assert store.closed and "a FIFO (named pipe) is in the way" in message, message
    assert message.endswith("the next open starts cold"), message
    assert stat.S_ISFIFO(restart_path(path).lstat().st_mode)
    assert fifo_tmp.exists()  # no save made it: not the clean-up's to remove


def _save_stopped_before_its_rename(path, how, conn) -> None:
    """In a process of its own: open a store on ``path`` and hold rows; once told, save, and stop
    with the temporary written, before its rename: killed there (``how="killed"``) or waiting
    (a save under way). Sends "open", then the temporary's name."""
    import os

    from tiered_store import atomic_file

    store = TieredStore(config(path, hot=0, warm=100))
    store.lookup(list(range(100)))
    conn.send("open")
    conn.recv()  # both processes opened (an open removes a killed save's temporary): save

    def stop(self):
        conn.send(self.tmp.name)
        if how == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    atomic_file.AtomicFile.publish = stop
    store.save_restart()


def test_an_open_removes_what_a_killed_save_left_but_not_a_live_save_s(tmp_path):
    """A save killed before its rename leaves a hidden whole copy of the file beside the table:
    the next open removes it (they piled up, one a crash); a save another process has under way
    keeps its temporary (it holds a lock on it) until it dies, and the open after that removes it."""
    from tests import forkserver

    path, data = make_table(tmp_path, rows=3000, dim=8)
    ctx = forkserver.context()
    conns = {how: ctx.Pipe() for how in ("killed", "live")}
    killed, live = (
        ctx.Process(target=_save_stopped_before_its_rename, args=(path, how, conns[how][1]))
        for how in ("killed", "live")
    )
    try:
        killed.start()
        live.start()
        ours = [conns[how][0] for how in ("killed", "live")]
        assert [conn.recv() for conn in ours] == ["open", "open"]
        for conn in ours:
            conn.send("save")
        dead_tmp, live_tmp = (conn.recv() for conn in ours)
        killed.join(timeout=30)
        assert killed.exitcode == -signal.SIGKILL
        assert {p.name for p in tmp_path.glob(".*.tmp")} == {dead_tmp, live_tmp}
        with TieredStore(config(path, hot=16, warm=64)) as store:
            assert {p.name for p in tmp_path.glob(".*.tmp")} == {live_tmp}
            serve(store, data, batches=2)
        assert {p.name for p in tmp_path.glob(".*.tmp")} == {live_tmp}  # the close saved
    finally:
        live.kill()
        live.join()
    with TieredStore(config(path, hot=16, warm=64)) as store:
        assert not list(tmp_path.glob(".*.tmp"))
        assert store.wait_restored(timeout=10) and store.warm.occupancy > 0


def test_a_save_whose_temporary_an_open_removed_before_its_lock_writes_another(
    tmp_path, monkeypatch
):
    """An open's cleanup can find a save's temporary in the moment between its creation and its
    lock, and remove it: the save makes another and completes."""
    import os

    from tiered_store import atomic_file, warm_restart

    made = []
    lock = atomic_file._lock_temporary

    def then_an_open(fd):
        made.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(made) == 1:  # not locked yet: another store's open removes it
            assert warm_restart.remove_abandoned_saves(path) == [os.path.basename(made[0])]
        lock(fd)

    monkeypatch.setattr(atomic_file, "_lock_temporary", then_an_open)
    path = tmp_path / "t.npy.restart"
    warm_restart.save_restart(path, {"rows": 10}, warm_restart.RestartState({"hot": np.array([1])}))
    assert len(made) == 2 and not list(tmp_path.glob(".*.tmp"))
    assert warm_restart.load_restart(path, {"rows": 10}).held["hot"].tolist() == [1]


def test_a_save_under_way_when_the_table_moves_on_keeps_the_newer_stores_file(
    tmp_path, monkeypatch
):
    """A store's save looked whether the table had moved on only before writing: a compaction
    and a newer store's save while it wrote (hundreds of MB with a sketch) had its older rows
    land over the newer store's file, and the next open started cold."""
    import errno

    from tiered_store import atomic_file
    from tiered_store.delta.compaction import compact_table
    from tiered_store.errors import TierIOError

    path, data = make_table(tmp_path)
    with TieredStore.open({"table": {"path": str(path)}}) as writer:
        writer.write([7], torch.ones(1, data.shape[1]))
        writer.commit()
    data[7] = 1.0
    newer = []
    lock = atomic_file._lock_temporary

    def then_a_compaction_and_a_newer_stores_save(fd):
        lock(fd)
        if not newer:  # the older store's save has begun writing
            newer.append(None)
            compact_table(path, progress=False)
            with TieredStore(config(path)) as current:
                serve(current, data, batches=3, seed=2)
                newer[0] = held(current)

    old = TieredStore(config(path))
    try:
        serve(old, data, batches=3)
        monkeypatch.setattr(
            atomic_file, "_lock_temporary", then_a_compaction_and_a_newer_stores_save
        )
        with pytest.raises(TierIOError, match="moved on to a newer version") as err:
            old.save_restart()
        assert err.value.errno == errno.ESTALE
        monkeypatch.undo()
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RestartWarning)  # its close's save: refused too
            old.close()
    assert not list(tmp_path.glob(".*.tmp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RestartWarning)
        with TieredStore(config(path)) as again:
            assert again.wait_restored(timeout=30) and held(again) == newer[0]


_OPEN_WITHOUT_THREADS = r"""
import os, sys, threading
import torch
from tiered_store.store import TieredStore
cfg = {"table": {"path": sys.argv[1]},
       "tiers": {"warm": {"capacity": 10}, "restart": {"enabled": True, "save_every_s": 60}}}
before = sorted(os.listdir("/proc/self/fd"))
threading.stack_size(2**62)  # no thread's stack can be mapped: every start fails
try:
    TieredStore.open(cfg)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
threading.stack_size(0)
print("left open:", len(os.listdir("/proc/self/fd")) - len(before))
"""


def _script_lines(script: str, path) -> list[str]:
    """The lines ``script`` prints, run in a fresh Python with the table ``path`` as its
    argument (it must exit 0)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def test_an_open_whose_thread_cannot_start_raises_why_and_leaves_nothing_open(tmp_path):
    """A save thread that could not start (no memory for its stack, a process limit) was joined
    while the open unwound: "cannot join thread before it is started" hid the real error, and
    the table file and its version hold were left open."""
    path, _ = make_table(tmp_path)
    assert _script_lines(_OPEN_WITHOUT_THREADS, path) == [
        "RuntimeError: can't start new thread",
        "left open: 0",
    ]


_OPEN_WHOSE_NTH_THREAD_CANNOT_START = r"""
import os, sys, threading
import torch
from tiered_store.store import TieredStore
tier = {"policy": "zipf-tuned", "recency_window": 10, "repin": {"every": 10, "budget": 1}}
cfg = {"table": {"path": sys.argv[1]},
       "tiers": {"hot": {**tier, "capacity": 8}, "warm": {**tier, "capacity": 40},
                 "restart": {"enabled": True, "save_every_s": 60}}}
with TieredStore.open(cfg) as store:  # a restart file to restore from
    for i in range(30):
        store.lookup(torch.arange(i, i + 20))
saved = open(sys.argv[1] + ".restart", "rb").read()
for failing in ("restore", "save", "repin"):
    def fail_from(frame, event, arg):  # the store's threads start in this order
        if event == "call" and frame.f_code is threading.Thread.start.__code__:
            if frame.f_locals["self"].name == failing:
                threading.stack_size(2**62)  # no thread's stack can be mapped from here on
    before = len(os.listdir("/proc/self/fd"))
    sys.setprofile(fail_from)
    try:
        TieredStore.open(cfg)
    except Exception as exc:
        print(f"{failing}: {type(exc).__name__}: {exc}")
    sys.setprofile(None)
    threading.stack_size(0)
    print("left open:", len(os.listdir("/proc/self/fd")) - before,
          [t.name for t in threading.enumerate() if t is not threading.main_thread()],
          open(sys.argv[1] + ".restart", "rb").read() == saved)
"""


def test_an_open_whose_restore_save_or_re_pin_thread_cannot_start_joins_those_started(tmp_path):
    """The restore, save and re-pin threads start in turn: one that cannot start leaves those
    before it running; the open joins them, closes its files and leaves the restart file."""
    path, _ = make_table(tmp_path, rows=500, dim=8)
    assert _script_lines(_OPEN_WHOSE_NTH_THREAD_CANNOT_START, path) == [
        line
        for name in ("restore", "save", "repin")
        for line in (f"{name}: RuntimeError: can't start new thread", "left open: 0 [] True")
    ]


def test_a_load_holds_the_file_and_what_it_returns_not_a_second_copy(tmp_path):
    """The load checksummed ``data[:-4]``, a copy of the whole file (hundreds of MB with a
    sketch) on top of the file read and the arrays returned."""
    import tracemalloc

    from tiered_store.warm_restart import RestartState, save_restart

    path = tmp_path / "t.npy.restart"
    sketch = np.ones((4, 1 << 20), np.float32)  # 16 MiB
    state = RestartState({"hot": np.arange(1000)}, {}, {"hot": ({"windows": 1}, sketch)})
    save_restart(path, {"rows": 1000}, state)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        back = load_restart(path, {"rows": 1000})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(back.profiles["hot"][1], sketch)
    assert peak < 2.5 * size, f"{peak:,} bytes at the peak for a {size:,}-byte file"


def test_a_save_asked_of_a_closed_store_is_refused_and_leaves_a_later_stores_file(tmp_path):
    # a closed store still wrote its tiers as they were at its close, over the file a store
    # opened since had saved
    from tiered_store import StoreClosedError

    path, data = make_table(tmp_path, rows=3000, dim=8)
    first = TieredStore(config(path, hot=16, warm=64))
    first.lookup(torch.arange(10))
    first.close()
    with TieredStore(config(path, hot=16, warm=64)) as later:
        assert later.wait_restored(timeout=5)
        later.lookup(torch.arange(100, 110))
    after_later = restart_path(path).read_bytes()
    with pytest.raises(StoreClosedError, match="store is closed"):
        first.save_restart()
    assert restart_path(path).read_bytes() == after_later


def test_a_periodic_save_under_way_at_a_timed_out_close_leaves_a_later_stores_file(
    tmp_path, monkeypatch
):
    # a save the periodic thread began before a close that timed out (a slow disk) wrote on
    # after it: its rename landed over the file a store opened since had saved at its close
    from tiered_store import warm_restart

    path, data = make_table(tmp_path, rows=3000, dim=8)
    cfg = config(path, hot=16, warm=64, restart={"enabled": True, "save_every_s": 0.01})
    first = TieredStore(cfg)
    first.lookup(torch.arange(10))
    writing, go, entered, release = (threading.Event() for _ in range(4))
    real_save = warm_restart.save_restart

    def slow_save(*args):  # the periodic save, held in its write
        if threading.current_thread().name == "save":
            writing.set()
            go.wait(30)
        return real_save(*args)

    def stuck() -> None:  # a call under way, as a lookup blocked in a read is
        with first._file_calls.entered():
            entered.set()
            release.wait(30)

    monkeypatch.setattr(store_module, "save_restart", slow_save)
    caller = threading.Thread(target=stuck)
    caller.start()
    try:
        assert entered.wait(10) and writing.wait(10)
        with pytest.warns(RuntimeWarning, match="still under way"):
            first.close(wait_s=0.1)
        monkeypatch.undo()
        with TieredStore(config(path, hot=16, warm=64)) as later:
            assert later.wait_restored(timeout=30)
            later.lookup(torch.arange(100, 110))
        after_later = restart_path(path).read_bytes()
        go.set()
        for thread in first._threads:
            thread.join(30)
        assert restart_path(path).read_bytes() == after_later
    finally:
        go.set()
        release.set()
        caller.join(30)


_SAVE_PAST_THE_FILE_SIZE_LIMIT = r"""
import resource, sys
from pathlib import Path
import numpy as np
from tiered_store.warm_restart import RestartState, save_restart
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
try:
    save_restart(Path(sys.argv[1]), {"generation": 0}, RestartState({"hot": np.arange(100_000)}))
except OSError as exc:
    print(type(exc).__name__, exc)
"""


def test_a_save_cut_short_by_the_file_size_limit_names_the_file(tmp_path):
    """A save's write that failed (past RLIMIT_FSIZE here; a full disk alike) raised a bare
    "[Errno 27] File too large": the periodic save's warning named no file."""
    import subprocess
    import sys

    path = tmp_path / "t.npy.restart"
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_PAST_THE_FILE_SIZE_LIMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = f"cannot save warm-restart file {path}: writing it failed: File too large"
    assert done.stdout.startswith("TierIOError") and said in done.stdout, done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []

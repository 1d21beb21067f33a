"""Replay runs the store's own cache code: parity with the live store, regrouping, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_table, store_config
from tiered_store import ConfigError, StoreConfig, TieredStore
from tiered_store.trace import TraceReader, TraceWriter
from tiered_store.workload import ZipfWorkload
from zipf_analysis.replay import replay, table_geometry

ROWS, HEADS = 3000, 4


def write_trace(
    path, batches: int = 25, seed: int = 0, rows: int = ROWS, workload: ZipfWorkload | None = None
) -> list[np.ndarray]:
    """A Zipfian two-table trace of [2, 40, HEADS] records per batch; returns table 'a''s records."""
    workload = workload or ZipfWorkload(rows, 0.9, seed=seed)
    records = []
    layout = {
        "tables": [
            {"name": "a", "rows": rows, "heads": HEADS},
            {"name": "b", "rows": rows, "heads": HEADS},
        ]
    }
    with TraceWriter(path, layout) as writer:
        for _ in range(batches):
            ids = workload.sample((2, 40, HEADS))
            records.append(ids)
            writer.write(ids, "a")
            writer.write(workload.sample((2, 40, HEADS)), "b")
            writer.end_batch()
    return records


PARITY_TIERS = [
    {"hot": {"capacity": 100}, "warm": {"capacity": 400}},
    {"hot": {"capacity": 50, "evict_headroom": 0.2}, "warm": {"capacity": "5%"}},
    {"warm": {"capacity": 250}},
    {"hot": {"capacity": 3000}},
]


@pytest.mark.parametrize("tiers", PARITY_TIERS)
def test_replay_statistics_equal_the_live_store(tmp_path, tiers):
    path, data = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace")
    config = store_config(path, **tiers)
    with TieredStore(config) as store:
        for ids in records:
            assert torch.equal(store.lookup(ids), data[torch.from_numpy(ids)])
        live = store.stats()
    result = replay(config, tmp_path / "t.trace", table="a")
    for tier in ("hot", "warm"):
        for key in (
            "lookups",
            "hits",
            "misses",
            "admissions",
            "evictions",
            "rejections",
            "occupancy",
        ):
            assert result.tiers[tier][key] == live[tier][key], (tier, key)
    assert result.rows_moved["into_warm"] == live["warm"]["admissions"]
    assert result.rows_moved["cold_reads"] == live["cold"]["rows_read"]
    assert result.lookups == sum(r.size for r in records)


def test_replay_parity_with_static_pinning(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace")
    counts = np.bincount(np.concatenate([r.ravel() for r in records]), minlength=ROWS)
    np.save(tmp_path / "top.npy", np.argsort(-counts, kind="stable")[:80])
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {
                "hot": {"capacity": 120, "policy": "static+lru", "static_rows": "top.npy"},
                "warm": {"capacity": 300, "preload_rows": "top.npy"},
            },
        },
        base_dir=tmp_path,
    )
    with TieredStore(config) as store:
        for ids in records:
            store.lookup(ids)
        live = store.stats()
    result = replay(config, tmp_path / "t.trace", table="a")
    for tier in ("hot", "warm"):
        for key in ("lookups", "hits", "admissions", "evictions", "preloaded"):
            assert result.tiers[tier][key] == live[tier][key], (tier, key)
    assert result.tiers["hot"]["preloaded"] == 80


def test_batch_tokens_regroups_the_stream(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=6)
    config = store_config(path, warm={"capacity": 200})
    per_record = replay(config, tmp_path / "t.trace", table="a")
    grouped = replay(config, tmp_path / "t.trace", table="a", batch_tokens=16)
    single = replay(config, tmp_path / "t.trace", table="a", batch_tokens=1)
    total = sum(r.size for r in records)
    assert per_record.batches == 6
    assert grouped.batches == -(-total // (16 * HEADS))
    assert single.batches == total
    assert per_record.lookups == grouped.lookups == single.lookups == total


@pytest.mark.parametrize("heads", [None, 1])
def test_a_trace_table_without_heads_regroups_one_lookup_per_token(tmp_path, heads):
    # "heads": null (not given, as "rows" and "dim" may be) was int(None), a bare TypeError
    with TraceWriter(
        tmp_path / "t.trace", {"tables": [{"name": "a", "rows": 50, "heads": heads}]}
    ) as w:
        w.write(np.arange(10), "a")
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(tmp_path / "none.npy"), "dim": 4},
            "tiers": {"warm": {"capacity": 4}},
        }
    )
    assert replay(config, tmp_path / "t.trace", batch_tokens=4).batches == 3


def test_per_request_replay_equals_scalar_lru(tmp_path):
    from policies import ScalarLRU

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=4)
    result = replay(
        store_config(path, warm={"capacity": 150}), tmp_path / "t.trace", table="a", batch_tokens=1
    )
    lru = ScalarLRU(150)
    hits = sum(lru.access(int(x)) for r in records for x in r.ravel())
    assert result.tiers["warm"]["hits"] == hits


def test_fetch_ratio_reads_a_row_missed_twice_in_a_batch_once(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=5)
    config = store_config(path, warm={"capacity": ROWS})  # never evicts: only compulsory misses
    result = replay(config, tmp_path / "t.trace", table="a")
    seen: set[int] = set()
    misses = 0
    for ids in records:  # per batch: every lookup of a row not resident before the batch misses
        new = ~np.isin(ids.ravel(), list(seen))
        misses += int(new.sum())
        seen |= set(ids.ravel().tolist())
    assert result.tiers["warm"]["misses"] == misses
    assert result.fetch_ratio == len(seen) / result.lookups  # each row read from cold once
    assert result.fetch_ratio < result.miss_ratio
    single = replay(config, tmp_path / "t.trace", table="a", batch_tokens=1)
    assert single.fetch_ratio == single.miss_ratio == len(seen) / single.lookups


def test_modelled_stall_shrinks_with_overlap(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", batches=5)
    base = store_config(path, hot={"capacity": 100}, warm={"capacity": 300})
    plain = replay(base, tmp_path / "t.trace")
    overlapped = replay(
        base.model_copy(
            update={
                "cost_model": base.cost_model.model_copy(update={"compute_seconds_per_batch": 1e-4})
            }
        ),
        tmp_path / "t.trace",
    )
    assert plain.modelled_stall_seconds == pytest.approx(plain.modelled_fetch_seconds)
    assert overlapped.modelled_stall_seconds < plain.modelled_stall_seconds
    assert overlapped.modelled_fetch_seconds == pytest.approx(plain.modelled_fetch_seconds)


def test_trace_for_another_table_is_an_error(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", rows=ROWS * 2, batches=2)
    with pytest.raises(ConfigError, match="has 3,000 rows but trace table 'a' has 6,000"):
        replay(store_config(path, warm={"capacity": 10}), tmp_path / "t.trace", table="a")


def test_unknown_policy_or_table_is_an_error(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", batches=2)
    with pytest.raises(ConfigError, match="unknown policy 'nope'.*expected an eviction policy"):
        replay(store_config(path, warm={"capacity": 10}), tmp_path / "t.trace", policy="nope")
    with pytest.raises(Exception, match="zz"):
        replay(store_config(path), TraceReader(tmp_path / "t.trace"), table="zz")


def test_replay_command_writes_table_json_and_png(tmp_path, capsys):
    import json

    from tiered_store.cli import main

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", batches=10)
    (tmp_path / "tiers.yaml").write_text(
        f"table: {{path: {path.name}}}\ntiers:\n  hot: {{capacity: 60}}\n  warm: {{capacity: 5%}}\n"
    )
    out = tmp_path / "out"
    argv = [
        "replay",
        str(tmp_path / "tiers.yaml"),
        str(tmp_path / "t.trace"),
        "--table",
        "a",
        "--policies",
        "lru,static+lru",
        "--out",
        str(out),
        "--sweep",
        "1%,5%,10%",
    ]
    assert main(argv) == 2  # static+lru without static_rows is a config error, named
    assert "static_rows" in capsys.readouterr().err
    argv[argv.index("lru,static+lru")] = "lru"
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "belady" in text and "hot hit" in text
    doc = json.loads((out / "replay.json").read_text())
    result = doc["results"][0]
    assert result["lookups"] == 10 * 2 * 40 * HEADS
    assert 0 <= result["bounds"]["belady@hot+warm"] <= result["miss_ratio"]
    names = [c["name"] for c in doc["sweep"]]
    assert names[0] == "lru" and "belady" in names
    sweep_lru = dict(zip(doc["sweep"][0]["capacities"], doc["sweep"][0]["miss_ratio"], strict=True))
    belady = dict(zip(doc["sweep"][-1]["capacities"], doc["sweep"][-1]["miss_ratio"], strict=True))
    assert all(belady[c] <= sweep_lru[c] + 1e-12 for c in sweep_lru if c)
    # at 0 a batch reads each of its distinct rows once (it was drawn at 1.0), per request 1.0
    assert 0 < sweep_lru[0] < 1 == belady[0]
    assert doc["sweep"][0]["lookups"] == result["lookups"]  # was 0 with --no-bounds
    assert (out / "replay.png").stat().st_size > 10_000
    # a static policy with its static_rows: each swept capacity pins them (as many as fit)
    np.save(tmp_path / "top.npy", np.arange(20, dtype=np.int64))
    (tmp_path / "tiers.yaml").write_text(
        f"table: {{path: {path.name}}}\ntiers:\n"
        "  hot: {capacity: 60, policy: static+lru, static_rows: top.npy}\n"
        "  warm: {capacity: 5%, policy: static+lru, static_rows: top.npy}\n"
    )
    argv[argv.index("lru")] = "lru,static+lru"
    assert main(argv) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err
    doc = json.loads((out / "replay.json").read_text())
    assert [c["name"] for c in doc["sweep"]][:2] == ["lru", "static+lru"]


def test_replay_command_shows_a_bar_for_each_replay_of_its_sweep_unless_quiet(tmp_path, capsys):
    """The sweep replays the whole trace once per policy and capacity (most of the command's time
    on a corpus's trace) without a progress bar: the command looked hung after its replays."""
    from tiered_store.cli import main

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", batches=10)
    (tmp_path / "tiers.yaml").write_text(
        f"table: {{path: {path.name}}}\ntiers: {{hot: {{capacity: 60}}, warm: {{capacity: 5%}}}}\n"
    )
    argv = ["replay", str(tmp_path / "tiers.yaml"), str(tmp_path / "t.trace"), "--no-bounds"]
    argv += ["--policies", "lru", "--sweep", "1%,5%", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"sweep lru at {cap} rows" in err for cap in (0, 30, 150)), err
    assert main([*argv, "--quiet"]) == 0
    assert "sweep" not in capsys.readouterr().err


def test_offline_bounds_replay_by_name_over_the_same_ids(tmp_path):
    from zipf_analysis.mrc import belady_misses, static_topk_mrc

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=8)
    ids = np.concatenate([r.ravel() for r in records])
    config = store_config(path, hot={"capacity": 60}, warm={"capacity": "5%"})
    caps = [60, 60 + 150]
    belady = replay(config, tmp_path / "t.trace", table="a", policy="belady")
    static = replay(config, tmp_path / "t.trace", table="a", policy="static-topk")
    assert belady.offline and static.offline and belady.policy == "belady"
    assert belady.lookups == static.lookups == ids.size
    expected = belady_misses(ids, caps).tolist()
    assert [belady.tiers["hot"]["misses"], belady.tiers["warm"]["misses"]] == expected
    assert belady.tiers["warm"]["lookups"] == expected[0]
    assert belady.miss_ratio == belady.fetch_ratio == expected[1] / ids.size
    oracle = static_topk_mrc(np.bincount(ids), capacities=caps)
    assert static.tiers["hot"]["misses"] / ids.size == oracle.miss_ratio[1]
    assert static.miss_ratio == oracle.miss_ratio[2]
    # the optimum misses no more than the store's own LRU holding the same rows, per request
    lru = replay(
        store_config(path, warm={"capacity": caps[1]}),
        tmp_path / "t.trace",
        table="a",
        batch_tokens=1,
    )
    assert belady.miss_ratio <= lru.miss_ratio


def test_live_store_refuses_an_offline_bound(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    expected = r"tiers\.warm\.policy: 'belady' is an offline bound, usable in replay only; expected one of .*lru"
    with pytest.raises(ConfigError, match=expected):
        TieredStore(store_config(path, warm={"capacity": 10, "policy": "belady"}))
    with pytest.raises(ConfigError, match="'static-topk' is an offline bound"):
        TieredStore(store_config(path, hot={"capacity": 10, "policy": "static-topk"}))


def test_replay_command_lists_offline_bounds_beside_policies(tmp_path, capsys):
    import json

    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 6, "{hot: {capacity: 60}, warm: {capacity: 5%}}")
    assert main([*argv, "--policies", "lru,belady,static-topk", "--sweep", "1%,5%"]) == 0
    printed = capsys.readouterr().out
    belady = next(line.split() for line in printed.splitlines() if line.startswith("belady"))
    assert belady[6] == belady[9] == "-"  # no batches: rows per batch and stall not modelled
    lru = next(line.split() for line in printed.splitlines() if line.startswith("lru/lru"))
    assert float(lru[8]) > 0  # the modelled stall, in seconds
    doc = json.loads((out / "replay.json").read_text())
    by_name = {r["policy"]: r for r in doc["results"]}
    assert by_name["lru/lru"]["bounds"]["belady@hot+warm"] == by_name["belady"]["miss_ratio"]
    assert by_name["lru/lru"]["bounds"]["static-topk@hot"] == (
        by_name["static-topk"]["tiers"]["hot"]["misses"] / by_name["static-topk"]["lookups"]
    )
    names = [c["name"] for c in doc["sweep"]]
    assert names == ["lru", "lru (exact, per request)", "static-topk", "belady"]
    # without bounds, a listed offline name still replays and is swept; the others are skipped
    assert main([*argv, "--policies", "belady", "--sweep", "1%", "--no-bounds"]) == 0
    doc = json.loads((out / "replay.json").read_text())
    assert doc["results"][0]["bounds"] == {} and doc["results"][0]["offline"]
    assert [c["name"] for c in doc["sweep"]] == ["lru (exact, per request)", "belady"]


def test_replay_table_keeps_small_figures_and_says_each_column_unit(tmp_path, capsys):
    """uniq/batch was rounded to a whole row (0.83 printed as 1, 0.4 as 0) and to device to whole
    MiB (0 MiB for a small run's KiB); the legend named only the ratio columns."""
    import json

    from tiered_store.capacity import format_bytes
    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 6, "{hot: {capacity: 60}, warm: {capacity: 5%}}")
    argv += ["--policies", "lru", "--batch-tokens", "1", "--no-bounds", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    (result,) = json.loads((out / "replay.json").read_text())["results"]
    assert 0 < result["unique_rows_per_batch"] < 1  # one lookup a batch: a row, or none
    line = next(line.split() for line in printed.splitlines() if line.startswith("lru/lru"))
    assert float(line[5]) == pytest.approx(result["unique_rows_per_batch"], abs=0.005)
    assert " ".join(line[6:8]) == format_bytes(result["bytes_moved"]["host_to_device"])
    for column in ("uniq/batch: ", "to device: ", "stall s: ", "Mlookup/s: "):
        assert column in printed


def _replay_command(tmp_path, batches: int, tiers: str) -> tuple[list[str], Path]:
    """A table, a trace of ``batches`` batches and a store config whose ``tiers:`` is ``tiers``
    (YAML flow) in ``tmp_path``: ``tiered-store replay``'s arguments for them with ``--out``, and
    that folder."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", batches=batches)
    (tmp_path / "tiers.yaml").write_text(f"table: {{path: {path.name}}}\ntiers: {tiers}\n")
    out = tmp_path / "out"
    return [
        "replay",
        str(tmp_path / "tiers.yaml"),
        str(tmp_path / "t.trace"),
        "--out",
        str(out),
    ], out


def _trace_of(path, batches, rows=ROWS):
    with TraceWriter(path, {"tables": [{"name": "a", "rows": rows, "heads": 1}]}) as writer:
        for ids in batches:
            writer.write(np.asarray(ids, dtype=np.int64), "a")
            writer.end_batch()


def test_lookahead_protects_rows_the_next_batch_uses(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    _trace_of(tmp_path / "t.trace", [range(20), range(100, 120), range(200, 230), range(20)])
    config = store_config(path, warm={"capacity": 40})
    blind = replay(config, tmp_path / "t.trace")
    ahead = replay(config, tmp_path / "t.trace", lookahead=1)
    assert blind.tiers["warm"]["hits"] == 0  # LRU evicted rows 0-19 just before they came back
    assert ahead.tiers["warm"]["hits"] == 20


def _profile_for(tmp_path, counts):
    from tiered_store.profile import profile_ids

    ids = np.repeat(np.arange(counts.size), counts)
    profile = profile_ids(ids, rows=ROWS)
    profile.save(tmp_path / "profile.npz")
    return profile


def test_zipf_tuned_pins_the_profile_top_and_replays_like_the_store(tmp_path):
    from policies.zipf_tuned import zipf_tuned_split

    path, data = make_table(tmp_path, rows=ROWS, dim=8)
    workload = ZipfWorkload(ROWS, 0.9, seed=1)
    holdout = write_trace(
        tmp_path / "profile.trace", workload=workload
    )  # an earlier, disjoint sample
    records = write_trace(tmp_path / "t.trace", workload=workload)
    profile = _profile_for(
        tmp_path, np.bincount(np.concatenate([r.ravel() for r in holdout]), minlength=ROWS)
    )
    tiers = {
        "hot": {
            "capacity": 64,
            "policy": "zipf-tuned",
            "profile": "profile.npz",
            "recency_window": 40,
        },
        "warm": {
            "capacity": 300,
            "policy": "zipf-tuned",
            "profile": "profile.npz",
            "recency_window": 40,
        },
    }
    config = StoreConfig.from_dict(
        {"table": {"path": str(path)}, "tiers": tiers}, base_dir=tmp_path
    )
    ranking = profile.top_rows(64 + 300, by="episodes")
    hot_split = zipf_tuned_split(ranking, profile.counts, 64, recency_window=40)
    split = zipf_tuned_split(
        ranking, profile.counts, 300, recency_window=40, pinned_above=hot_split.pinned_rows
    )
    assert 0 < split.recency_rows <= 150 and split.pinned_rows.size == 300 - split.recency_rows
    # warm pins the next rows of the ranking, not copies of hot's
    n_hot, n_warm = hot_split.pinned_rows.size, split.pinned_rows.size
    assert np.array_equal(
        np.concatenate([hot_split.pinned_rows, split.pinned_rows]),
        profile.top_rows(n_hot + n_warm, by="episodes"),
    )
    with TieredStore(config) as store:
        assert store.stats()["hot"]["preloaded"] == n_hot
        assert store.stats()["warm"]["preloaded"] == n_warm
        for ids in records:
            assert torch.equal(store.lookup(ids), data[torch.from_numpy(ids)])
        live = store.stats()
        for cache, pinned in ((store.hot, hot_split), (store.warm, split)):  # never evicted
            assert bool((cache.probe(torch.from_numpy(pinned.pinned_rows)) >= 0).all())
    result = replay(config, tmp_path / "t.trace", table="a")
    for tier in ("hot", "warm"):
        for key in ("hits", "admissions", "evictions", "preloaded"):
            assert result.tiers[tier][key] == live[tier][key], (tier, key)
    lru = replay(
        store_config(path, hot={"capacity": 64}, warm={"capacity": 300}),
        tmp_path / "t.trace",
        table="a",
    )
    assert (
        result.miss_ratio < lru.miss_ratio
    )  # a stable Zipf workload: pinning the profile top pays


def test_zipf_tuned_needs_a_matching_profile(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    from tiered_store.profile import profile_ids

    profile_ids(np.arange(50), rows=50).save(tmp_path / "small.npz")
    cfg = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"warm": {"capacity": 10, "policy": "zipf-tuned", "profile": "small.npz"}},
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="profiles a table of 50 rows; this table has 3,000"):
        TieredStore(cfg)


def test_records_of_one_batch_replay_as_one_batch(tmp_path):
    """analyze writes one record per sequence when lengths differ; replay joins them per batch."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    with TraceWriter(
        tmp_path / "t.trace", {"tables": [{"name": "a", "rows": ROWS, "heads": 2}]}
    ) as writer:
        for batch in range(3):
            writer.write(np.arange(10, dtype=np.int64).reshape(5, 2) + batch, "a")
            writer.write(np.arange(6, dtype=np.int64).reshape(3, 2) + 100, "a")
            writer.end_batch()
    result = replay(store_config(path, warm={"capacity": 100}), tmp_path / "t.trace")
    assert result.batches == 3 and result.lookups == 48


def test_design_benchmark_simulator_equals_the_store_per_request(tmp_path):
    # bench/bench_zipf_tuned.py sweeps zipf-tuned's design with the library's per-request fast
    # path (pinned rows + LRU, compiled); it must decide exactly as the store's cache code does.
    from policies.pinned_lru import pinned_lru_misses

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=12, seed=3)
    ids = np.concatenate([r.ravel() for r in records]).astype(np.int64)
    pinned_rows = np.arange(0, 400, 8)  # 50 rows, some hot under the Zipf draw, some not
    np.save(tmp_path / "pins.npy", pinned_rows)
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"warm": {"capacity": 150, "policy": "static+lru", "static_rows": "pins.npy"}},
        },
        base_dir=tmp_path,
    )
    store = replay(config, tmp_path / "t.trace", table="a", batch_tokens=1)
    pinned = np.zeros(ROWS, dtype=bool)
    pinned[pinned_rows] = True
    simulated = pinned_lru_misses(ids, pinned, lru_rows=100)
    assert store.tiers["warm"]["misses"] == simulated > 0


def test_replay_command_says_how_often_an_online_tier_re_pinned(tmp_path, capsys):
    import json

    from tiered_store.cli import main

    tiers = "{warm: {capacity: 5%, policy: zipf-tuned, recency_window: 400, repin: {every: 400}}}"
    argv, out = _replay_command(tmp_path, 30, tiers)
    assert main([*argv, "--no-bounds", "--batch-tokens", "8"]) == 0
    text = capsys.readouterr().out
    warm = json.loads((out / "replay.json").read_text())["results"][0]["tiers"]["warm"]
    assert warm["repins"] > 0 and warm["rows_repinned"] > 0  # no profile: it learns online
    line = (
        f"the warm tier re-pinned online {warm['repins']:,} times, {warm['rows_repinned']:,} rows"
    )
    assert line in text and "the hot tier re-pinned" not in text


def test_replay_command_refuses_bad_options_before_any_work(tmp_path, capsys, monkeypatch):
    import zipf_analysis.replay_cli as replay_cli
    from tiered_store.cli import main

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    write_trace(tmp_path / "t.trace", batches=2)
    (tmp_path / "tiers.yaml").write_text(
        f"table: {{path: {path.name}}}\ntiers:\n  hot: {{capacity: 60}}\n  warm: {{capacity: 5%}}\n"
    )
    (tmp_path / "a_file").write_text("")

    def no_work(*args, **kwargs):
        raise AssertionError("replayed before checking the options")

    monkeypatch.setattr(replay_cli, "replay", no_work)
    monkeypatch.setattr(replay_cli, "recommend_split", no_work)
    argv = ["replay", str(tmp_path / "tiers.yaml"), str(tmp_path / "t.trace"), "--quiet"]
    out = tmp_path / "out"
    for extra, needle in [
        (["--sweep", "1%,lots"], "--sweep: got 'lots'; expected a row count"),
        (["--sweep", "150%"], "--sweep: '150%' is more than 100% of the table"),
        # skipped the sweep without a word (and removed an earlier run's replay.png)
        (["--sweep", "0"], "--sweep: got '0', only capacity 0 (every curve starts at 0"),
        (["--sweep", "0%,0"], "expected capacities above 0, such as 1%,5%, or '' to skip"),
        (["--policies", "lru,nope"], "--policies: unknown policy 'nope'"),
        (["--policies", "lru,,sieve"], "--policies: policy '': expected a policy name"),
        # each was replayed twice, the same figures on two lines
        (["--policies", "lru,LRU"], "--policies: 'LRU' is 'lru' again; expected each policy once"),
        (["--policies", "static+lru,lru+static"], "'lru+static' is 'static+lru' again"),
        (["--policies", "belady,sieve,Belady"], "--policies: 'Belady' is 'belady' again"),
        (["--batch-tokens", "0"], "--batch-tokens: got 0; expected a positive number"),
        (["--queued-requests", "-1"], "--queued-requests: got -1; expected a number of requests"),
        (
            ["--request-tokens", "0", "--queued-requests", "1"],
            "--request-tokens: got 0; expected a positive number",
        ),
        # taken and ignored: requests are cut only with a queue, a grid only with the budgets
        (["--request-tokens", "64"], "--request-tokens 64: only with --queued-requests N"),
        (["--split-points", "8"], "--split-points 8: only with --gpu-budget and --host-budget"),
        (
            ["--split-points", "0", "--gpu-budget", "1MiB", "--host-budget", "1MiB"],
            "--split-points: got 0; expected at least 1",
        ),
    ]:
        assert main([*argv, "--out", str(out), *extra]) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists()  # nothing made, not even the folder
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        with pytest.raises(SystemExit) as exited:  # refused with the options, before any work
            main([*argv, "--out", str(bad)])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --out: '{bad}'" in err and "is a file; expected a folder" in err, err


def test_replay_command_names_the_config_file_of_a_setting_it_refuses(tmp_path, capsys):
    """Errors found as replay resolves its config against the trace's table (a capacity past the
    table, a policy typo, a missing row list, a table.dim the trace has not) named the key but
    not the file, which TieredStore.open names; an option's error still names the option alone."""
    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 2, "{}")
    config = tmp_path / "tiers.yaml"
    budgets = ["--gpu-budget", "1MiB", "--host-budget", "1MiB"]
    for tiers, extra, message in (
        ("{warm: {capacity: 9999999}}", [], "tiers.warm.capacity: 9999999 is 9,999,999 rows"),
        ("{warm: {capacity: 9999999}}", budgets, "tiers.warm.capacity: 9999999 is 9,999,999"),
        ("{hot: {capacity: 10, policy: lruu}}", [], "tiers.hot.policy: unknown policy 'lruu'"),
        ("{warm: {capacity: 10, policy: static+lru}}", [], "tiers.warm.static_rows: policy"),
    ):
        config.write_text(f"table: {{path: none.npy, dim: 8}}\ntiers: {tiers}\n")
        assert main([*argv, "--table", "a", "--quiet", *extra]) == 2
        assert f"error: {config}: {message}" in capsys.readouterr().err
    with TraceWriter(
        tmp_path / "wide.trace", {"tables": [{"name": "a", "rows": ROWS, "dim": 64}]}
    ) as w:
        w.write(np.arange(10), "a")
    config.write_text("table: {path: none.npy, dim: 512}\n")
    assert main(["replay", str(config), str(tmp_path / "wide.trace"), "--out", str(out)]) == 2
    assert f"error: {config}: table.dim: got 512 but trace table 'a'" in capsys.readouterr().err
    config.write_text("table: {path: none.npy, dim: 8}\n")
    assert main([*argv, "--table", "a", "--quiet", "--gpu-budget", "1B", "--host-budget", "0"]) == 2
    assert "error: --gpu-budget: 1 bytes" in capsys.readouterr().err


def test_replay_command_refuses_a_table_without_lookups(tmp_path, capsys):
    from tiered_store.cli import main

    layout = {"tables": [{"name": "a", "rows": ROWS}, {"name": "b", "rows": ROWS}]}
    with TraceWriter(tmp_path / "t.trace", layout) as writer:
        writer.write(np.arange(10), "a")
    (tmp_path / "tiers.yaml").write_text(
        "table: {path: none.npy, dim: 8}\ntiers: {warm: {capacity: 100}}\n"
    )
    argv = ["replay", str(tmp_path / "tiers.yaml"), str(tmp_path / "t.trace"), "--quiet"]
    assert main([*argv, "--table", "b", "--out", str(tmp_path / "out")]) == 2
    assert "table 'b' has no lookups; expected a trace with lookups" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_replaying_one_table_with_another_tables_config_warns(tmp_path, capsys):
    """analyze writes layer1.store.yaml (table.path: layer1.npy, made later) beside a trace of
    layer1 and layer15: replaying layer15 with it is named, since its profile is layer1's."""
    from tiered_store.cli import main

    layout = {"tables": [{"name": "layer1", "rows": ROWS}, {"name": "layer15", "rows": ROWS}]}
    with TraceWriter(tmp_path / "t.trace", layout) as writer:
        writer.write(np.arange(10), "layer1")
        writer.write(np.arange(10), "layer15")
    (tmp_path / "layer1.store.yaml").write_text(
        "table: {path: layer1.npy, dim: 8}\ntiers: {warm: {capacity: 100}}\n"
    )
    argv = ["replay", str(tmp_path / "layer1.store.yaml"), str(tmp_path / "t.trace"), "--quiet"]
    argv += ["--sweep", "", "--no-bounds", "--out", str(tmp_path / "out")]
    assert main([*argv, "--table", "layer15"]) == 0
    assert "table.path names trace table 'layer1', but this replays 'layer15'" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--table", "layer1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_config_of_another_row_width_is_an_error(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    layout = {"tables": [{"name": "a", "rows": ROWS, "dim": 64}]}
    with TraceWriter(tmp_path / "t.trace", layout) as writer:
        writer.write(np.arange(10), "a")
    with pytest.raises(ConfigError, match=r"has rows of 8 values but trace table 'a' has 64"):
        replay(store_config(path, warm={"capacity": 10}), tmp_path / "t.trace")
    for dim in (512, 64):  # no table file: the config's dim (512: n_embed_per_ngram, not a head's)
        config = StoreConfig.from_dict({"table": {"path": str(tmp_path / "none.npy"), "dim": dim}})
        if dim == 64:
            assert replay(config, tmp_path / "t.trace").lookups == 10
            continue
        with pytest.raises(
            ConfigError, match=r"table.dim: got 512 but trace table 'a' has rows of 64"
        ):
            replay(config, tmp_path / "t.trace")


def test_a_packed_fp8_table_replays_without_its_file_with_the_config_its_store_takes(tmp_path):
    """A served trace gives a table's dim as its store does, in values (256 for V4.1's fp8 rows);
    a uint8 table's table.dim is the bytes of its packed rows (264: codes, then a scale byte per
    32), which its store requires. Without the table file, replay refused that config and took
    dim 256 (which the store refuses), pricing 256-byte rows."""
    from tiered_store.quantization import RowQuantization, quantize_rows
    from tiered_store.table_format import create_table

    quant = RowQuantization(values=256)
    create_table(tmp_path / "t.npy", quantize_rows(torch.randn(ROWS, 256), quant), progress=False,
                 quantization=quant)  # fmt: skip
    table = {"path": str(tmp_path / "t.npy"), "dim": 264, "dtype": "uint8"}
    with TieredStore(StoreConfig.from_dict({"table": table})) as store:
        layout = {"name": "a", "rows": ROWS, "dim": store.dim}
    with TraceWriter(tmp_path / "t.trace", {"tables": [layout]}) as writer:
        writer.write(np.arange(10), "a")
    table["path"] = str(tmp_path / "none.npy")
    assert table_geometry(StoreConfig.from_dict({"table": table}), layout) == (ROWS, 264)
    assert replay(StoreConfig.from_dict({"table": table}), tmp_path / "t.trace").lookups == 10
    for dim in (256, 520, 255):  # the values, another width's packing, no packing of 256
        table["dim"] = dim
        with pytest.raises(ConfigError, match=rf"table.dim: got {dim} \(uint8: the bytes of its "):
            replay(StoreConfig.from_dict({"table": table}), tmp_path / "t.trace")


def test_replay_command_leaves_no_plot_of_an_earlier_run(tmp_path):
    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 2, "{warm: {capacity: 60}}")
    assert main([*argv, "--quiet", "--no-bounds", "--sweep", "5%"]) == 0
    assert (out / "replay.png").exists()
    assert main([*argv, "--quiet", "--no-bounds", "--sweep", ""]) == 0
    assert not (out / "replay.png").exists()  # replay.json has no sweep now: no plot of one


def test_counters_at_marks_equal_a_replay_of_the_prefix(tmp_path):
    """One replay with marks gives what replays of each prefix give (replay is deterministic)."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=12)
    config = store_config(path, hot={"capacity": 50}, warm={"capacity": 200})
    per_batch = records[0].size
    full = replay(config, tmp_path / "t.trace", table="a", marks=[5 * per_batch, 9 * per_batch])
    for mark, at in zip((5, 9), full.at_marks, strict=True):
        prefix = tmp_path / f"p{mark}.trace"
        write_trace(prefix, batches=mark)  # the same seed: the first batches of the same trace
        alone = replay(config, prefix, table="a")
        assert at == {
            "lookups": mark * per_batch,
            "cold_reads": alone.rows_moved["cold_reads"],
            "misses": alone.tiers["warm"]["misses"],
        }
    assert full.rows_moved["cold_reads"] > full.at_marks[-1]["cold_reads"]


def test_a_queue_counts_batches_and_requests_in_the_units_it_is_given(tmp_path):
    """With a queue, `batch_tokens=1` is still one lookup per batch (as without one), and a
    request of `request_tokens=1` is one token (its heads' lookups), not one lookup."""
    heads, tokens = 8, 500
    rng = np.random.default_rng(0)
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 5000, "heads": heads}]}) as w:
        for _ in range(5):
            w.write(rng.integers(0, 5000, (1, tokens // 5, heads)), "a")
            w.end_batch()
    tiers = {"hot": {"capacity": 50}, "warm": {"capacity": 200}}
    cfg = StoreConfig.from_dict(
        {"table": {"path": str(tmp_path / "t.npy"), "dim": 4}, "tiers": tiers}
    )
    plain = replay(cfg, path, batch_tokens=1)
    queued = replay(cfg, path, batch_tokens=1, queued_requests=1, request_tokens=100)
    assert plain.batches == queued.batches == tokens * heads
    assert replay(cfg, path, queued_requests=1, request_tokens=1).batches == tokens
    with pytest.raises(ConfigError, match="lookahead=2 with queued_requests=1: expected one"):
        replay(cfg, path, queued_requests=1, lookahead=2)  # it released requests still waiting


@pytest.mark.parametrize(
    ("dtype", "value_bytes"), [("float32", 4), ("float16", 2), ("bfloat16", 2), ("uint8", 1)]
)
def test_without_the_table_file_a_row_is_priced_by_its_dtype(tmp_path, dtype, value_bytes):
    """V4.1's packed rows are uint8: 264 B a row (256 values), not twice that."""
    cfg = StoreConfig.from_dict(
        {"table": {"path": str(tmp_path / "absent.npy"), "dim": 264, "dtype": dtype}}
    )
    values = 256 if dtype == "uint8" else 264  # a trace gives a row's values, as its store does
    layout = {"name": "t", "rows": 1000, "dim": values}
    assert table_geometry(cfg, layout) == (1000, 264 * value_bytes)


@pytest.mark.parametrize("said", [{}, {"rows": None}])  # no rows in the layout, or a null
def test_a_trace_without_rows_whose_ids_pass_the_table_is_refused_by_name(tmp_path, said):
    """A trace layout may leave out ``rows`` (the table file gives them): ids past the table's
    rows crashed replay with an IndexError from the row index, and the tier split recommended
    tiers for rows the table does not have."""
    from tiered_store import RowIdError
    from zipf_analysis.tier_split import recommend_split

    path, _ = make_table(tmp_path, rows=500, dim=4)
    trace = tmp_path / "t.trace"
    with TraceWriter(trace, {"tables": [{"name": "a", "heads": 2, **said}]}) as writer:
        for batch in range(4):
            writer.write(np.arange(batch * 400, batch * 400 + 40).reshape(1, 20, 2), "a")
            writer.end_batch()
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(path)},
            "tiers": {"hot": {"capacity": 50}, "warm": {"capacity": 100}},
        }
    )
    expected = r"; expected ids in \[0, 500\) \(the table's rows\)"
    for index in ("dense", "hashed"):
        tiers = {t: {**config.tiers.model_dump()[t], "index": index} for t in ("hot", "warm")}
        indexed = config.model_copy(update={"tiers": config.tiers.model_validate(tiers)})
        first_past = r"trace table 'a': row ids in \[800, 839\]"  # the first batch past it
        with pytest.raises(RowIdError, match=first_past + expected):
            replay(indexed, trace)
    for kw in ({"queued_requests": 2, "request_tokens": 20}, {"policy": "belady"}):
        with pytest.raises(RowIdError, match=r"row ids in \[\d+, [\d,]+\]" + expected):
            replay(config, trace, **kw)  # announced to the queue, or offline: checked first
    with (
        TraceReader(trace) as reader,
        pytest.raises(RowIdError, match=r"row ids in \[0, 1,239\]" + expected),
    ):
        recommend_split(config, reader, gpu_budget="4KiB", host_budget="8KiB", points=2)


def test_replay_command_that_cannot_write_its_results_is_a_clear_error(tmp_path, capsys):
    """A write failing (a file-size limit: EFBIG; a full disk alike) escaped replay as a bare
    OSError from the PNG encoder, a traceback, leaving a torn replay.png in --out."""
    from tests.conftest import file_size_limit
    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 2, "{warm: {capacity: 60}}")
    with file_size_limit(4096):
        code = main([*argv, "--quiet", "--no-bounds", "--sweep", "5%"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (
        f"tiered-store replay: error: cannot write {out / 'replay.png'}: writing the plot failed: "
        "File too large; nothing was written there (expected a writable file system with room "
        "for it)\n"
    )
    assert not out.exists()  # the folder this run made, empty, is gone too


def test_replay_command_names_its_plot_only_once_written(tmp_path, capsys):
    """stdout named replay.png before it was written: a plot that could not be written (a folder
    in the way) was still announced as there."""
    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 2, "{warm: {capacity: 60}}")
    (out / "replay.png").mkdir(parents=True)
    assert main([*argv, "--no-bounds", "--sweep", "5%"]) == 2
    said = capsys.readouterr()
    assert "cannot write" in said.err and str(out / "replay.png") not in said.out
    (out / "replay.png").rmdir()
    assert main([*argv, "--no-bounds", "--sweep", "5%"]) == 0
    assert f"plot: {out / 'replay.png'}\n" in capsys.readouterr().out


def test_replay_command_without_a_plot_leaves_a_folder_named_as_the_plot(tmp_path, capsys):
    """Without a sweep replay removes an earlier run's replay.png; a folder of that name made it
    fail with a bare IsADirectoryError (a traceback) and no replay.json. It is no plot: left."""
    from tiered_store.cli import main

    argv, out = _replay_command(tmp_path, 2, "{warm: {capacity: 60}}")
    (out / "replay.png").mkdir(parents=True)
    assert main([*argv, "--quiet", "--no-bounds", "--sweep", ""]) == 0
    assert f"results: {out / 'replay.json'}\n" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["replay.json", "replay.png"]
    assert (out / "replay.png").is_dir()


def test_replay_command_whose_results_cannot_be_renamed_leaves_no_temporary(
    tmp_path, capsys, monkeypatch
):
    """replay.png was renamed into place, then replay.json's rename failed (a folder made there
    meanwhile): its hidden temporary file stayed in --out."""
    from tiered_store.cli import main
    from zipf_analysis import plots

    argv, out = _replay_command(tmp_path, 2, "{warm: {capacity: 60}}")
    write_png = plots.write_png

    def then_a_folder_appears(figure, f):
        write_png(figure, f)
        (out / "replay.json").mkdir()  # another process, between the checks and the rename

    monkeypatch.setattr(plots, "write_png", then_a_folder_appears)
    assert main([*argv, "--quiet", "--no-bounds", "--sweep", "5%"]) == 2
    assert f"cannot write {out / 'replay.json'}: a directory is in the way" in (
        capsys.readouterr().err
    )
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("dim", [66, 64, 1500])  # 264 B rows (V4.1's width), 256 B, 6,000 B
def test_the_cost_model_prices_the_pages_the_cold_reader_reads(tmp_path, dim):
    # a cold row was priced at ceil(row_bytes / 4096) pages, but the reader reads every page a row
    # lies in: 264 B rows cross a page boundary at 1 row position in 16, 6,000 B rows cost 2.46
    from tiered_store.cold_table import ColdTable
    from tiered_store.config import CostModelConfig
    from tiered_store.table_format import PAGE_BYTES
    from zipf_analysis.replay import batch_fetch_seconds

    row_bytes = 4 * dim
    period = PAGE_BYTES // np.gcd(row_bytes, PAGE_BYTES)  # row offsets in a page repeat after it
    step = -(-(row_bytes + PAGE_BYTES) // row_bytes) | 1  # odd, so coprime with the period (a
    # power of 2): rows k * step take every offset once; and far enough that no two share a page
    path, _ = make_table(tmp_path, rows=step * period, dim=dim)
    ids = np.arange(period) * step
    with ColdTable(path, threads=1) as table:
        table.read_rows(ids)
        pages_read = table.bytes_read / PAGE_BYTES
    cost = CostModelConfig(nvme_latency_us=0.0, hbm_gbps=1e9, dram_gbps=1e9, pcie_gbps=1e9)
    modelled = batch_fetch_seconds(cost, row_bytes, 0, 0, 0, ids.size) * cost.nvme_read_iops
    assert modelled == pytest.approx(pages_read, rel=1e-6)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"batch_tokens": -1, "queued_requests": 1},
            "batch_tokens: got -1; expected a positive number of tokens",
        ),
        (
            {"batch_tokens": 0, "queued_requests": 1},
            "batch_tokens: got 0; expected a positive number of tokens",
        ),
        ({"lookahead": -2}, "lookahead: got -2; expected a number of batches >= 0"),
    ],
)
def test_replay_refuses_batches_it_cannot_cut_and_a_negative_lookahead(tmp_path, kw, message):
    """With a queue, batch_tokens=-1 replayed nothing (0 lookups, every ratio 0) and 0 whole
    requests (without a queue both are refused); lookahead=-2 was taken as 0."""
    path = tmp_path / "t.trace"
    write_trace(path, batches=3)
    cfg = StoreConfig.from_dict(
        {"table": {"path": str(tmp_path / "t.npy"), "dim": 4}, "tiers": {"warm": {"capacity": 50}}}
    )
    with pytest.raises(ConfigError, match=message):
        replay(cfg, path, request_tokens=16, **kw)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch_tokens": 2.5}, "batch_tokens: got 2.5; expected a positive number of tokens"),
        ({"batch_tokens": True}, "batch_tokens: got True; expected a positive number of tokens"),
        ({"lookahead": 1.5}, "lookahead: got 1.5; expected a number of batches >= 0"),
        (
            {"queued_requests": 1.5},
            r"queued_requests=1.5, request_tokens=16: expected queued_requests >= 0",
        ),
        (
            {"queued_requests": 1, "request_tokens": 2.5},
            r"queued_requests=1, request_tokens=2.5: expected queued_requests >= 0",
        ),
        ({"marks": [-5]}, r"marks: got -5; expected lookup counts >= 0"),
        ({"marks": [2.5]}, r"marks: got 2.5; expected lookup counts >= 0"),
    ],
)
def test_replay_refuses_counts_that_are_not_integers(tmp_path, kw, message):
    """batch_tokens or request_tokens 2.5 failed in the batching with 'slice indices must be
    integers'; batch_tokens True, lookahead 1.5 and queued_requests 1.5 replayed as something
    else; a mark of -5 or 2.5 recorded counters at a count no replay reaches: each is refused
    up front, naming the argument and the value."""
    path = tmp_path / "t.trace"
    write_trace(path, batches=3)
    cfg = StoreConfig.from_dict(
        {"table": {"path": str(tmp_path / "t.npy"), "dim": 4}, "tiers": {"warm": {"capacity": 50}}}
    )
    with pytest.raises(ConfigError, match=message):
        replay(cfg, path, request_tokens=kw.pop("request_tokens", 16), **kw)

"""Tier sizing from one read of a trace: the model against full replays of the same splits.

The trace is real text (Python standard library sources, tokenised and hashed by `analyze` with a
small Engram config). Per request (``batch_tokens=1``) the model's counters and stall must equal a
replay's; at the trace's own batches (an LRU tier breaks a batch's ties by slot, the model by
lookups), within 2% of the stall and 2% of the lookups. The recommended split must have the least
replayed stall among the splits the test replays. The same holds for zipf-tuned tiers (pins from
the profile `analyze` wrote for the text, fixed; an LRU recency segment), alone or beside an LRU
tier.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import zipf_analysis.mrc as mrc
import zipf_analysis.tier_split as tier_split
from policies import PolicySpec
from tiered_store.capacity import available_host_memory
from tiered_store.cli import main
from tiered_store.config import CostModelConfig, StoreConfig
from tiered_store.errors import ConfigError, LimitError, TraceFormatError
from tiered_store.row_cache import RowCache
from tiered_store.trace import TraceReader, TraceWriter
from zipf_analysis.analyze import AnalyzeOptions, analyze
from zipf_analysis.replay import replay
from zipf_analysis.report import summary_lines
from zipf_analysis.tier_models import tier_models
from zipf_analysis.tier_split import (
    BatchEvents,
    _check_grid_memory,
    _frontier,
    batch_events,
    batched_stack_distances,
    max_capacity,
    recommend_split,
    split_grid,
    tier_bytes,
)

ENGRAM = {
    "engram": {
        "engram_vocab_size": [20011, 20021],
        "max_ngram_size": 3,
        "n_embed_per_ngram": 32,
        "n_head_per_ngram": 2,
        "layer_ids": [1],
    }
}
COST = {"compute_seconds_per_batch": 0.0002}
ANALYZE_LOG: list[str] = []  # what the text trace's `analyze` said as it went
STALL_TOLERANCE = 0.02  # batched: |model - replay| / replay
COUNT_TOLERANCE = 0.02  # batched: |model - replay| / lookups, for hot hits, warm hits, cold reads


@pytest.fixture(scope="module")
def text_trace(tmp_path_factory) -> Path:
    """A trace of real text: a few standard library modules, 8,000 tokens, 512 lookups a batch
    (`analyze` with memory budgets: its store config holds the recommended split)."""
    root = tmp_path_factory.mktemp("split")
    stdlib = Path(json.__file__).parent
    analyze(
        [stdlib, stdlib.parent / "argparse.py"],
        root / "out",
        config=text_trace_config(root),
        options=AnalyzeOptions(
            seq_len=64,
            batch_seqs=2,
            max_tokens=8000,
            curves=False,
            workers=1,
            progress=False,
            gpu_budget="1MiB",
            host_budget="2MiB",
        ),
        log=ANALYZE_LOG.append,
    )
    return root / "out" / "trace.trace"


@pytest.fixture(scope="module")
def short_trace(text_trace) -> Path:
    """The text trace's first 8,000 lookups (per-request replay runs one lookup at a time)."""
    with TraceReader(text_trace) as reader:
        layout, ids = reader.layout, reader.read_all(0)[:8000]
    path = text_trace.with_name("short.trace")
    with TraceWriter(path, {"tables": layout}) as writer:
        for part in np.split(ids, range(512, ids.size, 512)):
            writer.write(part, 0)
            writer.end_batch()
    return path


def _config(hot: int = 0, warm: int = 0, **cost) -> StoreConfig:
    """LRU tiers over the trace's table (no table file: rows from the trace, 16 x float32 as the layout says)."""
    return StoreConfig.from_dict(
        {
            "table": {"path": "absent.npy", "dim": 16},
            "tiers": {"hot": {"capacity": hot}, "warm": {"capacity": warm}},
            "cost_model": {**COST, **cost},
        }
    )


def _replayed(
    trace: Path, hot: int, warm: int, batch_tokens: int | None, policies=None, **cost
) -> dict:
    """A full replay of one split (LRU tiers, or ``policies``: see _tuned), as the model's counters."""
    config = (
        _config(hot, warm, **cost)
        if policies is None
        else _tuned(trace, *policies, hot, warm, **cost)
    )
    r = replay(config, trace, batch_tokens=batch_tokens)
    return {
        "hot_hits": r.tiers["hot"]["hits"],
        "warm_hits": r.tiers["warm"]["hits"],
        "device_rows": r.rows_moved["host_to_device"],
        "cold_reads": r.rows_moved["cold_reads"],
        "fetch_seconds": r.modelled_fetch_seconds,
        "stall_seconds": r.modelled_stall_seconds,
    }


SPLITS = [(0, 300), (60, 0), (60, 1500), (400, 300), (400, 4000), (2500, 1500)]
RECENCY_WINDOW = 256  # ~248 rows: the recency segment is half the tier below ~500 rows, fixed above


def test_per_request_model_equals_replay(short_trace):
    with TraceReader(short_trace) as reader:
        events = batch_events(reader, 0, batch_tokens=1)
    hot, warm = sorted({h for h, _ in SPLITS}), sorted({w for _, w in SPLITS})
    grid = split_grid(events, _config().cost_model, 64, hot, warm)
    assert grid.lookups == events.lookups == grid.batches
    for h, w in SPLITS:
        model, real = grid.at(h, w), _replayed(short_trace, h, w, batch_tokens=1)
        for key in ("hot_hits", "warm_hits", "device_rows", "cold_reads"):
            assert model[key] == real[key], (h, w, key)
        for key in ("fetch_seconds", "stall_seconds"):
            assert model[key] == pytest.approx(real[key], rel=1e-9), (h, w, key)


def assert_near_replay(model: dict, real, lookups: int, split) -> None:
    """A modelled split's counters within COUNT_TOLERANCE of the lookups, and its stall within
    STALL_TOLERANCE, of a replay's."""
    for key, value in (
        ("hot_hits", real.tiers["hot"]["hits"]),
        ("warm_hits", real.tiers["warm"]["hits"]),
        ("cold_reads", real.rows_moved["cold_reads"]),
    ):
        assert abs(model[key] - value) <= COUNT_TOLERANCE * lookups, (split, key)
    assert model["stall_seconds"] == pytest.approx(real.modelled_stall_seconds, rel=STALL_TOLERANCE)


@pytest.mark.parametrize("batch_tokens", [None, 16])
def test_batched_model_is_within_tolerance_of_replay(text_trace, batch_tokens):
    with TraceReader(text_trace) as reader:
        events = batch_events(reader, 0, batch_tokens)
    widest = int(np.diff(events.starts).max())
    assert events.batches > 50 and widest > 60  # some splits have hot tiers below a batch's rows
    hot, warm = sorted({h for h, _ in SPLITS}), sorted({w for _, w in SPLITS})
    grid = split_grid(events, _config().cost_model, 64, hot, warm)
    for h, w in SPLITS:
        real = replay(_config(h, w), text_trace, batch_tokens=batch_tokens)
        assert real.batches == grid.batches and real.lookups == grid.lookups
        assert_near_replay(grid.at(h, w), real, events.lookups, (h, w))


@pytest.mark.parametrize("policies", [None, ("zipf-tuned", "zipf-tuned")], ids=["lru", "tuned"])
# per request (15-30 s each) under -m slow: the per-request tests below check the model exact
@pytest.mark.parametrize("batch_tokens", [None, pytest.param(1, marks=pytest.mark.slow)])
def test_recommended_split_has_the_least_replayed_stall(
    text_trace, short_trace, batch_tokens, policies
):
    trace = text_trace if batch_tokens is None else short_trace
    cost = {} if batch_tokens is None else {"compute_seconds_per_batch": 0.0}  # one lookup a batch
    config = (
        _config(hot=60, warm=1500, **cost) if policies is None else _tuned(trace, *policies, **cost)
    )
    rec = recommend_split(
        config,
        trace,
        gpu_budget="1MiB",
        host_budget="2MiB",
        batch_tokens=batch_tokens,
        points=8,
        extra=[(60, 1500)],
    )
    assert rec.model == dict(zip(("hot", "warm"), policies or ("lru", "lru"), strict=True))
    assert not rec.notes
    assert rec.hot_bytes <= rec.gpu_budget and rec.warm_bytes <= rec.host_budget
    assert rec.candidates[0]["stall_seconds"] == rec.stall_seconds
    assert all(c["stall_seconds"] >= rec.stall_seconds for c in rec.candidates)
    # the recommendation, the largest split, the config's, and frontier points with less memory
    largest = max(rec.candidates, key=lambda c: (c["hot_rows"], c["warm_rows"]))
    others = {(largest["hot_rows"], largest["warm_rows"]), (60, 1500)}
    others |= {(c["hot_rows"], c["warm_rows"]) for c in rec.frontier[-5:-1]}
    others.discard((rec.hot_rows, rec.warm_rows))
    assert len(others) >= 3
    best = _replayed(trace, rec.hot_rows, rec.warm_rows, batch_tokens, policies, **cost)
    replayed = [
        _replayed(trace, h, w, batch_tokens, policies, **cost)["stall_seconds"] for h, w in others
    ]
    tol = 1e-9 if batch_tokens == 1 else STALL_TOLERANCE  # per request the model is exact
    assert best["stall_seconds"] == pytest.approx(rec.stall_seconds, rel=tol)
    assert best["stall_seconds"] <= min(replayed) * (1 + tol)


def test_stall_free_splits_go_to_the_least_memory(text_trace):
    rec = recommend_split(
        _config(compute_seconds_per_batch=1.0), text_trace, gpu_budget="1MiB", host_budget="2MiB"
    )
    assert rec.stall_seconds == 0.0 and (rec.hot_rows, rec.warm_rows) == (0, 0)


def _brute_batched_lru(rows: np.ndarray, starts: np.ndarray) -> list[int]:
    """Batched stack distances by moving rows to the front of a list, batch by batch."""
    stack: list[int] = []  # most recent first
    out = []
    for k in range(starts.size - 1):
        batch = rows[starts[k] : starts[k + 1]].tolist()
        out.extend(stack.index(x) + 1 if x in stack else 0 for x in batch)
        for x in batch:  # stamped in order: the last is the most recent
            if x in stack:
                stack.remove(x)
            stack.insert(0, x)
    return out


def test_batched_stack_distances_equal_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n_rows, n_batches = rng.randint(1, 40), rng.randint(1, 60)
        rows, starts = [], [0]
        for _ in range(n_batches):
            batch = rng.sample(range(n_rows), rng.randint(0, min(n_rows, 9)))
            rows.extend(batch)
            starts.append(len(rows))
        rows, starts = np.array(rows, dtype=np.int64), np.array(starts)
        assert batched_stack_distances(rows, starts).tolist() == _brute_batched_lru(rows, starts)


def test_batched_stack_distances_survive_time_axis_compaction():
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.permutation(3000)[:1000] for _ in range(2000)])  # 2M events
    starts = np.arange(0, rows.size + 1, 1000)
    out = batched_stack_distances(rows, starts)
    # the last batch, after compactions: brute force over the 10 batches before it finds every row
    # used there (3,000 distinct rows, 1,000 a batch) at the same distance
    expect = np.array(_brute_batched_lru(rows[-11_000:], np.arange(0, 11_001, 1000))[-1000:])
    seen = expect > 0
    assert seen.sum() > 900 and (out[-1000:][seen] == expect[seen]).all()


def test_batched_stack_distances_stop_at_the_int32_time_axis_limit(monkeypatch):
    # access times are int32: past 2**31 of them they wrapped; here the same limit, small
    monkeypatch.setattr(tier_split, "MIN_TIME_CAPACITY", 64)
    monkeypatch.setattr(mrc, "MAX_TIME_CAPACITY", 256)
    rng = random.Random(5)

    def batches(distinct):
        rows, starts = [], [0]
        for _ in range(300):
            rows.extend(rng.sample(range(distinct), rng.randint(1, 4)))
            starts.append(len(rows))
        return np.array(rows), np.array(starts)

    rows, starts = batches(120)  # 120 distinct and a batch of 4: the axis stops at 256 times
    assert batched_stack_distances(rows, starts).tolist() == _brute_batched_lru(rows, starts)
    rows, starts = batches(200)
    with pytest.raises(
        LimitError, match="stack distances over 1.. distinct rows; expected at most 128"
    ):
        batched_stack_distances(rows, starts)


def test_the_replay_command_names_the_time_axis_limit_in_one_line(tmp_path, monkeypatch, capsys):
    # the limit was a plain ValueError: `tiered-store replay` showed a traceback, not its one line
    monkeypatch.setattr(tier_split, "MIN_TIME_CAPACITY", 64)
    monkeypatch.setattr(mrc, "MAX_TIME_CAPACITY", 256)  # as 2**31 - 64, small: 128 live rows
    with TraceWriter(tmp_path / "t.trace", {"tables": [{"name": "a", "rows": 500}]}) as writer:
        for ids in np.random.default_rng(6).integers(0, 400, (300, 4)):
            writer.write(ids, "a")
            writer.end_batch()
    (tmp_path / "tiers.yaml").write_text(
        yaml.safe_dump({"table": {"path": "absent.npy", "dim": 16}, "cost_model": COST})
    )
    argv = ["replay", str(tmp_path / "tiers.yaml"), str(tmp_path / "t.trace"), "--sweep", ""]
    budgets = ["--gpu-budget", "1MiB", "--host-budget", "1MiB", "--no-bounds", "--quiet"]
    assert main([*argv, *budgets, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiered-store replay: error: stack distances over 1")
    assert err.endswith(
        " distinct rows; expected at most 128: the time axis keeps access times as int32, up to "
        "256 of them\n"
    )


@pytest.mark.parametrize(
    ("rows", "starts", "expected"),
    [
        ([0, 1, 2], [0, 2, 5], "starts ends at 5; expected 3, the events given"),
        ([0, 1, 2], [0, 2], "starts ends at 2; expected 3, the events given"),
        ([0, 1, 2], [1, 3], "starts begins at 1; expected 0"),
        ([0, 1, 2], [0, 2, 1, 3], "starts falls from 2 to 1 at batch 1; expected"),
        ([0, 1, 2], [], "starts is empty; expected"),
        ([0, -4, 2], [0, 3], "rows holds -4; expected dense row numbers >= 0"),
        ([0, 2**31, 2], [0, 3], "rows holds 2147483648; expected dense row numbers up to 2,147,"),
    ],
)
def test_batched_stack_distances_refuse_batches_that_do_not_cover_the_events(
    rows, starts, expected
):
    # the kernel indexes without bounds checks: a bad start read past the events (a crash)
    with pytest.raises(ValueError, match=expected):
        batched_stack_distances(np.array(rows, dtype=np.int64), np.array(starts, dtype=np.int64))


@pytest.mark.parametrize(
    ("rows", "starts", "expected"),
    [
        # a cast to int64 truncated floats: batch bounds [0, 1, 3] and rows [0, 1, 2], silently
        (np.array([0, 1, 2]), np.array([0.0, 1.5, 3.0]), "starts of dtype float64; expected integ"),
        (np.array([0.4, 1.2, 2.7]), np.array([0, 3]), "rows of dtype float64; expected integers"),
        (np.array([0, 1, 2]), np.array([False, True]), "starts of dtype bool; expected integers"),
        (np.array([0, 1, 2]), np.array([[0, 3]]), r"starts of shape \(1, 2\); expected a 1-D"),
        (np.array([[0, 1], [2, 0]]), np.array([0, 4]), r"rows of shape \(2, 2\); expected a 1-D"),
        # unsigned: neither a wrapped difference nor a wrapped value in the message
        (np.array([0, 1, 2]), np.array([0, 2, 1, 3], dtype=np.uint64), "falls from 2 to 1 at"),
        (np.array([0, 1, 2]), np.array([0, 2**64 - 1, 3], dtype=np.uint64), "from 184467"),
        (np.array([0, 2**63, 2], dtype=np.uint64), np.array([0, 3]), "rows holds 9223372036"),
    ],
)
def test_batched_stack_distances_refuse_what_is_not_1d_integers(rows, starts, expected):
    with pytest.raises(ValueError, match=expected):
        batched_stack_distances(rows, starts)


def test_batched_stack_distances_take_any_integer_dtype_and_empty_lists():
    rows, starts = np.array([0, 1, 2, 0, 1, 2]), np.array([0, 2, 3, 4, 6])
    expect = batched_stack_distances(rows, starts).tolist()
    assert expect == [0, 0, 0, 3, 3, 2]
    for r, s in ((np.int32, np.uint32), (np.uint16, np.int16), (np.uint64, np.uint64)):
        assert batched_stack_distances(rows.astype(r), starts.astype(s)).tolist() == expect
    assert batched_stack_distances([], [0]).tolist() == []
    assert batched_stack_distances([], [0, 0, 0]).tolist() == []


@pytest.mark.parametrize(
    ("index", "policy"),
    [
        ("dense", "lru"),
        ("hashed", "lru"),
        ("dense", "zipf-tuned"),
        ("hashed", "sieve"),
        ("dense", "lru+tinylfu"),
        ("hashed", "sieve+tinylfu"),
    ],
)
def test_tier_bytes_count_what_a_row_cache_keeps(index, policy):
    rows, capacity, row_bytes = 50_000, 700, 256
    spec = PolicySpec.parse(policy)
    cache = RowCache("hot", num_rows=rows, capacity=capacity, spec=spec, index=index)
    meta = cache.metadata_bytes()
    expect = (
        capacity * (row_bytes + meta["per_slot"]) + rows * meta["per_table_row"] + meta["per_tier"]
    )
    size = {"rows": rows, "row_bytes": row_bytes, "index": index}
    size |= {"policy": spec.eviction, "admission": spec.admission}
    assert tier_bytes(capacity, **size) == int(np.ceil(expect))
    assert max_capacity(tier_bytes(capacity, **size), **size) == capacity


def test_replay_command_recommends_a_split_and_names_bad_budgets(text_trace, tmp_path, capsys):
    (tmp_path / "tiers.yaml").write_text(
        yaml.safe_dump(
            {
                "table": {"path": "absent.npy", "dim": 16},
                "tiers": {"hot": {"capacity": 60}, "warm": {"capacity": 1500}},
                "cost_model": COST,
            }
        )
    )
    base = ["replay", str(tmp_path / "tiers.yaml"), str(text_trace), "--sweep", "", "--quiet"]
    out = tmp_path / "out"
    argv = [
        *base[:-1],  # not --quiet: the model says it is working
        "--no-bounds",
        "--out",
        str(out),
        "--gpu-budget",
        "1MiB",
        "--host-budget",
        "2MiB",
    ]
    assert main(argv) == 0
    text, err = capsys.readouterr()
    assert "recommended: hot" in text and "replayed at the recommended split" in text
    assert "tier split: modelling table 'layer1' within the budgets..." in err
    doc = json.loads((out / "replay.json").read_text())["tier_split"]
    assert doc["hot_bytes"] <= 2**20 and doc["warm_bytes"] <= 2 * 2**20
    assert doc["replayed"]["tiers"]["hot"]["capacity"] == doc["hot_rows"]
    assert doc["frontier"] and len(doc["candidates"]) >= len(doc["frontier"])
    for extra, needle in [
        (
            ["--gpu-budget", "lots", "--host-budget", "2MiB"],
            "--gpu-budget: got 'lots'; expected a byte size",
        ),
        (
            ["--gpu-budget", "1KiB", "--host-budget", "2MiB"],
            "--gpu-budget: 1024 bytes (1.0 KiB) holds no row",
        ),
        (["--gpu-budget", "1MiB"], "--host-budget: not given; expected it with --gpu-budget"),
    ]:
        assert main([*base, "--no-bounds", "--out", str(tmp_path / "bad"), *extra]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    help_text = capsys.readouterr().out
    assert "--gpu-budget" in help_text
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert "(default: the first)" in help_text and "(default: 16)" in help_text


_FINE_GRID_IN_BOUNDED_MEMORY = r"""
import resource, sys
from tiered_store.config import StoreConfig
from zipf_analysis.tier_split import recommend_split
config = StoreConfig.from_dict({"table": {"path": "absent.npy", "dim": 16}})
mapped = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, ((mapped << 10) + (2 << 30), resource.RLIM_INFINITY))
rec = recommend_split(config, sys.argv[1], gpu_budget="4MiB", host_budget="4MiB", points=300)
print(len(rec.candidates), len(rec.frontier))
"""


def test_a_fine_split_grid_finds_its_frontier_in_bounded_memory(short_trace):
    """--split-points 300 (about 80,000 splits) within 2 GiB more than the imports take: the
    frontier compared every pair of splits at once (a bool matrix per memory and stall, 7.6 GiB
    each here), so a finer grid died of MemoryError after the model itself had finished."""
    done = subprocess.run(
        [sys.executable, "-c", _FINE_GRID_IN_BOUNDED_MEMORY, str(short_trace)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    candidates, frontier = (int(n) for n in done.stdout.split())
    assert candidates > 50_000 and 0 < frontier < candidates


def test_a_grid_whose_counters_outgrow_the_ram_available_is_refused_before_it_is_built():
    """Per request (--batch-tokens 1) the grid holds about 50 B per (batch, warm candidate) while
    it prices a hot one: the docs' 8M lookups at 18 warm candidates took 9 GB, and a machine with
    less ran out of memory instead of saying so."""
    with pytest.raises(
        ConfigError,
        match=r"tier split: 8,000,000 batches x 18 warm candidates take 6.7 GiB \(50 B each\) "
        r"while a hot candidate is priced, but only 4.0 GiB of host RAM is available; expected "
        r"fewer batches \(a larger batch_tokens, --batch-tokens\) or fewer warm candidates",
    ):
        _check_grid_memory(8_000_000, 18, available=4 << 30)
    _check_grid_memory(8_000_000, 18, available=8 << 30)  # fits
    if available_host_memory() is None:
        pytest.skip("no MemAvailable here: split_grid checks nothing")
    # split_grid itself, with MemAvailable: 1M one-lookup batches x 100,000 warm capacities (5 TB)
    n = 1_000_000
    events = BatchEvents(np.arange(n + 1), np.arange(n) % 1000, np.ones(n, np.int64), n)
    with pytest.raises(
        ConfigError, match="1,000,000 batches x 100,000 warm candidates take 4.5 TiB"
    ):
        split_grid(events, CostModelConfig(), 256, [0, 10], np.arange(100_000))


def test_a_grid_of_batches_of_tokens_too_big_for_the_ram_is_refused_before_the_trace_is_read(
    tmp_path, monkeypatch
):
    # with batch_tokens the batches are known from the trace's footer: the trace was read first
    if available_host_memory() is None:
        pytest.skip("no MemAvailable here: split_grid checks nothing")
    path = tmp_path / "t.trace"
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 5000}]}) as writer:
        writer.write(np.random.default_rng(7).integers(0, 5000, 20_000), "a")
        writer.end_batch()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # in the chunk's payload: a read fails its checksum
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(tier_split, "_CELL_BYTES", 1 << 40)  # as a grid far past the RAM
    split = {"gpu_budget": "1MiB", "host_budget": "1MiB"}
    with pytest.raises(TraceFormatError, match="payload checksum mismatch"):
        recommend_split(_config(), path, **split)  # its own batches: counted as it is read
    with pytest.raises(ConfigError, match=r"tier split: 20,000 batches x \d+ warm candidates"):
        recommend_split(_config(), path, batch_tokens=1, **split)
    with pytest.raises(ConfigError, match=r"tier split: 5,000 batches x \d+ warm candidates"):
        recommend_split(_config(), path, batch_tokens=4, **split)


@pytest.mark.parametrize("stalls", [[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, np.inf]])
def test_the_frontier_is_every_split_no_other_beats_on_memory_and_stall(stalls):
    """Against the definition, pair by pair, with ties in every figure; and with stalls that
    overflowed to inf (a cost model of absurd figures), which the prefix minimum took for the
    empty cells around them, so that it kept no split at all where every stall was inf."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        candidates = [
            {"hot_bytes": int(g), "warm_bytes": int(h), "stall_seconds": float(stalls[s])}
            for g, h, s in rng.integers(0, [5, 5, len(stalls)], size=(int(rng.integers(1, 60)), 3))
        ]
        g, h, s = (np.array([c[k] for c in candidates]) for k in candidates[0])
        no_worse = (g[:, None] <= g) & (h[:, None] <= h) & (s[:, None] <= s)
        better = (g[:, None] < g) | (h[:, None] < h) | (s[:, None] < s)
        kept = [
            c for c, d in zip(candidates, (no_worse & better).any(axis=0), strict=True) if not d
        ]
        want = sorted(kept, key=lambda c: (-c["stall_seconds"], c["hot_bytes"], c["warm_bytes"]))
        assert _frontier(candidates) == want


def test_budget_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--host-budget: got '12 parsecs'"):
        recommend_split(_config(), "unused.trace", gpu_budget=0, host_budget="12 parsecs")


def test_a_budget_under_one_byte_is_refused_not_taken_as_no_tier():
    """'0.5B' read as 0 bytes, a budget of 0: no hot tier, where '1B' is refused as too small."""
    with pytest.raises(ConfigError, match="--gpu-budget: got '0.5B'"):
        recommend_split(_config(), "unused.trace", gpu_budget="0.5B", host_budget=0)


def test_analyze_writes_the_split_for_its_budgets_into_the_store_config(text_trace):
    out = text_trace.parent
    config = StoreConfig.from_yaml(out / "layer1.store.yaml")
    assert config.table.dim == 16
    rec = recommend_split(
        config.model_copy(
            update={
                "cost_model": _config().cost_model.model_copy(
                    update={"compute_seconds_per_batch": 0.0}
                )
            }
        ),
        text_trace,
        gpu_budget="1MiB",
        host_budget="2MiB",
    )
    assert (config.tiers.hot.capacity, config.tiers.warm.capacity) == (rec.hot_rows, rec.warm_rows)
    split = json.loads((out / "report.json").read_text())["tables"]["layer1"]["tier_split"]
    assert (split["hot_rows"], split["warm_rows"]) == (rec.hot_rows, rec.warm_rows)
    assert split["stall_seconds"] == pytest.approx(rec.stall_seconds)
    assert "least modelled stall" in (out / "layer1.store.yaml").read_text()
    assert "tier split: modelling layer1 within the budgets..." in ANALYZE_LOG  # a long stage
    # what it prints and report.md say the store config holds the split, not the targets' sizes
    sizes = f"hot {split['hot_rows']:,} rows, warm {split['warm_rows']:,} rows"
    md = (out / "report.md").read_text()
    assert (
        f"[`layer1.store.yaml`](layer1.store.yaml) takes instead the tier split for the budgets: {sizes}"
        in md
    )
    (line,) = [
        x
        for x in summary_lines(json.loads((out / "report.json").read_text()))
        if "recommended" in x
    ]
    assert "for the targets (the store config takes the tier split" in line
    assert "-> layer1.store.yaml" not in line


def test_a_table_with_no_lookups_is_refused_not_sized(tmp_path):
    # through the Python API it gave a 0/0 recommendation over 0 batches (the CLI refused earlier)
    path = tmp_path / "two.trace"
    with TraceWriter(
        path, {"tables": [{"name": "a", "rows": 1000}, {"name": "b", "rows": 1000}]}
    ) as w:
        w.write(np.arange(50), "a")
    with pytest.raises(TraceFormatError, match="two.trace: table 'b' has no lookups"):
        recommend_split(_config(), path, table="b", gpu_budget="64KiB", host_budget="64KiB")


def test_analyze_refuses_bad_budgets_before_any_work(tmp_path):
    with pytest.raises(
        ConfigError, match="--host-budget: not given; expected it with --gpu-budget"
    ):
        AnalyzeOptions(gpu_budget="1GiB")
    with pytest.raises(ConfigError, match="--gpu-budget: got '1 GPU'"):
        AnalyzeOptions(gpu_budget="1 GPU", host_budget="1GiB")
    (tmp_path / "doc.txt").write_text("Only a lookup table. " * 50)
    with pytest.raises(ConfigError, match=r"--gpu-budget \(table layer1\): 1024 bytes"):
        analyze(
            [tmp_path / "doc.txt"],
            tmp_path / "out",
            config=text_trace_config(tmp_path),
            options=AnalyzeOptions(gpu_budget="1KiB", host_budget="0", progress=False),
        )
    assert not (tmp_path / "out").exists()


def text_trace_config(root: Path) -> Path:
    """The Engram config of the text trace, written to ``root``."""
    (root / "engram.yaml").write_text(yaml.safe_dump(ENGRAM))
    return root / "engram.yaml"


def test_batches_of_one_lookup_give_mattsons_distances_through_growth():
    """With one lookup a batch the batched distances are the per-request stack distances of
    StackDistanceCounter; 700k distinct rows make the time axis compact and then grow."""
    from zipf_analysis.mrc import StackDistanceCounter

    rng = np.random.default_rng(2)
    ids = np.concatenate([rng.permutation(700_000), rng.integers(0, 700_000, 800_000)])
    out = batched_stack_distances(ids, np.arange(ids.size + 1))
    counter = StackDistanceCounter()
    counter.update(ids)
    distances, cold = counter.histogram()
    hist = np.bincount(out, minlength=distances.size + 1)
    assert hist[0] == cold == 700_000
    assert (hist[1:] == distances).all()


def test_tier_bytes_equal_a_live_stores_memory_report(tmp_path):
    from tests.conftest import make_table, store_config
    from tiered_store import TieredStore

    path, _ = make_table(tmp_path, rows=4000, dim=16)
    with TieredStore(store_config(path, hot={"capacity": 300}, warm={"capacity": 1200})) as store:
        report = store.memory_report()
    for tier, capacity in (("hot", 300), ("warm", 1200)):
        live = _reported_bytes(report, tier, capacity, rows=4000)
        assert tier_bytes(capacity, rows=4000, row_bytes=64) == live, tier


def test_a_tinylfu_tier_is_sized_with_its_sketch_and_fits_its_budget(short_trace):
    # the sketch (64-128 B a slot) was left out: a 1 MiB tier took 1.5 MiB once built
    config = StoreConfig.from_dict(
        {
            "table": {"path": "absent.npy", "dim": 16},
            "tiers": {"hot": {"policy": "lru+tinylfu"}, "warm": {"policy": "lru+tinylfu"}},
            "cost_model": COST,
        }
    )
    budget = 1 << 20
    rec = recommend_split(config, short_trace, gpu_budget=budget, host_budget=budget, points=4)
    for tier in ("hot", "warm"):
        capacity = getattr(rec, f"{tier}_rows")
        spec = PolicySpec.parse("lru+tinylfu")
        meta = RowCache(tier, num_rows=80084, capacity=capacity, spec=spec).metadata_bytes()
        live = capacity * (64 + meta["per_slot"]) + 80084 * meta["per_table_row"] + meta["per_tier"]
        assert meta["per_tier"] > 0 and getattr(rec, f"{tier}_bytes") == live <= budget, tier


@pytest.mark.parametrize("policy", ["zipf-tuned", "zipf-tuned+tinylfu"])
def test_a_zipf_tuned_tier_re_pinning_online_is_sized_with_its_state_and_fits_its_budget(
    tmp_path, short_trace, policy
):
    # without a profile a zipf-tuned tier re-pins online: its counts and stamps per slot and its
    # sketch (40-72 B a slot) were left out: a 512 KiB hot tier took 662 KiB once the store built it
    from tests.conftest import make_table, store_config
    from tiered_store import TieredStore

    path, _ = make_table(tmp_path, rows=80084, dim=16)
    tiers = {"hot": {"policy": policy}, "warm": {"policy": policy}}
    config = StoreConfig.from_dict(
        {"table": {"path": str(path)}, "tiers": tiers, "cost_model": COST}
    )
    budgets = {"hot": 1 << 19, "warm": 1 << 20}
    gpu, host = budgets["hot"], budgets["warm"]
    rec = recommend_split(config, short_trace, gpu_budget=gpu, host_budget=host, points=4)
    rows = {t: getattr(rec, f"{t}_rows") for t in ("hot", "warm")}
    sized = store_config(path, **{t: {"policy": policy, "capacity": rows[t]} for t in rows})
    with TieredStore(sized) as store:
        report = store.memory_report()
        online = {t: getattr(store, t).online.nbytes for t in rows}
    spec = PolicySpec.parse(policy)
    for tier, capacity in rows.items():
        meta = RowCache(tier, num_rows=80084, capacity=capacity, spec=spec).metadata_bytes()
        cache = (
            capacity * (64 + meta["per_slot"]) + 80084 * meta["per_table_row"] + meta["per_tier"]
        )
        built = cache + online[tier]  # the tier's RowCache and the re-pin state the store gave it
        reported = _reported_bytes(report, tier, capacity, rows=80084)
        assert online[tier] > 0 and getattr(rec, f"{tier}_bytes") == built == reported
        assert built <= budgets[tier], tier


# ---------------------------------------------------------------------------------------------
# zipf-tuned tiers: profile pins plus an LRU recency segment, re-sized at every capacity
# ---------------------------------------------------------------------------------------------


def _tuned(trace: Path, hot: str, warm: str, hot_rows: int = 0, warm_rows: int = 0, **cost):
    """Tiers with these policies; a zipf-tuned one pins from the profile `analyze` wrote for the
    trace's text (fixed pins: repin is 'auto' with a profile)."""
    profile = str(trace.with_name("layer1.profile.npz"))

    def tier(capacity: int, policy: str) -> dict:
        tuned = {"profile": profile, "recency_window": RECENCY_WINDOW}
        return {"capacity": capacity, "policy": policy, **(tuned if "zipf" in policy else {})}

    return StoreConfig.from_dict(
        {
            "table": {"path": "absent.npy", "dim": 16},
            "tiers": {"hot": tier(hot_rows, hot), "warm": tier(warm_rows, warm)},
            "cost_model": {**COST, **cost},
        }
    )


def _tuned_grid(trace: Path, policies: tuple[str, str], batch_tokens, splits, **cost):
    """The model's grid over ``splits`` for tiers with ``policies``."""
    config = _tuned(trace, *policies, **cost)
    with TraceReader(trace) as reader:
        events = batch_events(reader, 0, batch_tokens)
        rows = int(reader.layout[0]["rows"])
    hot, warm = sorted({h for h, _ in splits}), sorted({w for _, w in splits})
    return events, split_grid(events, config.cost_model, 64, hot, warm, tier_models(config, rows))


TUNED_CASES = [  # (hot policy, warm policy), splits replayed per request
    (("zipf-tuned", "zipf-tuned"), [(0, 300), (60, 1500), (400, 4000), (2500, 1500)]),
    (("lru", "zipf-tuned"), [(60, 1500), (2500, 300)]),
    (("zipf-tuned", "lru"), [(400, 300), (2500, 4000)]),
]


@pytest.mark.parametrize(("policies", "splits"), TUNED_CASES)
def test_per_request_zipf_tuned_model_equals_replay(short_trace, policies, splits):
    cost = {"compute_seconds_per_batch": 0.0}  # one lookup a batch: every fetch stalls
    _, grid = _tuned_grid(short_trace, policies, 1, splits, **cost)
    for h, w in splits:
        model, real = grid.at(h, w), _replayed(short_trace, h, w, 1, policies, **cost)
        for key in ("hot_hits", "warm_hits", "device_rows", "cold_reads"):
            assert model[key] == real[key], (policies, h, w, key)
        for key in ("fetch_seconds", "stall_seconds"):
            assert model[key] == pytest.approx(real[key], rel=1e-9), (policies, h, w, key)
    assert real["stall_seconds"] > 0


def test_per_request_model_skips_hot_pins_in_another_warm_profile(short_trace, tmp_path):
    """Warm's profile ranks rows differently from hot's: warm pins its ranking's first rows that
    hot does not pin, as the store does."""
    from tiered_store.profile import profile_ids

    with TraceReader(short_trace) as reader:
        profile_ids(reader.read_all(0)[4000:], rows=80084).save(tmp_path / "warm.npz")
    config = _tuned(short_trace, "zipf-tuned", "zipf-tuned", compute_seconds_per_batch=0.0)
    warm = config.tiers.warm.model_copy(update={"profile": str(tmp_path / "warm.npz")})
    config = config.model_copy(update={"tiers": config.tiers.model_copy(update={"warm": warm})})
    models = tier_models(config, 80084)
    assert not np.array_equal(models["hot"].ranking[:400], models["warm"].ranking[:400])
    with TraceReader(short_trace) as reader:
        events = batch_events(reader, 0, batch_tokens=1)
    splits = [(400, 1500), (2500, 300)]
    grid = split_grid(events, config.cost_model, 64, [400, 2500], [300, 1500], models)
    for h, w in splits:
        tiers = config.tiers.model_copy(
            update={
                "hot": config.tiers.hot.model_copy(update={"capacity": h}),
                "warm": config.tiers.warm.model_copy(update={"capacity": w}),
            }
        )
        real = replay(config.model_copy(update={"tiers": tiers}), short_trace, batch_tokens=1)
        model = grid.at(h, w)
        assert (model["hot_hits"], model["warm_hits"], model["cold_reads"]) == (
            real.tiers["hot"]["hits"],
            real.tiers["warm"]["hits"],
            real.rows_moved["cold_reads"],
        ), (h, w)
        assert model["stall_seconds"] == pytest.approx(real.modelled_stall_seconds, rel=1e-9)


def test_zipf_tuned_model_pins_what_the_store_pins(short_trace):
    """The pinned rows' lookups are hits the LRU model does not have: the two models differ, and
    the recency segment is half a small tier and fixed in a large one."""
    _, tuned = _tuned_grid(short_trace, ("zipf-tuned", "zipf-tuned"), 1, SPLITS)
    _, lru = _tuned_grid(short_trace, ("lru", "lru"), 1, SPLITS)
    assert (tuned.hot_hits[1:, 0] > lru.hot_hits[1:, 0]).all()  # pins beat LRU on this text
    model = tier_models(_tuned(short_trace, "zipf-tuned", "lru"), 80084)["hot"]
    caps = np.array([60, 400, 2500, 4000])
    assert (caps - model.segments(caps)).tolist() == [30, 200, 248, 248]


@pytest.mark.parametrize("policies", [p for p, _ in TUNED_CASES])
def test_batched_zipf_tuned_model_is_within_tolerance_of_replay(text_trace, policies):
    events, grid = _tuned_grid(text_trace, policies, None, SPLITS)
    for h, w in SPLITS:
        real = replay(_tuned(text_trace, *policies, h, w), text_trace)
        assert real.batches == grid.batches and real.lookups == grid.lookups
        assert_near_replay(grid.at(h, w), real, events.lookups, (h, w))


def test_a_bad_profile_gives_the_error_replay_gives(short_trace, tmp_path):
    from tiered_store.profile import profile_ids

    profile_ids(np.arange(50), rows=50).save(tmp_path / "other.npz")
    config = StoreConfig.from_dict(
        {
            "table": {"path": "absent.npy", "dim": 16},
            "tiers": {
                "hot": {"capacity": 10},
                "warm": {
                    "capacity": 10,
                    "policy": "zipf-tuned",
                    "profile": str(tmp_path / "other.npz"),
                },
            },
        }
    )
    errors = []
    for run in (
        lambda: replay(config, short_trace),
        lambda: recommend_split(config, short_trace, gpu_budget="1MiB", host_budget="1MiB"),
    ):
        with pytest.raises(
            ConfigError, match="profiles a table of 50 rows; this table has 80,084"
        ) as e:
            run()
        errors.append(str(e.value))
    assert errors[0] == errors[1] and errors[0].startswith("tiers.warm.profile: ")


def test_the_printed_split_says_what_each_figure_is(short_trace):
    """'fetch 34.40%; stall 0.0228 s over 250 batches (fetch 0.0228 s)' named a ratio and a time
    alike, and the frontier's GPU and host columns did not say they hold the tiers' metadata."""
    config = _tuned(short_trace, "zipf-tuned", "sieve")
    rec = recommend_split(config, short_trace, gpu_budget="1MiB", host_budget="1MiB", points=4)
    text = "\n".join(rec.lines())
    assert f"fetch {rec.fetch_ratio:.2%} (rows read from cold per lookup)" in text
    assert f"hot hit {rec.hot_hit_ratio:.2%} (of all lookups)" in text
    assert f"miss {rec.miss_ratio:.2%} (of all lookups)" in text
    assert f"of their {rec.fetch_seconds:.4f} s of modelled fetches" in text
    assert "GPU and host: each tier's bytes, its metadata included" in text


def test_policies_the_model_does_not_know_are_modelled_as_lru_and_said_so(short_trace):
    config = _tuned(short_trace, "zipf-tuned", "sieve")
    rec = recommend_split(config, short_trace, gpu_budget="1MiB", host_budget="1MiB", points=4)
    assert rec.model == {"hot": "zipf-tuned", "warm": "lru"}
    assert rec.notes == [
        "tiers.warm.policy 'sieve': modelled as LRU (the split model knows lru, and zipf-tuned "
        "with a profile, fixed pins and an LRU recency segment)"
    ]
    text = "\n".join(rec.lines())
    assert "(hot zipf-tuned, warm LRU," in text and "note: tiers.warm.policy 'sieve'" in text
    # a tier modelled as LRU is replayed (and printed) as LRU: it is sized as LRU where its own
    # policy keeps less, within the budget as the LRU tier. Static keeps no eviction metadata
    # (sized with none, it was 8% over as the LRU tier); SIEVE 13 B a slot, less than LRU's clock
    # and victim buffer (24 B; sized as SIEVE, it was 4% over)
    for policy in ("static", "sieve"):
        alone = _tuned(short_trace, "zipf-tuned", policy)
        rec = recommend_split(alone, short_trace, gpu_budget=0, host_budget="500KB", points=4)
        assert rec.warm_bytes == tier_bytes(rec.warm_rows, rows=80084, row_bytes=64, policy="lru")
        lru = RowCache("warm", num_rows=80084, capacity=rec.warm_rows, spec=PolicySpec.parse("lru"))
        meta = lru.metadata_bytes()  # the replayed tier's
        replayed = rec.warm_rows * (64 + meta["per_slot"]) + 80084 * meta["per_table_row"]
        assert 0 < rec.warm_bytes == replayed <= 500_000, policy

    def hot_only(hot_tier):
        """The model of ``config`` with this hot tier, and no warm tier."""
        tiers = config.tiers.model_copy(update={"hot": hot_tier})
        return recommend_split(
            config.model_copy(update={"tiers": tiers}),
            short_trace,
            gpu_budget="1MiB",
            host_budget=0,
            points=2,
        )

    rec = hot_only(config.tiers.hot.model_copy(update={"profile": None}))
    assert rec.model["hot"] == "lru" and "learns its pins online: modelled as LRU" in rec.notes[0]
    repin_on = config.tiers.hot.repin.model_copy(update={"enabled": True})
    rec = hot_only(config.tiers.hot.model_copy(update={"repin": repin_on}))
    assert rec.model["hot"] == "lru"
    assert rec.notes[0] == (
        "tiers.hot.policy 'zipf-tuned' re-pins online (tiers.hot.repin.enabled): modelled as LRU"
    )
    # eviction headroom (more rows evicted than needed) is not modelled either, and said so
    rec = hot_only(config.tiers.hot.model_copy(update={"evict_headroom": 0.3}))
    assert rec.model["hot"] == "zipf-tuned"
    assert rec.notes[0] == "tiers.hot.evict_headroom 0.3: modelled as exact eviction (no headroom)"


def test_replay_command_checks_a_zipf_tuned_split_with_its_policies(text_trace, tmp_path, capsys):
    config = _tuned(text_trace, "zipf-tuned", "zipf-tuned", 60, 1500)
    (tmp_path / "tiers.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "out"
    argv = ["replay", str(tmp_path / "tiers.yaml"), str(text_trace), "--sweep", "", "--quiet"]
    argv += ["--no-bounds", "--out", str(out), "--gpu-budget", "1MiB", "--host-budget", "2MiB"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "(zipf-tuned tiers, modelled from one read" in text
    assert "replayed at the recommended split (zipf-tuned/zipf-tuned)" in text
    doc = json.loads((out / "replay.json").read_text())["tier_split"]
    assert doc["model"] == {"hot": "zipf-tuned", "warm": "zipf-tuned"}
    assert doc["replayed"]["policy"] == "zipf-tuned/zipf-tuned"
    assert doc["replayed"]["modelled_stall_seconds"] == pytest.approx(
        doc["stall_seconds"], rel=STALL_TOLERANCE
    )


def _reported_bytes(report: dict, tier: str, capacity: int, *, rows: int) -> int:
    """A tier's bytes as the store's ``memory_report`` gives them: payload and metadata."""
    meta = report[f"{tier}_metadata"]
    return (
        report[f"{tier}_payload_bytes"]
        + capacity * meta["per_slot"]
        + rows * meta["per_table_row"]
        + meta["per_tier"]
    )


def test_analyze_store_config_says_its_stall_is_modelled_cold_and_its_preload_starts_warm(
    text_trace,
):
    # the comment stated the modelled (cold-start) stall of a config that preloads both tiers, so
    # replaying the file gave another stall than the one it stated, without a word why
    path = text_trace.parent / "layer1.store.yaml"
    text = path.read_text()
    config = StoreConfig.from_yaml(path)
    assert config.tiers.hot.preload_rows and config.tiers.warm.preload_rows  # warm start kept
    stated = float(text.split(", stall ", 1)[1].split(" s ", 1)[0])
    cold = config.tiers.model_copy(
        update={
            t: getattr(config.tiers, t).model_copy(update={"preload_rows": None})
            for t in ("hot", "warm")
        }
    )
    cold_stall = replay(
        config.model_copy(update={"tiers": cold}), text_trace
    ).modelled_stall_seconds
    warm_stall = replay(config, text_trace).modelled_stall_seconds
    assert cold_stall == pytest.approx(stated, rel=STALL_TOLERANCE)
    assert warm_stall < stated * (1 - STALL_TOLERANCE)  # preloading: less, and not the figure
    comment = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "modelled from a cold start" in comment
    assert "preload_rows below start both tiers warm" in comment


@pytest.mark.parametrize(
    ("option", "value"), [("batch_tokens", 2.5), ("batch_tokens", True), ("points", 2.5)]
)
def test_the_split_refuses_batch_tokens_or_points_that_are_not_integers(tmp_path, option, value):
    """batch_tokens 2.5 died in numpy's cast ('Cannot cast array data from dtype(float64)'),
    True modelled batches of one lookup, and points 2.5 was a bare TypeError from the grid;
    each is a ConfigError naming the argument and the value, as replay's are."""
    path = tmp_path / "t.trace"
    ids = np.random.default_rng(0).integers(0, 1000, size=(20, 50))
    with TraceWriter(path, {"tables": [{"name": "a", "rows": 1000}]}) as w:
        for batch in ids:
            w.write(batch, "a")
            w.end_batch()
    config = StoreConfig.from_dict({"table": {"path": str(tmp_path / "none.npy"), "dim": 8}})
    with pytest.raises(ConfigError, match=rf"^{option}: got {value!r}; expected "):
        recommend_split(config, path, gpu_budget="1MiB", host_budget="1MiB", **{option: value})
    split = recommend_split(
        config, path, gpu_budget="1MiB", host_budget="1MiB", batch_tokens=np.int64(4), points=3
    )
    assert split.batches == 250  # 1,000 lookups in batches of 4

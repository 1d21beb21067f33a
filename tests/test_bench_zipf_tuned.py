"""bench/bench_zipf_tuned.py run small on a real analysis: its rows equal an independent
per-request count of the same pins and split, it records what it ran, cleans up after itself and
refuses bad options before any work."""

from __future__ import annotations

import heapq
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from tests.bench_support import CORPUS, options_in_help, run_bench
from tiered_store.trace import TraceReader

LOOKUPS = 200_000
SHARES = (0.01, 0.05, 0.10, 0.25)  # the script's


@pytest.fixture(scope="module")
def analysis(email_analysis) -> Path:
    """``tiered-store analyze --holdout 0.5`` of the email package (the tests' shared one)."""
    return email_analysis


@pytest.fixture(scope="module")
def sweep(analysis, tmp_path_factory):
    """One run with the oracle rows: (its JSON, the profile ids, the replayed ids, rows)."""
    out = tmp_path_factory.mktemp("zt_out") / "r.json"
    args = ("--analysis", str(analysis), "--lookups", str(LOOKUPS), "--oracle", "--segment-bound")
    args = (*args, "--out", str(out))
    done = run_bench("bench_zipf_tuned.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    with TraceReader(analysis / "trace.trace") as reader:
        rows = int(reader.layout[reader.table_index("layer1")]["rows"])
        profile = reader.read_all("layer1").astype(np.int64)
    with TraceReader(analysis / "holdout.trace") as reader:
        replayed = reader.read_all("layer1")[:LOOKUPS].astype(np.int64)
    return json.loads(out.read_text()), profile, replayed, rows


def lru_misses(ids: np.ndarray, pinned: set[int], size: int) -> int:
    """Per-request misses of ``pinned`` rows held for good plus an LRU of ``size`` rows."""
    lru: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for row in ids.tolist():
        if row in pinned:
            continue
        if row in lru:
            lru.move_to_end(row)
            continue
        misses += 1
        if size:
            if len(lru) >= size:
                lru.popitem(last=False)
            lru[row] = None
    return misses


def top_rows(ids: np.ndarray, rows: int, k: int) -> set[int]:
    """The ``k`` rows with the most lookups in ``ids``, ties to the lower row id."""
    counts = np.bincount(ids, minlength=rows)
    return set(np.lexsort((np.arange(rows), -counts))[:k].tolist())


def test_records_the_analysis_it_replayed(sweep, analysis):
    result, profile, replayed, rows = sweep
    report = json.loads((analysis / "report.json").read_text())
    assert result["corpus"] == report["corpus"]["description"]
    assert (result["layer"], result["rows"]) == ("layer1", rows)
    assert result["profile_lookups"] == profile.size
    assert result["replayed_lookups"] == replayed.size == LOOKUPS  # the holdout has more
    assert result["capacity_shares"] == list(SHARES)
    assert result["command"].endswith(
        f"--analysis A --lookups {LOOKUPS} --oracle --segment-bound --out r.json"
    )
    profiled = np.unique(profile).size
    for share, recency in zip(SHARES, result["recency_rows_by_rule"], strict=True):
        capacity = int(rows * share)
        assert 0 < recency <= capacity and capacity - recency <= profiled  # pins: profiled rows
    assert profiled > int(rows * SHARES[0])  # so at 1% the rule alone sizes the segment:
    assert result["recency_rows_by_rule"][0] <= int(rows * SHARES[0]) // 2 + 1  # half at most


@pytest.mark.parametrize(
    ("name", "pins_from"),
    [
        ("lru (no pinning)", None),
        ("pin by lookups, rule split", "profile"),
        ("oracle: pin by the replay's lookups", "replay"),
    ],
)
def test_rows_equal_an_independent_count(sweep, name, pins_from):
    result, profile, replayed, rows = sweep
    figures = result["miss_ratio_per_request"][name]
    for i in (0, 1):  # 1% and 5%: a python LRU over 200k lookups each
        capacity = int(rows * SHARES[i])
        if pins_from is None:
            pinned, size = set(), capacity
        else:
            size = result["recency_rows_by_rule"][i]
            source = profile if pins_from == "profile" else replayed
            pinned = top_rows(source, rows, capacity - size)
        assert figures[i] == lru_misses(replayed, pinned, size) / replayed.size


def test_oracles_pin_the_replay_s_own_rows(sweep):
    figures = sweep[0]["miss_ratio_per_request"]
    own_lookups = figures["oracle: pin by the replay's lookups"]
    own_episodes = figures["oracle: pin by the replay's episodes"]
    profile = figures["pin by lookups, rule split"]
    # knowing the replay's own counts beats a profile of other documents at every size
    assert all(o < p for o, p in zip(own_lookups, profile, strict=True))
    # from 5% on, the pins hold every row this short replay looks up: no misses at all
    assert own_lookups[1:] == own_episodes[1:] == [0.0] * 3 and min(profile) > 0
    assert 0 < own_episodes[0] < profile[0]


def belady_misses(ids: list[int], size: int) -> int:
    """Belady's MIN with bypass over ``ids``, per request: the row used furthest ahead (or the
    missed row itself, when that is it) is not kept."""
    never = len(ids)
    upcoming: dict[int, list[int]] = {}
    for t in reversed(range(len(ids))):
        upcoming.setdefault(ids[t], []).append(t)
    held: dict[int, int] = {}  # row -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, row), stale entries skipped
    misses = 0
    for row in ids:
        upcoming[row].pop()
        nxt = upcoming[row][-1] if upcoming[row] else never
        if row not in held:
            misses += 1
            if len(held) >= size:
                while heap and held.get(heap[0][1]) != -heap[0][0]:
                    heapq.heappop(heap)
                if size == 0 or -heap[0][0] <= nxt:
                    continue  # the missed row is needed last: bypass
                del held[heapq.heappop(heap)[1]]
        held[row] = nxt
        heapq.heappush(heap, (-nxt, row))
    return misses


def test_a_clairvoyant_segment_behind_the_same_pins_misses_no_more_than_lru(sweep):
    result, profile, replayed, rows = sweep
    figures = result["miss_ratio_per_request"]
    for pins, lru in (
        ("zipf-tuned", "pin by episodes W=65,536, rule split"),
        ("pin-by-lookups", "pin by lookups, rule split"),
    ):
        bound = figures[f"{pins} pins, Belady on a segment x1"]
        assert all(0 < b <= f for b, f in zip(bound, figures[lru], strict=True))
        assert bound[0] < figures[lru][0]  # at 1% the segment's choices matter
    # an independent Belady over the lookups of the rows pin-by-lookups does not pin
    size = result["recency_rows_by_rule"][0]
    pinned = top_rows(profile, rows, int(rows * SHARES[0]) - size)
    unpinned = [row for row in replayed.tolist() if row not in pinned]
    want = belady_misses(unpinned, size) / replayed.size
    assert figures["pin-by-lookups pins, Belady on a segment x1"][0] == want


def test_without_an_analysis_it_analyses_and_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args = (str(CORPUS), "--max-tokens", "20000", "--lookups", "50000", "--dir", str(work))
    done = run_bench("bench_zipf_tuned.py", *args, "--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert 0 < result["replayed_lookups"] <= 50_000 and result["profile_lookups"] > 0
    assert "oracle: pin by the replay's lookups" not in result["miss_ratio_per_request"]
    assert list(work.iterdir()) == []  # its analysis was temporary


def test_help_names_only_options_it_takes():
    done = run_bench("bench_zipf_tuned.py", "--help")
    assert done.returncode == 0
    accepted, mentioned = options_in_help(done.stdout)
    assert "--oracle" in accepted and mentioned <= accepted


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--lookups", "0"), "argument --lookups: expected an integer >= 1, got '0'"),
        (("--holdout", "1"), "--holdout 1.0: expected a share of the documents in (0, 1)"),
        (("--analysis", "{empty}"), "--analysis {empty}: no holdout.trace there"),
        (("--analysis", "{analysis}", "x.py"), "--analysis {analysis} and a corpus: give one"),
        (("--analysis", "{analysis}", "--layer", "layer9"), "--layer 'layer9': expected one of"),
    ],
)
def test_bad_options_are_refused_before_any_work(analysis, tmp_path, args, expected):
    names = {"analysis": analysis, "empty": tmp_path}
    args = [a.format(**names) for a in args]
    done = run_bench("bench_zipf_tuned.py", *args, "--out", str(tmp_path / "r.json"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert expected.format(**names) in done.stderr
    assert "miss %" not in done.stdout and not (tmp_path / "r.json").exists()

"""bench/bench_tree_cpu.py runs end to end at a tiny size (run, not imported)."""

from __future__ import annotations

import json

from tests.bench_support import ROOT, run_bench

TINY = ("--rows", "50000", "--tokens", "16384", "--rounds", "2")


def test_one_tree_against_itself_gives_a_ratio_near_one_and_the_same_replay(tmp_path):
    """The same tree twice: the processes replay the same trace to the same fetch ratio, each
    round times one process per tree, and the ratio of the medians is about 1 (a shared machine
    swings a process's CPU time, not by 5x)."""
    out = tmp_path / "tree_cpu.json"
    args = ("--trees", str(ROOT), str(ROOT), *TINY, "--dir", str(tmp_path), "--out", str(out))
    done = run_bench("bench_tree_cpu.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text())
    base, new = report["trees"]["base"], report["trees"]["new"]
    assert len(base["cpu_s"]) == len(new["cpu_s"]) == 2
    assert min(base["cpu_s"] + new["cpu_s"]) > 0
    assert base["fetch_ratio"] == new["fetch_ratio"] and 0 < base["fetch_ratio"] < 1
    assert report["lookups"] == 16384 * 16
    assert 0.2 < report["ratio_new_to_base"] < 5 and 0.2 < report["median_round_ratio"] < 5
    assert "median CPU time: base " in done.stderr and "round 2/2: base " in done.stderr
    assert str(tmp_path) not in out.read_text()  # no machine path in the report
    assert [p.name for p in tmp_path.iterdir()] == ["tree_cpu.json"]  # the trace was removed


def test_a_revision_git_does_not_know_is_refused_before_any_work():
    done = run_bench("bench_tree_cpu.py", "--rev", "no-such-rev", timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "--rev 'no-such-rev': not a commit of" in done.stderr

"""bench/bench_save_stall.py at a small tier, run as a user runs it: both policies timed against
their own baseline, its table removed, and bad options named."""

from __future__ import annotations

import json

import pytest

from tests.bench_support import run_bench

SMALL = ("--slots", "20000", "--warmup", "131072", "--saves", "2", "--seconds", "1")


def test_each_policy_is_timed_against_a_baseline_of_its_own(tmp_path):
    out = tmp_path / "r.json"
    done = run_bench(
        "bench_save_stall.py", *SMALL, "--out", str(out), env={"TMPDIR": str(tmp_path)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["slots"], result["rows"], result["saves"]) == (20000, 40000, 2)
    for policy in ("lru", "zipf-tuned"):
        cell = result[policy]
        assert cell["save_seconds"] > 0 and cell["timed_lookups"] > 0
        assert cell["longest_lookup_during_save_ms"] > 0 < cell["longest_lookup_without_save_ms"]
        ratio = cell["longest_lookup_during_save_ms"] / cell["longest_lookup_without_save_ms"]
        assert cell["ratio"] == pytest.approx(ratio)
        assert f"{policy}: save " in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # its table is gone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--slots", "100", "--rows", "50"), "--rows: got 50; expected at least --slots (100)"),
        (("--slots", "10", "--ids", "64"), "--ids: got 64; expected at most --slots (10)"),
        (("--policies", "lru,arc"), "--policies: got 'lru,arc'; expected names of lru, zipf-tuned"),
        (("--saves", "0"), "--saves"),
    ],
)
def test_bad_options_are_named(args, message, tmp_path):
    done = run_bench("bench_save_stall.py", *args, env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.iterdir())

"""bench/bench_warm_restart.py on a small trace: every restart restores the rows the first store
saved, the miss ratios agree with each other, and its files stay only with --dir, in a folder of
their own (run as a user)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.bench_support import CORPUS, run_bench
from tiered_store.trace import TraceReader

RESTARTS = ("restart_serving_at_once", "restart_hot_tier_first", "restart_restored_first")
# tiers of 10,344 and 51,720 rows of layer 1; a row of one float32 (the table is 41 MB); a
# warm-up that leaves the warm tier part-empty when saved
SMALL = ("--hot", "0.001", "--warm", "0.005", "--dim", "1", "--warmup", "40000")


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its temporary files under ``tmp_path``."""
    return run_bench("bench_warm_restart.py", *args, env={"TMPDIR": str(tmp_path)})


@pytest.fixture(scope="module")
def trace(email_analysis) -> Path:
    """The profile part of the tests' shared analysis of the email package (about 30k tokens:
    hundreds of thousands of lookups of layer 1)."""
    return email_analysis / "trace.trace"


def test_restarts_restore_the_saved_rows_and_serve_the_same_lookups(trace, tmp_path):
    user, out = tmp_path / "user", tmp_path / "r.json"
    user.mkdir()
    (user / "table.npy").write_text("the user's own")  # never overwritten
    args = (str(trace), *SMALL, "--lookups", "100000", "--dir", str(user), "--out", str(out))
    done = bench(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (work,) = (p for p in user.iterdir() if p.is_dir())  # a new folder, kept and named
    assert f"kept: {work}" in done.stdout
    assert (user / "table.npy").read_text() == "the user's own"
    result = json.loads(out.read_text())
    with TraceReader(trace) as reader:
        rows = int(reader.layout[reader.table_index("layer1")]["rows"])
    assert result["trace"] == str(trace) and str(CORPUS) in result["corpus"]
    assert (result["layer"], result["rows"], result["io"]) == ("layer1", rows, "pread")
    options = {k: result[k] for k in ("hot", "warm", "batch", "dim", "warmup", "lookups")}
    assert options == dict(hot=0.001, warm=0.005, batch=4096, dim=1, warmup=40000, lookups=100000)

    held = result["held_rows"]  # the rows saved after the warm-up
    restored = {name: result[name]["restored_rows"] for name in RESTARTS}
    assert restored["restart_restored_first"] == held  # open waited for all of them
    # the warm-up left the warm tier part-empty (held_rows was once counted after the steady
    # lookups: a full tier, where the file and the restore had fewer rows)
    assert 0 < held["hot"] <= int(rows * 0.001) and 0 < held["warm"] < int(rows * 0.005)
    assert result["saved_bytes"] >= 8 * (held["hot"] + held["warm"])  # an int64 id per row
    assert (work / "restart.saved").stat().st_size == result["saved_bytes"]
    assert restored["restart_hot_tier_first"]["hot"] == held["hot"]  # open waited for hot's
    for name in RESTARTS:  # rows lookups admitted first are not restored again
        assert restored[name]["hot"] <= held["hot"] and restored[name]["warm"] <= held["warm"]
        assert result[name]["open_seconds"] >= 0 and result[name]["restore_seconds"] >= 0

    steady = result["steady"]["cold_miss"]
    for name in ("steady", *RESTARTS, "cold_start"):
        cell = result[name]
        # cold: lookups missed by both tiers, so never more than the hot tier missed
        assert 0 <= cell["cold_miss"] <= cell["hot_miss"] <= 1
        points = 100 * (cell["cold_miss"] - steady)
        assert cell["cold_miss_points_above_steady"] == pytest.approx(points, abs=1e-9)
        assert cell["lookups_per_s"] > 0
        assert f"{name:>24}: hot miss {100 * cell['hot_miss']:.2f}%, cold miss" in done.stdout
    # both start serving with the saved hot tier whole: the hot tier misses the same lookups
    assert (
        result["restart_hot_tier_first"]["hot_miss"] == result["restart_restored_first"]["hot_miss"]
    )
    assert result["restart_restored_first"]["cold_miss"] < result["cold_start"]["cold_miss"]
    # --dir: the table and the restart files stay in its new folder
    assert {"table.npy", "table.npy.restart", "restart.saved"} <= {p.name for p in work.iterdir()}


def test_without_dir_its_table_is_deleted(trace, tmp_path):
    out = tmp_path / "r.json"
    done = bench(str(trace), *SMALL, "--lookups", "8192", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bench_warm_restart." in done.stdout  # the table went to a temporary directory ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # ... deleted at the end
    assert json.loads(out.read_text())["lookups"] == 8192


def test_help_exits_zero(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--warmup" in done.stdout and "--dir" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--hot=-0.01",),
            "argument --hot: expected a share of the rows in (0, 1], e.g. 0.01 for 1%, got '-0.01'",
        ),
        (
            ("--warm", "1.5"),
            "argument --warm: expected a share of the rows in (0, 1], e.g. 0.01 for 1%, got '1.5'",
        ),
        (("--lookups", "0"), "argument --lookups: expected an integer >= 1, got '0'"),
        (("--lookups", "10000000"), "lookups of layer1; need warmup + lookups"),
        # was taken, then refused by the store's config after making the table (330 MB at --dim 8)
        (
            ("--io", "bogus"),
            "argument --io: invalid choice: 'bogus' (choose from 'mmap', 'pread', 'direct', "
            "'uring')",
        ),
    ],
)
def test_a_bad_value_is_refused_before_making_the_table(args, message, trace, tmp_path):
    done = bench(str(trace), *SMALL, *args, tmp_path=tmp_path)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())  # argparse wraps the lines
    assert "creating" not in done.stdout and list(tmp_path.iterdir()) == []

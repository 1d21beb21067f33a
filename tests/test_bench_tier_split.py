"""bench/bench_tier_split.py on small traces: each replayed split is reported as the model and the
replay counted it, with what it ran on, and its scratch analysis deleted (run as a user runs it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench_support import CORPUS, ROOT, analyze, run_bench
from tiered_store.serve.client import subprocess_env
from zipf_analysis.tier_split import parse_budget

# small budgets that still hold rows of layer 1 (its dense row index alone is 39.5 MiB)
BUDGETS = ("--gpu-budget", "48MiB", "--host-budget", "96MiB")


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its temporary files under ``tmp_path``."""
    return run_bench("bench_tier_split.py", *args, env={"TMPDIR": str(tmp_path)})


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    """``tiered-store analyze`` of the email package (40k tokens: 640k lookups of layer 1)."""
    return analyze(tmp_path_factory.mktemp("email") / "A", max_tokens=40000)


def test_each_replayed_split_is_the_model_and_the_replay_of_that_split(analysis, tmp_path):
    out = tmp_path / "r.json"
    args = ("--analysis", str(analysis), *BUDGETS, "--replays", "3", "--out", str(out))
    done = bench(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result  # the printout is the JSON
    # progress on stderr (the model and each replay ran silent: a minute or more at full size)
    assert f"modelling the splits of layer1 in {analysis}/trace.trace" in done.stderr
    n = len(result["checks"])
    for i, check in enumerate(result["checks"], 1):
        hot, warm = check["hot_rows"], check["warm_rows"]
        assert f"replaying split {i}/{n}: {hot:,} hot + {warm:,} warm rows" in done.stderr
    public = ("--analysis", "A", *BUDGETS, "--replays", "3", "--out", "r.json")  # no machine paths
    assert result["command"] == "python bench/bench_tier_split.py " + " ".join(public)
    assert str(CORPUS) in result["corpus"]  # what the analysis read, from its report
    assert result["table"] == "layer1" and result["model"] == {"hot": "lru", "warm": "lru"}
    assert result["lru_model_seconds"] is None  # the model is the LRU one: no baseline to time
    recommended, checks = result["recommended"], result["checks"]
    assert recommended["hot_bytes"] <= parse_budget(result["gpu_budget"], flag="--gpu-budget")
    assert recommended["warm_bytes"] <= parse_budget(result["host_budget"], flag="--host-budget")
    # three distinct splits, the recommended one first: the least modelled stall of them all
    assert len({(c["hot_rows"], c["warm_rows"]) for c in checks}) == len(checks) == 3
    first = checks[0]
    assert (first["hot_rows"], first["warm_rows"]) == (
        recommended["hot_rows"],
        recommended["warm_rows"],
    )
    assert first["model"]["stall_seconds"] == recommended["stall_seconds"]
    assert first["model"]["stall_seconds"] == min(c["model"]["stall_seconds"] for c in checks)
    for check in checks:
        for counted in (check["model"], check["replay"]):
            # hits are lookups, cold reads distinct rows of a batch: together at most the lookups
            hits = counted["hot_hits"] + counted["warm_hits"]
            assert 0 <= hits + counted["cold_reads"] <= result["lookups"]
            assert counted["stall_seconds"] >= 0
            if check["hot_rows"] == 0:
                assert counted["hot_hits"] == 0
            if check["warm_rows"] == 0:
                assert counted["warm_hits"] == 0
        error = check["model"]["stall_seconds"] / check["replay"]["stall_seconds"] - 1
        assert check["stall_error"] == pytest.approx(error, abs=1e-12)
    # no tiers (the frontier's cheapest split, always replayed): every batch's distinct rows are
    # read, in the model and in the replay alike
    (bare,) = [c for c in checks if c["hot_rows"] == c["warm_rows"] == 0]
    assert bare["model"] == bare["replay"] and bare["stall_error"] == 0
    per_replay = sum(c["replay_seconds"] for c in checks) / len(checks)
    assert result["replay_seconds_per_split"] == pytest.approx(per_replay, rel=1e-12)
    ratio = result["model_seconds"] / result["replay_seconds_per_split"]
    assert result["model_time_in_replays"] == pytest.approx(ratio, rel=1e-12)
    assert result["splits_modelled"] >= len(checks) and result["stack_passes"] >= 1


def test_without_analysis_it_analyses_the_stdlib_and_deletes_its_scratch(tmp_path):
    out = tmp_path / "r.json"
    done = bench(
        *("--max-tokens", "10000", *BUDGETS, "--replays", "1", "--policy", "zipf-tuned"),
        *("--out", str(out)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["corpus"].startswith("Python standard library")  # as analyze describes it
    assert result["lookups"] == 10000 * 16  # --max-tokens: layer 1 looks up 16 heads per token
    assert result["model"] == {"hot": "zipf-tuned", "warm": "zipf-tuned"}
    assert result["lru_model_seconds"] > 0  # the LRU model of the same grid, timed as baseline
    assert len(result["checks"]) == 1  # --replays 1: the recommended split alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # the scratch is gone


def test_sigterm_while_analysing_deletes_the_scratch(tmp_path):
    """The scratch analysis was made before the block that deletes it: SIGTERM (or Ctrl-C, or
    an error) while analysing left it, traces and all, in the temporary folder."""
    script = [sys.executable, str(ROOT / "bench" / "bench_tier_split.py")]
    env = subprocess_env({"TMPDIR": str(tmp_path)})
    proc = subprocess.Popen([*script, "--max-tokens", "300000"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(tmp_path.rglob("*.trace*")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert any(tmp_path.iterdir())  # its scratch analysis, while it analyses
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_help_exits_zero(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--gpu-budget" in done.stdout and "--replays" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--replays", "0"),
            "argument --replays: expected at least 1 (the recommended split), got '0'",
        ),
        (
            ("--gpu-budget=-5MiB",),
            "--gpu-budget: got '-5MiB'; expected a byte size like '8GiB', '512MB' or 0",
        ),
        (
            ("--policy", "fastest"),
            "--policy: unknown policy 'fastest' in 'fastest'; expected an eviction",
        ),
        (("--max-tokens", "-1"), "argument --max-tokens: expected at least 1 token, got '-1'"),
    ],
)
def test_a_bad_value_is_refused_before_analysing(args, message, tmp_path):
    done = bench("--max-tokens", "10000", *args, tmp_path=tmp_path)
    assert done.returncode == 2  # argparse's, with the usage
    assert message in done.stderr
    assert list(tmp_path.iterdir()) == []  # no scratch analysis begun


def test_a_budget_that_holds_no_row_is_refused_by_name(analysis, tmp_path):
    done = bench("--analysis", str(analysis), "--gpu-budget", "4MiB", tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "bench_tier_split.py: error: --gpu-budget: 4194304 bytes (4.0 MiB) holds no row of this table"
        in done.stderr
    )


def test_analysis_and_table_are_refused_by_name_before_any_work(tmp_path):
    """--analysis of a folder that is no analysis exited 1 naming a missing layer1.store.yaml,
    not the option; a --table not in the analysis was found only after it was made."""
    analysis = tmp_path / "a"
    analysis.mkdir()
    (analysis / "report.json").write_text(json.dumps({"tables": {"layer1": {}}}))
    cases = [
        (["--analysis", str(tmp_path / "missing")], "--analysis", "no report.json"),
        (["--analysis", str(analysis), "--table", "layer9"], "--table", "expected one of layer1"),
        (["--table", "layer9"], "--table", "the default Engram config"),
    ]
    for args, option, expected in cases:
        done = run_bench("bench_tier_split.py", *args)
        error = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and f"error: {option} " in error and expected in error, error

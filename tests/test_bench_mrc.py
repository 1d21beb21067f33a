"""bench/bench_mrc.py on a small Zipf trace: its exact LRU figures match a plain LRU simulation,
SHARDS and Belady agree with them, the speeds follow from the times, and bad options are refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from tests.bench_support import ROOT, run_bench
from tiered_store.serve.client import subprocess_env
from zipf_analysis.zipf_fit import sample_zipf


def lru_miss_ratio(ids: np.ndarray, capacity: int) -> float:
    """Misses / lookups of an LRU cache of ``capacity`` rows, simulated one lookup at a time."""
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for row in ids.tolist():
        if row in cache:
            cache.move_to_end(row)
            continue
        misses += 1
        cache[row] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    return misses / ids.size


def rate_within_rounding(rate: float, count: int, seconds: float) -> bool:
    """``rate`` (rounded to 1) is ``count`` over a time that JSON shows as ``seconds`` (rounded
    to 3 decimals)."""
    slowest = count / (seconds + 5e-4)
    fastest = count / (seconds - 5e-4) if seconds > 5e-4 else math.inf
    return slowest - 0.5 <= rate <= fastest + 0.5


def speedup_within_rounding(speedup: float, slow: float, fast: float) -> bool:
    """``speedup`` (rounded to 0.1) is ``slow / fast``, both shown rounded to 3 decimals."""
    low = (slow - 5e-4) / (fast + 5e-4)
    high = (slow + 5e-4) / (fast - 5e-4) if fast > 5e-4 else math.inf
    return low - 0.05 <= speedup <= high + 0.05


def test_figures_match_an_lru_simulation_and_the_curves_agree(tmp_path):
    lookups, rows, exponent, seed = 200_000, 2_000_000, 0.8, 3
    out = tmp_path / "mrc.json"
    done = run_bench(
        "bench_mrc.py",
        *("--lookups", str(lookups), "--rows", str(rows), "--exponent", str(exponent)),
        *("--seed", str(seed), "--rate", "0.1", "--fixed-size", "8192", "--belady-points", "5"),
        *("--out", str(out)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result  # printed and written alike
    assert f"wrote {out}\n" in done.stderr  # said where (stdout stays the JSON)
    # each phase said on stderr as it starts (a minute or more without a word at full size)
    phases = [
        f"sampling {lookups:,} Zipf lookups over {rows:,} rows ...",
        "exact LRU ...",
        "SHARDS at rate 0.1 ...",
        "SHARDS of 8,192 rows ...",
        "Belady at 5 capacities ...",
        f"wrote {out}",
    ]
    assert done.stderr.splitlines() == phases

    # what it ran on, and that this is the trace it measured: regenerated from what it recorded
    trace = result["trace"]
    assert {k: trace[k] for k in ("lookups", "rows", "exponent", "seed")} == {
        "lookups": lookups,
        "rows": rows,
        "exponent": exponent,
        "seed": seed,
    }
    ids = sample_zipf(lookups, rows, exponent, seed=seed)
    distinct = int(np.unique(ids).size)
    assert trace["distinct_rows"] == distinct
    assert result["memory"]["generate"]["trace_array_mib"] == round(8 * lookups / 2**20, 1)

    # exact LRU: one curve point per capacity 0..distinct rows; the 1% figure is what an LRU
    # cache of rows // 100 rows misses; 10% of the table holds every distinct row (rows // 10 >=
    # lookups), so only the first lookup of each row misses there
    exact = result["exact_lru"]
    assert exact["curve_points"] == distinct + 1
    assert exact["miss_ratio_at_1pct_table"] == pytest.approx(
        lru_miss_ratio(ids, rows // 100), abs=5e-5
    )
    assert exact["miss_ratio_at_10pct_table"] == round(distinct / lookups, 4)
    assert exact["miss_ratio_at_1pct_table"] > exact["miss_ratio_at_10pct_table"]
    assert rate_within_rounding(exact["lookups_per_s"], lookups, exact["seconds"])

    # SHARDS, fixed rate and fixed size: near the exact curve (the script's target at 20M
    # lookups is 0.01; this trace is 100x shorter), timed against it
    for name in ("shards_fixed_rate", "shards_fixed_size"):
        approx = result[name]
        assert approx["mae_linear"] < 0.02 and approx["mae_log"] < 0.03, (name, approx)
        assert rate_within_rounding(approx["lookups_per_s"], lookups, approx["seconds"])
        assert speedup_within_rounding(
            approx["speedup_vs_exact"], exact["seconds"], approx["seconds"]
        )
    assert result["shards_fixed_rate"]["rate"] == pytest.approx(0.1, abs=1e-6)
    fixed = result["shards_fixed_size"]
    assert fixed["fixed_size"] == 8192  # it lowered its rate until about that many rows stayed
    assert 0.9 * 8192 < fixed["final_rate"] * distinct < 1.1 * 8192

    # Belady's MIN at log-spaced capacities up to the distinct rows: never above LRU at the same
    # capacity, both falling with it, equal (only cold misses) where every row fits
    belady = result["belady"]
    caps, mins, lrus = belady["capacities"], belady["miss_ratio"], belady["lru_miss_ratio"]
    assert len(caps) == len(mins) == len(lrus) == 5 and caps[-1] == distinct
    assert caps == sorted(set(caps))
    assert all(m <= lru for m, lru in zip(mins, lrus, strict=True))
    assert mins == sorted(mins, reverse=True) and lrus == sorted(lrus, reverse=True)
    assert mins[-1] == lrus[-1] == round(distinct / lookups, 4)
    assert lrus[0] == pytest.approx(lru_miss_ratio(ids, caps[0]), abs=5e-5)


def test_help_and_refusals(tmp_path):
    done = run_bench("bench_mrc.py", "--help")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--fixed-size FIXED_SIZE" in done.stdout and "--belady-points" in done.stdout
    out = tmp_path / "mrc.json"
    for option, value, message in (
        ("--lookups", "-5", "argument --lookups: expected a positive number of lookups, got '-5'"),
        ("--rate", "0", "argument --rate: expected a sampling rate R with 0 < R <= 1, got '0'"),
        (
            "--fixed-size",
            "-1",
            "argument --fixed-size: expected 0 (skip) or a positive number of rows, got '-1'",
        ),
        ("--exponent", "nan", "--exponent nan: expected a finite Zipf exponent >= 0"),
        # was measured: a trace of one row, its exponent written to the JSON as null
        ("--exponent", "inf", "--exponent inf: expected a finite Zipf exponent >= 0"),
    ):
        done = run_bench("bench_mrc.py", option, value, "--out", str(out))
        assert done.returncode == 2, (option, done.stderr[-3000:])  # argparse's, with the usage
        assert message in done.stderr
        assert done.stdout == "" and not out.exists()  # refused before measuring anything


def test_with_stderr_closed_stdout_is_the_report_alone(tmp_path):
    """With stderr closed (``2>&-``), Python's sys.stderr is None and print(file=None) prints on
    stdout: the phases and 'wrote PATH' went into the JSON report the script prints there."""
    out = tmp_path / "mrc.json"
    args = ["--lookups", "20000", "--rows", "200000", "--belady-points", "3", "--out", str(out)]
    done = subprocess.run(
        ["bash", "-c", 'exec "$@" 2>&-', "bash", sys.executable, ROOT / "bench" / "bench_mrc.py"]
        + args,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert json.loads(done.stdout) == json.loads(out.read_text())

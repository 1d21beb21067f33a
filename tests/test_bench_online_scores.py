"""bench/bench_online_scores.py on a small analysis: each score's captured share recomputed by hand
for one of them, bounded by the oracle, and growing with the tier; bad values refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.bench_support import run_bench
from tiered_store.trace import TraceReader

WINDOW, WARMUP, EVERY = 16384, 100_000, 65536


def bench(*args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it."""
    return run_bench("bench_online_scores.py", *args)


@pytest.fixture(scope="module")
def analysis(email_analysis) -> Path:
    """``tiered-store analyze --holdout 0.5`` of the email package (the tests' shared one)."""
    return email_analysis


@pytest.mark.parametrize("future", ["episodes", "returns"])
def test_captured_shares_agree_with_a_count_by_hand(future, analysis, tmp_path):
    out = tmp_path / "r.json"
    done = bench(
        str(analysis),
        *("--shares", "1%,5%", "--window", str(WINDOW), "--warmup", str(WARMUP)),
        *("--every", str(EVERY), "--future", future, "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    with TraceReader(analysis / "holdout.trace") as reader:
        rows = int(reader.layout[reader.table_index("layer1")]["rows"])
        ids = reader.read_all("layer1").astype(np.int64)
    windows = [np.unique(ids[at : at + WINDOW]) for at in range(0, ids.size - WINDOW + 1, WINDOW)]
    first, span = 7, 4  # ceil(100,000 / 16,384) windows of warm-up, 65,536 lookups a ranking
    assert result["future"] == future
    assert result["rankings_at"][0] == first * WINDOW and result["every"] == span * WINDOW
    assert result["rankings_at"][-1] + span * WINDOW <= len(windows) * WINDOW
    captured = result["captured"]
    assert "offline" in done.stdout and "oracle" in done.stdout

    # "episodes, no decay" at the first ranking, by hand: windows so far per row, its top rows
    future_kind, past, future = future, np.zeros(rows), np.zeros(rows)
    for rows_of in windows[:first]:
        past[rows_of] += 1
    for before, rows_of in zip(
        windows[first - 1 : first + span - 1], windows[first : first + span], strict=True
    ):
        # returns: only the rows the window before did not look up
        future[np.setdiff1d(rows_of, before) if future_kind == "returns" else rows_of] += 1
    for share in ("0.01", "0.05"):
        k = result["pinned_rows"][share]
        assert 0 < k < int(rows * float(share))  # the tier less its recency segment
        seen = np.flatnonzero(past > 0)
        top = seen[np.argsort(-past[seen], kind="stable")[:k]]
        by_hand = future[top].sum() / future.sum()
        assert captured["episodes, no decay"][share]["at"][0] == pytest.approx(by_hand)

    for name, cells in captured.items():
        small, big = cells["0.01"], cells["0.05"]
        assert small["mean"] == pytest.approx(np.mean(small["at"]))
        for a, b, best in zip(
            small["at"], big["at"], captured["oracle"]["0.05"]["at"], strict=True
        ):
            assert 0 <= a <= b <= best <= 1, name  # top rows nest; none beats the future's own
        assert big["mean"] > 0, name


def test_a_bad_value_is_refused_before_any_work(analysis):
    done = bench(str(analysis), "--decay", "1.5")
    assert done.returncode == 2 and "--decay 1.5: expected a weight in (0, 1]" in done.stderr
    done = bench(str(analysis), "--warmup", "9000000", "--lookups", "10000000")
    assert done.returncode == 2, done.stderr[-3000:]  # argparse's, with the usage (was 1)
    assert "--warmup 9,000,000 and --every 2,490,368: expected at least" in done.stderr
    assert f"{analysis}/holdout.trace holds " in done.stderr and "lookups of layer1" in done.stderr
    assert done.stdout == ""
    # --lookups, not the trace, cut the replay short: it said "the trace holds only 0 lookups"
    done = bench(str(analysis), "--warmup", "100", "--every", "100", "--lookups", "50")
    assert done.returncode == 2, done.stderr[-3000:]
    expected = "--warmup 100 and --every 100: expected at least 131,072 lookups (whole windows "
    text = " ".join(done.stderr.split())  # argparse wraps the lines
    assert expected + "of 65,536) to replay; --lookups 50" in text, text
    assert "Traceback" not in done.stderr and done.stdout == ""

"""bench/bench_online_profile.py on a small analysis: shares labelled as given (sub-percent too),
miss ratios that agree with each other and with a bigger tier, and what it ran on recorded."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.bench_support import CORPUS, run_bench
from tiered_store.trace import TraceReader

MODES = (  # docs/policies.md's columns
    "offline",
    "online",
    "online_offline_start",
    "exact_warmup",
    "suffix_backoff",
    "oracle_warmup_rows",
)


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its temporary files under ``tmp_path``."""
    return run_bench("bench_online_profile.py", *args, env={"TMPDIR": str(tmp_path)})


@pytest.fixture(scope="module")
def analysis(email_analysis) -> Path:
    """``tiered-store analyze --holdout 0.5`` of the email package (the tests' shared one)."""
    return email_analysis


def test_each_share_is_labelled_as_given_and_a_bigger_tier_misses_less(analysis, tmp_path):
    out = tmp_path / "r.json"
    done = bench(
        str(analysis),
        *("--shares", "0.1%,0.5%", "--warmup", "100000", "--window", "16384"),
        *("--lookups", "10000000", "--out", str(out)),  # more than the trace holds: all of it
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    with TraceReader(analysis / "holdout.trace") as reader:
        rows = int(reader.layout[reader.table_index("layer1")]["rows"])
        lookups = reader.read_all("layer1").size
    assert str(CORPUS) in result["corpus"] and result["layer"] == "layer1"
    assert (result["rows"], result["window"], result["warmup"]) == (rows, 16384, 100000)
    assert result["served"] == lookups - 100000  # the rest of the held-out trace
    small, big = result["shares"]
    assert (small["share"], big["share"]) == (0.001, 0.005)
    assert "0.1%: offline" in done.stdout and "0.5%: offline" in done.stdout  # not "0%"
    for cell in (small, big):
        cap = int(rows * cell["share"])
        assert all(0 <= cell[mode] <= 1 for mode in MODES)
        for name in ("online", "online_offline_start"):  # at most half the tier is recency
            assert 0 < cell[f"{name}_recency_rows"] <= cap // 2
            assert cell[f"{name}_counter_bytes"] > 0
        assert 0 < cell["offline_recency_rows"] <= cap
        line = f"{100 * cell['share']:g}%: offline {100 * cell['offline']:.2f}%, online "
        assert line + f"{100 * cell['online']:.2f}%" in done.stdout
        # the warm-up's rows ranked by what they do next pin better than by what they did
        assert cell["oracle_warmup_rows"] < cell["exact_warmup"]
    assert big["online_counter_bytes"] > small["online_counter_bytes"]  # sized from the tier
    # offline and exact warm-up counts pin a prefix of one ranking (the tier's rows less its
    # recency segment) and keep an LRU of the rest: where the bigger tier pins and recalls at
    # least as many rows, it misses no more of the same lookups (LRU's inclusion property)
    for mode, recency in (
        ("offline", "offline_recency_rows"),
        ("exact_warmup", "online_recency_rows"),
        ("suffix_backoff", "online_recency_rows"),
        ("oracle_warmup_rows", "online_recency_rows"),
    ):
        small_pins = int(rows * small["share"]) - small[recency]
        big_pins = int(rows * big["share"]) - big[recency]
        assert big_pins >= small_pins and big[recency] >= small[recency]
        assert big[mode] <= small[mode], mode


def test_help_exits_zero(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--shares" in done.stdout and "--window" in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [  # 2: refused with the options (argparse's), or once the trace is read (named by the script)
        (("--shares", "5%,150%"), 2, "--shares '5%,150%': expected shares of the rows in (0, 1]"),
        (("--warmup=-5",), 2, "argument --warmup: expected at least 1 lookup, got '-5'"),
        (("--lookups", "1000"), 2, "--lookups 1000: expected more than --warmup (5,000,000)"),
        (
            ("--warmup", "9000000", "--lookups", "10000000"),
            2,
            "bench_online_profile.py: error: --warmup 9,000,000: the trace holds only",
        ),
    ],
)
def test_a_bad_value_is_refused_before_any_work(args, code, message, analysis, tmp_path):
    done = bench(str(analysis), *args, tmp_path=tmp_path)
    assert done.returncode == code
    assert message in done.stderr
    assert done.stdout == ""  # no share measured

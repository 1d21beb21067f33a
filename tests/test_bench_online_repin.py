"""bench/bench_online_repin.py replays the modes asked for, with each one's speed against lru's
in the same run, and names a mode it does not know (run, not imported: it sets torch's threads)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.bench_support import CORPUS, analyze, run_bench
from tiered_store.trace import TraceReader


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its work directory under ``tmp_path``."""
    return run_bench("bench_online_repin.py", *args, "--dir", str(tmp_path))


def test_times_only_the_replay_modes_asked_for(tmp_path):
    out = tmp_path / "r.json"
    done = bench(
        str(CORPUS),
        *("--skip-all-hit", "--max-tokens", "60000", "--shares", "5%"),
        *("--replay-modes", "online,lru", "--skip-bounds", "--chunk", "131072"),
        *("--warmup", "65536", "--lookups", "400000", "--prior-weight", "2", "--out", str(out)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["fetch_ratio"]
    assert result["repin"] == {"enabled": True, "prior_weight": 2.0}  # only what was given
    cell = result["shares"]["5%"]
    online = "zipf-tuned, online only (no profile)"
    assert list(cell) == ["lru", online]  # in the table's order, no bounds (c)
    assert cell["lru"]["replay_speed_to_lru"] == 1.0
    speed = cell[online]["replay_lookups_per_s"] / cell["lru"]["replay_lookups_per_s"]
    assert cell[online]["replay_speed_to_lru"] == speed > 0
    assert cell[online]["repins"] > 0 and cell["lru"]["repins"] == 0
    for mode in cell.values():  # the chunks tile the replay and add up to its fetch ratio
        chunks = mode["fetch_ratio_per_chunk"]
        assert len(chunks) >= 3 and chunks[0]["from"] == 0
        assert all(c["to"] - c["from"] == 131072 for c in chunks[:-1])
        assert all(a["to"] == b["from"] for a, b in zip(chunks, chunks[1:], strict=False))
        assert 0 < chunks[-1]["to"] - chunks[-1]["from"] <= 131072
        reads = sum(c["fetch_ratio"] * (c["to"] - c["from"]) for c in chunks)
        assert reads / chunks[-1]["to"] == pytest.approx(mode["fetch_ratio_all"], rel=1e-9)


def test_help_explains_the_options(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = " ".join(done.stdout.split())  # argparse wraps the lines
    assert "former schedule (1M, 10%, 0.9)" in text  # a % in a help string is escaped
    assert "--then THEN" in text and "--chunk CHUNK" in text


def test_names_an_unknown_replay_mode_before_any_work(tmp_path):
    # every refusal is argparse's exit 2, with the usage
    done = bench("--replay-modes", "lru,fastest", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "--replay-modes 'lru,fastest'" in done.stderr and "unknown: fastest" in done.stderr
    assert "lru, fixed, repinned, online, former" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making its work directory
    done = bench("--then", str(tmp_path), "--switch-at", "-5", tmp_path=tmp_path)
    assert done.returncode == 2
    assert (
        "argument --switch-at: expected at least 65,536 lookups (a batch), got '-5'" in done.stderr
    )
    done = bench("--then", str(tmp_path), tmp_path=tmp_path)
    assert done.returncode == 2
    assert f"--then {tmp_path}: no holdout.trace there (analyze --holdout)" in done.stderr
    # refused only after the all-hit part's minutes (the analysis is read by the replay)
    done = bench("--analysis", str(tmp_path), tmp_path=tmp_path)
    assert done.returncode == 2
    assert f"--analysis {tmp_path}: no holdout.trace there (analyze --holdout)" in done.stderr
    done = bench("--profile-from", str(tmp_path), tmp_path=tmp_path)
    assert done.returncode == 2
    assert f"--profile-from {tmp_path}: no layer1.profile.npz there" in done.stderr
    done = bench("--chunk", "-5", tmp_path=tmp_path)
    assert done.returncode == 2
    assert (
        "argument --chunk: expected 0 or at least 65,536 lookups (a batch), got '-5'" in done.stderr
    )
    done = bench("--chunk", "100", tmp_path=tmp_path)  # not a whole batch: refused after parsing
    assert done.returncode == 2
    assert "--chunk 100: expected 0 or at least 65,536 lookups (a batch)" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--hit-batches", "1024,x", "a comma-separated list of integers >= 1"),
        ("--hit-batches", "0", "a comma-separated list of integers >= 1"),
        ("--hit-batches", "", "a comma-separated list of integers >= 1"),
        ("--hit-zipf", "0,-0.5", "a comma-separated list of numbers >= 0"),
        ("--hit-zipf", "0.75,nan", "a comma-separated list of numbers >= 0"),
        # refused by the analysis, after the all-hit part's minutes
        ("--holdout", "1.5", "a share of the documents in (0, 1)"),
        ("--holdout", "0", "a share of the documents in (0, 1)"),
    ],
)
def test_refuses_a_bad_list_before_any_work(tmp_path, option, value, expected):
    done = bench(option, value, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]  # argparse's, with the usage
    assert f"argument {option}: expected {expected}, got {value!r}" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making its work directory


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("--prior-weight", "-1"),
            "--prior-weight -1.0: Input should be greater than or equal to 0",
        ),
        (("--decay", "1.5"), "--decay 1.5: Input should be less than or equal to 1"),
        (("--budget", "lots"), "--budget lots: got 'lots'; expected a row count >= 1 or a share"),
    ],
)
def test_refuses_a_repin_setting_the_store_would_before_any_work(tmp_path, args, expected):
    done = bench(*args, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]  # argparse's, with the usage
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making its work directory


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_refuses_a_bad_large_zipf_before_any_work(tmp_path, value):
    """--large-zipf was any float: the other parts' minutes ran, then (d) ended in a ValueError
    traceback from the id sampler (inf: a trace of one row)."""
    done = bench("--large-rows", "1000", "--large-zipf", value, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"--large-zipf {float(value)}: expected a finite Zipf exponent >= 0" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making its work directory


def test_refuses_a_layer_the_analysis_has_not_before_any_work(email_analysis, tmp_path):
    """--layer was taken as given: the all-hit part's minutes ran, then the replay ended in
    "trace ...: no table 'layer2'"."""
    done = bench("--analysis", str(email_analysis), "--layer", "layer2", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    expected = f"--layer layer2: no such table in --analysis {email_analysis}; expected one of"
    assert expected in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making its work directory
    done = bench("--layer", "layer2", tmp_path=tmp_path)  # the analysis this run would make
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--layer layer2: no such table in the default Engram config" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_traffic_that_changes_kind_follows_the_first_trace_at_the_switch(email_analysis, tmp_path):
    first, then = email_analysis, tmp_path / "json"  # the email package, then the json one
    analyze(then, max_tokens=100000, holdout=0.5, shuffle=True, corpus=Path(json.__file__).parent)
    out = tmp_path / "r.json"
    done = bench(
        *("--analysis", str(first), "--then", str(then), "--switch-at", "200000"),
        *("--skip-all-hit", "--shares", "5%", "--replay-modes", "online", "--skip-bounds"),
        *("--warmup", "65536", "--out", str(out)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["fetch_ratio"]
    with TraceReader(then / "holdout.trace") as reader:
        then_lookups = reader.read_all("layer1").size
    switch = 200000 - 200000 % 65536  # whole batches
    assert report["then"] == {"trace": str(then / "holdout.trace"), "switch_at": switch}
    assert report["lookups"] == switch + then_lookups


def test_a_warm_up_past_the_trace_is_refused_by_the_scripts_name(email_analysis, tmp_path):
    """A ``--warmup`` as long as the trace was a bare ``SystemExit``: exit 1 and a line that
    named no script (as a ``--switch-at`` past it or a ``--then`` of another table did)."""
    done = bench(
        *("--analysis", str(email_analysis), "--warmup", "99999999", "--lookups", "100000000"),
        *("--skip-all-hit", "--shares", "5%", "--replay-modes", "online", "--skip-bounds"),
        tmp_path=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "bench_online_repin.py: error: --warmup 99,999,999: the trace has only" in done.stderr

"""bench/bench_cold_path.py refuses clearly when fio, its baseline, is missing, and a bad count
before any work (run, not imported)."""

from __future__ import annotations

import pytest

from tests.bench_support import run_bench


def test_refuses_without_fio(tmp_path):
    env = {"PATH": str(tmp_path)}  # an empty PATH: no fio
    done = run_bench("bench_cold_path.py", "--dir", str(tmp_path), env=env, timeout=120)
    assert done.returncode == 2
    assert "fio is not installed" in done.stderr and "apt-get install fio" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making a table


def test_refuses_a_bad_count_before_any_work(tmp_path):
    done = run_bench("bench_cold_path.py", "--dir", str(tmp_path), "--pairs", "0", timeout=120)
    assert done.returncode == 2  # argparse's, with the usage
    assert "argument --pairs: expected an integer >= 1, got '0'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making a table


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--depths", "4,x"),
        ("--depths", "0"),
        ("--threads", "8,"),
        ("--threads", ""),
        ("--store-depths", "32,-1"),
    ],
)
def test_refuses_a_bad_list_before_any_work(tmp_path, option, value):
    done = run_bench("bench_cold_path.py", "--dir", str(tmp_path), option, value, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]  # argparse's, with the usage
    expected = f"argument {option}: expected a comma-separated list of integers >= 1, got {value!r}"
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making a table

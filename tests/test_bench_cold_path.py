"""bench/bench_cold_path.py refuses clearly when fio, its baseline, is missing, and a bad count
before any work; without fio (``--no-fio``) it runs at a tiny size against disk_probe's io_uring
reads (run, not imported)."""

from __future__ import annotations

import json

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


TINY = (
    *("--table-gib", "0.02", "--rounds", "1", "--pairs", "2", "--seconds", "0.05"),
    *("--depths", "1,32", "--threads", "1,2", "--store-depths", "32", "--headline-depth", "32"),
)


def test_runs_without_fio_against_the_python_probe(tmp_path):
    out = tmp_path / "report" / "cold.json"
    out.parent.mkdir()  # --out names a file in an existing folder
    env = {"PATH": str(tmp_path)}  # an empty PATH: no fio
    args = ("--no-fio", "--dir", str(tmp_path), *TINY, "--out", str(out))
    done = run_bench("bench_cold_path.py", *args, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["fio"] is None
    assert report["headline"]["baseline"] == "disk_probe io_uring QD32"
    results = report["results"]
    assert not any(name.startswith("fio") for name in results)
    assert results["disk_probe io_uring QD32"]["ratio_to_baseline"] == 1.0
    for name in ("ColdTable direct x2", "ColdTable uring QD32", "store lookup uring QD32"):
        assert results[name]["rate"] > 0 and results[name]["requests_per_s"] > 0, name
    assert report["headline"]["ratio_median"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert f"wrote {out}\nwrote {out.with_suffix('.png')}\n" in done.stderr  # said where
    assert "baseline: disk_probe io_uring QD32" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # the table was deleted


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # fio's baseline too reads at depth 32: it crashed after every round without it
        (("--depths", "1,8"), "--depths [1, 8]: the baseline reads at queue depth 32; expected"),
        (("--no-fio", "--depths", "1,8"), "--depths [1, 8]: the baseline reads at queue depth 32"),
        (("--table-gib", "0.001"), "--batch 16,384: more than the table's 8,388 rows"),
        (("--table-gib", "0"), "argument --table-gib: expected a number > 0, got '0'"),
        # past ColdTable's limits: refused after the table was made (a minute for the default)
        (
            ("--no-fio", "--table-gib", "0.02", "--threads", "1,300"),
            "--threads [1, 300]: ColdTable reads with at most 256 threads; expected each <= 256",
        ),
        (
            ("--no-fio", "--table-gib", "0.02", "--depths", "32,5000"),
            "--depths [32, 5000]: a ring holds at most 4096 reads in flight; expected each <= 4096",
        ),
        (
            (
                "--no-fio",
                "--table-gib",
                "0.02",
                "--store-depths",
                "5000",
                "--headline-depth",
                "5000",
            ),
            "--store-depths [5000]: a ring holds at most 4096 reads in flight; expected each <=",
        ),
    ],
)
def test_refuses_settings_it_cannot_run_before_any_work(tmp_path, args, message):
    done = run_bench("bench_cold_path.py", "--dir", str(tmp_path), *args, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert "making a" not in done.stdout  # no table made first
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_dir_that_does_not_exist(tmp_path):
    done = run_bench("bench_cold_path.py", "--dir", str(tmp_path / "no"), timeout=120)
    assert done.returncode == 2
    assert f"argument --dir: '{tmp_path / 'no'}' does not exist; expected an existing" in (
        done.stderr
    )

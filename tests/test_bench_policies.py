"""bench/bench_policies.py on a small corpus: it records what it analysed, sizes every tier as
libCacheSim's (sub-percent shares too), and keeps its work directory only with --keep (run, not
imported, as a user runs it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.bench_support import CORPUS, ROOT, run_bench
from tiered_store.atomic_file import write_json
from tiered_store.serve.client import subprocess_env

pytest.importorskip("libcachesim")


def test_small_tiers_are_sized_and_the_corpus_recorded(email_analysis, tmp_path):
    work, out = tmp_path / "work", tmp_path / "r.json"
    work.mkdir()
    done = run_bench(  # on the tests' shared analysis; test_keep... runs one of its own
        "bench_policies.py",
        *("--analysis", str(email_analysis)),
        *("--lookups", "150000", "--policies", "lru,zipf-tuned"),
        *("--shares", "0.1%,0.5%", "--out", str(out), "--dir", str(work)),
        *("--queued-requests", "2", "--request-tokens", "512"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert str(CORPUS) in result["corpus"] and "(shuffled)" in result["corpus"]
    assert result["capacity_shares"] == [0.001, 0.005]
    assert "lru at 0.1%: fetch" in done.stdout
    lru = result["ours_miss_ratio"]["lru"]
    # a tier of 10,344 rows (0.1%) misses more than one of 51,720 (0.5%): "0.1%" was once sized
    # as "0%", and both read every row of every batch
    assert lru[0] > lru[1]
    # batched LRU and libCacheSim's per-request LRU on the same rows: close, and never better
    # than Belady on them
    libcachesim = result["libcachesim_miss_ratio"]
    for ours, theirs, belady in zip(lru, libcachesim["LRU"], libcachesim["Belady"], strict=True):
        assert belady < ours < theirs + 0.05
    queued = result["queued"]
    assert queued["request_tokens"] == 512
    names = ["zipf-tuned, 2 queued", "pin-by-lookups+lru, 2 queued", "lru, 2 queued"]
    assert list(queued["fetch_ratio"]) == names
    for name in names:
        assert all(0 < r < 1 for r in queued["fetch_ratio"][name])
        assert len(queued["gap_closed"][name]) == 2
    assert "lru with 2 requests queued at 0.1%: fetch" in done.stdout
    assert list(work.iterdir()) == []  # the work directory is deleted without --keep
    assert out.with_suffix(".png").stat().st_size > 0
    assert f"wrote {out}\nwrote {out.with_suffix('.png')}\n" in done.stderr  # said where


def test_keep_keeps_the_work_directory_and_says_where(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = run_bench(
        "bench_policies.py",
        str(CORPUS),
        *("--max-tokens", "20000", "--lookups", "20000", "--policies", "lru"),
        *("--shares", "1%", "--keep", "--dir", str(work)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (kept,) = work.iterdir()
    assert f"work directory kept: {kept}" in done.stdout
    assert (kept / "analysis" / "holdout.trace").exists() and (kept / "replay.trace").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--shares", "5%,150%"), "--shares '5%,150%': expected shares of the rows in (0, 1]"),
        (("--lookups", "0"), "argument --lookups: expected an integer >= 1, got '0'"),
        (
            ("--queued-requests", "4,0"),
            "argument --queued-requests: expected a comma-separated list of integers >= 1",
        ),
        # refused only once the analysis (minutes by default) had run
        (("--policies", "lru,lur"), "--policies: unknown policy 'lur' in 'lur'; did you mean"),
        # 0 analysed the corpus, then failed to open the holdout trace it had not written
        (
            ("--holdout", "0", "--max-tokens", "20000"),
            "argument --holdout: expected a share of the documents in (0, 1), got '0'",
        ),
    ],
)
def test_a_bad_value_is_refused_before_any_work(args, message, tmp_path):
    done = run_bench("bench_policies.py", *args, "--dir", str(tmp_path))
    assert done.returncode == 2  # argparse's, with the usage
    assert message in done.stderr
    assert "trace:" not in done.stdout + done.stderr  # no analysis of the default corpus first
    assert list(tmp_path.iterdir()) == []


def test_sigterm_deletes_the_work_directory(tmp_path):
    """SIGTERM (kill's default) unwinds as Ctrl-C does: the traces under --dir go (it left them)."""
    work = tmp_path / "work"
    work.mkdir()
    script = [sys.executable, str(ROOT / "bench" / "bench_policies.py"), str(CORPUS)]
    args = ["--max-tokens", "200000", "--dir", str(work)]
    proc = subprocess.Popen([*script, *args], env=subprocess_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(work.iterdir()) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert any(work.iterdir())  # its work directory, while it analyses
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert list(work.iterdir()) == []


def test_replot_with_a_folder_in_the_way_of_the_plot_is_a_clear_error(tmp_path):
    """The plot was saved in place: a folder named R.png failed with a bare IsADirectoryError
    (a traceback), and a run stopped while saving left a half-written R.png."""
    result = {
        "layer": "layer1",
        "corpus": "a corpus",
        "capacity_shares": [0.01, 0.05],
        "ours_miss_ratio": {"lru": [0.5, 0.4]},
        "libcachesim_miss_ratio": {"LRU": [0.55, 0.45], "Belady": [0.3, 0.2]},
    }
    (tmp_path / "r.json").write_text(json.dumps(result))
    (tmp_path / "r.png").mkdir()
    done = run_bench("bench_policies.py", "--replot", str(tmp_path / "r.json"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"cannot write {tmp_path / 'r.png'}: a directory is in the way" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary
    (tmp_path / "r.png").rmdir()
    done = run_bench("bench_policies.py", "--replot", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'r.png'}\n" in done.stderr


def test_replot_of_a_missing_or_broken_report_is_a_clear_error(tmp_path):
    """--replot of a file that is not there, or not JSON, ended in a traceback."""
    missing = tmp_path / "missing.json"
    done = run_bench("bench_policies.py", "--replot", str(missing))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"argument --replot: '{missing}' does not exist; expected an existing file" in (
        done.stderr
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = run_bench("bench_policies.py", "--replot", str(broken))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"--replot {broken}: " in done.stderr and "expected an earlier --out" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json"]  # no plot


def test_replot_of_another_report_is_a_clear_error(tmp_path):
    """--replot of JSON that is not this script's report (another bench's --out, a list) ended
    in plot_results' KeyError or TypeError traceback."""
    for doc, key in (({"hit_ratio": 0.5}, "capacity_shares"), ([1, 2], "capacity_shares")):
        other = tmp_path / "other.json"
        other.write_text(json.dumps(doc))
        done = run_bench("bench_policies.py", "--replot", str(other))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert f"--replot {other}: no {key!r} in it (not this script's report); expected an " in (
            done.stderr
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]  # no plot


def test_a_report_with_nan_is_written_as_json_and_replotted(tmp_path):
    """write_json wrote NaN for a figure not measured, which is not JSON (strict readers refuse
    it); it writes null now, and --replot draws a report with nulls (it raised TypeError)."""
    result = {
        "layer": "layer1",
        "corpus": "a corpus",
        "capacity_shares": [0.01, 0.05],
        "ours_miss_ratio": {"lru": [0.5, float("nan")]},
        "libcachesim_miss_ratio": {"LRU": [float("inf"), 0.45]},
    }
    report = write_json(tmp_path / "r.json", result)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in {report.read_text()}")

    doc = json.loads(report.read_text(), parse_constant=refuse)
    assert doc["ours_miss_ratio"]["lru"] == [0.5, None]
    assert doc["libcachesim_miss_ratio"]["LRU"] == [None, 0.45]
    done = run_bench("bench_policies.py", "--replot", str(report))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analysis_and_layer_are_refused_by_name_before_any_work(tmp_path):
    """--analysis without a holdout exited 1 (no usage), after making the work folder; a --layer
    the analysis has no table of was refused only once the analysis was read (or, with no
    --analysis, made: minutes), naming the trace, not the option."""
    analysis, work = tmp_path / "a", tmp_path / "work"
    analysis.mkdir()
    work.mkdir()
    (analysis / "report.json").write_text(json.dumps({"tables": {"layer1": {}}}))
    cases = [
        (["--analysis", str(tmp_path / "missing")], "--analysis", "no report.json"),
        (["--analysis", str(analysis)], "--analysis", "no holdout.trace"),
        (["--analysis", str(analysis), "--layer", "layer9"], "--layer", "expected one of layer1"),
        (["--layer", "layer9"], "--layer", "the default Engram config"),
    ]
    for args, option, expected in cases:
        if option == "--layer":
            (analysis / "holdout.trace").touch()
        done = run_bench("bench_policies.py", *args, "--dir", str(work))
        error = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and f"error: {option} " in error and expected in error, error
        assert list(work.iterdir()) == []  # no work folder made

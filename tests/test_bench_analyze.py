"""bench/bench_analyze.py on the first tokens of the standard library: it records what it analysed,
its per-table figures add up, and it deletes or keeps its analysis folder as --help says."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import yaml

from tests.bench_support import ROOT, run_bench
from tiered_store.serve.client import subprocess_env

TINY_ENGRAM = {
    "engram": {
        "engram_vocab_size": [1009, 1013],
        "max_ngram_size": 3,
        "n_embed_per_ngram": 32,
        "n_head_per_ngram": 2,
        "layer_ids": [1, 4],
    }
}


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its temporary folder (``tempfile``'s) under ``tmp_path``."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return run_bench("bench_analyze.py", *args, env={"TMPDIR": str(tmp_path / "tmp")})


def test_figures_add_up_and_the_run_is_recorded(tmp_path):
    out = tmp_path / "analyze.json"
    done = bench(
        *("--max-tokens", "40000", "--no-belady", "--workers", "1", "--out", str(out)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(done.stdout) == result  # printed and written alike

    # what it ran on: the standard library of this Python, capped, with the reference config
    version = ".".join(map(str, sys.version_info[:2]))
    assert f"Python standard library {version} sources" in result["corpus"]
    assert result["max_tokens"] == result["tokens"] == 40000  # the stdlib holds millions
    assert result["engram_config"] == "reference"
    assert result["targets"] == {"hot": 0.3, "warm": 0.6}
    assert (result["seq_len"], result["batch_seqs"]) == (4096, 8)
    assert result["options"]["curves"] is True and result["options"]["belady"] is False
    assert result["options"]["workers"] == 1

    # lookups: every token looks up each head of each table once; the tables add up to the trace
    tables, overall = result["tables"], result["all_tables"]
    assert len(tables) >= 2
    assert len({t["lookups"] for t in tables.values()}) == 1
    assert all(t["lookups"] % result["tokens"] == 0 for t in tables.values())
    assert sum(t["lookups"] for t in tables.values()) == result["trace_lookups"]
    assert overall["lookups"] == result["trace_lookups"]
    assert overall["rows"] == sum(t["rows"] for t in tables.values())
    for name, table in [*tables.items(), ("all", overall)]:
        touched = table["rows_touched_pct"]
        top = [table[f"top_{p}pct_share_pct"] for p in ("0.1", "1", "10")]
        assert 0 < touched <= 100 and 0 < top[0] <= top[1] <= top[2] <= 100, name
        if touched < 10:  # every row looked up is among the top 10% of the table's rows
            assert top[2] == 100.0, name
        # a batch's sequences include each sequence: deduplicating a batch removes at least as much
        assert table["dedup_within_sequence_pct"] <= table["dedup_within_batch_pct"], name
    for name, table in tables.items():
        assert table["shards_mae_vs_exact_lru"] < 0.02, name  # SHARDS near the exact LRU curve
        assert {"lru", "shards"} <= set(table["curve_seconds"]), name
        assert "belady" not in table["curve_seconds"], name  # --no-belady

    # speeds follow from the tokens and times it reports
    assert result["tokens_per_cpu_second"] == round(result["tokens"] / result["cpu_seconds"])
    assert result["tokens_per_second"] >= 0.99 * result["tokens"] / result["wall_seconds"]
    assert sum(result["stage_seconds"].values()) <= result["wall_seconds"] + 0.05

    # without --keep or --work-dir its temporary analysis folder is gone
    assert list((tmp_path / "tmp").iterdir()) == []
    assert "analysis output:" not in done.stderr


def test_keep_keeps_the_analysis_and_says_where(tmp_path):
    config = tmp_path / "tiny.yaml"  # two tables of about 4,000 rows: a cheap profile
    config.write_text(yaml.safe_dump(TINY_ENGRAM))
    done = bench(
        *("--max-tokens", "20000", "--no-curves", "--config", str(config), "--keep"),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["engram_config"] == str(config)
    assert result["options"]["curves"] is False
    assert set(result["tables"]) == {"layer1", "layer4"}
    (kept,) = (tmp_path / "tmp").iterdir()
    assert kept.name.startswith("bench-analyze-")
    assert f"analysis output: {kept}" in done.stderr
    report = json.loads((kept / "report.json").read_text())
    assert report["corpus"]["tokens"] == result["tokens"] == 20000
    assert (kept / "trace.trace").is_file() and (kept / "layer4.store.yaml").is_file()


def test_help_and_refusals(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--max-tokens MAX_TOKENS" in done.stdout and "--keep" in done.stdout
    for args, message in (
        (("--max-tokens", "-5"), "argument --max-tokens: expected an integer >= 1, got '-5'"),
        (("--targets", "hot=2"), "--targets 'hot=2': targets.hot: got 2.0; expected a hit rate"),
    ):
        done = bench(*args, tmp_path=tmp_path)
        assert done.returncode == 2, (args, done.stderr[-3000:])  # argparse's, with the usage
        assert message in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""
    # refused before any work: no temporary folder made (one was made, and left, before)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_work_dir_that_cannot_be_a_folder_is_named_as_work_dir(tmp_path):
    """analyze's error named the folder as its command's option, --out: a user who gave no --out
    was told that --out FILE was not a writable directory. One in a missing folder made the whole
    chain (a typo's) without a word: as every --out folder, it is refused, naming the missing one."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for where, why in (
        (blocker, f"'{blocker}' is a file; expected a folder"),
        (tmp_path / "typo" / "w", f"'{tmp_path / 'typo'}' does not exist; expected an existing"),
    ):
        done = bench("--work-dir", str(where), "--max-tokens", "100", tmp_path=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        error = done.stderr.splitlines()[-1]  # (after the usage, which lists --out)
        assert error.startswith("bench_analyze.py: error: argument --work-dir: '"), error
        assert why in error and "--out" not in error, error
    assert blocker.read_text() == "" and not (tmp_path / "typo").exists()


def test_the_out_report_is_written_when_the_reader_of_stdout_left(tmp_path):
    """``bench_analyze.py --out r.json | head -1``: the report printed first, into the pipe whose
    reader had left, and the script ended there (141, as SIGPIPE's), the --out file the run was
    for never written; it is written first, and the run still ends as into a closed pipe."""
    out = tmp_path / "analyze.json"
    (tmp_path / "tmp").mkdir()
    read, write = os.pipe()
    os.close(read)  # the reader left before the report was printed
    args = ["--max-tokens", "40000", "--no-belady", "--workers", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, ROOT / "bench" / "bench_analyze.py", *args],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env({"TMPDIR": str(tmp_path / "tmp")}),
        cwd=ROOT,
        timeout=600,
    )
    os.close(write)
    assert done.returncode == 141, done.stderr[-3000:]
    assert json.loads(out.read_text())["benchmark"] == "analyze"
    assert f"wrote {out}" in done.stderr and "Traceback" not in done.stderr


def test_a_failing_write_in_the_temporary_work_folder_names_no_work_dir(tmp_path):
    """With no --work-dir, a write into the temporary analysis folder that failed (a full disk;
    here a file size limit) was reported as '--work-dir /tmp/bench-analyze-...: ...', an option
    the user never gave; the folder is named as the temporary work folder."""

    def limit_file_sizes() -> None:  # Python ignores SIGXFSZ: a write past it fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    (tmp_path / "tmp").mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_analyze.py"), "--max-tokens", "200000"],
        env=subprocess_env({"TMPDIR": str(tmp_path / "tmp")}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_sizes,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "error: the temporary work folder " in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr and "--work-dir" not in done.stderr


def _on_a_terminal(*args: str, tmp_path: Path) -> tuple[int, str]:
    """The script run with its stderr on a pseudo-terminal: its exit status and what it wrote
    there."""
    import os
    import threading

    (tmp_path / "tmp").mkdir(exist_ok=True)
    master, terminal = os.openpty()
    written: list[bytes] = []

    def drain() -> None:  # read as it comes: a full terminal buffer would hold the script up
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the script's end of the terminal closed
                return
            if not data:
                return
            written.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_analyze.py"), *args],
            stdout=subprocess.PIPE, stderr=terminal, cwd=ROOT, timeout=300,
            env=subprocess_env({"TMPDIR": str(tmp_path / "tmp")}),
        )  # fmt: skip
    finally:
        os.close(terminal)
        reader.join(30)
        os.close(master)
    return done.returncode, b"".join(written).decode(errors="replace")


def test_progress_shows_by_default_when_stderr_is_a_terminal(tmp_path):
    """The script showed no progress (stage messages, bars) unless given --progress, though a
    run of the whole standard library takes minutes: now it does when stderr is a terminal, as
    the commands do; --no-progress turns it off, and a pipe gets none (the other tests)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_ENGRAM))
    common = ("--max-tokens", "5000", "--no-curves", "--workers", "1", "--config", str(config))
    code, shown = _on_a_terminal(*common, tmp_path=tmp_path)
    assert code == 0 and "corpus: Python standard library" in shown, shown[-3000:]
    code, shown = _on_a_terminal(*common, "--no-progress", tmp_path=tmp_path)
    assert code == 0 and "corpus:" not in shown, shown[-3000:]
    done = bench(*common, tmp_path=tmp_path)  # stderr a pipe
    assert done.returncode == 0 and "corpus:" not in done.stderr, done.stderr[-3000:]

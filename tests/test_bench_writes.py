"""bench/bench_writes.py's training, commit and recovery sections at their smallest: each ratio is
of the figures beside it, commits and deltas add up, its tables go, bad options are refused."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.bench_support import ROOT, run_bench
from tiered_store.serve.client import subprocess_env

ONE_THREAD = {"TIERED_STORE_BENCH_TORCH_THREADS": "1"}


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script on one torch thread, its tables under ``tmp_path / "work"``."""
    (tmp_path / "work").mkdir(exist_ok=True)
    return run_bench("bench_writes.py", *args, "--dir", str(tmp_path / "work"), env=ONE_THREAD)


def test_every_section_adds_up(tmp_path):
    out = tmp_path / "writes.json"
    done = bench(
        *("--rounds", "1", "--steps", "3", "--batch-size", "1", "--seq-len", "16"),
        *("--commit-every", "2", "--dirty", "2000", "--recovery-rows", "20000,40000"),
        # not readpath: its 200,000-row table and 4 x 300 lookups in subprocesses take ~15 s
        *("--only", "training,commit,recovery", "--out", str(out)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = ["training", "commit", "recovery"]
    assert [k for k in result if k in sections] == sections
    assert result["machine"]["torch_threads"] == 1
    assert result["args"]["only"] == ",".join(sections)  # what it ran, as given
    assert (result["args"]["rounds"], result["args"]["dirty"]) == ("1", "2000")
    for name in sections:
        assert result[name]["section_seconds"] > 0
        assert f'"{name}": {{' in done.stdout  # printed as it finished
    # the scratch table's last steps, never committed (3 steps, a commit every 2), are dropped at
    # close as meant: no warning telling the user to call commit() (every run printed one)
    assert "UncommittedWritesWarning" not in done.stderr, done.stderr[-3000:]

    # training: 3 steps per variant, a commit every 2: one commit, at step 2, step 3's rows
    # still dirty; the tiered tables end equal to the in-memory ones
    training = result["training"]
    assert training["tokens_per_step"] == 16 and training["row_values"] == 32 + 1  # + Adagrad
    assert training["tables_identical_after_training"] is True
    store = training["store"]
    assert (store["commits"], store["committed_step"], store["commit_errors"]) == (1, 2, 0)
    assert store["dirty_rows"] > 0 and store["rows_written"] >= store["dirty_rows"]
    rates = training["tokens_per_s"]
    assert training["ratios"] == [rates["tiered"] / rates["memory"]]
    assert training["ratio_tiered_vs_memory"] == training["ratios"][0]

    commit = result["commit"]
    assert (commit["dirty_rows"], commit["row_bytes"]) == (2000, 64 * 4)
    rows_per_s = commit["rows_per_s"]
    assert commit["ratios"] == [rows_per_s["store_commit"] / rows_per_s["lmdb_putmulti"]]
    assert commit["ratio_store_vs_putmulti"] == commit["ratios"][0]

    # recovery: the writer committed a tenth of the rows before the kill, then rewrote them
    recovery = result["recovery"]["by_table_size"]
    assert [r["table_rows"] for r in recovery] == [20000, 40000]
    for r in recovery:
        assert r["delta_rows"] == r["table_rows"] // 10, r  # the later commits rewrite those
        assert 0 < r["open_s"] <= r["open_and_lookup_s"], r

    assert list((tmp_path / "work").iterdir()) == []  # its tables were in a deleted temp dir


def test_help_and_refusals(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = " ".join(done.stdout.split())  # argparse wraps the lines
    assert "--baseline-root BASELINE_ROOT" in text and "(deleted at the end" in text
    out = tmp_path / "writes.json"
    for args, message in (
        (
            ("--only", "training,comit"),
            "--only 'training,comit': unknown: comit; expected some of "
            "training,commit,recovery,readpath",
        ),
        (("--rounds", "0"), "argument --rounds: expected at least 1 (rounds), got '0'"),
        (  # refused before the training section made its table, not once it read the text
            ("--only", "training", "--corpus", str(tmp_path / "missing.txt")),
            f"--corpus {tmp_path / 'missing.txt'}: corpus path '{tmp_path / 'missing.txt'}': no "
            "such file or directory",
        ),
        (
            ("--recovery-rows", "100000,-5"),
            "--recovery-rows '100000,-5': expected table sizes of at least 10 rows",
        ),
    ):
        done = bench(*args, "--out", str(out), tmp_path=tmp_path)
        assert done.returncode == 2, (args, done.stderr[-3000:])  # argparse's, with the usage
        assert message in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == "" and not out.exists()
    assert list((tmp_path / "work").iterdir()) == []  # refused before making a table


def test_training_rounds_past_the_corpus_wrap_around_it(tmp_path):
    """A corpus of 2 batches for 2 rounds of 2 steps: round 2 took batches 2..3 by position and
    got none, so it timed no tokens (tokens/s 0) and its ratio divided zero by zero; the rounds
    wrap around the corpus as ``train`` does (batch i % the batches)."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 3)
    out = tmp_path / "writes.json"
    done = bench(
        *("--only", "training", "--rounds", "2", "--steps", "2", "--batch-size", "1"),
        *("--seq-len", "16", "--corpus", str(corpus), "--out", str(out)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads(out.read_text())["training"]
    assert len(training["ratios"]) == 2 and all(r > 0 for r in training["ratios"])
    assert training["tables_identical_after_training"] is True
    assert training["store"]["committed_step"] == 3  # 4 steps, a commit every 3


def processes_naming(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return found


@contextlib.contextmanager
def _a_recovery_run(tmp_path: Path, *, new_session: bool = False):
    """bench_writes' recovery section started (``new_session``: in a process group of its own),
    its stderr in a file (not a pipe: a writer left running would hold it open), once its
    writer runs on the table in ``tmp_path/work``: yields the script's process, the work
    folder, the stderr file, the writer's pid and a deadline two minutes on; kills both after."""
    work = tmp_path / "work"
    work.mkdir()
    script = [sys.executable, str(ROOT / "bench" / "bench_writes.py"), "--only", "recovery"]
    args = ["--recovery-rows", "20000", "--dir", str(work)]
    log = tmp_path / "stderr"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [*script, *args], env=subprocess_env(), stderr=stderr, start_new_session=new_session
        )
    try:
        deadline = time.monotonic() + 120
        while not processes_naming(f"{work}/") and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.01)
        (writer,) = processes_naming(f"{work}/")  # on the table in the work folder
        yield proc, work, log, writer, deadline
    finally:
        proc.kill()
        for pid in processes_naming(f"{work}/"):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_an_interrupt_during_recovery_ends_the_writer_it_started(tmp_path, ctrl_c):
    """The recovery section's writer commits in a loop until the script kills it: a SIGTERM to the
    script (kill's default) once the writer was in that loop left it running for good, its parent
    gone, writing into the deleted work folder; a Ctrl-C (SIGINT to the terminal's process group)
    ended it, with its own KeyboardInterrupt traceback among the script's lines."""
    with _a_recovery_run(tmp_path, new_session=True) as (proc, work, log, writer, deadline):
        proc.send_signal(signal.SIGSTOP)  # the script stops before it reads "committed"
        with open(f"/proc/{writer}/fd/1", "rb") as pipe:  # the writer's stdout, to the script
            while time.monotonic() < deadline:
                if struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"0000"))[0]:
                    break  # it said "committed": in its loop now
                time.sleep(0.02)
        if ctrl_c:  # the script and the writer alike, as a terminal sends it
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        proc.wait(timeout=60)
        err = log.read_text()
        assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        assert processes_naming(f"{work}/") == [], "the writer still runs"
        assert list(work.iterdir()) == []


def test_a_recovery_writer_ends_with_a_script_killed_outright(tmp_path):
    """The writer commits in a loop until the script kills it: a script killed outright (kill -9,
    the out-of-memory killer), which runs no cleanup, left it committing for good, its parent
    gone; the kernel ends it with its parent."""
    with _a_recovery_run(tmp_path) as (proc, work, _, _, deadline):
        while not list(work.rglob("data.mdb")) and time.monotonic() < deadline:
            time.sleep(0.02)  # its store opened: past its start
        proc.kill()
        proc.wait(timeout=60)
        while processes_naming(f"{work}/") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert processes_naming(f"{work}/") == [], "the writer still runs"


def test_a_recovery_writer_that_ends_before_its_first_commits_is_named(tmp_path):
    """A writer that ended before its first commits (killed, out of memory, an error) was a bare
    AssertionError, and under python -O the section went on to time a table no writer wrote."""
    with _a_recovery_run(tmp_path) as (proc, work, log, writer, _):
        os.kill(writer, signal.SIGKILL)  # still importing: seconds from its commits
        proc.wait(timeout=60)
        err = log.read_text()
        assert proc.returncode == 1, err[-2000:]
        expected = "recovery: the writer on recovery_20000.npy ended with exit status -9 before"
        assert expected in err, err[-2000:]
        assert list(work.iterdir()) == []

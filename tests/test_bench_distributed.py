"""bench/bench_distributed.py run small (gloo on loopback, 1 and 2 ranks; the model at 8 and 16):
its measured and modelled figures agree with each other and with what it was given, it records
what it ran on without machine paths, removes its scratch, and refuses bad values before any
work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench_support import ROOT, options_in_help, run_bench
from tiered_store import create_table
from tiered_store.serve.client import subprocess_env
from tiered_store.table_format import read_manifest
from tiered_store.table_sources import RandomSource

VOCAB, TOKENS, ROUNDS, HEADS = 2000, 256, 3, 16  # 2 n-gram orders x 8 heads: 16 ids a token
ID_BYTES, ROW_BYTES = 8, 128  # what crosses per id asked and per row served (64 x bfloat16)
NETWORK = {"node_gbps": 100.0, "nvlink_gbyteps": 200.0, "latency_us": 20.0, "overlap_ms": 1.0}
SMALL = (
    *("--engram-vocab", str(VOCAB), "--tokens", str(TOKENS), "--rounds", str(ROUNDS)),
    *("--ranks", "2", "1"),  # out of order: measured 1 then 2, the shards' hit rates from 2
    *("--model-ranks", "24", "16", "8", "--model-tokens", "64", "1024", "--gpus-per-node", "8"),
    *("--node-gbps", "100", "--nvlink-gbyteps", "200", "--latency-us", "20", "--overlap-ms", "1"),
)


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its temporary files under ``tmp_path / "tmp"`` (made here, empty)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return run_bench("bench_distributed.py", *args, env={"TMPDIR": str(tmp_path / "tmp")})


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small run without --dir: (its tmp_path, the process, the report)."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    out = tmp_path / "distributed.json"
    done = bench(*SMALL, "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, done, json.loads(out.read_text())


def test_records_what_it_ran_on_and_removes_its_scratch(bench_run):
    tmp_path, done, report = bench_run
    assert json.loads(done.stdout) == report  # stdout is the JSON --out holds
    assert report["command"] == "python bench/bench_distributed.py " + " ".join(
        (*SMALL, "--out", "distributed.json")  # no machine path: the file's name
    )
    assert list((tmp_path / "tmp").iterdir()) == []  # table, shards and batches removed
    assert report["network"] == NETWORK | {"gpus_per_node": 8}
    assert report["measured_table"]["heads"] == report["model_layout"]["heads"] == HEADS
    assert report["measured_table"]["dim"] == 64
    assert report["measured_table"]["rows"] >= HEADS * VOCAB  # each head: a prime above VOCAB
    assert report["model_layout"]["rows"] >= HEADS * 646_400  # the reference layout
    assert report["model_layout"]["row_bytes"] == ROW_BYTES
    assert report["seconds"] > 0


def test_measured_figures_agree_with_each_other(bench_run):
    _, _, report = bench_run
    measured = report["measured"]
    assert [m["world"] for m in measured] == [1, 2]  # sorted
    for m in measured:
        world = m["world"]
        modes = ["rows"] if world == 1 else ["heads", "rows"]  # heads need more than one rank
        assert sorted(m) == sorted(["world", "local", *modes])
        assert m["local"]["ids_per_s"] > 0
        ids_per_round = world * TOKENS * HEADS
        for by in modes:
            r = m[by]
            assert (
                r["ids_per_s"] > 0 and r["median_step_ms"] > 0 and r["time_over_local_median"] > 0
            )
            # the rate is a round's ids over its median time
            assert r["ids_per_s"] * r["median_step_ms"] / 1e3 == pytest.approx(ids_per_round)
            assert 0 < r["unique_over_ids"] <= 1
            assert 0 <= r["hot_hit_rate"] <= 1 and 0 <= r["warm_hit_rate"] <= 1
            sent = r["bytes_exchanged_per_round"]  # one round's (median of 3): whole ids and rows
            if world == 1:
                assert sent == 0, by  # nothing to exchange with
            else:
                remote = (sent - ID_BYTES * world * (world - 1)) / (ID_BYTES + ROW_BYTES)
                assert remote == int(remote) and 0 < remote <= ids_per_round, (by, sent)
    largest = measured[-1]["heads"]
    assert report["shard_hit_rates"] == {
        "hot": largest["hot_hit_rate"],
        "warm": largest["warm_hit_rate"],
    }


def test_model_rows_agree_with_the_network_given(bench_run):
    _, _, report = bench_run
    rows = report["model"]
    keys = [(r["tokens"], r["ranks"], r["by"]) for r in rows]
    assert keys == [(t, n, by) for t in (64, 1024) for n in (8, 16, 24) for by in ("heads", "rows")]
    latency_ms = 4 * NETWORK["latency_us"] / 1e3  # counts, ids, status, rows
    overlapped = 0
    for row in rows:
        assert 0 < row["unique_over_ids"] <= 1
        assert row["imbalance"] >= 1
        assert row["bytes_per_rank"] > 0 and row["busiest_shard_lookup_ms"] > 0
        exposed = row["exchange_ms"] + row["busiest_shard_lookup_ms"] - NETWORK["overlap_ms"]
        assert row["stall_ms"] == pytest.approx(max(0.0, exposed), abs=1e-12)
        overlapped += exposed < 0
        if row["ranks"] <= 8:  # one node: nothing leaves it; a GPU's NVLink bytes >= the mean
            assert row["bytes_per_node_max"] == 0
            least = row["bytes_per_rank"] / (NETWORK["nvlink_gbyteps"] * 1e9) * 1e3
        else:  # two or three nodes: the busiest node's bytes over its link
            assert row["bytes_per_node_max"] > 0
            least = row["bytes_per_node_max"] * 8 / (NETWORK["node_gbps"] * 1e9) * 1e3
        assert row["exchange_ms"] >= latency_ms + least * (1 - 1e-9)
    assert 0 < overlapped < len(rows)  # --overlap-ms hid some steps' stall, not every one
    by = {(r["tokens"], r["ranks"], r["by"]): r["imbalance"] for r in rows}
    for tokens in (64, 1024):  # 16 heads on 24 ranks: 8 ranks own none; rows split evenly
        assert by[(tokens, 24, "heads")] > by[(tokens, 24, "rows")]


def test_with_dir_it_keeps_the_files_and_records_no_path(tmp_path):
    work = tmp_path / "here"  # made by the script, and said
    out = tmp_path / "r.json"
    args = ("--engram-vocab", str(VOCAB), "--tokens", "128", "--rounds", "1", "--ranks", "1")
    args += ("--model-ranks", "8", "--model-tokens", "64", "--seed", "5")
    done = bench("--dir", str(work), *args, f"--out={out}", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"--dir: created '{work}'" in done.stderr
    report = json.loads(out.read_text())
    command = f"python bench/bench_distributed.py --dir here {' '.join(args)} --out=r.json"
    assert report["command"] == command and str(tmp_path) not in json.dumps(report)
    kept = {p.name for p in work.iterdir()}
    assert {"engram_layer1.npy", "engram_layer1.rows.0-of-1.npy", "batches.npy"} <= kept
    assert list((tmp_path / "tmp").iterdir()) == []
    # --seed is the table's seed too, as its help says (the table was seeded 1 whatever it was)
    table = read_manifest(work / "engram_layer1.npy")
    seeded = RandomSource(table.rows, table.dim, dtype="bfloat16", seed=5)
    create_table(tmp_path / "seeded.npy", seeded, progress=False)
    assert (work / "engram_layer1.npy").read_bytes() == (tmp_path / "seeded.npy").read_bytes()


def test_help_names_only_options_it_takes(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    accepted, mentioned = options_in_help(done.stdout)
    assert len(accepted) > 15 and mentioned <= accepted
    text = " ".join(done.stdout.split())  # argparse wraps the lines
    assert "and stay (default: a temporary folder, removed at the end)" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ranks", "0"), "argument --ranks: expected an integer >= 1, got '0'"),
        (("--node-gbps", "0"), "--node-gbps 0: expected a number > 0"),
        (("--nvlink-gbyteps", "nan"), "--nvlink-gbyteps nan: expected a number > 0"),
        (("--latency-us", "-1"), "--latency-us -1: expected a number >= 0"),
        (("--overlap-ms", "-0.5"), "--overlap-ms -0.5: expected a number >= 0"),
        (("--model-tokens",), "argument --model-tokens: expected at least one argument"),
        (
            ("--corpus", "/nonexistent/text.txt"),
            "--corpus /nonexistent/text.txt: corpus path '/nonexistent/text.txt': no such file or "
            "directory",
        ),
        (
            ("--hot", "lots"),
            "argument --hot: expected a row count (int), a byte size like '512MiB' "
            "or '2GiB', or a percentage like '10%', got 'lots'",
        ),
        (("--warm", "150%"), "argument --warm: '150%' is more than 100% of the table"),
        (
            ("--warm", "999999999"),
            "--warm: 999999999 is 999,999,999 rows, more than the table's 128,068 rows; expected "
            "at most 128,068 rows (16,392,704 bytes or 100%) (a tier's capacity is of each "
            "shard: the smallest measured has 128,068 rows)",
        ),
        (
            ("--model-vocab", "2", "--model-ranks", "64"),
            "--model-vocab 2: too few rows for 64 ranks by heads (ranks: 64 ranks put 4 shards "
            "on a head of 2 rows in table; expected at most one rank per row)",
        ),
    ],
)
def test_a_bad_value_is_refused_before_any_work(args, message, tmp_path):
    out = tmp_path / "r.json"
    done = bench(*args, "--dir", str(tmp_path / "work"), "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]  # argparse's, with the usage
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no work folder made
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_dir_where_no_folder_can_be_made_is_refused_by_name(tmp_path):
    """--dir naming a file, or a folder that cannot be made, ended in a FileExistsError or
    FileNotFoundError traceback from its mkdir; one in a missing folder made the whole chain (a
    typo's) without a word: as every script's --dir, it is refused, naming the missing folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for where, why in (
        (blocker, f"'{blocker}' is a file; expected a folder"),
        ("/proc/no-such-folder", "cannot write in '/proc' (No such file"),
        (tmp_path / "typo" / "d", f"'{tmp_path / 'typo'}' does not exist; expected an existing"),
    ):
        done = bench("--dir", str(where), "--ranks", "1", tmp_path=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert "argument --dir: " in done.stderr and why in done.stderr, done.stderr[-3000:]
    assert blocker.read_text() == "" and not (tmp_path / "typo").exists()


def test_sigterm_stops_its_ranks_and_removes_its_scratch(tmp_path):
    """SIGTERM unwinds the script as Ctrl-C does; its spawned ranks stop with it rather than
    measuring on (they kept the process alive for minutes, then wrote into a removed folder)."""
    (tmp_path / "tmp").mkdir()
    # 2 ranks only (SMALL's "--ranks 2 1" would measure 1 rank for 400 rounds first)
    args = (*SMALL[:4], "--rounds", "400", "--ranks", "2", *SMALL[9:])
    cmd = [sys.executable, str(ROOT / "bench" / "bench_distributed.py"), *args]
    env = subprocess_env({"TMPDIR": str(tmp_path / "tmp")})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for line in proc.stderr:  # the ranks are spawned right after this line
        if line.startswith(b"measuring 2 rank(s)"):
            break
    time.sleep(1)  # spawned, starting (they take seconds to import torch), then measuring
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    time.sleep(2)  # a rank still running would write its results again
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_corpus_too_short_for_the_rounds_is_refused_before_the_ranks_start(tmp_path):
    """A corpus of fewer tokens than (--rounds + 2) x max(--ranks) x --tokens crashed inside the
    spawned ranks with an IndexError (each round takes a batch of --tokens per rank); the parent,
    which read the tokens, refuses it naming the options, what was read and what is needed."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    out = tmp_path / "r.json"
    args = ("--engram-vocab", str(VOCAB), "--tokens", "512", "--rounds", "3", "--ranks", "1", "2")
    args += ("--model-ranks", "8", "--model-tokens", "64", "--corpus", str(corpus))
    done = bench(*args, "--dir", str(tmp_path / "work"), "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "IndexError" not in done.stderr and "measuring" not in done.stderr
    assert "tokens in whole sequences of 512" in done.stderr
    assert (
        f"of --corpus {corpus}; expected at least --tokens 512 x (--rounds 3 + 2) x 2 "
        in done.stderr
    )
    assert "rank(s): 5,120 tokens" in done.stderr
    assert done.stdout == "" and not out.exists()
    assert not (tmp_path / "work" / "engram_layer1.npy").exists()  # before the table is made

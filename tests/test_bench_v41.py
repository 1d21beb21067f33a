"""bench/bench_v41.py run tiny, every phase: figures agree with their rounds and files, it records
what it ran on, keeps and reuses its tables, and refuses bad sizes before any work."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.bench_support import cold_io, options_in_help, run_bench
from tiered_store.table_format import read_manifest

SCALED_VOCAB, RELEASE_VOCAB = 500, 1000  # 14k-30k rows a table, under 1 MB each
BATCH, SEQ_LEN, ROUNDS, PER_ROUND = 1, 32, 2, 2
DECODE_BATCHES, DECODE_STEPS, DECODE_ROUNDS = (1, 2), 3, 2
STORE_TOKENS, STORE_DECODE_STEPS, STORE_DECODE_BATCH = 64, 3, 2
SMALL = (
    *("--scaled-vocab", str(SCALED_VOCAB), "--release-vocab", str(RELEASE_VOCAB)),
    *("--hidden", "32", "--layers", "15", "--heads", "2"),
    *("--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN)),
    *("--rounds", str(ROUNDS), "--batches-per-round", str(PER_ROUND)),
    *("--decode-batch", *map(str, DECODE_BATCHES), "--decode-prompt", "4"),
    *("--decode-steps", str(DECODE_STEPS), "--decode-rounds", str(DECODE_ROUNDS)),
    *("--store-tokens", str(STORE_TOKENS), "--store-decode-steps", str(STORE_DECODE_STEPS)),
    *("--store-decode-batch", str(STORE_DECODE_BATCH), "--store-torch-threads", "1"),
    *("--profile-tokens", "2000", "--hot", "0.5%", "--warm", "8%"),
)


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its tables under ``tmp_path / "tables"``."""
    return run_bench("bench_v41.py", *args, "--dir", str(tmp_path / "tables"))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One run of every phase: (its work directory, the process, the JSON report, the io)."""
    tmp_path = tmp_path_factory.mktemp("v41")
    io = cold_io(tmp_path)
    done = bench(*SMALL, "--io", io, "--out", str(tmp_path / "r.json"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, done, json.loads((tmp_path / "r.json").read_text()), io


def table_dir(tmp_path: Path, vocab: int) -> Path:
    return tmp_path / "tables" / f"v41-{vocab}x33"


def test_records_what_it_ran_on_without_machine_paths(bench_run):
    tmp_path, done, report, io = bench_run
    assert json.loads(done.stdout[: done.stdout.rindex("}") + 1]) == report  # stdout = --out
    assert f"tables kept in {tmp_path / 'tables'}/v41-" in done.stderr  # and how large
    assert "--dir tables" in report["command"] and str(tmp_path) not in json.dumps(report)
    assert "/" not in report["workload"]["corpus"]  # the corpus's location left out
    assert report["machine"]["cpus"] == os.cpu_count()
    assert report["model"]["hidden"] == 32 and report["model"]["layers"] == 15
    assert report["workload"]["prefill_batch"] == [BATCH, SEQ_LEN]
    assert report["workload"]["decode_batches"] == list(DECODE_BATCHES)
    assert report["store"]["tiers"]["hot"]["capacity"] == "0.5%"
    assert report["store"]["tiers"]["cold"]["io"] == io
    assert set(report["targets"]) >= {"scaled_prefill", "release_prefill", "release_decode"}


def test_tables_on_disk_are_the_reported_ones(bench_run):
    tmp_path, _, report, _ = bench_run
    for name, vocab in (("scaled", SCALED_VOCAB), ("release", RELEASE_VOCAB)):
        table = report["tables"][name]
        assert table["engram_vocab_size"] == vocab
        assert table["row_bytes"] == table["row_values"] + table["row_values"] // 32  # fp8 + scale
        for layer, rows in table["rows"].items():
            path = table_dir(tmp_path, vocab) / f"engram_layer{layer}.npy"
            manifest = read_manifest(path)  # kept after the run, for the next one
            assert (manifest.rows, manifest.row_bytes) == (rows, table["row_bytes"])
            expected_size = manifest.data_offset + rows * table["row_bytes"]
            assert table["bytes_on_disk"][layer] == path.stat().st_size == expected_size


def test_store_geometry_matches_its_tiers_and_warm_start_files(bench_run):
    tmp_path, _, report, _ = bench_run
    for name, vocab in (("scaled", SCALED_VOCAB), ("release", RELEASE_VOCAB)):
        store, rows = report[f"{name}_store"], report["tables"][name]["rows"]
        assert store["rows"] == rows
        for layer, count in rows.items():  # each layer's own table: they differ in rows
            hot, warm = store["hot_rows"][layer], store["warm_rows"][layer]
            assert abs(hot - 0.005 * count) < 1  # "0.5%" is half a percent, not 0
            assert abs(warm - 0.08 * count) < 1
            assert store["cache_fraction"][layer] == pytest.approx((hot + warm) / count)
            payload = store["payload_bytes_per_table"][layer]
            assert payload == (hot + warm) * store["row_bytes"]
            assert store["metadata_bytes_per_table_row"][layer] > 0
        assert len(set(rows.values())) == len(rows)  # so a figure of one layer's cannot pass
        # each layer's warm tier preloads as many of the profile's hottest rows as it holds
        # (the list is written beside its table). Layer 14's count was once capped at layer 1's
        # warm capacity
        assert "pinned_rows" not in store
        for layer, count in store["warm_start_rows"].items():
            preload = table_dir(tmp_path, vocab) / f"engram_layer{layer}.warm_rows.npy"
            assert count == len(np.load(preload)) > 0


def check_prefill(section: dict, row_lookups_per_token: int, bit_identical: bool | None) -> None:
    """The summary's figures against the rounds they come from."""
    base = section["baseline"]
    assert section["bit_identical_outputs"] is bit_identical
    rounds = section["rounds"]
    assert len(rounds) == ROUNDS
    for name in (base, "tiered"):
        entry = section[name]
        for r in rounds:
            run = r[name]
            seconds = run["batch_seconds"]
            assert len(seconds) == PER_ROUND and min(seconds) > 0
            assert run["tokens"] == PER_ROUND * BATCH * SEQ_LEN
            per_batch = BATCH * SEQ_LEN
            assert run["first_tokens_per_s"] == pytest.approx(per_batch / seconds[0])
            assert run["tokens_per_s"] == pytest.approx(
                per_batch * (PER_ROUND - 1) / sum(seconds[1:])
            )
        ratios = [r[name]["tokens_per_s"] / r[base]["tokens_per_s"] for r in rounds]
        assert entry["ratio_rounds"] == pytest.approx(ratios)
        assert entry["ratio_median"] == pytest.approx(statistics.median(ratios)) and ratios[0] > 0
        assert entry["tokens_per_s_median"] == pytest.approx(
            statistics.median(r[name]["tokens_per_s"] for r in rounds)
        )
    assert section[base]["ratio_rounds"] == [1.0] * ROUNDS
    tiered = [r["tiered"] for r in rounds]
    lookups = sum(run["lookups"] for run in tiered)
    assert lookups == sum(run["tokens"] for run in tiered) * row_lookups_per_token
    rates = section["tiered"]["hit_rate"]
    assert rates["hot"] == pytest.approx(sum(run["hot_hits"] for run in tiered) / lookups)
    assert rates["cold_share_of_lookups"] == pytest.approx(
        sum(run["cold_rows"] for run in tiered) / lookups
    )
    assert all(0 <= share <= 1 for share in rates.values())
    assert sum(rates.values()) <= 1 + 1e-9  # cold rows are unique, lookups count repeats
    assert rates["cold_share_of_lookups"] > 0


def check_decode(section: dict, baseline: str, bit_identical: bool | None) -> None:
    assert list(section) == [str(size) for size in DECODE_BATCHES]
    for size, entry in section.items():
        assert entry["bit_identical_outputs"] is bit_identical
        assert entry[baseline]["step_speed_vs_baseline_median"] == 1.0
        for name in (baseline, "tiered"):
            summary = entry[name]
            assert summary["steps"] == DECODE_STEPS * DECODE_ROUNDS
            assert summary["tokens_per_s"] == pytest.approx(
                int(size) * 1e3 / summary["step_ms_mean"]
            )
            assert 0 <= summary["stall_share_of_step"] <= summary["store_share_of_step"] <= 1
            assert summary["step_speed_vs_baseline_median"] > 0
        assert 0 < entry["tiered"]["cold_share_of_lookups"] <= 1


def test_prefill_and_decode_figures_agree_with_their_rounds(bench_run):
    _, _, report, _ = bench_run
    per_token = report["model"]["row_lookups_per_token"]
    check_prefill(report["scaled_prefill"], per_token, bit_identical=True)
    check_prefill(report["release_prefill"], per_token, bit_identical=None)  # other rows
    assert report["scaled_prefill"]["baseline"] == "memory"
    assert report["release_prefill"]["baseline"] == "scaled_memory"
    check_decode(report["scaled_decode"], "memory", bit_identical=True)
    check_decode(report["release_decode"], "scaled_memory", bit_identical=None)
    targets = report["targets"]
    for phase in ("scaled_prefill", "release_prefill"):
        ratio = report[phase]["tiered"]["ratio_median"]
        assert targets[phase]["tiered_vs_memory"] == ratio
        assert targets[phase]["met"] == (ratio >= targets[phase]["target"])
    shares = {b: e["tiered"]["stall_share_of_step"] for b, e in report["release_decode"].items()}
    assert targets["release_decode"]["stall_share_of_step"] == shares


def test_store_alone_runs_are_consistent(bench_run):
    _, _, report, _ = bench_run
    runs = report["store_alone"]
    prefill_shape, decode_shape = [BATCH, SEQ_LEN], [STORE_DECODE_BATCH, 1]
    assert [(r["tables"], r["shape"]) for r in runs] == [
        ("scaled memory", prefill_shape),
        ("scaled tiered", prefill_shape),
        ("scaled memory", decode_shape),
        ("scaled tiered", decode_shape),
        ("scaled cached", prefill_shape),
        ("scaled cached", decode_shape),
        ("release tiered", prefill_shape),
        ("release tiered", decode_shape),
    ]
    paper_rate = {t["target"] for k, t in report["targets"].items() if k.startswith("store_alone")}
    (paper_rate,) = paper_rate
    for run in runs:
        decode = run["shape"] == decode_shape
        expected_tokens = STORE_DECODE_BATCH * STORE_DECODE_STEPS if decode else STORE_TOKENS
        assert run["tokens"] == expected_tokens and run["torch_threads"] == 1
        assert run["batches"] == (STORE_DECODE_STEPS if decode else STORE_TOKENS // SEQ_LEN)
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
        assert run["tokens_per_cpu_second"] == pytest.approx(run["tokens"] / run["cpu_seconds"])
        assert run["cores_for_paper_rate"] == pytest.approx(
            paper_rate * run["cpu_seconds"] / run["tokens"]
        )
        assert run["keeps_up_on_this_machine"] == (run["tokens_per_s"] >= paper_rate)
        if run["tables"] != "scaled memory":
            assert 0 < run["cold_share_of_lookups"] <= 1 and run["stall_seconds"] >= 0
    # the same text through the tables in memory and tiered: the same rows, the same checksum
    assert runs[0]["checksum"] == runs[1]["checksum"] and runs[2]["checksum"] == runs[3]["checksum"]


def test_a_second_run_reuses_the_tables(bench_run):
    tmp_path, _, _, io = bench_run
    tables = sorted((tmp_path / "tables").glob("v41-*/engram_layer*.npy"))
    tables = [p for p in tables if p.name.count(".") == 1]  # not the warm-start lists
    assert len(tables) == 4
    stamps = [p.stat().st_mtime_ns for p in tables]
    out = tmp_path / "cached.json"
    cached = ("--phases", "cached", "--cached-cold-threads", "2")
    done = bench(*SMALL, "--io", io, *cached, "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "creating" not in done.stderr
    assert [p.stat().st_mtime_ns for p in tables] == stamps
    report = json.loads(out.read_text())
    assert "scaled_prefill" not in report and "release_store" not in report
    assert {run["tables"] for run in report["store_alone"]} == {"scaled cached"}
    assert {(run["io"], run["cold_threads"]) for run in report["store_alone"]} == {("pread", 2)}


def test_zipf_tuned_reports_its_pins_not_a_preload(bench_run):
    tmp_path, _, _, io = bench_run
    out = tmp_path / "zipf.json"
    policy = ("--phases", "store", "--policy", "zipf-tuned")
    done = bench(*SMALL, "--io", io, *policy, "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("scaled", "release"):
        store = report[f"{name}_store"]
        assert "warm_start_rows" not in store  # nothing is preloaded: the profile's rows pinned
        for layer, pinned in store["pinned_rows"].items():
            # both tiers pin what their recency segment (at most half a tier) leaves
            held = store["hot_rows"][layer] + store["warm_rows"][layer]
            assert held // 2 - 1 <= pinned < held


def test_help_names_only_options_it_takes(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0
    accepted, mentioned = options_in_help(done.stdout)
    assert len(accepted) > 10 and mentioned <= accepted


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--batches-per-round", "1", "expected an integer >= 2, got '1'"),
        ("--scaled-vocab", "-5", "expected an integer >= 2, got '-5'"),
        ("--store-tokens", "10", "expected at least one batch (1 x 32 = 32 tokens), got 10"),
        # was taken: the tables were made, then the text order's seeding ended in a traceback
        ("--seed", "-1", "expected an integer >= 0, got '-1'"),
    ],
)
def test_bad_sizes_are_refused_before_any_work(tmp_path, option, value, expected):
    done = bench(*SMALL, option, value, tmp_path=tmp_path)  # if not refused: a small run
    assert done.returncode == 2
    assert f"argument {option}: {expected}" in done.stderr
    assert not (tmp_path / "tables").exists()


def test_a_dir_that_is_a_file_is_refused_by_name(tmp_path):
    """--dir FILE ended in a NotADirectoryError traceback when the tables were made."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run_bench("bench_v41.py", "--dir", str(blocker))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"argument --dir: '{blocker}' is a file; expected a folder (or nothing there)" in (
        done.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("script", ["bench_v41.py", "bench_engram.py", "bench_v41_scale.py"])
def test_a_dir_whose_parent_is_missing_is_refused(tmp_path, script):
    """A --dir whose parent was missing too (a typo) was made, parents and all, and filled with
    GBs of tables without a word; a new folder in an existing one is made and said so."""
    typo = tmp_path / "typo" / "tables"
    done = run_bench(script, "--dir", str(typo), "--no-such-option")  # not refused: no run
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (
        f"argument --dir: '{typo}': '{typo.parent}' does not exist; expected an existing folder, "
        "or a new one in an existing folder"
    ) in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_new_dir_is_said_to_be_made(bench_run):
    tmp_path, done, _, _ = bench_run
    assert f"--dir: created '{tmp_path / 'tables'}'" in done.stderr


@pytest.mark.slow  # 1-4 min: the whole default corpus (8M tokens) is tokenised
def test_sizes_past_the_corpus_are_refused_before_the_tables_are_made(tmp_path):
    """Sizes whose text the default corpus (8M tokens) does not hold were taken: the tables were
    made (25 GB at the defaults), then the store-alone phase ended in a StopIteration traceback
    (no slice of --store-tokens was left)."""
    done = bench(*SMALL, "--phases", "store", "--store-tokens", "20000000", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "bench_v41.py: error: corpus (Python standard library" in done.stderr
    assert "the phases need 40," in done.stderr and "store 40," in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "tables").exists()

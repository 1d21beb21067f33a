"""bench/bench_v41_scale.py run on a tiny table of the release's addressing: figures agree with each
other and with the table it keeps, and bad input is refused before the table is made."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.bench_support import cold_io, options_in_help, run_bench
from tiered_store.table_format import read_manifest

VOCAB = 1000  # engram_vocab_size: 25,874 rows of 33 B in layer 1 (850 KB)
BATCH, SEQ_LEN = 1, 32  # 768 lookups a batch: the all-hit batch fits the warm tier
WARMUP_TOKENS, TOKENS = 64, 256
SMALL = (
    *("--vocab", str(VOCAB), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN)),
    *("--warmup-tokens", str(WARMUP_TOKENS), "--tokens", str(TOKENS), "--threads", "2"),
)
STORE_SLACK_BYTES = 16 << 20  # thread stacks, rings, allocator pages beside the store's own


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its table under ``tmp_path / "tables"``."""
    return run_bench("bench_v41_scale.py", *args, "--dir", str(tmp_path / "tables"))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One run comparing both indexes: (its work directory, the process, the JSON, the io)."""
    tmp_path = tmp_path_factory.mktemp("v41_scale")
    (tmp_path / "tables").mkdir()
    io = cold_io(tmp_path)
    done = bench(*SMALL, "--io", io, "--out", str(tmp_path / "r.json"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path, done, json.loads((tmp_path / "r.json").read_text()), io


def share(capacity: str) -> float:
    """ "1%" -> 0.01."""
    return float(capacity.rstrip("%")) / 100


def check_open_adds_only_the_store(doc: dict, run: dict) -> None:
    """The tiers are the recorded shares of the table, and what the open adds to the RSS is the
    store's: not the process's one-time costs. The first index opened on a table made by an
    earlier run once had the page-checksum kernel's load (~0.35 s, ~45 MiB) in its figures."""
    rows, row_bytes, memory = doc["table"]["rows"], doc["table"]["row_bytes"], run["memory"]
    slots = {}
    for tier in ("hot", "warm"):
        slots[tier] = memory[f"{tier}_payload_bytes"] / row_bytes
        assert abs(slots[tier] - share(doc["store"]["tiers"][tier]) * rows) < 1
    footprint = sum(
        memory[f"{tier}_payload_bytes"]
        + memory[f"{tier}_metadata"]["per_table_row"] * rows
        + memory[f"{tier}_metadata"]["per_slot"] * slots[tier]
        for tier in ("hot", "warm")
    )
    assert 0 <= run["rss_after_open_bytes"] <= footprint + STORE_SLACK_BYTES
    assert run["open_seconds"] > 0


def test_records_the_table_and_options_without_machine_paths(bench_run):
    tmp_path, done, doc, io = bench_run
    assert f"wrote {tmp_path / 'r.json'}\n" in done.stderr
    assert str(tmp_path / "tables") not in json.dumps(doc)
    table = doc["table"]
    assert table["engram_vocab_size"] == VOCAB
    path = tmp_path / "tables" / table["file"]  # kept for later runs
    manifest = read_manifest(path)
    assert (manifest.rows, manifest.row_bytes) == (table["rows"], table["row_bytes"])
    assert path.stat().st_size == manifest.data_offset + table["rows"] * table["row_bytes"]
    assert doc["batch"] == {"sequences": BATCH, "seq_len": SEQ_LEN}
    tokens_per_batch = BATCH * SEQ_LEN
    assert doc["tokens"]["warmup"] == WARMUP_TOKENS // tokens_per_batch * tokens_per_batch
    assert doc["tokens"]["timed"] > 0 and doc["tokens"]["timed"] % tokens_per_batch == 0
    assert doc["store"]["cold"] == {"io": io, "threads": 2}
    # the first replay's one-time costs paid before the first index (its RSS flipped with the
    # order of --indexes: hashed/dense rss_at_end 7.3 hashed first, 0.22 dense first)
    warm_up = doc["process_warm_up"]
    assert (
        warm_up["lookups"]
        == 2 * BATCH * SEQ_LEN * doc["results"]["dense"]["lookups"] // (doc["tokens"]["timed"])
    )
    assert warm_up["cold_rows_per_second"] > 0
    assert set(doc["results"]) == {"hashed", "dense", "hashed_vs_dense"}


@pytest.mark.parametrize("index", ["hashed", "dense"])
def test_each_index_figures_agree(bench_run, index):
    _, _, doc, _ = bench_run
    run, row_bytes = doc["results"][index], doc["table"]["row_bytes"]
    lookups = run["lookups"]
    assert run["lookups_per_second"] * run["seconds"] == pytest.approx(lookups)
    lookups_per_token = lookups / doc["tokens"]["timed"]
    assert lookups_per_token == int(lookups_per_token) > 1  # every n-gram head of every token
    assert run["tokens_per_second"] == pytest.approx(run["lookups_per_second"] / lookups_per_token)
    # the tier probes of the timed batches only (the warm-up's once counted too)
    hot, warm = run["tier_counts"]["hot"], run["tier_counts"]["warm"]
    assert hot["lookups"] == lookups and warm["lookups"] == hot["lookups"] - hot["hits"]
    for tier, counts in run["tier_counts"].items():
        assert run["hit_ratio"][tier] == pytest.approx(counts["hits"] / counts["lookups"])
        assert 0 <= run["hit_ratio"][tier] <= 1
    rows_read = run["rows_from_cold_per_lookup"] * lookups
    assert rows_read == pytest.approx(run["cold_rows_per_second"] * run["seconds"])
    assert rows_read == pytest.approx(round(rows_read))
    assert 0 < rows_read <= warm["lookups"] - warm["hits"]  # unique rows of the warm misses
    bytes_per_row = run["cold_mb_per_second"] * 1e6 / run["cold_rows_per_second"]
    assert row_bytes <= bytes_per_row <= 2 * 4096  # whole pages, a row spans at most two
    check_open_adds_only_the_store(doc, run)
    low, high = run["all_hit_lookups_per_second_range"]  # the median of the rounds' rates
    assert 0 < low <= run["all_hit_lookups_per_second"] <= high


def test_indexes_hit_alike_and_ratios_are_their_figures(bench_run):
    _, _, doc, _ = bench_run
    hashed, dense, ratios = (doc["results"][k] for k in ("hashed", "dense", "hashed_vs_dense"))
    # the index says where a resident row is, not which rows are resident
    assert hashed["tier_counts"] == dense["tier_counts"]
    assert hashed["rows_from_cold_per_lookup"] == dense["rows_from_cold_per_lookup"]
    assert ratios == {
        "lookups_per_second": hashed["lookups_per_second"] / dense["lookups_per_second"],
        "rss_at_end": hashed["rss_at_end_bytes"] / dense["rss_at_end_bytes"],
        "open_seconds": hashed["open_seconds"] / dense["open_seconds"],
        "all_hit_lookups_per_second": hashed["all_hit_lookups_per_second"]
        / dense["all_hit_lookups_per_second"],
    }
    assert all(ratio > 0 for ratio in ratios.values())


def test_mmap_reuses_the_table_and_reads_row_bytes(bench_run):
    tmp_path, _, doc, _ = bench_run
    path = tmp_path / "tables" / doc["table"]["file"]
    stamp = path.stat().st_mtime_ns
    out = tmp_path / "mmap.json"
    done = bench(*SMALL, "--io", "mmap", "--indexes", "dense", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "creating" not in done.stdout and path.stat().st_mtime_ns == stamp
    mmap = json.loads(out.read_text())
    run = mmap["results"]["dense"]
    assert set(mmap["results"]) == {"dense"} and mmap["store"]["cold"]["io"] == "mmap"
    # mmap reads rows, not pages: bytes read = rows read x row bytes
    bytes_per_row = run["cold_mb_per_second"] * 1e6 / run["cold_rows_per_second"]
    assert bytes_per_row == pytest.approx(doc["table"]["row_bytes"])
    assert run["tier_counts"] == doc["results"]["dense"]["tier_counts"]  # same text, same tiers
    check_open_adds_only_the_store(mmap, run)  # the first open of a process, on a kept table


def test_a_table_of_other_rows_is_refused(bench_run, tmp_path):
    made, _, doc, _ = bench_run
    table = made / "tables" / doc["table"]["file"]
    done = bench(*SMALL, "--vocab", "900", "--table", str(table), tmp_path=tmp_path)
    assert done.returncode == 2
    assert (
        f"bench_v41_scale.py: error: {table}: {doc['table']['rows']:,} rows of" in done.stderr
        and "expected" in done.stderr
    )
    assert not (tmp_path / "tables").exists()


def test_help_names_only_options_it_takes(tmp_path):
    done = bench("--help", tmp_path=tmp_path)
    assert done.returncode == 0
    accepted, mentioned = options_in_help(done.stdout)
    # its example once passed a --batches it does not take
    assert len(accepted) > 10 and mentioned <= accepted


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--vocab", "-5"), "argument --vocab: expected an integer >= 2, got '-5'"),
        (
            ("--tokens", "10"),
            "argument --tokens: expected at least one batch (1 x 32 = 32 tokens), got 10",
        ),
        (
            ("--indexes", "hashed,btree"),
            "argument --indexes: expected distinct comma-separated row indexes from hashed, "
            "dense, auto, got 'hashed,btree'",
        ),
        (  # the second run would overwrite the first's results
            ("--indexes", "hashed,hashed"),
            "argument --indexes: expected distinct comma-separated row indexes from hashed, "
            "dense, auto, got 'hashed,hashed'",
        ),
    ],
)
def test_bad_input_is_refused_before_the_table_is_made(tmp_path, args, expected):
    done = bench(*SMALL, *args, tmp_path=tmp_path)  # if not refused: a small run
    assert done.returncode == 2 and expected in done.stderr
    assert not (tmp_path / "tables").exists()


def test_a_dir_that_is_a_file_is_refused_by_name_before_the_table_is_made(tmp_path):
    """--dir FILE was taken, then create_table said 'target directory FILE does not exist'
    (it is there, a file) without naming --dir; the other bench scripts refuse it by name."""
    file = tmp_path / "tables"
    file.write_text("")
    done = bench(*SMALL, tmp_path=tmp_path)  # bench's own --dir: tmp_path / "tables"
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"argument --dir: '{file}' is a file; expected a folder (or nothing there)" in (
        done.stderr
    )
    assert "creating" not in done.stdout and file.read_text() == ""


@pytest.mark.slow  # 1-4 min: the whole default corpus (8M tokens) is tokenised
def test_a_warm_up_that_takes_the_whole_corpus_is_refused_before_the_table_is_made(tmp_path):
    """--warmup-tokens past the corpus's 8M tokens left no timed batch: the run made the table
    (12.7 GB at the release's size), then died in an IndexError ('list index out of range')."""
    done = bench(*SMALL, "--warmup-tokens", "20000000", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "bench_v41_scale.py: error: argument --tokens: the corpus (Python standard" in (
        done.stderr
    )
    assert "which leaves no timed batch after --warmup-tokens 20,000,000" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "tables").exists()

"""bench/bench_engram.py at a tiny size: its four variants give bit-identical logits on the device
asked for (run, not imported: it sets torch's threads), and a device that is not there is refused
before any work, as is a bad count."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.bench_support import run_bench
from tiered_store.capacity import format_bytes

TINY = (
    *("--engram-vocab", "20000", "--engram-embed", "64", "--engram-layers", "1"),
    *("--hidden", "64", "--layers", "2", "--heads", "2"),
    *("--rounds", "2", "--profile-tokens", "2048", "--batch-size", "1", "--seq-len", "64"),
)


def bench(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The script, its tables under ``tmp_path``."""
    return run_bench("bench_engram.py", *args, "--dir", str(tmp_path))


def tiny_report(device: str, tmp_path: Path, *args: str) -> dict:
    """The JSON report of a tiny run on ``device`` (more options: ``args``)."""
    out = tmp_path / "r.json"
    done = bench(*TINY, *args, "--device", device, "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the tables stay for the next run: said where and how large (2.6 GB at the default sizes)
    tables = tmp_path / "engram-bench-bfloat16"
    size = format_bytes(sum(f.stat().st_size for f in tables.iterdir()))
    assert f"tables kept in {tables} ({size}; reused by the next run" in done.stderr
    return json.loads(out.read_text())


def check_report(report: dict, device: str) -> None:
    """Every variant ran on ``device`` with the same logits as the tables in memory."""
    assert report["machine"]["device"] == device
    assert report["bit_identical_outputs"] is True
    assert report["store"]["tiers"]["hot"]["device"] == device
    tiered = report["results"]["tiered"]
    assert 0 < tiered["hit_rate"]["cached"] < 1 and tiered["tokens_per_s_median"] > 0


def test_the_variants_agree_at_a_tiny_size_on_the_cpu(tmp_path):
    check_report(tiny_report("cpu", tmp_path), "cpu")


def test_the_cold_reader_is_chosen_with_io(tmp_path):
    report = tiny_report("cpu", tmp_path, "--io", "uring", "--cold-threads", "2")
    check_report(report, "cpu")
    assert report["store"]["tiers"]["cold"] == {"io": "uring", "threads": 2}
    assert report["results"]["tiered"]["hit_rate"]["cold_rows_per_batch"] > 0


@pytest.mark.gpu
def test_the_variants_agree_with_the_model_and_hot_tiers_on_cuda(tmp_path):
    report = tiny_report("cuda", tmp_path)
    check_report(report, "cuda:0")
    assert report["machine"]["gpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: nothing to refuse")
def test_refuses_cuda_where_there_is_none(tmp_path):
    done = bench("--device", "cuda", tmp_path=tmp_path)
    assert done.returncode == 2  # argparse's, with the usage
    assert "--device 'cuda': CUDA is not available here" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before writing a table


def test_refuses_a_bad_count_before_any_work(tmp_path):
    done = bench("--rounds", "0", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "argument --rounds: expected an integer >= 1, got '0'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before writing a table


def test_a_dir_that_is_a_file_is_refused_by_name(tmp_path):
    """--dir FILE ended in a NotADirectoryError traceback when the tables were made (a broken
    symbolic link, in a FileExistsError one)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    link = tmp_path / "link"  # accepted, then the tables' mkdir failed: FileExistsError
    link.symlink_to(tmp_path / "nowhere")
    for where, expected in (
        (link, f"argument --dir: '{link}' is a broken symbolic link; expected a folder"),
        (blocker, f"argument --dir: '{blocker}' is a file; expected a folder (or nothing there)"),
        (blocker / "sub", f"argument --dir: '{blocker / 'sub'}': '{blocker}' is a file"),
    ):
        done = run_bench("bench_engram.py", "--dir", str(where))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert expected in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "link"]

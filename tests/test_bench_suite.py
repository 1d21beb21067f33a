"""The pytest-benchmark suite in bench/ still runs: tiny sizes, one round, in a subprocess.

``./dev test`` does not collect bench/ (``testpaths``); this guard runs it the way ``./dev bench``
does, at ``TIERED_STORE_BENCH_SIZE=tiny``, and checks the saved JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "lookup-all-hit",
    "lookup-cold-miss",
    "lookup-promote-cpu",
    "cold-read-1-threads",
    "cold-read-8-threads",
    "cold-read-16-threads",
    "hasher",
    "replay-lru",
    "repin-plan",
    "victim-refill",
}


def test_benchmark_suite_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TIERED_STORE_BENCH_SIZE="tiny", TIERED_STORE_BENCH_DIR=str(tmp_path))
    env["TIERED_STORE_BENCH_TORCH_THREADS"] = "1"
    cmd = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider"]
    cmd += ["--benchmark-enable", f"--benchmark-json={out}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "speed vs same-run baseline (sizes: tiny, torch threads: 1)" in done.stdout
    text = out.read_text()
    assert str(ROOT) not in text, "the benchmark JSON records the repository's absolute path"
    doc = json.loads(text)
    assert doc["tiered_store_bench"]["sizes"]["name"] == "tiny"
    assert doc["tiered_store_bench"]["torch_threads"] == 1
    benchmarks = doc["benchmarks"]
    skipped = set() if importlib.util.find_spec("libcachesim") else {"replay-lru"}
    assert {b["group"] for b in benchmarks} >= GROUPS - skipped
    for b in benchmarks:
        info = b["extra_info"]
        assert info["role"] in ("baseline", "ours"), b["name"]
        if info["role"] == "ours":
            assert info["ratio_to_baseline"] > 0, b["name"]

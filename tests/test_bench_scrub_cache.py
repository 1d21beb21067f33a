"""bench/bench_scrub_cache.py runs end to end at a tiny size (run, not imported)."""

from __future__ import annotations

import json

from tests.bench_support import run_bench


def test_a_tiny_run_writes_both_ways_seconds_and_cached_pages(tmp_path):
    out = tmp_path / "scrub.json"
    done = run_bench(
        "bench_scrub_cache.py",
        *("--dir", str(tmp_path), "--table-mib", "1", "--pairs", "2", "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    result = doc["results"]
    assert doc["pairs"] == 2 and result["table_pages"] == 257
    assert result["cached_seconds"] > 0 and result["direct_seconds"] > 0
    assert result["pages_cached_after_cached_pass"] > result["pages_cached_after_direct_pass"]
    assert str(tmp_path) not in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["scrub.json"]  # the table was removed

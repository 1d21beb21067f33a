"""bench/bench_page_checksums.py runs end to end at a tiny size (run, not imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_tiny_run_writes_pair_ratios_for_each_io_mode(tmp_path):
    out = tmp_path / "pc.json"
    done = subprocess.run(
        [sys.executable, "bench/bench_page_checksums.py", "--dir", str(tmp_path),
         "--table-mib", "1", "--pairs", "2", "--batch", "64", "--threads", "2",
         "--io", "pread,mmap", "--from-disk", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert sorted(doc["results"]) == ["mmap", "pread"] and doc["pairs"] == 2 and doc["from_disk"]
    for result in doc["results"].values():
        assert result["verified_rows_per_second"] > 0 and result["ratio_median_of_pairs"] > 0
    assert str(tmp_path) not in out.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["pc.json"]  # the table was removed
    bad = subprocess.run(
        [sys.executable, "bench/bench_page_checksums.py", "--io", "floppy"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--io: ['floppy'] unknown" in bad.stderr

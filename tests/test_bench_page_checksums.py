"""bench/bench_page_checksums.py runs end to end at a tiny size (run, not imported)."""

from __future__ import annotations

import json

from tests.bench_support import run_bench


def test_a_tiny_run_writes_pair_ratios_for_each_io_mode(tmp_path):
    out = tmp_path / "pc.json"
    done = run_bench(
        "bench_page_checksums.py",
        *("--dir", str(tmp_path), "--table-mib", "1", "--pairs", "2", "--batch", "64"),
        *("--threads", "2", "--io", "pread,mmap", "--from-disk", "--out", str(out)),
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert sorted(doc["results"]) == ["mmap", "pread"] and doc["pairs"] == 2 and doc["from_disk"]
    for result in doc["results"].values():
        assert result["verified_rows_per_second"] > 0 and result["ratio_median_of_pairs"] > 0
    assert str(tmp_path) not in out.read_text()
    # the printed ratio is the median of the pairs' own ratios: said so, not a bare "ratio" beside
    # the median rates, which at 2 pairs can read as contradicting it
    for io, result in doc["results"].items():
        line = next(x for x in done.stdout.splitlines() if x.strip().startswith(f"{io}:"))
        ratio = f"{result['ratio_median_of_pairs']:.3f}x of 2"
        assert f"(medians); verified / unverified per pair: median {ratio} (" in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["pc.json"]  # the table was removed
    bad = run_bench("bench_page_checksums.py", "--io", "floppy", timeout=120)
    assert bad.returncode == 2 and "--io: ['floppy'] unknown" in bad.stderr
    bad = run_bench("bench_page_checksums.py", "--pairs", "0", timeout=120)
    assert bad.returncode == 2
    assert "argument --pairs: expected an integer >= 1, got '0'" in bad.stderr

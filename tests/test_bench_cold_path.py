"""bench/bench_cold_path.py refuses clearly when fio, its baseline, is missing (run, not imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_refuses_without_fio(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=str(ROOT))  # an empty PATH: no fio
    done = subprocess.run(
        [sys.executable, "bench/bench_cold_path.py", "--dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "fio is not installed" in done.stderr and "apt-get install fio" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before making a table

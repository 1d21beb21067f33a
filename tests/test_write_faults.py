"""Faults on the write path, on a real filesystem that fills up or turns read-only (a small tmpfs
mounted for the test; skipped where mounting is not allowed): typed errors, the last committed
state intact, the failures counted."""

from __future__ import annotations

import os
import subprocess
import uuid

import numpy as np
import pytest
import torch

from tests.conftest import store_config
from tiered_store import TieredStore, create_table
from tiered_store.delta.compaction import compact_table
from tiered_store.errors import CommitError, TierIOError


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs of its own."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory, leave_bytes):
    """A filler file that leaves about ``leave_bytes`` free."""
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def test_enospc_in_commit_and_compaction_keeps_the_last_commit(small_fs):
    rows = np.random.default_rng(0).standard_normal((2000, 64)).astype(np.float32)
    path = small_fs / "t.npy"
    create_table(path, rows, progress=False)
    cfg = store_config(path, hot={"capacity": 32}, warm={"capacity": 64})
    store = TieredStore(cfg)
    store.write([0, 1], torch.ones(2, 64))
    assert store.commit() == 1
    committed = rows.copy()
    committed[:2] = 1.0
    filler = _fill(small_fs, 64 << 10)
    store.write(torch.arange(2000), torch.full((2000, 64), 2.0))  # ~0.6 MB of rows: no room
    with pytest.raises(CommitError, match="previous commit \\(step 1\\) is intact"):
        store.commit()
    assert store.write_counters()["commit_errors_total"] == 1
    assert store.lookup(torch.arange(3)).tolist()[2][0] == 2.0  # the writes are still pending
    with TieredStore(cfg) as reader:  # on disk: exactly step 1
        assert reader.committed_step == 1
        assert np.array_equal(reader.lookup(torch.arange(2000)).numpy(), committed)
    with pytest.raises(TierIOError, match="being written"):
        compact_table(path, progress=False)
    filler.unlink()
    assert store.commit() == 2  # room again: the pending writes commit
    store.close()
    _fill(small_fs, 256 << 10)  # compaction needs a whole new table file: refused up front
    with pytest.raises(TierIOError, match="free"):
        compact_table(path, progress=False)
    with TieredStore(cfg) as reader:
        assert reader.generation == 0 and reader.committed_step == 2
        assert bool((reader.lookup(torch.arange(2000)) == 2.0).all())


def test_a_read_only_directory_reads_committed_rows_and_refuses_writes(small_fs):
    path = small_fs / "t.npy"
    create_table(path, np.zeros((100, 4), np.float32), progress=False)
    cfg = store_config(path, hot={"capacity": 4})
    with TieredStore(cfg) as store:
        store.write([5], torch.ones(1, 4))
        store.commit()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with TieredStore(cfg) as store:
        assert store.lookup([5, 6]).tolist() == [[1.0] * 4, [0.0] * 4]
        with pytest.raises(TierIOError, match="writer lock .* cannot create it"):
            store.write([6], torch.ones(1, 4))

"""A sharded commit's two phases against one commit of the same rows, on one shard's delta.

``ShardedStore.commit`` stages every shard's writes (``RowDelta.stage``: the records in the
delta's ``staged`` database, one durable transaction) and, once every shard has staged, moves
them into its rows (``commit_staged``: a second durable transaction). Baseline: ``RowDelta.commit``
of the same rows (what a single-process ``TieredStore.commit`` does, and a sharded one did before
the two phases). ``hit_batch / 16`` rows (65,536 at the default size) of 128 B (``row_dim``
float32 values) and of 1 KiB (a trained row with its optimizer state), the same ids every round, a
new step each; rates in rows committed per second, a group per row size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest

from tiered_store.delta.row_delta import RowDelta

GROUP = "sharded-commit-phases"


@pytest.fixture(scope="module", params=["128B", "1KiB"])
def delta(request, sizes, bench_dir) -> Iterator[tuple[RowDelta, np.ndarray, np.ndarray, str]]:
    """A fresh delta, the ids and rows every round commits, and the group of its row size."""
    row_bytes = 4 * sizes.row_dim if request.param == "128B" else 1024
    n = max(1, sizes.hit_batch // 16)
    ids = np.arange(0, 4 * n, 4, dtype=np.int64)  # spread over the keys, as a shard's writes
    rows = np.random.default_rng(5).integers(0, 256, (n, row_bytes), dtype=np.uint8)
    path = bench_dir / f"commit_speed_{request.param}.npy.delta"
    d = RowDelta(path, row_bytes=row_bytes, create=True)
    yield d, ids, rows, f"{GROUP}-{request.param}"
    d.close()


def test_one_commit(benchmark, speed, delta) -> None:
    d, ids, rows, group = delta
    steps = itertools.count(d.step + 1)
    speed.measure(
        benchmark,
        lambda: d.commit(ids, rows, next(steps)),
        group=group,
        per_call=ids.size,
        unit="rows",
        baseline=True,
    )


def test_stage_then_commit_staged(benchmark, speed, delta) -> None:
    d, ids, rows, group = delta
    steps = itertools.count(d.step + 1)

    def two_phases() -> None:
        step = next(steps)
        d.stage(ids, rows, step)
        d.commit_staged(step)

    speed.measure(benchmark, two_phases, group=group, per_call=ids.size, unit="rows")

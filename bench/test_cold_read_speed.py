"""ColdTable.read_rows speed against the disk's own random 4 KiB ``O_DIRECT`` read rate.

One group per thread count (1, 8, 16): the baseline is ``tiered_store.disk_probe`` (one
``os.preadv`` per random page from that many threads); measured against it, ``read_rows`` of
batches of unique, sorted, uniform-random ids with ``io="direct"`` (the issue's target: >= 0.7x)
and, for reference, ``io="pread"`` and ``io="mmap"``, which go through the page cache as found
(the table was just written, so it is usually there).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tiered_store.cold_table import ColdTable
from tiered_store.disk_probe import probe_random_reads
from tiered_store.table_format import read_manifest

THREADS = (1, 8, 16)


def group_name(threads: int) -> str:
    """The benchmark group of one thread count."""
    return f"cold-read-{threads}-threads"


@pytest.mark.parametrize("threads", THREADS)
def test_disk_random_reads(benchmark, speed, sizes, cold_table: Path, threads: int) -> None:
    manifest = read_manifest(cold_table)
    seeds = itertools.count(1000 * threads)
    speed.measure(
        benchmark,
        lambda seed: probe_random_reads(
            cold_table,
            reads=sizes.cold_batch,
            threads=threads,
            start=manifest.data_offset,
            stop=manifest.file_bytes,
            seed=seed,
        ),
        setup=lambda: ((next(seeds),), {}),
        group=group_name(threads),
        per_call=sizes.cold_batch,
        unit="reads",
        baseline=True,
    )


@pytest.mark.parametrize("io", ["direct", "pread", "mmap"])
@pytest.mark.parametrize("threads", THREADS)
def test_cold_table_read_rows(
    benchmark, speed, sizes, cold_table: Path, threads: int, io: str
) -> None:
    rng = np.random.default_rng(threads)

    def batch() -> tuple[tuple[np.ndarray], dict]:
        """Unique sorted uniform-random ids, a fresh batch every round."""
        return (np.sort(rng.choice(table.rows, sizes.cold_batch, replace=False)),), {}

    with ColdTable(cold_table, io=io, threads=threads) as table:
        table.read_rows(batch()[0][0])  # start the pool, allocate the buffers
        rows, requests, nbytes = table.rows_read, table.read_requests, table.bytes_read
        speed.measure(
            benchmark,
            table.read_rows,
            setup=batch,
            group=group_name(threads),
            per_call=sizes.cold_batch,
            unit="rows",
        )
        calls = max(1, table.rows_read - rows) / sizes.cold_batch
        benchmark.extra_info.update(
            requests_per_call=(table.read_requests - requests) / calls,
            bytes_per_call=(table.bytes_read - nbytes) / calls,
        )

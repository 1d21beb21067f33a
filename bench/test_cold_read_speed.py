"""ColdTable.read_rows speed against the disk's own random 4 KiB ``O_DIRECT`` read rate.

One group per thread count (1, 8, 16): the baseline is ``tiered_store.disk_probe`` (one
``os.preadv`` per random page from that many threads); measured against it, ``read_rows`` of
batches of unique, sorted, uniform-random ids with ``io="direct"`` (the issue's target: >= 0.7x)
and, for reference, ``io="pread"`` and ``io="mmap"``, which go through the page cache as found
(the table was just written, so it is usually there).

One group per io mode for page checksums (``cold-read-verify-IO``): ``read_rows`` with every page
checked against its CRC32C, against the same reads unverified (``verify_pages=False``, the
baseline), 8 threads, the same batches for both (target >= 0.95x).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from tiered_store.cold_table import ColdTable
from tiered_store.disk_probe import probe_random_reads
from tiered_store.io_uring import uring_unavailable_reason
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


VERIFY_THREADS = 8


@pytest.mark.parametrize("verified", [False, True], ids=["unverified", "verified"])
@pytest.mark.parametrize("io", ["direct", "uring", "pread", "mmap"])
def test_verified_read_rows(
    benchmark, speed, sizes, cold_table: Path, io: str, verified: bool
) -> None:
    if io == "uring" and (reason := uring_unavailable_reason()):
        pytest.skip(f"io_uring is unavailable: {reason}")
    rng = np.random.default_rng(11)  # the same batches, verified or not

    def batch() -> tuple[tuple[np.ndarray], dict]:
        """Unique sorted uniform-random ids, a fresh batch every round."""
        return (np.sort(rng.choice(table.rows, sizes.cold_batch, replace=False)),), {}

    with ColdTable(cold_table, io=io, threads=VERIFY_THREADS, verify_pages=verified) as table:
        assert table.verified == verified
        table.read_rows(batch()[0][0])  # start the pool, allocate the buffers
        speed.measure(
            benchmark,
            table.read_rows,
            setup=batch,
            group=f"cold-read-verify-{io}",
            per_call=sizes.cold_batch,
            unit="rows",
            baseline=not verified,
        )

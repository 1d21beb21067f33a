"""TieredStore.lookup speed against same-run baselines.

- all-hit: every id resident in the hot tier (1M rows x 128 B, 1M-id Zipf batches), against
  ``torch.index_select`` on an in-RAM tensor with the same ids (target >= 0.6x); once with the
  dense row -> slot index (the default at this size) and once with the hashed one.
- 16 ids: 1000 lookups of the same 16 ids (a decode step's) given as a list, against the same
  ids as a tensor (a list is read by NumPy and its leaves' types looked at: none may cost much).
- cold-miss: no cache tiers, ``io: direct`` (page cache bypassed), 16 reader threads, fresh
  uniform ids every round, against the disk's random 4 KiB ``O_DIRECT`` reads from as many
  threads (``tiered_store.disk_probe``; target >= 0.7x).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tiered_store import StoreConfig, TieredStore
from tiered_store.disk_probe import probe_random_reads
from tiered_store.table_format import read_manifest
from tiered_store.workload import ZipfWorkload

COLD_THREADS = 16
SMALL_LOOKUPS = 1000  # lookups of 16 ids timed as one call (one is about 50 us on a CPU)
ZIPF_EXPONENT = 0.9  # Engram traces of real text measure 0.7-0.95


@dataclass
class AllHit:
    """A store whose hot tier holds every row, the same table in RAM, and one batch of ids."""

    store: TieredStore
    table: torch.Tensor
    ids: torch.Tensor


def _all_hit(sizes, path: Path, index: str) -> Iterator[AllHit]:
    """Every row of ``path`` made resident in hot; the batch checked equal to ``index_select``'s."""
    table = torch.from_numpy(np.load(path))
    config = StoreConfig.from_dict(
        {"table": {"path": str(path)}, "tiers": {"hot": {"capacity": "100%", "index": index}}}
    )
    ids = torch.from_numpy(
        ZipfWorkload(sizes.hit_rows, ZIPF_EXPONENT, seed=2).sample(sizes.hit_batch)
    )
    with TieredStore(config) as store:
        for chunk in torch.arange(sizes.hit_rows).split(1 << 18):
            store.lookup(chunk)
        assert store.hot.occupancy == sizes.hit_rows
        assert torch.equal(store.lookup(ids), table[ids])
        yield AllHit(store, table, ids)


@pytest.fixture(scope="module")
def all_hit(sizes, hit_table: Path) -> Iterator[AllHit]:
    """All-hit store with the dense row index."""
    yield from _all_hit(sizes, hit_table, "dense")


@pytest.fixture(scope="module")
def all_hit_hashed(sizes, hit_table: Path) -> Iterator[AllHit]:
    """All-hit store with the hashed row index."""
    yield from _all_hit(sizes, hit_table, "hashed")


def test_index_select_all_hit(benchmark, speed, all_hit: AllHit) -> None:
    speed.measure(
        benchmark,
        lambda: torch.index_select(all_hit.table, 0, all_hit.ids),
        group="lookup-all-hit",
        per_call=all_hit.ids.numel(),
        unit="rows",
        baseline=True,
    )


def test_store_lookup_all_hit(benchmark, speed, all_hit: AllHit) -> None:
    store = all_hit.store
    misses = store.stats()["hot"]["misses"]
    speed.measure(
        benchmark,
        lambda: store.lookup(all_hit.ids),
        group="lookup-all-hit",
        per_call=all_hit.ids.numel(),
        unit="rows",
    )
    assert store.stats()["hot"]["misses"] == misses, "an all-hit lookup missed"
    benchmark.extra_info["memory_report"] = store.memory_report()


def test_store_prefetch_then_lookup_all_hit(benchmark, speed, all_hit: AllHit) -> None:
    """The Engram model's path: a prefetch handle (its ids snapshotted), collected by the
    lookup (CPU ids compared with the handle's)."""
    store = all_hit.store
    speed.measure(
        benchmark,
        lambda: store.lookup(all_hit.ids, store.prefetch(all_hit.ids)),
        group="lookup-all-hit",
        per_call=all_hit.ids.numel(),
        unit="rows",
    )


def test_store_lookup_all_hit_hashed_index(benchmark, speed, all_hit_hashed: AllHit) -> None:
    store = all_hit_hashed.store
    assert store.hot.index.kind == "hashed"
    speed.measure(
        benchmark,
        lambda: store.lookup(all_hit_hashed.ids),
        group="lookup-all-hit",
        per_call=all_hit_hashed.ids.numel(),
        unit="rows",
    )


def _measure_small_lookups(benchmark, speed, store: TieredStore, ids: object, **kw) -> None:
    """``SMALL_LOOKUPS`` lookups of ``ids`` timed as one call, in the ``lookup-16-ids`` group."""

    def lookups() -> None:
        for _ in range(SMALL_LOOKUPS):
            store.lookup(ids)

    speed.measure(
        benchmark, lookups, group="lookup-16-ids", per_call=16 * SMALL_LOOKUPS, unit="rows", **kw
    )


def test_store_lookup_16_ids_tensor(benchmark, speed, all_hit: AllHit) -> None:
    ids = all_hit.ids[:16].clone()
    _measure_small_lookups(benchmark, speed, all_hit.store, ids, baseline=True)


def test_store_lookup_16_ids_list(benchmark, speed, all_hit: AllHit) -> None:
    """1f963f9..c1b0415 (lists read by NumPy, bools looked for) made this about 10% slower."""
    _measure_small_lookups(benchmark, speed, all_hit.store, all_hit.ids[:16].tolist())


def test_disk_random_reads_cold_miss(benchmark, speed, sizes, cold_table: Path) -> None:
    manifest = read_manifest(cold_table)
    seeds = itertools.count(100)
    speed.measure(
        benchmark,
        lambda seed: probe_random_reads(
            cold_table,
            reads=sizes.cold_batch,
            threads=COLD_THREADS,
            start=manifest.data_offset,
            stop=manifest.file_bytes,
            seed=seed,
        ),
        setup=lambda: ((next(seeds),), {}),
        group="lookup-cold-miss",
        per_call=sizes.cold_batch,
        unit="reads",
        baseline=True,
    )
    benchmark.extra_info["threads"] = COLD_THREADS


def test_store_lookup_cold_miss(benchmark, speed, sizes, cold_table: Path) -> None:
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(cold_table)},
            "tiers": {"cold": {"io": "direct", "threads": COLD_THREADS}},
        }
    )
    rng = np.random.default_rng(4)
    with TieredStore(config) as store:
        rows = store.rows
        store.lookup(torch.from_numpy(rng.integers(0, rows, sizes.cold_batch)))  # start the pool
        speed.measure(
            benchmark,
            store.lookup,
            setup=lambda: ((torch.from_numpy(rng.integers(0, rows, sizes.cold_batch)),), {}),
            group="lookup-cold-miss",
            per_call=sizes.cold_batch,
            unit="rows",
        )
        cold = store.stats()["cold"]
    benchmark.extra_info.update(
        threads=COLD_THREADS,
        cold_rows_read=cold["rows_read"],
        cold_read_requests=cold["read_requests"],
    )

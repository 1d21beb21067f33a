"""Lookups that miss the hot tier and hit the warm one, against a table kept in host memory.

- store: hot tier 5% of the rows on the device (``cpu``; ``cuda`` where there is one, marker
  ``gpu``: the warm tier is then pinned host memory and promotions copy on the store's stream),
  warm tier holding every row, 1M rows x 128 B, Zipf 0.9 batches of 32Ki ids, 8 of them
  cycled: every batch misses the hot tier for a share of its rows (reported) and promotes them,
  evicting others; no cold reads.
- baseline: the same ids gathered by ``index_select`` from the table in host RAM (pinned on
  CUDA) and copied to the device: serving the table from host memory with no cache at all.

On CUDA each call waits for the device before the clock stops (``speed.measure(device=...)``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tiered_store import StoreConfig, TieredStore
from tiered_store.workload import ZipfWorkload

ZIPF_EXPONENT = 0.9
BATCHES = 8  # distinct batches, cycled: the hot tier cannot settle on one


@dataclass
class Promoting:
    """A store whose warm tier holds every row, the table in host RAM, the batches, the device."""

    store: TieredStore
    host: torch.Tensor
    batches: list[torch.Tensor]
    device: torch.device

    def timed(self, lookup: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        """One call per round on the next batch."""
        batches = itertools.cycle(self.batches)
        return lambda: lookup(next(batches))


@pytest.fixture(scope="module")
def promoting(sizes, hit_table: Path, bench_device: torch.device) -> Iterator[Promoting]:
    """The warm tier filled with every row, then the batches checked against the host table."""
    device = bench_device
    host = torch.from_numpy(np.load(hit_table))
    if device.type == "cuda":
        host = host.pin_memory()
    tiers = {"hot": {"capacity": "5%", "device": device.type}, "warm": {"capacity": "100%"}}
    config = StoreConfig.from_dict({"table": {"path": str(hit_table)}, "tiers": tiers})
    batch = max(1, sizes.hit_batch // 32)
    workload = ZipfWorkload(sizes.hit_rows, ZIPF_EXPONENT, seed=10)  # one popularity ranking
    batches = [torch.from_numpy(workload.sample(batch)) for _ in range(BATCHES)]
    with TieredStore(config) as store:
        for chunk in torch.arange(sizes.hit_rows).split(1 << 18):
            store.lookup(chunk)
        assert store.warm.occupancy == sizes.hit_rows
        for ids in batches:
            assert torch.equal(store.lookup(ids).cpu(), host[ids])
        yield Promoting(store, host, batches, device)


def test_host_table_gather_and_copy(benchmark, speed, promoting: Promoting) -> None:
    host, device = promoting.host, promoting.device
    speed.measure(
        benchmark,
        promoting.timed(lambda ids: host.index_select(0, ids).to(device, non_blocking=True)),
        group=f"lookup-promote-{device.type}",
        per_call=promoting.batches[0].numel(),
        unit="rows",
        baseline=True,
        device=device,
    )


def test_store_lookup_promoting_from_warm(benchmark, speed, promoting: Promoting) -> None:
    store = promoting.store
    before = store.stats()
    speed.measure(
        benchmark,
        promoting.timed(store.lookup),
        group=f"lookup-promote-{promoting.device.type}",
        per_call=promoting.batches[0].numel(),
        unit="rows",
        device=promoting.device,
    )
    after = store.stats()
    assert after["cold"]["rows_read"] == before["cold"]["rows_read"], "a lookup read from cold"
    lookups = after["hot"]["lookups"] - before["hot"]["lookups"]
    if lookups:
        misses = after["hot"]["misses"] - before["hot"]["misses"]
        benchmark.extra_info["hot_miss_share"] = misses / lookups
        assert misses > 0, "no lookup missed the hot tier: nothing was promoted"

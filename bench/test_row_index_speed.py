"""Row-index probes at DeepSeek-V4.1's table size: the hashed index against the dense one.

A hot tier of 1% of ``index_rows`` rows (384M at the default size: 3.84M slots, as in
``bench/bench_v41_scale.py``), every slot holding a random row. A batch of 49,152 ids (4 x 512
tokens x 24 lookups, one V4.1 prefill batch): 60% resident rows, Zipf 0.9 over them, and 40%
other rows, uniform (misses). Ours: ``HashedRowIndex.get`` (16 bytes per slot). Baseline:
``DenseRowIndex.get``, one gather from 4 bytes per table row (1.5 GB at this size), on the same
ids; both return the same slots (checked). Rates in ids probed per second. On the CPU the hashed
probe is compiled (``row_index_kernels``); the ``cuda`` variant (marker ``gpu``; both indexes
and the ids on the device, each call waiting for it: ``speed.measure(device=...)``) measures the torch rounds a CUDA hot tier
probes with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tiered_store.row_index import DenseRowIndex, HashedRowIndex
from tiered_store.workload import ZipfWorkload

GROUP = "row-index-probe"

BATCH = 4 * 512 * 24
HIT_SHARE = 0.6
ZIPF_EXPONENT = 0.9


@dataclass
class Indexes:
    """Both indexes over the same resident rows, and the batch."""

    dense: DenseRowIndex
    hashed: HashedRowIndex
    ids: torch.Tensor
    device: torch.device


@pytest.fixture(scope="module")
def indexes(sizes, bench_device: torch.device) -> Indexes:
    """The tier's rows in both indexes; the batch probed once by each and compared."""
    device = bench_device
    rows = sizes.index_rows
    slots = rows // 100
    rng = np.random.default_rng(5)
    resident = torch.from_numpy(rng.choice(rows, slots, replace=False))
    dense, hashed = DenseRowIndex(rows, slots, device), HashedRowIndex(rows, slots, device)
    for index in (dense, hashed):
        index.set(resident.to(device), torch.arange(slots, device=device))
    hits = int(HIT_SHARE * BATCH)
    ranks = ZipfWorkload(slots, ZIPF_EXPONENT, seed=6).sample(hits)
    ids = torch.cat([resident[ranks], torch.from_numpy(rng.integers(0, rows, BATCH - hits))])
    ids = ids[torch.from_numpy(rng.permutation(BATCH))].to(device)
    found = hashed.get(ids)
    assert torch.equal(found, dense.get(ids))
    assert int((found >= 0).sum()) >= hits
    return Indexes(dense, hashed, ids, device)


@pytest.mark.parametrize("kind", ["dense", "hashed"])
def test_index_probe(benchmark, speed, indexes: Indexes, kind: str) -> None:
    index = getattr(indexes, kind)
    speed.measure(
        benchmark,
        lambda: index.get(indexes.ids),
        group=f"{GROUP}-{indexes.device.type}",
        per_call=BATCH,
        unit="ids",
        baseline=kind == "dense",
        device=indexes.device,
    )

"""Cross-check against libCacheSim (the simulator of the SIEVE and S3-FIFO papers).

At per-request granularity (batch size 1, object size 1, capacity counted in objects) the
project's batched LRU, SIEVE and FIFO, driven through a real ``RowCache``, must miss exactly as
often as libCacheSim's ``LRU``, ``Sieve`` and ``FIFO`` on a Zipfian trace; so must the scalar
references, at more capacities (they are fast). Belady's MIN from ``zipf_analysis.mrc`` is
checked against libCacheSim's ``Belady`` (demand paging: every miss is cached).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies import PolicySpec, ScalarFIFO, ScalarLRU, ScalarSieve
from tiered_store.row_cache import RowCache

lcs = pytest.importorskip("libcachesim")

ROWS = 4000
REQUESTS = 20_000
LIBCACHESIM = {"lru": "LRU", "sieve": "Sieve", "fifo": "FIFO"}
REFERENCES = {"lru": ScalarLRU, "sieve": ScalarSieve, "fifo": ScalarFIFO}


@pytest.fixture(scope="module")
def trace() -> np.ndarray:
    """20k requests over 4000 rows, Zipf exponent 0.9 (Engram traces measure 0.7-0.95)."""
    rng = np.random.default_rng(2024)
    weights = 1.0 / np.arange(1, ROWS + 1) ** 0.9
    ranks = rng.choice(ROWS, size=REQUESTS, p=weights / weights.sum())
    return rng.permutation(ROWS)[ranks]  # popularity not in id order


def libcachesim_misses(policy: str, capacity: int, trace: np.ndarray) -> int:
    """Misses of libCacheSim's ``policy`` with ``capacity`` objects of size 1."""
    cache = getattr(lcs, LIBCACHESIM[policy])(capacity)  # an int size is bytes: = objects here
    req = lcs.Request()
    req.obj_size = 1
    misses = 0
    for row in trace.tolist():
        req.obj_id = row
        misses += not cache.get(req)
    return misses


def row_cache_misses(policy: str, capacity: int, trace: np.ndarray) -> int:
    """Misses of the project's batched ``policy`` in a RowCache, one request per batch."""
    cache = RowCache("t", num_rows=ROWS, capacity=capacity, spec=PolicySpec.parse(policy))
    one = torch.ones(1, dtype=torch.int64)
    for row in trace.tolist():
        ids = torch.tensor([row])
        cache.begin_batch()
        slots = cache.probe(ids)
        hit = int(slots[0]) >= 0
        cache.record(slots if hit else slots[:0], ids[slots < 0], lookups=1, hits=int(hit))
        if not hit:
            cache.admit(ids, one)
    assert cache.counters.lookups == len(trace)
    return cache.counters.misses


@pytest.mark.parametrize(
    ("policy", "capacity"),
    [("lru", 50), ("lru", 400), ("lru", 2000), ("sieve", 50), ("sieve", 400), ("sieve", 2000)]
    + [("fifo", 400)],
)
def test_batched_policy_misses_equal_libcachesim(trace, policy, capacity):
    ours = row_cache_misses(policy, capacity, trace)
    theirs = libcachesim_misses(policy, capacity, trace)
    assert ours == theirs, f"{policy} at {capacity} rows: ours {ours}, libCacheSim {theirs}"


@pytest.mark.parametrize("policy", ["lru", "sieve", "fifo"])
def test_scalar_reference_misses_equal_libcachesim(trace, policy):
    for capacity in (1, 2, 10, 100, 1000, 3000):
        reference = REFERENCES[policy](capacity)
        ours = sum(not reference.access(row) for row in trace.tolist())
        assert ours == libcachesim_misses(policy, capacity, trace), (policy, capacity)


def test_sieve_beats_fifo_and_lru_on_zipf(trace):
    """The SIEVE paper's headline on skewed traffic, as a sanity check of the setup."""
    misses = {p: libcachesim_misses(p, 400, trace) for p in ("lru", "sieve", "fifo")}
    assert misses["sieve"] < misses["lru"] < misses["fifo"]


def test_belady_misses_equal_libcachesim(trace):
    mrc = pytest.importorskip("zipf_analysis.mrc")
    capacities = [1, 10, 50, 400, 2000]
    ours = mrc.belady_misses(trace, capacities, bypass=False).tolist()
    next_use = np.full(trace.size, np.iinfo(np.int64).max, dtype=np.int64)
    last_of = {}
    for i in range(trace.size - 1, -1, -1):  # next request of the same row
        row = int(trace[i])
        if row in last_of:
            next_use[i] = last_of[row]
        last_of[row] = i
    theirs = []
    for capacity in capacities:
        cache = lcs.Belady(capacity)
        misses = 0
        for row, nxt in zip(trace.tolist(), next_use.tolist(), strict=True):
            req = lcs.Request()
            req.obj_id, req.obj_size, req.next_access_vtime = row, 1, nxt
            misses += not cache.get(req)
        theirs.append(misses)
    assert ours == theirs
    # with bypass (a miss used farther ahead than every cached row is not cached) never worse
    bypass = mrc.belady_misses(trace, capacities, bypass=True).tolist()
    assert all(b <= d for b, d in zip(bypass, ours, strict=True))

"""Batch-mode LRU replay speed against libCacheSim's own LRU on the same ids and capacity.

The trace is synthetic: ``replay_tokens`` tokens x 16 heads of Zipf-distributed ids over
``replay_rows`` rows, exponent 1.0, at which LRU with a 5% tier misses about 27% of 4M lookups
over 4M rows, as it does on the Engram trace of real text in the docs (27.03%); the replay's
cost grows with its misses, so the miss ratio, not the fitted exponent, is what to match. Ours:
``zipf_analysis.replay.replay`` with one warm LRU tier of 5% of the rows and one 4,096-token
sequence per batch, timed as a whole call (trace reading included). Baseline: libCacheSim's
``LRU`` with the same capacity, per request, over the same ids from its binary trace format
(reading included, opening excluded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tiered_store.config import StoreConfig
from tiered_store.trace import TraceWriter
from tiered_store.workload import ZipfWorkload
from zipf_analysis.replay import replay

lcs = pytest.importorskip("libcachesim")

GROUP = "replay-lru"
HEADS = 16  # lookups per token, as the default Engram layer
ZIPF_EXPONENT = 1.0  # LRU at 5%: ~27% misses, as the real trace (see above)
TIER_SHARE = 20  # the cache holds 1/20 = 5% of the rows
BATCH_TOKENS = 4096  # one sequence per batch


@dataclass
class ReplayTrace:
    """The same lookups as our trace file and as libCacheSim's, and the tier capacity in rows."""

    trace: Path
    libcachesim_trace: Path
    rows: int
    lookups: int
    capacity: int


def write_libcachesim_requests(ids: np.ndarray, path: Path) -> None:
    """``ids`` as libCacheSim oracleGeneral records (time, id, size 1, next access "never"):
    LRU does not read the next-access field."""
    records = np.zeros(
        ids.size, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")]
    )
    records["t"], records["id"], records["size"] = np.arange(ids.size), ids, 1
    records["next"] = np.iinfo(np.int64).max
    records.tofile(path)


@pytest.fixture(scope="module")
def zipf_trace(sizes, bench_dir: Path) -> ReplayTrace:
    """Write the synthetic trace in both formats."""
    rows = sizes.replay_rows
    ids = ZipfWorkload(rows, ZIPF_EXPONENT, seed=7).sample((sizes.replay_tokens, HEADS))
    trace = bench_dir / "zipf.trace"
    with TraceWriter(trace, {"tables": [{"name": "zipf", "rows": rows, "heads": HEADS}]}) as writer:
        for sequence in np.array_split(ids, max(1, len(ids) // BATCH_TOKENS)):
            writer.write(sequence, "zipf")
            writer.end_batch()
    theirs = bench_dir / "zipf.oracleGeneral.bin"
    write_libcachesim_requests(ids.reshape(-1), theirs)
    return ReplayTrace(trace, theirs, rows, ids.size, rows // TIER_SHARE)


def test_libcachesim_lru(benchmark, speed, zipf_trace: ReplayTrace) -> None:
    results = []

    def fresh() -> tuple[tuple, dict]:
        """A new reader and an empty cache for every round."""
        reader = lcs.TraceReader(
            str(zipf_trace.libcachesim_trace), lcs.TraceType.ORACLE_GENERAL_TRACE
        )
        return (reader, lcs.LRU(cache_size=zipf_trace.capacity)), {}

    speed.measure(
        benchmark,
        lambda reader, cache: results.append(cache.process_trace(reader)),
        setup=fresh,
        group=GROUP,
        per_call=zipf_trace.lookups,
        unit="lookups",
        baseline=True,
    )
    benchmark.extra_info.update(capacity=zipf_trace.capacity, miss_ratio=results[-1][0])


def test_replay_lru(benchmark, speed, zipf_trace: ReplayTrace) -> None:
    config = StoreConfig.from_dict(
        {
            "table": {
                "path": str(zipf_trace.trace.with_name("none.npy")),
                "dim": 64,
                "dtype": "float16",
            },
            "tiers": {"warm": {"capacity": zipf_trace.capacity, "policy": "lru"}},
        }
    )
    results = []
    speed.measure(
        benchmark,
        lambda: results.append(replay(config, zipf_trace.trace, batch_tokens=BATCH_TOKENS)),
        group=GROUP,
        per_call=zipf_trace.lookups,
        unit="lookups",
    )
    result = results[-1]
    assert result.lookups == zipf_trace.lookups
    benchmark.extra_info.update(
        capacity=zipf_trace.capacity,
        fetch_ratio=result.fetch_ratio,
        loop_lookups_per_second=result.lookups_per_second,
    )

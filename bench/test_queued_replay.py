"""Replay with a queue known ahead against the same replay without one.

A server that announces its queued requests (``TieredStore.announce``) has both tiers evict rows
no queued request looks up first, then those needed furthest back; replay measures it with
``queued_requests``. The trace: ``replay_tokens`` tokens x 16 heads of Zipf(1.0) ids over
``replay_rows`` rows (as ``test_replay_speed.py``), one warm LRU tier of 5% of the rows (every
slot evictable: the costliest case for a search by the queue), 64-token batches as the docs'
policy tables. Ours: 16 requests of 4,096 tokens announced ahead of the one served, and the same
tokens queued as 1,024 requests of 64 (each batch a request: what a queue of many short prompts
costs, per announcement and release, where the queued lookups are the same). Baseline: no queue.
Rates in lookups per second; the ratio is what a queue costs replay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tiered_store.config import StoreConfig
from tiered_store.trace import TraceWriter
from tiered_store.workload import ZipfWorkload
from zipf_analysis.replay import replay

GROUP = "replay-queued"
HEADS = 16
ZIPF_EXPONENT = 1.0
TIER_SHARE = 20  # 5% of the rows
BATCH_TOKENS = 64
QUEUED = 16  # requests announced ahead
REQUEST_TOKENS = 4096
SHORT_QUEUED = QUEUED * REQUEST_TOKENS // BATCH_TOKENS  # as many tokens queued, a batch a request


@pytest.fixture(scope="module")
def trace(sizes, bench_dir: Path) -> tuple[Path, StoreConfig, int]:
    """The trace file, a one-tier LRU config, and the lookups."""
    rows = sizes.replay_rows
    ids = ZipfWorkload(rows, ZIPF_EXPONENT, seed=11).sample((sizes.replay_tokens, HEADS))
    path = bench_dir / "queued.trace"
    with TraceWriter(path, {"tables": [{"name": "zipf", "rows": rows, "heads": HEADS}]}) as w:
        for sequence in np.array_split(ids, max(1, len(ids) // REQUEST_TOKENS)):
            w.write(sequence, "zipf")
            w.end_batch()
    config = StoreConfig.from_dict(
        {
            "table": {"path": str(bench_dir / "none.npy"), "dim": 64, "dtype": "float16"},
            "tiers": {"warm": {"capacity": rows // TIER_SHARE, "policy": "lru"}},
        }
    )
    return path, config, ids.size


def _measure(benchmark, speed, trace, queued: int, request_tokens: int = REQUEST_TOKENS) -> None:
    path, config, lookups = trace
    results = []
    speed.measure(
        benchmark,
        lambda: results.append(
            replay(
                config,
                path,
                batch_tokens=BATCH_TOKENS,
                queued_requests=queued,
                request_tokens=request_tokens,
            )
        ),
        group=GROUP,
        per_call=lookups,
        unit="lookups",
        baseline=queued == 0,
    )
    assert results[-1].lookups == lookups
    benchmark.extra_info.update(
        queued_requests=queued, request_tokens=request_tokens, fetch_ratio=results[-1].fetch_ratio
    )


def test_replay_without_a_queue(benchmark, speed, trace) -> None:
    _measure(benchmark, speed, trace, 0)


def test_replay_with_16_requests_queued(benchmark, speed, trace) -> None:
    _measure(benchmark, speed, trace, QUEUED)


def test_replay_with_1024_short_requests_queued(benchmark, speed, trace) -> None:
    _measure(benchmark, speed, trace, SHORT_QUEUED, BATCH_TOKENS)

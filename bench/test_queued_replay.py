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

Admissions to a full SIEVE tier of ``hit_rows`` slots (1M at the default size), 64 new rows each,
with one request announced (one row it looks up held, one not; or every other row of the tier)
against the same tier without a queue: a SIEVE tier's search by the queue blocks the queued slots
it keeps apart, where it once passed over every slot to find them per admission. Rates in rows
admitted per second.

Announcing into a long queue: one ``announce`` + ``release`` of a request of 20,000 distinct rows
(a prefill of ~1,250 tokens x 16 heads; 2,000 at the tiny size) into the request queue alone
(``QueuedRequests``, where the merge is) already holding 256 such requests, against the same into
a queue of 16. Each announce merges into an array of every queued (row, request) pair, so its
cost grows with the rows queued: the ratio is what the README's "about N squared" for N
announces in a row comes from, and why ``server.max_announced`` caps the queue (default 64).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from policies import PolicySpec
from tiered_store.config import StoreConfig
from tiered_store.request_queue import QueuedRequests
from tiered_store.row_cache import RowCache
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
ADMIT_GROUP = "admission-queued-sieve"
ADMIT_ROWS = 64  # new rows an admission
ADMITS = 64  # admissions a timed call
ANNOUNCE_GROUP = "announce-into-a-queue"
ANNOUNCE_ROWS = {"default": 20_000, "tiny": 2_000}  # distinct rows a request
ANNOUNCES = 8  # announce + release pairs a timed call


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


@pytest.fixture(scope="module")
def sieve_tiers(sizes) -> dict[str, list]:
    """Per case: a full SIEVE tier (no request announced; one, with one row held; one looking
    up every other row held) and the first of the rows not admitted yet."""
    capacity = sizes.hit_rows
    announced = {"one": torch.tensor([4, 4 * capacity - 1]), "half": torch.arange(0, capacity, 2)}
    tiers: dict[str, list] = {}
    for case in ("none", "one", "half"):
        cache = RowCache(
            "warm", num_rows=4 * capacity, capacity=capacity, spec=PolicySpec.parse("sieve")
        )
        cache.admit(torch.arange(capacity), torch.ones(capacity, dtype=torch.int64))
        if case in announced:
            cache.attach_queue(QueuedRequests())
            cache.queued(cache.queue.add(announced[case]))
        tiers[case] = [cache, capacity]
    return tiers


def _admit_rows(benchmark, speed, sieve_tiers, case: str) -> None:
    tier = sieve_tiers[case]
    cache = tier[0]

    def admissions() -> None:
        for _ in range(ADMITS):
            ids = torch.arange(tier[1], tier[1] + ADMIT_ROWS)
            cache.admit(ids, torch.ones(ADMIT_ROWS, dtype=torch.int64))
            tier[1] += ADMIT_ROWS

    speed.measure(
        benchmark,
        admissions,
        group=ADMIT_GROUP,
        per_call=ADMITS * ADMIT_ROWS,
        unit="rows",
        baseline=case == "none",
    )
    assert cache.occupancy == cache.capacity
    assert case == "none" or int(cache.probe(torch.tensor([4]))) >= 0  # a queued row stays
    queued_rows = 0 if cache.queue is None else cache.queue.rows
    benchmark.extra_info.update(capacity=cache.capacity, queued_rows=queued_rows)


def test_sieve_admissions_without_a_queue(benchmark, speed, sieve_tiers) -> None:
    _admit_rows(benchmark, speed, sieve_tiers, "none")


def test_sieve_admissions_with_a_request_queued(benchmark, speed, sieve_tiers) -> None:
    _admit_rows(benchmark, speed, sieve_tiers, "one")


def test_sieve_admissions_with_half_the_tier_queued(benchmark, speed, sieve_tiers) -> None:
    _admit_rows(benchmark, speed, sieve_tiers, "half")


@pytest.fixture(scope="module")
def queues(sizes) -> dict[int, tuple[QueuedRequests, list[torch.Tensor]]]:
    """Per queue length: a queue holding that many requests of ``ANNOUNCE_ROWS`` random rows
    (of 384M, V4.1's table), and the requests a timed call announces and releases."""
    rows = ANNOUNCE_ROWS[sizes.name]
    rng = np.random.default_rng(5)

    def request() -> torch.Tensor:
        return torch.from_numpy(np.unique(rng.integers(0, 384_006_168, rows)))

    made = {}
    for length in (16, 256):
        queue = QueuedRequests()
        for _ in range(length):
            queue.add(request())
        made[length] = (queue, [request() for _ in range(ANNOUNCES)])
    return made


def _announce(benchmark, speed, queues, length: int) -> None:
    queue, requests = queues[length]

    def announce_and_release() -> None:
        for ids in requests:
            queue.remove(queue.add(ids))

    speed.measure(
        benchmark,
        announce_and_release,
        group=ANNOUNCE_GROUP,
        per_call=ANNOUNCES,
        unit="announces",
        baseline=length == 16,
    )
    assert len(queue) == length
    benchmark.extra_info.update(queued_requests=length, queued_rows=queue.rows)


def test_announce_into_a_queue_of_16(benchmark, speed, queues) -> None:
    _announce(benchmark, speed, queues, 16)


def test_announce_into_a_queue_of_256(benchmark, speed, queues) -> None:
    _announce(benchmark, speed, queues, 256)

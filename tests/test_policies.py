"""Eviction and admission policies: one contract every policy passes, then what is special to each.

The contract drives a real ``RowCache`` (the code the store and the replayer run), one request at
a time and in batches, and checks it against the scalar references in ``policies.reference``.
"""

from __future__ import annotations

import copy
import re
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import (
    FIFO,
    LFU,
    LRU,
    SIEVE,
    PolicySpec,
    ScalarFIFO,
    ScalarLFU,
    ScalarLRU,
    ScalarSieve,
    ScalarTinyLFU,
    TinyLFU,
    known_names,
    tinylfu,
)
from policies.base import AdmissionPolicy
from policies.errors import PolicyError
from policies.offline import Belady, StaticTopK
from policies.registry import ADMISSION, offline_bound, register_admission
from policies.tinylfu import mix64, mix64_int, row_seeds
from tests.conftest import check_cache_invariants, run_batch
from tiered_store.cache_plan import parse_policy
from tiered_store.errors import ConfigError
from tiered_store.row_cache import RowCache

# Contract tests are methods of a mixin that each policy's class inherits: Hypothesis sees one test
# run by several classes, which is exactly what is meant here (``spec`` selects the policy).
CONTRACT = settings(deadline=None, suppress_health_check=[HealthCheck.differing_executors])
REFERENCES = {"lru": ScalarLRU, "fifo": ScalarFIFO, "sieve": ScalarSieve, "lfu": ScalarLFU}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROWS = 4000  # rows of the Zipf trace


@pytest.fixture(scope="module")
def zipf_trace() -> np.ndarray:
    """20k lookups over 4000 rows, Zipf exponent 0.9 (as ``test_libcachesim_crosscheck.py``)."""
    rng = np.random.default_rng(2024)
    weights = 1.0 / np.arange(1, ROWS + 1) ** 0.9
    ranks = rng.choice(ROWS, size=20_000, p=weights / weights.sum())
    return rng.permutation(ROWS)[ranks]  # popularity not in id order


def _access_one(cache: RowCache, row: int) -> bool:
    """One request, in the order the store runs a batch: observe, probe, record, admit."""
    ids = torch.tensor([row], device=cache.device)
    cache.begin_batch()
    cache.observe(ids)
    slots = cache.probe(ids)
    hit = bool(slots[0] >= 0)
    cache.record(slots[slots >= 0], ids[slots < 0], lookups=1, hits=int(hit))
    if not hit:
        cache.admit(ids, torch.ones(1, dtype=torch.int64, device=cache.device))
    return hit


def _check_invariants(cache: RowCache) -> None:
    check_cache_invariants(cache)


class EvictionContract:
    """Tests every eviction policy (alone or with an admission filter) passes; set ``spec``."""

    spec = "lru"
    #: a miss that fits (free slot, or evictable room) is always admitted
    admits_every_miss = True

    def reference(self, capacity: int):
        """The scalar reference cache for ``spec``."""
        eviction, _, admission = self.spec.partition("+")
        filt = ScalarTinyLFU(capacity) if admission == "tinylfu" else None
        return REFERENCES[eviction](capacity, admission=filt)

    def make(self, capacity: int, num_rows: int = 100, **kw) -> RowCache:
        """A RowCache of this policy."""
        return RowCache(
            "t", num_rows=num_rows, capacity=capacity, spec=PolicySpec.parse(self.spec), **kw
        )

    @settings(CONTRACT, max_examples=30)
    @given(
        capacity=st.integers(0, 10),
        trace=st.lists(st.integers(0, 24), min_size=1, max_size=150),
    )
    def test_per_request_equals_scalar_reference(self, capacity, trace):
        cache = self.make(capacity, num_rows=25)
        reference = self.reference(capacity)
        got = [_access_one(cache, row) for row in trace]
        assert got == [reference.access(row) for row in trace]
        _check_invariants(cache)

    @settings(CONTRACT, max_examples=25)
    @given(
        capacity=st.integers(1, 30),
        headroom=st.sampled_from([0.0, 0.25]),
        n_pinned=st.integers(0, 4),
        batches=st.lists(
            st.lists(st.integers(0, 79), min_size=0, max_size=40), min_size=1, max_size=12
        ),
    )
    def test_batches_keep_index_consistent_and_pins_resident(
        self, capacity, headroom, n_pinned, batches
    ):
        cache = self.make(capacity, num_rows=80, evict_headroom=headroom)
        pinned_rows = torch.arange(min(n_pinned, capacity - 1))  # leave one slot to turn over
        cache.preload(pinned_rows, pin=True)
        for batch in batches:
            missed = run_batch(cache, batch)
            _check_invariants(cache)
            assert bool((cache.probe(pinned_rows) >= 0).all()), "a pinned row was evicted"
            room = capacity - pinned_rows.numel()
            if self.admits_every_miss and missed.numel() <= room:
                assert bool((cache.probe(missed) >= 0).all()), "a miss that fits was not admitted"

    def test_capacity_zero_holds_nothing(self):
        cache = self.make(0, num_rows=10)
        assert [_access_one(cache, r) for r in [1, 1, 2]] == [False, False, False]
        assert cache.occupancy == 0 and cache.counters.misses == 3
        _check_invariants(cache)

    def test_capacity_one_keeps_the_last_admitted_row(self):
        cache = self.make(1, num_rows=10)
        reference = self.reference(1)
        for row in [3, 3, 4, 4, 3, 5]:
            assert _access_one(cache, row) == reference.access(row)
        assert cache.occupancy == 1
        _check_invariants(cache)

    def test_fills_free_slots_before_evicting(self):
        cache = self.make(5, num_rows=50)
        for r in range(5):
            _access_one(cache, r)
        assert cache.occupancy == 5 and cache.counters.evictions == 0
        run_batch(cache, [10, 11])
        assert cache.counters.evictions == cache.counters.admissions - 5
        _check_invariants(cache)

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_choose_victims_are_distinct_and_never_protected(self, seed):
        capacity = 64
        cache = self.make(capacity, num_rows=1000)
        rng = np.random.default_rng(seed)
        for _ in range(6):
            run_batch(cache, rng.integers(0, 1000, 40).tolist())
        policy = cache.eviction
        protected = cache.row_of_slot < 0
        protected |= torch.from_numpy(rng.random(capacity) < 0.3)
        n = int((~protected).sum())
        for want in sorted({1, n // 2, n}):
            victims = copy.deepcopy(policy).choose_victims(want, protected)
            assert victims.numel() == want
            assert victims.unique().numel() == want
            assert not bool(protected[victims].any())

    def test_spec_is_registered(self):
        for part in self.spec.split("+"):
            assert part in known_names()
        cache = self.make(8)
        assert cache.eviction.bytes_per_slot >= 0
        assert cache.metadata_bytes()["per_slot"] > 0

    @pytest.mark.gpu
    def test_cuda_makes_the_cpu_decisions(self):
        rng = np.random.default_rng(5)
        batches = [rng.integers(0, 500, 64).tolist() for _ in range(30)]
        hits = {}
        for device in ("cpu", "cuda"):
            cache = self.make(50, num_rows=500, device=device)
            for batch in batches:
                run_batch(cache, batch)
            hits[device] = cache.counters.as_dict()
            assert cache.row_of_slot.device.type == device
        assert hits["cpu"] == hits["cuda"]


# -- eviction policies ---------------------------------------------------------------------------


class TestLRU(EvictionContract):
    spec = "lru"


def test_a_save_ranks_an_lru_subclass_by_its_own_keys():
    """victim_priority_later copies LRU's last uses for its own keys: a subclass that ranks by
    other keys (a user's policy, registered by name) would have had its rows saved in LRU order."""

    class Reversed(LRU):
        def victim_priority(self, slots=None):
            return -super().victim_priority(slots)

    policy = Reversed(4)
    policy.on_insert(torch.tensor([0, 1, 2, 3]))
    policy.on_hit(torch.tensor([2]))
    assert torch.equal(policy.victim_priority_later()(), policy.victim_priority())


class TestFIFO(EvictionContract):
    spec = "fifo"

    def test_hits_do_not_save_a_row(self):
        cache = self.make(3, num_rows=10)
        for r in [1, 2, 3, 1, 1, 1]:
            _access_one(cache, r)
        _access_one(cache, 4)  # 1 is the oldest, hits or not
        assert int(cache.probe(torch.tensor([1]))[0]) == -1

    def test_doc_example(self):
        fifo = FIFO(capacity=3)
        fifo.on_batch()
        fifo.on_insert(torch.tensor([2, 0, 1]))
        fifo.on_hit(torch.tensor([2]))
        assert fifo.choose_victims(2, torch.zeros(3, dtype=torch.bool)).tolist() == [2, 0]

    def test_a_slot_emptied_by_headroom_leaves_the_queue(self):
        """A slot that ``evict_headroom`` emptied stayed in the queue: a refused victim that was
        the newest row left the hand on that slot, not at the oldest row, and once the slot took
        a new row the next eviction started there, passing over the oldest (1)."""
        spec = PolicySpec.parse("fifo+tinylfu")
        cache = RowCache("t", num_rows=8, capacity=2, spec=spec, evict_headroom=0.5)
        run_batch(cache, [4, 1])  # queue 1 4
        run_batch(cache, [3])  # victims 1 and 4 (headroom): 3 refused (1 vs 1), 4's slot emptied
        run_batch(cache, [4, 0])  # 4 takes the empty slot; 0 refused (1 vs 1), 1 is the newest
        assert sorted(cache.held_rows().tolist()) == [1, 4]
        # the hand starts again from the oldest: 3 (seen twice) replaces 1 (once), 4 is headroom;
        # it started at 4 instead, which 3 did not beat (2 vs 2), and 1 went as the headroom
        run_batch(cache, [3])
        assert cache.held_rows().tolist() == [3]


def _sieve_beside_reference(order: list[int]) -> tuple[SIEVE, ScalarSieve]:
    """A SIEVE and the scalar reference, each given the slots of ``order`` as new rows."""
    sieve, ref = SIEVE(len(order)), ScalarSieve(len(order))
    sieve.on_insert(torch.tensor(order, dtype=torch.int64))
    for slot in order:
        ref._insert(slot)
    return sieve, ref


def _hit_both(sieve: SIEVE, ref: ScalarSieve, rng: np.random.Generator) -> None:
    """The same random hits (duplicates too) on both."""
    capacity = sieve.capacity
    hits = rng.integers(0, capacity, int(rng.integers(0, capacity + 1))).tolist()
    sieve.on_hit(torch.tensor(hits, dtype=torch.int64))
    for slot in hits:
        ref._hit(slot)


def _scalar_evictions(ref: ScalarSieve, k: int) -> list[int]:
    """``k`` evictions of the reference, one after another."""
    victims = []
    for _ in range(k):
        victims.append(ref._victim())
        ref._remove(victims[-1])
    return victims


class TestSieve(EvictionContract):
    spec = "sieve"

    def test_doc_example(self):
        sieve = SIEVE(capacity=4)
        sieve.on_insert(torch.tensor([0, 1, 2, 3]))
        sieve.on_hit(torch.tensor([0, 2]))
        assert sieve.choose_victims(2, torch.zeros(4, dtype=torch.bool)).tolist() == [1, 3]
        assert not bool(sieve.visited.any())

    @settings(max_examples=40, deadline=None)
    @given(
        seed=st.integers(0, 2**32 - 1),
        capacity=st.integers(1, 40),
        rounds=st.integers(1, 10),
    )
    def test_n_victims_at_once_equal_n_scalar_evictions(self, seed, capacity, rounds):
        """Batched eviction of k slots = k evictions of the reference, one after another
        (slots stand for rows); the victims then come back as new rows, in random order."""
        rng = np.random.default_rng(seed)
        sieve, ref = _sieve_beside_reference(rng.permutation(capacity).tolist())
        none = torch.zeros(capacity, dtype=torch.bool)
        for _ in range(rounds):
            _hit_both(sieve, ref, rng)
            k = int(rng.integers(1, capacity + 1))
            got = sieve.choose_victims(k, none).tolist()
            assert got == _scalar_evictions(ref, k)
            back = rng.permutation(got).tolist()
            sieve.on_insert(torch.tensor(back))
            for slot in back:
                ref._insert(slot)
            assert sieve.visited.tolist() == [ref.visited[s] for s in range(capacity)]

    def test_hand_wraps_and_persists(self):
        sieve = SIEVE(capacity=4)
        none = torch.zeros(4, dtype=torch.bool)
        sieve.on_insert(torch.tensor([0, 1, 2, 3]))
        sieve.on_hit(torch.tensor([0, 1, 2, 3]))
        assert sieve.choose_victims(1, none).tolist() == [0]  # one full lap, then the oldest
        sieve.on_insert(torch.tensor([0]))  # new row at the newest end, hand now at slot 1
        sieve.on_hit(torch.tensor([2]))
        assert sieve.choose_victims(2, none).tolist() == [1, 3]  # 2 spared by its new bit

    def test_refused_victims_of_a_wrapping_choice_stay_behind_the_hand(self):
        """Victims an admission filter turns away stay, passed by the hand: a choice that wrapped
        left the hand on its first victim (1), which the next eviction took again at once."""
        sieve = SIEVE(capacity=3)
        none = torch.zeros(3, dtype=torch.bool)
        sieve.on_insert(torch.tensor([0, 1, 2]))
        assert sieve.choose_victims(1, none).tolist() == [0]  # refused: 0 stays, hand at 1
        sieve.on_hit(torch.tensor([2]))
        assert sieve.choose_victims(2, none).tolist() == [1, 0]  # 2 spared, wraps to 0
        sieve.on_reinstate(torch.tensor([1, 0]))  # both refused
        assert sieve.choose_victims(1, none).tolist() == [2]  # 0's newer neighbour, as 1 is gone

    @settings(max_examples=40, deadline=None)
    @given(seed=st.integers(0, 2**32 - 1), capacity=st.integers(1, 12), rounds=st.integers(1, 8))
    def test_refused_victims_equal_scalar_evictions_put_back(self, seed, capacity, rounds):
        """k victims at once, all refused, = k scalar evictions one after another, then each victim
        back in its place with its bit clear and the hand where the evictions left it."""
        rng = np.random.default_rng(seed)
        sieve, ref = _sieve_beside_reference(list(range(capacity)))
        none = torch.zeros(capacity, dtype=torch.bool)
        for _ in range(rounds):
            _hit_both(sieve, ref, rng)
            k = int(rng.integers(1, capacity + 1))
            got = sieve.choose_victims(k, none).tolist()
            queue = list(ref.queue)
            assert got == _scalar_evictions(ref, k)
            if rng.random() < 0.5:  # refused: every victim stays where it was, bit clear
                sieve.on_reinstate(torch.tensor(got))
                ref.queue = queue
                ref.visited.update(dict.fromkeys(got, False))
            else:  # admitted: new rows at the newest end
                sieve.on_insert(torch.tensor(got))
                for slot in got:
                    ref._insert(slot)

    @settings(max_examples=40, deadline=None)
    @given(
        seed=st.integers(0, 2**32 - 1),
        capacity=st.integers(1, 20),
        rounds=st.integers(0, 6),
        policy=st.sampled_from([SIEVE, FIFO]),
    )
    def test_victim_priority_is_the_order_the_hand_evicts_in(self, seed, capacity, rounds, policy):
        """A warm-restart save lists a tier's rows most valuable first by ``victim_priority``;
        SIEVE and FIFO had none, so their rows went in slot order, whatever the hand would do."""
        rng = np.random.default_rng(seed)
        sieve = policy(capacity)
        none = torch.zeros(capacity, dtype=torch.bool)
        sieve.on_insert(torch.from_numpy(rng.permutation(capacity)))
        for _ in range(rounds + 1):
            sieve.on_hit(torch.from_numpy(rng.integers(0, capacity, int(rng.integers(0, 5)))))
            if _ < rounds:  # some victims come back as new rows
                sieve.on_insert(sieve.choose_victims(int(rng.integers(1, capacity + 1)), none))
        order = torch.argsort(sieve.victim_priority()).tolist()
        assert order == copy.deepcopy(sieve).choose_victims(capacity, none).tolist()
        assert sieve.victim_priority(torch.tensor(order[::-1])).tolist() == sorted(
            sieve.victim_priority().tolist(), reverse=True
        )

    def test_a_tier_lists_its_rows_in_the_order_it_would_keep_them(self):
        for spec, hits, want in (("fifo", [], [8, 7, 6]), ("sieve", [6], [6, 8, 7])):
            cache = RowCache("t", num_rows=10, capacity=3, spec=PolicySpec.parse(spec))
            for batch in ([5], [6], [7], [8], hits):  # 8 replaces 5, the oldest, in slot 0
                run_batch(cache, batch)
            assert cache.held_rows().tolist() == want, spec  # was slot order: 8 6 7

    def test_ring_compaction_keeps_order(self):
        sieve, ref = SIEVE(capacity=3), ScalarSieve(3)
        cache_rows: dict[int, int] = {}  # slot -> row, mirrors ref
        for row in range(3):
            ref.access(row)
            sieve.on_insert(torch.tensor([row]))
            cache_rows[row] = row
        for row in range(3, 40):  # 37 replacements: the 6-entry ring compacts many times
            ref.access(row)
            slot = int(sieve.choose_victims(1, torch.zeros(3, dtype=torch.bool))[0])
            sieve.on_insert(torch.tensor([slot]))
            cache_rows[slot] = row
        assert sorted(cache_rows.values()) == sorted(ref.queue)
        assert sieve.tail <= sieve.ring.numel()

    def test_a_batch_spares_a_row_it_reads_where_per_request_sieve_evicts_it(self):
        """The difference in one batch: rows 1 2 3 cached with clear bits, then [4, 1]."""
        ref = ScalarSieve(3)
        for row in (1, 2, 3, 4, 1):  # 4 evicts 1 (oldest, bit clear); 1 then misses and evicts 2
            ref.access(row)
        assert ref.queue == [3, 4, 1]
        cache = self.make(3)
        run_batch(cache, [1, 2, 3])
        missed = run_batch(cache, [4, 1])  # 1 is a hit of the batch: its bit is set before 4 evicts
        assert missed.tolist() == [4]
        assert sorted(cache.row_of_slot.tolist()) == [1, 3, 4]

    @pytest.mark.parametrize(("capacity", "batch"), [(50, 16), (400, 64), (2000, 256)])
    def test_batched_is_per_request_sieve_with_each_batch_reordered(
        self, zipf_trace, capacity, batch
    ):
        """Batched SIEVE makes exactly the decisions of per-request SIEVE (the reference) when each
        batch's lookups are reordered: its hits first, then one eviction per new row, then the new
        rows (ascending), each once."""
        cache, ref = self.make(capacity, num_rows=ROWS), ScalarSieve(capacity)
        for start in range(0, zipf_trace.size, batch):
            rows = zipf_trace[start : start + batch].tolist()
            for row in rows:
                if row in ref:
                    ref._hit(row)
            new = sorted({row for row in rows if row not in ref})
            for _ in range(max(0, len(ref) + len(new) - capacity)):
                ref._remove(ref._victim())
            for row in new:
                ref._insert(row)
            assert run_batch(cache, rows).tolist() == new
            assert set(cache.row_of_slot.tolist()) - {-1} == set(ref.queue)

    def test_batched_and_per_request_sieve_differ_on_a_zipf_trace(self, zipf_trace):
        """Measures the difference that the policy's docstring quotes: rows read from cold
        (unique misses per batch) at 64 lookups per batch against per-request SIEVE's misses."""
        capacity = 400
        ref = ScalarSieve(capacity)
        per_request = sum(not ref.access(row) for row in zipf_trace.tolist())
        cache = self.make(capacity, num_rows=ROWS)
        batched = sum(
            run_batch(cache, zipf_trace[s : s + 64]).numel() for s in range(0, zipf_trace.size, 64)
        )
        assert (per_request, batched) == (8232, 8189)  # 41.16% and 40.95% of 20,000 lookups


class TestLFU(EvictionContract):
    spec = "lfu"

    def test_doc_example(self):
        lfu = LFU(capacity=3)
        lfu.on_batch()
        lfu.on_insert(torch.tensor([0, 1, 2]))
        lfu.on_batch()
        lfu.on_hit(torch.tensor([0, 0, 2]))
        assert lfu.count.tolist() == [3, 1, 2]
        assert lfu.choose_victims(2, torch.zeros(3, dtype=torch.bool)).tolist() == [1, 2]

    def test_equal_counts_go_least_recent_first(self):
        lfu = LFU(capacity=3)
        for slot in [2, 0, 1]:
            lfu.on_batch()
            lfu.on_insert(torch.tensor([slot]))
        assert lfu.choose_victims(3, torch.zeros(3, dtype=torch.bool)).tolist() == [2, 0, 1]

    def test_within_a_batch_recency_follows_lookup_order(self):
        lfu = LFU(capacity=4)
        lfu.on_insert(torch.tensor([0, 1, 2, 3]))
        lfu.on_hit(torch.tensor([3, 1, 2, 0, 3]))  # 0, 1, 2 read once, last at 0
        assert lfu.choose_victims(3, torch.zeros(4, dtype=torch.bool)).tolist() == [1, 2, 0]

    def test_access_numbers_renumber_without_changing_the_order(self):
        lfu = LFU(capacity=3)
        lfu.on_insert(torch.tensor([2, 0, 1]))
        lfu.seq = (1 << 40) - 2  # about to run out
        lfu.on_hit(torch.tensor([2, 1]))
        assert lfu.seq < 10 and lfu.count.tolist() == [1, 2, 2]
        assert lfu.choose_victims(3, torch.zeros(3, dtype=torch.bool)).tolist() == [0, 2, 1]

    def test_counts_halve_every_aging_period(self):
        lfu = LFU(capacity=2, aging_period=10)
        assert LFU(capacity=7).aging_period == 70  # default: ten turnovers of the tier
        lfu.on_batch()
        lfu.on_insert(torch.tensor([0, 1]))  # 2 accesses
        lfu.on_batch()
        lfu.on_hit(torch.tensor([0] * 7))  # 9
        lfu.on_batch()
        assert lfu.count.tolist() == [8, 1] and lfu.agings == 0
        lfu.on_hit(torch.tensor([1]))  # 10: the period ends ...
        assert lfu.count.tolist() == [8, 2] and lfu.agings == 0
        lfu.on_batch()  # ... halved once the batch is counted, before the next one
        assert lfu.count.tolist() == [4, 1] and lfu.agings == 1
        lfu.on_hit(torch.tensor([0] * 25))  # 35: two more periods end in one batch
        lfu.on_batch()
        assert lfu.count.tolist() == [(4 + 25) >> 2, 1 >> 2] and lfu.agings == 3

    def test_a_batch_is_halved_after_all_its_accesses(self):
        """The batch that ends a period is halved as a whole: its insertions do not escape it
        because its hits completed the period."""
        lfu = LFU(capacity=4, aging_period=4)
        lfu.on_batch()
        lfu.on_insert(torch.tensor([0, 1]))
        lfu.on_batch()
        lfu.on_hit(torch.tensor([0, 0]))  # the period ends here
        lfu.on_insert(torch.tensor([2, 3]))  # the same batch: counted before the halving
        lfu.on_batch()
        assert lfu.count.tolist() == [1, 0, 0, 0] and lfu.agings == 1

    def test_aging_retires_rows_that_stopped_being_hot(self):
        """Rows 0-7 are hot, then traffic moves to 10-13 plus one-off rows: with aging the old
        rows' counts decay and they leave; without it they squat forever."""
        stale = {}
        for period in (20, 10**9):
            cache = RowCache("t", num_rows=1000, capacity=8, spec=PolicySpec.parse("lfu"))
            cache.eviction.aging_period = period
            for _ in range(30):
                run_batch(cache, list(range(8)))
            for i in range(30):
                run_batch(cache, [10, 11, 12, 13, 100 + i])
            assert bool((cache.probe(torch.tensor([10, 11, 12, 13])) >= 0).all())
            stale[period] = int((cache.probe(torch.arange(8)) >= 0).sum())
        assert stale[20] == 0 and stale[10**9] >= 2


# -- admission ----------------------------------------------------------------------------------


class TestLRUTinyLFU(EvictionContract):
    spec = "lru+tinylfu"
    admits_every_miss = False

    def test_a_refused_victim_can_still_be_evicted(self):
        """A victim whose candidate is refused stays resident and stays the oldest: the next,
        more frequent candidate displaces it (LRU puts refused victims back in its log)."""
        cache = self.make(1, num_rows=10)
        for row in [0, 1, 1]:  # 1 refused (1 vs 1), then admitted (2 > 1) over 0
            _access_one(cache, row)
        assert int(cache.probe(torch.tensor([1]))[0]) >= 0


class TestSieveTinyLFU(EvictionContract):
    spec = "sieve+tinylfu"
    admits_every_miss = False


class TestLFUTinyLFU(EvictionContract):
    spec = "lfu+tinylfu"
    admits_every_miss = False


class TestTinyLFU:
    def test_doc_example(self):
        f = TinyLFU(num_rows=100, capacity=4)
        f.on_access(torch.tensor([5, 5, 5, 9]))
        assert f.frequency(torch.tensor([5, 9, 1])).tolist() == [3, 1, 0]
        assert f.admit(torch.tensor([5, 1, 2]), torch.tensor([9, 9, -1])).tolist() == [
            True,
            False,
            True,
        ]

    @pytest.mark.parametrize("device", DEVICES)
    def test_hash_matches_the_python_reference(self, device):
        ids = torch.tensor([0, 1, 2, 12345, 2**31 - 1, 2**40 + 7, 2**62], device=device)
        for seed in row_seeds(3, 4):
            got = mix64(ids, seed).cpu().tolist()
            want = [mix64_int(int(x), seed) for x in ids.cpu().tolist()]
            assert [g & (2**64 - 1) for g in got] == want

    @pytest.mark.parametrize("stride", [1, 8192, 12289])
    def test_buckets_look_random_for_structured_ids(self, stride):
        """Sequential or strided ids (``x mod width`` would pile strided ones into one bucket)
        fill buckets like random balls in bins: Poisson spread, independent across sketch rows."""
        f = TinyLFU(num_rows=10**12, capacity=1024)  # width 8192
        ids = torch.arange(200_000) * stride
        buckets = f._buckets(ids)
        for idx in buckets:
            load = torch.bincount(idx, minlength=f.width).double()
            assert 0.9 < float(load.std() / load.mean().sqrt()) < 1.1
        same = [float((buckets[0] == b).double().mean()) for b in buckets[1:]]
        assert max(same) < 3 / f.width  # rows agree no more than chance (1 / width)

    @settings(max_examples=30, deadline=None)
    @given(
        capacity=st.integers(1, 6),
        batch=st.lists(st.integers(0, 300), min_size=1, max_size=200),
    )
    def test_batch_update_equals_one_by_one(self, capacity, batch):
        """Duplicates, bucket collisions and saturation are counted exactly within a batch, by
        both ways of summing a batch (sorting, or the scratch row)."""
        ref = ScalarTinyLFU(capacity, sample_factor=10**6)
        for row in batch:
            ref.record(row)
        for sort_limit in (0, 1 << 14):
            f = TinyLFU(num_rows=301, capacity=capacity, sample_factor=10**6)
            with mock.patch.object(tinylfu, "_SORT_LIMIT", sort_limit):
                f.on_access(torch.tensor(batch))
            assert f.sketch.tolist() == ref.rows
            want = [ref.frequency(r) for r in range(301)]
            assert f.frequency(torch.arange(301)).tolist() == want

    def test_counters_saturate_and_halve_after_the_sample(self):
        f = TinyLFU(num_rows=10, capacity=2)  # sample 20
        f.on_access(torch.full((19,), 3))
        assert f.frequency(torch.tensor([3])).tolist() == [15] and f.resets == 0
        f.on_access(torch.tensor([4]))  # the 20th access: every counter halves
        assert f.frequency(torch.tensor([3, 4])).tolist() == [7, 0]
        assert f.resets == 1 and f.additions == 10

    def test_a_batch_longer_than_the_sample_counts_as_one_sample(self):
        """A batch of 10 samples halves once, and the next sample's worth of lookups, not each of
        the next few batches, halves again (it halved on the 3 single lookups after it)."""
        f = TinyLFU(num_rows=10, capacity=2)  # sample 20
        f.on_access(torch.full((200,), 3))
        assert f.frequency(torch.tensor([3])).tolist() == [7] and f.resets == 1
        for _ in range(3):
            f.on_access(torch.tensor([4]))
        assert f.frequency(torch.tensor([3, 4])).tolist() == [7, 3] and f.resets == 1
        f.on_access(torch.full((7,), 4))  # the sample's 20th lookup: every counter halves
        assert f.frequency(torch.tensor([3, 4])).tolist() == [3, 5] and f.resets == 2

    @pytest.mark.parametrize(
        "eviction",
        ["fifo", "sieve", "lfu", "lru"],
    )
    def test_one_off_rows_do_not_flush_reused_rows(self, eviction):
        """16 rows are each reused every 48 requests, between them a stream of one-off rows: the
        reuse distance exceeds the 16-row tier, so only an admission filter can keep them."""
        hot_hits = {}
        for spec in (eviction, f"{eviction}+tinylfu"):
            cache = RowCache("t", num_rows=10_000, capacity=16, spec=PolicySpec.parse(spec))
            hits = []
            for i in range(640):
                _access_one(cache, 1000 + i)
                if i % 2 == 0:
                    hits.append(_access_one(cache, (i // 2) % 16))
            hot_hits[spec] = float(np.mean(hits[64:]))
        assert hot_hits[eviction] == 0.0
        assert hot_hits[f"{eviction}+tinylfu"] > 0.85, hot_hits

    def test_ties_keep_the_resident_row(self):
        f = TinyLFU(num_rows=10, capacity=2)
        f.on_access(torch.tensor([1, 2]))
        assert f.admit(torch.tensor([1]), torch.tensor([2])).tolist() == [False]

    def test_memory_is_per_tier_not_per_row(self):
        f = TinyLFU(num_rows=10**9, capacity=1000)
        assert f.bytes_per_row == 0
        assert f.width == 8192  # 8 * 1000 rounded up to a power of two
        assert f.bytes_per_tier == 4 * 8192 + 4 * 8192  # uint8 sketch + int32 scratch
        assert f.sketch.dtype == torch.uint8

    def test_registry_sizes_the_sketch_by_the_tier(self):
        cache = RowCache("t", num_rows=10**5, capacity=300, spec=PolicySpec.parse("sieve+tinylfu"))
        assert isinstance(cache.admission, TinyLFU)
        assert cache.admission.capacity == 300 and cache.admission.width == 4096
        assert cache.admission.sample_size == 3000

    @pytest.mark.gpu
    def test_sketch_on_cuda_equals_cpu(self):
        rng = np.random.default_rng(0)
        filters = {d: TinyLFU(num_rows=10**6, capacity=500, device=d) for d in ("cpu", "cuda")}
        for _ in range(20):
            ids = torch.from_numpy(rng.zipf(1.3, 4000) % 10**6)
            for f in filters.values():
                f.on_access(ids)
        assert torch.equal(filters["cpu"].sketch, filters["cuda"].sketch.cpu())


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "eviction", "admission"),
    [
        ("sieve", "sieve", "all"),
        ("lfu", "lfu", "all"),
        ("fifo", "fifo", "all"),
        ("lru+tinylfu", "lru", "tinylfu"),
        ("tinylfu+sieve", "sieve", "tinylfu"),
        ("static+lfu+tinylfu", "lfu", "tinylfu"),
    ],
)
def test_policy_names_parse(text, eviction, admission):
    spec = PolicySpec.parse(text)
    assert (spec.eviction, spec.admission) == (eviction, admission)


@pytest.mark.parametrize(
    "bad", ["tinylfu", "sieve+lfu", "sieve+tinylfu+lru", "lru+tinylfu+all", "lru+all+tinylfu"]
)
def test_admission_alone_or_two_evictions_or_two_filters_is_an_error(bad):
    with pytest.raises(PolicyError, match=f"policy '{re.escape(bad)}'"):
        PolicySpec.parse(bad)
    with pytest.raises(ConfigError):
        parse_policy(bad, key="tiers.warm.policy")


@pytest.mark.parametrize(
    ("bad", "first", "second"),
    [
        ("static+static+lru", "static", "static"),
        ("zipf-tuned+zipf-tuned", "zipf-tuned", "zipf-tuned"),
        ("static+zipf-tuned+lru", "static", "zipf-tuned"),
        ("zipf-tuned+lru+static", "zipf-tuned", "static"),
    ],
)
def test_a_repeated_or_second_modifier_is_an_error(bad, first, second):
    """'static+static+lru' was taken as 'static+lru', and 'static+zipf-tuned+lru' as
    'zipf-tuned' (the 'static' dropped): a spec names at most one modifier."""
    with pytest.raises(
        PolicyError,
        match=rf"^policy '{re.escape(bad)}' names two modifiers \('{first}' and '{second}'\); "
        "expected at most one",
    ):
        PolicySpec.parse(bad)


def test_the_spec_grammar_says_zipf_tuned_takes_an_admission_filter():
    """An unknown part's message listed what a spec may be without zipf-tuned's '+tinylfu',
    which it takes."""
    assert PolicySpec.parse("zipf-tuned+tinylfu").text == "zipf-tuned+tinylfu"
    with pytest.raises(
        PolicyError,
        match=r"or zipf-tuned, optionally with an eviction policy "
        r"\(lru by default\) and an admission filter \(\+tinylfu\) after it$",
    ):
        PolicySpec.parse("zipf-tuned+lruu")


def test_bad_policy_parameters_are_policy_errors():
    with pytest.raises(PolicyError, match="tinylfu max_count: got 0; expected 1..255"):
        TinyLFU(num_rows=10, capacity=4, max_count=0)
    with pytest.raises(PolicyError, match="lfu aging_period: got 0; expected an integer >= 1"):
        LFU(capacity=4, aging_period=0)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("depth", 0),
        ("depth", -1),
        ("width_factor", 0),
        ("sample_factor", 0),
        ("sample_factor", -2),
        ("max_count", 2.5),
        ("capacity", -1),
        ("seed", 1.5),
    ],
)
def test_bad_tinylfu_options_are_policy_errors_naming_them(option, value):
    """depth 0 failed at the first lookup (amin over no rows), a negative one with torch's
    'Dimension size must be non-negative', max_count 2.5 with a cast error; width_factor and
    sample_factor 0 were taken silently (16 counters; a halving per lookup); seed 1.5 failed with
    a bare TypeError."""
    kw = {"capacity": 4, option: value}
    with pytest.raises(
        PolicyError, match=rf"tinylfu {option}: got {re.escape(str(value))}; expected"
    ):
        TinyLFU(num_rows=10, **kw)


@pytest.mark.parametrize("value", [2.5, True, "10"])
def test_an_lfu_aging_period_that_is_not_an_int_is_a_policy_error(value):
    """2.5 was taken and failed at the first halving (a float shift count)."""
    with pytest.raises(PolicyError, match=rf"lfu aging_period: got {re.escape(repr(value))}"):
        LFU(capacity=4, aging_period=value)


@pytest.mark.parametrize(
    ("register", "name", "why"),
    [
        ("eviction", "MyLRU", "lower case"),
        ("eviction", "lru+x", "no '\\+'"),
        ("admission", "door,keeper", "no ','"),
        ("eviction", "", "a non-empty name"),
        ("eviction", "tinylfu", "an admission filter already"),
        ("admission", "static", "a modifier"),
        ("offline", "lru", "an eviction policy already"),
        ("eviction", "belady", "an offline bound already"),
    ],
)
def test_a_name_the_specs_cannot_reach_or_that_is_taken_is_refused_when_registered(
    register, name, why
):
    """'MyLRU' was registered and then never found (a spec is read in lower case: "unknown
    policy 'mylru'... did you mean 'MyLRU'?"), a name with '+' could never be one part of a
    spec, nor one with ',' one item of replay's --policies; 'tinylfu' as an eviction policy
    silently turned every '+tinylfu' into an eviction policy, and 'lru' as an offline bound made
    replay of 'lru' run the bound."""
    from policies import LRU
    from policies.offline import Belady
    from policies.registry import EVICTION, OFFLINE, register_eviction, register_offline

    registers = {
        "eviction": (register_eviction, LRU),
        "admission": (register_admission, AdmissionPolicy),
        "offline": (register_offline, Belady),
    }
    before = (dict(EVICTION), dict(ADMISSION), dict(OFFLINE))
    function, factory = registers[register]
    try:
        with pytest.raises(PolicyError, match=rf"{register} name {re.escape(repr(name))}: .*{why}"):
            function(name, factory)
        assert before == (EVICTION, ADMISSION, OFFLINE)
    finally:
        for table, saved in zip((EVICTION, ADMISSION, OFFLINE), before, strict=True):
            table.clear()
            table.update(saved)


class _Doorkeeper(AdmissionPolicy):
    """A filter sized by its tier whose bytes are a property, as TinyLFU's (admits every row)."""

    name = "doorkeeper"
    sized_by_capacity = True

    def __init__(self, num_rows: int, device: torch.device | str = "cpu", *, capacity: int):
        super().__init__(num_rows, device)
        self.bits = torch.zeros(8 * capacity, dtype=torch.bool, device=self.device)

    @property
    def bytes_per_tier(self) -> int:
        return self.bits.nbytes


class _SizedDoorkeeper(_Doorkeeper):
    name = "sized-doorkeeper"

    @classmethod
    def bytes_for(cls, capacity: int) -> dict[str, int]:
        return {"per_table_row": 0, "per_tier": 8 * capacity}


def test_a_registered_filter_sized_by_a_property_must_say_its_bytes_for_a_budget():
    # the default bytes_for returned the property object: tier_bytes failed with "unsupported
    # operand type(s) for +: 'int' and 'property'", and so did --gpu-budget/--host-budget
    from zipf_analysis.tier_split import max_capacity, tier_bytes

    size = {"rows": 100_000, "row_bytes": 256}
    try:
        register_admission("doorkeeper", _Doorkeeper)
        register_admission("sized-doorkeeper", _SizedDoorkeeper)
        with pytest.raises(PolicyError, match=r"'doorkeeper' \(.*_Doorkeeper\): bytes_per_tier "):
            tier_bytes(1000, **size, admission="doorkeeper")
        with pytest.raises(PolicyError, match=r"override AdmissionPolicy.bytes_for\(capacity\)"):
            max_capacity(1 << 20, **size, admission="doorkeeper")
        capacity = max_capacity(1 << 20, **size, admission="sized-doorkeeper")
        spec = PolicySpec.parse("lru+sized-doorkeeper")
        cache = RowCache("hot", num_rows=100_000, capacity=capacity, spec=spec)
        meta = cache.metadata_bytes()
        built = capacity * (256 + meta["per_slot"]) + 100_000 * meta["per_table_row"]
        assert meta["per_tier"] == 8 * capacity > 0
        assert tier_bytes(capacity, **size, admission="sized-doorkeeper") == built + 8 * capacity
    finally:
        ADMISSION.pop("doorkeeper", None)
        ADMISSION.pop("sized-doorkeeper", None)


@pytest.mark.parametrize("spec", ["fifo", "sieve", "lfu", "sieve+tinylfu", "lfu+tinylfu"])
def test_live_store_serves_exact_rows_with_each_policy(table, spec):
    """The policies by name in a YAML-shaped config, in the live store with hot and warm tiers."""
    from tests.conftest import store_config
    from tiered_store import TieredStore
    from tiered_store.workload import ZipfWorkload

    path, data = table
    hot = {"capacity": 200, "policy": spec}
    warm = {"capacity": 800, "policy": spec}
    with TieredStore(store_config(path, hot=hot, warm=warm)) as store:
        workload = ZipfWorkload(data.shape[0], 0.9, seed=3)
        for _ in range(8):
            ids = torch.from_numpy(workload.sample(600))
            assert torch.equal(store.lookup(ids), data[ids])
        for tier in (store.hot, store.warm):
            assert tier.spec.text == spec
            c = tier.counters
            assert c.hits + c.misses == c.lookups > 0
            assert c.admissions - c.evictions == tier.occupancy


def test_zipf_tuned_pins_rows_with_the_most_episodes():
    from policies.zipf_tuned import zipf_tuned_split
    from tiered_store.profile import FrequencyCounter

    # rows 0-9: one long burst each (many lookups, 1 episode); rows 100-109: a few lookups spread
    # over the stream (fewer lookups, several episodes each); distinct filler rows in between.
    bursts = np.repeat(np.arange(10), 40)
    spread = np.concatenate(
        [np.concatenate([np.arange(100, 110), 1000 + i * 50 + np.arange(50)]) for i in range(5)]
    )
    counter = FrequencyCounter(rows=2000, episode_window=20)
    counter.update(np.concatenate([bursts, spread]))
    profile = counter.profile()
    split = zipf_tuned_split(
        profile.top_rows(20, by="episodes"), profile.counts, capacity=20, recency_window=4
    )
    assert split.recency_rows == 4 and split.pinned_rows.size == 16
    assert set(range(100, 110)) <= set(split.pinned_rows.tolist())  # 5 episodes each: first
    assert split.pinned_rows.tolist() == profile.top_rows(16, by="episodes").tolist()
    assert profile.top_rows(10).tolist() == list(range(10))  # by lookups the bursts would win


@pytest.mark.parametrize("m", [1_000, 20_000, 200_000])
@pytest.mark.parametrize("share", [0.001, 0.1, 0.5, 1.0])
def test_smallest_distinct_keys_equal_topk(m, share):
    """``smallest`` (a sort where ``n`` is a large share of many keys) picks exactly the keys and
    positions ``topk`` does, for distinct keys, wherever it switches."""
    from policies.base import smallest

    keys = torch.randperm(4 * m, generator=torch.Generator().manual_seed(m))[:m] * 3 - m
    n = max(1, int(share * m))
    got = smallest(keys, n, distinct=True)
    want = torch.topk(keys, n, largest=False, sorted=True)
    assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)


@pytest.mark.parametrize("n", [1, 500, 40_000, 150_000])
def test_lru_smallest_keys_threshold_equals_topk(n):
    """LRU's threshold search for a large tier's victims returns exactly what ``topk`` does over
    every slot, with protected slots (free, pinned) never among them."""
    from policies import LRU
    from policies.base import EvictionPolicy

    capacity = 300_000
    lru = LRU(capacity)
    gen = torch.Generator().manual_seed(n)
    lru.last_used = torch.randint(-1, 5_000, (capacity,), generator=gen) * 2 + 1
    protected = torch.rand(capacity, generator=gen) < 0.3
    keys, slots = lru.smallest_keys(n, protected)
    want_keys, want_slots = EvictionPolicy.smallest_keys(lru, n, protected)
    assert torch.equal(keys, want_keys) and torch.equal(slots, want_slots)
    assert not protected[slots].any()


@pytest.mark.parametrize("bound", ["belady", "static-topk"])
@pytest.mark.parametrize("capacity", [2.5, True, "2", -1])
def test_an_offline_capacity_that_is_not_a_whole_number_of_rows_is_a_policy_error(bound, capacity):
    """A capacity of 2.5 was truncated to 2 (True to 1), and a negative one or a row id that is
    not an integer was a bare ValueError: each is a PolicyError naming the bound and the value."""
    ids = np.array([1, 2, 3, 1, 2, 3])
    with pytest.raises(PolicyError, match=rf"^{bound}: capacities.*got {capacity!r}"):
        offline_bound(bound).misses(ids, [capacity])
    with pytest.raises(PolicyError, match=rf"^{bound}: row ids of dtype float64; expected"):
        offline_bound(bound).misses(ids.astype(float), [1])
    whole = offline_bound(bound).misses(ids, np.array([1.0, 2.0]))  # floats of whole rows
    assert whole.tolist() == ([5, 4] if bound == "belady" else [4, 2])


@pytest.mark.parametrize(
    ("capacities", "bad"),
    [([1, None], None), ([1, 2**70], 2**70), ([True, 2], True), ([1, "2"], "2")],
)
def test_a_list_of_capacities_names_the_one_that_is_not_a_whole_number_of_rows(capacities, bad):
    """NumPy made [1, None] and [1, 2**70] object arrays and [1, '2'] strings, and the error named
    their first element, 1, a whole number; [True, 2] became int64 [1, 2] and True passed as 1."""
    with pytest.raises(PolicyError, match=rf"^belady: capacities: got {re.escape(repr(bad))}; expected"):  # fmt: skip
        offline_bound("belady").misses(np.array([1, 2, 1]), capacities)


@pytest.mark.parametrize(
    ("capacities", "bad"),
    [
        (np.array([1, 2**64 - 1], dtype=np.uint64), 2**64 - 1),
        (np.array([1, "2"], dtype=object), "2"),
    ],
)
def test_an_array_of_capacities_names_the_one_that_is_not_a_whole_number_of_rows(capacities, bad):
    """A uint64 capacity past int64 was cast to -1 and named as 'got -1'; an object array's
    values were refused naming its first, 1, and one of Python ints was refused whole."""
    with pytest.raises(PolicyError, match=rf"^belady: capacities: got {re.escape(repr(bad))}; expected"):  # fmt: skip
        offline_bound("belady").misses(np.array([1, 2, 1]), capacities)
    bound, ids = offline_bound("belady"), np.array([1, 2, 1])
    assert bound.misses(ids, np.array([1, 2], dtype=object)).tolist() == bound.misses(ids, [1, 2]).tolist()  # fmt: skip


@pytest.mark.parametrize("bound", ["belady", "static-topk"])
def test_an_offline_bound_over_an_empty_list_of_ids_has_no_misses(bound):
    """np.asarray([]) is float64: no ids were refused as 'row ids of dtype float64', where the
    per-request simulators and the curves count no misses."""
    assert offline_bound(bound).misses([], [0, 2]).tolist() == [0, 0]
    with pytest.raises(PolicyError, match=rf"^{bound}: row ids of dtype float64; expected"):
        offline_bound(bound).misses([1.5], [1])


@pytest.mark.parametrize("bound", ["belady", "static-topk"])
def test_an_offline_row_id_past_int64_is_named_as_given(bound):
    """A uint64 id past int64 was cast first and refused as the negative id -1."""
    ids = np.array([3, 2**64 - 1, 3], dtype=np.uint64)
    with pytest.raises(PolicyError, match=rf"^{bound}: row id {2**64 - 1}; expected row ids below"):
        offline_bound(bound).misses(ids, [1])
    assert offline_bound(bound).misses(ids[[0, 2]], [1]).tolist() == [1 if bound == "belady" else 0]


@pytest.mark.parametrize(
    ("make", "option", "value"),
    [
        (lambda v: Belady(bypass=v), "bypass", "no"),
        (lambda v: Belady(bypass=v), "bypass", 0),
        (lambda v: StaticTopK(preloaded=v), "preloaded", "False"),
        (lambda v: Belady(workers=v), "workers", 0),
        (lambda v: Belady(workers=v), "workers", 2.5),
    ],
)
def test_an_offline_option_of_the_wrong_kind_is_a_policy_error_naming_it(make, option, value):
    """``bypass`` and ``preloaded`` took any truthy value ('no' and 'False' meant True), and
    ``workers`` 0 or 2.5 meant the default or failed in the thread pool: each is refused when the
    bound is made, naming the bound, the option and the value."""
    with pytest.raises(PolicyError, match=rf"^[a-z-]+ {option}: got {value!r}; expected"):
        make(value)

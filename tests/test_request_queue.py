"""A queue known ahead: announced requests' rows are evicted last, furthest-needed first, and the
live store and replay make the same decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import PolicySpec
from tests.conftest import check_cache_invariants, make_table, run_batch, store_config
from tests.test_replay import HEADS, _trace_of, write_trace
from tiered_store import ConfigError, QueuedRequestError, RowIdError, TieredStore
from tiered_store.online_repin import RepinMoves
from tiered_store.queue_victims import furthest_first
from tiered_store.request_queue import NOT_QUEUED, QueuedRequests
from tiered_store.row_cache import QUEUE_SLOT_BYTES, QUEUED_SLOTS_SLOT_BYTES, RowCache
from zipf_analysis.replay import replay

ROWS = 3000


def t(*values):
    return torch.tensor(values, dtype=torch.int64)


def test_next_use_is_the_earliest_queued_request():
    queue = QueuedRequests()
    first = queue.add(t(5, 3, 5, 9))
    second = queue.add(torch.tensor([[9, 1], [1, 7]]))
    assert first.token < second.token
    assert first.rows.tolist() == [3, 5, 9]
    assert queue.next_use(t(9, 1, 3, 4)).tolist() == [
        first.token,
        second.token,
        first.token,
        NOT_QUEUED,
    ]
    queue.remove(first)
    assert queue.next_use(t(9, 3)).tolist() == [second.token, NOT_QUEUED]
    queue.remove(second)
    assert len(queue) == 0 and queue.next_use(t(9)).tolist() == [NOT_QUEUED]


def test_next_use_follows_requests_coming_and_going_in_any_order():
    """The queue's incremental index against a brute-force reading of the requests it holds."""
    rng = np.random.default_rng(7)
    queue, held = QueuedRequests(), []
    for step in range(300):
        if held and (rng.random() < 0.45 or len(held) > 12):
            at = int(rng.integers(len(held)))
            gone = held.pop(at)  # any order, not only FIFO
            earlier = torch.cat([t(), *(request.rows for request in held[:at])])
            first = gone.rows[~torch.isin(gone.rows, earlier)]  # the rows it was the earliest for
            after = torch.full((400,), NOT_QUEUED)
            for request in reversed(held[at:]):
                after[request.rows] = request.token
            rows, next_use = queue.remove(gone)
            assert rows.tolist() == first.tolist() and next_use.tolist() == after[first].tolist()
        else:
            held.append(queue.add(torch.from_numpy(rng.integers(0, 400, rng.integers(0, 60)))))
        probe = torch.arange(400)
        want = torch.full((400,), NOT_QUEUED)
        for request in reversed(held):  # tokens increase along ``held``
            want[request.rows] = request.token
        assert torch.equal(queue.next_use(probe), want), step
        # any order, repeats, beyond the rows used, any shape
        shuffled = torch.from_numpy(rng.integers(0, 450, (20, 30)))
        assert torch.equal(
            queue.next_use(shuffled),
            want[shuffled.clamp(max=399)].masked_fill(shuffled >= 400, NOT_QUEUED),
        ), step


def test_served_without_ids_serves_the_ids_announced_from_those_served_so_far_on(tmp_path):
    """``serve`` told each table a request's whole lookup with the ids announce had already
    checked and copied (on CUDA, two waits for the device per table per request); with no ids,
    ``served`` takes them from the queue: the ids announced from those served so far on, the
    same news as the explicit ids (a store's served rows included)."""
    rng = np.random.default_rng(11)
    for trial in range(40):
        ids = torch.from_numpy(rng.integers(0, 60, int(rng.integers(1, 30))))
        before = torch.from_numpy(rng.integers(0, 60, 20))
        split = int(rng.integers(0, ids.numel() + 1))
        explicit, rebuilt = QueuedRequests(), QueuedRequests()
        outs = []
        for queue, rest in ((explicit, ids[split:]), (rebuilt, None)):
            queue.add(before)
            request = queue.add(ids.reshape(1, -1))
            queue.add(ids[: ids.numel() // 2])
            if split:
                queue.served(request, ids[:split])
            outs.append(queue.served(request, rest))
            outs.append(queue.next_use(torch.arange(60)))
        for got, want in zip(outs[2:], outs[:2], strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), trial
    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, warm={"capacity": 30})) as store:
        store.lookup(torch.arange(30))
        request = store.announce(torch.arange(20).reshape(4, 5))
        store.served(request, torch.arange(5))
        store.served(request)  # the other 15
        store.lookup(torch.arange(30, 32))  # the news told
        assert int(store.stats()["queue"]["rows"]) == 0
        assert bool((store.warm._next_use == NOT_QUEUED).all())
        store.release(request)


def test_served_without_ids_serves_every_lookup_left_whatever_the_batches_before(tmp_path):
    """The no-ids form took the ids announced from the count of ids served so far on: after a
    batch holding an id the request did not announce (or one more often than it did), or
    batches out of order, it skipped lookups left, whose rows kept the request's standing
    until its release (outliving rows the requests behind it need). It serves every lookup
    left: the same news as its explicit ids."""
    for before in (t(50, 0, 1), t(3, 3, 3, 3), torch.arange(5, 10), torch.arange(10)):
        explicit, rebuilt = QueuedRequests(), QueuedRequests()
        outs = []
        for queue in (explicit, rebuilt):
            request = queue.add(torch.arange(10))
            queue.add(torch.arange(0, 12, 2))
            queue.served(request, before)
            rest = torch.from_numpy(np.repeat(request.rows.numpy(), request.left))
            outs.append(queue.served(request, rest if queue is explicit else None))
            outs.append(queue.next_use(torch.arange(12)))
            assert not request.left.any() and queue.rows == 6, before
        for got, want in zip(outs[2:], outs[:2], strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), before
    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, warm={"capacity": 30})) as store:
        store.lookup(torch.arange(30))
        request = store.announce(torch.arange(20))
        store.served(request, t(25, 0, 1, 2, 3))  # 25: not announced
        store.served(request)  # the other 16
        store.lookup(torch.arange(30, 32))  # the news told
        assert int(store.stats()["queue"]["rows"]) == 0
        assert bool((store.warm._next_use == NOT_QUEUED).all())
        store.release(request)


def test_served_without_ids_after_a_batch_makes_no_pass_over_the_queues_pairs():
    """A request's second batch since the queue's pairs changed finds all of its pairs in one
    pass over them (``pairs_of``), for its later batches; the no-ids form, its last batch
    (no lookup left after it), made that pass too: over the whole queue, for places no batch
    reads again. It searches for its finished rows' pairs, as a first batch does."""
    queue = QueuedRequests()
    for _ in range(3):
        queue.add(torch.arange(0, 400, 3))
    request = queue.add(torch.arange(200).repeat(2))
    queue.served(request, torch.arange(20))  # its first batch: its pairs searched for
    want = queue.next_use(torch.arange(400)).clone()
    want[:200] = torch.where(want[:200] == request.token, NOT_QUEUED, want[:200])
    queue.served(request)  # its last
    assert request.pair_at is None  # no pass over the pairs
    assert not request.left.any() and torch.equal(queue.next_use(torch.arange(400)), want)
    second = queue.add(torch.arange(50))
    queue.served(second, torch.arange(10))
    queue.served(second, torch.arange(10, 20))  # a second explicit batch: the pass, as before
    assert second.pair_at is not None


def _searches_serving(monkeypatch, ids, batches):
    """A queue holding one request of ``ids``, its ``batches`` served by ``serve_batch``'s
    Python body (its pairs' places given): the ids it searched for, batch by batch; the ids
    taken at their places; the request; the queue."""
    from tiered_store import request_queue_kernels as kernels

    queue = QueuedRequests()
    request = queue.add(ids)
    rows, pairs = request.rows.numpy(), (queue._pair_rows, queue._pair_tokens)
    pair_at = kernels.pairs_of(*pairs, rows, request.token)
    searched: list[int] = []
    lower_bound = kernels._lower_bound.py_func

    def counted(values, value, low, high):
        searched.append(int(value))
        return lower_bound(values, value, low, high)

    monkeypatch.setattr(kernels, "_lower_bound", counted)
    taken, searches = 0, []
    for batch in batches:
        searched.clear()
        *_, taken, request.first_at = kernels.serve_batch.py_func(
            rows, request.left, request.where, request.first_at, taken, batch.numpy(), pair_at,
            *pairs, request.token, NOT_QUEUED,
        )  # fmt: skip
        searches.append(list(searched))
    return searches, taken, request, queue


def test_a_batch_holding_ids_not_announced_leaves_the_next_ones_at_their_announced_places(
    monkeypatch,
):
    """``served`` looks for each of a batch's ids first at its place among the ids announced,
    from the count the batches before took (a batch in order: no search); that count took
    every id of a batch, so after one holding an id the request did not announce (or one more
    often than it did) every later id was looked for a place off, and searched for. It counts
    the ids taken at their places: a later batch in order is searched for no id."""

    ids = torch.arange(100, 140)
    first = torch.cat([ids[:10], t(7, 109)])  # 7: not announced; 109: once more than announced
    queue = QueuedRequests()
    request = queue.add(ids)
    queue.served(request, first)
    assert request.served_ids == 10
    queue.served(request, ids[10:20])
    assert request.served_ids == 20
    queue.served(request)
    assert request.served_ids == 40 and not request.left.any()
    # the compiled pass's Python body, its searches counted (its pairs' places given)
    searches, taken, request, queue = _searches_serving(
        monkeypatch, ids, [first, ids[10:20], ids[20:]]
    )
    assert searches == [[7, 109], [], []] and taken == 40 and not request.left.any()


def test_a_batch_skipping_a_few_announced_ids_leaves_the_later_ones_at_their_places(monkeypatch):
    """``served`` looks for each of a batch's ids at the place announced next, and searched for
    any other: a batch that skipped an announced id (one its server dropped, or served later)
    left that id at the cursor, so every later id of the request was searched for, batch after
    batch. An id met a few places past the cursor moves it there: the ids skipped are searched
    for when they come, the later ones taken at their places (its Python body, its searches
    counted); what is counted is the same either way."""

    ids = torch.arange(100, 160)
    batches = [ids[1:10], ids[10:20], torch.cat([ids[23:40], ids[20:23]]), ids[40:], ids[:1]]
    searches, taken, request, queue = _searches_serving(monkeypatch, ids, batches)
    assert searches == [[], [], [120, 121, 122], [], [100]], searches
    assert not request.left.any() and (queue._pair_tokens < 0).all()


def test_a_batch_skipping_as_many_ids_as_the_look_ahead_takes_the_next_at_its_place(monkeypatch):
    """An id is looked for up to ``_AHEAD`` (8) places past the one announced next: a batch that
    skipped 8 ids looked only 7 places on, so the 8th on and every later id was searched for,
    batch after batch. The 8th place on is taken at its place, the 9th searched for (the ids
    after it taken at their places: those skipped searched for when they come; its Python body,
    its searches counted)."""
    from tiered_store import request_queue_kernels as kernels

    ahead = kernels._AHEAD
    ids = torch.arange(100, 140)
    # the cursor at 0, 8 skipped; then at 20, 9 skipped (one past); those skipped, then
    batches = [ids[ahead:20], ids[21 + ahead :], ids[20 : 21 + ahead], ids[:ahead]]
    searches, taken, request, queue = _searches_serving(monkeypatch, ids, batches)
    skipped = ids[20 : 21 + ahead].tolist()
    assert searches == [[], [int(ids[21 + ahead])], skipped, ids[:ahead].tolist()], searches
    assert not request.left.any() and (queue._pair_tokens < 0).all()


def test_a_batch_after_many_ids_skipped_takes_the_later_ones_at_their_places(monkeypatch):
    """A batch past more ids than the look ahead (``_AHEAD``) passes over (a cached prompt
    prefix, never served) left the cursor at the first of them: every later id of the request
    was searched for, batch after batch. The first id searched for whose first place announced
    is past the cursor, the batch's next id announced after it, takes the cursor there: one
    search, then each id at its place (its Python body, its searches counted). An id the
    prefix announced too (115, first announced there) moves nothing; served, the ids counted
    are the same; the compiled pass through ``served`` leaves the cursor where its body does."""
    prefix = torch.arange(100, 130)
    ids = torch.cat([prefix, t(115), torch.arange(130, 170)])
    batches = [ids[30:50], ids[50:60], ids[60:]]
    searches, taken, request, queue = _searches_serving(monkeypatch, ids, batches)
    assert searches == [[115, 130], [], []], searches
    assert taken == ids.numel() and request.first_at.size == request.rows.numel()
    assert request.left.tolist() == [1] * 15 + [1] + [1] * 14 + [0] * 40  # 115: once of twice
    served = QueuedRequests()
    again = served.add(ids)
    for batch in batches:
        served.served(again, batch)
    assert again.served_ids == taken and again.left.tolist() == request.left.tolist()


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_a_batch_ending_at_an_id_far_on_leaves_the_cursor_for_the_ids_it_skipped(
    monkeypatch, one_at_a_time
):
    """A batch's last id searched for took the cursor past its first place announced with
    nothing after it to confirm the jump: a batch in order ending at an id far on (ids 0-9,
    then 50) left the cursor past it, and each of the 40 ids skipped, served next in order,
    was searched for (41 searches, 1 before). Only a batch of that one id jumps: the ids
    skipped are taken at their places, and batches of one id after a prefix never served
    still take the later ones at theirs (its Python body, its searches counted)."""
    ids = torch.arange(100, 200)
    if one_at_a_time:  # past a prefix of 30
        searches, taken, request, queue = _searches_serving(
            monkeypatch, ids, [ids[30:31], ids[31:32], ids[32:40]]
        )
        assert searches == [[130], [], []], searches
        assert taken == 40 and request.left.tolist() == [1] * 30 + [0] * 10 + [1] * 60
        return
    batches = [torch.cat([ids[:10], ids[50:51]]), ids[10:50], ids[51:]]
    searches, taken, request, queue = _searches_serving(monkeypatch, ids, batches)
    assert searches == [[150], [], []], searches
    assert taken == ids.numel() and not request.left.any()


def test_a_batch_of_an_id_looked_up_more_often_than_announced_leaves_the_cursor(monkeypatch):
    """An id searched for with no lookup left (looked up more often than the request announced
    it) moved the cursor past its first place announced as one it took there: a batch of that
    id alone after it was served out of order (ids 30 and 50, then 30 again) left the cursor
    past the 30 ids before it, and each of them, served next in order, was searched for (30
    searches). Such an id leaves the next id its place, as one not announced does."""
    ids = torch.arange(100, 200)
    batches = [ids[[30, 50]], ids[30:31], ids[:30]]
    searches, taken, request, queue = _searches_serving(monkeypatch, ids, batches)
    assert searches == [[130, 150], [130], []], searches
    assert taken == 30 and request.left.tolist() == [0] * 31 + [1] * 19 + [0] + [1] * 49


class _Reads(np.ndarray):
    """An array counting its reads of one element (a compiled pass's Python body's)."""

    count = 0

    def __getitem__(self, key):
        if isinstance(key, int | np.integer):
            _Reads.count += 1
        return super().__getitem__(key)


def test_a_batch_finishing_many_rows_searches_no_more_of_the_pairs_than_about_a_pass(monkeypatch):
    """A batch served with its pairs' places not found yet (its first since the pairs changed,
    or the no-ids last batch) searched for each finished row's pair over the whole queue's
    pairs: a batch finishing many rows (a long prompt served in one: 65,536) read 17 pairs or
    more for each, several times the one pass ``pairs_of`` makes. The rows ascend, each is
    searched for from the last one's pair in doubling steps: reads past those the batch makes
    with its places known of the order of a pass (its Python body's, counted)."""
    from tiered_store import request_queue_kernels as kernels

    queue = QueuedRequests()
    for _ in range(3):
        queue.add(torch.arange(0, 40_000, 2))
    request = queue.add(torch.arange(0, 40_000, 2))
    rows, where = request.rows.numpy(), request.where
    pair_rows = queue._pair_rows.view(_Reads)
    found = kernels.pairs_of(queue._pair_rows, queue._pair_tokens, rows, request.token)
    for name in ("_lower_bound", "_gallop_pair", "_before", "_run_start"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name).py_func)
    reads, outs = [], []
    for places in (found, np.empty(0, np.int64)):
        _Reads.count = 0
        left, tokens = request.left.copy(), queue._pair_tokens.copy()
        outs.append(
            kernels.serve_batch.py_func(
                rows,
                left,
                where,
                request.first_at,
                0,
                rows,
                places,
                pair_rows,
                tokens,
                request.token,
                NOT_QUEUED,
            )  # fmt: skip
        )
        reads.append(_Reads.count)
        assert not left.any() and (tokens < 0).sum() == rows.size
    assert [a.tolist() for a in outs[0][:2]] == [a.tolist() for a in outs[1][:2]]
    assert reads[1] - reads[0] < 2 * pair_rows.size, reads  # (5.3 passes before; 1.75)


def test_finding_a_short_requests_pairs_reads_a_few_pairs_a_row_not_the_queue(monkeypatch):
    """A request's second batch since the pairs changed finds all of its pairs' places at once
    (``pairs_of``): a pass over the queue's pairs up to its last row, however few its rows (a
    short request behind long prompts read every pair, its lock held, at each such batch).
    Each is searched for from the last one's in doubling steps: a few reads a row (its Python
    body's, counted), the same places."""
    from tiered_store import request_queue_kernels as kernels

    queue = QueuedRequests()
    for _ in range(4):
        queue.add(torch.arange(0, 50_000))
    request = queue.add(torch.tensor([3, 17_000, 25_000, 49_999]))
    rows, pairs = request.rows.numpy(), (queue._pair_rows, queue._pair_tokens)
    want = kernels.pairs_of(*pairs, rows, request.token)
    for name in ("_lower_bound", "_gallop_pair", "_before", "_run_start"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name).py_func)
    _Reads.count = 0
    got = kernels.pairs_of.py_func(pairs[0].view(_Reads), pairs[1], rows, request.token)
    assert got.tolist() == want.tolist() == [16, 68_005, 100_006, 200_003]
    assert _Reads.count < 400, _Reads.count  # (200,031 before: the queue's every pair)


def test_rows_many_requests_look_up_are_not_read_pair_by_pair_to_the_requests(monkeypatch):
    """A request's pair of a row sits among the pairs of every request queued that looks the
    row up, by token: it was reached one pair at a time from the row's first (finding its
    pairs' places, or searching for a finished row's pair), and a finished row's earlier
    requests were read back to the row's first pair, again one at a time: a request served
    behind 1,000 others sharing its rows read all of theirs, three times a row. Both are
    searched for in doubling steps (the Python bodies, their reads counted); the same places
    and news as the compiled passes."""
    from tiered_store import request_queue_kernels as kernels

    queue = QueuedRequests()
    for _ in range(1_000):
        queue.add(torch.tensor([5, 6, 7]))
    request = queue.add(torch.tensor([1, 5, 6, 7, 9]))
    queue.add(torch.tensor([6]))
    rows, pairs = request.rows.numpy(), (queue._pair_rows, queue._pair_tokens)
    want = kernels.pairs_of(*pairs, rows, request.token)
    tokens = pairs[1].copy()
    want_news = kernels.serve_batch(
        rows, request.left.copy(), request.where, request.first_at, 0, rows, want[:0], pairs[0],
        tokens, request.token, NOT_QUEUED,
    )  # fmt: skip
    for name in ("_lower_bound", "_gallop_pair", "_before", "_run_start"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name).py_func)
    _Reads.count = 0
    got = kernels.pairs_of.py_func(pairs[0].view(_Reads), pairs[1], rows, request.token)
    assert got.tolist() == want.tolist() == [0, 1001, 2002, 3004, 3005]
    assert _Reads.count < 100, _Reads.count  # (3,000 and more before)
    _Reads.count, news_tokens = 0, pairs[1].copy()
    news = kernels.serve_batch.py_func(
        rows, request.left.copy(), request.where, request.first_at, 0, rows, want[:0],
        pairs[0].view(_Reads), news_tokens, request.token, NOT_QUEUED,
    )  # fmt: skip
    assert _Reads.count < 200, _Reads.count  # (9,000 and more before)
    assert news_tokens.tolist() == tokens.tolist() and (news_tokens[want] < 0).all()
    assert (
        [a.tolist() for a in news[:2]]
        == [a.tolist() for a in want_news[:2]]
        == [
            [1, 9],
            [NOT_QUEUED, NOT_QUEUED],
        ]
    )


def test_the_searches_find_the_lower_bound_at_every_range_and_value():
    """``_lower_bound`` (compiled, and its Python body) gives the first place
    in ``values[low:high]`` not below the value at every range of short sorted arrays with
    repeats: an empty range, one ending before the array's end, a value below, among, at the
    last or past every value (the galloping step running past ``high``)."""
    from tiered_store import request_queue_kernels as kernels

    searches = [kernels._lower_bound, kernels._lower_bound.py_func]
    for values in ([], [5], [1, 1, 1], [0, 2, 2, 3, 7, 7, 7, 9, 12, 12, 15, 20, 21]):
        values = np.array(values, dtype=np.int64)
        for low in range(values.size + 1):
            for high in range(low, values.size + 1):
                for value in range(-1, 23):
                    want = low + int(np.searchsorted(values[low:high], value))
                    got = [int(f(values, np.int64(value), low, high)) for f in searches]
                    assert got == [want] * 2, (values.tolist(), low, high, value, got)


def test_the_pair_searches_find_their_pair_at_every_range_row_and_request():
    """``_gallop_pair`` (the first pair at a row and request or past it), ``_run_start`` (the
    first pair of a pair's row) and ``first_places`` (each row's first place announced),
    compiled and their Python bodies, against a brute-force reading at every range of short
    queues: rows of one pair and of many, finished pairs (negated), the request's pair first or
    last of its row, a row and request below, among or past every pair (the doubling step
    running past ``high``: a search that stopped a step early there passed the callers' tests,
    which only see a pair found or not)."""
    from tiered_store import request_queue_kernels as kernels

    gallop = [kernels._gallop_pair, kernels._gallop_pair.py_func]
    run_start = [kernels._run_start, kernels._run_start.py_func]
    queues = [[], [(5, 1)], [(1, 1), (1, -2), (1, 3)]]
    queues += [[(0, 3), (2, 1), (2, -2), (2, 3), (2, 4), (2, -5), (2, 6), (2, 7), (3, -1), (7, 2)]]
    queues += [[(2, k) for k in range(1, 12)]]
    for pairs in queues:
        rows = np.array([r for r, _ in pairs], dtype=np.int64)
        tokens = np.array([k for _, k in pairs], dtype=np.int64)
        keys = [(r, abs(k)) for r, k in pairs]
        for low in range(rows.size + 1):
            for high in range(low, rows.size + 1):
                for row in range(-1, 9):
                    for token in range(13):
                        want = low + sum(key < (row, token) for key in keys[low:high])
                        got = [int(f(rows, tokens, row, token, low, high)) for f in gallop]
                        assert got == [want] * 2, (pairs, low, high, row, token, got)
        for i, row in enumerate(rows.tolist()):
            want = rows.tolist().index(row)
            assert [int(f(rows, i)) for f in run_start] == [want] * 2, (pairs, i)
    for where in ([], [0], [2, 0, 2, 1, 0], [3, 3, 3], [1, 0, 1]):
        where = np.array(where, dtype=np.int32)
        for m in (4, 5):
            want = [where.tolist().index(r) if r in where else -1 for r in range(m)]
            for f in (kernels.first_places, kernels.first_places.py_func):
                assert f(where, m).tolist() == want, (where.tolist(), m)


class _NumpyFailingAt:
    """numpy, but for its ``n``-th allocation (``empty``, ``sort``), which fails as out of
    memory does."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __getattr__(self, name: str):
        value = getattr(np, name)
        if name not in ("empty", "sort"):
            return value

        def allocation(*args, **kwargs):
            self.n -= 1
            if self.n == 0:
                raise MemoryError(f"np.{name}: out of memory")
            return value(*args, **kwargs)

        return allocation


def test_a_batch_served_that_fails_part_way_changes_nothing(monkeypatch):
    """``serve_batch`` took a batch's lookups off the request's lookups left, then allocated
    what it returns: a failure there (out of memory) left rows at no lookup left with their
    pairs unfinished, keeping the request's standing until its release (no later batch could
    finish them), and the batch served again took its lookups off twice (rows finishing before
    their last batch). It allocates before it changes anything: a failure changes nothing,
    and the batch served again is served once (its Python body, each allocation failing)."""
    from tiered_store import request_queue_kernels as kernels

    def served(numpy) -> tuple[QueuedRequests, object, list]:
        queue = QueuedRequests()
        queue.add(torch.arange(5, 15))
        request = queue.add(torch.arange(10).repeat(2))
        monkeypatch.setattr(kernels, "np", numpy)
        try:
            return queue, request, [queue.served(request, torch.arange(15) % 10)]
        except MemoryError:
            return queue, request, []
        finally:
            monkeypatch.setattr(kernels, "np", np)

    monkeypatch.setattr(kernels, "serve_batch", kernels.serve_batch.py_func)
    _, clean, (want,) = served(np)
    assert clean.left.tolist() == [0] * 5 + [1] * 5
    failures = 0
    while True:
        queue, request, out = served(_NumpyFailingAt(failures + 1))
        if out:
            break
        failures += 1
        assert request.left.tolist() == [2] * 10, failures
        assert (queue._pair_tokens > 0).all() and queue.rows == 15, failures
        again = queue.served(request, torch.arange(15) % 10)  # served again: once
        assert request.left.tolist() == clean.left.tolist(), failures
        assert all(torch.equal(a, b) for a, b in zip(again, want, strict=True)), failures
    assert failures >= 2


def test_add_and_remove_say_which_rows_change_their_earliest_request():
    """``first_rows``: the rows no earlier request looks up; ``remove``: the rows the request was
    the earliest for and their next request, against the queue's own ``next_use``."""
    rng = np.random.default_rng(11)
    queue, held = QueuedRequests(), []
    for step in range(300):
        if held and (rng.random() < 0.45 or len(held) > 12):
            request = held.pop(int(rng.integers(len(held))))
            before = queue.next_use(request.rows)
            rows, next_use = queue.remove(request)
            assert torch.equal(rows, request.rows[before == request.token]), step
            assert torch.equal(next_use, queue.next_use(rows)), step
        else:
            ids = torch.from_numpy(rng.integers(0, 400, rng.integers(0, 60)))
            before = queue.next_use(torch.unique(ids))
            held.append(queue.add(ids))
            assert torch.equal(held[-1].first_rows, torch.unique(ids)[before == NOT_QUEUED]), step


def test_served_batches_pass_a_requests_finished_rows_to_their_next_request():
    """Requests served in batches, in any order and partly, with others coming and going: a
    row's next use is the earliest request with a lookup of it left, by the queue's
    ``next_use``, ``served``, ``add``'s ``first_rows`` and ``remove``, against brute force."""
    rng = np.random.default_rng(5)
    queue, held = QueuedRequests(), []  # (request, its lookups left per row)

    def want() -> torch.Tensor:
        out = torch.full((300,), NOT_QUEUED)
        for request, left in reversed(held):  # tokens increase along ``held``
            rows = torch.tensor([r for r, n in left.items() if n > 0], dtype=torch.int64)
            out[rows] = request.token
        return out

    for step in range(400):
        before = want()
        roll = rng.random()
        if held and (roll < 0.3 or len(held) > 8):
            request, left = held.pop(int(rng.integers(len(held))))
            rows, next_use = queue.remove(request)
            mine = request.rows[before[request.rows] == request.token]
            assert torch.equal(rows, mine) and torch.equal(next_use, want()[mine]), step
        elif held and roll < 0.7:  # a batch of a request, its ids and a few it did not announce
            request, left = held[int(rng.integers(len(held)))]
            mine = [r for r, n in left.items() if n > 0]
            batch = rng.choice(mine, size=min(len(mine), int(rng.integers(1, 6))), replace=False)
            batch = np.concatenate([batch, batch[:1], rng.integers(0, 300, 2)])
            for row in batch.tolist():
                if left.get(row, 0) > 0:
                    left[row] -= 1
            rows, next_use = queue.served(request, torch.from_numpy(batch))
            after = want()
            finished = before[request.rows] == request.token
            finished &= after[request.rows] != request.token
            assert torch.equal(rows, request.rows[finished]), step
            assert torch.equal(next_use, after[rows]), step
        else:
            ids = rng.integers(0, 300, int(rng.integers(0, 40)))
            request = queue.add(torch.from_numpy(ids))
            held.append(
                (
                    request,
                    {r: int(n) for r, n in zip(*np.unique(ids, return_counts=True), strict=True)},
                )
            )
            fresh = request.rows[before[request.rows] == NOT_QUEUED]
            assert torch.equal(request.first_rows, fresh), step
        assert torch.equal(
            queue.next_use(torch.arange(310)), torch.cat([want(), t(*[NOT_QUEUED] * 10)])
        ), step
    with pytest.raises(
        QueuedRequestError, match=r"served: got str 'x'; expected the QueuedRequest"
    ):
        queue.served("x", t(1))
    request = queue.add(t(1))
    queue.remove(request)
    with pytest.raises(
        QueuedRequestError, match=r"served: queued request \d+ was already released"
    ):
        queue.served(request, t(1))


def test_a_request_of_no_rows_copies_no_queue():
    """A request looking up no row (an empty prompt's) copied every queued pair when announced
    and scanned them all when released: a pass over the whole queue for nothing. It leaves
    the queue's arrays as they are, and is refused twice as any other."""
    queue = QueuedRequests()
    queue.add(torch.arange(1000))
    pairs = queue._pairs()
    empty = queue.add(torch.empty(0, dtype=torch.int64))
    assert queue._pairs()[0] is pairs[0] and empty.first_rows.numel() == 0
    rows, next_use = queue.remove(empty)
    assert queue._pairs()[0] is pairs[0] and rows.numel() == next_use.numel() == 0
    with pytest.raises(QueuedRequestError, match="already released"):
        queue.remove(empty)


def test_a_request_released_twice_or_to_another_queue_is_refused():
    queue, other = QueuedRequests(), QueuedRequests()
    request = queue.add(t(1, 2))
    with pytest.raises(QueuedRequestError, match="is another store's"):
        other.remove(request)
    queue.remove(request)
    with pytest.raises(QueuedRequestError, match="was already released"):
        queue.remove(request)
    with pytest.raises(QueuedRequestError, match=r"got int 12345; expected the QueuedRequest"):
        queue.remove(12345)  # was an AttributeError


def lru_tier(capacity: int) -> RowCache:
    cache = RowCache("warm", num_rows=100, capacity=capacity, spec=PolicySpec.parse("lru"))
    cache.attach_queue(QueuedRequests())
    return cache


def admit(cache: RowCache, *rows: int) -> None:
    cache.begin_batch()
    cache.admit(t(*rows), torch.ones(len(rows), dtype=torch.int64))


def held(cache: RowCache) -> list[int]:
    return sorted(cache.row_of_slot[cache.row_of_slot >= 0].tolist())


def test_rows_no_queued_request_uses_go_first_in_lru_order():
    cache = lru_tier(4)
    for row in (10, 11, 12, 13):  # 10 least recent
        admit(cache, row)
    request = cache.queue.add(t(10, 11, 50))
    cache.queued(request)
    admit(cache, 20)  # plain LRU would evict 10; the queue needs it, so 12 goes
    assert held(cache) == [10, 11, 13, 20]
    cache.unqueued(request, *cache.queue.remove(request))
    admit(cache, 21)  # nothing queued: LRU again, and 10 is the least recent
    assert held(cache) == [11, 13, 20, 21]


def test_when_every_row_is_queued_the_one_needed_furthest_back_goes():
    cache = lru_tier(3)
    admit(cache, 1, 2, 3)
    later = cache.queue.add(t(1, 2))  # announced first: 1 and 2 are needed sooner
    cache.queued(later)
    latest = cache.queue.add(t(3, 1))
    cache.queued(latest)
    admit(cache, 4)
    assert held(cache) == [1, 2, 4]
    admit(cache, 5)  # 4 is not queued: it goes before any queued row
    assert held(cache) == [1, 2, 5]


def test_a_static_tier_evicts_nothing_for_the_queue_either():
    cache = RowCache("warm", num_rows=100, capacity=4, spec=PolicySpec.parse("static"))
    cache.attach_queue(QueuedRequests())
    cache.preload(t(0, 1), pin=True)
    admit(cache, 5, 6)  # fills the free slots once
    request = cache.queue.add(t(5))
    cache.queued(request)
    admit(cache, 7)  # full: a static tier refuses the row, whatever the queue says
    assert held(cache) == [0, 1, 5, 6] and cache.counters.evictions == 0


def test_a_row_admitted_while_queued_takes_its_standing_from_the_queue():
    cache = lru_tier(2)
    request = cache.queue.add(t(7))
    cache.queued(request)
    admit(cache, 7)  # admitted after the announcement
    admit(cache, 8)
    admit(cache, 9)  # LRU would evict 7
    assert held(cache) == [7, 9]


def test_an_unqueued_row_looked_up_between_evictions_still_goes_before_queued_ones():
    cache = lru_tier(4)
    for row in (1, 2, 3, 4):
        admit(cache, row)
    first = cache.queue.add(t(1, 2, 9))
    cache.queued(first)
    admit(cache, 9)  # 3 and 4 are the only unqueued rows: 3, the least recent, goes
    assert held(cache) == [1, 2, 4, 9]
    cache.begin_batch()
    cache.record(cache.probe(t(4)), t(), lookups=1, hits=1)  # 4 looked up, no request announced
    second = cache.queue.add(t(1, 11))
    cache.queued(second)
    admit(cache, 11)  # 4 is still the one row no queued request needs
    assert held(cache) == [1, 2, 9, 11]


def test_replay_keeps_what_the_next_request_reuses(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    # requests of 40 tokens: A = 0-39, then B = 100-139 (every row new), then A again
    _trace_of(tmp_path / "t.trace", [range(40), range(100, 140), range(40)])
    config = store_config(path, warm={"capacity": 60})
    blind = replay(config, tmp_path / "t.trace", batch_tokens=10)
    queued = replay(
        config, tmp_path / "t.trace", batch_tokens=10, queued_requests=2, request_tokens=40
    )
    for bad in ({"queued_requests": -1}, {"queued_requests": 2, "request_tokens": 0}):
        with pytest.raises(ConfigError, match=r"expected queued_requests >= 0 and request_tokens"):
            replay(config, tmp_path / "t.trace", **bad)
    assert blind.tiers["warm"]["hits"] == 0  # LRU evicted A's rows before they came back
    # B's batches give up its rows as they are served (no later batch of B looks them up), so
    # B's later batches evict B's earlier rows, not A's: A comes back whole, as with Belady
    # (20 while B kept all of its rows until released)
    assert queued.tiers["warm"]["hits"] == 40
    assert queued.fetch_ratio < blind.fetch_ratio


def test_a_served_request_gives_up_the_rows_its_later_batches_do_not_look_up(tmp_path):
    """Requests of 4 tokens, batches of 2, a tier of 2 rows: R1 = [4, 3 | 4, 0], then
    R2 = [0, 4 | 5, 6]. R1's second batch misses 0 and must evict 4 or 3. Row 3 is never looked
    up again and 4 is R2's; but while R1 was queued both ranked as R1's (needed soonest), the
    tie went by slot and 4 went: R2 missed it, and the queue missed more than plain LRU (6
    against 5). A batch served gives up the request's standing on the rows its later batches
    do not look up (3 after the first batch; 4 and 0, then R2's, before the second admits)."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    _trace_of(tmp_path / "t.trace", [[4, 3, 4, 0, 0, 4, 5, 6]])
    config = store_config(path, warm={"capacity": 2})
    blind = replay(config, tmp_path / "t.trace", batch_tokens=2)
    queued = replay(
        config, tmp_path / "t.trace", batch_tokens=2, queued_requests=1, request_tokens=4
    )
    assert blind.tiers["warm"]["misses"] == 5
    assert queued.tiers["warm"]["misses"] == 5  # 4, 3, 0, then 5 and 6 (was 6: 4 again)
    assert queued.tiers["warm"]["hits"] == 3  # 4 in R1's second batch, then R2's 0 and 4


@pytest.mark.parametrize(
    "tiers",
    [
        {"warm": {"capacity": 250}},
        {"hot": {"capacity": 60}, "warm": {"capacity": 300}},
        pytest.param(
            {"hot": {"capacity": 60, "device": "cuda"}, "warm": {"capacity": 300}},
            marks=pytest.mark.gpu,
            id="cuda-hot",
        ),
    ],
)
@pytest.mark.parametrize("batch_tokens", [None, 20])
def test_replay_with_a_queue_equals_the_live_store(tmp_path, tiers, batch_tokens):
    """The live store announcing the next two requests of 80 tokens, serving each whole or in
    batches of 20 tokens (``served`` before each), makes replay's decisions."""
    path, data = make_table(tmp_path, rows=ROWS, dim=8)
    records = write_trace(tmp_path / "t.trace", batches=24)  # [2, 40, 4] each: 80 tokens
    config = store_config(path, **tiers)
    step = 80 * HEADS if batch_tokens is None else batch_tokens * HEADS
    with TieredStore(config) as store:
        announced = [store.announce(records[i]) for i in range(3)]
        for i, ids in enumerate(records):
            for batch in np.split(ids.reshape(-1), range(step, ids.size, step)):
                store.served(announced[i], batch)
                assert torch.equal(store.lookup(batch).cpu(), data[torch.from_numpy(batch)])
            store.release(announced[i])
            if i + 3 < len(records):
                announced.append(store.announce(records[i + 3]))
        live = store.stats()
    result = replay(
        config,
        tmp_path / "t.trace",
        table="a",
        queued_requests=2,
        request_tokens=80,
        batch_tokens=batch_tokens,
    )
    blind = replay(config, tmp_path / "t.trace", table="a", batch_tokens=batch_tokens)
    for tier in ("hot", "warm"):
        for key in ("hits", "misses", "admissions", "evictions", "occupancy"):
            assert result.tiers[tier][key] == live[tier][key], (tier, key)
    assert result.rows_moved["cold_reads"] == live["cold"]["rows_read"]
    assert result.rows_moved["cold_reads"] < blind.rows_moved["cold_reads"]


def test_threads_announcing_looking_up_and_releasing_leave_every_slot_its_earliest_request(
    tmp_path,
):
    """Four threads announce, look up and release overlapping requests out of order on one
    store; afterwards each held row's per-slot token is the queue's earliest request for it."""
    import threading

    path, data = make_table(tmp_path, rows=ROWS, dim=8)
    config = store_config(path, hot={"capacity": 60}, warm={"capacity": 300})
    kept: list = []
    with TieredStore(config) as store:

        def serve(seed: int) -> None:
            rng = np.random.default_rng(seed)
            waiting = []
            for _ in range(150):
                ids = torch.from_numpy((rng.zipf(1.1, size=int(rng.integers(1, 80))) - 1) % ROWS)
                waiting.append((ids, store.announce(ids)))
                if len(waiting) > 3 or rng.random() < 0.3:
                    ids, request = waiting.pop(int(rng.integers(len(waiting))))
                    assert torch.equal(store.lookup(ids), data[ids])
                    store.release(request)
            kept.extend(request for _, request in waiting[:2])  # still queued at the end
            for _, request in waiting[2:]:
                store.release(request)

        threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(store.caches.queue) == len(kept) == 8
        for cache in (store.hot, store.warm):
            held = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
            want = store.caches.queue.next_use(cache.row_of_slot[held])
            assert torch.equal(cache._next_use[held], want), cache.name
            check_cache_invariants(cache)


def test_announce_and_release_do_not_wait_for_a_lookup_holding_the_lock(tmp_path):
    """A server announces and releases while lookups hold the store's lock: both return at once,
    and the tiers learn of them before their next eviction, as a store told at once does."""
    import threading

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    config = store_config(path, hot={"capacity": 8}, warm={"capacity": 8})

    def while_locked(store: TieredStore, call) -> list:
        """``call()`` in another thread while this one holds the store's lock (a lookup)."""
        out: list = []
        with store._lock:
            thread = threading.Thread(target=lambda: out.append(call()))
            thread.start()
            thread.join(timeout=30)
            assert not thread.is_alive(), "it waited for the store's lock"
        return out

    with TieredStore(config) as told, TieredStore(config) as late:
        for store in (told, late):
            for row in range(8):  # rows 0-7 in both tiers, 0 least recent
                store.lookup([row])
            store.release(store.announce([5]))  # the first announce attaches the queue (locked)
        ids = torch.tensor([0, 1, 2])
        first = told.announce(ids)
        (second,) = while_locked(late, lambda: late.announce(ids))
        for store in (told, late):
            store.lookup(torch.arange(100, 104))  # four evictions: the queued rows stay
        assert held(late.hot) == held(told.hot) == [0, 1, 2, 7, 100, 101, 102, 103]
        told.release(first)
        while_locked(late, lambda: late.release(second))
        for store in (told, late):
            store.lookup(torch.arange(200, 205))  # unqueued again: 0-2 go first (LRU)
        assert held(late.hot) == held(told.hot)
        assert not {0, 1, 2} & set(held(told.hot))
        assert held(late.warm) == held(told.warm)


def test_announcing_faster_than_a_lookup_tells_the_tiers_waits_for_the_lock(tmp_path, monkeypatch):
    """announce/release post news without the lock and its holder passes it on: a thread
    announcing in a loop kept one lookup telling the tiers for seconds (78,569 news items in
    one 16-id lookup). Past NEWS_BACKLOG waiting, a poster waits for the lock and tells them."""
    import threading

    from tiered_store import store_lock

    monkeypatch.setattr(store_lock, "NEWS_BACKLOG", 16)  # (1,024: a loop of announces)
    NEWS_BACKLOG = store_lock.NEWS_BACKLOG
    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, hot={"capacity": 8}, warm={"capacity": 8})) as store:
        store.release(store.announce([5]))  # the first announce attaches the queue (locked)
        posted = []

        def announce_in_a_loop():
            for row in range(3 * NEWS_BACKLOG):
                posted.append(store.announce([row]))

        with store._lock:  # a lookup holding the lock
            thread = threading.Thread(target=announce_in_a_loop)
            thread.start()
            thread.join(timeout=5)
            assert thread.is_alive()  # it waits for the lock ...
            assert len(store._lock._news) == NEWS_BACKLOG + 1  # ... once past this backlog
            assert len(posted) == NEWS_BACKLOG  # (the last announce waits to return)
        thread.join(timeout=30)
        assert not thread.is_alive() and len(posted) == 3 * NEWS_BACKLOG
        for request in posted:
            store.release(request)
        store.lookup([1])  # tells the tiers the rest
        assert len(store._lock._news) == 0 and len(store.caches.queue) == 0


def test_news_posted_while_an_announce_tells_the_tiers_is_told_before_it_returns(tmp_path):
    """A holder tells the tiers the news there when it took the lock; news posted meanwhile (its
    poster found the lock taken) is told when it lets go, not left for the next lookup."""
    import threading

    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, hot={"capacity": 16}, warm={"capacity": 0})) as store:
        store.lookup(torch.arange(8))
        store.announce(torch.tensor([0]))  # the queue attached
        telling, posted = threading.Event(), threading.Event()
        queued = store.caches.queued

        def slowly_queued(request):  # the first announce's telling, held until the second posted
            if not telling.is_set():
                telling.set()
                posted.wait(10)
            return queued(request)

        store.caches.queued = slowly_queued
        first = threading.Thread(target=lambda: store.announce(torch.tensor([1, 2])))
        first.start()
        telling.wait(10)
        late = store.announce(torch.tensor([3, 4]))  # the lock is taken: left to its holder
        posted.set()
        first.join(timeout=30)
        assert len(store._lock._news) == 0
        assert int(store.hot._next_use[store.hot.probe(torch.tensor([3]))[0]]) == late.token


def test_a_release_during_an_admission_never_hands_a_slot_out_twice(tmp_path):
    """release() does not wait for the store's lock: one landing between a lookup's choice of
    victims by the queue and the refusal of its candidate (lru+tinylfu) made the refused
    victims go back onto the LRU victim buffer, which held them still; the next admission of
    two rows put both in one slot, and a lookup of one returned the other's row."""
    path, data = make_table(tmp_path, rows=ROWS, dim=4)
    config = store_config(path, hot={"capacity": 8, "policy": "lru+tinylfu"}, warm={"capacity": 0})
    with TieredStore(config) as store:
        for _ in range(5):  # a full tier of frequent rows
            store.lookup(torch.arange(8).repeat(5))
        store.lookup(torch.tensor([100] * 60))  # admitted over a victim: the buffer holds more
        request = store.announce(torch.tensor([150]))  # victims now come from the queue search
        admit = store.hot.admission.admit

        def released_meanwhile(candidates, victims):  # as another thread's release() can
            store.release(request)
            store.hot.admission.admit = admit
            return admit(candidates, victims)

        store.hot.admission.admit = released_meanwhile
        store.lookup(torch.tensor([120]))  # a rare row: refused, its victim stays
        buffered = store.hot._buffered
        assert buffered is None or buffered[0].unique().numel() == buffered[0].numel()
        store.lookup(torch.tensor([130] * 60 + [131] * 60))  # two victims at once
        for row in (130, 131, 100, *range(8)):
            assert torch.equal(store.lookup(torch.tensor([row])), data[[row]]), row
        check_cache_invariants(store.hot)


def test_store_announce_checks_ids_and_release_checks_the_request(tmp_path):
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    config = store_config(path, warm={"capacity": 100})
    with TieredStore(config) as store, TieredStore(config) as other:
        with pytest.raises(RowIdError, match=r"value 3000 .* expected 0 <= id < 3,000"):
            store.announce([1, 3000])
        request = store.announce([1, 2])
        with pytest.raises(QueuedRequestError, match="another store's"):
            other.release(request)
        assert other.hot.queue is None  # refused without making per-slot state for a queue
        store.release(request)
        with pytest.raises(QueuedRequestError, match="already released"):
            store.release(request)
        pending = store.announce([5])
    store.release(pending)  # closed: a server's finally must not raise


def test_replay_command_replays_with_a_queue(tmp_path, capsys):
    from tiered_store.cli import main

    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    _trace_of(tmp_path / "t.trace", [range(40), range(100, 140), range(40)])
    (tmp_path / "tiers.yaml").write_text(
        f"table: {{path: {path.name}}}\ntiers:\n  warm: {{capacity: 60}}\n"
    )
    argv = ["replay", str(tmp_path / "tiers.yaml"), str(tmp_path / "t.trace"), "--quiet"]
    argv += ["--sweep", "", "--no-bounds", "--batch-tokens", "10"]
    runs = {}
    for queued in (0, 2):
        out = tmp_path / f"out{queued}"
        extra = ["--queued-requests", str(queued), "--request-tokens", "40"]
        assert main([*argv, *extra, "--out", str(out)]) == 0
        runs[queued] = json.loads((out / "replay.json").read_text())["results"][0]
    assert runs[2]["queued_requests"] == 2
    assert runs[2]["rows_moved"]["cold_reads"] == runs[0]["rows_moved"]["cold_reads"] - 40
    # what it printed says how it batched, and which run without a queue compares
    assert (
        "requests of 40 tokens (--batch-tokens 10), the next 2 announced" in capsys.readouterr().out
    )
    whole = ["--queued-requests", "2", "--request-tokens", "40", "--out", str(tmp_path / "w")]
    assert main([*argv[:-2], *whole]) == 0
    printed = capsys.readouterr().out
    assert "requests of 40 tokens (whole requests)" in printed
    assert "without a queue, the same batches are `--batch-tokens 40`" in printed.lower()
    assert "the trace's own" not in printed
    # requests of 40 tokens in batches of 15 end in a batch of 10: no run without a queue
    # cuts those (it said `--batch-tokens 15` did)
    assert main([*argv[:-2], *whole, "--batch-tokens", "15"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert (
        "No replay without a queue cuts the same batches: each request ends in a batch of 10 tokens"
        in printed
    )
    # batches larger than a request are the request: `--batch-tokens 40` cuts those (it said
    # no run did)
    assert main([*argv[:-2], *whole, "--batch-tokens", "80"]) == 0
    assert "without a queue, the same batches are `--batch-tokens 40`" in (
        capsys.readouterr().out.lower()
    )
    # the sweep replays with the queue too, and says so (it replayed without, unlabelled)
    swept = tmp_path / "swept"
    argv[argv.index("--sweep") + 1] = "60"
    assert (
        main([*argv, "--queued-requests", "2", "--request-tokens", "40", "--out", str(swept)]) == 0
    )
    doc = json.loads((swept / "replay.json").read_text())
    curve = next(c for c in doc["sweep"] if c["name"] == "lru")
    assert curve["metadata"]["queued_requests"] == 2
    at_60 = curve["miss_ratio"][curve["capacities"].index(60)]
    assert at_60 == pytest.approx(doc["results"][0]["fetch_ratio"], abs=1e-9) and at_60 < 1


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(8, 300),
    spec=st.sampled_from(["lru", "static+lru", "lru+tinylfu"]),
    headroom=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_victims_from_runs_are_those_of_a_pass_per_eviction(capacity, spec, headroom, seed):
    """Runs of candidates kept across batches pick, slot for slot, what a pass over the tier per
    eviction picks, while requests come and go, are served, and other batches run."""
    rng = np.random.default_rng(seed)
    rows = 3 * capacity  # requests of up to a sixth of the tier's slots
    queue = QueuedRequests()
    caches = [
        RowCache(
            "t",
            num_rows=rows,
            capacity=capacity,
            spec=PolicySpec.parse(spec),
            evict_headroom=headroom,
            victim_buffer=b,
        )
        for b in (0, 1)  # a pass per eviction; runs (the smallest buffer: refilled often)
    ]
    for cache in caches:
        cache.preload(torch.arange(capacity // 4), pin=spec.startswith("static"))
        cache.attach_queue(queue)
    waiting = []
    for step in range(60):
        roll = rng.random()
        if roll < 0.25 or not waiting:  # a request joins the queue
            size = int(rng.integers(1, capacity // 2))
            ids = torch.from_numpy((rng.zipf(1.2, size=size) - 1) % rows)
            waiting.append((ids, queue.add(ids)))
            for cache in caches:
                cache.queued(waiting[-1][1])
            continue
        if roll < 0.65:  # the oldest is served, in batches, then released
            ids, request = waiting.pop(0)
            batches = np.array_split(ids.numpy(), 2)
        elif roll < 0.75:  # one leaves the queue unserved
            ids, request = waiting.pop(int(rng.integers(len(waiting))))
            batches = []
        elif roll < 0.82:  # a re-pin flips pin flags (online re-pinning's apply)
            repin(caches, rng)
            continue
        else:  # a batch no request announced
            request, batches = None, [(rng.zipf(1.2, size=12) - 1) % rows]
        told = request is not None and rng.random() < 0.7  # the server tells each batch served
        for batch in batches:
            if told:
                moved = queue.served(request, torch.from_numpy(batch))
                for cache in caches:
                    cache.unqueued(request, *moved, gone=False)
            for cache in caches:
                run_batch(cache, batch)
            assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot), step
        if request is not None:
            moved = queue.remove(request)
            for cache in caches:
                cache.unqueued(request, *moved)
    assert caches[0].counters == caches[1].counters
    check_cache_invariants(caches[1])


def repin(caches: list[RowCache], rng: np.random.Generator) -> None:
    """Pin a few held rows and unpin a few pinned ones, the same in every cache."""
    owners = caches[0].row_of_slot
    pinned = caches[0].pinned_mask()
    pin = torch.from_numpy(rng.permutation(torch.nonzero((owners >= 0) & ~pinned).numpy())[:3])
    unpin = torch.from_numpy(rng.permutation(torch.nonzero(pinned).numpy())[:3])
    moves = RepinMoves(
        pin.reshape(-1), owners[pin].reshape(-1), unpin.reshape(-1), owners[unpin].reshape(-1)
    )
    for cache in caches:
        cache.apply_repin(moves)


def test_a_tier_full_of_queued_rows_passes_over_its_slots_rarely():
    """Served requests of 600 rows through a 1,000-slot LRU tier, 3 queued ahead: most
    evictions come from runs a pass found for earlier batches, not from a pass of their own."""
    rng = np.random.default_rng(3)
    cache = RowCache("warm", num_rows=20_000, capacity=1000, spec=PolicySpec.parse("lru"))
    cache.attach_queue(QueuedRequests())
    requests = [torch.from_numpy(rng.zipf(1.1, 600) % 20_000) for _ in range(24)]
    waiting = [cache.queue.add(ids) for ids in requests[:4]]
    for request in waiting:
        cache.queued(request)
    evicting = 0
    for i, ids in enumerate(requests):
        for batch in np.array_split(ids.numpy(), 20):
            before = cache.counters.evictions
            run_batch(cache, batch)
            evicting += cache.counters.evictions > before
        served = waiting.pop(0)
        cache.unqueued(served, *cache.queue.remove(served))
        if i + 4 < len(requests):
            waiting.append(cache.queue.add(requests[i + 4]))
            cache.queued(waiting[-1])
    passes = cache._queue_victims.passes
    assert evicting > 300 and passes * 4 < evicting, (passes, evicting)


@pytest.mark.parametrize("policy", ["sieve", "fifo", "lfu"])
def test_a_queue_costs_a_sieve_tier_no_pass_over_its_slots_per_eviction(policy, monkeypatch):
    """SIEVE, FIFO and LFU find victims by their own search. With one request announced, each
    search also passed over every slot of the tier to find the queued ones (a 2^20-slot SIEVE
    tier: 31 ms an admission against 0.8 ms without a queue; bench/test_queued_replay.py); the
    queued slots are kept apart now. Victims: those of the same tier with the queued row pinned
    instead; work: no slot search sized by the tier (the sizes of the masks searched, recorded
    as they are searched)."""
    import tiered_store.row_cache as row_cache

    capacity = 4096

    def full_tier(queued: bool) -> RowCache:
        cache = RowCache(
            "warm", num_rows=4 * capacity, capacity=capacity, spec=PolicySpec.parse(policy)
        )
        cache.admit(torch.arange(capacity), torch.ones(capacity, dtype=torch.int64))
        if queued:
            cache.attach_queue(QueuedRequests())
            cache.queued(cache.queue.add(t(5, 4 * capacity - 1)))  # one row held, one not
        else:
            cache.pin_resident(t(5), only=False)  # the same slot kept, by a pin
        return cache

    pinned, queued = full_tier(False), full_tier(True)
    searched: list[int] = []
    nonzero = row_cache.nonzero

    def recorded(mask: torch.Tensor) -> torch.Tensor:
        searched.append(mask.numel())
        return nonzero(mask)

    for first in range(capacity, 3 * capacity, 64):  # 64 new rows a batch
        run_batch(pinned, torch.arange(first, first + 64))
        monkeypatch.setattr(row_cache, "nonzero", recorded)
        run_batch(queued, torch.arange(first, first + 64))
        monkeypatch.setattr(row_cache, "nonzero", nonzero)
        assert torch.equal(queued.row_of_slot, pinned.row_of_slot), first
    assert queued.counters.evictions == pinned.counters.evictions == 2 * capacity
    assert int(queued.probe(t(5))) >= 0  # the queued row stayed
    assert searched and max(searched) <= 64, max(searched)  # a batch's rows, never the tier


@pytest.mark.parametrize("policy", ["sieve", "lfu"])
def test_a_tier_half_queued_sorts_no_more_than_the_new_queued_slots_per_admission(
    policy, monkeypatch
):
    """A SIEVE, FIFO or LFU tier kept its queued slots apart but sorted all of them (a
    ``unique``) on each admission: with half a 1M-slot SIEVE tier queued, slower than the pass
    over every slot it replaced (bench/test_queued_replay.py). The slots queued since the last
    search are merged into the sorted ones now; victims: those of the tier with them pinned."""
    capacity = 4096

    def half_queued_tier(queued: bool) -> RowCache:
        cache = RowCache(
            "warm", num_rows=4 * capacity, capacity=capacity, spec=PolicySpec.parse(policy)
        )
        cache.admit(torch.arange(capacity), torch.ones(capacity, dtype=torch.int64))
        rows = torch.arange(0, capacity, 2)
        if queued:
            cache.attach_queue(QueuedRequests())
            cache.queued(cache.queue.add(rows))
        else:
            cache.pin_resident(rows, only=False)
        return cache

    pinned, queued = half_queued_tier(False), half_queued_tier(True)
    sorted_sizes: list[int] = []
    unique = torch.unique

    def recorded(values: torch.Tensor, *args, **kwargs):
        sorted_sizes.append(values.numel())
        return unique(values, *args, **kwargs)

    for first in range(capacity, 2 * capacity, 64):
        batch = torch.arange(first, first + 64)
        run_batch(pinned, batch)
        uniq, counts = torch.unique(batch, return_counts=True)
        monkeypatch.setattr(torch, "unique", recorded)
        queued.admit(uniq, counts)
        monkeypatch.setattr(torch, "unique", unique)
        assert torch.equal(queued.row_of_slot, pinned.row_of_slot), first
    assert queued.counters.evictions == capacity
    # the announced rows' slots once, at the first search; then at most a batch's new slots
    assert sorted_sizes[0] == capacity // 2 and max(sorted_sizes[1:]) <= 64, sorted_sizes[:4]


def test_the_queues_passes_let_other_threads_run():
    """An announcement merges its rows into every queued (row, request) pair and a release drops
    its own in one compiled pass each, on a server's thread; both held the GIL throughout, so
    lookups, compute and the event loop stood still for the whole pass over a large queue (10M
    pairs: 0.15-0.23 s). Both are compiled to let it go, as the row index's kernels are."""
    from tiered_store import request_queue_kernels, row_index_kernels

    for kernel in (request_queue_kernels.merge_request, request_queue_kernels.drop_request):
        assert kernel.targetoptions.get("nogil") is True, kernel.__name__
    assert row_index_kernels.find_slots.targetoptions.get("nogil") is True  # the same setting


@pytest.mark.parametrize("policy", ["sieve", "fifo", "lfu", "zipf-tuned+sieve"])
def test_a_search_by_the_queue_never_shows_queued_rows_as_pinned(policy):
    """A SIEVE, FIFO or LFU tier blocked the queued slots for its victim search by setting their
    flags in its own pin flags until the search ended; the store's re-pin thread copies those
    flags off the lock (``cache.pin_flags().clone()``), so a copy taken meanwhile showed queued,
    unpinned rows as pinned, and the re-pin planned with pins the tier did not have."""
    import threading

    cache = RowCache("warm", num_rows=400, capacity=100, spec=PolicySpec.parse(policy))
    cache.admit(torch.arange(100), torch.ones(100, dtype=torch.int64))
    cache.attach_queue(QueuedRequests())
    cache.queued(cache.queue.add(t(5, 7, 399)))
    pinned_before = cache.pin_flags().clone()
    searching, copied = threading.Event(), threading.Event()
    search, copies = cache.eviction.choose_victims, []

    def staged_search(n, protected):  # a hook that only waits: the copy is taken mid-search
        searching.set()
        assert copied.wait(30)
        return search(n, protected)

    def repin_thread() -> None:
        assert searching.wait(30)
        copies.append(cache.pin_flags().clone())  # as the store's re-pin thread copies them
        copied.set()

    cache.eviction.choose_victims = staged_search
    thread = threading.Thread(target=repin_thread)
    thread.start()
    run_batch(cache, torch.arange(200, 210))
    thread.join(30)
    queued = cache.probe(t(5, 7))
    assert bool((queued >= 0).all()) and len(copies) == 1
    assert copies[0][queued].tolist() == pinned_before[queued].tolist() == [False, False]


@pytest.mark.parametrize("policy, extra", [("lru", 8), ("sieve", 16), ("lfu", 16)])
def test_memory_report_counts_the_next_use_per_slot_once_a_queue_is_attached(policy, extra):
    """The token per slot (8 B), and for a policy that keeps its queued slots apart, those (8 B
    more), as docs/design.md says (it said SIEVE and LFU passed over the slots instead)."""
    cache = RowCache("warm", num_rows=100, capacity=10, spec=PolicySpec.parse(policy))
    alone = cache.metadata_bytes()["per_slot"]
    cache.attach_queue(QueuedRequests())
    assert cache.metadata_bytes()["per_slot"] - alone == extra
    assert extra == QUEUE_SLOT_BYTES + (QUEUED_SLOTS_SLOT_BYTES if policy != "lru" else 0)


def test_memory_report_counts_what_announced_requests_hold(tmp_path):
    """memory_report() left out the queue's (row, request) pairs and the tiers' victim
    candidates: 40 announced requests of 5,000 lookups held 3.2 MB it did not report."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    rng = np.random.default_rng(0)
    with TieredStore(store_config(path, hot={"capacity": 64}, warm={"capacity": 256})) as store:
        assert store.memory_report()["queue_bytes"] == 0  # nothing announced yet
        requests = [store.announce(torch.from_numpy(rng.integers(0, ROWS, 500))) for _ in range(40)]
        for _ in range(5):  # evictions by the queue's order keep candidates
            store.lookup(torch.from_numpy(rng.integers(0, ROWS, 400)))
        pairs = 16 * sum(r.rows.numel() for r in requests)  # a row and a token, 8 B each
        handles = sum(r.nbytes for r in requests)
        candidates = store.hot.queue_candidate_bytes() + store.warm.queue_candidate_bytes()
        assert candidates > 0
        assert store.memory_report()["queue_bytes"] == pairs + handles + candidates
        assert pairs > 16 * 40 * 400
        for request in requests:
            store.release(request)
        left = store.memory_report()["queue_bytes"]  # the pairs go with their requests
        assert left == store.hot.queue_candidate_bytes() + store.warm.queue_candidate_bytes()


def test_memory_report_counts_each_announced_requests_own_arrays(tmp_path):
    """``queue_bytes`` left out each request's own arrays (its rows, those no earlier request
    looks up, its lookups left of each, each id's place among its rows, from its second
    batch served, its pairs' places and, from a batch that searched for an id it announced, its
    rows' first places): 17 prefill-sized requests held about 26 MB it did not report. They
    are counted, and go with their requests; per row, 16-36 B (docs/design.md said 24-40)."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, warm={"capacity": 256})) as store:
        first = store.announce(torch.arange(1000).repeat(2))  # 1,000 rows, 2,000 ids
        second = store.announce(torch.arange(500, 1500))  # 1,000 rows, 500 of them its first
        pairs = 16 * 2000  # a row and a token, 8 B each
        # rows, first rows and lookups left 8 B each, the ids' places 4 B each
        handles = (3 * 8 * 1000 + 4 * 2000) + (2 * 8 * 1000 + 8 * 500 + 4 * 1000)

        def queue_bytes() -> int:
            candidates = store.hot.queue_candidate_bytes() + store.warm.queue_candidate_bytes()
            return store.memory_report()["queue_bytes"] - candidates

        assert queue_bytes() == pairs + handles
        store.served(first, torch.arange(10))
        store.served(first, torch.arange(10, 20))  # its second batch: its pairs' places found
        assert first.pair_at is not None
        assert queue_bytes() == pairs + handles + 8 * 1000
        store.served(first, torch.arange(500, 520))  # 480 ids skipped: their first places made
        assert first.first_at.size == 1000
        assert queue_bytes() == pairs + handles + (8 + 4) * 1000
        # per row: 16 B (its rows, its lookups left), 36 B (8 B more each: a first row, a pair's
        # place; 4 B: a first place)
        assert second.nbytes - 4 * 1000 - 8 * 500 == 16 * 1000
        assert first.nbytes - 4 * 2000 == 36 * 1000
        store.release(first)
        store.release(second)
        assert queue_bytes() == 0


def test_queued_candidates_refilled_after_the_furthest_requests_run_out():
    """Every row queued: victims come from the furthest requests' rows, and once those kept by a
    pass are evicted, a new pass finds the next ones; slot for slot as a pass per eviction."""
    caches = [
        RowCache("warm", num_rows=1000, capacity=100, spec=PolicySpec.parse("lru"), **kw)
        for kw in ({"victim_buffer": 0}, {"victim_buffer": 1})  # the second keeps few spares
    ]
    queue = QueuedRequests()
    for cache in caches:
        cache.attach_queue(queue)
        run_batch(cache, torch.arange(100))
    first = queue.add(torch.arange(500, 560))  # the earliest: 60 rows not held yet
    later = [queue.add(torch.arange(10 * i, 10 * i + 10)) for i in range(10)]  # every held row
    for cache in caches:
        for request in (first, *later):
            cache.queued(request)
    for batch in torch.arange(500, 560).split(3):  # the earliest request is served
        for cache in caches:
            run_batch(cache, batch)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot)
    # the latest requests' rows went first: rows 40-99 are gone, 0-39 stay
    assert held(caches[1]) == [*range(40), *range(500, 560)]
    assert caches[1]._queue_victims.passes >= 3  # refilled as the kept requests ran out


def test_a_released_request_leaves_no_candidates_behind():
    cache = RowCache("warm", num_rows=1000, capacity=100, spec=PolicySpec.parse("lru"))
    cache.attach_queue(QueuedRequests())
    run_batch(cache, torch.arange(100))
    requests = [cache.queue.add(torch.arange(500, 560))]  # served first
    requests += [cache.queue.add(torch.arange(10 * i, 10 * i + 10)) for i in range(10)]
    for request in requests:
        cache.queued(request)
    run_batch(cache, torch.arange(500, 503))  # 3 victims: the last request's rows
    run = cache._queue_victims.queued
    assert requests[-1].token in run.buckets.keys() | run.pending.keys()
    cache.unqueued(requests[-1], *cache.queue.remove(requests[-1]))  # its 7 rows held go
    assert requests[-1].token not in run.buckets.keys() | run.pending.keys()
    assert requests[-2].token in run.buckets.keys() | run.pending.keys()


def test_tinylfu_admission_keeps_the_queues_order_and_its_own_rule(tmp_path):
    """A batch's candidates, most frequent first, face the victims in eviction order, and
    admission stops at the first refused: it paired them by position, so a refused weak
    candidate kept an unqueued row while a strong one evicted a row a request needs."""
    path, data = make_table(tmp_path, rows=100, dim=4)
    config = store_config(path, hot={"capacity": 2, "policy": "lru+tinylfu"}, warm={"capacity": 0})
    with TieredStore(config) as store:
        for ids in ([10], [11], *[[10]] * 4):  # 10 looked up five times, 11 once
            store.lookup(ids)
        request = store.announce([11])
        ids = torch.tensor([20, 30, 30, 30])  # 30 beats 11 but not 10, which goes first
        assert torch.equal(store.lookup(ids), data[ids])
        assert held(store.hot) == [10, 11]
        for _ in range(3):
            store.lookup([30, 30])  # now 30 (7) beats 10 (5): 10 goes, the queued 11 stays
        assert held(store.hot) == [11, 30]
        store.release(request)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), capacity=st.integers(2, 12))
def test_tinylfu_never_evicts_a_queued_row_before_an_unqueued_one(seed, capacity):
    rng = np.random.default_rng(seed)
    cache = RowCache("hot", num_rows=60, capacity=capacity, spec=PolicySpec.parse("lru+tinylfu"))
    cache.attach_queue(QueuedRequests())
    requests = []
    for _ in range(60):
        if rng.random() < 0.3:
            requests.append(cache.queue.add(torch.from_numpy(rng.integers(0, 60, 4))))
            cache.queued(requests[-1])
        elif requests and rng.random() < 0.2:
            gone = requests.pop(int(rng.integers(len(requests))))
            cache.unqueued(gone, *cache.queue.remove(gone))
        ids = torch.from_numpy(np.unique(rng.zipf(1.3, 8) % 60))
        cache.begin_batch()
        cache.admission.on_access(ids)
        before = set(held(cache))
        queued = {
            r for r in before if int(cache.queue.next_use(torch.tensor([r]))[0]) != NOT_QUEUED
        }
        cache.admit(ids, torch.ones(len(ids), dtype=torch.int64))
        after = set(held(cache))
        evicted, kept = before - after, before & after
        if evicted & queued:
            assert not (kept - queued), (sorted(evicted), sorted(kept), sorted(queued))
        check_cache_invariants(cache)


def test_furthest_first_takes_none_for_k_zero_and_ties_with_the_kth_whole():
    """k = 0 over a non-empty class raised a bare RuntimeError (the min of an empty topk)."""
    slots, next_use = torch.tensor([1, 4, 6, 9]), torch.tensor([3, 7, 7, 5])
    assert furthest_first(slots, next_use, 0).tolist() == []
    assert furthest_first(slots, next_use, 1).tolist() == [1, 2]  # tied with the first: both
    assert furthest_first(slots, next_use, 9).tolist() == [1, 2, 3, 0]  # k past n: all
    assert furthest_first(slots[:0], next_use[:0], 3).tolist() == []


def buffer_bytes(array: np.ndarray) -> int:
    """Bytes of the allocation behind ``array``: its own, or its base's (numpy's or numba's)."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.nbytes if isinstance(base, np.ndarray) else memoryview(base).nbytes


def test_the_queue_holds_the_bytes_it_counts_and_a_release_allocates_by_its_request():
    """A release's pass allocated the pairs it kept and the rows it moved at the size of the
    whole queue, and the queue kept views of those buffers: it held a released request's pairs
    more than ``nbytes`` (``queue_bytes``) counts, and each release's news (its moved rows, held
    until the tiers are told) a whole queue's worth. The queue holds what it counts, and a
    release's moved rows take its own rows' bytes (the pass allocates each at its size)."""
    from tiered_store import request_queue_kernels as kernels

    queue = QueuedRequests()
    requests = [queue.add(torch.arange(k * 100, k * 100 + 4_000)) for k in range(8)]

    def held() -> int:
        return buffer_bytes(queue._pair_rows) + buffer_bytes(queue._pair_tokens)

    assert held() == queue.nbytes == 8 * 4_000 * 16
    for left, request in enumerate(requests[:3][::-1] + requests[3:5], start=1):
        news = kernels.drop_request(  # the pass ``remove`` runs (it returns these as tensors)
            queue._pair_rows, queue._pair_tokens, request.token, NOT_QUEUED, 4_000
        )
        rows, next_use = queue.remove(request)  # the latest, then the earliest ones
        assert rows.tolist() == news[2].tolist() and next_use.tolist() == news[3].tolist()
        assert 0 < news[2].size <= 4_000, left
        assert buffer_bytes(news[2]) == buffer_bytes(news[3]) == 8 * 4_000, left
        assert held() == queue.nbytes == (8 - left) * 4_000 * 16, left


def test_a_release_pass_given_another_pair_count_raises_and_writes_nothing_past_its_buffers():
    """``drop_request`` sizes what it keeps and moves by the request's pair count (``dropped``,
    one pair per distinct row, so a queue's own release never gives another): one too few or
    too many raises ``ValueError`` naming both counts, and writes nothing past the buffers."""
    from tiered_store import request_queue_kernels as kernels

    queue = QueuedRequests()
    queue.add(t(1, 2, 3, 5))
    request = queue.add(t(2, 3, 4))
    pairs = (queue._pair_rows, queue._pair_tokens)
    for dropped in (2, 4, 0, 7):
        with pytest.raises(ValueError, match=f"token {request.token} has 3 pairs; expected "):
            kernels.drop_request(*pairs, request.token, NOT_QUEUED, dropped)
    with pytest.raises(ValueError, match="dropped=8 pairs of 7; expected 0 to 7"):
        kernels.drop_request(*pairs, request.token, NOT_QUEUED, 8)
    kept_rows, kept_tokens, rows, next_use = kernels.drop_request(
        *pairs, request.token, NOT_QUEUED, 3
    )
    assert kept_rows.tolist() == [1, 2, 3, 5] and rows.tolist() == [4]
    assert next_use.tolist() == [NOT_QUEUED]


@pytest.mark.parametrize("policy, failing", [("lru", "QueueVictims"), ("sieve", "nonzero")])
def test_a_first_announce_that_fails_giving_a_tier_its_queue_state_leaves_lookups_working(
    tmp_path, monkeypatch, policy, failing
):
    """A store's first announce gives each tier its per-slot queue state; an allocation failing
    there (out of memory: a reload's new store beside the old one) left the tier failing with
    its queue and next uses but not the slots searched by them, so later lookups that evicted
    raised ``TypeError`` (SIEVE), or, where the hot tier failed, the warm one never got a queue
    (the next announce checked the hot tier's only: LRU). The failure is raised, the tier is
    left as it was, and the next announce gives each tier without one its state."""
    from tiered_store import row_cache

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    path, data = make_table(tmp_path, rows=400)
    config = store_config(path, warm={"capacity": 40, "policy": policy})
    with TieredStore(config) as store:
        store.lookup(torch.arange(40))
        with monkeypatch.context() as patch:
            patch.setattr(row_cache, failing, out_of_memory)
            with pytest.raises(torch.OutOfMemoryError):
                store.announce(torch.arange(5))
        assert len(store.caches.queue) == 0
        request = store.announce(torch.arange(20))
        assert len(store.caches.queue) == 1 and store.warm.queue is store.caches.queue
        assert torch.equal(store.lookup(torch.arange(100, 120)), data[100:120])
        assert torch.isin(torch.arange(20), store.warm.row_of_slot).all()  # kept: queued
        store.release(request)
        assert store.stats()["queue"]["requests"] == 0


def test_an_announce_that_fails_telling_the_tiers_leaves_no_request_queued(tmp_path):
    """An announce adds the request to the queue, then tells the tiers; a failure there (out of
    memory probing a tier) raised with the request left queued and never returned, so never
    released: its rows stood for ever, and ``stats()``, ``queue_bytes`` and the
    ``tiered_store_queued_requests`` gauge counted it (where a server logs the request as served
    unannounced there). The request is withdrawn before the failure is raised."""
    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, warm={"capacity": 40})) as store:
        store.lookup(torch.arange(40))
        store.release(store.announce(torch.arange(3)))  # the tiers hold their queue state
        warm_queued = store.warm.queued

        def out_of_memory(request):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        store.warm.queued = out_of_memory
        with pytest.raises(torch.OutOfMemoryError):
            store.announce(torch.arange(30))
        store.warm.queued = warm_queued
        assert store.stats()["queue"] == {
            "requests": 0,
            "rows": 0,
            "news_failures": 1,
            "news_dropped": 0,
        }
        assert store.memory_report()["queue_bytes"] == 0
        request = store.announce(torch.arange(20))
        assert torch.equal(store.lookup(torch.arange(100, 120)), data[100:120])
        assert torch.isin(torch.arange(20), store.warm.row_of_slot).all()  # kept: queued
        store.release(request)
        assert store.stats()["queue"] == {
            "requests": 0,
            "rows": 0,
            "news_failures": 1,
            "news_dropped": 0,
        }


def test_the_queues_passes_equal_a_brute_force_reading_at_every_pair_count():
    """``merge_request`` and ``drop_request`` (compiled, and their Python bodies, where numpy
    bounds-checks every write) against a brute-force reading of random queues: the empty queue,
    one request, empty requests, requests whose pairs are all at the queue's start or end or
    interleave others'. ``drop_request`` given each pair count from -1 to all the pairs + 1: the
    right one gives the brute-force answer, any other ``ValueError``, and none writes past the
    buffers it sized (its first loop checks no room: an overrun there is silent once compiled)."""
    from tiered_store import request_queue_kernels as kernels

    rng = np.random.default_rng(0)
    for case in range(150):
        span = int(rng.choice([1, 3, 40]))  # few rows: much overlap; many: pairs at the ends
        requests: dict[int, np.ndarray] = {}
        pair_rows = pair_tokens = np.empty(0, np.int64)
        for token in range(1, int(rng.integers(1, 7)) + 1):
            low = int(rng.choice([0, span, 2 * span]))  # below, among or above the others'
            rows = np.unique(rng.integers(low, low + span, int(rng.integers(0, 2 * span + 1))))
            for kernel in (kernels.merge_request, kernels.merge_request.py_func):
                out_rows, out_tokens, first = kernel(pair_rows, pair_tokens, rows, token)
                held = {int(r) for r in np.concatenate(list(requests.values()) or [rows[:0]])}
                pairs = sorted([(int(r), k) for k, rs in requests.items() for r in rs])
                pairs = sorted(pairs + [(int(r), token) for r in rows])
                assert list(zip(out_rows.tolist(), out_tokens.tolist(), strict=True)) == pairs, case
                assert first.tolist() == [int(r) not in held for r in rows], case
            requests[token], pair_rows, pair_tokens = rows, out_rows, out_tokens
        for token, rows in requests.items():
            pairs = zip(pair_rows.tolist(), pair_tokens.tolist(), strict=True)
            kept = [(r, k) for r, k in pairs if k != token]
            others: dict[int, int] = {}
            for r, k in kept:
                others.setdefault(r, k)  # sorted: each row's first is its earliest
            moved = [r for r in rows.tolist() if others.get(r, NOT_QUEUED) > token]
            after = [others.get(r, NOT_QUEUED) for r in moved]
            for dropped in range(-1, pair_rows.size + 2):
                for kernel in (kernels.drop_request, kernels.drop_request.py_func):
                    if dropped != rows.size:
                        with pytest.raises(ValueError, match=f"dropped={dropped}"):
                            kernel(pair_rows, pair_tokens, token, NOT_QUEUED, dropped)
                        continue
                    news = kernel(pair_rows, pair_tokens, token, NOT_QUEUED, dropped)
                    assert list(zip(news[0].tolist(), news[1].tolist(), strict=True)) == kept, case
                    assert news[2].tolist() == moved and news[3].tolist() == after, case


def test_the_queues_passes_read_past_finished_pairs_as_a_brute_force_reading():
    """A served batch finishes pairs in place (token negated): ``earliest``, ``merge_request``'s
    first rows, ``drop_request``'s moved rows and ``pairs_of``, then ``serve_batch`` itself
    (compiled, and their Python bodies, bounds-checked), against a brute-force reading in which
    a row's next use is its first unfinished pair's. ``pairs_of`` refuses a row the request has
    no pair of (``serve_batch`` would write outside the pairs)."""
    from tiered_store import request_queue_kernels as kernels

    def first_live(pairs: list[tuple[int, int]], row: int, after: int = 0) -> int:
        return next((k for r, k in pairs if r == row and k > after), NOT_QUEUED)

    rng = np.random.default_rng(1)
    for case in range(150):
        span = int(rng.choice([1, 3, 40]))
        requests: dict[int, np.ndarray] = {}
        pair_rows = pair_tokens = np.empty(0, np.int64)
        for token in range(1, int(rng.integers(2, 7)) + 1):
            rows = np.unique(rng.integers(0, span, int(rng.integers(1, 2 * span + 1))))
            pair_rows, pair_tokens, _ = kernels.merge_request(pair_rows, pair_tokens, rows, token)
            requests[token] = rows
        finished = rng.random(pair_tokens.size) < 0.4
        pair_tokens = np.where(finished, -pair_tokens, pair_tokens)
        pairs = list(zip(pair_rows.tolist(), pair_tokens.tolist(), strict=True))
        query = np.arange(-1, span + 1, dtype=np.int64)
        for kernel in (kernels.earliest, kernels.earliest.py_func):
            got = kernel(pair_rows, pair_tokens, query, NOT_QUEUED).tolist()
            assert got == [first_live(pairs, r) for r in query.tolist()], case
        fresh = np.arange(span + 1, dtype=np.int64)
        for kernel in (kernels.merge_request, kernels.merge_request.py_func):
            first = kernel(pair_rows, pair_tokens, fresh, 99)[2]
            assert first.tolist() == [first_live(pairs, r) == NOT_QUEUED for r in fresh], case
        for token, rows in requests.items():
            for kernel in (kernels.pairs_of, kernels.pairs_of.py_func):
                at = kernel(pair_rows, pair_tokens, rows, token)
                assert [pairs[i] for i in at] == [(r, k) for r, k in pairs if abs(k) == token], case
            mine = [(r, k) for r, k in pairs if k == token]  # its unfinished pairs
            moved = [r for r, _ in mine if first_live(pairs, r) == token]
            after = [first_live(pairs, r, token) for r in moved]
            for kernel in (kernels.drop_request, kernels.drop_request.py_func):
                news = kernel(pair_rows, pair_tokens, token, NOT_QUEUED, rows.size)
                kept = [(r, k) for r, k in pairs if abs(k) != token]
                assert list(zip(news[0].tolist(), news[1].tolist(), strict=True)) == kept, case
                assert news[2].tolist() == moved and news[3].tolist() == after, case
        token = int(rng.choice(list(requests)))
        rows = requests[token]
        for kernel in (kernels.pairs_of, kernels.pairs_of.py_func):
            with pytest.raises(ValueError, match=f"request {token} has no pair of row {span + 5}"):
                kernel(pair_rows, pair_tokens, np.append(rows, span + 5), token)
        # a batch of the request: some of its rows (maybe twice), an id it did not announce;
        # a row's lookups left: 1-3, 0 where its pair is finished already
        mine = np.array([k > 0 for r, k in pairs if abs(k) == token])
        left = np.where(mine, rng.integers(1, 4, rows.size), 0)
        batch = np.concatenate([rng.choice(rows, int(rng.integers(0, 8))), [span + 7]])
        where = rng.integers(0, rows.size, int(rng.integers(0, 12))).astype(np.int32)
        start = int(rng.integers(0, 3))
        want_left = left.copy()
        for row in batch.tolist():
            at = int(np.searchsorted(rows, row))
            if at < rows.size and rows[at] == row and want_left[at] > 0:
                want_left[at] -= 1
        done = {int(r) for r, a, b in zip(rows, left, want_left, strict=True) if a > 0 == b}
        after_pairs = [(r, -k if k == token and r in done else k) for r, k in pairs]
        moved = [r for r in sorted(done) if first_live(pairs, r) == token]
        next_use = [first_live(after_pairs, r, token) for r in moved]
        at = kernels.pairs_of(pair_rows, pair_tokens, rows, token)
        # the rows' first places announced: not made yet, or made (-1: a row never announced)
        first_at = kernels.first_places(where, rows.size)[: rows.size * int(rng.integers(0, 2))]
        cursors = set()  # where each left its cursor: the same, compiled or not
        for kernel in (kernels.serve_batch, kernels.serve_batch.py_func):
            for places in (at, at[:0]):  # found by pairs_of, or searched for row by row
                tokens, left_now = pair_tokens.copy(), left.copy()
                got = kernel(
                    rows,
                    left_now,
                    where,
                    first_at,
                    start,
                    batch,
                    places,
                    pair_rows,
                    tokens,
                    token,
                    NOT_QUEUED,
                )
                assert left_now.tolist() == want_left.tolist(), case
                pairs_now = list(zip(pair_rows.tolist(), tokens.tolist(), strict=True))
                assert pairs_now == after_pairs, case
                assert got[0].tolist() == moved and got[1].tolist() == next_use, case
                cursors.add(got[2])
        assert len(cursors) == 1 and start <= cursors.pop() <= max(start, where.size), case
        if done:  # a row finished that the request has no pair of: refused, no pair changed
            tokens, other = pair_tokens.copy(), max(requests) + 1
            for kernel in (kernels.serve_batch, kernels.serve_batch.py_func):
                with pytest.raises(ValueError, match=f"request {other} has no pair of row"):
                    kernel(
                        rows, left.copy(), where, first_at, start, batch, at[:0], pair_rows,
                        tokens, other, NOT_QUEUED,
                    )  # fmt: skip
                assert tokens.tolist() == pair_tokens.tolist(), case


@pytest.mark.parametrize("policy", ["lru", "sieve"])
def test_an_announce_withdrawn_after_a_tier_missed_it_passes_its_rows_to_the_next_request(
    tmp_path, policy
):
    """An announce whose telling the tiers failed part way (the hot tier told, the warm one
    out of memory) is withdrawn; a request announced meanwhile that looks up the same rows
    (the withdrawn one was their earliest) must take them over in every tier. The warm tier,
    never told of the withdrawn request, ignored its withdrawal, and kept those rows unqueued
    while the queue said the later request needs them: they were evicted first."""
    path, data = make_table(tmp_path, rows=400)
    config = store_config(path, hot={"capacity": 20}, warm={"capacity": 60, "policy": policy})
    with TieredStore(config) as store:
        store.lookup(torch.arange(80))
        store.release(store.announce(torch.arange(3)))  # the tiers hold their queue state
        warm_queued, later = store.warm.queued, []

        def out_of_memory(request):
            store.warm.queued = warm_queued  # once
            later.append(store.announce(torch.arange(30, 70)))  # another thread's, meanwhile
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        store.warm.queued = out_of_memory
        with pytest.raises(torch.OutOfMemoryError):
            store.announce(torch.arange(0, 60))
        assert torch.equal(store.lookup(torch.arange(100, 101)), data[100:101])  # tells the news
        assert len(store.caches.queue) == 1
        for cache in (store.hot, store.warm):
            held = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
            want = store.caches.queue.next_use(cache.row_of_slot[held])
            assert torch.equal(cache._next_use[held], want), cache.name
            check_cache_invariants(cache)
        store.release(later[0])
        assert store.stats()["queue"] == {
            "requests": 0,
            "rows": 0,
            "news_failures": 1,
            "news_dropped": 0,
        }


def _release_posted_while_the_lock_is_held(store, request):
    """Release ``request`` while the store's lock is held, so its news waits for the holder's
    let-go (and the lock's next holder) to be told."""
    with store._lock:
        store.release(request)


def test_another_requests_news_that_fails_is_told_again_not_raised_into_a_lookup(tmp_path):
    """The lock's holder tells the tiers the news waiting (another thread's announce or
    release); a failure there (out of memory probing a tier) was raised into the holder's own
    work, a lookup say, and the news dropped for good: a release the warm tier missed left its
    rows waiting for a request gone. The news stays first, the holder goes on, and the next
    holder tells it; ``queue_news`` counts the failure."""
    path, data = make_table(tmp_path, rows=400)
    config = store_config(path, hot={"capacity": 20}, warm={"capacity": 60})
    with TieredStore(config) as store:
        store.lookup(torch.arange(80))
        store.release(store.announce(torch.arange(3)))  # the tiers hold their queue state
        first, second = store.announce(torch.arange(0, 40)), store.announce(torch.arange(20, 60))
        warm_unqueued = store.warm.unqueued

        def out_of_memory_once(*args, **kwargs):
            store.warm.unqueued = warm_unqueued
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        store.warm.unqueued = out_of_memory_once
        _release_posted_while_the_lock_is_held(store, first)  # its let-go fails to tell it
        assert store.queue_news == {"failures": 1, "dropped": 0}
        assert torch.equal(store.lookup(torch.arange(100, 101)), data[100:101])  # tells it
        for cache in (store.hot, store.warm):
            held = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
            want = store.caches.queue.next_use(cache.row_of_slot[held])
            assert torch.equal(cache._next_use[held], want), cache.name
            check_cache_invariants(cache)
        store.release(second)
        assert store.stats()["queue"] == {
            "requests": 0,
            "rows": 0,
            "news_failures": 1,
            "news_dropped": 0,
        }


def test_news_that_keeps_failing_is_dropped_with_a_warning_and_counted_in_metrics(tmp_path):
    """News whose telling fails every time is dropped after ``NEWS_TRIES`` failures, with a
    warning naming the tier and the error; lookups go on serving the right rows, and the
    metrics count the failures and the drop."""
    from prometheus_client import CollectorRegistry, generate_latest

    from tiered_store.metrics import TieredStoreCollector
    from tiered_store.store_lock import NEWS_TRIES

    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, warm={"capacity": 40})) as store:
        store.lookup(torch.arange(40))
        store.release(store.announce(torch.arange(3)))  # the tiers hold their queue state
        request = store.announce(torch.arange(30))

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        store.warm.unqueued = out_of_memory
        _release_posted_while_the_lock_is_held(store, request)
        with pytest.warns(RuntimeWarning, match=r"the warm tier of a request's release failed 3"):
            for _ in range(NEWS_TRIES):
                assert torch.equal(store.lookup(torch.arange(100, 110)), data[100:110])
        assert store.queue_news == {"failures": NEWS_TRIES, "dropped": 1}
        assert torch.equal(store.lookup(torch.arange(0, 400)), data)
        registry = CollectorRegistry()
        registry.register(TieredStoreCollector({"layer1": store}))
        text = generate_latest(registry).decode()
        assert f'tiered_store_queue_news_failures_total{{table="layer1"}} {NEWS_TRIES}.0' in text
        assert 'tiered_store_queue_news_dropped_total{table="layer1"} 1.0' in text


def test_a_lock_whose_switch_to_the_stores_stream_fails_is_let_go(tmp_path, monkeypatch):
    """Taking the store's lock puts its holder on the store's stream; a failure there (a CUDA
    error, Ctrl-C) was raised with the lock still held, and every later lookup, announce, save
    and close waited for it for ever. The failure is raised with the lock let go."""
    from tiered_store.store_lock import StoreLock

    def cuda_error(self, after_caller):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, warm={"capacity": 40})) as store:
        with monkeypatch.context() as patch:
            patch.setattr(StoreLock, "_enter_stream", cuda_error)
            with pytest.raises(RuntimeError, match="illegal memory access"):
                store.lookup(torch.arange(10))
        held = store._lock.held_here()
        if held:  # let go here, or the close below waits for it for ever
            store._lock._lock.release()
        assert not held
        assert torch.equal(store.lookup(torch.arange(10)), data[:10])


def test_a_release_told_again_after_its_candidates_merge_failed_leaves_no_row_unranked():
    """A release's telling sets the rows' next use, then merges the slots into the candidates
    kept by the queue's order; a failure there (out of memory) is told again by the lock's next
    holder, which found those slots moved already and merged none: rows no request needs any
    more were never offered, and a queued request's rows were evicted before them. A failed
    merge drops the candidates (the next pick passes over the tier): the same victims, slot for
    slot, as a pass per eviction."""
    caches = [
        RowCache("warm", num_rows=1000, capacity=100, spec=PolicySpec.parse("lru"), **kw)
        for kw in ({"victim_buffer": 0}, {"victim_buffer": 1})  # a pass per eviction; runs
    ]
    queue = QueuedRequests()
    for cache in caches:
        cache.attach_queue(queue)
        run_batch(cache, torch.arange(100))
    served, later = queue.add(torch.arange(0, 50)), queue.add(torch.arange(50, 100))
    for cache in caches:
        cache.queued(served)
        cache.queued(later)
        run_batch(cache, torch.arange(500, 503))  # every row queued: three of ``later``'s go
    runs = caches[1]._queue_victims
    merge = runs._merge_unqueued

    def out_of_memory_once(slots):
        runs._merge_unqueued = merge
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    moved = queue.remove(served)
    caches[0].unqueued(served, *moved)
    runs._merge_unqueued = out_of_memory_once
    with pytest.raises(torch.OutOfMemoryError):
        caches[1].unqueued(served, *moved)
    caches[1].unqueued(served, *moved)  # told again, as ``StoreLock`` does
    for batch in torch.arange(600, 640).split(4):
        for cache in caches:
            run_batch(cache, batch)
        assert torch.equal(caches[0].row_of_slot, caches[1].row_of_slot)
    assert torch.isin(torch.arange(50, 100), caches[1].row_of_slot).sum() == 47  # none went


def test_a_victim_pick_that_fails_part_way_loses_no_candidate():
    """A pick takes the unqueued victims out of the candidates, then the queued ones; a failure
    there (out of memory: the admission raises, no row moved) lost the unqueued ones taken: the
    next admission evicted a queued request's rows and kept rows no request needs. A failed
    pick drops the candidates (the next pick passes over the tier)."""
    cache = RowCache("warm", num_rows=1000, capacity=100, spec=PolicySpec.parse("lru"))
    cache.attach_queue(QueuedRequests())
    run_batch(cache, torch.arange(100))
    cache.queued(cache.queue.add(torch.arange(0, 98)))  # rows 98 and 99: no request needs them
    runs = cache._queue_victims
    take_queued = runs._take_queued

    def out_of_memory_once(n):
        runs._take_queued = take_queued
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    runs._take_queued = out_of_memory_once
    with pytest.raises(torch.OutOfMemoryError):
        run_batch(cache, torch.arange(500, 504))  # 98 and 99 taken, then the queued pick fails
    assert held(cache) == list(range(100))
    run_batch(cache, torch.arange(600, 604))
    assert 98 not in held(cache) and 99 not in held(cache)
    assert torch.isin(torch.arange(0, 98), cache.row_of_slot).sum() == 96
    check_cache_invariants(cache)


def test_a_lookup_that_admits_rows_does_not_wait_for_an_announces_pass(tmp_path, monkeypatch):
    """An announce merges its rows into the queue in one pass without the GIL, so that lookups
    go on meanwhile; but the pass held the queue's lock, which each admission takes to read its
    rows' next requests, under the store's lock: a lookup that missed waited for the whole pass
    (0.15-0.23 s at 10M pairs), and every lookup behind it for the store's lock. Admissions read
    the pairs as they are (the pass replaces them), and the tiers learn the announce as usual."""
    import threading

    from tiered_store import request_queue_kernels

    path, data = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, hot={"capacity": 8}, warm={"capacity": 40})) as store:
        store.lookup(torch.arange(40))
        store.release(store.announce([5]))  # the first announce attaches the queue (locked)
        merging, finish = threading.Event(), threading.Event()
        merge = request_queue_kernels.merge_request

        def long_merge(*args):  # a pass over a large queue
            merging.set()
            finish.wait(30)
            return merge(*args)

        monkeypatch.setattr(request_queue_kernels, "merge_request", long_merge)
        announced = []
        announcing = threading.Thread(target=lambda: announced.append(store.announce([20, 21, 22])))
        announcing.start()
        merging.wait(30)
        looked_up = []
        lookup = threading.Thread(target=lambda: looked_up.append(store.lookup([100, 101])))
        lookup.start()
        lookup.join(timeout=10)
        waited = lookup.is_alive()
        finish.set()
        lookup.join(timeout=30)
        announcing.join(timeout=30)
        assert not waited, "the lookup waited for the announce's pass"
        assert torch.equal(looked_up[0], data[[100, 101]])
        store.lookup(torch.arange(200, 230))  # 30 new rows: unqueued rows of warm go first
        assert {20, 21, 22} <= set(held(store.warm))
        store.release(announced[0])
        assert store.stats()["queue"]["requests"] == 0


def test_readers_see_whole_queues_while_threads_announce_and_release_at_once():
    """Announces and releases run their passes under the queue's writers' lock, without the
    GIL, and publish the new arrays; readers (an admission's ``next_use``) take them as they are,
    never waiting. Two threads announce and release at once while two read: each read is of one
    whole queue (a row of a request queued throughout reads its token, a row never queued reads
    none, every other row a token issued), and the queue left is the request queued throughout."""
    import sys

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads switch often: between any two steps of a pass
    try:
        _read_while_announcing_and_releasing()
    finally:
        sys.setswitchinterval(switch)


def _read_while_announcing_and_releasing() -> None:
    """The threads of the test above (run with threads switching often)."""
    import threading

    rows = 20_000
    queue = QueuedRequests()
    held = queue.add(torch.arange(0, rows, 3))  # queued throughout: the earliest for its rows
    probe = torch.arange(rows)
    throughout, never = probe % 3 == 0, probe % 3 == 1  # rows 3k + 2 come and go
    done, failures = threading.Event(), []

    def announce_and_release(seed: int) -> None:
        rng = np.random.default_rng(seed)
        waiting = []
        for _ in range(60):
            ids = torch.from_numpy(rng.choice(rows // 3, size=int(rng.integers(1, 3000)))) * 3
            request = queue.add(torch.cat([ids, ids + 2]))  # its rows 3k + 2 may be first
            if request.first_rows.numel() and bool((request.first_rows % 3 == 0).any()):
                failures.append(f"request {request.token} first for rows queued throughout")
            waiting.append(request)
            if len(waiting) > 4 or rng.random() < 0.4:
                queue.remove(waiting.pop(int(rng.integers(len(waiting)))))
        for request in waiting:
            queue.remove(request)

    def read() -> None:
        while not done.is_set():
            tokens = queue.next_use(probe)
            issued = (tokens > held.token) & (tokens < NOT_QUEUED)
            if not bool((tokens[throughout] == held.token).all()):
                failures.append("a row queued throughout read another token")
            elif not bool((tokens[never] == NOT_QUEUED).all()):
                failures.append("a row never queued read a token")
            elif not bool(((tokens == NOT_QUEUED) | issued)[~throughout & ~never].all()):
                failures.append("a row read a token never issued for it")

    def noting(call, *args) -> None:  # a thread's exception fails the test
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{call.__name__}: {type(exc).__name__}: {exc}")
            done.set()

    writers = [threading.Thread(target=noting, args=(announce_and_release, s)) for s in range(2)]
    readers = [threading.Thread(target=noting, args=(read,)) for _ in range(2)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join(timeout=120)
    done.set()
    for thread in readers:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in writers + readers), "a thread hung"
    assert not failures, failures[:3]
    assert len(queue) == 1 and queue.rows == held.rows.numel()
    assert torch.equal(queue.next_use(probe), torch.where(throughout, held.token, NOT_QUEUED))
    queue.remove(held)
    assert len(queue) == 0 and queue.nbytes == 0


def test_a_release_of_something_else_names_it_cut_short(tmp_path):
    """release() given the ids it announced (a long list) instead of the request repeated the
    whole list in its error (689 KB for 100,000 ids); the value is shown cut short, with its type
    and what was expected."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=4)
    with TieredStore(store_config(path, warm={"capacity": 10})) as store:
        store.announce(list(range(ROWS)))
        with pytest.raises(QueuedRequestError) as raised:
            store.release(list(range(100_000)))
    message = str(raised.value)
    assert len(message) < 300, len(message)
    assert "got list [0, 1, 2" in message and "(688,890 characters)" in message
    assert "expected the QueuedRequest that announce() returned" in message


class _InterruptedAdd(dict):
    """Requests whose ``add`` is interrupted: a Ctrl-C just after the pairs were replaced."""

    def __setitem__(self, token, request):
        raise KeyboardInterrupt


def test_an_announce_interrupted_after_replacing_the_pairs_leaves_no_stale_pair_places():
    """``served`` keeps the place of each of a request's pairs until the pairs are replaced
    (``pairs_version``); a Ctrl-C just after a replacement left the version as it was, and the
    next batch served negated whatever pairs then stood at the old places (another request's,
    or one finished already, made unfinished again; after a release, which shortens the pairs,
    a write past them, unchecked once compiled). The version counts a replacement before it is
    made."""
    queue = QueuedRequests()
    served = queue.add(t(5, 6, 7))
    other = queue.add(t(1, 2, 3, 4, 5, 6, 7))
    queue.served(served, t(5))  # finds its pairs' places
    requests, queue._requests = queue._requests, _InterruptedAdd(queue._requests)
    with pytest.raises(KeyboardInterrupt):
        queue.add(t(0, 1, 2, 3))  # the pairs replaced, then interrupted
    queue._requests = dict(requests)
    queue.served(served, t(6, 7))  # its last lookups: rows 5-7 wait for ``other``
    assert queue.next_use(t(3, 5, 6, 7)).tolist() == [other.token] * 4


def test_a_batch_served_after_its_release_or_to_another_store_says_what_served_expects(tmp_path):
    """``served`` refused a released request, or another store's, with the advice for
    ``release`` ("release each request once"), which the caller had followed: it says when and
    where a request's batches are told served."""
    path, _ = make_table(tmp_path, rows=ROWS, dim=8)
    config = store_config(path, warm={"capacity": 100})
    with TieredStore(config) as store, TieredStore(config) as other:
        request = store.announce([1, 2])
        with pytest.raises(
            QueuedRequestError,
            match=r"served: queued request \d+ is another store's; expected a request announced "
            r"to this store and not released yet",
        ):
            other.served(request, [1])
        store.release(request)
        with pytest.raises(
            QueuedRequestError,
            match=r"served: queued request \d+ was already released; expected a request "
            r"announced to this store and not released yet \(served\(\) each batch before",
        ):
            store.served(request, [1])


@pytest.mark.parametrize("release_posted", ["after the drop", "before the drop"])
def test_a_batch_a_tier_missed_is_made_up_for_by_the_requests_release(tmp_path, release_posted):
    """A batch served moves the request's finished rows on in the tiers; its release then
    moves only the rows it still had lookups of. News of a batch that a tier missed (dropped
    after ``NEWS_TRIES`` failures) left that tier's finished rows waiting for the request for
    good, released or not: ranked as needed soonest, after every row no request looks up. The
    release of a request whose batch a tier missed tells every row of it."""
    from tiered_store.store_lock import NEWS_TRIES

    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, hot={"capacity": 20}, warm={"capacity": 60})) as store:
        store.lookup(torch.arange(60))
        request = store.announce(torch.arange(40))
        warm_unqueued = store.warm.unqueued

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        store.warm.unqueued = out_of_memory
        dropped = r"the warm tier of a request's batch failed 3 .*; dropped: its release tells"
        with pytest.warns(RuntimeWarning, match=dropped):
            store.served(request, torch.arange(40))  # every lookup of it: its rows finished
            if release_posted == "before the drop":
                _release_posted_while_the_lock_is_held(store, request)
            while store.queue_news["dropped"] == 0:
                assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])  # hits
        assert store.queue_news == {"failures": NEWS_TRIES, "dropped": 1}
        store.warm.unqueued = warm_unqueued
        if release_posted == "after the drop":
            store.release(request)
        assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])  # tells the rest
        _no_row_held_for_a_request(store)


def _no_row_held_for_a_request(store) -> None:
    """The queue is empty and every row either tier holds waits for no request."""
    assert len(store.caches.queue) == 0
    for cache in (store.hot, store.warm):
        held = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
        assert held.numel() > 0
        assert bool((cache._next_use[held] == NOT_QUEUED).all()), cache.name
        check_cache_invariants(cache)


def test_a_batch_served_interrupted_before_its_news_is_made_up_for_by_the_release(tmp_path):
    """``served`` finishes the batch's pairs in the queue, then posts the news the tiers learn
    them from; a Ctrl-C between the two (raised as the compiled pass returns) left the tiers
    untold, and the release moves only the rows with lookups left: the batch's rows waited in
    both tiers for a request gone, for good. The release of such a request tells every row of
    it, as for a batch whose news a tier dropped."""
    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, hot={"capacity": 20}, warm={"capacity": 60})) as store:
        store.lookup(torch.arange(60))
        request = store.announce(torch.arange(40))
        store.lookup(torch.arange(40, 45))  # the announce told
        post = store._lock.post

        def interrupted(*args, **kwargs):
            store._lock.post = post
            raise KeyboardInterrupt

        store._lock.post = interrupted
        with pytest.raises(KeyboardInterrupt):
            store.served(request, torch.arange(40))  # every lookup of it: its rows finished
        assert store._lock.post == post
        store.release(request)
        assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])
        _no_row_held_for_a_request(store)


@pytest.mark.parametrize("failing", ["pairs_of", "serve_batch"])
def test_a_batch_served_that_fails_before_changing_anything_leaves_the_release_as_usual(
    tmp_path, monkeypatch, failing
):
    """``served`` marked the request's batch as missed by the tiers on any failure but a
    refusal: one out of memory finding its pairs' places or in the pass's allocations (which
    change nothing) made its release tell the tiers every row of it, a needless make-up. Only a
    failure once the pass began marks it (the batch served again, then released: no row
    waits for it)."""
    from tiered_store import request_queue_kernels as kernels

    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, hot={"capacity": 20}, warm={"capacity": 60})) as store:
        store.lookup(torch.arange(60))
        request = store.announce(torch.arange(40).repeat(2))
        store.served(request, torch.arange(10))  # its first batch: the pairs searched for
        monkeypatch.setattr(kernels, failing, getattr(kernels, failing).py_func)
        monkeypatch.setattr(kernels, "np", _NumpyFailingAt(1))
        with pytest.raises(MemoryError):
            store.served(request, torch.arange(10, 40))
        monkeypatch.setattr(kernels, "np", np)
        assert not request.missed_batch and request.passes == 1
        store.served(request, torch.arange(10, 40))
        store.served(request)
        assert not request.missed_batch and request.passes == 3
        store.release(request)
        assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])
        _no_row_held_for_a_request(store)


def test_a_batch_served_that_fails_after_taking_its_lookups_off_is_marked_missed(tmp_path):
    """``served`` took a pass that raised back out of ``passes`` whatever the failure: its
    internal-inconsistency ``ValueError`` (a finished row with no pair of the request), raised
    once the batch's lookups were taken off ``left``, left the batch unmarked though it
    changed the request. Only a failure before the pass writes (out of memory in its
    allocations) is uncounted: this one marks the batch missed (its release tells every row)."""
    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, hot={"capacity": 20}, warm={"capacity": 60})) as store:
        store.lookup(torch.arange(60))
        request = store.announce(torch.arange(40))
        queue = store.caches.queue
        lost = int(np.flatnonzero(queue._pair_rows == 5)[0])  # its pair of row 5, lost
        queue._pair_tokens[lost] = request.token + 1000
        with pytest.raises(ValueError, match=f"request {request.token} has no pair of row 5"):
            store.served(request, torch.arange(10))
        assert request.left[:10].tolist() == [0] * 10  # its lookups taken off
        assert request.missed_batch and request.passes == 1
        queue._pair_tokens[lost] = request.token
        store.release(request)
        assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])
        _no_row_held_for_a_request(store)


class _InterruptedAfter(dict):
    """Requests whose adding or dropping (as named) takes effect, then a Ctrl-C is raised (as
    CPython raises it at the end of a call, once a signal came during it)."""

    def __init__(self, tokens, method: str) -> None:
        super().__init__(tokens)
        self.method = method

    def __setitem__(self, token, request):
        super().__setitem__(token, request)
        if self.method == "add":
            raise KeyboardInterrupt

    def pop(self, token, default=None):
        super().pop(token, default)
        if self.method == "discard":
            raise KeyboardInterrupt


def _interrupt_once(store, queue_method):
    """Raise one Ctrl-C as the store's queue ends ``queue_method`` ("add", "discard") on its
    requests or, with None, as the store posts its next news to the tiers."""
    if queue_method is not None:
        queue = store.caches.queue
        queue._requests = _InterruptedAfter(queue._requests, queue_method)
        return
    post = store._lock.post

    def interrupted(*args, **kwargs):
        store._lock.post = post
        raise KeyboardInterrupt

    store._lock.post = interrupted


@pytest.mark.parametrize("where", ["as the queue takes it", "before its news is posted"])
def test_an_announce_interrupted_once_queued_is_withdrawn(tmp_path, where):
    """A Ctrl-C once ``add`` queued the request (raised as it ends, or as the news is posted)
    left its pairs in the queue with no request returned to release: its rows waited in both
    tiers for a request gone, for good. The announce withdraws it."""
    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, hot={"capacity": 20}, warm={"capacity": 60})) as store:
        store.lookup(torch.arange(60))
        store.release(store.announce(torch.arange(3)))  # the queue attached to the tiers
        queue = store.caches.queue
        _interrupt_once(store, "add" if where == "as the queue takes it" else None)
        with pytest.raises(KeyboardInterrupt):
            store.announce(torch.arange(40))
        queue._requests = dict(queue._requests)
        assert len(queue) == 0 and queue.nbytes == 0
        assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])
        _no_row_held_for_a_request(store)


@pytest.mark.parametrize("where", ["as the queue drops it", "before its news is posted"])
def test_a_release_interrupted_once_the_queue_dropped_it_still_tells_the_tiers(tmp_path, where):
    """``release`` drops the request from the queue, then posts the news the tiers learn it
    from; a Ctrl-C between the two (raised as ``remove`` ends, or as the news is posted) left
    the request's rows waiting in both tiers for a request gone, for good (a second release is
    refused: it was released). The release posts every row of it then."""
    path, data = make_table(tmp_path, rows=400)
    with TieredStore(store_config(path, hot={"capacity": 20}, warm={"capacity": 60})) as store:
        store.lookup(torch.arange(60))
        request = store.announce(torch.arange(40))
        store.lookup(torch.arange(40, 45))  # the announce told
        queue = store.caches.queue
        _interrupt_once(store, "discard" if where == "as the queue drops it" else None)
        with pytest.raises(KeyboardInterrupt):
            store.release(request)
        queue._requests = dict(queue._requests)
        assert len(queue) == 0
        assert torch.equal(store.lookup(torch.arange(40, 45)), data[40:45])
        _no_row_held_for_a_request(store)


_INTERRUPTED_QUEUE = """
import sys
import torch
from tiered_store import StoreConfig, TieredStore
from tiered_store.request_queue import NOT_QUEUED

FILES = ("tiered_store/store.py", "tiered_store/request_queue.py")


def counted(k, hits, where):
    '''A profiler raising KeyboardInterrupt at the k-th point where CPython handles a signal in
    the store's and the queue's code: a call they make of the library's Python code as it is
    entered, the return of any other call they make, and the return of their own functions
    to theirs (as a signal raised at the end of the last call in there).'''
    def profile(frame, event, arg):
        if event not in ("call", "return", "c_return"):
            return
        at = frame.f_back if event in ("call", "return") else frame
        if at is None or not at.f_code.co_filename.endswith(FILES):
            return
        if event == "call" and "tiered_store" not in frame.f_code.co_filename:
            return  # (a compiled pass's dispatcher: no signal is handled inside it)
        if event == "return" and not frame.f_code.co_filename.endswith(FILES):
            return
        hits[0] += 1
        if hits[0] == k:
            where.append(f"{k}:{event}:{frame.f_code.co_name}:{frame.f_lineno}")
            raise KeyboardInterrupt
    return profile


config = {"table": {"path": sys.argv[1]}, "tiers": {"hot": {"capacity": 20}, "warm": {"capacity": 60}}}
store = TieredStore(StoreConfig.from_dict(config))
store.lookup(torch.arange(60))
first = store.announce(torch.arange(3))  # the queue attached, numba imported
store.served(first)
store.release(first)
queue, k, where = store.caches.queue, 0, []
while True:
    k, hits, request = k + 1, [0], None
    sys.setprofile(counted(k, hits, where))
    try:
        request = store.announce(torch.arange(40))
        store.served(request, torch.arange(20))
        store.served(request)
        store.release(request)
    except KeyboardInterrupt:
        pass
    finally:
        sys.setprofile(None)
    if request is not None and request.token in queue._requests:  # interrupted before it went
        store.release(request)
    store.lookup(torch.arange(40, 45))  # tells the tiers the news
    assert len(queue) == 0 and queue.nbytes == 0, where[-1:]
    for cache in (store.hot, store.warm):
        held = cache.row_of_slot >= 0
        assert bool((cache._next_use[held] == NOT_QUEUED).all()), (cache.name, where[-1:])
    if hits[0] < k:  # every point has been interrupted once
        break
store.close()
print("points", k - 1)
"""


def test_a_request_interrupted_anywhere_in_announce_served_or_release_leaves_no_row_waiting(
    tmp_path,
):
    """A Ctrl-C at any point of a request's announce, batches served and release, in a child
    process (a profiler raising it where CPython would): once the caller released what it got
    back (an announce interrupted returns nothing), the queue is empty and no row either tier
    holds waits for a request. A Ctrl-C once ``add`` queued the request, or once ``remove``
    dropped it but before its news was posted, left rows waiting for a request gone, for
    good."""
    import subprocess
    import sys

    path, _ = make_table(tmp_path, rows=400, dim=4)
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_QUEUE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[1]) >= 50, proc.stdout


@pytest.mark.parametrize("seed", [0, 1])
def test_a_random_trace_served_through_the_store_keeps_every_slot_at_its_rows_next_use(
    tmp_path, seed
):
    """A random trace through a real store (two tiers): requests announced, served in random
    batches (out of order, repeated ids, ids never announced, lookups more often than
    announced, the no-ids last batch, at any batch), looked up and released in any order.
    After every call each tier's per-slot next use, and the queue's for every row, is a
    Python model's: per request its lookups left of each row; a row's next use the earliest
    request with one left. The caller's batch ids are left as passed (numpy and torch)."""
    rows = 400
    path, data = make_table(tmp_path, rows=rows, dim=4)
    config = store_config(path, hot={"capacity": 40}, warm={"capacity": 120})
    rng = np.random.default_rng(seed)
    held: list = []  # (request, {row: lookups left}, its ids in announced order)

    def want() -> torch.Tensor:
        out = torch.full((rows,), NOT_QUEUED)
        for request, left, _ in reversed(held):  # tokens increase along ``held``
            mine = [r for r, n in left.items() if n > 0]
            out[torch.tensor(mine, dtype=torch.int64)] = request.token
        return out

    def check(store, step) -> None:
        model = want()
        assert torch.equal(store.caches.queue.next_use(torch.arange(rows)), model), step
        for cache in (store.hot, store.warm):
            slots = torch.nonzero(cache.row_of_slot >= 0).squeeze(1)
            got = cache._next_use[slots]
            assert torch.equal(got, model[cache.row_of_slot[slots]]), (step, cache.name)

    with TieredStore(config) as store:
        for step in range(300):
            roll = rng.random()
            if held and (roll < 0.15 or len(held) > 6):
                request, _, _ = held.pop(int(rng.integers(len(held))))
                store.release(request)
            elif held and roll < 0.75:
                request, left, ids = held[int(rng.integers(len(held)))]
                kind = rng.random()
                if kind < 0.1:  # its last batch: every lookup it has left
                    batch = None
                    for row in left:
                        left[row] = 0
                else:
                    cut = int(rng.integers(0, ids.size + 1))
                    size = int(rng.integers(0, 12))
                    if kind < 0.5:  # in announced order, from a random place
                        batch = ids[cut : cut + size]
                    else:  # any of its ids (repeats), out of order
                        batch = rng.choice(ids, size) if ids.size else ids[:0]
                    extra = rng.integers(0, rows, int(rng.integers(0, 3)))  # maybe unannounced
                    batch = np.concatenate([batch, extra]).astype(np.int64)
                    if kind > 0.8:
                        rng.shuffle(batch)
                    for row in batch.tolist():
                        if left.get(row, 0) > 0:
                            left[row] -= 1
                    if rng.random() < 0.5:
                        batch = torch.from_numpy(batch)
                passed = None if batch is None else torch.as_tensor(batch).clone()
                store.served(request, batch)
                if batch is not None:  # the caller's ids as passed (numpy's, torch's memory)
                    assert torch.equal(torch.as_tensor(batch), passed), step
                    store.lookup(batch)
            else:
                ids = rng.integers(0, rows, int(rng.integers(0, 40)))
                if rng.random() < 0.3:  # repeated ids within the request
                    ids = np.repeat(ids, rng.integers(1, 4, ids.size))
                request = store.announce(torch.from_numpy(ids))
                counts = dict(zip(*np.unique(ids, return_counts=True), strict=True))
                held.append((request, {int(r): int(n) for r, n in counts.items()}, ids))
            check(store, step)
        for request, _, _ in held:
            store.release(request)
        held.clear()
        check(store, "end")

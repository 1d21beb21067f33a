"""``server.announce_requests``: a waiting request's rows are announced to the tables, the answers
do not change, and every announcement is released, whatever became of the request."""

from __future__ import annotations

import json
import logging
import urllib.request

import pytest
import torch

from tests.serve_support import break_lookups, make_checkpoint, write_config
from tests.test_serve import start_server
from tiered_store.serve import ServeConfig, ServedModel, parse_request
from tiered_store.serve.client import post_json, run_load, zipf_requests
from tiered_store.serve.guarded_table import TableUnavailableError


def _trainer_commits(store) -> None:
    """A commit to ``store``'s table by another store, as a trainer's: the server's is stale."""
    from tiered_store import TieredStore

    with TieredStore(store.config) as writer:
        writer.write(torch.arange(4), torch.ones(4, writer.dim))
        writer.commit()


def queued_requests(server) -> list[int]:
    """Requests each table holds as announced now (None: never announced to, so its tiers
    keep no state for a queue)."""
    return [
        None if store.hot.queue is None else len(store.caches.queue)
        for store in server.model.stores.values()
    ]


def _a_request_announced(tmp_path):
    """A served model of the demo checkpoint, a request of two sequences and its announcement."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    body = json.dumps({"input_ids": [[5, 17, 900, 17], [1, 2, 3, 4]]}).encode()
    request = parse_request(body, config.server, served)
    return served, request, served.announce(request)


def test_announce_tells_every_table_the_request_rows(tmp_path):
    served, request, announced = _a_request_announced(tmp_path)
    try:
        rows = served.model.hash(torch.from_numpy(request.input_ids)).row_ids
        assert [store for store, _ in announced.queued] == list(served.stores.values())
        for (store, queued), ids in zip(announced.queued, rows.values(), strict=True):
            assert torch.equal(queued.rows, torch.unique(ids))
            assert len(store.caches.queue) == 1
        answer = served.answer(request, announced)  # from the rows hashed when announced
        assert answer == served.answer(request)
        stores = [store for store, _ in announced.queued]
        served.release(announced)
        assert all(len(store.caches.queue) == 0 for store in stores)
        served.release(announced)  # once only: the worker and the handler's cleanup both call it
    finally:
        served.close()


def test_a_request_answered_gives_up_its_rows_before_it_is_released(tmp_path):
    """The answer's lookup is all of a request's lookups: its rows are told served first, so
    its admissions rank them by the requests behind it (here none: no row waits for it), not
    as needed soonest until the release, which comes after the answer is sent."""
    served, request, announced = _a_request_announced(tmp_path)
    try:
        served.answer(request, announced)
        for store, queued in announced.queued:
            assert len(store.caches.queue) == 1  # still announced: released after the answer
            for cache in (store.hot, store.warm):
                held = torch.isin(cache.row_of_slot, queued.rows)
                assert held.any(), cache.name
                assert not (cache._next_use[held] == queued.token).any(), cache.name
        served.release(announced)
    finally:
        served.close()


def test_a_table_that_fails_to_be_told_a_request_is_served_leaves_the_others_told(tmp_path, caplog):
    """Telling the tables a request is served is advice: the first table's failure (out of
    memory, say) was logged and left every table after it untold, their rows ranked as needed
    soonest until the release. Each table is told on its own; the failure is logged by name."""
    served, request, announced = _a_request_announced(tmp_path)
    try:
        (first, _), *others = announced.queued

        def out_of_memory(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        first.served = out_of_memory
        with caplog.at_level(logging.ERROR):
            served.answer(request, announced)
        assert others
        for store, queued in others:
            for cache in (store.hot, store.warm):
                held = torch.isin(cache.row_of_slot, queued.rows)
                assert held.any(), cache.name
                assert not (cache._next_use[held] == queued.token).any(), cache.name
        name = next(n for n, s in served.stores.items() if s is first)
        assert f"telling table {name} a request is served failed" in caplog.text
        served.release(announced)
    finally:
        served.close()


def test_announcing_server_answers_alike_and_releases_every_request(tmp_path):
    """6 clients on 4 compute turns: requests wait for a turn, and on a loaded machine (8
    processes on 2 cores) a wait could pass the tests' 2 s request_timeout_s, a 503 "server
    busy" that is no announcing fault: this server waits 30 s (the default); any error fails
    the run naming what it answered (``error_texts``)."""
    plain = start_server(make_checkpoint(tmp_path / "plain"))
    limits = {"announce_requests": True, "request_timeout_s": 30.0}
    announcing = start_server(make_checkpoint(tmp_path / "announcing", server=limits))
    try:
        body = {"input_ids": [[5, 17, 900, 17, 5, 12]], "top_k": 3}
        status, answer = post_json(announcing.url + "/v1/engram", body)
        assert status == 200, answer
        _, expected = post_json(plain.url + "/v1/engram", body)
        for key in ("next_token_ids", "logits", "hidden_checksum", "layer_checksums"):
            assert answer[key] == expected[key], key
        assert queued_requests(announcing) == [0, 0] and queued_requests(plain) == [None, None]

        bodies = zipf_requests(24, batch=2, tokens=32, seed=5)
        result = run_load(announcing.url + "/v1/engram", bodies, clients=6)
        assert result.errors == {} and result.answered == 24, result.error_texts
        assert queued_requests(announcing) == [0, 0]  # released after each answer

        status, _ = post_json(announcing.url + "/v1/engram", {"input_ids": [[1, -4]]})
        assert status == 400  # refused while parsing: nothing announced
        assert queued_requests(announcing) == [0, 0]
        break_lookups(announcing.model.stores["engram_layer3"])  # fails after announcing
        status, _ = post_json(announcing.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})
        assert status == 503
        assert queued_requests(announcing) == [0, 0]
    finally:
        plain.stop()
        announcing.stop()


def test_a_load_run_says_what_each_kind_of_error_answered(tmp_path):
    """run_load counted a failed request by its status alone ({'503': 1}): a busy server, a
    table fault and a drain read alike. The first answer of each status is kept, its error."""
    limits = {"announce_requests": True, "request_timeout_s": 30.0}
    server = start_server(make_checkpoint(tmp_path, server=limits))
    try:
        break_lookups(server.model.stores["engram_layer3"])  # fails after announcing
        bodies = zipf_requests(3, batch=2, tokens=8, seed=5)
        result = run_load(server.url + "/v1/engram", bodies, clients=2)
        assert result.errors == {"503": 3} and result.answered == 0, result
        expected = "table data unavailable (table engram_layer3: cold tier read failed)"
        assert result.error_texts == {"503": expected}
        assert result.to_dict()["error_texts"] == {"503": expected}
        assert queued_requests(server) == [0, 0]
    finally:
        server.stop()


def test_a_request_waiting_for_its_turn_is_announced_while_every_worker_computes(tmp_path):
    """max_concurrent 1: while request 1 computes, request 2 is parsed and announced as it waits
    (it was announced only once request 1 finished: announcing used the compute threads)."""
    import threading
    import time

    limits = {"announce_requests": True, "max_concurrent": 1}
    server = start_server(make_checkpoint(tmp_path, server=limits))
    try:
        computing, go_on = threading.Event(), threading.Event()
        answer = server.model.answer

        def held_answer(request, announced=None):
            if not computing.is_set():
                computing.set()
                go_on.wait(30)  # request 1 computes until the test has looked
            return answer(request, announced)

        server.model.answer = held_answer
        url = server.url + "/v1/engram"
        statuses: list[int] = []
        first = threading.Thread(
            target=lambda: statuses.append(post_json(url, {"input_ids": [[5, 17, 900]]})[0])
        )
        first.start()
        assert computing.wait(30)
        second = threading.Thread(
            target=lambda: statuses.append(post_json(url, {"input_ids": [[1, 2, 3]]})[0])
        )
        second.start()
        deadline = time.monotonic() + 20
        while queued_requests(server) != [2, 2]:  # both announced, one computing
            assert time.monotonic() < deadline, queued_requests(server)
            time.sleep(0.02)
        go_on.set()
        first.join(30)
        second.join(30)
        assert statuses == [200, 200] and queued_requests(server) == [0, 0]
    finally:
        go_on.set()
        server.stop()


def test_a_request_that_never_got_its_turn_is_released_off_the_event_loop(tmp_path):
    """A request that waited in vain for a compute turn (503) was released on the event loop, and
    a release waits for the model's announcements (their lock) and passes over each table's
    queue: while another request's announcement ran, the server answered nothing, not even
    /healthz."""
    import threading
    import time
    import urllib.request

    limits = {"announce_requests": True, "max_concurrent": 1, "request_timeout_s": 1.0}
    server = start_server(make_checkpoint(tmp_path, server=limits))
    try:
        computing, go_on = threading.Event(), threading.Event()
        answer = server.model.answer

        def held_answer(request, announced=None):
            if not computing.is_set():
                computing.set()
                go_on.wait(30)  # request 1 holds the only compute turn
            return answer(request, announced)

        releasing = threading.Event()
        release = server.model.release

        def observed_release(announced, **kwargs):
            releasing.set()  # the first release: request 2's, once its wait for a turn ended
            return release(announced, **kwargs)

        server.model.answer, server.model.release = held_answer, observed_release
        url = server.url + "/v1/engram"
        statuses: list[int] = []

        def post(ids):
            return threading.Thread(target=lambda: statuses.append(post_json(url, ids)[0]))

        first, second = post({"input_ids": [[5, 17, 900]]}), post({"input_ids": [[1, 2, 3]]})
        first.start()
        assert computing.wait(30)
        second.start()
        deadline = time.monotonic() + 20
        while queued_requests(server) != [2, 2]:  # request 2 announced, waiting for its turn
            assert time.monotonic() < deadline, queued_requests(server)
            time.sleep(0.02)
        health: list[float] = []
        with server.model._waiting_lock:  # another request's announcement, under way
            assert releasing.wait(30)  # request 2 timed out (503) and is released meanwhile
            start = time.monotonic()
            with urllib.request.urlopen(server.url + "/healthz", timeout=5) as reply:
                health.append(reply.status)
            waited = time.monotonic() - start
        go_on.set()
        first.join(30)
        second.join(30)
        assert health == [200] and waited < 5, waited
        assert statuses == [503, 200] and queued_requests(server) == [0, 0]
    finally:
        go_on.set()
        server.stop()


def test_a_reload_tells_the_reopened_tables_about_the_requests_still_waiting(tmp_path):
    """A table reopened on a new version while a request waits: its rows are announced to the new
    store, and the release reaches it (they went to the closed store, and the new one's rows of
    the waiting request ranked as never needed)."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"announce_requests": True}))
    served = ServedModel(config)
    try:
        body = json.dumps({"input_ids": [[5, 17, 900, 17, 5, 12]]}).encode()
        request = parse_request(body, config.server, served)
        announced = served.announce(request)  # waiting for its compute turn
        name = "engram_layer1"
        _trainer_commits(served.stores[name])
        assert served.reload_if_stale(force_check=True) == [name]
        reopened = served.stores[name]
        assert len(reopened.caches.queue) == 1 and reopened.stats()["queue"]["requests"] == 1
        expected = {store: queued.rows for store, queued in announced.queued}
        assert torch.equal(expected[reopened], torch.unique(announced.batch.row_ids[1]))
        served.answer(request, announced)
        served.release(announced)
        assert [len(s.caches.queue) for s in served.stores.values()] == [0, 0]
    finally:
        served.close()


def test_a_closed_table_is_not_announced_to_and_its_answer_says_closed(tmp_path):
    """A store left closed (a reload that could not reopen it) refused the announcement with
    StoreClosedError, which the server answered as a 500; announcing is advice: the request goes
    on, and its lookup answers with the table unavailable ("closed", a 503)."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        body = json.dumps({"input_ids": [[5, 17, 900, 17]]}).encode()
        request = parse_request(body, config.server, served)
        closed, *others = served.stores.values()
        closed.close()
        announced = served.announce(request)
        assert [store for store, _ in announced.queued] == others
        with pytest.raises(TableUnavailableError, match="closed"):
            served.answer(request, announced)
        served.release(announced)
        assert all(len(store.caches.queue) == 0 for store in others)
    finally:
        served.close()


@pytest.mark.parametrize("left_closed", [1, 2])  # one table, or every table
def test_a_table_reopened_after_it_was_left_closed_is_told_the_requests_waiting(
    tmp_path, left_closed
):
    """Requests announced while a table was left closed (a reload that could not reopen it)
    skipped it; the check that reopened it told the new store only the requests the closed one
    had been told, so their rows ranked as never needed there until they were answered (and one
    that skipped every table went first). Each waiting request is announced to it, in the order
    they were announced."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"announce_requests": True}))
    served = ServedModel(config)
    try:
        bodies = [{"input_ids": [[5, 17, 900, 17]]}, {"input_ids": [[1, 2, 3, 4, 5]]}]
        requests = [parse_request(json.dumps(b).encode(), config.server, served) for b in bodies]
        names = list(served.stores)[:left_closed]
        first = served.announce(requests[0])  # told every table
        for name in names:
            served.stores[name].close()
        second = served.announce(requests[1])  # told every table but the closed ones
        assert served.reload_if_stale(force_check=True) == names
        for name in names:
            reopened = served.stores[name]
            assert len(reopened.caches.queue) == 2
            layer = next(k for k in served.layer_ids if config.table_name(k) == name)
            tokens = []
            for announced in (first, second):
                (told,) = [request for store, request in announced.queued if store is reopened]
                assert torch.equal(told.rows, torch.unique(announced.batch.row_ids[layer]))
                tokens.append(told.token)
            assert tokens[0] < tokens[1], name  # in the order they were announced
        for request, announced in zip(requests, (first, second), strict=True):
            served.answer(request, announced)
            served.release(announced)
        assert [len(s.caches.queue) for s in served.stores.values()] == [0, 0]
    finally:
        served.close()


def queued_metric(server) -> list[float]:
    """``tiered_store_queued_requests`` per table, as /metrics exports it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tiered_store_queued_requests"
        for sample in family.samples
    ]


def _capped_server(tmp_path, *, max_announced: int, max_concurrent: int, timeout_s: float):
    """A server announcing requests, at most ``max_announced`` at once, and its /v1/engram URL."""
    limits = {
        "announce_requests": True,
        "max_announced": max_announced,
        "max_concurrent": max_concurrent,
        "request_timeout_s": timeout_s,
    }
    server = start_server(make_checkpoint(tmp_path, server=limits))
    return server, server.url + "/v1/engram"


class HeldTurns:
    """Holds each answer's computation (inside its compute turn) until the test lets it go on
    (``go``: a wait only), noting whether each request (by its first token id) was announced
    then."""

    def __init__(self, server) -> None:
        import threading

        self.model = server.model
        self.compute = server.model._answer
        self.started: list[tuple[int, bool]] = []  # (first token id, announced at its turn)
        self.cond = threading.Condition()
        self.let_go: set[int] = set()
        server.model._answer = self.held

    def held(self, request, hashed):
        k = int(request.input_ids[0, 0])
        with self.model._waiting_lock:
            told = any(a.batch is hashed for a in self.model._waiting)
        with self.cond:
            self.started.append((k, told))
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: k in self.let_go, 30)
        return self.compute(request, hashed)

    def go(self, *ks: int) -> None:
        with self.cond:
            self.let_go.update(ks)
            self.cond.notify_all()

    def wait_started(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.started) >= count, 30), self.started


def wait_for(check, what) -> None:
    """Poll ``check()`` until it is true (20 s at most)."""
    import time

    deadline = time.monotonic() + 20
    while not check():
        assert time.monotonic() < deadline, what()
        time.sleep(0.02)


def test_at_most_max_announced_requests_are_announced_the_rest_as_earlier_ones_go(tmp_path):
    """server.max_announced 2 with 5 requests waiting: the queue holds 2 (it held all 5, and an
    announcement's cost grows with the queue); as answers end the next ones are announced, in
    arrival order, each before its turn, and the queue ends empty."""
    import threading

    server, url = _capped_server(tmp_path, max_announced=2, max_concurrent=1, timeout_s=30.0)
    turns = HeldTurns(server)
    statuses: list[int] = []
    posts = [
        threading.Thread(
            target=lambda k=k: statuses.append(post_json(url, {"input_ids": [[k, 7, 900]]})[0])
        )
        for k in range(1, 6)
    ]
    try:
        posts[0].start()
        turns.wait_started(1)  # request 1 computes
        for k, post in enumerate(posts[1:], start=2):  # one by one: their arrival order is 2..5
            post.start()
            wait_for(
                lambda k=k: len(server.model._waiting) + len(server.model._unannounced) == k,
                lambda: (len(server.model._waiting), len(server.model._unannounced)),
            )
        assert queued_requests(server) == [2, 2] and queued_metric(server) == [2.0, 2.0]
        assert [s["queue"]["requests"] for s in server.model.stats().values()] == [2, 2]
        with urllib.request.urlopen(server.url + "/stats", timeout=30) as response:
            assert json.load(response)["server"]["waiting_unannounced"] == 3  # 3, 4 and 5
        for k in range(2, 6):  # request k-1 answered: k takes its turn, announced already
            turns.go(k - 1)
            turns.wait_started(k)
            expected = min(2, 6 - k)  # k computing, and the next one if any
            wait_for(
                lambda e=expected: queued_requests(server) == [e, e],
                lambda: queued_requests(server),
            )
            assert len(server.model._unannounced) == max(0, 5 - k - 1)
        turns.go(5)
        for post in posts:
            post.join(30)
        assert statuses == [200] * 5
        assert turns.started == [(k, True) for k in range(1, 6)]
        assert queued_requests(server) == [0, 0] and queued_metric(server) == [0.0, 0.0]
        assert not server.model._waiting and not server.model._unannounced
    finally:
        turns.go(*range(1, 6))
        server.stop()


def test_a_request_whose_turn_comes_before_its_announcement_is_served_unannounced(tmp_path):
    """max_announced 1, two compute turns: request 2 computes unannounced, so request 1's release
    does not announce it then (it would hold rows for an answer already running, and be released
    by nobody or twice); a request that timed out waiting unannounced (503) leaves the line."""
    import threading

    server, url = _capped_server(tmp_path, max_announced=1, max_concurrent=2, timeout_s=1.0)
    turns = HeldTurns(server)
    statuses: dict[int, int] = {}

    def post(k):
        thread = threading.Thread(
            target=lambda: statuses.update({k: post_json(url, {"input_ids": [[k, 7, 900]]})[0]})
        )
        thread.start()
        return thread

    try:
        first = post(1)
        turns.wait_started(1)
        second = post(2)
        turns.wait_started(2)  # both compute turns taken
        third = post(3)  # waits unannounced for a turn, and gives up after 1 s (503)
        third.join(30)
        assert statuses == {3: 503} and not server.model._unannounced
        assert turns.started == [(1, True), (2, False)]
        assert queued_requests(server) == [1, 1]
        turns.go(1)  # request 1 answered and released: 2 computes, and stays unannounced
        wait_for(lambda: len(statuses) == 2, lambda: statuses)
        assert queued_requests(server) == [0, 0]
        turns.go(2)
        first.join(30)
        second.join(30)
        assert statuses == {1: 200, 2: 200, 3: 503}
        assert queued_requests(server) == [0, 0]
        assert not server.model._waiting and not server.model._unannounced
    finally:
        turns.go(1, 2)
        server.stop()


def test_a_max_announced_that_is_not_a_positive_integer_is_refused_at_startup(tmp_path):
    """The serve command exits 2 naming the key, the value and what it takes."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    for value, expected in [
        (0, "greater than or equal to 1 (got 0)"),
        ("8", "a valid integer (got '8')"),
    ]:
        config = write_config(tmp_path / str(value), server={"max_announced": value})
        out = subprocess.run(
            [sys.executable, "-m", "tiered_store.cli", "serve", str(config),
             "--address", "127.0.0.1:0", "--metrics-address", ""],
            capture_output=True, text=True, timeout=60, env=subprocess_env(),
        )  # fmt: skip
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"server.max_announced: Input should be {expected}" in out.stderr, out.stderr


def test_a_release_frees_its_compute_turn_before_announcing_the_next_waiting_request(tmp_path):
    """max_concurrent 1, max_announced 2: request 1 computes, 2 waits announced, 3 unannounced.
    Request 1's release announced 3 in 1's worker, inside its compute turn: request 2 waited
    for 3's announcement (a merge into every queued request's rows) before it could compute, so
    past the cap every turn also paid for an announcement. Request 2 now computes meanwhile."""
    import threading

    server, url = _capped_server(tmp_path, max_announced=2, max_concurrent=1, timeout_s=30.0)
    model = server.model
    started: list[int] = []
    let_go, cond = set(), threading.Condition()
    compute = model._answer

    def held(request, hashed):  # each answer waits inside its compute turn until let go
        k = int(request.input_ids[0, 0])
        with cond:
            started.append(k)
            cond.notify_all()
            assert cond.wait_for(lambda: k in let_go, 30)
        return compute(request, hashed)

    def go(*ks: int) -> None:
        with cond:
            let_go.update(ks)
            cond.notify_all()

    announcing, announce_on = threading.Event(), threading.Event()
    store = next(iter(model.stores.values()))
    announce = store.announce

    def held_announce(ids):  # the announcement a release makes, held until the test looks
        if announce_on.is_set():
            announcing.set()
            with cond:
                assert cond.wait_for(lambda: 0 in let_go, 30)
        return announce(ids)

    model._answer, store.announce = held, held_announce
    statuses: dict[int, int] = {}

    def post(k):
        thread = threading.Thread(
            target=lambda: statuses.update({k: post_json(url, {"input_ids": [[k, 7, 900]]})[0]})
        )
        thread.start()
        return thread

    posts = []
    try:
        posts.append(post(1))
        wait_for(lambda: started == [1], lambda: started)
        posts.append(post(2))
        wait_for(lambda: len(model._waiting) == 2, lambda: len(model._waiting))
        posts.append(post(3))
        wait_for(lambda: len(model._unannounced) == 1, lambda: len(model._unannounced))
        announce_on.set()
        go(1)  # request 1 answered: its release announces request 3, held there
        assert announcing.wait(30)
        with cond:  # request 2 takes the compute turn while 3's announcement is under way
            assert cond.wait_for(lambda: started == [1, 2], 10), started
        go(0, 2, 3)
        for thread in posts:
            thread.join(30)
        assert statuses == {1: 200, 2: 200, 3: 200}
        assert queued_requests(server) == [0, 0]
        assert not model._waiting and not model._unannounced
    finally:
        go(0, 1, 2, 3)
        server.stop()


def test_an_earlier_waiting_requests_failed_announcement_is_not_raised_into_the_next(
    tmp_path, caplog
):
    """max_announced 1: request 2 waits unannounced; request 3's announce announced 2 first, and
    2's failure (a table out of memory) was raised into request 3, which failed, while 2 went on
    unannounced. It is logged as 2's; 3 is announced and both are served."""
    limits = {"announce_requests": True, "max_announced": 1}
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server=limits))
    served = ServedModel(config)
    try:
        bodies = [{"input_ids": [[k, 17, 900, 17]]} for k in (1, 2, 3)]
        first, second, third = [
            parse_request(json.dumps(b).encode(), config.server, served) for b in bodies
        ]
        announced = [served.announce(first), served.announce(second)]
        assert served.waiting_unannounced == 1  # request 2, behind the cap
        store = served.stores["engram_layer3"]
        announce = store.announce

        def out_of_memory_once(ids):  # the next announcement to this table fails
            store.announce = announce
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        store.announce = out_of_memory_once
        served.release(announced[0], announce_waiting=False)  # request 1 answered
        with caplog.at_level("ERROR", logger="tiered_store.serve"):
            announced.append(served.announce(third))  # raised request 2's failure
        assert "CUDA out of memory" in caplog.text and served.waiting_unannounced == 0
        assert announced[1].queued == [] and list(served._waiting) == [announced[2]]
        assert [len(s.caches.queue) for s in served.stores.values()] == [1, 1]  # request 3
        for request, told in zip((second, third), announced[1:], strict=True):
            assert served.answer(request, told) == served.answer(request)
            served.release(told)
        assert [len(s.caches.queue) for s in served.stores.values()] == [0, 0]
    finally:
        served.close()


def test_a_reload_whose_announcement_to_a_new_store_fails_still_swaps_it_in(
    tmp_path, caplog, monkeypatch
):
    """The reload tells the new store the requests waiting before the swap is recorded; a
    failure there (the new store out of memory beside the old one) was raised out of the reload
    with the model already on the new store and ``stores`` on the old one, both open: the old
    one never closed, and the next check opened yet another. Announcing is advice: the failure
    is logged, the swap completes, and the waiting requests are served unannounced there."""
    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"announce_requests": True}))
    served = ServedModel(config)
    try:
        bodies = [{"input_ids": [[5, 17, 900, 17]]}, {"input_ids": [[1, 2, 3, 4, 5]]}]
        requests = [parse_request(json.dumps(b).encode(), config.server, served) for b in bodies]
        announced = [served.announce(request) for request in requests]
        name = "engram_layer3"
        old, other = served.stores[name], served.stores["engram_layer1"]
        _trainer_commits(old)
        announce = TieredStore.announce

        def out_of_memory_when_new(store, ids):  # the new store's announcements fail
            if store is not old and store is not other:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return announce(store, ids)

        monkeypatch.setattr(TieredStore, "announce", out_of_memory_when_new)
        with caplog.at_level("ERROR", logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == [name]
        logged = [r for r in caplog.records if "CUDA out of memory" in str(r.exc_info)]
        assert len(logged) == 1 and name in logged[0].getMessage()  # once for the table
        new = served.stores[name]
        assert new is not old and old.closed and served.model.tables[3].table is new
        assert len(new.caches.queue) == 0
        for told in announced:
            assert [store for store, _ in told.queued] == [other]
        for request, told in zip(requests, announced, strict=True):
            served.answer(request, told)
            served.release(told)
        assert [len(s.caches.queue) for s in served.stores.values()] == [0, 0]
    finally:
        served.close()
    assert all(store.closed for store in served.stores.values())


def test_a_reload_whose_announcement_fails_part_way_keeps_those_told_and_releases_them(
    tmp_path, caplog, monkeypatch
):
    """A reload that fails to tell the new store one of the waiting requests (out of memory)
    tells it none after that one; those told before it stay announced there and are released
    from it as they are answered, the others only from the tables that were told: its queue
    (``stats()``, ``tiered_store_queued_requests``) counts the told ones, then none."""
    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"announce_requests": True}))
    served = ServedModel(config)
    try:
        bodies = [{"input_ids": [[5, 17, 900, 17]]}, {"input_ids": [[1, 2, 3, 4, 5]]}]
        bodies.append({"input_ids": [[7, 8, 9]]})
        requests = [parse_request(json.dumps(b).encode(), config.server, served) for b in bodies]
        announced = [served.announce(request) for request in requests]
        name = "engram_layer3"
        old, other = served.stores[name], served.stores["engram_layer1"]
        _trainer_commits(old)
        announce, calls = TieredStore.announce, []

        def out_of_memory_at_the_second(store, ids):  # the new store's second one fails
            if store is not old and store is not other:
                calls.append(store)
                if len(calls) == 2:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return announce(store, ids)

        monkeypatch.setattr(TieredStore, "announce", out_of_memory_at_the_second)
        with caplog.at_level("ERROR", logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == [name]
        assert len(calls) == 2  # the third request was not tried
        new = served.stores[name]
        assert new is not old and old.closed
        assert served.stats()[name]["queue"]["requests"] == 1
        assert [[s for s, _ in told.queued] for told in announced] == [
            [other, new],
            [other],
            [other],
        ]
        for request, told in zip(requests, announced, strict=True):
            served.answer(request, told)
            served.release(told)
        assert [s["queue"]["requests"] for s in served.stats().values()] == [0, 0]
        assert [len(s.caches.queue) for s in served.stores.values()] == [0, 0]
    finally:
        served.close()

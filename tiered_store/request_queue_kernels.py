"""The request queue's (row, request) pairs, merged, pruned and read in compiled passes (numba).

``QueuedRequests`` keeps every queued row with each request that looks it up, sorted by row and
then by request. A request coming is a merge of its sorted rows into that array, a request going
a pass that drops its pairs; with numpy either is several whole-array operations, each holding
the GIL, on a server's threads. Both run without the GIL (``nogil``: the queue's arrays are
replaced, never changed in place but for a pair's finishing, and its readers do not wait for a
pass): a server's lookups, those that admit rows included, its compute and event loop go on
during a pass over a large queue. Each allocates what it returns at its exact size (the
queue holds the bytes it counts, a release's moved rows take its request's rows' size; a batch
served's, at its batch's size, before it changes anything: out of memory changes nothing), inside
the pass: arrays numba allocated there alias nothing, which it compiles into a faster loop than
over arrays a caller passed in. A request served in batches finishes a pair once its last
lookup of the row is made (``serve_batch``): the pair stays, its token negated in place (only
ever from positive to negative), and every pass reads past it (``earliest``: a row's next use
is its first unfinished pair's). Importing this module imports numba (~0.5 s):
``request_queue`` imports it at the first announce."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def merge_request(
    pair_rows: np.ndarray, pair_tokens: np.ndarray, rows: np.ndarray, token: np.int64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs with (row, ``token``) added for each of ``rows`` (sorted, distinct), after the
    row's other pairs (``token`` is the latest), and which of ``rows`` had no pair before but
    finished ones."""
    n, m = pair_rows.size, rows.size
    out_rows = np.empty(n + m, dtype=np.int64)
    out_tokens = np.empty(n + m, dtype=np.int64)
    first = np.empty(m, dtype=np.bool_)
    i = out = 0
    for j in range(m):
        row = rows[j]
        while i < n and pair_rows[i] < row:
            out_rows[out], out_tokens[out] = pair_rows[i], pair_tokens[i]
            i += 1
            out += 1
        first[j] = True
        while i < n and pair_rows[i] == row:
            first[j] = first[j] and pair_tokens[i] < 0  # a finished pair waits for none
            out_rows[out], out_tokens[out] = pair_rows[i], pair_tokens[i]
            i += 1
            out += 1
        out_rows[out], out_tokens[out] = row, token
        out += 1
    out_rows[out:] = pair_rows[i:]
    out_tokens[out:] = pair_tokens[i:]
    return out_rows, out_tokens, first


@numba.njit(cache=True, nogil=True)
def drop_request(
    pair_rows: np.ndarray, pair_tokens: np.ndarray, token: np.int64, none: np.int64, dropped: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs without ``token``'s (finished ones included), the rows it was the earliest
    unfinished pair of, and each such row's next unfinished pair's token (``none`` where the
    row has none). ``dropped``: ``token``'s pair count (its request's rows), which sizes the
    kept pairs and the moved rows' buffers; ``ValueError`` when ``token`` has another count
    (nothing is written past them)."""
    n = pair_rows.size
    if not 0 <= dropped <= n:
        raise ValueError(
            "drop_request: dropped=" + str(dropped) + " pairs of " + str(n) + "; expected 0 to "
            + str(n)
        )  # fmt: skip
    size = n - dropped
    kept_rows = np.empty(size, dtype=np.int64)
    kept_tokens = np.empty(size, dtype=np.int64)
    moved_rows = np.empty(dropped, dtype=np.int64)
    moved_next = np.empty(dropped, dtype=np.int64)
    kept = moved = 0
    live = -1  # the row of the last unfinished pair passed (rows are >= 0)
    # two loops of one body: before pair ``size``, kept <= i < size, so only the last
    # ``dropped`` pairs check for room (a check at every pair slowed the pass by 15-40%)
    for i in range(size):
        if pair_tokens[i] != token and pair_tokens[i] != -token:
            kept_rows[kept], kept_tokens[kept] = pair_rows[i], pair_tokens[i]
            kept += 1
        elif pair_tokens[i] == token and live != pair_rows[i]:  # the row's earliest request
            if moved < dropped:
                moved_rows[moved] = pair_rows[i]
                moved_next[moved] = _next_unfinished(pair_rows, pair_tokens, i, none)
            moved += 1
        if pair_tokens[i] > 0:
            live = pair_rows[i]
    for i in range(size, n):
        if pair_tokens[i] != token and pair_tokens[i] != -token:
            if kept < size:
                kept_rows[kept], kept_tokens[kept] = pair_rows[i], pair_tokens[i]
            kept += 1
        elif pair_tokens[i] == token and live != pair_rows[i]:  # the row's earliest request
            if moved < dropped:
                moved_rows[moved] = pair_rows[i]
                moved_next[moved] = _next_unfinished(pair_rows, pair_tokens, i, none)
            moved += 1
        if pair_tokens[i] > 0:
            live = pair_rows[i]
    if kept != size:  # then moved <= dropped too
        raise ValueError(
            "drop_request: token " + str(token) + " has " + str(n - kept) + " pairs; expected "
            + "dropped=" + str(dropped)
        )  # fmt: skip
    return kept_rows, kept_tokens, moved_rows[:moved], moved_next[:moved]


@numba.njit(cache=True, nogil=True)
def pairs_of(
    pair_rows: np.ndarray, pair_tokens: np.ndarray, rows: np.ndarray, token: np.int64
) -> np.ndarray:
    """The position of request ``token``'s pair (finished or not) of each of its ``rows``
    (sorted, distinct): each searched for from the last one's in doubling steps (``_gallop_pair``:
    of the order of a pass over the pairs at most, a few reads a row for a request of few rows
    in a long queue). ``ValueError`` where a row has none (then ``serve_batch`` would write
    outside the pairs)."""
    n, m = pair_rows.size, rows.size
    at = np.empty(m, dtype=np.int64)
    i = 0
    for j in range(m):
        i = _gallop_pair(pair_rows, pair_tokens, rows[j], token, i, n)
        if i == n or pair_rows[i] != rows[j] or abs(pair_tokens[i]) != token:
            raise ValueError(
                "pairs_of: request " + str(token) + " has no pair of row " + str(rows[j])
                + "; expected one for each of its rows"
            )  # fmt: skip
        at[j] = i
    return at


_AHEAD = 8  # ``serve_batch``: how many places past the id announced next a batch's id is looked for


@numba.njit(cache=True, nogil=True)
def serve_batch(
    rows: np.ndarray,
    left: np.ndarray,
    where: np.ndarray,
    first_at: np.ndarray,
    start: int,
    ids: np.ndarray,
    pair_at: np.ndarray,
    pair_rows: np.ndarray,
    pair_tokens: np.ndarray,
    token: np.int64,
    none: np.int64,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Request ``token``'s lookups of ``ids`` made: each of ``ids`` in its ``rows`` (sorted,
    distinct) takes one off its ``left`` (in place, down to 0; other ids count for nothing), and
    the rows whose last lookup that was finish their pair (its token negated in place): at
    ``pair_at`` (from ``pairs_of``), or searched for when ``pair_at`` is empty (a request served
    in one batch pays no pass over the queue), in ascending order, each from the last one's pair
    (``_gallop_pair``: many rows read of the order of a pass at most). ``where``: the position in
    ``rows`` of each id the request announced, in order; ``ids`` are first taken for those from
    ``start`` on (a request served in order, batch after batch: no search), an id that is not
    the next one announced looked for among the few after it (``_AHEAD``: taken there, those
    skipped searched for when they come) and else searched for (and not taken: an id not
    announced, or one more often than announced, leaves the next id its place). An id searched
    for, with a lookup left, whose first place announced is at ``start`` or past it
    (``first_at``: of each of ``rows``, -1 where none; from ``first_places``, empty until made
    here) moves ``start`` past that place when the batch's next id is announced next there, or
    the batch is that one id (ids skipped, a cached prompt prefix: the later ones taken at their
    places again; a batch's last id, unconfirmed, moves nothing: those it skipped may come next,
    in order). Returns the rows the request was the earliest unfinished pair of (ascending),
    each one's next unfinished pair's token (``none`` where none), ``start`` past the ids taken at their places,
    and ``first_at`` (made here when empty and an id it announced, with a lookup left, is
    searched for). Allocates (up to the batch's size; ``first_at``) before anything changes: a
    failure (out of memory) changes nothing. ``ValueError`` (before any pair changes, the
    batch's lookups taken off ``left``) where a finished row has no pair of ``token``."""
    m = rows.size
    size = min(ids.size, m)
    places = np.empty(ids.size, dtype=np.int64)  # each id's position in ``rows`` (m: none)
    finished = np.empty(size, dtype=np.int64)  # positions in ``rows``, each once
    at_pairs = np.empty(size, dtype=np.int64)
    moved_rows = np.empty(size, dtype=np.int64)
    moved_next = np.empty(size, dtype=np.int64)
    for k in range(ids.size):  # the ids' places: nothing changes here (``first_at`` made)
        at = where[start] if start < where.size else m
        if at < m and rows[at] == ids[k]:  # the id announced next
            start += 1
        else:  # announced a few places on (the batch skipped those before it), or searched for
            ahead, stop = start + 1, min(start + 1 + _AHEAD, where.size)
            while ahead < stop and rows[where[ahead]] != ids[k]:
                ahead += 1
            if ahead < stop:
                at, start = where[ahead], ahead + 1
            else:
                at = _lower_bound(rows, ids[k], 0, m)
                found = at < m and rows[at] == ids[k] and left[at] > 0  # (none left: no jump)
                if found and not first_at.size:
                    first_at = first_places(where, m)  # the first id it lost, announced
                if found and first_at.size and first_at[at] >= start:
                    place = first_at[at]  # past any skipped: taken there if the next id is next
                    if ids.size == 1 or (  # (a batch's last id: nothing confirms the jump)
                        k + 1 < ids.size
                        and place + 1 < where.size
                        and rows[where[place + 1]] == ids[k + 1]
                    ):
                        start = place + 1
        places[k] = at
    done = 0
    for k in range(ids.size):
        at = places[k]
        if at < m and rows[at] == ids[k] and left[at] > 0:
            left[at] -= 1
            if left[at] == 0:
                finished[done] = at
                done += 1
    finished = finished[:done]
    finished.sort()  # the pairs in order: a pass, not a jump each (in place)
    n = pair_rows.size
    i = 0  # the last row's pair: the rows ascend, each searched for from there
    for k in range(done):
        if pair_at.size:
            at_pairs[k] = pair_at[finished[k]]
            continue
        row = rows[finished[k]]
        i = _gallop_pair(pair_rows, pair_tokens, row, token, i, n)
        if i == n or pair_rows[i] != row or abs(pair_tokens[i]) != token:
            raise ValueError(
                "serve_batch: request " + str(token) + " has no pair of row " + str(row)
                + "; expected one for each of its rows"
            )  # fmt: skip
        at_pairs[k] = i
    moved = 0
    for k in range(done):
        i = at_pairs[k]
        pair_tokens[i] = -pair_tokens[i]
        first = _run_start(pair_rows, i)  # the row's first pair, then its first unfinished
        while first < i and pair_tokens[first] < 0:
            first += 1
        if first == i:  # no earlier request still looks the row up
            moved_rows[moved] = pair_rows[i]
            moved_next[moved] = _next_unfinished(pair_rows, pair_tokens, i, none)
            moved += 1
    return moved_rows[:moved], moved_next[:moved], start, first_at


@numba.njit(cache=True, nogil=True)
def first_places(where: np.ndarray, m: int) -> np.ndarray:
    """The first place in ``where`` (positions in a request's ``m`` rows, in announced order) of
    each of the rows (int32; -1 where none)."""
    first = np.full(m, -1, dtype=np.int32)
    for k in range(where.size - 1, -1, -1):
        first[where[k]] = k
    return first


@numba.njit(cache=True, nogil=True)
def earliest(
    pair_rows: np.ndarray, pair_tokens: np.ndarray, query: np.ndarray, none: np.int64
) -> np.ndarray:
    """Token of each of ``query``'s earliest unfinished pair (``none`` where it has none)."""
    n = pair_rows.size
    out = np.empty(query.size, dtype=np.int64)
    for k in range(query.size):
        out[k] = none
        at = _lower_bound(pair_rows, query[k], 0, n)
        while at < n and pair_rows[at] == query[k]:
            # read once: ``served`` may finish the pair meanwhile (a second read could then
            # give its negated token)
            token = pair_tokens[at]
            if token > 0:
                out[k] = token
                break
            at += 1
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _lower_bound(values: np.ndarray, value: np.int64, low: int, high: int) -> int:
    """The first position in ``values[low:high]`` (sorted) not below ``value``."""
    while low < high:
        mid = (low + high) >> 1
        if values[mid] < value:
            low = mid + 1
        else:
            high = mid
    return low


@numba.njit(cache=True, nogil=True, inline="always")
def _gallop_pair(
    pair_rows: np.ndarray,
    pair_tokens: np.ndarray,
    row: np.int64,
    token: np.int64,
    low: int,
    high: int,
) -> int:
    """The first pair in ``[low, high)`` at (``row``, ``token``) or past it (pairs sorted by row,
    then by token's magnitude), searched for from ``low`` in doubling steps: a
    row many requests look up is not read pair by pair to the request's."""
    step = 1
    while low + step - 1 < high and _before(pair_rows, pair_tokens, low + step - 1, row, token):
        step *= 2
    low, high = low + step // 2, min(low + step - 1, high)  # the pair is in [low, high]
    while low < high:
        mid = (low + high) >> 1
        if _before(pair_rows, pair_tokens, mid, row, token):
            low = mid + 1
        else:
            high = mid
    return low


@numba.njit(cache=True, nogil=True, inline="always")
def _before(pair_rows: np.ndarray, pair_tokens: np.ndarray, i: int, row: np.int64, token: np.int64):
    """Whether pair ``i`` comes before (``row``, ``token``): an earlier row, or an earlier request
    of ``row``."""
    at = pair_rows[i]
    return at < row or (at == row and abs(pair_tokens[i]) < token)


@numba.njit(cache=True, nogil=True, inline="always")
def _run_start(pair_rows: np.ndarray, i: int) -> int:
    """The first pair of pair ``i``'s row, searched for back from it in doubling steps."""
    step = 1
    while i - step >= 0 and pair_rows[i - step] == pair_rows[i]:
        step *= 2
    low, high = max(i - step + 1, 0), i - step // 2  # the first pair is in [low, high]
    while low < high:
        mid = (low + high) >> 1
        if pair_rows[mid] < pair_rows[i]:
            low = mid + 1
        else:
            high = mid
    return low


@numba.njit(cache=True, nogil=True, inline="always")
def _next_unfinished(pair_rows: np.ndarray, pair_tokens: np.ndarray, i: int, none: np.int64):
    """Token of the first unfinished pair after pair ``i`` of its row (``none`` where none)."""
    j = i + 1
    while j < pair_rows.size and pair_rows[j] == pair_rows[i]:
        if pair_tokens[j] > 0:
            return pair_tokens[j]
        j += 1
    return none

"""The request queue's (row, request) pairs, merged and pruned in one compiled pass (numba).

``QueuedRequests`` keeps every queued row with each request that looks it up, sorted by row and
then by request. A request coming is a merge of its sorted rows into that array, a request going
a pass that drops its pairs; with numpy either is several whole-array operations, each holding
the GIL, on a server's threads. Both run without the GIL (``nogil``: the queue's arrays are
replaced, never changed in place, and its readers do not wait for a pass): a server's lookups,
those that admit rows included, its compute and event loop go on during a pass over a large
queue. Each allocates what it returns at its exact size (the
queue holds the bytes it counts, a release's moved rows take its request's rows' size), inside
the pass: arrays numba allocated there alias nothing, which it compiles into a faster loop than
over arrays a caller passed in. Importing this module imports numba (~0.5 s): ``request_queue``
imports it at the first announce.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def merge_request(
    pair_rows: np.ndarray, pair_tokens: np.ndarray, rows: np.ndarray, token: np.int64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs with (row, ``token``) added for each of ``rows`` (sorted, distinct), after the
    row's other pairs (``token`` is the latest), and which of ``rows`` had no pair before."""
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
        first[j] = i == n or pair_rows[i] != row
        while i < n and pair_rows[i] == row:
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
    """The pairs without ``token``'s, the rows it was the first pair of, and each such row's
    next pair's token (``none`` where the row has no other pair). ``dropped``: ``token``'s pair
    count (its request's rows), which sizes the kept pairs and the moved rows' buffers;
    ``ValueError`` when ``token`` has another count (nothing is written past them)."""
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
    # two loops of one body: before pair ``size``, kept <= i < size, so only the last
    # ``dropped`` pairs check for room (a check at every pair slowed the pass by 15-40%)
    for i in range(size):
        if pair_tokens[i] != token:
            kept_rows[kept], kept_tokens[kept] = pair_rows[i], pair_tokens[i]
            kept += 1
        elif i == 0 or pair_rows[i - 1] != pair_rows[i]:  # the row's earliest request
            if moved < dropped:
                moved_rows[moved] = pair_rows[i]
                following = i + 1 < n and pair_rows[i + 1] == pair_rows[i]
                moved_next[moved] = pair_tokens[i + 1] if following else none
            moved += 1
    for i in range(size, n):
        if pair_tokens[i] != token:
            if kept < size:
                kept_rows[kept], kept_tokens[kept] = pair_rows[i], pair_tokens[i]
            kept += 1
        elif i == 0 or pair_rows[i - 1] != pair_rows[i]:  # the row's earliest request
            if moved < dropped:
                moved_rows[moved] = pair_rows[i]
                following = i + 1 < n and pair_rows[i + 1] == pair_rows[i]
                moved_next[moved] = pair_tokens[i + 1] if following else none
            moved += 1
    if kept != size:  # then moved <= dropped too
        raise ValueError(
            "drop_request: token " + str(token) + " has " + str(n - kept) + " pairs; expected "
            + "dropped=" + str(dropped)
        )  # fmt: skip
    return kept_rows, kept_tokens, moved_rows[:moved], moved_next[:moved]

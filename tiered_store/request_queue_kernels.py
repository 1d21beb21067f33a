"""The request queue's (row, request) pairs, merged and pruned in one compiled pass (numba).

``QueuedRequests`` keeps every queued row with each request that looks it up, sorted by row and
then by request. A request coming is a merge of its sorted rows into that array, a request going
a pass that drops its pairs; with numpy either is several whole-array operations, each holding
the GIL, on a server's threads. Both run without the GIL (``nogil``: the queue's lock keeps its
arrays, which are replaced, never changed in place): a server's lookups, compute and event loop
go on during a pass over a large queue. Importing this module imports numba (~0.5 s): ``request_queue``
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
    pair_rows: np.ndarray, pair_tokens: np.ndarray, token: np.int64, none: np.int64
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs without ``token``'s, the rows it was the first pair of, and each such row's
    next pair's token (``none`` where the row has no other pair)."""
    n = pair_rows.size
    kept_rows = np.empty(n, dtype=np.int64)
    kept_tokens = np.empty(n, dtype=np.int64)
    moved_rows = np.empty(n, dtype=np.int64)
    moved_next = np.empty(n, dtype=np.int64)
    kept = moved = 0
    for i in range(n):
        if pair_tokens[i] != token:
            kept_rows[kept], kept_tokens[kept] = pair_rows[i], pair_tokens[i]
            kept += 1
        elif i == 0 or pair_rows[i - 1] != pair_rows[i]:  # the row's earliest request
            moved_rows[moved] = pair_rows[i]
            following = i + 1 < n and pair_rows[i + 1] == pair_rows[i]
            moved_next[moved] = pair_tokens[i + 1] if following else none
            moved += 1
    return kept_rows[:kept], kept_tokens[:kept], moved_rows[:moved], moved_next[:moved]

"""The request queue's (row, request) pairs, merged and pruned in one compiled pass (numba).

``QueuedRequests`` keeps every queued row with each request that looks it up, sorted by row and
then by request. A request coming is a merge of its sorted rows into that array, a request going
a pass that drops its pairs; with numpy either is several whole-array operations, each holding
the GIL, on a server's threads. Both run without the GIL (``nogil``: the queue's lock keeps its
arrays, which are replaced, never changed in place): a server's lookups, compute and event loop
go on during a pass over a large queue. The caller allocates what they fill (numpy), each at its
exact size: the queue holds the bytes it counts, and a release's moved rows take its own size.
Importing this module imports numba (~0.5 s): ``request_queue`` imports it at the first announce.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def merge_request(
    pair_rows: np.ndarray,
    pair_tokens: np.ndarray,
    rows: np.ndarray,
    token: np.int64,
    out_rows: np.ndarray,
    out_tokens: np.ndarray,
    first: np.ndarray,
) -> None:
    """Fill ``out_rows``/``out_tokens`` (``pair_rows.size + rows.size`` each) with the pairs and
    (row, ``token``) for each of ``rows`` (sorted, distinct), after the row's other pairs
    (``token`` is the latest), and ``first`` (``rows.size``) with which of ``rows`` had no pair
    before."""
    n, m = pair_rows.size, rows.size
    if out_rows.size != n + m or out_tokens.size != n + m or first.size != m:
        raise ValueError("merge_request: output arrays of the wrong size")
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


@numba.njit(cache=True, nogil=True)
def drop_request(
    pair_rows: np.ndarray,
    pair_tokens: np.ndarray,
    token: np.int64,
    none: np.int64,
    kept_rows: np.ndarray,
    kept_tokens: np.ndarray,
    moved_rows: np.ndarray,
    moved_next: np.ndarray,
) -> int:
    """Fill ``kept_rows``/``kept_tokens`` with the pairs without ``token``'s (sized for exactly
    those), ``moved_rows`` with the rows it was the first pair of and ``moved_next`` with each
    such row's next pair's token (``none`` where the row has no other pair), both sized for
    ``token``'s pairs; returns how many rows moved. ``ValueError`` when the sizes are not
    ``token``'s pair count (nothing is written past them)."""
    n, dropped = pair_rows.size, moved_rows.size
    if (
        kept_rows.size != n - dropped
        or kept_tokens.size != n - dropped
        or moved_next.size != dropped
    ):
        raise ValueError("drop_request: output arrays of the wrong size")
    kept = moved = 0
    for i in range(n):
        if pair_tokens[i] != token:
            if kept == kept_rows.size:
                raise ValueError("drop_request: the request has fewer pairs than its rows")
            kept_rows[kept], kept_tokens[kept] = pair_rows[i], pair_tokens[i]
            kept += 1
        elif i == 0 or pair_rows[i - 1] != pair_rows[i]:  # the row's earliest request
            if moved == dropped:
                raise ValueError("drop_request: the request has more pairs than its rows")
            moved_rows[moved] = pair_rows[i]
            following = i + 1 < n and pair_rows[i + 1] == pair_rows[i]
            moved_next[moved] = pair_tokens[i + 1] if following else none
            moved += 1
    if kept != kept_rows.size:
        raise ValueError("drop_request: the request has more pairs than its rows")
    return moved

"""Pinned rows plus an LRU segment, one lookup at a time, compiled: the per-request fast path.

This is the shape of a ``zipf-tuned`` (or ``static+lru``) tier: rows pinned for good, and LRU over
the rest of the slots. :func:`pinned_lru_misses` counts such a tier's misses over a trace at numba
speed (tens of millions of lookups per second), so a design sweep over a 20M-lookup trace runs the
library's own policy rather than a copy. It decides exactly as the store's cache code
(``RowCache`` with ``static+lru``) replayed at one lookup per batch (``tests/test_replay.py``).
"""

from __future__ import annotations

import numba
import numpy as np

from .errors import PolicyError, check_int_option
from .offline import next_use_index

NEVER = -(1 << 60)  # "missed long ago": the last miss of a row that never missed
LOOKAHEAD_PASSES = 256  # least recent rows an eviction with ``lookahead`` may pass over


def trace_ids(ids: np.ndarray, rows: int, caller: str, per_row: str) -> np.ndarray:
    """``ids`` as flat contiguous int64 (a record's ``[batch, seq, heads]`` in request order), or
    a PolicyError naming ``caller`` if they are not integers or one is outside ``[0, rows)``
    (``per_row``: what the caller keeps per row, for the message), named as given (a uint64
    past int64 is not wrapped negative)."""
    given = np.asarray(ids).reshape(-1)
    if given.dtype.kind not in "iu" and given.size:  # a cast truncated 1.5 and 1.7 to row 1
        raise PolicyError(
            f"{caller} ids: got dtype {given.dtype}; expected integer row ids in [0, {rows})"
        )
    if given.size and (int(given.min()) < 0 or int(given.max()) >= rows):
        raise PolicyError(
            f"{caller} ids: got ids in [{int(given.min())}, {int(given.max())}]; "
            f"expected row ids in [0, {rows}) ({per_row})"
        )
    return np.ascontiguousarray(given, dtype=np.int64)


def pinned_lru_misses(
    ids: np.ndarray,
    pinned: np.ndarray,
    lru_rows: int,
    *,
    admit: np.ndarray | None = None,
    readmit_window: int = 0,
    lookahead: int = 0,
) -> int:
    """Misses of a tier that pins ``pinned`` rows and runs LRU on ``lru_rows`` more, per request.

    Parameters
    ----------
    ids : ndarray of int
        Row ids in request order, each in ``[0, pinned.size)`` (any shape, read flat: a trace
        record's ``[batch, seq, heads]``).
    pinned : ndarray of bool
        One flag per table row: True for a row held from the start and never evicted (always a
        hit). Its length is the table's rows.
    lru_rows : int
        Slots of the LRU segment (>= 0); every missed row enters it, evicting the least recent.
    admit : ndarray of bool, optional
        An admission experiment (the store's policies have no such filter): one flag per table
        row; a missed row whose flag is False enters the segment only if it also missed within
        the last ``readmit_window`` lookups. None (default) admits every miss, as the store does.
    readmit_window : int
        Lookups within which a second miss admits a row that ``admit`` refuses (0: never).
    lookahead : int
        A what-if for prefill, where a request's row ids are known before it is served (Engram's
        ids depend only on the tokens): the lookups ahead the tier knows (0, the default and the
        store's behaviour: none). Eviction passes over the least recent rows that are looked up
        again within the next ``lookahead`` lookups (moving them to the front) and evicts the
        least recent row that is not; it passes over at most ``LOOKAHEAD_PASSES`` (256) rows
        and then evicts the row it stopped at (or the least recent, when there are no more).

    Returns
    -------
    int
        Lookups that were neither pinned nor resident in the LRU segment.

    Examples
    --------
    >>> pinned = np.zeros(10, dtype=bool); pinned[7] = True
    >>> ids = np.array([7, 1, 2, 1, 3, 2, 7, 1])
    >>> pinned_lru_misses(ids, pinned, lru_rows=2)  # 7 pinned; 1 hits once, 3 evicts 2, 2 evicts 1
    5
    >>> pinned_lru_misses(ids, pinned, lru_rows=2, admit=np.zeros(10, dtype=bool))  # admit none
    6
    """
    pinned = np.asarray(pinned)
    if pinned.ndim != 1 or pinned.dtype != np.bool_:
        raise PolicyError(
            f"pinned_lru_misses pinned: got {pinned.dtype} of shape {pinned.shape}; "
            "expected a 1-D bool array, one flag per table row"
        )
    ids = trace_ids(ids, pinned.size, "pinned_lru_misses", "one pinned flag per row")
    lru_rows, readmit_window, lookahead = (  # int() took 1.5 rows as 1, True as 1
        check_int_option("pinned_lru_misses", option, value, None)
        for option, value in (
            ("lru_rows", lru_rows),
            ("readmit_window", readmit_window),
            ("lookahead", lookahead),
        )
    )
    if lru_rows < 0 or readmit_window < 0 or lookahead < 0:
        raise PolicyError(
            f"pinned_lru_misses: got lru_rows={lru_rows}, readmit_window={readmit_window}, "
            f"lookahead={lookahead}; expected all >= 0"
        )
    if admit is not None:
        admit = np.asarray(admit)
        if admit.shape != pinned.shape or admit.dtype != np.bool_:
            raise PolicyError(
                f"pinned_lru_misses admit: got {admit.dtype} of shape {admit.shape}; "
                f"expected bool of shape {pinned.shape}, like pinned"
            )
    admit_all = admit is None
    flags = pinned[:0] if admit_all else admit  # unused when admit_all
    upcoming = next_use_index(ids, pinned.size) if lookahead else ids[:0]
    return int(
        _misses(ids, pinned, lru_rows, flags, admit_all, readmit_window, upcoming, lookahead)
    )


@numba.njit(cache=True)
def _misses(ids, pinned, lru_rows, admit, admit_all, readmit_window, upcoming, lookahead):
    """The kernel: a doubly linked list over row ids, most recent at the head."""
    rows = pinned.size
    prev = np.full(rows, -1, np.int64)
    nxt = np.full(rows, -1, np.int64)
    resident = np.zeros(rows, np.bool_)
    last_miss = np.full(rows if not admit_all else 0, NEVER, np.int64)
    next_use = np.zeros(rows if lookahead else 0, np.int64)  # of a resident row
    head = tail = -1
    size = misses = 0
    for t in range(ids.size):
        r = ids[t]
        if pinned[r]:
            continue
        if lookahead:
            next_use[r] = upcoming[t]
        if resident[r]:
            if r != head:  # move to the front
                p, q = prev[r], nxt[r]
                nxt[p] = q
                if q != -1:
                    prev[q] = p
                else:
                    tail = p
                prev[r], nxt[r], prev[head], head = -1, head, r, r
            continue
        misses += 1
        if lru_rows <= 0:
            continue
        if not admit_all:
            seen, last_miss[r] = last_miss[r], t
            if not admit[r] and t - seen > readmit_window:
                continue
        if size >= lru_rows:  # evict the tail
            for _ in range(min(size, LOOKAHEAD_PASSES) if lookahead and size > 1 else 0):
                v = tail
                if next_use[v] > t + lookahead:
                    break
                tail = prev[v]
                nxt[tail] = -1
                prev[v], nxt[v], prev[head], head = -1, head, v, v
            v = tail
            tail = prev[v]
            if tail != -1:
                nxt[tail] = -1
            else:
                head = -1
            resident[v] = False
            size -= 1
        resident[r], prev[r], nxt[r] = True, -1, head
        if head != -1:
            prev[head] = r
        head = r
        if tail == -1:
            tail = r
        size += 1
    return misses

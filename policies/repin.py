"""Pinned rows that follow the traffic: a pinned segment re-chosen every interval, plus LRU.

``zipf-tuned`` pins the rows an offline profile ranks highest and never changes them. Here the
pinned segment is re-chosen every ``interval`` lookups from a score that adds what the store has
seen while serving to the offline profile's prior:

    score(row) = prior_weight * prior(row) + online(row)

``online`` counts the row's *episodes* as the tier sees them, with no per-row clock: a lookup
starts an episode when it misses the tier (the recency segment covers one window, so a row that
misses has not been looked up for about that long), or when it hits a pinned row idle for more
than ``episode_window`` lookups (a clock per pinned slot). Counts are multiplied by ``decay`` at
every re-pin, so rows that stop being looked up age out. At most ``budget`` rows move per
re-pin (the lowest-scored pinned rows make room for the highest-scored unpinned ones), so a
re-pin never stalls lookups on a flood of reads. A row moved in is read in the background: it is
not a miss, and :func:`repinned_lru_misses` reports those reads apart.

With ``prior_weight = 0`` and no initial pins this is the online-only policy (no offline
profile): the tier starts as plain LRU over its recency segment and pins what it learns.

:func:`repinned_lru_misses` counts such a tier's misses per request at numba speed, with exact
per-row counters standing in for the store's bounded counter (a count-min sketch plus the
heavy-hitter candidates), so the design can be swept on 20M-lookup traces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from .errors import PolicyError, check_int_option
from .pinned_lru import NEVER, trace_ids


@dataclass(frozen=True)
class RepinResult:
    """Misses of a re-pinning tier over a trace, and the rows its re-pins read."""

    lookups: int
    misses: int
    repin_reads: int  # rows read from cold to be pinned (background, not misses)
    repins: int
    misses_after: tuple[int, ...]  # misses from each ``report_from`` position on

    @property
    def miss_ratio(self) -> float:
        """Misses per lookup."""
        return self.misses / self.lookups if self.lookups else 0.0


def repinned_lru_misses(
    ids: np.ndarray,
    prior: np.ndarray,
    pinned_rows: int,
    lru_rows: int,
    *,
    interval: int = 1 << 20,
    budget: int | None = None,
    prior_weight: float = 1.0,
    decay: float = 1.0,
    episode_window: int = 65_536,
    initial: np.ndarray | None = None,
    report_from: tuple[int, ...] = (),
) -> RepinResult:
    """Per-request misses of a tier of ``pinned_rows`` re-pinned rows plus ``lru_rows`` of LRU.

    Parameters
    ----------
    ids : ndarray of int
        Row ids in request order, each in ``[0, prior.size)`` (any shape, read flat).
    prior : ndarray of float
        The offline profile's score per table row (e.g. episodes); zeros for none.
    pinned_rows, lru_rows : int
        Slots of the pinned segment and of the LRU segment.
    interval : int
        Lookups between re-pins.
    budget : int, optional
        Rows moved into the pinned segment per re-pin at most (default: ``pinned_rows``).
    prior_weight : float
        Weight of ``prior`` against the episodes counted online.
    decay : float
        Factor applied to the online counts at every re-pin (1: never forget).
    episode_window : int
        Idle lookups after which a hit on a pinned row starts a new episode.
    initial : ndarray of int, optional
        Rows pinned at the start, each in ``[0, prior.size)``, the first ``pinned_rows`` of them
        (default: the top ``pinned_rows`` by ``prior_weight * prior``, rows with a zero score left
        out).
    report_from : tuple of int
        Positions in ``ids``; the result also counts the misses from each of them on.

    Examples
    --------
    >>> prior = np.zeros(10); prior[7] = 5.0
    >>> ids = np.array([7, 1, 2, 1, 3, 2, 7, 1] * 4)
    >>> r = repinned_lru_misses(ids, prior, pinned_rows=1, lru_rows=2, interval=8)
    >>> r.misses, r.repins
    (14, 3)
    >>> online = repinned_lru_misses(ids, prior, 1, 2, interval=8, prior_weight=0.0)  # no prior
    >>> online.misses, online.repin_reads  # it pins a row the LRU segment holds: nothing read
    (17, 0)
    """
    prior = np.asarray(prior, dtype=np.float64)
    rows = prior.size
    ids = trace_ids(ids, rows, "repinned_lru_misses", "one prior score per row")
    pinned_rows, lru_rows, interval, budget = (  # int() took a budget of 1.5 rows as 1; 2.5
        None if value is None else check_int_option("repinned_lru_misses", option, value, None)
        for option, value in (  # pinned rows was a bare TypeError, True one row
            ("pinned_rows", pinned_rows),
            ("lru_rows", lru_rows),
            ("interval", interval),
            ("budget", budget),
        )
    )
    budget = pinned_rows if budget is None else budget
    if min(pinned_rows, lru_rows, budget) < 0 or interval <= 0:
        raise PolicyError(
            f"repinned_lru_misses: got pinned_rows={pinned_rows}, lru_rows={lru_rows}, "
            f"interval={interval}, budget={budget}; expected rows and budget >= 0 and "
            "interval > 0"
        )
    # NaN fails every comparison: these are written so that it is refused too
    if not (0 < decay <= 1 and 0 <= prior_weight < math.inf and episode_window >= 0):
        raise PolicyError(
            f"repinned_lru_misses: got decay={decay}, prior_weight={prior_weight}, "
            f"episode_window={episode_window}; expected decay in (0, 1], a finite "
            "prior_weight >= 0 and episode_window >= 0"
        )
    bad = ~(np.isfinite(prior) & (prior >= 0))
    if bad.any():  # a NaN score ranks nowhere: its row would never be pinned, nor said why
        row = int(np.argmax(bad))
        raise PolicyError(
            f"repinned_lru_misses: prior[{row}] = {prior[row]} ({int(bad.sum()):,} such rows); "
            "expected finite scores >= 0 (a profile's episodes or lookups)"
        )
    pinned = np.zeros(rows, np.bool_)
    if initial is None:
        score = prior_weight * prior
        initial = np.argsort(-score, kind="stable")[:pinned_rows]
        initial = initial[score[initial] > 0]
    initial = trace_ids(initial, rows, "repinned_lru_misses initial", "one prior score per row")
    pinned[initial[:pinned_rows]] = True
    state = _LruState.empty(rows)
    online = np.zeros(rows, np.float64)
    last_pinned = np.full(rows, NEVER, np.int64)
    misses = reads = repins = 0
    after = [0] * len(report_from)
    for start in range(0, ids.size, interval):
        chunk = ids[start : start + interval]
        chunk_misses = _run_chunk(
            chunk, start, pinned, lru_rows, state.arrays, state.ends, online, last_pinned,
            episode_window,
        )  # fmt: skip
        misses += chunk_misses.sum()
        for i, pos in enumerate(report_from):
            after[i] += int(chunk_misses[max(0, pos - start) :].sum())
        if start + interval >= ids.size:
            break
        reads += _repin(pinned, pinned_rows, prior_weight * prior + online, budget, state)
        online *= decay
        repins += 1
    return RepinResult(int(ids.size), int(misses), int(reads), repins, tuple(after))


@dataclass
class _LruState:
    """The LRU segment's linked list over row ids, kept across chunks."""

    arrays: np.ndarray  # [3, rows]: prev, next, resident flag
    ends: np.ndarray  # head, tail, size

    @classmethod
    def empty(cls, rows: int) -> _LruState:
        """No row resident."""
        arrays = np.full((3, rows), -1, np.int64)
        arrays[2] = 0
        return cls(arrays, np.array([-1, -1, 0], np.int64))


def _repin(pinned: np.ndarray, k: int, score: np.ndarray, budget: int, state: _LruState) -> int:
    """Make the pinned set (at most ``k`` rows) closer to the top ``k`` by ``score``, moving at
    most ``budget`` rows in; returns rows read from cold."""
    if k == 0 or budget == 0:
        return 0
    top = np.argpartition(-score, k - 1)[:k] if k < score.size else np.arange(score.size)
    top = top[score[top] > 0]
    incoming = top[~pinned[top]]
    incoming = incoming[np.argsort(-score[incoming], kind="stable")][:budget]
    current = np.flatnonzero(pinned)
    excess = max(0, current.size + incoming.size - k)
    outgoing = current[np.argsort(score[current], kind="stable")][:excess]
    pinned[outgoing] = False
    pinned[incoming] = True
    return int(_drop_from_lru(incoming, *state.arrays, state.ends))


@numba.njit(cache=True)
def _drop_from_lru(rows, prev, nxt, resident, ends):
    """Unlink newly pinned rows from the LRU segment; returns how many were not resident."""
    head, tail, size = ends[0], ends[1], ends[2]
    reads = 0
    for r in rows:
        if resident[r] != 1:
            reads += 1
            continue
        p, q = prev[r], nxt[r]
        if p != -1:
            nxt[p] = q
        else:
            head = q
        if q != -1:
            prev[q] = p
        else:
            tail = p
        resident[r] = 0
        size -= 1
    ends[0], ends[1], ends[2] = head, tail, size
    return reads


@numba.njit(cache=True)
def _run_chunk(ids, t0, pinned, lru_rows, arrays, ends, online, last_pinned, window):
    """Serve one chunk; returns a 0/1 miss flag per lookup and counts online episodes."""
    prev, nxt, resident = arrays[0], arrays[1], arrays[2]
    head, tail, size = ends[0], ends[1], ends[2]
    missed = np.zeros(ids.size, np.int8)
    for i in range(ids.size):
        r = ids[i]
        t = t0 + i
        if pinned[r]:
            if t - last_pinned[r] > window:
                online[r] += 1.0
            last_pinned[r] = t
            continue
        if resident[r] == 1:
            if r != head:
                p, q = prev[r], nxt[r]
                nxt[p] = q
                if q != -1:
                    prev[q] = p
                else:
                    tail = p
                prev[r], nxt[r], prev[head], head = -1, head, r, r
            continue
        missed[i] = 1
        online[r] += 1.0
        last_pinned[r] = t
        if lru_rows <= 0:
            continue
        if size >= lru_rows:
            v = tail
            tail = prev[v]
            if tail != -1:
                nxt[tail] = -1
            else:
                head = -1
            resident[v] = 0
            size -= 1
        resident[r], prev[r], nxt[r] = 1, -1, head
        if head != -1:
            prev[head] = r
        head = r
        if tail == -1:
            tail = r
        size += 1
    ends[0], ends[1], ends[2] = head, tail, size
    return missed

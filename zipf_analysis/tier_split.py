"""Tier sizing across both cache tiers: the hot/warm split that minimises the modelled stall
under a GPU and a host memory budget, from one read of a trace.

How the tiers interact (:class:`tiered_store.cache_plan.CacheHierarchy`): every lookup probes
hot; the batch's distinct hot misses probe warm; rows read from cold enter warm, and every hot
miss (warm hit or cold read) enters hot. Hot never demotes its victims into warm and warm keeps
rows that moved up, so the hierarchy is neither inclusive nor exclusive: under LRU, **hot is an
LRU over the whole stream and warm is an LRU over hot's miss stream**. Hot's hits at every
capacity come from one pass of stack distances; warm's depend on hot's capacity (a bigger hot
tier thins the stream warm sees), so each candidate hot capacity gets one more stack pass over
its own miss stream, which is held in memory (no second read of the trace) and shorter than the
trace by hot's hit ratio. The result is exact for LRU tiers, not an approximation from
``misses(hot + warm)``, which would hold for an exclusive hierarchy only.

``zipf-tuned`` tiers (a ``profile``, fixed pins, an LRU recency segment; see
:mod:`zipf_analysis.tier_models`) are modelled as the store builds them at every candidate
capacity: a lookup of a row hot pins (the profile's first ``P_h(h)`` rows by episodes) is a hot
hit; hot's recency segment is an LRU of ``h - P_h(h)`` rows over the lookups of rows it does not
pin; hot's misses of rows warm pins (the next ``P_w(w)`` of the ranking, hot's pins skipped) are
warm hits, and warm's recency segment is an LRU of ``w - P_w(w)`` rows over the rest of hot's
misses. Pinned hits come from each row's rank (vectorised); each recency segment's from a stack
pass over its own substream, which changes with the pins: one pass per hot candidate (where hot
is zipf-tuned) and one per (hot, warm) candidate pair (where warm is), see :func:`split_grid`.
The recency segment's size ``R(c)`` is half the tier up to twice one ``recency_window``'s
distinct rows and constant above, but the pins still grow with ``c``, so constant ``R`` alone
saves no pass (one pass per ``R`` would need each event's ``R``-th largest rank among the rows
used since its row's last use: not done). Substreams shrink as pins grow, and one that pins
leave empty needs no pass. Either tier may be LRU and the other zipf-tuned; other policies are modelled as LRU, and
the recommendation's ``notes`` say so.

Granularity: the store's batches, as :func:`zipf_analysis.replay.replay` counts them (the trace's
own batches, or ``batch_tokens`` groups). The cost model is per batch (a row missed twice in a
batch is read once, one NVMe latency per batch, the stall is ``max(0, fetch - compute)`` per
batch), so per-request distances would misprice it. An LRU tier stamps a whole batch at once and
orders a batch's rows by slot; the model orders them by lookups in the batch (most used newest),
which is also what a tier does with a batch of more distinct misses than it holds (it keeps the
most used). That order is the only difference from a replay: none per request
(``batch_tokens=1``: the figures are equal), under 1% of the modelled stall on the text trace
``tests/test_tier_split.py`` replays at the trace's own batches.

The model holds the table's (batch, row, lookups) triples in memory, 24 bytes per distinct row of
each batch (plus a stack pass's 4 bytes per distinct row and its time axis), and while it prices
one hot candidate, per-batch counters and costs at every warm candidate, about 50 bytes per
(batch, warm candidate): little at the trace's own batches, but the most of it per request
(``batch_tokens=1``: about 1 KB per lookup with the default 18 warm candidates, 1.1 GB for 1M
lookups; :func:`split_grid` refuses a grid whose counters alone take more than the host RAM
available, ``MemAvailable``, and :func:`recommend_split` with ``batch_tokens`` before it reads the
trace). Traces that fit in RAM, as for :func:`zipf_analysis.replay.replay_offline`.

Memory counted against a budget: each tier's payload (rows x row bytes) plus its metadata, as
:meth:`tiered_store.row_cache.RowCache.metadata_bytes` counts it (slot owner, flags and free list,
the eviction policy's key, e.g. the LRU clock of an LRU or zipf-tuned tier, and such a tier's
victim buffer at its most, 16 B per slot; the row index: dense
per table row or hashed per slot, ``tiers.*.index``; the admission filter's, e.g. a ``+tinylfu``
tier's sketch, sized by the tier; a zipf-tuned tier's online re-pin state, where it re-pins
online: a count and stamp per slot and a sketch, :class:`tiered_store.online_repin.OnlineRepin`).

Examples
--------
>>> from zipf_analysis.tier_split import recommend_split
>>> rec = recommend_split(config, "trace.trace", gpu_budget="8GiB", host_budget="64GiB")  # doctest: +SKIP
>>> rec.hot_rows, rec.warm_rows, rec.stall_seconds                                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policies.registry import ADMISSION
from tiered_store.capacity import available_host_memory, format_bytes, parse_bytes
from tiered_store.config import CostModelConfig, StoreConfig
from tiered_store.errors import ConfigError, LimitError
from tiered_store.integers import as_integer
from tiered_store.online_repin import OnlineRepin
from tiered_store.row_cache import SLOT_BYTES, eviction_slot_bytes
from tiered_store.row_index import index_bytes
from tiered_store.trace import TraceReader

from . import mrc_kernels as kernels
from .mrc import MAX_ROW_INDEX, MIN_TIME_CAPACITY, compact_time_axis, time_axis, time_capacity
from .replay import (
    batch_fetch_seconds,
    check_row_ids,
    profile_layouts,
    require_lookups,
    table_geometry,
)
from .tier_models import PinRanks, TierModel, tier_models

__all__ = [
    "BatchEvents",
    "SplitGrid",
    "SplitRecommendation",
    "batch_events",
    "batched_stack_distances",
    "max_capacity",
    "parse_budget",
    "parse_budgets",
    "recommend_split",
    "split_grid",
    "tier_bytes",
]

DEFAULT_POINTS = 16  # candidate capacities per tier (plus 0 and the budget's largest)
_CELL_BYTES = 50  # split_grid's peak per (batch, warm candidate) as it prices a hot one (measured)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def parse_budget(text: str | int, *, flag: str) -> int:
    """A memory budget in bytes from ``'8GiB'``, ``'512MB'``, a plain number of bytes or ``0``;
    errors name ``flag``.

    Examples
    --------
    >>> parse_budget("8GiB", flag="--gpu-budget"), parse_budget("0", flag="--gpu-budget")
    (8589934592, 0)
    >>> parse_budget("400297", flag="--gpu-budget")  # as the too-small error states a minimum
    400297
    >>> parse_budget("lots", flag="--host-budget")
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: --host-budget: got 'lots'; expected a byte size like '8GiB', '512MB' or 0
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if isinstance(text, str) and text.strip().isascii() and text.strip().isdigit():
        return int(text)
    try:
        return parse_bytes(str(text))
    except ConfigError:
        raise ConfigError(
            f"{flag}: got {text!r}; expected a byte size like '8GiB', '512MB' or 0"
        ) from None


def parse_budgets(gpu: str | int | None, host: str | int | None) -> tuple[int, int] | None:
    """``--gpu-budget`` and ``--host-budget`` in bytes; None when neither is given. One without the
    other, or one that is not a byte size, is an error naming the flag.

    Examples
    --------
    >>> parse_budgets("1GiB", 0), parse_budgets(None, None)
    ((1073741824, 0), None)
    >>> parse_budgets("1GiB", None)
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: --host-budget: not given; expected it with --gpu-budget (a byte size like '8GiB', or 0)
    """
    if gpu is None and host is None:
        return None
    if gpu is None or host is None:
        given, missing = (
            ("--gpu-budget", "--host-budget") if host is None else ("--host-budget", "--gpu-budget")
        )
        raise ConfigError(
            f"{missing}: not given; expected it with {given} (a byte size like '8GiB', or 0)"
        )
    return parse_budget(gpu, flag="--gpu-budget"), parse_budget(host, flag="--host-budget")


def tier_bytes(
    capacity: int,
    *,
    rows: int,
    row_bytes: int,
    index: str = "auto",
    policy: str | None = "lru",
    admission: str = "all",
    repin: int | None = None,
) -> int:
    """Bytes a cache tier of ``capacity`` rows takes: payload plus the metadata a ``RowCache``
    keeps (per slot: owner, flags, free list, the eviction policy's key and, for a policy whose
    keys only grow (LRU), its victim buffer at its most, a hashed index's entries;
    per table row: a dense index; the admission filter's, e.g. a TinyLFU sketch sized by the
    tier; a zipf-tuned tier's online re-pin state). ``policy``: the eviction policy (a
    ``PolicySpec.eviction``; None: none, as ``static``); ``admission``: the filter (a
    ``PolicySpec.admission``); ``repin``: the ``repin.sketch_width`` of a tier that re-pins
    online (a count and stamp per slot and a sketch:
    :meth:`tiered_store.online_repin.OnlineRepin.bytes_for`, priced as on the CPU, where a plan's
    key adds 2 B a slot), None for one that does not. An empty tier takes nothing.

    Examples
    --------
    >>> tier_bytes(1000, rows=100_000, row_bytes=256)   # 256 B payload + 41 B per slot, 4 B per table row
    697000
    >>> tier_bytes(1000, rows=100_000, row_bytes=256, admission="tinylfu")  # + 8 x 8,192 B sketch
    762536
    >>> tier_bytes(1000, rows=100_000, row_bytes=256, repin=2)  # + 10 B per slot, 32,768 B sketch
    739768
    >>> tier_bytes(0, rows=100_000, row_bytes=256)
    0
    """
    if capacity <= 0:
        return 0
    idx = index_bytes(index, rows, capacity)
    filt = ADMISSION[admission].bytes_for(capacity)
    online = OnlineRepin.bytes_for(capacity, repin) if repin else {"per_slot": 0, "per_tier": 0}
    policy_bytes = eviction_slot_bytes(policy)  # with a victim buffer, at its most
    per_slot = row_bytes + SLOT_BYTES + policy_bytes + idx["per_slot"] + online["per_slot"]
    per_row = idx["per_table_row"] + filt["per_table_row"]
    per_tier = filt["per_tier"] + online["per_tier"]
    return int(np.ceil(capacity * per_slot + rows * per_row + per_tier))


def max_capacity(
    budget: int,
    *,
    rows: int,
    row_bytes: int,
    index: str = "auto",
    flag: str = "budget",
    policy: str | None = "lru",
    admission: str = "all",
    repin: int | None = None,
) -> int:
    """The most rows (at most the table's) whose tier fits in ``budget`` bytes; 0 for a zero
    budget. A positive budget too small for one row is an error naming ``flag``.

    Examples
    --------
    >>> max_capacity(697_000, rows=100_000, row_bytes=256)
    1000
    >>> max_capacity(1000, rows=100_000, row_bytes=256, flag="--gpu-budget")
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: --gpu-budget: 1000 bytes (1000 B) holds no row of this table; expected at least 400297 bytes (390.9 KiB: one 256-byte row and the tier's metadata, 400,000 of them a dense index over the table's 100,000 rows), or 0 for no tier
    """
    if budget <= 0:
        return 0
    size = {
        "rows": rows,
        "row_bytes": row_bytes,
        "index": index,
        "policy": policy,
        "admission": admission,
        "repin": repin,
    }
    need = tier_bytes(1, **size)
    if budget < need:
        fixed = int(rows * index_bytes(index, rows, 1)["per_table_row"])
        dense = f", {fixed:,} of them a dense index over the table's {rows:,} rows" if fixed else ""
        raise ConfigError(
            f"{flag}: {budget} bytes ({format_bytes(budget)}) holds no row of this table; expected "
            f"at least {need} bytes ({format_bytes(need)}: one {row_bytes}-byte row and the tier's "
            f"metadata{dense}), or 0 for no tier"
        )
    lo, hi = 1, rows  # bytes grow with capacity (see tiered_store.row_index: auto goes dense
    while lo < hi:  # only where dense costs more), so bisect
        mid = (lo + hi + 1) // 2
        if tier_bytes(mid, **size) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------------------------
# One read of the trace: per batch, its distinct rows and how often each was looked up
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchEvents:
    """A table's trace as the store's tiers see it: each batch's distinct rows and their lookups
    in the batch, least used first (the order the model stamps a batch in; ties by row id). Row
    ids are renumbered densely in id order."""

    starts: np.ndarray  # [batches + 1] int64: batch k's events are starts[k]:starts[k + 1]
    rows: np.ndarray  # [events] int64, dense row index
    counts: np.ndarray  # [events] int64, lookups of the row in its batch
    lookups: int
    ids: np.ndarray | None = None  # [distinct rows] int64: the table row id of each dense index

    @property
    def batches(self) -> int:
        """Batches in the trace (as replay counts them)."""
        return self.starts.size - 1

    @property
    def batch_of(self) -> np.ndarray:
        """The batch of each event."""
        return np.repeat(np.arange(self.batches), np.diff(self.starts))


def batch_events(
    reader: TraceReader, table: str | int = 0, batch_tokens: int | None = None
) -> BatchEvents:
    """Read one table of a trace once into :class:`BatchEvents`, batched as
    :func:`zipf_analysis.replay.replay` batches it (the trace's own batches, records of one batch
    joined, or groups of ``batch_tokens`` tokens x heads ids; ``1``: one lookup per batch)."""
    index = reader.table_index(table)
    size = _batch_size(reader.layout[index], batch_tokens)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    carry_ids = carry_bids = np.empty(0, dtype=np.int64)
    n_batches = lookups = 0
    for ids, bids, batches_so_far in _tagged_chunks(reader, index, size):
        ids, bids = np.concatenate([carry_ids, ids]), np.concatenate([carry_bids, bids])
        n_batches, lookups = batches_so_far, lookups + ids.size - carry_ids.size
        if ids.size == 0:
            continue
        cut = int(np.searchsorted(bids, bids[-1]))  # the last batch may go on in the next chunk
        if cut > 0:
            parts.append(_dedup(ids[:cut], bids[:cut]))
        carry_ids, carry_bids = ids[cut:], bids[cut:]
    if carry_ids.size:
        parts.append(_dedup(carry_ids, carry_bids))
    if parts:
        bid, rows, counts = (np.concatenate(p) for p in zip(*parts, strict=True))
    else:
        bid = rows = counts = np.empty(0, dtype=np.int64)
    ids, dense = np.unique(rows, return_inverse=True)
    starts = np.concatenate([[0], np.cumsum(np.bincount(bid, minlength=n_batches))])
    return BatchEvents(
        starts.astype(np.int64), dense.astype(np.int64), counts, lookups, ids.astype(np.int64)
    )


def _batch_size(layout: dict[str, Any], batch_tokens: int | None) -> int | None:
    """Lookups of the table a batch groups (None: the trace's own batches), as replay batches."""
    if batch_tokens is not None and (as_integer(batch_tokens) is None or batch_tokens < 1):
        raise ConfigError(  # 2.5 died in numpy's cast, True was batches of one lookup
            f"batch_tokens: got {batch_tokens!r}; expected a positive number of tokens"
        )
    heads = layout.get("heads") or 1  # checked by the reader: an integer >= 1, or none
    return None if batch_tokens is None else (1 if batch_tokens == 1 else batch_tokens * heads)


def _tagged_chunks(
    reader: TraceReader, index: int, size: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Each chunk's ids of the table with their batch number (consecutive from 0), and the
    batches begun so far."""
    pos = 0
    prev, runs = None, 0
    for chunk in reader.chunks():
        ids = chunk.table_ids(index)
        if size is not None:
            bids = (pos + np.arange(ids.size, dtype=np.int64)) // size
            pos += ids.size
            yield ids, bids, -(-pos // size)
            continue
        recs = chunk.records[chunk.records[:, 1] == index]
        if recs.shape[0] == 0:
            continue
        batch = recs[:, 0]
        new = np.concatenate([[prev is None or batch[0] != prev], batch[1:] != batch[:-1]])
        run = runs + np.cumsum(new) - 1
        prev, runs = batch[-1], int(run[-1]) + 1
        yield ids, np.repeat(run, recs[:, 2]), runs


def _dedup(ids: np.ndarray, bids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, row, lookups) per distinct row of each batch; in a batch, least used first."""
    order = np.lexsort((ids, bids))
    b, r = bids[order], ids[order]
    first = np.concatenate([[True], (b[1:] != b[:-1]) | (r[1:] != r[:-1])])
    at = np.flatnonzero(first)
    counts = np.diff(np.concatenate([at, [b.size]])).astype(np.int64)
    b, r = b[at], r[at]
    order = np.lexsort((r, counts, b))  # in a batch: least used first (see BatchEvents)
    return b[order], r[order], counts[order]


def batched_stack_distances(rows: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Batched LRU stack distance of every event (0: first use): an LRU tier of C rows, stamped a
    batch at once, holds the row when the batch begins iff ``0 < distance <= C``. ``rows``: 1-D
    integer dense row numbers (0 to 2**31 - 1), batch k's distinct rows at
    ``rows[starts[k]:starts[k + 1]]``; ``starts``: 1-D integer, from 0 to ``rows.size``.

    Examples
    --------
    >>> # batches {0, 1}, {2}, {0}, {1, 2}: row 0 comes back after rows 1 and 2 were used
    >>> batched_stack_distances(np.array([0, 1, 2, 0, 1, 2]), np.array([0, 2, 3, 4, 6])).tolist()
    [0, 0, 0, 3, 3, 2]
    """
    rows, starts = _checked_batches(np.asarray(rows), np.asarray(starts))
    out = np.zeros(rows.size, dtype=np.int64)
    if rows.size == 0:
        return out
    widest = int(np.diff(starts).max())
    last = np.zeros(int(rows.max()) + 1, dtype=np.int32)
    state = np.zeros(2, dtype=np.int64)
    axis = time_axis(max(MIN_TIME_CAPACITY, time_capacity(widest)))
    k, n_batches = 0, starts.size - 1
    while True:
        k = kernels.lru_batch_pass(rows, starts, k, last, *axis, state, out)
        if k >= n_batches:
            return out
        room = int(starts[k + 1] - starts[k])  # the next batch is stamped at once
        axis, state[0] = compact_time_axis(last, axis, int(state[0]), room)


def _checked_batches(rows: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` and ``starts`` as contiguous int64; refuses batch bounds that do not cover ``rows``
    in order, negative rows, and arrays that are not 1-D integers (the kernel indexes without
    bounds checks; a cast would truncate floats)."""
    for name, a in (("rows", rows), ("starts", starts)):
        if a.ndim != 1:
            raise ValueError(f"{name} of shape {a.shape}; expected a 1-D array")
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"{name} of dtype {a.dtype}; expected integers")
    if starts.size == 0:
        raise ValueError(f"starts is empty; expected batch bounds from 0 to {rows.size}")
    if starts[0] != 0:
        raise ValueError(f"starts begins at {int(starts[0])}; expected 0")
    if starts[-1] != rows.size:
        raise ValueError(
            f"starts ends at {int(starts[-1])}; expected {rows.size}, the events given"
        )
    falls = np.flatnonzero(starts[1:] < starts[:-1])  # no diff: it wraps on unsigned bounds
    if falls.size:
        k = int(falls[0])
        raise ValueError(
            f"starts falls from {int(starts[k])} to {int(starts[k + 1])} at batch {k}; expected "
            "non-decreasing batch bounds"
        )
    if rows.size and rows.min() < 0:
        raise ValueError(f"rows holds {int(rows.min())}; expected dense row numbers >= 0")
    if rows.size and rows.max() > MAX_ROW_INDEX:  # the time axis keeps each time's row as int32
        raise LimitError(
            f"rows holds {int(rows.max())}; expected dense row numbers up to {MAX_ROW_INDEX:,}"
        )
    return np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(starts, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Every (hot, warm) pair
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitGrid:
    """Modelled counters at every (hot, warm) capacity pair: arrays of shape [hot, warm].

    ``hot_hits`` and ``warm_hits`` count lookups (duplicates in a batch included), as the tiers'
    counters do; ``device_rows`` and ``cold_reads`` count distinct rows per batch, summed, as
    replay's ``rows_moved`` does."""

    hot: np.ndarray
    warm: np.ndarray
    lookups: int
    batches: int
    hot_hits: np.ndarray
    warm_hits: np.ndarray
    device_rows: np.ndarray
    cold_reads: np.ndarray
    fetch_seconds: np.ndarray
    stall_seconds: np.ndarray
    widest_batch: int = 0  # most distinct rows in one batch
    stack_passes: int = 0  # stack-distance passes the grid took (see split_grid)

    def at(self, hot: int, warm: int) -> dict[str, float]:
        """The counters of one pair on the grid, as a dict."""
        i = int(np.searchsorted(self.hot, hot))
        j = int(np.searchsorted(self.warm, warm))
        if i >= self.hot.size or self.hot[i] != hot or j >= self.warm.size or self.warm[j] != warm:
            raise KeyError(f"({hot}, {warm}) is not on the grid")
        return {
            "hot_rows": hot,
            "warm_rows": warm,
            "hot_hits": int(self.hot_hits[i, j]),
            "warm_hits": int(self.warm_hits[i, j]),
            "device_rows": int(self.device_rows[i, j]),
            "cold_reads": int(self.cold_reads[i, j]),
            "fetch_seconds": float(self.fetch_seconds[i, j]),
            "stall_seconds": float(self.stall_seconds[i, j]),
            # a tier smaller than a batch's distinct rows keeps the most used of the batch's misses;
            # the model keeps the most used of all its rows: further from a replay (docs/policies.md)
            "below_batch": bool(0 < hot < self.widest_batch or 0 < warm < self.widest_batch),
        }


def split_grid(
    events: BatchEvents,
    cost: CostModelConfig,
    row_bytes: int,
    hot: Sequence[int] | np.ndarray,
    warm: Sequence[int] | np.ndarray,
    models: dict[str, TierModel] | None = None,
) -> SplitGrid:
    """Modelled hits, rows moved, fetch and stall time at every (hot, warm) pair of tiers, LRU or
    as ``models`` says (:func:`zipf_analysis.tier_models.tier_models`; default: LRU both).

    A tier of ``c`` rows pins ``P(c)`` rows (0 under LRU: see :class:`TierModel`) and runs an LRU
    segment of ``c - P(c)`` rows over the lookups that reach it of rows it does not pin. Stack
    passes: hot's segment, one over the events of rows hot does not pin, per distinct ``P`` on the
    hot grid (1 for LRU hot); warm's, per hot capacity, one over hot's misses of rows warm does not
    pin, per distinct warm ``P`` (1 for LRU warm, else up to the warm grid's size). Each pass gives
    its segment's hits at every capacity sharing its pins. The cost model is
    :func:`zipf_analysis.replay.batch_fetch_seconds`, per batch, as replay applies it.

    Examples
    --------
    >>> ev = BatchEvents(np.array([0, 2, 3, 4, 6]), np.array([0, 1, 2, 0, 1, 2]),
    ...                  np.array([2, 1, 1, 1, 1, 1]), lookups=7)
    >>> g = split_grid(ev, CostModelConfig(), 256, [0, 1, 3], [0, 2])
    >>> g.hot_hits[:, 0].tolist(), g.warm_hits[0].tolist(), g.cold_reads[1].tolist()
    ([0, 0, 3], [0, 1], [6, 5])
    """
    hot = np.unique(np.asarray(hot, dtype=np.int64))
    warm = np.unique(np.asarray(warm, dtype=np.int64))
    models = models or {t: TierModel(t, "lru") for t in ("hot", "warm")}
    tuned = models["hot"].ranking is not None or models["warm"].ranking is not None
    if tuned and events.ids is None:
        raise ValueError("events: no row ids (BatchEvents.ids); expected them for zipf-tuned tiers")
    ranks = PinRanks(models["hot"], models["warm"], events.ids if tuned else np.zeros(0))
    n_b, n_w = events.batches, warm.size
    _check_grid_memory(n_b, n_w)
    batch_of = events.batch_of
    shape = (hot.size, n_w)
    out = {k: np.zeros(shape, dtype=np.int64) for k in ("hh", "wh", "dev", "cold")}
    fetch, stall = np.zeros(shape), np.zeros(shape)
    passes, last = 0, None  # (hot pins, distances of the unpinned events): one pass per pin count
    warm_pins = models["warm"].segments(warm)  # before hot's pins leave fewer ranked rows
    for i, (h, p_h) in enumerate(zip(hot, models["hot"].segments(hot), strict=True)):
        pinned = ranks.hot_pinned(events.rows, int(p_h))
        hit = pinned.copy()
        if h > p_h:  # a recency segment: its hits from a pass over the rows hot does not pin
            if last is None or last[0] != p_h:
                last = (p_h, _segment_distances(events.rows, batch_of, n_b, ~pinned))
                passes += 1
            hit[~pinned] = (last[1] > 0) & (last[1] <= h - p_h)
        hits_b = np.bincount(batch_of[hit], weights=events.counts[hit], minlength=n_b)
        miss = ~hit
        dev_b = np.bincount(batch_of[miss], minlength=n_b)
        m_rows, m_batch, m_counts = events.rows[miss], batch_of[miss], events.counts[miss]
        warm_rows_b, warm_hits, n_pass = _warm_hits(
            ranks, warm_pins, int(p_h), warm, m_rows, m_batch, m_counts, n_b
        )
        passes += n_pass
        cold_b = dev_b[:, None] - warm_rows_b
        t = batch_fetch_seconds(
            cost, row_bytes, hits_b[:, None], warm_rows_b, dev_b[:, None], cold_b
        )
        fetch[i] = t.sum(axis=0)
        stall[i] = np.maximum(0.0, t - cost.compute_seconds_per_batch).sum(axis=0)
        out["hh"][i] = int(hits_b.sum())
        out["wh"][i] = warm_hits.astype(np.int64)
        out["dev"][i] = int(dev_b.sum())
        out["cold"][i] = int(dev_b.sum()) - warm_rows_b.sum(axis=0)
    return SplitGrid(
        hot,
        warm,
        events.lookups,
        n_b,
        out["hh"],
        out["wh"],
        out["dev"],
        out["cold"],
        fetch,
        stall,
        int(np.diff(events.starts).max()) if n_b else 0,
        passes,
    )


def _check_grid_memory(batches: int, warm: int, available: int | None = None) -> None:
    """Refuse a grid whose per-batch counters at every warm candidate do not fit in the RAM
    ``available`` now (default: ``MemAvailable``)."""
    available = available_host_memory() if available is None else available
    need = batches * warm * _CELL_BYTES
    if available is not None and need > available:
        raise ConfigError(
            f"tier split: {batches:,} batches x {warm:,} warm candidates take {format_bytes(need)} "
            f"({_CELL_BYTES} B each) while a hot candidate is priced, but only "
            f"{format_bytes(available)} of host RAM is available; expected fewer batches (a larger "
            "batch_tokens, --batch-tokens) or fewer warm candidates (points, --split-points)"
        )


def _segment_distances(
    rows: np.ndarray, batch_of: np.ndarray, n_batches: int, keep: np.ndarray
) -> np.ndarray:
    """Batched stack distances of the events ``keep`` selects, over those events only."""
    starts = np.concatenate([[0], np.cumsum(np.bincount(batch_of[keep], minlength=n_batches))])
    return batched_stack_distances(rows[keep], starts)


def _warm_hits(
    ranks: PinRanks,
    warm_pins: np.ndarray,
    hot_pinned: int,
    warm: np.ndarray,
    rows: np.ndarray,
    batch_of: np.ndarray,
    counts: np.ndarray,
    n_batches: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Warm's hits at every capacity over hot's misses (``rows``, their batches and lookups):
    per batch the rows it serves [batch, warm], the lookups it serves [warm], and stack passes run.
    ``warm_pins``: the rows each capacity pins with the whole ranking (``TierModel.segments``);
    hot's pins leave fewer. Capacities sharing a pin count share one pass over the misses of rows
    not pinned; as the pins grow, that substream shrinks (each is cut from the one before)."""
    w_rank, available = ranks.warm_ranks(hot_pinned)
    pins = np.minimum(warm_pins, available)
    groups = np.unique(pins)
    rank = np.zeros(rows.size, dtype=np.int64) if w_rank is None else w_rank[rows]
    # pinned hits: an event is pinned from the first group whose pin count exceeds its rank
    first = np.searchsorted(groups, rank, side="right")
    n_g = groups.size + 1
    pinned_b = np.cumsum(
        np.bincount(batch_of * n_g + first, minlength=n_batches * n_g).reshape(n_batches, n_g),
        axis=1,
    )
    pinned_hits = np.cumsum(np.bincount(first, weights=counts, minlength=n_g))
    rows_b = np.zeros((n_batches, warm.size), dtype=np.int64)
    hits = np.zeros(warm.size)
    passes = 0
    sub = (rows, batch_of, counts, rank)  # the events of rows not pinned at this group's count
    for j, p in enumerate(groups):
        if p > 0:
            keep = sub[3] >= p
            sub = tuple(x[keep] for x in sub)
        cols = np.flatnonzero(pins == p)
        rows_b[:, cols] = pinned_b[:, j : j + 1]
        hits[cols] = pinned_hits[j]
        recency = warm[cols] - p  # grows with the capacity: a hit at one column hits at the next
        if recency[-1] <= 0 or sub[0].size == 0:
            continue
        starts = np.concatenate([[0], np.cumsum(np.bincount(sub[1], minlength=n_batches))])
        d = batched_stack_distances(sub[0], starts)
        passes += 1
        # per event, the first column whose recency segment holds it (cols.size: none)
        col = np.where(d > 0, np.searchsorted(recency, d, side="left"), cols.size)
        g = cols.size + 1
        per_b = np.bincount(sub[1] * g + col, minlength=n_batches * g).reshape(n_batches, g)
        rows_b[:, cols] += np.cumsum(per_b[:, :-1], axis=1)
        hits[cols] += np.cumsum(np.bincount(col, weights=sub[2], minlength=g)[:-1])
    return rows_b, hits, passes


# ---------------------------------------------------------------------------------------------
# The recommendation
# ---------------------------------------------------------------------------------------------


@dataclass
class SplitRecommendation:
    """The (hot, warm) split with the least modelled stall under both budgets, and the candidates
    considered."""

    table: str
    rows: int
    row_bytes: int
    gpu_budget: int
    host_budget: int
    batch_tokens: int | None
    hot_rows: int
    warm_rows: int
    hot_bytes: int
    warm_bytes: int
    hot_hit_ratio: float  # hot hits per lookup
    warm_hit_ratio: float  # warm hits per lookup that reached warm (replay's warm hit ratio)
    miss_ratio: float  # lookups served by neither tier, per lookup
    fetch_ratio: float  # rows read from cold per lookup
    fetch_seconds: float
    stall_seconds: float
    batches: int
    lookups: int
    widest_batch: int  # most distinct rows in one batch (tiers below it: see ``below_batch``)
    model: dict[str, str] = field(default_factory=lambda: {"hot": "lru", "warm": "lru"})
    notes: list[str] = field(default_factory=list)  # tiers whose policy is modelled as LRU, and why
    stack_passes: int = 0
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every pair, stall ascending
    frontier: list[dict[str, Any]] = field(
        default_factory=list
    )  # no other pair: less memory, no more stall

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        from dataclasses import asdict

        return asdict(self)

    def lines(self, frontier_rows: int = 12) -> list[str]:
        """What ``tiered-store replay`` prints."""
        hot, warm = (self.model[t].replace("lru", "LRU") for t in ("hot", "warm"))
        tiers = f"{hot} tiers" if hot == warm else f"hot {hot}, warm {warm}"
        shown = self.frontier
        if len(shown) > frontier_rows:  # the cheapest, the best, and evenly in between
            pick = np.unique(np.linspace(0, len(shown) - 1, frontier_rows).round().astype(int))
            shown = [shown[i] for i in pick]
        some = ""
        if len(shown) < len(self.frontier):
            some = f" ({len(shown)} shown: the cheapest, the best, evenly between)"
        out = [
            f"tier split for table {self.table!r} ({tiers}, modelled from one "
            f"read of the trace; GPU budget {format_bytes(self.gpu_budget)}, host budget "
            f"{format_bytes(self.host_budget)}):",
            *(f"  note: {n}" for n in self.notes),
            f"  recommended: hot {self.hot_rows:,} rows ({self.hot_rows / self.rows:.2%} of the "
            f"table, {format_bytes(self.hot_bytes)} with metadata), warm {self.warm_rows:,} rows "
            f"({self.warm_rows / self.rows:.2%}, {format_bytes(self.warm_bytes)})",
            f"  modelled: hot hit {self.hot_hit_ratio:.2%} (of all lookups), warm hit {self.warm_hit_ratio:.2%} (of "
            f"the hot tier's misses), "
            f"miss {self.miss_ratio:.2%} (of all lookups), fetch {self.fetch_ratio:.2%} (rows read "
            f"from cold per lookup); stall {self.stall_seconds:.4f} s over {self.batches:,} "
            f"batches (the part of their {self.fetch_seconds:.4f} s of modelled fetches that "
            "compute does not hide)",
            f"  frontier (no other split has less memory and no more stall; GPU and host: each "
            f"tier's bytes, its metadata included), {len(self.frontier)} of "
            f"{len(self.candidates)} splits{some}:",
            f"  {'hot rows':>12}{'GPU':>11}{'warm rows':>12}{'host':>11}{'hot hit':>9}"
            f"{'warm hit':>10}{'fetch':>8}{'stall s':>10}",
        ]
        for c in shown:
            out.append(
                f"  {c['hot_rows']:>12,}{format_bytes(c['hot_bytes']):>11}{c['warm_rows']:>12,}"
                f"{format_bytes(c['warm_bytes']):>11}{c['hot_hit_ratio']:>9.1%}{c['warm_hit_ratio']:>10.1%}"
                f"{c['fetch_ratio']:>8.1%}{c['stall_seconds']:>10.4f}"
                + (" *" if c["below_batch"] else "")
            )
        if any(c["below_batch"] for c in shown) or self.candidates[0]["below_batch"]:
            out.append(
                "  * a tier smaller than a batch's distinct rows: modelled less closely (a tier "
                "keeps the most used of a batch's misses, the model of all its rows)"
            )
        return out


def recommend_split(
    config: StoreConfig,
    trace: TraceReader | str | Path,
    *,
    gpu_budget: int | str,
    host_budget: int | str,
    table: str | int | None = None,
    batch_tokens: int | None = None,
    points: int = DEFAULT_POINTS,
    extra: Sequence[tuple[int, int]] = (),
) -> SplitRecommendation:
    """The hot/warm split with the least modelled stall whose hot tier fits in ``gpu_budget`` and
    warm tier in ``host_budget`` bytes (payload and metadata, the tier's eviction policy's
    included), for the config's tier policies as :func:`zipf_analysis.tier_models.tier_models`
    models them: LRU, or zipf-tuned with a profile and fixed pins (its pins and recency segment
    re-sized at every candidate capacity, as the store sizes them); any other policy is modelled
    as LRU and ``notes`` says so.

    Parameters
    ----------
    config : StoreConfig
        The table (rows, row bytes), each tier's ``policy``, ``profile``, ``recency_window`` and
        ``index``, and the ``cost_model``. Its tier capacities are not used (every candidate is).
    trace : TraceReader or path
    gpu_budget, host_budget : int or str
        Bytes, or a size like ``'8GiB'``; 0 for no tier.
    table : str or int, optional
        Which table of the trace (default: the first).
    batch_tokens : int, optional
        Batching, as :func:`zipf_analysis.replay.replay` takes it (default: the trace's own).
    points : int
        Candidate capacities per tier, log-spaced up to the budget's largest (0 and that largest
        are always candidates).
    extra : sequence of (hot, warm)
        More splits to evaluate (within the budgets), e.g. the config's own.

    Work: stack passes as :func:`split_grid` counts them (``stack_passes``): for LRU tiers one
    plus one per hot candidate; a zipf-tuned hot tier adds one per hot candidate, a zipf-tuned
    warm tier makes it one per (hot, warm) candidate pair with a recency segment, each over hot's
    misses of rows neither tier pins (shorter than the trace by hot's hits and warm's pins).

    Ties (equal stall, e.g. none at all when compute hides every fetch) go to the split with less
    GPU memory, then less host memory.
    """
    budgets = {
        "hot": parse_budget(gpu_budget, flag="--gpu-budget"),
        "warm": parse_budget(host_budget, flag="--host-budget"),
    }
    if not isinstance(trace, TraceReader):
        with TraceReader(trace) as reader:
            return recommend_split(
                config,
                reader,
                gpu_budget=budgets["hot"],
                host_budget=budgets["warm"],
                table=table,
                batch_tokens=batch_tokens,
                points=points,
                extra=extra,
            )
    if as_integer(points) is None or points < 1:  # 2.5: a bare TypeError in the grid
        raise ConfigError(f"points: got {points!r}; expected at least 1 capacity per tier")
    index = trace.table_index(table if table is not None else 0)
    layout = trace.layout[index]
    rows, row_bytes = table_geometry(config, layout, trace.header)
    require_lookups(trace, index)
    kinds = {"hot": config.tiers.hot.index, "warm": config.tiers.warm.index}
    flags = {"hot": "--gpu-budget", "warm": "--host-budget"}
    models = tier_models(config, rows, profile_layouts(config, trace, layout))
    size = {  # what tier_bytes needs: the table, the tier's index and its policies' metadata
        t: {
            "rows": rows,
            "row_bytes": row_bytes,
            "index": kinds[t],
            "policy": models[t].bytes_policy,
            "admission": models[t].bytes_admission,
            "repin": models[t].bytes_repin,
        }
        for t in kinds
    }
    largest = {t: max_capacity(budgets[t], **size[t], flag=flags[t]) for t in ("hot", "warm")}
    grids = {t: _grid(largest[t], points) for t in ("hot", "warm")}
    for h, w in extra:
        if 0 <= h <= largest["hot"] and 0 <= w <= largest["warm"]:
            grids["hot"] = np.union1d(grids["hot"], [h])
            grids["warm"] = np.union1d(grids["warm"], [w])
    per_batch = _batch_size(layout, batch_tokens)
    if per_batch is not None:  # batches known from the footer: refuse a grid before the read
        _check_grid_memory(-(-trace.lookups(index) // per_batch), grids["warm"].size)
    events = batch_events(trace, index, batch_tokens)
    check_row_ids(events.ids, rows, f"trace table {layout.get('name')!r}")
    grid = split_grid(events, config.cost_model, row_bytes, grids["hot"], grids["warm"], models)
    nbytes = {
        t: np.array([tier_bytes(int(c), **size[t]) for c in g])
        for t, g in (("hot", grid.hot), ("warm", grid.warm))
    }
    candidates = _candidates(grid, nbytes)
    best = candidates[0]
    return SplitRecommendation(
        table=str(layout.get("name", index)),
        rows=rows,
        row_bytes=row_bytes,
        gpu_budget=budgets["hot"],
        host_budget=budgets["warm"],
        batch_tokens=batch_tokens,
        hot_rows=best["hot_rows"],
        warm_rows=best["warm_rows"],
        hot_bytes=best["hot_bytes"],
        warm_bytes=best["warm_bytes"],
        hot_hit_ratio=best["hot_hit_ratio"],
        warm_hit_ratio=best["warm_hit_ratio"],
        miss_ratio=best["miss_ratio"],
        fetch_ratio=best["fetch_ratio"],
        fetch_seconds=best["fetch_seconds"],
        stall_seconds=best["stall_seconds"],
        batches=grid.batches,
        lookups=grid.lookups,
        widest_batch=grid.widest_batch,
        model={t: models[t].kind for t in ("hot", "warm")},
        notes=[m.note for m in models.values() if m.note],
        stack_passes=grid.stack_passes,
        candidates=candidates,
        frontier=_frontier(candidates),
    )


def _grid(largest: int, points: int) -> np.ndarray:
    """0, ``points`` log-spaced capacities up to ``largest`` (from largest/1024), and largest."""
    if largest <= 0:
        return np.zeros(1, dtype=np.int64)
    caps = np.geomspace(max(1.0, largest / 1024), largest, points).round().astype(np.int64)
    return np.unique(np.concatenate([[0, largest], caps]))


def _candidates(grid: SplitGrid, nbytes: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every pair as a dict, best first: least stall, then least GPU, then least host memory."""
    hh, ww = np.meshgrid(np.arange(grid.hot.size), np.arange(grid.warm.size), indexing="ij")
    hh, ww = hh.ravel(), ww.ravel()
    order = np.lexsort((nbytes["warm"][ww], nbytes["hot"][hh], grid.stall_seconds[hh, ww]))
    n = max(1, grid.lookups)
    out = []
    for i, j in zip(hh[order], ww[order], strict=True):
        c = grid.at(int(grid.hot[i]), int(grid.warm[j]))
        reached_warm = grid.lookups - c["hot_hits"]
        c.update(
            hot_bytes=int(nbytes["hot"][i]),
            warm_bytes=int(nbytes["warm"][j]),
            hot_hit_ratio=c["hot_hits"] / n,
            warm_hit_ratio=c["warm_hits"] / reached_warm if reached_warm else 0.0,
            miss_ratio=(reached_warm - c["warm_hits"]) / n,
            fetch_ratio=c["cold_reads"] / n,
        )
        out.append(c)
    return out


def _frontier(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates no other beats on GPU bytes, host bytes and stall at once, by stall.

    Memory grows with the candidates, not their square: each (GPU bytes, host bytes) pair is a
    cell of a grid holding its least stall (every pair of the two capacity grids, so as many cells
    as candidates); a candidate is beaten by another cell iff the least stall over the cells with
    no more of either memory (its own left out) is no more than its own, and within its cell iff
    another candidate there stalls less."""
    g_at, gi = np.unique([c["hot_bytes"] for c in candidates], return_inverse=True)
    h_at, hi = np.unique([c["warm_bytes"] for c in candidates], return_inverse=True)
    # stalls by rank: an empty cell ranks above every stall, one that overflowed to inf included
    _, s = np.unique([c["stall_seconds"] for c in candidates], return_inverse=True)
    s = s.reshape(-1)
    none = s.size
    cell = np.full((g_at.size, h_at.size), none)
    np.minimum.at(cell, (gi, hi), s)
    least = np.minimum.accumulate(np.minimum.accumulate(cell, axis=0), axis=1)
    less_gpu = np.vstack([np.full((1, h_at.size), none), least[:-1]])  # cells i' < i, j' <= j
    less_host = np.hstack([np.full((g_at.size, 1), none), least[:, :-1]])  # i' <= i, j' < j
    dominated = (np.minimum(less_gpu, less_host)[gi, hi] <= s) | (cell[gi, hi] < s)
    keep = [c for c, d in zip(candidates, dominated, strict=True) if not d]
    return sorted(keep, key=lambda c: (-c["stall_seconds"], c["hot_bytes"], c["warm_bytes"]))

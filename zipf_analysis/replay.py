"""Trace replay: the store's own cache code (``CacheHierarchy``) run without payload over a trace.

Because the live ``TieredStore`` makes its decisions through the same ``CacheHierarchy.plan`` and
``admit`` calls, a hit rate measured here is the hit rate the store gets for the same config and
batches (``tests/test_replay.py`` proves the counters equal).

An offline bound of the policy registry (``belady``, ``static-topk``) replays too: it sees the
table's whole trace, one request at a time, at the hot tier's capacity and at hot + warm.

Examples
--------
>>> from zipf_analysis.replay import replay
>>> result = replay(config, "trace.zst", table="layer2", batch_tokens=4096)   # doctest: +SKIP
>>> result.tiers["hot"]["hit_ratio"]                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from policies.registry import is_offline, offline_bound
from tiered_store.cache_plan import CacheHierarchy
from tiered_store.capacity import resolve_capacity
from tiered_store.config import CostModelConfig, StoreConfig
from tiered_store.errors import ConfigError, RowIdError, TraceFormatError
from tiered_store.request_queue import QueuedRequest
from tiered_store.stats import hit_ratio
from tiered_store.table_format import PAGE_BYTES, read_manifest
from tiered_store.trace import TraceReader


@dataclass
class ReplayResult:
    """What one policy did over one table's trace."""

    policy: str
    table: str
    batches: int
    lookups: int
    tiers: dict[str, dict[str, float]]
    rows_moved: dict[str, int]  # cold_reads, into_warm, into_hot, host_to_device
    bytes_moved: dict[str, int]
    unique_rows_per_batch: float  # distinct hot-miss rows fetched per batch (mean)
    modelled_fetch_seconds: float
    modelled_stall_seconds: float
    wall_seconds: float
    bounds: dict[str, float] = field(default_factory=dict)  # belady / static-topk miss ratios
    offline: bool = False  # an offline bound, per request: only lookups, hits and misses count
    queued_requests: int = 0  # requests announced ahead while each was served (0: none)
    # counters at each of ``marks``: lookups so far, rows read from cold, warm misses
    at_marks: list[dict[str, int]] = field(default_factory=list)

    @property
    def miss_ratio(self) -> float:
        """Lookups served by neither cache tier (they went to cold), per lookup."""
        return self.tiers["warm"]["misses"] / self.lookups if self.lookups else 0.0

    @property
    def fetch_ratio(self) -> float:
        """Rows read from cold per lookup. A row missed several times in one batch is read once,
        as a per-request cache misses it once and then hits: this is the figure to set beside
        per-request simulators (with ``batch_tokens=1`` it equals :attr:`miss_ratio`)."""
        return self.rows_moved["cold_reads"] / self.lookups if self.lookups else 0.0

    @property
    def lookups_per_second(self) -> float:
        """Replay speed."""
        return self.lookups / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["miss_ratio"] = self.miss_ratio
        out["fetch_ratio"] = self.fetch_ratio
        out["lookups_per_second"] = self.lookups_per_second
        return out


DEFAULT_REQUEST_TOKENS = 4096  # tokens per request of a queued replay


def _whole(value: object, least: int) -> bool:
    """``value`` is an integer (not a bool) >= ``least``."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= least


def replay(
    config: StoreConfig,
    trace: TraceReader | str | Path,
    *,
    table: str | int | None = None,
    batch_tokens: int | None = None,
    policy: str | None = None,
    lookahead: int = 0,
    queued_requests: int = 0,
    request_tokens: int = DEFAULT_REQUEST_TOKENS,
    marks: Sequence[int] = (),
    progress: bool = False,
    desc: str | None = None,
) -> ReplayResult:
    """Replay one table of a trace through the cache tiers a config describes.

    Parameters
    ----------
    config : StoreConfig
        Tier capacities, policies and the cost model. Its table's manifest (when the file exists)
        must match the trace's table size.
    trace : TraceReader or path
    table : str or int, optional
        Which table of the trace (default: the first).
    batch_tokens : int, optional
        Regroup lookups into batches of this many tokens (x heads ids). ``1`` replays one lookup
        at a time, as per-request simulators (libCacheSim) do. Default: the trace's own batches.
    policy : str, optional
        Override both cache tiers' policy (e.g. ``"lru+tinylfu"``), or name an offline bound
        (``"belady"``, ``"static-topk"``) to run over the table's ids, one request at a time.
    lookahead : int
        Batches the cache may look ahead: rows they use are not evicted (as the live store does
        for its queued prefetches).
    queued_requests : int
        Requests the server is taken to have queued: the trace is cut into requests of
        ``request_tokens`` tokens, and before one is served the next ``queued_requests`` are
        announced (``CacheHierarchy.announce``), so rows they use are evicted last. Not with
        ``lookahead``.
    request_tokens : int
        Tokens per request when ``queued_requests`` is set.
    marks : sequence of int
        Record the counters (``at_marks``) once this many lookups are replayed, at the end of
        the batch that reaches each mark: what happened after a warm-up, or per chunk, in one
        replay.
    progress : bool
        Show a progress bar (lookups replayed) on stderr.
    desc : str, optional
        The bar's label (default: ``replay`` and the warm tier's policy).
    """
    if not isinstance(trace, TraceReader):
        with TraceReader(trace) as reader:
            return replay(
                config,
                reader,
                table=table,
                batch_tokens=batch_tokens,
                policy=policy,
                lookahead=lookahead,
                queued_requests=queued_requests,
                request_tokens=request_tokens,
                marks=marks,
                progress=progress,
                desc=desc,
            )
    if batch_tokens is not None and not _whole(batch_tokens, 1):  # queued: -1 cut no batch
        raise ConfigError(
            f"batch_tokens: got {batch_tokens!r}; expected a positive number of tokens"
        )
    if not _whole(lookahead, 0):
        raise ConfigError(f"lookahead: got {lookahead!r}; expected a number of batches >= 0")
    if not _whole(queued_requests, 0) or not _whole(request_tokens, 1):
        raise ConfigError(
            f"queued_requests={queued_requests!r}, request_tokens={request_tokens!r}: expected "
            "queued_requests >= 0 and request_tokens >= 1 (integers)"
        )
    bad_marks = [mark for mark in marks if not _whole(mark, 0)]
    if bad_marks:
        raise ConfigError(f"marks: got {bad_marks[0]!r}; expected lookup counts >= 0 (integers)")
    if queued_requests and lookahead:  # a request would be released while its batches wait
        raise ConfigError(
            f"lookahead={lookahead} with queued_requests={queued_requests}: expected one of "
            "them (the queue already knows the requests ahead)"
        )
    reader = trace
    index = reader.table_index(table if table is not None else 0)
    layout = reader.layout[index]
    rows, row_bytes = table_geometry(config, layout, reader.header)
    unchecked = not ids_checked(layout)
    what = f"trace table {layout.get('name')!r}"
    if policy is not None and is_offline(policy):
        ids = reader.read_all(index)
        if unchecked:
            check_row_ids(ids, rows, what)
        return replay_offline(
            config,
            ids,
            policy,
            rows=rows,
            row_bytes=row_bytes,
            table=str(layout.get("name", index)),
        )
    if policy is not None:
        config = with_policy(config, policy)
    caches = CacheHierarchy.from_config(config, rows, row_bytes, "cpu")
    caches.warm_start(config, layouts=profile_layouts(config, reader, layout))
    cost = config.cost_model
    moved = {"cold_reads": 0, "into_warm": 0, "into_hot": 0, "host_to_device": 0}
    batches = lookups = unique_fetched = 0
    fetch_s = stall_s = 0.0
    start = time.perf_counter()
    bar = (
        tqdm(
            total=reader.lookups(index),
            desc=desc or f"replay {caches.warm.spec.text}",
            unit="lookup",
            unit_scale=True,
            leave=False,
        )
        if progress
        else None
    )
    pending_marks, at_marks = deque(sorted(marks)), []

    def reach(lookups: int) -> None:
        """Record the counters for every mark ``lookups`` has reached."""
        while pending_marks and pending_marks[0] <= lookups:
            pending_marks.popleft()
            at_marks.append(
                {
                    "lookups": lookups,
                    "cold_reads": moved["cold_reads"],
                    "misses": caches.warm.counters.misses,
                }
            )

    reach(0)
    heads = layout.get("heads") or 1  # checked by the reader: an integer >= 1, or none
    if queued_requests > 0:
        requests = _batches(reader, index, request_tokens, heads, single_lookups=False)
        stream = _served_with_queue(
            _inside(requests, rows, what) if unchecked else requests,
            caches,
            queued_requests,
            _batch_lookups(batch_tokens, heads) if batch_tokens else None,
        )
    else:
        stream = _batches(reader, index, batch_tokens, heads)
        stream = _inside(stream, rows, what) if unchecked else stream
    for ids, ahead in _with_lookahead(stream, lookahead):
        if bar is not None:
            bar.update(ids.size)
        plan = caches.plan(torch.from_numpy(ids))
        batches += 1
        lookups += ids.size
        n_unique = n_cold = n_hot_in = n_warm_in = 0
        if not plan.all_hit:
            admitted = caches.admit(plan, ahead)
            n_unique, n_cold = plan.unique_ids.numel(), plan.cold_idx.numel()
            n_hot_in, n_warm_in = admitted.hot_slots.numel(), admitted.warm_slots.numel()
        caches.repin_now()  # zipf-tuned's online re-pins that are due, at the store's boundary
        unique_fetched += n_unique
        moved["cold_reads"] += n_cold
        moved["into_warm"] += n_warm_in
        moved["into_hot"] += n_hot_in
        moved["host_to_device"] += n_unique
        t = batch_fetch_seconds(
            cost, row_bytes, ids.size - plan.miss_pos.numel(), n_unique - n_cold, n_unique, n_cold
        )
        fetch_s += t
        stall_s += max(0.0, t - cost.compute_seconds_per_batch)
        reach(lookups)
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    tiers = {}
    for cache in (caches.hot, caches.warm):
        c = cache.counters.as_dict()
        c["hit_ratio"] = hit_ratio(c["hits"], c["lookups"])
        c["capacity"], c["occupancy"] = cache.capacity, cache.occupancy
        if cache.online is not None:
            c["repins"], c["rows_repinned"] = cache.online.repins, cache.online.rows_pinned
        tiers[cache.name] = c
    return ReplayResult(
        policy=f"{caches.hot.spec.text}/{caches.warm.spec.text}",
        table=str(layout.get("name", index)),
        batches=batches,
        lookups=lookups,
        tiers=tiers,
        rows_moved=moved,
        bytes_moved={k: v * row_bytes for k, v in moved.items()},
        unique_rows_per_batch=unique_fetched / batches if batches else 0.0,
        modelled_fetch_seconds=fetch_s,
        modelled_stall_seconds=stall_s,
        wall_seconds=wall,
        queued_requests=queued_requests,
        at_marks=at_marks,
    )


def replay_offline(
    config: StoreConfig,
    ids: np.ndarray,
    bound: str,
    *,
    rows: int,
    row_bytes: int,
    table: str = "",
) -> ReplayResult:
    """An offline bound over a table's whole trace, in the shape of a replay.

    The hot tier's figures are the bound at the hot capacity; the warm tier's, at hot + warm
    capacity (the rows both tiers hold), for the lookups hot missed. Per request, so the miss
    ratio and the fetch ratio are equal; movements other than cold reads are not modelled.

    Parameters
    ----------
    config : StoreConfig
        Gives the tier capacities (as the store resolves them).
    ids : ndarray of int64
        The table's row ids in request order.
    bound : str
        An offline name of the policy registry: ``"belady"`` or ``"static-topk"``.
    rows, row_bytes : int
        The table's geometry (see :func:`table_geometry`).
    table : str
        The table's name, for the result.

    Examples
    --------
    >>> from tiered_store.config import StoreConfig
    >>> cfg = StoreConfig.from_dict({"table": {"path": "t.npy"},
    ...                              "tiers": {"hot": {"capacity": 1}, "warm": {"capacity": 1}}})
    >>> r = replay_offline(cfg, np.array([1, 2, 3, 1, 2, 3]), "belady", rows=10, row_bytes=64)
    >>> r.tiers["hot"]["misses"], r.tiers["warm"]["misses"], r.miss_ratio == r.fetch_ratio
    (5, 4, True)
    """
    hot, warm = (
        resolve_capacity(
            tier.capacity, table_rows=rows, row_bytes=row_bytes, key=f"tiers.{name}.capacity"
        )
        for name, tier in (("hot", config.tiers.hot), ("warm", config.tiers.warm))
    )
    start = time.perf_counter()
    hot_misses, misses = (int(m) for m in offline_bound(bound).misses(ids, [hot, hot + warm]))
    wall = time.perf_counter() - start
    lookups = int(ids.size)
    tiers = {}
    for name, capacity, seen, missed in (
        ("hot", hot, lookups, hot_misses),
        ("warm", warm, hot_misses, misses),
    ):
        tiers[name] = {
            "lookups": seen,
            "hits": seen - missed,
            "misses": missed,
            "hit_ratio": hit_ratio(seen - missed, seen),
            "capacity": capacity,
        }
    moved = {"cold_reads": misses, "into_warm": 0, "into_hot": 0, "host_to_device": hot_misses}
    return ReplayResult(
        policy=bound.strip().lower(),
        table=table,
        batches=lookups,
        lookups=lookups,
        tiers=tiers,
        rows_moved=moved,
        bytes_moved={k: v * row_bytes for k, v in moved.items()},
        unique_rows_per_batch=hot_misses / lookups if lookups else 0.0,
        modelled_fetch_seconds=0.0,
        modelled_stall_seconds=0.0,
        wall_seconds=wall,
        offline=True,
    )


def batch_fetch_seconds(
    cost: CostModelConfig,
    row_bytes: int,
    hot_hits: int | np.ndarray,
    warm_rows: int | np.ndarray,
    device_rows: int | np.ndarray,
    cold_rows: int | np.ndarray,
) -> float | np.ndarray:
    """Modelled time to serve one batch: device gathers, host gathers, the host-to-device copy and
    random NVMe page reads, :func:`row_pages` per cold row (one latency per batch, reads overlapped
    at the drive's IOPS). Counts may be arrays (one element per batch): the result is then an
    array."""
    t = hot_hits * row_bytes / (cost.hbm_gbps * 1e9)
    t = t + warm_rows * row_bytes / (cost.dram_gbps * 1e9)
    t = t + device_rows * row_bytes / (cost.pcie_gbps * 1e9)
    pages = cold_rows * row_pages(row_bytes)
    t = t + pages / cost.nvme_read_iops + np.where(cold_rows > 0, cost.nvme_latency_us * 1e-6, 0.0)
    return float(t) if np.ndim(t) == 0 else t


@lru_cache(maxsize=64)
def row_pages(row_bytes: int) -> float:
    """Pages a cold read of one row reads, on average over the table's rows: the cold reader reads
    every ``PAGE_BYTES`` page a row's bytes lie in, and row ``i`` starts at ``data_offset + i *
    row_bytes`` with ``data_offset`` a multiple of ``PAGE_BYTES`` (``table_format`` checks it), so
    a row whose size does not divide the page crosses a page boundary at some positions. Rows of
    one batch that share a page are read once by the reader, and counted per row here (random
    cold rows of a large table rarely share one).

    >>> row_pages(256), row_pages(264), row_pages(6144), row_pages(6000)
    (1.0, 1.0625, 2.0, 2.4609375)
    """
    period = PAGE_BYTES // math.gcd(row_bytes, PAGE_BYTES)  # rows until the offsets repeat
    start = np.arange(period, dtype=np.int64) * row_bytes % PAGE_BYTES
    return float(np.mean((start + row_bytes - 1) // PAGE_BYTES + 1))


def profile_layouts(
    config: StoreConfig, reader: TraceReader, layout: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """What a tier's profile must match to replay the trace table ``layout``: the Engram config
    the trace header records, and the table file's layout when it exists and records one."""
    from tiered_store.engram.layout import recorded_layout

    name = layout.get("name")
    out = []
    recorded = recorded_layout(reader.header, layout.get("layer"), str(name))
    if recorded is not None:
        out.append((f"trace {reader.path} (table {name!r})", recorded))
    path = Path(config.table.path)
    if path.exists():
        engram = read_manifest(path).metadata.get("engram")
        if isinstance(engram, dict):
            out.append((f"the table {path}", engram))
    return out


def table_geometry(
    config: StoreConfig, layout: dict[str, Any], header: Mapping[str, Any] | None = None
) -> tuple[int, int]:
    """(rows, row_bytes) of the replayed table: from the table file when it exists (checked against
    the trace), else from the trace layout and the config's ``table.dim``/``table.dtype``. A row
    width the trace layout gives (``dim``) must match the table's or the config's, and the Engram
    config the trace ``header`` records the one the table file's manifest records."""
    from tiered_store.engram.layout import addressing_mismatch, recorded_layout, short

    trace_rows, trace_dim = layout.get("rows"), layout.get("dim")
    path = Path(config.table.path)
    if path.exists():
        manifest = read_manifest(path)
        if trace_rows is not None and int(trace_rows) != manifest.rows:
            raise ConfigError(
                f"table.path: {path} has {manifest.rows:,} rows but trace table "
                f"{layout.get('name')!r} has {int(trace_rows):,}; expected the table the trace was made for"
            )
        if trace_dim is not None and int(trace_dim) != manifest.values_per_row:
            raise ConfigError(
                f"table.path: {path} has rows of {manifest.values_per_row} values but trace table "
                f"{layout.get('name')!r} has {int(trace_dim)}; expected the table the trace was made for"
            )
        hashed = recorded_layout(header or {}, layout.get("layer"), str(layout.get("name")))
        built = manifest.metadata.get("engram")
        diff = addressing_mismatch(hashed, built) if hashed and isinstance(built, dict) else None
        if diff is not None:
            key, traced, expected = diff
            raise ConfigError(
                f"table.path: {path} was built for {key}={short(expected)} but trace table "
                f"{layout.get('name')!r} was hashed with {key}={short(traced)}; expected the "
                "table the trace was made for (its row ids name other N-grams)"
            )
        return manifest.rows, manifest.row_bytes
    if trace_rows is None:
        raise TraceFormatError(
            f"trace table {layout.get('name')!r} does not say its rows and {path} does not exist; "
            "expected a trace header with 'rows' or an existing table file"
        )
    if config.table.dim is None:
        raise ConfigError(
            f"table.dim: needed to replay without the table file {path}; expected the row width"
        )
    if trace_dim is not None and not _packs(int(trace_dim), config.table):
        packed = " (uint8: the bytes of its packed fp8 rows, codes then scales)"
        raise ConfigError(
            f"table.dim: got {config.table.dim}{packed if config.table.dtype == 'uint8' else ''} "
            f"but trace table {layout.get('name')!r} has rows of {int(trace_dim)} values; expected "
            "the row width of the table the trace was made for"
        )
    itemsize = getattr(torch, config.table.dtype or "float32").itemsize
    return int(trace_rows), config.table.dim * itemsize


def _packs(values: int, table: Any) -> bool:
    """Whether a config's ``table`` holds rows of ``values`` values: ``dim`` of them, or for a
    ``uint8`` table (packed quantised rows, whose ``dim`` is bytes, as its manifest's) their fp8
    codes and one scale byte per whole block."""
    if table.dtype != "uint8":
        return table.dim == values
    scales = table.dim - values
    return scales >= 1 and values % scales == 0


def with_policy(config: StoreConfig, policy: str) -> StoreConfig:
    """A copy of ``config`` with both cache tiers using ``policy``."""
    tiers = config.tiers.model_copy(
        update={
            "hot": config.tiers.hot.model_copy(update={"policy": policy}),
            "warm": config.tiers.warm.model_copy(update={"policy": policy}),
        }
    )
    return config.model_copy(update={"tiers": tiers})


def _batch_lookups(batch_tokens: int, heads: int) -> int:
    """Lookups per replayed batch: ``batch_tokens`` x heads, except that 1 is one lookup (the
    per-request semantics of ``--batch-tokens 1``)."""
    return 1 if batch_tokens == 1 else batch_tokens * heads


def _batches(
    reader: TraceReader,
    index: int,
    batch_tokens: int | None,
    heads: int,
    *,
    single_lookups: bool = True,
) -> Iterator[np.ndarray]:
    """The table's ids, batch by batch: the trace's own batches (records of one batch joined),
    single lookups (``batch_tokens`` 1, unless not ``single_lookups``: a request of one token),
    or N-token groups."""
    if batch_tokens is None:
        pending: list[np.ndarray] = []
        current = None
        for record in reader.batches(index):
            if record.batch != current and pending:
                yield np.concatenate(pending)
                pending = []
            current = record.batch
            pending.append(record.ids.reshape(-1))
        if pending:
            yield np.concatenate(pending)
        return
    size = _batch_lookups(batch_tokens, heads) if single_lookups else batch_tokens * heads
    pending: list[np.ndarray] = []
    n_pending = 0
    for ids in reader.ids(index):
        pending.append(ids)
        n_pending += ids.size
        if n_pending < size:
            continue
        flat = np.concatenate(pending)
        cut = flat.size - flat.size % size
        yield from flat[:cut].reshape(-1, size)
        pending, n_pending = [flat[cut:]], flat.size - cut
    if n_pending:
        yield np.concatenate(pending)


def _inside(batches: Iterator[np.ndarray], rows: int, what: str) -> Iterator[np.ndarray]:
    """``batches``, each checked to hold row ids in ``[0, rows)``."""
    for ids in batches:
        check_row_ids(ids, rows, what)
        yield ids


def ids_checked(layout: dict[str, Any]) -> bool:
    """Whether a trace table's writer checked its ids: it does against the ``rows`` it declares."""
    rows = layout.get("rows")
    return isinstance(rows, int) and not isinstance(rows, bool)


def require_lookups(reader: TraceReader, index: int) -> None:
    """Refuse a trace table with no lookups (nothing to replay or model), naming the trace and table."""
    if reader.lookups(index) == 0:
        raise TraceFormatError(
            f"trace {reader.path}: table {reader.tables[index]!r} has no lookups; expected a "
            "trace with lookups of the table to replay"
        )


def check_row_ids(ids: np.ndarray, rows: int, what: str) -> None:
    """Refuse ``ids`` outside ``[0, rows)`` (a trace of another table), naming ``what``."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        raise RowIdError(
            f"{what}: row ids in [{int(ids.min()):,}, {int(ids.max()):,}]; expected ids in "
            f"[0, {rows:,}) (the table's rows): a trace of another table?"
        )


def _served_with_queue(
    requests: Iterator[np.ndarray], caches: CacheHierarchy, depth: int, batch_size: int | None
) -> Iterator[np.ndarray]:
    """Each request's batches (``batch_size`` ids; the whole request when None), with the next
    ``depth`` requests announced to ``caches`` while it is served, and each batch told to them
    as served before it is looked up (``CacheHierarchy.served``)."""
    queue: deque[tuple[np.ndarray, QueuedRequest]] = deque()
    requests = iter(requests)
    while True:
        while len(queue) <= depth:
            ids = next(requests, None)
            if ids is None:
                break
            queue.append((ids, caches.announce(torch.from_numpy(ids))))
        if not queue:
            return
        ids, request = queue.popleft()
        step = batch_size or ids.size
        for start in range(0, ids.size, step):
            batch = ids[start : start + step]
            caches.served(request, torch.from_numpy(batch))  # its rows no later batch looks up
            yield batch
        caches.release(request)


def _with_lookahead(
    batches: Iterator[np.ndarray], depth: int
) -> Iterator[tuple[np.ndarray, torch.Tensor | None]]:
    """Each batch with the ids of the next ``depth`` batches (None when ``depth`` is 0)."""
    if depth <= 0:
        for ids in batches:
            yield ids, None
        return
    window: deque[np.ndarray] = deque()
    for ids in batches:
        window.append(ids)
        if len(window) > depth:
            current = window.popleft()
            yield current, torch.from_numpy(np.concatenate(window))
    while window:
        current = window.popleft()
        yield current, torch.from_numpy(np.concatenate(window)) if window else None

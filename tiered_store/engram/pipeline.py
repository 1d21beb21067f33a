"""The prefetch pipeline: an ``EngramLM`` over a stream of batches, Engram rows fetched ahead.

For each batch the pipeline hashes the token ids for every Engram layer in one pass and calls each
table's ``prefetch`` (``EngramLM.prefetch``); each Engram layer's lookup then consumes its handle.
With ``lookahead=0`` the fetch starts at the beginning of the batch's own forward, so it overlaps
the layers before the first Engram layer. With ``lookahead=k`` the next ``k`` batches' fetches are
started before the current batch computes (in serving the next batch's tokens are known), so the
fetch overlaps a whole forward pass.

Where the work runs: hashing and ``prefetch`` submission run on the calling thread (a few
milliseconds per batch); each ``TieredStore`` resolves its fetches on its own worker thread, and
its cold reads on its I/O thread pool, while torch's intra-op threads run the model. On CUDA the
store copies rows host-to-device on its side stream and the lookup makes the compute stream wait
on an event, so nothing blocks the host. On a CPU-only machine the store's work competes with the
model's compute for the same cores: prefetch hides I/O latency there, not CPU time.

``decode(tokens, prompt)`` runs a prefill of the first ``prompt`` tokens and then one token per
step (the sequences' own next tokens, as a server would after sampling them), with the hasher's
``HashState`` and the model's ``KVCache``; every step's fetch starts at the step's beginning,
since a step's token is known only when the previous step ends.

``stall`` is the time Engram lookups spent waiting for prefetched rows
(``TieredStore.stats()["prefetch"]["wait_seconds_total"]``); ``lookup`` is the whole time spent
inside table lookups (the stall, the gather from the staged rows, and without prefetch the fetch
itself).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..integers import as_integer
from ..stats import hit_ratio
from .backend import TableBackend
from .hashing import rewound_on_failure
from .model import EngramBatch, EngramLM, Logits, _pinned_host_ids

__all__ = [
    "DecodeStats",
    "PipelineStats",
    "PrefetchPipeline",
    "profile_rows",
    "table_stats_delta",
]


_END = object()  # what ``next`` gives for a source with no batch left


@dataclass
class PipelineStats:
    """What one ``PrefetchPipeline.run`` did, and where the time went."""

    batches: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0  # inside the model's forward (synchronised on CUDA; failed too)
    prepare_seconds: float = 0.0  # hashing + prefetch submission on the calling thread
    source_seconds: float = 0.0  # waiting for the source's next batch (reading, tokenising)
    lookup_seconds: float = 0.0  # inside table lookups (stores that keep statistics, once each)
    stall_seconds: float = 0.0  # of which waiting for prefetched rows
    # per layer (layers sharing one store, ``TableSlice``s, each show the store's counters)
    tables: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Source + prepare + forward: the run's wall time, without the consumer's between
        batches."""
        return self.source_seconds + self.prepare_seconds + self.forward_seconds

    @property
    def tokens_per_second(self) -> float:
        """Throughput of the run."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class DecodeStats:
    """What one ``PrefetchPipeline.decode`` did: the prefill, then per decode step the wall time,
    the store's time on the calling thread and the stall (arrays of one value per step)."""

    batch_size: int
    prompt_tokens: int
    prefill_seconds: float  # prepare + forward of the prompt
    step_seconds: np.ndarray  # each step: prepare + forward (synchronised on CUDA)
    prepare_seconds: np.ndarray  # of which hashing + prefetch submission
    lookup_seconds: np.ndarray  # of which inside table lookups (stall, gather, dequantise)
    stall_seconds: np.ndarray  # of which waiting for prefetched rows
    tables: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # decode steps

    @property
    def store_seconds(self) -> np.ndarray:
        """Per step, the store's time on the step's critical path: hashing, prefetch submission
        and lookups."""
        return self.prepare_seconds + self.lookup_seconds

    def summary(self) -> dict[str, float]:
        """Medians and means per step, and the stall's and the store's share of the step; a
        ``ConfigError`` when no step was recorded (there is nothing to summarise)."""
        step, stall, store = self.step_seconds, self.stall_seconds, self.store_seconds
        if step.size == 0:
            raise ConfigError(
                "DecodeStats.summary: step_seconds is empty (0 decode steps recorded); "
                "expected at least one step to summarise"
            )
        return {
            "steps": int(step.size),
            "step_ms_median": 1e3 * float(np.median(step)),
            "step_ms_mean": 1e3 * float(step.mean()),
            "store_ms_median": 1e3 * float(np.median(store)),
            "store_ms_mean": 1e3 * float(store.mean()),
            "stall_ms_median": 1e3 * float(np.median(stall)),
            "stall_ms_mean": 1e3 * float(stall.mean()),
            "stall_ms_p99": 1e3 * float(np.percentile(stall, 99)),
            "stall_share_of_step": float(stall.sum() / step.sum()),
            "store_share_of_step": float(store.sum() / step.sum()),
            "tokens_per_s": self.batch_size * step.size / float(step.sum()),
        }


class PrefetchPipeline:
    """Run an ``EngramLM`` over batches with every batch's Engram rows prefetched ahead.

    Parameters
    ----------
    model
        The model; its tables may be in-memory (prefetch is then a no-op) or tiered stores.
    lookahead
        Batches whose fetches are started before the current one computes (0: only the current
        batch, at the start of its forward).
    prefetch
        ``False``: no prefetch at all; each Engram layer's lookup fetches synchronously.
    logits
        What the forward returns (``"last"``: last-position logits, as a serving prefill).

    Examples
    --------
    >>> from tiered_store.engram.model import EngramLM, ModelConfig
    >>> cfg = ModelConfig.from_dict({"engram": {"engram_vocab_size": [2003, 3001],
    ...     "n_embed_per_ngram": 64, "n_head_per_ngram": 4, "layer_ids": [1]},
    ...     "backbone": {"hidden_size": 64, "num_layers": 2}})
    >>> model = EngramLM(cfg)
    >>> batches = [torch.randint(0, 1000, (2, 16)) for _ in range(3)]
    >>> pipeline = PrefetchPipeline(model, lookahead=1)
    >>> outputs = [out for _, out in pipeline.run(batches)]
    >>> len(outputs), tuple(outputs[0].shape), pipeline.stats.tokens
    (3, (2, 129280), 96)
    >>> outs, decoded = pipeline.decode(torch.randint(0, 1000, (2, 20)), prompt=16)  # 4 steps
    >>> len(outs), decoded.step_seconds.size, decoded.batch_size
    (5, 4, 2)
    """

    def __init__(
        self,
        model: EngramLM,
        *,
        lookahead: int = 1,
        prefetch: bool = True,
        logits: Logits = "last",
    ) -> None:
        count = as_integer(lookahead)  # a NumPy or torch integer too; not a bool
        if count is None or count < 0:
            raise ConfigError(f"lookahead: expected an integer >= 0, got {lookahead!r}")
        lookahead = count
        if logits not in ("all", "last", "none"):
            raise ConfigError(f"logits: expected 'all', 'last' or 'none', got {logits!r}")
        self.model = model
        self.lookahead = lookahead if prefetch else 0
        self.prefetch = prefetch
        self.logits = logits
        self.stats = PipelineStats()

    def run(self, batches: Iterable[Any]) -> Iterator[tuple[EngramBatch, torch.Tensor]]:
        """Yield ``(EngramBatch, output)`` for each batch of token ids [B, T], in order.

        A batch that cannot be prepared (bad ids, named ``batches[i]`` from 0; a source that
        raises) raises its error after the batches before it are yielded, with any
        ``lookahead`` (it is read ahead of them).
        ``self.stats`` describes this run (reset at its start, complete when it ends).
        """
        self.stats = stats = PipelineStats()
        tables = self.model.tables
        before = {layer: _snapshot(table) for layer, table in tables.items()}
        cuda = self.model.embed.weight.device.type == "cuda"
        source, read = iter(batches), 0  # batches read from it
        queue: deque[EngramBatch] = deque()
        failed: Exception | None = None  # a batch ahead's: raised once those before it are out
        try:
            while True:
                t0, waited = time.perf_counter(), 0.0
                # the current batch and `lookahead` more
                while failed is None and len(queue) <= self.lookahead:
                    try:
                        t1 = time.perf_counter()
                        try:
                            ids = next(source, _END)
                        finally:  # a source that raised waited too (a read timing out)
                            waited += time.perf_counter() - t1
                        if ids is _END:  # (a None among the batches is refused as ids)
                            break
                        queue.append(self._prepare(ids, cuda, f"batches[{read}]"))
                        read += 1
                    except Exception as exc:  # bad ids, a source that raised: as without
                        failed = exc  # lookahead, the batches before it are yielded first
                stats.source_seconds += waited
                stats.prepare_seconds += time.perf_counter() - t0 - waited
                if not queue:
                    if failed is not None:
                        raise failed
                    break
                batch = queue.popleft()
                t0 = time.perf_counter()
                try:
                    with torch.no_grad():
                        out = self.model(batch.input_ids, prefetched=batch, logits=self.logits)
                    if cuda:
                        torch.cuda.synchronize(out.device)
                finally:  # a forward that failed took its time too (a read timing out)
                    stats.forward_seconds += time.perf_counter() - t0
                stats.batches += 1
                stats.tokens += batch.tokens
                yield batch, out
        finally:
            # batches read ahead of a failure: not kept (their staged rows) by its traceback
            queue.clear()
            summed = _one_per_store(tables)
            for layer, table in tables.items():
                delta = table_stats_delta(before[layer], _snapshot(table))
                if delta:
                    stats.tables[layer] = delta
                if delta and layer in summed:
                    stats.lookup_seconds += delta["lookup"]["seconds_total"]
                    stats.stall_seconds += delta["prefetch"]["wait_seconds_total"]

    def decode(self, tokens: Any, prompt: int) -> tuple[list[torch.Tensor], DecodeStats]:
        """Prefill ``tokens[:, :prompt]``, then feed ``tokens[:, t]`` one per step for every
        later ``t``: the outputs (prompt's, then each step's) and the steps' statistics
        (an example is in the class docstring). The tokens are checked once; for a model on the
        GPU host tokens are pinned once, as ``run`` pins each batch, and the decoded ones laid
        out step by step once more (no step copies its tokens)."""
        model, tables = self.model, self.model.tables
        cuda = model.embed.weight.device.type == "cuda"
        # pinned first (one copy, int32 tokens converted in it): a bad prompt wastes the copy
        ids, own = _pinned_host_ids(model, tokens, "tokens") if cuda else (None, False)
        if ids is None:
            ids = model._check_input(tokens, "tokens")
        if ids.shape[1] < 2:
            raise ConfigError(
                f"tokens: expected at least 2 per sequence (a prompt, then the tokens to decode), "
                f"got shape {list(ids.shape)}"
            )
        given, prompt = prompt, as_integer(prompt)  # a NumPy or torch integer too; not a bool
        if prompt is None or not 1 <= prompt < ids.shape[1]:
            raise ConfigError(
                f"prompt: expected an integer in [1, {ids.shape[1] - 1}] (tokens has "
                f"{ids.shape[1]} per sequence), got {given!r}"
            )
        # on the device the tokens are hashed on: no step copies the look-back there and back
        state, cache = model.hasher.new_state(ids.shape[0], device=ids.device), model.new_cache()
        steps = ids.shape[1] - prompt
        times = np.zeros((4, steps))  # step, prepare, lookup, stall
        # each step's tokens [B, 1]: of the pinned copy made here, rows of one pinned [steps, B]
        # copy (contiguous: copied to the GPU asynchronously), kept as they are; else snapshotted
        # by hashing (the caller's memory, or a slice of the copy)
        stepped = None
        if own:
            stepped = torch.empty((steps, ids.shape[0]), dtype=ids.dtype, pin_memory=True)
            stepped.copy_(ids[:, prompt:].t())
        outputs = []
        with torch.no_grad():
            t0 = time.perf_counter()
            outputs.append(self._step(ids[:, :prompt], state, cache, cuda)[0])
            prefill = time.perf_counter() - t0
            before = {layer: _snapshot(table) for layer, table in tables.items()}
            for step in range(steps):
                counters = _waits(tables)
                t0 = time.perf_counter()
                if stepped is None:
                    out, prepared = self._step(
                        ids[:, prompt + step : prompt + step + 1], state, cache, cuda
                    )
                else:
                    out, prepared = self._step(stepped[step, :, None], state, cache, cuda, True)
                times[0, step] = time.perf_counter() - t0
                times[1, step] = prepared
                times[2:, step] = np.subtract(_waits(tables), counters)
                outputs.append(out)
        stats = DecodeStats(ids.shape[0], prompt, prefill, *times)
        for layer, table in tables.items():
            delta = table_stats_delta(before[layer], _snapshot(table))
            if delta:
                stats.tables[layer] = delta
        return outputs, stats

    def _step(
        self, ids: torch.Tensor, state: Any, cache: Any, cuda: bool, owned: bool = False
    ) -> tuple[torch.Tensor, float]:
        """One forward of ``ids`` (checked by ``decode``; ``owned``: its own, else snapshotted)
        continuing ``state``/``cache``; its output and prepare time."""
        t0 = time.perf_counter()
        model = self.model
        if self.prefetch:  # as model.prefetch: a failed fetch leaves state where it was
            with rewound_on_failure(state):
                batch = model.fetch(
                    model._hash(ids, state=state, owned=owned, name="tokens", checked=ids)
                )
        else:
            batch = model._hash(ids, state=state, owned=owned, name="tokens", checked=ids)
        prepared = time.perf_counter() - t0
        out = self.model(batch.input_ids, prefetched=batch, logits=self.logits, cache=cache)
        if cuda:
            torch.cuda.synchronize(out.device)
        return out, prepared

    def _prepare(self, input_ids: Any, cuda: bool, name: str) -> EngramBatch:
        """Hash one batch (``name`` in errors about its ids) for every Engram layer and (unless
        disabled) start its fetches; the batch holds one copy of ids the source may refill
        before it runs (hash's, or the pinned one made here: on CUDA host ids of any kind are
        pinned). The ids are checked once."""
        checked, own = _pinned_host_ids(self.model, input_ids, name) if cuda else (None, False)
        if own:  # pinned (int32 ids converted in the copy): the copy hash keeps, copied to the
            input_ids = checked  # GPU asynchronously
        batch = self.model._hash(input_ids, owned=own, name=name, checked=checked)
        return self.model.fetch(batch) if self.prefetch else batch


def _snapshot(table: TableBackend) -> dict | None:
    """A table's statistics now (``None`` for tables that keep none, e.g. in-memory)."""
    return table.stats() if table.keeps_stats else None


def _waits(tables: dict[int, TableBackend]) -> tuple[float, float]:
    """Seconds inside lookups and waiting for prefetches, summed over the stores of the tables
    that keep stats."""
    lookup = stall = 0.0
    for layer in _one_per_store(tables):
        stats = tables[layer].stats()
        lookup += stats["lookup"]["seconds_total"]
        stall += stats["prefetch"]["wait_seconds_total"]
    return lookup, stall


def _one_per_store(tables: dict[int, TableBackend]) -> list[int]:
    """The layers whose tables keep stats, one for each store they report (slices of one shared
    table, ``TableSlice``, all report its store's: summed once)."""
    first: dict[int, int] = {}
    for layer, table in tables.items():
        if table.keeps_stats:
            first.setdefault(id(getattr(table, "stats_owner", table)), layer)
    return list(first.values())


# ``TieredStore.stats()`` values that are levels, not counts: a delta reports them as they are
_LEVELS = {
    "hot": ("capacity", "occupancy", "pinned"),
    "warm": ("capacity", "occupancy", "pinned"),
    "queue": ("requests", "rows"),
    "writes": ("dirty_rows", "committed_step"),
    "shard": ("rank", "ranks", "rows"),  # a ShardedStore's
}


def table_stats_delta(before: dict | None, after: dict | None) -> dict[str, dict[str, float]]:
    """Counters of ``TieredStore.stats()`` accumulated between two snapshots (hit rates
    recomputed; levels such as capacity, occupancy and dirty rows as of ``after``); empty when
    the table keeps none."""
    if before is None or after is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for section, values in after.items():
        prev = before.get(section, {})  # a section may appear later (``writes``: first write)
        levels = _LEVELS.get(section, ())
        out[section] = {k: (v if k in levels else v - prev.get(k, 0)) for k, v in values.items()}
    for tier in ("hot", "warm"):
        if tier in out:
            t = out[tier]
            t["hit_rate"] = hit_ratio(t["hits"], t["lookups"])
    return out


def profile_rows(model: EngramLM, batches: Iterable[Any]) -> dict[int, np.ndarray]:
    """Each Engram layer's rows, hottest first, over ``batches`` of token ids (hashing only, no
    forward): the warm start list for ``open_tables(..., warm_start=...)``; a bad batch is named
    ``batches[i]`` from 0 in its error, as ``run`` names it.

    Examples
    --------
    >>> hottest = profile_rows(model, batches[:100])  # doctest: +SKIP
    >>> stores = open_tables(paths, model.hasher, store, warm_start=hottest)  # doctest: +SKIP
    """
    from ..profile import FrequencyCounter

    counters = {layer: FrequencyCounter(int(t.rows)) for layer, t in model.tables.items()}
    for i, ids in enumerate(batches):
        for layer, rows in model._hash(ids, name=f"batches[{i}]").row_ids.items():
            counters[layer].update(rows.cpu().numpy())
    return {layer: counter.profile().row_ids for layer, counter in counters.items()}

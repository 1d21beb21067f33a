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
from ..stats import hit_ratio
from .backend import TableBackend
from .model import EngramBatch, EngramLM, Logits

__all__ = ["PipelineStats", "PrefetchPipeline", "profile_rows", "table_stats_delta"]


@dataclass
class PipelineStats:
    """What one ``PrefetchPipeline.run`` did, and where the time went."""

    batches: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0  # inside the model's forward (synchronised on CUDA)
    prepare_seconds: float = 0.0  # hashing + prefetch submission on the calling thread
    lookup_seconds: float = 0.0  # inside table lookups (tables that keep statistics)
    stall_seconds: float = 0.0  # of which waiting for prefetched rows
    tables: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # per layer

    @property
    def seconds(self) -> float:
        """Prepare + forward: the run's wall time, without the consumer's between batches."""
        return self.prepare_seconds + self.forward_seconds

    @property
    def tokens_per_second(self) -> float:
        """Throughput of the run."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


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
    """

    def __init__(
        self,
        model: EngramLM,
        *,
        lookahead: int = 1,
        prefetch: bool = True,
        logits: Logits = "last",
    ) -> None:
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ConfigError(f"lookahead: expected an integer >= 0, got {lookahead!r}")
        if logits not in ("all", "last", "none"):
            raise ConfigError(f"logits: expected 'all', 'last' or 'none', got {logits!r}")
        self.model = model
        self.lookahead = lookahead if prefetch else 0
        self.prefetch = prefetch
        self.logits = logits
        self.stats = PipelineStats()

    def run(self, batches: Iterable[Any]) -> Iterator[tuple[EngramBatch, torch.Tensor]]:
        """Yield ``(EngramBatch, output)`` for each batch of token ids [B, T], in order.

        ``self.stats`` describes this run (reset at its start, complete when it ends).
        """
        self.stats = stats = PipelineStats()
        tables = self.model.tables
        before = {layer: _snapshot(table) for layer, table in tables.items()}
        cuda = self.model.embed.weight.device.type == "cuda"
        source = iter(batches)
        queue: deque[EngramBatch] = deque()
        try:
            while True:
                t0 = time.perf_counter()
                while len(queue) <= self.lookahead:  # the current batch and `lookahead` more
                    ids = next(source, None)
                    if ids is None:
                        break
                    queue.append(self._prepare(ids, cuda))
                stats.prepare_seconds += time.perf_counter() - t0
                if not queue:
                    break
                batch = queue.popleft()
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = self.model(batch.input_ids, prefetched=batch, logits=self.logits)
                if cuda:
                    torch.cuda.synchronize(out.device)
                stats.forward_seconds += time.perf_counter() - t0
                stats.batches += 1
                stats.tokens += batch.tokens
                yield batch, out
        finally:
            for layer, table in tables.items():
                delta = table_stats_delta(before[layer], _snapshot(table))
                if delta:
                    stats.tables[layer] = delta
                    stats.lookup_seconds += delta["lookup"]["seconds_total"]
                    stats.stall_seconds += delta["prefetch"]["wait_seconds_total"]

    def _prepare(self, input_ids: Any, cuda: bool) -> EngramBatch:
        """Hash one batch for every Engram layer and (unless disabled) start its fetches."""
        if cuda and isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu":
            input_ids = input_ids.pin_memory()  # so the model's copy to the GPU is asynchronous
        return self.model.prefetch(input_ids) if self.prefetch else self.model.hash(input_ids)


def _snapshot(table: TableBackend) -> dict | None:
    """A table's statistics now (``None`` for tables that keep none, e.g. in-memory)."""
    return table.stats() if table.keeps_stats else None


def table_stats_delta(before: dict | None, after: dict | None) -> dict[str, dict[str, float]]:
    """Counters of ``TieredStore.stats()`` accumulated between two snapshots (hit rates
    recomputed; capacity and occupancy as of ``after``); empty when the table keeps none."""
    if before is None or after is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for section, values in after.items():
        out[section] = {
            k: (v if k in ("capacity", "occupancy") else v - before[section].get(k, 0))
            for k, v in values.items()
        }
    for tier in ("hot", "warm"):
        if tier in out:
            t = out[tier]
            t["hit_rate"] = hit_ratio(t["hits"], t["lookups"])
    return out


def profile_rows(model: EngramLM, batches: Iterable[Any]) -> dict[int, np.ndarray]:
    """Each Engram layer's rows, hottest first, over ``batches`` of token ids (hashing only, no
    forward): the warm start list for ``open_tables(..., warm_start=...)``.

    Examples
    --------
    >>> hottest = profile_rows(model, batches[:100])  # doctest: +SKIP
    >>> stores = open_tables(paths, model.hasher, store, warm_start=hottest)  # doctest: +SKIP
    """
    from ..profile import FrequencyCounter

    counters = {layer: FrequencyCounter(int(t.rows)) for layer, t in model.tables.items()}
    for ids in batches:
        for layer, rows in model.hash(ids).row_ids.items():
            counters[layer].update(rows.cpu().numpy())
    return {layer: counter.profile().row_ids for layer, counter in counters.items()}

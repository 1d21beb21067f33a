"""The served model: one tiered store and one Engram layer per layer, over a stand-in backbone.

The model is the Engram layers themselves over a stand-in backbone: a seeded token embedding
(``ids % EMBED_BUCKETS`` buckets, ``hidden_size`` wide, the same for every hyper-connection
branch) gives the hidden state, and each Engram layer's output is added to it in turn
(``h = h + engram_L(h)``). The dense Engram parameters are seeded (``dense.seed``) or loaded from
a reference-layout safetensors checkpoint (``dense.checkpoint``, keys ``layer{L}.*``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engram import Engram, NgramHasher
from ..errors import ConfigError, TableFormatError
from ..metrics import TableHealth, verify_counted
from ..store import TieredStore
from ..table_format import RandomSource, create_table
from ..trace import TraceWriter
from .config import ServeConfig

__all__ = ["EMBED_BUCKETS", "EngramStack", "StackResult"]

log = logging.getLogger("tiered_store.serve")

EMBED_BUCKETS = 65536  # rows of the stand-in backbone's token embedding (ids are taken modulo)


class EngramStack:
    """The Engram layers of a ``ServeConfig`` over one tiered store each, with a stand-in backbone.

    Opens (or, with ``create_tables``, builds) each layer's table, checks it when
    ``tables.verify_on_start`` says so, and builds the layers. ``forward`` hashes the tokens for
    every layer, prefetches every layer's rows, then runs the layers in order.

    Parameters
    ----------
    config
        The serve configuration.
    create_tables
        Build missing tables (seeded normal values), as ``tables.create: true`` does.
    trace
        Path of a trace to record every lookup into (``TraceWriter``; replay it with
        ``tiered-store replay``); written when ``close`` is called.

    Examples
    --------
    >>> stack = EngramStack(ServeConfig.from_yaml("examples/serve.yaml"), create_tables=True)  # doctest: +SKIP
    >>> result = stack.forward(np.array([[1, 2, 3, 4]]))  # doctest: +SKIP
    >>> result.hidden.shape  # doctest: +SKIP
    torch.Size([1, 4, 2, 64])
    >>> stack.close()  # doctest: +SKIP
    """

    def __init__(
        self, config: ServeConfig, *, create_tables: bool = False, trace: str | Path | None = None
    ) -> None:
        self.config = config
        self.hasher = NgramHasher(config.engram)
        self.vocab_size = self.hasher.tokenizer.vocab_size
        self.health: dict[str, TableHealth] = {name: TableHealth() for name in config.table_names}
        self.stores: dict[str, TieredStore] = {}
        self.layers: dict[int, Engram] = {}
        self._trace = None
        self._submit_lock = threading.Lock()
        try:
            for layer, name in zip(config.engram.layer_ids, config.table_names, strict=True):
                self._open_layer(layer, name, create_tables or config.tables.create)
            self.device = next(iter(self.stores.values())).device
            self.embed = self._stand_in_embedding().to(self.device)
            if trace is not None:
                self._trace = self._open_trace(Path(trace))
        except BaseException:
            self.close()
            raise

    def _open_layer(self, layer: int, name: str, create: bool) -> None:
        """Open (build, verify) one layer's table and store, and build its Engram layer."""
        cfg = self.config
        path = cfg.table_path(layer)
        rows, dim = self.hasher.table_rows(layer), cfg.engram.head_dim
        if not path.exists():
            if not create:
                raise ConfigError(
                    f"tables.path: {path} (layer {layer}) does not exist; expected a table of "
                    f"{rows:,} x {dim} (make one with `tiered-store init {path} --random "
                    f"{rows}x{dim}`, or serve with --create-tables)"
                )
            log.info("creating %s: %d x %d %s", path, rows, dim, cfg.tables.dtype)
            path.parent.mkdir(parents=True, exist_ok=True)
            source = RandomSource(
                rows, dim, dtype=cfg.tables.dtype, seed=cfg.tables.seed + layer, std=cfg.tables.std
            )
            create_table(path, source, progress=False, metadata={"engram_layer": layer})
        if cfg.tables.verify_on_start and verify_counted(path, self.health[name]) is None:
            raise TableFormatError(f"tables.verify_on_start: {self.health[name].last_error}")
        store = TieredStore(cfg.store_config(layer))
        self.stores[name] = store
        if (store.rows, store.dim) != (rows, dim):
            raise ConfigError(
                f"tables.path: {path} is {store.rows:,} x {store.dim}; layer {layer} needs "
                f"{rows:,} x {dim} (engram_vocab_size, n_head_per_ngram and n_embed_per_ngram "
                "decide it)"
            )
        backend = store  # the Engram layer casts rows to its hidden dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.dense.seed * 1_000_003 + layer)
            if cfg.dense.checkpoint is not None:
                checkpoint = (cfg.base_dir / cfg.dense.checkpoint).resolve()
                module = Engram.from_checkpoint(
                    checkpoint, cfg.engram, cfg.backbone, layer, hasher=self.hasher, backend=backend
                )
            else:
                module = Engram(
                    cfg.engram, cfg.backbone, layer, hasher=self.hasher, backend=backend
                )
        self.layers[layer] = module.to(store.device).eval()

    def _stand_in_embedding(self) -> torch.Tensor:
        """The stand-in backbone's seeded token embedding, [EMBED_BUCKETS, hidden_size]."""
        gen = torch.Generator().manual_seed(self.config.dense.seed)
        return torch.randn(EMBED_BUCKETS, self.config.backbone.hidden_size, generator=gen)

    def _open_trace(self, path: Path) -> Any:
        """A TraceWriter whose header describes every layer's table."""

        tables = []
        for layer, name in zip(self.config.engram.layer_ids, self.config.table_names, strict=True):
            tables.append(
                {
                    "name": name,
                    "rows": self.hasher.table_rows(layer),
                    "heads": self.hasher.num_heads,
                    "primes": self.hasher.head_sizes(layer),
                    "offsets": self.hasher.offsets(layer).tolist(),
                    "layer": layer,
                }
            )
        header = {
            "tables": tables,
            "config": {"engram": self.config.engram.to_dict(), "source": self.config.source},
            "tokenizer": str(self.hasher.tokenizer.tokenizer_path),
            "recorded_by": "tiered-store serve",
        }
        return TraceWriter(path, header)

    @property
    def pad_id(self) -> int:
        """Original token id used to pad ragged text batches (``engram.pad_id``)."""
        return self.config.engram.pad_id

    def forward(self, input_ids: np.ndarray) -> StackResult:
        """Token ids [B, T] (checked by the caller) -> the final hidden state and each layer's output."""
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        row_ids = self.hasher.row_ids(ids)  # {layer: [B, T, H]}, all layers at batch start
        handles = {}
        # Prefetch every layer now; with a trace, submit and record under one lock so the trace
        # holds each store's batches in the order the store resolved them (replay then matches).
        with self._submit_lock if self._trace is not None else contextlib.nullcontext():
            for layer, name in zip(
                self.config.engram.layer_ids, self.config.table_names, strict=True
            ):
                handles[layer] = self.layers[layer].table.prefetch(row_ids[layer])
                if self._trace is not None:
                    self._trace.write(row_ids[layer].cpu().numpy(), name)
                    self._trace.end_batch()
        with torch.inference_mode():
            hc = self.config.backbone.hc_mult
            hidden = self.embed[ids % EMBED_BUCKETS].unsqueeze(2).expand(-1, -1, hc, -1)
            outputs = {}
            for layer in self.config.engram.layer_ids:
                out = self.layers[layer](hidden, row_ids=row_ids[layer], handle=handles[layer])
                outputs[layer] = out
                hidden = hidden + out
        return StackResult(
            hidden, outputs, {f"layer{k}": int(v.numel()) for k, v in row_ids.items()}
        )

    def stats(self) -> dict[str, Any]:
        """Every store's ``stats()`` by table name."""
        return {name: store.stats() for name, store in self.stores.items()}

    def close(self) -> None:
        """Close the trace (written atomically) and every store; idempotent."""
        trace, self._trace = self._trace, None
        if trace is not None:
            trace.close()
        for store in self.stores.values():
            store.close()


@dataclass
class StackResult:
    """What ``EngramStack.forward`` computed."""

    hidden: torch.Tensor  # final hidden state [B, T, hc_mult, hidden_size]
    outputs: dict[int, torch.Tensor]  # each Engram layer's output, by layer id
    rows_looked_up: dict[str, int]  # row ids looked up per table

    def summary(self) -> dict[str, Any]:
        """Shape, checksums and moments of the result (the JSON answer's core)."""
        final = self.hidden.detach().to("cpu", torch.float32).contiguous()
        return {
            "shape": list(final.shape),
            "layers": list(self.outputs),
            "checksum": _crc(final),
            "layer_checksums": {
                str(k): _crc(v.detach().to("cpu", torch.float32).contiguous())
                for k, v in self.outputs.items()
            },
            "mean": float(final.mean()) if final.numel() else 0.0,
            "rms": float(final.square().mean().sqrt()) if final.numel() else 0.0,
            "rows_looked_up": self.rows_looked_up,
        }


def _crc(tensor: torch.Tensor) -> str:
    """``crc32:xxxxxxxx`` of a CPU float32 tensor's little-endian bytes in C order."""
    return f"crc32:{zlib.crc32(tensor.numpy().astype('<f4', copy=False).tobytes()):08x}"

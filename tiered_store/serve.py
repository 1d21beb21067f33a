"""``tiered-store serve CONFIG``: Engram inference over tiered stores, over HTTP, with metrics.

One long-running process holds one ``TieredStore`` per Engram layer (table ``layer{L}``) and the
Engram layers that read them, and answers inference requests. At a request's start it hashes the
tokens for every layer and prefetches every layer's rows, then runs the layers in order, each
consuming its prefetch (the serving pattern the Engram paper describes).

The model is the Engram layers themselves over a stand-in backbone: a seeded token embedding
(``ids % 65536`` buckets, ``hidden_size`` wide, the same for every hyper-connection branch) gives
the hidden state, and each Engram layer's output is added to it in turn
(``h = h + engram_L(h)``). The dense Engram parameters are seeded (``dense.seed``) or loaded from
a reference-layout safetensors checkpoint (``dense.checkpoint``, keys ``layer{L}.*``).

Endpoints (JSON unless noted)
-----------------------------
``POST /v1/engram``
    Body ``{"input_ids": [[int, ...], ...]}`` (a ``[B, T]`` rectangle, or one ``[T]`` list) or
    ``{"text": "..."}`` / ``{"text": ["...", ...]}`` (tokenised with the DeepSeek tokenizer; rows
    of different lengths are padded on the right with ``engram.pad_id``, which cannot change the
    outputs at earlier positions: Engram is causal). Optional ``"return_output": true`` adds the
    final hidden state as nested lists. Answer::

        {"shape": [B, T, hc_mult, hidden_size],   # final hidden state
         "layers": [1, 15],
         "lengths": [T0, T1, ...],                 # tokens per sequence before padding
         "input_ids": [[...]],                     # only for text requests
         "checksum": "crc32:89abcdef",             # of the final hidden state, float32 LE, C order
         "layer_checksums": {"1": "crc32:...", ...},  # of each Engram layer's output
         "mean": 0.01, "rms": 0.98,                # of the final hidden state
         "rows_looked_up": {"layer1": B*T*H, ...},
         "elapsed_ms": 3.2,
         "output": [...]}                          # only with return_output

``GET /healthz``
    ``200 {"status": "ok"}``; ``503`` with a reason while draining or after a checksum pass
    found a table corrupt.
``GET /stats``
    Every store's ``stats()`` and geometry (rows, dim, dtype, row bytes, path) by table,
    checksum-pass results, and the request counters.
``GET /metrics``
    Prometheus text format (``tiered_store.metrics`` lists every metric). Also served on
    ``store.metrics.address`` (default ``127.0.0.1:9400``) unless that is ``""``.

Errors are ``{"error": "message"}`` with a 4xx status for the client's mistakes (bad JSON, wrong
types, ids outside the vocabulary, limits exceeded, unknown paths or methods) and 5xx for the
server's (503 when a cold read fails or the server is busy, 500 otherwise); a traceback is only
ever written to the server's log. SIGTERM or SIGINT stops accepting connections, lets requests in
flight finish, closes the trace and the table files, and exits 0.

Config (YAML; relative paths are relative to the file)::

    engram:   {engram_vocab_size: [20011, 20011], n_embed_per_ngram: 64, n_head_per_ngram: 4,
               layer_ids: [1, 4]}                 # EngramConfig (reference fields)
    backbone: {hidden_size: 64, hc_mult: 2}       # BackboneConfig
    tables:
      path: tables/layer{layer}.npy               # one table per Engram layer
      create: false                               # build seeded random tables when missing
    store:                                        # a StoreConfig without 'table', for every layer
      tiers: {hot: {capacity: 5%}, warm: {capacity: 25%}, cold: {io: pread}}
      metrics: {address: "127.0.0.1:9400"}
    server: {address: "127.0.0.1:8080", max_batch: 64}

Examples
--------
>>> from tiered_store.serve import InferenceServer, ServeConfig
>>> server = InferenceServer(ServeConfig.from_yaml("examples/serve.yaml"), create_tables=True)  # doctest: +SKIP
>>> server.start()  # doctest: +SKIP
>>> server.url  # doctest: +SKIP
'http://127.0.0.1:8080'
>>> server.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from pydantic import ValidationError as _PydanticValidationError

from .config import StoreConfig
from .config import format_validation_error as _format_validation_error
from .engram import BackboneConfig, Engram, EngramConfig, NgramHasher, load_engram_config
from .errors import ConfigError, RowIdError, TableFormatError, TieredStoreError, TierIOError
from .metrics import RequestCounters, TableHealth, build_registry, verify_counted
from .store import TieredStore

__all__ = [
    "EngramStack",
    "InferenceRequest",
    "InferenceServer",
    "RequestError",
    "ServeConfig",
    "parse_request",
    "register",
]

log = logging.getLogger("tiered_store.serve")

# Every default, with its unit.
SERVE_DEFAULTS: dict[str, Any] = {
    "server.address": "127.0.0.1:8080",  # host:port of the inference endpoint (port 0: any free)
    "server.max_batch": 64,  # sequences per request
    "server.max_seq_len": 4096,  # tokens per sequence
    "server.max_tokens": 16384,  # tokens per request (batch x sequence length)
    "server.max_body_bytes": 4 << 20,  # bytes, 4 MiB
    "server.max_output_values": 1 << 20,  # floats returned with return_output
    "server.max_concurrent": 4,  # requests computed at once; others wait (up to request_timeout_s)
    "server.request_timeout_s": 30.0,  # seconds: socket timeout, and the longest wait for a turn
    "server.torch_threads": 0,  # intra-op threads for torch (0: leave torch's default)
    "tables.path": "tables/layer{layer}.npy",  # '{layer}' becomes the Engram layer id
    "tables.dtype": "float32",  # dtype of tables built with create
    "tables.create": False,  # build seeded random tables that do not exist yet
    "tables.seed": 0,  # seed of created tables (layer L uses seed + L)
    "tables.std": 1.0,  # standard deviation of created tables (nn.Embedding's init)
    "tables.verify_on_start": False,  # re-check every block checksum before serving
    "tables.scrub_interval_s": 0.0,  # seconds between background checksum passes (0: never)
    "dense.checkpoint": None,  # reference-layout safetensors with layer{L}.* dense weights
    "dense.seed": 0,  # seed of the dense Engram parameters when there is no checkpoint
}
EMBED_BUCKETS = 65536  # rows of the stand-in backbone's token embedding (ids are taken modulo)
INFERENCE_PATH = "/v1/engram"
_GET_PATHS = ("/", "/healthz", "/stats", "/metrics")
_SERVE_KEYS = ("engram", "backbone", "tables", "store", "server", "dense")


# -- configuration --------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_address(value: str, key: str, *, allow_empty: bool = False) -> tuple[str, int] | None:
    """``"host:port"`` -> (host, port); ``""`` -> None when allowed; else ConfigError naming ``key``."""
    if value == "" and allow_empty:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        empty = " or '' (off)" if allow_empty else ""
        raise ConfigError(
            f"{key}: got {value!r}; expected 'host:port' like '127.0.0.1:8080'{empty}"
        )
    return host, int(port)


class ServerSection(_Model):
    """The HTTP endpoint and its limits."""

    address: str = SERVE_DEFAULTS["server.address"]
    max_batch: StrictInt = Field(default=SERVE_DEFAULTS["server.max_batch"], ge=1)
    max_seq_len: StrictInt = Field(default=SERVE_DEFAULTS["server.max_seq_len"], ge=1)
    max_tokens: StrictInt = Field(default=SERVE_DEFAULTS["server.max_tokens"], ge=1)
    max_body_bytes: StrictInt = Field(default=SERVE_DEFAULTS["server.max_body_bytes"], ge=64)
    max_output_values: StrictInt = Field(default=SERVE_DEFAULTS["server.max_output_values"], ge=0)
    max_concurrent: StrictInt = Field(default=SERVE_DEFAULTS["server.max_concurrent"], ge=1)
    request_timeout_s: float = Field(default=SERVE_DEFAULTS["server.request_timeout_s"], gt=0)
    torch_threads: StrictInt = Field(default=SERVE_DEFAULTS["server.torch_threads"], ge=0)


class TablesSection(_Model):
    """Where each Engram layer's table lives, and how to build missing ones."""

    path: str = SERVE_DEFAULTS["tables.path"]
    dtype: Literal["float32", "float16", "bfloat16"] = SERVE_DEFAULTS["tables.dtype"]
    create: StrictBool = SERVE_DEFAULTS["tables.create"]
    seed: StrictInt = Field(default=SERVE_DEFAULTS["tables.seed"], ge=0)
    std: float = Field(default=SERVE_DEFAULTS["tables.std"], gt=0)
    verify_on_start: StrictBool = SERVE_DEFAULTS["tables.verify_on_start"]
    scrub_interval_s: float = Field(default=SERVE_DEFAULTS["tables.scrub_interval_s"], ge=0)


class DenseSection(_Model):
    """The Engram layers' dense parameters (projections, norms, convolution)."""

    checkpoint: str | None = SERVE_DEFAULTS["dense.checkpoint"]
    seed: StrictInt = Field(default=SERVE_DEFAULTS["dense.seed"], ge=0)


class _Sections(_Model):
    tables: TablesSection = TablesSection()
    server: ServerSection = ServerSection()
    dense: DenseSection = DenseSection()


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``tiered-store serve`` needs: Engram geometry, tables, store tiers, server limits.

    Parameters
    ----------
    engram, backbone
        The Engram configuration and backbone facts (``hidden_size``, ``hc_mult``).
    tables, server, dense
        The sections of the same names (defaults in ``SERVE_DEFAULTS``).
    store
        The ``store`` section as written: a ``StoreConfig`` without ``table``, applied to every
        layer (``{layer}`` in ``static_rows``/``preload_rows`` paths becomes the layer id).
    base_dir
        Directory relative paths are resolved against (the YAML file's).
    source
        Where the config came from, for error messages.

    Examples
    --------
    >>> cfg = ServeConfig.from_dict({"engram": {"engram_vocab_size": [2003, 3001],
    ...     "n_embed_per_ngram": 64, "n_head_per_ngram": 4, "layer_ids": [1, 4]},
    ...     "backbone": {"hidden_size": 32, "hc_mult": 2},
    ...     "store": {"tiers": {"hot": {"capacity": "5%"}}}})
    >>> cfg.table_names, cfg.server.address
    (['layer1', 'layer4'], '127.0.0.1:8080')
    >>> cfg.store_config(4).tiers.hot.capacity, cfg.table_path(4).name
    ('5%', 'layer4.npy')
    """

    engram: EngramConfig
    backbone: BackboneConfig
    tables: TablesSection
    server: ServerSection
    dense: DenseSection
    store: Mapping[str, Any]
    base_dir: Path
    source: str = "config"

    @classmethod
    def from_dict(
        cls, data: Any, *, base_dir: Path | None = None, source: str = "config"
    ) -> ServeConfig:
        """Validate a plain mapping; errors name the key path and what was expected."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: got {type(data).__name__}; expected a mapping at the top")
        unknown = sorted(str(k) for k in data if k not in _SERVE_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: {unknown[0]}: unknown key; expected one of {', '.join(_SERVE_KEYS)}"
            )
        engram, backbone = load_engram_config(
            {"engram": data.get("engram") or {}, "backbone": data.get("backbone") or {}}
        )
        try:
            sections = _Sections.model_validate(
                {k: data[k] for k in ("tables", "server", "dense") if data.get(k) is not None}
            )
        except _PydanticValidationError as exc:
            raise ConfigError(_format_validation_error(exc, source)) from None
        store = data.get("store") or {}
        if not isinstance(store, Mapping):
            raise ConfigError(f"{source}: store: got {type(store).__name__}; expected a mapping")
        if "table" in store:
            raise ConfigError(
                f"{source}: store.table: each layer's table comes from tables.path; remove it"
            )
        if len(engram.layer_ids) > 1 and "{layer}" not in sections.tables.path:
            raise ConfigError(
                f"{source}: tables.path: got {sections.tables.path!r}; expected a '{{layer}}' "
                f"placeholder (there are {len(engram.layer_ids)} Engram layers, one table each)"
            )
        check_address(sections.server.address, "server.address")
        cfg = cls(
            engram=engram,
            backbone=backbone,
            tables=sections.tables,
            server=sections.server,
            dense=sections.dense,
            store=copy.deepcopy(dict(store)),
            base_dir=(base_dir or Path.cwd()).resolve(),
            source=source,
        )
        for layer in engram.layer_ids:  # validate every layer's store config now
            check_address(
                cfg.store_config(layer).metrics.address, "store.metrics.address", allow_empty=True
            )
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Load and validate a YAML file; relative paths are relative to it."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from None
        return cls.from_dict(data, base_dir=path.parent, source=str(path))

    @property
    def table_names(self) -> list[str]:
        """``layer{L}`` for every Engram layer, in layer order."""
        return [f"layer{layer}" for layer in self.engram.layer_ids]

    def table_path(self, layer: int) -> Path:
        """The table file of Engram layer ``layer``."""
        return (self.base_dir / self.tables.path.replace("{layer}", str(layer))).resolve()

    def store_config(self, layer: int) -> StoreConfig:
        """The ``StoreConfig`` of layer ``layer``: the store section plus its table path."""
        data = _replace_layer(copy.deepcopy(dict(self.store)), layer)
        data["table"] = {"path": str(self.table_path(layer))}
        return StoreConfig.from_dict(
            data, base_dir=self.base_dir, source=f"{self.source} (store section, layer {layer})"
        )

    @property
    def metrics_address(self) -> str:
        """Where the separate ``/metrics`` listener binds (``""``: none)."""
        return self.store_config(self.engram.layer_ids[0]).metrics.address

    def with_overrides(self, **server: Any) -> ServeConfig:
        """A copy with some ``server`` fields replaced (``address=...``); ``metrics_address``
        replaces ``store.metrics.address``."""
        store = copy.deepcopy(dict(self.store))
        if "metrics_address" in server:
            address = server.pop("metrics_address")
            check_address(address, "--metrics-address", allow_empty=True)
            store["metrics"] = {**store.get("metrics", {}), "address": address}
        if "address" in server:
            check_address(server["address"], "--address")
        return ServeConfig(
            engram=self.engram,
            backbone=self.backbone,
            tables=self.tables,
            server=self.server.model_copy(update=server),
            dense=self.dense,
            store=store,
            base_dir=self.base_dir,
            source=self.source,
        )


def _replace_layer(value: Any, layer: int) -> Any:
    """``{layer}`` -> the layer id in every string of a nested config."""
    if isinstance(value, str):
        return value.replace("{layer}", str(layer))
    if isinstance(value, dict):
        return {k: _replace_layer(v, layer) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_layer(v, layer) for v in value]
    return value


# -- the model --------------------------------------------------------------------------------------


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
            from .table_format import RandomSource, create_table

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
        from zipf_analysis.trace import TraceWriter

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


# -- requests ---------------------------------------------------------------------------------------


class RequestError(TieredStoreError, ValueError):
    """A client's request is malformed or over a limit; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow  # the Allow header of a 405


@dataclass
class InferenceRequest:
    """A validated inference request."""

    input_ids: np.ndarray  # int64 [B, T], padded on the right for ragged text
    lengths: list[int]  # tokens per sequence before padding
    from_text: bool
    return_output: bool


_REQUEST_KEYS = ("input_ids", "text", "return_output")
# Content-Types read as JSON: JSON itself, none, and what `curl -d` and plain clients send.
_BODY_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")


def parse_request(body: bytes, server: ServerSection, stack: EngramStack) -> InferenceRequest:
    """Validate an inference request body; raise ``RequestError`` (400/413) naming the problem.

    Examples
    --------
    >>> parse_request(b'{"input_ids": [[1, 2, 3]]}', ServerSection(), stack).input_ids.shape  # doctest: +SKIP
    (1, 3)
    >>> parse_request(b'{"input_ids": [1.5]}', ServerSection(), stack)  # doctest: +SKIP
    Traceback (most recent call last):
    tiered_store.serve.RequestError: input_ids[0]: got float 1.5; expected an integer token id
    """
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError(400, "body: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError(
            400,
            f'body: got a JSON {_json_type(doc)}; expected an object like {{"input_ids": [[1, 2, 3]]}}',
        )
    unknown = sorted(k for k in doc if k not in _REQUEST_KEYS)
    if unknown:
        raise RequestError(
            400, f"{unknown[0]}: unknown key; expected one of {', '.join(_REQUEST_KEYS)}"
        )
    return_output = doc.get("return_output", False)
    if not isinstance(return_output, bool):
        raise RequestError(
            400, f"return_output: got {_json_type(return_output)}; expected true or false"
        )
    if ("input_ids" in doc) == ("text" in doc):
        raise RequestError(400, "body: expected exactly one of 'input_ids' and 'text'")
    if "text" in doc:
        rows = _tokenize(doc["text"], stack)
        from_text = True
    else:
        rows = _id_rows(doc["input_ids"])
        from_text = False
    lengths = [len(r) for r in rows]
    _check_limits(lengths, server, "text" if from_text else "input_ids")
    if not from_text and len(set(lengths)) > 1:
        raise RequestError(
            400,
            f"input_ids: rows have different lengths {sorted(set(lengths))}; expected a rectangle "
            "[B, T] (send text, or pad the rows yourself)",
        )
    width = max(lengths)
    ids = np.full((len(rows), width), stack.pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    if not from_text:
        bad = (ids < 0) | (ids >= stack.vocab_size)
        if bad.any():
            b, t = (int(x) for x in np.argwhere(bad)[0])
            raise RequestError(
                400,
                f"input_ids[{b}][{t}]: token id {int(ids[b, t])} is outside the tokenizer vocabulary; "
                f"expected 0 <= id < {stack.vocab_size}",
            )
    if return_output:
        values = ids.size * stack.config.backbone.hc_mult * stack.config.backbone.hidden_size
        if values > server.max_output_values:
            raise RequestError(
                413,
                f"return_output: the output has {values:,} values; this server returns at most "
                f"{server.max_output_values:,} (server.max_output_values)",
            )
    return InferenceRequest(ids, lengths, from_text, return_output)


def _id_rows(value: Any) -> list[list[int]]:
    """``input_ids`` as a list of rows of ints (type-checked, range-checked later)."""
    if not isinstance(value, list) or not value:
        raise RequestError(
            400,
            f"input_ids: got {_json_type(value)}; expected a non-empty list of token ids or of rows",
        )
    rows = value if isinstance(value[0], list) else [value]
    for b, row in enumerate(rows):
        where = f"input_ids[{b}]" if rows is value else "input_ids"
        if not isinstance(row, list):
            raise RequestError(400, f"{where}: got {_json_type(row)}; expected a list of token ids")
        for t, x in enumerate(row):
            if type(x) is not int:  # bool is a subclass of int: rejected too
                raise RequestError(
                    400,
                    f"{where}[{t}]: got {_json_type(x)} {json.dumps(x)[:40]}; expected an "
                    "integer token id",
                )
            if not -(1 << 62) < x < 1 << 62:
                raise RequestError(400, f"{where}[{t}]: token id {x:.3g} is out of range")
    return rows


def _tokenize(value: Any, stack: EngramStack) -> list[list[int]]:
    """``text`` (a string or a list of strings) -> token id rows."""
    texts = value if isinstance(value, list) else [value]
    if not texts:
        raise RequestError(400, "text: got an empty list; expected a string or a list of strings")
    rows = []
    for i, text in enumerate(texts):
        where = f"text[{i}]" if isinstance(value, list) else "text"
        if not isinstance(text, str):
            raise RequestError(400, f"{where}: got {_json_type(text)}; expected a string")
        ids = stack.hasher.tokenizer.encode(text).tolist()
        if not ids:
            raise RequestError(400, f"{where}: tokenises to no tokens; expected some text")
        rows.append(ids)
    return rows


def _check_limits(lengths: list[int], server: ServerSection, key: str) -> None:
    """Batch size, sequence length and total tokens against the server's limits (413)."""
    if len(lengths) > server.max_batch:
        raise RequestError(
            413,
            f"{key}: {len(lengths)} sequences; this server takes at most {server.max_batch} (server.max_batch)",
        )
    if min(lengths) == 0:
        raise RequestError(
            400, f"{key}[{lengths.index(0)}]: empty sequence; expected at least one token"
        )
    if max(lengths) > server.max_seq_len:
        raise RequestError(
            413,
            f"{key}: a sequence of {max(lengths)} tokens; this server takes at most "
            f"{server.max_seq_len} per sequence (server.max_seq_len)",
        )
    total = len(lengths) * max(lengths)
    if total > server.max_tokens:
        raise RequestError(
            413,
            f"{key}: {total:,} tokens (batch x longest sequence); this server takes at most "
            f"{server.max_tokens:,} per request (server.max_tokens)",
        )


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


# -- the HTTP server --------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    """Threads per request, joined on close (so in-flight requests finish before exit)."""

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    app: InferenceServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log an error that escaped a handler thread, without dumping it to stderr raw."""
        log.exception("unhandled error serving %s", client_address)


class _HTTPServer6(_HTTPServer):
    """The same over IPv6."""

    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the ``InferenceServer``; every answer is JSON (or metrics text)."""

    server: _HTTPServer
    server_version = "tiered-store"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: shutdown never waits on idle ones

    def setup(self) -> None:
        """Apply ``server.request_timeout_s`` to the connection's socket."""
        self.timeout = self.server.app.config.server.request_timeout_s
        super().setup()

    # Every method goes through _dispatch, which answers 404/405 for the wrong path or method.

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        """Route, answer, count; client mistakes get 4xx, anything else a generic 5xx."""
        app = self.server.app
        path = self.path.split("?", 1)[0]
        handler = path if path in (*_GET_PATHS, INFERENCE_PATH) else "other"
        start = time.perf_counter()
        app.requests.begin()
        self._responded = False
        code, tokens = 500, 0
        try:
            code, tokens = self._route(app, method, path)
        except RequestError as exc:
            code = exc.status
            extra = {"Allow": exc.allow} if exc.allow else {}
            self._send_json(code, {"error": exc.message}, extra)
        except RowIdError as exc:  # ids the request checks let through but the hasher refused
            code = 400
            self._send_json(code, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            code = 499  # the client went away; nothing to answer
        except TierIOError as exc:
            log.error("cold tier read failed: %s", exc)
            code = 503
            self._send_json(code, {"error": f"cold tier read failed: {exc}"})
        except Exception:
            log.exception("error handling %s %s", method, path)
            code = 500
            self._send_json(
                code, {"error": "internal server error (details are in the server log)"}
            )
        finally:
            app.requests.end(handler, code, time.perf_counter() - start, tokens)

    def _route(self, app: InferenceServer, method: str, path: str) -> tuple[int, int]:
        """Answer one request; returns (status, tokens served)."""
        if path == INFERENCE_PATH:
            if method != "POST":
                raise _method_not_allowed(method, path, "POST")
            return app.infer(self)
        if path not in _GET_PATHS:
            raise RequestError(
                404,
                f"no endpoint {path!r}; expected one of {', '.join((*_GET_PATHS, INFERENCE_PATH))}",
            )
        if method not in ("GET", "HEAD"):
            raise _method_not_allowed(method, path, "GET")
        if path == "/metrics":
            body, content_type = app.metrics_text()
            self._send(200, body, content_type)
            return 200, 0
        status, doc = app.get(path)
        self._send_json(status, doc)
        return status, 0

    def read_body(self, limit: int) -> bytes:
        """The request body, checked for Content-Type and Content-Length first (411/413/415)."""
        content_type = self.headers.get("Content-Type", "application/json")
        if content_type.split(";", 1)[0].strip().lower() not in _BODY_TYPES:
            raise RequestError(
                415, f"Content-Type: got {content_type!r}; expected application/json"
            )
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "Transfer-Encoding: not supported; send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length: missing; expected the body's length in bytes")
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(400, f"Content-Length: got {length!r}; expected a byte count")
        n = int(length)
        if n > limit:
            self.close_connection = True
            raise RequestError(
                413,
                f"body: {n:,} bytes; this server takes at most {limit:,} (server.max_body_bytes)",
            )
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            raise RequestError(
                400, f"body: got {len(body)} of the {n} bytes Content-Length announced"
            )
        return body

    def _send_json(self, status: int, doc: Any, headers: Mapping[str, str] | None = None) -> None:
        """Answer with ``doc`` as JSON (nothing if an answer was already started)."""
        self._send(status, json.dumps(doc).encode() + b"\n", "application/json", headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Status line, headers and body (no body for HEAD)."""
        if self._responded:
            return
        self._responded = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by http.server itself (bad request line, oversize headers): JSON too."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        body = json.dumps({"error": message or self.responses.get(code, ("error",))[0]}).encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) + 1))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body + b"\n")

    def log_message(self, format: str, *args: Any) -> None:
        """Access log lines go to the module logger (DEBUG unless --access-log)."""
        log.log(self.server.app.access_log_level, "%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        """Protocol errors go to the module logger as warnings."""
        log.warning("%s %s", self.address_string(), format % args)


def _method_not_allowed(method: str, path: str, allowed: str) -> RequestError:
    """A 405 naming the allowed method."""
    return RequestError(
        405, f"{method} {path}: method not allowed; expected {allowed}", allow=allowed
    )


class InferenceServer:
    """The ``serve`` process: an ``EngramStack``, its HTTP endpoint and its metrics listener.

    Parameters
    ----------
    config
        The serve configuration.
    create_tables
        Build missing tables (for demos and tests).
    trace
        Record every lookup served into this trace file (closed by ``stop``).
    access_log
        Log every request at INFO (default DEBUG).

    Examples
    --------
    >>> server = InferenceServer(config.with_overrides(address="127.0.0.1:0"))  # doctest: +SKIP
    >>> server.start()  # doctest: +SKIP
    >>> import urllib.request, json
    >>> req = urllib.request.Request(server.url + "/v1/engram", data=b'{"text": "Hello"}')  # doctest: +SKIP
    >>> json.load(urllib.request.urlopen(req))["shape"]  # doctest: +SKIP
    [1, 1, 2, 64]
    >>> server.stop()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        create_tables: bool = False,
        trace: str | Path | None = None,
        access_log: bool = False,
    ) -> None:
        self.config = config
        self.access_log_level = logging.INFO if access_log else logging.DEBUG
        if config.server.torch_threads:
            torch.set_num_threads(config.server.torch_threads)
        self.stack = EngramStack(config, create_tables=create_tables, trace=trace)
        self.requests = RequestCounters()
        self.registry = build_registry(self.stack.stores, self.stack.health, self.requests)
        self._turns = threading.BoundedSemaphore(config.server.max_concurrent)
        self._draining = False
        self._stopped = threading.Event()
        self._started_at = time.time()
        self._httpd: _HTTPServer | None = None
        self._metrics_httpd: Any = None
        self._threads: list[threading.Thread] = []
        self._scrub_stop = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both listeners and serve in background threads; returns at once."""
        host, port = check_address(self.config.server.address, "server.address")
        try:
            self._httpd = _bind(host, port)
        except OSError as exc:
            self.stack.close()
            raise ConfigError(
                f"server.address: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None
        self._httpd.app = self
        _warn_if_exposed(host, "server.address")
        metrics = check_address(
            self.config.metrics_address, "store.metrics.address", allow_empty=True
        )
        if metrics == (host, port) and port != 0:
            metrics = None  # the same address: /metrics is served there anyway
        if metrics is not None:
            from prometheus_client import start_http_server

            try:
                self._metrics_httpd, _ = start_http_server(metrics[1], metrics[0], self.registry)
            except OSError as exc:
                self._httpd.server_close()
                self.stack.close()
                raise ConfigError(
                    f"store.metrics.address: cannot listen on {metrics[0]}:{metrics[1]} ({exc.strerror})"
                ) from None
            _warn_if_exposed(metrics[0], "store.metrics.address")
        self._spawn(self._httpd.serve_forever, "http")
        if self.config.tables.scrub_interval_s > 0:
            self._spawn(self._scrub_loop, "checksum-scrub")

    def _spawn(self, target: Any, name: str) -> None:
        """Run ``target`` in a daemon thread joined by ``stop``."""
        thread = threading.Thread(target=target, name=f"tiered-store-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def url(self) -> str:
        """``http://host:port`` of the inference endpoint (after ``start``)."""
        assert self._httpd is not None, "start() first"
        return _url(self._httpd.server_address)

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` of the separate metrics listener, if any."""
        if self._metrics_httpd is None:
            return None
        return _url(self._metrics_httpd.server_address) + "/metrics"

    def stop(self) -> None:
        """Stop accepting, finish requests in flight, close the trace and the tables; idempotent."""
        if self._stopped.is_set():
            return
        self._draining = True
        self._scrub_stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()  # serve_forever returns: no new connections are accepted
            self._httpd.server_close()  # closes the socket, then joins every request thread
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self.stack.close()
        self._stopped.set()

    def serve_until_signal(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain and stop; returns the exit status (0)."""
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            log.info("%s: draining", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            print(json.dumps(self.ready_line()), flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        log.info("stopped")
        return 0

    def ready_line(self) -> dict[str, Any]:
        """What the process prints once it listens (one JSON line on stdout)."""
        return {
            "event": "listening",
            "url": self.url,
            "metrics_url": self.metrics_url or self.url + "/metrics",
            "tables": list(self.stack.stores),
            "pid": os.getpid(),
        }

    # -- requests -------------------------------------------------------------------------------
    def infer(self, handler: _Handler) -> tuple[int, int]:
        """Read, validate and run one inference request; returns (200, tokens)."""
        start = time.perf_counter()
        server = self.config.server
        request = parse_request(handler.read_body(server.max_body_bytes), server, self.stack)
        if not self._turns.acquire(timeout=server.request_timeout_s):
            raise RequestError(503, "server busy: no free compute slot in time; retry later")
        try:
            result = self.stack.forward(request.input_ids)
        finally:
            self._turns.release()
        doc = result.summary()
        doc["lengths"] = request.lengths
        if request.from_text:
            doc["input_ids"] = request.input_ids.tolist()
        if request.return_output:
            doc["output"] = result.hidden.detach().to("cpu", torch.float32).tolist()
        doc["elapsed_ms"] = round((time.perf_counter() - start) * 1e3, 3)
        handler._send_json(200, doc)
        return 200, int(sum(request.lengths))

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """The JSON answers of the GET endpoints other than /metrics."""
        if path == "/healthz":
            problems = self.problems()
            if problems:
                return 503, {"status": "unhealthy", "problems": problems}
            return 200, {"status": "ok"}
        if path == "/stats":
            return 200, self.stats()
        return 200, {
            "service": "tiered-store serve",
            "endpoints": {
                f"POST {INFERENCE_PATH}": '{"input_ids": [[...]]} or {"text": "..."}',
                "GET /healthz": "liveness and table health",
                "GET /stats": "store statistics per table",
                "GET /metrics": "Prometheus metrics",
            },
            "tables": list(self.stack.stores),
        }

    def problems(self) -> list[str]:
        """Why the server is unhealthy (empty when it is healthy)."""
        out = ["draining: shutting down"] if self._draining else []
        for name, health in self.stack.health.items():
            if health.last_error:
                out.append(f"table {name}: checksum pass failed: {health.last_error}")
        return out

    def stats(self) -> dict[str, Any]:
        """Store statistics and geometry per table, checksum passes, and the request counters."""
        return {
            "tables": self.stack.stats(),
            "geometry": {
                name: {
                    "rows": store.rows,
                    "dim": store.dim,
                    "dtype": str(store.dtype).removeprefix("torch."),
                    "row_bytes": store.row_bytes,
                    "path": str(store.cold.path),
                }
                for name, store in self.stack.stores.items()
            },
            "health": {
                name: {
                    "verifications": h.verifications,
                    "checksum_failures": h.checksum_failures,
                    "last_error": h.last_error,
                }
                for name, h in self.stack.health.items()
            },
            "server": self.requests.snapshot(),
            "uptime_s": round(time.time() - self._started_at, 3),
        }

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition of this server's registry."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _scrub_loop(self) -> None:
        """Re-verify every table's checksums every ``tables.scrub_interval_s`` seconds."""
        interval = self.config.tables.scrub_interval_s
        while not self._scrub_stop.wait(interval):
            for layer, name in zip(
                self.config.engram.layer_ids, self.config.table_names, strict=True
            ):
                if self._scrub_stop.is_set():
                    return
                health = self.stack.health[name]
                if verify_counted(self.config.table_path(layer), health) is None:
                    log.error("checksum pass over %s failed: %s", name, health.last_error)


def _bind(host: str, port: int) -> _HTTPServer:
    """A listening server on (host, port), IPv6 when the host is."""
    cls = _HTTPServer6 if ":" in host else _HTTPServer
    return cls((host, port), _Handler)


def _url(address: tuple) -> str:
    """``http://host:port`` of a bound socket address."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _warn_if_exposed(host: str, key: str) -> None:
    """Say so when a listener is reachable from other machines."""
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        log.warning("%s: listening on %s, reachable from other machines", key, host)


# -- the CLI ----------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="serve Engram inference over tiered stores via HTTP, with Prometheus metrics",
        description="Holds one tiered store per Engram layer and the Engram layers over a stand-in "
        f"backbone; answers POST {INFERENCE_PATH} with token ids or text (JSON), GET /healthz, "
        "/stats and /metrics. Prints one JSON line with the bound URLs once listening. SIGTERM or "
        "SIGINT drains requests in flight and exits 0. See examples/serve.yaml for the config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", type=Path, help="serve config (YAML)")
    p.add_argument(
        "--address", help="host:port of the inference endpoint (overrides server.address)"
    )
    p.add_argument(
        "--metrics-address",
        help="host:port of a separate /metrics listener, '' for none (overrides store.metrics.address)",
    )
    p.add_argument(
        "--create-tables", action="store_true", help="build seeded random tables that do not exist"
    )
    p.add_argument(
        "--record-trace",
        type=Path,
        metavar="PATH",
        help="record every lookup served as a trace (read it with `tiered-store replay`)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until a signal; returns the exit status."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    config = ServeConfig.from_yaml(args.config)
    overrides = {}
    if args.address is not None:
        overrides["address"] = args.address
    if args.metrics_address is not None:
        overrides["metrics_address"] = args.metrics_address
    if overrides:
        config = config.with_overrides(**overrides)
    server = InferenceServer(
        config,
        create_tables=args.create_tables,
        trace=args.record_trace,
        access_log=args.access_log,
    )
    return server.serve_until_signal()

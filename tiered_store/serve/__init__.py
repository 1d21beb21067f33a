"""``tiered-store serve CONFIG``: Engram inference over tiered stores, over HTTP, with metrics.

One long-running process holds one ``TieredStore`` per Engram layer (table ``layer{L}``) and the
Engram layers that read them, and answers inference requests. At a request's start it hashes the
tokens for every layer and prefetches every layer's rows, then runs the layers in order, each
consuming its prefetch (the serving pattern the Engram paper describes).

The model is the Engram layers over a stand-in backbone (``stack`` says how it is built).

Modules: ``config`` (``ServeConfig``, ``SERVE_DEFAULTS``), ``stack`` (``EngramStack``, the model),
``inference_request`` (request bodies), ``http_handler`` (the HTTP transport), ``server``
(``InferenceServer``: lifecycle, answers, scrubber), ``cli`` (the subcommand) and ``client`` (a
small client for the API: a ``serve`` subprocess, JSON GET/POST, a bounded load generator).

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

from .cli import register, run_serve
from .config import (
    SERVE_DEFAULTS,
    DenseSection,
    ServeConfig,
    ServerSection,
    TablesSection,
    check_address,
)
from .http_handler import INFERENCE_PATH
from .inference_request import InferenceRequest, RequestError, parse_request
from .server import InferenceServer
from .stack import EMBED_BUCKETS, EngramStack, StackResult

__all__ = [
    "EMBED_BUCKETS",
    "INFERENCE_PATH",
    "SERVE_DEFAULTS",
    "DenseSection",
    "EngramStack",
    "InferenceRequest",
    "InferenceServer",
    "RequestError",
    "ServeConfig",
    "ServerSection",
    "StackResult",
    "TablesSection",
    "check_address",
    "parse_request",
    "register",
    "run_serve",
]

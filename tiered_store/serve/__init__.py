"""``tiered-store serve CONFIG``: a converted Engram checkpoint over tiered stores, over HTTP.

One long-running process opens a checkpoint written by ``convert_checkpoint`` (one table file
per Engram layer plus ``dense.safetensors``) with ``load_tiered_model``: one ``TieredStore`` per
Engram layer, and the checkpoint's ``EngramLM`` reading them. At a request's start the model
hashes the tokens for every Engram layer and prefetches every layer's rows, then runs its layers
in order, each Engram layer consuming its prefetch (the serving pattern the Engram paper
describes). The HTTP server is uvicorn with a Starlette app.

Modules: ``config`` (``ServeConfig``, ``SERVE_DEFAULTS``), ``served_model`` (``ServedModel``,
``create_checkpoint``), ``guarded_table`` (``GuardedTable``: table faults become one typed,
counted error), ``inference_request`` (request bodies), ``app`` (the Starlette app),
``server`` (``InferenceServer``: lifecycle, answers, scrubber), ``cli`` (the subcommands) and
``client`` (a small client: a ``serve`` subprocess, JSON GET/POST, a bounded load generator).

Endpoints (JSON unless noted)
-----------------------------
``POST /v1/engram``
    Body ``{"input_ids": [[int, ...], ...]}`` (a ``[B, T]`` rectangle, or one ``[T]`` list) or
    ``{"text": "..."}`` / ``{"text": ["...", ...]}`` (tokenised with the DeepSeek tokenizer; rows
    of different lengths are padded on the right with ``engram.pad_id``; the model is causal, so
    each sequence's answer reads its own last token). Optional ``"top_k": k`` (1-20, default 1).
    Answer::

        {"shape": [B, T],
         "layers": [1, 3],                          # Engram layers
         "lengths": [T0, T1, ...],                  # tokens per sequence before padding
         "input_ids": [[...]],                      # only for text requests
         "next_token_ids": [[id, ...], ...],        # top_k per sequence, best first
         "next_token_logprobs": [[-1.2, ...], ...],
         "logits": {"checksum": "crc32:89abcdef", "mean": 0.01, "rms": 0.98},  # [B, vocab]
         "hidden_checksum": "crc32:...",            # final normalised hidden state [B, T, D]
         "layer_checksums": {"1": "crc32:...", ...},  # each Engram layer's output
         "rows_looked_up": {"engram_layer1": B*T*H, ...},
         "elapsed_ms": 3.2}

    Checksums are CRC-32 of the float32 little-endian bytes in C order.
``GET /healthz``
    ``200 {"status": "ok"}``; ``503`` with the problems while draining, after a checksum pass
    found a table corrupt, or for ``server.health_hold_s`` after a table's lookup failed (until
    a reload reopens the table on another file, if sooner; one that failed because its store
    was closed, until it reopens), and while a table's store is closed (a reload could not
    reopen it: every request answers 503 until a check does).
``GET /stats``
    Every store's ``stats()``, table geometry and health, and the request counters.
``GET /metrics``
    Prometheus text format (``tiered_store.metrics`` lists every metric). Also served on
    ``store.metrics.address`` (default ``127.0.0.1:9400``) unless that is ``""``.

Errors are ``{"error": "message"}``: 4xx for the client's mistakes (bad JSON, wrong types, ids
outside the vocabulary, limits exceeded, a body that stalls: 408), 503 when a table's rows
cannot be served (a failed read, a bad table file, non-finite values) or no compute turn frees
up in time, 500 otherwise. Messages never carry server paths; tracebacks only go to the log.
SIGTERM or SIGINT stops accepting connections, lets requests in flight finish (one still running
after ``2 x server.request_timeout_s`` is answered 503; the tables close once its worker is done,
or ``server.request_timeout_s`` later if it hangs), closes the trace and the table files, and
exits 0; one while the server starts (``checkpoint.verify_on_start`` over a big table) stops it
there, before it listens, what it opened closed.

Examples
--------
>>> from tiered_store.serve import InferenceServer, ServeConfig
>>> server = InferenceServer(ServeConfig.from_yaml("examples/serve.yaml"), create_tables=True)  # doctest: +SKIP
>>> server.start()  # doctest: +SKIP
>>> server.url  # doctest: +SKIP
'http://127.0.0.1:8080'
>>> server.stop()  # doctest: +SKIP
"""

import lazy_loader

# Exports load on first use (the stub beside this file lists them), so that the command
# line's --help and light tools need not import torch.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)

"""``InferenceServer``: the serve process's lifecycle, its answers, and the checksum scrubber.

It owns an ``EngramStack``, the request counters and the metrics registry; the HTTP transport
(``http_handler``) calls ``infer``, ``get`` and ``metrics_text`` and writes what they return.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from ..errors import ConfigError
from ..metrics import RequestCounters, build_registry, verify_counted
from .config import ServeConfig, check_address
from .http_handler import INFERENCE_PATH, DrainingHTTPServer, bind_http_server, http_url
from .inference_request import RequestError, parse_request
from .stack import EngramStack

__all__ = ["InferenceServer"]

log = logging.getLogger("tiered_store.serve")


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
        self._httpd: DrainingHTTPServer | None = None
        self._metrics_httpd: Any = None
        self._threads: list[threading.Thread] = []
        self._scrub_stop = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both listeners and serve in background threads; returns at once."""
        host, port = check_address(self.config.server.address, "server.address")
        try:
            self._httpd = bind_http_server(host, port, self)
        except OSError as exc:
            self.stack.close()
            raise ConfigError(
                f"server.address: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None
        _warn_if_exposed(host, "server.address")
        metrics = check_address(
            self.config.metrics_address, "store.metrics.address", allow_empty=True
        )
        if metrics == (host, port) and port != 0:
            metrics = None  # the same address: /metrics is served there anyway
        if metrics is not None:
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
        return http_url(self._httpd.server_address)

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` of the separate metrics listener, if any."""
        if self._metrics_httpd is None:
            return None
        return http_url(self._metrics_httpd.server_address) + "/metrics"

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
    def infer(self, body: bytes, *, received_at: float | None = None) -> tuple[dict[str, Any], int]:
        """Validate and run one inference request body; returns (the JSON answer, tokens served).

        ``received_at`` (a ``time.perf_counter()`` reading) is when the request arrived, so
        ``elapsed_ms`` includes reading the body; default now.
        """
        start = time.perf_counter() if received_at is None else received_at
        server = self.config.server
        request = parse_request(body, server, self.stack)
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
        return doc, int(sum(request.lengths))

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


def _warn_if_exposed(host: str, key: str) -> None:
    """Say so when a listener is reachable from other machines."""
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        log.warning("%s: listening on %s, reachable from other machines", key, host)

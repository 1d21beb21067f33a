"""``InferenceServer``: the serve process's lifecycle, its answers, and the checksum scrubber.

Lifecycle: ``start()`` binds both listeners first (an address in use fails at once, naming it),
then opens the checkpoint (``ServedModel``), then runs uvicorn over the app (``app.build_app``)
in a background thread. ``stop()`` drains: uvicorn stops accepting, lets requests in flight
finish (up to ``2 x server.request_timeout_s``), then the trace and the tables are closed (once
the workers still computing are done, or ``server.request_timeout_s`` later).
``serve_until_signal()`` does both around SIGTERM/SIGINT, in the main thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import ConfigError
from ..latency import buckets_covering
from ..metrics import RequestCounters, build_registry, build_sharded_registry
from ..store import seconds_left
from .app import INFERENCE_PATH, WILDCARD_HOSTS, build_app
from .config import ServeConfig, check_address
from .http_protocol import with_head_deadline
from .inference_request import ClientGone, InferenceRequest, RequestError, parse_request
from .ranks import HEALTH_READ_S
from .served_model import Announced, ServedModel

__all__ = ["InferenceServer"]

log = logging.getLogger("tiered_store.serve")
T = TypeVar("T")
_DIRECTORY_PREFIX = re.compile(r"(?<![\w.])/(?:[^\s/'\":,()\[\]]+/)+")  # '/abs/dir/' of a path
BACKGROUND_JOIN_S = 30.0  # stop() waits this long for a background thread (a checksum pass)
RANK_WATCH_JOIN_S = 2 * HEALTH_READ_S  # and this long for rank 0's watch of the others (its
# reads of a healthy store take milliseconds; a thread left in one aborts the process at exit)
STOP_SLACK_S = 10.0  # the rest of a stop: the signal seen, uvicorn's own steps, the exit
AFTER_WAITS_S = 5.0  # of STOP_SLACK_S, what the stop's waits leave to the work after them (the
# warm-restart saves, the trace's close, the exit)


def drain_s(config: ServeConfig) -> float:
    """How long ``stop()`` lets the requests in flight finish: 2 x ``server.request_timeout_s``."""
    return 2 * config.server.request_timeout_s


def stop_announced_within_s(config: ServeConfig) -> float:
    """Over sharded tables, the longest rank 0 takes from a signal to its ``STOP`` to the other
    ranks (which serve its last requests until then): ``stop_within_s``."""
    return stop_within_s(config)


def stop_within_s(config: ServeConfig) -> float:
    """The longest ``stop()`` takes after a signal: its drain, its wait for a checksum pass under
    way, ``ServedModel.close``'s for the answers still computing (``server.request_timeout_s``),
    over sharded tables the announcement of its ``STOP`` (``sharding.timeout_s``), and the rest
    (the 'listening' line's ``stop_within_s``: ``ServeProcess.stop`` kills no sooner). The stop
    holds its waits to it, less ``AFTER_WAITS_S`` (what is left is passed down, to the stores'
    close too: one whose read hangs for good is left to close under it, not waited for); the
    work after them (the warm-restart saves, the trace's close) is not cut short."""
    scrub = BACKGROUND_JOIN_S if config.checkpoint.scrub_interval_s > 0 else 0.0
    # a number: the same for every layer
    announce = config.store_config(0).sharding.timeout_s if config.sharded else 0.0
    close = config.server.request_timeout_s
    return drain_s(config) + scrub + close + announce + STOP_SLACK_S


class InferenceServer:
    """The ``serve`` process: a ``ServedModel``, its HTTP endpoint and its metrics listener.

    Parameters
    ----------
    config
        The serve configuration.
    create_tables
        Create a small random checkpoint when none exists (for demos and tests).
    trace
        Record every lookup served into this trace file (closed by ``stop``).
    access_log
        Log every request (uvicorn's access log).

    Examples
    --------
    >>> server = InferenceServer(config.with_overrides(address="127.0.0.1:0"))  # doctest: +SKIP
    >>> server.start()  # doctest: +SKIP
    >>> from tiered_store.serve.client import post_json
    >>> post_json(server.url + "/v1/engram", {"text": "Hello"})[1]["shape"]  # doctest: +SKIP
    [1, 1]
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
        self.create_tables = create_tables
        self.trace_path = trace
        self.access_log = access_log
        # a request may take drain_s: its body's wait and its turn's, each request_timeout_s
        self.requests = RequestCounters(buckets=buckets_covering(drain_s(config)))
        self.model: ServedModel | None = None
        self.registry: Any = None
        self.metrics_port: int | None = None
        self.metrics_host: str | None = None  # the metrics listener's address (maybe a wildcard)
        self._sockets: list[socket.socket] = []
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._draining = False
        self._stopped = False
        self._started_at = time.time()
        self._background_stop = threading.Event()
        self._scrubber: threading.Thread | None = None
        self._version_watch: threading.Thread | None = None
        self._trace_watch: threading.Thread | None = None
        self._rank_watch: threading.Thread | None = None
        self._compute: anyio.CapacityLimiter | None = None  # made in the event loop, on first use
        self._workers: anyio.CapacityLimiter | None = None
        self._announcers: anyio.CapacityLimiter | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both listeners, open the checkpoint, serve in a background thread; returns once
        uvicorn listens. Raises ``ConfigError`` naming an address that cannot be bound."""
        try:
            self._bind()
            if self.config.server.torch_threads:
                torch.set_num_threads(self.config.server.torch_threads)
            self.model = ServedModel(
                self.config,
                create=self.create_tables,
                trace=self.trace_path,
                counters=self.requests,
            )
            build = build_sharded_registry if self.config.sharded else build_registry
            self.registry = build(self.model.stores, self.model.health, self.requests)
            self._serve_in_thread()
        except BaseException:  # (a signal as uvicorn starts: it stops before its sockets close)
            self._stop_http()
            if self.model is not None:
                self.model.close()
            raise
        if self.config.checkpoint.scrub_interval_s > 0:
            self._scrubber = self.model.start_scrub(self._background_stop)
        if self.model.control is not None:  # sharded: rank 0 watches the other ranks
            self._rank_watch = self.model.watch_ranks(self._background_stop)
        else:  # new table versions are opened by this thread alone: no request waits for one
            self._version_watch = self.model.watch_versions(self._background_stop)
        self._trace_watch = self.model.watch_trace(self._background_stop)

    def _bind(self) -> None:
        """Listening sockets for the endpoint and (unless off or the same) the metrics listener."""
        server = self.config.server
        host, port = check_address(server.address, "server.address")
        self._sockets.append(_listen(host, port, server.backlog, "server.address"))
        _warn_if_exposed(host, "server.address")
        metrics = check_address(
            self.config.metrics_address, "store.metrics.address", allow_empty=True
        )
        if metrics is not None and not (metrics == (host, port) and port != 0):
            sock = _listen(metrics[0], metrics[1], server.backlog, "store.metrics.address")
            self._sockets.append(sock)
            self.metrics_host, self.metrics_port = sock.getsockname()[:2]
            _warn_if_exposed(metrics[0], "store.metrics.address")

    def on_metrics_listener(self, local: tuple[str, int] | None) -> bool:
        """Whether a connection's local ``(host, port)`` is the metrics listener's: its port, and
        its host unless that listener took every address (the same port on another host may be
        the inference endpoint's)."""
        if local is None or local[1] != self.metrics_port:
            return False
        return self.metrics_host in WILDCARD_HOSTS or local[0] == self.metrics_host

    def _count_malformed(self) -> None:
        """Count a request h11 could not parse, answered 400 before any handler saw it."""
        self.requests.begin()
        self.requests.end("other", 400, 0.0)

    def _serve_in_thread(self) -> None:
        """uvicorn over both sockets in a daemon thread (its own event loop)."""
        server = self.config.server
        config = uvicorn.Config(
            build_app(self),
            # h11, idle openers timed out, malformed requests counted (as "other", 400), the
            # metrics listener's connections outside server.max_connections
            http=with_head_deadline(
                server.request_timeout_s, self._count_malformed, self.on_metrics_listener
            ),
            ws="none",  # no WebSocket endpoint: an upgrade request is served as plain HTTP
            loop="asyncio",
            lifespan="off",
            backlog=server.backlog,
            limit_concurrency=server.max_connections,
            timeout_keep_alive=server.keep_alive_s,
            timeout_graceful_shutdown=drain_s(self.config),
            log_config=None,  # our logging.basicConfig decides where uvicorn's logs go
            access_log=self.access_log,
            server_header=False,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run,
            kwargs={"sockets": self._sockets},
            name="tiered-store-http",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log above)")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        """``http://host:port`` of the inference endpoint (after ``start``)."""
        assert self._sockets, "start() first"
        return http_url(self._sockets[0].getsockname())

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` of the separate metrics listener, if any."""
        if self.metrics_port is None:
            return None
        return http_url(self._sockets[1].getsockname()) + "/metrics"

    def stop(self) -> None:
        """Stop accepting, finish requests in flight, close the trace and the tables; idempotent.
        Its waits end within ``stop_within_s`` less ``AFTER_WAITS_S`` in all (what is left of it
        is passed down: a background thread, the answers still computing, the stores' calls
        under way), which leaves the rest to the work after them (the warm-restart saves, the
        trace's close, the exit)."""
        if self._stopped:
            return
        self._stopped = True
        self._draining = True
        deadline = time.monotonic() + stop_within_s(self.config) - AFTER_WAITS_S
        self._background_stop.set()
        self._stop_http()
        for thread in (self._scrubber, self._trace_watch):
            if thread is not None:
                thread.join(timeout=min(BACKGROUND_JOIN_S, seconds_left(deadline)))
        if self._rank_watch is not None:  # within STOP_SLACK_S, which the followers allow for
            self._rank_watch.join(timeout=RANK_WATCH_JOIN_S)
        if self.model is not None:  # first: it ends a reload under way at its open under way
            self.model.close(wait_s=seconds_left(deadline))
        if self._version_watch is not None:  # whose reload then ended
            self._version_watch.join(timeout=min(BACKGROUND_JOIN_S, seconds_left(deadline)))

    def _stop_http(self) -> None:
        """Have uvicorn (once started) finish, wait for its thread, then close the sockets."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self._close_sockets()

    def _close_sockets(self) -> None:
        """Close the listening sockets (uvicorn closed them already when it ran)."""
        for sock in self._sockets:
            sock.close()

    def serve_until_signal(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain and stop; returns the exit status (0).

        One while the server starts (a ``checkpoint.verify_on_start`` over a big table) ends the
        start where it is, what it opened closed, and it never listens. A second SIGINT while
        draining stops waiting for requests in flight."""
        stop = threading.Event()
        listening = False

        def on_signal(signum: int, frame: Any) -> None:
            if not listening:  # the start unwinds, closing what it opened (a second: ignored)
                if not stop.is_set():
                    stop.set()
                    raise _StartInterrupted(signal.Signals(signum).name)
                return
            if stop.is_set() and signum == signal.SIGINT and self._uvicorn is not None:
                self._uvicorn.force_exit = True
            log.info("%s: draining", signal.Signals(signum).name)
            stop.set()
            self._draining = True
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.start()
                listening = True
            except _StartInterrupted as exc:
                log.info("%s while starting: stopped before listening", exc)
                return 0
            print(json.dumps(self.ready_line()), flush=True)
            assert self._thread is not None
            while not stop.wait(0.5) and self._thread.is_alive():
                pass
        finally:
            try:
                self.stop()
            finally:  # a stop that raised (the trace's close failed) puts them back too
                for s, handler in previous.items():
                    signal.signal(s, handler)
        log.info("stopped")
        return 0

    def ready_line(self) -> dict[str, Any]:
        """What the process prints once it listens (one JSON line on stdout)."""
        assert self.model is not None
        return {
            "event": "listening",
            "url": self.url,
            "metrics_url": self.metrics_url or self.url + "/metrics",
            "tables": list(self.model.stores),
            "pid": os.getpid(),
            "stop_within_s": stop_within_s(self.config),
        }

    # -- requests -------------------------------------------------------------------------------
    async def answer(
        self, body: bytes, gone: anyio.Event | None = None
    ) -> tuple[dict[str, Any], int]:
        """One POST body: parsed and run in a worker once a compute turn is free; returns (the
        JSON answer without timing, tokens served). With ``server.announce_requests`` it is
        parsed first and its rows announced to the tables while it waits for its turn (once
        fewer than ``server.max_announced`` are announced: ``ServedModel.announce``), so that
        rows waiting requests will look up are evicted last (``TieredStore.announce``).
        ``gone``: set when the client leaves; a request waiting for its turn then raises
        ``ClientGone``, not computed."""
        if not self.config.server.announce_requests:
            return await self.run_in_worker(self.infer, body, gone=gone)
        request, announced = await anyio.to_thread.run_sync(
            self._parse_and_announce, body, limiter=self._limiters()[2]
        )
        try:
            return await self.run_in_worker(self._run, request, announced, gone=gone)
        finally:  # released in the worker once answered; here only when it never ran, and in a
            # thread too: a release waits for other requests' announcements (the event loop would)
            with anyio.CancelScope(shield=True):
                if not announced.released:
                    await anyio.to_thread.run_sync(self.model.release, announced)
                elif self.model.waiting_unannounced:  # past its compute turn: the next computes
                    await anyio.to_thread.run_sync(
                        self.model.announce_waiting, limiter=self._limiters()[2]
                    )

    async def run_in_worker(
        self, fn: Callable[..., T], *args: Any, gone: anyio.Event | None = None
    ) -> T:
        """Run ``fn(*args)`` in a worker thread once a compute turn is free (at most
        ``server.max_concurrent`` at once); 503 after waiting ``request_timeout_s`` for a turn,
        ``ClientGone`` if ``gone`` is set while it waits (a turn free at once is taken)."""
        compute, workers, _ = self._limiters()
        try:
            compute.acquire_nowait()
            waits = False
        except anyio.WouldBlock:
            waits = True
        if waits:
            with anyio.move_on_after(self.config.server.request_timeout_s) as waited:
                turn = await _turn_unless(compute, gone)
            if waited.cancelled_caught:
                raise RequestError(503, "server busy: no free compute slot in time; retry later")
            if not turn:
                raise ClientGone("the client left while its request waited for a compute turn")
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=workers)
        finally:
            compute.release()

    def _limiters(
        self,
    ) -> tuple[anyio.CapacityLimiter, anyio.CapacityLimiter, anyio.CapacityLimiter]:
        """(compute turns, their worker threads, the threads that parse and announce waiting
        requests): ``server.max_concurrent`` each, made on first use (inside the event loop).
        Announcing has threads of its own: on the compute ones, a request that waits for its
        turn was announced only once a computing one finished."""
        if self._compute is None:
            self._compute = anyio.CapacityLimiter(self.config.server.max_concurrent)
            self._workers = anyio.CapacityLimiter(self.config.server.max_concurrent)
            self._announcers = anyio.CapacityLimiter(self.config.server.max_concurrent)
        return self._compute, self._workers, self._announcers

    def infer(self, body: bytes) -> tuple[dict[str, Any], int]:
        """Parse, tokenise and run one request body (in a worker thread); returns (the JSON
        answer without timing, tokens served)."""
        assert self.model is not None
        return self._run(parse_request(body, self.config.server, self.model))

    def _parse_and_announce(self, body: bytes) -> tuple[InferenceRequest, Announced]:
        """Parse a body and announce its rows to the tables (in a worker thread)."""
        assert self.model is not None
        request = parse_request(body, self.config.server, self.model)
        return request, self.model.announce(request)

    def _run(
        self, request: InferenceRequest, announced: Announced | None = None
    ) -> tuple[dict[str, Any], int]:
        """The answer to a parsed request (hashed already when ``announced``), and the tokens
        it served."""
        assert self.model is not None
        try:
            doc = self.model.answer(request, announced)
        finally:  # in this worker thread: a release waits for the tables' locks (those waiting
            # unannounced are announced by ``answer`` once the compute turn is free)
            if announced is not None:
                self.model.release(announced, announce_waiting=False)
        doc["lengths"] = request.lengths
        if request.from_text:
            doc["input_ids"] = request.input_ids.tolist()
        return doc, int(sum(request.lengths))

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """The JSON answers of the GET endpoints other than /metrics."""
        if path == "/healthz":
            problems = self.problems()
            warnings = self.warnings()
            doc = {"warnings": warnings} if warnings else {}
            if problems:
                return 503, {"status": "unhealthy", "problems": problems, **doc}
            return 200, {"status": "ok", **doc}
        if path == "/stats":
            return 200, self.stats()
        assert self.model is not None
        return 200, {
            "service": "tiered-store serve",
            "endpoints": {
                f"POST {INFERENCE_PATH}": '{"input_ids": [[...]]} or {"text": "..."}',
                "GET /healthz": "liveness and table health",
                "GET /stats": "store statistics per table",
                "GET /metrics": "Prometheus metrics",
            },
            "tables": list(self.model.stores),
        }

    def problems(self) -> list[str]:
        """Why the server is unhealthy (empty when it is healthy); no server paths."""
        out = ["draining: shutting down"] if self._draining else []
        if self.model is None:
            return out
        now, hold = time.monotonic(), self.config.server.health_hold_s
        for name, health in self.model.health.items():
            if health.last_error:
                out.append(
                    f"table {name}: checksum pass failed: {self._without_paths(health.last_error)}"
                )
            at = health.last_lookup_failure_at
            if at is not None and now - at < hold:
                out.append(
                    f"table {name}: lookups failing ({health.lookup_failures} so far, the last "
                    f"{now - at:.1f} s ago): {self._without_paths(health.last_lookup_error or '')}"
                )
        for name in self.model.closed_tables():  # every request fails: none should come
            out.append(
                f"table {name}: closed (no version open: every request answers 503 until a "
                "check reopens it)"
            )
        if self.model.converted_anew is not None:  # no table reopens until a restart
            out.append(self._without_paths(self.model.converted_anew))
        if self.model.control is not None:  # sharded: the other ranks' checksum passes too
            failure = self.model.rank_failure()
            if failure is not None:  # every request fails from now on: no hold
                out.append(
                    f"ranks failed: {self._without_paths(failure)}; every request is refused "
                    "until the ranks are restarted"
                )
            out += [self._without_paths(p) for p in self.model.control.health.problems()]
        return out

    def warnings(self) -> list[str]:
        """What /healthz says while the server still serves: a table's new version that could
        not be opened (the version open now is served meanwhile, or none for a table whose store
        a reload left closed: ``ServedModel.serving_meanwhile``); no server paths."""
        if self.model is None or self.model.reload_refused is None:
            return []
        return [
            f"not reopened on a new version: {self._without_paths(self.model.reload_refused)}; "
            f"{self.model.serving_meanwhile()}"
        ]

    def _without_paths(self, text: str) -> str:
        """``text`` without this server's directories (the checkpoint's, the tables' own)."""
        directories = [self.config.checkpoint_dir, *(p.parent for p in self._served_files())]
        return without_paths(text, directories)

    def _served_files(self) -> list[Path]:
        """The files the tables are served from now (none before the model is loaded)."""
        if self.model is None:
            return []
        return [self.model.served_file(store) for store in self.model.stores.values()]

    def stats(self) -> dict[str, Any]:
        """Store statistics and geometry per table, table health, and the request counters."""
        assert self.model is not None
        return {
            "tables": self.model.stats(),
            "geometry": self.model.geometry(),
            "health": {
                name: {
                    "verifications": h.verifications,
                    "checksum_failures": h.checksum_failures,
                    "last_error": self._without_paths(h.last_error) if h.last_error else None,
                    "lookup_failures": h.lookup_failures,
                    "reloads": h.reloads,
                    "reload_failures": h.reload_failures,
                }
                for name, h in self.model.health.items()
            },
            "server": {  # and requests past server.max_announced, waiting unannounced
                **self.requests.snapshot(),
                "waiting_unannounced": self.model.waiting_unannounced,
            },
            "uptime_s": round(time.time() - self._started_at, 3),
        }

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition of this server's registry."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StartInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT while ``serve_until_signal`` starts the server (its signal's name)."""


def without_paths(text: str, directories: Iterable[Path] = ()) -> str:
    """``text`` with the directories of absolute paths removed (file names kept): first the
    server's own ``directories`` as they are (spaces and all), then any other absolute path's.

    Examples
    --------
    >>> without_paths("table /srv/ckpt/engram_layer3.npy: block 0 fails its checksum")
    'table engram_layer3.npy: block 0 fails its checksum'
    >>> without_paths("table /srv/my ckpt/engram_layer3.npy shrank", [Path("/srv/my ckpt")])
    'table engram_layer3.npy shrank'
    """
    for directory in sorted({str(d).rstrip("/") for d in directories}, key=len, reverse=True):
        text = text.replace(directory + "/", "")
    return _DIRECTORY_PREFIX.sub("", text)


def listen_error(exc: OSError) -> str:
    """Why a socket could not listen, as a user reads it: a host name that does not resolve has
    a resolver's code (negative, ``socket.gaierror``'s), not an errno."""
    if exc.errno is not None and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return (exc.strerror or str(exc)).split(" (while attempting")[0]


async def _turn_unless(compute: anyio.CapacityLimiter, gone: anyio.Event | None) -> bool:
    """Wait for a turn of ``compute``: True once taken, False (none taken) if ``gone`` is set
    first."""
    taken = False
    try:
        async with anyio.create_task_group() as group:

            async def end_when_gone() -> None:
                assert gone is not None
                await gone.wait()
                group.cancel_scope.cancel()

            if gone is not None:
                group.start_soon(end_when_gone)
            await compute.acquire()  # cancelled (not taken) when the client left first
            taken = True
            group.cancel_scope.cancel()
    except BaseException:  # an outer deadline as the turn came: not kept
        if taken:
            compute.release()
        raise
    return taken


def _listen(host: str, port: int, backlog: int, key: str) -> socket.socket:
    """A listening TCP socket on (host, port); ``ConfigError`` naming ``key`` and the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot listen on {host}:{port} "
            f"({listen_error(exc)}); expected an address this host can listen on: a local "
            "host name or IP and a free port (is another server running there?)"
        ) from None
    # Answers go out as several writes (head, body): without TCP_NODELAY, Nagle's algorithm holds
    # the body until the client's delayed ACK (40 ms). asyncio sets it only on sockets created
    # with proto=IPPROTO_TCP; accepted connections inherit it from the listener.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def http_url(address: tuple) -> str:
    """``http://host:port`` of a bound socket address."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _warn_if_exposed(host: str, key: str) -> None:
    """Say so when a listener is reachable from other machines."""
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        log.warning("%s: listening on %s, reachable from other machines", key, host)

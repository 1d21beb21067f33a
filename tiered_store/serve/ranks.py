"""Serving over sharded tables: rank 0 takes HTTP, every other rank serves its shards.

With ``sharding:`` in the store section, ``tiered-store serve`` runs on every rank of a process
group (``torchrun --nproc-per-node N --no-python tiered-store serve CONFIG``). Every rank opens the same
``ServedModel`` (one ``ShardedStore`` per Engram layer, the same checks, in the same order). Rank 0
binds the HTTP listener and answers requests; before each request's prefetch it broadcasts one
``ROUND`` on a control group, and every other rank joins each layer's exchange round with no ids
of its own, serving the rows its shards own. Rank 0 broadcasts ``STOP`` when it shuts down.

On the other ranks the control group has no practical timeout, so an idle server waits for
requests as long as it must; a rank 0 that dies ends the wait with the backend's "connection
closed" error, and the follower exits 1 naming it. Rank 0's announcements time out after
``sharding.timeout_s`` (a follower that hung), and once one failed it fails every request at
once: the group's rounds are out of step, the ranks must be restarted. A lookup a shard cannot
serve (a page failing its checksum) fails that request only, on every rank (rank 0 answers a 503
and counts the failed lookup; the follower logs the cause), and the group stays in step. Each rank
exports its own metrics (every sample labelled ``rank``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RankFailureError, error_text

__all__ = ["ROUND", "STOP", "RankControl", "RankHealth", "run_follower"]

log = logging.getLogger("tiered_store.serve")

STOP, ROUND = 0, 1
CONTROL_TIMEOUT = timedelta(days=365)  # an idle server waits for its next request this long
HEALTH_READ_S = 2.0  # a read of the others' health waits at most this long for the store


class RankHealth:
    """The ranks' failed checksum passes, through the process group's key-value store: the other
    ranks publish theirs after each pass; rank 0 reads them in a thread, so its ``/healthz``
    never waits on the store (whose host, torchrun's agent, may hang). That thread also asks
    whether every rank still beats (a rank may die or hang between requests)."""

    def __init__(self, store: dist.Store, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self._store = dist.PrefixStore("tiered_store/serve/health/", store)
        self._lines: list[str] = []  # rank 0: the others' failures as last read
        self._read_at = time.monotonic()
        self._read_error: str | None = None
        self._interval: float | None = None  # rank 0, once watching
        self._stopped: str | None = None  # rank 0: the ranks that stopped beating, as last read

    def publish(self, failed: Mapping[str, str]) -> None:
        """Another rank: its tables whose last checksum pass failed (table -> error), for rank
        0's ``/healthz``; an empty mapping once they pass again."""
        self._store.set(str(self.rank), json.dumps(dict(failed)))

    def watch(
        self,
        interval_s: float,
        stop: threading.Event,
        stopped: Callable[[], str | None] = lambda: None,
    ) -> threading.Thread:
        """Rank 0: read the others' failures, and ``stopped()`` (the ranks that stopped beating,
        or None), every ``interval_s`` until ``stop``; started."""
        self._interval, self._read_at = interval_s, time.monotonic()

        def watch() -> None:
            while True:
                self._stopped = stopped()
                try:
                    self._lines, self._read_at = self._read(), time.monotonic()
                    self._read_error = None
                except RuntimeError as exc:  # the store's host is gone or hung: say so, go on
                    self._read_error = error_text(exc)
                if stop.wait(interval_s):
                    return

        thread = threading.Thread(target=watch, name="tiered-store-rank-health", daemon=True)
        thread.start()
        return thread

    def problems(self) -> list[str]:
        """Rank 0: the others' failed passes as last read, and a line when that read is old;
        never waits."""
        out = list(self._lines) + ([self._stopped] if self._stopped else [])
        age = time.monotonic() - self._read_at
        if self._interval is not None and age > 2 * self._interval + HEALTH_READ_S:
            why = f": {self._read_error}" if self._read_error else ""
            out.append(f"the other ranks' checksum passes were last read {age:.0f} s ago{why}")
        return out

    def _read(self) -> list[str]:
        """The others' published failures, one line each."""
        out = []
        for rank in range(1, self.world):
            if self._store.check([str(rank)]):
                failed = json.loads(self._store.get(str(rank)))
                out += [
                    f"table {table}: rank {rank}'s checksum pass failed: {error}"
                    for table, error in failed.items()
                ]
        return out


class RankControl:
    """The control group: rank 0 announces rounds (waiting at most ``timeout_s`` for the others to
    take each), the others follow them; ``health`` carries the others' checksum passes to rank
    0."""

    def __init__(self, timeout_s: float) -> None:
        self.rank = dist.get_rank()
        self.timeout_s = timeout_s  # the store config's sharding.timeout_s
        wait = timedelta(seconds=timeout_s) if self.rank == 0 else CONTROL_TIMEOUT
        self.group = dist.new_group(backend="gloo", timeout=wait)
        self._lock = threading.Lock()
        self.failure: BaseException | None = None  # the first announcement that failed
        store = dist.distributed_c10d._get_default_store().clone()  # its own connection
        store.set_timeout(timedelta(seconds=HEALTH_READ_S))
        self.health = RankHealth(store, self.rank, dist.get_world_size())

    def announce(self, command: int = ROUND) -> None:
        """Rank 0: tell every rank to join one round of each table (or to stop). Raises the
        backend's error when a rank is gone or did not take it in time, and from then on the
        first such error at once."""
        with self._lock:
            if self.failure is not None:
                raise self.failure
            try:
                dist.broadcast(torch.tensor([command]), src=0, group=self.group)
            except RuntimeError as exc:
                self.failure = exc
                raise

    def started(self) -> None:
        """Every rank, once its model and checks are done: wait for the others (rank 0 at most
        ``timeout_s``), so a rank that failed its start stops the others' start too."""
        dist.barrier(group=self.group)

    def follow(self, stores: Mapping[str, Any]) -> int:
        """Other ranks: join one round of every store (table name -> store) per announcement
        until ``STOP``; returns the rounds joined. A lookup this rank's shard (or another's) could
        not serve is logged (the round ended on every rank: the group is in step; rank 0 counts
        it). Raises ``RankZeroGone`` when rank 0 is gone, ``RankFailureError`` when a rank
        failed."""
        command = torch.zeros(1, dtype=torch.int64)
        nothing = torch.zeros(0, dtype=torch.int64)
        rounds = 0
        while True:
            try:
                dist.broadcast(command, src=0, group=self.group)
            except RuntimeError as exc:  # the backend's "connection closed"
                raise RankZeroGone(str(exc)) from exc
            if int(command) == STOP:
                return rounds
            handles = [store.prefetch(nothing) for store in stores.values()]  # all layers at once
            for (name, store), handle in zip(stores.items(), handles, strict=True):
                try:
                    store.lookup(nothing, handle)
                except RankFailureError:
                    raise
                except Exception as exc:  # noqa: BLE001 (a failed lookup: rank 0 answers a 503)
                    log.error(
                        "rank %d: table %s: a lookup failed: %s", self.rank, name, error_text(exc)
                    )
            rounds += 1


class RankZeroGone(RuntimeError):
    """A follower's wait for rank 0's next announcement ended: rank 0 is gone."""


def _stay_until_stopped(rank: int, grace_s: float) -> threading.Event:
    """SIGTERM and SIGINT on a follower (torchrun sends them to every rank at once) leave it
    following: rank 0 drains its requests, which need this rank's shards, then announces
    ``STOP``. A watchdog ends the process ``grace_s`` after the signal unless the event returned
    is set first, once the following ended (the main thread may be waiting in the backend, where
    Python handlers do not run; the close after a stop is not cut short)."""
    followed = threading.Event()
    wake, woken = os.pipe()
    os.set_blocking(woken, False)
    signal.set_wakeup_fd(woken)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)

    def watchdog() -> None:
        os.read(wake, 1)  # the signal's byte
        log.warning("rank %d: asked to stop; serving rank 0's last requests first", rank)
        if followed.wait(grace_s):
            return
        log.error(
            "rank %d: no stop from rank 0 within %.0f s of the signal; exiting", rank, grace_s
        )
        os._exit(1)

    threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()
    return followed


def run_follower(config: Any) -> int:
    """A rank other than 0: open the model's stores, export metrics, follow rank 0; exit status.
    Its close waits ``sharding.timeout_s`` in all for the stores' calls under way (each store
    ``CLOSE_GRACE_S`` at least, as rank 0's stop passes its tables one deadline); one that left
    calls under way (a read hung on a dead disk) exits past them at once, as rank 0's serve
    does (the interpreter's exit would wait for them)."""
    from .cli import _exit_past_hung_calls
    from .served_model import ServedModel
    from .server import BACKGROUND_JOIN_S, stop_announced_within_s

    metrics_url: list[str] = []  # the listener's, once bound
    opened: list[ServedModel] = []  # the model once its stores opened (its start's checks next)

    def before_start(served: ServedModel) -> None:
        opened.append(served)
        metrics_url.extend(_export_metrics(served))

    try:
        served = ServedModel(config, before_start=before_start)
        rank = served.control.rank
        followed = _stay_until_stopped(rank, stop_announced_within_s(config))  # rank 0's bound
    except BaseException:  # a signal before its handlers (torchrun's SIGTERM as the open ended;
        for model in opened:  # a start that failed closed its stores already): the model closed
            model.close(wait_s=model.control.timeout_s)
        raise
    stop_scrub, scrubber = threading.Event(), None
    try:
        if config.checkpoint.scrub_interval_s > 0:  # its own shards: in its metrics and log
            scrubber = served.start_scrub(stop_scrub)
        url = metrics_url[0] if metrics_url else None
        print(json.dumps({"event": "following", "rank": rank, "metrics_url": url}), flush=True)
        try:
            rounds = served.control.follow(served.stores)
        except RankZeroGone as exc:
            log.error("rank %d: rank 0 stopped answering (%s); exiting", rank, exc)
            status = 1
        except Exception as exc:  # this rank's own store: the group's rounds are out of step
            log.error("rank %d: its shards failed a round (%s); exiting", rank, error_text(exc))
            status = 1
        else:
            log.info("rank %d: rank 0 stopped the server after %d requests", rank, rounds)
            status = 0
    finally:
        followed.set()  # the watchdog waits for a stop only, never cuts this close short
        stop_scrub.set()  # joined first, as rank 0 does: a pass left in the store's C++ at exit
        if scrubber is not None:  # could abort the process (its health publish is a TCPStore set)
            scrubber.join(timeout=BACKGROUND_JOIN_S)
        served.close(wait_s=served.control.timeout_s)  # not N x for N tables
    if tables := served.left_closing:
        _exit_past_hung_calls(status, tables)
    return status


def _export_metrics(served: Any) -> list[str]:
    """A follower's metrics listener (``store.metrics.address``'s port + rank), bound before the
    ranks' start barrier, so that one it cannot bind stops every rank; its URL (none when off)."""
    from prometheus_client import start_http_server

    from ..errors import ConfigError
    from ..metrics import build_sharded_registry
    from .config import check_address
    from .server import http_url, listen_error

    address = check_address(
        served.config.metrics_address, "store.metrics.address", allow_empty=True
    )
    if address is None:
        return []
    host, base = address
    rank = served.control.rank
    port = base + rank if base else 0
    if port > 65535:
        raise ConfigError(
            f"store.metrics.address: port {base} + rank {rank} is {port}; expected a port at "
            f"most {65535 - rank} (rank R exports its metrics on the port + R)"
        )
    registry = build_sharded_registry(served.stores, served.health)
    try:
        httpd, _ = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError(
            f"store.metrics.address: rank {rank} cannot listen on {host}:{port} "
            f"({listen_error(exc)}); expected an address this host can listen on: a local host "
            "name or IP and a free port (rank R exports its metrics on the port + R)"
        ) from None
    return [http_url((host, httpd.server_port)) + "/metrics"]

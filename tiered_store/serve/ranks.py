"""Serving over sharded tables: rank 0 takes HTTP, every other rank serves its shards.

With ``sharding:`` in the store section, ``tiered-store serve`` runs on every rank of a process
group (``torchrun --nproc-per-node N --no-python tiered-store serve CONFIG``). Every rank opens the same
``ServedModel`` (one ``ShardedStore`` per Engram layer, the same checks, in the same order). Rank 0
binds the HTTP listener and answers requests; before each request's prefetch it broadcasts one
``ROUND`` on a control group, and every other rank joins each layer's exchange round with no ids
of its own, serving the rows its shards own. Rank 0 broadcasts ``STOP`` when it shuts down.

The control group has no practical timeout, so an idle server waits for requests as long as it
must; a rank 0 that dies ends the wait with the backend's "connection closed" error, and the
follower exits 1 naming it. Each rank exports its own metrics (every sample labelled ``rank``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ROUND", "STOP", "RankControl", "run_follower"]

log = logging.getLogger("tiered_store.serve")

STOP, ROUND = 0, 1
CONTROL_TIMEOUT = timedelta(days=365)  # an idle server waits for its next request this long


class RankControl:
    """The control group: rank 0 announces rounds, the others follow them."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self._lock = threading.Lock()

    def announce(self, command: int = ROUND) -> None:
        """Rank 0: tell every rank to join one round of each table (or to stop)."""
        with self._lock:
            dist.broadcast(torch.tensor([command]), src=0, group=self.group)

    def follow(self, stores: Sequence[Any]) -> int:
        """Other ranks: join one round of every store per announcement until ``STOP``; returns
        the rounds joined. Raises the backend's error when rank 0 is gone."""
        command = torch.zeros(1, dtype=torch.int64)
        nothing = torch.zeros(0, dtype=torch.int64)
        rounds = 0
        while True:
            dist.broadcast(command, src=0, group=self.group)
            if int(command) == STOP:
                return rounds
            handles = [store.prefetch(nothing) for store in stores]  # all layers at once
            for store, handle in zip(stores, handles, strict=True):
                store.lookup(nothing, handle)
            rounds += 1


def run_follower(config: Any) -> int:
    """A rank other than 0: open the model's stores, export metrics, follow rank 0; exit status."""
    from prometheus_client import start_http_server

    from ..metrics import build_sharded_registry
    from .config import check_address
    from .served_model import ServedModel

    served = ServedModel(config)
    rank = served.control.rank
    try:
        address = check_address(config.metrics_address, "store.metrics.address", allow_empty=True)
        metrics_url = None
        if address is not None:
            host, port = address
            registry = build_sharded_registry(served.stores, served.health)
            httpd, _ = start_http_server(port + rank if port else 0, host, registry)
            metrics_url = f"http://{host}:{httpd.server_port}/metrics"
        print(
            json.dumps({"event": "following", "rank": rank, "metrics_url": metrics_url}), flush=True
        )
        try:
            rounds = served.control.follow(list(served.stores.values()))
        except Exception as exc:  # rank 0 died: its connection closed
            log.error("rank %d: rank 0 stopped answering (%s); exiting", rank, exc)
            return 1
        log.info("rank %d: rank 0 stopped the server after %d requests", rank, rounds)
        return 0
    finally:
        served.close()

"""Requests a server has queued or is serving, by the rows they will look up.

Engram's row ids depend only on a request's tokens, so a server knows the rows of every request
in its queue before it serves them. The cache tiers keep, per slot, the earliest queued request
that looks the slot's row up, and evict rows no queued request looks up first, then those needed
furthest back in the queue (``RowCache``): a bounded look ahead at what Belady's policy sees in
full. How much that is worth: docs/policies.md, "A queue known ahead".
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from .errors import TieredStoreError

NOT_QUEUED = torch.iinfo(torch.int64).max  # next_use of a row no queued request looks up


class QueuedRequestError(TieredStoreError, ValueError):
    """A queued request released twice, or released to a store that did not announce it."""


@dataclass(eq=False)
class QueuedRequest:
    """One announced request: pass it to ``release`` once it is served or cancelled."""

    token: int  # order of announcement: earlier requests have smaller tokens
    rows: torch.Tensor = field(repr=False)  # its distinct row ids, sorted (CPU)
    owner: object = field(repr=False)


class QueuedRequests:
    """Announced requests and, for any row, the earliest of them that looks it up."""

    def __init__(self) -> None:
        self._requests: dict[int, torch.Tensor] = {}  # token -> rows, in token order
        self._tokens = itertools.count(1)
        self._merged: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, earliest token
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, ids: torch.Tensor) -> QueuedRequest:
        """Queue a request that will look up ``ids`` (any shape)."""
        rows = torch.unique(ids.reshape(-1).to("cpu", torch.int64))
        with self._lock:
            request = QueuedRequest(next(self._tokens), rows, self)
            self._requests[request.token] = rows
            self._merged = None
        return request

    def remove(self, request: QueuedRequest) -> None:
        """Drop a request from the queue (served or cancelled)."""
        with self._lock:
            if request.owner is not self or self._requests.pop(request.token, None) is None:
                where = "was already released" if request.owner is self else "is another store's"
                raise QueuedRequestError(
                    f"release: queued request {request.token} {where}; release each request "
                    "once, to the store that announced it"
                )
            self._merged = None

    def next_use(self, ids: torch.Tensor) -> torch.Tensor:
        """Token of the earliest queued request that looks up each of ``ids`` (int64, on ``ids``'
        device); ``NOT_QUEUED`` where none does."""
        with self._lock:
            if not self._requests:
                return torch.full(ids.shape, NOT_QUEUED, dtype=torch.int64, device=ids.device)
            if self._merged is None:
                self._merged = self._merge()
            rows, earliest = self._merged
        if not rows.numel():
            return torch.full(ids.shape, NOT_QUEUED, dtype=torch.int64, device=ids.device)
        query = ids.to("cpu", torch.int64)
        pos = torch.searchsorted(rows, query).clamp(max=rows.numel() - 1)
        found = rows[pos] == query
        return torch.where(found, earliest[pos], NOT_QUEUED).to(ids.device)

    def _merge(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every queued row once, sorted, with the smallest token among the requests using it."""
        rows = torch.cat(list(self._requests.values()))
        tokens = torch.cat(
            [torch.full((r.numel(),), t, dtype=torch.int64) for t, r in self._requests.items()]
        )
        rows, order = torch.sort(rows, stable=True)  # equal rows keep token order: earliest first
        first = torch.ones(rows.numel(), dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        return rows[first], tokens[order][first]

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

import numpy as np
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
    """Announced requests and, for any row, the earliest of them that looks it up: one sorted
    array of every queued row, kept up to date as requests come and go (no sort of the whole
    queue: a merge when one comes, a pass over the rows it was the earliest for when one goes)."""

    def __init__(self) -> None:
        self._requests: dict[int, np.ndarray] = {}  # token -> sorted rows, in token order
        self._tokens = itertools.count(1)
        self._rows = np.empty(0, dtype=np.int64)  # every queued row once, sorted
        self._earliest = np.empty(0, dtype=np.int64)  # the smallest token using each
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def rows(self) -> int:
        """Distinct rows the queued requests look up."""
        return int(self._rows.size)

    def add(self, ids: torch.Tensor) -> QueuedRequest:
        """Queue a request that will look up ``ids`` (any shape)."""
        rows = torch.unique(ids.reshape(-1).to("cpu", torch.int64))
        with self._lock:
            request = QueuedRequest(next(self._tokens), rows, self)
            mine = rows.numpy()
            self._requests[request.token] = mine
            new = mine[~_isin_sorted(mine, self._rows)]  # rows already queued keep their
            at = np.searchsorted(self._rows, new)  # earlier token; the new ones get this one
            self._rows = np.insert(self._rows, at, new)
            self._earliest = np.insert(self._earliest, at, request.token)
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
            pos = np.searchsorted(self._rows, request.rows.numpy())
            pos = pos[self._earliest[pos] == request.token]  # rows it was the earliest for
            rows, after = self._rows[pos], np.full(pos.size, NOT_QUEUED, dtype=np.int64)
            for token, theirs in reversed(self._requests.items()):  # later ones first: the
                after[_isin_sorted(rows, theirs)] = token  # earliest is written last
            self._earliest[pos] = after
            gone = pos[after == NOT_QUEUED]
            self._rows = np.delete(self._rows, gone)
            self._earliest = np.delete(self._earliest, gone)

    def next_use(self, ids: torch.Tensor) -> torch.Tensor:
        """Token of the earliest queued request that looks up each of ``ids`` (int64, on ``ids``'
        device); ``NOT_QUEUED`` where none does."""
        query = ids.to("cpu", torch.int64).numpy()
        out = np.full(query.shape, NOT_QUEUED, dtype=np.int64)
        with self._lock:
            if self._rows.size:
                pos = np.minimum(np.searchsorted(self._rows, query), self._rows.size - 1)
                found = self._rows[pos] == query
                out[found] = self._earliest[pos[found]]
        return torch.from_numpy(out).to(ids.device)


def _isin_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Per element of ``values``: whether it is in ``sorted_set`` (sorted, unique)."""
    if not sorted_set.size:
        return np.zeros(values.shape, dtype=np.bool_)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values

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

from .errors import TieredStoreError, shown

NOT_QUEUED = torch.iinfo(torch.int64).max  # next_use of a row no queued request looks up


class QueuedRequestError(TieredStoreError, ValueError):
    """A queued request released twice, or released to a store that did not announce it."""


@dataclass(eq=False)
class QueuedRequest:
    """One announced request: pass it to ``release`` once it is served or cancelled."""

    token: int  # order of announcement: earlier requests have smaller tokens
    rows: torch.Tensor = field(repr=False)  # its distinct row ids, sorted (CPU)
    owner: object = field(repr=False)
    first_rows: torch.Tensor = field(repr=False)  # of ``rows``, those no earlier request queued


class QueuedRequests:
    """Announced requests and, for any row, the earliest of them that looks it up: one array of
    (row, request) pairs sorted by row, then by request, kept up to date as requests come and go
    (a merge when one comes, a pass that drops its pairs when one goes: no sort of the queue).
    The arrays are replaced, never changed in place: a reader (an admission's ``next_use``,
    under the store's lock) takes them as they are, never waiting for a pass under way."""

    def __init__(self) -> None:
        self._requests: set[int] = set()  # tokens of the requests queued now
        self._tokens = itertools.count(1)
        self._pair_rows = np.empty(0, dtype=np.int64)  # sorted; a row once per request using it
        self._pair_tokens = np.empty(0, dtype=np.int64)  # ascending within each row
        self._changing = threading.Lock()  # held by ``add`` and ``remove`` through their pass
        self._lock = threading.Lock()  # the arrays and requests, replaced together (held briefly)

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def rows(self) -> int:
        """Distinct rows the queued requests look up."""
        pairs = self._pair_rows
        return int(np.count_nonzero(pairs[1:] != pairs[:-1])) + int(pairs.size > 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the (row, request) pairs held now."""
        pair_rows, pair_tokens = self._pairs()
        return pair_rows.nbytes + pair_tokens.nbytes

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The (row, request) pairs as they are now (a pass under way replaces them later)."""
        with self._lock:
            return self._pair_rows, self._pair_tokens

    def add(self, ids: torch.Tensor) -> QueuedRequest:
        """Queue a request that will look up ``ids`` (any shape); its ``first_rows`` are those no
        request queued before it looks up: they now wait for it."""
        from . import request_queue_kernels as kernels  # numba: imported at the first announce

        rows = torch.unique(ids.reshape(-1).to("cpu", torch.int64))
        with self._changing:
            token = next(self._tokens)
            if rows.numel():
                pair_rows, pair_tokens, first = kernels.merge_request(
                    self._pair_rows, self._pair_tokens, rows.numpy(), token
                )
                first_rows = rows[torch.from_numpy(first)]
            else:  # no pair to add: no pass over the queue's
                pair_rows, pair_tokens, first_rows = self._pair_rows, self._pair_tokens, rows
            request = QueuedRequest(token, rows, self, first_rows)
            with self._lock:
                self._pair_rows, self._pair_tokens = pair_rows, pair_tokens
                self._requests.add(token)
        return request

    def remove(self, request: QueuedRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop a request from the queue (served or cancelled). Returns the rows it was the
        earliest request for, and the token of the request that now looks each up first
        (``NOT_QUEUED`` where none does)."""
        from . import request_queue_kernels as kernels

        if not isinstance(request, QueuedRequest):
            raise QueuedRequestError(
                f"release: got {type(request).__name__} {shown(request)}; expected the QueuedRequest "
                "that announce() returned"
            )
        with self._changing:
            if request.owner is not self or request.token not in self._requests:
                where = "was already released" if request.owner is self else "is another store's"
                raise QueuedRequestError(
                    f"release: queued request {request.token} {where}; release each request "
                    "once, to the store that announced it"
                )
            if request.rows.numel():
                # sized by the request (one pair per row), not the queue: the queue holds what
                # ``nbytes`` counts, and a release's news (held until the tiers are told) its rows
                pair_rows, pair_tokens, rows, next_use = kernels.drop_request(
                    self._pair_rows,
                    self._pair_tokens,
                    request.token,
                    NOT_QUEUED,
                    request.rows.numel(),
                )
            else:  # no pair to drop: no pass over the queue's
                pair_rows, pair_tokens = self._pair_rows, self._pair_tokens
                rows, next_use = request.rows.numpy(), request.rows.numpy().copy()
            with self._lock:
                self._pair_rows, self._pair_tokens = pair_rows, pair_tokens
                self._requests.discard(request.token)
        return torch.from_numpy(rows), torch.from_numpy(next_use)

    def next_use(self, ids: torch.Tensor) -> torch.Tensor:
        """Token of the earliest queued request that looks up each of ``ids`` (int64, on ``ids``'
        device); ``NOT_QUEUED`` where none does."""
        query = ids.to("cpu", torch.int64).numpy()
        out = np.full(query.shape, NOT_QUEUED, dtype=np.int64)
        pair_rows, pair_tokens = self._pairs()
        if pair_rows.size:  # a row's first pair is its earliest request's
            pos = np.minimum(np.searchsorted(pair_rows, query), pair_rows.size - 1)
            found = pair_rows[pos] == query
            out[found] = pair_tokens[pos[found]]
        return torch.from_numpy(out).to(ids.device)

"""Requests a server has queued or is serving, by the rows they will look up.

Engram's row ids depend only on a request's tokens, so a server knows the rows of every request
in its queue before it serves them. The cache tiers keep, per slot, the earliest queued request
that looks the slot's row up, and evict rows no queued request looks up first, then those needed
furthest back in the queue (``RowCache``): a bounded look ahead at what Belady's policy sees in
full. A request served in batches gives up its standing on a row once the batch that looks the
row up for the last time is served (``served``): the row's next use is then its next request's.
How much that is worth: docs/policies.md, "A queue known ahead".
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import TieredStoreError, shown

NOT_QUEUED = torch.iinfo(torch.int64).max  # next_use of a row no queued request looks up
_SEARCH = np.empty(0, dtype=np.int64)  # ``serve_batch``'s pair places: search for each
_NONE_MADE = np.empty(0, dtype=np.int32)  # a request's ``first_at`` before a batch skipped ids


class QueuedRequestError(TieredStoreError, ValueError):
    """A queued request released twice, or released to a store that did not announce it."""


@dataclass(eq=False)
class QueuedRequest:
    """One announced request: pass it to ``release`` once it is served or cancelled."""

    token: int  # order of announcement: earlier requests have smaller tokens
    rows: torch.Tensor = field(repr=False)  # its distinct row ids, sorted (CPU)
    owner: object = field(repr=False)
    first_rows: torch.Tensor = field(repr=False)  # of ``rows``, those no earlier request queued
    left: np.ndarray = field(repr=False)  # lookups of each of ``rows`` not yet served
    # the position in ``rows`` of each id announced, in order (int32), and the place past the
    # last of those the batches served so far took at its place (ids not announced not counted;
    # a few skipped passed over): where ``served`` looks first for a batch's ids
    where: np.ndarray = field(repr=False)
    served_ids: int = field(default=0, repr=False)
    # the first place among the ids announced of each of ``rows`` (int32, -1 where none), made
    # at the first batch whose first id was searched for (ids skipped): where ``served`` takes
    # up the ids announced again past those skipped
    first_at: np.ndarray = field(default_factory=lambda: _NONE_MADE, repr=False)
    # the position of its pair of each of ``rows`` in the queue's pairs of version
    # ``pairs_version`` (found at its second batch served since they were replaced)
    pair_at: np.ndarray | None = field(default=None, repr=False)
    pairs_version: int = field(default=-1, repr=False)
    # a tier missed the news of a batch served (dropped, ``StoreLock``; or never posted, a Ctrl-C
    # in ``TieredStore.served``): its finished rows there still wait for it, so its release tells
    # every row of it, not only those it had left
    missed_batch: bool = field(default=False, repr=False)
    # batches whose pass over the pairs began (counted before it; a pass that fails before it
    # writes, out of memory, which changes nothing, uncounted): ``TieredStore.served`` tells
    # from it whether a failure came after the request changed (its news then missed) or not
    passes: int = field(default=0, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays: its rows, its first rows, its lookups left, its ids' places, its
        rows' first places (once made) and its pairs' places (once found)."""
        found = 0 if self.pair_at is None else self.pair_at.nbytes
        arrays = self.rows.nbytes + self.first_rows.nbytes + self.left.nbytes + self.where.nbytes
        return arrays + self.first_at.nbytes + found


class QueuedRequests:
    """Announced requests and, for any row, the earliest of them that looks it up: one array of
    (row, request) pairs sorted by row, then by request, kept up to date as requests come and go
    (a merge when one comes, a pass that drops its pairs when one goes: no sort of the queue).
    The arrays are replaced, never changed in place but for a served batch finishing pairs (a
    token negated: only ever from positive to negative): a reader (an admission's ``next_use``,
    under the store's lock) takes them as they are, never waiting for a pass under way."""

    def __init__(self) -> None:
        self._requests: dict[int, QueuedRequest] = {}  # the requests queued now, by token
        self._tokens = itertools.count(1)
        self._pair_rows = np.empty(0, dtype=np.int64)  # sorted; a row once per request using it
        # ascending within each row by magnitude; negated: finished (its request has no lookup
        # of the row left), a pair every reading passes over
        self._pair_tokens = np.empty(0, dtype=np.int64)
        self._version = 0  # of the pairs: counts their replacements (each counted before it)
        self._changing = threading.Lock()  # held by ``add``, ``remove``, ``served`` throughout
        self._lock = threading.Lock()  # the arrays and requests, replaced together (held briefly)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request: object) -> bool:
        """Whether ``request`` is queued here now (announced, not released)."""
        return (
            isinstance(request, QueuedRequest)
            and request.owner is self
            and request.token in self._requests
        )

    @property
    def rows(self) -> int:
        """Distinct rows the queued requests look up (have a lookup of left)."""
        pair_rows, pair_tokens = self._pairs()
        pairs = pair_rows[pair_tokens > 0]  # finished pairs are no lookup
        return int(np.count_nonzero(pairs[1:] != pairs[:-1])) + int(pairs.size > 0)

    @property
    def nbytes(self) -> int:
        """Bytes of the (row, request) pairs held now."""
        pair_rows, pair_tokens = self._pairs()
        return pair_rows.nbytes + pair_tokens.nbytes

    @property
    def request_bytes(self) -> int:
        """Bytes of the queued requests' own arrays (``QueuedRequest.nbytes``) held now."""
        with self._lock:
            requests = list(self._requests.values())
        return sum(request.nbytes for request in requests)

    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The (row, request) pairs as they are now (a pass under way replaces them later)."""
        with self._lock:
            return self._pair_rows, self._pair_tokens

    def _check_queued(self, request: object, call: str) -> None:
        """Refuse anything but a request this queue holds now, naming ``call``."""
        if not isinstance(request, QueuedRequest):
            raise QueuedRequestError(
                f"{call}: got {type(request).__name__} {shown(request)}; expected the "
                "QueuedRequest that announce() returned"
            )
        if request not in self:
            where = "was already released" if request.owner is self else "is another store's"
            expected = (
                "release each request once, to the store that announced it"
                if call == "release"
                else "expected a request announced to this store and not released yet "
                "(served() each batch before its lookup, release() after the last)"
            )
            raise QueuedRequestError(f"{call}: queued request {request.token} {where}; {expected}")

    def add(self, ids: torch.Tensor, made: list[QueuedRequest] | None = None) -> QueuedRequest:
        """Queue a request that will look up ``ids`` (any shape); its ``first_rows`` are those no
        request queued before it looks up (but for rows it finished with): they now wait for
        it. ``made``: gets the request before the queue changes, for a caller to withdraw it
        when a Ctrl-C is raised once it is queued (at the end of a call in here: it is never
        returned)."""
        from . import request_queue_kernels as kernels  # numba: imported at the first announce

        rows, where, counts = torch.unique(
            ids.reshape(-1).to("cpu", torch.int64), return_inverse=True, return_counts=True
        )
        left, where = counts.numpy(), where.to(torch.int32).numpy()
        with self._changing:
            token = next(self._tokens)
            if not rows.numel():  # no pair to add: no pass over the queue's
                request = QueuedRequest(token, rows, self, rows, left, where)
                if made is not None:
                    made.append(request)
                with self._lock:
                    self._requests[token] = request
                return request
            pair_rows, pair_tokens, first = kernels.merge_request(
                self._pair_rows, self._pair_tokens, rows.numpy(), token
            )
            request = QueuedRequest(token, rows, self, rows[torch.from_numpy(first)], left, where)
            if made is not None:
                made.append(request)
            self._version += 1  # before the pairs change: a Ctrl-C leaves no stale ``pair_at``
            with self._lock:
                self._pair_rows, self._pair_tokens = pair_rows, pair_tokens
                self._requests[token] = request
        return request

    def remove(self, request: QueuedRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop a request from the queue (served or cancelled). Returns the rows it was the
        earliest request for (but for those it finished with, ``served``), and the token of the
        request that now looks each up first (``NOT_QUEUED`` where none does)."""
        from . import request_queue_kernels as kernels

        with self._changing:
            self._check_queued(request, "release")
            if not request.rows.numel():  # no pair to drop: no pass over the queue's
                with self._lock:
                    self._requests.pop(request.token, None)
                return request.rows, request.rows.clone()
            # sized by the request (one pair per row), not the queue: the queue holds what
            # ``nbytes`` counts, and a release's news (held until the tiers are told) its rows
            pair_rows, pair_tokens, rows, next_use = kernels.drop_request(
                self._pair_rows, self._pair_tokens, request.token, NOT_QUEUED, request.rows.numel()
            )
            self._version += 1  # before the pairs change (as ``add``)
            with self._lock:
                self._pair_rows, self._pair_tokens = pair_rows, pair_tokens
                self._requests.pop(request.token, None)
        return torch.from_numpy(rows), torch.from_numpy(next_use)

    def served(
        self, request: QueuedRequest, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``request``'s lookups of ``ids`` (any shape; ids it did not announce are not counted;
        None: every lookup it has left, its last batch, rebuilt from ``left``: all of them at
        its first) are made now: the rows none of its lookups left looks up lose its standing.
        Returns those it was the earliest request for, and the token of the request that now
        looks each up first (``NOT_QUEUED`` where none does), as ``remove``. A compiled pass over
        the batch, each id taken at its place among those announced from where the batches
        before left off (a batch after ids skipped, a cached prompt prefix, takes them up past
        those: ``serve_batch``), and a search for each finished row's pair (at the request's
        second batch since the queue's pairs last changed, all of its pairs are found at once
        instead, each searched for from the last one's; not at the no-ids form's: no batch
        follows it)."""
        from . import request_queue_kernels as kernels

        if ids is not None:
            flat = np.ascontiguousarray(ids.reshape(-1).to("cpu", torch.int64).numpy())
        with self._changing:
            self._check_queued(request, "served")
            rows = request.rows.numpy()
            where, start = request.where, request.served_ids
            if ids is None:  # each lookup left, at its place in ``rows``: no search
                where = np.repeat(np.arange(rows.size, dtype=np.int32), request.left)
                flat, start = rows[where], 0
            # where its pairs are: searched for at its first batch since the pairs were replaced
            # (a request served in one batch pays no pass over the queue), all found at once at
            # its second (then kept while they stay), but at its last (no ids: no batch after)
            if request.pairs_version != self._version:
                request.pair_at, request.pairs_version = None, self._version
            elif request.pair_at is None and ids is not None:
                request.pair_at = kernels.pairs_of(
                    self._pair_rows, self._pair_tokens, rows, request.token
                )
            # the pairs' tokens are negated in place: a reader sees a pair finished or not, and
            # sets what the news that follows corrects (``left`` is read only here and in ``add``)
            request.passes += 1  # before the pass: a Ctrl-C from here on may follow a change
            try:
                moved, next_use, taken, first_at = kernels.serve_batch(
                    rows,
                    request.left,
                    where,
                    request.first_at if ids is not None else _NONE_MADE,
                    start,
                    flat,
                    _SEARCH if request.pair_at is None else request.pair_at,
                    self._pair_rows,
                    self._pair_tokens,
                    request.token,
                    NOT_QUEUED,
                )
            except MemoryError:  # (its allocations, before it writes) the pass changed nothing
                request.passes -= 1
                raise
            request.served_ids = request.where.size if ids is None else taken
            if ids is not None:
                request.first_at = first_at
        return torch.from_numpy(moved), torch.from_numpy(next_use)

    def next_use(self, ids: torch.Tensor) -> torch.Tensor:
        """Token of the earliest queued request that looks up each of ``ids`` (int64, on ``ids``'
        device) and has a lookup of it left; ``NOT_QUEUED`` where none does."""
        query = ids.to("cpu", torch.int64).numpy()
        pair_rows, pair_tokens = self._pairs()
        if not pair_rows.size:  # (no announce yet: numba not imported)
            return torch.full(ids.shape, NOT_QUEUED, dtype=torch.int64, device=ids.device)
        from . import request_queue_kernels as kernels

        out = kernels.earliest(
            pair_rows, pair_tokens, np.ascontiguousarray(query).reshape(-1), NOT_QUEUED
        )
        return torch.from_numpy(out.reshape(query.shape)).to(ids.device)

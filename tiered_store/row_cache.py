"""One cache tier's bookkeeping without payload: row -> slot index, slot owners, free list, pinning,
and the eviction/admission policies. The live store and trace replay run this same code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from policies import PolicySpec
from policies.base import NoEviction, smallest
from policies.registry import EVICTION

from .errors import RowIdError
from .id_ops import nonzero
from .online_repin import OnlineRepin, RepinMoves
from .queue_victims import QueueVictims, furthest_first
from .request_queue import NOT_QUEUED, QueuedRequest, QueuedRequests
from .row_index import make_row_index

# Spare victims one topk finds for later batches (policies whose keys only grow, e.g. LRU): at
# least DEFAULT_VICTIM_BUFFER, VICTIM_BUFFER_BATCHES batches' worth, or 1/VICTIM_BUFFER_SHARE of
# the tier (a refill passes over every slot, so small batches on a large tier would otherwise pay
# that pass every few batches: decode steps of a 4.8M-slot tier spent most of their time there).
# Measured on a 20M-lookup trace (5% and 25% tiers): LRU replay 1.4-2.7x faster than a topk per batch at 4,096-token
# batches, 4-10x at 64-token batches, with the same victims.
DEFAULT_VICTIM_BUFFER = 4096
VICTIM_BUFFER_BATCHES = 8
VICTIM_BUFFER_SHARE = 16
SLOT_BYTES = 8 + 1 + 8  # per slot, whatever the policy: owner row, unevictable flag, free list
# per slot of a tier whose policy's keys only grow (LRU, zipf-tuned's recency segment): the victim
# buffer's slot and key (8 + 8 B), counted at its most, one entry per slot (a batch that needs
# many victims refills it with up to every evictable slot)
VICTIM_BUFFER_SLOT_BYTES = 8 + 8
QUEUE_SLOT_BYTES = 8  # per slot once a request was announced: the token of its row's next use
# per slot of a tier whose policy has no victims by the queue's runs (keys that do not only grow):
# the slots given a queued next use, at their most one entry per slot
QUEUED_SLOTS_SLOT_BYTES = 8
# With requests queued (tiered_store.request_queue), a victim search looks over the policy's next
# QUEUE_SCAN x victims needed, at least QUEUE_SCAN_MIN, for rows no queued request looks up
# before it passes over every evictable slot
QUEUE_SCAN = 16
QUEUE_SCAN_MIN = 1024


def eviction_slot_bytes(policy: str | None) -> int:
    """Bytes per slot a tier's eviction ``policy`` (a registry name; None: none) keeps: its key
    and, for a policy whose keys only grow, the victim buffer at its most."""
    if policy is None:
        return 0
    eviction = EVICTION[policy]
    return eviction.bytes_per_slot + (VICTIM_BUFFER_SLOT_BYTES if eviction.keys_only_grow else 0)


@dataclass
class TierCounters:
    """Plain integer counters, incremented on the lookup path and read by stats and metrics;
    ``lookups`` (ids probed, duplicates included) is derived: the hits plus the misses."""

    hits: int = 0
    misses: int = 0
    admissions: int = 0  # rows written into the tier
    evictions: int = 0
    rejections: int = 0  # candidates the admission filter or a full static tier turned away
    preloaded: int = 0  # rows loaded at open (warm start / static pinning)

    @property
    def lookups(self) -> int:
        """Ids probed, duplicates included: the hits plus the misses."""
        return self.hits + self.misses

    def as_dict(self) -> dict[str, int]:
        """Counter name -> value, ``lookups`` first: the hits plus misses read here, so the three
        add up while a probe counts (stats read them without the store's lock)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"lookups": out["hits"] + out["misses"], **out}


class RowCache:
    """Which rows a tier holds, in which slot, and which slot goes next.

    Examples
    --------
    >>> import torch
    >>> from policies import PolicySpec
    >>> cache = RowCache("warm", num_rows=100, capacity=2, spec=PolicySpec.parse("lru"))
    >>> cache.begin_batch(); src, slots = cache.admit(torch.tensor([7, 9]), torch.tensor([1, 1]))
    >>> (cache.probe(torch.tensor([9, 7, 3])) >= 0).tolist()
    [True, True, False]
    """

    def __init__(
        self,
        name: str,
        *,
        num_rows: int,
        capacity: int,
        spec: PolicySpec,
        device: torch.device | str = "cpu",
        evict_headroom: float = 0.0,
        victim_buffer: int = DEFAULT_VICTIM_BUFFER,
        index: str = "auto",
    ) -> None:
        self.name = name
        self.num_rows = num_rows
        self.capacity = capacity
        self.spec = spec
        self.device = torch.device(device)
        self.headroom_rows = int(capacity * evict_headroom)
        self.counters = TierCounters()
        self.eviction, self.admission = spec.build(capacity, num_rows, self.device)
        # row -> slot: dense (4 B per table row) or hashed (16 B per slot), see tiered_store.row_index
        self.index = make_row_index(index, num_rows, capacity, self.device) if capacity else None
        self.row_of_slot = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)
        # pinned or free: never a victim (kept up to date instead of recomputed per eviction)
        self._unevictable = torch.ones(capacity, dtype=torch.bool, device=self.device)
        self._free = torch.arange(capacity - 1, -1, -1, dtype=torch.int64, device=self.device)
        self._n_free = capacity
        self._n_pinned = 0
        # next victims of a policy whose keys only grow (LRU), best first: (slots, keys then)
        self._victim_buffer = victim_buffer if self.eviction.keys_only_grow else 0
        self._buffered: tuple[torch.Tensor, torch.Tensor] | None = None
        self._victims_buffered = False  # the last victims came from the front of ``_buffered``
        # called with the slots about to be emptied or reused, before their rows are dropped (the
        # store's write-back copies dirty rows out here); None for read-only stores
        self.before_evict: Callable[[torch.Tensor], None] | None = None
        # zipf-tuned's online counts and re-pin schedule (tiered_store.online_repin), or None
        self.online: OnlineRepin | None = None
        # requests queued or in flight (tiered_store.request_queue) and, per slot, the token of
        # the earliest that looks its row up (NOT_QUEUED: none); None until a queue is attached
        self.queue: QueuedRequests | None = None
        self._next_use: torch.Tensor | None = None
        # victims by the queue, from runs of candidates a pass over the slots found (keys that
        # only grow and a victim buffer); None: a pass per eviction
        self._queue_victims: QueueVictims | None = None
        # a policy without those runs: slots given a queued next use (ascending, then those added
        # since; stale ones pruned by the next search), so that a search by the queue looks at
        # those, not at every slot; None otherwise
        self._queued_slots: torch.Tensor | None = None
        self._queued_sorted = 0  # of ``_queued_slots``, the ascending prefix (each slot once)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def occupancy(self) -> int:
        """Rows currently held."""
        return self.capacity - self._n_free

    def metadata_bytes(self) -> dict[str, float]:
        """Bytes of index and policy metadata: per table row, per slot, and fixed per tier (with
        the victim buffer of a policy whose keys only grow, at its most, and a zipf-tuned tier's
        online re-pin state, :attr:`online`, once attached)."""
        index = self.index.bytes_per() if self.index else {"per_table_row": 0, "per_slot": 0}
        per_slot = SLOT_BYTES + self.eviction.bytes_per_slot + index["per_slot"]
        if self._victim_buffer:  # at its most: one entry per slot
            per_slot += VICTIM_BUFFER_SLOT_BYTES
        if self._next_use is not None:  # once a request was announced: its next use per slot
            per_slot += QUEUE_SLOT_BYTES
            if self._queued_slots is not None:
                per_slot += QUEUED_SLOTS_SLOT_BYTES
        per_row = index["per_table_row"] + self.admission.bytes_per_row
        per_tier = self.admission.bytes_per_tier if self.capacity else 0
        if self.online is not None:  # its counts and stamps per slot, its sketch per tier
            repin = self.online.bytes_per
            per_slot += repin["per_slot"]
            per_tier += repin["per_tier"]
        return {"per_table_row": per_row, "per_slot": per_slot, "per_tier": per_tier}

    def queue_candidate_bytes(self) -> int:
        """Bytes of the victim candidates kept by the request queue's order now (0 before the
        first announce, or for a policy that passes over the slots instead)."""
        return 0 if self._queue_victims is None else self._queue_victims.nbytes

    def held_rows(self) -> torch.Tensor:
        """Row ids held now, most valuable first (last to be evicted) where the policy ranks them."""
        return most_valuable_first(*self.held())

    def held(self) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """A copy of the row id of every slot (-1: free) and the slots' eviction priorities as of
        now, computed when called (``EvictionPolicy.victim_priority_later``; None for a policy
        that never evicts): both taken under the lock, ranked with :func:`most_valuable_first`
        once it is let go."""
        try:
            priority = self.eviction.victim_priority_later()
        except NotImplementedError:  # a policy that never evicts has no order
            priority = None
        return self.row_of_slot.clone(), priority

    def probe(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each id (int64), -1 where the row is not resident."""
        if self.index is None:
            return torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
        return self.index.get(ids)

    # -- updates ---------------------------------------------------------------------------------
    def attach_queue(self, queue: QueuedRequests) -> None:
        """Rank victims by ``queue``: rows no queued request looks up go first, then those whose
        next request is furthest back in the queue. All or nothing: a failure (out of memory)
        leaves the tier without a queue, and the next call attaches it."""
        next_use = torch.full((self.capacity,), NOT_QUEUED, device=self.device)
        if self.capacity and len(queue):
            held = torch.nonzero(self.row_of_slot >= 0).squeeze(1)
            next_use[held] = queue.next_use(self.row_of_slot[held])
        victims, queued = None, None
        if self._victim_buffer:
            victims = QueueVictims(self.eviction, self._unevictable, next_use, self._buffer_size)
        elif not self.eviction.keys_only_grow:
            queued = nonzero(next_use != NOT_QUEUED)
        self.queue, self._next_use, self._queue_victims = queue, next_use, victims
        if queued is not None:
            self._queued_slots, self._queued_sorted = queued, queued.numel()

    def queued(self, request: QueuedRequest) -> None:
        """``request`` joined the queue, the latest: its ``first_rows`` held here now wait for
        it."""
        if self._next_use is not None and self.index is not None and request.first_rows.numel():
            slots = self.probe(request.first_rows.to(self.device))
            slots = slots[slots >= 0]
            self._next_use[slots] = request.token  # no other queued request looks them up
            self._queue_changed(slots)  # now queued, furthest back
            self._note_queued(slots)

    def unqueued(
        self,
        request: QueuedRequest,
        rows: torch.Tensor,
        next_use: torch.Tensor,
        *,
        gone: bool = True,
    ) -> None:
        """``request`` left the queue (``gone``; else it finished with ``rows``, a batch served):
        ``rows``, those it was the earliest request for, held here now wait for ``next_use``
        (``QueuedRequests.remove``, ``served``)."""
        if self._next_use is not None and self.index is not None and rows.numel():
            slots = self.probe(rows.to(self.device))
            mine = nonzero((self._next_use[slots.clamp(min=0)] == request.token) & (slots >= 0))
            slots = slots.index_select(0, mine)
            self._next_use.index_copy_(0, slots, next_use.to(self.device).index_select(0, mine))
            if gone and self._queue_victims is not None:
                self._queue_victims.released(request.token)
            self._queue_changed(slots)
        elif gone and self._queue_victims is not None:  # its rows all finished, batch by batch
            self._queue_victims.released(request.token)

    def begin_batch(self) -> None:
        """Advance the policy's clock; call once per lookup batch."""
        self.eviction.on_batch()

    def record(self, slots: torch.Tensor, missed: torch.Tensor, *, lookups: int, hits: int) -> None:
        """Count a probe and tell the policy which slots were read (``slots`` holds hits only;
        ``missed``: the ids not held, which online re-pinning counts)."""
        self.counters.hits += hits
        self.counters.misses += lookups - hits
        if hits:
            self.eviction.on_hit(slots)
        if self.online is not None and lookups:
            self.online.count(slots, missed, lookups=lookups)

    @property
    def pinned_count(self) -> int:
        """Rows pinned now."""
        return self._n_pinned

    def pinned_mask(self) -> torch.Tensor:
        """Per slot: holds a pinned row."""
        return self._unevictable & (self.row_of_slot >= 0)

    def pin_flags(self) -> torch.Tensor:
        """The tier's own pin flag per slot (no copy; a free slot's flag is set: only those of
        resident slots mean pinned)."""
        return self._unevictable

    def pinned_rows(self) -> torch.Tensor:
        """Row ids pinned now (slot order)."""
        return pinned_rows_of(self.row_of_slot, self._unevictable)

    def observe(self, ids: torch.Tensor) -> None:
        """Let a frequency-learning admission filter see the ids looked up here."""
        if self.capacity and self.admission.learns:
            self.admission.on_access(ids.to(self.device))

    def apply_repin(self, moves: RepinMoves) -> tuple[int, int]:
        """Pin and unpin the slots a re-pin planned, those that still hold the planned rows;
        returns (rows pinned, rows unpinned). Flag flips only: no row moves. All or nothing: a
        failure (out of memory) raises before any flag flips; the queue's victim search, if it
        cannot take the unpinned slots in after them, forgets its candidates instead."""
        pin, unpin = moves.pin_slots.to(self.device), moves.unpin_slots.to(self.device)
        pin = pin[
            (self.row_of_slot[pin] == moves.pin_rows.to(self.device)) & ~self._unevictable[pin]
        ]
        unpin = unpin[
            (self.row_of_slot[unpin] == moves.unpin_rows.to(self.device)) & self._unevictable[unpin]
        ]
        # pinned slots leave the victim buffer as it checks them; the unpinned join it
        buffered = self._buffer_with(unpin)
        self._unevictable[pin] = True
        self._unevictable[unpin] = False
        self._n_pinned += pin.numel() - unpin.numel()
        self._buffered = buffered
        try:
            self._queue_changed(unpin)
        except Exception:  # noqa: BLE001 (out of memory: raised once the flags flipped, the
            # caller took the re-pin for undone) its next search passes over the tier
            self._forget_queue_victims()
        return pin.numel(), unpin.numel()

    def _buffer_with(self, unpin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The victim buffer once ``unpin`` are unpinned: those whose keys are below its largest
        join it, in key order, so it still holds every evictable slot up to its largest key and
        picks what a new ``topk`` would (a re-pin per window no longer costs a ``topk`` over the
        tier). Changes nothing: the caller sets it once the flags flip."""
        if self._buffered is None or not unpin.numel():
            return self._buffered
        slots, keys = self._buffered
        if not slots.numel():
            return None
        unpin_keys = self.eviction.victim_priority(unpin)
        buffered = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
        buffered[slots] = True  # a mark per slot, not an isin (a sort of both)
        join = (unpin_keys < keys[-1]) & ~buffered[unpin]
        if bool(join.any()):
            return merge_sorted(slots, keys, unpin[join], unpin_keys[join])
        return self._buffered

    def pin_resident(self, ids: torch.Tensor, *, only: bool) -> int:
        """Pin the rows of ``ids`` the tier holds; with ``only``, unpin every other row first
        (a warm restart's saved pins replacing the offline ones). Returns rows pinned."""
        if self.index is None:
            return 0
        slots = self.probe(torch.as_tensor(ids, dtype=torch.int64).to(self.device))
        slots = torch.unique(slots[slots >= 0])
        if only:
            self._unevictable[self.pinned_mask()] = False
            self._n_pinned = 0
        new = slots[~self._unevictable[slots]]
        self._unevictable[new] = True
        self._n_pinned += new.numel()
        self._buffered = None
        self._forget_queue_victims()
        return new.numel()

    def admit(
        self,
        ids: torch.Tensor,
        counts: torch.Tensor,
        lookahead: torch.Tensor | None = None,
        window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Try to admit unique ``ids`` (with in-batch ``counts``); returns (positions in ``ids``
        admitted, their slots). Rows already resident are skipped; evicts as the policy says, never
        a row in ``lookahead`` (ids that queued batches will look up). ``window``: the online
        count's window of the batch that missed them (default: the batch recorded last)."""
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        if self.capacity == 0 or ids.numel() == 0:
            return empty, empty
        self._check_new(ids, "to admit")
        ids = ids.to(self.device)
        # another thread may have admitted some of these since they were probed
        cand = nonzero(self._probe_new(ids, "to admit") < 0)
        room = self.capacity - self._n_pinned
        if cand.numel() > room:  # more new rows than the tier can hold: keep the most used
            cand_counts = torch.index_select(counts.to(self.device), 0, cand)
            order = torch.sort(cand_counts, descending=True, stable=True).indices[:room]
            self.counters.rejections += cand.numel() - room
            cand = torch.index_select(cand, 0, order)
        best_first = self.admission.best_first(torch.index_select(ids, 0, cand))
        if best_first is not None:  # paired so with the victims, in eviction order
            cand = torch.index_select(cand, 0, best_first)
        n = cand.numel()
        take_free = min(n, self._n_free)
        victims = self._choose_victims(
            n - take_free, lookahead
        )  # before popping: popped slots look occupied
        taken = victims[:0]  # free slots taken and not given back: an admission that raises
        try:  # before any row moved returns them, and its victims stay (``_untake``)
            taken = free_slots = self._pop_free(take_free)
            slots = torch.cat([free_slots, victims[: n - take_free]])
            extra = victims[n - take_free :]  # headroom: evicted now, later batches find them free
            if slots.numel() < n:  # nothing left to evict (all pinned, or no eviction policy)
                self.counters.rejections += n - slots.numel()
                cand = cand[: slots.numel()]
            new_ids = torch.index_select(ids, 0, cand)
            victim_rows = torch.index_select(self.row_of_slot, 0, slots)  # -1 for the free ones
            ok = self.admission.admit(new_ids, victim_rows)
            if not bool(ok.all()):  # refused candidates: their free slots return; victims go in
                # eviction order, each while the next candidate beats it (a row an announced
                # request needs never goes before one no request needs, nor a row that beat its
                # candidate)
                victim_slots = slots[take_free:]
                admitted_over_victims = int(ok[take_free:].to(torch.int64).cumprod(0).sum())
                ok[take_free + admitted_over_victims :] = False
                rejected = int((~ok).sum())
                keep = nonzero(ok)
                cand, new_ids = (torch.index_select(t, 0, keep) for t in (cand, new_ids))
                kept_free, refused_free = free_slots[ok[:take_free]], free_slots[~ok[:take_free]]
                slots = torch.cat([kept_free, victim_slots[:admitted_over_victims]])
                victim_rows = torch.index_select(self.row_of_slot, 0, slots)
                self._reinstate(victim_slots[admitted_over_victims:])
                self._push_free(refused_free)
                taken = kept_free
                self.counters.rejections += rejected
            if self.before_evict is not None:  # (the write-back's spill)
                self.before_evict(torch.cat([slots[victim_rows >= 0], extra]))
        except BaseException:  # (out of memory) before any row moved
            self._untake(taken, victims)
            raise
        old_rows = torch.cat([victim_rows, torch.index_select(self.row_of_slot, 0, extra)])
        try:
            held = nonzero(old_rows >= 0)
            evicted = torch.index_select(old_rows, 0, held)
            if self.online is not None:
                self.online.evicted(torch.index_select(torch.cat([slots, extra]), 0, held), evicted)
            self._evict(evicted, extra)
            self.index.set(new_ids, slots)
            self.row_of_slot.index_copy_(0, slots, new_ids)
            if self._next_use is not None:
                self._next_use[extra] = NOT_QUEUED
                self._next_use[slots] = self.queue.next_use(new_ids)
                self._note_queued(slots)
            self.eviction.on_insert(slots)
            self._queue_changed(slots)
            if self.online is not None:
                self.online.admitted(slots, new_ids, looked_up=True, window=window)
        except BaseException:  # (out of memory) once rows began to move: no slot keeps a row
            self._abandon(torch.cat([slots, extra]), torch.cat([old_rows, new_ids]))
            raise
        self.counters.admissions += cand.numel()
        return cand, slots

    def preload(
        self, ids: torch.Tensor, *, pin: bool, ages: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load rows into free slots at open (warm start); ``pin`` keeps them forever. ``ages``
        (per id, where the policy ``restores_order``): each row's saved age, which ranks it
        (``EvictionPolicy.on_restore``); otherwise rows rank as inserts of this batch.
        Returns (positions in ``ids`` loaded, slots)."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if self.index is None or ids.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return empty, empty
        self._check_new(ids, "to preload")
        ids = ids.to(self.device)
        if bool((ids[1:] > ids[:-1]).all()):  # sorted and unique (a warm restart's step)
            first = torch.arange(ids.numel(), device=self.device)
        else:
            _, first = _first_occurrence(ids)
        cand = first[self._probe_new(ids[first], "to preload") < 0][: self._n_free]
        slots = self._pop_free(cand.numel()).flip(0)
        try:
            self.index.set(ids[cand], slots)
            self.row_of_slot.index_copy_(0, slots, ids[cand])
            if self._next_use is not None:
                self._next_use[slots] = self.queue.next_use(ids[cand])
                self._note_queued(slots)
            if self.online is not None:
                self.online.admitted(slots, ids[cand], looked_up=False)
            if ages is not None:
                self.eviction.on_restore(slots, torch.as_tensor(ages).to(self.device)[cand])
                self._buffered = None  # conservative: LRU keys still grow, a refill is one topk
            else:
                self.eviction.on_insert(slots)
            if pin:
                self._unevictable[slots] = True
                self._n_pinned += cand.numel()
            self._queue_changed(slots)
        except BaseException:  # (out of memory): its slots return free, its rows not loaded
            self._abandon(slots, ids[cand])
            raise
        self.counters.preloaded += cand.numel()
        return cand, slots

    def drop(self, slots: torch.Tensor) -> None:
        """Empty and free ``slots`` (an admission's or a preload's, pinned or not) whose rows
        could not be written into the payload (out of memory), or held rows a write could not
        overwrite: no slot may keep a row id without its row."""
        slots = slots.to(self.device)
        if slots.numel():
            self._abandon(slots, self.row_of_slot.index_select(0, slots))

    # -- internals -------------------------------------------------------------------------------
    def _check_new(self, ids: torch.Tensor, what: str) -> None:
        """An id outside the table about to be admitted or preloaded is a RowIdError naming the
        tier, raised before any change: a hashed index finds no row for it and refuses it only
        in ``set``, once victims are gone, so its ids are checked first, where the caller has
        them (CPU ids cost a CUDA tier no host sync); a dense one refuses it in the probe
        (named then, :meth:`_probe_new`, at no cost to valid ids)."""
        if self.index.kind != "dense":
            self._check_inside(ids, what)

    def _probe_new(self, ids: torch.Tensor, what: str) -> torch.Tensor:
        """``probe`` of ids about to be admitted or preloaded (:meth:`_check_new`'s): a dense
        index's refusal of an id outside the table is a RowIdError naming the tier."""
        try:
            return self.probe(ids)
        except IndexError:
            self._check_inside(ids, what)
            raise

    def _check_inside(self, ids: torch.Tensor, what: str) -> None:
        """RowIdError naming the tier unless every id is a row of the table."""
        low, high = (int(v) for v in torch.aminmax(ids))
        if not 0 <= low <= high < self.num_rows:
            raise RowIdError(
                f"{self.name} tier: ids {what} in [{low:,}, {high:,}]; expected row ids in "
                f"[0, {self.num_rows:,}) (the table's rows)"
            )

    def _choose_victims(self, need: int, lookahead: torch.Tensor | None) -> torch.Tensor:
        """Up to ``need`` + headroom evictable slots (never pinned, never free, never holding a
        row of ``lookahead``)."""
        evictable = self.capacity - self._n_free - self._n_pinned
        want = min(need + self.headroom_rows if need else 0, evictable)
        if want <= 0 or isinstance(self.eviction, NoEviction):  # a static tier: not even by queue
            return torch.empty(0, dtype=torch.int64, device=self.device)
        protected = self._unevictable
        has_lookahead = lookahead is not None and lookahead.numel() > 0
        queued = self._next_use is not None and len(self.queue) > 0
        self._victims_buffered = self._victim_buffer and not has_lookahead and not queued
        if self._victim_buffer and not has_lookahead:
            if not queued:
                return self._buffered_victims(want)
            return self._queue_victims.pick(min(need, want), want)
        if has_lookahead:
            self._buffered = None  # built under other protection
            ahead = self.probe(lookahead.to(self.device))
            protected = protected.clone()
            protected[ahead[ahead >= 0]] = True
            evictable = int((~protected).sum())
            want = min(want, evictable)
            if want <= 0:
                return torch.empty(0, dtype=torch.int64, device=self.device)
        if queued:
            return self._victims_by_queue(min(need, want), want, protected, evictable)
        return self.eviction.choose_victims(want, protected)

    def _victims_by_queue(
        self, need: int, want: int, protected: torch.Tensor, evictable: int
    ) -> torch.Tensor:
        """``need`` victims (``want`` with headroom) by the queue: rows no queued request looks up,
        in the policy's order; if those run short, the queued rows whose next request is furthest
        back. The policy's next ``QUEUE_SCAN`` x ``want`` candidates usually hold enough unqueued
        rows; otherwise every evictable slot is looked at. A policy whose keys do not only grow
        (SIEVE, FIFO, LFU) searches as it does without a queue, the queued slots (kept in
        ``_queued_slots``, not found by a pass over the tier) blocked."""
        if not self.eviction.keys_only_grow:
            queued = self._queued_now()
            evictable_queued = nonzero(~protected.index_select(0, queued))
            queued = queued.index_select(0, evictable_queued)  # ascending
            first = self._unqueued_victims(min(want, evictable - queued.numel()), protected, queued)
            if first.numel() >= need:
                return first
            return self._then_furthest(first, need, queued, self._next_use.index_select(0, queued))
        scan = min(evictable, max(QUEUE_SCAN * want, QUEUE_SCAN_MIN))
        candidates = self.eviction.smallest_keys(scan, protected)[1]  # in the policy's order
        unqueued = candidates[self._next_use[candidates] == NOT_QUEUED]
        if unqueued.numel() >= want:  # the first unqueued rows in the policy's order
            return unqueued[:want]
        candidates = nonzero(~protected)
        next_use = self._next_use[candidates]
        queued = next_use != NOT_QUEUED
        unqueued = candidates[~queued]
        take = min(want, unqueued.numel())
        keys = self.eviction.victim_priority(unqueued)  # distinct: the smallest are the policy's
        first = unqueued[smallest(keys, take, distinct=True)[1]]
        return self._then_furthest(first, need, candidates[queued], next_use[queued])

    def _then_furthest(
        self, first: torch.Tensor, need: int, queued: torch.Tensor, next_use: torch.Tensor
    ) -> torch.Tensor:
        """``first`` (unqueued victims), then the ``queued`` slots (ascending; with their
        ``next_use``) needed furthest back, up to ``need`` in all."""
        short = need - first.numel()
        if short <= 0:
            return first
        furthest = furthest_first(queued, next_use, short)[:short]
        return torch.cat([first, queued[furthest]])

    def _unqueued_victims(
        self, take: int, protected: torch.Tensor, queued: torch.Tensor
    ) -> torch.Tensor:
        """``take`` victims by the policy among the slots neither ``protected`` nor ``queued``
        (blocked in a copy: ``protected`` may be the tier's own pin flags, which the re-pin
        thread copies off the lock)."""
        if take <= 0:
            return queued.new_empty(0)
        if queued.numel():
            protected = protected.clone().index_fill_(0, queued, True)
        return self.eviction.choose_victims(take, protected)

    def _note_queued(self, slots: torch.Tensor) -> None:
        """``slots`` were given a next use: those now queued join ``_queued_slots``."""
        if self._queued_slots is None or not slots.numel():
            return
        queued = slots.index_select(0, nonzero(self._next_use[slots] != NOT_QUEUED))
        self._queued_slots = torch.cat([self._queued_slots, queued])
        if self._queued_slots.numel() > self.capacity:  # at most one entry per slot kept
            self._queued_now()

    def _queued_now(self) -> torch.Tensor:
        """The slots whose row a queued request looks up, ascending, each once (``_queued_slots``
        pruned of slots that left the queue or were reused since). Those added since the last
        call are merged into the ascending prefix: no sort of every queued slot per search."""
        slots = self._queued_slots[: self._queued_sorted]
        added = torch.unique(self._queued_slots[self._queued_sorted :])  # the few added since
        if added.numel() and slots.numel():
            at = torch.searchsorted(slots, added).clamp(max=slots.numel() - 1)
            added = added.index_select(0, nonzero(slots.index_select(0, at) != added))
        if added.numel():
            slots = merge_sorted(slots, slots, added, added)[0]
        slots = slots.index_select(0, nonzero(self._next_use.index_select(0, slots) != NOT_QUEUED))
        self._queued_slots, self._queued_sorted = slots, slots.numel()
        return slots

    def _buffered_victims(self, want: int) -> torch.Tensor:
        """``want`` victims from the buffer, refilled when it runs short by one ``topk`` that also
        finds spares for later batches. A buffered slot whose key is unchanged is still among the
        smallest (every other key was larger at the ``topk`` and can only have grown), so this picks
        exactly what a ``topk`` per batch would for batches planned and admitted in turn (replay,
        one caller); concurrent callers make LRU order timing-dependent either way."""
        if self._buffered is not None:
            slots, keys = self._buffered
            # check a prefix first (small batches then cost O(batch), not O(buffer)), then the rest
            for head in (min(slots.numel(), 4 * want + 64), slots.numel()):
                valid = nonzero(self._still_valid(slots[:head], keys[:head]))
                taken, taken_keys = slots.index_select(0, valid), keys.index_select(0, valid)
                if taken.numel() >= want:
                    self._buffered = (
                        torch.cat([taken[want:], slots[head:]]),
                        torch.cat([taken_keys[want:], keys[head:]]),
                    )
                    return taken[:want]
        slots, keys = self._smallest_for_buffer(want)
        self._buffered = (slots[want:], keys[want:])
        return slots[:want]

    def _smallest_for_buffer(self, want: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, keys) of the evictable slots with the smallest keys, ascending: ``want`` and
        spares for later batches (a buffer refill's one ``topk``)."""
        evictable = self.capacity - self._n_free - self._n_pinned
        keys, slots = self.eviction.smallest_keys(
            min(self._buffer_size(want), evictable), self._unevictable
        )
        return slots, keys

    def _buffer_size(self, want: int) -> int:
        """Victims a refill finds when ``want`` are needed now: those and spares for later
        batches."""
        spare = max(
            self._victim_buffer, VICTIM_BUFFER_BATCHES * want, self.capacity // VICTIM_BUFFER_SHARE
        )
        return want + spare

    def _forget_queue_victims(self) -> None:
        """Slots may have become victims anywhere: the next search by the queue passes over the
        tier."""
        if self._queue_victims is not None:
            self._queue_victims.drop()

    def _queue_changed(self, slots: torch.Tensor) -> None:
        """``slots`` were admitted, unpinned, reinstated or changed next use: the search by the
        queue takes them in."""
        if self._queue_victims is not None:
            self._queue_victims.changed(slots)

    def _still_valid(self, slots: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Buffered victims whose key is unchanged and that are still evictable."""
        return (self.eviction.victim_priority(slots) == keys) & ~self._unevictable[slots]

    def _untake(self, free_slots: torch.Tensor, victims: torch.Tensor) -> None:
        """An admission that failed before any row moved gives back what it took: its
        ``free_slots`` return to the free list, its ``victims`` (headroom included) stay
        resident, and the victim buffer they came from is refilled when next needed."""
        self._push_free(free_slots)
        self.eviction.on_reinstate(victims)
        self._queue_changed(victims)
        self._buffered = None

    def _abandon(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """An admission or preload that failed once rows began to move (or rows whose payload
        could not be written, :meth:`drop`) leaves its ``slots`` empty and free, whatever it had
        done: ``rows`` (its victims, written back already, and its new rows; -1 none) leave the
        index where they point into ``slots``. Its caller writes no payload into them, so none
        may keep a row; the victims are evicted, the new rows not cached."""
        rows = torch.unique(rows[rows >= 0])
        at = self.probe(rows)
        self.index.delete(rows[torch.isin(at, slots)])
        pinned = slots[self._unevictable[slots] & (self.row_of_slot[slots] >= 0)]
        self._unevictable[pinned] = False  # (a preload's) unpinned, then freed below
        self._n_pinned -= pinned.numel()
        self.row_of_slot.index_fill_(0, slots, -1)
        self._push_free(slots[~self._unevictable[slots]])  # those not back on the free list
        self.eviction.on_free(slots)
        if self._next_use is not None:
            self._next_use[slots] = NOT_QUEUED
        self._buffered = None
        self._forget_queue_victims()

    def _reinstate(self, slots: torch.Tensor) -> None:
        """Victims that stay after all (their candidates were refused): they keep their standing,
        first in line again."""
        self.eviction.on_reinstate(slots)
        self._queue_changed(slots)
        if not self._victims_buffered:  # picked by the queue or a search, the buffer may hold
            self._buffered = None  # them still: put back, they would be in it twice
        elif self._buffered is not None and slots.numel():
            keys = self.eviction.victim_priority(slots)
            self._buffered = (
                torch.cat([slots, self._buffered[0]]),
                torch.cat([keys, self._buffered[1]]),
            )

    def _evict(self, rows: torch.Tensor, freed_slots: torch.Tensor) -> None:
        """Drop ``rows`` from the index; ``freed_slots`` (emptied, not reused) join the free list."""
        if rows.numel():
            self.index.delete(rows)
            self.counters.evictions += rows.numel()
        if freed_slots.numel():
            self.row_of_slot.index_fill_(0, freed_slots, -1)
            self._push_free(freed_slots)
            self.eviction.on_free(freed_slots)

    def _pop_free(self, k: int) -> torch.Tensor:
        """Take ``k`` slots off the free list."""
        slots = self._free[self._n_free - k : self._n_free].clone()
        self._n_free -= k
        if k:
            self._unevictable.index_fill_(0, slots, False)
        return slots

    def _push_free(self, slots: torch.Tensor) -> None:
        """Return slots to the free list."""
        k = slots.numel()
        if k:
            self._free[self._n_free : self._n_free + k] = slots
            self._n_free += k
            self._unevictable.index_fill_(0, slots, True)


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids in order of first appearance, and their first positions."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.int64, device=ids.device)
    first.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
    first = torch.sort(first).values
    return ids[first], first


def merge_sorted(
    slots: torch.Tensor, keys: torch.Tensor, new_slots: torch.Tensor, new_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, keys) in key order with (new_slots, new_keys) merged in: what a stable sort of
    both concatenated gives (a new key after the old ones equal to it), in a sort of the new
    only (a re-pin's few) and one pass, not a sort of the buffer under the store's lock.

    >>> merge_sorted(torch.tensor([7, 8, 9]), torch.tensor([1, 3, 3]),
    ...              torch.tensor([5, 6]), torch.tensor([3, 0]))
    (tensor([6, 7, 8, 9, 5]), tensor([0, 1, 3, 3, 3]))
    """
    new_keys, order = torch.sort(new_keys, stable=True)
    place = torch.searchsorted(keys, new_keys, right=True)
    place += torch.arange(new_keys.numel(), device=place.device)
    n = keys.numel() + new_keys.numel()
    old = torch.ones(n, dtype=torch.bool, device=keys.device)
    old[place] = False
    merged_slots, merged_keys = slots.new_empty(n), keys.new_empty(n)
    merged_slots[place], merged_keys[place] = new_slots[order], new_keys
    merged_slots[old], merged_keys[old] = slots, keys
    return merged_slots, merged_keys


def pinned_rows_of(row_of_slot: torch.Tensor, pin_flags: torch.Tensor) -> torch.Tensor:
    """The rows pinned (slot order), from a tier's ``row_of_slot`` and ``pin_flags`` or copies
    of them: a free slot's flag is set, so only those of held slots mean pinned."""
    return row_of_slot[pin_flags & (row_of_slot >= 0)]


def most_valuable_first(
    row_of_slot: torch.Tensor, priority: Callable[[], torch.Tensor] | None
) -> torch.Tensor:
    """The rows held (``row_of_slot`` >= 0) by descending eviction ``priority()`` (last to be
    evicted first; ties in slot order); in slot order where there is no priority."""
    slots = torch.nonzero(row_of_slot >= 0).squeeze(1)
    if priority is not None:
        slots = slots[torch.sort(priority()[slots], descending=True, stable=True).indices]
    return row_of_slot[slots]

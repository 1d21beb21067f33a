"""The store's cache decisions for one batch, shared by the live store and payload-free replay."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from policies import PolicySpec
from policies.errors import PolicyError
from policies.registry import spec_grammar
from policies.zipf_tuned import zipf_tuned_split

from .capacity import is_off, resolve_capacity
from .config import CacheTierConfig, StoreConfig, in_config_file
from .errors import ConfigError, TraceFormatError, shown, warn_at_caller
from .id_ops import nonzero, unique_inverse_counts
from .npy_files import load_npy
from .online_repin import OnlineRepin, RepinMoves
from .request_queue import QueuedRequest, QueuedRequests
from .row_cache import RowCache

if TYPE_CHECKING:
    from .profile import FrequencyProfile


class PinnedRowsWarning(UserWarning):
    """A tier's pinned rows fill it: nothing else can be cached there (the store still serves)."""


class IgnoredSettingWarning(UserWarning):
    """A tier sets something its policy does not use (the store opens without it)."""


@dataclass
class LookupPlan:
    """Where every id of a batch is served from."""

    hot_slots: torch.Tensor  # [n] int64 on the hot device; -1 where hot missed
    miss_pos: torch.Tensor  # positions of hot misses (hot device)
    unique_ids: torch.Tensor  # sorted unique ids among hot misses (CPU)
    inverse: torch.Tensor  # [len(miss_pos)] index into unique_ids (hot device)
    counts: torch.Tensor  # occurrences of each unique id (CPU)
    warm_slots: torch.Tensor  # [len(unique_ids)] warm slot or -1 (CPU)
    cold_idx: torch.Tensor  # positions in unique_ids that must be read from cold (CPU)
    cold_ids: torch.Tensor  # the ids there: unique_ids[cold_idx] (CPU)
    # each tier's online-count window of this batch, for its admissions (None: no online count)
    hot_window: int | None = None
    warm_window: int | None = None

    @property
    def all_hit(self) -> bool:
        """Every id was served by the hot tier."""
        return self.miss_pos.numel() == 0


@dataclass
class AdmitPlan:
    """Rows to copy into each tier after the misses are fetched."""

    warm_src: torch.Tensor  # positions in unique_ids, CPU
    warm_slots: torch.Tensor
    hot_src: torch.Tensor  # positions in unique_ids, hot device
    hot_slots: torch.Tensor


class CacheHierarchy:
    """Hot over warm over cold: probes, counts, and admission decisions for whole batches."""

    def __init__(self, hot: RowCache, warm: RowCache) -> None:
        self.hot = hot
        self.warm = warm
        # the tiers that count episodes online and re-pin (zipf-tuned with repin.enabled)
        self.online = [c for c in (hot, warm) if c.online is not None]
        # requests announced and not released; the tiers rank victims by it from the first on
        self.queue = QueuedRequests()

    def attach_queue(self) -> QueuedRequests:
        """The queue, with both tiers ranking victims by it (from the first announce on: until
        then they keep no per-slot state for it)."""
        for cache in (self.hot, self.warm):
            if cache.queue is None:
                cache.attach_queue(self.queue)
        return self.queue

    def announce(self, ids: torch.Tensor) -> QueuedRequest:
        """A request that will look up ``ids`` joined the queue: both tiers evict its rows last
        until it is released."""
        request = self.attach_queue().add(ids)
        self.queued(request)
        return request

    def release(self, request: QueuedRequest) -> None:
        """An announced request left the queue (it was served, or cancelled)."""
        self.unqueued(request, self.queue.remove(request))

    def served(self, request: QueuedRequest, ids: torch.Tensor) -> None:
        """An announced request's batch ``ids`` is looked up now (before it admits): the rows its
        later batches do not look up lose its standing (``QueuedRequests.served``)."""
        self.unqueued(request, self.queue.served(request, ids), gone=False)

    def unqueued(
        self, request: QueuedRequest, moved: tuple[torch.Tensor, torch.Tensor], *, gone: bool = True
    ) -> None:
        """Both tiers: ``request`` left the queue (``gone``; else a batch of it was served);
        ``moved``: what ``QueuedRequests.remove`` (``served``) returned (the rows it was the
        earliest request for, and their next request)."""
        for cache in (self.hot, self.warm):
            cache.unqueued(request, *moved, gone=gone)

    def queued(self, request: QueuedRequest) -> None:
        """Both tiers: ``request``, just added to the queue, now holds its rows."""
        for cache in (self.hot, self.warm):
            cache.queued(request)

    @classmethod
    def from_config(
        cls, config: StoreConfig, num_rows: int, row_bytes: int, device: torch.device | str = "cpu"
    ) -> CacheHierarchy:
        """The hot (on ``device``) and warm (host) row caches a config describes, for a table of
        ``num_rows`` rows of ``row_bytes`` each. The live store and replay both build them here."""
        tiers = config.tiers
        hot = _row_cache("hot", tiers.hot, num_rows, row_bytes, torch.device(device))
        warm = _row_cache("warm", tiers.warm, num_rows, row_bytes, torch.device("cpu"))
        return cls(hot, warm)

    def warm_start(
        self,
        config: StoreConfig,
        restored: Collection[str] = (),
        shard: tuple[int, int, int] | None = None,
        layouts: Sequence[tuple[str, Mapping[str, Any]]] = (),
    ) -> list[tuple[RowCache, torch.Tensor, torch.Tensor]]:
        """Load each tier's ``static_rows`` (pinned, under a static policy) and ``preload_rows``.
        Returns (cache, row ids loaded, their slots) for the caller to fill with payload.
        ``restored``: re-pinning tiers whose pins and counts a warm restart brings back; their
        profile only sizes the pinned segment (its pins would take the slots the saved ones need).
        ``shard``: ``(start, stop, rows)`` when the table is rows [start, stop) of a table of
        ``rows`` rows (see :func:`shard_rows`): the lists and profiles name that table's rows,
        and the shard takes those it holds. ``layouts``: what the table's rows are, to check each
        profile against (see :func:`load_tier_profile`)."""
        loaded = []
        pinned_above = np.zeros(0, dtype=np.int64)  # rows the hot tier pins: warm skips them
        for cache, tier in ((self.hot, config.tiers.hot), (self.warm, config.tiers.warm)):
            if cache.capacity == 0:
                continue
            if cache.spec.tuned and tier.profile is not None:
                # pinned rows come from the profile, sized by zipf_tuned_split; without one the
                # tier starts as its recency policy and online re-pinning learns what to pin
                profile = load_tier_profile(
                    tier.profile, cache.num_rows, f"tiers.{cache.name}.profile", shard, layouts
                )
                split = zipf_tuned_split(
                    profile.top_rows(cache.capacity + pinned_above.size, by="episodes"),
                    profile.counts,
                    cache.capacity,
                    recency_window=tier.recency_window,
                    pinned_above=pinned_above,
                )
                key = f"tiers.{cache.name}.repin.prior_weight"
                if cache.name in restored and cache.online is not None:  # counts come back
                    cache.online.seed(profile, split.pinned_rows.size, key=key, restored=True)
                    pinned = split.pinned_rows
                else:
                    if cache.online is not None:  # the offline pins are the starting point, and
                        # its counts: seeded first, so the pinned rows start from them
                        cache.online.seed(profile, split.pinned_rows.size, key=key)
                    loaded.append(self._preload(cache, torch.from_numpy(split.pinned_rows), True))
                    pinned = loaded[-1][1].numpy()
                pinned_above = np.concatenate([pinned_above, pinned])
            for key, path, pin in (
                ("static_rows", tier.static_rows, True),
                ("preload_rows", tier.preload_rows, False),
            ):
                if path is None or (pin and (not cache.spec.static or cache.spec.tuned)):
                    continue
                option = f"tiers.{cache.name}.{key}"
                check_row_list_addressing(path, option, layouts)
                ids = _load_row_list(path, cache.num_rows, option, shard)
                if pin and ids.size >= cache.capacity and cache.spec.eviction is not None:
                    warn_at_caller(
                        in_config_file(
                            f"{option}: {path} lists {ids.size:,} rows and the tier holds "
                            f"{cache.capacity:,}: the first {cache.capacity:,} are pinned and no "
                            "slot is left for rows that are not (every other row is read from "
                            "below); give the tier more capacity or list fewer rows"
                        ),
                        PinnedRowsWarning,
                    )
                loaded.append(self._preload(cache, torch.from_numpy(ids), pin))
                if pin:
                    pinned_above = np.concatenate([pinned_above, loaded[-1][1].numpy()])
        return loaded

    @staticmethod
    def _preload(
        cache: RowCache, ids: torch.Tensor, pin: bool
    ) -> tuple[RowCache, torch.Tensor, torch.Tensor]:
        """Preload ``ids`` (hottest first) into free slots; returns what was loaded where."""
        pos, slots = cache.preload(ids[: cache.capacity * 4], pin=pin)
        return cache, ids[pos.cpu()], slots

    def repin_waiting(self) -> bool:
        """A tier waits for its re-pin or has updates waiting to be applied (the store)."""
        return any(c.online.due or c.online.pending for c in self.online)

    def repin_worth_waking(self) -> bool:
        """A tier waits for its re-pin or has a full window queued: the store wakes its re-pin
        thread then, not for every batch (a thread woken per small batch takes the GIL from
        the lookups)."""
        return any(c.online.due or c.online.windows_queued for c in self.online)

    def repin_now(self) -> None:
        """Re-pin every tier whose interval is over, synchronously (replay, at the batch boundary
        that ends the interval; the store plans in the background and applies under its lock)."""
        for cache in self.online:
            if cache.online.due:
                self.apply_repin(cache, cache.online.plan(cache.row_of_slot, cache.pin_flags()))

    def apply_repin(self, cache: RowCache, moves: RepinMoves) -> None:
        """Apply a re-pin of ``cache`` (checked slot by slot) and close its interval. Rows the hot
        tier pins are never looked up in warm (hot serves them), so a re-pinning warm tier unpins
        them and leaves them out of its re-pins until hot unpins them (a row pinned in both held
        a warm slot that served nothing)."""
        moves = cache.online.leave_above(moves)  # hot pins since the plan (a restore thread)
        cache.online.forget_above(cache.row_of_slot)  # those warm no longer holds, as of now
        cache.online.finish(*cache.apply_repin(moves))
        if cache is not self.hot or self.warm.online is None:
            return
        hot = self.hot
        pinned = hot.pin_flags()
        pin, unpin = moves.pin_slots.to(hot.device), moves.unpin_slots.to(hot.device)
        pin_rows, unpin_rows = moves.pin_rows.to(hot.device), moves.unpin_rows.to(hot.device)
        pinned_now = pin_rows[pinned[pin] & (hot.row_of_slot[pin] == pin_rows)].cpu()
        released = unpin_rows[~pinned[unpin] & (hot.row_of_slot[unpin] == unpin_rows)].cpu()
        self._leave_to_hot(pinned_now, released)

    def leave_hot_pins_to_hot(self) -> None:
        """A re-pinning warm tier unpins and leaves out of its re-pins every row it holds that hot
        pins now (after a warm restart: it saves no list of them, and brings them back into warm)."""
        if self.warm.online is not None:
            pinned = self.hot.pinned_rows().cpu()
            self._leave_to_hot(pinned, released=pinned)  # each listed once, as of now

    def _leave_to_hot(self, pinned_now: torch.Tensor, released: torch.Tensor) -> None:
        """Hot pins ``pinned_now`` and no longer pins ``released``: warm unpins the former and
        leaves them out of its re-pins while it holds them, and considers the latter again."""
        warm = self.warm
        if not pinned_now.numel() and not released.numel():
            return
        slots = warm.probe(pinned_now)
        held = slots >= 0
        slots, rows = slots[held], pinned_now[held]
        warm.online.pinned_above(slots, rows, released)
        also = warm.pin_flags()[slots]
        if bool(also.any()):
            none = torch.empty(0, dtype=torch.int64)
            warm.online.rows_unpinned += warm.apply_repin(
                RepinMoves(none, none, slots[also], rows[also])
            )[1]

    def plan(self, flat_ids: torch.Tensor) -> LookupPlan:
        """Probe hot, then warm for the (deduplicated) hot misses; record hits with the policies."""
        hot, warm = self.hot, self.warm
        hot.begin_batch()
        warm.begin_batch()
        hot.observe(flat_ids)
        hot_slots = hot.probe(flat_ids)
        hit = hot_slots >= 0
        miss_pos = nonzero(~hit)
        n, n_miss = flat_ids.numel(), miss_pos.numel()
        miss_ids = torch.index_select(flat_ids, 0, miss_pos) if n_miss else miss_pos
        hot.record(
            torch.index_select(hot_slots, 0, nonzero(hit)) if n_miss else hot_slots,
            miss_ids,
            lookups=n,
            hits=n - n_miss,
        )
        cpu_empty = torch.empty(0, dtype=torch.int64)
        if n_miss == 0:
            return LookupPlan(
                hot_slots, miss_pos, cpu_empty, miss_pos, cpu_empty, cpu_empty, cpu_empty, cpu_empty
            )
        warm.observe(miss_ids)
        unique_ids, inverse, counts = unique_inverse_counts(miss_ids)
        unique_cpu, counts_cpu = unique_ids.cpu(), counts.cpu()
        warm_slots = warm.probe(unique_cpu)
        warm_hit = warm_slots >= 0
        cold_idx = nonzero(~warm_hit)
        cold_ids = torch.index_select(unique_cpu, 0, cold_idx)
        warm_hit_idx = nonzero(warm_hit)
        warm.record(
            torch.index_select(warm_slots, 0, warm_hit_idx),
            cold_ids,
            lookups=n_miss,
            hits=int(torch.index_select(counts_cpu, 0, warm_hit_idx).sum()),
        )
        return LookupPlan(
            hot_slots, miss_pos, unique_cpu, inverse, counts_cpu, warm_slots, cold_idx, cold_ids,
            _batch_window(hot), _batch_window(warm),
        )  # fmt: skip

    def admit(self, plan: LookupPlan, lookahead: torch.Tensor | None = None) -> AdmitPlan:
        """Admit rows read from cold into warm, and every hot miss into hot, as the policies allow.
        Rows in ``lookahead`` (ids queued batches will use) are not chosen as victims. A store
        writes each tier's rows before the next tier admits (:meth:`admit_warm`, then
        :meth:`admit_hot`): a hot admission that raises leaves no warm slot without its row."""
        warm_src, warm_slots = self.admit_warm(plan, lookahead)
        return AdmitPlan(warm_src, warm_slots, *self.admit_hot(plan, lookahead))

    def admit_warm(
        self, plan: LookupPlan, lookahead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`admit`'s warm half: (positions in ``plan.unique_ids`` admitted, warm slots)."""
        warm_pos, warm_slots = self.warm.admit(
            plan.cold_ids,
            torch.index_select(plan.counts, 0, plan.cold_idx),
            lookahead,
            plan.warm_window,
        )
        return torch.index_select(plan.cold_idx, 0, warm_pos.cpu()), warm_slots

    def admit_hot(
        self, plan: LookupPlan, lookahead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`admit`'s hot half: (positions in ``plan.unique_ids`` admitted, hot slots)."""
        return self.hot.admit(plan.unique_ids, plan.counts, lookahead, plan.hot_window)


#: characters of a policy spec at most (the longest, "zipf-tuned+sieve+tinylfu", has 24): a
#: longer one is refused without parsing, as the parser's messages repeat the spec whole
MAX_POLICY_CHARS = 200


def parse_policy(text: str, *, key: str) -> PolicySpec:
    """The policy spec a config value names.

    Parameters
    ----------
    text : str
        A policy spec such as ``'static+lru'`` (see ``policies.registry``).
    key : str
        Where the value came from (a YAML key path), named by the error.

    Raises
    ------
    ConfigError
        For an unknown or malformed spec: the registry's message after ``key``.

    Examples
    --------
    >>> parse_policy("lru+tinylfu", key="tiers.warm.policy").admission
    'tinylfu'
    >>> parse_policy("lru+lru", key="tiers.warm.policy")
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: tiers.warm.policy: policy 'lru+lru' names two eviction policies; expected one
    """
    if isinstance(text, str) and len(text) > MAX_POLICY_CHARS:  # its errors repeat it whole
        raise ConfigError(
            f"{key}: got {shown(text)}; expected at most {MAX_POLICY_CHARS} characters: "
            f"{spec_grammar()}"
        )
    try:
        return PolicySpec.parse(text)
    except PolicyError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _row_cache(
    name: str, tier: CacheTierConfig, num_rows: int, row_bytes: int, device: torch.device
) -> RowCache:
    """One tier's RowCache from its config section; errors name the key."""
    capacity = resolve_capacity(
        tier.capacity, table_rows=num_rows, row_bytes=row_bytes, key=f"tiers.{name}.capacity"
    )
    spec = parse_policy(tier.policy, key=f"tiers.{name}.policy")
    if spec.static and not spec.tuned and tier.static_rows is None and capacity:
        raise ConfigError(
            f"tiers.{name}.static_rows: policy {tier.policy!r} pins rows; expected a .npy of row ids"
        )
    cache = RowCache(
        name,
        num_rows=num_rows,
        capacity=capacity,
        spec=spec,
        device=device,
        evict_headroom=tier.evict_headroom,
        index=tier.index,
    )
    if spec.tuned and repins_online(tier) and capacity:
        cache.online = OnlineRepin(
            capacity,
            tier.repin,
            window=tier.recency_window,
            device=device,
            offline_profile=_file_identity(tier.profile),
        )
    return cache


def _batch_window(cache: RowCache) -> int | None:
    """The online-count window of the batch ``cache`` recorded last (None: it counts none)."""
    return None if cache.online is None else cache.online.batch_window


def _file_identity(path: str | None) -> str | None:
    """A file as a warm restart tells it apart: its path, size and modification time (None for
    none; a file gone reads as its path alone)."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return str(path)
    return f"{path} ({stat.st_size} B, modified {stat.st_mtime_ns} ns)"


def ignored_tier_settings(config: StoreConfig) -> list[str]:
    """Each tier setting its policy does not use, as a sentence naming the key and the policy
    (replay's ``--policies`` swaps the policy on purpose, so only ``TieredStore`` warns of these),
    and each file a tier turned off (capacity 0) does not read.

    >>> cfg = StoreConfig.from_dict({"table": {"path": "t.npy"}, "tiers": {"warm": {
    ...     "capacity": 10, "policy": "lru", "profile": "p.npz", "repin": {"every": 4096}}}})
    >>> for line in ignored_tier_settings(cfg):
    ...     print(line)
    tiers.warm.profile: policy 'lru' ignores it; only zipf-tuned uses it
    tiers.warm.repin: policy 'lru' ignores it; only zipf-tuned uses it
    """
    ignored = []
    for name, tier in (("hot", config.tiers.hot), ("warm", config.tiers.warm)):
        spec = parse_policy(tier.policy, key=f"tiers.{name}.policy")
        off = is_off(tier.capacity)  # none of its files is read
        ignored.extend(
            f"tiers.{name}.{key}: the tier is off (capacity {tier.capacity!r}) and ignores it; "
            "give it a capacity or remove it"
            for key in ("static_rows", "preload_rows", "profile")
            if off and getattr(tier, key) is not None
        )
        unused = {
            "profile": tier.profile is not None and not spec.tuned and not off,
            "recency_window": "recency_window" in tier.model_fields_set and not spec.tuned,
            "repin": "repin" in tier.model_fields_set and not spec.tuned,
            "static_rows": tier.static_rows is not None
            and (spec.tuned or not spec.static)
            and not off,
        }
        for key, is_unused in unused.items():
            if is_unused:
                users = (
                    "only 'static' and 'static+<eviction>' use it"
                    if key == "static_rows"
                    else "only zipf-tuned uses it"
                )
                ignored.append(f"tiers.{name}.{key}: policy {tier.policy!r} ignores it; {users}")
        set_repin = sorted(tier.repin.model_fields_set - {"enabled"})
        if spec.tuned and set_repin and not repins_online(tier):
            why = (
                "repin.enabled is false: the tier neither counts nor re-pins online"
                if tier.repin.enabled is False
                else "a zipf-tuned tier with a profile keeps its pins fixed unless repin.enabled "
                "is true"
            )
            ignored.append(f"tiers.{name}.repin: {', '.join(set_repin)} ignored; {why}")
    return ignored


def repins_online(tier: CacheTierConfig) -> bool:
    """Whether a zipf-tuned tier re-pins online: ``repin.enabled``, or for ``auto`` when it has no
    offline profile (nothing else would tell it what to pin)."""
    enabled = tier.repin.enabled
    return enabled is True or (enabled == "auto" and tier.profile is None)


def shard_rows(metadata: dict) -> tuple[int, int, int] | None:
    """``(start, stop, rows)`` of a shard's table (``tiered-store shard``'s manifest metadata:
    its rank and the shard map's bounds): the rows [start, stop) of a table of ``rows``; None
    for a table that is not a shard."""
    shard = metadata.get("shard")
    try:
        bounds, rank = [int(b) for b in shard["bounds"]], int(shard["rank"])
        return bounds[rank], bounds[rank + 1], bounds[-1]
    except (TypeError, KeyError, ValueError, IndexError):
        return None


def _table_ids(ids: np.ndarray, rows: int, shard: tuple[int, int, int] | None) -> tuple:
    """The ids of a list or profile as this table's rows: for a shard, those it holds, shifted
    to its own rows (and a mask of them); the range they must be in; what the table is."""
    if shard is None:
        return ids, np.ones(ids.size, bool), rows, "this table"
    start, stop, table_rows = shard
    held = (ids >= start) & (ids < stop)
    return ids[held] - start, held, table_rows, "the table this shard is cut from"


def _load_row_list(
    path: str, rows: int, key: str, shard: tuple[int, int, int] | None = None
) -> np.ndarray:
    """An .npy of row ids (hottest first), checked for range; for a shard, the table's ids
    it holds, as its own rows."""
    try:
        ids = load_npy(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{key}: cannot read {path} ({exc}); expected an .npy of row ids"
        ) from None
    if isinstance(ids, np.lib.npyio.NpzFile):  # analyze writes both: an easy mix-up
        ids.close()
        raise ConfigError(
            f"{key}: {path} is an .npz archive (a profile, the `profile:` of a zipf-tuned tier); "
            "expected a 1-D .npy of row ids, such as `tiered-store analyze`'s layer{L}.top_rows.npy"
        )
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ConfigError(
            f"{key}: {path} holds {ids.dtype} of shape {ids.shape}; expected a 1-D integer array"
        )
    given = np.array(ids)  # a private writable copy, as stored (a uint64 past int64 not wrapped)
    local, _, table_rows, table = _table_ids(given.astype(np.int64, copy=False), rows, shard)
    if given.size and (int(given.min()) < 0 or int(given.max()) >= table_rows):
        raise ConfigError(
            f"{key}: {path} has row ids in [{int(given.min()):,}, {int(given.max()):,}]; "
            f"expected row ids of {table}, in [0, {table_rows:,})"
        )
    return local


def load_tier_profile(
    path: str,
    rows: int,
    key: str,
    shard: tuple[int, int, int] | None = None,
    layouts: Sequence[tuple[str, Mapping[str, Any]]] = (),
):
    """A tier's FrequencyProfile for a table of ``rows`` rows; errors name the key (``key``). For
    a shard (``shard``: see ``warm_start``), the profile of its table, cut to the rows it holds.
    ``layouts``: ``(what, Engram layout)`` of the table (its manifest's ``metadata["engram"]``, or
    a trace's ``recorded_layout``): a profile hashed another way is refused (see
    :func:`check_profile_addressing`)."""
    from .profile import FrequencyProfile

    try:
        profile = FrequencyProfile.load(path)
    except TraceFormatError as exc:  # it names the file, what it holds and what was expected
        raise ConfigError(f"{key}: {exc}") from None
    for what, layout in layouts:
        check_profile_addressing(profile, path, key, what, layout)
    ids = profile.row_ids
    local, held, table_rows, table = _table_ids(ids, rows, shard)
    if profile.rows is not None and profile.rows != table_rows:
        raise ConfigError(
            f"{key}: {path} profiles a table of {profile.rows:,} rows; {table} has {table_rows:,}"
        )
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= table_rows):
        raise ConfigError(
            f"{key}: {path} has row ids in [{int(ids.min()):,}, {int(ids.max()):,}]; expected "
            f"row ids of {table}, in [0, {table_rows:,})"
        )
    if shard is None:
        return profile
    episodes = None if profile.episodes is None else profile.episodes[held]
    return replace(
        profile, row_ids=local, counts=profile.counts[held], episodes=episodes, rows=rows
    )


def check_profile_addressing(
    profile: FrequencyProfile, path: str, key: str, what: str, layout: Mapping[str, Any]
) -> None:
    """ConfigError naming ``key``, the file, the field and both values when ``profile`` counts
    rows of a table hashed another way (seed, primes, orders, heads, pad id, tokenizer, layer)
    than ``layout`` (of ``what``) says; a profile or layout that records none passes."""
    _check_addressing(profile.metadata, profile.name, path, key, what, layout)


def check_row_list_addressing(
    path: str, key: str, layouts: Sequence[tuple[str, Mapping[str, Any]]]
) -> None:
    """As :func:`check_profile_addressing`, for a row list (``static_rows``, ``preload_rows``)
    that ``analyze`` wrote: an .npy records nothing, but the ``X.profile.npz`` written beside
    ``X.top_rows.npy`` in the same run records its Engram config and layer (its metadata alone
    is read). A list without one passes."""
    name = os.path.basename(path)
    if not layouts or not name.endswith(_TOP_ROWS):
        return
    from .profile import FrequencyProfile

    profile = os.path.join(os.path.dirname(path), name[: -len(_TOP_ROWS)] + ".profile.npz")
    try:
        meta = FrequencyProfile.read_meta(profile) if os.path.isfile(profile) else None
    except TraceFormatError:  # no record to check by
        return
    if meta is None:
        return
    source = f" (as {os.path.basename(profile)} beside it records)"
    for what, layout in layouts:
        _check_addressing(
            meta.get("metadata"), meta.get("name", ""), path, key, what, layout, source
        )


_TOP_ROWS = ".top_rows.npy"  # analyze's row lists, beside their profiles (.profile.npz)


def _check_addressing(
    metadata: object,
    name: object,
    path: str,
    key: str,
    what: str,
    layout: Mapping[str, Any],
    source: str = "",
) -> None:
    """The check of :func:`check_profile_addressing`, of a file whose rows were counted under
    ``metadata`` and ``name`` (a profile's; for a row list, the one ``source`` names)."""
    from .engram.layout import addressing_mismatch, recorded_layout, short

    meta = metadata if isinstance(metadata, Mapping) else {}  # hand-made: none
    recorded = recorded_layout(meta, meta.get("layer"), str(name))
    if recorded is not None and "layer_id" not in recorded:  # its layer unknown: the table's
        recorded = recorded_layout(meta, layout.get("layer_id"))
    if recorded is None or (diff := addressing_mismatch(recorded, layout)) is None:
        return
    field, made, expected = diff
    same = "tokenizer (id map)" if field == "compressed_lookup_digest" else "Engram config"
    raise ConfigError(
        f"{key}: {path} was made with {field}={short(made)}{source} but {what} has {field}="
        f"{short(expected)}; expected a {'row list' if source else 'profile'} of the same "
        f"{same} (its row ids name other N-grams)"
    )

"""Prometheus metrics for tiered stores, read from the stores' own counters at scrape time.

The lookup path only increments plain integers (``TierCounters``, ``ColdTable`` counters,
``LatencyHistogram`` buckets); ``TieredStoreCollector`` turns them into metric families when
Prometheus scrapes, so an idle scrape costs the store nothing and a busy store pays nothing per
metric. Labels are few and bounded: ``table`` (one per Engram layer), ``tier`` (``hot``, ``warm``),
``result`` (``hit``, ``miss``); never row ids.

Every metric, its type and labels (``METRICS`` holds the same list, and the tests check that the
collectors emit exactly these names):

=============================================  =========  ======================  ==================
name                                           type       labels                  meaning
=============================================  =========  ======================  ==================
tiered_store_lookups_total                     counter    table, tier, result     ids probed at a cache tier
tiered_store_admissions_total                  counter    table, tier             rows admitted on the lookup path
tiered_store_evictions_total                   counter    table, tier             rows evicted
tiered_store_rejections_total                  counter    table, tier             admission refusals
tiered_store_moved_rows_total                  counter    table, tier             rows copied into a tier
tiered_store_moved_bytes_total                 counter    table, tier             bytes copied into a tier
tiered_store_occupancy_rows                    gauge      table, tier             rows resident now
tiered_store_capacity_rows                     gauge      table, tier             slots of the tier
tiered_store_capacity_bytes                    gauge      table, tier             payload bytes of the tier
tiered_store_pinned_rows                       gauge      table, tier             rows never evicted now
tiered_store_repins_total                      counter    table, tier             online re-pins applied
tiered_store_repin_pinned_rows_total           counter    table, tier             rows re-pins pinned
tiered_store_repin_unpinned_rows_total         counter    table, tier             rows re-pins unpinned
tiered_store_online_windows_dropped_total      counter    table, tier             windows not counted
tiered_store_online_quiet_windows              gauge      table, tier             windows nothing came or went
tiered_store_table_open                        gauge      table                   1 open, 0 closed (503)
tiered_store_table_rows                        gauge      table                   rows of the table
tiered_store_row_size_bytes                    gauge      table                   bytes per row
tiered_store_cold_read_rows_total              counter    table                   rows read from disk
tiered_store_cold_read_bytes_total             counter    table                   bytes transferred from disk
tiered_store_cold_read_requests_total          counter    table                   read calls issued
tiered_store_cold_read_errors_total            counter    table                   reads that failed (twice)
tiered_store_lookup_duration_seconds           histogram  table                   one ``lookup`` call
tiered_store_prefetch_stall_seconds            histogram  table                   wait for a prefetch handle
tiered_store_prefetches_total                  counter    table                   prefetches started
tiered_store_queued_requests                   gauge      table                   announced, not released
tiered_store_queued_rows                       gauge      table                   their rows with a lookup left
tiered_store_queue_news_failures_total         counter    table                   failed tellings of the queue
tiered_store_queue_news_dropped_total          counter    table                   queue news dropped
tiered_store_verifications_total               counter    table                   checksum passes run
tiered_store_checksum_failures_total           counter    table                   corrupt pages found
tiered_store_checksum_pass_failed              gauge      table                   1 while the last pass failed
tiered_store_lookup_failures_total             counter    table                   served lookups that failed
tiered_store_reloads_total                     counter    table                   reopened on a new version
tiered_store_reload_failures_total             counter    table                   checks, new version not served
tiered_store_written_rows_total                counter    table                   rows given to ``write``
tiered_store_dirty_rows                        gauge      table                   written rows not committed yet
tiered_store_written_back_rows_total           counter    table                   dirty rows saved on eviction
tiered_store_commits_total                     counter    table                   commits made durable
tiered_store_commit_errors_total               counter    table                   commits that failed
tiered_store_delta_map_grows_total             counter    table                   LMDB map doublings
tiered_store_delta_read_errors_total           counter    table                   delta reads failed or corrupt
tiered_store_http_requests_total               counter    handler, code           HTTP requests answered
tiered_store_http_request_duration_seconds     histogram  handler                 HTTP request handling time
tiered_store_http_requests_in_flight           gauge      (none)                  requests being handled
tiered_store_served_tokens_total               counter    (none)                  tokens of answered inference
tiered_store_trace_write_failures_total        counter    (none)                  --record-trace writes failed
=============================================  =========  ======================  ==================

A ``ShardedStore`` (one process per rank) exports its shard's metrics above with a ``rank`` label
on every sample (``build_sharded_registry``), except the prefetch ones, which are the rank's own
(its lookups' handles and waits: the shard never prefetches); ``tiered_store_lookup_duration_seconds``
there times the shard serving each round's rows, the rank's whole lookup calls being
``tiered_store_sharded_lookup_duration_seconds`` below. And these (``SHARDED_METRICS``):

=============================================  =========  ======================  ==================
name                                           type       labels                  meaning
=============================================  =========  ======================  ==================
tiered_store_exchange_rounds_total             counter    table, rank             collective lookups joined
tiered_store_exchange_ids_total                counter    table, rank             ids this rank looked up
tiered_store_exchange_unique_ids_total         counter    table, rank             the same after dedup
tiered_store_exchange_rows_served_total        counter    table, rank             rows served to other ranks
tiered_store_exchange_bytes_total              counter    table, rank, direction  bytes to/from other ranks
tiered_store_sharded_lookup_duration_seconds   histogram  table, rank             one sharded lookup call
tiered_store_shard_rows                        gauge      table, rank             rows of this rank's shard
=============================================  =========  ======================  ==================

Aggregating over ranks is summing (``sum without (rank)``): counters and the shard rows add up
to the table's; latency quantiles come from the summed buckets.

Per-tier hit ratio in PromQL (the fraction of lookups *reaching* a tier that it served)::

    sum by (table, tier) (rate(tiered_store_lookups_total{result="hit"}[5m]))
      / sum by (table, tier) (rate(tiered_store_lookups_total[5m]))

and since the process started (what ``TieredStore.stats()[tier]["hit_rate"]`` reports, since the
store opened: ``serve``'s counters go on across a reload, each table's ``TableHealth.carried``
adding what its closed stores counted)::

    tiered_store_lookups_total{result="hit"}
      / ignoring(result) sum without(result) (tiered_store_lookups_total)

``deploy/prometheus-rules.yml`` records the first (per table and over every table), and the share
of all lookups each tier serves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .errors import TableFormatError, error_text
from .latency import DEFAULT_BUCKETS, LatencyHistogram

if TYPE_CHECKING:
    from .store import TieredStore
    from .table_format import VerifyReport

__all__ = [
    "METRICS",
    "SHARDED_METRICS",
    "RequestCounters",
    "RequestTotals",
    "ServerCollector",
    "TableHealth",
    "ShardedStoreCollector",
    "TieredStoreCollector",
    "build_registry",
    "build_sharded_registry",
    "store_counts",
    "verify_counted",
]

CACHE_TIERS = ("hot", "warm")
SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and sorted labels

# name -> (type, labels, help). The single source for the collectors and the documentation.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tiered_store_lookups_total": (
        "counter",
        ("table", "tier", "result"),
        "Row ids probed at a cache tier, by result (hit|miss). The hot tier sees every id looked "
        "up; the warm tier sees the hot tier's misses. Duplicates within a batch count.",
    ),
    "tiered_store_admissions_total": (
        "counter",
        ("table", "tier"),
        "Rows admitted into a cache tier on the lookup path.",
    ),
    "tiered_store_evictions_total": (
        "counter",
        ("table", "tier"),
        "Rows evicted from a cache tier.",
    ),
    "tiered_store_rejections_total": (
        "counter",
        ("table", "tier"),
        "Admission candidates turned away (admission filter, or no evictable slot).",
    ),
    "tiered_store_moved_rows_total": (
        "counter",
        ("table", "tier"),
        "Rows copied into a cache tier from the tier below: admissions plus warm-start preloads.",
    ),
    "tiered_store_moved_bytes_total": (
        "counter",
        ("table", "tier"),
        "Bytes copied into a cache tier from the tier below (moved rows x row size).",
    ),
    "tiered_store_occupancy_rows": (
        "gauge",
        ("table", "tier"),
        "Rows resident in a cache tier now.",
    ),
    "tiered_store_capacity_rows": (
        "gauge",
        ("table", "tier"),
        "Row slots of a cache tier.",
    ),
    "tiered_store_capacity_bytes": (
        "gauge",
        ("table", "tier"),
        "Payload bytes of a cache tier (slots x row size).",
    ),
    "tiered_store_pinned_rows": (
        "gauge",
        ("table", "tier"),
        "Rows a cache tier never evicts now (zipf-tuned's pinned segment, static pins).",
    ),
    "tiered_store_repins_total": (
        "counter",
        ("table", "tier"),
        "Online re-pins applied to a zipf-tuned tier (0 where the tier does not re-pin).",
    ),
    "tiered_store_repin_pinned_rows_total": (
        "counter",
        ("table", "tier"),
        "Rows online re-pins moved into a tier's pinned segment.",
    ),
    "tiered_store_repin_unpinned_rows_total": (
        "counter",
        ("table", "tier"),
        "Rows online re-pins moved out of a tier's pinned segment.",
    ),
    "tiered_store_online_windows_dropped_total": (
        "counter",
        ("table", "tier"),
        "Windows of lookups a re-pinning tier did not count because its background count fell "
        "behind (lookups never wait for it).",
    ),
    "tiered_store_online_quiet_windows": (
        "gauge",
        ("table", "tier"),
        "Windows in a row in which a re-pinning tier admitted and evicted nothing (from 4 on it "
        "samples its windows ever more sparsely, at most one in repin.quiet_sample counted, and "
        "it re-pins when a row comes or goes).",
    ),
    "tiered_store_table_open": (
        "gauge",
        ("table",),
        "1 while the table's store is open (or being reopened on its new version, requests "
        "waiting for it); 0 while a reload has left it closed, its new version not opened (its "
        "lookups answer 503, /healthz names it closed, its other gauges keep the closed store's "
        "last values).",
    ),
    "tiered_store_table_rows": ("gauge", ("table",), "Rows of the table (the cold tier)."),
    "tiered_store_row_size_bytes": ("gauge", ("table",), "Bytes per table row."),
    "tiered_store_cold_read_rows_total": (
        "counter",
        ("table",),
        "Rows read from the cold tier (the table file).",
    ),
    "tiered_store_cold_read_bytes_total": (
        "counter",
        ("table",),
        "Bytes transferred from the table file (whole 4 KiB pages for pread, direct and uring "
        "I/O; the rows' own bytes for mmap).",
    ),
    "tiered_store_cold_read_requests_total": (
        "counter",
        ("table",),
        "Read calls issued to the table file (preadv calls, or gathers for mmap).",
    ),
    "tiered_store_cold_read_errors_total": (
        "counter",
        ("table",),
        "Cold reads that failed again after their retry, or found the table file shrunk, removed "
        "or replaced since it was opened (each raised TierIOError).",
    ),
    "tiered_store_lookup_duration_seconds": (
        "histogram",
        ("table",),
        "Wall time of one store lookup call (including any wait for its prefetch); every call, "
        "those that raised too (bad ids, a failed read, a closed store).",
    ),
    "tiered_store_prefetch_stall_seconds": (
        "histogram",
        ("table",),
        "Time a lookup waited for its prefetch handle (0 when the rows were already staged).",
    ),
    "tiered_store_prefetches_total": (
        "counter",
        ("table",),
        "Prefetches started.",
    ),
    "tiered_store_queued_requests": (
        "gauge",
        ("table",),
        "Requests announced to the store (TieredStore.announce) and not released yet.",
    ),
    "tiered_store_queued_rows": (
        "gauge",
        ("table",),
        "Distinct rows the announced requests still look up (a batch served finishes its rows; "
        "evicted last).",
    ),
    "tiered_store_queue_news_failures_total": (
        "counter",
        ("table",),
        "Tellings of an announced, served or released request to the cache tiers that failed "
        "(out of memory, say); each is told again by the store lock's next holder, but an announce's "
        "own, which raises and withdraws its request.",
    ),
    "tiered_store_queue_news_dropped_total": (
        "counter",
        ("table",),
        "Announced, served or released requests a cache tier was never told of, dropped after repeated "
        "failures (the tier ranks its victims without them; a batch's is made up for by its "
        "request's release).",
    ),
    "tiered_store_verifications_total": (
        "counter",
        ("table",),
        "Checksum passes run over the whole table (at start or by the background scrubber).",
    ),
    "tiered_store_checksum_failures_total": (
        "counter",
        ("table",),
        "Corruption found: cold reads whose pages failed their CRC32C page checksum (each raised "
        "ChecksumError; no row of that read was served or cached), plus checksum passes that "
        "found the table corrupt (a block failing its CRC-32, a page its CRC32C, or a file that "
        "no longer matches its manifest).",
    ),
    "tiered_store_checksum_pass_failed": (
        "gauge",
        ("table",),
        "1 while the last full checksum pass over the table failed (corrupt, or unreadable), 0 "
        "once a pass finds it good (or none ran yet).",
    ),
    "tiered_store_lookup_failures_total": (
        "counter",
        ("table",),
        "Lookups on the serving path that failed: a cold read error, a table file that failed a "
        "check, or rows that were not finite numbers (each answered 503).",
    ),
    "tiered_store_reloads_total": (
        "counter",
        ("table",),
        "Times serve reopened the table on a new version (a compaction, a writer's commit, a "
        "table made anew).",
    ),
    "tiered_store_reload_failures_total": (
        "counter",
        ("table",),
        "Checks that found a new version of the table and did not serve it (its open failed, "
        "or another table's in the same swap, all or nothing; or it waits: a refusal kept "
        "until its files change, a table left closed waiting for its retry), or could not tell "
        "its version; counted at every check while it lasts, not while a swap is postponed for "
        "answers still running (the version open now served meanwhile, none for a table left "
        "closed).",
    ),
    "tiered_store_written_rows_total": (
        "counter",
        ("table",),
        "Rows given to TieredStore.write (training updates included), repeated ids once.",
    ),
    "tiered_store_dirty_rows": (
        "gauge",
        ("table",),
        "Written rows not yet committed: pending in host RAM plus dirty cache slots.",
    ),
    "tiered_store_written_back_rows_total": (
        "counter",
        ("table",),
        "Dirty rows copied out of a cache tier when the policy evicted them (write-back).",
    ),
    "tiered_store_commits_total": (
        "counter",
        ("table",),
        "Commits made durable (one LMDB write transaction each).",
    ),
    "tiered_store_commit_errors_total": (
        "counter",
        ("table",),
        "Commits that failed (no space, read-only directory, a map that could not grow): each "
        "raised CommitError and left the previous commit intact.",
    ),
    "tiered_store_delta_map_grows_total": (
        "counter",
        ("table",),
        "Times a commit found the LMDB map full and doubled it before retrying.",
    ),
    "tiered_store_delta_read_errors_total": (
        "counter",
        ("table",),
        "Delta reads that failed (I/O) or found a row failing its CRC32C (DeltaCorruptError).",
    ),
    "tiered_store_http_requests_total": (
        "counter",
        ("handler", "code"),
        "HTTP requests answered, by handler (path) and status code.",
    ),
    "tiered_store_http_request_duration_seconds": (
        "histogram",
        ("handler",),
        "Time from a request's headers being read to its response being written.",
    ),
    "tiered_store_http_requests_in_flight": (
        "gauge",
        (),
        "HTTP requests being handled now.",
    ),
    "tiered_store_served_tokens_total": (
        "counter",
        (),
        "Tokens of inference requests answered with 200.",
    ),
    "tiered_store_trace_write_failures_total": (
        "counter",
        (),
        "Requests whose records --record-trace could not write (a full disk): each answered all "
        "the same, its batch left out of the trace unless only its chunk's write failed (then "
        "kept for the next chunk).",
    ),
}
# A ShardedStore's exchange between ranks (the shard's own store exports METRICS, rank-labelled).
SHARDED_METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "tiered_store_exchange_rounds_total": (
        "counter",
        ("table", "rank"),
        "Collective lookups (all-to-all rounds) this rank joined.",
    ),
    "tiered_store_exchange_ids_total": (
        "counter",
        ("table", "rank"),
        "Row ids this rank looked up through the sharded store, duplicates included.",
    ),
    "tiered_store_exchange_unique_ids_total": (
        "counter",
        ("table", "rank"),
        "Row ids this rank looked up after deduplication (what it asked the owners for).",
    ),
    "tiered_store_exchange_rows_served_total": (
        "counter",
        ("table", "rank"),
        "Rows this rank's shard served to the other ranks.",
    ),
    "tiered_store_exchange_bytes_total": (
        "counter",
        ("table", "rank", "direction"),
        "Bytes of counts, ids and rows this rank sent to (direction=sent) or received from "
        "(received) the other ranks; its own share never crosses the network and is not counted.",
    ),
    "tiered_store_sharded_lookup_duration_seconds": (
        "histogram",
        ("table", "rank"),
        "Wall time of one sharded lookup call on this rank (exchange included); every call, those "
        "that raised too (bad ids, a failed shard or rank).",
    ),
    "tiered_store_shard_rows": ("gauge", ("table", "rank"), "Rows of this rank's shard."),
}
SERVER_METRICS = (
    "tiered_store_http_requests_total",
    "tiered_store_http_request_duration_seconds",
    "tiered_store_http_requests_in_flight",
    "tiered_store_served_tokens_total",
    "tiered_store_trace_write_failures_total",
)
STORE_METRICS = tuple(name for name in METRICS if name not in SERVER_METRICS)


@dataclass
class TableHealth:
    """Checksum passes, failed lookups and reloads of one table; plain counters read at scrape
    time."""

    verifications: int = 0
    checksum_failures: int = 0
    last_error: str | None = None  # message of the latest failed pass (cleared by a clean one)
    lookup_failures: int = 0
    last_lookup_error: str | None = None  # what the latest failed lookup raised
    last_lookup_failure_at: float | None = None  # time.monotonic() of that failure
    reloads: int = 0  # reopened on a new version (serve)
    # checks whose new version was not served, tried or not, but postponed ones (serve)
    reload_failures: int = 0
    # its store closed by the reload under way to open its new one, which runs now (serve):
    # requests wait for it, so neither /healthz nor tiered_store_table_open names it closed
    reopening: bool = False
    # (sample name, labels) -> what the table's stores closed by reloads counted (``carry``)
    carried: dict[SampleKey, float] = field(default_factory=dict, repr=False, compare=False)
    # held by a scrape reading the table's store and ``carried``, and by a swap changing them
    counting: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # (message, when) of the latest failed lookup that was about the file (not a closed store)
    _file_failure: tuple[str, float] | None = field(default=None, repr=False, compare=False)

    def carry(
        self, counts: Mapping[SampleKey, float], since: Mapping[SampleKey, float] | None = None
    ) -> None:
        """Add ``counts`` (``store_counts`` of a store a reload replaced) less ``since`` (its
        counts carried already) to what the table exports, under ``counting``: a counter resets
        only when the process restarts."""
        for key, value in counts.items():
            value -= since.get(key, 0) if since else 0
            if value:
                self.carried[key] = self.carried.get(key, 0) + value

    def record_lookup_failure(self, message: str, when: float, *, about_file: bool = True) -> None:
        """Count one failed lookup (worker threads fail concurrently: under a lock);
        ``about_file`` False: it says nothing about the table's file (its store was closed)."""
        with self._lock:
            self.lookup_failures += 1
            self.last_lookup_error = message
            self.last_lookup_failure_at = when
            if about_file:
                self._file_failure = (message, when)

    def end_lookup_hold(self, *, same_file: bool = False) -> None:
        """Forget when the last lookup failed (its table reopened on another file): /healthz
        holds no 503 for it; the count stays. ``same_file``: reopened on the file it served,
        the hold goes back to the latest failure about that file (none: it ends), past those
        of a closed store."""
        with self._lock:
            if same_file and self._file_failure is not None:
                self.last_lookup_error, self.last_lookup_failure_at = self._file_failure
                return
            self.last_lookup_failure_at = None
            self._file_failure = None


def verify_counted(
    path: str | Path,
    health: TableHealth,
    stop: threading.Event | None = None,
    bytes_per_s: float | None = None,
) -> VerifyReport | None:
    """Run ``verify_table`` over ``path`` (at most ``bytes_per_s`` a second) and count the
    outcome in ``health``.

    Returns the report, or ``None`` when the table is corrupt or cannot be read (gone, an I/O
    error: counted as failures too; ``health.last_error`` says why). A pass ended by ``stop``
    raises ``VerifyStopped``, and one over a table being made anew throughout
    ``TableChangingError``: neither counts anything (no verdict).

    Examples
    --------
    >>> health = TableHealth()
    >>> verify_counted("tables/layer1.npy", health)  # doctest: +SKIP
    >>> health.verifications, health.checksum_failures  # doctest: +SKIP
    (1, 0)
    """
    from .table_format import TableChangingError, verify_table

    try:
        report = verify_table(path, progress=False, stop=stop, bytes_per_s=bytes_per_s)
    except TableChangingError:  # no verdict on a table being made anew
        raise
    except (TableFormatError, OSError) as exc:  # OSError: TierIOError, a missing table too
        health.verifications += 1
        health.checksum_failures += 1
        health.last_error = error_text(exc)  # no "[Errno 2] ...: 'path'" in /healthz
        return None
    health.verifications += 1
    health.last_error = None
    return report


class TieredStoreCollector(Collector):
    """Metric families for a set of named tiered stores, built from their counters when scraped.

    Parameters
    ----------
    stores
        Table name -> store (one per Engram layer), or a callable returning that mapping (read
        at every scrape, so tables may come and go).
    health
        Table name -> ``TableHealth`` of its checksum passes; tables without one report zeros.
    prefetchers
        Table name -> what counts its prefetches, where not the store itself (a ``ShardedStore``,
        whose shard's store never prefetches).

    Examples
    --------
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> registry = CollectorRegistry()
    >>> registry.register(TieredStoreCollector({"layer1": store}))  # doctest: +SKIP
    >>> b"tiered_store_lookups_total" in generate_latest(registry)  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        stores: Mapping[str, TieredStore] | Callable[[], Mapping[str, TieredStore]],
        health: Mapping[str, TableHealth] | None = None,
        prefetchers: Mapping[str, Any] | None = None,
    ) -> None:
        self._stores = stores
        self._health = health if health is not None else {}
        self._prefetchers = prefetchers if prefetchers is not None else {}

    def describe(self) -> Iterable[Metric]:
        """Empty families with this collector's names (lets the registry spot name clashes)."""
        return [_family(name) for name in STORE_METRICS]

    def collect(self) -> Iterator[Metric]:
        """One family per metric of ``STORE_METRICS``, one sample set per table; a table's
        counters and histograms go on from what its stores closed by reloads counted."""
        stores = self._stores() if callable(self._stores) else self._stores
        fam = {name: _family(name) for name in STORE_METRICS}
        for table in list(stores):
            health = self._health.get(table) or TableHealth()
            with health.counting:  # its store and carried counts as one swap left them
                store = stores.get(table)
                if store is None:  # gone since listed
                    continue
                part = self._table_families(
                    table, store, health, self._prefetchers.get(table, store)
                )
                carried = dict(health.carried)
            for name, family in part.items():
                fam[name].samples.extend(
                    s._replace(value=s.value + carried.get(_sample_key(s), 0))
                    for s in family.samples
                )
        yield from fam.values()

    @classmethod
    def _table_families(
        cls, table: str, store: TieredStore, health: TableHealth, prefetcher: Any
    ) -> dict[str, Metric]:
        """The families of ``STORE_METRICS`` holding one table's samples (its store's own
        counts, without what ``health.carried`` adds)."""
        fam = {name: _family(name) for name in STORE_METRICS}
        cls._add_tiers(fam, table, store)
        cls._add_cold(fam, table, store)
        fam["tiered_store_table_open"].add_metric(
            [table], int(not store.closed or health.reopening)
        )
        for name, value in store.write_counters().items():
            fam[f"tiered_store_{name}"].add_metric([table], value)
        _add_histogram(fam["tiered_store_lookup_duration_seconds"], [table], store.lookup_latency)
        _add_histogram(
            fam["tiered_store_prefetch_stall_seconds"],
            [table],
            prefetcher.prefetch_wait_latency,
        )
        fam["tiered_store_prefetches_total"].add_metric([table], prefetcher.prefetches_started)
        fam["tiered_store_queued_requests"].add_metric([table], len(store.caches.queue))
        fam["tiered_store_queued_rows"].add_metric([table], store.caches.queue.rows)
        for outcome, count in store.queue_news.items():
            fam[f"tiered_store_queue_news_{outcome}_total"].add_metric([table], count)
        fam["tiered_store_verifications_total"].add_metric([table], health.verifications)
        fam["tiered_store_checksum_failures_total"].add_metric(
            [table],
            health.checksum_failures + store.cold.checksum_failures,
        )
        fam["tiered_store_checksum_pass_failed"].add_metric(
            [table], int(health.last_error is not None)
        )
        fam["tiered_store_lookup_failures_total"].add_metric([table], health.lookup_failures)
        fam["tiered_store_reloads_total"].add_metric([table], health.reloads)
        fam["tiered_store_reload_failures_total"].add_metric([table], health.reload_failures)
        return fam

    @staticmethod
    def _add_tiers(fam: dict[str, Any], table: str, store: TieredStore) -> None:
        """Per-tier counters and gauges of one store."""
        row_bytes = store.row_bytes
        for cache in (store.hot, store.warm):
            c = cache.counters
            labels = [table, cache.name]
            # each its own counter: lookups - hits, read while a lookup counts, can exceed the
            # misses the next scrape reads (a counter that drops is a reset to Prometheus)
            fam["tiered_store_lookups_total"].add_metric([*labels, "hit"], c.hits)
            fam["tiered_store_lookups_total"].add_metric([*labels, "miss"], c.misses)
            fam["tiered_store_admissions_total"].add_metric(labels, c.admissions)
            fam["tiered_store_evictions_total"].add_metric(labels, c.evictions)
            fam["tiered_store_rejections_total"].add_metric(labels, c.rejections)
            moved = c.admissions + c.preloaded
            fam["tiered_store_moved_rows_total"].add_metric(labels, moved)
            fam["tiered_store_moved_bytes_total"].add_metric(labels, moved * row_bytes)
            fam["tiered_store_occupancy_rows"].add_metric(labels, cache.occupancy)
            fam["tiered_store_capacity_rows"].add_metric(labels, cache.capacity)
            fam["tiered_store_capacity_bytes"].add_metric(labels, cache.capacity * row_bytes)
            fam["tiered_store_pinned_rows"].add_metric(labels, cache.pinned_count)
            online = cache.online
            for name, value in (
                ("repins_total", online.repins if online else 0),
                ("repin_pinned_rows_total", online.rows_pinned if online else 0),
                ("repin_unpinned_rows_total", online.rows_unpinned if online else 0),
                ("online_windows_dropped_total", online.windows_dropped if online else 0),
                ("online_quiet_windows", online.quiet_windows if online else 0),
            ):
                fam[f"tiered_store_{name}"].add_metric(labels, value)

    @staticmethod
    def _add_cold(fam: dict[str, Any], table: str, store: TieredStore) -> None:
        """Table geometry and cold-tier read counters of one store."""
        cold = store.cold
        fam["tiered_store_table_rows"].add_metric([table], store.rows)
        fam["tiered_store_row_size_bytes"].add_metric([table], store.row_bytes)
        fam["tiered_store_cold_read_rows_total"].add_metric([table], cold.rows_read)
        fam["tiered_store_cold_read_bytes_total"].add_metric([table], cold.bytes_read)
        fam["tiered_store_cold_read_requests_total"].add_metric([table], cold.read_requests)
        fam["tiered_store_cold_read_errors_total"].add_metric([table], cold.read_errors)


@dataclass
class RequestCounters:
    """HTTP serving counters, incremented by the server and read at scrape time."""

    by_handler_code: dict[tuple[str, int], int] = field(default_factory=dict)
    durations: dict[str, LatencyHistogram] = field(default_factory=dict)
    buckets: tuple[float, ...] = DEFAULT_BUCKETS  # the durations' (the server's cover its longest)
    in_flight: int = 0
    served_tokens: int = 0
    trace_write_failures: int = 0  # requests whose --record-trace records could not be written
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self) -> None:
        """A request started."""
        with self._lock:
            self.in_flight += 1

    def end(self, handler: str, code: int, seconds: float, tokens: int = 0) -> None:
        """A request was answered with ``code`` after ``seconds``."""
        with self._lock:
            self.in_flight -= 1
            key = (handler, code)
            self.by_handler_code[key] = self.by_handler_code.get(key, 0) + 1
            self.served_tokens += tokens
            hist = self.durations.get(handler)
            if hist is None:
                hist = self.durations[handler] = LatencyHistogram(self.buckets)
        hist.observe(seconds)

    def trace_write_failed(self) -> None:
        """A request's records could not be written to the recorded trace."""
        with self._lock:
            self.trace_write_failures += 1

    def totals(self) -> RequestTotals:
        """A consistent copy of every counter, read under the lock."""
        with self._lock:
            return RequestTotals(
                by_handler_code=dict(self.by_handler_code),
                durations=dict(self.durations),
                in_flight=self.in_flight,
                served_tokens=self.served_tokens,
                trace_write_failures=self.trace_write_failures,
            )

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready totals: requests by handler and code, in flight, tokens served.

        Examples
        --------
        >>> counters = RequestCounters()
        >>> counters.begin()
        >>> counters.end("/v1/engram", 200, 0.004, tokens=12)
        >>> counters.snapshot()
        {'requests': {'/v1/engram': {'200': 1}}, 'in_flight': 0, 'served_tokens': 12}
        """
        totals = self.totals()
        requests: dict[str, dict[str, int]] = {}
        for (handler, code), n in sorted(totals.by_handler_code.items()):
            requests.setdefault(handler, {})[str(code)] = n
        return {
            "requests": requests,
            "in_flight": totals.in_flight,
            "served_tokens": totals.served_tokens,
        }


@dataclass(frozen=True)
class RequestTotals:
    """What ``RequestCounters.totals`` read at one instant."""

    by_handler_code: dict[tuple[str, int], int]  # (handler, status code) -> requests answered
    durations: dict[str, LatencyHistogram]  # handler -> request durations (live histograms)
    in_flight: int  # requests being handled
    served_tokens: int  # tokens of inference requests answered with 200
    trace_write_failures: int  # requests whose recorded trace's write failed


class ServerCollector(Collector):
    """Metric families for the HTTP server's ``RequestCounters``."""

    def __init__(self, counters: RequestCounters) -> None:
        self._counters = counters

    def describe(self) -> Iterable[Metric]:
        """Empty families with this collector's names."""
        return [_family(name) for name in SERVER_METRICS]

    def collect(self) -> Iterator[Metric]:
        """Requests by handler and code, durations, in-flight gauge, tokens served."""
        totals = self._counters.totals()
        fam = {name: _family(name) for name in SERVER_METRICS}
        for (handler, code), n in sorted(totals.by_handler_code.items()):
            fam["tiered_store_http_requests_total"].add_metric([handler, str(code)], n)
        for handler, hist in sorted(totals.durations.items()):
            _add_histogram(fam["tiered_store_http_request_duration_seconds"], [handler], hist)
        fam["tiered_store_http_requests_in_flight"].add_metric([], totals.in_flight)
        fam["tiered_store_served_tokens_total"].add_metric([], totals.served_tokens)
        fam["tiered_store_trace_write_failures_total"].add_metric([], totals.trace_write_failures)
        yield from fam.values()


def build_registry(
    stores: Mapping[str, TieredStore] | Callable[[], Mapping[str, TieredStore]],
    health: Mapping[str, TableHealth] | None = None,
    requests: RequestCounters | None = None,
    *,
    process: bool = True,
) -> CollectorRegistry:
    """A fresh registry with the store collector, the server's (when given) and process metrics.

    Examples
    --------
    >>> from prometheus_client import generate_latest
    >>> registry = build_registry({}, requests=RequestCounters())
    >>> b"tiered_store_http_requests_in_flight 0.0" in generate_latest(registry)
    True
    """
    registry = CollectorRegistry()
    registry.register(TieredStoreCollector(stores, health))
    if requests is not None:
        registry.register(ServerCollector(requests))
    if process:
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu seconds, fds
    return registry


class ShardedStoreCollector(Collector):
    """The exchange metrics (``SHARDED_METRICS``) of named ``ShardedStore``s on this rank."""

    def __init__(self, stores: Mapping[str, Any]) -> None:
        self._stores = stores

    def describe(self) -> Iterable[Metric]:
        """Empty families with this collector's names."""
        return [_family(name) for name in SHARDED_METRICS]

    def collect(self) -> Iterator[Metric]:
        """One sample set per table, labelled with this rank."""
        fam = {name: _family(name) for name in SHARDED_METRICS}
        for table, store in self._stores.items():
            labels, ex = [table, str(store.rank)], store.exchange
            fam["tiered_store_exchange_rounds_total"].add_metric(labels, ex["lookups"])
            fam["tiered_store_exchange_ids_total"].add_metric(labels, ex["ids"])
            fam["tiered_store_exchange_unique_ids_total"].add_metric(labels, ex["unique_ids"])
            fam["tiered_store_exchange_rows_served_total"].add_metric(labels, ex["rows_served"])
            for direction in ("sent", "received"):
                fam["tiered_store_exchange_bytes_total"].add_metric(
                    [*labels, direction], ex[f"bytes_{direction}"]
                )
            _add_histogram(
                fam["tiered_store_sharded_lookup_duration_seconds"], labels, store.lookup_latency
            )
            start, stop = store.shard_map.shard_range(store.rank)
            fam["tiered_store_shard_rows"].add_metric(labels, stop - start)
        yield from fam.values()


class _RankLabelled(Collector):
    """Another collector's samples with ``rank="R"`` added to each."""

    def __init__(self, inner: Collector, rank: int) -> None:
        self._inner, self._rank = inner, str(rank)

    def describe(self) -> Iterable[Metric]:
        return self._inner.describe()

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                sample._replace(labels={**sample.labels, "rank": self._rank})
                for sample in family.samples
            ]
            yield labelled


def build_sharded_registry(
    stores: Mapping[str, Any],
    health: Mapping[str, TableHealth] | None = None,
    requests: RequestCounters | None = None,
    *,
    process: bool = True,
) -> CollectorRegistry:
    """``build_registry`` for one rank's ``ShardedStore``s: every sample carries ``rank``.

    Each rank serves its own ``/metrics``; Prometheus sums over ``rank`` (see
    ``deploy/prometheus-rules.yml``)."""
    ranks = {store.rank for store in stores.values()}
    if len(ranks) > 1:
        raise ValueError(f"stores of ranks {sorted(ranks)}; expected the stores of one rank")
    rank = ranks.pop() if ranks else 0
    registry = CollectorRegistry()
    local = {table: store.local for table, store in stores.items()}
    registry.register(_RankLabelled(TieredStoreCollector(local, health, stores), rank))
    registry.register(ShardedStoreCollector(stores))
    if requests is not None:
        registry.register(_RankLabelled(ServerCollector(requests), rank))
    if process:
        ProcessCollector(registry=registry)
    return registry


def store_counts(table: str, store: TieredStore) -> dict[SampleKey, float]:
    """The counter and histogram samples (not 0) of ``store`` serving ``table``, of its own
    counts: what ``TableHealth.carry`` adds once a reload closes it."""
    fam = TieredStoreCollector._table_families(table, store, TableHealth(), store)
    return {
        _sample_key(s): s.value
        for family in fam.values()
        if family.type in ("counter", "histogram")
        for s in family.samples
        if s.value
    }


def _sample_key(sample: Any) -> SampleKey:
    """A sample's name and sorted labels (what ``TableHealth.carried`` is keyed by)."""
    return sample.name, tuple(sorted(sample.labels.items()))


def _family(name: str) -> Metric:
    """An empty metric family for ``name`` as ``METRICS`` or ``SHARDED_METRICS`` describes it."""
    kind, labels, doc = METRICS.get(name) or SHARDED_METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, doc, labels=labels)
    return HistogramMetricFamily(name, doc, labels=labels)


def _add_histogram(
    family: HistogramMetricFamily, labels: list[str], hist: LatencyHistogram
) -> None:
    """Add one ``LatencyHistogram`` as cumulative buckets (+Inf equals the count)."""
    buckets = [(floatToGoString(bound), n) for bound, n in hist.cumulative()]
    family.add_metric(labels, buckets, hist.sum)

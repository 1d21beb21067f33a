"""``ServedModel``: a converted checkpoint's ``EngramLM`` over one tiered store per Engram layer.

The one wiring of Engram to the stores is the library's: ``load_tiered_model`` opens the
checkpoint written by ``convert_checkpoint`` (its table naming, manifest metadata and
``check_table_file`` checks), and the model runs its own forward. The serve layer only adds what
serving needs around it: a ``GuardedTable`` around each store (failures become one typed error
and are counted per table), a forward hook that records each Engram layer's output for the
answer's per-layer checksums, the trace of served lookups, ``create_checkpoint`` for a small
seeded random checkpoint to try it out, and the swap to a table's new version when a compaction or
a writer's commit moved it on (``reload_if_stale``, checked once a second: by requests, or by
``watch_versions``'s thread alone once it runs, so that no request waits for a reload).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import math
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic_file import atomic_write
from ..config import dump_yaml, naming_file
from ..delta.row_delta import delta_path
from ..delta.table_versions import current_version
from ..engram.checkpoint import (
    ConvertedCheckpoint,
    check_table_file,
    load_tiered_model,
    missing_table_error,
    save_tiered,
)
from ..engram.config import v41_refusal
from ..engram.model import EngramBatch, EngramLM
from ..errors import (
    ConfigError,
    RankFailureError,
    StoreClosedError,
    TableFormatError,
    TieredStoreError,
    TierIOError,
    error_text,
)
from ..metrics import RequestCounters, TableHealth, store_counts, verify_counted
from ..page_checksums import sidecar_path
from ..request_queue import QueuedRequest, QueuedRequestError
from ..store import TieredStore, seconds_left
from ..table_format import TableChangingError, VerifyStopped, table_paths
from ..trace import TraceWriter
from .config import ServeConfig
from .guarded_table import GuardedTable, TableUnavailableError
from .inference_request import InferenceRequest
from .ranks import STOP, RankControl

__all__ = ["NonFiniteOutputError", "ServedModel", "create_checkpoint"]

log = logging.getLogger("tiered_store.serve")

RELOAD_CHECK_SECONDS = 1.0  # how often requests look for a new table version (compaction, commit)
# the scrubber's tries again of a table queued for a check whose pass raised something unexpected
SCRUB_RETRIES = 3
# a file modified this recently may change again within its mtime's tick (1 to 2 s on coarse
# file clocks) and keep its identity: a refusal of it is not remembered (opened again next check)
SETTLED_NS = 2_000_000_000
# each store's close waits this long at least for its calls under way, whatever an earlier one
# (hung for good) left of the deadline: a call that ends as its store closes (a warm restore's
# chunk, a re-pin's read) does not leave it to close under it, without its warm-restart save
CLOSE_GRACE_S = 1.0
# a table a reload left closed whose reopen failed is tried again after this long, the wait
# doubling at each failure up to the most (at once when its files change, or when the calls hung
# in its old store end: until then its new store cannot open beside it)
CLOSED_RETRY_FIRST_S = 2.0
CLOSED_RETRY_MOST_S = 60.0


class _Reason(NamedTuple):
    """Why ``tables`` keep the version open now (``why``); ``str``: as /healthz and the log say."""

    tables: tuple[str, ...]
    why: str

    def __str__(self) -> str:
        return f"{', '.join(self.tables)} ({self.why})"


class NonFiniteOutputError(TieredStoreError, ArithmeticError):
    """The model's output holds NaN or infinity although every row looked up was finite."""


def create_checkpoint(config: ServeConfig, *, progress: bool = False) -> ConvertedCheckpoint:
    """Write a seeded random ``EngramLM`` of ``config.model`` as a checkpoint at
    ``config.checkpoint_dir`` (tables first, ``dense.safetensors`` last: it marks completion).

    Examples
    --------
    >>> converted = create_checkpoint(ServeConfig.from_yaml("examples/serve.yaml"))  # doctest: +SKIP
    >>> sorted(converted.table_paths)  # doctest: +SKIP
    [1, 3]
    """
    if config.model is None:
        raise ConfigError(
            f"{config.source}: model: missing; creating a checkpoint needs the model's shapes "
            "(engram, backbone, transformer sections; see examples/serve.yaml)"
        )
    if config.model.engram.is_v41:  # before the model is built: save_tiered refuses it
        raise ConfigError(
            f"{config.source}: model.engram.geometry "
            f"{v41_refusal('a created checkpoint cannot hold')}; serve a DeepSeek-V4.1 checkpoint "
            "converted by `tiered-store convert-hf`"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.checkpoint.seed)
        model = EngramLM(config.model)
    log.info("creating a random checkpoint in %s", config.checkpoint_dir)
    return save_tiered(
        model,
        config.checkpoint_dir,
        dtype=config.checkpoint.dtype,
        overwrite=True,  # no dense file yet: tables left by an interrupted creation are replaced
        progress=progress,
    )


@dataclass(eq=False)  # by identity: a ServedModel keeps the ones waiting as dict keys
class Announced:
    """A waiting request's hashed rows and what each table was told (``ServedModel.announce``)."""

    batch: EngramBatch
    queued: list[tuple[TieredStore, QueuedRequest]] = field(default_factory=list)
    released: bool = False  # set by ``ServedModel.release``


class ServedModel:
    """A checkpoint's ``EngramLM`` over tiered stores, with per-table health and a trace.

    Parameters
    ----------
    config
        The serve configuration (``checkpoint.path``, ``store``, ...).
    create
        Create the checkpoint (``create_checkpoint``) when it does not exist, as
        ``checkpoint.create: true`` does.
    trace
        Record every lookup served into this trace file (``tiered-store replay`` reads it);
        written when ``close`` is called; its chunks reach the file every
        ``server.record_flush_s`` (``tiered-store recover-trace`` after a kill). A write that
        fails (a full disk) leaves the answer as it is: logged once until writes succeed again,
        counted in ``counters``, the request's batch left out of the trace.
    counters
        The server's ``RequestCounters``: a request whose records could not be written to the
        trace is counted in them (``tiered_store_trace_write_failures_total``).

    Examples
    --------
    >>> served = ServedModel(ServeConfig.from_yaml("examples/serve.yaml"), create=True)  # doctest: +SKIP
    >>> request = parse_request(b'{"text": "Hello"}', served.config.server, served)  # doctest: +SKIP
    >>> served.answer(request)["next_token_ids"]  # doctest: +SKIP
    [[86332]]
    >>> served.close()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        create: bool = False,
        trace: str | Path | None = None,
        before_start: Callable[[ServedModel], None] | None = None,
        counters: RequestCounters | None = None,
    ) -> None:
        self.config = config
        self.counters = counters if counters is not None else RequestCounters()
        if trace is not None and config.sharded:
            raise ConfigError(
                f"--record-trace {trace}: the tables are sharded; a trace holds the whole "
                "table's row ids, which no rank's store replays; expected an unsharded server "
                "(record there, or on one process over the whole tables)"
            )
        if not config.dense_path.exists():
            if not (create or config.checkpoint.create):
                what = (
                    f"has no {config.dense_path.name}"
                    if config.checkpoint_dir.is_dir()
                    else f"does not exist ({config.checkpoint_dir})"
                )
                raise ConfigError(
                    f"checkpoint.path: {config.checkpoint.path!r} {what}; "
                    "expected a directory written by convert_checkpoint (or serve with "
                    "--create-tables, or run `tiered-store init-model CONFIG`, for a small "
                    "random one)"
                )
            create_checkpoint(config)
        # taken before the dense file is read: a reload swaps no table in once it changed
        self._dense_identity = _file_identity(config.dense_path)
        with naming_file(config.source):  # errors at open name the file, as its others do
            self.model: EngramLM = load_tiered_model(config.checkpoint_dir, store=config.store_spec)
        self.model.eval()
        stores = list(self.model.tables.values())
        self.device = stores[0].device if stores else torch.device("cpu")
        self.model.to(self.device)  # the dense weights where the hot tier hands out rows
        self._trace: TraceWriter | None = None
        self._replay_configs: list[Path] = []  # each layer's store config beside the trace
        self._trace_lock = threading.Lock()  # the trace's writes and its close
        self._trace_failing: str | None = None  # the error of a spell of failed trace writes
        self._left_out = 0  # requests left out of the trace in that spell
        try:
            self.layer_ids = list(self.model.engram_layers)
            # sharded tables: every rank runs this same code; rank 0 announces each request.
            # The control group first: a rank whose checks below fail then leaves the others a
            # closed connection, not a wait for it that never ends
            self.control = None
            if config.sharded:
                sharding = config.store_config(self.layer_ids[0]).sharding
                self.control = RankControl(sharding.timeout_s)
            self.stores: dict[str, TieredStore] = {}
            self.health: dict[str, TableHealth] = {}
            guarded = {}
            for layer, table in self.model.tables.items():
                name = config.table_name(layer)
                self.stores[name] = table
                self.health[name] = TableHealth()
                guarded[layer] = GuardedTable(table, name, self.health[name])
                verify = config.checkpoint.verify_on_start
                if verify and verify_counted(self.served_file(table), self.health[name]) is None:
                    raise TableFormatError(
                        f"checkpoint.verify_on_start: {self.health[name].last_error}"
                    )
            self.model.set_tables(guarded)
            self._outputs = threading.local()
            for layer, engram in self.model.engram_layers.items():
                engram.register_forward_hook(self._recorder(layer))
            self._submit_lock = threading.Lock()
            self._gate = RequestGate()
            # announced, not released, in the order announced (a dict's keys): a reload re-tells
            self._waiting: dict[Announced, None] = {}
            # past server.max_announced: waiting unannounced, in arrival order (a dict's keys)
            self._unannounced: dict[Announced, None] = {}
            self._waiting_lock = threading.Lock()
            self.reload_check_seconds = RELOAD_CHECK_SECONDS  # how often requests check
            self._reloading = threading.Lock()  # one check and swap at a time
            self._watched = False  # a version watch checks (watch_versions): requests do not
            self._closed = False  # a closed model never reopens its tables
            self._closing = threading.Event()  # close() began: a reload under way ends early
            self._last_version_check = time.monotonic()
            # tables whose last checksum pass failed, reopened on another file since: the
            # scrubber checks them at once (that verdict was on a file no longer served)
            self._scrub_again: set[str] = set()
            self._scrub_again_lock = threading.Lock()
            self.reload_refused: str | None = None  # why new versions are not served (/healthz)
            # (why, what is served, the refusals kept: their files, by table) logged
            self._refused_logged: tuple[str, str, dict[str, Any]] | None = None
            # table -> (its refused version's files, why): while they stay, no reload it is part
            # of opens a store (it would be refused again, and the tables stale with it)
            self._refusals: dict[str, tuple[Any, str]] = {}
            # table left closed -> (its files, when tried again, the wait, why): its reopen failed
            self._closed_retry: dict[str, tuple[Any, float, float, _Reason]] = {}
            self._outlasted: frozenset[int] = frozenset()  # answers a reload gave up waiting for
            self.converted_anew: str | None = None  # set once the dense file changed (restart)
            # (table, store) that close(wait_s=) left to close under a call hung in it (at the
            # close, or a reload's of the store it swapped out): left_closing (``_leave``)
            self._left: list[tuple[str, weakref.ref[TieredStore]]] = []
            self.reloads = 0
            if trace is not None:
                self._trace = self._open_trace(Path(trace))
                # now, not at close: a server killed meanwhile leaves them for its recovered trace
                self._replay_configs = [
                    self.write_replay_config(self._trace.path, layer) for layer in self.layer_ids
                ]
            if before_start is not None:  # a rank's own checks: one failing stops every rank
                before_start(self)
            if self.control is not None:
                try:
                    self.control.started()
                except RuntimeError as exc:  # a rank failed its checks, or is gone
                    first = next(iter(self.stores.values()))
                    raise first.failure("start", error_text(exc)) from exc
        except BaseException:
            if self._trace is not None:  # nothing recorded: its partial file goes too
                self._trace.abort()
            self.model.close()
            raise
        self.tokenizer = self.model.hasher.tokenizer
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.model.config.engram.pad_id

    @property
    def left_closing(self) -> list[str]:
        """The tables whose store a close left to close under calls still hung in it (at the
        close, or a reload's of the store it swapped out), each once: the serve command exits
        past them."""
        return list(dict.fromkeys(name for name, _ in self._left_calls()))

    def _leave(self, name: str, store: TieredStore) -> None:
        """Note ``store`` of table ``name``, which a close left to close under calls hung in it,
        for ``left_closing``: by weak reference (those calls hold it; a sharded table's, never
        reopened, the model holds), so that once they end it is freed (its tiers' memory)."""
        if store.calls_left:
            self._left = [(n, weakref.ref(s)) for n, s in self._left_calls()]
            self._left.append((name, weakref.ref(store)))

    def _close_or_leave(self, name: str, store: TieredStore, wait_s: float | None) -> None:
        """Close ``store`` of table ``name``, waiting at most ``wait_s`` for its calls under way
        (None: until they end); one that outlasts it is left to close under them (``_leave``)."""
        if not store.close(wait_s=wait_s):
            self._leave(name, store)

    def _left_calls(self) -> list[tuple[str, TieredStore]]:
        """The (table, store) of ``_left`` whose hung calls still run."""
        return [(n, s) for n, ref in self._left if (s := ref()) is not None and s.calls_left]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (the model's DeepSeek tokenizer)."""
        return self.tokenizer.encode(text).tolist()

    def _recorder(self, layer: int) -> Callable[..., None]:
        """A forward hook keeping layer ``layer``'s Engram output for the calling thread."""

        def hook(module: Any, args: Any, output: torch.Tensor) -> None:
            outputs = getattr(self._outputs, "by_layer", None)
            if outputs is not None:
                outputs[layer] = output

        return hook

    def write_replay_config(self, trace: Path, layer: int) -> Path:
        """Layer ``layer``'s store config as YAML beside the recorded ``trace``
        (``TRACE.TABLE.store.yaml``: the store section, the table by absolute path), which
        ``tiered-store replay`` takes with the trace; returns its path."""
        spec = {
            **self.config.store_spec(layer),
            "table": {"path": str(self.config.table_path(layer))},
        }
        spec.pop("metrics", None)  # serving's listener: replay has none
        path = trace.with_name(f"{trace.name}.{self.config.table_name(layer)}.store.yaml")
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(f"# {self.config.table_name(layer)} as served: replay {trace.name} with it\n")
            f.write(dump_yaml(spec))
        return path

    def _open_trace(self, path: Path) -> TraceWriter:
        """A TraceWriter whose header describes every layer's table."""
        hasher = self.model.hasher
        tables = [
            {
                "name": self.config.table_name(layer),
                "rows": hasher.table_rows(layer),
                "dim": self.stores[self.config.table_name(layer)].dim,
                "heads": hasher.num_heads,
                "primes": hasher.head_sizes(layer),
                "offsets": hasher.offsets(layer).tolist(),
                "layer": layer,
            }
            for layer in self.layer_ids
        ]
        header = {
            "tables": tables,
            "config": {"engram": self.model.config.engram.to_dict(), "source": self.config.source},
            "tokenizer": {
                "path": str(hasher.tokenizer.tokenizer_path),
                "vocab_size": hasher.tokenizer.vocab_size,
                "compressed_size": hasher.tokenizer.num_compressed,
                "lookup_digest": hasher.tokenizer.lookup_digest,
            },
            "recorded_by": "tiered-store serve",
        }
        return TraceWriter(path, header)

    def reload_if_stale(self, *, force_check: bool = False) -> list[str]:
        """Reopen the stores whose table moved on (a compaction's new version, a writer's new
        commit), at most once per ``reload_check_seconds``; returns the tables reopened (of a
        refused swap, those it left closed and reopened alone). The swap waits for requests in
        flight and holds new ones back, so every request runs on one version of every table
        from its prefetch to its answer; for at most
        ``server.request_timeout_s``: answers still running then (a worker hung on a read) are
        logged, requests go on over the version open now, and the swap is tried again once those
        answers end. ``reload_check_seconds`` sets the interval (``force_check`` checks now). A
        ``close`` that begins meanwhile ends it once the open under way is done (nothing swapped
        in, what it opened closed): a stop waits for no other open, nor for the swap."""
        now = time.monotonic()
        if not force_check and now < self._last_version_check + self.reload_check_seconds:
            return []
        if self._closed or not self._reloading.acquire(blocking=False):  # or another checks now
            return []
        try:
            if self._closed:  # closed while this waited for the lock
                return []
            self._last_version_check = now
            return self._reload_stale(force_check)
        finally:
            self._end_reopening()  # one whose open failed is closed from now on
            self._reloading.release()

    def _reload_stale(self, force: bool = False) -> list[str]:
        """``reload_if_stale``'s check and swap, by one thread at a time (``force``: a table
        left closed is tried again now, whatever its wait, but for calls hung in its old store)."""
        if self.converted_anew is not None:  # its tables never run under the dense weights loaded
            return []
        stale: list[str] = []
        unreadable: list[_Reason] = []
        for name, store in self.stores.items():
            if not isinstance(store, TieredStore):  # sharded: every rank would have to reopen
                continue
            try:
                if store.closed or store.is_stale():
                    stale.append(name)
                else:  # on its version again (a rollback): a refusal of another one is past
                    self._refusals.pop(name, None)
            except (TieredStoreError, OSError) as exc:  # a damaged version pointer: serve on
                unreadable.append(_Reason((name,), f"cannot tell its version: {error_text(exc)}"))
                self.health[name].reload_failures += 1
        if not stale:
            self._refused(unreadable)
            return []
        # before the open: one made anew meanwhile differs
        files = {name: self._version_files(name) for name in stale}
        for name in stale:
            if name in self._refusals and self._refusals[name][0] != files[name][0]:
                del self._refusals[name]  # its files changed: opened again
        held = [self._refusals[name][1] for name in stale if name in self._refusals]
        if held:  # refused as they are: no store opened beside the old ones again; a table
            # left closed (no version of it open) is reopened alone, as after a refused swap
            kept = [name for name in stale if not self.stores[name].closed]
            for name in kept:
                self.health[name].reload_failures += 1
            if kept:
                unreadable = [*unreadable, _Reason(tuple(kept), "; ".join(held))]
            stale = [name for name in stale if name not in kept]
        # a table left closed whose files changed (a repair), or whose old store's hung calls
        for name in stale:  # ended (``left_closing``): tried at once, though another still waits
            retry = self._closed_retry.get(name)
            if retry is not None and (
                retry[0] != files[name][0]
                or (retry[1] == math.inf and not self.stores[name].calls_left)
            ):
                del self._closed_retry[name]
        now = time.monotonic()
        # one left closed whose reopen failed is not tried at every check (nor, forced, while
        # calls hang in its old store: no new store opens beside it); the other tables
        waiting = {  # reload without it (no request is served meanwhile to mix their versions)
            name: retry[3]
            for name in stale
            if (retry := self._closed_retry.get(name)) is not None
            and (retry[1] == math.inf or (not force and now < retry[1]))
        }
        if waiting:
            for name in waiting:
                self.health[name].reload_failures += 1
            stale = [name for name in stale if name not in waiting]
            unreadable = [*unreadable, *dict.fromkeys(waiting.values())]
        if not stale:  # every one held by its refusal, or waiting for its retry
            self._refused(unreadable)
            return []
        outlasted = len(self._outlasted & self._gate.in_flight())
        if outlasted:  # tried again once they end; /healthz says what waits now
            if not any(self.stores[name].closed for name in stale):
                self._postponed(stale, unreadable, outlasted)
                return []
            # a table left closed meanwhile: reopened alone (the answers begun since the reload
            with self._gate.exclusive(timeout=0):  # gave up are not those the others wait for)
                return self._reopen_alone(stale, files, unreadable, outlasted, {})
        bound = self.config.server.request_timeout_s
        opened: dict[str, TieredStore] = {}
        # the old stores close once the gate opens (after_gate exits last): no request reads
        # them once swapped out, and none waits for their close (a warm-restart save, a drain)
        with contextlib.ExitStack() as after_gate, contextlib.ExitStack() as gate:
            try:  # opened while requests go on over the old stores; only the swap holds them back
                failure = self._open_ahead(stale, opened)
                if self._closing.is_set():  # closed meanwhile: nothing swapped in, none left open
                    _close_all(opened)
                    return []
                # the dense file changed (an open found it): no version is swapped in, nor tried
                # again, so none waits for the answers running; refused below, logged once
                anew = self.converted_anew is not None
                running = gate.enter_context(self._gate.exclusive(timeout=0 if anew else bound))
                # a worker hung on a read: requests go on over the version open now
                if running and not anew:
                    ahead = {n: s for n, s in opened.items() if self.stores[n].closed}
                    _close_all({n: s for n, s in opened.items() if n not in ahead})
                    self._outlasted = self._gate.in_flight()
                    log.warning(
                        "postponed reopening %s on a new version: %d answer(s) still running %g s "
                        "after the reload began waiting for them (server.request_timeout_s); serving "
                        "the version open now, trying again once they end%s",
                        ", ".join(stale),
                        running,
                        bound,
                        "; a table left closed is reopened alone"
                        if any(self.stores[n].closed for n in stale)
                        else "",
                    )
                    # a table left closed: reopened alone, over ``opened`` (its stores for those
                    # tables are ``ahead``; those opened alone join them there, so that the guard
                    # below serves or closes them again, should a second Ctrl-C come)
                    return self._reopen_alone(stale, files, unreadable, running, opened)
            except BaseException:  # Ctrl-C while it waits for the answers (or before, or as it
                self._serve_or_close(opened)  # closes them, postponed): none left open (a
                raise  # store served as a table left closed reopened alone stays)
            self._outlasted = frozenset()
            refused: str | None = None  # the table whose new version failed to open
            try:  # all or nothing: every stale table's new store, checked, before any swap
                if failure is not None:  # before an old store is closed for another table
                    refused = failure[0]
                    raise failure[1]
                for refused in stale:
                    if refused not in opened:
                        opened[refused] = self._open_new_version(refused)
                refused = None
                # checks every table's geometry, then swaps them all
                self.model.set_tables(self._guarded(opened))
            except Exception as exc:  # noqa: BLE001 (ConfigError: another geometry; out of
                # memory beside the old stores: refused as any failure, never a request's error)
                # a table left closed whose new store opened is served alone, not opened again
                # (one the swap reopened is not named closed meanwhile: requests wait for it)
                ahead = {n: s for n, s in opened.items() if n != refused and self.stores[n].closed}
                # a conversion rerun (``anew``) did not wait for the answers running: both swaps
                # below may run beside them, unseen. The undo gives the model the stores it reads
                # already (the swap above never ran: ``anew`` comes with ``failure``, and no
                # store closes here), wrapped anew over the same store and health; a table
                # reopened alone had its store closed before they began (closed only under a
                # drained gate), so each of them failed at its prefetch and none looks it up
                try:  # (a Ctrl-C as either begins, or as the reopen takes a store, included)
                    self._undo_swap({n: s for n, s in opened.items() if n not in ahead})
                    # the refused one's open was just tried (its old store closed): not again now
                    reopened, failed = self._reopen_closed(
                        [n for n in stale if n != refused], ahead
                    )
                except BaseException:  # Ctrl-C: none of them left open (one served stays)
                    self._serve_or_close({**opened, **ahead})  # (those it opened alone too)
                    raise
                self._end_reopening()  # one not reopened alone is closed (logged so below)
                for name in stale:  # counted at every check that refuses it, as it is retried
                    if name not in reopened:  # (one reopened alone is counted as a reload)
                        self.health[name].reload_failures += 1
                self._log_reopened(reopened)
                if self.converted_anew is not None:  # logged once: no check follows
                    log.error(
                        "%s; until then, lookups that read a replaced table file answer 503",
                        self.converted_anew,
                    )
                    # no later check tries them again (one failing for that rerun: just said)
                    _log_left_closed(failed, skip=self.converted_anew)
                    return reopened
                # refused for what its files hold (not an I/O error, nor an old store left closed,
                # nor files just written: they may change again unseen by their identities)
                if (
                    refused is not None
                    and isinstance(exc, (ConfigError, TableFormatError))
                    and files[refused][1]
                    and not any(self.stores[name].closed for name in stale)
                ):
                    self._refusals[refused] = (files[refused][0], error_text(exc))
                # not on the new version: for the refusal, or (left closed) for their own failure
                kept = [name for name in stale if name not in reopened and name not in failed]
                why = [_Reason(tuple(kept), error_text(exc))] if kept else []
                why += [_Reason((name,), error) for name, error in failed.items()]
                self._retry_closed_later(stale, files, error_text(exc), failed)
                self._refused([*unreadable, *why])
                return reopened
            except BaseException:  # Ctrl-C: it goes on, no store it opened left open
                self._undo_swap(opened)
                raise
            after_gate.callback(self._swap_in(opened))
            for name in stale:
                self._closed_retry.pop(name, None)
            self._refused(unreadable)  # (interrupted, the old stores close all the same)
        self._log_reopened(stale)
        return stale

    def _reopen_alone(
        self,
        stale: list[str],
        files: dict[str, Any],
        reasons: list[_Reason],
        running: int,
        ahead: dict[str, TieredStore],
    ) -> list[str]:
        """While ``running`` answers outlast a reload of ``stale`` (the caller holds the gate):
        each table left closed is reopened alone (``_reopen_closed``, over ``ahead``: no answer
        reads a version of it, so none mixes two), one failing tried again later as after a
        refused reload; the others wait for those answers (``reasons``: why the other tables keep
        their version). Returns the tables reopened. Interrupted (Ctrl-C), none of the stores of
        ``ahead`` is left open (one served stays: ``_serve_or_close``)."""
        try:
            closed = [name for name in stale if self.stores[name].closed]
            reopened, failed = self._reopen_closed(closed, ahead)
            for name in failed:
                self.health[name].reload_failures += 1
            _log_left_closed(failed)
            self._log_reopened(reopened)
            self._retry_closed_later(closed, files, "", failed)
            reasons = [*reasons, *(_Reason((name,), error) for name, error in failed.items())]
            rest = [name for name in stale if name not in closed]
            if rest:
                self._postponed(rest, reasons, running)
            else:
                self._refused(reasons)
            return reopened
        except BaseException:  # Ctrl-C: none of them left open (one served stays)
            self._serve_or_close(ahead)
            raise

    def _log_reopened(self, names: list[str]) -> None:
        """Log that tables ``names`` were reopened on a new version (none: nothing), and that a
        trace being recorded no longer replays to their counters."""
        if not names:
            return
        log.info("reopened tables on a new version: %s", ", ".join(names))
        if self._trace is not None:  # the new stores start cold, with their counters at 0
            log.warning(
                "the trace being recorded no longer replays to the live counters of %s: "
                "reopened, their tiers and counters started anew",
                ", ".join(names),
            )

    def _open_ahead(
        self, stale: list[str], opened: dict[str, TieredStore]
    ) -> tuple[str, Exception] | None:
        """The stores of ``stale``'s new versions, put in ``opened`` (by table: the caller's, so
        that none is out of its reach once opened), opened in turn outside the request gate
        until one fails (returns its table and error), but for those that need the gate (a map
        grown elsewhere: ``_open_new_version`` closes the old store first); interrupted, the
        caller closes them (once); none opened once ``close`` began."""
        try:
            for name in stale:
                if self._closing.is_set():  # the caller closes what it opened
                    break
                try:
                    opened[name] = self._open_checked(name, self.stores[name])
                except TierIOError as exc:
                    if exc.errno != errno.ESTALE or self.stores[name].closed:
                        raise
                    # opened under the gate; the tables after it open here still
        except Exception as exc:  # noqa: BLE001 (raised again under the gate, as it was)
            return name, exc
        return None

    def _undo_swap(self, opened: dict[str, TieredStore]) -> None:
        """After a refused or interrupted swap: the model back on the stores served for
        ``opened``'s tables (``set_tables`` stopped part-way gave it some of ``opened``), then
        ``opened`` closed; one the undo did not put back (a second Ctrl-C) is swapped in."""
        try:
            self.model.set_tables(self._guarded({name: self.stores[name] for name in opened}))
        finally:
            self._serve_or_close(opened)

    def _serve_or_close(self, opened: dict[str, TieredStore]) -> None:
        """Of ``opened`` (table name -> a new store), those the model reads are swapped in
        (``stores`` names them, their old stores close), the others closed; one swapped in
        already (``stores`` names it) is left as it is."""
        opened = {name: store for name, store in opened.items() if self.stores[name] is not store}
        reads = {self.config.table_name(k): t.table for k, t in self.model.tables.items()}
        kept = {name: store for name, store in opened.items() if reads.get(name) is store}
        try:
            _close_all({name: store for name, store in opened.items() if name not in kept})
        finally:
            if kept:
                self._swap_in(kept)()

    def _version_files(self, name: str) -> tuple[Any, bool]:
        """What the current version of table ``name`` is on disk: its generation and the
        identities of its data file, manifest, page checksums and delta (a table made anew,
        compacted, given other metadata or committed to changes it); and whether every file was
        last modified ``SETTLED_NS`` or more before (a later write within its mtime's tick would
        keep its identity)."""
        now = time.time_ns()
        try:
            npy, generation = current_version(self.stores[name].config.table.path)
        except (TieredStoreError, OSError) as exc:
            return error_text(exc), False
        files = (*table_paths(npy), sidecar_path(npy), delta_path(npy) / "data.mdb")
        identities = [_file_identity(path) for path in files]
        settled = all(i is None or now - i[3] >= SETTLED_NS for i in identities)
        return (generation, *identities), settled

    def _retry_closed_later(
        self, stale: list[str], files: dict[str, Any], error: str, failed: dict[str, str]
    ) -> None:
        """After a refused reload of ``stale`` (``error``: why; ``failed``: why a table's reopen
        alone failed, by table, its reason while it waits): each of them it left closed is tried
        again ``CLOSED_RETRY_FIRST_S`` later, the wait doubling at each failure in a row up to
        ``CLOSED_RETRY_MOST_S``, unless its ``files`` change first; one whose old store calls
        hung in still hold open (``left_closing``: no new store opens beside it) once they end.
        Meanwhile the other tables reload without it."""
        for name in stale:
            if not self.stores[name].closed:
                self._closed_retry.pop(name, None)
                continue
            last = self._closed_retry.get(name)
            wait = CLOSED_RETRY_FIRST_S if last is None else min(2 * last[2], CLOSED_RETRY_MOST_S)
            at = math.inf if self.stores[name].calls_left else time.monotonic() + wait
            why = failed.get(name, error)
            self._closed_retry[name] = (files[name][0], at, wait, _Reason((name,), why))

    def _postponed(self, stale: list[str], reasons: list[_Reason], running: int) -> None:
        """Note in /healthz that ``stale``'s reload waits for ``running`` answers still running
        (``reasons``: why the other tables keep the version open now)."""
        self.reload_refused = "; ".join(
            map(str, [*reasons, _Reason(tuple(stale), f"postponed: {running} answer(s) running")])
        )

    def _refused(self, reasons: list[_Reason]) -> None:
        """Note why tables keep the version open now (``reasons``; none: every table is on its
        current one): logged once per reason, what is served meanwhile and the refusals kept
        (``_refusals``: tried once their files change; new files refused again are logged
        again), not at every check, and in /healthz."""
        refused = "; ".join(map(str, reasons)) or None
        serving = self.serving_meanwhile()
        # refused for what their files hold: not tried meanwhile
        held = {name: files for name, (files, _) in self._refusals.items()}
        kept = sorted(held)
        if refused is not None and (refused, serving, held) != self._refused_logged:
            again = f"trying again every {self.reload_check_seconds:.0f} s"
            # tables left closed: tried at a wait, or (no new store opens beside an old one that
            # calls hang in) only once those calls end; either at once when their files change
            hung = [name for name, r in self._closed_retry.items() if r[1] == math.inf]
            timed = [name for name in self._closed_retry if name not in hung]
            # tables tried at every check (said first): those named but left closed or held
            named = {name for reason in reasons for name in reason.tables}
            others = bool(named - set(self._closed_retry) - set(held))
            if timed:
                it, its = ("it fails", "its") if len(timed) == 1 else ("they fail", "their")
                who = f"{', '.join(timed)} " if hung or others else ""  # (not their wait)
                timed_again = (
                    f"{who}again {CLOSED_RETRY_FIRST_S:g} s later, then less often while {it} "
                    f"(at most every {CLOSED_RETRY_MOST_S:g} s), or once {its} files change"
                )
                again = f"{again}; {timed_again}" if others else f"trying {timed_again}"
            if hung:
                store, its = (
                    ("its old store", "its") if len(hung) == 1 else ("their old stores", "their")
                )
                when = f"once the calls hung in {store} end, or once {its} files change"
                again = (
                    f"{again}; {', '.join(hung)} {when}"
                    if timed or others
                    else f"trying {', '.join(hung)} again {when}"
                )
            if kept:  # (and the tables stale with them)
                its = "its" if len(kept) == 1 else "their"
                again += f"; {', '.join(kept)} once {its} files change (refused for what they hold)"
            log.error("could not reopen %s on a new version; %s, %s", refused, serving, again)
        self._refused_logged = None if refused is None else (refused, serving, held)
        self.reload_refused = refused

    def serving_meanwhile(self) -> str:
        """What is served while a reload is refused: the version open now, but for a table
        whose store a reload left closed (no version of it open: its lookups answer 503)."""
        closed = self.closed_tables()
        if not closed:
            return "serving the version open now"
        its, it = ("its", "it") if len(closed) == 1 else ("their", "them")
        out = (
            f"{', '.join(closed)} closed (no version open: {its} lookups answer 503 until a "
            f"check reopens {it})"
        )
        if len(closed) < len(self.stores):
            out += ", the other tables on the version open now"
        return out

    def closed_tables(self) -> list[str]:
        """The tables whose store a reload left closed (none of their versions open: every
        lookup of them answers 503 until a check reopens them), not one it closed to reopen while
        that open runs (requests wait for it); none once ``close`` began."""
        if self._closed:
            return []
        return [
            name
            for name, store in self.stores.items()
            if isinstance(store, TieredStore) and store.closed and not self.health[name].reopening
        ]

    def _end_reopening(self) -> None:
        """No table is being reopened now (``TableHealth.reopening``): one whose store is closed
        is named closed (/healthz, ``tiered_store_table_open``)."""
        for health in self.health.values():
            health.reopening = False

    def _reopen_closed(
        self, names: list[str], ahead: dict[str, TieredStore]
    ) -> tuple[list[str], dict[str, str]]:
        """After a refused swap: each table whose old store is closed (a map grown elsewhere, or
        a reload before) on its new version alone, so that another table's failure does not take
        it down: the store the swap opened for it (``ahead``, by table), else one opened now (put
        in ``ahead``, the caller's: none out of its reach once opened); one that does not open
        answers 503 until a check opens it; none opens once ``close`` began (left closed).
        Interrupted (Ctrl-C), the store of the table it was at is served once the model took it,
        else closed (the caller's guard serves or closes those of ``ahead``:
        ``_serve_or_close``). Returns the tables reopened, and why each of those that did not
        failed."""
        reopened, failed = [], {}
        for name in names:
            old = self.stores[name]
            if not old.closed:
                continue
            new = ahead.get(name)
            if new is None and self._closing.is_set():  # a close began: the stop waits for
                continue  # no open (it closes every store next)
            try:
                if new is None:
                    new = ahead[name] = self._open_checked(name, old)
                self.model.set_tables(self._guarded({name: new}))
            except Exception as exc:  # noqa: BLE001 (out of memory too: the others go on)
                failed[name] = error_text(exc)  # logged by the caller, with the refusal
            finally:
                if new is not None:
                    self._serve_or_close({name: new})
            if new is not None and self.stores[name] is new:
                reopened.append(name)
        return reopened, failed

    def _guarded(self, stores: dict[str, TieredStore]) -> dict[int, GuardedTable]:
        """The model's tables for ``stores`` (table name -> store), by Engram layer."""
        return {
            layer: GuardedTable(stores[table], table, self.health[table])
            for layer in self.layer_ids
            if (table := self.config.table_name(layer)) in stores
        }

    def _swap_in(self, opened: dict[str, TieredStore]) -> Callable[[], None]:
        """After the model took ``opened`` (table name -> its store on the new version): the
        counters and histograms of the old stores go on in what /metrics exports for their
        tables, the requests waiting are announced to them, the old stores close, and a table
        whose last pass failed is checked again once on another file (its last failed lookup no
        longer holds /healthz at 503); interrupted (Ctrl-C), ``stores`` still names what the
        model reads, and the old stores close. Otherwise they close when the caller calls what it
        returns (once the request gate opens)."""
        old = {name: self.stores[name] for name in opened}
        carried: dict[str, dict[Any, float]] = {}
        try:
            try:
                self._announce_again({old[name]: opened[name] for name in opened})
            finally:  # interrupted too: ``stores`` names what the model reads
                self._serve_from(opened, carried)
        except BaseException:
            self._close_swapped_out(old, carried)
            raise
        close = functools.partial(self._close_swapped_out, old, carried)
        try:  # once served: a pass failing over the old file now finds it replaced
            for name, store in old.items():  # (a writer's commit: the same file, checked in turn)
                if not _another_file(store, opened[name]):  # a closed store's failures end there
                    self.health[name].end_lookup_hold(same_file=True)
                    continue
                if self.health[name].last_error is not None:
                    self._scrub_soon(name)
                self.health[name].end_lookup_hold()  # failed on a file no longer served
        except BaseException:  # Ctrl-C: the old stores close all the same
            close()
            raise
        return close

    def _close_swapped_out(
        self, old: dict[str, TieredStore], carried: dict[str, dict[Any, float]]
    ) -> None:
        """Close the stores ``_swap_in`` replaced (``old``, by table name) and carry to their
        tables' metrics what lookups in flight counted in them since ``carried``; every one,
        though a close (or a carry) raised: an error is logged (the new versions are served),
        each failure as what it is, a Ctrl-C
        raised once the others closed too. They wait for their calls under way (a prefetch) at
        most ``server.request_timeout_s`` in all (each ``CLOSE_GRACE_S`` at least): one hung
        for good (a dead disk) is left to
        close under them (its table in ``left_closing``), never holding the reloads after it,
        nor a ``close`` (which waits for the reload under way)."""
        deadline = time.monotonic() + self.config.server.request_timeout_s

        def close(name: str, store: TieredStore) -> None:
            self.health[name].reloads += 1
            try:
                self._close_or_leave(name, store, _close_wait(deadline))
            finally:  # its carry too (interrupted, the others still close)
                try:
                    self._carry_rest(name, store, carried.get(name, {}))
                except Exception as exc:  # noqa: BLE001 (not the close's error, which goes on)
                    log.error(
                        "carrying the last counts of %s's store of the version swapped out to "
                        "its metrics failed: %s",
                        name,
                        error_text(exc),
                    )

        try:  # swapped out: the new versions are served
            _close_each(old, close, "store of the version swapped out")
        finally:
            self.reloads += len(old)

    def _serve_from(
        self, opened: dict[str, TieredStore], carried: dict[str, dict[Any, float]]
    ) -> None:
        """``stores`` names ``opened`` (table name -> new store), and each table's metrics count
        what its old store counted (put in ``carried``, by table), as one step to a scrape
        (under the tables' ``counting`` locks): none sees a count twice or not at all.
        Interrupted (Ctrl-C), ``stores`` names ``opened`` all the same (the model reads them);
        a table not in ``carried`` has had nothing carried."""
        with contextlib.ExitStack() as held:
            try:
                for name in sorted(opened):  # in one order: two swaps never wait for each other
                    held.enter_context(self.health[name].counting)
                for name in opened:
                    counted = store_counts(name, self.stores[name])
                    self.health[name].carry(counted)
                    carried[name] = counted
            finally:
                self.stores.update(opened)

    def _carry_rest(self, name: str, store: TieredStore, carried: dict[Any, float]) -> None:
        """What the old ``store`` of table ``name`` counted after ``carried`` (lookups in flight
        as it closed) goes on in the table's metrics too."""
        with self.health[name].counting:
            self.health[name].carry(store_counts(name, store), since=carried)

    def _open_new_version(self, name: str) -> TieredStore:
        """A store of table ``name``'s version now, whose open ahead was refused beside the old
        store (``ESTALE``: a writer elsewhere grew the delta's map, which this process's
        environment, the old store's, cannot take while it is open): the old store is closed
        first (no request runs, the caller holds the gate exclusively), then the new one opens,
        once. Should it still not open, requests get 503 until a later check opens it. The close
        waits at most ``server.request_timeout_s`` for the old store's calls under way (a read
        hung on a dead disk holds no request back for good): one that outlasts it is left to
        close under them (in ``left_closing``), and the new store opens once they end."""
        old = self.stores[name]
        self.health[name].reopening = True  # not named closed while it opens
        try:
            self._close_or_leave(name, old, self.config.server.request_timeout_s)
            return self._open_checked(name, old)
        except BaseException:  # closed from now on (the refusal's log and /healthz say so)
            self.health[name].reopening = False
            raise

    def _open_checked(self, name: str, old: TieredStore) -> TieredStore:
        """A new store over ``old``'s table ``name`` that passed the check loading makes
        (``check_table_file`` on the version it opened: a table made anew for another model, of
        another seed, primes or layer, is refused); closed again when it fails."""
        layer = next(k for k in self.layer_ids if self.config.table_name(k) == name)
        try:
            new = TieredStore(old.config)
        except (TieredStoreError, OSError):  # a table gone: named as loading names it
            missing = missing_table_error(old.config.table.path, self.model.hasher, layer)
            if missing is not None:
                raise missing from None
            raise
        try:
            try:
                check_table_file(
                    old.config.table.path, self.model.hasher, layer, manifest=new.cold.manifest
                )
            except ConfigError:  # another model's table: from a conversion rerun, if the dense
                self._check_dense()  # file changed too (then that is what is said)
                raise
            self._check_dense()  # after the open: a table a conversion made is then caught
        except BaseException:
            _close_all({name: new})
            raise
        return new

    def _check_dense(self) -> None:
        """Raise ConfigError once the dense file is not the one loaded: the checkpoint was
        converted anew (a conversion removes it first and writes it last), and its tables would
        run under the old dense weights, a model neither checkpoint is."""
        if self.converted_anew is None:
            if _file_identity(self.config.dense_path) == self._dense_identity:
                return
            self.converted_anew = (
                f"{self.config.dense_path} is not the file this server loaded: the checkpoint was "
                "converted anew, and its tables are not served under the dense weights loaded; "
                "restart the server to serve the new checkpoint"
            )
        raise ConfigError(self.converted_anew)

    def answer(
        self, request: InferenceRequest, announced: Announced | None = None
    ) -> dict[str, Any]:
        """Run one validated request (hashed already when ``announced``); the JSON answer
        without timing.

        Raises ``TableUnavailableError`` when a table's rows cannot be served and
        ``NonFiniteOutputError`` when the output is not finite."""
        if announced is not None:
            self._take_turn(announced)
        if not self._watched:  # a server's version watch reloads: no request waits for one
            self.reload_if_stale()
        with self._gate.shared():
            if self._closed:  # a worker the drain gave up on, come after close(): no lookups
                raise StoreClosedError("the served model is closed; open a new ServedModel")
            if announced is not None:
                self._serving(announced)
            return self._answer(request, announced.batch if announced is not None else None)

    def _serving(self, announced: Announced) -> None:
        """Tell each table told of ``announced`` that its lookup, all of its rows, is made now
        (``TieredStore.served``, inside the gate: no reload swaps the tables meanwhile): its
        admissions then evict the request's rows as the next request that looks each up, not
        before the rows of those behind it. Not under ``_waiting_lock``, which an announcement
        holds through its merge: the compute turn does not wait for one. Advice: a table's
        failure is logged (one released meanwhile has nothing to tell), the other tables are told
        and the request is served all the same."""
        told = dict(list(announced.queued))  # a copy: a release may empty it meanwhile
        for layer in announced.batch.row_ids:
            name = self.config.table_name(layer)
            store = self.stores.get(name)
            if store not in told:
                continue
            try:  # the ids it announced, from the queue: checked and copied once, by announce
                store.served(told[store])
            except QueuedRequestError:  # released meanwhile (cancelled): nothing left to tell
                return
            except Exception:  # noqa: BLE001 (advice: the request is served all the same)
                log.exception("telling table %s a request is served failed", name)

    def _record(self, batch: EngramBatch) -> None:
        """Write one batch's row ids of every layer to the trace, whole (a layer's write that
        fails, a full disk, takes the layers before it back out), unless ``_close`` (which does
        not wait for a worker the drain gave up on) took the trace away; and end the chunk when
        the last one is ``server.record_flush_s`` old (``watch_trace`` does too, between
        requests), so a killed server loses no more. Observation: a write that fails leaves the
        batch out (its chunk alone: kept for the next), logged once a spell and counted, and the
        answer goes on."""
        with self._trace_lock:
            if self._trace is None:
                return
            written_at = self._trace.chunk_written_at
            try:
                with self._trace.all_or_nothing():
                    for layer in self.layer_ids:
                        ids = batch.row_ids[layer].cpu().numpy()
                        self._trace.write(ids, self.config.table_name(layer))
                        self._trace.end_batch()
            except Exception as exc:  # noqa: BLE001 (a full disk: the answer goes on)
                self._trace_write_failed(exc, left_out=True)
                return
            try:
                self._end_old_chunk()
            except Exception as exc:  # noqa: BLE001 (its records stay buffered for the next)
                self._trace_write_failed(exc, left_out=False)
                return
            if self._trace.chunk_written_at != written_at:  # bytes reached the file again
                self._trace_writes_again()

    def _trace_write_failed(self, exc: Exception, *, left_out: bool | None) -> None:
        """Count a request whose records could not be written (``left_out``: its batch is not
        in the trace; None: no request, the idle flush's chunk) and log the first failure of a
        spell (under ``_trace_lock``, the trace open)."""
        if left_out is not None:
            self.counters.trace_write_failed()
            self._left_out += left_out
        if self._trace_failing is None:
            log.error(
                "recording into trace %s failed: %s; requests are answered all the same; until "
                "writes succeed again (logged once till then) a request whose records cannot be "
                "written is left out of the trace (one whose chunk alone fails is kept for the "
                "next)",
                self._trace.path, error_text(exc), exc_info=not isinstance(exc, OSError),
            )  # fmt: skip
        self._trace_failing = error_text(exc)

    def _trace_writes_again(self) -> None:
        """End a spell of failed trace writes, saying how many requests it left out (under
        ``_trace_lock``, the trace open)."""
        if self._trace_failing is not None:
            log.warning(
                "recording into trace %s works again; %d request(s) answered while it failed "
                "(%s) are left out of it",
                self._trace.path, self._left_out, self._trace_failing,
            )  # fmt: skip
        self._trace_failing, self._left_out = None, 0

    def _end_old_chunk(self) -> None:
        """End the trace's chunk when the last one is ``server.record_flush_s`` old (under
        ``_trace_lock``, the trace open)."""
        if time.monotonic() - self._trace.chunk_written_at >= self.config.server.record_flush_s:
            self._trace.end_chunk()

    def _chunk_due_in(self) -> float:
        """Seconds until the trace's last chunk is ``server.record_flush_s`` old (a request ended
        it meanwhile: the records after it are due then), else one ``record_flush_s`` (at least
        50 ms): an older one has nothing buffered, or the next request ends it."""
        flush_s = self.config.server.record_flush_s
        left = self._trace.chunk_written_at + flush_s - time.monotonic()
        return left if left > 0 else max(flush_s, 0.05)

    def watch_trace(self, stop: threading.Event) -> threading.Thread | None:
        """A thread ending the recorded trace's chunk once it is ``server.record_flush_s`` old,
        until ``stop``, requests or not: the last requests before an idle spell reach the file
        too (a killed server loses no more); started. None when no trace is recorded."""
        with self._trace_lock:
            if self._trace is None:
                return None
            first = self._chunk_due_in()

        def watch() -> None:
            wait = first
            while not stop.wait(wait):
                with self._trace_lock:
                    if self._trace is None:  # closed
                        return
                    written_at = self._trace.chunk_written_at
                    try:
                        self._end_old_chunk()
                    except Exception as exc:  # noqa: BLE001 (a full disk: logged once a spell)
                        self._trace_write_failed(exc, left_out=None)
                    else:
                        if self._trace.chunk_written_at != written_at:
                            self._trace_writes_again()
                    wait = self._chunk_due_in()

        thread = threading.Thread(target=watch, name="tiered-store-trace-flush", daemon=True)
        thread.start()
        return thread

    def _answer(self, request: InferenceRequest, hashed: EngramBatch | None) -> dict[str, Any]:
        """``answer`` on the tables of one version."""
        ids = torch.from_numpy(request.input_ids)
        if self._trace is not None:
            # Prefetch and record under one lock, so the trace holds each store's batches in the
            # order the store resolved them (replay then reproduces its counters exactly).
            with self._submit_lock:
                batch = self._prefetch(ids, hashed)
                self._record(batch)
        else:
            batch = self._prefetch(ids, hashed)
        self._outputs.by_layer = {}
        try:
            with torch.inference_mode():
                hidden = self.model(batch.input_ids, prefetched=batch, logits="none")
                last = torch.as_tensor(request.lengths, device=hidden.device) - 1
                final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                logits = F.linear(final, self.model.embed.weight)  # the tied LM head, [B, vocab]
            outputs = self._outputs.by_layer
        finally:
            self._outputs.by_layer = None
        tensors = {
            "logits": logits,
            "hidden": hidden,
            **{f"layer {k}": v for k, v in outputs.items()},
        }
        for what, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteOutputError(f"{what} output holds non-finite values")
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, request.top_k, dim=-1)
        logits32 = _cpu32(logits)
        return {
            "shape": list(request.input_ids.shape),
            "layers": self.layer_ids,
            "next_token_ids": top.indices.tolist(),
            "next_token_logprobs": top.values.tolist(),
            "logits": {"checksum": _crc(logits32), **tensor_summary(logits32)},
            "hidden_checksum": _crc(_cpu32(hidden)),
            "layer_checksums": {str(k): _crc(_cpu32(v)) for k, v in outputs.items()},
            "rows_looked_up": {
                self.config.table_name(k): int(v.numel()) for k, v in batch.row_ids.items()
            },
        }

    def announce(self, request: InferenceRequest) -> Announced:
        """Hash a waiting request and announce its rows to every table (``TieredStore.announce``)
        once fewer than ``server.max_announced`` requests are announced; until then it waits
        unannounced, and those waiting so are announced in arrival order as announced ones are
        released (``release``), unless their turn comes first (``answer``: served unannounced).
        Pass the result to ``answer`` (which then does not hash again) and to ``release`` once
        it is answered. Sharded tables are not told (each rank's store sees only the rows it
        owns of its own requests)."""
        with self._gate.shared():  # not while a reload swaps the tables
            announced = Announced(self.model.hash(torch.from_numpy(request.input_ids)))
            if self.control is not None:
                return announced
            with self._waiting_lock:
                self._unannounced[announced] = None  # behind those waiting unannounced
                try:
                    self._announce_waiting(announced)
                except BaseException:  # this one's announcement was undone, or never made
                    announced.released = True
                    self._unannounced.pop(announced, None)
                    raise
        return announced

    def release(self, announced: Announced, *, announce_waiting: bool = True) -> None:
        """Release what ``announce`` announced (answered, failed or cancelled; one never
        announced only leaves the line), then announce those waiting unannounced that now fit
        under ``server.max_announced`` (``announce_waiting`` False: the caller calls
        :meth:`announce_waiting` later); once: a second call does nothing."""
        with self._waiting_lock:
            announced.released = True
            self._unannounced.pop(announced, None)
            if announced not in self._waiting:
                return
            self._waiting.pop(announced, None)
            self._withdraw(announced)
        if announce_waiting:
            self.announce_waiting()

    @property
    def waiting_unannounced(self) -> int:
        """How many requests wait unannounced (past ``server.max_announced``)."""
        return len(self._unannounced)

    def announce_waiting(self) -> None:
        """Announce those waiting unannounced that fit under ``server.max_announced`` now (after
        a ``release``); a failure is logged (announcing is advice: they are served unannounced)."""
        if not self._unannounced:
            return
        with self._gate.shared():  # not while a reload swaps the tables
            if self._closed:
                return
            with self._waiting_lock:
                try:
                    self._announce_waiting()
                except Exception:  # noqa: BLE001 (advice: the request is served unannounced)
                    log.exception("announcing a waiting request failed")

    def _take_turn(self, announced: Announced) -> None:
        """``announced`` gets its compute turn: if it still waits unannounced, it is served so
        (no release will announce it now)."""
        if announced in self._unannounced:  # else announced already, or being announced now
            with self._waiting_lock:
                self._unannounced.pop(announced, None)

    def _announce_waiting(self, own: Announced | None = None) -> None:
        """Announce those waiting unannounced, in arrival order, while fewer than
        ``server.max_announced`` are announced (``_waiting_lock`` held, inside the gate). One
        that fails is served unannounced: its failure is logged, raised only for ``own`` (the
        caller's request), never into another's announce."""
        while self._unannounced and len(self._waiting) < self.config.server.max_announced:
            announced = next(iter(self._unannounced))
            del self._unannounced[announced]
            self._waiting[announced] = None
            try:
                for layer, ids in announced.batch.row_ids.items():
                    store = self.stores[self.config.table_name(layer)]
                    try:
                        queued = store.announce(ids)
                    except StoreClosedError:  # a reload could not reopen it: the answer's
                        continue  # lookup says so (503 "closed"); announcing is advice
                    announced.queued.append((store, queued))
            except BaseException as exc:
                self._waiting.pop(announced, None)
                self._withdraw(announced)
                if announced is own or not isinstance(exc, Exception):
                    raise
                log.exception("announcing a waiting request failed; it is served unannounced")

    @staticmethod
    def _withdraw(announced: Announced) -> None:
        """Release ``announced``'s rows from every table told (``_waiting_lock`` held)."""
        while announced.queued:
            store, request = announced.queued.pop()
            store.release(request)

    def _announce_again(self, reopened: dict[TieredStore, TieredStore]) -> None:
        """Tell the stores a reload opened (``reopened``: old store -> new, the old ones still in
        ``stores``) about the requests still waiting, in the order they were announced (the new
        stores start with no queue), those that skipped an old store left closed too. A new
        store that fails one (out of memory beside the old) is logged once and told none after
        it (announcing is advice: they are served unannounced there; those told before it stay
        announced, released as usual); the swap goes on."""
        failed: set[TieredStore] = set()
        with self._waiting_lock:
            for announced in self._waiting:
                for layer, ids in announced.batch.row_ids.items():
                    name = self.config.table_name(layer)
                    old = self.stores[name]
                    if old not in reopened:
                        continue
                    at = next((i for i, (s, _) in enumerate(announced.queued) if s is old), None)
                    if at is not None:  # the old store closes: nothing to release there
                        del announced.queued[at]
                    if old in failed:
                        continue
                    try:
                        announced.queued.append((reopened[old], reopened[old].announce(ids)))
                    except Exception:  # noqa: BLE001 (advice: served unannounced there)
                        failed.add(old)
                        log.exception(
                            "announcing the waiting requests to %s's new version failed; they "
                            "are served unannounced there",
                            name,
                        )

    def _prefetch(self, ids: torch.Tensor, hashed: EngramBatch | None) -> EngramBatch:
        """Hash (unless ``hashed``) and prefetch every layer's rows; over sharded tables, every
        rank joins."""
        if self.control is not None:
            try:
                self.control.announce()
            except RuntimeError as exc:  # a rank gone, or hung: every table is unavailable
                raise self._rank_failed(exc) from exc
        return self.model.prefetch(ids) if hashed is None else self.model.fetch(hashed)

    def _rank_failed(self, cause: RuntimeError) -> TableUnavailableError:
        """A failed announcement as every table's failed lookup (counted, in /healthz), the
        failed rank named by the first store's heartbeats (once: later ones repeat it)."""
        if not isinstance(cause, RankFailureError):  # later announcements raise this one
            first = next(iter(self.stores.values()))
            cause = first.failure("request announcement", error_text(cause))
            self.control.failure = cause
        errors = [self.model.tables[layer].failed("rank", cause) for layer in self.layer_ids]
        return errors[0]

    @staticmethod
    def served_file(store: Any) -> Path:
        """The file a store reads now: its table's current version, or its shard's (on this rank)."""
        return Path(store.cold.path)

    def stats(self) -> dict[str, Any]:
        """Every store's ``stats()`` by table name."""
        return {name: store.stats() for name, store in self.stores.items()}

    def geometry(self) -> dict[str, dict[str, Any]]:
        """Rows, width, dtype and row bytes of each table, and its file's name."""
        return {
            name: {
                "rows": store.rows,
                "dim": store.dim,
                "dtype": str(store.dtype).removeprefix("torch."),
                "row_bytes": store.row_bytes,
                "file": store.cold.path.name,
            }
            for name, store in self.stores.items()
        }

    def start_scrub(self, stop: threading.Event) -> threading.Thread:
        """A thread re-verifying every table this process serves (its shards, on a rank) every
        ``checkpoint.scrub_interval_s`` seconds, reading at most ``checkpoint.scrub_bytes_per_s``
        a second, until ``stop``; started. A table whose last pass
        failed is verified again within a second once a reload reopened it on another file (before
        the pass ended, or after), and so is one a pass gave no verdict on (being made anew),
        or one whose pass raised something unexpected (``SCRUB_RETRIES`` times in a row at most).
        Over sharded tables the other ranks publish their failed passes, and rank 0 reads them
        (``watch_ranks``)."""
        interval = self.config.checkpoint.scrub_interval_s
        rate = self.config.checkpoint.scrub_rate

        def scrub() -> None:
            due = time.monotonic() + interval
            tries: dict[str, int] = {}  # a table's passes in a row that raised
            while not stop.wait(min(max(due - time.monotonic(), 0.0), RELOAD_CHECK_SECONDS)):
                with self._scrub_again_lock:
                    names, self._scrub_again = self._scrub_again, set()
                if time.monotonic() >= due:
                    names = None  # every table
                elif not names:
                    continue
                try:
                    failed = self.verify_tables(names, stop, rate)
                    if self.control is not None and self.control.rank != 0:  # rank 0's /healthz
                        self.control.health.publish(
                            {n: h.last_error for n, h in self.health.items() if h.last_error}
                        )
                except Exception:  # never the end of scrubbing: the next pass may succeed
                    log.exception("checksum pass failed")
                    self._scrub_again_after(set(self.health) if names is None else names, tries)
                    continue
                finally:
                    if names is None:  # the interval runs from the end of a whole pass
                        due = time.monotonic() + interval
                for name in failed:
                    log.error(
                        "checksum pass over %s failed: %s", name, self.health[name].last_error
                    )
                for name in self.health if names is None else names:
                    tries.pop(name, None)

        thread = threading.Thread(target=scrub, name="tiered-store-checksum-scrub", daemon=True)
        thread.start()
        return thread

    def watch_versions(self, stop: threading.Event) -> threading.Thread:
        """A thread checking for new table versions every ``reload_check_seconds`` until
        ``stop``, requests or not: an idle server reopens too (its stores' pinned commits kept
        every page a trainer freed since, and the delta grew with each commit); started. The
        requests then check no more: none waits for a reload (the open, the swap, the old stores'
        close)."""
        self._watched = True

        def watch() -> None:
            while not stop.wait(self.reload_check_seconds):
                try:
                    self.reload_if_stale()
                except Exception:  # noqa: BLE001 (the next check may succeed; requests go on)
                    log.exception("checking the tables for a new version failed")

        thread = threading.Thread(target=watch, name="tiered-store-version-watch", daemon=True)
        thread.start()
        return thread

    def watch_ranks(self, stop: threading.Event) -> threading.Thread:
        """Rank 0 over sharded tables: a thread reading, until ``stop``, the other ranks'
        checksum passes and whether each still beats, once a heartbeat (a rank that died or hung
        between requests is in ``/healthz`` within about four heartbeats)."""
        first = next(iter(self.stores.values()))
        every = min(first.heartbeat_s, 5.0)
        if self.config.checkpoint.scrub_interval_s > 0:
            every = min(every, self.config.checkpoint.scrub_interval_s)
        return self.control.health.watch(every, stop, first.stopped_ranks)

    def rank_failure(self) -> str | None:
        """Over sharded tables: the failed round that makes every request fail from now on (a
        rank died or hung, or the ranks fell out of step), until the ranks are restarted."""
        if self.control is None:
            return None
        failed = [self.control.failure, *(store.failed for store in self.stores.values())]
        return next((error_text(f) for f in failed if f is not None), None)

    def verify_tables(
        self,
        names: set[str] | None = None,
        stop: threading.Event | None = None,
        bytes_per_s: float | None = None,
    ) -> list[str]:
        """One checksum pass over every table (or those in ``names``), counted in ``health``,
        reading at most ``bytes_per_s`` a second (None: no limit); the tables that failed. Once ``stop`` is set the pass ends at its next read, the table
        being read and those after it not counted. One that failed over a file a reload
        replaced meanwhile is checked again by the scrubber (that verdict was on a file no
        longer served); one whose path names a file it does not serve (made anew, not reopened
        on it: refused, or not yet), or that was being made anew throughout the pass
        (``TableChangingError``), has no verdict, and the scrubber tries it again within a
        second."""
        failed = []
        for layer in self.layer_ids:
            name = self.config.table_name(layer)
            if names is not None and name not in names:
                continue
            store = self.stores[name]
            if store.cold.replaced():  # the old file is served: the new one is the reload's to
                self._scrub_soon(name)  # judge (a refused version is a warning)
                continue
            try:
                report = verify_counted(
                    self.served_file(store), self.health[name], stop, bytes_per_s
                )
            except VerifyStopped:
                break
            except TableChangingError:  # being made anew meanwhile: no verdict yet
                self._scrub_soon(name)
                continue
            if report is None:
                failed.append(name)
                now = self.stores[name]
                if now is not store and _another_file(store, now):
                    self._scrub_soon(name)
        return failed

    def _scrub_again_after(self, names: set[str], tries: dict[str, int]) -> None:
        """After a pass over ``names`` that raised something unexpected: each is checked again
        within a second, ``SCRUB_RETRIES`` times in a row at most (``tries`` counts them), then
        left to the next whole pass (one failing for good is not run every second)."""
        given_up = []
        for name in sorted(names):
            tries[name] = tries.get(name, 0) + 1
            if tries[name] <= SCRUB_RETRIES:
                self._scrub_soon(name)
            else:
                del tries[name]
                given_up.append(name)
        if given_up:
            log.error(
                "checksum pass over %s raised %d times in a row; left to the next whole pass "
                "(checkpoint.scrub_interval_s: %g s)",
                ", ".join(given_up),
                1 + SCRUB_RETRIES,
                self.config.checkpoint.scrub_interval_s,
            )

    def _scrub_soon(self, name: str) -> None:
        """Have the scrubber check table ``name`` within a second (its last verdict, or none,
        was not on the file served now)."""
        with self._scrub_again_lock:
            self._scrub_again.add(name)

    def close(self, *, wait_s: float | None = None) -> None:
        """Wait for the answers in flight (at most ``server.request_timeout_s``: a worker hung on
        a read never ends), then close the trace (written atomically) and every store;
        idempotent. ``wait_s``: wait at most this long in all (a stop's budget), the stores'
        close for their calls under way included (a store whose read hangs is left to close
        under it, with no warm-restart save: ``TieredStore.close``; its table is then in
        ``left_closing``)."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        self._closing.set()  # a reload under way ends at its open under way
        with self._reloading:  # a reload under way ends first; none starts after
            self._closed = True
        bound = self.config.server.request_timeout_s
        if deadline is not None:
            bound = min(bound, seconds_left(deadline))
        # a worker the drain gave up on still computes: its lookups would find the stores closed
        with self._gate.exclusive(timeout=bound) as running:  # (counted, logged as failed)
            if running:
                log.warning(
                    "closing the tables with %d answer(s) still running %g s after the close "
                    "began (server.request_timeout_s, or what the stop had left): their lookups "
                    "fail",
                    running,
                    bound,
                )
            self._close(deadline)

    def _close(self, deadline: float | None = None) -> None:
        """``close`` once no answer is in flight; the stores wait for their calls under way
        until ``deadline`` (``time.monotonic()``; None: until they end). The trace's close
        failing (a full disk) is raised once the stores closed too."""
        with self._trace_lock:  # not _submit_lock: a worker may hold it, hung in a prefetch
            trace, self._trace = self._trace, None
        try:
            if trace is not None:
                trace.close()
                for layer, config in zip(self.layer_ids, self._replay_configs, strict=True):
                    name = self.config.table_name(layer)
                    log.info("recorded %s; replay: tiered-store replay %s %s --table %s",
                             trace.path, config, trace.path, name)  # fmt: skip
        finally:
            self._close_stores(deadline)

    def _close_stores(self, deadline: float | None) -> None:
        """``_close``'s end: rank 0 tells the other ranks to stop, then every store closes,
        waiting for its calls under way until ``deadline`` (None: until they end; a sharded
        store at most its ``sharding.timeout_s``), each ``CLOSE_GRACE_S`` at least (one hung for
        good before it does not take all its wait); one that left calls under way is in
        ``left_closing``."""
        control, self.control = getattr(self, "control", None), None
        if control is not None and control.rank == 0:
            try:
                control.announce(STOP)
            except Exception as exc:  # a rank died: the others exit on their own
                log.warning("could not tell the other ranks to stop: %s", exc)
        try:
            for name, store in self.stores.items():
                self._close_or_leave(name, store, _close_wait(deadline))
        finally:
            self.model.close()  # the others; those closed above return at once


class RequestGate:
    """Requests pass together (``shared``); a table swap passes alone (``exclusive``: waits for
    the requests in flight, and holds new ones back until it is done)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: set[int] = set()  # the passages in flight, by number
        self._numbers = itertools.count()
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """One request's passage."""
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            number = next(self._numbers)
            self._active.add(number)
        try:
            yield
        finally:
            with self._cond:
                self._active.discard(number)
                self._cond.notify_all()

    def in_flight(self) -> frozenset[int]:
        """The numbers of the passages in flight now (each passage has its own)."""
        with self._cond:
            return frozenset(self._active)

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[int]:
        """The swap's passage; the requests still in flight (0 unless ``timeout`` seconds passed
        first: it goes on with them)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            try:
                self._cond.wait_for(lambda: not self._active, timeout)
            except BaseException:  # Ctrl-C: requests pass again
                self._exclusive = False
                self._cond.notify_all()
                raise
            running = len(self._active)
        try:
            yield running
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _another_file(old: Any, new: Any) -> bool:
    """Whether store ``new``, reopened over ``old``, reads another file (a new version, a table
    made anew), not the same one after a writer's commit: told apart by identity, not by path
    (one made anew after ``new`` opened leaves it on ``old``'s file)."""
    return not old.cold.same_file(new.cold)


def _log_left_closed(failed: dict[str, str], skip: str | None = None) -> None:
    """Log each table of ``failed`` (name -> why its reopen failed) as left closed, but one whose
    error holds ``skip`` (said already)."""
    for name, error in failed.items():
        if skip is None or skip not in error:
            log.error("could not reopen %s, left closed (its lookups answer 503): %s", name, error)


def _close_all(stores: dict[str, TieredStore]) -> None:
    """Close every one of ``stores`` (table name -> a new store a reload does not serve), though
    a close raised (``_close_each``: it would stand in for a Ctrl-C under way, or fail the
    check)."""
    _close_each(stores, lambda name, store: store.close(), "new store (not served)")


def _close_each(
    stores: dict[str, TieredStore], close: Callable[[str, TieredStore], None], what: str
) -> None:
    """``close(name, store)`` for every one of ``stores`` (table name -> its ``what``), though
    one raised: an error is logged, a Ctrl-C raised once the others closed too."""
    interrupted: BaseException | None = None
    for name, store in stores.items():
        try:
            close(name, store)
        except Exception as exc:  # noqa: BLE001 (not served: the others close, the check goes on)
            log.error("closing %s's %s failed: %s", name, what, error_text(exc))
        except BaseException as exc:  # noqa: BLE001 (raised below)
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _close_wait(deadline: float | None) -> float | None:
    """How long a store's close waits for its calls under way: until ``deadline``
    (``time.monotonic()``; None: until they end), ``CLOSE_GRACE_S`` at least."""
    return None if deadline is None else max(seconds_left(deadline), CLOSE_GRACE_S)


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """(st_dev, st_ino, st_size, st_mtime_ns) of ``path``; None when no file is there."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _cpu32(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous float32 CPU copy (or view) of ``tensor``."""
    return tensor.detach().to("cpu", torch.float32).contiguous()


def tensor_summary(tensor: torch.Tensor) -> dict[str, float]:
    """Mean and RMS of a CPU float32 tensor, the same whatever the thread count (float64
    pairwise sums in numpy; torch's float32 reductions split by thread and round differently)."""
    values = tensor.numpy().astype(np.float64).ravel()
    return {"mean": float(values.mean()), "rms": float(np.sqrt(np.square(values).mean()))}


def _crc(tensor: torch.Tensor) -> str:
    """``crc32:xxxxxxxx`` of a CPU float32 tensor's little-endian bytes in C order."""
    return f"crc32:{zlib.crc32(tensor.numpy().astype('<f4', copy=False).tobytes()):08x}"

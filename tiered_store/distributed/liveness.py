"""Which rank failed: heartbeats through the process group's key-value store.

Every rank's ``Heartbeat`` thread writes ``"<beat> <collectives entered> <state> <kind>"`` under
its rank every ``interval`` seconds, on its own connection to the group's store. When a collective
fails or times out, ``diagnose`` reads every rank's entry twice, ``3 * interval`` apart: a rank
whose beat did not move is dead or hung; a live rank that has entered fewer collectives than this
one has not called the round (a lookup, write, commit or training step) the others wait in; one
that entered as many, but of another kind (a training step where this rank looks up), called
another collective; one in the same round whose state is ``serving`` at both readings has not
finished its own shard's part of it (a read or write that hangs; a store's open, before its first
round: the opening of its shard). A store that cannot be reached means its host is gone: rank 0
(``tcp://`` or ``env://`` rendezvous), or torchrun's agent.

The heartbeats of a process write on one connection (``shared_connection``), made once: torch
looks the peer's name up at both ends of every new connection to the store (a reverse DNS query
for a numeric address too), and a query the resolver loses costs its 5 s timeout, on the store
host's one serving thread as well; opened in a store's ``__init__``, that many seconds could go to
the first collective round of a store, past a short ``sharding.timeout_s``.

A beat whose write failed reconnects at the next beat, once a plain socket reaches the store's
host: torch writes every failed connect and write to stderr with its C++ stack (kilobytes, with no
Python call to silence it), so a follower outliving rank 0 logged that every beat; it logs one
line when its beats start failing and one when they reach the store again.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

__all__ = ["Diagnosis", "Heartbeat", "ranks_named", "shared_connection"]

log = logging.getLogger("tiered_store.distributed")

# use -> (the store, weakly: a store kept alive would keep rank 0's host listening; the
# connection)
_SHARED: dict[str, tuple[weakref.ref, dist.Store]] = {}
_SHARED_LOCK = threading.Lock()
_CLONING = threading.Lock()  # a diagnosis template's timeout is set for one clone at a time


def shared_connection(store: dist.Store, use: str = "heartbeats") -> dist.Store:
    """This process's connection to ``store``'s host for ``use``: ``"heartbeats"``, written on
    (1 s timeout), or ``"diagnosis"``, never read or written, what ``Heartbeat.diagnose`` and
    ``stopped`` clone theirs from. Made on the first call for ``store`` and ``use``, the same
    one after (a new ``store`` replaces it)."""
    with _SHARED_LOCK:
        made = _SHARED.get(use)
        if made is None or made[0]() is not store:
            connection = store.clone()
            connection.set_timeout(timedelta(seconds=1.0))  # at most any heartbeat's own
            _SHARED[use] = (weakref.ref(store), connection)
        return _SHARED[use][1]


@dataclass(frozen=True)
class Diagnosis:
    """What ``Heartbeat.diagnose`` found: silent ranks, ranks behind, or the store unreachable."""

    silent: tuple[int, ...] = ()
    closed: tuple[int, ...] = ()  # ranks that closed their store
    behind: tuple[tuple[int, int], ...] = ()  # (rank, collective rounds it entered, any kind)
    elsewhere: tuple[tuple[int, str], ...] = ()  # (rank, the kind of round it is in)
    serving: tuple[int, ...] = ()  # ranks in this round whose own shard's part has not returned
    kind: str = ""  # the kind of round this rank is in
    store_error: str | None = None

    def describe(self, seconds: float) -> str:
        """A sentence naming the failed ranks."""
        parts = []
        if self.store_error is not None:
            parts.append(
                "the process group's store (hosted by rank 0, or by torchrun's agent) is "
                f"unreachable ({self.store_error}): rank 0 died or its host is down"
            )
        if self.silent:
            silent = ranks_named(self.silent)
            parts.append(f"{silent} stopped: no heartbeat for {seconds:.1f} s (died or hung)")
        if self.closed:
            their = "its store" if len(self.closed) == 1 else "their stores"
            parts.append(f"{ranks_named(self.closed)} closed {their}")
        now = f", which is in {_a(self.kind)}" if self.kind else ""
        for rank, entered in self.behind:  # every kind of round counts
            parts.append(
                f"rank {rank} is alive but has entered only {entered} collective round(s), fewer "
                f"than this rank{now}: rank {rank} is not calling lookup/prefetch, write, commit "
                "and training steps as often as the others"
            )
        for rank, kind in self.elsewhere:
            parts.append(
                f"rank {rank} is in {_a(kind)} round where this rank is in {_a(self.kind)} one: "
                "every rank must call lookup/prefetch, write, commit and training steps in the "
                "same order"
            )
        for rank in self.serving:
            parts.append(
                f"rank {rank} has not finished its own shard's part of the {self.kind} (alive and "
                "in the round: a read or write of its shard does not return, as on a disk or file "
                "system that hangs)"
            )
        return "; ".join(parts) or "no rank was found silent or behind"


class Heartbeat:
    """Publish this rank's liveness and progress; name the ranks that stopped."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        interval: float,
        connection: dist.Store | None = None,
        diagnose_from: dist.Store | None = None,
        connect_timeout: float = 0.0,
        *,
        kind: str = "none",
    ) -> None:
        """``connection``: ``store`` over a connection already made (``shared_connection``, with
        ``store``'s prefix) to write on; default: a new one. ``diagnose_from``: ``store`` over
        the ``"diagnosis"`` connection, which ``diagnose`` and ``stopped`` clone theirs from, to
        connect within ``connect_timeout`` seconds; default: ``store``, within the group store's
        timeout (on a group made with torch's default, a rank whose store host died waited 30
        minutes to say so). ``kind``: what the rank does before its first round (a store's
        ``open``)."""
        self.rank, self.world, self.interval = rank, world, interval
        # (collectives this rank has entered, the kind of the last one: lookup, write, commit,
        # update, whether it is in its own shard's part of that round): set by the store's
        # thread as one tuple, so that a beat never pairs a new count with the old kind
        self._progress: tuple[int, str, bool] = (0, kind, False)
        self._timeout = timedelta(seconds=max(2 * interval, 1.0))
        self._group_store = store
        self._diagnose_from, self._connect_timeout = diagnose_from, connect_timeout
        # its own connection: safe beside the group's own use; the beat's reconnects are cloned
        # from it, so they connect within this class's timeout (not the group store's: one to a
        # gone host then outlasted ``stop``'s wait, and returned into an exiting interpreter)
        self._store = self._connect(store) if connection is None else connection
        self._broken = False  # the last write on ``_store`` failed: a new connection first
        self._beat = 0
        self._stop = threading.Event()
        self._watch: dist.Store | None = None  # ``stopped``'s own connection, once it reads
        self._seen: dict[int, tuple[tuple | None, float]] = {}  # rank -> entry, when it changed
        self._publish()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)
        self._thread.start()

    @property
    def entered(self) -> int:
        """Collectives this rank has entered."""
        return self._progress[0]

    @property
    def kind(self) -> str:
        """The kind of the last one: lookup, write, commit, update (before the first: ``kind``)."""
        return self._progress[1]

    @property
    def serving(self) -> bool:
        """In its own shard's part of that round."""
        return self._progress[2]

    def _publish(self, state: str | None = None) -> None:
        """Write this rank's entry once (its state: ``open``, or ``serving`` in its own shard's
        part of a round, unless given)."""
        entered, kind, serving = self._progress  # one read: the fields of one moment
        state = state or ("serving" if serving else "open")
        self._beat += 1
        self._store.set(f"hb/{self.rank}", f"{self._beat} {entered} {state} {kind}")

    def enter(self, kind: str) -> None:
        """This rank enters one more collective round, of ``kind`` (the store's thread)."""
        entered, _, serving = self._progress
        self._progress = (entered + 1, kind, serving)

    @contextlib.contextmanager
    def own_part(self) -> Iterator[None]:
        """This rank is in its own shard's part of the round (the store's thread): a diagnosis
        meanwhile names it as not finished (a read that hangs), not "no rank was found"."""
        self._progress = (*self._progress[:2], True)
        try:
            yield
        finally:
            self._progress = (*self._progress[:2], False)

    def _run(self) -> None:
        """Beat until stopped. A write that fails (a timeout, the store's host gone) is tried
        again at the next beat on a new connection: a live rank that stopped beating would be
        reported as dead. One log line when the beats start failing, one when they recover."""
        failing_since, failed = 0.0, 0
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except Exception as exc:  # noqa: BLE001 (the store's host died or hung: diagnose says so)
                if self._stop.is_set():
                    return
                failed += 1
                if failed == 1:
                    failing_since = time.monotonic()
                    log.warning(
                        "rank %d: its heartbeat cannot reach the process group's store (%s); "
                        "trying again every %.1f s",
                        self.rank,
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                        self.interval,
                    )
                continue
            if failed:
                log.warning(
                    "rank %d: its heartbeat reaches the process group's store again, after %.1f s "
                    "(%d beat(s) failed)",
                    self.rank,
                    time.monotonic() - failing_since,
                    failed,
                )
                failed = 0

    def _write(self) -> None:
        """Write this rank's entry; after a failed write, on a new connection (a timed-out one
        may hold a late reply), made only once a plain socket reaches the store's host."""
        if self._broken:
            _check_reachable(self._store, self._timeout.total_seconds())
            self._store = self._connect(self._store)
            self._broken = False
        try:
            self._publish()
        except Exception:
            self._broken = True
            raise

    def _read(self, store: dist.Store) -> dict[int, tuple[int, int, str, str]]:
        """Every other rank's (beat, entered, state, kind); ranks without an entry are missing.
        Two round trips to the store when every rank has one (the check, the read)."""
        others = [r for r in range(self.world) if r != self.rank]
        missing = _without_entry(store, others)
        present = [r for r in others if r not in missing]
        out = {}
        values = store.multi_get([f"hb/{r}" for r in present]) if present else []
        for rank, value in zip(present, values, strict=True):
            beat, entered, state, kind = value.decode().split()
            out[rank] = (int(beat), int(entered), state, kind)
        return out

    def diagnose(self) -> Diagnosis:
        """Read the others' heartbeats twice, ``3 * interval`` apart, and name who failed."""
        try:
            store = self._diagnosis_connection()
            first = self._read(store)
            time.sleep(3 * self.interval)
            second = self._read(store)
        except Exception as exc:
            return Diagnosis(store_error=str(exc).splitlines()[0][:200])
        entered, kind, in_part = self._progress  # this rank's, of one moment
        others = [r for r in range(self.world) if r != self.rank]
        closed = tuple(r for r in others if r in second and second[r][2] == "closed")
        silent = tuple(
            r for r in others if r not in closed and (r not in second or first.get(r) == second[r])
        )
        behind = tuple(
            (r, second[r][1])
            for r in others
            if r not in silent and r not in closed and second[r][1] < entered
        )
        elsewhere = tuple(
            (r, second[r][3])
            for r in others
            if r not in silent
            and r not in closed
            and second[r][1] == entered
            and second[r][3] != kind
        )
        serving = tuple(  # at both readings: one whose part began between them may be healthy
            r
            for r in others
            if r not in silent
            and r not in closed
            and r in first
            and first[r][1:] == second[r][1:] == (entered, "serving", kind)
        )
        return Diagnosis(
            silent=silent,
            closed=closed,
            behind=behind,
            elsewhere=elsewhere,
            kind=kind,
            serving=(*serving, self.rank) if in_part else serving,
        )

    def absent(self, wait_s: float) -> tuple[int, ...]:
        """The other ranks that have written no entry within ``wait_s`` seconds (read on the
        group's store every interval): they never came to where this heartbeat started. ``()``
        (none named) when the store cannot be read (what then fails names it)."""
        deadline = time.monotonic() + wait_s
        missing = tuple(r for r in range(self.world) if r != self.rank)
        while True:
            try:  # those come since the last reading stay: their entries are never removed
                missing = _without_entry(self._group_store, missing)
            except Exception:  # noqa: BLE001 (its host gone or hung: the next round's diagnosis)
                return ()
            left = deadline - time.monotonic()
            if not missing or left <= 0:
                return missing
            time.sleep(min(self.interval, left))

    def _connect(self, source: dist.Store) -> dist.Store:
        """A new connection to the group's store, cloned from ``source`` (its connect waits the
        source's timeout: this heartbeat's own is short, the group store's long enough for a
        busy host, which diagnose needs to tell a dead host from a slow one), with this class's
        timeout for what it then reads and writes."""
        store = source.clone()
        store.set_timeout(self._timeout)
        return store

    def _diagnosis_connection(self) -> dist.Store:
        """A new connection for ``diagnose`` or ``stopped``, connecting within the group store's
        timeout or, given a ``diagnose_from`` template, within ``connect_timeout``."""
        if self._diagnose_from is None:
            return self._connect(self._group_store)
        with _CLONING:
            self._diagnose_from.set_timeout(timedelta(seconds=self._connect_timeout))
            return self._connect(self._diagnose_from)

    def stopped(self) -> str | None:
        """Between rounds (rank 0's health watch, every few seconds): a sentence naming the other
        ranks whose entry has not moved for ``3 * interval`` (died or hung while idle) or that
        closed their store; None when every one beats."""
        now = time.monotonic()
        try:
            if self._watch is None:  # a new connection once a plain socket reaches the host: to a
                # gone one torch's connect tries twice, 2-3 x ``connect_timeout`` (rank 0's stop
                # waits for its watch far less), writing its C++ stack to stderr each time
                _check_reachable(
                    self._diagnose_from or self._group_store, self._timeout.total_seconds()
                )
            self._watch = self._watch or self._diagnosis_connection()
            entries = self._read(self._watch)
        except Exception as exc:  # the store's host is gone or hung: a new connection next time
            self._watch = None
            return Diagnosis(store_error=str(exc).splitlines()[0][:200]).describe(0)
        others = [r for r in range(self.world) if r != self.rank]
        for rank in others:
            entry = entries.get(rank)
            if rank not in self._seen or self._seen[rank][0] != entry:
                self._seen[rank] = (entry, now)
        closed = tuple(r for r in others if entries.get(r, (0, 0, ""))[2] == "closed")
        ages = {r: now - self._seen[r][1] for r in others if r not in closed}
        silent = tuple(r for r, age in ages.items() if age > 3 * self.interval)
        if not silent and not closed:
            return None
        return Diagnosis(silent=silent, closed=closed).describe(
            max((ages[r] for r in silent), default=0.0)
        )

    def stop(self) -> None:
        """Stop beating; the entry stays as last written. Waits out a beat under way: a probe of
        the host, a reconnect and a write, within the timeout each (torch's connect tries twice; a
        thread left in the store's C++ code aborts the process if that call returns while the
        interpreter exits)."""
        self._stop.set()
        self._thread.join(self.interval + 4 * self._timeout.total_seconds() + 1.0)

    def close(self) -> None:
        """Stop beating and mark this rank closed (so it is not reported as dead), on the beat's
        connection once its last write went through: never a new one here (torch's connect waits
        for its handshake's answer with no timeout, for good on a host that accepts and never
        answers; a beat stuck so is left behind by ``stop``)."""
        self.stop()
        if self._broken or self._thread.is_alive():
            return
        with contextlib.suppress(Exception):  # the store is gone already
            self._publish("closed")


def _without_entry(store: dist.Store, ranks: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Those of ``ranks`` with no heartbeat entry in ``store``: one round trip to it when every
    one has one (torch's ``check`` of several keys says whether all are there), else one more
    per rank."""
    keys = [f"hb/{r}" for r in ranks]
    if not keys or store.check(keys):
        return ()
    return tuple(r for r, key in zip(ranks, keys, strict=True) if not store.check([key]))


def _check_reachable(store: dist.Store, timeout: float) -> None:
    """Raise ``OSError`` unless the host of ``store`` (a ``TCPStore``, maybe under prefixes; any
    other kind passes) accepts a plain connection within ``timeout`` seconds: torch's own connect
    to a gone host writes its C++ stack to stderr for each try."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if isinstance(store, dist.TCPStore):
        socket.create_connection((store.host, store.port), timeout=timeout).close()


def ranks_named(ranks: tuple[int, ...] | list[int]) -> str:
    """``rank 1`` or ``ranks 0, 2``.

    >>> ranks_named([1]), ranks_named((0, 2))
    ('rank 1', 'ranks 0, 2')
    """
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _a(kind: str) -> str:
    """``kind`` with its article: "a lookup", "an update"."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"

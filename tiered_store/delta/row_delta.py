"""A table's write delta: an LMDB environment beside the immutable base table.

``TABLE.npy.delta/`` holds every row written since the base table was made: key = the row id
(8 bytes big-endian, so LMDB's key order is row order), value = a 24-byte header (CRC32C, row
bytes, commit step, row id) followed by the row as stored (optimizer state included for trained
tables). One write transaction per commit writes all of a commit's rows and the step number
(``meta`` database) together, so a commit is all or nothing; the environment runs with
``sync=True, metasync=True`` so the transaction is on disk when ``commit`` returns. A sharded
store commits in two phases: ``stage`` puts a commit's records in the ``staged`` database (and
its step in ``meta``) without touching the committed rows, ``commit_staged`` moves them into
``rows`` and sets the step in one transaction, ``drop_staged`` discards them. Every read
recomputes the per-row CRC32C (one compiled call per batch) and raises ``DeltaCorruptError`` on a
mismatch. The knobs and why: docs/design.md#writes-and-the-lmdb-delta.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from ..atomic_file import fsync_dir
from ..errors import CommitError, ConfigError, DeltaCorruptError, TableFormatError, TierIOError
from ..page_checksums import crc32c_pages
from ..process_locks import open_held, release

__all__ = [
    "RowDelta",
    "committed_step",
    "delta_path",
    "open_delta",
    "refuse_staged",
    "remove_delta_temporaries",
    "HEADER_BYTES",
]

HEADER = np.dtype([("crc", "<u4"), ("width", "<u4"), ("step", "<i8"), ("row", "<i8")])
HEADER_BYTES = HEADER.itemsize  # 24
# address space, not disk (writemap is off: the file grows as pages are used). Large, so that a map
# never grows while a store elsewhere holds an older commit (growing it ends such views)
MIN_MAP_BYTES = 64 << 30
GREW_STEP = 2**63 - 1  # latest_step() when another process grew the map: later than any step
# LMDB's two meta pages, of 4 KiB (the smallest pages it uses): a data file shorter holds no commit
META_PAGES_BYTES = 2 * 4096
MAX_READERS = 512  # reader slots: one per reading thread of every process (serving threads, tests)
LOCK_FILE_BYTES = 128 + MAX_READERS * 64  # LMDB's lock file: a header, a 64-byte slot per reader
GROW_ATTEMPTS = 8  # a commit that fills the map doubles it and retries this many times at most
STAGED_DB = b"staged"  # a sharded commit's first phase: records put aside, not yet committed
STAGED_STEP_KEY = b"staged_step"  # in ``meta``: the step of the staged records (absent: none)
# in ``meta``: the sharded commit round that staged them, bound to their step ("round@step"): a
# release before round ids staged without touching it, so one of another step is not theirs
STAGED_ROUND_KEY = b"staged_round"
_STAGED_ROUND_KEYS = (STAGED_ROUND_KEY, STAGED_STEP_KEY)  # what ``_round_of`` reads
COMMITTED_ROUND_KEY = b"committed_round"  # in ``meta``: the round of the last staged commit
# in ``meta``: an id of its own from each ``commit`` or ``commit_staged`` that rewrote rows at
# the committed step (a redo): readers elsewhere tell it apart from the commit before
# (``RowDelta.mark``), whatever round it had
REDONE_KEY = b"redone"


def delta_path(table_path: str | os.PathLike[str]) -> Path:
    """Where the delta of the table at ``table_path`` lives: ``TABLE.npy.delta/`` beside it.

    Examples
    --------
    >>> delta_path("/data/t.npy").name
    't.npy.delta'
    """
    return Path(f"{os.fspath(table_path)}.delta")


def open_delta(table_path: str | os.PathLike[str], row_bytes: int) -> RowDelta | None:
    """The delta of the table version at ``table_path``, to read; None when it has none: no
    directory, or one a writer of an older version died creating in place (it holds no commit,
    and the next writer replaces it)."""
    path = delta_path(table_path)
    if not path.is_dir():
        return None
    try:
        return RowDelta(path, row_bytes)
    except ConfigError:  # the directory exists, so: never initialised
        return None


def committed_step(table_path: str | os.PathLike[str], row_bytes: int) -> int | None:
    """The step of the last commit to the delta of the version at ``table_path`` (the step the
    version started from, before any); None when it has no delta (see ``open_delta``)."""
    mark = committed_mark(table_path, row_bytes)
    return None if mark is None else mark[0]


def committed_mark(
    table_path: str | os.PathLike[str], row_bytes: int
) -> tuple[int, bytes | None, bytes | None] | None:
    """``RowDelta.latest_mark()`` of the delta of the version at ``table_path``; None when it
    has no delta (see ``open_delta``)."""
    delta = open_delta(table_path, row_bytes)
    if delta is None:
        return None
    try:
        return delta.latest_mark()
    finally:
        delta.close()


def refuse_staged(delta: RowDelta, what: str) -> None:
    """Refuse ``what`` (a compaction, an unshard) of a delta holding staged records: folding the
    committed rows alone would lose or keep a step the shards' decision is pending on."""
    staged = delta.staged_step
    if staged is not None:
        raise TableFormatError(
            f"{what}: {delta.path} holds step {staged} staged by a sharded commit that was "
            "interrupted between its two phases; expected none staged: open the shards with "
            "ShardedStore (on every rank) to finish or drop it, then retry"
        )


class RowDelta:
    """Rows written to a table since its base file was made, in LMDB (single writer, many readers).

    Parameters
    ----------
    path : path-like
        The environment directory (``delta_path(table)``).
    row_bytes : int
        Bytes of one stored row; checked against what the environment recorded when created.
    create : bool
        Create the environment when missing (a writer); otherwise it must exist.
    initial_step : int
        The step a new environment starts at (a compacted version's last step).
    map_bytes : int or None
        Initial map size; default: room for every row of a ``table_rows`` table twice, at least
        64 GiB. A commit that fills it doubles it and retries (``lmdb.MapFullError`` never escapes).

    Examples
    --------
    >>> import tempfile
    >>> d = RowDelta(Path(tempfile.mkdtemp()) / "t.npy.delta", row_bytes=8, create=True)
    >>> d.commit(np.array([5, 2]), np.arange(16, dtype=np.uint8).reshape(2, 8), step=1)
    >>> found, rows = d.read(np.array([2, 3, 5]))
    >>> d.step, found.tolist(), rows[0].tolist(), d.ids().tolist()
    (1, [True, False, True], [8, 9, 10, 11, 12, 13, 14, 15], [2, 5])
    >>> d.close()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        row_bytes: int,
        *,
        create: bool = False,
        table_rows: int = 0,
        map_bytes: int | None = None,
        initial_step: int = 0,
    ) -> None:
        self.path = Path(path)
        self.row_bytes = int(row_bytes)
        self.value_bytes = HEADER_BYTES + self.row_bytes
        self.readonly = False
        self._released = False
        self._pinned: lmdb.Transaction | None = None
        # LMDB: one thread at a time in a transaction. An RLock: a signal handler's close, run
        # on a thread reading through the pinned one, takes it again (the read then fails)
        # rather than waiting for that read for good
        self._pin_lock = threading.RLock()
        self._pid = os.getpid()
        self.commits = 0  # commits made through this handle
        self.map_grows = 0  # times a commit found the map full and doubled it
        self.read_errors = 0  # reads that failed or found a corrupt row
        wanted = map_bytes or max(MIN_MAP_BYTES, 2 * table_rows * (self.value_bytes + 64))
        if create:  # made whole beside it and renamed into place: never half-made at its path
            if not self.path.is_dir() or _half_made(self.path):
                self._create(wanted, initial_step)
            else:  # its name on disk before this writer's first commit: a creator killed
                fsync_dir(self.path.parent)  # between its rename and its fsync left it unsaid
        elif not self.path.is_dir():
            raise ConfigError(f"delta: {self.path} does not exist; expected a table's write delta")
        elif _half_made(self.path):  # a leftover of an older version: holds no commit
            raise ConfigError(
                f"delta: {self.path} was never initialised (a writer died or failed creating "
                "it); expected a table's write delta"
            )
        self._set_up(wanted, create, initial_step)

    def _create(self, map_bytes: int, initial_step: int) -> None:
        """Make the delta in a private directory beside it (``.NAME.<hex>.new``), with its
        databases, row size and first step committed and on disk, then rename it into place:
        readers never see a delta half-made, and a creation that fails removes only its own
        directory. Where another creator got there first, its delta stands and this one goes."""
        remove_delta_temporaries(self.path)  # of creations killed part way
        fd, new = _private_dir(self.path)
        published = False
        try:
            try:
                self._make_whole(new, map_bytes, initial_step)
            except OSError as exc:
                raise TierIOError(
                    exc.errno,
                    f"delta: cannot create {self.path} ({exc.strerror}); expected a writable "
                    f"directory with room for its lock file ({LOCK_FILE_BYTES:,} bytes, LMDB's "
                    "reader table) and first pages",
                ) from None
            except lmdb.Error as exc:
                raise TierIOError(
                    f"delta: cannot create {self.path} ({_write_failure(exc, new)}); expected "
                    "room for its lock file and first pages"
                ) from None
            published = _publish(new, self.path)
            if not published:  # another creator's: its name on disk before this one commits
                fsync_dir(self.path.parent)
        finally:
            if not published:
                shutil.rmtree(new, ignore_errors=True)
            release(fd)  # its lock: a cleanup may take the name now

    def _make_whole(self, directory: Path, map_bytes: int, initial_step: int) -> None:
        """A complete environment in ``directory``: the lock file (space reserved), both
        databases, the row size and ``initial_step`` in one durable transaction; then closed."""
        _reserve_lock_file(directory)
        env = self._lmdb_open(map_bytes, readonly=False, lock=True, path=directory)
        try:
            with env.begin(write=True) as txn:
                env.open_db(b"rows", txn=txn, create=True)
                meta_db = env.open_db(b"meta", txn=txn, create=True)
                txn.put(b"row_bytes", self.row_bytes.to_bytes(8, "little"), db=meta_db)
                txn.put(b"step", _step_bytes(initial_step), db=meta_db)
        finally:
            env.close()
        fsync_dir(directory)  # its files' entries; the transaction itself is synced

    def _set_up(self, wanted: int, create: bool, initial_step: int) -> None:
        """Open the environment and its databases (a writer completes them where an older
        version left them uncreated)."""
        try:
            self._env_key, self.env, self._grow_lock = _shared_env(
                self.path, lambda: self._open(wanted)
            )
        except lmdb.Error as exc:
            raise TierIOError(
                f"delta: cannot open {self.path} ({exc}); expected a writable directory "
                "(or, read-only, an existing delta)"
            ) from None
        try:  # a refused open releases its handle: the environment must not outlive it
            self.readonly = self.env.flags()["readonly"]
            try:
                self._open_dbs(create and not self.readonly, initial_step)
            except lmdb.MapResizedError:
                raise TierIOError(
                    errno.ESTALE,
                    f"delta: {self.path} grew in another process past the map this process has "
                    "open (another store of this table here still holds an older commit); close "
                    "it, then open this one",
                ) from None
            except lmdb.Error as exc:  # a writer's first transaction, say, on a full disk
                raise TierIOError(
                    f"delta: cannot open the databases of {self.path} "
                    f"({_write_failure(exc, self.path)}); expected a delta whose databases open "
                    "(a new one needs room for their first pages)"
                ) from None
            self._check_row_bytes()
        except BaseException:
            _release_env(self._env_key)
            raise

    def _open_dbs(self, initialise: bool, initial_step: int) -> None:
        """Open both databases (a writer creates them first, with ``initial_step``)."""
        if initialise:
            self._initialise(initial_step)
        try:
            with self._grow_lock.shared():
                if self.readonly:
                    self.rows_db = self.env.open_db(b"rows", create=False)
                    self.meta_db = self.env.open_db(b"meta", create=False)
                else:  # in a write transaction of our own: open_db's implicit one waits for the
                    # writer's transaction holding the GIL that writer needs (a deadlock); this one
                    # changes nothing, so its commit writes nothing
                    with self.env.begin(write=True) as txn:
                        self.rows_db = self.env.open_db(b"rows", txn=txn, create=False)
                        self.meta_db = self.env.open_db(b"meta", txn=txn, create=False)
        except lmdb.NotFoundError:
            raise ConfigError(
                f"delta: {self.path} was never initialised (a writer died creating it); "
                "expected a table's write delta"
            ) from None

    def _open(self, map_bytes: int) -> lmdb.Environment:
        """The environment: durable commits, one writer, reader slots tied to threads; read-only
        where this process may not write the delta (see ``_open_read_only``)."""
        self._reserve_lock_file()
        try:
            env = self._lmdb_open(map_bytes, readonly=False, lock=True)
        except lmdb.Error as exc:
            if not _is_permission_error(exc):
                raise
            env = self._open_read_only(map_bytes)
        if not _lock_free(env):
            env.reader_check()  # free the slots of readers killed (kill -9) with a read open
        return env

    def _reserve_lock_file(self) -> None:
        """Reserve the space of LMDB's lock file before an open that may write it, whatever made
        the delta (one copied without its lock file, as ``mdb_copy`` or ``rsync --exclude``
        leave it, has none): on a full disk LMDB's first write to an unreserved one kills the
        process (SIGBUS). Where this process may not write it, ``lmdb.open`` says so."""
        try:
            _reserve_lock_file(self.path)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                return  # read-only (opened so below), or gone: lmdb.open says which
            raise TierIOError(
                exc.errno,
                f"delta: cannot open {self.path}: cannot reserve its lock file "
                f"{self.path / 'lock.mdb'} ({exc.strerror}); expected room for it "
                f"({LOCK_FILE_BYTES:,} bytes, LMDB's reader table)",
            ) from None

    def _open_read_only(self, map_bytes: int) -> lmdb.Environment:
        """Read-only, for a process that may not write the delta: registered in the lock file's
        reader table where it may write that file (the writer then keeps its commit's pages);
        without locks only on a read-only filesystem, where no writer can run."""
        self.readonly = True
        if _read_only_filesystem(self.path):
            return self._lmdb_open(map_bytes, readonly=True, lock=False)
        try:
            return self._lmdb_open(map_bytes, readonly=True, lock=True)
        except lmdb.Error as exc:
            if not _is_permission_error(exc):
                raise
        # unregistered, a writer (another user's, say) would reuse the pages of the commit this
        # reader reads: it would read later rows, or rows that fail their CRC
        data_file, lock_file = self.path / "data.mdb", self.path / "lock.mdb"
        if not os.access(data_file, os.R_OK):
            raise TierIOError(
                errno.EACCES,
                f"delta: {data_file} is not readable by this process (uid {os.getuid()}); "
                "expected read access to it (e.g. a group shared with the writer and g+r)",
            )
        raise TierIOError(
            errno.EACCES,
            f"delta: {lock_file} is not writable by this process (uid {os.getuid()}); readers "
            "register in it so that a writer keeps the pages of the commit they read, so they "
            "need write access to it (e.g. a group shared with the writer and g+w), or serve a "
            "compacted version that has no delta",
        )

    def _lmdb_open(
        self, map_bytes: int, *, readonly: bool, lock: bool, path: Path | None = None
    ) -> lmdb.Environment:
        """``lmdb.open`` with this module's settings, of the delta (or of ``path``)."""
        return lmdb.open(
            str(self.path if path is None else path),
            map_size=map_bytes,
            subdir=True,
            create=False,  # never a directory of its own: a delta is made whole, then renamed in
            readonly=readonly,
            sync=True,  # fsync the data pages at commit: durable on return
            metasync=True,  # ... and the meta page: a power loss keeps the last commit
            writemap=False,  # a stray write through the map cannot corrupt the file
            max_readers=MAX_READERS,
            max_dbs=3,  # rows, meta and (a sharded commit's first phase) staged
            readahead=False,  # random row reads: readahead only evicts other pages
            lock=lock,
            max_spare_txns=0,  # read transactions really commit: a reader's open_db sticks
        )

    # -- queries -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The step of the last commit (0 before any); of the pinned snapshot while pinned."""
        self._check_process()
        try:
            with self._read_txn() as txn:
                return _int_value(txn.get(b"step", db=self.meta_db))
        except lmdb.Error as exc:
            raise self._read_failed("the step of ", exc) from None

    def latest_step(self) -> int:
        """The step of the last commit on disk now, pinned or not; ``GREW_STEP`` when another
        process grew the map, which only commits do (this process reads them once every handle
        of its environment has closed and one reopens)."""
        return self.latest_mark()[0]

    @property
    def mark(self) -> tuple[int, bytes | None, bytes | None]:
        """(step, round of the last ``commit_staged`` as stored, id of the last commit that
        redid its step) of this view's commit, from one transaction: a shard redoing a step
        after a torn commit commits it again under a new round (sharded) and id, so two commits
        whose step is the same differ here; of the pinned snapshot while pinned."""
        self._check_process()
        try:
            with self._read_txn() as txn:
                return self._mark(txn)
        except lmdb.Error as exc:
            raise self._read_failed("the step of ", exc) from None

    def latest_mark(self) -> tuple[int, bytes | None, bytes | None]:
        """``mark`` of the last commit on disk now, pinned or not; ``(GREW_STEP, None, None)``
        when another process grew the map (as ``latest_step``)."""
        self._check_process()
        try:
            with self._txn() as txn:
                return self._mark(txn)
        except lmdb.MapResizedError:
            return GREW_STEP, None, None
        except lmdb.Error as exc:  # no reader slot left, say: named, as ``mark`` names it
            raise self._read_failed("the step of ", exc) from None

    def _mark(self, txn: lmdb.Transaction) -> tuple[int, bytes | None, bytes | None]:
        """``mark`` as ``txn`` reads it."""
        committed, redone = (txn.get(k, db=self.meta_db) for k in (COMMITTED_ROUND_KEY, REDONE_KEY))
        step = _int_value(txn.get(b"step", db=self.meta_db))
        return step, *(None if v is None else bytes(v) for v in (committed, redone))

    def pin(self) -> None:
        """Read one committed version from now on (a long read transaction), whatever commits
        land meanwhile: a read-only store's view stays whole until it is reopened."""
        self._check_process()
        self._check_open()
        if self._pinned is None:
            with self._grow_lock.shared():  # counted before a resize can look: it refuses then
                self._pinned = self.env.begin()
                _count_pin(self._env_key, 1)

    def unpin(self) -> None:
        """Read the newest commit again (a writer's view)."""
        with self._pin_lock:
            pinned, self._pinned = self._pinned, None
        if pinned is not None:
            pinned.abort()
            _count_pin(self._env_key, -1)

    @contextlib.contextmanager
    def _txn(self, **kwargs: Any) -> Iterator[lmdb.Transaction]:
        """A transaction of this environment (``env.begin(**kwargs)``), held from a map resize
        for its whole life: LMDB forbids one while any transaction of the process is open.
        Refused once closed."""
        self._check_open()
        with self._grow_lock.shared(), self.env.begin(**kwargs) as txn:
            yield txn

    @contextlib.contextmanager
    def _read_txn(self):
        """The pinned transaction, or a fresh one for this read (held from a map resize by
        another thread: stats and read_committed read without the store's lock)."""
        with self._pin_lock:
            pinned = self._pinned
            if pinned is not None:
                yield pinned
        if pinned is None:
            with self._txn() as txn:
                yield txn

    def ids(self) -> np.ndarray:
        """Every row id the delta holds, sorted (int64)."""
        self._check_process()
        try:
            with self._read_txn() as txn:
                keys = b"".join(txn.cursor(db=self.rows_db).iternext(keys=True, values=False))
        except lmdb.Error as exc:
            raise self._read_failed("the row ids of ", exc) from None
        return np.frombuffer(keys, dtype=">i8").astype(np.int64)

    def __len__(self) -> int:
        self._check_process()
        with self._txn(db=self.rows_db) as txn:
            return txn.stat(self.rows_db)["entries"]

    def read(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, rows as ``uint8 [n, row_bytes]``) for int64 ``ids``; rows not in the
        delta are left uninitialised. Every row found is CRC-checked."""
        _, found, rows = self.snapshot(ids)
        return found, rows

    def snapshot(self, ids: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """(step, found, rows) for unique ``ids``, from one read transaction: one committed
        version, never a mix."""
        self._check_process()
        ids = np.asarray(ids, dtype=np.int64)
        keys = ids.astype(">i8").view("V8").tolist()
        try:
            with self._read_txn() as txn:
                step = _int_value(txn.get(b"step", db=self.meta_db))
                pairs = txn.cursor(db=self.rows_db).getmulti(keys)
        except lmdb.Error as exc:
            raise self._read_failed("", exc) from None
        found = np.zeros(ids.size, dtype=bool)
        rows = np.empty((ids.size, self.row_bytes), dtype=np.uint8)
        if pairs:
            found_ids = np.frombuffer(b"".join(k for k, _ in pairs), dtype=">i8").astype(np.int64)
            records = self._decode(found_ids, [v for _, v in pairs])
            order = np.argsort(ids, kind="stable")
            pos = order[np.searchsorted(ids, found_ids, sorter=order)]
            found[pos] = True
            rows[pos] = records["payload"]
        return step, found, rows

    def iter_rows(self, chunk_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, rows) in row order, ``chunk_rows`` at a time, from one read transaction."""
        self._check_process()
        with self._txn(db=self.rows_db) as txn:
            cursor = txn.cursor()
            batch: list[tuple[bytes, bytes]] = []
            for pair in cursor.iternext():
                batch.append(pair)
                if len(batch) == chunk_rows:
                    yield self._decode_pairs(batch)
                    batch = []
            if batch:
                yield self._decode_pairs(batch)

    # -- the commit --------------------------------------------------------------------------------
    def commit(self, ids: np.ndarray, rows: np.ndarray, step: int) -> None:
        """Write ``rows`` (``uint8 [n, row_bytes]``) for unique ``ids`` and ``step`` in one durable
        transaction. Raises ``CommitError`` when it cannot, or when the delta holds a sharded
        commit's staged records (committed over, a step the other shards hold would be lost here:
        ``ShardedStore``'s open finishes or drops them); ``ConfigError`` for a step of
        ``GREW_STEP`` or beyond. The previous commit then stands."""
        keys, values, step_bytes = self._records(ids, rows, step, "commit")

        def write(txn: lmdb.Transaction) -> None:
            staged = txn.get(STAGED_STEP_KEY, db=self.meta_db)
            if staged is not None:  # read in the commit's own transaction: no stage slips in
                raise CommitError(
                    f"delta: commit of step {step} to {self.path} refused: it holds step "
                    f"{_int_value(staged)} staged by a sharded commit that was interrupted "
                    "between its two phases (the other shards may hold that step); expected "
                    "none staged: open the shards with ShardedStore (on every rank) to finish or "
                    "drop it, then commit again (the writes are kept)"
                )
            if keys:
                if _int_value(txn.get(b"step", db=self.meta_db)) == step:  # a redo of the step
                    txn.put(REDONE_KEY, uuid.uuid4().bytes, db=self.meta_db)
                txn.cursor(db=self.rows_db).putmulti(zip(keys, values, strict=True))
            txn.put(b"step", step_bytes, db=self.meta_db)

        self._write(f"commit of step {step}", write, len(keys))
        self.commits += 1

    @property
    def staged_step(self) -> int | None:
        """The step ``stage`` put aside and no ``commit_staged`` or ``drop_staged`` ended (a
        sharded commit interrupted between its phases); None when nothing is staged. Of the
        pinned snapshot while pinned, as ``step``."""
        self._check_process()
        try:
            with self._read_txn() as txn:
                raw = txn.get(STAGED_STEP_KEY, db=self.meta_db)
        except lmdb.Error as exc:
            raise self._read_failed("the staged step of ", exc) from None
        return None if raw is None else _int_value(raw)

    @property
    def commit_rounds(self) -> tuple[str | None, str | None]:
        """(the round ``stage`` recorded with the staged records, the round of the last
        ``commit_staged``), each None where none was recorded (a staged round recorded at
        another step than the one staged: none, left by a release before round ids, whose
        ``stage`` kept it); read in one transaction."""
        self._check_process()
        try:
            with self._read_txn() as txn:
                staged = self._staged_round(txn)
                committed = txn.get(COMMITTED_ROUND_KEY, db=self.meta_db)
        except lmdb.Error as exc:
            raise self._read_failed("the commit rounds of ", exc) from None
        return (
            staged,
            None if committed is None else _round_text(committed, COMMITTED_ROUND_KEY, self.path),
        )

    def _staged_round(self, txn: lmdb.Transaction) -> str | None:
        """The round ``stage`` recorded with the staged records, read in ``txn`` (``_round_of``)."""
        return _round_of(*(txn.get(k, db=self.meta_db) for k in _STAGED_ROUND_KEYS), self.path)

    def stage(
        self, ids: np.ndarray, rows: np.ndarray, step: int, round_id: str | None = None
    ) -> None:
        """A sharded commit's first phase: put the records of ``rows`` for unique ``ids`` at
        ``step`` aside (replacing any staged before) in one durable transaction, with the id of
        the sharded commit's round (``round_id``, bound to ``step``: its open decides from it);
        the committed rows and step are untouched, and no reader sees the staged ones.
        ``CommitError`` as ``commit``; the previous commit and what was staged before then
        stand."""
        keys, values, step_bytes = self._records(ids, rows, step, "stage")

        def write(txn: lmdb.Transaction) -> None:
            staged = self._staged_db(txn)
            txn.drop(staged, delete=False)
            if keys:
                txn.cursor(db=staged).putmulti(zip(keys, values, strict=True))
            txn.put(STAGED_STEP_KEY, step_bytes, db=self.meta_db)
            if round_id is None:
                txn.delete(STAGED_ROUND_KEY, db=self.meta_db)
            else:  # bound to the step: a later stage of a release before round ids keeps it
                txn.put(STAGED_ROUND_KEY, f"{round_id}@{step}".encode(), db=self.meta_db)

        self._write(f"staging of step {step}", write, len(keys))

    def commit_staged(self, step: int) -> None:
        """A sharded commit's second phase: move the records staged at ``step`` into the rows and
        make ``step`` the committed step, in one durable transaction. ``CommitError`` when
        nothing or another step is staged, or it cannot write (the staged records then stay
        staged)."""
        self._check_writable(f"commit the staged step {step}")
        staged_step = self._staged_step_now()
        if staged_step != step:
            raise CommitError(
                f"delta: commit of the staged step {step} to {self.path}: "
                f"{'nothing is staged' if staged_step is None else f'step {staged_step} is staged'}"
                f"; expected step {step} staged (by stage)"
            )

        def write(txn: lmdb.Transaction) -> None:
            staged = self._staged_db(txn)
            if (
                txn.stat(staged)["entries"]
                and _int_value(txn.get(b"step", db=self.meta_db)) == step
            ):
                # a redo of the step (as ``commit``'s): its round may be none, or the one before
                txn.put(REDONE_KEY, uuid.uuid4().bytes, db=self.meta_db)
            txn.cursor(db=self.rows_db).putmulti(txn.cursor(db=staged).iternext())
            txn.drop(staged, delete=False)
            round_id = self._staged_round(txn)
            txn.delete(STAGED_STEP_KEY, db=self.meta_db)
            txn.delete(STAGED_ROUND_KEY, db=self.meta_db)
            if round_id is None:
                txn.delete(COMMITTED_ROUND_KEY, db=self.meta_db)
            else:  # the round's other shards read it at their open: this one committed it
                txn.put(COMMITTED_ROUND_KEY, round_id.encode(), db=self.meta_db)
            txn.put(b"step", _step_bytes(step), db=self.meta_db)

        self._write(f"commit of the staged step {step}", write)
        self.commits += 1

    def drop_staged(self) -> None:
        """Discard what ``stage`` put aside (nothing staged: nothing to do), durably."""
        self._check_writable("drop its staged records")
        if self._staged_step_now() is None:
            return

        def write(txn: lmdb.Transaction) -> None:
            txn.drop(self._staged_db(txn), delete=False)
            txn.delete(STAGED_STEP_KEY, db=self.meta_db)
            txn.delete(STAGED_ROUND_KEY, db=self.meta_db)

        self._write("drop of the staged records", write)

    def close(self) -> None:
        """Release the environment (closed with its last handle in this process); idempotent."""
        if os.getpid() == self._pid and not self._released:
            self.unpin()
            self._released = True
            _release_env(self._env_key)

    # -- internals ---------------------------------------------------------------------------------
    def _read_failed(self, what: str, exc: lmdb.Error) -> TierIOError:
        """The error of a read (of ``what``, the delta) that failed with ``exc``: one closed
        under it (a signal handler's close, run inside it) says so, uncounted; else a read
        failure, counted in ``read_errors``."""
        if self._released:
            return TierIOError(
                errno.EBADF,
                f"delta: {self.path} was closed during a read of it; expected it open until the "
                "read ended",
            )
        self.read_errors += 1
        return TierIOError(f"delta: reading {what}{self.path} failed ({exc})")

    def _check_open(self) -> None:
        """Refuse a use of a closed delta (LMDB's own error names no file; a read said the
        delta was closed during it)."""
        if self._released:
            raise TierIOError(
                errno.EBADF, f"delta: {self.path} is closed; expected it open (open it again)"
            )

    def _check_writable(self, what: str) -> None:
        """Refuse a write (``what``) through a read-only handle, or across fork()."""
        self._check_process()
        if self.readonly:
            raise CommitError(
                f"delta: {self.path} is in a read-only directory; expected a writable one to {what}"
            )

    def _records(
        self, ids: np.ndarray, rows: np.ndarray, step: int, what: str
    ) -> tuple[list, list, bytes]:
        """Keys, values and the step's bytes of a batch to ``what`` (commit or stage), checked."""
        self._check_writable(what)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and int(ids.min()) < 0:  # keys sort by their bytes: a negative id sorts last
            raise ValueError(f"delta {what}: id {int(ids.min())}; expected ids >= 0")
        if rows.shape != (ids.size, self.row_bytes):
            raise ValueError(
                f"delta {what}: rows of shape {rows.shape}; expected ({ids.size}, {self.row_bytes})"
            )
        step_bytes = _step_bytes(step)
        return (*self._encode(ids, rows, step), step_bytes)

    def _write(self, what: str, body: Callable, rows: int | None = None) -> None:
        """Run ``body(txn)`` in one durable write transaction (``what``, of ``rows`` rows: named
        in errors): the map doubled and the transaction retried when full; ``CommitError`` when
        it fails (the previous commit intact)."""
        previous = self._step_before_commit(what)  # after a failed write, reading may fail too
        try:
            self.env.reader_check()  # a killed reader's slot would keep every old page from reuse
        except lmdb.Error as exc:
            raise CommitError(
                f"delta: {what} to {self.path} not attempted: its reader table could not be "
                f"checked ({exc}); the previous commit (step {previous}) is intact"
            ) from None
        for _ in range(GROW_ATTEMPTS):
            try:
                with self._txn(write=True) as txn:
                    body(txn)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                counted = "" if rows is None else f" ({rows:,} rows)"
                raise CommitError(
                    f"delta: {what}{counted} to {self.path} failed "
                    f"({_write_failure(exc, self.path)}); the previous commit (step {previous}) "
                    "is intact"
                ) from None
        raise CommitError(
            f"delta: {what} to {self.path} still does not fit a "
            f"{self.env.info()['map_size']:,}-byte map after {GROW_ATTEMPTS} doublings"
        )

    def _staged_db(self, txn: lmdb.Transaction):
        """The ``staged`` database, created in ``txn`` on first use (older deltas have none)."""
        return self.env.open_db(STAGED_DB, txn=txn, create=True)

    def _staged_step_now(self) -> int | None:
        """The staged step on disk now (a writer's view, never a pinned one)."""
        with self._txn(db=self.meta_db) as txn:
            raw = txn.get(STAGED_STEP_KEY)
        return None if raw is None else _int_value(raw)

    def _grow(self) -> None:
        """Double the map once no read transaction of this process is open on it (LMDB forbids
        a resize during one; new ones wait). Refused while another handle in this process holds
        a commit: growing would end its view."""
        with self._grow_lock.exclusive():
            size = self.env.info()["map_size"] * 2
            if _count_pin(self._env_key, 0):
                raise CommitError(
                    f"delta: {self.path}'s map ({size // 2:,} bytes) is full, and another store "
                    "of this table in this process holds an older commit that growing it would "
                    "end; close or reopen that store, then commit again (the writes are kept)"
                )
            try:
                self.env.set_mapsize(size)
            except lmdb.Error as exc:
                raise CommitError(
                    f"delta: cannot grow {self.path}'s map to {size:,} bytes ({exc})"
                ) from None
        self.map_grows += 1

    def _step_before_commit(self, what: str) -> int:
        """The last committed step, read before ``what`` (a commit) writes anything."""
        try:
            return self.step
        except TierIOError as exc:
            raise CommitError(
                f"delta: {what} to {self.path} not attempted: {exc}; the previous commit is intact"
            ) from None

    def _encode(self, ids: np.ndarray, rows: np.ndarray, step: int) -> tuple[list, list]:
        """Keys and values (bytes objects, as putmulti takes them) for a batch of rows."""
        records = np.empty(ids.size, dtype=self._record_dtype())
        records["width"] = self.row_bytes
        records["step"] = step
        records["row"] = ids
        records["payload"] = rows
        flat = records.view(np.uint8).reshape(-1)
        starts = np.arange(ids.size, dtype=np.int64) * self.value_bytes + 4
        records["crc"] = crc32c_pages(flat, starts, np.full(ids.size, self.value_bytes - 4))
        keys = ids.astype(">i8").view("V8").tolist()
        return keys, records.view(f"V{self.value_bytes}").tolist()

    def _decode_pairs(self, pairs: list[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of (key, value) pairs, CRC-checked."""
        ids = np.frombuffer(b"".join(k for k, _ in pairs), dtype=">i8").astype(np.int64)
        return ids, self._decode(ids, [v for _, v in pairs])["payload"]

    def _decode(self, ids: np.ndarray, values: list[bytes]) -> np.ndarray:
        """Records of ``ids`` from their values; raises on any bad one."""
        joined = b"".join(values)
        if len(joined) != ids.size * self.value_bytes:
            self.read_errors += 1
            k = next((k for k, v in enumerate(values) if len(v) != self.value_bytes), 0)
            raise DeltaCorruptError(
                f"delta: row {int(ids[k])} in {self.path} holds a {len(values[k])}-byte record; "
                f"expected {self.value_bytes} (a {self.row_bytes}-byte row + header); the delta is "
                "damaged: restore it or compact from a good copy"
            )
        flat = np.frombuffer(joined, dtype=np.uint8)
        records = flat.view(self._record_dtype())
        starts = np.arange(ids.size, dtype=np.int64) * self.value_bytes + 4
        crc = crc32c_pages(flat, starts, np.full(ids.size, self.value_bytes - 4))
        bad = (
            (crc != records["crc"]) | (records["row"] != ids) | (records["width"] != self.row_bytes)
        )
        if bad.any():
            self.read_errors += 1
            k = int(np.flatnonzero(bad)[0])
            raise DeltaCorruptError(
                f"delta: row {int(ids[k])} in {self.path}, written at step "
                f"{int(records['step'][k])}, {_bad_record(records[k], crc[k], ids[k])}; the delta "
                "is damaged: restore it or compact from a good copy"
            )
        return records

    def _record_dtype(self) -> np.dtype:
        """Header fields then the row's bytes."""
        return np.dtype(HEADER.descr + [("payload", "u1", (self.row_bytes,))])

    def _initialise(self, initial_step: int) -> None:
        """Create both databases, the row size and the initial step in one transaction (a
        writer, once): an environment is complete or holds none of them."""
        with self._txn(write=True) as txn:
            rows_db = self.env.open_db(b"rows", txn=txn, create=True)
            meta_db = self.env.open_db(b"meta", txn=txn, create=True)
            del rows_db
            if txn.get(b"row_bytes", db=meta_db) is None:
                txn.put(b"row_bytes", self.row_bytes.to_bytes(8, "little"), db=meta_db)
                txn.put(b"step", _step_bytes(initial_step), db=meta_db)

    def _check_row_bytes(self) -> None:
        """The environment was made for rows of this size."""
        with self._txn(db=self.meta_db) as txn:
            have = txn.get(b"row_bytes")
        if have is not None and _int_value(have) != self.row_bytes:
            raise DeltaCorruptError(
                f"delta: {self.path} holds {_int_value(have)}-byte rows; the table's rows are "
                f"{self.row_bytes} bytes (a delta of another table?)"
            )

    def _check_process(self) -> None:
        """LMDB environments must not cross fork(): each process opens its own."""
        if os.getpid() != self._pid:
            raise TierIOError(
                f"delta: {self.path} was opened in process {self._pid}, used in {os.getpid()} "
                "(after fork); expected each process to open the store itself"
            )


GROW_WAIT_S = 2.0  # how long a map resize waits for reads in other threads (lookups wait too)


class _GrowLock:
    """Read transactions of one environment hold it shared for their whole life, a map resize
    exclusively: LMDB forbids ``set_mapsize`` while any transaction of the process is open (one
    starting meanwhile fails with EINVAL). A waiting resize holds new transactions back, so a
    stream of reads cannot starve it; a thread already holding it shared may take it again."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._holders: dict[int, int] = {}  # thread id -> shared holds it has
        self._resizing = False  # a resize waits or runs

    @contextlib.contextmanager
    def shared(self):
        """Hold off resizes while the block runs."""
        me = threading.get_ident()  # the thread that took it, even if another one releases it
        with self._cond:
            while self._resizing and not self._holders.get(me):
                self._cond.wait()
            self._holders[me] = self._holders.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._holders[me] -= 1
                if not self._holders[me]:
                    del self._holders[me]
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """Run the block once no transaction is open (none starts meanwhile); ``CommitError``
        after ``GROW_WAIT_S`` seconds of a read still open (a row iterator left part way), and
        new reads go on."""
        me, timeout = threading.get_ident(), GROW_WAIT_S
        with self._cond:
            if self._holders.get(me):
                raise CommitError(
                    "delta: a commit had to grow the map while this thread reads the same delta "
                    "(iterating its rows?); finish the read, then commit"
                )
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            if not self._cond.wait_for(lambda: not self._holders, timeout):
                self._resizing = False
                self._cond.notify_all()
                raise CommitError(
                    f"delta: a commit had to grow the map, and a read of the same delta in "
                    f"another thread stayed open for {timeout:g} s (a row iterator left part "
                    "way?); the writes are kept: commit again once it has ended"
                )
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


# LMDB allows one environment handle per file per process: handles of one delta share it. Keyed
# by its data file's identity too: a delta removed and made anew at the same path (a table made
# anew) is another environment, while handles of the removed one keep theirs
# (pid, realpath, (st_dev, st_ino) of data.mdb) -> [environment, handles, pinned, its _GrowLock]
_ENVS: dict[tuple[int, str, tuple[int, int]], list] = {}
_ENVS_LOCK = threading.Lock()
OPEN_ATTEMPTS = 4  # opens of a delta whose data file another process replaced meanwhile


def _shared_env(path: Path, open_env) -> tuple[tuple, lmdb.Environment, _GrowLock]:
    """This process's environment for the delta at ``path`` now (opened by ``open_env`` unless
    one of this very data file is open), its key (for ``_release_env``) and the lock its read
    transactions and resizes share."""
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        for _ in range(OPEN_ATTEMPTS):
            before = _data_file_id(real)
            key = (os.getpid(), real, before)  # never an environment across fork()
            entry = _ENVS.get(key)
            if entry is None:
                env = open_env()
                if before is None or _data_file_id(real) != before:  # made or replaced as it
                    env.close()  # opened: which file it has is unknown; again (now it is there)
                    continue
                entry = _ENVS[key] = [env, 0, 0, _GrowLock()]
            entry[1] += 1
            return key, entry[0], entry[3]
    raise TierIOError(
        errno.ESTALE,
        f"delta: {path} was replaced while it opened, {OPEN_ATTEMPTS} times; expected a delta "
        "that stays put while a store opens (is a conversion or create_table rerunning?)",
    )


def _data_file_id(real: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the delta's data file; None when it has none."""
    data_file = os.path.join(real, "data.mdb")
    try:
        st = os.stat(data_file)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TierIOError(
            exc.errno, f"delta: cannot stat {data_file} ({exc.strerror}); expected a readable delta"
        ) from None
    return st.st_dev, st.st_ino


def _half_made(path: Path) -> bool:
    """Whether the delta directory ``path`` is one a writer of an older version died or failed
    creating in place: no data file, or one shorter than LMDB's two meta pages (which LMDB
    refuses: ``MDB_INVALID``)."""
    try:
        return os.stat(path / "data.mdb").st_size < META_PAGES_BYTES
    except FileNotFoundError:
        return True
    except OSError:  # unreadable: opening it says why
        return False


def _temporary_name(path: Path, kind: str) -> Path:
    """A private name beside the delta ``path``: ``.NAME.<12 hex>.new`` (a delta being made) or
    ``.old`` (a half-made one renamed aside to be replaced); nothing else reads such names."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}")


def _private_dir(path: Path) -> tuple[int, Path]:
    """A new private directory to make the delta ``path`` in, and an open descriptor of it that
    holds its ``flock`` (``remove_delta_temporaries`` leaves a locked one alone)."""
    for _ in range(OPEN_ATTEMPTS):
        new = _temporary_name(path, "new")
        try:
            os.mkdir(new, 0o755)  # the mode lmdb.open gives a directory
            fd = open_held(new, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # a cleanup removed it before it was opened: another name
            continue
        except OSError as exc:
            raise TierIOError(
                exc.errno,
                f"delta: cannot create {path} ({exc.strerror}); expected a writable directory",
            ) from None
        try:
            # a cleanup holds the lock only while it removes the directory; a filesystem without
            # flock fails here and in every cleanup, which then leaves the directory alone
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd, new
        except BaseException:  # Ctrl-C while a cleanup held the lock, fstat failing
            release(fd)
            raise
        release(fd)  # a cleanup removed it before it was locked: another name
    raise TierIOError(
        errno.ESTALE, f"delta: cannot create {path}: its private directories kept vanishing"
    )


def _taken(exc: OSError) -> bool:
    """Whether a rename failed because its target name is taken (by a directory not empty)."""
    return exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def _publish(new: Path, path: Path) -> bool:
    """Rename the whole delta ``new`` to ``path`` (atomic: readers find none or this one); False
    where another creator's delta is there (it stands; ``new`` is the caller's to remove). A
    half-made delta at ``path`` (an older version's leftover) is first renamed aside, and removed
    only if it is half-made there still: one completed in place meanwhile is renamed back."""
    for _ in range(OPEN_ATTEMPTS):
        if _rename_into_place(new, path):
            return True
        if not _half_made(path):
            return False  # another creator's delta
        aside = _temporary_name(path, "old")
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # renamed aside by another writer meanwhile
            continue
        except OSError as exc:
            raise TierIOError(
                exc.errno,
                f"delta: cannot rename {path}, which a writer died or failed creating, aside "
                f"({exc.strerror}); expected a writable directory, to create the delta anew",
            ) from None
        if _half_made(aside):  # as it was: it holds no commit, and no reader opens it
            try:
                if _rename_into_place(new, path):
                    return True
            finally:
                shutil.rmtree(aside, ignore_errors=True)
                fsync_dir(path.parent)
            continue
        with contextlib.suppress(OSError):  # completed in place meanwhile: put it back (taken:
            os.rename(aside, path)  # another creator's stands; this one is left, never removed)
    raise TierIOError(
        errno.ESTALE,
        f"delta: {path} was replaced while it was created, {OPEN_ATTEMPTS} times; expected one "
        "writer at a time",
    )


def _rename_into_place(new: Path, path: Path) -> bool:
    """Rename the delta made in ``new`` to ``path`` and make the rename durable; False where
    ``path`` is taken."""
    try:
        os.rename(new, path)  # onto a missing name (or an empty directory: it holds nothing)
    except OSError as exc:
        if _taken(exc):
            return False
        raise TierIOError(
            exc.errno,
            f"delta: cannot rename {new} to {path} ({exc.strerror}); expected a writable directory",
        ) from None
    fsync_dir(path.parent)
    return True


def remove_delta_temporaries(path: str | os.PathLike[str]) -> list[str]:
    """Remove what creations of the delta ``path`` killed part way left beside it: private
    directories of deltas being made (``.NAME.<hex>.new``: none is locked by a live creator)
    and half-made deltas renamed aside (``.NAME.<hex>.old``); returns the names removed. One that
    holds a commit is never removed.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / ".t.npy.delta.0123456789ab.new").mkdir()
    >>> remove_delta_temporaries(d / "t.npy.delta"), list(d.iterdir())
    (['.t.npy.delta.0123456789ab.new'], [])
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.(new|old)")
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:  # an unreadable folder: nothing to remove that a creator could see
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        leftover = path.parent / name
        try:
            fd = open_held(leftover, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # renamed into place or removed meanwhile, or not a directory
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: a creation under way
            st, here = os.fstat(fd), os.stat(leftover, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (here.st_dev, here.st_ino):
                continue  # renamed into place while this waited: not a leftover
            if match[1] == "old" and not _half_made(leftover):
                continue  # holds a commit (completed in place after it was set aside): kept
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(name)
        except OSError:
            continue
        finally:
            release(fd)
    if removed:
        fsync_dir(path.parent)
    return removed


def _reserve_lock_file(path: Path) -> None:
    """Make LMDB's lock file in the delta directory ``path``, or keep the one there (never
    truncated), with its space reserved: LMDB maps the lock file without reserving any, so on a
    full disk its first write to the map would kill the process (SIGBUS) inside ``lmdb.open``."""
    fd = os.open(path / "lock.mdb", os.O_RDWR | os.O_CREAT, 0o644)  # the mode lmdb.open gives
    try:
        st = os.fstat(fd)
        if st.st_blocks * 512 >= max(st.st_size, LOCK_FILE_BYTES):
            return  # reserved already (and where posix_fallocate is emulated, it would write
            # zeros into the live reader table of a file in use)
        os.posix_fallocate(fd, 0, LOCK_FILE_BYTES)
    except OSError as exc:
        # a filesystem that cannot reserve space, or a sandbox refusing the call (seccomp):
        # LMDB's own open, unreserved; so too, on a full disk, a lock file LMDB made whole-sized
        # (older versions: its first page written, the reader slots there), which opens as it did
        unreserved = exc.errno == errno.ENOSPC and st.st_size >= LOCK_FILE_BYTES
        if not unreserved and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def _write_failure(exc: lmdb.Error, path: Path) -> str:
    """LMDB's error, with the cause of a short write, which it reports as EIO: its data file at
    this process's file-size limit (RLIMIT_FSIZE), or no space left for this process (no block
    free at all for root, which may use the blocks reserved for it; none available otherwise).
    Any other cause (a quota, say) is not on record here: LMDB's word alone."""
    text = str(exc)
    if os.strerror(errno.EIO) not in text:
        return text
    data_file, limit = path / "data.mdb", resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        if limit != resource.RLIM_INFINITY and os.stat(data_file).st_size >= limit:
            return (
                f"{text}: a short write, {data_file} reached this process's file-size limit "
                f"(RLIMIT_FSIZE, {limit:,} bytes): {os.strerror(errno.EFBIG)}"
            )
        fs = os.statvfs(path)
        if (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) == 0:
            return f"{text}: a short write, {os.strerror(errno.ENOSPC)}"
    except OSError:  # the cause unknown: LMDB's word alone
        pass
    return text


def _bad_record(record: np.void, crc: int, row: int) -> str:
    """What is wrong with the record read under ``row`` whose computed CRC32C is ``crc``: its
    CRC32C, else (it matches) the row id or row size its header holds."""
    if int(record["crc"]) != int(crc):
        return f"fails its CRC32C (stored {int(record['crc']):#010x}, computed {int(crc):#010x})"
    if int(record["row"]) != int(row):
        return (
            f"holds the record of row {int(record['row'])} (its CRC32C matches: a damaged key, or "
            f"a record put under another id); expected row {int(row)}'s"
        )
    return f"holds a {int(record['width'])}-byte row; expected {record['payload'].size} bytes"


def _count_pin(key: tuple, change: int) -> int:
    """Add ``change`` to the handles of the environment ``key`` holding a pinned commit; returns
    how many do."""
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            return 0
        entry[2] += change
        return entry[2]


def _release_env(key: tuple) -> None:
    """Drop one handle of the environment ``key``; close it with the last."""
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _ENVS[key]
            entry[0].close()


def _int_value(raw: bytes | None) -> int:
    """An int64 stored little-endian (0 when absent)."""
    return 0 if raw is None else int.from_bytes(raw, "little", signed=True)


def _round_of(raw: bytes | None, staged_step: bytes | None, path: Path) -> str | None:
    """The round of a staged round's key as stored ("round@step"), when its step is the staged
    step as stored (``staged_step``); else None (nothing staged, or a round staged before).
    ``DeltaCorruptError`` naming the delta ``path`` and the key for a value of another form."""
    if raw is None or staged_step is None:
        return None
    round_id, _, step = _round_text(raw, STAGED_ROUND_KEY, path).rpartition("@")
    if not round_id or not re.fullmatch(r"-?[0-9]+", step):
        raise _bad_round(raw, STAGED_ROUND_KEY, path, "ROUND@STEP (a round id, an integer step)")
    return round_id if int(step) == _int_value(staged_step) else None


def _round_text(raw: bytes, key: bytes, path: Path) -> str:
    """A round key's value (``key`` in ``meta`` of the delta at ``path``) as text;
    ``DeltaCorruptError`` naming them where it is not ASCII text."""
    try:
        return bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        raise _bad_round(raw, key, path, "ASCII text") from None


def _bad_round(raw: bytes, key: bytes, path: Path, expected: str) -> DeltaCorruptError:
    """The error of a round key's value that is not of the form ``expected``."""
    return DeltaCorruptError(
        f"delta: {path} holds {bytes(raw)[:64]!r} under the meta key {key.decode()!r}; expected "
        f"{expected}, as a sharded commit writes it: the delta is damaged, restore it from a "
        "good copy"
    )


def _step_bytes(step: int) -> bytes:
    """A commit step as stored (int64 little-endian); refuses ``GREW_STEP`` and beyond."""
    if not -(2**63) <= step < GREW_STEP:
        raise ConfigError(
            f"delta: step {step} is outside the steps a delta stores, -2**63 to {GREW_STEP - 1} "
            f"(2**63 - 2); {GREW_STEP} (2**63 - 1) marks a map grown in another process"
        )
    return int(step).to_bytes(8, "little", signed=True)


def _lock_free(env: lmdb.Environment) -> bool:
    """Whether ``env`` was opened without LMDB's lock file (a read-only filesystem)."""
    return not env.flags().get("lock", True)


def _read_only_filesystem(path: Path) -> bool:
    """Whether ``path`` is on a filesystem mounted read-only (no process can write there)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _is_permission_error(exc: lmdb.Error) -> bool:
    """Whether LMDB failed for want of write permission (a read-only directory or mount)."""
    text = str(exc)
    return any(
        os.strerror(code) in text for code in (errno.EACCES, errno.EROFS, errno.EPERM)
    ) or isinstance(exc, lmdb.ReadonlyError)

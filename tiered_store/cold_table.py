"""The cold tier: open a table file and read batches of rows from it, fast.

Four I/O modes:

- ``"pread"``: page-cache reads with ``os.preadv`` from a persistent thread pool
  (``POSIX_FADV_RANDOM``, so no readahead is wasted on random rows).
- ``"direct"``: the same with ``O_DIRECT``: the page cache is bypassed, so a cold-tier read never
  evicts the host's other cached data and the measured rate is the disk's.
- ``"uring"``: ``O_DIRECT`` reads submitted in bulk through an io_uring
  (``tiered_store.io_uring``), ``queue_depth`` requests in flight per reader: one thread keeps
  the disk as busy as many ``direct`` threads, with one syscall per refill instead of one per page.
- ``"mmap"``: ``np.take`` on a memory map (``MADV_RANDOM``); fastest when the table sits in the
  page cache. Large batches are split over the thread pool so page faults overlap.

The pread/direct path, vectorised with NumPy except for one Python call per I/O request:
row ids -> byte ranges -> 4 KiB page ranges -> coalesce rows whose pages overlap or touch into
extents (split every ``MAX_EXTENT_PAGES`` so a dense batch still spreads over the threads) ->
contiguous groups of extents (``TASKS_PER_THREAD`` per thread, balanced by estimated cost) that
``threads`` runners (the caller and the pool) pull from a shared counter -> a runner ``preadv``s a
group's extents back to back into its own page-aligned buffer and, whenever the buffer is full,
copies the rows it holds straight into the output with one vectorised gather (``np.take`` on a
row view when every row sits on a ``row_bytes`` grid of the buffer, fancy indexing of an
overlapping strided view otherwise).

``uring`` shares the plan: each reader (``threads`` of them, one ring each) takes a contiguous
share of the extents, in chunks that fit its ``URING_BUFFER_BYTES`` buffer; a chunk's requests
are laid back to back in the buffer, read through the ring, then extracted like the above.
Idle readers are kept for the next batch, at most ``threads`` of them; one idle for more than
``URING_IDLE_S`` (60 s) is closed, ring and buffer, when readers are next taken or given back (a
big batch's buffers are not kept for good), and so is one taken while an interrupted batch's reads
are pending (its drain cut short by a second Ctrl-C): a read never waits for another's.

A failed read is retried once through a careful path that also handles the file's short last
page; a second failure raises ``TierIOError`` and counts in ``read_errors``.

Every read is verified before any row leaves ``read_rows`` (so the caches above only ever hold
verified rows): the pages a buffer-full holds (pread, direct, uring), or the mapped pages of the
requested rows (mmap), are checked against the table's CRC32C per 4 KiB page
(:mod:`tiered_store.page_checksums`: one compiled call per buffer-full, in the reader threads);
a mismatch raises ``ChecksumError`` naming the table, a requested row and the page, and counts in
``checksum_failures``. A table without page checksums opens with an ``UnverifiedTableWarning``
and reads unverified; ``verify_pages=False`` skips the checks (the benchmarks' baseline).

Before each batch the open file is checked against its path (``fstat`` and ``stat``): a file
that shrank, was removed or was replaced raises ``TierIOError``. For mmap this is what keeps a
truncated table from killing the process with SIGBUS; the check cannot close the window between
it and the end of the gather (a truncation then still faults; for a large batch read from disk,
hundreds of milliseconds), which the other modes do not have: their reads past the end come back
short and raise.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tiered_store.config import MAX_COLD_THREADS
from tiered_store.errors import ConfigError, RowIdError, TierIOError, warn_at_caller
from tiered_store.integers import as_integer
from tiered_store.io_uring import MAX_QUEUE_DEPTH, IoUring
from tiered_store.page_checksums import (
    ChecksumError,
    PageVerifier,
    UnverifiedTableWarning,
    crc32c_backend,
    load_page_checksums,
)
from tiered_store.prefetch import RunnerPool, take_once
from tiered_store.store_lock import InFlight
from tiered_store.table_format import (
    PAGE_BYTES,
    TableManifest,
    check_table,
    page_aligned,
    page_checksum_error,
    table_paths,
)

IO_MODES = ("mmap", "pread", "direct", "uring")
DEFAULT_THREADS = 8
DEFAULT_QUEUE_DEPTH = 128  # io="uring": requests in flight per reader
URING_BUFFER_BYTES = 64 << 20  # io="uring": most buffer per reader (a batch's extents; the queue
# drains once per buffer-full, so a smaller buffer costs ~one read latency per refill of it)
URING_IDLE_S = 60.0  # io="uring": a reader idle longer is closed, ring and buffer, when readers are
# next taken or given back (no timer thread): one big batch's buffers are not kept for good
MAX_EXTENT_PAGES = 64  # 256 KiB: longest single read before an extent is split for parallelism
REQUEST_COST_PAGES = 8  # balancing weight of one read request, in pages of transfer
TASKS_PER_THREAD = 4  # extent groups per thread: runners pull groups, so slow disks balance out
WORKER_BUFFER_BYTES = 4 << 20  # 4 MiB page-aligned read buffer per worker thread
MMAP_MIN_ROWS_PER_TASK = 8192  # mmap mode: below this many rows a batch is gathered inline
VERIFY_SLICE_BYTES = 1 << 20  # pread/direct: check pages every 1 MiB read, while still in cache

_PAGE_SHIFT = PAGE_BYTES.bit_length() - 1
# NumPy element type used to hold each table dtype (bfloat16 travels as int16 bits)
_NP_ELEMENT = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.int16,
    "uint8": np.uint8,
}


class ColdTable:
    """Read-only access to a table file: batched, parallel, bit-exact row reads.

    Parameters
    ----------
    path
        The table's ``.npy`` path (created by ``create_table``).
    io
        ``"pread"`` (default), ``"direct"`` (``O_DIRECT``, bypasses the page cache), ``"uring"``
        (``O_DIRECT`` through io_uring, Linux x86-64) or ``"mmap"``.
    threads
        Size of the I/O thread pool (the calling thread works too, as one of them); for
        ``"uring"``, the readers that each drive their own ring.
    queue_depth
        ``"uring"`` only: requests in flight per reader (1 to 4096).
    verify_pages
        Check every page read against the table's page checksums (default). ``False`` reads
        unverified (a baseline for benchmarks); so does a table without page checksums, which
        warns (``UnverifiedTableWarning``) naming the command that adds them.

    Opening checks that both files exist, that the manifest agrees with the ``.npy`` header and
    that the file size is exactly ``data_offset + rows * row_bytes``, and loads the page
    checksums (checking the sidecar's own checksum). It does not re-read the data: use
    ``verify_table`` for that.

    Attributes
    ----------
    rows, dim, row_bytes : int
    dtype : torch.dtype
    manifest : TableManifest
    path : Path
    rows_read, bytes_read, read_requests, read_errors, checksum_failures : int
        Counters. ``bytes_read`` counts bytes transferred (whole pages for pread/direct, row
        bytes for mmap); ``read_requests`` counts ``preadv`` calls (gather calls for mmap);
        ``read_errors`` reads that failed (after their retry) or found the file shrunk, removed
        or replaced; ``checksum_failures`` ``read_rows`` calls that found a page failing its
        checksum.
    verified : bool
        Whether reads are checked against page checksums.

    Examples
    --------
    >>> from tiered_store.table_format import create_table, RandomSource
    >>> create_table("/data/t.npy", RandomSource(10_000, 64), progress=False)  # doctest: +SKIP
    >>> with ColdTable("/data/t.npy", io="direct", threads=8) as table:  # doctest: +SKIP
    ...     rows = table.read_rows(np.array([3, 17, 9_999]))
    >>> rows.shape, rows.dtype  # doctest: +SKIP
    (torch.Size([3, 64]), torch.float32)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        io: str = "pread",
        threads: int = DEFAULT_THREADS,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        verify_pages: bool = True,
    ):
        if io not in IO_MODES:
            raise ConfigError(f"ColdTable io={io!r}; expected one of {', '.join(IO_MODES)}")
        if (count := as_integer(threads)) is None or not 1 <= count <= MAX_COLD_THREADS:
            raise ConfigError(
                f"ColdTable threads={threads!r}; expected an integer from 1 to {MAX_COLD_THREADS}"
            )
        if (depth := as_integer(queue_depth)) is None or not 1 <= depth <= MAX_QUEUE_DEPTH:
            raise ConfigError(
                f"ColdTable queue_depth={queue_depth!r}; expected an integer from 1 to "
                f"{MAX_QUEUE_DEPTH}"
            )
        threads, queue_depth = count, depth
        self.path: Path = table_paths(os.path.abspath(path))[0]  # a later chdir changes nothing
        self.manifest: TableManifest = check_table(self.path)
        self.io = io
        self.threads = threads
        self.queue_depth = queue_depth
        self.rows = self.manifest.rows
        self.dim = self.manifest.dim
        self.row_bytes = self.manifest.row_bytes
        self.dtype: torch.dtype = self.manifest.torch_dtype
        self.rows_read = 0
        self.bytes_read = 0
        self.read_requests = 0
        self.read_errors = 0
        self.checksum_failures = 0
        self._verifier = self._page_verifier(verify_pages)
        self.verified = self._verifier is not None
        self._np_dtype = np.dtype(_NP_ELEMENT[self.manifest.dtype])
        self._file_bytes = self.manifest.file_bytes
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        # held by the release (an RLock: a signal handler's close inside it returns); every
        # close returns after it. Left: the finalizer detached, the release not yet finished
        # (interrupted by a Ctrl-C: the next close finishes it)
        self._releasing, self._release_left = threading.RLock(), False
        # the finalizer's release, left to the last read under way (at the exit): a close()
        # after it runs it (once, whichever of them comes last: see _release_once)
        self._at_exit: list[Callable[[], None]] = []
        self._calls = InFlight(partial(_closed_error, str(self.path), self._at_exit))
        self._fd = -1
        self._identity: tuple[int, int] = (-1, -1)  # (st_dev, st_ino) of the open file
        self._mtime_ns = -1  # and its mtime when opened (same_file)
        self._mmap: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._bytes: np.ndarray | None = None  # mmap: the whole file as uint8 (page checks)
        self._pool = RunnerPool(threads - 1, "cold-read") if threads > 1 else None
        self._readers: list[_UringReader] = []  # idle rings with their buffers (io="uring"),
        # the most recently given back last; at most `threads`, none idle past URING_IDLE_S
        self._clock = time.monotonic  # what a reader's idle time is measured by
        try:
            if io == "mmap":
                self._open_mmap()
            else:
                self._open_fd()
        except BaseException:
            self._release()
            raise
        self._finalizer = weakref.finalize(
            self, _finalize, self._fd, self._pool, self._calls, self._at_exit
        )

    # ---- public ----------------------------------------------------------------------------

    def read_rows(self, ids: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read rows ``ids`` of the table.

        Parameters
        ----------
        ids
            1-D integer array of row ids, in any order, repeats allowed. The table is read in
            ascending order of id: ids already sorted (as a store passes them) skip a sort.
        out
            Optional CPU tensor ``[len(ids), dim]`` of the table dtype, C-contiguous (it may be
            pinned); the rows are written into it and it is returned.

        Returns
        -------
        torch.Tensor
            ``[len(ids), dim]`` CPU tensor in the table dtype, bit-exact with
            ``np.load(path)[ids]`` (for bfloat16: the same bits).

        Raises
        ------
        RowIdError
            ``ids`` is not a 1-D integer array, or its first/last id is out of ``[0, rows)``.
        TierIOError
            A read failed (EIO, short read; the message names the file and offset), or the file
            shrank, was removed or was replaced since the table was opened, or the table is closed
            (``close()`` in another thread waits for the reads under way).
        ChecksumError
            A page read fails its page checksum; the message names the table, a requested row
            in that page, and the page (no row of the batch is returned).

        Examples
        --------
        >>> table.read_rows(np.arange(0, 1000, 10)).shape  # doctest: +SKIP
        torch.Size([100, 64])
        """
        with self._calls.entered():  # close() waits for this read: its fd and pool stay open
            ids, order = self._check_ids(ids)
            if order is None:
                return self._read_sorted(ids, out)
            rows = self._read_sorted(ids, None)  # ascending, then each row where it was asked
            result, _ = self._output(len(ids), out)
            result[torch.from_numpy(order)] = rows
            return result

    def _read_sorted(self, ids: np.ndarray, out: torch.Tensor | None) -> torch.Tensor:
        """read_rows for ascending ``ids``, inside a call ``close()`` waits for."""
        result, out_np = self._output(len(ids), out)
        if len(ids):
            self._check_file()
            try:
                if self._array is not None:
                    moved, requests = self._gather_mmap(ids, out_np)
                elif self.io == "uring":
                    moved, requests = self._gather_uring(ids, out_np)
                else:
                    moved, requests = self._gather_pread(ids, out_np)
            except ChecksumError:
                with self._lock:
                    self.checksum_failures += 1
                raise
            with self._lock:
                self.rows_read += len(ids)
                self.bytes_read += moved
                self.read_requests += requests
        return result

    def close(self) -> None:
        """Refuse new reads, wait for those under way (in other threads), then stop the thread
        pool and close the file (idempotent; one interrupted while it waited, by a Ctrl-C, is
        finished by the next, as one interrupted while it released). It returns with the file
        closed, also when another thread releases it: another close, or a read refused as this
        one began (counted just after the wait, it ran the release on its way out). A signal
        handler's close inside a read (or the release) of its own thread leaves them to that
        read's end: the read still uses the descriptor, whose number, once freed, names the
        next file opened."""
        self._closed = True
        self._calls.close()
        self._calls.then(self._release_once, own=True)
        if not self._calls.running_here():  # (a read refused as it began is no read)
            self._release_once()  # once another thread's release ended (or was interrupted)

    def _release_once(self) -> None:
        """The first close past the wait (or its own thread's read, see close) releases, and
        one interrupted (a Ctrl-C) is finished by the next; a signal handler's close inside it
        returns (it goes on)."""
        if self._releasing._is_owned():
            return
        with self._releasing:
            if self._finalizer.alive:  # noted first: a Ctrl-C in the detach leaves it to the next
                self._release_left = True  # (not alive, and not left: the finalizer ran at exit)
                self._finalizer.detach()
            elif self._at_exit:  # the finalizer ran: its release, unless a read's end ran it
                self._at_exit[0]()  # (this close's then() replaced its own, which then never ran)
            if self._release_left:
                self._release()
                self._release_left = False

    def __enter__(self) -> ColdTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        depth = f", queue_depth={self.queue_depth}" if self.io == "uring" else ""
        return (
            f"ColdTable({str(self.path)!r}, io={self.io!r}, threads={self.threads}{depth}, "
            f"shape={self.manifest.shape}, dtype={self.manifest.dtype}, verified={self.verified})"
        )

    # ---- opening ---------------------------------------------------------------------------

    def _page_verifier(self, verify_pages: bool) -> PageVerifier | None:
        """The page checks of this table (None: unverified, with a warning if it has none)."""
        if not verify_pages:
            return None
        entry = self.manifest.page_checksums
        if entry is None:
            warn_at_caller(
                f"table {self.path} has no page checksums, so its reads are not verified; add "
                f"them with `tiered-store verify --add-page-checksums {self.path}`",
                UnverifiedTableWarning,
            )
            return None
        sums = load_page_checksums(self.path, entry)
        crc32c_backend()  # choose (and compile, on first use) now, not in the first lookup
        return PageVerifier(sums, self.manifest.data_bytes, entry.page_bytes)

    def _remember_identity(self) -> None:
        """Note which file the descriptor is, for the per-batch check that it is still the table."""
        st = os.fstat(self._fd)
        self._identity, self._mtime_ns = (st.st_dev, st.st_ino), st.st_mtime_ns

    def _open_fd(self) -> None:
        """Open for pread/direct/uring; probe one read so a refusing system fails here."""
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if self.io in ("direct", "uring"):
            if not hasattr(os, "O_DIRECT"):
                raise TierIOError(
                    errno.EINVAL,
                    f"cannot open table {self.path}: io={self.io!r} needs O_DIRECT, which this "
                    "OS lacks; expected an OS with O_DIRECT (Linux), or use io='pread'",
                    str(self.path),
                )
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(self.path, flags)
        except OSError as exc:
            hint = f"; {_HINT}" if self.io != "pread" and exc.errno == errno.EINVAL else ""
            raise TierIOError(
                exc.errno, f"cannot open table {self.path} for io={self.io!r}{hint}", str(self.path)
            ) from exc
        self._remember_identity()
        if self.io == "pread":
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        else:
            probe = self._buffer(PAGE_BYTES)
            try:
                os.preadv(self._fd, [probe[:PAGE_BYTES]], 0)
            except OSError as exc:
                raise TierIOError(
                    exc.errno,
                    f"O_DIRECT read of {self.path} refused ({exc.strerror}); {_HINT}",
                    str(self.path),
                ) from exc
        if self.io == "uring":
            self._probe_uring()

    def _probe_uring(self) -> None:
        """Set up one ring and read the first page through it, so a refusing system fails here
        (the ring is idle from the start: a failed check leaves it for ``_release`` to close)."""
        try:
            reader = self._take_reader(PAGE_BYTES)
            self._give_reader(reader)
            got = reader.ring.read_batch(
                self._fd,
                np.zeros(1, np.int64),
                np.full(1, PAGE_BYTES),
                np.full(1, reader.address),
                keep=reader._raw,
            )
        except OSError as exc:
            raise TierIOError(
                exc.errno,
                f"io='uring' on table {self.path} is unavailable: {exc.strerror}; use io='direct'",
                str(self.path),
            ) from exc
        if got[0] != min(PAGE_BYTES, self._file_bytes):
            err = -int(got[0]) if got[0] < 0 else errno.EIO
            raise TierIOError(
                err,
                f"io='uring' read of {self.path} refused ({os.strerror(err)}); use io='direct'",
                str(self.path),
            )

    def _open_mmap(self) -> None:
        """Map the whole file read-only and view its data region as [rows, dim]."""
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise TierIOError(
                exc.errno, f"cannot open table {self.path} for io='mmap'", str(self.path)
            ) from exc
        self._remember_identity()
        if os.fstat(self._fd).st_size < self._file_bytes:  # mapping past the end would SIGBUS
            raise TierIOError(
                errno.EIO, f"table {self.path} shrank before it could be mapped", str(self.path)
            )
        try:
            self._mmap = mmap.mmap(self._fd, self._file_bytes, access=mmap.ACCESS_READ)
        except OSError as exc:  # ENOMEM: no address space for it (ulimit -v, vm.max_map_count)
            raise TierIOError(
                exc.errno,
                f"cannot map table {self.path} ({self._file_bytes:,} bytes) for io='mmap' "
                f"({exc.strerror}); expected room for it in the address space (ulimit -v), or "
                "use io='pread'",
                str(self.path),
            ) from exc
        if hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_RANDOM)
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        self._array = np.frombuffer(
            self._mmap,
            dtype=self._np_dtype,
            count=self.rows * self.dim,
            offset=self.manifest.data_offset,
        ).reshape(self.rows, self.dim)

    def _release(self) -> None:
        """Free pool, rings, fd and map (also used when the constructor fails half-way)."""
        with self._lock:
            readers, self._readers = self._readers, []
        for reader in readers:
            reader.ring.close()
        self._array = self._bytes = None
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # views still alive (say, in a traceback):
                self._mmap.close()  # then the map goes when they do
            self._mmap = None
        try:  # a release interrupted (Ctrl-C) is run again: the pool's shutdown again, the file
            if self._pool is not None:  # closed once (its number, freed, may name another)
                self._pool.shutdown(wait=True)  # (interrupted, its threads end all the same)
                self._pool = None
        finally:
            fd, self._fd = self._fd, -1  # no signal is handled between these and the close
            if fd >= 0:
                try:  # noqa: SIM105 (suppress's __enter__ is Python code: a Ctrl-C there leaked it)
                    os.close(fd)
                except OSError:
                    pass

    def same_file(self, other: ColdTable) -> bool:
        """Whether ``other`` opened the file this one did: the same (st_dev, st_ino) and, once
        this one's descriptor closed (a file made anew may get its freed inode), the same mtime."""
        if self._identity != other._identity:
            return False
        return self._fd >= 0 or self._mtime_ns == other._mtime_ns

    def replaced(self) -> bool:
        """Whether the path now names another file than the one open (a table made anew over
        it, e.g. a conversion rerun): reopen to serve it. A path naming no file is not."""
        try:
            named = os.stat(self.path)
        except OSError:
            return False
        return (named.st_dev, named.st_ino) != self._identity

    # ---- per-batch checks ------------------------------------------------------------------

    def _check_file(self) -> None:
        """Raise TierIOError when the open file shrank, or its path now names no file or another."""
        try:
            size = os.fstat(self._fd).st_size
            named = os.stat(self.path)
        except FileNotFoundError:
            self._count_error()
            raise TierIOError(
                errno.ENOENT,
                f"table {self.path} was removed while open; expected the table file to stay "
                "while it is served",
                str(self.path),
            ) from None
        except OSError as exc:
            self._count_error()
            raise TierIOError(
                exc.errno,
                f"table {self.path}: cannot check the file ({exc.strerror}); expected its path to "
                "name the open table file",
                str(self.path),
            ) from None
        if size < self._file_bytes:
            self._count_error()
            raise TierIOError(
                errno.EIO,
                f"table {self.path} shrank to {size:,} bytes while open; expected "
                f"{self._file_bytes:,} (truncated, or rewritten in place?)",
                str(self.path),
            )
        if (named.st_dev, named.st_ino) != self._identity:
            self._count_error()
            raise TierIOError(
                errno.ESTALE,
                f"table {self.path} was replaced by another file while open; expected the file "
                "opened (reopen the store to serve the new table)",
                str(self.path),
            )

    def _verify(self, data: np.ndarray, first: int, packed: bool, pages: np.ndarray, ids) -> None:
        """ChecksumError naming a requested row if a page fails (``PageVerifier.first_bad``)."""
        verifier = self._verifier
        assert verifier is not None
        bad = verifier.first_bad(data, first, packed, pages)
        if bad is None:
            return
        k, expected, actual = bad
        page = int(pages[k])
        rb, off = self.row_bytes, self.manifest.data_offset
        last_page = (ids * rb + (off + rb - 1)) >> _PAGE_SHIFT
        row = int(ids[np.searchsorted(last_page, page + (off >> _PAGE_SHIFT))])
        raise page_checksum_error(self.path, self.manifest, page, expected, actual, row=row)

    # ---- argument handling -----------------------------------------------------------------

    def _check_ids(self, ids: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """ids as 1-D int64, all in range, sorted; and where each sorted id was in ``ids`` when
        they were not sorted (else None)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.dtype.kind not in "iu" and ids.size):
            raise RowIdError(
                f"row ids have shape {ids.shape} and dtype {ids.dtype}; "
                "expected a 1-D integer array"
            )
        order = None
        if len(ids) > 1 and bool((ids[1:] < ids[:-1]).any()):
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
        if len(ids):  # sorted: the ends are the min and max (before a cast that wraps uint64)
            low, high = int(ids[0]), int(ids[-1])
            if low < 0 or high >= self.rows:
                raise RowIdError(
                    f"row id {low if low < 0 else high} is out of range for table {self.path}; "
                    f"expected 0 <= id < {self.rows}"
                )
        return ids.astype(np.int64, copy=False), order

    def _output(self, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
        """The result tensor and a NumPy view of it with the table's element type."""
        if out is None:
            out = torch.empty((n, self.dim), dtype=self.dtype)
        elif (
            out.device.type != "cpu"
            or out.dtype != self.dtype
            or tuple(out.shape) != (n, self.dim)
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out is a {out.device.type} {out.dtype} tensor of shape {tuple(out.shape)}"
                f"{'' if out.is_contiguous() else ' (not contiguous)'}; expected a contiguous "
                f"cpu {self.dtype} tensor of shape {(n, self.dim)}"
            )
        view = out.view(torch.int16) if self.dtype == torch.bfloat16 else out
        return out, view.numpy()

    # ---- mmap ------------------------------------------------------------------------------

    def _gather_mmap(self, ids: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        """np.take from the map; large batches split over the pool so faults overlap."""
        array = self._array
        assert array is not None
        n = len(ids)
        tasks = min(self.threads, max(1, n // MMAP_MIN_ROWS_PER_TASK))
        bounds = np.linspace(0, n, tasks + 1).astype(np.int64).tolist()

        def gather(k: int) -> None:
            a, b = bounds[k], bounds[k + 1]
            if self._verifier is not None:
                pages = _row_pages(ids[a:b], self.row_bytes)
                self._verify(self._bytes, self.manifest.data_offset, False, pages, ids[a:b])
            np.take(array, ids[a:b], axis=0, out=out[a:b])

        self._run_parallel(gather, tasks)
        return n * self.row_bytes, tasks

    # ---- pread / direct --------------------------------------------------------------------

    def _gather_pread(self, ids: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        """Plan extents for ``ids`` (vectorised), then read and extract them in parallel."""
        plan = _plan_extents(ids, self.row_bytes, self.manifest.data_offset, self.verified)
        n_ext = len(plan.page_first)
        groups = min(n_ext, 1 if self.threads == 1 else self.threads * TASKS_PER_THREAD)
        weight = np.cumsum(plan.pages + REQUEST_COST_PAGES)
        cuts = np.searchsorted(weight, weight[-1] * np.arange(1, groups) / groups, side="right")
        edges = np.unique(np.concatenate(([0], cuts, [n_ext]))).tolist()
        offsets = (plan.page_first << _PAGE_SHIFT).tolist()
        lengths = (plan.pages << _PAGE_SHIFT).tolist()
        buffer_bytes = max(WORKER_BUFFER_BYTES, max(lengths))
        moved = [0] * (len(edges) - 1)
        counts = [0] * (len(edges) - 1)

        fd, preadv = self._fd, os.preadv
        slice_bytes = VERIFY_SLICE_BYTES if self._verifier is not None else 1 << 62

        def work(g: int) -> None:
            e_begin, e_end = edges[g], edges[g + 1]
            buf = self._buffer(buffer_bytes)
            fill, batch, total, checked = 0, e_begin, 0, 0
            for e in range(e_begin, e_end):  # one iteration per I/O request
                length = lengths[e]
                if fill + length > buffer_bytes:
                    self._extract(plan, batch, e, buf, out, checked)
                    fill, batch, checked = 0, e, 0
                view = buf[fill : fill + length]
                try:
                    got = preadv(fd, [view], offsets[e])
                except OSError:
                    got = -1
                if got != length:  # error, EOF page, or short read: the careful path
                    got = self._read_extent(view, offsets[e])
                total += got
                fill += length
                if fill - checked >= slice_bytes:  # verify while the pages are still in cache
                    self._verify_packed(plan, batch, e + 1, buf, checked, fill)
                    checked = fill
            self._extract(plan, batch, e_end, buf, out, checked)
            moved[g], counts[g] = total, e_end - e_begin

        self._run_parallel(work, len(edges) - 1)
        return sum(moved), sum(counts)

    def _read_extent(self, view: memoryview, offset: int) -> int:
        """preadv one extent fully (the file's last page may be short); return bytes read."""
        need = min(len(view), self._file_bytes - offset)
        got = 0
        try:
            while got < need:
                n = os.preadv(self._fd, [view[got:]], offset + got)
                if n <= 0:
                    raise TierIOError(
                        errno.EIO,
                        f"short read from {self.path} at offset {offset}: got {got} of "
                        f"{need} bytes (file truncated while open?)",
                        str(self.path),
                    )
                got += n
        except TierIOError:
            self._count_error()
            raise
        except OSError as exc:
            self._count_error()
            hint = f"; {_HINT}" if self.io == "direct" and exc.errno == errno.EINVAL else ""
            raise TierIOError(
                exc.errno,
                f"reading {len(view)} bytes of {self.path} at offset {offset + got} failed: "
                f"{exc.strerror}{hint}",
                str(self.path),
            ) from exc
        return got

    def _verify_packed(
        self, plan: _ExtentPlan, e0: int, e1: int, buf: memoryview, begin: int, end: int
    ) -> None:
        """Check bytes [begin, end) of ``buf``, which holds extents [e0, e1) packed from its start."""
        p0 = int(plan.ext_vpos[e0] >> _PAGE_SHIFT)  # the buffer's first page in the plan
        pages = plan.data_pages[p0 + (begin >> _PAGE_SHIFT) : p0 + (end >> _PAGE_SHIFT)]
        data = np.frombuffer(buf, dtype=np.uint8, count=end)
        self._verify(data, begin, True, pages, plan.ids[plan.row_start[e0] : plan.row_start[e1]])

    def _extract(
        self,
        plan: _ExtentPlan,
        e0: int,
        e1: int,
        buf: memoryview,
        out: np.ndarray,
        verified: int = 0,
    ) -> None:
        """Copy extents [e0, e1)'s rows (packed in ``buf``) to ``out``; check pages past ``verified``."""
        r0, r1 = plan.row_start[e0], plan.row_start[e1]
        if r0 == r1:
            return
        pos = plan.row_vpos[r0:r1] - plan.ext_vpos[e0]  # byte offset of each row in buf
        used = int(plan.ext_vpos[e1] - plan.ext_vpos[e0])
        data = np.frombuffer(buf, dtype=np.uint8, count=used)
        if plan.data_pages is not None and verified < used:
            self._verify_packed(plan, e0, e1, buf, verified, used)
        rb = self.row_bytes
        if used >= rb and not np.any(pos % rb):  # fast path: rows sit on a row_bytes grid
            rows = data[: used - used % rb].view(self._np_dtype).reshape(-1, self.dim)
            np.take(rows, pos // rb, axis=0, out=out[r0:r1])
        else:  # general path: overlapping row view at element stride, gather by position
            elems = data[: used - used % self._np_dtype.itemsize].view(self._np_dtype)
            step = self._np_dtype.itemsize
            rows = np.lib.stride_tricks.as_strided(
                elems, shape=(len(elems) - self.dim + 1, self.dim), strides=(step, step)
            )
            out[r0:r1] = rows[pos // step]

    # ---- uring -----------------------------------------------------------------------------

    def _gather_uring(self, ids: np.ndarray, out: np.ndarray) -> tuple[int, int]:
        """Plan extents, split them over ``threads`` readers, read each share through a ring."""
        plan = _plan_extents(ids, self.row_bytes, self.manifest.data_offset, self.verified)
        n_ext = len(plan.page_first)
        offsets = plan.page_first << _PAGE_SHIFT
        lengths = plan.pages << _PAGE_SHIFT
        expected = np.minimum(lengths, self._file_bytes - offsets)  # the last page may be short
        groups = min(n_ext, self.threads)
        weight = np.cumsum(plan.pages + REQUEST_COST_PAGES)
        cuts = np.searchsorted(weight, weight[-1] * np.arange(1, groups) / groups, side="right")
        edges = np.unique(np.concatenate(([0], cuts, [n_ext])))
        largest_group = int(np.diff(plan.ext_vpos[edges]).max())
        buffer_bytes = max(min(URING_BUFFER_BYTES, largest_group), int(lengths.max()))
        edges = edges.tolist()
        moved = [0] * (len(edges) - 1)

        def work(g: int) -> None:
            try:
                reader = self._take_reader(buffer_bytes)
            except OSError as exc:  # a ring made at read time (EMFILE, ENOMEM): a read failure
                raise self._ring_failure(
                    exc, "cannot set up another ring for this read", "lower cold.threads, or "
                ) from exc
            try:
                e, e_end = edges[g], edges[g + 1]
                while e < e_end:  # one iteration per buffer-full of extents
                    limit = plan.ext_vpos[e] + buffer_bytes
                    stop = int(np.searchsorted(plan.ext_vpos, limit, side="right")) - 1
                    stop = min(max(stop, e + 1), e_end)
                    moved[g] += self._read_chunk(reader, plan, e, stop, offsets, expected)
                    self._extract(plan, e, stop, reader.view, out)
                    e = stop
            finally:
                self._give_reader(reader)

        self._run_parallel(work, len(edges) - 1)
        return sum(moved), n_ext

    def _read_chunk(
        self,
        reader: _UringReader,
        plan: _ExtentPlan,
        e0: int,
        e1: int,
        offsets: np.ndarray,
        expected: np.ndarray,
    ) -> int:
        """Read extents [e0, e1) back to back into the reader's buffer; bytes read."""
        place = plan.ext_vpos[e0:e1] - plan.ext_vpos[e0]
        want = expected[e0:e1]
        try:
            got = reader.ring.read_batch(
                self._fd,
                offsets[e0:e1],
                plan.pages[e0:e1] << _PAGE_SHIFT,
                reader.address + place,
                keep=reader._raw,
            )
        except OSError as exc:  # io_uring_enter refused (a sandbox, ENOMEM): a read failure
            raise self._ring_failure(exc, "the ring's read failed") from exc
        failed = got != want
        total = int(want.sum()) - int(want[failed].sum())
        for k in np.flatnonzero(failed).tolist():  # errors, short reads: the careful path (rare)
            start, length = int(place[k]), int(plan.pages[e0 + k]) << _PAGE_SHIFT
            total += self._read_extent(reader.view[start : start + length], int(offsets[e0 + k]))
        return total

    def _ring_failure(self, exc: OSError, what: str, advice: str = "") -> TierIOError:
        """A ring that failed at read time, as a counted TierIOError naming the table."""
        self._count_error()
        return TierIOError(
            exc.errno,
            f"io='uring' on table {self.path}: {what} ({exc.strerror}); {advice}use io='direct' "
            "if it persists",
            str(self.path),
        )

    def _take_reader(self, buffer_bytes: int) -> _UringReader:
        """An idle ring with a buffer of at least ``buffer_bytes`` (made when none is idle).
        One whose interrupted batch has reads still pending (its drain cut short by a second
        Ctrl-C) is closed instead, its buffer kept while they may land: its next batch would
        wait for them first, up to ``DRAIN_WAIT_S`` (a hung device), then fail."""
        with self._lock:
            stale = self._stale_readers(self._clock())
            while self._readers and self._readers[-1].ring.pending:
                stale.append(self._readers.pop())
            reader = self._readers.pop() if self._readers else None
        for old in stale:
            old.ring.close()
        if reader is None:
            reader = _UringReader(IoUring(self.queue_depth, f"table {self.path}"))
        if len(reader.view) < buffer_bytes:
            reader.allocate(buffer_bytes)
        return reader

    def _give_reader(self, reader: _UringReader) -> None:
        """Return a ring to the idle list (closed instead when the table is closed; one an
        interrupted batch could not drain is closed already, and dropped: the ring keeps the
        buffer its reads may still land in). Readers idle past ``URING_IDLE_S``, and the
        oldest past ``threads`` idle, are closed."""
        with self._lock:
            if not self._closed and not reader.ring.closed:
                reader.idle_since = self._clock()
                self._readers.append(reader)
                stale = self._stale_readers(reader.idle_since)
            else:
                stale = [reader]
        for old in stale:
            old.ring.close()

    def _stale_readers(self, now: float) -> list[_UringReader]:
        """Under the lock: take out the idle readers idle for more than ``URING_IDLE_S`` at
        ``now``, and the oldest past ``threads`` of them (closed by the caller)."""
        idle = self._readers
        stale = 0
        while stale < len(idle) and now - idle[stale].idle_since > URING_IDLE_S:
            stale += 1
        stale = max(stale, len(idle) - self.threads)
        taken, self._readers = idle[:stale], idle[stale:]
        return taken

    # ---- threads and buffers ---------------------------------------------------------------

    def _run_parallel(self, fn: Any, tasks: int) -> None:
        """Run fn(0..tasks-1) on up to ``threads`` runners (the caller is one) pulling tasks;
        fewer when a runner's thread cannot start (a process limit, no memory for its stack).
        A Ctrl-C stops the runners after their task, and is raised (over their errors) once they
        have ended."""
        runners = min(self.threads, tasks)
        if runners <= 1 or self._pool is None:
            for k in range(tasks):
                fn(k)
            return
        counter = itertools.count()  # next() is atomic under the GIL: a lock-free task queue
        errors: list[BaseException] = []
        joined: list[threading.Event] = []  # one per runner that took part, set as it ends

        def take() -> None:
            """Run tasks until none is left or one failed."""
            while not errors:
                k = next(counter)
                if k >= tasks:
                    return
                try:
                    fn(k)
                except BaseException as exc:  # re-raised by the caller; a Ctrl-C before all
                    errors.insert(len(errors) if isinstance(exc, Exception) else 0, exc)

        def runner() -> None:
            # Registered before it takes a task, so one the caller does not wait for (it joined
            # after the caller found no task left or an error) finds none left or that error.
            ended = threading.Event()
            joined.append(ended)
            try:
                take()
            finally:
                ended.set()

        try:
            for _ in range(runners - 1):
                try:
                    self._pool.submit(runner)
                except RuntimeError:  # its thread could not start: the runners so far read it all
                    break  # (the runner it queued may yet join: as any other, see runner())
            take()
        except BaseException as exc:  # a Ctrl-C between tasks: the runners stop after theirs
            errors.insert(0, exc)
        while True:  # the loop inside the try: a Ctrl-C between two waits is caught as well
            try:
                for ended in joined[:]:  # wait for all: they write into `out` and use our buffers
                    ended.wait()
                break
            except BaseException as exc:  # a Ctrl-C: the runners stop, and are waited for
                errors.insert(0, exc)
        if errors:
            raise errors[0]

    def _buffer(self, nbytes: int) -> memoryview:
        """This thread's page-aligned read buffer, at least ``nbytes`` long."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = memoryview(page_aligned(nbytes))
            self._local.buf = buf
        return buf

    def _count_error(self) -> None:
        with self._lock:
            self.read_errors += 1


_HINT = "the file system refuses O_DIRECT here; use io='pread'"


class _UringReader:
    """An io_uring and the page-aligned buffer its reads land in."""

    __slots__ = ("ring", "view", "address", "idle_since", "_raw")

    def __init__(self, ring: IoUring) -> None:
        self.ring = ring
        self.view = memoryview(b"")
        self.address = 0
        self.idle_since = 0.0  # when it was last given back (the table's clock)
        self._raw: np.ndarray | None = None

    def allocate(self, nbytes: int) -> None:
        """Replace the buffer with a page-aligned one of ``nbytes``."""
        self._raw = page_aligned(nbytes)  # (what keeps its memory: read_batch's keep)
        self.view = memoryview(self._raw)
        self.address = self._raw.ctypes.data


class _ExtentPlan:
    """Vectorised read plan: extents (page ranges) and where each row lands in the read stream.

    ``row_start[e]`` is the first row of extent ``e`` (``row_start[-1] == len(ids)``);
    ``ext_vpos[e]`` is the extent's byte offset when all extents are packed back to back;
    ``row_vpos[r]`` is row ``r``'s byte offset in that packed stream; ``data_pages[j]`` is the
    data-region page index of the stream's ``j``-th page (``None`` when reads are unverified).
    """

    __slots__ = ("ids", "page_first", "pages", "row_start", "ext_vpos", "row_vpos", "data_pages")

    def __init__(self, ids, page_first, pages, row_start, ext_vpos, row_vpos, data_pages):
        self.ids = ids
        self.page_first = page_first
        self.pages = pages
        self.row_start = row_start
        self.ext_vpos = ext_vpos
        self.row_vpos = row_vpos
        self.data_pages = data_pages


def _plan_extents(ids: np.ndarray, row_bytes: int, data_offset: int, verify: bool) -> _ExtentPlan:
    """Coalesce the pages of sorted ``ids`` into extents of at most ~MAX_EXTENT_PAGES pages."""
    n = len(ids)
    start = ids * row_bytes + data_offset
    first = start >> _PAGE_SHIFT
    last = (start + (row_bytes - 1)) >> _PAGE_SHIFT
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.greater(first[1:], last[:-1] + 1, out=new[1:])  # a gap of >= 1 page starts an extent
    run = np.cumsum(new) - 1
    window = (first - first[new][run]) // MAX_EXTENT_PAGES  # split long runs at row boundaries
    new[1:] |= window[1:] != window[:-1]
    row_start = np.append(np.flatnonzero(new), n)
    page_first = first[row_start[:-1]]
    pages = last[row_start[1:] - 1] - page_first + 1
    ext_vpos = np.zeros(len(pages) + 1, dtype=np.int64)
    np.cumsum(pages << _PAGE_SHIFT, out=ext_vpos[1:])
    ext = np.cumsum(new) - 1
    row_vpos = ext_vpos[ext] + (start - (page_first[ext] << _PAGE_SHIFT))
    data_pages = None
    if verify:  # packed page j of extent e is file page page_first[e] + (j - its first j)
        shift = page_first - (ext_vpos[:-1] >> _PAGE_SHIFT) - (data_offset >> _PAGE_SHIFT)
        data_pages = np.repeat(shift, pages) + np.arange(int(ext_vpos[-1] >> _PAGE_SHIFT))
    return _ExtentPlan(ids, page_first, pages, row_start, ext_vpos, row_vpos, data_pages)


def _row_pages(ids: np.ndarray, row_bytes: int) -> np.ndarray:
    """The data-region pages that rows ``ids`` (sorted) lie in, ascending, each once."""
    if len(ids) > 1:
        ids = ids[np.concatenate(([True], ids[1:] != ids[:-1]))]  # repeats would revisit pages
    first = (ids * row_bytes) >> _PAGE_SHIFT
    count = ((ids * row_bytes + (row_bytes - 1)) >> _PAGE_SHIFT) - first + 1
    if int(count.max()) == 1:
        pages = first
    else:  # rows spanning pages: every page of each row
        begin = np.cumsum(count) - count
        pages = np.repeat(first - begin, count) + np.arange(int(count.sum()))
    keep = np.empty(len(pages), dtype=bool)
    keep[0] = True
    np.not_equal(pages[1:], pages[:-1], out=keep[1:])
    return pages[keep]


def _closed_error(path: str, at_exit: list) -> TierIOError:
    """The error a read of a closed table raises (closed by ``close()`` or at the exit)."""
    if at_exit:
        text = (
            f"ColdTable {path} was closed by the interpreter's exit (a table never closed is "
            "closed then); expected its reads made before the exit began"
        )
    else:
        text = f"ColdTable {path} is closed; open it again to read"
    return TierIOError(errno.EBADF, text, path)


def _finalize(fd: int, pool: RunnerPool | None, calls: InFlight, at_exit: list) -> None:
    """A dropped table's finalizer, also run at the exit for a table never closed: new reads are
    refused naming the exit, and a read under way (another thread's) keeps the descriptor and
    pool until it ends (closed under it, the number freed could name the next file opened).
    The release goes in ``at_exit`` for a later ``close()``, whose then() replaces this one's."""
    release = partial(_release_fd_pool, fd, pool, [True])
    at_exit.append(release)
    calls.close(timeout=0)
    calls.then(release, own=True)


def _release_fd_pool(fd: int, pool: RunnerPool | None, token: list | None = None) -> None:
    """Shut the pool down and close the descriptor (only by the one that takes ``token``)."""
    if token is not None and not take_once(token):
        return
    if pool is not None:
        pool.shutdown(wait=False)
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)

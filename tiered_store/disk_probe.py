"""Random-read probes: how many page-sized ``O_DIRECT`` reads per second a disk serves from Python.

- ``probe_random_reads``: N threads, each one ``os.preadv`` at a time (queue depth 1 per
  thread): the ceiling for one-request-per-page I/O from Python threads, the baseline of the
  cold tier's ``io: direct`` reads (``bench/test_cold_read_speed.py``).
- ``probe_uring_reads``: one thread keeping ``queue_depth`` reads in flight through an io_uring
  (``tiered_store.io_uring``): the ceiling of the cold tier's ``io: uring`` reads, comparable
  with ``fio --ioengine=io_uring/libaio --iodepth=N``.
- ``fio_random_reads``: ``fio`` itself (Debian package ``fio``) on the same kind of reads, the
  baseline the benchmarks quote the cold path against.

Reads land at uniform-random whole blocks of the file, drawn before the clock starts.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import mmap
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiered_store.atomic_file import special_kind
from tiered_store.errors import ConfigError, TierIOError
from tiered_store.integers import as_integer
from tiered_store.io_uring import MAX_QUEUE_DEPTH, IoUring
from tiered_store.table_format import PAGE_BYTES

READS_PER_CLAIM = 64  # offsets a thread takes from the shared queue at a time
MAX_THREADS = MAX_QUEUE_DEPTH  # probe_random_reads: threads (reads in flight) at most, as the
# uring probe's queue_depth; more only cost memory and thread switches
MAX_BLOCK_BYTES = 0x7FFFF000  # 2 GiB - 4 KiB: the most one read transfers (Linux's MAX_RW_COUNT)


@dataclass(frozen=True)
class RandomReadRate:
    """What one probe measured: ``reads`` reads of ``block_bytes`` from ``threads`` threads."""

    reads: int
    seconds: float
    threads: int
    block_bytes: int
    queue_depth: int = 1  # reads in flight per thread

    @property
    def reads_per_second(self) -> float:
        """Reads completed per second of wall time."""
        return self.reads / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_second(self) -> float:
        """Bytes transferred per second of wall time."""
        return self.reads_per_second * self.block_bytes


def probe_random_reads(
    path: str | os.PathLike[str],
    *,
    reads: int = 16384,
    threads: int = 1,
    block_bytes: int = PAGE_BYTES,
    start: int = 0,
    stop: int | None = None,
    seed: int = 0,
) -> RandomReadRate:
    """Time ``reads`` random ``O_DIRECT`` reads of one block each, issued by ``threads`` threads.

    The page cache is bypassed, so the figure is the disk's (and the Python thread's per-call
    cost), not the RAM's. Offsets are uniform over the whole blocks of ``[start, stop)`` and drawn
    before the clock starts; the threads take them from one shared queue, so a slow thread does
    not hold the others back.

    Parameters
    ----------
    path : str or Path
        A file on the disk to probe, on a file system that allows ``O_DIRECT`` (not every
        tmpfs does). Only read.
    reads : int
        Reads in all, over all threads.
    threads : int
        Python threads issuing reads (each one request at a time: the queue depth), 1 to
        ``MAX_THREADS`` (4096).
    block_bytes : int
        Bytes per read, a positive multiple of 4096 (the ``O_DIRECT`` alignment unit), at most
        ``MAX_BLOCK_BYTES`` (what one read can transfer).
    start, stop : int
        Byte range the reads fall in (default: the whole file). Only whole blocks inside it are
        read.
    seed : int
        Seed of the random offsets: vary it between runs so a disk's own cache is not warmed.

    Returns
    -------
    RandomReadRate
        ``reads``, wall ``seconds``, ``threads``, ``block_bytes``; ``reads_per_second`` and
        ``bytes_per_second``.

    Raises
    ------
    ConfigError
        A count or range is out of bounds, or the system cannot start ``threads`` threads.
    TierIOError
        The file cannot be opened with ``O_DIRECT`` (or is not a regular file: a folder, a FIFO,
        a device) or a read fails.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "probe.bin")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(os.urandom(1 << 20))   # 1 MiB: 256 pages
    >>> rate = probe_random_reads(path, reads=512, threads=4)
    >>> rate.reads, rate.threads, rate.block_bytes, rate.reads_per_second > 0
    (512, 4, 4096, True)
    """
    path = Path(path)
    threads = _check_count("threads", threads, MAX_THREADS)
    reads, block_bytes = _check_count("reads", reads), _check_block_bytes(block_bytes)
    fd = _open_direct(path)
    try:
        offsets = _draw_offsets(fd, path, reads, block_bytes, start, stop, seed)
        seconds = _read_all(fd, path, offsets.tolist(), threads, block_bytes)
    finally:
        os.close(fd)
    return RandomReadRate(reads=reads, seconds=seconds, threads=threads, block_bytes=block_bytes)


def probe_uring_reads(
    path: str | os.PathLike[str],
    *,
    reads: int = 16384,
    queue_depth: int = 32,
    block_bytes: int = PAGE_BYTES,
    start: int = 0,
    stop: int | None = None,
    seed: int = 0,
) -> RandomReadRate:
    """Time ``reads`` random ``O_DIRECT`` block reads kept ``queue_depth`` deep by one io_uring.

    The same reads as ``probe_random_reads`` (uniform over the whole blocks of ``[start,
    stop)``, drawn before the clock starts), issued by one thread through an io_uring with at
    most ``queue_depth`` in flight, as ``fio --ioengine=io_uring --iodepth=queue_depth`` does.
    The data lands in a buffer of ``2 * queue_depth`` blocks, reused round-robin (reads still in
    flight may share a block: the data is not looked at).

    Parameters
    ----------
    path : str or Path
        A file on a file system that allows ``O_DIRECT``. Only read.
    reads : int
        Reads in all.
    queue_depth : int
        Reads in flight (1 to 4096).
    block_bytes, start, stop, seed
        As for ``probe_random_reads``.

    Returns
    -------
    RandomReadRate
        With ``threads=1`` and ``queue_depth``.

    Raises
    ------
    ConfigError
        A count or range is out of bounds.
    TierIOError
        The file cannot be opened with ``O_DIRECT`` (or is not a regular file), io_uring is
        unavailable, there is no memory for the ``(2 * queue_depth + 1) * block_bytes`` buffer,
        or a read fails.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "probe.bin")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(os.urandom(1 << 20))   # 1 MiB: 256 pages
    >>> rate = probe_uring_reads(path, reads=512, queue_depth=16)
    >>> rate.reads, rate.threads, rate.queue_depth, rate.reads_per_second > 0
    (512, 1, 16, True)
    """
    path = Path(path)
    queue_depth = _check_count("queue_depth", queue_depth, MAX_QUEUE_DEPTH)
    reads, block_bytes = _check_count("reads", reads), _check_block_bytes(block_bytes)
    fd = _open_direct(path)
    try:
        offsets = _draw_offsets(fd, path, reads, block_bytes, start, stop, seed)
        try:
            ring = IoUring(queue_depth)
        except OSError as exc:
            raise TierIOError(exc.errno, f"probing {path}: {exc.strerror}", str(path)) from exc
        with ring:
            slots = 2 * queue_depth
            raw = _buffer(path, (slots + 1) * block_bytes, queue_depth, block_bytes)
            base = raw.ctypes.data + (-raw.ctypes.data % PAGE_BYTES)
            addresses = base + (np.arange(reads, dtype=np.int64) % slots) * block_bytes
            lengths = np.full(reads, block_bytes, dtype=np.int64)
            begin = time.perf_counter()
            got = ring.read_batch(fd, offsets, lengths, addresses, keep=raw)
            seconds = time.perf_counter() - begin
    finally:
        os.close(fd)
    bad = np.flatnonzero(got != block_bytes)
    if len(bad):
        err = -int(got[bad[0]]) if got[bad[0]] < 0 else errno.EIO
        raise TierIOError(
            err,
            f"O_DIRECT read of {path} at offset {int(offsets[bad[0]])} failed "
            f"({os.strerror(err)}; got {int(got[bad[0]])} of {block_bytes} bytes)",
            str(path),
        )
    return RandomReadRate(
        reads=reads, seconds=seconds, threads=1, block_bytes=block_bytes, queue_depth=queue_depth
    )


def _buffer(path: Path, nbytes: int, queue_depth: int, block_bytes: int) -> np.ndarray:
    """The uring probe's read buffer; TierIOError naming its size when there is no memory for it."""
    try:
        return np.empty(nbytes, dtype=np.uint8)
    except MemoryError:
        raise TierIOError(
            errno.ENOMEM,
            f"probing {path}: no {nbytes:,}-byte buffer (2 x queue_depth {queue_depth} blocks of "
            f"{block_bytes:,} bytes, and one for alignment); expected a smaller queue_depth or "
            "block_bytes",
            str(path),
        ) from None


def _draw_offsets(
    fd: int, path: Path, reads: int, block_bytes: int, start: int, stop: int | None, seed: int
) -> np.ndarray:
    """``reads`` uniform-random whole-block byte offsets in ``[start, stop)`` of the open file
    (``reads`` and ``block_bytes`` checked already)."""
    for name, value in (("start", start), ("stop", stop)):
        if (value is not None or name == "start") and as_integer(value) is None:
            raise ConfigError(f"{name}: got {value!r}; expected a byte offset (an integer)")
    if (number := as_integer(seed)) is None or number < 0:
        raise ConfigError(f"seed: got {seed!r}; expected an integer >= 0")
    start, stop = as_integer(start), None if stop is None else as_integer(stop)
    size = os.fstat(fd).st_size
    stop = size if stop is None else stop
    first, end = -(-start // block_bytes), min(stop, size) // block_bytes
    if start < 0 or end <= first:
        raise ConfigError(
            f"probe range of {path}: bytes [{start}, {stop}) of a {size:,}-byte file hold no "
            f"whole {block_bytes}-byte block; expected a range inside the file of at least "
            f"one block"
        )
    rng = np.random.default_rng(seed)
    return rng.integers(first, end, reads, dtype=np.int64) * block_bytes


def _check_count(name: str, value: object, most: int | None = None) -> int:
    """``value`` (a Python or NumPy integer) as an int; ConfigError unless it is >= 1 (and at
    most ``most``)."""
    number = as_integer(value)
    if number is None or number < 1 or (most is not None and number > most):
        bound = ">= 1" if most is None else f"from 1 to {most}"
        raise ConfigError(f"{name}: got {value!r}; expected an integer {bound}")
    return number


def _check_block_bytes(value: object) -> int:
    """``value`` as an int; ConfigError unless it is a whole number of pages one read can take."""
    number = as_integer(value)
    if number is None or not PAGE_BYTES <= number <= MAX_BLOCK_BYTES or number % PAGE_BYTES:
        raise ConfigError(
            f"block_bytes: got {value!r}; expected a positive multiple of {PAGE_BYTES} "
            f"of at most {MAX_BLOCK_BYTES:,} (what one read can transfer)"
        )
    return number


def _open_direct(path: Path) -> int:
    """A read-only ``O_DIRECT`` descriptor of ``path``; TierIOError naming the file otherwise."""
    if not hasattr(os, "O_DIRECT"):
        raise TierIOError(errno.EINVAL, "O_DIRECT reads: this OS has no O_DIRECT", str(path))
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG  # the open below says why
    if stat.S_ISDIR(mode):  # Linux's open answers EINVAL, as for a file system without O_DIRECT
        raise TierIOError(
            errno.EISDIR,
            f"cannot probe {path}: it is a folder; expected a file on the disk to probe (a "
            "large file in that folder)",
            str(path),
        )
    if not stat.S_ISREG(mode):  # a FIFO's open waits for a writer; a device's size reads as 0
        kind = special_kind(mode) or "not a regular file"
        raise TierIOError(
            errno.EINVAL,
            f"cannot probe {path}: it is {kind}; expected a file on the disk to probe",
            str(path),
        )
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        hint = "; the file system refuses O_DIRECT here" if exc.errno == errno.EINVAL else ""
        raise TierIOError(
            exc.errno, f"cannot open {path} for O_DIRECT reads ({exc.strerror}){hint}", str(path)
        ) from exc


def _read_all(fd: int, path: Path, offsets: list[int], threads: int, block_bytes: int) -> float:
    """Seconds for ``threads`` threads to ``preadv`` one block at each offset (shared queue)."""
    claims = itertools.count()  # next() on a count is atomic under the GIL
    ready = threading.Barrier(threads + 1)
    stop = threading.Event()  # set on a failed read or a Ctrl-C: no thread reads on
    errors: list[OSError] = []

    def read_blocks() -> None:
        try:
            buf = mmap.mmap(-1, block_bytes)  # page-aligned, as O_DIRECT needs
        except OSError as exc:  # the clock and the other threads must not wait for this one
            errors.append(OSError(exc.errno, f"no {block_bytes:,}-byte buffer: {exc.strerror}"))
            ready.abort()
            return
        try:
            ready.wait()
            while not stop.is_set():
                first = next(claims) * READS_PER_CLAIM
                if first >= len(offsets):
                    return
                for offset in offsets[first : first + READS_PER_CLAIM]:
                    if (got := os.preadv(fd, [buf], offset)) != block_bytes:
                        raise OSError(
                            errno.EIO,
                            f"short read at offset {offset}: got {got} of {block_bytes} bytes "
                            "(file truncated while probed?)",
                        )
        except threading.BrokenBarrierError:  # a thread had no buffer: nobody reads
            pass
        except OSError as exc:
            errors.append(exc)
            stop.set()  # the probe fails: the other threads need not read on
        finally:
            buf.close()

    def worker(done: threading.Event) -> None:
        try:
            read_blocks()
        finally:  # waited on, not joined: a join that Ctrl-C interrupts marks a live thread ended
            done.set()

    ended = [threading.Event() for _ in range(threads)]
    pool = [
        threading.Thread(target=worker, args=(done,), name=f"disk-probe-{k}")
        for k, done in enumerate(ended)
    ]
    started = 0
    try:
        try:
            for thread in pool:
                _start(thread, started, threads)
                started += 1
            ready.wait()
        except threading.BrokenBarrierError:  # the error a worker left is raised below
            pass
        start = time.perf_counter()
        for done in ended:
            done.wait()
    except BaseException:  # no thread for a worker, Ctrl-C: every thread stops reading before
        ready.abort()  # the caller closes the file, whose number the next open takes
        stop.set()
        for done in ended[:started]:
            done.wait()
        raise
    seconds = time.perf_counter() - start
    if errors:
        exc = errors[0]
        raise TierIOError(
            exc.errno, f"O_DIRECT read of {path} failed ({exc.strerror})", str(path)
        ) from exc
    return seconds


def _start(thread: threading.Thread, started: int, threads: int) -> None:
    """Start a probe thread; ConfigError naming ``threads`` when the system refuses another."""
    try:
        thread.start()
    except RuntimeError as exc:  # "can't start new thread": a ulimit -u, memory, threads-max
        raise ConfigError(
            f"threads: got {threads}, but the system started only {started} ({exc}); expected "
            "fewer threads"
        ) from exc


def cached_pages(path: str | os.PathLike[str]) -> int:
    """How many of the file's pages the page cache holds now (``mincore(2)`` over a map of it).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     cached_pages(f.name)
    0
    """
    size = os.stat(path).st_size
    if not size:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"cannot map {path} to count its cached pages")
        vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return int(np.count_nonzero(np.frombuffer(vec.raw, dtype=np.uint8) & 1))


def drop_page_cache(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Ask the kernel to forget the cached pages of ``paths`` (so a benchmark starts from disk);
    written out first, as the kernel keeps dirty pages (a table just made stayed cached).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     drop_page_cache([f.name])
    """
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fio_random_reads(
    path: str | os.PathLike[str],
    *,
    start: int = 0,
    size: int | None = None,
    engine: str = "libaio",
    depth: int = 32,
    seconds: float = 3.0,
) -> dict[str, float]:
    """What ``fio`` gets from ``path``: random page-sized ``O_DIRECT`` reads of ``[start, start +
    size)`` (default: the whole pages of the file), one job at queue depth ``depth``.

    Returns ``rate`` (reads/s), ``cpu_cores`` and ``p99_latency_us``. Raises ``FileNotFoundError``
    when ``fio`` is not installed and ``TierIOError`` when it fails.

    Examples
    --------
    >>> fio_random_reads("/var/tmp/t.npy", depth=32, seconds=1)["rate"]  # doctest: +SKIP
    64794.1
    """
    if shutil.which("fio") is None:
        raise FileNotFoundError("fio is not installed (Debian/Ubuntu: apt-get install fio)")
    if size is None:
        size = (Path(path).stat().st_size - start) // PAGE_BYTES * PAGE_BYTES
    cmd = [
        "fio",
        "--name=cold",
        f"--filename={path}",
        "--rw=randread",
        f"--bs={PAGE_BYTES}",
        "--direct=1",
        f"--ioengine={engine}",
        f"--iodepth={depth}",
        "--numjobs=1",
        f"--offset={start}",
        f"--size={size}",
        f"--runtime={round(seconds * 1000)}ms",
        "--time_based",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise TierIOError(f"fio on {path} failed ({done.returncode}): {done.stderr.strip()}")
    job = json.loads(done.stdout)["jobs"][0]
    return {
        "rate": job["read"]["iops"],
        "cpu_cores": (job["usr_cpu"] + job["sys_cpu"]) / 100,
        "p99_latency_us": job["read"]["clat_ns"]["percentile"]["99.000000"] / 1e3,
    }

"""A minimal Linux io_uring for batches of reads, driven with NumPy arrays and three syscalls.

Why not a binding package: the cold tier reads with ``O_DIRECT`` into page-aligned NumPy memory,
thousands of requests per batch. The PyPI ``liburing`` package (2026.3.30, an alpha Zig rewrite)
only reads into ``bytearray`` objects, which are not 512-byte aligned (``O_DIRECT`` answers
EINVAL), has no batch completion call (``io_uring_peek_batch_cqe`` raises NotImplementedError)
and needs several Python calls per request. Here the submission queue entries of a whole batch
are one NumPy structured array, copied into the kernel's ring with slice assignments; one
``io_uring_enter`` submits everything that fits and waits for a share of it; completions are
read back as arrays. Python work is per ``io_uring_enter`` call, never per request.

Ring protocol (``io_uring(7)``): the submission and completion rings and the SQE array are
shared memory (``mmap`` of the ring descriptor). Only one thread drives a ring at a time (the
caller's job). The head/tail loads and stores rely on x86-64's total store order, so rings are
refused on other architectures (use ``io: direct`` there).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import platform
import select
import threading
import time
import warnings
import weakref

import numpy as np

__all__ = ["IoUring", "MAX_QUEUE_DEPTH", "uring_unavailable_reason"]

MAX_QUEUE_DEPTH = 4096  # requests in flight per ring (the kernel allows 32768 entries)
REFILL_SHARE = 8  # refill once 1/REFILL_SHARE of the queue depth has completed
DRAIN_WAIT_S = 30.0  # an interrupted batch's reads are waited for this long, then stranded

_SYS_IO_URING_SETUP = 425  # the same number on every architecture with the generic table
_SYS_IO_URING_ENTER = 426
_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000
_IORING_FEAT_SINGLE_MMAP = 1 << 0
_IORING_ENTER_GETEVENTS = 1 << 0
_IORING_OP_READ = 22  # Linux 5.6
_U32 = 0xFFFFFFFF  # ring heads and tails are free-running 32-bit counters

# struct io_uring_sqe (64 bytes), the fields a plain read uses
SQE_DTYPE = np.dtype(
    {
        "names": ["opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data"],
        "formats": ["u1", "u1", "<u2", "<i4", "<u8", "<u8", "<u4", "<u4", "<u8"],
        "offsets": [0, 1, 2, 4, 8, 16, 24, 28, 32],
        "itemsize": 64,
    }
)
# struct io_uring_cqe (16 bytes)
CQE_DTYPE = np.dtype(
    {
        "names": ["user_data", "res", "flags"],
        "formats": ["<u8", "<i4", "<u4"],
        "offsets": [0, 8, 12],
        "itemsize": 16,
    }
)


class _SqRingOffsets(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries")),
        *((name, ctypes.c_uint32) for name in ("flags", "dropped", "array", "resv1")),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqRingOffsets(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("head", "tail", "ring_mask", "ring_entries")),
        *((name, ctypes.c_uint32) for name in ("overflow", "cqes", "flags", "resv1")),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    """struct io_uring_params (120 bytes)."""

    _fields_ = [
        *((name, ctypes.c_uint32) for name in ("sq_entries", "cq_entries", "flags")),
        *((name, ctypes.c_uint32) for name in ("sq_thread_cpu", "sq_thread_idle", "features")),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqRingOffsets),
        ("cq_off", _CqRingOffsets),
    ]


_STRANDED: list[object] = []  # memory a ring closed with reads in flight may still write: kept
_libc_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def _syscall() -> ctypes._CFuncPtr:
    """libc's ``syscall`` (ctypes.CDLL releases the GIL while it blocks)."""
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def uring_unavailable_reason() -> str | None:
    """None when an io_uring can be set up here, else why not (a sentence)."""
    if platform.system() != "Linux":
        return f"io_uring is Linux-only; this is {platform.system()}"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"io_uring rings here are x86-64 only; this machine is {platform.machine()}"
    try:
        IoUring(1).close()
    except OSError as exc:
        return str(exc)
    return None


class IoUring:
    """One io_uring instance that reads batches of (offset, length, address) requests.

    Parameters
    ----------
    queue_depth : int
        Most requests in flight at once (1 to ``MAX_QUEUE_DEPTH``); the kernel rounds the ring
        up to a power of two.
    owner : str
        What the ring reads for, named in its warnings (say, ``"table /data/t.npy"``).

    Raises
    ------
    OSError
        io_uring is unavailable: not Linux x86-64, the kernel lacks it (ENOSYS), or a sandbox or
        ``kernel.io_uring_disabled`` forbids it (EPERM). The message says which.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "f.bin")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(bytes(range(256)) * 64)  # 16 KiB
    >>> buf = np.zeros(2 * 4096, dtype=np.uint8)
    >>> fd = os.open(path, os.O_RDONLY)
    >>> with IoUring(8) as ring:
    ...     res = ring.read_batch(
    ...         fd, np.array([4096, 15000]), np.array([4096, 4096]), buf.ctypes.data + np.array([0, 4096])
    ...     )
    >>> os.close(fd)
    >>> res.tolist()  # the second read stops at the end of the file
    [4096, 1384]
    >>> int(buf[255]), int(buf[4096]), int(buf[4096 + 1383])
    (255, 152, 255)
    """

    def __init__(self, queue_depth: int, owner: str = "") -> None:
        if isinstance(queue_depth, bool) or not isinstance(queue_depth, int):
            raise ValueError(f"queue_depth={queue_depth!r}; expected an integer")
        if not 1 <= queue_depth <= MAX_QUEUE_DEPTH:
            raise ValueError(f"queue_depth={queue_depth}; expected 1 to {MAX_QUEUE_DEPTH}")
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            raise OSError(
                errno.ENOSYS,
                f"io_uring rings here need Linux on x86-64; this is {platform.system()} "
                f"{platform.machine()}",
            )
        self.queue_depth = queue_depth
        self.owner = owner
        self._maps: list[mmap.mmap] = []
        self._unfinished: list[object] = []  # [keep] while a batch's reads may be in flight
        params = _Params()
        fd = _syscall()(_SYS_IO_URING_SETUP, ctypes.c_uint(queue_depth), ctypes.byref(params))
        if fd < 0:
            err = ctypes.get_errno()
            why = {
                errno.ENOSYS: "the kernel has no io_uring",
                errno.EPERM: "io_uring is forbidden here (kernel.io_uring_disabled or a "
                "seccomp sandbox)",
            }.get(err, os.strerror(err))
            raise OSError(err, f"io_uring_setup({queue_depth}) failed: {why}")
        self._fd = fd
        self._finalizer = weakref.finalize(self, _close_quietly, fd, self._unfinished)
        try:
            self._map_rings(params)
        except BaseException:
            self.close()
            raise

    # ---- public ----------------------------------------------------------------------------

    def read_batch(
        self,
        fd: int,
        offsets: np.ndarray,
        lengths: np.ndarray,
        addresses: np.ndarray,
        keep: object = None,
    ) -> np.ndarray:
        """Read ``lengths[i]`` bytes at ``offsets[i]`` of ``fd`` into memory at ``addresses[i]``.

        All requests are submitted, at most ``queue_depth`` in flight, and all are reaped
        before this returns. The memory must stay alive and unused meanwhile (and be aligned as
        ``O_DIRECT`` requires, for such a descriptor). An interrupted batch is drained before
        the interrupt goes on; one whose drain an interrupt cut short is drained by the next
        call, before its own requests. ``keep``, the memory's owner, is referenced until then;
        for good where the ring is closed (or collected) with reads in flight.

        Returns
        -------
        numpy.ndarray
            int32 per request: bytes read (short at end of file), or ``-errno``.
        """
        if self._unfinished and self._fd >= 0:
            self._drain()
        if self._fd < 0:
            raise OSError(errno.EBADF, "io_uring is closed")
        n = len(offsets)
        if n and (int(np.min(lengths)) < 0 or int(np.min(offsets)) < 0):  # as u32/u64: huge
            raise ValueError(
                f"io_uring read: a length of {int(np.min(lengths))} or an offset of "
                f"{int(np.min(offsets))}; expected both >= 0"
            )
        if n and int(np.max(lengths)) > _U32:  # an SQE's length is 32 bits: it would wrap
            raise ValueError(
                f"io_uring read: a length of {int(np.max(lengths)):,} bytes; expected at most "
                f"{_U32:,} per request (split the read)"
            )
        sqes = np.zeros(n, dtype=SQE_DTYPE)
        sqes["opcode"] = _IORING_OP_READ
        sqes["fd"] = fd
        sqes["off"] = offsets
        sqes["addr"] = addresses
        sqes["len"] = lengths
        sqes["user_data"] = np.arange(n, dtype=np.uint64)
        results = np.empty(n, dtype=np.int32)
        self._batch_start = (self._tail, self._cq_head_value())  # what _drain counts from
        self._unfinished[:] = [keep]
        try:
            self._run(sqes, results)
        except BaseException as exc:  # (a signal, Ctrl-C): what is queued or in flight must not
            try:  # linger
                self._drain()
            except Exception:  # its warning made an error (-W error): the interrupt goes on,
                raise exc  # noqa: B904 (that error its context)
            raise
        self._unfinished.clear()
        return results

    def _run(self, sqes: np.ndarray, results: np.ndarray) -> None:
        """Submit ``sqes``, at most ``queue_depth`` in flight, and reap every completion."""
        n, enter = len(sqes), _syscall()
        wait_for = max(1, self.queue_depth // REFILL_SHARE)  # completions per refill
        written = consumed = completed = 0
        while completed < n:
            room = min(self.queue_depth - (written - completed), n - written)
            if room > 0:
                self._push(sqes[written : written + room])
                written += room
            ret = enter(
                _SYS_IO_URING_ENTER,
                self._fd,
                ctypes.c_uint(written - consumed),
                ctypes.c_uint(min(written - completed, wait_for)),
                ctypes.c_uint(_IORING_ENTER_GETEVENTS),
                None,
                ctypes.c_size_t(0),
            )
            if ret < 0:
                err = ctypes.get_errno()
                busy = err in (errno.EAGAIN, errno.EBUSY) and consumed > completed
                if err != errno.EINTR and not busy:
                    raise OSError(err, f"io_uring_enter failed: {os.strerror(err)}")
            else:
                consumed += ret
            completed += self._reap(results)

    def _drain(self) -> None:
        """After an interrupted batch, wait for every request it queued (their memory is the
        caller's), so that the ring starts the next batch empty.

        A further interrupt meanwhile (Ctrl-C, a signal handler's ``SystemExit``) does not stop
        the wait; the first is raised once the reads are in, its context the interruption
        drained (an exit asked meanwhile is not lost). One outside the wait (as the drain is
        entered, between its rounds) leaves the batch unfinished: the next ``read_batch``
        drains it first. The kernel's refusal (an Exception) closes the ring (``closed``: never
        reused), its ``keep`` kept for good if reads it took are not complete. Reads still in
        flight after ``DRAIN_WAIT_S`` (a hung device) are given up on: the ring is closed, their
        ``keep`` kept for good (the kernel may still write into it), with a ``RuntimeWarning``
        naming the ``owner``; the interrupt goes on (with that warning as its context where it
        is made an error, ``-W error``; raised itself by a drain at the start of a batch)."""
        # Counted from the rings (the interruption may have come between a ring update and its
        # count in _run). The tail is published first (it may have come in _push between
        # counting SQEs and publishing them); the kernel is asked to submit only the SQEs it has
        # not taken (the SQ head): asked for more, it returns without waiting, and this spins.
        tail0, head0 = self._batch_start
        queued = (self._tail - tail0) & _U32
        enter = _syscall()
        deadline = time.monotonic() + DRAIN_WAIT_S
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)  # a completion posted
        further: BaseException | None = None
        stranded = 0
        while True:
            try:
                words, index = self._sq_tail
                words[index] = self._tail  # (the SQEs counted were stored before the count)
                self._reap(None)  # those posted since the last round count (at the deadline too)
                completed = (self._cq_head_value() - head0) & _U32
                if completed >= queued:
                    self._unfinished.clear()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    stranded = queued - completed
                    break
                words, index = self._sq_head
                ret = enter(  # submit what the kernel has not taken, and post completions
                    _SYS_IO_URING_ENTER,
                    self._fd,
                    ctypes.c_uint((self._tail - int(words[index])) & _U32),
                    ctypes.c_uint(0),
                    ctypes.c_uint(_IORING_ENTER_GETEVENTS),
                    None,
                    ctypes.c_size_t(0),
                )
                if ret < 0 and ctypes.get_errno() not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise OSError(ctypes.get_errno(), "io_uring_enter failed while draining")
                if not self._reap(None):  # none posted: wait for one, until the deadline
                    poller.poll(max(1, int(left * 1000)))
            except Exception:  # the kernel refuses: the ring cannot be drained
                self.close()
                break
            except BaseException as exc:  # a further interrupt (Ctrl-C, a signal's SystemExit)
                further = exc if further is None else further
        try:
            if stranded:  # outside the loop: its warning made an error (-W error) is raised
                self._strand(stranded)
        finally:
            if further is not None:
                raise further  # (that error its context)

    def _strand(self, in_flight: int) -> None:
        """Give up on ``in_flight`` reads that do not complete: close the ring (their ``keep``
        kept for good) and warn."""
        self.close()
        owner = f" of {self.owner}" if self.owner else ""
        warnings.warn(
            f"io_uring{owner}: {in_flight} reads of an interrupted batch still in flight after "
            f"{DRAIN_WAIT_S:g} s of draining (a hung device?); expected them within that: the ring "
            "is closed and the memory they land in kept for good (never freed)",
            RuntimeWarning,
            stacklevel=4,
        )

    @property
    def pending(self) -> int:
        """Requests of an interrupted batch (its drain cut short) not completed yet, queued or
        in flight: the next ``read_batch`` waits for them first (0 when none)."""
        if not self._unfinished or self._fd < 0:
            return 0
        tail0, head0 = self._batch_start
        words, index = self._cq_tail
        return ((self._tail - tail0) & _U32) - ((int(words[index]) - head0) & _U32)

    @property
    def closed(self) -> bool:
        """Whether the ring is closed (it was, or an interrupted batch could not be drained)."""
        return self._fd < 0

    def close(self) -> None:
        """Unmap the rings and close the ring descriptor (idempotent); an unfinished batch's
        ``keep`` is kept for good only if reads the kernel took are not complete."""
        if (
            self._unfinished
            and self._sq_head is not None
            and not self._in_flight(*self._batch_start)
        ):
            self._unfinished.clear()  # queued SQEs not taken never are, once the ring is closed
        self._sq_array = self._sqes = self._cqes = None
        self._sq_head = self._sq_tail = self._cq_head = self._cq_tail = None
        for m in self._maps:
            with contextlib.suppress(BufferError):
                m.close()
        self._maps = []
        if self._fd >= 0:
            self._finalizer()
            self._fd = -1

    def __enter__(self) -> IoUring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the rings -------------------------------------------------------------------------

    def _map_rings(self, p: _Params) -> None:
        """mmap the rings and keep NumPy views of their heads, tails and entries."""
        sq_bytes = p.sq_off.array + p.sq_entries * 4
        cq_bytes = p.cq_off.cqes + p.cq_entries * CQE_DTYPE.itemsize
        single = bool(p.features & _IORING_FEAT_SINGLE_MMAP)
        sq_map = self._mmap(max(sq_bytes, cq_bytes) if single else sq_bytes, _IORING_OFF_SQ_RING)
        cq_map = sq_map if single else self._mmap(cq_bytes, _IORING_OFF_CQ_RING)
        sqe_map = self._mmap(p.sq_entries * SQE_DTYPE.itemsize, _IORING_OFF_SQES)
        self._entries = p.sq_entries
        self._sq_mask, self._cq_mask = p.sq_entries - 1, p.cq_entries - 1
        sq_u32 = np.frombuffer(sq_map, dtype=np.uint32)
        cq_u32 = np.frombuffer(cq_map, dtype=np.uint32)
        self._sq_head = (sq_u32, p.sq_off.head // 4)  # the kernel's: SQEs it has taken
        self._sq_tail = (sq_u32, p.sq_off.tail // 4)
        self._cq_head = (cq_u32, p.cq_off.head // 4)
        self._cq_tail = (cq_u32, p.cq_off.tail // 4)
        self._sq_array = np.frombuffer(
            sq_map, dtype=np.uint32, count=p.sq_entries, offset=p.sq_off.array
        )
        self._sq_array[:] = np.arange(p.sq_entries, dtype=np.uint32)  # slot i -> SQE i
        self._sqes = np.frombuffer(sqe_map, dtype=SQE_DTYPE)
        self._cqes = np.frombuffer(
            cq_map, dtype=CQE_DTYPE, count=p.cq_entries, offset=p.cq_off.cqes
        )
        self._tail = int(sq_u32[p.sq_off.tail // 4])

    def _mmap(self, length: int, offset: int) -> mmap.mmap:
        """Map ``length`` bytes of the ring descriptor at ``offset``, shared and writable."""
        m = mmap.mmap(
            self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
        )
        self._maps.append(m)
        return m

    def _push(self, batch: np.ndarray) -> None:
        """Copy SQEs into the ring (at most two slices: the ring wraps) and publish the tail."""
        start = self._tail & self._sq_mask
        first = min(len(batch), self._entries - start)
        self._sqes[start : start + first] = batch[:first]
        self._sqes[: len(batch) - first] = batch[first:]
        self._tail = (self._tail + len(batch)) & _U32
        words, index = self._sq_tail
        words[index] = self._tail  # one aligned 32-bit store, after the SQE stores (x86 TSO)

    def _in_flight(self, tail0: int, head0: int) -> int:
        """Requests the kernel took since the batch began (SQ head) and has not completed."""
        taken_words, taken_index = self._sq_head
        done_words, done_index = self._cq_tail
        taken = (int(taken_words[taken_index]) - tail0) & _U32
        return taken - ((int(done_words[done_index]) - head0) & _U32)

    def _cq_head_value(self) -> int:
        """The completion ring's head: completions reaped so far (mod 2**32)."""
        words, index = self._cq_head
        return int(words[index])

    def _reap(self, results: np.ndarray | None) -> int:
        """Move every posted completion's ``res`` into ``results[user_data]`` (or drop it, for
        None); how many."""
        head_words, head_index = self._cq_head
        tail_words, tail_index = self._cq_tail
        head, tail = int(head_words[head_index]), int(tail_words[tail_index])
        count = (tail - head) & _U32
        if count:
            start = head & self._cq_mask
            first = min(count, self._cq_mask + 1 - start)
            for part in (self._cqes[start : start + first], self._cqes[: count - first]):
                if results is not None:
                    results[part["user_data"].astype(np.int64)] = part["res"]
            head_words[head_index] = tail
        return count


def _close_quietly(fd: int, unfinished: list[object]) -> None:
    """Close a ring descriptor (the finalizer of an IoUring); the memory of reads it may have
    in flight is kept for good."""
    _STRANDED.extend(unfinished)
    with contextlib.suppress(OSError):
        os.close(fd)
